//! Two-slot framing of a small record that is rewritten in place (an outbound migration's
//! phase record).
//!
//! What it does: lays out a file as two equal slots, each `header | payload | stale bytes`.
//! The header holds a magic, a sequence number, the payload's length and a CRC32C over the
//! header's first 20 bytes and the payload. A new record goes to the slot that does not hold
//! the newest valid record, with the next sequence number, so a write torn by a crash leaves
//! the record before it intact; a read takes the valid slot with the highest sequence. The
//! file's size never changes between rewrites, so an in-place write's fdatasync flushes data
//! only, where a temp file and a rename cost two journal commits (the new file's blocks, then
//! the folder).
//!
//! What it does not: any I/O (the engine writes the bytes at the offset given and syncs), or
//! interpret the payload (it has its own checksum and version).
//!
//! Invariant: [`next_write`] never targets the slot holding the newest valid record.

/// Header bytes in front of each slot's payload: magic (8) | sequence u64 LE | payload length
/// u32 LE | CRC32C u32 LE.
pub const SLOT_HEADER_LEN_BYTES: usize = 24;
/// Slots are whole 4 KiB blocks, so a rewrite never shares a block with the other slot.
pub const SLOT_ALIGN_BYTES: usize = 4096;
/// The smallest slot: room for a record to grow after the file is made.
pub const SLOT_LEN_MIN_BYTES: usize = 16 * 1024;
/// The largest slot a file may declare through its size (bounds what a reader trusts).
pub const SLOT_LEN_MAX_BYTES: usize = 4 << 20;

const SLOT_MAGIC: &[u8; 8] = b"FERRYSL\n";

/// A slots file that cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotsError {
    #[error("slots file is {0} bytes: not two equal slots of whole 4 KiB blocks within the 4 MiB limit")]
    Size(usize),
    #[error("neither slot of the file holds a record whose CRC32C checks out")]
    NoValidSlot,
}

/// The newest valid record of a slots file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Newest<'a> {
    pub slot_index: usize,
    pub sequence: u64,
    pub payload: &'a [u8],
}

/// One in-place rewrite: write `bytes` at `offset_bytes`, then sync the file's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWrite {
    pub offset_bytes: u64,
    pub bytes: Vec<u8>,
}

/// The slot length for a file made for `payload_len_bytes`: twice what it needs, in whole
/// blocks, at least [`SLOT_LEN_MIN_BYTES`].
pub fn slot_len_for(payload_len_bytes: usize) -> usize {
    let needed = SLOT_HEADER_LEN_BYTES.saturating_add(payload_len_bytes).saturating_mul(2);
    needed.div_ceil(SLOT_ALIGN_BYTES).saturating_mul(SLOT_ALIGN_BYTES).max(SLOT_LEN_MIN_BYTES)
}

fn encode_slot(sequence: u64, payload: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(payload.len()).ok()?;
    let mut out = Vec::with_capacity(SLOT_HEADER_LEN_BYTES + payload.len());
    out.extend_from_slice(SLOT_MAGIC);
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crate::crc32c_append(crate::crc32c(&out), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

/// The sequence and payload of one slot, or `None` when it holds no valid record.
fn decode_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    let header = slot.get(..SLOT_HEADER_LEN_BYTES)?;
    if &header[..8] != SLOT_MAGIC {
        return None;
    }
    let word = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let mut sequence = [0u8; 8];
    sequence.copy_from_slice(&header[8..16]);
    let sequence = u64::from_le_bytes(sequence);
    let len = usize::try_from(word(16)).ok()?;
    let payload = slot.get(SLOT_HEADER_LEN_BYTES..SLOT_HEADER_LEN_BYTES.checked_add(len)?)?;
    let crc = crate::crc32c_append(crate::crc32c(&header[..20]), payload);
    (crc == word(20) && sequence > 0).then_some((sequence, payload))
}

fn slot_len_of(file_len_bytes: usize) -> Result<usize, SlotsError> {
    let slot_len = file_len_bytes / 2;
    let valid = file_len_bytes.is_multiple_of(2 * SLOT_ALIGN_BYTES)
        && (SLOT_ALIGN_BYTES..=SLOT_LEN_MAX_BYTES).contains(&slot_len);
    valid.then_some(slot_len).ok_or(SlotsError::Size(file_len_bytes))
}

/// The newest valid record of `file` (the whole file's bytes).
pub fn newest(file: &[u8]) -> Result<Newest<'_>, SlotsError> {
    let slot_len = slot_len_of(file.len())?;
    let (first, second) = file.split_at(slot_len);
    match (decode_slot(first), decode_slot(second)) {
        (Some((a, payload)), Some((b, _))) if a > b => Ok(Newest { slot_index: 0, sequence: a, payload }),
        (_, Some((b, payload))) => Ok(Newest { slot_index: 1, sequence: b, payload }),
        (Some((a, payload)), None) => Ok(Newest { slot_index: 0, sequence: a, payload }),
        (None, None) => Err(SlotsError::NoValidSlot),
    }
}

