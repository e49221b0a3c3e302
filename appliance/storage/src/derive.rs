//! Event derivation: from successive pool snapshots (polling) and ZFS events
//! (`zpool events -f`) to the `storage.*` events, each change published once.
//!
//! # Dedup by state, not by source
//! The deriver keeps the *published* view of every pool: its state word and
//! margin, each disk's state and error counters, the current scan. Both
//! inputs are compared with that view, and an event is produced only when the
//! view changes; the view is then updated. A disk that ZED reports REMOVED and
//! the next poll also shows REMOVED is therefore published once, whichever
//! source saw it first.
//!
//! # Stale ZFS events
//! `zpool events -f` first replays the kernel's ring buffer, which can hold
//! events from long ago (a disk that was removed and came back). An event is
//! applied only if it is not older than the last poll of its pool (event
//! `time` in whole seconds ≥ snapshot time), and events are applied once per
//! `eid`. Anything a skipped event would have changed is in the snapshot.
//!
//! # What each source gives
//! * ZFS events carry vdev state changes (fast disk events) but no pool
//!   health, margin or scan statistics. Every event of interest asks the
//!   caller to re-poll (the returned `repoll` flag), and the pool state,
//!   scans and error counters are derived from that snapshot. One
//!   exception: a disk failure that lowers the margin without losing data
//!   publishes DEGRADED with the new margin at once, from the last snapshot
//!   with that disk failed (the poll takes seconds on a busy machine; the
//!   issue asks for DEGRADED within 5 s of a pull). The manager drops a poll
//!   that was already running when such an event came, so an older view
//!   never undoes it.
//! * udev carries a disk's removal, which ZFS may not notice for a long
//!   time: it marks a vdev REMOVED when ZED asks it to, or when I/O to it
//!   fails, so a disk pulled from an idle pool can stay ONLINE in
//!   `zpool status` (seen in CI: nothing for two minutes). A pool member
//!   udev reports gone is published REMOVED, with DEGRADED and the new
//!   margin, at once ([`EventDeriver::observe_disk_gone`]), and every poll
//!   until udev sees it again marks it so ([`mark_gone`]).
//! * Snapshots carry everything; they alone would miss nothing but the
//!   precise moment.
//!
//! # Rates
//! Scan progress is published at most every [`DeriveConfig::progress_min_interval`]
//! and only when it advanced by [`DeriveConfig::progress_min_step`] points, but
//! at least every [`DeriveConfig::progress_max_silence`] while running: a 10-hour
//! scrub gives ~100 step events plus one every 5 minutes, not one per poll.
//! Error-counter events per disk are limited to one per
//! [`DeriveConfig::errors_min_interval`] (a failing disk can log thousands of
//! errors a minute); the latest counters are published when the interval ends.

use std::collections::{BTreeMap, BTreeSet};

use appliance_types::storage::{
    DeviceErrors, DiskAction, DiskEvent, EventSource, PoolHealthyEvent, PoolStateEvent, ScanEvent,
    ScanEventPhase, ScanKind, ScanPhase, ScanReport, StorageEvent, StorageStatus,
};
use appliance_zfs::{
    redundancy, DeviceState, ErrorCounts, PoolStatus, ScanFunction, ScanState, ScanStatus, Vdev,
    VdevKind, ZpoolEvent,
};

use crate::report::{
    classify, device_errors, devices_with_errors, disk_id, scan_report, PoolSnapshot,
};

/// The synthetic state word published when ZFS stops answering for a pool.
pub const UNRESPONSIVE: &str = "UNRESPONSIVE";

/// The synthetic state word published when a pool is no longer imported.
pub const ABSENT: &str = "ABSENT";

/// Rate limits and intervals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeriveConfig {
    /// Least seconds between two progress events of one scan (10 s).
    pub progress_min_interval: u64,
    /// Least progress, in percentage points, for another progress event (1).
    pub progress_min_step: f64,
    /// Most seconds without a progress event while a scan runs (300 s).
    pub progress_max_silence: u64,
    /// Seconds between `storage.pool.<pool>.healthy` heartbeats (900 s: an
    /// absent heartbeat is noticed within a quarter hour at 96 events a day).
    pub heartbeat_interval: u64,
    /// Least seconds between error-counter events of one disk (60 s).
    pub errors_min_interval: u64,
}

impl Default for DeriveConfig {
    fn default() -> Self {
        Self {
            progress_min_interval: 10,
            progress_min_step: 1.0,
            progress_max_silence: 300,
            heartbeat_interval: 900,
            errors_min_interval: 60,
        }
    }
}

#[derive(Debug, Clone)]
struct DiskSeen {
    state: DeviceState,
    errors: ErrorCounts,
    errors_published_at: Option<u64>,
    guid: Option<u64>,
}

#[derive(Debug, Clone)]
struct ScanSeen {
    function: ScanFunction,
    start_time: Option<u64>,
    state: ScanState,
    fingerprint: Option<(u64, Option<u64>, u64)>,
    progress_at: u64,
    progress_pct: f64,
}

#[derive(Debug, Clone)]
struct PoolSeen {
    state: String,
    margin: Option<i64>,
    disks: BTreeMap<String, DiskSeen>,
    scan: Option<ScanSeen>,
    /// A resilver's `started` was published (from an event or a snapshot).
    resilver_started: bool,
    /// ZFS reported the end of a resilver whose `started` was published
    /// (`resilver_finish`, at this time) and no poll has shown it ended yet:
    /// the next poll publishes its `finished`, from the poll if it shows
    /// the ended resilver, else (ZED started a scrub that replaced the scan
    /// stats) from the last poll that showed it running.
    resilver_end_unpublished: Option<u64>,
    /// When the `started` was published: the time of its ZFS event, or
    /// when the poll that showed it running read ZFS. Only a poll that read
    /// ZFS later can tell, by showing another scan, that it ended.
    resilver_started_at: u64,
    last_status: Option<PoolStatus>,
    status_as_of: u64,
    healthy: bool,
    redundancy: String,
    free_bytes: u64,
    heartbeat_at: Option<u64>,
}

