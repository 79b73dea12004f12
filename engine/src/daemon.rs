//! The node daemon's answers on the control socket (DESIGN section 4).
//!
//! What it does: maps each method to the node's two roles. As a source it runs outbound
//! migrations ([`crate::outbound`]): `migration.start`, `abort`, `forget`, `set_rate_limit`.
//! As a target it reports and can abort or forget inbound migrations ([`TargetContext`]).
//! `node.info`; `migration.list` / `migration.status` over both roles (a node that is source
//! and target of one migration lists it twice, once per role; `status` prefers the source);
//! `events.subscribe` streaming a `migration.event` on every change (phase changes at once,
//! progress at most every 250 ms), and `stalled` / `progressing` once each time a migration's
//! `no_progress_for_s` flag rises or clears ([`crate::outbound::stall`]; the source's flag is
//! kept by its registry, the target's here), and `rdma_fallback` when a migration's transfer
//! asked for RDMA and ships over QUIC (its status with `rdma_fallback_reason`).
//!
//! The cut-over: `migration.prepare_cutover`, `fence` and `release` on the source
//! ([`crate::outbound`]), `migration.applied` on the target (the database's ingest progress,
//! which a fence then waits for).
//!
//! What it does not: pause or resume the database's writers (the coordinator does).
//!
//! Invariants: a call is checked (its params, the node's role in the migration) before it acts,
//! and a call meant for the other role's daemon is refused with the daemon to ask instead; the
//! event stream is bounded (a subscriber that lags loses events, it never slows the daemon).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_wire::api::{FenceParams, MigrationStatus, Phase, Role, StartParams, WalProgress};
use ferry_wire::control::{ErrorCode, RpcError};
use ferry_wire::frame::PROTOCOL_VERSION;
use ferry_wire::{Lsn, MigrationId, NodeId};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::control::{CallFuture, Handler, Reply, Subscription};
use crate::outbound::stall::StallClock;
use crate::outbound::{Outbound, OutboundError};
use crate::transfer::rdma::select::{FallbackNotices, TransportStatus};
use crate::transfer::target::{InboundStatus, TargetContext};
use crate::transfer::TransferError;
use ferry_wire::proto::inbound::{InboundError, InboundState};
use ferry_wire::proto::Blame;

/// How often migrations are checked for changes to publish.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(250);
/// Events buffered per subscriber before the slowest one starts losing them.
const EVENT_QUEUE_MAX_COUNT: usize = 1024;

/// The daemon's control-socket handler.
#[derive(Debug, Clone)]
pub struct Daemon {
    node_id: NodeId,
    quic_addr: SocketAddr,
    ctx: Arc<TargetContext>,
    outbound: Arc<Outbound>,
    events: broadcast::Sender<Value>,
    /// The chunk transport chosen at start, for `node.info` and each subscription's answer.
    transport: Arc<TransportStatus>,
    /// Transfers that asked for RDMA and ship over QUIC, published as `rdma_fallback` events.
    fallbacks: FallbackNotices,
    /// When each inbound migration's progress last moved (its `no_progress_for_s`).
    inbound_stalls: Arc<Mutex<BTreeMap<MigrationId, StallClock>>>,
}

