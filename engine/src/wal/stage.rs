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
//! Invariants: the staged folder always reads back in staged mode; LSNs on disk strictly
//! increase and are all above `base_lsn`; the returned durable LSN is on disk under a durable
//! name; memory held per batch is at most [`WRITE_COALESCE_MAX_BYTES`] beyond the records.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_wire::manifest::StagedWalSegment;
use ferry_wire::wal::{
    check_record, parse_segment_name, segment_name, Cursor, CursorConfig, CursorError, FormatError, Layout,
    LayoutChoice, Mode, Preamble, RecordHeader, Step, ALIGNMENT_DEFAULT_BYTES, PREAMBLE_LEN_BYTES,
    ROLL_SIZE_DEFAULT_BYTES, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::{crc32c_append, Lsn};

use crate::storage::{Storage, StorageFile};

/// Most bytes gathered in memory before one write call; a record at least this large is
/// written straight from the caller's buffer.
pub const WRITE_COALESCE_MAX_BYTES: usize = 4 << 20;

/// How a staged WAL is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageOptions {
    /// The migration's base LSN: every staged record is above it, and it is the durable LSN
    /// while nothing is staged.
    pub base_lsn: Lsn,
    /// A segment rolls when the next record would take it past this size.
    pub roll_size_bytes: u64,
}

