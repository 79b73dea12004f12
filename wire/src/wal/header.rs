//! The NodeDB WAL record header: both layouts, the CRC rule and the layout B padding record.
//!
//! What it does: encodes and decodes the record header of the two layouts that NodeDB's
//! published `nodedb-wal` crate writes, checks magic, version and the payload limit before a
//! payload length is trusted, computes and checks the CRC32C, and frames layout B padding.
//!
//! What it does not: walk a segment (that is [`cursor`](super::cursor)), or interpret
//! payloads (they are opaque; encrypted ones stay encrypted).
//!
//! ```text
//!  0      4        6            10     18          26          30            34            42
//!  +------+--------+------------+------+-----------+-----------+-------------+-------------+
//!  |magic |version |record_type | lsn  | tenant_id | vshard_id | payload_len | database_id | ...
//!  | u32  | u16 = 1| u32        | u64  | u64       | u32       | u32 <=64MiB | u64         |
//!  +------+--------+------------+------+-----------+-----------+-------------+-------------+
//!  layout A (nodedb-wal 0.1 to 0.4), 54 bytes:
//!  42            50         54
//!  +-------------+----------+
//!  | reserved[8] | crc32c   |
//!  +-------------+----------+
//!  layout B (nodedb-wal 0.6), 63 bytes:
//!  42          50             51           59         63
//!  +-----------+--------------+------------+----------+
//!  | apply_key | event_source | commit_hlc | crc32c   |
//!  | u64       | u8           | u64        | u32      |
//!  +-----------+--------------+------------+----------+
//! ```
//! All integers little-endian; `payload_len` bytes of payload follow the header. `magic`
//! ("SYNW") finds record starts; `format_version` is 1 in both layouts, so the layout is told
//! apart only by which CRC checks out. `record_type` bit 15 says a reader that does not know
//! the kind must not skip it, bit 14 says the payload is AES-256-GCM ciphertext, the other
//! bits are the kind. `lsn` is node-global and dense (padding carries 0). `tenant_id`,
//! `vshard_id` and `database_id` scope the record; ferry selects on `vshard_id`. In layout B
//! `apply_key` is the idempotency key of the replicated proposal that appended the record,
//! `event_source` the writer's code for the source of a row write, `commit_hlc` the commit
//! timestamp; ferry carries them unchanged. The CRC32C covers every header byte before the
//! crc field, then the payload.
//!
//! Invariant: decoding never panics and never trusts `payload_len` above
//! [`PAYLOAD_LEN_MAX_BYTES`].

use super::FormatError;
use crate::{crc32c, crc32c_append, Lsn, VShardId};

/// Record magic: 0x53594E57, "SYNW" read as a little-endian u32.
pub const MAGIC: u32 = 0x5359_4E57;
/// The only record format version both layouts carry.
pub const FORMAT_VERSION: u16 = 1;
/// Largest payload NodeDB writes (64 MiB); a larger `payload_len` is malformed.
pub const PAYLOAD_LEN_MAX_BYTES: u32 = 64 << 20;
/// `record_type` bit 15: a reader that does not know the kind must not skip the record.
pub const FLAG_REQUIRED: u32 = 1 << 15;
/// `record_type` bit 14: the payload is encrypted (opaque to ferry).
pub const FLAG_ENCRYPTED: u32 = 1 << 14;
/// Kind 0: Noop. With LSN 0 it is a layout B padding record.
pub const KIND_NOOP: u32 = 0;

/// Bytes of the shared header prefix (magic through database_id).
const COMMON_LEN_BYTES: usize = 42;

/// Which NodeDB header layout a segment is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// nodedb-wal 0.1 to 0.4: 54-byte header, `reserved[8]` then crc at 50..54; O_DIRECT flushes
    /// leave unframed leftovers up to the block boundary.
    A,
    /// nodedb-wal 0.6: 63-byte header with apply_key, event_source, commit_hlc, crc at 59..63;
    /// O_DIRECT flushes are padded with framed padding records.
    B,
}

impl Layout {
    /// Both layouts, in the order auto-detection tries them.
    pub const ALL: [Layout; 2] = [Layout::A, Layout::B];

