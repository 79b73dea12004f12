//! What the reference writer acknowledged, and when: the [`WriterLog`] its `stop` returns.
//!
//! What it does: keeps one 16-byte entry per acknowledged write (where it went and when it was
//! acknowledged) plus the writer's schedule, from which each write's vShard and due time are
//! derived, and answers the questions a report or a test asks: each write
//! ([`WriterLog::writes`]), the migrating vShard's source writes up to an LSN (the base
//! export), ack latency percentiles, the longest gap between acks, and how many writes were
//! acknowledged inside a window (a pause must have none).
//!
//! What it does not: read any WAL. The log is what the writer *says* it acknowledged; the
//! verifier checks the WALs against it.
//!
//! Invariants: entries are in writer_seq order (entry i is write i) and every entry was
//! acknowledged (writes are acknowledged in order, a group at a time); ack times never
//! decrease; the LSNs of each place (source WAL, target node WAL) increase.

use ferry_wire::{Lsn, VShardId};

use super::export::ExportEntry;

/// Bit 63 of a packed entry's LSN word: the write went to the target node's WAL.
const TARGET_BIT: u64 = 1 << 63;

/// The writer's schedule: which vShard write `writer_seq` goes to and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub(crate) started_ns: u64,
    pub(crate) rate_writes_per_sec: u64,
    pub(crate) migrating_vshard: VShardId,
    pub(crate) migrating_every: u64,
    pub(crate) other_vshards: Vec<VShardId>,
}

impl Schedule {
    /// The vShard of write `writer_seq`: the migrating one when `writer_seq % every == every - 1`,
    /// else the others in turn.
    pub(crate) fn vshard_of(&self, writer_seq: u64) -> VShardId {
        let every = self.migrating_every.max(1);
        let slot = writer_seq % every;
        if slot == every - 1 || self.other_vshards.is_empty() {
            return self.migrating_vshard;
        }
        let others = self.other_vshards.len() as u64;
        usize::try_from(slot % others).ok().and_then(|i| self.other_vshards.get(i)).copied().unwrap_or_default()
    }

    /// When write `writer_seq` is due (CLOCK_MONOTONIC ns): the schedule never moves, so a
    /// write delayed by a pause counts the delay in its latency.
    pub(crate) fn due_ns(&self, writer_seq: u64) -> u64 {
        let offset = u128::from(writer_seq) * 1_000_000_000 / u128::from(self.rate_writes_per_sec.max(1));
        self.started_ns.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }
}

/// One acknowledged write, packed: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedAck {
    /// The LSN, with [`TARGET_BIT`] set when it is a target node WAL LSN.
    lsn_word: u64,
    ack_ns: u64,
}

impl PackedAck {
    pub(crate) fn new(place: WritePlace, ack_ns: u64) -> Self {
        let lsn_word = match place {
            WritePlace::Source(lsn) => lsn.0 & !TARGET_BIT,
            WritePlace::TargetNode(lsn) => lsn.0 | TARGET_BIT,
        };
        PackedAck { lsn_word, ack_ns }
    }

    fn place(self) -> WritePlace {
        let lsn = Lsn(self.lsn_word & !TARGET_BIT);
        if self.lsn_word & TARGET_BIT == 0 {
            WritePlace::Source(lsn)
        } else {
            WritePlace::TargetNode(lsn)
        }
    }
}

/// Where a write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WritePlace {
    /// The source WAL, at this LSN.
    Source(Lsn),
    /// The target node's own WAL (`<target data dir>/node-wal/`), at this LSN (its own space).
    TargetNode(Lsn),
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEntry {
    pub writer_seq: u64,
    pub vshard: VShardId,
    pub place: WritePlace,
    /// When the schedule said the write was due (CLOCK_MONOTONIC ns).
    pub due_ns: u64,
    /// When it was acknowledged: after its group's flush (CLOCK_MONOTONIC ns).
    pub ack_ns: u64,
}

impl WriteEntry {
    /// Acknowledgement latency, from the schedule.
    pub fn latency_ns(&self) -> u64 {
        self.ack_ns.saturating_sub(self.due_ns)
    }
}

/// How a pause ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumedOn {
    Source,
    Target,
}

/// One pause of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseSpan {
    pub paused_at_ns: u64,
    /// `None`: the writer was stopped while paused.
    pub resumed_at_ns: Option<u64>,
    pub resumed_on: Option<ResumedOn>,
    /// The last source LSN acknowledged when it parked.
    pub last_acked_lsn: Lsn,
}

/// Ack latency over a set of writes, in nanoseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySummary {
    pub writes_count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// The longest time between two consecutive acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckGap {
    pub gap_ns: u64,
    /// The ack before the gap and the one after it.
    pub from_ns: u64,
    pub to_ns: u64,
}

