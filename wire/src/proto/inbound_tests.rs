//! Tests of the inbound machine, driven with events only.

use proptest::prelude::*;

use super::*;

fn id(name: &str) -> MigrationId {
    MigrationId::new(name.to_owned()).expect("valid id")
}

fn offer(name: &str) -> OfferSummary {
    OfferSummary { migration_id: id(name), vshard_id: VShardId(7), bytes_total: 1000, files_count: 2, wal: true }
}

const NEW: Disk = Disk { staging_exists: false, free_bytes: None };
const EXISTING: Disk = Disk { staging_exists: true, free_bytes: None };
const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);

fn one_slot() -> Inbounds {
    Inbounds::new(Limits { max_inbound_count: 1, check_free_space: false })
}

/// Claims and begins `name` on `conn` from node-a.
fn receiving(machine: &mut Inbounds, name: &str, conn: ConnId) {
    assert_eq!(machine.claim(&offer(name), conn, Some("node-a"), NEW), Ok(Claimed::Taken));
    machine.begin(&offer(name), conn, Begin::Receive, 5).expect("begin");
}

fn state(machine: &Inbounds, name: &str) -> Option<InboundState> {
    machine.get(&id(name)).map(|m| m.state.clone())
}

#[test]
fn a_refused_offer_for_a_released_id_leaves_it_released_and_frees_its_slot() {
    // The phantom-migration sequence: a re-copy under a released id with other files is
    // refused after its claim (the staging holds another migration).
    let mut machine = one_slot();
    machine.adopt(&id("m1"), InboundState::Released { final_lsn: Some(Lsn(9)) }, Some("node-a".into()));
    assert_eq!(machine.claim(&offer("m1"), A, Some("node-a"), EXISTING), Ok(Claimed::Taken));
    // The engine found the staging refuses the offer and releases the claim.
    assert!(machine.release_claim(&id("m1"), A));
    assert_eq!(state(&machine, "m1"), Some(InboundState::Released { final_lsn: Some(Lsn(9)) }));
    assert_eq!(machine.check_forget(&id("m1")), Ok(()));
    // The only slot is free: a new migration is admitted.
    assert_eq!(machine.claim(&offer("m2"), B, Some("node-a"), NEW), Ok(Claimed::Taken));
}

#[test]
fn a_claim_holds_a_slot_before_its_migration_is_visible() {
    let mut machine = one_slot();
    assert_eq!(machine.claim(&offer("m1"), A, Some("node-a"), NEW), Ok(Claimed::Taken));
    assert_eq!(state(&machine, "m1"), None, "a claim is not a visible migration");
    assert_eq!(
        machine.claim(&offer("m2"), B, Some("node-a"), NEW),
        Err(InboundError::AtCapacity { active_count: 1, limit: 1 })
    );
    assert!(machine.release_claim(&id("m1"), A));
    assert_eq!(machine.claim(&offer("m2"), B, Some("node-a"), NEW), Ok(Claimed::Taken));
}

#[test]
fn a_resumed_migration_is_not_counted_twice_nor_checked_against_the_limit() {
    let mut machine = one_slot();
    receiving(&mut machine, "m1", A);
    machine.interrupted(&id("m1")).expect("interrupted");
    assert!(machine.release_claim(&id("m1"), A));
    assert_eq!(machine.claim(&offer("m1"), B, Some("node-a"), EXISTING), Ok(Claimed::Taken));
    machine.begin(&offer("m1"), B, Begin::Receive, 6).expect("resume");
    assert_eq!(state(&machine, "m1"), Some(InboundState::Receiving));
    assert_eq!(machine.get(&id("m1")).map(|m| m.started_at_unix_ms), Some(5), "a resume keeps the start time");
}

