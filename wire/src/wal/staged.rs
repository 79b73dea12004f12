//! Segment planning for a staged WAL: where each kept record goes on the target.
//!
//! What it does: given the kept records in LSN order (each with its length and the preamble
//! of the source segment it came from), says when a new staged segment starts, what it is
//! named and which preamble it opens with. The rules (DESIGN section 3): records back to
//! back; LSNs strictly increasing; the first segment is named after its first record's LSN
//! and segment k > 0 after the last LSN of segment k - 1 plus one (so a reader's
//! segment-continuity check accepts it); every segment opens with the preamble of the source
//! segment its records came from, so a record whose source preamble differs from the open
//! segment's starts a new segment (encrypted payloads are bound to their preamble); a
//! segment rolls when the next record would take it past the roll size (a record larger
//! than the roll size gets a segment of its own).
//!
//! What it does not: write files or fsync (the target's staging does, and must make a new
//! segment's name durable), or re-frame records: the source bytes are written as they are.
//!
//! Invariants: every planned name is at most the LSN of the first record placed in it and
//! above every LSN placed before it; a [`Cursor`](super::Cursor) in staged mode reads what
//! this plans.

use super::preamble::{Preamble, PREAMBLE_LEN_BYTES};
use crate::Lsn;

/// Where the next record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At the end of the open segment.
    Append,
    /// Start the segment `wal-<name_lsn:020>.seg`, write `preamble` first if there is one,
    /// then the record.
    StartSegment { name_lsn: Lsn, preamble: Option<Preamble> },
}

/// The caller placed a record out of order: a bug in the caller or its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StagedError {
    #[error("staged record LSN {lsn} is not above the last staged LSN {last}: staged LSNs must increase")]
    NotIncreasing { lsn: Lsn, last: Lsn },
    #[error("LSN 0 (padding) is never staged")]
    ZeroLsn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenSegment {
    preamble: Option<Preamble>,
    len_bytes: u64,
    records_count: u64,
}

/// The staged WAL's segment plan. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedPlan {
    roll_size_bytes: u64,
    open: Option<OpenSegment>,
    last_lsn: Option<Lsn>,
}

impl StagedPlan {
    pub fn new(roll_size_bytes: u64) -> Self {
        StagedPlan { roll_size_bytes, open: None, last_lsn: None }
    }

    /// The last LSN placed.
    pub fn last_lsn(&self) -> Option<Lsn> {
        self.last_lsn
    }

    /// Places the record `lsn` of `record_len_bytes` (header and payload) that came from a
    /// source segment with `source_preamble`.
    pub fn place(
        &mut self,
        lsn: Lsn,
        record_len_bytes: u64,
        source_preamble: Option<Preamble>,
    ) -> Result<Placement, StagedError> {
        if lsn == Lsn(0) {
            return Err(StagedError::ZeroLsn);
        }
        if let Some(last) = self.last_lsn {
            if lsn <= last {
                return Err(StagedError::NotIncreasing { lsn, last });
            }
        }
        let placement = match (self.open, self.last_lsn) {
            (Some(open), Some(last))
                if open.preamble != source_preamble
                    || (open.records_count > 0
                        && open.len_bytes.saturating_add(record_len_bytes) > self.roll_size_bytes) =>
            {
                Placement::StartSegment { name_lsn: Lsn(last.0.saturating_add(1)), preamble: source_preamble }
            }
            (Some(_), _) => Placement::Append,
            (None, _) => Placement::StartSegment { name_lsn: lsn, preamble: source_preamble },
        };
        if let Placement::StartSegment { preamble, .. } = placement {
            let preamble_len = if preamble.is_some() { PREAMBLE_LEN_BYTES as u64 } else { 0 };
            self.open = Some(OpenSegment { preamble, len_bytes: preamble_len, records_count: 0 });
        }
        if let Some(open) = self.open.as_mut() {
            open.len_bytes = open.len_bytes.saturating_add(record_len_bytes);
            open.records_count += 1;
        }
        self.last_lsn = Some(lsn);
        Ok(placement)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::wal::cursor::{Cursor, CursorConfig, LayoutChoice, Mode, Step};
    use crate::wal::header::{encode_record, Layout, RecordHeader};
    use crate::VShardId;
    use proptest::prelude::*;

    #[test]
    fn names_follow_the_last_lsn_and_preambles_split_segments() {
        let p1 = Some(Preamble::new(1, 1, [1, 0, 0, 0]));
        let p2 = Some(Preamble::new(1, 1, [2, 0, 0, 0]));
        let mut plan = StagedPlan::new(1000);
        assert_eq!(plan.place(Lsn(10), 100, p1).unwrap(), Placement::StartSegment { name_lsn: Lsn(10), preamble: p1 });
        assert_eq!(plan.place(Lsn(14), 100, p1).unwrap(), Placement::Append);
        assert_eq!(plan.place(Lsn(20), 100, p2).unwrap(), Placement::StartSegment { name_lsn: Lsn(15), preamble: p2 });
        assert_eq!(plan.place(Lsn(21), 900, p2).unwrap(), Placement::StartSegment { name_lsn: Lsn(21), preamble: p2 });
        assert_eq!(plan.place(Lsn(30), 5000, p2).unwrap(), Placement::StartSegment { name_lsn: Lsn(22), preamble: p2 });
        assert_eq!(plan.place(Lsn(30), 1, p2), Err(StagedError::NotIncreasing { lsn: Lsn(30), last: Lsn(30) }));
        assert_eq!(plan.place(Lsn(0), 1, p2), Err(StagedError::ZeroLsn));
    }

    proptest! {
        /// A staged WAL laid out by the plan reads back in staged mode, every record in order.
        #[test]
        fn planned_staged_wals_read_back(
            steps in proptest::collection::vec((1u64..50, 0usize..300, 0u8..3), 1..60),
            roll in 200u64..3000,
        ) {
            let mut plan = StagedPlan::new(roll);
            let mut segments: Vec<(Lsn, Vec<u8>)> = Vec::new();
            let mut lsn = 0;
            let mut written = Vec::new();
            for (step, payload_len, epoch) in steps {
                lsn += step;
                let preamble = (epoch > 0).then(|| Preamble::new(1, 2, [epoch, 0, 0, 0]));
                let mut rec = Vec::new();
                let header = RecordHeader::new(Layout::B, 1, Lsn(lsn), VShardId(5));
                encode_record(&header, &vec![7u8; payload_len], &mut rec).unwrap();
                match plan.place(Lsn(lsn), rec.len() as u64, preamble).unwrap() {
                    Placement::StartSegment { name_lsn, preamble } => {
                        let start = preamble.map(|p| p.encode().to_vec()).unwrap_or_default();
                        segments.push((name_lsn, start));
                    }
                    Placement::Append => {}
                }
                segments.last_mut().unwrap().1.extend(rec);
                written.push(lsn);
            }
            let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
            let mut cursor = Cursor::new(config, None).unwrap();
            let mut read = Vec::new();
            let count = segments.len();
            for (i, (name, bytes)) in segments.iter().enumerate() {
                cursor.open_segment(*name).unwrap();
                while let Step::Record(r) = cursor.poll(bytes, i + 1 < count).unwrap() {
                    read.push(r.header.lsn.0);
                }
            }
            prop_assert_eq!(read, written);
        }
    }
}
