//! Control messages: what source and target say to each other on the control stream.
//!
//! What it does: defines every control message, its JSON encoding (the body of a
//! [`FrameKind::Control`](crate::frame::FrameKind) frame) and the checks a decoded message
//! must pass before anything acts on it ([`Offer::validate`]).
//!
//! What it does not: carry file bytes (chunk frames do) or decide what to do next (the
//! [`session`](crate::session) machines do).
//!
//! Why JSON: control messages are few per transfer (a handful per file, acks in batches), so
//! their encoding is off the hot path; JSON keeps them readable in logs and lets fields grow
//! without a version bump (unknown fields are ignored). The frame around them still bounds the
//! length and checks a CRC32C, and serde_json bounds nesting depth, so hostile bodies give an
//! error, never a panic or an unbounded allocation.
//!
//! Conversation of a base copy (source S, target T), all on one bidirectional stream:
//! ```text
//! S: Hello            T: Hello           (versions; mismatch -> Error{IncompatibleVersion})
//! S: Offer            T: Accept          (the transfer manifest; what T already holds)
//!    ... chunk frames on uni streams ...  T: Acks (batched)
//! S: FileDone (each)  T: FileStaged (each, once the file is verified, durable, renamed)
//!                     T: BaseStaged      (MANIFEST.json written, state copying)
//! S: Commit           T: Committed       (offline copy: MANIFEST.json state released)
//! S: Fence            T: Fenced          (live: every selected record <= final_lsn is durable;
//!                                         MANIFEST.json state fenced follows the answer)
//! ```
//! An abort runs on a connection of its own: `S: Hello, T: Hello, S: Abort, T: Aborted`; so does
//! a release: `S: Hello, T: Hello, S: Release, T: Released`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{Lsn, MigrationId, NodeId, VShardId};
use crate::limits::{
    CHUNK_COUNT_MAX, CHUNK_LEN_MAX_BYTES, CHUNK_LEN_MIN_BYTES, DB_META_LEN_MAX_BYTES, FILE_COUNT_MAX,
    FILE_SIZE_MAX_BYTES, REASON_LEN_MAX_BYTES,
};
use crate::path::RelPath;

