//! RDMA between `ferry serve` processes: a base copy between two daemons over RDMA, and the
//! fallback of a daemon whose RDMA device does not exist.
//!
//! What it does: [`daemon_copy`] starts a target and a source daemon, both with `transport =
//! "rdma"` on the device under test and `require_rdma = true`, checks with `node.info` that both
//! settled on RDMA, runs an offline migration through the source's control socket, and checks
//! that it completed with no fallback (`ferry_rdma_fallbacks_total` 0 on both; under
//! `require_rdma` a transfer that cannot have RDMA fails instead of falling back) and that the
//! staged files are byte-identical to the source's (CRC32C of each). [`fallback`] starts a
//! daemon asked for RDMA on a device that does not exist: it must serve over QUIC and say so
//! (the `RDMA FALLBACK` log line, `ferry_rdma_fallbacks_total`, `node.info`'s reason, the same
//! reason `select::choose` gives for this build and machine), and with `require_rdma` it must
//! refuse to start, naming why.
//!
//! What it does not: use two hosts (both daemons run here, their QUIC on loopback and their
//! queue pairs on the one device), or need hardware for [`fallback`].
//!
//! Invariants: every daemon is killed when its handle drops; every folder is removed with the
//! run's temporary folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_engine::transfer::rdma::select::{self, Choice, RdmaSettings, TransportSetting};
use serde_json::{json, Value};

use crate::daemons::{refusal, write_config, Certs, Node};

/// A device name no machine has.
pub const MISSING_DEVICE: &str = "ferry-no-such-rdma-device";
/// How long a daemon copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(600);

/// Which device, port and GID index: `FERRY_HW_RDMA_DEVICE`, `_PORT` (1), `_GID_INDEX` (0).
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    pub device: Option<String>,
    pub port: u8,
    pub gid_index: u8,
}

impl RdmaConfig {
    pub fn from_env() -> Self {
        let number = |name: &str, default: u8| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Self {
            device: std::env::var("FERRY_HW_RDMA_DEVICE").ok(),
            port: number("FERRY_HW_RDMA_PORT", 1),
            gid_index: number("FERRY_HW_RDMA_GID_INDEX", 0),
        }
    }

    /// The config lines of a daemon on this device.
    fn toml(&self, device: &str, require: bool) -> String {
        format!(
            "transport = \"rdma\"\nrdma_device = \"{device}\"\nrdma_port = {}\nrdma_gid_index = {}\nrequire_rdma = {require}\n",
            self.port, self.gid_index
        )
    }
}

/// A shard of `files_count` files of `file_size_bytes` each (the first two of 0 and 1 byte when
/// there are more than two: the edges), in `root`.
pub fn write_shard(root: &Path, files_count: usize, file_size_bytes: u64) -> anyhow::Result<Vec<(PathBuf, u32)>> {
    let mut files = Vec::with_capacity(files_count);
    for index in 0..files_count {
        let size = match index {
            0 if files_count > 2 => 0,
            1 if files_count > 2 => 1,
            _ => file_size_bytes,
        };
        let relative = PathBuf::from(format!("L{}/{index:05}.seg", index % 4));
        let path = root.join(&relative);
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        let crc = crate::nvme::direct::write_pattern(&path, size, index as u64)?;
        files.push((relative, crc));
    }
    Ok(files)
}

/// Two daemons on one RDMA device, and a shard to copy between them.
#[derive(Debug)]
pub struct RdmaPair {
    _dir: tempfile::TempDir,
    pub source: Node,
    pub target: Node,
    pub shard: PathBuf,
    pub files: Vec<(PathBuf, u32)>,
    pub bytes_total: u64,
    copies_count: u32,
}

/// What one copy took.
#[derive(Debug, Clone, Copy)]
pub struct CopyRun {
    pub bytes: u64,
    /// From `migration.start` to `Completed` as the source reports it (polled every 10 ms).
    pub elapsed: Duration,
}

impl RdmaPair {
    /// Starts both daemons on `device` with `require_rdma` and writes the shard into `parent`
    /// (a temporary folder under it).
    pub fn start(
        bin: &Path,
        parent: &Path,
        config: &RdmaConfig,
        device: &str,
        files_count: usize,
        file_size_bytes: u64,
    ) -> anyhow::Result<Self> {
        Self::start_on(bin, parent, Some((config, device)), files_count, file_size_bytes)
    }

