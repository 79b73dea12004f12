//! Fuzz target bodies for the protocol machines: [`TargetConversation`] and
//! [`SourceConversation`], each fed a script of peer messages and engine events, with an
//! honest driver that carries out every action the machine asks for.
//!
//! What it does: reads the input as lines after one flags byte. `m<json>` is a peer message
//! (lines that do not decode are skipped, as a frame that fails would close the stream),
//! `e` the peer's end of stream, and the other letters engine events (below). After each call
//! the driver drains the actions, checks there are no more than the machine promises, and
//! answers each as the engine would. Invariants: nothing panics, and an honest driver never
//! gets [`ConversationError::Misuse`] (that would be a bug of the machine, not of the peer).
//!
//! What it does not: model time beyond what a script says, or the WAL stream's machine.

use std::collections::VecDeque;

use crate::ids::{Lsn, MigrationId, NodeId, VShardId};
use crate::message::{ChunkRef, Message, Offer, OfferFile};
use crate::path::RelPath;
use crate::proto::conversation::ConversationError;
use crate::proto::source::{CopyPlan, SourceAction, SourceConversation, SourceState, ACTIONS_MAX_COUNT};
use crate::proto::target::{Admitted, ChunkEvent, FenceAnswer, TargetAction, TargetConversation};
use crate::session::{ChunkSpan, ChunkVerdict, TargetSession};

/// Chunk length of the source's offer (the smallest allowed, so scripts stay short).
pub const CHUNK_LEN_BYTES: u32 = crate::limits::CHUNK_LEN_MIN_BYTES;
/// Base LSN of the source's offer.
pub const BASE_LSN: u64 = 100;

fn node(name: &str) -> NodeId {
    NodeId::new(name.to_owned()).expect("a valid node id")
}

/// The offer the source target copies: a file of two chunks, one of a partial chunk, and an
/// empty one.
pub fn source_offer(wal: bool) -> Offer {
    let file =
        |path: &str, size_bytes: u64| OfferFile { path: RelPath::new(path.to_owned()).expect("path"), size_bytes };
    Offer {
        migration_id: MigrationId::new("m1".to_owned()).expect("id"),
        vshard_id: VShardId(7),
        base_lsn: Lsn(BASE_LSN),
        chunk_len_bytes: CHUNK_LEN_BYTES,
        files: vec![file("L0/a.seg", u64::from(CHUNK_LEN_BYTES) + 10), file("L0/b.seg", 10), file("L1/c.seg", 0)],
        db_meta: serde_json::Value::Null,
        wal,
    }
}

/// The CRC32C the source's driver "reads" for a chunk (any fixed function of its place).
pub fn chunk_crc(chunk: ChunkRef) -> u32 {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&chunk.file_index.to_le_bytes());
    bytes[4..].copy_from_slice(&chunk.chunk_index.to_le_bytes());
    crate::crc32c(&bytes)
}

/// Decimal arguments of an event line (`c 0 4096 10 1234`); `None` when one does not parse.
fn args<const N: usize>(line: &[u8]) -> Option<[u64; N]> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_ascii_whitespace();
    let mut out = [0u64; N];
    for slot in &mut out {
        *slot = words.next()?.parse().ok()?;
    }
    Some(out)
}

fn honest<T>(result: Result<T, ConversationError>) -> Result<T, ConversationError> {
    if let Err(e @ ConversationError::Misuse { .. }) = &result {
        panic!("an honest driver was told it misused the machine: {e}");
    }
    result
}

/// The target's conversation. Flags: bit 0 admits the offer as already staged, bit 1
/// cancels every fence. Events: `c <file_index> <offset> <len> <crc>` a chunk header and
/// its body's CRC (checked, then written or found duplicate).
pub fn target(data: &[u8]) {
    let _ = run_target(data);
}

