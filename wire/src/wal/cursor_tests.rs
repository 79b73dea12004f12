//! Scenario and property tests of the tail cursor, on segments built here byte by byte
//! (a small O_DIRECT flush simulator, independent of the engine's writer).
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use proptest::prelude::*;

use super::cursor::{Cursor, CursorConfig, CursorError, LayoutChoice, Mode, Step};
use super::header::{
    encode_padding, encode_record, padding_span_bytes, Layout, RecordHeader, FLAG_ENCRYPTED, FLAG_REQUIRED,
};
use super::preamble::Preamble;
use crate::{Lsn, VShardId};

const ALIGN: usize = 512;

fn config(layout: LayoutChoice, mode: Mode) -> CursorConfig {
    CursorConfig { layout, alignment_bytes: ALIGN as u32, mode }
}

fn live() -> CursorConfig {
    config(LayoutChoice::Auto, Mode::Live)
}

fn record(layout: Layout, lsn: u64, record_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = RecordHeader::new(layout, record_type, Lsn(lsn), VShardId((lsn % 3) as u32));
    h.tenant_id = 11;
    let mut out = Vec::new();
    encode_record(&h, payload, &mut out).unwrap();
    out
}

/// A segment under construction, flushed O_DIRECT-style: every flush starts on a boundary.
struct Seg {
    layout: Layout,
    bytes: Vec<u8>,
    /// The writer's reused buffer: what layout A leftovers are made of.
    scratch: Vec<u8>,
    stale: bool,
}

impl Seg {
    fn new(layout: Layout, stale: bool) -> Self {
        Seg { layout, bytes: Vec::new(), scratch: Vec::new(), stale }
    }

    /// Flushes `records` (LSNs) as one O_DIRECT write.
    fn flush(&mut self, lsns: std::ops::RangeInclusive<u64>, payload_len: usize) -> &mut Self {
        let mut buf = Vec::new();
        for lsn in lsns {
            let payload = vec![(lsn % 251) as u8; payload_len + (lsn as usize % 7)];
            buf.extend(record(self.layout, lsn, 1 | FLAG_REQUIRED, &payload));
        }
        self.write_flush(buf);
        self
    }

    fn write_flush(&mut self, mut buf: Vec<u8>) {
        let at = self.bytes.len() as u64 + buf.len() as u64;
        match self.layout {
            Layout::B => {
                let span = padding_span_bytes(at, ALIGN as u64) as usize;
                if span > 0 {
                    encode_padding(span, &mut buf).unwrap();
                }
            }
            Layout::A => {
                let gap = (ALIGN - (at as usize % ALIGN)) % ALIGN;
                let start = buf.len();
                for i in 0..gap {
                    let b = if self.stale { self.scratch.get(start + i).copied().unwrap_or(0) } else { 0 };
                    buf.push(b);
                }
            }
        }
        if buf.len() > self.scratch.len() {
            self.scratch.resize(buf.len(), 0);
        }
        self.scratch[..buf.len()].copy_from_slice(&buf);
        self.bytes.extend_from_slice(&buf);
    }
}

/// Polls until something other than a record; returns the LSNs and the last outcome.
fn drain(cursor: &mut Cursor, bytes: &[u8], sealed: bool) -> (Vec<u64>, Result<Step, CursorError>) {
    let mut lsns = Vec::new();
    for _ in 0..100_000 {
        match cursor.poll(bytes, sealed) {
            Ok(Step::Record(r)) => {
                assert!(r.payload(bytes).is_some());
                lsns.push(r.header.lsn.0);
            }
            other => return (lsns, other),
        }
    }
    panic!("cursor did not stop");
}

fn range(a: u64, b: u64) -> Vec<u64> {
    (a..=b).collect()
}

