//! Framing: `[payload length: u32 big-endian][frame format: u8][postcard payload]`.
//!
//! The 5-byte header is parsed and checked (format byte, `1..=MAX_FRAME_LEN`)
//! before a single payload byte is buffered, so a hostile length prefix costs
//! nothing. The payload must decode to exactly one [`Message`] with no bytes
//! left over. Decoding never panics; every failure is a [`FrameError`].
//!
//! Two ways to decode:
//! - an adapter that reads a QUIC stream itself calls [`parse_header`] on 5
//!   bytes, reads exactly that many payload bytes, then [`decode_payload`];
//! - an adapter that gets arbitrary byte slices feeds them to a
//!   [`FrameDecoder`], which buffers at most one frame.

use crate::limits::MAX_FRAME_LEN;
use crate::message::Message;

/// Version of the frame format (header layout + payload encoding). This is
/// distinct from the protocol version negotiated in `Hello`: it only changes
/// if the bytes of a frame can no longer be parsed the old way.
pub const FRAME_FORMAT: u8 = 1;

/// Length of the frame header.
pub const HEADER_LEN: usize = 5;

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u32 },
    #[error("frame has an empty payload")]
    Empty,
    #[error("unsupported frame format {format} (this side speaks {FRAME_FORMAT})")]
    UnsupportedFormat { format: u8 },
    #[error("frame payload is not a valid message: {0}")]
    Malformed(postcard::Error),
    #[error("frame payload has {extra} bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error("decoder already failed; the stream must be closed")]
    Poisoned,
}

impl From<FrameError> for crate::message::WireError {
    fn from(error: FrameError) -> Self {
        crate::message::WireError::Malformed {
            detail: error.to_string(),
        }
    }
}

/// Encodes `message` into one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// Appends one frame for `message` to `out`. On error `out` is left as it was.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = postcard::to_io(message, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Malformed(e));
    }
    let payload_len = out.len() - start - HEADER_LEN;
    let len = match u32::try_from(payload_len) {
        Ok(len) if len <= MAX_FRAME_LEN => len,
        _ => {
            out.truncate(start);
            return Err(FrameError::TooLarge {
                len: payload_len as u64,
                max: MAX_FRAME_LEN,
            });
        }
    };
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4] = FRAME_FORMAT;
    Ok(())
}

/// Parses a frame header, returning the payload length to read next.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let format = header[4];
    if format != FRAME_FORMAT {
        return Err(FrameError::UnsupportedFormat { format });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max: MAX_FRAME_LEN,
    })
}

/// Decodes a complete payload (the bytes after the header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    if payload.len() > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge {
            len: payload.len() as u64,
            max: MAX_FRAME_LEN,
        });
    }
    let (message, rest) =
        postcard::take_from_bytes::<Message>(payload).map_err(FrameError::Malformed)?;
    if rest.is_empty() {
        Ok(message)
    } else {
        Err(FrameError::TrailingBytes { extra: rest.len() })
    }
}

/// Postcard variant index of [`Message::Chunk`] (checked by a test).
const CHUNK_VARIANT: u32 = 4;

/// Longest encoded [`ChunkHead`]: variant (1) + upload id varint (10) +
/// hash (32) + data length varint (10).
pub const MAX_CHUNK_HEAD_LEN: usize = 53;

/// The fields of a `Chunk` payload in front of its data bytes, in postcard's
/// layout (a struct is its fields in order; `serde_bytes` is a varint length
/// then the bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ChunkHead {
    variant: u32,
    upload: crate::message::UploadId,
    hash: crate::hash::Hash,
    data_len: u64,
}

/// The start of a `Chunk` frame whose data is `data_len` bytes: the frame
/// header and the payload up to the data, so that the result followed by the
/// data is exactly [`encode`] of the same `Message::Chunk`. Lets an adapter
/// read a chunk from disk straight behind its header and hand both to the
/// transport without building (and copying) a `Message`.
pub fn encode_chunk_prefix(
    upload: crate::message::UploadId,
    hash: &crate::hash::Hash,
    data_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let head = ChunkHead {
        variant: CHUNK_VARIANT,
        upload,
        hash: *hash,
        data_len: data_len as u64,
    };
    let mut out = vec![0; HEADER_LEN];
    postcard::to_io(&head, &mut out).map_err(FrameError::Malformed)?;
    let payload_len = out.len() - HEADER_LEN + data_len;
    let len = match u32::try_from(payload_len) {
        Ok(len) if len <= MAX_FRAME_LEN => len,
        _ => {
            return Err(FrameError::TooLarge {
                len: payload_len as u64,
                max: MAX_FRAME_LEN,
            })
        }
    };
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4] = FRAME_FORMAT;
    Ok(out)
}

