//! The cut-over of an outbound migration: `prepare_cutover`, `fence`, `release` (DESIGN
//! sections 2, 4 and 5).
//!
//! What it does: `prepare_cutover` estimates the pause from measured figures (the WAL stream's
//! lag, rate and group commit round trip, the target's MANIFEST commit time) and refuses with
//! `PauseBudgetExceeded` over the budget. `fence` stamps its receipt, records the phase
//! `AtomicCutOver` with `final_lsn` (written while the drain runs, awaited before the answer),
//! hands a [`FenceCommand`] to the running copy ([`crate::transfer::fence_source`]) with the deadline
//! `writes_paused_at_ns + budget - release reserve`, and answers with the drain and target
//! times; a cancelled or violated fence puts the migration back in `WalCatchUp`. `release`
//! computes the pause and its parts ([`PauseStamps::report`]), records `Completed` durably (the
//! point of no return), then tells the target (a connection of its own); a release the target
//! did not confirm is told again in the background until it confirms (started at daemon start
//! and by the failed release itself, one loop at a time: [`RetellGate`]), and at the next
//! `release` call.
//!
//! What it does not: pause or resume writers (the coordinator does), or wait for the catch-up.
//!
//! Invariants: fence and release are idempotent for the same (id, final_lsn); a failed fence
//! never leaves the migration in `AtomicCutOver`; the release record is durable before the
//! target is told.

use std::sync::Arc;

use ferry_wire::api::{FenceParams, FenceResult, PrepareResult, ReleaseResult};
use ferry_wire::fence::{estimate_pause_us, fence_deadline_ns, EstimateInputs, PauseStamps};
use ferry_wire::proto::outbound::{FenceStep, Lifecycle, ReleaseStep, Released};
use ferry_wire::{Lsn, MigrationId};
use tokio::sync::{mpsc, oneshot};

use super::{refusal, Outbound, OutboundError};
use crate::clock::{instant_at, monotonic_ns};
use crate::transfer::fence_source::{FenceCommand, FenceDone, FenceFailure};
use crate::transfer::walsend::Holder;

/// What recovery says of a Completed migration whose release the target has not confirmed.
pub const RELEASE_PENDING_OUTCOME: &str =
    "kept: Completed; the target has not confirmed the release: it is told in the background (or call migration.release)";
/// The first and the longest wait between two attempts to tell the target of a release.
const RETELL_WAIT_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const RETELL_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The part of the budget kept for what follows the fence's answer (the coordinator's routing
/// flip and resume): a tenth of the budget, at most this much.
pub const RELEASE_RESERVE_MAX_US: u64 = 2_000;

/// How long past the fence's deadline the daemon waits for the copy's answer before it gives
/// the fence up (the copy itself cancels at the deadline when it is serving fences).
const ANSWER_GRACE_NS: u64 = 50_000_000;

/// The estimate's inputs: the running stream's live figures (the progress channel's, when no
/// stream runs yet) and the slowest MANIFEST commit the target reported.
fn estimate_inputs(entry: &super::Entry) -> EstimateInputs {
    let p = *entry.progress.borrow();
    let (lag_bytes, wal_rate_bytes_per_sec, group_commit_us) =
        entry.stream.read().unwrap_or((p.wal_lag_bytes, p.wal_rate_bytes_per_sec, p.wal_group_commit_us));
    EstimateInputs { lag_bytes, wal_rate_bytes_per_sec, group_commit_us, manifest_commit_us: entry.manifest_commit_us }
}

fn release_reserve_us(budget_us: u64) -> u64 {
    (budget_us / 10).min(RELEASE_RESERVE_MAX_US)
}

