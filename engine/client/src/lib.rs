//! ferry-client: the typed client for a ferry daemon's control socket, for coordinators.
//!
//! What it does: connects to the daemon's Unix control socket and speaks its JSON-RPC 2.0
//! lines ([`ControlClient`]), with typed calls for the node and migration methods
//! ([`typed`]: `node.info`, `migration.start`, `status`, `list`, `abort`, `forget`,
//! `set_rate_limit` and the cut-over calls) and typed event streams ([`MigrationEvents`]).
//! The `ferry` CLI, the end-to-end tests and a database's control plane use this same client.
//!
//! What it does not: move data, run a runtime, reconnect or retry. It depends on ferry-wire
//! (the sans-IO protocol types), tokio's `net` and `io-util`, serde, serde_json and thiserror:
//! never quinn, rustls, ring or io-uring (`tests/light.rs` checks it), so linking it costs a
//! coordinator nothing of the data plane. The caller brings the tokio runtime.
//!
//! The README's coordinator, compiled here (the caller's runtime, `serde_json` for the params):
//!
//! ```no_run
//! # use ferry_client::{ControlClient, StartParams};
//! # async fn coordinator() -> Result<(), Box<dyn std::error::Error>> {
//! let socket = "/var/lib/ferry/control/ferry.sock";
//! let mut calls = ControlClient::connect(socket).await?;
//! let params: StartParams = serde_json::from_value(serde_json::json!({"vshard_id": 7,
//!     "segments_root": "/db/export/vshard-7", "target_address": "10.0.0.2:7070",
//!     "target_node_id": "node-b", "offline": true}))?;
//! let id = calls.start(&params).await?.migration_id;
//! let mut events = ControlClient::connect(socket).await?.migration_events(Some(&id)).await?;
//! while let Some(event) = events.next().await? {
//!     println!("{event:?}"); // Status { kind, status: MigrationStatus } or Dropped { dropped_count }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Invariants: see [`client`] (bounded lines, errors split by blame) and [`typed`] (results
//! that do not parse are protocol errors, never panics).

pub mod client;
pub mod typed;

pub use client::{ClientError, ControlClient, Event, EventStream, LINE_LEN_MAX_BYTES};
pub use ferry_wire::api::{MigrationStatus, Phase, Role, StartParams};
pub use ferry_wire::control::{ErrorCode, RpcError};
pub use ferry_wire::{MigrationId, VShardId};
pub use typed::{EventKind, MigrationEvent, MigrationEvents, NodeInfo};
