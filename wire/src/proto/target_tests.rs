//! Tests of the target's conversation, driven with messages and engine reports only.

#![allow(clippy::unwrap_used, clippy::panic)]

use proptest::prelude::*;

use super::*;
use crate::frame::PROTOCOL_VERSION;
use crate::ids::VShardId;
use crate::message::{ErrorKind, FileResume, OfferFile};
use crate::proto::Blame;

const CHUNK: u32 = 4096;

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn offer(sizes: &[u64]) -> Offer {
    Offer {
        migration_id: MigrationId::new("m1".to_owned()).unwrap(),
        vshard_id: VShardId(3),
        base_lsn: Lsn(10),
        chunk_len_bytes: CHUNK,
        files: sizes
            .iter()
            .enumerate()
            .map(|(i, s)| OfferFile { path: RelPath::new(format!("f{i}")).unwrap(), size_bytes: *s })
            .collect(),
        db_meta: serde_json::Value::Null,
        wal: false,
    }
}

fn source_hello() -> Message {
    Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("source") }
}

fn drain(c: &mut TargetConversation) -> Vec<TargetAction> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

/// A conversation past the hello and the offer, admitted to receive `sizes`.
fn receiving(sizes: &[u64]) -> TargetConversation {
    let mut c = TargetConversation::new(node("target"), 1 << 20);
    c.handle_message(Some(source_hello())).unwrap();
    assert!(matches!(drain(&mut c)[..], [TargetAction::Send(Message::Hello { .. })]));
    c.handle_message(Some(Message::Offer(offer(sizes)))).unwrap();
    assert!(matches!(drain(&mut c)[..], [TargetAction::Admit(_)]));
    c.handle_admitted(Admitted::Receive { session: TargetSession::new(&offer(sizes)) }).unwrap();
    c
}

fn written(file_index: u32, chunk_index: u64, bytes: &[u8]) -> ChunkEvent {
    let len_bytes = u32::try_from(bytes.len()).unwrap();
    ChunkEvent::Written { chunk: ChunkRef { file_index, chunk_index }, crc32c: crate::crc32c(bytes), len_bytes }
}

fn sent(actions: &[TargetAction]) -> Vec<&'static str> {
    actions
        .iter()
        .map(|a| match a {
            TargetAction::Send(m) => m.name(),
            TargetAction::Admit(_) => "ADMIT",
            TargetAction::Join { .. } => "JOIN",
            TargetAction::Release { .. } => "RELEASE",
            TargetAction::Abort { .. } => "ABORT",
            TargetAction::Sync => "SYNC",
            TargetAction::FinalizeFile { .. } => "FINALIZE",
            TargetAction::StageBase { .. } => "STAGE_BASE",
            TargetAction::Commit { .. } => "COMMIT",
            TargetAction::Fence(_) => "FENCE",
            TargetAction::CommitFenced { .. } => "COMMIT_FENCED",
            TargetAction::CarryChunks => "CARRY",
            TargetAction::Finish => "FINISH",
        })
        .collect()
}

