//! Base copy scenarios: byte-identical trees, staging layout, path refusals, progress.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::sync::Arc;

use ferry_engine::snapshot::SnapshotError;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::TransferError;
use ferry_tests::{copy, request, tree_sha256, wait_until, write_file, Certs, Target};
use ferry_wire::manifest::{StagingManifest, StagingState};
use ferry_wire::path::RelPath;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_every_edge_size_arrive_byte_identical() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let sizes: [(&str, usize); 6] = [
        ("empty.seg", 0),
        ("L0/one.seg", 1),
        ("L0/a/4095.seg", 4095),
        ("L1/b/c/4096.seg", 4096),
        ("L1/mib_plus_one.seg", (1 << 20) + 1),
        ("L2/big.seg", 256 << 20),
    ];
    for (i, (rel, size)) in sizes.iter().enumerate() {
        write_file(source.path(), rel, *size, i as u64);
    }
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let report = copy(&certs, request("edge-sizes", source.path(), target.addr, 1 << 20)).await.unwrap();
    assert_eq!(report.files_count, sizes.len() as u64);
    assert_eq!(report.bytes_total, sizes.iter().map(|(_, s)| *s as u64).sum::<u64>());
    assert_eq!(report.bytes_resent, 0);
    assert!(report.committed);

    let staging = target_dir.path().join("migrations/edge-sizes");
    let expected = tree_sha256(source.path()).unwrap();
    assert_eq!(expected.len(), sizes.len());
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), expected);

    let manifest = StagingManifest::decode(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest.state, StagingState::Released);
    assert_eq!(manifest.segments.len(), sizes.len());
    assert_eq!(manifest.db_meta, serde_json::json!({"test": true}));
    for segment in &manifest.segments {
        let bytes = std::fs::read(staging.join("segments").join(segment.path.as_str())).unwrap();
        assert_eq!(bytes.len() as u64, segment.size_bytes);
        assert_eq!(ferry_wire::crc32c(&bytes), segment.crc32c, "{}", segment.path);
    }
    // No temp files are left where the database looks.
    assert!(std::fs::read_dir(staging.join(".ferry/tmp")).unwrap().next().is_none());

    // Repeating the same copy is idempotent: nothing is sent again.
    let again = copy(&certs, request("edge-sizes", source.path(), target.addr, 1 << 20)).await.unwrap();
    assert!(again.already_staged);
    target.stop();
}

