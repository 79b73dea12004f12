//! Exact counts per window of one live migration: the reference writer runs from before the
//! base export to after the cut-over, and every write of the migrating vShard is put in the
//! window of the migration it was acknowledged in, from the writer's own CLOCK_MONOTONIC ack
//! stamps (the clock the daemon reads):
//! - (a) before the base export: source LSN <= base_lsn, so it must be in the staged export;
//! - (b) the base copy: after base_lsn, until the status first shows `WalCatchUp` (the copy is
//!   made long by a rate-limited bulk file of tens of MiB);
//! - (c) the WAL tail: from `WalCatchUp` until the coordinator paused the writer, but (d);
//! - (d) right before the fence: the last [`LAST_BEFORE_FENCE_COUNT`] acks before the pause
//!   ticket's `paused_at_ns`;
//! - (e) after the routing flip, in the target's node WAL.
//!
//! What it checks: every window is non-empty ((b) and (c) hold hundreds of writes); the
//! reference verifier, reading the staged export, the staged WAL and the target's node WAL with
//! readers independent of the transfer code, finds every write of each window exactly once, in
//! the place the writer put it; nothing is acknowledged between `writes_paused_at_ns` and
//! `writes_resumed_at_ns`; the writer's own longest ack gap is at least the reported
//! `pause_duration_us`; the staging ends `released` at `final_lsn`.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test), or
//! check the pause's parts (cutover.rs and cutover_random.rs do).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_engine::cli::coordinator::{cut_over, CutOverOptions, RefWrites};
use ferry_engine::clock::monotonic_ns;
use ferry_engine::control::ControlClient;
use ferry_refnode::{
    export_base, generate_bulk, verify_counting, RefWriter, RefWriterConfig, ResumedOn, VerifyInput, WritePlace,
};
use ferry_tests::{manifest_json, node_pair, wait_for_phase, wait_for_status, wait_for_writes, Certs};
use ferry_wire::api::{Phase, StartParams};
use ferry_wire::{Lsn, MigrationId, VShardId};
use serde_json::json;

const VSHARD: VShardId = VShardId(7);
const WAIT: Duration = Duration::from_secs(120);
/// Window (d): this many of the vShard's acks right before the pause.
const LAST_BEFORE_FENCE_COUNT: usize = 50;
/// The base copy: 24 MiB at 12 MiB/s, about two seconds of writes in window (b).
const BULK_BYTES: u64 = 24 << 20;
const RATE_LIMIT_BYTES_PER_SEC: u64 = 12 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Window {
    BeforeExport,
    BaseCopy,
    WalTail,
    LastBeforeFence,
    AfterFlip,
}

impl Window {
    const ALL: [Window; 5] =
        [Window::BeforeExport, Window::BaseCopy, Window::WalTail, Window::LastBeforeFence, Window::AfterFlip];
}

