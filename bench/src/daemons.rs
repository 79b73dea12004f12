//! ferry as two processes: `ferry serve` (target) and `ferry copy` (source), measured per side.
//!
//! What it does: starts a fresh `ferry serve` child staging into a new folder, waits for its
//! `listening on ADDR` line, runs a `ferry copy --json` child against it, samples both
//! processes' memory every 10 ms ([`crate::procstat::Sampler`]), and reads CPU time: the copy
//! process's total (read as a zombie), the serve process's delta across the copy. Then it
//! kills the daemon and removes the staging and the snapshot links.
//!
//! What it does not: start the daemons' coordinator side (there is none for an offline copy)
//! or check the staged bytes beyond their sizes (ferry's CRC32C checks did).
//!
//! Invariants: a child process is killed and reaped when its guard drops, also on error.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_engine::snapshot::Snapshot;
use ferry_wire::MigrationId;

use crate::certs::{BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::procstat::{self, MemorySample, Sampler};
use crate::shard::Shard;

/// How long `ferry serve` has to print its listening line.
const SERVE_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The `ferry` binary next to this executable (`target/<profile>/ferry`), or `FERRY_BIN`.
pub fn ferry_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(path));
    }
    let bin = ferry_hwtests::daemons::ferry_beside_this_executable()?;
    anyhow::ensure!(
        bin.exists(),
        "no ferry binary at {}: build it with `cargo build --release -p ferry-engine --bin ferry` (or set FERRY_BIN)",
        bin.display()
    );
    Ok(bin)
}

/// Whether `ferry copy` takes `--connections` (several QUIC connections per copy).
pub fn copy_has_connections_flag(bin: &Path) -> bool {
    Command::new(bin)
        .args(["copy", "--help"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("--connections"))
        .unwrap_or(false)
}

/// How one daemon copy is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DaemonShape {
    pub chunk_len_bytes: u32,
    pub streams_count: u32,
    /// `Some(n)` passes `--connections n` (only when the binary has the flag).
    pub connections_count: Option<u32>,
}

/// What one side of a daemon copy cost.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SideCost {
    pub peak: MemorySample,
    pub cpu_secs: f64,
}

/// What one daemon copy measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DaemonRun {
    pub shape: DaemonShape,
    pub bytes_total: u64,
    /// Wall clock around the `ferry copy` process (start-up and exit included).
    pub wall_secs: f64,
    /// `ferry copy`'s own figure from its JSON report (snapshot to committed).
    pub report_bytes_per_sec: u64,
    pub source: SideCost,
    pub target: SideCost,
}

/// Kills and reaps a child when dropped.
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one copy of `shard` through `ferry serve` + `ferry copy` child processes.
pub fn daemon_copy(
    bin: &Path,
    certs: &BenchCerts,
    shard: &Shard,
    staging_parent: &Path,
    migration_id: &str,
    shape: DaemonShape,
) -> anyhow::Result<DaemonRun> {
    let data_dir = tempfile::Builder::new().prefix("ferry-bench-daemon-").tempdir_in(staging_parent)?;
    let sampler = Sampler::start();
    let mut serve = ChildGuard(
        Command::new(bin)
            .arg("serve")
            .args(["--node-id", TARGET_NODE, "--listen", "127.0.0.1:0", "--allow-peer", SOURCE_NODE])
            .args(["--progress-interval-ms", "0"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--certs")
            .arg(certs.path())
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} serve", bin.display()))?,
    );
    let serve_pid = serve.0.id();
    sampler.watch(serve_pid);
    let (addr, _serve_lines) = wait_listening(&mut serve.0)?;
    let (_, serve_ticks_before) = procstat::read_cpu_ticks(serve_pid)?;

    let mut command = Command::new(bin);
    command
        .arg("copy")
        .args(["--node-id", SOURCE_NODE, "--target-node", TARGET_NODE, "--vshard", "1", "--json"])
        .args(["--migration-id", migration_id])
        .arg("--target")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(certs.path())
        .arg("--segments-root")
        .arg(&shard.root)
        .arg("--chunk-len")
        .arg(shape.chunk_len_bytes.to_string())
        .arg("--streams")
        .arg(shape.streams_count.to_string());
    if let Some(connections) = shape.connections_count {
        command.arg("--connections").arg(connections.to_string());
    }
    let started = Instant::now();
    let mut copy = ChildGuard(
        command
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} copy", bin.display()))?,
    );
    let copy_pid = copy.0.id();
    sampler.watch(copy_pid);
    // Drain stdout on a thread so a full pipe never stalls the copy.
    let mut stdout = copy.0.stdout.take().context("no stdout pipe")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let (status, source_cpu_secs) = procstat::wait_with_cpu(&mut copy.0)?;
    let wall_secs = started.elapsed().as_secs_f64();
    let (_, serve_ticks_after) = procstat::read_cpu_ticks(serve_pid)?;
    let source_peak = sampler.peak(copy_pid);
    let target_peak = sampler.peak(serve_pid);
    drop(sampler);
    drop(serve);
    let _ = Snapshot::remove(&shard.root, &MigrationId::new(migration_id)?);
    let out = reader.join().map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
    anyhow::ensure!(status.success(), "ferry copy failed ({status}); its output: {out}");
    let report: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("ferry copy printed no JSON report: {out}"))?;
    let bytes_total = report.get("bytes_total").and_then(|v| v.as_u64()).context("no bytes_total in the report")?;
    anyhow::ensure!(bytes_total == shard.size_bytes, "ferry copy moved {bytes_total} bytes of {}", shard.size_bytes);
    let staged = data_dir.path().join("migrations").join(migration_id).join("segments");
    crate::ferry_copy::check_sizes(shard, &staged)?;
    Ok(DaemonRun {
        shape,
        bytes_total,
        wall_secs,
        report_bytes_per_sec: report.get("throughput_bytes_per_sec").and_then(|v| v.as_u64()).unwrap_or(0),
        source: SideCost { peak: source_peak, cpu_secs: source_cpu_secs },
        target: SideCost {
            peak: target_peak,
            cpu_secs: procstat::ticks_to_secs(serve_ticks_after.saturating_sub(serve_ticks_before)),
        },
    })
}

/// Reads a child's stdout until its `listening on ADDR` line (as `ferry serve` prints it);
/// returns the address and the child's later stdout lines.
pub fn wait_listening(child: &mut Child) -> anyhow::Result<(SocketAddr, mpsc::Receiver<String>)> {
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + SERVE_READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|_| {
            anyhow::anyhow!("the child did not print its listening line within {SERVE_READY_TIMEOUT:?}")
        })?;
        if let Some(addr) = line.strip_prefix("listening on ") {
            let addr = addr.trim().parse().with_context(|| format!("the child printed an odd address {addr:?}"))?;
            return Ok((addr, rx));
        }
    }
}
