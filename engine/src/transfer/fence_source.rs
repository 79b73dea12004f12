//! The source's side of the cut-over fence, inside a running live copy.
//!
//! What it does: once the base is staged, a live copy (a WAL stream, no offline commit) waits
//! for [`FenceCommand`]s from its daemon ([`CutOver`]). For each: it drains (waits until its
//! tail has read every record up to `final_lsn`, [`ferry_wire::fence::drain_check`]), then asks
//! the target to mark the staging `fenced` once its staged WAL is durable up to the last
//! selected record (`Fence` with `through_lsn` on the control stream: the target's WAL
//! fdatasync and MANIFEST commit, without a round trip back to the source between them) and
//! answers with the stamps of each step. A drain or a target answer that is not done by the deadline is cancelled
//! ([`FenceFailure::Cancelled`]) and a vShard record above `final_lsn` is a violation
//! ([`FenceFailure::Violated`]): either way the copy goes on streaming (the migration is back in
//! `WalCatchUp`) and waits for the next command. A fence that succeeds ends the copy: nothing
//! more is streamed.
//!
//! What it does not: pause writers (the coordinator does), measure the whole pause (the daemon
//! does, from these stamps and the coordinator's), or release (a connection of its own).
//!
//! Invariants: from the fence's start no record above `final_lsn` is sent (a ceiling on the
//! WAL stream, lifted when the fence fails), so a writer resumed on the target right after the
//! answer never has records staged past the fence; the target fences only once every selected
//! record up to `final_lsn` is durable there (the `Fence` names the last one, read by the tail
//! before the `Fence` is sent); a vShard record above `final_lsn` read before the target's
//! answer fails the fence as violated; a fence whose answer is not back by
//! the deadline is cancelled (the target's late answer is skipped when it comes: answers come
//! in order on the control stream); a completed fence ends the copy only once the daemon has
//! taken the answer (a daemon that gave up has put the migration back in `WalCatchUp`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::fence::{drain_check, target_wait_us, Drain, DrainState};
use ferry_wire::message::Message;
use ferry_wire::Lsn;
use quinn::SendStream;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::framing::{unexpected, write_control};
use super::walrun::{Messages, WalRun};
use super::walsend::TailShared;
use super::TransferError;
use crate::clock::{instant_at, monotonic_ns};

/// Most fence commands queued for one copy (the daemon sends one at a time).
pub const COMMANDS_MAX_COUNT: usize = 4;
/// The drain re-checks at least this often (a safety net under the wake-ups).
const DRAIN_RECHECK: Duration = Duration::from_millis(1);

/// One fence, as the daemon asks it of the running copy.
#[derive(Debug)]
pub struct FenceCommand {
    pub final_lsn: Lsn,
    /// CLOCK_MONOTONIC ns: the drain is cancelled when it is not done by then.
    pub deadline_ns: u64,
    /// How long the target may wait for its database's ingest (0: it does not wait).
    pub apply_wait_max_us: u64,
    pub reply: oneshot::Sender<Result<FenceDone, FenceFailure>>,
}

/// A completed fence: the staging is `fenced` at `final_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceDone {
    pub final_lsn: Lsn,
    /// The target's durable LSN of the vShard's staged WAL.
    pub durable_lsn: Lsn,
    pub drained_at_ns: u64,
    pub target_durable_at_ns: u64,
    pub commit_us: u64,
    pub apply_wait_us: u64,
}

/// A fence that did not complete; the staging is as it was and streaming goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceFailure {
    /// `CutOverCancelled`: resume writes on the source; the fence may be tried again.
    Cancelled(String),
    /// `FenceViolated`: a record of the vShard above `final_lsn` was read on the source.
    Violated(Lsn),
}

/// The daemon's way into a running live copy (kept across reconnects of the copy).
#[derive(Debug, Clone)]
pub struct CutOver {
    commands: Arc<Mutex<mpsc::Receiver<FenceCommand>>>,
    /// The WAL stream's live figures (lag, rate, group commit), for `prepare_cutover`.
    pub stream: StreamFigures,
}

/// The running WAL stream's shared counters, readable by the daemon at any time (the
/// progress channel refreshes them only every 100 ms).
#[derive(Debug, Clone, Default)]
pub struct StreamFigures(Arc<std::sync::Mutex<Option<Arc<TailShared>>>>);

impl StreamFigures {
    pub(super) fn set(&self, shared: Arc<TailShared>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared);
    }

    /// (lag bytes, rate bytes/s, slowest recent group commit us), if a stream runs.
    pub fn read(&self) -> Option<(u64, u64, u64)> {
        let shared = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let lag_bytes =
            shared.queued_bytes.load(Ordering::Relaxed).saturating_add(shared.inflight_bytes.load(Ordering::Relaxed));
        Some((
            lag_bytes,
            shared.rate_bytes_per_sec.load(Ordering::Relaxed),
            shared.group_commit_us.load(Ordering::Relaxed),
        ))
    }
}

