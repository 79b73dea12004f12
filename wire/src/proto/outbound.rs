//! The source's outbound migration lifecycle: phases, fence attempts, the release recorded and
//! the release told, as one enum with explicit transitions.
//!
//! What it does: [`Lifecycle`] is where one outbound migration is. Each event the source daemon
//! sees (the base staged, a fence asked for, answered or cancelled, a release, an abort, a
//! restart) is a method that checks the current state and moves to the next one, or refuses
//! with an [`OutboundRefusal`] and leaves the state as it was. What the phase record and the
//! status show (phase, `final_lsn`, the fence's stamps, the pause) is read from the state, so
//! no combination of flags can disagree with it.
//!
//! ```text
//!  BaseCopy --base staged--> WalCatchUp{recovered?} --fence--> CutOver{fence, answer?}
//!                               ^   \                             |  answered: release
//!                               |    +--release (recovered fence, |  v
//!                               |       the target confirms)--> Completed{release?, target_told, fence?}
//!                               +----------cancelled-------------+
//!  any but Completed --fail/abort--> Failed;   offline commit --> Completed{release: None}
//! ```
//!
//! What it does not: write the phase record, talk to the target or read clocks: the daemon
//! does those and passes the stamps in.
//!
//! Invariants: a final state (`Completed`, `Failed`) is never left, except that a release
//! whose record could not be written goes back to the fence it came from (nothing was told
//! to the target yet); a fence in progress or done owns the phase until it is cancelled or
//! released.

use crate::api::{FenceResult, Phase};
use crate::fence::{PauseReport, PauseStamps, StampError};
use crate::ids::Lsn;

/// One fence attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub final_lsn: Lsn,
    pub stamps: PauseStamps,
    /// The estimate the fence was admitted with.
    pub estimate_us: u64,
    /// `Some` once the target answered `Fenced`.
    pub answer: Option<FenceResult>,
}

/// A fence this migration started before a daemon restart, from its phase record: a release
/// may still complete it when the target confirms it is fenced at that LSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredFence {
    pub final_lsn: Option<Lsn>,
    pub stamps: Option<PauseStamps>,
}

/// A completed cut-over's release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub final_lsn: Lsn,
    pub pause: PauseReport,
    /// The durable LSN the target answered the fence with (`None`: a recovered fence, whose
    /// answer this daemon never took): told with the release, so a target that lost its
    /// `fenced` MANIFEST commit derives the fence from its staged WAL (DESIGN section 8).
    pub fenced_durable_lsn: Option<Lsn>,
}

/// Where an outbound migration is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    BaseCopy,
    WalCatchUp {
        recovered: Option<RecoveredFence>,
    },
    /// `AtomicCutOver`: a fence in progress (`answer: None`) or done, waiting for release.
    CutOver {
        fence: Fence,
    },
    /// The point of no return passed. `release` is `None` for an offline end (no fence);
    /// `fence` is kept until the target is told, so an unrecorded release can go back to it.
    Completed {
        release: Option<Released>,
        target_told: bool,
        fence: Option<Fence>,
    },
    Failed {
        reason: Option<String>,
        fence: Option<Fence>,
        recovered: Option<RecoveredFence>,
    },
}

/// What a fence call may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum FenceStep {
    /// The same fence (same `final_lsn`) completed before: answer with its result again.
    Already(FenceResult),
    /// The fence is recorded as started: drain, ask the target, then report the outcome.
    Started,
}

/// What a release call may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum ReleaseStep {
    /// Released before: answer with it again (the pause is not counted twice).
    Already(Released),
    /// Released now in memory: record it durably, then tell the target.
    Record(Released),
    /// A fence from before a restart: the target must confirm it first (it releases only a
    /// staging fenced at exactly this LSN); then [`Lifecycle::recovered_release_confirmed`].
    ConfirmRecovered(Released),
}

