//! The pieces of the WAL catch-up benchmark (issue 4): a NodeDB-format WAL written ahead of
//! time or by a paced writer thread, ferry's source and target in this process, and an
//! observer that watches the target's durable LSN.
//!
//! What it does:
//! - [`write_backlog`] writes a WAL of 128-byte-payload records before a copy starts, one
//!   record in `selected_every` belonging to the migrating vShard.
//! - [`PacedWriter`] appends on its own thread at a set rate with group commit: every tick it
//!   appends the records that are due, flushes them in one O_DIRECT-style write, and notes the
//!   instant the flush returned (the writer's acknowledgement) for the last LSN of the flush.
//! - [`BenchTarget`] runs ferry's target ([`target::serve`], [`DiskStorage`]) on a loopback
//!   port, staging into a folder the caller names (tmpfs or disk); [`run_copy`] runs
//!   [`source::copy`] against it with a one-file base and a WAL stream.
//! - [`DurableObserver`] polls [`TargetContext::inbound`]'s `wal_durable_lsn` on its own thread
//!   in a tight loop and notes the instant each new value first appears. The target updates
//!   that status right after a batch's fdatasync returned and before it sends the
//!   acknowledgement, so it is the target's durable moment; the resolution is the observer's
//!   poll period, which it measures and reports.
//!
//! What it does not: assert on speed, or look inside ferry (it sees only public APIs: the
//! progress channel, the target's status, the files).
//!
//! Invariants: every file lives in a `tempfile::TempDir` the caller owns; every thread started
//! here is stopped and joined by its handle.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_engine::quic::QuicTuning;
use ferry_engine::read::ReadMode;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::walsend::WalSourceConfig;
use ferry_refnode::walwrite::{FlushStyle, Leftovers, RecordSpec, WalWriter, WriterOptions};
use ferry_wire::session::Progress;
use ferry_wire::wal::{Layout, LayoutChoice};
use ferry_wire::{Lsn, MigrationId, VShardId};
use tokio::sync::watch;

use crate::certs::{node, BenchCerts, SOURCE_NODE, TARGET_NODE};

/// The migrating vShard.
pub const VSHARD: VShardId = VShardId(7);
/// Payload bytes of every record.
pub const PAYLOAD_LEN_BYTES: usize = 128;
/// Records per flush of the backlog writer (one group commit).
pub const BACKLOG_FLUSH_RECORDS_COUNT: u64 = 32;

/// The writer's options: O_DIRECT-style flushes, stale leftovers (layout A), 64 MiB segments.
pub fn writer_options(layout: Layout) -> WriterOptions {
    WriterOptions { layout, flush: FlushStyle::Direct, leftovers: Leftovers::Stale, ..WriterOptions::default() }
}

fn spec_for(index: u64, selected_every: u64) -> RecordSpec {
    let vshard = if index.is_multiple_of(selected_every.max(1)) { VSHARD } else { VShardId(20 + (index % 5) as u32) };
    RecordSpec { tenant_id: 1, database_id: 3, ..RecordSpec::new(0x8000 | 1, vshard) }
}

fn payload_for(index: u64) -> [u8; PAYLOAD_LEN_BYTES] {
    let mut payload = [0u8; PAYLOAD_LEN_BYTES];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = u8::try_from((index.wrapping_mul(31) ^ i as u64) & 0xff).unwrap_or(0);
    }
    payload
}

/// What a backlog holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub records_count: u64,
    pub selected_count: u64,
    pub last_selected: Lsn,
    pub tip: Lsn,
    pub wal_bytes: u64,
}

/// Writes `records_count` records from LSN 1 into `dir`, one in `selected_every` in [`VSHARD`].
pub fn write_backlog(dir: &Path, layout: Layout, records_count: u64, selected_every: u64) -> anyhow::Result<Backlog> {
    let mut writer = WalWriter::create(dir, writer_options(layout), Lsn(1))?;
    let mut backlog = Backlog { records_count, selected_count: 0, last_selected: Lsn(0), tip: Lsn(0), wal_bytes: 0 };
    for i in 0..records_count {
        let spec = spec_for(i, selected_every);
        let lsn = writer.append(&spec, &payload_for(i))?;
        if spec.vshard_id == VSHARD {
            backlog.selected_count += 1;
            backlog.last_selected = lsn;
        }
        backlog.tip = lsn;
        if (i + 1) % BACKLOG_FLUSH_RECORDS_COUNT == 0 {
            writer.flush()?;
        }
    }
    writer.sync()?;
    for entry in std::fs::read_dir(dir)? {
        backlog.wal_bytes += entry?.metadata()?.len();
    }
    Ok(backlog)
}

