//! Seed corpora for the fuzz targets, made from valid encodings with wire's own encoders.
//!
//! What it does: [`all`] returns, per target, at least 20 inputs that reach deep into the
//! decoder (CRCs right, mode byte 0 so the fix-up leaves them as they are). The ignored test
//! `write_seed_corpora` in [`super`] writes them to `wire/fuzz/corpus/<target>/seed-NNN`.
//!
//! What it does not: hold what the fuzzer found (libFuzzer keeps that in its working corpus).
// Seeds are built from small constants: the casts below never truncate.
#![allow(clippy::cast_possible_truncation)]

use serde_json::json;

use crate::api::{Phase, PhaseRecord, StartParams};
use crate::checkpoint::{self, LogRecord};
use crate::frame::{self, FrameHeader, PROTOCOL_VERSION};
use crate::ids::{Lsn, MigrationId, NodeId, VShardId};
use crate::manifest::{StagedSegment, StagedWalSegment, StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use crate::message::{ChunkRef, ErrorKind, FileResume, Message, Offer, OfferFile};
use crate::path::RelPath;
use crate::wal::{encode_padding, encode_record, Layout, Preamble, RecordHeader};
use crate::walstream::{self, WalBatchRecord};

use super::proto::{chunk_crc, source_offer, BASE_LSN, CHUNK_LEN_BYTES};

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("frame", frames()),
        ("message", messages().iter().map(Message::encode).collect()),
        ("manifest", manifests()),
        ("wal_segment", wal_segments()),
        ("wal_batch", wal_batches()),
        ("chunk_log", chunk_logs()),
        ("phase_slots", phase_slots()),
        ("control_request", control_requests()),
        ("proto_target", proto_target()),
        ("proto_source", proto_source()),
    ]
}

fn id() -> MigrationId {
    MigrationId::new("m1".to_owned()).expect("id")
}

fn node(name: &str) -> NodeId {
    NodeId::new(name.to_owned()).expect("node")
}

fn make_offer(sizes: &[u64], wal: bool) -> Offer {
    Offer {
        migration_id: id(),
        vshard_id: VShardId(7),
        base_lsn: Lsn(BASE_LSN),
        chunk_len_bytes: CHUNK_LEN_BYTES,
        files: sizes
            .iter()
            .enumerate()
            .map(|(i, size_bytes)| OfferFile {
                path: RelPath::new(format!("L{i}/f{i}.seg")).expect("path"),
                size_bytes: *size_bytes,
            })
            .collect(),
        db_meta: json!({"engine": "nodedb", "collections": ["a", "b"]}),
        wal,
    }
}

/// One of each message, and a few variations.
fn messages() -> Vec<Message> {
    let chunk = |file_index, chunk_index| ChunkRef { file_index, chunk_index };
    vec![
        Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("source") },
        Message::Offer(make_offer(&[4096, 10, 0], false)),
        Message::Offer(make_offer(&[1 << 20], true)),
        Message::Join { migration_id: id() },
        Message::Joined,
        Message::WalStart,
        Message::WalDurable { durable_lsn: Lsn(120) },
        Message::Accept { resume: vec![], bytes_resent: 0, already_staged: false },
        Message::Accept {
            resume: vec![FileResume { file_index: 0, chunks: vec![(0, 77), (1, 78)] }],
            bytes_resent: 4096,
            already_staged: false,
        },
        Message::Accept { resume: vec![], bytes_resent: 0, already_staged: true },
        Message::Acks { chunks: vec![chunk(0, 0), chunk(0, 1), chunk(1, 0)] },
        Message::FileDone { file_index: 0, size_bytes: 4106, crc32c: 0x1234_5678 },
        Message::FileStaged { file_index: 1 },
        Message::BaseStaged { bytes_resent: 10 },
        Message::Commit { final_lsn: Lsn(150) },
        Message::Committed,
        Message::Fence {
            final_lsn: Lsn(150),
            apply_wait_max_us: 1000,
            through_lsn: Some(Lsn(149)),
            wal_wait_max_us: 5000,
        },
        Message::Fence { final_lsn: Lsn(150), apply_wait_max_us: 0, through_lsn: None, wal_wait_max_us: 0 },
        Message::FenceCancelled { reason: "ingest behind".to_owned() },
        Message::Fenced { durable_lsn: Lsn(150), commit_us: 800, apply_wait_us: 20 },
        Message::Release { migration_id: id(), final_lsn: Lsn(150), fenced_durable_lsn: Some(Lsn(149)) },
        Message::Released,
        Message::Abort { migration_id: id(), reason: "by the coordinator".to_owned() },
        Message::Aborted,
        Message::Error { kind: ErrorKind::Checksum, message: "chunk 3 of file 0 failed its CRC".to_owned() },
    ]
}

