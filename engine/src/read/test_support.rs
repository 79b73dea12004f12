//! Checks every read mode's unit tests share (test builds only).
//!
//! What it does: makes files of known pseudo-random bytes and runs the same assertions against
//! any [`ChunkReader`]: exact bytes at chunk boundaries, refusal past end of file, the bound on
//! chunks out, and a file that shrank. A mode the kernel or file system refuses here (io_uring
//! blocked, O_DIRECT unsupported) is skipped loudly, never passed silently as a success.
//!
//! What it does not: measure speed (the benches do).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ChunkReader, ReadError, ReadMode, ReaderConfig, SourceFile};

/// A config with small chunks, so tests cross many chunk boundaries.
pub(crate) fn small_config() -> ReaderConfig {
    ReaderConfig {
        threads: 1,
        buffers_count: 8,
        chunk_len_max_bytes: 64 * 1024,
        ring_entries: 8,
        ..ReaderConfig::default()
    }
}

/// Deterministic bytes that differ at every offset within a page and across pages.
pub(crate) fn pattern(len_bytes: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A temp file of `len_bytes` pattern bytes, opened.
pub(crate) fn make_file(len_bytes: usize) -> (tempfile::TempDir, Arc<SourceFile>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("segment-{len_bytes}"));
    let data = pattern(len_bytes);
    std::fs::write(&path, &data).unwrap();
    let file = SourceFile::open_shared(&path).unwrap();
    assert_eq!(file.size_bytes(), len_bytes as u64);
    (dir, file, data)
}

pub(crate) fn skip_loudly(what: &str, err: &ReadError) {
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{what}: a test does not skip in CI: {err}");
    eprintln!("SKIPPED {what}: {err}");
}

/// The reader, or `None` (with a loud line) if this kernel refuses the mode.
pub(crate) fn reader_or_skip(mode: ReadMode, config: ReaderConfig) -> Option<ChunkReader> {
    match ChunkReader::new(mode, config) {
        Ok(reader) => Some(reader),
        Err(err @ ReadError::UringUnavailable { .. }) => {
            skip_loudly(&format!("read mode {mode}"), &err);
            None
        }
        Err(err) => panic!("building a {mode} reader failed: {err}"),
    }
}

/// Reads a chunk, treating an O_DIRECT refusal of the file system as a loud skip (`None`).
async fn read_or_skip(
    reader: &ChunkReader,
    file: &Arc<SourceFile>,
    offset_bytes: u64,
    len_bytes: u32,
) -> Option<Bytes> {
    match reader.read(file, offset_bytes, len_bytes).await {
        Ok(bytes) => Some(bytes),
        Err(err @ ReadError::DirectUnsupported { .. }) => {
            skip_loudly(&format!("read mode {}", reader.mode()), &err);
            None
        }
        Err(err) => panic!("{} read of {len_bytes} bytes at {offset_bytes} failed: {err}", reader.mode()),
    }
}

/// Sizes around the page size and a few MiB, chunks at 0, mid-file and the partial tail.
pub(crate) async fn check_exact_bytes(reader: &ChunkReader) {
    let chunk = reader.config().chunk_len_max_bytes as usize;
    for len in [0usize, 1, 4095, 4096, 4097, 3 * 1024 * 1024 + 12_345] {
        let (_dir, file, data) = make_file(len);
        // Whole-file read in chunks, the last one partial.
        let mut offset = 0usize;
        while offset < len {
            let take = chunk.min(len - offset);
            let Some(bytes) = read_or_skip(reader, &file, offset as u64, take as u32).await else {
                return;
            };
            assert_eq!(bytes.len(), take, "{} length at {offset} of {len}", reader.mode());
            assert!(
                bytes[..] == data[offset..offset + take],
                "{} bytes differ in chunk at {offset} of a {len}-byte file",
                reader.mode()
            );
            offset += take;
        }
        // Unaligned chunks: the middle, the last byte, a span across a page boundary.
        let odd = [
            (len / 2, len - len / 2),
            (len.saturating_sub(1), len.min(1)),
            (len.saturating_sub(4097).min(4093), len.min(4099)),
        ];
        for (offset, take) in odd {
            let take = take.min(chunk).min(len - offset);
            let Some(bytes) = read_or_skip(reader, &file, offset as u64, take as u32).await else {
                return;
            };
            assert!(
                bytes[..] == data[offset..offset + take],
                "{} bytes differ at {offset}+{take} of a {len}-byte file",
                reader.mode()
            );
        }
        let empty = reader.read(&file, len as u64, 0).await.unwrap();
        assert!(empty.is_empty());
    }
}

pub(crate) async fn check_past_eof(reader: &ChunkReader) {
    let (_dir, file, _data) = make_file(4097);
    for (offset, len) in [(0u64, 4098u32), (4097, 1), (4096, 2), (u64::MAX, 1), (9000, 0)] {
        let err = reader.read(&file, offset, len).await.unwrap_err();
        assert!(matches!(err, ReadError::PastEnd { .. }), "{}: {err}", reader.mode());
        assert!(err.to_string().contains("segment-4097"), "{err}");
    }
    let (_dir, empty, _data) = make_file(0);
    let err = reader.read(&empty, 0, 1).await.unwrap_err();
    assert!(matches!(err, ReadError::PastEnd { .. }), "{}: {err}", reader.mode());
}

/// With `buffers_count = 2`, a third read waits until one of the first two is dropped.
pub(crate) async fn check_pool_bound(reader: &ChunkReader) {
    assert_eq!(reader.config().buffers_count, 2);
    let (_dir, file, data) = make_file(3 * 4096);
    let Some(first) = read_or_skip(reader, &file, 0, 4096).await else { return };
    let second = reader.read(&file, 4096, 4096).await.unwrap();
    assert_eq!(reader.available_count(), 0);
    let third = reader.read(&file, 8192, 4096);
    tokio::pin!(third);
    let waited = tokio::time::timeout(Duration::from_millis(100), &mut third).await;
    assert!(waited.is_err(), "{}: a third chunk was read while two were held", reader.mode());
    let first_clone = first.clone();
    drop(first);
    let waited = tokio::time::timeout(Duration::from_millis(100), &mut third).await;
    assert!(waited.is_err(), "{}: a clone of a held chunk was not counted", reader.mode());
    drop(first_clone);
    let third = tokio::time::timeout(Duration::from_secs(30), &mut third)
        .await
        .expect("the third read never got the freed slot")
        .unwrap();
    assert!(third[..] == data[8192..]);
    assert!(second[..] == data[4096..8192]);
}

/// A file truncated after it was opened: an error naming it, not short bytes (nor SIGBUS).
pub(crate) async fn check_shrunk_file(reader: &ChunkReader) {
    let (_dir, file, _data) = make_file(5 * 4096);
    std::fs::OpenOptions::new().write(true).open(file.path()).unwrap().set_len(2 * 4096 + 100).unwrap();
    match reader.read(&file, 8192, 4096).await {
        Err(ReadError::ShortRead { got_bytes, path, .. }) => {
            assert_eq!(got_bytes, 100, "{}", reader.mode());
            assert_eq!(path, file.path());
        }
        Err(err @ ReadError::DirectUnsupported { .. }) => {
            skip_loudly(&format!("read mode {}", reader.mode()), &err);
        }
        other => panic!("{}: expected a short read, got {other:?}", reader.mode()),
    }
}