#[test]
fn an_offline_copy_runs_from_hello_to_finish() {
    let data = vec![7u8; 6000];
    let mut c = receiving(&[6000]);
    let actions = drain(&mut c);
    let [TargetAction::Send(Message::Accept { resume, bytes_resent: 0, already_staged: false })] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert!(resume.is_empty());
    assert_eq!(c.check_chunk(0, 0, CHUNK), Ok(ChunkVerdict::Write { chunk_index: 0 }));
    assert_eq!(c.check_chunk(0, u64::from(CHUNK), 6000 - CHUNK), Ok(ChunkVerdict::Write { chunk_index: 1 }));
    c.handle_chunks(&[written(0, 0, &data[..4096]), written(0, 1, &data[4096..])]).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["acks"]);
    assert_eq!(c.progress(), Some((6000, 0, 0)));
    // The source's FileDone makes the file ready: the engine finalises it.
    c.handle_message(Some(Message::FileDone { file_index: 0, size_bytes: 6000, crc32c: crate::crc32c(&data) }))
        .unwrap();
    assert_eq!(sent(&drain(&mut c)), ["FINALIZE"]);
    c.handle_file_finalized(0).unwrap();
    let actions = drain(&mut c);
    assert_eq!(sent(&actions), ["file_staged", "STAGE_BASE"]);
    assert_eq!(actions[1], TargetAction::StageBase { segment_crcs: vec![crate::crc32c(&data)], bytes_resent: 0 });
    assert!(c.is_receiving());
    c.handle_base_written(0).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["base_staged"]);
    assert!(!c.is_receiving());
    c.handle_message(Some(Message::Commit { final_lsn: Lsn(12) })).unwrap();
    assert_eq!(drain(&mut c), [TargetAction::Commit { final_lsn: Lsn(12) }]);
    c.handle_committed().unwrap();
    assert_eq!(sent(&drain(&mut c)), ["committed"]);
    c.handle_message(None).unwrap();
    assert_eq!(drain(&mut c), [TargetAction::Finish]);
    assert!(c.is_finished());
}

#[test]
fn a_resumed_copy_offers_what_it_holds_and_counts_files_staged_before() {
    let data = vec![1u8; 4096];
    let mut session = TargetSession::new(&offer(&[4096, 4096]));
    session.restore_staged(0, crate::crc32c(&data)).unwrap();
    session.restore_chunk(1, 0, crate::crc32c(&data)).unwrap();
    let mut c = TargetConversation::new(node("target"), 1 << 20);
    c.handle_message(Some(source_hello())).unwrap();
    c.handle_message(Some(Message::Offer(offer(&[4096, 4096])))).unwrap();
    drain(&mut c);
    c.handle_admitted(Admitted::Receive { session }).unwrap();
    let actions = drain(&mut c);
    let [TargetAction::Send(Message::Accept { resume, .. })] = &actions[..] else { panic!("{actions:?}") };
    assert_eq!(resume.len(), 2);
    assert_eq!(resume[1], FileResume { file_index: 1, chunks: vec![(0, crate::crc32c(&data))] });
    // A resent chunk is a duplicate: acked, not written.
    assert_eq!(c.check_chunk(1, 0, 4096), Ok(ChunkVerdict::Duplicate { chunk_index: 0 }));
    c.handle_chunks(&[ChunkEvent::Duplicate(ChunkRef { file_index: 1, chunk_index: 0 })]).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["acks"]);
    // A file staged by an earlier run is counted without finalising it again.
    let crc = crate::crc32c(&data);
    c.handle_message(Some(Message::FileDone { file_index: 0, size_bytes: 4096, crc32c: crc })).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["file_staged"]);
    c.handle_message(Some(Message::FileDone { file_index: 1, size_bytes: 4096, crc32c: crc })).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["FINALIZE"]);
    c.handle_file_finalized(1).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["file_staged", "STAGE_BASE"]);
    assert_eq!(c.handle_file_finalized(1).unwrap_err().blame(), Blame::Local);
}

#[test]
fn enough_unsynced_bytes_ask_for_a_sync_before_the_acks() {
    let mut c = TargetConversation::new(node("target"), 8192);
    c.handle_message(Some(source_hello())).unwrap();
    c.handle_message(Some(Message::Offer(offer(&[16384])))).unwrap();
    c.handle_admitted(Admitted::Receive { session: TargetSession::new(&offer(&[16384])) }).unwrap();
    drain(&mut c);
    c.handle_chunks(&[written(0, 0, &[0; 4096])]).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["acks"]);
    c.handle_chunks(&[written(0, 1, &[0; 4096])]).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["SYNC", "acks"]);
    c.handle_chunks(&[written(0, 2, &[0; 4096])]).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["acks"]);
}

