//! Outbound migrations: the source side of migrations the daemon runs for its coordinator.
//!
//! What it does: `migration.start` (idempotent per caller-chosen id, one migration per vShard,
//! bounded by `max_outbound_migrations`), running each as a task around
//! [`crate::transfer::source::copy`]; the phase of each (DESIGN section 5) written durably at
//! every boundary and refreshed while it runs ([`record`]); after a restart each unfinished
//! migration is resumed from the target's state, or aborted when its record is older than
//! `abort_timeout`; `abort` (stops the task, asks the target to remove its staging, drops the
//! snapshot links and held WAL links), `forget` (removes what a finished migration holds),
//! and `set_rate_limit` at run time under the daemon's global limit.
//!
//! The cut-over (`prepare_cutover`, `fence`, `release`) is in [`cutover`]: a live migration
//! (a WAL, not offline) waits in `WalCatchUp` for it.
//!
//! What it does not: speak JSON-RPC (the daemon maps these results and [`OutboundError`] to
//! the socket).
//!
//! Invariants: a migration's phase record is durable before `start` answers; a final phase is
//! never left again; every registry lock is held briefly and never across an await.

mod fence_calls;
pub use fence_calls::RELEASE_PENDING_OUTCOME;
pub mod record;
pub mod stall;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_wire::api::{MigrationStatus, Phase, PhaseRecord, Role, StartParams, WalProgress};
use ferry_wire::proto::outbound::{Lifecycle, OutboundRefusal};
use ferry_wire::retry::RetryPolicy;
use ferry_wire::session::Progress;
use ferry_wire::wal::{Layout, LayoutChoice};
use ferry_wire::{Lsn, MigrationId, VShardId};
use tokio::sync::watch;

use crate::quic::QuicTuning;
use crate::snapshot::Snapshot;
use crate::storage::Storage;
use crate::tls::NodeIdentity;
use crate::transfer::source::{self, CopyRequest, RateHandle};
use crate::transfer::walsend::{Holder, WalSourceConfig};

/// How often a running migration's record is rewritten, so its age says when the daemon last
/// ran it (the staleness `abort_timeout` measures).
const RECORD_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// The daemon's settings for outbound migrations.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub data_dir: PathBuf,
    /// 0: unlimited.
    pub max_outbound_count: usize,
    /// Shared by every outbound migration; 0: unlimited.
    pub global_rate_limit_bytes_per_sec: u64,
    pub max_held_wal_bytes: u64,
    pub abort_timeout: Duration,
    pub tuning: QuicTuning,
    /// How long each migration's copy retries transient failures without progress.
    pub retry: RetryPolicy,
}

/// Why a request about outbound migrations failed, by blame.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The caller's parameters are wrong.
    #[error("{0}")]
    InvalidParams(String),
    #[error("vShard {vshard_id} is already being migrated by {holder}")]
    InProgress { vshard_id: u32, holder: MigrationId },
    #[error("no outbound migration {0} on this node")]
    NotFound(MigrationId),
    /// The request is well-formed but cannot be done now (capacity, state).
    #[error("{0}")]
    Refused(String),
    /// This node failed (its disk).
    #[error("{0}")]
    Local(String),
    #[error("the estimated pause of {estimated_us} us is over the budget of {budget_us} us: let the catch-up shrink the lag (or raise write_pause_budget_us), then prepare again; writes were not paused")]
    PauseBudgetExceeded { estimated_us: u64, budget_us: u64 },
    #[error("cut-over cancelled: {0}; resume writes on the source, the migration is back in WalCatchUp and the fence may be tried again")]
    CutOverCancelled(String),
    #[error("fence violated: a record of the vShard with LSN {0}, above final_lsn, was written on the source after the fence: the writer did not pause; resume writes on the source and fence again with a new final_lsn")]
    FenceViolated(u64),
}

