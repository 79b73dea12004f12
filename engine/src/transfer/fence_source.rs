//! The source's side of the cut-over fence, inside a running live copy.
//!
//! What it does: once the base is staged, a live copy (a WAL stream, no offline commit) waits
//! for [`FenceCommand`]s from its daemon ([`CutOver`]). For each: it drains (waits until its
//! tail has read every record up to `final_lsn`, [`ferry_wire::fence::drain_check`]), then has
//! the copy's machine ([`ferry_wire::proto::source`]) ask the target to mark the staging
//! `fenced` once its staged WAL is durable up to the last selected record (`Fence` with
//! `through_lsn` on the control stream: the target's WAL fdatasync is the one flush before its
//! answer, without a round trip back to the source first; its MANIFEST commit follows the
//! answer), feeds the machine the target's answer and
//! the fence's deadline timer, and answers the daemon with the stamps of each step. A drain or a target answer that is not done by the deadline is cancelled
//! ([`FenceFailure::Cancelled`]) and a vShard record above `final_lsn` is a violation
//! ([`FenceFailure::Violated`]): either way the copy goes on streaming (the migration is back in
//! `WalCatchUp`) and waits for the next command. A fence that succeeds ends the copy: nothing
//! more is streamed.
//!
//! What it does not: pause writers (the coordinator does), measure the whole pause (the daemon
//! does, from these stamps and the coordinator's), release (a connection of its own), or
//! decide what the target's answer means and which late answers to skip (the machine does).
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

use ferry_wire::fence::{drain_check, Drain, DrainState};
use ferry_wire::proto::source::{SourceAction, SourceConversation};
use ferry_wire::Lsn;
use quinn::SendStream;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::framing::{received, write_control};
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

/// A fence the target was asked for: the daemon's reply and when the drain ended.
type Asked = (oneshot::Sender<Result<FenceDone, FenceFailure>>, u64);

/// Streams and serves fence commands until one fence holds or the copy fails; returns the
/// machine's next action (the copy's end) for the copy's driver.
pub(super) async fn serve(
    cutover: &CutOver,
    wal: &mut WalRun,
    send: &mut SendStream,
    messages: &mut Messages,
    machine: &std::sync::Mutex<SourceConversation>,
) -> Result<SourceAction, TransferError> {
    cutover.stream.set(wal.shared.clone());
    let mut asked: Option<Asked> = None;
    loop {
        let next = lock(machine).poll_action();
        if let Some(action) = next {
            match action {
                SourceAction::Send(message) => write_control(send, &message).await.inspect_err(|e| {
                    tracing::warn!("fence cancelled: {e}");
                })?,
                SourceAction::Fenced { final_lsn, durable_lsn, commit_us, apply_wait_us } => {
                    let target_durable_at_ns = monotonic_ns();
                    let (reply, drained_at_ns) = asked.take().ok_or_else(|| no_fence("fenced"))?;
                    let done = FenceDone {
                        final_lsn,
                        durable_lsn,
                        drained_at_ns,
                        target_durable_at_ns,
                        commit_us,
                        apply_wait_us,
                    };
                    answer_fenced(done, reply, wal, machine)?;
                }
                SourceAction::FenceCancelled { reason, .. } => {
                    let (reply, _) = asked.take().ok_or_else(|| no_fence("fence_cancelled"))?;
                    wal.shared.lift_ceiling();
                    let _ =
                        reply.send(Err(FenceFailure::Cancelled(format!("the target cancelled the fence: {reason}"))));
                }
                SourceAction::FenceTimedOut { final_lsn } => {
                    // No answer within the budget. Cancelling is safe even if the target fences
                    // later: only a release makes it authoritative, and the target releases only
                    // at the final_lsn of a fence the source recorded as completed.
                    let (reply, _) = asked.take().ok_or_else(|| no_fence("fence timeout"))?;
                    wal.shared.lift_ceiling();
                    let why =
                        format!("the target did not answer the fence at final_lsn {final_lsn} within the pause budget");
                    tracing::warn!("{why}");
                    let _ = reply.send(Err(FenceFailure::Cancelled(why)));
                }
                other => return Ok(other),
            }
            continue;
        }
        let timeout_ns = lock(machine).poll_timeout();
        tokio::select! {
            ended = wal.ended(), if wal.running() && asked.is_none() => {
                ended?;
                return Err(TransferError::Local("the WAL stream ended before the cut-over".into()));
            }
            message = messages.recv() => {
                let result = received(message)
                    .and_then(|message| Ok(lock(machine).handle_message(message, monotonic_ns())?));
                if let Err(e) = result {
                    if let Some((reply, _)) = asked.take() {
                        let why = format!("lost the target during the fence: {e}");
                        let _ = reply.send(Err(FenceFailure::Cancelled(why)));
                    }
                    return Err(e);
                }
            }
            () = tokio::time::sleep_until(instant_at(timeout_ns.unwrap_or(0))), if timeout_ns.is_some() => {
                lock(machine).handle_timeout(monotonic_ns())?;
            }
            command = cutover.next(), if asked.is_none() => {
                let Some(command) = command else {
                    return Err(TransferError::Local("the daemon stopped asking for the cut-over".into()));
                };
                asked = start(command, wal, machine).await?;
            }
        }
    }
}

