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
        // A streaming pass: a staged file of any size is checked in bounded memory.
        let matches = storage
            .open_read(&path)
            .and_then(|f| crate::storage::crc32c_of(&*f))
            .map(|(len_bytes, crc)| len_bytes == file.size_bytes && crc == crc32c);
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
        let bytes = buf.get_mut(..len).unwrap_or_default();
        let intact =
            crate::storage::read_exact_at(&**part, bytes, offset).is_ok() && ferry_wire::crc32c(bytes) == crc32c;
        if intact && session.restore_chunk(file_index, chunk_index, crc32c).is_ok() {
            out.chunks_kept_count += 1;
        } else {
            out.chunks_dropped_count += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use std::io::{self, IoSlice};
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ferry_wire::message::OfferFile;
    use ferry_wire::path::RelPath;
    use ferry_wire::{Lsn, MigrationId, VShardId};

    use super::*;
    use crate::storage::{FakeStorage, CRC_READ_BUFFER_BYTES};

    /// A storage that remembers the largest single read: proves a pass streams.
    #[derive(Debug)]
    struct Watched {
        inner: FakeStorage,
        read_max_bytes: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct WatchedFile {
        inner: Arc<dyn StorageFile>,
        read_max_bytes: Arc<AtomicUsize>,
    }

    impl StorageFile for WatchedFile {
        fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset_bytes)
        }
        fn write_all_vectored_at(&self, bufs: &[IoSlice<'_>], offset_bytes: u64) -> io::Result<()> {
            self.inner.write_all_vectored_at(bufs, offset_bytes)
        }
        fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize> {
            self.read_max_bytes.fetch_max(buf.len(), Ordering::Relaxed);
            self.inner.read_at(buf, offset_bytes)
        }
        fn set_len(&self, len_bytes: u64) -> io::Result<()> {
            self.inner.set_len(len_bytes)
        }
        fn len_bytes(&self) -> io::Result<u64> {
            self.inner.len_bytes()
        }
        fn sync_data(&self) -> io::Result<()> {
            self.inner.sync_data()
        }
    }

    impl Storage for Watched {
        fn open_rw(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
            let inner = self.inner.open_rw(path)?;
            Ok(Arc::new(WatchedFile { inner, read_max_bytes: self.read_max_bytes.clone() }))
        }
        fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
            let inner = self.inner.open_read(path)?;
            Ok(Arc::new(WatchedFile { inner, read_max_bytes: self.read_max_bytes.clone() }))
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.inner.create_dir_all(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.inner.rename(from, to)
        }
        fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
            self.inner.hard_link(original, link)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.inner.remove_file(path)
        }
        fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
            self.inner.remove_dir_all(path)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.inner.sync_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            self.inner.exists(path)
        }
        fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
            self.inner.list_dir(path)
        }
    }

    /// Issue 18: after a restart, a staged file is re-checked in one streaming pass whose reads
    /// never exceed [`CRC_READ_BUFFER_BYTES`], whatever the file's size (it used to be read
    /// whole: a 64 GiB segment needed a 64 GiB buffer). A file larger than the buffer that
    /// matches is kept; one flipped bit anywhere in it (the last buffer included) is found and
    /// the file removed so it is fetched again.
    #[test]
    fn restore_checks_staged_files_in_bounded_reads_and_finds_a_flip() {
        let size_bytes = 3 * CRC_READ_BUFFER_BYTES + 12_345;
        let bytes: Vec<u8> = (0..size_bytes).map(|i| (i * 31 % 251) as u8).collect();
        let crc = ferry_wire::crc32c(&bytes);
        let offer = Offer {
            migration_id: MigrationId::new("m-stream").unwrap(),
            vshard_id: VShardId(1),
            base_lsn: Lsn(0),
            chunk_len_bytes: 1 << 20,
            files: vec![OfferFile { path: RelPath::new("a.seg").unwrap(), size_bytes: size_bytes as u64 }],
            db_meta: serde_json::Value::Null,
            wal: false,
        };
        let layout = StagingLayout::new(Path::new("/data"), &offer.migration_id);
        let replay = Replay {
            verified: Default::default(),
            staged: [(0u32, crc)].into_iter().collect(),
            bytes_received: size_bytes as u64,
            valid_len_bytes: 0,
        };
        for flip_at in [None, Some(0), Some(size_bytes / 2), Some(size_bytes - 1)] {
            let storage = Watched { inner: FakeStorage::new(), read_max_bytes: Arc::new(AtomicUsize::new(0)) };
            let path = layout.segment_path(&offer.files[0].path);
            storage.create_dir_all(path.parent().unwrap()).unwrap();
            let mut on_disk = bytes.clone();
            if let Some(at) = flip_at {
                on_disk[at] ^= 0x10;
            }
            storage.open_rw(&path).unwrap().write_at(&on_disk, 0).unwrap();
            storage.read_max_bytes.store(0, Ordering::Relaxed);

            let mut session = TargetSession::new(&offer);
            let restored = restore(&storage, &layout, &offer, &replay, &mut session).unwrap();
            let read_max = storage.read_max_bytes.load(Ordering::Relaxed);
            assert!(read_max > 0 && read_max <= CRC_READ_BUFFER_BYTES, "a read of {read_max} bytes");
            match flip_at {
                None => {
                    assert_eq!(restored.files_staged_count, 1);
                    assert!(session.is_staged(0) && storage.exists(&path));
                }
                Some(at) => {
                    assert_eq!(restored.files_staged_count, 0, "the flip at {at} was not found");
                    assert!(!session.is_staged(0) && !storage.exists(&path), "flip at {at}: the file stays");
                }
            }
        }
    }
}