    /// Size of this layout's header, in bytes.
    pub const fn header_len_bytes(self) -> usize {
        match self {
            Layout::A => 54,
            Layout::B => 63,
        }
    }

    /// Offset of the crc32c field: the CRC covers the header bytes before it.
    pub const fn crc_offset_bytes(self) -> usize {
        self.header_len_bytes() - 4
    }

    /// Short name used in dumps and manifests ("A" / "B").
    pub const fn name(self) -> &'static str {
        match self {
            Layout::A => "A",
            Layout::B => "B",
        }
    }
}

/// The fields that differ between the layouts (header bytes 42 up to the crc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutFields {
    /// Layout A: 8 reserved bytes, carried as they are (covered by the CRC).
    A { reserved: [u8; 8] },
    /// Layout B.
    B { apply_key: u64, event_source: u8, commit_hlc: u64 },
}

impl LayoutFields {
    /// The layout these fields belong to.
    pub fn layout(&self) -> Layout {
        match self {
            LayoutFields::A { .. } => Layout::A,
            LayoutFields::B { .. } => Layout::B,
        }
    }

    /// All-zero fields of `layout` (what padding records and most writers carry).
    pub fn zeroed(layout: Layout) -> Self {
        match layout {
            Layout::A => LayoutFields::A { reserved: [0; 8] },
            Layout::B => LayoutFields::B { apply_key: 0, event_source: 0, commit_hlc: 0 },
        }
    }
}

/// One decoded record header, every field as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    pub magic: u32,
    pub format_version: u16,
    pub record_type: u32,
    pub lsn: Lsn,
    pub tenant_id: u64,
    pub vshard_id: VShardId,
    pub payload_len: u32,
    pub database_id: u64,
    pub fields: LayoutFields,
    pub crc32c: u32,
}

impl RecordHeader {
    /// A header with magic and version set, a zero CRC and zeroed layout fields; fill in the
    /// rest and call [`encode_record`] to get the CRC right.
    pub fn new(layout: Layout, record_type: u32, lsn: Lsn, vshard_id: VShardId) -> Self {
        RecordHeader {
            magic: MAGIC,
            format_version: FORMAT_VERSION,
            record_type,
            lsn,
            tenant_id: 0,
            vshard_id,
            payload_len: 0,
            database_id: 0,
            fields: LayoutFields::zeroed(layout),
            crc32c: 0,
        }
    }

    pub fn layout(&self) -> Layout {
        self.fields.layout()
    }

    /// The kind: `record_type` without the required and encrypted flags.
    pub fn kind(&self) -> u32 {
        self.record_type & !(FLAG_REQUIRED | FLAG_ENCRYPTED)
    }

    pub fn is_required(&self) -> bool {
        self.record_type & FLAG_REQUIRED != 0
    }

    pub fn is_encrypted(&self) -> bool {
        self.record_type & FLAG_ENCRYPTED != 0
    }

    /// A layout B padding record: kind Noop (the whole `record_type` is 0) and LSN 0.
    pub fn is_padding(&self) -> bool {
        self.layout() == Layout::B && self.record_type == KIND_NOOP && self.lsn == Lsn(0)
    }

    /// Header plus payload, in bytes.
    pub fn record_len_bytes(&self) -> usize {
        self.layout().header_len_bytes().saturating_add(self.payload_len as usize)
    }

