//! The frame codec: every byte ferry sends over QUIC is inside a frame.
//!
//! What it does: encodes and decodes the 32-byte frame header, checks its own CRC32C, its
//! kind, its reserved bytes and its body length against [`limits`](crate::limits) (before
//! anything is allocated), and checks a body against the header's body CRC32C.
//!
//! What it does not: read sockets, or interpret bodies. Control bodies are decoded by
//! [`message`](crate::message); chunk bodies are opaque file bytes.
//!
//! ```text
//!  0        4    5     6          8          12                16                  24          28          32
//!  +--------+----+-----+----------+----------+-----------------+-------------------+-----------+-----------+
//!  | magic  |kind|flags| reserved | body_len | chunk_file_index| chunk_offset_bytes| body_crc  |header_crc |
//!  | "FRY1" | u8 | u8=0| u16 = 0  | u32      | u32             | u64               | u32 CRC32C| u32 CRC32C|
//!  +--------+----+-----+----------+----------+-----------------+-------------------+-----------+-----------+
//! ```
//! All integers little-endian. `magic` finds desynchronised streams fast. `kind` says how
//! to read the body. `flags` and `reserved` must be zero, so later versions can use them.
//! `body_len` is checked against the kind's limit before the body is read. The two chunk
//! fields place a chunk in its file (zero for other kinds) and sit in the header so chunk
//! bodies are the file's bytes exactly: `body_crc` of a chunk *is* the chunk's CRC32C
//! computed from the source file, which the target checks against the bytes it writes.
//! `header_crc` covers bytes 0..28, so a corrupted length is caught before it is trusted.

use crate::limits::{CHUNK_LEN_MAX_BYTES, CONTROL_BODY_LEN_MAX_BYTES, WAL_BATCH_BODY_LEN_MAX_BYTES};

/// The protocol version this build speaks, exchanged in the first frame of a connection; peers
/// of different versions refuse each other. 2: a `Fence` names `through_lsn` and the target
/// waits for its staged WAL to be durable up to it (a version-1 target would fence without
/// waiting, before the last records are durable).
pub const PROTOCOL_VERSION: u16 = 2;
/// Frame magic: "FRY1" as little-endian bytes.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// Size of the frame header, in bytes.
pub const HEADER_LEN_BYTES: usize = 32;

/// What a frame's body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A control message ([`crate::message::Message`]), JSON-encoded.
    Control = 1,
    /// A chunk of a segment file: raw bytes at (`chunk_file_index`, `chunk_offset_bytes`).
    Chunk = 2,
    /// A batch of WAL records ([`crate::walstream`]).
    WalBatch = 3,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Control),
            2 => Some(Self::Chunk),
            3 => Some(Self::WalBatch),
            _ => None,
        }
    }

    /// The largest body this kind may carry.
    pub fn body_len_max_bytes(self) -> u32 {
        match self {
            Self::Control => CONTROL_BODY_LEN_MAX_BYTES,
            Self::Chunk => CHUNK_LEN_MAX_BYTES,
            Self::WalBatch => WAL_BATCH_BODY_LEN_MAX_BYTES,
        }
    }
}

/// Malformed frame bytes: the peer (or something between) sent bytes that are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x}: the peer is not speaking ferry/1 or the stream is out of step")]
    Magic { found: u32 },
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame flags or reserved bytes are not zero")]
    Reserved,
    #[error("frame body of {len} bytes is over the limit of {max} bytes for {kind:?} frames")]
    BodyTooLong { kind: FrameKind, len: u32, max: u32 },
    #[error("a {0:?} frame carries chunk position fields; only chunk frames may")]
    StrayChunkFields(FrameKind),
    #[error("frame body checksum mismatch (header says {expected:#010x}, body has {computed:#010x})")]
    BodyCrc { expected: u32, computed: u32 },
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub body_len_bytes: u32,
    pub chunk_file_index: u32,
    pub chunk_offset_bytes: u64,
    pub body_crc32c: u32,
}

impl FrameHeader {
    /// The header of a control frame carrying `body`.
    pub fn control(body: &[u8]) -> Result<Self, FrameError> {
        Self::new(FrameKind::Control, body.len(), 0, 0, crate::crc32c(body))
    }

    /// The header of a WAL batch frame carrying `body`.
    pub fn wal_batch(body: &[u8]) -> Result<Self, FrameError> {
        Self::new(FrameKind::WalBatch, body.len(), 0, 0, crate::crc32c(body))
    }

    /// The header of a chunk frame; `body_crc32c` is the chunk's CRC32C as read at the source.
    pub fn chunk(file_index: u32, offset_bytes: u64, len_bytes: usize, body_crc32c: u32) -> Result<Self, FrameError> {
        Self::new(FrameKind::Chunk, len_bytes, file_index, offset_bytes, body_crc32c)
    }

    fn new(
        kind: FrameKind,
        len_bytes: usize,
        chunk_file_index: u32,
        chunk_offset_bytes: u64,
        body_crc32c: u32,
    ) -> Result<Self, FrameError> {
        let max = kind.body_len_max_bytes();
        let body_len_bytes = u32::try_from(len_bytes)
            .ok()
            .filter(|len| *len <= max)
            .ok_or(FrameError::BodyTooLong { kind, len: u32::MAX, max })?;
        Ok(Self { kind, body_len_bytes, chunk_file_index, chunk_offset_bytes, body_crc32c })
    }

