//! One tail per WAL folder: migrations of different vShards from one source WAL folder to
//! one target, running at once while a writer appends, are fed by one tail thread that reads
//! each record once; each stages exactly its vShard's records, once, in order. A migration
//! that joins later from an older base still gets every record from its base on. The WAL
//! fields of the progress (durable and source LSNs, held bytes) move during the base copy.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::walsend::{WalSourceConfig, POLL_INTERVAL};
use ferry_engine::transfer::waltail_hub::{folder_stats, FolderStats};
use ferry_engine::transfer::TransferError;
use ferry_engine::wal::tail::FolderTail;
use ferry_refnode::walwrite::{RecordSpec, WalWriter, WriterOptions};
use ferry_tests::{copy, request, wait_until, write_file, Certs, Target};
use ferry_wire::session::Progress;
use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode};
use ferry_wire::{Lsn, VShardId};
use tokio::sync::watch;

/// How long a wait goes before it gives up: a guard against a hang, not a timing assertion.
const WAIT: Duration = Duration::from_secs(60);

/// Record `lsn` belongs to vShard `7 + lsn % 3`; its payload repeats the LSN.
fn vshard_of(lsn: u64) -> u32 {
    7 + (lsn % 3) as u32
}

fn payload(lsn: u64) -> Vec<u8> {
    let len = if lsn.is_multiple_of(17) { 0 } else { 64 + (lsn % 200) as usize };
    lsn.to_le_bytes().iter().copied().cycle().take(len).collect()
}

fn append(writer: &mut WalWriter, count: u64) {
    for _ in 0..count {
        let lsn = writer.next_lsn().0;
        writer.append(&RecordSpec::new(0x8001, VShardId(vshard_of(lsn))), &payload(lsn)).unwrap();
        if lsn.is_multiple_of(8) {
            writer.flush().unwrap();
        }
    }
    writer.flush().unwrap();
}

fn new_writer(dir: &Path) -> WalWriter {
    let options = WriterOptions { layout: Layout::B, roll_size_bytes: 128 << 10, ..WriterOptions::default() };
    WalWriter::create(dir, options, Lsn(1)).unwrap()
}

fn wal_request(
    id: &str,
    root: &Path,
    target: &Target,
    wal_dir: &Path,
    vshard: u32,
    base: u64,
    tip: u64,
) -> CopyRequest {
    let mut req = request(id, root, target.addr, 256 << 10);
    req.vshard_id = VShardId(vshard);
    req.base_lsn = Lsn(base);
    req.wal = Some(WalSourceConfig {
        dir: wal_dir.to_path_buf(),
        layout: LayoutChoice::Auto,
        alignment_bytes: 4096,
        until_lsn: Some(Lsn(tip)),
        max_held_wal_bytes: 1 << 30,
        poll_interval: POLL_INTERVAL,
    });
    req
}

/// (lsn, vshard, payload) of the staged WAL of migration `id`.
fn staged(target_dir: &Path, id: &str) -> Vec<(u64, u32, Vec<u8>)> {
    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut tail = FolderTail::new(&target_dir.join("migrations").join(id).join("wal"), config, None).unwrap();
    let mut out = Vec::new();
    while let Some(record) = tail.poll().unwrap() {
        out.push((record.header.lsn.0, record.header.vshard_id.0, record.payload().to_vec()));
    }
    out
}

fn expected(vshard: u32, from: u64, to: u64) -> Vec<(u64, u32, Vec<u8>)> {
    (from..=to).filter(|lsn| vshard_of(*lsn) == vshard).map(|lsn| (lsn, vshard, payload(lsn))).collect()
}

/// Record bytes (headers and payloads) of the source folder's records in `from..=to`.
fn record_bytes(dir: &Path, from: u64, to: u64) -> u64 {
    let mut tail = FolderTail::new(dir, CursorConfig::default(), Some(Lsn(from))).unwrap();
    let mut total = 0;
    while let Some(record) = tail.poll_ref().unwrap() {
        if record.header.lsn.0 <= to {
            total += record.bytes.len() as u64;
        }
    }
    total
}

