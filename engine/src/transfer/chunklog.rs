//! The target's chunk log on disk (`.ferry/chunks.log`), and the re-check of what it claims.
//!
//! What it does: opens or creates the log through the storage seam, appends records (no sync
//! per record: a killed process keeps the page cache, so the log survives SIGKILL up to the
//! last record), syncs it in batches after the data it describes, and on resume re-reads every
//! chunk and staged file the log names and keeps only those whose bytes still match their
//! CRC32C.
//!
//! What it does not: define the record format ([`ferry_wire::checkpoint`] does).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_wire::checkpoint::{self, LogRecord, Replay, LOG_HEADER_LEN_BYTES, LOG_RECORD_LEN_BYTES};
use ferry_wire::message::Offer;
use ferry_wire::session::TargetSession;

use crate::staging::{io_err, StagingError, StagingLayout};
use crate::storage::{Storage, StorageFile};

/// Largest chunk log accepted: far above what CHUNK_COUNT_MAX chunks produce in one run,
/// and bounded so a corrupt size cannot make a restart read without limit.
const LOG_LEN_MAX_BYTES: u64 = 4 << 30;

/// An open chunk log. Appends are serialised, so tasks of an old connection still finishing a
/// write cannot interleave with a new connection's records.
#[derive(Debug)]
pub struct ChunkLog {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    end_bytes: Mutex<u64>,
}

impl ChunkLog {
    pub fn path(layout: &StagingLayout) -> PathBuf {
        layout.ferry_dir().join("chunks.log")
    }

    /// Replays an existing log for `offer`, or `None` when there is none or it belongs to
    /// another offer or is unreadable (the staging is then started afresh).
    pub fn replay_existing(storage: &dyn Storage, layout: &StagingLayout, offer: &Offer) -> Option<Replay> {
        let path = Self::path(layout);
        if !storage.exists(&path) {
            return None;
        }
        let file = storage.open_read(&path).ok()?;
        if file.len_bytes().ok()? > LOG_LEN_MAX_BYTES {
            tracing::warn!(path = %path.display(), "chunk log is too large; starting the staging afresh");
            return None;
        }
        let bytes = storage.read_all(&path).ok()?;
        match checkpoint::replay(&bytes, checkpoint::offer_digest(offer)) {
            Ok(replay) => Some(replay),
            Err(e) => {
                tracing::warn!(path = %path.display(), "chunk log unusable ({e}); starting the staging afresh");
                None
            }
        }
    }

    /// Creates a fresh log for `offer` and makes it durable.
    pub fn create(storage: &dyn Storage, layout: &StagingLayout, offer: &Offer) -> Result<Self, StagingError> {
        let path = Self::path(layout);
        let file = storage.open_rw(&path).map_err(io_err("create", &path))?;
        file.set_len(0).map_err(io_err("truncate", &path))?;
        file.write_at(&checkpoint::encode_header(checkpoint::offer_digest(offer)), 0)
            .map_err(io_err("write", &path))?;
        file.sync_data().map_err(io_err("fsync", &path))?;
        let dir = layout.ferry_dir();
        storage.sync_dir(&dir).map_err(io_err("sync folder", &dir))?;
        Ok(Self { file, path, end_bytes: Mutex::new(LOG_HEADER_LEN_BYTES as u64) })
    }

    /// Reopens a replayed log, cutting a torn tail off.
    pub fn reopen(storage: &dyn Storage, layout: &StagingLayout, replay: &Replay) -> Result<Self, StagingError> {
        let path = Self::path(layout);
        let file = storage.open_rw(&path).map_err(io_err("open", &path))?;
        file.set_len(replay.valid_len_bytes).map_err(io_err("truncate", &path))?;
        Ok(Self { file, path, end_bytes: Mutex::new(replay.valid_len_bytes) })
    }

    /// Appends one record (not synced).
    pub fn append(&self, record: LogRecord) -> Result<(), StagingError> {
        let mut end = self.end_bytes.lock().unwrap_or_else(|e| e.into_inner());
        self.file.write_at(&record.encode(), *end).map_err(io_err("append to", &self.path))?;
        *end += LOG_RECORD_LEN_BYTES as u64;
        Ok(())
    }

    /// Makes every appended record durable. Call it after the data they describe is synced.
    pub fn sync(&self) -> Result<(), StagingError> {
        self.file.sync_data().map_err(io_err("fsync", &self.path))
    }
}

/// What survived an earlier run, after re-checking the bytes on disk.
#[derive(Debug, Default)]
pub struct Restored {
    pub chunks_kept_count: u64,
    pub chunks_dropped_count: u64,
    pub files_staged_count: u64,
}

/// Re-reads every chunk and staged file the log names and restores into `session` those whose
/// bytes match. A staged file that no longer matches is removed, so it is fetched again.
pub fn restore(
    storage: &dyn Storage,
    layout: &StagingLayout,
    offer: &Offer,
    replay: &Replay,
    session: &mut TargetSession,
) -> Result<Restored, StagingError> {
    let mut out = Restored::default();
    session.add_bytes_received(replay.bytes_received);
    let chunk_len = u64::from(offer.chunk_len_bytes);
    for (&file_index, &crc32c) in &replay.staged {
        let Some(file) = offer.files.get(file_index as usize) else { continue };
        let path = layout.segment_path(&file.path);
        let matches = storage
            .read_all(&path)
            .map(|bytes| bytes.len() as u64 == file.size_bytes && ferry_wire::crc32c(&bytes) == crc32c);
        match matches {
            Ok(true) => {
                if session.restore_staged(file_index, crc32c).is_ok() {
                    out.files_staged_count += 1;
                }
            }
            _ => {
                if storage.exists(&path) {
                    storage.remove_file(&path).map_err(io_err("remove", &path))?;
                }
            }
        }
    }
    let mut buf = vec![0u8; usize::try_from(chunk_len).unwrap_or(0)];
    let mut open: Option<(u32, Arc<dyn StorageFile>)> = None;
    for (&(file_index, chunk_index), &crc32c) in &replay.verified {
        if session.is_staged(file_index) {
            continue;
        }
        let Some(file) = offer.files.get(file_index as usize) else { continue };
        let offset = chunk_index.saturating_mul(chunk_len);
        if offset >= file.size_bytes {
            out.chunks_dropped_count += 1;
            continue;
        }
        let len = usize::try_from((file.size_bytes - offset).min(chunk_len)).unwrap_or(0);
        if open.as_ref().map(|(i, _)| *i) != Some(file_index) {
            let part = layout.part_path(file_index);
            open = storage.open_read(&part).ok().map(|f| (file_index, f));
        }
        let Some((_, part)) = &open else {
            out.chunks_dropped_count += 1;
            continue;
        };
        let intact = matches!(part.read_at(&mut buf[..len], offset), Ok(n) if n == len)
            && ferry_wire::crc32c(&buf[..len]) == crc32c;
        if intact && session.restore_chunk(file_index, chunk_index, crc32c).is_ok() {
            out.chunks_kept_count += 1;
        } else {
            out.chunks_dropped_count += 1;
        }
    }
    Ok(out)
}
