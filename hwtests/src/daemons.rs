//! `ferry serve` processes for the hardware tests and benches: started from a config file,
//! talked to over their control sockets, their metrics scraped and their log kept.
//!
//! What it does: [`ferry_bin`] finds the `ferry` binary (building it with the features this
//! crate was built with when run under cargo); [`Certs`] makes a CA and the `source` and
//! `target` certificates; [`Node::start`] starts `ferry serve --config FILE`, waits for its
//! banner (`listening on`, `control socket at`, `metrics at`) and keeps its stderr in a file;
//! [`Node::call`] makes one control call; [`Node::metric`] reads one value from `/metrics`;
//! [`refusal`] runs a daemon that is expected to refuse to start and returns what it said.
//!
//! What it does not: choose what the daemons do (the RDMA tests and the bench do).
//!
//! Invariants: a started daemon is killed and reaped when its [`Node`] drops; every wait has a
//! deadline that ends in an error naming what did not happen.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::control::ControlClient;
use ferry_wire::NodeId;
use serde_json::Value;

/// How long a daemon has to print its banner, or to refuse to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `ferry` binary: `FERRY_BIN`; else, under cargo (`CARGO` set), `cargo build -p
/// ferry-engine --bin ferry` with `--features rdma` when this crate has it, then the binary
/// next to this executable; else that binary if it exists.
pub fn ferry_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(path));
    }
    let bin = ferry_beside_this_executable()?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut command = Command::new(cargo);
        // Without the variables cargo sets for a test or `cargo run` (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, OUT_DIR...): build scripts that watch them (ring's) would make
        // this build and the caller's rebuild each other every time.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            let kept = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name_text.as_ref())
                || name_text.starts_with("CARGO_BUILD_");
            if (name_text.starts_with("CARGO_") && !kept) || name_text == "OUT_DIR" {
                command.env_remove(&name);
            }
        }
        command.args(["build", "--quiet", "-p", "ferry-engine", "--bin", "ferry"]);
        if cfg!(feature = "rdma") {
            command.args(["--features", "rdma"]);
        }
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let status = command.status().context("cannot run cargo to build the ferry binary")?;
        anyhow::ensure!(status.success(), "building the ferry binary failed ({status})");
    }
    anyhow::ensure!(
        bin.exists(),
        "no ferry binary at {}: build it with `cargo build -p ferry-engine --bin ferry --features rdma` or set FERRY_BIN",
        bin.display()
    );
    Ok(bin)
}

/// Where `ferry` is when cargo built it with this executable: `target/<profile>/ferry` (also
/// for a test binary in `target/<profile>/deps/`). It may not exist.
pub fn ferry_beside_this_executable() -> anyhow::Result<PathBuf> {
    let mut dir = std::env::current_exe()?;
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir.join("ferry"))
}

/// A CA and the `source` and `target` node certificates in a folder.
#[derive(Debug)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        certs::init_ca(dir, false)?;
        for name in ["source", "target"] {
            let node = NodeId::new(name).map_err(|e| anyhow::anyhow!("node id {name}: {e}"))?;
            certs::issue(dir, &node, &IssueOptions::default())?;
        }
        Ok(Self { dir: dir.to_path_buf() })
    }
}

