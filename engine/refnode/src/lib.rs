//! The reference node of DESIGN section 9: a small stand-in for a database, so a whole
//! migration can be run and verified without one (`ferry demo`, scenario tests, benches).
//!
//! What it owns:
//! - [`payload`]: each write's payload carries (vshard, writer_seq) and a filler derived from
//!   both, so a payload read back is checked whole;
//! - [`walwrite`]: [`WalWriter`], a writer of NodeDB-format WAL folders (layouts A and B,
//!   O_DIRECT-style or buffered flushes, rolls, preambles), for the reference node, and for the
//!   engine's tests, the scenario tests and the benches that need a source WAL;
//! - [`writer`]: [`RefWriter`], a writer on its own thread appending NodeDB records (header
//!   layout A by default, or B) to a source WAL at a fixed rate with group commit, that can be
//!   paused (the write fence a coordinator drives), resumed on the source (a cancelled
//!   cut-over) or resumed on the target (the migrating vShard's writes then go to the target
//!   node's own WAL);
//! - [`log`]: [`WriterLog`], what the writer acknowledged and when, with the numbers a report
//!   needs (ack latency percentiles, the longest gap between acks, acks inside a pause);
//! - [`export`]: the base export of the migrating vShard's writes up to `base_lsn` into
//!   immutable files in a documented format, and its reader; [`bulk`]: deterministic filler
//!   files that give the base copy real volume;
//! - [`walread`]: a small NodeDB reader (layouts A and B, told apart per segment) written apart
//!   from ferry's transfer code, for staged WAL folders, source WALs and the target's node WAL;
//! - [`verify`]: rebuilds the migrating vShard's writer_seq values from a target staging and
//!   the target's node WAL, counts lost, duplicated and unexpected writes, and compares every
//!   staged segment file with the source's by SHA-256.
//!
//! What it must not do: depend on `ferry-engine`, the transfer code it checks. Its Cargo.toml
//! lists `ferry-wire` (formats, CRC rules) and external crates only, so the compiler enforces
//! that the verifier shares nothing with what moved the bytes; the engine may depend on this
//! crate (for `ferry demo`), never the other way. Nor does it encrypt, or import a staging into
//! anything: the verifier reads what ferry staged as a database's importer would, and counts.
//!
//! Invariants: every timestamp here is CLOCK_MONOTONIC nanoseconds ([`monotonic_ns`]), the
//! clock the daemon reads, so a pause ticket's `paused_at_ns` can be handed to
//! `migration.fence` as `writes_paused_at_ns`. Nothing here panics on file bytes; every
//! per-write table has a cap ([`writer::WRITES_MAX_COUNT`]).

pub mod bulk;
pub mod export;
pub mod log;
pub mod payload;
pub mod verify;
pub mod walread;
pub mod walwrite;
pub mod writer;

pub use bulk::{generate_bulk, BulkError, BulkReport};
pub use export::{export_base, read_export_file, ExportEntry, ExportError, ExportFile, ExportReport};
pub use log::{AckGap, LatencySummary, PauseSpan, ResumedOn, WriteEntry, WritePlace, WriterLog};
pub use payload::{decode_payload, encode_payload, PayloadError, PAYLOAD_LEN_BYTES};
pub use verify::{verify, verify_counting, Verification, VerifyInput};
pub use walread::{read_wal_folder, FolderKind, FolderReport, RecordLayout, WalReadError, WalRecordRef};
pub use walwrite::{FlushStyle, Leftovers, PreambleOptions, RecordSpec, WalWriter, WriterError, WriterOptions};
pub use writer::{PauseTicket, RefWriter, RefWriterConfig, RefWriterError};

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of every stamp here, and the daemon's
/// (`ferry_engine::clock::monotonic_ns` reads the same clock; a test in `tests/` holds the two
/// together, since this crate may not call the engine's).
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// NodeDB's record_type for a required put (bit 15: required; kind 1): every reference write.
pub const RECORD_TYPE_PUT: u32 = 0x8000 | 1;

/// xorshift64*: fast, and its 64-bit outputs do not repeat within a period of 2^64 - 1. The
/// payload filler and the bulk files come from it, so both are reproducible from a seed.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            let word = self.next_word().to_le_bytes();
            for (d, s) in tail.iter_mut().zip(word) {
                *d = s;
            }
        }
    }

    fn next_word(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::collections::BTreeSet;

    /// The verifier's independence, as the manifest states it: no dependency of any kind on
    /// the engine (the transfer code this crate checks).
    #[test]
    fn the_crate_does_not_depend_on_the_engine() {
        let manifest = include_str!("../Cargo.toml");
        let named: Vec<&str> = manifest
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default())
            .filter(|line| line.contains("ferry-engine") || line.contains("ferry_engine"))
            .collect();
        assert!(named.is_empty(), "Cargo.toml names the engine: {named:?}");
        assert!(manifest.contains("ferry-wire.workspace = true"));
    }

    #[test]
    fn generated_bytes_do_not_repeat_and_depend_on_the_seed() {
        let mut buf = vec![0u8; 1 << 16];
        XorShift::new(0).fill(&mut buf);
        let words: BTreeSet<&[u8]> = buf.chunks_exact(8).collect();
        assert_eq!(words.len(), buf.len() / 8);
        let mut other = vec![0u8; 1 << 16];
        XorShift::new(1).fill(&mut other);
        assert_ne!(buf, other);
        let mut odd = [0u8; 13];
        XorShift::new(0).fill(&mut odd);
        assert_eq!(odd[..8], buf[..8]);
    }
}
