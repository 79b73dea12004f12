//! A writer of NodeDB-format WAL folders, for the reference node, the tests and the benches.
//!
//! What it does: appends records in layout A or B to `wal-<first_lsn:020>.seg` segments,
//! assigning dense LSNs, and rolls to a new segment (named after the next LSN) when the
//! roll size would be passed. Two flush styles:
//! - [`FlushStyle::Direct`] behaves like NodeDB's O_DIRECT writer: each flush starts on a
//!   block boundary and is rounded up to a whole block. Layout A leaves the rest of the last
//!   block unframed ([`Leftovers::Zeros`], or [`Leftovers::Stale`]: the bytes of the reused
//!   write buffer, which can hold whole old records with valid CRCs, as real NodeDB WALs
//!   do). Layout B frames the gap as a padding record (the gap, or the gap plus one block
//!   when the gap is smaller than a header).
//! - [`FlushStyle::Buffered`] writes exactly the pending bytes, no padding.
//!
//! With [`PreambleOptions`], every segment starts with a 16-byte "WALP" preamble whose epoch
//! changes at every roll.
//!
//! What it does not: real O_DIRECT (it writes with plain positional `std::fs` writes; the
//! bytes on disk are what an O_DIRECT writer leaves, the page-cache behaviour is not), or
//! encryption (a caller that sets the encrypted flag supplies an opaque payload itself).
//! Nothing is flushed on drop: call [`WalWriter::flush`] or [`WalWriter::sync`].
//!
//! Invariants: LSNs are dense and start at the first LSN given; a segment holds at least one
//! record before it rolls; every flush in Direct style starts and ends on a block boundary.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_wire::wal::header::{encode_padding, encode_record, padding_span_bytes};
use ferry_wire::wal::{
    segment_name, FormatError, Layout, LayoutFields, Preamble, RecordHeader, ALIGNMENT_DEFAULT_BYTES,
    ROLL_SIZE_DEFAULT_BYTES,
};
use ferry_wire::{Lsn, VShardId};

/// How flushes reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStyle {
    /// O_DIRECT-style: block-aligned flushes, leftovers (layout A) or padding (layout B).
    Direct,
    /// Exactly the pending bytes, back to back.
    Buffered,
}

/// What layout A leaves after a Direct flush, up to the block boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    Zeros,
    /// The reused write buffer's old bytes (possibly whole old records with valid CRCs).
    Stale,
}

/// A preamble written at the start of every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreambleOptions {
    pub cipher_alg: u8,
    pub key_id: u8,
    /// Epoch of the first segment; each roll adds one (stored little-endian).
    pub epoch_start: u32,
}

/// Writer options. `Default`: layout B, 64 MiB segments, 4096-byte blocks, Direct, stale
/// leftovers, no preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    pub layout: Layout,
    pub roll_size_bytes: u64,
    pub alignment_bytes: u32,
    pub flush: FlushStyle,
    pub leftovers: Leftovers,
    pub preamble: Option<PreambleOptions>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            layout: Layout::B,
            roll_size_bytes: ROLL_SIZE_DEFAULT_BYTES,
            alignment_bytes: ALIGNMENT_DEFAULT_BYTES,
            flush: FlushStyle::Direct,
            leftovers: Leftovers::Stale,
            preamble: None,
        }
    }
}

/// The header fields of a record to append (LSN, length and CRC are the writer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordSpec {
    pub record_type: u32,
    pub tenant_id: u64,
    pub vshard_id: VShardId,
    pub database_id: u64,
    /// Layout B only (ignored in layout A).
    pub apply_key: u64,
    /// Layout B only.
    pub event_source: u8,
    /// Layout B only.
    pub commit_hlc: u64,
}

impl RecordSpec {
    pub fn new(record_type: u32, vshard_id: VShardId) -> Self {
        RecordSpec { record_type, vshard_id, ..RecordSpec::default() }
    }
}

/// Why the writer failed. `Io` blames the filesystem, the others the caller.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("wal write to {path} failed: {cause}; the wal is not usable past this point")]
    Io { path: PathBuf, cause: io::Error },
    #[error("record refused: {0}")]
    Record(#[from] FormatError),
    #[error("wal writer misuse: {0}")]
    Misuse(&'static str),
}

/// An open WAL folder being appended to.
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    opts: WriterOptions,
    file: File,
    segment_path: PathBuf,
    segment_index: u32,
    /// File offset where the next flush starts.
    flushed_bytes: u64,
    /// Bytes appended since the last flush (they start at `flushed_bytes`).
    pending: Vec<u8>,
    /// The reused write buffer (Direct style): layout A stale leftovers come from it.
    scratch: Vec<u8>,
    next_lsn: Lsn,
    segment_records_count: u64,
}

