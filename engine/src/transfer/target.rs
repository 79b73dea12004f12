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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::checkpoint::LogRecord;
use ferry_wire::frame::{FrameKind, PROTOCOL_VERSION};
use ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES;
use ferry_wire::manifest::{StagedSegment, StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::message::{ChunkRef, Message, Offer};
use ferry_wire::session::{ChunkVerdict, FileDone, TargetSession};
use ferry_wire::{MigrationId, NodeId};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use super::chunklog::{self, ChunkLog};
use super::framing::{read_control, write_control, BodyPieces, FrameReader, SMALL_CONTROL_BODY_MAX_BYTES};
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

/// Progress of one inbound transfer, as the daemon shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundStatus {
    pub source_node: Option<String>,
    pub bytes_verified: u64,
    pub bytes_total: u64,
    pub bytes_resent: u64,
    /// Chunk bytes received for this migration by this process, over every connection. Unlike
    /// `bytes_resent` it does not survive a restart; it shows what resumption saved.
    pub bytes_received_in_process: u64,
    pub files_staged_count: u64,
    pub files_total_count: u64,
    pub state: String,
    /// The staged WAL's durable LSN, when the transfer has a WAL stream.
    pub wal_durable_lsn: Option<u64>,
    /// An aborted migration: why.
    pub reason: Option<String>,
    /// What the target's database reported applied (`migration.applied`); once set, a fence
    /// waits for it to reach `final_lsn`.
    pub applied_lsn: Option<u64>,
    /// The LSN the staging was fenced or released at.
    pub final_lsn: Option<u64>,
}

/// What the target admits (DESIGN section 4: admission).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetLimits {
    /// Inbound migrations received at once (a resumed one does not count twice); 0: unlimited.
    pub max_inbound_count: usize,
    /// Refuse a new migration whose base does not fit in the data folder's free space.
    pub check_free_space: bool,
}

/// States of an inbound migration that still hold a slot.
fn is_active_state(state: &str) -> bool {
    matches!(state, "receiving" | "interrupted" | "base_staged" | "fenced")
}

/// A transfer being received, as extra data connections find it.
struct Joinable {
    inbound: Arc<Inbound>,
    events: mpsc::Sender<Event>,
}

/// What the receiver needs: where staging goes, how it is written, who this node is.
pub struct TargetContext {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    status: Mutex<BTreeMap<MigrationId, InboundStatus>>,
    /// Migrations being received, with the control connection and peer that hold them.
    claims: Mutex<HashMap<MigrationId, (Connection, Option<String>)>>,
    joinable: Mutex<HashMap<MigrationId, Joinable>>,
    connections: Mutex<Vec<Connection>>,
    received: Mutex<HashMap<MigrationId, Arc<AtomicU64>>>,
    /// The staged WALs open on this node.
    pub wal_stages: super::walrecv::WalStages,
    limits: Mutex<TargetLimits>,
    /// Woken when a database reports progress with `migration.applied`.
    pub(crate) applied: tokio::sync::Notify,
    /// Woken when a staged WAL's durable LSN moves (a fence waits for its `through_lsn`).
    pub(crate) wal_durable: tokio::sync::Notify,
}

