//! Tests of the outbound lifecycle, driven with events and stamps only.

#![allow(clippy::panic)]

use proptest::prelude::*;

use super::*;

fn stamps(paused_ns: u64) -> PauseStamps {
    PauseStamps { writes_paused_at_ns: paused_ns, fence_received_at_ns: paused_ns + 1_000, ..PauseStamps::default() }
}

fn answer(final_lsn: u64) -> FenceResult {
    FenceResult {
        final_lsn,
        target_durable_lsn: final_lsn,
        drain_us: 1,
        target_durable_us: 2,
        apply_wait_us: 0,
        paused_so_far_us: 3,
        estimate_us: 4,
        budget_us: 500_000,
    }
}

/// A migration in `WalCatchUp` with a fence at `final_lsn` answered.
fn fenced(final_lsn: u64) -> Lifecycle {
    let mut life = Lifecycle::BaseCopy;
    assert!(life.base_staged(true));
    assert_eq!(life.fence_requested(Lsn(final_lsn), stamps(1_000_000), 9), Ok(FenceStep::Started));
    life.fence_answered(1_010_000, 1_020_000, answer(final_lsn));
    life
}

#[test]
fn a_live_migration_runs_from_base_copy_to_a_told_release() {
    let mut life = fenced(40);
    assert_eq!(life.phase(), Phase::AtomicCutOver);
    assert_eq!(life.fence_requested(Lsn(40), stamps(5), 0), Ok(FenceStep::Already(answer(40))), "idempotent");
    assert_eq!(life.fence_requested(Lsn(41), stamps(5), 0), Err(OutboundRefusal::FencedAt(Lsn(40))));
    let step = life.release_requested(1_100_000, 500_000, Lsn(10), 0).expect("release");
    let ReleaseStep::Record(released) = step else { panic!("{step:?}") };
    assert_eq!(released.final_lsn, Lsn(40));
    assert_eq!(released.fenced_durable_lsn, Some(Lsn(40)), "the answer's durable LSN goes with the release");
    assert_eq!(released.pause.pause_duration_us, 100);
    assert_eq!(released.pause.estimate_us, 9);
    assert_eq!((life.phase(), life.release_pending()), (Phase::Completed, Some(Lsn(40))));
    assert_eq!(life.record_fence_stamps().map(|s| s.drained_at_ns), Some(1_010_000), "kept until told");
    // A second release answers the same pause (not counted again).
    assert_eq!(life.release_requested(9_000_000, 500_000, Lsn(10), 0), Ok(ReleaseStep::Already(released)));
    life.target_confirmed_release();
    assert!(life.target_told());
    assert_eq!((life.release_pending(), life.fence()), (None, None));
    assert_eq!(life.record_final_lsn(), Some(Lsn(40)));
    assert_eq!(life.check_abort(), Err(OutboundRefusal::Released));
    assert!(!life.fail(Some("late".into())), "a final state is never left");
}

#[test]
fn a_fence_in_progress_or_unanswered_refuses_and_a_failed_one_goes_back_to_catch_up() {
    let mut life = Lifecycle::WalCatchUp { recovered: None };
    assert_eq!(life.fence_requested(Lsn(7), stamps(1), 0), Ok(FenceStep::Started));
    assert_eq!(life.fence_requested(Lsn(7), stamps(1), 0), Err(OutboundRefusal::FenceInProgress(Lsn(7))));
    assert_eq!(life.release_requested(10, 1, Lsn(0), 0), Err(OutboundRefusal::FenceNotAnswered));
    assert!(life.fence_failed());
    assert_eq!(life, Lifecycle::WalCatchUp { recovered: None });
    assert!(!life.fence_failed());
    assert_eq!(life.release_requested(10, 1, Lsn(0), 0), Err(OutboundRefusal::NotFenced(Phase::WalCatchUp)));
}

#[test]
fn a_cutover_needs_catch_up() {
    assert_eq!(Lifecycle::BaseCopy.check_cutover(), Err(OutboundRefusal::StillInBaseCopy));
    assert_eq!(fenced(3).check_cutover(), Err(OutboundRefusal::AlreadyInCutOver));
    let mut failed = Lifecycle::BaseCopy;
    assert!(failed.fail(Some("boom".into())));
    assert_eq!(failed.check_cutover(), Err(OutboundRefusal::Over(Phase::Failed)));
    assert_eq!(failed.reason(), Some("boom"));
    let mut life = Lifecycle::BaseCopy;
    assert_eq!(life.fence_requested(Lsn(3), stamps(1), 0), Err(OutboundRefusal::StillInBaseCopy));
    assert_eq!(life, Lifecycle::BaseCopy, "a refusal changes nothing");
}

#[test]
fn an_unrecorded_release_goes_back_to_its_fence() {
    let mut life = fenced(12);
    let before = life.clone();
    assert!(matches!(life.release_requested(2_000_000, 500_000, Lsn(0), 0), Ok(ReleaseStep::Record(_))));
    life.release_unrecorded();
    assert_eq!(life, before);
}

