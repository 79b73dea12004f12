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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::checkpoint::LogRecord;
use ferry_wire::frame::{FrameKind, PROTOCOL_VERSION};
use ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES;
use ferry_wire::manifest::{StagedSegment, StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::message::{ChunkRef, Message, Offer};
use ferry_wire::proto::inbound::{Begin, ConnId};
use ferry_wire::session::{ChunkVerdict, FileDone, TargetSession};
use ferry_wire::MigrationId;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use super::chunklog::{self, ChunkLog};
use super::framing::{read_control, write_control, BodyPieces, FrameReader, SMALL_CONTROL_BODY_MAX_BYTES};
use super::inbound::{now_unix_ms, summary, ClaimGuard};
pub use super::inbound::{InboundStatus, TargetContext, TargetLimits};
use super::task::AbortOnDrop;
use super::TransferError;
use crate::staging::{self, StagingLayout};
use crate::storage::{Storage, StorageFile};

/// How long a connected peer has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Events (written chunks) queued between chunk streams and the control loop.
const EVENT_QUEUE_MAX_COUNT: usize = 1024;
/// Written bytes after which part files and the chunk log are synced (data first). Bounds what
/// a power loss makes the source send again; a killed process loses nothing of it.
const SYNC_BATCH_BYTES: u64 = 64 << 20;

/// A transfer being received, as extra data connections find it.
struct Joinable {
    /// The connection whose claim the transfer runs under.
    conn: ConnId,
    inbound: Arc<Inbound>,
    events: mpsc::Sender<Event>,
}

/// The transfers that extra data connections may join, shared by the connections of one
/// endpoint; `changed` wakes a join waiting for its transfer to start taking chunks.
#[derive(Default)]
struct Joins {
    joinable: Mutex<HashMap<MigrationId, Joinable>>,
    changed: tokio::sync::Notify,
}

impl Joins {
    fn open(&self, id: &MigrationId, joinable: Joinable) {
        locked(&self.joinable).insert(id.clone(), joinable);
        self.changed.notify_waiters();
    }

    /// Closes `id` to joins, unless a newer connection's transfer replaced it.
    fn close(&self, id: &MigrationId, conn: ConnId) {
        let mut joinable = locked(&self.joinable);
        if joinable.get(id).is_some_and(|j| j.conn == conn) {
            joinable.remove(id);
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts connections until the endpoint closes. A failing peer never stops the loop.
pub async fn serve(endpoint: Endpoint, ctx: Arc<TargetContext>) {
    let joins = Arc::new(Joins::default());
    while let Some(incoming) = endpoint.accept().await {
        let (ctx, joins) = (ctx.clone(), joins.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(%remote, "refused a peer at the handshake: {e}");
                    return;
                }
            };
            ctx.connected(&conn);
            let peer = crate::tls::peer_node_id(&conn).map(|n| n.to_string());
            match handle_connection(&conn, &ctx, &joins, peer.clone()).await {
                Ok(()) => tracing::debug!(%remote, ?peer, "inbound transfer connection finished"),
                Err(e) => {
                    let (_, code) = e.kind_and_code();
                    tracing::warn!(%remote, ?peer, "inbound transfer failed: {e}");
                    crate::metrics::count_error(e.metric_kind());
                    conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
                }
            }
            ctx.disconnected(&conn);
        });
    }
}

/// Runs one connection: the control conversation, and the chunk streams it owns.
async fn handle_connection(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    joins: &Arc<Joins>,
    peer: Option<String>,
) -> Result<(), TransferError> {
    let (mut send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| TransferError::Timeout("the source's control stream"))??;
    let result = converse(conn, ctx, joins, peer, &mut send, recv).await;
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
}

/// Answers a one-shot request (release, abort) and finishes the stream.
async fn answer_and_finish(send: &mut SendStream, answer: &Message) -> Result<(), TransferError> {
    write_control(send, answer).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    Ok(())
}

/// Refuses a request about `id` from a node other than the one receiving it.
fn check_peer(ctx: &TargetContext, id: &MigrationId, peer: Option<&str>) -> Result<(), TransferError> {
    if ctx.machine().may_act(id, peer) {
        return Ok(());
    }
    Err(TransferError::Refused(format!("migration {id} is received from another node")))
}

async fn converse(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    joins: &Arc<Joins>,
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
        Some(Message::Join { migration_id }) => return join(conn, ctx, joins, peer, send, &migration_id).await,
        Some(Message::Release { migration_id, final_lsn }) => {
            check_peer(ctx, &migration_id, peer.as_deref())?;
            super::fence_target::release_staging(ctx, &migration_id, final_lsn).await?;
            return answer_and_finish(send, &Message::Released).await;
        }
        Some(Message::Abort { migration_id, reason }) => {
            check_peer(ctx, &migration_id, peer.as_deref())?;
            let reason = format!("{reason} (asked by source {})", peer.as_deref().unwrap_or("?"));
            super::abort::abort_staging(ctx, &migration_id, &reason).await?;
            return answer_and_finish(send, &Message::Aborted).await;
        }
        other => return Err(TransferError::Protocol(format!("expected an offer, got {}", describe(other.as_ref())))),
    };
    offer.validate().map_err(|e| TransferError::Protocol(e.to_string()))?;
    // Admitted and claimed, but not visible until the staging is ready: an offer the staging
    // refuses leaves the migration as it was, and its slot free (the claim's drop).
    let claim = ctx.claim(&offer, conn, peer.as_deref()).await?;
    let id = offer.migration_id.clone();
    let layout = StagingLayout::new(&ctx.data_dir, &id);
    let start = {
        let (storage, layout, offer) = (ctx.storage.clone(), layout.clone(), offer.clone());
        blocking(move || start_staging(&*storage, &layout, &offer)).await?
    };
    let begin = match &start {
        Start::AlreadyStaged { state, final_lsn } => Begin::AlreadyStaged { state: *state, final_lsn: *final_lsn },
        Start::Receive { .. } => Begin::Receive,
    };
    ctx.machine().begin(&summary(&offer), claim.conn(), begin, now_unix_ms())?;
    let _wal = offer.wal.then(|| spawn_wal_stream(conn.clone(), ctx.clone(), &offer, &layout));
    let (mut messages, _reader) = match start {
        Start::AlreadyStaged { .. } => {
            write_control(send, &Message::Accept { resume: Vec::new(), bytes_resent: 0, already_staged: true }).await?;
            spawn_reader(recv)
        }
        Start::Receive { session, log, restored } => {
            tracing::info!(
                migration = %id,
                chunks_kept = restored.chunks_kept_count,
                chunks_dropped = restored.chunks_dropped_count,
                files_staged = restored.files_staged_count,
                "staging ready"
            );
            let resume = session.resume_list();
            let bytes_resent = session.bytes_resent();
            write_control(send, &Message::Accept { resume, bytes_resent, already_staged: false }).await?;
            let (mut messages, reader) = spawn_reader(recv);
            let receiver = Receiver { conn, ctx, joins, claim: &claim, offer: &offer, layout: &layout };
            let result = receiver.receive_base(session, log, send, &mut messages).await;
            if result.is_err() {
                if let Err(e) = ctx.machine().interrupted(&id) {
                    tracing::debug!(migration = %id, "not marked interrupted: {e}");
                }
            }
            ctx.machine().base_staged(&id, result?)?;
            (messages, reader)
        }
    };
    let bytes_resent = ctx.machine().get(&id).map_or(0, |m| m.bytes_resent);
    write_control(send, &Message::BaseStaged { bytes_resent }).await?;
    commit_phase(ctx, &offer, &layout, send, &mut messages).await
}

