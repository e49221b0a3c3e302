//! QUIC sync server and client library (design notes are completed with the client).

pub mod admission;
pub mod client;
pub mod events;
pub mod fsutil;
pub mod identity;
pub mod server;
pub mod store;
pub mod tls;
pub mod wire;
