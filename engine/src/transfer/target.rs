//! The target's receiver: drives each inbound connection's conversation and lands base copies
//! in staging.
//!
//! What it does: accepts QUIC connections and drives, on each control stream, a
//! [`TargetConversation`] (the protocol, in `ferry_wire::proto::target`): it reads the
//! source's messages into it and executes the actions it answers with: admitting an offer
//! (through the [`TargetContext`]'s inbound machine) and preparing its staging, syncing and
//! finalising files, writing `MANIFEST.json`, committing, fencing, joining, releasing,
//! aborting, and writing the messages it says. Chunk streams are [`super::chunks_in`]'s.
//!
//! What it does not: decide what may come next or what to answer (the conversation does), or
//! trust anything the peer says before the conversation checked it.
//!
//! Bounds: one chunk buffer per uni stream (at most `CHUNK_LEN_MAX_BYTES`), at most
//! `uni_streams_max_count` streams per connection, a bounded event queue per transfer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES;
use ferry_wire::message::{Message, Offer};
use ferry_wire::proto::inbound::ConnId;
use ferry_wire::proto::target::{Admitted, ChunkEvent, TargetAction, TargetConversation};
use ferry_wire::session::FileDone;
use ferry_wire::{Lsn, MigrationId};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

use super::chunks_in::{accept_chunk_streams, carry_chunks, Event, Inbound};
use super::framing::{read_control, spawn_control_reader, write_control, Messages, SMALL_CONTROL_BODY_MAX_BYTES};
use super::inbound::{now_unix_ms, ClaimGuard};
pub use super::inbound::{InboundStatus, TargetContext, TargetLimits};
use super::steps::Start;
use super::task::{blocking, AbortOnDrop};
use super::TransferError;
use crate::staging::StagingLayout;

/// How long a connected peer has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Events (written chunks) queued between chunk streams and the control loop.
const EVENT_QUEUE_MAX_COUNT: usize = 1024;
/// Written bytes after which part files and the chunk log are synced (data first). Bounds what
/// a power loss makes the source send again; a killed process loses nothing of it.
const SYNC_BATCH_BYTES: u64 = 64 << 20;
/// Chunk events a control loop takes in one go before it acks them.
const EVENT_BATCH_MAX_COUNT: usize = 256;
/// Files the control loop finalises at once, each on its own blocking thread: the fsyncs of
/// many small files then share the file system's journal commits instead of waiting one after
/// the other, and the control loop waits once per batch instead of once per file.
const FINALIZE_BATCH_MAX_COUNT: usize = 32;
/// `FileDone` messages already read that the control loop takes in one go, so the files they
/// complete are finalised as one batch.
const FILE_DONE_BATCH_MAX_COUNT: usize = 32;

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
            let peer = crate::tls::peer_node_id(&conn).map(|n| n.to_string());
            if let Err(e) = ctx.connected(&conn, peer.as_deref()) {
                let (_, code) = e.kind_and_code();
                tracing::warn!(%remote, ?peer, "{e}");
                conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
                return;
            }
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

/// Control body bytes the reader may hold decoded ahead of the conversation: one body of the
/// largest size. Counted in bytes, not messages: 64 queued messages of up to 64 MiB each would
/// let one peer park 4 GiB here.
const CONTROL_QUEUED_MAX_BYTES: u32 = CONTROL_BODY_LEN_MAX_BYTES;

/// The source's control stream, read by its own task (reads are not cancel-safe, so they never
/// sit in a `select!`), bounded in bytes.
fn spawn_reader(recv: RecvStream) -> (Messages, AbortOnDrop) {
    spawn_control_reader(recv, CONTROL_BODY_LEN_MAX_BYTES, CONTROL_QUEUED_MAX_BYTES)
}

async fn converse(
    conn: &Connection,
    ctx: &Arc<TargetContext>,
    joins: &Arc<Joins>,
    peer: Option<String>,
    send: &mut SendStream,
    mut recv: RecvStream,
) -> Result<(), TransferError> {
    let conversation = Arc::new(Mutex::new(TargetConversation::new(ctx.node_id.clone(), SYNC_BATCH_BYTES)));
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES))
        .await
        .map_err(|_| TransferError::Timeout("the source's hello"))??;
    locked(&conversation).handle_message(hello)?;
    let (mut messages, _reader) = spawn_reader(recv);
    let mut driver =
        Driver { conn, ctx, joins, peer, send, conversation, offer: None, claim: None, receive: None, _wal: None };
    let result = driver.run(&mut messages).await;
    if let (Err(_), Some(receive)) = (&result, &driver.receive) {
        if let Err(e) = ctx.machine().interrupted(&receive.id) {
            tracing::debug!(migration = %receive.id, "not marked interrupted: {e}");
        }
    }
    result
}

