//! The target's staging manifests, held in memory and persisted when they change.
//!
//! What it does: [`Manifests`] keeps the last `MANIFEST.json` of each staging this process
//! read or wrote, so the fence, the release, the commit and the abort change the manifest
//! they hold instead of reading it back from disk (the fence does it inside the write
//! pause). Every change is written through ([`Manifests::write`]), durably, before it is
//! kept; a write that fails drops the kept copy, so the next read goes to the disk again.
//!
//! What it does not: decide any state (the inbound machine does), or notice a manifest that
//! something other than this process changed on disk (the daemon owns its data folder).
//!
//! Invariants: a kept manifest is the one on disk, as this process last wrote or read it;
//! a staging removed from disk is dropped here ([`Manifests::forget`]) before it is removed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use ferry_wire::manifest::StagingManifest;
use ferry_wire::proto::inbound::Inbound;
use ferry_wire::MigrationId;

use crate::staging::{self, StagingError, StagingLayout};
use crate::storage::Storage;

/// How a manifest is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Temp file, fsync, rename, folder fsync.
    Atomic,
    /// Through the commit prepared off the pause (`staging::prepare_manifest_commit`).
    Prepared,
}

/// The manifests of this node's stagings, by migration.
#[derive(Debug, Default)]
pub(crate) struct Manifests {
    kept: Mutex<HashMap<MigrationId, StagingManifest>>,
}

impl Manifests {
    fn kept(&self) -> MutexGuard<'_, HashMap<MigrationId, StagingManifest>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staging's manifest (`None`: it has none yet). Read from disk only the first time.
    pub(crate) fn get(
        &self,
        storage: &dyn Storage,
        layout: &StagingLayout,
        id: &MigrationId,
    ) -> Result<Option<StagingManifest>, StagingError> {
        if let Some(manifest) = self.kept().get(id) {
            return Ok(Some(manifest.clone()));
        }
        let manifest = staging::read_manifest(storage, layout)?;
        if let Some(m) = &manifest {
            self.kept().insert(id.clone(), m.clone());
        }
        Ok(manifest)
    }

    /// Writes `manifest` durably and keeps it; on a failure, keeps nothing (the disk may hold
    /// either version).
    pub(crate) fn write(
        &self,
        storage: &dyn Storage,
        layout: &StagingLayout,
        manifest: &StagingManifest,
        how: Write,
    ) -> Result<(), StagingError> {
        let id = &manifest.migration_id;
        let written = match how {
            Write::Atomic => staging::write_manifest(storage, layout, manifest),
            Write::Prepared => staging::write_manifest_prepared(storage, layout, manifest),
        };
        match written {
            Ok(()) => {
                self.kept().insert(id.clone(), manifest.clone());
                Ok(())
            }
            Err(e) => {
                self.kept().remove(id);
                Err(e)
            }
        }
    }

    /// Fills what `inbound` lacks from the kept manifest of its staging, if any: a migration
    /// this process found on disk (after a restart) and no source has offered again knows
    /// only its state and source node; its manifest names the vShard and the files.
    pub(crate) fn fill_from_kept(&self, id: &MigrationId, inbound: &mut Inbound) {
        if inbound.vshard_id.is_some() {
            return;
        }
        let kept = self.kept();
        let Some(manifest) = kept.get(id) else { return };
        inbound.vshard_id = Some(manifest.vshard_id);
        inbound.started_at_unix_ms = manifest.started_at_unix_ms.unwrap_or(inbound.started_at_unix_ms);
        inbound.wal_follows = manifest.wal_follows.unwrap_or(!manifest.wal_segments.is_empty());
        inbound.files_total_count = manifest.segments.len() as u64;
        inbound.bytes_total = manifest.segments.iter().map(|s| s.size_bytes).fold(0, u64::saturating_add);
        if manifest.base_complete {
            inbound.files_staged_count = inbound.files_total_count;
            inbound.bytes_verified = inbound.bytes_total;
        }
    }

    /// Drops the kept manifest of a staging about to be removed from disk.
    pub(crate) fn forget(&self, id: &MigrationId) {
        self.kept().remove(id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use ferry_wire::manifest::{StagingState, MANIFEST_FORMAT_VERSION};
    use ferry_wire::{Lsn, VShardId};

    use super::*;
    use crate::storage::DiskStorage;

    fn manifest(id: &MigrationId, state: StagingState) -> StagingManifest {
        StagingManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            migration_id: id.clone(),
            vshard_id: VShardId(1),
            base_lsn: Lsn(1),
            final_lsn: None,
            state,
            base_complete: true,
            db_meta: serde_json::Value::Null,
            segments: Vec::new(),
            wal_segments: Vec::new(),
            source_node: None,
            started_at_unix_ms: None,
            wal_follows: None,
        }
    }

    /// A staging folder of migration m1 with its `.ferry/` made (the folder lives as long as
    /// the first value).
    fn staging_folder() -> (tempfile::TempDir, Arc<dyn Storage>, MigrationId, StagingLayout) {
        let dir = tempfile::tempdir().unwrap();
        let id = MigrationId::new("m1".to_owned()).unwrap();
        let layout = StagingLayout::new(dir.path(), &id);
        std::fs::create_dir_all(layout.ferry_dir()).unwrap();
        (dir, Arc::new(DiskStorage), id, layout)
    }

    #[test]
    fn a_manifest_is_read_from_disk_once_and_written_through() {
        let (_dir, storage, id, layout) = staging_folder();
        let manifests = Manifests::default();
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap(), None);
        staging::write_manifest(&*storage, &layout, &manifest(&id, StagingState::Copying)).unwrap();
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap().unwrap().state, StagingState::Copying);
        // Kept: a change on disk behind its back is not seen (the daemon owns its folder)...
        std::fs::remove_file(layout.manifest_path()).unwrap();
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap().unwrap().state, StagingState::Copying);
        // ...and a write goes to disk as well as to memory.
        manifests.write(&*storage, &layout, &manifest(&id, StagingState::Fenced), Write::Atomic).unwrap();
        assert_eq!(staging::read_manifest(&*storage, &layout).unwrap().unwrap().state, StagingState::Fenced);
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap().unwrap().state, StagingState::Fenced);
        manifests.forget(&id);
        std::fs::remove_file(layout.manifest_path()).unwrap();
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap(), None);
    }

    #[test]
    fn a_failed_write_keeps_nothing() {
        let (_dir, storage, id, layout) = staging_folder();
        let manifests = Manifests::default();
        manifests.write(&*storage, &layout, &manifest(&id, StagingState::Copying), Write::Atomic).unwrap();
        // The staging's folder is gone: the write fails, and the next read goes to the disk.
        std::fs::remove_dir_all(&layout.root).unwrap();
        assert!(manifests.write(&*storage, &layout, &manifest(&id, StagingState::Fenced), Write::Atomic).is_err());
        assert_eq!(manifests.get(&*storage, &layout, &id).unwrap(), None);
    }
}
