//! appliance-zfs: the only code in the appliance that talks to ZFS.
//!
//! (Design notes are completed as the crate grows.)

pub mod model;
pub mod parse;
pub mod redundancy;

pub use model::*;
pub use redundancy::{redundancy, Layout, Redundancy, RedundancyLevel, VdevRedundancy};
