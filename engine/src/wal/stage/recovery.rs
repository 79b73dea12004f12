//! Opening a staged WAL: reading it back after a restart, keeping the longest valid prefix,
//! cutting a torn tail, and making what is reported durable.
//!
//! What it does not: append (see `append`).
//!
//! Invariants: what `open` reports is fdatasynced and under a synced folder entry before it
//! is reported; a segment file over `SEGMENT_LEN_MAX_BYTES` is refused before it is read.

use std::path::Path;
use std::sync::Arc;

use ferry_wire::wal::{
    parse_segment_name, Cursor, CursorConfig, CursorError, Layout, LayoutChoice, Mode, Preamble, Step,
    ALIGNMENT_DEFAULT_BYTES, PREAMBLE_LEN_BYTES, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::{crc32c_append, Lsn};

use super::{io_err, OpenReport, Segment, StageError, StageOptions, StagedWal};
use crate::storage::{Storage, StorageFile};

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
        // The torn tail (preallocated zeros included) was cut above: the file ends at its records.
        let open_file_len_bytes = segments.last().map_or(0, |s| s.len_bytes);
        let wal = StagedWal {
            storage,
            dir: dir.to_path_buf(),
            options,
            segments,
            open_file,
            open_file_len_bytes,
            durable_lsn,
            failed: false,
        };
        Ok((wal, report))
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
