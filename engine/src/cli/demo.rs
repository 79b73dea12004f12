//! `ferry demo`: an offline migration of one generated shard, end to end, verified.
//!
//! What it does: in one process, makes a work folder, development certificates
//! (`demo-source`, `demo-target`), a target daemon on a loopback QUIC port (mutual TLS, staging
//! on disk through [`DiskStorage`]) and a source shard of pseudo-random files in nested folders.
//! It runs the base copy through [`source::copy`] with `commit` (an offline release), draws a
//! progress line on stderr, then verifies the staging with readers independent of the transfer
//! code: SHA-256 of every source file against its staged copy, and `MANIFEST.json` read as plain
//! JSON (state `released`, every file listed at its size, nothing else). It prints a report
//! (text, or one JSON object with `--json`) and exits non-zero when verification fails.
//!
//! What it does not: the live parts of a migration. WAL catch-up, the cut-over fence and the
//! reference writer do not exist yet (issues 4 and 6), so no writes run, no pause is measured,
//! and the report says so instead of printing numbers for them.
//!
//! Invariants: shard generation is timed apart and never counted in the copy's throughput;
//! the work folder is removed at exit unless `--keep` names it; a `--keep` folder must be new or
//! empty, so an earlier run's staging is never mistaken for this run's copy.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ferry_wire::limits::{CHUNK_LEN_DEFAULT_BYTES, CHUNK_LEN_MAX_BYTES, CHUNK_LEN_MIN_BYTES};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::certs::{self, IssueOptions};
use crate::quic::QuicTuning;
use crate::read::ReadMode;
use crate::storage::DiskStorage;
use crate::tls::NodeIdentity;
use crate::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use crate::transfer::target::{self, TargetContext};

const SOURCE_NODE: &str = "demo-source";
const TARGET_NODE: &str = "demo-target";
const MIGRATION_ID: &str = "demo-vshard-7";
const VSHARD: VShardId = VShardId(7);
/// The phases of a live migration this build does not run, by their JSON names.
const NOT_IMPLEMENTED: [&str; 3] = ["wal_catch_up", "cut_over_fence", "reference_writer"];
/// Most files a demo shard may have: enough to show many small files, few enough to list.
const FILES_MAX_COUNT: u32 = 100_000;
/// Most uni streams per connection (the target's `uni_streams_max_count`).
const STREAMS_MAX_COUNT: u32 = 64;
const CONNECTIONS_MAX_COUNT: u32 = 16;
/// Progress is redrawn at most this often; lines that are not on a terminal come every 5 ticks.
const PROGRESS_TICK: Duration = Duration::from_millis(200);
const PROGRESS_LINE_EVERY_TICKS: u32 = 5;
const IO_BUFFER_BYTES: usize = 4 << 20;

const NOT_IMPLEMENTED_HELP: &str = "\
What runs today: an OFFLINE migration. Base copy of a generated shard over mutual-TLS QUIC \
(loopback), offline release, then SHA-256 verification of every staged file and of MANIFEST.json.

Not implemented yet: see issues 4 and 6.
  WAL catch-up     no writer runs and no WAL is streamed
  cut-over fence   no writes are paused, so no pause is measured
  reference writer the section 9 reference node does not exist yet
The report never prints numbers for these phases.";

