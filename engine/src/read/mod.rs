//! Chunk readers of the source side: the bytes of `(file, offset, len)` chunks as
//! [`bytes::Bytes`], asynchronously, with bounded memory.
//!
//! What it does: [`ChunkReader`] reads chunks of a [`SourceFile`] with one of four
//! [`ReadMode`]s:
//! - `mmap`: maps the chunk's window and hands it out without copying ([`mmap`]); for hot data.
//! - `uring`: io_uring READs on dedicated reader threads into pooled buffers ([`uring`]).
//! - `uring-direct`: the same through an O_DIRECT descriptor (bypasses the page cache; for cold
//!   data that should not evict the database's own cache).
//! - `pread`: `read_at` on tokio's blocking pool into pooled buffers ([`pread`]); the portable
//!   fallback and the baseline of the benches.
//!
//! What it does not: decide which chunks to read, check CRCs, or detect that a file changed
//! (the sender checks size and mtime; a file that shrank under a read is reported as
//! [`ReadError::ShortRead`], never truncated silently).
//!
//! Invariants:
//! - At most [`ReaderConfig::buffers_count`] chunks are in flight or held by callers at once,
//!   in every mode: [`ChunkReader::read`] waits for a free slot, and a slot comes back when the
//!   last clone of the `Bytes` it returned is dropped (for quinn: once the chunk is
//!   acknowledged). Anonymous memory is at most `buffers_count * (chunk_len_max_bytes + 4 KiB)`.
//!   A caller that holds `buffers_count` chunks and asks for another waits forever: bound the
//!   chunks you keep below `buffers_count`.
//! - A returned `Bytes` is exactly `len_bytes` long and holds the file's bytes at
//!   `offset_bytes..offset_bytes + len_bytes`.
//! - `unsafe` lives only in [`pool`], [`mmap`] and [`uring`], each block with a `// SAFETY:` line.

pub mod mmap;
pub mod pool;
pub mod pread;
pub mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use self::pool::{BufferPool, ALIGN_BYTES};

/// How chunks are read. Parsed from and displayed as `mmap`, `uring`, `uring-direct`, `pread`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// Map each chunk's window; zero copy. Hot data only (a page fault on cold data blocks the
    /// thread that touches it).
    Mmap,
    /// io_uring READ through the page cache.
    Uring,
    /// io_uring READ through an O_DIRECT descriptor, bypassing the page cache.
    UringDirect,
    /// `pread` on tokio's blocking pool; portable fallback and baseline.
    Pread,
}

impl ReadMode {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [ReadMode; 4] = [ReadMode::Mmap, ReadMode::Uring, ReadMode::UringDirect, ReadMode::Pread];

    /// The CLI name of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Mmap => "mmap",
            ReadMode::Uring => "uring",
            ReadMode::UringDirect => "uring-direct",
            ReadMode::Pread => "pread",
        }
    }

    fn uses_uring(self) -> bool {
        matches!(self, ReadMode::Uring | ReadMode::UringDirect)
    }
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A read mode name that is none of `mmap`, `uring`, `uring-direct`, `pread`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown read mode {0:?}; use one of mmap, uring, uring-direct, pread")]
pub struct ParseReadModeError(pub String);

impl FromStr for ReadMode {
    type Err = ParseReadModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReadMode::ALL.into_iter().find(|mode| mode.as_str() == s).ok_or_else(|| ParseReadModeError(s.to_owned()))
    }
}

/// Sizing of a [`ChunkReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderConfig {
    /// io_uring reader threads, each with its own ring (uring modes only). Default 1.
    pub threads: usize,
    /// Chunks in flight or held by callers at once, in every mode: the memory bound.
    /// Default 64 (64 MiB of buffers with 1 MiB chunks).
    pub buffers_count: usize,
    /// Longest chunk a caller may ask for; sizes the pooled buffers. Default 1 MiB.
    pub chunk_len_max_bytes: u32,
    /// Submission queue entries of each ring (uring modes only). Default 64.
    pub ring_entries: u32,
    /// What the io_uring reader threads lower themselves to as they start (uring modes only;
    /// see [`crate::priority`]). Default: nothing lowered; a source's copy passes its node's
    /// bulk priority.
    pub priority: crate::priority::BulkPriority,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            buffers_count: 64,
            chunk_len_max_bytes: 1 << 20,
            ring_entries: 64,
            priority: crate::priority::BulkPriority::NORMAL,
        }
    }
}

