//! The target's side of one transfer conversation (one control stream), as a sans-IO machine.
//!
//! What it does: [`TargetConversation`] takes the source's messages (`handle_message`) and
//! the engine's reports of what it did (`handle_admitted`, `handle_chunks`,
//! `handle_file_finalized`, `handle_base_written`, `handle_committed`, `handle_fence_answer`,
//! `handle_answered`) and says what to do next, one [`TargetAction`] at a time
//! (`poll_action`): messages to send, an offer to admit, chunks to sync, files to finalise,
//! the manifest to write, a commit or a fence to run, a one-shot request (join, release,
//! abort) to carry out, the stream to finish. It owns the transfer's [`TargetSession`], so
//! chunk streams check each chunk header through it (`check_chunk`).
//!
//! ```text
//!  AwaitHello -hello-> AwaitRequest -offer-> Admitting -admitted-> Receiving --all files--> StagingBase
//!                          |  join/release/abort                    (chunks, file_done)          |
//!                          v                                                          base written
//!                      Answering -answered-> Joined | Finished       Finished <-end- BaseStaged <-+
//!                                                             commit/fence -> Committing/Fencing -^
//! ```
//!
//! What it does not: touch the disk or the network, admit an offer (the target's
//! [`super::inbound`] machine does, when the engine asks it on [`TargetAction::Admit`]), or read
//! a clock: times come in as arguments.
//!
//! Invariants: a peer's message that the state does not allow is refused with
//! [`ConversationError`] of [`Blame::Peer`](super::Blame::Peer); an engine report in the wrong
//! state is [`ConversationError::Misuse`]. After a refusal the conversation is over (every
//! later call is refused). Each call queues a bounded number of actions (at most one per file
//! it finishes, plus four), and the driver drains them after each call.

use std::collections::VecDeque;

use super::conversation::{check_hello, describe, hello, ConversationError};
use crate::ids::{Lsn, MigrationId, NodeId};
use crate::message::{ChunkRef, Message, Offer};
use crate::path::RelPath;
use crate::session::{ChunkVerdict, FileDone, TargetSession};

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetAction {
    /// Write this message on the control stream.
    Send(Message),
    /// Admit and claim the offer, prepare its staging, then report [`TargetConversation::handle_admitted`].
    Admit(Box<Offer>),
    /// Find the transfer `migration_id` to join, then report [`TargetConversation::handle_answered`].
    Join { migration_id: MigrationId },
    /// Mark the staging released, then report [`TargetConversation::handle_answered`]. A
    /// staging that is not fenced (its `fenced` commit lost in a crash after the answer) is
    /// released only when `fenced_durable_lsn` is given and its staged WAL agrees
    /// ([`crate::proto::inbound::ReleaseStep::Derive`]).
    Release { migration_id: MigrationId, final_lsn: Lsn, fenced_durable_lsn: Option<Lsn> },
    /// Remove the staging, then report [`TargetConversation::handle_answered`].
    Abort { migration_id: MigrationId, reason: String },
    /// Make the written chunks durable (part files, then the chunk log).
    Sync,
    /// The file is verified: rename it into `segments/`, durably, then report
    /// [`TargetConversation::handle_file_finalized`].
    FinalizeFile { path: RelPath, done: FileDone },
    /// Every file is staged: write `MANIFEST.json` with these CRC32Cs (one per offered file),
    /// record `bytes_resent`, then report [`TargetConversation::handle_base_written`].
    StageBase { segment_crcs: Vec<u32>, bytes_resent: u64 },
    /// Mark the staging released at `final_lsn`, then report [`TargetConversation::handle_committed`].
    Commit { final_lsn: Lsn },
    /// Fence the staging, then report [`TargetConversation::handle_fence_answer`].
    Fence(FenceRequest),
    /// The `Fenced` answer is out (the action before this one): make the staging's `fenced`
    /// state durable now, off the pause's path (the MANIFEST commit; DESIGN section 8). Nothing
    /// is reported back: the machine does not wait for it, and a staging whose commit never
    /// lands is released from its staged WAL (see [`TargetAction::Release`]).
    CommitFenced { final_lsn: Lsn },
    /// Carry the chunk streams of this (joined) connection into the transfer until it ends.
    CarryChunks,
    /// Finish the control stream: the conversation is over.
    Finish,
}