#[test]
fn an_empty_offer_goes_straight_to_the_manifest_and_an_already_staged_one_to_base_staged() {
    let mut c = receiving(&[]);
    assert_eq!(sent(&drain(&mut c)), ["accept", "STAGE_BASE"]);
    let mut c = TargetConversation::new(node("target"), 1 << 20);
    c.handle_message(Some(source_hello())).unwrap();
    c.handle_message(Some(Message::Offer(offer(&[5])))).unwrap();
    drain(&mut c);
    c.handle_admitted(Admitted::AlreadyStaged { bytes_resent: 9 }).unwrap();
    let actions = drain(&mut c);
    assert!(matches!(actions[0], TargetAction::Send(Message::Accept { already_staged: true, .. })));
    assert_eq!(actions[1], TargetAction::Send(Message::BaseStaged { bytes_resent: 9 }));
}

#[test]
fn a_fence_below_the_base_or_through_a_later_record_is_cancelled_without_the_engine() {
    let mut c = receiving(&[]);
    drain(&mut c);
    c.handle_base_written(0).unwrap();
    drain(&mut c);
    let fence = |final_lsn: u64, through_lsn: Option<u64>| Message::Fence {
        final_lsn: Lsn(final_lsn),
        apply_wait_max_us: 5,
        through_lsn: through_lsn.map(Lsn),
        wal_wait_max_us: 6,
    };
    c.handle_message(Some(fence(9, None))).unwrap();
    let actions = drain(&mut c);
    let [TargetAction::Send(Message::FenceCancelled { reason })] = &actions[..] else { panic!("{actions:?}") };
    assert!(reason.contains("below the migration's base_lsn 10"), "{reason}");
    c.handle_message(Some(fence(20, Some(21)))).unwrap();
    assert_eq!(sent(&drain(&mut c)), ["fence_cancelled"]);
    c.handle_message(Some(fence(20, Some(20)))).unwrap();
    let request =
        FenceRequest { final_lsn: Lsn(20), through_lsn: Some(Lsn(20)), wal_wait_max_us: 6, apply_wait_max_us: 5 };
    assert_eq!(drain(&mut c), [TargetAction::Fence(request)]);
    // No message before the answer.
    assert!(c.handle_message(Some(Message::Commit { final_lsn: Lsn(20) })).is_err());
    // A cancelled fence may be asked again, and a fenced one answered.
    let mut c = receiving(&[]);
    drain(&mut c);
    c.handle_base_written(0).unwrap();
    c.handle_message(Some(fence(20, None))).unwrap();
    drain(&mut c);
    c.handle_fence_answer(FenceAnswer::Cancelled { reason: "ingest late".into() }).unwrap();
    c.handle_message(Some(fence(20, None))).unwrap();
    drain(&mut c);
    c.handle_fence_answer(FenceAnswer::Fenced { durable_lsn: Lsn(20), commit_us: 3, apply_wait_us: 0 }).unwrap();
    let actions = drain(&mut c);
    // The answer first, then the `fenced` MANIFEST commit, off the pause's path.
    assert_eq!(
        actions,
        [
            TargetAction::Send(Message::Fenced { durable_lsn: Lsn(20), commit_us: 3, apply_wait_us: 0 }),
            TargetAction::CommitFenced { final_lsn: Lsn(20) }
        ]
    );
}

#[test]
fn one_shot_requests_are_answered_then_finished() {
    let id = MigrationId::new("m9".to_owned()).unwrap();
    let requests = [
        (
            Message::Release { migration_id: id.clone(), final_lsn: Lsn(4), fenced_durable_lsn: None },
            vec!["RELEASE", "released", "FINISH"],
        ),
        (Message::Abort { migration_id: id.clone(), reason: "r".into() }, vec!["ABORT", "aborted", "FINISH"]),
        (Message::Join { migration_id: id }, vec!["JOIN", "joined", "CARRY"]),
    ];
    for (request, expected) in requests {
        let mut c = TargetConversation::new(node("target"), 1);
        c.handle_message(Some(source_hello())).unwrap();
        drain(&mut c);
        c.handle_message(Some(request)).unwrap();
        let mut actions = drain(&mut c);
        c.handle_answered().unwrap();
        actions.extend(drain(&mut c));
        assert_eq!(sent(&actions), expected);
    }
}

