//! The scrub scheduler: pure decisions from an explicit `now`.
//!
//! The rule is TrueNAS's threshold idea: a pool is scrubbed when its last
//! *completed* scrub is older than `threshold_days` (default 35, TrueNAS's
//! default). A pool that was never scrubbed counts from when this appliance
//! first saw it, so a fresh pool is not scrubbed the minute it is created.
//! On top of that:
//!
//! * only inside an allowed time window (local minutes of the day, may wrap
//!   midnight; `None` = any time);
//! * never while a resilver runs (a scrub would compete for the same disks
//!   and ZFS refuses it anyway), never on top of a running or paused scrub
//!   (a paused scrub was paused by a person; the scheduler does not
//!   override them), never on a pool that cannot serve I/O;
//! * the intent is persisted before `zpool scrub` runs
//!   ([`ScrubRecord::requested_at`]), and for [`REQUEST_GRACE_SECS`] after
//!   it the scheduler does not ask again, so a restart right after the
//!   request does not start a second scrub; after the grace it is retried
//!   (the request may have been lost in a crash).
//! * completions are persisted ([`ScrubRecord::last_completed`], only ever
//!   moving forward), so restarts never re-scrub.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::derive::ResilverMark;

/// Seconds in a day.
pub const DAY: u64 = 86_400;

/// Default threshold: 35 days, TrueNAS's default ("scrub when the last one
/// is older than 35 days"), about monthly with slack for windows.
pub const DEFAULT_THRESHOLD_DAYS: u32 = 35;

/// How long a persisted request suppresses another one: a scrub shows up in
/// `zpool status` within a second of `zpool scrub`, so 10 minutes covers a
/// slow or restarting daemon without leaving a lost request unretried for
/// long.
pub const REQUEST_GRACE_SECS: u64 = 600;

/// An allowed time window in local minutes of the day, `[start, end)`.
/// `start > end` wraps midnight (22:00–04:00); `start == end` is the whole day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeWindow {
    /// First allowed minute (0..1440).
    pub start_minute: u16,
    /// First minute no longer allowed (0..1440).
    pub end_minute: u16,
}

/// Minutes in a day.
const DAY_MINUTES: u16 = 1440;

impl TimeWindow {
    /// A window from `HH:MM` to `HH:MM`; `None` if out of range.
    pub fn new(start_minute: u16, end_minute: u16) -> Option<Self> {
        (start_minute < DAY_MINUTES && end_minute < DAY_MINUTES).then_some(Self {
            start_minute,
            end_minute,
        })
    }

    /// Parses `"22:00-04:00"`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-')?;
        let hm = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let h: u16 = h.parse().ok()?;
            let m: u16 = m.parse().ok()?;
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        Self::new(hm(a)?, hm(b)?)
    }

    /// Whether local minute `m` is inside.
    pub fn contains(&self, m: u16) -> bool {
        let (s, e) = (self.start_minute, self.end_minute);
        if s == e {
            true
        } else if s < e {
            (s..e).contains(&m)
        } else {
            m >= s || m < e
        }
    }
}

/// Per-pool schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSchedule {
    /// Scrub when the last completion is older than this many days; 0
    /// disables scheduled scrubs.
    pub threshold_days: u32,
    /// Allowed window, local time.
    pub window: Option<TimeWindow>,
    /// Local time offset from UTC in minutes (the appliance's clock is UTC).
    pub utc_offset_minutes: i32,
}

impl Default for ScrubSchedule {
    fn default() -> Self {
        Self {
            threshold_days: DEFAULT_THRESHOLD_DAYS,
            window: None,
            utc_offset_minutes: 0,
        }
    }
}

/// What the pool is doing now, as far as the scheduler cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolActivity {
    /// No scan running.
    Idle,
    /// A scrub runs.
    Scrubbing,
    /// A scrub is paused.
    ScrubPaused,
    /// A resilver runs.
    Resilvering,
    /// The pool cannot serve I/O (suspended, unavailable, not answering).
    Unusable,
}

/// The scheduler's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrubDecision {
    /// Persist the request, then run `zpool scrub`.
    Start,
    /// Not due before `due_at`.
    NotDue {
        /// Unix seconds.
        due_at: u64,
    },
    /// Due, but the window opens at `opens_at`.
    OutsideWindow {
        /// Unix seconds.
        opens_at: u64,
    },
    /// Due, but a scan runs or the pool cannot serve.
    Blocked(PoolActivity),
    /// A request was made at this time and is still within its grace.
    Requested {
        /// Unix seconds.
        at: u64,
    },
    /// Scheduled scrubs are off for this pool.
    Disabled,
}

