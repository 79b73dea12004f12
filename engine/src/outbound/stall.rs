//! The "no progress for N s" flag of a migration's status (`no_progress_for_s`).
//!
//! What it does: [`StallClock`] remembers, per migration, what its progress looked like
//! ([`Mark`]: phase, bytes verified, files staged, the WAL's durable LSN) and when that last
//! changed; fed each status and the time it was read, it says whether the migration counts as
//! stalled, and for how long nothing moved. The source's registry ([`super::Outbound`]) and the
//! daemon's target side both use it.
//!
//! What it does not: read a clock (`now` comes in), publish events (the daemon's event loop
//! turns the flag's edges into `stalled` / `progressing` events), or act on a stall.
//!
//! Invariants: only a migration with work left can be stalled: a base copy, or a WAL catch-up
//! whose source tip is ahead of the target's durable LSN. A caught-up live migration waiting
//! for its cut-over, a fence the coordinator holds, and a final phase are never flagged, and
//! the clock restarts when work appears again. A threshold of zero turns the flag off.

use std::time::{Duration, Instant};

use ferry_wire::api::{MigrationStatus, Phase};

/// How long a migration with work left may make no progress before its status says so, unless
/// the daemon is told otherwise (`ferry serve --stall-after-secs`).
pub const STALL_AFTER_DEFAULT: Duration = Duration::from_secs(10);

/// What counts as progress: any change of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    phase: Phase,
    bytes_transferred: u64,
    files_staged: u64,
    wal_durable_lsn: Option<u64>,
}

impl Mark {
    pub fn of(status: &MigrationStatus) -> Self {
        Self {
            phase: status.phase,
            bytes_transferred: status.bytes_transferred,
            files_staged: status.files_staged,
            wal_durable_lsn: status.wal.current_lsn,
        }
    }
}

/// Whether `status` has work left that ferry itself should be moving.
pub fn has_work_left(status: &MigrationStatus) -> bool {
    match status.phase {
        Phase::BaseCopy => true,
        // The target's side does not know the source's tip: its catch-up is never flagged.
        Phase::WalCatchUp => status.wal.lag_lsn().is_some_and(|lag| lag > 0),
        Phase::AtomicCutOver | Phase::Completed | Phase::Failed => false,
    }
}

/// The flag for a migration that has made no progress for `idle`: whole seconds once `idle`
/// reaches `stall_after` (never with a zero threshold).
pub fn no_progress_for_s(idle: Duration, stall_after: Duration) -> Option<u64> {
    (!stall_after.is_zero() && idle >= stall_after).then_some(idle.as_secs())
}

/// When one migration last made progress.
#[derive(Debug, Clone, Copy)]
pub struct StallClock {
    mark: Option<Mark>,
    since: Instant,
}

impl StallClock {
    pub fn new(now: Instant) -> Self {
        Self { mark: None, since: now }
    }

    /// Takes the status read at `now` and says how long it has made no progress, if that is
    /// at least `stall_after` and it has work left.
    pub fn observe(&mut self, status: &MigrationStatus, now: Instant, stall_after: Duration) -> Option<u64> {
        let mark = Mark::of(status);
        let working = has_work_left(status);
        if !working || self.mark != Some(mark) {
            self.mark = Some(mark);
            self.since = now;
        }
        if !working {
            return None;
        }
        no_progress_for_s(now.saturating_duration_since(self.since), stall_after)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ferry_wire::api::WalProgress;

    use super::*;

    fn status(phase: Phase, bytes: u64) -> MigrationStatus {
        serde_json::from_value(serde_json::json!({
            "migration_id": "m-1", "role": "source", "phase": phase, "vshard_id": 1, "peer_node": "b",
            "bytes_transferred": bytes, "bytes_total": 1000, "bytes_resent": 0, "files_staged": 0,
            "files_total": 1, "wal": {"start_lsn": null, "current_lsn": null, "source_lsn": null},
        }))
        .unwrap()
    }

    #[test]
    fn the_flag_rises_at_the_threshold_and_says_the_whole_seconds() {
        let after = Duration::from_secs(10);
        assert_eq!(no_progress_for_s(Duration::from_millis(9_999), after), None);
        assert_eq!(no_progress_for_s(Duration::from_secs(10), after), Some(10));
        assert_eq!(no_progress_for_s(Duration::from_millis(12_700), after), Some(12));
        assert_eq!(no_progress_for_s(Duration::from_secs(3600), Duration::ZERO), None, "0 turns it off");
    }

    #[test]
    fn a_copy_that_stops_is_flagged_and_cleared_when_it_moves_again() {
        let (t0, after) = (Instant::now(), Duration::from_secs(2));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = StallClock::new(t0);
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 100), at(0), after), None);
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 100), at(1_999), after), None);
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 100), at(2_000), after), Some(2));
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 100), at(5_500), after), Some(5));
        // One more verified byte is progress: the clock restarts.
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 101), at(5_600), after), None);
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 101), at(7_599), after), None);
        assert_eq!(clock.observe(&status(Phase::BaseCopy, 101), at(7_600), after), Some(2));
        // So is a phase change.
        let mut caught_up = status(Phase::WalCatchUp, 1000);
        caught_up.wal = WalProgress { start_lsn: Some(1), current_lsn: Some(50), source_lsn: Some(60), held_bytes: 0 };
        assert_eq!(clock.observe(&caught_up, at(7_700), after), None);
        // A WAL lag that does not shrink is a stall.
        assert_eq!(clock.observe(&caught_up, at(9_700), after), Some(2));
    }

    #[test]
    fn nothing_to_do_is_never_a_stall() {
        let (t0, after) = (Instant::now(), Duration::from_secs(1));
        let late = t0 + Duration::from_secs(60);
        let mut idle_live = status(Phase::WalCatchUp, 1000);
        idle_live.wal = WalProgress { start_lsn: Some(1), current_lsn: Some(60), source_lsn: Some(60), held_bytes: 0 };
        for s in [idle_live.clone(), status(Phase::AtomicCutOver, 1000), status(Phase::Completed, 1000)] {
            let mut clock = StallClock::new(t0);
            assert_eq!(clock.observe(&s, t0, after), None);
            assert_eq!(clock.observe(&s, late, after), None, "{:?}", s.phase);
        }
        // A target's catch-up does not know the source's tip: never flagged.
        let mut target_side = idle_live.clone();
        target_side.wal.source_lsn = None;
        assert!(!has_work_left(&target_side));
        // Work that appears after an idle spell is timed from when it appeared.
        let mut clock = StallClock::new(t0);
        assert_eq!(clock.observe(&idle_live, late, after), None);
        let mut behind = idle_live;
        behind.wal.source_lsn = Some(70);
        assert_eq!(clock.observe(&behind, late + Duration::from_millis(500), after), None);
        assert_eq!(clock.observe(&behind, late + Duration::from_millis(1_500), after), Some(1));
    }
}
