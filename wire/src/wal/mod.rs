//! NodeDB's WAL formats, behind a seam, and the sans-IO tail cursor that walks them.
//!
//! What it does: everything ferry needs to read a WAL that NodeDB (the published
//! `nodedb-wal` crate) writes, byte for byte, without doing any I/O:
//! - [`header`]: the record header of layout A (54 bytes, nodedb-wal 0.1 to 0.4) and layout B
//!   (63 bytes, nodedb-wal 0.6), the CRC rule, and layout B padding records;
//! - [`preamble`]: the 16-byte "WALP" segment preamble of encrypted segments;
//! - [`segment`]: segment file names, `wal-<first_lsn:020>.seg`;
//! - [`cursor`]: the tail cursor, a state machine that is fed a segment's bytes and returns
//!   records, "wait", "end of segment" or corruption, applying every tailing rule of the
//!   design (dense LSNs, leftovers, padding, gaps, torn tails, sealed segments), in a live
//!   mode for the database's WAL and a staged mode for ferry's staged WALs;
//! - [`select`]: which records a migration keeps;
//! - [`staged`]: where kept records go in a staged WAL (segment names, preambles, rolls).
//!
//! What it does not: read files (the engine preads segments and feeds the bytes), decrypt
//! payloads (encrypted records pass through opaque, headers are never rewritten), or know
//! NodeDB's record kind numbers: node-global metadata rules (collection tombstones,
//! aborted-write markers) are not implemented, see [`select`]. NodeDB trees older than the
//! published crates (a 30-byte, version-2 header) are not supported.
//!
//! Invariants: no bytes make anything here panic; `payload_len` is checked against
//! [`header::PAYLOAD_LEN_MAX_BYTES`] before it is trusted; a record is returned only when its
//! magic, version and CRC check out and its LSN is the one the rules expect.

pub mod cursor;
pub mod header;
pub mod preamble;
pub mod segment;
pub mod select;
pub mod staged;

pub use cursor::{Cursor, CursorConfig, CursorError, LayoutChoice, Mode, Record, Step};
pub use header::{
    check_record, encode_padding, encode_record, padding_span_bytes, record_crc, Layout, LayoutFields, RecordHeader,
};
pub use preamble::{Preamble, PREAMBLE_LEN_BYTES};
pub use segment::{parse_segment_name, segment_name};
pub use select::Selection;
pub use staged::{Placement, StagedError, StagedPlan};

/// Default block size of O_DIRECT flushes: the alignment leftovers and padding round up to.
pub const ALIGNMENT_DEFAULT_BYTES: u32 = 4096;
/// Default segment roll size of NodeDB's writer.
pub const ROLL_SIZE_DEFAULT_BYTES: u64 = 64 << 20;
/// Largest segment file ferry reads whole into memory (the cursor is fed a segment's bytes
/// from offset 0). Far above NodeDB's 64 MiB default roll size; a larger file is refused
/// before anything is allocated.
pub const SEGMENT_LEN_MAX_BYTES: u64 = 1 << 30;

/// The first record of a segment (after its preamble, if any) and the layout whose CRC
/// checks out on it: layout auto-detection, and the engine's "a newer segment exists with a
/// valid first record" test for sealing the segment before it. `None` when the segment is
/// empty, torn, or does not start with a valid record under either layout.
pub fn first_record(segment: &[u8]) -> Option<(Layout, RecordHeader)> {
    let start = if Preamble::is_present(segment) {
        Preamble::decode(segment).ok()?;
        PREAMBLE_LEN_BYTES
    } else {
        0
    };
    let rest = segment.get(start..)?;
    Layout::ALL.into_iter().find_map(|layout| check_record(layout, rest).ok().map(|(header, _)| (layout, header)))
}

/// Malformed WAL bytes: what a header, record or preamble decoder refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("need {need_bytes} bytes, only {have_bytes} are there")]
    Truncated { need_bytes: usize, have_bytes: usize },
    #[error("bad record magic {found:#010x} (expected 0x53594e57, \"SYNW\")")]
    Magic { found: u32 },
    #[error("unsupported record format version {found}: only version 1 (nodedb-wal 0.1 to 0.6) is supported")]
    Version { found: u16 },
    #[error("payload of {len_bytes} bytes is over the 64 MiB limit")]
    PayloadTooLong { len_bytes: u32 },
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("segment preamble does not start with \"WALP\"")]
    PreambleMagic,
    #[error("unsupported segment preamble version {found}: only version 1 is supported")]
    PreambleVersion { found: u16 },
}

#[cfg(test)]
mod cursor_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::{Lsn, VShardId};

    #[test]
    fn first_record_detects_the_layout_behind_a_preamble() {
        for layout in Layout::ALL {
            let mut seg = Preamble::new(1, 1, [0; 4]).encode().to_vec();
            let header = RecordHeader::new(layout, 3, Lsn(9), VShardId(2));
            encode_record(&header, b"payload", &mut seg).unwrap();
            let (found, h) = first_record(&seg).unwrap();
            assert_eq!((found, h.lsn), (layout, Lsn(9)));
            assert_eq!(first_record(&seg[..seg.len() - 1]), None);
        }
        assert_eq!(first_record(&[]), None);
        assert_eq!(first_record(&[0; 4096]), None);
    }

    /// Layout A record by hand from the header table of DESIGN section 6: record_type 1, lsn
    /// 0x0102, tenant 0, vshard 0x0A0B0C0D, payload [0xFF], database 0, reserved 8 x 0xAA.
    #[test]
    fn layout_a_record_matches_hand_written_bytes() {
        let mut expected: Vec<u8> = vec![0x57, 0x4E, 0x59, 0x53, 0x01, 0x00, 0x01, 0, 0, 0];
        expected.extend([0x02, 0x01, 0, 0, 0, 0, 0, 0]); // lsn
        expected.extend([0; 8]); // tenant
        expected.extend([0x0D, 0x0C, 0x0B, 0x0A]); // vshard
        expected.extend([1, 0, 0, 0]); // payload_len
        expected.extend([0; 8]); // database
        expected.extend([0xAA; 8]); // reserved
        assert_eq!(expected.len(), 50);
        let crc = crate::crc32c_append(crate::crc32c(&expected), &[0xFF]);
        expected.extend(crc.to_le_bytes());
        expected.push(0xFF);
        let mut header = RecordHeader::new(Layout::A, 1, Lsn(0x0102), VShardId(0x0A0B_0C0D));
        header.fields = LayoutFields::A { reserved: [0xAA; 8] };
        let mut out = Vec::new();
        encode_record(&header, &[0xFF], &mut out).unwrap();
        assert_eq!(out, expected);
    }
}
