//! `migration.abort` of a live migration in each phase before a fence: during the base copy
//! and during the WAL catch-up (abort after a completed fence is in cutover.rs), and a fence
//! cut off by a lost connection, with two daemons in this process and the reference writer
//! appending to the source WAL throughout.
//!
//! What it checks, after each abort (DESIGN section 2: "only `migration.abort` discards the
//! target staging"; the source stays authoritative):
//! - the target staging of the migration is discarded: no staged segment or WAL file is left,
//!   only an `aborted` MANIFEST.json tombstone (or nothing), and it stays so while the writer
//!   goes on; the target reports the migration Failed;
//! - the source's segments are untouched (SHA-256 of every file under `segments_root` equal
//!   before the start and after the abort);
//! - the source WAL changed only by the writer: every segment's bytes seen at the start and
//!   right before the abort are still its first bytes (the writer only appends), and the
//!   reference reader finds exactly the writer's acknowledged records in it, dense, nothing
//!   else;
//! - the source's `.ferry-held/<id>` and `.ferry-snapshot/<id>` link folders are gone;
//! - `release`, `fence` and `prepare_cutover` after the abort are refused with a clear error;
//! - the vShard is free: a new migration of it (new id) completes and verifies with 0 lost
//!   and 0 duplicated writes.
//!
//! And for a fence through a partition (a [`Relay`] between source and target that drops every
//! datagram; DESIGN section 2: a fence that would exceed its budget is cancelled, the source
//! stays authoritative): `migration.fence` answers `CutOverCancelled` (-32004) well within
//! fifty budgets and the migration is back in `WalCatchUp`; healed, the tail catches up, the
//! coordinator's next fence completes, and the verifier finds every write once. The partition
//! starts either during the drain (checked) or after it, when the `Fence` request itself is
//! lost; that one also checks that the target is not left fenced at the cancelled `final_lsn`:
//! when the late `Fence` lands after the heal, the records above it put the staging back to
//! `copying` and the target back in `WalCatchUp`.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test), or
//! abort a daemon's restart recovery (daemon_migrations.rs does).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_engine::cli::coordinator::{cut_over, CutOverOptions, RefWrites};
use ferry_engine::control::{ControlClient, ErrorCode};
use ferry_engine::node::RunningNode;
use ferry_refnode::{
    decode_payload, export_base, generate_bulk, read_wal_folder, verify, FolderKind, RefWriter, VerifyInput,
    WritePlace, WriterLog,
};
use ferry_tests::relay::Relay;
use ferry_tests::{
    manifest_json, node_pair, tree_sha256, wait_for_phase, wait_for_status, wait_for_tail_across_rolls,
    wait_for_writes, wait_until, Certs,
};
use ferry_wire::api::{MigrationStatus, Phase, StartParams};
use ferry_wire::{Lsn, MigrationId, VShardId};
use serde_json::json;
use sha2::{Digest, Sha256};

const VSHARD: VShardId = VShardId(7);
const WAIT: Duration = Duration::from_secs(90);

/// Two daemons, the reference writer on the source WAL, and a base export.
struct Scene {
    dir: tempfile::TempDir,
    _certs: Certs,
    source: RunningNode,
    target: RunningNode,
    writer: RefWriter,
    wal_dir: PathBuf,
}

async fn scene() -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let (source, target) = node_pair(&certs, dir.path()).await;
    let wal_dir = dir.path().join("wal");
    let writer = ferry_tests::rolling_writer(&wal_dir, VSHARD).await.unwrap();
    Scene { dir, _certs: certs, source, target, writer, wal_dir }
}

impl Scene {
    /// Exports the vShard at the writer's acked LSN into `name` with `bulk_bytes` of filler.
    fn export(&self, name: &str, bulk_bytes: u64) -> (PathBuf, Lsn) {
        let base_lsn = self.writer.acked_lsn();
        let root = self.dir.path().join(name);
        export_base(&root, VSHARD, base_lsn, &self.writer.migrating_source_writes(base_lsn)).unwrap();
        generate_bulk(&root, bulk_bytes, 4).unwrap();
        (root, base_lsn)
    }

    async fn start(
        &self,
        id: &str,
        root: &Path,
        base_lsn: Lsn,
        rate_bytes_per_sec: u64,
    ) -> (ControlClient, MigrationId) {
        self.start_via(id, root, base_lsn, rate_bytes_per_sec, self.target.quic_addr, 2_000_000).await
    }

