//! Real `ferry serve` processes for scenario tests: a node started from a config file and
//! talked to over its control socket, and a two-node cluster (source and target on loopback).
//!
//! What it does not: hide failures. Every wait has a generous deadline that fails the test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_engine::control::ControlClient;
use serde_json::{json, Value};

use crate::{ferry_bin, wait_until_blocking, write_file, Certs};

pub const WAIT: Duration = Duration::from_secs(90);

/// Reads the two lines `ferry serve` starts with: its QUIC address and its control socket's
/// path. A line that is not what it should be is handed back.
pub fn read_banner(out: &mut impl BufRead) -> Result<(String, PathBuf), String> {
    let (mut listening, mut control) = (String::new(), String::new());
    out.read_line(&mut listening).map_err(|e| e.to_string())?;
    out.read_line(&mut control).map_err(|e| e.to_string())?;
    let addr = listening.trim().strip_prefix("listening on ").ok_or_else(|| listening.clone())?.to_owned();
    let socket = control.trim().strip_prefix("control socket at ").ok_or_else(|| control.clone())?;
    Ok((addr, PathBuf::from(socket)))
}

/// A `ferry serve` process, killed when dropped.
#[derive(Debug)]
pub struct Node {
    pub child: Option<Child>,
    pub addr: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Later stdout lines of the daemon (behind a lock, so a `&Node` can go to other threads).
    pub lines: std::sync::Mutex<std::sync::mpsc::Receiver<String>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn write_config(dir: &Path, name: &str, certs: &Certs, data_dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "node_id = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{listen}\"\ncerts_dir = \"{}\"\nprogress_interval_ms = 0\n{extra}\n",
        data_dir.display(),
        certs.dir.path().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Node {
    pub fn start(config: &Path) -> Node {
        Node::start_with(config, &[])
    }

    /// `ferry serve ARGS --config CONFIG`: flags beside the config file.
    pub fn start_with(config: &Path, args: &[&str]) -> Node {
        Node::start_via(&[], config, args)
    }

    /// [`Node::start_with`] run by the command `prefix` (its words; empty: none), for example
    /// `ip netns exec NAME` to run the daemon on a host of its own ([`crate::netns`]).
    pub fn start_via(prefix: &[&str], config: &Path, args: &[&str]) -> Node {
        let mut command = match prefix.split_first() {
            Some((program, words)) => {
                let mut command = Command::new(program);
                command.args(words).arg(ferry_bin());
                command
            }
            None => Command::new(ferry_bin()),
        };
        let mut child = command
            .arg("serve")
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (addr, socket) = read_banner(&mut out).unwrap_or_else(|line| panic!("{line:?}"));
        // Keep draining stdout so the daemon never blocks on a full pipe.
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Node { child: Some(child), addr, socket, config: config.to_path_buf(), lines: std::sync::Mutex::new(lines) }
    }

    /// The next stdout line starting with `prefix` (others are skipped).
    pub fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            let line = lines.recv_timeout(left).unwrap_or_else(|e| panic!("no line {prefix:?}: {e}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    pub fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String, Option<Value>)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = ControlClient::connect(&self.socket).await.unwrap();
            client.call(method, params).await.map_err(|e| match e.rpc() {
                Some(rpc) => (rpc.code, rpc.message.clone(), rpc.data.clone()),
                None => panic!("{method}: {e}"),
            })
        })
    }

    pub fn status(&self, id: &str) -> Value {
        self.call("migration.status", json!({ "migration_id": id })).unwrap()
    }

    /// Waits until the migration's status satisfies `done`; fails the test at the deadline.
    pub fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(id, what, WAIT, done)
    }

    /// [`Node::wait_for`] with a deadline of `within` instead of [`WAIT`].
    pub fn wait_for_within(&self, id: &str, what: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let mut status = Value::Null;
        let reached = || {
            // Not there yet (an inbound migration appears when its source connects) is waited for.
            status = match self.call("migration.status", json!({ "migration_id": id })) {
                Ok(status) => status,
                Err((-32002, message, _)) => json!({ "not_found": message }),
                Err(e) => panic!("{e:?}"),
            };
            done(&status)
        };
        wait_until_blocking(what, within, reached).unwrap_or_else(|e| panic!("{e}: {status}"));
        status
    }

    pub fn signal(&mut self, signal: libc::c_int) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        child.wait().unwrap()
    }
}

#[derive(Debug)]
pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub _certs: Certs,
    pub source_root: PathBuf,
    pub target_data: PathBuf,
    pub source: Node,
    pub target: Node,
}

pub fn cluster(source_extra: &str, target_extra: &str, files: &[(&str, usize)]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let source_root = dir.path().join("shard");
    for (i, (name, size)) in files.iter().enumerate() {
        write_file(&source_root, name, *size, i as u64 + 1);
    }
    let target_data = dir.path().join("target-data");
    let source_config =
        write_config(dir.path(), "source", &certs, &dir.path().join("source-data"), "127.0.0.1:0", source_extra);
    let target_config = write_config(
        dir.path(),
        "target",
        &certs,
        &target_data,
        "127.0.0.1:0",
        &format!("allowed_peers = [\"source\"]\n{target_extra}"),
    );
    let target = Node::start(&target_config);
    let source = Node::start(&source_config);
    Cluster { _dir: dir, _certs: certs, source_root, target_data, source, target }
}

impl Cluster {
    pub fn params(&self, id: &str, vshard: u32, rate: u64) -> Value {
        json!({
            "migration_id": id, "vshard_id": vshard, "segments_root": self.source_root.display().to_string(),
            "target_address": self.target.addr, "target_node_id": "target", "offline": true,
            "rate_limit_bytes_per_sec": rate, "chunk_len_bytes": 262144, "streams": 2,
        })
    }

    pub fn staged(&self, id: &str) -> PathBuf {
        self.target_data.join("migrations").join(id)
    }

    pub fn manifest_state(&self, id: &str) -> String {
        let text = std::fs::read_to_string(self.staged(id).join("MANIFEST.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["state"].as_str().unwrap().to_owned()
    }

    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.source_root.join(".ferry-snapshot").join(id)
    }
}

pub fn phase_is(phase: &'static str) -> impl Fn(&Value) -> bool {
    move |s| s["phase"] == phase
}
