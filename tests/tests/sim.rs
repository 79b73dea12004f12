//! The deterministic simulator (`ferry_tests::sim`) over many seeds, and the planted bugs it
//! must catch.
//!
//! - `cargo test -p ferry-tests --test sim`: the normal run (a few hundred seeds).
//! - `FERRY_SIM_SEEDS=10000 cargo test --release -p ferry-tests --test sim -- --nocapture seeds`:
//!   the long run, which also fails on an expected transition never reached.
//! - `FERRY_SIM_SEED=N cargo test -p ferry-tests --test sim -- --nocapture one_seed`: one
//!   seed, with its whole trace.

#![allow(clippy::panic)]

use ferry_tests::sim::{run_seed, transitions_missing, Bug, Coverage, TRANSITIONS_UNREACHABLE};

/// Seeds of the normal test run.
const SEEDS_DEFAULT_COUNT: u64 = 500;

fn seeds_count() -> u64 {
    std::env::var("FERRY_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS_DEFAULT_COUNT)
}

#[test]
fn seeds() {
    let count = seeds_count();
    let mut coverage = Coverage::default();
    for seed in 0..count {
        let outcome = run_seed(seed, None);
        if let Some(v) = &outcome.violation {
            let tail: Vec<_> = outcome.trace.iter().rev().take(40).rev().cloned().collect();
            panic!(
                "seed {seed} broke an invariant: {v}\nlast steps:\n{}\nreproduce: FERRY_SIM_SEED={seed} cargo test -p ferry-tests --test sim -- --nocapture one_seed",
                tail.join("\n")
            );
        }
        coverage.merge(&outcome.coverage);
    }
    println!("{count} seeds passed; coverage:\n{}", coverage.report());
    for (t, why) in TRANSITIONS_UNREACHABLE {
        println!("unreachable: {t}: {why}");
    }
    let missing = transitions_missing(&coverage);
    if count >= 10_000 {
        assert!(missing.is_empty(), "transitions never reached in {count} seeds: {missing:?}");
    } else if !missing.is_empty() {
        println!("not reached in {count} seeds (the long run fails on these): {missing:?}");
    }
}

#[test]
fn one_seed() {
    let Some(seed) = std::env::var("FERRY_SIM_SEED").ok().and_then(|s| s.parse().ok()) else {
        return;
    };
    let outcome = run_seed(seed, None);
    println!("{}", outcome.trace.join("\n"));
    println!("coverage:\n{}", outcome.coverage.report());
    assert!(outcome.violation.is_none(), "seed {seed}: {:?}", outcome.violation);
}

/// Runs seeds with `bug` planted until one breaks an invariant; how many it took.
fn seeds_to_catch(bug: Bug) -> u64 {
    for seed in 0..seeds_count() {
        if let Some(v) = run_seed(seed, Some(bug)).violation {
            println!("{bug:?} caught by seed {seed} ({} seeds): {v}", seed + 1);
            return seed + 1;
        }
    }
    panic!("{bug:?} was not caught in {} seeds", seeds_count());
}

#[test]
fn catches_a_phantom_migration() {
    seeds_to_catch(Bug::PhantomMigration);
}

#[test]
fn catches_a_release_from_copying() {
    seeds_to_catch(Bug::ReleaseFromCopying);
}

#[test]
fn catches_an_ack_before_its_group_commit_sync() {
    seeds_to_catch(Bug::AckBeforeSync);
}

#[test]
fn catches_a_fence_answered_before_its_wal_is_durable() {
    seeds_to_catch(Bug::FenceWithoutWalWait);
}
