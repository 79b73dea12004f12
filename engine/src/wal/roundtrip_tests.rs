//! Writer and cursor/dump round trips on real files.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;

use ferry_refnode::walwrite::{FlushStyle, Leftovers, PreambleOptions, RecordSpec, WalWriter, WriterOptions};
use ferry_wire::wal::header::{FLAG_ENCRYPTED, FLAG_REQUIRED};
use ferry_wire::wal::{parse_segment_name, Cursor, CursorConfig, Layout, LayoutChoice, Mode, Preamble, Step};
use ferry_wire::{Lsn, VShardId};

use super::*;

fn payload(lsn: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lsn as usize * 7 + i) as u8).collect()
}

/// Writes `count` records from LSN 1 with varying sizes and flush points.
fn write_wal(dir: &Path, opts: WriterOptions, count: u64) {
    let mut w = WalWriter::create(dir, opts, Lsn(1)).unwrap();
    for i in 1..=count {
        let spec = RecordSpec {
            tenant_id: 3,
            database_id: 4,
            apply_key: i,
            ..RecordSpec::new(1 | FLAG_REQUIRED, VShardId((i % 4) as u32))
        };
        let lsn = w.append(&spec, &payload(i, (i as usize * 37) % 900)).unwrap();
        assert_eq!(lsn, Lsn(i));
        if i % 5 == 0 || i % 7 == 0 {
            w.flush().unwrap();
        }
    }
    w.sync().unwrap();
}

/// Reads every segment of `dir` with the cursor; returns (lsn, payload) pairs.
fn read_wal(dir: &Path, mode: Mode) -> Vec<(u64, Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            parse_segment_name(&name).map(|lsn| (lsn, name))
        })
        .collect();
    names.sort();
    let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode };
    let mut cursor = Cursor::new(config, None).unwrap();
    let mut out = Vec::new();
    for (i, (lsn, name)) in names.iter().enumerate() {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let sealed = i + 1 < names.len();
        cursor.open_segment(*lsn).unwrap();
        while let Step::Record(r) = cursor.poll(&bytes, sealed).unwrap() {
            out.push((r.header.lsn.0, r.payload(&bytes).unwrap().to_vec()));
        }
    }
    out
}

fn all_options() -> Vec<WriterOptions> {
    let mut v = Vec::new();
    for layout in Layout::ALL {
        for flush in [FlushStyle::Direct, FlushStyle::Buffered] {
            for leftovers in [Leftovers::Zeros, Leftovers::Stale] {
                for preamble in [None, Some(PreambleOptions { cipher_alg: 1, key_id: 5, epoch_start: 9 })] {
                    v.push(WriterOptions {
                        layout,
                        roll_size_bytes: 20_000,
                        alignment_bytes: 4096,
                        flush,
                        leftovers,
                        preamble,
                    });
                }
            }
        }
    }
    v
}

#[test]
fn every_written_record_is_read_back_in_every_writer_mode() {
    for opts in all_options() {
        let dir = tempfile::tempdir().unwrap();
        write_wal(dir.path(), opts, 120);
        let got = read_wal(dir.path(), Mode::Live);
        let lsns: Vec<u64> = got.iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns, (1..=120).collect::<Vec<_>>(), "{opts:?}");
        for (lsn, p) in got {
            assert_eq!(p, payload(lsn, (lsn as usize * 37) % 900));
        }
        let segments = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 2, "{opts:?} did not roll");
    }
}

