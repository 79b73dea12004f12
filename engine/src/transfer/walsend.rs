//! The source side of the WAL stream: holds the WAL segments a migration still needs and
//! streams its vShard's records to the target.
//!
//! What it does: the records come from the WAL folder's one tail thread
//! ([`super::waltail_hub`]), which every migration from that folder subscribes to. Each
//! migration keeps a [`Holder`]: every segment from the one holding its next LSN on is
//! linked into `<wal_dir>/.ferry-held/<migration_id>/` as soon as it is seen, so the database
//! may delete or truncate its segments during a long base copy without ferry losing a
//! record. A link is dropped once the migration's reader is past its segment and every
//! selected record read from it is durable on the target. Held bytes are bounded by
//! `max_held_wal_bytes`: over it the migration fails with a clear error. The hub copies each
//! selected record once, from the tail's segment buffer into a WAL batch body (up to
//! [`WAL_BATCH_TARGET_BYTES`]), and hands over a batch when it is full or when the tail has
//! caught up. [`stream`] sends the batches as WAL frames (batches already waiting share a
//! frame) and drives the stream's machine ([`ferry_wire::proto::source_wal`]), which follows
//! the target's durable LSN and says when a stream with an end is over.
//!
//! What it does not: decide what a record means (the format seam and selection do), read
//! the WAL (the hub does), pause writers (the fence), or match on the target's messages (the
//! machine does).
//!
//! Bounds: the queue between the hub and the sender holds at most [`QUEUE_MAX_BYTES`] of
//! records (and a bounded count of batches); the hub never waits on it (see the hub's docs
//! for what a full queue does).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;
use ferry_wire::limits::WAL_BATCH_TARGET_BYTES;
use ferry_wire::proto::source_wal::{SourceWal, WalAction};
use ferry_wire::wal::{parse_segment_name, LayoutChoice};
use ferry_wire::{Lsn, MigrationId};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use super::framing::{read_control, received, write_chunk, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::TransferError;

/// Most record bytes queued between the hub and one migration's sender.
pub const QUEUE_MAX_BYTES: u64 = 64 << 20;
/// How long the tail waits when it has read everything written so far, unless an inotify
/// notice of a write to the WAL folder wakes it sooner ([`crate::wal::notice::AppendNotice`]).
/// Held links are also refreshed at this period.
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Name of the folder of held links inside the WAL folder.
pub const HELD_DIR_NAME: &str = ".ferry-held";

/// Where the source WAL is and how to read it.
#[derive(Debug, Clone)]
pub struct WalSourceConfig {
    pub dir: PathBuf,
    pub layout: LayoutChoice,
    pub alignment_bytes: u32,
    /// Stop once every selected record at or below this LSN is durable on the target (an
    /// offline end, or the fence's `final_lsn`). `None`: stream until stopped.
    pub until_lsn: Option<Lsn>,
    pub max_held_wal_bytes: u64,
    /// How long the folder's tail thread waits without a notice before it reads and lists
    /// the folder again ([`POLL_INTERVAL`]; the thread takes its first subscription's).
    pub poll_interval: Duration,
}

/// Selected records on their way to the target: a WAL batch frame body (the
/// [`ferry_wire::walstream`] encoding), built on the tail thread straight from the segment
/// buffer.
#[derive(Debug)]
pub struct OutgoingBatch {
    pub body: Vec<u8>,
    pub last_lsn: Lsn,
    pub records_count: u64,
}

/// What the tail thread reports to one migration.
#[derive(Debug)]
pub enum TailEvent {
    Batch(OutgoingBatch),
    /// Every record up to the `until_lsn` has been read.
    Reached,
    Failed(TransferError),
}

/// One WAL segment of a folder listing: first LSN (from the name), name, size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentEntry {
    pub first_lsn: Lsn,
    pub name: String,
    pub len_bytes: u64,
}

/// Lists the WAL segments of `dir` (regular files named `wal-<lsn>.seg`), by first LSN.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentEntry>, TransferError> {
    let mut segments = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(first_lsn) = parse_segment_name(&name) else { continue };
        // Removed between the listing and the stat: the next listing will not show it.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            segments.push(SegmentEntry { first_lsn, name, len_bytes: meta.len() });
        }
    }
    segments.sort();
    Ok(segments)
}

