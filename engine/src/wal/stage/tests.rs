//! Unit tests of the staged WAL: placement, manifest entries, refusals, recovery, syncs.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::storage::FakeStorage;
use ferry_wire::wal::{
    encode_record, parse_segment_name, segment_name, Cursor, CursorConfig, LayoutChoice, Mode, Placement, RecordHeader,
    StagedPlan, Step, SEGMENT_LEN_MAX_BYTES,
};
use ferry_wire::{crc32c, VShardId};

fn record(layout: Layout, lsn: u64, payload_len: usize) -> Vec<u8> {
    let header = RecordHeader::new(layout, 1, Lsn(lsn), VShardId(7));
    let payload: Vec<u8> = (0..payload_len).map(|i| (lsn as usize + i) as u8).collect();
    let mut out = Vec::new();
    encode_record(&header, &payload, &mut out).unwrap();
    out
}

fn preamble(epoch: u8) -> [u8; PREAMBLE_LEN_BYTES] {
    Preamble::new(0, 3, [epoch, 0, 0, 0]).encode()
}

fn fake() -> (FakeStorage, Arc<dyn Storage>, PathBuf) {
    let fs = FakeStorage::new();
    fs.create_dir_all(Path::new("/s")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(fs.clone());
    (fs, storage, PathBuf::from("/s/wal"))
}

fn options(base: u64, roll: u64) -> StageOptions {
    StageOptions { base_lsn: Lsn(base), roll_size_bytes: roll, preallocate_bytes: 0 }
}

/// A test record: LSN, bytes, source preamble.
type Rec = (u64, Vec<u8>, Option<[u8; 16]>);

fn batch(recs: &[Rec]) -> Vec<StagedRecord<'_>> {
    recs.iter().map(|(lsn, bytes, p)| StagedRecord { lsn: Lsn(*lsn), bytes, source_preamble: *p }).collect()
}

/// Every record of a staged folder, read back with the staged cursor: (segment, lsn, bytes).
fn read_staged(storage: &dyn Storage, dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut names: Vec<_> =
        storage.list_dir(dir).unwrap().into_iter().filter_map(|n| parse_segment_name(&n).map(|l| (l, n))).collect();
    names.sort();
    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Staged };
    let mut cursor = Cursor::new(config, None).unwrap();
    let mut out = Vec::new();
    for (i, (lsn, name)) in names.iter().enumerate() {
        let bytes = storage.read_all(&dir.join(name)).unwrap();
        cursor.open_segment(*lsn).unwrap();
        let sealed = i + 1 < names.len();
        loop {
            match cursor.poll(&bytes, sealed).unwrap() {
                Step::Record(r) => out.push((name.clone(), r.header.lsn.0, bytes[r.record_range()].to_vec())),
                Step::Wait { offset_bytes } => {
                    assert_eq!(offset_bytes, bytes.len() as u64, "bytes after the last record of {name}");
                    break;
                }
                Step::EndOfSegment { .. } => break,
            }
        }
    }
    out
}

#[test]
fn segments_roll_split_on_preamble_and_layout_and_are_named_after_the_last_lsn() {
    let (_fs, storage, dir) = fake();
    let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(100, 300)).unwrap();
    assert_eq!(report, OpenReport { durable_lsn: Lsn(100), ..OpenReport::default() });
    let p1 = Some(preamble(1));
    let p2 = Some(preamble(2));
    let recs = vec![
        (103, record(Layout::A, 103, 10), p1),
        (105, record(Layout::A, 105, 10), p1),
        (110, record(Layout::A, 110, 10), p2),  // new preamble: wal-106
        (111, record(Layout::B, 111, 10), p2),  // new layout: wal-111
        (120, record(Layout::B, 120, 400), p2), // over the roll: wal-112, alone
        (121, record(Layout::B, 121, 0), None), // preamble gone: wal-121
        (122, record(Layout::B, 122, 0), None),
    ];
    assert_eq!(wal.append_batch(&batch(&recs)).unwrap(), Lsn(122));
    let names: Vec<String> = wal.segments().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, [103, 106, 111, 112, 121].map(|l| segment_name(Lsn(l))));
    let read = read_staged(storage.as_ref(), &dir);
    let expected: Vec<(u64, Vec<u8>)> = recs.iter().map(|(l, b, _)| (*l, b.clone())).collect();
    assert_eq!(read.iter().map(|(_, l, b)| (*l, b.clone())).collect::<Vec<_>>(), expected);
    // Each segment opens with its records' source preamble, then holds them back to back.
    let seg0 = storage.read_all(&dir.join(segment_name(Lsn(103)))).unwrap();
    assert_eq!(&seg0[..16], &preamble(1));
    assert_eq!(seg0.len(), 16 + recs[0].1.len() + recs[1].1.len());
    let seg4 = storage.read_all(&dir.join(segment_name(Lsn(121)))).unwrap();
    assert_eq!(seg4, [recs[5].1.clone(), recs[6].1.clone()].concat());
}