impl CutOver {
    /// A channel for the daemon's fence commands and the copy's end of it.
    pub fn channel() -> (mpsc::Sender<FenceCommand>, CutOver) {
        let (tx, rx) = mpsc::channel(COMMANDS_MAX_COUNT);
        (tx, CutOver { commands: Arc::new(Mutex::new(rx)), stream: StreamFigures::default() })
    }

    async fn next(&self) -> Option<FenceCommand> {
        self.commands.lock().await.recv().await
    }
}

/// Streams and serves fence commands until one fence succeeds (returns its `final_lsn`) or the
/// copy fails.
pub(super) async fn serve(
    cutover: &CutOver,
    wal: &mut WalRun,
    send: &mut SendStream,
    messages: &mut Messages,
) -> Result<Lsn, TransferError> {
    cutover.stream.set(wal.shared.clone());
    // Fences whose answer came too late: the target answers in order, so the next this many
    // answers belong to them and are skipped.
    let mut late_answers_count = 0u32;
    loop {
        let command = tokio::select! {
            ended = wal.ended(), if wal.running() => {
                ended?;
                return Err(TransferError::Local("the WAL stream ended before the cut-over".into()));
            }
            message = messages.recv() => {
                if is_fence_answer(&message) && late_answers_count > 0 {
                    late_answers_count -= 1;
                    continue;
                }
                return Err(unexpected_message("waiting for the cut-over", message));
            }
            command = cutover.next() => match command {
                Some(command) => command,
                None => return Err(TransferError::Local("the daemon stopped asking for the cut-over".into())),
            },
        };
        let FenceCommand { final_lsn, deadline_ns, apply_wait_max_us, reply } = command;
        if reply.is_closed() || monotonic_ns() >= deadline_ns {
            // The daemon gave up on it already (this copy was reconnecting): never start it.
            let _ = reply.send(Err(FenceFailure::Cancelled("the fence's deadline passed before it started".into())));
            continue;
        }
        // Nothing above final_lsn is sent from now on (lifted again if this fence fails).
        wal.shared.set_ceiling(final_lsn);
        let drained = match drain(wal, final_lsn, deadline_ns).await {
            Ok(drained) => drained,
            Err(e) => {
                // The stream failed (a lost connection is retried by the copy, which then
                // waits for the next fence here again).
                let why = format!("the WAL stream failed during the drain: {e}");
                let _ = reply.send(Err(FenceFailure::Cancelled(why)));
                return Err(e);
            }
        };
        let drained_at_ns = monotonic_ns();
        let through_lsn = match drained {
            Ok(through_lsn) => through_lsn,
            Err(failure) => {
                tracing::warn!(%final_lsn, "fence not completed: {failure:?}");
                wal.shared.lift_ceiling();
                let _ = reply.send(Err(failure));
                continue;
            }
        };
        let wait_max_us = target_wait_us(drained_at_ns, deadline_ns);
        let fence = Message::Fence {
            final_lsn,
            apply_wait_max_us: apply_wait_max_us.min(wait_max_us),
            through_lsn,
            wal_wait_max_us: wait_max_us,
        };
        write_control(send, &fence).await.inspect_err(|e| {
            tracing::warn!("fence cancelled: {e}");
        })?;
        let answer = tokio::time::timeout_at(instant_at(deadline_ns), async {
            loop {
                match messages.recv().await {
                    // Acks of the base may still trail; nothing else is expected.
                    Some(Ok(Some(Message::Acks { .. } | Message::FileStaged { .. }))) => {}
                    message if is_fence_answer(&message) && late_answers_count > 0 => late_answers_count -= 1,
                    other => return other,
                }
            }
        })
        .await;
        let target_durable_at_ns = monotonic_ns();
        // Read while the target fenced: the writer did not pause.
        match (answer, violation(&wal.shared, final_lsn)) {
            (Ok(Some(Ok(Some(Message::Fenced { .. })))), Some(lsn)) => {
                // The target's staging goes back to copying when that record reaches it (the
                // ceiling is lifted).
                tracing::warn!(%final_lsn, %lsn, "fence violated after the drain");
                wal.shared.lift_ceiling();
                let _ = reply.send(Err(FenceFailure::Violated(lsn)));
            }
            (Ok(Some(Ok(Some(Message::Fenced { durable_lsn, commit_us, apply_wait_us })))), None) => {
                let done =
                    FenceDone { final_lsn, durable_lsn, drained_at_ns, target_durable_at_ns, commit_us, apply_wait_us };
                // The daemon's receipt is the commit point: one that gave up meanwhile has put
                // the migration back in WalCatchUp, so streaming goes on.
                if reply.send(Ok(done)).is_ok() {
                    return Ok(final_lsn);
                }
                tracing::warn!(%final_lsn, "the target fenced after the daemon gave up on the fence; streaming goes on");
                wal.shared.lift_ceiling();
            }
            (Ok(Some(Ok(Some(Message::FenceCancelled { reason })))), _) => {
                wal.shared.lift_ceiling();
                let _ = reply.send(Err(FenceFailure::Cancelled(format!("the target cancelled the fence: {reason}"))));
            }
            (Ok(other), _) => {
                let e = unexpected_message("waiting for the target's fenced answer", other);
                let _ = reply.send(Err(FenceFailure::Cancelled(format!("lost the target during the fence: {e}"))));
                return Err(e);
            }
            (Err(_), _) => {
                // No answer within the budget. Cancelling is safe even if the target fences
                // later: only a release makes it authoritative, and the target releases only
                // at the final_lsn of a fence the source recorded as completed.
                late_answers_count += 1;
                wal.shared.lift_ceiling();
                let why =
                    format!("the target did not answer the fence at final_lsn {final_lsn} within the pause budget");
                tracing::warn!("{why}");
                let _ = reply.send(Err(FenceFailure::Cancelled(why)));
            }
        }
    }
}