/// One control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First frame each way: the sender's protocol version and node id.
    Hello { protocol_version: u16, node_id: NodeId },
    /// The transfer manifest.
    Offer(Offer),
    /// Instead of an offer: this connection carries more chunk streams of a transfer already
    /// offered on another connection from the same node (one endpoint per connection spreads
    /// the QUIC work over cores).
    Join { migration_id: MigrationId },
    /// The target took the extra connection.
    Joined,
    /// First message on the WAL stream: the source will stream the vShard's records.
    WalStart,
    /// The target's staged WAL is durable up to `durable_lsn` (the base LSN when empty): the
    /// source streams from the next record. Sent again after every group commit.
    WalDurable { durable_lsn: Lsn },
    /// The target takes the transfer; `resume` lists chunks it already holds verified;
    /// `already_staged` says the whole base is staged already (a repeated transfer): the
    /// source sends no chunks and waits for `BaseStaged`.
    Accept {
        resume: Vec<FileResume>,
        bytes_resent: u64,
        #[serde(default)]
        already_staged: bool,
    },
    /// Chunks written and verified on the target.
    Acks { chunks: Vec<ChunkRef> },
    /// Every chunk of a file has been sent; its size and whole-file CRC32C as read at the source.
    FileDone { file_index: u32, size_bytes: u64, crc32c: u32 },
    /// The file is verified, durable and renamed into `segments/`.
    FileStaged { file_index: u32 },
    /// Every file is staged and `MANIFEST.json` is durable.
    BaseStaged { bytes_resent: u64 },
    /// Offline copy: no WAL to fence, the staging becomes `released` at `final_lsn`.
    Commit { final_lsn: Lsn },
    /// The staging is released.
    Committed,
    /// Live cut-over: the source has read every record up to `final_lsn`, and `through_lsn` is
    /// the last of the vShard's among them (sent on the WAL stream, which may arrive after this
    /// message). The target waits up to `wal_wait_max_us` for its staged WAL to be durable up
    /// to `through_lsn` (`None`: it does not wait: the source knew it durable already), checks
    /// that it holds nothing above `final_lsn`, marks the staging fenced (its MANIFEST commit
    /// follows the answer) and, when its database acknowledges ingest (`migration.applied`),
    /// waits up to `apply_wait_max_us` for the applied LSN to reach `final_lsn`.
    Fence {
        final_lsn: Lsn,
        apply_wait_max_us: u64,
        #[serde(default)]
        through_lsn: Option<Lsn>,
        #[serde(default)]
        wal_wait_max_us: u64,
    },
    /// The target did not complete the fence (its database's ingest did not reach `final_lsn`
    /// in time, or its staged WAL holds records above it); the staging stays as it was.
    FenceCancelled { reason: String },
    /// The staging is `fenced` at `final_lsn`: its staged WAL is durable up to `durable_lsn`
    /// (the last selected record up to `final_lsn`) and holds nothing above `final_lsn`.
    /// `commit_us` is the target's own check on the pause's path (the `fenced` MANIFEST commit
    /// follows this answer, DESIGN section 8), `apply_wait_us` how long the target waited for
    /// its database's ingest.
    Fenced { durable_lsn: Lsn, commit_us: u64, apply_wait_us: u64 },
    /// Instead of an offer: the source recorded the release of a fenced migration; the
    /// target marks its staging `released` (the point of no return: the database imports it).
    /// `fenced_durable_lsn` is the `durable_lsn` of the target's `Fenced` answer, when the
    /// source has it: a target that lost its `fenced` MANIFEST commit (a crash right after its
    /// answer) derives the fence from its staged WAL with it (`None`: an earlier ferry, or a
    /// fence recovered after a source restart, whose answer the source never took).
    Release {
        migration_id: MigrationId,
        final_lsn: Lsn,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fenced_durable_lsn: Option<Lsn>,
    },
    /// The staging is `released` (or already was, at the same `final_lsn`).
    Released,
    /// Instead of an offer: the source's coordinator aborted the migration; the target removes
    /// its staging (and refuses the id until it is forgotten).
    Abort { migration_id: MigrationId, reason: String },
    /// The target's staging of the aborted migration is gone (or never existed).
    Aborted,
    /// The sender gives up on the transfer, and says why.
    Error { kind: ErrorKind, message: String },
}

/// Why a side gave up, as sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    IncompatibleVersion,
    /// Bytes that are not a frame or not a message.
    Malformed,
    /// A well-formed message at the wrong time or with impossible values.
    Protocol,
    /// The target refuses the offer (capacity, disk space, a conflicting migration).
    Refused,
    /// A local write, read or fsync failed.
    Storage,
    /// A source file changed during the copy.
    SourceChanged,
    /// A chunk or file checksum did not match.
    Checksum,
    Cancelled,
}

/// A chunk's position: file and chunk index (offset = index * chunk length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub file_index: u32,
    pub chunk_index: u64,
}

/// Chunks of one file the target already holds, verified, with their CRC32C.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResume {
    pub file_index: u32,
    pub chunks: Vec<(u64, u32)>,
}

/// One file of the transfer manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferFile {
    pub path: RelPath,
    pub size_bytes: u64,
}

/// The transfer manifest: what the source will send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub migration_id: MigrationId,
    pub vshard_id: VShardId,
    pub base_lsn: Lsn,
    pub chunk_len_bytes: u32,
    pub files: Vec<OfferFile>,
    /// The caller's opaque metadata, copied into `MANIFEST.json`.
    #[serde(default)]
    pub db_meta: serde_json::Value,
    /// Whether a WAL stream follows (the vShard's records above `base_lsn`).
    #[serde(default)]
    pub wal: bool,
}

/// An offer with impossible values: the peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("chunk length {0} bytes is outside {CHUNK_LEN_MIN_BYTES}..={CHUNK_LEN_MAX_BYTES}")]
    ChunkLen(u32),
    #[error("{0} files is over the limit of {FILE_COUNT_MAX}")]
    TooManyFiles(usize),
    #[error("file {path} of {size_bytes} bytes is over the limit of {FILE_SIZE_MAX_BYTES} bytes")]
    FileTooLarge { path: RelPath, size_bytes: u64 },
    #[error("the transfer has {0} chunks, over the limit of {CHUNK_COUNT_MAX}: use larger chunks")]
    TooManyChunks(u64),
    #[error("path {0} is listed twice")]
    DuplicatePath(RelPath),
    #[error("path {0} is both a file and a folder of another file")]
    FileIsFolder(RelPath),
    #[error("db_meta of {0} bytes is over the limit of {DB_META_LEN_MAX_BYTES} bytes")]
    DbMetaTooLong(usize),
}

