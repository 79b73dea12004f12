//! A raw QUIC peer (with a valid certificate) that sends malformed, oversized or
//! out-of-protocol frames gets its connection closed with an error code, and the daemon keeps
//! serving others.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::quic::{close_code, QuicTuning};
use ferry_engine::storage::DiskStorage;
use ferry_tests::{copy, node, request, write_file, Certs, Target};
use ferry_wire::frame::{encode_control, FrameHeader, FrameKind, PROTOCOL_VERSION};
use ferry_wire::message::{Message, Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::{Lsn, MigrationId, VShardId};

async fn connect(certs: &Certs, target: &Target) -> quinn::Connection {
    let tuning = QuicTuning::default();
    let endpoint = ferry_engine::quic::client_endpoint(target.addr, &tuning).unwrap();
    let crypto = ferry_engine::tls::client_crypto(&certs.identity("source")).unwrap();
    let config = ferry_engine::quic::client_config(crypto, &tuning);
    endpoint.connect_with(config, target.addr, "target").unwrap().await.unwrap()
}

/// Waits for the target to close the connection; returns its code and reason.
async fn close_code_of(conn: &quinn::Connection) -> (u32, String) {
    let err = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("the target never closed");
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            (close.error_code.into_inner() as u32, String::from_utf8_lossy(&close.reason).into_owned())
        }
        other => panic!("expected an application close, got {other}"),
    }
}

fn hello() -> Vec<u8> {
    encode_control(&Message::Hello { protocol_version: PROTOCOL_VERSION, node_id: node("source") }.encode()).unwrap()
}

fn offer() -> Vec<u8> {
    let offer = Offer {
        migration_id: MigrationId::new("hostile").unwrap(),
        vshard_id: VShardId(1),
        base_lsn: Lsn(0),
        chunk_len_bytes: 4096,
        files: vec![OfferFile { path: RelPath::new("f").unwrap(), size_bytes: 8192 }],
        db_meta: serde_json::Value::Null,
        wal: false,
    };
    encode_control(&Message::Offer(offer).encode()).unwrap()
}

/// Sends `bytes` on a fresh control stream and returns the close code the target answers with.
async fn send_control(certs: &Certs, target: &Target, bytes: &[u8]) -> (u32, String) {
    let conn = connect(certs, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    close_code_of(&conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_the_connection_with_a_code_and_others_are_still_served() {
    let certs = Certs::new().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let target = Target::start(&certs, target_dir.path(), Arc::new(DiskStorage)).unwrap();

    // Garbage instead of a frame.
    let (code, reason) = send_control(&certs, &target, &[0xAB; 64]).await;
    assert_eq!(code, close_code::MALFORMED, "{reason}");
    assert!(reason.contains("magic"), "{reason}");

    // A valid header claiming a 4 GiB body: refused before anything is allocated or read.
    let huge = FrameHeader {
        kind: FrameKind::Control,
        body_len_bytes: u32::MAX,
        chunk_file_index: 0,
        chunk_offset_bytes: 0,
        body_crc32c: 0,
    };
    let (code, reason) = send_control(&certs, &target, &huge.encode()).await;
    assert_eq!(code, close_code::MALFORMED, "{reason}");

    // A 10 MiB hello: within the frame limit, over what is allowed before an offer.
    let big = FrameHeader { body_len_bytes: 10 << 20, ..huge };
    let (code, reason) = send_control(&certs, &target, &big.encode()).await;
    assert_eq!(code, close_code::MALFORMED, "{reason}");

    // A corrupted body (header intact).
    let mut framed = hello();
    let last = framed.len() - 1;
    framed[last] ^= 0x01;
    let (code, reason) = send_control(&certs, &target, &framed).await;
    assert_eq!(code, close_code::MALFORMED, "{reason}");

    // A well-formed frame that is not JSON of a message.
    let (code, _) = send_control(&certs, &target, &encode_control(b"{\"type\":\"nonsense\"}").unwrap()).await;
    assert_eq!(code, close_code::MALFORMED);

    // Another protocol version.
    let other_version =
        encode_control(&Message::Hello { protocol_version: 99, node_id: node("source") }.encode()).unwrap();
    let (code, reason) = send_control(&certs, &target, &other_version).await;
    assert_eq!(code, close_code::INCOMPATIBLE_VERSION, "{reason}");

    // Out of order: an offer before the hello.
    let (code, _) = send_control(&certs, &target, &offer()).await;
    assert_eq!(code, close_code::PROTOCOL);

    // After a valid offer: a chunk for a file that does not exist, and a chunk whose bytes do
    // not match its checksum.
    for (header, body, expected) in [
        (FrameHeader::chunk(5, 0, 4096, 0).unwrap(), vec![0u8; 4096], close_code::PROTOCOL),
        (FrameHeader::chunk(0, 100, 4096, 0).unwrap(), vec![0u8; 4096], close_code::PROTOCOL),
        (FrameHeader::chunk(0, 0, 4096, 0xDEAD_BEEF).unwrap(), vec![7u8; 4096], close_code::CHECKSUM),
    ] {
        let conn = connect(&certs, &target).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello()).await.unwrap();
        send.write_all(&offer()).await.unwrap();
        // Wait for the accept, so the chunk is judged against the offer.
        let mut buf = vec![0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await;
        let mut uni = conn.open_uni().await.unwrap();
        uni.write_all(&header.encode()).await.unwrap();
        uni.write_all(&body).await.unwrap();
        let (code, reason) = close_code_of(&conn).await;
        assert_eq!(code, expected, "{reason}");
    }

    // The daemon still serves a well-behaved source.
    let source = tempfile::tempdir().unwrap();
    write_file(source.path(), "ok.seg", 100_000, 9);
    copy(&certs, request("after-hostile", source.path(), target.addr, 4096)).await.unwrap();
    target.stop();
}
