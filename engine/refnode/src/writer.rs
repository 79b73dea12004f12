//! [`RefWriter`]: the reference node's write path, on its own thread, with the write fence a
//! coordinator drives at cut-over.
//!
//! What it does: appends NodeDB records (payloads from [`super::payload`], record_type
//! [`RECORD_TYPE_PUT`]) in the configured header layout (A by default, or B) to a new source WAL
//! folder at a fixed rate, O_DIRECT-style: block-aligned flushes, segments rolled at
//! `roll_size_bytes`. Layout A leaves stale leftovers after each flush; layout B frames the gap
//! as a padding record and carries `apply_key = writer_seq + 1`, `event_source = 1` and
//! `commit_hlc` = the write's due time in its extra header fields, so they are not all zero.
//! Write `writer_seq` is due at `started + writer_seq / rate`; one write in `migrating_every`
//! goes to the migrating vShard, the others to `other_vshards` in turn. Group commit: every
//! write due by a flush goes into it (at most [`GROUP_MAX_WRITES`]), flushes come at most every
//! `group_commit_interval_us`, and a write is acknowledged once, after its group's flush (a
//! write to the segment file, no fdatasync: the page cache is what a reader on this host sees).
//!
//! From another thread, while it runs:
//! - [`RefWriter::pause`]: the writer finishes its group and parks, appending nothing until
//!   resumed; it returns a [`PauseTicket`] with the last acknowledged source LSN (the cut-over's
//!   `final_lsn`) and the CLOCK_MONOTONIC ns read when it parked (`writes_paused_at_ns`).
//!   Writes that come due while paused are written after the resume; their latency, measured
//!   from the schedule, counts the delay.
//! - [`RefWriter::resume_on_source`]: a cancelled cut-over; writes go where they went before.
//! - [`RefWriter::resume_on_target`]: the routing flip; from then on the migrating vShard's
//!   writes go to a new WAL folder on the target node (`<target data dir>/node-wal/`, its own
//!   LSNs from 1, the same layout, buffered flushes), the other vShards' to the source WAL.
//! - [`RefWriter::stop`]: ends the thread (syncing both WALs) and returns the [`WriterLog`].
//!
//! What it does not: encryption, real O_DIRECT (see [`crate::walwrite`]), or a
//! per-vShard fence: a paused writer pauses every vShard, the simplest fence that is right.
//!
//! Invariants: nothing is acknowledged while the writer is parked, and its stamps are read so
//! that every ack before a pause is at or before `paused_at_ns` and every ack after it is
//! after `resumed_at_ns`; the log and the export snapshot grow by at most 32 bytes per write
//! and a run is capped at [`WRITES_MAX_COUNT`] writes; a failed WAL write ends the writer,
//! never retried.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_wire::wal::Layout;
use ferry_wire::{Lsn, VShardId};

use super::export::ExportEntry;
use super::log::{PackedAck, PauseSpan, ResumedOn, Schedule, WritePlace, WriterLog};
use super::payload::encode_payload;
use super::{monotonic_ns, RECORD_TYPE_PUT};
use crate::walwrite::{FlushStyle, Leftovers, RecordSpec, WalWriter, WriterError, WriterOptions};

/// Most writes one run may do: the log keeps 16 bytes per write, the export snapshot 16 per
/// migrating write, so at most about 160 MB.
pub const WRITES_MAX_COUNT: u64 = 5_000_000;
pub const RATE_MAX_WRITES_PER_SEC: u64 = 200_000;
/// Most writes in one group, so a writer that fell behind (after a pause) catches up in
/// bounded groups.
pub const GROUP_MAX_WRITES: u64 = 256;
pub const OTHER_VSHARDS_MAX_COUNT: usize = 64;
/// Pauses logged one by one; more are counted only.
const PAUSES_LOGGED_MAX: usize = 10_000;
/// How long [`RefWriter::pause`] watches for the writer to park before it sleeps.
const PAUSE_SPIN_MAX_NS: u64 = 200_000;
const GROUP_COMMIT_INTERVAL_MAX_US: u64 = 1_000_000;

