//! The chunk transport seam with no network: the source's chunk streams (`ship::send_stream`,
//! driven by the production `SourceConversation`) send a file over in-memory lanes, and the
//! target's (`chunks_in`, checking through the production `TargetConversation`) write it into
//! a real staging. Only the transport differs from a QUIC copy.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_wire::frame::PROTOCOL_VERSION;
use ferry_wire::message::{FileResume, Message, Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::proto::source::{CopyPlan, SourceAction, SourceConversation};
use ferry_wire::proto::target::{ChunkEvent, TargetAction, TargetConversation};
use ferry_wire::session::TargetSession;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};
use tokio::sync::{mpsc, Notify};

use super::chunklog::ChunkLog;
use super::chunks_in::{accept_chunk_streams, Inbound};
use super::rate::RateHandle;
use super::ship::send_stream;
use super::transport::{memory, ChunkArrivals, ChunkLanes};
use crate::read::{ChunkReader, ReadMode, ReaderConfig, SourceFile};
use crate::staging::{self, StagingLayout};
use crate::storage::{DiskStorage, Storage};

const CHUNK: u32 = 64 << 10;

#[tokio::test]
async fn chunks_cross_in_memory_lanes_between_the_real_machines_into_a_staging() {
    let (opener, acceptor) = memory::path();
    copy_one_file_over(opener, acceptor, 3).await;
}

/// Copies a 1 MB file from a source's chunk streams (`lanes_count` of them, on `lanes`) to a
/// target's (on `arrivals`) through the production machines, and checks what landed.
pub(super) async fn copy_one_file_over<L: ChunkLanes, A: ChunkArrivals>(lanes: L, arrivals: A, lanes_count: usize) {
    let rig = Rig::new();
    let attempt = rig.attempt(lanes, arrivals, lanes_count, &[]).await;
    assert!(attempt.source_error.is_none(), "{:?}", attempt.source_error);
    assert_eq!(attempt.written.len(), rig.chunks_count());
    assert_eq!(rig.part(), rig.data);
}

/// One file to copy, its offer, and the target's staging, kept across attempts.
pub(super) struct Rig {
    dir: tempfile::TempDir,
    pub(super) data: Vec<u8>,
    offer: Offer,
    layout: StagingLayout,
    storage: Arc<dyn Storage>,
    log: Arc<ChunkLog>,
}

/// What one attempt did: the chunks the target wrote and acked (index, CRC32C), and the first
/// error of a source chunk stream (none: every stream ended cleanly).
pub(super) struct Attempt {
    pub(super) written: Vec<(u64, u32)>,
    pub(super) source_error: Option<super::TransferError>,
}