/// A request the lifecycle refuses now; nothing changed. Each message is a predicate about
/// the migration: the daemon prefixes "migration ID".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundRefusal {
    #[error("is still in BaseCopy: wait for WalCatchUp before the cut-over")]
    StillInBaseCopy,
    #[error("is already in a cut-over")]
    AlreadyInCutOver,
    #[error("is {0:?}: there is nothing to cut over")]
    Over(Phase),
    #[error("is fenced at final_lsn {0}: release it or abort it")]
    FencedAt(Lsn),
    #[error("has a fence at final_lsn {0} in progress")]
    FenceInProgress(Lsn),
    #[error("is {0:?} without a cut-over: nothing to release")]
    NothingToRelease(Phase),
    #[error("has a fence that has not completed: wait for its answer")]
    FenceNotAnswered,
    #[error("is {0:?} and not fenced: fence it before releasing")]
    NotFenced(Phase),
    #[error("is completed (released): the target is authoritative; it cannot be aborted")]
    Released,
    /// The caller's stamps cannot be a pause.
    #[error(transparent)]
    Stamps(#[from] StampError),
}

impl Lifecycle {
    /// The phase the status and the record show.
    pub fn phase(&self) -> Phase {
        match self {
            Self::BaseCopy => Phase::BaseCopy,
            Self::WalCatchUp { .. } => Phase::WalCatchUp,
            Self::CutOver { .. } => Phase::AtomicCutOver,
            Self::Completed { .. } => Phase::Completed,
            Self::Failed { .. } => Phase::Failed,
        }
    }

    pub fn is_final(&self) -> bool {
        self.phase().is_final()
    }

