//! `fio` as the baseline of the O_DIRECT read rate: the same file, queue depth and block size.
//!
//! What it does: finds `fio` on PATH ([`find`]), builds the command line the hardware test and
//! the bench run ([`command`]: `--ioengine=io_uring --direct=1 --rw=read`), runs it and parses
//! its JSON report ([`parse`]) into the bytes it read and its rate.
//!
//! What it does not: install fio, or judge the ratio (callers print it against the 0.9 goal).
//!
//! Invariants: a report that lacks a field or says a job failed is an error naming it; fio's
//! notes before the JSON (it prints some on stdout) are skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use serde_json::Value;

use crate::nvme::direct::ReadShape;

/// What one fio job read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FioRead {
    /// `fio version`, e.g. `fio-3.33`.
    pub version: String,
    pub io_bytes: u64,
    /// fio's `bw_bytes`: bytes per second over the job's runtime.
    pub bytes_per_sec: u64,
    pub runtime_ms: u64,
}

/// `fio` on PATH, if there is one.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("fio")).find(|candidate| candidate.is_file())
}

/// How fio gets its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FioBuffers {
    /// fio's default: plain io_uring READs.
    Plain,
    /// `--fixedbufs=1`: buffers registered with the ring, READ_FIXED, like the hardware test's loop.
    Registered,
}

/// The fio command reading all of `file` (`size_bytes`) at `shape`'s queue depth and block size.
pub fn command(fio: &Path, file: &Path, size_bytes: u64, shape: ReadShape, buffers: FioBuffers) -> Command {
    let mut command = Command::new(fio);
    command
        .arg("--name=ferry-hw-read")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size_bytes}"))
        .args(["--ioengine=io_uring", "--direct=1", "--rw=read"])
        .arg(format!("--bs={}", shape.block_len_bytes))
        .arg(format!("--iodepth={}", shape.queue_depth))
        .arg("--output-format=json");
    if buffers == FioBuffers::Registered {
        command.arg("--fixedbufs=1");
    }
    command
}

/// The command line of [`command`], for reports.
pub fn command_line(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs fio on `file` and parses its report.
pub fn run(fio: &Path, file: &Path, size_bytes: u64, shape: ReadShape, buffers: FioBuffers) -> anyhow::Result<FioRead> {
    let mut command = command(fio, file, size_bytes, shape, buffers);
    let out = command.output().with_context(|| format!("cannot run {}", fio.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({}): {}{}",
        command_line(&command),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        stdout.trim()
    );
    parse(&stdout).with_context(|| format!("the report of {}", command_line(&command)))
}

/// Parses fio's `--output-format=json` report of one read job.
pub fn parse(text: &str) -> anyhow::Result<FioRead> {
    let start = text.find('{').context("fio printed no JSON report")?;
    let report: Value = serde_json::from_str(text.get(start..).unwrap_or_default()).context("fio's JSON report")?;
    let version = report.get("fio version").and_then(Value::as_str).unwrap_or("fio (version unknown)").to_owned();
    let jobs = report.get("jobs").and_then(Value::as_array).context("fio's report has no jobs")?;
    anyhow::ensure!(jobs.len() == 1, "fio's report has {} jobs, expected one", jobs.len());
    let job = jobs.first().context("fio's report has no jobs")?;
    let error = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    anyhow::ensure!(error == 0, "fio's job failed with error {error}");
    let read = job.get("read").context("fio's job has no read section")?;
    let field =
        |name: &str| read.get(name).and_then(Value::as_u64).with_context(|| format!("fio's read has no {name}"));
    let parsed = FioRead {
        version,
        io_bytes: field("io_bytes")?,
        bytes_per_sec: field("bw_bytes")?,
        runtime_ms: field("runtime")?,
    };
    anyhow::ensure!(parsed.io_bytes > 0, "fio read nothing");
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A report captured from `fio-3.33` on this machine's disk (64 MiB, bs 1M, iodepth 8).
    const SAMPLE: &str = include_str!("../fixtures/fio-3.33-read.json");

    #[test]
    fn a_captured_report_parses() {
        let read = parse(SAMPLE).unwrap();
        assert_eq!(
            read,
            FioRead { version: "fio-3.33".into(), io_bytes: 67_108_864, bytes_per_sec: 1_137_438_372, runtime_ms: 59 }
        );
        // fio's notes on stdout before the report are skipped.
        let noted = format!("fio: note: both iodepth >= 1 and synchronous I/O engine are selected\n{SAMPLE}");
        assert_eq!(parse(&noted).unwrap(), read);
    }

    #[test]
    fn a_failed_or_truncated_report_is_an_error() {
        assert!(parse("fio: pid=1, err=22/file:filesetup.c").is_err());
        assert!(parse(&SAMPLE[..SAMPLE.len() / 2]).is_err());
        let failed = SAMPLE.replacen("\"error\" : 0", "\"error\" : 22", 1);
        assert!(format!("{:#}", parse(&failed).unwrap_err()).contains("error 22"));
        let nothing = SAMPLE.replacen("\"io_bytes\" : 67108864", "\"io_bytes\" : 0", 1);
        assert!(parse(&nothing).is_err());
        let no_jobs = r#"{"fio version": "fio-3.33", "jobs": []}"#;
        assert!(parse(no_jobs).is_err());
    }

    #[test]
    fn the_command_reads_with_io_uring_and_o_direct_at_the_shape() {
        let shape = ReadShape { queue_depth: 32, block_len_bytes: 131_072 };
        let line = command_line(&command(Path::new("fio"), Path::new("/mnt/f.bin"), 1 << 30, shape, FioBuffers::Plain));
        assert_eq!(
            line,
            "fio --name=ferry-hw-read --filename=/mnt/f.bin --size=1073741824 --ioengine=io_uring --direct=1 \
             --rw=read --bs=131072 --iodepth=32 --output-format=json"
        );
        let fixed = command_line(&command(Path::new("fio"), Path::new("/f"), 4096, shape, FioBuffers::Registered));
        assert!(fixed.ends_with("--output-format=json --fixedbufs=1"), "{fixed}");
    }
}
