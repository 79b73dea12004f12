//! The control socket client, re-exported from the `ferry-client` crate.
//!
//! What it does: keeps `ferry_engine::control::client::...` paths working for the CLI and the
//! tests. The client itself (connect, calls, event streams, its errors) lives in
//! `engine/client` so a coordinator can link it without the engine's data plane.
//!
//! What it does not: add anything; the engine's side of the socket is [`super::server`].

pub use ferry_client::client::*;