/// Everything the writer acknowledged. See the module docs.
#[derive(Debug, Clone)]
pub struct WriterLog {
    pub(crate) schedule: Schedule,
    pub(crate) acks: Vec<PackedAck>,
    pub(crate) pauses: Vec<PauseSpan>,
    /// Pauses beyond the logged limit, counted only.
    pub(crate) pauses_unlogged_count: u64,
    pub(crate) flushes_count: u64,
    pub(crate) finished_ns: u64,
}

impl WriterLog {
    pub(crate) fn new(schedule: Schedule) -> Self {
        WriterLog {
            schedule,
            acks: Vec::new(),
            pauses: Vec::new(),
            pauses_unlogged_count: 0,
            flushes_count: 0,
            finished_ns: 0,
        }
    }

    /// A log of `acks` (where each write went, when it was acknowledged in CLOCK_MONOTONIC ns),
    /// in order, for a writer started at 0 ns at `rate_writes_per_sec` that sends every
    /// `migrating_every`-th write to `migrating_vshard` and the others to `other_vshards` in
    /// turn. For the tests of what is built on a log (the demo's summary); built only for
    /// tests and with the `testkit` feature.
    #[cfg(any(test, feature = "testkit"))]
    pub fn with_acks(
        rate_writes_per_sec: u64,
        migrating_vshard: VShardId,
        migrating_every: u64,
        other_vshards: Vec<VShardId>,
        acks: impl IntoIterator<Item = (WritePlace, u64)>,
    ) -> Self {
        let schedule =
            Schedule { started_ns: 0, rate_writes_per_sec, migrating_vshard, migrating_every, other_vshards };
        let mut log = WriterLog::new(schedule);
        log.acks.extend(acks.into_iter().map(|(place, ack_ns)| PackedAck::new(place, ack_ns)));
        log
    }

    pub fn migrating_vshard(&self) -> VShardId {
        self.schedule.migrating_vshard
    }

    /// When the writer started (write 0 was due then) and when it stopped.
    pub fn started_ns(&self) -> u64 {
        self.schedule.started_ns
    }

    pub fn finished_ns(&self) -> u64 {
        self.finished_ns
    }

    pub fn writes_count(&self) -> u64 {
        self.acks.len() as u64
    }

    /// Group-commit flushes (of the source WAL, the target node WAL, or both).
    pub fn flushes_count(&self) -> u64 {
        self.flushes_count
    }

    /// Every pause, in order (at most 10,000 are logged one by one).
    pub fn pauses(&self) -> &[PauseSpan] {
        &self.pauses
    }

    /// Pauses beyond the ones [`Self::pauses`] lists.
    pub fn pauses_unlogged_count(&self) -> u64 {
        self.pauses_unlogged_count
    }

    /// Write `writer_seq`, if it was acknowledged.
    pub fn write(&self, writer_seq: u64) -> Option<WriteEntry> {
        let ack = *self.acks.get(usize::try_from(writer_seq).ok()?)?;
        Some(self.entry(writer_seq, ack))
    }