/// What a ZFS event asks of the caller besides the events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventOutcome {
    /// Events to publish now.
    pub events: Vec<StorageEvent>,
    /// Re-read the pool(s) now: the event means state changed.
    pub repoll: bool,
}

/// The published view of every pool (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct EventDeriver {
    cfg: DeriveConfig,
    pools: BTreeMap<String, PoolSeen>,
    eids: BTreeSet<(u64, u64)>,
    known_scrub_end: BTreeMap<String, u64>,
    known_resilver_end: BTreeMap<String, u64>,
    /// Pools whose resilver `started` was published before this view of the
    /// pool began (by the manager before a restart, or before the pool was
    /// exported), with no `finished` since: the first poll publishes its end.
    resilver_open_before: BTreeSet<String>,
    /// The same for scrubs: a scrub's `progress` (or `paused`) was
    /// published and no `finished` or `canceled` since.
    scrub_open_before: BTreeSet<String>,
}

/// What must survive a restart for a resilver's `finished` to follow its
/// `started` (see [`EventDeriver::resilver_mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResilverMark {
    /// A `started` was published and no `finished` or `canceled` since.
    pub open: bool,
    /// The end (Unix seconds) of the newest resilver known to have ended.
    pub last_end: Option<u64>,
}

/// Most `(pool_guid, eid)` pairs remembered for replay de-duplication; the
/// kernel ring holds 512 by default (`zfs_zevent_len_max`).
const MAX_EIDS: usize = 4096;

fn action_for(state: &DeviceState) -> DiskAction {
    match state {
        DeviceState::Online | DeviceState::Avail | DeviceState::InUse => DiskAction::Online,
        DeviceState::Removed => DiskAction::Removed,
        DeviceState::Faulted
        | DeviceState::Degraded
        | DeviceState::Offline
        | DeviceState::Unavail
        | DeviceState::Suspended
        | DeviceState::Other(_) => DiskAction::Faulted,
    }
}

fn counts_exceed(a: &ErrorCounts, b: &ErrorCounts) -> bool {
    a.read > b.read || a.write > b.write || a.checksum > b.checksum
}

fn all_leaves(s: &PoolStatus) -> Vec<&Vdev> {
    let mut v = s.root.leaves();
    v.extend(s.cache.iter().flat_map(Vdev::leaves));
    v.extend(s.spares.iter().flat_map(Vdev::leaves));
    // The root of a pool without children is not a disk.
    v.retain(|l| !std::ptr::eq(*l, &s.root));
    v
}

fn is_terminal(s: &ScanState) -> bool {
    matches!(s, ScanState::Finished | ScanState::Canceled)
}

/// Tells finished scans apart when the output has no start time (the 2.1
/// text form): bytes repaired, duration and errors of a terminal scan.
fn fingerprint(scan: &ScanStatus) -> Option<(u64, Option<u64>, u64)> {
    (scan.start_time.is_none() && is_terminal(&scan.state)).then_some((
        scan.processed,
        scan.elapsed_secs,
        scan.errors,
    ))
}

fn empty_scan(function: &ScanFunction) -> ScanReport {
    let kind = match function {
        ScanFunction::Scrub => ScanKind::Scrub,
        ScanFunction::Resilver => ScanKind::Resilver,
        _ => ScanKind::Other,
    };
    ScanReport {
        kind,
        phase: ScanPhase::Running,
        percent: 0.0,
        issued_bytes: 0,
        total_bytes: 0,
        repaired_bytes: 0,
        errors: 0,
        rate_bytes_per_sec: None,
        eta_secs: None,
        started_at: None,
        ended_at: None,
    }
}

