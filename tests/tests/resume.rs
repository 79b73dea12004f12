//! Resumption: interrupted copies complete byte-identical, resend at most one chunk per stream
//! per interruption, never trust a chunk whose bytes changed, and fail on a changed source.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::storage::{DiskStorage, FakeStorage, Storage};
use ferry_tests::{copy, request, tree_sha256, wait_until, write_file, Certs, Target};
use ferry_wire::checkpoint;

/// A small deterministic generator, seeded and printed so a failure can be replayed.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn seed() -> u64 {
    let seed = std::env::var("FERRY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("FERRY_TEST_SEED={seed}");
    seed
}

/// Waits until the target has verified at least `bytes` of migration `id`.
async fn wait_verified(target: &Target, id: &str, bytes: u64) {
    let done = || target.ctx.inbound().iter().any(|(m, s)| m.as_str() == id && s.migration.bytes_verified >= bytes);
    wait_until(&format!("migration {id} to reach {bytes} verified bytes"), Duration::from_secs(60), done)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_dropped_connections_resend_at_most_one_chunk_per_stream_each() {
    let mut rng = seed();
    let certs = Certs::new().unwrap();
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        write_file(source.path(), &format!("seg/{i}.seg"), 16 << 20, i);
    }
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let chunk_len: u32 = 256 << 10;
    let mut req = request("drops", source.path(), target.addr, chunk_len);
    req.rate_limit_bytes_per_sec = 48 << 20;
    let streams = u64::from(req.streams_count);
    let total = 64u64 << 20;
    // Twenty points at least 2 MiB apart (60 MiB / 20 = 3 MiB each, the place in each drawn), so
    // that each drop falls after the copy has reconnected from the one before.
    let slot = (total - (4 << 20)) / 20;
    let points: Vec<u64> = (0..20).map(|i| i * slot + next(&mut rng) % (slot - (2 << 20))).collect();
    let certs = Arc::new(certs);
    let copy_task = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req).await })
    };
    let mut drops = 0;
    for point in points {
        wait_verified(&target, "drops", point).await;
        // The copy may still be between a drop and its reconnection (its back-off): wait for
        // a connection to cut, unless the copy has finished.
        while !copy_task.is_finished() {
            if target.ctx.drop_connections() > 0 {
                drops += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let report = copy_task.await.unwrap().unwrap();
    eprintln!("{drops} drops, {} reconnects, {} bytes resent", report.reconnects_count, report.bytes_resent);
    assert!(drops >= 15, "only {drops} drops happened");
    assert!(report.reconnects_count >= drops, "{} reconnects for {drops} drops", report.reconnects_count);
    let bound = drops as u64 * streams * u64::from(chunk_len);
    assert!(report.bytes_resent <= bound, "resent {} bytes over {drops} drops, bound {bound}", report.bytes_resent);
    // The same bound on what this target process really received, which a staging that
    // restarted from scratch at each drop (and so forgot its count) could not meet.
    let received =
        target.ctx.inbound().get(&ferry_wire::MigrationId::new("drops").unwrap()).unwrap().bytes_received_in_process;
    assert!(received <= total + bound, "received {received} bytes for {total}, bound {}", total + bound);
    let staging = target_dir.path().join("migrations/drops/segments");
    assert_eq!(tree_sha256(&staging).unwrap(), tree_sha256(source.path()).unwrap());
    target.stop();
}

/// Interrupts a copy about half way by aborting the source task (as a killed source would:
/// no goodbye; the target finds out when the next connection takes the migration over).
async fn half_copy(certs: &Arc<Certs>, target: &Target, root: &Path, id: &str, total: u64) {
    let mut req = request(id, root, target.addr, 64 << 10);
    req.rate_limit_bytes_per_sec = 32 << 20;
    let task = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req).await })
    };
    wait_verified(target, id, total / 2).await;
    task.abort();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_staged_chunk_is_found_and_fetched_again() {
    let certs = Arc::new(Certs::new().unwrap());
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(source.path(), "a.seg", 8 << 20, 1);
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    half_copy(&certs, &target, source.path(), "flip", 8 << 20).await;
    // Flip a byte at the start of the part file: chunk 0 was written and logged verified.
    let part = target_dir.path().join("migrations/flip/.ferry/tmp/0.part");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(&part, &bytes).unwrap();
    let log = std::fs::read(target_dir.path().join("migrations/flip/.ferry/chunks.log")).unwrap();
    let replay = checkpoint::replay(&log[..], u32::from_le_bytes(log[12..16].try_into().unwrap())).unwrap();
    assert!(replay.verified.contains_key(&(0, 0)), "chunk 0 was not logged verified before the abort");

    let mut req = request("flip", source.path(), target.addr, 64 << 10);
    req.rate_limit_bytes_per_sec = 0;
    let report = copy(&certs, req).await.unwrap();
    assert!(!report.already_staged);
    let staging = target_dir.path().join("migrations/flip/segments");
    assert_eq!(tree_sha256(&staging).unwrap(), tree_sha256(source.path()).unwrap());
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_file_changed_during_the_copy_fails_it_naming_the_file() {
    let certs = Arc::new(Certs::new().unwrap());
    let source = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(source.path(), "stable.seg", 1 << 20, 1);
    let changing = write_file(source.path(), "L1/changing.seg", 8 << 20, 2);
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("changed", source.path(), target.addr, 64 << 10);
    req.rate_limit_bytes_per_sec = 16 << 20;
    let task = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req).await })
    };
    wait_verified(&target, "changed", 2 << 20).await;
    // Rewrite part of the file in place (same size, new mtime), as a database compacting
    // into a file it should not touch would.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&changing).unwrap();
        file.write_all_at(b"changed in place", 1000).unwrap();
    }
    let err = task.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("L1/changing.seg") && text.contains("changed"), "{text}");
    target.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_sync_of_a_resumed_copy_never_trusts_a_wrong_chunk() {
    let certs = Arc::new(Certs::new().unwrap());
    let source = tempfile::tempdir().unwrap();
    for (i, size) in [3usize << 20, 1 << 20, 70_000].iter().enumerate() {
        write_file(source.path(), &format!("f{i}.seg"), *size, 10 + i as u64);
    }
    let expected = tree_sha256(source.path()).unwrap();
    let data_dir = Path::new("/data");
    let base = FakeStorage::new();
    base.create_dir_all(data_dir).unwrap();
    base.sync_dir(Path::new("/")).unwrap();
    let target = Target::start(&certs, data_dir, Arc::new(base.clone())).unwrap();
    half_copy(&certs, &target, source.path(), "crash-resume", (3 << 20) + (1 << 20) + 70_000).await;
    target.stop();
    // Power loss after the interrupted run: the resumed runs start from what was durable.
    let interrupted = base.recover();

    let mut crashes = 0;
    for n in 1..400 {
        let storage = interrupted.fork();
        storage.crash_at_sync(n);
        let target = Target::start(&certs, data_dir, Arc::new(storage.clone())).unwrap();
        let result = copy(&certs, request("crash-resume", source.path(), target.addr, 64 << 10)).await;
        target.stop();
        if !storage.has_crashed() {
            result.unwrap();
            break;
        }
        crashes += 1;
        assert!(result.is_err(), "sync {n}: a copy whose target crashed reported success");
        let recovered = storage.recover();
        // Every chunk the log would let a restart trust, once re-checked, holds the source's
        // bytes: compare against the source file itself, not only the CRC.
        let layout_root = data_dir.join("migrations/crash-resume");
        if let Ok(log) = recovered.read_all(&layout_root.join(".ferry/chunks.log")) {
            if log.len() >= 16 {
                let digest = u32::from_le_bytes(log[12..16].try_into().unwrap());
                if let Ok(replay) = checkpoint::replay(&log, digest) {
                    for (&(file, chunk), &crc) in &replay.verified {
                        let Ok(part) = recovered.read_all(&layout_root.join(format!(".ferry/tmp/{file}.part"))) else {
                            continue;
                        };
                        let source_bytes = std::fs::read(source.path().join(format!("f{file}.seg"))).unwrap();
                        let start = chunk as usize * (64 << 10);
                        let end = (start + (64 << 10)).min(source_bytes.len());
                        if let Some(staged) = part.get(start..end) {
                            if ferry_wire::crc32c(staged) == crc {
                                assert_eq!(
                                    staged,
                                    &source_bytes[start..end],
                                    "sync {n}: chunk {file}/{chunk} would be trusted but is wrong"
                                );
                            }
                        }
                    }
                }
            }
        }
        // A restarted target on what survived completes the copy, byte-identical.
        let target = Target::start(&certs, data_dir, Arc::new(recovered.clone())).unwrap();
        copy(&certs, request("crash-resume", source.path(), target.addr, 64 << 10))
            .await
            .unwrap_or_else(|e| panic!("copy after a crash at sync {n} failed: {e}"));
        target.stop();
        for rel in expected.keys() {
            let path = layout_root.join("segments").join(rel);
            let bytes = recovered.read_all(&path).unwrap_or_else(|e| panic!("sync {n}: {rel} missing: {e}"));
            assert_eq!(bytes, std::fs::read(source.path().join(rel)).unwrap(), "sync {n}: {rel} differs");
        }
    }
    assert!(crashes >= 5, "only {crashes} syncs in a resumed copy: the test does not exercise it");
}
