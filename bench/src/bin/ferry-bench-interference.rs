//! ferry-bench-interference: what a migration costs the database's own writes (issue 21).
//!
//! The reference writer runs in a process of its own at `--write-rate` writes/s, pinned with
//! the source daemon (`ferry serve`) to `--source-core`; the target daemon runs pinned to
//! `--target-core` and stages on tmpfs (/dev/shm), so its disk writes do not share the
//! writer's disk. This process (the coordinator) pins itself to the target's core. Each round,
//! for each `--variants` entry (daemons restarted with that variant's settings):
//! 1. the writer paused (idle): a live migration's base copy, timed: the unthrottled copy;
//! 2. the writer running: `--baseline-ms` with no migration, then a live migration: its base
//!    copy, `--catch-up-ms` of WAL catch-up, the reference cut-over (pause, fence, flip the
//!    vShard's writes to the target node's WAL, release), and `--after-ms` after the release.
//!
//! It reports the writer's ack latency (from each write's due time to its group's flush) p50,
//! p99, p99.9 and the longest gap between acks for each window (no migration, base copy,
//! catch-up, after release), the copy's throughput as it ran and unthrottled, and each
//! process's CPU share per window; medians over `--rounds`, and ratios against the same
//! round's no-migration window and unthrottled copy.
//!
//! Disk contention, separately: `--target-staging disk` stages on the writer's disk (the
//! work folder), so the target's writes and syncs share it with the writer's WAL flushes;
//! `--cold-source` drops the shard from the page cache before each copy, so the source's
//! reads come from that disk too (and the bulk I/O priority has I/O to act on). By default
//! the target stages on tmpfs and the shard sits in the page cache after the first round.
//!
//! What it does not: assert. The machine's other load shows in the load average printed.
//!
//! Run: `cargo build --release -p ferry-engine --bin ferry -p ferry-bench --bin ferry-bench-interference &&
//! target/release/ferry-bench-interference --rounds 3`
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_bench::certs::{BenchCerts, SOURCE_NODE, TARGET_NODE};
use ferry_bench::daemons::{ferry_bin, wait_listening};
use ferry_bench::interference::{pin_command, pin_self, run_writer_child, window, Ack, WindowStats, WriterChild};
use ferry_bench::procstat;
use ferry_bench::shard::Shard;
use ferry_engine::cli::coordinator::{cut_over, CutOverOptions, WriteControl};
use ferry_engine::control::ControlClient;
use ferry_wire::api::{Phase, StartParams};
use ferry_wire::MigrationId;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "ferry's interference benchmark (issue 21): the writer's ack latency while a migration runs")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// The reference writer's rate (one write in four to the migrating vShard).
    #[arg(long, default_value_t = 20_000)]
    write_rate: u64,
    /// Rounds; each runs every variant once (medians are over rounds).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The shard's size (incompressible files), e.g. 2GiB.
    #[arg(long, default_value = "2GiB")]
    shard_size: String,
    #[arg(long, default_value_t = 8)]
    files: u32,
    /// The writer alone before the migration (the no-migration window).
    #[arg(long, default_value_t = 3000)]
    baseline_ms: u64,
    /// WAL catch-up measured after the base copy, before the cut-over.
    #[arg(long, default_value_t = 3000)]
    catch_up_ms: u64,
    /// Measured after the release.
    #[arg(long, default_value_t = 3000)]
    after_ms: u64,
    /// The writer's and the source daemon's core.
    #[arg(long, default_value_t = 0)]
    source_core: usize,
    /// The target daemon's (and this coordinator's) core.
    #[arg(long, default_value_t = 1)]
    target_core: usize,
    /// Daemon settings to compare, comma-separated: `default` (the daemon's defaults), or one
    /// of the names `--list-variants` prints.
    #[arg(long, default_value = "default")]
    variants: String,
    /// Print the variants and the settings each gives the source daemon, and exit.
    #[arg(long)]
    list_variants: bool,
    /// The copy's rate limit in bytes/s (0: unlimited), for every variant.
    #[arg(long, default_value_t = 0)]
    rate_limit: u64,
    /// The copy's read mode.
    #[arg(long, default_value = "mmap")]
    read_mode: String,
    /// Where the shard and the writer's WAL go (a disk folder); default: the temp dir.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where the target daemon stages: `tmpfs` (/dev/shm, the default: its writes do not share
    /// the writer's disk, as on two hosts) or `disk` (the work folder: the writer's WAL flushes
    /// and the target's staging share one disk, the disk contention of one host).
    #[arg(long, default_value = "tmpfs", value_parser = ["tmpfs", "disk"])]
    target_staging: String,
    /// Drop the shard's files from the page cache before each copy, so the source reads them
    /// from the disk the writer flushes to (where the bulk I/O priority can act); by default the
    /// shard sits in the page cache after the first round and mmap reads do no I/O.
    #[arg(long)]
    cold_source: bool,
    /// Raw figures as JSON.
    #[arg(long, default_value = "target/bench-interference/runs.json")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Internal: the reference writer process (driven on stdin).
    #[command(hide = true)]
    Writer {
        #[arg(long)]
        wal_dir: PathBuf,
        #[arg(long)]
        rate: u64,
    },
}

