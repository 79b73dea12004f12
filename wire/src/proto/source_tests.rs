//! Tests of the source's conversation, driven with messages, events and time only.

#![allow(clippy::unwrap_used, clippy::panic)]

use proptest::prelude::*;

use super::*;
use crate::frame::PROTOCOL_VERSION;
use crate::ids::VShardId;
use crate::message::{ChunkRef, ErrorKind, FileResume, OfferFile};
use crate::path::RelPath;
use crate::proto::Blame;

const CHUNK: u32 = 4096;

fn node(name: &str) -> NodeId {
    NodeId::new(name.to_owned()).expect("valid node id")
}

fn id() -> MigrationId {
    MigrationId::new("m1".to_owned()).expect("valid id")
}

/// Two files: one of two chunks, one of one.
fn offer(wal: bool) -> Offer {
    Offer {
        migration_id: id(),
        vshard_id: VShardId(7),
        base_lsn: Lsn(100),
        chunk_len_bytes: CHUNK,
        files: vec![
            OfferFile { path: RelPath::new("a").expect("path"), size_bytes: u64::from(CHUNK) + 10 },
            OfferFile { path: RelPath::new("b").expect("path"), size_bytes: 10 },
        ],
        db_meta: serde_json::Value::Null,
        wal,
    }
}

const OFFLINE: CopyPlan = CopyPlan { wal: false, cutover: false, commit: true };
const LIVE: CopyPlan = CopyPlan { wal: true, cutover: true, commit: false };

fn target_hello() -> Message {
    Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("target") }
}

fn accept(resume: Vec<FileResume>) -> Message {
    Message::Accept { resume, bytes_resent: 0, already_staged: false }
}

fn drain(machine: &mut SourceConversation) -> Vec<SourceAction> {
    std::iter::from_fn(|| machine.poll_action()).collect()
}

fn feed(machine: &mut SourceConversation, message: Message) {
    machine.handle_message(Some(message), 0).expect("message taken");
}

/// A copy through hello and accept (nothing resumed).
fn accepted(plan: CopyPlan) -> SourceConversation {
    let mut machine = SourceConversation::copy(&node("source"), offer(plan.wal), plan);
    assert_eq!(drain(&mut machine), vec![SourceAction::Send(hello(&node("source")))]);
    feed(&mut machine, target_hello());
    assert_eq!(drain(&mut machine), vec![SourceAction::Send(Message::Offer(offer(plan.wal)))]);
    feed(&mut machine, accept(vec![]));
    drain(&mut machine);
    machine
}

/// Reads and sends every chunk the machine hands out; returns them.
fn send_all(machine: &mut SourceConversation) -> Vec<ChunkRef> {
    let mut sent = Vec::new();
    while let Some(span) = machine.poll_chunk(1) {
        machine.handle_chunk_read(&span, 7).expect("chunk read");
        sent.push(span.chunk);
    }
    sent
}

/// A copy whose base is staged.
fn base_staged(plan: CopyPlan) -> SourceConversation {
    let mut machine = accepted(plan);
    let sent = send_all(&mut machine);
    feed(&mut machine, Message::Acks { chunks: sent });
    drain(&mut machine);
    feed(&mut machine, Message::BaseStaged { bytes_resent: 0 });
    drain(&mut machine);
    machine
}