/// Hard links to the WAL segments a migration (or the hub's shared tail) still needs.
#[derive(Debug)]
pub struct Holder {
    source_dir: PathBuf,
    held_dir: PathBuf,
    /// Held segments by first LSN: (name, size in bytes, last selected LSN read from it).
    held: BTreeMap<Lsn, (String, u64, Option<Lsn>)>,
    max_held_bytes: u64,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> TransferError {
    TransferError::Local(format!("cannot {what} {}: {e}", path.display()))
}

impl Holder {
    pub fn held_dir(source_dir: &Path, id: &MigrationId) -> PathBuf {
        source_dir.join(HELD_DIR_NAME).join(id.as_str())
    }

    /// The holder of migration `id`, in `<source_dir>/.ferry-held/<id>/`.
    pub fn new(source_dir: &Path, id: &MigrationId, max_held_bytes: u64) -> Result<Self, TransferError> {
        Self::at(source_dir, Self::held_dir(source_dir, id), max_held_bytes)
    }

    /// A holder linking into `held_dir` (created if missing).
    pub fn at(source_dir: &Path, held_dir: PathBuf, max_held_bytes: u64) -> Result<Self, TransferError> {
        std::fs::create_dir_all(&held_dir).map_err(|e| io_error("create", &held_dir, e))?;
        Ok(Self { source_dir: source_dir.to_path_buf(), held_dir, held: BTreeMap::new(), max_held_bytes })
    }

    /// The folder of links (a tail reads the segments through it).
    pub fn dir(&self) -> &Path {
        &self.held_dir
    }

    /// Links every segment of the source folder that may hold `start` or later records and
    /// is not linked yet; refreshes sizes. Fails over the byte bound.
    pub fn refresh(&mut self, start: Lsn) -> Result<(), TransferError> {
        let segments = list_segments(&self.source_dir)?;
        self.refresh_with(&segments, start)
    }

    /// [`Holder::refresh`] with a listing of the source folder made by the caller (one
    /// listing serves every holder of a folder).
    pub fn refresh_with(&mut self, segments: &[SegmentEntry], start: Lsn) -> Result<(), TransferError> {
        let first = segments.iter().rposition(|s| s.first_lsn <= start).unwrap_or(0);
        // A held segment holding `start` that the database deleted since: the listing's
        // older segment is not needed.
        let floor = self.held.range(..=start).next_back().map(|(lsn, _)| *lsn);
        for segment in segments.iter().skip(first).filter(|s| floor.is_none_or(|floor| s.first_lsn >= floor)) {
            if !self.held.contains_key(&segment.first_lsn) {
                let link = self.held_dir.join(&segment.name);
                match std::fs::hard_link(self.source_dir.join(&segment.name), &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    // Deleted between the listing and the link: a later segment exists, so
                    // the tail will report a gap if a record was lost.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) if e.raw_os_error() == Some(18) => {
                        return Err(TransferError::Local(format!(
                            "cannot hard-link {} into {}: different filesystems",
                            segment.name,
                            self.held_dir.display()
                        )))
                    }
                    Err(e) => return Err(io_error("hard-link", &link, e)),
                }
                self.held.insert(segment.first_lsn, (segment.name.clone(), 0, None));
            }
            // The link and the listed file are one inode: the listing's size is the link's.
            if let Some(entry) = self.held.get_mut(&segment.first_lsn) {
                entry.1 = segment.len_bytes;
            }
        }
        let held_bytes = self.held_bytes();
        if held_bytes > self.max_held_bytes {
            return Err(TransferError::Local(format!(
                "the migration holds {held_bytes} bytes of WAL segments, over max_held_wal_bytes ({}): the target is not keeping up",
                self.max_held_bytes
            )));
        }
        Ok(())
    }

    pub fn held_bytes(&self) -> u64 {
        self.held.values().map(|(_, size, _)| size).sum()
    }

    /// Notes a selected record read from segment `name`.
    pub fn note_selected(&mut self, name: &str, lsn: Lsn) {
        if let Some(entry) = self.held.values_mut().find(|(n, _, _)| n == name) {
            entry.2 = Some(lsn);
        }
    }

    /// Drops links of segments the tail has left (`current` is the segment it reads) whose
    /// selected records are all durable.
    pub fn release(&mut self, current: Option<&str>, durable: Lsn) {
        let Some(current_lsn) = current.and_then(parse_segment_name) else { return };
        let releasable: Vec<Lsn> = self
            .held
            .iter()
            .filter(|(first, (_, _, last))| **first < current_lsn && last.is_none_or(|l| l <= durable))
            .map(|(first, _)| *first)
            .collect();
        for first in releasable {
            if let Some((name, _, _)) = self.held.remove(&first) {
                let _ = std::fs::remove_file(self.held_dir.join(name));
            }
        }
    }

