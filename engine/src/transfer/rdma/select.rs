//! Choosing the chunk transport: QUIC, or RDMA when asked for and usable.
//!
//! What it does: lists the RDMA devices this machine has and whether the configured port is
//! up ([`probe_devices`], from `/sys/class/infiniband`, no verbs call), and decides
//! ([`choose`]): RDMA when it was asked for, built in and a device is usable; otherwise QUIC,
//! with the reason kept for a loud log line, an event and a metric; or an error when
//! `require_rdma` is set. A transfer that asked for RDMA and ships over QUIC is reported the
//! same way, and queued in [`FallbackNotices`] for the daemon's per-migration event.
//!
//! What it does not: open a device (the `sideway` adapter does) or move chunks.
//!
//! Invariants: the decision is a pure function of the settings, the build and the probe, so
//! every branch is tested here without hardware.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_wire::MigrationId;
use serde::{Deserialize, Serialize};

/// Where the kernel lists RDMA devices.
pub const SYSFS_DEVICES: &str = "/sys/class/infiniband";
/// Devices looked at, at most (a machine has a handful).
const DEVICES_MAX: usize = 64;

/// Fallbacks from RDMA to QUIC since the process started (the `ferry_rdma_fallbacks_total`
/// metric).
pub static FALLBACKS_TOTAL: AtomicU64 = AtomicU64::new(0);

/// The configured chunk transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportSetting {
    #[default]
    Quic,
    Rdma,
}

/// The device port RDMA uses unless told (`rdma_port`, `ferry copy --rdma-port`).
pub const RDMA_PORT_DEFAULT: u8 = 1;
/// The GID table index unless told (`rdma_gid_index`, `ferry copy --rdma-gid-index`).
pub const RDMA_GID_INDEX_DEFAULT: u8 = 0;

/// Which device, port and GID a node uses for RDMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    /// A device name (`mlx5_0`); none: the first usable one.
    pub device: Option<String>,
    pub port: u8,
    pub gid_index: u8,
    /// Fail instead of falling back to QUIC.
    pub require: bool,
}

/// One RDMA device as `node.info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub port: u8,
    /// The port's state word from sysfs (`ACTIVE`, `DOWN`...), `missing` without that port.
    pub port_state: String,
    pub usable: bool,
}

/// What a node's chunks go over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Quic,
    Rdma {
        device: String,
    },
    /// RDMA was asked for and cannot be had: QUIC, and why.
    QuicFallback {
        reason: String,
    },
}

/// RDMA was required and cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rdma is required (require_rdma = true) but cannot be used: {0}; fix the device or unset require_rdma")]
pub struct RdmaRequired(pub String);

/// Whether this binary was built with the `rdma` feature.
pub const COMPILED: bool = cfg!(feature = "rdma");

/// The devices under `root` (normally [`SYSFS_DEVICES`]) and their `port`'s state.
pub fn probe_devices(root: &Path, port: u8) -> Vec<DeviceStatus> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut names: Vec<String> =
        entries.flatten().take(DEVICES_MAX).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let state_path = root.join(&name).join("ports").join(port.to_string()).join("state");
            // The file reads like `4: ACTIVE`.
            let port_state = std::fs::read_to_string(state_path)
                .map(|s| s.rsplit(':').next().unwrap_or_default().trim().to_owned())
                .unwrap_or_else(|_| "missing".to_owned());
            let usable = port_state == "ACTIVE";
            DeviceStatus { name, port, port_state, usable }
        })
        .collect()
}

/// The decision; `compiled` is [`COMPILED`] outside tests.
pub fn choose(
    want: TransportSetting,
    settings: &RdmaSettings,
    compiled: bool,
    devices: &[DeviceStatus],
) -> Result<Choice, RdmaRequired> {
    if want == TransportSetting::Quic {
        return Ok(Choice::Quic);
    }
    let reason = if !compiled {
        "this ferry was built without the `rdma` feature".to_owned()
    } else {
        let usable = devices.iter().filter(|d| d.usable);
        let mut named = usable.filter(|d| settings.device.as_ref().is_none_or(|want| *want == d.name));
        match named.next() {
            Some(device) => return Ok(Choice::Rdma { device: device.name.clone() }),
            None if devices.is_empty() => format!("no RDMA device under {SYSFS_DEVICES}"),
            None => {
                let seen: Vec<String> =
                    devices.iter().map(|d| format!("{} port {}: {}", d.name, d.port, d.port_state)).collect();
                match &settings.device {
                    Some(want) => format!("device {want} is not among the usable ones ({})", seen.join(", ")),
                    None => format!("no device has an active port ({})", seen.join(", ")),
                }
            }
        }
    };
    if settings.require {
        return Err(RdmaRequired(reason));
    }
    Ok(Choice::QuicFallback { reason })
}

