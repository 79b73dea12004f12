//! The node daemon's answers on the control socket (DESIGN section 4), for what the daemon
//! does today: it is the target of inbound migrations.
//!
//! What it does: `node.info`; `migration.list` and `migration.status` for inbound migrations
//! (phase, bytes verified and total, files staged, bytes resent, staged WAL durable LSN);
//! `events.subscribe` streaming a `migration.event` on every change of an inbound migration
//! (state changes at once, progress at most every 250 ms).
//!
//! What it does not (yet): the source-side methods (`migration.start`, `abort`, `forget`,
//! `set_rate_limit`) and the fence methods. They answer -32601 with a message saying they are
//! not implemented by this daemon yet, never a fake success. Today a source is driven by
//! `ferry copy`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::control::{ErrorCode, RpcError};
use ferry_wire::frame::PROTOCOL_VERSION;
use ferry_wire::{MigrationId, NodeId};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::control::{CallFuture, Handler, Reply, Subscription};
use crate::transfer::target::{InboundStatus, TargetContext};

/// How often inbound migrations are checked for changes to publish.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(250);
/// Events buffered per subscriber before the slowest one starts losing them.
const EVENT_QUEUE_MAX_COUNT: usize = 1024;

/// The daemon's control-socket handler.
#[derive(Debug, Clone)]
pub struct Daemon {
    node_id: NodeId,
    quic_addr: SocketAddr,
    ctx: Arc<TargetContext>,
    events: broadcast::Sender<Value>,
}

fn status_json(id: &MigrationId, s: &InboundStatus) -> Value {
    json!({
        "migration_id": id.as_str(),
        "role": "target",
        "state": s.state,
        "source_node": s.source_node,
        "phase": if s.state == "receiving" { "BaseCopy" } else if s.wal_durable_lsn.is_some() { "WalCatchUp" } else { "BaseStaged" },
        "bytes_transferred": s.bytes_verified,
        "bytes_total": s.bytes_total,
        "bytes_resent": s.bytes_resent,
        "files_staged": s.files_staged_count,
        "files_total": s.files_total_count,
        "wal": { "current_lsn": s.wal_durable_lsn },
    })
}

impl Daemon {
    pub fn new(node_id: NodeId, quic_addr: SocketAddr, ctx: Arc<TargetContext>) -> Self {
        let (events, _) = broadcast::channel(EVENT_QUEUE_MAX_COUNT);
        Self { node_id, quic_addr, ctx, events }
    }

    /// Publishes a `migration.event` for every inbound migration that changed, until the
    /// runtime stops. State changes go out on the next tick; so does progress, at most every
    /// [`EVENT_INTERVAL`].
    pub fn spawn_events(&self) -> tokio::task::JoinHandle<()> {
        let daemon = self.clone();
        tokio::spawn(async move {
            let mut last: BTreeMap<MigrationId, InboundStatus> = BTreeMap::new();
            let mut tick = tokio::time::interval(EVENT_INTERVAL);
            loop {
                tick.tick().await;
                let now = daemon.ctx.inbound();
                for (id, status) in &now {
                    if last.get(id) != Some(status) {
                        let kind =
                            if last.get(id).is_none_or(|l| l.state != status.state) { "phase" } else { "progress" };
                        let mut event = status_json(id, status);
                        event["event"] = json!(kind);
                        // No subscriber is not an error.
                        let _ = daemon.events.send(event);
                    }
                }
                last = now;
            }
        })
    }

    fn call_sync(&self, method: &str, params: &Value) -> Result<Reply, RpcError> {
        match method {
            "node.info" => Ok(json!({
                "node_id": self.node_id.as_str(),
                "version": env!("CARGO_PKG_VERSION"),
                "protocol_version": PROTOCOL_VERSION,
                "quic_address": self.quic_addr.to_string(),
                "features": { "rdma": false },
                "devices": [],
                "roles": ["target"],
            })
            .into()),
            "migration.list" => {
                let list: Vec<Value> = self.ctx.inbound().iter().map(|(id, s)| status_json(id, s)).collect();
                Ok(json!({ "migrations": list }).into())
            }
            "migration.status" => {
                let id = migration_id(params)?;
                let inbound = self.ctx.inbound();
                let status = inbound
                    .get(&id)
                    .ok_or_else(|| RpcError::new(ErrorCode::NotFound, format!("no migration {id} on this node")))?;
                Ok(status_json(&id, status).into())
            }
            "events.subscribe" => {
                let filter = match params.get("migration_id") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(migration_id(params)?.as_str().to_owned()),
                };
                Ok(Reply::Subscription(Subscription {
                    result: json!({ "subscribed": true, "migration_id": filter }),
                    events: self.events.subscribe(),
                    migration_id: filter,
                }))
            }
            "migration.start"
            | "migration.prepare_cutover"
            | "migration.fence"
            | "migration.release"
            | "migration.applied"
            | "migration.abort"
            | "migration.forget"
            | "migration.set_rate_limit" => Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("{method} is not implemented by this daemon yet: drive the source with `ferry copy`"),
            )),
            other => Err(RpcError::method_not_found(other)),
        }
    }
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
        let result = self.call_sync(&method, &params);
        Box::pin(async move { result })
    }
}
