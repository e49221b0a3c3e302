//! Typed errors for every way a ZFS call can fail.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::parse::ParseError;

/// What a failed `zpool`/`zfs` command's stderr says, classified.
///
/// The wording comes from libzfs (`libzfs_util.c`: `zfs_strerror`,
/// `zfs_standard_error_fmt`, `zpool_standard_error_fmt`, and
/// `zfs_setprop_error` for quotas); commands run with `LC_ALL=C` so the
/// English messages are what we match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// "no such pool".
    NoSuchPool,
    /// "dataset does not exist".
    NoSuchDataset,
    /// "no such device in pool".
    NoSuchDevice,
    /// "permission denied" / "operation not permitted".
    PermissionDenied,
    /// "pool or dataset is busy", "dataset is busy", "... is busy".
    Busy,
    /// "pool I/O is currently suspended".
    PoolSuspended,
    /// "I/O error".
    Io,
    /// "one or more devices is currently unavailable", "pool is
    /// unavailable", "insufficient replicas", "no valid replicas".
    PoolUnavailable,
    /// "out of space" (ENOSPC/EDQUOT) or "Disk quota exceeded".
    OutOfSpace,
    /// Setting a quota below usage: "size is less than current used or
    /// reserved space".
    QuotaBelowUsage,
    /// "pool already exists", "dataset already exists".
    AlreadyExists,
    /// A device is part of a pool, mounted, or carries data: "is part of",
    /// "is in use", "contains a ... filesystem", "reserved as a hot spare".
    DeviceInUse,
    /// "currently resilvering".
    ResilverInProgress,
    /// "currently scrubbing".
    ScrubInProgress,
    /// "scrub is paused".
    ScrubPaused,
    /// "there is no active scrub".
    NoActiveScrub,
    /// "invalid property value", "invalid quota", "invalid name", "invalid
    /// vdev specification".
    InvalidArgument,
    /// Anything else; the stderr is in the error.
    Other,
}

impl FailureKind {
    /// Classifies a command's stderr. `zpool` says "no such pool or dataset"
    /// for both; `is_pool_command` decides which it means.
    pub fn classify(stderr: &str, is_pool_command: bool) -> Self {
        let s = stderr.to_ascii_lowercase();
        let has = |needle: &str| s.contains(needle);
        if has("pool i/o is currently suspended") || has("pool is suspended") {
            Self::PoolSuspended
        } else if has("no such pool or dataset") {
            if is_pool_command {
                Self::NoSuchPool
            } else {
                Self::NoSuchDataset
            }
        } else if has("no such pool") {
            Self::NoSuchPool
        } else if has("dataset does not exist") {
            Self::NoSuchDataset
        } else if has("no such device in pool") {
            Self::NoSuchDevice
        } else if has("permission denied") || has("operation not permitted") {
            Self::PermissionDenied
        } else if has("size is less than current used or reserved space") {
            Self::QuotaBelowUsage
        } else if has("out of space") || has("disk quota exceeded") {
            Self::OutOfSpace
        } else if has("currently resilvering") {
            Self::ResilverInProgress
        } else if has("currently scrubbing") {
            Self::ScrubInProgress
        } else if has("scrub is paused") {
            Self::ScrubPaused
        } else if has("there is no active scrub") {
            Self::NoActiveScrub
        } else if has("already exists") || has("pool or dataset exists") {
            Self::AlreadyExists
        } else if has("is part of")
            || has("is in use")
            || has("reserved as a hot spare")
            || has("in use as a cache")
            || (has("contains a") && has("filesystem"))
        {
            Self::DeviceInUse
        } else if has("is busy") {
            Self::Busy
        } else if has("i/o error") {
            Self::Io
        } else if has("currently unavailable")
            || has("pool is unavailable")
            || has("insufficient replicas")
            || has("no valid replicas")
        {
            Self::PoolUnavailable
        } else if has("invalid property value")
            || has("invalid quota")
            || has("invalid name")
            || has("invalid vdev")
            || has("bad numeric value")
        {
            Self::InvalidArgument
        } else {
            Self::Other
        }
    }
}

