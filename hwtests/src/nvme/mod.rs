//! The NVMe hardware test: O_DIRECT io_uring reads with registered buffers on a folder of an
//! NVMe device, a write-read checksum round trip, and the read rate beside `fio`.
//!
//! What it does: [`nvme_test`] is the gate: skipped when `FERRY_HW` does not ask for `nvme`;
//! when it does, it fails without `FERRY_HW_NVME_DIR`, or when /sys says the folder is not on
//! NVMe (naming the device it is on, see [`sysfs`]); else it runs [`run`]. [`run`] is the body
//! on any folder whose file system takes O_DIRECT: it writes a pattern file and fsyncs it,
//! reads it back with O_DIRECT through registered buffers aligned as `statx` says
//! ([`direct`]) and compares the CRC32C of both, then measures the read rate of that loop and
//! of the engine's `uring-direct` reader beside `fio` at the same queue depth and block size
//! (when fio is on PATH). The tests here run [`run`] on the worktree's disk.
//!
//! What it does not: assert on speed. The ratio to fio is printed against its goal (0.9);
//! the test fails on wrong bytes or errors, never on a rate.
//!
//! Invariants: the pattern file is removed on success and on failure.

pub mod direct;
pub mod sysfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use self::direct::{Alignment, ReadRun, ReadShape};
use crate::{Outcome, Probe};

/// The goal of issue 19: O_DIRECT io_uring reads at this fraction of fio's rate or more.
pub const FIO_RATIO_GOAL: f64 = 0.9;

/// Sizes of a run, from `FERRY_HW_NVME_SIZE`, `FERRY_HW_NVME_QD`, `FERRY_HW_NVME_BS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunConfig {
    pub size_bytes: u64,
    pub shape: ReadShape,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { size_bytes: 1 << 30, shape: ReadShape { queue_depth: 32, block_len_bytes: 1 << 20 } }
    }
}

impl RunConfig {
    /// The defaults (1 GiB, queue depth 32, 1 MiB blocks) with what the variables set; a
    /// value that does not parse is an error naming the variable.
    pub fn from_env() -> anyhow::Result<Self> {
        let mut config = Self::default();
        let number = |name: &str| -> anyhow::Result<Option<u64>> {
            match std::env::var(name) {
                Ok(text) => text.trim().parse().map(Some).with_context(|| format!("{name}={text:?} is not a number")),
                Err(_) => Ok(None),
            }
        };
        if let Some(size) = number("FERRY_HW_NVME_SIZE")? {
            config.size_bytes = size;
        }
        if let Some(qd) = number("FERRY_HW_NVME_QD")? {
            config.shape.queue_depth = u32::try_from(qd).context("FERRY_HW_NVME_QD is too large")?;
        }
        if let Some(bs) = number("FERRY_HW_NVME_BS")? {
            config.shape.block_len_bytes = u32::try_from(bs).context("FERRY_HW_NVME_BS is too large")?;
        }
        Ok(config)
    }
}

/// The gated test: see the module's doc.
pub fn nvme_test(probe: &Probe, requested: bool) -> Outcome {
    if !requested {
        return Outcome::Skipped(format!(
            "not requested: set FERRY_HW=nvme and FERRY_HW_NVME_DIR to a folder on an NVMe device (controllers seen: {:?})",
            probe.nvme_controllers
        ));
    }
    let Some(dir) = &probe.nvme_dir else {
        return Outcome::Failed(format!(
            "FERRY_HW=nvme was set, but FERRY_HW_NVME_DIR is not: set it to a folder on an NVMe device \
             (controllers seen: {:?})",
            probe.nvme_controllers
        ));
    };
    let device = match sysfs::device_of(dir) {
        Ok(device) => device,
        Err(err) => return Outcome::Failed(format!("FERRY_HW_NVME_DIR={}: {err}", dir.display())),
    };
    if !device.is_nvme() {
        return Outcome::Failed(format!(
            "FERRY_HW_NVME_DIR={} is on {}, not NVMe: point it at a folder on an NVMe namespace (controllers seen: {:?})",
            dir.display(),
            device.describe(),
            probe.nvme_controllers
        ));
    }
    let result = RunConfig::from_env().and_then(|config| run(dir, device.logical_block_size_bytes(), &config));
    match result {
        Ok(report) => Outcome::Passed(format!("on {}: {}", device.describe(), report.summary())),
        Err(err) => Outcome::Failed(format!("on {}: {err:#}", device.describe())),
    }
}

/// What [`run`] found.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: RunConfig,
    pub alignment: Alignment,
    pub crc32c_written: u32,
    pub crc32c_read: u32,
    /// The registered-buffer loop's timed read (no checksum).
    pub fixed: ReadRun,
    /// The engine's `uring-direct` reader at the same depth and block size.
    pub engine: ReadRun,
    /// fio's read of the same file, or why there is none.
    pub fio: Result<crate::fio::FioRead, String>,
}

