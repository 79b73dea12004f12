//! The engine side of NodeDB WALs: a writer of the format and `ferry wal dump`.
//!
//! What it does: [`writer`] appends NodeDB-layout records to a WAL folder the way NodeDB's
//! writer does (O_DIRECT-style block flushes with layout A leftovers or layout B padding,
//! or buffered; rolls; optional preambles), for the reference node, tests and benches.
//! [`tail`] follows a WAL folder (pread, sealing, rolling) and feeds the tail cursor;
//! [`notice`] wakes a tailer when the folder is written to (inotify).
//! [`mod@stage`] is the target's staged WAL (group commit, recovery after a crash).
//! [`mod@dump`] lists a WAL folder's records through the same tail cursor a migration uses.
//!
//! What it does not: define the format or the tailing rules; those are sans-IO in
//! `ferry_wire::wal`. The migration's tailer around [`tail::FolderTail`] (selection,
//! streaming, hard links on held segments, `max_held_wal_bytes`) is `transfer::walsend`.
//!
//! Invariants: every byte read from a WAL goes through `ferry_wire::wal::Cursor`, so the
//! dump and the tailer agree on what a WAL holds.

pub mod dump;
pub mod notice;
pub mod stage;
pub mod tail;
pub mod writer;

pub use dump::{dump, DumpError, DumpOptions, DumpSummary, SegmentSummary};
pub use notice::AppendNotice;
pub use tail::{FolderTail, TailError, TailRecord, TailRecordRef};
pub use writer::{FlushStyle, Leftovers, PreambleOptions, RecordSpec, WalWriter, WriterError, WriterOptions};

#[cfg(test)]
mod roundtrip_tests;
