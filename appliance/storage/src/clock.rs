//! Wall-clock time as an input, so policies and tests agree on "now".

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of Unix time in seconds.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that starts at `base` and advances with tokio's clock, so that a
/// test with paused time (`start_paused = true`) moves wall time and timers
/// together.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: u64,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Unix time `base` now.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_unix(&self) -> u64 {
        self.base + self.start.elapsed().as_secs()
    }
}
