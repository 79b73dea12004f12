//! Interoperability with NodeDB's published WAL crate, `nodedb-wal` 0.4 (layout A).
//!
//! NodeDB's own `SegmentedWal` writes source WAL folders (buffered, O_DIRECT, and encrypted
//! with a key ring on both), several vShards interleaved, payloads of 0, 1, 128 bytes and
//! 1 MiB, many flushes and segment rollovers. ferry tails each folder with `FolderTail`
//! (layout auto and layout A) from base_lsn + 1, keeps one vShard, stages it with
//! `StagedWal` on the real disk, and NodeDB's OWN reader (`WalReader`, decrypting with the
//! same key ring) reads the staged folder back: it must hold exactly the vShard's records in
//! (base_lsn, tip], in order, once, with byte-identical payloads.
//!
//! It also records what NodeDB 0.4's reader does with its own O_DIRECT folders: it stops
//! at the first flush's leftovers in each segment and misses records, while ferry's tail
//! reads every record (see `nodedb_reader_misses_records_of_its_own_o_direct_wal`).
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;

use ferry_engine::storage::{DiskStorage, Storage};
use ferry_engine::wal::stage::{StageOptions, StagedRecord, StagedWal};
use ferry_engine::wal::{FolderTail, TailRecord};
use ferry_wire::wal::{parse_segment_name, CursorConfig, Layout, LayoutChoice, Mode, Selection, PREAMBLE_LEN_BYTES};
use ferry_wire::{Lsn, VShardId};
use nodedb_wal::crypto::{KeyRing, WalEncryptionKey};
use nodedb_wal::reader::WalReader;
use nodedb_wal::record::{RecordType, ENCRYPTED_FLAG};
use nodedb_wal::writer::WalWriterConfig;
use nodedb_wal::{SegmentedWal, SegmentedWalConfig};

const KEY: [u8; 32] = [0x5A; 32];
const RECORDS_COUNT: u64 = 160;
const VSHARDS: [u32; 4] = [1, 2, 3, 2];
const KEPT_VSHARD: u32 = 2;
const BASE_LSN: u64 = 37;
const MIB: usize = 1 << 20;

/// One record as NodeDB's writer was asked to append it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    lsn: u64,
    vshard: u32,
    record_type: u32,
    tenant: u64,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    direct_io: bool,
    encrypted: bool,
}

fn key_ring() -> KeyRing {
    KeyRing::new(WalEncryptionKey::from_bytes(&KEY).unwrap())
}

fn payload_len(i: u64) -> usize {
    if i % 25 == 5 {
        MIB
    } else {
        [0, 1, 128][(i % 3) as usize]
    }
}

/// Writes a source WAL folder with NodeDB's `SegmentedWal`; returns what was appended.
fn write_source(dir: &Path, source: Source) -> Vec<Written> {
    let config = SegmentedWalConfig {
        wal_dir: dir.to_path_buf(),
        segment_target_size: 256 << 10,
        writer_config: WalWriterConfig { use_direct_io: source.direct_io, ..WalWriterConfig::default() },
    };
    let mut wal = SegmentedWal::open(config).unwrap();
    if source.encrypted {
        wal.set_encryption_ring(key_ring()).unwrap();
    }
    let mut written = Vec::new();
    let mut since_sync = 0;
    for i in 0..RECORDS_COUNT {
        let vshard = VSHARDS[(i % 4) as usize];
        let record_type = if i % 5 == 4 { RecordType::Delete as u32 } else { RecordType::Put as u32 };
        let tenant = 10 + i % 3;
        let payload: Vec<u8> = (0..payload_len(i)).map(|j| (i as usize * 131 + j * 7) as u8).collect();
        let lsn = wal.append(record_type, tenant, vshard, 0, &payload).unwrap();
        written.push(Written { lsn, vshard, record_type, tenant, payload });
        since_sync += 1;
        // Flush (group commit) after 1 to 6 records: many O_DIRECT flushes, many leftovers.
        if since_sync > i % 6 {
            wal.sync().unwrap();
            since_sync = 0;
        }
    }
    wal.sync().unwrap();
    written
}

/// Tails `dir` from `start` with ferry's `FolderTail` until nothing more comes; returns every
/// record with its segment's preamble bytes.
fn tail(dir: &Path, layout: LayoutChoice, start: Option<Lsn>) -> Vec<(TailRecord, Option<[u8; PREAMBLE_LEN_BYTES]>)> {
    let config = CursorConfig { layout, alignment_bytes: 4096, mode: Mode::Live };
    let mut tail = FolderTail::new(dir, config, start).unwrap();
    let mut out = Vec::new();
    let mut idle = 0;
    // The writer is done: a few empty polls in a row (a suspected gap is confirmed on the
    // second look) mean the end.
    while idle < 3 {
        match tail.poll().unwrap() {
            Some(record) => {
                idle = 0;
                let preamble = tail.cursor().preamble().map(|p| p.encode());
                out.push((record, preamble));
            }
            None => idle += 1,
        }
    }
    out
}