#[test]
fn manifest_entries_describe_the_files() {
    let (_fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 200)).unwrap();
    let p = Some(preamble(9));
    let recs: Vec<_> = (1..=9).map(|l| (l * 2, record(Layout::B, l * 2, 40), p)).collect();
    for chunk in recs.chunks(2) {
        wal.append_batch(&batch(chunk)).unwrap();
    }
    let entries = wal.segments();
    assert!(entries.len() > 2);
    let mut lsns = Vec::new();
    for e in &entries {
        let bytes = storage.read_all(&dir.join(&e.name)).unwrap();
        assert_eq!((e.size_bytes, e.crc32c), (bytes.len() as u64, crc32c(&bytes)), "{}", e.name);
        assert_eq!((e.layout.as_str(), e.key_id), ("B", Some(3)));
        assert!(e.first_lsn <= e.last_lsn);
        lsns.push((e.first_lsn.0, e.last_lsn.0));
    }
    assert_eq!(lsns.first().unwrap().0, 2);
    assert_eq!(lsns.last().unwrap().1, 18);
    // Reopening computes the same entries from the files.
    drop(wal);
    let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 200)).unwrap();
    assert_eq!(wal.segments(), entries);
    assert_eq!((report.durable_lsn, report.records_count), (Lsn(18), 9));
}

#[test]
fn stale_and_bad_records_are_refused_and_leave_the_wal_usable() {
    let (_fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(10, 1 << 20)).unwrap();
    let r11 = record(Layout::A, 11, 5);
    wal.append_batch(&batch(&[(11, r11.clone(), None)])).unwrap();
    // At or below the durable LSN, even byte-identical: refused.
    let err = wal.append_batch(&batch(&[(11, r11.clone(), None)])).unwrap_err();
    assert!(matches!(err, StageError::NotAboveDurable { lsn: Lsn(11), durable: Lsn(11) }), "{err}");
    let r12 = record(Layout::A, 12, 5);
    let r14 = record(Layout::A, 14, 5);
    let err = wal.append_batch(&batch(&[(14, r14.clone(), None), (12, r12.clone(), None)])).unwrap_err();
    assert!(matches!(err, StageError::NotIncreasing { lsn: Lsn(12), previous: Lsn(14) }), "{err}");
    let err = wal.append_batch(&batch(&[(13, r12.clone(), None)])).unwrap_err();
    assert!(matches!(err, StageError::LsnMismatch { lsn: Lsn(13), found: Lsn(12) }), "{err}");
    let mut flipped = r12.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let err = wal.append_batch(&batch(&[(12, flipped, None)])).unwrap_err();
    assert!(matches!(err, StageError::BadRecord { lsn: Lsn(12), .. }), "{err}");
    let mut long = r12.clone();
    long.push(0);
    let err = wal.append_batch(&batch(&[(12, long, None)])).unwrap_err();
    assert!(matches!(err, StageError::RecordLength { .. }), "{err}");
    let err = wal.append_batch(&batch(&[(12, r12.clone(), Some([0; 16]))])).unwrap_err();
    assert!(matches!(err, StageError::BadPreamble { .. }), "{err}");
    // A refused batch wrote nothing: the good records follow on.
    assert_eq!(wal.append_batch(&[]).unwrap(), Lsn(11));
    assert_eq!(wal.append_batch(&batch(&[(12, r12.clone(), None), (14, r14.clone(), None)])).unwrap(), Lsn(14));
    let read: Vec<u64> = read_staged(storage.as_ref(), &dir).iter().map(|(_, l, _)| *l).collect();
    assert_eq!(read, [11, 12, 14]);
    // Records at or below base_lsn are refused too.
    let (mut fresh, _) = StagedWal::open(Arc::clone(&storage), Path::new("/s/wal2"), options(11, 100)).unwrap();
    assert!(matches!(fresh.append_batch(&batch(&[(11, r11, None)])), Err(StageError::NotAboveDurable { .. })));
}

