//! A release the target never confirmed is told to it again: at the next `migration.release`
//! and at the source daemon's next start. Two daemons run in this process, the reference
//! writer appends to the source WAL throughout, and every QUIC datagram between source and
//! target goes through a [`Relay`] (the migration's `target_address`), so the test can cut the
//! target off for exactly the release and heal it without the target's address changing.
//!
//! What it checks, after a completed fence (target staging `fenced`) and a `migration.release`
//! sent while the relay drops everything (DESIGN section 5: the release is durable on the
//! source before the target is told, the point of no return):
//! - the release fails with an internal error saying the release is recorded on the source but
//!   the target could not be told; the source reports `Completed` at the fenced `final_lsn` with
//!   the pause measured, its durable record says `Completed` and not yet told, and the target's
//!   staging is still `fenced`, never `released`;
//! - healed, a second `migration.release` succeeds with the same `final_lsn` and pause, the
//!   staging becomes `released` at that `final_lsn`, the target reports `Completed`, and a third
//!   call answers the same (idempotent);
//! - or, with the source daemon restarted while the target is still cut off: the daemon starts
//!   (an unreachable target does not hold it up), says the release is pending and reports the
//!   staging `fenced`; healed, the daemon alone (no control call) tells the target in the
//!   background: the staging becomes `released` at that `final_lsn`, the source reports
//!   `Completed` with the same pause, and its record says the target was told;
//! - either way, the reference verifier finds every acknowledged write of the vShard exactly
//!   once (0 lost, 0 duplicated) across the staged export, the staged WAL up to `final_lsn` and
//!   the target node's WAL, and no write was acknowledged while writes were paused.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test), or
//! restart the target (the relay stands in for an unreachable one).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_engine::control::{ControlClient, ErrorCode};
use ferry_engine::node::RunningNode;
use ferry_engine::outbound::record::{self, Found};
use ferry_engine::storage::DiskStorage;
use ferry_refnode::{export_base, generate_bulk, verify, RefWriter, VerifyInput, WriterLog};
use ferry_tests::relay::Relay;
use ferry_tests::{
    manifest_json, node_config, node_pair, wait_for_phase, wait_for_tail_across_rolls, wait_for_writes, wait_until,
    Certs,
};
use ferry_wire::api::{MigrationStatus, Phase, PhaseRecord, StartParams};
use ferry_wire::{Lsn, MigrationId, VShardId};
use serde_json::{json, Value};

const VSHARD: VShardId = VShardId(7);
/// A generous deadline for each wait; none is expected to come near it.
const WAIT: Duration = Duration::from_secs(40);
/// How long a release through the partition may take to fail (the source gives a release
/// connection 10 s) before the test calls it stuck.
const RELEASE_ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// How long the restarted source daemon may take to tell the target.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
/// The fence's pause budget: generous, so a loaded machine does not cancel the fence.
const BUDGET_US: u64 = 2_000_000;
/// Fences cancelled (or violated) before the test gives up.
const FENCE_ATTEMPTS_MAX_COUNT: u32 = 5;

/// Two daemons, the reference writer on the source WAL, a relay in front of the target, and a
/// live migration fenced at `final_lsn` whose release the target never heard of.
struct Scene {
    dir: tempfile::TempDir,
    certs: Certs,
    source: RunningNode,
    target: RunningNode,
    writer: RefWriter,
    relay: Relay,
    id: MigrationId,
    root: PathBuf,
    base_lsn: Lsn,
    final_lsn: Lsn,
    /// The writer's pause: paused at, resumed (on the target) at, CLOCK_MONOTONIC ns.
    paused_at_ns: u64,
    resumed_at_ns: u64,
    /// The source's status right after the failed release.
    status_after_failure: MigrationStatus,
}