/// Hundreds of one-chunk files: the target finalises them in batches (several `FileDone`s
/// taken at once, files fsynced on parallel blocking threads); every one must still arrive
/// byte-identical, be named by the MANIFEST with its CRC, and leave no part file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_small_files_in_folders_all_arrive_and_are_named_once() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let files_count = 400usize;
    for i in 0..files_count {
        write_file(source.path(), &format!("d{:02}/f{i:04}.seg", i % 20), 1000 + (i * 37) % 3000, 500 + i as u64);
    }
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let report = copy(&certs, request("many-small", source.path(), target.addr, 1 << 20)).await.unwrap();
    assert_eq!(report.files_count, files_count as u64);
    assert!(report.committed);
    let staging = target_dir.path().join("migrations/many-small");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), tree_sha256(source.path()).unwrap());
    let manifest = StagingManifest::decode(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest.state, StagingState::Released);
    let mut named: Vec<&str> = manifest.segments.iter().map(|s| s.path.as_str()).collect();
    named.sort_unstable();
    named.dedup();
    assert_eq!(named.len(), files_count);
    for segment in &manifest.segments {
        let bytes = std::fs::read(staging.join("segments").join(segment.path.as_str())).unwrap();
        assert_eq!(ferry_wire::crc32c(&bytes), segment.crc32c, "{}", segment.path);
    }
    assert!(std::fs::read_dir(staging.join(".ferry/tmp")).unwrap().next().is_none());
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunks_and_one_stream_also_work() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    for (i, size) in [10_000usize, 4096 * 7, 3].iter().enumerate() {
        write_file(source.path(), &format!("d{i}/f"), *size, 100 + i as u64);
    }
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("small-chunks", source.path(), target.addr, 4096);
    req.streams_count = 1;
    req.commit = false;
    let report = copy(&certs, req).await.unwrap();
    assert!(!report.committed);
    let staging = target_dir.path().join("migrations/small-chunks");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), tree_sha256(source.path()).unwrap());
    let manifest = StagingManifest::decode(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest.state, StagingState::Copying);
    assert!(manifest.base_complete);
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_files_are_refused_before_anything_is_sent() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(source.path(), "ok.seg", 10, 1);
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();

    // Lexically bad paths never become a RelPath.
    for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", ".ferry-snapshot/x"] {
        assert!(RelPath::new(bad).is_err(), "{bad} accepted");
    }

    // A symlink under the root.
    std::os::unix::fs::symlink("/etc/hostname", source.path().join("link.seg")).unwrap();
    let err = copy(&certs, request("symlink", source.path(), target.addr, 4096)).await.unwrap_err();
    assert!(matches!(err, TransferError::Snapshot(SnapshotError::Symlink(_))), "{err}");
    assert!(err.to_string().contains("link.seg"), "{err}");
    std::fs::remove_file(source.path().join("link.seg")).unwrap();

    // A symlinked folder named explicitly.
    std::os::unix::fs::symlink(source.path(), source.path().join("loop")).unwrap();
    let mut req = request("symlink-dir", source.path(), target.addr, 4096);
    req.files = Some(vec![RelPath::new("loop/ok.seg").unwrap()]);
    let err = copy(&certs, req).await.unwrap_err();
    assert!(matches!(err, TransferError::Snapshot(SnapshotError::Symlink(_))), "{err}");
    std::fs::remove_file(source.path().join("loop")).unwrap();

    // A fifo (not a regular file).
    let fifo = source.path().join("pipe");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let err = copy(&certs, request("fifo", source.path(), target.addr, 4096)).await.unwrap_err();
    assert!(matches!(err, TransferError::Snapshot(SnapshotError::NotRegular(_))), "{err}");
    std::fs::remove_file(&fifo).unwrap();

    // Nothing was staged for any refused copy.
    assert!(!target_dir.path().join("migrations").exists());
    target.stop();
}

#[test]
fn the_cli_refuses_escaping_paths_with_a_clear_error() {
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    for bad in ["../x", "/etc/passwd", "a/../../x"] {
        let out = std::process::Command::new(ferry_tests::ferry_bin())
            .args([
                "copy",
                "--node-id",
                "source",
                "--target",
                "127.0.0.1:9",
                "--target-node",
                "target",
                "--vshard",
                "1",
            ])
            .arg("--certs")
            .arg(certs.dir.path())
            .arg("--segments-root")
            .arg(source.path())
            .args(["--file", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("invalid --file") && stderr.contains(bad), "{bad}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_changes_while_a_copy_runs() {
    use ferry_engine::transfer::source::RateHandle;
    let certs = Arc::new(Certs::new().unwrap());
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(source.path(), "big.seg", 64 << 20, 3);
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    // At 1 MB/s this copy would take over a minute.
    let mut req = request("rate", source.path(), target.addr, 256 << 10);
    req.rate_limit_bytes_per_sec = 0;
    let rate = RateHandle::new(1_000_000, 256 << 10);
    let task = {
        let (certs, rate) = (certs.clone(), rate.clone());
        tokio::spawn(async move { ferry_tests::copy_with_rate(&certs, req, rate).await })
    };
    // Limited: it makes progress, slowly.
    let verified = || target.ctx.inbound().values().map(|s| s.migration.bytes_verified).max().unwrap_or(0) >= 1 << 20;
    wait_until("1 MiB verified", std::time::Duration::from_secs(60), verified).await.unwrap();
    assert!(!task.is_finished());
    assert_eq!(rate.rate_bytes_per_sec(), 1_000_000);
    // Lifted at run time: the copy finishes long before the old rate would allow.
    rate.set(0);
    let report = tokio::time::timeout(std::time::Duration::from_secs(45), task)
        .await
        .expect("the new rate did not take effect")
        .unwrap()
        .unwrap();
    assert_eq!(report.bytes_total, 64 << 20);
    target.stop();
}
