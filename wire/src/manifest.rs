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
//! {
//!   "manifest_crc32c": "1c291ca3",
//!   "format_version": 1, "migration_id": "m1", "vshard_id": 7, "base_lsn": 100,
//!   "final_lsn": null, "state": "copying", "base_complete": true, "db_meta": {},
//!   "segments": [ { "path": "L1/a.seg", "size_bytes": 4096, "crc32c": 305419896 } ],
//!   "wal_segments": [] }
//! ```
//!
//! Its own checksum: the file opens with the exact bytes `{\n  "manifest_crc32c": "` then 8
//! lowercase hex digits then `",\n` (the first 35 bytes), and those digits are the CRC32C of
//! every byte after them, to the end of the file. The field sits first, in a fixed place, so
//! the check runs on the raw bytes before any JSON is parsed (a damaged manifest is refused,
//! never believed) and the file stays plain JSON for the database (which may ignore the field).
//! Any other opening is refused, except the opening of a manifest written by an earlier ferry
//! (`{\n  "format_version"`, no checksum): it is accepted and reported as
//! [`Integrity::Unchecked`], so a staging in flight across an upgrade is not lost; the next
//! manifest written for it carries the checksum.

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
    /// When the target began receiving the migration (Unix milliseconds), so a restarted
    /// target still reports it. Absent in manifests of earlier ferry versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_unix_ms: Option<u64>,
    /// Whether a WAL stream follows the base (the offer's `wal`), so a restarted target tells
    /// a staged offline copy from a live one waiting for its WAL. Absent in manifests of
    /// earlier ferry versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_follows: Option<bool>,
}

/// The opening of a manifest with its own checksum, up to the checksum's digits.
const CHECKSUM_HEAD: &[u8] = b"{\n  \"manifest_crc32c\": \"";
/// What follows the checksum's 8 hex digits.
const CHECKSUM_TAIL: &[u8] = b"\",\n";
/// Bytes from the file's start to the first byte the checksum covers.
pub const CHECKSUM_PREFIX_LEN_BYTES: usize = CHECKSUM_HEAD.len() + 8 + CHECKSUM_TAIL.len();
/// The opening of a manifest written before manifests carried a checksum.
const UNCHECKED_HEAD: &[u8] = b"{\n  \"format_version\"";

/// Whether a decoded manifest's bytes were checked against its own checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// The checksum matched every byte after it.
    Verified,
    /// A manifest of an earlier ferry, without a checksum: nothing vouches for its bytes.
    Unchecked,
}

/// A manifest file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are damaged: the checksum does not match them, or the file opens with
    /// neither a checksum nor the opening of an earlier ferry's manifest.
    #[error("MANIFEST.json is damaged ({0}): it is not used; the staging must be sent again (abort and restart the migration)")]
    Damaged(String),
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
    /// The file's bytes: the checksum line, then the manifest as pretty JSON.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_padded(0)
    }

    /// [`Self::encode`] padded with spaces before its closing newline to `len_bytes` (JSON
    /// allows trailing white space; a prepared file of that size is overwritten in place). The
    /// checksum covers the padding too. A `len_bytes` the manifest does not fit in pads nothing.
    pub fn encode_padded(&self, len_bytes: usize) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        let body_len_bytes = len_bytes.saturating_sub(CHECKSUM_PREFIX_LEN_BYTES - 2 + 1);
        if json.len() < body_len_bytes {
            json.resize(body_len_bytes, b' ');
        }
        json.push(b'\n');
        // `json` opens with "{\n"; the checksum line takes the brace's place.
        let body = json.get(2..).unwrap_or_default();
        let mut out = Vec::with_capacity(CHECKSUM_PREFIX_LEN_BYTES + body.len());
        out.extend_from_slice(CHECKSUM_HEAD);
        out.extend_from_slice(format!("{:08x}", crate::crc32c(body)).as_bytes());
        out.extend_from_slice(CHECKSUM_TAIL);
        out.extend_from_slice(body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        Self::decode_checked(bytes).map(|(manifest, _)| manifest)
    }

    /// Decodes a manifest after checking its bytes against its own checksum; an earlier
    /// ferry's manifest (no checksum) decodes as [`Integrity::Unchecked`].
    pub fn decode_checked(bytes: &[u8]) -> Result<(Self, Integrity), ManifestError> {
        let integrity = check(bytes)?;
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version = serde_json::from_slice(bytes)?;
        if version.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::Version(version.format_version));
        }
        Ok((serde_json::from_slice(bytes)?, integrity))
    }
}

