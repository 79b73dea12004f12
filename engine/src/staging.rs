//! The target's staging folder (DESIGN section 3), written only through the storage seam.
//!
//! ```text
//! <data dir>/migrations/<migration_id>/
//!   segments/<relative path>   each file verified and fsynced, renamed in from .ferry/tmp
//!   MANIFEST.json              written last, by temp file, fsync, rename, folder fsync
//!   .ferry/tmp/<index>.part    files being received
//! ```
//!
//! What it does: prepares the folders, finalises a received file (fsync, re-read and check
//! its CRC32C against the source's, rename into `segments/`), makes the whole tree's names
//! durable, and writes and reads `MANIFEST.json`.
//!
//! What it does not: decide when (the transfer code does) or retry a failed write or sync: any
//! failure is returned and fails the transfer.
//!
//! Invariant: `MANIFEST.json` is written only after every file it lists is durable under its
//! final name, so a manifest on disk never claims bytes that are missing or wrong.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_wire::manifest::{Integrity, ManifestError, StagingManifest, MANIFEST_FILE_NAME};
use ferry_wire::path::RelPath;
use ferry_wire::{MigrationId, NodeId};

use crate::storage::{Storage, StorageFile};

/// A staging write or check failed. Both fail the transfer.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("staging: cannot {what} {path}: {cause}")]
    Io { what: &'static str, path: PathBuf, cause: io::Error },
    #[error("staged file {path} reads back with CRC32C {found:#010x}, the source sent {expected:#010x}: the target's disk or memory corrupted it")]
    Checksum { path: PathBuf, expected: u32, found: u32 },
    #[error("staged file {path} has {found} bytes, expected {expected}")]
    Size { path: PathBuf, expected: u64, found: u64 },
    #[error("{path}: {cause}")]
    Manifest { path: PathBuf, cause: ManifestError },
}

/// Wraps an I/O error with what was being done and to which path.
pub(crate) fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StagingError + 'a {
    move |source| StagingError::Io { what, path: path.to_path_buf(), cause: source }
}

/// Paths of one migration's staging.
#[derive(Debug, Clone)]
pub struct StagingLayout {
    pub data_dir: PathBuf,
    pub root: PathBuf,
}

impl StagingLayout {
    pub fn new(data_dir: &Path, migration_id: &MigrationId) -> Self {
        Self { data_dir: data_dir.to_path_buf(), root: data_dir.join("migrations").join(migration_id.as_str()) }
    }
    pub fn migrations_dir(&self) -> PathBuf {
        self.data_dir.join("migrations")
    }
    pub fn segments_dir(&self) -> PathBuf {
        self.root.join("segments")
    }
    pub fn ferry_dir(&self) -> PathBuf {
        self.root.join(".ferry")
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.ferry_dir().join("tmp")
    }
    pub fn part_path(&self, file_index: u32) -> PathBuf {
        self.tmp_dir().join(format!("{file_index}.part"))
    }
    pub fn segment_path(&self, path: &RelPath) -> PathBuf {
        self.segments_dir().join(path.as_str())
    }
    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(MANIFEST_FILE_NAME)
    }
    fn manifest_tmp_path(&self) -> PathBuf {
        self.ferry_dir().join("MANIFEST.json.tmp")
    }
    /// A second name of the manifest a prepared commit will replace (see
    /// [`prepare_manifest_commit`]).
    fn manifest_held_path(&self) -> PathBuf {
        self.ferry_dir().join("MANIFEST.json.held")
    }
}

/// Reads `MANIFEST.json` when there is one.
pub fn read_manifest(storage: &dyn Storage, layout: &StagingLayout) -> Result<Option<StagingManifest>, StagingError> {
    let path = layout.manifest_path();
    if !storage.exists(&path) {
        return Ok(None);
    }
    let bytes = storage.read_all(&path).map_err(io_err("read", &path))?;
    let (manifest, integrity) = StagingManifest::decode_checked(&bytes)
        .map_err(|source| StagingError::Manifest { path: path.clone(), cause: source })?;
    if integrity == Integrity::Unchecked {
        tracing::warn!(
            "{} was written by an earlier ferry and has no checksum of its own: it is trusted as read; \
             the next manifest written for this staging carries one",
            path.display()
        );
    }
    Ok(Some(manifest))
}

