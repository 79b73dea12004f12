//! `ferry wal dump`: lists the records of a WAL folder, for operators and tests.
//!
//! What it does: reads every segment of a folder (`wal-<lsn:020>.seg`, in LSN order; other
//! files are ignored) with the tail cursor, so a dump applies exactly the rules a migration
//! tails with (leftovers skipped, padding skipped, gaps and bit flips reported with the file
//! and byte offset). It writes one line per record (LSN, vShard, tenant, database, type,
//! payload length, CRC status, layout, segment, offset) as text or JSON lines, optionally
//! only one vShard and only from an LSN on, in live or staged mode.
//!
//! What it does not: follow a growing WAL (it reads a snapshot: the last segment is read as
//! the active one, and a torn tail at its end is where the dump stops), decrypt payloads, or
//! print payloads. It assumes NodeDB's default 4096-byte block alignment for leftovers.
//!
//! Invariants: a segment larger than [`SEGMENT_LEN_MAX_BYTES`] is refused before it is read;
//! only records whose CRC checks out are listed, so `crc` is always `ok` on a listed record.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_wire::wal::{
    parse_segment_name, Cursor, CursorConfig, CursorError, Layout, LayoutChoice, LayoutFields, Mode, Record, Step,
    ALIGNMENT_DEFAULT_BYTES, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::{Lsn, VShardId};

/// What to dump (the CLI's `ferry wal dump` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOptions {
    pub dir: PathBuf,
    pub vshard: Option<VShardId>,
    pub from_lsn: Option<Lsn>,
    pub staged: bool,
    pub json: bool,
}

/// One segment as the dump found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub name: String,
    pub layout: Option<Layout>,
    pub key_id: Option<u8>,
    /// Records read from it (before the vShard and LSN filters).
    pub records_count: u64,
    /// Where its records stop.
    pub end_offset_bytes: u64,
    /// The file's size: bytes past `end_offset_bytes` are leftovers, a torn tail, or (in
    /// a WAL written without O_DIRECT, where the gap rule only sees block boundaries)
    /// records the cursor could not reach.
    pub len_bytes: u64,
}

/// What a dump saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DumpSummary {
    pub segments: Vec<SegmentSummary>,
    /// Records listed (after the filters).
    pub records_listed_count: u64,
    /// Records read (before the filters).
    pub records_read_count: u64,
    pub last_lsn: Option<Lsn>,
}

/// Why a dump stopped. `Corruption` blames the WAL bytes, `Io`/`Output` the system, the
/// others the caller's arguments.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot read {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("no wal segments (wal-<lsn>.seg) in {dir}; check --dir")]
    NoSegments { dir: PathBuf },
    #[error("{path} is {len_bytes} bytes, over the {max_bytes}-byte segment limit; this is not a NodeDB wal segment")]
    SegmentTooLarge { path: PathBuf, len_bytes: u64, max_bytes: u64 },
    #[error("{path} is corrupt at byte {offset_bytes}: {what}")]
    Corruption { path: PathBuf, offset_bytes: u64, what: String },
    #[error("{0}")]
    Cursor(CursorError),
    #[error("cannot write the dump: {0}")]
    Output(io::Error),
}

/// Dumps the WAL folder `opts.dir` to `out`.
pub fn dump(opts: &DumpOptions, out: &mut dyn Write) -> Result<DumpSummary, DumpError> {
    let segments = list_segments(&opts.dir)?;
    if segments.is_empty() {
        return Err(DumpError::NoSegments { dir: opts.dir.clone() });
    }
    // Start at the last segment that begins at or before --from-lsn (live mode: the chain
    // is checked from there on).
    let start_index = match opts.from_lsn {
        Some(from) if !opts.staged => segments.iter().rposition(|(lsn, _)| *lsn <= from).unwrap_or(0),
        _ => 0,
    };
    let config = CursorConfig {
        layout: LayoutChoice::Auto,
        alignment_bytes: ALIGNMENT_DEFAULT_BYTES,
        mode: if opts.staged { Mode::Staged } else { Mode::Live },
    };
    let mut cursor = Cursor::new(config, None).map_err(DumpError::Cursor)?;
    let mut summary = DumpSummary::default();
    let last_index = segments.len().saturating_sub(1);
    for (i, (first_lsn, name)) in segments.iter().enumerate().skip(start_index) {
        let path = opts.dir.join(name);
        cursor.open_segment(*first_lsn).map_err(|e| map_cursor(&opts.dir, e))?;
        let bytes = read_segment(&path)?;
        let sealed = i < last_index;
        let mut seg = SegmentSummary {
            name: name.clone(),
            layout: None,
            key_id: None,
            records_count: 0,
            end_offset_bytes: 0,
            len_bytes: bytes.len() as u64,
        };
        let mut waits = 0;
        loop {
            match cursor.poll(&bytes, sealed).map_err(|e| map_cursor(&opts.dir, e))? {
                Step::Record(record) => {
                    seg.records_count += 1;
                    summary.records_read_count += 1;
                    summary.last_lsn = Some(record.header.lsn);
                    if keep(opts, &record) {
                        summary.records_listed_count += 1;
                        write_line(out, opts.json, &record, name).map_err(DumpError::Output)?;
                    }
                }
                // The cursor confirms a suspected gap in the active segment on a second
                // look; a snapshot's second look is the same bytes.
                Step::Wait { .. } if waits == 0 => waits += 1,
                Step::Wait { .. } | Step::EndOfSegment { .. } => break,
            }
        }
        seg.layout = cursor.layout();
        seg.key_id = cursor.preamble().map(|p| p.key_id);
        seg.end_offset_bytes = cursor.offset_bytes();
        summary.segments.push(seg);
        if !sealed {
            break;
        }
    }
    Ok(summary)
}

