//! The control protocol between `appliancectl` and `applianced`.
//!
//! # Framing
//! Every message is one frame: a 4-byte big-endian length `N` followed by `N`
//! bytes of [postcard]-encoded payload. `N` must be at least 1 and at most the
//! maximum frame size (default [`DEFAULT_MAX_FRAME`]); a reader checks the
//! prefix with [`check_frame_len`] *before* reading or allocating the payload, so
//! a hostile prefix costs nothing.
//!
//! # Conversation
//! 1. The client sends [`ClientHello`] with [`MAGIC`] and the protocol version
//!    it speaks.
//! 2. The server answers [`ServerHello`] if it speaks that version, or a
//!    [`Response::Error`] with [`ErrorCode::UnsupportedVersion`] and closes.
//! 3. Then any number of [`Request`] → [`Response`] exchanges, one at a time.
//!
//! A frame that cannot be decoded gets [`ErrorCode::BadFrame`]; an oversized
//! length prefix gets [`ErrorCode::FrameTooLarge`] and the connection is
//! closed (the stream can no longer be trusted to be in sync).
//!
//! # Evolution
//! Postcard encodes enums by variant index: new requests, responses and error
//! codes are only ever appended at the end. A change that breaks this bumps
//! [`PROTOCOL_VERSION`]. An older daemon of the same version answers a
//! request appended after it was built with [`ErrorCode::BadFrame`] and stays
//! usable; `appliancectl` and `applianced` ship together, so the CLI uses the
//! newest requests (for example [`CacheRequest::GetPieces`] rather than
//! [`CacheRequest::Get`]) and the daemon keeps serving the older ones.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheRequest, CacheResponse};
use crate::events::{EventsRequest, EventsResponse};
use crate::health::{Probe, ProbeResult, StatusReport};
use crate::storage::{StorageRequest, StorageResponse};
use crate::sync::{SyncRequest, SyncResponse};

/// Magic bytes at the start of [`ClientHello`], so that a stray client of some
/// other protocol is told apart from an old `appliancectl`.
pub const MAGIC: [u8; 4] = *b"APCT";

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default maximum frame size: 1 MiB. Control messages are small (a status
/// report is a few KiB); the limit only has to leave room for future listings
/// while bounding what one hostile peer can make the daemon buffer.
pub const DEFAULT_MAX_FRAME: u32 = 1024 * 1024;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// First frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// The protocol version the client speaks.
    pub protocol_version: u32,
    /// Free-form client name and version, for the daemon's log.
    pub client: String,
}

impl ClientHello {
    /// A hello for this build's protocol version.
    pub fn new(client: impl Into<String>) -> Self {
        Self {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            client: client.into(),
        }
    }
}

/// The server's answer to a good [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The protocol version the server speaks.
    pub protocol_version: u32,
    /// The daemon's version.
    pub daemon_version: String,
    /// Largest frame the server accepts.
    pub max_frame: u32,
    /// Whether this peer may send mutating requests.
    pub admin: bool,
}

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The full status report.
    Status,
    /// One probe.
    Health(Probe),
    /// Change the log filter at run time (a `tracing` `EnvFilter` directive such
    /// as `debug` or `info,appliance_bus=trace`). Mutating.
    SetLogFilter(String),
    /// The event bus.
    Events(EventsRequest),
    /// The agent response cache.
    Cache(CacheRequest),
    /// The sync endpoint's clients.
    Sync(SyncRequest),
    /// The storage manager.
    Storage(StorageRequest),
}

