//! The source's sender: pins the files, offers them, ships chunks, waits for staging.
//!
//! What it does: snapshots the files ([`crate::snapshot`]), connects to the target with mutual
//! TLS, and drives the source's conversation ([`ferry_wire::proto::source`]): it executes the
//! machine's actions (write a message, open the WAL stream, recheck resumed chunks, open the
//! chunk connections, announce a file, finish the WAL, serve the cut-over) and feeds it the
//! target's messages and each chunk's CRC32C. Chunks go on `streams_count` uni streams per
//! connection, each taking its next chunk from the machine, reading it with the
//! [`ChunkReader`] (zero-copy `Bytes`) and honouring a [`TokenBucket`] rate limit that can
//! change while the copy runs. With `tuning.chunk_transport` set to RDMA, each chunk
//! connection first negotiates RDMA lanes ([`super::rdma::attach`]) that carry the chunks
//! instead, falling back to QUIC loudly when the target cannot (an error under
//! `require_rdma`). A file is announced only after checking it did not change. A
//! lost connection is reconnected and the copy resumes from what the target holds, under the
//! retry policy ([`ferry_wire::retry`]): a transient error ([`TransferError::is_transient`]) is
//! retried until the deadline passes without progress, a permanent one fails the copy at once.
//!
//! What it does not: decide what a message means or what comes next (the machine does; no
//! `Message` is matched here), or serve the fence itself (`fence_source`).
//!
//! Bounds: the reader's buffer pool bounds chunks in memory (a chunk's buffer returns when
//! quinn has it acknowledged and drops it); the control queue and the machine's action queue
//! are bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_wire::message::{Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::proto::source::{CopyPlan, SourceAction, SourceConversation, SourceState};
use ferry_wire::retry::{Decision, Retries, RetryPolicy};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};
use quinn::{Connection, VarInt};
use tokio::sync::{mpsc, watch};

use super::fence_source::CutOver;
use super::framing::{read_control, received, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
pub use super::rate::RateHandle;
use super::rdma::attach::attach_source;
use super::rdma::select::TransportSetting;
use super::ship::{self, lock, publish, ShipPlan};
use super::walrun::{publish_wal, start_wal, Messages, WalRun};
use super::walsend::{self, WalSourceConfig};
use super::TransferError;
use crate::clock::monotonic_ns;
use crate::quic::{close_code, QuicTuning};
use crate::read::{ChunkReader, ReadMode, ReaderConfig};
use crate::snapshot::Snapshot;
use crate::tls::NodeIdentity;
use ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES;

/// How long a refused join waits to learn whether the transfer's first connection was lost.
const JOIN_LOST_GRACE: Duration = Duration::from_secs(1);

/// How long to wait for the target to answer the handshake and hello.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(CONNECT_TIMEOUT_MS);
const CONNECT_TIMEOUT_MS: u64 = 15_000;
/// How long one QUIC handshake attempt may take before a fresh one starts (within the retry
/// deadline). QUIC backs its retransmissions off (1 s, 2 s, 4 s, ...), so an attempt whose first
/// packets fell into a black hole would wait long after the path came back; a fresh attempt
/// starts over at 1 s. Found by `tests/tests/lossy.rs` (5 s black holes every 7 s).
const HANDSHAKE_ATTEMPT_MS: u64 = 4_000;
/// What a handshake that got no answer timed out waiting for.
const HANDSHAKE: &str = "the target's handshake";

/// What to copy, where, and how.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    pub migration_id: MigrationId,
    pub vshard_id: VShardId,
    pub base_lsn: Lsn,
    pub segments_root: PathBuf,
    /// The files to ship, relative to the root; `None` ships every file under it.
    pub files: Option<Vec<RelPath>>,
    pub db_meta: serde_json::Value,
    pub target_addr: SocketAddr,
    /// The name the target's certificate must carry.
    pub target_node: NodeId,
    pub chunk_len_bytes: u32,
    /// Uni streams per connection.
    pub streams_count: u32,
    /// QUIC connections for chunks, each on its own endpoint (spreads the QUIC work over
    /// cores). An offline copy's first one also carries the control stream; a live copy (with
    /// a WAL) has one more, for the control and WAL streams only.
    pub connections_count: u32,
    /// 0: unlimited.
    pub rate_limit_bytes_per_sec: u64,
    pub read_mode: ReadMode,
    /// Offline copy: mark the staging `released` once the base is staged (and, with a WAL,
    /// once every selected record up to `until_lsn` is durable), at that LSN.
    pub commit: bool,
    /// Stream the vShard's WAL records above `base_lsn` alongside the base copy.
    pub wal: Option<WalSourceConfig>,
    /// A live migration run by a daemon: once the base is staged, the copy streams the WAL and
    /// serves the daemon's fence commands; a completed fence ends it (`CopyReport::fenced`).
    pub cutover: Option<CutOver>,
    /// How long transient failures are retried without progress before the copy fails.
    pub retry: RetryPolicy,
}