impl WalWriter {
    /// Creates `dir` if needed and a first segment named `first_lsn` (which must not exist).
    pub fn create(dir: &Path, opts: WriterOptions, first_lsn: Lsn) -> Result<Self, WriterError> {
        if opts.alignment_bytes == 0 {
            return Err(WriterError::Misuse("alignment_bytes must be above zero"));
        }
        if opts.roll_size_bytes == 0 {
            return Err(WriterError::Misuse("roll_size_bytes must be above zero"));
        }
        std::fs::create_dir_all(dir).map_err(|source| WriterError::Io { path: dir.to_path_buf(), cause: source })?;
        let (file, segment_path) = create_segment(dir, first_lsn)?;
        let mut writer = WalWriter {
            dir: dir.to_path_buf(),
            opts,
            file,
            segment_path,
            segment_index: 0,
            flushed_bytes: 0,
            pending: Vec::new(),
            scratch: Vec::new(),
            next_lsn: first_lsn,
            segment_records_count: 0,
        };
        writer.start_segment();
        Ok(writer)
    }

    /// The LSN the next append gets.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment being written.
    pub fn segment_path(&self) -> &Path {
        &self.segment_path
    }

    /// Appends one record (buffered until the next flush); returns its LSN. Rolls first when
    /// the record would take a non-empty segment past the roll size.
    pub fn append(&mut self, spec: &RecordSpec, payload: &[u8]) -> Result<Lsn, WriterError> {
        let record_len = (self.opts.layout.header_len_bytes() + payload.len()) as u64;
        let segment_len = self.flushed_bytes + self.pending.len() as u64;
        if self.segment_records_count > 0 && segment_len.saturating_add(record_len) > self.opts.roll_size_bytes {
            self.roll()?;
        }
        let lsn = self.next_lsn;
        let Some(next) = lsn.next() else {
            return Err(WriterError::Misuse("the LSN space is exhausted"));
        };
        let mut header = RecordHeader::new(self.opts.layout, spec.record_type, lsn, spec.vshard_id);
        header.tenant_id = spec.tenant_id;
        header.database_id = spec.database_id;
        if self.opts.layout == Layout::B {
            header.fields = LayoutFields::B {
                apply_key: spec.apply_key,
                event_source: spec.event_source,
                commit_hlc: spec.commit_hlc,
            };
        }
        encode_record(&header, payload, &mut self.pending)?;
        self.next_lsn = next;
        self.segment_records_count += 1;
        Ok(lsn)
    }

    /// Skips LSNs, leaving a gap: only for fault-injection tests of readers.
    pub fn skip_lsns_for_tests(&mut self, count: u64) {
        self.next_lsn = Lsn(self.next_lsn.0.saturating_add(count));
    }

    /// Writes the pending bytes to the segment (Direct: one block-aligned write).
    pub fn flush(&mut self) -> Result<(), WriterError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.pending);
        if self.opts.flush == FlushStyle::Direct {
            let align = u64::from(self.opts.alignment_bytes);
            let end = self.flushed_bytes + buf.len() as u64;
            match self.opts.layout {
                Layout::B => {
                    let span = usize::try_from(padding_span_bytes(end, align))
                        .map_err(|_| WriterError::Misuse("alignment too large"))?;
                    if span > 0 {
                        encode_padding(span, &mut buf)?;
                    }
                }
                Layout::A => {
                    let gap = usize::try_from((align - end % align) % align)
                        .map_err(|_| WriterError::Misuse("alignment too large"))?;
                    let from = buf.len();
                    buf.resize(from + gap, 0);
                    if self.opts.leftovers == Leftovers::Stale {
                        let have = self.scratch.len().min(from + gap);
                        if let (Some(dst), Some(src)) = (buf.get_mut(from..have), self.scratch.get(from..have)) {
                            dst.copy_from_slice(src);
                        }
                    }
                }
            }
            // Reuse the buffer the way an aligned O_DIRECT writer does: new bytes over old.
            if self.scratch.len() < buf.len() {
                self.scratch.resize(buf.len(), 0);
            }
            if let Some(dst) = self.scratch.get_mut(..buf.len()) {
                dst.copy_from_slice(&buf);
            }
        }
        self.file
            .write_all_at(&buf, self.flushed_bytes)
            .map_err(|source| WriterError::Io { path: self.segment_path.clone(), cause: source })?;
        self.flushed_bytes += buf.len() as u64;
        buf.clear();
        self.pending = buf;
        Ok(())
    }

    /// Flushes, then makes the segment durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), WriterError> {
        self.flush()?;
        self.file.sync_data().map_err(|source| WriterError::Io { path: self.segment_path.clone(), cause: source })
    }

    /// Syncs the current segment and starts a new one named after the next LSN.
    pub fn roll(&mut self) -> Result<(), WriterError> {
        self.sync()?;
        let (file, path) = create_segment(&self.dir, self.next_lsn)?;
        self.file = file;
        self.segment_path = path;
        self.segment_index = self.segment_index.wrapping_add(1);
        self.flushed_bytes = 0;
        self.segment_records_count = 0;
        self.start_segment();
        Ok(())
    }

    fn start_segment(&mut self) {
        if let Some(p) = self.opts.preamble {
            let epoch = p.epoch_start.wrapping_add(self.segment_index).to_le_bytes();
            let preamble = Preamble::new(p.cipher_alg, p.key_id, epoch);
            self.pending.extend_from_slice(&preamble.encode());
        }
    }
}

fn create_segment(dir: &Path, first_lsn: Lsn) -> Result<(File, PathBuf), WriterError> {
    let path = dir.join(segment_name(first_lsn));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| WriterError::Io { path: path.clone(), cause: source })?;
    Ok((file, path))
}
