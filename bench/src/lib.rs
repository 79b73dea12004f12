//! ferry-bench: the pieces the base-copy benchmarks (issue 3) are built from.
//!
//! What it does: generates a shard of random-ish files ([`shard`]), makes development
//! certificates ([`certs`]), and runs one base copy of that shard with each contender, timing
//! it the same way (wall clock from before the connection is opened until the receiver has
//! every byte):
//! - [`ferry_copy`]: ferry's own source and target in this process, staging through
//!   `DiskStorage` on the folder the caller names (tmpfs or disk);
//! - [`raw_quinn`]: the raw quinn baselines (static 1 MiB `Bytes` written with `write_chunk`,
//!   a receiver that discards, ferry's rustls provider and cipher suite): quinn's defaults on
//!   one stream, or ferry's exact endpoint settings and connection and stream counts;
//! - [`tls_tcp`]: rustls (ferry's configs, AES-128-GCM) over one TCP connection, 1 MiB writes;
//! - [`dd`]: `dd conv=fsync` of the shard to the staging disk;
//! - [`curve`]: throughput against file size, with its same-run ceilings, drawn as an SVG;
//! - [`tcp`]: a plain TCP copy on loopback that lands the files on the staging file system;
//! - [`scp`]: `scp`, and `tar | ssh` for small files, against a throwaway OpenSSH server on
//!   127.0.0.1, when one can be started;
//! - [`interference`]: the reference writer in a process of its own, and its ack latency per
//!   time window (issue 21's interference benchmark);
//! - [`daemons`]: `ferry serve` and `ferry copy` as separate processes, with [`procstat`]
//!   sampling each one's memory and CPU time;
//! - [`hw`]: the hardware benches' baselines (`ib_write_bw`, the link's rate, one core's
//!   CRC32C rate); the benches themselves share `ferry_hwtests`' O_DIRECT loop, fio runner and
//!   RDMA daemons.
//!
//! What it does not: assert on speed. Benchmarks measure and print ratios against baselines
//! measured in the same run; nothing here fails because a number is low.
//!
//! Invariants: every temporary file lives in a `tempfile::TempDir` (or a folder the run
//! removes), so a finished or failed run leaves nothing behind; every child process it
//! starts is killed and reaped when its handle drops.

pub mod certs;
pub mod curve;
pub mod daemons;
pub mod dd;
pub mod ferry_copy;
pub mod hw;
pub mod interference;
pub mod procstat;
pub mod raw_quinn;
pub mod scp;
pub mod shard;
pub mod tcp;
pub mod tls_tcp;
pub mod wal;

use std::time::Duration;

/// One timed copy: how many bytes arrived and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunResult {
    pub bytes_total: u64,
    pub elapsed: Duration,
}

impl RunResult {
    /// Bytes per second (0 for an empty run).
    pub fn bytes_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.bytes_total as f64 / secs
        }
    }
}

/// Parses a size such as `1GiB`, `256MiB`, `4096`, `512KiB`, `2G` (binary units throughout).
pub fn parse_size_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| anyhow::anyhow!("{text:?} is not a size such as 1GiB or 256MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => anyhow::bail!("unknown size unit {other:?} in {text:?}: use KiB, MiB, GiB or TiB"),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| anyhow::anyhow!("size {text:?} does not fit in 64 bits"))
}

/// Formats a byte count with a binary unit, for tables.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("B"))
}

/// The file system type of `path` as `stat -f` names it (`tmpfs`, `ext2/ext3`, `xfs`, ...).
pub fn fs_type(path: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("stat").arg("-f").arg("-c").arg("%T").arg(path).output()?;
    anyhow::ensure!(
        out.status.success(),
        "stat -f {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size_bytes("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_size_bytes("4g").unwrap(), 4 << 30);
        assert!(parse_size_bytes("1 parsec").is_err());
        assert!(parse_size_bytes("GiB").is_err());
        assert!(parse_size_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn rates_are_bytes_over_seconds() {
        let run = RunResult { bytes_total: 1000, elapsed: Duration::from_millis(500) };
        assert!((run.bytes_per_sec() - 2000.0).abs() < 1e-9);
        assert_eq!(RunResult { bytes_total: 5, elapsed: Duration::ZERO }.bytes_per_sec(), 0.0);
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
    }
}
