//! Crash consistency of staging: a power loss at every sync of a copy (fake storage that keeps
//! written and synced bytes apart), then recovery and a restarted copy.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;

use ferry_engine::staging::{self, StagingLayout};
use ferry_engine::storage::{FakeStorage, Storage};
use ferry_tests::{copy, request, write_file, Certs, Target};
use ferry_wire::manifest::StagingState;
use ferry_wire::MigrationId;

const DATA_DIR: &str = "/data";

/// No `MANIFEST.json` claims a file whose bytes are missing or wrong. Returns its state.
fn check_manifest_claims(storage: &FakeStorage, id: &str) -> Option<StagingState> {
    let layout = StagingLayout::new(Path::new(DATA_DIR), &MigrationId::new(id).unwrap());
    let manifest = staging::read_manifest(storage, &layout).unwrap()?;
    for segment in &manifest.segments {
        let bytes = storage
            .read_all(&layout.segment_path(&segment.path))
            .unwrap_or_else(|e| panic!("MANIFEST.json lists {} but it is missing: {e}", segment.path));
        assert_eq!(bytes.len() as u64, segment.size_bytes, "{}", segment.path);
        assert_eq!(ferry_wire::crc32c(&bytes), segment.crc32c, "{}", segment.path);
    }
    Some(manifest.state)
}

fn fresh_storage() -> FakeStorage {
    let storage = FakeStorage::new();
    storage.create_dir_all(Path::new(DATA_DIR)).unwrap();
    storage.sync_dir(Path::new("/")).unwrap();
    storage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_sync_never_leaves_a_manifest_claiming_missing_bytes() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    for (i, (rel, size)) in [("a/x.seg", 9000usize), ("a/b/y.seg", 4096), ("z.seg", 1), ("e.seg", 0)].iter().enumerate()
    {
        write_file(source.path(), rel, *size, i as u64);
    }
    let expected = ferry_tests::tree_sha256(source.path()).unwrap();
    let mut crashes = 0u64;
    for n in 1..200 {
        let storage = fresh_storage();
        storage.crash_at_sync(n);
        let target = Target::start(&certs, Path::new(DATA_DIR), Arc::new(storage.clone())).unwrap();
        let result = copy(&certs, request("crashy", source.path(), target.addr, 4096)).await;
        target.stop();
        if !storage.has_crashed() {
            // Past the last sync: the copy completes, and it took every sync we crashed at.
            result.unwrap();
            assert_eq!(check_manifest_claims(&storage, "crashy"), Some(StagingState::Released));
            break;
        }
        crashes += 1;
        let err = result.expect_err("a copy whose target crashed must fail");
        assert!(err.to_string().contains("crashed") || err.to_string().contains("storage"), "sync {n}: {err}");

        let recovered = storage.recover();
        check_manifest_claims(&recovered, "crashy");

        // The restarted target finishes the job on what survived.
        let target = Target::start(&certs, Path::new(DATA_DIR), Arc::new(recovered.clone())).unwrap();
        copy(&certs, request("crashy", source.path(), target.addr, 4096))
            .await
            .unwrap_or_else(|e| panic!("copy after a crash at sync {n} failed: {e}"));
        target.stop();
        assert_eq!(check_manifest_claims(&recovered, "crashy"), Some(StagingState::Released));
        let layout = StagingLayout::new(Path::new(DATA_DIR), &MigrationId::new("crashy").unwrap());
        for rel in expected.keys() {
            let path = layout.segments_dir().join(rel);
            assert!(recovered.exists(&path), "after a crash at sync {n}, {rel} is missing");
        }
        // And the result survives a further power loss: everything was synced.
        let again = recovered.recover();
        assert_eq!(check_manifest_claims(&again, "crashy"), Some(StagingState::Released));
    }
    assert!(crashes >= 8, "the copy made only {crashes} syncs: the test does not exercise durability");
}
