//! The protocol messages (version [`PROTOCOL_VERSION`]).
//!
//! Every frame carries one [`Message`]. Paths travel as plain `String`s and
//! are validated into [`crate::RelPath`] by the receiver, so a bad path is
//! answered with a typed [`WireError::PathRejected`] instead of a decode error.
//! New variants may only be appended (postcard encodes the variant index).

use crate::hash::Hash;
use crate::path::PathRejection;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. Negotiated in [`Hello`]/[`Welcome`].
///
/// - 1: the first version.
/// - 2: same messages; a connection may have
///   [`MAX_UPLOADS_PER_CONNECTION_V2`](crate::limits::MAX_UPLOADS_PER_CONNECTION_V2)
///   uploads open instead of 8 (see [`crate::limits::max_uploads`]).
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The QUIC ALPN identifier of this protocol family.
pub const ALPN: &[u8] = b"appliance-sync/1";

/// Server-assigned identifier of one upload on one connection. Chunk frames
/// on parallel streams name it so the server can route them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UploadId(pub u64);

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upload#{}", self.0)
    }
}

/// Modification time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mtime {
    pub secs: i64,
    /// Must be below 1,000,000,000.
    pub nanos: u32,
}

impl Mtime {
    /// Converts a `SystemTime` (e.g. from file metadata). Times before the
    /// epoch are represented with negative seconds.
    pub fn from_system_time(time: std::time::SystemTime) -> Self {
        match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Self {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(before) => {
                let d = before.duration();
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                if d.subsec_nanos() == 0 {
                    Self {
                        secs: -secs,
                        nanos: 0,
                    }
                } else {
                    Self {
                        secs: -secs - 1,
                        nanos: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }

    /// Whether the fields are in range.
    pub fn is_valid(&self) -> bool {
        self.nanos < 1_000_000_000
    }
}

/// One content-defined chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes, `1..=MAX_CHUNK_SIZE`.
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub hash: Hash,
}

/// Description of a whole file: sent by the client to start an upload and by
/// the server to start a download. Validate with [`crate::manifest::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Relative path inside the client's namespace (unvalidated on the wire).
    pub path: String,
    pub size: u64,
    pub mtime: Mtime,
    /// BLAKE3 of the whole file.
    pub file_hash: Hash,
    /// Contiguous chunks covering `0..size`, in order.
    pub chunks: Vec<ChunkRef>,
}

/// First frame of a connection, client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Free-form client description for logs, at most `MAX_TEXT_LEN` bytes.
    pub agent: String,
}

/// Server's answer to [`Hello`]: the version both sides will speak, and the
/// server's limits so a client can refuse early and precisely.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    pub max_frame_len: u32,
    pub max_chunks_per_manifest: u32,
    pub max_file_size: u64,
}

/// Server to client: which chunks of `upload` it still needs. Empty means
/// none (the file is fully deduplicated) and a [`Committed`] follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedChunks {
    pub upload: UploadId,
    /// Distinct hashes, in file order of their first occurrence.
    pub hashes: Vec<Hash>,
}

/// Server to client: the file is verified, durable and visible at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub upload: UploadId,
    pub path: String,
    pub size: u64,
    pub file_hash: Hash,
    /// Chunk bytes actually received for this upload (after dedup).
    pub bytes_received: u64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub path: String,
    pub size: u64,
    pub file_hash: Hash,
    pub mtime: Mtime,
}

/// Quota and space for this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub used: u64,
    pub available: u64,
    /// The client's quota, if one is set.
    pub quota: Option<u64>,
    pub files: u64,
}