/// Whether `ferry serve` ships a transfer's chunks over the RDMA lanes: yes, when this
/// decision chose RDMA (built with `rdma`, a usable device), the node's copies and inbound
/// transfers negotiate RDMA lanes on their chunk connections ([`super::attach`]) and fall
/// back to QUIC per transfer, loudly, where the peer cannot take them.
pub const DAEMON_SHIPS_RDMA: bool = true;

/// What a node runs with, as `node.info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportStatus {
    pub configured: TransportSetting,
    pub in_use: TransportSetting,
    /// Why RDMA was asked for and QUIC is used.
    pub fallback_reason: Option<String>,
    /// The device the node's RDMA lanes use, when RDMA is in use.
    pub rdma_device: Option<String>,
    pub rdma_compiled: bool,
    pub devices: Vec<DeviceStatus>,
}

/// Probes, decides and reports: the daemon's start. An error when RDMA is required and cannot
/// be had.
pub fn settle(want: TransportSetting, settings: &RdmaSettings) -> Result<TransportStatus, RdmaRequired> {
    let devices = if want == TransportSetting::Rdma || COMPILED {
        probe_devices(Path::new(SYSFS_DEVICES), settings.port)
    } else {
        Vec::new()
    };
    let choice = match choose(want, settings, COMPILED, &devices)? {
        Choice::Rdma { device } if !DAEMON_SHIPS_RDMA => {
            let reason = format!("device {device} is usable, but ferry serve does not ship chunks over RDMA yet");
            if settings.require {
                return Err(RdmaRequired(reason));
            }
            Choice::QuicFallback { reason }
        }
        other => other,
    };
    let (in_use, fallback_reason, rdma_device) = match choice {
        Choice::Quic => (TransportSetting::Quic, None, None),
        Choice::Rdma { device } => (TransportSetting::Rdma, None, Some(device)),
        Choice::QuicFallback { reason } => {
            report_fallback(&reason, None);
            (TransportSetting::Quic, Some(reason), None)
        }
    };
    Ok(TransportStatus { configured: want, in_use, fallback_reason, rdma_device, rdma_compiled: COMPILED, devices })
}

/// Says loudly that RDMA was asked for and QUIC is used: a warning and the fallback metric
/// (the daemon also publishes it as an event). `migration`: the transfer that fell back (none:
/// the node's start).
pub fn report_fallback(reason: &str, migration: Option<&MigrationId>) {
    FALLBACKS_TOTAL.fetch_add(1, Ordering::Relaxed);
    match migration {
        None => tracing::warn!(
            reason,
            "RDMA FALLBACK: transport = \"rdma\" was configured but cannot be used; chunks go over QUIC"
        ),
        Some(id) => tracing::warn!(
            migration = %id,
            reason,
            "RDMA FALLBACK: this transfer asked for rdma and cannot have it; its chunks go over QUIC"
        ),
    }
}

/// Transfers that asked for RDMA and ship over QUIC, until the daemon publishes them as
/// `rdma_fallback` events: the migration and why. Clones share one queue.
#[derive(Debug, Clone, Default)]
pub struct FallbackNotices(Arc<Mutex<VecDeque<(MigrationId, String)>>>);

/// Notices kept until the daemon's next event tick, at most (the oldest go first; the log
/// line and the metric count every fallback regardless).
const FALLBACK_NOTICES_MAX: usize = 64;

impl FallbackNotices {
    pub fn push(&self, id: &MigrationId, reason: &str) {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= FALLBACK_NOTICES_MAX {
            queue.pop_front();
        }
        queue.push_back((id.clone(), reason.to_owned()));
    }

