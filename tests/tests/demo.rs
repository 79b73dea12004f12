//! `ferry demo` as a user runs it: the real binary, its JSON and text reports, its exit codes.
//! Each run is small (a few MiB of shard, a reference writer at 2,000 writes/s for 1 s) but
//! whole: live base copy and WAL catch-up, offline release, verification.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use ferry_tests::{ferry_bin, tree_sha256};

/// A small live run: 2,000 writes in one second, 500 of them to vShard 7.
const SMALL_WRITER: [&str; 4] = ["--write-rate", "2000", "--write-seconds", "1"];

fn demo(args: &[&str]) -> Output {
    Command::new(ferry_bin()).arg("demo").args(args).output().unwrap()
}

fn small_demo(args: &[&str]) -> Output {
    let mut all = SMALL_WRITER.to_vec();
    all.extend_from_slice(args);
    demo(&all)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn json_report_says_what_was_copied_caught_up_and_verified() {
    let out = small_demo(&["--shard-size", "8MiB", "--files", "3", "--json"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "exit {:?}\nstderr:\n{stderr}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{}", text(&out.stdout)));

    assert_eq!(report["base_copy"]["bytes"], 8 << 20);
    assert_eq!(report["base_copy"]["files"], 3);
    assert_eq!(report["base_copy"]["bytes_resent"], 0);
    assert_eq!(report["base_copy"]["connections"], 1);
    assert_eq!(report["base_copy"]["streams"], 4);
    assert!(report["base_copy"]["throughput_bytes_per_sec"].as_u64().unwrap() > 0);
    assert!(report["base_copy"]["elapsed_us"].as_u64().unwrap() > 0);
    assert!(report["base_copy"]["read_mode"].is_string());
    assert!(report["shard"]["generate_elapsed_us"].is_u64());

    // The writer wrote exactly rate x seconds records, a quarter of them to vShard 7.
    let writer = &report["writer"];
    assert_eq!(writer["writes"], 2000);
    assert_eq!(writer["vshard_writes"], 500);
    assert_eq!(writer["first_lsn"], 1);
    assert_eq!(writer["last_lsn"], 2000);
    assert_eq!(writer["layout"], "A");
    assert!(writer["rate_writes_per_sec"].as_u64().unwrap() > 0);
    assert!(writer["ack_p99_us_during_copy"].is_u64(), "{writer}");
    assert!(writer["longest_ack_gap_us"].is_u64(), "{writer}");
    assert!(writer["wal_segments"].as_u64().unwrap() >= 1);

    // The copy started after the writer's head start, and caught up to its last LSN.
    let base_lsn = report["base_copy"]["base_lsn"].as_u64().unwrap();
    assert!(base_lsn > 0 && base_lsn < 2000, "base_lsn {base_lsn}");
    let catch_up = &report["catch_up"];
    assert_eq!(catch_up["start_lsn"].as_u64().unwrap(), base_lsn + 1);
    assert_eq!(catch_up["final_lsn"], 2000);
    let records = catch_up["records"].as_u64().unwrap();
    assert!(records > 0);
    assert!(catch_up["lag_max_records"].is_u64(), "{catch_up}");

    let v = &report["verification"];
    assert_eq!(v["segments_identical"], true);
    assert_eq!(v["manifest_state"], "released");
    assert_eq!(v["lost_count"], 0);
    assert_eq!(v["duplicate_count"], 0);
    assert_eq!(v["staged_wal_records"].as_u64().unwrap(), records);
    // Every vShard-7 write above base_lsn: LSNs 4, 8, ..., 2000 are vShard 7's (writer_seq % 4 == 3).
    assert_eq!(v["expected_wal_records"].as_u64().unwrap(), 500 - base_lsn / 4);
    assert_eq!(v["problems"], serde_json::json!([]));

    assert_eq!(report["not_implemented"], serde_json::json!(["cut_over_fence", "reference_node_import"]));
    assert!(report["not_implemented_note"].as_str().unwrap().contains("not paused by a cut-over fence"));
    // No numbers for phases that did not run.
    for absent in ["cut_over", "pause", "fence"] {
        assert!(report.get(absent).is_none(), "the report has a {absent} section");
    }
    // The temporary work folder is gone.
    let work = report["work_dir"].as_str().unwrap();
    assert!(!Path::new(work).exists(), "{work} was left behind");
}

#[test]
fn text_report_says_the_end_was_offline_and_what_is_not_implemented() {
    let out = small_demo(&["--shard-size", "256KiB", "--files", "2"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("LIVE base copy + WAL catch-up of vShard 7"), "{stdout}");
    assert!(stdout.contains("OFFLINE end"), "{stdout}");
    assert!(stdout.contains("262144 bytes, 2 files"), "{stdout}");
    assert!(stdout.contains("2000 writes (500 to vShard 7)"), "{stdout}");
    assert!(stdout.contains("identical to the source"), "{stdout}");
    assert!(stdout.contains("state released"), "{stdout}");
    assert!(stdout.contains("each exactly once"), "{stdout}");
    assert!(stdout.contains("NOT paused by a cut-over fence"), "{stdout}");
    assert!(stdout.contains("no pause is measured"), "{stdout}");
    let help = Command::new(ferry_bin()).args(["demo", "--help"]).output().unwrap();
    let help = text(&help.stdout);
    assert!(help.contains("Not implemented yet:"), "{help}");
    assert!(help.contains("cut-over fence"), "{help}");
    assert!(help.contains("--write-rate"), "{help}");
}

#[test]
fn keep_leaves_a_staging_with_the_shard_and_the_vshards_wal() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let keep_arg = keep.to_str().unwrap();
    let out =
        small_demo(&["--shard-size", "1MiB", "--files", "5", "--chunk-len", "65536", "--keep", keep_arg, "--json"]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let source = tree_sha256(&keep.join("source/segments")).unwrap();
    assert_eq!(source.len(), 5);
    let staging = keep.join("target/data/migrations/demo-vshard-7");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), source);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["state"], "released");
    assert_eq!(manifest["final_lsn"], 2000);
    assert_eq!(manifest["vshard_id"], 7);
    assert!(!manifest["wal_segments"].as_array().unwrap().is_empty());
    let staged_wal: Vec<_> = std::fs::read_dir(staging.join("wal")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(staged_wal.iter().any(|n| n.to_string_lossy().starts_with("wal-")), "{staged_wal:?}");
    // The source WAL is there; ferry's held links are gone once the staging is released.
    assert!(keep.join("source/wal/wal-00000000000000000001.seg").exists());
    assert!(!keep.join("source/wal/.ferry-held/demo-vshard-7").exists());

    // A second run refuses the used folder rather than mistaking that staging for its own copy.
    let again = demo(&["--shard-size", "1MiB", "--keep", keep_arg]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("is not empty"), "{}", text(&again.stderr));
}

#[test]
fn garbage_arguments_are_refused_with_a_clear_error() {
    let out = demo(&["--shard-size", "nonsense"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("\"nonsense\" is not a size"), "{stderr}");
    assert!(stderr.contains("KiB, MiB or GiB"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    let out = demo(&["--write-rate", "5"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--write-rate must be between"), "{}", text(&out.stderr));
    let out = demo(&["--write-seconds", "0"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--write-seconds must be between"), "{}", text(&out.stderr));
}
