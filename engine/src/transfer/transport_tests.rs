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
use ferry_wire::message::{Message, Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::proto::source::{CopyPlan, SourceConversation};
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
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let source_path = dir.path().join("seg-1");
    std::fs::write(&source_path, &data).unwrap();
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
    let (source_node, target_node) = (NodeId::new("source").unwrap(), NodeId::new("target").unwrap());
    let hello = |node: &NodeId| Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node.clone() };

    // The source's machine, past the target's hello and accept: it hands out chunks.
    let plan = CopyPlan { wal: false, cutover: false, commit: true };
    let mut source = SourceConversation::copy(&source_node, offer.clone(), plan);
    source.handle_message(Some(hello(&target_node)), 0).unwrap();
    let accept = Message::Accept { resume: Vec::new(), bytes_resent: 0, already_staged: false };
    source.handle_message(Some(accept), 0).unwrap();
    while source.poll_action().is_some() {}
    let source = Arc::new(Mutex::new(source));

    // The target's machine, admitted, and its staging.
    let mut target = TargetConversation::new(target_node.clone(), u64::MAX);
    target.handle_message(Some(hello(&source_node))).unwrap();
    target.handle_message(Some(Message::Offer(offer.clone()))).unwrap();
    target
        .handle_admitted(ferry_wire::proto::target::Admitted::Receive { session: TargetSession::new(&offer) })
        .unwrap();
    while target.poll_action().is_some() {}
    let storage: Arc<dyn Storage> = Arc::new(DiskStorage);
    let layout = StagingLayout::new(&dir.path().join("data"), &id);
    staging::prepare_fresh(&*storage, &layout).unwrap();
    let log = Arc::new(ChunkLog::create(&*storage, &layout, &offer).unwrap());
    let conversation = Arc::new(Mutex::new(target));
    let inbound = Arc::new(Inbound {
        conversation: conversation.clone(),
        parts: Mutex::new(HashMap::new()),
        layout: layout.clone(),
        storage: storage.clone(),
        log,
        received: Arc::new(AtomicU64::new(0)),
    });

    let (events_tx, mut events) = mpsc::channel(64);
    let receiver = tokio::spawn(accept_chunk_streams(arrivals, inbound.clone(), events_tx));
    let reader = Arc::new(ChunkReader::new(ReadMode::Pread, ReaderConfig::default()).unwrap());
    let files = Arc::new(vec![SourceFile::open_shared(&source_path).unwrap()]);
    let (chunk_read, rate, origin) = (Arc::new(Notify::new()), RateHandle::new(0, u64::from(CHUNK)), Instant::now());
    let mut senders = Vec::new();
    for _ in 0..lanes_count {
        let (opener, files, reader, source, chunk_read, rate) =
            (lanes.clone(), files.clone(), reader.clone(), source.clone(), chunk_read.clone(), rate.clone());
        senders.push(tokio::spawn(send_stream(opener, files, reader, source, chunk_read, rate, origin)));
    }
    for lane in senders {
        lane.await.unwrap().unwrap();
    }

    // Every chunk arrives once, is acked by the target's machine, and the file is whole.
    let chunks_count = data.len().div_ceil(CHUNK as usize);
    let mut written = Vec::new();
    while written.len() < chunks_count {
        match events.recv().await.unwrap().unwrap() {
            event @ ChunkEvent::Written { .. } => written.push(event),
            other => panic!("a chunk sent once came as {other:?}"),
        }
    }
    let mut target = conversation.lock().unwrap();
    target.handle_chunks(&written).unwrap();
    let acked = std::iter::from_fn(|| target.poll_action())
        .map(|a| match a {
            TargetAction::Send(Message::Acks { chunks }) => chunks.len(),
            other => panic!("{other:?}"),
        })
        .sum::<usize>();
    assert_eq!(acked, chunks_count);
    assert_eq!(target.progress().map(|p| p.0), Some(data.len() as u64), "bytes verified");
    drop(target);
    inbound.sync().unwrap();
    assert_eq!(std::fs::read(layout.part_path(0)).unwrap(), data);
    receiver.abort();
}
