//! ferry-bench-wal: the WAL catch-up benchmark of issue 4, source and target in one process
//! over loopback, 128-byte payloads, O_DIRECT-style flushes (layout A leaves stale leftovers,
//! layout B padding records).
//!
//! What it does, per layout:
//! 1. `backlog`: writes `--records` records before the copy (the vShard holding all of them,
//!    then one in eight), copies a one-file base with `until_lsn` = the tip, and times from
//!    just before `source::copy` is called until the target's durable LSN reaches the last
//!    selected LSN (seen by a thread polling the target's status every ~0.1 ms). It also
//!    prints the same span seen on the progress channel (published every 100 ms) and the whole
//!    copy minus a base-only copy of the same base measured right after.
//! 2. `converge`: a writer thread appends at `--converge-rate` for `--converge-secs` plus one
//!    second (all records in the vShard) while the copy runs; every 100 ms the bench samples
//!    the lag = the writer's last acknowledged (flushed) LSN minus the target's durable LSN
//!    (polled every ~1 ms). Converged: the lag after `--converge-secs` is no larger than after
//!    a third of it (10 s of 30 s), judged three ways: single samples, the median of the
//!    second before, the median of the 5 s before (single samples are at the mercy of one
//!    scheduling hiccup on a shared machine).
//! 3. `ack-lag`: a writer at `--lag-rate` for `--lag-secs`; for each record, the time from the
//!    writer's flush returning to the target's status first showing a durable LSN at or above
//!    it (polled every ~0.06 ms; the measured poll period is printed), staging on tmpfs and on
//!    disk; the first second is left out as warm-up.
//!
//! 4. `notice`: the append-notice latency of the tailer alone, no transfer: a writer at
//!    `--notice-rate` for `--notice-secs` and a thread following the folder with
//!    `FolderTail`, waiting between passes either on the inotify `AppendNotice` (what the
//!    migration's tail thread does) or by sleeping the poll interval (what it did before),
//!    both in the same run; for each flush, the time from the writer's flush returning to
//!    the tail returning its last record. The first second is left out as warm-up.
//!
//! What it does not: assert on any figure. It fails only when a copy fails.
//!
//! Run: `cargo run --release -p ferry-bench --bin ferry-bench-wal`.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_bench::certs::BenchCerts;
use ferry_bench::fs_type;
use ferry_bench::wal::{
    process_cpu_secs, quantile, request, run_copy, thread_cpu_secs, write_backlog, write_base, BenchTarget,
    DurableObserver, PacedWriter,
};
use ferry_engine::transfer::walsend::POLL_INTERVAL;
use ferry_engine::wal::{AppendNotice, FolderTail};
use ferry_wire::session::Progress;
use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode};
use ferry_wire::Lsn;
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(about = "ferry's WAL catch-up benchmark (issue 4), in one process over loopback")]
struct Args {
    /// Records in the pre-written backlog.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Layouts to measure, in order (a, b).
    #[arg(long, value_delimiter = ',', default_value = "a,b")]
    layouts: Vec<String>,
    /// Scenarios to run (backlog, converge, ack-lag, notice).
    #[arg(long, value_delimiter = ',', default_value = "backlog,converge,ack-lag,notice")]
    only: Vec<String>,
    #[arg(long, default_value_t = 200_000)]
    converge_rate: u64,
    #[arg(long, default_value_t = 30)]
    converge_secs: u64,
    #[arg(long, default_value_t = 50_000)]
    lag_rate: u64,
    #[arg(long, default_value_t = 10)]
    lag_secs: u64,
    #[arg(long, default_value_t = 50_000)]
    notice_rate: u64,
    #[arg(long, default_value_t = 5)]
    notice_secs: u64,
    /// tmpfs folder: the source WAL, the base, and the "tmpfs" staging.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,
    /// A disk folder for the "disk" staging (default: the system temp dir).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
}

fn layout_of(name: &str) -> anyhow::Result<Layout> {
    match name.trim().to_ascii_lowercase().as_str() {
        "a" => Ok(Layout::A),
        "b" => Ok(Layout::B),
        other => anyhow::bail!("unknown layout {other:?}: use a or b"),
    }
}

fn tmp_in(parent: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("cannot make a folder in {}", parent.display()))
}