fn keep(opts: &DumpOptions, record: &Record) -> bool {
    opts.vshard.is_none_or(|v| record.header.vshard_id == v)
        && opts.from_lsn.is_none_or(|from| record.header.lsn >= from)
}

fn map_cursor(dir: &Path, e: CursorError) -> DumpError {
    match e {
        CursorError::Corruption { segment, offset_bytes, what } => {
            DumpError::Corruption { path: dir.join(segment), offset_bytes, what }
        }
        other => DumpError::Cursor(other),
    }
}

/// The segments of `dir`, sorted by first LSN.
fn list_segments(dir: &Path) -> Result<Vec<(Lsn, String)>, DumpError> {
    let io_err = |source| DumpError::Io { path: dir.to_path_buf(), cause: source };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(lsn) = parse_segment_name(&name) {
            if entry.file_type().map_err(io_err)?.is_file() {
                segments.push((lsn, name));
            }
        }
    }
    segments.sort();
    Ok(segments)
}

fn read_segment(path: &Path) -> Result<Vec<u8>, DumpError> {
    let io_err = |source| DumpError::Io { path: path.to_path_buf(), cause: source };
    let len_bytes = std::fs::metadata(path).map_err(io_err)?.len();
    if len_bytes > SEGMENT_LEN_MAX_BYTES {
        return Err(DumpError::SegmentTooLarge {
            path: path.to_path_buf(),
            len_bytes,
            max_bytes: SEGMENT_LEN_MAX_BYTES,
        });
    }
    std::fs::read(path).map_err(io_err)
}

fn write_line(out: &mut dyn Write, json: bool, record: &Record, segment: &str) -> io::Result<()> {
    let h = &record.header;
    if json {
        let mut line = serde_json::json!({
            "lsn": h.lsn.0,
            "vshard": h.vshard_id.0,
            "tenant": h.tenant_id,
            "database": h.database_id,
            "record_type": h.record_type,
            "kind": h.kind(),
            "required": h.is_required(),
            "encrypted": h.is_encrypted(),
            "payload_len": h.payload_len,
            "crc": "ok",
            "crc32c": h.crc32c,
            "layout": h.layout().name(),
            "segment": segment,
            "offset": record.offset_bytes,
        });
        if let (LayoutFields::B { apply_key, event_source, commit_hlc }, Some(map)) = (h.fields, line.as_object_mut()) {
            map.insert("apply_key".into(), apply_key.into());
            map.insert("event_source".into(), event_source.into());
            map.insert("commit_hlc".into(), commit_hlc.into());
        }
        writeln!(out, "{line}")
    } else {
        let mut flags = Vec::new();
        if h.is_required() {
            flags.push("required");
        }
        if h.is_encrypted() {
            flags.push("encrypted");
        }
        writeln!(
            out,
            "lsn={} vshard={} tenant={} database={} type={:#010x} kind={} flags={} \
             payload_len={} crc=ok layout={} segment={} offset={}",
            h.lsn,
            h.vshard_id,
            h.tenant_id,
            h.database_id,
            h.record_type,
            h.kind(),
            if flags.is_empty() { "-".to_owned() } else { flags.join(",") },
            h.payload_len,
            h.layout().name(),
            segment,
            record.offset_bytes,
        )
    }
}