    /// Appends the header bytes exactly as the fields say (the stored `crc32c` included).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.extend_from_slice(&self.format_version.to_le_bytes());
        out.extend_from_slice(&self.record_type.to_le_bytes());
        out.extend_from_slice(&self.lsn.0.to_le_bytes());
        out.extend_from_slice(&self.tenant_id.to_le_bytes());
        out.extend_from_slice(&self.vshard_id.0.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&self.database_id.to_le_bytes());
        match self.fields {
            LayoutFields::A { reserved } => out.extend_from_slice(&reserved),
            LayoutFields::B { apply_key, event_source, commit_hlc } => {
                out.extend_from_slice(&apply_key.to_le_bytes());
                out.push(event_source);
                out.extend_from_slice(&commit_hlc.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.crc32c.to_le_bytes());
    }

    /// Decodes a `layout` header from the start of `bytes`, checking magic, version and the
    /// payload limit (not the CRC: that needs the payload, see [`check_record`]).
    pub fn decode(layout: Layout, bytes: &[u8]) -> Result<RecordHeader, FormatError> {
        let need = layout.header_len_bytes();
        let Some(h) = bytes.get(..need) else {
            return Err(FormatError::Truncated { need_bytes: need, have_bytes: bytes.len() });
        };
        let magic = le_u32(h, 0);
        if magic != MAGIC {
            return Err(FormatError::Magic { found: magic });
        }
        let format_version = le_u16(h, 4);
        if format_version != FORMAT_VERSION {
            return Err(FormatError::Version { found: format_version });
        }
        let payload_len = le_u32(h, 30);
        if payload_len > PAYLOAD_LEN_MAX_BYTES {
            return Err(FormatError::PayloadTooLong { len_bytes: payload_len });
        }
        let fields = match layout {
            Layout::A => {
                let mut reserved = [0u8; 8];
                reserved.copy_from_slice(h.get(42..50).unwrap_or(&[0; 8]));
                LayoutFields::A { reserved }
            }
            Layout::B => LayoutFields::B {
                apply_key: le_u64(h, 42),
                event_source: h.get(50).copied().unwrap_or(0),
                commit_hlc: le_u64(h, 51),
            },
        };
        Ok(RecordHeader {
            magic,
            format_version,
            record_type: le_u32(h, 6),
            lsn: Lsn(le_u64(h, 10)),
            tenant_id: le_u64(h, 18),
            vshard_id: VShardId(le_u32(h, 26)),
            payload_len,
            database_id: le_u64(h, 34),
            fields,
            crc32c: le_u32(h, layout.crc_offset_bytes()),
        })
    }
}

/// The CRC rule: CRC32C over the header bytes before the crc field, then the payload.
/// `header_bytes` must hold at least the bytes before the crc field.
pub fn record_crc(layout: Layout, header_bytes: &[u8], payload: &[u8]) -> u32 {
    let covered = header_bytes.get(..layout.crc_offset_bytes()).unwrap_or(header_bytes);
    crc32c_append(crc32c(covered), payload)
}

/// Checks the record at the start of `bytes` under `layout`: header, then CRC over the
/// header and the payload. Returns the header and the record's total length in bytes.
pub fn check_record(layout: Layout, bytes: &[u8]) -> Result<(RecordHeader, usize), FormatError> {
    let header = RecordHeader::decode(layout, bytes)?;
    let total = layout.header_len_bytes() + header.payload_len as usize;
    let Some(record) = bytes.get(..total) else {
        return Err(FormatError::Truncated { need_bytes: total, have_bytes: bytes.len() });
    };
    let payload = record.get(layout.header_len_bytes()..).unwrap_or(&[]);
    let computed = record_crc(layout, record, payload);
    if computed != header.crc32c {
        return Err(FormatError::Crc { stored: header.crc32c, computed });
    }
    Ok((header, total))
}

/// Appends one record: `header` with `payload_len` and `crc32c` set from `payload`
/// (`magic`, `format_version` and the other fields are written as given). Returns the CRC.
pub fn encode_record(header: &RecordHeader, payload: &[u8], out: &mut Vec<u8>) -> Result<u32, FormatError> {
    let payload_len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= PAYLOAD_LEN_MAX_BYTES)
        .ok_or(FormatError::PayloadTooLong { len_bytes: u32::MAX })?;
    let mut header = *header;
    header.payload_len = payload_len;
    header.crc32c = 0;
    let start = out.len();
    header.encode_into(out);
    let crc = record_crc(header.layout(), out.get(start..).unwrap_or(&[]), payload);
    let crc_at = start + header.layout().crc_offset_bytes();
    if let Some(slot) = out.get_mut(crc_at..crc_at + 4) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    out.extend_from_slice(payload);
    Ok(crc)
}

/// Bytes of padding a layout B flush of `len_bytes` needs to end on an `alignment_bytes`
/// boundary: 0 when aligned, else the gap, or the gap plus one block when the gap is
/// smaller than a header. `alignment_bytes` of 0 means no alignment (returns 0).
pub fn padding_span_bytes(len_bytes: u64, alignment_bytes: u64) -> u64 {
    if alignment_bytes == 0 {
        return 0;
    }
    let rem = len_bytes % alignment_bytes;
    if rem == 0 {
        return 0;
    }
    let gap = alignment_bytes - rem;
    if gap < Layout::B.header_len_bytes() as u64 {
        gap + alignment_bytes
    } else {
        gap
    }
}