/// The writer's configuration. [`RefWriterConfig::new`] gives `ferry demo`'s defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefWriterConfig {
    /// A new (or empty) folder: the source node's WAL.
    pub source_wal_dir: PathBuf,
    pub rate_writes_per_sec: u64,
    /// The writer idles after this many writes (at most [`WRITES_MAX_COUNT`]).
    pub writes_max_count: u64,
    pub migrating_vshard: VShardId,
    /// One write in this many goes to the migrating vShard (1: all of them).
    pub migrating_every: u64,
    /// The vShards of the other writes, in turn (must not hold the migrating one).
    pub other_vshards: Vec<VShardId>,
    pub roll_size_bytes: u64,
    /// O_DIRECT block size: each flush is rounded up to it, leaving stale leftovers (layout A)
    /// or a padding record (layout B).
    pub alignment_bytes: u32,
    pub group_commit_interval_us: u64,
    /// The NodeDB header layout of both WALs the writer writes (the source's and, after the
    /// routing flip, the target node's).
    pub layout: Layout,
}

impl RefWriterConfig {
    /// 20,000 writes/s until [`WRITES_MAX_COUNT`] or `stop`, one in four to `migrating_vshard`,
    /// the rest to three others (3, 11 and 12 unless one of them is the migrating one), 4 MiB
    /// segments, 4 KiB blocks, a flush every 200 µs at most, layout A.
    pub fn new(source_wal_dir: impl Into<PathBuf>, migrating_vshard: VShardId) -> Self {
        let other_vshards =
            [3, 11, 12, 13].into_iter().map(VShardId).filter(|v| *v != migrating_vshard).take(3).collect();
        RefWriterConfig {
            source_wal_dir: source_wal_dir.into(),
            rate_writes_per_sec: 20_000,
            writes_max_count: WRITES_MAX_COUNT,
            migrating_vshard,
            migrating_every: 4,
            other_vshards,
            roll_size_bytes: 4 << 20,
            alignment_bytes: 4096,
            group_commit_interval_us: 200,
            layout: Layout::A,
        }
    }

    fn check(&self) -> Result<(), RefWriterError> {
        let bad = |what: String| Err(RefWriterError::Config(what));
        if !(1..=RATE_MAX_WRITES_PER_SEC).contains(&self.rate_writes_per_sec) {
            return bad(format!("rate {} writes/s: give 1 to {RATE_MAX_WRITES_PER_SEC}", self.rate_writes_per_sec));
        }
        if !(1..=WRITES_MAX_COUNT).contains(&self.writes_max_count) {
            return bad(format!("writes_max_count {}: give 1 to {WRITES_MAX_COUNT}", self.writes_max_count));
        }
        if self.migrating_every == 0 {
            return bad("migrating_every must be at least 1".into());
        }
        if self.migrating_every > 1 && self.other_vshards.is_empty() {
            return bad("other_vshards is empty: name at least one, or set migrating_every to 1".into());
        }
        if self.other_vshards.len() > OTHER_VSHARDS_MAX_COUNT {
            return bad(format!("{} other vShards: at most {OTHER_VSHARDS_MAX_COUNT}", self.other_vshards.len()));
        }
        if self.other_vshards.contains(&self.migrating_vshard) {
            return bad(format!("other_vshards holds the migrating vShard {}", self.migrating_vshard));
        }
        if !self.alignment_bytes.is_power_of_two() || !(512..=1 << 20).contains(&self.alignment_bytes) {
            return bad(format!("alignment {} bytes: give a power of two from 512 to 1 MiB", self.alignment_bytes));
        }
        if self.roll_size_bytes < u64::from(self.alignment_bytes) {
            return bad(format!("roll size {} bytes is below one block", self.roll_size_bytes));
        }
        if self.group_commit_interval_us > GROUP_COMMIT_INTERVAL_MAX_US {
            return bad(format!("group commit interval {} µs: at most 1 s", self.group_commit_interval_us));
        }
        Ok(())
    }
}