/// A whole new file holding `payload` (sequence 1 in the first slot, the second slot zeros),
/// sized by [`slot_len_for`].
pub fn new_file(payload: &[u8]) -> Vec<u8> {
    let slot_len = slot_len_for(payload.len());
    let mut out = encode_slot(1, payload).unwrap_or_default();
    out.resize(slot_len * 2, 0);
    out
}

/// The rewrite that makes `payload` the newest record of a file of `file_len_bytes` whose
/// newest record is `newest`, or `None` when it does not fit a slot (make a new file then).
pub fn next_write(file_len_bytes: usize, newest: &Newest<'_>, payload: &[u8]) -> Option<SlotWrite> {
    let slot_len = slot_len_of(file_len_bytes).ok()?;
    if SLOT_HEADER_LEN_BYTES.checked_add(payload.len())? > slot_len {
        return None;
    }
    let slot_index = 1 - newest.slot_index.min(1);
    let bytes = encode_slot(newest.sequence.checked_add(1)?, payload)?;
    Some(SlotWrite { offset_bytes: u64::try_from(slot_index * slot_len).ok()?, bytes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn apply(file: &mut [u8], write: &SlotWrite) {
        let at = usize::try_from(write.offset_bytes).unwrap();
        file[at..at + write.bytes.len()].copy_from_slice(&write.bytes);
    }

    #[test]
    fn rewrites_alternate_slots_and_the_newest_wins() {
        let mut file = new_file(b"one");
        assert_eq!(file.len(), 2 * SLOT_LEN_MIN_BYTES);
        assert_eq!(newest(&file).unwrap(), Newest { slot_index: 0, sequence: 1, payload: b"one" });
        for (i, payload) in [&b"two"[..], b"three", b"four"].into_iter().enumerate() {
            let write = next_write(file.len(), &newest(&file).unwrap(), payload).unwrap();
            apply(&mut file, &write);
            let n = newest(&file).unwrap();
            assert_eq!((n.sequence, n.payload, n.slot_index), (i as u64 + 2, payload, (i + 1) % 2));
        }
    }

    #[test]
    fn a_torn_rewrite_leaves_the_record_before_it() {
        let mut file = new_file(b"before");
        let write = next_write(file.len(), &newest(&file).unwrap(), b"after, longer").unwrap();
        for torn_len in 0..write.bytes.len() {
            let mut torn = file.clone();
            apply(&mut torn, &SlotWrite { offset_bytes: write.offset_bytes, bytes: write.bytes[..torn_len].to_vec() });
            assert_eq!(newest(&torn).unwrap().payload, b"before", "torn at {torn_len}");
        }
        apply(&mut file, &write);
        assert_eq!(newest(&file).unwrap().payload, b"after, longer");
    }

    #[test]
    fn a_damaged_newest_slot_falls_back_and_is_written_over_next() {
        let mut file = new_file(b"one");
        let write = next_write(file.len(), &newest(&file).unwrap(), b"two").unwrap();
        apply(&mut file, &write);
        let slot_len = file.len() / 2;
        file[slot_len + SLOT_HEADER_LEN_BYTES] ^= 0x01;
        let n = newest(&file).unwrap();
        assert_eq!((n.slot_index, n.payload), (0, &b"one"[..]));
        let write = next_write(file.len(), &n, b"three").unwrap();
        assert_eq!(write.offset_bytes, slot_len as u64, "the damaged slot is the one written");
        apply(&mut file, &write);
        assert_eq!(newest(&file).unwrap().payload, b"three");
        file[SLOT_HEADER_LEN_BYTES] ^= 0x01;
        file[slot_len + 3] ^= 0x01;
        assert_eq!(newest(&file), Err(SlotsError::NoValidSlot));
    }

    #[test]
    fn a_record_too_long_for_its_slot_asks_for_a_new_file() {
        let file = new_file(b"small");
        let big = vec![7u8; SLOT_LEN_MIN_BYTES];
        assert!(next_write(file.len(), &newest(&file).unwrap(), &big).is_none());
        let grown = new_file(&big);
        assert!(grown.len() > file.len());
        assert_eq!(newest(&grown).unwrap().payload, &big[..]);
    }

    #[test]
    fn sizes_that_are_not_two_slots_are_refused() {
        for len in [0, 4096, 3 * 4096, 2 * 4096 + 1, 2 * SLOT_LEN_MAX_BYTES + 8192] {
            assert_eq!(newest(&vec![0u8; len]), Err(SlotsError::Size(len)));
        }
        assert_eq!(newest(&vec![0u8; 8192]), Err(SlotsError::NoValidSlot));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let _ = newest(&bytes);
            let mut file = new_file(b"x");
            let at = bytes.len() % file.len();
            let end = (at + bytes.len()).min(file.len());
            file[at..end].copy_from_slice(&bytes[..end - at]);
            if let Ok(n) = newest(&file) {
                let _ = next_write(file.len(), &n, &bytes);
            }
        }
    }
}