fn is_fence_answer(message: &Option<Result<Option<Message>, TransferError>>) -> bool {
    matches!(message, Some(Ok(Some(Message::Fenced { .. } | Message::FenceCancelled { .. }))))
}

fn unexpected_message(when: &str, message: Option<Result<Option<Message>, TransferError>>) -> TransferError {
    match message {
        Some(Ok(Some(Message::Error { kind, message }))) => TransferError::Peer { kind, message },
        Some(Ok(Some(other))) => unexpected(when, Some(&other)),
        Some(Ok(None)) | None => TransferError::Connection("the target closed the control stream".into()),
        Some(Err(e)) => e,
    }
}

/// The vShard record above `final_lsn` the tail has read, if any.
fn violation(shared: &TailShared, final_lsn: Lsn) -> Option<Lsn> {
    Some(Lsn(shared.source_lsn.load(Ordering::Acquire))).filter(|lsn| *lsn > final_lsn)
}

/// What the tail has read: `scanned_lsn` first (stored last, with release ordering, by the
/// tail), so the last selected record read after it is at least as new.
fn drain_state(shared: &TailShared) -> DrainState {
    let scanned_lsn = Lsn(shared.scanned_lsn.load(Ordering::Acquire));
    DrainState { scanned_lsn, last_selected_lsn: Some(Lsn(shared.source_lsn.load(Ordering::Acquire))) }
}

/// Waits until the tail has read every record up to `final_lsn`; returns the last selected
/// one (the target fences once it is durable there). The outer error is the WAL stream's own
/// failure (the copy fails or reconnects with it).
async fn drain(
    wal: &mut WalRun,
    final_lsn: Lsn,
    deadline_ns: u64,
) -> Result<Result<Option<Lsn>, FenceFailure>, TransferError> {
    let shared = wal.shared.clone();
    // Wake when the tail offers final_lsn (or anything above it: a violation).
    shared.wake_at_lsn.store(final_lsn.0.max(1), Ordering::Relaxed);
    let deadline = tokio::time::sleep_until(instant_at(deadline_ns));
    tokio::pin!(deadline);
    let result = loop {
        let state = drain_state(&shared);
        match drain_check(final_lsn, &state) {
            Drain::Drained { through_lsn } => break Ok(through_lsn),
            Drain::Violated { lsn } => break Err(FenceFailure::Violated(lsn)),
            Drain::Waiting => {}
        }
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(DRAIN_RECHECK) => {}
            () = &mut deadline => {
                break Err(FenceFailure::Cancelled(format!(
                    "the drain to final_lsn {final_lsn} did not finish within the pause budget: the tail has read up to {} (last selected record {})",
                    state.scanned_lsn, state.last_selected_lsn.map_or(0, |l| l.0)
                )));
            }
            ended = wal.ended(), if wal.running() => {
                shared.wake_at_lsn.store(0, Ordering::Relaxed);
                ended?;
                return Err(TransferError::Local("the WAL stream ended before the cut-over".into()));
            }
        }
    };
    shared.wake_at_lsn.store(0, Ordering::Relaxed);
    Ok(result)
}
