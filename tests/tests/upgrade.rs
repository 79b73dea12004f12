//! Upgrade: daemons of this version take over the on-disk state that ferry 08e9ac3 (the main
//! before the target's inbound migrations became `wire::proto::inbound`) left when both its
//! daemons were SIGKILLed in the middle of a copy.
//!
//! What it checks, on the fixture `fixtures/upgrade-08e9ac3.tar.gz` (made by
//! `fixtures/make-upgrade-fixture.sh` with the 08e9ac3 binary; see that script for what is in
//! it): a new target lists the old stagings before any source connects (the cut copy as
//! `BaseCopy`, the released one as `Completed`/`released`, the tombstone as `Failed`/`aborted`);
//! a new source reads the old phase records (the finished ones kept, the cut one resumed, not
//! aborted), and the cut migration reaches `Completed` with the target's staging
//! byte-identical to the segments root and its MANIFEST `released`; at most one chunk per
//! stream is resent (`bytes_resent`), and the new target receives only what the old one had
//! not verified (plus that chunk per stream), so it resumed from the old chunk log rather than
//! starting afresh; the tombstone is still listed `Failed`/`aborted` at the end.
//!
//! What it does not: test the old binary (the fixture is checked in), a live migration's WAL
//! staging or a fence, or any time (every wait is a generous deadline that fails the test).
//! It never skips: it needs `tar` on the PATH and the UDP port 127.0.0.1:47911, and fails,
//! naming them, without them.
//!
//! Invariants: the fixture is extracted to the fixed root [`ROOT`] and the target listens on
//! [`TARGET_ADDR`], because the old phase records store both (the segments root, the target's
//! address); the root is removed when the test ends, also when it fails ([`FixtureRoot`]).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_engine::control::ControlClient;
use ferry_tests::{ferry_bin, manifest_json, tree_sha256, wait_until_blocking, Certs};
use serde_json::{json, Value};

/// Where the fixture was made, and so where it must be extracted.
const ROOT: &str = "/tmp/ferry-upgrade-fixture";
/// Where the old target listened: the old source's phase record names it.
const TARGET_ADDR: &str = "127.0.0.1:47911";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/upgrade-08e9ac3.tar.gz");
const WAIT: Duration = Duration::from_secs(90);
/// The fixture's phase records were last written when it was made: a default
/// `abort_timeout_secs` (an hour) would abort the cut migration at restart as stale.
const ABORT_TIMEOUT_SECS: u64 = 100 * 365 * 24 * 3600;

/// The extracted fixture; removed when dropped (after the daemons, declared after it, died).
struct FixtureRoot;

impl FixtureRoot {
    fn extract() -> FixtureRoot {
        let root = Path::new(ROOT);
        if root.exists() {
            println!("upgrade: removing a stale {ROOT}");
            std::fs::remove_dir_all(root).unwrap();
        }
        std::fs::create_dir_all(root).unwrap();
        let guard = FixtureRoot;
        println!("upgrade: extracting {FIXTURE} to {ROOT}");
        let out = Command::new("tar")
            .args(["-xzf", FIXTURE, "--no-same-owner", "-C", ROOT])
            .output()
            .unwrap_or_else(|e| panic!("cannot run tar to extract {FIXTURE}: {e}"));
        assert!(out.status.success(), "tar -xzf {FIXTURE}: {}", String::from_utf8_lossy(&out.stderr));
        guard
    }
}

impl Drop for FixtureRoot {
    fn drop(&mut self) {
        println!("upgrade: removing {ROOT}");
        let _ = std::fs::remove_dir_all(ROOT);
    }
}