#[test]
fn a_copy_resumes_rechecks_sends_the_rest_and_commits() {
    let mut machine = SourceConversation::copy(&node("source"), offer(false), OFFLINE);
    drain(&mut machine);
    feed(&mut machine, target_hello());
    drain(&mut machine);
    // The target holds the first chunk of file 0.
    feed(&mut machine, accept(vec![FileResume { file_index: 0, chunks: vec![(0, 9)] }]));
    let recheck = ChunkSpan { chunk: ChunkRef { file_index: 0, chunk_index: 0 }, offset_bytes: 0, len_bytes: CHUNK };
    assert_eq!(
        drain(&mut machine),
        vec![
            SourceAction::Accepted { already_staged: false, bytes_resumed: u64::from(CHUNK) },
            SourceAction::Recheck(vec![recheck]),
            SourceAction::SendChunks,
        ]
    );
    machine.handle_chunk_read(&recheck, 9).expect("recheck");
    let sent = send_all(&mut machine);
    assert_eq!(sent, vec![ChunkRef { file_index: 0, chunk_index: 1 }, ChunkRef { file_index: 1, chunk_index: 0 }]);
    let announced: Vec<u32> = drain(&mut machine)
        .into_iter()
        .map(|a| match a {
            SourceAction::SendFileDone { file_index, message: Message::FileDone { file_index: f, .. } } => {
                assert_eq!(file_index, f);
                file_index
            }
            other => panic!("unexpected action {other:?}"),
        })
        .collect();
    assert_eq!(announced, vec![0, 1]);
    // Acks come in batches, with duplicates; an ack of a chunk never sent is refused.
    feed(&mut machine, Message::Acks { chunks: sent.clone() });
    feed(&mut machine, Message::Acks { chunks: sent });
    let never = Message::Acks { chunks: vec![ChunkRef { file_index: 9, chunk_index: 0 }] };
    assert!(matches!(machine.handle_message(Some(never), 0), Err(ConversationError::Session(_))));
    assert_eq!(machine.progress().bytes_transferred, u64::from(CHUNK) + 20);
    feed(&mut machine, Message::FileStaged { file_index: 0 });
    assert_eq!(machine.progress().files_staged_count, 1);
    feed(&mut machine, Message::BaseStaged { bytes_resent: 3 });
    assert_eq!(
        drain(&mut machine),
        vec![SourceAction::BaseStaged { bytes_resent: 3 }, SourceAction::Send(Message::Commit { final_lsn: Lsn(100) })]
    );
    assert_eq!(machine.progress().files_staged_count, 2);
    feed(&mut machine, Message::Committed);
    assert_eq!(drain(&mut machine), vec![SourceAction::Finish { final_lsn: Lsn(100), committed: true, fenced: false }]);
    assert_eq!(machine.state(), SourceState::Done);
}

#[test]
fn an_already_staged_base_sends_nothing_and_waits_for_base_staged() {
    let plan = CopyPlan { wal: false, cutover: false, commit: false };
    let mut machine = SourceConversation::copy(&node("source"), offer(false), plan);
    drain(&mut machine);
    feed(&mut machine, target_hello());
    drain(&mut machine);
    feed(&mut machine, Message::Accept { resume: vec![], bytes_resent: 0, already_staged: true });
    assert_eq!(drain(&mut machine), vec![SourceAction::Accepted { already_staged: true, bytes_resumed: 0 }]);
    assert_eq!(machine.poll_chunk(0), None);
    feed(&mut machine, Message::Acks { chunks: vec![ChunkRef { file_index: 0, chunk_index: 0 }] });
    feed(&mut machine, Message::BaseStaged { bytes_resent: 0 });
    assert_eq!(
        drain(&mut machine),
        vec![
            SourceAction::BaseStaged { bytes_resent: 0 },
            SourceAction::Finish { final_lsn: Lsn(100), committed: false, fenced: false }
        ]
    );
}

#[test]
fn base_staged_before_every_ack_is_refused() {
    let mut machine = accepted(OFFLINE);
    send_all(&mut machine);
    let e = machine.handle_message(Some(Message::BaseStaged { bytes_resent: 0 }), 0).unwrap_err();
    assert!(matches!(e, ConversationError::Rule(_)), "{e}");
    assert_eq!(e.blame(), Blame::Peer);
    assert_eq!(machine.state(), SourceState::SendingBase, "a refusal leaves the state as it was");
}

