//! A fake verbs device, in process and memory to memory, for the RDMA path's tests.
//!
//! What it does: a [`Fabric`] joins any number of [`FakeDevice`]s; a write with immediate
//! copies bytes from the local region into the peer's region (checking the rkey and range,
//! as a NIC does), completes on the writer's queue and consumes one posted receive on the
//! peer's. [`Faults`] inject what hardware does wrong: a completion in error (the queue pair
//! then goes to error, as RC does), a lost write (nothing placed, no completion, ever), a lost
//! queue pair, completions held back for some polls, and receive completions swapped; and
//! [`Fabric::lose_devices`] loses whole devices (a reset: only a device opened again works).
//!
//! What it does not: model timing, packet loss below RC, or memory windows. Built only for
//! tests and with the `testkit` feature.
//!
//! Invariants: queues are bounded by the depth a queue pair was made with (a post past it
//! fails, as `ENOMEM` does); a broken queue pair fails every later post and flushes its
//! receives in error.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::verbs::{
    Completion, CompletionKind, Device, DeviceLimits, QpAddress, QueuePair, Region, RemoteBuffer, VerbsError, WriteImm,
};
use super::POLL_BATCH_COUNT;

/// What goes wrong, counted over the whole fabric's writes (1 = the first write posted).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// This write completes with a remote access error; its queue pair and the peer's break.
    pub fail_write: Option<u64>,
    /// This write vanishes: nothing is placed, no completion comes on either side.
    pub lose_write: Option<u64>,
    /// On every queue pair, its Nth write that carries bytes (1 = its first frame) vanishes
    /// as `lose_write` does: with N a lane's frame count, the lane's last frame.
    pub lose_payload_write_per_qp: Option<u64>,
    /// From this write on, the queue pair is lost: the write and every later post fail.
    pub lose_qp_at_write: Option<u64>,
    /// Every completion becomes visible only after this many polls of its queue.
    pub delay_polls: u32,
    /// Each receive completion is put before the one queued ahead of it.
    pub reorder_receives: bool,
}

/// The network between fake devices.
#[derive(Debug, Clone, Default)]
pub struct Fabric(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    regions: HashMap<u32, Arc<Mutex<Vec<u8>>>>,
    qps: HashMap<u32, QpState>,
    next_key: u32,
    writes_count: u64,
    faults: Faults,
    /// Devices made so far (each one's number is the count before it).
    devices_count: u64,
    /// Devices numbered below this one were lost ([`Fabric::lose_devices`]).
    devices_lost_below: u64,
}

#[derive(Debug, Default)]
struct QpState {
    peer: Option<u32>,
    depth: u32,
    recvs: VecDeque<u64>,
    /// The device it was made on.
    device: u64,
    sends_outstanding: u32,
    /// Writes posted here that carried bytes.
    payload_writes_count: u64,
    /// Completions and the polls each still waits.
    cq: VecDeque<(Completion, u32)>,
    broken: Option<String>,
}

impl Fabric {
    pub fn new(faults: Faults) -> Self {
        Self(Arc::new(Mutex::new(State { next_key: 1, faults, ..State::default() })))
    }

    /// A device on this fabric.
    pub fn device(&self, limits: DeviceLimits) -> FakeDevice {
        let mut state = self.lock();
        let number = state.devices_count;
        state.devices_count += 1;
        FakeDevice { fabric: self.clone(), limits, number }
    }

    /// Every device made so far is lost, as after a fatal device error or a reset: its
    /// registrations and new queue pairs fail, its queue pairs (and their peers) go to error.
    /// Devices made from now on work.
    pub fn lose_devices(&self) {
        let mut state = self.lock();
        state.devices_lost_below = state.devices_count;
        let lost: Vec<u32> =
            state.qps.iter().filter(|(_, qp)| qp.device < state.devices_lost_below).map(|(qpn, _)| *qpn).collect();
        for qpn in lost {
            state.break_pair(qpn, "the device was lost");
        }
    }

