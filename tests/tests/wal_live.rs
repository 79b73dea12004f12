//! WAL catch-up alongside the base copy: while a writer appends (several vShards interleaved,
//! payloads of 0, 1, 128 bytes and 1 MiB, encrypted-flag and unknown-kind records, rollovers
//! and O_DIRECT-style flushes, both layouts), exactly the migrating vShard's records in
//! (base_lsn, tip] are staged, in order, once, byte-identical; and the database truncating its
//! WAL during the copy loses nothing.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::walsend::{WalSourceConfig, POLL_INTERVAL};
use ferry_refnode::walwrite::{FlushStyle, Leftovers, PreambleOptions, RecordSpec, WalWriter, WriterOptions};
use ferry_tests::{copy, request, staged_wal_records, tree_sha256, wait_until, write_file, Certs, Target};
use ferry_wire::manifest::{StagingManifest, StagingState};
use ferry_wire::wal::{Layout, LayoutChoice};
use ferry_wire::{Lsn, VShardId};

const VSHARD: u32 = 7;

/// What the writer wrote: (lsn, vshard, record_type, payload).
type Written = Vec<(Lsn, u32, u32, Vec<u8>)>;

fn payload(i: u64) -> Vec<u8> {
    let len = match i % 7 {
        0 => 0,
        1 => 1,
        6 if i % 50 == 6 => 1 << 20,
        _ => 128,
    };
    (0..len).map(|b| (b as u64 ^ i.wrapping_mul(31)) as u8).collect()
}

fn append(writer: &mut WalWriter, i: u64, out: &mut Written) {
    let vshard = if i.is_multiple_of(3) { VSHARD } else { (i % 5) as u32 + 20 };
    // Some records carry the encrypted flag (bit 14) or an unknown kind: passed through opaque.
    let record_type = match i % 11 {
        0 => 0x8000 | 0x4000 | 3,
        1 => 0x0123,
        _ => 0x8000 | 1,
    };
    let data = payload(i);
    let lsn = writer.append(&RecordSpec::new(record_type, VShardId(vshard)), &data).unwrap();
    out.push((lsn, vshard, record_type, data));
    if i.is_multiple_of(4) {
        writer.flush().unwrap();
    }
}