impl Scene {
    fn target_dir(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    fn source_dir(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    fn node_wal(&self) -> PathBuf {
        self.target_dir().join("node-wal")
    }

    fn manifest(&self) -> Value {
        manifest_json(&self.target_dir(), self.id.as_str()).unwrap()
    }

    async fn source_client(&self) -> ControlClient {
        ControlClient::connect(self.source.socket()).await.unwrap()
    }

    /// The target daemon's own status of the migration (its inbound side).
    async fn inbound(&self) -> Value {
        let mut target = ControlClient::connect(self.target.socket()).await.unwrap();
        target.call("migration.status", json!({ "migration_id": self.id.as_str() })).await.unwrap()
    }

    /// The source's durable phase record of the migration, read from its data folder.
    fn source_record(&self) -> PhaseRecord {
        let found = record::list(&DiskStorage, &self.source_dir());
        match found.into_iter().find(|(id, _)| *id == self.id) {
            Some((_, Found::Record(record))) => *record,
            Some((_, Found::Damaged(message))) => panic!("the source's record is damaged: {message}"),
            None => panic!("the source holds no record of {}", self.id),
        }
    }

    /// The staging is `released` at the fenced `final_lsn`, on disk and in the target's status.
    async fn assert_released(&self) {
        let manifest = self.manifest();
        assert_eq!(manifest["state"], "released", "{manifest}");
        assert_eq!(manifest["final_lsn"], self.final_lsn.0, "{manifest}");
        let inbound = self.inbound().await;
        assert_eq!(inbound["phase"], "Completed", "{inbound}");
        assert_eq!(inbound["staging_state"], "released", "{inbound}");
        let record = self.source_record();
        assert_eq!(record.phase, Phase::Completed, "{record:?}");
        assert!(record.target_released, "the source did not record that the target was told: {record:?}");
        assert_eq!(record.final_lsn, Some(self.final_lsn.0), "{record:?}");
    }

    /// Stops the writer and runs the reference verifier over what the target holds.
    fn stop_and_verify(self) {
        let staging = self.target_dir().join("migrations").join(self.id.as_str());
        let node_wal = self.node_wal();
        let log = self.writer.stop().unwrap();
        assert_no_ack_while_paused(&log, self.paused_at_ns, self.resumed_at_ns);
        let verification = verify(&VerifyInput {
            log: &log,
            base_lsn: self.base_lsn,
            final_lsn: self.final_lsn,
            staging_dir: &staging,
            source_segments_root: &self.root,
            target_node_wal_dir: Some(&node_wal),
        });
        eprintln!(
            "verified: {} writes expected, {} from the export, {} from the staged WAL, {} from the node WAL",
            verification.expected_count,
            verification.from_export_count,
            verification.from_staged_wal_count,
            verification.from_node_wal_count
        );
        assert!(verification.passed(), "{verification:#?}");
        assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0));
        assert!(verification.from_staged_wal_count > 0, "nothing came through the staged WAL: {verification:#?}");
        assert!(verification.from_node_wal_count > 0, "the writer never wrote on the target: {verification:#?}");
    }
}

/// The last pause is the cut-over's, resumed on the target at `resumed_at_ns`; nothing was
/// acknowledged during any pause.
fn assert_no_ack_while_paused(log: &WriterLog, paused_at_ns: u64, resumed_at_ns: u64) {
    let last = log.pauses().last().unwrap();
    assert_eq!((last.paused_at_ns, last.resumed_at_ns), (paused_at_ns, Some(resumed_at_ns)), "{last:?}");
    for span in log.pauses() {
        assert_eq!(log.acks_between(span.paused_at_ns, span.resumed_at_ns.unwrap_or(u64::MAX)), 0, "{span:?}");
    }
}