/// The 1, 5 and 15 minute load averages: other work on a shared machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or("unknown".into(), |t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let disk_dir = args.disk_dir.clone().unwrap_or_else(std::env::temp_dir);
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "machine: {} cpus; tmpfs dir {} ({}), disk dir {} ({})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.tmpfs_dir.display(),
        fs_type(&args.tmpfs_dir)?,
        disk_dir.display(),
        fs_type(&disk_dir)?
    );
    println!("records: 128-byte payloads; writer: O_DIRECT-style flushes (block 4096, stale leftovers in A, padding records in B), 64 MiB segments; source WAL and base on tmpfs");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let certs = Arc::new(BenchCerts::new()?);
    let only = |name: &str| args.only.iter().any(|o| o == name);
    for layout_name in &args.layouts {
        let layout = layout_of(layout_name)?;
        println!("\n=== layout {layout:?} === (load average: {})", load_average());
        if only("backlog") {
            println!(
                "\n-- 1. applied records/s from a pre-written backlog ({} records) -- (load average: {})",
                args.records,
                load_average()
            );
            println!(
                "{:>9} {:>10} {:>9} {:>10} {:>13} {:>12} {:>11} {:>11} {:>13} {:>9}",
                "selected",
                "records",
                "write_s",
                "durable_s",
                "applied_rec/s",
                "scanned_r/s",
                "progress_s",
                "copy_s",
                "copy-base_s",
                "cpu_s/Mr"
            );
            for selected_every in [1u64, 8] {
                runtime.block_on(backlog(&certs, &args, layout, selected_every))?;
            }
        }
        if only("converge") {
            println!(
                "\n-- 2. convergence with a live writer at {} records/s for {} s (all records in the vShard) -- (load average: {})",
                args.converge_rate, args.converge_secs, load_average()
            );
            runtime.block_on(converge(&certs, &args, layout))?;
        }
        if only("ack-lag") {
            println!(
                "\n-- 3. writer ack -> target durable, {} records/s for {} s (all records in the vShard) -- (load average: {})",
                args.lag_rate, args.lag_secs, load_average()
            );
            println!(
                "{:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
                "staging",
                "fs",
                "achieved/s",
                "records",
                "p50_ms",
                "p99_ms",
                "p99.9_ms",
                "max_ms",
                "poll_us",
                "cpu_s/Mr"
            );
            for (label, parent) in [("tmpfs", args.tmpfs_dir.clone()), ("disk", disk_dir.clone())] {
                runtime.block_on(ack_lag(&certs, &args, layout, label, &parent))?;
            }
        }
        if only("notice") {
            println!(
                "\n-- 4. append notice: writer flush -> tail returns the record, {} records/s for {} s, no transfer -- (load average: {})",
                args.notice_rate,
                args.notice_secs,
                load_average()
            );
            println!(
                "{:>16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12}",
                "wait", "flushes", "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "tail_cpu_s"
            );
            let mut p50s = Vec::new();
            for inotify in [true, false] {
                p50s.push(notice(&args, layout, inotify)?);
            }
            if let [Some(with), Some(without)] = p50s[..] {
                println!(
                    "p50 ratio inotify / {} us poll: {:.3}",
                    POLL_INTERVAL.as_micros(),
                    with.as_secs_f64() / without.as_secs_f64().max(1e-12)
                );
            }
        }
    }
    Ok(())
}

