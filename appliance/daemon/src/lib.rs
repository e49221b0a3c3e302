//! `applianced`: the appliance daemon's spine.
//!
//! The daemon owns the components (storage, and later sync, bus and cache),
//! the control socket, the metrics endpoint and the conversation with systemd.
//! Its shape:
//!
//! - [`run`] binds every socket and starts every component, then tells systemd
//!   `READY=1`. Until then it sends `STATUS=` lines saying what it is doing.
//! - The *main loop* ([`supervisor`]) ticks at least every second. Each tick
//!   asks every component's own task to answer a liveness ping
//!   ([`liveness`]); only when all of them answer does it send `WATCHDOG=1`.
//!   A wedged component, or a wedged main loop, therefore stops the watchdog
//!   pings and systemd restarts the daemon. No detached timer pings on its own.
//! - On SIGTERM/SIGINT it sends `STOPPING=1`, cancels a shared token that every
//!   task watches, waits for them up to `shutdown.timeout_secs`, and exits 0.
//! - [`health`] collects each component's state and reason; the score and the
//!   probes are computed by pure functions in `appliance_types::health`.
//!
//! IO stays at the edges: the control protocol's framing and checks live in
//! `appliance-types`, the authorisation rule in [`control::may_mutate`], and
//! the peer's groups parser in [`control::parse_proc_groups`], all plain code
//! with unit tests.

pub mod admission;
pub mod bus;
pub mod cache;
pub mod cli;
pub mod client_datasets;
pub mod control;
pub mod daemon;
pub mod health;
pub mod listen;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod storage;
pub mod supervisor;
pub mod sync;

pub use daemon::run;
