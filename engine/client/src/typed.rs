//! Typed methods for the control socket's migration methods (DESIGN sections 4 and 5).
//!
//! What it does: wraps [`ControlClient::call`] for `node.info`, `migration.start`,
//! `migration.status`, `migration.list`, `migration.abort`, `migration.forget` and
//! `migration.set_rate_limit`, and turns an event subscription into a stream of
//! [`MigrationEvent`]s carrying a parsed [`MigrationStatus`]. Parameters and results are the
//! types of [`ferry_wire::api`], so a coordinator never touches JSON.
//!
//! The cut-over methods too: `migration.prepare_cutover`, `fence`, `release` (on the source's
//! daemon) and `applied` (on the target's).
//!
//! What it does not: decide anything (retries, waiting for a phase, rendering: that is the
//! caller's, e.g. the CLI or the reference coordinator).
//!
//! Invariants: a result that does not parse, or that names another migration than the one
//! asked about, is a [`ClientError::Protocol`], never a panic; an error the daemon answered is
//! a [`ClientError::Rpc`] carrying the daemon's code, message and data unchanged, so callers can
//! match [`ErrorCode::MigrationInProgress`] and the like with [`ClientError::code`]. Result
//! types ignore fields they do not know: the contract lets fields grow.

use ferry_wire::api::{FenceParams, FenceResult, MigrationStatus, Phase, PrepareResult, ReleaseResult, StartParams};
use ferry_wire::control::{ErrorCode, ProtocolViolation};
use ferry_wire::{MigrationId, VShardId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{ClientError, ControlClient, Event, EventStream};

/// `node.info`: who the daemon is and what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    /// The daemon's ferry version.
    pub version: String,
    /// The QUIC data-plane protocol version it speaks.
    pub protocol_version: u32,
    /// Where peers reach it, `ip:port`.
    pub quic_address: String,
    #[serde(default)]
    pub features: NodeFeatures,
    /// Usable devices (their shape is the daemon's; shown as given).
    #[serde(default)]
    pub devices: Vec<Value>,
    /// `source`, `target`: what this daemon can act as.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The chunk transport: `configured` and `in_use` (`quic`, `rdma`), `fallback_reason` when
    /// RDMA was asked for and QUIC is used, `rdma_device` (its shape is the daemon's).
    #[serde(default)]
    pub transport: Option<Value>,
}

/// Features compiled into the daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFeatures {
    #[serde(default)]
    pub rdma: bool,
}

/// `migration.start`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub migration_id: MigrationId,
    /// `false`: an identical start already existed; this call changed nothing.
    pub created: bool,
}

/// `migration.abort`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aborted {
    pub migration_id: MigrationId,
    /// `Failed` once aborted.
    pub phase: Phase,
    pub aborted: bool,
}

/// `migration.forget`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub migration_id: MigrationId,
    pub forgotten: bool,
}

/// `migration.set_rate_limit`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSet {
    pub migration_id: MigrationId,
    /// The limit now in force (0: unlimited).
    pub rate_limit_bytes_per_sec: u64,
}

#[derive(Deserialize)]
struct ListResult {
    migrations: Vec<MigrationStatus>,
}

/// Why a `migration.event` was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum EventKind {
    /// The migration crossed a phase (or staging state) boundary.
    Phase,
    /// Its progress moved.
    Progress,
    /// It has work left and made no progress for the daemon's stall threshold: the status's
    /// `no_progress_for_s` is set. Sent once per stall.
    Stalled,
    /// A stalled migration moved again (`no_progress_for_s` is null). Sent once per stall.
    Progressing,
    /// A transfer of the migration asked for RDMA and ships its chunks over QUIC, and why
    /// (the event's `rdma_fallback_reason`). Sent once per transfer attempt that fell back.
    RdmaFallback { reason: String },
    /// A kind this client version does not know (the contract lets kinds grow).
    Other(String),
}

