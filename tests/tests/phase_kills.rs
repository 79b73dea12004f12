//! SIGKILL of either `ferry serve` daemon at each phase boundary of a live migration, then a
//! restart of that daemon where it listened, and the outcome DESIGN section 5 asks of a restart
//! at that point (a restart resumes the migration from its durable checkpoint; a fence it cut
//! off is cancelled; a release stays the point of no return). A table of (daemon, boundary)
//! cases runs in CI; `FERRY_PHASE_KILLS_ROUNDS=N` adds N randomized rounds (daemon, boundary, a
//! delay of up to 300 ms past the boundary, write rate, base size) drawn from a printed seed
//! (`FERRY_PHASE_KILLS_SEED` replays it).
//!
//! The boundaries, as the status names the phases:
//! - `copying`: `BaseCopy` with bytes moved. After the restart the source is still in
//!   `BaseCopy` (a killed target leaves it there, reconnecting); the copy completes resending at
//!   most one chunk per stream.
//! - `base staged`: `WalCatchUp` just reached. A restarted source resumes in `WalCatchUp`, not
//!   in `BaseCopy`, and resends no chunk.
//! - `fenced`: the fence answered, the staging `fenced`, no release yet. A restarted source
//!   cancels the fence it no longer holds (back in `WalCatchUp`), a restarted target keeps its
//!   staging `fenced`; either way the coordinator's release at that `final_lsn` completes.
//! - `released`: the release answered. A restarted daemon keeps `Completed` with the staging
//!   `released` at that `final_lsn`; a repeated release answers the same.
//!
//! Every case ends with the reference verifier: every write of the vShard once (0 lost, 0
//! duplicated) across the staged export, the staged WAL and the target node's WAL.
//!
//! What it does not: kill during a fence's drain (`daemon_fences.rs` does), or during the
//! release call itself (`release_recovery.rs` cuts the target off there instead).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::time::Duration;

use ferry_tests::daemons::{cluster, phase_is, Cluster, Node};
use ferry_tests::live::{restart_in_place, seed, Live, LiveOptions, Rng};
use ferry_wire::Lsn;
use serde_json::{json, Value};

const CHUNK_LEN_BYTES: u64 = 65_536;
const STREAMS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boundary {
    Copying,
    BaseStaged,
    Fenced,
    Released,
}

const BOUNDARIES: [Boundary; 4] = [Boundary::Copying, Boundary::BaseStaged, Boundary::Fenced, Boundary::Released];

/// One case of the table, or one randomized round.
#[derive(Debug, Clone, Copy)]
struct Case {
    daemon: Daemon,
    boundary: Boundary,
    /// How long past the boundary the kill comes.
    delay: Duration,
    options: LiveOptions,
}

impl Case {
    fn new(daemon: Daemon, boundary: Boundary) -> Case {
        // The copying boundary needs a base copy that lasts: 8 MiB at 4 MiB/s.
        let options = match boundary {
            Boundary::Copying => LiveOptions { bulk_bytes: 8 << 20, rate_bytes_per_sec: 4 << 20, ..Default::default() },
            _ => LiveOptions::default(),
        };
        Case { daemon, boundary, delay: Duration::ZERO, options }
    }
}

fn node(c: &mut Cluster, daemon: Daemon) -> &mut Node {
    match daemon {
        Daemon::Source => &mut c.source,
        Daemon::Target => &mut c.target,
    }
}

/// SIGKILL, then a restart where it listened.
fn kill_and_restart(c: &mut Cluster, daemon: Daemon) {
    let node = node(c, daemon);
    let exit = node.signal(libc::SIGKILL);
    assert!(!exit.success(), "{daemon:?}: {exit:?}");
    restart_in_place(node);
}

fn status(c: &Cluster, id: &str) -> Value {
    c.source.status(id)
}