#[test]
fn a_begin_records_whether_a_wal_stream_follows() {
    let mut machine = Inbounds::default();
    let offline = OfferSummary { wal: false, ..offer("m1") };
    assert_eq!(machine.claim(&offline, A, Some("node-a"), NEW), Ok(Claimed::Taken));
    machine.begin(&offline, A, Begin::Receive, 5).expect("begin");
    assert_eq!(machine.get(&id("m1")).map(|m| m.wal_follows), Some(false));
    receiving(&mut machine, "m2", B);
    assert_eq!(machine.get(&id("m2")).map(|m| m.wal_follows), Some(true));
}

#[test]
fn free_space_is_checked_only_when_asked_for() {
    let mut machine = Inbounds::new(Limits { max_inbound_count: 0, check_free_space: true });
    assert!(machine.needs_free_space());
    let short = Disk { staging_exists: false, free_bytes: Some(999) };
    assert_eq!(
        machine.claim(&offer("m1"), A, None, short),
        Err(InboundError::LacksSpace { needed_bytes: 1000, free_bytes: 999 })
    );
    assert!(!machine.is_claimed(&id("m1")), "a refused claim holds nothing");
    let mut unchecked = Inbounds::new(Limits::default());
    assert_eq!(unchecked.claim(&offer("m1"), A, None, short), Ok(Claimed::Taken));
}

#[test]
fn a_reconnecting_source_supersedes_its_old_connection_and_another_node_is_refused() {
    let mut machine = Inbounds::default();
    receiving(&mut machine, "m1", A);
    assert_eq!(machine.claim(&offer("m1"), B, Some("node-a"), EXISTING), Ok(Claimed::Superseding { old: A }));
    assert_eq!(
        machine.claim(&offer("m1"), B, Some("node-c"), EXISTING),
        Err(InboundError::HeldByOtherNode { id: id("m1") })
    );
    assert!(!machine.may_act(&id("m1"), Some("node-c")));
    assert!(machine.may_act(&id("m1"), Some("node-a")));
    // The old connection's conversation ends; the new one takes over.
    assert!(machine.release_claim(&id("m1"), A));
    assert!(!machine.release_claim(&id("m1"), A), "released once");
    assert_eq!(machine.claim(&offer("m1"), B, Some("node-a"), EXISTING), Ok(Claimed::Taken));
    assert_eq!(machine.claimant(&id("m1")), Some(B));
}

#[test]
fn only_the_recorded_source_may_act_on_a_staging_after_a_restart() {
    // A target restarted: no claims, the staging's manifest names node-a.
    let mut machine = Inbounds::default();
    machine.adopt(&id("m1"), InboundState::Fenced { final_lsn: Lsn(8) }, Some("node-a".into()));
    assert!(machine.may_act(&id("m1"), Some("node-a")));
    assert!(!machine.may_act(&id("m1"), Some("node-c")), "a third node may not release or abort it");
    assert_eq!(
        machine.claim(&offer("m1"), A, Some("node-c"), EXISTING),
        Err(InboundError::HeldByOtherNode { id: id("m1") }),
        "nor offer under its id"
    );
    assert_eq!(machine.claim(&offer("m1"), A, Some("node-a"), EXISTING), Ok(Claimed::Taken));
    // A staging of an earlier ferry names no source: any allowed node may, as before.
    machine.adopt(&id("m2"), InboundState::BaseStaged, None);
    assert!(machine.may_act(&id("m2"), Some("node-c")));
}

#[test]
fn begin_needs_the_claim() {
    let mut machine = Inbounds::default();
    assert_eq!(
        machine.begin(&offer("m1"), A, Begin::Receive, 0).err(),
        Some(InboundError::NotClaimed { id: id("m1") })
    );
    assert_eq!(state(&machine, "m1"), None);
}