    /// Starts `id` with `target_address` (the target itself, or a relay to it) and a budget.
    async fn start_via(
        &self,
        id: &str,
        root: &Path,
        base_lsn: Lsn,
        rate_bytes_per_sec: u64,
        target_address: SocketAddr,
        budget_us: u64,
    ) -> (ControlClient, MigrationId) {
        let params: StartParams = serde_json::from_value(json!({
            "migration_id": id, "vshard_id": VSHARD.0, "segments_root": root, "wal_dir": self.wal_dir,
            "base_lsn": base_lsn.0, "target_address": target_address.to_string(), "target_node_id": "target",
            "write_pause_budget_us": budget_us, "chunk_len_bytes": 64 << 10, "streams": 2,
            "rate_limit_bytes_per_sec": rate_bytes_per_sec,
        }))
        .unwrap();
        let mut client = ControlClient::connect(self.source.socket()).await.unwrap();
        client.start(&params).await.unwrap();
        (client, MigrationId::new(id).unwrap())
    }

    fn staging(&self, id: &MigrationId) -> PathBuf {
        self.dir.path().join("target/migrations").join(id.as_str())
    }
}

/// (length, SHA-256 of those bytes) of every WAL segment file in `dir`.
fn wal_prefixes(dir: &Path) -> BTreeMap<String, (usize, [u8; 32])> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("wal-") && name.ends_with(".seg") {
            let bytes = std::fs::read(entry.path()).unwrap();
            out.insert(name, (bytes.len(), Sha256::digest(&bytes).into()));
        }
    }
    out
}

