//! ferry-bench-e2e: the base-copy benchmark (issues 3 and 20), every contender in one run.
//!
//! What it does: generates one shard (default 1 GiB in 8 files, on tmpfs), then, interleaved
//! over `--rounds` rounds, copies it over loopback with:
//! - the transport's ceilings: raw quinn with ferry's exact endpoint and transport settings and
//!   its default shape, 1 connection x 4 streams (`raw_quinn_ferry`, in one process, and
//!   `raw_quinn_ferry_2proc`, receiver in a child process, each side's CPU measured), raw quinn
//!   with quinn's defaults on one stream (`raw_quinn`, `raw_quinn_2proc`: the old baseline),
//!   rustls over one TCP connection (`tls_tcp`), plain TCP landing on tmpfs (`tcp_tmpfs`);
//! - ferry in this process staging on tmpfs (`ferry_tmpfs`), the same with quinn's MTU bound of
//!   1452 (`ferry_tmpfs_mtu1452`) and with 2 connections (`ferry_tmpfs_2c`), staging on disk
//!   (`ferry_disk`), and `dd conv=fsync` of the same bytes to the same disk (`dd_fsync_disk`);
//! - `scp` (OpenSSH's default cipher, and aes128-gcm) against a throwaway sshd.
//!
//! Then the small-file shard (`--small-files` x `--small-file-size` in `--small-folders`
//! folders), alternating: ferry staging on disk and on tmpfs, and `tar -c | ssh tar -x && sync`
//! to the same disk; files per second. Then `ferry serve` + `ferry copy` as two processes for
//! 1 to `--connections-max` chunk connections (4 streams each), each alternating with raw
//! quinn at ferry's settings and the same connections and streams in two processes; each
//! side's CPU-seconds per GB and peak memory. Last, the goals of issue 20 as same-run ratios.
//! With `--curve`, the throughput against file size curve ([`ferry_bench::curve`]) is
//! measured and written as an SVG into `--out-dir`.
//!
//! What it does not: assert on any figure. It fails only when a copy fails.
//!
//! Run: `cargo build --release -p ferry-engine --bin ferry && cargo run --release -p
//! ferry-bench --bin ferry-bench-e2e -- --shard-size 1GiB`. scp and tar | ssh need `sshd`
//! on the PATH or in /usr/sbin.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ferry_bench::certs::BenchCerts;
use ferry_bench::curve::{self, median};
use ferry_bench::daemons::{self, DaemonRun, DaemonShape};
use ferry_bench::dd::dd_fsync_copy;
use ferry_bench::ferry_copy::{ferry_copy, FerryShape};
use ferry_bench::raw_quinn::{self, raw_quinn_copy, RawSettings, TwoProcessRun};
use ferry_bench::scp::{scp_copy, tar_ssh_copy, Sshd};
use ferry_bench::shard::Shard;
use ferry_bench::tcp::tcp_copy;
use ferry_bench::tls_tcp::tls_tcp_copy;
use ferry_bench::{format_bytes, fs_type, parse_size_bytes, RunResult};

const GB: f64 = 1e9;
/// Streams per connection, `ferry copy`'s default.
const STREAMS_PER_CONNECTION: u32 = 4;