/// One flush of the paced writer: the last LSN it made visible, how many records, and when
/// the flush returned.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub last_lsn: Lsn,
    pub records_count: u64,
    pub at: Instant,
}

/// What the paced writer did.
#[derive(Debug)]
pub struct WriterRun {
    pub acks: Vec<Ack>,
    pub started: Instant,
    pub elapsed: Duration,
    pub records_count: u64,
    /// CPU seconds of the writer thread (from `/proc/thread-self/stat`).
    pub cpu_secs: f64,
}

impl WriterRun {
    pub fn achieved_rate(&self) -> f64 {
        self.records_count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A writer thread appending at a fixed rate with group commit.
#[derive(Debug)]
pub struct PacedWriter {
    /// The last LSN the writer has acknowledged (flushed); 0 before the first.
    pub acked_lsn: Arc<AtomicU64>,
    handle: JoinHandle<anyhow::Result<WriterRun>>,
}

/// CPU seconds of the calling thread.
pub fn thread_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|t| crate::procstat::parse_stat(&t))
        .map_or(0.0, |(_, ticks)| crate::procstat::ticks_to_secs(ticks))
}

/// CPU seconds of this process (every thread).
pub fn process_cpu_secs() -> f64 {
    crate::procstat::read_cpu_ticks(std::process::id()).map_or(0.0, |(_, ticks)| crate::procstat::ticks_to_secs(ticks))
}

impl PacedWriter {
    /// Starts appending `records_count` records at `rate_per_sec` to a new WAL in `dir`
    /// (first LSN 1), one in `selected_every` in [`VSHARD`], checking the clock every `tick`.
    pub fn start(
        dir: &Path,
        layout: Layout,
        rate_per_sec: u64,
        records_count: u64,
        selected_every: u64,
        tick: Duration,
    ) -> anyhow::Result<Self> {
        let mut writer = WalWriter::create(dir, writer_options(layout), Lsn(1))?;
        let acked_lsn = Arc::new(AtomicU64::new(0));
        let acked = acked_lsn.clone();
        let handle = std::thread::Builder::new().name("bench-wal-writer".into()).spawn(move || {
            let cpu_before = thread_cpu_secs();
            let mut acks = Vec::with_capacity(usize::try_from(records_count / 4).unwrap_or(0).min(1 << 22));
            let started = Instant::now();
            let mut written = 0u64;
            while written < records_count {
                let due_wide = started.elapsed().as_nanos() * u128::from(rate_per_sec) / 1_000_000_000;
                let due = u64::try_from(due_wide).unwrap_or(u64::MAX).min(records_count);
                if due <= written {
                    std::thread::sleep(tick);
                    continue;
                }
                let mut last = Lsn(0);
                for i in written..due {
                    last = writer.append(&spec_for(i, selected_every), &payload_for(i))?;
                }
                writer.flush()?;
                let at = Instant::now();
                acked.store(last.0, Ordering::Release);
                acks.push(Ack { last_lsn: last, records_count: due - written, at });
                written = due;
            }
            let elapsed = started.elapsed();
            writer.sync()?;
            Ok(WriterRun { acks, started, elapsed, records_count, cpu_secs: thread_cpu_secs() - cpu_before })
        })?;
        Ok(Self { acked_lsn, handle })
    }

    pub fn join(self) -> anyhow::Result<WriterRun> {
        self.handle.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
    }
}

/// ferry's target in this process.
#[derive(Debug)]
pub struct BenchTarget {
    pub addr: SocketAddr,
    pub ctx: Arc<TargetContext>,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl BenchTarget {
    /// Starts on a loopback port, staging into `data_dir`. Call inside a tokio runtime.
    pub fn start(certs: &BenchCerts, data_dir: &Path) -> anyhow::Result<Self> {
        let crypto = ferry_engine::tls::server_crypto(&certs.identity(TARGET_NODE)?, &[node(SOURCE_NODE)?])?;
        let endpoint = ferry_engine::quic::server_endpoint("127.0.0.1:0".parse()?, crypto, &QuicTuning::default())?;
        let addr = endpoint.local_addr()?;
        let ctx = Arc::new(TargetContext::new(node(TARGET_NODE)?, data_dir.to_path_buf(), Arc::new(DiskStorage)));
        let task = tokio::spawn(target::serve(endpoint.clone(), ctx.clone()));
        Ok(Self { addr, ctx, endpoint, task })
    }

    pub fn stop(self) {
        self.endpoint.close(0u32.into(), b"bench over");
        self.task.abort();
    }
}

/// A copy of the one-file base in `root` (`base_lsn` 0), with the WAL in `wal_dir` up to
/// `until` when given (None: base only).
pub fn request(
    id: &str,
    root: &Path,
    target_addr: SocketAddr,
    wal: Option<(&Path, Layout, Lsn)>,
) -> anyhow::Result<CopyRequest> {
    Ok(CopyRequest {
        migration_id: MigrationId::new(id)?,
        vshard_id: VSHARD,
        base_lsn: Lsn(0),
        segments_root: root.to_path_buf(),
        files: None,
        db_meta: serde_json::Value::Null,
        target_addr,
        target_node: node(TARGET_NODE)?,
        chunk_len_bytes: ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES,
        streams_count: 4,
        connections_count: 1,
        rate_limit_bytes_per_sec: 0,
        read_mode: ReadMode::Mmap,
        commit: true,
        wal: wal.map(|(dir, layout, until)| WalSourceConfig {
            dir: dir.to_path_buf(),
            layout: LayoutChoice::Fixed(layout),
            alignment_bytes: 4096,
            until_lsn: Some(until),
            max_held_wal_bytes: 16 << 30,
            poll_interval: ferry_engine::transfer::walsend::POLL_INTERVAL,
        }),
        cutover: None,
        retry: ferry_wire::retry::RetryPolicy::default(),
    })
}

/// Writes the base: one small segment file.
pub fn write_base(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("L1"))?;
    std::fs::write(root.join("L1/base.seg"), vec![0x5au8; 4096]).context("cannot write the base file")
}

