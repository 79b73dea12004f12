//! The source's snapshot links (`<segments_root>/.ferry-snapshot/<id>/`) as `ferry copy` and
//! `ferry snapshots` leave and remove them.
//!
//! What it checks: a successful `ferry copy` leaves no `.ferry-snapshot` folder; a failed one
//! keeps its links (so the same command resumes), says so on stderr with the command that
//! removes them; `ferry snapshots list` shows them and `ferry snapshots clean` removes them
//! (never a source file), refusing an id it does not hold.
//!
//! What it does not: check a daemon's removal of its migrations' links (daemon_migrations.rs).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use ferry_engine::storage::DiskStorage;
use ferry_tests::{ferry_bin, ferry_copy_command, tree_sha256, write_file, Certs, Target};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ferry(args: &[&str], root: &Path) -> Output {
    Command::new(ferry_bin()).args(args).arg("--segments-root").arg(root).env("FERRY_LOG", "warn").output().unwrap()
}

fn copy(certs: &Certs, root: &Path, target: &str, id: &str) -> Output {
    ferry_copy_command(certs, root, target, id).output().unwrap()
}

#[test]
fn a_copy_removes_its_links_on_success_and_keeps_them_for_a_resume_on_failure() {
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = runtime.block_on(async { Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap() });
    let addr = target.addr.to_string();

    let first = tempfile::tempdir().unwrap();
    write_file(first.path(), "a/seg-1", 300_000, 1);
    let out = copy(&certs, first.path(), &addr, "m-dup");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!first.path().join(".ferry-snapshot").exists(), "a successful copy left its snapshot links");
    let out = ferry(&["snapshots", "list"], first.path());
    assert_eq!(text(&out.stdout).trim(), format!("no snapshots under {}", first.path().display()));

    // The same id with other files: the target refuses it, and the links stay for a resume.
    let second = tempfile::tempdir().unwrap();
    write_file(second.path(), "b/seg-9", 200_000, 2);
    let before = tree_sha256(second.path()).unwrap();
    let out = copy(&certs, second.path(), &addr, "m-dup");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a refused copy succeeded: {}", text(&out.stdout));
    assert!(stderr.contains("are kept so that the same command resumes"), "{stderr}");
    assert!(stderr.contains("ferry snapshots clean --segments-root"), "{stderr}");
    assert!(second.path().join(".ferry-snapshot/m-dup/b/seg-9").exists());
    let out = ferry(&["snapshots", "list"], second.path());
    let listed = text(&out.stdout);
    assert!(listed.starts_with("m-dup\t1 files\t200000 bytes\t"), "{listed}");
    let out = ferry(&["snapshots", "list", "--json"], second.path());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["migration_id"], "m-dup");

    // Cleaning: an id without a snapshot is refused by name; the right one goes, files stay.
    let out = ferry(&["snapshots", "clean", "--migration-id", "m-other"], second.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no snapshot of migration m-other"), "{}", text(&out.stderr));
    let out = ferry(&["snapshots", "clean"], second.path());
    assert!(!out.status.success(), "clean without --migration-id or --all ran");
    let out = ferry(&["snapshots", "clean", "--migration-id", "m-dup"], second.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "removed the snapshot of m-dup");
    assert!(!second.path().join(".ferry-snapshot").exists());
    assert_eq!(tree_sha256(second.path()).unwrap(), before, "cleaning touched a source file");
    let out = ferry(&["snapshots", "clean", "--all"], second.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    runtime.block_on(async { target.stop() });
}
