//! Crash consistency of the target's staged WAL (DESIGN sections 3 and 8).
//!
//! A stream of records (several source segments: without a preamble, with two different
//! preambles, and a layout change) is staged in batches on a `FakeStorage` that crashes at
//! its N-th sync, for every N up to the number of syncs a crash-free run makes. After each
//! crash the fake is recovered (only synced bytes under synced names survive), the staged WAL
//! is reopened, and the sender resumes from the durable LSN it reports. Checked, for every N:
//! - no acknowledged record is lost (reported durable LSN >= last acknowledged LSN), and the
//!   reported LSN is one that was sent (or base_lsn);
//! - after resuming, the staged folder is byte for byte the folder of the crash-free run:
//!   every record exactly once, in order, in the same segments, same manifest entries;
//! - the staged-mode cursor, and `ferry wal dump --staged` on a real-disk copy, accept it.
//!
//! Each N is run as the fake recovers it, and with a torn tail added after recovery (part of
//! the next record at the end of the last segment, as a real filesystem can leave when
//! writeback of an unsynced write was under way), which the reopen must cut; and with a
//! second crash at each of the first syncs of the recovering open itself.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_engine::storage::{FakeStorage, Storage};
use ferry_engine::wal::stage::{StageError, StageOptions, StagedRecord, StagedWal};
use ferry_engine::wal::{dump, DumpOptions};
use ferry_wire::manifest::StagedWalSegment;
use ferry_wire::wal::{
    encode_record, parse_segment_name, Cursor, CursorConfig, Layout, LayoutChoice, Mode, Preamble, RecordHeader, Step,
    PREAMBLE_LEN_BYTES,
};
use ferry_wire::{Lsn, VShardId};

const BASE_LSN: u64 = 1000;
const ROLL_BYTES: u64 = 700;

struct Rec {
    lsn: Lsn,
    bytes: Vec<u8>,
    preamble: Option<[u8; PREAMBLE_LEN_BYTES]>,
}

/// The kept records of one vShard: LSNs increasing, not dense; four source segments.
fn stream() -> Vec<Rec> {
    let mut out = Vec::new();
    let mut lsn = BASE_LSN;
    for i in 0..48u64 {
        lsn += 1 + (i * 7) % 5;
        let (layout, preamble) = match i {
            0..=11 => (Layout::A, None),
            12..=23 => (Layout::A, Some(Preamble::new(0, 2, [1, 0, 0, 0]).encode())),
            24..=35 => (Layout::A, Some(Preamble::new(0, 2, [2, 0, 0, 0]).encode())),
            _ => (Layout::B, None),
        };
        let mut header = RecordHeader::new(layout, 1 | (1 << 15), Lsn(lsn), VShardId(7));
        header.tenant_id = 3;
        let payload_len = [0usize, 1, 128, 300, 17][(i % 5) as usize];
        let payload: Vec<u8> = (0..payload_len).map(|j| (lsn as usize * 31 + j) as u8).collect();
        let mut bytes = Vec::new();
        encode_record(&header, &payload, &mut bytes).unwrap();
        out.push(Rec { lsn: Lsn(lsn), bytes, preamble });
    }
    out
}

/// Batch sizes cycle through 1..=5 records.
fn batches(recs: &[Rec]) -> Vec<&[Rec]> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < recs.len() {
        let n = (k % 5 + 1).min(recs.len() - at);
        out.push(&recs[at..at + n]);
        at += n;
        k += 1;
    }
    out
}

fn staged(recs: &[Rec]) -> Vec<StagedRecord<'_>> {
    recs.iter().map(|r| StagedRecord { lsn: r.lsn, bytes: &r.bytes, source_preamble: r.preamble }).collect()
}

fn wal_dir() -> PathBuf {
    PathBuf::from("/data/migrations/m1/wal")
}

/// A fake disk with the staging root already durable (staging's job, not the WAL's).
fn fresh_disk() -> FakeStorage {
    let fs = FakeStorage::new();
    fs.create_dir_all(Path::new("/data/migrations/m1")).unwrap();
    for d in ["/", "/data", "/data/migrations", "/data/migrations/m1"] {
        fs.sync_dir(Path::new(d)).unwrap();
    }
    fs
}

/// Opens the staged WAL with `prealloc` bytes of zeros kept ahead of the open segment's
/// records (0: none; capped by the roll size).
fn open(fs: &FakeStorage, prealloc: u64) -> Result<(StagedWal, ferry_engine::wal::stage::OpenReport), StageError> {
    let storage: Arc<dyn Storage> = Arc::new(fs.clone());
    let options = StageOptions { base_lsn: Lsn(BASE_LSN), roll_size_bytes: ROLL_BYTES, preallocate_bytes: prealloc };
    StagedWal::open(storage, &wal_dir(), options)
}

