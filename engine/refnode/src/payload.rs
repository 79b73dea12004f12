//! The payload of one reference write: who wrote it, checkable whole.
//!
//! What it does: encodes and decodes the 128-byte payload every reference write carries:
//!
//! ```text
//!  0         4              12                                   128
//!  +---------+--------------+------------------------------------+
//!  | vshard  | writer_seq   | filler                             |
//!  | u32 LE  | u64 LE       | 116 bytes of xorshift64* output    |
//!  +---------+--------------+------------------------------------+
//! ```
//! `vshard` names the vShard the write went to (it repeats the record header's `vshard_id`, so
//! a record whose header was rewritten is caught); `writer_seq` is the write's number in the
//! writer's schedule (0, 1, 2, ...), the identity the verifier counts; the filler is seeded
//! from both, so a payload with any byte changed, or glued from two writes, is refused.
//!
//! What it does not: carry a key or value a database would apply. The payload is the same
//! bytes `ferry demo`'s writer has always written, so the two can read each other's WALs.
//!
//! Invariant: [`decode_payload`] never panics and accepts only what [`encode_payload`] made.

use ferry_wire::VShardId;

use super::XorShift;

/// Bytes of every reference payload.
pub const PAYLOAD_LEN_BYTES: usize = 128;
/// Bytes of the (vshard, writer_seq) head before the filler.
const HEAD_LEN_BYTES: usize = 12;

/// Why bytes are not a reference payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("a reference payload is {PAYLOAD_LEN_BYTES} bytes, this one has {len_bytes}")]
    Length { len_bytes: usize },
    #[error(
        "payload of vShard {vshard} writer_seq {writer_seq} differs from what the writer wrote at byte {offset}: \
         the record was changed or is not a reference write"
    )]
    Filler { vshard: u32, writer_seq: u64, offset: usize },
}

/// The payload of write `writer_seq` to `vshard`.
pub fn encode_payload(vshard: VShardId, writer_seq: u64) -> [u8; PAYLOAD_LEN_BYTES] {
    let mut payload = [0u8; PAYLOAD_LEN_BYTES];
    let (head, filler) = payload.split_at_mut(HEAD_LEN_BYTES);
    let (vshard_bytes, seq_bytes) = head.split_at_mut(4);
    vshard_bytes.copy_from_slice(&vshard.0.to_le_bytes());
    seq_bytes.copy_from_slice(&writer_seq.to_le_bytes());
    XorShift::new(writer_seq ^ u64::from(vshard.0).rotate_left(48)).fill(filler);
    payload
}

/// (vshard, writer_seq) of a payload the writer wrote, checked whole.
pub fn decode_payload(payload: &[u8]) -> Result<(VShardId, u64), PayloadError> {
    let length = || PayloadError::Length { len_bytes: payload.len() };
    if payload.len() != PAYLOAD_LEN_BYTES {
        return Err(length());
    }
    let vshard = u32::from_le_bytes(payload.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(length)?);
    let writer_seq = u64::from_le_bytes(payload.get(4..12).and_then(|b| b.try_into().ok()).ok_or_else(length)?);
    let expected = encode_payload(VShardId(vshard), writer_seq);
    match payload.iter().zip(expected.iter()).position(|(a, b)| a != b) {
        None => Ok((VShardId(vshard), writer_seq)),
        Some(offset) => Err(PayloadError::Filler { vshard, writer_seq, offset }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for (vshard, seq) in [(0, 0), (7, 1), (3, 2), (u32::MAX, u64::MAX), (12, 123_456_789)] {
            let payload = encode_payload(VShardId(vshard), seq);
            assert_eq!(decode_payload(&payload), Ok((VShardId(vshard), seq)));
            assert_eq!(payload[..4], vshard.to_le_bytes());
            assert_eq!(payload[4..12], seq.to_le_bytes());
        }
        // Different writes have different fillers.
        assert_ne!(encode_payload(VShardId(7), 1)[12..], encode_payload(VShardId(7), 2)[12..]);
        assert_ne!(encode_payload(VShardId(7), 1)[12..], encode_payload(VShardId(8), 1)[12..]);
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let payload = encode_payload(VShardId(7), 4242);
        for at in 0..PAYLOAD_LEN_BYTES {
            let mut bad = payload;
            bad[at] ^= 0x01;
            let err = decode_payload(&bad).unwrap_err();
            assert!(matches!(err, PayloadError::Filler { .. }), "byte {at}: {err}");
        }
        // Head of one write glued to the filler of another.
        let mut glued = encode_payload(VShardId(7), 1);
        glued[12..].copy_from_slice(&encode_payload(VShardId(7), 2)[12..]);
        assert_eq!(decode_payload(&glued), Err(PayloadError::Filler { vshard: 7, writer_seq: 1, offset: 12 }));
    }

    #[test]
    fn wrong_lengths_are_refused_without_panicking() {
        let payload = encode_payload(VShardId(7), 9);
        for len in [0, 1, 4, 11, 12, PAYLOAD_LEN_BYTES - 1] {
            assert_eq!(decode_payload(&payload[..len]), Err(PayloadError::Length { len_bytes: len }));
        }
        let mut longer = payload.to_vec();
        longer.push(0);
        assert_eq!(decode_payload(&longer), Err(PayloadError::Length { len_bytes: PAYLOAD_LEN_BYTES + 1 }));
        assert!(decode_payload(&[]).unwrap_err().to_string().contains("128 bytes"));
    }
}