/// What a finished copy reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub migration_id: MigrationId,
    pub files_count: u64,
    pub bytes_total: u64,
    pub bytes_resent: u64,
    pub elapsed_us: u64,
    pub throughput_bytes_per_sec: u64,
    pub already_staged: bool,
    pub read_mode: String,
    pub committed: bool,
    /// A live copy that ended with a completed fence: the staging is `fenced` at `final_lsn`.
    pub fenced: bool,
    /// The LSN the staging was released (or fenced) at (offline: `base_lsn`, or `until_lsn` with a WAL).
    pub final_lsn: Lsn,
    pub connections_count: u32,
    pub reconnects_count: u32,
    /// Bytes the target already held when the last (successful) attempt began: what
    /// resumption did not send again.
    pub bytes_resumed: u64,
    /// What the last attempt's chunks went on (none: it sent no chunks).
    pub chunk_transport: Option<TransportSetting>,
    /// RDMA was asked for and the last attempt's chunks went over QUIC: why.
    pub rdma_fallback_reason: Option<String>,
}

/// The error a copy fails with once its retry deadline passed: a target that never answered
/// is named as unreachable, anything else keeps its last error.
fn gave_up(last: TransferError, addr: SocketAddr, waited_ms: u64) -> TransferError {
    let waited_s = (waited_ms + 500) / 1000;
    match last {
        TransferError::Timeout(HANDSHAKE) => TransferError::Unreachable { addr, waited_s },
        last => TransferError::RetriesExhausted { addr, waited_s, last: Box::new(last) },
    }
}

fn monotonic_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

/// Runs a whole base copy as the source. Progress is published on `progress`. A lost
/// connection is reconnected and the copy resumes from what the target holds.
pub async fn copy(
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    request: CopyRequest,
    progress: watch::Sender<Progress>,
    rate: RateHandle,
) -> Result<CopyReport, TransferError> {
    copy_with_identity(|| identity, tuning, request, progress, rate).await
}

