//! Circuit breaker and retry with backoff around ZFS calls (pure state
//! machines over an explicit `now` in milliseconds).
//!
//! # Breaker
//! * **Closed**: calls pass; [`BreakerConfig::failure_threshold`] failures in
//!   a row open it.
//! * **Open** until `now + open_for`: calls are refused at once. This is what
//!   keeps a hung pool from collecting one stuck `zpool` process per poll
//!   (each timed-out command may linger in D state).
//! * **Half-open** after that: one probe call passes; success closes the
//!   breaker, failure opens it again for twice as long (up to
//!   [`BreakerConfig::max_open_ms`]).
//!
//! Only failures that say "ZFS is not answering" count
//! ([`counts_as_failure`]): timeouts, spawn failures, suspended pools, I/O
//! errors. An answer such as "no such dataset" or "quota below usage" is ZFS
//! working normally.
//!
//! # Retry
//! Transient refusals ([`retryable`]: busy, spawn failure) are retried with
//! exponential backoff. Timeouts are never retried: a second command on a
//! hung pool hangs too.

use appliance_zfs::{FailureKind, ZfsError};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (3: one slow answer is
    /// noise, three in a row at a 10 s poll interval is half a minute of
    /// silence).
    pub failure_threshold: u32,
    /// First open period, ms (10 s: one poll interval).
    pub open_for_ms: u64,
    /// Longest open period, ms (5 min: a recovered pool is noticed within
    /// five minutes even after a long outage).
    pub max_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_for_ms: 10_000,
            max_open_ms: 300_000,
        }
    }
}

/// Breaker state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed {
        /// Failures in a row so far.
        failures: u32,
    },
    /// Calls refused until `until` (ms).
    Open {
        /// When a probe may pass.
        until: u64,
    },
    /// One probe is out.
    HalfOpen,
}

/// The breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: BreakerState,
    open_for: u64,
    last_failure: Option<String>,
}

/// A call refused by an open breaker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ZFS calls suspended until +{retry_in_ms} ms after repeated failures (last: {last_failure})"
)]
pub struct BreakerOpen {
    /// Milliseconds until a probe may pass.
    pub retry_in_ms: u64,
    /// The failure that opened it.
    pub last_failure: String,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: BreakerState::Closed { failures: 0 },
            open_for: cfg.open_for_ms,
            last_failure: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> &BreakerState {
        &self.state
    }

    /// Whether calls are refused at `now`.
    pub fn is_open(&self, now: u64) -> bool {
        matches!(self.state, BreakerState::Open { until } if now < until)
    }

    /// The failure that last counted.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Asks to make a call at `now`.
    pub fn allow(&mut self, now: u64) -> Result<(), BreakerOpen> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Ok(())
            }
            BreakerState::Open { until } => Err(BreakerOpen {
                retry_in_ms: until - now,
                last_failure: self.last_failure.clone().unwrap_or_default(),
            }),
            // The probe is out; others wait for its answer.
            BreakerState::HalfOpen => Err(BreakerOpen {
                retry_in_ms: 0,
                last_failure: self.last_failure.clone().unwrap_or_default(),
            }),
        }
    }

    /// A call succeeded (or failed in a way that proves ZFS answers).
    pub fn success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
        self.open_for = self.cfg.open_for_ms;
    }

    /// A call failed with a counted failure at `now`.
    pub fn failure(&mut self, now: u64, reason: &str) {
        self.last_failure = Some(reason.to_owned());
        match self.state {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.cfg.failure_threshold {
                    self.state = BreakerState::Open {
                        until: now + self.open_for,
                    };
                } else {
                    self.state = BreakerState::Closed { failures };
                }
            }
            BreakerState::HalfOpen | BreakerState::Open { .. } => {
                self.open_for = (self.open_for * 2).min(self.cfg.max_open_ms);
                self.state = BreakerState::Open {
                    until: now + self.open_for,
                };
            }
        }
    }
}

/// Whether an error means ZFS is not answering (counts for the breaker).
pub fn counts_as_failure(e: &ZfsError) -> bool {
    match e {
        ZfsError::Timeout { .. }
        | ZfsError::Spawn { .. }
        | ZfsError::MissingBinary { .. }
        | ZfsError::OutputTooLarge { .. }
        | ZfsError::Parse { .. }
        | ZfsError::EventStreamEnded { .. } => true,
        ZfsError::Failed { kind, .. } => matches!(
            kind,
            FailureKind::PoolSuspended | FailureKind::Io | FailureKind::Other
        ),
        ZfsError::InvalidArgument { .. } | ZfsError::MissingFromOutput { .. } => false,
    }
}

