//! ferry-wire: the sans-IO core of ferry.
//!
//! What it does: the formats and codecs that cross a wire or land on disk (protocol frames,
//! the transfer manifest, the staging `MANIFEST.json`, NodeDB WAL layouts), the limits that
//! bound them, the path rules for segment files, and the pure state machines (transfer
//! session, WAL tail cursor) that the engine drives.
//!
//! What it does not: any I/O. No files, sockets, threads or clocks: time comes in as an
//! argument, bytes come in as slices, and decisions come out as values. That keeps every
//! rule here testable with plain unit and property tests, and keeps `unsafe` out entirely.
//!
//! Invariant: no input (network bytes, file bytes, caller values) makes this crate panic.
//! Decoders check lengths against [`limits`] before allocating.
#![forbid(unsafe_code)]

pub mod api;
pub mod checkpoint;
pub mod control;
pub mod crc_combine;
pub mod crc_table;
pub mod damage;
pub mod fence;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod ids;
pub mod limits;
pub mod manifest;
pub mod message;
pub mod path;
pub mod plant;
pub mod proto;
pub mod quote;
pub mod rate;
pub mod rdma;
pub mod retry;
pub mod session;
pub mod slots;
pub mod wal;
pub mod walstream;

pub use ids::{Lsn, MigrationId, NodeId, VShardId};

/// CRC32C (Castagnoli) of `bytes`: the one checksum ferry uses on the wire and on disk.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Extends a running CRC32C with more bytes (for checksums over several pieces).
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// CRC32C of `a ++ b` from the CRC32C of `a`, the CRC32C of `b` and the length of `b`: lets a
/// file's checksum be built from its chunks' checksums in any arrival order.
/// About a microsecond per call ([`crc_combine`]).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b_bytes: u64) -> u32 {
    crc_combine::combine(crc_a, crc_b, len_b_bytes)
}
