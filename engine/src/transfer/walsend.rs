//! The source side of the WAL stream: follows the source WAL, keeps the vShard's records and
//! streams them to the target, holding the WAL segments it still needs.
//!
//! What it does: a tail thread ([`spawn_tail`]) follows the WAL folder with
//! [`FolderTail`] through a folder of hard links ([`Holder`]): every segment from the one
//! holding the start LSN on is linked into `<wal_dir>/.ferry-held/<migration_id>/` as soon as
//! it is seen, so the database may delete or truncate its segments during a long base copy
//! without ferry losing a record. A link is dropped once the tail is past its segment and
//! every selected record read from it is durable on the target. Held bytes are bounded by
//! `max_held_wal_bytes`: over it the migration fails with a clear error.
//! [`stream`] batches the selected records into WAL frames and tracks the target's durable LSN.
//!
//! What it does not: decide what a record means (the format seam and selection do) or pause
//! writers (the fence, later).
//!
//! Bounds: the queue between the tail thread and the sender holds at most
//! [`QUEUE_MAX_BYTES`] of records (and a bounded count); the tail waits while it is full.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;
use ferry_wire::limits::WAL_BATCH_TARGET_BYTES;
use ferry_wire::message::Message;
use ferry_wire::wal::{parse_segment_name, CursorConfig, LayoutChoice, Selection, PREAMBLE_LEN_BYTES};
use ferry_wire::walstream::{self, WalBatchRecord};
use ferry_wire::{Lsn, MigrationId, VShardId};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, watch};

use super::framing::{read_control, unexpected, write_chunk, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::TransferError;
use crate::wal::tail::FolderTail;

/// Most record bytes queued between the tail thread and the sender.
pub const QUEUE_MAX_BYTES: u64 = 64 << 20;
/// How often the tail looks again when it has read everything written so far. The added lag
/// is at most this; inotify could replace the poll.
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
}

/// One selected record on its way to the target.
#[derive(Debug)]
pub struct Outgoing {
    pub lsn: Lsn,
    pub source_preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
    pub bytes: Vec<u8>,
    pub segment: String,
}

/// What the tail thread reports.
#[derive(Debug)]
pub enum TailEvent {
    Record(Outgoing),
    /// Every record up to the `until_lsn` has been read.
    Reached,
    Failed(TransferError),
}

