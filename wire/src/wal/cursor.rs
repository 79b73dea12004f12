//! The WAL tail cursor: a sans-IO state machine that walks the segments of a WAL folder.
//!
//! What it does: the engine opens each segment in name order ([`Cursor::open_segment`] with
//! the first LSN from its name), preads its bytes from offset 0 into a buffer, and calls
//! [`Cursor::poll`] with them and whether the segment is sealed. Each poll returns one
//! [`Step`]: a [`Record`] (header plus the byte ranges of the record in the buffer),
//! [`Step::Wait`] (nothing more is written yet: re-read and poll again later), or
//! [`Step::EndOfSegment`] (open the next segment), or an error. The buffer may grow between
//! polls (the engine rereads and appends); the cursor keeps its offset.
//!
//! Live mode (the database's WAL) applies the tailing rules of the design:
//! - a record is accepted only when magic, version and CRC check out **and** its LSN is the
//!   expected one; LSNs are dense, the first segment's first LSN comes from its name, and
//!   each next segment must be named after the expected LSN;
//! - layout A: when the bytes at the current offset are not the expected record (zeros,
//!   garbage, a torn stale record, or a whole stale record with a valid CRC and an old LSN:
//!   O_DIRECT leftovers), look at the next block boundary; when that is not it either, this
//!   is the end of what is written so far. Stale records are never returned;
//! - layout B: padding records (kind Noop, LSN 0) are skipped by their length;
//! - a valid record with an LSN beyond the expected one, at the current offset or at any
//!   later block boundary of the segment, is a gap: [`CursorError::Corruption`] naming the
//!   segment and the offset where the chain broke. In the active segment a gap found only
//!   at a later boundary is confirmed by one more poll on re-read bytes first, because a
//!   concurrent pread may see a later block of a write before an earlier one;
//! - at the end of the active segment (including a partially written record, which is
//!   waited for and never returned) the cursor waits; at the end of a sealed segment it
//!   ends the segment, and the next segment must start at the expected LSN, or the gap is
//!   corruption naming the sealed segment and the offset where its records stopped.
//!
//! Staged mode (ferry's staged WALs): records back to back, no leftovers, LSNs strictly
//! increasing but not dense; segment k > 0 must be named after the last LSN before it plus
//! one. Anything that is not a record is corruption, except a torn tail of the active
//! segment, which is waited for, and zeros from there to the end of the active segment (ferry
//! preallocates the segment it appends to), which are the end of what is written so far.
//!
//! Both modes: an optional "WALP" preamble at offset 0 is decoded and exposed; the layout is
//! fixed by configuration or detected per segment by which CRC checks out on its first
//! record; encrypted payloads and unknown kinds are returned opaque.
//!
//! What it does not: read files, decide when a segment is sealed (the engine knows when a
//! newer segment has a valid first record; pass `sealed = true` only with bytes read after
//! that), or select records (see [`select`](super::select)).
//!
//! Invariants: no input panics; every accepted record advances the offset; a returned
//! record's ranges lie inside the bytes that were passed to the poll that returned it.

use std::ops::Range;

use super::header::PAYLOAD_LEN_MAX_BYTES;
use super::header::{check_record, Layout, RecordHeader, FORMAT_VERSION, MAGIC};
use super::preamble::{Preamble, PREAMBLE_LEN_BYTES};
use super::segment::segment_name;
use super::{FormatError, ALIGNMENT_DEFAULT_BYTES};
use crate::Lsn;

/// How the cursor picks a segment's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutChoice {
    /// Per segment, by which layout's CRC checks out on its first record.
    Auto,
    /// Always this layout; a segment whose first record checks out only under the other
    /// layout is [`CursorError::LayoutMismatch`].
    Fixed(Layout),
}

/// Which rules the cursor applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The database's own WAL: dense LSNs, leftovers, padding.
    Live,
    /// A staged WAL written by ferry: increasing (not dense) LSNs, records back to back.
    Staged,
}

/// Cursor configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorConfig {
    pub layout: LayoutChoice,
    /// The O_DIRECT block size the writer rounds flushes up to (leftovers end, and new
    /// flushes start, on multiples of it, counted from the start of the file).
    pub alignment_bytes: u32,
    pub mode: Mode,
}

impl Default for CursorConfig {
    fn default() -> Self {
        CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: ALIGNMENT_DEFAULT_BYTES, mode: Mode::Live }
    }
}

/// An accepted record: where it lies in the segment bytes that were polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    /// Offset of the record's first header byte in its segment.
    pub offset_bytes: usize,
    /// Header plus payload.
    pub len_bytes: usize,
}

