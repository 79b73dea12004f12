//! The source's end of an RDMA lane: chunk frames written into the target's slots.
//!
//! What it does: for each frame, waits for a free slot at the target (a credit), copies the
//! 32-byte frame header and the body into a staging buffer from the [`Pool`], and posts one
//! RDMA WRITE with immediate into slot `seq % slots`; the immediate is the frame's sequence
//! number, so the target learns of each frame without a message. A credit (a zero-length write
//! with immediate from the target) carries how many frames the target has consumed.
//! [`RdmaLanes`] hands out the lanes a handshake connected.
//!
//! What it does not: decide which chunk goes next or compute CRCs (`ship` and the machine do),
//! or reconnect: a failed completion, a lost queue pair or a completion that never comes is a
//! [`TransferError`], and the copy's resume machinery sends the chunk again on a new attempt.
//!
//! A lane ends ([`RdmaLane::end`]) only once every write posted on it completed: a write that
//! vanished with its completion fails the lane at its timeout, so the last frames of a lane
//! are never taken as sent without the target having them.
//!
//! Bounds: at most `slots` frames un-credited per lane; staging buffers from a pool shared by
//! the lanes; every wait for a completion ends at the lane's timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_wire::frame::{FrameHeader, HEADER_LEN_BYTES};
use ferry_wire::rdma::RemoteSlot;

use super::pool::{Pool, PooledBuffer};
use super::verbs::{Completion, CompletionKind, Device, QueuePair, RemoteBuffer, WriteImm};
use super::{count_u32, poll_completions, seq_distance, verbs_error, Backoff, FINISH_BIT, SEQ_MASK};
use crate::transfer::transport::{ChunkLane, ChunkLanes};
use crate::transfer::TransferError;

/// The source's end of one lane.
#[derive(Debug)]
pub struct RdmaLane<D: Device> {
    pub(super) qp: D::Qp,
    pub(super) staging: Arc<Pool<D::Region>>,
    pub(super) slots: Vec<RemoteSlot>,
    pub(super) slot_len_bytes: u32,
    /// The next frame's sequence number (31 bits, wrapping).
    pub(super) next_seq: u32,
    /// Frames the target has consumed (from its last credit).
    pub(super) credited_seq: u32,
    /// Posted writes, by work request id, until they complete: a frame's with its staging
    /// buffer, the lane's end without one.
    pub(super) in_flight: VecDeque<(u64, Option<PooledBuffer<D::Region>>)>,
    pub(super) timeout: Duration,
    pub(super) completions: Vec<Completion>,
}

impl<D: Device> RdmaLane<D> {
    fn slots_count(&self) -> u32 {
        count_u32(self.slots.len())
    }

    /// Takes in what completed: frees staging buffers, moves the credit; an error ends the lane.
    fn take_completions(&mut self) -> Result<usize, TransferError> {
        // Taken out while `self` records them, then put back for its capacity.
        let mut completions = std::mem::take(&mut self.completions);
        let taken = self.record_completions(&mut completions);
        self.completions = completions;
        taken
    }

    fn record_completions(&mut self, completions: &mut Vec<Completion>) -> Result<usize, TransferError> {
        poll_completions(&mut self.qp, completions)?;
        for completion in completions.iter() {
            match completion.kind {
                CompletionKind::WriteDone => self.in_flight.retain(|(wr_id, _)| *wr_id != completion.wr_id),
                CompletionKind::RecvImm { imm, .. } => {
                    let consumed = imm & SEQ_MASK;
                    // Credits are cumulative: one that comes after a newer one says nothing new.
                    let ahead = seq_distance(self.credited_seq, consumed);
                    let stale = seq_distance(consumed, self.credited_seq) <= self.slots_count();
                    if ahead <= seq_distance(self.credited_seq, self.next_seq) {
                        self.credited_seq = consumed;
                    } else if !stale {
                        return Err(TransferError::Protocol(format!(
                            "rdma credit for frame {consumed}, but only {} were sent",
                            self.next_seq
                        )));
                    }
                    self.qp.post_recv(u64::from(consumed)).map_err(verbs_error)?;
                }
            }
        }
        Ok(completions.len())
    }

    /// Polls until `ready` holds, or fails at the lane's timeout.
    async fn wait_until(&mut self, ready: impl Fn(&Self) -> bool) -> Result<(), TransferError> {
        let mut backoff = Backoff::new(self.timeout);
        loop {
            let taken = self.take_completions()?;
            if ready(self) {
                return Ok(());
            }
            backoff.wait(taken > 0, "an rdma completion").await?;
        }
    }
}

