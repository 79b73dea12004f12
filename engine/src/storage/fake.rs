//! A crash-testing filesystem in memory, for tests and the simulator only (built with
//! `cfg(test)` or the `testkit` feature, never in the production library).
//!
//! What it does: implements [`Storage`] with written and synced bytes kept apart, and crashes
//! at the N-th sync. [`FakeStorage::recover`] gives the filesystem a restarted node would
//! find; [`FakeStorage::recover_torn`] also keeps a prefix of the writes that were not synced
//! yet (a torn write, as a real disk may leave).
//!
//! What it does not: offer any primitive stronger than one file's or one folder's fsync.
//!
//! The durability model (like redb's crash tests): a file's bytes are durable when the file is
//! synced; a name (create, rename, remove) is durable when its parent folder is synced; a
//! folder's own name is durable when its parent is synced. After a crash, only durable names
//! pointing at durable bytes remain.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Storage, StorageFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    /// A folder, with its identity: a folder removed and made again under the same name is
    /// another folder, and none of the old one's durable entries come back with it.
    Dir(u64),
    File(u64),
}

/// The identity of `/`.
const ROOT_DIR_ID: u64 = 0;

fn is_dir(node: Option<&Node>) -> bool {
    matches!(node, Some(Node::Dir(_)))
}

fn is_root(path: &Path) -> bool {
    path.as_os_str().is_empty() || path == Path::new("/")
}

#[derive(Debug, Default, Clone)]
struct Inode {
    written: Vec<u8>,
    synced: Vec<u8>,
    /// What changed `written` since the last sync, in order: a torn recovery keeps a prefix.
    pending: Vec<Pending>,
}

/// One change to a file's bytes that no sync has covered yet.
#[derive(Debug, Clone)]
enum Pending {
    Write { offset: usize, bytes: Vec<u8> },
    SetLen(usize),
}

impl Pending {
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            Pending::Write { offset, bytes } => {
                let end = offset + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[*offset..end].copy_from_slice(bytes);
            }
            Pending::SetLen(len) => data.resize(*len, 0),
        }
    }
}

#[derive(Debug, Default)]
struct FakeState {
    live: BTreeMap<PathBuf, Node>,
    /// Durable names: each with its node and the identity of the folder it was synced in.
    durable: BTreeMap<PathBuf, (Node, u64)>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    syncs_count: u64,
    crash_at_sync: Option<u64>,
    crashed: bool,
}

/// An in-memory filesystem that keeps written and synced bytes apart and can crash at the
/// N-th sync (file or folder; counted from 1). After the crash every call fails, as a dead
/// process would; [`FakeStorage::recover`] gives the filesystem a restarted node would find.
#[derive(Debug, Clone, Default)]
pub struct FakeStorage {
    state: Arc<Mutex<FakeState>>,
}

fn crashed() -> io::Error {
    io::Error::other("fake storage crashed (simulated power loss)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file or folder", path.display()))
}