/// Every file under `dir` (relative paths), directories left out.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                walk(root, &entry.path(), out);
            } else {
                out.push(entry.path().strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// The names in the source WAL's `.ferry-held/` folder.
fn held(wal_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(wal_dir.join(".ferry-held"))
        .map(|dir| dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `migration.abort` on the source socket; the target must have removed its staging.
async fn abort(client: &mut ControlClient, id: &MigrationId, reason: &str, wal_dir: &Path) {
    let held_before = held(wal_dir);
    let answer =
        client.call("migration.abort", json!({ "migration_id": id.as_str(), "reason": reason })).await.unwrap();
    assert_eq!(answer["aborted"], true, "{answer}");
    assert_eq!(answer["note"], "target staging removed", "{answer}");
    assert!(held_before.iter().any(|n| n == id.as_str()), "no held WAL links before the abort: {held_before:?}");
    eprintln!("{id}: {answer}; .ferry-held/ before {held_before:?}, after {:?}", held(wal_dir));
}

/// What must hold on both sides once `id` is aborted (see the module docs).
async fn check_aborted(
    scene: &Scene,
    client: &mut ControlClient,
    id: &MigrationId,
    root: &Path,
    segments_before: &BTreeMap<String, String>,
) {
    let status = client.status(id).await.unwrap();
    assert_eq!(status.phase, Phase::Failed, "{status:?}");
    assert!(status.reason.as_deref().unwrap_or("").contains("aborted"), "{status:?}");

    // The target staging is discarded, and stays so while the writer goes on.
    for round in 0..2 {
        let staging = scene.staging(id);
        let left = files_under(&staging);
        assert!(left.is_empty() || left == ["MANIFEST.json"], "round {round}: staging files left: {left:?}");
        if staging.exists() {
            let manifest = manifest_json(&scene.dir.path().join("target"), id.as_str()).unwrap();
            assert_eq!(manifest["state"], "aborted", "{manifest}");
            assert_eq!(manifest["segments"], json!([]), "{manifest}");
            assert_eq!(manifest["wal_segments"], json!([]), "{manifest}");
        }
        // Not a wait for an event: the staging must stay discarded through 400 ms of writes.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut target = ControlClient::connect(scene.target.socket()).await.unwrap();
    let inbound = target.call("migration.status", json!({ "migration_id": id.as_str() })).await.unwrap();
    assert_eq!(inbound["phase"], "Failed", "{inbound}");

    // The source's files: segments untouched, links gone.
    assert_eq!(&tree_sha256(root).unwrap(), segments_before, "the source segments changed");
    assert!(!root.join(".ferry-snapshot").join(id.as_str()).exists(), "snapshot links left");
    assert!(!scene.wal_dir.join(".ferry-held").join(id.as_str()).exists(), "held WAL links left");

    // Calls after an abort are refused, clearly.
    let e = client.release(id, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Refused), "{e}");
    assert!(e.to_string().contains("nothing to release"), "{e}");
    let e = client.fence(id, 1, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Refused), "{e}");
    let e = client.prepare_cutover(id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Refused), "{e}");
}

/// The source WAL holds what the writer wrote there, and the bytes seen at each of `seen` (at
/// the start, before the abort) are still there, unchanged.
fn check_source_wal(wal_dir: &Path, seen: &[&BTreeMap<String, (usize, [u8; 32])>], log: &WriterLog) {
    for (name, (len, sha)) in seen.iter().flat_map(|s| s.iter()) {
        let bytes = std::fs::read(wal_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes.len() >= *len, "{name} shrank from {len} to {} bytes", bytes.len());
        let now: [u8; 32] = Sha256::digest(&bytes[..*len]).into();
        assert_eq!(&now, sha, "{name}: its first {len} bytes changed");
    }
    let mut read = Vec::new();
    let report = read_wal_folder(wal_dir, FolderKind::Aligned { alignment_bytes: 4096 }, |r| {
        read.push((r.lsn, r.vshard, decode_payload(r.payload).unwrap()));
    })
    .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Writes the writer put on a target node after a routing flip are not the source's.
    let written: Vec<_> = log
        .writes()
        .filter_map(|w| match w.place {
            WritePlace::Source(lsn) => Some((lsn, w.vshard, (w.vshard, w.writer_seq))),
            WritePlace::TargetNode(_) => None,
        })
        .collect();
    assert_eq!(read.len(), written.len());
    assert!(read == written, "the source WAL holds other records than the writer's");
    let top: Vec<String> = std::fs::read_dir(wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with("wal-") && n.ends_with(".seg")))
        .collect();
    assert!(top.iter().all(|n| n == ".ferry-held"), "unexpected files in the source WAL folder: {top:?}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn abort_during_the_base_copy_discards_the_target_staging_and_leaves_the_source_as_it_was() {
    runtime().block_on(async {
        let scene = scene().await;
        // 16 MiB at 4 MiB/s: the base copy lasts about four seconds.
        let (root, base_lsn) = scene.export("export", 16 << 20);
        let segments_before = tree_sha256(&root).unwrap();
        let wal_at_start = wal_prefixes(&scene.wal_dir);
        let (mut client, id) = scene.start("abort-base", &root, base_lsn, 4 << 20).await;
        wait_for_status(&mut client, &id, "bytes moved", WAIT, |status| {
            assert_eq!(status.phase, Phase::BaseCopy, "{status:?}");
            status.bytes_transferred > 0 && scene.staging(&id).join("segments").exists()
        })
        .await
        .unwrap();
        assert!(root.join(".ferry-snapshot/abort-base").exists(), "the snapshot links are there before");
        let wal_before = wal_prefixes(&scene.wal_dir);
        abort(&mut client, &id, "test: abort in BaseCopy", &scene.wal_dir).await;
        let status = client.status(&id).await.unwrap();
        assert!(status.bytes_transferred < status.bytes_total, "aborted after the copy ended: {status:?}");
        check_aborted(&scene, &mut client, &id, &root, &segments_before).await;
        let log = scene.writer.stop().unwrap();
        check_source_wal(&scene.wal_dir, &[&wal_at_start, &wal_before], &log);
    });
}

#[test]
fn abort_during_the_wal_catch_up_discards_the_target_staging_and_the_vshard_can_move_again() {
    runtime().block_on(async {
        let scene = scene().await;
        let (root, base_lsn) = scene.export("export", 1 << 20);
        let segments_before = tree_sha256(&root).unwrap();
        let wal_at_start = wal_prefixes(&scene.wal_dir);
        let (mut client, id) = scene.start("abort-tail", &root, base_lsn, 0).await;
        wait_for_phase(&mut client, &id, Phase::WalCatchUp, WAIT).await.unwrap();
        // Let the tail stream across a few WAL rolls.
        wait_for_tail_across_rolls(&mut client, &id, &scene.writer, &scene.wal_dir, 2, WAIT).await.unwrap();
        let status = client.status(&id).await.unwrap();
        assert_eq!(status.phase, Phase::WalCatchUp, "{status:?}");
        assert!(status.wal.current_lsn > Some(base_lsn.0), "nothing staged from the WAL: {status:?}");
        assert!(scene.staging(&id).join("wal").exists(), "the staged WAL is there before");
        let wal_before = wal_prefixes(&scene.wal_dir);
        abort(&mut client, &id, "test: abort in WalCatchUp", &scene.wal_dir).await;
        check_aborted(&scene, &mut client, &id, &root, &segments_before).await;

        // The source is authoritative and the vShard free: it moves again, whole.
        let (root, base_lsn) = scene.export("export-again", 1 << 20);
        let (mut client, id) = scene.start("after-abort", &root, base_lsn, 0).await;
        wait_for_phase(&mut client, &id, Phase::WalCatchUp, WAIT).await.unwrap();
        let node_wal = scene.dir.path().join("target/node-wal");
        let outcome = cut_over(
            &mut client,
            &id,
            &mut RefWrites { writer: &scene.writer, target_node_wal: Some(&node_wal) },
            CutOverOptions { catch_up_timeout: WAIT, ..CutOverOptions::default() },
        )
        .await
        .unwrap();
        // Writes on the target node (100 ms of them).
        wait_for_writes(&scene.writer, 400, WAIT).await.unwrap();
        let staging = scene.staging(&id);
        let log = scene.writer.stop().unwrap();
        check_source_wal(&scene.wal_dir, &[&wal_at_start, &wal_before], &log);
        assert_verified(&log, base_lsn, Lsn(outcome.release.final_lsn), &staging, &root, &node_wal);
    });
}

/// The reference verifier finds every write of the vShard once, nothing else.
fn assert_verified(log: &WriterLog, base_lsn: Lsn, final_lsn: Lsn, staging: &Path, root: &Path, node_wal: &Path) {
    let verification = verify(&VerifyInput {
        log,
        base_lsn,
        final_lsn,
        staging_dir: staging,
        source_segments_root: root,
        target_node_wal_dir: Some(node_wal),
    });
    assert!(verification.passed(), "{verification:#?}");
    assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0));
}

