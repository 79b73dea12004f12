//! The control socket's method parameters and results (DESIGN sections 4 and 5), as types.
//!
//! What it does: defines what `migration.start` takes, what `migration.status` /
//! `migration.list` / `migration.event` carry (the phase and progress of DESIGN section 5), and
//! the durable record of an outbound migration's phase ([`PhaseRecord`]) with its CRC32C
//! envelope. The daemon, the typed client and the CLI share these, so a field means the same
//! thing everywhere.
//!
//! What it does not: transport (that is [`crate::control`]'s JSON-RPC codec and the engine's
//! socket), or decide anything about a migration.
//!
//! Invariants: parameters are checked by [`StartParams::validate`] before a daemon acts on them;
//! unknown parameter fields are refused (a typo must not silently fall back to a default); a
//! phase record that fails its CRC or has another format version is refused, never guessed.

use serde::{Deserialize, Serialize};

use crate::fence::{EstimateInputs, PauseReport, PauseStamps};
use crate::ids::{IdError, Lsn, MigrationId, NodeId, VShardId};
use crate::limits::{CHUNK_LEN_DEFAULT_BYTES, CHUNK_LEN_MAX_BYTES, CHUNK_LEN_MIN_BYTES, DB_META_LEN_MAX_BYTES};
use crate::path::RelPath;

/// Default write-pause budget of a cut-over (DESIGN section 4).
pub const WRITE_PAUSE_BUDGET_DEFAULT_US: u64 = 500_000;
/// Most connections or streams a caller may ask for.
pub const PARALLELISM_MAX_COUNT: u32 = 64;

/// `migration.start` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// Caller-chosen id; a repeated start with the same id and parameters is idempotent.
    /// Default: `m-<vshard>-<base_lsn>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    pub vshard_id: u32,
    /// Folder of the shard's immutable files (absolute).
    pub segments_root: String,
    /// Files to ship, relative to the root; absent: every file under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    /// The source node's WAL folder; null: base copy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_dir: Option<String>,
    /// `auto`, `a` or `b`.
    #[serde(default = "default_layout")]
    pub wal_layout: String,
    /// The WAL writer's flush alignment.
    #[serde(default = "default_alignment")]
    pub wal_alignment_bytes: u32,
    #[serde(default)]
    pub base_lsn: u64,
    /// The target daemon's QUIC address, `ip:port`.
    pub target_address: String,
    /// The name the target's certificate must carry.
    pub target_node_id: String,
    #[serde(default = "default_budget")]
    pub write_pause_budget_us: u64,
    /// 0: unlimited (the daemon's global limit still applies).
    #[serde(default)]
    pub rate_limit_bytes_per_sec: u64,
    #[serde(default = "one")]
    pub connections: u32,
    #[serde(default = "four")]
    pub streams: u32,
    #[serde(default = "default_chunk")]
    pub chunk_len_bytes: u32,
    /// `mmap`, `uring`, `uring-direct` or `pread`.
    #[serde(default = "default_read_mode")]
    pub read_mode: String,
    /// Opaque, copied into the target's MANIFEST.json.
    #[serde(default)]
    pub db_meta: serde_json::Value,
    /// A shard nobody writes to: release the staging once the base is staged (and, with a WAL
    /// and `until_lsn`, once every selected record up to it is durable).
    #[serde(default)]
    pub offline: bool,
    /// With a WAL and `offline`: the last LSN to stage before releasing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_lsn: Option<u64>,
}

fn default_layout() -> String {
    "auto".into()
}
fn default_alignment() -> u32 {
    4096
}
fn default_budget() -> u64 {
    WRITE_PAUSE_BUDGET_DEFAULT_US
}
fn one() -> u32 {
    1
}
fn four() -> u32 {
    4
}
fn default_chunk() -> u32 {
    CHUNK_LEN_DEFAULT_BYTES
}
fn default_read_mode() -> String {
    "mmap".into()
}