/// Waits (30 s at most) until ferry holds links to WAL segments in `held`.
fn wait_for_hold(held: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(held).is_ok_and(|mut d| d.next().is_some()) {
        assert!(std::time::Instant::now() < deadline, "ferry never held the WAL in {}", held.display());
        // Polling a folder the copy task fills, not a timed assertion.
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn live_copy(layout: Layout, preamble: bool, truncate: bool, drops: usize) {
    let certs = Arc::new(Certs::new().unwrap());
    let root = tempfile::tempdir().unwrap();
    let wal_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(root.path(), "L1/base.seg", 24 << 20, 5);
    let options = WriterOptions {
        layout,
        roll_size_bytes: 256 << 10,
        flush: FlushStyle::Direct,
        leftovers: Leftovers::Stale,
        preamble: preamble.then_some(PreambleOptions { cipher_alg: 1, key_id: 9, epoch_start: 100 }),
        ..WriterOptions::default()
    };
    let mut writer = WalWriter::create(wal_dir.path(), options, Lsn(1)).unwrap();
    let mut written = Written::new();
    for i in 0..300 {
        append(&mut writer, i, &mut written);
    }
    writer.flush().unwrap();
    let base_lsn = written.last().unwrap().0;
    let more = 1500u64;
    let tip = Lsn(base_lsn.0 + more);

    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("live", root.path(), target.addr, 256 << 10);
    req.base_lsn = base_lsn;
    req.vshard_id = VShardId(VSHARD);
    req.rate_limit_bytes_per_sec = 24 << 20; // about a second of base copy, with the writer running
    req.wal = Some(WalSourceConfig {
        dir: wal_dir.path().to_path_buf(),
        layout: LayoutChoice::Auto,
        alignment_bytes: 4096,
        until_lsn: Some(tip),
        max_held_wal_bytes: 1 << 30,
        poll_interval: POLL_INTERVAL,
    });
    let copy_task = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req).await })
    };
    let wal_path = wal_dir.path().to_path_buf();
    let writer_task = tokio::task::spawn_blocking(move || {
        for i in 300..300 + more {
            append(&mut writer, i, &mut written);
            if i % 100 == 0 {
                // The simulated write rate, not a wait.
                std::thread::sleep(Duration::from_millis(20));
                if truncate {
                    // The database drops segments it considers old, as it may during a long
                    // base copy: all but the newest two. It does so once ferry holds the WAL
                    // from the base on (before that, a truncation past the base fails the
                    // migration, as it should, and on a loaded machine the copy may not have
                    // started yet).
                    wait_for_hold(&wal_path.join(".ferry-held/live"));
                    let mut names: Vec<_> = std::fs::read_dir(&wal_path)
                        .unwrap()
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("wal-"))
                        .collect();
                    names.sort();
                    names.truncate(names.len().saturating_sub(2));
                    for name in names {
                        std::fs::remove_file(wal_path.join(name)).unwrap();
                    }
                }
            }
        }
        writer.flush().unwrap();
        written
    });
    // Cut the connection now and then: the base resumes from its chunk log, the WAL from the
    // staged WAL's durable LSN.
    let mut dropped = 0;
    while dropped < drops && !copy_task.is_finished() {
        // The fault schedule (a cut every 120 ms, wherever the copy is), not a wait.
        tokio::time::sleep(Duration::from_millis(120)).await;
        if target.ctx.drop_connections() > 0 {
            dropped += 1;
        }
    }
    let written = writer_task.await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(120), copy_task).await.expect("copy hung").unwrap().unwrap();
    assert_eq!(report.final_lsn, tip);
    assert!(report.reconnects_count as usize >= dropped, "{} reconnects for {dropped} drops", report.reconnects_count);
    if drops > 0 {
        assert!(dropped >= 2, "only {dropped} drops happened");
    }
    target.stop();

    let staging = target_dir.path().join("migrations/live");
    assert_eq!(tree_sha256(&staging.join("segments")).unwrap(), tree_sha256(root.path()).unwrap());
    let expected: Vec<_> =
        written.into_iter().filter(|(lsn, vshard, _, _)| *vshard == VSHARD && *lsn > base_lsn && *lsn <= tip).collect();
    let staged = staged_wal_records(&staging.join("wal"));
    assert_eq!(staged.len(), expected.len(), "record count");
    for (s, e) in staged.iter().zip(&expected) {
        assert_eq!(s.0, e.0);
        assert_eq!((s.1, s.2), (e.1, e.2), "lsn {}", e.0);
        assert!(s.3 == e.3, "payload of lsn {} differs", e.0);
    }
    let manifest = StagingManifest::decode(&std::fs::read(staging.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest.state, StagingState::Released);
    assert_eq!(manifest.final_lsn, Some(tip));
    assert_eq!(manifest.wal_segments.last().unwrap().last_lsn, expected.last().unwrap().0);
    if preamble {
        // Each staged segment starts with its source segment's preamble, whose epoch changes
        // at every roll: the records of several source segments make several staged ones.
        assert!(manifest.wal_segments.len() > 1, "expected several staged segments");
        assert!(manifest.wal_segments.iter().all(|s| s.key_id == Some(9)));
    }
    // The held links are released once the migration is over.
    assert!(!wal_dir.path().join(".ferry-held/live").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_a_with_leftovers_streams_exactly_the_vshard() {
    live_copy(Layout::A, false, false, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_b_with_padding_and_preambles_streams_exactly_the_vshard() {
    live_copy(Layout::B, true, false, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_truncating_its_wal_during_the_copy_loses_nothing() {
    live_copy(Layout::A, false, true, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_during_catch_up_lose_and_duplicate_nothing() {
    live_copy(Layout::B, true, false, 6).await;
}

/// The whole tail is written before the copy starts, so the tail has far to go; once ferry
/// holds its links, the database deletes every segment but the active one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_deleted_before_the_tail_reads_them_are_still_streamed() {
    let certs = Arc::new(Certs::new().unwrap());
    let root = tempfile::tempdir().unwrap();
    let wal_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(root.path(), "base.seg", 8 << 20, 6);
    let options = WriterOptions { layout: Layout::A, roll_size_bytes: 128 << 10, ..WriterOptions::default() };
    let mut writer = WalWriter::create(wal_dir.path(), options, Lsn(1)).unwrap();
    let mut written = Written::new();
    for i in 0..50 {
        append(&mut writer, i, &mut written);
    }
    writer.flush().unwrap();
    let base_lsn = written.last().unwrap().0;
    for i in 50..3000 {
        append(&mut writer, i, &mut written);
    }
    writer.flush().unwrap();
    let tip = written.last().unwrap().0;
    let segments_count = std::fs::read_dir(wal_dir.path()).unwrap().count();
    assert!(segments_count > 20, "{segments_count} segments");

    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("truncated", root.path(), target.addr, 256 << 10);
    req.base_lsn = base_lsn;
    req.vshard_id = VShardId(VSHARD);
    req.wal = Some(WalSourceConfig {
        dir: wal_dir.path().to_path_buf(),
        layout: LayoutChoice::Fixed(Layout::A),
        alignment_bytes: 4096,
        until_lsn: Some(tip),
        max_held_wal_bytes: 1 << 30,
        poll_interval: POLL_INTERVAL,
    });
    let copy_task = {
        let certs = certs.clone();
        tokio::spawn(async move { copy(&certs, req).await })
    };
    let held = wal_dir.path().join(".ferry-held/truncated");
    let holding = || std::fs::read_dir(&held).map(|d| d.count()).unwrap_or(0) > 0;
    wait_until("the copy to hold WAL segments", Duration::from_secs(60), holding).await.unwrap();
    let mut names: Vec<_> = std::fs::read_dir(wal_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wal-"))
        .collect();
    names.sort();
    names.pop();
    for name in names {
        std::fs::remove_file(wal_dir.path().join(name)).unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(120), copy_task).await.expect("copy hung").unwrap().unwrap();
    assert_eq!(report.final_lsn, tip);
    target.stop();
    let expected: Vec<_> =
        written.into_iter().filter(|(lsn, vshard, _, _)| *vshard == VSHARD && *lsn > base_lsn).collect();
    let staged = staged_wal_records(&target_dir.path().join("migrations/truncated/wal"));
    assert_eq!(staged.len(), expected.len());
    assert!(staged.iter().zip(&expected).all(|(s, e)| s.0 == e.0 && s.3 == e.3));
}

/// A flipped bit in a sealed source segment stops the copy with an error naming the segment
/// file and the byte offset, instead of streaming around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_the_source_wal_fails_the_copy_naming_file_and_offset() {
    let certs = Arc::new(Certs::new().unwrap());
    let root = tempfile::tempdir().unwrap();
    let wal_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    write_file(root.path(), "base.seg", 4 << 20, 8);
    let options = WriterOptions {
        layout: Layout::A,
        roll_size_bytes: 64 << 10,
        flush: FlushStyle::Buffered,
        ..WriterOptions::default()
    };
    let mut writer = WalWriter::create(wal_dir.path(), options, Lsn(1)).unwrap();
    let mut written = Written::new();
    for i in 0..2000 {
        let spec = RecordSpec::new(0x8001, VShardId(if i % 2 == 0 { VSHARD } else { 3 }));
        let lsn = writer.append(&spec, &[i as u8; 100]).unwrap();
        written.push((lsn, 0, 0, Vec::new()));
    }
    writer.flush().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(wal_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() > 4);
    let victim = wal_dir.path().join(&names[2]);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();

    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();
    let mut req = request("corrupt", root.path(), target.addr, 256 << 10);
    req.base_lsn = Lsn(10);
    req.vshard_id = VShardId(VSHARD);
    req.wal = Some(WalSourceConfig {
        dir: wal_dir.path().to_path_buf(),
        layout: LayoutChoice::Auto,
        alignment_bytes: 4096,
        until_lsn: Some(written.last().unwrap().0),
        max_held_wal_bytes: 1 << 30,
        poll_interval: POLL_INTERVAL,
    });
    let err = tokio::time::timeout(Duration::from_secs(60), copy(&certs, req)).await.expect("copy hung").unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&names[2]) && text.contains("corrupt at byte"), "{text}");
    // Nothing was released.
    assert!(
        !target_dir.path().join("migrations/corrupt/MANIFEST.json").exists()
            || !std::fs::read_to_string(target_dir.path().join("migrations/corrupt/MANIFEST.json"))
                .unwrap()
                .contains("released")
    );
    target.stop();
}
