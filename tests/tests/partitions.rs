//! Network partitions around the cut-over of a live migration between real `ferry serve`
//! daemons: every QUIC datagram between source and target goes through a [`Relay`] (the
//! migration's `target_address`), which a test switches to drop everything in both directions.
//! The reference writer appends to the source WAL throughout, at a rate drawn from a printed
//! seed (`FERRY_PARTITIONS_SEED` replays it); each test ends with the reference verifier (every
//! write of the vShard once, 0 lost, 0 duplicated).
//!
//! What it checks (DESIGN section 2, "Authority"):
//! - a partition during the fence: `migration.fence` answers `CutOverCancelled` within
//!   [`FENCE_ANSWER_DEADLINE`] (its budget is [`BUDGET_US`]), the source is back in
//!   `WalCatchUp` and the target's staging is not fenced; the source stays authoritative: the
//!   writer goes on writing there for seconds of partition, the migration does not fail, a
//!   second fence inside the partition is cancelled too; healed, the tail catches up and a
//!   re-fence and the release complete;
//! - a partition right after the release: the release is durable on the source, which says the
//!   target could not be told; healed, the running source daemon tells the target by itself on
//!   reconnect (no second `migration.release`, no restart: `release_recovery.rs` covers those
//!   two): the staging becomes `released` at the fenced `final_lsn` and both daemons report
//!   `Completed`;
//! - a release whose reply is lost (the relay holds the target's answers for 1 s and, once the
//!   target's staging is `released`, drops everything, the held reply included): the source
//!   could not hear it and says so; healed,
//!   the source tells the target again, the target answers the repeated release with the same
//!   `final_lsn`, and both daemons report `Completed` and `released`.
//!
//! What it does not: partition during the base copy (`lossy.rs` black-holes the path then), or
//! kill daemons (`phase_kills.rs`, `daemon_fences.rs`).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use ferry_refnode::RefWriter;
use ferry_tests::daemons::{cluster, phase_is, Cluster, WAIT};
use ferry_tests::live::{manifest, seed, Live, LiveOptions, Rng, CUT_OVER_CANCELLED_CODE};
use ferry_tests::relay::Relay;
use ferry_tests::{wait_for_writes_blocking, wait_until_blocking};
use ferry_wire::Lsn;
use serde_json::json;

/// The fence's pause budget.
const BUDGET_US: u64 = 300_000;
/// How long a fence through a partition may take to be cancelled before the test calls it
/// stuck: its budget, plus the slack of a loaded 2-core machine.
const FENCE_ANSWER_DEADLINE: Duration = Duration::from_secs(3);
/// How long the writer goes on on the source while the partition lasts.
const PARTITION_WRITES_FOR: Duration = Duration::from_secs(3);
/// How long the relay holds the target's answers while a release's reply is to be lost: far
/// longer than the test's poll of the target's manifest takes to see the release applied.
const REPLY_DELAY: Duration = Duration::from_secs(1);
/// How long the running source may take to tell a healed target of a release it missed.
const RETELL_DEADLINE: Duration = Duration::from_secs(60);

