//! The cut-over fence, driven over the control sockets of two daemons running in this process
//! (source and target on loopback), with a writer appending NodeDB layout-A records to the
//! source WAL on its own thread.
//!
//! What it checks: prepare, fence and release complete a live migration: the staging ends
//! `released` at `final_lsn` with exactly the vShard's records in (base_lsn, final_lsn], no write
//! is acknowledged while writes are paused, and the pause's parts add up to the pause, which the
//! writer's own longest gap covers; fence and release are idempotent; a budget too small for
//! the lag is refused by prepare (`PauseBudgetExceeded`) and the writer is never paused; a
//! writer that does not pause gets `FenceViolated`; a drain that cannot finish in the budget
//! is cancelled (`CutOverCancelled`) and the migration is back in `WalCatchUp`, where the next
//! fence completes; abort after a completed fence removes the target staging; `migration.applied`
//! makes the fence wait for the target database's ingest.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_engine::clock::monotonic_ns;
use ferry_engine::control::{ControlClient, ErrorCode};
use ferry_engine::node::RunningNode;
use ferry_engine::wal::tail::FolderTail;
use ferry_refnode::walwrite::{FlushStyle, Leftovers, RecordSpec, WalWriter, WriterOptions};
use ferry_tests::{node_pair, wait_for_phase, wait_until, wait_until_blocking, write_file, Certs};
use ferry_wire::api::{MigrationStatus, Phase, StartParams};
use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode};
use ferry_wire::{Lsn, MigrationId, VShardId};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const VSHARD: u32 = 7;

/// A writer thread: one write in three to vShard 7, the others to vShard 3; group flushes.
/// `pause` parks it and returns the last acknowledged LSN; every ack is stamped.
struct Writer {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    /// Ignore the pause (a writer that does not pause, for FenceViolated).
    rogue: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// (LSN, vshard, ack stamp ns) of every write.
    log: Arc<Mutex<Vec<(u64, u32, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: &Path, rate_per_sec: u64) -> Writer {
        let options = WriterOptions {
            layout: Layout::A,
            roll_size_bytes: 256 << 10,
            alignment_bytes: 4096,
            flush: FlushStyle::Direct,
            leftovers: Leftovers::Stale,
            preamble: None,
        };
        let mut wal = WalWriter::create(dir, options, Lsn(1)).unwrap();
        let flag = || Arc::new(AtomicBool::new(false));
        let (stop, pause, parked, rogue) = (flag(), flag(), flag(), flag());
        let acked = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, pause, parked, rogue, acked, log) =
                (stop.clone(), pause.clone(), parked.clone(), rogue.clone(), acked.clone(), log.clone());
            std::thread::spawn(move || {
                let interval = Duration::from_nanos(1_000_000_000 / rate_per_sec);
                let mut seq = 0u64;
                while !stop.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) && !rogue.load(Ordering::Acquire) {
                        parked.store(true, Ordering::Release);
                        // The simulated writer's own park: it looks for the resume this often.
                        std::thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                    parked.store(false, Ordering::Release);
                    let mut batch = Vec::new();
                    for _ in 0..4 {
                        let vshard = if seq.is_multiple_of(3) { VSHARD } else { 3 };
                        let payload = [seq.to_le_bytes(), seq.to_le_bytes()].concat();
                        let lsn = wal.append(&RecordSpec::new(0x8001, VShardId(vshard)), &payload).unwrap();
                        batch.push((lsn.0, vshard));
                        seq += 1;
                    }
                    wal.flush().unwrap();
                    let at = monotonic_ns();
                    let mut log = log.lock().unwrap();
                    for (lsn, vshard) in batch {
                        log.push((lsn, vshard, at));
                        acked.store(lsn, Ordering::Release);
                    }
                    drop(log);
                    // The simulated write rate (a group of four per interval), not a wait.
                    std::thread::sleep(interval * 4);
                }
            })
        };
        Writer { stop, pause, parked, rogue, acked, log, thread: Some(thread) }
    }

    /// Parks the writer: (last acknowledged LSN, paused_at_ns).
    fn pause(&self) -> (u64, u64) {
        self.pause.store(true, Ordering::Release);
        wait_until_blocking("the writer to park", WAIT, || self.parked.load(Ordering::Acquire)).unwrap();
        (self.acked.load(Ordering::Acquire), monotonic_ns())
    }

    fn resume(&self) -> u64 {
        let at = monotonic_ns();
        self.pause.store(false, Ordering::Release);
        at
    }

    /// Waits until `count` more writes are acknowledged (a write is one LSN).
    async fn wait_for_writes(&self, count: u64) {
        let from = self.acked.load(Ordering::Acquire);
        let what = format!("{count} more acknowledged writes after LSN {from}");
        wait_until(&what, WAIT, || self.acked.load(Ordering::Acquire) >= from + count).await.unwrap();
    }

    fn acks_between(&self, from_ns: u64, to_ns: u64) -> usize {
        self.log.lock().unwrap().iter().filter(|(_, _, at)| *at > from_ns && *at < to_ns).count()
    }

    /// The longest gap between two consecutive acknowledgements, in us.
    fn longest_gap_us(&self) -> u64 {
        let log = self.log.lock().unwrap();
        log.windows(2).map(|w| w[1].2.saturating_sub(w[0].2) / 1_000).max().unwrap_or(0)
    }

    fn vshard_lsns(&self, after: u64, upto: u64) -> Vec<u64> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|(lsn, v, _)| *v == VSHARD && *lsn > after && *lsn <= upto).map(|(l, _, _)| *l).collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Pair {
    dir: tempfile::TempDir,
    _certs: Certs,
    source: RunningNode,
    target: RunningNode,
    root: PathBuf,
    wal_dir: PathBuf,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let (source, target) = node_pair(&certs, dir.path()).await;
    let root = dir.path().join("export");
    write_file(&root, "L1/a.seg", 300_000, 1);
    write_file(&root, "L1/b.seg", 4096, 2);
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    Pair { dir, _certs: certs, source, target, root, wal_dir }
}

