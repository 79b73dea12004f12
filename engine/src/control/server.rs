//! The control socket server: a Unix socket that answers JSON-RPC 2.0 lines (DESIGN section 4).
//!
//! What it does: creates the socket safely (its folder 0700, the socket 0600, a folder that
//! others can write refused, a stale socket replaced, a live one left alone), accepts at most
//! [`ControlConfig::connection_count_max`] connections, checks each peer's uid (SO_PEERCRED)
//! against the daemon's own and an allow-list, reads newline-delimited requests bounded by a
//! line limit, hands each to a [`Handler`] and writes one response line per request. A handler
//! may answer with a [`Subscription`]: the server then streams its events on that connection
//! as `migration.event` notifications until the client goes away.
//!
//! What it does not: know any method. The daemon's [`Handler`] gives methods their meaning;
//! this module only knows `events.subscribe`'s shape (a reply that carries a stream).
//!
//! Invariants:
//! - Nothing a client sends stops the server or disturbs another client: each connection is
//!   its own task, each call runs in its own task (a panicking handler becomes a -32010
//!   answer), every buffer is bounded (one line, one read chunk).
//! - Requests on one connection are answered in order, one at a time; a coordinator that wants
//!   calls in parallel opens more connections. A call runs to completion even if its client
//!   disconnects, so a `migration.start` is never half-cancelled by a dropped socket.
//! - The daemon never waits for a slow subscriber: events come from a `broadcast` channel, a
//!   subscriber that falls behind loses the oldest events and is told how many
//!   ([`EVENTS_DROPPED_METHOD`]); a client that stops reading for longer than the write timeout
//!   is disconnected.
//! - The daemon's own uid is read as the owner of the socket file it just created (files are
//!   owned by the effective uid that creates them), which keeps this module free of `unsafe`.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::control::{
    decode_line, encode_notification, encode_response, LineReader, Notification, Request, Response, RpcError,
    EVENTS_DROPPED_METHOD, EVENT_METHOD, LINE_LEN_MAX_BYTES,
};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

/// Default most connections served at once: far more than any coordinator and operator need,
/// few enough that file descriptors and buffers stay bounded.
pub const CONNECTION_COUNT_MAX_DEFAULT: usize = 4096;
/// Default time a client may take to accept one line before it is disconnected.
pub const WRITE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Bytes read from a socket at once: bounds what a connection buffers beyond one line.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const SOCKET_PATH_LEN_MAX_BYTES: usize = 107;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF_MS: u64 = 100;

/// Where and how the control socket is served.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The socket file. Its folder is created 0700 if missing and must not be writable by
    /// group or others.
    pub socket_path: PathBuf,
    /// Uids besides the daemon's own that may connect.
    pub allowed_uids: Vec<u32>,
    pub connection_count_max: usize,
    /// Longest request line; longer ones are answered -32600 and the connection is closed.
    pub line_len_max_bytes: usize,
    pub write_timeout_ms: u64,
}

impl ControlConfig {
    /// The defaults, serving at `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            allowed_uids: Vec::new(),
            connection_count_max: CONNECTION_COUNT_MAX_DEFAULT,
            line_len_max_bytes: LINE_LEN_MAX_BYTES,
            write_timeout_ms: WRITE_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// A stream of events a handler opened for one connection (the answer to `events.subscribe`).
#[derive(Debug)]
pub struct Subscription {
    /// The response to the subscribe request itself.
    pub result: Value,
    /// The bodies of `migration.event` notifications.
    pub events: broadcast::Receiver<Value>,
    /// Only events whose `migration_id` member equals this are forwarded; `None`: all.
    pub migration_id: Option<String>,
}

/// What a successful call answers: a value, or a value and a stream of events.
#[derive(Debug)]
pub enum Reply {
    Value(Value),
    Subscription(Subscription),
}

impl From<Value> for Reply {
    fn from(value: Value) -> Self {
        Self::Value(value)
    }
}

/// The future a [`Handler`] returns for one call.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Reply, RpcError>> + Send + 'static>>;

/// Gives methods their meaning. Unknown methods answer [`RpcError::method_not_found`], params
/// of the wrong shape [`RpcError::invalid_params`].
pub trait Handler: Send + Sync + 'static {
    fn call(&self, method: String, params: Value) -> CallFuture;
}