    /// Every notice not taken yet, oldest first.
    pub fn take(&self) -> Vec<(MigrationId, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn settings(device: Option<&str>, require: bool) -> RdmaSettings {
        RdmaSettings { device: device.map(str::to_owned), port: 1, gid_index: 0, require }
    }

    #[test]
    fn a_node_that_asks_for_rdma_here_says_why_it_uses_quic_or_fails_when_required() {
        let before = FALLBACKS_TOTAL.load(Ordering::Relaxed);
        let status = settle(TransportSetting::Rdma, &settings(None, false)).unwrap();
        assert_eq!(status.in_use, TransportSetting::Quic);
        assert!(status.fallback_reason.is_some());
        assert!(FALLBACKS_TOTAL.load(Ordering::Relaxed) > before, "the fallback is counted");
        assert!(settle(TransportSetting::Rdma, &settings(None, true)).is_err());
        let quic = settle(TransportSetting::Quic, &settings(None, true)).unwrap();
        assert_eq!((quic.in_use, quic.fallback_reason), (TransportSetting::Quic, None));
    }

    #[test]
    fn fallback_notices_keep_the_newest_and_are_taken_once() {
        let notices = FallbackNotices::default();
        let shared = notices.clone();
        for i in 0..FALLBACK_NOTICES_MAX + 3 {
            shared.push(&MigrationId::new(format!("m-{i}")).unwrap(), "no device");
        }
        let taken = notices.take();
        assert_eq!(taken.len(), FALLBACK_NOTICES_MAX);
        assert_eq!(taken.first().map(|(id, _)| id.as_str()), Some("m-3"), "the oldest went first");
        assert!(notices.take().is_empty());
    }

    #[test]
    fn the_probe_reads_each_device_s_port_state() {
        let root = tempfile::tempdir().unwrap();
        for (name, state) in [("mlx5_1", "1: DOWN"), ("mlx5_0", "4: ACTIVE")] {
            let port = root.path().join(name).join("ports/1");
            std::fs::create_dir_all(&port).unwrap();
            std::fs::write(port.join("state"), format!("{state}\n")).unwrap();
        }
        std::fs::create_dir_all(root.path().join("rxe0")).unwrap();
        let devices = probe_devices(root.path(), 1);
        let summary: Vec<_> = devices.iter().map(|d| (d.name.as_str(), d.port_state.as_str(), d.usable)).collect();
        assert_eq!(summary, [("mlx5_0", "ACTIVE", true), ("mlx5_1", "DOWN", false), ("rxe0", "missing", false)]);
        assert!(probe_devices(&root.path().join("none"), 1).is_empty());
    }

    #[test]
    fn rdma_is_chosen_only_when_built_asked_for_and_usable() {
        let up = DeviceStatus { name: "mlx5_0".into(), port: 1, port_state: "ACTIVE".into(), usable: true };
        let down = DeviceStatus { name: "mlx5_1".into(), port: 1, port_state: "DOWN".into(), usable: false };
        let both = [down.clone(), up.clone()];
        assert_eq!(choose(TransportSetting::Quic, &settings(None, true), true, &[]), Ok(Choice::Quic));
        assert_eq!(
            choose(TransportSetting::Rdma, &settings(None, false), true, &both),
            Ok(Choice::Rdma { device: "mlx5_0".into() })
        );
        let fallback = |s: &RdmaSettings, compiled, devices: &[DeviceStatus]| match choose(
            TransportSetting::Rdma,
            s,
            compiled,
            devices,
        )
        .unwrap()
        {
            Choice::QuicFallback { reason } => reason,
            other => panic!("{other:?}"),
        };
        assert!(fallback(&settings(None, false), false, &both).contains("without the `rdma` feature"));
        assert!(fallback(&settings(None, false), true, &[]).contains("no RDMA device"));
        assert!(fallback(&settings(Some("mlx5_1"), false), true, &both).contains("mlx5_1 port 1: DOWN"));
        assert!(fallback(&settings(None, false), true, &[down]).contains("no device has an active port"));
        let err = choose(TransportSetting::Rdma, &settings(None, true), true, &[]).unwrap_err();
        assert!(err.to_string().contains("require_rdma") && err.to_string().contains("no RDMA device"), "{err}");
    }
}
