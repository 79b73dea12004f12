//! The WAL stream of one simulated connection, both ends: the source's `SourceWal` machine and
//! tail over the writer's records, and the target's production group step
//! (`walrecv::stage_bodies` into a `StagedWal` on the fake storage, with the fence's
//! `unfence_hook`).
//!
//! What it does: [`WalStream`] holds the stream's queues both ways and the source tail's
//! position. The source reads the writer's records in LSN order ([`WalStream::tail_step`]),
//! selects the migrating vShard's records above the base, holds back those above a fence's
//! ceiling, and sends batches framed by the production codec (`walstream::push`). The target
//! answers `WalStart` with its staged WAL's durable LSN and stages each group of batches the
//! seed draws (one or several frames at once, as the daemon's stager takes every frame
//! already read) before it acknowledges the group with `WalDurable`.
//!
//! What it does not: read files on the source (the engine's `FolderTail` does, with its own
//! tests), or hold WAL segments (`walsend::Holder`).

use std::collections::{BTreeMap, VecDeque};

use ferry_engine::transfer::fence_target::unfence_hook;
use ferry_engine::transfer::walrecv::stage_bodies;
use ferry_engine::transfer::TransferError;
use ferry_wire::fence::DrainState;
use ferry_wire::message::Message;
use ferry_wire::proto::source_wal::{SourceWal, WalAction};
use ferry_wire::proto::target::{check_wal_start, wal_durable};
use ferry_wire::walstream::{self, WalBatchRecord};
use ferry_wire::{Lsn, MigrationId};

use super::target::{Target, TargetEnd};
use super::writer::{Writer, VSHARD};
use super::{Coverage, Rng};

/// A message on the WAL stream towards the target.
#[derive(Debug, Clone)]
pub enum ToTarget {
    Control(Message),
    /// A WAL batch frame's body.
    Batch(Vec<u8>),
}

/// The WAL stream of one connection.
pub struct WalStream {
    pub machine: SourceWal,
    base: Lsn,
    pub to_target: VecDeque<ToTarget>,
    pub to_source: VecDeque<Message>,
    /// The tail runs once the target said where to start.
    started: bool,
    /// The next of the writer's records the tail reads.
    read_index: usize,
    pub drain: DrainState,
    /// Selected records read and not sent yet (indices into the writer's records).
    pending: VecDeque<usize>,
    /// Selected records above the ceiling, held back until the fence fails.
    held: Vec<usize>,
    ceiling: Option<Lsn>,
}

impl WalStream {
    pub fn open(base: Lsn) -> Self {
        let mut stream = Self {
            machine: SourceWal::new(base),
            base,
            to_target: VecDeque::new(),
            to_source: VecDeque::new(),
            started: false,
            read_index: 0,
            drain: DrainState { scanned_lsn: base, last_selected_lsn: None },
            pending: VecDeque::new(),
            held: Vec::new(),
            ceiling: None,
        };
        // A new stream's only action is its `WalStart`.
        while let Some(WalAction::Send(message)) = stream.machine.poll_action() {
            stream.to_target.push_back(ToTarget::Control(message));
        }
        stream
    }

    /// Whether the tail has a record to read.
    pub fn can_read(&self, writer: &Writer) -> bool {
        self.started && self.machine.wants_records() && self.read_index < writer.records.len()
    }

    pub fn can_send(&self) -> bool {
        !self.pending.is_empty()
    }

    /// From the fence's start, no record above `final_lsn` is sent.
    pub fn set_ceiling(&mut self, final_lsn: Lsn) {
        self.ceiling = Some(final_lsn);
    }

    /// The fence failed: what was held back goes out.
    pub fn lift_ceiling(&mut self) {
        self.ceiling = None;
        self.pending.extend(self.held.drain(..));
    }

    /// The tail reads one record.
    pub fn tail_step(&mut self, writer: &Writer) {
        let Some(record) = writer.records.get(self.read_index) else { return };
        let index = self.read_index;
        self.read_index += 1;
        self.drain.scanned_lsn = record.lsn;
        if record.vshard != VSHARD || record.lsn <= self.base {
            return;
        }
        self.drain.last_selected_lsn = Some(record.lsn);
        match self.ceiling {
            Some(ceiling) if record.lsn > ceiling => self.held.push(index),
            _ => self.pending.push_back(index),
        }
    }

