//! `ferry migrate` as a live reference coordinator: the `ferry` binary drives two daemons (run
//! in this process) through a whole live migration, pausing and resuming the reference writer
//! with shell commands (`--pause-cmd`, `--resume-cmd`, `--resume-source-cmd`) that talk to it
//! through marker files.
//!
//! What it checks: the command exits 0 with a JSON report whose pause parts add up to the
//! pause; the staging is released; the reference verifier (readers independent of the transfer
//! code) finds every write of the vShard exactly once across the export, the staged WAL and the
//! target's node WAL, and no write was acknowledged while writes were paused.
//!
//! What it does not: time anything (every wait is a generous deadline).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_refnode::{export_base, verify, RefWriter, RefWriterConfig, VerifyInput};
use ferry_tests::{ferry_bin, node_pair, wait_for_writes_blocking, Certs};
use ferry_wire::{Lsn, VShardId};
use serde_json::Value;

const VSHARD: VShardId = VShardId(7);
/// A generous deadline for each wait; none is expected to come near it.
const WAIT: Duration = Duration::from_secs(60);

/// Serves the marker files the shell commands leave: `pause` -> park the writer and write its
/// last acknowledged LSN to `paused`; `resume-target` / `resume-source` -> resume it there and
/// remove the marker (the command waits for that).
fn serve_markers(dir: PathBuf, writer: Arc<RefWriter>, node_wal: PathBuf, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        if dir.join("pause").exists() && !dir.join("paused").exists() {
            let ticket = writer.pause().unwrap();
            std::fs::write(dir.join("paused.tmp"), format!("{}\n", ticket.last_acked_lsn.0)).unwrap();
            std::fs::rename(dir.join("paused.tmp"), dir.join("paused")).unwrap();
        }
        if dir.join("resume-target").exists() {
            writer.resume_on_target(&node_wal).unwrap();
            for name in ["pause", "paused", "resume-target"] {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        if dir.join("resume-source").exists() {
            writer.resume_on_source();
            for name in ["pause", "paused", "resume-source"] {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        // The marker server's own poll, serving until stopped: the shell commands' side of
        // the protocol, not a wait in the test.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn ferry_migrate_runs_a_live_migration_with_the_cut_over_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (source, target) = runtime.block_on(async {
        let (source, target) = node_pair(&certs, dir.path()).await;
        (source, target)
    });

    let wal_dir = dir.path().join("wal");
    let mut writer_config = RefWriterConfig::new(&wal_dir, VSHARD);
    writer_config.rate_writes_per_sec = 5_000;
    let writer = Arc::new(RefWriter::start(writer_config).unwrap());
    // Writes before the base export (300 ms of them).
    wait_for_writes_blocking(&writer, 1_500, WAIT).unwrap();
    let base_lsn = writer.acked_lsn();
    let root = dir.path().join("export-root");
    export_base(&root, VSHARD, base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();

    let markers = dir.path().join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let node_wal = dir.path().join("target/node-wal");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (markers, writer, node_wal, stop) = (markers.clone(), writer.clone(), node_wal.clone(), stop.clone());
        std::thread::spawn(move || serve_markers(markers, writer, node_wal, stop))
    };
    let m = markers.display();
    let pause_cmd = format!("touch {m}/pause && while [ ! -e {m}/paused ]; do sleep 0.002; done && cat {m}/paused");
    let resume =
        |side: &str| format!("touch {m}/resume-{side} && while [ -e {m}/resume-{side} ]; do sleep 0.002; done");

    // Built (if it must be) before the clock starts: the bound is on the migration, not the build.
    let ferry = ferry_bin();
    let started = Instant::now();
    let output = Command::new(ferry)
        .args(["migrate", "--json", "--socket"])
        .arg(source.socket())
        .args(["--vshard", "7", "--base-lsn", &base_lsn.0.to_string(), "--migration-id", "cli-live"])
        .arg("--segments-root")
        .arg(&root)
        .arg("--wal-dir")
        .arg(&wal_dir)
        .args(["--target", &target.quic_addr.to_string(), "--target-node", "target", "--chunk-len", "65536"])
        .args(["--pause-cmd", &pause_cmd, "--resume-cmd", &resume("target"), "--resume-source-cmd", &resume("source")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ferry migrate failed: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(120));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(report["status"]["phase"], "Completed", "{report}");
    let pause = &report["cut_over"]["release"]["pause"];
    let parts: u64 = ["before_fence_us", "drain_us", "target_durable_us", "apply_wait_us", "after_fence_us"]
        .iter()
        .map(|k| pause["breakdown"][k].as_u64().unwrap())
        .sum();
    assert_eq!(parts, pause["pause_duration_us"].as_u64().unwrap(), "{report}");
    let final_lsn = Lsn(report["cut_over"]["release"]["final_lsn"].as_u64().unwrap());

    // The writer keeps writing the vShard on the target a moment (200 ms of writes), then
    // everything is counted.
    wait_for_writes_blocking(&writer, 1_000, WAIT).unwrap();
    stop.store(true, Ordering::Release);
    watcher.join().unwrap();
    let writer = Arc::try_unwrap(writer).unwrap_or_else(|_| panic!("the writer is still shared"));
    let log = writer.stop().unwrap();
    let staging = dir.path().join("target/migrations/cli-live");
    let verification = verify(&VerifyInput {
        log: &log,
        base_lsn,
        final_lsn,
        staging_dir: &staging,
        source_segments_root: &root,
        target_node_wal_dir: Some(&node_wal),
    });
    assert!(verification.passed(), "{verification:?}");
    assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0));
    assert!(verification.from_staged_wal_count > 0 && verification.from_node_wal_count > 0, "{verification:?}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["state"], "released");
    for span in log.pauses() {
        let resumed_at_ns = span.resumed_at_ns.unwrap();
        assert_eq!(log.acks_between(span.paused_at_ns, resumed_at_ns), 0, "{span:?}");
    }
    runtime.block_on(async {
        source.shutdown().await;
        target.shutdown().await;
    });
}