/// What [`chunk_head`] found at the start of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFrameHead {
    pub upload: crate::message::UploadId,
    pub hash: crate::hash::Hash,
    /// Bytes of chunk data that follow.
    pub data_len: usize,
    /// Bytes of the payload before the data.
    pub head_len: usize,
}

/// If the payload of `payload_len` bytes starting with `start` (at least
/// `min(payload_len, MAX_CHUNK_HEAD_LEN)` bytes of it) is a well-formed
/// `Chunk` whose data runs exactly to the end of the payload, its head.
/// `None` means "decode it the ordinary way" (another message, or a
/// malformed one, which [`decode_payload`] then reports). Lets an adapter
/// read a chunk's data straight into its own buffer.
pub fn chunk_head(start: &[u8], payload_len: usize) -> Option<ChunkFrameHead> {
    let (head, rest) = postcard::take_from_bytes::<ChunkHead>(start).ok()?;
    let head_len = start.len() - rest.len();
    let data_len = usize::try_from(head.data_len).ok()?;
    (head.variant == CHUNK_VARIANT && head_len.checked_add(data_len)? == payload_len).then_some(
        ChunkFrameHead {
            upload: head.upload,
            hash: head.hash,
            data_len,
            head_len,
        },
    )
}

/// Incremental decoder over arbitrary byte slices. Buffers at most one frame
/// (header + at most `MAX_FRAME_LEN` payload bytes), growing only as bytes
/// actually arrive. After any error it stays failed ([`FrameError::Poisoned`]):
/// a byte stream cannot be resynchronised, so the stream must be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_filled: usize,
    /// `Some(len)` once the header is parsed.
    payload_len: Option<usize>,
    payload: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from the front of `input` until one frame is complete
    /// (returning it, with `input` advanced past it) or `input` is exhausted
    /// (returning `None`). Call again with the rest of `input` for more frames.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Message>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let result = self.decode_inner(input);
        if result.is_err() {
            self.poisoned = true;
            self.payload = Vec::new();
        }
        result
    }

    fn decode_inner(&mut self, input: &mut &[u8]) -> Result<Option<Message>, FrameError> {
        let payload_len = match self.payload_len {
            Some(len) => len,
            None => {
                let want = HEADER_LEN - self.header_filled;
                let take = want.min(input.len());
                self.header[self.header_filled..self.header_filled + take]
                    .copy_from_slice(&input[..take]);
                self.header_filled += take;
                *input = &input[take..];
                if self.header_filled < HEADER_LEN {
                    return Ok(None);
                }
                let len = parse_header(&self.header)?;
                self.payload_len = Some(len);
                len
            }
        };
        let want = payload_len - self.payload.len();
        let take = want.min(input.len());
        self.payload.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.payload.len() < payload_len {
            return Ok(None);
        }
        let payload = std::mem::take(&mut self.payload);
        self.header_filled = 0;
        self.payload_len = None;
        decode_payload(&payload).map(Some)
    }

    /// Whether the decoder sits at a frame boundary (nothing buffered).
    pub fn is_idle(&self) -> bool {
        self.header_filled == 0 && self.payload_len.is_none() && !self.poisoned
    }

    /// Call when the stream ends: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.poisoned {
            Err(FrameError::Poisoned)
        } else if self.header_filled == 0 {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.header_filled + self.payload.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;
    use crate::limits::{MAX_CHUNKS_PER_MANIFEST, MAX_CHUNK_SIZE, MAX_FILE_SIZE, MAX_PATH_LEN};
    use crate::message::*;

    pub(crate) fn sample_messages() -> Vec<Message> {
        let h = Hash::of(b"chunk");
        vec![
            Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                agent: "appliance-sync 0.1".into(),
            }),
            Message::Welcome(Welcome {
                version: 1,
                max_frame_len: MAX_FRAME_LEN,
                max_chunks_per_manifest: MAX_CHUNKS_PER_MANIFEST,
                max_file_size: MAX_FILE_SIZE,
            }),
            Message::Upload(Manifest {
                path: "a/b.pdf".into(),
                size: 5,
                mtime: Mtime {
                    secs: 1_700_000_000,
                    nanos: 1,
                },
                file_hash: h,
                chunks: vec![ChunkRef {
                    offset: 0,
                    len: 5,
                    hash: h,
                }],
            }),
            Message::NeedChunks(NeedChunks {
                upload: UploadId(7),
                hashes: vec![h, Hash::of(b"other")],
            }),
            Message::Chunk {
                upload: UploadId(7),
                hash: h,
                data: b"chunk".to_vec(),
            },
            Message::Committed(Committed {
                upload: UploadId(7),
                path: "a/b.pdf".into(),
                size: 5,
                file_hash: h,
                bytes_received: 5,
            }),
            Message::List {
                dir: String::new(),
                after: Some("a".into()),
            },
            Message::ListReply {
                entries: vec![ListEntry {
                    path: "a/b.pdf".into(),
                    size: 5,
                    file_hash: h,
                    mtime: Mtime { secs: -1, nanos: 0 },
                }],
                more: false,
            },
            Message::Download {
                path: "a/b.pdf".into(),
            },
            Message::DownloadChunk {
                hash: h,
                data: vec![1, 2, 3],
            },
            Message::Delete { path: "x".into() },
            Message::Deleted { path: "x".into() },
            Message::Status,
            Message::StatusReply(StatusReply {
                used: 1,
                available: 2,
                quota: Some(3),
                files: 4,
            }),
            Message::Error {
                upload: Some(UploadId(1)),
                error: WireError::QuotaExceeded {
                    needed: 10,
                    available: 3,
                },
            },
            Message::Error {
                upload: None,
                error: WireError::PathRejected {
                    reason: crate::path::PathRejection::Reserved {
                        component: ".zfs".into(),
                    },
                },
            },
        ]
    }

    #[test]
    fn round_trips_every_message() {
        for message in sample_messages() {
            let frame = encode(&message).unwrap();
            let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
            assert_eq!(parse_header(&header).unwrap(), frame.len() - HEADER_LEN);
            assert_eq!(decode_payload(&frame[HEADER_LEN..]).unwrap(), message);
        }
    }

    #[test]
    fn decoder_handles_any_split() {
        let mut stream = Vec::new();
        let messages = sample_messages();
        for m in &messages {
            encode_into(m, &mut stream).unwrap();
        }
        for step in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                let mut input = piece;
                while let Some(m) = decoder.decode(&mut input).unwrap() {
                    out.push(m);
                }
                assert!(input.is_empty());
            }
            assert!(decoder.is_idle());
            decoder.finish().unwrap();
            assert_eq!(out, messages, "step {step}");
        }
    }

    #[test]
    fn chunk_prefix_plus_data_is_the_chunk_frame() {
        for (upload, len) in [
            (1u64, 0usize),
            (7, 5),
            (300, 127),
            (u64::MAX, 128),
            (2, 1 << 20),
            (3, MAX_CHUNK_SIZE as usize),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251).to_le_bytes()[0]).collect();
            let hash = Hash::of(&data);
            let message = Message::Chunk {
                upload: UploadId(upload),
                hash,
                data: data.clone(),
            };
            let frame = encode(&message).unwrap();
            let mut ours = encode_chunk_prefix(UploadId(upload), &hash, len).unwrap();
            let prefix_len = ours.len();
            ours.extend_from_slice(&data);
            assert_eq!(ours, frame, "upload {upload} len {len}");
            // And the head is found again from the payload's start.
            let payload = &frame[HEADER_LEN..];
            let start = &payload[..payload.len().min(MAX_CHUNK_HEAD_LEN)];
            let head = chunk_head(start, payload.len()).unwrap();
            assert_eq!(head.upload, UploadId(upload));
            assert_eq!(head.hash, hash);
            assert_eq!(head.data_len, len);
            assert_eq!(head.head_len, prefix_len - HEADER_LEN);
            assert!(head.head_len <= MAX_CHUNK_HEAD_LEN);
        }
        assert!(matches!(
            encode_chunk_prefix(UploadId(1), &Hash::of(b""), MAX_FRAME_LEN as usize),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn chunk_head_only_matches_whole_chunk_payloads() {
        let data = vec![9u8; 1000];
        let frame = encode(&Message::Chunk {
            upload: UploadId(4),
            hash: Hash::of(&data),
            data,
        })
        .unwrap();
        let payload = &frame[HEADER_LEN..];
        let start = &payload[..MAX_CHUNK_HEAD_LEN];
        // A length that does not end at the payload's end: not a match.
        assert_eq!(chunk_head(start, payload.len() + 1), None);
        assert_eq!(chunk_head(start, payload.len() - 1), None);
        // Cut short before the data length: not a match.
        assert_eq!(chunk_head(&start[..20], payload.len()), None);
        // Every other message: not a match.
        for message in sample_messages() {
            if matches!(message, Message::Chunk { .. }) {
                continue;
            }
            let frame = encode(&message).unwrap();
            let payload = &frame[HEADER_LEN..];
            let start = &payload[..payload.len().min(MAX_CHUNK_HEAD_LEN)];
            assert_eq!(chunk_head(start, payload.len()), None, "{message:?}");
        }
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut decoder = FrameDecoder::new();
        let header = [0xff, 0xff, 0xff, 0xff, FRAME_FORMAT];
        let mut input = &header[..];
        assert_eq!(
            decoder.decode(&mut input),
            Err(FrameError::TooLarge {
                len: u64::from(u32::MAX),
                max: MAX_FRAME_LEN
            })
        );
        // Nothing was buffered for the body, and the decoder stays failed.
        assert_eq!(decoder.payload.capacity(), 0);
        let mut more = &[0u8; 10][..];
        assert_eq!(decoder.decode(&mut more), Err(FrameError::Poisoned));

        let just_over = (MAX_FRAME_LEN + 1).to_be_bytes();
        let header = [just_over[0], just_over[1], just_over[2], just_over[3], 1];
        assert!(matches!(
            parse_header(&header),
            Err(FrameError::TooLarge { .. })
        ));
        let at_limit = MAX_FRAME_LEN.to_be_bytes();
        let header = [at_limit[0], at_limit[1], at_limit[2], at_limit[3], 1];
        assert_eq!(parse_header(&header), Ok(MAX_FRAME_LEN as usize));
    }

    #[test]
    fn header_errors_are_typed() {
        assert_eq!(parse_header(&[0, 0, 0, 0, 1]), Err(FrameError::Empty));
        assert_eq!(
            parse_header(&[0, 0, 0, 1, 2]),
            Err(FrameError::UnsupportedFormat { format: 2 })
        );
        assert_eq!(decode_payload(&[]), Err(FrameError::Empty));
    }

    #[test]
    fn payload_errors_are_typed() {
        // Variant index far beyond the enum.
        assert!(matches!(
            decode_payload(&[0x7f]),
            Err(FrameError::Malformed(_))
        ));
        // A valid message followed by junk.
        let mut payload = encode(&Message::Status).unwrap()[HEADER_LEN..].to_vec();
        payload.push(0);
        assert_eq!(
            decode_payload(&payload),
            Err(FrameError::TrailingBytes { extra: 1 })
        );
        // A truncated message.
        let frame = encode(&sample_messages()[2]).unwrap();
        assert!(matches!(
            decode_payload(&frame[HEADER_LEN..frame.len() - 1]),
            Err(FrameError::Malformed(_))
        ));
        // Invalid UTF-8 in a string field: Download { path: [0xff] }.
        let download_index = 8u8;
        assert!(matches!(
            decode_payload(&[download_index, 1, 0xff]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_huge_claimed_vector_length_does_not_allocate_or_panic() {
        // NeedChunks with a claimed hash count of u64::MAX-ish and no data.
        let mut payload = vec![3u8, 1]; // variant NeedChunks, upload id 1
        payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(
            decode_payload(&payload),
            Err(FrameError::Malformed(_))
        ));
        // Chunk with a claimed data length of 2^31 but 3 bytes present.
        let mut payload = vec![4u8, 1];
        payload.extend_from_slice(Hash::of(b"").as_bytes());
        payload.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x08, 1, 2, 3]);
        assert!(matches!(
            decode_payload(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let frame = encode(&Message::Status).unwrap();
        let mut decoder = FrameDecoder::new();
        let mut input = &frame[..3];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        assert_eq!(decoder.finish(), Err(FrameError::Truncated { buffered: 3 }));
    }

    #[test]
    fn largest_legal_frames_fit() {
        // A maximal manifest: every chunk at the largest offsets and lengths.
        let chunks = (0..MAX_CHUNKS_PER_MANIFEST)
            .map(|i| ChunkRef {
                offset: u64::from(i) * u64::from(MAX_CHUNK_SIZE) + (MAX_FILE_SIZE * 100),
                len: MAX_CHUNK_SIZE,
                hash: Hash([0xff; 32]),
            })
            .collect();
        let manifest = Message::Upload(Manifest {
            path: "p".repeat(MAX_PATH_LEN),
            size: u64::MAX,
            mtime: Mtime {
                secs: i64::MIN,
                nanos: 999_999_999,
            },
            file_hash: Hash([0xff; 32]),
            chunks,
        });
        let frame = encode(&manifest).unwrap();
        assert!(frame.len() - HEADER_LEN <= MAX_FRAME_LEN as usize);

        let chunk = Message::Chunk {
            upload: UploadId(u64::MAX),
            hash: Hash([0xff; 32]),
            data: vec![0xab; MAX_CHUNK_SIZE as usize],
        };
        let frame = encode(&chunk).unwrap();
        assert!(frame.len() - HEADER_LEN <= MAX_FRAME_LEN as usize);
        assert_eq!(decode_payload(&frame[HEADER_LEN..]).unwrap(), chunk);
    }

    #[test]
    fn encoding_an_oversized_message_fails_cleanly() {
        let mut out = b"keep".to_vec();
        let too_big = Message::DownloadChunk {
            hash: Hash([0; 32]),
            data: vec![0; MAX_FRAME_LEN as usize],
        };
        assert!(matches!(
            encode_into(&too_big, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, b"keep");
    }
}