impl Offer {
    /// Checks every limit and the consistency of the paths. A target calls it before it
    /// creates anything.
    pub fn validate(&self) -> Result<(), OfferError> {
        if !(CHUNK_LEN_MIN_BYTES..=CHUNK_LEN_MAX_BYTES).contains(&self.chunk_len_bytes) {
            return Err(OfferError::ChunkLen(self.chunk_len_bytes));
        }
        if self.files.len() > FILE_COUNT_MAX as usize {
            return Err(OfferError::TooManyFiles(self.files.len()));
        }
        let meta_len = serde_json::to_string(&self.db_meta).map(|s| s.len()).unwrap_or(usize::MAX);
        if meta_len > DB_META_LEN_MAX_BYTES as usize {
            return Err(OfferError::DbMetaTooLong(meta_len));
        }
        let mut chunks_total: u64 = 0;
        let mut paths = BTreeSet::new();
        for file in &self.files {
            if file.size_bytes > FILE_SIZE_MAX_BYTES {
                return Err(OfferError::FileTooLarge { path: file.path.clone(), size_bytes: file.size_bytes });
            }
            chunks_total = chunks_total.saturating_add(chunk_count(file.size_bytes, self.chunk_len_bytes));
            if !paths.insert(file.path.as_str()) {
                return Err(OfferError::DuplicatePath(file.path.clone()));
            }
        }
        if chunks_total > CHUNK_COUNT_MAX {
            return Err(OfferError::TooManyChunks(chunks_total));
        }
        for file in &self.files {
            if let Some(parent) = file.path.parents().into_iter().find(|p| paths.contains(p)) {
                return Err(OfferError::FileIsFolder(RelPath::new(parent).unwrap_or_else(|_| file.path.clone())));
            }
        }
        Ok(())
    }

    /// Total bytes of all files.
    pub fn bytes_total(&self) -> u64 {
        self.files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size_bytes))
    }
}

/// How many chunks a file of `size_bytes` has (an empty file has none).
pub fn chunk_count(size_bytes: u64, chunk_len_bytes: u32) -> u64 {
    if chunk_len_bytes == 0 {
        return 0;
    }
    size_bytes.div_ceil(u64::from(chunk_len_bytes))
}

/// A control body that does not decode: malformed bytes from the peer, or a field over its
/// limit. serde's message quotes the offending input, so it is clipped
/// ([`clip_message`](crate::quote::clip_message)).
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("malformed control message: {}", crate::quote::clip_message(&.0.to_string()))]
    Malformed(#[from] serde_json::Error),
    #[error("control message `{message}`: {field} of {len} bytes is over the limit of {max} bytes")]
    TooLong { message: &'static str, field: &'static str, len: usize, max: u32 },
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Offer(_) => "offer",
            Self::Join { .. } => "join",
            Self::Joined => "joined",
            Self::WalStart => "wal_start",
            Self::WalDurable { .. } => "wal_durable",
            Self::Accept { .. } => "accept",
            Self::Acks { .. } => "acks",
            Self::FileDone { .. } => "file_done",
            Self::FileStaged { .. } => "file_staged",
            Self::BaseStaged { .. } => "base_staged",
            Self::Commit { .. } => "commit",
            Self::Committed => "committed",
            Self::Fence { .. } => "fence",
            Self::Fenced { .. } => "fenced",
            Self::FenceCancelled { .. } => "fence_cancelled",
            Self::Release { .. } => "release",
            Self::Released => "released",
            Self::Abort { .. } => "abort",
            Self::Aborted => "aborted",
            Self::Error { .. } => "error",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a control body and checks every string limit the encoder keeps
    /// ([`REASON_LEN_MAX_BYTES`], [`DB_META_LEN_MAX_BYTES`]): a peer that ignores them is
    /// refused here, before anything stores or shows what it sent. `db_meta` is measured as raw
    /// JSON before it is parsed into a value.
    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        // A body shorter than the limit cannot hold an over-long db_meta: skip the extra scan.
        if body.len() > DB_META_LEN_MAX_BYTES as usize {
            check_db_meta_raw(body)?;
        }
        let message: Message = serde_json::from_slice(body)?;
        message.check_lengths()?;
        Ok(message)
    }

    /// The string limits of a decoded message.
    fn check_lengths(&self) -> Result<(), MessageError> {
        let (field, text) = match self {
            Self::FenceCancelled { reason } => ("reason", reason),
            Self::Abort { reason, .. } => ("reason", reason),
            Self::Error { message, .. } => ("message", message),
            _ => return Ok(()),
        };
        if text.len() > REASON_LEN_MAX_BYTES as usize {
            return Err(MessageError::TooLong {
                message: self.name(),
                field,
                len: text.len(),
                max: REASON_LEN_MAX_BYTES,
            });
        }
        Ok(())
    }

    /// An error message, with the reason cut to the protocol's limit.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error { kind, message: cut_reason(message.into()) }
    }
}

