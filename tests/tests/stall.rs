//! The "no progress for N s" flag, end to end: two `ferry serve` daemons with a stall threshold
//! of one second (`--stall-after-secs 1`), a rate-limited copy between them, and each daemon in
//! turn frozen with SIGSTOP while the other one watches; then the `--json` output of the
//! commands that draw bars, checked byte for byte with stderr on a real terminal (a pty).
//!
//! What it checks: the status field `no_progress_for_s` rises on the side that waits (the
//! source's when the target is frozen, the target's when the source is), a `stalled` event goes
//! out once, `ferry status` shows "no progress for N s", and after SIGCONT the field clears, a
//! `progressing` event follows and the copy completes. With stderr a terminal, `ferry migrate
//! --json` and `ferry status --json` print exactly the JSON of the report and status (no bar
//! bytes on stdout) and draw nothing on stderr; without `--json` the bars go to the terminal,
//! never to stdout.
//!
//! What it does not: time anything beyond the one-second threshold (waits have deadlines), or
//! check the copied bytes (daemon_migrations.rs does).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use ferry_engine::control::typed::{EventKind, MigrationEvent};
use ferry_engine::control::ControlClient;
use ferry_tests::daemons::{phase_is, write_config, Node, WAIT};
use ferry_tests::{ferry_bin, write_file, Certs};
use ferry_wire::api::MigrationStatus;
use ferry_wire::MigrationId;
use serde_json::{json, Value};

/// A source and a target daemon (stall threshold 1 s) over a shard of `files` (name, size).
/// The source takes the threshold from its config file (`stall_after_secs`), the target from
/// the `--stall-after-secs` flag, which wins over its file's 30.
fn two_nodes(dir: &Path, certs: &Certs, files: &[(&str, usize)]) -> (Node, Node, std::path::PathBuf) {
    let root = dir.join("shard");
    for (i, (name, size)) in files.iter().enumerate() {
        write_file(&root, name, *size, i as u64 + 1);
    }
    let source_config = write_config(dir, "source", certs, &dir.join("s"), "127.0.0.1:0", "stall_after_secs = 1");
    let target_extra = "allowed_peers = [\"source\"]\nstall_after_secs = 30";
    let target_config = write_config(dir, "target", certs, &dir.join("t"), "127.0.0.1:0", target_extra);
    let target = Node::start_with(&target_config, &["--stall-after-secs", "1"]);
    let source = Node::start(&source_config);
    (source, target, root)
}

fn signal(node: &Node, signal: libc::c_int) {
    let pid = node.child.as_ref().unwrap().id();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
}

/// The kinds of `id`'s events on `socket`, as they come, from a thread of their own.
fn events(socket: &Path, id: &str) -> mpsc::Receiver<(EventKind, MigrationStatus)> {
    let (tx, rx) = mpsc::channel();
    let (socket, id) = (socket.to_path_buf(), MigrationId::new(id).unwrap());
    let (subscribed_tx, subscribed) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let client = ControlClient::connect(&socket).await.unwrap();
            let mut events = client.migration_events(Some(&id)).await.unwrap();
            subscribed_tx.send(()).unwrap();
            while let Ok(Some(event)) = events.next().await {
                if let MigrationEvent::Status { kind, status } = event {
                    if tx.send((kind, *status)).is_err() {
                        return;
                    }
                }
            }
        });
    });
    subscribed.recv_timeout(WAIT).unwrap();
    rx
}

/// Waits for the next event of `kind`, skipping others; the status it carried.
fn next_event(rx: &mpsc::Receiver<(EventKind, MigrationStatus)>, kind: EventKind) -> MigrationStatus {
    loop {
        let (got, status) = rx.recv_timeout(WAIT).unwrap_or_else(|e| panic!("no {kind:?} event: {e}"));
        if got == kind {
            return status;
        }
    }
}

fn stalled(s: &Value) -> bool {
    s["phase"] == "BaseCopy" && s["no_progress_for_s"].as_u64() >= Some(1)
}

fn moving_again(before: u64) -> impl Fn(&Value) -> bool {
    move |s| s["no_progress_for_s"].is_null() && s["bytes_transferred"].as_u64() > Some(before)
}

