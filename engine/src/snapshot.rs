//! The source's snapshot of a shard's files (DESIGN section 2).
//!
//! What it does: lists the files to ship under a `segments_root` (all of it, or the ones a
//! caller names), refuses anything that is not a regular file reached without symlinks, and
//! hard-links each file into `<segments_root>/.ferry-snapshot/<migration_id>/` so compaction
//! cannot delete it mid-copy. It records each file's size and mtime so a change during the
//! copy is caught ([`SnapshotFile::check_unchanged`]).
//!
//! What it does not: copy bytes. A hard link pins the inode, not its contents: ferry ships
//! immutable files, and a file changed in place is detected (size, mtime, CRC32C), not
//! tolerated. A snapshot on another filesystem than the files cannot be made (no hard links
//! across filesystems): that is a clear error, not a silent copy.
//!
//! Invariants: a snapshot's links live under `.ferry-snapshot/<migration_id>/` and nowhere
//! else; only regular files reached without a symlink are linked.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_wire::path::{PathError, RelPath};
use ferry_wire::MigrationId;

/// Name of the snapshot folder at the top of a segments root.
pub const SNAPSHOT_DIR_NAME: &str = ".ferry-snapshot";

/// Why a snapshot could not be made. The caller named bad files, or the filesystem failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("segments root {0}: not a folder")]
    RootNotDir(PathBuf),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0} is a symlink: ferry ships regular files only; point segments_root at the real files")]
    Symlink(PathBuf),
    #[error("{0} is not a regular file (a folder, fifo, socket or device): ferry ships regular files only")]
    NotRegular(PathBuf),
    #[error("{0} is not valid UTF-8: ferry needs UTF-8 paths to name files on the target")]
    NotUtf8(PathBuf),
    #[error("cannot hard-link {from} into the snapshot {to}: they are on different filesystems; keep .ferry-snapshot on the same filesystem as the segments")]
    CrossFilesystem { from: PathBuf, to: PathBuf },
    #[error("snapshot {0} already holds another version of this file: forget the migration or use a new migration id")]
    Conflict(PathBuf),
    /// The cause is in the message, not chained as a source: a chain printed with `{:#}`
    /// would show it twice, and failure reasons are this message alone.
    #[error("{what} {path}: {cause}")]
    Io { what: &'static str, path: PathBuf, cause: io::Error },
    #[error("source file {path} changed during the copy ({what}): ferry ships immutable files only")]
    Changed { path: RelPath, what: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |cause| SnapshotError::Io { what, path: path.to_path_buf(), cause }
}

/// One pinned file.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: RelPath,
    /// The hard link in the snapshot folder: what the sender reads.
    pub snapshot_path: PathBuf,
    pub size_bytes: u64,
    pub mtime_ns: i128,
}

impl SnapshotFile {
    /// Fails when the file's size or mtime differ from when it was pinned.
    pub fn check_unchanged(&self) -> Result<(), SnapshotError> {
        let meta = std::fs::metadata(&self.snapshot_path).map_err(io_err("cannot stat", &self.snapshot_path))?;
        let mtime_ns = mtime_ns(&meta);
        if meta.len() != self.size_bytes {
            let what = format!("size {} -> {} bytes", self.size_bytes, meta.len());
            return Err(SnapshotError::Changed { path: self.path.clone(), what });
        }
        if mtime_ns != self.mtime_ns {
            let what = format!("mtime {} -> {} ns", self.mtime_ns, mtime_ns);
            return Err(SnapshotError::Changed { path: self.path.clone(), what });
        }
        Ok(())
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// The pinned files of one migration.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub files: Vec<SnapshotFile>,
}

impl Snapshot {
    /// The snapshot folder of a migration.
    pub fn dir_of(segments_root: &Path, migration_id: &MigrationId) -> PathBuf {
        segments_root.join(SNAPSHOT_DIR_NAME).join(migration_id.as_str())
    }