/// The target fenced: the daemon gets the completed fence, unless a record past `final_lsn`
/// was read meanwhile (the writer did not pause: the fence is violated) or the daemon gave up
/// on it; in both of those, streaming goes on.
fn answer_fenced(
    done: FenceDone,
    reply: oneshot::Sender<Result<FenceDone, FenceFailure>>,
    wal: &WalRun,
    machine: &std::sync::Mutex<SourceConversation>,
) -> Result<(), TransferError> {
    let final_lsn = done.final_lsn;
    // Read while the target fenced: the writer did not pause.
    if let Some(lsn) = violation(&wal.shared, final_lsn) {
        // The target's staging goes back to copying when that record reaches it
        // (the ceiling is lifted).
        tracing::warn!(%final_lsn, %lsn, "fence violated after the drain");
        wal.shared.lift_ceiling();
        let _ = reply.send(Err(FenceFailure::Violated(lsn)));
        lock(machine).handle_fence_dropped()?;
        return Ok(());
    }
    // The daemon's receipt is the commit point: one that gave up meanwhile has put
    // the migration back in WalCatchUp, so streaming goes on.
    if reply.send(Ok(done)).is_ok() {
        lock(machine).handle_fence_kept()?;
    } else {
        tracing::warn!(%final_lsn, "the target fenced after the daemon gave up on the fence; streaming goes on");
        wal.shared.lift_ceiling();
        lock(machine).handle_fence_dropped()?;
    }
    Ok(())
}

/// Drains for the daemon's fence and, once drained, asks the target to fence (through the
/// machine). `None`: the fence ended without asking (its deadline passed, the drain failed).
async fn start(
    command: FenceCommand,
    wal: &mut WalRun,
    machine: &std::sync::Mutex<SourceConversation>,
) -> Result<Option<Asked>, TransferError> {
    let FenceCommand { final_lsn, deadline_ns, apply_wait_max_us, reply } = command;
    if reply.is_closed() || monotonic_ns() >= deadline_ns {
        // The daemon gave up on it already (this copy was reconnecting): never start it.
        let _ = reply.send(Err(FenceFailure::Cancelled("the fence's deadline passed before it started".into())));
        return Ok(None);
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
            return Ok(None);
        }
    };
    lock(machine).handle_fence(final_lsn, through_lsn, apply_wait_max_us, deadline_ns, drained_at_ns)?;
    Ok(Some((reply, drained_at_ns)))
}

fn lock(machine: &std::sync::Mutex<SourceConversation>) -> std::sync::MutexGuard<'_, SourceConversation> {
    machine.lock().unwrap_or_else(|e| e.into_inner())
}

fn no_fence(action: &str) -> TransferError {
    TransferError::Local(format!("the machine reported {action} while no fence was asked for"))
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