/// [`copy`], taking the node's identity from `current` at each connection attempt: the daemon
/// passes its current one, so the attempt after a SIGHUP reload (a rotated cluster CA, renewed
/// node certificates) handshakes with the new certificates, and a copy that started under the
/// old ones still completes.
pub async fn copy_with_identity<F, I>(
    current: F,
    tuning: &QuicTuning,
    request: CopyRequest,
    progress: watch::Sender<Progress>,
    rate: RateHandle,
) -> Result<CopyReport, TransferError>
where
    F: Fn() -> I,
    I: std::ops::Deref<Target = NodeIdentity>,
{
    let started = Instant::now();
    let snapshot = {
        let (root, id, files) = (request.segments_root.clone(), request.migration_id.clone(), request.files.clone());
        tokio::task::spawn_blocking(move || Snapshot::create(&root, &id, files.as_deref()))
            .await
            .map_err(|e| TransferError::Local(format!("snapshot task failed: {e}")))??
    };
    let offer = Offer {
        migration_id: request.migration_id.clone(),
        vshard_id: request.vshard_id,
        base_lsn: request.base_lsn,
        chunk_len_bytes: request.chunk_len_bytes,
        files: snapshot.files.iter().map(|f| OfferFile { path: f.path.clone(), size_bytes: f.size_bytes }).collect(),
        db_meta: request.db_meta.clone(),
        wal: request.wal.is_some(),
    };
    offer.validate().map_err(|e| TransferError::Local(format!("cannot offer these files: {e}")))?;
    let reader = Arc::new(
        ChunkReader::new_or_pread(
            request.read_mode,
            ReaderConfig {
                chunk_len_max_bytes: request.chunk_len_bytes,
                priority: tuning.bulk.priority,
                ..ReaderConfig::default()
            },
        )
        .map_err(|e| TransferError::Local(format!("cannot start the chunk reader: {e}")))?,
    );
    let read_mode = reader.mode().to_string();
    let mut retries = Retries::new(request.retry, monotonic_ms());
    let mut reconnects_count = 0u32;
    let outcome = loop {
        let before = progress.borrow().bytes_transferred;
        let handshake = Duration::from_millis(retries.attempt_budget_ms(monotonic_ms(), HANDSHAKE_ATTEMPT_MS));
        let identity = current();
        let result =
            attempt(&identity, tuning, &request, &offer, &snapshot, &reader, &progress, &rate, handshake).await;
        drop(identity);
        let e = match result {
            Ok(outcome) => break outcome,
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let progressed = progress.borrow().bytes_transferred > before;
        match retries.failed(monotonic_ms(), progressed) {
            Decision::RetryAfterMs(backoff_ms) => {
                reconnects_count += 1;
                tracing::warn!(
                    migration = %request.migration_id,
                    "transfer interrupted ({e}); reconnecting to {} in {backoff_ms} ms",
                    request.target_addr
                );
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            }
            Decision::GiveUp { waited_ms } => return Err(gave_up(e, request.target_addr, waited_ms)),
        }
    };
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let bytes_total = offer.bytes_total();
    Ok(CopyReport {
        migration_id: request.migration_id,
        files_count: offer.files.len() as u64,
        bytes_total,
        bytes_resent: outcome.bytes_resent,
        elapsed_us,
        throughput_bytes_per_sec: u64::try_from(u128::from(bytes_total) * 1_000_000 / u128::from(elapsed_us.max(1)))
            .unwrap_or(u64::MAX),
        already_staged: outcome.already_staged,
        read_mode,
        committed: outcome.committed,
        fenced: outcome.fenced,
        final_lsn: outcome.final_lsn,
        connections_count: request.connections_count.max(1),
        reconnects_count,
        bytes_resumed: outcome.bytes_resumed,
        chunk_transport: outcome.chunk_transport,
        rdma_fallback_reason: outcome.rdma_fallback_reason,
    })
}

/// How one successful attempt ended.
struct Outcome {
    already_staged: bool,
    bytes_resent: u64,
    committed: bool,
    fenced: bool,
    bytes_resumed: u64,
    final_lsn: Lsn,
    chunk_transport: Option<TransportSetting>,
    rdma_fallback_reason: Option<String>,
}

/// A connection on its own endpoint (so its QUIC work runs on its own task).
struct Link {
    endpoint: quinn::Endpoint,
    conn: Connection,
}

impl Link {
    /// `bulk`: the connection carries only chunks (large MTU), and its endpoint runs on the
    /// node's bulk threads when it has them ([`crate::priority::bulk_runtime`]): its packet
    /// encryption and UDP sends run below the control and WAL streams. Otherwise it carries
    /// the control stream and the WAL stream too, whose small messages must not wait for the
    /// pacer, on the caller's runtime.
    async fn open(
        identity: &NodeIdentity,
        tuning: &QuicTuning,
        request: &CopyRequest,
        bulk: bool,
        handshake: Duration,
    ) -> Result<Self, TransferError> {
        let crypto = crate::tls::client_crypto(identity).map_err(|e| TransferError::Local(e.to_string()))?;
        let config = if bulk {
            crate::quic::bulk_client_config(crypto, tuning)
        } else {
            crate::quic::client_config(crypto, tuning)
        };
        let (addr, node) = (request.target_addr, request.target_node.clone());
        let connect = {
            let tuning = tuning.clone();
            // quinn drives an endpoint and its connections on the runtime they are made on.
            async move {
                let endpoint = crate::quic::client_endpoint(addr, &tuning)
                    .map_err(|e| TransferError::Connection(format!("cannot open a UDP socket: {e}")))?;
                let connecting = endpoint
                    .connect_with(config, addr, node.as_str())
                    .map_err(|e| TransferError::Connection(e.to_string()))?;
                let conn = tokio::time::timeout(handshake, connecting)
                    .await
                    .map_err(|_| TransferError::Timeout(HANDSHAKE))?
                    .map_err(|e| TransferError::from_handshake(e, addr, &node))?;
                Ok(Self { endpoint, conn })
            }
        };
        match crate::priority::bulk_runtime(tuning.bulk).filter(|_| bulk) {
            Some(runtime) => runtime
                .spawn(connect)
                .await
                .map_err(|e| TransferError::Local(format!("the bulk connection task failed: {e}")))?,
            None => connect.await,
        }
    }

    async fn close(self, result: &Result<Outcome, TransferError>) {
        match result {
            Ok(_) => self.conn.close(VarInt::from_u32(close_code::DONE), b"done"),
            Err(e) => self.conn.close(VarInt::from_u32(e.kind_and_code().1), e.to_string().as_bytes()),
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    request: &CopyRequest,
    offer: &Offer,
    snapshot: &Snapshot,
    reader: &Arc<ChunkReader>,
    progress: &watch::Sender<Progress>,
    rate: &RateHandle,
    handshake: Duration,
) -> Result<Outcome, TransferError> {
    // An offline copy's first connection carries chunks too; a live copy's carries the control
    // and WAL streams only, and its chunks go on connections of their own.
    let link = Link::open(identity, tuning, request, request.wal.is_none(), handshake).await?;
    let mut extra = Vec::new();
    let result = run(&link.conn, &mut extra, identity, tuning, request, offer, snapshot, reader, progress, rate).await;
    for link in extra {
        link.close(&result).await;
    }
    link.close(&result).await;
    result.map_err(|e| e.at_target(request.target_addr))
}

/// Runs the copy's conversation on a fresh control stream: executes the machine's actions
/// and feeds it the target's messages until it says the copy is over.
#[allow(clippy::too_many_arguments)]
async fn run(
    conn: &Connection,
    extra: &mut Vec<Link>,
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    request: &CopyRequest,
    offer: &Offer,
    snapshot: &Snapshot,
    reader: &Arc<ChunkReader>,
    progress: &watch::Sender<Progress>,
    rate: &RateHandle,
) -> Result<Outcome, TransferError> {
    let (mut send, recv) = conn.open_bi().await?;
    let plan = CopyPlan { wal: request.wal.is_some(), cutover: request.cutover.is_some(), commit: request.commit };
    let machine = Arc::new(Mutex::new(SourceConversation::copy(identity.node_id(), offer.clone(), plan)));
    let (mut messages, _reader_guard) = read_messages(recv);
    let mut wal: Option<WalRun> = None;
    // An action a nested driver (the chunk shipping, the cut-over) handed back undone.
    let mut pending: Option<SourceAction> = None;
    let (mut already_staged, mut bytes_resumed, mut bytes_resent) = (false, 0u64, 0u64);
    let (mut chunk_transport, mut rdma_fallback_reason) = (None, None);
    let (final_lsn, committed, fenced) = loop {
        let next = match pending.take() {
            Some(action) => Some(action),
            None => lock(&machine).poll_action(),
        };
        let Some(action) = next else {
            receive(&machine, &mut messages).await?;
            continue;
        };
        match action {
            SourceAction::Send(message) => write_control(&mut send, &message).await?,
            SourceAction::SendFileDone { file_index, message } => {
                ship::announce_file(snapshot, file_index, &message, &mut send).await?
            }
            SourceAction::Accepted { already_staged: staged, bytes_resumed: resumed } => {
                (already_staged, bytes_resumed) = (staged, resumed);
                publish(progress, lock(&machine).progress());
            }
            SourceAction::StartWal => {
                let config = request.wal.as_ref().ok_or_else(|| TransferError::Local("no WAL to stream".into()))?;
                wal = Some(start_wal(conn, config, &request.migration_id, request.vshard_id, offer, progress).await?);
            }
            SourceAction::Recheck(spans) => ship::recheck(snapshot, reader, &machine, spans).await?,
            SourceAction::SendChunks => {
                let conns = chunk_connections(conn, extra, identity, tuning, request).await?;
                let plan = ship_plan(request, tuning);
                let attached = attach_source(
                    &tuning.chunk_transport,
                    &request.migration_id,
                    &conns,
                    plan.streams_count.max(1),
                    plan.chunk_len_bytes,
                )
                .await?;
                chunk_transport = Some(attached.in_use);
                rdma_fallback_reason = attached.fallback_reason;
                let shipped = ship::ship(
                    &conns,
                    &attached.lanes,
                    &plan,
                    snapshot,
                    reader,
                    &machine,
                    &mut send,
                    &mut messages,
                    progress,
                    rate,
                    wal.as_mut(),
                );
                pending = Some(shipped.await?);
            }
            SourceAction::BaseStaged { bytes_resent: resent } => {
                bytes_resent = resent;
                base_staged(snapshot, &machine, progress)?;
            }
            SourceAction::FinishWal => {
                let run = wal.as_mut().ok_or_else(|| TransferError::Local("no WAL stream to finish".into()))?;
                let final_lsn = run.finish(progress).await?;
                lock(&machine).handle_wal_finished(final_lsn)?;
            }
            SourceAction::ServeCutOver => {
                let (Some(run), Some(cutover)) = (wal.as_mut(), &request.cutover) else {
                    return Err(TransferError::Local("a cut-over without a WAL stream or a daemon".into()));
                };
                pending = Some(super::fence_source::serve(cutover, run, &mut send, &mut messages, &machine).await?);
                publish_wal(&run.shared, progress);
            }
            SourceAction::Finish { final_lsn, committed, fenced } => break (final_lsn, committed, fenced),
            other @ (SourceAction::Fenced { .. }
            | SourceAction::FenceCancelled { .. }
            | SourceAction::FenceTimedOut { .. }
            | SourceAction::Answered) => {
                return Err(TransferError::Local(format!("the copy cannot execute {other:?} here")))
            }
        }
    };
    finish_control(&mut send, &mut messages).await;
    if committed {
        if let Some(config) = &request.wal {
            walsend::Holder::remove_all(&config.dir, &request.migration_id);
        }
    }
    Ok(Outcome {
        already_staged,
        bytes_resent,
        committed,
        fenced,
        bytes_resumed,
        final_lsn,
        chunk_transport,
        rdma_fallback_reason,
    })
}

/// How the chunk streams ship: the request's streams, rate and chunk length.
fn ship_plan(request: &CopyRequest, tuning: &QuicTuning) -> ShipPlan {
    ShipPlan {
        streams_count: request.streams_count,
        rate_limit_bytes_per_sec: request.rate_limit_bytes_per_sec,
        chunk_len_bytes: request.chunk_len_bytes,
        bulk: tuning.bulk,
    }
}

/// The base is staged: progress says so, and a file that changed after it was announced
/// still fails the copy.
fn base_staged(
    snapshot: &Snapshot,
    machine: &Mutex<SourceConversation>,
    progress: &watch::Sender<Progress>,
) -> Result<(), TransferError> {
    progress.send_modify(|p| p.base_staged = true);
    publish(progress, lock(machine).progress());
    for file in &snapshot.files {
        file.check_unchanged()?;
    }
    Ok(())
}

/// Feeds the machine the target's next message (its hello within [`CONNECT_TIMEOUT`]).
async fn receive(machine: &Mutex<SourceConversation>, messages: &mut Messages) -> Result<(), TransferError> {
    let awaiting_hello = lock(machine).state() == SourceState::AwaitHello;
    let message = if awaiting_hello {
        tokio::time::timeout(CONNECT_TIMEOUT, messages.recv())
            .await
            .map_err(|_| TransferError::Timeout("the target's hello"))?
    } else {
        messages.recv().await
    };
    let message = received(message)?;
    lock(machine).handle_message(message, monotonic_ns())?;
    Ok(())
}

/// The connections the chunk streams go on: an offline copy's first connection and the
/// extra ones it joins (kept in `extra` to be closed at the end), `connections_count` in all.
async fn chunk_connections(
    conn: &Connection,
    extra: &mut Vec<Link>,
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    request: &CopyRequest,
) -> Result<Vec<Connection>, TransferError> {
    let (mut conns, first_extra) = if request.wal.is_none() { (vec![conn.clone()], 1) } else { (Vec::new(), 0) };
    for _ in first_extra..request.connections_count.max(1) {
        let link = join(conn, identity, tuning, request).await?;
        conns.push(link.conn.clone());
        extra.push(link);
    }
    Ok(conns)
}

/// Finishes our side of the control stream, then waits (5 s at most) for the target to finish
/// its side, so neither end sees the connection close while it still expects a message.
async fn finish_control(send: &mut quinn::SendStream, messages: &mut Messages) {
    let _ = send.finish();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(Some(_))) = messages.recv().await {} })
            .await;
}

