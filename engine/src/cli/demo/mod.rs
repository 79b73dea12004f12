//! `ferry demo`: a LIVE migration of one vShard between two node daemons running in this
//! process, with the reference node writing throughout and the real cut-over fence at the end,
//! everything verified.
//!
//! What it does, in order ([`live::run`] drives it, all through the daemons' control sockets):
//! 1. a work folder (temporary, or `--keep DIR`), development certificates (a cluster CA,
//!    `demo-source`, `demo-target`) and two daemons ([`crate::node::RunningNode`]): each with
//!    its own control socket (`<data>/control/ferry.sock`) and a QUIC endpoint on loopback,
//!    mutual TLS, staging on disk;
//! 2. the reference writer ([`ferry_refnode::RefWriter`], its own thread) appends NodeDB
//!    layout-A records to the source WAL at `--write-rate` writes/s (one in four to vShard 7),
//!    and for `--baseline-ms` nothing else happens: the ack latency measured then is
//!    `writer.ack_p99_us_without_migration`, the baseline of the same run;
//! 3. `base_lsn` = the writer's last acknowledged LSN; the reference node exports vShard 7's
//!    writes up to it ([`ferry_refnode::export_base`]) and fills the shard up to `--shard-size`
//!    with bulk files ([`ferry_refnode::generate_bulk`], `--files` of them); generation is timed
//!    apart and never counted in the base copy's throughput;
//! 4. `migration.start` (live: `wal_dir` set, `offline: false`) on the source's socket, then
//!    `migration.status` every [`progress::POLL_INTERVAL`]: a progress line per phase on stderr
//!    (BaseCopy with bytes, percent and rate; WalCatchUp with lag), for `--catch-up-ms` of
//!    catch-up once the base is staged;
//! 5. the cut-over ([`super::coordinator::cut_over`]): prepare until the estimate fits
//!    `--budget-us`, pause the writer in-process (its last acknowledged LSN is `final_lsn`), fence,
//!    resume the writer on the target (vShard 7's writes now go to `<target data>/node-wal/`),
//!    release; no forked command on the critical path;
//! 6. the writer keeps writing for `--after-ms`, then stops; the demo waits for the source to
//!    say `Completed` and reads the staging's MANIFEST.json;
//! 7. [`ferry_refnode::verify`]: every acknowledged vShard-7 write found exactly once across
//!    the staged export, the staged WAL and the target's node WAL, and every staged segment
//!    file identical (SHA-256) to the source's, with readers independent of the transfer code.
//!
//! It prints a report ([`report`] of a [`summary::Summary`]: text, or one JSON object with
//! `--json`) and exits non-zero when the verification fails, when any write was acknowledged
//! while writes were paused, when the writer's longest gap between acks is shorter than the
//! reported pause, when the pause's parts do not add up to it, or when the staging is not
//! `released` at `final_lsn` with the source saying `Completed`.
//!
//! What it does not (honestly): import the staging into anything (the verifier reads it as a
//! database's importer would, and counts); exercise `migration.applied` (the apply wait holds no database ingest);
//! fence one vShard alone (the reference writer pauses all of its writes, the simplest fence
//! that is right). The writer's acknowledgement is a write to the segment file, no fdatasync.
//! The base copy's time is from the `migration.start` call to the first status poll that says
//! `WalCatchUp`, so it is late by at most one poll ([`progress::POLL_INTERVAL`]). Lag is the
//! daemon's snapshot (the vShard's records its tail has read and the target has not made
//! durable), refreshed every 100 ms by the daemon: records the tail has not read yet are not
//! in it, and it is counted in records from the writer's log. Source, target and writer share
//! one machine's cores and a loopback network.
//!
//! Invariants: every timestamp compared with the writer's log is CLOCK_MONOTONIC ns
//! ([`crate::clock::monotonic_ns`]); the work folder is removed at exit unless `--keep` names
//! it, and a `--keep` folder must be new or empty, so an earlier run's staging is never
//! mistaken for this run's; writes are paused only by the cut-over, and every pause is resumed.

