//! The transfer-session state machines: what to send, what is acknowledged, what is missing.
//!
//! What it does: [`SourceSession`] hands out chunks to send (skipping what the target already
//! holds), records each chunk's CRC32C as read, builds each file's CRC32C from its chunks,
//! tracks acknowledgements and progress. [`TargetSession`] checks each arriving chunk against
//! the offer (file, alignment, exact length), records verified chunks, counts resent bytes, and
//! says when a file is ready to be finalised (all chunks verified and the source's `FileDone`
//! in, with matching size and CRC).
//!
//! What it does not: read files, write files or touch sockets. The engine feeds it events and
//! the current time (`now_ns`, any monotonic origin) and executes what it says.
//!
//! Invariants: a chunk is acknowledged at most once; bytes acknowledged never exceed bytes
//! total; every input from the peer is checked and a bad one is a [`SessionError`], never a
//! panic.

use crate::crc_table::CrcTable;
use crate::message::{chunk_count, ChunkRef, FileResume, Offer};

/// A peer (or caller) broke the transfer protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("chunk names file {file_index}, but the offer has {file_count} files")]
    NoSuchFile { file_index: u32, file_count: usize },
    #[error("chunk at offset {offset_bytes} of file {file_index} is not on a chunk boundary")]
    Misaligned { file_index: u32, offset_bytes: u64 },
    #[error("chunk {chunk_index} of file {file_index} is outside the file ({chunk_count} chunks)")]
    NoSuchChunk { file_index: u32, chunk_index: u64, chunk_count: u64 },
    #[error("chunk {chunk_index} of file {file_index} has {len_bytes} bytes, expected {expected_bytes}")]
    ChunkLen { file_index: u32, chunk_index: u64, len_bytes: u64, expected_bytes: u64 },
    #[error("file {file_index} reported {size_bytes} bytes, but the offer said {expected_bytes}")]
    FileSize { file_index: u32, size_bytes: u64, expected_bytes: u64 },
    #[error("file {file_index}: the source's CRC32C {source_crc:#010x} differs from the verified chunks' {target_crc:#010x}")]
    FileCrc { file_index: u32, source_crc: u32, target_crc: u32 },
    #[error("file {file_index} was acknowledged before it was sent (chunk {chunk_index})")]
    UnsentAck { file_index: u32, chunk_index: u64 },
}

/// A fixed-size set of bits (one per chunk).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(0);
        Self { words: vec![0; words], len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, index: u64) -> bool {
        let word = usize::try_from(index / 64).ok().and_then(|w| self.words.get(w));
        index < self.len && word.is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Sets a bit; returns whether it was newly set.
    pub fn set(&mut self, index: u64) -> bool {
        let Some(word) = usize::try_from(index / 64).ok().and_then(|w| self.words.get_mut(w)) else {
            return false;
        };
        if index >= self.len {
            return false;
        }
        let mask = 1u64 << (index % 64);
        let fresh = *word & mask == 0;
        *word |= mask;
        fresh
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Where a chunk lies and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub chunk: ChunkRef,
    pub offset_bytes: u64,
    pub len_bytes: u32,
}

/// Offset and length of chunk `chunk_index` of a file of `size_bytes`.
fn span(file_index: u32, chunk_index: u64, size_bytes: u64, chunk_len_bytes: u32) -> Option<ChunkSpan> {
    let offset_bytes = chunk_index.checked_mul(u64::from(chunk_len_bytes))?;
    if offset_bytes >= size_bytes {
        return None;
    }
    let len_bytes = u32::try_from((size_bytes - offset_bytes).min(u64::from(chunk_len_bytes))).ok()?;
    Some(ChunkSpan { chunk: ChunkRef { file_index, chunk_index }, offset_bytes, len_bytes })
}

#[derive(Debug, Clone)]
struct SourceFile {
    size_bytes: u64,
    chunk_count: u64,
    sent: Bitmap,
    acked: Bitmap,
    crc_by_chunk: Vec<Option<u32>>,
    /// Chunks whose CRC is known: the file is done when this reaches `chunk_count`.
    chunks_read_count: u64,
    done_announced: bool,
}

/// Progress of a transfer, as a user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub bytes_transferred: u64,
    pub bytes_total: u64,
    pub files_staged_count: u64,
    pub files_total_count: u64,
    /// The base is staged: the phase is WAL catch-up (or done, without a WAL).
    pub base_staged: bool,
    /// The WAL stream, when there is one: the target's durable LSN and the last selected
    /// LSN the source's tail has read. Published from the start of the stream, during the
    /// base copy too.
    pub wal_durable_lsn: Option<u64>,
    pub wal_source_lsn: Option<u64>,
    /// Bytes of WAL segments the source holds (hard-linked) for this migration, bounded by
    /// `max_held_wal_bytes`; 0 without a WAL stream.
    pub wal_held_bytes: u64,
    /// Selected record bytes read by the source's tail and not yet durable on the target.
    pub wal_lag_bytes: u64,
    /// The WAL stream's measured rate over its last window (0: nothing sent lately).
    pub wal_rate_bytes_per_sec: u64,
    /// The slowest recent group commit round trip: a batch sent to its `WalDurable`.
    pub wal_group_commit_us: u64,
}