/// Serves the WAL stream the source opens next on this connection.
fn spawn_wal_stream(conn: Connection, ctx: Arc<TargetContext>, offer: &Offer, layout: &StagingLayout) -> AbortOnDrop {
    let (id, base_lsn, layout) = (offer.migration_id.clone(), offer.base_lsn, layout.clone());
    AbortOnDrop(tokio::spawn(async move {
        let result = async {
            let (send, recv) = conn.accept_bi().await?;
            let layout_for_hook = layout.clone();
            let wal = {
                let (ctx, id) = (ctx.clone(), id.clone());
                blocking(move || ctx.wal_stages.get_or_open(&ctx.storage, &layout, &id, base_lsn)).await?
            };
            let ctx_durable = ctx.clone();
            let id_durable = id.clone();
            let unfence = super::fence_target::unfence_hook(ctx.clone(), id.clone(), layout_for_hook);
            super::walrecv::serve_stream(send, recv, wal, unfence, move |lsn| {
                ctx_durable.set_wal_durable(&id_durable, lsn);
            })
            .await
        }
        .await;
        if let Err(e) = result {
            let (_, code) = e.kind_and_code();
            tracing::warn!(migration = %id, "WAL stream failed: {e}");
            conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
        }
    }))
}

/// How long a join waits for the transfer it names to start taking chunks.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// An extra data connection: its uni streams feed the transfer offered on another connection.
async fn join(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    joins: &Joins,
    peer: Option<String>,
    send: &mut SendStream,
    id: &MigrationId,
) -> Result<(), TransferError> {
    // The transfer's connection answers `Accept` before it starts taking chunks, so a join
    // may come a moment before the transfer can be joined: it waits for that, a bounded time.
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    let (inbound, events) = loop {
        let opened = joins.changed.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        let claimant = {
            let machine = ctx.machine();
            machine.claimant(id).filter(|_| machine.may_act(id, peer.as_deref()))
        };
        let Some(claimant) = claimant else {
            return Err(TransferError::Refused(format!("no transfer {id} from this node is being received to join")));
        };
        if let Some(j) = locked(&joins.joinable).get(id).filter(|j| j.conn == claimant) {
            break (j.inbound.clone(), j.events.clone());
        }
        if tokio::time::timeout_at(deadline, opened).await.is_err() {
            return Err(TransferError::Refused(format!("transfer {id} is not receiving chunks")));
        }
    };
    write_control(send, &Message::Joined).await?;
    accept_chunk_streams(conn.clone(), inbound, events).await;
    Ok(())
}

