//! Migrations driven over the control socket of real `ferry serve` processes: a source daemon
//! and a target daemon on loopback.
//!
//! What it checks: `migration.start` of an offline migration runs to `Completed` with the
//! staging byte-identical and released; a repeated start is idempotent, a changed one refused;
//! one migration per vShard (`MigrationInProgress` with the vShard); `set_rate_limit` applies
//! at run time; hostile lines on the socket while a migration runs do not stop it; `abort`
//! (from the source, and from the target's own socket) removes the target staging and the
//! source's snapshot links; `forget` of a running migration is refused, of a finished one
//! removes what it held; SIGKILL and SIGTERM of the source daemon mid-copy, then a restart:
//! the migration resumes from its durable record and completes byte-identical; a record older
//! than `abort_timeout` is aborted at restart; a target at capacity or short of disk space
//! refuses with a clear reason.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_engine::control::ControlClient;
use ferry_tests::daemons::{cluster, phase_is, write_config, Node, WAIT};
use ferry_tests::{ferry_bin, tree_sha256, write_file, Certs};
use serde_json::{json, Value};

#[test]
fn an_offline_migration_runs_to_completed_and_is_forgotten() {
    let c = cluster("", "", &[("L1/a.seg", 3_000_001), ("L1/b.seg", 1), ("c.seg", 700_000)]);
    // A subscriber from before the start sees the phases in order, ending Completed.
    let socket = c.source.socket.clone();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let events = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = ControlClient::connect(&socket).await.unwrap();
            let mut stream = client.subscribe(Some("m-off")).await.unwrap();
            subscribed_tx.send(()).unwrap();
            let mut phases = Vec::new();
            while let Ok(Ok(Some(event))) = tokio::time::timeout(WAIT, stream.next()).await {
                if let ferry_engine::control::Event::Migration(e) = event {
                    assert_eq!(e["migration_id"], "m-off", "{e}");
                    if e["event"] == "phase" {
                        phases.push(e["phase"].as_str().unwrap().to_owned());
                    }
                    if e["phase"] == "Completed" {
                        break;
                    }
                }
            }
            phases
        })
    });
    subscribed.recv_timeout(WAIT).unwrap();
    let start = c.source.call("migration.start", c.params("m-off", 5, 0)).unwrap();
    assert_eq!(start, json!({ "migration_id": "m-off", "created": true }));
    let done = c.source.wait_for("m-off", "Completed", phase_is("Completed"));
    assert_eq!(done["role"], "source");
    assert_eq!(done["bytes_transferred"], 3_700_002, "{done}");
    assert_eq!(done["staging_state"], "released");
    assert_eq!(tree_sha256(&c.staged("m-off").join("segments")).unwrap(), tree_sha256(&c.source_root).unwrap());
    assert_eq!(c.manifest_state("m-off"), "released");
    let phases = events.join().unwrap();
    // Events are sampled every 250 ms, so a fast phase may be skipped, never reordered.
    let order = ["BaseCopy", "WalCatchUp", "Completed"];
    let ranks: Vec<usize> = phases.iter().map(|p| order.iter().position(|o| o == p).unwrap()).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{phases:?}");
    assert_eq!(phases.last().map(String::as_str), Some("Completed"), "{phases:?}");
    let inbound = c.target.status("m-off");
    assert_eq!((inbound["role"].as_str(), inbound["phase"].as_str()), (Some("target"), Some("Completed")), "{inbound}");

    // Idempotent start; the same id with other parameters is refused.
    let again = c.source.call("migration.start", c.params("m-off", 5, 0)).unwrap();
    assert_eq!(again["created"], false);
    let (code, message, _) = c.source.call("migration.start", c.params("m-off", 6, 0)).unwrap_err();
    assert_eq!(code, -32006, "{message}");
    assert!(message.contains("other parameters"), "{message}");
    let list = c.source.call("migration.list", json!({})).unwrap();
    assert_eq!(list["migrations"].as_array().unwrap().len(), 1, "{list}");

    // Abort after release is refused: the target is authoritative.
    let (code, message, _) = c.source.call("migration.abort", json!({ "migration_id": "m-off" })).unwrap_err();
    assert_eq!(code, -32006, "{message}");

    assert!(c.snapshot_dir("m-off").exists());
    c.source.call("migration.forget", json!({ "migration_id": "m-off" })).unwrap();
    assert!(!c.snapshot_dir("m-off").exists(), "forget leaves the snapshot links");
    let (code, _, data) = c.source.call("migration.status", json!({ "migration_id": "m-off" })).unwrap_err();
    assert_eq!((code, data), (-32002, Some(json!({ "migration_id": "m-off" }))));
    c.target.call("migration.forget", json!({ "migration_id": "m-off" })).unwrap();
    assert!(!c.staged("m-off").exists(), "the target's forget leaves the staging");
}

