//! Live copies in the simulator: the WAL stream's moves, the source's fence and the
//! coordinator's calls around it.
//!
//! What it does: the coordinator of a live copy prepares, fences (pausing the writer first),
//! cancels a fence, releases, aborts and forgets at random moments, and sometimes re-sends a call. Every
//! call goes through the source daemon's production record of the migration
//! (`ferry_wire::proto::outbound::Lifecycle`), which refuses what the phase does not allow; the
//! fence's drain is the production rule (`ferry_wire::fence::drain_check`); the target runs
//! the engine's `fence_staging`, `commit_fenced`, `release_now` and `abort_staging`.
//!
//! What it does not: write the source's phase record to a disk (a source restart keeps the
//! record whole; its own tests cover its file), measure the pause, or run
//! `migration.prepare_cutover`'s estimate (no clock: the pause budget is drawn in steps).

use ferry_wire::api::FenceResult;
use ferry_wire::fence::{drain_check, Drain, PauseStamps};
use ferry_wire::proto::outbound::{FenceStep, Lifecycle, ReleaseStep};
use ferry_wire::proto::source::{SourceConversation, SourceState};
use ferry_wire::{Lsn, NodeId};

use super::run::{Purpose, SourceRelease, World};

/// Virtual nanoseconds per step (the machines' times).
const STEP_NS: u64 = 1_000;
/// Release calls that may fail before the coordinator gives the release up.
const RELEASE_FAILURES_MAX: u32 = 4;

/// The fence the source runs: its copy's connection and deadline, and whether the drain is
/// done and the `Fence` sent.
#[derive(Debug, Clone, Copy)]
pub struct FenceRun {
    conn: ferry_wire::proto::inbound::ConnId,
    final_lsn: Lsn,
    deadline_ns: u64,
    sent: bool,
}

impl World {
    pub(super) fn now_ns(&self) -> u64 {
        self.step.saturating_mul(STEP_NS)
    }

    fn node(&self) -> NodeId {
        NodeId::new(super::run::SOURCE_NODE).unwrap_or_else(|_| panic!("the simulator's node id is valid"))
    }

    /// The coordinator of a live copy, at a random moment; sometimes it sends the call twice.
    pub(super) fn coordinator_live(&mut self) {
        let times = 1 + self.rng.below(2);
        for _ in 0..times {
            match self.rng.below(7) {
                0 | 1 => self.fence_live(),
                2 => self.cancel_live(),
                3 => self.release_live(),
                4 => self.abort_live(),
                5 => self.prepare_live(),
                _ => self.forget(),
            }
        }
    }

    /// `migration.prepare_cutover`: the source's record admits it only in `WalCatchUp` (the
    /// pause estimate needs clocks and is not simulated).
    fn prepare_live(&mut self) {
        match self.copy.lifecycle.check_cutover() {
            Ok(()) => self.cov.hit("coordinator: prepare admitted"),
            Err(_) => self.cov.hit("coordinator: prepare refused"),
        }
    }

    /// Pause the writer, then fence at the last LSN written.
    fn fence_live(&mut self) {
        let final_lsn = self.writer.last_lsn();
        let started = self.copy.lifecycle.fence_requested(final_lsn, PauseStamps::default(), 0);
        self.log(format!("coordinator fences at {final_lsn}: {started:?}"));
        match started {
            Ok(FenceStep::Started) => {}
            Ok(FenceStep::Already(_)) => return self.cov.hit("coordinator: fence answered again"),
            Err(_) => return self.cov.hit("coordinator: fence refused"),
        }
        self.cov.hit("coordinator: fence started");
        let step = self.step;
        self.writer.pause(step);
        let serving = self.conns.iter().position(|c| c.source.state() == SourceState::CutOver && c.wal.is_some());
        let Some(i) = serving else {
            self.cov.hit("fence: no copy took it");
            self.fence_failed(final_lsn, "the copy did not take the fence");
            return;
        };
        if let Some(wal) = self.conns[i].wal.as_mut() {
            wal.set_ceiling(final_lsn);
        }
        let budget_ns = (20 + self.rng.below(400)) * STEP_NS;
        let deadline_ns = self.now_ns() + budget_ns;
        self.fence = Some(FenceRun { conn: self.conns[i].id, final_lsn, deadline_ns, sent: false });
    }

    /// Give up the fence in progress: writes resume on the source.
    fn cancel_live(&mut self) {
        self.cov.hit("coordinator: cancel");
        match self.fence {
            Some(run) => self.fence_failed(run.final_lsn, "the coordinator cancelled it"),
            None => self.log("coordinator cancels: no fence in progress".into()),
        }
    }