impl Record {
    /// The whole record (header and payload) in the segment bytes.
    pub fn record_range(&self) -> Range<usize> {
        self.offset_bytes..self.offset_bytes.saturating_add(self.len_bytes)
    }

    /// The payload in the segment bytes.
    pub fn payload_range(&self) -> Range<usize> {
        let start = self.offset_bytes.saturating_add(self.header.layout().header_len_bytes());
        start..self.offset_bytes.saturating_add(self.len_bytes)
    }

    /// The payload, sliced out of the segment bytes the record was returned from.
    pub fn payload<'a>(&self, segment: &'a [u8]) -> Option<&'a [u8]> {
        segment.get(self.payload_range())
    }
}

/// What one poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The next record (LSN at or above the cursor's start).
    Record(Record),
    /// Nothing more is written yet at `offset_bytes` of the active segment: re-read and poll
    /// again.
    Wait { offset_bytes: u64 },
    /// The sealed segment is done; open the next one, which must start at `next_lsn` (live
    /// mode) or be named `next_lsn` (staged mode, when it held records).
    EndOfSegment { next_lsn: Lsn },
}

/// Why the cursor stopped. `Corruption` blames the WAL bytes; `StartTruncated` the WAL
/// folder's contents; `LayoutMismatch` and `Misuse` the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("wal segment {segment} is corrupt at byte {offset_bytes}: {what}; stop the migration and inspect it with `ferry wal dump`")]
    Corruption { segment: String, offset_bytes: u64, what: String },
    #[error("the wal starts at LSN {first_lsn}, after the requested start LSN {start_lsn}: the database truncated the records needed; restart the migration from a newer base")]
    StartTruncated { first_lsn: Lsn, start_lsn: Lsn },
    #[error("wal segment {segment} is written in layout {found:?} but layout {configured:?} was configured; configure the right layout or auto-detection")]
    LayoutMismatch { segment: String, configured: Layout, found: Layout },
    #[error("wal cursor misuse: {0}")]
    Misuse(&'static str),
}

/// The tail cursor. See the module docs.
#[derive(Debug, Clone)]
pub struct Cursor {
    config: CursorConfig,
    /// Records below this LSN are walked (they keep the chain) but not returned.
    start_lsn: Option<Lsn>,
    /// Live: the LSN the next record must carry. Staged: the lowest LSN it may carry.
    next_lsn: Option<Lsn>,
    /// Staged: whether any record was accepted yet (segment naming depends on it).
    any_record: bool,
    segment: Option<SegmentState>,
    /// Where the last sealed segment's records stopped, for naming the damage of a gap
    /// between segments.
    last_end: Option<(Lsn, usize)>,
}

#[derive(Debug, Clone)]
struct SegmentState {
    first_lsn: Lsn,
    offset: usize,
    layout: Option<Layout>,
    preamble: Option<Preamble>,
    preamble_checked: bool,
    records_count: u64,
    /// A gap seen once in the active segment at (chain end, expected LSN): reported if the
    /// next poll sees it again.
    suspect_gap: Option<(usize, Lsn)>,
    ended: bool,
}

/// What the bytes at one offset are.
enum Probe {
    Valid {
        header: RecordHeader,
        len: usize,
    },
    /// A prefix of what could still become a record: wait for more bytes.
    Incomplete,
    Invalid,
}

/// What happened inside one pass of the walk.
enum Flow {
    Continue,
    Done(Step),
}

impl Cursor {
    /// A cursor that returns records from `start_lsn` on (`None`: from the first record of
    /// the first segment). In live mode the first segment opened must start at or before
    /// `start_lsn`.
    pub fn new(config: CursorConfig, start_lsn: Option<Lsn>) -> Result<Cursor, CursorError> {
        if config.alignment_bytes == 0 {
            return Err(CursorError::Misuse("alignment_bytes must be above zero"));
        }
        Ok(Cursor { config, start_lsn, next_lsn: None, any_record: false, segment: None, last_end: None })
    }

    pub fn config(&self) -> &CursorConfig {
        &self.config
    }

    /// Live: the LSN the next record must carry. Staged: the lowest it may carry.
    pub fn next_lsn(&self) -> Option<Lsn> {
        self.next_lsn
    }

    /// The open segment's first LSN (from its name).
    pub fn segment_first_lsn(&self) -> Option<Lsn> {
        self.segment.as_ref().map(|s| s.first_lsn)
    }

    /// The open segment's layout, once its first record (or a fixed configuration) said.
    pub fn layout(&self) -> Option<Layout> {
        self.segment.as_ref().and_then(|s| s.layout)
    }