/// One outbound migration as the registry holds it.
struct Entry {
    params: StartParams,
    /// Where the migration is: the only phase state the daemon keeps.
    life: Lifecycle,
    progress: watch::Receiver<Progress>,
    rate: RateHandle,
    task: Option<tokio::task::AbortHandle>,
    started_at_unix_ms: u64,
    updated_at_unix_ms: u64,
    /// When this daemon process began running it (for the average rate).
    run_started: Instant,
    bytes_at_run_start: u64,
    /// The last throughput sample: when, bytes then, and the rate measured over the window.
    sample: (Instant, u64, u64),
    bytes_resent: u64,
    staging_state: Option<String>,
    /// A live migration's way into its running copy's cut-over.
    cutover: Option<tokio::sync::mpsc::Sender<crate::transfer::fence_source::FenceCommand>>,
    /// The running WAL stream's live figures (for the estimate).
    stream: crate::transfer::fence_source::StreamFigures,
    /// The estimate the last `prepare_cutover` admitted.
    estimate_us: Option<u64>,
    /// The slowest MANIFEST commit the target reported in this migration's fences.
    manifest_commit_us: u64,
    /// When its progress last moved (the status's `no_progress_for_s`).
    stall: stall::StallClock,
}

/// The daemon's outbound migrations.
pub struct Outbound {
    config: OutboundConfig,
    identity: RwLock<Arc<NodeIdentity>>,
    storage: Arc<dyn Storage>,
    global_rate: Arc<RateHandle>,
    entries: Mutex<BTreeMap<MigrationId, Entry>>,
    /// Serializes phase record writes (each builds its record under it, so a newer state is
    /// never overwritten by an older one).
    record_lock: tokio::sync::Mutex<()>,
    /// How long a migration with work left may make no progress before its status says so.
    stall_after: Mutex<Duration>,
    /// One loop at a time tells targets of the releases they missed.
    retelling: fence_calls::RetellGate,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("data_dir", &self.config.data_dir).finish()
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn layout_choice(text: &str) -> LayoutChoice {
    match text {
        "a" | "A" => LayoutChoice::Fixed(Layout::A),
        "b" | "B" => LayoutChoice::Fixed(Layout::B),
        _ => LayoutChoice::Auto,
    }
}

/// The node-wide rate limit's burst (its bucket starts full): a quarter of a second at the
/// rate, at least 1 MiB (one large chunk) and at most 16 MiB. A fixed 16 MiB let the first
/// 16 MiB of a 4 MiB/s limit out at once, 4 s worth of the rate.
pub fn node_burst_bytes(rate_bytes_per_sec: u64) -> u64 {
    (rate_bytes_per_sec / 4).clamp(1 << 20, 16 << 20)
}

impl Outbound {
    pub fn new(config: OutboundConfig, identity: Arc<NodeIdentity>, storage: Arc<dyn Storage>) -> Arc<Self> {
        let rate = config.global_rate_limit_bytes_per_sec;
        let global_rate = Arc::new(RateHandle::new(rate, node_burst_bytes(rate)));
        Arc::new(Self {
            config,
            identity: RwLock::new(identity),
            storage,
            global_rate,
            entries: Mutex::new(BTreeMap::new()),
            record_lock: tokio::sync::Mutex::new(()),
            stall_after: Mutex::new(stall::STALL_AFTER_DEFAULT),
            retelling: fence_calls::RetellGate::default(),
        })
    }