/// The `fenced` MANIFEST commit follows the fence's answer: a target that lost it (a crash
/// between the answer and the release) is base staged again, and a release that names the
/// durable LSN of the fence's answer derives the fence; one without it, or naming a durable LSN
/// above its `final_lsn`, is refused, as is one of a staging that is not base staged.
#[test]
fn a_release_naming_the_fences_durable_lsn_derives_a_lost_fenced_commit() {
    let mut machine = Inbounds::default();
    receiving(&mut machine, "m1", A);
    assert!(machine.check_release(&id("m1"), Lsn(20), Some(Lsn(18))).is_err(), "still receiving: refused");
    machine.base_staged(&id("m1"), 0).expect("staged");
    assert!(machine.check_release(&id("m1"), Lsn(20), None).is_err(), "no evidence: refused");
    assert!(machine.check_release(&id("m1"), Lsn(20), Some(Lsn(21))).is_err(), "durable above the fence: refused");
    assert_eq!(
        machine.check_release(&id("m1"), Lsn(20), Some(Lsn(18))),
        Ok(ReleaseStep::Derive { durable_lsn: Lsn(18) })
    );
    assert!(machine.released(&id("m1"), Lsn(20), None).is_err(), "recorded only with the same evidence");
    machine.released(&id("m1"), Lsn(20), Some(Lsn(18))).expect("released");
    assert_eq!(state(&machine, "m1"), Some(InboundState::Released { final_lsn: Some(Lsn(20)) }));
    assert_eq!(machine.check_release(&id("m1"), Lsn(20), Some(Lsn(18))), Ok(ReleaseStep::Already));
}

#[test]
fn the_full_life_of_a_live_migration() {
    let mut machine = Inbounds::default();
    receiving(&mut machine, "m1", A);
    let m = machine.get(&id("m1")).expect("known");
    assert_eq!((m.source_node.as_deref(), m.vshard_id, m.started_at_unix_ms), (Some("node-a"), Some(VShardId(7)), 5));
    machine.progress(&id("m1"), 500, 10).expect("progress");
    machine.base_staged(&id("m1"), 10).expect("staged");
    assert_eq!(machine.get(&id("m1")).map(|m| (m.bytes_verified, m.files_staged_count)), Some((1000, 2)));
    assert_eq!(
        machine.check_release(&id("m1"), Lsn(20), None).err().map(|e| e.blame()),
        Some(Blame::Peer),
        "a release from copying is refused"
    );
    machine.fenced(&id("m1"), Lsn(20)).expect("fenced");
    assert_eq!(machine.fenced_at(&id("m1")), Some(Lsn(20)));
    machine.unfenced(&id("m1")).expect("unfenced");
    machine.fenced(&id("m1"), Lsn(25)).expect("fenced again");
    assert!(machine.check_release(&id("m1"), Lsn(20), None).is_err(), "released only at the fence's LSN");
    assert!(machine.check_release(&id("m1"), Lsn(20), Some(Lsn(19))).is_err(), "fenced elsewhere: no derivation");
    assert_eq!(machine.check_release(&id("m1"), Lsn(25), Some(Lsn(24))), Ok(ReleaseStep::Write));
    machine.released(&id("m1"), Lsn(25), None).expect("released");
    assert_eq!(machine.check_release(&id("m1"), Lsn(25), None), Ok(ReleaseStep::Already));
    assert_eq!(machine.check_abort(&id("m1")), Err(InboundError::ReleasedCannotAbort { id: id("m1") }));
    assert!(matches!(machine.fenced(&id("m1"), Lsn(30)), Err(InboundError::Illegal { from: "released", .. })));
    assert_eq!(machine.check_forget(&id("m1")), Err(InboundError::StillReceiving { id: id("m1") }));
    assert!(machine.release_claim(&id("m1"), A));
    machine.forgotten(&id("m1")).expect("forgotten");
    assert_eq!(state(&machine, "m1"), None);
}

#[test]
fn an_aborted_id_refuses_offers_until_it_is_forgotten() {
    let mut machine = one_slot();
    receiving(&mut machine, "m1", A);
    assert_eq!(machine.check_forget(&id("m1")), Err(InboundError::NotFinal { id: id("m1"), state: "receiving" }));
    assert_eq!(machine.check_abort(&id("m1")), Ok(AbortStep::Remove));
    assert!(machine.release_claim(&id("m1"), A));
    machine.aborted(&id("m1"), "operator").expect("aborted");
    assert_eq!(machine.get(&id("m1")).and_then(Inbound::reason), Some("operator"));
    assert_eq!(machine.check_abort(&id("m1")), Ok(AbortStep::Already));
    assert_eq!(
        machine.claim(&offer("m1"), B, Some("node-a"), EXISTING),
        Err(InboundError::WasAborted { id: id("m1") })
    );
    // An aborted migration holds no slot.
    assert_eq!(machine.claim(&offer("m2"), B, Some("node-a"), NEW), Ok(Claimed::Taken));
    machine.forgotten(&id("m1")).expect("forgotten");
}

