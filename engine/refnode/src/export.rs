//! The reference node's base export: the migrating vShard's writes up to `base_lsn`, in
//! immutable files a migration copies as its base (DESIGN sections 2 and 9).
//!
//! What it does: [`export_base`] writes the writes with LSN <= `base_lsn` into
//! `<root>/export/vshard-<id>-part-<index:06>.rfx`, at most [`ENTRIES_PER_FILE_MAX`] per file
//! (always at least one file, so `base_lsn` is recorded even when the vShard had no writes);
//! `<root>` becomes the migration's `segments_root`. [`decode_export`] and
//! [`read_export_file`] read one back. Every file, little-endian:
//!
//! ```text
//!  0           8          10         12        16          24        32
//!  +-----------+----------+----------+---------+-----------+---------+
//!  | magic     | version  | reserved | vshard  | base_lsn  | count   |
//!  | "FERRYEXP"| u16 = 1  | u16 = 0  | u32     | u64       | u64     |
//!  +-----------+----------+----------+---------+-----------+---------+
//!  32 + 16 * i (i < count)                        32 + 16 * count
//!  +-----------------+-----------------+-- ... --+----------+
//!  | source_lsn u64  | writer_seq u64  |         | crc32c   |
//!  +-----------------+-----------------+-- ... --+----------+
//! ```
//! `magic` says what the file is (a segment file of something else is refused, not misread);
//! `version` lets the format grow; `reserved` keeps the fields aligned and must be zero;
//! `vshard` names whose writes these are; `base_lsn` is the watermark the coordinator passes to
//! `migration.start` (every write of the vShard with LSN <= it is in the export's files);
//! `count` says how many entries follow (at most [`ENTRIES_PER_FILE_MAX`], checked before
//! anything is allocated). Each entry is one acknowledged write: the LSN it got in the source
//! WAL (strictly increasing within a file, never above `base_lsn`) and its writer_seq (what the
//! verifier counts). `crc32c` (Castagnoli) covers every byte before it, so a file is checked
//! whole; the file ends right after it (36 + 16 * count bytes).
//!
//! What it does not: export anything but (LSN, writer_seq): the payloads are derived from
//! (vshard, writer_seq), see [`super::payload`]. Bulk volume comes from [`super::bulk`].
//!
//! Invariants: files are written under a temporary name, fsynced, renamed, and the folder
//! fsynced, so a file under its final name is whole and never changes afterwards. Reading
//! never panics on any bytes.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_wire::{Lsn, VShardId};

/// File magic, as stored.
pub const EXPORT_MAGIC: [u8; 8] = *b"FERRYEXP";
/// The only format version.
pub const EXPORT_FORMAT_VERSION: u16 = 1;
/// Most entries in one file (1 MiB of entries): the reader's limit before allocating.
pub const ENTRIES_PER_FILE_MAX: u64 = 1 << 16;
/// The folder under the export root that holds the export files.
pub const EXPORT_DIR: &str = "export";
/// The extension of export files.
pub const EXPORT_EXTENSION: &str = "rfx";

const HEADER_LEN_BYTES: usize = 32;
const ENTRY_LEN_BYTES: usize = 16;
const CRC_LEN_BYTES: usize = 4;

/// One acknowledged write of the migrating vShard in the source WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportEntry {
    pub source_lsn: Lsn,
    pub writer_seq: u64,
}

/// One export file, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFile {
    pub vshard: VShardId,
    pub base_lsn: Lsn,
    pub entries: Vec<ExportEntry>,
}

/// What [`export_base`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The files, relative to the export root (`export/...`).
    pub files: Vec<PathBuf>,
    pub entries_count: u64,
    pub bytes: u64,
}

/// Malformed export bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportFormatError {
    #[error("export file is truncated: {have_bytes} bytes, at least {need_bytes} needed")]
    Truncated { need_bytes: u64, have_bytes: u64 },
    #[error("not a reference export file: magic {found:02x?}, expected \"FERRYEXP\"")]
    Magic { found: [u8; 8] },
    #[error("unsupported export format version {found}: only version 1 is supported")]
    Version { found: u16 },
    #[error("export header reserved field is {found:#06x}, must be zero")]
    Reserved { found: u16 },
    #[error("export file says {count} entries, over the {ENTRIES_PER_FILE_MAX} limit")]
    TooManyEntries { count: u64 },
    #[error("export file has {have_bytes} bytes, {count} entries need exactly {need_bytes}")]
    Length { count: u64, need_bytes: u64, have_bytes: u64 },
    #[error("export file checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Crc { stored: u32, computed: u32 },
    #[error("export entry {index} has LSN {lsn}, not above the previous {previous} and at most base_lsn {base_lsn}")]
    Order { index: u64, lsn: Lsn, previous: Lsn, base_lsn: Lsn },
}

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{path}: {cause}")]
    Format { path: PathBuf, cause: ExportFormatError },
    #[error("export misuse: {0}")]
    Misuse(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExportError + '_ {
    move |source| ExportError::Io { path: path.to_path_buf(), cause: source }
}