impl Request {
    /// Whether the request changes the appliance; such requests need an admin
    /// peer.
    pub fn is_mutating(&self) -> bool {
        match self {
            Request::Status | Request::Health(_) => false,
            Request::SetLogFilter(_) => true,
            Request::Events(e) => e.is_mutating(),
            Request::Cache(c) => c.is_mutating(),
            Request::Sync(s) => s.is_mutating(),
            Request::Storage(s) => s.is_mutating(),
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Health(_) => "health",
            Request::SetLogFilter(_) => "set-log-filter",
            Request::Events(EventsRequest::Publish { .. }) => "events publish",
            Request::Events(EventsRequest::Replay { .. }) => "events replay",
            Request::Events(EventsRequest::Tail { .. }) => "events tail",
            Request::Events(EventsRequest::DlqList) => "events dlq list",
            Request::Events(EventsRequest::DlqRetry { .. }) => "events dlq retry",
            Request::Cache(CacheRequest::Get { .. } | CacheRequest::GetPieces { .. }) => {
                "cache get"
            }
            Request::Cache(
                CacheRequest::Put { .. }
                | CacheRequest::PutPieces { .. }
                | CacheRequest::PutPiece(_),
            ) => "cache put",
            Request::Cache(CacheRequest::Stats) => "cache stats",
            Request::Cache(CacheRequest::Invalidate { .. }) => "cache invalidate",
            Request::Cache(CacheRequest::Import | CacheRequest::ImportChunk(_)) => "cache import",
            Request::Cache(CacheRequest::Export) => "cache export",
            Request::Sync(SyncRequest::ClientAdd { .. }) => "sync client add",
            Request::Sync(SyncRequest::ClientList) => "sync client list",
            Request::Sync(SyncRequest::ClientRevoke { .. }) => "sync client revoke",
            Request::Storage(StorageRequest::Report) => "storage report",
            Request::Storage(StorageRequest::Disks) => "storage disks",
            Request::Storage(StorageRequest::QuotaGet { .. }) => "storage quota get",
            Request::Storage(StorageRequest::QuotaSet { .. }) => "storage quota set",
            Request::Storage(StorageRequest::Scrub { .. }) => "storage scrub",
            Request::Storage(StorageRequest::ScrubStatus { .. }) => "storage scrub status",
            Request::Storage(StorageRequest::Replace { .. }) => "storage replace",
            Request::Storage(StorageRequest::CreatePool { .. }) => "storage create-pool",
        }
    }
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The request failed.
    Error(ControlError),
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// Answer to [`Request::Health`].
    Health(ProbeResult),
    /// The request was carried out; the string says what changed.
    Done(String),
    /// Answer to [`Request::Events`].
    Events(EventsResponse),
    /// Answer to [`Request::Cache`].
    Cache(CacheResponse),
    /// Answer to [`Request::Sync`].
    Sync(SyncResponse),
    /// Answer to [`Request::Storage`].
    Storage(StorageResponse),
}

/// Error codes. Stable: only ever appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum ErrorCode {
    /// The frame could not be decoded as the expected message.
    BadFrame,
    /// The length prefix is over the maximum (or zero).
    FrameTooLarge,
    /// The peer speaks another protocol version, or not this protocol.
    UnsupportedVersion,
    /// The peer may not make this request.
    PermissionDenied,
    /// An argument is invalid.
    InvalidArgument,
    /// The component that would serve this is not available.
    Unavailable,
    /// The daemon is shutting down.
    ShuttingDown,
    /// Something went wrong inside the daemon.
    Internal,
    /// The named thing does not exist.
    NotFound,
    /// The daemon is busy (too many connections).
    Busy,
}

impl ErrorCode {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Busy => "busy",
        }
    }
}

/// A typed error with a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What happened and, where possible, what to do.
    pub message: String,
}

impl ControlError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ControlError {}