/// Each variant's extra lines in the source daemon's config file (the target keeps the
/// defaults: it runs on its own core).
const VARIANTS: &[(&str, &str)] = &[
    ("default", ""),
    // Every bulk mechanism off: the daemon before issue 21.
    ("off", "bulk_threads = 0\nbulk_cpu_priority = \"normal\"\nbulk_io_priority = \"normal\""),
    ("cpu-normal", "bulk_cpu_priority = \"normal\""),
    ("cpu-batch", "bulk_cpu_priority = \"batch\""),
    ("io-normal", "bulk_io_priority = \"normal\""),
    ("threads-off", "bulk_threads = 0"),
    // Pacing: the daemon's token bucket (one chunk of burst per stream), at about 0.75 and
    // 0.5 of this machine's unthrottled copy.
    ("paced-400", "rate_limit_bytes_per_sec = 400000000"),
    ("paced-250", "rate_limit_bytes_per_sec = 250000000"),
    ("off-paced-250", "bulk_threads = 0\nbulk_cpu_priority = \"normal\"\nbulk_io_priority = \"normal\"\nrate_limit_bytes_per_sec = 250000000"),
];

fn variant_config(name: &str) -> anyhow::Result<&'static str> {
    VARIANTS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c).with_context(|| {
        format!("no variant {name:?}: {}", VARIANTS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
    })
}

/// CPU ticks of the three processes at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Ticks {
    at: Option<Instant>,
    writer: u64,
    source: u64,
    target: u64,
}

fn ticks(pids: [u32; 3]) -> Ticks {
    let read = |pid| procstat::read_cpu_ticks(pid).map(|(_, t)| t).unwrap_or(0);
    Ticks { at: Some(Instant::now()), writer: read(pids[0]), source: read(pids[1]), target: read(pids[2]) }
}

/// Each process's CPU share (1.0: one core) between two readings.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct CpuShare {
    writer: f64,
    source: f64,
    target: f64,
}

fn cpu_between(a: Ticks, b: Ticks) -> CpuShare {
    let secs = match (a.at, b.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
        _ => 1.0,
    };
    let share = |x: u64, y: u64| procstat::ticks_to_secs(y.saturating_sub(x)) / secs;
    CpuShare { writer: share(a.writer, b.writer), source: share(a.source, b.source), target: share(a.target, b.target) }
}

/// One round of one variant.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Round {
    variant: String,
    round: u32,
    idle_copy_bytes_per_sec: f64,
    copy_bytes_per_sec: f64,
    /// Windows: none, copy, catch_up, after.
    windows: [WindowStats; 4],
    cpu: [CpuShare; 4],
    idle_copy_cpu: CpuShare,
    pause_us: u64,
    load_average: String,
}

const WINDOWS: [&str; 4] = ["no migration", "base copy", "catch-up", "after release"];