impl EventKind {
    fn parse(text: &str) -> Self {
        match text {
            "phase" => Self::Phase,
            "progress" => Self::Progress,
            "stalled" => Self::Stalled,
            "progressing" => Self::Progressing,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One item of a typed event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationEvent {
    /// A `migration.event`: the migration's whole status after the change (boxed: it is large
    /// next to the other variant).
    Status { kind: EventKind, status: Box<MigrationStatus> },
    /// The daemon dropped this many events because this client read too slowly; ask for the
    /// status again to catch up.
    Dropped { dropped_count: u64 },
}

/// The `migration.event`s of one subscription, parsed.
#[derive(Debug)]
pub struct MigrationEvents {
    events: EventStream,
}

impl From<EventStream> for MigrationEvents {
    fn from(events: EventStream) -> Self {
        Self { events }
    }
}

impl MigrationEvents {
    /// The next event; `Ok(None)` once the daemon closed the connection. Notifications this
    /// client does not know are skipped.
    pub async fn next(&mut self) -> Result<Option<MigrationEvent>, ClientError> {
        loop {
            match self.events.next().await? {
                None => return Ok(None),
                Some(Event::Migration(params)) => return parse_event(params).map(Some),
                Some(Event::Dropped { dropped_count }) => return Ok(Some(MigrationEvent::Dropped { dropped_count })),
                // A newer daemon's notification: skipped, as the contract lets methods grow.
                Some(Event::Other(_)) => {}
            }
        }
    }
}

/// Parses a `migration.event`'s params: a [`MigrationStatus`] plus its `event` kind.
pub fn parse_event(mut params: Value) -> Result<MigrationEvent, ClientError> {
    let kind = match params.as_object_mut().and_then(|obj| obj.remove("event")) {
        Some(Value::String(kind)) if kind == "rdma_fallback" => {
            match params.as_object_mut().and_then(|obj| obj.remove("rdma_fallback_reason")) {
                Some(Value::String(reason)) => EventKind::RdmaFallback { reason },
                _ => return Err(violation("an rdma_fallback event without its `rdma_fallback_reason`")),
            }
        }
        Some(Value::String(kind)) => EventKind::parse(&kind),
        Some(_) => return Err(violation("a migration.event's `event` is not a string")),
        None => return Err(violation("a migration.event has no `event` kind")),
    };
    let status = decode("migration.event", params)?;
    Ok(MigrationEvent::Status { kind, status: Box::new(status) })
}

impl ClientError {
    /// The daemon's named error code, if it answered one of ferry's codes.
    pub fn code(&self) -> Option<ErrorCode> {
        self.rpc().and_then(|e| e.kind())
    }

    /// For a `MigrationInProgress` answer: the vShard another migration holds.
    pub fn vshard_in_progress(&self) -> Option<VShardId> {
        let rpc = self.rpc().filter(|e| e.kind() == Some(ErrorCode::MigrationInProgress))?;
        let vshard = rpc.data.as_ref()?.get("vshard_id")?.as_u64()?;
        u32::try_from(vshard).ok().map(VShardId)
    }
}

fn violation(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(ProtocolViolation(what.into()))
}

/// Reads a method's result as `T`; a result that does not fit is the daemon's fault.
fn decode<T: DeserializeOwned>(method: &str, value: Value) -> Result<T, ClientError> {
    serde_json::from_value(value)
        .map_err(|e| violation(format!("`{method}` answered a result this client cannot read: {e}")))
}

/// Refuses an answer about another migration than the one asked about.
fn same_id(method: &str, asked: &MigrationId, got: &str) -> Result<(), ClientError> {
    if got == asked.as_str() {
        Ok(())
    } else {
        Err(violation(format!("`{method}` for migration {asked} answered about migration {got:?}")))
    }
}

impl ControlClient {
    /// `node.info`.
    pub async fn node_info(&mut self) -> Result<NodeInfo, ClientError> {
        let value = self.call("node.info", json!({})).await?;
        decode("node.info", value)
    }

    /// `migration.start`. Errors: `InvalidParams`, `MigrationInProgress` (see
    /// [`ClientError::vshard_in_progress`]), `Refused` (at capacity, or the same id with other
    /// parameters).
    pub async fn start(&mut self, params: &StartParams) -> Result<Started, ClientError> {
        // Plain data with string keys always serializes; an error here would be this client's bug.
        let params = serde_json::to_value(params)
            .map_err(|e| ClientError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let value = self.call("migration.start", params).await?;
        decode("migration.start", value)
    }

    /// `migration.status`. Errors: `NotFound`.
    pub async fn status(&mut self, migration_id: &MigrationId) -> Result<MigrationStatus, ClientError> {
        let value = self.call("migration.status", json!({ "migration_id": migration_id.as_str() })).await?;
        let status: MigrationStatus = decode("migration.status", value)?;
        same_id("migration.status", migration_id, &status.migration_id)?;
        Ok(status)
    }

    /// `migration.list`: every migration the node holds, in both roles (a loopback migration
    /// appears twice, once per role).
    pub async fn list(&mut self) -> Result<Vec<MigrationStatus>, ClientError> {
        let value = self.call("migration.list", json!({})).await?;
        Ok(decode::<ListResult>("migration.list", value)?.migrations)
    }

    /// `migration.abort`. Errors: `NotFound`, `Refused` (already completed and released).
    pub async fn abort(&mut self, migration_id: &MigrationId, reason: Option<&str>) -> Result<Aborted, ClientError> {
        let mut params = json!({ "migration_id": migration_id.as_str() });
        if let Some(reason) = reason {
            params["reason"] = json!(reason);
        }
        let value = self.call("migration.abort", params).await?;
        let aborted: Aborted = decode("migration.abort", value)?;
        same_id("migration.abort", migration_id, aborted.migration_id.as_str())?;
        Ok(aborted)
    }

    /// `migration.forget`. Errors: `NotFound`, `Refused` (not final: abort it first).
    pub async fn forget(&mut self, migration_id: &MigrationId) -> Result<Forgotten, ClientError> {
        let value = self.call("migration.forget", json!({ "migration_id": migration_id.as_str() })).await?;
        let forgotten: Forgotten = decode("migration.forget", value)?;
        same_id("migration.forget", migration_id, forgotten.migration_id.as_str())?;
        Ok(forgotten)
    }

    /// `migration.set_rate_limit` (0: unlimited). Errors: `NotFound`, `Refused` (not a running
    /// source migration).
    pub async fn set_rate_limit(
        &mut self,
        migration_id: &MigrationId,
        bytes_per_sec: u64,
    ) -> Result<RateLimitSet, ClientError> {
        let params = json!({ "migration_id": migration_id.as_str(), "bytes_per_sec": bytes_per_sec });
        let value = self.call("migration.set_rate_limit", params).await?;
        let set: RateLimitSet = decode("migration.set_rate_limit", value)?;
        same_id("migration.set_rate_limit", migration_id, set.migration_id.as_str())?;
        Ok(set)
    }

    /// `migration.prepare_cutover`. Errors: `PauseBudgetExceeded` (writes must not be paused),
    /// `Refused` (not in WalCatchUp, or no WAL stream), `NotFound`.
    pub async fn prepare_cutover(&mut self, migration_id: &MigrationId) -> Result<PrepareResult, ClientError> {
        let value = self.call("migration.prepare_cutover", json!({ "migration_id": migration_id.as_str() })).await?;
        decode("migration.prepare_cutover", value)
    }

    /// `migration.fence` with `final_lsn` (the writer's last acknowledged LSN) and the
    /// CLOCK_MONOTONIC ns writes were paused at. Errors: `CutOverCancelled` (resume writes on the
    /// source; retry later), `FenceViolated` (the writer did not pause), `Refused`, `NotFound`.
    pub async fn fence(
        &mut self,
        migration_id: &MigrationId,
        final_lsn: u64,
        writes_paused_at_ns: Option<u64>,
    ) -> Result<FenceResult, ClientError> {
        let mut params = serde_json::to_value(FenceParams { final_lsn, writes_paused_at_ns }).unwrap_or(Value::Null);
        params["migration_id"] = json!(migration_id.as_str());
        let value = self.call("migration.fence", params).await?;
        decode("migration.fence", value)
    }

    /// `migration.release` with the CLOCK_MONOTONIC ns writes resumed at: the point of no
    /// return. Returns the pause and its parts. Errors: `Refused` (not fenced), `Internal` (the
    /// release is recorded but the target could not be told: call it again).
    pub async fn release(
        &mut self,
        migration_id: &MigrationId,
        writes_resumed_at_ns: Option<u64>,
    ) -> Result<ReleaseResult, ClientError> {
        let mut params = json!({ "migration_id": migration_id.as_str() });
        if let Some(at) = writes_resumed_at_ns {
            params["writes_resumed_at_ns"] = json!(at);
        }
        let value = self.call("migration.release", params).await?;
        decode("migration.release", value)
    }

    /// `migration.applied` (on the target's daemon): the target database's ingest progress;
    /// returns the applied LSN in force (it only grows).
    pub async fn applied(&mut self, migration_id: &MigrationId, applied_lsn: u64) -> Result<u64, ClientError> {
        let params = json!({ "migration_id": migration_id.as_str(), "applied_lsn": applied_lsn });
        let value = self.call("migration.applied", params).await?;
        value
            .get("applied_lsn")
            .and_then(Value::as_u64)
            .ok_or_else(|| violation("`migration.applied` answered without applied_lsn"))
    }

    /// Subscribes to the `migration.event`s of one migration (or of all) and turns this
    /// connection into their typed stream. Open another connection for calls.
    pub async fn migration_events(self, migration_id: Option<&MigrationId>) -> Result<MigrationEvents, ClientError> {
        Ok(self.subscribe(migration_id.map(MigrationId::as_str)).await?.into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn stall_events_parse_with_their_flag() {
        let mut params = json!({
            "migration_id": "m-1", "role": "target", "phase": "BaseCopy", "vshard_id": 1,
            "peer_node": "a", "bytes_transferred": 5, "bytes_total": 9, "bytes_resent": 0,
            "files_staged": 0, "files_total": 1, "wal": {"start_lsn": null, "current_lsn": null,
            "source_lsn": null}, "no_progress_for_s": 12, "event": "stalled",
        });
        let MigrationEvent::Status { kind, status } = parse_event(params.clone()).unwrap() else { panic!() };
        assert_eq!((kind, status.no_progress_for_s), (EventKind::Stalled, Some(12)));
        params["event"] = json!("progressing");
        params["no_progress_for_s"] = Value::Null;
        let MigrationEvent::Status { kind, status } = parse_event(params).unwrap() else { panic!() };
        assert_eq!((kind, status.no_progress_for_s), (EventKind::Progressing, None));
    }
}