    /// The stall threshold in force (zero: statuses never say a migration is stalled).
    pub fn stall_after(&self) -> Duration {
        *self.stall_after.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the stall threshold, for this node's outbound and inbound statuses.
    pub fn set_stall_after(&self, threshold: Duration) {
        *self.stall_after.lock().unwrap_or_else(|e| e.into_inner()) = threshold;
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<MigrationId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn identity(&self) -> Arc<NodeIdentity> {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Uses `identity` for connections made from now on (SIGHUP reload).
    pub fn set_identity(&self, identity: Arc<NodeIdentity>) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
    }

    /// Starts a migration, or finds the identical one started before (`Ok((id, false))`).
    pub async fn start(self: &Arc<Self>, params: StartParams) -> Result<(MigrationId, bool), OutboundError> {
        params.validate().map_err(|e| OutboundError::InvalidParams(e.to_string()))?;
        let id = params.migration_id().map_err(|e| OutboundError::InvalidParams(e.to_string()))?;
        let now_ms = now_unix_ms();
        {
            let entries = self.entries();
            if let Some(existing) = entries.get(&id) {
                if existing.params == params {
                    return Ok((id, false));
                }
                return Err(OutboundError::Refused(format!(
                    "migration {id} exists with other parameters; use a new migration id (or forget the finished one)"
                )));
            }
            if let Some((holder, _)) =
                entries.iter().find(|(_, e)| e.params.vshard_id == params.vshard_id && !e.life.is_final())
            {
                return Err(OutboundError::InProgress { vshard_id: params.vshard_id, holder: holder.clone() });
            }
            let running = entries.values().filter(|e| !e.life.is_final()).count();
            if self.config.max_outbound_count > 0 && running >= self.config.max_outbound_count {
                return Err(OutboundError::Refused(format!(
                    "this node runs {running} outbound migrations, the limit max_outbound_migrations is {}; retry later",
                    self.config.max_outbound_count
                )));
            }
        }
        let record = PhaseRecord {
            params: params.clone(),
            phase: Phase::BaseCopy,
            reason: None,
            started_at_unix_ms: now_ms,
            updated_at_unix_ms: now_ms,
            bytes_total: 0,
            bytes_resent: 0,
            final_lsn: None,
            pause: None,
            target_released: false,
            fence_stamps: None,
            fenced_durable_lsn: None,
        };
        self.write_record(&id, record).await?;
        // Another start of the same id may have raced us to here: the registry decides.
        if self.entries().contains_key(&id) {
            return Ok((id, false));
        }
        self.launch(id.clone(), params, now_ms);
        Ok((id, true))
    }

    async fn write_record(&self, id: &MigrationId, record: PhaseRecord) -> Result<(), OutboundError> {
        let _serial = self.record_lock.lock().await;
        self.write_record_locked(id, record).await
    }

    /// Writes the record of `id` as the registry holds it now.
    async fn persist(&self, id: &MigrationId) -> Result<(), OutboundError> {
        let _serial = self.record_lock.lock().await;
        let Some(record) = self.entries().get(id).map(record_of) else { return Ok(()) };
        self.write_record_locked(id, record).await
    }

    async fn write_record_locked(&self, id: &MigrationId, record: PhaseRecord) -> Result<(), OutboundError> {
        let (storage, data_dir, id) = (self.storage.clone(), self.config.data_dir.clone(), id.clone());
        tokio::task::spawn_blocking(move || record::write(&*storage, &data_dir, &id, &record))
            .await
            .map_err(|e| OutboundError::Local(format!("a blocking task failed: {e}")))?
            .map_err(|e| OutboundError::Local(format!("cannot write the migration's phase record: {e}")))
    }

    /// Registers and spawns the task running `id`.
    fn launch(self: &Arc<Self>, id: MigrationId, params: StartParams, started_at_unix_ms: u64) {
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let rate = RateHandle::with_parent(
            params.rate_limit_bytes_per_sec,
            u64::from(params.chunk_len_bytes),
            self.global_rate.clone(),
        );
        let live = params.wal_dir.is_some() && !params.offline;
        let (cutover_tx, cutover) = crate::transfer::fence_source::CutOver::channel();
        let stream = cutover.stream.clone();
        let cutover = live.then_some(cutover);
        let me = self.clone();
        let task = tokio::spawn({
            let (id, params, rate) = (id.clone(), params.clone(), rate.clone());
            async move { me.run(id, params, progress_tx, rate, cutover).await }
        });
        self.entries().insert(
            id,
            Entry {
                params,
                life: Lifecycle::BaseCopy,
                progress: progress_rx,
                rate,
                task: Some(task.abort_handle()),
                started_at_unix_ms,
                updated_at_unix_ms: now_unix_ms(),
                run_started: Instant::now(),
                bytes_at_run_start: 0,
                sample: (Instant::now(), 0, 0),
                bytes_resent: 0,
                staging_state: Some("copying".into()),
                cutover: live.then_some(cutover_tx),
                stream,
                estimate_us: None,
                manifest_commit_us: 0,
                stall: stall::StallClock::new(Instant::now()),
            },
        );
    }

    fn copy_request(
        &self,
        id: &MigrationId,
        params: &StartParams,
        cutover: Option<crate::transfer::fence_source::CutOver>,
    ) -> Result<CopyRequest, OutboundError> {
        let bad = |e: String| OutboundError::InvalidParams(e);
        let target_addr: SocketAddr = params.target_address.parse().map_err(|e| bad(format!("target_address: {e}")))?;
        Ok(CopyRequest {
            migration_id: id.clone(),
            vshard_id: VShardId(params.vshard_id),
            base_lsn: Lsn(params.base_lsn),
            segments_root: PathBuf::from(&params.segments_root),
            files: params.rel_files().map_err(|e| bad(e.to_string()))?,
            db_meta: params.db_meta.clone(),
            target_addr,
            target_node: params.target_node().map_err(|e| bad(e.to_string()))?,
            chunk_len_bytes: params.chunk_len_bytes,
            streams_count: params.streams,
            connections_count: params.connections,
            // The rate lives in the migration's RateHandle (so set_rate_limit survives reconnects).
            rate_limit_bytes_per_sec: 0,
            read_mode: params.read_mode.parse().map_err(|e| bad(format!("read_mode: {e}")))?,
            commit: params.offline,
            wal: params.wal_dir.as_ref().map(|dir| WalSourceConfig {
                dir: PathBuf::from(dir),
                layout: layout_choice(&params.wal_layout),
                alignment_bytes: params.wal_alignment_bytes,
                until_lsn: params.until_lsn.map(Lsn),
                max_held_wal_bytes: self.config.max_held_wal_bytes,
                poll_interval: crate::transfer::walsend::POLL_INTERVAL,
            }),
            cutover,
            retry: self.config.retry,
        })
    }

    /// Runs one migration to its end, recording each phase boundary.
    async fn run(
        self: Arc<Self>,
        id: MigrationId,
        params: StartParams,
        progress: watch::Sender<Progress>,
        rate: RateHandle,
        cutover: Option<crate::transfer::fence_source::CutOver>,
    ) {
        let request = match self.copy_request(&id, &params, cutover) {
            Ok(request) => request,
            Err(e) => return self.fail(&id, e.to_string()).await,
        };
        let streams_wal = request.wal.is_some();
        let watcher = tokio::spawn({
            let (me, id, mut rx) = (self.clone(), id.clone(), progress.subscribe());
            async move {
                let mut refresh = tokio::time::interval(RECORD_REFRESH_INTERVAL);
                refresh.tick().await;
                let mut base_staged = false;
                loop {
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let staged = rx.borrow_and_update().base_staged;
                            if staged && !base_staged {
                                base_staged = true;
                                me.catch_up(&id, streams_wal).await;
                            }
                        }
                        _ = refresh.tick() => me.refresh(&id).await,
                    }
                }
            }
        });
        // The identity is read again at each reconnection: a SIGHUP reload reaches a running copy.
        let result = source::copy_with_identity(|| self.identity(), &self.config.tuning, request, progress, rate).await;
        watcher.abort();
        match result {
            Ok(report) if report.committed => {
                self.complete_offline(&id, report.bytes_resent).await;
            }
            Ok(report) if report.fenced => {
                // The staging is fenced: the migration waits in AtomicCutOver for release or
                // abort; nothing more is streamed.
                self.set_resent(&id, report.bytes_resent);
                if let Some(entry) = self.entries().get_mut(&id) {
                    entry.task = None;
                    // A release may already have come in while the copy closed its connection.
                    if entry.life.phase() == Phase::AtomicCutOver {
                        entry.staging_state = Some("fenced".into());
                    }
                }
            }
            Ok(report) => {
                // A live migration whose base (and, with a WAL, catch-up) ended without an
                // offline commit: it waits in WalCatchUp for the cut-over.
                self.set_resent(&id, report.bytes_resent);
                self.catch_up(&id, true).await;
            }
            Err(e) => {
                tracing::warn!(migration = %id, "outbound migration failed: {e}");
                self.fail(&id, e.to_string()).await;
            }
        }
    }

