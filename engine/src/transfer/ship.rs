//! The copy's chunks: rechecks of resumed chunks, the chunk streams and file announcements.
//!
//! What it does: [`recheck`] reads the chunks the target holds already so each file's CRC32C
//! is still built from the source's bytes; [`ship`] runs `streams_count` uni streams per
//! connection, each taking its next chunk from the copy's machine
//! ([`ferry_wire::proto::source`]) and sending it on the connection's chunk path (QUIC
//! streams or RDMA lanes, see [`super::rdma::attach`]), reading it with the [`ChunkReader`] and honouring the
//! copy's [`RateHandle`], and announces each file the machine says is read in full, after
//! checking the file did not change since it was pinned.
//!
//! What it does not: decide which chunk goes next, what the target's messages mean or when
//! the base is staged (the machine does), or open connections (`source` does).
//!
//! Bounds: the reader's buffer pool bounds chunks in memory; the machine's lock is never held
//! across an await.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_wire::frame::FrameHeader;
use ferry_wire::message::Message;
use ferry_wire::path::RelPath;
use ferry_wire::proto::source::{SourceAction, SourceConversation};
use ferry_wire::session::{ChunkSpan, Progress};
use quinn::{Connection, SendStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::framing::{received, write_control};
use super::rate::{since, RateHandle};
use super::rdma::attach::Lanes;
use super::transport::{ChunkLane, ChunkLanes};
use super::walrun::{Messages, WalRun};
use super::TransferError;
use crate::clock::monotonic_ns;
use crate::read::{ChunkReader, SourceFile};
use crate::snapshot::{Snapshot, SnapshotFile};

/// Reads the chunks the target holds already, so each file's CRC still comes from the
/// source's own bytes and checks the source against the target.
pub(super) async fn recheck(
    snapshot: &Snapshot,
    reader: &Arc<ChunkReader>,
    machine: &Mutex<SourceConversation>,
    spans: Vec<ChunkSpan>,
) -> Result<(), TransferError> {
    let mut open: Option<(u32, Arc<SourceFile>)> = None;
    for span in spans {
        let file = snapshot_file(snapshot, span.chunk.file_index)?;
        // Rechecks come file by file: open each file once.
        let opened = match &open {
            Some((index, opened)) if *index == span.chunk.file_index => opened.clone(),
            _ => {
                let opened = SourceFile::open_shared(&file.snapshot_path).map_err(|e| read_error(&file.path, e))?;
                open = Some((span.chunk.file_index, opened.clone()));
                opened
            }
        };
        let data =
            reader.read(&opened, span.offset_bytes, span.len_bytes).await.map_err(|e| read_error(&file.path, e))?;
        lock(machine).handle_chunk_read(&span, ferry_wire::crc32c(&data))?;
    }
    Ok(())
}

fn snapshot_file(snapshot: &Snapshot, file_index: u32) -> Result<&SnapshotFile, TransferError> {
    snapshot.files.get(file_index as usize).ok_or_else(|| TransferError::Protocol(format!("no file {file_index}")))
}

fn read_error(path: &RelPath, e: crate::read::ReadError) -> TransferError {
    TransferError::Read { path: path.to_string(), cause: std::io::Error::other(e.to_string()) }
}

/// How the base goes out: streams per connection, and the copy's rate.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShipPlan {
    pub(super) streams_count: u32,
    pub(super) rate_limit_bytes_per_sec: u64,
    pub(super) chunk_len_bytes: u32,
    /// The threads the chunk streams run on ([`crate::priority`]).
    pub(super) bulk: crate::priority::BulkThreads,
}

