//! A small reader of NodeDB WAL folders (layouts A and B), written apart from ferry's transfer
//! code so the verifier does not check ferry with ferry.
//!
//! What it does: [`read_wal_folder`] lists `wal-<20 digits>.seg` files in LSN order, reads each
//! whole, skips a 16-byte "WALP" preamble (version 1) at offset 0, and parses records of the
//! two header layouts of DESIGN section 6 (magic 0x53594E57, version 1, `payload_len` at most
//! 64 MiB, CRC32C over the header bytes before the crc field, then the payload):
//!
//! ```text
//!  layout A, 54 bytes: common fields 0..42 | reserved [8] 42..50 | crc32c 50..54
//!  layout B, 63 bytes: common fields 0..42 | apply_key u64 42..50 | event_source u8 50
//!                      | commit_hlc u64 51..59 | crc32c 59..63
//! ```
//! A segment's layout is told from its first record (after the preamble): the layout whose CRC
//! checks out (A when neither does, and the damage is reported as A's). Layout B padding
//! records (record_type 0, LSN 0, DESIGN section 6) are skipped by their length and counted;
//! a staged WAL must hold none, so there one is reported. Each other record is handed to a
//! visitor with its raw bytes. Three folder kinds:
//! - [`FolderKind::Staged`], ferry's staged WAL (DESIGN section 3): records back to back in the
//!   source's layout, LSNs strictly increasing but not dense, the first segment named after
//!   its first LSN and segment k > 0 after the last LSN of segment k - 1 plus one;
//! - [`FolderKind::Dense`], a WAL written with buffered flushes (the target node WAL the
//!   reference writer writes): records back to back, dense LSNs, each segment named after its
//!   first record;
//! - [`FolderKind::Aligned`], a stopped WAL written with O_DIRECT-style flushes (the source
//!   WAL), dense LSNs. Layout A leaves leftovers: where the bytes are not the expected record,
//!   the next block boundary is tried, and when that is not it either the segment's data ends.
//!   Layout B frames every flush to the block boundary with padding, so its records and
//!   padding lie back to back; zeros where a record would start end the data.
//!
//! Broken rules are reported, not fatal: a record that does not parse ends its segment (the
//! rest is reported unreadable and the next segment is read); an LSN or name out of order is
//! reported and the record is still handed over, so a verifier can count duplicates.
//!
//! What it does not: follow a live WAL (a torn tail is reported, never waited for), decryption,
//! or ferry's tailing machinery: nothing from `ferry_wire::wal` or the engine's tail is used,
//! only the CRC32C function; the layouts' offsets are written out here again, from the design.
//!
//! Invariants: no bytes make it panic; `payload_len` is checked against the 64 MiB limit and
//! the bytes present before it is used; a segment over [`SEGMENT_LEN_MAX_BYTES`] is refused
//! before it is read; at most [`PROBLEMS_LISTED_MAX`] problems are kept, the rest counted.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ferry_wire::{Lsn, VShardId};

/// Record magic, "SYNW" as a little-endian u32.
const RECORD_MAGIC: u32 = 0x5359_4E57;
const RECORD_VERSION: u16 = 1;
/// Layout A: 54-byte header, CRC at 50..54.
pub const HEADER_LEN_BYTES: usize = 54;
/// Layout B: 63-byte header, CRC at 59..63.
pub const HEADER_B_LEN_BYTES: usize = 63;
/// Where `payload_len` sits in both layouts.
const PAYLOAD_LEN_AT: usize = 30;
const PAYLOAD_LEN_MAX_BYTES: u32 = 64 << 20;
const PREAMBLE_LEN_BYTES: usize = 16;
/// Largest segment read whole.
pub const SEGMENT_LEN_MAX_BYTES: u64 = 1 << 30;
/// Problems kept word for word.
pub const PROBLEMS_LISTED_MAX: usize = 20;

/// This reader's own copy of NodeDB's two record header layouts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordLayout {
    /// nodedb-wal 0.1 to 0.4: 54 bytes.
    A,
    /// nodedb-wal 0.6: 63 bytes.
    B,
}

