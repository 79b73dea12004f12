//! The protocol's state machines: what a node may do next, decided without I/O.
//!
//! What it does: holds the migration lifecycles as enums with explicit transitions. Each
//! transition is a method that checks the current state and either moves to the next one or
//! refuses with a typed error that says who is to blame. The engine drives these machines
//! with events (an offer arrived, a staging was written, a fence was committed) and executes
//! what they decide; it keeps no phase state of its own.
//!
//! What it does not: read files, touch sockets or read clocks. Times come in as arguments
//! (`now_unix_ms`), and anything the machine must know about the disk (whether a staging
//! folder exists, the free space) is measured by the engine and passed in.
//!
//! Invariants: no input makes a machine panic; a refused transition leaves the machine as it
//! was (a refusal never half-applies).

pub mod conversation;
pub mod inbound;
pub mod outbound;
pub mod source;
pub mod source_wal;
pub mod target;

/// Who is to blame for a refused transition: decides how an error is reported and whether
/// retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The peer node asked for something the protocol does not allow.
    Peer,
    /// The local caller (coordinator, operator, CLI) asked for something not possible now.
    Caller,
    /// This node: an invariant of ferry itself did not hold.
    Local,
}
