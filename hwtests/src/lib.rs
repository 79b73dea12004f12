//! ferry-hwtests: hardware tests for bare-metal CI (NVMe, RDMA): probe, run, skip loudly.
//!
//! What it does: probes this machine for the hardware a test needs ([`probe`]) so each
//! hardware test can run where the hardware is and say loudly, with the reason, where it is
//! not. The `ferry-hwtests` binary runs every probe and the tests that can run.
//!
//! What it does not: run in the plain test run (`cargo test`): machines without the hardware
//! would only ever skip, which proves nothing. Bare-metal CI runs the binary.
//!
//! Today: probes for NVMe controllers and RDMA devices, an O_DIRECT io_uring read of a file on
//! a chosen NVMe-backed folder (`FERRY_HW_NVME_DIR`), and, when asked (`FERRY_HW=rdma`, built
//! with `--features rdma`), an RDMA loopback: the engine's RDMA lanes between two queue pairs
//! of one device (`FERRY_HW_RDMA_DEVICE`, `FERRY_HW_RDMA_PORT`, `FERRY_HW_RDMA_GID_INDEX`),
//! 256 chunks of 1 MiB written and each checked by its CRC32C (see [`rdma`]), and a base copy
//! between the source and target drivers of `ferry serve` over RDMA on that device (see
//! [`rdma_copy`]).
//!
//! Invariants: a test whose hardware is missing is reported as skipped with the reason, never
//! counted as passed.

use std::path::{Path, PathBuf};

/// What the machine has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// NVMe controllers under /sys/class/nvme.
    pub nvme_controllers: Vec<String>,
    /// RDMA devices under /sys/class/infiniband.
    pub rdma_devices: Vec<String>,
    /// A folder on an NVMe device to test in, from `FERRY_HW_NVME_DIR`.
    pub nvme_dir: Option<PathBuf>,
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Probes the machine.
pub fn probe() -> Probe {
    Probe {
        nvme_controllers: list(Path::new("/sys/class/nvme")),
        rdma_devices: list(Path::new("/sys/class/infiniband")),
        nvme_dir: std::env::var_os("FERRY_HW_NVME_DIR").map(PathBuf::from),
    }
}

/// The outcome of one hardware test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed(String),
    Skipped(String),
    Failed(String),
}

/// Reads a 64 MiB file on the NVMe folder with io_uring and O_DIRECT and checks its bytes.
pub fn nvme_direct_read(probe: &Probe) -> Outcome {
    let Some(dir) = &probe.nvme_dir else {
        return Outcome::Skipped(format!(
            "no NVMe test folder: set FERRY_HW_NVME_DIR to a folder on an NVMe device (controllers seen: {:?})",
            probe.nvme_controllers
        ));
    };
    match run_direct_read(dir) {
        Ok(summary) => Outcome::Passed(summary),
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

#[allow(clippy::cast_possible_truncation)] // sizes here are at most 64 MiB
fn run_direct_read(dir: &Path) -> anyhow::Result<String> {
    use ferry_engine::read::{ChunkReader, ReadMode, ReaderConfig, SourceFile};
    let path = dir.join("ferry-hwtest-direct.bin");
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&path, &data)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let started = std::time::Instant::now();
    let result = runtime.block_on(async {
        let reader = ChunkReader::new(ReadMode::UringDirect, ReaderConfig::default())?;
        let file = SourceFile::open_shared(&path)?;
        let mut offset = 0u64;
        while offset < data.len() as u64 {
            let len = (data.len() as u64 - offset).min(1 << 20) as u32;
            let bytes = reader.read(&file, offset, len).await?;
            anyhow::ensure!(bytes[..] == data[offset as usize..][..len as usize], "bytes differ at offset {offset}");
            offset += u64::from(len);
        }
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_file(&path);
    result?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!("64 MiB read with io_uring O_DIRECT and checked in {secs:.3} s ({:.0} MB/s)", 64.0 * 1.048576 / secs))
}

/// Whether `FERRY_HW` (a comma-separated list: `nvme,rdma`) asks for `what`.
pub fn requested(what: &str) -> bool {
    std::env::var("FERRY_HW").is_ok_and(|list| list.split(',').any(|w| w.trim() == what))
}

/// RDMA loopback over the engine's lanes: skipped when not requested; when requested, fails
/// naming what is missing (the build's feature, a device) or runs.
pub fn rdma_transfer(probe: &Probe, requested: bool) -> Outcome {
    rdma_gate(probe, requested).unwrap_or_else(|| run_rdma(RdmaTest::Loopback))
}

/// A base copy between the source and target drivers of `ferry serve` over RDMA: gated as
/// [`rdma_transfer`].
pub fn rdma_copy(probe: &Probe, requested: bool) -> Outcome {
    rdma_gate(probe, requested).unwrap_or_else(|| run_rdma(RdmaTest::Copy))
}

/// Which RDMA test to run.
#[derive(Debug, Clone, Copy)]
enum RdmaTest {
    Loopback,
    Copy,
}

/// The outcome of an RDMA test that cannot run here (not requested, or hardware missing).
fn rdma_gate(probe: &Probe, requested: bool) -> Option<Outcome> {
    if !requested {
        return Some(Outcome::Skipped(format!(
            "not requested: set FERRY_HW=rdma (and FERRY_HW_RDMA_DEVICE) and build with --features rdma (devices seen: {:?})",
            probe.rdma_devices
        )));
    }
    if !cfg!(feature = "rdma") {
        return Some(Outcome::Failed(
            "FERRY_HW=rdma was set, but this binary was built without --features rdma".into(),
        ));
    }
    if probe.rdma_devices.is_empty() {
        return Some(Outcome::Failed(
            "FERRY_HW=rdma was set, but there is no RDMA device under /sys/class/infiniband".into(),
        ));
    }
    None
}

#[cfg(feature = "rdma")]
fn run_rdma(test: RdmaTest) -> Outcome {
    let config = rdma::LoopbackConfig::from_env();
    let result = match test {
        RdmaTest::Loopback => rdma::loopback(&config),
        RdmaTest::Copy => rdma_copy::copy(&config),
    };
    match result {
        Ok(summary) => Outcome::Passed(summary),
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

#[cfg(not(feature = "rdma"))]
fn run_rdma(_test: RdmaTest) -> Outcome {
    Outcome::Failed("built without --features rdma".into())
}

#[cfg(feature = "rdma")]
pub mod rdma;
#[cfg(feature = "rdma")]
pub mod rdma_copy;

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]
    use super::*;

    #[test]
    fn probing_never_fails_and_missing_hardware_skips_with_a_reason() {
        let probe = Probe::default();
        assert!(matches!(nvme_direct_read(&probe), Outcome::Skipped(reason) if reason.contains("FERRY_HW_NVME_DIR")));
        assert!(matches!(rdma_transfer(&probe, false), Outcome::Skipped(reason) if reason.contains("FERRY_HW=rdma")));
        // Requested where it cannot run: a failure that names what is missing.
        let Outcome::Failed(reason) = rdma_transfer(&probe, true) else { panic!("a requested test skipped") };
        assert!(reason.contains("--features rdma") || reason.contains("no RDMA device"), "{reason}");
        let _ = super::probe();
    }
}