/// `ferry demo`: the arguments.
#[derive(Debug, Args)]
#[command(after_help = NOT_IMPLEMENTED_HELP)]
pub struct DemoArgs {
    /// Shard size: bytes, or a number with KiB, MiB or GiB (512MiB).
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Files the shard is split over, in nested folders (L0/, L1/, L2/).
    #[arg(long, default_value_t = 8)]
    pub files: u32,
    /// Chunk size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = CHUNK_LEN_DEFAULT_BYTES)]
    pub chunk_len: u32,
    /// Parallel uni streams per connection.
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// QUIC connections, each on its own endpoint.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Work in this folder (new or empty) and leave it there for inspection.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Parses `512MiB`, `8 KiB`, `1GiB`, `4096` or `4096B` into bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size: give bytes (536870912) or a number with KiB, MiB or GiB (512MiB)");
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" => 10,
        "mib" => 20,
        "gib" => 30,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// The work folder: removed on drop unless the caller keeps it.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn open(keep: Option<&Path>) -> anyhow::Result<Self> {
        let Some(dir) = keep else {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let path = std::env::temp_dir().join(format!("ferry-demo-{}-{}", std::process::id(), nanos.as_micros()));
            fs::create_dir(&path).with_context(|| format!("cannot create the work folder {}", path.display()))?;
            return Ok(Self { path, keep: false });
        };
        fs::create_dir_all(dir).with_context(|| format!("cannot create --keep folder {}", dir.display()))?;
        let mut entries = fs::read_dir(dir).with_context(|| format!("cannot list --keep folder {}", dir.display()))?;
        if entries.next().is_some() {
            bail!("--keep folder {} is not empty: name a new or empty folder", dir.display());
        }
        let path = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(Self { path, keep: true })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("ferry demo: cannot remove the work folder {}: {e}", self.path.display());
            }
        }
    }
}

/// One generated shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardFile {
    rel: String,
    size_bytes: u64,
}

/// The shard's files: `total_bytes` split as evenly as possible, spread over `L0`..`L2`.
fn shard_layout(total_bytes: u64, files_count: u32) -> Vec<ShardFile> {
    let count = u64::from(files_count.max(1));
    let (each, extra) = (total_bytes / count, total_bytes % count);
    (0..count)
        .map(|i| ShardFile { rel: format!("L{}/{i:06}.seg", i % 3), size_bytes: each + u64::from(i < extra) })
        .collect()
}

/// xorshift64*: fast, and its 64-bit outputs do not repeat within a period of 2^64 - 1.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            let word = self.next_word().to_le_bytes();
            for (d, s) in tail.iter_mut().zip(word) {
                *d = s;
            }
        }
    }

    fn next_word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Writes the shard under `root`, on up to two threads. Returns how long it took.
fn generate_shard(root: &Path, files: &[ShardFile]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 2);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut buf = vec![0u8; IO_BUFFER_BYTES];
                    for (index, file) in files.iter().enumerate().skip(t).step_by(threads) {
                        write_shard_file(root, file, index as u64, &mut buf)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a shard generation thread died"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(started.elapsed())
}