#[test]
fn rate_limit_in_progress_hostile_lines_abort_and_forget_on_a_running_migration() {
    let c = cluster("", "", &[("big.seg", 24 << 20)]);
    c.source.call("migration.start", c.params("m-slow", 9, 1 << 20)).unwrap();
    let first = c.source.wait_for("m-slow", "bytes moving", |s| s["bytes_transferred"].as_u64() > Some(0));
    assert_eq!(first["phase"], "BaseCopy");
    assert_eq!(first["rate_limit_bytes_per_sec"], 1 << 20);

    let (code, message, data) = c.source.call("migration.start", c.params("m-other", 9, 0)).unwrap_err();
    assert_eq!(code, -32001, "{message}");
    assert_eq!(data.unwrap()["vshard_id"], 9);
    let (code, message, _) = c.source.call("migration.forget", json!({ "migration_id": "m-slow" })).unwrap_err();
    assert_eq!(code, -32006, "{message}");
    let (code, _, _) = c.source.call("migration.start", json!({ "vshard_id": "nine" })).unwrap_err();
    assert_eq!(code, -32602);

    let set =
        c.source.call("migration.set_rate_limit", json!({ "migration_id": "m-slow", "bytes_per_sec": 2_000_000 }));
    assert_eq!(set.unwrap()["rate_limit_bytes_per_sec"], 2_000_000);
    assert_eq!(c.source.status("m-slow")["rate_limit_bytes_per_sec"], 2_000_000);
    let (code, _, _) = c
        .source
        .call("migration.set_rate_limit", json!({ "migration_id": "m-slow", "bytes_per_sec": -1 }))
        .unwrap_err();
    assert_eq!(code, -32602);

    // Hostile lines on the socket while the migration runs: it keeps moving.
    let before = c.source.status("m-slow")["bytes_transferred"].as_u64().unwrap();
    for line in [
        &b"not json\n"[..],
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":7}\n",
        b"\xff\xfe\x00garbage\n",
        &[b'x'; 65536][..],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&c.source.socket).unwrap();
        let _ = s.write_all(line);
    }
    c.source.wait_for("m-slow", "progress after hostile lines", |s| s["bytes_transferred"].as_u64() > Some(before));

    // Abort: the source is Failed (aborted), the target's staging is gone, links released.
    assert!(c.snapshot_dir("m-slow").exists());
    let aborted = c.source.call("migration.abort", json!({ "migration_id": "m-slow", "reason": "test" })).unwrap();
    assert_eq!(aborted["aborted"], true, "{aborted}");
    assert_eq!(aborted["note"], "target staging removed", "{aborted}");
    let status = c.source.status("m-slow");
    assert_eq!(status["phase"], "Failed");
    assert!(status["reason"].as_str().unwrap().contains("aborted: test"), "{status}");
    assert_eq!(c.manifest_state("m-slow"), "aborted");
    assert!(!c.staged("m-slow").join("segments").exists());
    assert!(!c.snapshot_dir("m-slow").exists());
    let inbound = c.target.status("m-slow");
    assert_eq!(inbound["phase"], "Failed", "{inbound}");
    let (code, _, _) =
        c.source.call("migration.set_rate_limit", json!({ "migration_id": "m-slow", "bytes_per_sec": 1 })).unwrap_err();
    assert_eq!(code, -32006);

    // Now the vShard is free, and forget cleans both sides.
    c.source.call("migration.forget", json!({ "migration_id": "m-slow" })).unwrap();
    c.target.call("migration.forget", json!({ "migration_id": "m-slow" })).unwrap();
    assert!(!c.staged("m-slow").exists());
    c.source.call("migration.start", c.params("m-other", 9, 0)).unwrap();
    c.source.wait_for("m-other", "Completed", phase_is("Completed"));
}

