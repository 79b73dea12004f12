//! The source's side of a transfer conversation, as a sans-IO state machine.
//!
//! What it does: [`SourceConversation`] decides everything the source says on a control
//! stream and what each of the target's messages means, in the style of quinn-proto's
//! `Connection`: the engine feeds it the target's messages ([`SourceConversation::handle_message`],
//! `None` when the target ended its stream) and engine-local events (a chunk was read, the
//! WAL stream reached its end, the daemon asked for a fence, a timer fired), each with the
//! time where it matters, and executes what [`SourceConversation::poll_action`] returns. The
//! chunk streams take their next chunk from [`SourceConversation::poll_chunk`]. One machine
//! runs one control stream; four constructors name its four conversations:
//!
//! ```text
//! copy:    AwaitHello -> AwaitAccept -> SendingBase ---------> BaseStaged ---> Committing -> Done
//!                                    \-> AwaitBaseStaged -/  (already staged)  \-> AwaitWalEnd -/
//!                                                                  \-> CutOver <-> Fencing -> FenceAnswered -> Done
//! join, release, abort:   AwaitHello -> AwaitAnswer -> Done
//! ```
//!
//! What it does not: read files, open connections, read clocks or wait. The drain of a fence
//! (waiting for the WAL tail to read up to `final_lsn`) and the check that the writer paused
//! are the engine's: it reports their result ([`SourceConversation::handle_fence`],
//! [`SourceConversation::handle_fence_kept`], [`SourceConversation::handle_fence_dropped`]).
//! The WAL stream runs its own machine ([`super::source_wal`]).
//!
//! Invariants: no input panics; a refused event or message leaves the machine as it was; a
//! message the protocol does not allow in the current state is [`ConversationError::Unexpected`]
//! (the peer's blame), an engine event the state cannot take is [`ConversationError::Misuse`]
//! (this node's); the action queue holds at most [`ACTIONS_MAX_COUNT`] actions (file
//! announcements are drawn from the session one per poll, so they never crowd it).

use std::collections::VecDeque;

use super::conversation::{check_hello, describe, hello, ConversationError};
use crate::fence::target_wait_us;
use crate::ids::{Lsn, MigrationId, NodeId};
use crate::message::{Message, Offer};
use crate::session::{ChunkSpan, FileDone, Progress, SourceSession};

/// Most actions queued at once (one event queues at most four).
pub const ACTIONS_MAX_COUNT: usize = 8;

/// What a copy does once its base is staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyPlan {
    /// A WAL stream runs alongside the copy (the offer says so too).
    pub wal: bool,
    /// The daemon fences the running copy ([`SourceAction::ServeCutOver`]); ignored for an
    /// offline copy (`commit`).
    pub cutover: bool,
    /// Offline: mark the staging `released` once the base (and the WAL up to its end) is staged.
    pub commit: bool,
}

/// What the engine must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceAction {
    /// Write this message on the control stream.
    Send(Message),
    /// Every chunk of a file was read: check the file did not change since it was pinned, then
    /// write `message` (its `FileDone`).
    SendFileDone { file_index: u32, message: Message },
    /// The target took the offer; `bytes_resumed` it holds already (publish the progress).
    Accepted { already_staged: bool, bytes_resumed: u64 },
    /// Open the WAL stream (its own machine, [`super::source_wal::SourceWal`]).
    StartWal,
    /// Read these chunks, which the target holds already, and report each with
    /// [`SourceConversation::handle_chunk_read`]; they are not sent.
    Recheck(Vec<ChunkSpan>),
    /// Open the chunk connections and streams: they take chunks from
    /// [`SourceConversation::poll_chunk`] until it has none.
    SendChunks,
    /// Every file is staged on the target (check the files are unchanged; publish).
    BaseStaged { bytes_resent: u64 },
    /// Wait for the WAL stream to end, then report [`SourceConversation::handle_wal_finished`].
    FinishWal,
    /// Take the daemon's fence commands ([`SourceConversation::handle_fence`]) until one holds.
    ServeCutOver,
    /// The target fenced: check no record above `final_lsn` was read, hand the result to the
    /// daemon, and report [`SourceConversation::handle_fence_kept`] or `_dropped`.
    Fenced { final_lsn: Lsn, durable_lsn: Lsn, commit_us: u64, apply_wait_us: u64 },
    /// The target cancelled the fence: lift the WAL ceiling; the copy streams on.
    FenceCancelled { final_lsn: Lsn, reason: String },
    /// No answer by the fence's deadline: lift the WAL ceiling; its late answer is skipped.
    FenceTimedOut { final_lsn: Lsn },
    /// The target took the join, release or abort.
    Answered,
    /// The copy is over: finish the control stream and let the target finish its side.
    Finish { final_lsn: Lsn, committed: bool, fenced: bool },
}