fn write_shard_file(root: &Path, file: &ShardFile, seed: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    let path = root.join(&file.rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut out = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut rng = XorShift::new(seed);
    let mut left = file.size_bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let part = buf.get_mut(..n).unwrap_or_default();
        rng.fill(part);
        out.write_all(part).with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// What the independent check found.
#[derive(Debug, Default)]
struct Verification {
    segments_identical: bool,
    manifest_state: String,
    files_checked_count: u64,
    elapsed_us: u64,
    /// Every difference found, one line each.
    problems: Vec<String>,
}

fn sha256_file(path: &Path, buf: &mut [u8]) -> std::io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every regular file under `dir`, as `/`-separated paths relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            list_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Checks the staging at `staging_root` against the source files under `source_root`,
/// without the transfer code: SHA-256 of each file, and MANIFEST.json read as plain JSON.
fn verify(source_root: &Path, staging_root: &Path, files: &[ShardFile]) -> Verification {
    let started = Instant::now();
    let mut v = Verification::default();
    let segments = staging_root.join("segments");
    let mut buf = vec![0u8; IO_BUFFER_BYTES];
    let mut identical = true;
    for file in files {
        let source = sha256_file(&source_root.join(&file.rel), &mut buf);
        let staged = sha256_file(&segments.join(&file.rel), &mut buf);
        match (source, staged) {
            (Ok(s), Ok(t)) if s == t => v.files_checked_count += 1,
            (Ok(s), Ok(t)) => {
                identical = false;
                v.problems.push(format!("{}: source SHA-256 {}, staged SHA-256 {}", file.rel, hex(&s), hex(&t)));
            }
            (Err(e), _) => {
                identical = false;
                v.problems.push(format!("{}: cannot read the source file: {e}", file.rel));
            }
            (_, Err(e)) => {
                identical = false;
                v.problems.push(format!("{}: cannot read the staged file: {e}", file.rel));
            }
        }
    }
    let mut staged_names = BTreeSet::new();
    match list_files(&segments, &segments, &mut staged_names) {
        Ok(()) => {
            let expected: BTreeSet<&str> = files.iter().map(|f| f.rel.as_str()).collect();
            for extra in staged_names.iter().filter(|n| !expected.contains(n.as_str())) {
                identical = false;
                v.problems.push(format!("{extra}: staged, but the source has no such file"));
            }
        }
        Err(e) => {
            identical = false;
            v.problems.push(format!("cannot list {}: {e}", segments.display()));
        }
    }
    v.segments_identical = identical;
    let (state, manifest_problems) = check_manifest(&staging_root.join("MANIFEST.json"), files);
    v.manifest_state = state;
    v.problems.extend(manifest_problems);
    v.elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    v
}

/// Reads MANIFEST.json as plain JSON: its state, and whether it lists exactly `files` at their
/// sizes. Returns the state found (`missing` or `unreadable` when there is none) and problems.
fn check_manifest(path: &Path, files: &[ShardFile]) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return ("missing".into(), vec![format!("cannot read {}: {e}", path.display())]),
    };
    let manifest: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(e) => return ("unreadable".into(), vec![format!("{} is not JSON: {e}", path.display())]),
    };
    let state = manifest.get("state").and_then(|s| s.as_str()).unwrap_or("missing").to_owned();
    if state != "released" {
        problems.push(format!("MANIFEST.json says state {state:?}, expected \"released\""));
    }
    if manifest.get("base_complete").and_then(|b| b.as_bool()) != Some(true) {
        problems.push("MANIFEST.json does not say base_complete: true".into());
    }
    let mut listed = BTreeMap::new();
    for segment in manifest.get("segments").and_then(|s| s.as_array()).map_or(&[][..], |a| a.as_slice()) {
        let path = segment.get("path").and_then(|p| p.as_str()).unwrap_or("?").to_owned();
        let size = segment.get("size_bytes").and_then(|s| s.as_u64());
        if listed.insert(path.clone(), size).is_some() {
            problems.push(format!("MANIFEST.json lists {path} twice"));
        }
    }
    for file in files {
        match listed.remove(&file.rel) {
            Some(Some(size)) if size == file.size_bytes => {}
            Some(size) => problems.push(format!(
                "MANIFEST.json lists {} with size {}, the source file has {} bytes",
                file.rel,
                size.map_or_else(|| "missing".to_owned(), |s| s.to_string()),
                file.size_bytes
            )),
            None => problems.push(format!("MANIFEST.json does not list {}", file.rel)),
        }
    }
    for extra in listed.keys() {
        problems.push(format!("MANIFEST.json lists {extra}, which the source does not have"));
    }
    (state, problems)
}

/// Where the demo's parts live inside the work folder.
#[derive(Debug)]
struct Dirs {
    certs: PathBuf,
    source_root: PathBuf,
    data: PathBuf,
}