/// Checks a manifest's raw bytes against the checksum they open with.
fn check(bytes: &[u8]) -> Result<Integrity, ManifestError> {
    if bytes.starts_with(UNCHECKED_HEAD) {
        return Ok(Integrity::Unchecked);
    }
    let damaged = |what: &str| Err(ManifestError::Damaged(what.to_owned()));
    let Some(rest) = bytes.strip_prefix(CHECKSUM_HEAD) else {
        return damaged("it does not open with its checksum");
    };
    let (Some(digits), Some(tail), Some(body)) =
        (rest.get(..8), rest.get(8..8 + CHECKSUM_TAIL.len()), rest.get(8 + CHECKSUM_TAIL.len()..))
    else {
        return damaged("it ends inside its checksum");
    };
    if tail != CHECKSUM_TAIL {
        return damaged("its checksum line is cut");
    }
    let Some(stored) = parse_lower_hex(digits) else {
        return damaged("its checksum is not 8 lowercase hex digits");
    };
    let computed = crate::crc32c(body);
    if stored != computed {
        return Err(ManifestError::Damaged(format!("its CRC32C is {computed:08x}, its checksum says {stored:08x}")));
    }
    Ok(Integrity::Verified)
}

/// 8 lowercase hex digits (uppercase is refused: one bit turns `a` into `A`).
fn parse_lower_hex(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some((value << 4) | u32::from(nibble))
    })
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
            started_at_unix_ms: None,
            wal_follows: None,
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
    fn a_manifest_of_an_earlier_ferry_is_read_unchecked_and_names_no_source_node() {
        // As serde_json's pretty printer wrote it, without a checksum.
        let text = b"{\n  \"format_version\": 1, \"migration_id\": \"m1\", \"vshard_id\": 7, \"base_lsn\": 100,
            \"final_lsn\": null, \"state\": \"copying\", \"base_complete\": true, \"db_meta\": {},
            \"segments\": [], \"wal_segments\": [] }";
        let (read, integrity) = StagingManifest::decode_checked(text).unwrap();
        assert_eq!((read.source_node, integrity), (None, Integrity::Unchecked));
        assert!(!String::from_utf8(manifest().encode()).unwrap().contains("source_node"), "absent, not null");
        // Written compactly (by hand), it has neither opening: refused.
        let compact = b"{ \"format_version\": 1 }";
        assert!(matches!(StagingManifest::decode(compact), Err(ManifestError::Damaged(_))));
    }

    #[test]
    fn a_padded_manifest_has_the_length_asked_and_checks_out() {
        let plain = manifest().encode();
        for len in [plain.len(), plain.len() + 1, 4096] {
            let padded = manifest().encode_padded(len);
            assert_eq!(padded.len(), len);
            assert_eq!(padded.last(), Some(&b'\n'));
            assert_eq!(StagingManifest::decode_checked(&padded).unwrap(), (manifest(), Integrity::Verified));
        }
        assert_eq!(manifest().encode_padded(10), plain, "too short a length pads nothing");
    }

    #[test]
    fn a_manifest_carries_its_own_checksum_and_stays_json() {
        let bytes = manifest().encode();
        assert_eq!(StagingManifest::decode_checked(&bytes).unwrap(), (manifest(), Integrity::Verified));
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let stored = json["manifest_crc32c"].as_str().unwrap();
        assert_eq!(stored, format!("{:08x}", crate::crc32c(&bytes[CHECKSUM_PREFIX_LEN_BYTES..])));
        assert_eq!(json["vshard_id"], 7);
        // A value changed (a digit of base_lsn), or the checksum's case: refused by name.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let damaged = text.replace("\"base_lsn\": 100", "\"base_lsn\": 101");
        let e = StagingManifest::decode(damaged.as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::Damaged(_)), "{e}");
        assert!(e.to_string().contains("damaged"), "{e}");
        let upper = text.replacen(stored, &stored.to_uppercase(), 1);
        if upper != text {
            assert!(StagingManifest::decode(upper.as_bytes()).is_err());
        }
    }

    #[test]
    fn other_versions_and_bad_paths_are_refused() {
        let mut m = manifest();
        m.format_version = 2;
        assert!(matches!(StagingManifest::decode(&m.encode()), Err(ManifestError::Version(2))));
        let bad_path = StagingManifest::decode(&manifest().encode()).unwrap();
        let text = String::from_utf8(bad_path.encode()).unwrap().replace("L1/a.seg", "../a.seg");
        // Damaged as far as the checksum can tell; as an earlier ferry's manifest, malformed.
        assert!(matches!(StagingManifest::decode(text.as_bytes()), Err(ManifestError::Damaged(_))));
        let legacy = [b"{\n".as_slice(), &text.as_bytes()[CHECKSUM_PREFIX_LEN_BYTES..]].concat();
        assert!(matches!(StagingManifest::decode(&legacy), Err(ManifestError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = StagingManifest::decode(&bytes);
        }
    }
}