    /// The open segment's preamble, if it has one (known after the first poll).
    pub fn preamble(&self) -> Option<Preamble> {
        self.segment.as_ref().and_then(|s| s.preamble)
    }

    /// The offset the cursor reads next in the open segment.
    pub fn offset_bytes(&self) -> u64 {
        self.segment.as_ref().map_or(0, |s| s.offset as u64)
    }

    /// Starts the segment named `wal-<first_lsn>.seg`. The previous one must have ended.
    pub fn open_segment(&mut self, first_lsn: Lsn) -> Result<(), CursorError> {
        if self.segment.as_ref().is_some_and(|s| !s.ended) {
            return Err(CursorError::Misuse("open_segment before the open segment ended"));
        }
        match (self.config.mode, self.next_lsn) {
            (Mode::Live, None) => {
                if let Some(start) = self.start_lsn {
                    if first_lsn > start {
                        return Err(CursorError::StartTruncated { first_lsn, start_lsn: start });
                    }
                }
                self.next_lsn = Some(first_lsn);
            }
            (Mode::Live, Some(expected)) if first_lsn != expected => {
                return Err(self.between_segments_gap(first_lsn, expected));
            }
            (Mode::Live, Some(_)) => {}
            (Mode::Staged, None) => self.next_lsn = Some(first_lsn),
            (Mode::Staged, Some(expected)) => {
                let ok = if self.any_record { first_lsn == expected } else { first_lsn >= expected };
                if !ok {
                    return Err(self.between_segments_gap(first_lsn, expected));
                }
                self.next_lsn = Some(first_lsn);
            }
        }
        let layout = match self.config.layout {
            LayoutChoice::Fixed(layout) => Some(layout),
            LayoutChoice::Auto => None,
        };
        self.segment = Some(SegmentState {
            first_lsn,
            offset: 0,
            layout,
            preamble: None,
            preamble_checked: false,
            records_count: 0,
            suspect_gap: None,
            ended: false,
        });
        Ok(())
    }

    fn between_segments_gap(&self, first_lsn: Lsn, expected: Lsn) -> CursorError {
        let what = format!(
            "the next segment {} starts at LSN {first_lsn} but LSN {expected} was expected \
             ({})",
            segment_name(first_lsn),
            if first_lsn > expected { "records are missing" } else { "segments overlap" },
        );
        match self.last_end {
            Some((seg, offset)) => {
                CursorError::Corruption { segment: segment_name(seg), offset_bytes: offset as u64, what }
            }
            None => CursorError::Corruption { segment: segment_name(first_lsn), offset_bytes: 0, what },
        }
    }

    /// Walks the open segment's `bytes` (its contents from offset 0, as read now) from the
    /// cursor's offset. `sealed`: a newer segment with a valid first record exists and
    /// `bytes` were read after that was known.
    pub fn poll(&mut self, bytes: &[u8], sealed: bool) -> Result<Step, CursorError> {
        let Some(seg) = self.segment.as_ref() else {
            return Err(CursorError::Misuse("poll before open_segment"));
        };
        if seg.ended {
            return Err(CursorError::Misuse("poll after the segment ended; open the next one"));
        }
        if bytes.len() < seg.offset {
            return Err(self.corruption(
                seg.offset,
                "the segment is shorter than what was already read (truncated under the tail)".to_owned(),
            ));
        }
        if !seg.preamble_checked {
            if let Some(step) = self.check_preamble(bytes, sealed)? {
                return Ok(step);
            }
        }
        loop {
            let flow = match self.config.mode {
                Mode::Live => self.step_live(bytes, sealed)?,
                Mode::Staged => self.step_staged(bytes, sealed)?,
            };
            if let Flow::Done(step) = flow {
                return Ok(step);
            }
        }
    }

    /// Decodes a preamble at offset 0, if there is one. `Some(step)` when the poll must stop.
    fn check_preamble(&mut self, bytes: &[u8], sealed: bool) -> Result<Option<Step>, CursorError> {
        if bytes.len() < 4 && !sealed {
            return Ok(Some(Step::Wait { offset_bytes: 0 }));
        }
        if Preamble::is_present(bytes) {
            match Preamble::decode(bytes) {
                Ok(preamble) => {
                    if let Some(seg) = self.segment.as_mut() {
                        seg.preamble = Some(preamble);
                        seg.offset = PREAMBLE_LEN_BYTES;
                    }
                }
                Err(FormatError::Truncated { .. }) if !sealed => {
                    return Ok(Some(Step::Wait { offset_bytes: 0 }));
                }
                Err(e) => return Err(self.corruption(0, format!("bad segment preamble: {e}"))),
            }
        }
        if let Some(seg) = self.segment.as_mut() {
            seg.preamble_checked = true;
        }
        Ok(None)
    }

