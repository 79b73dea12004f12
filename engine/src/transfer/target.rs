//! The target's receiver: takes inbound base copies and lands them in staging.
//!
//! What it does: accepts QUIC connections, runs the target side of the conversation in
//! [`ferry_wire::message`], receives chunk frames on uni streams (checking each against the
//! offer and its CRC32C before writing it at its offset through the storage seam), finalises
//! each file when the source's `FileDone` agrees with the verified chunks, and writes
//! `MANIFEST.json` last.
//!
//! What it does not: resume a partial staging (an unfinished one is started again; chunk-level
//! resume is a later step), or trust anything the peer says before checking it.
//!
//! Bounds: one chunk buffer per uni stream (at most `CHUNK_LEN_MAX_BYTES`), at most
//! `uni_streams_max_count` streams per connection, a bounded event queue per transfer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::frame::{FrameKind, PROTOCOL_VERSION};
use ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES;
use ferry_wire::manifest::{StagedSegment, StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::message::{ChunkRef, Message, Offer};
use ferry_wire::session::{ChunkVerdict, FileDone, TargetSession};
use ferry_wire::{MigrationId, NodeId};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use super::framing::{read_body, read_control, read_header, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::TransferError;
use crate::staging::{self, StagingLayout};
use crate::storage::{Storage, StorageFile};

/// How long a connected peer has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Events (acks, ready files) queued between chunk streams and the control loop.
const EVENT_QUEUE_MAX_COUNT: usize = 1024;

/// Progress of one inbound transfer, as the daemon shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundStatus {
    pub source_node: Option<String>,
    pub bytes_verified: u64,
    pub bytes_total: u64,
    pub files_staged_count: u64,
    pub files_total_count: u64,
    pub state: String,
}

/// What the receiver needs: where staging goes, how it is written, who this node is.
#[derive(Debug)]
pub struct TargetContext {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    status: Mutex<BTreeMap<MigrationId, InboundStatus>>,
}

impl TargetContext {
    pub fn new(node_id: NodeId, data_dir: PathBuf, storage: Arc<dyn Storage>) -> Self {
        Self { node_id, data_dir, storage, status: Mutex::new(BTreeMap::new()) }
    }

    fn status(&self) -> MutexGuard<'_, BTreeMap<MigrationId, InboundStatus>> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of every inbound transfer's status.
    pub fn inbound(&self) -> BTreeMap<MigrationId, InboundStatus> {
        self.status().clone()
    }

    fn update(&self, id: &MigrationId, f: impl FnOnce(&mut InboundStatus)) {
        f(self.status().entry(id.clone()).or_default());
    }
}

/// Accepts connections until the endpoint closes. A failing peer never stops the loop.
pub async fn serve(endpoint: Endpoint, ctx: Arc<TargetContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(%remote, "refused a peer at the handshake: {e}");
                    return;
                }
            };
            let peer = crate::tls::peer_node_id(&conn).map(|n| n.to_string());
            match handle_connection(&conn, &ctx, peer.clone()).await {
                Ok(()) => tracing::info!(%remote, ?peer, "inbound transfer connection finished"),
                Err(e) => {
                    let (_, code) = e.kind_and_code();
                    tracing::warn!(%remote, ?peer, "inbound transfer failed: {e}");
                    conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
                }
            }
        });
    }
}

