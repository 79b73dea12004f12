//! The source's side of the WAL stream, as a sans-IO state machine.
//!
//! What it does: [`SourceWal`] runs the WAL stream's control messages: it opens with
//! `WalStart`, learns the target's durable LSN from its first `WalDurable` (the stream starts
//! at the next record), follows every later `WalDurable`, and decides when a stream with an
//! end (`until_lsn`) is over: the tail has read up to the end and every batch sent is durable.
//! The engine reports the batches it wrote ([`SourceWal::handle_batch_sent`]) and the tail
//! reaching the end ([`SourceWal::handle_tail_reached`]).
//!
//! ```text
//! AwaitDurable --WalDurable--> Streaming --(reached and all durable)--> Done
//! ```
//!
//! What it does not: read the WAL, frame records, hold segments or keep the fence's ceiling
//! (the engine's `walsend` and `waltail_hub` do).
//!
//! Invariants: no input panics; the target's first `WalDurable` comes before any batch; a
//! message other than `WalDurable` is refused ([`ConversationError::Unexpected`]); the queue
//! holds at most [`WAL_ACTIONS_MAX_COUNT`] actions.

use std::collections::VecDeque;

use super::conversation::{describe, ConversationError};
use crate::ids::Lsn;
use crate::message::Message;

/// Most actions queued at once (one event queues at most two).
pub const WAL_ACTIONS_MAX_COUNT: usize = 4;

/// What the engine must do next on the WAL stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WalAction {
    /// Write this message on the WAL stream.
    Send(Message),
    /// The target holds every record up to `durable_lsn`: stream from the next one.
    Start { durable_lsn: Lsn },
    /// The target's staged WAL is durable up to `durable_lsn`.
    Durable { durable_lsn: Lsn },
    /// Every selected record up to the stream's end is durable: the stream is over.
    Finish { durable_lsn: Lsn },
}

/// Where the WAL stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalState {
    AwaitDurable,
    Streaming,
    Done,
}

/// The source's side of one WAL stream.
#[derive(Debug, Clone)]
pub struct SourceWal {
    state: WalState,
    /// The floor of the durable LSN: the offer's base LSN.
    base_lsn: Lsn,
    durable_lsn: Lsn,
    last_sent_lsn: Option<Lsn>,
    reached: bool,
    actions: VecDeque<WalAction>,
}

impl SourceWal {
    /// A WAL stream of a transfer whose base holds every record up to `base_lsn`.
    pub fn new(base_lsn: Lsn) -> Self {
        let mut actions = VecDeque::with_capacity(WAL_ACTIONS_MAX_COUNT);
        actions.push_back(WalAction::Send(Message::WalStart));
        Self {
            state: WalState::AwaitDurable,
            base_lsn,
            durable_lsn: base_lsn,
            last_sent_lsn: None,
            reached: false,
            actions,
        }
    }

    pub fn state(&self) -> WalState {
        self.state
    }

    pub fn durable_lsn(&self) -> Lsn {
        self.durable_lsn
    }

    /// Whether the stream takes more records (it is streaming and the tail has not reached
    /// its end).
    pub fn wants_records(&self) -> bool {
        self.state == WalState::Streaming && !self.reached
    }

    pub fn poll_action(&mut self) -> Option<WalAction> {
        self.actions.pop_front()
    }

    /// The target's next message on the WAL stream (`None`: it ended the stream).
    pub fn handle_message(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        self.ensure_room()?;
        match (self.state, message) {
            (WalState::AwaitDurable, Some(Message::WalDurable { durable_lsn })) => {
                self.durable_lsn = durable_lsn.max(self.base_lsn);
                self.state = WalState::Streaming;
                self.actions.push_back(WalAction::Start { durable_lsn: self.durable_lsn });
                Ok(())
            }
            (WalState::Streaming, Some(Message::WalDurable { durable_lsn })) => {
                self.durable_lsn = durable_lsn;
                self.actions.push_back(WalAction::Durable { durable_lsn });
                self.check_finished();
                Ok(())
            }
            (_, Some(Message::Error { kind, message })) => Err(ConversationError::PeerFailed { kind, message }),
            (WalState::Streaming, None) => Err(ConversationError::Ended { expected: "wal_durable" }),
            (_, other) => Err(ConversationError::Unexpected { expected: "wal_durable", got: describe(other.as_ref()) }),
        }
    }