async fn wait_stats(dir: &Path, what: &str, done: impl Fn(&FolderStats) -> bool) -> FolderStats {
    let mut stats = None;
    let reached = || {
        stats = folder_stats(dir).filter(|s| done(s));
        stats.is_some()
    };
    wait_until(what, WAIT, reached).await.unwrap_or_else(|e| panic!("{e}: {:?}", folder_stats(dir)));
    stats.unwrap()
}

/// Waits for the copy's progress to satisfy `done` (the progress is a watch channel: no poll).
async fn wait_progress(
    rx: &mut watch::Receiver<Progress>,
    what: &str,
    done: impl FnMut(&Progress) -> bool,
) -> Progress {
    let outcome = match tokio::time::timeout(WAIT, rx.wait_for(done)).await {
        Ok(Ok(progress)) => return *progress,
        Ok(Err(_)) => "the copy ended first",
        Err(_) => "not within the deadline",
    };
    panic!("{what}: {outcome}: {:?}", *rx.borrow());
}

fn spawn_copy(
    certs: &Arc<Certs>,
    req: CopyRequest,
    progress: watch::Sender<Progress>,
    rate: RateHandle,
) -> tokio::task::JoinHandle<Result<CopyReport, TransferError>> {
    let certs = certs.clone();
    tokio::spawn(
        async move { source::copy(&certs.identity("source"), &QuicTuning::default(), req, progress, rate).await },
    )
}