impl Pair {
    fn params(&self, id: &str, budget_us: u64) -> StartParams {
        serde_json::from_value(json!({
            "migration_id": id, "vshard_id": VSHARD, "segments_root": self.root, "wal_dir": self.wal_dir,
            "base_lsn": 0, "target_address": self.target.quic_addr.to_string(), "target_node_id": "target",
            "write_pause_budget_us": budget_us, "chunk_len_bytes": 65536,
        }))
        .unwrap()
    }

    async fn client(&self, node: &RunningNode) -> ControlClient {
        ControlClient::connect(node.socket()).await.unwrap()
    }

    async fn status(&self, node: &RunningNode, id: &str) -> Value {
        let mut client = self.client(node).await;
        client.call("migration.status", json!({ "migration_id": id })).await.unwrap_or(Value::Null)
    }

    async fn wait_phase(&self, node: &RunningNode, id: &str, phase: Phase) -> MigrationStatus {
        let mut client = self.client(node).await;
        wait_for_phase(&mut client, &MigrationId::new(id).unwrap(), phase, WAIT).await.unwrap()
    }

    fn manifest(&self, id: &str) -> Value {
        let path = self.dir.path().join("target/migrations").join(id).join("MANIFEST.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// LSNs of the staged WAL of `id`, read back in staged mode.
    fn staged_lsns(&self, id: &str) -> Vec<u64> {
        let dir = self.dir.path().join("target/migrations").join(id).join("wal");
        let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
        let mut tail = FolderTail::new(&dir, config, None).unwrap();
        let mut lsns = Vec::new();
        while let Some(record) = tail.poll_ref().unwrap() {
            assert_eq!(record.header.vshard_id, VShardId(VSHARD));
            lsns.push(record.header.lsn.0);
        }
        lsns
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn code(e: &ferry_engine::control::ClientError) -> Option<ErrorCode> {
    e.code()
}

/// Starts a live migration and waits for WalCatchUp with the writer running.
async fn live(pair: &Pair, id: &str, budget_us: u64) -> MigrationId {
    let mut client = pair.client(&pair.source).await;
    client.start(&pair.params(id, budget_us)).await.unwrap();
    pair.wait_phase(&pair.source, id, Phase::WalCatchUp).await;
    MigrationId::new(id).unwrap()
}

#[test]
fn prepare_fence_release_complete_a_live_migration_with_its_pause_measured() {
    runtime().block_on(async {
        let pair = pair().await;
        let writer = Writer::start(&pair.wal_dir, 4_000);
        let id = live(&pair, "live-1", 500_000).await;
        // The tail sees writes to measure (300 ms of them).
        writer.wait_for_writes(1_200).await;
        let mut client = pair.client(&pair.source).await;
        let prepared = client.prepare_cutover(&id).await.unwrap();
        assert!(prepared.estimated_pause_us <= 500_000, "{prepared:?}");
        assert!(prepared.inputs.group_commit_us > 0, "a group commit was measured: {prepared:?}");

        let (final_lsn, paused_at) = writer.pause();
        let fenced = client.fence(&id, final_lsn, Some(paused_at)).await.unwrap();
        assert_eq!(fenced.final_lsn, final_lsn);
        assert_eq!(fenced.estimate_us, prepared.estimated_pause_us);
        assert_eq!(pair.status(&pair.source, "live-1").await["phase"], "AtomicCutOver");
        let target_data = pair.dir.path().join("target");
        assert_eq!(ferry_tests::manifest_json_when(&target_data, "live-1", "fenced").unwrap()["state"], "fenced");
        // Idempotent for the same final_lsn.
        assert_eq!(client.fence(&id, final_lsn, Some(paused_at)).await.unwrap(), fenced);
        let resumed_at = writer.resume();
        let released = client.release(&id, Some(resumed_at)).await.unwrap();
        let pause = released.pause;
        assert_eq!(pause.pause_duration_us, (resumed_at - paused_at) / 1_000);
        assert_eq!(pause.breakdown.total_us(), pause.pause_duration_us, "{pause:?}");
        assert_eq!(client.release(&id, Some(resumed_at)).await.unwrap(), released, "release is idempotent");

        // Nothing was acknowledged while writes were paused, and the writer saw the pause.
        assert_eq!(writer.acks_between(paused_at, resumed_at), 0);
        // The gap over the pause ends at the writer's first ack after the resume.
        let acked_again = || writer.acks_between(resumed_at, u64::MAX) > 0;
        wait_until("an ack after the resume", WAIT, acked_again).await.unwrap();
        assert!(writer.longest_gap_us() >= pause.pause_duration_us);

        let status = pair.wait_phase(&pair.source, "live-1", Phase::Completed).await;
        assert_eq!(status.pause_duration_us, Some(pause.pause_duration_us));
        let manifest = pair.manifest("live-1");
        assert_eq!(manifest["state"], "released");
        assert_eq!(manifest["final_lsn"], final_lsn);
        assert_eq!(pair.staged_lsns("live-1"), writer.vshard_lsns(0, final_lsn), "every vShard write once, in order");
        let target_status = pair.wait_phase(&pair.target, "live-1", Phase::Completed).await;
        assert_eq!(target_status.staging_state.as_deref(), Some("released"));
    });
}

#[test]
fn a_budget_too_small_is_refused_before_any_pause() {
    runtime().block_on(async {
        let pair = pair().await;
        let writer = Writer::start(&pair.wal_dir, 4_000);
        let id = live(&pair, "tight", 1).await;
        // The tail sees writes to estimate the pause from (200 ms of them).
        writer.wait_for_writes(800).await;
        let mut client = pair.client(&pair.source).await;
        let e = client.prepare_cutover(&id).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::PauseBudgetExceeded), "{e}");
        let data = e.rpc().unwrap().data.clone().unwrap();
        assert_eq!(data["budget_us"], 1);
        assert!(data["estimated_us"].as_u64().unwrap() > 1, "{data}");
        assert!(!writer.pause.load(Ordering::Acquire), "the writer was never paused");
        assert_eq!(pair.status(&pair.source, "tight").await["phase"], "WalCatchUp");
        client.abort(&id, Some("test over")).await.unwrap();
    });
}

#[test]
fn a_writer_that_does_not_pause_violates_the_fence_and_a_later_fence_completes() {
    runtime().block_on(async {
        let pair = pair().await;
        let writer = Writer::start(&pair.wal_dir, 4_000);
        let id = live(&pair, "rogue", 2_000_000).await;
        let mut client = pair.client(&pair.source).await;
        writer.rogue.store(true, Ordering::Release);
        let (final_lsn, paused_at) = (writer.acked.load(Ordering::Acquire), monotonic_ns());
        // The rogue writer keeps writing; wait until a vShard record above final_lsn exists.
        let written_above = || !writer.vshard_lsns(final_lsn, u64::MAX).is_empty();
        wait_until("a vShard write above final_lsn", WAIT, written_above).await.unwrap();
        let e = client.fence(&id, final_lsn, Some(paused_at)).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::FenceViolated), "{e}");
        let lsn = e.rpc().unwrap().data.clone().unwrap()["lsn"].as_u64().unwrap();
        assert!(lsn > final_lsn && writer.vshard_lsns(final_lsn, lsn).contains(&lsn), "{lsn}");
        assert_eq!(pair.status(&pair.source, "rogue").await["phase"], "WalCatchUp");

        writer.rogue.store(false, Ordering::Release);
        let (final_lsn, paused_at) = writer.pause();
        client.fence(&id, final_lsn, Some(paused_at)).await.unwrap();
        let released = client.release(&id, Some(writer.resume())).await.unwrap();
        assert_eq!(released.final_lsn, final_lsn);
        assert_eq!(pair.staged_lsns("rogue"), writer.vshard_lsns(0, final_lsn));
    });
}