/// Makes a conversation in the state under test.
type Make = fn() -> TargetConversation;

#[test]
fn the_wrong_message_in_each_state_is_the_peers_fault_and_ends_the_conversation() {
    let id = MigrationId::new("m1".to_owned()).unwrap();
    let all = [
        source_hello(),
        Message::Offer(offer(&[1])),
        Message::Join { migration_id: id.clone() },
        Message::Joined,
        Message::WalStart,
        Message::Accept { resume: Vec::new(), bytes_resent: 0, already_staged: false },
        Message::Acks { chunks: Vec::new() },
        Message::FileDone { file_index: 0, size_bytes: 1, crc32c: 0 },
        Message::BaseStaged { bytes_resent: 0 },
        Message::Commit { final_lsn: Lsn(11) },
        Message::Committed,
        Message::Fenced { durable_lsn: Lsn(1), commit_us: 0, apply_wait_us: 0 },
        Message::Released,
        Message::Aborted,
        Message::Error { kind: ErrorKind::Storage, message: "disk".into() },
    ];
    // Which of them each state takes.
    let takes: [(&str, Make, &[&str]); 3] = [
        ("await hello", || TargetConversation::new(node("t"), 1), &["hello"]),
        (
            "await request",
            || {
                let mut c = TargetConversation::new(node("t"), 1);
                c.handle_message(Some(source_hello())).unwrap();
                c
            },
            &["offer", "join"],
        ),
        ("receiving", || receiving(&[1, 1]), &["file_done"]),
    ];
    for (state, make, ok) in takes {
        for message in &all {
            let mut c = make();
            let result = c.handle_message(Some(message.clone()));
            if ok.contains(&message.name()) {
                assert!(result.is_ok(), "{state}: {} refused: {result:?}", message.name());
                continue;
            }
            let e = result.expect_err(&format!("{state}: {} taken", message.name()));
            assert_eq!(e.blame(), Blame::Peer, "{state}: {e}");
            // Over: nothing more is taken.
            assert!(c.handle_message(Some(Message::Commit { final_lsn: Lsn(11) })).is_err());
        }
    }
    let e = receiving(&[1]).handle_message(None).unwrap_err();
    assert!(e.to_string().contains("before the base was staged"), "{e}");
    let mut c = TargetConversation::new(node("t"), 1);
    let old = Message::Hello { protocol_version: PROTOCOL_VERSION + 1, node_id: node("s") };
    assert!(matches!(c.handle_message(Some(old)), Err(ConversationError::IncompatibleVersion { .. })));
}

#[test]
fn a_chunk_or_file_that_does_not_fit_the_offer_is_refused() {
    let mut c = receiving(&[6000]);
    drain(&mut c);
    assert!(matches!(c.check_chunk(1, 0, CHUNK), Err(ConversationError::Session(_))));
    assert!(c.check_chunk(0, 5, CHUNK).is_err());
    assert!(c.check_chunk(0, 0, 100).is_err());
    let done = Message::FileDone { file_index: 0, size_bytes: 5, crc32c: 0 };
    assert_eq!(c.handle_message(Some(done)).unwrap_err().blame(), Blame::Peer);
    // A wrong whole-file CRC, once every chunk is in.
    let mut c = receiving(&[100]);
    drain(&mut c);
    c.handle_chunks(&[written(0, 0, &[3; 100])]).unwrap();
    let done = Message::FileDone { file_index: 0, size_bytes: 100, crc32c: 1 };
    assert!(matches!(c.handle_message(Some(done)), Err(ConversationError::Session(_))));
    // Engine reports out of place are its own bug.
    let mut c = TargetConversation::new(node("t"), 1);
    assert_eq!(c.handle_committed().unwrap_err().blame(), Blame::Local);
    assert!(c.check_chunk(0, 0, 1).is_err(), "no chunk before an offer");
}

