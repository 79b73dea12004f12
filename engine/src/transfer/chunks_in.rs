//! The target's chunk streams: chunk frames in, verified writes out.
//!
//! What it does: accepts a connection's uni streams ([`accept_chunk_streams`]), and the lanes
//! of an RDMA path when the source offers one on it ([`carry_chunks`]); on each, reads
//! chunk frames, checks each header against the transfer's conversation
//! ([`ferry_wire::proto::target::TargetConversation::check_chunk`]) and each body against its
//! CRC32C, writes the body at its offset in its part file with one gathered write, logs it in
//! the chunk log and reports it to the control loop as a [`ChunkEvent`].
//!
//! What it does not: acknowledge chunks, finalise files or decide anything about the transfer
//! (the conversation does, in the control loop), or read control messages.
//!
//! Bounds: one chunk body per stream (at most `CHUNK_LEN_MAX_BYTES`), a bounded event queue
//! (the caller's), as many streams as the transport lets the peer open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_wire::checkpoint::LogRecord;
use ferry_wire::frame::FrameKind;
use ferry_wire::message::ChunkRef;
use ferry_wire::proto::target::{ChunkEvent, TargetConversation};
use ferry_wire::session::ChunkVerdict;
use quinn::Connection;
use tokio::sync::mpsc;

use super::chunklog::ChunkLog;
use super::framing::BodyPieces;
use super::rdma::attach::{self, ChunkTransport};
use super::task::blocking;
use super::transport::{ChunkArrivals, IncomingLane};
use super::TransferError;
use crate::staging::{self, StagingLayout};
use crate::storage::{Storage, StorageFile};

/// What a chunk stream tells the control loop: a chunk, or why the stream failed.
pub(super) type Event = Result<ChunkEvent, TransferError>;

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the chunk streams of one inbound transfer.
pub(super) struct Inbound {
    /// The transfer's conversation: only its control loop marks chunks verified, so an
    /// acknowledgement always goes out before the file it completes is reported staged.
    pub(super) conversation: Arc<Mutex<TargetConversation>>,
    pub(super) parts: Mutex<HashMap<u32, Arc<dyn StorageFile>>>,
    pub(super) layout: StagingLayout,
    pub(super) storage: Arc<dyn Storage>,
    pub(super) log: Arc<ChunkLog>,
    pub(super) received: Arc<AtomicU64>,
    /// The offer's chunk length: an RDMA path's slots hold one chunk frame.
    pub(super) chunk_len_bytes: u32,
}

impl Inbound {
    fn part(&self, file_index: u32) -> Result<Arc<dyn StorageFile>, TransferError> {
        let mut parts = locked(&self.parts);
        if let Some(part) = parts.get(&file_index) {
            return Ok(part.clone());
        }
        let part = staging::open_part(&*self.storage, &self.layout, file_index)?;
        parts.insert(file_index, part.clone());
        Ok(part)
    }

    /// Makes written chunks durable: the part files first, then the log that names them.
    pub(super) fn sync(&self) -> Result<(), TransferError> {
        let parts: Vec<_> = locked(&self.parts).iter().map(|(i, p)| (*i, p.clone())).collect();
        super::steps::sync_parts(&self.layout, &parts, &self.log)
    }
}