/// Runs one connection: the control conversation, and the chunk streams it owns.
pub async fn handle_connection(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    peer: Option<String>,
) -> Result<(), TransferError> {
    let (mut send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| TransferError::Timeout("the source's control stream"))??;
    let result = converse(conn, ctx, peer, &mut send, recv).await;
    if let Err(e) = &result {
        let (kind, _) = e.kind_and_code();
        // Best effort: tell the source why before the connection closes.
        let _ = write_control(&mut send, &Message::error(kind, e.to_string())).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    result
}

/// Messages from the source's control stream, read by their own task (reads are not
/// cancel-safe, so they never sit in a `select!`).
type Messages = mpsc::Receiver<Result<Message, TransferError>>;

fn spawn_reader(mut recv: RecvStream) -> (Messages, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            match read_control(&mut recv, CONTROL_BODY_LEN_MAX_BYTES).await {
                Ok(Some(message)) => {
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    (rx, AbortOnDrop(task))
}

/// Aborts a task when dropped, so no task outlives the transfer that spawned it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
}

async fn converse(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    peer: Option<String>,
    send: &mut SendStream,
    mut recv: RecvStream,
) -> Result<(), TransferError> {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES))
        .await
        .map_err(|_| TransferError::Timeout("the source's hello"))??;
    match hello {
        Some(Message::Hello { protocol_version, .. }) if protocol_version == PROTOCOL_VERSION => {}
        Some(Message::Hello { protocol_version, .. }) => {
            return Err(TransferError::IncompatibleVersion { ours: PROTOCOL_VERSION, theirs: protocol_version })
        }
        other => return Err(TransferError::Protocol(format!("expected hello, got {}", describe(other.as_ref())))),
    }
    write_control(send, &Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: ctx.node_id.clone() }).await?;
    let offer = match read_control(&mut recv, CONTROL_BODY_LEN_MAX_BYTES).await? {
        Some(Message::Offer(offer)) => offer,
        other => return Err(TransferError::Protocol(format!("expected an offer, got {}", describe(other.as_ref())))),
    };
    offer.validate().map_err(|e| TransferError::Protocol(e.to_string()))?;
    let _claim = Claim::take(ctx, &offer.migration_id)?;
    let id = offer.migration_id.clone();
    ctx.update(&id, |s| {
        *s = InboundStatus {
            source_node: peer,
            bytes_total: offer.bytes_total(),
            files_total_count: offer.files.len() as u64,
            state: "receiving".into(),
            ..Default::default()
        }
    });
    let layout = StagingLayout::new(&ctx.data_dir, &id);
    let storage = ctx.storage.clone();
    let (already_staged, offer) = {
        let layout = layout.clone();
        blocking(move || check_existing(&*storage, &layout, offer)).await?
    };
    write_control(send, &Message::Accept { resume: Vec::new(), bytes_resent: 0, already_staged }).await?;
    let (mut messages, _reader) = spawn_reader(recv);
    let bytes_resent = if already_staged {
        0
    } else {
        let result = receive_base(conn, ctx, &offer, &layout, send, &mut messages).await;
        if result.is_err() {
            ctx.update(&id, |s| s.state = "failed".into());
        }
        result?
    };
    ctx.update(&id, |s| {
        s.state = "base_staged".into();
        s.bytes_verified = s.bytes_total;
        s.files_staged_count = s.files_total_count;
    });
    write_control(send, &Message::BaseStaged { bytes_resent }).await?;
    commit_phase(ctx, &layout, send, &mut messages).await
}

fn describe(message: Option<&Message>) -> String {
    match message {
        None => "the end of the stream".into(),
        Some(m) => format!("a {} message", m.name()),
    }
}

/// Marks a migration as being received on one connection, so a second connection for the
/// same id is refused instead of writing into the same staging.
struct Claim {
    ctx: Arc<TargetContext>,
    id: MigrationId,
}

static ACTIVE: Mutex<Vec<(usize, MigrationId)>> = Mutex::new(Vec::new());

impl Claim {
    fn take(ctx: &Arc<TargetContext>, id: &MigrationId) -> Result<Self, TransferError> {
        let key = Arc::as_ptr(ctx) as usize;
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if active.iter().any(|(k, i)| *k == key && i == id) {
            return Err(TransferError::Refused(format!(
                "migration {id} is already being received on another connection"
            )));
        }
        active.push((key, id.clone()));
        Ok(Self { ctx: ctx.clone(), id: id.clone() })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let key = Arc::as_ptr(&self.ctx) as usize;
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|(k, i)| !(*k == key && *i == self.id));
    }
}

/// Whether this exact base is staged already; otherwise prepares a fresh staging.
fn check_existing(storage: &dyn Storage, layout: &StagingLayout, offer: Offer) -> Result<(bool, Offer), TransferError> {
    if let Some(manifest) = staging::read_manifest(storage, layout)? {
        let same = manifest.base_complete
            && manifest.vshard_id == offer.vshard_id
            && manifest.base_lsn == offer.base_lsn
            && manifest.segments.len() == offer.files.len()
            && manifest
                .segments
                .iter()
                .zip(&offer.files)
                .all(|(s, f)| s.path == f.path && s.size_bytes == f.size_bytes);
        if !same || manifest.state == StagingState::Aborted {
            return Err(TransferError::Refused(format!(
                "staging {} already holds a different or aborted migration {}: forget it or use a new migration id",
                layout.root.display(),
                manifest.migration_id
            )));
        }
        return Ok((true, offer));
    }
    staging::prepare_fresh(storage, layout)?;
    Ok((false, offer))
}

/// State shared by the chunk streams of one inbound transfer.
struct Inbound {
    session: Mutex<TargetSession>,
    parts: Mutex<HashMap<u32, Arc<dyn StorageFile>>>,
    layout: StagingLayout,
    storage: Arc<dyn Storage>,
}