    fn set_resent(&self, id: &MigrationId, bytes_resent: u64) {
        if let Some(entry) = self.entries().get_mut(id) {
            entry.bytes_resent = bytes_resent;
        }
    }

    /// The base is staged: `WalCatchUp` when a WAL stream follows (`streams_wal`), recorded
    /// (a fence or a final state keeps its phase).
    async fn catch_up(&self, id: &MigrationId, streams_wal: bool) {
        {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(id) else { return };
            if !entry.life.base_staged(streams_wal) {
                return;
            }
            entry.updated_at_unix_ms = now_unix_ms();
        }
        if let Err(e) = self.persist(id).await {
            // The phase in memory is right; a restart resumes from the older boundary, which
            // the target's own checkpoints make safe.
            tracing::error!(migration = %id, "{e}");
        }
    }

    async fn refresh(&self, id: &MigrationId) {
        {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(id) else { return };
            entry.updated_at_unix_ms = now_unix_ms();
        }
        if let Err(e) = self.persist(id).await {
            tracing::error!(migration = %id, "{e}");
        }
    }

    /// An offline end: the target committed the staging. A final phase is never left.
    async fn complete_offline(&self, id: &MigrationId, bytes_resent: u64) {
        {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(id) else { return };
            if !entry.life.committed_offline() {
                return;
            }
            entry.task = None;
            entry.updated_at_unix_ms = now_unix_ms();
            entry.cutover = None;
            entry.staging_state = Some("released".to_owned());
            entry.bytes_resent = bytes_resent;
        }
        if let Err(e) = self.persist(id).await {
            tracing::error!(migration = %id, "{e}");
        }
    }