#[test]
fn a_drain_that_cannot_finish_is_cancelled_and_the_retry_completes_then_abort_of_a_fenced_one() {
    runtime().block_on(async {
        let pair = pair().await;
        let writer = Writer::start(&pair.wal_dir, 4_000);
        let id = live(&pair, "cancel", 200_000).await;
        let mut client = pair.client(&pair.source).await;
        let (acked, paused_at) = writer.pause();
        // A final_lsn nobody wrote: the drain cannot finish within the budget.
        let e = client.fence(&id, acked + 1_000, Some(paused_at)).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::CutOverCancelled), "{e}");
        assert!(e.to_string().contains("did not finish within the pause budget"), "{e}");
        assert_eq!(pair.status(&pair.source, "cancel").await["phase"], "WalCatchUp");
        writer.resume();
        // The writer runs again (100 ms of writes) before the retry.
        writer.wait_for_writes(400).await;

        // The retry completes; the staging is fenced, then the coordinator aborts (its routing
        // flip failed): the target staging goes, the source stays authoritative.
        let (final_lsn, paused_at) = writer.pause();
        client.fence(&id, final_lsn, Some(paused_at)).await.unwrap();
        let target_data = pair.dir.path().join("target");
        assert_eq!(ferry_tests::manifest_json_when(&target_data, "cancel", "fenced").unwrap()["state"], "fenced");
        assert_eq!(pair.staged_lsns("cancel"), writer.vshard_lsns(0, final_lsn));
        writer.resume();
        client.abort(&id, Some("routing flip failed")).await.unwrap();
        assert_eq!(pair.manifest("cancel")["state"], "aborted");
        assert!(!pair.dir.path().join("target/migrations/cancel/wal").exists());
        let e = client.release(&id, None).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::Refused), "{e}");
    });
}

