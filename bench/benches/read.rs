//! Criterion bench of the source-side chunk readers (`ferry_engine::read`).
//!
//! What it measures: reading a 256 MiB file in 1 MiB chunks, 16 chunks in flight, with each
//! [`ReadMode`], on a 2-worker tokio runtime; the consumer touches one byte per 4 KiB page of
//! every chunk (so mmap's page faults are paid, as quinn would pay them when it encrypts the
//! chunk) and drops it. `pread` runs on tokio's blocking pool, so up to 16 reads run on as
//! many threads; `uring` uses one reader thread (the default), `uring-2threads` two. Two
//! conditions:
//! - hot: the file is in the page cache (read once before measuring);
//! - cold: for mmap, uring and pread, `posix_fadvise(DONTNEED)` before every pass. Best effort:
//!   DONTNEED drops only clean, unmapped pages, so the file is fsynced once after it is
//!   written, and on a virtual disk the host may still cache it. `uring-direct` uses O_DIRECT,
//!   which bypasses the page cache, so it is measured cold only, without the fadvise.
//!
//! After criterion's own report it prints a summary: GB/s per mode and condition, and the ratio
//! to `pread` hot measured in the same run (the baseline). Run with
//! `cargo bench -p ferry-bench --bench read`; `FERRY_BENCH_DIR` picks the directory of the
//! temp file (default: the system temp dir; it must be a real disk file system for cold reads).
//! A mode the kernel refuses (io_uring blocked, no O_DIRECT) is skipped with a loud line.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use criterion::{Criterion, SamplingMode, Throughput};
use ferry_engine::read::{ChunkReader, ReadError, ReadMode, ReaderConfig, SourceFile};

const FILE_LEN_BYTES: u64 = 256 << 20;
const CHUNK_LEN_BYTES: u32 = 1 << 20;
const DEPTH_COUNT: usize = 16;
const PAGE_BYTES: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    Hot,
    Cold,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Hot => "hot",
            Cache::Cold => "cold",
        }
    }
}

/// `(label, cache, bytes, elapsed)` of every measured pass, for the closing summary.
static PASSES: Mutex<Vec<(&'static str, &'static str, u64, Duration)>> = Mutex::new(Vec::new());

fn make_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("segment-256MiB");
    let mut file = std::fs::File::create(&path).with_context(|| format!("create {path:?}"))?;
    let mut block = vec![0u8; CHUNK_LEN_BYTES as usize];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..FILE_LEN_BYTES / u64::from(CHUNK_LEN_BYTES) {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block)?;
    }
    // Dirty pages survive DONTNEED; make them clean.
    file.sync_all()?;
    Ok(path)
}