    /// [`RdmaPair::start`], or with `rdma: None` the same pair on QUIC (`transport = "quic"`):
    /// the copy and its checks without hardware, for the tests here.
    pub fn start_on(
        bin: &Path,
        parent: &Path,
        rdma: Option<(&RdmaConfig, &str)>,
        files_count: usize,
        file_size_bytes: u64,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-hw-rdma-daemons-").tempdir_in(parent)?;
        let certs = Certs::new(&dir.path().join("certs"))?;
        let shard = dir.path().join("shard");
        let files = write_shard(&shard, files_count, file_size_bytes)?;
        let bytes_total =
            files.iter().map(|(p, _)| std::fs::metadata(shard.join(p)).map(|m| m.len()).unwrap_or(0)).sum();
        let (lines, want) = match rdma {
            Some((config, device)) => (config.toml(device, true), "rdma"),
            None => ("transport = \"quic\"\n".to_owned(), "quic"),
        };
        let target_config =
            write_config(dir.path(), "target", &certs, &format!("allowed_peers = [\"source\"]\n{lines}"))?;
        let source_config = write_config(dir.path(), "source", &certs, &lines)?;
        let target = Node::start(bin, &target_config)?;
        let source = Node::start(bin, &source_config)?;
        for (name, node) in [("source", &source), ("target", &target)] {
            let info = node.call("node.info", json!({}))?;
            let transport = &info["transport"];
            anyhow::ensure!(
                transport["in_use"] == want,
                "the {name} daemon does not use {want}: {transport} (features: {})",
                info["features"]
            );
        }
        Ok(Self { _dir: dir, source, target, shard, files, bytes_total, copies_count: 0 })
    }

    /// Runs one offline migration of the shard and checks it; a fresh migration id each time.
    pub fn copy(&mut self, chunk_len_bytes: u32, streams_count: u32) -> anyhow::Result<CopyRun> {
        self.copies_count += 1;
        let id = format!("hw-rdma-{}", self.copies_count);
        let params = json!({
            "migration_id": id, "vshard_id": self.copies_count, "segments_root": self.shard.display().to_string(),
            "target_address": self.target.addr, "target_node_id": "target", "offline": true,
            "chunk_len_bytes": chunk_len_bytes, "streams": streams_count,
        });
        let started = Instant::now();
        self.source.call("migration.start", params)?;
        let done = self.source.wait_completed(&id, COPY_TIMEOUT)?;
        let elapsed = started.elapsed();
        let bytes = done["bytes_transferred"].as_u64().context("no bytes_transferred in the status")?;
        anyhow::ensure!(bytes == self.bytes_total, "the copy moved {bytes} of {} bytes: {done}", self.bytes_total);
        for (name, node) in [("source", &self.source), ("target", &self.target)] {
            let fallbacks = node.metric("ferry_rdma_fallbacks_total")?;
            anyhow::ensure!(
                fallbacks == 0.0,
                "the {name} daemon fell back to QUIC {fallbacks} times: {}",
                node.log_text()
            );
        }
        let staged = self.target.data_dir.join("migrations").join(&id).join("segments");
        check_staged(&staged, &self.files)?;
        // The next copy stages anew: this one's snapshot links go, and its released staging
        // (the database's to import) too, so rounds do not fill the folder.
        self.source.call("migration.forget", json!({ "migration_id": id }))?;
        let _ = std::fs::remove_dir_all(&staged);
        Ok(CopyRun { bytes, elapsed })
    }
}

/// Every staged file has its source's CRC32C.
pub fn check_staged(staged: &Path, files: &[(PathBuf, u32)]) -> anyhow::Result<()> {
    for (relative, crc) in files {
        let bytes = std::fs::read(staged.join(relative)).with_context(|| format!("staged {}", relative.display()))?;
        let got = ferry_wire::crc32c(&bytes);
        anyhow::ensure!(got == *crc, "staged {} has CRC32C {got:08x}, its source {crc:08x}", relative.display());
    }
    Ok(())
}

/// The hardware test: a base copy between two daemons over RDMA on the configured device.
pub fn daemon_copy(bin: &Path, config: &RdmaConfig) -> anyhow::Result<String> {
    let device = config.device.clone().context("FERRY_HW_RDMA_DEVICE names the device to copy over")?;
    let mut pair = RdmaPair::start(bin, &std::env::temp_dir(), config, &device, 8, 16 << 20)?;
    let run = pair.copy(1 << 20, 4)?;
    Ok(format!(
        "{} bytes in {} files between two ferry serve processes over RDMA on {device} (port {}, gid {}) in {:.3} s, \
         no fallback, staged byte-identical",
        run.bytes,
        pair.files.len(),
        config.port,
        config.gid_index,
        run.elapsed.as_secs_f64()
    ))
}