fn describe(message: Option<&Message>) -> String {
    match message {
        None => "the end of the stream".into(),
        Some(m) => format!("a {} message", m.name()),
    }
}

enum Start {
    /// The base was staged before; its manifest says where the staging is.
    AlreadyStaged {
        state: StagingState,
        final_lsn: Option<ferry_wire::Lsn>,
    },
    Receive {
        session: TargetSession,
        log: Arc<ChunkLog>,
        restored: chunklog::Restored,
    },
}

/// Decides how to start: the base is staged already; an earlier run left chunks to resume
/// from; or a fresh staging.
fn start_staging(storage: &dyn Storage, layout: &StagingLayout, offer: &Offer) -> Result<Start, TransferError> {
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
        return Ok(Start::AlreadyStaged { state: manifest.state, final_lsn: manifest.final_lsn });
    }
    let mut session = TargetSession::new(offer);
    if let Some(replay) = ChunkLog::replay_existing(storage, layout, offer) {
        let log = ChunkLog::reopen(storage, layout, &replay)?;
        let restored = chunklog::restore(storage, layout, offer, &replay, &mut session)?;
        return Ok(Start::Receive { session, log: Arc::new(log), restored });
    }
    staging::prepare_fresh(storage, layout)?;
    let log = ChunkLog::create(storage, layout, offer)?;
    Ok(Start::Receive { session, log: Arc::new(log), restored: chunklog::Restored::default() })
}

/// State shared by the chunk streams of one inbound transfer.
struct Inbound {
    session: Mutex<TargetSession>,
    parts: Mutex<HashMap<u32, Arc<dyn StorageFile>>>,
    layout: StagingLayout,
    storage: Arc<dyn Storage>,
    log: Arc<ChunkLog>,
    received: Arc<AtomicU64>,
}