/// Where a conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    AwaitHello,
    AwaitAccept,
    /// Chunks go out; acks and file reports come back.
    SendingBase,
    /// The target holds the whole base already: only its `BaseStaged` is awaited.
    AwaitBaseStaged,
    /// The base is staged; the WAL stream runs to its end.
    AwaitWalEnd,
    /// A live copy streams and waits for the daemon's fence.
    CutOver,
    Fencing {
        final_lsn: Lsn,
        deadline_ns: u64,
    },
    /// The target fenced; the engine checks the writer paused and the daemon took it.
    FenceAnswered {
        final_lsn: Lsn,
    },
    Committing {
        final_lsn: Lsn,
    },
    /// A join, release or abort was sent.
    AwaitAnswer,
    Done,
}

impl SourceState {
    fn name(self) -> &'static str {
        match self {
            Self::AwaitHello => "waiting for the target's hello",
            Self::AwaitAccept => "waiting for the target's accept",
            Self::SendingBase => "sending the base",
            Self::AwaitBaseStaged => "waiting for the base to be staged",
            Self::AwaitWalEnd => "waiting for the WAL stream's end",
            Self::CutOver => "waiting for the cut-over",
            Self::Fencing { .. } => "fencing",
            Self::FenceAnswered { .. } => "holding the target's fenced answer",
            Self::Committing { .. } => "committing",
            Self::AwaitAnswer => "waiting for the target's answer",
            Self::Done => "done",
        }
    }
}

/// What the conversation is for.
#[derive(Debug, Clone)]
enum Purpose {
    Copy {
        session: Box<SourceSession>,
        plan: CopyPlan,
        base_lsn: Lsn,
        offer: Box<Offer>,
    },
    /// Join, release or abort: the request, the name of the answer it expects, and whether
    /// the stream's end before it is a lost connection (a new one may get the answer).
    Request {
        request: Box<Message>,
        answer: &'static str,
        end_is_lost: bool,
    },
}

/// The source's side of one control stream.
#[derive(Debug, Clone)]
pub struct SourceConversation {
    state: SourceState,
    purpose: Purpose,
    actions: VecDeque<SourceAction>,
    /// Files read in full whose `FileDone` was not polled yet.
    files_done: VecDeque<FileDone>,
    /// Fences that timed out: the target answers in order, so its next this many fence
    /// answers are theirs and are skipped.
    late_answers_count: u32,
    base_staged: bool,
}

impl SourceConversation {
    fn new(node_id: &NodeId, purpose: Purpose) -> Self {
        let mut actions = VecDeque::with_capacity(ACTIONS_MAX_COUNT);
        actions.push_back(SourceAction::Send(hello(node_id)));
        Self {
            state: SourceState::AwaitHello,
            purpose,
            actions,
            files_done: VecDeque::new(),
            late_answers_count: 0,
            base_staged: false,
        }
    }

    /// A base copy of a validated `offer`.
    pub fn copy(node_id: &NodeId, offer: Offer, plan: CopyPlan) -> Self {
        let session = Box::new(SourceSession::new(&offer));
        let base_lsn = offer.base_lsn;
        Self::new(node_id, Purpose::Copy { session, plan, base_lsn, offer: Box::new(offer) })
    }

    /// An extra connection for the chunk streams of a transfer offered on another one.
    pub fn join(node_id: &NodeId, migration_id: MigrationId) -> Self {
        Self::request(node_id, Message::Join { migration_id }, "joined", false)
    }

    /// The release of a fenced migration, which the source recorded first; `fenced_durable_lsn`
    /// is the durable LSN the target answered the fence with, when the source took the answer
    /// (see [`Message::Release`]).
    pub fn release(
        node_id: &NodeId,
        migration_id: MigrationId,
        final_lsn: Lsn,
        fenced_durable_lsn: Option<Lsn>,
    ) -> Self {
        let request = Message::Release { migration_id, final_lsn, fenced_durable_lsn };
        Self::request(node_id, request, "released", true)
    }

