//! ferry-bench-e2e: the base-copy benchmark of issue 3, every contender in one run.
//!
//! What it does: generates one shard (default 1 GiB, on tmpfs), then, interleaved over
//! `--rounds` rounds, copies it over loopback with: the raw quinn baseline in one process
//! (`raw_quinn`) and with its receiver in a child process (`raw_quinn_2proc`, this binary run
//! with a hidden first argument), ferry in-process staging on tmpfs with 1 connection
//! (`ferry_tmpfs`), the same with quinn's default MTU bound of 1452 instead of ferry's
//! (`ferry_tmpfs_mtu1452`), and 2 connections (`ferry_tmpfs_2c`), ferry in-process staging on disk,
//! plain TCP landing on tmpfs, and `scp` (OpenSSH's default cipher, and aes128-gcm) against a
//! throwaway sshd. It prints each one's median rate and the ratios the issue sets goals for.
//! Then it runs ferry as two processes (`ferry serve` and `ferry copy`), `--daemon-rounds`
//! times per shape, for chunk sizes 1 and 4 MiB and 1, 2, 4 connections (or streams, when
//! `ferry copy` has no `--connections`), and prints per daemon the peak RssAnon, RssFile and
//! RssShmem and CPU-seconds per GiB. With `--rss-shard-size 4GiB` it repeats the daemon run on
//! a shard of that size for the peak-memory figure.
//!
//! What it does not: assert on any figure. It fails only when a copy fails.
//!
//! Run: `cargo build --release -p ferry-engine --bin ferry && cargo run --release -p
//! ferry-bench --bin ferry-bench-e2e -- --shard-size 1GiB`.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ferry_bench::certs::BenchCerts;
use ferry_bench::daemons::{self, DaemonRun, DaemonShape};
use ferry_bench::ferry_copy::{ferry_copy, FerryShape};
use ferry_bench::procstat;
use ferry_bench::raw_quinn::{self, raw_quinn_copy};
use ferry_bench::scp::{scp_copy, Sshd};
use ferry_bench::shard::Shard;
use ferry_bench::tcp::tcp_copy;
use ferry_bench::{format_bytes, fs_type, parse_size_bytes, RunResult};

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Parser)]
#[command(about = "ferry's base-copy benchmark (issue 3): ferry vs raw quinn, TCP and scp over loopback")]
struct Args {
    /// Shard size (binary units: 1GiB, 256MiB).
    #[arg(long, default_value = "1GiB")]
    shard_size: String,
    /// Files in the shard.
    #[arg(long, default_value_t = 8)]
    files: u32,
    /// Where the shard is generated (the source side's files).
    #[arg(long, default_value = "/dev/shm")]
    shard_dir: PathBuf,
    /// A tmpfs folder for the "tmpfs" staging.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,
    /// A disk folder for the "disk" staging (default: the system temp dir).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Rounds of the in-process comparison; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also run the daemon copy on a shard of this size (e.g. 4GiB) for the peak-memory figure.
    #[arg(long)]
    rss_shard_size: Option<String>,
    /// Rounds of the two-process measurements (each shape runs this many times, interleaved).
    #[arg(long, default_value_t = 1)]
    daemon_rounds: u32,
    /// Skip the two-process (daemon) measurements.
    #[arg(long)]
    skip_daemons: bool,
    /// Skip scp.
    #[arg(long)]
    skip_scp: bool,
    /// Also write every measurement as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these in-process contenders (comma-separated, e.g. `raw_quinn,ferry_tmpfs`;
    /// default: all), for profiling one of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// The contenders of the in-process comparison, in the order each round runs them.
const RAW_QUINN: &str = "raw_quinn";
const RAW_QUINN_2P: &str = "raw_quinn_2proc";
const FERRY_TMPFS: &str = "ferry_tmpfs";
const FERRY_TMPFS_2C: &str = "ferry_tmpfs_2c";
/// ferry with quinn's default MTU bound (1452) instead of its own, to show what that bound gives.
const FERRY_TMPFS_1452: &str = "ferry_tmpfs_mtu1452";
const FERRY_DISK: &str = "ferry_disk";
const TCP_TMPFS: &str = "tcp_tmpfs";
const SCP_DEFAULT: &str = "scp";
const SCP_AES: &str = "scp_aes128gcm";

/// The hidden first argument that makes this binary the raw quinn receiver of the
/// two-process baseline: `ferry-bench-e2e __raw-quinn-receiver <certs dir>`.
const RAW_QUINN_RECEIVER_MODE: &str = "__raw-quinn-receiver";

fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == RAW_QUINN_RECEIVER_MODE) {
        let certs_dir = argv.get(2).context("usage: ferry-bench-e2e __raw-quinn-receiver <certs dir>")?;
        return raw_quinn_receiver(Path::new(certs_dir));
    }
    let args = Args::parse();
    let shard_size = parse_size_bytes(&args.shard_size)?;
    let disk_dir = args.disk_dir.clone().unwrap_or_else(std::env::temp_dir);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# ferry base-copy bench (issue 3)");
    println!("cores: {cores}; shard: {} in {} files", format_bytes(shard_size), args.files);
    println!("load average at start: {}", loadavg());
    for (what, dir) in [("shard", &args.shard_dir), ("tmpfs staging", &args.tmpfs_dir), ("disk staging", &disk_dir)] {
        println!("{what}: {} ({})", dir.display(), fs_type(dir).unwrap_or_else(|e| format!("unknown: {e}")));
    }
    if fs_type(&args.tmpfs_dir).ok().as_deref() != Some("tmpfs") {
        println!("WARNING: {} is not tmpfs; the tmpfs column is not what it says", args.tmpfs_dir.display());
    }
    if fs_type(&disk_dir).ok().as_deref() == Some("tmpfs") {
        println!("WARNING: {} is tmpfs; pass --disk-dir on a real disk for the disk column", disk_dir.display());
    }

    let generated = Instant::now();
    let shard = Shard::generate(&args.shard_dir, shard_size, args.files, 0xfe77)?;
    println!("generated the shard in {:.1} s", generated.elapsed().as_secs_f64());
    let certs = BenchCerts::new()?;
    let sshd = if args.skip_scp {
        println!("scp: skipped (--skip-scp)");
        None
    } else {
        match Sshd::start() {
            Ok(sshd) => {
                println!("scp: throwaway sshd on 127.0.0.1:{}", sshd.port);
                Some(sshd)
            }
            Err(e) => {
                println!("!!!!! SCP COLUMN SKIPPED: cannot start an OpenSSH server on 127.0.0.1: {e:#}");
                None
            }
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bench").build()?;
    let mut runs: Vec<(&str, Vec<RunResult>)> = Vec::new();
    let mut record = |name: &'static str, run: RunResult| {
        println!("  {name:<14} {:>8.1} MB/s  ({:.3} s)", run.bytes_per_sec() / 1e6, run.elapsed.as_secs_f64());
        match runs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(run),
            None => runs.push((name, vec![run])),
        }
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    for round in 0..args.rounds {
        println!("round {}/{}", round + 1, args.rounds);
        if wanted(RAW_QUINN) {
            record(RAW_QUINN, runtime.block_on(raw_quinn_copy(&certs, shard.size_bytes))?);
        }
        if wanted(RAW_QUINN_2P) {
            let (run, sender_cpu_secs, receiver_cpu_secs) = raw_quinn_two_process(&runtime, &certs, shard.size_bytes)?;
            let gib = shard.size_bytes as f64 / GIB;
            println!(
                "  (raw_quinn_2proc CPU-s/GiB: sender {:.2}, receiver {:.2})",
                sender_cpu_secs / gib,
                receiver_cpu_secs / gib
            );
            record(RAW_QUINN_2P, run);
        }
        if wanted(FERRY_TMPFS) {
            let id = format!("bench-tmpfs-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, FerryShape::default()))?;
            record(FERRY_TMPFS, copied.0);
        }
        if wanted(FERRY_TMPFS_1452) {
            let id = format!("bench-tmpfs1452-{round}");
            let shape = FerryShape { mtu_upper_bound_bytes: 1452, ..FerryShape::default() };
            record(FERRY_TMPFS_1452, runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, shape))?.0);
        }
        if wanted(FERRY_TMPFS_2C) {
            let id = format!("bench-tmpfs2c-{round}");
            let two = FerryShape { streams_count: 2, connections_count: 2, ..FerryShape::default() };
            record(FERRY_TMPFS_2C, runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, two))?.0);
        }
        if wanted(FERRY_DISK) {
            let id = format!("bench-disk-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &shard, &disk_dir, &id, FerryShape::default()))?;
            record(FERRY_DISK, copied.0);
        }
        if wanted(TCP_TMPFS) {
            record(TCP_TMPFS, with_target_dir(&args.tmpfs_dir, |dir| tcp_copy(&shard, dir))?);
        }
        if let Some(sshd) = &sshd {
            if wanted(SCP_DEFAULT) {
                record(SCP_DEFAULT, with_target_dir(&args.tmpfs_dir, |dir| scp_copy(sshd, &shard, dir, None))?);
            }
            if wanted(SCP_AES) {
                let aes = Some("aes128-gcm@openssh.com");
                record(SCP_AES, with_target_dir(&args.tmpfs_dir, |dir| scp_copy(sshd, &shard, dir, aes))?);
            }
        }
    }
    drop(sshd);
    drop(runtime);

    println!("load average after the rounds: {}", loadavg());
    println!();
    println!("## throughput: {} shard, median of {} rounds (raw_quinn, ferry_*: sender and receiver in this process; raw_quinn_2proc: receiver in a child process)", format_bytes(shard.size_bytes), args.rounds);
    println!("{:<16} {:>12} {:>12} {:>12}", "variant", "median MB/s", "min MB/s", "max MB/s");
    let mut medians = Vec::new();
    for (name, list) in &runs {
        let mut rates: Vec<f64> = list.iter().map(RunResult::bytes_per_sec).collect();
        rates.sort_by(f64::total_cmp);
        let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
        let (min, max) = (rates.first().copied().unwrap_or(0.0), rates.last().copied().unwrap_or(0.0));
        println!("{name:<16} {:>12.1} {:>12.1} {:>12.1}", median / 1e6, min / 1e6, max / 1e6);
        medians.push((*name, median));
    }
    let median_of = |name: &str| medians.iter().find(|(n, _)| *n == name).map(|(_, m)| *m);
    println!();
    println!("ratios (medians):");
    let mut ratios = Vec::new();
    for (top, bottom, goal) in [
        (FERRY_TMPFS, RAW_QUINN, Some(">= 0.85")),
        (RAW_QUINN_2P, RAW_QUINN, None),
        (FERRY_TMPFS_1452, RAW_QUINN, None),
        (FERRY_TMPFS, SCP_DEFAULT, Some(">= 1.8")),
        (FERRY_TMPFS_2C, RAW_QUINN, None),
        (FERRY_TMPFS_2C, SCP_DEFAULT, None),
        (FERRY_DISK, RAW_QUINN, None),
        (FERRY_TMPFS, SCP_AES, None),
        (FERRY_TMPFS, TCP_TMPFS, None),
    ] {
        let label = format!("{top}/{bottom}");
        match (median_of(top), median_of(bottom)) {
            (Some(t), Some(b)) if b > 0.0 => {
                let goal = goal.map_or(String::new(), |g| format!("   (goal {g})"));
                println!("  {label:<28} {:>6.3}{goal}", t / b);
                ratios.push((label, t / b));
            }
            _ => println!("  {label:<28}    n/a   ({bottom} was not measured)"),
        }
    }

    let mut daemon_rows: Vec<DaemonRow> = Vec::new();
    if !args.skip_daemons {
        let bin = daemons::ferry_bin()?;
        let connections = daemons::copy_has_connections_flag(&bin);
        println!();
        println!("## two processes: `ferry serve` (target) + `ferry copy` (source), {}", bin.display());
        if connections {
            println!("`ferry copy` has --connections: varying connections, 4 streams in all (4/k per connection)");
        } else {
            println!(
                "NOTE: `ferry copy` has no --connections flag yet (one QUIC connection per copy): varying --streams"
            );
        }
        let mut plan = Vec::new();
        for chunk_len_bytes in [1u32 << 20, 4 << 20] {
            for k in [1u32, 2, 4] {
                let shape = if connections {
                    DaemonShape { chunk_len_bytes, streams_count: 4 / k, connections_count: Some(k) }
                } else {
                    DaemonShape { chunk_len_bytes, streams_count: k, connections_count: None }
                };
                plan.push(("tmpfs", args.tmpfs_dir.clone(), shape));
            }
        }
        let default_shape = DaemonShape { chunk_len_bytes: 1 << 20, streams_count: 4, connections_count: None };
        plan.push(("disk", disk_dir.clone(), default_shape));
        let rows = run_daemon_plan(&bin, &certs, &shard, &plan, args.daemon_rounds, "d")?;
        print_daemon_table(&format_bytes(shard.size_bytes), &rows);
        println!("load average after the daemon runs: {}", loadavg());
        if let Some(row) = rows.first() {
            let rate = row.median_wall_bytes_per_sec();
            for (name, base) in [(RAW_QUINN, median_of(RAW_QUINN)), (RAW_QUINN_2P, median_of(RAW_QUINN_2P))] {
                if let Some(base) = base {
                    println!(
                        "two-process ferry_tmpfs (1 MiB chunks, 4 streams, 1 connection; median wall-clock rate around `ferry copy`) / {name}: {:.3}",
                        rate / base
                    );
                }
            }
        }
        daemon_rows.extend(rows);

        if let Some(size) = &args.rss_shard_size {
            let size = parse_size_bytes(size)?;
            drop(shard);
            println!();
            println!("## peak memory on a {} shard (two processes, tmpfs staging)", format_bytes(size));
            let generated = Instant::now();
            let big = Shard::generate(&args.shard_dir, size, args.files, 0xb16)?;
            println!("generated the shard in {:.1} s", generated.elapsed().as_secs_f64());
            let plan: Vec<_> = [1u32 << 20, 4 << 20]
                .into_iter()
                .map(|chunk_len_bytes| {
                    ("tmpfs", args.tmpfs_dir.clone(), DaemonShape { chunk_len_bytes, ..default_shape })
                })
                .collect();
            let rows = run_daemon_plan(&bin, &certs, &big, &plan, 1, "big")?;
            print_daemon_table(&format_bytes(size), &rows);
            daemon_rows.extend(rows);
        }
    }

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "shard_size_bytes": shard_size,
            "files": args.files,
            "rounds": args.rounds,
            "in_process": runs.iter().map(|(name, list)| serde_json::json!({
                "variant": name,
                "bytes_per_sec": list.iter().map(RunResult::bytes_per_sec).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "ratios": ratios.iter().map(|(l, r)| serde_json::json!({"ratio": l, "value": r})).collect::<Vec<_>>(),
            "daemons": daemon_rows.iter().map(|row| serde_json::json!({"staging": row.staging, "runs": row.runs})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The child side of the two-process raw quinn baseline: listen, print the address, receive
/// one stream, print its length.
fn raw_quinn_receiver(certs_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let endpoint = raw_quinn::receiver_endpoint(certs_dir)?;
        println!("listening on {}", endpoint.local_addr()?);
        std::io::Write::flush(&mut std::io::stdout())?;
        let received = raw_quinn::receive_all(endpoint.clone()).await?;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        println!("received {received}");
        Ok(())
    })
}

/// The raw quinn baseline with the receiver in a child process (like `ferry serve`) and the
/// sender in this process; returns the run and the sender's and receiver's CPU-seconds.
fn raw_quinn_two_process(
    runtime: &tokio::runtime::Runtime,
    certs: &BenchCerts,
    bytes_total: u64,
) -> anyhow::Result<(RunResult, f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg(RAW_QUINN_RECEIVER_MODE)
        .arg(certs.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the raw quinn receiver process")?;
    let result = (|| {
        let (addr, lines) = daemons::wait_listening(&mut child)?;
        // This process is otherwise idle while it sends: its CPU time is the sender's.
        let (_, sender_ticks_before) = procstat::read_cpu_ticks(std::process::id())?;
        let run = runtime.block_on(raw_quinn::send_all(certs.path(), addr, bytes_total))?;
        let (_, sender_ticks_after) = procstat::read_cpu_ticks(std::process::id())?;
        let sender_cpu_secs = procstat::ticks_to_secs(sender_ticks_after.saturating_sub(sender_ticks_before));
        let (status, receiver_cpu_secs) = procstat::wait_with_cpu(&mut child)?;
        anyhow::ensure!(status.success(), "the raw quinn receiver failed ({status})");
        let received = lines
            .iter()
            .find_map(|line| line.strip_prefix("received ").and_then(|n| n.trim().parse::<u64>().ok()))
            .context("the raw quinn receiver did not say how much it received")?;
        anyhow::ensure!(received == bytes_total, "the raw quinn receiver got {received} of {bytes_total} bytes");
        Ok((run, sender_cpu_secs, receiver_cpu_secs))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Runs `f` with a fresh folder under `parent`, removed afterwards.
fn with_target_dir(parent: &Path, f: impl FnOnce(&Path) -> anyhow::Result<RunResult>) -> anyhow::Result<RunResult> {
    let dir = tempfile::Builder::new().prefix("ferry-bench-out-").tempdir_in(parent)?;
    f(dir.path())
}

/// `/proc/loadavg`'s first three fields: other work on this shared machine skews the figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Every run of one daemon shape.
#[derive(Debug)]
struct DaemonRow {
    staging: &'static str,
    shape: DaemonShape,
    runs: Vec<DaemonRun>,
}

impl DaemonRow {
    fn median(&self, f: impl Fn(&DaemonRun) -> f64) -> f64 {
        let mut values: Vec<f64> = self.runs.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    }

    fn median_wall_bytes_per_sec(&self) -> f64 {
        self.median(|r| r.bytes_total as f64 / r.wall_secs.max(1e-9))
    }

    fn peak(&self, f: impl Fn(&DaemonRun) -> u64) -> u64 {
        self.runs.iter().map(f).max().unwrap_or(0)
    }
}

/// Runs every `(staging name, staging folder, shape)` of `plan` `rounds` times, interleaved.
fn run_daemon_plan(
    bin: &Path,
    certs: &BenchCerts,
    shard: &Shard,
    plan: &[(&'static str, PathBuf, DaemonShape)],
    rounds: u32,
    tag: &str,
) -> anyhow::Result<Vec<DaemonRow>> {
    let mut rows: Vec<DaemonRow> =
        plan.iter().map(|(staging, _, shape)| DaemonRow { staging, shape: *shape, runs: Vec::new() }).collect();
    for round in 0..rounds.max(1) {
        for (i, ((_, dir, shape), row)) in plan.iter().zip(rows.iter_mut()).enumerate() {
            let id = format!("bench-{tag}-{round}-{i}");
            let run = daemons::daemon_copy(bin, certs, shard, dir, &id, *shape)?;
            println!(
                "  {:<5} {}M x {} streams x {} conn: {:.1} MB/s wall",
                row.staging,
                shape.chunk_len_bytes >> 20,
                shape.streams_count,
                shape.connections_count.unwrap_or(1),
                run.bytes_total as f64 / run.wall_secs.max(1e-9) / 1e6
            );
            row.runs.push(run);
        }
    }
    Ok(rows)
}

fn print_daemon_table(shard: &str, rows: &[DaemonRow]) {
    println!();
    println!(
        "{shard} shard, {} run(s) per row: MB/s = median wall-clock rate around `ferry copy` (min-max); \
         memory = highest peak over the runs in MiB (sampled every 10 ms); cpu = median CPU-seconds per GiB",
        rows.first().map_or(0, |r| r.runs.len())
    );
    println!(
        "{:<7} {:>5} {:>6} {:>4} {:>7} {:>15} | {:>8} {:>8} {:>8} {:>7} | {:>8} {:>8} {:>8} {:>7}",
        "staging",
        "chunk",
        "str/c",
        "conn",
        "MB/s",
        "(min-max)",
        "src anon",
        "src file",
        "src shm",
        "src cpu",
        "tgt anon",
        "tgt file",
        "tgt shm",
        "tgt cpu",
    );
    for row in rows {
        let rates: Vec<f64> = row.runs.iter().map(|r| r.bytes_total as f64 / r.wall_secs.max(1e-9) / 1e6).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let per_gib = |r: &DaemonRun, secs: f64| secs / (r.bytes_total as f64 / GIB).max(1e-9);
        println!(
            "{:<7} {:>4}M {:>6} {:>4} {:>7.1} {:>15} | {:>8.1} {:>8.1} {:>8.1} {:>7.2} | {:>8.1} {:>8.1} {:>8.1} {:>7.2}",
            row.staging,
            row.shape.chunk_len_bytes >> 20,
            row.shape.streams_count,
            row.shape.connections_count.unwrap_or(1),
            row.median_wall_bytes_per_sec() / 1e6,
            format!("({min:.0}-{max:.0})"),
            mib(row.peak(|r| r.source.peak.rss_anon_bytes)),
            mib(row.peak(|r| r.source.peak.rss_file_bytes)),
            mib(row.peak(|r| r.source.peak.rss_shmem_bytes)),
            row.median(|r| per_gib(r, r.source.cpu_secs)),
            mib(row.peak(|r| r.target.peak.rss_anon_bytes)),
            mib(row.peak(|r| r.target.peak.rss_file_bytes)),
            mib(row.peak(|r| r.target.peak.rss_shmem_bytes)),
            row.median(|r| per_gib(r, r.target.cpu_secs)),
        );
    }
}