/// A fence the source asked for, checked against the offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceRequest {
    pub final_lsn: Lsn,
    /// The last of the vShard's records up to `final_lsn`, for the staged WAL to wait for
    /// (`None`: the source knew it durable already).
    pub through_lsn: Option<Lsn>,
    pub wal_wait_max_us: u64,
    pub apply_wait_max_us: u64,
}

/// How a fence the engine ran came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAnswer {
    Fenced { durable_lsn: Lsn, commit_us: u64, apply_wait_us: u64 },
    Cancelled { reason: String },
}

/// What the engine found when it prepared an admitted offer's staging.
#[derive(Debug, Clone)]
pub enum Admitted {
    /// The whole base was staged by an earlier transfer of the same offer.
    AlreadyStaged { bytes_resent: u64 },
    /// Chunks go on arriving; `session` holds what earlier runs verified.
    Receive { session: TargetSession },
}

/// A chunk stream's report: the chunk was written and verified, or was a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEvent {
    Written { chunk: ChunkRef, crc32c: u32, len_bytes: u32 },
    Duplicate(ChunkRef),
}

/// The one-shot requests a connection may carry instead of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Join,
    Release,
    Abort,
}

#[derive(Debug)]
enum State {
    AwaitHello,
    AwaitRequest,
    Admitting(Box<Offer>),
    Receiving(Box<Receiving>),
    StagingBase(Box<Offer>),
    BaseStaged(Box<Offer>),
    Committing(Box<Offer>),
    /// The fence at this `final_lsn` runs.
    Fencing(Box<Offer>, Lsn),
    Answering(Request),
    Joined,
    Finished,
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::AwaitHello => "awaiting the hello",
            Self::AwaitRequest => "awaiting an offer or a request",
            Self::Admitting(_) => "admitting an offer",
            Self::Receiving(_) => "receiving the base",
            Self::StagingBase(_) => "writing the manifest",
            Self::BaseStaged(_) => "base staged",
            Self::Committing(_) => "committing",
            Self::Fencing(..) => "fencing",
            Self::Answering(_) => "answering a request",
            Self::Joined => "carrying joined chunk streams",
            Self::Finished => "finished",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Receiving {
    offer: Box<Offer>,
    session: TargetSession,
    staged: Vec<bool>,
    staged_count: usize,
    unsynced_bytes: u64,
}

/// The target's side of one control stream.
#[derive(Debug)]
pub struct TargetConversation {
    node_id: NodeId,
    /// Written bytes after which the driver is told to sync.
    sync_batch_bytes: u64,
    state: State,
    actions: VecDeque<TargetAction>,
}

impl TargetConversation {
    pub fn new(node_id: NodeId, sync_batch_bytes: u64) -> Self {
        Self { node_id, sync_batch_bytes, state: State::AwaitHello, actions: VecDeque::new() }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<TargetAction> {
        self.actions.pop_front()
    }

    /// Whether the base copy was under way (an error now interrupts it).
    pub fn is_receiving(&self) -> bool {
        matches!(self.state, State::Receiving(_) | State::StagingBase(_))
    }

    /// Whether the conversation is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// The offer being received or staged.
    pub fn offer(&self) -> Option<&Offer> {
        match &self.state {
            State::Admitting(o) | State::StagingBase(o) | State::BaseStaged(o) => Some(o),
            State::Committing(o) | State::Fencing(o, _) => Some(o),
            State::Receiving(r) => Some(&r.offer),
            _ => None,
        }
    }

    /// Bytes verified, bytes resent and files staged so far of the base being received.
    pub fn progress(&self) -> Option<(u64, u64, u64)> {
        let State::Receiving(r) = &self.state else { return None };
        Some((r.session.bytes_verified(), r.session.bytes_resent(), r.staged_count as u64))
    }

    /// Files of the offer staged so far (all of them once the base is being written).
    pub fn files_staged_count(&self) -> u64 {
        match &self.state {
            State::Receiving(r) => r.staged_count as u64,
            State::StagingBase(offer) => offer.files.len() as u64,
            _ => 0,
        }
    }

    /// A message from the source, or the end of its control stream (`None`).
    pub fn handle_message(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        let result = self.on_message(message);
        self.fail_on(result)
    }

    fn on_message(&mut self, message: Option<Message>) -> Result<(), ConversationError> {
        if let Some(Message::Error { kind, message }) = message {
            return Err(ConversationError::PeerFailed { kind, message });
        }
        let state = std::mem::replace(&mut self.state, State::Failed);
        self.state = match (state, message) {
            (State::AwaitHello, message) => {
                check_hello(message)?;
                self.actions.push_back(TargetAction::Send(hello(&self.node_id)));
                State::AwaitRequest
            }
            (State::AwaitRequest, Some(Message::Offer(offer))) => {
                offer.validate()?;
                let offer = Box::new(offer);
                self.actions.push_back(TargetAction::Admit(offer.clone()));
                State::Admitting(offer)
            }
            (State::AwaitRequest, Some(Message::Join { migration_id })) => {
                self.actions.push_back(TargetAction::Join { migration_id });
                State::Answering(Request::Join)
            }
            (State::AwaitRequest, Some(Message::Release { migration_id, final_lsn, fenced_durable_lsn })) => {
                self.actions.push_back(TargetAction::Release { migration_id, final_lsn, fenced_durable_lsn });
                State::Answering(Request::Release)
            }
            (State::AwaitRequest, Some(Message::Abort { migration_id, reason })) => {
                self.actions.push_back(TargetAction::Abort { migration_id, reason });
                State::Answering(Request::Abort)
            }
            (State::AwaitRequest, other) => {
                return Err(unexpected("an offer, join, release or abort", other.as_ref()));
            }
            (State::Receiving(mut r), Some(Message::FileDone { file_index, size_bytes, crc32c })) => {
                let ready = r.session.on_file_done(FileDone { file_index, size_bytes, crc32c })?;
                self.ready(&mut r, ready)?;
                self.after_files(r)
            }
            (State::Receiving(_), None) => {
                return Err(ConversationError::Rule(
                    "the source closed its control stream before the base was staged".into(),
                ));
            }
            (State::Receiving(_), Some(other)) => return Err(unexpected("file_done", Some(&other))),
            (State::BaseStaged(offer), Some(Message::Commit { final_lsn })) => {
                self.actions.push_back(TargetAction::Commit { final_lsn });
                State::Committing(offer)
            }
            (
                State::BaseStaged(offer),
                Some(Message::Fence { final_lsn, apply_wait_max_us, through_lsn, wal_wait_max_us }),
            ) => {
                let request = FenceRequest { final_lsn, through_lsn, wal_wait_max_us, apply_wait_max_us };
                match refuse_fence(&offer, &request) {
                    Some(reason) => {
                        let reason = crate::message::cut_reason(reason);
                        self.actions.push_back(TargetAction::Send(Message::FenceCancelled { reason }));
                        State::BaseStaged(offer)
                    }
                    None => {
                        self.actions.push_back(TargetAction::Fence(request));
                        State::Fencing(offer, final_lsn)
                    }
                }
            }
            (State::BaseStaged(_), None) => {
                // The source finished its side; finish ours (it waits for this before it
                // closes the connection).
                self.actions.push_back(TargetAction::Finish);
                State::Finished
            }
            (State::BaseStaged(_), Some(other)) => {
                return Err(unexpected("commit, fence or the end of the stream", Some(&other)));
            }
            (State::Joined, None) => State::Joined,
            (state, message) => {
                let expected = match state {
                    State::Finished | State::Failed => "nothing more",
                    _ => "no message before this node's answer",
                };
                return Err(unexpected(expected, message.as_ref()));
            }
        };
        Ok(())
    }

    /// The engine admitted the offer and prepared its staging.
    pub fn handle_admitted(&mut self, admitted: Admitted) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Admitting(offer) = state else {
            return self.misuse("admitted", state);
        };
        self.state = match admitted {
            Admitted::AlreadyStaged { bytes_resent } => {
                let accept = Message::Accept { resume: Vec::new(), bytes_resent: 0, already_staged: true };
                self.actions.push_back(TargetAction::Send(accept));
                self.actions.push_back(TargetAction::Send(Message::BaseStaged { bytes_resent }));
                State::BaseStaged(offer)
            }
            Admitted::Receive { session } => {
                let (resume, bytes_resent) = (session.resume_list(), session.bytes_resent());
                self.actions.push_back(TargetAction::Send(Message::Accept {
                    resume,
                    bytes_resent,
                    already_staged: false,
                }));
                let staged = vec![false; offer.files.len()];
                let r = Receiving { offer, session, staged, staged_count: 0, unsynced_bytes: 0 };
                self.after_files(Box::new(r))
            }
        };
        Ok(())
    }

