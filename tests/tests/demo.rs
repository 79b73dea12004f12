//! `ferry demo` as a user runs it: the real binary, its JSON and text reports, its exit codes.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use ferry_tests::{ferry_bin, tree_sha256};

fn demo(args: &[&str]) -> Output {
    Command::new(ferry_bin()).arg("demo").args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn json_report_says_what_was_copied_and_verified() {
    let out = demo(&["--shard-size", "8MiB", "--files", "3", "--json"]);
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
    assert_eq!(report["verification"]["segments_identical"], true);
    assert_eq!(report["verification"]["manifest_state"], "released");
    assert!(report["shard"]["generate_elapsed_us"].is_u64());
    assert_eq!(report["not_implemented"], serde_json::json!(["wal_catch_up", "cut_over_fence", "reference_writer"]));
    // No numbers for phases that did not run.
    for absent in ["wal_catch_up", "cut_over", "pause", "fence"] {
        assert!(report.get(absent).is_none(), "the report has a {absent} section");
    }
    // The temporary work folder is gone.
    let work = report["work_dir"].as_str().unwrap();
    assert!(!Path::new(work).exists(), "{work} was left behind");
}

#[test]
fn text_report_says_which_phases_are_not_implemented() {
    let out = demo(&["--shard-size", "256KiB", "--files", "2"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("OFFLINE migration"), "{stdout}");
    assert!(stdout.contains("262144 bytes, 2 files"), "{stdout}");
    assert!(stdout.contains("identical to the source"), "{stdout}");
    assert!(stdout.contains("state released"), "{stdout}");
    assert!(stdout.contains("not implemented yet: see issues 4 and 6"), "{stdout}");
    assert!(stdout.contains("no pause was measured"), "{stdout}");
    let help = Command::new(ferry_bin()).args(["demo", "--help"]).output().unwrap();
    assert!(text(&help.stdout).contains("Not implemented yet: see issues 4 and 6"), "{}", text(&help.stdout));
}

#[test]
fn keep_leaves_a_staging_identical_to_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let keep_arg = keep.to_str().unwrap();
    let out = demo(&["--shard-size", "1MiB", "--files", "5", "--chunk-len", "65536", "--keep", keep_arg, "--json"]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let source = tree_sha256(&keep.join("source/segments")).unwrap();
    assert_eq!(source.len(), 5);
    let staging = keep.join("target/data/migrations/demo-vshard-7");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), source);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["state"], "released");

    // A second run refuses the used folder rather than mistaking that staging for its own copy.
    let again = demo(&["--shard-size", "1MiB", "--keep", keep_arg]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("is not empty"), "{}", text(&again.stderr));
}

#[test]
fn a_garbage_size_is_refused_with_a_clear_error() {
    let out = demo(&["--shard-size", "nonsense"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("\"nonsense\" is not a size"), "{stderr}");
    assert!(stderr.contains("KiB, MiB or GiB"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}
