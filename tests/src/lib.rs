//! ferry-tests: the harness shared by ferry's end-to-end scenarios.
//!
//! What it does: makes development certificates in a temp folder, starts an in-process target
//! (any storage, the fake included) on a loopback port, runs the source side of a copy, builds
//! trees of files, and checksums trees with SHA-256 (a reader independent of the transfer
//! code, which uses CRC32C); waits for events with a deadline ([`wait_until`] and
//! [`wait_until_blocking`] for a condition, [`wait_for_some`] for an async call's answer,
//! [`wait_for_writes`] for the reference writer's acks, [`wait_for_status`],
//! [`wait_for_phase`] and [`wait_for_tail_across_rolls`] for a migration over a control
//! socket); reads a staging's `MANIFEST.json` as plain JSON ([`manifest_json`]); [`relay`] puts
//! a UDP relay that can drop every datagram between two QUIC endpoints; [`daemons`] runs real
//! `ferry serve` processes and [`live`] a live migration between them (writer, fence,
//! release, verification); [`netns`] makes network namespaces joined by veths, so daemons run
//! as separate hosts.
//!
//! What it does not: assert. Scenarios in `tests/` do; helpers return errors. Nor sleep for a
//! fixed time to let something happen: a wait names its event and fails at its deadline. The
//! wait helpers poll (the control socket's `migration.event`s come on a 250 ms tick, slower
//! than a poll), from 100 us apart doubling to [`POLL_INTERVAL_MAX`] (5 ms), so a quick event
//! is seen within a millisecond and a long one within 5 ms.
//!
//! Invariants: every wait has a deadline, and its error names what it waited for.
#![allow(clippy::unwrap_used, clippy::panic)]

pub mod daemons;
pub mod live;
pub mod netns;
pub mod relay;
pub mod sim;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::control::{ControlClient, ErrorCode};
use ferry_engine::quic::QuicTuning;
use ferry_engine::read::ReadMode;
use ferry_engine::storage::Storage;
use ferry_engine::tls::NodeIdentity;
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::TransferError;
use ferry_refnode::{RefWriter, RefWriterConfig};
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
/// taken meanwhile), `vshard` migrating; returns once it has acknowledged 400 writes (100 ms of
/// them).
pub async fn rolling_writer(wal_dir: &Path, vshard: VShardId) -> anyhow::Result<RefWriter> {
    let config = RefWriterConfig {
        rate_writes_per_sec: 4_000,
        roll_size_bytes: 64 << 10,
        ..RefWriterConfig::new(wal_dir, vshard)
    };
    let writer = RefWriter::start(config)?;
    wait_for_writes(&writer, 400, WRITES_WAIT).await?;
    Ok(writer)
}

/// How long [`rolling_writer`] waits for its first writes: far more than they take.
const WRITES_WAIT: Duration = Duration::from_secs(30);

/// The longest pause between two looks of the wait helpers.
pub const POLL_INTERVAL_MAX: Duration = Duration::from_millis(5);
/// The first pause between two looks; it doubles up to [`POLL_INTERVAL_MAX`].
const POLL_INTERVAL_MIN: Duration = Duration::from_micros(100);

/// The pauses between two looks of one wait, and its deadline.
struct Polls {
    what: String,
    within: Duration,
    deadline: Instant,
    interval: Duration,
}

impl Polls {
    fn new(what: &str, within: Duration) -> Self {
        Self { what: what.to_owned(), within, deadline: Instant::now() + within, interval: POLL_INTERVAL_MIN }
    }

    /// An error naming the event (and what was `seen` instead, if told) once the deadline
    /// passed; otherwise the next pause.
    fn next(&mut self, seen: Option<&dyn std::fmt::Debug>) -> anyhow::Result<Duration> {
        if Instant::now() > self.deadline {
            match seen {
                Some(seen) => anyhow::bail!("timed out after {:?} waiting for {}: {seen:?}", self.within, self.what),
                None => anyhow::bail!("timed out after {:?} waiting for {}", self.within, self.what),
            }
        }
        let pause = self.interval;
        self.interval = (self.interval * 2).min(POLL_INTERVAL_MAX);
        Ok(pause)
    }
}

