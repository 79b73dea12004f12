//! Criterion bench of the base copy: ferry (tmpfs staging) against the raw quinn baseline.
//!
//! What it measures: copying a 256 MiB shard (8 files on tmpfs) over loopback, source and
//! target in this process on one tokio runtime (the CLI's shape: one worker per core), with
//! - `ferry_tmpfs`: `ferry_engine::transfer::source::copy` into an in-process target that
//!   stages through `DiskStorage` on tmpfs (/dev/shm), 1 MiB chunks, 4 streams, committed;
//! - `raw_quinn`: the transport's ceiling: ferry's own endpoint and transport settings
//!   (`RawSettings::FERRY_DEFAULT`: MTU bound, windows, socket buffers, 1 connection x 4 uni
//!   streams), a static 1 MiB `Bytes` written with `write_chunk`, a discarding receiver,
//!   ferry's rustls configs.
//!
//! Each sample is one whole copy (starting the target, the handshake and the commit
//! included); the staging is removed outside the timed span. After criterion's report it
//! prints the ratio ferry_tmpfs / raw_quinn of the mean rates measured in this run. It asserts
//! nothing about speed. The full issue-3 run (1 GiB, TCP, scp, daemons' memory and CPU) is
//! the `ferry-bench-e2e` binary.
//!
//! Run: `cargo bench -p ferry-bench --bench base_copy`. `FERRY_BENCH_TMPFS` picks the tmpfs
//! folder (default /dev/shm).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use ferry_bench::certs::BenchCerts;
use ferry_bench::ferry_copy::{ferry_copy, FerryShape};
use ferry_bench::raw_quinn::{raw_quinn_copy, RawSettings};
use ferry_bench::shard::Shard;

const SHARD_BYTES: u64 = 256 << 20;
const FILES_COUNT: u32 = 8;

/// `(name, total bytes, total time)` of every measured copy, for the closing ratio.
static TOTALS: Mutex<Vec<(&'static str, u64, Duration)>> = Mutex::new(Vec::new());

fn add_total(name: &'static str, bytes: u64, elapsed: Duration) {
    let mut totals = TOTALS.lock().unwrap();
    match totals.iter_mut().find(|(n, _, _)| *n == name) {
        Some((_, b, t)) => {
            *b += bytes;
            *t += elapsed;
        }
        None => totals.push((name, bytes, elapsed)),
    }
}

fn bench(c: &mut Criterion) {
    let tmpfs = std::env::var_os("FERRY_BENCH_TMPFS").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from);
    match ferry_bench::fs_type(&tmpfs) {
        Ok(t) if t == "tmpfs" => {}
        other => {
            println!("WARNING: {} is not tmpfs ({other:?}); the ferry_tmpfs figure is not on tmpfs", tmpfs.display())
        }
    }
    let shard = Shard::generate(&tmpfs, SHARD_BYTES, FILES_COUNT, 0x256).unwrap();
    let certs = BenchCerts::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let next_id = AtomicU64::new(0);

    let mut group = c.benchmark_group("base_copy_256MiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(12))
        .throughput(Throughput::Bytes(SHARD_BYTES));
    group.bench_function("raw_quinn", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let run = runtime.block_on(raw_quinn_copy(&certs, SHARD_BYTES, RawSettings::FERRY_DEFAULT)).unwrap();
                add_total("raw_quinn", run.bytes_total, run.elapsed);
                total += run.elapsed;
            }
            total
        })
    });
    group.bench_function("ferry_tmpfs", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let id = format!("criterion-{}", next_id.fetch_add(1, Ordering::Relaxed));
                let (run, _) =
                    runtime.block_on(ferry_copy(&certs, &shard, &tmpfs, &id, FerryShape::default())).unwrap();
                add_total("ferry_tmpfs", run.bytes_total, run.elapsed);
                total += run.elapsed;
            }
            total
        })
    });
    group.finish();

    let totals = TOTALS.lock().unwrap().clone();
    let rate =
        |name: &str| totals.iter().find(|(n, _, _)| *n == name).map(|(_, b, t)| *b as f64 / t.as_secs_f64().max(1e-9));
    println!();
    println!("base copy, 256 MiB, means over every copy of this run (warm-up included):");
    for (name, _, _) in &totals {
        println!("  {name:<12} {:>8.1} MB/s", rate(name).unwrap_or(0.0) / 1e6);
    }
    if let (Some(ferry), Some(quinn)) = (rate("ferry_tmpfs"), rate("raw_quinn")) {
        println!("  ratio ferry_tmpfs / raw_quinn: {:.3} (issue 3 goal on the 1 GiB shard: >= 0.85)", ferry / quinn);
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
