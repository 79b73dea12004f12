//! A synchronous follower of a WAL folder: preads segments and feeds the tail cursor.
//!
//! What it does: [`FolderTail::poll`] returns the next record of the folder (header, and the
//! record's bytes exactly as on disk) or `None` when nothing more is written yet. It picks
//! the segment to start from (the last one whose name is at or below the start LSN), preads
//! the active segment from the cursor's offset to the end of the file on every poll (so a
//! re-read really reads again: a concurrent pread may have seen a later block of a write
//! before an earlier one), seals a segment once a newer segment has a valid first record
//! (re-reading it once more as sealed), and moves on in name order.
//!
//! What it does not: sleep, schedule or hold segments. The caller polls at its own pace (a
//! thread or a blocking task), selects records, and hard-links segments it still needs;
//! none of that is here yet.
//!
//! Invariants: a segment file larger than [`SEGMENT_LEN_MAX_BYTES`] is refused before it is
//! read; memory held is one segment's bytes (NodeDB rolls at 64 MiB by default).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_wire::wal::{
    first_record, parse_segment_name, Cursor, CursorConfig, CursorError, RecordHeader, Step, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::Lsn;

/// One record as the tail found it.
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

/// Why the tail stopped. `Cursor` carries the WAL's corruption (or the caller's misuse),
/// `Io` and `SegmentTooLarge` the filesystem's contents.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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
    bytes: Vec<u8>,
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
}

impl FolderTail {
    /// Follows `dir` from `start_lsn` (`None`: from the first record of the first segment).
    pub fn new(dir: &Path, config: CursorConfig, start_lsn: Option<Lsn>) -> Result<Self, TailError> {
        Ok(FolderTail { dir: dir.to_path_buf(), start_lsn, cursor: Cursor::new(config, start_lsn)?, current: None })
    }

    /// The cursor (next LSN, layout and preamble of the open segment).
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The open segment's file name.
    pub fn segment_name(&self) -> Option<&str> {
        self.current.as_ref().map(|s| s.name.as_str())
    }

    /// The next record, or `None` when nothing more is written yet.
    pub fn poll(&mut self) -> Result<Option<TailRecord>, TailError> {
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
                refresh(seg, self.cursor.offset_bytes())?;
                seg.reread = false;
            }
            match self.cursor.poll(&seg.bytes, seg.sealed)? {
                Step::Record(record) => {
                    let bytes = seg.bytes.get(record.record_range()).unwrap_or(&[]).to_vec();
                    return Ok(Some(TailRecord {
                        header: record.header,
                        segment: seg.name.clone(),
                        offset_bytes: record.offset_bytes as u64,
                        bytes,
                    }));
                }
                Step::Wait { .. } => {
                    seg.reread = true;
                    let current_lsn = seg.first_lsn;
                    let newer = list_segments(&self.dir)?.into_iter().find(|(l, _)| *l > current_lsn);
                    let Some((_, newer_name)) = newer else { return Ok(None) };
                    let newer_bytes = read_whole(&self.dir.join(&newer_name))?;
                    if first_record(&newer_bytes).is_none() {
                        return Ok(None);
                    }
                    // Sealed: the next poll re-reads it once more, as sealed.
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
        let file = File::open(&path).map_err(|source| TailError::Io { path: path.clone(), source })?;
        self.cursor.open_segment(first_lsn)?;
        self.current =
            Some(OpenSegment { first_lsn, name, path, file, bytes: Vec::new(), sealed: false, reread: true });
        Ok(())
    }
}

/// Re-reads the segment from `from_bytes` (the cursor's offset) to the end of the file.
fn refresh(seg: &mut OpenSegment, from_bytes: u64) -> Result<(), TailError> {
    let io_err = |source| TailError::Io { path: seg.path.clone(), source };
    let len_bytes = seg.file.metadata().map_err(io_err)?.len();
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(TailError::SegmentTooLarge { path: seg.path.clone(), len_bytes, max_bytes: SEGMENT_LEN_MAX_BYTES });
    }
    // Both are at most SEGMENT_LEN_MAX_BYTES (1 GiB): they fit a usize.
    let len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    let from = usize::try_from(from_bytes).unwrap_or(usize::MAX).min(seg.bytes.len());
    seg.bytes.truncate(from);
    if len <= from {
        return Ok(());
    }
    seg.bytes.resize(len, 0);
    let mut done = from;
    while done < len {
        let buf = seg.bytes.get_mut(done..len).unwrap_or(&mut []);
        let n = seg.file.read_at(buf, done as u64).map_err(io_err)?;
        if n == 0 {
            // The file is shorter than its size said a moment ago.
            break;
        }
        done += n;
    }
    seg.bytes.truncate(done);
    Ok(())
}

pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Lsn, String)>, TailError> {
    let io_err = |source| TailError::Io { path: dir.to_path_buf(), source };
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

fn read_whole(path: &Path) -> Result<Vec<u8>, TailError> {
    let io_err = |source| TailError::Io { path: path.to_path_buf(), source };
    let len_bytes = std::fs::metadata(path).map_err(io_err)?.len();
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(TailError::SegmentTooLarge {
            path: path.to_path_buf(),
            len_bytes,
            max_bytes: SEGMENT_LEN_MAX_BYTES,
        });
    }
    std::fs::read(path).map_err(io_err)
}
