//! Lanes in memory: bounded channels of whole frames, for tests of both ends' chunk
//! streams without a network. A lane holds at most [`LANE_FRAMES_MAX`] frames; opening
//! more than [`LANES_MAX`] lanes without accepting them fails.
//!
//! Built only for tests and with the `testkit` feature, never in the production library.

use std::sync::Arc;

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;
use tokio::sync::mpsc;

use super::{ChunkArrivals, ChunkLane, ChunkLanes, IncomingLane};
use crate::transfer::framing::BodyPieces;
use crate::transfer::TransferError;

/// Frames in flight on one lane.
pub const LANE_FRAMES_MAX: usize = 16;
/// Lanes opened and not accepted yet.
pub const LANES_MAX: usize = 64;

type Frame = (FrameHeader, Bytes);

/// The source's end: opens lanes.
#[derive(Debug, Clone)]
pub struct Opener(mpsc::Sender<mpsc::Receiver<Frame>>);

/// The target's end: accepts lanes.
#[derive(Debug, Clone)]
pub struct Acceptor(Arc<tokio::sync::Mutex<mpsc::Receiver<mpsc::Receiver<Frame>>>>);

/// A path between one source and one target.
pub fn path() -> (Opener, Acceptor) {
    let (tx, rx) = mpsc::channel(LANES_MAX);
    (Opener(tx), Acceptor(Arc::new(tokio::sync::Mutex::new(rx))))
}

#[derive(Debug)]
pub struct Lane(mpsc::Sender<Frame>);

impl ChunkLane for Lane {
    async fn send(&mut self, header: &FrameHeader, body: Bytes) -> Result<(), TransferError> {
        self.0.send((*header, body)).await.map_err(|_| TransferError::Connection("the lane was closed".into()))
    }

    fn finish(self) -> Result<(), TransferError> {
        Ok(())
    }
}

impl ChunkLanes for Opener {
    type Lane = Lane;

    async fn open(&self) -> Result<Lane, TransferError> {
        let (tx, rx) = mpsc::channel(LANE_FRAMES_MAX);
        self.0.try_send(rx).map_err(|_| TransferError::Connection("no lane can be opened".into()))?;
        Ok(Lane(tx))
    }
}

/// The target's end of a lane; the body of the last header waits here.
#[derive(Debug)]
pub struct Incoming {
    frames: mpsc::Receiver<Frame>,
    body: Option<Bytes>,
}

impl IncomingLane for Incoming {
    async fn next_header(&mut self) -> Result<Option<FrameHeader>, TransferError> {
        let Some((header, body)) = self.frames.recv().await else { return Ok(None) };
        self.body = Some(body);
        Ok(Some(header))
    }

    async fn read_body(&mut self, _header: &FrameHeader, body: &mut BodyPieces) -> Result<(), TransferError> {
        let piece = self.body.take().ok_or_else(|| TransferError::Local("a body read before its header".into()))?;
        body.clear();
        body.push(piece);
        Ok(())
    }
}

impl ChunkArrivals for Acceptor {
    type Incoming = Incoming;

    async fn accept(&self) -> Result<Incoming, TransferError> {
        match self.0.lock().await.recv().await {
            Some(frames) => Ok(Incoming { frames, body: None }),
            None => Err(TransferError::Connection("the source's end of the path is gone".into())),
        }
    }
}
