//! The control socket: how a coordinator or an operator drives the daemon (DESIGN section 4).
//!
//! What it does: [`server`] serves JSON-RPC 2.0 lines on a Unix socket and hands each request
//! to the daemon's [`Handler`]; [`client`] and [`typed`] re-export the `ferry-client` crate
//! (`engine/client`), the typed client for coordinators, the CLI and the tests, which links
//! without the engine's data plane. The protocol itself (messages, error codes, line limits)
//! is sans-IO, in [`ferry_wire::control`].
//!
//! What it does not: implement the migration methods. The daemon's handler maps method names
//! to migrations; this module is the transport, its security checks and its limits.
//!
//! Invariants: the socket is 0600 inside a 0700 folder owned by the daemon's uid, and only
//! that uid and the configured allow-list are served; no client input panics or blocks the
//! daemon.

pub mod client;
pub mod server;
pub mod typed;

pub use client::{ClientError, ControlClient, Event, EventStream};
pub use ferry_wire::control::{ErrorCode, RpcError};
pub use server::{CallFuture, ControlConfig, ControlError, ControlServer, Handler, Reply, Subscription};