impl FakeStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Crashes at the `n`-th sync from now on (1 = the next one).
    pub fn crash_at_sync(&self, n: u64) {
        let mut state = self.lock();
        state.crash_at_sync = Some(state.syncs_count + n);
    }

    /// An independent copy of this filesystem as it is now (written and synced bytes alike),
    /// so a test can replay several crashes from the same starting point.
    pub fn fork(&self) -> FakeStorage {
        let state = self.lock();
        let copy = FakeState {
            live: state.live.clone(),
            durable: state.durable.clone(),
            inodes: state.inodes.clone(),
            next_inode: state.next_inode,
            syncs_count: 0,
            crash_at_sync: None,
            crashed: state.crashed,
        };
        FakeStorage { state: Arc::new(Mutex::new(copy)) }
    }

    /// How many syncs succeeded so far.
    pub fn syncs_count(&self) -> u64 {
        self.lock().syncs_count
    }

    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The filesystem after a power loss: durable names with their durable bytes.
    pub fn recover(&self) -> FakeStorage {
        self.recover_torn(&mut |_| 0)
    }

    /// The filesystem after a power loss that tore writes: durable names, each file with its
    /// durable bytes plus a prefix of the changes made since its last sync (the last one kept
    /// may be cut short). `pick(n)` draws a number in `0..n`: how many whole changes a file
    /// keeps, then how many bytes of the next one.
    pub fn recover_torn(&self, pick: &mut dyn FnMut(u64) -> u64) -> FakeStorage {
        let state = self.lock();
        let durable: BTreeMap<PathBuf, (Node, u64)> = state
            .durable
            .iter()
            .filter(|(path, _)| durably_reachable(&state.durable, path))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        let live: BTreeMap<PathBuf, Node> = durable.iter().map(|(p, (n, _))| (p.clone(), *n)).collect();
        let inodes = state
            .inodes
            .iter()
            .map(|(id, inode)| {
                let data = torn(inode, pick);
                (*id, Inode { written: data.clone(), synced: data, pending: Vec::new() })
            })
            .collect();
        let recovered = FakeState {
            durable,
            live,
            inodes,
            next_inode: state.next_inode,
            syncs_count: 0,
            crash_at_sync: None,
            crashed: false,
        };
        FakeStorage { state: Arc::new(Mutex::new(recovered)) }
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panic while holding the lock is a bug in a test; keep going with the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self) -> io::Result<MutexGuard<'_, FakeState>> {
        let state = self.lock();
        if state.crashed {
            return Err(crashed());
        }
        Ok(state)
    }

    fn count_sync(state: &mut FakeState) -> io::Result<()> {
        if state.crash_at_sync == Some(state.syncs_count + 1) {
            state.crashed = true;
            return Err(crashed());
        }
        state.syncs_count += 1;
        Ok(())
    }
}

/// Whether a durable name is found after a power loss: its folder's name is durable too, and
/// is still the folder the name was synced in.
fn durably_reachable(durable: &BTreeMap<PathBuf, (Node, u64)>, path: &Path) -> bool {
    let Some((_, parent_id)) = durable.get(path) else { return false };
    match path.parent() {
        None => true,
        Some(parent) if is_root(parent) => *parent_id == ROOT_DIR_ID,
        Some(parent) => match durable.get(parent) {
            Some((Node::Dir(id), _)) if id == parent_id => durably_reachable(durable, parent),
            _ => false,
        },
    }
}

/// A file's bytes after a torn power loss: its synced bytes, then a prefix of its pending
/// changes drawn by `pick`.
fn torn(inode: &Inode, pick: &mut dyn FnMut(u64) -> u64) -> Vec<u8> {
    let mut data = inode.synced.clone();
    if inode.pending.is_empty() {
        return data;
    }
    let kept = usize::try_from(pick(inode.pending.len() as u64 + 1)).unwrap_or(0).min(inode.pending.len());
    for change in &inode.pending[..kept] {
        change.apply(&mut data);
    }
    if let Some(Pending::Write { offset, bytes }) = inode.pending.get(kept) {
        let cut = usize::try_from(pick(bytes.len() as u64 + 1)).unwrap_or(0).min(bytes.len());
        Pending::Write { offset: *offset, bytes: bytes[..cut].to_vec() }.apply(&mut data);
    }
    data
}

impl FakeState {
    fn parent_is_dir(&self, path: &Path) -> bool {
        match path.parent() {
            None => true,
            Some(p) if p.as_os_str().is_empty() || p == Path::new("/") => true,
            Some(p) => is_dir(self.live.get(p)),
        }
    }
}

#[derive(Debug)]
struct FakeFile {
    storage: FakeStorage,
    inode: u64,
}