/// Hard links to the WAL segments a migration still needs.
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

    pub fn new(source_dir: &Path, id: &MigrationId, max_held_bytes: u64) -> Result<Self, TransferError> {
        let held_dir = Self::held_dir(source_dir, id);
        std::fs::create_dir_all(&held_dir).map_err(|e| io_error("create", &held_dir, e))?;
        Ok(Self { source_dir: source_dir.to_path_buf(), held_dir, held: BTreeMap::new(), max_held_bytes })
    }

    /// Links every segment of the source folder that may hold `start` or later records and
    /// is not linked yet; refreshes sizes. Fails over the byte bound.
    pub fn refresh(&mut self, start: Lsn) -> Result<(), TransferError> {
        let mut segments: Vec<(Lsn, String)> = Vec::new();
        let entries = std::fs::read_dir(&self.source_dir).map_err(|e| io_error("list", &self.source_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &self.source_dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(lsn) = parse_segment_name(&name) {
                segments.push((lsn, name));
            }
        }
        segments.sort();
        let first = segments.iter().rposition(|(lsn, _)| *lsn <= start).unwrap_or(0);
        for (lsn, name) in segments.into_iter().skip(first) {
            let link = self.held_dir.join(&name);
            if !self.held.contains_key(&lsn) {
                match std::fs::hard_link(self.source_dir.join(&name), &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    // Deleted between the listing and the link: a later segment exists, so
                    // the tail will report a gap if a record was lost.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) if e.raw_os_error() == Some(18) => {
                        return Err(TransferError::Local(format!(
                            "cannot hard-link {name} into {}: different filesystems",
                            self.held_dir.display()
                        )))
                    }
                    Err(e) => return Err(io_error("hard-link", &link, e)),
                }
                self.held.insert(lsn, (name, 0, None));
            }
            if let Some(entry) = self.held.get_mut(&lsn) {
                entry.1 = std::fs::metadata(&link).map(|m| m.size()).unwrap_or(entry.1);
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

/// Shared between the tail thread and the async side.
#[derive(Debug, Default)]
pub struct TailShared {
    pub stop: AtomicBool,
    pub queued_bytes: AtomicU64,
    pub durable_lsn: AtomicU64,
    pub source_lsn: AtomicU64,
}

/// Starts the tail thread from `start` (the first LSN not durable on the target).
pub fn spawn_tail(
    config: WalSourceConfig,
    id: MigrationId,
    vshard: VShardId,
    start: Lsn,
    shared: Arc<TailShared>,
    events: mpsc::Sender<TailEvent>,
) -> Result<std::thread::JoinHandle<()>, TransferError> {
    std::thread::Builder::new()
        .name(format!("ferry-tail-{id}"))
        .spawn(move || {
            if let Err(e) = tail_loop(&config, &id, vshard, start, &shared, &events) {
                let _ = events.blocking_send(TailEvent::Failed(e));
            }
        })
        .map_err(|e| TransferError::Local(format!("cannot start a WAL tail thread: {e}")))
}

fn tail_loop(
    config: &WalSourceConfig,
    id: &MigrationId,
    vshard: VShardId,
    start: Lsn,
    shared: &TailShared,
    events: &mpsc::Sender<TailEvent>,
) -> Result<(), TransferError> {
    let mut holder = Holder::new(&config.dir, id, config.max_held_wal_bytes)?;
    holder.refresh(start)?;
    let held_dir = Holder::held_dir(&config.dir, id);
    let cursor =
        CursorConfig { layout: config.layout, alignment_bytes: config.alignment_bytes, ..CursorConfig::default() };
    let mut tail = FolderTail::new(&held_dir, cursor, Some(start)).map_err(|e| TransferError::Local(e.to_string()))?;
    let selection = Selection::new(vshard);
    let mut refreshed_at = std::time::Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        // Link new segments at least every poll interval, also while busy streaming, so a
        // segment the database deletes soon after rolling past it is still held.
        if refreshed_at.elapsed() >= POLL_INTERVAL {
            holder.refresh(tail.cursor().next_lsn().unwrap_or(start))?;
            refreshed_at = std::time::Instant::now();
        }
        let next = tail.poll().map_err(|e| TransferError::Local(format!("source WAL: {e}")))?;
        let Some(record) = next else {
            if config.until_lsn.is_some_and(|until| tail.cursor().next_lsn().is_some_and(|next| next > until)) {
                let _ = events.blocking_send(TailEvent::Reached);
                return Ok(());
            }
            holder.release(tail.segment_name(), Lsn(shared.durable_lsn.load(Ordering::Relaxed)));
            std::thread::sleep(POLL_INTERVAL);
            continue;
        };
        let lsn = record.header.lsn;
        if config.until_lsn.is_some_and(|until| lsn > until) {
            let _ = events.blocking_send(TailEvent::Reached);
            return Ok(());
        }
        if !selection.keeps(&record.header) {
            continue;
        }
        holder.note_selected(&record.segment, lsn);
        shared.source_lsn.store(lsn.0, Ordering::Relaxed);
        while shared.queued_bytes.load(Ordering::Relaxed) > QUEUE_MAX_BYTES && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL_INTERVAL);
        }
        shared.queued_bytes.fetch_add(record.bytes.len() as u64, Ordering::Relaxed);
        let source_preamble = tail.cursor().preamble().map(|p| p.encode());
        let outgoing = Outgoing { lsn, source_preamble, bytes: record.bytes, segment: record.segment };
        if events.blocking_send(TailEvent::Record(outgoing)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Streams the WAL until the tail reaches `until_lsn` and everything sent is durable (or
/// forever without one). `wal_send`/`wal_recv` are the WAL stream, after the start exchange.
pub async fn stream(
    mut wal_send: SendStream,
    mut wal_recv: RecvStream,
    mut events: mpsc::Receiver<TailEvent>,
    shared: Arc<TailShared>,
    durable_tx: watch::Sender<Lsn>,
) -> Result<Lsn, TransferError> {
    let (acks_tx, mut acks) = mpsc::channel(64);
    let _reader = super::target::AbortOnDrop(tokio::spawn(async move {
        loop {
            let next = read_control(&mut wal_recv, SMALL_CONTROL_BODY_MAX_BYTES).await;
            let end = !matches!(next, Ok(Some(_)));
            if acks_tx.send(next).await.is_err() || end {
                return;
            }
        }
    }));
    let mut last_sent: Option<Lsn> = None;
    let mut reached = false;
    loop {
        let durable = *durable_tx.borrow();
        if reached && last_sent.is_none_or(|l| durable >= l) {
            return Ok(durable);
        }
        tokio::select! {
            event = events.recv(), if !reached => match event {
                Some(TailEvent::Record(first)) => {
                    let mut batch = vec![first];
                    let mut size = batch[0].bytes.len();
                    while size < WAL_BATCH_TARGET_BYTES {
                        match events.try_recv() {
                            Ok(TailEvent::Record(more)) => { size += more.bytes.len(); batch.push(more); }
                            Ok(TailEvent::Reached) => { reached = true; break; }
                            Ok(TailEvent::Failed(e)) => return Err(e),
                            Err(_) => break,
                        }
                    }
                    let mut start = 0;
                    while start < batch.len() {
                        let mut body = Vec::with_capacity(size.min(WAL_BATCH_TARGET_BYTES * 2));
                        let mut end = start;
                        while end < batch.len() {
                            let r = &batch[end];
                            let record = WalBatchRecord { lsn: r.lsn, source_preamble: r.source_preamble, bytes: &r.bytes };
                            if !walstream::push(&mut body, &record) {
                                break;
                            }
                            end += 1;
                        }
                        if end == start {
                            return Err(TransferError::Local(format!("WAL record {} is too large to send", batch[start].lsn)));
                        }
                        let header = FrameHeader::wal_batch(&body)?;
                        write_chunk(&mut wal_send, &header, Bytes::from(body)).await?;
                        start = end;
                    }
                    let sent_bytes: u64 = batch.iter().map(|r| r.bytes.len() as u64).sum();
                    shared.queued_bytes.fetch_sub(sent_bytes.min(shared.queued_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                    last_sent = batch.last().map(|r| r.lsn).or(last_sent);
                }
                Some(TailEvent::Reached) => reached = true,
                Some(TailEvent::Failed(e)) => return Err(e),
                None => return Err(TransferError::Local("the WAL tail stopped".into())),
            },
            ack = acks.recv() => match ack {
                Some(Ok(Some(Message::WalDurable { durable_lsn }))) => {
                    shared.durable_lsn.store(durable_lsn.0, Ordering::Relaxed);
                    durable_tx.send_replace(durable_lsn);
                }
                Some(Ok(Some(Message::Error { kind, message }))) => return Err(TransferError::Peer { kind, message }),
                Some(Ok(Some(other))) => return Err(TransferError::Protocol(format!("unexpected {} on the WAL stream", other.name()))),
                Some(Ok(None)) | None => return Err(TransferError::Connection("the target closed the WAL stream".into())),
                Some(Err(e)) => return Err(e),
            }
        }
    }
}

/// Opens the WAL stream and learns where to start: the target's durable LSN.
pub async fn open(conn: &quinn::Connection) -> Result<(SendStream, RecvStream, Lsn), TransferError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_control(&mut send, &Message::WalStart).await?;
    match read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES).await? {
        Some(Message::WalDurable { durable_lsn }) => Ok((send, recv, durable_lsn)),
        Some(Message::Error { kind, message }) => Err(TransferError::Peer { kind, message }),
        other => Err(unexpected("wal_durable", other.as_ref())),
    }
}