#[test]
fn an_unknown_id_can_be_aborted_into_a_tombstone() {
    let mut machine = Inbounds::default();
    assert_eq!(machine.check_abort(&id("m9")), Ok(AbortStep::Remove));
    machine.aborted(&id("m9"), "never started").expect("tombstone");
    assert!(matches!(state(&machine, "m9"), Some(InboundState::Aborted { .. })));
}

#[test]
fn an_already_staged_offer_takes_the_staging_state_from_disk() {
    let mut machine = Inbounds::default();
    machine.adopt(&id("m1"), InboundState::Fenced { final_lsn: Lsn(40) }, None);
    assert_eq!(machine.claim(&offer("m1"), A, Some("node-a"), EXISTING), Ok(Claimed::Taken));
    let begin = Begin::AlreadyStaged { state: StagingState::Fenced, final_lsn: Some(Lsn(40)) };
    machine.begin(&offer("m1"), A, begin, 1).expect("begin");
    assert_eq!(state(&machine, "m1"), Some(InboundState::Fenced { final_lsn: Lsn(40) }));
    let receive = machine.begin(&offer("m1"), A, Begin::Receive, 1);
    assert!(matches!(receive, Err(InboundError::Illegal { from: "fenced", .. })), "{receive:?}");
}

#[test]
fn an_offline_commit_releases_from_base_staged_only() {
    let mut machine = Inbounds::default();
    receiving(&mut machine, "m1", A);
    assert!(matches!(machine.committed(&id("m1"), Lsn(3)), Err(InboundError::Illegal { from: "receiving", .. })));
    machine.base_staged(&id("m1"), 0).expect("staged");
    machine.committed(&id("m1"), Lsn(3)).expect("committed");
    assert_eq!(state(&machine, "m1"), Some(InboundState::Released { final_lsn: Some(Lsn(3)) }));
}

#[test]
fn applied_only_grows_and_needs_a_known_migration() {
    let mut machine = Inbounds::default();
    assert_eq!(machine.applied(&id("m1"), Lsn(5)), Err(InboundError::NotFound { id: id("m1") }));
    receiving(&mut machine, "m1", A);
    assert_eq!(machine.applied(&id("m1"), Lsn(5)), Ok(Lsn(5)));
    assert_eq!(machine.applied(&id("m1"), Lsn(3)), Ok(Lsn(5)));
}

#[test]
fn staging_states_on_disk_map_to_machine_states() {
    assert_eq!(InboundState::of_staging(StagingState::Copying, false, None), InboundState::Interrupted);
    assert_eq!(InboundState::of_staging(StagingState::Copying, true, None), InboundState::BaseStaged);
    assert_eq!(
        InboundState::of_staging(StagingState::Fenced, true, Some(Lsn(4))),
        InboundState::Fenced { final_lsn: Lsn(4) }
    );
    assert_eq!(InboundState::of_staging(StagingState::Fenced, true, None), InboundState::BaseStaged);
    assert!(InboundState::of_staging(StagingState::Aborted, false, None).is_final());
}