#[test]
fn an_offline_copy_with_a_wal_commits_at_the_wal_end() {
    let plan = CopyPlan { wal: true, cutover: false, commit: true };
    let mut machine = SourceConversation::copy(&node("source"), offer(true), plan);
    drain(&mut machine);
    feed(&mut machine, target_hello());
    drain(&mut machine);
    feed(&mut machine, accept(vec![]));
    assert_eq!(drain(&mut machine)[1], SourceAction::StartWal);
    let sent = send_all(&mut machine);
    feed(&mut machine, Message::Acks { chunks: sent });
    feed(&mut machine, Message::BaseStaged { bytes_resent: 0 });
    assert_eq!(drain(&mut machine).last(), Some(&SourceAction::FinishWal));
    assert!(matches!(machine.handle_fence(Lsn(1), None, 0, 10, 0), Err(ConversationError::Misuse { .. })));
    machine.handle_wal_finished(Lsn(150)).expect("wal finished");
    assert_eq!(drain(&mut machine), vec![SourceAction::Send(Message::Commit { final_lsn: Lsn(150) })]);
}

const MS: u64 = 1_000_000;

#[test]
fn a_live_copy_fences_after_a_cancelled_and_a_late_fence() {
    let mut machine = base_staged(LIVE);
    assert_eq!(machine.state(), SourceState::CutOver);
    // A fence the target cancels: the copy streams on.
    machine.handle_fence(Lsn(200), Some(Lsn(199)), 5_000, 100 * MS, 0).expect("fence");
    let Some(SourceAction::Send(Message::Fence { final_lsn, through_lsn, wal_wait_max_us, apply_wait_max_us })) =
        machine.poll_action()
    else {
        panic!("a fence is sent")
    };
    assert_eq!((final_lsn, through_lsn, apply_wait_max_us), (Lsn(200), Some(Lsn(199)), 5_000));
    assert_eq!(wal_wait_max_us, crate::fence::target_wait_us(0, 100 * MS));
    assert_eq!(machine.poll_timeout(), Some(100 * MS));
    // Trailing acks are fine during a fence.
    feed(&mut machine, Message::Acks { chunks: vec![] });
    feed(&mut machine, Message::FenceCancelled { reason: "ingest".into() });
    assert_eq!(
        drain(&mut machine),
        vec![SourceAction::FenceCancelled { final_lsn: Lsn(200), reason: "ingest".into() }]
    );
    // A fence with no answer by its deadline: its answer is skipped when it comes.
    machine.handle_fence(Lsn(300), None, 0, 200 * MS, 150 * MS).expect("fence");
    drain(&mut machine);
    machine.handle_timeout(199 * MS).expect("early timer");
    assert_eq!(drain(&mut machine), vec![]);
    machine.handle_timeout(200 * MS).expect("timer");
    assert_eq!(drain(&mut machine), vec![SourceAction::FenceTimedOut { final_lsn: Lsn(300) }]);
    assert_eq!(machine.poll_timeout(), None);
    feed(&mut machine, Message::Fenced { durable_lsn: Lsn(300), commit_us: 1, apply_wait_us: 0 });
    assert_eq!(drain(&mut machine), vec![]);
    // A fence the target holds, which the daemon took at first drop (a violation), then kept.
    for keep in [false, true] {
        machine.handle_fence(Lsn(400), None, 0, 300 * MS, 250 * MS).expect("fence");
        drain(&mut machine);
        feed(&mut machine, Message::Fenced { durable_lsn: Lsn(400), commit_us: 5, apply_wait_us: 2 });
        assert_eq!(
            drain(&mut machine),
            vec![SourceAction::Fenced { final_lsn: Lsn(400), durable_lsn: Lsn(400), commit_us: 5, apply_wait_us: 2 }]
        );
        if keep {
            machine.handle_fence_kept().expect("kept");
        } else {
            machine.handle_fence_dropped().expect("dropped");
            assert_eq!(machine.state(), SourceState::CutOver);
        }
    }
    assert_eq!(drain(&mut machine), vec![SourceAction::Finish { final_lsn: Lsn(400), committed: false, fenced: true }]);
    assert!(machine.handle_fence_kept().is_err());
}

