//! The target's chunk log: what a resumed transfer may trust (DESIGN section 8).
//!
//! What it does: encodes and replays the append-only log the target keeps in
//! `.ferry/chunks.log` for each migration. Each chunk's receipt and verification, and each
//! file's staging, is one fixed-size record with its own CRC32C; a header binds the log to
//! one offer (by digest), so a log never applies to another transfer.
//!
//! What it does not: trust itself. A record says a chunk *was* written with a CRC; the engine
//! re-reads the chunk and checks that CRC before it marks the chunk verified again, because
//! records may reach the disk before the data they describe (they are synced in batches,
//! data first, but unsynced pages can be written back in any order).
//!
//! ```text
//! header, 32 bytes:
//!   0..8 magic "FRYCHKL1" | 8..12 format_version u32 = 1 | 12..16 offer_digest u32
//!   16..28 reserved (zero) | 28..32 header_crc32c u32 over 0..28
//! record, 24 bytes:
//!   0 kind u8 (1 receiving, 2 verified, 3 staged) | 1..4 reserved | 4..8 file_index u32
//!   8..16 chunk_index u64 (0 for staged) | 16..20 value u32 | 20..24 record_crc32c over 0..20
//!   value: receiving -> chunk length in bytes (counts bytes received, for bytes_resent);
//!          verified  -> the chunk's CRC32C; staged -> the whole file's CRC32C.
//! ```
//! A record that does not check out ends the replay: it is a torn tail, and the engine
//! truncates the log there before appending.

use std::collections::BTreeMap;

use crate::message::Offer;

pub const LOG_MAGIC: [u8; 8] = *b"FRYCHKL1";
pub const LOG_FORMAT_VERSION: u32 = 1;
pub const LOG_HEADER_LEN_BYTES: usize = 32;
pub const LOG_RECORD_LEN_BYTES: usize = 24;

/// One log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRecord {
    /// A chunk's header arrived; its body is being read.
    Receiving { file_index: u32, chunk_index: u64, len_bytes: u32 },
    /// A chunk was written at its offset; its bytes have this CRC32C.
    Verified { file_index: u32, chunk_index: u64, crc32c: u32 },
    /// A whole file was verified and renamed into `segments/`.
    Staged { file_index: u32, crc32c: u32 },
}