#[test]
fn the_target_aborts_an_inbound_migration_on_its_own_socket() {
    let c = cluster("", "", &[("big.seg", 16 << 20)]);
    c.source.call("migration.start", c.params("m-t", 2, 1 << 20)).unwrap();
    c.target.wait_for("m-t", "inbound bytes", |s| s["bytes_transferred"].as_u64() > Some(0));
    let answer = c.target.call("migration.abort", json!({ "migration_id": "m-t", "reason": "disk needed" })).unwrap();
    assert_eq!(answer["role"], "target");
    let failed = c.source.wait_for("m-t", "the source to fail", phase_is("Failed"));
    assert!(failed["reason"].as_str().unwrap().contains("aborted"), "{failed}");
    assert_eq!(c.manifest_state("m-t"), "aborted");
    assert!(!c.staged("m-t").join("segments").exists());
}

fn kill_and_resume(signal: libc::c_int) {
    let mut c = cluster("", "", &[("a.seg", 12 << 20), ("b.seg", 12 << 20)]);
    c.source.call("migration.start", c.params("m-k", 4, 4 << 20)).unwrap();
    c.source.wait_for("m-k", "some bytes", |s| s["bytes_transferred"].as_u64() > Some(4 << 20));
    let exit = c.source.signal(signal);
    if signal == libc::SIGTERM {
        assert!(exit.success(), "SIGTERM exit: {exit:?}");
    }
    let config = c.source.config.clone();
    c.source = Node::start(&config);
    let resumed = c.source.status("m-k");
    assert_ne!(resumed["phase"], "Failed", "{resumed}");
    let set = c.source.call("migration.set_rate_limit", json!({ "migration_id": "m-k", "bytes_per_sec": 0 }));
    assert!(set.is_ok(), "{set:?}");
    let done = c.source.wait_for("m-k", "Completed", phase_is("Completed"));
    assert!(done["bytes_resent"].as_u64().unwrap() <= 2 * 262_144, "{done}");
    assert_eq!(tree_sha256(&c.staged("m-k").join("segments")).unwrap(), tree_sha256(&c.source_root).unwrap());
}

#[test]
fn a_sigkilled_source_daemon_resumes_its_migration() {
    kill_and_resume(libc::SIGKILL);
}

#[test]
fn a_sigtermed_source_daemon_exits_0_and_resumes_its_migration() {
    kill_and_resume(libc::SIGTERM);
}

#[test]
fn a_stale_migration_is_aborted_at_restart() {
    let mut c = cluster("abort_timeout_secs = 0", "", &[("a.seg", 16 << 20)]);
    c.source.call("migration.start", c.params("m-stale", 4, 1 << 20)).unwrap();
    c.target.wait_for("m-stale", "inbound bytes", |s| s["bytes_transferred"].as_u64() > Some(0));
    c.source.signal(libc::SIGKILL);
    // Not a wait for an event: the durable record ages past abort_timeout (0 s), by over a
    // second so that the abort's "last ran it N s ago" is not 0 either.
    std::thread::sleep(Duration::from_millis(1100));
    let config = c.source.config.clone();
    c.source = Node::start(&config);
    let status = c.source.wait_for("m-stale", "abort at restart", phase_is("Failed"));
    assert!(status["reason"].as_str().unwrap().contains("abort_timeout"), "{status}");
    c.target.wait_for("m-stale", "the target to drop the staging", phase_is("Failed"));
    assert_eq!(c.manifest_state("m-stale"), "aborted");
    assert!(!c.snapshot_dir("m-stale").exists());
}

#[test]
fn a_target_at_capacity_refuses_with_a_clear_reason() {
    let c = cluster("", "max_inbound_migrations = 1", &[("a.seg", 16 << 20)]);
    c.source.call("migration.start", c.params("m-1", 1, 1 << 20)).unwrap();
    c.target.wait_for("m-1", "the first inbound", |s| s["phase"] == "BaseCopy");
    c.source.call("migration.start", c.params("m-2", 2, 0)).unwrap();
    let refused = c.source.wait_for("m-2", "the refusal", phase_is("Failed"));
    assert!(refused["reason"].as_str().unwrap().contains("at capacity"), "{refused}");
    assert_eq!(c.source.status("m-1")["phase"], "BaseCopy");
}