impl RecordLayout {
    pub const fn header_len_bytes(self) -> usize {
        match self {
            RecordLayout::A => HEADER_LEN_BYTES,
            RecordLayout::B => HEADER_B_LEN_BYTES,
        }
    }

    /// The crc32c field comes last: the CRC covers every header byte before it.
    const fn crc_at(self) -> usize {
        self.header_len_bytes() - 4
    }
}

/// Which rules a folder is read with. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    Staged,
    Dense,
    Aligned { alignment_bytes: u32 },
}

/// One record, borrowed from its segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRecordRef<'a> {
    /// The segment's file name.
    pub segment: &'a str,
    pub offset_bytes: u64,
    pub layout: RecordLayout,
    pub lsn: Lsn,
    pub record_type: u32,
    pub vshard: VShardId,
    pub payload: &'a [u8],
    /// The whole record: header and payload, as stored.
    pub bytes: &'a [u8],
}

/// What a folder held, and what was wrong with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderReport {
    pub segments_count: u64,
    /// Segments whose first record is in layout B (the others are read as layout A).
    pub layout_b_segments_count: u64,
    /// Records handed to the visitor (padding is not).
    pub records_count: u64,
    /// Layout B padding records skipped.
    pub padding_count: u64,
    pub last_lsn: Option<Lsn>,
    pub problems: Vec<String>,
    pub problems_count: u64,
}

impl FolderReport {
    fn problem(&mut self, line: String) {
        self.problems_count += 1;
        if self.problems.len() < PROBLEMS_LISTED_MAX {
            self.problems.push(line);
        }
    }
}

/// Why a folder could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum WalReadError {
    #[error("no WAL folder at {path}")]
    Missing { path: PathBuf },
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

/// Why bytes are not a record of the layout asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordFault {
    #[error("torn record: {need_bytes} bytes needed, {have_bytes} there")]
    Truncated { need_bytes: u64, have_bytes: u64 },
    #[error("bad magic {found:#010x}")]
    Magic { found: u32 },
    #[error("record version {found}, expected 1")]
    Version { found: u16 },
    #[error("payload_len {len_bytes} over the 64 MiB limit")]
    PayloadTooLong { len_bytes: u32 },
    #[error("CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
}

/// A record that parsed: its header fields the reader uses, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedRecord {
    pub lsn: Lsn,
    pub record_type: u32,
    pub vshard: VShardId,
    /// Header and payload, in bytes.
    pub len_bytes: usize,
}

