//! A synchronous follower of a WAL folder: preads segments and feeds the tail cursor.
//!
//! What it does: [`FolderTail::poll_ref`] returns the next record of the folder (header, and
//! the record's bytes exactly as on disk, borrowed from the tail's segment buffer) or `None`
//! when nothing more is written yet; [`FolderTail::poll`] returns the same record owned. It
//! picks the segment to start from (the last one whose name is at or below the start LSN),
//! preads the active segment from the cursor's offset to the end of the file whenever the
//! cursor has walked everything read so far (so a re-read really reads again: a concurrent
//! pread may have seen a later block of a write before an earlier one), seals a segment once
//! a newer segment has a valid first record (re-reading it once more as sealed), and moves on
//! in name order.
//!
//! Each byte of a segment is read from the file once while the tail moves forward: the
//! "newer segment has a valid first record" test preads only that first record (a small
//! prefix of the file) into a small reused buffer, and the segment buffer is reused from one
//! segment to the next. A record costs no allocation through [`FolderTail::poll_ref`].
//!
//! What it does not: sleep, schedule or hold segments. The caller polls at its own pace (a
//! thread or a blocking task, waking on [`super::notice::AppendNotice`]), selects records,
//! and hard-links segments it still needs.
//!
//! Invariants: a segment file larger than [`SEGMENT_LEN_MAX_BYTES`] is refused before it is
//! read; memory held is one segment's bytes (NodeDB rolls at 64 MiB by default) plus the
//! first record of the next segment.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_wire::wal::{
    check_record, first_record, parse_segment_name, Cursor, CursorConfig, CursorError, FormatError, Layout, Preamble,
    Record, RecordHeader, Step, PREAMBLE_LEN_BYTES, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::Lsn;

/// Bytes of a newer segment read first to find its first record; a larger first record is
/// read by the length its header gives.
pub const FIRST_RECORD_PROBE_BYTES: usize = 64 << 10;

/// One record as the tail found it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord {
    pub header: RecordHeader,
    /// The segment file's name.
    pub segment: String,
    pub offset_bytes: u64,
    /// Header and payload, byte for byte as in the segment.
    pub bytes: Vec<u8>,
}

impl TailRecord {
    pub fn payload(&self) -> &[u8] {
        self.bytes.get(self.header.layout().header_len_bytes()..).unwrap_or(&[])
    }
}

/// One record as the tail found it, borrowed from the tail's buffer until the next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailRecordRef<'a> {
    pub header: RecordHeader,
    /// The segment file's name.
    pub segment: &'a str,
    pub offset_bytes: u64,
    /// Header and payload, byte for byte as in the segment.
    pub bytes: &'a [u8],
    /// The preamble of the segment it came from, if it has one.
    pub preamble: Option<Preamble>,
}

impl TailRecordRef<'_> {
    pub fn payload(&self) -> &[u8] {
        self.bytes.get(self.header.layout().header_len_bytes()..).unwrap_or(&[])
    }

    /// The same record, owned.
    pub fn to_record(&self) -> TailRecord {
        TailRecord {
            header: self.header,
            segment: self.segment.to_owned(),
            offset_bytes: self.offset_bytes,
            bytes: self.bytes.to_vec(),
        }
    }
}

/// Why the tail stopped. `Cursor` carries the WAL's corruption (or the caller's misuse),
/// `Io` and `SegmentTooLarge` the filesystem's contents.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cannot read {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{path} is {len_bytes} bytes, over the {max_bytes}-byte segment limit")]
    SegmentTooLarge { path: PathBuf, len_bytes: u64, max_bytes: u64 },
    #[error(transparent)]
    Cursor(#[from] CursorError),
}

#[derive(Debug)]
struct OpenSegment {
    first_lsn: Lsn,
    name: String,
    path: PathBuf,
    file: File,
    sealed: bool,
    /// Whether the next poll must read the file again (first poll, after a wait, after
    /// sealing). Mid-stream polls reuse the bytes, so a segment is read about once.
    reread: bool,
}