impl ScrubDecision {
    /// A short human description.
    pub fn describe(&self) -> String {
        match self {
            Self::Start => "due now".to_owned(),
            Self::NotDue { due_at } => format!("next due at {due_at} (Unix time)"),
            Self::OutsideWindow { opens_at } => {
                format!("due; waiting for the scrub window at {opens_at} (Unix time)")
            }
            Self::Blocked(PoolActivity::Resilvering) => "due; waiting for the resilver".to_owned(),
            Self::Blocked(PoolActivity::Scrubbing) => "scrub running".to_owned(),
            Self::Blocked(PoolActivity::ScrubPaused) => {
                "scrub paused by an operator; resume or stop it".to_owned()
            }
            Self::Blocked(PoolActivity::Unusable) => "due; pool cannot serve I/O".to_owned(),
            Self::Blocked(PoolActivity::Idle) => "idle".to_owned(),
            Self::Requested { at } => format!("scrub requested at {at} (Unix time)"),
            Self::Disabled => "scheduled scrubs disabled".to_owned(),
        }
    }
}

/// What is persisted per pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScrubRecord {
    /// End of the last completed scrub (Unix seconds).
    pub last_completed: Option<u64>,
    /// When this appliance first saw the pool.
    pub first_seen: Option<u64>,
    /// When the scheduler last asked for a scrub.
    pub requested_at: Option<u64>,
    /// A resilver's `started` was published and its end not yet (so a
    /// restart publishes the end it finds; see
    /// [`crate::derive::ResilverMark`]). Absent in books written before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resilver_open: bool,
    /// End of the newest resilver known to have ended (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resilver_ended: Option<u64>,
    /// A scrub's `progress` (or `paused`) was published and its end not
    /// yet (see [`crate::derive::EventDeriver::scrub_open`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scrub_open: bool,
    /// End of the newest scrub known to have ended, finished or canceled
    /// (Unix seconds; [`Self::last_completed`] keeps completions only, for
    /// the scheduler). Absent in books written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_ended: Option<u64>,
}

/// Local minute of the day at `now`.
fn local_minute(now: u64, offset_minutes: i32) -> u16 {
    let offset = i64::from(offset_minutes) * 60;
    let day = i64::try_from(DAY).unwrap_or(86_400);
    let local = i64::try_from(now)
        .unwrap_or(i64::MAX)
        .saturating_add(offset);
    let secs_of_day = local.rem_euclid(day);
    u16::try_from(secs_of_day / 60).unwrap_or(0)
}

/// The next time at or after `now` that is inside `window`.
pub fn next_window_open(now: u64, window: TimeWindow, offset_minutes: i32) -> u64 {
    let m = local_minute(now, offset_minutes);
    if window.contains(m) {
        return now;
    }
    let wait_minutes = (window.start_minute + DAY_MINUTES - m) % DAY_MINUTES;
    // Round down to the start of the current minute first.
    now - now % 60 + u64::from(wait_minutes) * 60
}

/// Decides for one pool.
pub fn decide(
    now: u64,
    schedule: &ScrubSchedule,
    record: &ScrubRecord,
    activity: PoolActivity,
) -> ScrubDecision {
    if schedule.threshold_days == 0 {
        return ScrubDecision::Disabled;
    }
    let base = record.last_completed.or(record.first_seen).unwrap_or(now);
    let due_at = base.saturating_add(u64::from(schedule.threshold_days) * DAY);
    if now < due_at {
        return ScrubDecision::NotDue { due_at };
    }
    match activity {
        PoolActivity::Idle => {}
        other => return ScrubDecision::Blocked(other),
    }
    if let Some(at) = record.requested_at {
        if at > base && now < at.saturating_add(REQUEST_GRACE_SECS) {
            return ScrubDecision::Requested { at };
        }
    }
    if let Some(w) = schedule.window {
        let opens_at = next_window_open(now, w, schedule.utc_offset_minutes);
        if opens_at > now {
            return ScrubDecision::OutsideWindow { opens_at };
        }
    }
    ScrubDecision::Start
}

/// The persisted records of every pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubBook {
    /// Per pool.
    pub pools: BTreeMap<String, ScrubRecord>,
}

/// Moves `slot` forward to `end` (a Unix time); true if it moved.
fn advance(slot: &mut Option<u64>, end: u64) -> bool {
    if slot.is_some_and(|s| s >= end) {
        return false;
    }
    *slot = Some(end);
    true
}

impl ScrubBook {
    /// The record of `pool` (default when unknown).
    pub fn get(&self, pool: &str) -> ScrubRecord {
        self.pools.get(pool).copied().unwrap_or_default()
    }

    /// Notes that the pool was seen at `now`; true if the book changed.
    pub fn saw_pool(&mut self, pool: &str, now: u64) -> bool {
        let r = self.pools.entry(pool.to_owned()).or_default();
        if r.first_seen.is_none() {
            r.first_seen = Some(now);
            return true;
        }
        false
    }