/// Starts the target daemon in this runtime and runs the copy against it.
async fn base_copy(dirs: &Dirs, args: &DemoArgs) -> anyhow::Result<CopyReport> {
    let source_node = NodeId::new(SOURCE_NODE)?;
    let target_node = NodeId::new(TARGET_NODE)?;
    let tuning = QuicTuning::default();
    let target_identity = NodeIdentity::from_dir(&dirs.certs, &target_node)?;
    let crypto = crate::tls::server_crypto(&target_identity, std::slice::from_ref(&source_node))?;
    let endpoint = crate::quic::server_endpoint(([127, 0, 0, 1], 0).into(), crypto, &tuning)
        .context("cannot open the target's QUIC endpoint on 127.0.0.1")?;
    let target_addr = endpoint.local_addr()?;
    eprintln!("ferry demo: target daemon {TARGET_NODE} listening on {target_addr} (QUIC, mutual TLS)");
    let ctx = Arc::new(TargetContext::new(target_node.clone(), dirs.data.clone(), Arc::new(DiskStorage)));
    let server = tokio::spawn(target::serve(endpoint.clone(), ctx));

    let request = CopyRequest {
        migration_id: MigrationId::new(MIGRATION_ID)?,
        vshard_id: VSHARD,
        base_lsn: Lsn(0),
        segments_root: dirs.source_root.clone(),
        files: None,
        db_meta: serde_json::json!({ "demo": true }),
        target_addr,
        target_node,
        chunk_len_bytes: args.chunk_len,
        streams_count: args.streams,
        connections_count: args.connections,
        rate_limit_bytes_per_sec: 0,
        read_mode: ReadMode::Mmap,
        commit: true,
        wal: None,
    };
    let source_identity = NodeIdentity::from_dir(&dirs.certs, &source_node)?;
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let rate = RateHandle::new(0, u64::from(args.chunk_len));
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let drawer = tokio::spawn(draw_progress(progress_rx, started, terminal));
    let result = tokio::select! {
        result = source::copy(&source_identity, &tuning, request, progress_tx, rate) => {
            result.context("the base copy failed")
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drawer.abort();
    let _ = drawer.await;
    if let Ok(report) = &result {
        let done =
            Progress { bytes_transferred: report.bytes_total, bytes_total: report.bytes_total, ..Progress::default() };
        let elapsed = Duration::from_micros(report.elapsed_us);
        draw_line(&progress_line(&done, elapsed, terminal), terminal);
    }
    if terminal {
        eprintln!();
    }
    endpoint.close(quinn::VarInt::from_u32(crate::quic::close_code::DONE), b"demo over");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    server.abort();
    result
}

async fn draw_progress(mut progress: watch::Receiver<Progress>, started: Instant, terminal: bool) {
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        let p = *progress.borrow_and_update();
        if p.bytes_total == 0 || (!terminal && ticks % PROGRESS_LINE_EVERY_TICKS != 0) {
            continue;
        }
        draw_line(&progress_line(&p, started.elapsed(), terminal), terminal);
    }
}

fn draw_line(line: &str, terminal: bool) {
    let mut err = std::io::stderr().lock();
    let _ = if terminal { write!(err, "\r{line}") } else { writeln!(err, "{line}") };
    let _ = err.flush();
}

/// `base copy [#####-----]  48.2%  256.0/512.0 MiB  412.3 MB/s  ETA 0.6 s`
fn progress_line(p: &Progress, elapsed: Duration, terminal: bool) -> String {
    const BAR_WIDTH: u64 = 24;
    let total = p.bytes_total.max(1);
    let done = p.bytes_transferred.min(total);
    let percent = done as f64 * 100.0 / total as f64;
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let eta = if done >= total {
        format!("done in {secs:.1} s")
    } else if rate > 0.0 {
        format!("ETA {:.1} s", (total - done) as f64 / rate)
    } else {
        "ETA --".into()
    };
    let filled = done.saturating_mul(BAR_WIDTH) / total;
    let bar: String = (0..BAR_WIDTH).map(|i| if i < filled { '#' } else { '-' }).collect();
    let line = format!(
        "base copy [{bar}] {percent:5.1}%  {:.1}/{:.1} MiB  {:.1} MB/s  {eta}",
        done as f64 / MIB,
        total as f64 / MIB,
        rate / 1e6
    );
    // Pads so a shorter redraw covers the longer line before it.
    if terminal {
        format!("{line:<90}")
    } else {
        line
    }
}

const MIB: f64 = 1_048_576.0;

fn check_args(args: &DemoArgs) -> anyhow::Result<()> {
    if !(1..=FILES_MAX_COUNT).contains(&args.files) {
        bail!("--files must be between 1 and {FILES_MAX_COUNT}, not {}", args.files);
    }
    if args.shard_size < u64::from(args.files) {
        bail!(
            "--shard-size {} is smaller than --files {}: give each file at least one byte",
            args.shard_size,
            args.files
        );
    }
    if !(CHUNK_LEN_MIN_BYTES..=CHUNK_LEN_MAX_BYTES).contains(&args.chunk_len) {
        bail!(
            "--chunk-len must be between {CHUNK_LEN_MIN_BYTES} and {CHUNK_LEN_MAX_BYTES} bytes, not {}",
            args.chunk_len
        );
    }
    if !(1..=STREAMS_MAX_COUNT).contains(&args.streams) {
        bail!("--streams must be between 1 and {STREAMS_MAX_COUNT}, not {}", args.streams);
    }
    if !(1..=CONNECTIONS_MAX_COUNT).contains(&args.connections) {
        bail!("--connections must be between 1 and {CONNECTIONS_MAX_COUNT}, not {}", args.connections);
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let work = WorkDir::open(args.keep.as_deref())?;
    let dirs = Dirs {
        certs: work.path.join("certs"),
        source_root: work.path.join("source").join("segments"),
        data: work.path.join("target").join("data"),
    };
    eprintln!(
        "ferry demo: work folder {} ({})",
        work.path.display(),
        if work.keep { "kept" } else { "removed at exit; --keep DIR keeps it" }
    );
    certs::init_ca(&dirs.certs, false)?;
    for name in [SOURCE_NODE, TARGET_NODE] {
        certs::issue(&dirs.certs, &NodeId::new(name)?, &IssueOptions::default())?;
    }
    fs::create_dir_all(&dirs.source_root).with_context(|| format!("cannot create {}", dirs.source_root.display()))?;
    fs::create_dir_all(&dirs.data).with_context(|| format!("cannot create {}", dirs.data.display()))?;

    let files = shard_layout(args.shard_size, args.files);
    eprintln!("ferry demo: generating a {:.1} MiB shard in {} files", args.shard_size as f64 / MIB, files.len());
    let generate_elapsed = generate_shard(&dirs.source_root, &files)?;

    let report = super::runtime()?.block_on(base_copy(&dirs, &args))?;

    eprintln!("ferry demo: verifying the staging (SHA-256 of every file, MANIFEST.json)");
    let staging_root = dirs.data.join("migrations").join(MIGRATION_ID);
    let verification = verify(&dirs.source_root, &staging_root, &files);
    let generate_elapsed_us = u64::try_from(generate_elapsed.as_micros()).unwrap_or(u64::MAX);

    if args.json {
        let object = json_report(&args, &work, &report, &verification, generate_elapsed_us);
        println!("{}", serde_json::to_string_pretty(&object)?);
    } else {
        print!("{}", text_report(&args, &work, &staging_root, &report, &verification, generate_elapsed_us));
    }
    if !verification.problems.is_empty() {
        for problem in &verification.problems {
            eprintln!("ferry demo: verification: {problem}");
        }
        bail!(
            "verification failed: {} difference(s) between the source shard and the target staging (listed above)",
            verification.problems.len()
        );
    }
    Ok(())
}

fn json_report(
    args: &DemoArgs,
    work: &WorkDir,
    report: &CopyReport,
    v: &Verification,
    generate_elapsed_us: u64,
) -> serde_json::Value {
    serde_json::json!({
        "mode": "offline",
        "work_dir": work.path.display().to_string(),
        "work_dir_kept": work.keep,
        "shard": {
            "bytes": args.shard_size,
            "files": args.files,
            "generate_elapsed_us": generate_elapsed_us,
        },
        "base_copy": {
            "bytes": report.bytes_total,
            "files": report.files_count,
            "throughput_bytes_per_sec": report.throughput_bytes_per_sec,
            "elapsed_us": report.elapsed_us,
            "bytes_resent": report.bytes_resent,
            "connections": report.connections_count,
            "streams": args.streams,
            "chunk_len_bytes": args.chunk_len,
            "read_mode": report.read_mode,
            "reconnects": report.reconnects_count,
            "committed": report.committed,
        },
        "verification": {
            "segments_identical": v.segments_identical,
            "manifest_state": v.manifest_state,
            "files_checked": v.files_checked_count,
            "elapsed_us": v.elapsed_us,
            "problems": v.problems,
        },
        "not_implemented": NOT_IMPLEMENTED,
        "not_implemented_issues": [4, 6],
    })
}

fn text_report(
    args: &DemoArgs,
    work: &WorkDir,
    staging_root: &Path,
    report: &CopyReport,
    v: &Verification,
    generate_elapsed_us: u64,
) -> String {
    let secs = |us: u64| us as f64 / 1e6;
    let identical = if v.segments_identical { "identical to the source" } else { "DIFFERENT from the source" };
    let manifest_ok = v.problems.iter().all(|p| !p.starts_with("MANIFEST.json"));
    let kept = if work.keep {
        format!("kept; staging in {}", staging_root.display())
    } else {
        "removed at exit; --keep DIR keeps it".into()
    };
    format!(
        "\
ferry demo: OFFLINE migration of vShard {vshard} from {SOURCE_NODE} to {TARGET_NODE}
  work folder   {work_dir} ({kept})
  shard         {shard_mib:.1} MiB in {files} files under L0/, L1/, L2/; generated in {gen:.2} s (not counted below)
  base copy     {bytes} bytes, {copied} files in {elapsed:.3} s = {mbps:.1} MB/s
                over 127.0.0.1 QUIC, mutual TLS: {conns} connection(s) x {streams} stream(s), {chunk} byte chunks,
                read with {read_mode}; resent {resent} bytes; {reconnects} reconnect(s); staging released at LSN 0
  verification  SHA-256 of {checked}/{files} files: {identical}; MANIFEST.json: state {state}, {listed} ({verify:.2} s)
  not implemented yet: see issues 4 and 6
    WAL catch-up      no writer ran and no WAL was streamed
    cut-over fence    no writes were paused, so no pause was measured
    reference writer  the reference node (DESIGN section 9) does not exist yet
  note: one machine, loopback network, source files hot in the page cache; the target fsyncs every file
",
        vshard = VSHARD.0,
        work_dir = work.path.display(),
        shard_mib = args.shard_size as f64 / MIB,
        files = args.files,
        gen = secs(generate_elapsed_us),
        bytes = report.bytes_total,
        copied = report.files_count,
        elapsed = secs(report.elapsed_us),
        mbps = report.throughput_bytes_per_sec as f64 / 1e6,
        conns = report.connections_count,
        streams = args.streams,
        chunk = args.chunk_len,
        read_mode = report.read_mode,
        resent = report.bytes_resent,
        reconnects = report.reconnects_count,
        checked = v.files_checked_count,
        state = v.manifest_state,
        listed = if manifest_ok { "every file listed at its size" } else { "DOES NOT MATCH the source" },
        verify = secs(v.elapsed_us),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("8KiB"), Ok(8 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("3mib"), Ok(3 << 20));
    }

    #[test]
    fn garbage_sizes_are_refused_clearly() {
        for bad in ["nonsense", "", "MiB", "12MB", "1.5GiB", "-3", "7 TiB", "12MiBs"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("not a size"), "{bad:?}: {err}");
        }
        assert!(parse_size("99999999999GiB").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999999").unwrap_err().contains("too large"));
    }

    #[test]
    fn layout_splits_every_byte_over_nested_files() {
        let files = shard_layout(10, 3);
        let sizes: Vec<u64> = files.iter().map(|f| f.size_bytes).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        let names: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(names, vec!["L0/000000.seg", "L1/000001.seg", "L2/000002.seg"]);
        assert_eq!(shard_layout(512 << 20, 8).iter().map(|f| f.size_bytes).sum::<u64>(), 512 << 20);
    }

    #[test]
    fn generated_data_does_not_repeat() {
        let mut buf = vec![0u8; 1 << 20];
        XorShift::new(0).fill(&mut buf);
        let words: BTreeSet<&[u8]> = buf.chunks_exact(8).collect();
        assert_eq!(words.len(), buf.len() / 8);
        let mut other = vec![0u8; 1 << 20];
        XorShift::new(1).fill(&mut other);
        assert_ne!(buf, other);
    }

    /// A source tree and a staging that agrees with it, as a finished copy leaves them.
    fn fixture(dir: &Path) -> (PathBuf, PathBuf, Vec<ShardFile>) {
        let (source, staging) = (dir.join("source"), dir.join("staging"));
        let files = shard_layout(100_003, 4);
        generate_shard(&source, &files).unwrap();
        generate_shard(&staging.join("segments"), &files).unwrap();
        let segments: Vec<_> = files
            .iter()
            .map(|f| serde_json::json!({ "path": f.rel, "size_bytes": f.size_bytes, "crc32c": 0 }))
            .collect();
        let manifest = serde_json::json!({ "state": "released", "base_complete": true, "segments": segments });
        fs::write(staging.join("MANIFEST.json"), manifest.to_string()).unwrap();
        (source, staging, files)
    }

    #[test]
    fn verification_passes_on_identical_trees() {
        let dir = tempfile::tempdir().unwrap();
        let (source, staging, files) = fixture(dir.path());
        let v = verify(&source, &staging, &files);
        assert!(v.segments_identical, "{:?}", v.problems);
        assert_eq!(v.manifest_state, "released");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.files_checked_count, 4);
    }

    #[test]
    fn verification_names_a_flipped_byte_an_extra_file_and_a_wrong_state() {
        let dir = tempfile::tempdir().unwrap();
        let (source, staging, files) = fixture(dir.path());
        let victim = staging.join("segments").join(&files[2].rel);
        let mut bytes = fs::read(&victim).unwrap();
        bytes[777] ^= 1;
        fs::write(&victim, bytes).unwrap();
        fs::write(staging.join("segments/L0/stray.seg"), b"x").unwrap();
        let manifest = fs::read_to_string(staging.join("MANIFEST.json")).unwrap();
        fs::write(staging.join("MANIFEST.json"), manifest.replace("released", "copying")).unwrap();

        let v = verify(&source, &staging, &files);
        assert!(!v.segments_identical);
        assert_eq!(v.manifest_state, "copying");
        assert_eq!(v.files_checked_count, 3);
        let all = v.problems.join("\n");
        assert!(all.contains(&format!("{}: source SHA-256", files[2].rel)), "{all}");
        assert!(all.contains("L0/stray.seg: staged, but the source has no such file"), "{all}");
        assert!(all.contains("state \"copying\""), "{all}");
    }

    #[test]
    fn verification_names_a_manifest_that_lists_a_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let (source, staging, mut files) = fixture(dir.path());
        let manifest = fs::read_to_string(staging.join("MANIFEST.json")).unwrap();
        let wrong = manifest.replace(&format!("\"size_bytes\":{}", files[0].size_bytes), "\"size_bytes\":1");
        assert_ne!(manifest, wrong);
        fs::write(staging.join("MANIFEST.json"), wrong).unwrap();
        let v = verify(&source, &staging, &files);
        assert!(v.segments_identical);
        assert!(v.problems.iter().any(|p| p.contains("with size 1,")), "{:?}", v.problems);
        files.truncate(1);
        let v = verify(&source, &staging, &files);
        assert!(!v.segments_identical, "extra staged files must count as differences");
    }
}