/// Stages `recs` in batches; returns the last acknowledged durable LSN and whether a call
/// failed (then the fake has crashed).
fn stage_all(wal: &mut StagedWal, recs: &[Rec]) -> (Option<Lsn>, bool) {
    let mut acked = None;
    for b in batches(recs) {
        match wal.append_batch(&staged(b)) {
            Ok(lsn) => {
                assert_eq!(lsn, b.last().unwrap().lsn);
                acked = Some(lsn);
            }
            Err(StageError::Io { .. }) => return (acked, true),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (acked, false)
}

/// The staged folder's files: (name, bytes), in name order.
fn files(fs: &FakeStorage) -> Vec<(String, Vec<u8>)> {
    fs.list_dir(&wal_dir())
        .unwrap()
        .into_iter()
        .map(|name| {
            let bytes = fs.read_all(&wal_dir().join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

/// Reads the folder with the staged-mode cursor: every record's LSN and bytes.
fn read_staged(files: &[(String, Vec<u8>)]) -> Vec<(Lsn, Vec<u8>)> {
    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut cursor = Cursor::new(config, None).unwrap();
    let mut out = Vec::new();
    for (i, (name, bytes)) in files.iter().enumerate() {
        cursor.open_segment(parse_segment_name(name).unwrap()).unwrap();
        let sealed = i + 1 < files.len();
        loop {
            match cursor.poll(bytes, sealed).unwrap() {
                Step::Record(r) => out.push((r.header.lsn, bytes[r.record_range()].to_vec())),
                Step::Wait { offset_bytes } => {
                    assert_eq!(offset_bytes, bytes.len() as u64, "{name} has bytes after its last record");
                    break;
                }
                Step::EndOfSegment { .. } => break,
            }
        }
    }
    out
}

/// `ferry wal dump --staged` on a real-disk copy of the folder.
fn dump_copy(files: &[(String, Vec<u8>)]) -> (u64, Option<Lsn>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let opts = DumpOptions { dir: dir.path().to_path_buf(), vshard: None, from_lsn: None, staged: true, json: true };
    let mut out = Vec::new();
    let summary = dump(&opts, &mut out).unwrap();
    (summary.records_read_count, summary.last_lsn)
}

struct Reference {
    files: Vec<(String, Vec<u8>)>,
    entries: Vec<StagedWalSegment>,
    syncs_count: u64,
}

fn reference(recs: &[Rec], prealloc: u64) -> Reference {
    let fs = fresh_disk();
    let before = fs.syncs_count();
    let (mut wal, report) = open(&fs, prealloc).unwrap();
    assert_eq!(report.durable_lsn, Lsn(BASE_LSN));
    let (acked, failed) = stage_all(&mut wal, recs);
    assert!(!failed);
    assert_eq!(acked, Some(recs.last().unwrap().lsn));
    let syncs_count = fs.syncs_count() - before;
    // As before a release: the open segment's preallocated zeros cut.
    wal.trim().unwrap();
    Reference { files: files(&fs), entries: wal.segments(), syncs_count }
}

/// Crashes at sync `n` while staging; optionally adds a torn tail after recovery, and
/// optionally crashes again at sync `reopen_crash` of the recovering open.
fn run_crash_at(recs: &[Rec], reference: &Reference, n: u64, torn: bool, reopen_crash: Option<u64>, prealloc: u64) {
    let fs = fresh_disk();
    fs.crash_at_sync(n);
    let mut acked = None;
    match open(&fs, prealloc) {
        Ok((mut wal, _)) => {
            let (a, failed) = stage_all(&mut wal, recs);
            assert!(failed, "crash at sync {n} of {} did not happen", reference.syncs_count);
            acked = a;
        }
        Err(StageError::Io { .. }) => {}
        Err(e) => panic!("open: {e}"),
    }
    assert!(fs.has_crashed());
    let mut recovered = fs.recover();
    let mut torn_bytes = 0;
    if torn {
        // Part of the next record at the end of the last segment.
        if let Some(last) = recovered.list_dir(&wal_dir()).ok().and_then(|names| names.last().cloned()) {
            let path = wal_dir().join(&last);
            let file = recovered.open_rw(&path).unwrap();
            let len = file.len_bytes().unwrap();
            let next = &recs.last().unwrap().bytes;
            torn_bytes = (n as usize * 13 % (next.len() - 1)).max(1);
            file.write_at(&next[..torn_bytes], len).unwrap();
        }
    }
    let mut crashed_again = false;
    if let Some(m) = reopen_crash {
        recovered.crash_at_sync(m);
        match open(&recovered, prealloc) {
            // The open made fewer than m syncs: lose power after it instead (which also
            // disarms the crash).
            Ok(_) => recovered = recovered.recover(),
            Err(StageError::Io { .. }) => {
                recovered = recovered.recover();
                crashed_again = true;
            }
            Err(e) => panic!("crash at sync {n}, reopen crash at {m}: {e}"),
        }
    }
    let (mut wal, report) = open(&recovered, prealloc).unwrap();
    let durable = report.durable_lsn;
    if let Some(acked) = acked {
        assert!(durable >= acked, "crash at sync {n}: acknowledged LSN {acked} lost (durable {durable})");
    }
    assert!(durable == Lsn(BASE_LSN) || recs.iter().any(|r| r.lsn == durable), "durable LSN {durable} was never sent");
    if torn && torn_bytes > 0 && reopen_crash.is_none() {
        assert_eq!(report.truncated_bytes, torn_bytes as u64, "crash at sync {n}: torn tail not cut");
    }
    if !crashed_again {
        assert!(reopen_crash.is_none() || report.truncated_bytes == 0);
    }
    // The sender resumes from the durable LSN.
    let rest: Vec<&Rec> = recs.iter().filter(|r| r.lsn > durable).collect();
    let rest: Vec<Rec> =
        rest.into_iter().map(|r| Rec { lsn: r.lsn, bytes: r.bytes.clone(), preamble: r.preamble }).collect();
    let (_, failed) = stage_all(&mut wal, &rest);
    assert!(!failed);
    assert_eq!(wal.durable_lsn(), recs.last().unwrap().lsn);
    wal.trim().unwrap();
    let got = files(&recovered);
    let read = read_staged(&got);
    let expected: Vec<(Lsn, Vec<u8>)> = recs.iter().map(|r| (r.lsn, r.bytes.clone())).collect();
    assert_eq!(read.len(), expected.len(), "crash at sync {n}: record count");
    assert!(read == expected, "crash at sync {n} (torn {torn}): records differ from what was sent");
    assert!(got == reference.files, "crash at sync {n} (torn {torn}): folder differs from the crash-free run");
    assert_eq!(wal.segments(), reference.entries);
    assert_eq!(dump_copy(&got), (recs.len() as u64, Some(recs.last().unwrap().lsn)));
}

#[test]
fn the_crash_free_run_has_several_segments_and_preambles() {
    let recs = stream();
    let r = reference(&recs, 0);
    assert!(r.entries.len() >= 6, "{:?}", r.entries);
    let key_ids: Vec<Option<u8>> = r.entries.iter().map(|e| e.key_id).collect();
    assert!(key_ids.contains(&None) && key_ids.contains(&Some(2)));
    assert!(r.entries.iter().any(|e| e.layout == "A") && r.entries.iter().any(|e| e.layout == "B"));
    assert_eq!(read_staged(&r.files).len(), recs.len());
    // Segment k > 0 is named after the last LSN of segment k - 1 plus one.
    for pair in r.entries.windows(2) {
        assert_eq!(parse_segment_name(&pair[1].name), Some(Lsn(pair[0].last_lsn.0 + 1)));
    }
}

#[test]
fn a_crash_at_every_sync_loses_nothing_acknowledged_and_resumes_exactly() {
    let recs = stream();
    let reference = reference(&recs, 0);
    assert!(reference.syncs_count > 20, "{}", reference.syncs_count);
    for n in 1..=reference.syncs_count {
        run_crash_at(&recs, &reference, n, false, None, 0);
    }
}

#[test]
fn with_preallocated_segments_a_crash_at_every_sync_loses_nothing_and_resumes_exactly() {
    let recs = stream();
    // Zeros are kept up to the roll size ahead of the records: every segment is extended.
    let reference = reference(&recs, ROLL_BYTES);
    assert_eq!(reference.files, self::reference(&recs, 0).files, "trimmed, the folder is the one without zeros");
    for n in 1..=reference.syncs_count {
        run_crash_at(&recs, &reference, n, false, None, ROLL_BYTES);
        run_crash_at(&recs, &reference, n, false, Some(1), ROLL_BYTES);
    }
}

#[test]
fn a_crash_at_every_sync_with_a_torn_tail_is_cut_and_resumed() {
    let recs = stream();
    let reference = reference(&recs, 0);
    for n in 1..=reference.syncs_count {
        run_crash_at(&recs, &reference, n, true, None, 0);
    }
}

#[test]
fn a_second_crash_while_recovering_is_recovered_too() {
    let recs = stream();
    let reference = reference(&recs, 0);
    for n in 1..=reference.syncs_count {
        for m in 1..=4 {
            run_crash_at(&recs, &reference, n, true, Some(m), 0);
        }
    }
}
