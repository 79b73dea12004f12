//! Where an outbound migration's durable phase record lives, and how it is written and read.
//!
//! What it does: keeps `<data_dir>/outbound/<migration_id>/phase.slots`, the CRC32C-protected,
//! versioned [`PhaseRecord`] of `ferry_wire::api` in the two-slot framing of
//! [`ferry_wire::slots`], written through the storage seam, and lists the records found at
//! daemon start. The file is made (and remade when a record outgrows its slots) by temp file,
//! fsync, rename and folder fsync; every other write rewrites the older slot in place and
//! fdatasyncs it: one data flush, no journal commit, which matters because the fence's record
//! is written while the fence's own flushes run. A `phase.rec` of an earlier ferry (one
//! record, temp file and rename) is still read, and removed once the slots file is durable.
//!
//! What it does not: decide what a record means after a restart (the registry in
//! [`super`] resumes or aborts), or hold progress finer than a phase boundary (the target's
//! chunk log and durable WAL LSN are the fine-grained checkpoints; the source asks the target).

use std::path::{Path, PathBuf};

use ferry_wire::api::PhaseRecord;
use ferry_wire::{slots, MigrationId};

use crate::storage::{read_whole, Storage};

/// The folder holding every outbound migration's record.
pub fn outbound_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outbound")
}

fn record_dir(data_dir: &Path, id: &MigrationId) -> PathBuf {
    outbound_dir(data_dir).join(id.as_str())
}

/// The record file (two slots).
const SLOTS_FILE: &str = "phase.slots";
/// The record file of ferry before the slots (one record, replaced by rename).
const LEGACY_FILE: &str = "phase.rec";

/// Writes `record` durably for `id`: in place into the older slot (one fdatasync), or as a new
/// file when there is none yet, it cannot be trusted, or the record outgrew its slots.
pub fn write(storage: &dyn Storage, data_dir: &Path, id: &MigrationId, record: &PhaseRecord) -> std::io::Result<()> {
    let dir = record_dir(data_dir, id);
    let path = dir.join(SLOTS_FILE);
    let payload = record.encode();
    if storage.exists(&path) {
        let file = storage.open_rw(&path)?;
        let bytes = read_whole(&*file, &path)?;
        let rewrite = slots::newest(&bytes).ok().and_then(|newest| slots::next_write(bytes.len(), &newest, &payload));
        if let Some(rewrite) = rewrite {
            file.write_at(&rewrite.bytes, rewrite.offset_bytes)?;
            return file.sync_data();
        }
    } else if !storage.exists(&dir) {
        storage.create_dir_all(&dir)?;
        storage.sync_dir(&outbound_dir(data_dir))?;
        storage.sync_dir(data_dir)?;
    }
    storage.write_atomic(&dir.join("phase.slots.tmp"), &path, &slots::new_file(&payload))?;
    let legacy = dir.join(LEGACY_FILE);
    if storage.exists(&legacy) {
        storage.remove_file(&legacy)?;
        storage.sync_dir(&dir)?;
    }
    Ok(())
}