impl EventDeriver {
    /// A deriver with these limits.
    pub fn new(cfg: DeriveConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Seeds the end of the last completed scrub known from persisted state,
    /// so a finished scrub seen at start-up is published only if newer.
    /// Only moves forward (a completion and a later canceled scrub's end
    /// may both be seeded).
    pub fn set_known_scrub_end(&mut self, pool: &str, end: u64) {
        let e = self.known_scrub_end.entry(pool.to_owned()).or_insert(end);
        *e = (*e).max(end);
    }

    /// The end (Unix seconds) of the newest scrub known to have ended,
    /// finished or canceled: to persist after its event went out, so that a
    /// canceled scrub (no completion) is not published again at each start.
    pub fn known_scrub_end(&self, pool: &str) -> Option<u64> {
        self.known_scrub_end.get(pool).copied()
    }

    /// Seeds what was persisted of `pool`'s resilvers, so that a resilver
    /// that ended while nobody watched (the manager down, or starting) is
    /// published as finished at first sight: one whose `started` went out
    /// before, and one newer than the last known end.
    pub fn set_resilver_mark(&mut self, pool: &str, mark: ResilverMark) {
        if let Some(end) = mark.last_end {
            let e = self
                .known_resilver_end
                .entry(pool.to_owned())
                .or_insert(end);
            *e = (*e).max(end);
        }
        if mark.open {
            self.resilver_open_before.insert(pool.to_owned());
        } else {
            self.resilver_open_before.remove(pool);
        }
    }

    /// What to persist of `pool`'s resilvers (`None` if nothing is known).
    /// It changes when a resilver event is derived and when a poll first
    /// sees an ended resilver; persisting it before publishing a `started`
    /// means a crash can repeat an event but not lose a `finished`.
    pub fn resilver_mark(&self, pool: &str) -> Option<ResilverMark> {
        let open = self.pools.get(pool).map_or_else(
            || self.resilver_open_before.contains(pool),
            |p| p.resilver_started || p.resilver_end_unpublished.is_some(),
        );
        let last_end = self.known_resilver_end.get(pool).copied();
        (open || last_end.is_some() || self.pools.contains_key(pool))
            .then_some(ResilverMark { open, last_end })
    }

    /// Seeds whether a scrub's `progress` went out before a restart with no
    /// `finished` or `canceled` since: its end is then published at first
    /// sight even with no earlier completion to compare with.
    pub fn set_scrub_open(&mut self, pool: &str, open: bool) {
        if open {
            self.scrub_open_before.insert(pool.to_owned());
        } else {
            self.scrub_open_before.remove(pool);
        }
    }

    /// Whether a scrub of `pool` was published running or paused and not
    /// yet ended (to persist like [`Self::resilver_mark`]).
    pub fn scrub_open(&self, pool: &str) -> bool {
        self.pools.get(pool).map_or_else(
            || self.scrub_open_before.contains(pool),
            PoolSeen::scrub_open,
        )
    }

    /// Pools in the published view.
    pub fn pools(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// The published state word and margin of `pool`.
    pub fn published_state(&self, pool: &str) -> Option<(String, Option<i64>)> {
        self.pools.get(pool).map(|p| (p.state.clone(), p.margin))
    }

    /// The pool's status as last seen: the last poll, with any disk failure
    /// published from a ZFS event since applied to it.
    pub fn last_status(&self, pool: &str) -> Option<&PoolStatus> {
        self.pools.get(pool).and_then(|p| p.last_status.as_ref())
    }

    /// Applies one poll of one pool.
    pub fn observe_snapshot(&mut self, snap: &PoolSnapshot, now: u64) -> Vec<StorageEvent> {
        let status = &snap.status;
        let name = status.name.clone();
        let red = redundancy(status);
        let (st, reasons) = classify(status, &red);
        let first = !self.pools.contains_key(&name);
        // Taken at first sight whatever the scan shows (see below for a
        // resilver whose scan stats a scrub replaced meanwhile).
        let open_before = first && self.resilver_open_before.remove(&name);
        let scrub_open_before = first && self.scrub_open_before.remove(&name);
        // When the poll read ZFS, not now (see `status_as_of`).
        let as_of = snap.as_of.min(now);
        let free = snap.datasets.iter().find(|d| d.name == name).map_or_else(
            || snap.list.as_ref().map_or(0, |l| l.capacity.free),
            |d| d.available,
        );
        let seen = self.pools.entry(name.clone()).or_insert_with(PoolSeen::new);
        let mut events = Vec::new();

        // Pool state and margin.
        let new_state = status.state.as_str().to_owned();
        if first || seen.state != new_state || seen.margin != Some(red.margin) {
            events.push(StorageEvent::PoolState(PoolStateEvent {
                pool: name.clone(),
                old_state: (!first).then(|| seen.state.clone()),
                new_state: new_state.clone(),
                old_margin: if first { None } else { seen.margin },
                new_margin: Some(red.margin),
                status: st,
                redundancy: red.summary.clone(),
                failed_devices: failed_disk_ids(&red),
                reason: if reasons.is_empty() {
                    format!("pool {name} is {new_state}")
                } else {
                    reasons.join("; ")
                },
                source: EventSource::Poll,
                at: now,
            }));
            seen.state = new_state;
            seen.margin = Some(red.margin);
        }

        // Disks.
        let leaves = all_leaves(status);
        let mut present = BTreeSet::new();
        for leaf in &leaves {
            let id = disk_id(&leaf.name);
            present.insert(id.clone());
            let errs = device_errors(leaf);
            match seen.disks.get_mut(&id) {
                None => {
                    let action = if first {
                        (leaf.state.is_failed()).then(|| action_for(&leaf.state))
                    } else {
                        Some(DiskAction::Added)
                    };
                    let mut errors_published_at = None;
                    if let Some(action) = action {
                        events.push(disk_event(
                            &id,
                            action,
                            &name,
                            &leaf.state,
                            None,
                            errs.clone(),
                            EventSource::Poll,
                            now,
                        ));
                    }
                    if leaf.errors.any() {
                        events.push(disk_event(
                            &id,
                            DiskAction::Errors,
                            &name,
                            &leaf.state,
                            None,
                            errs,
                            EventSource::Poll,
                            now,
                        ));
                        errors_published_at = Some(now);
                    }
                    seen.disks.insert(
                        id,
                        DiskSeen {
                            state: leaf.state.clone(),
                            errors: leaf.errors,
                            errors_published_at,
                            guid: leaf.guid,
                        },
                    );
                }
                Some(d) => {
                    d.guid = leaf.guid.or(d.guid);
                    if d.state != leaf.state {
                        events.push(disk_event(
                            &id,
                            action_for(&leaf.state),
                            &name,
                            &leaf.state,
                            Some(&d.state),
                            errs.clone(),
                            EventSource::Poll,
                            now,
                        ));
                        d.state = leaf.state.clone();
                    }
                    if !counts_exceed(&leaf.errors, &d.errors) {
                        // Counters cleared (`zpool clear`) or unchanged.
                        if counts_exceed(&d.errors, &leaf.errors) {
                            d.errors = leaf.errors;
                        }
                    } else if d
                        .errors_published_at
                        .is_none_or(|t| now >= t.saturating_add(self.cfg.errors_min_interval))
                    {
                        events.push(disk_event(
                            &id,
                            DiskAction::Errors,
                            &name,
                            &leaf.state,
                            Some(&d.state),
                            errs,
                            EventSource::Poll,
                            now,
                        ));
                        d.errors = leaf.errors;
                        d.errors_published_at = Some(now);
                    }
                }
            }
        }
        // Disks that left the pool: a healthy one leaving is a removal; a
        // failed one leaving (detached after a replace) was already published.
        let gone: Vec<String> = seen
            .disks
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(d) = seen.disks.remove(&id) {
                if !d.state.is_failed() {
                    events.push(disk_event(
                        &id,
                        DiskAction::Removed,
                        &name,
                        &DeviceState::Other("DETACHED".into()),
                        Some(&d.state),
                        DeviceErrors {
                            disk: id.clone(),
                            ..DeviceErrors::default()
                        },
                        EventSource::Poll,
                        now,
                    ));
                }
            }
        }

        // Scans.
        let errs = devices_with_errors(status);
        if let Some(scan) = &status.scan {
            let ev = self.scan_events(
                &name,
                scan,
                &errs,
                (first, open_before, scrub_open_before),
                as_of,
                now,
            );
            events.extend(ev);
        }

        let seen = self.pools.entry(name.clone()).or_insert_with(PoolSeen::new);
        // Still unpublished after the scans, and this poll shows no
        // resilver: the scan stats went to another scan. (One showing it
        // running read ZFS before it ended; a new one comes with its
        // `resilver_start`, which publishes this first.)
        if status
            .scan
            .as_ref()
            .is_none_or(|s| s.function != ScanFunction::Resilver)
        {
            // ZFS runs one scan at a time and a scrub cannot start during a
            // resilver: another scan in a poll that read ZFS after the
            // `started` means that resilver ended, whether or not its
            // `resilver_finish` came (the event follower down or behind:
            // once late, the event is older than this poll and ignored),
            // or ended while nobody watched (its `started` went out before
            // this view of the pool began). Its end is at the latest when
            // the scan that replaced it started.
            let ended_unseen =
                open_before || (seen.resilver_started && as_of > seen.resilver_started_at);
            if ended_unseen && seen.resilver_end_unpublished.is_none() {
                let at = status
                    .scan
                    .as_ref()
                    .and_then(|s| s.start_time)
                    .unwrap_or(as_of);
                seen.resilver_end_unpublished = Some(at);
            }
            if seen.resilver_end_unpublished.is_some() {
                seen.resilver_started = false;
            }
            events.extend(unpublished_resilver_end(seen, &name));
        }
        seen.healthy = st == StorageStatus::Healthy;
        seen.redundancy = red.summary;
        seen.free_bytes = free;
        // When the poll read ZFS, not now: a ZFS event from while the poll
        // ran may be missing from it, and is applied when it comes.
        seen.status_as_of = as_of;
        seen.last_status = Some(status.clone());
        events
    }

    fn scan_events(
        &mut self,
        pool: &str,
        scan: &ScanStatus,
        errs: &[DeviceErrors],
        (first, resilver_open_before, scrub_open_before): (bool, bool, bool),
        as_of: u64,
        now: u64,
    ) -> Vec<StorageEvent> {
        let cfg = self.cfg;
        let Some(seen) = self.pools.get_mut(pool) else {
            return Vec::new();
        };
        let report = scan_report(scan, now);
        let mut out = Vec::new();
        let is_scrub = scan.function == ScanFunction::Scrub;
        let is_resilver = scan.function == ScanFunction::Resilver;
        if !is_scrub && !is_resilver {
            return out;
        }
        // ZFS restarts a running scrub as a resilver ("scan aborted,
        // restarting"): a scrub whose `progress` went out, now or before
        // this view of the pool began, and that a resilver replaced never
        // completed. Its end goes out first, as canceled.
        if is_resilver && (seen.scrub_open() || scrub_open_before) {
            let at = scan.start_time.unwrap_or(as_of).min(now);
            out.push(replaced_scrub_end(seen, pool, errs, at, now));
        }
        let mk = |phase| {
            let ev = ScanEvent {
                pool: pool.to_owned(),
                phase,
                scan: report.clone(),
                devices_with_errors: errs.to_vec(),
                at: now,
            };
            if is_scrub {
                StorageEvent::Scrub(ev)
            } else {
                StorageEvent::Resilver(ev)
            }
        };
        let prev = seen.scan.clone();
        let fp = fingerprint(scan);
        let same_start = prev
            .as_ref()
            .filter(|p| p.function == scan.function && p.start_time == scan.start_time);
        let was_active = same_start.is_some_and(|p| !is_terminal(&p.state));
        let repeat = same_start.is_some_and(|p| p.state == scan.state && p.fingerprint == fp);
        let pct = scan.progress_percent();
        let mut progress_at = prev.as_ref().map_or(now, |p| p.progress_at);
        let mut progress_pct = prev.as_ref().map_or(0.0, |p| p.progress_pct);
        let known_end = if is_scrub {
            self.known_scrub_end.get(pool).copied()
        } else {
            self.known_resilver_end.get(pool).copied()
        };
        // A terminal scan never seen running: publish it if it is newer than
        // what we know. At first sight of a pool that needs a persisted end
        // to compare with (else every restart would republish the last
        // scan), or a scan whose `started` (a scrub's `progress`) went out
        // before.
        let open_before = if is_resilver {
            resilver_open_before
        } else {
            scrub_open_before
        };
        let unseen_terminal_is_new = match scan.end_time {
            Some(e) => {
                known_end.is_none_or(|k| e > k) && !(first && known_end.is_none() && !open_before)
            }
            None => !first || open_before,
        };
        match scan.state {
            ScanState::Running if was_active => {
                let resumed = same_start.is_some_and(|p| p.state == ScanState::Paused);
                let since = now.saturating_sub(progress_at);
                let due = (since >= cfg.progress_min_interval
                    && pct - progress_pct >= cfg.progress_min_step)
                    || since >= cfg.progress_max_silence;
                if resumed || due {
                    out.push(mk(ScanEventPhase::Progress));
                    progress_at = now;
                    progress_pct = pct;
                }
            }
            // A poll that read ZFS before the end ZFS reported since
            // (`resilver_finish`) shows that resilver still running: it is
            // not a new one to start (the next poll shows its end, or the
            // scan that replaced it).
            ScanState::Running
                if is_resilver && seen.resilver_end_unpublished.is_some_and(|e| as_of <= e) => {}
            ScanState::Running => {
                if is_resilver && !seen.resilver_started {
                    // Its `started` went out before this view of the pool
                    // began (a restart, or the pool's return): the same
                    // resilver still running, or one ZFS restarted, which a
                    // running view also takes for the same one. Else a new
                    // resilver, read after the end of the last one that no
                    // poll showed: that end goes out first.
                    if !(first && resilver_open_before) {
                        out.extend(unpublished_resilver_end(seen, pool));
                        out.push(mk(ScanEventPhase::Started));
                    }
                    seen.resilver_started = true;
                    seen.resilver_started_at = as_of;
                }
                out.push(mk(ScanEventPhase::Progress));
                progress_at = now;
                progress_pct = pct;
            }
            ScanState::Paused => {
                if !repeat {
                    out.push(mk(ScanEventPhase::Paused));
                }
            }
            ScanState::Finished | ScanState::Canceled => {
                let phase = if scan.state == ScanState::Finished {
                    ScanEventPhase::Finished
                } else {
                    ScanEventPhase::Canceled
                };
                if was_active || (!repeat && unseen_terminal_is_new) {
                    out.push(mk(phase));
                }
                if is_resilver {
                    seen.resilver_started = false;
                    seen.resilver_end_unpublished = None;
                }
            }
            ScanState::Other(_) => {}
        }
        if let Some(end) = scan.end_time.filter(|_| is_terminal(&scan.state)) {
            let map = if is_scrub {
                &mut self.known_scrub_end
            } else {
                &mut self.known_resilver_end
            };
            let e = map.entry(pool.to_owned()).or_insert(end);
            *e = (*e).max(end);
        }
        if let Some(seen) = self.pools.get_mut(pool) {
            seen.scan = Some(ScanSeen {
                function: scan.function.clone(),
                start_time: scan.start_time,
                state: scan.state.clone(),
                fingerprint: fp,
                progress_at,
                progress_pct,
            });
        }
        out
    }

    /// Applies one ZFS event.
    pub fn observe_zfs_event(&mut self, ev: &ZpoolEvent, now: u64) -> EventOutcome {
        let mut out = EventOutcome::default();
        if let Some(eid) = ev.eid {
            let key = (ev.pool_guid.unwrap_or(0), eid);
            if !self.eids.insert(key) {
                return out;
            }
            while self.eids.len() > MAX_EIDS {
                self.eids.pop_first();
            }
        }
        let class = ev.short_class();
        let interesting = matches!(
            class,
            "statechange"
                | "removed"
                | "vdev_attach"
                | "vdev_remove"
                | "vdev_clear"
                | "vdev_online"
                | "scrub_start"
                | "scrub_finish"
                | "scrub_abort"
                | "scrub_paused"
                | "scrub_resume"
                | "resilver_start"
                | "resilver_finish"
                | "pool_import"
                | "pool_export"
                | "pool_destroy"
                | "pool_create"
                | "io_failure"
                | "checksum"
                | "io"
                | "vdev.no_replicas"
                | "vdev.unknown"
                | "vdev.open_failed"
                | "vdev.corrupt_data"
                | "vdev.bad_label"
                | "data"
                | "probe_failure"
                | "deadman"
        );
        if !interesting {
            return out;
        }
        out.repoll = true;
        let Some(pool) = ev.pool.clone() else {
            return out;
        };
        let Some(seen) = self.pools.get_mut(&pool) else {
            // Not polled yet: the poll this asks for publishes everything.
            return out;
        };
        if ev.time_secs.is_some_and(|t| t < seen.status_as_of) {
            return out;
        }
        let at = ev.time_secs.unwrap_or(now);
        let by_guid = ev.vdev_guid.and_then(|g| {
            seen.disks
                .iter()
                .find(|(_, d)| d.guid == Some(g))
                .map(|(k, _)| k.clone())
        });
        let id = by_guid.or_else(|| ev.vdev_path.as_deref().map(disk_id));
        match class {
            "statechange" | "removed" | "vdev_attach" | "vdev_online" => {
                let Some(id) = id else { return out };
                let new_state = match (class, &ev.vdev_state) {
                    (_, Some(s)) => s.clone(),
                    ("removed", None) => DeviceState::Removed,
                    ("vdev_attach" | "vdev_online", None) => DeviceState::Online,
                    _ => return out,
                };
                out.events = device_state(
                    seen,
                    &pool,
                    &id,
                    ev.vdev_guid,
                    &new_state,
                    EventSource::ZfsEvent,
                    at,
                );
            }
            // A resilver the polls may never see end (a scrub that ZFS
            // started right after it replaced the pool's scan stats): without
            // this the next resilver's start would be taken for the same one
            // and not published (found in scenario 5), and its `finished`
            // would never follow its `started`.
            "resilver_finish" => {
                if seen.resilver_started {
                    seen.resilver_end_unpublished = Some(at);
                }
                seen.resilver_started = false;
            }
            "resilver_start" if !seen.resilver_started => {
                if seen.scrub_open() {
                    // See `scan_events`: the resilver replaced the scrub.
                    let errs = seen
                        .last_status
                        .as_ref()
                        .map(devices_with_errors)
                        .unwrap_or_default();
                    out.events
                        .push(replaced_scrub_end(seen, &pool, &errs, at, now));
                }
                out.events.extend(unpublished_resilver_end(seen, &pool));
                seen.resilver_started = true;
                seen.resilver_started_at = at;
                let errs = seen
                    .last_status
                    .as_ref()
                    .map(devices_with_errors)
                    .unwrap_or_default();
                let mut scan = empty_scan(&ScanFunction::Resilver);
                scan.started_at = ev.time_secs;
                out.events.push(StorageEvent::Resilver(ScanEvent {
                    pool: pool.clone(),
                    phase: ScanEventPhase::Started,
                    scan,
                    devices_with_errors: errs,
                    at,
                }));
            }
            _ => {}
        }
        out
    }

    /// udev reported disk `id` of `pool` gone (hot-unplugged) while the
    /// published view still has it working: ZFS marks a vdev REMOVED only
    /// when ZED asks it to or when I/O to it fails, which on an idle pool can
    /// be never. Publishes the disk REMOVED (source udev) and, if that lowers
    /// the margin, DEGRADED at once. The polls that follow keep it so through
    /// [`mark_gone`].
    pub fn observe_disk_gone(&mut self, pool: &str, id: &str, now: u64) -> Vec<StorageEvent> {
        let Some(seen) = self.pools.get_mut(pool) else {
            return Vec::new();
        };
        let Some(d) = seen.disks.get(id) else {
            return Vec::new();
        };
        if d.state.is_failed() {
            return Vec::new();
        }
        let guid = d.guid;
        device_state(
            seen,
            pool,
            id,
            guid,
            &DeviceState::Removed,
            EventSource::Udev,
            now,
        )
    }

    /// ZFS did not answer for `pool` (a timeout or an open circuit breaker).
    pub fn observe_unreachable(&mut self, pool: &str, reason: &str, now: u64) -> Vec<StorageEvent> {
        self.synthetic_state(pool, UNRESPONSIVE, reason, now)
    }

    /// `pool` is no longer imported.
    pub fn observe_absent(&mut self, pool: &str, now: u64) -> Vec<StorageEvent> {
        let ev = self.synthetic_state(
            pool,
            ABSENT,
            &format!("pool {pool} is no longer imported"),
            now,
        );
        if let Some(p) = self.pools.remove(pool) {
            if p.resilver_started || p.resilver_end_unpublished.is_some() {
                self.resilver_open_before.insert(pool.to_owned());
            }
            if p.scrub_open() {
                self.scrub_open_before.insert(pool.to_owned());
            }
        }
        ev
    }

    fn synthetic_state(
        &mut self,
        pool: &str,
        state: &str,
        reason: &str,
        now: u64,
    ) -> Vec<StorageEvent> {
        let Some(seen) = self.pools.get_mut(pool) else {
            return Vec::new();
        };
        if seen.state == state {
            return Vec::new();
        }
        let ev = StorageEvent::PoolState(PoolStateEvent {
            pool: pool.to_owned(),
            old_state: Some(seen.state.clone()),
            new_state: state.to_owned(),
            old_margin: seen.margin,
            new_margin: None,
            status: StorageStatus::Unavailable,
            redundancy: seen.redundancy.clone(),
            failed_devices: Vec::new(),
            reason: reason.to_owned(),
            source: EventSource::Daemon,
            at: now,
        });
        seen.state = state.to_owned();
        seen.margin = None;
        seen.healthy = false;
        vec![ev]
    }

    /// Periodic work: heartbeats of healthy pools.
    pub fn tick(&mut self, now: u64) -> Vec<StorageEvent> {
        let interval = self.cfg.heartbeat_interval;
        let mut out = Vec::new();
        for (name, p) in &mut self.pools {
            if !p.healthy {
                p.heartbeat_at = None;
                continue;
            }
            if p.heartbeat_at
                .is_none_or(|t| now >= t.saturating_add(interval))
            {
                out.push(StorageEvent::PoolHealthy(PoolHealthyEvent {
                    pool: name.clone(),
                    redundancy: p.redundancy.clone(),
                    margin: p.margin.unwrap_or(0),
                    free_bytes: p.free_bytes,
                    at: now,
                }));
                p.heartbeat_at = Some(now);
            }
        }
        out
    }
}

impl PoolSeen {
    /// A scrub is running or paused in the published view (its `progress`
    /// or `paused` went out).
    fn scrub_open(&self) -> bool {
        self.scan.as_ref().is_some_and(|s| {
            s.function == ScanFunction::Scrub
                && matches!(s.state, ScanState::Running | ScanState::Paused)
        })
    }

