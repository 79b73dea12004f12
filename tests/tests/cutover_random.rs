//! Randomized live migrations: 20 of them, each with its own shard size, write rate, share of
//! writes to the migrating vShard, NodeDB WAL header layout (A or B, given to the daemon as
//! such or left to auto-detection), chunk length, streams and budget, drawn from a seed that is
//! printed (set `FERRY_TEST_SEED` to replay one). Each runs base copy, WAL catch-up and the
//! reference coordinator's cut-over between two daemons of this process, with the reference
//! writer paused and resumed in-process, then the reference verifier counts every write of the
//! vShard across the staged export, the staged WAL and the target's node WAL.
//!
//! What it checks: 0 lost, 0 duplicated, 0 unexpected, staged files identical, the staged WAL
//! kept the source's layout (its manifest says so, and the reference reader finds it), no
//! write acknowledged while writes were paused, and the pause's parts add up to the pause.
//!
//! What it does not: time anything.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::time::Duration;

use ferry_engine::cli::coordinator::{cut_over, CutOverOptions, RefWrites};
use ferry_engine::control::ControlClient;
use ferry_refnode::{
    export_base, generate_bulk, read_wal_folder, verify, FolderKind, RecordLayout, RefWriter, RefWriterConfig,
    VerifyInput,
};
use ferry_tests::{manifest_json, node_pair, wait_for_phase, wait_for_writes, Certs};
use ferry_wire::api::{Phase, StartParams};
use ferry_wire::wal::Layout;
use ferry_wire::{MigrationId, VShardId};
use serde_json::json;

const MIGRATIONS_COUNT: u64 = 20;
/// A generous deadline for each wait; none is expected to come near it.
const WAIT: Duration = Duration::from_secs(60);

/// xorshift64*: the test's only source of randomness, from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

