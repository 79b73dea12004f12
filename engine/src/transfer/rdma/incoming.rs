//! The target's end of an RDMA lane: frames read out of registered slots, in order.
//!
//! What it does: each receive completion's immediate names a frame's sequence number (and so
//! its slot); frames are handed on in sequence order whatever order their completions come in.
//! A frame's header is decoded from its slot (its own CRC32C checked), its body copied out,
//! and then the slot is given back to the source with a credit: a zero-length write with
//! immediate carrying the count of frames consumed. [`RdmaArrivals`] hands out the lanes.
//!
//! What it does not: check a body's CRC32C or write it anywhere (`chunks_in` does, as for
//! QUIC), or time out: a quiet source is not an error here; the transfer's control stream
//! decides when an attempt is over.
//!
//! Bounds: `slots` frames per lane (a sequence number further ahead is the peer's protocol
//! error), one body copied out at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_wire::frame::{FrameHeader, FrameKind, HEADER_LEN_BYTES};

use super::pool::PooledBuffer;
use super::verbs::{Completion, CompletionKind, Device, QueuePair, RemoteBuffer, WriteImm};
use super::{count_u32, poll_completions, seq_distance, verbs_error, Backoff, FINISH_BIT, SEQ_MASK};
use crate::transfer::framing::BodyPieces;
use crate::transfer::transport::{ChunkArrivals, IncomingLane};
use crate::transfer::TransferError;

/// What a receive completion said about a frame: its written length, or the lane's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arrival {
    Frame { len_bytes: u32 },
    Finish,
}

/// The target's end of one lane.
#[derive(Debug)]
pub struct RdmaIncoming<D: Device> {
    pub(super) qp: D::Qp,
    pub(super) slots: Vec<PooledBuffer<D::Region>>,
    /// The next frame to hand on.
    pub(super) expected_seq: u32,
    /// Frames whose completion came, not handed on yet (at most one per slot, plus the end).
    pub(super) arrived: HashMap<u32, Arrival>,
    /// The frame whose header was handed on, its body not read yet.
    pub(super) current: Option<FrameHeader>,
    pub(super) finished: bool,
    pub(super) completions: Vec<Completion>,
}

impl<D: Device> RdmaIncoming<D> {
    fn take_completions(&mut self) -> Result<usize, TransferError> {
        // Taken out while `self` records the arrivals, then put back for its capacity.
        let mut completions = std::mem::take(&mut self.completions);
        let taken = self.record_arrivals(&mut completions);
        self.completions = completions;
        taken
    }

    fn record_arrivals(&mut self, completions: &mut Vec<Completion>) -> Result<usize, TransferError> {
        poll_completions(&mut self.qp, completions)?;
        for completion in completions.iter() {
            // Credits' own completions need nothing: they carry no buffer.
            let CompletionKind::RecvImm { imm, len_bytes } = completion.kind else { continue };
            let seq = imm & SEQ_MASK;
            let arrival = if imm & FINISH_BIT != 0 { Arrival::Finish } else { Arrival::Frame { len_bytes } };
            if seq_distance(self.expected_seq, seq) > count_u32(self.slots.len())
                || self.arrived.insert(seq, arrival).is_some()
            {
                return Err(TransferError::Protocol(format!(
                    "rdma frame {seq} arrived while frame {} is expected with {} slots",
                    self.expected_seq,
                    self.slots.len()
                )));
            }
        }
        Ok(completions.len())
    }

    fn slot(&self, seq: u32) -> Result<&PooledBuffer<D::Region>, TransferError> {
        let index = (seq as usize).checked_rem(self.slots.len()).unwrap_or(0);
        self.slots.get(index).ok_or_else(|| TransferError::Local("rdma lane without slots".into()))
    }

