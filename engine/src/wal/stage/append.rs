//! Appending to a staged WAL: one checked batch (or group of frames), written back to back,
//! one fdatasync per segment file written, one folder fsync when a segment was created; the
//! open segment's preallocated zeros extended or, at a roll, cut (module docs of `stage`).
//!
//! What it does not: recover a folder (see `recovery`), or decide when to sync (the caller's
//! batch is the unit: the transfer groups every frame already waiting into one batch).
//!
//! Invariants: a batch is checked whole before its first byte is written; the durable LSN
//! moves only after every sync of the batch returned; a failed write or sync poisons the
//! value (module docs of `stage`).

use std::io::IoSlice;
use std::sync::Arc;

use ferry_wire::wal::{check_record, segment_name, FormatError, Layout, Preamble, RecordHeader, PREAMBLE_LEN_BYTES};
use ferry_wire::{crc32c_append, Lsn};

use super::{
    io_err, Place, RecordCheck, Segment, StageError, StagedRecord, StagedWal, WRITE_COALESCE_MAX_BYTES,
    ZEROS_PIECE_BYTES,
};

/// Most slices gathered for one vectored write (the storage splits them by `IOV_MAX` anyway;
/// this bounds the list a batch of many small records builds).
const IOV_PENDING_MAX_COUNT: usize = 8192;
use crate::storage::StorageFile;

/// Bytes gathered for one write call at `start` of the open segment: slices of the caller's
/// records (and of their preambles), written with one vectored write, never copied here.
#[derive(Debug, Default)]
struct Pending<'a> {
    start: u64,
    slices: Vec<IoSlice<'a>>,
    len_bytes: usize,
}