/// Framing errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is zero or larger than allowed.
    #[error("frame length {len} is outside 1..={max} bytes")]
    BadLength {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// Which message was expected.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// The message is too large to send in one frame.
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

impl From<FrameError> for ControlError {
    fn from(e: FrameError) -> Self {
        let code = match e {
            FrameError::BadLength { .. } | FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Decode { .. } => ErrorCode::BadFrame,
        };
        ControlError::new(code, e.to_string())
    }
}

/// Checks a length prefix before anything is read or allocated for the payload.
pub fn check_frame_len(prefix: [u8; LEN_PREFIX], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len == 0 || len > max {
        return Err(FrameError::BadLength { len, max });
    }
    usize::try_from(len).map_err(|_| FrameError::BadLength { len, max })
}

/// Encodes a message as one frame (prefix and payload).
pub fn encode_frame<T: Serialize>(msg: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut out =
        postcard::to_extend(msg, vec![0u8; LEN_PREFIX]).map_err(|e| FrameError::Decode {
            what: "outgoing message",
            detail: e.to_string(),
        })?;
    let payload_len = out.len() - LEN_PREFIX;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|l| *l <= max)
        .ok_or(FrameError::TooLarge {
            len: payload_len,
            max,
        })?;
    out[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Decodes a frame's payload (without its prefix) as `T`. Trailing bytes are an
/// error: a frame holds exactly one message.
pub fn decode_payload<T: DeserializeOwned>(
    payload: &[u8],
    what: &'static str,
) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| FrameError::Decode {
        what,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(FrameError::Decode {
            what,
            detail: format!("{} trailing bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

/// Checks a decoded hello: magic and version.
pub fn check_hello(hello: &ClientHello) -> Result<(), ControlError> {
    if hello.magic != MAGIC {
        return Err(ControlError::new(
            ErrorCode::UnsupportedVersion,
            "not an appliance control-protocol client (bad magic)",
        ));
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(ControlError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks control protocol version {}, the daemon speaks version {}; \
                 use the appliancectl that ships with this daemon",
                hello.protocol_version, PROTOCOL_VERSION
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trip() {
        let req = Request::SetLogFilter("debug".into());
        let frame = encode_frame(&req, DEFAULT_MAX_FRAME).unwrap();
        let len = check_frame_len(frame[..4].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: Request = decode_payload(&frame[4..], "request").unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn length_prefix_limits() {
        assert_eq!(
            check_frame_len([0, 0, 0, 0], 16),
            Err(FrameError::BadLength { len: 0, max: 16 })
        );
        assert_eq!(
            check_frame_len([0xff; 4], DEFAULT_MAX_FRAME),
            Err(FrameError::BadLength {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME
            })
        );
        assert_eq!(check_frame_len([0, 0, 0, 16], 16), Ok(16));
        assert!(check_frame_len([0, 0, 0, 17], 16).is_err());
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let req = Request::SetLogFilter("x".repeat(100));
        assert!(matches!(
            encode_frame(&req, 10),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_garbage_are_decode_errors() {
        let mut frame = encode_frame(&Request::Status, DEFAULT_MAX_FRAME).unwrap();
        frame.push(0);
        assert!(matches!(
            decode_payload::<Request>(&frame[4..], "request"),
            Err(FrameError::Decode { .. })
        ));
        assert!(decode_payload::<Request>(&[0xff, 0xff, 0xff], "request").is_err());
        let e: ControlError = decode_payload::<Request>(&[200], "request")
            .unwrap_err()
            .into();
        assert_eq!(e.code, ErrorCode::BadFrame);
    }

    #[test]
    fn hello_checks_magic_and_version() {
        assert!(check_hello(&ClientHello::new("t")).is_ok());
        let mut h = ClientHello::new("t");
        h.protocol_version = 99;
        let e = check_hello(&h).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedVersion);
        assert!(e.message.contains("99"));
        h = ClientHello::new("t");
        h.magic = *b"HTTP";
        assert_eq!(
            check_hello(&h).unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn mutating_classification() {
        assert!(!Request::Status.is_mutating());
        assert!(!Request::Health(Probe::Live).is_mutating());
        assert!(Request::SetLogFilter("info".into()).is_mutating());
        assert!(Request::Events(EventsRequest::Publish {
            subject: "a".into(),
            payload: vec![]
        })
        .is_mutating());
        assert!(Request::Events(EventsRequest::DlqRetry { id: 1 }).is_mutating());
        assert!(!Request::Events(EventsRequest::DlqList).is_mutating());
        assert!(!Request::Events(EventsRequest::Tail {
            pattern: ">".into()
        })
        .is_mutating());
    }

    #[test]
    fn appended_cache_variants_keep_the_indices_before_them() {
        use crate::cache::CacheRequest as C;
        let enc = |r: &Request| postcard::to_stdvec(r).unwrap();
        // Request::Cache is variant 4; the first byte after it is the cache
        // request's index.
        assert_eq!(enc(&Request::Cache(C::Stats))[..2], [4, 2]);
        assert_eq!(enc(&Request::Cache(C::Export))[..2], [4, 6]);
        let get = C::GetPieces {
            agent: String::new(),
            prompt: String::new(),
            variant: String::new(),
        };
        assert_eq!(enc(&Request::Cache(get))[..2], [4, 7]);
        let put = C::PutPieces {
            agent: String::new(),
            prompt: String::new(),
            variant: String::new(),
            len: 0,
            ttl_secs: None,
        };
        assert_eq!(enc(&Request::Cache(put))[..2], [4, 8]);
        assert_eq!(enc(&Request::Cache(C::PutPiece(vec![])))[..2], [4, 9]);
        let resp = |r: CacheResponse| postcard::to_stdvec(&Response::Cache(r)).unwrap();
        assert_eq!(resp(CacheResponse::Miss)[..2], [5, 1]);
        assert_eq!(
            resp(CacheResponse::Exported {
                written: 0,
                skipped_binary: 0
            })[..2],
            [5, 7]
        );
        assert_eq!(resp(CacheResponse::HitLen(0))[..2], [5, 8]);
        assert_eq!(resp(CacheResponse::HitPiece(vec![]))[..2], [5, 9]);
        assert_eq!(resp(CacheResponse::PutReady)[..2], [5, 10]);
    }

    #[test]
    fn a_put_in_pieces_is_mutating() {
        use crate::cache::CacheRequest as C;
        assert!(Request::Cache(C::PutPiece(vec![1])).is_mutating());
        assert!(Request::Cache(C::PutPieces {
            agent: "a".into(),
            prompt: "p".into(),
            variant: String::new(),
            len: 1,
            ttl_secs: None,
        })
        .is_mutating());
        assert!(!Request::Cache(C::GetPieces {
            agent: "a".into(),
            prompt: "p".into(),
            variant: String::new(),
        })
        .is_mutating());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload::<Request>(&bytes, "request");
            let _ = decode_payload::<ClientHello>(&bytes, "hello");
            let _ = decode_payload::<Response>(&bytes, "response");
        }
    }
}