#[test]
fn a_target_short_of_disk_space_refuses_with_a_clear_reason() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI runs as root: mounting a small tmpfs needs it");
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let small = tempfile::tempdir().unwrap();
    let status =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"]).arg(small.path()).status().unwrap();
    assert!(status.success(), "mount tmpfs failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.path().to_path_buf());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let root = dir.path().join("shard");
    write_file(&root, "a.seg", 8 << 20, 1);
    let target = Node::start(&write_config(
        dir.path(),
        "target",
        &certs,
        &small.path().join("data"),
        "127.0.0.1:0",
        "allowed_peers = [\"source\"]",
    ));
    let source = Node::start(&write_config(dir.path(), "source", &certs, &dir.path().join("s"), "127.0.0.1:0", ""));
    let params = json!({
        "migration_id": "m-big", "vshard_id": 1, "segments_root": root.display().to_string(),
        "target_address": target.addr, "target_node_id": "target", "offline": true,
    });
    source.call("migration.start", params).unwrap();
    let refused = source.wait_for("m-big", "the refusal", phase_is("Failed"));
    assert!(refused["reason"].as_str().unwrap().contains("lacks disk space"), "{refused}");
}

#[test]
fn metrics_are_served_and_sighup_reloads_certificates() {
    let c = cluster("metrics_addr = \"127.0.0.1:0\"", "", &[("a.seg", 2 << 20)]);
    let url = c.source.line("metrics at ");
    let addr = url.trim_start_matches("metrics at http://").trim_end_matches("/metrics").to_owned();
    c.source.call("migration.start", c.params("m-met", 3, 0)).unwrap();
    c.source.wait_for("m-met", "Completed", phase_is("Completed"));
    let scrape = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        text
    };
    let text = scrape();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("ferry_migrations{role=\"source\",phase=\"Completed\"} 1"), "{text}");
    let sent: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ferry_bytes_sent_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(sent >= 2 << 20, "{text}");

    // SIGHUP: the target swaps to certificates of a new CA; a source of that CA then migrates.
    let target_certs = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(c._certs.dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target_certs.path().join(entry.file_name())).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let target_config = write_config(
        dir.path(),
        "target",
        &c._certs,
        &dir.path().join("t"),
        "127.0.0.1:0",
        "allowed_peers = [\"source\"]",
    );
    let text = std::fs::read_to_string(&target_config).unwrap();
    let text = text.replace(&c._certs.dir.path().display().to_string(), &target_certs.path().display().to_string());
    std::fs::write(&target_config, text).unwrap();
    let mut target = Node::start(&target_config);
    let new_ca = Certs::new().unwrap();
    for entry in std::fs::read_dir(new_ca.dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target_certs.path().join(entry.file_name())).unwrap();
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(target.child.as_ref().unwrap().id() as libc::pid_t, libc::SIGHUP) };
    target.line("certificates reloaded");
    let source = Node::start(&write_config(dir.path(), "source", &new_ca, &dir.path().join("s"), "127.0.0.1:0", ""));
    let params = json!({
        "migration_id": "m-new-ca", "vshard_id": 1, "segments_root": c.source_root.display().to_string(),
        "target_address": target.addr, "target_node_id": "target", "offline": true,
    });
    source.call("migration.start", params).unwrap();
    source.wait_for("m-new-ca", "Completed under the reloaded certificates", phase_is("Completed"));
    let exit = target.signal(libc::SIGTERM);
    assert!(exit.success());
}

/// SIGKILL of the source daemon during WAL catch-up: after a restart the tail resumes from the
/// target's durable LSN; every record of the vShard arrives once, in order, byte-identical.
#[test]
fn a_sigkilled_source_daemon_resumes_its_wal_tail_without_loss_or_duplicates() {
    use ferry_engine::wal::tail::FolderTail;
    use ferry_refnode::walwrite::{RecordSpec, WalWriter, WriterOptions};
    use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode};
    use ferry_wire::{Lsn, VShardId};

    const VSHARD: u32 = 7;
    const RECORDS: u64 = 6000;
    let mut c = cluster("", "", &[("a.seg", 1 << 20)]);
    let wal_dir = c._dir.path().join("wal");
    let options = WriterOptions { layout: Layout::A, roll_size_bytes: 64 << 10, ..WriterOptions::default() };
    let mut writer = WalWriter::create(&wal_dir, options, Lsn(1)).unwrap();
    let record = |i: u64| -> (u32, Vec<u8>) {
        let vshard = if i.is_multiple_of(2) { VSHARD } else { 30 };
        (vshard, (0..(i % 300)).map(|b| (b ^ i) as u8).collect())
    };
    let mut written = Vec::new();
    let mut append = |writer: &mut WalWriter, i: u64| {
        let (vshard, data) = record(i);
        let lsn = writer.append(&RecordSpec::new(1, VShardId(vshard)), &data).unwrap();
        if vshard == VSHARD {
            written.push((lsn.0, data));
        }
    };
    for i in 0..2000 {
        append(&mut writer, i);
    }
    writer.flush().unwrap();
    let mut params = c.params("m-wal", VSHARD, 0);
    params["wal_dir"] = json!(wal_dir.display().to_string());
    params["until_lsn"] = json!(RECORDS);
    c.source.call("migration.start", params).unwrap();
    c.source.wait_for("m-wal", "WAL catch-up", |s| s["wal"]["current_lsn"].as_u64() > Some(1000));
    for i in 2000..4000 {
        append(&mut writer, i);
        if i % 50 == 0 {
            writer.flush().unwrap();
        }
    }
    writer.flush().unwrap();
    c.source.wait_for("m-wal", "more WAL", |s| s["wal"]["current_lsn"].as_u64() > Some(2500));
    c.source.signal(libc::SIGKILL);
    for i in 4000..RECORDS {
        append(&mut writer, i);
    }
    writer.flush().unwrap();
    let config = c.source.config.clone();
    c.source = Node::start(&config);
    let done = c.source.wait_for("m-wal", "Completed", phase_is("Completed"));
    assert_eq!(done["staging_state"], "released", "{done}");

    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut tail = FolderTail::new(&c.staged("m-wal").join("wal"), config, None).unwrap();
    let mut staged = Vec::new();
    while let Some(record) = tail.poll().unwrap() {
        assert_eq!(record.header.vshard_id.0, VSHARD);
        staged.push((record.header.lsn.0, record.payload().to_vec()));
    }
    assert_eq!(staged.len(), written.len(), "records lost or duplicated");
    assert!(staged == written, "staged records differ from the written ones");
}