fn frames() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = messages()
        .iter()
        .take(12)
        .map(|m| [&[0u8][..], &frame::encode_control(&m.encode()).expect("frame")].concat())
        .collect();
    for (i, body) in [&b"chunk bytes"[..], &[0u8; 64][..], b""].into_iter().enumerate() {
        let header = FrameHeader::chunk(i as u32, 4096 * i as u64, body.len(), crate::crc32c(body)).expect("chunk");
        seeds.push([&[0u8][..], &header.encode(), body].concat());
    }
    for batch in wal_batches().into_iter().take(4) {
        let header = FrameHeader::wal_batch(&batch).expect("batch");
        seeds.push([&[0u8][..], &header.encode(), &batch].concat());
    }
    // Streams of several frames, and one cut short.
    let stream: Vec<u8> =
        messages().iter().take(4).flat_map(|m| frame::encode_control(&m.encode()).expect("frame")).collect();
    seeds.push([&[0u8][..], &stream].concat());
    seeds.push([&[0u8][..], &stream[..stream.len() - 5]].concat());
    seeds
}

fn manifests() -> Vec<Vec<u8>> {
    let states = [StagingState::Copying, StagingState::Fenced, StagingState::Released, StagingState::Aborted];
    let mut seeds = Vec::new();
    for (i, state) in states.into_iter().enumerate() {
        for segments_count in 0..3usize {
            for wal in [false, true] {
                let manifest = StagingManifest {
                    format_version: MANIFEST_FORMAT_VERSION,
                    migration_id: id(),
                    vshard_id: VShardId(i as u32),
                    base_lsn: Lsn(100),
                    final_lsn: (state != StagingState::Copying).then_some(Lsn(150)),
                    state,
                    base_complete: segments_count > 0,
                    db_meta: if wal { json!({"k": [1, 2.5, null]}) } else { serde_json::Value::Null },
                    segments: (0..segments_count)
                        .map(|s| StagedSegment {
                            path: RelPath::new(format!("L{s}/x.seg")).expect("p"),
                            size_bytes: 4096,
                            crc32c: 7,
                        })
                        .collect(),
                    wal_segments: if wal {
                        vec![StagedWalSegment {
                            name: crate::wal::segment_name(Lsn(101)),
                            size_bytes: 600,
                            crc32c: 9,
                            layout: "B".to_owned(),
                            first_lsn: Lsn(101),
                            last_lsn: Lsn(150),
                            key_id: (i % 2 == 0).then_some(3),
                        }]
                    } else {
                        vec![]
                    },
                    source_node: (segments_count == 1).then(|| node("source")),
                    started_at_unix_ms: (segments_count == 2).then_some(1_796_000_000_000),
                    wal_follows: (segments_count > 0).then_some(wal),
                };
                seeds.push(manifest.encode());
            }
        }
    }
    seeds
}

/// `records` dense LSNs from `first_lsn` in `layout`, optionally after a preamble.
fn wal_segment(layout: Layout, first_lsn: u64, records: u64, preamble: bool, vshard: u32) -> Vec<u8> {
    let mut out = Vec::new();
    if preamble {
        out.extend_from_slice(&Preamble::new(1, 2, [0, 0, 0, 1]).encode());
    }
    for i in 0..records {
        let header =
            RecordHeader::new(layout, 1 + (i as u32 % 3), Lsn(first_lsn + i), VShardId(vshard + (i as u32 % 2)));
        let payload = vec![i as u8; (i as usize * 7) % 40];
        encode_record(&header, &payload, &mut out).expect("record");
    }
    out
}