#[test]
fn a_peer_error_is_its_failure_in_every_state() {
    let error = || Some(Message::error(ErrorKind::Refused, "no room"));
    let mut states = vec![SourceConversation::copy(&node("s"), offer(false), OFFLINE)];
    let mut awaiting_accept = SourceConversation::copy(&node("s"), offer(false), OFFLINE);
    feed(&mut awaiting_accept, target_hello());
    states.push(awaiting_accept);
    states.push(accepted(OFFLINE));
    states.push(base_staged(LIVE));
    states.push(base_staged(OFFLINE));
    let mut fencing = base_staged(LIVE);
    fencing.handle_fence(Lsn(1), None, 0, 10, 0).expect("fence");
    states.push(fencing);
    for mut machine in states {
        let e = machine.handle_message(error(), 0).unwrap_err();
        assert!(matches!(e, ConversationError::PeerFailed { kind: ErrorKind::Refused, .. }), "{e}");
        assert!(!e.is_transient());
    }
}

#[test]
fn a_version_mismatch_is_refused_by_name() {
    let mut machine = SourceConversation::copy(&node("s"), offer(false), OFFLINE);
    let old = Message::Hello { protocol_version: PROTOCOL_VERSION + 1, node_id: node("t") };
    let e = machine.handle_message(Some(old), 0).unwrap_err();
    assert_eq!(e, ConversationError::IncompatibleVersion { ours: PROTOCOL_VERSION, theirs: PROTOCOL_VERSION + 1 });
    assert_eq!(machine.state(), SourceState::AwaitHello);
}

#[test]
fn the_end_of_the_stream_mid_copy_is_a_lost_connection() {
    let mut machine = accepted(OFFLINE);
    send_all(&mut machine);
    let e = machine.handle_message(None, 0).unwrap_err();
    assert!(matches!(e, ConversationError::Ended { .. }), "{e}");
    assert!(e.is_transient());
    // Before the conversation is under way, it is the peer breaking the protocol.
    let mut machine = SourceConversation::copy(&node("s"), offer(false), OFFLINE);
    feed(&mut machine, target_hello());
    assert!(!machine.handle_message(None, 0).unwrap_err().is_transient());
}

#[test]
fn requests_send_after_the_hello_and_take_their_answer_only() {
    let cases = [
        (SourceConversation::join(&node("s"), id()), Message::Join { migration_id: id() }, Message::Joined, false),
        (
            SourceConversation::release(&node("s"), id(), Lsn(5), Some(Lsn(4))),
            Message::Release { migration_id: id(), final_lsn: Lsn(5), fenced_durable_lsn: Some(Lsn(4)) },
            Message::Released,
            true,
        ),
        (
            SourceConversation::abort(&node("s"), id(), "operator".into()),
            Message::Abort { migration_id: id(), reason: "operator".into() },
            Message::Aborted,
            true,
        ),
    ];
    for (mut machine, request, answer, end_is_lost) in cases {
        drain(&mut machine);
        feed(&mut machine, target_hello());
        assert_eq!(drain(&mut machine), vec![SourceAction::Send(request)]);
        for wrong in [Message::Joined, Message::Released, Message::Aborted, Message::Committed] {
            if wrong != answer {
                let e = machine.handle_message(Some(wrong), 0).unwrap_err();
                assert!(matches!(e, ConversationError::Unexpected { .. }), "{e}");
            }
        }
        assert_eq!(machine.clone().handle_message(None, 0).unwrap_err().is_transient(), end_is_lost);
        feed(&mut machine, answer);
        assert_eq!(drain(&mut machine), vec![SourceAction::Answered]);
        assert_eq!(machine.state(), SourceState::Done);
        assert!(machine
            .handle_chunk_read(
                &ChunkSpan { chunk: ChunkRef { file_index: 0, chunk_index: 0 }, offset_bytes: 0, len_bytes: 1 },
                0
            )
            .is_err());
    }
}

