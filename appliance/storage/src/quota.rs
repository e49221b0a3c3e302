//! Quota threshold alerts: one event per upward crossing of each level, with
//! hysteresis on the way down.
//!
//! Each level (default 80, 90, 95 %) is an independent latch per dataset:
//!
//! * armed → **crossed** when usage ≥ level: one `Crossed` event;
//! * crossed → **armed** again only when usage < level − hysteresis: one
//!   `Cleared` event.
//!
//! # Why 3 percentage points of hysteresis
//! ZFS accounting moves in transaction-group steps (a txg syncs every ~5 s)
//! and frees space asynchronously after deletes, so `used` of a busy dataset
//! wobbles around any fixed level; without a band every wobble across 80 %
//! would be a new alert. The band must stay below the smallest gap between
//! default levels (5 points, 90 → 95) so that falling from 96 % to 91 %
//! re-arms 95 % while 90 % stays latched: each level keeps its own meaning.
//! 3 points is 1.5 MB of a 50 MB quota and 30 GB of a 1 TB one, well above
//! txg noise and well below what an operator frees to get out of trouble.
//!
//! The first observation of a dataset is compared against all-armed latches:
//! a dataset already at 92 % when the daemon starts yields 80 and 90 alerts
//! once (nothing is missed across a restart; the bus keeps history).

use std::collections::BTreeMap;

use appliance_types::storage::{QuotaDirection, QuotaEvent};

/// Default alert levels in percent.
pub const DEFAULT_LEVELS: [u8; 3] = [80, 90, 95];

/// Default hysteresis in percentage points (see the module docs).
pub const DEFAULT_HYSTERESIS: f64 = 3.0;

/// Threshold configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaThresholds {
    levels: Vec<u8>,
    hysteresis: f64,
}

/// Why a threshold configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    /// No level at all.
    #[error("quota alert levels: at least one level is needed")]
    Empty,
    /// A level outside 1..=100.
    #[error("quota alert level {0}% is outside 1..=100")]
    OutOfRange(u8),
    /// The same level twice.
    #[error("quota alert level {0}% is listed twice")]
    Duplicate(u8),
    /// Hysteresis negative, not finite, or not below the smallest level.
    #[error("quota hysteresis {0} must be finite, >= 0 and below the lowest level")]
    BadHysteresis(f64),
}

impl Default for QuotaThresholds {
    fn default() -> Self {
        Self {
            levels: DEFAULT_LEVELS.to_vec(),
            hysteresis: DEFAULT_HYSTERESIS,
        }
    }
}

impl QuotaThresholds {
    /// Validates and sorts the levels.
    pub fn new(levels: &[u8], hysteresis: f64) -> Result<Self, ThresholdError> {
        if levels.is_empty() {
            return Err(ThresholdError::Empty);
        }
        let mut sorted = levels.to_vec();
        sorted.sort_unstable();
        for (i, &l) in sorted.iter().enumerate() {
            if l == 0 || l > 100 {
                return Err(ThresholdError::OutOfRange(l));
            }
            if i > 0 && sorted[i - 1] == l {
                return Err(ThresholdError::Duplicate(l));
            }
        }
        if !hysteresis.is_finite() || hysteresis < 0.0 || hysteresis >= f64::from(sorted[0]) {
            return Err(ThresholdError::BadHysteresis(hysteresis));
        }
        Ok(Self {
            levels: sorted,
            hysteresis,
        })
    }

    /// The levels, ascending.
    pub fn levels(&self) -> &[u8] {
        &self.levels
    }

    /// The hysteresis in percentage points.
    pub fn hysteresis(&self) -> f64 {
        self.hysteresis
    }
}

/// Usage of one dataset as a percentage and the limit it is a percentage of.
///
/// With a quota the limit is the quota; without one it is used + available
/// (available already accounts for the pool's free space).
pub fn usage_percent(used: u64, available: u64, quota: Option<u64>) -> (f64, u64) {
    let limit = quota.unwrap_or_else(|| used.saturating_add(available));
    if limit == 0 {
        return (100.0, 0);
    }
    #[allow(clippy::cast_precision_loss)] // percentages; bytes < 2^53 in practice
    let pct = used as f64 * 100.0 / limit as f64;
    (pct, limit)
}

/// The latches of every dataset.
#[derive(Debug, Clone, Default)]
pub struct QuotaTracker {
    thresholds: QuotaThresholds,
    crossed: BTreeMap<String, Vec<u8>>,
}

impl QuotaTracker {
    /// A tracker with these thresholds.
    pub fn new(thresholds: QuotaThresholds) -> Self {
        Self {
            thresholds,
            crossed: BTreeMap::new(),
        }
    }

    /// The thresholds in use.
    pub fn thresholds(&self) -> &QuotaThresholds {
        &self.thresholds
    }

    /// Levels currently crossed for `dataset`, ascending.
    pub fn crossed(&self, dataset: &str) -> Vec<u8> {
        self.crossed.get(dataset).cloned().unwrap_or_default()
    }

    /// Feeds one observation; returns the events it causes, ascending by
    /// level for crossings and descending for clearings.
    pub fn observe(
        &mut self,
        dataset: &str,
        used: u64,
        available: u64,
        quota: Option<u64>,
        now: u64,
    ) -> Vec<QuotaEvent> {
        let (pct, limit) = usage_percent(used, available, quota);
        let crossed = self.crossed.entry(dataset.to_owned()).or_default();
        let mut events = Vec::new();
        let event = |level: u8, direction| QuotaEvent {
            dataset: dataset.to_owned(),
            level_percent: level,
            direction,
            used_percent: (pct * 100.0).round() / 100.0,
            used_bytes: used,
            limit_bytes: limit,
            at: now,
        };
        for &level in self.thresholds.levels.iter().rev() {
            let is_crossed = crossed.contains(&level);
            if is_crossed && pct < f64::from(level) - self.thresholds.hysteresis {
                crossed.retain(|&l| l != level);
                events.push(event(level, QuotaDirection::Cleared));
            }
        }
        for &level in &self.thresholds.levels {
            if !crossed.contains(&level) && pct >= f64::from(level) {
                crossed.push(level);
                events.push(event(level, QuotaDirection::Crossed));
            }
        }
        crossed.sort_unstable();
        events
    }