/// What [`RefWriter::pause`] returns: the cut-over's `final_lsn` and `writes_paused_at_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseTicket {
    /// The last source LSN acknowledged before the writer parked (0: none yet).
    pub last_acked_lsn: Lsn,
    /// CLOCK_MONOTONIC ns, read when the writer parked.
    pub paused_at_ns: u64,
}

/// Why the writer failed or refused a call. `Config` and the state errors blame the caller,
/// `Wal` the filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RefWriterError {
    #[error("reference writer config: {0}")]
    Config(String),
    #[error(transparent)]
    Wal(#[from] WriterError),
    #[error("cannot start the reference writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the reference writer is not paused: call pause first")]
    NotPaused,
    #[error("the migrating vShard's writes already go to the target node WAL")]
    AlreadyOnTarget,
    #[error("the reference writer has ended: {reason}")]
    Ended { reason: String },
    #[error("the reference writer thread panicked")]
    Panicked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Control {
    request: Request,
    /// Some while the writer is parked; a resume clears it to let the writer go.
    parked: Option<PauseTicket>,
    /// The target node WAL, handed from `resume_on_target` to the writer thread.
    target: Option<WalWriter>,
    on_target: bool,
    resumed: Option<(u64, ResumedOn)>,
    /// Why the writer thread ended, once it has.
    ended: Option<String>,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    acked_lsn: AtomicU64,
    acked_count: AtomicU64,
    /// Times the writer has parked; [`RefWriter::pause`] spins on it before it sleeps.
    parks_count: AtomicU64,
    /// The migrating vShard's acknowledged source writes, in LSN order (the export snapshot).
    migrating: Mutex<Vec<ExportEntry>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Control>, timeout_ns: Option<u64>) -> MutexGuard<'a, Control> {
        match timeout_ns {
            None => self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner),
            Some(ns) => {
                self.changed.wait_timeout(guard, Duration::from_nanos(ns)).unwrap_or_else(PoisonError::into_inner).0
            }
        }
    }
}

/// The reference writer. See the module docs.
#[derive(Debug)]
pub struct RefWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<WriterLog, WriterError>>>,
    layout: Layout,
}