/// Writes `dir/<name>.toml` for node `name` with its data folder `dir/<name>-data`, metrics on
/// a free loopback port, and `extra` lines (transport, allowed peers...).
pub fn write_config(dir: &Path, name: &str, certs: &Certs, extra: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "node_id = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ncerts_dir = \"{}\"\n\
         metrics_addr = \"127.0.0.1:0\"\nprogress_interval_ms = 0\n{extra}\n",
        dir.join(format!("{name}-data")).display(),
        certs.dir.display()
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A running `ferry serve`, killed when dropped.
#[derive(Debug)]
pub struct Node {
    child: Child,
    pub addr: String,
    pub socket: PathBuf,
    pub metrics: Option<String>,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
    /// Its data folder, from the config's name (`<name>-data` beside the config).
    pub data_dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `ferry serve --config CONFIG`, stderr to `CONFIG.log`; the child and its stdout lines.
fn spawn(bin: &Path, config: &Path) -> anyhow::Result<(Child, PathBuf, mpsc::Receiver<String>)> {
    let log = config.with_extension("log");
    let stderr = std::fs::File::create(&log)?;
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {} serve", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok((child, log, lines))
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

impl Node {
    /// Starts a daemon and waits for its banner; an error carrying its log if it exits first.
    pub fn start(bin: &Path, config: &Path) -> anyhow::Result<Self> {
        let (child, log, lines) = spawn(bin, config)?;
        let name = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let data_dir = config.with_file_name(format!("{name}-data"));
        let mut node = Self { child, addr: String::new(), socket: PathBuf::new(), metrics: None, log, data_dir };
        let deadline = Instant::now() + START_TIMEOUT;
        while node.addr.is_empty() || node.socket.as_os_str().is_empty() || node.metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        node.addr = addr.trim().to_owned();
                    } else if let Some(socket) = line.strip_prefix("control socket at ") {
                        node.socket = PathBuf::from(socket.trim());
                    } else if let Some(url) = line.strip_prefix("metrics at ") {
                        node.metrics = Some(url.trim().to_owned());
                    }
                }
                Err(_) => {
                    let status = node.child.try_wait().ok().flatten();
                    anyhow::bail!(
                        "ferry serve --config {} did not print its banner within {START_TIMEOUT:?} (exit: {status:?}); its log:\n{}",
                        config.display(),
                        read_log(&node.log)
                    );
                }
            }
        }
        Ok(node)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// One control call; an error carrying the daemon's answer.
    pub fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut client = ControlClient::connect(&self.socket)
                .await
                .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
            client.call(method, params).await.with_context(|| format!("{method} failed"))
        })
    }

    /// The scrape of `/metrics`.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let url = self.metrics.as_deref().context("the daemon serves no metrics")?;
        let rest = url.strip_prefix("http://").context("metrics URL is not http")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
        let mut stream = std::net::TcpStream::connect(host).with_context(|| format!("cannot connect to {host}"))?;
        stream.set_read_timeout(Some(START_TIMEOUT))?;
        write!(stream, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "GET {url}: {}", text.lines().next().unwrap_or_default());
        Ok(text)
    }

    /// The value of the sample `name` (no labels) in `/metrics`.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.scrape()?;
        metric_value(&text, name).with_context(|| format!("no sample {name} in the daemon's /metrics"))
    }

    /// Polls `migration.status` of `id` until it is `Completed`; an error with the reason when
    /// it fails, or at the deadline.
    pub fn wait_completed(&self, id: &str, within: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.call("migration.status", serde_json::json!({ "migration_id": id }));
            match status {
                Ok(status) if status["phase"] == "Completed" => return Ok(status),
                Ok(status) if status["phase"] == "Failed" => anyhow::bail!("migration {id} failed: {status}"),
                Ok(status) if Instant::now() >= deadline => {
                    anyhow::bail!("migration {id} did not complete within {within:?}: {status}")
                }
                // Not there yet, or not done.
                Ok(_) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(_) | Err(_) => anyhow::bail!("migration {id} never appeared within {within:?}"),
            }
        }
    }
}

/// The value of an unlabelled sample `name` in a Prometheus or OpenMetrics text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' ').and_then(|v| v.split_whitespace().next()?.parse().ok()))
}

/// Runs a daemon that should refuse to start: its exit status and its log (an error if it
/// starts serving instead, or hangs).
pub fn refusal(bin: &Path, config: &Path) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let (mut child, log, lines) = spawn(bin, config)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, read_log(&log)));
        }
        if let Ok(line) = lines.try_recv() {
            if line.starts_with("listening on") {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("ferry serve --config {} started instead of refusing", config.display());
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "ferry serve --config {} neither served nor exited within {START_TIMEOUT:?}",
                config.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn metric_values_are_read_from_both_text_formats() {
        let prometheus = "# HELP ferry_rdma_fallbacks_total Times.\n# TYPE ferry_rdma_fallbacks_total counter\n\
                          ferry_rdma_fallbacks_total 2\nferry_rdma_fallbacks_total_other 9\n";
        assert_eq!(metric_value(prometheus, "ferry_rdma_fallbacks_total"), Some(2.0));
        let openmetrics = "ferry_bytes_sent_total 10\nferry_rdma_fallbacks_total 1 1700000000.0\n# EOF\n";
        assert_eq!(metric_value(openmetrics, "ferry_rdma_fallbacks_total"), Some(1.0));
        assert_eq!(metric_value(openmetrics, "ferry_missing"), None);
    }
}