impl ParsedRecord {
    /// A layout B padding record: record_type 0 (kind Noop, no flags) and LSN 0.
    pub fn is_padding(&self) -> bool {
        self.record_type == 0 && self.lsn == Lsn(0)
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// Parses the layout-A record at the start of `bytes`: (lsn, record_type, vshard, record length).
pub fn parse_record(bytes: &[u8]) -> Result<(Lsn, u32, VShardId, usize), RecordFault> {
    parse_record_as(RecordLayout::A, bytes).map(|r| (r.lsn, r.record_type, r.vshard, r.len_bytes))
}

/// Parses the `layout` record at the start of `bytes`.
pub fn parse_record_as(layout: RecordLayout, bytes: &[u8]) -> Result<ParsedRecord, RecordFault> {
    let have_bytes = bytes.len() as u64;
    let header_len = layout.header_len_bytes();
    if bytes.len() < header_len {
        return Err(RecordFault::Truncated { need_bytes: header_len as u64, have_bytes });
    }
    let magic = le_u32(bytes, 0);
    if magic != RECORD_MAGIC {
        return Err(RecordFault::Magic { found: magic });
    }
    let version = bytes.get(4..6).and_then(|b| b.try_into().ok()).map_or(0, u16::from_le_bytes);
    if version != RECORD_VERSION {
        return Err(RecordFault::Version { found: version });
    }
    let payload_len = le_u32(bytes, PAYLOAD_LEN_AT);
    if payload_len > PAYLOAD_LEN_MAX_BYTES {
        return Err(RecordFault::PayloadTooLong { len_bytes: payload_len });
    }
    // At most 63 + 64 MiB: fits every usize ferry builds for.
    let len = header_len + usize::try_from(payload_len).unwrap_or(usize::MAX - header_len);
    let (Some(head), Some(payload)) = (bytes.get(..layout.crc_at()), bytes.get(header_len..len)) else {
        return Err(RecordFault::Truncated { need_bytes: len as u64, have_bytes });
    };
    let stored = le_u32(bytes, layout.crc_at());
    let computed = ferry_wire::crc32c_append(ferry_wire::crc32c(head), payload);
    if stored != computed {
        return Err(RecordFault::Crc { stored, computed });
    }
    Ok(ParsedRecord {
        lsn: Lsn(le_u64(bytes, 10)),
        record_type: le_u32(bytes, 6),
        vshard: VShardId(le_u32(bytes, 26)),
        len_bytes: len,
    })
}

/// The layout of the record at the start of `bytes`: the one whose CRC checks out (`None`: no
/// record of either layout starts there).
pub fn detect_layout(bytes: &[u8]) -> Option<RecordLayout> {
    [RecordLayout::A, RecordLayout::B].into_iter().find(|layout| parse_record_as(*layout, bytes).is_ok())
}

/// The first LSN in a segment name: `wal-`, exactly 20 ASCII digits, `.seg`.
pub fn segment_first_lsn(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// Reads every segment of `dir` under the rules of `kind`, handing each record to `visit`.
pub fn read_wal_folder(
    dir: &Path,
    kind: FolderKind,
    mut visit: impl FnMut(&WalRecordRef<'_>),
) -> Result<FolderReport, WalReadError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| WalReadError::Io { path, cause: source }
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(WalReadError::Missing { path: dir.into() }),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let name = entry.map_err(io_err(dir))?.file_name().to_string_lossy().into_owned();
        if let Some(lsn) = segment_first_lsn(&name) {
            segments.push((lsn, name));
        }
    }
    segments.sort();
    let mut report = FolderReport::default();
    let mut walk = Walk { kind, last: None };
    for (name_lsn, name) in &segments {
        let path = dir.join(name);
        let len_bytes = fs::metadata(&path).map_err(io_err(&path))?.len();
        if len_bytes > SEGMENT_LEN_MAX_BYTES {
            report.problem(format!("{name}: {len_bytes} bytes, over the {SEGMENT_LEN_MAX_BYTES}-byte limit: not read"));
            continue;
        }
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        report.segments_count += 1;
        walk.segment(*name_lsn, name, &bytes, &mut report, &mut visit);
    }
    report.last_lsn = walk.last;
    Ok(report)
}

/// The folder walk's state across segments.
struct Walk {
    kind: FolderKind,
    /// The last LSN handed over.
    last: Option<Lsn>,
}

impl Walk {
    fn segment(
        &mut self,
        name_lsn: Lsn,
        name: &str,
        bytes: &[u8],
        report: &mut FolderReport,
        visit: &mut impl FnMut(&WalRecordRef<'_>),
    ) {
        let Some((mut at, layout)) = self.segment_start(name_lsn, name, bytes, report) else { return };
        let mut first_in_segment = true;
        while at < bytes.len() {
            let rest = bytes.get(at..).unwrap_or_default();
            let parsed = parse_record_as(layout, rest);
            if let (FolderKind::Aligned { alignment_bytes }, RecordLayout::A) = (self.kind, layout) {
                let expected =
                    if first_in_segment { name_lsn } else { self.last.and_then(Lsn::next).unwrap_or(name_lsn) };
                match parsed {
                    Ok(record) if record.lsn == expected => {}
                    other => {
                        let align = usize::try_from(alignment_bytes.max(1)).unwrap_or(4096);
                        if let Ok(record) = other {
                            if record.lsn > expected && at % align == 0 {
                                report.problem(format!(
                                    "{name} offset {at}: LSN {} where {expected} was expected: a gap",
                                    record.lsn
                                ));
                            }
                        }
                        // Leftovers: look at the next block boundary; at a boundary, the data ends.
                        if at % align == 0 {
                            break;
                        }
                        at = at.div_ceil(align).saturating_mul(align);
                        continue;
                    }
                }
            }
            let record = match parsed {
                Ok(record) => record,
                // Layout B frames every flush: zeros where a record would start are the
                // unwritten end of a stopped O_DIRECT WAL.
                Err(_)
                    if layout == RecordLayout::B
                        && matches!(self.kind, FolderKind::Aligned { .. })
                        && rest.iter().all(|b| *b == 0) =>
                {
                    break
                }
                Err(fault) => {
                    let left = bytes.len() - at;
                    report.problem(format!("{name} offset {at}: {fault}; the last {left} bytes are unreadable"));
                    break;
                }
            };
            if layout == RecordLayout::B && record.is_padding() {
                report.padding_count += 1;
                if self.kind == FolderKind::Staged {
                    report.problem(format!("{name} offset {at}: a padding record in a staged WAL"));
                }
                at += record.len_bytes;
                continue;
            }
            self.check_order(first_in_segment, name_lsn, record.lsn, name, at, report);
            let raw = bytes.get(at..at + record.len_bytes).unwrap_or_default();
            visit(&WalRecordRef {
                segment: name,
                offset_bytes: at as u64,
                layout,
                lsn: record.lsn,
                record_type: record.record_type,
                vshard: record.vshard,
                payload: raw.get(layout.header_len_bytes()..).unwrap_or_default(),
                bytes: raw,
            });
            report.records_count += 1;
            self.last = Some(self.last.map_or(record.lsn, |last| last.max(record.lsn)));
            first_in_segment = false;
            at += record.len_bytes;
        }
    }

    /// Where a segment's records start (after its preamble, if any) and their layout; `None`
    /// (with a problem reported) when the preamble is not one this reader knows. Also checks a
    /// dense kind's segment name against the last LSN.
    fn segment_start(
        &self,
        name_lsn: Lsn,
        name: &str,
        bytes: &[u8],
        report: &mut FolderReport,
    ) -> Option<(usize, RecordLayout)> {
        let mut at = 0usize;
        if bytes.starts_with(b"WALP") {
            let version = bytes.get(4..6).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes);
            if version != Some(1) {
                report.problem(format!("{name}: bad segment preamble (version {version:?}): segment not read"));
                return None;
            }
            at = PREAMBLE_LEN_BYTES;
        }
        let layout = detect_layout(bytes.get(at..).unwrap_or_default()).unwrap_or(RecordLayout::A);
        if layout == RecordLayout::B {
            report.layout_b_segments_count += 1;
        }
        // Where a dense kind expects this segment to start: right after the last LSN.
        let expected_name = self.last.and_then(Lsn::next);
        if let (Some(expected), FolderKind::Dense | FolderKind::Aligned { .. }) = (expected_name, self.kind) {
            if name_lsn != expected {
                report.problem(format!("{name}: named {name_lsn}, but the LSN after the last one is {expected}"));
            }
        }
        Some((at, layout))
    }

    fn check_order(
        &self,
        first_in_segment: bool,
        name_lsn: Lsn,
        lsn: Lsn,
        name: &str,
        at: usize,
        report: &mut FolderReport,
    ) {
        if lsn == Lsn(0) {
            report.problem(format!("{name} offset {at}: LSN 0 is never a record's"));
        }
        // Aligned layout-A records got here only at the LSN expected; layout B ones are checked
        // like a buffered folder's.
        let dense = self.kind != FolderKind::Staged;
        match (dense, self.last) {
            (false, Some(last)) if lsn <= last => {
                report.problem(format!("{name} offset {at}: LSN {lsn} is not above the previous {last}"));
            }
            (true, Some(last)) if Some(lsn) != last.next() => {
                report.problem(format!("{name} offset {at}: LSN {lsn} follows {last}: LSNs must be dense"));
            }
            _ => {}
        }
        if !first_in_segment {
            return;
        }
        match (dense, self.last) {
            // Staged segment k > 0 is named after the last LSN of segment k - 1 plus one.
            (false, Some(last)) if Some(name_lsn) != last.next() => report.problem(format!(
                "{name}: a staged segment after LSN {last} must be named {}",
                last.0.saturating_add(1)
            )),
            (false, None) | (true, _) if name_lsn != lsn => {
                report.problem(format!("{name}: its first record has LSN {lsn}, not the name's {name_lsn}"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::walwrite::{FlushStyle, Leftovers, RecordSpec, WalWriter, WriterOptions};
    use ferry_wire::wal::{encode_padding, encode_record, Layout, LayoutFields, Preamble, RecordHeader};

    /// A layout-A record made by ferry's own encoder: the reader must agree with it.
    fn record(lsn: u64, vshard: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&RecordHeader::new(Layout::A, 0x8001, Lsn(lsn), VShardId(vshard)), payload, &mut out).unwrap();
        out
    }

    /// A layout-B record made by ferry's own encoder, with non-zero layout-B fields.
    fn record_b(lsn: u64, vshard: u32, payload: &[u8]) -> Vec<u8> {
        let mut header = RecordHeader::new(Layout::B, 0x8001, Lsn(lsn), VShardId(vshard));
        header.fields = LayoutFields::B { apply_key: lsn * 3, event_source: 2, commit_hlc: lsn << 20 };
        let mut out = Vec::new();
        encode_record(&header, payload, &mut out).unwrap();
        out
    }

    fn read_all(dir: &Path, kind: FolderKind) -> (Vec<(u64, u32, Vec<u8>)>, FolderReport) {
        let mut seen = Vec::new();
        let report = read_wal_folder(dir, kind, |r| seen.push((r.lsn.0, r.vshard.0, r.payload.to_vec()))).unwrap();
        (seen, report)
    }

    #[test]
    fn records_parse_and_every_damage_is_refused() {
        let bytes = record(0x0102, 9, b"hello");
        assert_eq!(parse_record(&bytes), Ok((Lsn(0x0102), 0x8001, VShardId(9), 54 + 5)));
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"next");
        assert_eq!(parse_record(&longer).unwrap().3, 59, "trailing bytes are the next record's");
        for len in 0..bytes.len() {
            assert!(matches!(parse_record(&bytes[..len]), Err(RecordFault::Truncated { .. })), "{len}");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x08;
            assert!(parse_record(&bad).is_err(), "flipped byte {at} accepted");
        }
        let mut huge = bytes;
        huge[30..34].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_record(&huge), Err(RecordFault::PayloadTooLong { len_bytes: u32::MAX }));
    }

    #[test]
    fn segment_names_parse_strictly() {
        assert_eq!(segment_first_lsn("wal-00000000000000000042.seg"), Some(Lsn(42)));
        for other in ["wal-42.seg", "wal-00000000000000000042.dwb", "x", "wal-99999999999999999999.seg"] {
            assert_eq!(segment_first_lsn(other), None, "{other}");
        }
    }

    /// A staged folder: segment 0 holds LSNs 5 and 9; segment 1 (named 10, with a preamble)
    /// holds 14; a stray file is ignored.
    fn staged(dir: &Path, second: &[Vec<u8>]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("wal-00000000000000000005.seg"), [record(5, 7, b"a"), record(9, 7, b"b")].concat()).unwrap();
        let mut seg = Preamble::new(1, 2, [0; 4]).encode().to_vec();
        seg.extend(second.concat());
        fs::write(dir.join("wal-00000000000000000010.seg"), seg).unwrap();
        fs::write(dir.join("notes.txt"), "not a segment").unwrap();
    }

    #[test]
    fn a_staged_folder_reads_in_order_behind_preambles() {
        let dir = tempfile::tempdir().unwrap();
        staged(dir.path(), &[record(14, 7, b"c")]);
        let (seen, report) = read_all(dir.path(), FolderKind::Staged);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let lsns: Vec<u64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(lsns, vec![5, 9, 14]);
        assert_eq!(seen[2].2, b"c");
        assert_eq!((report.segments_count, report.records_count, report.last_lsn), (2, 3, Some(Lsn(14))));
        assert!(matches!(
            read_wal_folder(&dir.path().join("none"), FolderKind::Staged, |_| {}),
            Err(WalReadError::Missing { .. })
        ));
    }

    #[test]
    fn staged_order_naming_and_corruption_are_reported_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        // LSN 9 again (a duplicate), then 14, then a torn record.
        let torn = record(15, 7, b"d");
        staged(dir.path(), &[record(9, 7, b"b"), record(14, 7, b"c"), torn[..20].to_vec()]);
        let (seen, report) = read_all(dir.path(), FolderKind::Staged);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![5, 9, 9, 14]);
        let all = report.problems.join("\n");
        assert!(all.contains("LSN 9 is not above the previous 9"), "{all}");
        assert!(all.contains("torn record") && all.contains("the last 20 bytes are unreadable"), "{all}");
        assert_eq!(report.problems_count, 2, "{all}");

        // A wrongly named segment, and a corrupt one before a good one.
        let other = tempfile::tempdir().unwrap();
        staged(other.path(), &[record(14, 7, b"c")]);
        fs::rename(
            other.path().join("wal-00000000000000000010.seg"),
            other.path().join("wal-00000000000000000012.seg"),
        )
        .unwrap();
        let mut bad = record(20, 7, b"e");
        bad[54] ^= 1; // the payload
        fs::write(other.path().join("wal-00000000000000000011.seg"), bad).unwrap();
        let (seen, report) = read_all(other.path(), FolderKind::Staged);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![5, 9, 14]);
        let all = report.problems.join("\n");
        assert!(all.contains("wal-00000000000000000011.seg offset 0: CRC32C mismatch"), "{all}");
        assert!(all.contains("must be named 10"), "{all}");
    }