impl Report {
    /// One line: alignment, round trip, rates and ratios.
    pub fn summary(&self) -> String {
        let mbps = |bytes_per_sec: f64| bytes_per_sec / 1e6;
        let shape = self.config.shape;
        let mut line = format!(
            "{} MiB written, fsynced and read back with O_DIRECT READ_FIXED (aligned {}/{} bytes from {:?}), CRC32C {:08x} both ways; \
             qd {} bs {}: registered-buffer loop {:.0} MB/s, engine uring-direct {:.0} MB/s",
            self.config.size_bytes >> 20,
            self.alignment.mem_bytes,
            self.alignment.offset_bytes,
            self.alignment.source,
            self.crc32c_read,
            shape.queue_depth,
            shape.block_len_bytes,
            mbps(self.fixed.bytes_per_sec()),
            mbps(self.engine.bytes_per_sec()),
        );
        match &self.fio {
            Ok(fio) => {
                let base = fio.bytes_per_sec as f64;
                line.push_str(&format!(
                    "; {} {:.0} MB/s: ratio {:.2} (loop) and {:.2} (engine), goal {FIO_RATIO_GOAL}",
                    fio.version,
                    mbps(base),
                    ratio(self.fixed.bytes_per_sec(), base),
                    ratio(self.engine.bytes_per_sec(), base)
                ));
            }
            Err(why) => line.push_str(&format!("; no fio comparison: {why}")),
        }
        line
    }
}

/// `value / base`, 0 when there is no base.
pub fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else {
        0.0
    }
}

/// A pattern file in a folder, removed when dropped.
#[derive(Debug)]
pub struct PatternFile {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub crc32c: u32,
    pub alignment: Alignment,
}

impl PatternFile {
    /// Writes `size_bytes` (rounded up to the alignment) into `dir`, fsyncs it, and finds its
    /// O_DIRECT alignment (`statx`, else `logical_block_size_bytes`).
    pub fn write(dir: &Path, size_bytes: u64, logical_block_size_bytes: Option<u32>) -> anyhow::Result<Self> {
        let path = dir.join(format!("ferry-hwtest-nvme-{}.bin", std::process::id()));
        // Written once to learn the alignment, then at the size that alignment allows.
        let mut file =
            Self { path, size_bytes: 0, crc32c: 0, alignment: probe_alignment(dir, logical_block_size_bytes)? };
        file.size_bytes = size_bytes.max(1).next_multiple_of(u64::from(file.alignment.offset_bytes));
        file.crc32c = direct::write_pattern(&file.path, file.size_bytes, 0x0066_6572_7279)?;
        file.alignment = direct::alignment(&file.path, logical_block_size_bytes)?;
        Ok(file)
    }
}

impl Drop for PatternFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The alignment of a small file in `dir` (statx's answer is per file; the file system decides).
fn probe_alignment(dir: &Path, logical_block_size_bytes: Option<u32>) -> anyhow::Result<Alignment> {
    let path = dir.join(format!("ferry-hwtest-align-{}.bin", std::process::id()));
    std::fs::write(&path, [0u8; 1]).with_context(|| format!("cannot write in {}", dir.display()))?;
    let found = direct::alignment(&path, logical_block_size_bytes);
    let _ = std::fs::remove_file(&path);
    found
}

/// Reads all of `file` with the engine's `uring-direct` reader (one thread, a ring of
/// `queue_depth`, `queue_depth` reads in flight).
pub fn engine_read(file: &PatternFile, shape: ReadShape) -> anyhow::Result<ReadRun> {
    use ferry_engine::read::{ChunkReader, ReadMode, ReaderConfig, SourceFile};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let config = ReaderConfig {
            threads: 1,
            buffers_count: shape.queue_depth as usize,
            chunk_len_max_bytes: shape.block_len_bytes,
            ring_entries: shape.queue_depth,
            ..ReaderConfig::default()
        };
        let reader = Arc::new(ChunkReader::new(ReadMode::UringDirect, config)?);
        let source = SourceFile::open_shared(&file.path)?;
        let block = u64::from(shape.block_len_bytes);
        let mut reads = tokio::task::JoinSet::new();
        let (mut offset, mut bytes) = (0u64, 0u64);
        let started = Instant::now();
        loop {
            while offset < file.size_bytes && reads.len() < shape.queue_depth as usize {
                let len = u32::try_from(block.min(file.size_bytes - offset)).unwrap_or(shape.block_len_bytes);
                let (reader, source) = (Arc::clone(&reader), Arc::clone(&source));
                reads.spawn(async move { reader.read(&source, offset, len).await.map(|b| b.len() as u64) });
                offset += u64::from(len);
            }
            match reads.join_next().await {
                Some(done) => bytes += done??,
                None => break,
            }
        }
        let elapsed = started.elapsed();
        anyhow::ensure!(bytes == file.size_bytes, "the engine read {bytes} of {} bytes", file.size_bytes);
        Ok(ReadRun { bytes, elapsed, crc32c: None })
    })
}