    /// The abort of a migration: the target removes its staging.
    pub fn abort(node_id: &NodeId, migration_id: MigrationId, reason: String) -> Self {
        let reason = crate::message::cut_reason(reason);
        Self::request(node_id, Message::Abort { migration_id, reason }, "aborted", true)
    }

    fn request(node_id: &NodeId, request: Message, answer: &'static str, end_is_lost: bool) -> Self {
        Self::new(node_id, Purpose::Request { request: Box::new(request), answer, end_is_lost })
    }

    pub fn state(&self) -> SourceState {
        self.state
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.files_done.is_empty() {
            if let (SourceState::SendingBase, Purpose::Copy { session, .. }) = (self.state, &mut self.purpose) {
                self.files_done.extend(session.take_files_done());
            }
        }
        let done = self.files_done.pop_front()?;
        let message =
            Message::FileDone { file_index: done.file_index, size_bytes: done.size_bytes, crc32c: done.crc32c };
        Some(SourceAction::SendFileDone { file_index: done.file_index, message })
    }

    /// When the engine must call [`Self::handle_timeout`] (CLOCK_MONOTONIC ns): the running
    /// fence's deadline.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            SourceState::Fencing { deadline_ns, .. } => Some(deadline_ns),
            _ => None,
        }
    }

    /// The next chunk a stream should read and send (`None`: every chunk is handed out, or
    /// the base is not being sent).
    pub fn poll_chunk(&mut self, now_ns: u64) -> Option<ChunkSpan> {
        match (self.state, &mut self.purpose) {
            (SourceState::SendingBase, Purpose::Copy { session, .. }) => session.next_chunk(now_ns),
            _ => None,
        }
    }

    /// The base copy's progress as a user sees it.
    pub fn progress(&self) -> Progress {
        match &self.purpose {
            Purpose::Copy { session, .. } => {
                let mut progress = session.progress();
                if self.base_staged {
                    progress.files_staged_count = progress.files_total_count;
                }
                progress
            }
            Purpose::Request { .. } => Progress::default(),
        }
    }

    /// The target's next message on the control stream (`None`: it ended the stream).
    pub fn handle_message(&mut self, message: Option<Message>, now_ns: u64) -> Result<(), ConversationError> {
        let _ = now_ns;
        self.ensure_room()?;
        match self.state {
            SourceState::AwaitHello => self.on_hello(message),
            SourceState::AwaitAccept => self.on_accept(message),
            SourceState::SendingBase | SourceState::AwaitBaseStaged => self.on_base_message(message),
            SourceState::CutOver => match message {
                Some(Message::Fenced { .. } | Message::FenceCancelled { .. }) if self.late_answers_count > 0 => {
                    self.late_answers_count -= 1;
                    Ok(())
                }
                other => Err(refuse("the daemon's fence", other, true)),
            },
            SourceState::Fencing { final_lsn, .. } => self.on_fence_answer(final_lsn, message),
            SourceState::Committing { final_lsn } => match message {
                Some(Message::Committed) => {
                    self.state = SourceState::Done;
                    self.actions.push_back(SourceAction::Finish { final_lsn, committed: true, fenced: false });
                    Ok(())
                }
                other => Err(refuse("committed", other, false)),
            },
            SourceState::AwaitAnswer => self.on_answer(message),
            SourceState::AwaitWalEnd | SourceState::FenceAnswered { .. } | SourceState::Done => {
                Err(refuse("nothing", message, true))
            }
        }
    }

    fn on_hello(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        check_hello(message)?;
        match &self.purpose {
            Purpose::Copy { offer, .. } => {
                self.actions.push_back(SourceAction::Send(Message::Offer((**offer).clone())));
                self.state = SourceState::AwaitAccept;
            }
            Purpose::Request { request, .. } => {
                self.actions.push_back(SourceAction::Send((**request).clone()));
                self.state = SourceState::AwaitAnswer;
            }
        }
        Ok(())
    }

    fn on_accept(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        let Purpose::Copy { session, plan, .. } = &mut self.purpose else {
            return Err(refuse("nothing", message, false));
        };
        let (resume, already_staged) = match message {
            Some(Message::Accept { resume, already_staged, .. }) => (resume, already_staged),
            other => return Err(refuse("accept", other, false)),
        };
        // Applied to a copy first: a refused resume list leaves the session as it was.
        let mut resumed = session.clone();
        let rechecks = resumed.on_resume(&resume)?;
        **session = *resumed;
        let bytes_resumed = session.progress().bytes_transferred;
        self.actions.push_back(SourceAction::Accepted { already_staged, bytes_resumed });
        if plan.wal {
            self.actions.push_back(SourceAction::StartWal);
        }
        if already_staged {
            self.state = SourceState::AwaitBaseStaged;
        } else {
            if !rechecks.is_empty() {
                self.actions.push_back(SourceAction::Recheck(rechecks));
            }
            self.actions.push_back(SourceAction::SendChunks);
            self.state = SourceState::SendingBase;
        }
        Ok(())
    }

    fn on_base_message(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        let sending = self.state == SourceState::SendingBase;
        let Purpose::Copy { session, plan, base_lsn, .. } = &mut self.purpose else {
            return Err(refuse("nothing", message, true));
        };
        match message {
            // A repeated transfer's target may still report what it held: nothing to count.
            Some(Message::Acks { .. } | Message::FileStaged { .. }) if !sending => Ok(()),
            Some(Message::Acks { chunks }) => {
                let mut acked = session.clone();
                acked.on_acks(&chunks)?;
                **session = *acked;
                Ok(())
            }
            Some(Message::FileStaged { .. }) => {
                session.on_file_staged();
                Ok(())
            }
            Some(Message::BaseStaged { bytes_resent }) => {
                if sending && !session.all_acked() {
                    return Err(ConversationError::Rule(
                        "the target reported the base staged before every chunk was acknowledged".into(),
                    ));
                }
                let (plan, base_lsn) = (*plan, *base_lsn);
                self.base_staged = true;
                self.files_done.clear();
                self.actions.push_back(SourceAction::BaseStaged { bytes_resent });
                if plan.wal && plan.cutover && !plan.commit {
                    self.state = SourceState::CutOver;
                    self.actions.push_back(SourceAction::ServeCutOver);
                } else if plan.wal {
                    self.state = SourceState::AwaitWalEnd;
                    self.actions.push_back(SourceAction::FinishWal);
                } else {
                    self.end_base(base_lsn, plan.commit);
                }
                Ok(())
            }
            other => Err(refuse("acks, file_staged or base_staged", other, true)),
        }
    }

    /// The base (and the WAL up to its end) is staged at `final_lsn`: commit or finish.
    fn end_base(&mut self, final_lsn: Lsn, commit: bool) {
        if commit {
            self.actions.push_back(SourceAction::Send(Message::Commit { final_lsn }));
            self.state = SourceState::Committing { final_lsn };
        } else {
            self.actions.push_back(SourceAction::Finish { final_lsn, committed: false, fenced: false });
            self.state = SourceState::Done;
        }
    }

    fn on_fence_answer(&mut self, final_lsn: Lsn, message: Option<Message>) -> Result<(), ConversationError> {
        match message {
            // Acks of the base may still trail.
            Some(Message::Acks { .. } | Message::FileStaged { .. }) => Ok(()),
            Some(Message::Fenced { .. } | Message::FenceCancelled { .. }) if self.late_answers_count > 0 => {
                self.late_answers_count -= 1;
                Ok(())
            }
            Some(Message::Fenced { durable_lsn, commit_us, apply_wait_us }) => {
                self.state = SourceState::FenceAnswered { final_lsn };
                self.actions.push_back(SourceAction::Fenced { final_lsn, durable_lsn, commit_us, apply_wait_us });
                Ok(())
            }
            Some(Message::FenceCancelled { reason }) => {
                self.state = SourceState::CutOver;
                self.actions.push_back(SourceAction::FenceCancelled { final_lsn, reason });
                Ok(())
            }
            other => Err(refuse("fenced or fence_cancelled", other, true)),
        }
    }

    fn on_answer(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        let Purpose::Request { answer, end_is_lost, .. } = &self.purpose else {
            return Err(refuse("nothing", message, true));
        };
        let (answer, end_is_lost) = (*answer, *end_is_lost);
        match message {
            Some(m) if m.name() == answer && !matches!(m, Message::Error { .. }) => {
                self.state = SourceState::Done;
                self.actions.push_back(SourceAction::Answered);
                Ok(())
            }
            other => Err(refuse(answer, other, end_is_lost)),
        }
    }

    /// A chunk's bytes were read at the source with this CRC32C (sent, or rechecked).
    pub fn handle_chunk_read(&mut self, span: &ChunkSpan, crc32c: u32) -> Result<(), ConversationError> {
        match (self.state, &mut self.purpose) {
            (SourceState::SendingBase, Purpose::Copy { session, .. }) => {
                // The engine only reads chunks this machine handed out.
                session
                    .on_chunk_read(span.chunk, crc32c)
                    .map_err(|_| ConversationError::Misuse { event: "chunk read", state: "the chunk is not offered" })
            }
            _ => Err(self.misuse("chunk read")),
        }
    }

    /// The WAL stream ended with every selected record up to `final_lsn` durable.
    pub fn handle_wal_finished(&mut self, final_lsn: Lsn) -> Result<(), ConversationError> {
        self.ensure_room()?;
        match (self.state, &self.purpose) {
            (SourceState::AwaitWalEnd, Purpose::Copy { plan, .. }) => {
                let commit = plan.commit;
                self.end_base(final_lsn, commit);
                Ok(())
            }
            _ => Err(self.misuse("WAL finished")),
        }
    }

    /// The daemon's fence at `final_lsn` has drained (the tail read every record up to it;
    /// `through_lsn` is the last of the vShard's, `None` when the target holds it durable
    /// already) at `now_ns`: ask the target to fence before `deadline_ns`.
    pub fn handle_fence(
        &mut self,
        final_lsn: Lsn,
        through_lsn: Option<Lsn>,
        apply_wait_max_us: u64,
        deadline_ns: u64,
        now_ns: u64,
    ) -> Result<(), ConversationError> {
        self.ensure_room()?;
        if self.state != SourceState::CutOver {
            return Err(self.misuse("fence"));
        }
        let wal_wait_max_us = target_wait_us(now_ns, deadline_ns);
        let fence = Message::Fence {
            final_lsn,
            apply_wait_max_us: apply_wait_max_us.min(wal_wait_max_us),
            through_lsn,
            wal_wait_max_us,
        };
        self.actions.push_back(SourceAction::Send(fence));
        self.state = SourceState::Fencing { final_lsn, deadline_ns };
        Ok(())
    }

    /// The fence the target answered holds (the writer paused, the daemon took it): the copy
    /// is over.
    pub fn handle_fence_kept(&mut self) -> Result<(), ConversationError> {
        self.ensure_room()?;
        let SourceState::FenceAnswered { final_lsn } = self.state else { return Err(self.misuse("fence kept")) };
        self.state = SourceState::Done;
        self.actions.push_back(SourceAction::Finish { final_lsn, committed: false, fenced: true });
        Ok(())
    }

    /// The fence the target answered does not hold (a record above `final_lsn` was read, or
    /// the daemon gave up on it): streaming goes on until the next fence.
    pub fn handle_fence_dropped(&mut self) -> Result<(), ConversationError> {
        let SourceState::FenceAnswered { .. } = self.state else { return Err(self.misuse("fence dropped")) };
        self.state = SourceState::CutOver;
        Ok(())
    }

    /// A timer set at [`Self::poll_timeout`] fired at `now_ns`.
    pub fn handle_timeout(&mut self, now_ns: u64) -> Result<(), ConversationError> {
        self.ensure_room()?;
        if let SourceState::Fencing { final_lsn, deadline_ns } = self.state {
            if now_ns >= deadline_ns {
                // Cancelling is safe even if the target fences later: only a release makes it
                // authoritative, and it releases only at a fence the source recorded.
                self.late_answers_count = self.late_answers_count.saturating_add(1);
                self.state = SourceState::CutOver;
                self.actions.push_back(SourceAction::FenceTimedOut { final_lsn });
            }
        }
        Ok(())
    }

    fn ensure_room(&self) -> Result<(), ConversationError> {
        // One event queues at most four actions.
        if self.actions.len() + 4 > ACTIONS_MAX_COUNT {
            return Err(ConversationError::Misuse { event: "another event", state: "the action queue is full" });
        }
        Ok(())
    }

    fn misuse(&self, event: &'static str) -> ConversationError {
        ConversationError::Misuse { event, state: self.state.name() }
    }
}

/// The error for a message the state does not take. `streaming`: the stream's end is a lost
/// connection (the conversation was under way), not a peer that broke the protocol.
fn refuse(expected: &'static str, message: Option<Message>, streaming: bool) -> ConversationError {
    match message {
        Some(Message::Error { kind, message }) => ConversationError::PeerFailed { kind, message },
        None if streaming => ConversationError::Ended { expected },
        other => ConversationError::Unexpected { expected, got: describe(other.as_ref()) },
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