/// The control stream's reader, on its own task (reads are not cancel-safe). The target's
/// second message (its accept, with the resume list) may be large; the others are small.
fn read_messages(mut recv: quinn::RecvStream) -> (Messages, super::task::AbortOnDrop) {
    let (messages_tx, messages) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        for index in 0u64.. {
            let body_max_bytes = if index == 1 { CONTROL_BODY_LEN_MAX_BYTES } else { SMALL_CONTROL_BODY_MAX_BYTES };
            let next = read_control(&mut recv, body_max_bytes).await;
            let end = !matches!(next, Ok(Some(_)));
            if messages_tx.send(next).await.is_err() || end {
                return;
            }
        }
    });
    (messages, super::task::AbortOnDrop(task))
}

/// Opens an extra connection for chunk streams and joins it to the transfer.
async fn join(
    conn: &Connection,
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    request: &CopyRequest,
) -> Result<Link, TransferError> {
    let link = Link::open(identity, tuning, request, true, CONNECT_TIMEOUT).await?;
    let (mut send, mut recv) = link.conn.open_bi().await?;
    let mut machine = SourceConversation::join(identity.node_id(), request.migration_id.clone());
    match super::request::converse(&mut machine, &mut send, &mut recv, Some(CONNECT_TIMEOUT)).await {
        Ok(()) => Ok(link),
        Err(TransferError::Peer { kind, message }) => {
            // The first connection may have been lost meanwhile, and the target let go of the
            // transfer with it (its close may trail the refusal): a new attempt gets past that.
            let lost = tokio::time::timeout(JOIN_LOST_GRACE, conn.closed()).await.is_ok();
            Err(if lost {
                TransferError::Connection(format!(
                    "the connection carrying the transfer was lost while another joined it: {message}"
                ))
            } else {
                TransferError::Peer { kind, message }
            })
        }
        Err(e) => Err(e),
    }
}
