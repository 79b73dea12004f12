//! The WAL stream's batch codec: the vShard's records, LSN-tagged, from source to target.
//!
//! What it does: encodes and decodes the body of a [`FrameKind::WalBatch`] frame, a sequence
//! of records each carried exactly as the source WAL holds it (header and payload, opaque:
//! encrypted payloads stay encrypted), with its LSN and the preamble of the source segment it
//! came from (the target starts each staged segment with it). Decoding borrows from the body
//! and checks every length before using it.
//!
//! ```text
//! record: lsn u64 | flags u8 (bit 0: preamble present, others zero) | [preamble 16 bytes]
//!         | record_len_bytes u32 | record bytes
//! ```
//!
//! What it does not: check the records themselves (the source's tail checks each record's CRC
//! as it reads it; the frame's body CRC covers the batch on the way; the target's staged WAL
//! checks headers, lengths and order) or decide what to send (the tail cursor and the
//! selection do).
//!
//! [`FrameKind::WalBatch`]: crate::frame::FrameKind::WalBatch

use crate::ids::Lsn;
use crate::limits::WAL_BATCH_BODY_LEN_MAX_BYTES;
use crate::wal::PREAMBLE_LEN_BYTES;

/// One record of a batch, borrowed from the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalBatchRecord<'a> {
    pub lsn: Lsn,
    pub source_preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
    pub bytes: &'a [u8],
}

/// A batch body that does not decode: malformed bytes from the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalBatchError {
    #[error("wal batch ends inside a record at byte {0}")]
    Truncated(usize),
    #[error("wal batch record at byte {0} has unknown flags")]
    Flags(usize),
    #[error("wal batch record at byte {at} claims {len} bytes, more than the batch holds")]
    Length { at: usize, len: u64 },
    #[error("wal batch LSNs are not strictly increasing at byte {0}")]
    Order(usize),
}

/// Bytes a record takes in a batch.
pub fn encoded_len_bytes(record: &WalBatchRecord<'_>) -> usize {
    8 + 1 + if record.source_preamble.is_some() { PREAMBLE_LEN_BYTES } else { 0 } + 4 + record.bytes.len()
}

/// Appends one record to a batch body. Returns `false` (and appends nothing) when the record
/// would take the body over the limit; a record alone always fits (records are at most
/// 64 MiB plus a header).
pub fn push(body: &mut Vec<u8>, record: &WalBatchRecord<'_>) -> bool {
    let Ok(len) = u32::try_from(record.bytes.len()) else { return false };
    if body.len() + encoded_len_bytes(record) > WAL_BATCH_BODY_LEN_MAX_BYTES as usize {
        return false;
    }
    body.extend_from_slice(&record.lsn.0.to_le_bytes());
    match &record.source_preamble {
        Some(preamble) => {
            body.push(1);
            body.extend_from_slice(preamble);
        }
        None => body.push(0),
    }
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(record.bytes);
    true
}

/// Decodes a batch body.
pub fn decode(body: &[u8]) -> Result<Vec<WalBatchRecord<'_>>, WalBatchError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut last: Option<Lsn> = None;
    while at < body.len() {
        let start = at;
        let take = |at: &mut usize, n: usize| -> Result<&[u8], WalBatchError> {
            let slice = body.get(*at..at.saturating_add(n)).ok_or(WalBatchError::Truncated(start))?;
            *at += n;
            Ok(slice)
        };
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(take(&mut at, 8)?);
        let lsn = Lsn(u64::from_le_bytes(lsn));
        let flags = take(&mut at, 1)?[0];
        let source_preamble = match flags {
            0 => None,
            1 => {
                let mut preamble = [0u8; PREAMBLE_LEN_BYTES];
                preamble.copy_from_slice(take(&mut at, PREAMBLE_LEN_BYTES)?);
                Some(preamble)
            }
            _ => return Err(WalBatchError::Flags(start)),
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(take(&mut at, 4)?);
        let len = u32::from_le_bytes(len);
        if body.len() - at < len as usize {
            return Err(WalBatchError::Length { at: start, len: u64::from(len) });
        }
        let bytes = take(&mut at, len as usize)?;
        if last.is_some_and(|l| lsn <= l) {
            return Err(WalBatchError::Order(start));
        }
        last = Some(lsn);
        out.push(WalBatchRecord { lsn, source_preamble, bytes });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batches_round_trip(records in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            let mut body = Vec::new();
            let owned: Vec<(Lsn, Option<[u8; 16]>, Vec<u8>)> = records
                .into_iter()
                .enumerate()
                .map(|(i, (p, bytes))| (Lsn(10 + 3 * i as u64), p.then_some([i as u8; 16]), bytes))
                .collect();
            for (lsn, preamble, bytes) in &owned {
                let record = WalBatchRecord { lsn: *lsn, source_preamble: *preamble, bytes };
                prop_assert!(push(&mut body, &record));
            }
            let decoded = decode(&body).unwrap();
            prop_assert_eq!(decoded.len(), owned.len());
            for (d, (lsn, preamble, bytes)) in decoded.iter().zip(&owned) {
                prop_assert_eq!(d.lsn, *lsn);
                prop_assert_eq!(d.source_preamble, *preamble);
                prop_assert_eq!(d.bytes, &bytes[..]);
            }
        }

        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn out_of_order_and_oversized_records_are_refused() {
        let mut body = Vec::new();
        push(&mut body, &WalBatchRecord { lsn: Lsn(5), source_preamble: None, bytes: b"a" });
        push(&mut body, &WalBatchRecord { lsn: Lsn(5), source_preamble: None, bytes: b"b" });
        assert!(matches!(decode(&body), Err(WalBatchError::Order(_))));
        let mut bad = Vec::new();
        bad.extend_from_slice(&1u64.to_le_bytes());
        bad.push(0);
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(WalBatchError::Length { .. })));
    }
}