/// Reads a WAL folder with NodeDB's own reader, segment by segment in name order,
/// decrypting with `ring` when a record is encrypted.
fn nodedb_read(dir: &Path, ring: Option<&KeyRing>) -> Vec<Written> {
    let mut out = Vec::new();
    for seg in nodedb_wal::segment::discover_segments(dir).unwrap() {
        let reader = WalReader::open(&seg.path).unwrap();
        let preamble = reader.segment_preamble().copied();
        for record in reader.records() {
            let record = record.unwrap();
            let payload = if record.is_encrypted() {
                let p = preamble.expect("an encrypted record in a segment without a preamble");
                record.decrypt_payload_ring(&p.epoch, Some(&p.to_bytes()), ring).unwrap()
            } else {
                record.payload.clone()
            };
            out.push(Written {
                lsn: record.header.lsn,
                vshard: record.header.vshard_id,
                record_type: record.header.record_type & !ENCRYPTED_FLAG,
                tenant: record.header.tenant_id,
                payload,
            });
        }
    }
    out
}

fn short(w: &[Written]) -> Vec<(u64, u32, usize)> {
    w.iter().map(|w| (w.lsn, w.vshard, w.payload.len())).collect()
}

/// The whole path for one source kind: write with NodeDB, tail and stage with ferry, read
/// the staged folder with NodeDB.
fn round_trip(source: Source, layout: LayoutChoice) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("node-wal");
    let written = write_source(&src, source);
    let segments_count = nodedb_wal::segment::discover_segments(&src).unwrap().len();
    assert!(segments_count >= 4, "{source:?}: expected rollovers, got {segments_count} segments");
    let tip = written.last().unwrap().lsn;
    assert_eq!(tip, RECORDS_COUNT);

    // ferry's tail reads every record after base_lsn, byte for byte.
    let tailed = tail(&src, layout, Some(Lsn(BASE_LSN + 1)));
    let tailed_lsns: Vec<u64> = tailed.iter().map(|(r, _)| r.header.lsn.0).collect();
    assert_eq!(tailed_lsns, (BASE_LSN + 1..=tip).collect::<Vec<_>>(), "{source:?} {layout:?}");
    for (record, preamble) in &tailed {
        assert_eq!(record.header.layout(), Layout::A);
        assert_eq!(preamble.is_some(), source.encrypted);
        assert_eq!(record.header.is_encrypted(), source.encrypted);
    }

    // Keep one vShard and stage it.
    let selection = Selection::new(VShardId(KEPT_VSHARD));
    let kept: Vec<&(TailRecord, Option<[u8; 16]>)> =
        tailed.iter().filter(|(r, _)| selection.keeps(&r.header)).collect();
    let staging = tmp.path().join("migrations").join("m1");
    std::fs::create_dir_all(&staging).unwrap();
    let staged_dir = staging.join("wal");
    let storage: Arc<dyn Storage> = Arc::new(DiskStorage);
    let options = StageOptions { roll_size_bytes: 300 << 10, ..StageOptions::new(Lsn(BASE_LSN)) };
    let (mut wal, report) = StagedWal::open(Arc::clone(&storage), &staged_dir, options).unwrap();
    assert_eq!(report.durable_lsn, Lsn(BASE_LSN));
    for chunk in kept.chunks(7) {
        let batch: Vec<StagedRecord<'_>> = chunk
            .iter()
            .map(|(r, p)| StagedRecord { lsn: r.header.lsn, bytes: &r.bytes, source_preamble: *p })
            .collect();
        wal.append_batch(&batch).unwrap();
    }
    let expected: Vec<Written> =
        written.iter().filter(|w| w.lsn > BASE_LSN && w.vshard == KEPT_VSHARD).cloned().collect();
    assert_eq!(wal.durable_lsn(), Lsn(expected.last().unwrap().lsn));
    let entries = wal.segments();
    assert!(entries.len() >= 2, "{entries:?}");
    // The open segment is preallocated (zeros past its records, as while a migration is live)
    // and NodeDB's readers below read it as it is.
    let open = entries.last().unwrap();
    let open_len = std::fs::metadata(staged_dir.join(&open.name)).unwrap().len();
    assert!(open_len > open.size_bytes, "{} is {open_len} bytes, its records {}", open.name, open.size_bytes);
    for e in &entries {
        assert_eq!(e.layout, "A");
        assert_eq!(e.key_id, source.encrypted.then_some(0));
    }
    for pair in entries.windows(2) {
        assert_eq!(parse_segment_name(&pair[1].name), Some(Lsn(pair[0].last_lsn.0 + 1)));
    }

    // NodeDB's own reader, with the same key ring, reads exactly the vShard's records.
    let ring = key_ring();
    let read_back = nodedb_read(&staged_dir, Some(&ring));
    assert_eq!(short(&read_back), short(&expected), "{source:?} {layout:?}");
    assert!(read_back == expected, "{source:?} {layout:?}: payloads or header fields differ");
    // And its folder replay sees the same records (ciphertext when encrypted).
    let replayed = nodedb_wal::segmented::replay_all_segments(&staged_dir).unwrap();
    let replayed_lsns: Vec<u64> = replayed.iter().map(|r| r.header.lsn).collect();
    assert_eq!(replayed_lsns, expected.iter().map(|w| w.lsn).collect::<Vec<_>>());
    if source.encrypted {
        // Without the key the payloads stay sealed: the staged bytes are the source's ciphertext.
        assert!(replayed.iter().all(|r| r.is_encrypted()));
    } else {
        // NodeDB's mmap catch-up reader too (it does not skip a preamble, so only unencrypted).
        let mmapped = nodedb_wal::mmap_reader::replay_segments_mmap(&staged_dir, 0).unwrap();
        let mmapped: Vec<(u64, Vec<u8>)> = mmapped.into_iter().map(|r| (r.header.lsn, r.payload)).collect();
        assert!(mmapped == expected.iter().map(|w| (w.lsn, w.payload.clone())).collect::<Vec<_>>());
    }
}

