//! The cut-over fence's rules (DESIGN sections 2 and 5), without I/O or clocks.
//!
//! What it does:
//! - [`drain_check`]: from what the source's WAL tail has read, whether every record up to
//!   `final_lsn` was read, with the last of the vShard's the target must make durable before
//!   it fences ([`Drain::Drained`]), not yet ([`Drain::Waiting`]), or the writer did not pause:
//!   a record of the vShard above `final_lsn` was read ([`Drain::Violated`]).
//! - [`estimate_pause_us`]: the pause `migration.prepare_cutover` admits, from measured figures
//!   (bytes still queued, the WAL stream's measured rate, the measured round trip of a group
//!   commit and of a MANIFEST commit).
//! - [`fence_deadline_ns`]: `writes_paused_at_ns + budget` minus what release needs;
//!   [`target_wait_us`]: how much of the rest the target may wait.
//! - [`PauseStamps::report`]: the pause and its parts, which add up exactly.
//!
//! What it does not: read clocks (every time is an argument, CLOCK_MONOTONIC nanoseconds of the
//! source host), talk to anyone, or decide retries (the coordinator does).
//!
//! Invariants: no input panics (arithmetic saturates or is refused); the parts of a
//! [`PauseReport`] sum to its `pause_duration_us` exactly, whatever the stamps.

use serde::{Deserialize, Serialize};

use crate::ids::Lsn;

/// What the source knows while it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainState {
    /// Every record (of any vShard) at or below it has been read by this migration's tail.
    pub scanned_lsn: Lsn,
    /// The last record of the vShard the tail selected (`None`: none since the stream began).
    /// Read after `scanned_lsn`, so it is at least as new.
    pub last_selected_lsn: Option<Lsn>,
}

/// Where the drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The tail has not read up to `final_lsn` yet.
    Waiting,
    /// Every record up to `final_lsn` was read; `through_lsn` is the last of the vShard's
    /// (`None`: none since the stream began). The target fences once its staged WAL is durable
    /// up to it (DESIGN section 5: the staged WAL's fdatasync is the target's part).
    Drained { through_lsn: Option<Lsn> },
    /// A record of the vShard with this LSN, above `final_lsn`, was read: the writer did not
    /// pause (`FenceViolated`).
    Violated { lsn: Lsn },
}

/// Decides the drain (see [`Drain`]). A violation wins over everything else: it is final for
/// this fence.
pub fn drain_check(final_lsn: Lsn, state: &DrainState) -> Drain {
    if let Some(selected) = state.last_selected_lsn {
        if selected > final_lsn {
            return Drain::Violated { lsn: selected };
        }
    }
    if state.scanned_lsn < final_lsn {
        return Drain::Waiting;
    }
    Drain::Drained { through_lsn: state.last_selected_lsn }
}

/// Measured figures the pause estimate is built from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstimateInputs {
    /// Selected record bytes read by the tail and not yet acknowledged durable.
    pub lag_bytes: u64,
    /// The WAL stream's measured rate to the target (0: not measured yet).
    pub wal_rate_bytes_per_sec: u64,
    /// The slowest recent group commit round trip: batch sent to `WalDurable` received.
    pub group_commit_us: u64,
    /// The slowest recent MANIFEST commit on the target (0: none measured: the group commit
    /// round trip stands in for it).
    pub manifest_commit_us: u64,
}

/// Below this measured WAL rate the drain estimate assumes this rate (a stream that has had
/// nothing to send has no meaningful rate).
pub const ESTIMATE_RATE_FLOOR_BYTES_PER_SEC: u64 = 50 << 20;

/// The estimated pause: the drain of what is queued at the measured rate, one group commit
/// round trip (the last records' fdatasync) and one MANIFEST commit.
pub fn estimate_pause_us(inputs: &EstimateInputs) -> u64 {
    let rate = inputs.wal_rate_bytes_per_sec.max(ESTIMATE_RATE_FLOOR_BYTES_PER_SEC);
    let drain_us = u64::try_from(u128::from(inputs.lag_bytes) * 1_000_000 / u128::from(rate)).unwrap_or(u64::MAX);
    let commit_us = if inputs.manifest_commit_us > 0 { inputs.manifest_commit_us } else { inputs.group_commit_us };
    drain_us.saturating_add(inputs.group_commit_us).saturating_add(commit_us)
}

/// The fence's deadline: `writes_paused_at_ns + budget_us - release_reserve_us`, in ns.
pub fn fence_deadline_ns(writes_paused_at_ns: u64, budget_us: u64, release_reserve_us: u64) -> u64 {
    let room_ns = budget_us.saturating_sub(release_reserve_us).saturating_mul(1_000);
    writes_paused_at_ns.saturating_add(room_ns)
}