impl<D: Device> ChunkLane for RdmaLane<D> {
    async fn send(&mut self, header: &FrameHeader, body: Bytes) -> Result<(), TransferError> {
        let frame_len_bytes = HEADER_LEN_BYTES + body.len();
        if frame_len_bytes > self.slot_len_bytes as usize {
            return Err(TransferError::Local(format!(
                "a frame of {frame_len_bytes} bytes does not fit the target's slots of {} bytes",
                self.slot_len_bytes
            )));
        }
        // A slot at the target, then a staging buffer here (polling our own completions, which
        // frees our buffers: waiting on the pool alone could wait on ourselves).
        let slots_count = self.slots_count();
        self.wait_until(|lane| seq_distance(lane.credited_seq, lane.next_seq) < slots_count).await?;
        let staging = self.staging.clone();
        let mut buffer = staging.try_acquire();
        if buffer.is_none() {
            let mut backoff = Backoff::new(self.timeout);
            while buffer.is_none() {
                let taken = self.take_completions()?;
                buffer = staging.try_acquire();
                if buffer.is_none() {
                    backoff.wait(taken > 0, "a free rdma staging buffer").await?;
                }
            }
        }
        let buffer = buffer.ok_or_else(|| TransferError::Local("no staging buffer".into()))?;
        let len_bytes = buffer.fill(&[&header.encode(), &body]).map_err(verbs_error)?;
        // At most the slot's length, a u32 (checked above).
        let len_bytes = u32::try_from(len_bytes).map_err(|_| TransferError::Local("a frame over 4 GiB".into()))?;
        let seq = self.next_seq;
        let slot = self
            .slots
            .get((seq % slots_count) as usize)
            .ok_or_else(|| TransferError::Local("rdma lane without slots".into()))?;
        let (region, offset_bytes) = buffer.region();
        self.qp
            .post_write_imm(WriteImm {
                wr_id: u64::from(seq),
                local: Some(region),
                local_offset_bytes: offset_bytes,
                len_bytes,
                remote: RemoteBuffer { addr: slot.addr, rkey: slot.rkey },
                imm: seq,
            })
            .map_err(verbs_error)?;
        self.in_flight.push_back((u64::from(seq), Some(buffer)));
        self.next_seq = (seq + 1) & SEQ_MASK;
        Ok(())
    }

    /// Posts the end of the lane and returns; a task keeps the staging buffers until their
    /// writes complete (the device may still be reading them), bounded by the lane's timeout,
    /// and only logs a lane whose writes never completed: the chunk streams use [`Self::end`].
    fn finish(mut self) -> Result<(), TransferError> {
        self.post_end()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TransferError::Local("an rdma lane finished outside the runtime".into()))?;
        runtime.spawn(async move {
            if let Err(e) = self.wait_until(|lane| lane.in_flight.is_empty()).await {
                tracing::warn!(error = %e, "an rdma lane ended before its last writes completed");
            }
        });
        Ok(())
    }

    /// Posts the end of the lane and waits until every write posted on it (its frames and the
    /// end) completed: a write that never completes (lost on the way, its completion with it)
    /// fails the lane at its timeout, retryably, so the attempt ends and the copy resumes with
    /// the frames the target did not get, instead of waiting for them for ever.
    async fn end(mut self) -> Result<(), TransferError> {
        self.post_end()?;
        let mut backoff = Backoff::new(self.timeout);
        loop {
            let taken = self.take_completions()?;
            if self.in_flight.is_empty() {
                return Ok(());
            }
            backoff.wait(taken > 0, "the completions of an rdma lane's last writes").await?;
        }
    }
}

impl<D: Device> RdmaLane<D> {
    /// Posts the lane's end: a zero-length write whose immediate is the next sequence number
    /// with [`FINISH_BIT`] set.
    fn post_end(&mut self) -> Result<(), TransferError> {
        let remote = self
            .slots
            .first()
            .map_or(RemoteBuffer { addr: 0, rkey: 0 }, |s| RemoteBuffer { addr: s.addr, rkey: s.rkey });
        let wr_id = u64::from(FINISH_BIT | self.next_seq);
        let wr = WriteImm {
            wr_id,
            local: None,
            local_offset_bytes: 0,
            len_bytes: 0,
            remote,
            imm: FINISH_BIT | self.next_seq,
        };
        self.qp.post_write_imm(wr).map_err(verbs_error)?;
        self.in_flight.push_back((wr_id, None));
        Ok(())
    }
}

/// The lanes one handshake connected, handed out once each.
#[derive(Debug)]
pub struct RdmaLanes<D: Device>(pub(super) Arc<Mutex<Vec<RdmaLane<D>>>>);

impl<D: Device> Clone for RdmaLanes<D> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<D: Device> ChunkLanes for RdmaLanes<D> {
    type Lane = RdmaLane<D>;

    async fn open(&self) -> Result<RdmaLane<D>, TransferError> {
        let mut lanes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .pop()
            .ok_or_else(|| TransferError::Local("every rdma lane the handshake connected is open already".into()))
    }
}