/// Whether an error is worth retrying at once (with backoff).
pub fn retryable(e: &ZfsError) -> bool {
    match e {
        ZfsError::Spawn { .. } => true,
        ZfsError::Failed { kind, .. } => matches!(kind, FailureKind::Busy),
        _ => false,
    }
}

/// Retry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first attempt (2).
    pub retries: u32,
    /// First delay, ms (200).
    pub base_ms: u64,
    /// Longest delay, ms (5 s).
    pub max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            retries: 2,
            base_ms: 200,
            max_ms: 5_000,
        }
    }
}

/// Delay before retry number `attempt` (0-based): base · 2^attempt, capped.
pub fn backoff_ms(cfg: &RetryConfig, attempt: u32) -> u64 {
    cfg.base_ms
        .saturating_mul(1u64.checked_shl(attempt).unwrap_or(u64::MAX))
        .min(cfg.max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timeout() -> ZfsError {
        ZfsError::Timeout {
            command: "zpool status tank".into(),
            after: Duration::from_secs(30),
        }
    }

    fn failed(kind: FailureKind) -> ZfsError {
        ZfsError::Failed {
            command: "zfs".into(),
            kind,
            exit_code: Some(1),
            stderr: String::new(),
        }
    }

    #[test]
    fn opens_after_threshold_probes_and_backs_off() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        for t in 0..2 {
            assert!(b.allow(t).is_ok());
            b.failure(t, "timeout");
        }
        assert!(!b.is_open(2));
        b.failure(2, "timeout");
        assert!(b.is_open(3));
        let e = b.allow(1000).unwrap_err();
        assert_eq!(e.retry_in_ms, 10_002 - 1000);
        assert_eq!(e.last_failure, "timeout");
        // Half-open: one probe, others refused.
        assert!(b.allow(10_002).is_ok());
        assert_eq!(b.state(), &BreakerState::HalfOpen);
        assert!(b.allow(10_003).is_err());
        // The probe fails: open twice as long.
        b.failure(10_005, "timeout");
        assert_eq!(b.state(), &BreakerState::Open { until: 30_005 });
        assert!(b.allow(30_005).is_ok());
        b.success();
        assert_eq!(b.state(), &BreakerState::Closed { failures: 0 });
        // After success the period starts small again.
        for t in 0..3 {
            b.failure(40_000 + t, "x");
        }
        assert_eq!(b.state(), &BreakerState::Open { until: 50_002 });
    }

    #[test]
    fn open_period_is_capped() {
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 1,
            open_for_ms: 100_000,
            max_open_ms: 300_000,
        });
        let mut now = 0;
        b.failure(now, "x");
        for _ in 0..5 {
            let BreakerState::Open { until } = *b.state() else {
                unreachable!()
            };
            assert!(until - now <= 300_000);
            now = until;
            assert!(b.allow(now).is_ok());
            b.failure(now, "x");
        }
        assert_eq!(
            b.state(),
            &BreakerState::Open {
                until: now + 300_000
            }
        );
    }

    #[test]
    fn success_in_between_resets_the_count() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        b.failure(0, "x");
        b.failure(1, "x");
        b.success();
        b.failure(2, "x");
        b.failure(3, "x");
        assert!(!b.is_open(4));
    }

    #[test]
    fn classification() {
        assert!(counts_as_failure(&timeout()));
        assert!(counts_as_failure(&failed(FailureKind::PoolSuspended)));
        assert!(!counts_as_failure(&failed(FailureKind::NoSuchDataset)));
        assert!(!counts_as_failure(&failed(FailureKind::QuotaBelowUsage)));
        assert!(!retryable(&timeout()), "a hung pool is not retried");
        assert!(retryable(&failed(FailureKind::Busy)));
        assert!(!retryable(&failed(FailureKind::NoSuchPool)));
        let cfg = RetryConfig::default();
        assert_eq!(backoff_ms(&cfg, 0), 200);
        assert_eq!(backoff_ms(&cfg, 1), 400);
        assert_eq!(backoff_ms(&cfg, 10), 5_000);
        assert_eq!(backoff_ms(&cfg, 200), 5_000);
    }
}
