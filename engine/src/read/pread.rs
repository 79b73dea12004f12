//! The pread reader: `FileExt::read_at` on tokio's blocking pool, into pooled buffers.
//!
//! What it does: takes a buffer from the [`BufferPool`] (waiting if all are out), reads the
//! chunk with `read_at` on a `spawn_blocking` thread (looping over short reads, failing with
//! [`ReadError::ShortRead`] at an early end of file), and hands the buffer out as `Bytes`.
//! Portable, and the baseline the benches compare the other modes against.
//!
//! What it does not: use `unsafe`, bypass the page cache, or avoid the copy from the page cache
//! into the buffer.
//!
//! Invariants: the buffer returns to the pool when the returned `Bytes` (and every clone) is
//! dropped, or when the read fails, or when the caller gives up (the blocking read still runs
//! to its end, then drops the buffer).

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::pool::{BufferPool, PoolBuf};
use super::{ReadError, SourceFile};

/// Reads chunks with `pread` on tokio's blocking pool.
#[derive(Debug)]
pub struct PreadReader {
    pool: BufferPool,
}

impl PreadReader {
    /// A reader lending buffers from `pool`.
    pub fn new(pool: BufferPool) -> Self {
        Self { pool }
    }

    /// Buffers free now.
    pub fn available_count(&self) -> usize {
        self.pool.available_count()
    }

    /// Reads `len_bytes` (> 0, at most the pool's buffer length) at `offset_bytes`.
    pub async fn read(&self, file: &Arc<SourceFile>, offset_bytes: u64, len_bytes: u32) -> Result<Bytes, ReadError> {
        let buf = self.pool.acquire().await.ok_or(ReadError::ReaderGone)?;
        let file = Arc::clone(file);
        tokio::task::spawn_blocking(move || read_into(&file, buf, offset_bytes, len_bytes))
            .await
            .map_err(|_| ReadError::ReaderGone)?
    }
}

/// Fills `buf[..len_bytes]` from the file at `offset_bytes`, all or an error.
fn read_into(file: &SourceFile, mut buf: PoolBuf, offset_bytes: u64, len_bytes: u32) -> Result<Bytes, ReadError> {
    let len = len_bytes as usize;
    let Some(target) = buf.as_mut_slice().get_mut(..len) else {
        return Err(ReadError::ChunkTooLarge {
            len_bytes,
            chunk_len_max_bytes: u32::try_from(buf.capacity_bytes()).unwrap_or(u32::MAX),
        });
    };
    let mut filled = 0usize;
    while let Some(rest) = target.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        let at = offset_bytes.saturating_add(filled as u64);
        match file.file().read_at(rest, at) {
            Ok(0) => return Err(file.short_read(offset_bytes, len_bytes, filled as u64)),
            Ok(n) => filled = filled.saturating_add(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(file.io_error(at, source)),
        }
    }
    buf.set_window(0, len);
    Ok(buf.into_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::super::test_support::*;
    use super::super::{ChunkReader, ReadMode, ReaderConfig};

    fn reader(config: ReaderConfig) -> ChunkReader {
        ChunkReader::new(ReadMode::Pread, config).unwrap()
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
    async fn bounds_buffers_out() {
        check_pool_bound(&reader(ReaderConfig { buffers_count: 2, ..small_config() })).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_shrunk_file() {
        check_shrunk_file(&reader(small_config())).await;
    }
}
