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
use ferry_wire::control::ProtocolViolation;
use ferry_wire::{MigrationId, VShardId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::{ClientError, ControlClient, Event, EventStream};
use super::ErrorCode;

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
    /// A kind this client version does not know (the contract lets kinds grow).
    Other(String),
}

impl EventKind {
    fn parse(text: &str) -> Self {
        match text {
            "phase" => Self::Phase,
            "progress" => Self::Progress,
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
                Some(Event::Other(note)) => {
                    tracing::debug!("skipping unknown control notification `{}`", note.method);
                }
            }
        }
    }
}

/// Parses a `migration.event`'s params: a [`MigrationStatus`] plus its `event` kind.
pub fn parse_event(mut params: Value) -> Result<MigrationEvent, ClientError> {
    let kind = match params.as_object_mut().and_then(|obj| obj.remove("event")) {
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
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use ferry_wire::api::{Role, WalProgress};
    use ferry_wire::control::RpcError;
    use tokio::sync::{broadcast, oneshot};

    use super::*;
    use crate::control::{CallFuture, ControlConfig, ControlServer, Handler, Reply, Subscription};

    type Script = dyn Fn(&str, &Value) -> Result<Reply, RpcError> + Send + Sync;

    /// A daemon stand-in: answers each call with what the test scripted and records the calls.
    struct Scripted {
        script: Box<Script>,
        calls: Mutex<Vec<(String, Value)>>,
    }

    impl Handler for Scripted {
        fn call(&self, method: String, params: Value) -> CallFuture {
            let answer = (self.script)(&method, &params);
            self.calls.lock().unwrap().push((method, params));
            Box::pin(async move { answer })
        }
    }

    struct Served {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        handler: Arc<Scripted>,
        _stop: oneshot::Sender<()>,
    }

    impl Served {
        async fn client(&self) -> ControlClient {
            ControlClient::connect(&self.socket).await.unwrap()
        }

        fn calls(&self) -> Vec<(String, Value)> {
            self.handler.calls.lock().unwrap().clone()
        }
    }

    fn serve(script: impl Fn(&str, &Value) -> Result<Reply, RpcError> + Send + Sync + 'static) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ctl").join("ferry.sock");
        let handler = Arc::new(Scripted { script: Box::new(script), calls: Mutex::new(Vec::new()) });
        let server = ControlServer::bind(ControlConfig::new(&socket), handler.clone()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Served { _dir: dir, socket, handler, _stop: stop }
    }

    fn status_value(id: &str, phase: &str) -> Value {
        json!({"migration_id": id, "role": "source", "phase": phase, "vshard_id": 7, "peer_node": "node-b",
            "bytes_transferred": 1_048_576, "bytes_total": 4_194_304, "bytes_resent": 0, "files_staged": 1,
            "files_total": 4, "wal": {"start_lsn": 1, "current_lsn": 90, "source_lsn": 100, "held_bytes": 65536},
            "rate_limit_bytes_per_sec": 0, "throughput_bytes_per_sec": 250_000_000, "pause_duration_us": null,
            "reason": null, "staging_state": "copying", "started_at_unix_ms": 1000, "updated_at_unix_ms": 2000})
    }

    fn id(text: &str) -> MigrationId {
        MigrationId::new(text).unwrap()
    }

    fn params() -> StartParams {
        serde_json::from_value(json!({"migration_id": "m-7-0", "vshard_id": 7, "segments_root": "/seg",
            "target_address": "127.0.0.1:7070", "target_node_id": "node-b", "offline": true}))
        .unwrap()
    }

    #[tokio::test]
    async fn typed_methods_send_the_contract_params_and_read_the_results() {
        let served = serve(|method, params| {
            let id = params.get("migration_id").cloned().unwrap_or(Value::Null);
            Ok(Reply::Value(match method {
                "node.info" => json!({"node_id": "node-a", "version": "0.1.0", "protocol_version": 1,
                    "quic_address": "127.0.0.1:7070", "features": {"rdma": false}, "devices": [],
                    "roles": ["source", "target"], "a_field_from_the_future": 1}),
                "migration.start" => json!({"migration_id": id, "created": true}),
                "migration.status" => status_value("m-7-0", "BaseCopy"),
                "migration.list" => json!({"migrations": [status_value("m-7-0", "BaseCopy"),
                    status_value("m-8-0", "Completed")]}),
                "migration.abort" => json!({"migration_id": id, "phase": "Failed", "aborted": true}),
                "migration.forget" => json!({"migration_id": id, "forgotten": true}),
                "migration.set_rate_limit" => json!({"migration_id": id,
                    "rate_limit_bytes_per_sec": params["bytes_per_sec"]}),
                other => return Err(RpcError::method_not_found(other)),
            }))
        });
        let mut client = served.client().await;
        let info = client.node_info().await.unwrap();
        assert_eq!((info.node_id.as_str(), info.protocol_version, info.roles.len()), ("node-a", 1, 2));

        let started = client.start(&params()).await.unwrap();
        assert_eq!(started, Started { migration_id: id("m-7-0"), created: true });

        let status = client.status(&id("m-7-0")).await.unwrap();
        assert_eq!((status.role, status.phase, status.bytes_total), (Role::Source, Phase::BaseCopy, 4_194_304));
        assert_eq!(
            status.wal,
            WalProgress { start_lsn: Some(1), current_lsn: Some(90), source_lsn: Some(100), held_bytes: 65536 }
        );

        let list = client.list().await.unwrap();
        assert_eq!(list.iter().map(|s| s.phase).collect::<Vec<_>>(), [Phase::BaseCopy, Phase::Completed]);

        let aborted = client.abort(&id("m-7-0"), Some("operator said so")).await.unwrap();
        assert_eq!((aborted.phase, aborted.aborted), (Phase::Failed, true));
        assert!(client.abort(&id("m-7-0"), None).await.unwrap().aborted);
        assert!(client.forget(&id("m-7-0")).await.unwrap().forgotten);
        let set = client.set_rate_limit(&id("m-7-0"), 100_000_000).await.unwrap();
        assert_eq!(set.rate_limit_bytes_per_sec, 100_000_000);

        let calls = served.calls();
        let methods: Vec<&str> = calls.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            methods,
            [
                "node.info",
                "migration.start",
                "migration.status",
                "migration.list",
                "migration.abort",
                "migration.abort",
                "migration.forget",
                "migration.set_rate_limit"
            ]
        );
        // The start params arrive as the daemon parses them, not re-shaped.
        let sent: StartParams = serde_json::from_value(calls[1].1.clone()).unwrap();
        assert_eq!(sent, params());
        assert_eq!(calls[4].1, json!({"migration_id": "m-7-0", "reason": "operator said so"}));
        assert_eq!(calls[5].1, json!({"migration_id": "m-7-0"}));
        assert_eq!(calls[7].1, json!({"migration_id": "m-7-0", "bytes_per_sec": 100_000_000}));
    }

    #[tokio::test]
    async fn daemon_errors_keep_their_code_message_and_data() {
        let served = serve(|method, _| match method {
            "migration.start" => Err(RpcError::new(ErrorCode::MigrationInProgress, "vshard 7 is migrating as m-7-0")
                .with_data(json!({"vshard_id": 7}))),
            "migration.status" => Err(RpcError::new(ErrorCode::NotFound, "no migration m-9-0 on this node")),
            "migration.forget" => Err(RpcError::refused("m-7-0 is not final; abort it first")),
            other => Err(RpcError::method_not_found(other)),
        });
        let mut client = served.client().await;
        let err = client.start(&params()).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::MigrationInProgress));
        assert_eq!(err.vshard_in_progress(), Some(VShardId(7)));
        assert_eq!(err.rpc().unwrap().message, "vshard 7 is migrating as m-7-0");

        let err = client.status(&id("m-9-0")).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
        assert_eq!(err.vshard_in_progress(), None);
        let err = client.forget(&id("m-7-0")).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Refused));
        assert!(err.to_string().contains("abort it first"), "{err}");
        // The connection is still usable after errors.
        assert_eq!(client.node_info().await.unwrap_err().code(), Some(ErrorCode::MethodNotFound));
    }

    #[tokio::test]
    async fn malformed_results_are_protocol_errors_not_panics() {
        let served = serve(|method, params| {
            Ok(Reply::Value(match method {
                "node.info" => json!({"node_id": 5}),
                "migration.start" => json!({"migration_id": "a b", "created": true}),
                // Asked for m-7-0, answers about another migration.
                "migration.status" if params["migration_id"] == "m-7-0" => status_value("m-8-0", "BaseCopy"),
                "migration.status" => json!({"migration_id": "m-9-0", "phase": "Teleporting"}),
                "migration.list" => json!({"migrations": "none"}),
                "migration.abort" => json!([1, 2, 3]),
                "migration.forget" => Value::Null,
                "migration.set_rate_limit" => json!({"migration_id": "m-7-0", "rate_limit_bytes_per_sec": -1}),
                _ => json!({}),
            }))
        });
        let mut client = served.client().await;
        let protocol = |r: Result<(), ClientError>| match r {
            Err(ClientError::Protocol(v)) => v.0,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        let m7 = id("m-7-0");
        let m9 = id("m-9-0");
        let texts = [
            protocol(client.node_info().await.map(drop)),
            protocol(client.start(&params()).await.map(drop)),
            protocol(client.status(&m7).await.map(drop)),
            protocol(client.status(&m9).await.map(drop)),
            protocol(client.list().await.map(drop)),
            protocol(client.abort(&m7, None).await.map(drop)),
            protocol(client.forget(&m7).await.map(drop)),
            protocol(client.set_rate_limit(&m7, 1).await.map(drop)),
        ];
        assert!(texts[0].contains("node.info"), "{}", texts[0]);
        assert!(texts[2].contains("m-8-0"), "{}", texts[2]);
        assert!(texts[4].contains("migration.list"), "{}", texts[4]);
    }

    #[tokio::test]
    async fn events_are_typed_and_bad_ones_are_protocol_errors() {
        let (events_tx, _) = broadcast::channel::<Value>(4);
        let sender = events_tx.clone();
        let served = serve(move |method, params| match method {
            "events.subscribe" => Ok(Reply::Subscription(Subscription {
                result: json!({"subscribed": true}),
                events: sender.subscribe(),
                migration_id: params.get("migration_id").and_then(Value::as_str).map(str::to_owned),
            })),
            other => Err(RpcError::method_not_found(other)),
        });
        let mut events = served.client().await.migration_events(Some(&id("m-7-0"))).await.unwrap();
        assert_eq!(served.calls()[0].1, json!({"migration_id": "m-7-0"}));

        let with_kind = |kind: &str, phase: &str| {
            let mut v = status_value("m-7-0", phase);
            v["event"] = json!(kind);
            v
        };
        events_tx.send(with_kind("progress", "BaseCopy")).unwrap();
        // Another migration's event is filtered by the daemon, never seen here.
        events_tx.send(json!({"migration_id": "m-8-0", "event": "phase"})).unwrap();
        events_tx.send(with_kind("phase", "Completed")).unwrap();
        let Some(MigrationEvent::Status { kind, status }) = events.next().await.unwrap() else { panic!() };
        assert_eq!((kind, status.phase), (EventKind::Progress, Phase::BaseCopy));
        let Some(MigrationEvent::Status { kind, status }) = events.next().await.unwrap() else { panic!() };
        assert_eq!((kind, status.phase), (EventKind::Phase, Phase::Completed));

        events_tx.send(status_value("m-7-0", "BaseCopy")).unwrap();
        assert!(matches!(events.next().await, Err(ClientError::Protocol(_))), "no event kind");
        events_tx.send(json!({"migration_id": "m-7-0", "event": "phase", "phase": 3})).unwrap();
        assert!(matches!(events.next().await, Err(ClientError::Protocol(_))), "bad status");
        events_tx.send(with_kind("rewound", "WalCatchUp")).unwrap();
        let Some(MigrationEvent::Status { kind, .. }) = events.next().await.unwrap() else { panic!() };
        assert_eq!(kind, EventKind::Other("rewound".into()));

        // Sent faster than the server task can forward (this test runs on one thread): the
        // subscriber lags and is told how many it lost.
        for _ in 0..10 {
            events_tx.send(with_kind("progress", "BaseCopy")).unwrap();
        }
        let mut dropped_total = 0;
        let mut received = 0;
        while received + dropped_total < 10 {
            match events.next().await.unwrap().unwrap() {
                MigrationEvent::Dropped { dropped_count } => dropped_total += dropped_count,
                MigrationEvent::Status { .. } => received += 1,
            }
        }
        assert!(dropped_total > 0);
    }

    #[test]
    fn parse_event_rejects_non_objects() {
        assert!(matches!(parse_event(json!("progress")), Err(ClientError::Protocol(_))));
        assert!(matches!(parse_event(json!({"event": 1})), Err(ClientError::Protocol(_))));
        let mut v = status_value("m-1-0", "WalCatchUp");
        v["event"] = json!("phase");
        assert!(matches!(parse_event(v), Ok(MigrationEvent::Status { kind: EventKind::Phase, .. })));
    }
}