/// A `ferry serve` process of this version, killed when dropped.
struct Node {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    /// Later stdout lines of the daemon.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Writes `<ROOT>/<name>.toml` (data folder `<ROOT>/<name>-data`, as the old daemon had)
    /// and starts the daemon on it.
    fn start(name: &'static str, peer: &str, certs: &Certs, listen: &str, extra: &str) -> Node {
        let config = Path::new(ROOT).join(format!("{name}.toml"));
        let text = format!(
            "node_id = \"{name}\"\ndata_dir = \"{ROOT}/{name}-data\"\nlisten = \"{listen}\"\ncerts_dir = \"{}\"\n\
             allowed_peers = [\"{peer}\"]\nprogress_interval_ms = 0\nabort_timeout_secs = {ABORT_TIMEOUT_SECS}\n{extra}\n",
            certs.dir.path().display()
        );
        std::fs::write(&config, text).unwrap();
        let stderr = std::fs::File::create(Path::new(ROOT).join(format!("{name}.err"))).unwrap();
        let mut child = Command::new(ferry_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (addr, socket) = match ferry_tests::daemons::read_banner(&mut out) {
            Ok(banner) => banner,
            Err(line) => {
                let _ = child.wait();
                let log = std::fs::read_to_string(Path::new(ROOT).join(format!("{name}.err"))).unwrap_or_default();
                panic!("the new {name} daemon did not start (stdout {line:?}): {log}");
            }
        };
        // Keep draining stdout so the daemon never blocks on a full pipe.
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        println!("upgrade: {name} daemon (new binary) listening on {addr}");
        Node { name, child, socket, lines }
    }

    /// The next stdout line starting with `prefix` (others are skipped).
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line =
                self.lines.recv_timeout(left).unwrap_or_else(|e| panic!("{}: no line {prefix:?}: {e}", self.name));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = ControlClient::connect(&self.socket).await.unwrap();
            client.call(method, params).await.map_err(|e| match e.rpc() {
                Some(rpc) => (rpc.code, rpc.message.clone()),
                None => panic!("{}: {method}: {e}", self.name),
            })
        })
    }

    fn status(&self, id: &str) -> Value {
        self.call("migration.status", json!({ "migration_id": id }))
            .unwrap_or_else(|e| panic!("{}: migration.status {id}: {e:?}", self.name))
    }

    /// Every migration `migration.list` shows, by id.
    fn list(&self) -> std::collections::BTreeMap<String, Value> {
        let list = self.call("migration.list", json!({})).unwrap();
        let all = list["migrations"].as_array().unwrap_or_else(|| panic!("{list}"));
        all.iter().map(|m| (m["migration_id"].as_str().unwrap().to_owned(), m.clone())).collect()
    }

    /// Waits until the migration's status satisfies `done`; fails the test at the deadline.
    fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut status = Value::Null;
        let reached = || {
            status = self.status(id);
            assert!(
                status["phase"] != "Failed" || done(&status),
                "{}: {id} failed waiting for {what}: {status}",
                self.name
            );
            done(&status)
        };
        wait_until_blocking(what, WAIT, reached).unwrap_or_else(|e| panic!("{}: {e}: {status}", self.name));
        status
    }
}

/// `ferry_bytes_received_total` of a daemon's metrics endpoint.
fn bytes_received_total(metrics_line: &str) -> u64 {
    let addr = metrics_line.trim_start_matches("metrics at http://").trim_end_matches("/metrics");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ferry_bytes_received_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ferry_bytes_received_total in {text}"))
}

fn assert_listed(list: &std::collections::BTreeMap<String, Value>, id: &str, phase: &str, staging_state: &str) {
    let m = list.get(id).unwrap_or_else(|| panic!("{id} is not listed: {list:?}"));
    assert_eq!((m["phase"].as_str(), m["staging_state"].as_str()), (Some(phase), Some(staging_state)), "{id}: {m}");
}

