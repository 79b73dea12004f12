//! A base copy over RDMA on real hardware: the source and target drivers `ferry serve` runs,
//! in this process, their chunks on RDMA lanes of one device (both ends' queue pairs on it).
//!
//! What it proves: the daemon's RDMA path works on this device: the handshake carried by the
//! copy's QUIC connection, the `sideway` adapter under the same lanes, machines, CRC32C checks
//! and staging as a QUIC copy; the copy's report says its chunks went over RDMA (a fallback to
//! QUIC fails the test), and every staged file is byte-identical to its source.
//!
//! What it does not: use two machines (run the daemons of two hosts for that: `transport =
//! "rdma"` in both configurations) or measure against `ib_write_bw`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::quic::QuicTuning;
use ferry_engine::read::ReadMode;
use ferry_engine::storage::DiskStorage;
use ferry_engine::tls::NodeIdentity;
use ferry_engine::transfer::rdma::attach::{ChunkTransport, SidewayProvider};
use ferry_engine::transfer::rdma::select::TransportSetting;
use ferry_engine::transfer::source::{self, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};

use crate::rdma_daemons::RdmaConfig;

const FILE_SIZES_BYTES: [usize; 4] = [0, 1, (4 << 20) + 7, 64 << 20];
const CHUNK_LEN_BYTES: u32 = 1 << 20;

fn node(name: &str) -> anyhow::Result<NodeId> {
    NodeId::new(name).map_err(|e| anyhow::anyhow!("node id {name}: {e}"))
}

/// Deterministic bytes for file `index`.
#[allow(clippy::cast_possible_truncation)]
fn contents(index: usize, size_bytes: usize) -> Vec<u8> {
    (0..size_bytes).map(|i| (i.wrapping_mul(2_654_435_761) ^ index.wrapping_mul(0x9e37)) as u8).collect()
}

/// Runs the copy under a fresh folder of the temp dir; a summary on success.
pub fn copy(config: &RdmaConfig) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("ferry-hw-rdma-copy-{}", std::process::id()));
    let result = copy_in(&dir, config);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn copy_in(dir: &Path, config: &RdmaConfig) -> anyhow::Result<String> {
    let (certs_dir, source_dir, target_dir) = (dir.join("certs"), dir.join("source"), dir.join("target"));
    std::fs::create_dir_all(&certs_dir)?;
    certs::init_ca(&certs_dir, false)?;
    for name in ["source", "target"] {
        certs::issue(&certs_dir, &node(name)?, &IssueOptions::default())?;
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for (index, size_bytes) in FILE_SIZES_BYTES.iter().enumerate() {
        let path = source_dir.join(format!("L{index}/{index}.seg"));
        std::fs::create_dir_all(path.parent().unwrap_or(&source_dir))?;
        std::fs::write(&path, contents(index, *size_bytes))?;
        files.push(path);
    }
    let device = config.device.clone().context("FERRY_HW_RDMA_DEVICE names the device to copy over")?;
    let provider = Arc::new(SidewayProvider { device: device.clone(), port: config.port, gid_index: config.gid_index });
    let transport = ChunkTransport::rdma(provider, true);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(async {
        let target_identity = NodeIdentity::from_dir(&certs_dir, &node("target")?)?;
        let crypto = ferry_engine::tls::server_crypto(&target_identity, &[node("source")?])?;
        let endpoint = ferry_engine::quic::server_endpoint("127.0.0.1:0".parse()?, crypto, &QuicTuning::default())?;
        let ctx = TargetContext::new(node("target")?, target_dir.clone(), Arc::new(DiskStorage))
            .with_chunk_transport(transport.clone());
        let server = tokio::spawn(target::serve(endpoint.clone(), Arc::new(ctx)));
        let request = CopyRequest {
            migration_id: MigrationId::new("hw-rdma-copy").map_err(|e| anyhow::anyhow!("{e}"))?,
            vshard_id: VShardId(1),
            base_lsn: Lsn(1),
            segments_root: source_dir.clone(),
            files: None,
            db_meta: Default::default(),
            target_addr: endpoint.local_addr()?,
            target_node: node("target")?,
            chunk_len_bytes: CHUNK_LEN_BYTES,
            streams_count: 4,
            connections_count: 1,
            rate_limit_bytes_per_sec: 0,
            read_mode: ReadMode::Pread,
            commit: true,
            wal: None,
            cutover: None,
            retry: ferry_wire::retry::RetryPolicy::default(),
        };
        let identity = NodeIdentity::from_dir(&certs_dir, &node("source")?)?;
        let tuning = QuicTuning { chunk_transport: transport, ..QuicTuning::default() };
        let (progress, _rx) = tokio::sync::watch::channel(Progress::default());
        let rate = RateHandle::new(0, u64::from(CHUNK_LEN_BYTES));
        let report = source::copy(&identity, &tuning, request, progress, rate).await;
        endpoint.close(0u32.into(), b"done");
        server.abort();
        anyhow::Ok(report?)
    })?;
    anyhow::ensure!(
        report.chunk_transport == Some(TransportSetting::Rdma),
        "the copy's chunks went over {:?} ({:?})",
        report.chunk_transport,
        report.rdma_fallback_reason
    );
    let staged = target_dir.join("migrations/hw-rdma-copy/segments");
    for (index, (source, size_bytes)) in files.iter().zip(FILE_SIZES_BYTES).enumerate() {
        let relative = source.strip_prefix(&source_dir)?;
        let bytes = std::fs::read(staged.join(relative)).with_context(|| format!("staged {}", relative.display()))?;
        anyhow::ensure!(bytes == contents(index, size_bytes), "{} differs", relative.display());
    }
    Ok(format!(
        "{} bytes in {} files over RDMA on {device} (port {}, gid {}) at {} MB/s, staged byte-identical",
        report.bytes_total,
        report.files_count,
        config.port,
        config.gid_index,
        report.throughput_bytes_per_sec / 1_000_000
    ))
}