/// The fallback test: see the module's doc. Needs no RDMA hardware.
pub fn fallback(bin: &Path, parent: &Path) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new().prefix("ferry-hw-rdma-fallback-").tempdir_in(parent)?;
    let certs = Certs::new(&dir.path().join("certs"))?;
    let config = RdmaConfig { device: Some(MISSING_DEVICE.into()), port: 1, gid_index: 0 };

    let loose = write_config(dir.path(), "target", &certs, &config.toml(MISSING_DEVICE, false))?;
    let node = Node::start(bin, &loose)?;
    let info = node.call("node.info", json!({}))?;
    let compiled = info["features"]["rdma"].as_bool().context("node.info has no features.rdma")?;
    let expected = expected_reason(compiled)?;
    let transport = &info["transport"];
    anyhow::ensure!(
        transport["configured"] == "rdma" && transport["in_use"] == "quic",
        "asked for RDMA on {MISSING_DEVICE}, node.info says {transport}"
    );
    anyhow::ensure!(
        transport["fallback_reason"] == Value::String(expected.clone()),
        "node.info's fallback reason is {}, select::choose says {expected:?}",
        transport["fallback_reason"]
    );
    let fallbacks = node.metric("ferry_rdma_fallbacks_total")?;
    anyhow::ensure!(fallbacks >= 1.0, "ferry_rdma_fallbacks_total is {fallbacks} after a fallback");
    let log = node.log_text();
    anyhow::ensure!(
        log.lines().any(|l| l.contains("RDMA FALLBACK") && l.contains(&expected)),
        "no RDMA FALLBACK line with the reason in the daemon's log:\n{log}"
    );
    drop(node);

    // The same node again, its config in a folder of its own, now with require_rdma.
    let strict_dir = dir.path().join("strict");
    std::fs::create_dir_all(&strict_dir)?;
    let strict = write_config(&strict_dir, "target", &certs, &config.toml(MISSING_DEVICE, true))?;
    let (status, log) = refusal(bin, &strict)?;
    anyhow::ensure!(!status.success(), "ferry serve with require_rdma exited with {status}");
    anyhow::ensure!(
        log.contains("require_rdma") && log.contains(&expected),
        "ferry serve with require_rdma did not say why it refused; its log:\n{log}"
    );
    Ok(format!(
        "asked for RDMA on {MISSING_DEVICE} (a ferry built {} the rdma feature): served over QUIC with the reason \
         in node.info, ferry_rdma_fallbacks_total {fallbacks} and an RDMA FALLBACK log line; with require_rdma it \
         exited ({status}) saying: {expected}",
        if compiled { "with" } else { "without" }
    ))
}

/// The reason `select::choose` gives for RDMA on [`MISSING_DEVICE`] with this machine's devices.
fn expected_reason(compiled: bool) -> anyhow::Result<String> {
    let settings = RdmaSettings { device: Some(MISSING_DEVICE.into()), port: 1, gid_index: 0, require: false };
    let devices = select::probe_devices(Path::new(select::SYSFS_DEVICES), 1);
    match select::choose(TransportSetting::Rdma, &settings, compiled, &devices) {
        Ok(Choice::QuicFallback { reason }) => Ok(reason),
        other => anyhow::bail!("select::choose chose {other:?} for a device that does not exist"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The fallback through real `ferry serve` processes: needs no RDMA hardware, so it runs in
    /// the plain `cargo test -p ferry-hwtests` (with and without `--features rdma`).
    #[test]
    fn a_daemon_on_a_missing_device_falls_back_loudly_or_refuses_with_require_rdma() {
        let bin = crate::daemons::ferry_bin().unwrap();
        let summary = fallback(&bin, &std::env::temp_dir()).unwrap();
        assert!(summary.contains(MISSING_DEVICE), "{summary}");
    }

    /// The pair's copy and checks (migration.start, Completed, no fallback, CRC32C of every
    /// staged file, forget and a second copy) on QUIC: what the RDMA run adds is the transport.
    #[test]
    fn a_pair_of_daemons_copies_twice_and_checks_every_staged_file() {
        let bin = crate::daemons::ferry_bin().unwrap();
        let parent = tempfile::tempdir().unwrap();
        let mut pair = RdmaPair::start_on(&bin, parent.path(), None, 5, 300_000).unwrap();
        for _ in 0..2 {
            let run = pair.copy(65536, 2).unwrap();
            assert_eq!(run.bytes, 1 + 3 * 300_000);
        }
        let staged = pair.target.data_dir.join("migrations/hw-rdma-2/segments");
        assert!(!staged.exists(), "a checked copy's staging is removed");
    }

    #[test]
    fn shards_have_edge_files_and_their_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_shard(dir.path(), 4, 10_000).unwrap();
        let sizes: Vec<u64> = files.iter().map(|(p, _)| std::fs::metadata(dir.path().join(p)).unwrap().len()).collect();
        assert_eq!(sizes, [0, 1, 10_000, 10_000]);
        check_staged(dir.path(), &files).unwrap();
        std::fs::write(dir.path().join(&files[3].0), b"other").unwrap();
        assert!(check_staged(dir.path(), &files).is_err());
    }
}