/// [`target`], returning what the machine did: the names of the messages it sent, and
/// `finish` when it finished its stream.
pub fn run_target(data: &[u8]) -> Vec<&'static str> {
    let mut log = Vec::new();
    let Some((flags, script)) = data.split_first() else { return log };
    let mut machine = TargetConversation::new(node("target"), 8 << 10);
    let mut work = VecDeque::new();
    for line in script.split(|b| *b == b'\n') {
        let step = match line.split_first() {
            Some((b'm', json)) => match Message::decode(json) {
                Ok(message) => machine.handle_message(Some(message)),
                Err(_) => continue,
            },
            Some((b'e', _)) => machine.handle_message(None),
            Some((b'c', rest)) => {
                let Some([file_index, offset, len, crc]) = args::<4>(rest) else { continue };
                let (Ok(file_index), Ok(len), Ok(crc)) =
                    (u32::try_from(file_index), u32::try_from(len), u32::try_from(crc))
                else {
                    continue;
                };
                match honest(machine.check_chunk(file_index, offset, len)) {
                    Ok(ChunkVerdict::Write { chunk_index }) => {
                        let chunk = ChunkRef { file_index, chunk_index };
                        machine.handle_chunks(&[ChunkEvent::Written { chunk, crc32c: crc, len_bytes: len }])
                    }
                    Ok(ChunkVerdict::Duplicate { chunk_index }) => {
                        machine.handle_chunks(&[ChunkEvent::Duplicate(ChunkRef { file_index, chunk_index })])
                    }
                    Err(_) => return log,
                }
            }
            _ => continue,
        };
        if honest(step).is_err() || drive_target(&mut machine, &mut work, *flags, &mut log).is_err() {
            return log;
        }
    }
    log
}

/// Drains and answers actions until none is left; `Err` when the conversation is over.
fn drive_target(
    machine: &mut TargetConversation,
    work: &mut VecDeque<TargetAction>,
    flags: u8,
    log: &mut Vec<&'static str>,
) -> Result<(), ()> {
    take_target_actions(machine, work);
    while let Some(action) = work.pop_front() {
        let report = match action {
            TargetAction::Send(message) => {
                log.push(message.name());
                Ok(())
            }
            TargetAction::Sync | TargetAction::CarryChunks | TargetAction::CommitFenced { .. } => Ok(()),
            TargetAction::Admit(offer) => {
                let admitted = if flags & 1 == 1 {
                    Admitted::AlreadyStaged { bytes_resent: 0 }
                } else {
                    Admitted::Receive { session: TargetSession::new(&offer) }
                };
                machine.handle_admitted(admitted)
            }
            TargetAction::Join { .. } | TargetAction::Release { .. } | TargetAction::Abort { .. } => {
                machine.handle_answered()
            }
            TargetAction::FinalizeFile { done, .. } => machine.handle_file_finalized(done.file_index),
            TargetAction::StageBase { bytes_resent, .. } => machine.handle_base_written(bytes_resent),
            TargetAction::Commit { .. } => machine.handle_committed(),
            TargetAction::Fence(request) => machine.handle_fence_answer(if flags & 2 == 2 {
                FenceAnswer::Cancelled { reason: "the database did not ingest in time".to_owned() }
            } else {
                FenceAnswer::Fenced { durable_lsn: request.final_lsn, commit_us: 1, apply_wait_us: 0 }
            }),
            TargetAction::Finish => {
                log.push("finish");
                return Err(());
            }
        };
        honest(report).map_err(|_| ())?;
        take_target_actions(machine, work);
    }
    Ok(())
}

fn take_target_actions(machine: &mut TargetConversation, work: &mut VecDeque<TargetAction>) {
    let files_count = machine.offer().map_or(0, |o| o.files.len());
    let before = work.len();
    work.extend(std::iter::from_fn(|| machine.poll_action()));
    let queued = work.len() - before;
    assert!(queued <= files_count + 4, "one call queued {queued} actions for {files_count} files");
}

/// The source's conversation. Flags pick what it is for: 0 an offline copy (commit), 1 a
/// live copy (WAL and cut-over), 2 a copy with a WAL and no cut-over, 3 a join, 4 a release,
/// 5 an abort; bit 3 drops every fence the target answered instead of keeping it. Events:
/// `t <ns>` time passes and the timer fires, `f <final_lsn> <through_lsn, 0 for none>
/// <deadline_in_ns>` the daemon fences (taken only while the machine serves the cut-over).
pub fn source(data: &[u8]) {
    let _ = run_source(data);
}