    /// The fence in progress or done (until the target is told of its release).
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            Self::CutOver { fence } => Some(fence),
            Self::Completed { fence, .. } | Self::Failed { fence, .. } => fence.as_ref(),
            Self::BaseCopy | Self::WalCatchUp { .. } => None,
        }
    }

    fn recovered(&self) -> Option<&RecoveredFence> {
        match self {
            Self::WalCatchUp { recovered } | Self::Failed { recovered, .. } => recovered.as_ref(),
            _ => None,
        }
    }

    /// The release, once there is one.
    pub fn release(&self) -> Option<Released> {
        match self {
            Self::Completed { release, .. } => *release,
            _ => None,
        }
    }

    /// The pause of the released cut-over.
    pub fn pause(&self) -> Option<PauseReport> {
        self.release().map(|r| r.pause)
    }

    /// Whether the target confirmed the release.
    pub fn target_told(&self) -> bool {
        matches!(self, Self::Completed { target_told: true, .. })
    }

    /// A released cut-over the target has not confirmed: its `final_lsn`.
    pub fn release_pending(&self) -> Option<Lsn> {
        self.release_pending_whole().map(|r| r.final_lsn)
    }

    /// A released cut-over the target has not confirmed, whole (what to tell the target).
    pub fn release_pending_whole(&self) -> Option<Released> {
        match self {
            Self::Completed { release: Some(r), target_told: false, .. } => Some(*r),
            _ => None,
        }
    }

    /// Why it failed.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Failed { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    /// The `final_lsn` the status shows: the release's, else the fence's (else, for a failed
    /// migration, a recovered fence's).
    pub fn status_final_lsn(&self) -> Option<Lsn> {
        let failed_at = match self {
            Self::Failed { recovered, .. } => recovered.and_then(|r| r.final_lsn),
            _ => None,
        };
        self.release().map(|r| r.final_lsn).or(self.fence().map(|f| f.final_lsn)).or(failed_at)
    }

    /// The `final_lsn` the phase record keeps: as the status, else a recovered fence's.
    pub fn record_final_lsn(&self) -> Option<Lsn> {
        self.status_final_lsn().or(self.recovered().and_then(|r| r.final_lsn))
    }

    /// The fence stamps the phase record keeps.
    pub fn record_fence_stamps(&self) -> Option<PauseStamps> {
        self.fence().map(|f| f.stamps).or(self.recovered().and_then(|r| r.stamps))
    }

    /// The state a phase record stands for, as recovery rebuilds it for a migration it keeps
    /// (a final one, or one aborted as stale) rather than resumes.
    pub fn of_record(
        phase: Phase,
        reason: Option<String>,
        final_lsn: Option<Lsn>,
        pause: Option<PauseReport>,
        target_released: bool,
        fenced_durable_lsn: Option<Lsn>,
    ) -> Self {
        let release = match (final_lsn, pause) {
            (Some(final_lsn), Some(pause)) => Some(Released { final_lsn, pause, fenced_durable_lsn }),
            _ => None,
        };
        let recovered = Some(RecoveredFence { final_lsn, stamps: None });
        match phase {
            Phase::BaseCopy => Self::BaseCopy,
            Phase::WalCatchUp | Phase::AtomicCutOver => Self::WalCatchUp { recovered },
            Phase::Completed => Self::Completed { release, target_told: target_released, fence: None },
            Phase::Failed => Self::Failed { reason, fence: None, recovered },
        }
    }

    /// The state a resumed migration starts in after a restart: a fence the restart
    /// interrupted is cancelled (the migration streams again in `WalCatchUp`), and kept as
    /// recovered, so a release may still complete it if the target confirms it.
    pub fn resumed(phase: Phase, final_lsn: Option<Lsn>, stamps: Option<PauseStamps>) -> Self {
        match phase {
            Phase::BaseCopy => Self::BaseCopy,
            _ => Self::WalCatchUp { recovered: Some(RecoveredFence { final_lsn, stamps }) },
        }
    }

    /// The base is staged (or the offline catch-up ended without a commit): `WalCatchUp`
    /// when a WAL stream follows the base (`streams_wal`); a copy without one has no catch-up
    /// and stays in `BaseCopy` until its commit. Returns whether the phase changed. A final
    /// state or a fence keeps the phase.
    pub fn base_staged(&mut self, streams_wal: bool) -> bool {
        match self {
            Self::BaseCopy if streams_wal => {
                *self = Self::WalCatchUp { recovered: None };
                true
            }
            _ => false,
        }
    }

    /// Whether a cut-over may be prepared or fenced now.
    pub fn check_cutover(&self) -> Result<(), OutboundRefusal> {
        match self.phase() {
            Phase::WalCatchUp => Ok(()),
            Phase::BaseCopy => Err(OutboundRefusal::StillInBaseCopy),
            Phase::AtomicCutOver => Err(OutboundRefusal::AlreadyInCutOver),
            phase @ (Phase::Completed | Phase::Failed) => Err(OutboundRefusal::Over(phase)),
        }
    }

    /// A fence at `final_lsn` is asked for: the same completed fence answers again; a fence in
    /// progress or at another LSN is refused; from `WalCatchUp` the fence starts (`live`: the
    /// copy is running, which the daemon checks first). A fence kept by a final state answers
    /// as before.
    pub fn fence_requested(
        &mut self,
        final_lsn: Lsn,
        stamps: PauseStamps,
        estimate_us: u64,
    ) -> Result<FenceStep, OutboundRefusal> {
        if let Some(fence) = self.fence() {
            return match fence.answer {
                Some(result) if fence.final_lsn == final_lsn => Ok(FenceStep::Already(result)),
                Some(_) => Err(OutboundRefusal::FencedAt(fence.final_lsn)),
                None => Err(OutboundRefusal::FenceInProgress(fence.final_lsn)),
            };
        }
        self.check_cutover()?;
        *self = Self::CutOver { fence: Fence { final_lsn, stamps, estimate_us, answer: None } };
        Ok(FenceStep::Started)
    }

    /// The target answered the fence in progress: it waits for release.
    pub fn fence_answered(&mut self, drained_at_ns: u64, target_durable_at_ns: u64, result: FenceResult) {
        if let Self::CutOver { fence } = self {
            fence.stamps.drained_at_ns = drained_at_ns;
            fence.stamps.target_durable_at_ns = target_durable_at_ns;
            fence.stamps.apply_wait_ns = result.apply_wait_us.saturating_mul(1_000);
            fence.answer = Some(result);
        }
    }

    /// The fence was cancelled or violated: back to `WalCatchUp` (the source stays
    /// authoritative). Returns whether the phase changed.
    pub fn fence_failed(&mut self) -> bool {
        match self {
            Self::CutOver { .. } => {
                *self = Self::WalCatchUp { recovered: None };
                true
            }
            // Aborted while the fence ran: the fence is given up, the phase stays.
            Self::Failed { fence, .. } => {
                *fence = None;
                false
            }
            _ => false,
        }
    }

    /// A release with writes resumed at `resumed_ns`: from an answered fence it is released
    /// now (record it, then tell the target); from a recovered fence the target must confirm
    /// first (`recovered_estimate_us`: the estimate of a prepare since the restart, if any);
    /// once released it answers again.
    pub fn release_requested(
        &mut self,
        resumed_ns: u64,
        budget_us: u64,
        base_lsn: Lsn,
        recovered_estimate_us: u64,
    ) -> Result<ReleaseStep, OutboundRefusal> {
        match self {
            Self::Completed { release: Some(release), .. } => Ok(ReleaseStep::Already(*release)),
            Self::Completed { release: None, .. } | Self::Failed { .. } => {
                Err(OutboundRefusal::NothingToRelease(self.phase()))
            }
            Self::CutOver { fence } => {
                if fence.answer.is_none() {
                    return Err(OutboundRefusal::FenceNotAnswered);
                }
                let pause = fence.stamps.report(resumed_ns, fence.estimate_us, budget_us)?;
                let fenced_durable_lsn = fence.answer.map(|a| Lsn(a.target_durable_lsn));
                let release = Released { final_lsn: fence.final_lsn, pause, fenced_durable_lsn };
                let fence = Some(*fence);
                *self = Self::Completed { release: Some(release), target_told: false, fence };
                Ok(ReleaseStep::Record(release))
            }
            Self::WalCatchUp { recovered: Some(RecoveredFence { final_lsn, stamps: Some(stamps) }) } => {
                let final_lsn = final_lsn.unwrap_or(base_lsn);
                let stamps = PauseStamps {
                    drained_at_ns: stamps.fence_received_at_ns,
                    target_durable_at_ns: stamps.fence_received_at_ns,
                    ..*stamps
                };
                let pause = stamps.report(resumed_ns, recovered_estimate_us, budget_us)?;
                Ok(ReleaseStep::ConfirmRecovered(Released { final_lsn, pause, fenced_durable_lsn: None }))
            }
            Self::BaseCopy | Self::WalCatchUp { .. } => Err(OutboundRefusal::NotFenced(self.phase())),
        }
    }

    /// The target confirmed a recovered fence's release: `Completed`, told.
    pub fn recovered_release_confirmed(&mut self, release: Released) {
        *self = Self::Completed { release: Some(release), target_told: true, fence: None };
    }

    /// The release could not be recorded: back to the answered fence (the target was not told).
    pub fn release_unrecorded(&mut self) {
        if let Self::Completed { fence: Some(fence), target_told: false, .. } = self {
            *self = Self::CutOver { fence: *fence };
        }
    }

    /// The target confirmed the release: nothing more is streamed; the fence is done with.
    pub fn target_confirmed_release(&mut self) {
        if let Self::Completed { target_told, fence, .. } = self {
            *target_told = true;
            *fence = None;
        }
    }

    /// An offline end: the target committed the staging without a fence.
    pub fn committed_offline(&mut self) -> bool {
        if self.is_final() {
            return false;
        }
        *self = Self::Completed { release: None, target_told: false, fence: None };
        true
    }

    /// Whether the migration may be aborted: anything but completed.
    pub fn check_abort(&self) -> Result<(), OutboundRefusal> {
        match self {
            Self::Completed { .. } => Err(OutboundRefusal::Released),
            _ => Ok(()),
        }
    }

    /// The migration failed (or was aborted). A final state is never left; returns whether
    /// this changed it.
    pub fn fail(&mut self, reason: Option<String>) -> bool {
        if self.is_final() {
            return false;
        }
        let fence = self.fence().copied();
        let recovered = self.recovered().copied();
        *self = Self::Failed { reason, fence, recovered };
        true
    }
}

#[cfg(test)]
#[path = "outbound_tests.rs"]
mod tests;