    /// The migration failed (or was aborted), and that is recorded. A final phase is never left.
    async fn fail(&self, id: &MigrationId, reason: String) {
        {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(id) else { return };
            let kind = crate::metrics::error_kind_of(&reason);
            if !entry.life.fail(Some(reason)) {
                return;
            }
            crate::metrics::count_error(kind);
            entry.task = None;
            entry.updated_at_unix_ms = now_unix_ms();
            entry.cutover = None;
        }
        if let Err(e) = self.persist(id).await {
            tracing::error!(migration = %id, "{e}");
        }
    }

    /// Resumes or aborts the migrations an earlier run left (call once, at daemon start).
    /// Returns, per migration, what was done, for the log and the first events.
    pub async fn recover(self: &Arc<Self>) -> Vec<(MigrationId, String)> {
        let found = {
            let (storage, data_dir) = (self.storage.clone(), self.config.data_dir.clone());
            tokio::task::spawn_blocking(move || record::list(&*storage, &data_dir)).await.unwrap_or_default()
        };
        let now_ms = now_unix_ms();
        let mut outcomes = Vec::new();
        for (id, found) in found {
            let record = match found {
                record::Found::Record(record) => *record,
                record::Found::Damaged(message) => {
                    tracing::error!(migration = %id, "outbound migration not recovered: {message}");
                    outcomes.push((id, format!("not recovered: {message}")));
                    continue;
                }
            };
            let age_ms = now_ms.saturating_sub(record.updated_at_unix_ms);
            let stale = u128::from(age_ms) > self.config.abort_timeout.as_millis();
            if record.phase == Phase::Completed && record.final_lsn.is_some() && !record.target_released {
                // Told by [`Outbound::tell_pending_releases`], so an unreachable target does
                // not hold up the daemon's start.
                self.insert_final(&id, &record);
                outcomes.push((id, fence_calls::RELEASE_PENDING_OUTCOME.to_owned()));
            } else if record.phase.is_final() {
                self.insert_final(&id, &record);
                outcomes.push((id, format!("kept: {:?}", record.phase)));
            } else if stale {
                let reason = format!(
                    "aborted: not resumed within abort_timeout ({} s); the daemon last ran it {} s ago",
                    self.config.abort_timeout.as_secs(),
                    age_ms / 1000
                );
                // Held as running (its record's phase is not final) so abort can stop it cleanly.
                self.insert_final(&id, &record);
                let outcome = match self.abort(&id, &reason).await {
                    Ok(note) => format!("{reason}; {note}"),
                    Err(e) => format!("{reason}; abort failed: {e}"),
                };
                outcomes.push((id, outcome));
            } else {
                tracing::info!(migration = %id, phase = ?record.phase, "resuming outbound migration after a restart");
                self.launch(id.clone(), record.params.clone(), record.started_at_unix_ms);
                if record.phase != Phase::BaseCopy {
                    if let Some(entry) = self.entries().get_mut(&id) {
                        // A fence interrupted by the restart is cancelled: the migration streams
                        // again in WalCatchUp; a release may still complete it if the target
                        // confirms it is fenced at that LSN.
                        entry.life = Lifecycle::resumed(record.phase, record.final_lsn.map(Lsn), record.fence_stamps);
                    }
                }
                outcomes.push((id, format!("resumed in {:?}", record.phase)));
            }
        }
        outcomes
    }

