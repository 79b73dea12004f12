//! SIGKILL of either side mid-copy, with real `ferry serve` and `ferry copy` processes: the
//! copy completes byte-identical, resending at most one chunk per stream.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use ferry_tests::{ferry_bin, tree_sha256, wait_until_blocking, write_file, Certs};

const CHUNK_LEN: u64 = 256 << 10;
const STREAMS: u64 = 4;
const TOTAL: u64 = 48 << 20;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(certs: &Certs, data_dir: &Path, listen: &str) -> (Proc, String) {
    let mut child = Command::new(ferry_bin())
        .args(["serve", "--node-id", "target", "--allow-peer", "source", "--listen", listen])
        .arg("--certs")
        .arg(certs.dir.path())
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected serve output {line:?}"));
    (Proc(child), addr.to_owned())
}

fn copy_cmd(certs: &Certs, root: &Path, addr: &str, rate: u64) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["copy", "--node-id", "source", "--target-node", "target", "--vshard", "1", "--migration-id", "killed"])
        .args(["--target", addr, "--json"])
        .args([
            "--chunk-len",
            &CHUNK_LEN.to_string(),
            "--streams",
            &STREAMS.to_string(),
            "--rate-limit",
            &rate.to_string(),
        ])
        .arg("--certs")
        .arg(certs.dir.path())
        .arg("--segments-root")
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// Waits until the target's chunk log names about `fraction` of the chunks as received.
fn wait_for_log(data_dir: &Path, fraction: f64) {
    let log = data_dir.join("migrations/killed/.ferry/chunks.log");
    let chunks = TOTAL.div_ceil(CHUNK_LEN) as f64;
    let want = 32 + (chunks * fraction * 2.0) as u64 * 24;
    let reached = || std::fs::metadata(&log).map_or(0, |m| m.len()) >= want;
    wait_until_blocking(&format!("the copy to reach {fraction} of the chunks"), Duration::from_secs(60), reached)
        .unwrap();
}

fn finish(mut copy: Proc) -> serde_json::Value {
    let status = exited(&mut copy.0, "ferry copy to finish", Duration::from_secs(120));
    let mut out = String::new();
    std::io::Read::read_to_string(copy.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "ferry copy failed: {status}; stdout {out}");
    serde_json::from_str(&out).unwrap()
}

/// Waits for `child` to exit; fails the test naming `what` at the deadline.
fn exited(child: &mut Child, what: &str, within: Duration) -> ExitStatus {
    let mut exit = None;
    wait_until_blocking(what, within, || {
        exit = child.try_wait().unwrap();
        exit.is_some()
    })
    .unwrap();
    exit.unwrap()
}

fn setup() -> (Certs, tempfile::TempDir, tempfile::TempDir) {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_file(source.path(), "L1/a.seg", (TOTAL / 2) as usize, 1);
    write_file(source.path(), "L1/b.seg", (TOTAL / 2) as usize, 2);
    (certs, source, data)
}

fn check(report: &serde_json::Value, source: &Path, data: &Path) {
    let resent = report["bytes_resent"].as_u64().unwrap();
    assert!(
        resent <= STREAMS * CHUNK_LEN,
        "resent {resent} bytes after one interruption, bound {}",
        STREAMS * CHUNK_LEN
    );
    assert_eq!(tree_sha256(&data.join("migrations/killed/segments")).unwrap(), tree_sha256(source).unwrap());
}