impl std::fmt::Debug for TargetContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetContext").field("node_id", &self.node_id).field("data_dir", &self.data_dir).finish()
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TargetContext {
    pub fn new(node_id: NodeId, data_dir: PathBuf, storage: Arc<dyn Storage>) -> Self {
        Self {
            node_id,
            data_dir,
            storage,
            status: Mutex::new(BTreeMap::new()),
            claims: Mutex::new(HashMap::new()),
            joinable: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            received: Mutex::new(HashMap::new()),
            wal_stages: super::walrecv::WalStages::default(),
            limits: Mutex::new(TargetLimits::default()),
            applied: tokio::sync::Notify::new(),
            wal_durable: tokio::sync::Notify::new(),
        }
    }

    /// Sets the admission limits (from the daemon's configuration).
    pub fn set_limits(&self, limits: TargetLimits) {
        *locked(&self.limits) = limits;
    }

    /// Lists the stagings an earlier run of the daemon left (state from their MANIFEST.json;
    /// a staging without one was interrupted during its base copy), so a restarted target
    /// shows them before their sources reconnect. Unreadable entries are logged and skipped.
    pub fn load_existing(&self) {
        let dir = self.data_dir.join("migrations");
        let Ok(names) = self.storage.list_dir(&dir) else { return };
        for name in names {
            let Ok(id) = MigrationId::new(name.clone()) else { continue };
            let layout = StagingLayout::new(&self.data_dir, &id);
            let state = match staging::read_manifest(&*self.storage, &layout) {
                Ok(Some(m)) => match m.state {
                    StagingState::Copying if m.base_complete => "base_staged",
                    StagingState::Copying => "interrupted",
                    StagingState::Fenced => "fenced",
                    StagingState::Released => "released",
                    StagingState::Aborted => "aborted",
                },
                Ok(None) => "interrupted",
                Err(e) => {
                    tracing::warn!(migration = %id, "cannot read the staging's manifest: {e}");
                    continue;
                }
            };
            self.update(&id, |s| s.state = state.into());
        }
    }

    /// Refuses a new inbound migration when the target is at capacity or lacks the space.
    fn admit(&self, offer: &Offer) -> Result<(), TransferError> {
        let limits = *locked(&self.limits);
        let id = &offer.migration_id;
        if self.storage.exists(&StagingLayout::new(&self.data_dir, id).root) {
            // Resuming (or repeating) a migration already admitted.
            return Ok(());
        }
        if limits.max_inbound_count > 0 {
            let active =
                locked(&self.status).iter().filter(|(other, s)| *other != id && is_active_state(&s.state)).count();
            if active >= limits.max_inbound_count {
                return Err(TransferError::Refused(format!(
                    "target {} is at capacity: {active} inbound migrations, limit max_inbound_migrations = {}; retry later",
                    self.node_id, limits.max_inbound_count
                )));
            }
        }
        if limits.check_free_space {
            let needed_bytes = offer.bytes_total();
            let free_bytes = free_space_bytes(&self.data_dir).map_err(|e| {
                TransferError::Local(format!("cannot read free space of {}: {e}", self.data_dir.display()))
            })?;
            if free_bytes < needed_bytes {
                return Err(TransferError::Refused(format!(
                    "target {} lacks disk space: the base needs {needed_bytes} bytes, {} has {free_bytes} free",
                    self.node_id,
                    self.data_dir.display()
                )));
            }
        }
        Ok(())
    }

    /// Cuts the connection receiving `id` (the source does not retry the code).
    pub(crate) fn cut(&self, id: &MigrationId, reason: &str) {
        if let Some((conn, _)) = locked(&self.claims).get(id) {
            conn.close(VarInt::from_u32(super::abort::CUT_CLOSE_CODE), reason.as_bytes());
        }
    }

    /// Whether a connection is receiving `id` now.
    pub(crate) fn is_receiving(&self, id: &MigrationId) -> bool {
        locked(&self.claims).contains_key(id)
    }

    pub(crate) fn mark_aborted(&self, id: &MigrationId, reason: &str) {
        self.update(id, |s| {
            s.state = "aborted".into();
            s.reason = Some(reason.to_owned());
        });
    }

    /// Removes what this node holds for a finished (released or aborted) inbound migration:
    /// its staging folder and its status. A migration still in progress is refused.
    pub async fn forget(&self, id: &MigrationId) -> Result<(), TransferError> {
        let state = locked(&self.status).get(id).map(|s| s.state.clone());
        match state.as_deref() {
            None => return Err(TransferError::Local(format!("no inbound migration {id} on this node"))),
            Some("released" | "aborted") => {}
            Some(other) => {
                return Err(TransferError::Refused(format!(
                    "inbound migration {id} is {other}: abort it first, or wait until it is released"
                )))
            }
        }
        if self.is_receiving(id) {
            return Err(TransferError::Refused(format!("inbound migration {id} still has a connection; retry")));
        }
        let layout = StagingLayout::new(&self.data_dir, id);
        let storage = self.storage.clone();
        blocking(move || {
            if storage.exists(&layout.root) {
                storage.remove_dir_all(&layout.root).map_err(staging::io_err("remove", &layout.root))?;
                storage
                    .sync_dir(&layout.migrations_dir())
                    .map_err(staging::io_err("sync", &layout.migrations_dir()))?;
            }
            Ok(())
        })
        .await?;
        self.wal_stages.forget(id);
        locked(&self.status).remove(id);
        locked(&self.received).remove(id);
        Ok(())
    }

    fn received_counter(&self, id: &MigrationId) -> Arc<AtomicU64> {
        locked(&self.received).entry(id.clone()).or_default().clone()
    }

    /// A copy of every inbound transfer's status.
    pub fn inbound(&self) -> BTreeMap<MigrationId, InboundStatus> {
        let mut status = locked(&self.status).clone();
        for (id, s) in status.iter_mut() {
            s.bytes_received_in_process = self.received_counter(id).load(Ordering::Relaxed);
        }
        status
    }

    /// Whether `id` is an inbound migration here (without copying every status).
    pub fn has_inbound(&self, id: &MigrationId) -> bool {
        locked(&self.status).contains_key(id)
    }

    /// What the target's database reported applied for `id` (`migration.applied`), if anything.
    pub fn applied_lsn(&self, id: &MigrationId) -> Option<u64> {
        locked(&self.status).get(id).and_then(|s| s.applied_lsn)
    }

    /// The durable LSN of the staged WAL of `id`, once its WAL stream has started.
    pub fn wal_durable_lsn(&self, id: &MigrationId) -> Option<u64> {
        locked(&self.status).get(id).and_then(|s| s.wal_durable_lsn)
    }

    /// The `final_lsn` the staging of `id` is fenced at, if it is fenced (not released).
    pub fn fenced_at(&self, id: &MigrationId) -> Option<u64> {
        locked(&self.status).get(id).filter(|s| s.state == "fenced").and_then(|s| s.final_lsn)
    }

    pub(crate) fn update(&self, id: &MigrationId, f: impl FnOnce(&mut InboundStatus)) {
        f(locked(&self.status).entry(id.clone()).or_default());
    }

    /// Closes every live peer connection, as a network cut would. Transfers resume when their
    /// source reconnects. Tests use it to interrupt copies at chosen points.
    pub fn drop_connections(&self) -> usize {
        let connections = std::mem::take(&mut *locked(&self.connections));
        for conn in &connections {
            conn.close(VarInt::from_u32(crate::quic::close_code::CANCELLED), b"connection dropped on purpose");
        }
        connections.len()
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
            locked(&ctx.connections).push(conn.clone());
            let peer = crate::tls::peer_node_id(&conn).map(|n| n.to_string());
            match handle_connection(&conn, &ctx, peer.clone()).await {
                Ok(()) => tracing::debug!(%remote, ?peer, "inbound transfer connection finished"),
                Err(e) => {
                    let (_, code) = e.kind_and_code();
                    tracing::warn!(%remote, ?peer, "inbound transfer failed: {e}");
                    crate::metrics::count_error(crate::metrics::error_kind_of(&e.to_string()));
                    conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
                }
            }
            locked(&ctx.connections).retain(|c| c.stable_id() != conn.stable_id());
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
        Some(Message::Join { migration_id }) => return join(conn, ctx, peer, send, &migration_id).await,
        Some(Message::Release { migration_id, final_lsn }) => {
            let holder = locked(&ctx.claims).get(&migration_id).map(|(_, p)| p.clone());
            if holder.is_some_and(|holder| holder != peer) {
                return Err(TransferError::Refused(format!("migration {migration_id} is received from another node")));
            }
            super::fence_target::release_staging(ctx, &migration_id, final_lsn).await?;
            write_control(send, &Message::Released).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            return Ok(());
        }
        Some(Message::Abort { migration_id, reason }) => {
            let holder = locked(&ctx.claims).get(&migration_id).map(|(_, p)| p.clone());
            if holder.is_some_and(|holder| holder != peer) {
                return Err(TransferError::Refused(format!("migration {migration_id} is received from another node")));
            }
            let reason = format!("{reason} (asked by source {})", peer.as_deref().unwrap_or("?"));
            super::abort::abort_staging(ctx, &migration_id, &reason).await?;
            write_control(send, &Message::Aborted).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            return Ok(());
        }
        other => return Err(TransferError::Protocol(format!("expected an offer, got {}", describe(other.as_ref())))),
    };
    offer.validate().map_err(|e| TransferError::Protocol(e.to_string()))?;
    ctx.admit(&offer)?;
    let _claim = Claim::take(ctx, &offer.migration_id, conn, peer.clone()).await?;
    let id = offer.migration_id.clone();
    if locked(&ctx.status).get(&id).is_some_and(|s| s.state == "aborted") {
        return Err(TransferError::Refused(format!(
            "migration {id} was aborted on this target: forget it or use a new id"
        )));
    }
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
    let start = {
        let (storage, layout, offer) = (ctx.storage.clone(), layout.clone(), offer.clone());
        blocking(move || start_staging(&*storage, &layout, &offer)).await?
    };
    let _wal = offer.wal.then(|| spawn_wal_stream(conn.clone(), ctx.clone(), &offer, &layout));
    let (mut messages, _reader) = match start {
        Start::AlreadyStaged => {
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
            let result = receive_base(conn, ctx, &offer, &layout, session, log, send, &mut messages).await;
            if result.is_err() {
                ctx.update(&id, |s| s.state = "interrupted".into());
            }
            let bytes_resent = result?;
            ctx.update(&id, |s| s.bytes_resent = bytes_resent);
            (messages, reader)
        }
    };
    ctx.update(&id, |s| {
        s.state = "base_staged".into();
        s.bytes_verified = s.bytes_total;
        s.files_staged_count = s.files_total_count;
    });
    let bytes_resent = ctx.inbound().get(&id).map_or(0, |s| s.bytes_resent);
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
                ctx_durable.update(&id_durable, |s| s.wal_durable_lsn = Some(lsn.0));
                ctx_durable.wal_durable.notify_waiters();
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
/// How often a waiting join looks again.
const JOIN_RECHECK: Duration = Duration::from_millis(5);

/// An extra data connection: its uni streams feed the transfer offered on another connection.
async fn join(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    peer: Option<String>,
    send: &mut SendStream,
    id: &MigrationId,
) -> Result<(), TransferError> {
    // The transfer's connection answers `Accept` before it starts taking chunks, so a join
    // may come a moment before the transfer can be joined: it waits for that, a bounded time.
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    let (inbound, events) = loop {
        let holder = locked(&ctx.claims).get(id).map(|(_, p)| p.clone());
        if holder.is_none() || holder.as_ref() != Some(&peer) {
            return Err(TransferError::Refused(format!("no transfer {id} from this node is being received to join")));
        }
        if let Some(j) = locked(&ctx.joinable).get(id) {
            break (j.inbound.clone(), j.events.clone());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TransferError::Refused(format!("transfer {id} is not receiving chunks")));
        }
        tokio::time::sleep(JOIN_RECHECK).await;
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

/// Marks a migration as being received on one control connection, so a second connection
/// for the same id cannot write into the same staging. A new connection from the same node
/// takes over (its source reconnected; the old connection is dead or dying).
struct Claim {
    ctx: Arc<TargetContext>,
    id: MigrationId,
    conn_id: usize,
}

impl Claim {
    async fn take(
        ctx: &Arc<TargetContext>,
        id: &MigrationId,
        conn: &Connection,
        peer: Option<String>,
    ) -> Result<Self, TransferError> {
        for _ in 0..100 {
            {
                let mut claims = locked(&ctx.claims);
                match claims.get(id) {
                    None => {
                        claims.insert(id.clone(), (conn.clone(), peer));
                        return Ok(Self { ctx: ctx.clone(), id: id.clone(), conn_id: conn.stable_id() });
                    }
                    Some((old, holder)) if *holder == peer => {
                        old.close(
                            VarInt::from_u32(crate::quic::close_code::CANCELLED),
                            b"superseded by a new connection",
                        );
                    }
                    Some(_) => {
                        return Err(TransferError::Refused(format!(
                            "migration {id} is being received from another node"
                        )))
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(TransferError::Refused(format!("migration {id} is still held by an old connection; retry")))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claims = locked(&self.ctx.claims);
        if claims.get(&self.id).is_some_and(|(c, _)| c.stable_id() == self.conn_id) {
            claims.remove(&self.id);
            locked(&self.ctx.joinable).remove(&self.id);
        }
    }
}

enum Start {
    AlreadyStaged,
    Receive { session: TargetSession, log: Arc<ChunkLog>, restored: chunklog::Restored },
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
        return Ok(Start::AlreadyStaged);
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

#[allow(clippy::too_many_arguments)]
async fn receive_base(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    offer: &Offer,
    layout: &StagingLayout,
    session: TargetSession,
    log: Arc<ChunkLog>,
    send: &mut SendStream,
    messages: &mut Messages,
) -> Result<u64, TransferError> {
    let inbound = Arc::new(Inbound {
        session: Mutex::new(session),
        parts: Mutex::new(HashMap::new()),
        layout: layout.clone(),
        storage: ctx.storage.clone(),
        log,
        received: ctx.received_counter(&offer.migration_id),
    });
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE_MAX_COUNT);
    locked(&ctx.joinable)
        .insert(offer.migration_id.clone(), Joinable { inbound: inbound.clone(), events: events_tx.clone() });
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
                ctx.update(&offer.migration_id, |s| { s.bytes_verified = verified; s.bytes_resent = resent; });
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
            ctx.update(&offer.migration_id, |s| s.files_staged_count = staged_count as u64);
            write_control(send, &Message::FileStaged { file_index: done.file_index }).await?;
        }
    }
    locked(&ctx.joinable).remove(&offer.migration_id);
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
                ctx.update(&offer.migration_id, |s| s.state = "released".into());
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

/// Bytes available to this process on the filesystem holding `path`.
fn free_space_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}
