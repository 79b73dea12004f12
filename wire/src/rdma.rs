//! The RDMA handshake: what each end tells the other, over the QUIC control stream, to connect
//! its reliable-connected queue pairs and to let the source write into the target's slots.
//!
//! What it does: encodes and decodes one [`RdmaHandshake`] (a list of lane endpoints), checking
//! every count against [`LANES_MAX`] and [`SLOTS_PER_LANE_MAX`] before it allocates.
//!
//! What it does not: create queue pairs or register memory (the engine's `transfer::rdma` does),
//! or decide how many lanes a transfer uses.
//!
//! Layout (little-endian), one handshake:
//! ```text
//! 0      1          3
//! | ver  | lanes u16 | lane 0 | lane 1 | ...
//!
//! lane:
//! 0         4         6          22              26          28
//! | qpn u32 | lid u16 | gid [16] | slot_len u32  | slots u16 | slot 0 | slot 1 | ...
//!
//! slot:
//! 0          8          12
//! | addr u64 | rkey u32 |
//! ```
//! `ver` lets a later layout be refused cleanly; `qpn`, `lid` and `gid` are what a queue pair
//! needs to reach its peer (RoCE uses the GID, InfiniBand the LID); `slot_len` and the slots
//! are the target's registered receive buffers (the source sends none: it only receives
//! credits, which carry no data).

use crate::limits::CHUNK_LEN_MAX_BYTES;

/// The layout this code writes and reads.
pub const HANDSHAKE_VERSION: u8 = 1;
/// Lanes (queue pairs) of one transfer: a chunk stream each, as QUIC's uni streams.
pub const LANES_MAX: usize = 64;
/// Receive slots per lane: chunks in flight on one lane.
pub const SLOTS_PER_LANE_MAX: usize = 64;
/// A slot holds one chunk frame: its 32-byte header and the largest chunk.
#[allow(clippy::cast_possible_truncation)] // a 32-byte header
pub const SLOT_LEN_MAX_BYTES: u32 = CHUNK_LEN_MAX_BYTES + crate::frame::HEADER_LEN_BYTES as u32;
/// The largest encoded handshake (every lane with every slot).
pub const HANDSHAKE_LEN_MAX_BYTES: usize = 3 + LANES_MAX * (LANE_FIXED_BYTES + SLOTS_PER_LANE_MAX * SLOT_BYTES);

const LANE_FIXED_BYTES: usize = 28;
const SLOT_BYTES: usize = 12;

/// A target slot the source may RDMA WRITE into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSlot {
    pub addr: u64,
    pub rkey: u32,
}

/// One end of one lane: its queue pair's address and, on the target, its receive slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneEndpoint {
    pub qpn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    pub slot_len_bytes: u32,
    pub slots: Vec<RemoteSlot>,
}

/// What one end sends the other: one endpoint per lane, in lane order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaHandshake {
    pub lanes: Vec<LaneEndpoint>,
}

/// Why a handshake's bytes were refused (the peer's fault: malformed bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdmaHandshakeError {
    #[error("rdma handshake: version {0} is not {HANDSHAKE_VERSION}; upgrade the older node")]
    Version(u8),
    #[error("rdma handshake: ends after {0} bytes, inside a field")]
    Truncated(usize),
    #[error("rdma handshake: {field} is {found}, over the limit of {max}")]
    OverLimit { field: &'static str, found: u64, max: u64 },
    #[error("rdma handshake: {0} bytes after the last lane")]
    Trailing(usize),
}