/// Typed errors carried in [`Message::Error`]. Displayed to users as-is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    #[error("protocol version mismatch: client speaks {client_min}..={client_max}, server {server_min}..={server_max}")]
    VersionMismatch {
        client_min: u16,
        client_max: u16,
        server_min: u16,
        server_max: u16,
    },
    #[error("quota exceeded: {needed} bytes needed, {available} available")]
    QuotaExceeded { needed: u64, available: u64 },
    #[error("path rejected: {reason}")]
    PathRejected { reason: PathRejection },
    #[error("manifest lists {chunks} chunks; the limit is {max}")]
    ManifestTooLarge { chunks: u64, max: u32 },
    #[error("file is {size} bytes; the limit is {max}")]
    FileTooLarge { size: u64, max: u64 },
    #[error("manifest is inconsistent: {reason}")]
    ManifestInvalid { reason: ManifestProblem },
    #[error("chunk data does not match its hash: expected {expected}, got {actual}")]
    ChunkHashMismatch { expected: Hash, actual: Hash },
    #[error("chunk {hash} failed verification too often; upload abandoned")]
    TooManyChunkRetries { hash: Hash },
    #[error("chunk {hash} was not requested for this upload")]
    UnexpectedChunk { hash: Hash },
    #[error("assembled file does not match the manifest hash: expected {expected}, got {actual}")]
    FileHashMismatch { expected: Hash, actual: Hash },
    #[error("unknown upload {upload}")]
    UnknownUpload { upload: UploadId },
    #[error("too many concurrent uploads (limit {max})")]
    TooManyUploads { max: u32 },
    #[error("unexpected {got:?} message")]
    UnexpectedMessage { got: MessageKind },
    #[error("malformed frame: {detail}")]
    Malformed { detail: String },
    #[error("not found: {path}")]
    NotFound { path: String },
    #[error("idle timeout: no progress for too long")]
    IdleTimeout,
    #[error("the appliance's disk is full")]
    DiskFull,
    #[error("storage failure on the appliance: {detail}")]
    Storage { detail: String },
    #[error("text field is {len} bytes; the limit is {max}")]
    TextTooLong { len: u64, max: u32 },
    #[error("cancelled: {detail}")]
    Cancelled { detail: String },
}

/// What is wrong with a manifest (beyond its path and size limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ManifestProblem {
    #[error("chunk {index} starts at {offset}, expected {expected}")]
    NotContiguous {
        index: u32,
        offset: u64,
        expected: u64,
    },
    #[error("chunk {index} has length {len}, outside 1..={max}")]
    BadChunkLength { index: u32, len: u32, max: u32 },
    #[error("chunks cover {covered} bytes but the file size is {size}")]
    SizeMismatch { covered: u64, size: u64 },
    #[error("modification time has {nanos} nanoseconds")]
    BadMtime { nanos: u32 },
    #[error("chunk {hash} appears with two different lengths")]
    InconsistentChunk { hash: Hash },
    /// A chunk other than the file's last is shorter than
    /// [`MIN_CHUNK_SIZE`](crate::limits::MIN_CHUNK_SIZE), which the
    /// protocol's chunker never cuts; the bound on chunks per byte is what
    /// keeps a small file from carrying a huge manifest.
    #[error(
        "chunk {index} has length {len}, but every chunk except the last must be at least {min} bytes"
    )]
    ChunkTooSmall { index: u32, len: u32, min: u32 },
}

/// The discriminant of a [`Message`], for errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    Hello,
    Welcome,
    Upload,
    NeedChunks,
    Chunk,
    Committed,
    List,
    ListReply,
    Download,
    DownloadBegin,
    DownloadChunk,
    Delete,
    Deleted,
    Status,
    StatusReply,
    Error,
}

