//! `dd conv=fsync` of a shard's files: what the staging disk itself takes to land the bytes.
//!
//! What it does: runs `dd if=<file> of=<target>/<file> bs=1M conv=fsync` for every shard
//! file, one after the other, into a fresh folder on the staging file system, and times the
//! whole. `conv=fsync` makes each `dd` fsync its output before it exits, as ferry fsyncs each
//! staged file before the MANIFEST names it.
//!
//! What it does not: fsync the folder, use direct I/O, or send anything over a network.
//!
//! Timing: from before the first `dd` starts until the last one has exited.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

use crate::shard::Shard;
use crate::RunResult;

/// Copies every file of `shard` into `target_dir` (created, with the shard's sub-folders) with
/// `dd bs=1M conv=fsync`.
pub fn dd_fsync_copy(shard: &Shard, target_dir: &Path) -> anyhow::Result<RunResult> {
    for file in &shard.files {
        if let Some(parent) = target_dir.join(&file.rel).parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let started = Instant::now();
    for file in &shard.files {
        let out = Command::new("dd")
            .arg(format!("if={}", file.path.display()))
            .arg(format!("of={}", target_dir.join(&file.rel).display()))
            .args(["bs=1M", "conv=fsync", "status=none"])
            .stdin(Stdio::null())
            .output()
            .context("cannot run dd")?;
        anyhow::ensure!(out.status.success(), "dd failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let elapsed = started.elapsed();
    crate::ferry_copy::check_sizes(shard, target_dir)?;
    Ok(RunResult { bytes_total: shard.size_bytes, elapsed })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dd_lands_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let shard = Shard::generate(dir.path(), (1 << 20) + 3, 2, 5).unwrap();
        let out = dir.path().join("out");
        let run = dd_fsync_copy(&shard, &out).unwrap();
        assert_eq!(run.bytes_total, shard.size_bytes);
        for file in &shard.files {
            assert_eq!(std::fs::read(out.join(&file.rel)).unwrap(), std::fs::read(&file.path).unwrap());
        }
    }
}