    /// Checks a chunk's header against the offer, before its body is read.
    pub fn check_chunk(
        &mut self,
        file_index: u32,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> Result<ChunkVerdict, ConversationError> {
        match &mut self.state {
            State::Receiving(r) => Ok(r.session.check_chunk(file_index, offset_bytes, len_bytes)?),
            _ => {
                Err(ConversationError::Rule(format!("a chunk of file {file_index} arrived after the base was staged")))
            }
        }
    }

    /// Chunks the chunk streams wrote (or found duplicate) since the last report: acks them,
    /// and asks for a sync first when enough bytes are unsynced.
    pub fn handle_chunks(&mut self, events: &[ChunkEvent]) -> Result<(), ConversationError> {
        let result = self.on_chunks(events);
        self.fail_on(result)
    }

    fn on_chunks(&mut self, events: &[ChunkEvent]) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Receiving(mut r) = state else {
            return self.misuse("chunks written", state);
        };
        let mut acks = Vec::with_capacity(events.len());
        let mut ready = Vec::new();
        for event in events {
            match *event {
                ChunkEvent::Written { chunk, crc32c, len_bytes } => {
                    ready.extend(r.session.on_chunk_written(chunk.file_index, chunk.chunk_index, crc32c)?);
                    r.unsynced_bytes = r.unsynced_bytes.saturating_add(u64::from(len_bytes));
                    acks.push(chunk);
                }
                ChunkEvent::Duplicate(chunk) => acks.push(chunk),
            }
        }
        if r.unsynced_bytes >= self.sync_batch_bytes {
            self.actions.push_back(TargetAction::Sync);
            r.unsynced_bytes = 0;
        }
        if !acks.is_empty() {
            self.actions.push_back(TargetAction::Send(Message::Acks { chunks: acks }));
        }
        for done in ready {
            self.ready(&mut r, Some(done))?;
        }
        self.state = self.after_files(r);
        Ok(())
    }

