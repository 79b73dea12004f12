//! The block device behind a folder, found through /sys: which disk it is and whether it is NVMe.
//!
//! What it does: [`device_of`] `statx`es the folder for its device number (`st_dev`), follows
//! `/sys/dev/block/MAJ:MIN` to the device's folder, goes from a partition to its parent disk,
//! and from a stacked device (device-mapper, md) down its `slaves/` to the disks under it.
//! [`lookup`] does the same under any root, so fixtures stand in for /sys in the tests.
//!
//! What it does not: open the device, or decide what a test does with a disk that is not
//! NVMe (the caller names it in its failure).
//!
//! Invariants: the walk down `slaves/` is bounded ([`STACK_DEPTH_MAX`], [`SLAVES_MAX`]); a
//! missing or unreadable file is an error naming the path, never a guess.

use std::path::{Path, PathBuf};

/// Stacked devices followed at most (dm on md on partitions is three).
pub const STACK_DEPTH_MAX: usize = 8;
/// Devices under one stacked device looked at, at most.
pub const SLAVES_MAX: usize = 64;

/// Why the device behind a folder could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// `statx` of the folder failed.
    #[error("cannot stat {path}: {cause}; check that the folder exists")]
    Stat { path: PathBuf, cause: std::io::Error },
    /// The folder's file system has no block device (tmpfs, overlay, NFS...).
    #[error("{path} is on device {major}:{minor}, which has no block device under {sys}/dev/block (tmpfs, overlay or a network file system?)")]
    NotABlockDevice { path: PathBuf, major: u32, minor: u32, sys: PathBuf },
    /// A /sys file the walk needs could not be read.
    #[error("cannot read {path}: {cause}")]
    Sysfs { path: PathBuf, cause: std::io::Error },
    /// Stacked devices deeper than [`STACK_DEPTH_MAX`].
    #[error("{name} stacks devices deeper than {STACK_DEPTH_MAX} levels")]
    TooDeep { name: String },
}

/// One disk a folder's data lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The disk's kernel name: `nvme0n1`, `vda`, `sda`.
    pub name: String,
    /// The partition of it the folder is on (`nvme0n1p1`), when it is one.
    pub partition: Option<String>,
    /// The model string from `device/model` (NVMe and SCSI disks have one; virtio has none).
    pub model: Option<String>,
    /// `queue/logical_block_size`: O_DIRECT's alignment when `statx` does not say.
    pub logical_block_size_bytes: Option<u32>,
}

impl Disk {
    /// NVMe namespaces are named `nvme<controller>n<namespace>`.
    pub fn is_nvme(&self) -> bool {
        self.name.starts_with("nvme")
    }
}

/// The block device behind a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// `MAJ:MIN` of the folder's file system.
    pub dev: (u32, u32),
    /// The device that number names (a partition, a disk, `dm-0`, `md0`).
    pub name: String,
    /// The disks under it: one for a disk or a partition, several for a stripe or a mirror.
    pub disks: Vec<Disk>,
}

impl BlockDevice {
    /// Whether every disk under the folder is NVMe (and there is at least one).
    pub fn is_nvme(&self) -> bool {
        !self.disks.is_empty() && self.disks.iter().all(Disk::is_nvme)
    }

    /// The smallest logical block size that satisfies every disk under the folder (the largest).
    pub fn logical_block_size_bytes(&self) -> Option<u32> {
        self.disks.iter().filter_map(|d| d.logical_block_size_bytes).max()
    }

    /// `nvme0n1 (Samsung SSD 980 PRO 1TB)` or `dm-0 over nvme0n1p2 of nvme0n1, nvme1n1`.
    pub fn describe(&self) -> String {
        let disks: Vec<String> = self
            .disks
            .iter()
            .map(|d| match &d.model {
                Some(model) => format!("{} ({model})", d.name),
                None => d.name.clone(),
            })
            .collect();
        // A disk, or a partition of one: the disk says it all. A stacked device: what is under it.
        let plain = matches!(self.disks.as_slice(), [disk] if disk.name == self.name || disk.partition.as_deref() == Some(self.name.as_str()));
        if plain {
            disks.join(", ")
        } else {
            format!("{} over {}", self.name, disks.join(", "))
        }
    }
}

