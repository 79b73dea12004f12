//! One tail thread per WAL folder, feeding every migration from that node.
//!
//! What it does: [`subscribe`] registers a migration (its vShard, the first LSN it needs, its
//! own held links and `max_held_wal_bytes`, its queue) with a process-wide registry keyed by
//! the canonical WAL folder. The first subscription of a folder starts the folder's one
//! thread; the thread stops when the last subscription leaves, and a later subscription
//! starts a new one. The thread runs one shared [`FolderTail`]: each record it reads is
//! offered to every *live* subscription, which keeps its vShard's records from its own start
//! on and batches them. So each byte of the folder is read once, however many migrations
//! follow it. [`folder_stats`] counts threads started and bytes walked per folder.
//!
//! A subscription that cannot take the shared tail's records *catches up*, on the same
//! thread, with a private cursor over its own held links, and rejoins the shared tail once
//! its next LSN reaches the shared tail's position:
//! - one that starts below the shared tail's position (a reconnect resumes from the target's
//!   durable LSN; a migration starts from an older base than the running ones);
//! - one whose queue is full (see "slow subscriptions");
//! - one whose cursor settings (layout, alignment) differ from the thread's: it reads
//!   privately to its end (same thread, its own reads); a warning says so.
//!
//! Slow subscriptions: each has a bounded queue ([`SubscribeRequest::queue_max_bytes`] and
//! [`QUEUE_BATCHES_MAX`] batches) plus one sealed batch and one batch being filled (each about
//! `WAL_BATCH_TARGET_BYTES`). The thread never waits on a queue. A live subscription with no
//! room for its next record leaves the shared tail at that record's LSN and catches up later
//! from its own held links, which hold every segment from that LSN on. So a slow target
//! neither stalls the other migrations nor loses a record; it costs a second read of the
//! bytes it fell behind on. Its bound stays `max_held_wal_bytes`: a migration whose target
//! does not keep up fails with that error, as with a tail of its own. The alternative, a
//! shared tail at the pace of the slowest that fails it beyond a bound, was rejected: it adds
//! one slow target's lag to every migration of the node and invents a second limit next to
//! `max_held_wal_bytes`.
//!
//! Turns: the shared tail walks at most [`SHARED_STEP_BYTES_MAX`] of records per turn, each
//! catching-up subscription at most [`CATCH_UP_STEP_BYTES_MAX`] (twice as much, so a
//! subscription with room closes the gap whenever the writer leaves headroom).
//!
//! Where the shared tail reads: through links of its own, `<wal_dir>/.ferry-held/.tail-<pid>-<n>/`
//! (a migration id cannot start with a dot), made before the first read, at every poll
//! interval and as soon as the folder's notice says a file was created or moved in (so a
//! segment the database just rolled to is read at once, not up to a poll interval later:
//! a fence's drain met that wait at every roll), and dropped behind the tail, so a segment
//! the database deletes before the tail reaches it is still read. Such folders left by processes that are gone are removed when a
//! thread starts. It starts at the first subscription's LSN, or at the folder's oldest
//! segment when the database already deleted the one holding it (that subscription then
//! catches up from its own links).
//!
//! Errors: corruption or an I/O error met by the shared tail fails every subscription of the
//! folder with the same message (naming the segment file and the byte offset) and stops the
//! thread. An error met by a private cursor, a holder over its bound or a record too large to
//! send fails that subscription only.
//!
//! What it does not: talk to the target ([`super::walsend::stream`] does) or decide which
//! records belong to a vShard (`ferry_wire::wal::Selection`).
//!
//! Invariants: a subscription gets each of its vShard's records from its start LSN on exactly
//! once, in LSN order: a record is taken only at or above the subscription's `next_lsn`, which
//! only grows, and a subscription that leaves the shared tail resumes at exactly the LSN it
//! did not take. Memory per subscription: its queue, two batches and, while catching up, one
//! segment buffer; the thread's own: one segment buffer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_wire::limits::WAL_BATCH_TARGET_BYTES;
use ferry_wire::wal::{CursorConfig, Selection};
use ferry_wire::walstream::{self, WalBatchRecord};
use ferry_wire::{Lsn, MigrationId, VShardId};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::walsend::{list_segments, Holder, OutgoingBatch, TailEvent, TailShared, WalSourceConfig, HELD_DIR_NAME};
use super::TransferError;
use crate::wal::notice::AppendNotice;
use crate::wal::tail::{FolderTail, TailRecordRef};

