//! Setting up an RDMA path: queue pairs, buffers and the handshake that joins them.
//!
//! What it does: the source makes one queue pair per lane and its staging pool and tells the
//! target their addresses ([`prepare_source`]); the target makes its queue pairs and receive
//! slots, connects, posts its receives and answers with its addresses and slots
//! ([`accept_source`]); the source connects ([`SourcePrepared::connect`]). The handshakes go
//! over the transfer's QUIC connection as control frames ([`send_handshake`],
//! [`recv_handshake`]); the RDMA path never carries control or WAL.
//!
//! What it does not: choose RDMA over QUIC (`select` does) or move chunks (`lane`,
//! `incoming`).
//!
//! Invariants: every count taken from the peer's handshake is checked against this end's
//! configuration before anything is made for it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_wire::frame::{FrameHeader, FrameKind};
use ferry_wire::rdma::{LaneEndpoint, RdmaHandshake, RemoteSlot, HANDSHAKE_LEN_MAX_BYTES, SLOT_LEN_MAX_BYTES};

use super::incoming::{RdmaArrivals, RdmaIncoming};
use super::lane::{RdmaLane, RdmaLanes};
use super::pool::Pool;
use super::verbs::{Device, QpAddress, QueuePair};
use super::{count_u32, verbs_error, HEADER_LEN_U32};
use crate::transfer::framing;
use crate::transfer::TransferError;

/// The shape of an RDMA path, the same on both ends' configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathConfig {
    /// Lanes (queue pairs): chunk streams, as the QUIC path's uni streams.
    pub lanes_count: u32,
    /// Frames in flight per lane (target slots).
    pub slots_per_lane: u32,
    /// One chunk frame: the 32-byte header and the largest chunk.
    pub slot_len_bytes: u32,
    /// The source's staging buffers, shared by its lanes.
    pub staging_buffers_count: u32,
    /// How long a lane waits for a completion before its attempt fails (and resumes).
    pub completion_timeout: Duration,
}

impl PathConfig {
    /// For chunks of `chunk_len_bytes`.
    pub fn for_chunks(chunk_len_bytes: u32, lanes_count: u32) -> Self {
        Self {
            lanes_count,
            slots_per_lane: 8,
            slot_len_bytes: chunk_len_bytes.saturating_add(HEADER_LEN_U32),
            staging_buffers_count: lanes_count.saturating_mul(8),
            completion_timeout: Duration::from_secs(10),
        }
    }

    /// Work requests per queue: the slots, the lane's end, a credit in flight.
    fn qp_depth(&self) -> u32 {
        self.slots_per_lane + 2
    }

    fn check(&self) -> Result<(), TransferError> {
        let fits = (1..=count_u32(ferry_wire::rdma::LANES_MAX)).contains(&self.lanes_count)
            && (1..=count_u32(ferry_wire::rdma::SLOTS_PER_LANE_MAX)).contains(&self.slots_per_lane)
            && (HEADER_LEN_U32 + 1..=SLOT_LEN_MAX_BYTES).contains(&self.slot_len_bytes)
            && self.staging_buffers_count > 0;
        if !fits {
            return Err(TransferError::Local(format!("an rdma path configuration out of its limits: {self:?}")));
        }
        Ok(())
    }
}

/// The source's queue pairs and staging, waiting for the target's answer.
#[derive(Debug)]
pub struct SourcePrepared<D: Device> {
    qps: Vec<D::Qp>,
    staging: Arc<Pool<D::Region>>,
    config: PathConfig,
}

fn endpoint(address: QpAddress, slot_len_bytes: u32, slots: Vec<RemoteSlot>) -> LaneEndpoint {
    LaneEndpoint { qpn: address.qpn, lid: address.lid, gid: address.gid, slot_len_bytes, slots }
}

fn peer_address(lane: &LaneEndpoint) -> QpAddress {
    QpAddress { qpn: lane.qpn, lid: lane.lid, gid: lane.gid }
}