mod live;
mod progress;
mod report;
mod summary;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ferry_wire::api::{PARALLELISM_MAX_COUNT, WRITE_PAUSE_BUDGET_DEFAULT_US};
use ferry_wire::limits::{CHUNK_LEN_DEFAULT_BYTES, CHUNK_LEN_MAX_BYTES, CHUNK_LEN_MIN_BYTES};
use ferry_wire::{NodeId, VShardId};

use crate::certs::{self, IssueOptions};
use crate::cli::out::{errln, out, outln};
use crate::cli::render::{parse_size, parse_size_u32};
use ferry_refnode::writer::RATE_MAX_WRITES_PER_SEC;

const SOURCE_NODE: &str = "demo-source";
const TARGET_NODE: &str = "demo-target";
const MIGRATION_ID: &str = "demo-vshard-7";
const VSHARD: VShardId = VShardId(7);
const WRITE_RATE_MIN: u64 = 100;
/// Bounds of the phase lengths, in ms: a baseline needs some acks, and nothing here should run
/// for more than ten minutes.
const BASELINE_MS_MIN: u64 = 100;
const PHASE_MS_MAX: u64 = 600_000;
/// Bounds of the write-pause budget: below 1 ms no fence fits, above a minute it is not a pause.
const BUDGET_US_MIN: u64 = 1_000;
const BUDGET_US_MAX: u64 = 60_000_000;

const HELP: &str = "\
What runs: two node daemons in this process (demo-source and demo-target, each with its own \
control socket and a QUIC endpoint on 127.0.0.1, mutual TLS with development certificates) and \
the reference node's writer appending NodeDB layout-A records to the source WAL at --write-rate \
(one write in four to vShard 7). After --baseline-ms of writes alone (the ack latency baseline), \
the reference node exports vShard 7's writes up to base_lsn and fills the shard to --shard-size \
with bulk files; the demo then drives a LIVE migration through the source daemon's control \
socket: base copy, WAL catch-up for --catch-up-ms, and the cut-over fence (prepare, pause the \
writer in-process, fence at its last acknowledged LSN, resume it on the target, release). The \
writer keeps writing vShard 7 to the target's node WAL for --after-ms, then everything is \
verified: no acknowledged write lost or duplicated, every staged file identical to the source's.

Progress goes to stderr, one line per phase, beside the daemons' own log lines (FERRY_LOG=warn \
keeps only the progress); the report goes to stdout (--json: one JSON object). \
The exit status is non-zero when verification fails, a write was acknowledged while writes were \
paused, or the writer's longest gap between acks is shorter than the reported pause.

Not done: nothing imports the staging on the target (the verifier reads it as an importer \
would); migration.applied is not exercised, so the pause's apply wait holds no database ingest.";

