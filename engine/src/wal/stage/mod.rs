//! The target's staged WAL: the migrating vShard's records, appended durably (group commit)
//! to `<staging>/wal/` through the storage seam (DESIGN sections 3 and 8).
//!
//! What it does: [`StagedWal::append_batch`] takes records exactly as they lie on the source
//! (header and payload bytes, the LSN, and the 16-byte preamble of the source segment each
//! came from, if any), checks them all, writes them back to back in the source's layout,
//! fdatasyncs every segment file the batch wrote once, fsyncs the folder when the batch
//! created a segment file (so its name is durable), and returns the durable LSN. Segments
//! follow DESIGN section 3, the rules of [`StagedPlan`](ferry_wire::wal::StagedPlan):
//! the first segment is named after its first record's LSN; segment k > 0 is named after the
//! last LSN of segment k - 1 plus one; each segment opens with the preamble of the source
//! segment its records came from, so a record whose source preamble differs starts a new
//! segment; a segment rolls when the next record would take it past the roll size (a larger
//! record gets a segment of its own). One rule is added, which is why `StagedPlan` itself is
//! not used: a record in the other header layout (a source that was upgraded from
//! nodedb-wal 0.4 to 0.6 mid-migration, without encryption, so without a preamble change)
//! also starts a new segment, because a reader fixes a segment's layout from its first
//! record. A unit test checks the two plans agree whenever the layout does not change.
//!
//! [`StagedWal::open`] is both "start" and "restart": it reads the folder back with the
//! staged-mode [`Cursor`], keeps the longest valid prefix of records, truncates what follows
//! it (a torn tail: a batch that was being written when the node died), removes segment files
//! after that point and segment files holding no record, and reports the durable LSN to
//! resume from (the last staged LSN, or `base_lsn` when nothing is staged). It fdatasyncs
//! every segment it keeps and fsyncs the folder before reporting: after a process crash (not
//! a power loss) the page cache still holds written but unsynced bytes, which read back like
//! durable ones.
//! [`StagedWal::segments`] gives the `MANIFEST.json` entry of every staged segment.
//!
//! Preallocation: the open segment's file is kept zero-filled ahead of its records (by
//! [`StageOptions::preallocate_bytes`], extended when less than half of that is left), so a
//! group commit writes into blocks the file already has and its fdatasync flushes data only.
//! An append that grows the file makes its fdatasync commit the filesystem's journal too (the
//! new size and blocks), about twice the flushes. The zeros past the records are never part of
//! a segment's size or CRC32C in the manifest; a reader stops at them as at the end of what is
//! written. They are cut when the segment rolls (in the same batch, before it is durable),
//! by [`StagedWal::trim`] (before a staging is released: a released staged WAL is records back
//! to back, DESIGN section 3), and by [`StagedWal::open`] as any torn tail.
//!
//! Decisions, written down:
//! - A record at or below the durable LSN is refused ([`StageError::NotAboveDurable`]), not
//!   skipped, even when it is byte-identical to what is staged. The resume protocol asks the
//!   target for its durable LSN and sends from the next one, so such a record means the
//!   sender is confused; skipping it silently would hide that (and would need an LSN index
//!   of the staged bytes). Nothing is ever staged twice.
//! - A whole batch is checked before its first byte is written, so a refused batch (any
//!   caller error or malformed record) leaves the staged WAL as it was and usable.
//! - A failed write or sync is returned and poisons the value: every later call returns
//!   [`StageError::Failed`]. Nothing is retried (DESIGN section 8); after a restart,
//!   [`StagedWal::open`] finds what is durable.
//! - After a crash ferry cannot tell a torn tail from damage to bytes it had already synced:
//!   both end the valid prefix, and the durable LSN goes back to it. The sender then resends
//!   from there (or fails with a clear error if the source no longer holds those records).
//!   [`OpenReport`] says how many bytes and which files were cut, for the daemon to log.
//!
//! What it does not: decrypt or re-frame anything (a record's bytes are written as they
//! are; headers are never rewritten), select records, write `MANIFEST.json`, or create the
//! staging root (only its `wal/` folder).
//!
//! Layout of this module: the types and the public API here, appending in `append`, opening
//! and recovery in `recovery`, unit tests in `tests`.
//!
//! Invariants: the staged folder always reads back in staged mode; LSNs on disk strictly
//! increase and are all above `base_lsn`; the returned durable LSN is on disk under a durable
//! name; memory held per batch beyond the records is a list of slices into them (one
//! vectored write per [`WRITE_COALESCE_MAX_BYTES`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_wire::manifest::StagedWalSegment;
use ferry_wire::wal::{FormatError, Layout, Preamble, PREAMBLE_LEN_BYTES, ROLL_SIZE_DEFAULT_BYTES};
use ferry_wire::Lsn;