impl Inbound {
    fn session(&self) -> MutexGuard<'_, TargetSession> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn part(&self, file_index: u32) -> Result<Arc<dyn StorageFile>, TransferError> {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(part) = parts.get(&file_index) {
            return Ok(part.clone());
        }
        let part = staging::open_part(&*self.storage, &self.layout, file_index)?;
        parts.insert(file_index, part.clone());
        Ok(part)
    }
}

/// What chunk streams tell the control loop. Only the control loop marks chunks verified, so
/// an acknowledgement is always sent before the file it completes is reported staged.
enum Event {
    Written { chunk: ChunkRef, crc32c: u32 },
    Duplicate(ChunkRef),
    Failed(TransferError),
}

async fn receive_base(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    offer: &Offer,
    layout: &StagingLayout,
    send: &mut SendStream,
    messages: &mut Messages,
) -> Result<u64, TransferError> {
    let inbound = Arc::new(Inbound {
        session: Mutex::new(TargetSession::new(offer)),
        parts: Mutex::new(HashMap::new()),
        layout: layout.clone(),
        storage: ctx.storage.clone(),
    });
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE_MAX_COUNT);
    let _acceptor = AbortOnDrop(tokio::spawn(accept_chunk_streams(conn.clone(), inbound.clone(), events_tx)));
    let files_count = offer.files.len();
    let mut staged_count = 0usize;
    while staged_count < files_count {
        let mut ready = Vec::new();
        tokio::select! {
            message = messages.recv() => match message {
                Some(Ok(Message::FileDone { file_index, size_bytes, crc32c })) => {
                    let done = FileDone { file_index, size_bytes, crc32c };
                    ready.extend(inbound.session().on_file_done(done)?);
                }
                Some(Ok(Message::Error { kind, message })) => return Err(TransferError::Peer { kind, message }),
                Some(Ok(other)) => return Err(TransferError::Protocol(format!("unexpected {} while receiving the base", describe(Some(&other))))),
                Some(Err(e)) => return Err(e),
                None => return Err(TransferError::Protocol("the source closed its control stream before the base was staged".into())),
            },
            event = events.recv() => {
                let mut acks = Vec::new();
                let mut next = event;
                while let Some(event) = next {
                    match event {
                        Event::Written { chunk, crc32c } => {
                            ready.extend(inbound.session().on_chunk_written(chunk.file_index, chunk.chunk_index, crc32c)?);
                            acks.push(chunk);
                        }
                        Event::Duplicate(chunk) => acks.push(chunk),
                        Event::Failed(e) => return Err(e),
                    }
                    next = events.try_recv().ok();
                }
                if !acks.is_empty() {
                    write_control(send, &Message::Acks { chunks: acks }).await?;
                }
                let verified = inbound.session().bytes_verified();
                ctx.update(&offer.migration_id, |s| s.bytes_verified = verified);
            }
        }
        for done in ready {
            let path = offer
                .files
                .get(done.file_index as usize)
                .map(|f| f.path.clone())
                .ok_or_else(|| TransferError::Protocol(format!("no file {}", done.file_index)))?;
            let (storage, layout_owned) = (ctx.storage.clone(), layout.clone());
            inbound.parts.lock().unwrap_or_else(|e| e.into_inner()).remove(&done.file_index);
            blocking(move || {
                staging::finalize_file(&*storage, &layout_owned, done.file_index, &path, done.size_bytes, done.crc32c)?;
                Ok(())
            })
            .await?;
            staged_count += 1;
            ctx.update(&offer.migration_id, |s| s.files_staged_count = staged_count as u64);
            write_control(send, &Message::FileStaged { file_index: done.file_index }).await?;
        }
    }
    let manifest = StagingManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        migration_id: offer.migration_id.clone(),
        vshard_id: offer.vshard_id,
        base_lsn: offer.base_lsn,
        final_lsn: None,
        state: StagingState::Copying,
        base_complete: true,
        db_meta: offer.db_meta.clone(),
        segments: Vec::new(),
        wal_segments: Vec::new(),
    };
    let bytes_resent = inbound.session().bytes_resent();
    let (storage, layout_owned, offer_owned) = (ctx.storage.clone(), layout.clone(), offer.clone());
    let crcs = inbound_crcs(&inbound, offer)?;
    blocking(move || {
        let paths: Vec<_> = offer_owned.files.iter().map(|f| f.path.clone()).collect();
        staging::sync_segment_tree(&*storage, &layout_owned, &paths)?;
        let segments = offer_owned
            .files
            .iter()
            .zip(crcs)
            .map(|(f, crc32c)| StagedSegment { path: f.path.clone(), size_bytes: f.size_bytes, crc32c })
            .collect();
        staging::write_manifest(&*storage, &layout_owned, &StagingManifest { segments, ..manifest })?;
        Ok(())
    })
    .await?;
    Ok(bytes_resent)
}