#[test]
fn every_write_of_each_window_reaches_the_target_exactly_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::new().unwrap();
        let (source, target) = node_pair(&certs, dir.path()).await;
        let wal_dir = dir.path().join("wal");
        let writer_config = RefWriterConfig {
            rate_writes_per_sec: 8_000,
            migrating_every: 2,
            roll_size_bytes: 1 << 20,
            ..RefWriterConfig::new(&wal_dir, VSHARD)
        };
        let writer = RefWriter::start(writer_config).unwrap();

        // (a): writes before the export (300 ms of them).
        wait_for_writes(&writer, 2_400, WAIT).await.unwrap();
        let base_lsn = writer.acked_lsn();
        let root = dir.path().join("export-root");
        export_base(&root, VSHARD, base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
        generate_bulk(&root, BULK_BYTES, 6).unwrap();

        // (b): the base copy, rate-limited, with the tail streaming beside it.
        let id = MigrationId::new("windows").unwrap();
        let params: StartParams = serde_json::from_value(json!({
            "migration_id": id.as_str(), "vshard_id": VSHARD.0, "segments_root": root, "wal_dir": wal_dir,
            "base_lsn": base_lsn.0, "target_address": target.quic_addr.to_string(), "target_node_id": "target",
            "write_pause_budget_us": 2_000_000, "chunk_len_bytes": 64 << 10, "streams": 2,
            "rate_limit_bytes_per_sec": RATE_LIMIT_BYTES_PER_SEC,
        }))
        .unwrap();
        let mut client = ControlClient::connect(source.socket()).await.unwrap();
        client.start(&params).await.unwrap();
        let mut base_copy_seen = false;
        wait_for_status(&mut client, &id, "WalCatchUp", WAIT, |status| match status.phase {
            Phase::BaseCopy => {
                base_copy_seen = true;
                false
            }
            Phase::WalCatchUp => true,
            other => panic!("the migration is {other:?} before WalCatchUp: {status:?}"),
        })
        .await
        .unwrap();
        let catch_up_at_ns = monotonic_ns();
        assert!(base_copy_seen, "the status never showed BaseCopy");

        // (c) and (d): the WAL tail (800 ms of writes), then the reference coordinator's cut-over.
        wait_for_writes(&writer, 6_400, WAIT).await.unwrap();
        let node_wal = dir.path().join("target/node-wal");
        let outcome = cut_over(
            &mut client,
            &id,
            &mut RefWrites { writer: &writer, target_node_wal: Some(&node_wal) },
            CutOverOptions { catch_up_timeout: WAIT, ..CutOverOptions::default() },
        )
        .await
        .unwrap();
        // (e): writes on the target node (200 ms of them).
        wait_for_writes(&writer, 1_600, WAIT).await.unwrap();
        let log = writer.stop().unwrap();
        let final_lsn = Lsn(outcome.release.final_lsn);

        let flip = *log.pauses().iter().find(|p| p.resumed_on == Some(ResumedOn::Target)).unwrap();
        let resumed_at_ns = flip.resumed_at_ns.unwrap();
        assert_eq!(flip.last_acked_lsn, final_lsn, "final_lsn is the last ack before the pause");
        let pause_us = outcome.release.pause.pause_duration_us;
        assert_eq!(pause_us, (resumed_at_ns - flip.paused_at_ns) / 1_000, "the pause is the writer's stamps");
        assert_eq!(log.acks_between(flip.paused_at_ns, resumed_at_ns), 0, "an ack while writes were paused");
        let gap = log.longest_ack_gap().unwrap();
        assert!(gap.gap_ns / 1_000 >= pause_us, "the writer's longest ack gap {gap:?} < pause {pause_us} us");
        for span in log.pauses() {
            assert_eq!(log.acks_between(span.paused_at_ns, span.resumed_at_ns.unwrap_or(u64::MAX)), 0, "{span:?}");
        }

        // Each write of the vShard in its window.
        let migrating: Vec<_> = log.writes().filter(|w| w.vshard == VSHARD).collect();
        let before_pause: Vec<u64> =
            migrating.iter().filter(|w| w.ack_ns <= flip.paused_at_ns).map(|w| w.writer_seq).collect();
        let last_before_fence = &before_pause[before_pause.len().saturating_sub(LAST_BEFORE_FENCE_COUNT)..];
        let mut window_of = BTreeMap::new();
        for w in &migrating {
            let window = match w.place {
                WritePlace::Source(lsn) if lsn <= base_lsn => Window::BeforeExport,
                WritePlace::TargetNode(_) => Window::AfterFlip,
                WritePlace::Source(_) if last_before_fence.contains(&w.writer_seq) => Window::LastBeforeFence,
                WritePlace::Source(_) if w.ack_ns < catch_up_at_ns => Window::BaseCopy,
                WritePlace::Source(lsn) => {
                    assert!(lsn <= final_lsn && w.ack_ns <= flip.paused_at_ns, "{w:?} acked on the source after");
                    Window::WalTail
                }
            };
            window_of.insert(w.writer_seq, window);
        }

        let (verification, counts) = verify_counting(&VerifyInput {
            log: &log,
            base_lsn,
            final_lsn,
            staging_dir: &dir.path().join("target/migrations").join(id.as_str()),
            source_segments_root: &root,
            target_node_wal_dir: Some(&node_wal),
        });
        let mut per_window: BTreeMap<Window, (u64, u64)> = BTreeMap::new();
        for (seq, window) in &window_of {
            let (writes, once) = per_window.entry(*window).or_default();
            *writes += 1;
            if counts.get(seq) == Some(&1) {
                *once += 1;
            }
        }
        let line =
            format!("base_lsn {base_lsn}, final_lsn {final_lsn}, pause {pause_us} us, (writes, once): {per_window:?}");
        eprintln!("{line}");
        for window in Window::ALL {
            let (writes, once) = per_window.get(&window).copied().unwrap_or_default();
            assert!(writes > 0, "window {window:?} is empty: {line}");
            assert_eq!(once, writes, "window {window:?}: not every write found exactly once: {line}");
        }
        assert_eq!(per_window[&Window::LastBeforeFence].0, LAST_BEFORE_FENCE_COUNT as u64, "{line}");
        assert!(per_window[&Window::BaseCopy].0 >= 500, "the base copy was too short to mean much: {line}");
        assert!(per_window[&Window::WalTail].0 >= 200, "the tail was too short to mean much: {line}");
        assert_eq!(counts.len(), window_of.len());
        assert!(verification.passed(), "{line}: {verification:#?}");
        assert_eq!(
            verification.from_export_count,
            per_window[&Window::BeforeExport].0,
            "the export holds exactly window (a)"
        );
        assert_eq!(verification.from_node_wal_count, per_window[&Window::AfterFlip].0);

        let manifest = manifest_json(&dir.path().join("target"), id.as_str()).unwrap();
        assert_eq!(manifest["state"], "released", "{manifest}");
        assert_eq!(manifest["final_lsn"], final_lsn.0, "{manifest}");
        wait_for_phase(&mut client, &id, Phase::Completed, WAIT).await.unwrap();
        source.shutdown().await;
        target.shutdown().await;
    });
}
