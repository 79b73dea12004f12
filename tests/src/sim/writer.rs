//! The simulated database writer on the source: WAL records of several vShards, in one of the
//! two header layouts (drawn per run), with the pause the coordinator asks for around a fence.
//!
//! What it does: [`Writer::write`] appends one record of a vShard the seed draws, encoded
//! with the production encoder (`ferry_wire::wal::encode_record`), and acknowledges it at
//! once, except a record of the migrating vShard while writes to it are paused or after it
//! moved to the target: that write is held (never acknowledged on the source while paused)
//! and written when writes resume on the source. [`Writer::pause`], [`Writer::resume`] and
//! [`Writer::move_away`] are the coordinator's.
//!
//! What it does not: write files. The source's tail reads `records` in order, as the
//! engine's `FolderTail` reads segment files (which has its own tests).

use ferry_wire::wal::{encode_record, Layout, RecordHeader};
use ferry_wire::{Lsn, VShardId};

use super::Rng;

/// The vShard every copy migrates.
pub const VSHARD: VShardId = VShardId(7);
/// The vShards the writer writes: the migrating one and two that stay.
const VSHARDS: [u32; 3] = [7, 8, 9];

/// One record the writer acknowledged on the source.
#[derive(Debug, Clone)]
pub struct Record {
    pub lsn: Lsn,
    pub vshard: VShardId,
    /// Header and payload, as in a segment.
    pub bytes: Vec<u8>,
    /// The step it was acknowledged at.
    pub acked_step: u64,
}

#[derive(Debug)]
pub struct Writer {
    pub layout: Layout,
    /// Every record acknowledged on the source, in LSN order.
    pub records: Vec<Record>,
    last_lsn: u64,
    /// Since when writes to the migrating vShard are paused.
    paused_since: Option<u64>,
    /// Pauses that ended: (from, to) steps.
    pub pauses: Vec<(u64, u64)>,
    /// Writes of the migrating vShard waiting for the pause to end.
    held_count: u32,
    /// The vShard moved to the target: its writes no longer go to the source.
    moved: bool,
}

impl Writer {
    pub fn new(rng: &mut Rng) -> Self {
        let layout = if rng.chance(500) { Layout::A } else { Layout::B };
        Self {
            layout,
            records: Vec::new(),
            last_lsn: 0,
            paused_since: None,
            pauses: Vec::new(),
            held_count: 0,
            moved: false,
        }
    }

    /// The LSN of the last record written (0: none yet).
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.last_lsn)
    }

    /// One write of a vShard the seed draws; returns its LSN when it was acknowledged.
    pub fn write(&mut self, rng: &mut Rng, step: u64) -> Option<Lsn> {
        let vshard = VShardId(VSHARDS[rng.index(VSHARDS.len())]);
        if vshard == VSHARD && (self.paused_since.is_some() || self.moved) {
            if !self.moved {
                self.held_count = self.held_count.saturating_add(1);
            }
            return None;
        }
        Some(self.append(rng, vshard, step))
    }

    fn append(&mut self, rng: &mut Rng, vshard: VShardId, step: u64) -> Lsn {
        // LSNs rise with gaps, as a database's do across its shards.
        self.last_lsn += 1 + rng.below(3);
        let lsn = Lsn(self.last_lsn);
        let fill = lsn.0.to_le_bytes()[0];
        let payload: Vec<u8> = (0..rng.below(48)).map(|k| k.to_le_bytes()[0].wrapping_add(fill)).collect();
        let header = RecordHeader::new(self.layout, 1, lsn, vshard);
        let mut bytes = Vec::new();
        if encode_record(&header, &payload, &mut bytes).is_err() {
            panic!("a record of {} payload bytes encodes", payload.len());
        }
        self.records.push(Record { lsn, vshard, bytes, acked_step: step });
        lsn
    }

    /// The coordinator pauses writes to the migrating vShard (before a fence).
    pub fn pause(&mut self, step: u64) {
        self.paused_since.get_or_insert(step);
    }

    /// Writes resume on the source (a fence failed or was cancelled): the held ones first.
    pub fn resume(&mut self, rng: &mut Rng, step: u64) {
        if let Some(since) = self.paused_since.take() {
            self.pauses.push((since, step));
        }
        for _ in 0..std::mem::take(&mut self.held_count) {
            self.append(rng, VSHARD, step);
        }
    }

    /// The vShard is released to the target: its writes (the held ones too) go there now.
    pub fn move_away(&mut self, step: u64) {
        if let Some(since) = self.paused_since.take() {
            self.pauses.push((since, step));
        }
        self.held_count = 0;
        self.moved = true;
    }

    /// A new copy of the vShard starts: it is written on the source again.
    pub fn move_back(&mut self) {
        self.moved = false;
    }

    /// A record of the migrating vShard acknowledged while its writes were paused, if any.
    pub fn acked_while_paused(&self) -> Option<Lsn> {
        let inside = |step: u64| {
            self.pauses.iter().any(|(from, to)| step > *from && step < *to)
                || self.paused_since.is_some_and(|from| step > from)
        };
        self.records.iter().find(|r| r.vshard == VSHARD && inside(r.acked_step)).map(|r| r.lsn)
    }
}
