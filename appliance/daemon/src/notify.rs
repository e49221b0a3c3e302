//! The conversation with systemd's notify socket.
//!
//! We use the pure-Rust `sd-notify` crate rather than the `systemd` crate: the
//! protocol is one datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET`, and
//! `sd-notify` speaks it without linking libsystemd (LGPL, and a C build
//! dependency the Buildroot tree and cross builds would have to carry). The
//! `systemd` crate would add nothing we need here; journald logging goes
//! through `tracing-journald`, which is also pure Rust.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Sends notifications when systemd (or a test) provided `NOTIFY_SOCKET`.
#[derive(Debug, Clone)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        Self {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// The watchdog timeout systemd asked for, if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            warn!(error = %e, "cannot notify systemd");
        }
    }

    /// `STATUS=...`
    pub fn status(&self, status: &str) {
        debug!(status, "sd_notify status");
        self.send(&[NotifyState::Status(status)]);
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `WATCHDOG=1`
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STOPPING=1`
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    }
}