    fn new() -> Self {
        Self {
            state: String::new(),
            margin: None,
            disks: BTreeMap::new(),
            scan: None,
            resilver_started: false,
            resilver_end_unpublished: None,
            resilver_started_at: 0,
            last_status: None,
            status_as_of: 0,
            healthy: false,
            redundancy: String::new(),
            free_bytes: 0,
            heartbeat_at: None,
        }
    }
}

/// The `finished` of a resilver ZFS reported ended that no poll showed
/// ended (see [`PoolSeen::resilver_end_unpublished`]): its figures are those
/// of the last poll that showed it running, at 100 %.
fn unpublished_resilver_end(seen: &mut PoolSeen, pool: &str) -> Option<StorageEvent> {
    let at = seen.resilver_end_unpublished.take()?;
    let status = seen.last_status.as_ref();
    let mut scan = status
        .and_then(|s| s.scan.as_ref())
        .filter(|s| s.function == ScanFunction::Resilver)
        .map_or_else(
            || empty_scan(&ScanFunction::Resilver),
            |s| scan_report(s, at),
        );
    scan.phase = ScanPhase::Finished;
    scan.percent = 100.0;
    scan.rate_bytes_per_sec = None;
    scan.eta_secs = None;
    scan.ended_at = Some(at);
    Some(StorageEvent::Resilver(ScanEvent {
        pool: pool.to_owned(),
        phase: ScanEventPhase::Finished,
        scan,
        devices_with_errors: status.map(devices_with_errors).unwrap_or_default(),
        at,
    }))
}

/// The `canceled` of a scrub whose `progress` went out and that a resilver
/// replaced (ZFS restarts a running scrub as a resilver), ended at `at`:
/// its figures are those of the last poll that showed it, if any. Closes
/// it in the published view.
fn replaced_scrub_end(
    seen: &mut PoolSeen,
    pool: &str,
    errs: &[DeviceErrors],
    at: u64,
    now: u64,
) -> StorageEvent {
    let mut scan = seen
        .last_status
        .as_ref()
        .and_then(|s| s.scan.as_ref())
        .filter(|s| s.function == ScanFunction::Scrub)
        .map_or_else(|| empty_scan(&ScanFunction::Scrub), |s| scan_report(s, at));
    scan.phase = ScanPhase::Canceled;
    scan.rate_bytes_per_sec = None;
    scan.eta_secs = None;
    scan.ended_at = Some(at);
    if let Some(s) = seen.scan.as_mut() {
        if s.function == ScanFunction::Scrub {
            s.state = ScanState::Canceled;
        }
    }
    StorageEvent::Scrub(ScanEvent {
        pool: pool.to_owned(),
        phase: ScanEventPhase::Canceled,
        scan,
        devices_with_errors: errs.to_vec(),
        at: now,
    })
}

/// Marks the pool's disks that udev reported gone as REMOVED where ZFS still
/// reports them working (it has not noticed yet: see
/// [`EventDeriver::observe_disk_gone`]), and their vdevs and the pool with
/// them: DEGRADED while the data survives, UNAVAIL once more disks are gone
/// than the layout's parity. A state ZFS already reports as failed is left
/// as it is (ZFS knows better, and SUSPENDED says more than UNAVAIL).
/// Returns whether anything changed.
pub fn mark_gone(status: &mut PoolStatus, gone: &BTreeSet<String>) -> bool {
    fn walk(v: &mut Vdev, gone: &BTreeSet<String>) -> bool {
        if v.children.is_empty() {
            if !v.state.is_failed() && gone.contains(&disk_id(&v.name)) {
                v.state = DeviceState::Removed;
                return true;
            }
            return false;
        }
        let mut changed = false;
        for c in &mut v.children {
            changed |= walk(c, gone);
        }
        if changed && v.state == DeviceState::Online {
            v.state = DeviceState::Degraded;
        }
        changed
    }
    if gone.is_empty() || !walk(&mut status.root, gone) {
        return false;
    }
    if !status.state.is_failed() {
        status.state = if redundancy(status).margin < 0 {
            DeviceState::Unavail
        } else {
            DeviceState::Degraded
        };
    }
    true
}

/// One disk of `pool` is now in `new_state` (from a ZFS event, or from udev
/// when the disk is gone): the disk event if its published state changes,
/// and DEGRADED with the new margin if that lowers the margin (see
/// [`lost_redundancy`]).
fn device_state(
    seen: &mut PoolSeen,
    pool: &str,
    id: &str,
    guid: Option<u64>,
    new_state: &DeviceState,
    source: EventSource,
    at: u64,
) -> Vec<StorageEvent> {
    let mut events = Vec::new();
    match seen.disks.get_mut(id) {
        Some(d) if d.state == *new_state => {}
        Some(d) => {
            let errors = DeviceErrors {
                disk: id.to_owned(),
                read: d.errors.read,
                write: d.errors.write,
                checksum: d.errors.checksum,
            };
            events.push(disk_event(
                id,
                action_for(new_state),
                pool,
                new_state,
                Some(&d.state),
                errors,
                source,
                at,
            ));
            d.state = new_state.clone();
            if new_state.is_failed() {
                events.extend(lost_redundancy(seen, pool, id, guid, new_state, source, at));
            } else {
                events.extend(regained_redundancy(
                    seen, pool, id, guid, new_state, source, at,
                ));
            }
        }
        None => {
            let action = if new_state.is_failed() {
                action_for(new_state)
            } else {
                DiskAction::Added
            };
            let errors = DeviceErrors {
                disk: id.to_owned(),
                ..DeviceErrors::default()
            };
            events.push(disk_event(
                id, action, pool, new_state, None, errors, source, at,
            ));
            seen.disks.insert(
                id.to_owned(),
                DiskSeen {
                    state: new_state.clone(),
                    errors: ErrorCounts::default(),
                    errors_published_at: None,
                    guid,
                },
            );
        }
    }
    events
}

/// A disk of `pool` failed (ZFS event): when that lowers the margin and the
/// pool still has all its data, publish DEGRADED with the new margin now,
/// computed from the last poll with that disk failed, instead of waiting
/// for the poll the event triggers (three commands, seconds on a busy
/// machine). The poll then finds the same state and margin and publishes
/// nothing more. A loss beyond the parity is left to the poll: only ZFS
/// knows whether the pool is then UNAVAIL or SUSPENDED.
fn lost_redundancy(
    seen: &mut PoolSeen,
    pool: &str,
    id: &str,
    guid: Option<u64>,
    state: &DeviceState,
    source: EventSource,
    at: u64,
) -> Option<StorageEvent> {
    let mut status = seen.last_status.clone()?;
    let leaf = leaf_mut(&mut status.root, &is_disk(id, guid))?;
    leaf.state = state.clone();
    let red = redundancy(&status);
    if red.margin < 0 || seen.margin.is_none_or(|m| red.margin >= m) {
        return None;
    }
    status.state = DeviceState::Degraded;
    seen.healthy = false;
    Some(margin_changed(seen, pool, status, red, source, at))
}

/// `status`, the last poll's view with one disk changed, is now the pool's
/// published state: its event, with `seen` brought up to it.
fn margin_changed(
    seen: &mut PoolSeen,
    pool: &str,
    status: PoolStatus,
    red: appliance_zfs::Redundancy,
    source: EventSource,
    at: u64,
) -> StorageEvent {
    let (st, reasons) = classify(&status, &red);
    let new_state = status.state.as_str().to_owned();
    let ev = StorageEvent::PoolState(PoolStateEvent {
        pool: pool.to_owned(),
        old_state: Some(seen.state.clone()),
        new_state: new_state.clone(),
        old_margin: seen.margin,
        new_margin: Some(red.margin),
        status: st,
        redundancy: red.summary.clone(),
        failed_devices: failed_disk_ids(&red),
        reason: if reasons.is_empty() {
            format!("pool {pool} is {new_state}")
        } else {
            reasons.join("; ")
        },
        source,
        at,
    });
    seen.state = new_state;
    seen.margin = Some(red.margin);
    seen.redundancy = red.summary;
    seen.last_status = Some(status);
    ev
}

/// A disk of `pool` works again (ZFS event: ONLINE after a fault that did
/// not last, or `zpool online`): the mirror of [`lost_redundancy`]. The
/// last poll's view gets the disk back, and a margin that rises is
/// published now. Without this the published view kept the disk failed
/// until a poll, and a real failure of the same disk in between (a pull)
/// was "no lower than" the stale margin and never published.
///
/// A disk in a replacing or spare slot is left to the poll: the slot stays
/// failed while the resilver it starts runs, which the last poll may not
/// show yet.
fn regained_redundancy(
    seen: &mut PoolSeen,
    pool: &str,
    id: &str,
    guid: Option<u64>,
    state: &DeviceState,
    source: EventSource,
    at: u64,
) -> Option<StorageEvent> {
    let mut status = seen.last_status.clone()?;
    let is_it = is_disk(id, guid);
    if in_rebuilding_slot(&status.root, &is_it) {
        return None;
    }
    let leaf = leaf_mut(&mut status.root, &is_it)?;
    if !leaf.state.is_failed() {
        return None;
    }
    leaf.state = state.clone();
    let red = redundancy(&status);
    // Published from here only a pool that had all its data and a margin:
    // one beyond its parity stays SUSPENDED or UNAVAIL until ZFS says
    // otherwise (a suspended pool's I/O waits for `zpool clear`), and one
    // whose ZFS did not answer (no margin) has no view to raise.
    let raised = seen
        .margin
        .is_some_and(|m| m >= 0 && red.margin > m && !status.state.is_failed());
    if !raised {
        // The view gets the disk back all the same, so that a later
        // failure is measured from it.
        seen.last_status = Some(status);
        return None;
    }
    // ONLINE only when nothing else keeps the pool DEGRADED (a disk
    // degraded by its errors, say); else the poll would say DEGRADED again.
    status.state = if status
        .root
        .leaves()
        .iter()
        .all(|l| l.state == DeviceState::Online)
    {
        DeviceState::Online
    } else {
        DeviceState::Degraded
    };
    Some(margin_changed(seen, pool, status, red, source, at))
}

/// Picks the leaf of the disk `id` (or of `guid`, when the event has one).
fn is_disk(id: &str, guid: Option<u64>) -> impl Fn(&Vdev) -> bool + '_ {
    move |v: &Vdev| guid.is_some_and(|g| v.guid == Some(g)) || disk_id(&v.name) == id
}