/// Two daemons, a relay in front of the target, and a live migration through it in WalCatchUp.
fn partitioned_scene(id: &str) -> (Cluster, tokio::runtime::Runtime, Relay, Live) {
    let c = cluster("", "", &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let relay = runtime.block_on(Relay::start(c.target.addr.parse().unwrap())).unwrap();
    let mut rng = Rng::new(seed("FERRY_PARTITIONS_SEED", "partitions"));
    let options =
        LiveOptions { budget_us: BUDGET_US, writes_per_sec: 1_000 + rng.below(3_000), ..LiveOptions::default() };
    eprintln!("{id}: {options:?}");
    let live = Live::start(&c.source, c._dir.path(), id, 7, (&relay.addr.to_string(), "target"), &options);
    c.source.wait_for(id, "WalCatchUp", phase_is("WalCatchUp"));
    // The tail streams a while (a quarter of a second of writes) before the cut-over.
    wait_for_writes_blocking(&live.writer, 500, WAIT).unwrap();
    (c, runtime, relay, live)
}

/// Waits until the writer acknowledges a write of the migrating vShard above `lsn`.
fn wait_for_a_vshard_write_after(writer: &RefWriter, lsn: Lsn) {
    wait_until_blocking(&format!("a write of the vShard after LSN {lsn}"), WAIT, || {
        writer.migrating_source_writes(Lsn(u64::MAX)).last().map(|e| e.source_lsn) > Some(lsn)
    })
    .unwrap();
}

#[test]
fn a_partition_during_the_fence_cancels_it_within_its_budget_and_the_source_stays_authoritative() {
    let id = "p-fence";
    let (c, _runtime, relay, live) = partitioned_scene(id);
    relay.set_dropping(true);
    // A record read and sent into the partition: the fence cannot drain.
    wait_for_a_vshard_write_after(&live.writer, live.writer.acked_lsn());

    let mut cancelled_lsns = Vec::new();
    for attempt in 0..2 {
        let ticket = live.writer.pause().unwrap();
        let called = Instant::now();
        let params = json!({ "migration_id": id, "final_lsn": ticket.last_acked_lsn.0, "writes_paused_at_ns": ticket.paused_at_ns });
        let answer = c.source.call("migration.fence", params);
        let took = called.elapsed();
        let (code, message, _) = match answer {
            Ok(fenced) => panic!("fence {attempt} completed through a partition after {took:?}: {fenced}"),
            Err(e) => e,
        };
        eprintln!("fence {attempt} through the partition: {code} {message} after {took:?}");
        assert_eq!(code, CUT_OVER_CANCELLED_CODE, "{message}");
        assert!(took < FENCE_ANSWER_DEADLINE, "fence {attempt} took {took:?} to be cancelled (budget {BUDGET_US} us)");
        // The source is authoritative: back in WalCatchUp, the target's staging not fenced.
        let status = c.source.status(id);
        assert_eq!(status["phase"], "WalCatchUp", "{status}");
        assert_eq!(manifest(&c.target_data, id)["state"], "copying");
        cancelled_lsns.push(ticket.last_acked_lsn);
        live.writer.resume_on_source();
        // The writer goes on on the source through the partition; the migration holds.
        let until = Instant::now() + PARTITION_WRITES_FOR / 2;
        let from = live.writer.acked_count();
        while Instant::now() < until {
            let status = c.source.status(id);
            assert_eq!(status["phase"], "WalCatchUp", "the migration did not hold through the partition: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(live.writer.acked_count() > from + 100, "the writer did not go on on the source");
    }
    assert!(relay.counts().dropped_count > 0, "the relay dropped nothing");

    relay.set_dropping(false);
    let tip = live.writer.acked_lsn();
    let caught_up =
        c.source.wait_for(id, "the tail past the partition", |s| s["wal"]["current_lsn"].as_u64() >= Some(tip.0));
    assert_eq!(caught_up["phase"], "WalCatchUp", "{caught_up}");
    let (final_lsn, _) = live.fence(&c.source, 5);
    assert!(cancelled_lsns.iter().all(|lsn| final_lsn > *lsn), "{final_lsn} {cancelled_lsns:?}");
    let node_wal = c.target_data.join("node-wal");
    let released = live.resume_and_release(&c.source, &node_wal).unwrap();
    assert_eq!(released["final_lsn"], final_lsn.0, "{released}");
    let staged = manifest(&c.target_data, id);
    assert_eq!((staged["state"].as_str(), staged["final_lsn"].as_u64()), (Some("released"), Some(final_lsn.0)));
    let verified = live.verify(final_lsn, &c.staged(id), &node_wal);
    eprintln!("{id}: {verified} writes verified; {:?}", relay.counts());
}

#[test]
fn a_partition_right_after_the_release_completes_on_reconnect() {
    let id = "p-release";
    let (c, _runtime, relay, live) = partitioned_scene(id);
    let (final_lsn, _) = live.fence(&c.source, 5);
    assert_eq!(ferry_tests::manifest_json_when(&c.target_data, id, "fenced").unwrap()["state"], "fenced");
    relay.set_dropping(true);
    let node_wal = c.target_data.join("node-wal");
    let (code, message, _) = live.resume_and_release(&c.source, &node_wal).unwrap_err();
    eprintln!("the release through the partition: {code} {message}");
    assert!(message.contains("the release is recorded on the source"), "{message}");
    let status = c.source.status(id);
    assert_eq!((status["phase"].as_str(), status["staging_state"].as_str()), (Some("Completed"), Some("fenced")));
    assert_eq!(manifest(&c.target_data, id)["state"], "fenced");

    // Healed: nothing is asked of either daemon; the source tells the target by itself.
    relay.set_dropping(false);
    let healed = Instant::now();
    let forwarded_before = relay.counts().forwarded_count;
    wait_until_blocking("the target to learn of the release", RETELL_DEADLINE, || {
        let state = manifest(&c.target_data, id)["state"].clone();
        assert!(state == "fenced" || state == "released", "{state}");
        state == "released" && c.source.status(id)["staging_state"] == "released"
    })
    .unwrap();
    eprintln!("the target learnt of the release {:?} after the heal", healed.elapsed());
    assert!(relay.counts().forwarded_count > forwarded_before, "the release did not go through the relay");
    let staged = manifest(&c.target_data, id);
    assert_eq!(staged["final_lsn"], final_lsn.0, "{staged}");
    let inbound = c.target.wait_for(id, "the target Completed", phase_is("Completed"));
    assert_eq!(inbound["staging_state"], "released", "{inbound}");
    let verified = live.verify(final_lsn, &c.staged(id), &node_wal);
    eprintln!("{id}: {verified} writes verified; {:?}", relay.counts());
}

#[test]
fn a_release_whose_reply_is_lost_is_told_again_and_answered_the_same() {
    let id = "p-reply";
    let (c, _runtime, relay, live) = partitioned_scene(id);
    let (final_lsn, _) = live.fence(&c.source, 5);
    // Every answer of the target now waits 1 s in the relay; once the target's staging is
    // released (the release arrived and was applied), the relay drops everything, so the
    // release's reply, still waiting, is lost.
    relay.set_answer_delay(REPLY_DELAY);
    let node_wal = c.target_data.join("node-wal");
    let released_at_target = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let seen = wait_until_blocking("the target to apply the release", WAIT, || {
                manifest(&c.target_data, id)["state"] == "released"
            });
            relay.set_dropping(true);
            seen
        });
        let (code, message, _) = live.resume_and_release(&c.source, &node_wal).unwrap_err();
        eprintln!("the release with its reply lost: {code} {message}");
        assert!(message.contains("the release is recorded on the source"), "{message}");
        watcher.join().unwrap()
    });
    released_at_target.unwrap();
    // The source never heard the answer: it still says fenced.
    assert_eq!(c.source.status(id)["staging_state"], "fenced");

    relay.set_answer_delay(Duration::ZERO);
    relay.set_dropping(false);
    let healed = Instant::now();
    wait_until_blocking("the source to hear the repeated release's answer", RETELL_DEADLINE, || {
        c.source.status(id)["staging_state"] == "released"
    })
    .unwrap();
    eprintln!("the source heard the answer {:?} after the heal", healed.elapsed());
    let staged = manifest(&c.target_data, id);
    assert_eq!((staged["state"].as_str(), staged["final_lsn"].as_u64()), (Some("released"), Some(final_lsn.0)));
    let inbound = c.target.wait_for(id, "the target Completed", phase_is("Completed"));
    assert_eq!(inbound["staging_state"], "released", "{inbound}");
    let verified = live.verify(final_lsn, &c.staged(id), &node_wal);
    eprintln!("{id}: {verified} writes verified; {:?}", relay.counts());
}