/// A `migration.start` the daemon must refuse: the caller's parameters are wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("migration_id: {0}")]
    MigrationId(IdError),
    #[error("target_node_id: {0}")]
    TargetNode(IdError),
    #[error("target_address {} is not ip:port", crate::quote::quote_untrusted(.0))]
    TargetAddress(String),
    #[error("segments_root {} must be an absolute path", crate::quote::quote_untrusted(.0))]
    SegmentsRoot(String),
    #[error("wal_dir {} must be an absolute path", crate::quote::quote_untrusted(.0))]
    WalDir(String),
    #[error("files[{index}]: {message}")]
    File { index: usize, message: String },
    #[error("wal_layout {}: use auto, a or b", crate::quote::quote_untrusted(.0))]
    Layout(String),
    #[error("read_mode {}: use mmap, uring, uring-direct or pread", crate::quote::quote_untrusted(.0))]
    ReadMode(String),
    #[error("{what} must be between 1 and {max}, got {got}")]
    Count { what: &'static str, got: u32, max: u32 },
    #[error("chunk_len_bytes must be between {min} and {max}, got {got}")]
    ChunkLen { got: u32, min: u32, max: u32 },
    #[error("wal_alignment_bytes must be a power of two between 512 and 1 MiB, got {0}")]
    Alignment(u32),
    #[error("until_lsn {until} is below base_lsn {base}")]
    UntilBelowBase { until: u64, base: u64 },
    #[error("until_lsn needs wal_dir and offline")]
    UntilWithoutWal,
    #[error("db_meta of {0} bytes is over the limit of {DB_META_LEN_MAX_BYTES} bytes (as compact JSON)")]
    DbMetaTooLong(usize),
}

impl StartParams {
    /// The migration id in force (the caller's, or the default one).
    pub fn migration_id(&self) -> Result<MigrationId, ParamsError> {
        let text = self.migration_id.clone().unwrap_or_else(|| format!("m-{}-{}", self.vshard_id, self.base_lsn));
        MigrationId::new(text).map_err(ParamsError::MigrationId)
    }

    pub fn vshard(&self) -> VShardId {
        VShardId(self.vshard_id)
    }

    pub fn base(&self) -> Lsn {
        Lsn(self.base_lsn)
    }

    pub fn target_node(&self) -> Result<NodeId, ParamsError> {
        NodeId::new(self.target_node_id.clone()).map_err(ParamsError::TargetNode)
    }

