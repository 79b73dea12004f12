//! `MANIFEST.json`: the target staging's description of itself (DESIGN section 3).
//!
//! What it does: the manifest's types, its JSON encoding and decoding, and its checks
//! (format version, path rules, state). The database reads this file to import a staging; it
//! imports only a `released` one.
//!
//! What it does not: write it. The engine writes it through the storage seam by temp file,
//! fsync, rename, fsync of the folder, after every file it lists is durable, so a manifest on
//! disk never claims bytes that are not there.
//!
//! ```json
//! { "format_version": 1, "migration_id": "m1", "vshard_id": 7, "base_lsn": 100,
//!   "final_lsn": null, "state": "copying", "base_complete": true, "db_meta": {},
//!   "segments": [ { "path": "L1/a.seg", "size_bytes": 4096, "crc32c": 305419896 } ],
//!   "wal_segments": [] }
//! ```

use serde::{Deserialize, Serialize};

use crate::ids::{Lsn, MigrationId, NodeId, VShardId};
use crate::path::RelPath;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// The manifest's file name in a staging folder.
pub const MANIFEST_FILE_NAME: &str = "MANIFEST.json";

/// Where a staging is in its life: `copying -> fenced -> released`, or `aborted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagingState {
    Copying,
    Fenced,
    Released,
    Aborted,
}

/// One staged segment file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedSegment {
    pub path: RelPath,
    pub size_bytes: u64,
    pub crc32c: u32,
}

/// One staged WAL segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedWalSegment {
    pub name: String,
    pub size_bytes: u64,
    pub crc32c: u32,
    pub layout: String,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    #[serde(default)]
    pub key_id: Option<u8>,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagingManifest {
    pub format_version: u32,
    pub migration_id: MigrationId,
    pub vshard_id: VShardId,
    pub base_lsn: Lsn,
    pub final_lsn: Option<Lsn>,
    pub state: StagingState,
    /// Whether every segment file of the base copy is listed and durable.
    pub base_complete: bool,
    #[serde(default)]
    pub db_meta: serde_json::Value,
    pub segments: Vec<StagedSegment>,
    #[serde(default)]
    pub wal_segments: Vec<StagedWalSegment>,
    /// The node that sent the base (its certificate's name): only it may release, abort or
    /// join the migration, also after the target restarts. Absent in manifests of earlier
    /// ferry versions (then any allowed node may, as before) and in tombstones of migrations
    /// that never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<NodeId>,
}

/// A manifest file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("MANIFEST.json is not valid: {0}")]
    Malformed(serde_json::Error),
    #[error("MANIFEST.json has format_version {0}; this ferry reads version {MANIFEST_FORMAT_VERSION}: upgrade ferry")]
    Version(u32),
}

/// The cause goes in the message only (not chained again as a source), so a chain printed
/// whole shows it once.
impl From<serde_json::Error> for ManifestError {
    fn from(e: serde_json::Error) -> Self {
        Self::Malformed(e)
    }
}

impl StagingManifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version = serde_json::from_slice(bytes)?;
        if version.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::Version(version.format_version));
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn manifest() -> StagingManifest {
        StagingManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            migration_id: MigrationId::new("m1").unwrap(),
            vshard_id: VShardId(7),
            base_lsn: Lsn(100),
            final_lsn: None,
            state: StagingState::Copying,
            base_complete: true,
            db_meta: serde_json::json!({"table": "t"}),
            segments: vec![StagedSegment { path: RelPath::new("L1/a.seg").unwrap(), size_bytes: 4096, crc32c: 1 }],
            wal_segments: vec![],
            source_node: None,
        }
    }

    #[test]
    fn round_trips() {
        let m = manifest();
        assert_eq!(StagingManifest::decode(&m.encode()).unwrap(), m);
        let named = StagingManifest { source_node: Some(NodeId::new("node-a").unwrap()), ..manifest() };
        assert_eq!(StagingManifest::decode(&named.encode()).unwrap(), named);
    }

    #[test]
    fn a_manifest_of_an_earlier_ferry_names_no_source_node() {
        let text = br#"{ "format_version": 1, "migration_id": "m1", "vshard_id": 7, "base_lsn": 100,
            "final_lsn": null, "state": "copying", "base_complete": true, "db_meta": {},
            "segments": [], "wal_segments": [] }"#;
        assert_eq!(StagingManifest::decode(text).unwrap().source_node, None);
        assert!(!String::from_utf8(manifest().encode()).unwrap().contains("source_node"), "absent, not null");
    }

    #[test]
    fn other_versions_and_bad_paths_are_refused() {
        let mut m = manifest();
        m.format_version = 2;
        assert!(matches!(StagingManifest::decode(&m.encode()), Err(ManifestError::Version(2))));
        let text = String::from_utf8(manifest().encode()).unwrap().replace("L1/a.seg", "../a.seg");
        assert!(matches!(StagingManifest::decode(text.as_bytes()), Err(ManifestError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = StagingManifest::decode(&bytes);
        }
    }
}