    /// Changes the faults from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Writes posted on the fabric so far.
    pub fn writes_count(&self) -> u64 {
        self.lock().writes_count
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn key(&mut self) -> u32 {
        self.next_key += 1;
        self.next_key
    }

    fn qp(&mut self, qpn: u32) -> Result<&mut QpState, VerbsError> {
        self.qps.get_mut(&qpn).ok_or_else(|| VerbsError::Device(format!("no queue pair {qpn:#x}")))
    }

    /// Both ends to error; their receives flush.
    fn break_pair(&mut self, qpn: u32, reason: &str) {
        let peer = self.qps.get(&qpn).and_then(|qp| qp.peer);
        for end in [Some(qpn), peer].into_iter().flatten() {
            if let Some(qp) = self.qps.get_mut(&end) {
                qp.broken.get_or_insert_with(|| reason.to_owned());
                for wr_id in qp.recvs.drain(..) {
                    let kind = CompletionKind::RecvImm { imm: 0, len_bytes: 0 };
                    qp.cq.push_back((Completion { wr_id, kind, error: Some("work request flushed".into()) }, 0));
                }
            }
        }
    }

    fn place(&mut self, remote: RemoteBuffer, bytes: &[u8]) -> Result<(), String> {
        // A zero-length write touches no memory: hardware checks no rkey for it either.
        if bytes.is_empty() {
            return Ok(());
        }
        let region = self.regions.get(&remote.rkey).ok_or("remote access error: unknown rkey")?;
        let offset =
            remote.addr.checked_sub(region_base(remote.rkey)).ok_or("remote access error: below the region")?;
        let mut memory = region.lock().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| "remote access error: address")?;
        let target =
            memory.get_mut(start..start.saturating_add(bytes.len())).ok_or("remote access error: past the region")?;
        target.copy_from_slice(bytes);
        Ok(())
    }
}

/// Fake addresses: each region in its own 4 GiB window, so an address names its region.
fn region_base(rkey: u32) -> u64 {
    u64::from(rkey) << 32
}

/// A device on a [`Fabric`].
#[derive(Debug, Clone)]
pub struct FakeDevice {
    fabric: Fabric,
    limits: DeviceLimits,
    /// Its place among the fabric's devices (a lost device fails every call).
    number: u64,
}

impl FakeDevice {
    fn usable(&self, state: &State) -> Result<(), VerbsError> {
        if self.number < state.devices_lost_below {
            return Err(VerbsError::Device("the device was lost (injected)".into()));
        }
        Ok(())
    }
}

/// A region of a fake device: plain memory.
#[derive(Debug)]
pub struct FakeRegion {
    rkey: u32,
    memory: Arc<Mutex<Vec<u8>>>,
}

impl Region for FakeRegion {
    fn len_bytes(&self) -> u64 {
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn remote(&self) -> RemoteBuffer {
        RemoteBuffer { addr: region_base(self.rkey), rkey: self.rkey }
    }

    fn write(&self, offset_bytes: u64, bytes: &[u8]) -> Result<(), VerbsError> {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let region_len_bytes = memory.len() as u64;
        let out_of_range = || VerbsError::OutOfRange { offset_bytes, len_bytes: bytes.len() as u64, region_len_bytes };
        let start = usize::try_from(offset_bytes).map_err(|_| out_of_range())?;
        memory.get_mut(start..start.saturating_add(bytes.len())).ok_or_else(out_of_range)?.copy_from_slice(bytes);
        Ok(())
    }

    fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>, VerbsError> {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let region_len_bytes = memory.len() as u64;
        let out_of_range = || VerbsError::OutOfRange { offset_bytes, len_bytes, region_len_bytes };
        let start = usize::try_from(offset_bytes).map_err(|_| out_of_range())?;
        let len = usize::try_from(len_bytes).map_err(|_| out_of_range())?;
        Ok(memory.get(start..start.saturating_add(len)).ok_or_else(out_of_range)?.to_vec())
    }
}

impl Device for FakeDevice {
    type Region = FakeRegion;
    type Qp = FakeQp;

    fn name(&self) -> &str {
        "fake0"
    }

    fn limits(&self) -> DeviceLimits {
        self.limits
    }

    fn register(&self, len_bytes: u64) -> Result<FakeRegion, VerbsError> {
        if len_bytes > self.limits.max_mr_size_bytes || len_bytes > u64::from(u32::MAX) {
            return Err(VerbsError::Device(format!("{len_bytes} bytes is over max_mr_size")));
        }
        let mut state = self.fabric.lock();
        self.usable(&state)?;
        let rkey = state.key();
        let memory = Arc::new(Mutex::new(vec![0; super::len_usize(len_bytes)?]));
        state.regions.insert(rkey, memory.clone());
        Ok(FakeRegion { rkey, memory })
    }

    fn create_qp(&self, depth: u32) -> Result<FakeQp, VerbsError> {
        if depth > self.limits.max_qp_wr {
            return Err(VerbsError::Device(format!("a queue of {depth} is over max_qp_wr {}", self.limits.max_qp_wr)));
        }
        let mut state = self.fabric.lock();
        self.usable(&state)?;
        let qpn = state.key();
        state.qps.insert(qpn, QpState { depth, device: self.number, ..QpState::default() });
        Ok(FakeQp { fabric: self.fabric.clone(), qpn })
    }
}

/// A queue pair of a fake device.
#[derive(Debug)]
pub struct FakeQp {
    fabric: Fabric,
    qpn: u32,
}

impl FakeQp {
    fn usable(state: &mut State, qpn: u32) -> Result<(), VerbsError> {
        match &state.qp(qpn)?.broken {
            Some(reason) => Err(VerbsError::QpBroken { qpn, reason: reason.clone() }),
            None => Ok(()),
        }
    }
}

impl QueuePair for FakeQp {
    type Region = FakeRegion;