/// A `ferry serve` child, killed when dropped.
struct Daemon {
    child: std::process::Child,
    pid: u32,
    addr: std::net::SocketAddr,
    socket: PathBuf,
    _data: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(
    bin: &Path,
    certs: &BenchCerts,
    node: &str,
    peer: &str,
    parent: &Path,
    core: usize,
    extra: &str,
) -> anyhow::Result<Daemon> {
    let data = tempfile::Builder::new().prefix(&format!("ferry-bench-interference-{node}-")).tempdir_in(parent)?;
    let config = data.path().join("node.toml");
    let text = format!(
        "node_id = {node:?}\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\nallowed_peers = [{peer:?}]\nprogress_interval_ms = 0\nmax_held_wal_bytes = {}\n{extra}\n",
        data.path().join("data").display().to_string(),
        certs.path().display().to_string(),
        8u64 << 30,
    );
    std::fs::write(&config, text)?;
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    pin_command(&mut command, core);
    let mut child = command.spawn().with_context(|| format!("cannot start {} serve", bin.display()))?;
    let pid = child.id();
    let (addr, lines) = wait_listening(&mut child)?;
    let socket_line = lines.recv_timeout(Duration::from_secs(5)).context("no control socket line")?;
    let socket = PathBuf::from(socket_line.strip_prefix("control socket at ").context("odd socket line")?.trim());
    Ok(Daemon { child, pid, addr, socket, _data: data })
}

fn start_params(
    args: &Args,
    id: &MigrationId,
    root: &Path,
    wal: &Path,
    base_lsn: u64,
    target: &Daemon,
) -> anyhow::Result<StartParams> {
    Ok(serde_json::from_value(json!({
        "migration_id": id.as_str(), "vshard_id": ferry_bench::interference::VSHARD.0,
        "segments_root": root, "wal_dir": wal, "base_lsn": base_lsn,
        "target_address": target.addr.to_string(), "target_node_id": TARGET_NODE,
        "rate_limit_bytes_per_sec": args.rate_limit, "read_mode": args.read_mode,
    }))?)
}

/// Polls until the migration leaves BaseCopy; returns when it did.
async fn wait_base_copied(client: &mut ControlClient, id: &MigrationId) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = client.status(id).await?;
        match status.phase {
            Phase::WalCatchUp => return Ok(Instant::now()),
            Phase::Failed => anyhow::bail!("{id} failed: {:?}", status.reason),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "{id} did not finish its base copy in 10 minutes");
        // Often enough to time a copy of seconds to 1%, rarely enough to cost the source little.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn monotonic_ns() -> u64 {
    ferry_refnode::monotonic_ns()
}