    fn step_live(&mut self, bytes: &[u8], sealed: bool) -> Result<Flow, CursorError> {
        let (offset, layout) = self.position();
        let expected = self.next_lsn.unwrap_or_default();
        match self.probe_at(bytes, offset, layout)? {
            Probe::Valid { header, len } if header.is_padding() => {
                self.advance(offset, len, header.layout());
                Ok(Flow::Continue)
            }
            Probe::Valid { header, len } if header.lsn == expected => self.accept(header, offset, len),
            Probe::Valid { header, .. } if header.lsn > expected => Err(self.corruption(
                offset,
                format!("found LSN {} where LSN {expected} was expected: records are missing", header.lsn),
            )),
            // A stale record (old LSN), a torn record, or bytes that are no record.
            _ => self.chain_end(bytes, sealed, offset, layout, expected),
        }
    }

    /// The records stop at `offset`: apply the next-boundary rule (layout A), the gap rule,
    /// then wait or end the segment.
    fn chain_end(
        &mut self,
        bytes: &[u8],
        sealed: bool,
        offset: usize,
        layout: Option<Layout>,
        expected: Lsn,
    ) -> Result<Flow, CursorError> {
        let align = self.config.alignment_bytes as usize;
        if layout != Some(Layout::B) {
            let boundary = next_boundary(offset, align);
            if let Some(b) = boundary.filter(|b| *b < bytes.len()) {
                if let Probe::Valid { header, .. } = self.probe_at(bytes, b, layout)? {
                    if header.lsn == expected && !header.is_padding() {
                        if let Some(seg) = self.segment.as_mut() {
                            seg.offset = b;
                        }
                        return Ok(Flow::Continue);
                    }
                }
            }
        }
        // The gap rule: a valid record beyond the expected LSN at any later boundary.
        let mut b = next_boundary(offset, align);
        while let Some(at) = b.filter(|at| *at < bytes.len()) {
            if let Probe::Valid { header, .. } = probe(bytes, at, layouts(layout)) {
                if !header.is_padding() && header.lsn > expected {
                    let confirmed =
                        sealed || self.segment.as_ref().and_then(|s| s.suspect_gap) == Some((offset, expected));
                    if !confirmed {
                        if let Some(seg) = self.segment.as_mut() {
                            seg.suspect_gap = Some((offset, expected));
                        }
                        return Ok(Flow::Done(Step::Wait { offset_bytes: offset as u64 }));
                    }
                    return Err(self.corruption(
                        offset,
                        format!(
                            "records stop here at LSN {expected}, but a valid record with LSN {} \
                             sits at byte {at}: records are missing",
                            header.lsn
                        ),
                    ));
                }
            }
            b = next_boundary(at, align);
        }
        let seg_first = self.segment.as_ref().map(|s| s.first_lsn).unwrap_or_default();
        if let Some(seg) = self.segment.as_mut() {
            seg.suspect_gap = None;
            if sealed {
                seg.ended = true;
            }
        }
        if sealed {
            self.last_end = Some((seg_first, offset));
            return Ok(Flow::Done(Step::EndOfSegment { next_lsn: expected }));
        }
        Ok(Flow::Done(Step::Wait { offset_bytes: offset as u64 }))
    }

    fn step_staged(&mut self, bytes: &[u8], sealed: bool) -> Result<Flow, CursorError> {
        let (offset, layout) = self.position();
        let lowest = self.next_lsn.unwrap_or_default();
        match self.probe_at(bytes, offset, layout)? {
            Probe::Valid { header, len } if header.is_padding() => {
                self.advance(offset, len, header.layout());
                Ok(Flow::Continue)
            }
            Probe::Valid { header, len } if header.lsn >= lowest && header.lsn != Lsn(0) => {
                self.accept(header, offset, len)
            }
            Probe::Valid { header, .. } => Err(self.corruption(
                offset,
                format!("LSN {} is not above the previous record's: a staged wal's LSNs must increase", header.lsn),
            )),
            Probe::Incomplete if offset == bytes.len() || !sealed => {
                if sealed {
                    let seg_first = self.segment.as_ref().map(|s| s.first_lsn).unwrap_or_default();
                    if let Some(seg) = self.segment.as_mut() {
                        seg.ended = true;
                    }
                    self.last_end = Some((seg_first, offset));
                    return Ok(Flow::Done(Step::EndOfSegment { next_lsn: lowest }));
                }
                Ok(Flow::Done(Step::Wait { offset_bytes: offset as u64 }))
            }
            Probe::Incomplete => {
                Err(self.corruption(offset, "a partial record ends this sealed staged segment".to_owned()))
            }
            // Zeros preallocated past the active segment's records.
            Probe::Invalid if !sealed && bytes.get(offset..).is_some_and(|rest| rest.iter().all(|b| *b == 0)) => {
                Ok(Flow::Done(Step::Wait { offset_bytes: offset as u64 }))
            }
            Probe::Invalid => Err(self.corruption(
                offset,
                "these bytes are not a valid record, and a staged wal has no leftovers".to_owned(),
            )),
        }
    }

