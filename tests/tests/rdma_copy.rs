//! Copies whose chunks go over RDMA lanes (the fake device): the real source and target
//! drivers negotiate the path on the copy's QUIC connection, ship over it, resume after a lost
//! queue pair or a lane's lost last frame, and fall back to QUIC (or fail, under
//! `require_rdma`) when the target has none. A `ferry serve` that asked for RDMA and cannot
//! have it publishes each migration's fallback as an `rdma_fallback` event and tells a late
//! subscriber its transport.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::control::typed::{EventKind, MigrationEvent};
use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::rdma::attach::{AnyDevice, ChunkTransport, DeviceProvider, FakeProvider};
use ferry_engine::transfer::rdma::fake::{Fabric, Faults};
use ferry_engine::transfer::rdma::select::{FallbackNotices, TransportSetting, FALLBACKS_TOTAL};
use ferry_engine::transfer::rdma::verbs::{DeviceLimits, VerbsError};
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::TransferError;
use ferry_tests::daemons::{cluster, phase_is, WAIT};
use ferry_tests::{node, request, tree_sha256, write_file, Certs};
use ferry_wire::session::Progress;
use serde_json::{json, Value};

const LIMITS: DeviceLimits = DeviceLimits { max_mr_size_bytes: 8 << 20, max_qp_wr: 64 };
const CHUNK: u32 = 64 << 10;

fn fake(fabric: &Fabric) -> Arc<dyn DeviceProvider> {
    Arc::new(FakeProvider { fabric: fabric.clone(), limits: LIMITS })
}

/// A target in this process whose inbound transfers answer RDMA offers from `transport`.
struct RdmaTarget {
    addr: std::net::SocketAddr,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl RdmaTarget {
    fn start(certs: &Certs, data_dir: &Path, transport: ChunkTransport) -> Self {
        let identity = certs.identity("target");
        let crypto = ferry_engine::tls::server_crypto(&identity, &[node("source")]).unwrap();
        let endpoint =
            ferry_engine::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &QuicTuning::default())
                .unwrap();
        let ctx = TargetContext::new(node("target"), data_dir.to_path_buf(), Arc::new(DiskStorage))
            .with_chunk_transport(transport);
        let task = tokio::spawn(target::serve(endpoint.clone(), Arc::new(ctx)));
        Self { addr: endpoint.local_addr().unwrap(), endpoint, task }
    }

    fn stop(self) {
        self.endpoint.close(0u32.into(), b"test over");
        self.task.abort();
    }
}

async fn copy_over(certs: &Certs, req: CopyRequest, transport: ChunkTransport) -> Result<CopyReport, TransferError> {
    let (progress, _rx) = tokio::sync::watch::channel(Progress::default());
    let rate = RateHandle::new(0, u64::from(req.chunk_len_bytes));
    let tuning = QuicTuning { chunk_transport: transport, ..QuicTuning::default() };
    let identity = certs.identity("source");
    let copy = source::copy(&identity, &tuning, req, progress, rate);
    tokio::time::timeout(Duration::from_secs(30), copy).await.expect("the copy ended in time")
}

/// A few files of odd sizes (several chunks each, one empty) under a fresh folder.
fn sources() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (i, size) in [0usize, 1, 70_000, 1 << 20, (3 << 20) + 5].iter().enumerate() {
        write_file(root.path(), &format!("L{i}/f{i}.seg"), *size, 40 + i as u64);
    }
    root
}

fn staged(target_dir: &Path, id: &str) -> std::collections::BTreeMap<String, String> {
    tree_sha256(&target_dir.join("migrations").join(id).join("segments")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_ships_its_chunks_over_rdma_lanes_between_the_real_drivers() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let fabric = Fabric::new(Faults { delay_polls: 1, reorder_receives: true, ..Faults::default() });
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::rdma(fake(&fabric), false));
    let mut req = request("rdma-copy", root.path(), target.addr, CHUNK);
    req.connections_count = 2;
    let report = copy_over(&certs, req, ChunkTransport::rdma(fake(&fabric), true)).await.unwrap();
    assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma), "{report:?}");
    assert_eq!(report.rdma_fallback_reason, None);
    assert!(report.committed);
    assert_eq!(staged(target_dir.path(), "rdma-copy"), tree_sha256(root.path()).unwrap());
    // Every chunk was a write on the fabric (and a credit back): at least 2 per chunk.
    let chunks_count = (1 + 2 + 16 + 49) as u64;
    assert!(fabric.writes_count() >= 2 * chunks_count, "{} writes", fabric.writes_count());
    target.stop();
}