#[test]
fn layout_a_stale_valid_records_in_leftovers_are_skipped() {
    let mut seg = Seg::new(Layout::A, true);
    // A big first flush fills the reused buffer with records 1..=20; later small flushes
    // leave leftovers holding whole stale records with valid CRCs.
    seg.flush(1..=20, 40).flush(21..=21, 10).flush(22..=23, 5).flush(24..=24, 300);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    let (lsns, end) = drain(&mut c, &seg.bytes, false);
    assert_eq!(lsns, range(1, 24));
    assert_eq!(end.unwrap(), Step::Wait { offset_bytes: c.offset_bytes() });
    assert_eq!(c.layout(), Some(Layout::A));
    // Sealed: the same bytes end the segment, expecting 25 next.
    let (lsns, end) = drain(&mut c, &seg.bytes, true);
    assert!(lsns.is_empty());
    assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(25) });
}

#[test]
fn layout_a_the_leftover_right_after_the_chain_is_a_stale_valid_record() {
    // Hand-made: block 0 holds record 5 then a whole valid record 2 (stale), block 1 record 6.
    let mut bytes = record(Layout::A, 5, 1, b"five");
    bytes.extend(record(Layout::A, 2, 1, b"stale"));
    bytes.resize(ALIGN, 0);
    bytes.extend(record(Layout::A, 6, 1, b"six"));
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(5)).unwrap();
    let (lsns, end) = drain(&mut c, &bytes, false);
    assert_eq!(lsns, vec![5, 6]);
    assert!(matches!(end.unwrap(), Step::Wait { .. }));
}

#[test]
fn layout_b_padding_is_skipped_including_narrow_gaps() {
    let mut seg = Seg::new(Layout::B, false);
    seg.flush(1..=3, 30);
    // A flush that ends 1 byte short of a boundary: padding is gap + one block.
    let used = seg.bytes.len();
    let header = Layout::B.header_len_bytes();
    let payload = ALIGN - header - 1;
    seg.write_flush(record(Layout::B, 4, 1, &vec![9u8; payload]));
    assert_eq!(seg.bytes.len(), used + 2 * ALIGN);
    seg.flush(5..=9, 100);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    let (lsns, end) = drain(&mut c, &seg.bytes, true);
    assert_eq!(lsns, range(1, 9));
    assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(10) });
    assert_eq!(c.layout(), Some(Layout::B));
}

#[test]
fn torn_tail_is_waited_for_then_returned() {
    for layout in Layout::ALL {
        let mut seg = Seg::new(layout, true);
        seg.flush(1..=10, 50);
        let flush_2_at = seg.bytes.len();
        seg.flush(11..=12, 50);
        let full = seg.bytes.clone();
        // Cut in the middle of record 12.
        let len_11 = record(layout, 11, 1, &[0; 50 + 11 % 7]).len();
        let len_12 = record(layout, 12, 1, &[0; 50 + 12 % 7]).len();
        let cut = flush_2_at + len_11 + len_12 - 20;
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        let (lsns, end) = drain(&mut c, &full[..cut], false);
        assert_eq!(lsns, range(1, 11), "{layout:?}");
        assert!(matches!(end.unwrap(), Step::Wait { .. }));
        // Polling again with the same bytes still waits, never returns a torn record.
        assert!(matches!(c.poll(&full[..cut], false).unwrap(), Step::Wait { .. }));
        let (lsns, _) = drain(&mut c, &full, false);
        assert_eq!(lsns, vec![12]);
    }
}

#[test]
fn bit_flip_in_a_sealed_segment_is_corruption_at_its_offset() {
    for layout in Layout::ALL {
        let mut seg = Seg::new(layout, false);
        seg.flush(1..=4, 20).flush(5..=6, 20);
        let first = record(layout, 1, 1 | FLAG_REQUIRED, &[1u8; 21]).len();
        let second = record(layout, 2, 1 | FLAG_REQUIRED, &[2u8; 22]).len();
        let offset_3 = first + second;
        let mut bytes = seg.bytes.clone();
        bytes[offset_3 + 40] ^= 0x10;
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        let (lsns, end) = drain(&mut c, &bytes, true);
        assert_eq!(lsns, vec![1, 2], "{layout:?}");
        match end {
            Err(CursorError::Corruption { segment, offset_bytes, .. }) => {
                assert_eq!(segment, "wal-00000000000000000001.seg");
                assert_eq!(offset_bytes, offset_3 as u64);
            }
            other => panic!("{layout:?}: {other:?}"),
        }
    }
}