/// Why the control socket could not be served. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control socket folder {} has mode {mode:04o}: group or others can write it and could replace the socket; \
         run `chmod 0700 {}` or choose another control socket path", folder.display(), folder.display()
    )]
    FolderUnsafe { folder: PathBuf, mode: u32 },
    #[error(
        "control socket folder {} is owned by uid {owner_uid}, not the daemon's uid {daemon_uid}; \
         run `chown {daemon_uid} {}` or choose another control socket path", folder.display(), folder.display()
    )]
    FolderNotOwned { folder: PathBuf, owner_uid: u32, daemon_uid: u32 },
    #[error("control socket folder {} is not a folder; choose another control socket path", folder.display())]
    NotAFolder { folder: PathBuf },
    #[error("{} exists and is not a socket; remove it or choose another control socket path", path.display())]
    NotASocket { path: PathBuf },
    #[error("another daemon is already serving {}; stop it or choose another control socket path", path.display())]
    AlreadyServing { path: PathBuf },
    #[error(
        "control socket path {} is {len_bytes} bytes; unix sockets allow at most {SOCKET_PATH_LEN_MAX_BYTES}: \
         choose a shorter path", path.display()
    )]
    PathTooLong { path: PathBuf, len_bytes: usize },
    #[error("could not {action} {}: {cause}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        cause: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ControlError + 'a {
    move |source| ControlError::Io { action, path: path.to_owned(), cause: source }
}

/// What every connection task shares.
struct Shared {
    handler: Arc<dyn Handler>,
    daemon_uid: u32,
    allowed_uids: Vec<u32>,
    line_len_max_bytes: usize,
    write_timeout: Duration,
}

/// A bound control socket, ready to [`run`](Self::run).
pub struct ControlServer {
    listener: UnixListener,
    socket_path: PathBuf,
    connection_count_max: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("socket_path", &self.socket_path)
            .field("daemon_uid", &self.shared.daemon_uid)
            .field("allowed_uids", &self.shared.allowed_uids)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Prepares the folder, replaces a stale socket, binds and restricts the socket to 0600.
    /// Call it from within a tokio runtime.
    pub fn bind(config: ControlConfig, handler: Arc<dyn Handler>) -> Result<Self, ControlError> {
        let path = config.socket_path.clone();
        let len_bytes = path.as_os_str().len();
        if len_bytes > SOCKET_PATH_LEN_MAX_BYTES {
            return Err(ControlError::PathTooLong { path, len_bytes });
        }
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        prepare_folder(&folder)?;
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(io_error("bind the control socket", &path))?;
        // The folder is 0700, so nobody else can reach the socket between bind and chmod.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error("set mode 0600 on", &path))?;
        let daemon_uid = std::fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?.uid();
        let owner_uid = std::fs::metadata(&folder).map_err(io_error("inspect", &folder))?.uid();
        if owner_uid != daemon_uid {
            let _ = std::fs::remove_file(&path);
            return Err(ControlError::FolderNotOwned { folder, owner_uid, daemon_uid });
        }
        let shared = Shared {
            handler,
            daemon_uid,
            allowed_uids: config.allowed_uids,
            line_len_max_bytes: config.line_len_max_bytes,
            write_timeout: Duration::from_millis(config.write_timeout_ms),
        };
        Ok(Self {
            listener,
            socket_path: path,
            connection_count_max: config.connection_count_max,
            shared: Arc::new(shared),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The uid the daemon runs as: always allowed to connect.
    pub fn daemon_uid(&self) -> u32 {
        self.shared.daemon_uid
    }

    /// Serves until `shutdown` completes, then closes every connection and removes the socket.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = joined {
                        tracing::warn!("a control connection task failed: {e}");
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) if connections.len() >= self.connection_count_max => {
                        refuse_busy(&stream, self.connection_count_max);
                    }
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(stream, Arc::clone(&self.shared)));
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                    }
                },
            }
        }
        connections.shutdown().await;
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

