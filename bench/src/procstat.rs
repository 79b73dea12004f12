//! Memory and CPU time of other processes, read from `/proc`.
//!
//! What it does: parses `RssAnon`, `RssFile` and `RssShmem` from `/proc/<pid>/status`, and the
//! state and `utime + stime` from `/proc/<pid>/stat`; a [`Sampler`] thread reads the status of
//! every watched process every 10 ms and keeps each one's peaks.
//!
//! What it does not: see inside a sampling interval (a peak shorter than 10 ms can be missed),
//! or count the CPU time of a process's reaped children.
//!
//! Notes: pages of a tmpfs file the process maps count as `RssShmem`, not `RssFile`; ferry's
//! source maps its files (mmap reader), so with a shard on tmpfs its mapped file memory shows
//! there. A zombie (exited, not yet reaped) keeps its `utime`/`stime`, which is how
//! [`wait_with_cpu`] reads a finished child's total.

use std::collections::BTreeMap;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

/// The sampling period.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Resident memory of a process, split as the kernel accounts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemorySample {
    pub rss_anon_bytes: u64,
    pub rss_file_bytes: u64,
    pub rss_shmem_bytes: u64,
}

impl MemorySample {
    /// The field-wise maximum.
    pub fn max(self, other: Self) -> Self {
        Self {
            rss_anon_bytes: self.rss_anon_bytes.max(other.rss_anon_bytes),
            rss_file_bytes: self.rss_file_bytes.max(other.rss_file_bytes),
            rss_shmem_bytes: self.rss_shmem_bytes.max(other.rss_shmem_bytes),
        }
    }
}

/// Parses the `Rss*` lines of a `/proc/<pid>/status` text (values are in kB).
pub fn parse_status(text: &str) -> MemorySample {
    let mut sample = MemorySample::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        let bytes = kib.saturating_mul(1024);
        match key {
            "RssAnon" => sample.rss_anon_bytes = bytes,
            "RssFile" => sample.rss_file_bytes = bytes,
            "RssShmem" => sample.rss_shmem_bytes = bytes,
            _ => {}
        }
    }
    sample
}

pub fn read_memory(pid: u32) -> std::io::Result<MemorySample> {
    Ok(parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status"))?))
}

/// The state letter and `utime + stime` in clock ticks from a `/proc/<pid>/stat` text.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    // The command name (field 2) may hold spaces and parentheses: fields after it start
    // after the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime.saturating_add(stime)))
}

/// State and CPU ticks of a live or zombie process.
pub fn read_cpu_ticks(pid: u32) -> anyhow::Result<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).with_context(|| format!("cannot parse /proc/{pid}/stat"))
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks_per_sec() as f64
}

/// Waits for `child` to exit and returns its status and its total CPU time in seconds, read
/// while it is a zombie (before it is reaped).
pub fn wait_with_cpu(child: &mut Child) -> anyhow::Result<(ExitStatus, f64)> {
    let pid = child.id();
    let mut last_ticks = 0;
    loop {
        match read_cpu_ticks(pid) {
            Ok(('Z', ticks)) => {
                last_ticks = ticks;
                break;
            }
            Ok((_, ticks)) => last_ticks = ticks,
            // Gone already (someone reaped it): keep the last reading.
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = child.wait()?;
    Ok((status, ticks_to_secs(last_ticks)))
}

/// Samples the memory of watched processes every [`SAMPLE_INTERVAL`] on its own thread.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    watched: Arc<Mutex<Vec<u32>>>,
    peaks: Arc<Mutex<BTreeMap<u32, MemorySample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let watched: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
        let peaks: Arc<Mutex<BTreeMap<u32, MemorySample>>> = Arc::new(Mutex::new(BTreeMap::new()));
        let thread = {
            let (stop, watched, peaks) = (stop.clone(), watched.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let pids = watched.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    for pid in pids {
                        if let Ok(sample) = read_memory(pid) {
                            let mut peaks = peaks.lock().unwrap_or_else(|e| e.into_inner());
                            let peak = peaks.entry(pid).or_default();
                            *peak = peak.max(sample);
                        }
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
        };
        Self { stop, watched, peaks, thread: Some(thread) }
    }

    /// Starts sampling `pid` (and takes one sample at once).
    pub fn watch(&self, pid: u32) {
        if let Ok(sample) = read_memory(pid) {
            let mut peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner());
            let peak = peaks.entry(pid).or_default();
            *peak = peak.max(sample);
        }
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }

    /// The peaks seen so far for `pid`.
    pub fn peak(&self, pid: u32) -> MemorySample {
        self.peaks.lock().unwrap_or_else(|e| e.into_inner()).get(&pid).copied().unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn status_and_stat_parse() {
        let status = "Name:\tferry\nVmRSS:\t  9000 kB\nRssAnon:\t    1234 kB\nRssFile:\t  56 kB\nRssShmem:\t 7 kB\n";
        let sample = parse_status(status);
        assert_eq!(
            sample,
            MemorySample { rss_anon_bytes: 1234 * 1024, rss_file_bytes: 56 * 1024, rss_shmem_bytes: 7 * 1024 }
        );
        let stat = "4242 (odd) name) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 3 0 100";
        assert_eq!(parse_stat(stat), Some(('S', 175)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(read_memory(pid).unwrap().rss_anon_bytes > 0);
        let sampler = Sampler::start();
        sampler.watch(pid);
        assert!(sampler.peak(pid).rss_anon_bytes > 0);
        let (state, _) = read_cpu_ticks(pid).unwrap();
        assert!(state == 'R' || state == 'S');
    }
}
