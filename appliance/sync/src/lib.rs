//! QUIC sync server and client library (design notes are completed with the server).

pub mod admission;
pub mod fsutil;
pub mod identity;
pub mod store;
pub mod tls;