    fn insert_final(&self, id: &MigrationId, record: &PhaseRecord) {
        let (_tx, progress) = watch::channel(Progress {
            bytes_total: record.bytes_total,
            bytes_transferred: if record.phase == Phase::Completed { record.bytes_total } else { 0 },
            ..Progress::default()
        });
        self.entries().insert(
            id.clone(),
            Entry {
                params: record.params.clone(),
                life: Lifecycle::of_record(
                    record.phase,
                    record.reason.clone(),
                    record.final_lsn.map(Lsn),
                    record.pause,
                    record.target_released,
                    record.fenced_durable_lsn.map(Lsn),
                ),
                progress,
                rate: RateHandle::new(record.params.rate_limit_bytes_per_sec, 1 << 20),
                task: None,
                started_at_unix_ms: record.started_at_unix_ms,
                updated_at_unix_ms: record.updated_at_unix_ms,
                run_started: Instant::now(),
                bytes_at_run_start: 0,
                sample: (Instant::now(), 0, 0),
                bytes_resent: record.bytes_resent,
                // A release the target has not confirmed leaves its staging fenced.
                staging_state: match (record.phase, record.final_lsn, record.target_released) {
                    (Phase::Completed, Some(_), false) => Some("fenced".into()),
                    (Phase::Completed, _, _) => Some("released".into()),
                    _ => None,
                },
                cutover: None,
                stream: crate::transfer::fence_source::StreamFigures::default(),
                estimate_us: None,
                manifest_commit_us: 0,
                stall: stall::StallClock::new(Instant::now()),
            },
        );
    }

    /// Aborts `id`: stops its task, asks the target to remove its staging, drops the snapshot
    /// and held WAL links. Returns a note on what the target did. Idempotent on a failed
    /// migration (the target is asked again); refused once completed.
    pub async fn abort(&self, id: &MigrationId, reason: &str) -> Result<String, OutboundError> {
        let params = {
            let mut entries = self.entries();
            let entry = entries.get_mut(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
            entry.life.check_abort().map_err(|e| refusal(id, e))?;
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            entry.params.clone()
        };
        let reason = if reason.starts_with("aborted") { reason.to_owned() } else { format!("aborted: {reason}") };
        self.fail(id, reason.clone()).await;
        let note = match self.tell_target(id, &params, &reason).await {
            Ok(()) => {
                if let Some(entry) = self.entries().get_mut(id) {
                    entry.staging_state = Some("aborted".into());
                }
                "target staging removed".to_owned()
            }
            Err(e) => {
                tracing::warn!(migration = %id, "abort could not reach the target: {e}");
                format!("the target could not be told ({e}); abort again, or abort it on the target's socket")
            }
        };
        self.release_links(id, &params).await;
        Ok(note)
    }

    async fn tell_target(&self, id: &MigrationId, params: &StartParams, reason: &str) -> Result<(), String> {
        let addr: SocketAddr = params.target_address.parse().map_err(|e| format!("target_address: {e}"))?;
        let node = params.target_node().map_err(|e| e.to_string())?;
        crate::transfer::request::request_abort(&self.identity(), &self.config.tuning, addr, &node, id, reason)
            .await
            .map_err(|e| e.to_string())
    }

    /// Drops the snapshot's and the WAL holder's hard links of `id`.
    async fn release_links(&self, id: &MigrationId, params: &StartParams) {
        let (id, root, wal_dir) = (id.clone(), PathBuf::from(&params.segments_root), params.wal_dir.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = Snapshot::remove(&root, &id) {
                tracing::warn!(migration = %id, "{e}");
            }
            if let Some(dir) = wal_dir {
                Holder::remove_all(std::path::Path::new(&dir), &id);
            }
        })
        .await;
    }

