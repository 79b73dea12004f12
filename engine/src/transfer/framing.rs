//! Reading and writing frames on quinn streams.
//!
//! What it does: reads a frame header and checks it before reading a body of the length it
//! names (bounded by the caller's limit, which is at most the frame kind's limit); writes
//! control frames and chunk frames (header then the chunk's `Bytes`, without a copy).
//!
//! What it does not: interpret messages.

use bytes::Bytes;
use ferry_wire::frame::{self, FrameHeader, FrameKind, HEADER_LEN_BYTES};
use ferry_wire::message::Message;
use quinn::{ReadExactError, RecvStream, SendStream};

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

/// Reads a body of the header's length.
pub async fn read_body(recv: &mut RecvStream, header: &FrameHeader) -> Result<Vec<u8>, TransferError> {
    let mut body = vec![0u8; header.body_len_bytes as usize];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(body),
        Err(ReadExactError::FinishedEarly(n)) => Err(TransferError::Malformed(format!(
            "stream ended inside a frame body ({n} of {} bytes)",
            header.body_len_bytes
        ))),
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads one control message, refusing bodies over `body_max_bytes`. `None` at a clean end.
pub async fn read_control(recv: &mut RecvStream, body_max_bytes: u32) -> Result<Option<Message>, TransferError> {
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
    let body = read_body(recv, &header).await?;
    header.check_body(&body)?;
    Ok(Some(Message::decode(&body)?))
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

/// The error for a message other than the one the protocol expects here (`None`: the stream
/// ended).
pub fn unexpected(expected: &str, got: Option<&Message>) -> TransferError {
    TransferError::Protocol(format!("expected {expected}, got {}", got.map_or("the end of the stream", |m| m.name())))
}