/// Whether the leaf `is_it` picks sits in a replacing or spare slot.
fn in_rebuilding_slot(v: &Vdev, is_it: &dyn Fn(&Vdev) -> bool) -> bool {
    v.children.iter().any(|c| {
        (c.children.is_empty()
            && is_it(c)
            && matches!(v.kind, VdevKind::Replacing | VdevKind::Spare))
            || in_rebuilding_slot(c, is_it)
    })
}

/// The failed disks of a layout, by disk id.
fn failed_disk_ids(red: &appliance_zfs::Redundancy) -> Vec<String> {
    red.vdevs
        .iter()
        .flat_map(|v| v.failed_devices.iter().map(|d| disk_id(d)))
        .collect()
}

/// The first leaf (a vdev without children) that `pred` accepts.
fn leaf_mut<'a>(v: &'a mut Vdev, pred: &dyn Fn(&Vdev) -> bool) -> Option<&'a mut Vdev> {
    if v.children.is_empty() {
        return pred(v).then_some(v);
    }
    v.children.iter_mut().find_map(|c| leaf_mut(c, pred))
}

#[allow(clippy::too_many_arguments)] // one flat constructor for a flat payload
fn disk_event(
    id: &str,
    action: DiskAction,
    pool: &str,
    state: &DeviceState,
    previous: Option<&DeviceState>,
    errors: DeviceErrors,
    source: EventSource,
    at: u64,
) -> StorageEvent {
    StorageEvent::Disk(DiskEvent {
        disk: id.to_owned(),
        action,
        pool: Some(pool.to_owned()),
        state: state.as_str().to_owned(),
        previous_state: previous.map(|s| s.as_str().to_owned()),
        errors,
        bay: None,
        serial: None,
        source,
        at,
    })
}
