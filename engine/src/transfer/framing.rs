//! Reading and writing frames on quinn streams.
//!
//! What it does: reads a frame header and checks it before reading a body of the length it
//! names (bounded by the caller's limit, which is at most the frame kind's limit); reads chunk
//! streams with a [`FrameReader`], which takes every piece quinn has ready in one call and
//! hands a body over as those `Bytes` pieces, checksummed as they arrive (no zeroed buffer, no
//! copy); writes control frames and chunk frames (header then the chunk's `Bytes`, without a
//! copy).
//!
//! What it does not: interpret messages, or write bodies anywhere.
//!
//! Bounds: a [`FrameReader`] holds pieces quinn handed over that no frame has used yet: fewer
//! than two `read_chunks` batches ([`READ_BATCH_COUNT`] pieces each), within the stream's
//! receive window. A [`BodyPieces`] holds at most [`BODY_PIECES_MAX_COUNT`] pieces as quinn gave
//! them; past that, the run of pieces is copied into one buffer. Each piece keeps the datagram
//! batch it came in alive, so without this a peer that fragments a chunk into tiny frames
//! could make one chunk hold far more memory than its length.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use ferry_wire::frame::{self, FrameHeader, FrameKind, HEADER_LEN_BYTES};
use ferry_wire::message::Message;
use quinn::{ReadExactError, RecvStream, SendStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::task::AbortOnDrop;
use super::TransferError;

/// Largest control body accepted before the offer is known (hellos, small messages).
pub const SMALL_CONTROL_BODY_MAX_BYTES: u32 = 1 << 20;

/// Reads one frame header; `None` when the stream ended cleanly between frames.
pub async fn read_header(recv: &mut RecvStream) -> Result<Option<FrameHeader>, TransferError> {
    let mut buf = [0u8; HEADER_LEN_BYTES];
    match recv.read_exact(&mut buf).await {
        Ok(()) => Ok(Some(FrameHeader::decode(&buf)?)),
        Err(ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => Err(TransferError::Malformed(format!(
            "stream ended inside a frame header ({n} of {HEADER_LEN_BYTES} bytes)"
        ))),
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// What a body buffer starts with before its bytes arrive: a hostile header's length is only
/// ever a bound, never an allocation.
pub const BODY_INITIAL_CAPACITY_BYTES: usize = 64 << 10;

/// Reads a body of the header's length. The buffer grows as the bytes arrive (at most doubling,
/// never past the header's length, which was checked against its kind's limit when decoded), so
/// a peer that declares a 64 MiB frame and sends 100 bytes costs 64 KiB, not 64 MiB.
pub async fn read_body(recv: &mut RecvStream, header: &FrameHeader) -> Result<Vec<u8>, TransferError> {
    let mut body = Vec::new();
    read_body_into(recv, header, &mut body).await?;
    Ok(body)
}

async fn read_body_into(recv: &mut RecvStream, header: &FrameHeader, body: &mut Vec<u8>) -> Result<(), TransferError> {
    let want = header.body_len_bytes as usize;
    body.clear();
    while body.len() < want {
        let left = want - body.len();
        let Some(chunk) = recv.read_chunk(left, true).await? else {
            return Err(TransferError::Malformed(format!(
                "stream ended inside a frame body ({} of {} bytes)",
                body.len(),
                header.body_len_bytes
            )));
        };
        let bytes = chunk.bytes.get(..chunk.bytes.len().min(left)).unwrap_or_default();
        let need = body.len() + bytes.len();
        if need > body.capacity() {
            let grown = need.max(body.capacity().saturating_mul(2)).max(BODY_INITIAL_CAPACITY_BYTES).min(want);
            body.reserve_exact(grown - body.len());
        }
        body.extend_from_slice(bytes);
    }
    Ok(())
}

/// Pieces a [`BodyPieces`] holds as received before it copies them into one buffer. A 1 MiB
/// chunk arrives in about 750 pieces on a 1452-byte path MTU, so the default chunk is never
/// copied; it is also the most iovecs one `pwritev` takes (`IOV_MAX`).
pub const BODY_PIECES_MAX_COUNT: usize = 1024;

/// A frame body as quinn received it: its pieces in stream order, their total length and
/// their running CRC32C.
#[derive(Debug, Default)]
pub struct BodyPieces {
    pieces: Vec<Bytes>,
    /// `pieces[..compacted_count]` are runs already copied together; only the pieces after
    /// them count towards [`BODY_PIECES_MAX_COUNT`].
    compacted_count: usize,
    len_bytes: u64,
    crc32c: u32,
}

impl BodyPieces {
    /// The pieces, in order; together they are the body.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// The CRC32C of the whole body (of the pieces pushed so far).
    pub fn crc32c(&self) -> u32 {
        self.crc32c
    }

    /// Empties the body, keeping the piece list's allocation for the next one.
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.compacted_count = 0;
        self.len_bytes = 0;
        self.crc32c = 0;
    }

    /// Appends the next piece of the body.
    pub fn push(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        self.crc32c = ferry_wire::crc32c_append(self.crc32c, &piece);
        self.len_bytes += piece.len() as u64;
        self.pieces.push(piece);
        if self.pieces.len() - self.compacted_count >= BODY_PIECES_MAX_COUNT {
            self.compact_tail();
        }
    }

    /// Copies the pieces received since the last compaction into one buffer, so what they
    /// keep allocated is their own length. Each byte is copied at most once.
    fn compact_tail(&mut self) {
        let tail = self.pieces.get(self.compacted_count..).unwrap_or_default();
        let mut joined = BytesMut::with_capacity(tail.iter().map(Bytes::len).sum());
        for piece in tail {
            joined.extend_from_slice(piece);
        }
        self.pieces.truncate(self.compacted_count);
        self.pieces.push(joined.freeze());
        self.compacted_count = self.pieces.len();
    }
}

/// Pieces one `read_chunks` call may return: enough that a 1 MiB chunk takes a few dozen calls
/// (each takes the connection's lock once), few enough to bound what a reader holds.
pub const READ_BATCH_COUNT: usize = 32;

/// Reads frames from one stream, keeping quinn's pieces as they are: a header is copied out
/// (32 bytes), a body is handed over as pieces, split where a frame ends.
#[derive(Debug)]
pub struct FrameReader {
    recv: RecvStream,
    /// Pieces read from quinn and not used yet, in stream order.
    ready: VecDeque<Bytes>,
    /// Slots `read_chunks` fills.
    slots: Vec<Bytes>,
    finished: bool,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        Self { recv, ready: VecDeque::new(), slots: vec![Bytes::new(); READ_BATCH_COUNT], finished: false }
    }

    /// Bytes ready without asking quinn.
    fn ready_bytes(&self) -> usize {
        self.ready.iter().map(Bytes::len).sum()
    }

    /// Takes the pieces quinn has ready (waiting for at least one); `false` at the stream's end.
    async fn fill(&mut self) -> Result<bool, TransferError> {
        if self.finished {
            return Ok(false);
        }
        match self.recv.read_chunks(&mut self.slots).await? {
            Some(count) => {
                for slot in self.slots.iter_mut().take(count) {
                    self.ready.push_back(std::mem::take(slot));
                }
                Ok(true)
            }
            None => {
                self.finished = true;
                Ok(false)
            }
        }
    }

    /// Reads one frame header; `None` when the stream ended cleanly between frames.
    pub async fn read_header(&mut self) -> Result<Option<FrameHeader>, TransferError> {
        while self.ready_bytes() < HEADER_LEN_BYTES {
            if !self.fill().await? {
                let held = self.ready_bytes();
                if held == 0 {
                    return Ok(None);
                }
                return Err(TransferError::Malformed(format!(
                    "stream ended inside a frame header ({held} of {HEADER_LEN_BYTES} bytes)"
                )));
            }
        }
        let mut buf = [0u8; HEADER_LEN_BYTES];
        let mut filled = 0;
        while filled < HEADER_LEN_BYTES {
            let Some(front) = self.ready.front_mut() else { break };
            let n = front.len().min(HEADER_LEN_BYTES - filled);
            if let (Some(to), Some(from)) = (buf.get_mut(filled..filled + n), front.get(..n)) {
                to.copy_from_slice(from);
            }
            front.advance(n);
            filled += n;
            if front.is_empty() {
                self.ready.pop_front();
            }
        }
        Ok(Some(FrameHeader::decode(&buf)?))
    }

    /// Reads a body of the header's length into `body` (emptied first), checksumming it on the
    /// way. The header's length was checked against its kind's limit when it was decoded.
    pub async fn read_body(&mut self, header: &FrameHeader, body: &mut BodyPieces) -> Result<(), TransferError> {
        body.clear();
        let want_bytes = u64::from(header.body_len_bytes);
        while body.len_bytes() < want_bytes {
            let Some(mut piece) = self.ready.pop_front() else {
                if self.fill().await? {
                    continue;
                }
                return Err(TransferError::Malformed(format!(
                    "stream ended inside a frame body ({} of {} bytes)",
                    body.len_bytes(),
                    header.body_len_bytes
                )));
            };
            let left = usize::try_from(want_bytes - body.len_bytes()).unwrap_or(usize::MAX);
            if piece.len() > left {
                // The next frame starts inside this piece: keep its rest for it.
                let rest = piece.split_off(left);
                self.ready.push_front(rest);
            }
            body.push(piece);
        }
        Ok(())
    }
}

/// Reads one control message, refusing bodies over `body_max_bytes`. `None` at a clean end.
pub async fn read_control(recv: &mut RecvStream, body_max_bytes: u32) -> Result<Option<Message>, TransferError> {
    let Some(header) = read_control_header(recv, body_max_bytes).await? else { return Ok(None) };
    read_control_body(recv, &header).await.map(Some)
}

/// The first half of [`read_control`]: a control frame's header, its length checked against
/// `body_max_bytes`, so a caller can reserve the body's bytes before it reads them.
pub async fn read_control_header(
    recv: &mut RecvStream,
    body_max_bytes: u32,
) -> Result<Option<FrameHeader>, TransferError> {
    let Some(header) = read_header(recv).await? else { return Ok(None) };
    if header.kind != FrameKind::Control {
        return Err(TransferError::Protocol(format!("expected a control frame, got {:?}", header.kind)));
    }
    if header.body_len_bytes > body_max_bytes {
        return Err(TransferError::Malformed(format!(
            "control frame of {} bytes is over the {} bytes allowed here",
            header.body_len_bytes, body_max_bytes
        )));
    }
    Ok(Some(header))
}

/// The second half of [`read_control`]: the body of a header it read, checked and decoded.
pub async fn read_control_body(recv: &mut RecvStream, header: &FrameHeader) -> Result<Message, TransferError> {
    let body = read_body(recv, header).await?;
    header.check_body(&body)?;
    Ok(Message::decode(&body)?)
}

/// Control messages read by their own task, each holding its body's bytes of the reader's
/// budget until it is taken: the queue is bounded in bytes, not only in messages.
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::Receiver<(Result<Message, TransferError>, Option<OwnedSemaphorePermit>)>,
    budget: Arc<Semaphore>,
    budget_bytes: u32,
}

impl Messages {
    /// The next message; `None` once the reader ended (after handing over the stream's end or
    /// its error). Cancel-safe, like the channel under it.
    pub async fn recv(&mut self) -> Option<Result<Message, TransferError>> {
        self.rx.recv().await.map(|(message, _budget)| message)
    }

    /// A message already read, without waiting; `None` when none is queued (also once the
    /// reader ended: [`Messages::recv`] reports that).
    pub fn try_recv(&mut self) -> Option<Result<Message, TransferError>> {
        self.rx.try_recv().ok().map(|(message, _budget)| message)
    }

    /// Body bytes read ahead and not yet taken (at most the budget).
    pub fn queued_bytes(&self) -> usize {
        (self.budget_bytes as usize).saturating_sub(self.budget.available_permits())
    }
}

/// Messages the reader queues at most, whatever their size.
const QUEUED_MESSAGES_MAX_COUNT: usize = 64;

/// Reads control frames of at most `body_max_bytes` from `recv` on a task of their own. Before
/// it reads a body the task reserves the body's bytes of `budget_bytes` (at least
/// `body_max_bytes`), and waits while earlier messages hold them: a peer that sends faster
/// than the conversation takes costs at most `budget_bytes` of queued bodies.
pub(crate) fn spawn_control_reader(
    mut recv: RecvStream,
    body_max_bytes: u32,
    budget_bytes: u32,
) -> (Messages, AbortOnDrop) {
    let budget_bytes = budget_bytes.max(body_max_bytes).max(1);
    let (tx, rx) = mpsc::channel(QUEUED_MESSAGES_MAX_COUNT);
    let budget = Arc::new(Semaphore::new(budget_bytes as usize));
    let task = tokio::spawn({
        let budget = budget.clone();
        async move {
            loop {
                let header = match read_control_header(&mut recv, body_max_bytes).await {
                    Ok(Some(header)) => header,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send((Err(e), None)).await;
                        return;
                    }
                };
                // The semaphore is never closed; an empty body still takes one byte's turn.
                let Ok(permit) = budget.clone().acquire_many_owned(header.body_len_bytes.max(1)).await else {
                    return;
                };
                let message = read_control_body(&mut recv, &header).await;
                let end = message.is_err();
                if tx.send((message, Some(permit))).await.is_err() || end {
                    return;
                }
            }
        }
    });
    (Messages { rx, budget, budget_bytes }, AbortOnDrop(task))
}