impl StorageFile for FakeFile {
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
        let mut state = self.storage.alive()?;
        let inode = state.inodes.entry(self.inode).or_default();
        let start = usize::try_from(offset_bytes).map_err(|_| io::Error::other("offset too large"))?;
        let end = start + buf.len();
        if inode.written.len() < end {
            inode.written.resize(end, 0);
        }
        inode.written[start..end].copy_from_slice(buf);
        inode.pending.push(Pending::Write { offset: start, bytes: buf.to_vec() });
        Ok(())
    }
    /// All slices under one lock, so a simulated crash never lands between two of them
    /// (a real `pwritev` can tear, but only inside bytes no sync has covered yet).
    fn write_all_vectored_at(&self, bufs: &[IoSlice<'_>], offset_bytes: u64) -> io::Result<()> {
        let mut state = self.storage.alive()?;
        let inode = state.inodes.entry(self.inode).or_default();
        let mut start = usize::try_from(offset_bytes).map_err(|_| io::Error::other("offset too large"))?;
        // One change, as one `pwritev`: a torn recovery may cut it anywhere.
        inode
            .pending
            .push(Pending::Write { offset: start, bytes: bufs.iter().flat_map(|b| b.iter().copied()).collect() });
        for buf in bufs {
            let end = start.checked_add(buf.len()).ok_or_else(|| io::Error::other("offset too large"))?;
            if inode.written.len() < end {
                inode.written.resize(end, 0);
            }
            inode.written[start..end].copy_from_slice(buf);
            start = end;
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize> {
        let state = self.storage.alive()?;
        let data = state.inodes.get(&self.inode).map(|i| i.written.as_slice()).unwrap_or_default();
        let start = usize::try_from(offset_bytes).unwrap_or(usize::MAX).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        let mut state = self.storage.alive()?;
        let len = usize::try_from(len_bytes).map_err(|_| io::Error::other("length too large"))?;
        let inode = state.inodes.entry(self.inode).or_default();
        inode.written.resize(len, 0);
        inode.pending.push(Pending::SetLen(len));
        Ok(())
    }
    fn len_bytes(&self) -> io::Result<u64> {
        let state = self.storage.alive()?;
        Ok(state.inodes.get(&self.inode).map_or(0, |i| i.written.len() as u64))
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.storage.alive()?;
        FakeStorage::count_sync(&mut state)?;
        let inode = state.inodes.entry(self.inode).or_default();
        inode.synced = inode.written.clone();
        inode.pending.clear();
        Ok(())
    }
}

impl Storage for FakeStorage {
    fn open_rw(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.alive()?;
        let inode = match state.live.get(path) {
            Some(Node::File(inode)) => *inode,
            Some(Node::Dir(_)) => return Err(io::Error::other(format!("{} is a folder", path.display()))),
            None => {
                if !state.parent_is_dir(path) {
                    return Err(not_found(path));
                }
                state.next_inode += 1;
                let inode = state.next_inode;
                state.inodes.insert(inode, Inode::default());
                state.live.insert(path.to_path_buf(), Node::File(inode));
                inode
            }
        };
        Ok(Arc::new(FakeFile { storage: self.clone(), inode }))
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let state = self.alive()?;
        match state.live.get(path) {
            Some(Node::File(inode)) => Ok(Arc::new(FakeFile { storage: self.clone(), inode: *inode })),
            _ => Err(not_found(path)),
        }
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        let mut ancestors: Vec<&Path> =
            path.ancestors().filter(|a| !a.as_os_str().is_empty() && *a != Path::new("/")).collect();
        ancestors.reverse();
        for dir in ancestors {
            match state.live.get(dir) {
                Some(Node::Dir(_)) => {}
                Some(Node::File(_)) => return Err(io::Error::other(format!("{} is a file", dir.display()))),
                None => {
                    state.next_inode += 1;
                    let id = state.next_inode;
                    state.live.insert(dir.to_path_buf(), Node::Dir(id));
                }
            }
        }
        Ok(())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        let node = *state.live.get(from).ok_or_else(|| not_found(from))?;
        if !state.parent_is_dir(to) {
            return Err(not_found(to));
        }
        if let Node::Dir(_) = node {
            return Err(io::Error::other("the fake renames files only"));
        }
        state.live.remove(from);
        state.live.insert(to.to_path_buf(), node);
        Ok(())
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        let node = *state.live.get(original).ok_or_else(|| not_found(original))?;
        if let Node::Dir(_) = node {
            return Err(io::Error::other("a folder cannot be hard-linked"));
        }
        if !state.parent_is_dir(link) {
            return Err(not_found(link));
        }
        if state.live.contains_key(link) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", link.display())));
        }
        state.live.insert(link.to_path_buf(), node);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        match state.live.get(path) {
            Some(Node::File(_)) => {
                state.live.remove(path);
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        if !state.live.contains_key(path) {
            return Err(not_found(path));
        }
        state.live.retain(|p, _| !p.starts_with(path));
        Ok(())
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.alive()?;
        let dir_id = match state.live.get(path) {
            _ if is_root(path) => ROOT_DIR_ID,
            Some(Node::Dir(id)) => *id,
            _ => return Err(not_found(path)),
        };
        FakeStorage::count_sync(&mut state)?;
        let child_of = |p: &Path| p.parent() == Some(path);
        let live_children: Vec<(PathBuf, (Node, u64))> =
            state.live.iter().filter(|(p, _)| child_of(p)).map(|(p, n)| (p.clone(), (*n, dir_id))).collect();
        state.durable.retain(|p, _| !child_of(p));
        state.durable.extend(live_children);
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        self.lock().live.contains_key(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.alive()?;
        if !is_dir(state.live.get(path)) {
            return Err(not_found(path));
        }
        Ok(state
            .live
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::super::{write_rest, DiskStorage};
    use super::*;
    use std::fs::OpenOptions;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn a_torn_crash_keeps_a_prefix_of_the_unsynced_writes() {
        let fs = FakeStorage::new();
        fs.create_dir_all(&p("/d")).unwrap();
        let f = fs.open_rw(&p("/d/a")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        fs.sync_dir(&p("/")).unwrap();
        f.write_at(b"aaaa", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"bb", 0).unwrap();
        f.write_at(b"cccc", 4).unwrap();
        // Keep the first change whole and 3 bytes of the second.
        let mut picks = vec![1, 3].into_iter();
        let torn = fs.recover_torn(&mut |_| picks.next().unwrap());
        assert_eq!(torn.read_all(&p("/d/a")).unwrap(), b"bbaaccc");
        // Keep nothing unsynced: the synced bytes only.
        assert_eq!(fs.recover().read_all(&p("/d/a")).unwrap(), b"aaaa");
    }

    #[test]
    fn a_folder_removed_and_made_again_does_not_bring_back_its_old_files() {
        let fs = FakeStorage::new();
        fs.create_dir_all(&p("/d/s")).unwrap();
        fs.open_rw(&p("/d/s/old")).unwrap().sync_data().unwrap();
        for dir in ["/d/s", "/d", "/"] {
            fs.sync_dir(&p(dir)).unwrap();
        }
        fs.remove_dir_all(&p("/d/s")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        fs.create_dir_all(&p("/d/s")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        let after = fs.recover();
        assert!(after.exists(&p("/d/s")));
        assert!(!after.exists(&p("/d/s/old")), "the old folder's file came back");
    }

    #[test]
    fn unsynced_bytes_and_names_are_lost_in_a_crash() {
        let fs = FakeStorage::new();
        fs.create_dir_all(&p("/d")).unwrap();
        fs.sync_dir(&p("/")).unwrap();
        let f = fs.open_rw(&p("/d/a")).unwrap();
        f.write_at(b"hello", 0).unwrap();
        // Bytes synced, name not: the file is gone after a crash.
        f.sync_data().unwrap();
        assert!(!fs.recover().exists(&p("/d/a")));
        // Name synced too: it survives, with the synced bytes only.
        fs.sync_dir(&p("/d")).unwrap();
        f.write_at(b"HELLO world", 0).unwrap();
        let after = fs.recover();
        assert_eq!(after.read_all(&p("/d/a")).unwrap(), b"hello");
    }

    #[test]
    fn a_rename_is_durable_only_after_the_folder_sync() {
        let fs = FakeStorage::new();
        fs.create_dir_all(&p("/d")).unwrap();
        fs.sync_dir(&p("/")).unwrap();
        fs.write_atomic(&p("/d/t"), &p("/d/m"), b"one").unwrap();
        fs.open_rw(&p("/d/t2")).unwrap().write_at(b"two", 0).unwrap();
        fs.rename(&p("/d/t2"), &p("/d/m")).unwrap();
        assert_eq!(fs.recover().read_all(&p("/d/m")).unwrap(), b"one");
    }

    #[test]
    fn crash_at_the_nth_sync_stops_everything() {
        let fs = FakeStorage::new();
        fs.crash_at_sync(2);
        fs.sync_dir(&p("/")).unwrap();
        assert!(fs.sync_dir(&p("/")).is_err());
        assert!(fs.has_crashed());
        assert!(fs.create_dir_all(&p("/x")).is_err());
        assert!(!fs.recover().has_crashed());
    }

    fn pieces() -> (Vec<Vec<u8>>, Vec<u8>) {
        let pieces: Vec<Vec<u8>> = (0..3000usize).map(|i| vec![(i % 251) as u8; i % 7]).collect();
        let joined = pieces.concat();
        (pieces, joined)
    }

    #[test]
    fn vectored_writes_land_like_one_write_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DiskStorage;
        let path = dir.path().join("v");
        let file = fs.open_rw(&path).unwrap();
        let (pieces, joined) = pieces();
        // More slices than one pwritev takes, at an offset past the end (a hole before it).
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        file.write_all_vectored_at(&slices, 100).unwrap();
        let mut expected = vec![0u8; 100];
        expected.extend_from_slice(&joined);
        assert_eq!(fs.read_all(&path).unwrap(), expected);
    }

    #[test]
    fn a_short_pwritev_is_finished_from_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let raw = OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
        let (pieces, joined) = pieces();
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        // As if the kernel had written the first `done` bytes: only the rest lands.
        let done = joined.len() / 3 + 1;
        write_rest(&raw, &slices, done, 10).unwrap();
        let mut expected = vec![0u8; 10 + done];
        expected.extend_from_slice(&joined[done..]);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn fake_vectored_writes_are_written_not_synced() {
        let fs = FakeStorage::new();
        fs.create_dir_all(&p("/d")).unwrap();
        fs.sync_dir(&p("/")).unwrap();
        let f = fs.open_rw(&p("/d/a")).unwrap();
        fs.sync_dir(&p("/d")).unwrap();
        f.write_at(b"0123", 0).unwrap();
        f.sync_data().unwrap();
        let (pieces, joined) = pieces();
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        f.write_all_vectored_at(&slices, 2).unwrap();
        let mut expected = b"01".to_vec();
        expected.extend_from_slice(&joined);
        assert_eq!(fs.read_all(&p("/d/a")).unwrap(), expected);
        assert_eq!(fs.recover().read_all(&p("/d/a")).unwrap(), b"0123");
        f.sync_data().unwrap();
        assert_eq!(fs.recover().read_all(&p("/d/a")).unwrap(), expected);
    }

    #[test]
    fn disk_storage_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DiskStorage;
        let path = dir.path().join("m");
        fs.write_atomic(&dir.path().join("t"), &path, b"data").unwrap();
        assert_eq!(fs.read_all(&path).unwrap(), b"data");
        assert_eq!(fs.list_dir(dir.path()).unwrap(), vec!["m".to_owned()]);
    }
}