impl Rig {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(dir.path().join("seg-1"), &data).unwrap();
        let id = MigrationId::new("m-mem").unwrap();
        let offer = Offer {
            migration_id: id.clone(),
            vshard_id: VShardId(1),
            base_lsn: Lsn(1),
            chunk_len_bytes: CHUNK,
            files: vec![OfferFile { path: RelPath::new("seg-1").unwrap(), size_bytes: data.len() as u64 }],
            db_meta: serde_json::Value::Null,
            wal: false,
        };
        let storage: Arc<dyn Storage> = Arc::new(DiskStorage);
        let layout = StagingLayout::new(&dir.path().join("data"), &id);
        staging::prepare_fresh(&*storage, &layout).unwrap();
        let log = Arc::new(ChunkLog::create(&*storage, &layout, &offer).unwrap());
        Self { dir, data, offer, layout, storage, log }
    }

    pub(super) fn chunks_count(&self) -> usize {
        self.data.len().div_ceil(CHUNK as usize)
    }

    /// The part file as the target wrote it.
    pub(super) fn part(&self) -> Vec<u8> {
        std::fs::read(self.layout.part_path(0)).unwrap()
    }

    /// One attempt: the source resumes past `held` (the chunks the target holds, as its accept
    /// says), and the target's session knows them, as after a restart.
    pub(super) async fn attempt<L: ChunkLanes, A: ChunkArrivals>(
        &self,
        lanes: L,
        arrivals: A,
        lanes_count: usize,
        held: &[(u64, u32)],
    ) -> Attempt {
        let (source_node, target_node) = (NodeId::new("source").unwrap(), NodeId::new("target").unwrap());
        let hello = |node: &NodeId| Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node.clone() };

        // The source's machine, past the target's hello and accept (and the rechecks of the
        // chunks the target holds): it hands out chunks.
        let plan = CopyPlan { wal: false, cutover: false, commit: true };
        let mut source = SourceConversation::copy(&source_node, self.offer.clone(), plan);
        source.handle_message(Some(hello(&target_node)), 0).unwrap();
        let resume =
            if held.is_empty() { Vec::new() } else { vec![FileResume { file_index: 0, chunks: held.to_vec() }] };
        source.handle_message(Some(Message::Accept { resume, bytes_resent: 0, already_staged: false }), 0).unwrap();
        while let Some(action) = source.poll_action() {
            if let SourceAction::Recheck(spans) = action {
                for span in spans {
                    let start = span.offset_bytes as usize;
                    let crc = ferry_wire::crc32c(&self.data[start..start + span.len_bytes as usize]);
                    source.handle_chunk_read(&span, crc).unwrap();
                }
            }
        }
        let source = Arc::new(Mutex::new(source));

        // The target's machine, admitted with what it holds, and its staging.
        let mut session = TargetSession::new(&self.offer);
        for (chunk_index, crc) in held {
            session.restore_chunk(0, *chunk_index, *crc).unwrap();
        }
        let mut target = TargetConversation::new(target_node.clone(), u64::MAX);
        target.handle_message(Some(hello(&source_node))).unwrap();
        target.handle_message(Some(Message::Offer(self.offer.clone()))).unwrap();
        target.handle_admitted(ferry_wire::proto::target::Admitted::Receive { session }).unwrap();
        while target.poll_action().is_some() {}
        let conversation = Arc::new(Mutex::new(target));
        let inbound = Arc::new(Inbound {
            conversation: conversation.clone(),
            parts: Mutex::new(HashMap::new()),
            layout: self.layout.clone(),
            storage: self.storage.clone(),
            log: self.log.clone(),
            received: Arc::new(AtomicU64::new(0)),
            chunk_len_bytes: CHUNK,
        });

        let (events_tx, mut events) = mpsc::channel(64);
        let receiver = tokio::spawn(accept_chunk_streams(arrivals, inbound.clone(), events_tx));
        let reader = Arc::new(ChunkReader::new(ReadMode::Pread, ReaderConfig::default()).unwrap());
        let files = Arc::new(vec![SourceFile::open_shared(self.dir.path().join("seg-1")).unwrap()]);
        let (chunk_read, rate, origin) =
            (Arc::new(Notify::new()), RateHandle::new(0, u64::from(CHUNK)), Instant::now());
        let mut senders = Vec::new();
        for _ in 0..lanes_count {
            let (opener, files, reader, source, chunk_read, rate) =
                (lanes.clone(), files.clone(), reader.clone(), source.clone(), chunk_read.clone(), rate.clone());
            senders.push(tokio::spawn(send_stream(opener, files, reader, source, chunk_read, rate, origin)));
        }
        let mut source_error = None;
        for lane in senders {
            if let Err(e) = lane.await.unwrap() {
                source_error.get_or_insert(e);
            }
        }

        // Every chunk sent arrives once and is acked by the target's machine. After a failed
        // attempt, what arrived is what the target wrote before its streams went quiet.
        let missing_count = self.chunks_count() - held.len();
        let mut written = Vec::new();
        while written.len() < missing_count {
            let next = if source_error.is_some() {
                match tokio::time::timeout(std::time::Duration::from_millis(500), events.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else {
                events.recv().await
            };
            match next.unwrap() {
                Ok(event @ ChunkEvent::Written { .. }) => written.push(event),
                Ok(other) => panic!("a chunk sent once came as {other:?}"),
                Err(e) => assert!(source_error.is_some(), "a target stream failed in a clean attempt: {e}"),
            }
        }
        let mut target = conversation.lock().unwrap();
        target.handle_chunks(&written).unwrap();
        let acked = std::iter::from_fn(|| target.poll_action())
            .map(|a| match a {
                TargetAction::Send(Message::Acks { chunks }) => chunks.len(),
                TargetAction::Send(Message::FileStaged { .. }) | TargetAction::FinalizeFile { .. } => 0,
                other => panic!("{other:?}"),
            })
            .sum::<usize>();
        assert_eq!(acked, written.len());
        drop(target);
        inbound.sync().unwrap();
        receiver.abort();
        let written = written
            .into_iter()
            .filter_map(|e| match e {
                ChunkEvent::Written { chunk, crc32c, .. } => Some((chunk.chunk_index, crc32c)),
                _ => None,
            })
            .collect();
        Attempt { written, source_error }
    }
}