/// Writes one control message.
pub async fn write_control(send: &mut SendStream, message: &Message) -> Result<(), TransferError> {
    let framed = frame::encode_control(&message.encode())?;
    Ok(send.write_all(&framed).await?)
}

/// Writes one chunk frame: the header, then the chunk's bytes as they are.
pub async fn write_chunk(send: &mut SendStream, header: &FrameHeader, data: Bytes) -> Result<(), TransferError> {
    let head = Bytes::copy_from_slice(&header.encode());
    let mut pieces = [head, data];
    Ok(send.write_all_chunks(&mut pieces).await?)
}

/// A message as a stream's reader task hands it over (`None`: the task ended, after the
/// stream's end or an error it already handed over).
pub fn received(next: Option<Result<Option<Message>, TransferError>>) -> Result<Option<Message>, TransferError> {
    next.unwrap_or_else(|| Err(TransferError::Connection("the target closed the control stream".into())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;
    use crate::quic::{self, QuicTuning};
    use crate::tls::{self, NodeIdentity};
    use ferry_wire::NodeId;

    /// A client and a server connection over loopback with development certificates.
    async fn connected() -> (quinn::Connection, quinn::Connection, quinn::Endpoint, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (NodeId::new("source").unwrap(), NodeId::new("target").unwrap());
        crate::certs::init_ca(dir.path(), false).unwrap();
        for name in [&source, &target] {
            crate::certs::issue(dir.path(), name, &crate::certs::IssueOptions::default()).unwrap();
        }
        let tuning = QuicTuning::default();
        let server_crypto =
            tls::server_crypto(&NodeIdentity::from_dir(dir.path(), &target).unwrap(), std::slice::from_ref(&source))
                .unwrap();
        let server = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), server_crypto, &tuning).unwrap();
        let addr = server.local_addr().unwrap();
        let client = quic::client_endpoint(addr, &tuning).unwrap();
        let config = quic::client_config(
            tls::client_crypto(&NodeIdentity::from_dir(dir.path(), &source).unwrap()).unwrap(),
            &tuning,
        );
        let accepting = server.clone();
        let server_side = tokio::spawn(async move { accepting.accept().await.unwrap().await.unwrap() });
        let client_conn = client.connect_with(config, addr, target.as_str()).unwrap().await.unwrap();
        (client_conn, server_side.await.unwrap(), server, dir)
    }

    /// Sends `bytes` on a new uni stream in writes of the given sizes (cycled), then finishes
    /// it; returns the receiving side's reader.
    async fn send_in_pieces(
        client: &quinn::Connection,
        server: &quinn::Connection,
        bytes: Vec<u8>,
        sizes: &[usize],
    ) -> FrameReader {
        let mut send = client.open_uni().await.unwrap();
        let sizes = sizes.to_vec();
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for size in sizes.iter().copied().cycle() {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + size).min(bytes.len());
                send.write_all(&bytes[at..end]).await.unwrap();
                at = end;
            }
            send.finish().unwrap();
            let _ = send.stopped().await;
        });
        let recv = server.accept_uni().await.unwrap();
        // The writer runs on; the reader sees its bytes and then the end of the stream.
        drop(writer);
        FrameReader::new(recv)
    }

    fn chunk_frame(file_index: u32, body: &[u8]) -> Vec<u8> {
        let header = FrameHeader::chunk(file_index, 0, body.len(), ferry_wire::crc32c(body)).unwrap();
        let mut out = header.encode().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_split_anywhere_are_read_back_whole() {
        let (client, server, _endpoint, _dir) = connected().await;
        let bodies: Vec<Vec<u8>> = [70_000usize, 1, 5_000, 300_000, 0]
            .iter()
            .enumerate()
            .map(|(i, len)| (0..*len).map(|b| ((b * 13 + i) % 256) as u8).collect())
            .collect();
        let stream: Vec<u8> = bodies.iter().enumerate().flat_map(|(i, b)| chunk_frame(i as u32, b)).collect();
        // Writes that cut headers and bodies at odd places.
        let mut reader = send_in_pieces(&client, &server, stream, &[7, 1, 30, 1_000, 65_537, 3]).await;
        let mut body = BodyPieces::default();
        for (i, expected) in bodies.iter().enumerate() {
            let header = reader.read_header().await.unwrap().unwrap();
            assert_eq!((header.kind, header.chunk_file_index), (FrameKind::Chunk, i as u32));
            reader.read_body(&header, &mut body).await.unwrap();
            let got: Vec<u8> = body.pieces().iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(&got, expected);
            assert_eq!(body.crc32c(), header.body_crc32c);
        }
        assert!(reader.read_header().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ending_inside_a_frame_is_malformed() {
        let (client, server, _endpoint, _dir) = connected().await;
        let frame = chunk_frame(0, &[9u8; 4_000]);
        let mut reader = send_in_pieces(&client, &server, frame[..HEADER_LEN_BYTES + 100].to_vec(), &[50]).await;
        let header = reader.read_header().await.unwrap().unwrap();
        let err = reader.read_body(&header, &mut BodyPieces::default()).await.unwrap_err();
        assert!(matches!(err, TransferError::Malformed(_)), "{err}");
        let mut reader = send_in_pieces(&client, &server, frame[..HEADER_LEN_BYTES - 1].to_vec(), &[10]).await;
        let err = reader.read_header().await.unwrap_err();
        assert!(matches!(err, TransferError::Malformed(_)), "{err}");
    }

    /// Issue 18: a body is allocated as its bytes arrive. A control header that declares the
    /// largest body (64 MiB) followed by 100 bytes and the stream's end costs the initial
    /// 64 KiB, not a zero-filled 64 MiB; a real 300 KB body is read whole with a buffer no
    /// larger than its length.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_grows_as_its_bytes_arrive() {
        let (client, server, _endpoint, _dir) = connected().await;
        let declared =
            FrameHeader::control(&vec![0u8; ferry_wire::limits::CONTROL_BODY_LEN_MAX_BYTES as usize]).unwrap();
        let mut send = client.open_uni().await.unwrap();
        send.write_all(&declared.encode()).await.unwrap();
        send.write_all(&[7u8; 100]).await.unwrap();
        send.finish().unwrap();
        let mut recv = server.accept_uni().await.unwrap();
        let header = read_header(&mut recv).await.unwrap().unwrap();
        let mut body = Vec::new();
        let err = read_body_into(&mut recv, &header, &mut body).await.unwrap_err();
        assert!(err.to_string().contains("(100 of 67108864 bytes)"), "{err}");
        assert_eq!(body.len(), 100);
        assert!(body.capacity() <= BODY_INITIAL_CAPACITY_BYTES, "{} bytes held for 100", body.capacity());

        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut send = client.open_uni().await.unwrap();
        send.write_all(&frame::encode_control(&payload).unwrap()).await.unwrap();
        send.finish().unwrap();
        let mut recv = server.accept_uni().await.unwrap();
        let header = read_header(&mut recv).await.unwrap().unwrap();
        read_body_into(&mut recv, &header, &mut body).await.unwrap();
        assert_eq!(body, payload);
        assert!(body.capacity() <= payload.len(), "{} bytes held for {}", body.capacity(), payload.len());
    }

    /// Issue 18: the control reader's queue is bounded in bytes. Ten 600 KB messages sent at
    /// once to a reader with a 1 MiB budget that nobody reads from: the reader holds at most
    /// 1 MiB of bodies (one message), not all ten; taken one by one, all ten arrive in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_control_queue_is_bounded_in_bytes() {
        let (client, server, _endpoint, _dir) = connected().await;
        let message = |i: u32| Message::Error {
            kind: ferry_wire::message::ErrorKind::Protocol,
            message: format!("{i:04}{}", "x".repeat(3_000)),
        };
        let big = move |i: u32| {
            let mut body = message(i).encode();
            // Pad with JSON whitespace to 600 KB: the budget counts body bytes.
            body.resize(600_000, b' ');
            frame::encode_control(&body).unwrap()
        };
        let mut send = client.open_uni().await.unwrap();
        let writer = tokio::spawn(async move {
            for i in 0..10 {
                send.write_all(&big(i)).await.unwrap();
            }
            send.finish().unwrap();
            let _ = send.stopped().await;
        });
        let recv = server.accept_uni().await.unwrap();
        let (mut messages, _reader) = spawn_control_reader(recv, 1 << 20, 1 << 20);
        // Give the reader every chance to run ahead (loopback moves 6 MB in far less).
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            assert!(messages.queued_bytes() <= 1 << 20, "{} bytes queued", messages.queued_bytes());
        }
        for i in 0..10 {
            assert_eq!(messages.recv().await.unwrap().unwrap(), message(i));
        }
        assert!(messages.recv().await.is_none());
        writer.await.unwrap();
    }

    fn joined(body: &BodyPieces) -> Vec<u8> {
        body.pieces().iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn pieces_keep_the_bytes_and_their_checksum() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut body = BodyPieces::default();
        for piece in data.chunks(1_337) {
            body.push(Bytes::copy_from_slice(piece));
        }
        body.push(Bytes::new());
        assert_eq!(body.len_bytes(), data.len() as u64);
        assert_eq!(body.crc32c(), ferry_wire::crc32c(&data));
        assert_eq!(joined(&body), data);
        assert_eq!(body.pieces().len(), data.len().div_ceil(1_337));
        body.clear();
        assert_eq!((body.len_bytes(), body.crc32c(), body.pieces().len()), (0, 0, 0));
    }

    #[test]
    fn a_finely_fragmented_body_is_compacted_without_losing_bytes() {
        let data: Vec<u8> = (0..(5 * BODY_PIECES_MAX_COUNT + 17)).map(|i| (i % 251) as u8).collect();
        let mut body = BodyPieces::default();
        for byte in &data {
            body.push(Bytes::copy_from_slice(&[*byte]));
            assert!(body.pieces().len() <= 5 + BODY_PIECES_MAX_COUNT);
        }
        // Five runs of BODY_PIECES_MAX_COUNT one-byte pieces became five pieces.
        assert_eq!(body.pieces().len(), 5 + 17);
        assert_eq!(joined(&body), data);
        assert_eq!(body.crc32c(), ferry_wire::crc32c(&data));
    }
}