/// The operator CLI over a real daemon's socket: `ferry migrate --offline` runs a migration to
/// Completed and reports it; `status`, `list`, `set-rate`, `abort` and `forget` answer, in text
/// and JSON, and an unknown id exits non-zero naming it.
#[test]
fn the_operator_cli_drives_a_real_daemon() {
    let c = cluster("", "", &[("L1/a.seg", 2_000_000), ("b.seg", 5)]);
    let ferry = |args: &[&str]| -> (bool, String, String) {
        let out = Command::new(ferry_bin()).args(args).arg("--socket").arg(&c.source.socket).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let root = c.source_root.display().to_string();
    let (ok, stdout, stderr) = ferry(&[
        "migrate",
        "--offline",
        "--json",
        "--vshard",
        "12",
        "--segments-root",
        &root,
        "--target",
        &c.target.addr,
        "--target-node",
        "target",
        "--migration-id",
        "m-cli",
        "--streams",
        "2",
    ]);
    assert!(ok, "migrate failed: {stdout} {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["status"]["phase"], "Completed", "{report}");
    assert_eq!(report["status"]["bytes_transferred"], 2_000_005, "{report}");
    assert_eq!(tree_sha256(&c.staged("m-cli").join("segments")).unwrap(), tree_sha256(&c.source_root).unwrap());

    let (ok, stdout, _) = ferry(&["status", "m-cli", "--json"]);
    assert!(ok);
    assert!(stdout.contains("\"Completed\""), "{stdout}");
    let (ok, stdout, _) = ferry(&["list"]);
    assert!(ok && stdout.contains("m-cli"), "{stdout}");
    let (ok, _, stderr) = ferry(&["set-rate", "m-cli", "10MB"]);
    assert!(!ok, "set-rate of a finished migration must fail");
    assert!(stderr.contains("-32006") || stderr.contains("Completed"), "{stderr}");
    let (ok, _, stderr) = ferry(&["abort", "nope"]);
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    let (ok, _, _) = ferry(&["forget", "m-cli"]);
    assert!(ok);
    let (ok, _, stderr) = ferry(&["status", "m-cli"]);
    assert!(!ok && stderr.contains("m-cli"), "{stderr}");

    // A live migration without the commands that pause and resume writes is refused clearly.
    let (ok, _, stderr) = ferry(&[
        "migrate",
        "--vshard",
        "1",
        "--segments-root",
        &root,
        "--target",
        &c.target.addr,
        "--target-node",
        "target",
    ]);
    assert!(!ok && stderr.contains("--pause-cmd is required for a live migration"), "{stderr}");
}

#[test]
fn log_format_json_in_the_config_gives_json_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let config =
        write_config(dir.path(), "target", &certs, &dir.path().join("d"), "127.0.0.1:0", "log_format = \"json\"");
    let mut child = Command::new(ferry_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
    assert!(parsed.get("level").is_some(), "{parsed}");
}