    fn address(&self) -> QpAddress {
        let mut gid = [0; 16];
        gid[12..].copy_from_slice(&self.qpn.to_be_bytes());
        QpAddress { qpn: self.qpn, lid: 1, gid }
    }

    fn connect(&mut self, peer: &QpAddress) -> Result<(), VerbsError> {
        let mut state = self.fabric.lock();
        state.qp(peer.qpn)?;
        state.qp(self.qpn)?.peer = Some(peer.qpn);
        Ok(())
    }

    fn post_write_imm(&mut self, wr: WriteImm<'_, FakeRegion>) -> Result<(), VerbsError> {
        let mut state = self.fabric.lock();
        Self::usable(&mut state, self.qpn)?;
        let qp = state.qp(self.qpn)?;
        let peer = qp.peer.ok_or_else(|| VerbsError::Device("a write on a queue pair not connected".into()))?;
        if qp.sends_outstanding >= qp.depth {
            return Err(VerbsError::Device("send queue full".into()));
        }
        qp.sends_outstanding += 1;
        if wr.len_bytes > 0 {
            qp.payload_writes_count += 1;
        }
        let payload_number = qp.payload_writes_count;
        state.writes_count += 1;
        let number = state.writes_count;
        let faults = state.faults.clone();
        if faults.lose_qp_at_write.is_some_and(|at| number >= at) {
            state.break_pair(self.qpn, "the queue pair was lost");
            return Err(VerbsError::QpBroken { qpn: self.qpn, reason: "the queue pair was lost".into() });
        }
        if faults.lose_write == Some(number)
            || (wr.len_bytes > 0 && faults.lose_payload_write_per_qp == Some(payload_number))
        {
            return Ok(());
        }
        let bytes = match wr.local {
            Some(local) if wr.len_bytes > 0 => local.read(wr.local_offset_bytes, u64::from(wr.len_bytes))?,
            _ => Vec::new(),
        };
        let placed = if faults.fail_write == Some(number) {
            Err("remote access error (injected)".to_owned())
        } else {
            state.place(wr.remote, &bytes)
        };
        let delay = faults.delay_polls;
        let peer_qp = state.qp(peer)?;
        let placed = placed.and_then(|()| peer_qp.recvs.pop_front().ok_or_else(|| "receiver not ready".to_owned()));
        match placed {
            Ok(recv_wr_id) => {
                let kind = CompletionKind::RecvImm { imm: wr.imm, len_bytes: wr.len_bytes };
                let done = (Completion { wr_id: recv_wr_id, kind, error: None }, delay);
                match peer_qp.cq.back() {
                    Some((Completion { kind: CompletionKind::RecvImm { .. }, .. }, _)) if faults.reorder_receives => {
                        let at = peer_qp.cq.len() - 1;
                        peer_qp.cq.insert(at, done);
                    }
                    _ => peer_qp.cq.push_back(done),
                }
                let done = Completion { wr_id: wr.wr_id, kind: CompletionKind::WriteDone, error: None };
                state.qp(self.qpn)?.cq.push_back((done, delay));
            }
            Err(reason) => {
                let failed =
                    Completion { wr_id: wr.wr_id, kind: CompletionKind::WriteDone, error: Some(reason.clone()) };
                state.qp(self.qpn)?.cq.push_back((failed, delay));
                state.break_pair(self.qpn, &reason);
            }
        }
        Ok(())
    }

    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        let mut state = self.fabric.lock();
        Self::usable(&mut state, self.qpn)?;
        let qp = state.qp(self.qpn)?;
        if qp.recvs.len() >= qp.depth as usize {
            return Err(VerbsError::Device("receive queue full".into()));
        }
        qp.recvs.push_back(wr_id);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError> {
        let mut state = self.fabric.lock();
        let qp = state.qp(self.qpn)?;
        let mut taken = 0;
        while taken < POLL_BATCH_COUNT && qp.cq.front().is_some_and(|(_, wait)| *wait == 0) {
            let Some((completion, _)) = qp.cq.pop_front() else { break };
            if completion.kind == CompletionKind::WriteDone {
                qp.sends_outstanding = qp.sends_outstanding.saturating_sub(1);
            }
            out.push(completion);
            taken += 1;
        }
        for (_, wait) in &mut qp.cq {
            *wait = wait.saturating_sub(1);
        }
        Ok(())
    }
}
