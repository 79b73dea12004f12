//! ferry's base copy with source and target in this process.
//!
//! What it does: starts a target ([`ferry_engine::transfer::target::serve`] with
//! [`DiskStorage`], ferry's default [`QuicTuning`]) on a loopback port, staging into a fresh
//! folder under the staging parent the caller names (tmpfs or disk), runs
//! [`ferry_engine::transfer::source::copy`] of the whole shard with the `mmap` reader, commits,
//! checks the staged files' sizes, and removes the staging and the source's snapshot links.
//!
//! What it does not: checksum the staged bytes itself (ferry's per-chunk and per-file CRC32C
//! already did, or the copy failed); its tests compare bytes.
//!
//! Timing: from before the source snapshots and connects until it has the target's
//! `Committed` (which follows every file's fsync and the manifest's): the same span as
//! `CopyReport::elapsed_us`, measured from outside.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ferry_engine::quic::QuicTuning;
use ferry_engine::read::ReadMode;
use ferry_engine::snapshot::Snapshot;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, VShardId};
use tokio::sync::watch;

use crate::certs::{node, BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::shard::Shard;
use crate::RunResult;

/// How one ferry copy is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FerryShape {
    pub chunk_len_bytes: u32,
    pub streams_count: u32,
    /// QUIC connections of the copy (each on its own endpoint).
    pub connections_count: u32,
    /// Path MTU discovery's upper bound on both sides (ferry's default:
    /// [`ferry_engine::quic::MTU_UPPER_BOUND_DEFAULT_BYTES`]; quinn's: 1452).
    pub mtu_upper_bound_bytes: u16,
}

impl Default for FerryShape {
    /// `ferry copy`'s defaults.
    fn default() -> Self {
        Self {
            chunk_len_bytes: ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES,
            streams_count: 4,
            connections_count: 1,
            mtu_upper_bound_bytes: ferry_engine::quic::MTU_UPPER_BOUND_DEFAULT_BYTES,
        }
    }
}

/// Copies `shard` with ferry into a new staging folder under `staging_parent`, then removes it.
pub async fn ferry_copy(
    certs: &BenchCerts,
    shard: &Shard,
    staging_parent: &Path,
    migration_id: &str,
    shape: FerryShape,
) -> anyhow::Result<(RunResult, CopyReport)> {
    let data_dir = tempfile::Builder::new()
        .prefix("ferry-bench-staging-")
        .tempdir_in(staging_parent)
        .with_context(|| format!("cannot make a staging folder in {}", staging_parent.display()))?;
    let tuning = QuicTuning { mtu_upper_bound_bytes: shape.mtu_upper_bound_bytes, ..QuicTuning::default() };
    let server_crypto = ferry_engine::tls::server_crypto(&certs.identity(TARGET_NODE)?, &[node(SOURCE_NODE)?])?;
    let endpoint = ferry_engine::quic::server_endpoint("127.0.0.1:0".parse()?, server_crypto, &tuning)?;
    let addr = endpoint.local_addr()?;
    let ctx = Arc::new(TargetContext::new(node(TARGET_NODE)?, data_dir.path().to_path_buf(), Arc::new(DiskStorage)));
    let server = tokio::spawn(target::serve(endpoint.clone(), ctx));

    let migration_id = MigrationId::new(migration_id)?;
    let request = CopyRequest {
        migration_id: migration_id.clone(),
        vshard_id: VShardId(1),
        base_lsn: Lsn(0),
        segments_root: shard.root.clone(),
        files: None,
        db_meta: serde_json::Value::Null,
        target_addr: addr,
        target_node: node(TARGET_NODE)?,
        chunk_len_bytes: shape.chunk_len_bytes,
        streams_count: shape.streams_count,
        connections_count: shape.connections_count,
        rate_limit_bytes_per_sec: 0,
        read_mode: ReadMode::Mmap,
        commit: true,
        wal: None,
        cutover: None,
        retry: ferry_wire::retry::RetryPolicy::default(),
    };
    let identity = certs.identity(SOURCE_NODE)?;
    let (progress, _progress_rx) = watch::channel(Progress::default());
    let rate = RateHandle::new(0, u64::from(shape.chunk_len_bytes));
    let started = Instant::now();
    let result = source::copy(&identity, &tuning, request, progress, rate).await;
    let elapsed = started.elapsed();
    endpoint.close(0u32.into(), b"bench over");
    server.abort();
    let removed = Snapshot::remove(&shard.root, &migration_id);
    let report = result.context("ferry's copy failed")?;
    removed?;
    anyhow::ensure!(report.committed, "ferry's copy finished without committing the staging");
    let staged = data_dir.path().join("migrations").join(migration_id.as_str()).join("segments");
    check_sizes(shard, &staged)?;
    Ok((RunResult { bytes_total: report.bytes_total, elapsed }, report))
}

/// Every shard file is staged under `staged` with its size.
pub fn check_sizes(shard: &Shard, staged: &Path) -> anyhow::Result<()> {
    for file in &shard.files {
        let path = staged.join(&file.rel);
        let len = std::fs::metadata(&path).with_context(|| format!("{} was not staged", path.display()))?.len();
        anyhow::ensure!(
            len == file.size_bytes,
            "{} is {len} bytes staged, {} at the source",
            file.rel,
            file.size_bytes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_small_shard_is_staged_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let shard = Shard::generate(dir.path(), (3 << 20) + 99, 3, 4).unwrap();
        let certs = BenchCerts::new().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let shape = FerryShape { chunk_len_bytes: 1 << 20, streams_count: 2, ..FerryShape::default() };
        let (run, report) = runtime.block_on(ferry_copy(&certs, &shard, &staging, "bench-test", shape)).unwrap();
        assert_eq!(run.bytes_total, shard.size_bytes);
        assert_eq!(report.files_count, 3);
        // Staging and snapshot links are gone afterwards.
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
        assert!(!Snapshot::dir_of(&shard.root, &MigrationId::new("bench-test").unwrap()).exists());
    }
}