async fn run_round(
    args: &Args,
    bin: &Path,
    certs: &BenchCerts,
    shard: &Shard,
    work: &Path,
    variant: &str,
    round: u32,
) -> anyhow::Result<Round> {
    let exe = std::env::current_exe()?;
    let extra = variant_config(variant)?;
    let staging_parent = if args.target_staging == "disk" { work } else { Path::new("/dev/shm") };
    let target = start_daemon(bin, certs, TARGET_NODE, SOURCE_NODE, staging_parent, args.target_core, "")?;
    let source = start_daemon(bin, certs, SOURCE_NODE, TARGET_NODE, work, args.source_core, extra)?;
    let wal = tempfile::Builder::new().prefix("ferry-bench-interference-wal-").tempdir_in(work)?;
    let wal_dir = wal.path().join("wal");
    let mut writer = WriterChild::start(&exe, &wal_dir, args.write_rate, Some(args.source_core))?;
    writer.target_node_wal = Some(target._data.path().join("data/node-wal"));
    let pids = [writer.pid, source.pid, target.pid];
    let mut client = ControlClient::connect(&source.socket).await?;
    let mut target_client = ControlClient::connect(&target.socket).await?;
    let mut out = Round { variant: variant.to_owned(), round, load_average: load_average(), ..Round::default() };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. The unthrottled copy: the writer parked (idle), the WAL tailed but quiet.
    {
        writer.pause()?;
        let id = MigrationId::new(format!("idle-{variant}-{round}"))?;
        let params = start_params(args, &id, &shard.root, &wal_dir, writer.acked_lsn()?, &target)?;
        if args.cold_source {
            shard.evict_from_page_cache()?;
        }
        let before = ticks(pids);
        let started = Instant::now();
        client.start(&params).await?;
        let done = wait_base_copied(&mut client, &id).await?;
        out.idle_copy_cpu = cpu_between(before, ticks(pids));
        out.idle_copy_bytes_per_sec = shard.size_bytes as f64 / done.duration_since(started).as_secs_f64();
        client.abort(&id, Some("bench: the unthrottled copy is only timed")).await?;
        client.forget(&id).await?;
        let _ = target_client.forget(&id).await;
        writer.resume_on_source()?;
    }

    // 2. The writer alone, then a live migration through its cut-over.
    let mut stamps = [0u64; 5];
    let mut tick = [Ticks::default(); 5];
    if args.cold_source {
        shard.evict_from_page_cache()?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stamps[0] = monotonic_ns();
    tick[0] = ticks(pids);
    tokio::time::sleep(Duration::from_millis(args.baseline_ms)).await;
    let id = MigrationId::new(format!("live-{variant}-{round}"))?;
    let params = start_params(args, &id, &shard.root, &wal_dir, writer.acked_lsn()?, &target)?;
    stamps[1] = monotonic_ns();
    tick[1] = ticks(pids);
    let started = Instant::now();
    client.start(&params).await?;
    let done = wait_base_copied(&mut client, &id).await?;
    stamps[2] = monotonic_ns();
    tick[2] = ticks(pids);
    out.copy_bytes_per_sec = shard.size_bytes as f64 / done.duration_since(started).as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.catch_up_ms)).await;
    let catch_up_end = (monotonic_ns(), ticks(pids));
    let outcome = cut_over(&mut client, &id, &mut writer, CutOverOptions::default()).await.context("the cut-over")?;
    out.pause_us = outcome.release.pause.pause_duration_us;
    stamps[3] = monotonic_ns();
    tick[3] = ticks(pids);
    tokio::time::sleep(Duration::from_millis(args.after_ms)).await;
    stamps[4] = monotonic_ns();
    tick[4] = ticks(pids);
    let acks: Vec<Ack> = writer.stop(work)?;
    client.forget(&id).await?;
    let _ = target_client.forget(&id).await;

    let spans = [(stamps[0], stamps[1]), (stamps[1], stamps[2]), (stamps[2], catch_up_end.0), (stamps[3], stamps[4])];
    let tick_spans = [(tick[0], tick[1]), (tick[1], tick[2]), (tick[2], catch_up_end.1), (tick[3], tick[4])];
    for (i, ((from, to), (a, b))) in spans.into_iter().zip(tick_spans).enumerate() {
        out.windows[i] = window(&acks, from, to);
        out.cpu[i] = cpu_between(a, b);
    }
    // The daemons go before the WAL folder they tail.
    drop(source);
    drop(target);
    drop(wal);
    Ok(out)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn report(args: &Args, shard: &Shard, variants: &[&str], rounds: &[Round]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "writer {} writes/s in its own process on core {} with the source daemon; target on core {} staging on {}; shard {} in {} files, {}; read_mode {}; rate limit {}; medians of {} round(s)",
        args.write_rate,
        args.source_core,
        args.target_core,
        if args.target_staging == "disk" { "the writer's disk" } else { "tmpfs" },
        ferry_bench::format_bytes(shard.size_bytes),
        args.files,
        if args.cold_source { "dropped from the page cache before each copy" } else { "in the page cache" },
        args.read_mode,
        if args.rate_limit == 0 { "none".to_owned() } else { format!("{} B/s", args.rate_limit) },
        args.rounds
    );
    for variant in variants {
        let of: Vec<&Round> = rounds.iter().filter(|r| r.variant == *variant).collect();
        let med = |f: &dyn Fn(&Round) -> f64| median(of.iter().map(|r| f(r)).collect());
        let _ = writeln!(
            s,
            "\nvariant {variant} (load average at each round's start: {})",
            of.iter().map(|r| r.load_average.clone()).collect::<Vec<_>>().join(" | ")
        );
        let _ = writeln!(
            s,
            "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>7} {:>7}",
            "window",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "max gap",
            "p99 ratio",
            "p999 ratio",
            "cpu wr",
            "cpu src",
            "cpu tgt"
        );
        for (i, name) in WINDOWS.iter().enumerate() {
            let ratio99 = med(&|r| r.windows[i].p99_us / r.windows[0].p99_us.max(1e-9));
            let ratio999 = med(&|r| r.windows[i].p999_us / r.windows[0].p999_us.max(1e-9));
            let _ = writeln!(
                s,
                "  {:<14} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.2} {:>10.2} {:>7.2} {:>7.2} {:>7.2}",
                name,
                med(&|r| r.windows[i].p50_us),
                med(&|r| r.windows[i].p99_us),
                med(&|r| r.windows[i].p999_us),
                med(&|r| r.windows[i].longest_gap_us),
                ratio99,
                ratio999,
                med(&|r| r.cpu[i].writer),
                med(&|r| r.cpu[i].source),
                med(&|r| r.cpu[i].target),
            );
        }
        let idle = med(&|r| r.idle_copy_bytes_per_sec);
        let live = med(&|r| r.copy_bytes_per_sec);
        let _ = writeln!(
            s,
            "  copy: {:.0} MB/s with the writer running, {:.0} MB/s with it idle (ratio {:.2}, median of per-round ratios {:.2}); idle copy CPU: source {:.2}, target {:.2}; pause p50 {:.0} us",
            live / 1e6,
            idle / 1e6,
            live / idle.max(1e-9),
            med(&|r| r.copy_bytes_per_sec / r.idle_copy_bytes_per_sec.max(1e-9)),
            med(&|r| r.idle_copy_cpu.source),
            med(&|r| r.idle_copy_cpu.target),
            med(&|r| r.pause_us as f64),
        );
    }
    if variants.len() > 1 {
        let _ = writeln!(s, "\nagainst variant {} (same rounds, medians of per-round ratios):", variants[0]);
        for variant in &variants[1..] {
            let pairs: Vec<(&Round, &Round)> = rounds
                .iter()
                .filter(|r| r.variant == *variant)
                .filter_map(|r| rounds.iter().find(|b| b.variant == variants[0] && b.round == r.round).map(|b| (r, b)))
                .collect();
            let med = |f: &dyn Fn(&Round, &Round) -> f64| median(pairs.iter().map(|(r, b)| f(r, b)).collect());
            let _ = writeln!(
                s,
                "  {variant}: copy-window p99 {:.2} x, idle copy throughput {:.2} x, live copy throughput {:.2} x",
                med(&|r, b| r.windows[1].p99_us / b.windows[1].p99_us.max(1e-9)),
                med(&|r, b| r.idle_copy_bytes_per_sec / b.idle_copy_bytes_per_sec.max(1e-9)),
                med(&|r, b| r.copy_bytes_per_sec / b.copy_bytes_per_sec.max(1e-9)),
            );
        }
    }
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Role::Writer { wal_dir, rate }) = &args.role {
        return run_writer_child(wal_dir, *rate);
    }
    if args.list_variants {
        for (name, config) in VARIANTS {
            println!("{name}: {}", if config.is_empty() { "(the daemon's defaults)" } else { config });
        }
        return Ok(());
    }
    let variants: Vec<&str> = args.variants.split(',').map(str::trim).filter(|v| !v.is_empty()).collect();
    for v in &variants {
        variant_config(v)?;
    }
    pin_self(args.target_core)?;
    let bin = ferry_bin()?;
    let work = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let certs = BenchCerts::new()?;
    eprintln!("generating a {} shard in {}", args.shard_size, work.display());
    let shard = Shard::generate(&work, ferry_bench::parse_size_bytes(&args.shard_size)?, args.files, 21)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        for variant in &variants {
            eprintln!("round {} of {}, variant {variant} (load average {})", round + 1, args.rounds, load_average());
            let r = runtime.block_on(run_round(&args, &bin, &certs, &shard, &work, variant, round))?;
            eprintln!(
                "  copy p99 {:.0} us against {:.0} us without migration; copy {:.0} MB/s, idle {:.0} MB/s",
                r.windows[1].p99_us,
                r.windows[0].p99_us,
                r.copy_bytes_per_sec / 1e6,
                r.idle_copy_bytes_per_sec / 1e6
            );
            rounds.push(r);
        }
    }
    print!("{}", report(&args, &shard, &variants, &rounds));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&rounds)?)?;
    println!("raw figures: {}", args.out.display());
    Ok(())
}