/// An inbound migration as `migration.status` shows it.
pub fn inbound_status(id: &MigrationId, s: &InboundStatus) -> MigrationStatus {
    let m = &s.migration;
    let (phase, staging_state) = match m.state {
        InboundState::Receiving | InboundState::Interrupted => (Phase::BaseCopy, "copying"),
        // An offline copy's staged base waits only for its commit: no WAL catch-up.
        InboundState::BaseStaged if m.wal_follows => (Phase::WalCatchUp, "copying"),
        InboundState::BaseStaged => (Phase::BaseCopy, "copying"),
        InboundState::Fenced { .. } => (Phase::AtomicCutOver, "fenced"),
        InboundState::Released { .. } => (Phase::Completed, "released"),
        InboundState::Aborted { .. } => (Phase::Failed, "aborted"),
    };
    MigrationStatus {
        migration_id: id.as_str().to_owned(),
        role: Role::Target,
        phase,
        vshard_id: m.vshard_id.map(|v| v.0),
        peer_node: m.source_node.clone(),
        bytes_transferred: m.bytes_verified,
        bytes_total: m.bytes_total,
        bytes_resent: m.bytes_resent,
        files_staged: m.files_staged_count,
        files_total: m.files_total_count,
        wal: WalProgress {
            start_lsn: None,
            current_lsn: m.wal_durable_lsn.map(|l| l.0),
            source_lsn: None,
            held_bytes: 0,
        },
        rate_limit_bytes_per_sec: 0,
        throughput_bytes_per_sec: 0,
        pause_duration_us: None,
        pause: None,
        fence_started_at_ns: None,
        final_lsn: m.final_lsn().map(|l| l.0),
        reason: m.reason().map(str::to_owned),
        staging_state: Some(staging_state.to_owned()),
        started_at_unix_ms: m.started_at_unix_ms,
        updated_at_unix_ms: 0,
        no_progress_for_s: None,
    }
}

/// The events a migration's new status makes, given the one published before: `phase` or
/// `progress` when anything but the stall flag's count changed (a stalled migration does not
/// send a `progress` event every second), then `stalled` when the flag rose and `progressing`
/// when it cleared while the migration goes on (a final phase's `phase` event ends a stall).
fn event_kinds(before: Option<&MigrationStatus>, status: &MigrationStatus) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    let without_flag = |s: &MigrationStatus| MigrationStatus { no_progress_for_s: None, ..s.clone() };
    if before.is_none_or(|b| without_flag(b) != without_flag(status)) {
        kinds.push(if before.is_none_or(|b| b.phase != status.phase) { "phase" } else { "progress" });
    }
    let was_stalled = before.is_some_and(|b| b.no_progress_for_s.is_some());
    match (was_stalled, status.no_progress_for_s.is_some()) {
        (false, true) => kinds.push("stalled"),
        (true, false) if !status.phase.is_final() => kinds.push("progressing"),
        _ => {}
    }
    kinds
}

fn to_value(status: &MigrationStatus) -> Value {
    serde_json::to_value(status).unwrap_or(Value::Null)
}

fn outbound_rpc(e: OutboundError) -> RpcError {
    match &e {
        OutboundError::InvalidParams(_) => RpcError::invalid_params(e.to_string()),
        OutboundError::InProgress { vshard_id, holder } => RpcError::new(ErrorCode::MigrationInProgress, e.to_string())
            .with_data(json!({ "vshard_id": vshard_id, "migration_id": holder.as_str() })),
        OutboundError::NotFound(id) => {
            RpcError::new(ErrorCode::NotFound, e.to_string()).with_data(json!({ "migration_id": id.as_str() }))
        }
        OutboundError::Refused(_) => RpcError::refused(e.to_string()),
        OutboundError::Local(_) => RpcError::internal(e.to_string()),
        OutboundError::PauseBudgetExceeded { estimated_us, budget_us } => {
            RpcError::new(ErrorCode::PauseBudgetExceeded, e.to_string())
                .with_data(json!({ "estimated_us": estimated_us, "budget_us": budget_us }))
        }
        OutboundError::CutOverCancelled(reason) => {
            RpcError::new(ErrorCode::CutOverCancelled, e.to_string()).with_data(json!({ "reason": reason }))
        }
        OutboundError::FenceViolated(lsn) => {
            RpcError::new(ErrorCode::FenceViolated, e.to_string()).with_data(json!({ "lsn": lsn }))
        }
    }
}

fn transfer_rpc(e: TransferError) -> RpcError {
    match e {
        TransferError::Refused(message) => RpcError::refused(message),
        TransferError::Inbound(InboundError::NotFound { id }) => not_found(&id),
        TransferError::Inbound(e) if e.blame() != Blame::Local => RpcError::refused(e.to_string()),
        other => RpcError::internal(other.to_string()),
    }
}

