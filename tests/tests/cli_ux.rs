//! The `ferry` binary as a user meets it at the command line, off the happy path: output
//! piped into a reader that leaves early, an empty segments root, sizes with units, host
//! names, `ferry copy --transport rdma` where RDMA cannot be had (a loud fallback, or an
//! immediate failure with --require-rdma), a daemon started without a node id or
//! certificates, log lines in a file.
//!
//! What it checks: exit statuses and what stdout and stderr say, as a user would read them
//! (no panic message, an error that names the flag to give, no colour codes off a terminal).
//!
//! What it does not: time anything, or check the copies beyond their reports (base_copy.rs
//! and kill.rs do).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::storage::DiskStorage;
use ferry_refnode::{RefWriter, RefWriterConfig};
use ferry_tests::{ferry_bin, ferry_copy_command, node, node_config, wait_until_blocking, write_file, Certs, Target};
use ferry_wire::VShardId;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A stdout whose reader is already gone: every write to it fails with EPIPE, as a pipe into
/// `head -1` does once `head` has exited (a socket, so that no write can race the close).
fn gone_reader() -> Stdio {
    let (reader, writer) = UnixStream::pair().unwrap();
    drop(reader);
    Stdio::from(OwnedFd::from(writer))
}

/// Runs `ferry ARGS` with stdout gone; returns its exit and stderr.
fn run_with_stdout_gone(args: &[&str]) -> Output {
    Command::new(ferry_bin()).args(args).stdout(gone_reader()).stderr(Stdio::piped()).output().unwrap()
}