/// Of what is left until the fence's deadline, the most the target may wait (for its
/// database's ingest), in us: the rest, a tenth and at most 20 ms, is for its answer to come
/// back, so a target that gives up says why before the source stops listening. The target
/// counts its wait from the `Fence`'s arrival, so the rest covers both trips, the MANIFEST
/// commit and a loaded host's scheduling (2 ms was not always enough on two busy cores).
pub fn target_wait_us(now_ns: u64, deadline_ns: u64) -> u64 {
    let left_us = deadline_ns.saturating_sub(now_ns) / 1_000;
    left_us.saturating_sub((left_us / 10).min(ANSWER_ALLOWANCE_MAX_US))
}

/// The most of the fence's time kept for the target's answer to travel back.
pub const ANSWER_ALLOWANCE_MAX_US: u64 = 20_000;

/// The stamps of one completed fence, CLOCK_MONOTONIC nanoseconds of the source host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseStamps {
    /// The coordinator paused writes (its stamp, or the daemon's receipt of the fence call).
    pub writes_paused_at_ns: u64,
    /// The fence call reached the source daemon.
    pub fence_received_at_ns: u64,
    /// Every record up to `final_lsn` was read by the source's tail (the vShard's among them
    /// handed to the WAL stream) and the target was asked to fence.
    pub drained_at_ns: u64,
    /// The target answered that the staging is `fenced` (its staged WAL durable up to the last
    /// selected record, its MANIFEST commit, and the wait for its database's ingest, done).
    pub target_durable_at_ns: u64,
    /// Of the span from drained to target durable, the target's wait for ingest.
    pub apply_wait_ns: u64,
}

/// The pause's parts in microseconds (DESIGN section 5). They add up to the pause exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseBreakdown {
    /// Writes paused to the fence call reaching the source daemon.
    pub before_fence_us: u64,
    /// Records up to `final_lsn` read and sent.
    pub drain_us: u64,
    /// The target's staged WAL fdatasync of the last records and its MANIFEST commit (state
    /// `fenced`), and the round trip to it.
    pub target_durable_us: u64,
    /// The target waited for its database to apply up to `final_lsn`.
    pub apply_wait_us: u64,
    /// The fence's answer to writes resumed (the coordinator's routing flip).
    pub after_fence_us: u64,
}

/// A cut-over's pause, as `migration.release` returns it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    pub pause_duration_us: u64,
    pub breakdown: PauseBreakdown,
    /// The estimate the cut-over was admitted with.
    pub estimate_us: u64,
    pub budget_us: u64,
    /// The pause exceeded the budget (the fence no longer cancels once the target is durable).
    pub over_budget: bool,
}

/// Stamps that cannot be a pause: the caller's clock is not the source host's monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    #[error("writes_resumed_at_ns ({resumed_ns}) is before writes_paused_at_ns ({paused_ns}): pass CLOCK_MONOTONIC nanoseconds of the source host for both")]
    ResumedBeforePaused { paused_ns: u64, resumed_ns: u64 },
}

impl PauseStamps {
    /// The pause from `writes_paused_at_ns` to `writes_resumed_at_ns`, split into parts that
    /// add up exactly: each boundary is clamped into the pause's span and kept in order, and
    /// each part is the difference of the whole microseconds up to its two boundaries.
    pub fn report(
        &self,
        writes_resumed_at_ns: u64,
        estimate_us: u64,
        budget_us: u64,
    ) -> Result<PauseReport, StampError> {
        let start = self.writes_paused_at_ns;
        let end = writes_resumed_at_ns;
        if end < start {
            return Err(StampError::ResumedBeforePaused { paused_ns: start, resumed_ns: end });
        }
        let clamp = |t: u64, floor: u64| t.clamp(floor, end);
        let received = clamp(self.fence_received_at_ns, start);
        let drained = clamp(self.drained_at_ns, received);
        let durable = clamp(self.target_durable_at_ns, drained);
        let apply = self.apply_wait_ns.min(durable - drained);
        let committed = durable - apply;
        let us = |t: u64| (t - start) / 1_000;
        let pause_duration_us = us(end);
        let breakdown = PauseBreakdown {
            before_fence_us: us(received),
            drain_us: us(drained) - us(received),
            target_durable_us: us(committed) - us(drained),
            apply_wait_us: us(durable) - us(committed),
            after_fence_us: us(end) - us(durable),
        };
        Ok(PauseReport {
            pause_duration_us,
            breakdown,
            estimate_us,
            budget_us,
            over_budget: pause_duration_us > budget_us,
        })
    }
}