impl RefWriter {
    /// Creates the source WAL (its first segment `wal-00000000000000000001.seg`) and starts
    /// the writer thread.
    pub fn start(config: RefWriterConfig) -> Result<Self, RefWriterError> {
        config.check()?;
        let options = WriterOptions {
            layout: config.layout,
            roll_size_bytes: config.roll_size_bytes,
            alignment_bytes: config.alignment_bytes,
            flush: FlushStyle::Direct,
            leftovers: Leftovers::Stale,
            preamble: None,
        };
        let source = WalWriter::create(&config.source_wal_dir, options, Lsn(1))?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                request: Request::Run,
                parked: None,
                target: None,
                on_target: false,
                resumed: None,
                ended: None,
            }),
            changed: Condvar::new(),
            acked_lsn: AtomicU64::new(0),
            acked_count: AtomicU64::new(0),
            parks_count: AtomicU64::new(0),
            migrating: Mutex::new(Vec::new()),
        });
        let thread_shared = Arc::clone(&shared);
        let layout = config.layout;
        let thread = std::thread::Builder::new()
            .name("ferry-refwriter".into())
            .spawn(move || {
                let schedule = Schedule {
                    started_ns: monotonic_ns(),
                    rate_writes_per_sec: config.rate_writes_per_sec,
                    migrating_vshard: config.migrating_vshard,
                    migrating_every: config.migrating_every,
                    other_vshards: config.other_vshards.clone(),
                };
                let result = run(source, schedule, &config, &thread_shared);
                let mut control = thread_shared.lock();
                control.ended = Some(match &result {
                    Ok(_) => "it was stopped".to_owned(),
                    Err(e) => e.to_string(),
                });
                control.parked = None;
                thread_shared.changed.notify_all();
                result
            })
            .map_err(RefWriterError::Spawn)?;
        Ok(RefWriter { shared, thread: Some(thread), layout })
    }

    /// The last source LSN acknowledged (0: none yet): a `base_lsn` to take.
    pub fn acked_lsn(&self) -> Lsn {
        Lsn(self.shared.acked_lsn.load(Ordering::Acquire))
    }

    /// Writes acknowledged so far (source and target).
    pub fn acked_count(&self) -> u64 {
        self.shared.acked_count.load(Ordering::Acquire)
    }

    /// The migrating vShard's acknowledged source writes with LSN <= `upto`, in LSN order: the
    /// entries of a base export at `base_lsn = upto`, taken while the writer runs. Complete for
    /// any `upto` at or below [`Self::acked_lsn`].
    pub fn migrating_source_writes(&self, upto: Lsn) -> Vec<ExportEntry> {
        let list = self.shared.migrating.lock().unwrap_or_else(PoisonError::into_inner);
        let end = list.partition_point(|e| e.source_lsn <= upto);
        list.get(..end).unwrap_or_default().to_vec()
    }

    /// Parks the writer after its current group and returns the ticket; a paused writer
    /// appends nothing. Pausing a paused writer returns the same ticket.
    pub fn pause(&self) -> Result<PauseTicket, RefWriterError> {
        let mut control = self.shared.lock();
        if control.parked.is_none() && control.ended.is_none() {
            // The writer parks within one group (tens of us): watching for it saves the pause a
            // thread wake-up (writes are already stopped, the wake-up would be counted in the
            // pause). Past the spin, the loop below sleeps on the condition variable.
            control.request = Request::Pause;
            self.shared.changed.notify_all();
            let parks_before = self.shared.parks_count.load(Ordering::Acquire);
            drop(control);
            let spin_until = monotonic_ns().saturating_add(PAUSE_SPIN_MAX_NS);
            while self.shared.parks_count.load(Ordering::Acquire) == parks_before && monotonic_ns() < spin_until {
                std::hint::spin_loop();
            }
            control = self.shared.lock();
        }
        loop {
            if let Some(reason) = &control.ended {
                return Err(RefWriterError::Ended { reason: reason.clone() });
            }
            if let Some(ticket) = control.parked {
                return Ok(ticket);
            }
            control.request = Request::Pause;
            self.shared.changed.notify_all();
            control = self.shared.wait(control, None);
        }
    }

    /// Resumes a paused writer where it wrote before (a cancelled cut-over; after
    /// [`Self::resume_on_target`] the migrating vShard stays on the target). Returns
    /// `resumed_at_ns` (CLOCK_MONOTONIC), read before the writer is let go; on a writer that
    /// is not paused it does nothing and returns the time.
    pub fn resume_on_source(&self) -> u64 {
        let mut control = self.shared.lock();
        let now = monotonic_ns();
        if control.parked.take().is_some() {
            control.resumed = Some((now, ResumedOn::Source));
            control.request = Request::Run;
            self.shared.changed.notify_all();
        }
        now
    }

    /// The routing flip: creates the target node WAL in `target_node_wal_dir` (a new folder,
    /// LSNs from 1) and resumes the paused writer with the migrating vShard's writes going there.
    /// Returns `resumed_at_ns`, read once the folder exists, before the writer is let go.
    pub fn resume_on_target(&self, target_node_wal_dir: &Path) -> Result<u64, RefWriterError> {
        let mut control = self.shared.lock();
        if let Some(reason) = &control.ended {
            return Err(RefWriterError::Ended { reason: reason.clone() });
        }
        if control.parked.is_none() {
            return Err(RefWriterError::NotPaused);
        }
        if control.on_target {
            return Err(RefWriterError::AlreadyOnTarget);
        }
        let options = WriterOptions { layout: self.layout, flush: FlushStyle::Buffered, ..WriterOptions::default() };
        control.target = Some(WalWriter::create(target_node_wal_dir, options, Lsn(1))?);
        control.on_target = true;
        let now = monotonic_ns();
        control.parked = None;
        control.resumed = Some((now, ResumedOn::Target));
        control.request = Request::Run;
        self.shared.changed.notify_all();
        Ok(now)
    }

    /// Stops the writer (paused or not), syncs its WALs and returns what it acknowledged.
    pub fn stop(mut self) -> Result<WriterLog, RefWriterError> {
        match self.end() {
            Some(Ok(Ok(log))) => Ok(log),
            Some(Ok(Err(e))) => Err(RefWriterError::Wal(e)),
            Some(Err(_)) => Err(RefWriterError::Panicked),
            None => Err(RefWriterError::Ended { reason: "it was already stopped".into() }),
        }
    }

    #[allow(clippy::type_complexity)]
    fn end(&mut self) -> Option<std::thread::Result<Result<WriterLog, WriterError>>> {
        let thread = self.thread.take()?;
        self.shared.lock().request = Request::Stop;
        self.shared.changed.notify_all();
        Some(thread.join())
    }
}