/// Two migrations (vShards 7 and 8) from one WAL folder to one target, at once, while a
/// writer appends: one tail thread reads each record once and feeds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_from_one_wal_folder_share_one_tail() {
    let certs = Arc::new(Certs::new().unwrap());
    let (root_a, root_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let wal_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(root_a.path(), "L1/a.seg", 8 << 20, 1);
    write_file(root_b.path(), "L1/b.seg", 8 << 20, 2);
    let mut writer = new_writer(wal_dir.path());
    append(&mut writer, 300);
    let (base, tip) = (300, 3300);
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();

    // Slow base copies (raised once the WAL progress was seen during them).
    let chunk = 256 << 10;
    let (rate_a, rate_b) = (RateHandle::new(512 << 10, chunk), RateHandle::new(512 << 10, chunk));
    let (progress_a, mut progress_rx) = watch::channel(Progress::default());
    let req_a = wal_request("shared-a", root_a.path(), &target, wal_dir.path(), 7, base, tip);
    let req_b = wal_request("shared-b", root_b.path(), &target, wal_dir.path(), 8, base, tip);
    let task_a = spawn_copy(&certs, req_a, progress_a, rate_a.clone());
    let task_b = spawn_copy(&certs, req_b, watch::channel(Progress::default()).0, rate_b.clone());
    let stats = wait_stats(wal_dir.path(), "both subscribed", |s| s.subscribers_count == 2).await;
    assert_eq!(stats.tail_threads_started_count, 1);

    let writer_task = tokio::task::spawn_blocking(move || {
        for _ in 0..30 {
            append(&mut writer, 100);
            // The simulated write rate, not a wait.
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // During the base copy, the WAL fields move: records read, made durable, segments held.
    let moving = |p: &Progress| {
        p.wal_source_lsn.is_some_and(|l| l > base + 100)
            && p.wal_durable_lsn.is_some_and(|l| l > base)
            && p.wal_held_bytes > 0
    };
    let what = "the WAL progress to move or the base to be staged";
    let p = wait_progress(&mut progress_rx, what, |p| p.base_staged || moving(p)).await;
    let seen = Some(p).filter(|p| !p.base_staged && moving(p));
    let seen = seen.expect("the WAL progress did not move during the base copy");
    assert!(!seen.base_staged && seen.bytes_transferred < seen.bytes_total, "{seen:?}");
    rate_a.set(0);
    rate_b.set(0);

    writer_task.await.unwrap();
    let wait = Duration::from_secs(120);
    let report_a = tokio::time::timeout(wait, task_a).await.expect("a hung").unwrap().unwrap();
    let report_b = tokio::time::timeout(wait, task_b).await.expect("b hung").unwrap().unwrap();
    assert_eq!((report_a.final_lsn, report_b.final_lsn), (Lsn(tip), Lsn(tip)));
    target.stop();

    assert_eq!(staged(target_dir.path(), "shared-a"), expected(7, base + 1, tip));
    assert_eq!(staged(target_dir.path(), "shared-b"), expected(8, base + 1, tip));
    let stats = wait_stats(wal_dir.path(), "the tail stopped", |s| !s.tail_running).await;
    assert_eq!(stats.tail_threads_started_count, 1, "{stats:?}");
    // Both joined at the same LSN before the writer went on: the shared tail read every
    // record once, and nothing was read a second time.
    assert_eq!(stats.catch_up_read_bytes, 0, "{stats:?}");
    assert_eq!(stats.shared_read_bytes, record_bytes(wal_dir.path(), base + 1, tip), "{stats:?}");
    // Held links are gone: the migrations' (committed) and the shared tail's.
    let held: Vec<_> = std::fs::read_dir(wal_dir.path().join(".ferry-held")).unwrap().collect();
    assert!(held.is_empty(), "{held:?}");
}

/// A migration that starts while another one follows the folder, from an older base (a
/// lower LSN than the shared tail's), still gets every record from its base on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_joining_later_from_an_older_base_gets_every_record() {
    let certs = Arc::new(Certs::new().unwrap());
    let (root_a, root_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let wal_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(root_a.path(), "a.seg", 1 << 20, 3);
    write_file(root_c.path(), "c.seg", 1 << 20, 4);
    let mut writer = new_writer(wal_dir.path());
    append(&mut writer, 1000);
    let tip = 3000;
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();

    let (progress_a, mut progress_rx) = watch::channel(Progress::default());
    let req_a = wal_request("early", root_a.path(), &target, wal_dir.path(), 7, 900, tip);
    let task_a = spawn_copy(&certs, req_a, progress_a, RateHandle::new(0, 1 << 20));
    // The shared tail is past LSN 1000 before the second migration starts.
    let past = expected(7, 1, 1000).last().unwrap().0;
    let what = format!("the shared tail past LSN {past}");
    wait_progress(&mut progress_rx, &what, |p| p.wal_source_lsn.is_some_and(|l| l >= past)).await;
    assert!(progress_rx.borrow().wal_source_lsn.is_some_and(|l| l > 900), "{:?}", *progress_rx.borrow());
    let req_c = wal_request("late", root_c.path(), &target, wal_dir.path(), 8, 100, tip);
    let task_c = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req_c).await })
    };
    // The first migration cannot end before the writer goes on: both follow the folder now.
    let stats = wait_stats(wal_dir.path(), "both subscribed", |s| s.subscribers_count == 2).await;
    assert_eq!(stats.tail_threads_started_count, 1);
    let writer_task = tokio::task::spawn_blocking(move || {
        for _ in 0..20 {
            append(&mut writer, 100);
            // The simulated write rate, not a wait.
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    writer_task.await.unwrap();
    let wait = Duration::from_secs(120);
    let report_a = tokio::time::timeout(wait, task_a).await.expect("a hung").unwrap().unwrap();
    let report_c = tokio::time::timeout(wait, task_c).await.expect("c hung").unwrap().unwrap();
    assert_eq!((report_a.final_lsn, report_c.final_lsn), (Lsn(tip), Lsn(tip)));
    target.stop();

    assert_eq!(staged(target_dir.path(), "early"), expected(7, 901, tip));
    assert_eq!(staged(target_dir.path(), "late"), expected(8, 101, tip));
    let stats = wait_stats(wal_dir.path(), "the tail stopped", |s| !s.tail_running).await;
    // One thread; the late one read what the shared tail had passed on its own.
    assert_eq!(stats.tail_threads_started_count, 1, "{stats:?}");
    assert!(stats.catch_up_read_bytes >= record_bytes(wal_dir.path(), 101, 1000), "{stats:?}");
}
