//! The verbs seam over real hardware, through the `sideway` crate (feature `rdma`).
//!
//! What it does: maps each call of [`super::verbs`] onto one verbs call: `ibv_open_device` and
//! `ibv_query_*` ([`SidewayDevice::open`]), `ibv_reg_mr` on memory this module allocates,
//! `ibv_create_cq`/`ibv_create_qp`, `ibv_modify_qp` to INIT, RTR and RTS, `ibv_post_send`
//! (RDMA WRITE with immediate), `ibv_post_recv` and `ibv_poll_cq`.
//!
//! What it does not: hold logic or state beyond the verbs objects: no buffer accounting, no
//! sequence numbers, no retries. Nothing here runs without a device: it is exercised by
//! `hwtests` (`FERRY_HW=rdma`) only.
//!
//! Invariants: a region's memory outlives its registration (deregistered before it is freed);
//! every copy in or out and every posted local buffer is range-checked against its region.

use std::alloc::{self, Layout};
use std::net::Ipv6Addr;
use std::ptr::NonNull;
use std::sync::Arc;

use ::sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use ::sideway::ibverbs::completion::{
    BasicCompletionQueue, PollCompletionQueueError, WorkCompletionOperationType, WorkCompletionStatus,
};
use ::sideway::ibverbs::device::{DeviceInfo, DeviceList};
use ::sideway::ibverbs::device_context::{DeviceContext, Mtu};
use ::sideway::ibverbs::memory_region::MemoryRegion;
use ::sideway::ibverbs::protection_domain::ProtectionDomain;
use ::sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState, SetScatterGatherEntry,
    WorkRequestFlags,
};
use ::sideway::ibverbs::AccessFlags;

use super::len_usize;
use super::verbs::{
    Completion, CompletionKind, Device, DeviceLimits, QpAddress, QueuePair, Region, RemoteBuffer, VerbsError, WriteImm,
};

/// Staging and slot memory is page-aligned, as NICs prefer.
const PAGE_BYTES: usize = 4096;

fn device_error(e: impl std::fmt::Display) -> VerbsError {
    VerbsError::Device(e.to_string())
}

/// An opened device: its context and protection domain, on one port and GID index.
#[derive(Debug)]
pub struct SidewayDevice {
    name: String,
    context: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    port: u8,
    gid_index: u8,
    local: QpAddress,
    mtu: Mtu,
    limits: DeviceLimits,
}

impl SidewayDevice {
    /// Opens `name` (none: the first device) on `port` and `gid_index`.
    pub fn open(name: Option<&str>, port: u8, gid_index: u8) -> Result<Self, VerbsError> {
        let list = DeviceList::new().map_err(device_error)?;
        let device = list
            .iter()
            .find(|d| name.is_none_or(|want| d.name() == want))
            .ok_or_else(|| VerbsError::Device(format!("no rdma device {}", name.unwrap_or("at all"))))?;
        let context = device.open().map_err(device_error)?;
        let attr = context.query_device().map_err(device_error)?;
        let port_attr = context.query_port(port).map_err(device_error)?;
        let gid = context.query_gid(port, u32::from(gid_index)).map_err(device_error)?;
        let pd = context.alloc_pd().map_err(device_error)?;
        Ok(Self {
            name: device.name(),
            context,
            pd,
            port,
            gid_index,
            local: QpAddress { qpn: 0, lid: port_attr.lid(), gid: Ipv6Addr::from(gid).octets() },
            mtu: port_attr.active_mtu(),
            limits: DeviceLimits {
                max_mr_size_bytes: attr.max_mr_size(),
                max_qp_wr: u32::try_from(attr.max_qp_wr()).unwrap_or(0),
            },
        })
    }
}

/// Registered memory this module allocated.
#[derive(Debug)]
pub struct SidewayRegion {
    /// `Some` until drop: deregistered there before the memory is freed.
    mr: Option<Arc<MemoryRegion>>,
    memory: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region owns its allocation; copies in and out go through raw pointers to ranges
// the pool lends to one holder at a time, so no two threads touch the same bytes at once.
unsafe impl Send for SidewayRegion {}
// SAFETY: as above: `&self` methods only copy within range-checked, singly-held buffers.
unsafe impl Sync for SidewayRegion {}

impl SidewayRegion {
    fn range(&self, offset_bytes: u64, len_bytes: u64) -> Result<usize, VerbsError> {
        let region_len_bytes = self.layout.size() as u64;
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= region_len_bytes => len_usize(offset_bytes),
            _ => Err(VerbsError::OutOfRange { offset_bytes, len_bytes, region_len_bytes }),
        }
    }

    fn lkey(&self) -> u32 {
        self.mr.as_ref().map_or(0, |mr| mr.lkey())
    }
}

impl Region for SidewayRegion {
    fn len_bytes(&self) -> u64 {
        self.layout.size() as u64
    }

    fn remote(&self) -> RemoteBuffer {
        RemoteBuffer { addr: self.memory.as_ptr() as u64, rkey: self.mr.as_ref().map_or(0, |mr| mr.rkey()) }
    }

    fn write(&self, offset_bytes: u64, bytes: &[u8]) -> Result<(), VerbsError> {
        let at = self.range(offset_bytes, bytes.len() as u64)?;
        // SAFETY: `at..at + len` is inside the allocation (checked above) and `bytes` is not in it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.memory.as_ptr().add(at), bytes.len()) };
        Ok(())
    }

    fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>, VerbsError> {
        let at = self.range(offset_bytes, len_bytes)?;
        let mut out = vec![0; len_usize(len_bytes)?];
        // SAFETY: `at..at + len` is inside the allocation (checked above); `out` is fresh.
        unsafe { std::ptr::copy_nonoverlapping(self.memory.as_ptr().add(at), out.as_mut_ptr(), out.len()) };
        Ok(out)
    }
}

impl Drop for SidewayRegion {
    fn drop(&mut self) {
        drop(self.mr.take());
        // SAFETY: allocated in `register` with this layout, and no longer registered.
        unsafe { alloc::dealloc(self.memory.as_ptr(), self.layout) };
    }
}

/// A reliable-connected queue pair and its completion queue.
#[derive(Debug)]
pub struct SidewayQp {
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
    port: u8,
    gid_index: u8,
    mtu: Mtu,
    local: QpAddress,
}

impl Device for SidewayDevice {
    type Region = SidewayRegion;
    type Qp = SidewayQp;

    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> DeviceLimits {
        self.limits
    }

    fn register(&self, len_bytes: u64) -> Result<SidewayRegion, VerbsError> {
        if len_bytes == 0 || len_bytes > self.limits.max_mr_size_bytes {
            return Err(VerbsError::Device(format!("cannot register {len_bytes} bytes (max_mr_size)")));
        }
        let layout = Layout::from_size_align(len_usize(len_bytes)?, PAGE_BYTES).map_err(device_error)?;
        // SAFETY: the layout has a non-zero size.
        let memory = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })
            .ok_or_else(|| VerbsError::Device(format!("cannot allocate {len_bytes} bytes")))?;
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite;
        // SAFETY: `memory` is valid for `len_bytes` and freed only after the registration drops.
        let mr = unsafe { self.pd.reg_mr(memory.as_ptr() as usize, layout.size(), access) };
        match mr {
            Ok(mr) => Ok(SidewayRegion { mr: Some(mr), memory, layout }),
            Err(e) => {
                // SAFETY: allocated just above with this layout; never registered.
                unsafe { alloc::dealloc(memory.as_ptr(), layout) };
                Err(device_error(e))
            }
        }
    }

    fn create_qp(&self, depth: u32) -> Result<SidewayQp, VerbsError> {
        let cq = self.context.create_cq_builder().setup_cqe(depth.saturating_mul(2)).build().map_err(device_error)?;
        let qp = self
            .pd
            .create_qp_builder()
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .setup_max_send_wr(depth)
            .setup_max_recv_wr(depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .build()
            .map_err(device_error)?;
        let local = QpAddress { qpn: qp.qp_number(), ..self.local };
        Ok(SidewayQp { qp, cq, port: self.port, gid_index: self.gid_index, mtu: self.mtu, local })
    }
}

impl QueuePair for SidewayQp {
    type Region = SidewayRegion;

    fn address(&self) -> QpAddress {
        self.local
    }

    fn connect(&mut self, peer: &QpAddress) -> Result<(), VerbsError> {
        let mut init = QueuePairAttribute::new();
        init.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        self.qp.modify(&init).map_err(device_error)?;
        let mut path = AddressHandleAttribute::new();
        path.setup_dest_lid(peer.lid)
            .setup_port(self.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid::from(Ipv6Addr::from(peer.gid)))
            .setup_grh_hop_limit(1);
        let mut rtr = QueuePairAttribute::new();
        rtr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(0)
            .setup_max_dest_read_atomic(0)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&path);
        self.qp.modify(&rtr).map_err(device_error)?;
        let mut rts = QueuePairAttribute::new();
        rts.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(0)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(0);
        self.qp.modify(&rts).map_err(device_error)
    }

    fn post_write_imm(&mut self, wr: WriteImm<'_, SidewayRegion>) -> Result<(), VerbsError> {
        let local = match wr.local {
            Some(region) if wr.len_bytes > 0 => {
                let at = region.range(wr.local_offset_bytes, u64::from(wr.len_bytes))?;
                Some((region.lkey(), region.memory.as_ptr() as u64 + at as u64))
            }
            _ => None,
        };
        let mut guard = self.qp.start_post_send();
        let handle = guard.construct_wr(wr.wr_id, WorkRequestFlags::Signaled).setup_write_imm(
            wr.remote.rkey,
            wr.remote.addr,
            wr.imm.to_be(),
        );
        if let Some((lkey, addr)) = local {
            // SAFETY: `addr..addr + len` is inside a registered region (checked above) that the
            // caller keeps alive, unchanged, until this work request completes.
            unsafe { handle.setup_sge(lkey, addr, wr.len_bytes) };
        }
        guard.post().map_err(device_error)
    }

    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        let mut guard = self.qp.start_post_recv();
        guard.construct_wr(wr_id);
        guard.post().map_err(device_error)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError> {
        let poller = match self.cq.start_poll() {
            Ok(poller) => poller,
            Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(()),
            Err(e) => return Err(device_error(e)),
        };
        for wc in poller {
            let kind = if wc.opcode() == WorkCompletionOperationType::ReceiveWithImmediate as u32 {
                CompletionKind::RecvImm { imm: u32::from_be(wc.imm_data()), len_bytes: wc.byte_len() }
            } else {
                CompletionKind::WriteDone
            };
            let error = (wc.status() != WorkCompletionStatus::Success as u32).then(|| {
                format!("{:?} (vendor error {:#x})", WorkCompletionStatus::from(wc.status()), wc.vendor_err())
            });
            out.push(Completion { wr_id: wc.wr_id(), kind, error });
        }
        Ok(())
    }
}
