//! Where an outbound migration's durable phase record lives, and how it is written and read.
//!
//! What it does: keeps `<data_dir>/outbound/<migration_id>/phase.rec` (the CRC32C-protected,
//! versioned [`PhaseRecord`] of `ferry_wire::api`), written through the storage seam by temp
//! file, fsync, rename and folder fsync, and lists the records found at daemon start.
//!
//! What it does not: decide what a record means after a restart (the registry in
//! [`super`] resumes or aborts), or hold progress finer than a phase boundary (the target's
//! chunk log and durable WAL LSN are the fine-grained checkpoints; the source asks the target).

use std::path::{Path, PathBuf};

use ferry_wire::api::PhaseRecord;
use ferry_wire::MigrationId;

use crate::storage::Storage;

/// The folder holding every outbound migration's record.
pub fn outbound_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outbound")
}

fn record_dir(data_dir: &Path, id: &MigrationId) -> PathBuf {
    outbound_dir(data_dir).join(id.as_str())
}

/// Writes `record` durably for `id`.
pub fn write(storage: &dyn Storage, data_dir: &Path, id: &MigrationId, record: &PhaseRecord) -> std::io::Result<()> {
    let dir = record_dir(data_dir, id);
    if !storage.exists(&dir) {
        storage.create_dir_all(&dir)?;
        storage.sync_dir(&outbound_dir(data_dir))?;
        storage.sync_dir(data_dir)?;
    }
    storage.write_atomic(&dir.join("phase.rec.tmp"), &dir.join("phase.rec"), &record.encode())
}

/// Removes the record of `id` (after `migration.forget`).
pub fn remove(storage: &dyn Storage, data_dir: &Path, id: &MigrationId) -> std::io::Result<()> {
    let dir = record_dir(data_dir, id);
    if storage.exists(&dir) {
        storage.remove_dir_all(&dir)?;
        storage.sync_dir(&outbound_dir(data_dir))?;
    }
    Ok(())
}

/// What a record file held at daemon start.
#[derive(Debug)]
pub enum Found {
    Record(Box<PhaseRecord>),
    /// The file is there but cannot be trusted (the message says why, naming the file).
    Damaged(String),
}

/// Every record under `data_dir`, by migration id. Folders whose name is not a migration id,
/// or that hold no record (a start that crashed before its first write), are skipped.
pub fn list(storage: &dyn Storage, data_dir: &Path) -> Vec<(MigrationId, Found)> {
    let Ok(names) = storage.list_dir(&outbound_dir(data_dir)) else { return Vec::new() };
    let mut found = Vec::new();
    for name in names {
        let Ok(id) = MigrationId::new(name) else { continue };
        let path = record_dir(data_dir, &id).join("phase.rec");
        if !storage.exists(&path) {
            continue;
        }
        let entry = match storage.read_all(&path) {
            Ok(bytes) => match PhaseRecord::decode(&bytes) {
                Ok(record) => Found::Record(Box::new(record)),
                Err(e) => Found::Damaged(format!("{}: {e}", path.display())),
            },
            Err(e) => Found::Damaged(format!("cannot read {}: {e}", path.display())),
        };
        found.push((id, entry));
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::FakeStorage;
    use ferry_wire::api::{Phase, StartParams};

    fn record(phase: Phase) -> PhaseRecord {
        let params: StartParams = serde_json::from_value(serde_json::json!({
            "vshard_id": 1, "segments_root": "/s", "target_address": "127.0.0.1:1", "target_node_id": "b"
        }))
        .unwrap();
        PhaseRecord {
            params,
            phase,
            reason: None,
            started_at_unix_ms: 1,
            updated_at_unix_ms: 1,
            bytes_total: 0,
            bytes_resent: 0,
            final_lsn: None,
            pause: None,
            target_released: false,
            fence_stamps: None,
        }
    }

    #[test]
    fn a_record_survives_a_crash_only_once_synced() {
        let storage = FakeStorage::new();
        let data = Path::new("/data");
        storage.create_dir_all(data).unwrap();
        storage.sync_dir(Path::new("/")).unwrap();
        let id = MigrationId::new("m1").unwrap();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        write(&storage, data, &id, &record(Phase::WalCatchUp)).unwrap();
        let after = storage.recover();
        let found = list(&after, data);
        assert_eq!(found.len(), 1);
        assert!(matches!(&found[0].1, Found::Record(r) if r.phase == Phase::WalCatchUp));
    }

    #[test]
    fn a_damaged_record_is_reported_not_trusted() {
        let storage = FakeStorage::new();
        let data = Path::new("/data");
        let id = MigrationId::new("m1").unwrap();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        let path = data.join("outbound/m1/phase.rec");
        let mut bytes = storage.read_all(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        storage.write_atomic(&data.join("outbound/m1/x.tmp"), &path, &bytes).unwrap();
        let found = list(&storage, data);
        assert!(matches!(&found[0].1, Found::Damaged(m) if m.contains("phase.rec") && m.contains("CRC32C")));
        remove(&storage, data, &id).unwrap();
        assert!(list(&storage, data).is_empty());
    }
}