/// The block device behind `path`, from this machine's /sys.
pub fn device_of(path: &Path) -> Result<BlockDevice, LookupError> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let stat = statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS)
        .map_err(|e| LookupError::Stat { path: path.to_path_buf(), cause: e.into() })?;
    lookup(Path::new("/sys"), path, stat.stx_dev_major, stat.stx_dev_minor)
}

/// The block device `major:minor` under the /sys tree at `sys` (`path` is only for messages).
pub fn lookup(sys: &Path, path: &Path, major: u32, minor: u32) -> Result<BlockDevice, LookupError> {
    let link = sys.join("dev/block").join(format!("{major}:{minor}"));
    let dir = std::fs::canonicalize(&link).map_err(|_| LookupError::NotABlockDevice {
        path: path.to_path_buf(),
        major,
        minor,
        sys: sys.to_path_buf(),
    })?;
    let name = file_name(&dir);
    let mut disks = Vec::new();
    disks_under(&dir, 0, &mut disks)?;
    Ok(BlockDevice { dev: (major, minor), name, disks })
}

fn file_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Collects the disks under the device folder `dir` (a partition, a disk or a stacked device).
fn disks_under(dir: &Path, depth: usize, disks: &mut Vec<Disk>) -> Result<(), LookupError> {
    if depth >= STACK_DEPTH_MAX {
        return Err(LookupError::TooDeep { name: file_name(dir) });
    }
    // A partition's folder has a `partition` file and sits inside its disk's folder.
    let (disk_dir, partition) = if dir.join("partition").exists() {
        let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf());
        (parent, Some(file_name(dir)))
    } else {
        (dir.to_path_buf(), None)
    };
    let slaves = slaves(&disk_dir)?;
    if !slaves.is_empty() {
        for slave in slaves {
            disks_under(&slave, depth + 1, disks)?;
        }
        return Ok(());
    }
    let disk = Disk {
        name: file_name(&disk_dir),
        partition,
        model: read_trimmed(&disk_dir.join("device/model")).filter(|m| !m.is_empty()),
        logical_block_size_bytes: read_trimmed(&disk_dir.join("queue/logical_block_size")).and_then(|s| s.parse().ok()),
    };
    if !disks.contains(&disk) {
        disks.push(disk);
    }
    Ok(())
}