async fn backlog(certs: &BenchCerts, args: &Args, layout: Layout, selected_every: u64) -> anyhow::Result<()> {
    let wal_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-wal-")?;
    let root = tmp_in(&args.tmpfs_dir, "ferry-bench-base-")?;
    let data_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-staging-")?;
    write_base(root.path())?;
    let written_at = Instant::now();
    let backlog = write_backlog(wal_dir.path(), layout, args.records, selected_every)?;
    let write_secs = written_at.elapsed().as_secs_f64();

    let target = BenchTarget::start(certs, data_dir.path())?;
    let id = format!("backlog-{selected_every}");
    let observer = DurableObserver::start(target.ctx.clone(), &id, Duration::from_micros(100))?;
    let (progress, mut progress_rx) = watch::channel(Progress::default());
    let last = backlog.last_selected;
    let started = Instant::now();
    let progress_task = tokio::spawn(async move {
        while progress_rx.changed().await.is_ok() {
            if progress_rx.borrow().wal_durable_lsn.is_some_and(|d| d >= last.0) {
                return Some(Instant::now());
            }
        }
        None
    });
    let cpu_before = process_cpu_secs();
    let req = request(&id, root.path(), target.addr, Some((wal_dir.path(), layout, backlog.tip)))?;
    let (report, copy_elapsed) = run_copy(certs, req, progress).await?;
    let cpu = process_cpu_secs() - cpu_before;
    let seen = observer.stop()?;
    let progress_at = progress_task.await.ok().flatten();
    anyhow::ensure!(
        report.final_lsn == backlog.tip,
        "the copy ended at {} instead of {}",
        report.final_lsn,
        backlog.tip
    );
    let reached = seen.first_at_least(last).context("the observer never saw the last selected LSN durable")?;
    let durable = reached.saturating_duration_since(started);

    let base_req = request(&format!("base-only-{selected_every}"), root.path(), target.addr, None)?;
    let (_, base_elapsed) = run_copy(certs, base_req, watch::channel(Progress::default()).0).await?;
    target.stop();

    let applied_rate = backlog.selected_count as f64 / durable.as_secs_f64();
    let scanned_rate = backlog.records_count as f64 / durable.as_secs_f64();
    let cpu_per_m = (cpu - seen.cpu_secs) / (backlog.selected_count as f64 / 1e6);
    println!(
        "{:>9} {:>10} {:>9.2} {:>10.3} {:>13.0} {:>12.0} {:>11} {:>11.3} {:>13.3} {:>9.2}",
        format!("1/{selected_every}"),
        backlog.selected_count,
        write_secs,
        durable.as_secs_f64(),
        applied_rate,
        scanned_rate,
        progress_at.map_or("-".into(), |at| format!("{:.3}", at.saturating_duration_since(started).as_secs_f64())),
        copy_elapsed.as_secs_f64(),
        copy_elapsed.saturating_sub(base_elapsed).as_secs_f64(),
        cpu_per_m
    );
    println!(
        "          (wal {:.1} MiB, tip {}, last selected {}; base-only copy {:.3} s; observer poll {:.0} us; cpu {:.2} s minus observer {:.2} s)",
        backlog.wal_bytes as f64 / (1u64 << 20) as f64,
        backlog.tip,
        backlog.last_selected,
        base_elapsed.as_secs_f64(),
        seen.poll_interval().as_secs_f64() * 1e6,
        cpu,
        seen.cpu_secs
    );
    Ok(())
}