    /// A file the engine finalised (renamed into `segments/`, durably).
    pub fn handle_file_finalized(&mut self, file_index: u32) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Receiving(mut r) = state else {
            return self.misuse("file finalised", state);
        };
        if !mark_staged(&mut r, file_index) {
            return self.misuse("file finalised twice", State::Receiving(r));
        }
        self.actions.push_back(TargetAction::Send(Message::FileStaged { file_index }));
        self.state = self.after_files(r);
        Ok(())
    }

    /// The engine wrote `MANIFEST.json`: the base is staged.
    pub fn handle_base_written(&mut self, bytes_resent: u64) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::StagingBase(offer) = state else {
            return self.misuse("base written", state);
        };
        self.actions.push_back(TargetAction::Send(Message::BaseStaged { bytes_resent }));
        self.state = State::BaseStaged(offer);
        Ok(())
    }

    /// The engine released the staging of an offline copy.
    pub fn handle_committed(&mut self) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Committing(offer) = state else {
            return self.misuse("committed", state);
        };
        self.actions.push_back(TargetAction::Send(Message::Committed));
        self.state = State::BaseStaged(offer);
        Ok(())
    }

    /// The engine's fence came out as `answer`.
    pub fn handle_fence_answer(&mut self, answer: FenceAnswer) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Fencing(offer, final_lsn) = state else {
            return self.misuse("fence answered", state);
        };
        match answer {
            FenceAnswer::Fenced { durable_lsn, commit_us, apply_wait_us } => {
                // The answer first: the pause ends with it; the MANIFEST commit follows.
                self.actions.push_back(TargetAction::Send(Message::Fenced { durable_lsn, commit_us, apply_wait_us }));
                self.actions.push_back(TargetAction::CommitFenced { final_lsn });
            }
            FenceAnswer::Cancelled { reason } => {
                let reason = crate::message::cut_reason(reason);
                self.actions.push_back(TargetAction::Send(Message::FenceCancelled { reason }));
            }
        }
        self.state = State::BaseStaged(offer);
        Ok(())
    }

    /// The engine carried out the one-shot request (join, release or abort).
    pub fn handle_answered(&mut self) -> Result<(), ConversationError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Answering(request) = state else {
            return self.misuse("answered", state);
        };
        self.state = match request {
            Request::Join => {
                self.actions.push_back(TargetAction::Send(Message::Joined));
                self.actions.push_back(TargetAction::CarryChunks);
                State::Joined
            }
            Request::Release | Request::Abort => {
                let answer = if request == Request::Release { Message::Released } else { Message::Aborted };
                self.actions.push_back(TargetAction::Send(answer));
                self.actions.push_back(TargetAction::Finish);
                State::Finished
            }
        };
        Ok(())
    }

    /// A file became ready: one staged by an earlier run is counted now; another is finalised
    /// by the engine first.
    fn ready(&mut self, r: &mut Receiving, ready: Option<FileDone>) -> Result<(), ConversationError> {
        let Some(done) = ready else { return Ok(()) };
        let index = done.file_index as usize;
        let path = r
            .offer
            .files
            .get(index)
            .map(|f| f.path.clone())
            .ok_or_else(|| ConversationError::Rule(format!("file {} is not in the offer", done.file_index)))?;
        if r.staged.get(index).copied().unwrap_or(true) {
            return Ok(());
        }
        if r.session.is_staged(done.file_index) {
            mark_staged(r, done.file_index);
            self.actions.push_back(TargetAction::Send(Message::FileStaged { file_index: done.file_index }));
        } else {
            self.actions.push_back(TargetAction::FinalizeFile { path, done });
        }
        Ok(())
    }

    /// Stays receiving, or asks for the manifest once every file is staged.
    fn after_files(&mut self, r: Box<Receiving>) -> State {
        if r.staged_count < r.offer.files.len() {
            return State::Receiving(r);
        }
        let crcs = (0..r.offer.files.len())
            .map(|i| u32::try_from(i).ok().and_then(|i| r.session.file_crc(i)).unwrap_or(0))
            .collect();
        let bytes_resent = r.session.bytes_resent();
        self.actions.push_back(TargetAction::StageBase { segment_crcs: crcs, bytes_resent });
        State::StagingBase(r.offer)
    }

    fn misuse(&mut self, event: &'static str, state: State) -> Result<(), ConversationError> {
        let error = ConversationError::Misuse { event, state: state.name() };
        self.state = State::Failed;
        Err(error)
    }

    fn fail_on(&mut self, result: Result<(), ConversationError>) -> Result<(), ConversationError> {
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }
}