    /// Removes every held link (the migration is over).
    pub fn remove_all(source_dir: &Path, id: &MigrationId) {
        let _ = std::fs::remove_dir_all(Self::held_dir(source_dir, id));
    }
}

/// Shared between the WAL folder's tail thread (one subscription of
/// [`super::waltail_hub`]) and the async side of one migration.
#[derive(Debug, Default)]
pub struct TailShared {
    /// Set by the migration when it stops following the WAL; the hub then drops it.
    pub stop: AtomicBool,
    /// Record bytes handed to the sender and not written to the stream yet.
    pub queued_bytes: AtomicU64,
    pub durable_lsn: AtomicU64,
    pub source_lsn: AtomicU64,
    /// Bytes of WAL segments this migration holds links to ([`Holder::held_bytes`]).
    pub held_bytes: AtomicU64,
    /// Every record (of any vShard) at or below it was offered to this migration: the tail
    /// has read that far for it. The fence's drain waits for it to reach `final_lsn`.
    pub scanned_lsn: AtomicU64,
    /// When not 0: the tail wakes [`TailShared::wake`] once it offers a record at or above it
    /// (the fence waiting for `final_lsn` to be read, or for a violating record).
    pub wake_at_lsn: AtomicU64,
    pub wake: tokio::sync::Notify,
    /// Record bytes written to the stream and not yet acknowledged durable.
    pub inflight_bytes: AtomicU64,
    /// The WAL stream's rate over its last measuring window.
    pub rate_bytes_per_sec: AtomicU64,
    /// The slowest of the recent group commit round trips (batch written to `WalDurable`).
    pub group_commit_us: AtomicU64,
    /// When not 0: no record above it is sent (a fence at that `final_lsn` is in progress or
    /// done: a writer resumed on the target right after the fence's answer must not have its
    /// next records staged). Lifted (0) when the fence fails; [`TailShared::lift_ceiling`].
    pub ceiling_lsn: AtomicU64,
    pub ceiling_moved: tokio::sync::Notify,
}

impl TailShared {
    /// Sends nothing above `lsn` from now on.
    pub fn set_ceiling(&self, lsn: Lsn) {
        self.ceiling_lsn.store(lsn.0.max(1), Ordering::Relaxed);
    }

    /// Sends everything again (the fence failed).
    pub fn lift_ceiling(&self) {
        self.ceiling_lsn.store(0, Ordering::Relaxed);
        self.ceiling_moved.notify_one();
    }

    fn ceiling(&self) -> Option<Lsn> {
        match self.ceiling_lsn.load(Ordering::Relaxed) {
            0 => None,
            lsn => Some(Lsn(lsn)),
        }
    }

    /// Notes that every record up to `lsn` was offered; wakes a waiting fence when asked to.
    pub fn note_scanned(&self, lsn: Lsn) {
        // Release: a fence that reads this (acquire) sees the last selected record stored
        // before it (`source_lsn`), so it never names an older one to the target.
        self.scanned_lsn.store(lsn.0, Ordering::Release);
        let wake = self.wake_at_lsn.load(Ordering::Relaxed);
        if wake != 0 && lsn.0 >= wake {
            self.wake.notify_one();
        }
    }
}

/// Recent group commit round trips kept to report the slowest.
const GROUP_COMMITS_KEPT_COUNT: usize = 64;
/// Frames sent and not yet acknowledged that are timed (older ones are not timed).
const FRAMES_TIMED_MAX_COUNT: usize = 4096;
/// The WAL stream's rate is measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// Times the WAL stream: each frame's round trip to its `WalDurable`, and the send rate.
#[derive(Debug)]
struct StreamTimer {
    /// (last LSN of the frame, bytes, when it was written), oldest first.
    inflight: VecDeque<(Lsn, u64, Instant)>,
    recent_us: VecDeque<u64>,
    window_start: Instant,
    window_bytes: u64,
}

impl StreamTimer {
    fn new() -> Self {
        Self { inflight: VecDeque::new(), recent_us: VecDeque::new(), window_start: Instant::now(), window_bytes: 0 }
    }

