//! Bulk filler files for the reference node's base export, so a base copy moves real volume.
//!
//! What it does: [`generate_bulk`] writes `total_bytes` of deterministic pseudo-random bytes
//! (xorshift64*, seeded by file index, so they neither compress nor dedupe) split as evenly as
//! possible over `files_count` files in nested folders, `<root>/bulk/L<index % 3>/<index:06>.bulk`,
//! on up to [`THREADS_MAX_COUNT`] threads. The `ferry demo` default is a 512 MiB shard.
//!
//! What it does not: hold any write: the writes up to `base_lsn` are in the export files
//! ([`super::export`]); the bulk files are opaque bytes the verifier compares by checksum.
//! They are not fsynced (a crash mid-generation leaves a run that is started again anyway).
//!
//! Invariants: files are created new (an existing file is an error, never overwritten); the
//! same (total_bytes, files_count) always gives the same bytes; memory is one I/O buffer per
//! thread.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::XorShift;

/// Most bulk files one call makes: enough to show many small files, few enough to list.
pub const FILES_MAX_COUNT: u32 = 100_000;
/// Most generator threads.
pub const THREADS_MAX_COUNT: usize = 4;
/// The folder under the export root that holds the bulk files.
pub const BULK_DIR: &str = "bulk";
const IO_BUFFER_BYTES: usize = 1 << 20;

/// What [`generate_bulk`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkReport {
    /// (path relative to the root, size) of every file.
    pub files: Vec<(PathBuf, u64)>,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Why bulk generation failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("bulk files: {0}")]
    Misuse(String),
}

/// The bulk files' relative paths and sizes: `total_bytes` split as evenly as possible.
pub fn bulk_layout(total_bytes: u64, files_count: u32) -> Vec<(PathBuf, u64)> {
    let count = u64::from(files_count.max(1));
    let (each, extra) = (total_bytes / count, total_bytes % count);
    (0..count)
        .map(|i| {
            (Path::new(BULK_DIR).join(format!("L{}", i % 3)).join(format!("{i:06}.bulk")), each + u64::from(i < extra))
        })
        .collect()
}

/// Writes the bulk files under `root` (see the module docs).
pub fn generate_bulk(root: &Path, total_bytes: u64, files_count: u32) -> Result<BulkReport, BulkError> {
    if files_count == 0 || files_count > FILES_MAX_COUNT {
        return Err(BulkError::Misuse(format!("files_count {files_count} must be 1 to {FILES_MAX_COUNT}")));
    }
    let started = Instant::now();
    let files = bulk_layout(total_bytes, files_count);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, THREADS_MAX_COUNT);
    let threads = threads.min(files.len());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let files = &files;
                scope.spawn(move || -> Result<(), BulkError> {
                    let mut buf = vec![0u8; IO_BUFFER_BYTES];
                    for (index, (rel, size_bytes)) in files.iter().enumerate().skip(t).step_by(threads) {
                        write_bulk_file(&root.join(rel), *size_bytes, index as u64, &mut buf)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| BulkError::Misuse("a bulk generation thread died".into()))??;
        }
        Ok::<_, BulkError>(())
    })?;
    Ok(BulkReport { files, bytes: total_bytes, elapsed: started.elapsed() })
}

fn write_bulk_file(path: &Path, size_bytes: u64, seed: u64, buf: &mut [u8]) -> Result<(), BulkError> {
    let err = |source| BulkError::Io { path: path.to_path_buf(), cause: source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| BulkError::Io { path: parent.to_path_buf(), cause: source })?;
    }
    let mut out = File::options().write(true).create_new(true).open(path).map_err(err)?;
    let mut rng = XorShift::new(seed);
    let mut left = size_bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let part = buf.get_mut(..n).unwrap_or_default();
        rng.fill(part);
        out.write_all(part).map_err(err)?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn layout_splits_every_byte_over_nested_files() {
        let files = bulk_layout(10, 3);
        let sizes: Vec<u64> = files.iter().map(|f| f.1).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        assert_eq!(files[2].0, PathBuf::from("bulk/L2/000002.bulk"));
        assert_eq!(bulk_layout(512 << 20, 8).iter().map(|f| f.1).sum::<u64>(), 512 << 20);
    }

    #[test]
    fn generation_is_deterministic_and_never_overwrites() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let report = generate_bulk(a.path(), (3 << 20) + 5, 4).unwrap();
        generate_bulk(b.path(), (3 << 20) + 5, 4).unwrap();
        assert_eq!(report.files.len(), 4);
        for (rel, size) in &report.files {
            let bytes = fs::read(a.path().join(rel)).unwrap();
            assert_eq!(bytes.len() as u64, *size);
            assert_eq!(bytes, fs::read(b.path().join(rel)).unwrap());
        }
        let first = fs::read(a.path().join(&report.files[0].0)).unwrap();
        let second = fs::read(a.path().join(&report.files[1].0)).unwrap();
        assert_ne!(first[..4096], second[..4096]);
        assert!(matches!(generate_bulk(a.path(), 100, 4), Err(BulkError::Io { .. })));
        assert!(matches!(generate_bulk(a.path(), 100, 0), Err(BulkError::Misuse(_))));
    }
}