/// Hands the fence to the migration's copy and waits for its answer.
async fn ask_copy(
    sender: Option<mpsc::Sender<FenceCommand>>,
    command: FenceCommand,
    reply: oneshot::Receiver<Result<FenceDone, FenceFailure>>,
    deadline_ns: u64,
) -> Result<FenceDone, FenceFailure> {
    let answer = async {
        match sender {
            Some(sender) if sender.send(command).await.is_ok() => {
                reply.await.unwrap_or_else(|_| Err(FenceFailure::Cancelled("the migration's copy stopped".into())))
            }
            _ => Err(FenceFailure::Cancelled("the migration's copy is not running".into())),
        }
    };
    // The copy answers by the deadline itself; past it (plus a grace for its answer to
    // arrive) it is not serving fences, e.g. reconnecting. Dropping the reply then
    // tells it the fence was given up, so it never completes it.
    let given_up_at = instant_at(deadline_ns.saturating_add(ANSWER_GRACE_NS));
    tokio::time::timeout_at(given_up_at, answer).await.unwrap_or_else(|_| {
        Err(FenceFailure::Cancelled(
            "the migration's copy did not take the fence within the pause budget (it may be reconnecting to the target)".into(),
        ))
    })
}

fn elapsed_us(from_ns: u64, to_ns: u64) -> u64 {
    to_ns.saturating_sub(from_ns) / 1_000
}