/// Follows one WAL folder. See the module docs.
#[derive(Debug)]
pub struct FolderTail {
    dir: PathBuf,
    start_lsn: Option<Lsn>,
    cursor: Cursor,
    current: Option<OpenSegment>,
    /// The open segment's bytes from offset 0 in `bytes[..filled_bytes]`; reused across
    /// segments. Bytes past `filled_bytes` are left over from an earlier read (never looked at).
    bytes: Vec<u8>,
    filled_bytes: usize,
    /// The first record of a newer segment, for the sealing test; reused.
    probe: Vec<u8>,
}

impl FolderTail {
    /// Follows `dir` from `start_lsn` (`None`: from the first record of the first segment).
    pub fn new(dir: &Path, config: CursorConfig, start_lsn: Option<Lsn>) -> Result<Self, TailError> {
        Ok(FolderTail {
            dir: dir.to_path_buf(),
            start_lsn,
            cursor: Cursor::new(config, start_lsn)?,
            current: None,
            bytes: Vec::new(),
            filled_bytes: 0,
            probe: Vec::new(),
        })
    }

    /// The folder followed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cursor (next LSN, layout and preamble of the open segment).
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The open segment's file name.
    pub fn segment_name(&self) -> Option<&str> {
        self.current.as_ref().map(|s| s.name.as_str())
    }

    /// The next record, owned, or `None` when nothing more is written yet.
    pub fn poll(&mut self) -> Result<Option<TailRecord>, TailError> {
        Ok(self.poll_ref()?.map(|r| r.to_record()))
    }

    /// The next record, borrowed from the tail's buffer, or `None` when nothing more is
    /// written yet.
    pub fn poll_ref(&mut self) -> Result<Option<TailRecordRef<'_>>, TailError> {
        let Some(record) = self.next_record()? else { return Ok(None) };
        let Some(seg) = self.current.as_ref() else { return Ok(None) };
        Ok(Some(TailRecordRef {
            header: record.header,
            segment: seg.name.as_str(),
            offset_bytes: record.offset_bytes as u64,
            bytes: self.bytes.get(..self.filled_bytes).and_then(|b| b.get(record.record_range())).unwrap_or(&[]),
            preamble: self.cursor.preamble(),
        }))
    }

    /// Walks to the next record; its ranges lie in `self.bytes`.
    fn next_record(&mut self) -> Result<Option<Record>, TailError> {
        loop {
            if self.current.is_none() {
                let segments = list_segments(&self.dir)?;
                let pick = match self.start_lsn {
                    Some(start) => segments.iter().rposition(|(lsn, _)| *lsn <= start).unwrap_or(0),
                    None => 0,
                };
                let Some((lsn, name)) = segments.get(pick).cloned() else { return Ok(None) };
                self.open(lsn, name)?;
            }
            let Some(seg) = self.current.as_mut() else { return Ok(None) };
            if seg.reread {
                self.filled_bytes = refresh(seg, &mut self.bytes, self.filled_bytes, self.cursor.offset_bytes())?;
                seg.reread = false;
            }
            let filled = self.bytes.get(..self.filled_bytes).unwrap_or(&[]);
            match self.cursor.poll(filled, seg.sealed)? {
                Step::Record(record) => return Ok(Some(record)),
                Step::Wait { .. } => {
                    seg.reread = true;
                    let current_lsn = seg.first_lsn;
                    let newer = list_segments(&self.dir)?.into_iter().find(|(l, _)| *l > current_lsn);
                    let Some((_, newer_name)) = newer else { return Ok(None) };
                    if !has_first_record(&self.dir.join(&newer_name), &mut self.probe)? {
                        return Ok(None);
                    }
                    // Sealed: the next pass re-reads it once more, as sealed.
                    seg.sealed = true;
                }
                Step::EndOfSegment { .. } => {
                    let current_lsn = seg.first_lsn;
                    let newer = list_segments(&self.dir)?.into_iter().find(|(l, _)| *l > current_lsn);
                    let Some((lsn, name)) = newer else {
                        return Err(TailError::Cursor(CursorError::Misuse(
                            "a sealed segment has no newer segment (was it removed?)",
                        )));
                    };
                    self.open(lsn, name)?;
                }
            }
        }
    }

    fn open(&mut self, first_lsn: Lsn, name: String) -> Result<(), TailError> {
        let path = self.dir.join(&name);
        let file = File::open(&path).map_err(|source| TailError::Io { path: path.clone(), cause: source })?;
        self.cursor.open_segment(first_lsn)?;
        self.filled_bytes = 0;
        self.current = Some(OpenSegment { first_lsn, name, path, file, sealed: false, reread: true });
        Ok(())
    }
}