#[test]
fn buffered_source_stages_for_nodedb() {
    for layout in [LayoutChoice::Auto, LayoutChoice::Fixed(Layout::A)] {
        round_trip(Source { direct_io: false, encrypted: false }, layout);
    }
}

#[test]
fn o_direct_source_stages_for_nodedb() {
    for layout in [LayoutChoice::Auto, LayoutChoice::Fixed(Layout::A)] {
        round_trip(Source { direct_io: true, encrypted: false }, layout);
    }
}

#[test]
fn encrypted_sources_stage_for_nodedb_with_the_key_ring() {
    round_trip(Source { direct_io: false, encrypted: true }, LayoutChoice::Auto);
    round_trip(Source { direct_io: true, encrypted: true }, LayoutChoice::Fixed(Layout::A));
}

/// NodeDB's reader reads its own buffered WAL completely (the reader works), and its own
/// O_DIRECT WAL incompletely: in each segment it reads the records of the first flush, then
/// stops at that flush's leftovers (the unframed rest of its last block) and misses the rest
/// of the segment. It returns no stale record. ferry's tail reads both completely.
#[test]
fn nodedb_reader_misses_records_of_its_own_o_direct_wal() {
    for direct_io in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("node-wal");
        let written = write_source(&src, Source { direct_io, encrypted: false });
        let all: Vec<u64> = written.iter().map(|w| w.lsn).collect();
        let tailed = tail(&src, LayoutChoice::Auto, None);
        let ferry: Vec<u64> = tailed.iter().map(|(r, _)| r.header.lsn.0).collect();
        assert_eq!(ferry, all, "direct_io {direct_io}: ferry's tail");
        let nodedb: Vec<u64> =
            nodedb_wal::segmented::replay_all_segments(&src).unwrap().iter().map(|r| r.header.lsn).collect();
        let mut others: Vec<String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| parse_segment_name(n).is_none())
            .collect();
        others.sort();
        eprintln!("direct_io {direct_io}: other files in the folder: {others:?}");
        eprintln!("direct_io {direct_io}: nodedb read {} of {} records: {nodedb:?}", nodedb.len(), all.len());
        if !direct_io {
            assert_eq!(nodedb, all);
            continue;
        }
        let mut strict_prefixes = 0;
        for seg in nodedb_wal::segment::discover_segments(&src).unwrap() {
            let name = seg.path.file_name().unwrap().to_str().unwrap().to_owned();
            let by_ferry: Vec<u64> =
                tailed.iter().filter(|(r, _)| r.segment == name).map(|(r, _)| r.header.lsn.0).collect();
            let by_nodedb: Vec<u64> =
                WalReader::open(&seg.path).unwrap().records().map(|r| r.unwrap().header.lsn).collect();
            // A prefix of the segment's records: what its first flush wrote.
            assert!(!by_nodedb.is_empty(), "{name}");
            assert_eq!(by_nodedb[..], by_ferry[..by_nodedb.len()], "{name}");
            if by_nodedb.len() < by_ferry.len() {
                strict_prefixes += 1;
            }
        }
        assert!(strict_prefixes > 0);
        let missed = all.iter().filter(|l| !nodedb.contains(l)).count();
        assert!(missed > 0, "nodedb's reader read every record of an O_DIRECT wal");
    }
}