/// Writes `MANIFEST.json` durably (temp file, fsync, rename, folder fsync).
pub fn write_manifest(
    storage: &dyn Storage,
    layout: &StagingLayout,
    manifest: &StagingManifest,
) -> Result<(), StagingError> {
    let path = layout.manifest_path();
    storage.write_atomic(&layout.manifest_tmp_path(), &path, &manifest.encode()).map_err(io_err("write", &path))
}

/// Room a prepared MANIFEST commit leaves for the manifest to grow (the staged WAL segments and
/// `final_lsn` a fence adds: about 200 bytes per segment).
const PREPARED_SLACK_BYTES: usize = 16 << 10;
/// Prepared temp files are a whole number of these.
const PREPARED_BLOCK_BYTES: usize = 4096;

/// Prepares the next MANIFEST commit off the pause's path: the temp file is written at the size
/// `manifest` may grow to (spaces) and made durable, so [`write_manifest_prepared`] later
/// overwrites blocks already allocated. Its flush then has no allocation or size change to
/// journal: one data flush instead of a journal commit, before the rename's.
pub fn prepare_manifest_commit(
    storage: &dyn Storage,
    layout: &StagingLayout,
    manifest: &StagingManifest,
) -> Result<(), StagingError> {
    let tmp = layout.manifest_tmp_path();
    let len = (manifest.encode().len() + PREPARED_SLACK_BYTES).div_ceil(PREPARED_BLOCK_BYTES) * PREPARED_BLOCK_BYTES;
    let file = storage.open_rw(&tmp).map_err(io_err("create", &tmp))?;
    file.set_len(0).map_err(io_err("truncate", &tmp))?;
    file.write_at(&vec![b' '; len], 0).map_err(io_err("write", &tmp))?;
    file.sync_data().map_err(io_err("fsync", &tmp))?;
    // A second name for the manifest the commit will replace: its rename then drops a name,
    // not the file's last one, so the filesystem frees nothing on the pause's path (on this
    // project's ext4, mounted with `discard`, a rename that dropped the last link took about
    // 240 us at p50 against 45). The name needs no flush: only the in-memory link count
    // matters to the rename. It goes with the next prepare, the release, or the staging.
    release_held_manifest(storage, layout)?;
    let path = layout.manifest_path();
    if storage.exists(&path) {
        let held = layout.manifest_held_path();
        storage.hard_link(&path, &held).map_err(io_err("link", &held))?;
    }
    Ok(())
}

/// Removes the second name [`prepare_manifest_commit`] gave a manifest (off the pause's path:
/// this may free the file).
pub fn release_held_manifest(storage: &dyn Storage, layout: &StagingLayout) -> Result<(), StagingError> {
    let held = layout.manifest_held_path();
    if storage.exists(&held) {
        storage.remove_file(&held).map_err(io_err("remove", &held))?;
    }
    Ok(())
}

/// [`write_manifest`] into the temp file [`prepare_manifest_commit`] left, padded to its size
/// with spaces (JSON allows trailing white space): the fence's commit. Without a prepared file,
/// or when the manifest outgrew it, a plain [`write_manifest`].
pub fn write_manifest_prepared(
    storage: &dyn Storage,
    layout: &StagingLayout,
    manifest: &StagingManifest,
) -> Result<(), StagingError> {
    let (tmp, path) = (layout.manifest_tmp_path(), layout.manifest_path());
    if storage.exists(&tmp) {
        let file = storage.open_rw(&tmp).map_err(io_err("open", &tmp))?;
        let prepared = usize::try_from(file.len_bytes().map_err(io_err("inspect", &tmp))?).unwrap_or(0);
        if prepared > manifest.encode().len() {
            // Spaces, then the manifest's closing newline; its checksum covers them.
            let bytes = manifest.encode_padded(prepared);
            file.write_at(&bytes, 0).map_err(io_err("write", &tmp))?;
            file.sync_data().map_err(io_err("fsync", &tmp))?;
            drop(file);
            storage.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            return storage.sync_dir(&layout.root).map_err(io_err("sync folder", &layout.root));
        }
    }
    write_manifest(storage, layout, manifest)
}