#[test]
fn engine_events_in_the_wrong_state_are_misuse() {
    let mut machine = SourceConversation::copy(&node("s"), offer(false), OFFLINE);
    let span = ChunkSpan { chunk: ChunkRef { file_index: 0, chunk_index: 0 }, offset_bytes: 0, len_bytes: CHUNK };
    let errors = [
        machine.handle_chunk_read(&span, 1),
        machine.handle_wal_finished(Lsn(1)),
        machine.handle_fence(Lsn(1), None, 0, 1, 0),
        machine.handle_fence_kept(),
        machine.handle_fence_dropped(),
    ];
    for e in errors {
        let e = e.unwrap_err();
        assert!(matches!(e, ConversationError::Misuse { .. }), "{e}");
        assert_eq!(e.blame(), Blame::Local);
    }
    // A chunk the machine never handed out.
    let mut machine = accepted(OFFLINE);
    let bogus = ChunkSpan { chunk: ChunkRef { file_index: 9, chunk_index: 0 }, offset_bytes: 0, len_bytes: 1 };
    assert!(matches!(machine.handle_chunk_read(&bogus, 1), Err(ConversationError::Misuse { .. })));
}

/// One of each message the target could send.
fn every_message() -> Vec<Message> {
    vec![
        target_hello(),
        Message::Offer(offer(false)),
        Message::Join { migration_id: id() },
        Message::Joined,
        Message::WalStart,
        Message::WalDurable { durable_lsn: Lsn(1) },
        accept(vec![]),
        Message::Acks { chunks: vec![] },
        Message::FileDone { file_index: 0, size_bytes: 1, crc32c: 0 },
        Message::FileStaged { file_index: 0 },
        Message::BaseStaged { bytes_resent: 0 },
        Message::Commit { final_lsn: Lsn(1) },
        Message::Committed,
        Message::Fence { final_lsn: Lsn(1), apply_wait_max_us: 0, through_lsn: None, wal_wait_max_us: 0 },
        Message::FenceCancelled { reason: "r".into() },
        Message::Fenced { durable_lsn: Lsn(1), commit_us: 0, apply_wait_us: 0 },
        Message::Release { migration_id: id(), final_lsn: Lsn(1), fenced_durable_lsn: None },
        Message::Released,
        Message::Abort { migration_id: id(), reason: "r".into() },
        Message::Aborted,
    ]
}

#[test]
fn every_unexpected_message_is_refused_in_each_state() {
    let mut fencing = base_staged(LIVE);
    fencing.handle_fence(Lsn(1), None, 0, 10, 0).expect("fence");
    drain(&mut fencing);
    let mut awaiting_accept = SourceConversation::copy(&node("s"), offer(false), OFFLINE);
    feed(&mut awaiting_accept, target_hello());
    drain(&mut awaiting_accept);
    let mut wal_end = base_staged(CopyPlan { wal: true, cutover: false, commit: false });
    drain(&mut wal_end);
    // (machine, the messages it takes)
    let cases: Vec<(SourceConversation, Vec<&str>)> = vec![
        (SourceConversation::copy(&node("s"), offer(false), OFFLINE), vec!["hello"]),
        (awaiting_accept, vec!["accept"]),
        // base_staged is taken, and refused by rule here: not every chunk is acknowledged.
        (accepted(OFFLINE), vec!["acks", "file_staged", "base_staged"]),
        (wal_end, vec![]),
        (base_staged(LIVE), vec![]),
        (fencing, vec!["acks", "file_staged", "fenced", "fence_cancelled"]),
        (base_staged(OFFLINE), vec!["committed"]),
    ];
    for (machine, takes) in cases {
        for message in every_message() {
            let name = message.name();
            let mut m = machine.clone();
            let result = m.handle_message(Some(message), 0);
            if takes.contains(&name) {
                let taken = result.is_ok() || matches!(result, Err(ConversationError::Rule(_)));
                assert!(taken, "{name} in {:?}: {result:?}", machine.state());
            } else {
                let e = result.unwrap_err();
                assert!(matches!(e, ConversationError::Unexpected { .. }), "{name} in {:?}: {e}", machine.state());
                assert_eq!(e.blame(), Blame::Peer);
                assert_eq!(m.state(), machine.state(), "a refused {name} changes nothing");
            }
        }
    }
}