/// Creates the folder 0700 if missing; refuses one that group or others can write.
fn prepare_folder(folder: &Path) -> Result<(), ControlError> {
    match std::fs::metadata(folder) {
        Ok(meta) if !meta.is_dir() => Err(ControlError::NotAFolder { folder: folder.to_owned() }),
        Ok(meta) if meta.mode() & 0o022 != 0 => {
            Err(ControlError::FolderUnsafe { folder: folder.to_owned(), mode: meta.mode() & 0o7777 })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .map_err(io_error("create the control socket folder", folder))?;
            // The umask may have cleared bits but never adds any; set the mode exactly anyway.
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error("set mode 0700 on", folder))
        }
        Err(e) => {
            Err(ControlError::Io { action: "inspect the control socket folder", path: folder.to_owned(), cause: e })
        }
    }
}

/// Removes a socket file nobody listens on; refuses a live socket or a file of another kind.
fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ControlError::Io { action: "inspect", path: path.to_owned(), cause: e }),
        Ok(meta) if !meta.file_type().is_socket() => Err(ControlError::NotASocket { path: path.to_owned() }),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(ControlError::AlreadyServing { path: path.to_owned() }),
            Err(_) => std::fs::remove_file(path).map_err(io_error("remove the stale control socket", path)),
        },
    }
}

fn error_line(error: RpcError) -> Vec<u8> {
    encode_response(&Response { id: None, outcome: Err(error) })
}

/// Tells an extra client why it is turned away, without ever waiting on it.
fn refuse_busy(stream: &UnixStream, connection_count_max: usize) {
    let line = error_line(RpcError::refused(format!(
        "too many control connections (limit {connection_count_max}); close idle connections and retry"
    )));
    // A fresh socket's buffer takes one short line; if it does not, the client just sees EOF.
    let _ = stream.try_write(&line);
}

async fn write_line<W: AsyncWrite + Unpin>(writer: &mut W, line: &[u8], timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, writer.write_all(line)).await, Ok(Ok(())))
}

async fn serve_connection(stream: UnixStream, shared: Arc<Shared>) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::debug!("control connection without peer credentials refused: {e}");
            return;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    if uid != shared.daemon_uid && !shared.allowed_uids.contains(&uid) {
        tracing::warn!("control connection from uid {uid} refused: not the daemon's uid nor allowed");
        let line = error_line(RpcError::refused(format!(
            "uid {uid} may not use this control socket; connect as uid {} or add {uid} to the allowed uids",
            shared.daemon_uid
        )));
        let _ = write_line(&mut writer, &line, shared.write_timeout).await;
        return;
    }
    serve_lines(&mut reader, &mut writer, &shared).await;
    let _ = writer.shutdown().await;
}

/// What woke the connection loop.
enum Wake {
    Read(io::Result<usize>),
    Event(EventOutcome),
}

enum EventOutcome {
    Event(Value),
    Dropped(u64),
    Closed,
}