async fn one(certs: &Certs, dir: &Path, rng: &mut Rng, index: u64) -> String {
    let (source, target) = node_pair(certs, dir).await;
    let vshard = VShardId(rng.pick(&[1, 7, 42]));
    let mut writer_config = RefWriterConfig::new(dir.join("wal"), vshard);
    writer_config.rate_writes_per_sec = rng.pick(&[500, 2_000, 8_000]);
    writer_config.migrating_every = rng.pick(&[1, 2, 4, 8]);
    writer_config.roll_size_bytes = rng.pick(&[64 << 10, 1 << 20]);
    let shard_bytes = rng.pick(&[0u64, 100_000, 3 << 20]);
    let chunk_len: u32 = rng.pick(&[64 << 10, 256 << 10, 1 << 20]);
    let streams: u32 = rng.pick(&[1, 2, 4]);
    let budget_us: u64 = rng.pick(&[200_000, 500_000, 2_000_000]);
    let head_start_ms = rng.pick(&[0, 100, 300]);
    writer_config.layout = rng.pick(&[Layout::A, Layout::B]);
    let wal_layout =
        if rng.pick(&[true, false]) { "auto".to_owned() } else { writer_config.layout.name().to_lowercase() };
    let shape = format!(
        "#{index}: vshard {vshard}, layout {} (wal_layout {wal_layout}), {} writes/s 1 in {}, roll {} B, shard {shard_bytes} B, chunk {chunk_len}, {streams} streams, budget {budget_us} us",
        writer_config.layout.name(),
        writer_config.rate_writes_per_sec,
        writer_config.migrating_every,
        writer_config.roll_size_bytes
    );
    let layout = writer_config.layout;
    let rate_writes_per_sec = writer_config.rate_writes_per_sec;
    let writer = RefWriter::start(writer_config).unwrap();
    // The head start: that many ms of writes before the base export.
    wait_for_writes(&writer, rate_writes_per_sec * head_start_ms / 1_000, WAIT).await.unwrap();
    let base_lsn = writer.acked_lsn();
    let root = dir.join("export-root");
    export_base(&root, vshard, base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
    if shard_bytes > 0 {
        generate_bulk(&root, shard_bytes, 3).unwrap();
    }
    let id = MigrationId::new(format!("rand-{index}")).unwrap();
    let params: StartParams = serde_json::from_value(json!({
        "migration_id": id.as_str(), "vshard_id": vshard.0, "segments_root": root, "wal_dir": dir.join("wal"),
        "base_lsn": base_lsn.0, "target_address": target.quic_addr.to_string(), "target_node_id": "target",
        "write_pause_budget_us": budget_us, "chunk_len_bytes": chunk_len, "streams": streams,
        "wal_layout": wal_layout,
    }))
    .unwrap();
    let mut client = ControlClient::connect(source.socket()).await.unwrap();
    client.start(&params).await.unwrap();
    wait_for_phase(&mut client, &id, Phase::WalCatchUp, WAIT).await.unwrap_or_else(|e| panic!("{shape}: {e:#}"));
    // Drawn, not a wait for an event: the cut-over starts right at the catch-up or a while later.
    tokio::time::sleep(Duration::from_millis(rng.pick(&[0, 50, 200]))).await;
    let node_wal = dir.join("target/node-wal");
    let outcome = cut_over(
        &mut client,
        &id,
        &mut RefWrites { writer: &writer, target_node_wal: Some(&node_wal) },
        CutOverOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{shape}: {e:#}"));
    let pause = outcome.release.pause;
    assert_eq!(pause.breakdown.total_us(), pause.pause_duration_us, "{shape}");
    // Writes on the target node (50 ms of them).
    wait_for_writes(&writer, rate_writes_per_sec / 20, WAIT).await.unwrap();
    let log = writer.stop().unwrap();
    let staging_dir = dir.join("target/migrations").join(id.as_str());
    let verification = verify(&VerifyInput {
        log: &log,
        base_lsn,
        final_lsn: ferry_wire::Lsn(outcome.release.final_lsn),
        staging_dir: &staging_dir,
        source_segments_root: &root,
        target_node_wal_dir: Some(&node_wal),
    });
    assert!(verification.passed(), "{shape}: {verification:?}");
    // The staged WAL keeps the source's layout: in the manifest, and as the reader finds it.
    let manifest = manifest_json(&dir.join("target"), id.as_str()).unwrap();
    let staged_layouts: Vec<&str> =
        manifest["wal_segments"].as_array().unwrap().iter().map(|s| s["layout"].as_str().unwrap()).collect();
    assert!(staged_layouts.iter().all(|l| *l == layout.name()), "{shape}: {staged_layouts:?}");
    let expected_layout = if layout == Layout::B { RecordLayout::B } else { RecordLayout::A };
    let mut staged_count = 0u64;
    if !staged_layouts.is_empty() {
        read_wal_folder(&staging_dir.join("wal"), FolderKind::Staged, |r| {
            assert_eq!(r.layout, expected_layout, "{shape}: {} offset {}", r.segment, r.offset_bytes);
            staged_count += 1;
        })
        .unwrap();
    }
    assert_eq!(staged_count, verification.from_staged_wal_count, "{shape}");
    for span in log.pauses() {
        let resumed = span.resumed_at_ns.unwrap_or(u64::MAX);
        assert_eq!(log.acks_between(span.paused_at_ns, resumed), 0, "{shape}: {span:?}");
    }
    source.shutdown().await;
    target.shutdown().await;
    format!(
        "{shape}: {} writes of the vShard ({} staged WAL records), pause {} us, {} fences retried",
        verification.expected_count,
        staged_count,
        pause.pause_duration_us,
        outcome.failed_fences.len()
    )
}

#[test]
fn twenty_randomized_live_migrations_lose_and_duplicate_nothing() {
    let seed = std::env::var("FERRY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("FERRY_TEST_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for index in 0..MIGRATIONS_COUNT {
        let dir = tempfile::tempdir().unwrap();
        let line = runtime.block_on(one(&certs, dir.path(), &mut rng, index));
        eprintln!("{line}");
    }
}