impl Drop for RefWriter {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// The writer thread: groups of due writes, flushed and acknowledged, until told to stop.
fn run(
    mut source: WalWriter,
    schedule: Schedule,
    config: &RefWriterConfig,
    shared: &Shared,
) -> Result<WriterLog, WriterError> {
    let mut log = WriterLog::new(schedule);
    let mut target: Option<WalWriter> = None;
    let mut seq = 0u64;
    let mut last_source_lsn = Lsn(0);
    let mut next_flush_ns = 0u64;
    let mut group: Vec<WritePlace> = Vec::with_capacity(usize::try_from(GROUP_MAX_WRITES).unwrap_or(256));
    let interval_ns = config.group_commit_interval_us.saturating_mul(1_000);
    loop {
        {
            let control = shared.lock();
            match control.request {
                Request::Stop => break,
                Request::Pause => {
                    park(control, shared, &mut log, &mut target, last_source_lsn);
                    continue;
                }
                Request::Run => {}
            }
            let now = monotonic_ns();
            let wake_ns =
                if seq >= config.writes_max_count { None } else { Some(log.schedule.due_ns(seq).max(next_flush_ns)) };
            match wake_ns {
                None => {
                    drop(shared.wait(control, None));
                    continue;
                }
                Some(at) if at > now => {
                    drop(shared.wait(control, Some(at - now)));
                    continue;
                }
                Some(_) => {}
            }
        }
        let now = monotonic_ns();
        let first = seq;
        while seq < config.writes_max_count && seq - first < GROUP_MAX_WRITES && log.schedule.due_ns(seq) <= now {
            let vshard = log.schedule.vshard_of(seq);
            let (spec, payload) = (record_spec(config.layout, &log.schedule, seq), encode_payload(vshard, seq));
            let place = match target.as_mut() {
                Some(node_wal) if vshard == config.migrating_vshard => {
                    WritePlace::TargetNode(node_wal.append(&spec, &payload)?)
                }
                _ => WritePlace::Source(source.append(&spec, &payload)?),
            };
            group.push(place);
            seq += 1;
        }
        source.flush()?;
        if let Some(node_wal) = target.as_mut() {
            node_wal.flush()?;
        }
        let ack_ns = monotonic_ns();
        log.flushes_count += 1;
        {
            let mut migrating = shared.migrating.lock().unwrap_or_else(PoisonError::into_inner);
            for (writer_seq, place) in (first..).zip(&group) {
                if let WritePlace::Source(lsn) = *place {
                    last_source_lsn = lsn;
                    if log.schedule.vshard_of(writer_seq) == config.migrating_vshard {
                        migrating.push(ExportEntry { source_lsn: lsn, writer_seq });
                    }
                }
            }
        }
        log.acks.extend(group.drain(..).map(|place| PackedAck::new(place, ack_ns)));
        shared.acked_lsn.store(last_source_lsn.0, Ordering::Release);
        shared.acked_count.store(seq, Ordering::Release);
        next_flush_ns = ack_ns.saturating_add(interval_ns);
    }
    source.sync()?;
    if let Some(node_wal) = target.as_mut() {
        node_wal.sync()?;
    }
    log.finished_ns = monotonic_ns();
    Ok(log)
}

/// The header fields of write `writer_seq`. Layout B's extra fields are set (and ignored in
/// layout A), so a reader that misplaces them fails the CRC rather than passing by luck.
fn record_spec(layout: Layout, schedule: &Schedule, writer_seq: u64) -> RecordSpec {
    let spec = RecordSpec::new(RECORD_TYPE_PUT, schedule.vshard_of(writer_seq));
    match layout {
        Layout::A => spec,
        Layout::B => {
            RecordSpec { apply_key: writer_seq + 1, event_source: 1, commit_hlc: schedule.due_ns(writer_seq), ..spec }
        }
    }
}

/// Parks the writer: publishes the ticket, waits for a resume or a stop, and logs the pause.
fn park(
    mut control: MutexGuard<'_, Control>,
    shared: &Shared,
    log: &mut WriterLog,
    target: &mut Option<WalWriter>,
    last_source_lsn: Lsn,
) {
    // Read after the last group's ack stamp, so every earlier ack is at or before it.
    let ticket = PauseTicket { last_acked_lsn: last_source_lsn, paused_at_ns: monotonic_ns() };
    control.parked = Some(ticket);
    control.resumed = None;
    shared.parks_count.fetch_add(1, Ordering::Release);
    shared.changed.notify_all();
    // A resume clears `parked` (so a pause right after it parks anew); a stop ends the wait.
    while control.parked.is_some() && control.request != Request::Stop {
        control = shared.wait(control, None);
    }
    control.parked = None;
    if let Some(node_wal) = control.target.take() {
        *target = Some(node_wal);
    }
    let resumed = control.resumed.take();
    drop(control);
    if log.pauses.len() < PAUSES_LOGGED_MAX {
        log.pauses.push(PauseSpan {
            paused_at_ns: ticket.paused_at_ns,
            resumed_at_ns: resumed.map(|r| r.0),
            resumed_on: resumed.map(|r| r.1),
            last_acked_lsn: ticket.last_acked_lsn,
        });
    } else {
        log.pauses_unlogged_count += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::payload::decode_payload;
    use crate::walread::{read_wal_folder, FolderKind, RecordLayout};

    const VSHARD: VShardId = VShardId(7);

    fn config(dir: &Path) -> RefWriterConfig {
        RefWriterConfig { rate_writes_per_sec: 5_000, ..RefWriterConfig::new(dir.join("source-wal"), VSHARD) }
    }

    fn sleep_ms(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    #[test]
    fn pause_parks_with_the_last_acked_lsn_and_nothing_is_acked_while_paused() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RefWriter::start(config(dir.path())).unwrap();
        sleep_ms(80);
        let ticket = writer.pause().unwrap();
        assert!(ticket.last_acked_lsn > Lsn(100), "{ticket:?}");
        assert_eq!(writer.acked_lsn(), ticket.last_acked_lsn);
        let acked_count = writer.acked_count();
        sleep_ms(60);
        assert_eq!(writer.acked_lsn(), ticket.last_acked_lsn, "a paused writer acknowledges nothing");
        assert_eq!(writer.acked_count(), acked_count);
        assert_eq!(writer.pause().unwrap(), ticket, "pausing a paused writer returns its ticket");
        let resumed_at_ns = writer.resume_on_source();
        assert!(resumed_at_ns > ticket.paused_at_ns + 50_000_000);
        sleep_ms(60);
        // Pause right after a resume parks anew.
        let second = writer.pause().unwrap();
        assert!(second.paused_at_ns > resumed_at_ns && second.last_acked_lsn > ticket.last_acked_lsn);
        let log = writer.stop().unwrap();

        assert_eq!(log.acks_between(ticket.paused_at_ns, resumed_at_ns), 0);
        let before: Vec<_> = log.writes().filter(|w| w.ack_ns <= ticket.paused_at_ns).collect();
        assert_eq!(before.last().unwrap().place, WritePlace::Source(ticket.last_acked_lsn));
        assert_eq!(before.len() as u64, acked_count);
        // Writes that came due while paused waited for the resume, and their latency says so.
        let delayed: Vec<_> =
            log.writes().filter(|w| w.due_ns > ticket.paused_at_ns && w.due_ns < resumed_at_ns).collect();
        assert!(delayed.len() > 100, "{}", delayed.len());
        assert!(delayed.iter().all(|w| w.ack_ns > resumed_at_ns && w.latency_ns() > 0));
        let gap = log.longest_ack_gap().unwrap();
        assert!(gap.from_ns <= ticket.paused_at_ns && gap.to_ns > resumed_at_ns, "{gap:?}");
        assert_eq!(log.pauses().len(), 2);
        assert_eq!(log.pauses()[0].resumed_at_ns, Some(resumed_at_ns));
        assert_eq!(log.pauses()[0].resumed_on, Some(ResumedOn::Source));
        assert_eq!(log.pauses()[1].resumed_at_ns, None, "stopped while paused");
        // Everything went to the source WAL, dense from LSN 1, and it reads back whole.
        let mut lsn = 0;
        for w in log.writes() {
            lsn += 1;
            assert_eq!(w.place, WritePlace::Source(Lsn(lsn)));
        }
        let mut records = Vec::new();
        let report =
            read_wal_folder(&dir.path().join("source-wal"), FolderKind::Aligned { alignment_bytes: 4096 }, |r| {
                records.push((r.lsn, r.vshard, decode_payload(r.payload).unwrap()));
            })
            .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(records.len() as u64, log.writes_count());
        for (w, (lsn, vshard, (payload_vshard, seq))) in log.writes().zip(records) {
            assert_eq!(
                (w.place, w.vshard, w.vshard, w.writer_seq),
                (WritePlace::Source(lsn), vshard, payload_vshard, seq)
            );
        }
    }

    #[test]
    fn resume_on_target_moves_the_vshard_to_the_target_node_wal() {
        let dir = tempfile::tempdir().unwrap();
        let node_wal = dir.path().join("target/node-wal");
        let writer = RefWriter::start(config(dir.path())).unwrap();
        assert!(matches!(writer.resume_on_target(&node_wal), Err(RefWriterError::NotPaused)));
        sleep_ms(60);
        let ticket = writer.pause().unwrap();
        let before = writer.migrating_source_writes(ticket.last_acked_lsn);
        assert!(!before.is_empty());
        let resumed_at_ns = writer.resume_on_target(&node_wal).unwrap();
        sleep_ms(80);
        writer.pause().unwrap();
        assert!(matches!(writer.resume_on_target(&node_wal), Err(RefWriterError::AlreadyOnTarget)));
        writer.resume_on_source();
        sleep_ms(20);
        let log = writer.stop().unwrap();

        assert_eq!(log.acks_between(ticket.paused_at_ns, resumed_at_ns), 0);
        assert_eq!(log.migrating_source_writes(Lsn(u64::MAX)), before, "no vShard write reached the source after");
        let mut target_lsn = 0;
        let mut others_after = 0;
        for w in log.writes().filter(|w| w.ack_ns > resumed_at_ns) {
            match (w.vshard == VSHARD, w.place) {
                (true, WritePlace::TargetNode(lsn)) => {
                    target_lsn += 1;
                    assert_eq!(lsn, Lsn(target_lsn), "the node WAL has its own dense LSNs");
                }
                (false, WritePlace::Source(lsn)) => {
                    assert!(lsn > ticket.last_acked_lsn);
                    others_after += 1;
                }
                other => panic!("write {} went to {other:?}", w.writer_seq),
            }
        }
        assert!(target_lsn > 20 && others_after > 60, "{target_lsn} {others_after}");
        let mut seqs = Vec::new();
        let report = read_wal_folder(&node_wal, FolderKind::Dense, |r| {
            let (vshard, seq) = decode_payload(r.payload).unwrap();
            assert_eq!((r.vshard, vshard), (VSHARD, VSHARD));
            seqs.push((r.lsn, seq));
        })
        .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let logged: Vec<(Lsn, u64)> = log
            .writes()
            .filter_map(|w| match w.place {
                WritePlace::TargetNode(lsn) => Some((lsn, w.writer_seq)),
                WritePlace::Source(_) => None,
            })
            .collect();
        assert_eq!(seqs, logged);
        assert_eq!(log.pauses()[0].resumed_on, Some(ResumedOn::Target));
    }

    #[test]
    fn layout_b_writes_read_back_from_both_wals_with_their_padding() {
        let dir = tempfile::tempdir().unwrap();
        let node_wal = dir.path().join("target/node-wal");
        let config = RefWriterConfig { layout: Layout::B, roll_size_bytes: 64 << 10, ..config(dir.path()) };
        let writer = RefWriter::start(config).unwrap();
        sleep_ms(60);
        writer.pause().unwrap();
        writer.resume_on_target(&node_wal).unwrap();
        sleep_ms(60);
        let log = writer.stop().unwrap();

        let mut source = Vec::new();
        let report =
            read_wal_folder(&dir.path().join("source-wal"), FolderKind::Aligned { alignment_bytes: 4096 }, |r| {
                assert_eq!(r.layout, RecordLayout::B);
                source.push((WritePlace::Source(r.lsn), decode_payload(r.payload).unwrap().1));
            })
            .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.segments_count > 1 && report.layout_b_segments_count == report.segments_count, "{report:?}");
        assert!(report.padding_count > 0, "O_DIRECT-style flushes are padded in layout B");
        let mut node = Vec::new();
        let report = read_wal_folder(&node_wal, FolderKind::Dense, |r| {
            assert_eq!(r.layout, RecordLayout::B);
            node.push((WritePlace::TargetNode(r.lsn), decode_payload(r.payload).unwrap().1));
        })
        .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!node.is_empty());
        let mut logged: Vec<(WritePlace, u64)> = log.writes().map(|w| (w.place, w.writer_seq)).collect();
        let mut read: Vec<(WritePlace, u64)> = source.into_iter().chain(node).collect();
        logged.sort_by_key(|w| w.1);
        read.sort_by_key(|w| w.1);
        assert_eq!(read, logged, "every acknowledged write, once, where the log says");
    }