#[test]
fn sigkill_of_the_target_mid_copy_then_restart_completes_the_copy() {
    let (certs, source, data) = setup();
    let (target, addr) = serve(&certs, data.path(), "127.0.0.1:0");
    let copy = Proc(copy_cmd(&certs, source.path(), &addr, 24 << 20).spawn().unwrap());
    wait_for_log(data.path(), 0.4);
    drop(target); // SIGKILL
    let (_target, _) = serve(&certs, data.path(), &addr);
    let report = finish(copy);
    assert!(report["reconnects_count"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["bytes_resumed"].as_u64().unwrap() >= TOTAL / 4, "resumed too little: {report}");
    check(&report, source.path(), data.path());
}

#[test]
fn sigkill_of_the_source_mid_copy_then_rerun_resumes_it() {
    let (certs, source, data) = setup();
    let (_target, addr) = serve(&certs, data.path(), "127.0.0.1:0");
    let first = Proc(copy_cmd(&certs, source.path(), &addr, 24 << 20).spawn().unwrap());
    wait_for_log(data.path(), 0.4);
    drop(first); // SIGKILL
    let report = finish(Proc(copy_cmd(&certs, source.path(), &addr, 0).spawn().unwrap()));
    assert!(report["bytes_resumed"].as_u64().unwrap() >= TOTAL / 4, "resumed too little: {report}");
    check(&report, source.path(), data.path());
}

/// SIGKILL of the target while a writer appends and the WAL streams: after a restart the copy
/// completes and the staged WAL holds every record of the vShard exactly once.
#[test]
fn sigkill_of_the_target_during_wal_catch_up_loses_and_duplicates_nothing() {
    use ferry_engine::wal::tail::FolderTail;
    use ferry_refnode::walwrite::{RecordSpec, WalWriter, WriterOptions};
    use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode};
    use ferry_wire::{Lsn, VShardId};

    let (certs, source, data) = setup();
    let wal_dir = tempfile::tempdir().unwrap();
    let options = WriterOptions { layout: Layout::A, roll_size_bytes: 1 << 20, ..WriterOptions::default() };
    let mut writer = WalWriter::create(wal_dir.path(), options, Lsn(1)).unwrap();
    let spec = |i: u64| RecordSpec::new(0x8001, VShardId(if i.is_multiple_of(2) { 1 } else { 2 }));
    for i in 0..100u64 {
        writer.append(&spec(i), &i.to_le_bytes()).unwrap();
    }
    writer.flush().unwrap();
    let base_lsn = 100u64;
    let total_records = 40_000u64;
    let tip = base_lsn + total_records;

    let (target, addr) = serve(&certs, data.path(), "127.0.0.1:0");
    let mut cmd = copy_cmd(&certs, source.path(), &addr, 24 << 20);
    cmd.args(["--base-lsn", &base_lsn.to_string(), "--until-lsn", &tip.to_string(), "--wal-layout", "a"])
        .arg("--wal-dir")
        .arg(wal_dir.path());
    let copy = Proc(cmd.spawn().unwrap());
    let writer_thread = std::thread::spawn(move || {
        for i in 100..100 + total_records {
            writer.append(&spec(i), &[7u8; 120]).unwrap();
            if i % 64 == 0 {
                writer.flush().unwrap();
                // The simulated write rate (a group of 64 per 1.5 ms), not a wait.
                std::thread::sleep(Duration::from_micros(1500));
            }
        }
        writer.flush().unwrap();
    });
    // Kill the target once the staged WAL has started and the base is part way.
    let staged_wal = data.path().join("migrations/killed/wal");
    let streaming = || std::fs::read_dir(&staged_wal).map_or(0, |d| d.count()) > 0;
    wait_until_blocking("the WAL stream to start", Duration::from_secs(60), streaming).unwrap();
    wait_for_log(data.path(), 0.3);
    drop(target); // SIGKILL
    let (_target, _) = serve(&certs, data.path(), &addr);
    writer_thread.join().unwrap();
    let report = finish(copy);
    assert_eq!(report["final_lsn"].as_u64().unwrap(), tip, "{report}");
    assert!(report["reconnects_count"].as_u64().unwrap() >= 1, "{report}");
    check(&report, source.path(), data.path());

    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut tail = FolderTail::new(&staged_wal, config, None).unwrap();
    let mut lsns = Vec::new();
    while let Some(record) = tail.poll().unwrap() {
        assert_eq!(record.header.vshard_id, VShardId(1));
        lsns.push(record.header.lsn.0);
    }
    let expected: Vec<u64> = (base_lsn + 1..=tip).filter(|lsn| (lsn - 1) % 2 == 0).collect();
    assert_eq!(lsns.len(), expected.len(), "staged {} records, expected {}", lsns.len(), expected.len());
    assert_eq!(lsns, expected);
}

/// `ferry serve --config FILE` starts from a configuration file, and SIGTERM stops it cleanly
/// with exit status 0.
#[test]
fn serve_reads_its_config_file_and_exits_0_on_sigterm() {
    let certs = Certs::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"target\"\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\nallowed_peers = [\"source\"]\n",
            data.path().join("data"),
            certs.dir.path()
        ),
    )
    .unwrap();
    let mut child = Command::new(ferry_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line:?}");
    assert!(data.path().join("data").is_dir());
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = exited(&mut child, "ferry serve to exit on SIGTERM", Duration::from_secs(20));
    assert!(exit.success(), "{exit}");

    // A configuration with a typo is refused with a message naming the file.
    std::fs::write(&config, "nod_id = \"x\"\n").unwrap();
    let out = Command::new(ferry_bin()).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node.toml") && stderr.contains("nod_id"), "{stderr}");
}