/// Takes the lanes the source opens on `arrivals`, each on its own task, until the path ends.
pub(super) async fn accept_chunk_streams<A: ChunkArrivals>(
    arrivals: A,
    inbound: Arc<Inbound>,
    events: mpsc::Sender<Event>,
) {
    // A JoinSet aborts its tasks when dropped; finished ones are reaped at each accept, so
    // the set holds at most the streams open at once (bounded by the transport's limit).
    let mut streams = tokio::task::JoinSet::new();
    loop {
        match arrivals.accept().await {
            Ok(lane) => {
                while streams.try_join_next().is_some() {}
                let (inbound, events) = (inbound.clone(), events.clone());
                streams.spawn(async move {
                    if let Err(e) = receive_chunks(lane, &inbound, &events).await {
                        let _ = events.send(Err(e)).await;
                    }
                });
            }
            Err(e) => {
                let _ = events.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Takes the chunks of a connection that carries them: its uni streams and, when the source
/// offers an RDMA path on a bidirectional stream, that path's lanes (answered from
/// `transport`: without lanes when this node has no RDMA). Runs until the connection ends.
pub(super) async fn carry_chunks(
    conn: Connection,
    transport: ChunkTransport,
    inbound: Arc<Inbound>,
    events: mpsc::Sender<Event>,
) {
    let rdma = {
        let (conn, inbound, events) = (conn.clone(), inbound.clone(), events.clone());
        async move {
            // A source that ships over QUIC never opens this stream.
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            match attach::answer_path(&transport, &mut send, &mut recv, inbound.chunk_len_bytes).await {
                Ok(Some(arrivals)) => accept_chunk_streams(arrivals, inbound, events).await,
                Ok(None) => {}
                Err(e) => {
                    let _ = events.send(Err(e)).await;
                }
            }
        }
    };
    let quic = accept_chunk_streams(conn, inbound, events);
    tokio::pin!(quic);
    tokio::select! {
        // The connection is gone (its streams' accept failed): its RDMA path goes with it.
        () = &mut quic => {}
        // Answered without lanes, or the lanes failed (the control loop has the error).
        () = rdma => quic.await,
    }
}

async fn receive_chunks<I: IncomingLane>(
    mut reader: I,
    inbound: &Arc<Inbound>,
    events: &mpsc::Sender<Event>,
) -> Result<(), TransferError> {
    // One body per stream, handed to the write and back, so its piece list is allocated once.
    let mut body = BodyPieces::default();
    while let Some(header) = reader.next_header().await? {
        if header.kind != FrameKind::Chunk {
            return Err(TransferError::Protocol(format!("a {:?} frame on a chunk stream", header.kind)));
        }
        let (file_index, offset_bytes, len_bytes) =
            (header.chunk_file_index, header.chunk_offset_bytes, header.body_len_bytes);
        let verdict = locked(&inbound.conversation).check_chunk(file_index, offset_bytes, len_bytes)?;
        let chunk_index = match verdict {
            ChunkVerdict::Duplicate { chunk_index } | ChunkVerdict::Write { chunk_index } => chunk_index,
        };
        // Counted before the body is read: bytes in flight when a run dies count as received,
        // so a resend after it shows in bytes_resent.
        inbound.log.append(LogRecord::Receiving { file_index, chunk_index, len_bytes })?;
        inbound.received.fetch_add(u64::from(len_bytes), Ordering::Relaxed);
        reader.read_body(&header, &mut body).await?;
        if let Some(damaged) = crate::failpoint::damage_target_chunk(body.pieces()) {
            body.clear();
            body.push(damaged);
        }
        let found = body.crc32c();
        if found != header.body_crc32c {
            return Err(TransferError::ChunkChecksum { file_index, offset_bytes, expected: header.body_crc32c, found });
        }
        let chunk = ChunkRef { file_index, chunk_index };
        let event = match verdict {
            ChunkVerdict::Duplicate { .. } => ChunkEvent::Duplicate(chunk),
            ChunkVerdict::Write { .. } => {
                body = write_verified(inbound, body, chunk, offset_bytes).await?;
                ChunkEvent::Written { chunk, crc32c: found, len_bytes }
            }
        };
        events.send(Ok(event)).await.map_err(|_| TransferError::Local("transfer ended".into()))?;
    }
    Ok(())
}

/// Writes a verified chunk body at its offset in its part file with one gathered write (the
/// pieces as quinn received them, not copied together first), then logs the chunk verified.
/// Hands the emptied body back for the stream's next chunk.
async fn write_verified(
    inbound: &Arc<Inbound>,
    mut body: BodyPieces,
    chunk: ChunkRef,
    offset_bytes: u64,
) -> Result<BodyPieces, TransferError> {
    let part = inbound.part(chunk.file_index)?;
    let inbound = inbound.clone();
    blocking(move || {
        let slices: Vec<std::io::IoSlice<'_>> = body.pieces().iter().map(|p| std::io::IoSlice::new(p)).collect();
        let crc32c = body.crc32c();
        super::steps::write_chunk(&*part, &inbound.layout, &inbound.log, chunk, offset_bytes, &slices, crc32c)?;
        drop(slices);
        body.clear();
        Ok(body)
    })
    .await
}