#[test]
fn direct_layout_a_with_stale_leftovers_really_leaves_old_valid_records() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions { layout: Layout::A, leftovers: Leftovers::Stale, ..WriterOptions::default() };
    let mut w = WalWriter::create(dir.path(), opts, Lsn(1)).unwrap();
    for _ in 0..30 {
        w.append(&RecordSpec::new(1, VShardId(1)), &[1; 100]).unwrap();
    }
    w.flush().unwrap();
    w.append(&RecordSpec::new(1, VShardId(1)), &[2; 10]).unwrap();
    w.flush().unwrap();
    let bytes = std::fs::read(w.segment_path()).unwrap();
    assert_eq!(bytes.len() % 4096, 0);
    // The second flush starts at 4096 (30 * 154 = 4620 bytes rounded up to 8192): record 31
    // at 8192, then a whole stale copy of an old record (LSN 2) right after it.
    let stale_at = 8192 + 54 + 10;
    let stale = ferry_wire::wal::check_record(Layout::A, &bytes[stale_at..]);
    assert!(stale.is_err(), "the byte after record 31 is mid-record in the old buffer");
    let second_old = 154; // record 2 of the first flush, at the same buffer position
    let (h, _) = ferry_wire::wal::check_record(Layout::A, &bytes[8192 + second_old..]).unwrap();
    assert_eq!(h.lsn, Lsn(2), "a valid stale record sits in the leftovers");
    assert_eq!(read_wal(dir.path(), Mode::Live).len(), 31);
}

#[test]
fn preamble_epoch_changes_per_roll() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions {
        roll_size_bytes: 5000,
        preamble: Some(PreambleOptions { cipher_alg: 1, key_id: 3, epoch_start: 40 }),
        ..WriterOptions::default()
    };
    let mut w = WalWriter::create(dir.path(), opts, Lsn(1)).unwrap();
    for _ in 0..10 {
        w.append(&RecordSpec::new(FLAG_ENCRYPTED | 2, VShardId(1)), &[0xEE; 2000]).unwrap();
    }
    w.sync().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    let epochs: Vec<[u8; 4]> =
        names.iter().map(|p| Preamble::decode(&std::fs::read(p).unwrap()).unwrap().epoch).collect();
    assert!(epochs.len() >= 3);
    for (i, e) in epochs.iter().enumerate() {
        assert_eq!(u32::from_le_bytes(*e), 40 + i as u32);
    }
}

#[test]
fn dump_lists_filters_and_reports_corruption() {
    let dir = tempfile::tempdir().unwrap();
    write_wal(dir.path(), WriterOptions { roll_size_bytes: 20_000, ..WriterOptions::default() }, 60);
    std::fs::write(dir.path().join("wal-00000000000000000001.dwb"), b"not a segment").unwrap();
    let opts = DumpOptions {
        dir: dir.path().to_path_buf(),
        vshard: Some(VShardId(2)),
        from_lsn: Some(Lsn(30)),
        staged: false,
        json: true,
    };
    let mut out = Vec::new();
    let summary = dump(&opts, &mut out).unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let lsns: Vec<u64> = lines.iter().map(|l| l["lsn"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (30..=60).filter(|l| l % 4 == 2).collect();
    assert_eq!(lsns, want);
    assert!(lines.iter().all(|l| l["vshard"] == 2 && l["crc"] == "ok" && l["layout"] == "B"));
    assert_eq!(summary.records_listed_count, want.len() as u64);
    assert_eq!(summary.last_lsn, Some(Lsn(60)));

    let mut text = Vec::new();
    let all = DumpOptions { vshard: None, from_lsn: None, json: false, ..opts.clone() };
    let summary = dump(&all, &mut text).unwrap();
    assert_eq!(summary.records_listed_count, 60);
    assert!(String::from_utf8(text).unwrap().starts_with("lsn=1 vshard=1 tenant=3 database=4"));

    // Flip a bit in the first segment's third record: the dump names file and offset.
    let first = dir.path().join("wal-00000000000000000001.seg");
    let mut bytes = std::fs::read(&first).unwrap();
    let offset_3 = 2 * 63 + 37 + 74;
    bytes[offset_3 + 70] ^= 4;
    std::fs::write(&first, &bytes).unwrap();
    match dump(&all, &mut Vec::new()) {
        Err(DumpError::Corruption { path, offset_bytes, .. }) => {
            assert_eq!(path, first);
            assert_eq!(offset_bytes, offset_3 as u64);
        }
        other => panic!("{other:?}"),
    }
    let empty = tempfile::tempdir().unwrap();
    let none = DumpOptions { dir: empty.path().to_path_buf(), ..all };
    assert!(matches!(dump(&none, &mut Vec::new()), Err(DumpError::NoSegments { .. })));
}

#[test]
fn a_gap_left_by_the_writer_is_reported() {
    for layout in Layout::ALL {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions { layout, ..WriterOptions::default() };
        let mut w = WalWriter::create(dir.path(), opts, Lsn(1)).unwrap();
        w.append(&RecordSpec::new(1, VShardId(1)), b"a").unwrap();
        w.flush().unwrap();
        w.skip_lsns_for_tests(3);
        w.append(&RecordSpec::new(1, VShardId(1)), b"e").unwrap();
        w.flush().unwrap();
        let opts =
            DumpOptions { dir: dir.path().to_path_buf(), vshard: None, from_lsn: None, staged: false, json: false };
        assert!(matches!(dump(&opts, &mut Vec::new()), Err(DumpError::Corruption { .. })), "{layout:?}");
    }
}

#[test]
fn buffered_writer_output_reads_in_staged_mode_too() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions { flush: FlushStyle::Buffered, roll_size_bytes: 1 << 20, ..WriterOptions::default() };
    write_wal(dir.path(), opts, 50);
    assert_eq!(read_wal(dir.path(), Mode::Staged).len(), 50);
}

fn drain_tail(tail: &mut FolderTail, seen: &mut Vec<u64>) {
    while let Some(record) = tail.poll().unwrap() {
        assert_eq!(record.bytes.len(), record.header.record_len_bytes());
        assert_eq!(record.payload(), &payload(record.header.lsn.0, record.payload().len())[..]);
        seen.push(record.header.lsn.0);
    }
}

fn live_config() -> CursorConfig {
    CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Live }
}