#[test]
fn a_fence_recovered_after_a_restart_is_released_only_once_the_target_confirms() {
    let mut life = Lifecycle::resumed(Phase::AtomicCutOver, Some(Lsn(30)), Some(stamps(1_000_000)));
    assert_eq!(life.phase(), Phase::WalCatchUp, "the interrupted fence is cancelled");
    let step = life.release_requested(1_500_000, 500_000, Lsn(5), 77).expect("release");
    let ReleaseStep::ConfirmRecovered(released) = step else { panic!("{step:?}") };
    assert_eq!((released.final_lsn, released.pause.estimate_us), (Lsn(30), 77));
    assert_eq!(released.fenced_durable_lsn, None, "no answer was taken: the target must be fenced");
    assert_eq!(life.phase(), Phase::WalCatchUp, "nothing changes before the target confirms");
    life.recovered_release_confirmed(released);
    assert_eq!((life.phase(), life.target_told(), life.pause()), (Phase::Completed, true, Some(released.pause)));
    // A new fence after the restart replaces the recovered one.
    let mut again = Lifecycle::resumed(Phase::WalCatchUp, Some(Lsn(30)), Some(stamps(1)));
    assert_eq!(again.fence_requested(Lsn(31), stamps(2), 0), Ok(FenceStep::Started));
    assert_eq!(again.record_final_lsn(), Some(Lsn(31)));
}

#[test]
fn records_are_read_back_into_states() {
    let pause = PauseReport { pause_duration_us: 5, ..PauseReport::default() };
    let pending = Lifecycle::of_record(Phase::Completed, None, Some(Lsn(9)), Some(pause), false, Some(Lsn(8)));
    assert_eq!(pending.release_pending(), Some(Lsn(9)));
    // The answer's durable LSN is told again with a retold release (a target that lost its
    // `fenced` commit derives the fence with it).
    assert_eq!(pending.release_pending_whole().and_then(|r| r.fenced_durable_lsn), Some(Lsn(8)));
    let offline = Lifecycle::of_record(Phase::Completed, None, None, None, false, None);
    assert_eq!((offline.release_pending(), offline.pause()), (None, None));
    let failed = Lifecycle::of_record(Phase::Failed, Some("x".into()), Some(Lsn(4)), None, false, None);
    assert_eq!(
        (failed.reason(), failed.record_final_lsn(), failed.status_final_lsn()),
        (Some("x"), Some(Lsn(4)), Some(Lsn(4)))
    );
    let mut stale = Lifecycle::of_record(Phase::AtomicCutOver, None, Some(Lsn(4)), None, false, None);
    assert!(stale.check_abort().is_ok());
    assert!(stale.fail(Some("aborted".into())));
    assert_eq!(stale.record_final_lsn(), Some(Lsn(4)));
}

#[test]
fn an_offline_end_completes_without_a_release() {
    let mut life = Lifecycle::BaseCopy;
    assert!(life.committed_offline());
    assert_eq!(life.release_requested(1, 1, Lsn(0), 0), Err(OutboundRefusal::NothingToRelease(Phase::Completed)));
    assert!(!life.committed_offline());
}

#[derive(Debug, Clone)]
enum Event {
    BaseStaged,
    Fence(u8),
    Answered,
    Failed,
    Release(u16),
    Unrecorded,
    Confirmed,
    Offline,
    Fail,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::BaseStaged),
        (0u8..3).prop_map(Event::Fence),
        Just(Event::Answered),
        Just(Event::Failed),
        any::<u16>().prop_map(Event::Release),
        Just(Event::Unrecorded),
        Just(Event::Confirmed),
        Just(Event::Offline),
        Just(Event::Fail),
    ]
}

proptest! {
    /// Any sequence of events: a refused request changes nothing, a released migration keeps
    /// its release, and a failed one stays failed.
    #[test]
    fn releases_are_kept_and_final_states_are_never_left(events in proptest::collection::vec(event(), 0..40)) {
        let mut life = Lifecycle::BaseCopy;
        for event in events {
            let before = life.clone();
            let refused = match event {
                Event::BaseStaged => { life.base_staged(true); false }
                Event::Fence(lsn) => life.fence_requested(Lsn(lsn.into()), stamps(1_000), 0).is_err(),
                Event::Answered => { life.fence_answered(2_000, 3_000, answer(1)); false }
                Event::Failed => { life.fence_failed(); false }
                Event::Release(at) => life.release_requested(u64::from(at) * 1_000, 500, Lsn(0), 0).is_err(),
                Event::Unrecorded => { life.release_unrecorded(); false }
                Event::Confirmed => { life.target_confirmed_release(); false }
                Event::Offline => { life.committed_offline(); false }
                Event::Fail => { life.fail(None); false }
            };
            if refused {
                prop_assert_eq!(&before, &life);
            }
            if let Some(released) = before.release().filter(|_| before.target_told()) {
                prop_assert_eq!(life.release(), Some(released));
            }
            if before.phase() == Phase::Failed {
                prop_assert_eq!(life.phase(), Phase::Failed);
            }
        }
    }
}

#[test]
fn a_copy_without_a_wal_stream_has_no_catch_up_and_goes_from_base_copy_to_completed() {
    let mut life = Lifecycle::BaseCopy;
    assert!(!life.base_staged(false), "an offline copy without a WAL entered WalCatchUp");
    assert_eq!(life.phase(), Phase::BaseCopy);
    assert!(life.committed_offline());
    assert_eq!(life.phase(), Phase::Completed);
    // With a WAL stream, the base staged is the start of the catch-up.
    let mut live = Lifecycle::BaseCopy;
    assert!(live.base_staged(true));
    assert_eq!(live.phase(), Phase::WalCatchUp);
}