use crate::storage::{Storage, StorageFile};

mod append;
mod recovery;
#[cfg(test)]
mod tests;

/// Most record bytes gathered for one vectored write call. Records are gathered by
/// reference (slices of the caller's buffers, the frame bodies they arrived in), never copied.
pub const WRITE_COALESCE_MAX_BYTES: usize = 4 << 20;

/// How a staged WAL is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageOptions {
    /// The migration's base LSN: every staged record is above it, and it is the durable LSN
    /// while nothing is staged.
    pub base_lsn: Lsn,
    /// A segment rolls when the next record would take it past this size.
    pub roll_size_bytes: u64,
    /// Zeros kept written ahead of the open segment's records (0: none; the file grows with
    /// every group commit). See the module docs.
    pub preallocate_bytes: u64,
}

/// Zeros written ahead of the open segment's records by default: one extension (and one
/// journal commit) per MiB of records.
pub const PREALLOCATE_DEFAULT_BYTES: u64 = 1 << 20;

/// A preallocation is written in pieces of this size.
const ZEROS_PIECE_BYTES: usize = 64 << 10;

impl StageOptions {
    /// Options with NodeDB's default 64 MiB roll size and [`PREALLOCATE_DEFAULT_BYTES`].
    pub fn new(base_lsn: Lsn) -> Self {
        StageOptions {
            base_lsn,
            roll_size_bytes: ROLL_SIZE_DEFAULT_BYTES,
            preallocate_bytes: PREALLOCATE_DEFAULT_BYTES,
        }
    }
}

/// One record to stage, exactly as the source holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedRecord<'a> {
    /// The record's LSN (must match its header).
    pub lsn: Lsn,
    /// Header and payload, byte for byte as in the source segment.
    pub bytes: &'a [u8],
    /// The 16-byte preamble of the source segment the record came from, if it had one.
    pub source_preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
}

/// How much of each record [`StagedWal::append_checked_batch`] verifies before anything is
/// written.
///
/// Every record's CRC32C is checked once where it is read from the database's WAL (the
/// source's tail cursor, DESIGN section 6), and the WAL batch frame that carries it has its
/// own body CRC32C, computed by the source over the batch and checked by the target before
/// the body is decoded (DESIGN section 7). Checking each record's CRC again on the target
/// proves nothing those two do not (the bytes were intact in the source's WAL, and the batch
/// arrived as the source built it), and it was one of five CRC passes over every record.
/// What is checked in both modes: the header's magic and version, its LSN against the one the
/// batch gives, the record's length against its header, the preamble, and LSN order. The
/// staged bytes are covered afterwards by each segment's CRC32C in `MANIFEST.json`, and every
/// record's CRC is checked again whenever a staged WAL is read (`StagedWal::open`, the
/// importer's reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordCheck {
    /// Header fields and each record's CRC32C: records from anywhere.
    Crc,
    /// Header fields and lengths, no CRC: records that arrived in a WAL batch frame whose body
    /// CRC32C checked out. The layout is told by the record's length (the headers of the two
    /// layouts differ in length), not by which CRC checks out.
    Framed,
}

/// What [`StagedWal::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenReport {
    /// The LSN to resume from plus one is the next record to send.
    pub durable_lsn: Lsn,
    /// Records in the staged WAL.
    pub records_count: u64,
    /// Bytes cut after the valid prefix (a torn tail).
    pub truncated_bytes: u64,
    /// Segment files removed: after a torn tail, or holding no record.
    pub removed_segments: Vec<String>,
}