impl Inbound {
    fn session(&self) -> MutexGuard<'_, TargetSession> {
        locked(&self.session)
    }

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
    fn sync(&self) -> Result<(), TransferError> {
        let parts: Vec<_> = locked(&self.parts).iter().map(|(i, p)| (*i, p.clone())).collect();
        for (index, part) in parts {
            part.sync_data().map_err(|source| {
                TransferError::Staging(staging::StagingError::Io {
                    what: "fsync",
                    path: self.layout.part_path(index),
                    source,
                })
            })?;
        }
        Ok(self.log.sync()?)
    }
}

/// What chunk streams tell the control loop. Only the control loop marks chunks verified, so
/// an acknowledgement is always sent before the file it completes is reported staged.
enum Event {
    Written { chunk: ChunkRef, crc32c: u32, len_bytes: u32 },
    Duplicate(ChunkRef),
    Failed(TransferError),
}

/// The base copy of one claimed offer: what [`Receiver::receive_base`] needs besides the
/// session, its log and the control stream.
struct Receiver<'a> {
    conn: &'a Connection,
    ctx: &'a Arc<TargetContext>,
    joins: &'a Joins,
    claim: &'a ClaimGuard,
    offer: &'a Offer,
    layout: &'a StagingLayout,
}

impl Receiver<'_> {
    async fn receive_base(
        &self,
        session: TargetSession,
        log: Arc<ChunkLog>,
        send: &mut SendStream,
        messages: &mut Messages,
    ) -> Result<u64, TransferError> {
        let Self { conn, ctx, joins, claim, offer, layout } = *self;
        // Closed to joins however this ends (a newer connection's transfer is left alone).
        let _joins_closed = JoinsClosed { joins, id: &offer.migration_id, conn: claim.conn() };
        let inbound = Arc::new(Inbound {
            session: Mutex::new(session),
            parts: Mutex::new(HashMap::new()),
            layout: layout.clone(),
            storage: ctx.storage.clone(),
            log,
            received: ctx.received_counter(&offer.migration_id),
        });
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE_MAX_COUNT);
        joins.open(
            &offer.migration_id,
            Joinable { conn: claim.conn(), inbound: inbound.clone(), events: events_tx.clone() },
        );
        let _acceptor = AbortOnDrop(tokio::spawn(accept_chunk_streams(conn.clone(), inbound.clone(), events_tx)));
        let files_count = offer.files.len();
        let mut staged = vec![false; files_count];
        let mut staged_count = 0usize;
        let mut unsynced_bytes = 0u64;
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
                            Event::Written { chunk, crc32c, len_bytes } => {
                                ready.extend(inbound.session().on_chunk_written(chunk.file_index, chunk.chunk_index, crc32c)?);
                                unsynced_bytes += u64::from(len_bytes);
                                acks.push(chunk);
                            }
                            Event::Duplicate(chunk) => acks.push(chunk),
                            Event::Failed(e) => return Err(e),
                        }
                        next = events.try_recv().ok();
                    }
                    if unsynced_bytes >= SYNC_BATCH_BYTES {
                        let inbound = inbound.clone();
                        blocking(move || inbound.sync()).await?;
                        unsynced_bytes = 0;
                    }
                    if !acks.is_empty() {
                        write_control(send, &Message::Acks { chunks: acks }).await?;
                    }
                    let (verified, resent) = { let s = inbound.session(); (s.bytes_verified(), s.bytes_resent()) };
                    ctx.machine().progress(&offer.migration_id, verified, resent)?;
                }
            }
            for done in ready {
                let index = done.file_index as usize;
                let path = offer
                    .files
                    .get(index)
                    .map(|f| f.path.clone())
                    .ok_or_else(|| TransferError::Protocol(format!("no file {}", done.file_index)))?;
                if staged.get(index).copied().unwrap_or(true) {
                    continue;
                }
                if !inbound.session().is_staged(done.file_index) {
                    let (storage, layout_owned, log) = (ctx.storage.clone(), layout.clone(), inbound.log.clone());
                    locked(&inbound.parts).remove(&done.file_index);
                    blocking(move || {
                        staging::finalize_file(
                            &*storage,
                            &layout_owned,
                            done.file_index,
                            &path,
                            done.size_bytes,
                            done.crc32c,
                        )?;
                        log.append(LogRecord::Staged { file_index: done.file_index, crc32c: done.crc32c })?;
                        Ok(())
                    })
                    .await?;
                }
                staged[index] = true;
                staged_count += 1;
                ctx.machine().files_staged(&offer.migration_id, staged_count as u64)?;
                write_control(send, &Message::FileStaged { file_index: done.file_index }).await?;
            }
        }
        joins.close(&offer.migration_id, claim.conn());
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
            // Only this node may release, abort or join it, also after a restart.
            source_node: ctx
                .machine()
                .get(&offer.migration_id)
                .and_then(|m| m.source_node.as_deref())
                .and_then(|n| ferry_wire::NodeId::new(n).ok()),
        };
        let bytes_resent = inbound.session().bytes_resent();
        let (storage, layout_owned, offer_owned) = (ctx.storage.clone(), layout.clone(), offer.clone());
        let crcs = inbound_crcs(&inbound, offer)?;
        let sync_inbound = inbound.clone();
        blocking(move || {
            sync_inbound.sync()?;
            let paths: Vec<_> = offer_owned.files.iter().map(|f| f.path.clone()).collect();
            staging::sync_segment_tree(&*storage, &layout_owned, &paths)?;
            let segments = offer_owned
                .files
                .iter()
                .zip(crcs)
                .map(|(f, crc32c)| StagedSegment { path: f.path.clone(), size_bytes: f.size_bytes, crc32c })
                .collect();
            let manifest = StagingManifest { segments, ..manifest };
            staging::write_manifest(&*storage, &layout_owned, &manifest)?;
            if offer_owned.wal {
                // A live copy is fenced next: its MANIFEST commit is prepared now, off the pause.
                staging::prepare_manifest_commit(&*storage, &layout_owned, &manifest)?;
            }
            Ok(())
        })
        .await?;
        Ok(bytes_resent)
    }
}