fn any_message() -> impl Strategy<Value = Option<Message>> {
    let messages = every_message();
    prop_oneof![
        Just(None),
        (0..messages.len()).prop_map(move |i| messages.get(i).cloned()),
        (any::<u32>(), any::<u64>()).prop_map(|(f, c)| Some(Message::Acks {
            chunks: vec![ChunkRef { file_index: f % 3, chunk_index: c % 3 }]
        })),
        (any::<u32>(), any::<u64>())
            .prop_map(|(f, c)| Some(accept(vec![FileResume { file_index: f % 3, chunks: vec![(c % 3, 0)] }]))),
        any::<u16>().prop_map(|v| Some(Message::Hello { protocol_version: v, node_id: node("t") })),
    ]
}

proptest! {
    #[test]
    fn random_conversations_never_panic(
        plan_bits in 0u8..8,
        steps in proptest::collection::vec((any_message(), 0u8..6, any::<u64>()), 0..64),
    ) {
        let plan = CopyPlan { wal: plan_bits & 1 != 0, cutover: plan_bits & 2 != 0, commit: plan_bits & 4 != 0 };
        let mut machine = SourceConversation::copy(&node("s"), offer(plan.wal), plan);
        for (message, event, now_ns) in steps {
            let _ = machine.handle_message(message, now_ns);
            let _ = match event {
                0 => machine.poll_chunk(now_ns).map(|span| machine.handle_chunk_read(&span, 1)).unwrap_or(Ok(())),
                1 => machine.handle_fence(Lsn(now_ns), None, now_ns, now_ns / 2, now_ns / 3),
                2 => machine.handle_timeout(now_ns),
                3 => machine.handle_wal_finished(Lsn(now_ns)),
                4 => machine.handle_fence_kept(),
                _ => machine.handle_fence_dropped(),
            };
            while machine.poll_action().is_some() {}
        }
    }
}

proptest! {
    #[test]
    fn random_requests_never_panic(
        kind in 0u8..3,
        steps in proptest::collection::vec(any_message(), 0..16),
    ) {
        let mut machine = match kind {
            0 => SourceConversation::join(&node("s"), id()),
            1 => SourceConversation::release(&node("s"), id(), Lsn(1), None),
            _ => SourceConversation::abort(&node("s"), id(), "r".into()),
        };
        for message in steps {
            let before = machine.state();
            if machine.handle_message(message, 0).is_err() {
                prop_assert_eq!(machine.state(), before);
            }
            while machine.poll_action().is_some() {}
        }
    }

    #[test]
    fn random_wal_streams_never_panic(
        steps in proptest::collection::vec((any_message(), 0u8..3, any::<u64>()), 0..64),
    ) {
        use crate::proto::source_wal::{SourceWal, WalState};
        let mut wal = SourceWal::new(Lsn(10));
        for (message, event, lsn) in steps {
            let message = if event == 0 { Some(Message::WalDurable { durable_lsn: Lsn(lsn) }) } else { message };
            let _ = wal.handle_message(message);
            let _ = match event {
                1 => wal.handle_batch_sent(Lsn(lsn)),
                _ => wal.handle_tail_reached(),
            };
            while wal.poll_action().is_some() {}
            prop_assert!(wal.state() != WalState::Done || !wal.wants_records());
        }
    }
}
