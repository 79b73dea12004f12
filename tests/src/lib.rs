//! ferry-tests: the harness shared by ferry's end-to-end scenarios.
//!
//! What it does: makes development certificates in a temp folder, starts an in-process target
//! (any storage, the fake included) on a loopback port, runs the source side of a copy, builds
//! trees of files, and checksums trees with SHA-256 (a reader independent of the transfer
//! code, which uses CRC32C); waits for a migration's phase over a control socket
//! ([`wait_for_phase`]) and reads a staging's `MANIFEST.json` as plain JSON
//! ([`manifest_json`]); [`relay`] puts a UDP relay that can drop every datagram between two
//! QUIC endpoints.
//!
//! What it does not: assert. Scenarios in `tests/` do; helpers return errors.
#![allow(clippy::unwrap_used, clippy::panic)]

pub mod relay;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::control::ControlClient;
use ferry_engine::quic::QuicTuning;
use ferry_engine::read::ReadMode;
use ferry_engine::storage::Storage;
use ferry_engine::tls::NodeIdentity;
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::TransferError;
use ferry_wire::api::{MigrationStatus, Phase};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// A certificate folder with a CA and the nodes `source` and `target`.
#[derive(Debug)]
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        certs::init_ca(dir.path(), false)?;
        for name in ["source", "target"] {
            certs::issue(dir.path(), &node(name), &IssueOptions::default())?;
        }
        Ok(Self { dir })
    }

    pub fn identity(&self, name: &str) -> NodeIdentity {
        NodeIdentity::from_dir(self.dir.path(), &node(name)).unwrap()
    }
}

/// The reference writer of the cut-over scenarios: 4,000 writes/s into `wal_dir` with 64 KiB
/// segments (the WAL rolls every few hundred ms while a migration runs, so held links are
/// taken meanwhile), `vshard` migrating; returns once it has written for 100 ms.
pub async fn rolling_writer(wal_dir: &Path, vshard: VShardId) -> anyhow::Result<ferry_engine::refnode::RefWriter> {
    let config = ferry_engine::refnode::RefWriterConfig {
        rate_writes_per_sec: 4_000,
        roll_size_bytes: 64 << 10,
        ..ferry_engine::refnode::RefWriterConfig::new(wal_dir, vshard)
    };
    let writer = ferry_engine::refnode::RefWriter::start(config)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(writer)
}

/// A node daemon's configuration for an in-process `RunningNode` named `name` (a certificate of
/// `certs`), on a loopback port, accepting the peer `allow`.
pub fn node_config(certs: &Certs, name: &str, data_dir: &Path, allow: &str) -> ferry_engine::config::NodeConfig {
    ferry_engine::config::NodeConfig {
        node_id: name.into(),
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        certs_dir: certs.dir.path().to_path_buf(),
        allowed_peers: vec![allow.into()],
        progress_interval_ms: 0,
        ..ferry_engine::config::NodeConfig::default()
    }
}

/// Two daemons in this process, `source` and `target` (certificates of `certs`), with their
/// data under `dir/source` and `dir/target`, each accepting the other.
pub async fn node_pair(
    certs: &Certs,
    dir: &Path,
) -> (ferry_engine::node::RunningNode, ferry_engine::node::RunningNode) {
    let start = |name: &'static str, peer: &'static str| {
        let config = node_config(certs, name, &dir.join(name), peer);
        async move { ferry_engine::node::RunningNode::start(&config).await.unwrap() }
    };
    let source = start("source", "target").await;
    let target = start("target", "source").await;
    (source, target)
}

pub fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// A target running in this process.
#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub ctx: Arc<TargetContext>,
    pub endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl Target {
    /// Starts a target named `target` on a loopback port, staging into `data_dir`.
    pub fn start(certs: &Certs, data_dir: &Path, storage: Arc<dyn Storage>) -> anyhow::Result<Self> {
        let identity = certs.identity("target");
        let crypto = ferry_engine::tls::server_crypto(&identity, &[node("source")])?;
        let endpoint = ferry_engine::quic::server_endpoint("127.0.0.1:0".parse()?, crypto, &QuicTuning::default())?;
        let addr = endpoint.local_addr()?;
        let ctx = Arc::new(TargetContext::new(node("target"), data_dir.to_path_buf(), storage));
        let task = tokio::spawn(target::serve(endpoint.clone(), ctx.clone()));
        Ok(Self { addr, ctx, endpoint, task })
    }

    pub fn stop(self) {
        self.endpoint.close(0u32.into(), b"test over");
        self.task.abort();
    }
}