fn wal_segments() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for config in [0u8, 2, 4, 6, 8, 16, 1, 3, 5, 7] {
        let layout = if config & 3 == 3 || config & 3 == 1 { Layout::B } else { Layout::A };
        let records = 1 + u64::from(config % 5);
        seeds.push([vec![0, config], wal_segment(layout, 1, records, config & 4 != 0, 7)].concat());
    }
    for config in [1u8, 3, 7, 9, 11] {
        let mut segment = wal_segment(Layout::B, 10, 3, false, 7);
        let span = crate::wal::padding_span_bytes(segment.len() as u64, 512);
        encode_padding(span as usize, &mut segment).expect("padding");
        segment.extend(wal_segment(Layout::B, 13, 2, false, 7));
        seeds.push([vec![0, config], segment].concat());
    }
    for config in [0u8, 2, 8, 10, 16] {
        let mut segment = wal_segment(Layout::A, 5, 4, false, 1);
        segment.resize(512, 0xAB);
        segment.extend(wal_segment(Layout::A, 9, 2, false, 1));
        seeds.push([vec![0, config], segment].concat());
    }
    seeds.push(vec![0, 0]);
    seeds.push([vec![0, 4], wal_segment(Layout::A, 1, 2, false, 7), vec![0; 64]].concat());
    seeds
}

fn wal_batches() -> Vec<Vec<u8>> {
    let preamble = Preamble::new(1, 2, [0, 0, 0, 1]).encode();
    (0..22u64)
        .map(|n| {
            let records = wal_segment(if n % 2 == 0 { Layout::A } else { Layout::B }, 100, n % 5, false, 7);
            let mut body = Vec::new();
            let count = n % 6;
            for i in 0..count {
                let bytes = records.get(..(i as usize * 30).min(records.len())).unwrap_or(&[]);
                let source_preamble = (i == 0 && n % 3 == 0).then_some(preamble);
                walstream::push(&mut body, &WalBatchRecord { lsn: Lsn(100 + i * 2), source_preamble, bytes });
            }
            body
        })
        .collect()
}

/// The `i`th record of a sample chunk log: receiving, verified and staged records in turn.
pub(super) fn chunk_log_record(i: u64) -> LogRecord {
    match i % 3 {
        0 => LogRecord::Receiving { file_index: (i % 2) as u32, chunk_index: i / 3, len_bytes: 4096 },
        1 => LogRecord::Verified { file_index: (i % 2) as u32, chunk_index: i / 3, crc32c: i as u32 * 31 },
        _ => LogRecord::Staged { file_index: (i % 4) as u32, crc32c: 0xfeed },
    }
}

fn chunk_logs() -> Vec<Vec<u8>> {
    let offer = source_offer(false);
    let digest = checkpoint::offer_digest(&offer);
    (0..22u64)
        .map(|n| {
            let mut log = vec![0u8];
            log.extend_from_slice(&checkpoint::encode_header(digest));
            for i in 0..n {
                log.extend_from_slice(&chunk_log_record(i).encode());
            }
            if n % 5 == 4 {
                log.extend_from_slice(&[1, 0, 0]); // a torn tail
            }
            log
        })
        .collect()
}

