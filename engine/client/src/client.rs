//! The typed control socket client coordinators, the CLI and the tests use.
//!
//! What it does: connects to a daemon's control socket, sends one request at a time and
//! matches its response by id, and turns a connection into an event stream with
//! [`ControlClient::subscribe`].
//!
//! What it does not: know methods' params or results (they are JSON values here; typed
//! wrappers for the migration methods build on [`ControlClient::call`]), reconnect, or retry.
//!
//! Invariants: a line from the daemon is bounded by [`LINE_LEN_MAX_BYTES`]; an error is split
//! by blame into I/O, a daemon breaking the protocol, and an error the daemon answered.

use std::io;
use std::path::{Path, PathBuf};

/// The longest line the client reads from the daemon (the protocol's limit, both ways).
pub use ferry_wire::control::LINE_LEN_MAX_BYTES;
use ferry_wire::control::{
    decode_server_line, encode_request, LineReader, Notification, ProtocolViolation, Request, RequestId, Response,
    RpcError, ServerMessage, EVENTS_DROPPED_METHOD, EVENT_METHOD, SUBSCRIBE_METHOD,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const READ_CHUNK_BYTES: usize = 64 << 10;

/// Why a call failed, by blame.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cause is chained as the source, not repeated in the message (`{:#}` shows it once).
    #[error("could not connect to the control socket {} (is `ferry serve` running with this socket path?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The cause is in the message, not chained as a source (`{:#}` would show it twice).
    #[error("control socket i/o failed: {0}; the daemon may have stopped")]
    Io(io::Error),
    #[error("the daemon closed the connection; it may have stopped or refused this client (see its log)")]
    Closed,
    #[error(transparent)]
    Protocol(#[from] ProtocolViolation),
    /// The daemon answered with an error: its code and message are the daemon's.
    #[error("the daemon answered error {}: {}", .0.code, .0.message)]
    Rpc(RpcError),
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl ClientError {
    /// The daemon's error, if it answered one.
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            Self::Rpc(e) => Some(e),
            _ => None,
        }
    }
}

/// One connection to a daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    lines: LineReader,
    next_id: i64,
}

impl ControlClient {
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream =
            UnixStream::connect(path).await.map_err(|source| ClientError::Connect { path: path.to_owned(), source })?;
        Ok(Self { stream, lines: LineReader::new(LINE_LEN_MAX_BYTES), next_id: 1 })
    }

    /// Calls `method` and waits for its result. `params` is an object, an array or `Null`.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = RequestId::Number(self.next_id);
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let request = Request { id: Some(id.clone()), method: method.to_owned(), params };
        if let Err(e) = self.stream.write_all(&encode_request(&request)).await {
            // A daemon that refuses a connection (uid, connection limit) answers once and
            // closes, possibly before the request is written: report its reason, not the pipe.
            if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
                if let Ok(ServerMessage::Response(Response { id: None, outcome: Err(refusal) })) =
                    self.read_message().await
                {
                    return Err(ClientError::Rpc(refusal));
                }
            }
            return Err(e.into());
        }
        loop {
            match self.read_message().await? {
                // Events that raced a call are not its answer.
                ServerMessage::Notification(_) => continue,
                ServerMessage::Response(response) => {
                    return match (response.id, response.outcome) {
                        (Some(got), outcome) if got == id => outcome.map_err(ClientError::Rpc),
                        // A null id with an error: the daemon refused the connection or the line.
                        (None, Err(error)) => Err(ClientError::Rpc(error)),
                        _ => Err(ProtocolViolation("a response's id matches no request".to_owned()).into()),
                    };
                }
            }
        }
    }

    /// Subscribes to `migration.event` notifications (of one migration, or of all) and turns
    /// this connection into their stream.
    pub async fn subscribe(mut self, migration_id: Option<&str>) -> Result<EventStream, ClientError> {
        let params = match migration_id {
            Some(id) => json!({ "migration_id": id }),
            None => json!({}),
        };
        self.call(SUBSCRIBE_METHOD, params).await?;
        Ok(EventStream { client: self })
    }

    async fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            match self.lines.next_line() {
                Some(Ok(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Some(Ok(line)) => return Ok(decode_server_line(&line)?),
                Some(Err(too_long)) => return Err(ProtocolViolation(too_long.to_string()).into()),
                None => {}
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.lines.push(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// One item of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A `migration.event` notification's params.
    Migration(Value),
    /// The daemon dropped this many events because this client read too slowly.
    Dropped { dropped_count: u64 },
    /// A notification this client version does not know.
    Other(Notification),
}

/// The events of one subscription.
#[derive(Debug)]
pub struct EventStream {
    client: ControlClient,
}

impl EventStream {
    /// The next event; `Ok(None)` when the daemon closed the connection.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        let message = match self.client.read_message().await {
            Ok(message) => message,
            Err(ClientError::Closed) => return Ok(None),
            Err(e) => return Err(e),
        };
        let ServerMessage::Notification(note) = message else {
            // Nothing is asked on a subscribed connection, so a response is out of place.
            return Err(ProtocolViolation("a response arrived on an event stream".to_owned()).into());
        };
        Ok(Some(match note.method.as_str() {
            EVENT_METHOD => Event::Migration(note.params),
            EVENTS_DROPPED_METHOD => match note.params.get("dropped_count").and_then(Value::as_u64) {
                Some(dropped_count) => Event::Dropped { dropped_count },
                None => return Err(ProtocolViolation("events.dropped without a dropped_count".to_owned()).into()),
            },
            _ => Event::Other(note),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn errors_name_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ferry.sock");
        let err = anyhow::Error::from(ControlClient::connect(&missing).await.unwrap_err());
        let text = format!("{err:#}");
        assert!(text.contains("could not connect to the control socket") && text.contains("ferry.sock"), "{text}");
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        let io = anyhow::Error::from(ClientError::from(io::Error::from(io::ErrorKind::ConnectionReset)));
        let text = format!("{io:#}");
        assert_eq!(text.matches("reset").count(), 1, "{text}");
    }
}