/// Upper limits on [`ReaderConfig`], so a bad flag fails fast instead of exhausting memory.
pub const READER_THREADS_MAX: usize = 64;
/// See [`READER_THREADS_MAX`].
pub const CHUNK_LEN_MAX_BYTES: u32 = 64 << 20;
/// See [`READER_THREADS_MAX`].
pub const RING_ENTRIES_MAX: u32 = 4096;
/// See [`READER_THREADS_MAX`].
pub const BUFFERS_COUNT_MAX: usize = 1 << 16;

/// Why a read failed, grouped by blame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    // --- I/O: the file system or the kernel said no.
    /// The source file could not be opened.
    #[error("cannot open source file {path}: {cause}; check that it exists and is readable")]
    Open { path: PathBuf, cause: io::Error },
    /// A read system call failed.
    #[error("reading source file {path} at offset {offset_bytes} failed: {cause}")]
    Io { path: PathBuf, offset_bytes: u64, cause: io::Error },
    /// The file ended before the chunk did: it shrank after it was opened.
    #[error(
        "source file {path} ended early: got {got_bytes} of {len_bytes} bytes at offset \
         {offset_bytes}; it shrank during the copy, but source files must stay immutable \
         (retry the migration from a fresh snapshot)"
    )]
    ShortRead { path: PathBuf, offset_bytes: u64, len_bytes: u32, got_bytes: u64 },
    /// The kernel refused io_uring (seccomp, `kernel.io_uring_disabled`, old kernel).
    #[error("io_uring is unavailable: {cause}; use read mode pread (ferry falls back to it)")]
    UringUnavailable { cause: io::Error },
    /// The file system refused O_DIRECT for this file.
    #[error("O_DIRECT is not supported for {path}: {cause}; use read mode uring")]
    DirectUnsupported { path: PathBuf, cause: io::Error },
    /// A reader thread died (a bug, or the process is going down).
    #[error("the io_uring reader thread stopped; restart the daemon and report a bug")]
    ReaderGone,

    // --- Caller misuse: the request or the config is wrong.
    /// The chunk does not lie inside the file.
    #[error(
        "chunk at offset {offset_bytes} of {len_bytes} bytes lies past the end of {path} \
         ({size_bytes} bytes); ask only for chunks inside the file"
    )]
    PastEnd { path: PathBuf, offset_bytes: u64, len_bytes: u32, size_bytes: u64 },
    /// The chunk is longer than the reader's buffers.
    #[error(
        "chunk of {len_bytes} bytes is longer than chunk_len_max_bytes {chunk_len_max_bytes}; \
         raise ReaderConfig::chunk_len_max_bytes or cut smaller chunks"
    )]
    ChunkTooLarge { len_bytes: u32, chunk_len_max_bytes: u32 },
    /// A [`ReaderConfig`] field is out of range.
    #[error("invalid reader config: {0}")]
    Config(String),
}

/// An open source file: its path (for errors), its descriptor and its size at open.
///
/// The O_DIRECT descriptor used by [`ReadMode::UringDirect`] is opened on first use.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    direct: OnceLock<File>,
}