    /// Records a completed scrub ending at `end`; only moves forward. True
    /// if the book changed.
    pub fn completed(&mut self, pool: &str, end: u64) -> bool {
        let r = self.pools.entry(pool.to_owned()).or_default();
        advance(&mut r.last_completed, end)
    }

    /// Records what is known of the pool's resilvers; true if the book
    /// changed.
    pub fn resilver(&mut self, pool: &str, mark: ResilverMark) -> bool {
        let r = self.pools.entry(pool.to_owned()).or_default();
        let before = (r.resilver_open, r.resilver_ended);
        r.resilver_open = mark.open;
        r.resilver_ended = mark.last_end.max(r.resilver_ended);
        before != (r.resilver_open, r.resilver_ended)
    }

    /// Records whether a published scrub is still open; true if the book
    /// changed.
    pub fn scrub_open(&mut self, pool: &str, open: bool) -> bool {
        let r = self.pools.entry(pool.to_owned()).or_default();
        let changed = r.scrub_open != open;
        r.scrub_open = open;
        changed
    }

    /// Records the newest scrub end known (finished or canceled); only
    /// moves forward. True if the book changed.
    pub fn scrub_ended(&mut self, pool: &str, end: u64) -> bool {
        let r = self.pools.entry(pool.to_owned()).or_default();
        advance(&mut r.scrub_ended, end)
    }

    /// Records a scrub request at `now`.
    pub fn requested(&mut self, pool: &str, now: u64) {
        self.pools.entry(pool.to_owned()).or_default().requested_at = Some(now);
    }

