//! ferry-hwtests: hardware tests for bare-metal CI (NVMe, RDMA): probe, run, skip loudly.
//!
//! What it does: probes this machine for the hardware a test needs ([`probe`]) so each
//! hardware test can run where the hardware is and say loudly, with the reason, where it is
//! not. The `ferry-hwtests` binary runs every probe and the tests that can run.
//!
//! What it does not: run the hardware tests in the plain test run: machines without the
//! hardware would only ever skip, which proves nothing. Bare-metal CI runs the binary. The
//! crate's own tests (`cargo test -p ferry-hwtests`) run what needs no hardware: the /sys
//! lookup on fixtures and on this machine, the O_DIRECT read loop and the fio comparison on
//! this machine's disk, and the RDMA fallback through real `ferry serve` processes.
//!
//! The tests, each run only when `FERRY_HW` (a comma-separated list) asks for its kind:
//! - `nvme` ([`nvme`]): the block device behind `FERRY_HW_NVME_DIR` found through /sys and
//!   checked to be NVMe; O_DIRECT io_uring reads into registered buffers aligned as `statx`
//!   says; a write-read CRC32C round trip; the read rate beside `fio` ([`fio`]).
//! - `rdma` (built with `--features rdma`): a loopback over the engine's lanes ([`rdma`]); a
//!   base copy between the source and target drivers in this process ([`rdma_copy`]); a base
//!   copy between two `ferry serve` processes ([`rdma_daemons::daemon_copy`]); and the
//!   fallback of a daemon on a missing device ([`rdma_daemons::fallback`], no hardware needed).
//!
//! Requested hardware that is missing fails, naming what is missing (the variable, the device,
//! the build's feature); a test not requested is skipped with what the probe saw.
//!
//! Invariants: a test is never counted as passed without running: not requested, it is
//! skipped with the reason; requested without its hardware, it fails.

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

/// The NVMe test, gated on `FERRY_HW=nvme` (see [`nvme::nvme_test`]).
pub fn nvme_direct_read(probe: &Probe, requested: bool) -> Outcome {
    nvme::nvme_test(probe, requested)
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

/// A base copy between two `ferry serve` processes over RDMA: gated as [`rdma_transfer`].
pub fn rdma_daemon_copy(probe: &Probe, requested: bool) -> Outcome {
    rdma_gate(probe, requested).unwrap_or_else(|| run_rdma(RdmaTest::DaemonCopy))
}

/// A daemon asked for RDMA on a device that does not exist falls back to QUIC loudly, and
/// refuses to start with `require_rdma`. Runs when `FERRY_HW` asks for `rdma`, with or without
/// a device (it needs none).
pub fn rdma_fallback(probe: &Probe, requested: bool) -> Outcome {
    if !requested {
        return not_requested(probe);
    }
    let result = daemons::ferry_bin().and_then(|bin| rdma_daemons::fallback(&bin, &std::env::temp_dir()));
    match result {
        Ok(summary) => Outcome::Passed(summary),
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Which RDMA test to run.
#[derive(Debug, Clone, Copy)]
enum RdmaTest {
    Loopback,
    Copy,
    DaemonCopy,
}

fn not_requested(probe: &Probe) -> Outcome {
    Outcome::Skipped(format!(
        "not requested: set FERRY_HW=rdma (and FERRY_HW_RDMA_DEVICE) and build with --features rdma (devices seen: {:?})",
        probe.rdma_devices
    ))
}

/// The outcome of an RDMA test that cannot run here (not requested, or hardware missing).
fn rdma_gate(probe: &Probe, requested: bool) -> Option<Outcome> {
    if !requested {
        return Some(not_requested(probe));
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
    let config = rdma_daemons::RdmaConfig::from_env();
    let result = match test {
        RdmaTest::Loopback => rdma::loopback(&config),
        RdmaTest::Copy => rdma_copy::copy(&config),
        RdmaTest::DaemonCopy => daemons::ferry_bin().and_then(|bin| rdma_daemons::daemon_copy(&bin, &config)),
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

pub mod daemons;
pub mod fio;
pub mod nvme;
#[cfg(feature = "rdma")]
pub mod rdma;
#[cfg(feature = "rdma")]
pub mod rdma_copy;
pub mod rdma_daemons;

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]
    use super::*;

    #[test]
    fn probing_never_fails_and_missing_hardware_skips_with_a_reason() {
        let probe = Probe::default();
        assert!(
            matches!(nvme_direct_read(&probe, false), Outcome::Skipped(reason) if reason.contains("FERRY_HW_NVME_DIR"))
        );
        for test in [rdma_transfer, rdma_copy, rdma_daemon_copy, rdma_fallback] {
            assert!(matches!(test(&probe, false), Outcome::Skipped(reason) if reason.starts_with("not requested")));
        }
        // Requested where it cannot run: a failure that names what is missing.
        for test in [rdma_transfer, rdma_copy, rdma_daemon_copy] {
            let Outcome::Failed(reason) = test(&probe, true) else { panic!("a requested test skipped") };
            assert!(reason.contains("--features rdma") || reason.contains("no RDMA device"), "{reason}");
        }
        let _ = super::probe();
    }
}