/// `ferry demo`: the arguments.
#[derive(Debug, Args)]
#[command(after_help = HELP)]
pub struct DemoArgs {
    /// Shard size: bytes, or a size such as 512MiB or 2GB. The export of vShard 7's
    /// writes up to base_lsn plus bulk files make up this many bytes.
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Bulk files the shard is filled with, in nested folders (bulk/L0/, L1/, L2/).
    #[arg(long, default_value_t = 8)]
    pub files: u32,
    /// Chunk size of the base copy: bytes, or a size such as 256KiB or 1MiB.
    #[arg(long, value_name = "SIZE", default_value_t = CHUNK_LEN_DEFAULT_BYTES, value_parser = parse_size_u32)]
    pub chunk_len: u32,
    /// Parallel uni streams per connection.
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// QUIC connections.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// The reference writer's rate, in writes per second (one in four to vShard 7).
    #[arg(long, value_name = "WRITES", default_value_t = 20_000)]
    pub write_rate: u64,
    /// How long the writer runs alone before the migration, in ms (the ack latency baseline).
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub baseline_ms: u64,
    /// How long the WAL catch-up runs once the base is staged, before the cut-over, in ms.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub catch_up_ms: u64,
    /// How long the writer keeps writing (vShard 7 to the target) after the release, in ms.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub after_ms: u64,
    /// The cut-over's write-pause budget, in microseconds.
    #[arg(long, value_name = "US", default_value_t = WRITE_PAUSE_BUDGET_DEFAULT_US)]
    pub budget_us: u64,
    /// Work in this folder (new or empty) and leave it there for inspection.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn check_args(args: &DemoArgs) -> anyhow::Result<()> {
    let files_max = ferry_refnode::bulk::FILES_MAX_COUNT;
    if !(1..=files_max).contains(&args.files) {
        bail!("--files must be between 1 and {files_max}, not {}", args.files);
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
    for (flag, value) in [("--streams", args.streams), ("--connections", args.connections)] {
        if !(1..=PARALLELISM_MAX_COUNT).contains(&value) {
            bail!("{flag} must be between 1 and {PARALLELISM_MAX_COUNT}, not {value}");
        }
    }
    if !(WRITE_RATE_MIN..=RATE_MAX_WRITES_PER_SEC).contains(&args.write_rate) {
        bail!(
            "--write-rate must be between {WRITE_RATE_MIN} and {RATE_MAX_WRITES_PER_SEC} writes/s, not {}",
            args.write_rate
        );
    }
    if !(BASELINE_MS_MIN..=PHASE_MS_MAX).contains(&args.baseline_ms) {
        bail!("--baseline-ms must be between {BASELINE_MS_MIN} and {PHASE_MS_MAX}, not {}", args.baseline_ms);
    }
    for (flag, value) in [("--catch-up-ms", args.catch_up_ms), ("--after-ms", args.after_ms)] {
        if value > PHASE_MS_MAX {
            bail!("{flag} must be between 0 and {PHASE_MS_MAX}, not {value}");
        }
    }
    if !(BUDGET_US_MIN..=BUDGET_US_MAX).contains(&args.budget_us) {
        bail!("--budget-us must be between {BUDGET_US_MIN} and {BUDGET_US_MAX}, not {}", args.budget_us);
    }
    Ok(())
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
                errln!("ferry demo: cannot remove the work folder {}: {e}", self.path.display());
            }
        }
    }
}

/// Where the demo's parts live inside the work folder.
#[derive(Debug, Clone)]
struct Dirs {
    certs: PathBuf,
    /// The source daemon's data folder (its control socket, checkpoints).
    source_data: PathBuf,
    /// The source node's WAL, written by the reference writer, tailed by the source daemon.
    source_wal: PathBuf,
    /// The migration's `segments_root`: the export and the bulk files.
    export_root: PathBuf,
    /// The target daemon's data folder: `migrations/<id>/` and the writer's `node-wal/`.
    target_data: PathBuf,
}

impl Dirs {
    fn new(work: &Path) -> Self {
        Dirs {
            certs: work.join("certs"),
            source_data: work.join("source").join("data"),
            source_wal: work.join("source").join("wal"),
            export_root: work.join("source").join("segments"),
            target_data: work.join("target").join("data"),
        }
    }

    fn staging(&self) -> PathBuf {
        self.target_data.join("migrations").join(MIGRATION_ID)
    }

    fn node_wal(&self) -> PathBuf {
        self.target_data.join("node-wal")
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    check_args(&args)?;
    let work = WorkDir::open(args.keep.as_deref())?;
    let dirs = Dirs::new(&work.path);
    errln!(
        "ferry demo: work folder {} ({})",
        work.path.display(),
        if work.keep { "kept" } else { "removed at exit; --keep DIR keeps it" }
    );
    certs::init_ca(&dirs.certs, false).context("cannot make the demo's cluster CA")?;
    for name in [SOURCE_NODE, TARGET_NODE] {
        certs::issue(&dirs.certs, &NodeId::new(name)?, &IssueOptions::default())
            .with_context(|| format!("cannot issue the certificate of {name}"))?;
    }
    let run = super::runtime()?.block_on(live::run(&args, &dirs))?;

    errln!(
        "ferry demo: verifying: every acknowledged vShard-{} write in the staged export, staged WAL and target node WAL; SHA-256 of every staged file",
        VSHARD.0
    );
    let staging = dirs.staging();
    let node_wal = dirs.node_wal();
    let verification = ferry_refnode::verify(&ferry_refnode::VerifyInput {
        log: &run.log,
        base_lsn: run.base_lsn,
        final_lsn: ferry_wire::Lsn(run.cut.release.final_lsn),
        staging_dir: &staging,
        source_segments_root: &dirs.export_root,
        target_node_wal_dir: Some(&node_wal),
    });
    let manifest = summary::ManifestCheck::read(&staging.join("MANIFEST.json"));
    let summary = summary::Summary::new(&args, &run, verification, manifest);
    if args.json {
        let object = report::json_report(&args, &work.path, work.keep, &summary);
        outln!("{}", serde_json::to_string_pretty(&object)?)?;
    } else {
        out!("{}", report::text_report(&args, &work.path, work.keep, &staging, &summary))?;
    }
    let failures = summary.failures();
    if !failures.is_empty() {
        for problem in summary.verification.problems.iter() {
            errln!("ferry demo: verification: {problem}");
        }
        bail!("the demo FAILED: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: DemoArgs,
    }

    fn parse(extra: &[&str]) -> Result<DemoArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("demo").chain(extra.iter().copied())).map(|w| w.args)
    }

