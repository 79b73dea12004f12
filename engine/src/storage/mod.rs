//! The storage seam: every staged and checkpoint file write on the target goes through it.
//!
//! What it does: a small trait ([`Storage`], [`StorageFile`]) with the operations staging
//! needs (create, positional write and read, a gathered positional write of several slices,
//! set length, fsync, rename, folder fsync, remove) and its real implementation on the local
//! filesystem ([`DiskStorage`]). The crash-testing fake lives in `fake` (`FakeStorage`), built
//! only for tests and with the `testkit` feature: it is not in the production library.
//!
//! What it does not: retry. A failed write or sync is returned as is, and the caller fails
//! the transfer (DESIGN section 8).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

#[cfg(any(test, feature = "testkit"))]
mod fake;
#[cfg(any(test, feature = "testkit"))]
pub use fake::FakeStorage;

/// One open file of a [`Storage`].
pub trait StorageFile: Send + Sync + Debug {
    /// Writes all of `buf` at `offset_bytes`.
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()>;
    /// Writes all of `bufs`, one after the other, from `offset_bytes`: the same bytes as
    /// `write_at` of their concatenation, without concatenating them first.
    fn write_all_vectored_at(&self, bufs: &[IoSlice<'_>], offset_bytes: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset_bytes`; returns how many were read.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize>;
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    fn len_bytes(&self) -> io::Result<u64>;
    /// Makes the file's bytes and size durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

/// A filesystem as staging sees it.
pub trait Storage: Send + Sync + Debug {
    /// Opens a file for reading and writing, creating it when it does not exist.
    fn open_rw(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// A second name `link` for the existing file `original` (`link` must not exist).
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes a folder's entries durable (fsync of the folder).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// The names in a folder (files and folders), sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;

    /// Reads a whole file.
    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        read_whole(&*self.open_read(path)?, path)
    }

    /// Writes a whole file durably under `path` via `tmp`: write, fsync, rename, fsync of the
    /// folder of `path`.
    fn write_atomic(&self, tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let file = self.open_rw(tmp)?;
        file.set_len(0)?;
        file.write_at(bytes, 0)?;
        file.sync_data()?;
        drop(file);
        self.rename(tmp, path)?;
        self.sync_dir(path.parent().unwrap_or(Path::new("/")))
    }
}

/// Reads the whole of `file`, opened at `path` (named in the error when it shrinks meanwhile).
pub fn read_whole(file: &dyn StorageFile, path: &Path) -> io::Result<Vec<u8>> {
    let len = usize::try_from(file.len_bytes()?).map_err(|_| io::Error::other("file too large to read whole"))?;
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        let n = file.read_at(&mut buf[done..], done as u64)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} shrank while read", path.display())));
        }
        done += n;
    }
    Ok(buf)
}

/// Buffer of a streaming checksum pass ([`crc32c_of`]): large enough that a read costs little
/// next to the bytes, small enough that verifying a file of any size holds only this much.
pub const CRC_READ_BUFFER_BYTES: usize = 1 << 20;

/// The CRC32C and length of `file`'s bytes, read front to back in [`CRC_READ_BUFFER_BYTES`]
/// reads: memory stays bounded whatever the file's size. Reads up to the length the file had
/// when the pass started (a file that shrinks meanwhile ends the pass early: the length
/// returned says so).
pub fn crc32c_of(file: &dyn StorageFile) -> io::Result<(u64, u32)> {
    let len_bytes = file.len_bytes()?;
    let mut buf = vec![0u8; CRC_READ_BUFFER_BYTES];
    let (mut crc, mut offset) = (0u32, 0u64);
    while offset < len_bytes {
        let want = usize::try_from(len_bytes - offset).map_or(buf.len(), |left| left.min(buf.len()));
        let read = buf.get_mut(..want).unwrap_or_default();
        let n = file.read_at(read, offset)?;
        if n == 0 {
            break;
        }
        crc = ferry_wire::crc32c_append(crc, buf.get(..n).unwrap_or_default());
        offset += n as u64;
    }
    Ok((offset, crc))
}

/// Fills `buf` from `offset_bytes`; an `UnexpectedEof` error when the file ends first.
pub fn read_exact_at(file: &dyn StorageFile, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(buf.get_mut(done..).unwrap_or_default(), offset_bytes + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended before the bytes asked for"));
        }
        done += n;
    }
    Ok(())
}

/// `offset_bytes + len_bytes`, or an error when it does not fit a file offset.
fn checked_end(offset_bytes: u64, len_bytes: usize) -> io::Result<u64> {
    u64::try_from(len_bytes)
        .ok()
        .and_then(|len| offset_bytes.checked_add(len))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the largest file offset"))
}

/// Iovecs one `pwritev` takes at most (`IOV_MAX` on Linux).
const IOVECS_MAX_COUNT: usize = 1024;

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskStorage;

#[derive(Debug)]
struct DiskFile(File);

impl StorageFile for DiskFile {
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset_bytes)
    }
    /// `pwritev` of up to [`IOVECS_MAX_COUNT`] slices per call: one syscall for a chunk that
    /// arrived in many pieces.
    fn write_all_vectored_at(&self, bufs: &[IoSlice<'_>], offset_bytes: u64) -> io::Result<()> {
        let mut offset = offset_bytes;
        for batch in bufs.chunks(IOVECS_MAX_COUNT) {
            let batch_bytes: usize = batch.iter().map(|b| b.len()).sum();
            let written = rustix::io::pwritev(&self.0, batch, offset)?;
            if written < batch_bytes {
                // Short writes are rare on files (a signal, a full disk): finish the batch
                // slice by slice from where the kernel stopped.
                write_rest(&self.0, batch, written, offset)?;
            }
            offset = checked_end(offset, batch_bytes)?;
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset_bytes)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.0.set_len(len_bytes)
    }
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// Writes what a short `pwritev` of `batch` at `offset_bytes` left: the bytes after the first
/// `written_bytes`.
fn write_rest(file: &File, batch: &[IoSlice<'_>], written_bytes: usize, offset_bytes: u64) -> io::Result<()> {
    let mut skip = written_bytes;
    let mut offset = checked_end(offset_bytes, written_bytes)?;
    for buf in batch {
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let rest = buf.get(skip..).unwrap_or_default();
        skip = 0;
        file.write_all_at(rest, offset)?;
        offset = checked_end(offset, rest.len())?;
    }
    Ok(())
}

impl Storage for DiskStorage {
    fn open_rw(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(Arc::new(DiskFile(file)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(DiskFile(File::open(path)?)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        std::fs::hard_link(original, link)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}