/// The source side of a transfer.
#[derive(Debug, Clone)]
pub struct SourceSession {
    chunk_len_bytes: u32,
    files: Vec<SourceFile>,
    /// Next (file, chunk) to consider handing out.
    cursor: (usize, u64),
    bytes_total: u64,
    bytes_acked: u64,
    files_staged_count: u64,
    started_at_ns: Option<u64>,
    /// Files whose every chunk has been read, not announced yet (kept so that announcing is
    /// not a scan of every file on every chunk).
    files_read: Vec<usize>,
}

/// A file all of whose chunks have been read: announce it with this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDone {
    pub file_index: u32,
    pub size_bytes: u64,
    pub crc32c: u32,
}

impl SourceSession {
    /// A session for a validated offer.
    pub fn new(offer: &Offer) -> Self {
        let files = offer
            .files
            .iter()
            .map(|f| {
                let chunk_count = chunk_count(f.size_bytes, offer.chunk_len_bytes);
                SourceFile {
                    size_bytes: f.size_bytes,
                    chunk_count,
                    sent: Bitmap::new(chunk_count),
                    acked: Bitmap::new(chunk_count),
                    crc_by_chunk: vec![None; usize::try_from(chunk_count).unwrap_or(0)],
                    chunks_read_count: 0,
                    done_announced: false,
                }
            })
            .collect::<Vec<SourceFile>>();
        let files_read = files.iter().enumerate().filter(|(_, f)| f.chunk_count == 0).map(|(i, _)| i).collect();
        Self {
            chunk_len_bytes: offer.chunk_len_bytes,
            files,
            cursor: (0, 0),
            bytes_total: offer.bytes_total(),
            bytes_acked: 0,
            files_staged_count: 0,
            started_at_ns: None,
            files_read,
        }
    }

    /// Marks what the target already holds verified: those chunks are not sent again. Their
    /// CRCs come from the target; the engine re-reads them at the source and calls
    /// [`Self::on_chunk_read`] so the file CRC is still built from the source's bytes.
    pub fn on_resume(&mut self, resume: &[FileResume]) -> Result<Vec<ChunkSpan>, SessionError> {
        let mut to_checksum = Vec::new();
        for file_resume in resume {
            for &(chunk_index, _crc) in &file_resume.chunks {
                let span = self.span(file_resume.file_index, chunk_index)?;
                let file = &mut self.files[file_resume.file_index as usize];
                file.sent.set(chunk_index);
                if file.acked.set(chunk_index) {
                    self.bytes_acked = self.bytes_acked.saturating_add(u64::from(span.len_bytes));
                }
                to_checksum.push(span);
            }
        }
        Ok(to_checksum)
    }

    fn span(&self, file_index: u32, chunk_index: u64) -> Result<ChunkSpan, SessionError> {
        let file = self
            .files
            .get(file_index as usize)
            .ok_or(SessionError::NoSuchFile { file_index, file_count: self.files.len() })?;
        span(file_index, chunk_index, file.size_bytes, self.chunk_len_bytes).ok_or(SessionError::NoSuchChunk {
            file_index,
            chunk_index,
            chunk_count: file.chunk_count,
        })
    }