/// The source's first half: its queue pairs and staging, and the handshake to send.
pub fn prepare_source<D: Device>(
    device: &D,
    config: PathConfig,
) -> Result<(SourcePrepared<D>, RdmaHandshake), TransferError> {
    config.check()?;
    let staging =
        Pool::register(device, u64::from(config.slot_len_bytes), config.staging_buffers_count).map_err(verbs_error)?;
    let qps = (0..config.lanes_count)
        .map(|_| device.create_qp(config.qp_depth()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(verbs_error)?;
    let lanes = qps.iter().map(|qp| endpoint(qp.address(), 0, Vec::new())).collect();
    Ok((SourcePrepared { qps, staging, config }, RdmaHandshake { lanes }))
}

/// The target's half: queue pairs connected to the source's, slots registered and receives
/// posted; the lanes to accept, and the handshake to answer with.
pub fn accept_source<D: Device>(
    device: &D,
    source: &RdmaHandshake,
    config: PathConfig,
) -> Result<(RdmaArrivals<D>, RdmaHandshake), TransferError> {
    config.check()?;
    let lanes_count = count_u32(source.lanes.len());
    if lanes_count == 0 || lanes_count > config.lanes_count {
        return Err(TransferError::Protocol(format!(
            "the source asked for {lanes_count} rdma lanes; this target takes 1 to {}",
            config.lanes_count
        )));
    }
    let slots = Pool::register(device, u64::from(config.slot_len_bytes), lanes_count * config.slots_per_lane)
        .map_err(verbs_error)?;
    let (mut incoming, mut answer) = (Vec::new(), Vec::new());
    for source_lane in &source.lanes {
        let mut qp = device.create_qp(config.qp_depth()).map_err(verbs_error)?;
        qp.connect(&peer_address(source_lane)).map_err(verbs_error)?;
        // One receive per slot and one for the lane's end.
        for wr_id in 0..=config.slots_per_lane {
            qp.post_recv(u64::from(wr_id)).map_err(verbs_error)?;
        }
        let lane_slots = (0..config.slots_per_lane)
            .map(|_| slots.try_acquire().ok_or_else(|| TransferError::Local("the slot pool is short".into())))
            .collect::<Result<Vec<_>, _>>()?;
        let remote = lane_slots.iter().map(|s| s.remote()).map(|r| RemoteSlot { addr: r.addr, rkey: r.rkey }).collect();
        answer.push(endpoint(qp.address(), config.slot_len_bytes, remote));
        incoming.push(RdmaIncoming {
            qp,
            slots: lane_slots,
            expected_seq: 0,
            arrived: HashMap::new(),
            current: None,
            finished: false,
            completions: Vec::new(),
        });
    }
    // Lanes are accepted from the back: keep them in the source's order.
    incoming.reverse();
    let arrivals = RdmaArrivals { lanes: Arc::new(Mutex::new(incoming)), closed: Arc::default() };
    Ok((arrivals, RdmaHandshake { lanes: answer }))
}

impl<D: Device> SourcePrepared<D> {
    /// The source's second half: connects to the target's answer; the lanes to open.
    pub fn connect(self, target: &RdmaHandshake) -> Result<RdmaLanes<D>, TransferError> {
        if target.lanes.len() != self.qps.len() {
            return Err(TransferError::Protocol(format!(
                "the target answered {} rdma lanes for {}",
                target.lanes.len(),
                self.qps.len()
            )));
        }
        let mut lanes = Vec::new();
        for (mut qp, target_lane) in self.qps.into_iter().zip(&target.lanes) {
            if target_lane.slots.is_empty() || target_lane.slot_len_bytes <= HEADER_LEN_U32 {
                return Err(TransferError::Protocol("the target answered an rdma lane without slots".into()));
            }
            qp.connect(&peer_address(target_lane)).map_err(verbs_error)?;
            // A receive for each credit that can be on its way.
            for wr_id in 0..target_lane.slots.len() {
                qp.post_recv(wr_id as u64).map_err(verbs_error)?;
            }
            lanes.push(RdmaLane {
                qp,
                staging: self.staging.clone(),
                slots: target_lane.slots.clone(),
                slot_len_bytes: target_lane.slot_len_bytes.min(self.config.slot_len_bytes),
                next_seq: 0,
                credited_seq: 0,
                in_flight: VecDeque::new(),
                timeout: self.config.completion_timeout,
                completions: Vec::new(),
            });
        }
        lanes.reverse();
        Ok(RdmaLanes(Arc::new(Mutex::new(lanes))))
    }
}

/// Sends a handshake on a QUIC stream, as one control frame.
pub async fn send_handshake(send: &mut quinn::SendStream, handshake: &RdmaHandshake) -> Result<(), TransferError> {
    let body = handshake.encode().map_err(|e| TransferError::Local(e.to_string()))?;
    let frame = ferry_wire::frame::encode_control(&body)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads a handshake from a QUIC stream; a frame of another kind or over the handshake's
/// limit is refused before its body is read.
pub async fn recv_handshake(recv: &mut quinn::RecvStream) -> Result<RdmaHandshake, TransferError> {
    let header: FrameHeader = framing::read_header(recv)
        .await?
        .ok_or_else(|| TransferError::Connection("the stream ended before the rdma handshake".into()))?;
    if header.kind != FrameKind::Control || header.body_len_bytes as usize > HANDSHAKE_LEN_MAX_BYTES {
        return Err(TransferError::Malformed(format!(
            "a {:?} frame of {} bytes where the rdma handshake was due",
            header.kind, header.body_len_bytes
        )));
    }
    let body = framing::read_body(recv, &header).await?;
    header.check_body(&body)?;
    RdmaHandshake::decode(&body).map_err(|e| TransferError::Malformed(e.to_string()))
}