    #[test]
    fn a_writer_that_wrote_its_count_idles_and_still_pauses_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RefWriter::start(RefWriterConfig { writes_max_count: 10, ..config(dir.path()) }).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while writer.acked_count() < 10 && std::time::Instant::now() < deadline {
            sleep_ms(5);
        }
        sleep_ms(10);
        let ticket = writer.pause().unwrap();
        assert_eq!(ticket.last_acked_lsn, Lsn(10));
        assert_eq!(writer.migrating_source_writes(Lsn(10)).len(), 2, "writes 3 and 7");
        let log = writer.stop().unwrap();
        assert_eq!(log.writes_count(), 10);
        assert!(log.flushes_count() >= 1);
    }

    #[test]
    fn bad_configs_and_a_used_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());
        let cases = [
            RefWriterConfig { rate_writes_per_sec: 0, ..base.clone() },
            RefWriterConfig { writes_max_count: WRITES_MAX_COUNT + 1, ..base.clone() },
            RefWriterConfig { migrating_every: 0, ..base.clone() },
            RefWriterConfig { other_vshards: vec![VSHARD], ..base.clone() },
            RefWriterConfig { other_vshards: Vec::new(), ..base.clone() },
            RefWriterConfig { alignment_bytes: 1000, ..base.clone() },
            RefWriterConfig { roll_size_bytes: 100, ..base.clone() },
        ];
        for case in cases {
            assert!(matches!(RefWriter::start(case.clone()), Err(RefWriterError::Config(_))), "{case:?}");
        }
        assert_eq!(
            RefWriterConfig::new("x", VShardId(3)).other_vshards,
            vec![VShardId(11), VShardId(12), VShardId(13)]
        );
        let first = RefWriter::start(RefWriterConfig { writes_max_count: 1, ..base.clone() }).unwrap();
        assert!(matches!(RefWriter::start(base), Err(RefWriterError::Wal(_))), "the source WAL exists");
        first.stop().unwrap();
    }
}
