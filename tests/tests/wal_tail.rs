//! WAL tail scenarios on real files: a writer thread appends (flushing and rolling at random
//! points) while a tail thread follows the folder concurrently, keeps one vShard, and must
//! see exactly that vShard's records, in order, once; then `wal dump` agrees.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::wal::{dump, DumpOptions, FolderTail};
use ferry_refnode::walwrite::{FlushStyle, Leftovers, PreambleOptions, RecordSpec, WalWriter, WriterOptions};
use ferry_wire::wal::header::FLAG_ENCRYPTED;
use ferry_wire::wal::{CursorConfig, Layout, LayoutChoice, Mode, Selection};
use ferry_wire::{Lsn, VShardId};

/// A small deterministic generator (no rand dependency): xorshift64.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run(opts: WriterOptions, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let total = 3000u64;
    // The writer starts first so the folder has a segment; the tail starts at LSN 1.
    let mut writer = WalWriter::create(&path, opts, Lsn(1)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let tail_done = done.clone();
    let tail_path = path.clone();
    let tail = std::thread::spawn(move || {
        let config = CursorConfig { layout: LayoutChoice::Auto, alignment_bytes: 4096, mode: Mode::Live };
        let mut tail = FolderTail::new(&tail_path, config, Some(Lsn(1))).unwrap();
        let selection = Selection::new(VShardId(2));
        let mut kept = Vec::new();
        loop {
            let finished = tail_done.load(Ordering::Acquire);
            match tail.poll().unwrap() {
                Some(record) => {
                    if selection.keeps(&record.header) {
                        let lsn_bytes = record.header.lsn.0.to_le_bytes();
                        assert!(record.payload().chunks(8).all(|c| c == lsn_bytes));
                        kept.push(record.header.lsn.0);
                    }
                    if record.header.lsn.0 == total {
                        return kept;
                    }
                }
                None if finished => panic!("the tail stopped before the last record"),
                // The follower's idle poll, as the engine's tail loop does: part of the scenario.
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    let mut g = Gen(seed);
    for i in 1..=total {
        let vshard = VShardId((g.next() % 4) as u32);
        let mut spec = RecordSpec::new(1 + (i % 3) as u32, vshard);
        if i % 11 == 0 {
            spec.record_type |= FLAG_ENCRYPTED;
        }
        // Payload: the LSN, so the tail can check it; sometimes big enough to span blocks.
        let reps = if g.next().is_multiple_of(50) { 700 } else { 4 };
        let lsn = writer.append(&spec, &i.to_le_bytes().repeat(reps)).unwrap();
        assert_eq!(lsn, Lsn(i));
        if g.next().is_multiple_of(4) {
            writer.flush().unwrap();
        }
        // Give the tail a chance to catch up mid-write, so it really follows a growing WAL (a
        // deliberate interleaving, not a wait).
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    writer.sync().unwrap();
    done.store(true, Ordering::Release);
    let kept = tail.join().unwrap();

    // The same folder through `wal dump`, filtered to the vShard: the same LSNs.
    let mut out = Vec::new();
    let opts_dump =
        DumpOptions { dir: path.clone(), vshard: Some(VShardId(2)), from_lsn: None, staged: false, json: true };
    let summary = dump(&opts_dump, &mut out).unwrap();
    let dumped: Vec<u64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(dumped, kept);
    assert_eq!(summary.records_read_count, total);
    assert!(summary.segments.len() > 1, "the writer never rolled");
    assert!(!kept.is_empty());
}

#[test]
fn concurrent_tail_layout_a_direct_with_stale_leftovers() {
    let opts = WriterOptions {
        layout: Layout::A,
        roll_size_bytes: 256 << 10,
        leftovers: Leftovers::Stale,
        ..WriterOptions::default()
    };
    run(opts, 0x9E37_79B9_7F4A_7C15);
}

#[test]
fn concurrent_tail_layout_b_direct_with_padding_and_preambles() {
    let opts = WriterOptions {
        layout: Layout::B,
        roll_size_bytes: 256 << 10,
        preamble: Some(PreambleOptions { cipher_alg: 1, key_id: 4, epoch_start: 1 }),
        ..WriterOptions::default()
    };
    run(opts, 0xD1B5_4A32_D192_ED03);
}

#[test]
fn concurrent_tail_buffered() {
    for layout in Layout::ALL {
        let opts = WriterOptions {
            layout,
            roll_size_bytes: 128 << 10,
            flush: FlushStyle::Buffered,
            ..WriterOptions::default()
        };
        run(opts, 0x2545_F491_4F6C_DD1D);
    }
}
