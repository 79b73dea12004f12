//! The 16-byte segment preamble that NodeDB writes at offset 0 of segments written with
//! encryption on.
//!
//! What it does: decodes and encodes the preamble, and tells whether a segment starts with one.
//!
//! What it does not: decrypt anything. The preamble is associated data of every encrypted
//! payload in its segment, so ferry copies it byte for byte to the start of every staged
//! segment holding records from that source segment, and records `key_id` in the manifest.
//!
//! ```text
//!  0       4         6            7        8        12         16
//!  +-------+---------+------------+--------+--------+----------+
//!  | "WALP"| version | cipher_alg | key_id | epoch  | reserved |
//!  |       | u16 = 1 | u8         | u8     | [4]    | [4]      |
//!  +-------+---------+------------+--------+--------+----------+
//! ```
//! `version` lets the format grow; `cipher_alg` names the AEAD (AES-256-GCM); `key_id` picks
//! the key of the key ring; `epoch` changes at every roll and is part of each payload's nonce
//! (with the LSN), so nonces never repeat across segments; `reserved` is carried as is.
//! A record never starts with "WALP" (record magic "SYNW" is stored as "WNYS"), so the two
//! cannot be confused.

use super::FormatError;

/// Preamble size, in bytes.
pub const PREAMBLE_LEN_BYTES: usize = 16;
/// Preamble magic, as stored.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"WALP";
/// The only preamble version.
pub const PREAMBLE_VERSION: u16 = 1;

/// A decoded segment preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Preamble {
    pub version: u16,
    pub cipher_alg: u8,
    pub key_id: u8,
    pub epoch: [u8; 4],
    pub reserved: [u8; 4],
}

impl Preamble {
    /// A version-1 preamble with zero reserved bytes.
    pub fn new(cipher_alg: u8, key_id: u8, epoch: [u8; 4]) -> Self {
        Preamble { version: PREAMBLE_VERSION, cipher_alg, key_id, epoch, reserved: [0; 4] }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN_BYTES] {
        let mut out = [0u8; PREAMBLE_LEN_BYTES];
        out[0..4].copy_from_slice(&PREAMBLE_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6] = self.cipher_alg;
        out[7] = self.key_id;
        out[8..12].copy_from_slice(&self.epoch);
        out[12..16].copy_from_slice(&self.reserved);
        out
    }

    /// Whether `segment_start` (a segment's first bytes) begins with the preamble magic.
    /// Needs 4 bytes to say yes.
    pub fn is_present(segment_start: &[u8]) -> bool {
        segment_start.get(..4) == Some(&PREAMBLE_MAGIC[..])
    }

    /// Decodes the preamble at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Preamble, FormatError> {
        let Some(p) = bytes.get(..PREAMBLE_LEN_BYTES) else {
            return Err(FormatError::Truncated { need_bytes: PREAMBLE_LEN_BYTES, have_bytes: bytes.len() });
        };
        let mut b = [0u8; PREAMBLE_LEN_BYTES];
        b.copy_from_slice(p);
        if b[0..4] != PREAMBLE_MAGIC {
            return Err(FormatError::PreambleMagic);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PREAMBLE_VERSION {
            return Err(FormatError::PreambleVersion { found: version });
        }
        Ok(Preamble {
            version,
            cipher_alg: b[6],
            key_id: b[7],
            epoch: [b[8], b[9], b[10], b[11]],
            reserved: [b[12], b[13], b[14], b[15]],
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_written_preamble_decodes() {
        let bytes = [b'W', b'A', b'L', b'P', 1, 0, 2, 9, 0xA, 0xB, 0xC, 0xD, 0, 0, 0, 0];
        let p = Preamble::decode(&bytes).unwrap();
        assert_eq!(p, Preamble::new(2, 9, [0xA, 0xB, 0xC, 0xD]));
        assert_eq!(p.encode(), bytes);
        assert!(Preamble::is_present(&bytes));
        assert!(!Preamble::is_present(b"WNYS"));
    }

    #[test]
    fn bad_preambles_are_refused() {
        let mut bytes = Preamble::new(1, 1, [0; 4]).encode();
        assert!(Preamble::decode(&bytes[..15]).is_err());
        bytes[4] = 2;
        assert_eq!(Preamble::decode(&bytes), Err(FormatError::PreambleVersion { found: 2 }));
        bytes[0] = b'X';
        assert_eq!(Preamble::decode(&bytes), Err(FormatError::PreambleMagic));
    }

    proptest! {
        #[test]
        fn preamble_round_trips(alg in any::<u8>(), key in any::<u8>(), epoch in any::<[u8; 4]>(), reserved in any::<[u8; 4]>()) {
            let mut p = Preamble::new(alg, key, epoch);
            p.reserved = reserved;
            prop_assert_eq!(Preamble::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Preamble::decode(&bytes);
        }
    }
}
