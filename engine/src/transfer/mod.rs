//! The base copy over QUIC: the source's sender and the target's receiver.
//!
//! What it does: runs the conversation of [`ferry_wire::message`] on a control stream and ships
//! chunk frames on several uni streams, feeding the [`ferry_wire::session`] machines; the
//! target lands files through [`crate::staging`].
//!
//! What it does not: decide protocol rules (ferry-wire does) or talk to coordinators (the
//! daemon does).
//!
//! The modules, by role (imports point one way: no module imports one that imports it back):
//! - source side: `source` (the copy: snapshot, connections, the conversation's driver),
//!   `ship` (its chunk streams and rechecks), `walrun` and `walsend`
//!   (the WAL stream of one attempt), `waltail_hub` (one shared tail per WAL folder),
//!   `fence_source` (the fence inside a running copy), `request` (release, abort, join); each
//!   drives a machine of `ferry_wire::proto::source` or `source_wal` and matches no message;
//! - target side: `inbound` (the [`inbound::TargetContext`]: the one owner of every inbound
//!   migration's state, around `ferry_wire::proto::inbound`), `target` (the conversation and
//!   the chunk streams), `chunklog`, `walrecv`, `fence_target`, `abort`;
//! - both: `framing` (frames on quinn streams), `task`.
//!
//! Invariants: a failed write or fsync fails the transfer, it is never retried; a received
//! chunk reaches its part file only after the machine accepted its header and its body's
//! CRC32C matched; every queue between the tasks here is bounded.

pub mod abort;
pub mod chunklog;
mod chunks_in;
pub mod fence_source;
pub mod fence_target;
pub mod framing;
pub mod inbound;
mod manifests;
mod rate;
pub mod rdma;
pub mod request;
mod ship;
pub mod source;
pub mod steps;
pub mod target;
mod task;
pub mod transport;
#[cfg(test)]
mod transport_tests;
pub mod walrecv;
mod walrun;
pub mod walsend;
pub mod waltail_hub;

use ferry_wire::frame::FrameError;
use ferry_wire::message::{ErrorKind, MessageError};
use ferry_wire::proto::conversation::ConversationError;
use ferry_wire::proto::inbound::InboundError;
use ferry_wire::session::SessionError;
use ferry_wire::NodeId;
use std::net::SocketAddr;

use crate::quic::close_code;
use crate::snapshot::SnapshotError;
use crate::staging::StagingError;

/// Why a transfer failed, split by blame.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer sent bytes that are not frames or messages.
    #[error("malformed data from the peer: {0}")]
    Malformed(String),
    /// The peer sent well-formed messages that break the protocol.
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("incompatible protocol version: this node speaks {ours}, the peer {theirs}; upgrade the older node")]
    IncompatibleVersion { ours: u16, theirs: u16 },
    /// The peer gave up and said why.
    #[error("the peer failed the transfer ({kind:?}): {message}")]
    Peer { kind: ErrorKind, message: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("cannot read source file {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("the chunk at byte {offset_bytes} of file {file_index} arrived with CRC32C {found:#010x}, the source computed {expected:#010x}: damaged in flight (a bad copy or memory at either end)")]
    ChunkChecksum { file_index: u32, offset_bytes: u64, expected: u32, found: u32 },
    #[error("the target refused the transfer: {0}")]
    Refused(String),
    /// The target's inbound machine refused a transition (admission, a claim, a release...).
    #[error("the target refused: {0}")]
    Inbound(#[from] InboundError),
    #[error("connection to the peer failed: {0}")]
    Connection(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// This node refused the target's certificate at the TLS handshake: it does not carry the
    /// name dialled, or comes from another CA. Retrying cannot help.
    #[error("the certificate of {addr} was refused for target node {target_node} ({reason}): check that {target_node} is the target's node id (the name in its certificate) and that both nodes use the same cluster CA")]
    TargetCertificate { addr: SocketAddr, target_node: NodeId, reason: String },
    /// The target refused this node at the TLS handshake: not in its allow-list, a certificate
    /// it does not trust, or another protocol (ALPN). Retrying cannot help. The refusal may
    /// arrive after this side finished its handshake (TLS 1.3 clients finish first), on the
    /// first stream; `addr` is then filled in by the copy ([`Self::at_target`]).
    #[error("the target{} refused this node at the TLS handshake ({reason}): add this node to the target's allowed_peers, or check that both nodes use the same cluster CA and ferry version", at(.addr))]
    RefusedByTarget { addr: Option<SocketAddr>, reason: String },
    /// Nothing answered at the address until the retry deadline passed.
    #[error("no ferry daemon answered at {addr} within {waited_s} s: is a daemon listening there? check the target address and port (and any firewall on UDP)")]
    Unreachable { addr: SocketAddr, waited_s: u64 },
    /// Transient failures went on until the retry deadline passed; `last` is the last one.
    #[error("gave up on {addr} after {waited_s} s of retrying without progress: {last}")]
    RetriesExhausted { addr: SocketAddr, waited_s: u64, last: Box<TransferError> },
    #[error("{0}")]
    Local(String),
}

impl From<FrameError> for TransferError {
    fn from(e: FrameError) -> Self {
        Self::Malformed(e.to_string())
    }
}

impl From<MessageError> for TransferError {
    fn from(e: MessageError) -> Self {
        Self::Malformed(e.to_string())
    }
}

impl From<SessionError> for TransferError {
    fn from(e: SessionError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl From<ConversationError> for TransferError {
    fn from(e: ConversationError) -> Self {
        match e {
            ConversationError::IncompatibleVersion { ours, theirs } => Self::IncompatibleVersion { ours, theirs },
            ConversationError::PeerFailed { kind, message } => Self::Peer { kind, message },
            ConversationError::Misuse { .. } => Self::Local(e.to_string()),
            ConversationError::Ended { .. } => Self::Connection(e.to_string()),
            ConversationError::Unexpected { .. }
            | ConversationError::Session(_)
            | ConversationError::Offer(_)
            | ConversationError::Rule(_) => Self::Protocol(e.to_string()),
        }
    }
}

impl From<quinn::ConnectionError> for TransferError {
    /// A peer that closes with an application code says why in the reason: keep it, so the
    /// user reads the peer's error and not just "connection lost".
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            // The peer closed the connection with a TLS alert: it refused this node's
            // certificate (or protocol) at the handshake.
            quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                let reason = if reason.is_empty() { close.error_code.to_string() } else { reason };
                Self::RefusedByTarget { addr: None, reason }
            }
            quinn::ConnectionError::VersionMismatch => {
                Self::RefusedByTarget { addr: None, reason: "no QUIC version in common".into() }
            }
            quinn::ConnectionError::ApplicationClosed(close) => {
                let code = u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX);
                let message = String::from_utf8_lossy(&close.reason).into_owned();
                match kind_of_close_code(code) {
                    Some(kind) => Self::Peer { kind, message },
                    None => Self::Connection(format!("the peer closed the connection (code {code}): {message}")),
                }
            }
            other => Self::Connection(other.to_string()),
        }
    }
}

impl From<quinn::ReadError> for TransferError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(e) => e.into(),
            other => Self::Connection(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for TransferError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => e.into(),
            other => Self::Connection(other.to_string()),
        }
    }
}