#[test]
fn bit_flip_in_the_last_record_of_a_sealed_segment_is_caught_at_the_next_segment() {
    let mut seg = Seg::new(Layout::A, false);
    seg.flush(1..=3, 20);
    let mut bytes = seg.bytes.clone();
    let offset_3 = record(Layout::A, 1, 1, &[0; 21]).len() + record(Layout::A, 2, 1, &[0; 22]).len();
    bytes[offset_3 + 60] ^= 1;
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    let (lsns, end) = drain(&mut c, &bytes, true);
    assert_eq!(lsns, vec![1, 2]);
    assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(3) });
    match c.open_segment(Lsn(4)) {
        Err(CursorError::Corruption { segment, offset_bytes, what }) => {
            assert_eq!(segment, "wal-00000000000000000001.seg");
            assert_eq!(offset_bytes, offset_3 as u64);
            assert!(what.contains("wal-00000000000000000004.seg"), "{what}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bit_flip_in_the_active_segment_followed_by_valid_records_is_corruption() {
    for layout in Layout::ALL {
        let mut seg = Seg::new(layout, true);
        seg.flush(1..=4, 20).flush(5..=6, 20);
        let mut bytes = seg.bytes.clone();
        bytes[10] ^= 0x01; // record 1's LSN
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        // First look: suspected (a concurrent read may see a later block first), wait.
        assert!(matches!(c.poll(&bytes, false).unwrap(), Step::Wait { offset_bytes: 0 }));
        // Re-read, same bytes: confirmed.
        match c.poll(&bytes, false) {
            Err(CursorError::Corruption { offset_bytes: 0, what, .. }) => {
                assert!(what.contains("LSN 5"), "{what}")
            }
            other => panic!("{layout:?}: {other:?}"),
        }
    }
}

#[test]
fn a_valid_record_beyond_the_expected_lsn_is_a_gap() {
    // At the chain position.
    let mut bytes = record(Layout::B, 1, 1, b"a");
    bytes.extend(record(Layout::B, 3, 1, b"c"));
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    let (lsns, end) = drain(&mut c, &bytes, false);
    assert_eq!(lsns, vec![1]);
    assert!(matches!(end, Err(CursorError::Corruption { .. })));

    // At a later block boundary of a sealed layout A segment (LSN 2..=3 lost).
    let mut seg = Seg::new(Layout::A, false);
    seg.flush(1..=1, 10);
    seg.bytes.extend(vec![0u8; ALIGN]);
    seg.flush(4..=5, 10);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    let (lsns, end) = drain(&mut c, &seg.bytes, true);
    assert_eq!(lsns, vec![1]);
    assert!(matches!(end, Err(CursorError::Corruption { .. })), "{end:?}");
}

#[test]
fn rollover_and_empty_segments() {
    let mut s1 = Seg::new(Layout::B, false);
    s1.flush(1..=3, 10);
    let mut s2 = Seg::new(Layout::A, false); // a layout change at a roll is detected per segment
    s2.flush(4..=6, 10);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    assert_eq!(drain(&mut c, &s1.bytes, true).0, range(1, 3));
    assert!(c.poll(&s1.bytes, true).is_err(), "polling an ended segment is misuse");
    c.open_segment(Lsn(4)).unwrap();
    let (lsns, end) = drain(&mut c, &s2.bytes, true);
    assert_eq!(lsns, range(4, 6));
    assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(7) });
    // An empty segment: active waits, sealed ends.
    c.open_segment(Lsn(7)).unwrap();
    assert_eq!(c.poll(&[], false).unwrap(), Step::Wait { offset_bytes: 0 });
    assert_eq!(c.poll(&[0x57, 0x4E], false).unwrap(), Step::Wait { offset_bytes: 0 });
    assert_eq!(c.poll(&[], true).unwrap(), Step::EndOfSegment { next_lsn: Lsn(7) });
    // The next segment must be named after the expected LSN.
    assert!(matches!(c.open_segment(Lsn(9)), Err(CursorError::Corruption { .. })));
}