/// The bytes of one export file. `entries` must be in strictly increasing LSN order, none
/// above `base_lsn`, at most [`ENTRIES_PER_FILE_MAX`].
pub fn encode_export(vshard: VShardId, base_lsn: Lsn, entries: &[ExportEntry]) -> Result<Vec<u8>, ExportFormatError> {
    let count = entries.len() as u64;
    if count > ENTRIES_PER_FILE_MAX {
        return Err(ExportFormatError::TooManyEntries { count });
    }
    check_order(entries, base_lsn)?;
    let mut out = Vec::with_capacity(HEADER_LEN_BYTES + entries.len() * ENTRY_LEN_BYTES + CRC_LEN_BYTES);
    out.extend_from_slice(&EXPORT_MAGIC);
    out.extend_from_slice(&EXPORT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&vshard.0.to_le_bytes());
    out.extend_from_slice(&base_lsn.0.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.source_lsn.0.to_le_bytes());
        out.extend_from_slice(&entry.writer_seq.to_le_bytes());
    }
    let crc = ferry_wire::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn check_order(entries: &[ExportEntry], base_lsn: Lsn) -> Result<(), ExportFormatError> {
    let mut previous = Lsn(0);
    for (index, entry) in entries.iter().enumerate() {
        if entry.source_lsn <= previous || entry.source_lsn > base_lsn {
            return Err(ExportFormatError::Order { index: index as u64, lsn: entry.source_lsn, previous, base_lsn });
        }
        previous = entry.source_lsn;
    }
    Ok(())
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    bytes.get(at..at + 2).and_then(|b| b.try_into().ok()).map_or(0, u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// Decodes one export file's bytes, checking everything the format promises.
pub fn decode_export(bytes: &[u8]) -> Result<ExportFile, ExportFormatError> {
    let have_bytes = bytes.len() as u64;
    let min_bytes = (HEADER_LEN_BYTES + CRC_LEN_BYTES) as u64;
    if have_bytes < min_bytes {
        return Err(ExportFormatError::Truncated { need_bytes: min_bytes, have_bytes });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    if magic != EXPORT_MAGIC {
        return Err(ExportFormatError::Magic { found: magic });
    }
    let version = u16_at(bytes, 8);
    if version != EXPORT_FORMAT_VERSION {
        return Err(ExportFormatError::Version { found: version });
    }
    let reserved = u16_at(bytes, 10);
    if reserved != 0 {
        return Err(ExportFormatError::Reserved { found: reserved });
    }
    let (vshard, base_lsn, count) = (VShardId(u32_at(bytes, 12)), Lsn(u64_at(bytes, 16)), u64_at(bytes, 24));
    if count > ENTRIES_PER_FILE_MAX {
        return Err(ExportFormatError::TooManyEntries { count });
    }
    // count <= 2^16, so this cannot overflow.
    let need_bytes = min_bytes + count * ENTRY_LEN_BYTES as u64;
    if have_bytes < need_bytes {
        return Err(ExportFormatError::Truncated { need_bytes, have_bytes });
    }
    if have_bytes != need_bytes {
        return Err(ExportFormatError::Length { count, need_bytes, have_bytes });
    }
    let crc_at = bytes.len() - CRC_LEN_BYTES;
    let (body, stored) = (bytes.get(..crc_at).unwrap_or_default(), u32_at(bytes, crc_at));
    let computed = ferry_wire::crc32c(body);
    if stored != computed {
        return Err(ExportFormatError::Crc { stored, computed });
    }
    let entries: Vec<ExportEntry> = body
        .get(HEADER_LEN_BYTES..)
        .unwrap_or_default()
        .chunks_exact(ENTRY_LEN_BYTES)
        .map(|e| ExportEntry { source_lsn: Lsn(u64_at(e, 0)), writer_seq: u64_at(e, 8) })
        .collect();
    check_order(&entries, base_lsn)?;
    Ok(ExportFile { vshard, base_lsn, entries })
}

/// Reads and decodes one export file (refusing a file over the format's largest size before
/// reading it).
pub fn read_export_file(path: &Path) -> Result<ExportFile, ExportError> {
    let len_bytes = fs::metadata(path).map_err(io_err(path))?.len();
    let max_bytes = (HEADER_LEN_BYTES + CRC_LEN_BYTES) as u64 + ENTRIES_PER_FILE_MAX * ENTRY_LEN_BYTES as u64;
    if len_bytes > max_bytes {
        let source =
            ExportFormatError::Length { count: ENTRIES_PER_FILE_MAX, need_bytes: max_bytes, have_bytes: len_bytes };
        return Err(ExportError::Format { path: path.to_path_buf(), cause: source });
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    decode_export(&bytes).map_err(|source| ExportError::Format { path: path.to_path_buf(), cause: source })
}

/// Whether `name` is an export file's name.
pub fn is_export_file_name(name: &str) -> bool {
    Path::new(name).extension().is_some_and(|e| e == EXPORT_EXTENSION)
}

/// Writes the writes of `vshard` with LSN <= `base_lsn` (entries above it are left out) as
/// immutable files under `<root>/export/`, which must not exist yet. `entries` must be in
/// strictly increasing LSN order (what [`super::WriterLog::migrating_source_writes`] returns).
pub fn export_base(
    root: &Path,
    vshard: VShardId,
    base_lsn: Lsn,
    entries: &[ExportEntry],
) -> Result<ExportReport, ExportError> {
    let upto = entries.partition_point(|e| e.source_lsn <= base_lsn);
    let kept = entries.get(..upto).unwrap_or_default();
    check_order(kept, base_lsn).map_err(|e| ExportError::Misuse(format!("entries are not in LSN order: {e}")))?;
    fs::create_dir_all(root).map_err(io_err(root))?;
    let dir = root.join(EXPORT_DIR);
    fs::create_dir(&dir).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => {
            ExportError::Misuse(format!("{} already exists: export into a new folder", dir.display()))
        }
        _ => ExportError::Io { path: dir.clone(), cause: source },
    })?;
    let per_file = usize::try_from(ENTRIES_PER_FILE_MAX).unwrap_or(usize::MAX);
    let mut report = ExportReport { files: Vec::new(), entries_count: kept.len() as u64, bytes: 0 };
    let parts: Vec<&[ExportEntry]> = if kept.is_empty() { vec![kept] } else { kept.chunks(per_file).collect() };
    for (index, part) in parts.into_iter().enumerate() {
        let bytes = encode_export(vshard, base_lsn, part)
            .map_err(|source| ExportError::Format { path: dir.clone(), cause: source })?;
        let name = format!("vshard-{}-part-{index:06}.{EXPORT_EXTENSION}", vshard.0);
        write_immutable(&dir, &name, &bytes)?;
        report.files.push(Path::new(EXPORT_DIR).join(name));
        report.bytes += bytes.len() as u64;
    }
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
    File::open(root).and_then(|d| d.sync_all()).map_err(io_err(root))?;
    Ok(report)
}

/// Writes `dir/name` whole: temp file, fsync, rename (the caller fsyncs `dir`).
fn write_immutable(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
    let temp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::options().write(true).create_new(true).open(&temp).map_err(io_err(&temp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_err(&temp))?;
    fs::rename(&temp, &path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn entries(lsns: &[u64]) -> Vec<ExportEntry> {
        lsns.iter().map(|l| ExportEntry { source_lsn: Lsn(*l), writer_seq: l * 10 }).collect()
    }

    #[test]
    fn bytes_round_trip_and_match_the_diagram() {
        let list = entries(&[4, 8, 12]);
        let bytes = encode_export(VShardId(7), Lsn(12), &list).unwrap();
        assert_eq!(bytes.len(), 36 + 3 * 16);
        assert_eq!(&bytes[..8], b"FERRYEXP");
        assert_eq!(bytes[8..10], 1u16.to_le_bytes());
        assert_eq!(bytes[12..16], 7u32.to_le_bytes());
        assert_eq!(bytes[16..24], 12u64.to_le_bytes());
        assert_eq!(bytes[24..32], 3u64.to_le_bytes());
        assert_eq!(bytes[32..40], 4u64.to_le_bytes());
        assert_eq!(bytes[40..48], 40u64.to_le_bytes());
        assert_eq!(bytes[bytes.len() - 4..], ferry_wire::crc32c(&bytes[..bytes.len() - 4]).to_le_bytes());
        let file = decode_export(&bytes).unwrap();
        assert_eq!(file, ExportFile { vshard: VShardId(7), base_lsn: Lsn(12), entries: list });
        let empty = decode_export(&encode_export(VShardId(7), Lsn(0), &[]).unwrap()).unwrap();
        assert!(empty.entries.is_empty());
    }

    #[test]
    fn encoding_refuses_out_of_order_or_late_entries() {
        assert!(matches!(encode_export(VShardId(1), Lsn(9), &entries(&[4, 4])), Err(ExportFormatError::Order { .. })));
        assert!(matches!(encode_export(VShardId(1), Lsn(9), &entries(&[5, 3])), Err(ExportFormatError::Order { .. })));
        assert!(matches!(encode_export(VShardId(1), Lsn(9), &entries(&[10])), Err(ExportFormatError::Order { .. })));
    }

    #[test]
    fn truncated_corrupt_and_foreign_bytes_are_refused() {
        let bytes = encode_export(VShardId(7), Lsn(100), &entries(&[1, 2, 50, 99])).unwrap();
        for len in 0..bytes.len() {
            let err = decode_export(&bytes[..len]).unwrap_err();
            assert!(matches!(err, ExportFormatError::Truncated { .. }), "{len}: {err}");
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(decode_export(&bad).is_err(), "flipped byte {at} accepted");
        }
        let mut bad = bytes.clone();
        bad[40] ^= 1; // a writer_seq
        assert!(matches!(decode_export(&bad), Err(ExportFormatError::Crc { .. })));
        let mut foreign = bytes.clone();
        foreign[..8].copy_from_slice(b"SOMEFILE");
        assert!(decode_export(&foreign).unwrap_err().to_string().contains("not a reference export file"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_export(&longer), Err(ExportFormatError::Length { .. })));
        // A huge count is refused before anything is allocated.
        let mut huge = bytes.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_export(&huge), Err(ExportFormatError::TooManyEntries { count: u64::MAX }));
        let mut version = bytes;
        version[8] = 2;
        assert_eq!(decode_export(&version), Err(ExportFormatError::Version { found: 2 }));
    }

    #[test]
    fn export_writes_files_that_read_back_and_refuses_a_used_folder() {
        let dir = tempfile::tempdir().unwrap();
        let list = entries(&[3, 7, 11, 15]);
        let report = export_base(dir.path(), VShardId(7), Lsn(12), &list).unwrap();
        assert_eq!(report.entries_count, 3);
        assert_eq!(report.files, vec![PathBuf::from("export/vshard-7-part-000000.rfx")]);
        let file = read_export_file(&dir.path().join(&report.files[0])).unwrap();
        assert_eq!((file.vshard, file.base_lsn), (VShardId(7), Lsn(12)));
        assert_eq!(file.entries, list[..3]);
        assert!(is_export_file_name("vshard-7-part-000000.rfx") && !is_export_file_name("L0/000000.bulk"));
        let names: Vec<_> =
            fs::read_dir(dir.path().join(EXPORT_DIR)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temp file is left behind: {names:?}");

        let err = export_base(dir.path(), VShardId(7), Lsn(12), &list).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let err = export_base(&dir.path().join("other"), VShardId(7), Lsn(20), &entries(&[5, 4])).unwrap_err();
        assert!(err.to_string().contains("not in LSN order"), "{err}");
    }

    #[test]
    fn large_exports_split_over_files_and_empty_ones_still_record_base_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let count = ENTRIES_PER_FILE_MAX + 5;
        let list: Vec<ExportEntry> = (1..=count).map(|l| ExportEntry { source_lsn: Lsn(l), writer_seq: l }).collect();
        let report = export_base(dir.path(), VShardId(2), Lsn(count), &list).unwrap();
        assert_eq!(report.files.len(), 2);
        let second = read_export_file(&dir.path().join(&report.files[1])).unwrap();
        assert_eq!(second.entries.len(), 5);

        let empty = tempfile::tempdir().unwrap();
        let report = export_base(empty.path(), VShardId(2), Lsn(40), &[]).unwrap();
        let file = read_export_file(&empty.path().join(&report.files[0])).unwrap();
        assert_eq!((file.base_lsn, file.entries.len()), (Lsn(40), 0));
    }

    #[test]
    fn a_truncated_or_oversized_file_on_disk_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.rfx");
        let bytes = encode_export(VShardId(7), Lsn(9), &entries(&[1, 2])).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_export_file(&path).unwrap_err();
        assert!(err.to_string().contains("truncated") && err.to_string().contains("x.rfx"), "{err}");
        fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        assert!(matches!(read_export_file(&path), Err(ExportError::Format { .. })));
        assert!(matches!(read_export_file(&dir.path().join("missing.rfx")), Err(ExportError::Io { .. })));
    }
}
