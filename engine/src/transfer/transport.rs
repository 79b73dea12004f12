//! The chunk transport seam: what carries chunk frames from the source's streams to the
//! target's, below the machines.
//!
//! What it does: names the four things a chunk path must do. A source opens lanes to its
//! target ([`ChunkLanes::open`]) and sends chunk frames on each, in order ([`ChunkLane`]); a
//! target accepts lanes ([`ChunkArrivals::accept`]) and reads frames off each
//! ([`IncomingLane`]). QUIC implements them here (a lane is a uni stream, a connection opens
//! and accepts them); the RDMA path (`super::rdma`) implements the same four (a lane a
//! reliable-connected queue pair writing into the target's registered slots). `memory` implements them in memory, for tests that run
//! both ends' chunk streams with no network (built only for tests and with the `testkit`
//! feature: it is not in the production library).
//!
//! What it does not: decide which chunk goes next, check a header against the offer, verify
//! a CRC32C or write a file. The machines (`ferry_wire::proto::source` and `::target`)
//! decide what moves, and the chunk streams (`ship`, `chunks_in`) check and write it; a
//! transport only moves frames, and never looks inside a body.
//!
//! Invariants: a lane delivers the frames sent on it in order, each whole or not at all (a
//! lane that fails mid-frame is an error, never a short frame); lanes are independent.

use std::future::Future;

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;

use super::framing::{write_chunk, BodyPieces, FrameReader};
use super::TransferError;

/// The source's end of one lane: chunk frames, sent in order.
pub trait ChunkLane: Send {
    /// Sends one chunk frame (header, then body).
    fn send(&mut self, header: &FrameHeader, body: Bytes) -> impl Future<Output = Result<(), TransferError>> + Send;
    /// No more frames on this lane: posts the lane's end and returns at once, whether or not
    /// the frames were delivered yet (a caller that checks delivery itself may use it).
    fn finish(self) -> Result<(), TransferError>;
    /// No more frames on this lane, and every frame sent on it left this end: resolves once
    /// the transport no longer holds any of them (RDMA: every write completed), or fails,
    /// retryably, when that does not happen within the lane's timeout. The chunk streams end
    /// their lanes with it, so a lane whose last frames vanished fails its attempt (and the
    /// copy resumes) instead of passing as sent.
    fn end(self) -> impl Future<Output = Result<(), TransferError>> + Send
    where
        Self: Sized,
    {
        async move { self.finish() }
    }
}

/// What a source opens lanes on (a connection to its target).
pub trait ChunkLanes: Clone + Send + Sync + 'static {
    type Lane: ChunkLane + 'static;
    fn open(&self) -> impl Future<Output = Result<Self::Lane, TransferError>> + Send;
}

/// The target's end of one lane.
pub trait IncomingLane: Send {
    /// The next frame's header (`None`: the lane finished cleanly).
    fn next_header(&mut self) -> impl Future<Output = Result<Option<FrameHeader>, TransferError>> + Send;
    /// The body of the frame whose header came last, into `body` (its pieces as they arrived).
    fn read_body(
        &mut self,
        header: &FrameHeader,
        body: &mut BodyPieces,
    ) -> impl Future<Output = Result<(), TransferError>> + Send;
}

/// What a target accepts lanes from (a connection from its source).
pub trait ChunkArrivals: Clone + Send + Sync + 'static {
    type Incoming: IncomingLane + 'static;
    /// The next lane the source opened; an error once the path is gone.
    fn accept(&self) -> impl Future<Output = Result<Self::Incoming, TransferError>> + Send;
}

impl ChunkLane for quinn::SendStream {
    async fn send(&mut self, header: &FrameHeader, body: Bytes) -> Result<(), TransferError> {
        write_chunk(self, header, body).await
    }

    fn finish(mut self) -> Result<(), TransferError> {
        quinn::SendStream::finish(&mut self).map_err(|e| TransferError::Connection(e.to_string()))
    }
}

impl ChunkLanes for quinn::Connection {
    type Lane = quinn::SendStream;

    async fn open(&self) -> Result<quinn::SendStream, TransferError> {
        Ok(self.open_uni().await?)
    }
}

impl IncomingLane for FrameReader {
    async fn next_header(&mut self) -> Result<Option<FrameHeader>, TransferError> {
        self.read_header().await
    }

    async fn read_body(&mut self, header: &FrameHeader, body: &mut BodyPieces) -> Result<(), TransferError> {
        FrameReader::read_body(self, header, body).await
    }
}

impl ChunkArrivals for quinn::Connection {
    type Incoming = FrameReader;

    async fn accept(&self) -> Result<FrameReader, TransferError> {
        Ok(FrameReader::new(self.accept_uni().await?))
    }
}

#[cfg(any(test, feature = "testkit"))]
pub mod memory;