/// `reason` cut to [`REASON_LEN_MAX_BYTES`] on a char boundary: what an encoder sends so the
/// peer's decoder takes it.
pub fn cut_reason(mut reason: String) -> String {
    if reason.len() > REASON_LEN_MAX_BYTES as usize {
        let mut cut = REASON_LEN_MAX_BYTES as usize;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// Measures a top-level `db_meta` member as raw JSON, without parsing it into a value (an
/// internally tagged enum buffers every member before it picks the variant, so the limit must
/// be checked before that).
fn check_db_meta_raw(body: &[u8]) -> Result<(), MessageError> {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        db_meta: Option<&'a serde_json::value::RawValue>,
    }
    let probe: Probe<'_> = serde_json::from_slice(body)?;
    let len = probe.db_meta.map_or(0, |raw| raw.get().len());
    if len > DB_META_LEN_MAX_BYTES as usize {
        return Err(MessageError::TooLong { message: "offer", field: "db_meta", len, max: DB_META_LEN_MAX_BYTES });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    fn offer(paths: &[&str]) -> Offer {
        Offer {
            migration_id: MigrationId::new("m1").unwrap(),
            vshard_id: VShardId(7),
            base_lsn: Lsn(100),
            chunk_len_bytes: 1 << 20,
            files: paths.iter().map(|p| OfferFile { path: RelPath::new(*p).unwrap(), size_bytes: 10 }).collect(),
            db_meta: serde_json::json!({"k": "v"}),
            wal: false,
        }
    }

    #[test]
    fn offers_round_trip_and_validate() {
        let message = Message::Offer(offer(&["a/b", "a/c", "d"]));
        assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        if let Message::Offer(o) = message {
            o.validate().unwrap();
        }
    }

    #[test]
    fn inconsistent_offers_are_refused() {
        assert!(matches!(offer(&["a", "a"]).validate(), Err(OfferError::DuplicatePath(_))));
        assert!(matches!(offer(&["a", "a/b"]).validate(), Err(OfferError::FileIsFolder(_))));
        let mut o = offer(&["a"]);
        o.chunk_len_bytes = 1;
        assert!(matches!(o.validate(), Err(OfferError::ChunkLen(1))));
        let mut o = offer(&["a"]);
        o.files[0].size_bytes = u64::MAX;
        assert!(matches!(o.validate(), Err(OfferError::FileTooLarge { .. })));
    }

    #[test]
    fn hostile_paths_in_an_offer_do_not_decode() {
        let body = br#"{"type":"offer","migration_id":"m","vshard_id":1,"base_lsn":0,"chunk_len_bytes":4096,"files":[{"path":"../etc/passwd","size_bytes":1}]}"#;
        assert!(Message::decode(body).is_err());
    }

    #[test]
    fn error_reasons_are_cut_to_the_limit() {
        if let Message::Error { message, .. } = Message::error(ErrorKind::Protocol, "é".repeat(5000)) {
            assert!(message.len() <= REASON_LEN_MAX_BYTES as usize);
        }
    }

    /// Issue 18: every reason limit the encoder keeps is checked when decoding, so a peer
    /// that ignores it cannot put a 64 MiB reason in a status or a tombstone.
    #[test]
    fn over_long_reasons_do_not_decode() {
        let long = "r".repeat(REASON_LEN_MAX_BYTES as usize + 1);
        let at_limit = "r".repeat(REASON_LEN_MAX_BYTES as usize);
        let id = MigrationId::new("m1").unwrap();
        type Build = Box<dyn Fn(String) -> Message>;
        let make: Vec<(Build, &str)> = vec![
            (Box::new(move |r| Message::Abort { migration_id: id.clone(), reason: r }), "reason"),
            (Box::new(|r| Message::FenceCancelled { reason: r }), "reason"),
            (Box::new(|r| Message::Error { kind: ErrorKind::Protocol, message: r }), "message"),
        ];
        for (build, field) in &make {
            let ok = build(at_limit.clone());
            assert_eq!(Message::decode(&ok.encode()).unwrap(), ok);
            let bad = build(long.clone()).encode();
            match Message::decode(&bad) {
                Err(MessageError::TooLong { field: f, len, max, .. }) => {
                    assert_eq!((f, len, max), (*field, long.len(), REASON_LEN_MAX_BYTES));
                }
                other => panic!("{field}: expected TooLong, got {other:?}"),
            }
        }
        // What ferry itself sends is cut to what it accepts.
        assert_eq!(cut_reason("é".repeat(5000)).len(), REASON_LEN_MAX_BYTES as usize);
    }

    /// Issue 18: `db_meta` is measured as raw JSON before it is parsed into a value.
    #[test]
    fn over_long_db_meta_is_refused_before_it_is_parsed() {
        let mut o = offer(&["a"]);
        o.db_meta = serde_json::Value::String("m".repeat(DB_META_LEN_MAX_BYTES as usize));
        let body = Message::Offer(o.clone()).encode();
        match Message::decode(&body) {
            Err(MessageError::TooLong { field: "db_meta", len, .. }) => {
                assert_eq!(len, DB_META_LEN_MAX_BYTES as usize + 2);
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
        // Deep nesting over the limit is refused by length before serde_json builds anything.
        let nested =
            format!("{}{}", "[".repeat(DB_META_LEN_MAX_BYTES as usize), "]".repeat(DB_META_LEN_MAX_BYTES as usize));
        let text = String::from_utf8(Message::Offer(offer(&["a"])).encode()).unwrap();
        let hostile = text.replace(r#""db_meta":{"k":"v"}"#, &format!(r#""db_meta":{nested}"#));
        assert!(matches!(Message::decode(hostile.as_bytes()), Err(MessageError::TooLong { field: "db_meta", .. })));
        // At the limit it decodes, in a body longer than the limit (the raw check ran).
        o.db_meta = serde_json::Value::String("m".repeat(DB_META_LEN_MAX_BYTES as usize - 2));
        let body = Message::Offer(o.clone()).encode();
        assert!(body.len() > DB_META_LEN_MAX_BYTES as usize);
        assert_eq!(Message::decode(&body).unwrap(), Message::Offer(o));
    }

    #[test]
    fn malformed_bodies_quote_at_most_a_clip_of_the_input() {
        let body = format!(r#"{{"type":"{}"}}"#, "t".repeat(1_000_000));
        let err = Message::decode(body.as_bytes()).unwrap_err().to_string();
        assert!(err.len() < 1000 && err.contains("(1000000 bytes)"), "{err}");
    }

    #[test]
    fn abort_messages_round_trip() {
        for message in [
            Message::Abort { migration_id: MigrationId::new("m1").unwrap(), reason: "operator".into() },
            Message::Aborted,
        ] {
            assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(1, 4096), 1);
        assert_eq!(chunk_count(4096, 4096), 1);
        assert_eq!(chunk_count(4097, 4096), 2);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn acks_round_trip(chunks in proptest::collection::vec((any::<u32>(), any::<u64>()), 0..64)) {
            let message = Message::Acks { chunks: chunks.into_iter().map(|(f, c)| ChunkRef { file_index: f, chunk_index: c }).collect() };
            prop_assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }

        #[test]
        fn file_done_round_trips(file in any::<u32>(), size in any::<u64>(), crc in any::<u32>()) {
            let message = Message::FileDone { file_index: file, size_bytes: size, crc32c: crc };
            prop_assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }
    }
}