fn assert_quiet_success(what: &str, out: &Output) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    assert!(out.status.success(), "{what}: exit {:?}\n{stderr}", out.status);
    assert!(!stderr.contains("error"), "{what} reported an error for a reader that left:\n{stderr}");
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_reader_that_leaves_early_is_no_panic_for_any_printing_command() {
    // Printing without a daemon.
    assert_quiet_success("serve --print-default-config", &run_with_stdout_gone(&["serve", "--print-default-config"]));
    let certs_dir = tempfile::tempdir().unwrap();
    let dir = certs_dir.path().to_str().unwrap();
    assert_quiet_success("certs init", &run_with_stdout_gone(&["certs", "init", "--dir", dir]));
    assert_quiet_success("certs issue", &run_with_stdout_gone(&["certs", "issue", "--dir", dir, "--name", "n"]));
    assert!(certs_dir.path().join("n.pem").exists(), "the command did its work before printing");

    // `ferry status` and `ferry list` against a daemon, into a reader that is gone.
    let certs = Certs::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = node_config(&certs, "target", data.path(), "source");
    let daemon = runtime.block_on(ferry_engine::node::RunningNode::start(&config)).unwrap();
    let socket = daemon.socket().to_str().unwrap().to_owned();
    for command in ["status", "list"] {
        for json in [false, true] {
            let mut args = vec![command, "--socket", &socket];
            if json {
                args.push("--json");
            }
            assert_quiet_success(&args.join(" "), &run_with_stdout_gone(&args));
        }
    }
    runtime.block_on(daemon.shutdown());

    // `ferry wal dump | head -1`: the reader takes one line of far more than a pipe holds.
    let wal = tempfile::tempdir().unwrap();
    let config =
        RefWriterConfig { writes_max_count: 4_000, ..RefWriterConfig::new(wal.path().join("wal"), VShardId(7)) };
    let writer = RefWriter::start(config).unwrap();
    let written = || writer.acked_count() >= 4_000;
    wait_until_blocking("the reference writer to write 4,000 records", Duration::from_secs(30), written).unwrap();
    writer.stop().unwrap();
    let mut dump = Command::new(ferry_bin())
        .args(["wal", "dump", "--json", "--dir"])
        .arg(wal.path().join("wal"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(dump.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with('{'), "{first:?}");
    // The reader is gone now (dropped with its BufReader), like `head -1` after one line.
    let mut stderr = String::new();
    dump.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = dump.wait().unwrap();
    assert_quiet_success("wal dump", &Output { status, stdout: Vec::new(), stderr: stderr.into_bytes() });
}

#[test]
fn copy_refuses_an_empty_root_and_takes_sizes_with_units_and_host_names() {
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = runtime.block_on(async { Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap() });
    let addr = target.addr.to_string();

    // An empty root is refused, naming the way to say it is intended.
    let empty = tempfile::tempdir().unwrap();
    let out = ferry_copy_command(&certs, empty.path(), &addr, "empty").output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "an empty segments root was copied:\n{}", text(&out.stdout));
    assert!(stderr.contains("holds no files") && stderr.contains("--allow-empty"), "{stderr}");
    assert!(!target_dir.path().join("migrations/empty").exists(), "nothing reached the target");
    let out = ferry_copy_command(&certs, empty.path(), &addr, "empty").arg("--allow-empty").output().unwrap();
    assert!(out.status.success(), "--allow-empty: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("copied 0 files"), "{}", text(&out.stdout));

    // A missing root: its cause is said once.
    let out = ferry_copy_command(&certs, &empty.path().join("missing"), &addr, "missing").output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");

    // Sizes with units and a host name, as `migrate` and `set-rate` take them.
    let root = tempfile::tempdir().unwrap();
    write_file(root.path(), "L0/a.seg", 600 << 10, 1);
    let by_name = format!("localhost:{}", target.addr.port());
    let out = ferry_copy_command(&certs, root.path(), &by_name, "units")
        .args(["--rate-limit", "500MB", "--chunk-len", "256KiB", "--max-held-wal-bytes", "1GiB", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files_count"], 1, "{report}");

    // A name that does not resolve is named; a size that is not one says what to give.
    let out = ferry_copy_command(&certs, root.path(), "node-b.invalid:7070", "units").output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("\"node-b.invalid\""), "{stderr}");
    let out = ferry_copy_command(&certs, root.path(), &addr, "units").args(["--chunk-len", "1G"]).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("GiB"), "{stderr}");

    runtime.block_on(async { target.stop() });
}

#[test]
fn copy_with_transport_rdma_falls_back_loudly_here_and_require_rdma_fails_at_once_saying_why() {
    let certs = Certs::new().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = runtime.block_on(async { Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap() });
    let addr = target.addr.to_string();
    let root = tempfile::tempdir().unwrap();
    write_file(root.path(), "L0/a.seg", 300 << 10, 3);

    // This machine has no RDMA device (and this build may lack the `rdma` feature): the copy
    // goes over QUIC, says so on stderr, and its report names the transport and the reason.
    let rdma = ["--transport", "rdma", "--rdma-port", "1", "--rdma-gid-index", "0"];
    let out = ferry_copy_command(&certs, root.path(), &addr, "rdma-json").args(rdma).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["chunk_transport"], "quic", "{report}");
    let reason = report["rdma_fallback_reason"].as_str().unwrap_or_else(|| panic!("no reason: {report}"));
    assert!(reason.contains("rdma") || reason.contains("RDMA"), "{reason}");
    assert!(text(&out.stderr).contains("RDMA FALLBACK"), "{}", text(&out.stderr));
    let out = ferry_copy_command(&certs, root.path(), &addr, "rdma-line").args(rdma).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("chunks over quic: rdma fell back ({reason})")),
        "{}",
        text(&out.stdout)
    );

    // --require-rdma fails before connecting, naming the flag and why; nothing is staged.
    let started = std::time::Instant::now();
    let out = ferry_copy_command(&certs, root.path(), &addr, "rdma-required")
        .args(["--transport", "rdma", "--require-rdma", "--rdma-device", "mlx5_9"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(stderr.contains("--require-rdma") && stderr.contains("rdma cannot be used: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "it failed at once, not after retries");
    assert!(!target_dir.path().join("migrations/rdma-required").exists(), "nothing reached the target");
    let out = ferry_copy_command(&certs, root.path(), &addr, "rdma-alone").arg("--require-rdma").output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("--require-rdma needs --transport rdma"));
    let out = ferry_copy_command(&certs, root.path(), &addr, "tcp").args(["--transport", "tcp"]).output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("use quic or rdma"), "{}", text(&out.stderr));

    // --help says what each flag does.
    let help = Command::new(ferry_bin()).args(["copy", "--help"]).output().unwrap();
    // Words as the help has them, whatever its line wrapping.
    let help = text(&help.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for flag in ["--transport", "--rdma-device", "--rdma-port", "--rdma-gid-index", "--require-rdma"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains("falls back to QUIC") && help.contains("`rdma` feature"), "{help}");
    runtime.block_on(async { target.stop() });
}

#[test]
fn serve_needs_a_node_id_says_where_certificates_are_looked_for_and_logs_without_colour() {
    let certs = Certs::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = |args: &[&str]| {
        Command::new(ferry_bin())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path().join("d"))
            .args(args)
            .output()
            .unwrap()
    };

    // No --node-id and no config file: an error, not node-a.
    let out = serve(&["--certs", certs.dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no node id") && stderr.contains("--node-id"), "{stderr}");

    // No --certs: the error names the flag and the config key besides `ferry certs init`.
    if !Path::new("/etc/ferry/certs").exists() {
        let out = serve(&["--node-id", "target"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        for needle in ["--certs DIR", "certs_dir", "ferry certs init --dir /etc/ferry/certs"] {
            assert!(stderr.contains(needle), "{needle:?} missing from {stderr}");
        }
    }

    // A config file without node_id: the default's id, with a warning saying so; the log
    // lines in a pipe carry no colour codes.
    certs::issue(certs.dir.path(), &node("node-a"), &IssueOptions::default()).unwrap();
    let config = data.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n",
            data.path().join("d"),
            certs.dir.path()
        ),
    )
    .unwrap();
    let mut child = Proc(
        Command::new(ferry_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut log = String::new();
    while !log.contains("listening") {
        let Some(line) = lines.next() else { panic!("ferry serve stopped:\n{log}") };
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    assert!(log.contains("WARN") && log.contains("node-a") && log.contains("default"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal:\n{log:?}");
}