#[test]
fn torn_tails_and_later_segments_are_cut_on_open() {
    let (_fs, storage, dir) = fake();
    // Records of 84 bytes: two per segment.
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
    let recs: Vec<_> = (1..=6).map(|l| (l, record(Layout::A, l, 30), None)).collect();
    wal.append_batch(&batch(&recs)).unwrap();
    let before = wal.segments();
    assert_eq!(before.len(), 3);
    drop(wal);
    // A half-written record at the end of the last segment.
    let last = dir.join(&before[2].name);
    let half = record(Layout::A, 7, 30);
    storage.open_rw(&last).unwrap().write_at(&half[..40], before[2].size_bytes).unwrap();
    let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
    assert_eq!((report.durable_lsn, report.truncated_bytes), (Lsn(6), 40));
    assert_eq!(wal.segments(), before);
    drop(wal);
    // Garbage in the middle segment, and a later segment that was being written with it:
    // the valid prefix stops at the garbage, the later segment goes.
    let mid = dir.join(&before[1].name);
    storage.open_rw(&mid).unwrap().write_at(&[0xAB; 10], before[1].size_bytes).unwrap();
    let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
    assert_eq!(report.durable_lsn, before[1].last_lsn);
    assert_eq!(report.truncated_bytes, 10);
    assert_eq!(report.removed_segments, vec![before[2].name.clone()]);
    assert_eq!(wal.segments(), before[..2].to_vec());
    // A later segment not named after the last LSN before it plus one (the rest of the
    // batch that filled it was lost) goes too.
    drop(wal);
    let misnamed = segment_name(Lsn(before[1].last_lsn.0 + 2));
    let r = record(Layout::A, before[1].last_lsn.0 + 2, 30);
    storage.open_rw(&dir.join(&misnamed)).unwrap().write_at(&r, 0).unwrap();
    let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 170)).unwrap();
    assert_eq!((report.durable_lsn, report.truncated_bytes), (before[1].last_lsn, 0));
    assert_eq!(report.removed_segments, vec![misnamed]);
    // Resuming from the reported LSN restores the same folder.
    let resume = report.durable_lsn.0 as usize;
    wal.append_batch(&batch(&recs[resume..])).unwrap();
    assert_eq!(wal.segments(), before);
    let read: Vec<u64> = read_staged(storage.as_ref(), &dir).iter().map(|(_, l, _)| *l).collect();
    assert_eq!(read, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn preamble_only_segments_are_removed_and_a_wrong_base_is_refused() {
    let (_fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
    wal.append_batch(&batch(&[(5, record(Layout::B, 5, 1), None)])).unwrap();
    drop(wal);
    let stray = dir.join(segment_name(Lsn(6)));
    storage.open_rw(&stray).unwrap().write_at(&preamble(4), 0).unwrap();
    let (wal, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
    assert_eq!(report.removed_segments, vec![segment_name(Lsn(6))]);
    assert_eq!(wal.durable_lsn(), Lsn(5));
    assert!(!storage.exists(&stray));
    drop(wal);
    let err = StagedWal::open(Arc::clone(&storage), &dir, options(5, 1000)).unwrap_err();
    assert!(matches!(err, StageError::BelowBase { first_lsn: Lsn(5), base_lsn: Lsn(5) }), "{err}");
    assert!(matches!(StagedWal::open(Arc::clone(&storage), &dir, options(0, 0)), Err(StageError::Misuse(_))));
    let too_large = options(0, SEGMENT_LEN_MAX_BYTES + 1);
    assert!(matches!(StagedWal::open(storage, &dir, too_large), Err(StageError::Misuse(_))));
}

/// A process that died after writing a batch but before syncing it leaves the bytes in
/// the page cache; the reopen reads them back and must make them durable before it
/// reports them.
#[test]
fn open_makes_what_it_reports_durable() {
    let (fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
    let r1 = record(Layout::A, 1, 3);
    wal.append_batch(&batch(&[(1, r1.clone(), None)])).unwrap();
    drop(wal);
    let r2 = record(Layout::A, 2, 3);
    storage.open_rw(&dir.join(segment_name(Lsn(1)))).unwrap().write_at(&r2, r1.len() as u64).unwrap();
    let (_, report) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
    assert_eq!(report.durable_lsn, Lsn(2));
    let after_power_loss: Arc<dyn Storage> = Arc::new(fs.recover());
    let (wal, _) = StagedWal::open(after_power_loss, &dir, options(0, 1000)).unwrap();
    assert_eq!(wal.durable_lsn(), Lsn(2));
}

#[test]
fn a_failed_sync_fails_the_wal_for_good() {
    let (fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 1000)).unwrap();
    fs.crash_at_sync(1);
    let err = wal.append_batch(&batch(&[(1, record(Layout::A, 1, 3), None)])).unwrap_err();
    assert!(matches!(err, StageError::Io { op: "sync", .. }), "{err}");
    let err = wal.append_batch(&batch(&[(2, record(Layout::A, 2, 3), None)])).unwrap_err();
    assert!(matches!(err, StageError::Failed), "{err}");
}

#[test]
fn one_sync_per_file_and_one_folder_sync_per_created_segment() {
    let (fs, storage, dir) = fake();
    // Records of 74 bytes: three fit in 230.
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, 230)).unwrap();
    let recs: Vec<_> = (1..=4).map(|l| (l, record(Layout::A, l, 20), None)).collect();
    let before = fs.syncs_count();
    wal.append_batch(&batch(&recs[..1])).unwrap(); // creates wal-1: data + folder
    assert_eq!(fs.syncs_count() - before, 2);
    let before = fs.syncs_count();
    wal.append_batch(&batch(&recs[1..2])).unwrap(); // appends: data only
    assert_eq!(fs.syncs_count() - before, 1);
    let before = fs.syncs_count();
    wal.append_batch(&batch(&recs[2..])).unwrap(); // fills wal-1, starts wal-4: 2 files + folder
    assert_eq!(wal.segments().len(), 2);
    assert_eq!(fs.syncs_count() - before, 3);
}

/// A tiny deterministic generator (no dev-dependency needed).
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

/// With one layout, the plan here and `StagedPlan` agree on every placement.
#[test]
fn the_plan_agrees_with_staged_plan_when_the_layout_is_fixed() {
    for round in 0..40u64 {
        let mut seed = round;
        let roll = 100 + next(&mut seed) % 900;
        let (_fs, storage, dir) = fake();
        let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(0, roll)).unwrap();
        let mut plan = StagedPlan::new(roll);
        let mut lsn = 0;
        for _ in 0..30 {
            lsn += 1 + next(&mut seed) % 5;
            let bytes = record(Layout::B, lsn, (next(&mut seed) % 300) as usize);
            let epoch = (next(&mut seed) % 3) as u8;
            let pre = (epoch > 0).then(|| preamble(epoch));
            let expected = plan.place(Lsn(lsn), bytes.len() as u64, pre.map(|p| Preamble::decode(&p).unwrap()));
            let got = wal.place(Lsn(lsn), bytes.len() as u64, pre, Layout::B);
            match (expected.unwrap(), got) {
                (Placement::Append, Place::Append) => {}
                (Placement::StartSegment { name_lsn, .. }, Place::Start { name_lsn: n }) => assert_eq!(name_lsn, n),
                (e, g) => panic!("round {round} lsn {lsn}: StagedPlan {e:?}, stage {g:?}"),
            }
            wal.append_batch(&[StagedRecord { lsn: Lsn(lsn), bytes: &bytes, source_preamble: pre }]).unwrap();
        }
    }
}