    /// Forgets a request that failed to start.
    pub fn request_failed(&mut self, pool: &str) {
        if let Some(r) = self.pools.get_mut(pool) {
            r.requested_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// 2026-11-22 00:00:00 UTC.
    const MIDNIGHT: u64 = 1_795_305_600;

    fn sched(days: u32, window: Option<&str>) -> ScrubSchedule {
        ScrubSchedule {
            threshold_days: days,
            window: window.map(|w| TimeWindow::parse(w).unwrap()),
            utc_offset_minutes: 0,
        }
    }

    #[test]
    fn midnight_constant_is_midnight() {
        assert_eq!(MIDNIGHT % DAY, 0);
    }

    #[test]
    fn due_after_threshold_since_last_completion() {
        let s = sched(35, None);
        let mut book = ScrubBook::default();
        book.saw_pool("tank", MIDNIGHT);
        // Never scrubbed: counts from first sight.
        let d = decide(MIDNIGHT + DAY, &s, &book.get("tank"), PoolActivity::Idle);
        assert_eq!(
            d,
            ScrubDecision::NotDue {
                due_at: MIDNIGHT + 35 * DAY
            }
        );
        let now = MIDNIGHT + 35 * DAY;
        assert_eq!(
            decide(now, &s, &book.get("tank"), PoolActivity::Idle),
            ScrubDecision::Start
        );
        // A completion resets the clock.
        assert!(book.completed("tank", now + 3600));
        assert_eq!(
            decide(now + 7200, &s, &book.get("tank"), PoolActivity::Idle),
            ScrubDecision::NotDue {
                due_at: now + 3600 + 35 * DAY
            }
        );
        // Completions never move backwards (an old status replayed).
        assert!(!book.completed("tank", now));
        assert_eq!(book.get("tank").last_completed, Some(now + 3600));
    }

    #[test]
    fn never_during_resilver_or_on_top_of_a_scrub() {
        let s = sched(1, None);
        let r = ScrubRecord {
            last_completed: Some(MIDNIGHT),
            ..ScrubRecord::default()
        };
        let now = MIDNIGHT + 2 * DAY;
        for a in [
            PoolActivity::Resilvering,
            PoolActivity::Scrubbing,
            PoolActivity::ScrubPaused,
            PoolActivity::Unusable,
        ] {
            assert_eq!(decide(now, &s, &r, a), ScrubDecision::Blocked(a));
        }
        assert_eq!(
            decide(now, &s, &r, PoolActivity::Idle),
            ScrubDecision::Start
        );
    }

    #[test]
    fn persisted_request_survives_a_restart_and_expires() {
        let s = sched(1, None);
        let mut book = ScrubBook::default();
        book.completed("tank", MIDNIGHT);
        let now = MIDNIGHT + 2 * DAY;
        book.requested("tank", now);
        // The book is what a restarted daemon reads back.
        let json = serde_json::to_string(&book).unwrap();
        let book: ScrubBook = serde_json::from_str(&json).unwrap();
        assert_eq!(
            decide(now + 60, &s, &book.get("tank"), PoolActivity::Idle),
            ScrubDecision::Requested { at: now }
        );
        assert_eq!(
            decide(
                now + REQUEST_GRACE_SECS,
                &s,
                &book.get("tank"),
                PoolActivity::Idle
            ),
            ScrubDecision::Start
        );
        let mut book = book;
        book.request_failed("tank");
        assert_eq!(
            decide(now + 60, &s, &book.get("tank"), PoolActivity::Idle),
            ScrubDecision::Start
        );
    }

    #[test]
    fn completion_after_request_clears_it() {
        let s = sched(1, None);
        let mut book = ScrubBook::default();
        book.completed("tank", MIDNIGHT);
        book.requested("tank", MIDNIGHT + 2 * DAY);
        book.completed("tank", MIDNIGHT + 2 * DAY + 100);
        // Request older than the completion no longer counts; the scrub is
        // simply not due.
        assert!(matches!(
            decide(
                MIDNIGHT + 2 * DAY + 200,
                &s,
                &book.get("tank"),
                PoolActivity::Idle
            ),
            ScrubDecision::NotDue { .. }
        ));
    }

    #[test]
    fn window_wrapping_midnight_and_offsets() {
        let s = sched(1, Some("22:00-04:00"));
        let r = ScrubRecord {
            last_completed: Some(MIDNIGHT - 10 * DAY),
            ..ScrubRecord::default()
        };
        // 12:30 UTC: wait until 22:00.
        let noon = MIDNIGHT + 12 * 3600 + 1800;
        assert_eq!(
            decide(noon, &s, &r, PoolActivity::Idle),
            ScrubDecision::OutsideWindow {
                opens_at: MIDNIGHT + 22 * 3600
            }
        );
        assert_eq!(
            decide(MIDNIGHT + 23 * 3600, &s, &r, PoolActivity::Idle),
            ScrubDecision::Start
        );
        assert_eq!(
            decide(MIDNIGHT + 3 * 3600 + 59 * 60, &s, &r, PoolActivity::Idle),
            ScrubDecision::Start
        );
        assert!(matches!(
            decide(MIDNIGHT + 4 * 3600, &s, &r, PoolActivity::Idle),
            ScrubDecision::OutsideWindow { .. }
        ));
        // UTC+2: local 22:00 is 20:00 UTC.
        let s2 = ScrubSchedule {
            utc_offset_minutes: 120,
            ..s
        };
        assert_eq!(
            decide(noon, &s2, &r, PoolActivity::Idle),
            ScrubDecision::OutsideWindow {
                opens_at: MIDNIGHT + 20 * 3600
            }
        );
        // Negative offset across the day boundary: UTC-5 at 01:00 UTC is
        // 20:00 local the previous day; window opens at 03:00 UTC.
        let s3 = ScrubSchedule {
            utc_offset_minutes: -300,
            ..s
        };
        assert_eq!(
            decide(MIDNIGHT + 3600, &s3, &r, PoolActivity::Idle),
            ScrubDecision::OutsideWindow {
                opens_at: MIDNIGHT + 3 * 3600
            }
        );
    }

    #[test]
    fn window_parsing_and_disabled() {
        assert!(TimeWindow::parse("25:00-01:00").is_none());
        assert!(TimeWindow::parse("22:00").is_none());
        let w = TimeWindow::parse("01:00-01:00").unwrap();
        assert!(w.contains(0) && w.contains(1439));
        assert_eq!(
            decide(
                MIDNIGHT,
                &sched(0, None),
                &ScrubRecord::default(),
                PoolActivity::Idle
            ),
            ScrubDecision::Disabled
        );
        assert!(ScrubDecision::Blocked(PoolActivity::Resilvering)
            .describe()
            .contains("resilver"));
    }

    #[test]
    fn resilver_marks_are_kept_and_old_books_still_load() {
        // A book written before resilver marks existed.
        let old = r#"{"pools":{"tank":{"last_completed":5,"first_seen":1,"requested_at":null}}}"#;
        let mut book: ScrubBook = serde_json::from_str(old).unwrap();
        assert_eq!(book.get("tank").last_completed, Some(5));
        assert!(!book.get("tank").resilver_open);
        let open = ResilverMark {
            open: true,
            last_end: None,
        };
        assert!(book.resilver("tank", open));
        assert!(!book.resilver("tank", open), "unchanged");
        let ended = ResilverMark {
            open: false,
            last_end: Some(900),
        };
        assert!(book.resilver("tank", ended));
        // An end only moves forward.
        assert!(!book.resilver(
            "tank",
            ResilverMark {
                open: false,
                last_end: Some(800),
            }
        ));
        let back: ScrubBook = serde_json::from_str(&serde_json::to_string(&book).unwrap()).unwrap();
        assert_eq!(back, book);
        assert_eq!(back.get("tank").resilver_ended, Some(900));
    }
}