impl StageOptions {
    /// Options with NodeDB's default 64 MiB roll size.
    pub fn new(base_lsn: Lsn) -> Self {
        StageOptions { base_lsn, roll_size_bytes: ROLL_SIZE_DEFAULT_BYTES }
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
    #[error("record given as LSN {lsn} is not a valid wal record ({source}); the source sent damaged bytes, fail the migration")]
    BadRecord { lsn: Lsn, source: FormatError },
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
    #[error("staged wal: cannot {op} {path}: {source}; the migration fails (a failed write or sync is never retried)")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("an earlier write or sync of this staged wal failed; it takes no more records (restart, and open it again to find what is durable)")]
    Failed,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StageError + 'a {
    move |source| StageError::Io { op, path: path.to_path_buf(), source }
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

/// Bytes gathered for one write call at `start` of the open segment.
#[derive(Debug, Default)]
struct Pending {
    start: u64,
    bytes: Vec<u8>,
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
    durable_lsn: Lsn,
    failed: bool,
}

impl StagedWal {
    /// Opens the staged WAL folder `dir` (`<staging>/wal`), creating it when missing, and
    /// recovers it after a restart. See the module docs.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: StageOptions,
    ) -> Result<(StagedWal, OpenReport), StageError> {
        // A segment is at most the roll size, or one record (64 MiB) alone: within what a
        // reader reads whole.
        if options.roll_size_bytes == 0 || options.roll_size_bytes > SEGMENT_LEN_MAX_BYTES {
            return Err(StageError::Misuse("roll_size_bytes must be above zero and at most 1 GiB"));
        }
        if !storage.exists(dir) {
            storage.create_dir_all(dir).map_err(io_err("create", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                storage.sync_dir(parent).map_err(io_err("sync folder", parent))?;
            }
        }
        let mut report = OpenReport::default();
        let (mut found, cut) = read_back(storage.as_ref(), dir)?;
        let mut dir_changed = false;
        if let Some(cut) = cut {
            if cut.valid_len_bytes != cut.file_len_bytes {
                let (_, file) = found.get(cut.index).ok_or(StageError::Misuse("cut outside the segments read"))?;
                let path = dir.join(&cut.name);
                file.set_len(cut.valid_len_bytes).map_err(io_err("truncate the torn tail of", &path))?;
                file.sync_data().map_err(io_err("sync", &path))?;
                report.truncated_bytes = cut.file_len_bytes.saturating_sub(cut.valid_len_bytes);
            }
            for name in cut.later_names {
                let path = dir.join(&name);
                storage.remove_file(&path).map_err(io_err("remove", &path))?;
                report.removed_segments.push(name);
                dir_changed = true;
            }
        }
        // A segment with no record (only a preamble, or empty) is never written by ferry
        // except as the torn start of a batch; a new one is made when needed.
        let mut kept = Vec::with_capacity(found.len());
        for (seg, file) in found.drain(..) {
            if seg.records_count == 0 {
                let path = dir.join(&seg.name);
                storage.remove_file(&path).map_err(io_err("remove", &path))?;
                report.removed_segments.push(seg.name);
                dir_changed = true;
            } else {
                kept.push((seg, file));
            }
        }
        // What is reported durable must be: after a process crash (not a power loss) the page
        // cache still holds bytes that were written but never synced, and they read back
        // like any others.
        for (seg, file) in &kept {
            file.sync_data().map_err(io_err("sync", &dir.join(&seg.name)))?;
        }
        if dir_changed || !kept.is_empty() {
            storage.sync_dir(dir).map_err(io_err("sync folder", dir))?;
        }
        if let Some((first, _)) = kept.first() {
            if first.first_lsn <= options.base_lsn {
                return Err(StageError::BelowBase { first_lsn: first.first_lsn, base_lsn: options.base_lsn });
            }
        }
        let open_file = kept.last().map(|(_, file)| Arc::clone(file));
        let segments: Vec<Segment> = kept.into_iter().map(|(seg, _)| seg).collect();
        let durable_lsn = segments.last().map_or(options.base_lsn, |s| s.last_lsn);
        report.durable_lsn = durable_lsn;
        report.records_count = segments.iter().map(|s| s.records_count).sum();
        let wal =
            StagedWal { storage, dir: dir.to_path_buf(), options, segments, open_file, durable_lsn, failed: false };
        Ok((wal, report))
    }

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

    /// Stages `records` (in LSN order, all above the durable LSN) durably and returns the new
    /// durable LSN: one write per segment run, one fdatasync per segment file written, one
    /// folder fsync when a segment file was created. An empty batch returns the durable LSN.
    pub fn append_batch(&mut self, records: &[StagedRecord<'_>]) -> Result<Lsn, StageError> {
        if self.failed {
            return Err(StageError::Failed);
        }
        let layouts = self.check_batch(records)?;
        let Some(last) = records.last() else { return Ok(self.durable_lsn) };
        // Poisoned until the batch is durable: any error below leaves it failed.
        self.failed = true;
        let mut touched: Vec<(String, Arc<dyn StorageFile>)> = Vec::new();
        let mut created = false;
        let mut pending = Pending { start: self.segments.last().map_or(0, |s| s.len_bytes), bytes: Vec::new() };
        for (record, layout) in records.iter().zip(layouts) {
            let len_bytes = record.bytes.len() as u64;
            match self.place(record.lsn, len_bytes, record.source_preamble, layout) {
                Place::Start { name_lsn } => {
                    self.write_pending(&mut pending)?;
                    let name = segment_name(name_lsn);
                    let path = self.dir.join(&name);
                    if self.storage.exists(&path) {
                        return Err(StageError::Corrupt {
                            path,
                            detail: "a file already has the name of the next staged segment".to_owned(),
                        });
                    }
                    let file = self.storage.open_rw(&path).map_err(io_err("create", &path))?;
                    touched.push((name.clone(), Arc::clone(&file)));
                    self.open_file = Some(file);
                    created = true;
                    self.segments.push(Segment {
                        name,
                        preamble: record.source_preamble,
                        layout,
                        len_bytes: 0,
                        crc32c: 0,
                        first_lsn: record.lsn,
                        last_lsn: record.lsn,
                        records_count: 0,
                    });
                    pending.start = 0;
                    if let Some(preamble) = record.source_preamble {
                        self.stage_bytes(&mut pending, &preamble)?;
                    }
                }
                Place::Append => {
                    if touched.is_empty() {
                        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else {
                            return Err(StageError::Misuse("append without an open segment"));
                        };
                        touched.push((seg.name.clone(), Arc::clone(file)));
                    }
                }
            }
            self.stage_bytes(&mut pending, record.bytes)?;
            if let Some(seg) = self.segments.last_mut() {
                seg.last_lsn = record.lsn;
                seg.records_count += 1;
            }
        }
        self.write_pending(&mut pending)?;
        for (name, file) in &touched {
            let path = self.dir.join(name);
            file.sync_data().map_err(io_err("sync", &path))?;
        }
        if created {
            self.storage.sync_dir(&self.dir).map_err(io_err("sync folder", &self.dir))?;
        }
        self.durable_lsn = last.lsn;
        self.failed = false;
        Ok(self.durable_lsn)
    }

    /// Checks every record of a batch; returns each record's layout.
    fn check_batch(&self, records: &[StagedRecord<'_>]) -> Result<Vec<Layout>, StageError> {
        let mut layouts = Vec::with_capacity(records.len());
        let mut previous = self.durable_lsn;
        for (i, record) in records.iter().enumerate() {
            let lsn = record.lsn;
            if lsn <= previous {
                return Err(if i == 0 || previous == self.durable_lsn {
                    StageError::NotAboveDurable { lsn, durable: self.durable_lsn }
                } else {
                    StageError::NotIncreasing { lsn, previous }
                });
            }
            let (header, record_bytes) =
                decode_record(record.bytes).map_err(|source| StageError::BadRecord { lsn, source })?;
            if record_bytes != record.bytes.len() {
                return Err(StageError::RecordLength { lsn, given_bytes: record.bytes.len(), record_bytes });
            }
            if header.lsn != lsn {
                return Err(StageError::LsnMismatch { lsn, found: header.lsn });
            }
            if let Some(preamble) = record.source_preamble {
                Preamble::decode(&preamble).map_err(|source| StageError::BadPreamble { lsn, source })?;
            }
            layouts.push(header.layout());
            previous = lsn;
        }
        Ok(layouts)
    }

    /// The plan: where the record `lsn` of `len_bytes` from a source segment with `preamble`,
    /// in `layout`, goes (module docs).
    fn place(&self, lsn: Lsn, len_bytes: u64, preamble: Option<[u8; PREAMBLE_LEN_BYTES]>, layout: Layout) -> Place {
        match self.segments.last() {
            None => Place::Start { name_lsn: lsn },
            Some(open)
                if open.preamble != preamble
                    || open.layout != layout
                    || (open.records_count > 0
                        && open.len_bytes.saturating_add(len_bytes) > self.options.roll_size_bytes) =>
            {
                Place::Start { name_lsn: Lsn(open.last_lsn.0.saturating_add(1)) }
            }
            Some(_) => Place::Append,
        }
    }

    /// Adds `bytes` to the open segment: gathered in `pending`, or written straight away when
    /// large.
    fn stage_bytes(&mut self, pending: &mut Pending, bytes: &[u8]) -> Result<(), StageError> {
        if pending.bytes.len().saturating_add(bytes.len()) > WRITE_COALESCE_MAX_BYTES {
            self.write_pending(pending)?;
        }
        if bytes.len() >= WRITE_COALESCE_MAX_BYTES {
            self.write_at(bytes, pending.start)?;
            pending.start = pending.start.saturating_add(bytes.len() as u64);
        } else {
            pending.bytes.extend_from_slice(bytes);
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.len_bytes = seg.len_bytes.saturating_add(bytes.len() as u64);
            seg.crc32c = crc32c_append(seg.crc32c, bytes);
        }
        Ok(())
    }

    fn write_pending(&mut self, pending: &mut Pending) -> Result<(), StageError> {
        if pending.bytes.is_empty() {
            return Ok(());
        }
        self.write_at(&pending.bytes, pending.start)?;
        pending.start = pending.start.saturating_add(pending.bytes.len() as u64);
        pending.bytes.clear();
        Ok(())
    }

    fn write_at(&self, bytes: &[u8], offset_bytes: u64) -> Result<(), StageError> {
        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else {
            return Err(StageError::Misuse("write without an open segment"));
        };
        let path = self.dir.join(&seg.name);
        file.write_at(bytes, offset_bytes).map_err(io_err("write", &path))
    }
}

/// The record at the start of `bytes` under whichever layout's CRC checks out.
fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, usize), FormatError> {
    match check_record(Layout::A, bytes) {
        Ok(found) => Ok(found),
        Err(a_err) => check_record(Layout::B, bytes).map_err(|_| a_err),
    }
}

/// Where the valid prefix of a staged folder stops.
#[derive(Debug)]
struct Cut {
    index: usize,
    name: String,
    valid_len_bytes: u64,
    file_len_bytes: u64,
    /// Segment files after the cut (written by the same unfinished batch).
    later_names: Vec<String>,
}

type Found = Vec<(Segment, Arc<dyn StorageFile>)>;

/// Reads the staged folder back with the staged-mode cursor, up to the end of its valid
/// prefix.
fn read_back(storage: &dyn Storage, dir: &Path) -> Result<(Found, Option<Cut>), StageError> {
    let mut names: Vec<(Lsn, String)> = storage
        .list_dir(dir)
        .map_err(io_err("list", dir))?
        .into_iter()
        .filter_map(|name| parse_segment_name(&name).map(|lsn| (lsn, name)))
        .collect();
    names.sort();
    let config =
        CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: ALIGNMENT_DEFAULT_BYTES, mode: Mode::Staged };
    let mut cursor = Cursor::new(config, None).map_err(|_| StageError::Misuse("bad cursor configuration"))?;
    let mut found: Found = Vec::new();
    for (index, (name_lsn, name)) in names.iter().enumerate() {
        let path = dir.join(name);
        let file = storage.open_rw(&path).map_err(io_err("open", &path))?;
        let bytes = read_segment(file.as_ref(), &path)?;
        match cursor.open_segment(*name_lsn) {
            Ok(()) => {}
            // Not named after the last LSN before it plus one: the segment before it lost
            // the tail of the same unfinished batch (a filesystem may make a new name durable
            // on its own, before the data of the segment before it). The prefix ends there.
            Err(CursorError::Corruption { .. }) if index > 0 => {
                let Some((previous, _)) = found.last() else {
                    return Err(StageError::Misuse("no segment before a misnamed one"));
                };
                let cut = Cut {
                    index: index - 1,
                    name: previous.name.clone(),
                    valid_len_bytes: previous.len_bytes,
                    file_len_bytes: previous.len_bytes,
                    later_names: names.iter().skip(index).map(|(_, n)| n.clone()).collect(),
                };
                return Ok((found, Some(cut)));
            }
            Err(e) => return Err(corrupt(dir, e)),
        }
        let mut seg = Segment {
            name: name.clone(),
            preamble: None,
            layout: Layout::A,
            len_bytes: 0,
            crc32c: 0,
            first_lsn: Lsn(0),
            last_lsn: Lsn(0),
            records_count: 0,
        };
        // Polled as the active segment first: a torn record is "wait", not corruption. A
        // segment read to its end is then polled once more as sealed, to end it.
        let last = index + 1 == names.len();
        let mut sealed = false;
        let valid_len = loop {
            match cursor.poll(&bytes, sealed) {
                Ok(Step::Record(record)) => {
                    if seg.records_count == 0 {
                        seg.first_lsn = record.header.lsn;
                        seg.layout = record.header.layout();
                    }
                    seg.last_lsn = record.header.lsn;
                    seg.records_count += 1;
                }
                Ok(Step::Wait { offset_bytes }) if last || offset_bytes != bytes.len() as u64 => break offset_bytes,
                Ok(Step::Wait { .. }) => sealed = true,
                Ok(Step::EndOfSegment { .. }) | Err(CursorError::Corruption { .. }) => break cursor.offset_bytes(),
                Err(e) => return Err(corrupt(dir, e)),
            }
        };
        let valid = usize::try_from(valid_len).ok().and_then(|n| bytes.get(..n)).unwrap_or(&bytes);
        if Preamble::is_present(valid) {
            seg.preamble = valid.get(..PREAMBLE_LEN_BYTES).and_then(|p| <[u8; PREAMBLE_LEN_BYTES]>::try_from(p).ok());
        }
        seg.len_bytes = valid.len() as u64;
        seg.crc32c = crc32c_append(0, valid);
        let file_len = bytes.len() as u64;
        found.push((seg, file));
        if valid_len != file_len {
            let later_names = names.iter().skip(index + 1).map(|(_, n)| n.clone()).collect();
            let cut =
                Cut { index, name: name.clone(), valid_len_bytes: valid_len, file_len_bytes: file_len, later_names };
            return Ok((found, Some(cut)));
        }
    }
    Ok((found, None))
}

fn corrupt(dir: &Path, e: CursorError) -> StageError {
    match e {
        CursorError::Corruption { segment, offset_bytes, what } => {
            StageError::Corrupt { path: dir.join(segment), detail: format!("at byte {offset_bytes}: {what}") }
        }
        other => StageError::Corrupt { path: dir.to_path_buf(), detail: other.to_string() },
    }
}

/// Reads a whole segment file, refusing one over [`SEGMENT_LEN_MAX_BYTES`] before allocating.
fn read_segment(file: &dyn StorageFile, path: &Path) -> Result<Vec<u8>, StageError> {
    let len_bytes = file.len_bytes().map_err(io_err("read", path))?;
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(StageError::SegmentTooLarge {
            path: path.to_path_buf(),
            len_bytes,
            max_bytes: SEGMENT_LEN_MAX_BYTES,
        });
    }
    // At most SEGMENT_LEN_MAX_BYTES (1 GiB): fits a usize.
    let len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    let mut bytes = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let buf = bytes.get_mut(done..).unwrap_or(&mut []);
        let n = file.read_at(buf, done as u64).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    bytes.truncate(done);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::storage::FakeStorage;
    use ferry_wire::wal::{encode_record, Placement, StagedPlan};
    use ferry_wire::{crc32c, VShardId};

    fn record(layout: Layout, lsn: u64, payload_len: usize) -> Vec<u8> {
        let header = RecordHeader::new(layout, 1, Lsn(lsn), VShardId(7));
        let payload: Vec<u8> = (0..payload_len).map(|i| (lsn as usize + i) as u8).collect();
        let mut out = Vec::new();
        encode_record(&header, &payload, &mut out).unwrap();
        out
    }

    fn preamble(epoch: u8) -> [u8; PREAMBLE_LEN_BYTES] {
        Preamble::new(0, 3, [epoch, 0, 0, 0]).encode()
    }

    fn fake() -> (FakeStorage, Arc<dyn Storage>, PathBuf) {
        let fs = FakeStorage::new();
        fs.create_dir_all(Path::new("/s")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let storage: Arc<dyn Storage> = Arc::new(fs.clone());
        (fs, storage, PathBuf::from("/s/wal"))
    }

    fn options(base: u64, roll: u64) -> StageOptions {
        StageOptions { base_lsn: Lsn(base), roll_size_bytes: roll }
    }

    /// A test record: LSN, bytes, source preamble.
    type Rec = (u64, Vec<u8>, Option<[u8; 16]>);

    fn batch(recs: &[Rec]) -> Vec<StagedRecord<'_>> {
        recs.iter().map(|(lsn, bytes, p)| StagedRecord { lsn: Lsn(*lsn), bytes, source_preamble: *p }).collect()
    }

    /// Every record of a staged folder, read back with the staged cursor: (segment, lsn, bytes).
    fn read_staged(storage: &dyn Storage, dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
        let mut names: Vec<_> =
            storage.list_dir(dir).unwrap().into_iter().filter_map(|n| parse_segment_name(&n).map(|l| (l, n))).collect();
        names.sort();
        let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
        let mut cursor = Cursor::new(config, None).unwrap();
        let mut out = Vec::new();
        for (i, (lsn, name)) in names.iter().enumerate() {
            let bytes = storage.read_all(&dir.join(name)).unwrap();
            cursor.open_segment(*lsn).unwrap();
            let sealed = i + 1 < names.len();
            loop {
                match cursor.poll(&bytes, sealed).unwrap() {
                    Step::Record(r) => out.push((name.clone(), r.header.lsn.0, bytes[r.record_range()].to_vec())),
                    Step::Wait { offset_bytes } => {
                        assert_eq!(offset_bytes, bytes.len() as u64, "bytes after the last record of {name}");
                        break;
                    }
                    Step::EndOfSegment { .. } => break,
                }
            }
        }
        out
    }

    #[test]
    fn segments_roll_split_on_preamble_and_layout_and_are_named_after_the_last_lsn() {
        let (_fs, storage, dir) = fake();
        let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(100, 300)).unwrap();
        assert_eq!(report, OpenReport { durable_lsn: Lsn(100), ..OpenReport::default() });
        let p1 = Some(preamble(1));
        let p2 = Some(preamble(2));
        let recs = vec![
            (103, record(Layout::A, 103, 10), p1),
            (105, record(Layout::A, 105, 10), p1),
            (110, record(Layout::A, 110, 10), p2),  // new preamble: wal-106
            (111, record(Layout::B, 111, 10), p2),  // new layout: wal-111
            (120, record(Layout::B, 120, 400), p2), // over the roll: wal-112, alone
            (121, record(Layout::B, 121, 0), None), // preamble gone: wal-121
            (122, record(Layout::B, 122, 0), None),
        ];
        assert_eq!(wal.append_batch(&batch(&recs)).unwrap(), Lsn(122));
        let names: Vec<String> = wal.segments().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, [103, 106, 111, 112, 121].map(|l| segment_name(Lsn(l))));
        let read = read_staged(storage.as_ref(), &dir);
        let expected: Vec<(u64, Vec<u8>)> = recs.iter().map(|(l, b, _)| (*l, b.clone())).collect();
        assert_eq!(read.iter().map(|(_, l, b)| (*l, b.clone())).collect::<Vec<_>>(), expected);
        // Each segment opens with its records' source preamble, then holds them back to back.
        let seg0 = storage.read_all(&dir.join(segment_name(Lsn(103)))).unwrap();
        assert_eq!(&seg0[..16], &preamble(1));
        assert_eq!(seg0.len(), 16 + recs[0].1.len() + recs[1].1.len());
        let seg4 = storage.read_all(&dir.join(segment_name(Lsn(121)))).unwrap();
        assert_eq!(seg4, [recs[5].1.clone(), recs[6].1.clone()].concat());
    }

    #[test]
    fn manifest_entries_describe_the_files() {
        let (_fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 200)).unwrap();
        let p = Some(preamble(9));
        let recs: Vec<_> = (1..=9).map(|l| (l * 2, record(Layout::B, l * 2, 40), p)).collect();
        for chunk in recs.chunks(2) {
            wal.append_batch(&batch(chunk)).unwrap();
        }
        let entries = wal.segments();
        assert!(entries.len() > 2);
        let mut lsns = Vec::new();
        for e in &entries {
            let bytes = storage.read_all(&dir.join(&e.name)).unwrap();
            assert_eq!((e.size_bytes, e.crc32c), (bytes.len() as u64, crc32c(&bytes)), "{}", e.name);
            assert_eq!((e.layout.as_str(), e.key_id), ("B", Some(3)));
            assert!(e.first_lsn <= e.last_lsn);
            lsns.push((e.first_lsn.0, e.last_lsn.0));
        }
        assert_eq!(lsns.first().unwrap().0, 2);
        assert_eq!(lsns.last().unwrap().1, 18);
        // Reopening computes the same entries from the files.
        drop(wal);
        let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 200)).unwrap();
        assert_eq!(wal.segments(), entries);
        assert_eq!((report.durable_lsn, report.records_count), (Lsn(18), 9));
    }

    #[test]
    fn stale_and_bad_records_are_refused_and_leave_the_wal_usable() {
        let (_fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(10, 1 << 20)).unwrap();
        let r11 = record(Layout::A, 11, 5);
        wal.append_batch(&batch(&[(11, r11.clone(), None)])).unwrap();
        // At or below the durable LSN, even byte-identical: refused.
        let err = wal.append_batch(&batch(&[(11, r11.clone(), None)])).unwrap_err();
        assert!(matches!(err, StageError::NotAboveDurable { lsn: Lsn(11), durable: Lsn(11) }), "{err}");
        let r12 = record(Layout::A, 12, 5);
        let r14 = record(Layout::A, 14, 5);
        let err = wal.append_batch(&batch(&[(14, r14.clone(), None), (12, r12.clone(), None)])).unwrap_err();
        assert!(matches!(err, StageError::NotIncreasing { lsn: Lsn(12), previous: Lsn(14) }), "{err}");
        let err = wal.append_batch(&batch(&[(13, r12.clone(), None)])).unwrap_err();
        assert!(matches!(err, StageError::LsnMismatch { lsn: Lsn(13), found: Lsn(12) }), "{err}");
        let mut flipped = r12.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = wal.append_batch(&batch(&[(12, flipped, None)])).unwrap_err();
        assert!(matches!(err, StageError::BadRecord { lsn: Lsn(12), .. }), "{err}");
        let mut long = r12.clone();
        long.push(0);
        let err = wal.append_batch(&batch(&[(12, long, None)])).unwrap_err();
        assert!(matches!(err, StageError::RecordLength { .. }), "{err}");
        let err = wal.append_batch(&batch(&[(12, r12.clone(), Some([0; 16]))])).unwrap_err();
        assert!(matches!(err, StageError::BadPreamble { .. }), "{err}");
        // A refused batch wrote nothing: the good records follow on.
        assert_eq!(wal.append_batch(&[]).unwrap(), Lsn(11));
        assert_eq!(wal.append_batch(&batch(&[(12, r12.clone(), None), (14, r14.clone(), None)])).unwrap(), Lsn(14));
        let read: Vec<u64> = read_staged(storage.as_ref(), &dir).iter().map(|(_, l, _)| *l).collect();
        assert_eq!(read, [11, 12, 14]);
        // Records at or below base_lsn are refused too.
        let (mut fresh, _) = StagedWal::open(Arc::clone(&storage), Path::new("/s/wal2"), options(11, 100)).unwrap();
        assert!(matches!(fresh.append_batch(&batch(&[(11, r11, None)])), Err(StageError::NotAboveDurable { .. })));
    }

    #[test]
    fn torn_tails_and_later_segments_are_cut_on_open() {
        let (_fs, storage, dir) = fake();
        // Records of 84 bytes: two per segment.
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
        let recs: Vec<_> = (1..=6).map(|l| (l, record(Layout::A, l, 30), None)).collect();
        wal.append_batch(&batch(&recs)).unwrap();
        let before = wal.segments();
        assert_eq!(before.len(), 3);
        drop(wal);
        // A half-written record at the end of the last segment.
        let last = dir.join(&before[2].name);
        let half = record(Layout::A, 7, 30);
        storage.open_rw(&last).unwrap().write_at(&half[..40], before[2].size_bytes).unwrap();
        let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
        assert_eq!((report.durable_lsn, report.truncated_bytes), (Lsn(6), 40));
        assert_eq!(wal.segments(), before);
        drop(wal);
        // Garbage in the middle segment, and a later segment that was being written with it:
        // the valid prefix stops at the garbage, the later segment goes.
        let mid = dir.join(&before[1].name);
        storage.open_rw(&mid).unwrap().write_at(&[0xAB; 10], before[1].size_bytes).unwrap();
        let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
        assert_eq!(report.durable_lsn, before[1].last_lsn);
        assert_eq!(report.truncated_bytes, 10);
        assert_eq!(report.removed_segments, vec![before[2].name.clone()]);
        assert_eq!(wal.segments(), before[..2].to_vec());
        // A later segment not named after the last LSN before it plus one (the rest of the
        // batch that filled it was lost) goes too.
        drop(wal);
        let misnamed = segment_name(Lsn(before[1].last_lsn.0 + 2));
        let r = record(Layout::A, before[1].last_lsn.0 + 2, 30);
        storage.open_rw(&dir.join(&misnamed)).unwrap().write_at(&r, 0).unwrap();
        let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
        assert_eq!((report.durable_lsn, report.truncated_bytes), (before[1].last_lsn, 0));
        assert_eq!(report.removed_segments, vec![misnamed]);
        // Resuming from the reported LSN restores the same folder.
        let resume = report.durable_lsn.0 as usize;
        wal.append_batch(&batch(&recs[resume..])).unwrap();
        assert_eq!(wal.segments(), before);
        let read: Vec<u64> = read_staged(storage.as_ref(), &dir).iter().map(|(_, l, _)| *l).collect();
        assert_eq!(read, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn preamble_only_segments_are_removed_and_a_wrong_base_is_refused() {
        let (_fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
        wal.append_batch(&batch(&[(5, record(Layout::B, 5, 1), None)])).unwrap();
        drop(wal);
        let stray = dir.join(segment_name(Lsn(6)));
        storage.open_rw(&stray).unwrap().write_at(&preamble(4), 0).unwrap();
        let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
        assert_eq!(report.removed_segments, vec![segment_name(Lsn(6))]);
        assert_eq!(wal.durable_lsn(), Lsn(5));
        assert!(!storage.exists(&stray));
        drop(wal);
        let err = StagedWal::open(Arc::clone(&storage), &dir, options(5, 1000)).unwrap_err();
        assert!(matches!(err, StageError::BelowBase { first_lsn: Lsn(5), base_lsn: Lsn(5) }), "{err}");
        assert!(matches!(StagedWal::open(Arc::clone(&storage), &dir, options(0, 0)), Err(StageError::Misuse(_))));
        let too_large = options(0, SEGMENT_LEN_MAX_BYTES + 1);
        assert!(matches!(StagedWal::open(storage, &dir, too_large), Err(StageError::Misuse(_))));
    }

    /// A process that died after writing a batch but before syncing it leaves the bytes in
    /// the page cache; the reopen reads them back and must make them durable before it
    /// reports them.
    #[test]
    fn open_makes_what_it_reports_durable() {
        let (fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
        let r1 = record(Layout::A, 1, 3);
        wal.append_batch(&batch(&[(1, r1.clone(), None)])).unwrap();
        drop(wal);
        let r2 = record(Layout::A, 2, 3);
        storage.open_rw(&dir.join(segment_name(Lsn(1)))).unwrap().write_at(&r2, r1.len() as u64).unwrap();
        let (_, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
        assert_eq!(report.durable_lsn, Lsn(2));
        let after_power_loss: Arc<dyn Storage> = Arc::new(fs.recover());
        let (wal, _) = StagedWal::open(after_power_loss, &dir, options(0, 1000)).unwrap();
        assert_eq!(wal.durable_lsn(), Lsn(2));
    }

    #[test]
    fn a_failed_sync_fails_the_wal_for_good() {
        let (fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
        fs.crash_at_sync(1);
        let err = wal.append_batch(&batch(&[(1, record(Layout::A, 1, 3), None)])).unwrap_err();
        assert!(matches!(err, StageError::Io { op: "sync", .. }), "{err}");
        let err = wal.append_batch(&batch(&[(2, record(Layout::A, 2, 3), None)])).unwrap_err();
        assert!(matches!(err, StageError::Failed), "{err}");
    }

    #[test]
    fn one_sync_per_file_and_one_folder_sync_per_created_segment() {
        let (fs, storage, dir) = fake();
        // Records of 74 bytes: three fit in 230.
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 230)).unwrap();
        let recs: Vec<_> = (1..=4).map(|l| (l, record(Layout::A, l, 20), None)).collect();
        let before = fs.syncs_count();
        wal.append_batch(&batch(&recs[..1])).unwrap(); // creates wal-1: data + folder
        assert_eq!(fs.syncs_count() - before, 2);
        let before = fs.syncs_count();
        wal.append_batch(&batch(&recs[1..2])).unwrap(); // appends: data only
        assert_eq!(fs.syncs_count() - before, 1);
        let before = fs.syncs_count();
        wal.append_batch(&batch(&recs[2..])).unwrap(); // fills wal-1, starts wal-4: 2 files + folder
        assert_eq!(wal.segments().len(), 2);
        assert_eq!(fs.syncs_count() - before, 3);
    }

    /// A tiny deterministic generator (no dev-dependency needed).
    fn next(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// With one layout, the plan here and `StagedPlan` agree on every placement.
    #[test]
    fn the_plan_agrees_with_staged_plan_when_the_layout_is_fixed() {
        for round in 0..40u64 {
            let mut seed = round;
            let roll = 100 + next(&mut seed) % 900;
            let (_fs, storage, dir) = fake();
            let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, roll)).unwrap();
            let mut plan = StagedPlan::new(roll);
            let mut lsn = 0;
            for _ in 0..30 {
                lsn += 1 + next(&mut seed) % 5;
                let bytes = record(Layout::B, lsn, (next(&mut seed) % 300) as usize);
                let epoch = (next(&mut seed) % 3) as u8;
                let pre = (epoch > 0).then(|| preamble(epoch));
                let expected = plan.place(Lsn(lsn), bytes.len() as u64, pre.map(|p| Preamble::decode(&p).unwrap()));
                let got = wal.place(Lsn(lsn), bytes.len() as u64, pre, Layout::B);
                match (expected.unwrap(), got) {
                    (Placement::Append, Place::Append) => {}
                    (Placement::StartSegment { name_lsn, .. }, Place::Start { name_lsn: n }) => assert_eq!(name_lsn, n),
                    (e, g) => panic!("round {round} lsn {lsn}: StagedPlan {e:?}, stage {g:?}"),
                }
                wal.append_batch(&[StagedRecord { lsn: Lsn(lsn), bytes: &bytes, source_preamble: pre }]).unwrap();
            }
        }
    }
}