impl SourceFile {
    /// Opens `path` read-only and records its size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| ReadError::Open { path: path.clone(), cause: source };
        let file = File::open(&path).map_err(open_err)?;
        let size_bytes = file.metadata().map_err(open_err)?.len();
        Ok(Self { path, file, size_bytes, direct: OnceLock::new() })
    }

    /// Opens `path` and wraps it for sharing between reads.
    pub fn open_shared(path: impl AsRef<Path>) -> Result<Arc<Self>, ReadError> {
        Self::open(path).map(Arc::new)
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size when it was opened; reads are checked against it.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The buffered descriptor.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The O_DIRECT descriptor, opened on first use.
    pub fn direct_file(&self) -> Result<&File, ReadError> {
        if let Some(file) = self.direct.get() {
            return Ok(file);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&self.path).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        ReadError::DirectUnsupported { path: self.path.clone(), cause: source }
                    }
                    _ => ReadError::Open { path: self.path.clone(), cause: source },
                }
            })?;
        // Two racing first readers both open; the loser's descriptor is closed here.
        let _ = self.direct.set(file);
        Ok(self.direct.get().unwrap_or(&self.file))
    }

    /// Checks that `offset_bytes..offset_bytes + len_bytes` lies inside the file.
    fn check_range(&self, offset_bytes: u64, len_bytes: u32) -> Result<(), ReadError> {
        match offset_bytes.checked_add(u64::from(len_bytes)) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ReadError::PastEnd {
                path: self.path.clone(),
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    fn short_read(&self, offset_bytes: u64, len_bytes: u32, got_bytes: u64) -> ReadError {
        ReadError::ShortRead { path: self.path.clone(), offset_bytes, len_bytes, got_bytes }
    }

    fn io_error(&self, offset_bytes: u64, source: io::Error) -> ReadError {
        ReadError::Io { path: self.path.clone(), offset_bytes, cause: source }
    }
}

/// Reads chunks of [`SourceFile`]s as `Bytes`, with at most `buffers_count` chunks out at once.
///
/// `Send + Sync`: share it behind an `Arc` between the sender's tasks. Dropping a uring-mode
/// reader joins its threads, which blocks until their in-flight reads finish (milliseconds at
/// worst); chunks already handed out stay valid.
#[derive(Debug)]
pub struct ChunkReader {
    mode: ReadMode,
    config: ReaderConfig,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Mmap(mmap::MmapReader),
    Uring(uring::UringReader),
    Pread(pread::PreadReader),
}

impl ChunkReader {
    /// Builds a reader. For the uring modes this sets up the rings and starts the reader
    /// threads; a kernel that refuses io_uring gives [`ReadError::UringUnavailable`].
    pub fn new(mode: ReadMode, config: ReaderConfig) -> Result<Self, ReadError> {
        validate(&config)?;
        let backend = match mode {
            ReadMode::Mmap => Backend::Mmap(mmap::MmapReader::new(config.buffers_count)),
            ReadMode::Uring | ReadMode::UringDirect => {
                Backend::Uring(uring::UringReader::new(&config, new_pool(&config)?)?)
            }
            ReadMode::Pread => Backend::Pread(pread::PreadReader::new(new_pool(&config)?)),
        };
        Ok(Self { mode, config, backend })
    }

    /// Like [`ChunkReader::new`], but if io_uring is unavailable, logs a loud warning and
    /// returns a [`ReadMode::Pread`] reader instead. Check [`ChunkReader::mode`] for the result.
    pub fn new_or_pread(mode: ReadMode, config: ReaderConfig) -> Result<Self, ReadError> {
        match Self::new(mode, config.clone()) {
            Err(err @ ReadError::UringUnavailable { .. }) if mode.uses_uring() => {
                tracing::warn!(
                    requested = %mode,
                    error = %err,
                    "io_uring refused by the kernel; FALLING BACK to pread, expect lower throughput"
                );
                Self::new(ReadMode::Pread, config)
            }
            other => other,
        }
    }

    /// The mode this reader reads with.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// The config this reader was built with.
    pub fn config(&self) -> &ReaderConfig {
        &self.config
    }

    /// Chunks that could be read right now without waiting for a held one to be dropped.
    pub fn available_count(&self) -> usize {
        match &self.backend {
            Backend::Mmap(reader) => reader.available_count(),
            Backend::Uring(reader) => reader.available_count(),
            Backend::Pread(reader) => reader.available_count(),
        }
    }

    /// Reads `len_bytes` at `offset_bytes` of `file`. Waits while `buffers_count` chunks are
    /// out. Errors if the chunk is not inside the file as opened, or the file shrank.
    /// Cancel-safe: dropping the future leaks nothing (an in-flight read finishes and its
    /// buffer returns to the pool).
    pub async fn read(&self, file: &Arc<SourceFile>, offset_bytes: u64, len_bytes: u32) -> Result<Bytes, ReadError> {
        if len_bytes > self.config.chunk_len_max_bytes {
            return Err(ReadError::ChunkTooLarge { len_bytes, chunk_len_max_bytes: self.config.chunk_len_max_bytes });
        }
        file.check_range(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(Bytes::new());
        }
        let bytes = match &self.backend {
            Backend::Mmap(reader) => reader.read(file, offset_bytes, len_bytes).await?,
            Backend::Uring(reader) => {
                let direct = self.mode == ReadMode::UringDirect;
                reader.read(file, offset_bytes, len_bytes, direct).await?
            }
            Backend::Pread(reader) => reader.read(file, offset_bytes, len_bytes).await?,
        };
        debug_assert_eq!(bytes.len(), len_bytes as usize);
        Ok(bytes)
    }
}

fn validate(config: &ReaderConfig) -> Result<(), ReadError> {
    let fail = |what: String| Err(ReadError::Config(what));
    if config.threads == 0 || config.threads > READER_THREADS_MAX {
        return fail(format!("threads must be 1..={READER_THREADS_MAX}"));
    }
    if config.buffers_count == 0 || config.buffers_count > BUFFERS_COUNT_MAX {
        return fail(format!("buffers_count must be 1..={BUFFERS_COUNT_MAX}"));
    }
    if config.chunk_len_max_bytes == 0 || config.chunk_len_max_bytes > CHUNK_LEN_MAX_BYTES {
        return fail(format!("chunk_len_max_bytes must be 1..={CHUNK_LEN_MAX_BYTES}"));
    }
    if config.ring_entries == 0 || config.ring_entries > RING_ENTRIES_MAX {
        return fail(format!("ring_entries must be 1..={RING_ENTRIES_MAX}"));
    }
    Ok(())
}

/// A pool whose buffers fit any chunk up to `chunk_len_max_bytes` plus the O_DIRECT alignment
/// slack (the read may start up to 4095 bytes early and end up to 4095 bytes late).
fn new_pool(config: &ReaderConfig) -> Result<BufferPool, ReadError> {
    let buf_len_bytes = (config.chunk_len_max_bytes as usize)
        .checked_next_multiple_of(ALIGN_BYTES)
        .and_then(|len| len.checked_add(ALIGN_BYTES));
    buf_len_bytes
        .and_then(|len| BufferPool::new(config.buffers_count, len))
        .ok_or_else(|| ReadError::Config("buffer pool size overflows".to_owned()))
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::test_support::*;
    use super::*;

    #[test]
    fn mode_names_round_trip() {
        for mode in ReadMode::ALL {
            assert_eq!(mode.to_string().parse::<ReadMode>().unwrap(), mode);
        }
        assert_eq!("uring-direct".parse::<ReadMode>().unwrap(), ReadMode::UringDirect);
        let err = "io_uring".parse::<ReadMode>().unwrap_err();
        assert!(err.to_string().contains("mmap, uring, uring-direct, pread"));
    }

    #[test]
    fn bad_configs_are_refused() {
        for config in [
            ReaderConfig { threads: 0, ..ReaderConfig::default() },
            ReaderConfig { buffers_count: 0, ..ReaderConfig::default() },
            ReaderConfig { chunk_len_max_bytes: 0, ..ReaderConfig::default() },
            ReaderConfig { ring_entries: 0, ..ReaderConfig::default() },
            ReaderConfig { chunk_len_max_bytes: u32::MAX, ..ReaderConfig::default() },
        ] {
            let err = ChunkReader::new(ReadMode::Pread, config).unwrap_err();
            assert!(matches!(err, ReadError::Config(_)), "{err}");
        }
    }

    #[test]
    fn open_missing_file_names_it() {
        let err = SourceFile::open("/nonexistent/ferry/segment").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferry/segment"), "{err}");
    }

    #[tokio::test]
    async fn too_long_chunk_is_refused() {
        let (_dir, file, _data) = make_file(8192);
        let config = ReaderConfig { chunk_len_max_bytes: 4096, ..small_config() };
        let reader = ChunkReader::new(ReadMode::Pread, config).unwrap();
        let err = reader.read(&file, 0, 4097).await.unwrap_err();
        assert!(matches!(err, ReadError::ChunkTooLarge { .. }), "{err}");
    }
}
