//! The source's one-shot requests: release and abort, each on a connection of its own, and
//! the join of an extra chunk connection.
//!
//! What it does: [`request_release`] and [`request_abort`] connect to the target and run a
//! [`SourceConversation`] (`Hello`, the request, its answer) to its end; [`converse`] is the
//! driver they and the copy's joins share: it writes what the machine says and feeds it the
//! target's answers.
//!
//! What it does not: decide what a message means (the machine does), decide when to release
//! or abort (the daemon does), or remove the target's staging (`abort` on the target does).
//!
//! Invariants: every request is bounded in time ([`REQUEST_TIMEOUT`], or the caller's hello
//! timeout for a join); a connection that ends before the answer is a lost connection (the
//! caller may retry), an `Error` answer is the target's refusal.

use std::time::Duration;

use ferry_wire::proto::source::{SourceAction, SourceConversation, SourceState};
use ferry_wire::{Lsn, MigrationId, NodeId};
use quinn::{RecvStream, SendStream, VarInt};

use super::framing::{read_control, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::TransferError;
use crate::clock::monotonic_ns;
use crate::quic::{close_code, QuicTuning};
use crate::tls::NodeIdentity;

/// How long the source waits for the target to connect and answer a release or an abort.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the target daemon at `target_addr` to abort `id` and remove its staging.
pub async fn request_abort(
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    target_addr: std::net::SocketAddr,
    target_node: &NodeId,
    id: &MigrationId,
    reason: &str,
) -> Result<(), TransferError> {
    let machine = SourceConversation::abort(identity.node_id(), id.clone(), reason.to_owned());
    one_request(identity, tuning, target_addr, target_node, machine).await
}

/// Asks the target daemon at `target_addr` to mark the staging of `id`, fenced at
/// `final_lsn`, `released` (the source recorded the release first). `fenced_durable_lsn`: the
/// durable LSN of the target's `Fenced` answer, when the source took it (a target that lost
/// its `fenced` MANIFEST commit derives the fence with it).
pub async fn request_release(
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    target_addr: std::net::SocketAddr,
    target_node: &NodeId,
    id: &MigrationId,
    final_lsn: Lsn,
    fenced_durable_lsn: Option<Lsn>,
) -> Result<(), TransferError> {
    let machine = SourceConversation::release(identity.node_id(), id.clone(), final_lsn, fenced_durable_lsn);
    one_request(identity, tuning, target_addr, target_node, machine).await
}

/// One request on a connection of its own.
async fn one_request(
    identity: &NodeIdentity,
    tuning: &QuicTuning,
    target_addr: std::net::SocketAddr,
    target_node: &NodeId,
    mut machine: SourceConversation,
) -> Result<(), TransferError> {
    let endpoint = crate::quic::client_endpoint(target_addr, tuning)
        .map_err(|e| TransferError::Connection(format!("cannot open a UDP socket: {e}")))?;
    let crypto = crate::tls::client_crypto(identity).map_err(|e| TransferError::Local(e.to_string()))?;
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let conn = endpoint
            .connect_with(crate::quic::client_config(crypto, tuning), target_addr, target_node.as_str())
            .map_err(|e| TransferError::Connection(e.to_string()))?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let answered = converse(&mut machine, &mut send, &mut recv, None).await;
        let _ = send.finish();
        conn.close(VarInt::from_u32(close_code::DONE), b"done");
        answered
    })
    .await
    .unwrap_or(Err(TransferError::Timeout("the target's answer")));
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// Runs a join, release or abort conversation on `send`/`recv` until the target answers.
/// `hello_timeout` bounds the wait for the target's hello.
pub(super) async fn converse(
    machine: &mut SourceConversation,
    send: &mut SendStream,
    recv: &mut RecvStream,
    hello_timeout: Option<Duration>,
) -> Result<(), TransferError> {
    loop {
        while let Some(action) = machine.poll_action() {
            match action {
                SourceAction::Send(message) => write_control(send, &message).await?,
                SourceAction::Answered => return Ok(()),
                other => return Err(TransferError::Local(format!("a request cannot execute {other:?}"))),
            }
        }
        let read = read_control(recv, SMALL_CONTROL_BODY_MAX_BYTES);
        let message = match hello_timeout {
            Some(limit) if machine.state() == SourceState::AwaitHello => {
                tokio::time::timeout(limit, read).await.map_err(|_| TransferError::Timeout("the target's hello"))??
            }
            _ => read.await?,
        };
        machine.handle_message(message, monotonic_ns())?;
    }
}
