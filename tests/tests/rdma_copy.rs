//! Copies whose chunks go over RDMA lanes (the fake device): the real source and target
//! drivers negotiate the path on the copy's QUIC connection, ship over it, resume after a lost
//! queue pair, and fall back to QUIC (or fail, under `require_rdma`) when the target has none.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::rdma::attach::{AnyDevice, ChunkTransport, DeviceProvider, FakeProvider};
use ferry_engine::transfer::rdma::fake::{Fabric, Faults};
use ferry_engine::transfer::rdma::select::{TransportSetting, FALLBACKS_TOTAL};
use ferry_engine::transfer::rdma::verbs::{DeviceLimits, VerbsError};
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::TransferError;
use ferry_tests::{node, request, tree_sha256, write_file, Certs};
use ferry_wire::session::Progress;

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

/// Fake devices whose fabric loses its queue pairs during the first attempt only: the faults
/// are cleared when the third device opens (the source's, for the second attempt).
#[derive(Debug)]
struct LosesQueuePairsOnce {
    fabric: Fabric,
    opened_count: AtomicU32,
}

impl DeviceProvider for LosesQueuePairsOnce {
    fn open(&self) -> Result<AnyDevice, VerbsError> {
        if self.opened_count.fetch_add(1, Ordering::SeqCst) == 2 {
            self.fabric.set_faults(Faults::default());
        }
        FakeProvider { fabric: self.fabric.clone(), limits: LIMITS }.open()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_pair_lost_mid_copy_resumes_on_rdma_and_completes() {
    let (certs, root, target_dir) = (Certs::new().unwrap(), sources(), tempfile::tempdir().unwrap());
    let fabric = Fabric::new(Faults { lose_qp_at_write: Some(40), ..Faults::default() });
    let provider: Arc<dyn DeviceProvider> =
        Arc::new(LosesQueuePairsOnce { fabric: fabric.clone(), opened_count: AtomicU32::new(0) });
    let target = RdmaTarget::start(&certs, target_dir.path(), ChunkTransport::rdma(provider.clone(), false));
    let mut req = request("rdma-lost-qp", root.path(), target.addr, CHUNK);
    req.retry = ferry_wire::retry::RetryPolicy::with_deadline_ms(20_000);
    let report = copy_over(&certs, req, ChunkTransport::rdma(provider, true)).await.unwrap();
    assert!(report.reconnects_count >= 1, "the lost queue pair cut an attempt: {report:?}");
    assert!(report.bytes_resumed > 0, "the second attempt resumed: {report:?}");
    assert_eq!(report.chunk_transport, Some(TransportSetting::Rdma));
    assert_eq!(staged(target_dir.path(), "rdma-lost-qp"), tree_sha256(root.path()).unwrap());
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
    let report = copy_over(&certs, req, ChunkTransport::rdma(fake(&Fabric::default()), false)).await.unwrap();
    assert_eq!(report.chunk_transport, Some(TransportSetting::Quic));
    let reason = report.rdma_fallback_reason.expect("the fallback says why");
    assert!(reason.contains("cannot take rdma lanes"), "{reason}");
    assert!(FALLBACKS_TOTAL.load(Ordering::Relaxed) > before, "the fallback is counted");
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