    /// The next chunk to send, or `None` when every chunk has been handed out.
    pub fn next_chunk(&mut self, now_ns: u64) -> Option<ChunkSpan> {
        self.started_at_ns.get_or_insert(now_ns);
        loop {
            let (file_index, chunk_index) = self.cursor;
            let file = self.files.get_mut(file_index)?;
            if chunk_index >= file.chunk_count {
                self.cursor = (file_index + 1, 0);
                continue;
            }
            self.cursor.1 += 1;
            if file.sent.set(chunk_index) {
                let file_index = u32::try_from(file_index).ok()?;
                return span(file_index, chunk_index, file.size_bytes, self.chunk_len_bytes);
            }
        }
    }

    /// Records the CRC32C of a chunk's bytes as read from the source file.
    pub fn on_chunk_read(&mut self, chunk: ChunkRef, crc32c: u32) -> Result<(), SessionError> {
        self.span(chunk.file_index, chunk.chunk_index)?;
        let file = &mut self.files[chunk.file_index as usize];
        if let Some(slot) = usize::try_from(chunk.chunk_index).ok().and_then(|i| file.crc_by_chunk.get_mut(i)) {
            if slot.replace(crc32c).is_none() {
                file.chunks_read_count += 1;
                if file.chunks_read_count == file.chunk_count {
                    self.files_read.push(chunk.file_index as usize);
                }
            }
        }
        Ok(())
    }

    /// Files whose every chunk has been read and that were not announced yet, each with its
    /// CRC32C built from the chunks' CRCs. Empty files are announced at once.
    pub fn take_files_done(&mut self) -> Vec<FileDone> {
        let chunk_len = u64::from(self.chunk_len_bytes);
        let mut done = Vec::new();
        for index in std::mem::take(&mut self.files_read) {
            let Some(file) = self.files.get_mut(index) else { continue };
            if file.done_announced {
                continue;
            }
            let mut crc = 0u32;
            for (chunk_index, chunk_crc) in file.crc_by_chunk.iter().enumerate() {
                let offset = (chunk_index as u64).saturating_mul(chunk_len);
                let len = file.size_bytes.saturating_sub(offset).min(chunk_len);
                crc = crate::crc32c_combine(crc, chunk_crc.unwrap_or(0), len);
            }
            file.done_announced = true;
            if let Ok(file_index) = u32::try_from(index) {
                done.push(FileDone { file_index, size_bytes: file.size_bytes, crc32c: crc });
            }
        }
        done
    }

    /// Records acknowledgements from the target. Duplicates are ignored; an ack for a chunk
    /// never sent is a protocol error.
    pub fn on_acks(&mut self, chunks: &[ChunkRef]) -> Result<(), SessionError> {
        for chunk in chunks {
            let span = self.span(chunk.file_index, chunk.chunk_index)?;
            let file = &mut self.files[chunk.file_index as usize];
            if !file.sent.get(chunk.chunk_index) {
                return Err(SessionError::UnsentAck { file_index: chunk.file_index, chunk_index: chunk.chunk_index });
            }
            if file.acked.set(chunk.chunk_index) {
                self.bytes_acked = self.bytes_acked.saturating_add(u64::from(span.len_bytes));
            }
        }
        Ok(())
    }

    pub fn on_file_staged(&mut self) {
        self.files_staged_count = self.files_staged_count.saturating_add(1);
    }

    /// Whether every chunk has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.files.iter().all(|f| f.acked.count_ones() == f.chunk_count)
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bytes_transferred: self.bytes_acked,
            bytes_total: self.bytes_total,
            files_staged_count: self.files_staged_count,
            files_total_count: self.files.len() as u64,
            ..Progress::default()
        }
    }

    /// Average rate since the first chunk was handed out, in bytes per second.
    pub fn rate_bytes_per_sec(&self, now_ns: u64) -> u64 {
        let elapsed_ns = now_ns.saturating_sub(self.started_at_ns.unwrap_or(now_ns));
        if elapsed_ns == 0 {
            return 0;
        }
        u64::try_from(u128::from(self.bytes_acked) * 1_000_000_000 / u128::from(elapsed_ns)).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone)]
struct TargetFile {
    size_bytes: u64,
    chunk_count: u64,
    verified: Bitmap,
    /// Allocated as chunks arrive: an offer's declared size costs little (`crc_table`).
    crc_by_chunk: CrcTable,
    done: Option<FileDone>,
    ready_reported: bool,
    /// Distinct chunks verified (the bitmap's ones, kept so a check is not a scan).
    verified_count: u64,
    /// Set when the file was found staged (renamed into place) by an earlier run.
    staged_crc: Option<u32>,
}