    /// Sends up to `most` selected records as one batch frame.
    pub fn send_batch(&mut self, writer: &Writer, most: usize) -> Result<(), String> {
        let mut body = Vec::new();
        let mut last = None;
        while last.is_none() || body.len() < most {
            let Some(index) = self.pending.front().copied() else { break };
            let Some(record) = writer.records.get(index) else { break };
            let batch_record = WalBatchRecord { lsn: record.lsn, source_preamble: None, bytes: &record.bytes };
            if !walstream::push(&mut body, &batch_record) {
                break;
            }
            self.pending.pop_front();
            last = Some(record.lsn);
        }
        let Some(last) = last else { return Ok(()) };
        self.machine.handle_batch_sent(last).map_err(|e| e.to_string())?;
        self.to_target.push_back(ToTarget::Batch(body));
        Ok(())
    }

    /// The source takes the target's next message.
    pub fn deliver_to_source(&mut self, writer: &Writer) -> Result<(), String> {
        let message = self.to_source.pop_front();
        self.machine.handle_message(message).map_err(|e| e.to_string())?;
        self.drain_source(writer);
        Ok(())
    }

    fn drain_source(&mut self, writer: &Writer) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                WalAction::Send(message) => self.to_target.push_back(ToTarget::Control(message)),
                WalAction::Start { durable_lsn } => {
                    // The tail starts after what the target holds.
                    self.started = true;
                    self.read_index = writer.records.partition_point(|r| r.lsn <= durable_lsn);
                    self.drain = DrainState { scanned_lsn: durable_lsn, last_selected_lsn: None };
                    self.pending.clear();
                    self.held.clear();
                }
                WalAction::Durable { .. } | WalAction::Finish { .. } => {}
            }
        }
    }

    /// The target takes the next message, or the next group of batch frames (as many as the
    /// seed draws of those waiting), as the daemon's WAL stream does.
    pub fn deliver_to_target(
        &mut self,
        end: &TargetEnd,
        target: &Target,
        acked: &mut BTreeMap<MigrationId, Lsn>,
        rng: &mut Rng,
        cov: &mut Coverage,
    ) -> Result<(), TransferError> {
        let Some((offer, layout)) = end.admitted.as_ref() else {
            return Err(TransferError::Protocol("a WAL stream before the offer was admitted".into()));
        };
        let (ctx, id) = (&target.ctx, &offer.migration_id);
        let mut bodies = Vec::new();
        match self.to_target.pop_front() {
            None => return Ok(()),
            Some(ToTarget::Control(message)) => {
                check_wal_start(Some(message))?;
                let wal = ctx.wal_stages.get_or_open(&ctx.storage, layout, id, offer.base_lsn)?;
                let durable = wal.lock().unwrap_or_else(|e| e.into_inner()).durable_lsn();
                ctx.set_wal_durable(id, durable);
                self.to_source.push_back(wal_durable(durable));
                return Ok(());
            }
            Some(ToTarget::Batch(body)) => bodies.push(body),
        }
        // Frames already read join the group.
        while rng.chance(500) {
            match self.to_target.front() {
                Some(ToTarget::Batch(_)) => {
                    if let Some(ToTarget::Batch(body)) = self.to_target.pop_front() {
                        bodies.push(body);
                    }
                }
                _ => break,
            }
        }
        cov.hit(if bodies.len() > 1 { "wal: group of several frames" } else { "wal: group of one frame" });
        let wal =
            ctx.wal_stages.get(id).ok_or_else(|| TransferError::Protocol("a WAL batch before wal_start".into()))?;
        let hook = unfence_hook(ctx.clone(), id.clone(), layout.clone());
        let slices: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        let durable = stage_bodies(&wal, &slices, &*hook)?;
        ctx.set_wal_durable(id, durable);
        let before = acked.entry(id.clone()).or_insert(durable);
        *before = (*before).max(durable);
        self.to_source.push_back(wal_durable(durable));
        Ok(())
    }
}