/// Why staging failed. `BadRecord`, `RecordLength`, `LsnMismatch` and `BadPreamble` blame the
/// bytes handed in; `Corrupt` and `SegmentTooLarge` the staged folder's contents;
/// `NotAboveDurable`, `NotIncreasing`, `BelowBase` and `Misuse` the caller; `Io` and `Failed`
/// the storage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("record given as LSN {lsn} is not a valid wal record ({cause}); the source sent damaged bytes, fail the migration")]
    BadRecord { lsn: Lsn, cause: FormatError },
    #[error("record given as LSN {lsn} is {given_bytes} bytes but its header says {record_bytes}; pass exactly one record's bytes")]
    RecordLength { lsn: Lsn, given_bytes: usize, record_bytes: usize },
    #[error("record given as LSN {lsn} carries LSN {found} in its header; pass the record's own LSN")]
    LsnMismatch { lsn: Lsn, found: Lsn },
    #[error(
        "the source preamble given with LSN {lsn} is not valid ({source}); pass the source segment's first 16 bytes"
    )]
    BadPreamble { lsn: Lsn, source: FormatError },
    #[error("staged wal {path} is corrupt: {detail}; abort the migration and start it again")]
    Corrupt { path: PathBuf, detail: String },
    #[error("staged wal segment {path} is {len_bytes} bytes, over the {max_bytes}-byte limit; it is not a staged wal ferry wrote")]
    SegmentTooLarge { path: PathBuf, len_bytes: u64, max_bytes: u64 },
    #[error("record LSN {lsn} is at or below the durable LSN {durable}: resume from the durable LSN plus one (nothing is staged twice)")]
    NotAboveDurable { lsn: Lsn, durable: Lsn },
    #[error("record LSN {lsn} follows LSN {previous} in the batch: LSNs in a batch must increase")]
    NotIncreasing { lsn: Lsn, previous: Lsn },
    #[error(
        "the staged wal holds LSN {first_lsn}, at or below base_lsn {base_lsn}: open it with the migration's base_lsn"
    )]
    BelowBase { first_lsn: Lsn, base_lsn: Lsn },
    #[error("staged wal misuse: {0}")]
    Misuse(&'static str),
    #[error("staged wal: cannot {op} {path}: {cause}; the migration fails (a failed write or sync is never retried)")]
    Io { op: &'static str, path: PathBuf, cause: io::Error },
    #[error("an earlier write or sync of this staged wal failed; it takes no more records (restart, and open it again to find what is durable)")]
    Failed,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StageError + 'a {
    move |source| StageError::Io { op, path: path.to_path_buf(), cause: source }
}

/// One staged segment as ferry knows it (always durable between calls).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    name: String,
    preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
    layout: Layout,
    len_bytes: u64,
    crc32c: u32,
    first_lsn: Lsn,
    last_lsn: Lsn,
    records_count: u64,
}

impl Segment {
    fn entry(&self) -> StagedWalSegment {
        StagedWalSegment {
            name: self.name.clone(),
            size_bytes: self.len_bytes,
            crc32c: self.crc32c,
            layout: self.layout.name().to_owned(),
            first_lsn: self.first_lsn,
            last_lsn: self.last_lsn,
            key_id: self.preamble.and_then(|p| Preamble::decode(&p).ok()).map(|p| p.key_id),
        }
    }
}

/// Where the next record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Append,
    Start { name_lsn: Lsn },
}

/// A staged WAL folder open for appending. See the module docs.
#[derive(Debug)]
pub struct StagedWal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    options: StageOptions,
    segments: Vec<Segment>,
    /// The last segment's file, appended to.
    open_file: Option<Arc<dyn StorageFile>>,
    /// The open segment file's length: its records, then zeros (preallocated).
    open_file_len_bytes: u64,
    durable_lsn: Lsn,
    failed: bool,
}

impl StagedWal {
    /// The highest LSN that is durable (`base_lsn` while nothing is staged).
    pub fn durable_lsn(&self) -> Lsn {
        self.durable_lsn
    }

    /// The staged WAL folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `MANIFEST.json` entry of every staged segment, in order. Everything listed is
    /// durable.
    pub fn segments(&self) -> Vec<StagedWalSegment> {
        self.segments.iter().map(Segment::entry).collect()
    }

    /// Cuts the zeros preallocated past the open segment's records, durably: the staged WAL
    /// is then records back to back, as a released staging must be.
    pub fn trim(&mut self) -> Result<(), StageError> {
        if self.failed {
            return Err(StageError::Failed);
        }
        // Poisoned until the cut is durable, as a batch is.
        self.failed = true;
        let mut cut = Vec::new();
        self.cut_zeros_of_open(&mut cut)?;
        for (name, file) in &cut {
            file.sync_data().map_err(io_err("sync", &self.dir.join(name)))?;
        }
        self.failed = false;
        Ok(())
    }
}