impl Outbound {
    /// `migration.prepare_cutover`: the estimated pause, or `PauseBudgetExceeded`.
    pub fn prepare_cutover(&self, id: &MigrationId) -> Result<PrepareResult, OutboundError> {
        let mut entries = self.entries();
        let entry = entries.get_mut(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
        cutover_possible(id, &entry.life, entry.cutover.is_some())?;
        let p = *entry.progress.borrow();
        let inputs = estimate_inputs(entry);
        let estimated_pause_us = estimate_pause_us(&inputs);
        let budget_us = entry.params.write_pause_budget_us;
        if estimated_pause_us > budget_us {
            return Err(OutboundError::PauseBudgetExceeded { estimated_us: estimated_pause_us, budget_us });
        }
        entry.estimate_us = Some(estimated_pause_us);
        let lag_lsn = p.wal_source_lsn.unwrap_or(0).saturating_sub(p.wal_durable_lsn.unwrap_or(0));
        Ok(PrepareResult { estimated_pause_us, budget_us, lag_lsn, lag_bytes: inputs.lag_bytes, inputs })
    }

    /// `migration.fence`.
    pub async fn fence(&self, id: &MigrationId, params: FenceParams) -> Result<FenceResult, OutboundError> {
        let received_ns = monotonic_ns();
        let paused_ns = params.writes_paused_at_ns.unwrap_or(received_ns);
        if paused_ns > received_ns {
            return Err(OutboundError::InvalidParams(format!(
                "writes_paused_at_ns {paused_ns} is ahead of this host's CLOCK_MONOTONIC ({received_ns}): pass the source host's monotonic clock"
            )));
        }
        let final_lsn = Lsn(params.final_lsn);
        let (sender, budget_us, estimate_us) = {
            let mut entries = self.entries();
            let entry = entries.get_mut(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
            // A fence the lifecycle keeps answers first (the same one again, or a refusal);
            // only a new fence needs the running copy.
            if entry.life.fence().is_none() {
                cutover_possible(id, &entry.life, entry.cutover.is_some())?;
                if final_lsn.0 < entry.params.base_lsn {
                    return Err(OutboundError::InvalidParams(format!(
                        "final_lsn {final_lsn} is below the migration's base_lsn {}",
                        entry.params.base_lsn
                    )));
                }
            }
            let budget_us = entry.params.write_pause_budget_us;
            let estimate_us = entry.estimate_us.unwrap_or_else(|| estimate_pause_us(&estimate_inputs(entry)));
            let stamps = PauseStamps {
                writes_paused_at_ns: paused_ns,
                fence_received_at_ns: received_ns,
                ..PauseStamps::default()
            };
            match entry.life.fence_requested(final_lsn, stamps, estimate_us).map_err(|e| refusal(id, e))? {
                FenceStep::Already(result) => return Ok(result),
                FenceStep::Started => {}
            }
            (entry.cutover.clone(), budget_us, estimate_us)
        };
        // The record (AtomicCutOver at final_lsn) is written while the copy drains.
        let record = self.persist(id);
        let deadline_ns = fence_deadline_ns(paused_ns, budget_us, release_reserve_us(budget_us));
        let (reply_tx, reply_rx) = oneshot::channel();
        let command = FenceCommand {
            final_lsn,
            deadline_ns,
            apply_wait_max_us: elapsed_us(monotonic_ns(), deadline_ns),
            reply: reply_tx,
        };
        let asked = ask_copy(sender, command, reply_rx, deadline_ns);
        let (recorded, outcome) = tokio::join!(record, asked);
        let outcome = match (recorded, outcome) {
            (Err(e), Ok(_)) => Err(FenceFailure::Cancelled(format!("the source could not record the fence: {e}"))),
            (_, outcome) => outcome,
        };
        match outcome {
            Ok(done) => {
                let answered_ns = monotonic_ns();
                let result = FenceResult {
                    final_lsn: final_lsn.0,
                    target_durable_lsn: done.durable_lsn.0,
                    drain_us: elapsed_us(received_ns, done.drained_at_ns),
                    target_durable_us: elapsed_us(done.drained_at_ns, done.target_durable_at_ns)
                        .saturating_sub(done.apply_wait_us),
                    apply_wait_us: done.apply_wait_us,
                    paused_so_far_us: elapsed_us(paused_ns, answered_ns),
                    estimate_us,
                    budget_us,
                };
                let mut entries = self.entries();
                if let Some(entry) = entries.get_mut(id) {
                    entry.manifest_commit_us = entry.manifest_commit_us.max(done.commit_us);
                    entry.staging_state = Some("fenced".into());
                    entry.life.fence_answered(done.drained_at_ns, done.target_durable_at_ns, result);
                }
                Ok(result)
            }
            Err(failure) => Err(self.fence_failed(id, failure).await),
        }
    }

    /// A fence that did not complete: the lifecycle is told and recorded, and the failure
    /// becomes the caller's error.
    async fn fence_failed(&self, id: &MigrationId, failure: FenceFailure) -> OutboundError {
        {
            let mut entries = self.entries();
            if let Some(entry) = entries.get_mut(id) {
                entry.life.fence_failed();
            }
        }
        if let Err(e) = self.persist(id).await {
            tracing::error!(migration = %id, "{e}");
        }
        match failure {
            FenceFailure::Cancelled(reason) => OutboundError::CutOverCancelled(reason),
            FenceFailure::Violated(lsn) => OutboundError::FenceViolated(lsn.0),
        }
    }

    /// `migration.release`: the pause, once the release is recorded and told to the target.
    pub async fn release(
        self: &Arc<Self>,
        id: &MigrationId,
        writes_resumed_at_ns: Option<u64>,
    ) -> Result<ReleaseResult, OutboundError> {
        let resumed_ns = writes_resumed_at_ns.unwrap_or_else(monotonic_ns);
        let step = {
            let mut entries = self.entries();
            let entry = entries.get_mut(id).ok_or_else(|| OutboundError::NotFound(id.clone()))?;
            let (budget_us, base_lsn) = (entry.params.write_pause_budget_us, Lsn(entry.params.base_lsn));
            let estimate_us = entry.estimate_us.unwrap_or(0);
            entry.life.release_requested(resumed_ns, budget_us, base_lsn, estimate_us).map_err(|e| refusal(id, e))?
        };
        // Whether this call completes the migration (a repeated call must not count the pause
        // again).
        let (Released { final_lsn, pause, fenced_durable_lsn }, completes) = match step {
            ReleaseStep::ConfirmRecovered(released) => return self.release_recovered(id, released).await,
            ReleaseStep::Record(released) => (released, true),
            ReleaseStep::Already(released) => (released, false),
        };
        let already_told = self.entries().get(id).is_some_and(|e| e.life.target_told());
        if !already_told {
            // The point of no return: durable on the source before the target hears of it.
            if let Err(e) = self.persist(id).await {
                if let Some(entry) = self.entries().get_mut(id) {
                    entry.life.release_unrecorded();
                }
                return Err(OutboundError::Local(format!("the release could not be recorded: {e}")));
            }
            if completes {
                crate::metrics::observe_pause_us(pause.pause_duration_us);
            }
            self.tell_release(id, final_lsn, fenced_durable_lsn).await.map_err(|e| {
                // Told again in the background once the target is reachable (a partition that
                // heals), not only at the next call or the next daemon start.
                tokio::spawn(self.clone().tell_pending_releases());
                OutboundError::Local(format!(
                    "the release is recorded on the source (the migration is Completed), but the target has not confirmed it (it may not have received it, or its answer was lost): {e}; it is told again in the background until it answers (or call migration.release again)"
                ))
            })?;
        }
        Ok(ReleaseResult { final_lsn: final_lsn.0, pause_duration_us: pause.pause_duration_us, pause })
    }

    /// A fence from before a restart: only the target knows whether it completed (it releases
    /// only a staging fenced at exactly this `final_lsn`); once it confirms, the source records
    /// the release.
    async fn release_recovered(&self, id: &MigrationId, released: Released) -> Result<ReleaseResult, OutboundError> {
        let Released { final_lsn, pause, fenced_durable_lsn } = released;
        self.tell_release(id, final_lsn, fenced_durable_lsn).await.map_err(|e| {
            OutboundError::Refused(format!(
                "migration {id} was in a cut-over at final_lsn {final_lsn} when this daemon restarted, and the target does not confirm that fence ({e}): fence it again"
            ))
        })?;
        if let Some(entry) = self.entries().get_mut(id) {
            entry.life.recovered_release_confirmed(released);
        }
        if let Err(e) = self.persist(id).await {
            tracing::error!(migration = %id, "the release (confirmed by the target) could not be recorded: {e}");
        }
        crate::metrics::observe_pause_us(pause.pause_duration_us);
        Ok(ReleaseResult { final_lsn: final_lsn.0, pause_duration_us: pause.pause_duration_us, pause })
    }

    /// Tells the target of every release it has not confirmed (found at daemon start, or a
    /// release call that could not tell it), again and again with a growing wait while it
    /// cannot be reached; returns once all are told (a `migration.release` call or
    /// `migration.forget` meanwhile also settles one). Returns at once if another such loop
    /// runs: that one tells them.
    pub async fn tell_pending_releases(self: Arc<Self>) {
        if !self.retelling.enter() {
            return;
        }
        let mut wait = RETELL_WAIT_MIN;
        loop {
            let pending = self.pending_releases();
            if pending.is_empty() {
                if self.retelling.leave(|| !self.pending_releases().is_empty()) {
                    continue;
                }
                return;
            }
            for (id, Released { final_lsn, fenced_durable_lsn, .. }) in pending {
                match self.tell_release(&id, final_lsn, fenced_durable_lsn).await {
                    Ok(()) => {
                        tracing::info!(migration = %id, %final_lsn, "the target confirmed a release it had missed")
                    }
                    Err(e) => tracing::warn!(
                        migration = %id,
                        "the target could not be told of the release yet ({e}); retrying in {} s (or call migration.release)",
                        wait.as_secs()
                    ),
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETELL_WAIT_MAX);
        }
    }

    /// The released migrations whose target has not confirmed, with their release.
    fn pending_releases(&self) -> Vec<(MigrationId, Released)> {
        self.entries().iter().filter_map(|(id, e)| e.life.release_pending_whole().map(|r| (id.clone(), r))).collect()
    }

    /// Tells the target that `id` is released (with the durable LSN of the fence's answer,
    /// when known), records that it knows, and drops what the source held for the copy (its
    /// task, the held WAL links).
    pub(super) async fn tell_release(
        &self,
        id: &MigrationId,
        final_lsn: Lsn,
        fenced_durable_lsn: Option<Lsn>,
    ) -> Result<(), String> {
        let params = {
            let entries = self.entries();
            let entry = entries.get(id).ok_or_else(|| format!("no outbound migration {id}"))?;
            entry.params.clone()
        };
        let addr: std::net::SocketAddr = params.target_address.parse().map_err(|e| format!("target_address: {e}"))?;
        let node = params.target_node().map_err(|e| e.to_string())?;
        let (identity, tuning) = (self.identity(), &self.config.tuning);
        crate::transfer::request::request_release(&identity, tuning, addr, &node, id, final_lsn, fenced_durable_lsn)
            .await
            .map_err(|e| e.to_string())?;
        {
            let mut entries = self.entries();
            if let Some(entry) = entries.get_mut(id) {
                // The target is authoritative now: nothing more is streamed.
                if let Some(task) = entry.task.take() {
                    task.abort();
                }
                entry.life.target_confirmed_release();
                entry.staging_state = Some("released".into());
                entry.cutover = None;
            }
        }
        if let Err(e) = self.persist(id).await {
            // The target knows; a restart would tell it again, which it answers as done.
            tracing::error!(migration = %id, "{e}");
        }
        if let Some(dir) = params.wal_dir {
            let owned = id.clone();
            let _ = tokio::task::spawn_blocking(move || Holder::remove_all(std::path::Path::new(&dir), &owned)).await;
        }
        tracing::info!(migration = %id, %final_lsn, "released");
        Ok(())
    }
}

/// Whether a migration can be prepared or fenced now: its copy runs a live WAL stream, and
/// its lifecycle is in `WalCatchUp`.
fn cutover_possible(id: &MigrationId, life: &Lifecycle, live: bool) -> Result<(), OutboundError> {
    if !live {
        return Err(OutboundError::Refused(format!(
            "migration {id} has no live WAL stream to fence (started without wal_dir, offline, or its copy is not running)"
        )));
    }
    life.check_cutover().map_err(|e| refusal(id, e))
}

/// Lets one loop at a time tell targets of the releases they missed
/// ([`Outbound::tell_pending_releases`]): one starts at daemon start, another with each release
/// the target could not be told of; a second would only double the connections.
#[derive(Debug, Default)]
pub(super) struct RetellGate(std::sync::atomic::AtomicBool);

impl RetellGate {
    /// Whether the caller may run the loop (none runs).
    fn enter(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// For the running loop, which found nothing pending: it leaves, but goes on (returns
    /// true) when `pending` finds a release that failed meanwhile (its caller saw the gate
    /// held and left the release to this loop) and no other loop entered since.
    fn leave(&self, pending: impl Fn() -> bool) -> bool {
        self.0.store(false, std::sync::atomic::Ordering::Release);
        pending() && self.enter()
    }
}

#[cfg(test)]
mod tests {
    use super::RetellGate;

    #[test]
    fn one_retell_loop_at_a_time_and_none_missed_while_leaving() {
        let gate = RetellGate::default();
        assert!(gate.enter(), "the first loop runs");
        assert!(!gate.enter(), "a second one while it runs does not");
        // Nothing pending: the loop leaves, and the next failed release starts a new one.
        assert!(!gate.leave(|| false));
        assert!(gate.enter());
        // A release that failed while the loop was leaving: the loop goes on, holding the gate.
        assert!(gate.leave(|| true));
        assert!(!gate.enter());
        // ...unless another loop entered between its leaving and its look.
        let raced = RetellGate::default();
        assert!(raced.enter());
        assert!(!raced.leave(|| raced.enter()), "the loop that entered meanwhile tells it");
    }
}
