//! The `ferry` binary against real daemons, as an operator meets it: `ferry migrate` refusing
//! an empty shard, a target's status before and after the target restarts, and the commands
//! that print without a daemon writing into a reader that already left.
//!
//! What it checks: exit statuses, what stdout and stderr say, the status fields a user reads
//! (vShard, peer, bytes and files of the target's side), and that `ferry forget` leaves no
//! `.ferry-snapshot/` folder on the source.
//!
//! What it does not: check the copies' bytes (daemon_migrations.rs does) or time anything.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ferry_tests::daemons::{cluster, phase_is, Node};
use ferry_tests::ferry_bin;
use serde_json::json;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `ferry migrate --offline` of `root` through the cluster's source daemon.
fn migrate(c: &ferry_tests::daemons::Cluster, root: &Path, id: &str, extra: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(["migrate", "--offline", "--vshard", "7", "--target-node", "target", "--migration-id", id])
        .args(["--target", &c.target.addr])
        .arg("--socket")
        .arg(&c.source.socket)
        .arg("--segments-root")
        .arg(root)
        .args(extra)
        .env("FERRY_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn migrate_refuses_an_empty_shard_unless_allowed_and_a_target_keeps_its_status_over_a_restart() {
    let mut c = cluster("", "", &[("L0/a.seg", 300_000), ("b.seg", 100_000)]);

    // An empty root: refused before the daemon is asked, naming the flag that allows it.
    let empty = tempfile::tempdir().unwrap();
    let out = migrate(&c, empty.path(), "m-empty", &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "an empty shard was migrated:\n{}", text(&out.stdout));
    assert!(stderr.contains("holds no files") && stderr.contains("--allow-empty"), "{stderr}");
    let (code, _, _) = c.source.call("migration.status", json!({ "migration_id": "m-empty" })).unwrap_err();
    assert_eq!(code, -32002, "the refused migration reached the daemon");
    let out = migrate(&c, empty.path(), "m-empty", &["--allow-empty"]);
    assert!(out.status.success(), "--allow-empty: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Completed: 0 files"), "{}", text(&out.stdout));

    // A shard with files; the target's side names its vShard, its peer and when it began.
    let root = c.source_root.clone();
    let out = migrate(&c, &root, "m-files", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = c.target.wait_for("m-files", "the target's side completed", phase_is("Completed"));
    assert_eq!((before["role"].as_str(), before["vshard_id"].as_u64()), (Some("target"), Some(7)), "{before}");
    assert_eq!(before["peer_node"], "source", "{before}");
    assert!(before["started_at_unix_ms"].as_u64() > Some(0), "{before}");
    assert_eq!((before["bytes_total"].as_u64(), before["files_total"].as_u64()), (Some(400_000), Some(2)));

    // Restarted, the target lists the staging with what its manifest says.
    assert!(c.target.signal(libc::SIGTERM).success());
    c.target = Node::start(&c.target.config.clone());
    let after = c.target.status("m-files");
    assert_eq!((after["phase"].as_str(), after["staging_state"].as_str()), (Some("Completed"), Some("released")));
    assert_eq!((after["vshard_id"].as_u64(), after["peer_node"].as_str()), (Some(7), Some("source")), "{after}");
    for field in ["bytes_total", "bytes_transferred", "files_total", "files_staged", "started_at_unix_ms"] {
        assert_eq!(after[field], before[field], "{field} after the restart: {after}");
    }
    let out = Command::new(ferry_bin()).arg("list").arg("--socket").arg(&c.target.socket).output().unwrap();
    let listed = text(&out.stdout);
    let line = listed.lines().find(|l| l.starts_with("m-files")).unwrap_or_else(|| panic!("{listed}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..5], ["m-files", "target", "Completed", "7", "source"], "{listed}");

    // The source holds its snapshot links until `ferry forget`, which leaves no empty
    // `.ferry-snapshot/` behind.
    assert!(c.snapshot_dir("m-files").exists());
    let out = Command::new(ferry_bin()).args(["forget", "m-files", "--socket"]).arg(&c.source.socket).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!root.join(".ferry-snapshot").exists(), "forget left .ferry-snapshot/ in {}", root.display());
}

/// A stdout whose reader is already gone (see cli_ux.rs).
fn gone_reader() -> Stdio {
    let (reader, writer) = UnixStream::pair().unwrap();
    drop(reader);
    Stdio::from(OwnedFd::from(writer))
}

#[test]
fn help_version_completions_man_and_listings_into_a_reader_that_left_are_quiet() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    for args in [
        vec!["--help"],
        vec!["--version"],
        vec!["copy", "--help"],
        vec!["completions", "bash"],
        vec!["man"],
        vec!["snapshots", "list", "--segments-root", root_arg],
        vec!["snapshots", "list", "--json", "--segments-root", root_arg],
    ] {
        let out = Command::new(ferry_bin()).args(&args).stdout(gone_reader()).stderr(Stdio::piped()).output().unwrap();
        let stderr = text(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "ferry {args:?}: exit {:?}\n{stderr}", out.status);
    }
}