    /// The files as relative paths (`None`: all of the root).
    pub fn rel_files(&self) -> Result<Option<Vec<RelPath>>, ParamsError> {
        let Some(files) = &self.files else { return Ok(None) };
        files
            .iter()
            .enumerate()
            .map(|(index, f)| RelPath::new(f.clone()).map_err(|e| ParamsError::File { index, message: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Checks every field; the daemon refuses a start that fails this with -32602.
    pub fn validate(&self) -> Result<(), ParamsError> {
        self.migration_id()?;
        self.target_node()?;
        if self.target_address.parse::<std::net::SocketAddr>().is_err() {
            return Err(ParamsError::TargetAddress(self.target_address.clone()));
        }
        if !self.segments_root.starts_with('/') {
            return Err(ParamsError::SegmentsRoot(self.segments_root.clone()));
        }
        if let Some(dir) = &self.wal_dir {
            if !dir.starts_with('/') {
                return Err(ParamsError::WalDir(dir.clone()));
            }
        }
        self.rel_files()?;
        if !matches!(self.wal_layout.as_str(), "auto" | "a" | "A" | "b" | "B") {
            return Err(ParamsError::Layout(self.wal_layout.clone()));
        }
        if !matches!(self.read_mode.as_str(), "mmap" | "uring" | "uring-direct" | "pread") {
            return Err(ParamsError::ReadMode(self.read_mode.clone()));
        }
        for (what, got) in [("connections", self.connections), ("streams", self.streams)] {
            if got == 0 || got > PARALLELISM_MAX_COUNT {
                return Err(ParamsError::Count { what, got, max: PARALLELISM_MAX_COUNT });
            }
        }
        if !(CHUNK_LEN_MIN_BYTES..=CHUNK_LEN_MAX_BYTES).contains(&self.chunk_len_bytes) {
            return Err(ParamsError::ChunkLen {
                got: self.chunk_len_bytes,
                min: CHUNK_LEN_MIN_BYTES,
                max: CHUNK_LEN_MAX_BYTES,
            });
        }
        let a = self.wal_alignment_bytes;
        if !a.is_power_of_two() || !(512..=1 << 20).contains(&a) {
            return Err(ParamsError::Alignment(a));
        }
        // The target refuses an offer whose db_meta is over the limit: refuse it here, at once.
        let meta_len = serde_json::to_string(&self.db_meta).map_or(usize::MAX, |s| s.len());
        if meta_len > DB_META_LEN_MAX_BYTES as usize {
            return Err(ParamsError::DbMetaTooLong(meta_len));
        }
        if let Some(until) = self.until_lsn {
            if self.wal_dir.is_none() || !self.offline {
                return Err(ParamsError::UntilWithoutWal);
            }
            if until < self.base_lsn {
                return Err(ParamsError::UntilBelowBase { until, base: self.base_lsn });
            }
        }
        Ok(())
    }
}

/// Where a migration is (DESIGN section 5). Serialized as `"phase": "BaseCopy"` etc. beside the
/// progress fields of [`MigrationStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    BaseCopy,
    WalCatchUp,
    AtomicCutOver,
    Completed,
    Failed,
}

impl Phase {
    /// Completed and Failed are final: the migration may be forgotten.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// Which side of a migration this node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

/// WAL progress: `current_lsn` is the target's durable LSN, `source_lsn` the source tip for
/// the vShard, `start_lsn` the first LSN streamed (base_lsn + 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalProgress {
    pub start_lsn: Option<u64>,
    pub current_lsn: Option<u64>,
    pub source_lsn: Option<u64>,
    /// Bytes of WAL segments held (hard-linked) for this migration on the source.
    #[serde(default)]
    pub held_bytes: u64,
}

impl WalProgress {
    /// Records' LSN distance between the source tip and the target's durable LSN.
    pub fn lag_lsn(&self) -> Option<u64> {
        Some(self.source_lsn?.saturating_sub(self.current_lsn.unwrap_or(self.start_lsn?.saturating_sub(1))))
    }
}

/// A migration's phase and progress, as `migration.status`, `migration.list` and
/// `migration.event` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub migration_id: String,
    pub role: Role,
    pub phase: Phase,
    pub vshard_id: Option<u32>,
    /// The other node.
    pub peer_node: Option<String>,
    pub bytes_transferred: u64,
    pub bytes_total: u64,
    pub bytes_resent: u64,
    pub files_staged: u64,
    pub files_total: u64,
    pub wal: WalProgress,
    /// Source only: the rate limit in force (0: unlimited).
    #[serde(default)]
    pub rate_limit_bytes_per_sec: u64,
    /// Average since the migration (or this daemon's run of it) started.
    #[serde(default)]
    pub throughput_bytes_per_sec: u64,
    /// Completed: the write pause (null for an offline migration, which pauses nothing).
    #[serde(default)]
    pub pause_duration_us: Option<u64>,
    /// Completed by a live cut-over: the pause's parts, estimate and budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseReport>,
    /// AtomicCutOver: when the fence started (CLOCK_MONOTONIC ns of the source host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_started_at_ns: Option<u64>,
    /// The LSN the staging was fenced or released at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_lsn: Option<u64>,
    /// Failed: why. An abort says so here.
    #[serde(default)]
    pub reason: Option<String>,
    /// The target staging's MANIFEST state, when known (copying, fenced, released, aborted).
    #[serde(default)]
    pub staging_state: Option<String>,
    /// Wall-clock milliseconds since the Unix epoch (for humans and staleness, not for pauses).
    #[serde(default)]
    pub started_at_unix_ms: u64,
    #[serde(default)]
    pub updated_at_unix_ms: u64,
    /// Set once a migration with work left (a base to copy, a WAL lag to close) has made no
    /// progress (bytes verified, WAL LSN made durable, phase) for the daemon's stall threshold:
    /// whole seconds since it last did. Null while it progresses, waits on its coordinator
    /// (a cut-over) or is final. Measured by the daemon that reports it.
    #[serde(default)]
    pub no_progress_for_s: Option<u64>,
}

impl MigrationStatus {
    /// Percent of the base copied (100 when there is nothing to copy).
    pub fn percent(&self) -> f64 {
        if self.bytes_total == 0 {
            100.0
        } else {
            self.bytes_transferred as f64 * 100.0 / self.bytes_total as f64
        }
    }
}

/// The durable record of an outbound (source-side) migration: its parameters and the last phase
/// boundary it crossed. Written at each boundary; read at daemon start to resume or abort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub params: StartParams,
    pub phase: Phase,
    #[serde(default)]
    pub reason: Option<String>,
    pub started_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_resent: u64,
    /// Written when a fence starts (phase `AtomicCutOver`): the `final_lsn` it fences at. After a
    /// restart, a release may still complete it if the target confirms it is fenced there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_lsn: Option<u64>,
    /// Written at release (phase `Completed`): the pause and its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseReport>,
    /// Completed by a release: whether the target has confirmed its staging `released`. A
    /// release recorded but not confirmed is told to the target again (at each release call
    /// and at daemon start).
    #[serde(default)]
    pub target_released: bool,
    /// The fence's stamps known when it was recorded (the pause's start and the fence's
    /// receipt), so a release after a restart still measures the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_stamps: Option<PauseStamps>,
    /// Written at release (phase `Completed`): the durable LSN the target answered the fence
    /// with, told again with every retold release, so a target that lost its `fenced` MANIFEST
    /// commit (DESIGN section 8) can still derive the fence (absent in earlier records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_durable_lsn: Option<u64>,
}

/// `migration.prepare_cutover`'s result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareResult {
    pub estimated_pause_us: u64,
    pub budget_us: u64,
    /// LSN distance between the source tip of the vShard and the target's durable LSN.
    pub lag_lsn: u64,
    /// Selected record bytes read on the source and not yet durable on the target.
    pub lag_bytes: u64,
    /// What the estimate was built from.
    pub inputs: EstimateInputs,
}

