//! The pieces of the interference benchmark (issue 21): the reference writer in a process of
//! its own, driven over a pipe, processes pinned to a core, and the writer's ack latency per
//! time window.
//!
//! What it does:
//! - [`pin_command`] / [`pin_self`]: `sched_setaffinity` to one core, for a child (in
//!   `pre_exec`) or for this process.
//! - [`WriterChild`]: the bench binary run again as `writer` (a [`ferry_refnode::RefWriter`]
//!   on its own, [`run_writer_child`]), pinned to a core. It takes one command per line on
//!   stdin and answers one line on stdout: `lsn`, `pause`, `resume-source`,
//!   `resume-target DIR`, `stop FILE` (the acks go to FILE as little-endian `due_ns, ack_ns`
//!   pairs). [`WriterChild`] implements the coordinator's [`WriteControl`], so the reference
//!   cut-over pauses and resumes a writer in another process.
//! - [`window`]: the acks of the writes *due* in a window: p50, p99, p99.9, max, and the
//!   longest gap between consecutive acks inside it.
//!
//! What it does not: assert on anything, or run the daemons (the binary does).
//!
//! Invariants: every stamp is CLOCK_MONOTONIC ns, which is one clock for every process on the
//! host, so windows the bench stamps and acks the child stamps compare directly. The child is
//! killed and reaped when its handle drops.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context};
use ferry_engine::cli::coordinator::WriteControl;
use ferry_refnode::{RefWriter, RefWriterConfig};
use ferry_wire::VShardId;

/// The migrating vShard of the bench.
pub const VSHARD: VShardId = VShardId(7);