    #[test]
    fn sizes_take_the_syntax_of_every_other_size_flag() {
        for (flags, shard_size, chunk_len) in [
            (&["--shard-size", "4096", "--chunk-len", "65536"][..], 4096, 65536),
            (&["--shard-size", "4096B", "--chunk-len", "64KiB"], 4096, 64 << 10),
            (&["--shard-size", "2 GiB", "--chunk-len", "1MiB"], 2 << 30, 1 << 20),
            (&["--shard-size", "12MB", "--chunk-len", "1mib"], 12_000_000, 1 << 20),
            (&["--shard-size", "1.5GiB"], 3 << 29, CHUNK_LEN_DEFAULT_BYTES),
        ] {
            let args = parse(flags).unwrap();
            assert_eq!((args.shard_size, args.chunk_len), (shard_size, chunk_len), "{flags:?}");
        }
    }

    #[test]
    fn garbage_sizes_are_refused_clearly() {
        for bad in ["nonsense", "", "MiB", "-3", "12MiBs", "unlimited", "1MB/s"] {
            let err = parse(&[&format!("--shard-size={bad}")]).unwrap_err().to_string();
            assert!(err.contains("not a size"), "{bad:?}: {err}");
        }
        assert!(parse(&["--shard-size", "99999999999TiB"]).unwrap_err().to_string().contains("more than"));
        assert!(parse(&["--chunk-len", "8GiB"]).unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn the_defaults_are_the_issue_s_demo_and_pass_the_checks() {
        let args = parse(&[]).unwrap();
        assert_eq!((args.shard_size, args.write_rate, args.budget_us), (512 << 20, 20_000, 500_000));
        assert_eq!((args.baseline_ms, args.catch_up_ms, args.after_ms), (1_000, 1_000, 1_000));
        check_args(&args).unwrap();
    }

    #[test]
    fn out_of_range_flags_are_refused_naming_the_flag() {
        for (flags, needle) in [
            (&["--write-rate", "5"][..], "--write-rate must be between"),
            (&["--baseline-ms", "0"], "--baseline-ms must be between"),
            (&["--catch-up-ms", "9999999"], "--catch-up-ms must be between"),
            (&["--after-ms", "9999999"], "--after-ms must be between"),
            (&["--budget-us", "10"], "--budget-us must be between"),
            (&["--streams", "0"], "--streams must be between"),
            (&["--connections", "65"], "--connections must be between"),
            (&["--files", "0"], "--files must be between"),
            (&["--chunk-len", "1"], "--chunk-len must be between"),
            (&["--shard-size", "4", "--files", "8"], "smaller than --files"),
        ] {
            let err = check_args(&parse(flags).unwrap()).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?}: {err}");
        }
        assert!(parse(&["--write-seconds", "3"]).is_err(), "the offline demo's flag is gone");
    }

    #[test]
    fn a_keep_folder_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("demo");
        let work = WorkDir::open(Some(&keep)).unwrap();
        assert!(work.keep && work.path.exists());
        fs::write(keep.join("x"), b"x").unwrap();
        drop(work);
        assert!(keep.join("x").exists(), "a kept folder stays");
        let err = WorkDir::open(Some(&keep)).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        let temp = WorkDir::open(None).unwrap();
        let path = temp.path.clone();
        drop(temp);
        assert!(!path.exists(), "a temporary work folder is removed");
    }
}