/// The record in `bytes` of the file at `path` (slots, or the legacy single record).
fn decode(path: &Path, bytes: &[u8], legacy: bool) -> Found {
    let payload = if legacy {
        bytes
    } else {
        match slots::newest(bytes) {
            Ok(newest) => newest.payload,
            Err(e) => return Found::Damaged(format!("{}: {e}", path.display())),
        }
    };
    match PhaseRecord::decode(payload) {
        Ok(record) => Found::Record(Box::new(record)),
        Err(e) => Found::Damaged(format!("{}: {e}", path.display())),
    }
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
        let dir = record_dir(data_dir, &id);
        let (path, legacy) = match (dir.join(SLOTS_FILE), dir.join(LEGACY_FILE)) {
            (slots, _) if storage.exists(&slots) => (slots, false),
            (_, legacy) if storage.exists(&legacy) => (legacy, true),
            _ => continue,
        };
        let entry = match storage.read_all(&path) {
            Ok(bytes) => decode(&path, &bytes, legacy),
            Err(e) => Found::Damaged(format!("cannot read {}: {e}", path.display())),
        };
        found.push((id, entry));
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
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
            fenced_durable_lsn: None,
        }
    }

    fn storage_with_data_dir() -> (FakeStorage, &'static Path, MigrationId) {
        let storage = FakeStorage::new();
        let data = Path::new("/data");
        storage.create_dir_all(data).unwrap();
        storage.sync_dir(Path::new("/")).unwrap();
        (storage, data, MigrationId::new("m1").unwrap())
    }

    fn phase_found(storage: &FakeStorage, data: &Path) -> Option<Phase> {
        match list(storage, data).pop() {
            Some((_, Found::Record(r))) => Some(r.phase),
            Some((_, Found::Damaged(m))) => panic!("damaged: {m}"),
            None => None,
        }
    }

    #[test]
    fn a_record_survives_a_crash_only_once_synced() {
        let (storage, data, id) = storage_with_data_dir();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        write(&storage, data, &id, &record(Phase::WalCatchUp)).unwrap();
        assert_eq!(phase_found(&storage.recover(), data), Some(Phase::WalCatchUp));
    }

    #[test]
    fn a_rewrite_is_one_data_sync_in_place() {
        let (storage, data, id) = storage_with_data_dir();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        let made = storage.syncs_count();
        for phase in [Phase::WalCatchUp, Phase::AtomicCutOver, Phase::Completed] {
            let before = storage.syncs_count();
            write(&storage, data, &id, &record(phase)).unwrap();
            assert_eq!(storage.syncs_count() - before, 1, "{phase:?}: one fdatasync, no rename");
            assert_eq!(phase_found(&storage, data), Some(phase));
        }
        assert!(made > 1, "the file is made by temp file, rename and folder syncs");
        assert!(!storage.exists(&data.join("outbound/m1/phase.slots.tmp")));
    }

    #[test]
    fn a_crash_at_any_sync_of_a_rewrite_leaves_the_old_record_or_the_new_one() {
        let (storage, data, id) = storage_with_data_dir();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        write(&storage, data, &id, &record(Phase::WalCatchUp)).unwrap();
        // A record that outgrew its slots remakes the file: crash in that path too.
        let mut big = record(Phase::AtomicCutOver);
        big.reason = Some("x".repeat(40_000));
        for new in [record(Phase::AtomicCutOver), big] {
            let mut outcomes = Vec::new();
            for n in 1..=6 {
                let attempt = storage.fork();
                attempt.crash_at_sync(n);
                let result = write(&attempt, data, &id, &new);
                let found = phase_found(&attempt.recover(), data);
                assert!(
                    matches!(found, Some(Phase::WalCatchUp | Phase::AtomicCutOver)),
                    "crash at sync {n}: {found:?}"
                );
                if result.is_ok() {
                    assert_eq!(found, Some(Phase::AtomicCutOver), "a write that returned is durable");
                }
                outcomes.push(found);
            }
            assert!(outcomes.contains(&Some(Phase::WalCatchUp)), "{outcomes:?}");
            assert!(outcomes.contains(&Some(Phase::AtomicCutOver)), "{outcomes:?}");
        }
    }

    #[test]
    fn a_record_of_an_earlier_ferry_is_read_then_replaced() {
        let (storage, data, id) = storage_with_data_dir();
        let dir = data.join("outbound/m1");
        storage.create_dir_all(&dir).unwrap();
        storage.sync_dir(&data.join("outbound")).unwrap();
        storage.sync_dir(data).unwrap();
        storage
            .write_atomic(&dir.join("phase.rec.tmp"), &dir.join("phase.rec"), &record(Phase::WalCatchUp).encode())
            .unwrap();
        assert_eq!(phase_found(&storage, data), Some(Phase::WalCatchUp));
        write(&storage, data, &id, &record(Phase::AtomicCutOver)).unwrap();
        assert!(!storage.exists(&dir.join("phase.rec")));
        assert_eq!(phase_found(&storage.recover(), data), Some(Phase::AtomicCutOver));
    }

    #[test]
    fn a_damaged_record_is_reported_not_trusted() {
        let (storage, data, id) = storage_with_data_dir();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        let path = data.join("outbound/m1/phase.slots");
        let mut bytes = storage.read_all(&path).unwrap();
        bytes[slots::SLOT_HEADER_LEN_BYTES + 2] ^= 0xff;
        storage.write_atomic(&data.join("outbound/m1/x.tmp"), &path, &bytes).unwrap();
        let found = list(&storage, data);
        assert!(matches!(&found[0].1, Found::Damaged(m) if m.contains("phase.slots") && m.contains("CRC32C")));
        // A damaged file is remade whole by the next write.
        write(&storage, data, &id, &record(Phase::WalCatchUp)).unwrap();
        assert_eq!(phase_found(&storage, data), Some(Phase::WalCatchUp));
        remove(&storage, data, &id).unwrap();
        assert!(list(&storage, data).is_empty());
    }

    #[test]
    fn a_slots_file_of_the_wrong_size_is_reported_not_trusted() {
        let (storage, data, id) = storage_with_data_dir();
        write(&storage, data, &id, &record(Phase::BaseCopy)).unwrap();
        let path = data.join("outbound/m1/phase.slots");
        let bytes = storage.read_all(&path).unwrap();
        storage.write_atomic(&data.join("outbound/m1/x.tmp"), &path, &bytes[..bytes.len() - 1]).unwrap();
        let found = list(&storage, data);
        assert!(matches!(&found[0].1, Found::Damaged(m) if m.contains("phase.slots") && m.contains("4 KiB")));
    }
}