    /// Forgets datasets not in `present` (destroyed datasets).
    pub fn retain_datasets(&mut self, present: &[&str]) {
        self.crossed.retain(|d, _| present.contains(&d.as_str()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dirs(ev: &[QuotaEvent]) -> Vec<(u8, QuotaDirection)> {
        ev.iter().map(|e| (e.level_percent, e.direction)).collect()
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn one_alert_per_upward_crossing() {
        let mut t = QuotaTracker::default();
        let q = Some(100 * MB);
        assert!(t.observe("tank/q", 50 * MB, 50 * MB, q, 1).is_empty());
        let ev = t.observe("tank/q", 81 * MB, 19 * MB, q, 2);
        assert_eq!(dirs(&ev), [(80, QuotaDirection::Crossed)]);
        assert_eq!(ev[0].limit_bytes, 100 * MB);
        assert!((ev[0].used_percent - 81.0).abs() < 1e-9);
        // Staying above, or wobbling inside the band: nothing.
        assert!(t.observe("tank/q", 85 * MB, 15 * MB, q, 3).is_empty());
        assert!(t.observe("tank/q", 78 * MB, 22 * MB, q, 4).is_empty());
        assert!(t.observe("tank/q", 80 * MB, 20 * MB, q, 5).is_empty());
        // A jump over two levels: one event each, ascending.
        let ev = t.observe("tank/q", 96 * MB, 4 * MB, q, 6);
        assert_eq!(
            dirs(&ev),
            [(90, QuotaDirection::Crossed), (95, QuotaDirection::Crossed)]
        );
        assert_eq!(t.crossed("tank/q"), [80, 90, 95]);
    }

    #[test]
    fn hysteresis_rearms_each_level_separately() {
        let mut t = QuotaTracker::default();
        let q = Some(100 * MB);
        t.observe("d", 96 * MB, 4 * MB, q, 1);
        // 93 % is inside 95's band (> 92): still latched.
        assert!(t.observe("d", 93 * MB, 7 * MB, q, 2).is_empty());
        // 91 % clears 95 but not 90.
        let ev = t.observe("d", 91 * MB, 9 * MB, q, 3);
        assert_eq!(dirs(&ev), [(95, QuotaDirection::Cleared)]);
        // Back to 95: alert again, once.
        let ev = t.observe("d", 95 * MB, 5 * MB, q, 4);
        assert_eq!(dirs(&ev), [(95, QuotaDirection::Crossed)]);
        assert!(t.observe("d", 95 * MB, 5 * MB, q, 5).is_empty());
        // Far down: everything clears, highest first.
        let ev = t.observe("d", 10 * MB, 90 * MB, q, 6);
        assert_eq!(
            dirs(&ev),
            [
                (95, QuotaDirection::Cleared),
                (90, QuotaDirection::Cleared),
                (80, QuotaDirection::Cleared)
            ]
        );
        assert!(t.crossed("d").is_empty());
    }

    #[test]
    fn without_quota_the_limit_is_used_plus_available() {
        let mut t = QuotaTracker::default();
        let ev = t.observe("tank", 850, 150, None, 1);
        assert_eq!(dirs(&ev), [(80, QuotaDirection::Crossed)]);
        assert_eq!(ev[0].limit_bytes, 1000);
        assert_eq!(usage_percent(0, 0, None), (100.0, 0));
        assert_eq!(usage_percent(5, 0, Some(10)).1, 10);
    }

    #[test]
    fn datasets_are_independent_and_forgotten_when_gone() {
        let mut t = QuotaTracker::default();
        t.observe("a", 90, 10, Some(100), 1);
        assert!(t.observe("b", 10, 90, Some(100), 1).is_empty());
        assert_eq!(t.crossed("a"), [80, 90]);
        t.retain_datasets(&["b"]);
        assert!(t.crossed("a").is_empty());
    }

    #[test]
    fn configuration_is_validated() {
        assert_eq!(QuotaThresholds::new(&[], 3.0), Err(ThresholdError::Empty));
        assert_eq!(
            QuotaThresholds::new(&[0], 3.0),
            Err(ThresholdError::OutOfRange(0))
        );
        assert_eq!(
            QuotaThresholds::new(&[101], 3.0),
            Err(ThresholdError::OutOfRange(101))
        );
        assert_eq!(
            QuotaThresholds::new(&[80, 80], 3.0),
            Err(ThresholdError::Duplicate(80))
        );
        assert!(QuotaThresholds::new(&[80], f64::NAN).is_err());
        assert!(QuotaThresholds::new(&[5], 5.0).is_err());
        let t = QuotaThresholds::new(&[95, 50], 0.0).unwrap();
        assert_eq!(t.levels(), [50, 95]);
        // Zero hysteresis: clear as soon as below.
        let mut tr = QuotaTracker::new(t);
        tr.observe("d", 50, 50, None, 1);
        let ev = tr.observe("d", 49, 51, None, 2);
        assert_eq!(dirs(&ev), [(50, QuotaDirection::Cleared)]);
    }
}