#[test]
fn a_tail_following_the_writer_sees_every_record_once() {
    for opts in all_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), opts, Lsn(1)).unwrap();
        let mut tail = FolderTail::new(dir.path(), live_config(), None).unwrap();
        let mut seen = Vec::new();
        for i in 1..=150u64 {
            w.append(&RecordSpec::new(1, VShardId(1)), &payload(i, (i as usize * 53) % 700)).unwrap();
            if i % 3 == 0 {
                w.flush().unwrap();
                drain_tail(&mut tail, &mut seen);
            }
        }
        w.flush().unwrap();
        drain_tail(&mut tail, &mut seen);
        assert_eq!(seen, (1..=150).collect::<Vec<_>>(), "{opts:?}");
        assert!(tail.segment_name().unwrap() != "wal-00000000000000000001.seg", "{opts:?} never rolled");
    }
}

#[test]
fn a_tail_starts_in_the_segment_holding_its_start_lsn() {
    let dir = tempfile::tempdir().unwrap();
    write_wal(dir.path(), WriterOptions { roll_size_bytes: 20_000, ..WriterOptions::default() }, 120);
    let mut tail = FolderTail::new(dir.path(), live_config(), Some(Lsn(77))).unwrap();
    let mut seen = Vec::new();
    while let Some(record) = tail.poll().unwrap() {
        seen.push(record.header.lsn.0);
    }
    assert_eq!(seen, (77..=120).collect::<Vec<_>>());
    assert!(tail.segment_name().unwrap() != "wal-00000000000000000001.seg");
    // An empty folder is nothing written yet, not an error.
    let empty = tempfile::tempdir().unwrap();
    assert!(FolderTail::new(empty.path(), live_config(), None).unwrap().poll().unwrap().is_none());
}

#[test]
fn a_tail_stops_on_a_gap_between_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = WalWriter::create(dir.path(), WriterOptions::default(), Lsn(1)).unwrap();
    for _ in 0..5 {
        w.append(&RecordSpec::new(1, VShardId(1)), b"x").unwrap();
    }
    w.flush().unwrap();
    w.skip_lsns_for_tests(2);
    w.roll().unwrap();
    w.append(&RecordSpec::new(1, VShardId(1)), b"y").unwrap();
    w.flush().unwrap();
    let mut tail = FolderTail::new(dir.path(), live_config(), None).unwrap();
    let mut seen = Vec::new();
    let err = loop {
        match tail.poll() {
            Ok(Some(r)) => seen.push(r.header.lsn.0),
            Ok(None) => panic!("the gap was not reported"),
            Err(e) => break e,
        }
    };
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    assert!(matches!(err, TailError::Cursor(ferry_wire::wal::CursorError::Corruption { .. })), "{err}");
}