/// The fence's budget in the partition tests.
const SMALL_BUDGET_US: u64 = 200_000;
/// How long a fence call may take to answer before the test calls it stuck: fifty budgets.
const FENCE_ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// When the partition between source and target starts, relative to the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partition {
    /// Before the writer pauses: the last records before the pause cannot reach the target,
    /// so the fence cannot complete.
    DuringTheDrain,
    /// Once every record up to `final_lsn` is durable on the target: the `Fence` request itself
    /// is lost.
    AfterTheDrain,
}

/// What is checked of the target between the healing and the next fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetAfterHeal {
    /// Nothing: whether a late `Fence` may fence the target at a cancelled `final_lsn` is
    /// checked by the other test.
    Unchecked,
    /// Back in `WalCatchUp`, its staging `copying`, like the source.
    NotFenced,
}

#[test]
fn a_fence_cut_off_during_its_drain_is_cancelled_and_the_retry_completes() {
    runtime().block_on(fence_through_a_partition(Partition::DuringTheDrain, TargetAfterHeal::Unchecked));
}

#[test]
fn a_fence_whose_request_is_lost_is_cancelled_by_its_deadline_and_the_target_is_not_fenced() {
    runtime().block_on(fence_through_a_partition(Partition::AfterTheDrain, TargetAfterHeal::NotFenced));
}