fn run(case: Case, id: &str) {
    eprintln!("{id}: {case:?}");
    let mut c = cluster("", "", &[]);
    let dir = c._dir.path().to_path_buf();
    let node_wal = c.target_data.join("node-wal");
    let target = c.target.addr.clone();
    let live = Live::start(&c.source, &dir, id, 7, (&target, "target"), &case.options);

    let final_lsn = match case.boundary {
        Boundary::Copying => {
            c.source
                .wait_for(id, "bytes moved", |s| s["phase"] == "BaseCopy" && s["bytes_transferred"].as_u64() > Some(0));
            std::thread::sleep(case.delay);
            kill_and_restart(&mut c, case.daemon);
            let after = status(&c, id);
            assert_eq!(after["phase"], "BaseCopy", "the restart did not resume the copy: {after}");
            let staged = c.source.wait_for(id, "the base staged after the restart", phase_is("WalCatchUp"));
            let resent = staged["bytes_resent"].as_u64().unwrap();
            assert!(resent <= CHUNK_LEN_BYTES * STREAMS, "{resent} bytes resent after one kill: {staged}");
            assert_eq!(ferry_tests::live::manifest(&c.target_data, id)["state"], "copying");
            finish(&c, &live)
        }
        Boundary::BaseStaged => {
            c.source.wait_for(id, "the base staged", phase_is("WalCatchUp"));
            std::thread::sleep(case.delay);
            let resent_before = status(&c, id)["bytes_resent"].as_u64().unwrap();
            kill_and_restart(&mut c, case.daemon);
            let after = status(&c, id);
            assert_eq!(after["phase"], "WalCatchUp", "the restart went back before the staged base: {after}");
            // The tail streams again past the restart.
            let tip = live.writer.acked_lsn().0;
            let caught_up =
                c.source.wait_for(id, "the tail past the restart", |s| s["wal"]["current_lsn"].as_u64() >= Some(tip));
            assert_eq!(
                caught_up["bytes_resent"].as_u64(),
                Some(resent_before),
                "a staged base was resent: {caught_up}"
            );
            finish(&c, &live)
        }
        Boundary::Fenced => {
            c.source.wait_for(id, "WalCatchUp", phase_is("WalCatchUp"));
            let (final_lsn, _) = live.fence(&c.source, 5);
            // The `fenced` commit follows the answer: the kill is past it.
            assert_eq!(ferry_tests::manifest_json_when(&c.target_data, id, "fenced").unwrap()["state"], "fenced");
            std::thread::sleep(case.delay);
            kill_and_restart(&mut c, case.daemon);
            let manifest = ferry_tests::live::manifest(&c.target_data, id);
            assert_eq!(
                (manifest["state"].as_str(), manifest["final_lsn"].as_u64()),
                (Some("fenced"), Some(final_lsn.0))
            );
            match case.daemon {
                // The fence it held is gone with it: cancelled, streaming again.
                Daemon::Source => assert_eq!(status(&c, id)["phase"], "WalCatchUp"),
                Daemon::Target => {
                    let inbound = c.target.wait_for(id, "the restarted target's staging", |s| s.get("phase").is_some());
                    assert_eq!(inbound["staging_state"], "fenced", "{inbound}");
                }
            }
            let released = live.resume_and_release(&c.source, &node_wal).unwrap_or_else(|e| panic!("release: {e:?}"));
            assert_eq!(released["final_lsn"], final_lsn.0, "{released}");
            final_lsn
        }
        Boundary::Released => {
            c.source.wait_for(id, "WalCatchUp", phase_is("WalCatchUp"));
            let (final_lsn, _) = live.fence(&c.source, 5);
            let released = live.resume_and_release(&c.source, &node_wal).unwrap_or_else(|e| panic!("release: {e:?}"));
            std::thread::sleep(case.delay);
            kill_and_restart(&mut c, case.daemon);
            let after = status(&c, id);
            assert_eq!(
                (after["phase"].as_str(), after["final_lsn"].as_u64()),
                (Some("Completed"), Some(final_lsn.0)),
                "{after}"
            );
            let again = c.source.call("migration.release", json!({ "migration_id": id })).unwrap();
            assert_eq!(again["final_lsn"], released["final_lsn"], "{again}");
            assert_eq!(again["pause_duration_us"], released["pause_duration_us"], "{again}");
            final_lsn
        }
    };
    let manifest = ferry_tests::live::manifest(&c.target_data, id);
    assert_eq!((manifest["state"].as_str(), manifest["final_lsn"].as_u64()), (Some("released"), Some(final_lsn.0)));
    let source = status(&c, id);
    assert_eq!((source["phase"].as_str(), source["staging_state"].as_str()), (Some("Completed"), Some("released")));
    let inbound = c.target.wait_for(id, "the target Completed", phase_is("Completed"));
    assert_eq!(inbound["staging_state"], "released", "{inbound}");
    let verified = live.verify(final_lsn, &c.staged(id), &node_wal);
    eprintln!("{id}: {verified} writes verified, final_lsn {final_lsn}");
}

