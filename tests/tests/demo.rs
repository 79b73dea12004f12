//! `ferry demo` as a user runs it: the real binary, its JSON and text reports, its exit codes.
//! Each run is small (a shard of a few MiB, a reference writer at 5,000 writes/s, phases of a
//! few hundred ms) but whole: two daemons in the process, a live base copy and WAL catch-up
//! through the source daemon's control socket, the cut-over fence with the writer paused
//! in-process, writes resumed on the target, and the verification.
//!
//! What it checks: what a user would read in the report (nothing lost or duplicated, files
//! identical, a pause whose parts add up, no ack while paused, the writer's gap covering the
//! pause), what `--keep` leaves, and that bad arguments are refused clearly. It asserts no
//! speed.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use ferry_tests::{ferry_bin, tree_sha256};
use serde_json::Value;

/// A small live run: 5,000 writes/s, a quarter to vShard 7, short phases.
const SMALL: [&str; 8] = ["--write-rate", "5000", "--baseline-ms", "300", "--catch-up-ms", "300", "--after-ms", "300"];

fn demo(args: &[&str]) -> Output {
    // The daemons' info lines would only clutter a failure's stderr.
    Command::new(ferry_bin()).arg("demo").args(args).env("FERRY_LOG", "warn").output().unwrap()
}

fn small_demo(args: &[&str]) -> Output {
    let mut all = SMALL.to_vec();
    all.extend_from_slice(args);
    demo(&all)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{}\nstdout:\n{}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}", text(&out.stdout)))
}

fn u(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn a_live_run_reports_copy_catch_up_pause_and_a_clean_verification() {
    let report = json_of(&small_demo(&["--shard-size", "8MiB", "--files", "3", "--json"]));
    assert_eq!(report["mode"], "live_cut_over");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]));

    // The base: the export of vShard 7's writes up to base_lsn plus 3 bulk files, 8 MiB in all.
    let base = &report["base_copy"];
    assert_eq!(u(&base["bytes"]), 8 << 20);
    assert_eq!(u(&base["files"]), 4);
    assert_eq!(u(&base["bytes_resent"]), 0);
    assert!(u(&base["throughput_bytes_per_sec"]) > 0 && u(&base["elapsed_us"]) > 0);
    let base_lsn = u(&base["base_lsn"]);
    assert!(base_lsn > 0, "the writer ran before the migration");
    assert!(report["shard"]["generate_elapsed_us"].is_u64(), "generation is timed apart");

    // The catch-up ran from base_lsn + 1 to the fence's final_lsn.
    let catch_up = &report["catch_up"];
    assert_eq!(u(&catch_up["start_lsn"]), base_lsn + 1);
    let final_lsn = u(&catch_up["final_lsn"]);
    assert!(final_lsn > base_lsn);
    assert!(u(&catch_up["records"]) > 0);
    assert!(u(&catch_up["duration_us"]) >= 300_000);

    // The pause: measured, its parts add up exactly, admitted with an estimate.
    let pause = &report["pause"];
    let pause_us = u(&pause["pause_duration_us"]);
    assert!(pause_us > 0);
    let parts: u64 = ["before_fence_us", "drain_us", "target_durable_us", "apply_wait_us", "after_fence_us"]
        .iter()
        .map(|part| u(&pause[part]))
        .sum();
    assert_eq!(parts, pause_us, "{pause}");
    assert!(u(&pause["estimate_us"]) > 0);
    assert_eq!(u(&pause["budget_us"]), 500_000);
    assert_eq!(u(&pause["final_lsn"]), final_lsn);
    assert_eq!(u(&pause["writer_measured_pause_us"]), pause_us, "the daemon's pause is the writer's own");

    // The writer: nothing acknowledged while paused, its gap covers the pause, latencies
    // measured with and without the migration in the same run.
    let writer = &report["writer"];
    assert_eq!(u(&writer["acks_during_pause_count"]), 0);
    assert!(u(&writer["longest_ack_gap_us"]) >= pause_us, "{writer}");
    assert!(u(&writer["ack_gap_across_pause_us"]) >= pause_us, "{writer}");
    assert!(writer["ack_p99_us_without_migration"].is_u64(), "{writer}");
    assert!(writer["ack_p99_us_during_copy"].is_u64(), "{writer}");
    // Issue 21's figure, the copy's p99 over the baseline's, in the same report.
    let (copy, base) = (u(&writer["ack_p99_us_during_copy"]) as f64, u(&writer["ack_p99_us_without_migration"]) as f64);
    let ratio = writer["ack_p99_ratio_copy_over_without_migration"].as_f64().unwrap_or(-1.0);
    assert!(base == 0.0 || (ratio - copy / base).abs() <= 0.006, "{ratio} against {copy} / {base}: {writer}");
    assert!(u(&writer["target_node_wal_writes"]) > 0, "the writer wrote vShard 7 to the target after the release");
    assert_eq!(u(&writer["rate_writes_per_sec_requested"]), 5000);

    let v = &report["verification"];
    assert_eq!(u(&v["lost_count"]), 0, "{v:#}");
    assert_eq!(u(&v["duplicate_count"]), 0, "{v:#}");
    assert_eq!(u(&v["unexpected_count"]), 0, "{v:#}");
    assert_eq!(v["segments_identical"], true);
    assert_eq!(v["manifest_state"], "released");
    assert_eq!(u(&v["manifest_final_lsn"]), final_lsn);
    assert_eq!(v["source_phase"], "Completed");
    assert_eq!(u(&v["expected_count"]), u(&writer["vshard_writes"]));
    let found = u(&v["from_export_count"]) + u(&v["from_staged_wal_count"]) + u(&v["from_node_wal_count"]);
    assert_eq!(found, u(&v["expected_count"]), "every vShard-7 write found once across the three places");
    assert_eq!(v["problems"], serde_json::json!([]));

    let work = report["work_dir"].as_str().unwrap();
    assert!(!Path::new(work).exists(), "{work} was left behind");
}