/// Most batches queued for one subscription (one more slot stays free for its last event).
pub const QUEUE_BATCHES_MAX: usize = 1024;
/// Record bytes the shared tail walks before catching-up subscriptions get their turn.
pub const SHARED_STEP_BYTES_MAX: u64 = 8 << 20;
/// Record bytes one catching-up subscription walks per turn.
pub const CATCH_UP_STEP_BYTES_MAX: u64 = 2 * SHARED_STEP_BYTES_MAX;
/// Subscriptions waiting for the thread to take them in.
const JOINING_MAX_COUNT: usize = 256;
/// Folders whose counters are kept; idle ones beyond it are forgotten.
const FOLDERS_MAX_COUNT: usize = 256;
/// Capacity a new batch body starts with (it grows to about `WAL_BATCH_TARGET_BYTES`).
const BATCH_START_CAPACITY_BYTES: usize = 64 << 10;
/// Prefix of the shared tail's link folder inside `.ferry-held`.
const TAIL_DIR_PREFIX: &str = ".tail-";

/// What one migration asks of its WAL folder's tail.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub config: WalSourceConfig,
    pub migration_id: MigrationId,
    pub vshard_id: VShardId,
    /// The first LSN it needs (the first one not durable on the target).
    pub from_lsn: Lsn,
    /// Record bytes its queue may hold ([`super::walsend::QUEUE_MAX_BYTES`] for a migration);
    /// a batch always goes into an empty queue.
    pub queue_max_bytes: u64,
}

/// Counters of one WAL folder's tail in this process (see [`folder_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FolderStats {
    pub tail_threads_started_count: u64,
    /// Record bytes (headers and payloads) the shared tails walked.
    pub shared_read_bytes: u64,
    /// Record bytes private catch-up cursors walked.
    pub catch_up_read_bytes: u64,
    /// Times a live subscription left the shared tail because its queue was full.
    pub detached_count: u64,
    /// Subscriptions now following the folder.
    pub subscribers_count: u64,
    /// Whether the folder's thread runs now.
    pub tail_running: bool,
}

#[derive(Debug, Default)]
struct Counters {
    threads_started: AtomicU64,
    shared_read_bytes: AtomicU64,
    catch_up_read_bytes: AtomicU64,
    detached: AtomicU64,
    subscribers: AtomicU64,
}

/// A registry entry: the folder's counters and, while its thread runs, the way in.
#[derive(Debug)]
struct Folder {
    counters: Arc<Counters>,
    joining: Option<std_mpsc::SyncSender<Joining>>,
}

static FOLDERS: LazyLock<Mutex<BTreeMap<PathBuf, Folder>>> = LazyLock::new(Mutex::default);
/// Numbers the shared tails' link folders of this process.
static TAIL_DIRS_COUNT: AtomicU64 = AtomicU64::new(0);

fn folders() -> MutexGuard<'static, BTreeMap<PathBuf, Folder>> {
    FOLDERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A subscription on its way to the thread.
#[derive(Debug)]
struct Joining {
    request: SubscribeRequest,
    shared: Arc<TailShared>,
    events: mpsc::Sender<TailEvent>,
}