/// A copy request with test defaults: every file of `root`, 4 streams, committed.
pub fn request(id: &str, root: &Path, target: SocketAddr, chunk_len_bytes: u32) -> CopyRequest {
    CopyRequest {
        migration_id: MigrationId::new(id).unwrap(),
        vshard_id: VShardId(7),
        base_lsn: Lsn(42),
        segments_root: root.to_path_buf(),
        files: None,
        db_meta: serde_json::json!({"test": true}),
        target_addr: target,
        target_node: node("target"),
        chunk_len_bytes,
        streams_count: 4,
        connections_count: 1,
        rate_limit_bytes_per_sec: 0,
        read_mode: ReadMode::Mmap,
        commit: true,
        wal: None,
        cutover: None,
    }
}

/// Runs the source side of a copy with the `source` identity.
pub async fn copy(certs: &Certs, request: CopyRequest) -> Result<CopyReport, TransferError> {
    let rate = RateHandle::new(request.rate_limit_bytes_per_sec, u64::from(request.chunk_len_bytes));
    copy_with_rate(certs, request, rate).await
}

/// Runs the source side of a copy whose rate limit the caller can change while it runs.
pub async fn copy_with_rate(
    certs: &Certs,
    request: CopyRequest,
    rate: RateHandle,
) -> Result<CopyReport, TransferError> {
    let (progress, _rx) = watch::channel(Progress::default());
    source::copy(&certs.identity("source"), &QuicTuning::default(), request, progress, rate).await
}

/// Writes `size` bytes of deterministic, non-repeating data to `root/rel`.
pub fn write_file(root: &Path, rel: &str, size: usize, seed: u64) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut data = Vec::with_capacity(size);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while data.len() < size {
        // xorshift64*: cheap, and every 8 bytes differ.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        data.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(&path, &data).unwrap();
    path
}

/// SHA-256 of every regular file under `root` (skipping ferry's own folders), by relative path.
pub fn tree_sha256(root: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".ferry-snapshot" || name == ".ferry" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, out)?;
        } else {
            let mut hasher = Sha256::new();
            let mut file = std::fs::File::open(&path)?;
            std::io::copy(&mut file, &mut hasher)?;
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(rel, format!("{:x}", hasher.finalize()));
        }
    }
    Ok(())
}

/// The `ferry` binary built for this test run.
pub fn ferry_bin() -> PathBuf {
    // tests/ is a sibling crate: the binary sits in the shared target folder.
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("ferry");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        // `cargo test --workspace` builds it already; `cargo test -p ferry-tests` does not.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "ferry-engine", "--bin", "ferry"])
            .status()
            .expect("cannot run cargo to build the ferry binary");
        assert!(status.success(), "building the ferry binary failed");
    });
    assert!(bin.exists(), "no ferry binary at {}", bin.display());
    bin
}

/// Polls `migration.status` of `id` every 10 ms until its phase is `phase`; an error when it
/// becomes `Failed` first (unless `Failed` is asked for) or `within` passes.
pub async fn wait_for_phase(
    client: &mut ControlClient,
    id: &MigrationId,
    phase: Phase,
    within: Duration,
) -> anyhow::Result<MigrationStatus> {
    let deadline = Instant::now() + within;
    loop {
        let status = client.status(id).await?;
        if status.phase == phase {
            return Ok(status);
        }
        if status.phase == Phase::Failed {
            anyhow::bail!("{id} failed while waiting for {phase:?}: {:?}", status.reason);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{id} did not reach {phase:?} within {within:?}: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `MANIFEST.json` of the staging of `id` under a target's data folder, as plain JSON (read
/// apart from ferry's manifest types, as a database's importer would).
pub fn manifest_json(target_data_dir: &Path, id: &str) -> anyhow::Result<serde_json::Value> {
    let path = target_data_dir.join("migrations").join(id).join("MANIFEST.json");
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}