/// Closes a transfer to joins when dropped.
struct JoinsClosed<'a> {
    joins: &'a Joins,
    id: &'a MigrationId,
    conn: ConnId,
}

impl Drop for JoinsClosed<'_> {
    fn drop(&mut self) {
        self.joins.close(self.id, self.conn);
    }
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
    // A JoinSet aborts its tasks when dropped; finished ones are reaped at each accept, so
    // the set holds at most the streams open at once (bounded by the transport's limit).
    let mut streams = tokio::task::JoinSet::new();
    loop {
        match conn.accept_uni().await {
            Ok(recv) => {
                while streams.try_join_next().is_some() {}
                let (inbound, events) = (inbound.clone(), events.clone());
                streams.spawn(async move {
                    if let Err(e) = receive_chunks(recv, &inbound, &events).await {
                        let _ = events.send(Event::Failed(e)).await;
                    }
                });
            }
            Err(e) => {
                let _ = events.send(Event::Failed(e.into())).await;
                return;
            }
        }
    }
}

async fn receive_chunks(
    recv: RecvStream,
    inbound: &Arc<Inbound>,
    events: &mpsc::Sender<Event>,
) -> Result<(), TransferError> {
    let mut reader = FrameReader::new(recv);
    // One body per stream, handed to the write and back, so its piece list is allocated once.
    let mut body = BodyPieces::default();
    while let Some(header) = reader.read_header().await? {
        if header.kind != FrameKind::Chunk {
            return Err(TransferError::Protocol(format!("a {:?} frame on a chunk stream", header.kind)));
        }
        let (file_index, offset_bytes, len_bytes) =
            (header.chunk_file_index, header.chunk_offset_bytes, header.body_len_bytes);
        let verdict = inbound.session().check_chunk(file_index, offset_bytes, len_bytes)?;
        let chunk_index = match verdict {
            ChunkVerdict::Duplicate { chunk_index } | ChunkVerdict::Write { chunk_index } => chunk_index,
        };
        // Counted before the body is read: bytes in flight when a run dies count as received,
        // so a resend after it shows in bytes_resent.
        inbound.log.append(LogRecord::Receiving { file_index, chunk_index, len_bytes })?;
        inbound.received.fetch_add(u64::from(len_bytes), Ordering::Relaxed);
        reader.read_body(&header, &mut body).await?;
        let found = body.crc32c();
        if found != header.body_crc32c {
            return Err(TransferError::ChunkChecksum { file_index, offset_bytes, expected: header.body_crc32c, found });
        }
        let chunk = ChunkRef { file_index, chunk_index };
        let event = match verdict {
            ChunkVerdict::Duplicate { .. } => Event::Duplicate(chunk),
            ChunkVerdict::Write { .. } => {
                body = write_verified(inbound, body, chunk, offset_bytes).await?;
                Event::Written { chunk, crc32c: found, len_bytes }
            }
        };
        events.send(event).await.map_err(|_| TransferError::Local("transfer ended".into()))?;
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
        part.write_all_vectored_at(&slices, offset_bytes).map_err(|source| {
            let path = inbound.layout.part_path(chunk.file_index);
            TransferError::Staging(staging::StagingError::Io { what: "write", path, source })
        })?;
        drop(slices);
        let (file_index, chunk_index, crc32c) = (chunk.file_index, chunk.chunk_index, body.crc32c());
        inbound.log.append(LogRecord::Verified { file_index, chunk_index, crc32c })?;
        body.clear();
        Ok(body)
    })
    .await
}