/// Appends a layout B padding record spanning exactly `span_bytes` (kind Noop, LSN 0, every
/// id 0, a zero-filled payload, a valid CRC).
pub fn encode_padding(span_bytes: usize, out: &mut Vec<u8>) -> Result<(), FormatError> {
    let header_len = Layout::B.header_len_bytes();
    let Some(payload_len) = span_bytes.checked_sub(header_len) else {
        return Err(FormatError::Truncated { need_bytes: header_len, have_bytes: span_bytes });
    };
    let header = RecordHeader::new(Layout::B, KIND_NOOP, Lsn(0), VShardId(0));
    encode_record(&header, &vec![0u8; payload_len], out).map(|_| ())
}

fn le_u16(bytes: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = bytes.get(at..at + 2) {
        b.copy_from_slice(s);
    }
    u16::from_le_bytes(b)
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

// Compile-time layout checks: the shared prefix ends where the layout fields begin.
const _: () = assert!(COMMON_LEN_BYTES + 8 + 4 == Layout::A.header_len_bytes());
const _: () = assert!(COMMON_LEN_BYTES + 8 + 1 + 8 + 4 == Layout::B.header_len_bytes());

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    fn any_header() -> impl Strategy<Value = RecordHeader> {
        (
            any::<bool>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<[u8; 8]>(),
            (any::<u64>(), any::<u8>(), any::<u64>()),
        )
            .prop_map(|(b, rt, lsn, tenant, vs, db, reserved, (ak, es, hlc))| {
                let fields = if b {
                    LayoutFields::B { apply_key: ak, event_source: es, commit_hlc: hlc }
                } else {
                    LayoutFields::A { reserved }
                };
                RecordHeader {
                    magic: MAGIC,
                    format_version: FORMAT_VERSION,
                    record_type: rt,
                    lsn: Lsn(lsn),
                    tenant_id: tenant,
                    vshard_id: VShardId(vs),
                    payload_len: 0,
                    database_id: db,
                    fields,
                    crc32c: 0,
                }
            })
    }

    proptest! {
        #[test]
        fn record_round_trips_in_both_layouts(
            header in any_header(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut out = Vec::new();
            let crc = encode_record(&header, &payload, &mut out).unwrap();
            let layout = header.layout();
            prop_assert_eq!(out.len(), layout.header_len_bytes() + payload.len());
            let (decoded, total) = check_record(layout, &out).unwrap();
            prop_assert_eq!(total, out.len());
            let mut expected = header;
            expected.payload_len = payload.len() as u32;
            expected.crc32c = crc;
            prop_assert_eq!(decoded, expected);
            prop_assert_eq!(&out[layout.header_len_bytes()..], &payload[..]);
        }

        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for layout in Layout::ALL {
                let _ = check_record(layout, &bytes);
                let _ = RecordHeader::decode(layout, &bytes);
            }
        }

        #[test]
        fn a_flipped_bit_fails_the_crc(
            header in any_header(),
            payload in proptest::collection::vec(any::<u8>(), 1..64),
            bit in 0usize..8,
            pick in any::<prop::sample::Index>(),
        ) {
            let mut out = Vec::new();
            encode_record(&header, &payload, &mut out).unwrap();
            let at = pick.index(out.len());
            out[at] ^= 1 << bit;
            prop_assert!(check_record(header.layout(), &out).is_err());
        }

        #[test]
        fn padding_span_always_lands_on_a_boundary_and_fits_a_header(len in 0u64..100_000, align_pow in 7u32..14) {
            let align = 1u64 << align_pow;
            let span = padding_span_bytes(len, align);
            prop_assert_eq!((len + span) % align, 0);
            prop_assert!(span == 0 || span >= Layout::B.header_len_bytes() as u64);
        }
    }

    /// Layout B record, written out by hand from the header table of DESIGN section 6 (not by
    /// the encoder):
    /// record_type 0x8001 (required, kind 1), lsn 5, tenant 7, vshard 3, payload "hi",
    /// database 9, apply_key 0x0102030405060708, event_source 2, commit_hlc 0x1122334455667788.
    #[test]
    fn layout_b_record_matches_hand_written_bytes() {
        let mut expected: Vec<u8> = vec![
            0x57, 0x4E, 0x59, 0x53, // magic 0x53594E57 LE: "WNYS"
            0x01, 0x00, // version 1
            0x01, 0x80, 0x00, 0x00, // record_type 0x00008001
            0x05, 0, 0, 0, 0, 0, 0, 0, // lsn 5
            0x07, 0, 0, 0, 0, 0, 0, 0, // tenant 7
            0x03, 0, 0, 0, // vshard 3
            0x02, 0, 0, 0, // payload_len 2
            0x09, 0, 0, 0, 0, 0, 0, 0, // database 9
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // apply_key
            0x02, // event_source
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // commit_hlc
        ];
        assert_eq!(expected.len(), 59);
        let mut covered = expected.clone();
        covered.extend_from_slice(b"hi");
        let crc = crc32c(&covered);
        expected.extend_from_slice(&crc.to_le_bytes());
        expected.extend_from_slice(b"hi");

        let mut header = RecordHeader::new(Layout::B, 0x8001, Lsn(5), VShardId(3));
        header.tenant_id = 7;
        header.database_id = 9;
        header.fields =
            LayoutFields::B { apply_key: 0x0102_0304_0506_0708, event_source: 2, commit_hlc: 0x1122_3344_5566_7788 };
        let mut out = Vec::new();
        encode_record(&header, b"hi", &mut out).unwrap();
        assert_eq!(out, expected);
        let (decoded, total) = check_record(Layout::B, &expected).unwrap();
        assert_eq!(total, 65);
        assert_eq!(decoded.kind(), 1);
        assert!(decoded.is_required() && !decoded.is_encrypted());
    }

    /// A 100-byte layout B padding record, by hand: everything zero but magic, version,
    /// payload_len 37 and the CRC, then 37 zero bytes.
    #[test]
    fn layout_b_padding_matches_hand_written_bytes() {
        let mut expected = vec![0u8; 59];
        expected[0..4].copy_from_slice(&[0x57, 0x4E, 0x59, 0x53]);
        expected[4] = 1;
        expected[30] = 37;
        let mut covered = expected.clone();
        covered.extend_from_slice(&[0u8; 37]);
        expected.extend_from_slice(&crc32c(&covered).to_le_bytes());
        expected.extend_from_slice(&[0u8; 37]);
        assert_eq!(expected.len(), 100);

        let mut out = Vec::new();
        encode_padding(100, &mut out).unwrap();
        assert_eq!(out, expected);
        let (decoded, _) = check_record(Layout::B, &out).unwrap();
        assert!(decoded.is_padding());
        assert!(encode_padding(62, &mut Vec::new()).is_err());
    }

    #[test]
    fn padding_span_rule() {
        assert_eq!(padding_span_bytes(4096, 4096), 0);
        assert_eq!(padding_span_bytes(100, 4096), 3996);
        // 4090 leaves a 6-byte gap, smaller than a header: one more block.
        assert_eq!(padding_span_bytes(4090, 4096), 6 + 4096);
    }

    #[test]
    fn a_layout_a_record_does_not_check_out_as_layout_b() {
        let header = RecordHeader::new(Layout::A, 1, Lsn(1), VShardId(1));
        let mut out = Vec::new();
        encode_record(&header, &[7u8; 20], &mut out).unwrap();
        assert!(check_record(Layout::A, &out).is_ok());
        assert!(check_record(Layout::B, &out).is_err());
    }

    #[test]
    fn limits_are_checked_before_trust() {
        let mut header = RecordHeader::new(Layout::A, 1, Lsn(1), VShardId(1));
        header.payload_len = PAYLOAD_LEN_MAX_BYTES + 1;
        let mut out = Vec::new();
        header.encode_into(&mut out);
        assert!(matches!(RecordHeader::decode(Layout::A, &out), Err(FormatError::PayloadTooLong { .. })));
        out[4] = 2;
        assert!(matches!(RecordHeader::decode(Layout::A, &out), Err(FormatError::Version { found: 2 })));
    }
}