    fn position(&self) -> (usize, Option<Layout>) {
        self.segment.as_ref().map_or((0, None), |s| (s.offset, s.layout))
    }

    /// Probes `offset`; in a fixed-layout segment whose first record checks out only under
    /// the other layout, says so.
    fn probe_at(&self, bytes: &[u8], offset: usize, layout: Option<Layout>) -> Result<Probe, CursorError> {
        let found = probe(bytes, offset, layouts(layout));
        let first_record = self.segment.as_ref().is_some_and(|s| s.records_count == 0);
        if let (Probe::Invalid, LayoutChoice::Fixed(configured), true) = (&found, self.config.layout, first_record) {
            let other = if configured == Layout::A { Layout::B } else { Layout::A };
            if let Probe::Valid { .. } = probe(bytes, offset, &[other]) {
                let segment = self.segment_label();
                return Err(CursorError::LayoutMismatch { segment, configured, found: other });
            }
        }
        Ok(found)
    }

    fn advance(&mut self, offset: usize, len: usize, layout: Layout) {
        if let Some(seg) = self.segment.as_mut() {
            seg.offset = offset.saturating_add(len);
            seg.layout.get_or_insert(layout);
            seg.suspect_gap = None;
        }
    }

    fn accept(&mut self, header: RecordHeader, offset: usize, len: usize) -> Result<Flow, CursorError> {
        let Some(next) = header.lsn.next() else {
            return Err(self.corruption(offset, "LSN u64::MAX leaves no room for more".to_owned()));
        };
        self.advance(offset, len, header.layout());
        if let Some(seg) = self.segment.as_mut() {
            seg.records_count += 1;
        }
        self.next_lsn = Some(next);
        self.any_record = true;
        if self.start_lsn.is_some_and(|start| header.lsn < start) {
            return Ok(Flow::Continue);
        }
        Ok(Flow::Done(Step::Record(Record { header, offset_bytes: offset, len_bytes: len })))
    }

    fn segment_label(&self) -> String {
        segment_name(self.segment.as_ref().map(|s| s.first_lsn).unwrap_or_default())
    }

    fn corruption(&self, offset: usize, what: String) -> CursorError {
        CursorError::Corruption { segment: self.segment_label(), offset_bytes: offset as u64, what }
    }
}

fn layouts(layout: Option<Layout>) -> &'static [Layout] {
    match layout {
        Some(Layout::A) => &[Layout::A],
        Some(Layout::B) => &[Layout::B],
        None => &Layout::ALL,
    }
}

/// The smallest multiple of `align` above `offset`.
fn next_boundary(offset: usize, align: usize) -> Option<usize> {
    (offset / align).checked_add(1)?.checked_mul(align)
}

/// What the bytes at `offset` are, under any of `layouts`.
fn probe(bytes: &[u8], offset: usize, layouts: &[Layout]) -> Probe {
    let rest = bytes.get(offset..).unwrap_or(&[]);
    if !plausible_prefix(rest) {
        return Probe::Invalid;
    }
    let mut incomplete = false;
    for layout in layouts {
        match check_record(*layout, rest) {
            Ok((header, len)) => return Probe::Valid { header, len },
            Err(FormatError::Truncated { .. }) => incomplete = true,
            Err(_) => {}
        }
    }
    if incomplete {
        Probe::Incomplete
    } else {
        Probe::Invalid
    }
}

/// Whether `rest` could be (the start of) a record: the bytes that are there agree with the
/// magic, the version and the payload limit. Compared byte by byte on fixed arrays (the
/// tail calls it for every record; a slice comparison is a `memcmp` call).
fn plausible_prefix(rest: &[u8]) -> bool {
    let mut expected = [0u8; 6];
    expected[..4].copy_from_slice(&MAGIC.to_le_bytes());
    expected[4..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    if rest.iter().zip(expected.iter()).any(|(got, want)| got != want) {
        return false;
    }
    if let Some(len) = rest.get(30..34) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        if len > PAYLOAD_LEN_MAX_BYTES {
            return false;
        }
    }
    true
}