/// Each file's CRC32C as the source announced it and the target verified it.
fn inbound_crcs(inbound: &Inbound, offer: &Offer) -> Result<Vec<u32>, TransferError> {
    let session = inbound.session();
    (0..offer.files.len())
        .map(|i| {
            u32::try_from(i)
                .ok()
                .and_then(|i| session.file_crc(i))
                .ok_or_else(|| TransferError::Local(format!("file {i} finished without a checksum")))
        })
        .collect()
}

async fn accept_chunk_streams(conn: Connection, inbound: Arc<Inbound>, events: mpsc::Sender<Event>) {
    let mut streams = Vec::new();
    loop {
        match conn.accept_uni().await {
            Ok(recv) => {
                let (inbound, events) = (inbound.clone(), events.clone());
                streams.push(AbortOnDrop(tokio::spawn(async move {
                    if let Err(e) = receive_chunks(recv, &inbound, &events).await {
                        let _ = events.send(Event::Failed(e)).await;
                    }
                })));
            }
            Err(e) => {
                let _ = events.send(Event::Failed(e.into())).await;
                return;
            }
        }
    }
}

async fn receive_chunks(
    mut recv: RecvStream,
    inbound: &Arc<Inbound>,
    events: &mpsc::Sender<Event>,
) -> Result<(), TransferError> {
    while let Some(header) = read_header(&mut recv).await? {
        if header.kind != FrameKind::Chunk {
            return Err(TransferError::Protocol(format!("a {:?} frame on a chunk stream", header.kind)));
        }
        let (file_index, offset_bytes) = (header.chunk_file_index, header.chunk_offset_bytes);
        let verdict = inbound.session().check_chunk(file_index, offset_bytes, header.body_len_bytes)?;
        let body = read_body(&mut recv, &header).await?;
        let found = ferry_wire::crc32c(&body);
        if found != header.body_crc32c {
            return Err(TransferError::ChunkChecksum { file_index, offset_bytes, expected: header.body_crc32c, found });
        }
        let event = match verdict {
            ChunkVerdict::Duplicate { chunk_index } => Event::Duplicate(ChunkRef { file_index, chunk_index }),
            ChunkVerdict::Write { chunk_index } => {
                let part = inbound.part(file_index)?;
                let path = inbound.layout.part_path(file_index);
                blocking(move || {
                    part.write_at(&body, offset_bytes).map_err(|source| {
                        TransferError::Staging(staging::StagingError::Io { what: "write", path, source })
                    })
                })
                .await?;
                Event::Written { chunk: ChunkRef { file_index, chunk_index }, crc32c: found }
            }
        };
        events.send(event).await.map_err(|_| TransferError::Local("transfer ended".into()))?;
    }
    Ok(())
}

async fn commit_phase(
    ctx: &Arc<TargetContext>,
    layout: &StagingLayout,
    send: &mut SendStream,
    messages: &mut Messages,
) -> Result<(), TransferError> {
    loop {
        match messages.recv().await {
            Some(Ok(Message::Commit { final_lsn })) => {
                let (storage, layout_owned) = (ctx.storage.clone(), layout.clone());
                blocking(move || {
                    let mut manifest = staging::read_manifest(&*storage, &layout_owned)?
                        .ok_or_else(|| TransferError::Local("MANIFEST.json vanished before commit".into()))?;
                    if manifest.state != StagingState::Released {
                        manifest.state = StagingState::Released;
                        manifest.final_lsn = Some(final_lsn);
                        staging::write_manifest(&*storage, &layout_owned, &manifest)?;
                    }
                    Ok(())
                })
                .await?;
                write_control(send, &Message::Committed).await?;
            }
            Some(Ok(Message::Error { kind, message })) => return Err(TransferError::Peer { kind, message }),
            Some(Ok(other)) => {
                return Err(TransferError::Protocol(format!(
                    "unexpected {} after the base was staged",
                    describe(Some(&other))
                )))
            }
            Some(Err(e)) => return Err(e),
            None => {
                // The source finished its side; finish ours (it waits for this before it
                // closes the connection).
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}