#[test]
fn daemons_of_this_version_resume_a_copy_cut_by_sigkill_under_08e9ac3() {
    // The fixed port first: a taken one would otherwise show as an obscure failure to resume.
    if let Err(e) = std::net::UdpSocket::bind(TARGET_ADDR) {
        panic!(
            "UDP {TARGET_ADDR} is taken ({e}): the fixture's phase record names the target there; \
             stop whatever listens on port 47911 and run again"
        );
    }
    let _root = FixtureRoot::extract();
    let fixture: Value = serde_json::from_slice(&std::fs::read(Path::new(ROOT).join("fixture.json")).unwrap()).unwrap();
    println!("upgrade: fixture {fixture}");
    assert_eq!((fixture["root"].as_str(), fixture["target_address"].as_str()), (Some(ROOT), Some(TARGET_ADDR)));
    let (resumed, released, tombstone) = ("m-upgrade", "m-done", "m-tomb");
    let chunk_len_bytes = fixture["chunk_len_bytes"].as_u64().unwrap();
    let streams = fixture["streams"].as_u64().unwrap();
    let bytes_total = fixture["bytes_total"].as_u64().unwrap();
    let verified_before_kill = fixture["bytes_verified_before_kill"].as_u64().unwrap();
    let target_data = Path::new(ROOT).join("target-data");
    let staging = target_data.join("migrations").join(resumed);
    assert!(!staging.join("MANIFEST.json").exists(), "the fixture's copy was not cut mid-way");
    assert!(0 < verified_before_kill && verified_before_kill < bytes_total, "{fixture}");

    // Certificates are not part of the state: new ones for the same node ids.
    let certs = Certs::new().unwrap();
    let target = Node::start("target", "source", &certs, TARGET_ADDR, "metrics_addr = \"127.0.0.1:0\"");
    let metrics = target.line("metrics at ");

    println!("upgrade: the new target lists the old stagings before any source connects");
    let listed = target.list();
    assert_listed(&listed, resumed, "BaseCopy", "copying");
    assert_listed(&listed, released, "Completed", "released");
    assert_listed(&listed, tombstone, "Failed", "aborted");

    let source = Node::start("source", "target", &certs, "127.0.0.1:0", "");
    println!("upgrade: the new source reads the old phase records");
    let listed = source.list();
    assert_eq!(listed.get(resumed).map(|m| m["role"].as_str()), Some(Some("source")), "{listed:?}");
    assert_ne!(listed[resumed]["phase"], "Failed", "{}", listed[resumed]);
    assert_eq!(listed.get(released).map(|m| m["phase"].as_str()), Some(Some("Completed")), "{listed:?}");
    assert_eq!(listed.get(tombstone).map(|m| m["phase"].as_str()), Some(Some("Failed")), "{listed:?}");
    // The fixture's 512 KiB/s is kept across the restart; lift it (the copy may be done already).
    match source.call("migration.set_rate_limit", json!({ "migration_id": resumed, "bytes_per_sec": 0 })) {
        Ok(_) => println!("upgrade: {resumed} resumed, rate limit lifted"),
        Err((-32006, message)) => println!("upgrade: {resumed} resumed and not running any more: {message}"),
        Err(e) => panic!("set_rate_limit {resumed}: {e:?}"),
    }

    let done = source.wait_for(resumed, "the resumed copy to complete", |s| s["phase"] == "Completed");
    println!("upgrade: {resumed} completed on the source: {done}");
    let resent = done["bytes_resent"].as_u64().unwrap();
    assert!(resent <= streams * chunk_len_bytes, "more than a chunk per stream resent: {done}");
    assert_eq!(done["staging_state"], "released", "{done}");
    let on_target = target.wait_for(resumed, "the target to release", |s| s["phase"] == "Completed");
    assert_eq!(on_target["staging_state"], "released", "{on_target}");
    assert_eq!(manifest_json(&target_data, resumed).unwrap()["state"], "released");
    let shard = Path::new(ROOT).join("shard");
    assert_eq!(
        tree_sha256(&staging.join("segments")).unwrap(),
        tree_sha256(&shard).unwrap(),
        "the staging differs from the segments root"
    );

    // Resumed, not restarted: the new target received what the old one had not verified.
    let received = bytes_received_total(&metrics);
    println!(
        "upgrade: the new target received {received} of {bytes_total} bytes ({verified_before_kill} verified by 08e9ac3)"
    );
    assert!(received > 0, "the new target received nothing");
    assert!(
        received <= bytes_total - verified_before_kill + streams * chunk_len_bytes,
        "the new target received {received} bytes: it did not resume from the old chunk log \
         ({verified_before_kill} of {bytes_total} were verified before the kill)"
    );

    let listed = target.list();
    assert_listed(&listed, tombstone, "Failed", "aborted");
    assert_listed(&listed, released, "Completed", "released");
    assert_eq!(manifest_json(&target_data, tombstone).unwrap()["state"], "aborted");
    assert_eq!(manifest_json(&target_data, released).unwrap()["state"], "released");
    println!("upgrade: the tombstone {tombstone} and the released {released} are still listed");
}