/// The test's body on `dir` (any folder whose file system takes O_DIRECT): see the module's doc.
pub fn run(dir: &Path, logical_block_size_bytes: Option<u32>, config: &RunConfig) -> anyhow::Result<Report> {
    let file = PatternFile::write(dir, config.size_bytes, logical_block_size_bytes)?;
    let checked = direct::read_direct(&file.path, config.shape, &file.alignment, true)?;
    let crc32c_read = checked.crc32c.context("the checked read returned no CRC32C")?;
    anyhow::ensure!(
        crc32c_read == file.crc32c,
        "read back CRC32C {crc32c_read:08x}, written {:08x}: O_DIRECT returned other bytes",
        file.crc32c
    );
    let fixed = direct::read_direct(&file.path, config.shape, &file.alignment, false)?;
    let engine = engine_read(&file, config.shape)?;
    let fio = match crate::fio::find() {
        Some(fio) => crate::fio::run(&fio, &file.path, file.size_bytes, config.shape, crate::fio::FioBuffers::Plain)
            .map_err(|e| format!("{e:#}")),
        None => Err("fio is not on PATH (apt-get install fio)".to_owned()),
    };
    Ok(Report {
        config: RunConfig { size_bytes: file.size_bytes, shape: config.shape },
        alignment: file.alignment,
        crc32c_written: file.crc32c,
        crc32c_read,
        fixed,
        engine,
        fio,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn probe(dir: Option<&Path>) -> Probe {
        Probe { nvme_dir: dir.map(Path::to_path_buf), ..Probe::default() }
    }

    #[test]
    fn not_requested_skips_and_requested_without_a_folder_fails_naming_the_variable() {
        let Outcome::Skipped(why) = nvme_test(&probe(None), false) else { panic!("not skipped") };
        assert!(why.starts_with("not requested") && why.contains("controllers seen"), "{why}");
        let Outcome::Failed(why) = nvme_test(&probe(None), true) else { panic!("not failed") };
        assert!(why.contains("FERRY_HW_NVME_DIR"), "{why}");
    }

    #[test]
    fn requested_on_a_folder_that_is_not_on_nvme_fails_naming_its_device() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Ok(device) = sysfs::device_of(here) else { return eprintln!("SKIP: the worktree has no block device") };
        if device.is_nvme() {
            return eprintln!("SKIP: this worktree is on NVMe ({})", device.describe());
        }
        let Outcome::Failed(why) = nvme_test(&probe(Some(here)), true) else { panic!("not failed") };
        assert!(why.contains(&format!("is on {}, not NVMe", device.describe())), "{why}");
        let missing = here.join("no-such-folder");
        let Outcome::Failed(why) = nvme_test(&probe(Some(&missing)), true) else { panic!("not failed") };
        assert!(why.contains("no-such-folder"), "{why}");
    }

    /// The body on this machine's disk: the round trip and the rates (fio's when installed).
    #[test]
    fn the_round_trip_and_the_fio_comparison_run_on_this_disk() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let lbs = sysfs::device_of(dir.path()).ok().and_then(|d| d.logical_block_size_bytes());
        let config = RunConfig { size_bytes: 16 << 20, shape: ReadShape { queue_depth: 8, block_len_bytes: 1 << 20 } };
        let report = match run(dir.path(), lbs, &config) {
            Ok(report) => report,
            Err(err) => {
                let text = format!("{err:#}");
                assert!(text.contains("io_uring") || text.contains("O_DIRECT"), "{text}");
                // CI's machine has both: there, a skip would hide a broken read path.
                assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, and the read path failed: {text}");
                return eprintln!("SKIP: {text}");
            }
        };
        assert_eq!(report.crc32c_read, report.crc32c_written);
        assert_eq!((report.fixed.bytes, report.engine.bytes), (16 << 20, 16 << 20));
        match (&report.fio, crate::fio::find()) {
            (Ok(fio), Some(_)) => assert_eq!(fio.io_bytes, 16 << 20),
            (Err(why), None) => assert!(why.contains("not on PATH"), "{why}"),
            (Err(why), Some(_)) => panic!("fio is installed but failed: {why}"),
            (Ok(_), None) => panic!("a fio report without fio"),
        }
        let summary = report.summary();
        assert!(summary.contains("CRC32C") && summary.contains("qd 8 bs 1048576"), "{summary}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the pattern file is left behind");
    }

    #[test]
    fn bad_variables_are_named() {
        // Only this test sets these variables; the others read the defaults or pass configs.
        std::env::set_var("FERRY_HW_NVME_QD", "many");
        let err = RunConfig::from_env().unwrap_err();
        std::env::remove_var("FERRY_HW_NVME_QD");
        assert!(err.to_string().contains("FERRY_HW_NVME_QD"), "{err}");
    }
}