impl RdmaHandshake {
    /// The bytes of the handshake; fails (caller's misuse) when a count is over its limit.
    pub fn encode(&self) -> Result<Vec<u8>, RdmaHandshakeError> {
        let lanes_count = count_within("lanes", self.lanes.len(), LANES_MAX)?;
        let mut out = Vec::with_capacity(HANDSHAKE_LEN_MAX_BYTES.min(1024));
        out.push(HANDSHAKE_VERSION);
        out.extend_from_slice(&lanes_count.to_le_bytes());
        for lane in &self.lanes {
            let slots_count = count_within("slots", lane.slots.len(), SLOTS_PER_LANE_MAX)?;
            check_limit("slot length", u64::from(lane.slot_len_bytes), u64::from(SLOT_LEN_MAX_BYTES))?;
            out.extend_from_slice(&lane.qpn.to_le_bytes());
            out.extend_from_slice(&lane.lid.to_le_bytes());
            out.extend_from_slice(&lane.gid);
            out.extend_from_slice(&lane.slot_len_bytes.to_le_bytes());
            out.extend_from_slice(&slots_count.to_le_bytes());
            for slot in &lane.slots {
                out.extend_from_slice(&slot.addr.to_le_bytes());
                out.extend_from_slice(&slot.rkey.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Reads a handshake; never panics, and allocates only after a count passed its limit.
    pub fn decode(bytes: &[u8]) -> Result<Self, RdmaHandshakeError> {
        let mut reader = Reader { bytes, at: 0 };
        let version = reader.take::<1>()?[0];
        if version != HANDSHAKE_VERSION {
            return Err(RdmaHandshakeError::Version(version));
        }
        let lanes_count = usize::from(u16::from_le_bytes(reader.take()?));
        check_limit("lanes", lanes_count as u64, LANES_MAX as u64)?;
        let mut lanes = Vec::with_capacity(lanes_count);
        for _ in 0..lanes_count {
            let qpn = u32::from_le_bytes(reader.take()?);
            let lid = u16::from_le_bytes(reader.take()?);
            let gid = reader.take::<16>()?;
            let slot_len_bytes = u32::from_le_bytes(reader.take()?);
            check_limit("slot length", u64::from(slot_len_bytes), u64::from(SLOT_LEN_MAX_BYTES))?;
            let slots_count = usize::from(u16::from_le_bytes(reader.take()?));
            check_limit("slots", slots_count as u64, SLOTS_PER_LANE_MAX as u64)?;
            let mut slots = Vec::with_capacity(slots_count);
            for _ in 0..slots_count {
                let addr = u64::from_le_bytes(reader.take()?);
                let rkey = u32::from_le_bytes(reader.take()?);
                slots.push(RemoteSlot { addr, rkey });
            }
            lanes.push(LaneEndpoint { qpn, lid, gid, slot_len_bytes, slots });
        }
        match bytes.len() - reader.at {
            0 => Ok(Self { lanes }),
            trailing => Err(RdmaHandshakeError::Trailing(trailing)),
        }
    }
}

/// A count as its u16 field, when within `max` (every limit is below `u16::MAX`).
fn count_within(field: &'static str, count: usize, max: usize) -> Result<u16, RdmaHandshakeError> {
    check_limit(field, count as u64, max as u64)?;
    u16::try_from(count).map_err(|_| RdmaHandshakeError::OverLimit { field, found: count as u64, max: max as u64 })
}

fn check_limit(field: &'static str, found: u64, max: u64) -> Result<(), RdmaHandshakeError> {
    if found > max {
        return Err(RdmaHandshakeError::OverLimit { field, found, max });
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RdmaHandshakeError> {
        let end = self.at.checked_add(N).ok_or(RdmaHandshakeError::Truncated(self.at))?;
        let field = self.bytes.get(self.at..end).ok_or(RdmaHandshakeError::Truncated(self.at))?;
        let mut out = [0; N];
        out.copy_from_slice(field);
        self.at = end;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    fn sample() -> RdmaHandshake {
        let slots = (0..4).map(|i| RemoteSlot { addr: 0x1000 * i, rkey: 7 }).collect();
        RdmaHandshake {
            lanes: vec![
                LaneEndpoint { qpn: 0x11, lid: 3, gid: [9; 16], slot_len_bytes: 4096, slots },
                LaneEndpoint { qpn: 0x12, lid: 3, gid: [9; 16], slot_len_bytes: 0, slots: Vec::new() },
            ],
        }
    }

    #[test]
    fn a_handshake_decodes_to_what_was_encoded() {
        let bytes = sample().encode().unwrap();
        assert_eq!(bytes.len(), 3 + 2 * LANE_FIXED_BYTES + 4 * SLOT_BYTES);
        assert_eq!(RdmaHandshake::decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn bad_bytes_are_refused_by_name() {
        let bytes = sample().encode().unwrap();
        assert_eq!(RdmaHandshake::decode(&bytes[..10]), Err(RdmaHandshakeError::Truncated(9)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(RdmaHandshake::decode(&trailing), Err(RdmaHandshakeError::Trailing(1)));
        let mut version = bytes.clone();
        version[0] = 2;
        assert_eq!(RdmaHandshake::decode(&version), Err(RdmaHandshakeError::Version(2)));
        // A lane count over the limit is refused before anything is allocated for it.
        let many = [HANDSHAKE_VERSION, 0xff, 0xff];
        assert!(matches!(RdmaHandshake::decode(&many), Err(RdmaHandshakeError::OverLimit { field: "lanes", .. })));
        let mut long_slot = sample();
        long_slot.lanes[0].slot_len_bytes = SLOT_LEN_MAX_BYTES + 1;
        assert!(long_slot.encode().is_err());
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RdmaHandshake::decode(&bytes);
        }

        #[test]
        fn every_handshake_within_limits_round_trips(
            lanes in proptest::collection::vec(
                (any::<u32>(), any::<u16>(), any::<[u8; 16]>(), 0..=SLOT_LEN_MAX_BYTES,
                 proptest::collection::vec((any::<u64>(), any::<u32>()), 0..8)),
                0..8,
            )
        ) {
            let handshake = RdmaHandshake {
                lanes: lanes.into_iter().map(|(qpn, lid, gid, slot_len_bytes, slots)| LaneEndpoint {
                    qpn, lid, gid, slot_len_bytes,
                    slots: slots.into_iter().map(|(addr, rkey)| RemoteSlot { addr, rkey }).collect(),
                }).collect(),
            };
            prop_assert_eq!(RdmaHandshake::decode(&handshake.encode().unwrap()).unwrap(), handshake);
        }
    }
}
