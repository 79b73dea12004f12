//! ferry-bench-cutover: the cut-over benchmark. Many live migrations in a row between
//! two daemons of this process (real control sockets, QUIC on loopback), each ended by the
//! reference coordinator's cut-over (prepare, pause, fence, resume, release) with the reference
//! writer at `--write-rate` writes/s paused and resumed in-process; staging and WAL on tmpfs
//! (/dev/shm) and on disk (a temp folder), and the 4 KiB write + fdatasync latency of each
//! filesystem measured in the same run as the baseline.
//!
//! What it reports, per filesystem: p50, p99, p99.9 and max of the pause (writes paused to
//! writes resumed, as `migration.release` reports it) and of each of its parts, the fdatasync
//! p50/p99, the goal checks (tmpfs: pause p99 under 700 us, and at most 0.7 x the p99 of a
//! baseline run given with `--baseline`; disk: pause p99 at most the same run's tmpfs pause p99
//! plus the disk's 4 KiB fdatasync p99), and an SVG histogram of the pauses (`--out-dir`, with the raw figures as JSON).
//!
//! What it does not: assert. Each migration's base is one small file (the base copy is not
//! what is measured); after each release the writer resumes on the source (not the target), so
//! the next migration of the same vShard has writes to move. Each finished migration is
//! forgotten on both nodes, so disk use stays bounded. The reference writer idles at its cap of
//! writes, so a fresh one on a fresh WAL folder takes over before (the old folder is removed):
//! every cut-over is measured with the writer writing (before session 6, the last 13 to 19% of
//! a run of 1,000 were not).
//!
//! Run: `cargo run --release -p ferry-bench --bin ferry-bench-cutover -- --cutovers 1000`
//! (`--source-on-tmpfs`: only the target's staging on the filesystem measured).
#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_bench::certs::{BenchCerts, SOURCE_NODE, TARGET_NODE};
use ferry_engine::cli::coordinator::{cut_over, CutOverOptions, RefWrites};
use ferry_engine::config::NodeConfig;
use ferry_engine::control::ControlClient;
use ferry_engine::node::RunningNode;
use ferry_refnode::writer::WRITES_MAX_COUNT;
use ferry_refnode::{RefWriter, RefWriterConfig};
use ferry_wire::api::StartParams;
use ferry_wire::fence::PauseReport;
use ferry_wire::{MigrationId, VShardId};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "ferry's cut-over benchmark: many live migrations, the pause of each")]
struct Args {
    /// Cut-overs per filesystem.
    #[arg(long, default_value_t = 1000)]
    cutovers: u32,
    /// The reference writer's rate (one write in four to the migrating vShard).
    #[arg(long, default_value_t = 50_000)]
    write_rate: u64,
    /// Which filesystems: tmpfs, disk or both.
    #[arg(long, default_value = "both")]
    fs: String,
    /// The cut-over's budget.
    #[arg(long, default_value_t = 500_000)]
    budget_us: u64,
    /// Where the SVG histogram and the raw figures go.
    #[arg(long, default_value = "target/bench-cutover")]
    out_dir: PathBuf,
    /// fdatasync samples for the baseline.
    #[arg(long, default_value_t = 2000)]
    fsync_samples: u32,
    /// Keep the source's side (its daemon's data folder, its WAL and the base export) on tmpfs
    /// whatever the filesystem measured, so only the target's staging is on it (on one host,
    /// the source's own flushes otherwise share the disk's journal with the target's).
    #[arg(long)]
    source_on_tmpfs: bool,
    /// A baseline's figures: the `runs.json` another build of this bench wrote (run it first
    /// with another `--out-dir`); each filesystem's pause p99 is then also given as a ratio to
    /// the baseline's.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// The figures of one filesystem.
#[derive(Debug, Default, serde::Serialize)]
struct Run {
    fs: String,
    fs_type: String,
    fdatasync_us: Vec<u64>,
    pauses: Vec<PauseReport>,
    failed_fences_count: usize,
    /// Fresh reference writers started before the previous one reached its cap.
    writers_rotated_count: u32,
    elapsed_secs: f64,
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(mut values: Vec<u64>) -> [u64; 4] {
    values.sort_unstable();
    [quantile(&values, 0.5), quantile(&values, 0.99), quantile(&values, 0.999), values.last().copied().unwrap_or(0)]
}

/// 4 KiB pwrite + fdatasync, `samples` times, in `dir`: microseconds each.
fn fdatasync_latency(dir: &Path, samples: u32) -> anyhow::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = vec![0x5au8; 4096];
    let mut out = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let started = Instant::now();
        file.write_all_at(&block, u64::from(i % 256) * 4096)?;
        file.sync_data()?;
        out.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    std::fs::remove_file(&path)?;
    Ok(out)
}

fn node_config(certs: &BenchCerts, name: &str, data_dir: &Path, allow: &str) -> NodeConfig {
    NodeConfig {
        node_id: name.into(),
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        certs_dir: certs.path().to_path_buf(),
        allowed_peers: vec![allow.into()],
        progress_interval_ms: 0,
        max_held_wal_bytes: 1 << 30,
        ..NodeConfig::default()
    }
}

async fn wait_catch_up(client: &mut ControlClient, id: &MigrationId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.status(id).await?;
        match status.phase {
            ferry_wire::api::Phase::WalCatchUp => return Ok(()),
            ferry_wire::api::Phase::Failed => anyhow::bail!("{id} failed: {:?}", status.reason),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "{id} did not reach WalCatchUp");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The reference writer idles after [`WRITES_MAX_COUNT`] writes (its per-write log is capped):
/// the benchmark starts a fresh one before that.
const WRITER_ROTATE_AT_COUNT: u64 = WRITES_MAX_COUNT / 5 * 4;

/// A reference writer on a new WAL folder, given a moment to start writing.
async fn start_writer(wal_dir: &Path, rate_writes_per_sec: u64) -> anyhow::Result<RefWriter> {
    let mut config = RefWriterConfig::new(wal_dir, VShardId(7));
    config.rate_writes_per_sec = rate_writes_per_sec;
    let writer = RefWriter::start(config)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(writer)
}

async fn run_fs(args: &Args, fs: &str, base: &Path) -> anyhow::Result<Run> {
    std::fs::create_dir_all(base)?;
    let fdatasync_us = fdatasync_latency(base, args.fsync_samples)?;
    let certs = BenchCerts::new()?;
    let source_tmpfs = if args.source_on_tmpfs {
        Some(tempfile::Builder::new().prefix("ferry-bench-cutover-source-").tempdir_in("/dev/shm")?)
    } else {
        None
    };
    let source_base = source_tmpfs.as_ref().map_or(base, |dir| dir.path());
    let source =
        RunningNode::start(&node_config(&certs, SOURCE_NODE, &source_base.join("source"), TARGET_NODE)).await?;
    let target = RunningNode::start(&node_config(&certs, TARGET_NODE, &base.join("target"), SOURCE_NODE)).await?;
    let root = source_base.join("export");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("base.seg"), vec![7u8; 4096])?;
    let mut generation = 0u32;
    let mut wal_dir = source_base.join(format!("wal-{generation}"));
    let mut writer = start_writer(&wal_dir, args.write_rate).await?;
    let mut source_client = ControlClient::connect(source.socket()).await?;
    let mut target_client = ControlClient::connect(target.socket()).await?;
    let fs = if args.source_on_tmpfs { format!("{fs} (source on tmpfs)") } else { fs.to_owned() };
    let mut run = Run { fs_type: ferry_bench::fs_type(base)?, fs: fs.clone(), fdatasync_us, ..Run::default() };
    let started = Instant::now();
    for i in 0..args.cutovers {
        if writer.acked_count() >= WRITER_ROTATE_AT_COUNT {
            // A fresh writer on a fresh WAL folder before this one idles at its cap (every
            // cut-over is measured with the writer writing); the old folder goes.
            drop(writer.stop()?);
            std::fs::remove_dir_all(&wal_dir)?;
            generation += 1;
            run.writers_rotated_count += 1;
            wal_dir = source_base.join(format!("wal-{generation}"));
            writer = start_writer(&wal_dir, args.write_rate).await?;
        }
        let id = MigrationId::new(format!("cut-{i}"))?;
        let params: StartParams = serde_json::from_value(json!({
            "migration_id": id.as_str(), "vshard_id": 7, "segments_root": root, "wal_dir": wal_dir,
            "base_lsn": writer.acked_lsn().0, "target_address": target.quic_addr.to_string(),
            "target_node_id": TARGET_NODE, "write_pause_budget_us": args.budget_us, "chunk_len_bytes": 65536,
        }))?;
        source_client.start(&params).await?;
        wait_catch_up(&mut source_client, &id).await?;
        // A moment of live catch-up before the cut-over.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let outcome = cut_over(
            &mut source_client,
            &id,
            &mut RefWrites { writer: &writer, target_node_wal: None },
            CutOverOptions::default(),
        )
        .await
        .with_context(|| format!("cut-over {i}"))?;
        run.failed_fences_count += outcome.failed_fences.len();
        run.pauses.push(outcome.release.pause);
        source_client.forget(&id).await?;
        target_client.forget(&id).await?;
        if (i + 1) % 100 == 0 {
            eprintln!("{fs}: {} cut-overs in {:.0} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    run.elapsed_secs = started.elapsed().as_secs_f64();
    drop(writer.stop()?);
    source.shutdown().await;
    target.shutdown().await;
    Ok(run)
}

fn report(run: &Run) -> String {
    let mut out = String::new();
    let fsync = summary(run.fdatasync_us.clone());
    let pause = summary(run.pauses.iter().map(|p| p.pause_duration_us).collect());
    let _ = writeln!(
        out,
        "{} ({}): {} cut-overs in {:.0} s, {} fences cancelled and retried, {} fresh writers",
        run.fs,
        run.fs_type,
        run.pauses.len(),
        run.elapsed_secs,
        run.failed_fences_count,
        run.writers_rotated_count
    );
    let _ = writeln!(out, "  {:<22} {:>9} {:>9} {:>9} {:>9}", "us", "p50", "p99", "p99.9", "max");
    let mut line = |name: &str, v: [u64; 4]| {
        let _ = writeln!(out, "  {name:<22} {:>9} {:>9} {:>9} {:>9}", v[0], v[1], v[2], v[3]);
    };
    line("pause", pause);
    line("  before_fence", summary(run.pauses.iter().map(|p| p.breakdown.before_fence_us).collect()));
    line("  drain", summary(run.pauses.iter().map(|p| p.breakdown.drain_us).collect()));
    line("  target_durable", summary(run.pauses.iter().map(|p| p.breakdown.target_durable_us).collect()));
    line("  apply_wait", summary(run.pauses.iter().map(|p| p.breakdown.apply_wait_us).collect()));
    line("  after_fence", summary(run.pauses.iter().map(|p| p.breakdown.after_fence_us).collect()));
    line("estimate", summary(run.pauses.iter().map(|p| p.estimate_us).collect()));
    line("fdatasync (4 KiB)", fsync);
    out
}

/// The pause p99 of each filesystem in a `runs.json` written by this bench.
fn baseline_p99s(path: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let bytes = std::fs::read(path).with_context(|| format!("--baseline {}", path.display()))?;
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
        .with_context(|| format!("--baseline {}: not a runs.json of this bench", path.display()))?;
    runs.iter()
        .map(|run| {
            let fs = run["fs"].as_str().context("a baseline run without `fs`")?.to_owned();
            let pauses = run["pauses"].as_array().context("a baseline run without `pauses`")?;
            let values = pauses.iter().filter_map(|p| p["pause_duration_us"].as_u64()).collect();
            Ok((fs, summary(values)[1]))
        })
        .collect()
}

/// The goal checks over every filesystem of this run (and the baseline's, when given).
#[allow(clippy::cast_precision_loss)] // microseconds
fn goals(runs: &[Run], baseline: &[(String, u64)]) -> String {
    let mut out = String::from("goals:\n");
    let p99 = |run: &Run| summary(run.pauses.iter().map(|p| p.pause_duration_us).collect())[1];
    let tmpfs = runs.iter().find(|r| r.fs == "tmpfs").map(p99);
    for run in runs {
        let pause = p99(run);
        let fsync = summary(run.fdatasync_us.clone())[1];
        if run.fs == "tmpfs" {
            let _ = writeln!(out, "  tmpfs: pause p99 {pause} us, goal under 700 us: {}", verdict(pause < 700));
        } else if let Some(tmpfs) = tmpfs {
            let goal_us = tmpfs + fsync;
            let _ = writeln!(
                out,
                "  {}: pause p99 {pause} us, goal at most tmpfs p99 {tmpfs} + fdatasync p99 {fsync} = {goal_us} us ({:.2} x): {}",
                run.fs,
                pause as f64 / goal_us.max(1) as f64,
                verdict(pause <= goal_us)
            );
        } else {
            let _ = writeln!(out, "  {}: pause p99 {pause} us (the goal needs the tmpfs run too: --fs both)", run.fs);
        }
        if let Some((_, base)) = baseline.iter().find(|(fs, _)| *fs == run.fs) {
            let ratio = pause as f64 / (*base).max(1) as f64;
            let goal = if run.fs == "tmpfs" {
                format!(", goal at most 0.7: {}", verdict(ratio <= 0.7))
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {}: pause p99 / baseline p99 {base} us = {ratio:.2}{goal}", run.fs);
        }
    }
    out
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

/// An SVG histogram of the pauses of every run: log2 buckets from 16 us.
fn svg(runs: &[Run]) -> String {
    let bounds: Vec<u64> = (4..=24).map(|b| 1u64 << b).collect();
    let colors = ["#1f77b4", "#d62728"];
    let (width, height, left, bottom) = (900.0, 420.0, 60.0, 60.0);
    let plot_w = width - left - 20.0;
    let plot_h = height - bottom - 40.0;
    let bucket_w = plot_w / bounds.len() as f64;
    let counts: Vec<Vec<u64>> = runs
        .iter()
        .map(|run| {
            let mut c = vec![0u64; bounds.len()];
            for p in &run.pauses {
                let i = bounds.iter().position(|b| p.pause_duration_us <= *b).unwrap_or(bounds.len() - 1);
                c[i] += 1;
            }
            c
        })
        .collect();
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"20\" font-size=\"14\">ferry cut-over write pause (us), histogram per filesystem</text>\n"
    );
    for (r, run) in runs.iter().enumerate() {
        let bar_w = bucket_w / runs.len().max(1) as f64 - 1.0;
        for (i, count) in counts[r].iter().enumerate() {
            let h = *count as f64 / max * plot_h;
            let x = left + i as f64 * bucket_w + r as f64 * (bar_w + 1.0);
            let y = height - bottom - h;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} &lt;= {} us: {count}</title></rect>",
                colors[r % 2], run.fs, bounds[i]
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{} ({} cut-overs)</text>",
            width - 220.0,
            30.0 + r as f64 * 16.0,
            colors[r % 2],
            width - 205.0,
            39.0 + r as f64 * 16.0,
            run.fs,
            run.pauses.len()
        );
    }
    for (i, b) in bounds.iter().enumerate().step_by(2) {
        let x = left + i as f64 * bucket_w + bucket_w / 2.0;
        let label = if *b >= 1_000_000 {
            format!("{}s", b / 1_000_000)
        } else if *b >= 1_000 {
            format!("{}ms", b / 1_000)
        } else {
            format!("{b}us")
        };
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">&lt;={label}</text>",
            height - bottom + 15.0
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<text x=\"{left}\" y=\"{2}\">pause bucket (log2 upper bounds); bar height: cut-overs (max {max})</text>\n</svg>",
        height - bottom,
        width - 20.0,
        height - 20.0
    );
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let kinds: Vec<&str> = match args.fs.as_str() {
        "both" => vec!["tmpfs", "disk"],
        "tmpfs" => vec!["tmpfs"],
        "disk" => vec!["disk"],
        other => anyhow::bail!("--fs {other}: give tmpfs, disk or both"),
    };
    let baseline = args.baseline.as_deref().map(baseline_p99s).transpose()?.unwrap_or_default();
    let mut runs = Vec::new();
    for fs in kinds {
        let dir = if fs == "tmpfs" {
            tempfile::Builder::new().prefix("ferry-bench-cutover-").tempdir_in("/dev/shm")?
        } else {
            tempfile::Builder::new().prefix("ferry-bench-cutover-").tempdir_in(std::env::temp_dir())?
        };
        let run = runtime.block_on(run_fs(&args, fs, dir.path()))?;
        print!("{}", report(&run));
        runs.push(run);
    }
    print!("{}", goals(&runs, &baseline));
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("pause-histogram.svg"), svg(&runs))?;
    std::fs::write(args.out_dir.join("runs.json"), serde_json::to_vec(&runs)?)?;
    println!("histogram: {}", args.out_dir.join("pause-histogram.svg").display());
    Ok(())
}