fn phase_slots() -> Vec<Vec<u8>> {
    let phases = [Phase::BaseCopy, Phase::WalCatchUp, Phase::AtomicCutOver, Phase::Completed, Phase::Failed];
    let mut seeds = Vec::new();
    for (i, phase) in phases.into_iter().enumerate() {
        let params: StartParams = serde_json::from_value(json!({
            "vshard_id": i, "segments_root": "/data/seg", "target_address": "127.0.0.1:7070",
            "target_node_id": "node-b", "offline": i % 2 == 0
        }))
        .expect("params");
        let record = PhaseRecord {
            params,
            phase,
            reason: (phase == Phase::Failed).then(|| "target refused".to_owned()),
            started_at_unix_ms: 1,
            updated_at_unix_ms: 2 + i as u64,
            bytes_total: 4096,
            bytes_resent: 0,
            final_lsn: (i >= 2).then_some(150),
            pause: None,
            target_released: phase == Phase::Completed,
            fence_stamps: None,
            fenced_durable_lsn: None,
        }
        .encode();
        // The first slot alone, the second alone, both (either newest), and a torn second.
        let slot = |sequence: u64, payload: &[u8]| {
            let file = crate::slots::new_file(payload);
            let newest = crate::slots::newest(&file).expect("fresh file");
            let mut slot = file[..crate::slots::SLOT_HEADER_LEN_BYTES + payload.len()].to_vec();
            if sequence > 1 {
                let write = crate::slots::next_write(file.len(), &newest, payload).expect("fits");
                slot = write.bytes;
                slot[8..16].copy_from_slice(&sequence.to_le_bytes());
                let crc = crate::crc32c_append(crate::crc32c(&slot[..20]), &slot[24..]);
                slot[20..24].copy_from_slice(&crc.to_le_bytes());
            }
            slot
        };
        let input = |blocks: u8, first: &[u8], second: &[u8]| {
            let len = u16::try_from(first.len()).expect("small").to_le_bytes();
            [&[0u8, blocks, len[0], len[1]][..], first, second].concat()
        };
        seeds.push(input(0, &slot(1, &record), &[]));
        seeds.push(input(1, &[], &slot(1, &record)));
        seeds.push(input(2, &slot(3, &record), &slot(2, &record)));
        seeds.push(input(3, &slot(4, &record), &slot(5, &record)));
        let torn = slot(6, &record);
        seeds.push(input(0, &slot(5, &record), &torn[..torn.len() / 2]));
    }
    seeds
}

fn control_requests() -> Vec<Vec<u8>> {
    let lines = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "node.info"}),
        json!({"jsonrpc": "2.0", "id": "a", "method": "migration.list", "params": {}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "migration.status", "params": {"migration_id": "m-7-0"}}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "migration.start", "params": {"vshard_id": 7, "segments_root": "/seg",
            "target_address": "127.0.0.1:7070", "target_node_id": "node-b"}}),
        json!({"jsonrpc": "2.0", "id": 4, "method": "migration.start", "params": {"vshard_id": 7, "segments_root": "/seg",
            "target_address": "[::1]:7070", "target_node_id": "node-b", "wal_dir": "/wal", "wal_layout": "B",
            "connections": 2, "streams": 8, "chunk_len_bytes": 65536, "offline": false, "db_meta": {"x": 1}}}),
        json!({"jsonrpc": "2.0", "id": 5, "method": "migration.start", "params": {"migration_id": "m1", "vshard_id": 1,
            "segments_root": "/seg", "files": ["L0/a.seg"], "target_address": "h:1", "target_node_id": "b", "until_lsn": 9}}),
        json!({"jsonrpc": "2.0", "id": 6, "method": "migration.abort", "params": {"migration_id": "m1", "reason": "x"}}),
        json!({"jsonrpc": "2.0", "id": 7, "method": "migration.forget", "params": {"migration_id": "m1"}}),
        json!({"jsonrpc": "2.0", "id": 8, "method": "migration.set_rate_limit", "params": {"migration_id": "m1", "bytes_per_sec": 1000}}),
        json!({"jsonrpc": "2.0", "id": 9, "method": "events.subscribe", "params": {"migration_id": "m1"}}),
        json!({"jsonrpc": "2.0", "id": 10, "method": "migration.prepare_cutover", "params": {"migration_id": "m1"}}),
        json!({"jsonrpc": "2.0", "id": 11, "method": "migration.fence", "params": {"migration_id": "m1", "final_lsn": 150}}),
        json!({"jsonrpc": "2.0", "id": 12, "method": "migration.fence", "params": {"final_lsn": 150, "writes_paused_at_ns": 5}}),
        json!({"jsonrpc": "2.0", "id": 13, "method": "migration.release", "params": {"migration_id": "m1"}}),
        json!({"jsonrpc": "2.0", "method": "migration.applied", "params": {"migration_id": "m1", "applied_lsn": 150}}),
        json!({"jsonrpc": "2.0", "id": 14, "method": "migration.start", "params": [7]}),
        json!({"jsonrpc": "2.0", "id": 1, "result": {"migrations": []}}),
        json!({"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "bad params"}}),
        json!({"jsonrpc": "2.0", "method": "migration.event", "params": {"migration_id": "m1", "phase": "BaseCopy"}}),
        json!([{"jsonrpc": "2.0", "id": 1, "method": "node.info"}]),
    ];
    let mut seeds: Vec<Vec<u8>> = lines
        .iter()
        .map(|l| {
            let mut line = serde_json::to_vec(l).expect("json");
            line.push(b'\n');
            line
        })
        .collect();
    seeds.push(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"node.info\"}\r\nnot json\n{\"a\":1}\n".to_vec());
    seeds.push(seeds[3].iter().chain(&seeds[11]).chain(&seeds[16]).copied().collect());
    seeds
}