    /// Encodes the header, computing its own checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN_BYTES] {
        let mut out = [0u8; HEADER_LEN_BYTES];
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4] = self.kind as u8;
        out[8..12].copy_from_slice(&self.body_len_bytes.to_le_bytes());
        out[12..16].copy_from_slice(&self.chunk_file_index.to_le_bytes());
        out[16..24].copy_from_slice(&self.chunk_offset_bytes.to_le_bytes());
        out[24..28].copy_from_slice(&self.body_crc32c.to_le_bytes());
        let crc = crate::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header. Never panics, never allocates.
    pub fn decode(bytes: &[u8; HEADER_LEN_BYTES]) -> Result<Self, FrameError> {
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::Magic { found: magic });
        }
        let stored = u32_at(28);
        let computed = crate::crc32c(&bytes[0..28]);
        if stored != computed {
            return Err(FrameError::HeaderCrc { stored, computed });
        }
        let kind = FrameKind::from_u8(bytes[4]).ok_or(FrameError::Kind(bytes[4]))?;
        if bytes[5] != 0 || bytes[6] != 0 || bytes[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let body_len_bytes = u32_at(8);
        let max = kind.body_len_max_bytes();
        if body_len_bytes > max {
            return Err(FrameError::BodyTooLong { kind, len: body_len_bytes, max });
        }
        let chunk_file_index = u32_at(12);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&bytes[16..24]);
        let chunk_offset_bytes = u64::from_le_bytes(offset);
        if kind != FrameKind::Chunk && (chunk_file_index != 0 || chunk_offset_bytes != 0) {
            return Err(FrameError::StrayChunkFields(kind));
        }
        Ok(Self { kind, body_len_bytes, chunk_file_index, chunk_offset_bytes, body_crc32c: u32_at(24) })
    }

    /// Checks a body against this header's length and checksum.
    pub fn check_body(&self, body: &[u8]) -> Result<(), FrameError> {
        let computed = crate::crc32c(body);
        if body.len() != self.body_len_bytes as usize || computed != self.body_crc32c {
            return Err(FrameError::BodyCrc { expected: self.body_crc32c, computed });
        }
        Ok(())
    }
}

/// The result of looking for one frame at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many more bytes are needed.
    NeedMore { missing_bytes: usize },
    /// A whole, checked frame: its header and where its body lies in the buffer.
    Frame { header: FrameHeader, body: std::ops::Range<usize> },
}

/// Looks for one whole frame at the start of `buf`, checking header and body.
pub fn decode(buf: &[u8]) -> Result<Decoded, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN_BYTES) else {
        return Ok(Decoded::NeedMore { missing_bytes: HEADER_LEN_BYTES - buf.len() });
    };
    let mut header_bytes = [0u8; HEADER_LEN_BYTES];
    header_bytes.copy_from_slice(head);
    let header = FrameHeader::decode(&header_bytes)?;
    let end = HEADER_LEN_BYTES + header.body_len_bytes as usize;
    match buf.get(HEADER_LEN_BYTES..end) {
        None => Ok(Decoded::NeedMore { missing_bytes: end - buf.len() }),
        Some(body) => {
            header.check_body(body)?;
            Ok(Decoded::Frame { header, body: HEADER_LEN_BYTES..end })
        }
    }
}

/// Encodes a whole control frame (header then body) into one buffer.
pub fn encode_control(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = FrameHeader::control(body)?;
    let mut out = Vec::with_capacity(HEADER_LEN_BYTES + body.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_frame_round_trips() {
        let framed = encode_control(b"{\"x\":1}").unwrap();
        match decode(&framed).unwrap() {
            Decoded::Frame { header, body } => {
                assert_eq!(header.kind, FrameKind::Control);
                assert_eq!(&framed[body], b"{\"x\":1}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partial_frames_ask_for_the_rest() {
        let framed = encode_control(b"hello").unwrap();
        assert_eq!(decode(&framed[..10]).unwrap(), Decoded::NeedMore { missing_bytes: 22 });
        assert_eq!(decode(&framed[..33]).unwrap(), Decoded::NeedMore { missing_bytes: 4 });
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let framed = encode_control(b"payload").unwrap();
        for bit in 0..framed.len() * 8 {
            let mut bad = framed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad).is_err(), "flip of bit {bit} not caught");
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocation() {
        let mut header = FrameHeader::control(b"").unwrap();
        header.body_len_bytes = CONTROL_BODY_LEN_MAX_BYTES + 1;
        let err = FrameHeader::decode(&header.encode()).unwrap_err();
        assert!(matches!(err, FrameError::BodyTooLong { .. }));
        let chunk = FrameHeader { kind: FrameKind::Chunk, body_len_bytes: CHUNK_LEN_MAX_BYTES + 1, ..header };
        assert!(matches!(FrameHeader::decode(&chunk.encode()), Err(FrameError::BodyTooLong { .. })));
    }

    #[test]
    fn control_frames_may_not_carry_chunk_fields() {
        let mut header = FrameHeader::control(b"").unwrap();
        header.chunk_offset_bytes = 7;
        assert_eq!(FrameHeader::decode(&header.encode()), Err(FrameError::StrayChunkFields(FrameKind::Control)));
    }

    proptest! {
        #[test]
        fn chunk_headers_round_trip(file in any::<u32>(), offset in any::<u64>(), len in 0usize..=CHUNK_LEN_MAX_BYTES as usize, crc in any::<u32>()) {
            let header = FrameHeader::chunk(file, offset, len, crc).unwrap();
            prop_assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
        }

        #[test]
        fn control_frames_round_trip(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let framed = encode_control(&body).unwrap();
            match decode(&framed).unwrap() {
                Decoded::Frame { body: range, .. } => prop_assert_eq!(&framed[range], &body[..]),
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
