//! appliance-bus (being written).

pub mod proto;
pub mod subject;