/// Re-reads the segment from `from_bytes` (the cursor's offset) to the end of the file into
/// `bytes` (the segment from offset 0, valid up to `filled_bytes`); returns the new valid
/// length. `bytes` only grows (zero-filled past its old length): its length is a high-water
/// mark over the segments read, at most [`SEGMENT_LEN_MAX_BYTES`].
fn refresh(seg: &OpenSegment, bytes: &mut Vec<u8>, filled_bytes: usize, from_bytes: u64) -> Result<usize, TailError> {
    let io_err = |source| TailError::Io { path: seg.path.clone(), cause: source };
    let len_bytes = seg.file.metadata().map_err(io_err)?.len();
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(TailError::SegmentTooLarge { path: seg.path.clone(), len_bytes, max_bytes: SEGMENT_LEN_MAX_BYTES });
    }
    // Both are at most SEGMENT_LEN_MAX_BYTES (1 GiB): they fit a usize.
    let len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    let from = usize::try_from(from_bytes).unwrap_or(usize::MAX).min(filled_bytes);
    if len <= from {
        return Ok(from);
    }
    if bytes.len() < len {
        bytes.resize(len, 0);
    }
    read_into(&seg.file, bytes.get_mut(..len).unwrap_or(&mut []), from).map_err(io_err)
}