/// The base copy being received on this connection.
struct Receive {
    id: MigrationId,
    layout: StagingLayout,
    inbound: Arc<Inbound>,
    events: mpsc::Receiver<Event>,
    /// Keeps `events` open while no chunk stream runs.
    _events_tx: mpsc::Sender<Event>,
    _acceptor: AbortOnDrop,
    /// Closes the transfer to joins however it ends.
    _joins_closed: JoinsClosed,
}

/// Executes one connection's [`TargetConversation`].
struct Driver<'a> {
    conn: &'a Connection,
    ctx: &'a Arc<TargetContext>,
    joins: &'a Arc<Joins>,
    peer: Option<String>,
    send: &'a mut SendStream,
    conversation: Arc<Mutex<TargetConversation>>,
    /// The admitted offer and its staging.
    offer: Option<(Offer, StagingLayout)>,
    claim: Option<ClaimGuard>,
    receive: Option<Receive>,
    _wal: Option<AbortOnDrop>,
}

/// Whether the conversation goes on after an action.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Done,
}

impl Driver<'_> {
    fn conversation(&self) -> MutexGuard<'_, TargetConversation> {
        locked(&self.conversation)
    }

    async fn run(&mut self, messages: &mut Messages) -> Result<(), TransferError> {
        // A message taken while gathering `FileDone`s that is not one: handled once the
        // actions queued before it have run, as if it had just arrived.
        let mut held: Option<Message> = None;
        loop {
            loop {
                let Some(action) = self.conversation().poll_action() else { break };
                let action = match action {
                    TargetAction::FinalizeFile { path, done } => {
                        // The files the machine asks to finalise next, together; the action
                        // after them was queued before anything their finalising adds, so it
                        // runs right after the batch, as it would have after the last file.
                        let mut files = vec![(path, done)];
                        let mut next = None;
                        while files.len() < FINALIZE_BATCH_MAX_COUNT {
                            match self.conversation().poll_action() {
                                Some(TargetAction::FinalizeFile { path, done }) => files.push((path, done)),
                                other => {
                                    next = other;
                                    break;
                                }
                            }
                        }
                        self.finalize(files).await?;
                        match next {
                            Some(action) => action,
                            None => continue,
                        }
                    }
                    action => action,
                };
                if self.execute(action).await? == Flow::Done {
                    return Ok(());
                }
            }
            if let Some(message) = held.take() {
                self.conversation().handle_message(Some(message))?;
                continue;
            }
            tokio::select! {
                message = messages.recv() => {
                    let message = message.transpose()?;
                    let file_done = matches!(message, Some(Message::FileDone { .. }));
                    self.conversation().handle_message(message)?;
                    if file_done {
                        held = self.take_file_dones(messages)?;
                    }
                }
                event = next_event(self.receive.as_mut()) => {
                    let mut batch = vec![event?];
                    while let Some(event) = self.receive.as_mut().and_then(|r| r.events.try_recv().ok()) {
                        batch.push(event?);
                        if batch.len() >= EVENT_BATCH_MAX_COUNT {
                            break;
                        }
                    }
                    let progress = {
                        let mut conversation = self.conversation();
                        conversation.handle_chunks(&batch)?;
                        conversation.progress()
                    };
                    if let (Some((verified, resent, _)), Some(receive)) = (progress, &self.receive) {
                        self.ctx.machine().progress(&receive.id, verified, resent)?;
                    }
                }
            }
        }
    }

    /// Hands the machine the `FileDone` messages already read (many small files complete
    /// together), so their files are finalised as one batch; returns the first other message
    /// taken, to be handled after the actions queued before it.
    fn take_file_dones(&mut self, messages: &mut Messages) -> Result<Option<Message>, TransferError> {
        for _ in 0..FILE_DONE_BATCH_MAX_COUNT {
            match messages.try_recv() {
                Some(Ok(message @ Message::FileDone { .. })) => self.conversation().handle_message(Some(message))?,
                Some(Ok(other)) => return Ok(Some(other)),
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(None)
    }

    async fn execute(&mut self, action: TargetAction) -> Result<Flow, TransferError> {
        match action {
            TargetAction::Send(message) => write_control(self.send, &message).await?,
            TargetAction::Admit(offer) => self.admit(*offer).await?,
            TargetAction::Sync => {
                let inbound = self.receiving()?.inbound.clone();
                blocking(move || inbound.sync()).await?;
            }
            TargetAction::FinalizeFile { path, done } => self.finalize(vec![(path, done)]).await?,
            TargetAction::StageBase { segment_crcs, bytes_resent } => {
                self.stage_base(segment_crcs, bytes_resent).await?
            }
            TargetAction::Commit { final_lsn } => {
                self.commit(final_lsn).await?;
                self.conversation().handle_committed()?;
            }
            TargetAction::Fence(request) => {
                let (offer, _) = self.admitted()?;
                let waits = super::fence_target::FenceWaits {
                    through_lsn: request.through_lsn,
                    wal_wait_max_us: request.wal_wait_max_us,
                    apply_wait_max_us: request.apply_wait_max_us,
                };
                let answer = super::fence_target::fence_staging(self.ctx, offer, request.final_lsn, waits).await?;
                self.conversation().handle_fence_answer(answer)?;
            }
            TargetAction::CommitFenced { final_lsn } => {
                // The `Fenced` answer was written just before (the machine's order): the pause
                // is over for the source, and this commit is off its path (DESIGN section 8).
                let (offer, layout) = self.admitted()?;
                let (ctx, layout, id) = (self.ctx.clone(), layout.clone(), offer.migration_id.clone());
                blocking(move || super::fence_target::commit_fenced(&ctx, &layout, &id, final_lsn)).await?;
            }
            TargetAction::Join { migration_id } => {
                let (inbound, events) =
                    find_joinable(self.ctx, self.joins, self.peer.as_deref(), &migration_id).await?;
                self.conversation().handle_answered()?;
                loop {
                    let Some(action) = self.conversation().poll_action() else { break };
                    match action {
                        TargetAction::Send(message) => write_control(self.send, &message).await?,
                        TargetAction::CarryChunks => {
                            let transport = self.ctx.chunk_transport.clone();
                            carry_chunks(self.conn.clone(), transport, inbound, events).await;
                            return Ok(Flow::Done);
                        }
                        other => return Err(TransferError::Local(format!("{other:?} after a join"))),
                    }
                }
            }
            TargetAction::CarryChunks => {
                return Err(TransferError::Local("carrying chunks of no joined transfer".into()));
            }
            TargetAction::Release { migration_id, final_lsn, fenced_durable_lsn } => {
                self.check_peer(&migration_id).await?;
                super::fence_target::release_staging(self.ctx, &migration_id, final_lsn, fenced_durable_lsn).await?;
                self.conversation().handle_answered()?;
            }
            TargetAction::Abort { migration_id, reason } => {
                self.check_peer(&migration_id).await?;
                let reason = format!("{reason} (asked by source {})", self.peer.as_deref().unwrap_or("?"));
                super::abort::abort_staging(self.ctx, &migration_id, &reason).await?;
                self.conversation().handle_answered()?;
            }
            TargetAction::Finish => {
                let _ = self.send.finish();
                let _ = tokio::time::timeout(Duration::from_millis(500), self.send.stopped()).await;
                return Ok(Flow::Done);
            }
        }
        Ok(Flow::Continue)
    }

    fn admitted(&self) -> Result<(&Offer, &StagingLayout), TransferError> {
        let (offer, layout) = self.offer.as_ref().ok_or_else(|| TransferError::Local("no offer admitted".into()))?;
        Ok((offer, layout))
    }

    fn receiving(&self) -> Result<&Receive, TransferError> {
        self.receive.as_ref().ok_or_else(|| TransferError::Local("no base copy is being received".into()))
    }

    /// Refuses a request about `id` from a node other than the one receiving it.
    /// A staging the machine does not list yet is read from disk first, so its recorded
    /// source is checked too.
    async fn check_peer(&self, id: &MigrationId) -> Result<(), TransferError> {
        let (ctx, owned) = (self.ctx.clone(), id.clone());
        blocking(move || ctx.adopt_from_disk(&owned)).await?;
        if self.ctx.machine().may_act(id, self.peer.as_deref()) {
            return Ok(());
        }
        let source = self.ctx.machine().get(id).and_then(|m| m.source_node.clone());
        Err(TransferError::Refused(format!(
            "migration {id} is received from another node ({}, not {}): only the node that started a migration may release, abort or join it",
            source.as_deref().unwrap_or("another node"),
            self.peer.as_deref().unwrap_or("this unnamed peer"),
        )))
    }

    /// Admits and claims the offer and prepares its staging. Admitted and claimed, but not
    /// visible until the staging is ready: an offer the staging refuses leaves the migration
    /// as it was, and its slot free (the claim's drop).
    async fn admit(&mut self, offer: Offer) -> Result<(), TransferError> {
        let ctx = self.ctx;
        let claim = ctx.claim(&offer, self.conn, self.peer.as_deref()).await?;
        let id = offer.migration_id.clone();
        let layout = StagingLayout::new(&ctx.data_dir, &id);
        let start = {
            let (ctx, layout, offer, conn) = (ctx.clone(), layout.clone(), offer.clone(), claim.conn());
            let peer = self.peer.clone();
            blocking(move || super::steps::admit_staging(&ctx, &layout, &offer, conn, peer.as_deref(), now_unix_ms()))
                .await?
        };
        self._wal = offer.wal.then(|| spawn_wal_stream(self.conn.clone(), ctx.clone(), &offer, &layout));
        match start {
            Start::AlreadyStaged { .. } => {
                let bytes_resent = ctx.machine().get(&id).map_or(0, |m| m.bytes_resent);
                self.conversation().handle_admitted(Admitted::AlreadyStaged { bytes_resent })?;
            }
            Start::Receive { session, log, restored } => {
                tracing::info!(
                    migration = %id,
                    chunks_kept = restored.chunks_kept_count,
                    chunks_dropped = restored.chunks_dropped_count,
                    files_staged = restored.files_staged_count,
                    "staging ready"
                );
                self.conversation().handle_admitted(Admitted::Receive { session })?;
                let inbound = Arc::new(Inbound {
                    conversation: self.conversation.clone(),
                    parts: Mutex::new(HashMap::new()),
                    layout: layout.clone(),
                    storage: ctx.storage.clone(),
                    log,
                    received: ctx.received_counter(&id),
                    chunk_len_bytes: offer.chunk_len_bytes,
                });
                let (events_tx, events) = mpsc::channel(EVENT_QUEUE_MAX_COUNT);
                let conn_id = claim.conn();
                let joinable = Joinable { conn: conn_id, inbound: inbound.clone(), events: events_tx.clone() };
                self.joins.open(&id, joinable);
                // A live copy's first connection carries the WAL stream, not chunks (and its
                // next bidirectional stream is the WAL's): only the QUIC streams are taken.
                let (conn, chunks) = (self.conn.clone(), (inbound.clone(), events_tx.clone()));
                let acceptor = if offer.wal {
                    AbortOnDrop(tokio::spawn(accept_chunk_streams(conn, chunks.0, chunks.1)))
                } else {
                    let transport = ctx.chunk_transport.clone();
                    AbortOnDrop(tokio::spawn(carry_chunks(conn, transport, chunks.0, chunks.1)))
                };
                self.receive = Some(Receive {
                    id: id.clone(),
                    layout: layout.clone(),
                    inbound,
                    events,
                    _events_tx: events_tx,
                    _acceptor: acceptor,
                    _joins_closed: JoinsClosed { joins: self.joins.clone(), id: id.clone(), conn: conn_id },
                });
            }
        }
        self.claim = Some(claim);
        self.offer = Some((offer, layout));
        Ok(())
    }

    /// Finalises verified files (each: fsync, re-read and check, rename into `segments/`, log
    /// it staged), each on its own blocking thread, and tells the machine once all are done, in
    /// the order it asked. A file is reported staged only after its own finalising returned.
    async fn finalize(&mut self, files: Vec<(ferry_wire::path::RelPath, FileDone)>) -> Result<(), TransferError> {
        let receive = self.receiving()?;
        {
            let mut parts = locked(&receive.inbound.parts);
            for (_, done) in &files {
                parts.remove(&done.file_index);
            }
        }
        let mut running = Vec::with_capacity(files.len());
        for (path, done) in files {
            let (ctx, layout, log) = (self.ctx.clone(), receive.layout.clone(), receive.inbound.log.clone());
            let handle =
                tokio::task::spawn_blocking(move || super::steps::finalize_file(&ctx, &layout, &log, &path, done));
            running.push((done.file_index, handle));
        }
        // Every one is awaited, also after a failure: a blocking task cannot be cancelled, and
        // the transfer fails only once none of its files is still being written.
        let mut first_error = None;
        let mut finalized = Vec::with_capacity(running.len());
        for (file_index, handle) in running {
            let result = handle.await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")));
            match result.and_then(|r| r) {
                Ok(()) => finalized.push(file_index),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let id = receive.id.clone();
        let staged = {
            let mut conversation = self.conversation();
            for file_index in finalized {
                conversation.handle_file_finalized(file_index)?;
            }
            conversation.files_staged_count()
        };
        self.ctx.machine().files_staged(&id, staged)?;
        Ok(())
    }

    /// Every file is staged: syncs what is left and writes `MANIFEST.json` (and, for a live
    /// copy, prepares the fence's MANIFEST commit off the pause).
    async fn stage_base(&mut self, segment_crcs: Vec<u32>, bytes_resent: u64) -> Result<(), TransferError> {
        let receive = self.receiving()?;
        let inbound = receive.inbound.clone();
        let (offer, layout) = self.admitted()?;
        let id = offer.migration_id.clone();
        self.joins.close(&id, self.claim.as_ref().map_or(ConnId(0), ClaimGuard::conn));
        // Only its source node may release, abort or join it, also after a restart.
        let manifest = super::steps::base_manifest(offer, segment_crcs, self.ctx.machine().get(&id));
        let (ctx, layout, offer) = (self.ctx.clone(), layout.clone(), offer.clone());
        blocking(move || {
            inbound.sync()?;
            super::steps::write_base_manifest(&ctx, &layout, &offer, &manifest)
        })
        .await?;
        // The base is staged: chunk streams and joins end here.
        self.receive = None;
        self.ctx.machine().base_staged(&id, bytes_resent)?;
        let bytes_resent = self.ctx.machine().get(&id).map_or(0, |m| m.bytes_resent);
        self.conversation().handle_base_written(bytes_resent)?;
        Ok(())
    }

    /// Marks the staging of an offline copy released at `final_lsn` (with its staged WAL, if
    /// it had one).
    async fn commit(&mut self, final_lsn: Lsn) -> Result<(), TransferError> {
        let (offer, layout) = self.admitted()?;
        let (ctx, layout) = (self.ctx.clone(), layout.clone());
        let staged = if offer.wal { self.ctx.wal_stages.get(&offer.migration_id) } else { None };
        if offer.wal && staged.is_none() {
            return Err(TransferError::Protocol("commit before the WAL stream was opened".into()));
        }
        let id = offer.migration_id.clone();
        let id_owned = id.clone();
        blocking(move || super::steps::commit_offline(&ctx, &layout, &id_owned, final_lsn, staged.as_deref())).await?;
        self.ctx.machine().committed(&id, final_lsn)?;
        Ok(())
    }
}

/// The next chunk event of the base copy being received (never, when none is).
async fn next_event(receive: Option<&mut Receive>) -> Result<ChunkEvent, TransferError> {
    match receive {
        Some(receive) => match receive.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
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

/// The transfer an extra data connection joins: its uni streams feed the transfer offered on
/// another connection of the same node.
async fn find_joinable(
    ctx: &TargetContext,
    joins: &Joins,
    peer: Option<&str>,
    id: &MigrationId,
) -> Result<(Arc<Inbound>, mpsc::Sender<Event>), TransferError> {
    // The transfer's connection answers `Accept` before it starts taking chunks, so a join
    // may come a moment before the transfer can be joined: it waits for that, a bounded time.
    let deadline = tokio::time::Instant::now() + JOIN_WAIT;
    loop {
        let opened = joins.changed.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        let claimant = {
            let machine = ctx.machine();
            machine.claimant(id).filter(|_| machine.may_act(id, peer))
        };
        let Some(claimant) = claimant else {
            return Err(TransferError::Refused(format!("no transfer {id} from this node is being received to join")));
        };
        if let Some(j) = locked(&joins.joinable).get(id).filter(|j| j.conn == claimant) {
            return Ok((j.inbound.clone(), j.events.clone()));
        }
        if tokio::time::timeout_at(deadline, opened).await.is_err() {
            return Err(TransferError::Refused(format!("transfer {id} is not receiving chunks")));
        }
    }
}

/// Closes a transfer to joins when dropped.
struct JoinsClosed {
    joins: Arc<Joins>,
    id: MigrationId,
    conn: ConnId,
}

impl Drop for JoinsClosed {
    fn drop(&mut self) {
        self.joins.close(&self.id, self.conn);
    }
}