#[test]
fn the_fence_waits_for_the_target_databases_ingest_when_it_acknowledges_it() {
    runtime().block_on(async {
        let pair = pair().await;
        let writer = Writer::start(&pair.wal_dir, 2_000);
        let id = live(&pair, "ingest", 300_000).await;
        pair.wait_phase(&pair.target, "ingest", Phase::WalCatchUp).await;
        let mut target = pair.client(&pair.target).await;
        assert_eq!(target.applied(&id, 1).await.unwrap(), 1);
        let mut client = pair.client(&pair.source).await;
        // The database applies nothing more: the fence is cancelled by the target.
        let (final_lsn, paused_at) = writer.pause();
        let e = client.fence(&id, final_lsn, Some(paused_at)).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::CutOverCancelled), "{e}");
        assert!(e.to_string().contains("has applied up to 1"), "{e}");
        writer.resume();
        // The writer runs again (50 ms of writes) before the next pause.
        writer.wait_for_writes(100).await;

        // Now it applies as it goes: the fence waits for it and reports the wait.
        let (final_lsn, paused_at) = writer.pause();
        let applier = {
            let socket = pair.target.socket().to_path_buf();
            let id = id.clone();
            tokio::spawn(async move {
                // The database applies late on purpose, so that the fence waits for it.
                tokio::time::sleep(Duration::from_millis(30)).await;
                let mut target = ControlClient::connect(&socket).await.unwrap();
                target.applied(&id, final_lsn).await.unwrap();
            })
        };
        let fenced = client.fence(&id, final_lsn, Some(paused_at)).await.unwrap();
        applier.await.unwrap();
        assert!(fenced.apply_wait_us > 0, "{fenced:?}");
        let released = client.release(&id, Some(writer.resume())).await.unwrap();
        assert_eq!(released.pause.breakdown.apply_wait_us, fenced.apply_wait_us);
        assert_eq!(released.pause.breakdown.total_us(), released.pause_duration_us);
    });
}