    /// Removes what a finished migration holds on this node (record, snapshot and held WAL
    /// links). A migration still running is refused: abort it first.
    pub async fn forget(&self, id: &MigrationId) -> Result<(), OutboundError> {
        let params = {
            let entries = self.entries();
            let entry = entries.get(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
            if !entry.life.is_final() {
                return Err(OutboundError::Refused(format!(
                    "migration {id} is in {:?}: abort it first (forget removes only finished migrations)",
                    entry.life.phase()
                )));
            }
            entry.params.clone()
        };
        self.release_links(id, &params).await;
        let (storage, data_dir, owned) = (self.storage.clone(), self.config.data_dir.clone(), id.clone());
        tokio::task::spawn_blocking(move || record::remove(&*storage, &data_dir, &owned))
            .await
            .map_err(|e| OutboundError::Local(format!("a blocking task failed: {e}")))?
            .map_err(|e| OutboundError::Local(format!("cannot remove the phase record: {e}")))?;
        self.entries().remove(id);
        Ok(())
    }

    /// Changes a running migration's rate limit at once (0: unlimited; the daemon's global
    /// limit still applies).
    pub fn set_rate_limit(&self, id: &MigrationId, bytes_per_sec: u64) -> Result<u64, OutboundError> {
        let mut entries = self.entries();
        let entry = entries.get_mut(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
        if entry.life.is_final() {
            return Err(OutboundError::Refused(format!(
                "migration {id} is {:?}: nothing to rate-limit",
                entry.life.phase()
            )));
        }
        entry.rate.set(bytes_per_sec);
        entry.params.rate_limit_bytes_per_sec = bytes_per_sec;
        Ok(entry.rate.rate_bytes_per_sec())
    }

    /// Rewrites every running migration's record (at shutdown, so a restart soon after finds
    /// them fresh and resumes them).
    pub async fn checkpoint_all(&self) {
        let running: Vec<MigrationId> =
            self.entries().iter().filter(|(_, e)| !e.life.is_final()).map(|(id, _)| id.clone()).collect();
        for id in running {
            self.refresh(&id).await;
        }
    }

    /// Every outbound migration's status.
    pub fn statuses(&self) -> Vec<MigrationStatus> {
        let stall_after = self.stall_after();
        self.entries().iter_mut().map(|(id, e)| status_of(id, e, stall_after)).collect()
    }

    pub fn status(&self, id: &MigrationId) -> Option<MigrationStatus> {
        let stall_after = self.stall_after();
        self.entries().get_mut(id).map(|e| status_of(id, e, stall_after))
    }
}

fn record_of(entry: &Entry) -> PhaseRecord {
    let p = *entry.progress.borrow();
    PhaseRecord {
        params: entry.params.clone(),
        phase: entry.life.phase(),
        reason: entry.life.reason().map(str::to_owned),
        started_at_unix_ms: entry.started_at_unix_ms,
        updated_at_unix_ms: entry.updated_at_unix_ms,
        bytes_total: p.bytes_total,
        bytes_resent: entry.bytes_resent,
        final_lsn: entry.life.record_final_lsn().map(|l| l.0),
        pause: entry.life.pause(),
        target_released: entry.life.target_told(),
        fence_stamps: entry.life.record_fence_stamps(),
        fenced_durable_lsn: entry.life.release().and_then(|r| r.fenced_durable_lsn).map(|l| l.0),
    }
}

/// A refusal of the lifecycle as the daemon reports it: the stamps' error blames the caller's
/// parameters; every other refusal is the migration's state.
fn refusal(id: &MigrationId, e: OutboundRefusal) -> OutboundError {
    match e {
        OutboundRefusal::Stamps(e) => OutboundError::InvalidParams(e.to_string()),
        other => OutboundError::Refused(format!("migration {id} {other}")),
    }
}

/// Throughput is measured over windows of at least this long (statuses are read every 250 ms).
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(1);

fn status_of(id: &MigrationId, e: &mut Entry, stall_after: Duration) -> MigrationStatus {
    let p = *e.progress.borrow();
    let (at, bytes_then, mut rate) = e.sample;
    let window = at.elapsed();
    if window >= THROUGHPUT_WINDOW {
        rate = per_second(p.bytes_transferred.saturating_sub(bytes_then), window.as_secs_f64());
        e.sample = (Instant::now(), p.bytes_transferred, rate);
    } else if bytes_then == 0 && p.bytes_transferred > 0 && rate == 0 {
        // The first window: the average since this run started.
        let elapsed_s = e.run_started.elapsed().as_secs_f64().max(1e-3);
        rate = per_second(p.bytes_transferred.saturating_sub(e.bytes_at_run_start), elapsed_s);
    }
    let has_wal = e.params.wal_dir.is_some();
    let mut status = MigrationStatus {
        migration_id: id.as_str().to_owned(),
        role: Role::Source,
        phase: e.life.phase(),
        vshard_id: Some(e.params.vshard_id),
        peer_node: Some(e.params.target_node_id.clone()),
        bytes_transferred: p.bytes_transferred,
        bytes_total: p.bytes_total,
        bytes_resent: e.bytes_resent,
        files_staged: p.files_staged_count,
        files_total: p.files_total_count,
        wal: WalProgress {
            start_lsn: has_wal.then_some(e.params.base_lsn.saturating_add(1)),
            current_lsn: p.wal_durable_lsn,
            source_lsn: p.wal_source_lsn,
            held_bytes: 0,
        },
        rate_limit_bytes_per_sec: e.rate.rate_bytes_per_sec(),
        // Over the last second or so (not the average since the start), so a rate change shows.
        throughput_bytes_per_sec: if e.life.phase() == Phase::BaseCopy { rate } else { 0 },
        pause_duration_us: e.life.pause().map(|p| p.pause_duration_us),
        pause: e.life.pause(),
        fence_started_at_ns: e.life.fence().map(|f| f.stamps.fence_received_at_ns),
        final_lsn: e.life.status_final_lsn().map(|l| l.0),
        reason: e.life.reason().map(str::to_owned),
        staging_state: e.staging_state.clone(),
        started_at_unix_ms: e.started_at_unix_ms,
        updated_at_unix_ms: e.updated_at_unix_ms,
        no_progress_for_s: None,
    };
    status.no_progress_for_s = e.stall.observe(&status, Instant::now(), stall_after);
    status
}

/// `bytes / seconds`, rounded down, saturating.
fn per_second(bytes: u64, seconds: f64) -> u64 {
    let rate = bytes as f64 / seconds;
    if rate.is_finite() && rate >= 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let whole = rate.min(u64::MAX as f64) as u64;
        whole
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::node_burst_bytes;

    #[test]
    fn the_node_burst_is_a_quarter_second_of_the_rate_within_1_and_16_mib() {
        assert_eq!(node_burst_bytes(4 << 20), 1 << 20);
        assert_eq!(node_burst_bytes(16 << 20), 4 << 20);
        assert_eq!(node_burst_bytes(1 << 30), 16 << 20);
        assert_eq!(node_burst_bytes(1), 1 << 20, "at least one large chunk");
    }
}