/// Asks the kernel to drop the file's cached pages (clean ones only; best effort).
fn drop_cache(file: &SourceFile) {
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let rc = unsafe { libc::posix_fadvise(file.file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        eprintln!("posix_fadvise(DONTNEED) failed with {rc}; cold figures are not cold");
    }
}

/// Reads the whole file with `DEPTH_COUNT` chunks in flight; returns a checksum of touched
/// bytes so nothing is optimised away.
async fn read_all(reader: &Arc<ChunkReader>, file: &Arc<SourceFile>) -> Result<u64, ReadError> {
    let mut pending = VecDeque::with_capacity(DEPTH_COUNT);
    let mut offset_bytes = 0u64;
    let mut sum = 0u64;
    while offset_bytes < FILE_LEN_BYTES || !pending.is_empty() {
        while pending.len() < DEPTH_COUNT && offset_bytes < FILE_LEN_BYTES {
            let reader = Arc::clone(reader);
            let file = Arc::clone(file);
            let at = offset_bytes;
            pending.push_back(tokio::spawn(async move { reader.read(&file, at, CHUNK_LEN_BYTES).await }));
            offset_bytes += u64::from(CHUNK_LEN_BYTES);
        }
        let Some(next) = pending.pop_front() else { break };
        let chunk = next.await.map_err(|_| ReadError::ReaderGone)??;
        sum = chunk.iter().step_by(PAGE_BYTES).fold(sum, |acc, &b| acc.wrapping_add(u64::from(b)));
    }
    Ok(sum)
}

/// One bench case: a mode and its reader thread count (uring modes only), and a label.
#[derive(Clone, Copy)]
struct Variant {
    label: &'static str,
    mode: ReadMode,
    threads: usize,
}

const PREAD: Variant = Variant { label: "pread", mode: ReadMode::Pread, threads: 1 };
const MMAP: Variant = Variant { label: "mmap", mode: ReadMode::Mmap, threads: 1 };
const URING: Variant = Variant { label: "uring", mode: ReadMode::Uring, threads: 1 };
const URING_2T: Variant = Variant { label: "uring-2threads", mode: ReadMode::Uring, threads: 2 };
const URING_DIRECT: Variant = Variant { label: "uring-direct", mode: ReadMode::UringDirect, threads: 1 };

fn bench_variant(c: &mut Criterion, rt: &tokio::runtime::Runtime, path: &Path, variant: Variant, cache: Cache) {
    let Variant { label, mode, threads } = variant;
    let config = ReaderConfig {
        threads,
        buffers_count: DEPTH_COUNT,
        chunk_len_max_bytes: CHUNK_LEN_BYTES,
        ..ReaderConfig::default()
    };
    let reader = match ChunkReader::new(mode, config) {
        Ok(reader) => Arc::new(reader),
        Err(err) => return eprintln!("SKIPPED {label} ({}): {err}", cache.name()),
    };
    let file = SourceFile::open_shared(path).unwrap();
    // One untimed pass: warms the cache for hot runs, surfaces a refused O_DIRECT early.
    if let Err(err) = rt.block_on(read_all(&reader, &file)) {
        return eprintln!("SKIPPED {label} ({}): {err}", cache.name());
    }
    let mut group = c.benchmark_group(format!("read_{}", cache.name()));
    group
        .throughput(Throughput::Bytes(FILE_LEN_BYTES))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function(label, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if cache == Cache::Cold && mode != ReadMode::UringDirect {
                    drop_cache(&file);
                }
                let start = Instant::now();
                let sum = rt.block_on(read_all(&reader, &file)).unwrap();
                let elapsed = start.elapsed();
                std::hint::black_box(sum);
                total += elapsed;
                PASSES.lock().unwrap().push((label, cache.name(), FILE_LEN_BYTES, elapsed));
            }
            total
        });
    });
    group.finish();
}

/// GB/s (10^9 bytes per second) of the median pass of one variant and condition.
fn median_gbps(label: &str, cache: &str) -> Option<f64> {
    let passes = PASSES.lock().unwrap();
    let mut rates: Vec<f64> = passes
        .iter()
        .filter(|(l, c, _, _)| *l == label && *c == cache)
        .map(|(_, _, bytes, elapsed)| *bytes as f64 / elapsed.as_secs_f64() / 1e9)
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied()
}

fn print_summary() {
    let baseline = median_gbps(PREAD.label, "hot");
    println!("\nread summary: 256 MiB in 1 MiB chunks, {DEPTH_COUNT} in flight, median pass");
    println!("{:<16} {:<5} {:>8} {:>12}", "reader", "cache", "GB/s", "x pread hot");
    for cache in ["hot", "cold"] {
        for variant in [PREAD, MMAP, URING, URING_2T, URING_DIRECT] {
            let Some(gbps) = median_gbps(variant.label, cache) else { continue };
            let ratio = baseline.map_or(f64::NAN, |base| gbps / base);
            println!("{:<16} {:<5} {:>8.2} {:>12.2}", variant.label, cache, gbps, ratio);
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let dir = match std::env::var_os("FERRY_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let path = make_file(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for variant in [PREAD, MMAP, URING, URING_2T] {
        bench_variant(&mut c, &rt, &path, variant, Cache::Hot);
    }
    for variant in [PREAD, MMAP, URING, URING_2T, URING_DIRECT] {
        bench_variant(&mut c, &rt, &path, variant, Cache::Cold);
    }
    c.final_summary();
    print_summary();
}