/// Calls that make no sense are refused with clear errors, never a crash.
#[test]
fn cut_over_calls_out_of_place_are_refused_clearly() {
    runtime().block_on(async {
        let pair = pair().await;
        let mut client = pair.client(&pair.source).await;
        let cases: BTreeMap<&str, (Value, i64)> = BTreeMap::from([
            ("migration.prepare_cutover", (json!({ "migration_id": "nope" }), -32002)),
            ("migration.fence", (json!({ "migration_id": "nope", "final_lsn": 1 }), -32002)),
            ("migration.release", (json!({ "migration_id": "nope" }), -32002)),
            ("migration.applied", (json!({ "migration_id": "nope", "applied_lsn": 1 }), -32002)),
        ]);
        for (method, (params, code)) in cases {
            let e = client.call(method, params).await.unwrap_err();
            assert_eq!(e.rpc().unwrap().code, code, "{method}: {e}");
        }
        let writer = Writer::start(&pair.wal_dir, 1_000);
        let id = live(&pair, "odd", 500_000).await;
        for (params, needle) in [
            (json!({ "migration_id": "odd" }), "final_lsn"),
            (json!({ "migration_id": "odd", "final_lsn": "x" }), "final_lsn"),
            (json!({ "migration_id": "odd", "final_lsn": 5, "extra": 1 }), "extra"),
            (json!({ "migration_id": "odd", "final_lsn": 5, "writes_paused_at_ns": u64::MAX }), "CLOCK_MONOTONIC"),
        ] {
            let e = client.call("migration.fence", params).await.unwrap_err();
            assert_eq!(e.rpc().unwrap().code, -32602, "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        let e = client.release(&id, None).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::Refused), "{e}");
        assert!(e.to_string().contains("not fenced"), "{e}");
        drop(writer);
        client.abort(&id, None).await.unwrap();
        let e = client.prepare_cutover(&id).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::Refused), "{e}");
    });
}
