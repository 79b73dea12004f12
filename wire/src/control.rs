//! The control socket's protocol: JSON-RPC 2.0, one JSON object per line (DESIGN section 4).
//!
//! What it does: the message types a coordinator and a daemon exchange (requests, responses,
//! notifications), the error codes both sides agree on, a line splitter that bounds how many
//! bytes one line may hold, and the codecs that turn one line into a message and back. Every
//! malformed line is classified into the JSON-RPC code a client must see:
//!
//! | code   | name                  | when                                                          |
//! |--------|-----------------------|---------------------------------------------------------------|
//! | -32700 | parse error           | the line is not JSON (or not UTF-8)                           |
//! | -32600 | invalid request       | JSON, but not a request: wrong shape, `jsonrpc` not `"2.0"`, an id that is not a string or an integer, a batch, an unknown member, a line over [`LINE_LEN_MAX_BYTES`] |
//! | -32601 | method not found      | the daemon has no such method                                 |
//! | -32602 | invalid params        | the method exists but its params have the wrong shape or types |
//! | -32001 | migration in progress | another migration holds that vShard (`data.vshard_id`)         |
//! | -32002 | not found             | no migration with that id (`data.migration_id`)                |
//! | -32003 | pause budget exceeded | the estimated pause is over budget (`data.estimated_us`, `data.budget_us`) |
//! | -32004 | cut-over cancelled    | the fence gave up before the target was durable (`data.reason`) |
//! | -32005 | fence violated        | a record above `final_lsn` was seen (`data.lsn`)               |
//! | -32006 | refused               | the daemon will not serve this caller or request now (uid not allowed, too many connections, at capacity) |
//! | -32010 | internal              | the daemon failed; the message says what, the migration's state is kept |
//!
//! What it does not: any I/O, and no knowledge of methods beyond the two the transport itself
//! needs (`events.subscribe` answers with a stream of [`EVENT_METHOD`] notifications, and
//! [`EVENTS_DROPPED_METHOD`] tells a slow subscriber how many events it missed). The engine's
//! server and client drive these codecs; the daemon's handler gives methods their meaning.
//!
//! Decisions where JSON-RPC 2.0 leaves room: batches (a JSON array) are refused with -32600,
//! since one object per line is the contract; a `null` id is refused with -32600 (the spec
//! discourages it and it cannot be told apart from the null id of an error response); ids are
//! strings or integers in the i64 range; members other than `jsonrpc`, `id`, `method` and
//! `params` are refused so a typo such as `param` is reported rather than ignored. A request
//! without an id is a notification: the daemon runs it and sends no response. Errors detected
//! while decoding are answered with a `null` id, as the spec requires.
//!
//! Invariants: no input makes a decoder panic; a line longer than [`LINE_LEN_MAX_BYTES`] is
//! refused before it is parsed, and [`LineReader`] never buffers much more than that limit.

use serde_json::{Map, Value};

use crate::quote::{clip_message, quote_untrusted};

/// The `jsonrpc` member every message carries.
pub const JSONRPC_VERSION: &str = "2.0";
/// Longest line (one request, response or notification, without its newline) either side
/// accepts: a `migration.start` with a long file list and a `db_meta` of
/// [`crate::limits::DB_META_LEN_MAX_BYTES`] fits; a hostile client cannot make the daemon
/// buffer more than this per connection.
pub const LINE_LEN_MAX_BYTES: usize = 4 << 20;
/// Longest method name: real names are a few dozen bytes.
pub const METHOD_LEN_MAX_BYTES: usize = 256;
/// Longest string id a client may choose.
pub const ID_LEN_MAX_BYTES: usize = 256;
/// The method of the notifications `events.subscribe` streams.
pub const EVENT_METHOD: &str = "migration.event";
/// The method of the notification that tells a slow subscriber how many events it missed:
/// params `{"dropped_count": n}`.
pub const EVENTS_DROPPED_METHOD: &str = "events.dropped";
/// The method that opens an event subscription on its connection.
pub const SUBSCRIBE_METHOD: &str = "events.subscribe";