fn line(message: &Message) -> Vec<u8> {
    [&b"m"[..], &message.encode(), b"\n"].concat()
}

/// Scripts of a source talking to the target: hello, offer, chunks, file reports, then a
/// commit, fences, the end, or a one-shot request.
fn proto_target() -> Vec<Vec<u8>> {
    let hello = line(&Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("source") });
    let offer = source_offer(false);
    let chunk_bytes = |file: u32, chunk: u64, len: usize| vec![(file * 7 + chunk as u32) as u8; len];
    // File 0: chunks of 4096 and 10 bytes; file 1: one of 10; file 2: empty.
    let chunks: [(u32, u64, usize); 3] = [(0, 0, 4096), (0, 1, 10), (1, 0, 10)];
    let chunk_lines: Vec<u8> = chunks
        .iter()
        .flat_map(|&(f, c, len)| {
            let crc = crate::crc32c(&chunk_bytes(f, c, len));
            format!("c {f} {} {len} {crc}\n", c * u64::from(CHUNK_LEN_BYTES)).into_bytes()
        })
        .collect();
    let file_crc = |f: u32| -> u32 {
        chunks.iter().filter(|c| c.0 == f).fold(0u32, |crc, &(_, c, len)| {
            let chunk_crc = crate::crc32c(&chunk_bytes(f, c, len));
            if c == 0 {
                chunk_crc
            } else {
                crate::crc32c_combine(crc, chunk_crc, len as u64)
            }
        })
    };
    let done: Vec<u8> = offer
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            line(&Message::FileDone { file_index: i as u32, size_bytes: f.size_bytes, crc32c: file_crc(i as u32) })
        })
        .collect();
    let base = [hello.clone(), line(&Message::Offer(offer.clone())), chunk_lines.clone(), done.clone()].concat();
    let fence = |final_lsn: u64, through: Option<u64>| {
        line(&Message::Fence {
            final_lsn: Lsn(final_lsn),
            apply_wait_max_us: 100,
            through_lsn: through.map(Lsn),
            wal_wait_max_us: 1000,
        })
    };
    let flagged = |flags: u8, script: &[u8]| [&[flags][..], script].concat();
    let mut seeds = vec![
        flagged(0, &base),
        flagged(0, &[base.clone(), b"e\n".to_vec()].concat()),
        flagged(0, &[base.clone(), line(&Message::Commit { final_lsn: Lsn(150) }), b"e\n".to_vec()].concat()),
        flagged(0, &[base.clone(), fence(150, Some(149)), b"e\n".to_vec()].concat()),
        flagged(2, &[base.clone(), fence(150, None), fence(160, Some(155)), b"e\n".to_vec()].concat()),
        flagged(0, &[base.clone(), fence(50, None)].concat()),
        flagged(1, &[hello.clone(), line(&Message::Offer(offer.clone())), b"e\n".to_vec()].concat()),
        flagged(
            1,
            &[hello.clone(), line(&Message::Offer(offer.clone())), line(&Message::Commit { final_lsn: Lsn(120) })]
                .concat(),
        ),
        flagged(0, &[hello.clone(), line(&Message::Offer(offer.clone())), done.clone(), chunk_lines.clone()].concat()),
        flagged(
            0,
            &[
                hello.clone(),
                line(&Message::Offer(offer.clone())),
                chunk_lines.clone(),
                chunk_lines.clone(),
                done.clone(),
            ]
            .concat(),
        ),
        flagged(
            0,
            &[hello.clone(), line(&Message::Offer(offer.clone())), chunk_lines.clone(), b"e\n".to_vec()].concat(),
        ),
        flagged(
            0,
            &[hello.clone(), line(&Message::Join { migration_id: id() }), b"c 0 0 4096 1\ne\n".to_vec()].concat(),
        ),
        flagged(
            0,
            &[
                hello.clone(),
                line(&Message::Release { migration_id: id(), final_lsn: Lsn(150), fenced_durable_lsn: Some(Lsn(149)) }),
                b"e\n".to_vec(),
            ]
            .concat(),
        ),
        flagged(0, &[hello.clone(), line(&Message::Abort { migration_id: id(), reason: "stop".to_owned() })].concat()),
        flagged(
            0,
            &[hello.clone(), line(&Message::Error { kind: ErrorKind::Refused, message: "no".to_owned() })].concat(),
        ),
        flagged(0, &line(&Message::Hello { protocol_version: PROTOCOL_VERSION + 1, node_id: node("source") })),
        flagged(0, b"e\n"),
        flagged(0, &[hello.clone(), line(&Message::Offer(make_offer(&[1 << 20, 5, 0], true)))].concat()),
        flagged(0, &[hello.clone(), b"c 0 0 4096 1\n".to_vec()].concat()),
        flagged(
            0,
            &[base.clone(), line(&Message::Commit { final_lsn: Lsn(150) }), fence(150, None), b"e\n".to_vec()].concat(),
        ),
        flagged(3, &[base, fence(150, Some(150)), line(&Message::Acks { chunks: vec![] })].concat()),
    ];
    seeds.push(flagged(
        0,
        &[hello, line(&Message::Offer(offer)), b"c 0 1 4096 1\nc 5 0 10 1\nc 0 4096 9 1\n".to_vec()].concat(),
    ));
    seeds
}

