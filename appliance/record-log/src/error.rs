//! Errors of the record log. Every IO error names the operation and the path.

use std::io;
use std::path::PathBuf;

/// An error from the record log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open segment", "fdatasync", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Log` in this process) holds the directory.
    #[error("record log {} is in use by another process (lock held on LOCK)", .0.display())]
    Locked(PathBuf),
    /// A payload is larger than `LogOptions::max_payload_bytes`.
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        len: usize,
        /// The configured maximum.
        max: u32,
    },
    /// An earlier write or fsync failed, so what is on disk is unknown. The log
    /// refuses further appends; reopening it runs recovery and reports.
    #[error("record log {} refuses writes after an earlier failure ({reason}); reopen it to recover", path.display())]
    Poisoned {
        /// The log directory.
        path: PathBuf,
        /// The first failure.
        reason: String,
    },
    /// The options are inconsistent.
    #[error("invalid record-log options: {0}")]
    InvalidOptions(String),
    /// A record that verified at open time no longer does while reading.
    #[error("record at offset {offset} of {} no longer verifies: {reason}", path.display())]
    CorruptRead {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Misuse of the compaction API (records out of order, a stale plan).
    #[error("compaction: {0}")]
    Compaction(String),
}

/// Shorthand result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the operation and the path.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