/// The error kind a close code stands for (`None` for a normal close or an unknown code).
fn kind_of_close_code(code: u32) -> Option<ErrorKind> {
    Some(match code {
        close_code::PROTOCOL => ErrorKind::Protocol,
        close_code::MALFORMED => ErrorKind::Malformed,
        close_code::INCOMPATIBLE_VERSION => ErrorKind::IncompatibleVersion,
        close_code::STORAGE => ErrorKind::Storage,
        close_code::REFUSED => ErrorKind::Refused,
        close_code::CHECKSUM => ErrorKind::Checksum,
        close_code::SOURCE_CHANGED => ErrorKind::SourceChanged,
        close_code::CANCELLED | close_code::TIMEOUT => ErrorKind::Cancelled,
        _ => return None,
    })
}

/// " at ADDR", or nothing when the address is not known.
fn at(addr: &Option<SocketAddr>) -> String {
    addr.map(|addr| format!(" at {addr}")).unwrap_or_default()
}

/// Whether a QUIC close code is a TLS alert (the crypto range of RFC 9000 section 20.1): the
/// handshake failed on a certificate, a name or the protocol, which no retry changes.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

impl TransferError {
    /// The error of a handshake with the target at `addr`, dialled as `target_node`: a TLS
    /// alert is permanent and says whose certificate was refused; anything else (no answer, a
    /// lost packet) is a [`Self::Connection`] a retry may get past.
    pub fn from_handshake(e: quinn::ConnectionError, addr: SocketAddr, target_node: &NodeId) -> Self {
        match e {
            // This node's TLS stack refused the target's certificate (or its protocol).
            quinn::ConnectionError::TransportError(t) if is_tls_alert(t.code) => {
                Self::TargetCertificate { addr, target_node: target_node.clone(), reason: t.reason }
            }
            other => Self::from(other).at_target(addr),
        }
    }

    /// Names the target's address in an error that was made without it.
    pub fn at_target(self, target: SocketAddr) -> Self {
        match self {
            Self::RefusedByTarget { addr: None, reason } => Self::RefusedByTarget { addr: Some(target), reason },
            other => other,
        }
    }