    /// Release at the answered fence, through the source's record.
    pub(super) fn release_live(&mut self) {
        self.cov.hit("coordinator: release (live)");
        let now_ns = self.now_ns();
        let step = self.copy.lifecycle.release_requested(now_ns, u64::MAX, self.copy.offer.base_lsn, 0);
        let release = match step {
            Ok(ReleaseStep::Record(release)) | Ok(ReleaseStep::Already(release)) => release,
            Ok(ReleaseStep::ConfirmRecovered(_)) | Err(_) => {
                self.cov.hit("coordinator: release refused by the source");
                return self.log(format!("coordinator releases: refused ({step:?})"));
            }
        };
        let id = self.copy.offer.migration_id.clone();
        self.log(format!("coordinator releases {id} at {}", release.final_lsn));
        let step = self.step;
        self.writer.move_away(step);
        let source_release = SourceRelease { files: self.copy.files.clone(), final_lsn: Some(release.final_lsn) };
        self.released_by_source.insert(id.clone(), source_release);
        let request = SourceConversation::release(&self.node(), id, release.final_lsn, release.fenced_durable_lsn);
        self.connect(Purpose::LiveRelease, Some(request));
    }

    /// Whether a recorded release still has to be told to the target.
    pub(super) fn release_pending(&self) -> bool {
        self.copy.live
            && self.copy.release_failures < RELEASE_FAILURES_MAX
            && (self.copy.lifecycle.release_pending().is_some()
                || matches!(&self.copy.lifecycle, Lifecycle::CutOver { fence } if fence.answer.is_some()))
            && !self.conns.iter().any(|c| c.purpose == Purpose::LiveRelease)
    }

    /// Abort through the source's record (refused once released).
    fn abort_live(&mut self) {
        let id = self.copy.offer.migration_id.clone();
        if let Err(e) = self.copy.lifecycle.check_abort() {
            self.cov.hit("coordinator: abort refused by the source");
            return self.log(format!("coordinator aborts {id}: refused: {e}"));
        }
        self.cov.hit("coordinator: abort (live)");
        self.copy.lifecycle.fail(Some("aborted".into()));
        if let Some(run) = self.fence {
            self.fence_failed(run.final_lsn, "aborted");
        }
        let step = self.step;
        self.writer.resume(&mut self.rng, step);
        self.copy.completed = true;
        self.log(format!("coordinator aborts {id}"));
        let request = SourceConversation::abort(&self.node(), id, "coordinator".into());
        self.connect(Purpose::Request, Some(request));
    }

    /// A request connection's answer came back.
    pub(super) fn request_answered(&mut self, i: usize) {
        if self.conns[i].purpose == Purpose::LiveRelease {
            self.cov.hit("coordinator: release confirmed");
            self.copy.lifecycle.target_confirmed_release();
            self.copy.completed = true;
        }
    }

    /// A live copy's move on connection `i` (see `step_conn`).
    pub(super) fn step_live(&mut self, i: usize, pick: u8) -> Result<(), String> {
        let Some(mut wal) = self.conns[i].wal.take() else { return Ok(()) };
        let result = match pick {
            5 => {
                let end = &self.conns[i].target;
                let r = wal.deliver_to_target(end, &self.target, &mut self.acked, &mut self.rng, &mut self.cov);
                r.map_err(|e| e.to_string())
            }
            6 => wal.deliver_to_source(&self.writer),
            7 => {
                wal.tail_step(&self.writer);
                Ok(())
            }
            8 => {
                let most = 1 + self.rng.index(300);
                wal.send_batch(&self.writer, most)
            }
            _ => Ok(()),
        };
        self.conns[i].wal = Some(wal);
        if pick == 9 {
            self.cov.hit("fence: the target answers");
            self.conns[i].target.answer_fence(&self.target).map_err(|e| e.to_string())?;
            self.drain_target(i)?;
            if self.conns[i].target.pending_commit.is_some() {
                self.fault_after_answer();
            }
            return Ok(());
        }
        if pick == 10 {
            let wrote = self.conns[i].target.commit_fence(&self.target).map_err(|e| e.to_string())?;
            self.cov.hit(if wrote { "fence: fenced commit written" } else { "fence: fenced commit not needed" });
            self.log(format!("target commits its fence (written: {wrote})"));
        }
        result
    }

    /// Right after the target's `Fenced` answer, before its `fenced` MANIFEST commit: now and
    /// then the target's process restarts there, or a power loss is armed to hit one of the
    /// next few syncs (the commit's or the release's), so the window between the answer and
    /// the release is crossed by crashes.
    fn fault_after_answer(&mut self) {
        match self.rng.below(10) {
            0 | 1 => {
                self.cov.hit("fault: target restart after the fence's answer");
                self.log("the target's process will restart after its fence's answer".into());
                self.target_restart = true;
            }
            2 | 3 => {
                let n = 1 + self.rng.below(6);
                self.cov.hit("fault: power loss armed after the fence's answer");
                self.log(format!("a power loss is armed at the target's sync {n} from now"));
                self.target.storage.crash_at_sync(n);
            }
            _ => {}
        }
    }

