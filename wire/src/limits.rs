//! The limits that bound every length ferry accepts from a peer, a file or a caller.
//!
//! Decoders check a length against these before they allocate, so a hostile peer cannot make
//! a daemon allocate more than these numbers say. Each limit says why it has its value.
//!
//! What it does not: enforce anything itself; each decoder and machine checks its lengths.
//!
//! Invariants: every limit is a compile-time constant, and lengths are checked against them
//! before any allocation sized by the input.

/// Default chunk size for segment files: large enough that per-chunk costs (a frame header,
/// an ack, a CRC) vanish next to the bytes, small enough that a resend after an interruption
/// costs little.
pub const CHUNK_LEN_DEFAULT_BYTES: u32 = 1 << 20;
/// Smallest chunk size accepted: below it per-chunk overhead dominates.
pub const CHUNK_LEN_MIN_BYTES: u32 = 4 << 10;
/// Largest chunk size accepted: a chunk is buffered whole on the target before it is checked.
pub const CHUNK_LEN_MAX_BYTES: u32 = 16 << 20;

/// Largest control frame body (everything but chunk data): a manifest of
/// [`FILE_COUNT_MAX`] files with long paths fits, a hostile length does not.
pub const CONTROL_BODY_LEN_MAX_BYTES: u32 = 64 << 20;

/// Most files in one transfer.
pub const FILE_COUNT_MAX: u32 = 1_000_000;
/// Longest relative path of a segment file, in bytes (Linux's PATH_MAX).
pub const PATH_LEN_MAX_BYTES: u32 = 4096;
/// Largest single segment file: 16 TiB. Bounds chunk counts and offsets.
pub const FILE_SIZE_MAX_BYTES: u64 = 16 << 40;
/// Most chunks of one transfer across all files: bounds the target's in-memory chunk table.
/// Declared chunks cost one bit each (8 MiB at the limit) and a page pointer per 1,024; a CRC
/// (4 bytes) is held only once its chunk arrives (`crc_table`), so a peer's declared size alone
/// makes the target hold about 9 MiB.
pub const CHUNK_COUNT_MAX: u64 = 1 << 26;
/// Longest opaque `db_meta` a caller may attach.
pub const DB_META_LEN_MAX_BYTES: u32 = 1 << 20;
/// Longest error message a peer may send.
pub const REASON_LEN_MAX_BYTES: u32 = 4096;
/// Largest WAL batch frame body: one record of the largest size (64 MiB payload and a header)
/// with room to spare; smaller records are batched up to [`WAL_BATCH_TARGET_BYTES`].
pub const WAL_BATCH_BODY_LEN_MAX_BYTES: u32 = (64 << 20) + (64 << 10);
/// Batch size a sender aims for: large enough to amortise a frame and a group commit, small
/// enough to keep the lag low.
pub const WAL_BATCH_TARGET_BYTES: usize = 1 << 20;

/// Most QUIC connections one peer node may hold open to a target at once; the next is closed
/// with a `refused` error. Enough for two copies at the most connections a caller may ask
/// for (`api::PARALLELISM_MAX_COUNT`, 64) or many smaller ones, and their one-shot requests.
/// With it, what one peer can make a target hold is bounded: per connection its receive
/// window (32 MiB by default), one control body being read and one queued (64 MiB each at
/// most, [`CONTROL_BODY_LEN_MAX_BYTES`]) and the WAL stream's read-ahead (16 MiB): about
/// 176 MiB per connection at the very worst, 22 GiB per peer, against the few MiB a real
/// migration's connection holds.
pub const PEER_CONNECTIONS_MAX: usize = 128;