/// Follows `request.config.dir` for one migration from `request.from_lsn`: its batches, then
/// `Reached` (at `until_lsn`) or `Failed`, arrive on the returned receiver. It leaves when
/// `shared.stop` is set or the receiver is dropped. A new subscription with the migration id
/// of a running one replaces it.
pub fn subscribe(
    request: SubscribeRequest,
    shared: Arc<TailShared>,
) -> Result<mpsc::Receiver<TailEvent>, TransferError> {
    let dir = &request.config.dir;
    let folder = std::fs::canonicalize(dir)
        .map_err(|e| TransferError::Local(format!("cannot open the WAL folder {}: {e}", dir.display())))?;
    let (events_tx, events) = mpsc::channel(QUEUE_BATCHES_MAX + 1);
    let mut joining = Joining { request, shared, events: events_tx };
    let mut registry = folders();
    let entry = registry.entry(folder.clone()).or_insert_with(|| Folder { counters: Arc::default(), joining: None });
    if let Some(tx) = &entry.joining {
        match tx.try_send(joining) {
            Ok(()) => return Ok(events),
            Err(std_mpsc::TrySendError::Full(_)) => {
                return Err(TransferError::Local(format!(
                    "over {JOINING_MAX_COUNT} migrations are joining the tail of {} at once: retry",
                    folder.display()
                )))
            }
            // The thread died (a panic) without leaving the registry: start another.
            Err(std_mpsc::TrySendError::Disconnected(back)) => joining = back,
        }
    }
    let (tx, rx) = std_mpsc::sync_channel(JOINING_MAX_COUNT);
    let counters = entry.counters.clone();
    let thread_folder = folder.clone();
    let thread_counters = counters.clone();
    std::thread::Builder::new()
        .name("ferry-waltail".into())
        .spawn(move || run(thread_folder, joining, rx, thread_counters))
        .map_err(|e| TransferError::Local(format!("cannot start a WAL tail thread: {e}")))?;
    counters.threads_started.fetch_add(1, Ordering::Relaxed);
    entry.joining = Some(tx);
    if registry.len() > FOLDERS_MAX_COUNT {
        let idle: Vec<PathBuf> = registry.iter().filter(|(_, f)| f.joining.is_none()).map(|(k, _)| k.clone()).collect();
        for key in idle.into_iter().take(registry.len() - FOLDERS_MAX_COUNT) {
            registry.remove(&key);
        }
    }
    Ok(events)
}

/// The counters of the folder `dir` (`None`: never tailed by this process, or forgotten).
pub fn folder_stats(dir: &Path) -> Option<FolderStats> {
    let folder = std::fs::canonicalize(dir).ok()?;
    let registry = folders();
    let entry = registry.get(&folder)?;
    let c = &entry.counters;
    Some(FolderStats {
        tail_running: entry.joining.is_some(),
        tail_threads_started_count: c.threads_started.load(Ordering::Relaxed),
        shared_read_bytes: c.shared_read_bytes.load(Ordering::Relaxed),
        catch_up_read_bytes: c.catch_up_read_bytes.load(Ordering::Relaxed),
        detached_count: c.detached.load(Ordering::Relaxed),
        subscribers_count: c.subscribers.load(Ordering::Relaxed),
    })
}

/// The thread of one folder.
fn run(folder: PathBuf, first: Joining, joining: std_mpsc::Receiver<Joining>, counters: Arc<Counters>) {
    let mut hub = match Hub::start(&folder, &first.request, counters) {
        Ok(hub) => hub,
        Err(e) => {
            let message = e.to_string();
            let _ = first.events.try_send(TailEvent::Failed(e));
            leave_failed(&folder, &joining, &message);
            return;
        }
    };
    hub.add(first);
    if let Err(message) = hub.run(&joining) {
        tracing::error!(dir = %folder.display(), "the WAL tail stopped: {message}");
        leave_failed(&folder, &joining, &message);
        for sub in &mut hub.subs {
            sub.fail(TransferError::Local(message.clone()));
        }
        hub.sweep();
    }
    let _ = std::fs::remove_dir_all(hub.holder.dir());
}

/// Takes the folder's thread out of the registry and fails the subscriptions still joining.
fn leave_failed(folder: &Path, joining: &std_mpsc::Receiver<Joining>, message: &str) {
    let mut registry = folders();
    if let Some(entry) = registry.get_mut(folder) {
        entry.joining = None;
    }
    for late in joining.try_iter() {
        let _ = late.events.try_send(TailEvent::Failed(TransferError::Local(message.to_owned())));
    }
}