fn not_found(id: &MigrationId) -> RpcError {
    RpcError::new(ErrorCode::NotFound, format!("no migration {id} on this node"))
        .with_data(json!({ "migration_id": id.as_str() }))
}

impl Daemon {
    pub fn new(
        node_id: NodeId,
        quic_addr: SocketAddr,
        ctx: Arc<TargetContext>,
        outbound: Arc<Outbound>,
        transport: TransportStatus,
        fallbacks: FallbackNotices,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_QUEUE_MAX_COUNT);
        Self {
            node_id,
            quic_addr,
            ctx,
            outbound,
            events,
            transport: Arc::new(transport),
            fallbacks,
            inbound_stalls: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// How long a migration with work left may make no progress before its status (both
    /// roles) says so, and a `stalled` event goes out; zero: never.
    pub fn set_stall_after(&self, threshold: Duration) {
        self.outbound.set_stall_after(threshold);
    }

    /// An inbound migration's status with its stall flag, read now.
    fn inbound_flagged(&self, id: &MigrationId, s: &InboundStatus) -> MigrationStatus {
        let mut status = inbound_status(id, s);
        let now = Instant::now();
        let mut clocks = self.inbound_stalls.lock().unwrap_or_else(|e| e.into_inner());
        let clock = clocks.entry(id.clone()).or_insert_with(|| StallClock::new(now));
        status.no_progress_for_s = clock.observe(&status, now, self.outbound.stall_after());
        status
    }

    /// Publishes that RDMA was asked for and QUIC is used (a `transport` event), if so. It goes
    /// out before any subscriber can exist: a later one reads the same from `node.info`'s
    /// `transport` or from its subscription's answer.
    pub fn announce_transport(&self) {
        if let Some(reason) = &self.transport.fallback_reason {
            let _ = self.events.send(json!({ "event": "transport", "note": "rdma_fallback", "reason": reason }));
        }
    }

    /// Publishes an `rdma_fallback` event for each transfer that asked for RDMA and ships over
    /// QUIC since the last call: the migration's status, `rdma_fallback_reason` and
    /// `chunk_transport: "quic"`.
    fn announce_fallbacks(&self) {
        for (id, reason) in self.fallbacks.take() {
            // A status, as every `migration.event` is (typed clients read each as one).
            let Some(status) = self.outbound.status(&id) else {
                tracing::debug!(migration = %id, "an rdma fallback of a migration no longer listed");
                continue;
            };
            let mut event = to_value(&status);
            event["event"] = json!("rdma_fallback");
            event["rdma_fallback_reason"] = json!(reason);
            event["chunk_transport"] = json!("quic");
            let _ = self.events.send(event);
        }
    }

    /// Every migration on this node, both roles.
    pub fn statuses(&self) -> Vec<MigrationStatus> {
        let mut all = self.outbound.statuses();
        let inbound = self.ctx.inbound();
        // Forgotten migrations' clocks go with them.
        self.inbound_stalls.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| inbound.contains_key(id));
        all.extend(inbound.iter().map(|(id, s)| self.inbound_flagged(id, s)));
        all
    }