/// Steps 1 and 2: a live migration through the relay, fenced, then released while the relay
/// drops every datagram. Asserts the failed release's error and the states it leaves.
async fn fenced_and_release_lost() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let (source, target) = node_pair(&certs, dir.path()).await;
    let wal_dir = dir.path().join("wal");
    let writer = ferry_tests::rolling_writer(&wal_dir, VSHARD).await.unwrap();
    let relay = Relay::start(target.quic_addr).await.unwrap();

    let base_lsn = writer.acked_lsn();
    let root = dir.path().join("export");
    export_base(&root, VSHARD, base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
    generate_bulk(&root, 1 << 20, 4).unwrap();
    let id = MigrationId::new("release-lost").unwrap();
    let params: StartParams = serde_json::from_value(json!({
        "migration_id": id.as_str(), "vshard_id": VSHARD.0, "segments_root": root, "wal_dir": wal_dir,
        "base_lsn": base_lsn.0, "target_address": relay.addr.to_string(), "target_node_id": "target",
        "write_pause_budget_us": BUDGET_US, "chunk_len_bytes": 64 << 10, "streams": 2,
    }))
    .unwrap();
    let mut client = ControlClient::connect(source.socket()).await.unwrap();
    client.start(&params).await.unwrap();
    wait_for_phase(&mut client, &id, Phase::WalCatchUp, WAIT).await.unwrap();
    // Let the tail stream across a WAL roll.
    wait_for_tail_across_rolls(&mut client, &id, &writer, &wal_dir, 1, WAIT).await.unwrap();

    // The coordinator's cut-over up to the release: prepare, pause, fence (a cancelled fence
    // resumes on the source and is tried again, as `ferry cutover` does), resume on the target.
    let mut attempts_count = 0u32;
    let (ticket, fenced) = loop {
        attempts_count += 1;
        match client.prepare_cutover(&id).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::PauseBudgetExceeded) && attempts_count < 100 => {
                // The coordinator's retry interval (bounded by the attempt count), not a wait
                // for an event: no status field says when prepare will accept the estimate.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("prepare_cutover: {e}"),
        }
        let ticket = writer.pause().unwrap();
        match client.fence(&id, ticket.last_acked_lsn.0, Some(ticket.paused_at_ns)).await {
            Ok(fenced) => break (ticket, fenced),
            Err(e)
                if matches!(e.code(), Some(ErrorCode::CutOverCancelled | ErrorCode::FenceViolated))
                    && attempts_count < FENCE_ATTEMPTS_MAX_COUNT =>
            {
                eprintln!("fence {attempts_count} did not complete, trying again: {e}");
                writer.resume_on_source();
                // The writer runs again (200 ms of writes) before the next attempt.
                wait_for_writes(&writer, 800, WAIT).await.unwrap();
            }
            Err(e) => panic!("fence: {e}"),
        }
    };
    let final_lsn = ticket.last_acked_lsn;
    assert_eq!(fenced.final_lsn, final_lsn.0);
    assert!(final_lsn > base_lsn, "nothing was written between the base and the fence");
    // The `fenced` commit follows the target's answer.
    let manifest = ferry_tests::manifest_json_when(&dir.path().join("target"), id.as_str(), "fenced").unwrap();
    assert_eq!(manifest["state"], "fenced", "{manifest}");
    assert_eq!(manifest["final_lsn"], final_lsn.0, "{manifest}");
    assert_eq!(client.status(&id).await.unwrap().phase, Phase::AtomicCutOver);
    let resumed_at_ns = writer.resume_on_target(&dir.path().join("target/node-wal")).unwrap();

    // The target is cut off for the release.
    relay.set_dropping(true);
    let dropped_before = relay.counts().dropped_count;
    let called = Instant::now();
    let answer = tokio::time::timeout(RELEASE_ANSWER_DEADLINE, client.release(&id, Some(resumed_at_ns))).await;
    let took = called.elapsed();
    let e = match answer {
        Err(_) => panic!("migration.release did not answer within {RELEASE_ANSWER_DEADLINE:?}"),
        Ok(Ok(released)) => panic!("the release completed through a partition after {took:?}: {released:?}"),
        Ok(Err(e)) => e,
    };
    eprintln!("release through the partition failed after {took:?}: {e}");
    assert_eq!(e.code(), Some(ErrorCode::Internal), "{e}");
    let message = e.to_string();
    assert!(message.contains("the release is recorded on the source"), "{message}");
    assert!(message.contains("the target has not confirmed it"), "{message}");
    assert!(message.contains("call migration.release again"), "{message}");
    assert!(relay.counts().dropped_count > dropped_before, "the relay dropped nothing: the release did not try");

    // The source is past the point of no return; the target does not know yet.
    let status = client.status(&id).await.unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    assert_eq!(status.final_lsn, Some(final_lsn.0), "{status:?}");
    assert_eq!(status.pause_duration_us, Some((resumed_at_ns - ticket.paused_at_ns) / 1_000), "{status:?}");
    assert_ne!(status.staging_state.as_deref(), Some("released"), "the source claims a release not told: {status:?}");
    let manifest = manifest_json(&dir.path().join("target"), id.as_str()).unwrap();
    assert_eq!(manifest["state"], "fenced", "the target was released through a partition: {manifest}");
    assert_eq!(manifest["final_lsn"], final_lsn.0, "{manifest}");

    let scene = Scene {
        dir,
        certs,
        source,
        target,
        writer,
        relay,
        id,
        root,
        base_lsn,
        final_lsn,
        paused_at_ns: ticket.paused_at_ns,
        resumed_at_ns,
        status_after_failure: status,
    };
    let inbound = scene.inbound().await;
    assert_eq!(inbound["phase"], "AtomicCutOver", "{inbound}");
    assert_eq!(inbound["staging_state"], "fenced", "{inbound}");
    let record = scene.source_record();
    assert_eq!(record.phase, Phase::Completed, "the release is not durable on the source: {record:?}");
    assert_eq!(record.final_lsn, Some(final_lsn.0), "{record:?}");
    assert_eq!(record.pause, scene.status_after_failure.pause, "{record:?}");
    assert!(!record.target_released, "the source recorded a release the target never confirmed: {record:?}");
    scene
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_target_missed_is_told_again_by_the_next_release_call() {
    let scene = fenced_and_release_lost().await;
    scene.relay.set_dropping(false);
    let mut client = scene.source_client().await;
    // The coordinator retries with the daemon's clock: the answer is the recorded release, not
    // a new pause measured from this call.
    let released = client.release(&scene.id, None).await.unwrap();
    assert_eq!(released.final_lsn, scene.final_lsn.0);
    assert_eq!(Some(released.pause), scene.status_after_failure.pause, "{released:?}");
    assert_eq!(Some(released.pause_duration_us), scene.status_after_failure.pause_duration_us);
    assert_eq!(released.pause.breakdown.total_us(), released.pause_duration_us, "{released:?}");
    scene.assert_released().await;
    assert_eq!(client.release(&scene.id, None).await.unwrap(), released, "release is idempotent once told");
    let status = client.status(&scene.id).await.unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    assert_eq!(status.staging_state.as_deref(), Some("released"), "{status:?}");
    scene.stop_and_verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_target_missed_is_told_again_when_the_source_daemon_starts() {
    let mut scene = fenced_and_release_lost().await;
    // The same configuration and data folder; nothing is asked of it over the socket. The
    // target is still cut off: the daemon starts anyway and says the release is pending.
    let config = node_config(&scene.certs, "source", &scene.source_dir(), "target");
    scene.source.shutdown().await;
    scene.source = RunningNode::start(&config).await.unwrap();
    eprintln!("the restarted source recovered: {:?}", scene.source.recovered);
    let outcome =
        scene.source.recovered.iter().find(|(found, _)| *found == scene.id).map(|(_, outcome)| outcome.as_str());
    assert_eq!(outcome, Some(ferry_engine::outbound::RELEASE_PENDING_OUTCOME));
    let status = scene.source_client().await.status(&scene.id).await.unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    assert_eq!(status.staging_state.as_deref(), Some("fenced"), "the target has not confirmed: {status:?}");
    scene.relay.set_dropping(false);
    let forwarded_before = scene.relay.counts().forwarded_count;
    // Told in the background: the target releases, then the source records it knows.
    wait_until("the target to be told and the source to record it", RECOVERY_DEADLINE, || {
        let manifest = scene.manifest();
        assert!(manifest["state"] == "fenced" || manifest["state"] == "released", "{manifest}");
        manifest["state"] == "released" && scene.source_record().target_released
    })
    .await
    .unwrap();
    assert!(scene.relay.counts().forwarded_count > forwarded_before, "the release did not go through the relay");
    scene.assert_released().await;

    let status = scene.source_client().await.status(&scene.id).await.unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    assert_eq!(status.final_lsn, Some(scene.final_lsn.0), "{status:?}");
    assert_eq!(status.pause, scene.status_after_failure.pause, "{status:?}");
    assert_eq!(status.staging_state.as_deref(), Some("released"), "{status:?}");
    scene.stop_and_verify();
}