/// The length of a staged file.
fn file_len(storage: &dyn Storage, path: &Path) -> u64 {
    storage.open_read(path).unwrap().len_bytes().unwrap()
}

#[test]
fn preallocated_zeros_keep_group_commits_from_growing_the_file_and_stay_out_of_the_manifest() {
    let (fs, storage, dir) = fake();
    let opts = StageOptions { preallocate_bytes: 16 << 10, ..options(0, 1 << 20) };
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, opts).unwrap();
    let path = dir.join(segment_name(Lsn(1)));
    let mut all = Vec::new();
    let mut lens = Vec::new();
    for lsn in 1..=200u64 {
        let rec = (lsn, record(Layout::A, lsn, 20), None);
        all.extend_from_slice(&rec.1);
        let before = fs.syncs_count();
        wal.append_batch(&batch(&[rec])).unwrap();
        assert_eq!(fs.syncs_count() - before, if lsn == 1 { 2 } else { 1 }, "one data sync per group (LSN {lsn})");
        lens.push(file_len(&*storage, &path));
    }
    // Records of 74 bytes: 14,800 bytes in all. The file grew twice, not at every group: to
    // 74 bytes + 16 KiB in whole blocks at the first group, and again once less than 8 KiB of
    // zeros was left.
    lens.dedup();
    assert_eq!(lens, vec![20 << 10, 32 << 10], "file lengths");
    let entry = &wal.segments()[0];
    assert_eq!((entry.size_bytes, entry.crc32c), (all.len() as u64, crc32c(&all)));
    let bytes = storage.read_all(&path).unwrap();
    assert_eq!(&bytes[..all.len()], &all[..]);
    assert!(bytes[all.len()..].iter().all(|b| *b == 0), "zeros past the records");
    // Trimmed (as before a release): records back to back, durably; trimming again does nothing.
    wal.trim().unwrap();
    assert_eq!(file_len(&fs.recover(), &path), all.len() as u64);
    let before = fs.syncs_count();
    wal.trim().unwrap();
    assert_eq!(fs.syncs_count(), before);
    assert_eq!(read_staged(&*storage, &dir).len(), 200);
}