/// The fence and release after a kill before the fence.
fn finish(c: &Cluster, live: &Live) -> Lsn {
    let (final_lsn, _) = live.fence(&c.source, 5);
    let released = live
        .resume_and_release(&c.source, &c.target_data.join("node-wal"))
        .unwrap_or_else(|e| panic!("release: {e:?}"));
    assert_eq!(released["final_lsn"], final_lsn.0, "{released}");
    final_lsn
}

#[test]
fn source_killed_while_copying_resumes_the_copy() {
    run(Case::new(Daemon::Source, Boundary::Copying), "k-src-copying");
}

#[test]
fn target_killed_while_copying_resumes_the_copy() {
    run(Case::new(Daemon::Target, Boundary::Copying), "k-tgt-copying");
}

#[test]
fn source_killed_once_the_base_is_staged_resumes_the_tail() {
    run(Case::new(Daemon::Source, Boundary::BaseStaged), "k-src-staged");
}

#[test]
fn target_killed_once_the_base_is_staged_resumes_the_tail() {
    run(Case::new(Daemon::Target, Boundary::BaseStaged), "k-tgt-staged");
}

#[test]
fn source_killed_once_fenced_is_cancelled_and_the_release_still_completes() {
    run(Case::new(Daemon::Source, Boundary::Fenced), "k-src-fenced");
}

#[test]
fn target_killed_once_fenced_keeps_its_staging_fenced_and_the_release_completes() {
    run(Case::new(Daemon::Target, Boundary::Fenced), "k-tgt-fenced");
}

#[test]
fn source_killed_once_released_stays_completed() {
    run(Case::new(Daemon::Source, Boundary::Released), "k-src-released");
}

#[test]
fn target_killed_once_released_stays_released() {
    run(Case::new(Daemon::Target, Boundary::Released), "k-tgt-released");
}

/// `FERRY_PHASE_KILLS_ROUNDS=N` randomized rounds (none by default).
#[test]
fn randomized_rounds() {
    let rounds: u64 = std::env::var("FERRY_PHASE_KILLS_ROUNDS").map(|n| n.parse().unwrap()).unwrap_or(0);
    if rounds == 0 {
        return;
    }
    let mut rng = Rng::new(seed("FERRY_PHASE_KILLS_SEED", "phase_kills -- randomized_rounds"));
    for round in 0..rounds {
        let daemon = if rng.below(2) == 0 { Daemon::Source } else { Daemon::Target };
        let boundary = BOUNDARIES[rng.below(BOUNDARIES.len() as u64) as usize];
        let mut case = Case::new(daemon, boundary);
        case.delay = Duration::from_millis(rng.below(300));
        case.options.writes_per_sec = 500 + rng.below(4_000);
        if boundary != Boundary::Copying {
            case.options.bulk_bytes = (64 << 10) + rng.below(4 << 20);
        }
        run(case, &format!("k-round-{round}"));
    }
}