/// A live migration through a relay; a fence while the relay drops everything must be
/// cancelled (`CutOverCancelled`, -32004) within [`FENCE_ANSWER_DEADLINE`], the source back in
/// `WalCatchUp`; healed, the tail catches up, the coordinator's next fence completes and the
/// verifier finds every write once.
async fn fence_through_a_partition(partition: Partition, target_after_heal: TargetAfterHeal) {
    let scene = scene().await;
    let relay = Relay::start(scene.target.quic_addr).await.unwrap();
    let (root, base_lsn) = scene.export("export", 1 << 20);
    let (mut client, id) = scene.start_via("partition", &root, base_lsn, 0, relay.addr, SMALL_BUDGET_US).await;
    wait_for_phase(&mut client, &id, Phase::WalCatchUp, WAIT).await.unwrap();
    // The tail streams a while (300 ms of writes) before the fence.
    wait_for_writes(&scene.writer, 1_200, WAIT).await.unwrap();

    let ticket = match partition {
        Partition::DuringTheDrain => {
            relay.set_dropping(true);
            // A vShard write acknowledged after this was read and sent into the partition.
            let dropped_from = scene.writer.acked_lsn();
            let written_after = || {
                scene.writer.migrating_source_writes(Lsn(u64::MAX)).last().map(|e| e.source_lsn) > Some(dropped_from)
            };
            wait_until(&format!("a write of the vShard after LSN {dropped_from}"), WAIT, written_after).await.unwrap();
            scene.writer.pause().unwrap()
        }
        Partition::AfterTheDrain => {
            let ticket = scene.writer.pause().unwrap();
            let last = scene.writer.migrating_source_writes(ticket.last_acked_lsn).last().unwrap().source_lsn;
            let durable = |status: &MigrationStatus| status.wal.current_lsn >= Some(last.0);
            wait_for_status(&mut client, &id, &format!("durable LSN {last}"), WAIT, durable).await.unwrap();
            relay.set_dropping(true);
            ticket
        }
    };
    let called = Instant::now();
    let answer = tokio::time::timeout(
        FENCE_ANSWER_DEADLINE,
        client.fence(&id, ticket.last_acked_lsn.0, Some(ticket.paused_at_ns)),
    )
    .await;
    let took = called.elapsed();
    let dropped = relay.counts().dropped_count;
    let e = match answer {
        Err(_) => panic!("{partition:?}: migration.fence did not answer within {FENCE_ANSWER_DEADLINE:?}"),
        Ok(Ok(fenced)) => panic!("{partition:?}: the fence completed through a partition after {took:?}: {fenced:?}"),
        Ok(Err(e)) => e,
    };
    eprintln!("{partition:?}: {e} after {took:?} ({dropped} datagrams dropped)");
    assert_eq!(e.code(), Some(ErrorCode::CutOverCancelled), "after {took:?}: {e}");
    assert_eq!(e.rpc().unwrap().code, -32004);
    assert!(e.to_string().contains("pause budget"), "{e}");
    assert!(dropped > 0, "the relay dropped nothing: the fence did not need the network");
    let status = client.status(&id).await.unwrap();
    assert_eq!(status.phase, Phase::WalCatchUp, "{status:?}");
    let resumed_at_ns = scene.writer.resume_on_source();
    relay.set_dropping(false);

    // Healed: the tail catches up past the pause, then the coordinator fences again.
    wait_for_status(&mut client, &id, "the tail to catch up after the partition", WAIT, |status| {
        assert_eq!(status.phase, Phase::WalCatchUp, "{status:?}");
        let caught_up = status.wal.current_lsn.is_some_and(|lsn| lsn > ticket.last_acked_lsn.0);
        caught_up && status.wal.lag_lsn().is_some_and(|lag| lag < 2_000)
    })
    .await
    .unwrap();
    let manifest = manifest_json(&scene.dir.path().join("target"), id.as_str()).unwrap();
    let mut target = ControlClient::connect(scene.target.socket()).await.unwrap();
    let inbound = target.call("migration.status", json!({ "migration_id": id.as_str() })).await.unwrap();
    eprintln!("{partition:?}, healed: the target is {} with its staging {}", inbound["phase"], manifest["state"]);
    if target_after_heal == TargetAfterHeal::NotFenced {
        // The cancelled fence left the staging as it was: not fenced at the cancelled
        // final_lsn by a late Fence, still taking records, like the source back in WalCatchUp.
        assert_eq!(manifest["state"], "copying", "the target fenced a cancelled fence: {manifest}");
        assert_eq!(inbound["phase"], "WalCatchUp", "the target is not back in WalCatchUp: {inbound}");
    }

    let node_wal = scene.dir.path().join("target/node-wal");
    let outcome = cut_over(
        &mut client,
        &id,
        &mut RefWrites { writer: &scene.writer, target_node_wal: Some(&node_wal) },
        CutOverOptions { catch_up_timeout: WAIT, fence_retries: 5, ..CutOverOptions::default() },
    )
    .await
    .unwrap();
    eprintln!(
        "{partition:?}, healed: fenced at {} with {} more fence(s) cancelled, pause {} us",
        outcome.release.final_lsn,
        outcome.failed_fences.len(),
        outcome.release.pause.pause_duration_us
    );
    assert!(outcome.release.final_lsn > ticket.last_acked_lsn.0);
    // Writes on the target node (100 ms of them).
    wait_for_writes(&scene.writer, 400, WAIT).await.unwrap();
    let staging = scene.staging(&id);
    let manifest = manifest_json(&scene.dir.path().join("target"), id.as_str()).unwrap();
    assert_eq!(manifest["state"], "released", "{manifest}");
    assert_eq!(manifest["final_lsn"], outcome.release.final_lsn, "{manifest}");
    let log = scene.writer.stop().unwrap();
    let first = log.pauses()[0];
    assert_eq!((first.paused_at_ns, first.resumed_at_ns), (ticket.paused_at_ns, Some(resumed_at_ns)));
    for span in log.pauses() {
        assert_eq!(log.acks_between(span.paused_at_ns, span.resumed_at_ns.unwrap_or(u64::MAX)), 0, "{span:?}");
    }
    assert_verified(&log, base_lsn, Lsn(outcome.release.final_lsn), &staging, &root, &node_wal);
}
