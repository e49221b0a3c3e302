//! The main loop: liveness checks, watchdog pings and shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::liveness::LivenessProbe;
use crate::notify::Notifier;

/// Addresses the daemon listens on, by name.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    inner: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Endpoints {
    /// Records an endpoint.
    pub fn set(&self, name: &str, addr: impl Into<String>) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), addr.into());
    }

    /// A copy of all endpoints.
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The main loop's last liveness verdict, readable from anywhere.
#[derive(Debug, Clone)]
pub struct LoopState {
    origin: Instant,
    last_ok_ms: Arc<AtomicU64>,
    ok: Arc<AtomicBool>,
    stale_after: Duration,
}

impl LoopState {
    /// A loop that has not ticked yet and counts as stale after `stale_after`
    /// without a successful tick.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            origin: Instant::now(),
            last_ok_ms: Arc::new(AtomicU64::new(0)),
            ok: Arc::new(AtomicBool::new(false)),
            stale_after,
        }
    }

    fn record(&self, ok: bool) {
        self.ok.store(ok, Ordering::SeqCst);
        if ok {
            let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_ok_ms.store(ms, Ordering::SeqCst);
        }
    }

    /// Whether the last tick succeeded and was recent.
    pub fn alive(&self) -> bool {
        if !self.ok.load(Ordering::SeqCst) {
            return false;
        }
        let last = Duration::from_millis(self.last_ok_ms.load(Ordering::SeqCst));
        self.origin.elapsed().saturating_sub(last) <= self.stale_after
    }
}

/// How often the main loop checks liveness: every second, or twice per
/// watchdog period if systemd asked for a shorter one (systemd recommends
/// pinging at half of `WATCHDOG_USEC`).
pub fn tick_interval(watchdog: Option<Duration>) -> Duration {
    let base = Duration::from_secs(1);
    match watchdog {
        Some(w) if w / 2 < base => (w / 2).max(Duration::from_millis(10)),
        _ => base,
    }
}

/// One tick: asks every component to answer within `timeout`; pings the
/// watchdog only if all did. Returns the failures.
pub async fn tick(
    probes: &[LivenessProbe],
    timeout: Duration,
    notifier: &Notifier,
    state: &LoopState,
) -> Vec<String> {
    let checks = probes.iter().map(|p| p.check(timeout));
    let failures: Vec<String> = futures_util::future::join_all(checks)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    state.record(failures.is_empty());
    if failures.is_empty() {
        if notifier.watchdog_timeout().is_some() {
            notifier.watchdog();
        }
    } else {
        warn!(failures = ?failures, "liveness check failed; withholding the watchdog ping");
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::pair;

    #[test]
    fn tick_interval_follows_watchdog() {
        assert_eq!(tick_interval(None), Duration::from_secs(1));
        assert_eq!(
            tick_interval(Some(Duration::from_secs(30))),
            Duration::from_secs(1)
        );
        assert_eq!(
            tick_interval(Some(Duration::from_millis(1000))),
            Duration::from_millis(500)
        );
    }

    #[tokio::test]
    async fn tick_reports_each_wedged_component() {
        let (a, mut ra) = pair("a");
        let (b, _rb) = pair("b");
        let (c, _rc) = pair("c");
        let t = tokio::spawn(async move { while ra.answer_next().await {} });
        let state = LoopState::new(Duration::from_secs(5));
        let notifier = Notifier::from_env();
        let failures = tick(
            &[a.clone(), b, c],
            Duration::from_millis(100),
            &notifier,
            &state,
        )
        .await;
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(!state.alive());
        let failures = tick(&[a], Duration::from_millis(100), &notifier, &state).await;
        assert!(failures.is_empty());
        assert!(state.alive());
        t.abort();
    }
}
