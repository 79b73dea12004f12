//! A synthetic shard: a few files of random-ish bytes in a temporary folder.
//!
//! What it does: writes `files_count` files whose sizes add up to exactly `size_bytes` under
//! `<temp dir>/segments/`, filled with xorshift64* output (incompressible, every 8 bytes
//! differ), in 1 MiB blocks so a 4 GiB shard never needs 4 GiB of memory; or
//! ([`Shard::generate_tree`]) many equal files spread over sub-folders, the small-file shard.
//!
//! What it does not: look like any database's segment format; ferry treats files as opaque.
//!
//! Invariants: the shard's folder holds only its files (ferry adds `.ferry-snapshot/` next to
//! them during a copy, which [`Shard::files`] does not list); the temp dir is removed on drop.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

const BLOCK_BYTES: usize = 1 << 20;

/// One file of a shard.
#[derive(Debug, Clone)]
pub struct ShardFile {
    /// Path relative to [`Shard::root`].
    pub rel: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// A generated shard; removed when dropped.
#[derive(Debug)]
pub struct Shard {
    _dir: tempfile::TempDir,
    /// The `segments_root` to copy.
    pub root: PathBuf,
    pub files: Vec<ShardFile>,
    pub size_bytes: u64,
}

impl Shard {
    /// Writes a shard of `size_bytes` in `files_count` files under a new temp dir in `parent`.
    pub fn generate(parent: &Path, size_bytes: u64, files_count: u32, seed: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(files_count > 0, "a shard needs at least one file");
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-shard-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot make a temp dir in {}", parent.display()))?;
        let root = dir.path().join("segments");
        std::fs::create_dir_all(&root)?;
        let per_file = size_bytes / u64::from(files_count);
        let mut files = Vec::new();
        let mut rng = XorShift::new(seed);
        let mut block = vec![0u8; BLOCK_BYTES];
        for index in 0..files_count {
            // The last file takes the remainder, so the sizes add up exactly.
            let size =
                if index + 1 == files_count { size_bytes - per_file * u64::from(files_count - 1) } else { per_file };
            let rel = format!("seg-{index:04}.dat");
            let path = root.join(&rel);
            let mut file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut left = size;
            while left > 0 {
                let n = usize::try_from(left.min(BLOCK_BYTES as u64)).unwrap_or(BLOCK_BYTES);
                let part = block.get_mut(..n).context("block length")?;
                rng.fill(part);
                file.write_all(part).with_context(|| format!("cannot write {}", path.display()))?;
                left -= n as u64;
            }
            files.push(ShardFile { rel, path, size_bytes: size });
        }
        Ok(Self { _dir: dir, root, files, size_bytes })
    }

    /// Drops the shard's files from the page cache (each written back first, then
    /// `POSIX_FADV_DONTNEED`), so the next copy reads them from the disk: a cold source.
    pub fn evict_from_page_cache(&self) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        for f in &self.files {
            let file = File::open(&f.path).with_context(|| format!("cannot open {}", f.path.display()))?;
            file.sync_data().with_context(|| format!("cannot sync {}", f.path.display()))?;
            // SAFETY: a plain syscall on a descriptor this function owns; no memory is shared.
            let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            anyhow::ensure!(rc == 0, "posix_fadvise(DONTNEED) of {} failed: errno {rc}", f.path.display());
        }
        Ok(())
    }

    /// Writes `files_count` files of `file_bytes` each, spread round-robin over
    /// `folders_count` folders (`d00/f00000.dat`, `d01/f00001.dat`, ...), under a new temp dir
    /// in `parent`: the small-file shard (2,000 x 16 KiB in 20 folders).
    pub fn generate_tree(
        parent: &Path,
        files_count: u32,
        file_bytes: u64,
        folders_count: u32,
        seed: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(files_count > 0 && folders_count > 0, "a shard needs at least one file and one folder");
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-tree-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot make a temp dir in {}", parent.display()))?;
        let root = dir.path().join("segments");
        for folder in 0..folders_count {
            std::fs::create_dir_all(root.join(format!("d{folder:02}")))?;
        }
        let mut rng = XorShift::new(seed);
        let mut block = vec![0u8; usize::try_from(file_bytes.min(BLOCK_BYTES as u64)).unwrap_or(BLOCK_BYTES)];
        let mut files = Vec::new();
        for index in 0..files_count {
            let rel = format!("d{:02}/f{index:05}.dat", index % folders_count);
            let path = root.join(&rel);
            let mut file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut left = file_bytes;
            while left > 0 {
                let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
                let part = block.get_mut(..n).context("block length")?;
                rng.fill(part);
                file.write_all(part).with_context(|| format!("cannot write {}", path.display()))?;
                left -= n as u64;
            }
            files.push(ShardFile { rel, path, size_bytes: file_bytes });
        }
        let size_bytes = file_bytes * u64::from(files_count);
        Ok(Self { _dir: dir, root, files, size_bytes })
    }
}

/// xorshift64*: cheap, and good enough to defeat any compression on the way.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next().to_le_bytes();
        for (b, v) in tail.iter_mut().zip(last) {
            *b = v;
        }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_add_up_and_files_differ() {
        let parent = tempfile::tempdir().unwrap();
        let shard = Shard::generate(parent.path(), (3 << 20) + 17, 3, 1).unwrap();
        assert_eq!(shard.files.len(), 3);
        let total: u64 = shard.files.iter().map(|f| std::fs::metadata(&f.path).unwrap().len()).sum();
        assert_eq!(total, (3 << 20) + 17);
        assert_eq!(shard.size_bytes, total);
        let a = std::fs::read(&shard.files[0].path).unwrap();
        let b = std::fs::read(&shard.files[1].path).unwrap();
        assert_ne!(a, b);
        // No long runs of one byte: the data is not trivially compressible.
        assert!(a.windows(16).all(|w| w.iter().any(|&x| x != w[0])));
        let root = shard.root.clone();
        drop(shard);
        assert!(!root.exists());
    }

    #[test]
    fn a_tree_spreads_equal_files_over_folders() {
        let parent = tempfile::tempdir().unwrap();
        let shard = Shard::generate_tree(parent.path(), 7, 5000, 3, 2).unwrap();
        assert_eq!(shard.size_bytes, 35_000);
        assert_eq!(std::fs::read_dir(&shard.root).unwrap().count(), 3);
        for file in &shard.files {
            assert_eq!(std::fs::metadata(shard.root.join(&file.rel)).unwrap().len(), 5000);
        }
        assert_eq!(shard.files[4].rel, "d01/f00004.dat");
    }
}