/// Waits until `condition` holds, looking again after a short pause (see the crate docs); an
/// error naming `what` (the event waited for) once `within` passes first.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let mut polls = Polls::new(what, within);
    while !condition() {
        tokio::time::sleep(polls.next(None)?).await;
    }
    Ok(())
}

/// [`wait_until`] for a test on plain threads: the pauses block the calling thread.
pub fn wait_until_blocking(what: &str, within: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let mut polls = Polls::new(what, within);
    while !condition() {
        std::thread::sleep(polls.next(None)?);
    }
    Ok(())
}

/// Tries `attempt` until it gives a value, pausing between tries as [`wait_until`] does; an
/// error naming `what` once `within` passes first. For events only an async call can see.
pub async fn wait_for_some<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let mut polls = Polls::new(what, within);
    loop {
        if let Some(value) = attempt().await {
            return Ok(value);
        }
        tokio::time::sleep(polls.next(None)?).await;
    }
}

/// Waits until the reference writer has acknowledged `count` more writes than when called.
pub async fn wait_for_writes(writer: &RefWriter, count: u64, within: Duration) -> anyhow::Result<()> {
    let from = writer.acked_count();
    wait_until(&format!("{count} more acknowledged writes after {from}"), within, || {
        writer.acked_count() >= from + count
    })
    .await
}