    /// Lists (all files under the root when `files` is `None`), checks and pins the files.
    /// Repeating it for the same migration reuses links that point at the same files.
    pub fn create(
        segments_root: &Path,
        migration_id: &MigrationId,
        files: Option<&[RelPath]>,
    ) -> Result<Self, SnapshotError> {
        check_root(segments_root)?;
        let paths = match files {
            Some(files) => {
                for path in files {
                    check_named(segments_root, path)?;
                }
                let mut files = files.to_vec();
                files.sort();
                files.dedup();
                files
            }
            None => Self::list(segments_root)?,
        };
        let dir = Self::dir_of(segments_root, migration_id);
        let mut pinned = Vec::with_capacity(paths.len());
        for path in paths {
            let source = segments_root.join(path.as_str());
            let link = dir.join(path.as_str());
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("cannot create snapshot folder", parent))?;
            }
            let source_meta = std::fs::symlink_metadata(&source).map_err(io_err("cannot stat", &source))?;
            match std::fs::hard_link(&source, &link) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let link_meta = std::fs::symlink_metadata(&link).map_err(io_err("cannot stat", &link))?;
                    if (link_meta.dev(), link_meta.ino()) != (source_meta.dev(), source_meta.ino()) {
                        return Err(SnapshotError::Conflict(link));
                    }
                }
                Err(e) if e.raw_os_error() == Some(18) => {
                    return Err(SnapshotError::CrossFilesystem { from: source, to: link });
                }
                Err(cause) => return Err(SnapshotError::Io { what: "cannot hard-link", path: link, cause }),
            }
            pinned.push(SnapshotFile {
                path,
                snapshot_path: link,
                size_bytes: source_meta.len(),
                mtime_ns: mtime_ns(&source_meta),
            });
        }
        Ok(Self { dir, files: pinned })
    }

    /// Every regular file under `segments_root` (its own snapshot folder left out), sorted:
    /// what [`Snapshot::create`] pins when the caller names no files. Nothing is pinned.
    pub fn list(segments_root: &Path) -> Result<Vec<RelPath>, SnapshotError> {
        check_root(segments_root)?;
        let mut found = Vec::new();
        walk(segments_root, segments_root, &mut found)?;
        found.sort();
        Ok(found)
    }

    /// Removes the snapshot's links (the source files themselves are untouched), and the
    /// `.ferry-snapshot` folder once no snapshot is left in it.
    pub fn remove(segments_root: &Path, migration_id: &MigrationId) -> Result<(), SnapshotError> {
        let dir = Self::dir_of(segments_root, migration_id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(SnapshotError::Io { what: "cannot remove", path: dir, cause: e });
            }
            _ => {}
        }
        // Another migration's snapshot keeps it (ENOTEMPTY), and a missing one is fine.
        let _ = std::fs::remove_dir(segments_root.join(SNAPSHOT_DIR_NAME));
        Ok(())
    }

    /// The snapshots left under `segments_root`: each migration id with its pinned files'
    /// count and bytes (hard links: the bytes are shared with the source files while those
    /// exist, and held by the links alone once compaction deleted them).
    pub fn list_pinned(segments_root: &Path) -> Result<Vec<Pinned>, SnapshotError> {
        check_root(segments_root)?;
        let base = segments_root.join(SNAPSHOT_DIR_NAME);
        let entries = match std::fs::read_dir(&base) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(cause) => return Err(SnapshotError::Io { what: "cannot list", path: base, cause }),
        };
        let mut pinned = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", &base))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| MigrationId::new(n).ok()) else { continue };
            let dir = entry.path();
            let (mut files_count, mut bytes) = (0u64, 0u64);
            count_files(&dir, &mut files_count, &mut bytes)?;
            pinned.push(Pinned { migration_id: id, dir, files_count, bytes });
        }
        pinned.sort_by(|a, b| a.migration_id.as_str().cmp(b.migration_id.as_str()));
        Ok(pinned)
    }

    pub fn bytes_total(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// A snapshot left under a segments root ([`Snapshot::list_pinned`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pinned {
    pub migration_id: MigrationId,
    pub dir: PathBuf,
    pub files_count: u64,
    pub bytes: u64,
}

fn count_files(dir: &Path, files_count: &mut u64, bytes: &mut u64) -> Result<(), SnapshotError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let meta = std::fs::symlink_metadata(entry.path()).map_err(io_err("cannot stat", &entry.path()))?;
        if meta.is_dir() {
            count_files(&entry.path(), files_count, bytes)?;
        } else {
            *files_count += 1;
            *bytes += meta.len();
        }
    }
    Ok(())
}

fn check_root(segments_root: &Path) -> Result<(), SnapshotError> {
    let root_meta = std::fs::metadata(segments_root).map_err(io_err("cannot open segments root", segments_root))?;
    if !root_meta.is_dir() {
        return Err(SnapshotError::RootNotDir(segments_root.to_path_buf()));
    }
    Ok(())
}

