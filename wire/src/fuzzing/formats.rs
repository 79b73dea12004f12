//! Fuzz target bodies for the decoders: frames, control messages, the staging manifest, WAL
//! segments (preamble, record headers, records, the tail cursor), WAL batches, the chunk log,
//! the phase record's two-slot file and the control socket's request lines.
//!
//! What it does: feeds the input to the decoder the way the engine does (a frame stream is
//! walked frame after frame, a segment is polled by the cursor as it grows), after fixing up
//! CRC32Cs when the mode byte says so, and asserts what a decoded value promises.
//!
//! What it does not: reach the protocol machines (see [`super::proto`]).

use crate::api::{FenceParams, PhaseRecord, StartParams};
use crate::checkpoint::{self, LogRecord, LOG_HEADER_LEN_BYTES, LOG_RECORD_LEN_BYTES};
use crate::control::{self, LineReader};
use crate::frame::{self, Decoded, FrameKind, HEADER_LEN_BYTES};
use crate::manifest::{StagingManifest, CHECKSUM_PREFIX_LEN_BYTES};
use crate::message::Message;
use crate::wal::cursor::{Cursor, CursorConfig, LayoutChoice, Mode, Step};
use crate::wal::{check_record, first_record, record_crc, Layout, Preamble, RecordHeader, PREAMBLE_LEN_BYTES};
use crate::{slots, walstream, Lsn};

use super::{le_u32, put_u32, split_mode};

/// A stream of frames, as a connection's reader walks it; control and WAL batch bodies are
/// decoded too. Fix-up: each frame's body CRC (when its body is there), then its header CRC.
pub fn frame(data: &[u8]) {
    let (fix, bytes) = split_mode(data);
    let mut buf = bytes.to_vec();
    if fix {
        fix_frames(&mut buf);
    }
    let mut at = 0usize;
    while let Some(rest) = buf.get(at..).filter(|r| !r.is_empty()) {
        match frame::decode(rest) {
            Ok(Decoded::NeedMore { missing_bytes }) => {
                assert!(missing_bytes > 0, "asked for zero more bytes");
                break;
            }
            Ok(Decoded::Frame { header, body }) => {
                assert_eq!(body.start, HEADER_LEN_BYTES);
                let body_bytes = rest.get(body.clone()).expect("the body range lies inside the buffer");
                assert_eq!(header.encode()[..], rest[..HEADER_LEN_BYTES], "a decoded header encodes back to its bytes");
                match header.kind {
                    FrameKind::Control => {
                        let _ = Message::decode(body_bytes);
                    }
                    FrameKind::WalBatch => {
                        let _ = walstream::decode(body_bytes);
                    }
                    FrameKind::Chunk => {}
                }
                at += body.end;
            }
            Err(_) => break,
        }
    }
}

fn fix_frames(buf: &mut [u8]) {
    let mut at = 0usize;
    while let Some(header) = buf.get(at..at + HEADER_LEN_BYTES) {
        let body_len = le_u32(header, 8).unwrap_or(0) as usize;
        let body_start = at + HEADER_LEN_BYTES;
        let body_end = body_start.saturating_add(body_len);
        if let Some(body) = buf.get(body_start..body_end) {
            let crc = crate::crc32c(body);
            put_u32(buf, at + 24, crc);
        }
        let crc = crate::crc32c(&buf[at..at + 28]);
        put_u32(buf, at + 28, crc);
        if body_end > buf.len() {
            break;
        }
        at = body_end;
    }
}

/// One control message body (JSON): what decodes re-encodes to something that decodes, and
/// an offer's checks and digest run on it.
pub fn message(data: &[u8]) {
    let Ok(message) = Message::decode(data) else { return };
    let again = Message::decode(&message.encode());
    assert!(again.is_ok(), "{message:?} does not decode from its own encoding: {again:?}");
    if let Message::Offer(offer) = &message {
        if offer.validate().is_ok() {
            let _ = checkpoint::offer_digest(offer);
            let _ = offer.bytes_total();
        }
    }
    let _ = crate::proto::target::check_wal_start(Some(message));
}

