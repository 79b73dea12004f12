//! The control socket over a real Unix socket: normal paths, hostile input, permissions, uids.
//!
//! What it checks: a test [`Handler`] (`node.info`, `echo`, `add` with typed params, a named
//! ferry error, a panicking method, `events.subscribe` fed by the test) answers through the
//! real server and the typed client; a table of hostile inputs each gets its JSON-RPC code and
//! after each row a new connection still gets an answer; 1,000 clients at once; the connection
//! limit; events streamed, filtered, and dropped (with a count) for a slow subscriber without
//! stalling anyone else; socket 0600 in a 0700 folder, a 0777 folder refused; a client running
//! as another uid refused (the test drops privileges in a child process, so it needs root; in
//! CI, `CI=true`, running without root fails instead of skipping).
//!
//! What it does not: test the migration methods (the daemon's handler) or timing. Every wait
//! has a generous timeout so a wrong behaviour fails instead of hanging.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::control::{
    CallFuture, ClientError, ControlClient, ControlConfig, ControlError, ControlServer, Event, Handler, Reply,
    RpcError, Subscription,
};
use ferry_tests::wait_for_some;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);

/// The methods the tests call. Params are checked like the daemon's handler will.
struct TestHandler {
    events: broadcast::Sender<Value>,
}

impl Handler for TestHandler {
    fn call(&self, method: String, params: Value) -> CallFuture {
        let events = self.events.clone();
        Box::pin(async move {
            match method.as_str() {
                "node.info" => Ok(json!({ "node_id": "node-a", "protocol_version": 1 }).into()),
                "echo" => Ok(params.into()),
                "add" => {
                    let a = params.get("a").and_then(Value::as_i64);
                    let b = params.get("b").and_then(Value::as_i64);
                    match (a, b) {
                        (Some(a), Some(b)) => Ok(json!(a.wrapping_add(b)).into()),
                        _ => Err(RpcError::invalid_params("`a` and `b` must be integers")),
                    }
                }
                "migration.status" => {
                    Err(RpcError::new(ferry_engine::control::ErrorCode::NotFound, "no migration m-9")
                        .with_data(json!({ "migration_id": "m-9" })))
                }
                "crash" => panic!("the test handler panics on purpose"),
                "events.subscribe" => Ok(Reply::Subscription(Subscription {
                    result: json!({ "subscribed": true }),
                    events: events.subscribe(),
                    migration_id: params.get("migration_id").and_then(Value::as_str).map(str::to_owned),
                })),
                _ => Err(RpcError::method_not_found(&method)),
            }
        })
    }
}

struct Daemon {
    _root: TempDir,
    socket: PathBuf,
    events: broadcast::Sender<Value>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Binds in a fresh folder (`<tmp>/run`, created by the server) and serves.
    fn start(event_capacity: usize, configure: impl FnOnce(&mut ControlConfig)) -> Daemon {
        let root = tempfile::tempdir().unwrap();
        let socket = root.path().join("run").join("ferry.sock");
        Self::start_at(root, socket, event_capacity, configure)
    }

    fn start_at(
        root: TempDir,
        socket: PathBuf,
        event_capacity: usize,
        configure: impl FnOnce(&mut ControlConfig),
    ) -> Daemon {
        let (events, _) = broadcast::channel(event_capacity);
        let mut config = ControlConfig::new(&socket);
        configure(&mut config);
        let server = ControlServer::bind(config, Arc::new(TestHandler { events: events.clone() })).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Daemon { _root: root, socket, events, stop: Some(stop), task: Some(task) }
    }

    async fn client(&self) -> ControlClient {
        timeout(WAIT, ControlClient::connect(&self.socket)).await.unwrap().unwrap()
    }

    /// A valid request on a new connection answers.
    async fn assert_answers(&self) {
        let mut client = self.client().await;
        let info = timeout(WAIT, client.call("node.info", Value::Null)).await.unwrap().unwrap();
        assert_eq!(info["node_id"], "node-a");
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        timeout(WAIT, self.task.take().unwrap()).await.unwrap().unwrap();
        assert!(!self.socket.exists(), "the socket file is removed on shutdown");
    }
}