/// Starts a fresh staging: removes what an earlier, unfinished attempt left and creates the
/// folders. Folder names are made durable now, so later syncs only cover new entries.
pub fn prepare_fresh(storage: &dyn Storage, layout: &StagingLayout) -> Result<(), StagingError> {
    if storage.exists(&layout.root) {
        storage.remove_dir_all(&layout.root).map_err(io_err("remove stale staging", &layout.root))?;
    }
    for dir in [layout.tmp_dir(), layout.segments_dir()] {
        storage.create_dir_all(&dir).map_err(io_err("create", &dir))?;
    }
    for dir in [layout.data_dir.clone(), layout.migrations_dir(), layout.root.clone(), layout.ferry_dir()] {
        storage.sync_dir(&dir).map_err(io_err("sync folder", &dir))?;
    }
    Ok(())
}

/// File in `.ferry/` naming the node that started a staging: written when the staging is
/// created, so a restarted target knows whose migration it is before `MANIFEST.json` exists
/// (which records it from the base's end on). Only that node may resume, join, release or
/// abort it.
const SOURCE_NODE_FILE: &str = "source_node";

/// Records `node` as the staging's source, durably (temp file, fsync, rename, folder fsync).
pub fn write_source_node(storage: &dyn Storage, layout: &StagingLayout, node: &str) -> Result<(), StagingError> {
    let path = layout.ferry_dir().join(SOURCE_NODE_FILE);
    let tmp = layout.ferry_dir().join(format!("{SOURCE_NODE_FILE}.tmp"));
    storage.write_atomic(&tmp, &path, node.as_bytes()).map_err(io_err("write", &path))
}

/// The node [`write_source_node`] recorded: `None` when there is no such file; an error when it
/// cannot be read or does not hold a node id (then nobody's claim can be checked: the caller
/// refuses rather than let any node act).
pub fn read_source_node(storage: &dyn Storage, layout: &StagingLayout) -> Result<Option<String>, StagingError> {
    let path = layout.ferry_dir().join(SOURCE_NODE_FILE);
    if !storage.exists(&path) {
        return Ok(None);
    }
    let file = storage.open_read(&path).map_err(io_err("open", &path))?;
    let len_bytes = file.len_bytes().map_err(io_err("stat", &path))?;
    let mut bytes = vec![0u8; usize::try_from(len_bytes.min(NodeId::LEN_MAX as u64 + 1)).unwrap_or(0)];
    crate::storage::read_exact_at(&*file, &mut bytes, 0).map_err(io_err("read", &path))?;
    let node = String::from_utf8(bytes).ok().and_then(|text| NodeId::new(text).ok());
    match node {
        Some(node) if len_bytes <= NodeId::LEN_MAX as u64 => Ok(Some(node.to_string())),
        _ => Err(StagingError::Io {
            what: "read a node id from",
            path: path.clone(),
            cause: io::Error::new(io::ErrorKind::InvalidData, "the file does not hold a node id"),
        }),
    }
}

/// Opens (creating) the part file of a file being received.
pub fn open_part(
    storage: &dyn Storage,
    layout: &StagingLayout,
    file_index: u32,
) -> Result<Arc<dyn StorageFile>, StagingError> {
    let path = layout.part_path(file_index);
    storage.open_rw(&path).map_err(io_err("create", &path))
}

