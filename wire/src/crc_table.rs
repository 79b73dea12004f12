//! The target's table of verified chunk CRC32Cs, allocated as chunks arrive.
//!
//! What it does: [`CrcTable`] holds one CRC32C per chunk of a file, in pages of
//! [`PAGE_LEN`] entries that are allocated on the first write into them. An offer may declare
//! up to `CHUNK_COUNT_MAX` (2^26) chunks; a table for it costs one page pointer per
//! 1,024 chunks (about 1 MiB at the limit) until chunks really arrive, so what a peer can make
//! the target hold grows with the bytes it sends and the target writes (4 KiB of table per
//! 1,024 chunks, each at least 4 KiB), not with what it declares.
//!
//! What it does not: know which chunks are verified (the session's bitmap does) or check
//! anything: an entry never written reads as 0.

/// Entries per page: 4 KiB of CRCs.
pub const PAGE_LEN: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct CrcTable {
    len: u64,
    pages: Vec<Option<Box<[u32]>>>,
}

impl CrcTable {
    /// A table of `len` entries, none allocated yet.
    pub fn new(len: u64) -> Self {
        let pages = usize::try_from(len.div_ceil(PAGE_LEN as u64)).unwrap_or(0);
        Self { len, pages: vec![None; pages] }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry at `index` (0 if never written); `None` past the end.
    pub fn get(&self, index: u64) -> Option<u32> {
        if index >= self.len {
            return None;
        }
        let (page, slot) = Self::place(index)?;
        match self.pages.get(page)? {
            Some(entries) => entries.get(slot).copied(),
            None => Some(0),
        }
    }

    /// Writes the entry at `index`, allocating its page; false past the end.
    pub fn set(&mut self, index: u64, crc32c: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let Some((page, slot)) = Self::place(index) else { return false };
        let Some(entry) = self.pages.get_mut(page) else { return false };
        let entries = entry.get_or_insert_with(|| vec![0; PAGE_LEN].into_boxed_slice());
        match entries.get_mut(slot) {
            Some(s) => {
                *s = crc32c;
                true
            }
            None => false,
        }
    }

    /// Every entry in order (0 for those never written).
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).map(|i| self.get(i).unwrap_or(0))
    }

    /// Heap bytes the table holds now.
    pub fn held_bytes(&self) -> u64 {
        let pointers = self.pages.len() * std::mem::size_of::<Option<Box<[u32]>>>();
        let pages = self.pages.iter().filter(|p| p.is_some()).count() * PAGE_LEN * 4;
        (pointers + pages) as u64
    }

    fn place(index: u64) -> Option<(usize, usize)> {
        let index = usize::try_from(index).ok()?;
        Some((index / PAGE_LEN, index % PAGE_LEN))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::limits::CHUNK_COUNT_MAX;

    #[test]
    fn entries_read_back_and_unwritten_ones_are_zero() {
        let mut table = CrcTable::new(3000);
        assert!(table.set(0, 7) && table.set(2999, 9) && table.set(1500, 5));
        assert!(!table.set(3000, 1));
        assert_eq!(
            (table.get(0), table.get(1), table.get(1500), table.get(2999), table.get(3000)),
            (Some(7), Some(0), Some(5), Some(9), None)
        );
        let all: Vec<u32> = table.iter().collect();
        assert_eq!((all.len(), all[0], all[2999], all.iter().filter(|c| **c != 0).count()), (3000, 7, 9, 3));
    }

    /// A table for the largest offer holds about 1 MiB until chunks arrive, and a page per
    /// 1,024 chunks after.
    #[test]
    fn a_declared_table_costs_little_until_chunks_arrive() {
        let mut table = CrcTable::new(CHUNK_COUNT_MAX);
        let empty = table.held_bytes();
        assert!(empty <= 1 << 20, "{empty} bytes for an empty table");
        for i in 0..10 {
            table.set(i * 100_000, 1);
        }
        assert_eq!(table.held_bytes(), empty + 10 * PAGE_LEN as u64 * 4);
    }
}