/// Scripts of a target answering the source: hello, accept, acks and file reports, the base
/// staged, then a commit, fences, or answers to one-shot requests.
fn proto_source() -> Vec<Vec<u8>> {
    let hello = line(&Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("target") });
    let accept = line(&Message::Accept { resume: vec![], bytes_resent: 0, already_staged: false });
    let chunks = [
        ChunkRef { file_index: 0, chunk_index: 0 },
        ChunkRef { file_index: 0, chunk_index: 1 },
        ChunkRef { file_index: 1, chunk_index: 0 },
    ];
    let acks = line(&Message::Acks { chunks: chunks.to_vec() });
    let staged: Vec<u8> = (0..3).flat_map(|i| line(&Message::FileStaged { file_index: i })).collect();
    let base_staged = line(&Message::BaseStaged { bytes_resent: 0 });
    let copied = [hello.clone(), accept.clone(), acks.clone(), staged.clone(), base_staged.clone()].concat();
    let fenced = line(&Message::Fenced { durable_lsn: Lsn(150), commit_us: 5, apply_wait_us: 1 });
    let resume = line(&Message::Accept {
        resume: vec![FileResume { file_index: 0, chunks: vec![(0, chunk_crc(chunks[0])), (1, 99)] }],
        bytes_resent: 4096,
        already_staged: false,
    });
    let flagged = |flags: u8, script: &[u8]| [&[flags][..], script].concat();
    vec![
        flagged(0, &[copied.clone(), line(&Message::Committed), b"e\n".to_vec()].concat()),
        flagged(0, &copied),
        flagged(0, &[hello.clone(), accept.clone(), acks.clone(), b"e\n".to_vec()].concat()),
        flagged(1, &[copied.clone(), b"f 150 149 1000000\n".to_vec(), fenced.clone()].concat()),
        flagged(
            9,
            &[copied.clone(), b"f 150 0 1000000\n".to_vec(), fenced.clone(), b"f 160 0 5\nt 10\n".to_vec()].concat(),
        ),
        flagged(1, &[copied.clone(), b"f 150 0 1000\nt 2000\n".to_vec(), fenced.clone()].concat()),
        flagged(
            1,
            &[
                copied.clone(),
                b"f 150 0 1000000\n".to_vec(),
                line(&Message::FenceCancelled { reason: "late".to_owned() }),
            ]
            .concat(),
        ),
        flagged(2, &[copied.clone(), b"e\n".to_vec()].concat()),
        flagged(0, &[hello.clone(), resume.clone(), acks.clone(), staged.clone(), base_staged.clone()].concat()),
        flagged(
            1,
            &[hello.clone(), resume, acks.clone(), staged.clone(), base_staged.clone(), b"f 150 150 100\n".to_vec()]
                .concat(),
        ),
        flagged(
            0,
            &[
                hello.clone(),
                line(&Message::Accept { resume: vec![], bytes_resent: 10, already_staged: true }),
                base_staged.clone(),
                line(&Message::Committed),
            ]
            .concat(),
        ),
        flagged(0, &[hello.clone(), accept.clone(), staged.clone()].concat()),
        flagged(0, &[hello.clone(), accept.clone(), acks.clone(), acks.clone()].concat()),
        flagged(
            0,
            &[hello.clone(), line(&Message::Error { kind: ErrorKind::Refused, message: "full".to_owned() })].concat(),
        ),
        flagged(0, &line(&Message::Hello { protocol_version: 1, node_id: node("target") })),
        flagged(0, b"e\n"),
        flagged(3, &[hello.clone(), line(&Message::Joined)].concat()),
        flagged(3, &[hello.clone(), b"e\n".to_vec()].concat()),
        flagged(4, &[hello.clone(), line(&Message::Released)].concat()),
        flagged(4, &[hello.clone(), line(&Message::Aborted)].concat()),
        flagged(5, &[hello.clone(), line(&Message::Aborted), b"e\n".to_vec()].concat()),
        flagged(5, &[hello, line(&Message::WalDurable { durable_lsn: Lsn(5) })].concat()),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fuzzing::proto::{run_source, run_target};

    fn seeds(name: &str) -> Vec<Vec<u8>> {
        all().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    /// The decoder seeds are valid encodings: the fuzzer starts past every check.
    #[test]
    fn decoder_seeds_decode() {
        for seed in seeds("message") {
            Message::decode(&seed).unwrap();
        }
        for seed in seeds("manifest") {
            StagingManifest::decode(&seed).unwrap();
        }
        for seed in seeds("wal_batch") {
            walstream::decode(&seed).unwrap();
        }
        for seed in seeds("frame") {
            assert!(matches!(frame::decode(&seed[1..]), Ok(frame::Decoded::Frame { .. })), "{seed:?}");
        }
        for seed in seeds("chunk_log") {
            checkpoint::replay(&seed[1..], checkpoint::offer_digest(&source_offer(false))).unwrap();
        }
        for seed in seeds("wal_segment").iter().filter(|s| s.len() > 2) {
            assert!(crate::wal::first_record(&seed[2..]).is_some(), "{seed:?}");
        }
        let walked: Vec<usize> =
            seeds("wal_segment").iter().map(|s| crate::fuzzing::formats::run_wal_segment(s)).collect();
        assert!(
            walked.iter().filter(|n| **n > 0).count() >= 15,
            "the cursor returns records on most seeds: {walked:?}"
        );
    }

    /// The machines' seeds reach the ends of their conversations.
    #[test]
    fn machine_seeds_reach_the_end_of_a_conversation() {
        let target = seeds("proto_target");
        assert!(run_target(&target[2]).ends_with(&["committed", "finish"]), "{:?}", run_target(&target[2]));
        assert!(run_target(&target[3]).ends_with(&["fenced", "finish"]), "{:?}", run_target(&target[3]));
        assert!(
            run_target(&target[4]).ends_with(&["fence_cancelled", "fence_cancelled", "finish"]),
            "{:?}",
            run_target(&target[4])
        );
        assert!(run_target(&target[1]).contains(&"base_staged"), "{:?}", run_target(&target[1]));
        let source = seeds("proto_source");
        assert!(run_source(&source[0]).ends_with(&["finish-committed"]), "{:?}", run_source(&source[0]));
        assert!(run_source(&source[3]).ends_with(&["finish-fenced"]), "{:?}", run_source(&source[3]));
        assert!(run_source(&source[18]).ends_with(&["answered"]), "{:?}", run_source(&source[18]));
    }
}
