//! The engine side of NodeDB WALs: tailing a source WAL, staging the target's, `ferry wal dump`.
//!
//! What it does: [`tail`] follows a WAL folder (pread, sealing, rolling) and feeds the tail
//! cursor; [`notice`] wakes a tailer when the folder is written to (inotify).
//! [`mod@stage`] is the target's staged WAL (group commit, recovery after a crash).
//! [`mod@dump`] lists a WAL folder's records through the same tail cursor a migration uses.
//!
//! What it does not: define the format or the tailing rules; those are sans-IO in
//! `ferry_wire::wal`. The migration's tailer around [`tail::FolderTail`] (selection,
//! streaming, hard links on held segments, `max_held_wal_bytes`) is `transfer::walsend`.
//! Nor does it write source WALs: the writer the tests and benches use
//! (`ferry_refnode::walwrite`) lives with the reference node, the database stand-in.
//!
//! Invariants: every byte read from a WAL goes through `ferry_wire::wal::Cursor`, so the
//! dump and the tailer agree on what a WAL holds.

pub mod dump;
pub mod notice;
pub mod stage;
pub mod tail;

pub use dump::{dump, DumpError, DumpOptions, DumpSummary, SegmentSummary};
pub use notice::AppendNotice;
pub use tail::{FolderTail, TailError, TailRecord, TailRecordRef};

#[cfg(test)]
mod roundtrip_tests;