/// The error codes of the control socket; see the module docs for when each is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    MigrationInProgress,
    NotFound,
    PauseBudgetExceeded,
    CutOverCancelled,
    FenceViolated,
    Refused,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        Self::ParseError,
        Self::InvalidRequest,
        Self::MethodNotFound,
        Self::InvalidParams,
        Self::MigrationInProgress,
        Self::NotFound,
        Self::PauseBudgetExceeded,
        Self::CutOverCancelled,
        Self::FenceViolated,
        Self::Refused,
        Self::Internal,
    ];

    /// The number on the wire.
    pub const fn code(self) -> i64 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::MigrationInProgress => -32001,
            Self::NotFound => -32002,
            Self::PauseBudgetExceeded => -32003,
            Self::CutOverCancelled => -32004,
            Self::FenceViolated => -32005,
            Self::Refused => -32006,
            Self::Internal => -32010,
        }
    }

    /// The named code for a number, if it is one of ours.
    pub fn from_code(code: i64) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// A JSON-RPC error object: what a failed request is answered with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("control error {code}: {message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    /// Structured detail (for ferry's named errors, the fields the module docs list).
    pub data: Option<Value>,
}

impl RpcError {
    /// The message is held to [`crate::quote::MESSAGE_LEN_MAX_BYTES`] with every long quote cut
    /// ([`clip_message`]): whatever a handler quoted, the reply stays readable.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code: code.code(), message: clip_message(&message.into()), data: None }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ParseError, message)
    }
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            ErrorCode::MethodNotFound,
            format!("unknown method {}; see the README for the methods", quote_untrusted(method)),
        )
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParams, message)
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Refused, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The named code, if the number is one of ours.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(self.code)
    }

    fn to_value(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("code".into(), Value::from(self.code));
        obj.insert("message".into(), Value::from(self.message.clone()));
        if let Some(data) = &self.data {
            obj.insert("data".into(), data.clone());
        }
        Value::Object(obj)
    }

    fn from_value(value: &Value) -> Result<Self, ProtocolViolation> {
        let obj = value.as_object().ok_or_else(|| violation("`error` is not an object"))?;
        let code =
            obj.get("code").and_then(Value::as_i64).ok_or_else(|| violation("`error.code` is not an integer"))?;
        let message =
            obj.get("message").and_then(Value::as_str).ok_or_else(|| violation("`error.message` is not a string"))?;
        Ok(Self { code, message: message.to_owned(), data: obj.get("data").cloned() })
    }
}

/// The id a client gives a request so it can match the response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    Number(i64),
    String(String),
}

impl RequestId {
    fn to_value(&self) -> Value {
        match self {
            Self::Number(n) => Value::from(*n),
            Self::String(s) => Value::from(s.clone()),
        }
    }

    /// `None` if the value is not an id we accept (see the module docs).
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_i64().map(Self::Number),
            Value::String(s) if s.len() <= ID_LEN_MAX_BYTES => Some(Self::String(s.clone())),
            _ => None,
        }
    }
}

/// A request (with an id) or a client notification (without one).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None`: a notification; the daemon runs it and answers nothing.
    pub id: Option<RequestId>,
    pub method: String,
    /// An object or an array; `Value::Null` when the request had no `params`.
    pub params: Value,
}

/// A daemon's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// `None` only for errors found before the request's id could be read.
    pub id: Option<RequestId>,
    pub outcome: Result<Value, RpcError>,
}

/// A message without an id that needs no answer (events from the daemon).
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Value,
}

/// What a client reads from the daemon: a response or a notification.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Response(Response),
    Notification(Notification),
}

/// The daemon sent something that is not a JSON-RPC 2.0 response or notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the daemon broke the control protocol: {0}; check that client and daemon versions match")]
pub struct ProtocolViolation(pub String);

fn violation(what: &str) -> ProtocolViolation {
    ProtocolViolation(what.to_owned())
}