/// `migration.fence` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceParams {
    /// Every selected record at or below it is drained (node-global: the writer's last
    /// acknowledged LSN).
    pub final_lsn: u64,
    /// CLOCK_MONOTONIC ns of the source host when writes were paused; absent: the daemon
    /// stamps its receipt of the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes_paused_at_ns: Option<u64>,
}

/// `migration.fence`'s result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceResult {
    pub final_lsn: u64,
    /// The target's durable LSN for the vShard (the last selected record at or below final_lsn).
    pub target_durable_lsn: u64,
    /// Records up to final_lsn read and sent.
    pub drain_us: u64,
    /// The target's staged WAL fdatasync of the last records (the one flush on the pause's
    /// path; its MANIFEST commit follows its answer) and the round trip to it.
    pub target_durable_us: u64,
    pub apply_wait_us: u64,
    /// Writes paused to this answer.
    pub paused_so_far_us: u64,
    pub estimate_us: u64,
    pub budget_us: u64,
}

/// `migration.release`'s result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResult {
    pub final_lsn: u64,
    pub pause_duration_us: u64,
    pub pause: PauseReport,
}

/// The phase record file's format version.
pub const PHASE_RECORD_FORMAT_VERSION: u32 = 1;
const PHASE_RECORD_MAGIC: &[u8; 8] = b"FERRYPR\n";
/// A phase record file's largest size (parameters hold paths and the caller's db_meta).
pub const PHASE_RECORD_LEN_MAX_BYTES: usize = 1 << 20;

/// A phase record file that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhaseRecordError {
    #[error("phase record is {0} bytes, over the {PHASE_RECORD_LEN_MAX_BYTES}-byte limit")]
    TooLong(usize),
    #[error("phase record is truncated or does not start with the ferry magic")]
    Truncated,
    #[error("phase record format version {0} is not {PHASE_RECORD_FORMAT_VERSION}: written by another ferry version")]
    Version(u32),
    #[error("phase record CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("phase record body is not valid: {0}")]
    Body(String),
}