    /// A batch whose last record is `last_lsn` was written to the stream.
    pub fn handle_batch_sent(&mut self, last_lsn: Lsn) -> Result<(), ConversationError> {
        if self.state != WalState::Streaming || self.reached {
            return Err(self.misuse("batch sent"));
        }
        self.last_sent_lsn = Some(last_lsn);
        Ok(())
    }

    /// The tail has read every record up to the stream's end.
    pub fn handle_tail_reached(&mut self) -> Result<(), ConversationError> {
        self.ensure_room()?;
        if self.state != WalState::Streaming {
            return Err(self.misuse("tail reached"));
        }
        self.reached = true;
        self.check_finished();
        Ok(())
    }

    fn check_finished(&mut self) {
        if self.reached && self.last_sent_lsn.is_none_or(|last| self.durable_lsn >= last) {
            self.state = WalState::Done;
            self.actions.push_back(WalAction::Finish { durable_lsn: self.durable_lsn });
        }
    }

    fn ensure_room(&self) -> Result<(), ConversationError> {
        if self.actions.len() + 2 > WAL_ACTIONS_MAX_COUNT {
            return Err(ConversationError::Misuse { event: "another event", state: "the action queue is full" });
        }
        Ok(())
    }

    fn misuse(&self, event: &'static str) -> ConversationError {
        let state = match self.state {
            WalState::AwaitDurable => "waiting for the target's first wal_durable",
            WalState::Streaming if self.reached => "the tail has reached the end",
            WalState::Streaming => "streaming",
            WalState::Done => "done",
        };
        ConversationError::Misuse { event, state }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::message::ErrorKind;

    fn drain(wal: &mut SourceWal) -> Vec<WalAction> {
        std::iter::from_fn(|| wal.poll_action()).collect()
    }

    #[test]
    fn a_stream_starts_at_the_durable_lsn_and_ends_once_its_end_is_durable() {
        let mut wal = SourceWal::new(Lsn(10));
        assert_eq!(drain(&mut wal), vec![WalAction::Send(Message::WalStart)]);
        // A target that holds nothing starts at the base.
        wal.handle_message(Some(Message::WalDurable { durable_lsn: Lsn(0) })).unwrap();
        assert_eq!(drain(&mut wal), vec![WalAction::Start { durable_lsn: Lsn(10) }]);
        wal.handle_batch_sent(Lsn(20)).unwrap();
        wal.handle_tail_reached().unwrap();
        assert_eq!(drain(&mut wal), vec![]);
        assert!(wal.handle_batch_sent(Lsn(21)).is_err());
        wal.handle_message(Some(Message::WalDurable { durable_lsn: Lsn(15) })).unwrap();
        assert_eq!(drain(&mut wal), vec![WalAction::Durable { durable_lsn: Lsn(15) }]);
        wal.handle_message(Some(Message::WalDurable { durable_lsn: Lsn(20) })).unwrap();
        assert_eq!(
            drain(&mut wal),
            vec![WalAction::Durable { durable_lsn: Lsn(20) }, WalAction::Finish { durable_lsn: Lsn(20) }]
        );
        assert_eq!(wal.state(), WalState::Done);
    }

    #[test]
    fn a_stream_with_nothing_sent_ends_when_the_tail_reaches_its_end() {
        let mut wal = SourceWal::new(Lsn(10));
        assert!(wal.handle_tail_reached().is_err(), "misuse before the start");
        wal.handle_message(Some(Message::WalDurable { durable_lsn: Lsn(12) })).unwrap();
        wal.handle_tail_reached().unwrap();
        assert_eq!(drain(&mut wal).last(), Some(&WalAction::Finish { durable_lsn: Lsn(12) }));
    }

    #[test]
    fn other_messages_errors_and_ends_are_refused() {
        let mut wal = SourceWal::new(Lsn(1));
        let e = wal.handle_message(None).unwrap_err();
        assert!(matches!(e, ConversationError::Unexpected { .. }), "{e}");
        wal.handle_message(Some(Message::WalDurable { durable_lsn: Lsn(1) })).unwrap();
        for message in [Message::WalStart, Message::Committed, Message::Acks { chunks: vec![] }] {
            let e = wal.handle_message(Some(message)).unwrap_err();
            assert!(matches!(e, ConversationError::Unexpected { .. }), "{e}");
        }
        assert!(wal.handle_message(None).unwrap_err().is_transient());
        let e = wal.handle_message(Some(Message::error(ErrorKind::Storage, "disk"))).unwrap_err();
        assert!(matches!(e, ConversationError::PeerFailed { kind: ErrorKind::Storage, .. }));
    }
}