fn any_message() -> impl Strategy<Value = Option<Message>> {
    let id = MigrationId::new("m1".to_owned()).unwrap();
    prop_oneof![
        Just(None),
        Just(Some(source_hello())),
        Just(Some(Message::Offer(offer(&[5000, 1])))),
        (0u32..3, 0u64..9000, any::<u32>()).prop_map(|(f, s, crc)| Some(Message::FileDone {
            file_index: f,
            size_bytes: s,
            crc32c: crc
        })),
        (0u64..30).prop_map(|l| Some(Message::Commit { final_lsn: Lsn(l) })),
        (0u64..30, proptest::option::of(0u64..30)).prop_map(|(f, t)| Some(Message::Fence {
            final_lsn: Lsn(f),
            apply_wait_max_us: 1,
            through_lsn: t.map(Lsn),
            wal_wait_max_us: 1
        })),
        Just(Some(Message::Join { migration_id: id.clone() })),
        Just(Some(Message::Release { migration_id: id, final_lsn: Lsn(3), fenced_durable_lsn: Some(Lsn(2)) })),
        Just(Some(Message::Acks { chunks: Vec::new() })),
    ]
}

/// An engine report, or a chunk header from a stream.
#[derive(Debug, Clone)]
enum Report {
    Admitted(bool),
    Chunk(u32, u64, u32),
    Written(u32, u64),
    Finalized(u32),
    BaseWritten,
    Committed,
    FenceAnswer,
    Answered,
}

fn any_report() -> impl Strategy<Value = Report> {
    prop_oneof![
        any::<bool>().prop_map(Report::Admitted),
        (0u32..3, 0u64..3, 0u32..5000).prop_map(|(f, c, l)| Report::Chunk(f, c * u64::from(CHUNK), l)),
        (0u32..3, 0u64..3).prop_map(|(f, c)| Report::Written(f, c)),
        (0u32..3).prop_map(Report::Finalized),
        Just(Report::BaseWritten),
        Just(Report::Committed),
        Just(Report::FenceAnswer),
        Just(Report::Answered),
    ]
}

proptest! {
    /// No sequence of messages and reports panics, and once refused, the conversation stays over.
    #[test]
    fn no_input_panics_and_a_refusal_is_final(
        steps in proptest::collection::vec(prop_oneof![any_message().prop_map(Ok), any_report().prop_map(Err)], 0..40)
    ) {
        let mut c = TargetConversation::new(node("t"), 4096);
        let mut failed = false;
        for step in steps {
            let header_check = matches!(step, Err(Report::Chunk(..)));
            let result = match step {
                Ok(message) => c.handle_message(message),
                Err(Report::Admitted(true)) => c.handle_admitted(Admitted::AlreadyStaged { bytes_resent: 0 }),
                Err(Report::Admitted(false)) => {
                    c.handle_admitted(Admitted::Receive { session: TargetSession::new(&offer(&[5000, 1])) })
                }
                Err(Report::Chunk(f, o, l)) => c.check_chunk(f, o, l).map(|_| ()),
                Err(Report::Written(f, i)) => c.handle_chunks(&[ChunkEvent::Written {
                    chunk: ChunkRef { file_index: f, chunk_index: i },
                    crc32c: 0,
                    len_bytes: 4096,
                }]),
                Err(Report::Finalized(f)) => c.handle_file_finalized(f),
                Err(Report::BaseWritten) => c.handle_base_written(0),
                Err(Report::Committed) => c.handle_committed(),
                Err(Report::FenceAnswer) => c.handle_fence_answer(FenceAnswer::Cancelled { reason: "x".into() }),
                Err(Report::Answered) => c.handle_answered(),
            };
            while c.poll_action().is_some() {}
            if failed {
                prop_assert!(result.is_err(), "taken after a refusal");
            }
            // A chunk header's refusal fails its stream (and the driver the transfer); every
            // other refusal ends the conversation itself.
            failed |= result.is_err() && !header_check;
        }
    }
}
