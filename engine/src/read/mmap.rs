//! The mmap reader: maps each chunk's window of the file and hands it out as `Bytes`, with
//! no copy.
//!
//! What it does: for a chunk `(offset, len)`, maps exactly that window read-only (memmap2
//! aligns the mapping's start down to a page and hides the slack), asks the kernel to read it
//! ahead (`MADV_WILLNEED`), and wraps it with `Bytes::from_owner`. The window is unmapped when
//! the last clone of that `Bytes` is dropped, i.e. once quinn has had the chunk acknowledged.
//! At most `buffers_count` windows are mapped at once (a semaphore permit rides in each).
//!
//! What it does not: copy, or make page faults cheap. Touching a page that is not in the page
//! cache blocks the touching thread (a tokio worker) on the disk, so this mode is for hot data;
//! use `uring` or `uring-direct` for cold files.
//!
//! SIGBUS: if the file is truncated while a window is mapped, touching the missing pages
//! raises SIGBUS and kills the process. ferry accepts this because source files are hard-linked
//! snapshots of immutable files (DESIGN section 2), the sender checks size and mtime, and this
//! reader (1) checks the file's current size with `fstat` right before mapping, so a file that
//! already shrank is a [`ReadError::ShortRead`], and (2) keeps each window one chunk long, so a
//! window lives only as long as its chunk is in flight. A truncation between that check and the
//! last touch is not caught; do not use `mmap` on files something else may truncate.
//!
//! Invariants: a returned `Bytes` covers exactly the asked window; the mapping outlives every
//! clone of it.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Advice, Mmap, MmapOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ReadError, SourceFile};

/// Maps chunk windows; at most `buffers_count` at once.
pub struct MmapReader {
    permits: Arc<Semaphore>,
}

impl fmt::Debug for MmapReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapReader").field("available_count", &self.available_count()).finish()
    }
}

/// One mapped chunk window; unmapped on drop, which also frees its slot.
struct MmapWindow {
    map: Mmap,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for MmapWindow {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl MmapReader {
    /// A reader that keeps at most `buffers_count` windows mapped (the caller validated it).
    pub fn new(buffers_count: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(buffers_count)) }
    }

    /// Windows that could be mapped now without waiting.
    pub fn available_count(&self) -> usize {
        self.permits.available_permits()
    }

    /// Maps `len_bytes` (> 0, inside the file as opened) at `offset_bytes`.
    pub async fn read(&self, file: &Arc<SourceFile>, offset_bytes: u64, len_bytes: u32) -> Result<Bytes, ReadError> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.map_err(|_| ReadError::ReaderGone)?;
        let end_bytes = offset_bytes.saturating_add(u64::from(len_bytes));
        // Mapping past the current end would SIGBUS on touch: refuse it while we can.
        let size_now_bytes = file.file().metadata().map_err(|source| file.io_error(offset_bytes, source))?.len();
        if size_now_bytes < end_bytes {
            let got_bytes = size_now_bytes.saturating_sub(offset_bytes);
            return Err(file.short_read(offset_bytes, len_bytes, got_bytes));
        }
        let mut options = MmapOptions::new();
        options.offset(offset_bytes).len(len_bytes as usize);
        // SAFETY: the mapping is read-only and private to this window; the file is an
        // immutable snapshot whose size we just checked (see the module docs on SIGBUS).
        let map = unsafe { options.map(file.file()) }.map_err(|source| file.io_error(offset_bytes, source))?;
        // Start the readahead now so the consumer's page faults find the pages; a refusal only
        // costs speed.
        let _ = map.advise(Advice::WillNeed);
        Ok(Bytes::from_owner(MmapWindow { map, _permit: permit }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::super::test_support::*;
    use super::super::{ChunkReader, ReadMode, ReaderConfig};

    fn reader(config: ReaderConfig) -> ChunkReader {
        ChunkReader::new(ReadMode::Mmap, config).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_exact_bytes() {
        check_exact_bytes(&reader(small_config())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_reads_past_eof() {
        check_past_eof(&reader(small_config())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounds_windows_mapped() {
        check_pool_bound(&reader(ReaderConfig { buffers_count: 2, ..small_config() })).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_shrunk_file_instead_of_sigbus() {
        check_shrunk_file(&reader(small_config())).await;
    }
}
