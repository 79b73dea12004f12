//! What the source's and the target's transfer conversations share: the hello check, the
//! message names used in errors, and the error a conversation refuses with.
//!
//! What it does: [`check_hello`] accepts a peer's first message when it is a hello of this
//! protocol version; [`ConversationError`] says who broke the conversation ([`Blame`]) and
//! whether a new connection may get past it.
//!
//! What it does not: hold any state. The conversations themselves are
//! [`super::source`] and [`super::target`].
//!
//! Invariants: every error a peer's message causes is [`Blame::Peer`]; an event the engine
//! reports in a state that cannot take it is [`Blame::Local`] (a driver bug), never the peer's.

use super::Blame;
use crate::frame::PROTOCOL_VERSION;
use crate::ids::NodeId;
use crate::message::{ErrorKind, Message, OfferError};
use crate::session::SessionError;

/// Why a conversation cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    /// The peer sent a message (or ended its stream) where the protocol allows none of its kind.
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    /// The peer ended its stream in the middle of the conversation: the connection was lost
    /// or cut, and a new one may get further.
    #[error("the peer closed the stream while this node expected {expected}")]
    Ended { expected: &'static str },
    #[error("incompatible protocol version: this node speaks {ours}, the peer {theirs}; upgrade the older node")]
    IncompatibleVersion { ours: u16, theirs: u16 },
    /// A chunk, ack or file report that does not fit the offer.
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Offer(#[from] OfferError),
    /// The peer's message breaks a rule that is not about one chunk (a file it names twice...).
    #[error("{0}")]
    Rule(String),
    /// The peer gave up and said why.
    #[error("the peer failed the transfer ({kind:?}): {message}")]
    PeerFailed { kind: ErrorKind, message: String },
    /// The engine reported an event the current state cannot take: a bug of this node.
    #[error("the {event} event cannot happen while {state}")]
    Misuse { event: &'static str, state: &'static str },
}

impl ConversationError {
    pub fn blame(&self) -> Blame {
        match self {
            Self::Misuse { .. } => Blame::Local,
            _ => Blame::Peer,
        }
    }

    /// Whether a new connection may get past it: a stream the peer ended mid-conversation, or
    /// a peer that gave up because it was cancelled (shutting down, say).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::PeerFailed { kind: ErrorKind::Cancelled, .. } | Self::Ended { .. })
    }
}

/// A message's name for errors, or "the end of the stream" (`None`).
pub fn describe(message: Option<&Message>) -> &'static str {
    message.map_or("the end of the stream", Message::name)
}

/// The peer's node id, when `message` is a hello of this protocol version.
pub fn check_hello(message: Option<Message>) -> Result<NodeId, ConversationError> {
    match message {
        Some(Message::Hello { protocol_version, node_id }) if protocol_version == PROTOCOL_VERSION => Ok(node_id),
        Some(Message::Hello { protocol_version, .. }) => {
            Err(ConversationError::IncompatibleVersion { ours: PROTOCOL_VERSION, theirs: protocol_version })
        }
        Some(Message::Error { kind, message }) => Err(ConversationError::PeerFailed { kind, message }),
        other => Err(ConversationError::Unexpected { expected: "a hello", got: describe(other.as_ref()) }),
    }
}

/// This node's hello.
pub fn hello(node_id: &NodeId) -> Message {
    Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node_id.clone() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_hello_of_another_version_is_refused_by_name() {
        let node = NodeId::new("a").unwrap();
        assert_eq!(check_hello(Some(hello(&node))), Ok(node.clone()));
        let old = Message::Hello { protocol_version: PROTOCOL_VERSION - 1, node_id: node };
        let e = check_hello(Some(old)).unwrap_err();
        assert!(matches!(e, ConversationError::IncompatibleVersion { .. }));
        assert!(e.to_string().contains("upgrade the older node"), "{e}");
        assert_eq!(e.blame(), Blame::Peer);
        let e = check_hello(None).unwrap_err();
        assert_eq!(e, ConversationError::Unexpected { expected: "a hello", got: "the end of the stream" });
        assert!(!e.is_transient());
        let cancelled = Message::Error { kind: ErrorKind::Cancelled, message: "bye".into() };
        assert!(check_hello(Some(cancelled)).unwrap_err().is_transient());
    }
}