async fn commit_phase(
    ctx: &Arc<TargetContext>,
    offer: &Offer,
    layout: &StagingLayout,
    send: &mut SendStream,
    messages: &mut Messages,
) -> Result<(), TransferError> {
    loop {
        match messages.recv().await {
            Some(Ok(Message::Commit { final_lsn })) => {
                let (storage, layout_owned) = (ctx.storage.clone(), layout.clone());
                let staged = if offer.wal { ctx.wal_stages.get(&offer.migration_id) } else { None };
                if offer.wal && staged.is_none() {
                    return Err(TransferError::Protocol("commit before the WAL stream was opened".into()));
                }
                blocking(move || {
                    // Records back to back before the staging is released (no preallocated zeros).
                    let wal = match staged {
                        Some(staged) => {
                            let mut wal = staged.lock().unwrap_or_else(|e| e.into_inner());
                            wal.trim().map_err(|e| TransferError::Local(format!("trimming the staged WAL: {e}")))?;
                            Some((wal.segments(), wal.durable_lsn()))
                        }
                        None => None,
                    };
                    let mut manifest = staging::read_manifest(&*storage, &layout_owned)?
                        .ok_or_else(|| TransferError::Local("MANIFEST.json vanished before commit".into()))?;
                    if manifest.state != StagingState::Released {
                        manifest.state = StagingState::Released;
                        manifest.final_lsn = Some(final_lsn);
                        if let Some((segments, _durable)) = wal {
                            manifest.wal_segments = segments;
                        }
                        staging::write_manifest(&*storage, &layout_owned, &manifest)?;
                    }
                    Ok(())
                })
                .await?;
                ctx.machine().committed(&offer.migration_id, final_lsn)?;
                write_control(send, &Message::Committed).await?;
            }
            Some(Ok(Message::Fence { final_lsn, apply_wait_max_us, through_lsn, wal_wait_max_us })) => {
                let waits = super::fence_target::FenceWaits { through_lsn, wal_wait_max_us, apply_wait_max_us };
                let answer = super::fence_target::fence_staging(ctx, offer, layout, final_lsn, waits).await?;
                write_control(send, &answer).await?;
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