fn mark_staged(r: &mut Receiving, file_index: u32) -> bool {
    match r.staged.get_mut(file_index as usize) {
        Some(staged) if !*staged => {
            *staged = true;
            r.staged_count += 1;
            true
        }
        _ => false,
    }
}

fn unexpected(expected: &'static str, got: Option<&Message>) -> ConversationError {
    ConversationError::Unexpected { expected, got: describe(got) }
}

/// Why a fence cannot be taken at all, whatever the staging holds.
fn refuse_fence(offer: &Offer, request: &FenceRequest) -> Option<String> {
    let final_lsn = request.final_lsn;
    if final_lsn < offer.base_lsn {
        return Some(format!("final_lsn {final_lsn} is below the migration's base_lsn {}", offer.base_lsn));
    }
    let through_lsn = request.through_lsn.filter(|t| *t > final_lsn)?;
    Some(format!("the source names record {through_lsn}, above final_lsn {final_lsn}, as the last to stage"))
}

/// The WAL stream's first message must be `WalStart`.
pub fn check_wal_start(message: Option<Message>) -> Result<(), ConversationError> {
    match message {
        Some(Message::WalStart) => Ok(()),
        Some(Message::Error { kind, message }) => Err(ConversationError::PeerFailed { kind, message }),
        other => Err(unexpected("wal_start", other.as_ref())),
    }
}

/// The WAL stream's answer: the staged WAL is durable up to `durable_lsn`.
pub fn wal_durable(durable_lsn: Lsn) -> Message {
    Message::WalDurable { durable_lsn }
}

#[cfg(test)]
#[path = "target_tests.rs"]
mod tests;