/// The device folders under `slaves/` of a stacked device (empty for a plain disk).
fn slaves(disk_dir: &Path) -> Result<Vec<PathBuf>, LookupError> {
    let folder = disk_dir.join("slaves");
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => return Err(LookupError::Sysfs { path: folder, cause }),
    };
    let mut found = Vec::new();
    for entry in entries.flatten().take(SLAVES_MAX) {
        let path =
            std::fs::canonicalize(entry.path()).map_err(|cause| LookupError::Sysfs { path: entry.path(), cause })?;
        found.push(path);
    }
    found.sort();
    Ok(found)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake /sys: `devices` holds the device folders, `dev/block` the links to them.
    struct FakeSys {
        dir: tempfile::TempDir,
    }

    impl FakeSys {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("dev/block")).unwrap();
            Self { dir }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        /// A disk folder at `devices/<at>/<name>` with its block size and model.
        fn disk(&self, at: &str, name: &str, lbs: u32, model: Option<&str>) -> PathBuf {
            let dir = self.root().join("devices").join(at).join(name);
            std::fs::create_dir_all(dir.join("queue")).unwrap();
            std::fs::write(dir.join("queue/logical_block_size"), format!("{lbs}\n")).unwrap();
            if let Some(model) = model {
                let controller = self.root().join("devices").join(at).join("controller");
                std::fs::create_dir_all(&controller).unwrap();
                std::fs::write(controller.join("model"), format!("{model}   \n")).unwrap();
                symlink(&controller, dir.join("device")).unwrap();
            }
            dir
        }

        fn partition(&self, disk: &Path, name: &str) -> PathBuf {
            let dir = disk.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("partition"), "1\n").unwrap();
            dir
        }

        fn link(&self, dev: &str, to: &Path) {
            symlink(to, self.root().join("dev/block").join(dev)).unwrap();
        }
    }

    #[test]
    fn a_partition_of_an_nvme_namespace_is_nvme_with_its_model() {
        let sys = FakeSys::new();
        let disk = sys.disk("pci0000:00/nvme/nvme0", "nvme0n1", 4096, Some("Samsung SSD 980 PRO 1TB"));
        let part = sys.partition(&disk, "nvme0n1p1");
        sys.link("259:1", &part);
        let found = lookup(sys.root(), Path::new("/data"), 259, 1).unwrap();
        assert_eq!(found.name, "nvme0n1p1");
        assert!(found.is_nvme());
        assert_eq!(
            found.disks,
            vec![Disk {
                name: "nvme0n1".into(),
                partition: Some("nvme0n1p1".into()),
                model: Some("Samsung SSD 980 PRO 1TB".into()),
                logical_block_size_bytes: Some(4096),
            }]
        );
        assert_eq!(found.describe(), "nvme0n1 (Samsung SSD 980 PRO 1TB)");
        assert_eq!(found.logical_block_size_bytes(), Some(4096));
    }

    #[test]
    fn a_virtio_disk_is_not_nvme() {
        let sys = FakeSys::new();
        let disk = sys.disk("pci0000:00/virtio1/block", "vda", 512, None);
        sys.link("254:0", &disk);
        let found = lookup(sys.root(), Path::new("/work"), 254, 0).unwrap();
        assert!(!found.is_nvme());
        assert_eq!(found.describe(), "vda");
        assert_eq!(found.logical_block_size_bytes(), Some(512));
    }

    #[test]
    fn a_stacked_device_is_nvme_only_when_every_disk_under_it_is() {
        let sys = FakeSys::new();
        let nvme = sys.disk("pci/nvme0", "nvme0n1", 512, Some("A"));
        let nvme_part = sys.partition(&nvme, "nvme0n1p2");
        let sata = sys.disk("pci/ata1", "sda", 4096, Some("B"));
        let dm = sys.root().join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        symlink(&nvme_part, dm.join("slaves/nvme0n1p2")).unwrap();
        sys.link("252:0", &dm);
        let found = lookup(sys.root(), Path::new("/lvm"), 252, 0).unwrap();
        assert!(found.is_nvme(), "{found:?}");
        assert_eq!(found.describe(), "dm-0 over nvme0n1 (A)");
        symlink(&sata, dm.join("slaves/sda")).unwrap();
        let found = lookup(sys.root(), Path::new("/lvm"), 252, 0).unwrap();
        assert!(!found.is_nvme(), "{found:?}");
        assert_eq!(found.logical_block_size_bytes(), Some(4096), "the largest satisfies both");
    }

    #[test]
    fn a_number_without_a_block_device_and_a_loop_of_slaves_are_errors() {
        let sys = FakeSys::new();
        let err = lookup(sys.root(), Path::new("/dev/shm"), 0, 42).unwrap_err();
        assert!(matches!(err, LookupError::NotABlockDevice { major: 0, minor: 42, .. }), "{err}");
        assert!(err.to_string().contains("/dev/shm"), "{err}");
        let dm = sys.root().join("devices/virtual/block/dm-1");
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        symlink(&dm, dm.join("slaves/dm-1")).unwrap();
        sys.link("252:1", &dm);
        let err = lookup(sys.root(), Path::new("/x"), 252, 1).unwrap_err();
        assert!(matches!(err, LookupError::TooDeep { .. }), "{err}");
    }

    /// This machine's /sys: a folder under the worktree is on a real block device; where that
    /// is a virtio disk (as on the development VM), it is not NVMe.
    #[test]
    fn this_machines_worktree_is_found_on_its_disk() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let found = match device_of(here) {
            Ok(found) => found,
            // A build folder on tmpfs or overlay has no block device: the error must say so.
            Err(err @ LookupError::NotABlockDevice { .. }) => return eprintln!("no block device here: {err}"),
            Err(err) => panic!("{err}"),
        };
        assert!(!found.disks.is_empty(), "{found:?}");
        for disk in &found.disks {
            assert!(Path::new("/sys/block").join(&disk.name).exists(), "{disk:?} is not in /sys/block");
            assert_eq!(disk.is_nvme(), disk.name.starts_with("nvme"));
        }
        if found.disks.iter().any(|d| d.name.starts_with("vd")) {
            assert!(!found.is_nvme(), "{found:?}");
            assert!(found.describe().contains("vd"), "{}", found.describe());
        }
    }
}