    /// Whether the target's staged WAL holds what the pending fence on connection `i` waits for.
    pub(super) fn fence_ready(&self, i: usize) -> bool {
        let conn = &self.conns[i];
        let Some(request) = conn.target.pending_fence else { return false };
        let Some(through) = request.through_lsn else { return true };
        let id = &self.copy.offer.migration_id;
        self.target.ctx.wal_durable_lsn(id).is_some_and(|d| d >= through.0)
    }

    /// The source's fence, each step: the drain, then the `Fence`, then its deadline.
    pub(super) fn fence_progress(&mut self) {
        let Some(run) = self.fence else { return };
        let now_ns = self.now_ns();
        let Some(i) = self.conns.iter().position(|c| c.id == run.conn) else {
            self.cov.hit("fence: copy lost");
            return self.fence_failed(run.final_lsn, "the copy's connection was lost");
        };
        if run.sent {
            let handled = self.conns[i].source.handle_timeout(now_ns);
            if let Err(e) = handled {
                self.log(format!("timeout refused: {e}"));
            }
            return self.drain_source(i);
        }
        if now_ns >= run.deadline_ns {
            self.cov.hit("fence: drain past its deadline");
            return self.fence_failed(run.final_lsn, "the drain was not done by the deadline");
        }
        let Some(wal) = self.conns[i].wal.as_ref() else { return };
        let (drain, durable) = (drain_check(run.final_lsn, &wal.drain), wal.machine.durable_lsn());
        match drain {
            Drain::Waiting => {}
            Drain::Violated { lsn } => {
                self.cov.hit("fence: violated");
                self.fence_failed(run.final_lsn, &format!("record {lsn} above final_lsn"));
            }
            Drain::Drained { through_lsn } => {
                self.cov.hit("fence: drained");
                let through_lsn = through_lsn.filter(|t| *t > durable);
                let asked = self.conns[i].source.handle_fence(run.final_lsn, through_lsn, 0, run.deadline_ns, now_ns);
                if let Err(e) = asked {
                    return self.fence_failed(run.final_lsn, &format!("the copy refused the fence: {e}"));
                }
                self.log(format!("source asks the target to fence at {} (through {through_lsn:?})", run.final_lsn));
                self.fence = Some(FenceRun { sent: true, ..run });
                self.drain_source(i);
            }
        }
    }

    /// The target answered `Fenced`: the fence holds unless a record above it was read or the
    /// source gave it up.
    pub(super) fn source_fenced(&mut self, i: usize, final_lsn: Lsn, durable_lsn: Lsn) {
        let current = self.fence.filter(|run| run.final_lsn == final_lsn && run.conn == self.conns[i].id);
        let violated = self.conns[i]
            .wal
            .as_ref()
            .is_some_and(|wal| matches!(drain_check(final_lsn, &wal.drain), Drain::Violated { .. }));
        if current.is_none() || violated {
            self.cov.hit("fence: answer dropped");
            self.log(format!("source drops the target's fence at {final_lsn} (given up: {})", current.is_none()));
            let _ = self.conns[i].source.handle_fence_dropped();
            if current.is_some() {
                self.fence_failed(final_lsn, "a record above final_lsn was read");
            }
            return;
        }
        self.cov.hit("fence: kept");
        self.log(format!("source keeps the fence at {final_lsn} (target durable {durable_lsn})"));
        let result = FenceResult {
            final_lsn: final_lsn.0,
            target_durable_lsn: durable_lsn.0,
            drain_us: 0,
            target_durable_us: 0,
            apply_wait_us: 0,
            paused_so_far_us: 0,
            estimate_us: 0,
            budget_us: 0,
        };
        self.copy.lifecycle.fence_answered(0, 0, result);
        self.fence = None;
        if let Err(e) = self.conns[i].source.handle_fence_kept() {
            self.log(format!("fence kept refused: {e}"));
        }
    }

    /// The fence at `final_lsn` failed: the source stays authoritative, writes resume, and
    /// the records held back above it go out.
    pub(super) fn fence_failed(&mut self, final_lsn: Lsn, why: &str) {
        let Some(run) = self.fence.take().filter(|run| run.final_lsn == final_lsn) else { return };
        self.log(format!("fence at {final_lsn} failed: {why}; writes resume on the source"));
        self.copy.lifecycle.fence_failed();
        let step = self.step;
        self.writer.resume(&mut self.rng, step);
        if let Some(conn) = self.conns.iter_mut().find(|c| c.id == run.conn) {
            if let Some(wal) = conn.wal.as_mut() {
                wal.lift_ceiling();
            }
        }
    }
}