/// Strips one trailing `\n` and then one `\r` (lines typed into `socat` may end in CRLF).
fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decodes one line a client sent into a request, or the error to answer it with.
pub fn decode_line(line: &[u8]) -> Result<Request, RpcError> {
    let line = trim_line_end(line);
    if line.len() > LINE_LEN_MAX_BYTES {
        return Err(RpcError::invalid_request(format!(
            "request line of {} bytes is over the limit of {LINE_LEN_MAX_BYTES} bytes; send smaller requests",
            line.len()
        )));
    }
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| RpcError::parse_error(format!("request is not JSON ({e}); send one JSON object per line")))?;
    let obj = match value {
        Value::Object(obj) => obj,
        Value::Array(_) => {
            return Err(RpcError::invalid_request("batches are not supported; send one request object per line"))
        }
        _ => return Err(RpcError::invalid_request("a request must be a JSON object")),
    };
    if let Some(unknown) = obj.keys().find(|k| !matches!(k.as_str(), "jsonrpc" | "id" | "method" | "params")) {
        return Err(RpcError::invalid_request(format!(
            "unknown member {}; a request has only jsonrpc, id, method and params",
            quote_untrusted(unknown)
        )));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
        return Err(RpcError::invalid_request("`jsonrpc` must be the string \"2.0\""));
    }
    let id = match obj.get("id") {
        None => None,
        Some(raw) => Some(RequestId::from_value(raw).ok_or_else(|| {
            RpcError::invalid_request(format!(
                "`id` must be a string of at most {ID_LEN_MAX_BYTES} bytes or an integer (i64), not null"
            ))
        })?),
    };
    let method = match obj.get("method") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= METHOD_LEN_MAX_BYTES => m.clone(),
        _ => {
            return Err(RpcError::invalid_request(format!(
                "`method` must be a non-empty string of at most {METHOD_LEN_MAX_BYTES} bytes"
            )))
        }
    };
    let params = match obj.get("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p.clone(),
        Some(_) => return Err(RpcError::invalid_request("`params` must be an object or an array")),
    };
    Ok(Request { id, method, params })
}

/// Serializes a JSON value as one line. A `Value` always serializes (its keys are strings), so
/// the fallback is never used; it keeps this function total without a panic path.
fn to_line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| {
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32010,"message":"internal: could not serialize"}}"#.to_vec()
    });
    line.push(b'\n');
    line
}

/// Encodes a request as one line, newline included.
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
    if let Some(id) = &request.id {
        obj.insert("id".into(), id.to_value());
    }
    obj.insert("method".into(), Value::from(request.method.clone()));
    if !request.params.is_null() {
        obj.insert("params".into(), request.params.clone());
    }
    to_line(&Value::Object(obj))
}

/// Encodes a response as one line, newline included.
pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
    obj.insert("id".into(), response.id.as_ref().map_or(Value::Null, RequestId::to_value));
    match &response.outcome {
        Ok(result) => obj.insert("result".into(), result.clone()),
        Err(error) => obj.insert("error".into(), error.to_value()),
    };
    to_line(&Value::Object(obj))
}

/// Encodes a notification as one line, newline included.
pub fn encode_notification(notification: &Notification) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("jsonrpc".into(), Value::from(JSONRPC_VERSION));
    obj.insert("method".into(), Value::from(notification.method.clone()));
    obj.insert("params".into(), notification.params.clone());
    to_line(&Value::Object(obj))
}

/// Decodes one line the daemon sent.
pub fn decode_server_line(line: &[u8]) -> Result<ServerMessage, ProtocolViolation> {
    let line = trim_line_end(line);
    if line.len() > LINE_LEN_MAX_BYTES {
        return Err(violation("a line is over the length limit"));
    }
    let value: Value =
        serde_json::from_slice(line).map_err(|e| ProtocolViolation(format!("a line is not JSON ({e})")))?;
    let obj = value.as_object().ok_or_else(|| violation("a line is not a JSON object"))?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
        return Err(violation("`jsonrpc` is not \"2.0\""));
    }
    if let Some(method) = obj.get("method") {
        let method = method.as_str().ok_or_else(|| violation("`method` is not a string"))?;
        let params = obj.get("params").cloned().unwrap_or(Value::Null);
        return Ok(ServerMessage::Notification(Notification { method: method.to_owned(), params }));
    }
    let id = match obj.get("id") {
        None => return Err(violation("a response has no `id`")),
        Some(Value::Null) => None,
        Some(raw) => {
            Some(RequestId::from_value(raw).ok_or_else(|| violation("a response has an id of the wrong type"))?)
        }
    };
    let outcome = match (obj.get("result"), obj.get("error")) {
        (Some(result), None) => Ok(result.clone()),
        (None, Some(error)) => Err(RpcError::from_value(error)?),
        _ => return Err(violation("a response must have exactly one of `result` and `error`")),
    };
    Ok(ServerMessage::Response(Response { id, outcome }))
}