#[test]
fn a_frozen_peer_is_flagged_on_the_waiting_side_and_cleared_when_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let (source, target, root) = two_nodes(dir.path(), &certs, &[("a.seg", 4 << 20), ("b.seg", 4 << 20)]);
    let source_events = events(&source.socket, "m-stall");
    let target_events = events(&target.socket, "m-stall");

    // 8 MiB at 1 MB/s: about eight seconds of copy, with room to freeze each side in turn.
    let params = json!({
        "migration_id": "m-stall", "vshard_id": 3, "segments_root": root.display().to_string(),
        "target_address": target.addr, "target_node_id": "target", "offline": true,
        "rate_limit_bytes_per_sec": 1_000_000, "chunk_len_bytes": 65536, "streams": 2,
    });
    source.call("migration.start", params).unwrap();
    let running = source.wait_for("m-stall", "the copy is moving", |s| s["bytes_transferred"].as_u64() > Some(0));
    assert!(running["no_progress_for_s"].is_null(), "{running}");

    // The target frozen: the source waits for acknowledgements and says so.
    signal(&target, libc::SIGSTOP);
    let flagged = source.wait_for("m-stall", "the source flags the stall", stalled);
    let event = next_event(&source_events, EventKind::Stalled);
    assert!(event.no_progress_for_s >= Some(1), "{event:?}");
    let out = Command::new(ferry_bin()).args(["status", "m-stall", "--socket"]).arg(&source.socket).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("no progress for "), "{text}");
    signal(&target, libc::SIGCONT);
    let before = flagged["bytes_transferred"].as_u64().unwrap();
    source.wait_for("m-stall", "the source's flag clears", moving_again(before));
    let event = next_event(&source_events, EventKind::Progressing);
    assert_eq!(event.no_progress_for_s, None);

    // The source frozen: now the target is the one waiting.
    target.wait_for("m-stall", "the target receives", |s| s["bytes_transferred"].as_u64() > Some(0));
    signal(&source, libc::SIGSTOP);
    let flagged = target.wait_for("m-stall", "the target flags the stall", stalled);
    assert_eq!(flagged["role"], "target");
    assert!(next_event(&target_events, EventKind::Stalled).no_progress_for_s >= Some(1));
    signal(&source, libc::SIGCONT);
    let before = flagged["bytes_transferred"].as_u64().unwrap();
    target.wait_for("m-stall", "the target's flag clears", moving_again(before));
    assert_eq!(next_event(&target_events, EventKind::Progressing).no_progress_for_s, None);

    let done = source.wait_for("m-stall", "the copy completes", phase_is("Completed"));
    assert!(done["no_progress_for_s"].is_null(), "a final phase is never stalled: {done}");
}

/// A pseudo-terminal: (controller, the terminal's end for a child's stderr).
fn pty() -> (std::fs::File, OwnedFd) {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty(3) writes two new descriptors into the integers given; no name, termios
    // or window size is asked for.
    let rc = unsafe {
        libc::openpty(&mut controller, &mut terminal, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [controller, terminal] {
        // SAFETY: fcntl(2) on a descriptor just opened. Close-on-exec, so that no other child
        // (the daemons of a test running beside this one) keeps the terminal open.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }, 0);
    }
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(controller), OwnedFd::from_raw_fd(terminal)) }
}

/// Runs `command` with stderr on a terminal and `TERM` set (indicatif draws only then):
/// its output, and what it drew on the terminal.
fn on_terminal(mut command: Command) -> (Output, String) {
    let (mut controller, terminal) = pty();
    let child = command.env("TERM", "xterm").env("FERRY_LOG", "warn").stderr(Stdio::from(terminal)).spawn().unwrap();
    // The command holds our copy of the terminal's end: dropped, the end is the child's alone,
    // and the controller reads until it exits.
    drop(command);
    let drawn = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // EIO once the child closed its end: the end of what it drew.
        let _ = controller.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let out = child.wait_with_output().unwrap();
    (out, drawn.join().unwrap())
}

fn migrate(socket: &Path, root: &Path, target: &str, id: &str) -> Command {
    let mut command = Command::new(ferry_bin());
    command
        .args(["migrate", "--offline", "--vshard", "9", "--target-node", "target", "--rate-limit", "2MB"])
        .args(["--migration-id", id, "--target", target, "--socket"])
        .arg(socket)
        .arg("--segments-root")
        .arg(root)
        .stdout(Stdio::piped());
    command
}

#[test]
fn json_on_stdout_is_untouched_by_the_bars_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let (source, target, root) = two_nodes(dir.path(), &certs, &[("a.seg", 2 << 20)]);

    // --json: the report alone on stdout, exactly as serde_json writes it; nothing drawn.
    let (out, drawn) = on_terminal({
        let mut command = migrate(&source.socket, &root, &target.addr, "m-json");
        command.arg("--json");
        command
    });
    assert!(out.status.success(), "{drawn}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    let status: MigrationStatus = serde_json::from_value(report["status"].clone()).unwrap();
    assert_eq!(status, serde_json::from_value(source.status("m-json")).unwrap());
    // Byte for byte what serde_json writes for the report: its fields in order, the status
    // nested two spaces deeper.
    let nested = serde_json::to_string_pretty(&status).unwrap().replace('\n', "\n  ");
    let expected = format!("{{\n  \"migration_id\": \"m-json\",\n  \"created\": true,\n  \"status\": {nested}\n}}\n");
    assert_eq!(stdout, expected);
    // Progress is a plain line per change (as in a log), never a bar redrawn in place.
    let bar_drawn = drawn.contains('\x1b') || drawn.contains("[#") || drawn.contains("[-");
    assert!(!bar_drawn && drawn.contains("m-json source -> target Completed"), "with --json: {drawn:?}");

    let mut status_json = Command::new(ferry_bin());
    status_json.args(["status", "m-json", "--json", "--socket"]).arg(&source.socket).stdout(Stdio::piped());
    let (out, drawn) = on_terminal(status_json);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let shown: MigrationStatus = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stdout, format!("{}\n", serde_json::to_string_pretty(&shown).unwrap()));
    assert_eq!(shown, status);
    assert!(drawn.is_empty(), "{drawn:?}");

    // Without --json the bars are on the terminal, and stdout has the report's text only.
    let (out, drawn) = on_terminal(migrate(&source.socket, &root, &target.addr, "m-bars"));
    assert!(out.status.success(), "{drawn}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("migration m-bars Completed") && !stdout.contains('\x1b'), "{stdout:?}");
    assert!(drawn.contains("m-bars source") && drawn.contains("ETA") && drawn.contains("Completed"), "{drawn:?}");
}