#[derive(Debug, Clone)]
enum Step {
    Claim { m: u8, conn: u8, peer: u8, exists: bool },
    Release { m: u8, conn: u8 },
    Begin { m: u8, conn: u8 },
    BaseStaged { m: u8 },
    Interrupted { m: u8 },
    Fence { m: u8, lsn: u8 },
    Unfence { m: u8 },
    ReleaseAt { m: u8, lsn: u8, durable: Option<u8> },
    Abort { m: u8 },
    Forget { m: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    let m = 0u8..3;
    prop_oneof![
        (m.clone(), 0u8..3, 0u8..2, any::<bool>()).prop_map(|(m, conn, peer, exists)| Step::Claim {
            m,
            conn,
            peer,
            exists
        }),
        (m.clone(), 0u8..3).prop_map(|(m, conn)| Step::Release { m, conn }),
        (m.clone(), 0u8..3).prop_map(|(m, conn)| Step::Begin { m, conn }),
        m.clone().prop_map(|m| Step::BaseStaged { m }),
        m.clone().prop_map(|m| Step::Interrupted { m }),
        (m.clone(), 0u8..3).prop_map(|(m, lsn)| Step::Fence { m, lsn }),
        m.clone().prop_map(|m| Step::Unfence { m }),
        (m.clone(), 0u8..3, proptest::option::of(0u8..4)).prop_map(|(m, lsn, durable)| Step::ReleaseAt {
            m,
            lsn,
            durable
        }),
        m.clone().prop_map(|m| Step::Abort { m }),
        m.prop_map(|m| Step::Forget { m }),
    ]
}

proptest! {
    /// Any sequence of events: a refused transition changes nothing, a new admission never
    /// takes more than the limit, and a released migration never leaves `released` except by
    /// forget.
    #[test]
    fn refusals_change_nothing_and_slots_stay_bounded(steps in proptest::collection::vec(step(), 0..60)) {
        let mut machine = one_slot();
        let name = |m: u8| format!("m{m}");
        for step in steps {
            let before = format!("{:?}", machine);
            let was_released: Vec<bool> = (0..3)
                .map(|m| matches!(state(&machine, &name(m)), Some(InboundState::Released { .. })))
                .collect();
            let result: Result<(), InboundError> = match step {
                Step::Claim { m, conn, peer, exists } => {
                    let disk = Disk { staging_exists: exists, free_bytes: None };
                    let peer = if peer == 0 { "node-a" } else { "node-c" };
                    let admitted_before = machine.active_count_without(&id(&name(m)));
                    let claimed_before = machine.is_claimed(&id(&name(m)));
                    let claimed = machine.claim(&offer(&name(m)), ConnId(conn.into()), Some(peer), disk);
                    if claimed == Ok(Claimed::Taken) && !exists && !claimed_before && !machine.get(&id(&name(m))).is_some_and(|e| e.state.holds_slot()) {
                        prop_assert!(admitted_before < 1, "admitted over the limit");
                    }
                    claimed.map(|_| ())
                }
                Step::Release { m, conn } => {
                    machine.release_claim(&id(&name(m)), ConnId(conn.into()));
                    Ok(())
                }
                Step::Begin { m, conn } => machine.begin(&offer(&name(m)), ConnId(conn.into()), Begin::Receive, 0).map(|_| ()),
                Step::BaseStaged { m } => machine.base_staged(&id(&name(m)), 0),
                Step::Interrupted { m } => machine.interrupted(&id(&name(m))),
                Step::Fence { m, lsn } => machine.fenced(&id(&name(m)), Lsn(lsn.into())),
                Step::Unfence { m } => machine.unfenced(&id(&name(m))),
                Step::ReleaseAt { m, lsn, durable } => {
                    machine.released(&id(&name(m)), Lsn(lsn.into()), durable.map(|d| Lsn(d.into())))
                }
                Step::Abort { m } => machine.aborted(&id(&name(m)), "test"),
                Step::Forget { m } => machine.forgotten(&id(&name(m))),
            };
            if result.is_err() {
                prop_assert_eq!(before, format!("{:?}", machine), "a refusal changed the machine");
            }
            for m in 0..3u8 {
                let known = state(&machine, &name(m));
                if was_released[usize::from(m)] {
                    let still_released = matches!(known, None | Some(InboundState::Released { .. }));
                    prop_assert!(still_released, "a released migration left released: {:?}", known);
                }
            }
        }
    }
}