/// Writes `bytes` on a new connection (then half-closes if asked) and returns every line the
/// daemon sent before it closed the connection.
async fn exchange(socket: &Path, bytes: Vec<u8>, half_close: bool) -> Vec<Value> {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        // The daemon may close mid-write (an oversized line): that error is expected.
        let _ = writer.write_all(&bytes).await;
        if half_close {
            let _ = writer.shutdown().await;
        }
        writer
    });
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let read_all = async {
        loop {
            // After the daemon closes, a read ends in EOF, or in a reset if bytes were unread.
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(WAIT, read_all).await.expect("the daemon did not close the connection");
    drop(writing.await.unwrap());
    received
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("the daemon sent a line that is not JSON"))
        .collect()
}

fn codes(responses: &[Value]) -> Vec<i64> {
    responses.iter().map(|r| r["error"]["code"].as_i64().unwrap_or(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_paths_over_a_real_socket() {
    let daemon = Daemon::start(64, |_| {});
    let mut client = daemon.client().await;
    let info = client.call("node.info", Value::Null).await.unwrap();
    assert_eq!(info, json!({ "node_id": "node-a", "protocol_version": 1 }));
    let params = json!({ "nested": { "list": [1, "two", null, true] }, "text": "é ✓" });
    assert_eq!(client.call("echo", params.clone()).await.unwrap(), params);
    assert_eq!(client.call("add", json!({ "a": 40, "b": 2 })).await.unwrap(), json!(42));

    let err = client.call("migration.status", json!({ "migration_id": "m-9" })).await.unwrap_err();
    let rpc = err.rpc().unwrap();
    assert_eq!((rpc.code, rpc.data.clone()), (-32002, Some(json!({ "migration_id": "m-9" }))));
    assert_eq!(rpc.kind(), Some(ferry_engine::control::ErrorCode::NotFound));
    // The same connection keeps working after an error.
    assert_eq!(client.call("add", json!({ "a": 1, "b": 1 })).await.unwrap(), json!(2));

    // Pipelined requests on one connection are answered in order; a notification (no id) is
    // run but not answered.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"params\":[0]}\n\n");
    for i in 1..=5 {
        bytes.extend_from_slice(
            format!("{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"echo\",\"params\":[{i}]}}\r\n").as_bytes(),
        );
    }
    let answers = exchange(&daemon.socket, bytes, true).await;
    let got: Vec<(Value, Value)> = answers.iter().map(|a| (a["id"].clone(), a["result"].clone())).collect();
    let want: Vec<(Value, Value)> = (1..=5).map(|i| (json!(i), json!([i]))).collect();
    assert_eq!(got, want);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_codes_and_never_disturb_the_daemon() {
    let daemon = Daemon::start(64, |_| {});
    // A client connected through all rows keeps being served.
    let mut bystander = daemon.client().await;

    let mut ten_mib = br#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[""#.to_vec();
    ten_mib.resize(10 << 20, b'a');
    ten_mib.extend_from_slice(b"\"]}\n");
    // Binary garbage: 64 lines of pseudo-random bytes, none valid UTF-8 (each starts 0xff).
    let mut garbage = Vec::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..64 {
        garbage.push(0xff);
        for _ in 0..100 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let byte = (state >> 24) as u8;
            garbage.push(if byte == b'\n' { 0 } else { byte });
        }
        garbage.push(b'\n');
    }

    // (name, bytes, half-close after writing, the codes of the answers)
    let rows: Vec<(&str, Vec<u8>, bool, Vec<i64>)> = vec![
        ("not json", b"hello daemon\n".to_vec(), true, vec![-32700]),
        ("truncated json", b"{\"jsonrpc\":\"2.0\",\"id\":1,\n".to_vec(), true, vec![-32700]),
        ("a json array", b"[1,2]\n".to_vec(), true, vec![-32600]),
        ("a json number", b"7\n".to_vec(), true, vec![-32600]),
        ("no method", br#"{"jsonrpc":"2.0","id":1}"#.iter().chain(b"\n").copied().collect(), true, vec![-32600]),
        ("jsonrpc 1.0", b"{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"echo\"}\n".to_vec(), true, vec![-32600]),
        ("object id", b"{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"echo\"}\n".to_vec(), true, vec![-32600]),
        (
            "scalar params",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":1}\n".to_vec(),
            true,
            vec![-32600],
        ),
        ("unknown method", b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nope\"}\n".to_vec(), true, vec![-32601]),
        (
            "wrong param types",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"add\",\"params\":{\"a\":\"x\",\"b\":2}}\n".to_vec(),
            true,
            vec![-32602],
        ),
        ("a panicking method", b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"crash\"}\n".to_vec(), true, vec![-32010]),
        ("binary garbage", garbage, true, vec![-32700; 64]),
        // No half-close: the daemon itself must close the connection after answering.
        ("a 10 MiB line", ten_mib, false, vec![-32600]),
        ("a partial line then disconnect", b"{\"jsonrpc\":\"2.0\",\"id\":1,\"meth".to_vec(), true, vec![]),
    ];
    for (name, bytes, half_close, want) in rows {
        let answers = exchange(&daemon.socket, bytes, half_close).await;
        assert_eq!(codes(&answers), want, "row {name:?}: {answers:?}");
        for answer in &answers {
            assert_eq!(answer["jsonrpc"], "2.0", "row {name:?}");
            assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "row {name:?}");
        }
        daemon.assert_answers().await;
        assert_eq!(bystander.call("echo", json!([name])).await.unwrap(), json!([name]), "row {name:?}");
    }

    // A client that writes half a line and vanishes without a half-close.
    let mut stream = UnixStream::connect(&daemon.socket).await.unwrap();
    stream.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ec").await.unwrap();
    drop(stream);
    daemon.assert_answers().await;
    daemon.stop().await;
}

/// Raises the soft open-files limit towards `want`; returns the limit now in force.
fn raise_nofile_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, owned struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    if limit.rlim_cur < want {
        let raised = libc::rlimit { rlim_cur: want.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one
        // is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_at_once() {
    // Each client costs two descriptors in this process (its end and the daemon's).
    let mut client_count: usize = 1000;
    let limit = raise_nofile_limit(4096);
    let needed = (client_count as u64) * 2 + 200;
    if limit < needed {
        client_count = usize::try_from(limit.saturating_sub(200) / 2).unwrap();
        eprintln!(
            "!!! the open-files hard limit is {limit}: running {client_count} concurrent clients instead of 1000 !!!"
        );
        assert!(client_count >= 100, "the open-files limit {limit} is too low for this test");
    }
    let daemon = Daemon::start(64, |_| {});
    let barrier = Arc::new(tokio::sync::Barrier::new(client_count));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..client_count {
        let socket = daemon.socket.clone();
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            let socket = &socket;
            let connect = move || async move {
                match ControlClient::connect(socket).await {
                    Ok(client) => Some(client),
                    // A full listen backlog makes a non-blocking connect say "try again".
                    Err(ClientError::Connect { source, .. }) if source.kind() == std::io::ErrorKind::WouldBlock => None,
                    Err(e) => panic!("client {i} could not connect: {e}"),
                }
            };
            let mut client = wait_for_some("room in the listen backlog", WAIT, connect).await.unwrap();
            // Every client is connected before any of them calls.
            barrier.wait().await;
            let answer = client.call("echo", json!({ "client": i })).await.unwrap();
            assert_eq!(answer, json!({ "client": i }));
            client
        });
    }
    let mut clients = Vec::new();
    while let Some(joined) = timeout(WAIT, tasks.join_next()).await.unwrap() {
        clients.push(joined.unwrap());
    }
    assert_eq!(clients.len(), client_count);
    drop(clients);
    daemon.assert_answers().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_clearly() {
    let daemon = Daemon::start(64, |config| config.connection_count_max = 3);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = daemon.client().await;
        client.call("node.info", Value::Null).await.unwrap();
        held.push(client);
    }
    let mut extra = daemon.client().await;
    let err = extra.call("node.info", Value::Null).await.unwrap_err();
    let rpc = err.rpc().unwrap_or_else(|| panic!("expected a refusal, got {err}"));
    assert_eq!(rpc.code, -32006);
    assert!(rpc.message.contains("too many control connections"), "{}", rpc.message);
    // The held connections are unaffected; once one closes, a new client gets in.
    assert_eq!(held[0].call("add", json!({ "a": 2, "b": 3 })).await.unwrap(), json!(5));
    held.pop();
    // The daemon reaps the closed connection's task asynchronously.
    let admitted = || async { daemon.client().await.call("node.info", Value::Null).await.ok() };
    wait_for_some("a freed connection slot to be reused", Duration::from_secs(30), admitted).await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_to_subscribers_filtered_by_migration() {
    let daemon = Daemon::start(64, |_| {});
    let mut all = daemon.client().await.subscribe(None).await.unwrap();
    let mut one = daemon.client().await.subscribe(Some("m-1")).await.unwrap();
    let sent = [
        json!({ "migration_id": "m-1", "phase": "BaseCopy", "bytes_transferred": 10 }),
        json!({ "migration_id": "m-2", "phase": "BaseCopy", "bytes_transferred": 20 }),
        json!({ "migration_id": "m-1", "phase": "WalCatchUp" }),
    ];
    for event in &sent {
        daemon.events.send(event.clone()).unwrap();
    }
    for event in &sent {
        assert_eq!(timeout(WAIT, all.next()).await.unwrap().unwrap(), Some(Event::Migration(event.clone())));
    }
    for event in [&sent[0], &sent[2]] {
        assert_eq!(timeout(WAIT, one.next()).await.unwrap().unwrap(), Some(Event::Migration(event.clone())));
    }

    // A second subscription on one connection is refused; the first keeps working.
    let socket = daemon.socket.clone();
    let bytes = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.subscribe\",\"params\":{}}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"events.subscribe\",\"params\":{}}\n"
        .to_vec();
    let answers = exchange(&socket, bytes, true).await;
    assert_eq!(answers[0]["result"], json!({ "subscribed": true }));
    assert_eq!(codes(&answers[1..]), vec![-32006]);

    // Shutting the daemon down ends the streams.
    daemon.stop().await;
    assert_eq!(timeout(WAIT, all.next()).await.unwrap().unwrap(), None);
}

/// A current-thread runtime: the test's sends run without the daemon's task interleaving, so
/// the subscriber falls behind by an exact, known number of events.
#[tokio::test(flavor = "current_thread")]
async fn a_lagging_subscriber_is_told_how_many_events_it_lost() {
    let daemon = Daemon::start(4, |_| {});
    let mut stream = daemon.client().await.subscribe(None).await.unwrap();
    for i in 0..100 {
        daemon.events.send(json!({ "migration_id": "m-1", "seq": i })).unwrap();
    }
    assert_eq!(timeout(WAIT, stream.next()).await.unwrap().unwrap(), Some(Event::Dropped { dropped_count: 96 }));
    for i in 96..100 {
        let want = Event::Migration(json!({ "migration_id": "m-1", "seq": i }));
        assert_eq!(timeout(WAIT, stream.next()).await.unwrap().unwrap(), Some(want));
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_blocks_nobody() {
    let daemon = Daemon::start(16, |_| {});
    // Subscribes and then never reads: its socket buffers fill up.
    let _stuck = daemon.client().await.subscribe(None).await.unwrap();
    let mut watcher = daemon.client().await.subscribe(None).await.unwrap();
    let padding = "x".repeat(64 << 10);
    for i in 0..400 {
        // `send` never waits for a subscriber: this loop finishing is the point.
        daemon.events.send(json!({ "migration_id": "m-1", "seq": i, "padding": padding })).unwrap();
        if i % 50 == 0 {
            daemon.assert_answers().await;
        }
    }
    // The reading subscriber sees the stream, maybe with drops, ending with the last event.
    let mut last_seq = None;
    while last_seq != Some(399) {
        match timeout(WAIT, watcher.next()).await.unwrap().unwrap() {
            Some(Event::Migration(event)) => last_seq = event["seq"].as_u64(),
            Some(Event::Dropped { dropped_count }) => assert!(dropped_count > 0),
            other => panic!("unexpected {other:?}"),
        }
    }
    daemon.assert_answers().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_in_a_0700_folder_and_a_writable_folder_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let daemon = Daemon::start(4, |_| {});
    let folder = daemon.socket.parent().unwrap().to_owned();
    assert_eq!(std::fs::metadata(&folder).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(std::fs::symlink_metadata(&daemon.socket).unwrap().mode() & 0o7777, 0o600);
    // A second daemon on the same path is refused while the first serves.
    let events = daemon.events.clone();
    let second = ControlServer::bind(ControlConfig::new(&daemon.socket), Arc::new(TestHandler { events }));
    assert!(matches!(second, Err(ControlError::AlreadyServing { .. })), "{second:?}");
    daemon.assert_answers().await;
    daemon.stop().await;

    for mode in [0o777, 0o1777, 0o770, 0o722] {
        let root = tempfile::tempdir().unwrap();
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(mode)).unwrap();
        let (events, _) = broadcast::channel(4);
        let err = ControlServer::bind(ControlConfig::new(open.join("ferry.sock")), Arc::new(TestHandler { events }))
            .unwrap_err();
        assert!(matches!(err, ControlError::FolderUnsafe { .. }), "mode {mode:o}: {err}");
        let message = err.to_string();
        assert!(message.contains(&open.display().to_string()) && message.contains("chmod 0700"), "{message}");
        assert!(!open.join("ferry.sock").exists());
    }

    // A stale socket file left by a killed daemon is replaced.
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("run");
    std::fs::DirBuilder::new().mode(0o700).create(&folder).unwrap();
    let socket = folder.join("ferry.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let daemon = Daemon::start_at(root, socket, 4, |_| {});
    daemon.assert_answers().await;
    daemon.stop().await;
}

const PROBE_ENV: &str = "FERRY_CONTROL_PROBE_SOCKET";
const PROBE_UID: u32 = 65534;

/// In the child: connects as the unprivileged uid and prints what happened.
fn run_probe(socket: &str) {
    use std::io::{Read, Write};
    match std::os::unix::net::UnixStream::connect(socket) {
        Err(e) => println!("PROBE connect-error {:?}", e.kind()),
        Ok(mut stream) => {
            stream.set_read_timeout(Some(WAIT)).unwrap();
            // A refusing daemon may close before the request is written (a broken pipe); its
            // answer is still there to read.
            let _ = stream.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"node.info\"}\n");
            // Half-close: the daemon answers, sees the end of requests and closes.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            let first = answer.split(|&b| b == b'\n').next().unwrap_or_default();
            println!("PROBE answer {}", String::from_utf8_lossy(first));
        }
    }
}

/// Runs this very test in a child process as [`PROBE_UID`]; returns its PROBE line.
fn probe_as_other_uid(socket: &Path) -> String {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["a_client_with_another_uid_is_refused", "--exact", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, socket)
        .uid(PROBE_UID)
        .gid(PROBE_UID)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "probe failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, probe)| probe))
        .unwrap_or_else(|| panic!("no probe line in {stdout}"))
        .to_owned()
}

#[test]
fn a_client_with_another_uid_is_refused() {
    if let Ok(socket) = std::env::var(PROBE_ENV) {
        run_probe(&socket);
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("this test must run as root in CI (it drops privileges in a child); it cannot skip");
        }
        eprintln!(
            "!!! SKIPPED a_client_with_another_uid_is_refused: not root, cannot start a child as another uid !!!"
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _entered = runtime.enter();

    // The root folder must let the child reach the socket folder (and run nothing else).
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();

    // Default permissions: the file system alone turns the other uid away.
    let socket = root.path().join("run").join("ferry.sock");
    let daemon = Daemon::start_at(tempfile::tempdir().unwrap(), socket.clone(), 4, |_| {});
    assert_eq!(probe_as_other_uid(&socket), "connect-error PermissionDenied");
    runtime.block_on(daemon.stop());

    // Loosened file permissions: the peer-uid check (SO_PEERCRED) still refuses.
    let open = root.path().join("open");
    std::fs::DirBuilder::new().mode(0o711).create(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o711)).unwrap();
    let socket = open.join("ferry.sock");
    let daemon = Daemon::start_at(tempfile::tempdir().unwrap(), socket.clone(), 4, |_| {});
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let line = probe_as_other_uid(&socket);
    let answer: Value = serde_json::from_str(line.strip_prefix("answer ").unwrap()).unwrap();
    assert_eq!(answer["error"]["code"], -32006, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains(&format!("uid {PROBE_UID}")), "{answer}");
    assert!(answer.get("result").is_none());
    runtime.block_on(daemon.assert_answers());
    runtime.block_on(daemon.stop());

    // The same uid on the allow-list is served: the refusal above was the uid check.
    let daemon =
        Daemon::start_at(tempfile::tempdir().unwrap(), socket.clone(), 4, |c| c.allowed_uids = vec![PROBE_UID]);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let line = probe_as_other_uid(&socket);
    let answer: Value = serde_json::from_str(line.strip_prefix("answer ").unwrap()).unwrap();
    assert_eq!(answer["result"]["node_id"], "node-a", "{answer}");
    runtime.block_on(daemon.stop());
}

/// The real daemon answers on its control socket: node.info, migration.list/status of an
/// inbound migration, a clear NotFound, invalid params for an empty start, and a clear "not
/// implemented yet" for the fence methods (never a fake success).
#[test]
fn ferry_serve_answers_on_its_control_socket() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    let certs = ferry_tests::Certs::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr, socket) = spawn_serve("target", "source", &certs, data.path());
    assert_eq!(socket, data.path().join("control/ferry.sock").display().to_string());

    let ask = |line: &str| -> serde_json::Value {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let info = ask(r#"{"jsonrpc":"2.0","id":1,"method":"node.info"}"#);
    assert_eq!(info["result"]["node_id"], "target", "{info}");
    assert_eq!(info["result"]["quic_address"], addr.as_str());

    // An inbound migration shows up.
    let source = tempfile::tempdir().unwrap();
    ferry_tests::write_file(source.path(), "a.seg", 300_000, 1);
    let status = Command::new(ferry_tests::ferry_bin())
        .args(["copy", "--node-id", "source", "--target-node", "target", "--vshard", "3", "--migration-id", "m-ctl"])
        .args(["--target", &addr])
        .arg("--certs")
        .arg(certs.dir.path())
        .arg("--segments-root")
        .arg(source.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let list = ask(r#"{"jsonrpc":"2.0","id":2,"method":"migration.list"}"#);
    let migrations = list["result"]["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 1, "{list}");
    assert_eq!(migrations[0]["migration_id"], "m-ctl");
    assert_eq!(migrations[0]["bytes_total"], 300_000);
    let one = ask(r#"{"jsonrpc":"2.0","id":3,"method":"migration.status","params":{"migration_id":"m-ctl"}}"#);
    assert_eq!(one["result"]["bytes_transferred"], 300_000, "{one}");
    let missing = ask(r#"{"jsonrpc":"2.0","id":4,"method":"migration.status","params":{"migration_id":"nope"}}"#);
    assert_eq!(missing["error"]["code"], -32002, "{missing}");
    let bad = ask(r#"{"jsonrpc":"2.0","id":5,"method":"migration.status","params":{"migration_id":7}}"#);
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    let start = ask(r#"{"jsonrpc":"2.0","id":6,"method":"migration.start","params":{}}"#);
    assert_eq!(start["error"]["code"], -32602, "{start}");
    assert!(start["error"]["message"].as_str().unwrap().contains("vshard_id"), "{start}");
    let fence = ask(r#"{"jsonrpc":"2.0","id":7,"method":"migration.fence","params":{"migration_id":"m-ctl"}}"#);
    // The fence is the source's: the target names where to call it.
    assert_eq!(fence["error"]["code"], -32006, "{fence}");
    assert!(fence["error"]["message"].as_str().unwrap().contains("call migration.fence on the source"), "{fence}");

    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 18: an error reply quotes at most about 200 bytes of what the client sent. A
/// `migration.start` whose `vshard_id` is a 3.6 MB string, or whose `target_address` is
/// backslashes filling a 3.6 MB request line (doubled by debug escaping, doubled again by JSON),
/// used to be answered with a 7.2 MB line that ferry's own client could not read. Now each is a short -32602 that still names the field and the
/// length, read by the real daemon's socket and by the typed client.
#[test]
fn huge_params_get_a_short_clear_invalid_params_reply() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let certs = ferry_tests::Certs::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (mut child, _, socket) = spawn_serve("source", "target", &certs, data.path());
    let ask = |params: Value| -> (usize, Value) {
        let line = json!({ "jsonrpc": "2.0", "id": 1, "method": "migration.start", "params": params }).to_string();
        assert!(line.len() > 3_600_000 && line.len() < ferry_wire::control::LINE_LEN_MAX_BYTES);
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        (answer.len(), serde_json::from_str(&answer).unwrap())
    };
    let base = json!({
        "vshard_id": 3, "segments_root": "/tmp", "target_address": "127.0.0.1:9", "target_node_id": "target",
    });

    let mut huge_vshard = base.clone();
    huge_vshard["vshard_id"] = json!("7".repeat(3_600_000));
    let (len, reply) = ask(huge_vshard);
    let message = reply["error"]["message"].as_str().unwrap();
    assert_eq!(reply["error"]["code"], -32602, "{message}");
    assert!(len < 1024, "a {len}-byte reply: {message}");
    assert!(message.contains("invalid type: string \"777"), "{message}");
    assert!(message.contains("(3600000 bytes), expected u32"), "{message}");

    let mut slashes = base.clone();
    slashes["target_address"] = json!("\\".repeat(1_800_000));
    let (len, reply) = ask(slashes);
    let message = reply["error"]["message"].as_str().unwrap();
    assert_eq!(reply["error"]["code"], -32602, "{message}");
    assert!(len < 1024, "a {len}-byte reply: {message}");
    assert!(message.starts_with("target_address \"\\\\\\\\"), "{message}");
    assert!(message.contains("... (1800000 bytes) is not ip:port"), "{message}");

    // ferry's own client reads the refusal (it could not read a 7.2 MB line).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = timeout(WAIT, ControlClient::connect(Path::new(&socket))).await.unwrap().unwrap();
        let mut params = base.clone();
        params["vshard_id"] = json!("7".repeat(3_600_000));
        let err = timeout(WAIT, client.call("migration.start", params)).await.unwrap().unwrap_err();
        match err {
            ClientError::Rpc(e) => assert_eq!(e.code, -32602, "{e}"),
            other => panic!("expected the daemon's -32602, got {other}"),
        }
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `ferry serve` as `node` (allowing `peer`) and reads its first two lines: its QUIC
/// address and its control socket's path.
fn spawn_serve(
    node: &str,
    peer: &str,
    certs: &ferry_tests::Certs,
    data: &std::path::Path,
) -> (std::process::Child, String, String) {
    use std::io::BufReader;
    use std::process::{Command, Stdio};

    let mut child = Command::new(ferry_tests::ferry_bin())
        .args(["serve", "--node-id", node, "--listen", "127.0.0.1:0", "--allow-peer", peer])
        .arg("--certs")
        .arg(certs.dir.path())
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (addr, socket) = ferry_tests::daemons::read_banner(&mut out).unwrap_or_else(|line| panic!("{line:?}"));
    (child, addr, socket.display().to_string())
}