/// [`wait_for_writes`] for a test on plain threads.
pub fn wait_for_writes_blocking(writer: &RefWriter, count: u64, within: Duration) -> anyhow::Result<()> {
    let from = writer.acked_count();
    wait_until_blocking(&format!("{count} more acknowledged writes after {from}"), within, || {
        writer.acked_count() >= from + count
    })
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

/// The records of a staged WAL folder (`migrations/<id>/wal`), in order: (LSN, vShard,
/// record type, payload).
pub fn staged_wal_records(dir: &Path) -> Vec<(Lsn, u32, u32, Vec<u8>)> {
    use ferry_wire::wal::{CursorConfig, LayoutChoice, Mode};
    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut tail = ferry_engine::wal::tail::FolderTail::new(dir, config, None).unwrap();
    let mut out = Vec::new();
    while let Some(record) = tail.poll().unwrap() {
        let h = record.header;
        out.push((h.lsn, h.vshard_id.0, h.record_type, record.payload().to_vec()));
    }
    out
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
        retry: ferry_wire::retry::RetryPolicy::default(),
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
/// `ferry copy` of `root` from node `source` to node `target` at `target_addr` (vShard 7,
/// migration `id`), logging warnings only; add flags, then run it.
pub fn ferry_copy_command(certs: &Certs, root: &Path, target_addr: &str, id: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["copy", "--node-id", "source", "--target-node", "target", "--vshard", "7", "--migration-id", id])
        .args(["--target", target_addr])
        .arg("--certs")
        .arg(certs.dir.path())
        .arg("--segments-root")
        .arg(root)
        .env("FERRY_LOG", "warn");
    cmd
}

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

/// Polls `migration.status` of `id` until `accept` takes it (`what` names that event); an
/// error when the migration becomes `Failed` first (unless `accept` takes that) or `within`
/// passes. Not found yet is waited for: an inbound migration appears when its source connects.
pub async fn wait_for_status(
    client: &mut ControlClient,
    id: &MigrationId,
    what: &str,
    within: Duration,
    mut accept: impl FnMut(&MigrationStatus) -> bool,
) -> anyhow::Result<MigrationStatus> {
    let mut polls = Polls::new(&format!("{what} of {id}"), within);
    loop {
        let pause = match client.status(id).await {
            Ok(status) if accept(&status) => return Ok(status),
            Ok(status) if status.phase == Phase::Failed => {
                anyhow::bail!("{id} failed while waiting for {what}: {:?}", status.reason);
            }
            Ok(status) => polls.next(Some(&status))?,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => polls.next(Some(&e))?,
            Err(e) => return Err(e.into()),
        };
        tokio::time::sleep(pause).await;
    }
}

/// [`wait_for_status`] until its phase is `phase`.
pub async fn wait_for_phase(
    client: &mut ControlClient,
    id: &MigrationId,
    phase: Phase,
    within: Duration,
) -> anyhow::Result<MigrationStatus> {
    wait_for_status(client, id, &format!("phase {phase:?}"), within, |status| status.phase == phase).await
}

/// Waits until the source WAL in `wal_dir` rolled `rolls` more times (that many segment files
/// newer than its newest now) and the target's durable LSN of `id` reached what `writer` had
/// acknowledged by then: the tail streamed across those rolls.
pub async fn wait_for_tail_across_rolls(
    client: &mut ControlClient,
    id: &MigrationId,
    writer: &RefWriter,
    wal_dir: &Path,
    rolls: usize,
    within: Duration,
) -> anyhow::Result<MigrationStatus> {
    let newest = wal_segments(wal_dir)?.pop();
    let rolled = || {
        wal_segments(wal_dir).is_ok_and(|names| names.iter().filter(|n| Some(*n) > newest.as_ref()).count() >= rolls)
    };
    wait_until(&format!("{rolls} rolls of the source WAL after {newest:?}"), within, rolled).await?;
    let acked = writer.acked_lsn().0;
    let what = format!("durable LSN {acked}");
    wait_for_status(client, id, &what, within, |status| status.wal.current_lsn >= Some(acked)).await
}

/// The names of the WAL segment files in `wal_dir`, oldest first (a name holds its first LSN).
fn wal_segments(wal_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(wal_dir).with_context(|| format!("list {}", wal_dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("wal-") && name.ends_with(".seg") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The `MANIFEST.json` of the staging of `id` under a target's data folder, as plain JSON (read
/// apart from ferry's manifest types, as a database's importer would).
pub fn manifest_json(target_data_dir: &Path, id: &str) -> anyhow::Result<serde_json::Value> {
    let path = target_data_dir.join("migrations").join(id).join("MANIFEST.json");
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

/// [`manifest_json`] once its `state` is `state`, waiting up to 10 s for it: the target's
/// `fenced` MANIFEST commit follows its answer to the fence (DESIGN section 8), so a fence call
/// may return before it is on disk. Returns the last manifest read when it never gets there.
pub fn manifest_json_when(target_data_dir: &Path, id: &str, state: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let manifest = manifest_json(target_data_dir, id);
        let reached = manifest.as_ref().is_ok_and(|m| m["state"] == state);
        if reached || std::time::Instant::now() >= deadline {
            return manifest;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_that_times_out_names_its_event() {
        let e = wait_until_blocking("the moon to rise", Duration::from_millis(20), || false).unwrap_err();
        assert!(e.to_string().contains("the moon to rise"), "{e}");
    }

    #[test]
    fn a_wait_ends_once_its_condition_holds() {
        let mut looks_count = 0;
        let third = || {
            looks_count += 1;
            looks_count == 3
        };
        wait_until_blocking("the third look", Duration::from_secs(10), third).unwrap();
        assert_eq!(looks_count, 3);
    }

    #[tokio::test]
    async fn the_async_waits_time_out_and_end_alike() {
        let e = wait_until("the tide", Duration::from_millis(20), || false).await.unwrap_err();
        assert!(e.to_string().contains("the tide"), "{e}");
        let e = wait_for_some("an answer", Duration::from_millis(20), || async { None::<u8> }).await.unwrap_err();
        assert!(e.to_string().contains("an answer"), "{e}");
        let mut tries_count = 0u8;
        let second = || {
            tries_count += 1;
            let answer = (tries_count == 2).then_some(tries_count);
            async move { answer }
        };
        assert_eq!(wait_for_some("the second try", Duration::from_secs(10), second).await.unwrap(), 2);
    }
}
