//! The RDMA chunk path: segment chunks moved with RDMA WRITE with immediate over
//! reliable-connected queue pairs, behind the same chunk transport seam as QUIC
//! ([`crate::transfer::transport`]).
//!
//! What it does: [`path`] makes the queue pairs and registered buffers of both ends and the
//! handshake (QPN, LID, GID, slot addresses and rkeys, see [`ferry_wire::rdma`]) that the
//! transfer's QUIC connection carries; [`lane`] is the source's end (a frame copied into a
//! staging buffer from the bounded [`pool`], written into the target's slot `seq % slots`, the
//! sequence number as the immediate, a credit back per frame consumed); [`incoming`] the
//! target's (frames handed on in sequence order, whatever order their completions came in).
//! Chunks then go through the same machines, CRC32C checks and resumption as over QUIC:
//! `ship::send_stream` and `chunks_in` drive these lanes unchanged. [`select`] decides
//! between QUIC and RDMA and says loudly why it fell back.
//!
//! What it does not: carry control messages or the WAL (QUIC does), register source files or
//! mmaps (chunks are copied into the pool's staging buffers, so the page cache is never
//! pinned), or retry: a failed completion, a lost queue pair or a completion that never comes
//! (the lane's timeout) is a retryable [`TransferError::Connection`]/[`TransferError::Timeout`],
//! and the copy resumes on a new attempt as after a lost QUIC connection.
//!
//! Where it runs: everything above the [`verbs`] seam runs in the normal tests against
//! [`fake`], an in-process device (memory to memory, with injected completion errors, lost
//! writes, lost queue pairs, delays and reordering). Only the adapter `sideway_device` (feature
//! `rdma`) calls real verbs, and only on a machine with a device: `ibv_get_device_list`,
//! `ibv_open_device`, `ibv_query_device`/`_port`/`_gid`, `ibv_alloc_pd`, `ibv_reg_mr`,
//! `ibv_create_cq`, `ibv_create_qp`, `ibv_modify_qp` (INIT, RTR, RTS), `ibv_post_send`
//! (`IBV_WR_RDMA_WRITE_WITH_IMM`), `ibv_post_recv` and `ibv_poll_cq`. Those run only in
//! `hwtests` with `FERRY_HW=rdma`.
//!
//! Invariants: at most `slots_per_lane` frames un-credited per lane; staging and slots come
//! from bounded pools registered once, each region at most the device's `max_mr_size`; a
//! frame is handed on only whole, its header's own CRC32C checked, its length equal to the
//! write's.

pub mod attach;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod incoming;
pub mod lane;
pub mod path;
pub mod pool;
pub mod select;
#[cfg(feature = "rdma")]
pub mod sideway_device;
#[cfg(test)]
mod tests;
pub mod verbs;

use std::time::{Duration, Instant};

use super::TransferError;
use verbs::VerbsError;

/// Sequence numbers are 31 bits: the immediate's top bit marks a lane's end.
pub(crate) const SEQ_MASK: u32 = 0x7fff_ffff;
pub(crate) const FINISH_BIT: u32 = 0x8000_0000;
/// Completions the fake device hands out per poll (sideway's default poll batch too).
#[cfg(any(test, feature = "testkit"))]
pub(crate) const POLL_BATCH_COUNT: usize = 32;

/// The frame header's length as the u32 lengths here count it (32 bytes).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const HEADER_LEN_U32: u32 = ferry_wire::frame::HEADER_LEN_BYTES as u32;

/// A count of slots or lanes (bounded by the handshake's limits, far below `u32::MAX`).
pub(crate) fn count_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// A length inside a region as `usize` (regions are allocated, so they fit).
#[cfg(any(test, feature = "testkit", feature = "rdma"))]
pub(crate) fn len_usize(len_bytes: u64) -> Result<usize, VerbsError> {
    usize::try_from(len_bytes).map_err(|_| VerbsError::Device(format!("{len_bytes} bytes do not fit this machine")))
}

/// How far `to` is ahead of `from`, modulo the sequence space.
pub(crate) fn seq_distance(from: u32, to: u32) -> u32 {
    to.wrapping_sub(from) & SEQ_MASK
}

/// A verbs failure ends the attempt as a lost connection does: the copy may resume.
pub(crate) fn verbs_error(e: VerbsError) -> TransferError {
    TransferError::Connection(e.to_string())
}

/// Polls `qp` into `out` (cleared first; the caller keeps it to reuse its capacity). A
/// failed completion ends the lane, as a lost connection does.
pub(crate) fn poll_completions<Q: verbs::QueuePair>(
    qp: &mut Q,
    out: &mut Vec<verbs::Completion>,
) -> Result<(), TransferError> {
    out.clear();
    qp.poll(out).map_err(verbs_error)?;
    match out.iter().find_map(|c| c.error.as_deref()) {
        Some(error) => Err(TransferError::Connection(format!("rdma lane: a completion failed: {error}"))),
        None => Ok(()),
    }
}

/// Waiting between empty polls: a few yields (a completion is usually microseconds away),
/// then sleeps of a millisecond, until a deadline.
#[derive(Debug)]
pub(crate) struct Backoff {
    deadline: Option<Instant>,
    empty_polls_count: u32,
}

/// Empty polls answered with a yield before the waits become sleeps.
const SPIN_POLLS_COUNT: u32 = 64;

impl Backoff {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { deadline: Instant::now().checked_add(timeout), empty_polls_count: 0 }
    }

    /// After a poll: `progressed` resets the spin; past the deadline, a timeout on `what`.
    pub(crate) async fn wait(&mut self, progressed: bool, what: &'static str) -> Result<(), TransferError> {
        if progressed {
            self.empty_polls_count = 0;
            return Ok(());
        }
        if self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(TransferError::Timeout(what));
        }
        self.empty_polls_count = self.empty_polls_count.saturating_add(1);
        if self.empty_polls_count < SPIN_POLLS_COUNT {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}