/// Ships the chunks on `lanes` (the paths of `conns`: their QUIC streams or RDMA lanes) and announces each file read in full, until the machine hands
/// back an action that is not an announcement (the base is staged); returns it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn ship(
    conns: &[Connection],
    lanes: &[Lanes],
    request: &ShipPlan,
    snapshot: &Snapshot,
    reader: &Arc<ChunkReader>,
    machine: &Arc<Mutex<SourceConversation>>,
    send: &mut SendStream,
    messages: &mut Messages,
    progress: &watch::Sender<Progress>,
    rate: &RateHandle,
    mut wal: Option<&mut WalRun>,
) -> Result<SourceAction, TransferError> {
    let origin = Instant::now();
    rate.start(request.rate_limit_bytes_per_sec, u64::from(request.chunk_len_bytes));
    let mut files = Vec::with_capacity(snapshot.files.len());
    for file in &snapshot.files {
        files.push(SourceFile::open_shared(&file.snapshot_path).map_err(|e| read_error(&file.path, e))?);
    }
    let files = Arc::new(files);
    let chunk_read = Arc::new(Notify::new());
    let mut streams = JoinSet::new();
    // The chunk streams (reads, CRC32C, sends) run on the bulk threads when the node has them,
    // below this task, which also serves the control stream.
    let bulk = crate::priority::bulk_runtime(request.bulk);
    for path in lanes {
        for _ in 0..request.streams_count.max(1) {
            let (path, files, reader, machine, chunk_read, rate) =
                (path.clone(), files.clone(), reader.clone(), machine.clone(), chunk_read.clone(), rate.clone());
            let stream = async move { send_stream(path, files, reader, machine, chunk_read, rate, origin).await };
            match &bulk {
                Some(runtime) => streams.spawn_on(stream, runtime),
                None => streams.spawn(stream),
            };
        }
    }
    let mut streams_left = streams.len();
    loop {
        // Announce every file read in full (empty files at once); anything else ends the shipping.
        loop {
            let next = lock(machine).poll_action();
            match next {
                Some(SourceAction::SendFileDone { file_index, message }) => {
                    announce_file(snapshot, file_index, &message, send).await?
                }
                Some(other) => {
                    for conn in conns {
                        let path = conn.stats().path;
                        tracing::debug!(
                            mtu_bytes = path.current_mtu,
                            lost_packets = path.lost_packets,
                            sent_packets = path.sent_packets,
                            "base copy sent"
                        );
                    }
                    return Ok(other);
                }
                None => break,
            }
        }
        tokio::select! {
            message = messages.recv() => {
                let message = received(message)?;
                let mut m = lock(machine);
                m.handle_message(message, monotonic_ns())?;
                publish(progress, m.progress());
            },
            () = chunk_read.notified() => {}
            // A WAL stream that fails (a corrupt source WAL, too many held bytes) fails the copy
            // now, with its own error, not after the base copy.
            ended = async { match wal.as_mut() { Some(w) => w.ended().await, None => std::future::pending().await } },
                if wal.as_ref().is_some_and(|w| w.running()) => ended?,
            joined = streams.join_next(), if streams_left > 0 => {
                streams_left -= 1;
                match joined {
                    Some(Ok(Ok(()))) | None => {}
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => return Err(TransferError::Local(format!("a stream task failed: {e}"))),
                }
            }
        }
    }
}

/// Sends a file's `FileDone`, after checking that the file did not change since it was pinned.
pub(super) async fn announce_file(
    snapshot: &Snapshot,
    file_index: u32,
    message: &Message,
    send: &mut SendStream,
) -> Result<(), TransferError> {
    if let Some(pinned) = snapshot.files.get(file_index as usize) {
        pinned.check_unchanged()?;
    }
    write_control(send, message).await
}

/// One lane's chunks: reads each chunk the machine hands out and sends it on the transport.
pub(super) async fn send_stream<L: ChunkLanes>(
    lanes: L,
    files: Arc<Vec<Arc<SourceFile>>>,
    reader: Arc<ChunkReader>,
    machine: Arc<Mutex<SourceConversation>>,
    chunk_read: Arc<Notify>,
    rate: RateHandle,
    origin: Instant,
) -> Result<(), TransferError> {
    let mut lane = lanes.open().await?;
    loop {
        let Some(span) = lock(&machine).poll_chunk(since(origin)) else { break };
        let file = files
            .get(span.chunk.file_index as usize)
            .ok_or_else(|| TransferError::Local(format!("no open file {}", span.chunk.file_index)))?;
        let data = reader.read(file, span.offset_bytes, span.len_bytes).await.map_err(|e| TransferError::Read {
            path: file.path().display().to_string(),
            cause: std::io::Error::other(e.to_string()),
        })?;
        let crc = ferry_wire::crc32c(&data);
        lock(&machine).handle_chunk_read(&span, crc)?;
        let data = crate::failpoint::damage_source_chunk(data);
        chunk_read.notify_one();
        rate.pace(u64::from(span.len_bytes)).await;
        let header = FrameHeader::chunk(span.chunk.file_index, span.offset_bytes, data.len(), crc)?;
        let len_bytes = data.len() as u64;
        lane.send(&header, data).await?;
        crate::metrics::BYTES_SENT_TOTAL.fetch_add(len_bytes, Ordering::Relaxed);
    }
    lane.end().await
}

/// Publishes the base copy's progress, keeping the WAL fields.
pub(super) fn publish(progress: &watch::Sender<Progress>, base: Progress) {
    progress.send_modify(|p| {
        *p = Progress {
            base_staged: p.base_staged,
            wal_durable_lsn: p.wal_durable_lsn,
            wal_source_lsn: p.wal_source_lsn,
            wal_held_bytes: p.wal_held_bytes,
            wal_lag_bytes: p.wal_lag_bytes,
            wal_rate_bytes_per_sec: p.wal_rate_bytes_per_sec,
            wal_group_commit_us: p.wal_group_commit_us,
            ..base
        }
    });
}

pub(super) fn lock(machine: &Mutex<SourceConversation>) -> MutexGuard<'_, SourceConversation> {
    machine.lock().unwrap_or_else(|e| e.into_inner())
}