/// Checks a caller-named file: every folder on the way is a real folder, the file is regular.
fn check_named(root: &Path, path: &RelPath) -> Result<(), SnapshotError> {
    let mut at = root.to_path_buf();
    let components: Vec<&str> = path.components().collect();
    for (i, component) in components.iter().enumerate() {
        at.push(component);
        let meta = std::fs::symlink_metadata(&at).map_err(io_err("cannot stat", &at))?;
        if meta.file_type().is_symlink() {
            return Err(SnapshotError::Symlink(at));
        }
        let last = i + 1 == components.len();
        if last && !meta.file_type().is_file() {
            return Err(SnapshotError::NotRegular(at));
        }
        if !last && !meta.is_dir() {
            return Err(SnapshotError::NotRegular(at));
        }
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<RelPath>) -> Result<(), SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("cannot list", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let path = entry.path();
        if dir == root && entry.file_name() == SNAPSHOT_DIR_NAME {
            continue;
        }
        let kind = entry.file_type().map_err(io_err("cannot stat", &path))?;
        if kind.is_symlink() {
            return Err(SnapshotError::Symlink(path));
        } else if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel = rel.to_str().ok_or_else(|| SnapshotError::NotUtf8(path.clone()))?;
            out.push(RelPath::new(rel)?);
        } else {
            return Err(SnapshotError::NotRegular(path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id() -> MigrationId {
        MigrationId::new("m1").unwrap()
    }

    #[test]
    fn pins_every_regular_file_and_skips_its_own_folder() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("a/b")).unwrap();
        std::fs::write(root.path().join("a/b/x"), b"xx").unwrap();
        std::fs::write(root.path().join("y"), b"y").unwrap();
        let snap = Snapshot::create(root.path(), &id(), None).unwrap();
        let names: Vec<&str> = snap.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, vec!["a/b/x", "y"]);
        assert_eq!(std::fs::read(&snap.files[0].snapshot_path).unwrap(), b"xx");
        // Again: reuses the links; the snapshot folder itself is not listed.
        let again = Snapshot::create(root.path(), &id(), None).unwrap();
        assert_eq!(again.files.len(), 2);
        snap.files[1].check_unchanged().unwrap();
        std::fs::write(root.path().join("y"), b"changed").unwrap();
        assert!(matches!(snap.files[1].check_unchanged(), Err(SnapshotError::Changed { .. })));
    }

    #[test]
    fn leftovers_are_listed_and_the_last_removal_takes_the_snapshot_folder() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("y"), b"yyy").unwrap();
        assert_eq!(Snapshot::list_pinned(root.path()).unwrap(), Vec::new());
        let other = MigrationId::new("m2").unwrap();
        Snapshot::create(root.path(), &id(), None).unwrap();
        Snapshot::create(root.path(), &other, None).unwrap();
        let pinned = Snapshot::list_pinned(root.path()).unwrap();
        assert_eq!(
            pinned.iter().map(|p| (p.migration_id.as_str(), p.files_count, p.bytes)).collect::<Vec<_>>(),
            [("m1", 1, 3), ("m2", 1, 3)]
        );
        Snapshot::remove(root.path(), &id()).unwrap();
        assert!(root.path().join(SNAPSHOT_DIR_NAME).exists(), "m2's snapshot is still there");
        Snapshot::remove(root.path(), &other).unwrap();
        assert!(!root.path().join(SNAPSHOT_DIR_NAME).exists(), "an empty .ferry-snapshot is left");
        assert_eq!(std::fs::read(root.path().join("y")).unwrap(), b"yyy", "a source file was touched");
        Snapshot::remove(root.path(), &other).unwrap();
    }

    #[test]
    fn refuses_symlinks_and_special_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("real"), b"r").unwrap();
        std::os::unix::fs::symlink(root.path().join("real"), root.path().join("link")).unwrap();
        assert!(matches!(Snapshot::create(root.path(), &id(), None), Err(SnapshotError::Symlink(_))));
        let named = [RelPath::new("link").unwrap()];
        assert!(matches!(Snapshot::create(root.path(), &id(), Some(&named)), Err(SnapshotError::Symlink(_))));
        std::fs::remove_file(root.path().join("link")).unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        let named = [RelPath::new("d").unwrap()];
        assert!(matches!(Snapshot::create(root.path(), &id(), Some(&named)), Err(SnapshotError::NotRegular(_))));
    }

    #[test]
    fn lists_regular_files_without_pinning_them() {
        let root = tempfile::tempdir().unwrap();
        assert!(Snapshot::list(root.path()).unwrap().is_empty());
        std::fs::create_dir_all(root.path().join("empty/folders")).unwrap();
        assert!(Snapshot::list(root.path()).unwrap().is_empty(), "folders are not files");
        std::fs::write(root.path().join("empty/x"), b"x").unwrap();
        let listed = Snapshot::list(root.path()).unwrap();
        assert_eq!(listed.iter().map(RelPath::as_str).collect::<Vec<_>>(), ["empty/x"]);
        assert!(!root.path().join(SNAPSHOT_DIR_NAME).exists(), "listing pins nothing");
    }

    #[test]
    fn an_io_error_names_its_cause_once() {
        let missing = tempfile::tempdir().unwrap().path().join("missing");
        let err = anyhow::Error::from(Snapshot::list(&missing).unwrap_err());
        let text = format!("{err:#}");
        assert!(text.starts_with("cannot open segments root"), "{text}");
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    }
}