/// Finalises a received file: fsync, re-read and check size and CRC32C, rename into
/// `segments/`. The new name becomes durable in [`sync_segment_tree`].
pub fn finalize_file(
    storage: &dyn Storage,
    layout: &StagingLayout,
    file_index: u32,
    path: &RelPath,
    size_bytes: u64,
    crc32c: u32,
) -> Result<(), StagingError> {
    let part_path = layout.part_path(file_index);
    let part = storage.open_rw(&part_path).map_err(io_err("open", &part_path))?;
    part.set_len(size_bytes).map_err(io_err("set the length of", &part_path))?;
    part.sync_data().map_err(io_err("fsync", &part_path))?;
    let found = part.len_bytes().map_err(io_err("stat", &part_path))?;
    if found != size_bytes {
        return Err(StagingError::Size { path: part_path, expected: size_bytes, found });
    }
    let (read_bytes, crc) = crate::storage::crc32c_of(&*part).map_err(io_err("re-read", &part_path))?;
    if read_bytes != size_bytes {
        return Err(StagingError::Size { path: part_path, expected: size_bytes, found: read_bytes });
    }
    if crc != crc32c {
        return Err(StagingError::Checksum { path: part_path, expected: crc32c, found: crc });
    }
    drop(part);
    let final_path = layout.segment_path(path);
    if let Some(parent) = final_path.parent() {
        storage.create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    storage.rename(&part_path, &final_path).map_err(io_err("rename into", &final_path))
}

/// Makes every name under `segments/` durable: each folder holding a staged file or folder is
/// synced, deepest first, then `segments/` itself.
pub fn sync_segment_tree(storage: &dyn Storage, layout: &StagingLayout, paths: &[RelPath]) -> Result<(), StagingError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for path in paths {
        for parent in path.parents() {
            dirs.push(layout.segments_dir().join(parent));
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    dirs.push(layout.segments_dir());
    for dir in dirs {
        storage.sync_dir(&dir).map_err(io_err("sync folder", &dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ferry_wire::manifest::{StagedWalSegment, StagingState, MANIFEST_FORMAT_VERSION};
    use ferry_wire::{Lsn, MigrationId, VShardId};

    use super::*;
    use crate::storage::FakeStorage;

    /// An I/O error's cause is printed once, also in an error chain printed whole (`{:#}`,
    /// as the CLI does): it is in the message, not chained again as a source.
    #[test]
    fn an_io_cause_is_printed_once_in_a_whole_chain() {
        let e = StagingError::Io {
            what: "fsync",
            path: PathBuf::from("/x/part-0"),
            cause: io::Error::from_raw_os_error(28),
        };
        let whole = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(whole.matches("No space left on device").count(), 1, "{whole}");
        assert!(whole.contains("cannot fsync /x/part-0"), "{whole}");
    }

    fn copying() -> StagingManifest {
        StagingManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            migration_id: MigrationId::new("m-1").unwrap(),
            vshard_id: VShardId(7),
            base_lsn: Lsn(10),
            final_lsn: None,
            state: StagingState::Copying,
            base_complete: true,
            db_meta: serde_json::Value::Null,
            segments: Vec::new(),
            wal_segments: Vec::new(),
            source_node: None,
            started_at_unix_ms: None,
            wal_follows: None,
        }
    }

    fn fenced(wal_segments_count: u64) -> StagingManifest {
        let wal_segments = (0..wal_segments_count)
            .map(|i| StagedWalSegment {
                name: format!("wal-{i:020}.seg"),
                size_bytes: 64 << 20,
                crc32c: 7,
                layout: "A".into(),
                first_lsn: Lsn(i * 100 + 11),
                last_lsn: Lsn(i * 100 + 110),
                key_id: None,
            })
            .collect();
        StagingManifest { state: StagingState::Fenced, final_lsn: Some(Lsn(5_000)), wal_segments, ..copying() }
    }

    /// A staging with its `copying` MANIFEST durable and the next commit prepared.
    fn prepared() -> (FakeStorage, StagingLayout) {
        let storage = FakeStorage::new();
        let layout = StagingLayout::new(Path::new("/data"), &MigrationId::new("m-1").unwrap());
        storage.create_dir_all(Path::new("/data")).unwrap();
        storage.sync_dir(Path::new("/")).unwrap();
        prepare_fresh(&storage, &layout).unwrap();
        write_manifest(&storage, &layout, &copying()).unwrap();
        prepare_manifest_commit(&storage, &layout, &copying()).unwrap();
        (storage, layout)
    }

    #[test]
    fn a_prepared_commit_keeps_a_second_name_of_the_manifest_it_replaces_until_released() {
        let (storage, layout) = prepared();
        let held = layout.manifest_held_path();
        assert_eq!(storage.read_all(&held).unwrap(), copying().encode(), "the manifest before the fence");
        write_manifest_prepared(&storage, &layout, &fenced(1)).unwrap();
        assert_eq!(read_manifest(&storage, &layout).unwrap(), Some(fenced(1)));
        assert_eq!(storage.read_all(&held).unwrap(), copying().encode(), "the rename dropped a name, not the file");
        // The next prepare replaces it; a release removes it.
        prepare_manifest_commit(&storage, &layout, &fenced(1)).unwrap();
        assert_eq!(StagingManifest::decode(&storage.read_all(&held).unwrap()).unwrap(), fenced(1));
        release_held_manifest(&storage, &layout).unwrap();
        assert!(!storage.exists(&held));
        release_held_manifest(&storage, &layout).unwrap();
    }

    #[test]
    fn a_prepared_commit_writes_the_manifest_padded_and_consumes_the_temp_file() {
        let (storage, layout) = prepared();
        let prepared_len = storage.open_read(&layout.manifest_tmp_path()).unwrap().len_bytes().unwrap();
        assert_eq!(prepared_len % PREPARED_BLOCK_BYTES as u64, 0);
        write_manifest_prepared(&storage, &layout, &fenced(3)).unwrap();
        assert_eq!(read_manifest(&storage, &layout).unwrap(), Some(fenced(3)));
        let bytes = storage.read_all(&layout.manifest_path()).unwrap();
        assert_eq!(bytes.len() as u64, prepared_len, "the prepared blocks are overwritten, not resized");
        assert!(bytes.ends_with(b" \n"), "padded with spaces and closed with a newline");
        assert!(!storage.exists(&layout.manifest_tmp_path()));
        // The next commit finds nothing prepared and writes the plain way.
        write_manifest_prepared(&storage, &layout, &copying()).unwrap();
        let plain = storage.read_all(&layout.manifest_path()).unwrap();
        assert_eq!(plain, copying().encode());
    }

    #[test]
    fn a_damaged_manifest_at_rest_is_refused_and_an_earlier_ferrys_is_read() {
        let (storage, layout) = prepared();
        let path = layout.manifest_path();
        let good = storage.read_all(&path).unwrap();
        // One bit of base_lsn's digit flipped on disk ("10" -> "11").
        let at = good.windows(13).position(|w| w == b"\"base_lsn\": 1").unwrap() + 13;
        let file = storage.open_rw(&path).unwrap();
        file.write_at(&[good[at] ^ 1], at as u64).unwrap();
        let e = read_manifest(&storage, &layout).unwrap_err();
        assert!(matches!(e, StagingError::Manifest { cause: ManifestError::Damaged(_), .. }), "{e}");
        assert!(e.to_string().contains("MANIFEST.json is damaged") && e.to_string().contains("/data"), "{e}");
        // Written by an earlier ferry: the same JSON without the checksum line.
        let legacy = [b"{\n".as_slice(), &good[ferry_wire::manifest::CHECKSUM_PREFIX_LEN_BYTES..]].concat();
        storage.write_atomic(&layout.manifest_tmp_path(), &path, &legacy).unwrap();
        assert_eq!(read_manifest(&storage, &layout).unwrap(), Some(copying()));
    }

    #[test]
    fn a_manifest_that_outgrew_its_prepared_file_is_written_the_plain_way() {
        let (storage, layout) = prepared();
        let big = fenced(500);
        assert!(big.encode().len() > PREPARED_SLACK_BYTES * 2);
        write_manifest_prepared(&storage, &layout, &big).unwrap();
        assert_eq!(storage.read_all(&layout.manifest_path()).unwrap(), big.encode());
    }

    #[test]
    fn a_crash_at_any_sync_of_a_prepared_commit_leaves_the_old_manifest_or_the_new_one() {
        let (storage, layout) = prepared();
        let mut outcomes = Vec::new();
        for n in 1..=4 {
            let attempt = storage.fork();
            attempt.crash_at_sync(n);
            let result = write_manifest_prepared(&attempt, &layout, &fenced(2));
            let found = read_manifest(&attempt.recover(), &layout).unwrap();
            assert!(found == Some(copying()) || found == Some(fenced(2)), "crash at sync {n}: {found:?}");
            if result.is_ok() {
                assert_eq!(found, Some(fenced(2)), "a commit that returned is durable");
            }
            outcomes.push(found.map(|m| m.state));
        }
        assert!(outcomes.contains(&Some(StagingState::Copying)), "{outcomes:?}");
        assert!(outcomes.contains(&Some(StagingState::Fenced)), "{outcomes:?}");
    }
}