/// Fake devices that count how often they are opened.
#[derive(Debug)]
struct CountsOpens {
    fabric: Fabric,
    opened_count: AtomicU32,
}

impl CountsOpens {
    fn new(fabric: &Fabric) -> Arc<Self> {
        Arc::new(Self { fabric: fabric.clone(), opened_count: AtomicU32::new(0) })
    }

    fn opened(&self) -> u32 {
        self.opened_count.load(Ordering::SeqCst)
    }
}

impl DeviceProvider for CountsOpens {
    fn open(&self) -> Result<AnyDevice, VerbsError> {
        self.opened_count.fetch_add(1, Ordering::SeqCst);
        FakeProvider { fabric: self.fabric.clone(), limits: LIMITS }.open()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_pair_lost_mid_copy_resumes_on_rdma_and_completes() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let fabric = Fabric::new(Faults { lose_qp_at_write: Some(40), ..Faults::default() });
    // The queue pairs are lost from the 40th write on, in the first attempt only: the fault is
    // cleared once that write was posted (it broke its pair under the fabric's lock).
    let clear = tokio::spawn({
        let fabric = fabric.clone();
        async move {
            while fabric.writes_count() < 40 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            fabric.set_faults(Faults::default());
        }
    });
    let provider: Arc<dyn DeviceProvider> = CountsOpens::new(&fabric);
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::rdma(provider.clone(), false));
    let mut req = request("rdma-lost-qp", root.path(), target.addr, CHUNK);
    req.retry = ferry_wire::retry::RetryPolicy::with_deadline_ms(20_000);
    let report = copy_over(&certs, req, ChunkTransport::rdma(provider, true)).await.unwrap();
    clear.await.unwrap();
    assert!(report.reconnects_count >= 1, "the lost queue pair cut an attempt: {report:?}");
    assert!(report.bytes_resumed > 0, "the second attempt resumed: {report:?}");
    assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma));
    assert_eq!(staged(target_dir.path(), "rdma-lost-qp"), tree_sha256(root.path()).unwrap());
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_opens_its_device_once_for_many_copies_and_again_after_the_device_is_lost() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let fabric = Fabric::default();
    let (source_device, target_device) = (CountsOpens::new(&fabric), CountsOpens::new(&fabric));
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::rdma(target_device.clone(), true));
    // One transport per node, as `ferry serve` has: every copy and connection shares it.
    let source = ChunkTransport::rdma(source_device.clone(), true);
    for i in 0..3 {
        let mut req = request(&format!("rdma-once-{i}"), root.path(), target.addr, CHUNK);
        req.connections_count = 2;
        let report = copy_over(&certs, req, source.clone()).await.unwrap();
        assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma), "{report:?}");
    }
    assert_eq!((source_device.opened(), target_device.opened()), (1, 1), "three copies, one open each");

    // A device-level failure (both ends' devices lost, as after a reset): the next copy's
    // paths cannot be made on them, so each end opens its device again and the copy runs on
    // RDMA.
    fabric.lose_devices();
    let req = request("rdma-reopened", root.path(), target.addr, CHUNK);
    let report = copy_over(&certs, req, source.clone()).await.unwrap();
    assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma), "{report:?}");
    assert_eq!(staged(target_dir.path(), "rdma-reopened"), tree_sha256(root.path()).unwrap());
    assert_eq!((source_device.opened(), target_device.opened()), (2, 2), "each end opened its device again");
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_whose_last_frame_vanishes_fails_its_attempt_and_the_copy_resumes_to_the_same_bytes() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Ten chunks on one lane: on every queue pair, the tenth frame's write vanishes with its
    // completion (the lane's end still arrives). The resumed attempt's lane writes one frame.
    write_file(root.path(), "L0/f0.seg", 10 * CHUNK as usize, 7);
    let fabric = Fabric::new(Faults { lose_payload_write_per_qp: Some(10), ..Faults::default() });
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::rdma(fake(&fabric), false));
    let mut req = request("rdma-lost-last", root.path(), target.addr, CHUNK);
    req.streams_count = 1;
    req.retry = ferry_wire::retry::RetryPolicy::with_deadline_ms(25_000);
    let report = copy_over(&certs, req, ChunkTransport::rdma(fake(&fabric), true)).await.unwrap();
    assert!(report.reconnects_count >= 1, "the lost frame cut the first attempt: {report:?}");
    assert!(report.bytes_resumed > 0, "the second attempt resumed past what had arrived: {report:?}");
    assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma));
    assert!(report.committed);
    assert_eq!(staged(target_dir.path(), "rdma-lost-last"), tree_sha256(root.path()).unwrap());
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_rdma_makes_the_copy_fall_back_to_quic_and_counts_it() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::quic());
    let before = FALLBACKS_TOTAL.load(Ordering::Relaxed);
    let req = request("rdma-fallback", root.path(), target.addr, CHUNK);
    let notices = FallbackNotices::default();
    let transport = ChunkTransport::rdma(fake(&Fabric::default()), false).with_fallback_notices(notices.clone());
    let report = copy_over(&certs, req, transport).await.unwrap();
    assert_eq!(report.chunk_transport, Some(TransportSetting::Quic));
    let reason = report.rdma_fallback_reason.expect("the fallback says why");
    assert!(reason.contains("cannot take rdma lanes"), "{reason}");
    assert!(FALLBACKS_TOTAL.load(Ordering::Relaxed) > before, "the fallback is counted");
    // The daemon's event stream publishes this notice as the migration's `rdma_fallback` event.
    let taken: Vec<_> = notices.take().into_iter().map(|(id, why)| (id.as_str().to_owned(), why)).collect();
    assert_eq!(taken, [("rdma-fallback".to_owned(), reason)]);
    assert_eq!(staged(target_dir.path(), "rdma-fallback"), tree_sha256(root.path()).unwrap());
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_rdma_with_a_target_without_it_fails_permanently_saying_why() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::quic());
    let req = request("rdma-required", root.path(), target.addr, CHUNK);
    let started = std::time::Instant::now();
    let err = copy_over(&certs, req, ChunkTransport::rdma(fake(&Fabric::default()), true)).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let message = err.to_string();
    assert!(message.contains("require_rdma") && message.contains("cannot take rdma lanes"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "failed at once, not after retries");
    target.stop();
}