/// `MANIFEST.json`: what decodes re-encodes to the same manifest. Fix-up (the input has no
/// mode byte, so its length picks: three lengths in four): a file that opens with its checksum
/// line gets the checksum of what follows it, so the fuzzer reaches the JSON.
pub fn manifest(data: &[u8]) {
    let mut buf = data.to_vec();
    let head = b"{\n  \"manifest_crc32c\": \"";
    if data.len() % 4 != 3 && buf.starts_with(head) && buf.len() >= CHECKSUM_PREFIX_LEN_BYTES {
        let crc = crate::crc32c(&buf[CHECKSUM_PREFIX_LEN_BYTES..]);
        buf[head.len()..head.len() + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    }
    let Ok(manifest) = StagingManifest::decode(&buf) else { return };
    let again = StagingManifest::decode(&manifest.encode());
    assert!(again.is_ok(), "{manifest:?} does not decode from its own encoding: {again:?}");
}

/// One WAL segment: the preamble, both header layouts, the record check, and the tail
/// cursor walking it as it grows (half of it, then all of it sealed). The second input byte
/// picks the cursor's layout, mode and alignment. Fix-up: every record found (magic,
/// version and a payload that fits) gets its CRC under the picked layout (A when auto).
pub fn wal_segment(data: &[u8]) {
    let _ = run_wal_segment(data);
}

/// [`wal_segment`], returning how many records the cursor returned.
pub fn run_wal_segment(data: &[u8]) -> usize {
    let (fix, rest) = split_mode(data);
    let Some((config_byte, segment)) = rest.split_first() else { return 0 };
    let layout = match config_byte & 3 {
        0 | 1 => LayoutChoice::Auto,
        2 => LayoutChoice::Fixed(Layout::A),
        _ => LayoutChoice::Fixed(Layout::B),
    };
    let mode = if config_byte & 4 == 0 { Mode::Live } else { Mode::Staged };
    let alignment_bytes = if config_byte & 8 == 0 { 512 } else { 4096 };
    let fix_layout = match layout {
        LayoutChoice::Fixed(l) => l,
        LayoutChoice::Auto if config_byte & 1 == 1 => Layout::B,
        LayoutChoice::Auto => Layout::A,
    };
    let mut segment = segment.to_vec();
    if fix {
        fix_wal_records(fix_layout, &mut segment);
    }
    let _ = Preamble::decode(&segment);
    for layout in Layout::ALL {
        if let Ok((header, len)) = check_record(layout, &segment) {
            assert!(len <= segment.len() && len >= layout.header_len_bytes());
            let _ = header.record_len_bytes();
        }
    }
    let first = first_record(&segment);
    let first_lsn = first.map_or(Lsn(1), |(_, h)| h.lsn);
    let config = CursorConfig { layout, alignment_bytes, mode };
    let start_lsn = if config_byte & 16 == 0 { None } else { Some(first_lsn) };
    let Ok(mut cursor) = Cursor::new(config, start_lsn) else { return 0 };
    if cursor.open_segment(first_lsn).is_err() {
        return 0;
    }
    let half = segment.len() / 2;
    walk(&mut cursor, &segment[..half], false) + walk(&mut cursor, &segment, true)
}

/// Polls until the cursor waits, ends the segment or stops; checks each record's ranges.
/// Returns the records it returned.
fn walk(cursor: &mut Cursor, bytes: &[u8], sealed: bool) -> usize {
    for records in 0..=bytes.len() {
        let before = cursor.offset_bytes();
        match cursor.poll(bytes, sealed) {
            Ok(Step::Record(record)) => {
                assert!(record.record_range().end <= bytes.len(), "a record's range lies inside the bytes polled");
                assert!(record.payload(bytes).is_some());
                assert!(cursor.offset_bytes() > before, "an accepted record advances the offset");
            }
            Ok(Step::Wait { .. }) | Ok(Step::EndOfSegment { .. }) | Err(_) => return records,
        }
    }
    panic!("the cursor returned more records than the segment has bytes");
}

fn fix_wal_records(layout: Layout, segment: &mut [u8]) {
    let mut at = if Preamble::is_present(segment) { PREAMBLE_LEN_BYTES } else { 0 };
    while at < segment.len() {
        let header = RecordHeader::decode(layout, &segment[at..]);
        let total = header.map(|h| layout.header_len_bytes() + h.payload_len as usize);
        match total {
            Ok(total) if at + total <= segment.len() => {
                let record = &segment[at..at + total];
                let crc = record_crc(layout, record, &record[layout.header_len_bytes()..]);
                put_u32(segment, at + layout.crc_offset_bytes(), crc);
                at += total;
            }
            _ => at += 1,
        }
    }
}

/// A WAL batch body: what decodes re-encodes to the same bytes.
pub fn wal_batch(data: &[u8]) {
    let Ok(records) = walstream::decode(data) else { return };
    let mut body = Vec::with_capacity(data.len());
    for record in &records {
        assert!(walstream::push(&mut body, record), "a decoded record fits a batch again");
    }
    assert_eq!(body, data, "a decoded batch encodes back to its bytes");
}

/// The chunk log: header then records. Fix-up: the header's CRC and each record's. The
/// expected offer digest is the header's own (a log of another offer is refused up front).
pub fn chunk_log(data: &[u8]) {
    let (fix, bytes) = split_mode(data);
    let mut log = bytes.to_vec();
    if fix && log.len() >= LOG_HEADER_LEN_BYTES {
        let crc = crate::crc32c(&log[..28]);
        put_u32(&mut log, 28, crc);
        let mut at = LOG_HEADER_LEN_BYTES;
        while at + LOG_RECORD_LEN_BYTES <= log.len() {
            let crc = crate::crc32c(&log[at..at + 20]);
            put_u32(&mut log, at + 20, crc);
            at += LOG_RECORD_LEN_BYTES;
        }
    }
    for record in log.get(LOG_HEADER_LEN_BYTES..).unwrap_or(&[]).chunks_exact(LOG_RECORD_LEN_BYTES) {
        let mut bytes = [0u8; LOG_RECORD_LEN_BYTES];
        bytes.copy_from_slice(record);
        if let Some(decoded) = LogRecord::decode(&bytes) {
            assert_eq!(decoded.encode(), bytes, "a decoded record encodes back to its bytes");
        }
    }
    let digest = le_u32(&log, 12).unwrap_or(0);
    if let Ok(replay) = checkpoint::replay(&log, digest) {
        let valid = usize::try_from(replay.valid_len_bytes).unwrap_or(usize::MAX);
        assert!(valid >= LOG_HEADER_LEN_BYTES && valid <= log.len(), "valid length {valid} of {}", log.len());
        assert_eq!((valid - LOG_HEADER_LEN_BYTES) % LOG_RECORD_LEN_BYTES, 0, "the log is cut at a record boundary");
    }
}

/// The phase record's two-slot file. Input after the mode byte: slot length selector (one
/// byte: 1 to 4 blocks), the first slot's bytes' length (u16 LE), the first slot's bytes,
/// the second slot's bytes; each slot is zero-padded. Fix-up: a phase record inside a slot
/// gets its body length and CRC, then each slot its header CRC. The newest payload is
/// decoded as a phase record, and the next rewrite is applied and read back.
pub fn phase_slots(data: &[u8]) {
    let (fix, rest) = split_mode(data);
    let [blocks, len_lo, len_hi, rest @ ..] = rest else { return };
    let slot_len = slots::SLOT_ALIGN_BYTES * (1 + usize::from(blocks % 4));
    let first_len = usize::from(u16::from_le_bytes([*len_lo, *len_hi])).min(rest.len());
    let (first, second) = rest.split_at(first_len);
    let mut file = vec![0u8; slot_len * 2];
    for (i, content) in [first, second].into_iter().enumerate() {
        let slot = &mut file[i * slot_len..(i + 1) * slot_len];
        let n = content.len().min(slot_len);
        slot[..n].copy_from_slice(&content[..n]);
        if fix {
            fix_slot(slot);
        }
    }
    let Ok(newest) = slots::newest(&file) else { return };
    if let Ok(record) = PhaseRecord::decode(newest.payload) {
        let again = PhaseRecord::decode(&record.encode());
        assert!(again.is_ok(), "{record:?} does not decode from its own encoding: {again:?}");
    }
    let payload = newest.payload.iter().rev().copied().collect::<Vec<u8>>();
    let (write, sequence) = (slots::next_write(file.len(), &newest, &payload), newest.sequence);
    if let Some(write) = write {
        let at = usize::try_from(write.offset_bytes).unwrap();
        file[at..at + write.bytes.len()].copy_from_slice(&write.bytes);
        let after = slots::newest(&file).expect("a file just rewritten has a valid slot");
        assert_eq!(after.payload, &payload[..], "the rewrite is the newest record");
        assert_eq!(after.sequence, sequence + 1);
    }
}

fn fix_slot(slot: &mut [u8]) {
    let header = slots::SLOT_HEADER_LEN_BYTES;
    let Some(len) = le_u32(slot, 16).map(|l| l as usize) else { return };
    let Some(end) = header.checked_add(len).filter(|end| *end <= slot.len()) else { return };
    // A phase record: magic (8) | version | body_len | crc32c(body) | body.
    if slot.get(header..header + 8) == Some(b"FERRYPR\n".as_slice()) && len >= 20 {
        let body_start = header + 20;
        let body_len = u32::try_from(end - body_start).unwrap_or(u32::MAX);
        put_u32(slot, header + 12, body_len);
        let crc = crate::crc32c(&slot[body_start..end]);
        put_u32(slot, header + 16, crc);
    }
    let crc = crate::crc32c_append(crate::crc32c(&slot[..20]), &slot[header..end]);
    put_u32(slot, 20, crc);
}

/// Control socket lines, as the daemon reads them (and as its client reads the daemon's):
/// split by the line reader with a small limit, decoded as a request and as a server line,
/// and a request's parameters parsed as the daemon parses `migration.start` and
/// `migration.fence`. No CRC here. An error's reply must stay within a line's limit.
pub fn control_request(data: &[u8]) {
    let mut reader = LineReader::new(1024);
    let (a, b) = data.split_at(data.len() / 2);
    reader.push(a);
    let mut lines = Vec::new();
    while let Some(line) = reader.next_line() {
        lines.push(line);
    }
    reader.push(b);
    while let Some(line) = reader.next_line() {
        lines.push(line);
    }
    for line in lines.into_iter().flatten() {
        let _ = control::decode_server_line(&line);
        match control::decode_line(&line) {
            Ok(request) => {
                match request.method.as_str() {
                    "migration.start" => {
                        if let Ok(params) = serde_json::from_value::<StartParams>(request.params.clone()) {
                            let _ = params.validate();
                        }
                    }
                    "migration.fence" => {
                        let _ = serde_json::from_value::<FenceParams>(request.params.clone());
                    }
                    _ => {}
                }
                let reply = control::encode_request(&request);
                assert!(control::decode_line(&reply).is_ok(), "a decoded request encodes to a valid line");
            }
            Err(error) => {
                let reply = control::encode_response(&control::Response { id: None, outcome: Err(error) });
                assert!(reply.len() <= 64 << 10, "an error reply of {} bytes quotes too much input", reply.len());
            }
        }
    }
}
