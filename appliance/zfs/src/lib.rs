//! appliance-zfs: the only code in the appliance that talks to ZFS.
//!
//! (Design notes are completed as the crate grows.)

pub mod api;
pub mod error;
pub mod fake;
pub mod model;
pub mod parse;
pub mod redundancy;
pub mod runner;

pub use api::{
    DatasetSpec, EncryptionSpec, EventFollower, KeyFormat, PoolLayout, PoolSpec, ScrubAction, Zfs,
};
pub use error::{FailureKind, ZfsError};
pub use model::*;
pub use parse::events::{EventItem, ZpoolEvent};
pub use redundancy::{redundancy, Layout, Redundancy, RedundancyLevel, VdevRedundancy};
pub use runner::{OutputFormat, RunnerConfig, ZfsRunner};