    /// Publishes a `migration.event` for every migration that changed, until the runtime
    /// stops. Phase changes go out on the next tick; so does progress, at most every
    /// [`EVENT_INTERVAL`].
    pub fn spawn_events(&self) -> tokio::task::JoinHandle<()> {
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut last: BTreeMap<(String, bool), MigrationStatus> = BTreeMap::new();
            let mut tick = tokio::time::interval(EVENT_INTERVAL);
            loop {
                tick.tick().await;
                daemon.announce_fallbacks();
                let mut now = BTreeMap::new();
                for status in daemon.statuses() {
                    let key = (status.migration_id.clone(), status.role == Role::Source);
                    for kind in event_kinds(last.get(&key), &status) {
                        let mut event = to_value(&status);
                        event["event"] = json!(kind);
                        // No subscriber is not an error.
                        let _ = daemon.events.send(event);
                    }
                    now.insert(key, status);
                }
                last = now;
            }
        })
    }

    /// Publishes one event now (recovery outcomes at start, aborts).
    pub fn announce(&self, id: &MigrationId, what: &str) {
        let mut event =
            self.outbound.status(id).map(|s| to_value(&s)).unwrap_or_else(|| json!({ "migration_id": id.as_str() }));
        event["event"] = json!("recovery");
        event["note"] = json!(what);
        let _ = self.events.send(event);
    }

    /// Refuses a source-side method for a migration this node only receives.
    fn source_only(&self, id: &MigrationId, method: &str) -> Result<(), RpcError> {
        if self.outbound.status(id).is_none() && self.ctx.has_inbound(id) {
            return Err(RpcError::refused(format!(
                "migration {id} is inbound here: call {method} on the source node's daemon"
            )));
        }
        Ok(())
    }

    fn status(&self, id: &MigrationId) -> Option<MigrationStatus> {
        self.outbound.status(id).or_else(|| self.ctx.inbound().get(id).map(|s| self.inbound_flagged(id, s)))
    }

    async fn call_async(self, method: String, params: Value) -> Result<Reply, RpcError> {
        match method.as_str() {
            "node.info" => Ok(self.node_info().into()),
            "migration.list" => {
                let list: Vec<Value> = self.statuses().iter().map(to_value).collect();
                Ok(json!({ "migrations": list }).into())
            }
            "migration.status" => {
                let id = migration_id(&params)?;
                self.status(&id).map(|s| to_value(&s).into()).ok_or_else(|| not_found(&id))
            }
            "migration.start" => self.start_migration(params).await,
            "migration.abort" => self.abort_migration(&params).await,
            "migration.forget" => self.forget_migration(&params).await,
            "migration.set_rate_limit" => self.set_rate_limit(&params),
            "events.subscribe" => self.subscribe(&params),
            "migration.prepare_cutover" => self.prepare_cutover(&params, &method),
            "migration.fence" => self.fence(params, &method).await,
            "migration.release" => self.release(&params, &method).await,
            "migration.applied" => self.applied(&params),
            other => Err(RpcError::method_not_found(other)),
        }
    }

    fn node_info(&self) -> Value {
        json!({
            "node_id": self.node_id.as_str(),
            "version": env!("CARGO_PKG_VERSION"),
            "protocol_version": PROTOCOL_VERSION,
            "quic_address": self.quic_addr.to_string(),
            "features": { "rdma": self.transport.rdma_compiled },
            "devices": serde_json::to_value(&self.transport.devices).unwrap_or(Value::Null),
            "transport": serde_json::to_value(&*self.transport).unwrap_or(Value::Null),
            "roles": ["source", "target"],
        })
    }

    async fn start_migration(&self, params: Value) -> Result<Reply, RpcError> {
        let params: StartParams = serde_json::from_value(params)
            .map_err(|e| RpcError::invalid_params(format!("migration.start params: {e}")))?;
        let (id, created) = self.outbound.start(params).await.map_err(outbound_rpc)?;
        Ok(json!({ "migration_id": id.as_str(), "created": created }).into())
    }

    /// `migration.abort`: the source's migration if it is one here, else the target's staging.
    async fn abort_migration(&self, params: &Value) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        let reason = match params.get("reason") {
            None | Some(Value::Null) => "by the coordinator".to_owned(),
            Some(Value::String(r)) => r.chars().take(1024).collect(),
            Some(_) => return Err(RpcError::invalid_params("params.reason must be a string")),
        };
        if self.outbound.status(&id).is_some() {
            let note = self.outbound.abort(&id, &reason).await.map_err(outbound_rpc)?;
            return Ok(json!({ "migration_id": id.as_str(), "phase": "Failed", "aborted": true, "role": "source", "note": note }).into());
        }
        if self.ctx.has_inbound(&id) {
            let reason = format!("aborted by the target's coordinator: {reason}");
            crate::transfer::abort::abort_staging(&self.ctx, &id, &reason).await.map_err(transfer_rpc)?;
            return Ok(json!({ "migration_id": id.as_str(), "phase": "Failed", "aborted": true, "role": "target", "note": "staging removed" }).into());
        }
        Err(not_found(&id))
    }

    /// `migration.forget`: both roles' records of the migration, whichever this node holds.
    async fn forget_migration(&self, params: &Value) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        let mut forgot = false;
        if self.outbound.status(&id).is_some() {
            self.outbound.forget(&id).await.map_err(outbound_rpc)?;
            forgot = true;
        }
        if self.ctx.has_inbound(&id) {
            self.ctx.forget(&id).await.map_err(transfer_rpc)?;
            forgot = true;
        }
        if !forgot {
            return Err(not_found(&id));
        }
        Ok(json!({ "migration_id": id.as_str(), "forgotten": true }).into())
    }

    fn set_rate_limit(&self, params: &Value) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        let bytes_per_sec = params.get("bytes_per_sec").and_then(Value::as_u64).ok_or_else(|| {
            RpcError::invalid_params("params.bytes_per_sec must be an unsigned integer (0: unlimited)")
        })?;
        if self.outbound.status(&id).is_none() && self.ctx.has_inbound(&id) {
            return Err(RpcError::refused(format!(
                "migration {id} is inbound here: set its rate on the source node's daemon"
            )));
        }
        let rate = self.outbound.set_rate_limit(&id, bytes_per_sec).map_err(outbound_rpc)?;
        Ok(json!({ "migration_id": id.as_str(), "rate_limit_bytes_per_sec": rate }).into())
    }

    fn subscribe(&self, params: &Value) -> Result<Reply, RpcError> {
        let filter = match params.get("migration_id") {
            None | Some(Value::Null) => None,
            Some(_) => Some(migration_id(params)?.as_str().to_owned()),
        };
        // The node's transport: its start-up `transport` event went out before any subscriber.
        let transport = json!({
            "configured": self.transport.configured,
            "in_use": self.transport.in_use,
            "fallback_reason": self.transport.fallback_reason,
        });
        Ok(Reply::Subscription(Subscription {
            result: json!({ "subscribed": true, "migration_id": filter, "transport": transport }),
            events: self.events.subscribe(),
            migration_id: filter,
        }))
    }

    fn prepare_cutover(&self, params: &Value, method: &str) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        self.source_only(&id, method)?;
        let result = self.outbound.prepare_cutover(&id).map_err(outbound_rpc)?;
        let mut value = serde_json::to_value(result).unwrap_or(Value::Null);
        value["migration_id"] = json!(id.as_str());
        Ok(value.into())
    }

    async fn fence(&self, params: Value, method: &str) -> Result<Reply, RpcError> {
        let id = migration_id(&params)?;
        self.source_only(&id, method)?;
        if !params.get("final_lsn").is_some_and(Value::is_u64) {
            return Err(RpcError::invalid_params(
                "params.final_lsn must be an unsigned integer: the writer's last acknowledged LSN",
            ));
        }
        let fence: FenceParams = serde_json::from_value(without_id(params))
            .map_err(|e| RpcError::invalid_params(format!("migration.fence params: {e}")))?;
        let result = self.outbound.fence(&id, fence).await.map_err(outbound_rpc)?;
        let mut value = serde_json::to_value(result).unwrap_or(Value::Null);
        value["migration_id"] = json!(id.as_str());
        Ok(value.into())
    }

    async fn release(&self, params: &Value, method: &str) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        self.source_only(&id, method)?;
        let resumed = match params.get("writes_resumed_at_ns") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                RpcError::invalid_params(
                    "params.writes_resumed_at_ns must be CLOCK_MONOTONIC nanoseconds (an unsigned integer)",
                )
            })?),
        };
        let result = self.outbound.release(&id, resumed).await.map_err(outbound_rpc)?;
        let mut value = serde_json::to_value(result).unwrap_or(Value::Null);
        value["migration_id"] = json!(id.as_str());
        Ok(value.into())
    }

    /// `migration.applied`: a target-side call; the source's daemon refuses it.
    fn applied(&self, params: &Value) -> Result<Reply, RpcError> {
        let id = migration_id(params)?;
        let applied = params
            .get("applied_lsn")
            .and_then(Value::as_u64)
            .ok_or_else(|| RpcError::invalid_params("params.applied_lsn must be an unsigned integer"))?;
        if !self.ctx.has_inbound(&id) {
            return Err(if self.outbound.status(&id).is_some() {
                RpcError::refused(format!(
                    "migration {id} is outbound here: migration.applied goes to the target node's daemon"
                ))
            } else {
                not_found(&id)
            });
        }
        let now = crate::transfer::fence_target::set_applied(&self.ctx, &id, Lsn(applied)).map_err(transfer_rpc)?;
        Ok(json!({ "migration_id": id.as_str(), "applied_lsn": now }).into())
    }
}