#[test]
fn a_roll_cuts_the_zeros_of_the_segment_it_seals_and_a_reopen_cuts_the_open_ones() {
    let (fs, storage, dir) = fake();
    // 230-byte segments (three 74-byte records); zeros are kept up to the roll size.
    let opts = StageOptions { preallocate_bytes: 4096, ..options(0, 230) };
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, opts).unwrap();
    let recs: Vec<_> = (1..=5).map(|l| (l, record(Layout::A, l, 20), None)).collect();
    wal.append_batch(&batch(&recs[..1])).unwrap();
    let first = dir.join(segment_name(Lsn(1)));
    assert_eq!(file_len(&*storage, &first), 230, "zeros up to the roll size");
    wal.append_batch(&batch(&recs[1..4])).unwrap(); // fills wal-1, starts wal-4
    let recovered = fs.recover();
    assert_eq!(file_len(&recovered, &first), 222, "the sealed segment ends at its records, durably");
    let second = dir.join(segment_name(Lsn(4)));
    assert_eq!(file_len(&recovered, &second), 230);
    // A restart cuts the open segment's zeros like a torn tail and stages on from there.
    let storage: Arc<dyn Storage> = Arc::new(recovered.clone());
    let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &dir, opts).unwrap();
    assert_eq!((report.durable_lsn, report.truncated_bytes), (Lsn(4), 230 - 74));
    assert_eq!(file_len(&*storage, &second), 74);
    wal.append_batch(&batch(&recs[4..])).unwrap();
    wal.trim().unwrap();
    let read: Vec<u64> = read_staged(&*storage, &dir).into_iter().map(|(_, lsn, _)| lsn).collect();
    assert_eq!(read, vec![1, 2, 3, 4, 5]);
}