#[derive(Debug, Parser)]
#[command(about = "ferry's base-copy benchmark: ferry against its transport's ceilings, TCP, dd and scp over loopback")]
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
    /// Rounds of the in-process comparison and of the small files; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Small-file shard: this many files ...
    #[arg(long, default_value_t = 2000)]
    small_files: u32,
    /// ... of this size ...
    #[arg(long, default_value = "16KiB")]
    small_file_size: String,
    /// ... in this many folders.
    #[arg(long, default_value_t = 20)]
    small_folders: u32,
    /// Skip the small files.
    #[arg(long)]
    skip_small: bool,
    /// Also run the daemon copy on a shard of this size (e.g. 4GiB) for the peak-memory figure.
    #[arg(long)]
    rss_shard_size: Option<String>,
    /// Rounds of the two-process measurements (each shape runs this many times, interleaved).
    #[arg(long, default_value_t = 3)]
    daemon_rounds: u32,
    /// The two-process runs go from 1 to this many chunk connections.
    #[arg(long, default_value_t = 4)]
    connections_max: u32,
    /// Skip the two-process (daemon) measurements.
    #[arg(long)]
    skip_daemons: bool,
    /// Skip scp and tar | ssh.
    #[arg(long)]
    skip_scp: bool,
    /// Measure the throughput against file size curve (16 KiB to 1 GiB files) and write it as
    /// `throughput-vs-file-size.svg` into --out-dir.
    #[arg(long)]
    curve: bool,
    /// Rounds per curve point.
    #[arg(long, default_value_t = 3)]
    curve_rounds: u32,
    /// Where the curve's SVG goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Also write every measurement as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these in-process contenders (comma-separated, e.g. `raw_quinn_ferry,ferry_tmpfs`;
    /// default: all), for profiling one of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// The contenders of the in-process comparison, in the order each round runs them.
const RAW_QUINN: &str = "raw_quinn";
const RAW_QUINN_FERRY: &str = "raw_quinn_ferry";
const RAW_QUINN_2P: &str = "raw_quinn_2proc";
const RAW_QUINN_FERRY_2P: &str = "raw_quinn_ferry_2proc";
const FERRY_TMPFS: &str = "ferry_tmpfs";
const FERRY_TMPFS_2C: &str = "ferry_tmpfs_2c";
/// ferry with quinn's default MTU bound (1452) instead of its own, to show what that bound gives.
const FERRY_TMPFS_1452: &str = "ferry_tmpfs_mtu1452";
const FERRY_DISK: &str = "ferry_disk";
const DD_FSYNC: &str = "dd_fsync_disk";
const TLS_TCP: &str = "tls_tcp";
const TCP_TMPFS: &str = "tcp_tmpfs";
const SCP_DEFAULT: &str = "scp";
const SCP_AES: &str = "scp_aes128gcm";
/// The small-file contenders.
const SMALL_FERRY_DISK: &str = "small_ferry_disk";
const SMALL_FERRY_TMPFS: &str = "small_ferry_tmpfs";
const SMALL_TAR_SSH: &str = "small_tar_ssh_disk";

/// The hidden first argument that makes this binary the raw quinn receiver of the
/// two-process baselines: `ferry-bench-e2e __raw-quinn-receiver <certs dir> <settings>`.
const RAW_QUINN_RECEIVER_MODE: &str = "__raw-quinn-receiver";