/// Reads JSON lines off a control socket until one satisfies `wanted` (each line is checked
/// to be JSON); fails the test at the deadline.
fn read_until(lines: &mut impl std::io::BufRead, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    let mut line = String::new();
    while std::time::Instant::now() < deadline {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => panic!("the daemon closed the socket before {what}"),
            Ok(_) => {
                let value: Value = serde_json::from_str(&line).unwrap();
                if wanted(&value) {
                    return value;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("no {what} within {WAIT:?}")
}

#[test]
fn a_daemon_that_asked_for_rdma_publishes_each_migration_s_fallback_and_tells_late_subscribers() {
    // `ferry serve` with transport = "rdma" on this machine (no device, or no `rdma` build):
    // its start falls back, and so does every migration it runs.
    let c = cluster("transport = \"rdma\"\n", "", &[("L1/a.seg", 700_000), ("b.seg", 1)]);
    let info = c.source.call("node.info", json!({})).unwrap();
    let node_reason = info["transport"]["fallback_reason"].as_str().unwrap().to_owned();
    assert_eq!(
        (info["transport"]["configured"].as_str(), info["transport"]["in_use"].as_str()),
        (Some("rdma"), Some("quic"))
    );

    // A subscriber that comes after the start-up `transport` event learns it from its answer.
    let socket = std::os::unix::net::UnixStream::connect(&c.source.socket).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut lines = std::io::BufReader::new(socket.try_clone().unwrap());
    let subscribe =
        json!({"jsonrpc": "2.0", "id": 1, "method": "events.subscribe", "params": {"migration_id": "m-rdma"}});
    std::io::Write::write_all(&mut &socket, format!("{subscribe}\n").as_bytes()).unwrap();
    let answer = read_until(&mut lines, "the subscription's answer", |v| v["id"] == 1);
    assert_eq!(answer["result"]["transport"]["in_use"], "quic", "{answer}");
    assert_eq!(answer["result"]["transport"]["fallback_reason"], node_reason.as_str(), "{answer}");

    c.source.call("migration.start", c.params("m-rdma", 9, 0)).unwrap();
    let event =
        read_until(&mut lines, "an rdma_fallback event", |v| v["params"]["event"] == "rdma_fallback")["params"].clone();
    assert_eq!(event["migration_id"], "m-rdma", "{event}");
    assert_eq!(event["rdma_fallback_reason"], node_reason.as_str(), "{event}");
    assert_eq!(event["chunk_transport"], "quic", "{event}");
    // It is a status like every migration.event, so typed clients read it.
    let parsed = ferry_engine::control::typed::parse_event(event).unwrap();
    assert!(matches!(parsed, MigrationEvent::Status { kind: EventKind::RdmaFallback { .. }, .. }), "{parsed:?}");
    c.source.wait_for("m-rdma", "Completed", phase_is("Completed"));
    assert_eq!(tree_sha256(&c.staged("m-rdma").join("segments")).unwrap(), tree_sha256(&c.source_root).unwrap());
}