/// A framed batch (records that arrived in a checked WAL batch frame) is not CRC-checked
/// record by record, but its headers, lengths and order are; the layout comes from each
/// record's length, and a record whose layout differs from the one before it (or the first
/// one staged) has its CRC checked too, so a segment's layout never rests on a length alone.
#[test]
fn framed_batches_check_headers_and_layout_changes_not_every_crc() {
    let (_fs, storage, dir) = fake();
    let (mut wal, _) = StagedWal::open(Arc::clone(&storage), &dir, options(10, 1 << 20)).unwrap();
    let framed = |wal: &mut StagedWal, recs: &[Rec]| wal.append_checked_batch(&batch(recs), RecordCheck::Framed);
    // The first record staged is CRC-checked: its layout starts a segment.
    let mut first = record(Layout::A, 11, 5);
    *first.last_mut().unwrap() ^= 1;
    let err = framed(&mut wal, &[(11, first, None)]).unwrap_err();
    assert!(matches!(err, StageError::BadRecord { lsn: Lsn(11), .. }), "{err}");
    let recs: Vec<Rec> = vec![
        (11, record(Layout::A, 11, 5), None),
        (12, record(Layout::A, 12, 300), None),
        (13, record(Layout::B, 13, 7), None),
        (14, record(Layout::B, 14, 0), None),
    ];
    assert_eq!(framed(&mut wal, &recs).unwrap(), Lsn(14));
    // Header checks still hold without the CRC.
    let r15 = record(Layout::B, 15, 5);
    let err = framed(&mut wal, &[(16, r15.clone(), None)]).unwrap_err();
    assert!(matches!(err, StageError::LsnMismatch { lsn: Lsn(16), found: Lsn(15) }), "{err}");
    let mut long = record(Layout::A, 16, 5);
    long.push(0);
    let err = framed(&mut wal, &[(15, record(Layout::A, 15, 5), None), (16, long, None)]).unwrap_err();
    assert!(matches!(err, StageError::RecordLength { lsn: Lsn(16), given_bytes: 60, record_bytes: 59 }), "{err}");
    let mut no_magic = r15.clone();
    no_magic[0] ^= 0xff;
    let err = framed(&mut wal, &[(15, no_magic, None)]).unwrap_err();
    assert!(matches!(err, StageError::BadRecord { lsn: Lsn(15), .. }), "{err}");
    let err = framed(&mut wal, &[(15, r15.clone(), None), (15, r15.clone(), None)]).unwrap_err();
    assert!(matches!(err, StageError::NotIncreasing { .. }), "{err}");
    // A layout B record 9 bytes short has layout A's length: a layout change, so its CRC is
    // checked under A, and it fails.
    let mut cut = record(Layout::B, 15, 20);
    cut.truncate(cut.len() - 9);
    let err = framed(&mut wal, &[(15, cut, None)]).unwrap_err();
    assert!(matches!(err, StageError::BadRecord { lsn: Lsn(15), .. }), "{err}");
    // Refused batches wrote nothing; the staged WAL reads back in order, split at the layout
    // change, every record's CRC checked by the reader.
    assert_eq!(framed(&mut wal, &[(15, r15, None)]).unwrap(), Lsn(15));
    let read: Vec<(String, u64)> = read_staged(storage.as_ref(), &dir).into_iter().map(|(s, l, _)| (s, l)).collect();
    let (a, b) = (segment_name(Lsn(11)), segment_name(Lsn(13)));
    assert_eq!(read, [(a.clone(), 11), (a, 12), (b.clone(), 13), (b.clone(), 14), (b, 15)]);
}