/// Runs the source side of `request`; returns the report, the time it took, and the
/// progress channel's receiver.
pub async fn run_copy(
    certs: &BenchCerts,
    request: CopyRequest,
    progress: watch::Sender<Progress>,
) -> anyhow::Result<(CopyReport, Duration)> {
    let identity = certs.identity(SOURCE_NODE)?;
    let rate = RateHandle::new(0, u64::from(request.chunk_len_bytes));
    let started = Instant::now();
    let report = source::copy(&identity, &QuicTuning::default(), request, progress, rate).await?;
    Ok((report, started.elapsed()))
}

/// What the observer saw.
#[derive(Debug, Default)]
pub struct Observed {
    /// Each new durable LSN and the instant it first showed.
    pub changes: Vec<(Lsn, Instant)>,
    pub polls_count: u64,
    pub elapsed: Duration,
    pub cpu_secs: f64,
}

impl Observed {
    /// The mean time between two polls: the resolution of every instant in `changes`.
    pub fn poll_interval(&self) -> Duration {
        self.elapsed.checked_div(u32::try_from(self.polls_count.max(1)).unwrap_or(u32::MAX)).unwrap_or_default()
    }

    /// The first instant the durable LSN was at least `lsn`.
    pub fn first_at_least(&self, lsn: Lsn) -> Option<Instant> {
        let i = self.changes.partition_point(|(l, _)| *l < lsn);
        self.changes.get(i).map(|(_, at)| *at)
    }
}

/// A thread polling the target's durable LSN of one migration.
#[derive(Debug)]
pub struct DurableObserver {
    /// The latest durable LSN seen.
    pub durable_lsn: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Observed>,
}

impl DurableObserver {
    /// Polls every `period` (a sleep; the real period is longer and is measured).
    pub fn start(ctx: Arc<TargetContext>, id: &str, period: Duration) -> anyhow::Result<Self> {
        let id = MigrationId::new(id)?;
        let durable_lsn = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (durable, stopped) = (durable_lsn.clone(), stop.clone());
        let handle = std::thread::Builder::new().name("bench-observer".into()).spawn(move || {
            let cpu_before = thread_cpu_secs();
            let mut seen = Observed::default();
            let started = Instant::now();
            let mut last = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                let now_lsn = ctx.wal_durable_lsn(&id).unwrap_or(0);
                let at = Instant::now();
                seen.polls_count += 1;
                if now_lsn > last {
                    last = now_lsn;
                    durable.store(now_lsn, Ordering::Release);
                    seen.changes.push((Lsn(now_lsn), at));
                }
                std::thread::sleep(period);
            }
            seen.elapsed = started.elapsed();
            seen.cpu_secs = thread_cpu_secs() - cpu_before;
            seen
        })?;
        Ok(Self { durable_lsn, stop, handle })
    }

    pub fn stop(self) -> anyhow::Result<Observed> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().map_err(|_| anyhow::anyhow!("the observer thread panicked"))
    }
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    // The float is at most `sorted.len()` for q in 0..=1, and clamped anyway.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_backlog_selects_one_record_in_n() {
        let dir = tempfile::tempdir().unwrap();
        let backlog = write_backlog(dir.path(), Layout::A, 1000, 8).unwrap();
        assert_eq!(backlog.tip, Lsn(1000));
        assert_eq!(backlog.selected_count, 125);
        assert_eq!(backlog.last_selected, Lsn(993));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&values, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