async fn converge(certs: &Arc<BenchCerts>, args: &Args, layout: Layout) -> anyhow::Result<()> {
    let wal_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-wal-")?;
    let root = tmp_in(&args.tmpfs_dir, "ferry-bench-base-")?;
    let data_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-staging-")?;
    write_base(root.path())?;
    // One second more than measured, so the lag "after converge_secs" is mid-stream, not the
    // writer's last flush.
    let records_count = args.converge_rate * (args.converge_secs + 1);
    let target = BenchTarget::start(certs, data_dir.path())?;
    let id = "converge";
    let observer = DurableObserver::start(target.ctx.clone(), id, Duration::from_millis(1))?;
    let cpu_before = process_cpu_secs();
    let writer =
        PacedWriter::start(wal_dir.path(), layout, args.converge_rate, records_count, 1, Duration::from_micros(100))?;
    let acked = writer.acked_lsn.clone();
    let req = request(id, root.path(), target.addr, Some((wal_dir.path(), layout, Lsn(records_count))))?;
    let copy = {
        let identity_certs = certs.clone();
        let (progress, progress_rx) = watch::channel(Progress::default());
        let task = tokio::spawn(async move { run_copy(&identity_certs, req, progress).await });
        (task, progress_rx)
    };
    let (mut copy_task, progress_rx) = copy;
    let started = Instant::now();
    // (seconds since start, writer lag, progress-channel lag)
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let result = loop {
        tokio::select! {
            joined = &mut copy_task => break joined,
            _ = tick.tick() => {
                let lag = acked.load(std::sync::atomic::Ordering::Acquire).saturating_sub(observer.durable_lsn.load(std::sync::atomic::Ordering::Acquire));
                let p = *progress_rx.borrow();
                let progress_lag = p.wal_source_lsn.unwrap_or(0).saturating_sub(p.wal_durable_lsn.unwrap_or(0));
                samples.push((started.elapsed().as_secs_f64(), lag, progress_lag));
            }
        }
    };
    let copy_done = started.elapsed();
    let run = writer.join()?;
    let cpu = process_cpu_secs() - cpu_before;
    let seen = observer.stop()?;
    target.stop();
    let (_report, _) = result.context("the copy task failed")??;
    let end = args.converge_secs as f64;
    let early = end / 3.0;
    // Lag statistics over the `span` seconds before `at`: (median, max).
    let window_of = |at: f64, span: f64| {
        let mut lags: Vec<u64> = samples.iter().filter(|(t, _, _)| *t > at - span && *t <= at).map(|s| s.1).collect();
        lags.sort_unstable();
        Some((*lags.get(lags.len() / 2)?, *lags.last()?))
    };
    let window = |at: f64| window_of(at, 1.0);
    let point = |at: f64| samples.iter().rfind(|(t, _, _)| *t <= at).map(|s| (s.1, s.2));
    println!(
        "writer: {} records in {:.2} s = {:.0} records/s achieved (target {} /s), {} flushes, writer thread cpu {:.2} s",
        run.records_count,
        run.elapsed.as_secs_f64(),
        run.achieved_rate(),
        args.converge_rate,
        run.acks.len(),
        run.cpu_secs
    );
    println!(
        "copy finished {:.2} s after start ({:.2} s after the writer's last record); process cpu {:.2} s = {:.2} s per M records (includes writer and observer threads)",
        copy_done.as_secs_f64(),
        copy_done.as_secs_f64() - run.elapsed.as_secs_f64(),
        cpu,
        cpu / (run.records_count as f64 / 1e6)
    );
    println!(
        "{:>7} {:>12} {:>10} {:>15} {:>12} {:>15} {:>22}",
        "at_s", "lag_records", "lag_ms", "median_prev_1s", "max_prev_1s", "median_prev_5s", "progress_lag(src-dur)"
    );
    let mut points: Vec<f64> = vec![1.0, 2.0, early, end];
    points.extend((1..).map(|i| f64::from(i) * 5.0).take_while(|t| *t < end));
    points.retain(|t| *t <= end);
    points.sort_by(f64::total_cmp);
    points.dedup();
    for at in points {
        if let (Some((lag, plag)), Some((median, max))) = (point(at), window(at)) {
            let lag_ms = lag as f64 * 1000.0 / args.converge_rate.max(1) as f64;
            let median_5s = window_of(at, 5.0).map_or(0, |w| w.0);
            println!(
                "{:>7.1} {:>12} {:>10.1} {:>15} {:>12} {:>15} {:>22}",
                at, lag, lag_ms, median, max, median_5s, plag
            );
        }
    }
    let verdict = |early: Option<u64>, late: Option<u64>| match (early, late) {
        (Some(e), Some(l)) if l <= e => "CONVERGED",
        (Some(_), Some(_)) => "NOT CONVERGED",
        _ => "NO SAMPLES",
    };
    let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let (early_point, end_point) = (point(early).map(|p| p.0), point(end).map(|p| p.0));
    let (early_median, end_median) = (window(early).map(|w| w.0), window(end).map(|w| w.0));
    println!(
        "verdict on the single samples at {early:.0} s and {end:.0} s: {} vs {} -> {}",
        show(early_point),
        show(end_point),
        verdict(early_point, end_point)
    );
    println!(
        "verdict on the median of the 10 samples in the second before: {} vs {} -> {}",
        show(early_median),
        show(end_median),
        verdict(early_median, end_median)
    );
    let (early_5s, end_5s) = (window_of(early, 5.0).map(|w| w.0), window_of(end, 5.0).map(|w| w.0));
    println!(
        "verdict on the median of the 50 samples in the 5 s before: {} vs {} -> {}",
        show(early_5s),
        show(end_5s),
        verdict(early_5s, end_5s)
    );
    println!(
        "observer poll {:.0} us; lag max over the run {} records",
        seen.poll_interval().as_secs_f64() * 1e6,
        samples.iter().map(|s| s.1).max().unwrap_or(0)
    );
    Ok(())
}

/// What the notice scenario's tail saw: (LSN, when it was returned) per record, its thread's
/// CPU seconds, and whether inotify was watching.
type TailSeen = (Vec<(u64, Instant)>, f64, bool);