/// Removes shared-tail link folders of processes that are gone.
fn remove_stale_tail_dirs(folder: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let held = folder.join(HELD_DIR_NAME);
    let Ok(entries) = std::fs::read_dir(&held) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(TAIL_DIR_PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The shared tail and its subscriptions.
struct Hub {
    folder: PathBuf,
    cursor_config: CursorConfig,
    /// The LSN the shared tail returns records from.
    start: Lsn,
    /// The shared tail's own links.
    holder: Holder,
    tail: FolderTail,
    notice: AppendNotice,
    subs: Vec<Subscriber>,
    counters: Arc<Counters>,
    refreshed_at: Instant,
    /// The notice saw a file created or moved in: link it before the next read.
    refresh_due: bool,
    /// The first subscription's [`WalSourceConfig::poll_interval`].
    poll_interval: Duration,
}

impl Hub {
    fn start(folder: &Path, first: &SubscribeRequest, counters: Arc<Counters>) -> Result<Hub, TransferError> {
        remove_stale_tail_dirs(folder);
        // The watch goes on the folder the database writes to (writes through the held links'
        // folder raise no event there), before the first read, so no append is missed.
        let (notice, watch_error) = AppendNotice::watch(folder);
        if let Some(e) = watch_error {
            tracing::warn!(dir = %folder.display(), "no inotify watch on the WAL folder ({e}): polling every {:?}", first.config.poll_interval);
        }
        let listing = list_segments(folder)?;
        let from = first.from_lsn;
        // The segment holding `from` was deleted: start at the oldest one there is.
        let start = match listing.first() {
            Some(oldest) if oldest.first_lsn > from => oldest.first_lsn,
            _ => from,
        };
        let n = TAIL_DIRS_COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = folder.join(HELD_DIR_NAME).join(format!("{TAIL_DIR_PREFIX}{}-{n}", std::process::id()));
        let cursor_config = cursor_config(&first.config);
        // No file is touched before the first poll.
        let tail = FolderTail::new(&dir, cursor_config, Some(start))
            .map_err(|e| TransferError::Local(format!("source WAL: {e}")))?;
        // The shared tail's links are bounded by the folder itself: it never waits.
        let mut holder = Holder::at(folder, dir, u64::MAX)?;
        if let Err(e) = holder.refresh_with(&listing, start) {
            let _ = std::fs::remove_dir_all(holder.dir());
            return Err(e);
        }
        Ok(Hub {
            folder: folder.to_path_buf(),
            cursor_config,
            start,
            holder,
            tail,
            notice,
            subs: Vec::new(),
            counters,
            refreshed_at: Instant::now(),
            refresh_due: false,
            poll_interval: first.config.poll_interval,
        })
    }

    /// The first LSN the shared tail has not walked yet.
    fn position(&self) -> Lsn {
        self.tail.cursor().next_lsn().map_or(self.start, |next| next.max(self.start))
    }

    /// Serves until the last subscription leaves (`Ok`) or the shared tail fails (`Err`,
    /// the message for every subscription).
    fn run(&mut self, joining: &std_mpsc::Receiver<Joining>) -> Result<(), String> {
        loop {
            while let Ok(next) = joining.try_recv() {
                self.add(next);
            }
            self.sweep();
            if self.subs.is_empty() {
                // Under the registry's lock: a subscription sent meanwhile is taken in, and
                // none can be sent to a thread that is leaving.
                let mut registry = folders();
                let late: Vec<Joining> = joining.try_iter().collect();
                if late.is_empty() {
                    if let Some(entry) = registry.get_mut(&self.folder) {
                        entry.joining = None;
                    }
                    return Ok(());
                }
                drop(registry);
                for next in late {
                    self.add(next);
                }
                continue;
            }
            if self.refresh_due || self.refreshed_at.elapsed() >= self.poll_interval {
                self.refresh()?;
            }
            let shared_caught_up = self.shared_step()?;
            let mut idle = shared_caught_up;
            let position = self.position();
            for sub in &mut self.subs {
                if sub.catching_up() && sub.catch_up_step(position, &self.counters) {
                    idle = false;
                }
            }
            for sub in &mut self.subs {
                sub.pump(shared_caught_up);
            }
            if idle {
                match self.notice.wait(self.poll_interval) {
                    Ok(noticed) => self.refresh_due |= noticed.created,
                    Err(e) => {
                        tracing::warn!(dir = %self.folder.display(), "the WAL folder's inotify watch failed ({e}): polling every {:?}", self.poll_interval);
                    }
                }
            }
        }
    }

    /// Takes a subscription in: links its segments, then reads for it from the shared tail
    /// or, when it starts behind it, with a cursor of its own.
    fn add(&mut self, joining: Joining) {
        let Joining { request, shared, events } = joining;
        for old in self.subs.iter_mut().filter(|s| s.id == request.migration_id) {
            // Its links are the new one's: it must not release any of them from now on.
            old.gone = true;
        }
        self.sweep();
        let config = &request.config;
        let linked = list_segments(&self.folder).and_then(|listing| {
            let mut holder = Holder::new(&config.dir, &request.migration_id, config.max_held_wal_bytes)?;
            holder.refresh_with(&listing, request.from_lsn)?;
            Ok(holder)
        });
        let holder = match linked {
            Ok(holder) => holder,
            Err(e) => {
                let _ = events.try_send(TailEvent::Failed(e));
                return;
            }
        };
        shared.held_bytes.store(holder.held_bytes(), Ordering::Relaxed);
        let sub_cursor = cursor_config(config);
        let private = sub_cursor != self.cursor_config;
        if private {
            tracing::warn!(
                dir = %self.folder.display(),
                migration = %request.migration_id,
                "this migration reads the WAL as {:?} with {}-byte alignment, the folder's tail as {:?} with {}: it reads the folder on its own",
                sub_cursor.layout, sub_cursor.alignment_bytes, self.cursor_config.layout, self.cursor_config.alignment_bytes
            );
        }
        let reader = if !private && request.from_lsn >= self.position() { Reader::Live } else { Reader::CatchUp(None) };
        self.counters.subscribers.fetch_add(1, Ordering::Relaxed);
        self.subs.push(Subscriber {
            id: request.migration_id,
            cursor_config: sub_cursor,
            private,
            reader,
            gone: false,
            out: Outlet {
                selection: Selection::new(request.vshard_id),
                until: config.until_lsn,
                queue_max_bytes: request.queue_max_bytes,
                shared,
                events,
                holder,
                next_lsn: request.from_lsn,
                batch: BatchBuilder::default(),
                pending: None,
                done: config.until_lsn.is_some_and(|until| request.from_lsn > until),
                caught_up: false,
            },
        });
    }

    /// Drops subscriptions that failed, finished, stopped or whose receiver is gone.
    fn sweep(&mut self) {
        let counters = &self.counters;
        self.subs.retain(|sub| {
            let keep = !sub.gone && !sub.out.shared.stop.load(Ordering::Relaxed) && !sub.out.events.is_closed();
            if !keep {
                counters.subscribers.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    /// Links new segments for the shared tail and every subscription (one listing for all),
    /// and drops links no longer needed.
    fn refresh(&mut self) -> Result<(), String> {
        let listing = list_segments(&self.folder).map_err(|e| e.to_string())?;
        let position = self.position();
        self.holder.refresh_with(&listing, position).map_err(|e| e.to_string())?;
        self.holder.release(self.tail.segment_name(), Lsn(u64::MAX));
        for sub in self.subs.iter_mut().filter(|s| !s.gone) {
            let current = match &sub.reader {
                Reader::Live => self.tail.segment_name(),
                Reader::CatchUp(tail) => tail.as_ref().and_then(|t| t.segment_name()),
            };
            if let Err(e) = sub.out.refresh(&listing, current) {
                sub.fail(e);
            }
        }
        self.refreshed_at = Instant::now();
        self.refresh_due = false;
        Ok(())
    }

    /// Walks the shared tail for one turn, offering each record to every live subscription.
    /// Whether it caught up with what is written.
    fn shared_step(&mut self) -> Result<bool, String> {
        let mut walked_bytes = 0u64;
        let mut caught_up = false;
        while walked_bytes < SHARED_STEP_BYTES_MAX {
            let record = match self.tail.poll_ref() {
                Ok(Some(record)) => record,
                Ok(None) => {
                    caught_up = true;
                    break;
                }
                Err(e) => return Err(format!("source WAL: {e}")),
            };
            walked_bytes = walked_bytes.saturating_add(record.bytes.len() as u64);
            for sub in self.subs.iter_mut().filter(|s| !s.gone && matches!(s.reader, Reader::Live)) {
                match sub.out.take(&record) {
                    Ok(true) => {}
                    Ok(false) => {
                        sub.reader = Reader::CatchUp(None);
                        self.counters.detached.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => sub.fail(e),
                }
            }
        }
        self.counters.shared_read_bytes.fetch_add(walked_bytes, Ordering::Relaxed);
        Ok(caught_up)
    }
}

fn cursor_config(config: &WalSourceConfig) -> CursorConfig {
    CursorConfig { layout: config.layout, alignment_bytes: config.alignment_bytes, ..CursorConfig::default() }
}

/// Where a subscription's records come from.
enum Reader {
    Live,
    /// Its own cursor over its held links (opened at its `next_lsn` when first needed).
    CatchUp(Option<Box<FolderTail>>),
}

/// One migration following the folder.
struct Subscriber {
    id: MigrationId,
    cursor_config: CursorConfig,
    /// Its cursor settings differ from the shared tail's: it never joins it.
    private: bool,
    reader: Reader,
    /// Failed, finished or replaced: dropped at the next sweep.
    gone: bool,
    out: Outlet,
}

impl Subscriber {
    fn catching_up(&self) -> bool {
        !self.gone && matches!(self.reader, Reader::CatchUp(_))
    }

    fn fail(&mut self, e: TransferError) {
        if !self.gone {
            let _ = self.out.events.try_send(TailEvent::Failed(e));
            self.gone = true;
        }
    }

    /// One turn of its own cursor. Whether it walked anything.
    fn catch_up_step(&mut self, position: Lsn, counters: &Counters) -> bool {
        if self.out.done || !self.out.send_pending() {
            return false;
        }
        if matches!(self.reader, Reader::CatchUp(None)) {
            match FolderTail::new(self.out.holder.dir(), self.cursor_config, Some(self.out.next_lsn)) {
                Ok(tail) => self.reader = Reader::CatchUp(Some(Box::new(tail))),
                Err(e) => {
                    self.fail(TransferError::Local(format!("source WAL: {e}")));
                    return false;
                }
            }
        }
        let Reader::CatchUp(Some(tail)) = &mut self.reader else { return false };
        let mut walked_bytes = 0u64;
        let mut rejoin = false;
        let mut reopen = false;
        let mut failed = None;
        self.out.caught_up = false;
        while walked_bytes < CATCH_UP_STEP_BYTES_MAX {
            let record = match tail.poll_ref() {
                Ok(Some(record)) => record,
                Ok(None) => {
                    self.out.caught_up = true;
                    rejoin = !self.private && self.out.next_lsn >= position;
                    break;
                }
                Err(e) => {
                    failed = Some(TransferError::Local(format!("source WAL: {e}")));
                    break;
                }
            };
            walked_bytes = walked_bytes.saturating_add(record.bytes.len() as u64);
            match self.out.take(&record) {
                Ok(true) => {}
                // Not taken (the turn starts with room, so this should not happen): read it
                // again next turn rather than lose it.
                Ok(false) => {
                    reopen = true;
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if self.out.pending.is_some() || self.out.done {
                break;
            }
            if !self.private && self.out.next_lsn >= position {
                rejoin = true;
                break;
            }
        }
        counters.catch_up_read_bytes.fetch_add(walked_bytes, Ordering::Relaxed);
        if let Some(e) = failed {
            self.fail(e);
        } else if rejoin {
            self.reader = Reader::Live;
        } else if reopen {
            self.reader = Reader::CatchUp(None);
        }
        walked_bytes > 0
    }

    /// Hands over what is ready: a sealed batch when there is room, the batch being filled
    /// once its reader caught up, and `Reached` after the last batch.
    fn pump(&mut self, shared_caught_up: bool) {
        if self.gone {
            return;
        }
        let caught_up = match self.reader {
            Reader::Live => shared_caught_up,
            Reader::CatchUp(_) => self.out.caught_up,
        };
        self.out.send_pending();
        if caught_up || self.out.done {
            self.out.seal();
            self.out.send_pending();
        }
        if self.out.done && self.out.pending.is_none() && self.out.batch.last_lsn.is_none() {
            // The slot kept free in the queue takes it.
            let _ = self.out.events.try_send(TailEvent::Reached);
            self.gone = true;
        }
    }
}

/// A subscription's selection, batches, queue and held links.
struct Outlet {
    selection: Selection,
    until: Option<Lsn>,
    queue_max_bytes: u64,
    shared: Arc<TailShared>,
    events: mpsc::Sender<TailEvent>,
    holder: Holder,
    /// Every record below it was offered to this subscription.
    next_lsn: Lsn,
    batch: BatchBuilder,
    /// A sealed batch waiting for room in the queue.
    pending: Option<OutgoingBatch>,
    /// Every record up to `until` was taken.
    done: bool,
    /// Its private cursor found nothing more in the last turn.
    caught_up: bool,
}

impl Outlet {
    /// Takes one record if it is this subscription's next and its vShard's. `false` when it
    /// has no room for it (nothing changed: offer it again later).
    fn take(&mut self, record: &TailRecordRef<'_>) -> Result<bool, TransferError> {
        let lsn = record.header.lsn;
        if self.done || lsn < self.next_lsn {
            return Ok(true);
        }
        if self.until.is_some_and(|until| lsn > until) {
            self.done = true;
            return Ok(true);
        }
        if self.selection.keeps(&record.header) {
            let outgoing =
                WalBatchRecord { lsn, source_preamble: record.preamble.map(|p| p.encode()), bytes: record.bytes };
            let body_len = self.batch.body.len().saturating_add(walstream::encoded_len_bytes(&outgoing));
            if self.batch.last_lsn.is_some() && body_len > WAL_BATCH_TARGET_BYTES {
                if !self.send_pending() {
                    return Ok(false);
                }
                self.seal();
                self.send_pending();
            }
            if !walstream::push(&mut self.batch.body, &outgoing) {
                return Err(TransferError::Local(format!("WAL record {lsn} is too large to send")));
            }
            self.batch.note(record.segment, lsn);
            self.shared.source_lsn.store(lsn.0, Ordering::Release);
        }
        self.next_lsn = Lsn(lsn.0.saturating_add(1));
        self.shared.note_scanned(lsn);
        if self.until.is_some_and(|until| self.next_lsn > until) {
            self.done = true;
        }
        Ok(true)
    }

    /// Moves the batch being filled to `pending` (when that is free), telling the holder
    /// which segments its records came from first.
    fn seal(&mut self) {
        self.note_segments();
        if self.pending.is_some() {
            return;
        }
        let Some(last_lsn) = self.batch.last_lsn.take() else { return };
        let body = std::mem::replace(&mut self.batch.body, Vec::with_capacity(BATCH_START_CAPACITY_BYTES));
        let records_count = std::mem::take(&mut self.batch.records_count);
        self.pending = Some(OutgoingBatch { body, last_lsn, records_count });
    }

    /// Before anything can be released: the holder keeps a segment until its last selected
    /// record is durable.
    fn note_segments(&mut self) {
        for (name, lsn) in self.batch.notes.drain(..) {
            self.holder.note_selected(&name, lsn);
        }
    }

    /// Queues the sealed batch if there is room. Whether `pending` is free afterwards.
    fn send_pending(&mut self) -> bool {
        let Some(batch) = self.pending.take() else { return true };
        let len_bytes = batch.body.len() as u64;
        let queued_bytes = self.shared.queued_bytes.load(Ordering::Relaxed);
        // One slot stays free for the last event (Reached or Failed).
        let room = self.events.capacity() > 1
            && (queued_bytes == 0 || queued_bytes.saturating_add(len_bytes) <= self.queue_max_bytes);
        if !room {
            self.pending = Some(batch);
            return false;
        }
        self.shared.queued_bytes.fetch_add(len_bytes, Ordering::Relaxed);
        match self.events.try_send(TailEvent::Batch(batch)) {
            Ok(()) => true,
            Err(TrySendError::Full(event)) => {
                self.shared.queued_bytes.fetch_sub(len_bytes, Ordering::Relaxed);
                if let TailEvent::Batch(batch) = event {
                    self.pending = Some(batch);
                }
                false
            }
            // The migration stopped: the sweep drops it.
            Err(TrySendError::Closed(_)) => true,
        }
    }

    /// Links new segments from `next_lsn` on, drops those behind `current` (the segment its
    /// reader is in) whose selected records are durable, publishes the held bytes.
    fn refresh(
        &mut self,
        listing: &[super::walsend::SegmentEntry],
        current: Option<&str>,
    ) -> Result<(), TransferError> {
        self.note_segments();
        self.holder.refresh_with(listing, self.next_lsn)?;
        self.holder.release(current, Lsn(self.shared.durable_lsn.load(Ordering::Relaxed)));
        self.shared.held_bytes.store(self.holder.held_bytes(), Ordering::Relaxed);
        Ok(())
    }
}

/// The batch being filled, and the last selected LSN per source segment not yet told to the
/// holder.
#[derive(Debug, Default)]
struct BatchBuilder {
    body: Vec<u8>,
    last_lsn: Option<Lsn>,
    records_count: u64,
    /// (segment, last selected LSN read from it) since the last note to the holder.
    notes: Vec<(String, Lsn)>,
}

impl BatchBuilder {
    /// Counts a record pushed to the body, read from `segment`.
    fn note(&mut self, segment: &str, lsn: Lsn) {
        self.last_lsn = Some(lsn);
        self.records_count += 1;
        match self.notes.last_mut() {
            Some((name, last)) if name == segment => *last = lsn,
            _ => self.notes.push((segment.to_owned(), lsn)),
        }
    }
}

#[cfg(test)]
#[path = "waltail_hub_tests.rs"]
mod tests;
