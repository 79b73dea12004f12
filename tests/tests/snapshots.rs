//! The source's snapshot links (`<segments_root>/.ferry-snapshot/<id>/`) as `ferry copy` and
//! `ferry snapshots` leave and remove them.
//!
//! What it checks: a `ferry copy` leaves no `.ferry-snapshot` folder, whether it succeeded,
//! failed or was interrupted (SIGINT), and the interrupted one resumes with the same command,
//! its report saying how much the target held already; `ferry snapshots list` shows the
//! links a killed process left and `ferry snapshots clean` removes them (never a source
//! file), refusing an id it does not hold.
//!
//! What it does not: check a daemon's removal of its migrations' links (daemon_migrations.rs).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::snapshot::Snapshot;
use ferry_engine::storage::DiskStorage;
use ferry_tests::{ferry_bin, ferry_copy_command, tree_sha256, wait_until_blocking, write_file, Certs, Target};
use ferry_wire::MigrationId;

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
fn a_copy_removes_its_links_whatever_its_end_and_clean_removes_what_a_killed_one_left() {
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

    // The same id with other files: the target refuses it, and the links go all the same.
    let second = tempfile::tempdir().unwrap();
    write_file(second.path(), "b/seg-9", 200_000, 2);
    let before = tree_sha256(second.path()).unwrap();
    let out = copy(&certs, second.path(), &addr, "m-dup");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a refused copy succeeded: {}", text(&out.stdout));
    assert!(!second.path().join(".ferry-snapshot").exists(), "a failed copy left its snapshot links:\n{stderr}");

    // What a killed process leaves (its links, made as `ferry copy` makes them) is listed.
    let id = MigrationId::new("m-dup").unwrap();
    Snapshot::create(second.path(), &id, None).unwrap();
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

#[test]
fn an_interrupted_copy_removes_its_links_and_the_same_command_resumes_saying_how_much() {
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = runtime.block_on(async { Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap() });
    let addr = target.addr.to_string();
    let root = tempfile::tempdir().unwrap();
    write_file(root.path(), "L0/seg-1", 8 << 20, 3);

    // 1 MB/s for 8 MiB: interrupted well before its end, once the target holds some chunks.
    let mut child = ferry_copy_command(&certs, root.path(), &addr, "m-int")
        .args(["--rate-limit", "1MB", "--chunk-len", "256KiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let verified =
        || target.ctx.inbound().get(&MigrationId::new("m-int").unwrap()).map_or(0, |s| s.migration.bytes_verified);
    wait_until_blocking("the target to verify 1 MiB", Duration::from_secs(30), || verified() >= 1 << 20).unwrap();
    assert!(root.path().join(".ferry-snapshot/m-int/L0/seg-1").exists(), "the copy pins its files while it runs");
    // SAFETY: kill(2) on the pid of a child this test spawned and has not waited for yet.
    assert_eq!(unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGINT) }, 0);
    let out = wait_with_timeout(&mut child, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "an interrupted copy succeeded: {}", text(&out.stdout));
    assert!(stderr.contains("interrupted by SIGINT") && stderr.contains("the same command resumes"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!root.path().join(".ferry-snapshot").exists(), "an interrupted copy left its snapshot links");

    // The same chunk length (a resume needs the same offer), without the rate limit.
    let out = ferry_copy_command(&certs, root.path(), &addr, "m-int").args(["--chunk-len", "256KiB"]).output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let resumed: u64 = stdout
        .split(", resumed: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the resumed copy does not say how much it resumed: {stdout}"));
    assert!(resumed > 0 && resumed < 8 << 20, "{stdout}");
    assert!(!root.path().join(".ferry-snapshot").exists());
    runtime.block_on(async { target.stop() });
}

/// Waits for `child` to exit (killing it after `limit`), with what it wrote.
fn wait_with_timeout(child: &mut Child, limit: Duration) -> Output {
    let exited = || matches!(child.try_wait(), Ok(Some(_)));
    if wait_until_blocking("ferry copy to exit", limit, exited).is_err() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    Output { status, stdout, stderr }
}