/// Sets the calling thread's (or, before exec, the child's) CPU affinity to `core`.
fn set_affinity(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set, and CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` is checked against the set's size first.
    unsafe {
        if core >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(core, &mut set);
    }
    // SAFETY: pid 0 is the calling thread; the set lives across the call.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins a child to `core` (its threads inherit the mask).
pub fn pin_command(command: &mut Command, core: usize) {
    // SAFETY: the closure runs between fork and exec and only makes one syscall
    // (sched_setaffinity), which is async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || set_affinity(core));
    }
}

/// Pins this process's calling thread (call it before starting other threads: they inherit).
pub fn pin_self(core: usize) -> anyhow::Result<()> {
    set_affinity(core).with_context(|| format!("cannot pin this process to core {core}"))
}

/// The acks of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub due_ns: u64,
    pub ack_ns: u64,
}

/// The writer's ack latency over the writes due in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct WindowStats {
    pub writes_count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The longest time between two consecutive acks of writes in the window.
    pub longest_gap_us: f64,
}

/// Nearest-rank quantile of a sorted slice.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0)
}

/// The stats of the writes due in [`from_ns`, `to_ns`) (`acks` in writer order).
pub fn window(acks: &[Ack], from_ns: u64, to_ns: u64) -> WindowStats {
    let inside: Vec<&Ack> = acks.iter().filter(|a| a.due_ns >= from_ns && a.due_ns < to_ns).collect();
    let mut latencies: Vec<u64> = inside.iter().map(|a| a.ack_ns.saturating_sub(a.due_ns)).collect();
    latencies.sort_unstable();
    let mut ack_times: Vec<u64> = inside.iter().map(|a| a.ack_ns).collect();
    ack_times.sort_unstable();
    let gap = ack_times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let us = |ns: u64| ns as f64 / 1e3;
    WindowStats {
        writes_count: latencies.len() as u64,
        p50_us: us(quantile(&latencies, 0.5)),
        p99_us: us(quantile(&latencies, 0.99)),
        p999_us: us(quantile(&latencies, 0.999)),
        max_us: us(latencies.last().copied().unwrap_or(0)),
        longest_gap_us: us(gap),
    }
}

/// Reads a `stop FILE` ack file.
pub fn read_acks(path: &Path) -> anyhow::Result<Vec<Ack>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(bytes.len() % 16 == 0, "{} is not whole ack pairs", path.display());
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[i..i + 8]);
                u64::from_le_bytes(w)
            };
            Ack { due_ns: word(0), ack_ns: word(8) }
        })
        .collect())
}

/// The reference writer in a child process (see the module docs).
#[derive(Debug)]
pub struct WriterChild {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
    /// Where the routing flip sends the migrating vShard's writes (the target node's WAL).
    pub target_node_wal: Option<PathBuf>,
}

impl WriterChild {
    /// Starts `exe writer --wal-dir DIR --rate RATE` pinned to `core`, and waits for its ready line.
    pub fn start(exe: &Path, wal_dir: &Path, rate_writes_per_sec: u64, core: Option<usize>) -> anyhow::Result<Self> {
        let mut command = Command::new(exe);
        command
            .arg("writer")
            .arg("--wal-dir")
            .arg(wal_dir)
            .arg("--rate")
            .arg(rate_writes_per_sec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(core) = core {
            pin_command(&mut command, core);
        }
        let mut child = command.spawn().with_context(|| format!("cannot start {} writer", exe.display()))?;
        let pid = child.id();
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout pipe")?);
        let mut writer = Self { child, stdin, stdout, pid, target_node_wal: None };
        let ready = writer.read_line()?;
        anyhow::ensure!(ready == "ready", "the writer child said {ready:?}, expected ready");
        Ok(writer)
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        anyhow::ensure!(n > 0, "the writer child ended");
        Ok(line.trim().to_owned())
    }

    /// Sends one command and returns the answer's words after the expected first word.
    fn call(&mut self, command: &str, expect: &str) -> anyhow::Result<Vec<u64>> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let line = self.read_line()?;
        let mut words = line.split_whitespace();
        if words.next() != Some(expect) {
            bail!("the writer child answered {command:?} with {line:?}");
        }
        words.map(|w| w.parse::<u64>().with_context(|| format!("odd answer {line:?}"))).collect()
    }

    /// The last acknowledged source LSN.
    pub fn acked_lsn(&mut self) -> anyhow::Result<u64> {
        self.call("lsn", "lsn")?.first().copied().context("no LSN in the answer")
    }

    /// Stops the writer and reads its acks (through a file in `dir`).
    pub fn stop(mut self, dir: &Path) -> anyhow::Result<Vec<Ack>> {
        let path = dir.join(format!("acks-{}.bin", self.pid));
        self.call(&format!("stop {}", path.display()), "stopped")?;
        let acks = read_acks(&path)?;
        let _ = std::fs::remove_file(&path);
        Ok(acks)
    }
}

impl Drop for WriterChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WriteControl for WriterChild {
    fn pause(&mut self) -> anyhow::Result<(u64, u64)> {
        match self.call("pause", "paused")?.as_slice() {
            [lsn, at_ns] => Ok((*lsn, *at_ns)),
            other => bail!("odd pause answer {other:?}"),
        }
    }

    /// The routing flip: the vShard's writes go to [`WriterChild::target_node_wal`] (or stay on
    /// the source when it is not set).
    fn resume_on_target(&mut self) -> anyhow::Result<u64> {
        let command = match &self.target_node_wal {
            Some(dir) => format!("resume-target {}", dir.display()),
            None => "resume-source".to_owned(),
        };
        self.call(&command, "resumed")?.first().copied().context("no time in the answer")
    }

    fn resume_on_source(&mut self) -> anyhow::Result<u64> {
        self.call("resume-source", "resumed")?.first().copied().context("no time in the answer")
    }
}

/// The `writer` side: a [`RefWriter`] on `wal_dir` at `rate`, driven by lines on stdin.
pub fn run_writer_child(wal_dir: &Path, rate_writes_per_sec: u64) -> anyhow::Result<()> {
    let mut config = RefWriterConfig::new(wal_dir, VSHARD);
    config.rate_writes_per_sec = rate_writes_per_sec;
    let writer = RefWriter::start(config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut input = String::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    loop {
        input.clear();
        if lines.read_line(&mut input)? == 0 {
            return Ok(());
        }
        let line = input.trim();
        let (command, arg) = line.split_once(' ').unwrap_or((line, ""));
        match command {
            "lsn" => writeln!(out, "lsn {}", writer.acked_lsn().0)?,
            "pause" => {
                let ticket = writer.pause()?;
                writeln!(out, "paused {} {}", ticket.last_acked_lsn.0, ticket.paused_at_ns)?;
            }
            "resume-source" => writeln!(out, "resumed {}", writer.resume_on_source())?,
            "resume-target" => writeln!(out, "resumed {}", writer.resume_on_target(Path::new(arg))?)?,
            "stop" => {
                let log = writer.stop()?;
                let mut bytes = Vec::with_capacity(usize::try_from(log.writes_count()).unwrap_or(0) * 16);
                for w in log.writes() {
                    bytes.extend_from_slice(&w.due_ns.to_le_bytes());
                    bytes.extend_from_slice(&w.ack_ns.to_le_bytes());
                }
                std::fs::write(arg, bytes)?;
                writeln!(out, "stopped")?;
                out.flush()?;
                return Ok(());
            }
            other => writeln!(out, "error unknown command {other:?}")?,
        }
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_window_takes_the_writes_due_in_it() {
        let acks: Vec<Ack> = (0..1000u64).map(|i| Ack { due_ns: i * 1000, ack_ns: i * 1000 + 10_000 + i }).collect();
        let w = window(&acks, 100_000, 200_000);
        assert_eq!(w.writes_count, 100);
        assert!((w.p50_us - 10.149).abs() < 1e-9, "{w:?}");
        assert!((w.max_us - 10.199).abs() < 1e-9, "{w:?}");
        assert!((w.longest_gap_us - 1.001).abs() < 1e-9, "{w:?}");
        assert_eq!(window(&acks, 5_000_000, 6_000_000), WindowStats::default());
    }
}