    /// Every acknowledged write, in writer_seq order.
    pub fn writes(&self) -> impl ExactSizeIterator<Item = WriteEntry> + '_ {
        self.acks.iter().enumerate().map(|(seq, ack)| self.entry(seq as u64, *ack))
    }

    fn entry(&self, writer_seq: u64, ack: PackedAck) -> WriteEntry {
        WriteEntry {
            writer_seq,
            vshard: self.schedule.vshard_of(writer_seq),
            place: ack.place(),
            due_ns: self.schedule.due_ns(writer_seq),
            ack_ns: ack.ack_ns,
        }
    }

    /// The last source LSN acknowledged (0 when none).
    pub fn last_source_lsn(&self) -> Lsn {
        self.acks
            .iter()
            .rev()
            .find_map(|a| match a.place() {
                WritePlace::Source(lsn) => Some(lsn),
                WritePlace::TargetNode(_) => None,
            })
            .unwrap_or_default()
    }

    /// The migrating vShard's writes in the source WAL with LSN <= `upto`, in LSN order: what
    /// the base export holds for `base_lsn = upto`.
    pub fn migrating_source_writes(&self, upto: Lsn) -> Vec<ExportEntry> {
        self.writes()
            .filter(|w| w.vshard == self.schedule.migrating_vshard)
            .filter_map(|w| match w.place {
                WritePlace::Source(lsn) if lsn <= upto => {
                    Some(ExportEntry { source_lsn: lsn, writer_seq: w.writer_seq })
                }
                _ => None,
            })
            .collect()
    }

    /// Writes acknowledged strictly inside (`after_ns`, `before_ns`): a pause must have none.
    pub fn acks_between(&self, after_ns: u64, before_ns: u64) -> u64 {
        let low = self.acks.partition_point(|a| a.ack_ns <= after_ns);
        let high = self.acks.partition_point(|a| a.ack_ns < before_ns);
        high.saturating_sub(low) as u64
    }

    /// Ack latency of the writes acknowledged in [`from_ns`, `to_ns`] (`0, u64::MAX`: all).
    pub fn ack_latency(&self, from_ns: u64, to_ns: u64) -> Option<LatencySummary> {
        let mut latencies: Vec<u64> =
            self.writes().filter(|w| w.ack_ns >= from_ns && w.ack_ns <= to_ns).map(|w| w.latency_ns()).collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let rank = |percent: u64| {
            let r = (latencies.len() as u64 * percent).div_ceil(100).max(1);
            usize::try_from(r - 1).ok().and_then(|i| latencies.get(i)).copied().unwrap_or_default()
        };
        Some(LatencySummary {
            writes_count: latencies.len() as u64,
            p50_ns: rank(50),
            p99_ns: rank(99),
            max_ns: latencies.last().copied().unwrap_or_default(),
        })
    }

    /// The longest gap between consecutive acknowledgements (`None` with fewer than two groups).
    pub fn longest_ack_gap(&self) -> Option<AckGap> {
        self.acks
            .windows(2)
            .filter_map(|pair| match pair {
                [a, b] if b.ack_ns > a.ack_ns => {
                    Some(AckGap { gap_ns: b.ack_ns - a.ack_ns, from_ns: a.ack_ns, to_ns: b.ack_ns })
                }
                _ => None,
            })
            .max_by_key(|gap| gap.gap_ns)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            started_ns: 1_000,
            rate_writes_per_sec: 1_000,
            migrating_vshard: VShardId(7),
            migrating_every: 4,
            other_vshards: vec![VShardId(3), VShardId(11), VShardId(12)],
        }
    }

    #[test]
    fn the_schedule_spreads_writes_like_the_demo() {
        let s = schedule();
        let vshards: Vec<u32> = (0..8).map(|q| s.vshard_of(q).0).collect();
        assert_eq!(vshards, vec![3, 11, 12, 7, 3, 11, 12, 7]);
        assert_eq!(s.due_ns(0), 1_000);
        assert_eq!(s.due_ns(3), 1_000 + 3_000_000);
        let all_migrating = Schedule { migrating_every: 1, ..schedule() };
        assert!((0..5).all(|q| all_migrating.vshard_of(q) == VShardId(7)));
        let two = Schedule { migrating_every: 2, other_vshards: vec![VShardId(1)], ..schedule() };
        assert_eq!((0..4).map(|q| two.vshard_of(q).0).collect::<Vec<_>>(), vec![1, 7, 1, 7]);
    }

    /// Writes 0..8, acked in groups of two, 1 ms apart; writes 6 and 7 after a 10 ms pause,
    /// 7 (migrating) on the target node WAL.
    fn log() -> WriterLog {
        let mut log = WriterLog::new(schedule());
        for seq in 0..8u64 {
            let ack_ns = 2_000_000 + (seq / 2) * 1_000_000 + if seq >= 6 { 10_000_000 } else { 0 };
            let place = if seq == 7 { WritePlace::TargetNode(Lsn(1)) } else { WritePlace::Source(Lsn(seq + 1)) };
            log.acks.push(PackedAck::new(place, ack_ns));
        }
        log
    }

    #[test]
    fn entries_unpack_with_their_schedule() {
        let log = log();
        assert_eq!(std::mem::size_of::<PackedAck>(), 16);
        let w = log.write(3).unwrap();
        assert_eq!(
            (w.vshard, w.place, w.due_ns, w.ack_ns),
            (VShardId(7), WritePlace::Source(Lsn(4)), 3_001_000, 3_000_000)
        );
        assert_eq!(w.latency_ns(), 0, "acked before due counts as 0");
        assert_eq!(log.write(7).unwrap().place, WritePlace::TargetNode(Lsn(1)));
        assert_eq!(log.write(8), None);
        assert_eq!(log.writes().len(), 8);
        assert_eq!(log.last_source_lsn(), Lsn(7));
        let exported = log.migrating_source_writes(Lsn(5));
        assert_eq!(exported, vec![ExportEntry { source_lsn: Lsn(4), writer_seq: 3 }]);
        assert_eq!(log.migrating_source_writes(Lsn(100)).len(), 1, "write 7 went to the target");
    }

    #[test]
    fn gaps_windows_and_latencies() {
        let log = log();
        let gap = log.longest_ack_gap().unwrap();
        assert_eq!((gap.gap_ns, gap.from_ns, gap.to_ns), (11_000_000, 4_000_000, 15_000_000));
        assert_eq!(log.acks_between(4_000_000, 15_000_000), 0);
        assert_eq!(log.acks_between(3_999_999, 15_000_001), 4);
        assert_eq!(log.acks_between(0, u64::MAX), 8);
        let all = log.ack_latency(0, u64::MAX).unwrap();
        assert_eq!(all.writes_count, 8);
        // Write 6 was due at 6.001 ms and acked at 15 ms, after the pause.
        assert_eq!(all.max_ns, 15_000_000 - 6_001_000);
        assert!(all.p50_ns <= all.p99_ns && all.p99_ns <= all.max_ns);
        assert_eq!(log.ack_latency(20_000_000, u64::MAX), None);
        assert_eq!(WriterLog::new(schedule()).longest_ack_gap(), None);
    }
}