/// Preads `file[from..buf.len()]` into `buf[from..]`; returns how far the file really went
/// (it may be shorter than its size said a moment ago).
fn read_into(file: &File, buf: &mut [u8], from: usize) -> io::Result<usize> {
    let mut done = from;
    while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
        let n = file.read_at(rest, done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// [`read_into`] for a buffer that grows to `len` first and is cut to what was read.
fn read_into_vec(file: &File, bytes: &mut Vec<u8>, from: usize, len: usize) -> io::Result<usize> {
    bytes.resize(len, 0);
    let done = read_into(file, bytes, from)?;
    bytes.truncate(done);
    Ok(done)
}

/// Whether the segment at `path` starts with a valid record. Reads only that record: a
/// prefix first, then as many bytes as its header says when the prefix is too short.
fn has_first_record(path: &Path, probe: &mut Vec<u8>) -> Result<bool, TailError> {
    let io_err = |source| TailError::Io { path: path.to_path_buf(), cause: source };
    let file = match File::open(path) {
        Ok(file) => file,
        // Removed between the listing and the open: not a newer segment (yet).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(e)),
    };
    let len_bytes = file.metadata().map_err(io_err)?.len();
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(TailError::SegmentTooLarge {
            path: path.to_path_buf(),
            len_bytes,
            max_bytes: SEGMENT_LEN_MAX_BYTES,
        });
    }
    // At most SEGMENT_LEN_MAX_BYTES (1 GiB): fits a usize.
    let len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    probe.clear();
    read_into_vec(&file, probe, 0, len.min(FIRST_RECORD_PROBE_BYTES)).map_err(io_err)?;
    if first_record(probe).is_some() {
        return Ok(true);
    }
    // The layouts' header lengths differ: read what the longer reading says, as far as the
    // file goes, and let the CRC decide.
    match first_record_len_bytes(probe).map(|need| need.min(len)) {
        Some(need) if need > probe.len() => {
            let have = probe.len();
            read_into_vec(&file, probe, have, need).map_err(io_err)?;
            Ok(first_record(probe).is_some())
        }
        _ => Ok(false),
    }
}

/// How many bytes from the start of a segment its first record needs, when `prefix` holds a
/// header (under either layout) whose payload runs past the prefix. The header's payload
/// length is checked against the format's limit by the decoder.
fn first_record_len_bytes(prefix: &[u8]) -> Option<usize> {
    let start = if Preamble::is_present(prefix) { PREAMBLE_LEN_BYTES } else { 0 };
    let rest = prefix.get(start..)?;
    Layout::ALL
        .into_iter()
        .filter_map(|layout| match check_record(layout, rest) {
            Err(FormatError::Truncated { need_bytes, .. }) => start.checked_add(need_bytes),
            _ => None,
        })
        .max()
}

pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Lsn, String)>, TailError> {
    let io_err = |source| TailError::Io { path: dir.to_path_buf(), cause: source };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if let Some(lsn) = parse_segment_name(&name) {
            if entry.file_type().map_err(io_err)?.is_file() {
                segments.push((lsn, name));
            }
        }
    }
    segments.sort();
    Ok(segments)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use ferry_wire::wal::encode_record;
    use ferry_wire::VShardId;

    fn record(layout: Layout, lsn: u64, payload_len: usize) -> Vec<u8> {
        let header = RecordHeader::new(layout, 1, Lsn(lsn), VShardId(7));
        let mut out = Vec::new();
        encode_record(&header, &vec![0x5a; payload_len], &mut out).unwrap();
        out
    }

    /// The segment buffer keeps its length from a longer segment read before: a refresh
    /// reads the new file from where the cursor is and reports how far it is valid, so the
    /// stale bytes past it are never handed to the cursor.
    #[test]
    fn a_reused_segment_buffer_reads_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal-00000000000000000001.seg");
        std::fs::write(&path, b"0123456789").unwrap();
        let seg = OpenSegment {
            first_lsn: Lsn(1),
            name: "wal-00000000000000000001.seg".into(),
            path: path.clone(),
            file: File::open(&path).unwrap(),
            sealed: false,
            reread: true,
        };
        let mut bytes = vec![0xee; 64];
        assert_eq!(refresh(&seg, &mut bytes, 0, 0).unwrap(), 10);
        assert_eq!(bytes.len(), 64, "the buffer is not cut or zeroed again");
        assert_eq!(&bytes[..10], b"0123456789");
        // The file grows: only what follows the cursor's offset is read again.
        std::fs::write(&path, b"0123456789abcdef").unwrap();
        bytes[..4].copy_from_slice(b"XXXX");
        assert_eq!(refresh(&seg, &mut bytes, 10, 4).unwrap(), 16);
        assert_eq!(&bytes[..16], b"XXXX456789abcdef");
        // A file longer than the buffer grows it; a file shorter than the cursor's offset
        // leaves the cursor's bytes as they were (the cursor reports the truncation).
        std::fs::write(&path, vec![b'z'; 100]).unwrap();
        assert_eq!(refresh(&seg, &mut bytes, 16, 16).unwrap(), 100);
        assert_eq!(bytes.len(), 100);
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(refresh(&seg, &mut bytes, 100, 50).unwrap(), 50);
    }

    /// A first record larger than the probe prefix is read by its header's length; a torn
    /// one, garbage or an empty file is not a first record.
    #[test]
    fn first_record_is_found_past_the_probe_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal-00000000000000000001.seg");
        let mut probe = Vec::new();
        for layout in Layout::ALL {
            for preamble in [false, true] {
                let mut seg = if preamble { Preamble::new(1, 1, [0; 4]).encode().to_vec() } else { Vec::new() };
                seg.extend(record(layout, 1, FIRST_RECORD_PROBE_BYTES * 2 + 3));
                std::fs::write(&path, &seg).unwrap();
                assert!(has_first_record(&path, &mut probe).unwrap(), "{layout:?} preamble {preamble}");
                assert!(probe.len() > FIRST_RECORD_PROBE_BYTES);
                std::fs::write(&path, &seg[..seg.len() - 1]).unwrap();
                assert!(!has_first_record(&path, &mut probe).unwrap(), "torn {layout:?} preamble {preamble}");
                let mut bad = seg.clone();
                *bad.last_mut().unwrap() ^= 1;
                std::fs::write(&path, &bad).unwrap();
                assert!(!has_first_record(&path, &mut probe).unwrap(), "bad crc {layout:?} preamble {preamble}");
            }
        }
        // A small first record followed by many more: only the prefix is read.
        let mut seg = Vec::new();
        for lsn in 1..2000 {
            seg.extend(record(Layout::B, lsn, 100));
        }
        std::fs::write(&path, &seg).unwrap();
        assert!(has_first_record(&path, &mut probe).unwrap());
        assert_eq!(probe.len(), FIRST_RECORD_PROBE_BYTES);
        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(!has_first_record(&path, &mut probe).unwrap());
        std::fs::write(&path, []).unwrap();
        assert!(!has_first_record(&path, &mut probe).unwrap());
        assert!(!has_first_record(&dir.path().join("missing.seg"), &mut probe).unwrap());
    }
}