/// Scenario 4 with one way of waiting; returns the p50.
fn notice(args: &Args, layout: Layout, inotify: bool) -> anyhow::Result<Option<Duration>> {
    let wal_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-wal-")?;
    let records_count = args.notice_rate * args.notice_secs;
    let writer =
        PacedWriter::start(wal_dir.path(), layout, args.notice_rate, records_count, 1, Duration::from_micros(100))?;
    let dir = wal_dir.path().to_path_buf();
    let tail =
        std::thread::Builder::new().name("bench-notice-tail".into()).spawn(move || -> anyhow::Result<TailSeen> {
            let cpu_before = thread_cpu_secs();
            let (mut notice, error) =
                if inotify { AppendNotice::watch(&dir) } else { (AppendNotice::sleeping(), None) };
            if let Some(e) = error {
                println!("          (no inotify watch: {e}; the wait sleeps)");
            }
            let config = CursorConfig { layout: LayoutChoice::Fixed(layout), alignment_bytes: 4096, mode: Mode::Live };
            let mut tail = FolderTail::new(&dir, config, None)?;
            let mut seen = Vec::with_capacity(usize::try_from(records_count).unwrap_or(0));
            let mut last = 0u64;
            while last < records_count {
                match tail.poll_ref()? {
                    Some(record) => {
                        last = record.header.lsn.0;
                        seen.push((last, Instant::now()));
                    }
                    None => {
                        notice.wait(POLL_INTERVAL)?;
                    }
                }
            }
            Ok((seen, thread_cpu_secs() - cpu_before, notice.is_watching()))
        })?;
    let run = writer.join()?;
    let (seen, tail_cpu, watching) = tail.join().map_err(|_| anyhow::anyhow!("the tail thread panicked"))??;
    let warm_up = run.started + Duration::from_secs(1);
    let mut lags: Vec<Duration> = Vec::with_capacity(run.acks.len());
    for ack in run.acks.iter().filter(|a| a.at >= warm_up) {
        let i = seen.partition_point(|(lsn, _)| *lsn < ack.last_lsn.0);
        let (_, at) = seen.get(i).context("the tail never returned a flushed record")?;
        lags.push(at.saturating_duration_since(ack.at));
    }
    lags.sort_unstable();
    let q = |p: f64| quantile(&lags, p).map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e6));
    let label =
        if inotify && watching { "inotify".to_string() } else { format!("sleep {} us", POLL_INTERVAL.as_micros()) };
    println!(
        "{:>16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12.2}",
        label,
        lags.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        lags.last().map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e6)),
        tail_cpu
    );
    Ok(quantile(&lags, 0.5))
}

async fn ack_lag(certs: &BenchCerts, args: &Args, layout: Layout, label: &str, parent: &Path) -> anyhow::Result<()> {
    let wal_dir = tmp_in(&args.tmpfs_dir, "ferry-bench-wal-")?;
    let root = tmp_in(&args.tmpfs_dir, "ferry-bench-base-")?;
    let data_dir = tmp_in(parent, "ferry-bench-staging-")?;
    write_base(root.path())?;
    let records_count = args.lag_rate * args.lag_secs;
    let target = BenchTarget::start(certs, data_dir.path())?;
    let id = format!("ack-lag-{label}");
    let observer = DurableObserver::start(target.ctx.clone(), &id, Duration::from_micros(50))?;
    let cpu_before = process_cpu_secs();
    let writer =
        PacedWriter::start(wal_dir.path(), layout, args.lag_rate, records_count, 1, Duration::from_micros(100))?;
    let req = request(&id, root.path(), target.addr, Some((wal_dir.path(), layout, Lsn(records_count))))?;
    let (progress, _progress_rx) = watch::channel(Progress::default());
    let copy = run_copy(certs, req, progress).await;
    let run = writer.join()?;
    let cpu = process_cpu_secs() - cpu_before;
    let seen = observer.stop()?;
    target.stop();
    copy.context("the copy failed")?;
    let warm_up = run.started + Duration::from_secs(1);
    let mut lags: Vec<Duration> = Vec::with_capacity(usize::try_from(records_count).unwrap_or(0));
    for ack in run.acks.iter().filter(|a| a.at >= warm_up) {
        let durable = seen.first_at_least(ack.last_lsn).context("the observer missed a durable LSN")?;
        let lag = durable.saturating_duration_since(ack.at);
        lags.extend(std::iter::repeat_n(lag, usize::try_from(ack.records_count).unwrap_or(0)));
    }
    lags.sort_unstable();
    let q = |p: f64| quantile(&lags, p).map_or("-".into(), |d| format!("{:.3}", ms(d)));
    println!(
        "{:>8} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>9.2}",
        label,
        fs_type(parent)?,
        run.achieved_rate(),
        lags.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        lags.last().map_or("-".into(), |d| format!("{:.3}", ms(*d))),
        seen.poll_interval().as_secs_f64() * 1e6,
        cpu / (run.records_count as f64 / 1e6)
    );
    println!(
        "          ({} writer flushes, {:.1} records per flush; {} durable-LSN changes seen at the target = {:.0}/s, {:.1} records per staged batch; observer cpu {:.2} s, writer cpu {:.2} s, both in cpu_s/Mr)",
        run.acks.len(),
        run.records_count as f64 / run.acks.len().max(1) as f64,
        seen.changes.len(),
        seen.changes.len() as f64 / seen.elapsed.as_secs_f64().max(1e-9),
        run.records_count as f64 / seen.changes.len().max(1) as f64,
        seen.cpu_secs,
        run.cpu_secs
    );
    Ok(())
}