    fn spec() -> RecordSpec {
        RecordSpec::new(0x8001, VShardId(3))
    }

    /// Back-to-back records, buffered flushes, segments rolled every 1000 bytes.
    fn dense(layout: Layout) -> WriterOptions {
        WriterOptions { layout, flush: FlushStyle::Buffered, roll_size_bytes: 1000, ..WriterOptions::default() }
    }

    /// O_DIRECT-style 4 KiB flushes with stale leftovers, segments rolled every 16 KiB.
    fn aligned(layout: Layout) -> WriterOptions {
        WriterOptions {
            layout,
            flush: FlushStyle::Direct,
            leftovers: Leftovers::Stale,
            roll_size_bytes: 16 << 10,
            alignment_bytes: 4096,
            preamble: None,
        }
    }

    #[test]
    fn a_dense_buffered_folder_reads_and_a_gap_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let options = dense(Layout::A);
        let mut wal = WalWriter::create(dir.path(), options, Lsn(1)).unwrap();
        for i in 0..40u8 {
            wal.append(&spec(), &[i; 100]).unwrap();
            if i == 30 {
                wal.skip_lsns_for_tests(1);
            }
        }
        wal.flush().unwrap();
        let (seen, report) = read_all(dir.path(), FolderKind::Dense);
        assert_eq!(seen.len(), 40);
        assert!(report.segments_count > 3);
        assert_eq!(report.last_lsn, Some(Lsn(41)));
        assert_eq!(report.problems_count, 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("LSN 33 follows 31"), "{:?}", report.problems);
    }

    #[test]
    fn an_aligned_folder_skips_stale_leftovers_and_reads_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = aligned(Layout::A);
        let mut wal = WalWriter::create(dir.path(), options, Lsn(1)).unwrap();
        // Large groups first, small ones after: the reused buffer leaves whole old records.
        for group in 0..60u64 {
            let size = if group < 5 { 30 } else { 2 };
            for _ in 0..size {
                wal.append(&spec(), &group.to_le_bytes()).unwrap();
            }
            wal.flush().unwrap();
        }
        let (seen, report) = read_all(dir.path(), FolderKind::Aligned { alignment_bytes: 4096 });
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(seen.len(), 5 * 30 + 55 * 2);
        assert!(seen.iter().enumerate().all(|(i, s)| s.0 == i as u64 + 1));
        assert!(report.segments_count > 2);
        // Read as a back-to-back folder, the leftovers are a problem.
        let (_, dense) = read_all(dir.path(), FolderKind::Dense);
        assert!(dense.problems_count > 0);
    }

    /// Layout B by hand from the header table of DESIGN section 6: record_type 0x8001, lsn
    /// 0x0102, tenant 5, vshard 0x0A0B0C0D, payload [0xFF, 0xEE], database 6, apply_key 7,
    /// event_source 8, commit_hlc 9.
    fn hand_written_b() -> Vec<u8> {
        let mut bytes: Vec<u8> = vec![0x57, 0x4E, 0x59, 0x53, 0x01, 0x00];
        bytes.extend(0x8001u32.to_le_bytes());
        bytes.extend(0x0102u64.to_le_bytes());
        bytes.extend(5u64.to_le_bytes());
        bytes.extend([0x0D, 0x0C, 0x0B, 0x0A]);
        bytes.extend(2u32.to_le_bytes());
        bytes.extend(6u64.to_le_bytes());
        bytes.extend(7u64.to_le_bytes());
        bytes.push(8);
        bytes.extend(9u64.to_le_bytes());
        assert_eq!(bytes.len(), 59);
        let crc = ferry_wire::crc32c_append(ferry_wire::crc32c(&bytes), &[0xFF, 0xEE]);
        bytes.extend(crc.to_le_bytes());
        bytes.extend([0xFF, 0xEE]);
        bytes
    }

    #[test]
    fn layout_b_records_parse_from_the_design_table_and_every_damage_is_refused() {
        let bytes = hand_written_b();
        let parsed = parse_record_as(RecordLayout::B, &bytes).unwrap();
        assert_eq!(
            parsed,
            ParsedRecord { lsn: Lsn(0x0102), record_type: 0x8001, vshard: VShardId(0x0A0B_0C0D), len_bytes: 65 }
        );
        assert!(!parsed.is_padding());
        assert_eq!(detect_layout(&bytes), Some(RecordLayout::B));
        assert!(parse_record(&bytes).is_err(), "a layout-B record is not a layout-A one");
        assert_eq!(detect_layout(&record(3, 1, b"x")), Some(RecordLayout::A));
        assert_eq!(detect_layout(&[0; 100]), None);
        // ferry's encoder writes the same bytes.
        let mut header = RecordHeader::new(Layout::B, 0x8001, Lsn(0x0102), VShardId(0x0A0B_0C0D));
        header.tenant_id = 5;
        header.database_id = 6;
        header.fields = LayoutFields::B { apply_key: 7, event_source: 8, commit_hlc: 9 };
        let mut ours = Vec::new();
        encode_record(&header, &[0xFF, 0xEE], &mut ours).unwrap();
        assert_eq!(ours, bytes);
        for len in 0..bytes.len() {
            let fault = parse_record_as(RecordLayout::B, &bytes[..len]).unwrap_err();
            assert!(matches!(fault, RecordFault::Truncated { .. }), "{len}: {fault}");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(parse_record_as(RecordLayout::B, &bad).is_err(), "flipped byte {at} accepted");
        }
        let mut padding = Vec::new();
        encode_padding(4096 + 33, &mut padding).unwrap();
        let parsed = parse_record_as(RecordLayout::B, &padding).unwrap();
        assert!(parsed.is_padding() && parsed.len_bytes == 4096 + 33, "{parsed:?}");
    }

    #[test]
    fn an_aligned_layout_b_folder_skips_padding_and_reads_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = aligned(Layout::B);
        let mut wal = WalWriter::create(dir.path(), options, Lsn(1)).unwrap();
        let mut written = 0u64;
        for group in 0..60u64 {
            // Group 7 is one 63 + 4000-byte record: a 33-byte gap, smaller than a header, so
            // its padding spans the gap plus a whole block.
            let (size, payload_len) = match group {
                7 => (1, 4000),
                g if g < 5 => (30, 8),
                _ => (2, 8),
            };
            for _ in 0..size {
                wal.append(&spec(), &vec![group as u8; payload_len]).unwrap();
                written += 1;
            }
            wal.flush().unwrap();
        }
        let (seen, report) = read_all(dir.path(), FolderKind::Aligned { alignment_bytes: 4096 });
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(seen.len() as u64, written);
        assert!(seen.iter().enumerate().all(|(i, s)| s.0 == i as u64 + 1));
        assert!(report.segments_count > 2);
        assert_eq!(report.layout_b_segments_count, report.segments_count);
        assert!(report.padding_count >= 55, "one padding record per unaligned flush: {report:?}");
        assert_eq!(seen[5 * 30 + 2 * 2].2.len(), 4000, "the record before the long padding");

        // Zeros after the last flush are the unwritten end; other bytes are reported.
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        let last = names.last().unwrap().clone();
        let mut bytes = fs::read(&last).unwrap();
        bytes.extend([0u8; 4096]);
        fs::write(&last, &bytes).unwrap();
        let (again, report) = read_all(dir.path(), FolderKind::Aligned { alignment_bytes: 4096 });
        assert!(report.problems.is_empty() && again.len() == seen.len(), "{:?}", report.problems);
        bytes.extend([0xAB; 100]);
        fs::write(&last, &bytes).unwrap();
        let (_, report) = read_all(dir.path(), FolderKind::Aligned { alignment_bytes: 4096 });
        assert_eq!(report.problems_count, 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("bad magic"), "{:?}", report.problems);
    }

    #[test]
    fn staged_folders_may_change_layout_between_segments_and_hold_no_padding() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 5 in layout A (5, 9), segment 10 in layout B behind a preamble (14, 20).
        staged(dir.path(), &[record_b(14, 7, b"c"), record_b(20, 7, b"d")]);
        let mut layouts = Vec::new();
        let report =
            read_wal_folder(dir.path(), FolderKind::Staged, |r| layouts.push((r.lsn.0, r.layout, r.payload.to_vec())))
                .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            layouts,
            vec![
                (5, RecordLayout::A, b"a".to_vec()),
                (9, RecordLayout::A, b"b".to_vec()),
                (14, RecordLayout::B, b"c".to_vec()),
                (20, RecordLayout::B, b"d".to_vec()),
            ]
        );
        assert_eq!((report.segments_count, report.layout_b_segments_count), (2, 1));

        // A padding record inside a staged segment is reported; the records around it are read.
        let other = tempfile::tempdir().unwrap();
        let mut padding = Vec::new();
        encode_padding(100, &mut padding).unwrap();
        staged(other.path(), &[record_b(14, 7, b"c"), padding, record_b(20, 7, b"d")]);
        let (seen, report) = read_all(other.path(), FolderKind::Staged);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![5, 9, 14, 20]);
        assert_eq!((report.padding_count, report.problems_count), (1, 1), "{:?}", report.problems);
        assert!(report.problems[0].contains("a padding record in a staged WAL"), "{:?}", report.problems);
    }

    #[test]
    fn a_dense_buffered_layout_b_folder_reads() {
        let dir = tempfile::tempdir().unwrap();
        let options = dense(Layout::B);
        let mut wal = WalWriter::create(dir.path(), options, Lsn(1)).unwrap();
        for i in 0..40u8 {
            wal.append(&RecordSpec { apply_key: u64::from(i), ..spec() }, &[i; 100]).unwrap();
        }
        wal.flush().unwrap();
        let (seen, report) = read_all(dir.path(), FolderKind::Dense);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(seen.len(), 40);
        assert!(seen.iter().enumerate().all(|(i, s)| s.0 == i as u64 + 1 && s.2 == [i as u8; 100]));
        assert!(report.segments_count > 3 && report.layout_b_segments_count == report.segments_count);
        assert_eq!(report.padding_count, 0);
    }
}
