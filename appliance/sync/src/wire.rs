//! Frames over quinn streams: the thin IO half of `appliance-sync-proto`'s
//! framing (header checked before any payload byte is read).

use appliance_sync_proto::frame::HEADER_LEN;
use appliance_sync_proto::{decode_payload, encode, parse_header, FrameError, Message};
use quinn::{ReadExactError, RecvStream, SendStream};
use std::time::Duration;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireIoError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("no data for {0:?}")]
    Idle(Duration),
    /// The peer finished the stream at a frame boundary while an answer
    /// was awaited (appliances before the typed `IdleTimeout` answer did
    /// so when they gave up on a stream).
    #[error("the stream ended without an answer; try again")]
    NoAnswer,
}

/// Reads the next frame. `Ok(None)` on a clean end of stream at a frame
/// boundary. `idle` bounds the wait for each part of the frame, so a stream
/// that stalls mid-frame cannot pin memory or a task forever.
pub async fn read_frame(
    recv: &mut RecvStream,
    idle: Duration,
) -> Result<Option<(Message, usize)>, WireIoError> {
    let mut header = [0u8; HEADER_LEN];
    match tokio::time::timeout(idle, recv.read_exact(&mut header)).await {
        Err(_) => return Err(WireIoError::Idle(idle)),
        Ok(Ok(())) => {}
        Ok(Err(ReadExactError::FinishedEarly(0))) => return Ok(None),
        Ok(Err(ReadExactError::FinishedEarly(_))) => return Err(WireIoError::Truncated),
        Ok(Err(ReadExactError::ReadError(e))) => return Err(e.into()),
    }
    let len = parse_header(&header)?;
    let payload = read_payload(recv, len, idle).await?;
    Ok(Some((decode_payload(&payload)?, len)))
}

/// Reads the payload of a frame whose header said `len` bytes, appending
/// quinn's buffers to it (no zero-filled buffer first).
pub async fn read_payload(
    recv: &mut RecvStream,
    len: usize,
    idle: Duration,
) -> Result<Vec<u8>, WireIoError> {
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        match tokio::time::timeout(idle, recv.read_chunk(len - payload.len(), true)).await {
            Err(_) => return Err(WireIoError::Idle(idle)),
            Ok(Ok(Some(chunk))) => payload.extend_from_slice(&chunk.bytes),
            Ok(Ok(None)) => return Err(WireIoError::Truncated),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    Ok(payload)
}

/// Reads a frame header only (for callers that reserve memory first).
pub async fn read_header(
    recv: &mut RecvStream,
    idle: Duration,
) -> Result<Option<usize>, WireIoError> {
    let mut header = [0u8; HEADER_LEN];
    match tokio::time::timeout(idle, recv.read_exact(&mut header)).await {
        Err(_) => Err(WireIoError::Idle(idle)),
        Ok(Ok(())) => Ok(Some(parse_header(&header)?)),
        Ok(Err(ReadExactError::FinishedEarly(0))) => Ok(None),
        Ok(Err(ReadExactError::FinishedEarly(_))) => Err(WireIoError::Truncated),
        Ok(Err(ReadExactError::ReadError(e))) => Err(e.into()),
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, message: &Message) -> Result<(), WireIoError> {
    let frame = encode(message)?;
    send.write_all(&frame).await?;
    Ok(())
}