/// What the target should do with a chunk that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkVerdict {
    /// Write it at its offset, then call [`TargetSession::on_chunk_written`].
    Write { chunk_index: u64 },
    /// Already held verified: do not write again (counted in `bytes_resent`), but ack it.
    Duplicate { chunk_index: u64 },
}

/// The target side of a transfer.
#[derive(Debug, Clone)]
pub struct TargetSession {
    chunk_len_bytes: u32,
    files: Vec<TargetFile>,
    /// Chunk bytes received (headers checked), over every run.
    bytes_received: u64,
    /// Bytes of distinct chunks verified.
    bytes_verified: u64,
}

impl TargetSession {
    /// A session for a validated offer.
    pub fn new(offer: &Offer) -> Self {
        let files = offer
            .files
            .iter()
            .map(|f| {
                let chunk_count = chunk_count(f.size_bytes, offer.chunk_len_bytes);
                TargetFile {
                    size_bytes: f.size_bytes,
                    chunk_count,
                    verified: Bitmap::new(chunk_count),
                    crc_by_chunk: CrcTable::new(chunk_count),
                    done: None,
                    ready_reported: false,
                    verified_count: 0,
                    staged_crc: None,
                }
            })
            .collect();
        Self { chunk_len_bytes: offer.chunk_len_bytes, files, bytes_received: 0, bytes_verified: 0 }
    }

    fn file(&self, file_index: u32) -> Result<&TargetFile, SessionError> {
        self.files.get(file_index as usize).ok_or(SessionError::NoSuchFile { file_index, file_count: self.files.len() })
    }