    fn sent(&mut self, shared: &TailShared, last_lsn: Lsn, len_bytes: u64) {
        let now = Instant::now();
        if self.inflight.len() < FRAMES_TIMED_MAX_COUNT {
            self.inflight.push_back((last_lsn, len_bytes, now));
        }
        shared.inflight_bytes.fetch_add(len_bytes, Ordering::Relaxed);
        self.window_bytes += len_bytes;
        let window = now.duration_since(self.window_start);
        if window >= RATE_WINDOW {
            let rate = u128::from(self.window_bytes) * 1_000_000 / window.as_micros().max(1);
            shared.rate_bytes_per_sec.store(u64::try_from(rate).unwrap_or(u64::MAX), Ordering::Relaxed);
            self.window_start = now;
            self.window_bytes = 0;
        }
    }

    fn durable(&mut self, shared: &TailShared, durable: Lsn) {
        let now = Instant::now();
        let mut acked_bytes = 0u64;
        while let Some((last_lsn, len_bytes, at)) = self.inflight.front().copied() {
            if last_lsn > durable {
                break;
            }
            self.inflight.pop_front();
            acked_bytes += len_bytes;
            if self.recent_us.len() == GROUP_COMMITS_KEPT_COUNT {
                self.recent_us.pop_front();
            }
            self.recent_us.push_back(u64::try_from(now.duration_since(at).as_micros()).unwrap_or(u64::MAX));
        }
        let left = shared.inflight_bytes.load(Ordering::Relaxed);
        shared.inflight_bytes.store(left.saturating_sub(acked_bytes), Ordering::Relaxed);
        if let Some(slowest) = self.recent_us.iter().max() {
            shared.group_commit_us.store(*slowest, Ordering::Relaxed);
        }
        if Instant::now().duration_since(self.window_start) >= RATE_WINDOW && self.window_bytes == 0 {
            shared.rate_bytes_per_sec.store(0, Ordering::Relaxed);
        }
    }
}

/// Streams the WAL until the tail reaches `until_lsn` and everything sent is durable (or
/// forever without one), as the stream's machine decides. `wal_send`/`wal_recv` are the WAL
/// stream, after the start exchange ([`open`]).
pub async fn stream(
    mut wal_send: SendStream,
    mut wal_recv: RecvStream,
    mut events: mpsc::Receiver<TailEvent>,
    shared: Arc<TailShared>,
    mut machine: SourceWal,
) -> Result<Lsn, TransferError> {
    let (acks_tx, mut acks) = mpsc::channel(64);
    let _reader = super::task::AbortOnDrop(tokio::spawn(async move {
        loop {
            let next = read_control(&mut wal_recv, SMALL_CONTROL_BODY_MAX_BYTES).await;
            let end = !matches!(next, Ok(Some(_)));
            if acks_tx.send(next).await.is_err() || end {
                return;
            }
        }
    }));
    let mut timer = StreamTimer::new();
    // A batch above the ceiling, waiting for it to be lifted.
    let mut blocked: Option<OutgoingBatch> = None;
    // An event taken while filling a frame that did not fit in it; it goes first next time.
    let mut held: Option<TailEvent> = None;
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                WalAction::Send(message) => write_control(&mut wal_send, &message).await?,
                WalAction::Durable { durable_lsn } => {
                    shared.durable_lsn.store(durable_lsn.0, Ordering::Relaxed);
                    timer.durable(&shared, durable_lsn);
                }
                WalAction::Finish { durable_lsn } => return Ok(durable_lsn),
                WalAction::Start { .. } => {
                    return Err(TransferError::Local("the WAL stream was started twice".into()));
                }
            }
        }
        tokio::select! {
            event = next_event(&mut held, &mut events), if machine.wants_records() && blocked.is_none() => match event {
                Some(TailEvent::Batch(first)) => {
                    // Batches already waiting go in the same frame, up to the target size
                    // (and never across the ceiling).
                    let ceiling = shared.ceiling();
                    let mut batch = first;
                    while batch.body.len() < WAL_BATCH_TARGET_BYTES {
                        match events.try_recv() {
                            Ok(TailEvent::Batch(more)) if batch.body.len() + more.body.len() <= WAL_BATCH_TARGET_BYTES
                                && ceiling.is_none_or(|c| more.last_lsn <= c) => {
                                batch.body.extend_from_slice(&more.body);
                                batch.last_lsn = more.last_lsn;
                                batch.records_count += more.records_count;
                            }
                            Ok(other) => { held = Some(other); break; }
                            Err(_) => break,
                        }
                    }
                    if ceiling.is_some_and(|c| batch.last_lsn > c) {
                        blocked = Some(batch);
                        continue;
                    }
                    let last_lsn = send_batch(&mut wal_send, &shared, &mut timer, batch).await?;
                    machine.handle_batch_sent(last_lsn)?;
                }
                Some(TailEvent::Reached) => machine.handle_tail_reached()?,
                Some(TailEvent::Failed(e)) => return Err(e),
                None => return Err(TransferError::Local("the WAL tail stopped".into())),
            },
            () = shared.ceiling_moved.notified(), if blocked.is_some() => {
                let ceiling = shared.ceiling();
                if let Some(batch) = blocked.take_if(|b| ceiling.is_none_or(|c| b.last_lsn <= c)) {
                    let last_lsn = send_batch(&mut wal_send, &shared, &mut timer, batch).await?;
                    machine.handle_batch_sent(last_lsn)?;
                }
            }
            ack = acks.recv() => machine.handle_message(received(ack)?)?,
        }
    }
}