/// Every timed run of each contender, in first-run order.
#[derive(Debug, Default)]
struct Runs(Vec<(&'static str, Vec<RunResult>)>);

impl Runs {
    fn record(&mut self, name: &'static str, run: RunResult) {
        println!("  {name:<22} {:>8.1} MB/s  ({:.3} s)", run.bytes_per_sec() / 1e6, run.elapsed.as_secs_f64());
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(run),
            None => self.0.push((name, vec![run])),
        }
    }

    fn median_rate(&self, name: &str) -> Option<f64> {
        let (_, list) = self.0.iter().find(|(n, _)| *n == name)?;
        Some(median(&list.iter().map(RunResult::bytes_per_sec).collect::<Vec<_>>()))
    }

    fn median_secs(&self, name: &str) -> Option<f64> {
        let (_, list) = self.0.iter().find(|(n, _)| *n == name)?;
        Some(median(&list.iter().map(|r| r.elapsed.as_secs_f64()).collect::<Vec<_>>()))
    }
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).is_some_and(|a| a == RAW_QUINN_RECEIVER_MODE) {
        let certs_dir = argv.get(2).context("usage: ferry-bench-e2e __raw-quinn-receiver <certs dir> <settings>")?;
        let settings = RawSettings::from_arg(argv.get(3).map_or("quinn", String::as_str))?;
        return raw_quinn::run_receiver(Path::new(certs_dir), settings);
    }
    let args = Args::parse();
    let shard_size = parse_size_bytes(&args.shard_size)?;
    let disk_dir = args.disk_dir.clone().unwrap_or_else(std::env::temp_dir);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# ferry base-copy bench (issues 3 and 20)");
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
    let sshd = start_sshd(args.skip_scp);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bench").build()?;
    let exe = std::env::current_exe()?;

    let mut runs = Runs::default();
    // CPU-seconds per GB of the two-process raw quinn at ferry's settings: (sender, receiver).
    let mut raw_cpu_per_gb: Vec<(f64, f64)> = Vec::new();
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    for round in 0..args.rounds {
        println!("round {}/{}", round + 1, args.rounds);
        let bytes = shard.size_bytes;
        if wanted(RAW_QUINN_FERRY) {
            runs.record(RAW_QUINN_FERRY, runtime.block_on(raw_quinn_copy(&certs, bytes, RawSettings::FERRY_DEFAULT))?);
        }
        if wanted(FERRY_TMPFS) {
            let id = format!("bench-tmpfs-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, FerryShape::default()))?;
            runs.record(FERRY_TMPFS, copied.0);
        }
        if wanted(TLS_TCP) {
            runs.record(TLS_TCP, tls_tcp_copy(&certs, bytes)?);
        }
        if wanted(RAW_QUINN_FERRY_2P) {
            let two = raw_quinn::two_process(
                &exe,
                RAW_QUINN_RECEIVER_MODE,
                &runtime,
                &certs,
                bytes,
                RawSettings::FERRY_DEFAULT,
            )?;
            let gb = bytes as f64 / GB;
            println!(
                "  ({RAW_QUINN_FERRY_2P} CPU-s/GB: sender {:.2}, receiver {:.2})",
                two.sender_cpu_secs / gb,
                two.receiver_cpu_secs / gb
            );
            raw_cpu_per_gb.push((two.sender_cpu_secs / gb, two.receiver_cpu_secs / gb));
            runs.record(RAW_QUINN_FERRY_2P, two.run);
        }
        if wanted(RAW_QUINN) {
            runs.record(RAW_QUINN, runtime.block_on(raw_quinn_copy(&certs, bytes, RawSettings::QuinnDefault))?);
        }
        if wanted(RAW_QUINN_2P) {
            let two = raw_quinn::two_process(
                &exe,
                RAW_QUINN_RECEIVER_MODE,
                &runtime,
                &certs,
                bytes,
                RawSettings::QuinnDefault,
            )?;
            runs.record(RAW_QUINN_2P, two.run);
        }
        if wanted(FERRY_TMPFS_1452) {
            let id = format!("bench-tmpfs1452-{round}");
            let shape = FerryShape { mtu_upper_bound_bytes: 1452, ..FerryShape::default() };
            runs.record(FERRY_TMPFS_1452, runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, shape))?.0);
        }
        if wanted(FERRY_TMPFS_2C) {
            let id = format!("bench-tmpfs2c-{round}");
            let two = FerryShape { streams_count: 2, connections_count: 2, ..FerryShape::default() };
            runs.record(FERRY_TMPFS_2C, runtime.block_on(ferry_copy(&certs, &shard, &args.tmpfs_dir, &id, two))?.0);
        }
        if wanted(FERRY_DISK) {
            let id = format!("bench-disk-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &shard, &disk_dir, &id, FerryShape::default()))?;
            runs.record(FERRY_DISK, copied.0);
        }
        if wanted(DD_FSYNC) {
            runs.record(DD_FSYNC, with_target_dir(&disk_dir, |dir| dd_fsync_copy(&shard, dir))?);
        }
        if wanted(TCP_TMPFS) {
            runs.record(TCP_TMPFS, with_target_dir(&args.tmpfs_dir, |dir| tcp_copy(&shard, dir))?);
        }
        if let Some(sshd) = &sshd {
            if wanted(SCP_DEFAULT) {
                runs.record(SCP_DEFAULT, with_target_dir(&args.tmpfs_dir, |dir| scp_copy(sshd, &shard, dir, None))?);
            }
            if wanted(SCP_AES) {
                let aes = Some("aes128-gcm@openssh.com");
                runs.record(SCP_AES, with_target_dir(&args.tmpfs_dir, |dir| scp_copy(sshd, &shard, dir, aes))?);
            }
        }
    }
    println!("load average after the rounds: {}", loadavg());
    print_throughput(&runs, &shard, args.rounds);

    let small_files = if args.skip_small {
        None
    } else {
        let file_bytes = parse_size_bytes(&args.small_file_size)?;
        let small = Shard::generate_tree(&args.shard_dir, args.small_files, file_bytes, args.small_folders, 0x5a11)?;
        println!();
        println!(
            "## small files: {} x {} in {} folders, {} alternating rounds",
            args.small_files,
            format_bytes(file_bytes),
            args.small_folders,
            args.rounds
        );
        for round in 0..args.rounds {
            println!("round {}/{}", round + 1, args.rounds);
            let id = format!("bench-small-disk-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &small, &disk_dir, &id, FerryShape::default()))?;
            runs.record(SMALL_FERRY_DISK, copied.0);
            if let Some(sshd) = &sshd {
                runs.record(SMALL_TAR_SSH, with_target_dir(&disk_dir, |dir| tar_ssh_copy(sshd, &small, dir))?);
            }
            let id = format!("bench-small-tmpfs-{round}");
            let copied = runtime.block_on(ferry_copy(&certs, &small, &args.tmpfs_dir, &id, FerryShape::default()))?;
            runs.record(SMALL_FERRY_TMPFS, copied.0);
        }
        let files = f64::from(args.small_files);
        println!("{:<22} {:>12} {:>10}", "variant", "files/s", "median s");
        for name in [SMALL_FERRY_DISK, SMALL_FERRY_TMPFS, SMALL_TAR_SSH] {
            if let Some(secs) = runs.median_secs(name) {
                println!("{name:<22} {:>12.0} {secs:>10.3}", files / secs.max(1e-9));
            }
        }
        println!("load average after the small files: {}", loadavg());
        Some(files)
    };
    drop(sshd);

    let mut sweep = Vec::new();
    let mut daemon_rows: Vec<DaemonRow> = Vec::new();
    if !args.skip_daemons {
        let bin = daemons::ferry_bin()?;
        anyhow::ensure!(daemons::copy_has_connections_flag(&bin), "{} has no `copy --connections`", bin.display());
        println!();
        println!("## two processes: `ferry serve` (target) + `ferry copy` (source), {}", bin.display());
        println!(
            "1 to {} chunk connections x {STREAMS_PER_CONNECTION} streams, each after raw quinn at ferry's settings with the same connections and streams (receiver in a child process)",
            args.connections_max
        );
        sweep = run_sweep(&bin, &exe, &runtime, &certs, &shard, &args.tmpfs_dir, &args)?;
        print_sweep(&sweep);
        daemon_rows.extend(sweep.iter().map(|s| s.ferry.clone()));
        let disk_shape = DaemonShape {
            chunk_len_bytes: ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES,
            streams_count: STREAMS_PER_CONNECTION,
            connections_count: Some(1),
        };
        let disk_run = daemons::daemon_copy(&bin, &certs, &shard, &disk_dir, "bench-d-disk", disk_shape)?;
        let disk_row = DaemonRow { staging: "disk", shape: disk_shape, runs: vec![disk_run] };
        print_daemon_table(&format_bytes(shard.size_bytes), std::slice::from_ref(&disk_row));
        daemon_rows.push(disk_row);
        println!("load average after the daemon runs: {}", loadavg());

        if let Some(size) = &args.rss_shard_size {
            let size = parse_size_bytes(size)?;
            println!();
            println!("## peak memory on a {} shard (two processes, tmpfs staging)", format_bytes(size));
            let big = Shard::generate(&args.shard_dir, size, args.files, 0xb16)?;
            let shape = DaemonShape {
                chunk_len_bytes: ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES,
                streams_count: STREAMS_PER_CONNECTION,
                connections_count: Some(1),
            };
            let run = daemons::daemon_copy(&bin, &certs, &big, &args.tmpfs_dir, "bench-big", shape)?;
            let row = DaemonRow { staging: "tmpfs", shape, runs: vec![run] };
            print_daemon_table(&format_bytes(size), std::slice::from_ref(&row));
            daemon_rows.push(row);
        }
    }
    drop(shard);

    let goals = print_goals(&runs, &raw_cpu_per_gb, &sweep, &daemon_rows, small_files);

    let mut curve_points = Vec::new();
    if args.curve {
        println!();
        println!("## throughput against file size (tmpfs staging, {} alternating rounds per point)", args.curve_rounds);
        curve_points = curve::run_curve(
            &runtime,
            &certs,
            &args.shard_dir,
            &args.tmpfs_dir,
            &curve::CURVE_FILE_SIZES_BYTES,
            args.curve_rounds,
        )?;
        curve::print_table(&curve_points);
        std::fs::create_dir_all(&args.out_dir)?;
        let path = args.out_dir.join("throughput-vs-file-size.svg");
        let title = format!(
            "ferry base copy against file size, same-run ceilings ({cores} cores, load {} at the end)",
            loadavg()
        );
        std::fs::write(&path, curve::svg(&curve_points, &title))?;
        println!("wrote {}", path.display());
        println!("load average after the curve: {}", loadavg());
    }
    drop(runtime);

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "shard_size_bytes": shard_size,
            "files": args.files,
            "rounds": args.rounds,
            "in_process": runs.0.iter().map(|(name, list)| serde_json::json!({
                "variant": name,
                "bytes_per_sec": list.iter().map(RunResult::bytes_per_sec).collect::<Vec<_>>(),
                "secs": list.iter().map(|r| r.elapsed.as_secs_f64()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "raw_quinn_ferry_2proc_cpu_secs_per_gb": raw_cpu_per_gb,
            "goals": goals.iter().map(|(l, r, g)| serde_json::json!({"measure": l, "value": r, "goal": g})).collect::<Vec<_>>(),
            "daemons": daemon_rows.iter().map(|row| serde_json::json!({"staging": row.staging, "runs": row.runs})).collect::<Vec<_>>(),
            "raw_quinn_2proc_by_connections": sweep.iter().map(|s| serde_json::json!({
                "connections": s.connections_count,
                "bytes_per_sec": s.raw.iter().map(|r| r.run.bytes_per_sec()).collect::<Vec<_>>(),
                "sender_cpu_secs": s.raw.iter().map(|r| r.sender_cpu_secs).collect::<Vec<_>>(),
                "receiver_cpu_secs": s.raw.iter().map(|r| r.receiver_cpu_secs).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "curve": curve::to_json(&curve_points),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn start_sshd(skip: bool) -> Option<Sshd> {
    if skip {
        println!("scp, tar | ssh: skipped (--skip-scp)");
        return None;
    }
    match Sshd::start() {
        Ok(sshd) => {
            println!("scp, tar | ssh: throwaway sshd on 127.0.0.1:{}", sshd.port);
            Some(sshd)
        }
        Err(e) => {
            println!("!!!!! SCP AND TAR | SSH COLUMNS SKIPPED: cannot start an OpenSSH server on 127.0.0.1: {e:#}");
            None
        }
    }
}

fn print_throughput(runs: &Runs, shard: &Shard, rounds: u32) {
    println!();
    println!(
        "## throughput: {} shard, median of {rounds} rounds (*_2proc: receiver in a child process; the rest: both sides in this process)",
        format_bytes(shard.size_bytes)
    );
    println!("{:<22} {:>12} {:>12} {:>12}", "variant", "median MB/s", "min MB/s", "max MB/s");
    for (name, list) in &runs.0 {
        let rates: Vec<f64> = list.iter().map(RunResult::bytes_per_sec).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        println!("{name:<22} {:>12.1} {:>12.1} {:>12.1}", median(&rates) / 1e6, min / 1e6, max / 1e6);
    }
    println!();
    println!("ratios (medians):");
    for (top, bottom) in [
        (FERRY_TMPFS, RAW_QUINN_FERRY),
        (FERRY_TMPFS, TLS_TCP),
        (RAW_QUINN_FERRY, RAW_QUINN),
        (RAW_QUINN_FERRY_2P, RAW_QUINN_FERRY),
        (FERRY_TMPFS, RAW_QUINN),
        (FERRY_TMPFS_1452, RAW_QUINN),
        (FERRY_TMPFS_2C, RAW_QUINN_FERRY),
        (FERRY_DISK, DD_FSYNC),
        (FERRY_DISK, FERRY_TMPFS),
        (FERRY_TMPFS, SCP_DEFAULT),
        (FERRY_TMPFS, SCP_AES),
        (FERRY_TMPFS, TCP_TMPFS),
    ] {
        let label = format!("{top}/{bottom}");
        match (runs.median_rate(top), runs.median_rate(bottom)) {
            (Some(t), Some(b)) if b > 0.0 => println!("  {label:<36} {:>6.3}", t / b),
            _ => println!("  {label:<36}    n/a   (not measured)"),
        }
    }
}

/// One connection count of the two-process sweep.
#[derive(Debug)]
struct SweepPoint {
    connections_count: u32,
    raw: Vec<TwoProcessRun>,
    ferry: DaemonRow,
}

/// For 1 to `--connections-max` connections, alternating per round: raw quinn at ferry's
/// settings in two processes, then `ferry serve` + `ferry copy` on tmpfs.
fn run_sweep(
    bin: &Path,
    exe: &Path,
    runtime: &tokio::runtime::Runtime,
    certs: &BenchCerts,
    shard: &Shard,
    tmpfs_dir: &Path,
    args: &Args,
) -> anyhow::Result<Vec<SweepPoint>> {
    let chunk_len_bytes = ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES;
    let mut points: Vec<SweepPoint> = (1..=args.connections_max.max(1))
        .map(|k| SweepPoint {
            connections_count: k,
            raw: Vec::new(),
            ferry: DaemonRow {
                staging: "tmpfs",
                shape: DaemonShape {
                    chunk_len_bytes,
                    streams_count: STREAMS_PER_CONNECTION,
                    connections_count: Some(k),
                },
                runs: Vec::new(),
            },
        })
        .collect();
    let gb = shard.size_bytes as f64 / GB;
    for round in 0..args.daemon_rounds.max(1) {
        for point in &mut points {
            let k = point.connections_count;
            let settings = RawSettings::Ferry { connections_count: k, streams_count: STREAMS_PER_CONNECTION };
            let raw = raw_quinn::two_process(exe, RAW_QUINN_RECEIVER_MODE, runtime, certs, shard.size_bytes, settings)?;
            let id = format!("bench-d-{round}-{k}");
            let run = daemons::daemon_copy(bin, certs, shard, tmpfs_dir, &id, point.ferry.shape)?;
            println!(
                "  {k} conn: raw quinn {:.1} MB/s ({:.2} + {:.2} CPU-s/GB), ferry {:.1} MB/s wall ({:.2} + {:.2} CPU-s/GB)",
                raw.run.bytes_per_sec() / 1e6,
                raw.sender_cpu_secs / gb,
                raw.receiver_cpu_secs / gb,
                run.bytes_total as f64 / run.wall_secs.max(1e-9) / 1e6,
                run.source.cpu_secs / gb,
                run.target.cpu_secs / gb
            );
            point.raw.push(raw);
            point.ferry.runs.push(run);
        }
    }
    Ok(points)
}

fn print_sweep(points: &[SweepPoint]) {
    println!();
    println!(
        "connections: medians; MB/s of ferry = wall clock around `ferry copy`; CPU-s/GB per side (source|sender + target|receiver)"
    );
    println!(
        "{:>5} {:>10} {:>10} {:>7} | {:>8} {:>8} | {:>8} {:>8} | {:>8}",
        "conns", "rawq MB/s", "ferry MB/s", "ratio", "rawq snd", "rawq rcv", "fer src", "fer tgt", "added"
    );
    for p in points {
        let raw_rate = median(&p.raw.iter().map(|r| r.run.bytes_per_sec()).collect::<Vec<_>>());
        let ferry_rate = p.ferry.median_wall_bytes_per_sec();
        let (snd, rcv) = p.raw_cpu_per_gb();
        let (src, tgt) = p.ferry_cpu_per_gb();
        println!(
            "{:>5} {:>10.1} {:>10.1} {:>7.3} | {snd:>8.2} {rcv:>8.2} | {src:>8.2} {tgt:>8.2} | {:>8.2}",
            p.connections_count,
            raw_rate / 1e6,
            ferry_rate / 1e6,
            ferry_rate / raw_rate.max(1e-9),
            (src + tgt) - (snd + rcv)
        );
    }
    let rows: Vec<DaemonRow> = points.iter().map(|p| p.ferry.clone()).collect();
    let bytes = points.first().and_then(|p| p.ferry.runs.first()).map_or(0, |r| r.bytes_total);
    print_daemon_table(&format_bytes(bytes), &rows);
}

impl SweepPoint {
    fn raw_cpu_per_gb(&self) -> (f64, f64) {
        let gb = |r: &TwoProcessRun| r.run.bytes_total as f64 / GB;
        (
            median(&self.raw.iter().map(|r| r.sender_cpu_secs / gb(r)).collect::<Vec<_>>()),
            median(&self.raw.iter().map(|r| r.receiver_cpu_secs / gb(r)).collect::<Vec<_>>()),
        )
    }

    fn ferry_cpu_per_gb(&self) -> (f64, f64) {
        let gb = |r: &DaemonRun| r.bytes_total as f64 / GB;
        (self.ferry.median(|r| r.source.cpu_secs / gb(r)), self.ferry.median(|r| r.target.cpu_secs / gb(r)))
    }
}

/// Prints the goals of issue 20 as same-run ratios and returns them as `(measure, value, goal)`.
fn print_goals(
    runs: &Runs,
    raw_cpu_per_gb: &[(f64, f64)],
    sweep: &[SweepPoint],
    daemon_rows: &[DaemonRow],
    small_files: Option<f64>,
) -> Vec<(String, f64, String)> {
    let mut goals = Vec::new();
    let ratio = |top: Option<f64>, bottom: Option<f64>| match (top, bottom) {
        (Some(t), Some(b)) if b > 0.0 => Some(t / b),
        _ => None,
    };
    goals.push((
        "ferry_tmpfs / raw_quinn_ferry (in-process, same MTU, conns, streams)",
        ratio(runs.median_rate(FERRY_TMPFS), runs.median_rate(RAW_QUINN_FERRY)),
        ">= 0.9",
    ));
    let one = sweep.iter().find(|p| p.connections_count == 1);
    goals.push((
        "ferry two processes / raw_quinn_ferry_2proc (1 conn x 4 streams, wall clock)",
        one.and_then(|p| {
            let raw = median(&p.raw.iter().map(|r| r.run.bytes_per_sec()).collect::<Vec<_>>());
            ratio(Some(p.ferry.median_wall_bytes_per_sec()), Some(raw))
        }),
        ">= 0.9",
    ));
    goals.push((
        "CPU-s per GB ferry adds over raw quinn, both sides (two processes, 1 conn)",
        one.map(|p| {
            let (snd, rcv) = p.raw_cpu_per_gb();
            let (src, tgt) = p.ferry_cpu_per_gb();
            (src + tgt) - (snd + rcv)
        }),
        "<= 0.5",
    ));
    goals.push(("ferry_tmpfs / tls_tcp", ratio(runs.median_rate(FERRY_TMPFS), runs.median_rate(TLS_TCP)), ">= 1.2"));
    let disk_bound = match (runs.median_rate(DD_FSYNC), runs.median_rate(FERRY_TMPFS)) {
        (Some(d), Some(t)) => Some(d.min(t)),
        (d, t) => d.or(t),
    };
    goals.push((
        "ferry_disk / min(dd_fsync_disk, ferry_tmpfs)",
        ratio(runs.median_rate(FERRY_DISK), disk_bound),
        ">= 0.9",
    ));
    goals.push((
        "small files to disk: ferry files/s / tar | ssh && sync files/s",
        small_files.and(ratio(runs.median_secs(SMALL_TAR_SSH), runs.median_secs(SMALL_FERRY_DISK))),
        ">= 1.0",
    ));
    let peak_anon = daemon_rows
        .iter()
        .flat_map(|row| row.runs.iter())
        .map(|r| r.source.peak.rss_anon_bytes.max(r.target.peak.rss_anon_bytes))
        .max();
    goals.push(("peak RssAnon of either daemon, MiB", peak_anon.map(mib), "<= 256"));
    println!();
    println!("## issue 20 goals (same-run medians; on a shared machine read them with the load average)");
    println!("load average: {}", loadavg());
    for (label, value, goal) in &goals {
        match value {
            Some(v) => println!("  {label:<80} {v:>8.3}   (goal {goal})"),
            None => println!("  {label:<80}      n/a   (not measured)"),
        }
    }
    if !raw_cpu_per_gb.is_empty() {
        let snd = median(&raw_cpu_per_gb.iter().map(|c| c.0).collect::<Vec<_>>());
        let rcv = median(&raw_cpu_per_gb.iter().map(|c| c.1).collect::<Vec<_>>());
        println!("  (the in-process rounds' {RAW_QUINN_FERRY_2P}: sender {snd:.2}, receiver {rcv:.2} CPU-s/GB)");
    }
    goals.into_iter().filter_map(|(l, v, g)| v.map(|v| (l.to_string(), v, g.to_string()))).collect()
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
#[derive(Debug, Clone)]
struct DaemonRow {
    staging: &'static str,
    shape: DaemonShape,
    runs: Vec<DaemonRun>,
}

impl DaemonRow {
    fn median(&self, f: impl Fn(&DaemonRun) -> f64) -> f64 {
        median(&self.runs.iter().map(f).collect::<Vec<_>>())
    }

    fn median_wall_bytes_per_sec(&self) -> f64 {
        self.median(|r| r.bytes_total as f64 / r.wall_secs.max(1e-9))
    }

    fn peak(&self, f: impl Fn(&DaemonRun) -> u64) -> u64 {
        self.runs.iter().map(f).max().unwrap_or(0)
    }
}

fn print_daemon_table(shard: &str, rows: &[DaemonRow]) {
    println!();
    println!(
        "{shard} shard, {} run(s) per row: MB/s = median wall-clock rate around `ferry copy` (min-max); \
         memory = highest peak over the runs in MiB (sampled every 10 ms); cpu = median CPU-seconds per GB",
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
        let per_gb = |r: &DaemonRun, secs: f64| secs / (r.bytes_total as f64 / GB).max(1e-9);
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
            row.median(|r| per_gb(r, r.source.cpu_secs)),
            mib(row.peak(|r| r.target.peak.rss_anon_bytes)),
            mib(row.peak(|r| r.target.peak.rss_file_bytes)),
            mib(row.peak(|r| r.target.peak.rss_shmem_bytes)),
            row.median(|r| per_gb(r, r.target.cpu_secs)),
        );
    }
}