impl LogRecord {
    pub fn encode(&self) -> [u8; LOG_RECORD_LEN_BYTES] {
        let (kind, file_index, chunk_index, value) = match *self {
            Self::Receiving { file_index, chunk_index, len_bytes } => (1u8, file_index, chunk_index, len_bytes),
            Self::Verified { file_index, chunk_index, crc32c } => (2, file_index, chunk_index, crc32c),
            Self::Staged { file_index, crc32c } => (3, file_index, 0, crc32c),
        };
        let mut out = [0u8; LOG_RECORD_LEN_BYTES];
        out[0] = kind;
        out[4..8].copy_from_slice(&file_index.to_le_bytes());
        out[8..16].copy_from_slice(&chunk_index.to_le_bytes());
        out[16..20].copy_from_slice(&value.to_le_bytes());
        let crc = crate::crc32c(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record; `None` when it does not check out.
    pub fn decode(bytes: &[u8; LOG_RECORD_LEN_BYTES]) -> Option<Self> {
        let le32 = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if le32(20) != crate::crc32c(&bytes[..20]) || bytes[1..4] != [0, 0, 0] {
            return None;
        }
        let mut chunk = [0u8; 8];
        chunk.copy_from_slice(&bytes[8..16]);
        let (file_index, chunk_index, value) = (le32(4), u64::from_le_bytes(chunk), le32(16));
        match bytes[0] {
            1 => Some(Self::Receiving { file_index, chunk_index, len_bytes: value }),
            2 => Some(Self::Verified { file_index, chunk_index, crc32c: value }),
            3 if chunk_index == 0 => Some(Self::Staged { file_index, crc32c: value }),
            _ => None,
        }
    }
}

/// The digest that binds a log to an offer: everything that decides where chunks go.
pub fn offer_digest(offer: &Offer) -> u32 {
    let mut crc = crate::crc32c(offer.migration_id.as_str().as_bytes());
    crc = crate::crc32c_append(crc, &offer.vshard_id.0.to_le_bytes());
    crc = crate::crc32c_append(crc, &offer.base_lsn.0.to_le_bytes());
    crc = crate::crc32c_append(crc, &offer.chunk_len_bytes.to_le_bytes());
    for file in &offer.files {
        crc = crate::crc32c_append(crc, file.path.as_str().as_bytes());
        crc = crate::crc32c_append(crc, &[0]);
        crc = crate::crc32c_append(crc, &file.size_bytes.to_le_bytes());
    }
    crc
}

pub fn encode_header(offer_digest: u32) -> [u8; LOG_HEADER_LEN_BYTES] {
    let mut out = [0u8; LOG_HEADER_LEN_BYTES];
    out[0..8].copy_from_slice(&LOG_MAGIC);
    out[8..12].copy_from_slice(&LOG_FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&offer_digest.to_le_bytes());
    let crc = crate::crc32c(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What a log says, before the engine re-checks the bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The last CRC recorded for each written chunk.
    pub verified: BTreeMap<(u32, u64), u32>,
    /// Files staged, with their CRC32C.
    pub staged: BTreeMap<u32, u32>,
    /// Chunk bytes received over every run so far.
    pub bytes_received: u64,
    /// Bytes of the log that checked out; the engine truncates the log here.
    pub valid_len_bytes: u64,
}

/// Why a log cannot be used at all (it is then started afresh).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("chunk log header is missing or corrupt")]
    Header,
    #[error("chunk log has format version {0}, this ferry reads {LOG_FORMAT_VERSION}")]
    Version(u32),
    #[error("chunk log belongs to another offer (digest {found:#010x}, expected {expected:#010x})")]
    OtherOffer { found: u32, expected: u32 },
}

/// Replays a log's bytes for the offer with `expected_digest`.
pub fn replay(bytes: &[u8], expected_digest: u32) -> Result<Replay, LogError> {
    let header = bytes.get(..LOG_HEADER_LEN_BYTES).ok_or(LogError::Header)?;
    let le32 = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    if header[..8] != LOG_MAGIC || le32(28) != crate::crc32c(&header[..28]) {
        return Err(LogError::Header);
    }
    if le32(8) != LOG_FORMAT_VERSION {
        return Err(LogError::Version(le32(8)));
    }
    if le32(12) != expected_digest {
        return Err(LogError::OtherOffer { found: le32(12), expected: expected_digest });
    }
    let mut out = Replay { valid_len_bytes: LOG_HEADER_LEN_BYTES as u64, ..Replay::default() };
    for record in bytes[LOG_HEADER_LEN_BYTES..].chunks_exact(LOG_RECORD_LEN_BYTES) {
        let mut fixed = [0u8; LOG_RECORD_LEN_BYTES];
        fixed.copy_from_slice(record);
        let Some(record) = LogRecord::decode(&fixed) else { break };
        match record {
            LogRecord::Receiving { len_bytes, .. } => {
                out.bytes_received = out.bytes_received.saturating_add(u64::from(len_bytes));
            }
            LogRecord::Verified { file_index, chunk_index, crc32c } => {
                out.verified.insert((file_index, chunk_index), crc32c);
            }
            LogRecord::Staged { file_index, crc32c } => {
                out.staged.insert(file_index, crc32c);
            }
        }
        out.valid_len_bytes += LOG_RECORD_LEN_BYTES as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn log(records: &[LogRecord]) -> Vec<u8> {
        let mut out = encode_header(7).to_vec();
        for r in records {
            out.extend_from_slice(&r.encode());
        }
        out
    }

    #[test]
    fn replays_what_was_logged_and_stops_at_a_torn_tail() {
        let records = [
            LogRecord::Receiving { file_index: 0, chunk_index: 1, len_bytes: 4096 },
            LogRecord::Verified { file_index: 0, chunk_index: 1, crc32c: 11 },
            LogRecord::Receiving { file_index: 0, chunk_index: 1, len_bytes: 4096 },
            LogRecord::Verified { file_index: 0, chunk_index: 1, crc32c: 12 },
            LogRecord::Staged { file_index: 2, crc32c: 99 },
        ];
        let mut bytes = log(&records);
        let full = replay(&bytes, 7).unwrap();
        assert_eq!(full.verified.get(&(0, 1)), Some(&12));
        assert_eq!(full.staged.get(&2), Some(&99));
        assert_eq!(full.bytes_received, 8192);
        assert_eq!(full.valid_len_bytes, bytes.len() as u64);
        // A torn last record and a half-written one after it are ignored.
        let last = bytes.len() - 3;
        bytes[last] ^= 0xFF;
        bytes.extend_from_slice(&[1, 2, 3]);
        let torn = replay(&bytes, 7).unwrap();
        assert!(torn.staged.is_empty());
        assert_eq!(torn.valid_len_bytes, (LOG_HEADER_LEN_BYTES + 4 * LOG_RECORD_LEN_BYTES) as u64);
    }

    #[test]
    fn a_log_of_another_offer_or_format_is_refused() {
        let bytes = log(&[]);
        assert_eq!(replay(&bytes, 8), Err(LogError::OtherOffer { found: 7, expected: 8 }));
        assert_eq!(replay(&bytes[..10], 7), Err(LogError::Header));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(replay(&bad, 7), Err(LogError::Header));
    }

    proptest! {
        #[test]
        fn records_round_trip(file in any::<u32>(), chunk in any::<u64>(), value in any::<u32>(), kind in 0u8..3) {
            let record = match kind {
                0 => LogRecord::Receiving { file_index: file, chunk_index: chunk, len_bytes: value },
                1 => LogRecord::Verified { file_index: file, chunk_index: chunk, crc32c: value },
                _ => LogRecord::Staged { file_index: file, crc32c: value },
            };
            prop_assert_eq!(LogRecord::decode(&record.encode()), Some(record));
        }

        #[test]
        fn any_bytes_replay_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = replay(&bytes, 7);
            let mut with_header = encode_header(7).to_vec();
            with_header.extend_from_slice(&bytes);
            prop_assert!(replay(&with_header, 7).is_ok());
        }
    }
}