/// [`source`], returning what the machine did: the names of the messages it sent, `answered`
/// and `finish` (`finish-committed`, `finish-fenced`) as they happen.
pub fn run_source(data: &[u8]) -> Vec<&'static str> {
    let Some((flags, script)) = data.split_first() else { return Vec::new() };
    let me = node("source");
    let id = || MigrationId::new("m1".to_owned()).expect("id");
    let copy = |plan: CopyPlan| SourceConversation::copy(&me, source_offer(plan.wal), plan);
    let mut machine = match flags % 8 {
        0 => copy(CopyPlan { wal: false, cutover: false, commit: true }),
        1 => copy(CopyPlan { wal: true, cutover: true, commit: false }),
        2 => copy(CopyPlan { wal: true, cutover: false, commit: false }),
        3 => SourceConversation::join(&me, id()),
        4 => SourceConversation::release(&me, id(), Lsn(BASE_LSN + 50), Some(Lsn(BASE_LSN + 40))),
        _ => SourceConversation::abort(&me, id(), "by the coordinator".to_owned()),
    };
    let keep_fences = flags & 8 == 0;
    let mut driver = SourceDriver { now_ns: 0, sending: false, keep_fences, log: Vec::new() };
    if driver.drive(&mut machine).is_err() {
        return driver.log;
    }
    for line in script.split(|b| *b == b'\n') {
        let now_ns = driver.now_ns;
        let step = match line.split_first() {
            Some((b'm', json)) => match Message::decode(json) {
                Ok(message) => machine.handle_message(Some(message), now_ns),
                Err(_) => continue,
            },
            Some((b'e', _)) => machine.handle_message(None, now_ns),
            Some((b't', rest)) => {
                let Some([ns]) = args::<1>(rest) else { continue };
                driver.now_ns = now_ns.saturating_add(ns);
                machine.handle_timeout(driver.now_ns)
            }
            Some((b'f', rest)) => {
                let Some([final_lsn, through, deadline_in_ns]) = args::<3>(rest) else { continue };
                if machine.state() != SourceState::CutOver {
                    continue;
                }
                let through_lsn = (through != 0).then_some(Lsn(through));
                let deadline_ns = now_ns.saturating_add(deadline_in_ns);
                machine.handle_fence(Lsn(final_lsn), through_lsn, 1_000, deadline_ns, now_ns)
            }
            _ => continue,
        };
        if honest(step).is_err() || driver.drive(&mut machine).is_err() {
            return driver.log;
        }
    }
    driver.log
}

#[derive(Debug)]
struct SourceDriver {
    now_ns: u64,
    /// The chunk streams are open: they take chunks while the machine hands them out.
    sending: bool,
    keep_fences: bool,
    log: Vec<&'static str>,
}

impl SourceDriver {
    /// Drains and answers actions, and sends chunks, until nothing is left; `Err` when the
    /// conversation is over.
    fn drive(&mut self, machine: &mut SourceConversation) -> Result<(), ()> {
        let mut work = VecDeque::new();
        loop {
            let before = work.len();
            work.extend(std::iter::from_fn(|| machine.poll_action()));
            assert!(work.len() - before <= ACTIONS_MAX_COUNT, "the action queue is over its limit");
            if let Some(action) = work.pop_front() {
                self.answer(machine, action)?;
                continue;
            }
            if !self.sending || machine.state() != SourceState::SendingBase {
                return Ok(());
            }
            let Some(span) = machine.poll_chunk(self.now_ns) else { return Ok(()) };
            honest(machine.handle_chunk_read(&span, chunk_crc(span.chunk))).map_err(|_| ())?;
        }
    }

    fn answer(&mut self, machine: &mut SourceConversation, action: SourceAction) -> Result<(), ()> {
        let report = match action {
            SourceAction::Send(message) | SourceAction::SendFileDone { message, .. } => {
                self.log.push(message.name());
                Ok(())
            }
            SourceAction::Answered => {
                self.log.push("answered");
                Ok(())
            }
            SourceAction::Accepted { .. }
            | SourceAction::StartWal
            | SourceAction::BaseStaged { .. }
            | SourceAction::ServeCutOver
            | SourceAction::FenceCancelled { .. }
            | SourceAction::FenceTimedOut { .. } => Ok(()),
            SourceAction::Recheck(spans) => {
                spans.iter().try_for_each(|span: &ChunkSpan| machine.handle_chunk_read(span, chunk_crc(span.chunk)))
            }
            SourceAction::SendChunks => {
                self.sending = true;
                Ok(())
            }
            SourceAction::FinishWal => machine.handle_wal_finished(Lsn(BASE_LSN + 10)),
            SourceAction::Fenced { .. } if self.keep_fences => machine.handle_fence_kept(),
            SourceAction::Fenced { .. } => machine.handle_fence_dropped(),
            SourceAction::Finish { committed, fenced, .. } => {
                self.log.push(match (committed, fenced) {
                    (true, _) => "finish-committed",
                    (_, true) => "finish-fenced",
                    _ => "finish",
                });
                return Err(());
            }
        };
        honest(report).map(|_| ()).map_err(|_| ())
    }
}