#[test]
fn encrypted_records_and_unknown_kinds_pass_through_with_the_preamble() {
    let preamble = Preamble::new(1, 7, [1, 2, 3, 4]);
    let mut bytes = preamble.encode().to_vec();
    let kinds = [FLAG_ENCRYPTED | 5, FLAG_REQUIRED | FLAG_ENCRYPTED | 0x3ABC, 0x0007_1234];
    for (i, kind) in kinds.iter().enumerate() {
        bytes.extend(record(Layout::B, 100 + i as u64, *kind, &[0xC3; 33]));
    }
    let mut c = Cursor::new(live(), Some(Lsn(100))).unwrap();
    c.open_segment(Lsn(100)).unwrap();
    for (i, kind) in kinds.iter().enumerate() {
        match c.poll(&bytes, false).unwrap() {
            Step::Record(r) => {
                assert_eq!(r.header.record_type, *kind);
                assert_eq!(r.header.lsn, Lsn(100 + i as u64));
                assert_eq!(r.payload(&bytes).unwrap(), &[0xC3; 33]);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.preamble(), Some(preamble));
    // A torn preamble in the active segment waits.
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    assert_eq!(c.poll(&bytes[..10], false).unwrap(), Step::Wait { offset_bytes: 0 });
}

#[test]
fn start_lsn_skips_older_records_and_refuses_a_truncated_wal() {
    let mut seg = Seg::new(Layout::A, true);
    seg.flush(10..=20, 10);
    let mut c = Cursor::new(live(), Some(Lsn(15))).unwrap();
    c.open_segment(Lsn(10)).unwrap();
    assert_eq!(drain(&mut c, &seg.bytes, false).0, range(15, 20));
    let mut c = Cursor::new(live(), Some(Lsn(5))).unwrap();
    assert!(matches!(c.open_segment(Lsn(10)), Err(CursorError::StartTruncated { .. })));
}

#[test]
fn a_fixed_layout_that_does_not_match_is_named() {
    let bytes = record(Layout::B, 1, 1, b"x");
    let mut c = Cursor::new(config(LayoutChoice::Fixed(Layout::A), Mode::Live), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    assert!(matches!(
        c.poll(&bytes, false),
        Err(CursorError::LayoutMismatch { configured: Layout::A, found: Layout::B, .. })
    ));
    let mut c = Cursor::new(config(LayoutChoice::Fixed(Layout::B), Mode::Live), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    assert!(matches!(c.poll(&bytes, false).unwrap(), Step::Record(_)));
}

#[test]
fn staged_mode_reads_increasing_lsns_across_segments() {
    let staged = config(LayoutChoice::Auto, Mode::Staged);
    let mut s1 = Preamble::new(1, 2, [0; 4]).encode().to_vec();
    for lsn in [5, 9, 10, 40] {
        s1.extend(record(Layout::A, lsn, 1, b"r"));
    }
    let mut s2 = Vec::new();
    for lsn in [41, 77] {
        s2.extend(record(Layout::A, lsn, 1, b"r"));
    }
    let mut c = Cursor::new(staged, None).unwrap();
    c.open_segment(Lsn(5)).unwrap();
    let (lsns, end) = drain(&mut c, &s1, true);
    assert_eq!(lsns, vec![5, 9, 10, 40]);
    assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(41) });
    assert!(c.clone().open_segment(Lsn(42)).is_err(), "staged segment k>0 is named last+1");
    c.open_segment(Lsn(41)).unwrap();
    assert_eq!(drain(&mut c, &s2, false).0, vec![41, 77]);

    // Zeros after the records of the active segment (preallocated) are the end of what is
    // written; records written over them later are read; in a sealed segment, or followed
    // by anything but zeros, they are corruption.
    let mut s3 = record(Layout::A, 78, 1, b"r");
    let records_len = s3.len();
    s3.resize(records_len + 8192, 0);
    let mut c3 = c.clone();
    assert_eq!(drain(&mut c3, &s2, true).1.unwrap(), Step::EndOfSegment { next_lsn: Lsn(78) });
    c3.open_segment(Lsn(78)).unwrap();
    let (lsns, end) = drain(&mut c3, &s3, false);
    assert_eq!((lsns, end.unwrap()), (vec![78], Step::Wait { offset_bytes: records_len as u64 }));
    let next = record(Layout::A, 80, 1, b"r");
    s3[records_len..records_len + next.len()].copy_from_slice(&next);
    assert_eq!(drain(&mut c3.clone(), &s3, false).0, vec![80]);
    assert!(matches!(drain(&mut c3.clone(), &s3, true).1, Err(CursorError::Corruption { .. })));
    let last = s3.len() - 1;
    s3[last] = 1;
    assert!(matches!(drain(&mut c3, &s3, false).1, Err(CursorError::Corruption { .. })));

    // Not increasing, garbage, and a torn record at the end of a sealed staged segment.
    let mut bad = record(Layout::A, 5, 1, b"r");
    bad.extend(record(Layout::A, 5, 1, b"r"));
    let mut c = Cursor::new(staged, None).unwrap();
    c.open_segment(Lsn(5)).unwrap();
    assert!(matches!(drain(&mut c, &bad, false).1, Err(CursorError::Corruption { .. })));
    let mut junk = record(Layout::A, 5, 1, b"r");
    junk.extend([0xabu8; 100]);
    let mut c = Cursor::new(staged, None).unwrap();
    c.open_segment(Lsn(5)).unwrap();
    assert!(matches!(drain(&mut c, &junk, false).1, Err(CursorError::Corruption { .. })));
    let torn = &s2[..s2.len() - 3];
    let mut c = Cursor::new(staged, None).unwrap();
    c.open_segment(Lsn(41)).unwrap();
    assert!(matches!(drain(&mut c, torn, false).1, Ok(Step::Wait { .. })));
    assert!(matches!(drain(&mut c, torn, true).1, Err(CursorError::Corruption { .. })));
}

fn any_config() -> impl Strategy<Value = CursorConfig> {
    (
        prop_oneof![
            Just(LayoutChoice::Auto),
            Just(LayoutChoice::Fixed(Layout::A)),
            Just(LayoutChoice::Fixed(Layout::B))
        ],
        prop_oneof![Just(Mode::Live), Just(Mode::Staged)],
        prop_oneof![Just(64u32), Just(512), Just(4096)],
    )
        .prop_map(|(layout, mode, alignment_bytes)| CursorConfig { layout, alignment_bytes, mode })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_give_records_or_an_error_never_a_panic(
        config in any_config(),
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        sealed in any::<bool>(),
        first in 0u64..4,
    ) {
        let mut c = Cursor::new(config, None).unwrap();
        c.open_segment(Lsn(first)).unwrap();
        for _ in 0..200 {
            match c.poll(&bytes, sealed) {
                Ok(Step::Record(r)) => prop_assert!(bytes.get(r.record_range()).is_some()),
                _ => break,
            }
        }
    }

    /// Valid records with random bytes spliced in: still no panic, and every record returned
    /// is one of the written ones, in order.
    #[test]
    fn damaged_segments_never_return_a_wrong_record(
        layout in prop_oneof![Just(Layout::A), Just(Layout::B)],
        flushes in proptest::collection::vec(1u64..6, 1..8),
        damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        sealed in any::<bool>(),
    ) {
        let mut seg = Seg::new(layout, true);
        let mut next = 1;
        for n in flushes {
            seg.flush(next..=next + n - 1, 30);
            next += n;
        }
        let mut bytes = seg.bytes.clone();
        for (at, v) in damage {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        let mut want = 1;
        for _ in 0..1000 {
            match c.poll(&bytes, sealed) {
                Ok(Step::Record(r)) => {
                    prop_assert_eq!(r.header.lsn, Lsn(want));
                    want += 1;
                }
                _ => break,
            }
        }
    }

    /// Undamaged segments written with random flush sizes give back exactly every record.
    #[test]
    fn every_flushed_record_comes_back_in_order(
        layout in prop_oneof![Just(Layout::A), Just(Layout::B)],
        flushes in proptest::collection::vec((1u64..8, 0usize..400), 1..10),
        stale in any::<bool>(),
    ) {
        let mut seg = Seg::new(layout, stale);
        let mut next = 1;
        for (n, payload) in flushes {
            seg.flush(next..=next + n - 1, payload);
            next += n;
        }
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        let (lsns, end) = drain(&mut c, &seg.bytes, true);
        prop_assert_eq!(lsns, range(1, next - 1));
        prop_assert_eq!(end.unwrap(), Step::EndOfSegment { next_lsn: Lsn(next) });
    }
}

#[test]
fn layout_a_a_stale_header_claiming_a_long_payload_does_not_stall_the_tail() {
    // Record 5, then a stale header whose payload_len runs far past the end of the file:
    // it looks like a torn record. The next boundary holds record 6 once it is written.
    let mut bytes = record(Layout::A, 5, 1, b"five");
    let mut stale = record(Layout::A, 2, 1, &[0u8; 8]);
    stale[30..34].copy_from_slice(&(1u32 << 20).to_le_bytes());
    bytes.extend(&stale[..54]);
    bytes.resize(ALIGN, 0x5A);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(5)).unwrap();
    let (lsns, end) = drain(&mut c, &bytes, false);
    assert_eq!(lsns, vec![5]);
    assert!(matches!(end.unwrap(), Step::Wait { .. }));
    bytes.extend(record(Layout::A, 6, 1, b"six"));
    let (lsns, end) = drain(&mut c, &bytes, false);
    assert_eq!(lsns, vec![6]);
    assert!(matches!(end.unwrap(), Step::Wait { .. }));
}

#[test]
fn a_record_that_looks_torn_with_valid_records_after_it_is_a_gap_not_a_wait() {
    for layout in Layout::ALL {
        let mut seg = Seg::new(layout, false);
        seg.flush(1..=2, 20).flush(3..=4, 20);
        let mut bytes = seg.bytes.clone();
        // Record 1's payload_len grows past the end of the file: it looks torn.
        bytes[32] = 0x10;
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        assert!(matches!(c.poll(&bytes, false).unwrap(), Step::Wait { offset_bytes: 0 }));
        assert!(matches!(c.poll(&bytes, false), Err(CursorError::Corruption { offset_bytes: 0, .. })), "{layout:?}");
        // The same bytes in a sealed segment: corruption at once.
        let mut c = Cursor::new(live(), None).unwrap();
        c.open_segment(Lsn(1)).unwrap();
        assert!(matches!(c.poll(&bytes, true), Err(CursorError::Corruption { offset_bytes: 0, .. })));
    }
}

#[test]
fn a_suspected_gap_that_the_writer_fills_is_no_corruption() {
    // A re-read sees the earlier block written after all (a concurrent pread can see a later
    // block of a write before an earlier one): the tail goes on.
    let mut seg = Seg::new(Layout::B, false);
    seg.flush(1..=2, 20).flush(3..=4, 20);
    let mut early = seg.bytes.clone();
    early[..ALIGN].fill(0);
    let mut c = Cursor::new(live(), None).unwrap();
    c.open_segment(Lsn(1)).unwrap();
    assert!(matches!(c.poll(&early, false).unwrap(), Step::Wait { offset_bytes: 0 }));
    let (lsns, end) = drain(&mut c, &seg.bytes, false);
    assert_eq!(lsns, range(1, 4));
    assert!(matches!(end.unwrap(), Step::Wait { .. }));
}