impl PhaseRecord {
    /// magic (8) | format_version u32 LE | body_len u32 LE | crc32c(body) u32 LE | body (JSON).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail; an empty body would then fail decoding.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(20 + body.len());
        out.extend_from_slice(PHASE_RECORD_MAGIC);
        out.extend_from_slice(&PHASE_RECORD_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PhaseRecordError> {
        if bytes.len() > PHASE_RECORD_LEN_MAX_BYTES {
            return Err(PhaseRecordError::TooLong(bytes.len()));
        }
        let (magic, rest) = bytes.split_at_checked(8).ok_or(PhaseRecordError::Truncated)?;
        if magic != PHASE_RECORD_MAGIC {
            return Err(PhaseRecordError::Truncated);
        }
        let word = |at: usize| -> Result<u32, PhaseRecordError> {
            let b = rest.get(at..at + 4).ok_or(PhaseRecordError::Truncated)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let version = word(0)?;
        if version != PHASE_RECORD_FORMAT_VERSION {
            return Err(PhaseRecordError::Version(version));
        }
        let len = usize::try_from(word(4)?).map_err(|_| PhaseRecordError::Truncated)?;
        let stored = word(8)?;
        let body = rest.get(12..).ok_or(PhaseRecordError::Truncated)?;
        if body.len() != len {
            return Err(PhaseRecordError::Truncated);
        }
        let computed = crc32c::crc32c(body);
        if computed != stored {
            return Err(PhaseRecordError::Checksum { stored, computed });
        }
        serde_json::from_slice(body).map_err(|e| PhaseRecordError::Body(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn params() -> StartParams {
        serde_json::from_value(serde_json::json!({
            "vshard_id": 7, "segments_root": "/data/seg", "target_address": "127.0.0.1:7070",
            "target_node_id": "node-b"
        }))
        .unwrap()
    }

    #[test]
    fn defaults_fill_what_the_caller_leaves_out() {
        let p = params();
        assert_eq!(p.migration_id().unwrap().as_str(), "m-7-0");
        assert_eq!((p.connections, p.streams, p.write_pause_budget_us), (1, 4, WRITE_PAUSE_BUDGET_DEFAULT_US));
        p.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let typo = serde_json::from_value::<StartParams>(serde_json::json!({
            "vshard_id": 7, "segments_root": "/s", "target_address": "127.0.0.1:1", "target_node_id": "b",
            "conections": 2
        }));
        assert!(typo.unwrap_err().to_string().contains("conections"));
        type Change = Box<dyn Fn(&mut StartParams)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|p| p.target_address = "nowhere".into()), "target_address"),
            (Box::new(|p| p.segments_root = "rel".into()), "segments_root"),
            (Box::new(|p| p.files = Some(vec!["../x".into()])), "files[0]"),
            (Box::new(|p| p.streams = 0), "streams"),
            (Box::new(|p| p.connections = 1000), "connections"),
            (Box::new(|p| p.chunk_len_bytes = 1), "chunk_len_bytes"),
            (Box::new(|p| p.wal_layout = "c".into()), "wal_layout"),
            (Box::new(|p| p.read_mode = "dma".into()), "read_mode"),
            (Box::new(|p| p.migration_id = Some("a b".into())), "migration_id"),
            (Box::new(|p| p.until_lsn = Some(3)), "until_lsn"),
            (Box::new(|p| p.wal_alignment_bytes = 1000), "wal_alignment_bytes"),
            (Box::new(|p| p.db_meta = serde_json::json!("m".repeat(DB_META_LEN_MAX_BYTES as usize))), "db_meta"),
        ];
        for (change, needle) in cases {
            let mut p = params();
            change(&mut p);
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn phase_records_round_trip_and_any_damage_is_refused() {
        let record = PhaseRecord {
            params: params(),
            phase: Phase::WalCatchUp,
            reason: None,
            started_at_unix_ms: 1,
            updated_at_unix_ms: 2,
            bytes_total: 3,
            bytes_resent: 0,
            final_lsn: None,
            pause: None,
            target_released: false,
            fence_stamps: None,
            fenced_durable_lsn: None,
        };
        let bytes = record.encode();
        assert_eq!(PhaseRecord::decode(&bytes).unwrap(), record);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(PhaseRecord::decode(&bad).is_err(), "flip at {at} accepted");
        }
        for len in 0..bytes.len() {
            assert!(PhaseRecord::decode(&bytes[..len]).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = PhaseRecord::decode(&bytes);
        }

        #[test]
        fn decoding_any_json_as_params_never_panics(text in ".{0,200}") {
            if let Ok(p) = serde_json::from_str::<StartParams>(&text) {
                let _ = p.validate();
            }
        }
    }
}
