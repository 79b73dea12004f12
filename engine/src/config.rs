//! The node daemon's configuration file (`ferry serve --config node.toml`).
//!
//! What it does: defines every setting `ferry serve` uses today, each with a default, parses
//! TOML into it (unknown keys are an error, so a typo is not silently ignored), checks it, and
//! prints the defaults as a commented file (`ferry serve --print-default-config`).
//!
//! What it does not: hold settings for parts not built yet (the fence); they are added with the
//! code that reads them.
//!
//! Invariants: a config that loads has passed `check` (node ids are valid); a key the file
//! does not set has its default, and an unknown key is refused, never ignored.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use ferry_wire::NodeId;

use crate::priority::{
    BulkPriority, BulkThreads, CpuPriority, IoPriority, BULK_THREADS_DEFAULT_COUNT, BULK_THREADS_MAX_COUNT,
};
use crate::transfer::rdma::select::{RdmaSettings, TransportSetting};

/// Settings of one node daemon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id: the name in its certificate, and what peers expect.
    pub node_id: String,
    /// Staging lands in `<data_dir>/migrations/<migration_id>/`.
    pub data_dir: PathBuf,
    /// QUIC listen address for peers.
    pub listen: SocketAddr,
    /// Folder made by `ferry certs` holding `ca.pem`, `<node_id>.pem`, `<node_id>-key.pem`.
    pub certs_dir: PathBuf,
    /// Node ids allowed to connect; empty: any node with a certificate from the cluster CA.
    pub allowed_peers: Vec<String>,
    /// How often inbound progress is logged, in milliseconds (0: never).
    pub progress_interval_ms: u64,
    /// The coordinator's Unix socket; its folder must be 0700 (created so when missing).
    /// Default: `<data_dir>/control/ferry.sock`.
    pub control_socket: Option<PathBuf>,
    /// Uids allowed on the control socket besides the daemon's own.
    pub control_allowed_uids: Vec<u32>,
    /// Inbound migrations received at once; a new one over it is refused (0: unlimited).
    pub max_inbound_migrations: usize,
    /// Outbound migrations run at once; a start over it is refused (0: unlimited).
    pub max_outbound_migrations: usize,
    /// Bytes per second shared by every outbound migration (0: unlimited).
    pub rate_limit_bytes_per_sec: u64,
    /// Most bytes of WAL segments held (hard-linked) per migration; over it the migration fails.
    pub max_held_wal_bytes: u64,
    /// An unfinished migration found at start whose record is older than this is aborted.
    pub abort_timeout_secs: u64,
    /// An outbound migration whose target keeps failing transiently (no answer, a lost
    /// connection) fails after this long without progress; permanent failures fail at once.
    pub retry_deadline_secs: u64,
    /// A migration with work left that makes no progress for this many seconds is flagged
    /// stalled (`no_progress_for_s`, a `stalled` event, `ferry_migrations_stalled`); 0: never.
    pub stall_after_secs: u64,
    /// A peer heard nothing from for this long is taken as gone: its connections close and an
    /// outbound migration reconnects. A keep-alive goes out every fifth of it. The smaller of
    /// both ends' values governs a connection, and a handshake must finish within it.
    pub quic_idle_timeout_ms: u32,
    /// Refuse an inbound migration whose base does not fit in the data folder's free space.
    pub check_free_space: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`); none: no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Log lines on stderr as `text` or `json` (the global `--log-format` flag wins).
    pub log_format: LogFormatSetting,
    /// The chunk transport asked for: `quic`, or `rdma` (needs the `rdma` build and a device
    /// with an active port; otherwise QUIC, said loudly, or an error with `require_rdma`).
    pub transport: TransportSetting,
    /// The RDMA device (`mlx5_0`); none: the first with an active port.
    pub rdma_device: Option<String>,
    /// The device's port.
    pub rdma_port: u8,
    /// The GID table index (RoCE v2 is usually not 0).
    pub rdma_gid_index: u8,
    /// Fail the daemon's start instead of falling back to QUIC.
    pub require_rdma: bool,
    /// Threads of a source's bulk work (chunk connections, chunk reads and sends), apart from
    /// the control, WAL and fence paths; 0: bulk work shares the daemon's threads.
    pub bulk_threads: usize,
    /// CPU priority of those threads and of the io_uring readers: `idle` (SCHED_IDLE),
    /// `batch` (SCHED_BATCH at nice 10) or `normal` (the daemon's).
    pub bulk_cpu_priority: CpuPriority,
    /// I/O priority of the same threads: `idle` (IOPRIO_CLASS_IDLE), `low` (best effort 7) or
    /// `normal`. Does nothing under the `none` I/O scheduler.
    pub bulk_io_priority: IoPriority,
}

/// The daemon's log format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatSetting {
    #[default]
    Text,
    Json,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "node-a".into(),
            data_dir: PathBuf::from("/var/lib/ferry"),
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            certs_dir: PathBuf::from("/etc/ferry/certs"),
            allowed_peers: Vec::new(),
            progress_interval_ms: 2000,
            control_socket: None,
            control_allowed_uids: Vec::new(),
            max_inbound_migrations: 4,
            max_outbound_migrations: 4,
            rate_limit_bytes_per_sec: 0,
            max_held_wal_bytes: 4 << 30,
            abort_timeout_secs: 3600,
            retry_deadline_secs: ferry_wire::retry::RETRY_DEADLINE_DEFAULT_MS / 1000,
            stall_after_secs: crate::outbound::stall::STALL_AFTER_DEFAULT.as_secs(),
            quic_idle_timeout_ms: crate::quic::IDLE_TIMEOUT_DEFAULT_MS,
            check_free_space: true,
            metrics_addr: None,
            log_format: LogFormatSetting::Text,
            transport: TransportSetting::Quic,
            rdma_device: None,
            rdma_port: crate::transfer::rdma::select::RDMA_PORT_DEFAULT,
            rdma_gid_index: crate::transfer::rdma::select::RDMA_GID_INDEX_DEFAULT,
            require_rdma: false,
            bulk_threads: BULK_THREADS_DEFAULT_COUNT,
            bulk_cpu_priority: CpuPriority::default(),
            bulk_io_priority: IoPriority::default(),
        }
    }
}

/// A configuration that cannot be used: the operator's file is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is in the message, not chained as a source (`{:#}` would show it twice).
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{path} is not a valid ferry configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl NodeConfig {
    /// The RDMA settings, for `transfer::rdma::select`.
    pub fn rdma_settings(&self) -> RdmaSettings {
        RdmaSettings {
            device: self.rdma_device.clone(),
            port: self.rdma_port,
            gid_index: self.rdma_gid_index,
            require: self.require_rdma,
        }
    }

    /// The threads and priority of a source's bulk work, for [`crate::priority`].
    pub fn bulk_threads(&self) -> BulkThreads {
        BulkThreads {
            count: self.bulk_threads,
            priority: BulkPriority { cpu: self.bulk_cpu_priority, io: self.bulk_io_priority },
        }
    }

    /// The control socket path in force.
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| self.data_dir.join("control").join("ferry.sock"))
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self::load_with_keys(path)?.0)
    }

    /// Reads and checks a configuration file; also returns the keys the file sets itself (the
    /// others have their defaults), so a caller can say where a setting came from.
    pub fn load_with_keys(path: &Path) -> Result<(Self, BTreeSet<String>), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.to_path_buf(), cause })?;
        let config = Self::parse(&text, path)?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        Ok((config, table.keys().cloned().collect()))
    }

    /// Parses and checks configuration text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: NodeConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |what: String| ConfigError::Invalid { path: path.to_path_buf(), what };
        NodeId::new(self.node_id.clone()).map_err(|e| invalid(format!("node_id: {e}")))?;
        for peer in &self.allowed_peers {
            NodeId::new(peer.clone()).map_err(|e| invalid(format!("allowed_peers: {e}")))?;
        }
        let idle_range = crate::quic::IDLE_TIMEOUT_MIN_MS..=crate::quic::IDLE_TIMEOUT_MAX_MS;
        if !idle_range.contains(&self.quic_idle_timeout_ms) {
            return Err(invalid(format!(
                "quic_idle_timeout_ms = {} is outside {}..={} (milliseconds)",
                self.quic_idle_timeout_ms,
                idle_range.start(),
                idle_range.end()
            )));
        }
        if self.bulk_threads > BULK_THREADS_MAX_COUNT {
            return Err(invalid(format!("bulk_threads {}: at most {BULK_THREADS_MAX_COUNT}", self.bulk_threads)));
        }
        Ok(())
    }

    /// The defaults, as a commented TOML file.
    pub fn default_toml() -> String {
        let d = NodeConfig::default();
        format!(
            "# ferry node daemon configuration (ferry serve --config FILE). Every key is optional.\n\
             \n\
             # This node's id: the name in its certificate, and what peers expect.\n\
             node_id = {:?}\n\
             # Staging lands in <data_dir>/migrations/<migration_id>/.\n\
             data_dir = {:?}\n\
             # QUIC listen address for peers.\n\
             listen = \"{}\"\n\
             # Folder made by `ferry certs` (ca.pem, <node_id>.pem, <node_id>-key.pem).\n\
             certs_dir = {:?}\n\
             # Node ids allowed to connect; empty: any node with a certificate from the cluster CA.\n\
             allowed_peers = []\n\
             # How often inbound progress is logged, in milliseconds (0: never).\n\
             progress_interval_ms = {}\n\
             # The coordinator's Unix socket (its folder must be mode 0700); default <data_dir>/control/ferry.sock.\n\
             # control_socket = \"/run/ferry/ferry.sock\"\n\
             # Uids allowed on the control socket besides the daemon's own.\n\
             control_allowed_uids = []\n\
             # Inbound migrations received at once; a new one over it is refused (0: unlimited).\n\
             max_inbound_migrations = {}\n\
             # Outbound migrations run at once; a migration.start over it is refused (0: unlimited).\n\
             max_outbound_migrations = {}\n\
             # Bytes per second shared by every outbound migration (0: unlimited).\n\
             rate_limit_bytes_per_sec = {}\n\
             # Most bytes of WAL segments held (hard-linked) per migration; over it the migration fails.\n\
             max_held_wal_bytes = {}\n\
             # An unfinished migration found at daemon start whose record is older than this is aborted.\n\
             abort_timeout_secs = {}\n\
             # An outbound migration whose target keeps failing transiently (no answer, a lost link) fails\n\
             # after this long without progress; a refused certificate, allow-list or offer fails at once.\n\
             retry_deadline_secs = {}\n\
             # A migration with work left and no progress for this long is flagged stalled (0: never).\n\
             stall_after_secs = {}\n\
             # A peer heard nothing from for this long (milliseconds) is taken as gone: its connections close\n\
             # and outbound migrations reconnect. A keep-alive goes out every fifth of it. Both ends' smaller\n\
             # value governs a connection. Lower detects a cut link sooner; too low closes connections of a\n\
             # node stalled by load, and handshakes on a lossy path (a handshake must finish within it).\n\
             quic_idle_timeout_ms = {}\n\
             # Refuse an inbound migration whose base does not fit in the data folder's free space.\n\
             check_free_space = {}\n\
             # Serve Prometheus metrics on this address (GET /metrics); unset: no metrics endpoint.\n\
             # metrics_addr = \"127.0.0.1:9464\"\n\
             # Log lines on stderr: \"text\" or \"json\" (the --log-format flag wins).\n\
             log_format = \"text\"\n\
             # Chunk transport: \"quic\", or \"rdma\" (an rdma build and a device with an active port;\n\
             # otherwise QUIC with a loud warning, or a failed start with require_rdma).\n\
             transport = \"quic\"\n\
             # RDMA device (e.g. \"mlx5_0\"); unset: the first with an active port.\n\
             # rdma_device = \"mlx5_0\"\n\
             rdma_port = {}\n\
             rdma_gid_index = {}\n\
             require_rdma = {}\n\
             # Threads of a source's bulk work (chunk connections, reads, sends), apart from the control,\n\
             # WAL and fence paths, which keep the daemon's priority; 0: bulk work shares the daemon's threads.\n\
             bulk_threads = {}\n\
             # CPU priority of the bulk threads and the io_uring readers: \"idle\" (SCHED_IDLE: only cores\n\
             # nothing else wants), \"batch\" (SCHED_BATCH at nice 10) or \"normal\" (off).\n\
             bulk_cpu_priority = \"{}\"\n\
             # I/O priority of the same threads: \"idle\" (IOPRIO_CLASS_IDLE), \"low\" (best effort 7) or\n\
             # \"normal\" (off). No effect under the \"none\" I/O scheduler (/sys/block/*/queue/scheduler).\n\
             bulk_io_priority = \"{}\"\n",
            d.node_id,
            d.data_dir.display().to_string(),
            d.listen,
            d.certs_dir.display().to_string(),
            d.progress_interval_ms,
            d.max_inbound_migrations,
            d.max_outbound_migrations,
            d.rate_limit_bytes_per_sec,
            d.max_held_wal_bytes,
            d.abort_timeout_secs,
            d.retry_deadline_secs,
            d.stall_after_secs,
            d.quic_idle_timeout_ms,
            d.check_free_space,
            d.rdma_port,
            d.rdma_gid_index,
            d.require_rdma,
            d.bulk_threads,
            d.bulk_cpu_priority.as_str(),
            d.bulk_io_priority.as_str(),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_printed_defaults_parse_back_to_the_defaults() {
        let parsed = NodeConfig::parse(&NodeConfig::default_toml(), Path::new("default.toml")).unwrap();
        assert_eq!(parsed, NodeConfig::default());
    }

    #[test]
    fn partial_files_keep_defaults_and_bad_files_say_what_is_wrong() {
        let config = NodeConfig::parse("node_id = \"node-b\"\n", Path::new("n.toml")).unwrap();
        assert_eq!(config.node_id, "node-b");
        assert_eq!(config.listen, NodeConfig::default().listen);
        assert_eq!(config.retry_deadline_secs, 30, "a wrong target address fails within about 30 s");
        for (text, needle) in [
            ("nod_id = \"x\"", "unknown field"),
            ("listen = \"not an address\"", "listen"),
            ("node_id = \"bad id\"", "node_id"),
            ("allowed_peers = [\"a_b\"]", "allowed_peers"),
            ("[[[", "valid"),
            ("log_format = \"xml\"", "log_format"),
            ("transport = \"tcp\"", "transport"),
            ("quic_idle_timeout_ms = 100", "quic_idle_timeout_ms = 100 is outside 200..=600000"),
            ("quic_idle_timeout_ms = 600001", "quic_idle_timeout_ms"),
            ("quic_idle_timeout_ms = -1", "quic_idle_timeout_ms"),
        ] {
            let err = NodeConfig::parse(text, Path::new("n.toml")).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("n.toml"), "{text}: {err}");
        }
    }

    #[test]
    fn the_idle_timeout_sets_a_keep_alive_at_a_fifth_of_it() {
        let config = NodeConfig::parse("quic_idle_timeout_ms = 1000\n", Path::new("n.toml")).unwrap();
        let tuning = crate::quic::QuicTuning::with_idle_timeout_ms(config.quic_idle_timeout_ms);
        assert_eq!((tuning.idle_timeout_ms, tuning.keep_alive_ms), (1000, 200));
        let default = crate::quic::QuicTuning::default();
        assert_eq!((default.idle_timeout_ms, default.keep_alive_ms), (5000, 1000));
    }

    #[test]
    fn a_file_says_which_keys_it_sets_and_a_missing_file_names_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "node_id = \"node-b\"\nlisten = \"127.0.0.1:7070\"\n").unwrap();
        let (config, keys) = NodeConfig::load_with_keys(&path).unwrap();
        assert_eq!(config.node_id, "node-b");
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["listen", "node_id"]);
        let err = anyhow::Error::from(NodeConfig::load(&dir.path().join("missing.toml")).unwrap_err());
        let text = format!("{err:#}");
        assert!(text.contains("missing.toml"), "{text}");
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    }
}
