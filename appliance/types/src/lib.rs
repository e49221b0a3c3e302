//! Shared types of the appliance: the configuration schema, the control-protocol
//! messages spoken between `appliancectl` and `applianced`, health and status
//! reports, and error codes.
//!
//! This crate does no IO. It only defines data and pure functions over data
//! (validation, frame encoding), so that the CLI can depend on it without
//! pulling in the daemon, and so that every rule here is unit-testable.
//!
//! Modules:
//! - [`config`]: the TOML configuration, with defaults in code, a `version`
//!   field, and errors that name the offending key.
//! - [`control`]: the control protocol (handshake, requests, responses,
//!   typed errors) and its length-prefixed postcard framing.
//! - [`health`]: component states, probes, and the status report.
//! - [`events`]: bus messages on the control socket, and the daemon's own
//!   event payloads.
//! - [`cache`]: the agent response cache on the control socket.
//! - [`sync`]: sync-client enrollment on the control socket.

pub mod cache;
pub mod config;
pub mod control;
pub mod events;
pub mod health;
pub mod storage;
pub mod sync;
