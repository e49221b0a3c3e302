//! Sans-IO sync protocol of the appliance (issue 7). Docs completed below.

pub mod frame;
pub mod hash;
pub mod limits;
pub mod message;
pub mod path;

pub use frame::{decode_payload, encode, encode_into, parse_header, FrameDecoder, FrameError};
pub use hash::Hash;
pub use message::*;
pub use path::{PathRejection, RelPath};
