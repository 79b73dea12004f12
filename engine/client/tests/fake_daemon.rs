//! The client against a fake daemon written here from the wire protocol alone (no engine):
//! typed calls, the daemon's error codes, events that race a call, the typed event stream
//! (unknown notifications skipped, dropped counts, the end of the stream), and a daemon that
//! answers the wrong id.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use ferry_client::{
    ClientError, ControlClient, ErrorCode, EventKind, MigrationEvent, MigrationId, Phase, Role, RpcError,
};
use ferry_wire::control::{
    decode_line, encode_notification, encode_response, Notification, Request, RequestId, Response,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// The lines the fake daemon writes for one request (each a whole JSON-RPC line).
type Script = fn(&Request) -> Vec<Vec<u8>>;

/// Serves every connection on a socket in a temporary folder with `script`.
fn fake_daemon(script: Script) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ferry.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Some(line) = lines.next_line().await.unwrap() {
                    let request = decode_line(line.as_bytes()).unwrap();
                    for out in script(&request) {
                        write.write_all(&out).await.unwrap();
                    }
                    if request.method == "events.subscribe" {
                        // The scripted events are out: end the stream as a stopping daemon does.
                        return;
                    }
                }
            });
        }
    });
    (dir, socket)
}

fn answer(request: &Request, outcome: Result<Value, RpcError>) -> Vec<u8> {
    encode_response(&Response { id: request.id.clone(), outcome })
}

fn note(method: &str, params: Value) -> Vec<u8> {
    encode_notification(&Notification { method: method.to_owned(), params })
}

fn status_value(id: &str, phase: &str) -> Value {
    json!({"migration_id": id, "role": "source", "phase": phase, "vshard_id": 7, "peer_node": "node-b",
        "bytes_transferred": 1_048_576, "bytes_total": 4_194_304, "bytes_resent": 0, "files_staged": 1,
        "files_total": 4, "wal": {"start_lsn": 1, "current_lsn": 90, "source_lsn": 100, "held_bytes": 65536},
        "rate_limit_bytes_per_sec": 0, "throughput_bytes_per_sec": 250_000_000, "pause_duration_us": null,
        "reason": null, "staging_state": "copying", "started_at_unix_ms": 1000, "updated_at_unix_ms": 2000})
}

fn script(request: &Request) -> Vec<Vec<u8>> {
    match request.method.as_str() {
        "node.info" => vec![answer(
            request,
            Ok(json!({"node_id": "node-a", "version": "0.1.0", "protocol_version": 2,
                "quic_address": "127.0.0.1:7070", "roles": ["source", "target"]})),
        )],
        "migration.status" => vec![answer(request, Err(RpcError::new(ErrorCode::NotFound, "no migration m-9-0")))],
        // An event that raced the call comes first: the call still gets its own answer.
        "migration.list" => vec![
            note("migration.event", json!({"event": "progress"})),
            answer(request, Ok(json!({"migrations": [status_value("m-7-0", "WalCatchUp")]}))),
        ],
        "events.subscribe" => {
            let mut event = status_value("m-7-0", "Completed");
            event["event"] = json!("phase");
            vec![
                answer(request, Ok(json!({"subscribed": true}))),
                note("node.something_newer", json!({})),
                note("migration.event", event),
                note("events.dropped", json!({"dropped_count": 3})),
            ]
        }
        other => vec![answer(request, Err(RpcError::method_not_found(other)))],
    }
}

#[tokio::test]
async fn typed_calls_and_events_against_a_daemon_built_from_the_protocol() {
    let (_dir, socket) = fake_daemon(script);
    let mut client = ControlClient::connect(&socket).await.unwrap();
    let info = client.node_info().await.unwrap();
    assert_eq!((info.node_id.as_str(), info.protocol_version, info.roles.len()), ("node-a", 2, 2));

    let err = client.status(&MigrationId::new("m-9-0").unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(err.rpc().unwrap().message, "no migration m-9-0");

    let list = client.list().await.unwrap();
    assert_eq!(
        list.iter().map(|m| (m.role, m.phase, m.vshard_id)).collect::<Vec<_>>(),
        [(Role::Source, Phase::WalCatchUp, Some(7))]
    );
    assert_eq!(
        client.abort(&MigrationId::new("m-7-0").unwrap(), None).await.unwrap_err().code(),
        Some(ErrorCode::MethodNotFound)
    );

    let mut events = ControlClient::connect(&socket).await.unwrap().migration_events(None).await.unwrap();
    let Some(MigrationEvent::Status { kind, status }) = events.next().await.unwrap() else { panic!("a status event") };
    assert_eq!((kind, status.phase, status.migration_id.as_str()), (EventKind::Phase, Phase::Completed, "m-7-0"));
    assert_eq!(events.next().await.unwrap(), Some(MigrationEvent::Dropped { dropped_count: 3 }));
    assert_eq!(events.next().await.unwrap(), None, "the daemon closed the stream");
}

#[tokio::test]
async fn an_answer_to_another_request_is_a_protocol_error() {
    let (_dir, socket) = fake_daemon(|_| {
        vec![encode_response(&Response { id: Some(RequestId::Number(9_999)), outcome: Ok(json!({})) })]
    });
    let mut client = ControlClient::connect(&socket).await.unwrap();
    match client.node_info().await {
        Err(ClientError::Protocol(v)) => assert!(v.0.contains("matches no request"), "{}", v.0),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}
