//! The retry policy, end to end over loopback QUIC: permanent failures fail at once, with a
//! message that says what to do; a target that never answers fails at the retry deadline,
//! naming its address.
//!
//! What it checks: a copy dialling the target under another name than its certificate's fails
//! in well under 10 s naming that name; a source missing from the target's allow-list fails
//! as fast, told to fix the allow-list; a copy to a port where nothing listens fails within
//! its (short, for the test) deadline, naming the address and asking whether a daemon is
//! listening there; a daemon's outbound migration (the daemon's config `retry_deadline_secs`)
//! dialling a wrong name turns `Failed` as fast, with the same message as its reason. The 30 s
//! default is checked by unit tests (`ferry_wire::retry`, the daemon config).
//!
//! What it does not: test transient failures that recover (`resume.rs`, `kill.rs` do).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::control::ControlClient;
use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::source::{self, RateHandle};
use ferry_engine::transfer::TransferError;
use ferry_tests::{node, node_pair, request, wait_for_status, write_file, Certs, Target};
use ferry_wire::api::{Phase, StartParams};
use ferry_wire::retry::RetryPolicy;
use ferry_wire::session::Progress;
use ferry_wire::MigrationId;
use tokio::sync::watch;

/// What "fails at once" means here: far below any retry deadline, on a loaded machine.
const FAST: Duration = Duration::from_secs(10);

async fn copy_as(certs: &Certs, who: &str, req: source::CopyRequest) -> (Result<(), TransferError>, Duration) {
    let started = Instant::now();
    let (progress, _rx) = watch::channel(Progress::default());
    let rate = RateHandle::new(0, u64::from(req.chunk_len_bytes));
    let result = source::copy(&certs.identity(who), &QuicTuning::default(), req, progress, rate).await;
    (result.map(|_| ()), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_target_name_fails_at_once_naming_the_name() {
    let certs = Certs::new().unwrap();
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_file(src.path(), "a.seg", 64 << 10, 1);
    let target = Target::start(&certs, dst.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("m-name", src.path(), target.addr, 64 << 10);
    req.target_node = node("not-the-target");
    let (result, took) = copy_as(&certs, "source", req).await;
    let e = result.unwrap_err();
    eprintln!("failed in {took:?}: {e}");
    assert!(matches!(e, TransferError::TargetCertificate { .. }), "{e:?}");
    assert!(!e.is_transient());
    let text = e.to_string();
    assert!(text.contains("not-the-target") && text.contains(&target.addr.to_string()), "{text}");
    assert!(took < FAST, "took {took:?}");
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_outside_the_allow_list_fails_at_once() {
    let certs = Certs::new().unwrap();
    certs::issue(certs.dir.path(), &node("intruder"), &IssueOptions::default()).unwrap();
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_file(src.path(), "a.seg", 64 << 10, 2);
    // The target allows `source` only.
    let target = Target::start(&certs, dst.path(), Arc::new(DiskStorage)).unwrap();
    let req = request("m-allow", src.path(), target.addr, 64 << 10);
    let (result, took) = copy_as(&certs, "intruder", req).await;
    let e = result.unwrap_err();
    eprintln!("failed in {took:?}: {e}");
    assert!(matches!(e, TransferError::RefusedByTarget { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("allowed_peers") && text.contains(&target.addr.to_string()), "{text}");
    assert!(took < FAST, "took {took:?}");
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_fails_at_the_deadline_naming_the_address() {
    let certs = Certs::new().unwrap();
    let src = tempfile::tempdir().unwrap();
    write_file(src.path(), "a.seg", 64 << 10, 3);
    // A port that was just free: nothing listens there.
    let addr: SocketAddr = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let deadline = Duration::from_millis(2_000);
    let mut req = request("m-port", src.path(), addr, 64 << 10);
    req.retry = RetryPolicy::with_deadline_ms(2_000);
    let (result, took) = copy_as(&certs, "source", req).await;
    let e = result.unwrap_err();
    eprintln!("failed in {took:?}: {e}");
    assert!(matches!(e, TransferError::Unreachable { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&addr.to_string()) && text.contains("is a daemon listening there"), "{text}");
    assert!(took >= deadline, "gave up before the deadline: {took:?}");
    // The deadline bounds the whole wait: the last attempt is cut at it, plus its close.
    assert!(took < deadline + Duration::from_secs(5), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_migration_to_a_wrong_name_fails_at_once() {
    let certs = Certs::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shard");
    write_file(&root, "a.seg", 64 << 10, 4);
    let (source, target) = node_pair(&certs, dir.path()).await;
    let mut client = ControlClient::connect(source.socket()).await.unwrap();
    let params: StartParams = serde_json::from_value(serde_json::json!({
        "migration_id": "m-daemon", "vshard_id": 7, "segments_root": root, "base_lsn": 0,
        "target_address": target.quic_addr.to_string(), "target_node_id": "not-the-target",
        "offline": true, "chunk_len_bytes": 65536,
    }))
    .unwrap();
    let started = Instant::now();
    client.start(&params).await.unwrap();
    let id = MigrationId::new("m-daemon").unwrap();
    let status = wait_for_status(&mut client, &id, "phase Failed", FAST, |s| s.phase == Phase::Failed).await.unwrap();
    let took = started.elapsed();
    let reason = status.reason.unwrap_or_default();
    eprintln!("failed in {took:?}: {reason}");
    assert!(reason.contains("not-the-target") && reason.contains(&target.quic_addr.to_string()), "{reason}");
    source.shutdown().await;
    target.shutdown().await;
}