    /// Checks a chunk's position and length against the offer, before its body is read.
    pub fn check_chunk(
        &mut self,
        file_index: u32,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> Result<ChunkVerdict, SessionError> {
        let chunk_len = u64::from(self.chunk_len_bytes);
        let file = self.file(file_index)?;
        if !offset_bytes.is_multiple_of(chunk_len) {
            return Err(SessionError::Misaligned { file_index, offset_bytes });
        }
        let chunk_index = offset_bytes / chunk_len;
        let expected = span(file_index, chunk_index, file.size_bytes, self.chunk_len_bytes)
            .ok_or(SessionError::NoSuchChunk { file_index, chunk_index, chunk_count: file.chunk_count })?;
        if expected.len_bytes != len_bytes {
            return Err(SessionError::ChunkLen {
                file_index,
                chunk_index,
                len_bytes: u64::from(len_bytes),
                expected_bytes: u64::from(expected.len_bytes),
            });
        }
        let duplicate = file.verified.get(chunk_index);
        self.bytes_received = self.bytes_received.saturating_add(u64::from(len_bytes));
        if duplicate {
            return Ok(ChunkVerdict::Duplicate { chunk_index });
        }
        Ok(ChunkVerdict::Write { chunk_index })
    }

    /// Records a chunk as written and verified. Returns the file when it became ready.
    pub fn on_chunk_written(
        &mut self,
        file_index: u32,
        chunk_index: u64,
        crc32c: u32,
    ) -> Result<Option<FileDone>, SessionError> {
        let file_count = self.files.len();
        let file =
            self.files.get_mut(file_index as usize).ok_or(SessionError::NoSuchFile { file_index, file_count })?;
        let chunk_count = file.chunk_count;
        if !file.crc_by_chunk.set(chunk_index, crc32c) {
            return Err(SessionError::NoSuchChunk { file_index, chunk_index, chunk_count });
        }
        if file.verified.set(chunk_index) {
            file.verified_count += 1;
            let len = span(file_index, chunk_index, file.size_bytes, self.chunk_len_bytes).map_or(0, |s| s.len_bytes);
            self.bytes_verified = self.bytes_verified.saturating_add(u64::from(len));
        }
        self.ready(file_index)
    }

    /// Records the source's `FileDone`. Returns the file when it became ready.
    pub fn on_file_done(&mut self, done: FileDone) -> Result<Option<FileDone>, SessionError> {
        let file_count = self.files.len();
        let file_index = done.file_index;
        let file =
            self.files.get_mut(file_index as usize).ok_or(SessionError::NoSuchFile { file_index, file_count })?;
        if done.size_bytes != file.size_bytes {
            return Err(SessionError::FileSize {
                file_index,
                size_bytes: done.size_bytes,
                expected_bytes: file.size_bytes,
            });
        }
        file.done = Some(done);
        self.ready(file_index)
    }

    fn ready(&mut self, file_index: u32) -> Result<Option<FileDone>, SessionError> {
        let chunk_len = u64::from(self.chunk_len_bytes);
        let Some(file) = self.files.get_mut(file_index as usize) else {
            return Ok(None);
        };
        let Some(done) = file.done else { return Ok(None) };
        if let Some(staged_crc) = file.staged_crc {
            if staged_crc != done.crc32c {
                return Err(SessionError::FileCrc { file_index, source_crc: done.crc32c, target_crc: staged_crc });
            }
            let fresh = !file.ready_reported;
            file.ready_reported = true;
            return Ok(fresh.then_some(done));
        }
        if file.ready_reported || file.verified_count != file.chunk_count {
            return Ok(None);
        }
        let mut target_crc = 0u32;
        for (chunk_index, chunk_crc) in file.crc_by_chunk.iter().enumerate() {
            let offset = (chunk_index as u64).saturating_mul(chunk_len);
            let len = file.size_bytes.saturating_sub(offset).min(chunk_len);
            target_crc = crate::crc32c_combine(target_crc, chunk_crc, len);
        }
        if target_crc != done.crc32c {
            return Err(SessionError::FileCrc { file_index, source_crc: done.crc32c, target_crc });
        }
        file.ready_reported = true;
        Ok(Some(done))
    }

    /// The CRC32C of a file once it is ready (verified against the source's).
    pub fn file_crc(&self, file_index: u32) -> Option<u32> {
        let file = self.files.get(file_index as usize)?;
        file.ready_reported.then_some(file.done?.crc32c).or(file.staged_crc)
    }

    /// Chunk bytes received beyond the distinct chunks verified: what was sent again (after an
    /// interruption, or a duplicate), plus chunks still being written.
    pub fn bytes_resent(&self) -> u64 {
        self.bytes_received.saturating_sub(self.bytes_verified)
    }

    /// Adds chunk bytes received by earlier runs (from the chunk log).
    pub fn add_bytes_received(&mut self, bytes: u64) {
        self.bytes_received = self.bytes_received.saturating_add(bytes);
    }

    /// Marks a chunk verified from an earlier run (after the engine re-checked its bytes).
    pub fn restore_chunk(&mut self, file_index: u32, chunk_index: u64, crc32c: u32) -> Result<(), SessionError> {
        self.on_chunk_written(file_index, chunk_index, crc32c).map(|_| ())
    }

    /// Marks a whole file staged by an earlier run (after the engine re-checked it).
    pub fn restore_staged(&mut self, file_index: u32, crc32c: u32) -> Result<(), SessionError> {
        let file_count = self.files.len();
        let file =
            self.files.get_mut(file_index as usize).ok_or(SessionError::NoSuchFile { file_index, file_count })?;
        for chunk in 0..file.chunk_count {
            file.verified.set(chunk);
        }
        file.verified_count = file.chunk_count;
        file.staged_crc = Some(crc32c);
        let size = file.size_bytes;
        self.bytes_verified = self.bytes_verified.saturating_add(size);
        Ok(())
    }

    /// Whether a file was found staged by an earlier run.
    pub fn is_staged(&self, file_index: u32) -> bool {
        self.files.get(file_index as usize).is_some_and(|f| f.staged_crc.is_some())
    }

    /// Bytes of distinct chunks verified so far.
    pub fn bytes_verified(&self) -> u64 {
        self.bytes_verified
    }

    /// The verified chunks of every file, with their CRCs, for a resuming source.
    pub fn resume_list(&self) -> Vec<FileResume> {
        let mut out = Vec::new();
        for (index, file) in self.files.iter().enumerate() {
            let chunks: Vec<(u64, u32)> = (0..file.chunk_count)
                .filter(|c| file.verified.get(*c))
                .filter_map(|c| file.crc_by_chunk.get(c).map(|crc| (c, crc)))
                .collect();
            if let (false, Ok(file_index)) = (chunks.is_empty(), u32::try_from(index)) {
                out.push(FileResume { file_index, chunks });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use crate::ids::{Lsn, MigrationId, VShardId};
    use crate::message::OfferFile;
    use crate::path::RelPath;
    use proptest::prelude::*;

    /// The largest offer a peer may send (2^26 chunks of 4 KiB) makes the target hold about
    /// 9 MiB (its bitmap and page pointers), not the 256 MiB a CRC per declared chunk took;
    /// the table grows as chunks are verified.
    #[test]
    fn the_largest_offer_costs_the_target_little_until_chunks_arrive() {
        let chunk_len = crate::limits::CHUNK_LEN_MIN_BYTES;
        let o = offer(&[crate::limits::CHUNK_COUNT_MAX * u64::from(chunk_len)], chunk_len);
        o.validate().unwrap();
        let mut t = TargetSession::new(&o);
        let held = |t: &TargetSession| -> u64 {
            t.files.iter().map(|f| f.crc_by_chunk.held_bytes() + f.verified.words.len() as u64 * 8).sum()
        };
        let empty = held(&t);
        assert!(empty < 10 << 20, "{empty} bytes held for a declared offer");
        t.on_chunk_written(0, 0, 7).unwrap();
        assert_eq!(held(&t), empty + 4096);
    }

    fn offer(sizes: &[u64], chunk_len_bytes: u32) -> Offer {
        Offer {
            migration_id: MigrationId::new("m").unwrap(),
            vshard_id: VShardId(1),
            base_lsn: Lsn(0),
            chunk_len_bytes,
            files: sizes
                .iter()
                .enumerate()
                .map(|(i, s)| OfferFile { path: RelPath::new(format!("f{i}")).unwrap(), size_bytes: *s })
                .collect(),
            db_meta: serde_json::Value::Null,
            wal: false,
        }
    }

    /// Runs a whole transfer through both machines with file contents `data`, delivering
    /// chunks in the order `order` picks, and returns what the target saw as ready.
    fn run(data: &[Vec<u8>], chunk_len: u32, reverse: bool) -> (Vec<FileDone>, Progress, u64) {
        let o = offer(&data.iter().map(|d| d.len() as u64).collect::<Vec<_>>(), chunk_len);
        let mut source = SourceSession::new(&o);
        let mut target = TargetSession::new(&o);
        let mut spans = Vec::new();
        while let Some(span) = source.next_chunk(1) {
            spans.push(span);
        }
        if reverse {
            spans.reverse();
        }
        let mut ready = Vec::new();
        for span in &spans {
            let bytes = &data[span.chunk.file_index as usize][span.offset_bytes as usize..][..span.len_bytes as usize];
            let crc = crate::crc32c(bytes);
            source.on_chunk_read(span.chunk, crc).unwrap();
            let verdict = target.check_chunk(span.chunk.file_index, span.offset_bytes, span.len_bytes).unwrap();
            assert_eq!(verdict, ChunkVerdict::Write { chunk_index: span.chunk.chunk_index });
            ready.extend(target.on_chunk_written(span.chunk.file_index, span.chunk.chunk_index, crc).unwrap());
            source.on_acks(&[span.chunk]).unwrap();
        }
        for done in source.take_files_done() {
            assert_eq!(done.crc32c, crate::crc32c(&data[done.file_index as usize]));
            ready.extend(target.on_file_done(done).unwrap());
        }
        assert!(source.all_acked());
        (ready, source.progress(), target.bytes_resent())
    }

    #[test]
    fn a_whole_transfer_reports_every_file_ready() {
        let data = vec![vec![], vec![1], vec![7; 4095], vec![9; 4096], vec![3; 3 * 4096 + 5]];
        let (ready, progress, resent) = run(&data, 4096, true);
        assert_eq!(ready.len(), data.len());
        assert_eq!(progress.bytes_transferred, progress.bytes_total);
        assert_eq!(resent, 0);
    }

    #[test]
    fn chunks_off_the_offer_are_protocol_errors() {
        let o = offer(&[10_000], 4096);
        let mut target = TargetSession::new(&o);
        assert!(matches!(target.check_chunk(1, 0, 4096), Err(SessionError::NoSuchFile { .. })));
        assert!(matches!(target.check_chunk(0, 100, 4096), Err(SessionError::Misaligned { .. })));
        assert!(matches!(target.check_chunk(0, 3 * 4096, 4096), Err(SessionError::NoSuchChunk { .. })));
        assert!(matches!(target.check_chunk(0, 2 * 4096, 4096), Err(SessionError::ChunkLen { .. })));
        assert!(matches!(
            target.on_file_done(FileDone { file_index: 0, size_bytes: 5, crc32c: 0 }),
            Err(SessionError::FileSize { .. })
        ));
    }

    #[test]
    fn a_wrong_file_crc_is_caught() {
        let o = offer(&[4096], 4096);
        let mut target = TargetSession::new(&o);
        target.on_chunk_written(0, 0, 1234).unwrap();
        let err = target.on_file_done(FileDone { file_index: 0, size_bytes: 4096, crc32c: 99 }).unwrap_err();
        assert!(matches!(err, SessionError::FileCrc { .. }));
    }

    #[test]
    fn duplicates_count_as_resent_and_resume_skips_held_chunks() {
        let o = offer(&[3 * 4096], 4096);
        let mut target = TargetSession::new(&o);
        target.check_chunk(0, 0, 4096).unwrap();
        target.on_chunk_written(0, 0, 5).unwrap();
        assert_eq!(target.check_chunk(0, 0, 4096).unwrap(), ChunkVerdict::Duplicate { chunk_index: 0 });
        assert_eq!(target.bytes_resent(), 4096);
        let mut source = SourceSession::new(&o);
        let rechecksum = source.on_resume(&target.resume_list()).unwrap();
        assert_eq!(rechecksum.len(), 1);
        let next: Vec<u64> = std::iter::from_fn(|| source.next_chunk(0)).map(|s| s.chunk.chunk_index).collect();
        assert_eq!(next, vec![1, 2]);
        assert_eq!(source.progress().bytes_transferred, 4096);
    }

    #[test]
    fn acks_for_unsent_chunks_are_refused() {
        let o = offer(&[4096], 4096);
        let mut source = SourceSession::new(&o);
        let err = source.on_acks(&[ChunkRef { file_index: 0, chunk_index: 0 }]).unwrap_err();
        assert!(matches!(err, SessionError::UnsentAck { .. }));
    }

    proptest! {
        #[test]
        fn any_sizes_transfer_completely(sizes in proptest::collection::vec(0usize..20_000, 0..6), reverse in any::<bool>()) {
            let data: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, s)| (0..*s).map(|b| (b * 31 + i) as u8).collect()).collect();
            let (ready, progress, _) = run(&data, 4096, reverse);
            prop_assert_eq!(ready.len(), data.len());
            prop_assert_eq!(progress.bytes_transferred, progress.bytes_total);
        }

        #[test]
        fn any_chunk_position_is_checked_without_panic(file in any::<u32>(), offset in any::<u64>(), len in any::<u32>()) {
            let mut target = TargetSession::new(&offer(&[100_000, 0, 1], 4096));
            let _ = target.check_chunk(file, offset, len);
        }
    }
}

#[cfg(test)]
mod restore_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ids::{Lsn, MigrationId, VShardId};
    use crate::message::OfferFile;
    use crate::path::RelPath;

    fn offer() -> Offer {
        Offer {
            migration_id: MigrationId::new("m").unwrap(),
            vshard_id: VShardId(1),
            base_lsn: Lsn(0),
            chunk_len_bytes: 4096,
            files: vec![
                OfferFile { path: RelPath::new("a").unwrap(), size_bytes: 8192 },
                OfferFile { path: RelPath::new("b").unwrap(), size_bytes: 100 },
            ],
            db_meta: serde_json::Value::Null,
            wal: false,
        }
    }

    #[test]
    fn restored_state_resumes_and_counts_resent_bytes() {
        let mut target = TargetSession::new(&offer());
        target.add_bytes_received(4096 + 4096 + 100);
        target.restore_chunk(0, 0, 5).unwrap();
        target.restore_staged(1, 77).unwrap();
        assert!(target.is_staged(1));
        // Chunk 1 of file 0 was received but lost: it comes again.
        assert_eq!(target.check_chunk(0, 4096, 4096).unwrap(), ChunkVerdict::Write { chunk_index: 1 });
        target.on_chunk_written(0, 1, 6).unwrap();
        assert_eq!(target.bytes_resent(), 4096);
        // The staged file is ready as soon as the source's CRC agrees, and only then.
        assert!(target.on_file_done(FileDone { file_index: 1, size_bytes: 100, crc32c: 78 }).is_err());
        assert!(target.on_file_done(FileDone { file_index: 1, size_bytes: 100, crc32c: 77 }).unwrap().is_some());
        let resume = target.resume_list();
        assert_eq!(resume.len(), 2);
        assert_eq!(resume[0].chunks, vec![(0, 5), (1, 6)]);
    }
}