impl PauseBreakdown {
    /// The sum of the parts (equals the pause for a report made by [`PauseStamps::report`]).
    pub fn total_us(&self) -> u64 {
        self.before_fence_us
            .saturating_add(self.drain_us)
            .saturating_add(self.target_durable_us)
            .saturating_add(self.apply_wait_us)
            .saturating_add(self.after_fence_us)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn state(scanned: u64, selected: Option<u64>) -> DrainState {
        DrainState { scanned_lsn: Lsn(scanned), last_selected_lsn: selected.map(Lsn) }
    }

    #[test]
    fn the_drain_waits_for_the_scan_names_the_last_selected_record_and_sees_violations() {
        let f = Lsn(100);
        // The tail has not read record 100 yet.
        assert_eq!(drain_check(f, &state(99, Some(97))), Drain::Waiting);
        // Read: the target fences once record 98 is durable there.
        assert_eq!(drain_check(f, &state(100, Some(98))), Drain::Drained { through_lsn: Some(Lsn(98)) });
        // final_lsn is node-global: other vShards' records after the last selected one.
        assert_eq!(drain_check(f, &state(140, Some(98))), Drain::Drained { through_lsn: Some(Lsn(98)) });
        // Nothing selected since the stream began.
        assert_eq!(drain_check(f, &state(100, None)), Drain::Drained { through_lsn: None });
        // A vShard record above final_lsn: the writer did not pause.
        assert_eq!(drain_check(f, &state(101, Some(101))), Drain::Violated { lsn: Lsn(101) });
        assert_eq!(drain_check(f, &state(99, Some(101))), Drain::Violated { lsn: Lsn(101) });
    }

    #[test]
    fn the_target_waits_for_what_is_left_less_its_answers_trip() {
        assert_eq!(target_wait_us(0, 1_000_000), 900);
        assert_eq!(target_wait_us(0, 100_000_000), 90_000);
        assert_eq!(target_wait_us(0, 500_000_000), 480_000);
        assert_eq!(target_wait_us(2_000, 1_000), 0);
    }

    #[test]
    fn the_estimate_adds_the_drain_a_group_commit_and_a_manifest_commit() {
        let quiet =
            EstimateInputs { lag_bytes: 0, wal_rate_bytes_per_sec: 0, group_commit_us: 300, manifest_commit_us: 0 };
        assert_eq!(estimate_pause_us(&quiet), 600);
        let behind = EstimateInputs {
            lag_bytes: 100 << 20,
            wal_rate_bytes_per_sec: 200 << 20,
            group_commit_us: 300,
            manifest_commit_us: 500,
        };
        assert_eq!(estimate_pause_us(&behind), 500_000 + 300 + 500);
        // An unmeasured rate falls back to the floor, never divides by zero.
        let unmeasured = EstimateInputs { lag_bytes: 50 << 20, ..EstimateInputs::default() };
        assert_eq!(estimate_pause_us(&unmeasured), 1_000_000);
    }

    #[test]
    fn the_deadline_leaves_room_for_the_release() {
        assert_eq!(fence_deadline_ns(1_000, 500, 100), 1_000 + 400_000);
        assert_eq!(fence_deadline_ns(1_000, 50, 100), 1_000);
        assert_eq!(fence_deadline_ns(u64::MAX, 500, 0), u64::MAX);
    }

    #[test]
    fn a_pause_splits_into_its_parts() {
        let stamps = PauseStamps {
            writes_paused_at_ns: 1_000_000,
            fence_received_at_ns: 1_050_000,
            drained_at_ns: 1_250_000,
            target_durable_at_ns: 1_700_000,
            apply_wait_ns: 100_000,
        };
        let report = stamps.report(2_000_000, 900, 500).unwrap();
        assert_eq!(report.pause_duration_us, 1_000);
        assert_eq!(
            report.breakdown,
            PauseBreakdown {
                before_fence_us: 50,
                drain_us: 200,
                target_durable_us: 350,
                apply_wait_us: 100,
                after_fence_us: 300
            }
        );
        assert!(report.over_budget);
        assert_eq!(report.estimate_us, 900);
        let err = stamps.report(999, 0, 0).unwrap_err();
        assert!(err.to_string().contains("CLOCK_MONOTONIC"), "{err}");
    }

    proptest! {
        #[test]
        fn the_parts_always_add_up_exactly(
            paused in any::<u64>(), a in any::<u64>(), b in any::<u64>(), c in any::<u64>(),
            apply in any::<u64>(), resumed in any::<u64>(), estimate in any::<u64>(), budget in any::<u64>(),
        ) {
            let stamps = PauseStamps {
                writes_paused_at_ns: paused,
                fence_received_at_ns: a,
                drained_at_ns: b,
                target_durable_at_ns: c,
                apply_wait_ns: apply,
            };
            match stamps.report(resumed, estimate, budget) {
                Ok(report) => {
                    prop_assert_eq!(report.breakdown.total_us(), report.pause_duration_us);
                    prop_assert_eq!(report.pause_duration_us, (resumed - paused) / 1_000);
                }
                Err(_) => prop_assert!(resumed < paused),
            }
        }

        #[test]
        fn the_drain_check_never_panics(
            f in any::<u64>(), s in any::<u64>(), sel in proptest::option::of(any::<u64>()),
        ) {
            match drain_check(Lsn(f), &state(s, sel)) {
                Drain::Violated { lsn } => prop_assert!(lsn.0 > f),
                Drain::Drained { through_lsn } => {
                    prop_assert!(s >= f);
                    prop_assert!(through_lsn.is_none_or(|t| t.0 <= f));
                }
                Drain::Waiting => prop_assert!(s < f),
            }
        }
    }
}