async fn serve_lines<R, W>(reader: &mut R, writer: &mut W, shared: &Shared)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = LineReader::new(shared.line_len_max_bytes);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut subscription: Option<Subscription> = None;
    loop {
        while let Some(line) = lines.next_line() {
            let answer = match line {
                Err(too_long) => {
                    let line = error_line(RpcError::invalid_request(format!(
                        "request line is longer than {} bytes; send smaller requests (connection closed)",
                        too_long.limit_bytes
                    )));
                    let _ = write_line(writer, &line, shared.write_timeout).await;
                    return;
                }
                // Blank lines (an operator pressing enter in socat) are not requests.
                Ok(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(line) => match decode_line(&line) {
                    Err(error) => Some(Response { id: None, outcome: Err(error) }),
                    Ok(request) => dispatch(shared, request, &mut subscription).await,
                },
            };
            if let Some(response) = answer {
                if !write_line(writer, &encode_response(&response), shared.write_timeout).await {
                    return;
                }
            }
        }
        let wake = tokio::select! {
            read = reader.read(&mut chunk) => Wake::Read(read),
            event = next_event(&mut subscription) => Wake::Event(event),
        };
        let line = match wake {
            // End of stream: an unfinished line is dropped, nothing is answered.
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return,
            Wake::Read(Ok(n)) => {
                lines.push(chunk.get(..n).unwrap_or_default());
                continue;
            }
            Wake::Event(EventOutcome::Event(params)) => {
                encode_notification(&Notification { method: EVENT_METHOD.to_owned(), params })
            }
            Wake::Event(EventOutcome::Dropped(dropped_count)) => encode_notification(&Notification {
                method: EVENTS_DROPPED_METHOD.to_owned(),
                params: json!({ "dropped_count": dropped_count }),
            }),
            Wake::Event(EventOutcome::Closed) => {
                subscription = None;
                continue;
            }
        };
        if !write_line(writer, &line, shared.write_timeout).await {
            return;
        }
    }
}

/// The next event for this connection; never completes without a subscription.
async fn next_event(subscription: &mut Option<Subscription>) -> EventOutcome {
    let Some(sub) = subscription else {
        return std::future::pending().await;
    };
    loop {
        match sub.events.recv().await {
            Ok(event) => {
                let wanted = sub
                    .migration_id
                    .as_deref()
                    .is_none_or(|id| event.get("migration_id").and_then(Value::as_str) == Some(id));
                if wanted {
                    return EventOutcome::Event(event);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => return EventOutcome::Dropped(n),
            Err(broadcast::error::RecvError::Closed) => return EventOutcome::Closed,
        }
    }
}

/// Runs one request; `None` for a notification (nothing is answered).
async fn dispatch(shared: &Shared, request: Request, subscription: &mut Option<Subscription>) -> Option<Response> {
    let Request { id, method, params } = request;
    let handler = Arc::clone(&shared.handler);
    let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(method.clone(), params)));
    let outcome = match call {
        Err(_) => Err(()),
        // Its own task: a panic in the call is caught, and the call outlives its client.
        Ok(future) => tokio::spawn(future).await.map_err(|_| ()),
    };
    let outcome = match outcome {
        Err(()) => {
            tracing::error!("the control handler failed on `{method}`");
            Err(RpcError::internal(format!("the daemon failed while running `{method}`; see the daemon log")))
        }
        Ok(Ok(Reply::Value(value))) => Ok(value),
        Ok(Ok(Reply::Subscription(_))) if subscription.is_some() => Err(RpcError::refused(
            "this connection already streams events; open another connection for another subscription",
        )),
        Ok(Ok(Reply::Subscription(sub))) => {
            let result = sub.result.clone();
            *subscription = Some(sub);
            Ok(result)
        }
        Ok(Err(error)) => Err(error),
    };
    id.map(|id| Response { id: Some(id), outcome })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn prepare_folder_creates_0700_and_refuses_writable_folders() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("a/b");
        prepare_folder(&folder).unwrap();
        assert_eq!(std::fs::metadata(&folder).unwrap().mode() & 0o777, 0o700);
        for mode in [0o777, 0o720, 0o702, 0o1777] {
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = prepare_folder(&folder).unwrap_err();
            assert!(matches!(err, ControlError::FolderUnsafe { .. }), "mode {mode:o}: {err}");
            assert!(err.to_string().contains("chmod 0700"), "{err}");
        }
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_folder(&folder).unwrap();
    }

    #[test]
    fn stale_socket_is_removed_but_a_regular_file_is_not() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        remove_stale_socket(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(remove_stale_socket(&path), Err(ControlError::NotASocket { .. })));
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
        let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(remove_stale_socket(&path), Err(ControlError::AlreadyServing { .. })));
    }
}