/// A line in a [`LineReader`] was longer than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a line is longer than {limit_bytes} bytes; the connection is closed")]
pub struct LineTooLong {
    pub limit_bytes: usize,
}

/// Splits a byte stream into newline-terminated lines, refusing a line longer than a limit.
///
/// Feed it with [`push`](Self::push) and drain it with [`next_line`](Self::next_line) until
/// `None` after every push; then it holds at most the limit plus one push's bytes. Once a line
/// is too long the reader stays failed: the stream has lost its framing.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline, so each byte is scanned once.
    scanned_bytes: usize,
    line_len_max_bytes: usize,
    failed: bool,
}

impl LineReader {
    pub fn new(line_len_max_bytes: usize) -> Self {
        Self { buf: Vec::new(), scanned_bytes: 0, line_len_max_bytes, failed: false }
    }

    /// Appends bytes read from the stream. After a failure they are discarded.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete line without its `\n`, `None` if none is complete yet, or the error
    /// if the line being read is over the limit.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineTooLong>> {
        if self.failed {
            return Some(Err(LineTooLong { limit_bytes: self.line_len_max_bytes }));
        }
        let unscanned = self.buf.get(self.scanned_bytes..).unwrap_or_default();
        match unscanned.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let newline_at = self.scanned_bytes.saturating_add(pos);
                if newline_at > self.line_len_max_bytes {
                    return Some(Err(self.fail()));
                }
                let mut line: Vec<u8> = self.buf.drain(..=newline_at).collect();
                line.pop();
                self.scanned_bytes = 0;
                Some(Ok(line))
            }
            None if self.buf.len() > self.line_len_max_bytes => Some(Err(self.fail())),
            None => {
                self.scanned_bytes = self.buf.len();
                None
            }
        }
    }

    /// Bytes of an unfinished line held (what is dropped if the stream ends now).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    fn fail(&mut self) -> LineTooLong {
        self.failed = true;
        self.buf = Vec::new();
        self.scanned_bytes = 0;
        LineTooLong { limit_bytes: self.line_len_max_bytes }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn code_of(line: &[u8]) -> i64 {
        decode_line(line).unwrap_err().code
    }

    #[test]
    fn decodes_a_request() {
        let req = decode_line(br#"{"jsonrpc":"2.0","id":7,"method":"node.info"}"#).unwrap();
        assert_eq!(req, Request { id: Some(RequestId::Number(7)), method: "node.info".into(), params: Value::Null });
        let req = decode_line(b"{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"method\":\"m\",\"params\":[1]}\r\n").unwrap();
        assert_eq!(req.id, Some(RequestId::String("a".into())));
        assert_eq!(req.params, json!([1]));
        let note = decode_line(br#"{"jsonrpc":"2.0","method":"m","params":{}}"#).unwrap();
        assert_eq!(note.id, None);
    }

    #[test]
    fn classifies_malformed_lines() {
        let parse = ErrorCode::ParseError.code();
        let invalid = ErrorCode::InvalidRequest.code();
        let rows: &[(&[u8], i64)] = &[
            (b"", parse),
            (b"hello", parse),
            (b"{\"jsonrpc\":", parse),
            (b"\xff\xfe{}", parse),
            (b"42", invalid),
            (b"[]", invalid),
            (br#"[{"jsonrpc":"2.0","id":1,"method":"m"}]"#, invalid),
            (br#"{"id":1,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"1.0","id":1,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":2.0,"id":1,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":null,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1.5,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":{},"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":[1],"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":true,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"m"}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1,"method":""}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1,"method":5}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1,"method":"m","params":3}"#, invalid),
            (br#"{"jsonrpc":"2.0","id":1,"method":"m","param":{}}"#, invalid),
        ];
        for (line, code) in rows {
            assert_eq!(code_of(line), *code, "line {:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn refuses_an_oversized_line_before_parsing() {
        let mut line = br#"{"jsonrpc":"2.0","id":1,"method":"m","params":[""#.to_vec();
        line.resize(LINE_LEN_MAX_BYTES + 1, b'a');
        assert_eq!(code_of(&line), ErrorCode::InvalidRequest.code());
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
        }
        assert_eq!(ErrorCode::from_code(-1), None);
    }

    #[test]
    fn line_reader_splits_and_refuses_long_lines() {
        let mut reader = LineReader::new(4);
        reader.push(b"ab\ncd");
        assert_eq!(reader.next_line(), Some(Ok(b"ab".to_vec())));
        assert_eq!(reader.next_line(), None);
        reader.push(b"e\n\n");
        assert_eq!(reader.next_line(), Some(Ok(b"cde".to_vec())));
        assert_eq!(reader.next_line(), Some(Ok(Vec::new())));
        reader.push(b"abcd\n");
        assert_eq!(reader.next_line(), Some(Ok(b"abcd".to_vec())));
        reader.push(b"abcde");
        assert_eq!(reader.next_line(), Some(Err(LineTooLong { limit_bytes: 4 })));
        reader.push(b"\nok\n");
        assert_eq!(reader.next_line(), Some(Err(LineTooLong { limit_bytes: 4 })));
        assert_eq!(reader.pending_bytes(), 0);
    }

    fn arb_id() -> impl Strategy<Value = Option<RequestId>> {
        prop_oneof![
            Just(None),
            any::<i64>().prop_map(|n| Some(RequestId::Number(n))),
            "[a-z0-9-]{0,20}".prop_map(|s| Some(RequestId::String(s))),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_params() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            prop::collection::vec(arb_json(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", arb_json(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            match decode_line(&bytes) {
                Ok(req) => prop_assert!(!req.method.is_empty()),
                Err(e) => prop_assert!(e.code == -32700 || e.code == -32600, "code {}", e.code),
            }
            let _ = decode_server_line(&bytes);
        }

        #[test]
        fn requests_round_trip(id in arb_id(), method in "[a-z.]{1,32}", params in arb_params()) {
            let req = Request { id, method, params };
            let line = encode_request(&req);
            prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            prop_assert_eq!(decode_line(&line).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(
            id in arb_id(),
            result in arb_json(),
            code in any::<i64>(),
            message in ".{0,40}",
            data in prop::option::of(arb_json()),
            is_error in any::<bool>(),
        ) {
            let outcome = if is_error { Err(RpcError { code, message, data }) } else { Ok(result) };
            let resp = Response { id, outcome };
            let line = encode_response(&resp);
            prop_assert_eq!(decode_server_line(&line).unwrap(), ServerMessage::Response(resp));
        }

        #[test]
        fn notifications_round_trip(method in "[a-z.]{1,32}", params in arb_json()) {
            let note = Notification { method, params };
            let line = encode_notification(&note);
            prop_assert_eq!(decode_server_line(&line).unwrap(), ServerMessage::Notification(note));
        }

        #[test]
        fn line_reader_is_independent_of_chunking(
            lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 0..8),
            cuts in prop::collection::vec(1usize..16, 0..16),
        ) {
            let lines: Vec<Vec<u8>> =
                lines.into_iter().map(|l| l.into_iter().filter(|&b| b != b'\n').collect()).collect();
            let stream: Vec<u8> = lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect();
            let mut reader = LineReader::new(19);
            let mut got = Vec::new();
            let mut rest = stream.as_slice();
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                reader.push(chunk);
                rest = tail;
                while let Some(line) = reader.next_line() {
                    got.push(line.unwrap());
                }
            }
            prop_assert_eq!(got, lines);
            prop_assert_eq!(reader.pending_bytes(), 0);
        }
    }
}
