//! appliance-storage: the storage manager.
//!
//! (Design notes are completed as the crate grows.)

pub mod breaker;
pub mod clock;
pub mod derive;
pub mod disks;
pub mod error;
pub mod manager;
pub mod provision;
pub mod quota;
pub mod report;
pub mod scrub;
pub mod sink;
pub mod statefile;

pub use clock::{Clock, SystemClock, TokioClock};
pub use error::StorageError;
pub use manager::{Health, ManagerConfig, StorageManager};
pub use sink::{subject_and_payload, CollectingSink, EventSink};
