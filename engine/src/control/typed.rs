//! The typed control socket calls, re-exported from the `ferry-client` crate, and their tests
//! against this engine's [`ControlServer`](super::ControlServer).
//!
//! What it does: keeps `ferry_engine::control::typed::...` paths working (the CLI's
//! `MigrationEvent`, `NodeInfo`, ...) and checks, with a scripted [`Handler`](super::Handler)
//! behind the real server, that each typed call sends the contract's params, reads its result,
//! keeps the daemon's error codes and turns bad answers into protocol errors.
//!
//! What it does not: define the calls; they live in `engine/client/src/typed.rs`, so a
//! coordinator links them without quinn, rustls or io-uring.

pub use ferry_client::typed::*;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use ferry_wire::api::{Role, WalProgress};
    use ferry_wire::control::RpcError;
    use tokio::sync::{broadcast, oneshot};

    use ferry_wire::api::{Phase, StartParams};
    use ferry_wire::{MigrationId, VShardId};
    use serde_json::{json, Value};

    use super::*;
    use crate::control::{
        CallFuture, ClientError, ControlClient, ControlConfig, ControlServer, ErrorCode, Handler, Reply, Subscription,
    };

    type Script = dyn Fn(&str, &Value) -> Result<Reply, RpcError> + Send + Sync;

    /// A daemon stand-in: answers each call with what the test scripted and records the calls.
    struct Scripted {
        script: Box<Script>,
        calls: Mutex<Vec<(String, Value)>>,
    }

    impl Handler for Scripted {
        fn call(&self, method: String, params: Value) -> CallFuture {
            let answer = (self.script)(&method, &params);
            self.calls.lock().unwrap().push((method, params));
            Box::pin(async move { answer })
        }
    }

    struct Served {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        handler: Arc<Scripted>,
        _stop: oneshot::Sender<()>,
    }

    impl Served {
        async fn client(&self) -> ControlClient {
            ControlClient::connect(&self.socket).await.unwrap()
        }

        fn calls(&self) -> Vec<(String, Value)> {
            self.handler.calls.lock().unwrap().clone()
        }
    }

    fn serve(script: impl Fn(&str, &Value) -> Result<Reply, RpcError> + Send + Sync + 'static) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ctl").join("ferry.sock");
        let handler = Arc::new(Scripted { script: Box::new(script), calls: Mutex::new(Vec::new()) });
        let server = ControlServer::bind(ControlConfig::new(&socket), handler.clone()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Served { _dir: dir, socket, handler, _stop: stop }
    }

    fn status_value(id: &str, phase: &str) -> Value {
        json!({"migration_id": id, "role": "source", "phase": phase, "vshard_id": 7, "peer_node": "node-b",
            "bytes_transferred": 1_048_576, "bytes_total": 4_194_304, "bytes_resent": 0, "files_staged": 1,
            "files_total": 4, "wal": {"start_lsn": 1, "current_lsn": 90, "source_lsn": 100, "held_bytes": 65536},
            "rate_limit_bytes_per_sec": 0, "throughput_bytes_per_sec": 250_000_000, "pause_duration_us": null,
            "reason": null, "staging_state": "copying", "started_at_unix_ms": 1000, "updated_at_unix_ms": 2000})
    }

    fn id(text: &str) -> MigrationId {
        MigrationId::new(text).unwrap()
    }

    fn params() -> StartParams {
        serde_json::from_value(json!({"migration_id": "m-7-0", "vshard_id": 7, "segments_root": "/seg",
            "target_address": "127.0.0.1:7070", "target_node_id": "node-b", "offline": true}))
        .unwrap()
    }

    #[tokio::test]
    async fn typed_methods_send_the_contract_params_and_read_the_results() {
        let served = serve(|method, params| {
            let id = params.get("migration_id").cloned().unwrap_or(Value::Null);
            Ok(Reply::Value(match method {
                "node.info" => json!({"node_id": "node-a", "version": "0.1.0", "protocol_version": 1,
                    "quic_address": "127.0.0.1:7070", "features": {"rdma": false}, "devices": [],
                    "roles": ["source", "target"], "a_field_from_the_future": 1}),
                "migration.start" => json!({"migration_id": id, "created": true}),
                "migration.status" => status_value("m-7-0", "BaseCopy"),
                "migration.list" => json!({"migrations": [status_value("m-7-0", "BaseCopy"),
                    status_value("m-8-0", "Completed")]}),
                "migration.abort" => json!({"migration_id": id, "phase": "Failed", "aborted": true}),
                "migration.forget" => json!({"migration_id": id, "forgotten": true}),
                "migration.set_rate_limit" => json!({"migration_id": id,
                    "rate_limit_bytes_per_sec": params["bytes_per_sec"]}),
                other => return Err(RpcError::method_not_found(other)),
            }))
        });
        let mut client = served.client().await;
        let info = client.node_info().await.unwrap();
        assert_eq!((info.node_id.as_str(), info.protocol_version, info.roles.len()), ("node-a", 1, 2));

        let started = client.start(&params()).await.unwrap();
        assert_eq!(started, Started { migration_id: id("m-7-0"), created: true });

        let status = client.status(&id("m-7-0")).await.unwrap();
        assert_eq!((status.role, status.phase, status.bytes_total), (Role::Source, Phase::BaseCopy, 4_194_304));
        assert_eq!(
            status.wal,
            WalProgress { start_lsn: Some(1), current_lsn: Some(90), source_lsn: Some(100), held_bytes: 65536 }
        );

        let list = client.list().await.unwrap();
        assert_eq!(list.iter().map(|s| s.phase).collect::<Vec<_>>(), [Phase::BaseCopy, Phase::Completed]);

        let aborted = client.abort(&id("m-7-0"), Some("operator said so")).await.unwrap();
        assert_eq!((aborted.phase, aborted.aborted), (Phase::Failed, true));
        assert!(client.abort(&id("m-7-0"), None).await.unwrap().aborted);
        assert!(client.forget(&id("m-7-0")).await.unwrap().forgotten);
        let set = client.set_rate_limit(&id("m-7-0"), 100_000_000).await.unwrap();
        assert_eq!(set.rate_limit_bytes_per_sec, 100_000_000);

        let calls = served.calls();
        let methods: Vec<&str> = calls.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            methods,
            [
                "node.info",
                "migration.start",
                "migration.status",
                "migration.list",
                "migration.abort",
                "migration.abort",
                "migration.forget",
                "migration.set_rate_limit"
            ]
        );
        // The start params arrive as the daemon parses them, not re-shaped.
        let sent: StartParams = serde_json::from_value(calls[1].1.clone()).unwrap();
        assert_eq!(sent, params());
        assert_eq!(calls[4].1, json!({"migration_id": "m-7-0", "reason": "operator said so"}));
        assert_eq!(calls[5].1, json!({"migration_id": "m-7-0"}));
        assert_eq!(calls[7].1, json!({"migration_id": "m-7-0", "bytes_per_sec": 100_000_000}));
    }

    #[tokio::test]
    async fn daemon_errors_keep_their_code_message_and_data() {
        let served = serve(|method, _| match method {
            "migration.start" => Err(RpcError::new(ErrorCode::MigrationInProgress, "vshard 7 is migrating as m-7-0")
                .with_data(json!({"vshard_id": 7}))),
            "migration.status" => Err(RpcError::new(ErrorCode::NotFound, "no migration m-9-0 on this node")),
            "migration.forget" => Err(RpcError::refused("m-7-0 is not final; abort it first")),
            other => Err(RpcError::method_not_found(other)),
        });
        let mut client = served.client().await;
        let err = client.start(&params()).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::MigrationInProgress));
        assert_eq!(err.vshard_in_progress(), Some(VShardId(7)));
        assert_eq!(err.rpc().unwrap().message, "vshard 7 is migrating as m-7-0");

        let err = client.status(&id("m-9-0")).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound));
        assert_eq!(err.vshard_in_progress(), None);
        let err = client.forget(&id("m-7-0")).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Refused));
        assert!(err.to_string().contains("abort it first"), "{err}");
        // The connection is still usable after errors.
        assert_eq!(client.node_info().await.unwrap_err().code(), Some(ErrorCode::MethodNotFound));
    }

    #[tokio::test]
    async fn malformed_results_are_protocol_errors_not_panics() {
        let served = serve(|method, params| {
            Ok(Reply::Value(match method {
                "node.info" => json!({"node_id": 5}),
                "migration.start" => json!({"migration_id": "a b", "created": true}),
                // Asked for m-7-0, answers about another migration.
                "migration.status" if params["migration_id"] == "m-7-0" => status_value("m-8-0", "BaseCopy"),
                "migration.status" => json!({"migration_id": "m-9-0", "phase": "Teleporting"}),
                "migration.list" => json!({"migrations": "none"}),
                "migration.abort" => json!([1, 2, 3]),
                "migration.forget" => Value::Null,
                "migration.set_rate_limit" => json!({"migration_id": "m-7-0", "rate_limit_bytes_per_sec": -1}),
                _ => json!({}),
            }))
        });
        let mut client = served.client().await;
        let protocol = |r: Result<(), ClientError>| match r {
            Err(ClientError::Protocol(v)) => v.0,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        let m7 = id("m-7-0");
        let m9 = id("m-9-0");
        let texts = [
            protocol(client.node_info().await.map(drop)),
            protocol(client.start(&params()).await.map(drop)),
            protocol(client.status(&m7).await.map(drop)),
            protocol(client.status(&m9).await.map(drop)),
            protocol(client.list().await.map(drop)),
            protocol(client.abort(&m7, None).await.map(drop)),
            protocol(client.forget(&m7).await.map(drop)),
            protocol(client.set_rate_limit(&m7, 1).await.map(drop)),
        ];
        assert!(texts[0].contains("node.info"), "{}", texts[0]);
        assert!(texts[2].contains("m-8-0"), "{}", texts[2]);
        assert!(texts[4].contains("migration.list"), "{}", texts[4]);
    }

    #[tokio::test]
    async fn events_are_typed_and_bad_ones_are_protocol_errors() {
        let (events_tx, _) = broadcast::channel::<Value>(4);
        let sender = events_tx.clone();
        let served = serve(move |method, params| match method {
            "events.subscribe" => Ok(Reply::Subscription(Subscription {
                result: json!({"subscribed": true}),
                events: sender.subscribe(),
                migration_id: params.get("migration_id").and_then(Value::as_str).map(str::to_owned),
            })),
            other => Err(RpcError::method_not_found(other)),
        });
        let mut events = served.client().await.migration_events(Some(&id("m-7-0"))).await.unwrap();
        assert_eq!(served.calls()[0].1, json!({"migration_id": "m-7-0"}));

        let with_kind = |kind: &str, phase: &str| {
            let mut v = status_value("m-7-0", phase);
            v["event"] = json!(kind);
            v
        };
        events_tx.send(with_kind("progress", "BaseCopy")).unwrap();
        // Another migration's event is filtered by the daemon, never seen here.
        events_tx.send(json!({"migration_id": "m-8-0", "event": "phase"})).unwrap();
        events_tx.send(with_kind("phase", "Completed")).unwrap();
        let Some(MigrationEvent::Status { kind, status }) = events.next().await.unwrap() else { panic!() };
        assert_eq!((kind, status.phase), (EventKind::Progress, Phase::BaseCopy));
        let Some(MigrationEvent::Status { kind, status }) = events.next().await.unwrap() else { panic!() };
        assert_eq!((kind, status.phase), (EventKind::Phase, Phase::Completed));

        events_tx.send(status_value("m-7-0", "BaseCopy")).unwrap();
        assert!(matches!(events.next().await, Err(ClientError::Protocol(_))), "no event kind");
        events_tx.send(json!({"migration_id": "m-7-0", "event": "phase", "phase": 3})).unwrap();
        assert!(matches!(events.next().await, Err(ClientError::Protocol(_))), "bad status");
        events_tx.send(with_kind("rewound", "WalCatchUp")).unwrap();
        let Some(MigrationEvent::Status { kind, .. }) = events.next().await.unwrap() else { panic!() };
        assert_eq!(kind, EventKind::Other("rewound".into()));

        // Sent faster than the server task can forward (this test runs on one thread): the
        // subscriber lags and is told how many it lost.
        for _ in 0..10 {
            events_tx.send(with_kind("progress", "BaseCopy")).unwrap();
        }
        let mut dropped_total = 0;
        let mut received = 0;
        while received + dropped_total < 10 {
            match events.next().await.unwrap().unwrap() {
                MigrationEvent::Dropped { dropped_count } => dropped_total += dropped_count,
                MigrationEvent::Status { .. } => received += 1,
            }
        }
        assert!(dropped_total > 0);
    }

    #[test]
    fn parse_event_rejects_non_objects() {
        assert!(matches!(parse_event(json!("progress")), Err(ClientError::Protocol(_))));
        assert!(matches!(parse_event(json!({"event": 1})), Err(ClientError::Protocol(_))));
        let mut v = status_value("m-1-0", "WalCatchUp");
        v["event"] = json!("phase");
        assert!(matches!(parse_event(v), Ok(MigrationEvent::Status { kind: EventKind::Phase, .. })));
    }

    #[test]
    fn an_rdma_fallback_event_carries_its_reason_and_needs_one() {
        let mut v = status_value("m-1-0", "BaseCopy");
        v["event"] = json!("rdma_fallback");
        v["chunk_transport"] = json!("quic");
        assert!(matches!(parse_event(v.clone()), Err(ClientError::Protocol(_))), "no reason");
        v["rdma_fallback_reason"] = json!("no RDMA device under /sys/class/infiniband");
        let Ok(MigrationEvent::Status { kind, status }) = parse_event(v) else { panic!() };
        assert_eq!(kind, EventKind::RdmaFallback { reason: "no RDMA device under /sys/class/infiniband".into() });
        assert_eq!(status.migration_id, "m-1-0");
    }
}