/// The params without `migration_id` (for a typed parse that refuses unknown fields).
fn without_id(mut params: Value) -> Value {
    if let Some(map) = params.as_object_mut() {
        map.remove("migration_id");
    }
    params
}

fn migration_id(params: &Value) -> Result<MigrationId, RpcError> {
    let text = params
        .get("migration_id")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::invalid_params("params.migration_id must be a string"))?;
    MigrationId::new(text).map_err(|e| RpcError::invalid_params(format!("params.migration_id: {e}")))
}

impl Handler for Daemon {
    fn call(&self, method: String, params: Value) -> CallFuture {
        Box::pin(self.clone().call_async(method, params))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(phase: &str, bytes: u64, stalled_s: Option<u64>) -> MigrationStatus {
        serde_json::from_value(json!({
            "migration_id": "m-1", "role": "source", "phase": phase, "vshard_id": 1, "peer_node": "b",
            "bytes_transferred": bytes, "bytes_total": 1000, "bytes_resent": 0, "files_staged": 0,
            "files_total": 1, "wal": {"start_lsn": null, "current_lsn": null, "source_lsn": null},
            "no_progress_for_s": stalled_s,
        }))
        .unwrap()
    }

    #[test]
    fn a_staged_base_is_in_wal_catch_up_only_when_a_wal_stream_follows() {
        let inbound = |wal_follows| InboundStatus {
            migration: ferry_wire::proto::inbound::Inbound {
                state: InboundState::BaseStaged,
                source_node: Some("a".into()),
                vshard_id: None,
                started_at_unix_ms: 7,
                wal_follows,
                bytes_verified: 10,
                bytes_total: 10,
                bytes_resent: 0,
                files_staged_count: 1,
                files_total_count: 1,
                wal_durable_lsn: None,
                applied_lsn: None,
            },
            bytes_received_in_process: 10,
        };
        let id = MigrationId::new("m-1").unwrap();
        assert_eq!(inbound_status(&id, &inbound(true)).phase, Phase::WalCatchUp);
        let offline = inbound_status(&id, &inbound(false));
        assert_eq!(
            (offline.phase, offline.started_at_unix_ms),
            (Phase::BaseCopy, 7),
            "an offline copy has no catch-up"
        );
    }

    #[test]
    fn a_stall_is_announced_once_and_its_end_once() {
        let first = status("BaseCopy", 10, None);
        assert_eq!(event_kinds(None, &first), ["phase"]);
        assert!(event_kinds(Some(&first), &first).is_empty());
        let moved = status("BaseCopy", 20, None);
        assert_eq!(event_kinds(Some(&first), &moved), ["progress"]);
        let stalled = status("BaseCopy", 20, Some(2));
        assert_eq!(event_kinds(Some(&moved), &stalled), ["stalled"]);
        // The count going up is not news.
        assert!(event_kinds(Some(&stalled), &status("BaseCopy", 20, Some(3))).is_empty());
        assert_eq!(event_kinds(Some(&stalled), &status("BaseCopy", 30, None)), ["progress", "progressing"]);
        assert_eq!(event_kinds(Some(&stalled), &status("Failed", 20, None)), ["phase"]);
        // A migration first seen stalled (a daemon restarted, a new subscriber's daemon) says so.
        assert_eq!(event_kinds(None, &stalled), ["phase", "stalled"]);
    }
}
