//! Record selection: which WAL records a migration keeps.
//!
//! What it does: keeps every record whose `vshard_id` is the migrating vShard, whatever its
//! kind. Unknown kinds, kinds with the required flag, and encrypted records pass through
//! unchanged: the target's database decides what they mean. Layout B padding records are
//! never kept (the cursor already skips them).
//!
//! What it does not (yet): NodeDB rules for records that concern the vShard without
//! carrying its id (node-global metadata kinds such as collection tombstones, aborted-write
//! markers that name a kept LSN). Those need NodeDB's kind numbers and payload formats,
//! which ferry does not have; they are deliberately not guessed. Until they exist, such
//! records are not kept, and a database that relies on them must replay them itself.

use super::header::RecordHeader;
use crate::VShardId;

/// The selection rule of one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub vshard_id: VShardId,
}

impl Selection {
    pub fn new(vshard_id: VShardId) -> Self {
        Selection { vshard_id }
    }

    /// Whether the record with this header is kept.
    pub fn keeps(&self, header: &RecordHeader) -> bool {
        !header.is_padding() && header.vshard_id == self.vshard_id
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::wal::header::{Layout, FLAG_ENCRYPTED, FLAG_REQUIRED};
    use crate::Lsn;

    #[test]
    fn keeps_the_vshard_whatever_the_kind() {
        let sel = Selection::new(VShardId(7));
        for record_type in [1, 0x3FFF, FLAG_REQUIRED | 0x1234, FLAG_ENCRYPTED | 3, 0x0001_0000] {
            for layout in Layout::ALL {
                let h = RecordHeader::new(layout, record_type, Lsn(5), VShardId(7));
                assert!(sel.keeps(&h), "{record_type:#x}");
                let other = RecordHeader::new(layout, record_type, Lsn(5), VShardId(8));
                assert!(!sel.keeps(&other));
            }
        }
        let pad = RecordHeader::new(Layout::B, 0, Lsn(0), VShardId(0));
        assert!(!Selection::new(VShardId(0)).keeps(&pad));
    }
}