impl StagedWal {
    /// Stages `records` (in LSN order, all above the durable LSN) durably and returns the new
    /// durable LSN: one write per segment run, one fdatasync per segment file written, one
    /// folder fsync when a segment file was created. An empty batch returns the durable LSN.
    /// Every record's header and CRC32C are checked ([`RecordCheck::Crc`]).
    pub fn append_batch(&mut self, records: &[StagedRecord<'_>]) -> Result<Lsn, StageError> {
        self.append_checked_batch(records, RecordCheck::Crc)
    }

    /// [`StagedWal::append_batch`] with the check `check` on every record: the WAL stream's
    /// stager passes [`RecordCheck::Framed`] (see there for what it proves and why that is
    /// enough for records that arrived in a checked WAL batch frame).
    pub fn append_checked_batch(
        &mut self,
        records: &[StagedRecord<'_>],
        check: RecordCheck,
    ) -> Result<Lsn, StageError> {
        if self.failed {
            return Err(StageError::Failed);
        }
        let layouts = self.check_batch(records, check)?;
        let Some(last) = records.last() else { return Ok(self.durable_lsn) };
        // Poisoned until the batch is durable: any error below leaves it failed.
        self.failed = true;
        let mut touched: Vec<(String, Arc<dyn StorageFile>)> = Vec::new();
        let mut created = false;
        let mut pending = Pending {
            start: self.segments.last().map_or(0, |s| s.len_bytes),
            slices: Vec::with_capacity(records.len().saturating_add(1).min(IOV_PENDING_MAX_COUNT)),
            len_bytes: 0,
        };
        for (record, layout) in records.iter().zip(layouts) {
            let len_bytes = record.bytes.len() as u64;
            match self.place(record.lsn, len_bytes, record.source_preamble, layout) {
                Place::Start { name_lsn } => {
                    self.write_pending(&mut pending)?;
                    self.cut_zeros_of_open(&mut touched)?;
                    let name = segment_name(name_lsn);
                    let path = self.dir.join(&name);
                    if self.storage.exists(&path) {
                        return Err(StageError::Corrupt {
                            path,
                            detail: "a file already has the name of the next staged segment".to_owned(),
                        });
                    }
                    let file = self.storage.open_rw(&path).map_err(io_err("create", &path))?;
                    touched.push((name.clone(), Arc::clone(&file)));
                    self.open_file = Some(file);
                    self.open_file_len_bytes = 0;
                    created = true;
                    self.segments.push(Segment {
                        name,
                        preamble: record.source_preamble,
                        layout,
                        len_bytes: 0,
                        crc32c: 0,
                        first_lsn: record.lsn,
                        last_lsn: record.lsn,
                        records_count: 0,
                    });
                    pending.start = 0;
                    if let Some(preamble) = record.source_preamble.as_ref() {
                        self.stage_bytes(&mut pending, preamble)?;
                    }
                }
                Place::Append => {
                    if touched.is_empty() {
                        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else {
                            return Err(StageError::Misuse("append without an open segment"));
                        };
                        touched.push((seg.name.clone(), Arc::clone(file)));
                    }
                }
            }
            self.stage_bytes(&mut pending, record.bytes)?;
            if let Some(seg) = self.segments.last_mut() {
                seg.last_lsn = record.lsn;
                seg.records_count += 1;
            }
        }
        self.write_pending(&mut pending)?;
        self.preallocate()?;
        for (name, file) in &touched {
            // Planted bug (`AckBeforeSync`, tests only): the group is reported durable, and
            // acknowledged, before its fdatasync.
            if ferry_wire::plant::planted(ferry_wire::plant::Bug::AckBeforeSync) {
                continue;
            }
            let path = self.dir.join(name);
            file.sync_data().map_err(io_err("sync", &path))?;
        }
        if created {
            self.storage.sync_dir(&self.dir).map_err(io_err("sync folder", &self.dir))?;
        }
        self.durable_lsn = last.lsn;
        self.failed = false;
        Ok(self.durable_lsn)
    }

    /// Checks every record of a batch; returns each record's layout.
    fn check_batch(&self, records: &[StagedRecord<'_>], check: RecordCheck) -> Result<Vec<Layout>, StageError> {
        let mut layouts: Vec<Layout> = Vec::with_capacity(records.len());
        let mut previous = self.durable_lsn;
        // The layout the last record was staged in: a framed record in another layout (or the
        // first ever) has its CRC checked under the layout its length names, so a segment's
        // layout is never decided by a length alone.
        let mut last_layout = self.segments.last().map(|s| s.layout);
        for (i, record) in records.iter().enumerate() {
            let lsn = record.lsn;
            if lsn <= previous {
                return Err(if i == 0 || previous == self.durable_lsn {
                    StageError::NotAboveDurable { lsn, durable: self.durable_lsn }
                } else {
                    StageError::NotIncreasing { lsn, previous }
                });
            }
            let decoded = match check {
                RecordCheck::Crc => decode_record(record.bytes),
                RecordCheck::Framed => decode_framed_record(record.bytes).and_then(|(header, len)| {
                    if last_layout == Some(header.layout()) {
                        Ok((header, len))
                    } else {
                        check_record(header.layout(), record.bytes)
                    }
                }),
            };
            let (header, record_bytes) = decoded.map_err(|source| StageError::BadRecord { lsn, cause: source })?;
            if record_bytes != record.bytes.len() {
                return Err(StageError::RecordLength { lsn, given_bytes: record.bytes.len(), record_bytes });
            }
            if header.lsn != lsn {
                return Err(StageError::LsnMismatch { lsn, found: header.lsn });
            }
            if let Some(preamble) = record.source_preamble {
                Preamble::decode(&preamble).map_err(|source| StageError::BadPreamble { lsn, source })?;
            }
            layouts.push(header.layout());
            last_layout = Some(header.layout());
            previous = lsn;
        }
        Ok(layouts)
    }

    /// The plan: where the record `lsn` of `len_bytes` from a source segment with `preamble`,
    /// in `layout`, goes (module docs).
    pub(super) fn place(
        &self,
        lsn: Lsn,
        len_bytes: u64,
        preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
        layout: Layout,
    ) -> Place {
        match self.segments.last() {
            None => Place::Start { name_lsn: lsn },
            Some(open)
                if open.preamble != preamble
                    || open.layout != layout
                    || (open.records_count > 0
                        && open.len_bytes.saturating_add(len_bytes) > self.options.roll_size_bytes) =>
            {
                Place::Start { name_lsn: Lsn(open.last_lsn.0.saturating_add(1)) }
            }
            Some(_) => Place::Append,
        }
    }

    /// Adds `bytes` to the open segment: gathered in `pending` (by reference), written once
    /// `pending` holds [`WRITE_COALESCE_MAX_BYTES`] or [`IOV_PENDING_MAX_COUNT`] slices.
    fn stage_bytes<'a>(&mut self, pending: &mut Pending<'a>, bytes: &'a [u8]) -> Result<(), StageError> {
        if pending.len_bytes.saturating_add(bytes.len()) > WRITE_COALESCE_MAX_BYTES
            || pending.slices.len() >= IOV_PENDING_MAX_COUNT
        {
            self.write_pending(pending)?;
        }
        pending.slices.push(IoSlice::new(bytes));
        pending.len_bytes = pending.len_bytes.saturating_add(bytes.len());
        if let Some(seg) = self.segments.last_mut() {
            seg.len_bytes = seg.len_bytes.saturating_add(bytes.len() as u64);
            seg.crc32c = crc32c_append(seg.crc32c, bytes);
        }
        Ok(())
    }

    /// Cuts the open segment's preallocated zeros and adds its file to `touched` (to sync):
    /// before a roll (synced with the batch, so a sealed segment never ends in zeros once the
    /// batch is durable), and for [`StagedWal::trim`].
    pub(super) fn cut_zeros_of_open(
        &mut self,
        touched: &mut Vec<(String, Arc<dyn StorageFile>)>,
    ) -> Result<(), StageError> {
        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else { return Ok(()) };
        if self.open_file_len_bytes > seg.len_bytes {
            let path = self.dir.join(&seg.name);
            file.set_len(seg.len_bytes).map_err(io_err("cut the preallocated zeros of", &path))?;
            if !touched.iter().any(|(name, _)| *name == seg.name) {
                touched.push((seg.name.clone(), Arc::clone(file)));
            }
        }
        self.open_file_len_bytes = seg.len_bytes;
        Ok(())
    }

    /// Writes zeros ahead of the open segment's records when less than half of
    /// [`StageOptions::preallocate_bytes`] is left (never past the roll size unless the
    /// records already are). The open segment is in the batch's files to sync.
    fn preallocate(&mut self) -> Result<(), StageError> {
        static ZEROS: [u8; ZEROS_PIECE_BYTES] = [0; ZEROS_PIECE_BYTES];
        let step = self.options.preallocate_bytes;
        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else { return Ok(()) };
        let len = seg.len_bytes;
        self.open_file_len_bytes = self.open_file_len_bytes.max(len);
        if step == 0 || self.open_file_len_bytes.saturating_sub(len) >= step / 2 {
            return Ok(());
        }
        let wanted = len.saturating_add(step).next_multiple_of(4096).min(self.options.roll_size_bytes.max(len));
        let path = self.dir.join(&seg.name);
        let mut at = self.open_file_len_bytes;
        while at < wanted {
            let piece = usize::try_from(wanted - at).unwrap_or(ZEROS_PIECE_BYTES).min(ZEROS_PIECE_BYTES);
            file.write_at(&ZEROS[..piece], at).map_err(io_err("preallocate", &path))?;
            at += piece as u64;
        }
        self.open_file_len_bytes = at;
        Ok(())
    }

    fn write_pending(&mut self, pending: &mut Pending<'_>) -> Result<(), StageError> {
        if pending.slices.is_empty() {
            return Ok(());
        }
        let (Some(seg), Some(file)) = (self.segments.last(), self.open_file.as_ref()) else {
            return Err(StageError::Misuse("write without an open segment"));
        };
        let path = self.dir.join(&seg.name);
        file.write_all_vectored_at(&pending.slices, pending.start).map_err(io_err("write", &path))?;
        pending.start = pending.start.saturating_add(pending.len_bytes as u64);
        pending.slices.clear();
        pending.len_bytes = 0;
        Ok(())
    }
}

/// The record at the start of `bytes` under whichever layout's CRC checks out.
fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, usize), FormatError> {
    match check_record(Layout::A, bytes) {
        Ok(found) => Ok(found),
        Err(a_err) => check_record(Layout::B, bytes).map_err(|_| a_err),
    }
}

/// The header of the one record `bytes` should be, and the length that header gives, without
/// its CRC32C ([`RecordCheck::Framed`]): magic, version and the payload length's limit are
/// checked by the header's decoder. `payload_len` sits at the same offset in both layouts and
/// the headers differ in length (54 and 63 bytes), so the record's length names its layout;
/// bytes that are neither layout's length come back with layout A's, which the caller refuses
/// as [`StageError::RecordLength`]. The caller checks the CRC of a record whose layout differs
/// from the record before it (see `check_batch`).
pub(super) fn decode_framed_record(bytes: &[u8]) -> Result<(RecordHeader, usize), FormatError> {
    let header = RecordHeader::decode(Layout::A, bytes)?;
    let payload_bytes = header.payload_len as usize;
    if bytes.len() == Layout::B.header_len_bytes().saturating_add(payload_bytes) {
        return Ok((RecordHeader::decode(Layout::B, bytes)?, bytes.len()));
    }
    Ok((header, Layout::A.header_len_bytes().saturating_add(payload_bytes)))
}