#[test]
fn the_text_report_and_the_progress_lines_tell_the_story() {
    let out = small_demo(&["--shard-size", "256KiB", "--files", "2"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stderr:\n{stderr}\nstdout:\n{stdout}");
    for needle in [
        "LIVE migration of vShard 7 from demo-source to demo-target",
        "cut over with the fence",
        "262144 bytes (256.0 KiB), 3 files",
        "acks while paused: 0",
        "lost 0, duplicated 0, unexpected 0",
        "identical to the source",
        "MANIFEST.json released at final_lsn",
        "source Completed",
        "result        PASSED",
        "not done      nothing imports the staging",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from:\n{stdout}");
    }
    for needle in ["base copy     [", "wal catch-up  lag", "cut-over      released at final_lsn", "writes paused"] {
        assert!(stderr.contains(needle), "{needle:?} missing from stderr:\n{stderr}");
    }
    assert!(!stdout.contains("NOT_IMPLEMENTED") && !stdout.contains("OFFLINE"), "{stdout}");

    let help = text(&Command::new(ferry_bin()).args(["demo", "--help"]).output().unwrap().stdout);
    for needle in ["What runs:", "cut-over fence", "--write-rate", "--shard-size", "--keep", "--json", "Not done:"] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

#[test]
fn keep_leaves_the_staging_the_source_and_the_target_node_wal() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let keep_arg = keep.to_str().unwrap();
    let report = json_of(&small_demo(&[
        "--shard-size",
        "1MiB",
        "--files",
        "5",
        "--chunk-len",
        "65536",
        "--keep",
        keep_arg,
        "--json",
    ]));
    assert_eq!(report["work_dir_kept"], true);
    let final_lsn = u(&report["pause"]["final_lsn"]);

    let source = tree_sha256(&keep.join("source/segments")).unwrap();
    assert_eq!(source.len(), 6, "5 bulk files and one export file: {source:?}");
    assert!(source.keys().any(|k| k.starts_with("export/vshard-7-part-")), "{source:?}");
    let staging = keep.join("target/data/migrations/demo-vshard-7");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), source);
    let manifest: Value = serde_json::from_slice(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["state"], "released");
    assert_eq!(u(&manifest["final_lsn"]), final_lsn);
    assert_eq!(manifest["vshard_id"], 7);
    assert!(!manifest["wal_segments"].as_array().unwrap().is_empty());
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    assert!(names(&staging.join("wal")).iter().any(|n| n.starts_with("wal-")));
    assert!(names(&keep.join("target/data/node-wal")).contains(&"wal-00000000000000000001.seg".to_owned()));
    assert!(keep.join("source/wal/wal-00000000000000000001.seg").exists());
    assert!(!keep.join("source/wal/.ferry-held/demo-vshard-7").exists(), "held WAL links go with the release");

    // A second run refuses the used folder rather than mistaking that staging for its own.
    let again = demo(&["--shard-size", "1MiB", "--keep", keep_arg]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("is not empty"), "{}", text(&again.stderr));
}

#[test]
fn bad_arguments_are_refused_with_a_clear_error() {
    let out = demo(&["--shard-size", "nonsense"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("\"nonsense\" is not a size"), "{stderr}");
    assert!(stderr.contains("KiB, MiB or GiB"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    for (args, needle) in [
        (&["--write-rate", "5"][..], "--write-rate must be between"),
        (&["--baseline-ms", "0"], "--baseline-ms must be between"),
        (&["--budget-us", "10"], "--budget-us must be between"),
        (&["--streams", "0"], "--streams must be between"),
        (&["--write-seconds", "1"], "unexpected argument '--write-seconds'"),
    ] {
        let out = demo(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
    }
}