/// One protocol message. See the crate docs for the conversation each belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// C→S, first frame on the control stream.
    Hello(Hello),
    /// S→C, answer to `Hello`.
    Welcome(Welcome),
    /// C→S, starts an upload on its own bidirectional stream.
    Upload(Manifest),
    /// S→C, on the upload's stream; may repeat after a rejected chunk.
    NeedChunks(NeedChunks),
    /// C→S, on any stream: one requested chunk of an upload.
    Chunk {
        upload: UploadId,
        hash: Hash,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// S→C, the upload's acknowledgement.
    Committed(Committed),
    /// C→S: list files below `dir` ("" for the root), after `after` (paging).
    List { dir: String, after: Option<String> },
    /// S→C: one page of entries; `more` says whether to ask again.
    ListReply { entries: Vec<ListEntry>, more: bool },
    /// C→S: fetch a file.
    Download { path: String },
    /// S→C: the file's manifest; its chunks follow in order.
    DownloadBegin(Manifest),
    /// S→C: the next chunk of a download.
    DownloadChunk {
        hash: Hash,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// C→S: delete a file.
    Delete { path: String },
    /// S→C: the file is gone.
    Deleted { path: String },
    /// C→S: ask for quota and usage.
    Status,
    /// S→C.
    StatusReply(StatusReply),
    /// Either direction: a typed failure. `upload` names the upload it
    /// concerns, if any. Fatal for the request unless it is a
    /// `ChunkHashMismatch` followed by a `NeedChunks`.
    Error {
        upload: Option<UploadId>,
        error: WireError,
    },
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Welcome(_) => MessageKind::Welcome,
            Message::Upload(_) => MessageKind::Upload,
            Message::NeedChunks(_) => MessageKind::NeedChunks,
            Message::Chunk { .. } => MessageKind::Chunk,
            Message::Committed(_) => MessageKind::Committed,
            Message::List { .. } => MessageKind::List,
            Message::ListReply { .. } => MessageKind::ListReply,
            Message::Download { .. } => MessageKind::Download,
            Message::DownloadBegin(_) => MessageKind::DownloadBegin,
            Message::DownloadChunk { .. } => MessageKind::DownloadChunk,
            Message::Delete { .. } => MessageKind::Delete,
            Message::Deleted { .. } => MessageKind::Deleted,
            Message::Status => MessageKind::Status,
            Message::StatusReply(_) => MessageKind::StatusReply,
            Message::Error { .. } => MessageKind::Error,
        }
    }
}

/// Negotiates the version for a client offering `min..=max`: the highest
/// version both sides speak, or the `VersionMismatch` error to send back.
pub fn negotiate_version(hello: &Hello) -> Result<u16, WireError> {
    let high = hello.max_version.min(PROTOCOL_VERSION);
    let low = hello.min_version.max(MIN_PROTOCOL_VERSION);
    if hello.min_version <= hello.max_version && low <= high {
        Ok(high)
    } else {
        Err(WireError::VersionMismatch {
            client_min: hello.min_version,
            client_max: hello.max_version,
            server_min: MIN_PROTOCOL_VERSION,
            server_max: PROTOCOL_VERSION,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            agent: "test".into(),
        }
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(&hello(1, 1)), Ok(1));
        assert_eq!(negotiate_version(&hello(1, 2)), Ok(2));
        assert_eq!(negotiate_version(&hello(1, 9)), Ok(2));
        assert_eq!(negotiate_version(&hello(0, 1)), Ok(1));
        assert_eq!(negotiate_version(&hello(2, 5)), Ok(2));
        assert!(matches!(
            negotiate_version(&hello(3, 5)),
            Err(WireError::VersionMismatch {
                client_min: 3,
                client_max: 5,
                server_min: 1,
                server_max: 2
            })
        ));
        assert!(negotiate_version(&hello(0, 0)).is_err());
        // A reversed range is nonsense, not a match.
        assert!(negotiate_version(&hello(1, 0)).is_err());
    }

    #[test]
    fn mtime_conversion() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(
            Mtime::from_system_time(t),
            Mtime {
                secs: 1_700_000_000,
                nanos: 5
            }
        );
        let before = UNIX_EPOCH - Duration::new(1, 250_000_000);
        assert_eq!(
            Mtime::from_system_time(before),
            Mtime {
                secs: -2,
                nanos: 750_000_000
            }
        );
        assert!(!Mtime {
            secs: 0,
            nanos: 1_000_000_000
        }
        .is_valid());
    }

    #[test]
    fn errors_read_well() {
        let e = WireError::QuotaExceeded {
            needed: 10,
            available: 3,
        };
        assert_eq!(
            e.to_string(),
            "quota exceeded: 10 bytes needed, 3 available"
        );
        let e = WireError::PathRejected {
            reason: PathRejection::DotDotComponent,
        };
        assert_eq!(e.to_string(), "path rejected: path has a '..' component");
    }
}
