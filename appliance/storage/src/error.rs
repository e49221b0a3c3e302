//! The storage manager's errors, each naming the pool, dataset or disk.

use appliance_types::control::ErrorCode;
use appliance_zfs::{FailureKind, ZfsError};

use crate::disks::{DiskError, DiskProblem, EligibilityError};
use crate::provision::ProvisionError;
use crate::statefile::StateFileError;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The manager or ZFS cannot serve now (ZFS hung, breaker open, the
    /// manager stopped).
    #[error("storage unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// A ZFS command failed.
    #[error("{op} {target}: {source}")]
    Zfs {
        /// What was being done (`set quota`, `scrub start`, ...).
        op: &'static str,
        /// The pool, dataset or disk.
        target: String,
        /// The error (boxed: large, and errors are rare).
        #[source]
        source: Box<ZfsError>,
    },
    /// The named pool, dataset or disk does not exist.
    #[error("no {what} {name}")]
    NotFound {
        /// `pool`, `dataset`, `disk`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An argument was refused.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// What.
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The operation conflicts with what the pool is doing.
    #[error("pool {pool}: {reason}")]
    Conflict {
        /// Pool.
        pool: String,
        /// Why.
        reason: String,
    },
    /// Disks refused for create-pool.
    #[error(transparent)]
    Eligibility(#[from] EligibilityError),
    /// A disk refused for replace.
    #[error("replacement disk refused: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    DiskRefused(Vec<DiskProblem>),
    /// Reading the machine's disks failed.
    #[error(transparent)]
    Disks(#[from] DiskError),
    /// Provisioning failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A state file.
    #[error(transparent)]
    State(#[from] StateFileError),
}

impl StorageError {
    /// Wraps a ZFS error.
    pub fn zfs(op: &'static str, target: impl Into<String>, e: ZfsError) -> Self {
        Self::Zfs {
            op,
            target: target.into(),
            source: Box::new(e),
        }
    }

    /// The control-protocol error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unavailable { .. } | Self::Disks(_) => ErrorCode::Unavailable,
            Self::NotFound { .. } => ErrorCode::NotFound,
            Self::InvalidArgument { .. }
            | Self::Eligibility(_)
            | Self::DiskRefused(_)
            | Self::Conflict { .. } => ErrorCode::InvalidArgument,
            Self::Zfs { source, .. } => match source.as_ref() {
                ZfsError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
                ZfsError::Timeout { .. } => ErrorCode::Unavailable,
                ZfsError::Failed { kind, .. } => match kind {
                    FailureKind::NoSuchPool
                    | FailureKind::NoSuchDataset
                    | FailureKind::NoSuchDevice => ErrorCode::NotFound,
                    FailureKind::PermissionDenied => ErrorCode::PermissionDenied,
                    FailureKind::Busy
                    | FailureKind::ResilverInProgress
                    | FailureKind::ScrubInProgress => ErrorCode::Busy,
                    FailureKind::InvalidArgument
                    | FailureKind::QuotaBelowUsage
                    | FailureKind::AlreadyExists
                    | FailureKind::DeviceInUse
                    | FailureKind::ScrubPaused
                    | FailureKind::NoActiveScrub => ErrorCode::InvalidArgument,
                    FailureKind::PoolSuspended | FailureKind::PoolUnavailable | FailureKind::Io => {
                        ErrorCode::Unavailable
                    }
                    FailureKind::OutOfSpace | FailureKind::Other => ErrorCode::Internal,
                },
                _ => ErrorCode::Internal,
            },
            Self::Provision(ProvisionError::Conflict { .. })
            | Self::Provision(ProvisionError::PoolExistsWithOtherDisks { .. })
            | Self::Provision(ProvisionError::KeyInsidePool { .. }) => ErrorCode::InvalidArgument,
            Self::Provision(_) | Self::State(_) => ErrorCode::Internal,
        }
    }
}