/// Writes one WAL batch frame; returns its last LSN.
async fn send_batch(
    wal_send: &mut SendStream,
    shared: &TailShared,
    timer: &mut StreamTimer,
    batch: OutgoingBatch,
) -> Result<Lsn, TransferError> {
    let header = FrameHeader::wal_batch(&batch.body)?;
    let sent_bytes = batch.body.len() as u64;
    write_chunk(wal_send, &header, Bytes::from(batch.body)).await?;
    shared.queued_bytes.fetch_sub(sent_bytes.min(shared.queued_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
    timer.sent(shared, batch.last_lsn, sent_bytes);
    Ok(batch.last_lsn)
}

/// The held event, else the next one from the tail.
async fn next_event(held: &mut Option<TailEvent>, events: &mut mpsc::Receiver<TailEvent>) -> Option<TailEvent> {
    match held.take() {
        Some(event) => Some(event),
        None => events.recv().await,
    }
}

/// Opens the WAL stream of a transfer whose base holds every record up to `base_lsn`, and
/// learns where to start: the target's durable LSN (returned with the stream's machine).
pub async fn open(
    conn: &quinn::Connection,
    base_lsn: Lsn,
) -> Result<(SendStream, RecvStream, SourceWal, Lsn), TransferError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut machine = SourceWal::new(base_lsn);
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                WalAction::Send(message) => write_control(&mut send, &message).await?,
                WalAction::Start { durable_lsn } => return Ok((send, recv, machine, durable_lsn)),
                other => return Err(TransferError::Local(format!("the WAL stream cannot execute {other:?} yet"))),
            }
        }
        machine.handle_message(read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES).await?)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn segment(dir: &Path, first_lsn: u64, len_bytes: usize) -> String {
        let name = format!("wal-{first_lsn:020}.seg");
        std::fs::write(dir.join(&name), vec![0u8; len_bytes]).unwrap();
        name
    }

    fn linked(holder: &Holder) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(holder.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Links from the segment holding the start LSN on (other files are not segments), keeps
    /// a segment until the reader has left it and its selected records are durable, and
    /// refuses to hold more than its bound.
    #[test]
    fn a_holder_links_what_is_needed_releases_what_is_durable_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = [1, 100, 200, 300].iter().map(|lsn| segment(dir.path(), *lsn, 1000)).collect();
        std::fs::write(dir.path().join("wal.dwb"), b"not a segment").unwrap();
        let id = MigrationId::new("m").unwrap();
        let mut holder = Holder::new(dir.path(), &id, 10_000).unwrap();
        let listing = list_segments(dir.path()).unwrap();
        assert_eq!(listing.iter().map(|s| s.name.clone()).collect::<Vec<_>>(), names);
        holder.refresh_with(&listing, Lsn(150)).unwrap();
        assert_eq!(linked(&holder), names[1..]);
        assert_eq!(holder.held_bytes(), 3000);
        // The database deletes a held segment: the link keeps its bytes.
        std::fs::remove_file(dir.path().join(&names[1])).unwrap();
        holder.refresh(Lsn(150)).unwrap();
        assert_eq!(linked(&holder), names[1..]);

        holder.note_selected(&names[1], Lsn(150));
        holder.note_selected(&names[2], Lsn(250));
        // The reader is in the last segment; only what is durable goes.
        holder.release(Some(&names[3]), Lsn(200));
        assert_eq!(linked(&holder), names[2..]);
        holder.release(Some(&names[3]), Lsn(250));
        assert_eq!(linked(&holder), names[3..]);

        segment(dir.path(), 400, 20_000);
        let err = holder.refresh(Lsn(300)).unwrap_err().to_string();
        assert!(err.contains("over max_held_wal_bytes (10000)"), "{err}");
        Holder::remove_all(dir.path(), &id);
        assert!(!Holder::held_dir(dir.path(), &id).exists());
    }
}
