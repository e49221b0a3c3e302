//! appliance-storage: the storage manager.
//!
//! (Design notes are completed as the crate grows.)

pub mod derive;
pub mod disks;
pub mod provision;
pub mod quota;
pub mod report;
pub mod scrub;
pub mod sink;
pub mod statefile;

pub use sink::{subject_and_payload, CollectingSink, EventSink};