    /// Whether a new connection may get past this error (the source then reconnects and
    /// resumes, under the [`ferry_wire::retry`] deadline): a lost or cut connection, a timeout,
    /// a target that was shutting down, an admission the target's machine says may pass
    /// later. Everything else is permanent and fails the copy at once: a refused certificate
    /// or allow-list, another protocol version, a refused offer, a malformed or misbehaving
    /// peer, a local failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connection(_) | Self::Timeout(_) | Self::Peer { kind: ErrorKind::Cancelled, .. } => true,
            Self::Inbound(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The label of the errors metric: from the error's kind, never from its text.
    pub fn metric_kind(&self) -> &'static str {
        match self {
            Self::Connection(_) | Self::Timeout(_) => "connection",
            Self::Peer { kind: ErrorKind::Cancelled, .. } => "connection",
            Self::Unreachable { .. } | Self::RetriesExhausted { .. } => "connection",
            Self::TargetCertificate { .. } | Self::RefusedByTarget { .. } => "refused",
            _ => match self.kind_and_code().0 {
                ErrorKind::Refused => "refused",
                ErrorKind::Checksum => "checksum",
                ErrorKind::SourceChanged => "source_changed",
                ErrorKind::Storage => "storage",
                ErrorKind::Cancelled => "connection",
                ErrorKind::IncompatibleVersion | ErrorKind::Malformed | ErrorKind::Protocol => "protocol",
            },
        }
    }

    /// The error kind and close code to tell the peer.
    pub fn kind_and_code(&self) -> (ErrorKind, u32) {
        match self {
            Self::Malformed(_) => (ErrorKind::Malformed, close_code::MALFORMED),
            Self::Protocol(_) | Self::Peer { .. } => (ErrorKind::Protocol, close_code::PROTOCOL),
            // A lost connection (of this transfer's data connections, say) is nobody's protocol
            // error: the peer may reconnect and resume.
            Self::Connection(_) => (ErrorKind::Cancelled, close_code::CANCELLED),
            // A failure of this node's own: never reported to the peer as its protocol error.
            Self::Local(_) => (ErrorKind::Storage, close_code::STORAGE),
            Self::IncompatibleVersion { .. } => (ErrorKind::IncompatibleVersion, close_code::INCOMPATIBLE_VERSION),
            Self::Snapshot(SnapshotError::Changed { .. }) => (ErrorKind::SourceChanged, close_code::SOURCE_CHANGED),
            Self::Snapshot(_)
            | Self::Staging(StagingError::Io { .. } | StagingError::Manifest { .. })
            | Self::Read { .. } => (ErrorKind::Storage, close_code::STORAGE),
            Self::Staging(_) | Self::ChunkChecksum { .. } => (ErrorKind::Checksum, close_code::CHECKSUM),
            Self::Refused(_) | Self::Inbound(_) => (ErrorKind::Refused, close_code::REFUSED),
            Self::Timeout(_) | Self::Unreachable { .. } | Self::RetriesExhausted { .. } => {
                (ErrorKind::Cancelled, close_code::TIMEOUT)
            }
            Self::TargetCertificate { .. } | Self::RefusedByTarget { .. } => (ErrorKind::Refused, close_code::REFUSED),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn blame_decides_what_the_peer_is_told() {
        // A lost connection (a data connection of the transfer, say) lets the peer resume.
        assert_eq!(
            TransferError::Connection("closed".into()).kind_and_code(),
            (ErrorKind::Cancelled, close_code::CANCELLED)
        );
        // A local failure is never the peer's protocol error.
        assert_eq!(TransferError::Local("fdatasync failed".into()).kind_and_code().0, ErrorKind::Storage);
        let refused = TransferError::Inbound(InboundError::AtCapacity { active_count: 1, limit: 1 });
        assert_eq!(refused.kind_and_code(), (ErrorKind::Refused, close_code::REFUSED));
        assert_eq!(refused.metric_kind(), "refused");
        assert_eq!(TransferError::Protocol("x".into()).kind_and_code().0, ErrorKind::Protocol);
        assert_eq!(TransferError::Timeout("hello").metric_kind(), "connection");
    }

    #[test]
    fn permanent_or_transient_is_the_errors_own_property() {
        let addr: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let node = NodeId::new("node-b").unwrap();
        for transient in [
            TransferError::Connection("lost".into()),
            TransferError::Timeout("the target's handshake"),
            TransferError::Peer { kind: ErrorKind::Cancelled, message: "shutting down".into() },
            TransferError::Inbound(InboundError::AtCapacity { active_count: 4, limit: 4 }),
        ] {
            assert!(transient.is_transient(), "{transient}");
        }
        for permanent in [
            TransferError::TargetCertificate { addr, target_node: node, reason: "name".into() },
            TransferError::RefusedByTarget { addr: None, reason: "allow-list".into() }.at_target(addr),
            TransferError::IncompatibleVersion { ours: 2, theirs: 1 },
            TransferError::Peer { kind: ErrorKind::Refused, message: "no space".into() },
            TransferError::Malformed("bad frame".into()),
            TransferError::Protocol("unexpected".into()),
            TransferError::Unreachable { addr, waited_s: 30 },
        ] {
            assert!(!permanent.is_transient(), "{permanent}");
        }
        let refused = TransferError::RefusedByTarget { addr: None, reason: "x".into() };
        assert!(refused.to_string().starts_with("the target refused"), "{refused}");
        assert!(refused.at_target(addr).to_string().starts_with("the target at 127.0.0.1:7070 refused"));
    }
}