/// A failed ZFS call.
///
/// `Clone + PartialEq` so that tests (and the fake) can compare errors; IO
/// errors are kept as their message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZfsError {
    /// A binary is missing or unusable at start-up.
    #[error("{name} binary {path:?} unusable: {reason}")]
    MissingBinary {
        /// `zpool` or `zfs`.
        name: &'static str,
        /// The configured path.
        path: PathBuf,
        /// Why (not absolute, not found, not executable).
        reason: String,
    },
    /// An argument was refused before running anything.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// What kind of argument (pool name, device path, property).
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The command could not be started.
    #[error("could not run `{command}`: {message}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        message: String,
    },
    /// The command did not finish in time and was killed (it may linger in
    /// D state on a suspended pool; nobody waits for it).
    #[error("`{command}` timed out after {after:?} (killed)")]
    Timeout {
        /// The command line.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` failed ({kind:?}, exit {exit_code:?}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Classified cause.
        kind: FailureKind,
        /// Exit code, `None` if killed by a signal.
        exit_code: Option<i32>,
        /// Its stderr (trimmed, bounded).
        stderr: String,
    },
    /// The command printed more than the output limit.
    #[error("`{command}` printed more than {limit} bytes")]
    OutputTooLarge {
        /// The command line.
        command: String,
        /// The limit.
        limit: usize,
    },
    /// The output could not be parsed.
    #[error("`{command}`: {source}")]
    Parse {
        /// The command line.
        command: String,
        /// The parser's error.
        #[source]
        source: ParseError,
    },
    /// The command succeeded but its output lacked the object asked for.
    #[error("`{command}` printed no entry for {name:?}")]
    MissingFromOutput {
        /// The command line.
        command: String,
        /// The pool or dataset.
        name: String,
    },
    /// The event follower ended (the `zpool events -f` process exited).
    #[error("event stream ended: {reason}")]
    EventStreamEnded {
        /// Exit status and stderr, or the read error.
        reason: String,
    },
}

impl ZfsError {
    /// The classified failure, for `Failed` errors.
    pub fn kind(&self) -> Option<FailureKind> {
        match self {
            Self::Failed { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True for a timeout (the pool may be suspended/hung).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_libzfs_wordings() {
        let cases = [
            ("cannot open 'nope': no such pool\n", true, FailureKind::NoSuchPool),
            ("cannot open 'tank/x': dataset does not exist\n", false, FailureKind::NoSuchDataset),
            ("cannot open 'x': no such pool or dataset", false, FailureKind::NoSuchDataset),
            ("cannot open 'x': no such pool or dataset", true, FailureKind::NoSuchPool),
            ("cannot replace a with b: no such device in pool", true, FailureKind::NoSuchDevice),
            ("cannot create 'tank/a': permission denied", false, FailureKind::PermissionDenied),
            ("cannot export 'tank': pool is busy", true, FailureKind::Busy),
            ("cannot destroy 'tank/a': dataset is busy", false, FailureKind::Busy),
            ("cannot scrub tank: pool I/O is currently suspended", true, FailureKind::PoolSuspended),
            ("cannot open 'tank': I/O error", true, FailureKind::Io),
            ("cannot create 'tank/a': out of space", false, FailureKind::OutOfSpace),
            // From the quota-edquot capture (a write, not a zfs command).
            ("dd: error writing '/tank/q/big': Disk quota exceeded", false, FailureKind::OutOfSpace),
            (
                "cannot set property for 'tank/q': size is less than current used or reserved space",
                false,
                FailureKind::QuotaBelowUsage,
            ),
            ("cannot create 'tank': pool already exists", true, FailureKind::AlreadyExists),
            ("cannot create 'tank/a': dataset already exists", false, FailureKind::AlreadyExists),
            (
                "invalid vdev specification\nuse '-f' to override the following errors:\n/dev/vdb1 is part of active pool 'tank'",
                true,
                FailureKind::DeviceInUse,
            ),
            (
                "/dev/vdc is in use and contains a unknown filesystem.",
                true,
                FailureKind::DeviceInUse,
            ),
            ("cannot scrub tank: currently resilvering", true, FailureKind::ResilverInProgress),
            ("cannot scrub tank: currently scrubbing; use 'zpool scrub -s' to cancel", true, FailureKind::ScrubInProgress),
            ("cannot pause scrubbing tank: there is no active scrub", true, FailureKind::NoActiveScrub),
            ("cannot set property for 'tank/a': bad numeric value 'x'", false, FailureKind::InvalidArgument),
            ("something new and strange", true, FailureKind::Other),
        ];
        for (stderr, pool_cmd, want) in cases {
            assert_eq!(FailureKind::classify(stderr, pool_cmd), want, "{stderr}");
        }
    }
}