    /// The frame header in `seq`'s slot, checked against the length the write had.
    fn header_of(&self, seq: u32, len_bytes: u32) -> Result<FrameHeader, TransferError> {
        let bytes = self.slot(seq)?.read(0, HEADER_LEN_BYTES as u64).map_err(verbs_error)?;
        let bytes: [u8; HEADER_LEN_BYTES] =
            bytes.try_into().map_err(|_| TransferError::Local("a short rdma slot read".into()))?;
        let header = FrameHeader::decode(&bytes)?;
        let frame_len_bytes = HEADER_LEN_BYTES as u64 + u64::from(header.body_len_bytes);
        if header.kind != FrameKind::Chunk || frame_len_bytes != u64::from(len_bytes) {
            return Err(TransferError::Malformed(format!(
                "rdma frame {seq}: a {:?} header for {frame_len_bytes} bytes in a write of {len_bytes}",
                header.kind
            )));
        }
        Ok(header)
    }

    /// Gives the slot of the frame just read back to the source.
    fn credit(&mut self) -> Result<(), TransferError> {
        self.take_completions()?;
        self.expected_seq = (self.expected_seq + 1) & SEQ_MASK;
        self.qp.post_recv(u64::from(self.expected_seq)).map_err(verbs_error)?;
        let credit = WriteImm {
            wr_id: u64::from(self.expected_seq),
            local: None,
            local_offset_bytes: 0,
            len_bytes: 0,
            remote: RemoteBuffer { addr: 0, rkey: 0 },
            imm: self.expected_seq,
        };
        self.qp.post_write_imm(credit).map_err(verbs_error)
    }
}

impl<D: Device> IncomingLane for RdmaIncoming<D> {
    async fn next_header(&mut self) -> Result<Option<FrameHeader>, TransferError> {
        if self.current.is_some() {
            return Err(TransferError::Local("an rdma header read before the last body".into()));
        }
        // No timeout: a source may be slow to read; the control stream ends a dead attempt.
        let mut backoff = Backoff::new(Duration::MAX);
        loop {
            if self.finished {
                return Ok(None);
            }
            match self.arrived.remove(&self.expected_seq) {
                Some(Arrival::Finish) => self.finished = true,
                Some(Arrival::Frame { len_bytes }) => {
                    let header = self.header_of(self.expected_seq, len_bytes)?;
                    self.current = Some(header);
                    return Ok(Some(header));
                }
                None => {
                    let taken = self.take_completions()?;
                    if !self.arrived.contains_key(&self.expected_seq) {
                        backoff.wait(taken > 0, "an rdma frame").await?;
                    }
                }
            }
        }
    }

    async fn read_body(&mut self, header: &FrameHeader, body: &mut BodyPieces) -> Result<(), TransferError> {
        let current =
            self.current.take().ok_or_else(|| TransferError::Local("a body read before its header".into()))?;
        if current != *header {
            return Err(TransferError::Local("a body read for another header".into()));
        }
        let data = self
            .slot(self.expected_seq)?
            .read(HEADER_LEN_BYTES as u64, u64::from(header.body_len_bytes))
            .map_err(verbs_error)?;
        body.clear();
        body.push(Bytes::from(data));
        self.credit()
    }
}

/// The lanes one handshake connected on the target, accepted once each.
#[derive(Debug)]
pub struct RdmaArrivals<D: Device> {
    pub(super) lanes: Arc<Mutex<Vec<RdmaIncoming<D>>>>,
    pub(super) closed: Arc<tokio::sync::Notify>,
}

impl<D: Device> Clone for RdmaArrivals<D> {
    fn clone(&self) -> Self {
        Self { lanes: self.lanes.clone(), closed: self.closed.clone() }
    }
}

impl<D: Device> RdmaArrivals<D> {
    /// The transfer's attempt is over: `accept` fails from now on, as a closed QUIC
    /// connection's does.
    pub fn close(&self) {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.closed.notify_waiters();
        self.closed.notify_one();
    }
}

impl<D: Device> ChunkArrivals for RdmaArrivals<D> {
    type Incoming = RdmaIncoming<D>;

    async fn accept(&self) -> Result<RdmaIncoming<D>, TransferError> {
        let next = self.lanes.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match next {
            Some(lane) => Ok(lane),
            None => {
                self.closed.notified().await;
                Err(TransferError::Connection("the rdma path was closed".into()))
            }
        }
    }
}
