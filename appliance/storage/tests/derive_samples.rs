//! Event derivation and the storage report on real captures from a six-disk
//! RAID-Z2 pool in QEMU (`tests/fixtures/`, copied from
//! `../shared/zfs-samples/`, OpenZFS 2.3.2).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use appliance_storage::derive::{DeriveConfig, EventDeriver, ResilverMark};
use appliance_storage::report::{pool_report, storage_report, PoolSnapshot};
use appliance_types::storage::{
    DiskAction, EventSource, ScanEventPhase, StorageEvent, StorageStatus,
};
use appliance_zfs::parse::events::{parse_zpool_events, EventItem, ZpoolEvent};
use appliance_zfs::parse::{json, text};
use appliance_zfs::PoolStatus;

fn fixture(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn text_status(state: &str) -> PoolStatus {
    let mut v =
        text::parse_zpool_status(&fixture(&format!("text/zpool-status-p.{state}.txt"))).unwrap();
    v.remove(0)
}

fn json_snapshot(state: &str, as_of: u64) -> PoolSnapshot {
    let status = json::parse_zpool_status(&fixture(&format!("json/status.{state}.json")))
        .unwrap()
        .remove(0);
    let list = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/json/zpool-list.{state}.json")),
    )
    .ok()
    .map(|s| json::parse_zpool_list(&s).unwrap().remove(0));
    let datasets = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/json/zfs-list.{state}.json")),
    )
    .ok()
    .map(|s| json::parse_zfs_list(&s).unwrap())
    .unwrap_or_default();
    PoolSnapshot {
        status,
        list,
        datasets,
        as_of,
    }
}

fn snap(status: PoolStatus, as_of: u64) -> PoolSnapshot {
    PoolSnapshot {
        status,
        list: None,
        datasets: Vec::new(),
        as_of,
    }
}

fn events_of(file: &str) -> Vec<ZpoolEvent> {
    parse_zpool_events(&fixture(file), true)
        .unwrap()
        .into_iter()
        .filter_map(|i| match i {
            EventItem::Event(e) => Some(*e),
            EventItem::Dropped(_) => None,
        })
        .collect()
}

/// A compact, comparable form of an event.
fn brief(e: &StorageEvent) -> String {
    match e {
        StorageEvent::PoolState(p) => format!(
            "{} {}->{} margin {:?}->{:?} {}",
            e.subject(),
            p.old_state.as_deref().unwrap_or("-"),
            p.new_state,
            p.old_margin,
            p.new_margin,
            p.status
        ),
        StorageEvent::Disk(d) => format!("{} {}", e.subject(), d.state),
        _ => e.subject(),
    }
}

fn briefs(v: &[StorageEvent]) -> Vec<String> {
    v.iter().map(brief).collect()
}

const T0: u64 = 1_795_375_000;

#[test]
fn removal_replacement_and_recovery_sequence_from_polling() {
    let mut d = EventDeriver::new(DeriveConfig::default());
    let steps: [(&str, &[&str]); 7] = [
        (
            "healthy",
            &["storage.pool.tank.state -->ONLINE margin None->Some(2) healthy"],
        ),
        (
            "removed1",
            &[
                "storage.pool.tank.state ONLINE->DEGRADED margin Some(2)->Some(1) degraded",
                "storage.disk.virtio-ZD2.removed REMOVED",
                // The capture ran a scrub (the one that found the checksum
                // errors, 35.0M repaired) between `healthy` and `removed1`.
                "storage.scrub.tank.finished",
            ],
        ),
        (
            "removed2",
            &[
                "storage.pool.tank.state DEGRADED->DEGRADED margin Some(1)->Some(0) critical",
                "storage.disk.virtio-ZD3.removed REMOVED",
            ],
        ),
        (
            // ZD2 replaced by ZN2 (resilver already done when polled).
            "replaced1",
            &[
                "storage.pool.tank.state DEGRADED->DEGRADED margin Some(0)->Some(1) degraded",
                "storage.disk.virtio-ZN2.added ONLINE",
                "storage.resilver.tank.finished",
            ],
        ),
        (
            "replaced2",
            &[
                "storage.pool.tank.state DEGRADED->ONLINE margin Some(1)->Some(2) healthy",
                "storage.disk.virtio-ZN3.added ONLINE",
                "storage.resilver.tank.finished",
            ],
        ),
        (
            "removed3",
            &[
                "storage.pool.tank.state ONLINE->SUSPENDED margin Some(2)->Some(-1) unavailable",
                "storage.disk.virtio-ZN3.removed REMOVED",
                "storage.disk.virtio-ZD5.removed REMOVED",
                "storage.disk.virtio-ZD6.removed REMOVED",
            ],
        ),
        (
            "recovered",
            &[
                "storage.pool.tank.state SUSPENDED->ONLINE margin Some(-1)->Some(2) healthy",
                "storage.disk.virtio-ZN3.online ONLINE",
                "storage.disk.virtio-ZD5.online ONLINE",
                "storage.disk.virtio-ZD6.online ONLINE",
                "storage.resilver.tank.finished",
            ],
        ),
    ];
    for (i, (state, want)) in steps.iter().enumerate() {
        let now = T0 + 100 * i as u64;
        let got = d.observe_snapshot(&snap(text_status(state), now), now);
        assert_eq!(briefs(&got), *want, "after {state}");
        // The same snapshot again changes nothing.
        let again = d.observe_snapshot(&snap(text_status(state), now + 5), now + 5);
        assert!(again.is_empty(), "{state} repeated: {:?}", briefs(&again));
    }
}

#[test]
fn margin_and_redundancy_string_in_pool_events() {
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("healthy"), T0), T0);
    let ev = d.observe_snapshot(&snap(text_status("removed1"), T0 + 1), T0 + 1);
    let StorageEvent::PoolState(p) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(p.redundancy, "RAID-Z2, 6 disks, 1 failed, survives 1 more");
    assert_eq!(p.failed_devices, ["virtio-ZD2"]);
    assert_eq!(p.source, EventSource::Poll);
    assert!(p.reason.contains("replace virtio-ZD2"), "{}", p.reason);
    let ev = d.observe_snapshot(&snap(text_status("removed2"), T0 + 2), T0 + 2);
    let StorageEvent::PoolState(p) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(p.redundancy, "RAID-Z2, 6 disks, 2 failed, survives no more");
    assert_eq!(p.status, StorageStatus::Critical);
}

/// Events from `zpool events -v` (statechange + removed for each disk) and the
/// polls that follow: each disk is published once, by whichever came first.
#[test]
fn zfs_events_and_polls_publish_each_change_once() {
    let events = events_of("text/zpool-events-v.removed.txt");
    let t_first = events[0].time_secs.unwrap();
    // Event first, poll second.
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("healthy"), t_first - 60), t_first - 60);
    let mut published = Vec::new();
    let mut repolls = 0;
    for e in &events {
        let out = d.observe_zfs_event(e, e.time_secs.unwrap());
        repolls += usize::from(out.repoll);
        published.extend(out.events);
    }
    // Each removal lowers the margin at once, from the event (no waiting
    // for the poll).
    assert_eq!(
        briefs(&published),
        [
            "storage.disk.virtio-ZD2.removed REMOVED",
            "storage.pool.tank.state ONLINE->DEGRADED margin Some(2)->Some(1) degraded",
            "storage.disk.virtio-ZD3.removed REMOVED",
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(1)->Some(0) critical",
        ]
    );
    assert!(published.iter().all(|e| match e {
        StorageEvent::Disk(d) => d.source == EventSource::ZfsEvent,
        StorageEvent::PoolState(p) => p.source == EventSource::ZfsEvent,
        _ => false,
    }));
    assert_eq!(
        repolls, 4,
        "statechange and removed ask for a re-poll; config_sync does not"
    );
    let t = t_first + 30;
    let after = d.observe_snapshot(&snap(text_status("removed2"), t), t);
    assert_eq!(
        briefs(&after),
        [
            // The pool state is already published: only the scrub run
            // between the `healthy` and `removed*` captures.
            "storage.scrub.tank.finished"
        ]
    );

    // Poll first, event second (and the replayed ring buffer after a
    // restart of the follower): nothing more.
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("healthy"), t_first - 60), t_first - 60);
    let polled = d.observe_snapshot(&snap(text_status("removed1"), t_first), t_first);
    assert_eq!(
        polled.len(),
        3,
        "pool state, ZD2 removed, the scrub run in between"
    );
    let mut late = Vec::new();
    for e in &events[..3] {
        late.extend(d.observe_zfs_event(e, t_first + 1).events);
    }
    assert!(late.is_empty(), "{:?}", briefs(&late));
    // ZD3's events are newer than the poll: published once, with the
    // margin it leaves.
    let mut rest = Vec::new();
    for e in &events[3..] {
        rest.extend(d.observe_zfs_event(e, t_first + 20).events);
    }
    assert_eq!(
        briefs(&rest),
        [
            "storage.disk.virtio-ZD3.removed REMOVED",
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(1)->Some(0) critical"
        ]
    );
    // The poll after it agrees: nothing more.
    let t = t_first + 30;
    let after = d.observe_snapshot(&snap(text_status("removed2"), t), t);
    assert!(
        !briefs(&after).iter().any(|b| b.contains("pool.tank.state")),
        "{:?}",
        briefs(&after)
    );
    // The same eids replayed: nothing.
    for e in &events {
        assert!(d.observe_zfs_event(e, t_first + 40).events.is_empty());
    }
}

#[test]
fn replayed_events_older_than_the_last_poll_are_ignored() {
    let events = events_of("text/zpool-events-v.removed.txt");
    let t_last = events.last().unwrap().time_secs.unwrap();
    let mut d = EventDeriver::default();
    // The pool is healthy again by now; the ring buffer still holds the
    // old removals.
    d.observe_snapshot(&snap(text_status("healthy"), t_last + 3600), t_last + 3600);
    for e in &events {
        let out = d.observe_zfs_event(e, t_last + 3601);
        assert!(out.events.is_empty());
    }
}

#[test]
fn three_disks_pulled_events_then_suspended_poll() {
    let events = events_of("text/zpool-events-v.removed3.txt");
    let first_tank = events
        .iter()
        .find(|e| e.pool.as_deref() == Some("tank"))
        .unwrap()
        .time_secs
        .unwrap();
    let mut d = EventDeriver::default();
    d.observe_snapshot(
        &snap(text_status("replaced2"), first_tank - 10),
        first_tank - 10,
    );
    let mut published = Vec::new();
    let mut repolls = 0;
    for e in &events {
        let out = d.observe_zfs_event(e, first_tank);
        repolls += usize::from(out.repoll);
        published.extend(out.events);
    }
    assert!(
        events.len() > 800,
        "the capture has a flood of io_failure ereports"
    );
    assert!(
        repolls > 800,
        "each asks for a re-poll; the manager coalesces them"
    );
    // Two removals degrade the pool at once; the third exceeds the parity,
    // which only the poll can tell apart (UNAVAIL or SUSPENDED).
    assert_eq!(
        briefs(&published),
        [
            "storage.disk.virtio-ZD5.removed REMOVED",
            "storage.pool.tank.state ONLINE->DEGRADED margin Some(2)->Some(1) degraded",
            "storage.disk.virtio-ZD6.removed REMOVED",
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(1)->Some(0) critical",
            "storage.disk.virtio-ZN3.removed REMOVED",
        ]
    );
    let t = first_tank + 30;
    let polled = d.observe_snapshot(&snap(text_status("removed3"), t), t);
    assert_eq!(
        briefs(&polled),
        ["storage.pool.tank.state DEGRADED->SUSPENDED margin Some(0)->Some(-1) unavailable"]
    );
}

#[test]
fn unresponsive_pool_is_published_once_and_recovers() {
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("healthy"), T0), T0);
    let ev = d.observe_unreachable("tank", "zpool status timed out after 30s", T0 + 10);
    assert_eq!(
        briefs(&ev),
        ["storage.pool.tank.state ONLINE->UNRESPONSIVE margin Some(2)->None unavailable"]
    );
    assert!(d.observe_unreachable("tank", "again", T0 + 20).is_empty());
    let ev = d.observe_snapshot(&snap(text_status("removed3"), T0 + 30), T0 + 30);
    assert_eq!(
        briefs(&ev)[0],
        "storage.pool.tank.state UNRESPONSIVE->SUSPENDED margin None->Some(-1) unavailable"
    );
    assert!(d.observe_unreachable("unknown-pool", "x", T0).is_empty());
    let gone = d.observe_absent("tank", T0 + 40);
    assert_eq!(gone.len(), 1);
    assert!(d.pools().is_empty());
}

#[test]
fn checksum_errors_after_scrub_are_reported_from_counters() {
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("healthy"), T0), T0);
    let ev = d.observe_snapshot(&snap(text_status("cksum"), T0 + 100), T0 + 100);
    let got = briefs(&ev);
    assert!(
        got.contains(&"storage.disk.virtio-ZD1.errors ONLINE".to_owned()),
        "{got:?}"
    );
    // The scrub that found them finished between polls: one finished event
    // carrying the repaired bytes and the device counters.
    let fin: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            StorageEvent::Scrub(s) if s.phase == ScanEventPhase::Finished => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(fin.len(), 1, "{got:?}");
    assert_eq!(fin[0].scan.repaired_bytes, 35 * 1024 * 1024);
    assert_eq!(fin[0].devices_with_errors[0].disk, "virtio-ZD1");
    assert_eq!(fin[0].devices_with_errors[0].checksum, 1191);
    // The pool state did not change (ONLINE, margin 2): no pool event.
    assert!(!ev.iter().any(|e| matches!(e, StorageEvent::PoolState(_))));
    // The report says degraded and why.
    let r = pool_report(&snap(text_status("cksum"), T0), T0);
    assert_eq!(r.status, StorageStatus::Degraded);
    assert!(
        r.reasons.iter().any(|s| s.contains("1191 checksum errors")),
        "{:?}",
        r.reasons
    );
    // More errors within the rate limit: held back, then published.
    let mut more = text_status("cksum");
    more.root.children[0].children[0].errors.checksum = 1500;
    assert!(d
        .observe_snapshot(&snap(more.clone(), T0 + 110), T0 + 110)
        .is_empty());
    let ev = d.observe_snapshot(&snap(more, T0 + 200), T0 + 200);
    assert_eq!(briefs(&ev), ["storage.disk.virtio-ZD1.errors ONLINE"]);
    let StorageEvent::Disk(e) = &ev[0] else {
        panic!()
    };
    assert_eq!(e.errors.checksum, 1500);
}

#[test]
fn scrub_progress_pause_resume_finish_from_json_captures() {
    let mut d = EventDeriver::new(DeriveConfig::default());
    let t = 1_795_376_690;
    let healthy = json_snapshot("healthy", t - 100);
    d.observe_snapshot(&healthy, t - 100);
    let running = json_snapshot("scrub-running", t);
    let ev = d.observe_snapshot(&running, t);
    assert_eq!(briefs(&ev), ["storage.scrub.tank.progress"]);
    // Rate limit: the same progress a few seconds later is not republished.
    assert!(d.observe_snapshot(&running, t + 3).is_empty());
    let ev = d.observe_snapshot(&json_snapshot("scrub-paused", t + 8), t + 8);
    assert_eq!(briefs(&ev), ["storage.scrub.tank.paused"]);
    assert!(d
        .observe_snapshot(&json_snapshot("scrub-paused", t + 9), t + 9)
        .is_empty());
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 10), t + 10);
    assert_eq!(briefs(&ev), ["storage.scrub.tank.progress"], "resume");
    let ev = d.observe_snapshot(&json_snapshot("scrub-done", t + 30), t + 30);
    assert_eq!(briefs(&ev), ["storage.scrub.tank.finished"]);
    let StorageEvent::Scrub(s) = &ev[0] else {
        panic!()
    };
    assert_eq!(s.scan.ended_at, Some(1_795_376_712));
    assert_eq!(s.scan.errors, 0);
    assert!((s.scan.percent - 100.0).abs() < 1e-9);
    assert!(d
        .observe_snapshot(&json_snapshot("scrub-done", t + 40), t + 40)
        .is_empty());
}

#[test]
fn scrub_progress_is_rate_limited() {
    let cfg = DeriveConfig::default();
    let mut d = EventDeriver::new(cfg);
    let t = 1_795_376_690;
    let mut s = json_snapshot("scrub-running", t);
    let total = {
        let sc = s.status.scan.as_ref().unwrap();
        sc.to_examine - sc.skipped
    };
    let mut published = 0;
    // 1000 polls one second apart, progress 0.1 % per poll.
    for i in 0..1000u64 {
        let sc = s.status.scan.as_mut().unwrap();
        sc.issued = total * i / 1000;
        sc.pass_issued = sc.issued;
        published += d.observe_snapshot(&s, t + i).len();
    }
    // 100 % in 1000 s at 1 point per 10 s: about 100 events, never one per poll.
    assert!((90..=101).contains(&published), "{published}");
    // No progress at all: one event per max silence.
    let mut d = EventDeriver::new(cfg);
    let s = json_snapshot("scrub-running", t);
    let mut n = 0;
    for i in 0..=600u64 {
        n += d
            .observe_snapshot(&s, t + i)
            .iter()
            .filter(|e| matches!(e, StorageEvent::Scrub(_)))
            .count();
    }
    assert_eq!(n, 3, "first sight, then every 300 s");
}

#[test]
fn finished_scrub_at_start_up_is_published_only_if_newer_than_persisted() {
    let t = 1_795_376_800;
    let done = json_snapshot("scrub-done", t);
    // Never persisted: a pool seen for the first time; its old scrub is
    // history, not news.
    let mut d = EventDeriver::default();
    let ev = d.observe_snapshot(&done, t);
    assert!(!ev.iter().any(|e| matches!(e, StorageEvent::Scrub(_))));
    // Persisted completion older than the scrub: the daemon was down when
    // it finished; publish it.
    let mut d = EventDeriver::default();
    d.set_known_scrub_end("tank", 1_795_000_000);
    let ev = d.observe_snapshot(&done, t);
    assert!(briefs(&ev).contains(&"storage.scrub.tank.finished".to_owned()));
    // Persisted completion equal: already known.
    let mut d = EventDeriver::default();
    d.set_known_scrub_end("tank", 1_795_376_712);
    let ev = d.observe_snapshot(&done, t);
    assert!(!ev.iter().any(|e| matches!(e, StorageEvent::Scrub(_))));
}

/// The first scrub of a pool, under way when the manager stopped, ended
/// while it was down: with the open mark its `finished` is published at
/// first sight though no completion was persisted before; once ended, the
/// mark closes.
#[test]
fn a_scrub_open_before_a_restart_is_finished_at_first_sight() {
    let t = 1_795_376_800;
    let mut before = EventDeriver::default();
    before.observe_snapshot(&json_snapshot("scrub-running", t - 100), t - 100);
    assert!(before.scrub_open("tank"));

    let mut after = EventDeriver::default();
    after.set_scrub_open("tank", true);
    let ev = after.observe_snapshot(&json_snapshot("scrub-done", t), t);
    assert!(
        briefs(&ev).contains(&"storage.scrub.tank.finished".to_owned()),
        "{:?}",
        briefs(&ev)
    );
    assert!(!after.scrub_open("tank"));

    // An open mark and an equal persisted end: that end was published.
    let mut again = EventDeriver::default();
    again.set_scrub_open("tank", true);
    again.set_known_scrub_end("tank", 1_795_376_712);
    let ev = again.observe_snapshot(&json_snapshot("scrub-done", t), t);
    assert!(!ev.iter().any(|e| matches!(e, StorageEvent::Scrub(_))));

    // A pool exported mid-scrub keeps the mark until it is back.
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("scrub-running", t - 100), t - 100);
    d.observe_absent("tank", t - 50);
    assert!(d.scrub_open("tank"));
    let ev = d.observe_snapshot(&json_snapshot("scrub-done", t), t);
    assert!(briefs(&ev).contains(&"storage.scrub.tank.finished".to_owned()));
}

/// A resilver replaces a running scrub's scan stats (ZFS restarts the
/// scrub as a resilver): the scrub's end goes out as canceled before the
/// resilver's start, once; also at first sight with the open mark.
#[test]
fn a_scrub_replaced_by_a_resilver_is_canceled() {
    let t = 1_795_376_800;
    let scrub_ends = |ev: &[StorageEvent]| {
        briefs(ev)
            .into_iter()
            .filter(|b| b.starts_with("storage.scrub.tank."))
            .collect::<Vec<_>>()
    };
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("scrub-running", t - 100), t - 100);
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t), t);
    let b = briefs(&ev);
    let canceled = b
        .iter()
        .position(|x| x.starts_with("storage.scrub.tank.canceled"));
    let started = b
        .iter()
        .position(|x| x.starts_with("storage.resilver.tank.started"));
    assert!(canceled.is_some() && canceled < started, "{b:?}");
    assert!(!d.scrub_open("tank"));
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 10), t + 10);
    assert!(scrub_ends(&ev).is_empty(), "{:?}", briefs(&ev));

    let mut after = EventDeriver::default();
    after.set_scrub_open("tank", true);
    let ev = after.observe_snapshot(&json_snapshot("resilvering", t), t);
    assert_eq!(scrub_ends(&ev).len(), 1, "{:?}", briefs(&ev));
    assert!(!after.scrub_open("tank"));
}

#[test]
fn replace_and_resilver_from_json_captures() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    assert_eq!(
        briefs(&ev),
        [
            "storage.disk.virtio-ZN2.added ONLINE",
            "storage.resilver.tank.started",
            "storage.resilver.tank.progress",
        ],
        "resilvering: the replacing vdev keeps the pool at margin 0, so no pool event"
    );
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t + 70), t + 70);
    assert_eq!(
        briefs(&ev),
        [
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(0)->Some(1) degraded",
            "storage.resilver.tank.finished",
        ]
    );
    let StorageEvent::Resilver(r) = &ev[1] else {
        panic!()
    };
    assert_eq!(r.scan.repaired_bytes, 109_031_424);
}

#[test]
fn resilver_start_event_is_not_repeated_by_the_poll() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let start = resilver_zfs_event("resilver_start", 9, t + 47);
    let out = d.observe_zfs_event(&start, t + 47);
    assert!(out.repoll);
    assert_eq!(briefs(&out.events), ["storage.resilver.tank.started"]);
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    assert_eq!(
        briefs(&ev),
        [
            "storage.disk.virtio-ZN2.added ONLINE",
            "storage.resilver.tank.progress"
        ]
    );
}

fn resilver_zfs_event(class: &str, eid: u64, at: u64) -> ZpoolEvent {
    ZpoolEvent {
        class: format!("sysevent.fs.zfs.{class}"),
        time_text: String::new(),
        time_secs: Some(at),
        time_nanos: None,
        eid: Some(eid),
        pool: Some("tank".into()),
        pool_guid: None,
        vdev_guid: None,
        vdev_path: None,
        vdev_state: None,
        vdev_laststate: None,
        fields: Default::default(),
        fields_dropped: 0,
    }
}

/// Two resilvers in a row, the first never seen by a poll (its scan stats
/// were replaced by a scrub before the next poll): the first one's end and
/// the second one's start are both published.
#[test]
fn a_resilver_after_one_no_poll_saw_end_is_published_as_started() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 20, t + 1), t + 1);
    assert_eq!(briefs(&out.events), ["storage.resilver.tank.started"]);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 21, t + 2), t + 2);
    assert!(out.repoll);
    assert!(
        out.events.is_empty(),
        "the poll it asks for publishes the end"
    );
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 25, t + 8), t + 8);
    assert_eq!(
        briefs(&out.events),
        [
            "storage.resilver.tank.finished",
            "storage.resilver.tank.started"
        ]
    );
    // The same event delivered twice is still one start.
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 25, t + 8), t + 8);
    assert!(out.events.is_empty());
}

#[test]
fn heartbeat_only_for_healthy_pools_at_the_interval() {
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("healthy", T0), T0);
    let hb = d.tick(T0);
    assert_eq!(briefs(&hb), ["storage.pool.tank.healthy"]);
    let StorageEvent::PoolHealthy(h) = &hb[0] else {
        panic!()
    };
    assert_eq!(h.margin, 2);
    assert_eq!(h.free_bytes, 730_048_136);
    assert!(d.tick(T0 + 899).is_empty());
    assert_eq!(d.tick(T0 + 900).len(), 1);
    d.observe_snapshot(&json_snapshot("removed1", T0 + 901), T0 + 901);
    assert!(
        d.tick(T0 + 5000).is_empty(),
        "degraded pools get no heartbeat"
    );
}

#[test]
fn report_from_json_captures() {
    let h = json_snapshot("healthy", T0);
    let r = storage_report(std::slice::from_ref(&h), T0, None);
    assert_eq!(r.status, StorageStatus::Healthy);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 0 failed, survives 2 more");
    assert_eq!(r.used_bytes, 119_036_280);
    assert_eq!(r.free_bytes, 730_048_136);
    assert_eq!(r.total_bytes, 119_036_280 + 730_048_136);
    assert!((r.free_tb - 0.001).abs() < 1e-12);
    let p = &r.pools[0];
    assert_eq!(p.raw_size_bytes, 1_476_395_008);
    let docs = p
        .datasets
        .iter()
        .find(|d| d.name == "tank/documents")
        .unwrap();
    assert!(docs.encrypted);
    assert_eq!(docs.key_loaded, Some(true));
    assert_eq!(p.datasets.len(), 4);

    let r = storage_report(&[json_snapshot("removed1", T0)], T0, None);
    assert_eq!(r.status, StorageStatus::Degraded);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 1 failed, survives 1 more");
    let r = storage_report(&[json_snapshot("removed2", T0)], T0, None);
    assert_eq!(r.status, StorageStatus::Critical);
    let r = storage_report(&[json_snapshot("resilvering", T0)], T0, None);
    assert_eq!(r.status, StorageStatus::Critical);
    assert!(
        r.reasons.iter().any(|s| s.contains("resilver in progress")),
        "{:?}",
        r.reasons
    );
    let r = storage_report(&[snap(text_status("removed3"), T0)], T0, None);
    assert_eq!(r.status, StorageStatus::Unavailable);
    assert!(r.reasons[0].contains("SUSPENDED"), "{:?}", r.reasons);
    let r = storage_report(&[], T0, None);
    assert_eq!(r.status, StorageStatus::Unavailable);
    let r = storage_report(&[h], T0 + 60, Some("zpool status timed out"));
    assert_eq!(r.status, StorageStatus::Unavailable);
    assert_eq!(r.as_of, T0);
    assert!(r.reasons[0].contains("last known state"));
}

#[test]
fn disk_pulled_actions() {
    let mut d = EventDeriver::default();
    let ev = d.observe_snapshot(&snap(text_status("removed2"), T0), T0);
    // First sight of an already degraded pool: the failed disks are
    // published so that a restart misses nothing.
    let disks: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            StorageEvent::Disk(x) => Some((x.disk.clone(), x.action)),
            _ => None,
        })
        .collect();
    assert_eq!(
        disks,
        [
            ("virtio-ZD2".to_owned(), DiskAction::Removed),
            ("virtio-ZD3".to_owned(), DiskAction::Removed)
        ]
    );
}

/// A disk pulled from an idle pool: udev says it is gone, ZFS still reports
/// it ONLINE (ZED has not asked ZFS to mark it and no I/O has failed yet).
#[test]
fn a_disk_udev_saw_go_degrades_the_pool_before_zfs_notices() {
    use appliance_storage::derive::mark_gone;
    use std::collections::BTreeSet;
    let healthy = text_status("healthy");
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(healthy.clone(), T0), T0);

    let first = d.observe_disk_gone("tank", "virtio-ZD2", T0 + 1);
    assert_eq!(
        briefs(&first),
        [
            "storage.disk.virtio-ZD2.removed REMOVED",
            "storage.pool.tank.state ONLINE->DEGRADED margin Some(2)->Some(1) degraded",
        ]
    );
    assert!(first.iter().all(|e| match e {
        StorageEvent::Disk(d) => d.source == EventSource::Udev,
        StorageEvent::PoolState(p) => p.source == EventSource::Udev,
        _ => false,
    }));
    assert!(
        d.observe_disk_gone("tank", "virtio-ZD2", T0 + 2).is_empty(),
        "once"
    );
    assert!(d
        .observe_disk_gone("tank", "virtio-NOTMINE", T0 + 2)
        .is_empty());
    assert!(d
        .observe_disk_gone("other", "virtio-ZD2", T0 + 2)
        .is_empty());

    // The polls after it, where ZFS still says ONLINE, agree once the gone
    // disk is marked: nothing flips back.
    let mut gone = BTreeSet::from(["virtio-ZD2".to_owned()]);
    let mut polled = healthy.clone();
    assert!(mark_gone(&mut polled, &gone));
    assert_eq!(polled.state.as_str(), "DEGRADED");
    assert_eq!(polled.root.children[0].state.as_str(), "DEGRADED");
    let again = d.observe_snapshot(&snap(polled, T0 + 10), T0 + 10);
    assert!(briefs(&again).is_empty(), "{:?}", briefs(&again));

    // ZFS noticing later (REMOVED in its own status) changes nothing either.
    let zfs = text_status("removed1");
    let mut marked = zfs.clone();
    assert!(!mark_gone(&mut marked, &gone), "ZFS already has it failed");
    assert_eq!(marked, zfs);

    // Two more gone exceed RAID-Z2's parity: UNAVAIL, not DEGRADED.
    gone.extend(["virtio-ZD3".to_owned(), "virtio-ZD4".to_owned()]);
    let mut three = healthy.clone();
    assert!(mark_gone(&mut three, &gone));
    assert_eq!(three.state.as_str(), "UNAVAIL");
    let lost = d.observe_snapshot(&snap(three, T0 + 20), T0 + 20);
    assert_eq!(
        briefs(&lost)
            .iter()
            .filter(|b| b.contains("pool.tank.state"))
            .collect::<Vec<_>>(),
        ["storage.pool.tank.state DEGRADED->UNAVAIL margin Some(1)->Some(-1) unavailable"]
    );

    // A state ZFS already reports is kept (SUSPENDED says more).
    let mut suspended = text_status("removed3");
    let before = suspended.state.clone();
    mark_gone(&mut suspended, &gone);
    assert_eq!(suspended.state, before);

    // Nothing gone, or a disk of no pool: no change.
    let mut h = healthy.clone();
    assert!(!mark_gone(&mut h, &BTreeSet::new()));
    assert!(!mark_gone(&mut h, &BTreeSet::from(["virtio-X".to_owned()])));
    assert_eq!(h, healthy);
}

fn statechange(guid: u64, state: appliance_zfs::DeviceState, at: u64) -> ZpoolEvent {
    ZpoolEvent {
        class: "resource.fs.zfs.statechange".into(),
        time_secs: Some(at),
        vdev_guid: Some(guid),
        vdev_state: Some(state),
        // One event id per second of the test.
        ..resilver_zfs_event("statechange", at, at)
    }
}

/// A disk back ONLINE between polls raises the margin at once; one in a
/// replacing slot does not (the slot stays failed while it resilvers), and
/// is left to the poll.
#[test]
fn a_disk_back_online_raises_the_margin_unless_it_is_being_replaced() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("resilvering", t), t);
    assert_eq!(
        d.published_state("tank"),
        Some(("DEGRADED".into(), Some(0)))
    );
    // virtio-ZD2, in replacing-1.
    let out = d.observe_zfs_event(
        &statechange(
            6_864_561_248_277_661_160,
            appliance_zfs::DeviceState::Online,
            t + 5,
        ),
        t + 5,
    );
    assert_eq!(
        briefs(&out.events),
        ["storage.disk.virtio-ZD2.online ONLINE"]
    );
    assert_eq!(
        d.published_state("tank"),
        Some(("DEGRADED".into(), Some(0)))
    );
    // virtio-ZD3, a slot of its own.
    let out = d.observe_zfs_event(
        &statechange(
            17_397_665_615_335_231_211,
            appliance_zfs::DeviceState::Online,
            t + 6,
        ),
        t + 6,
    );
    assert_eq!(
        briefs(&out.events),
        [
            "storage.disk.virtio-ZD3.online ONLINE",
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(0)->Some(1) degraded",
        ]
    );
    assert_eq!(
        d.published_state("tank"),
        Some(("DEGRADED".into(), Some(1)))
    );
}

/// A poll is as of when it read ZFS, not when it was applied: a ZFS event
/// from while the poll ran (and so possibly missing from it) is applied
/// when it arrives, not skipped until the next poll.
#[test]
fn an_event_from_while_a_poll_ran_is_applied() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    // Read at t, applied 5 s later (a slow poll under load).
    d.observe_snapshot(&json_snapshot("resilvering", t), t + 5);
    // virtio-ZD3 back at t + 2, delivered after the poll was applied.
    let out = d.observe_zfs_event(
        &statechange(
            17_397_665_615_335_231_211,
            appliance_zfs::DeviceState::Online,
            t + 2,
        ),
        t + 6,
    );
    assert!(out.repoll);
    assert_eq!(
        briefs(&out.events),
        [
            "storage.disk.virtio-ZD3.online ONLINE",
            "storage.pool.tank.state DEGRADED->DEGRADED margin Some(0)->Some(1) degraded",
        ]
    );
    // One from before the poll read ZFS is in the poll already.
    let out = d.observe_zfs_event(
        &statechange(
            17_397_665_615_335_231_211,
            appliance_zfs::DeviceState::Removed,
            t - 1,
        ),
        t + 7,
    );
    assert!(out.events.is_empty());
}

/// The briefs of the pool events among `ev`.
fn pool_briefs(ev: &[StorageEvent]) -> Vec<String> {
    briefs(ev)
        .into_iter()
        .filter(|b| b.starts_with("storage.pool."))
        .collect()
}

fn path_statechange(disk: &str, state: appliance_zfs::DeviceState, at: u64) -> ZpoolEvent {
    ZpoolEvent {
        class: "resource.fs.zfs.statechange".into(),
        vdev_path: Some(format!("/dev/disk/by-id/{disk}-part1")),
        vdev_state: Some(state),
        ..resilver_zfs_event("statechange", at, at)
    }
}

/// A SUSPENDED pool stays suspended until `zpool clear`, whatever disk comes
/// back: the return is left to the poll, as a loss beyond the parity is
/// (review: its first version published DEGRADED).
#[test]
fn a_disk_back_leaves_a_suspended_pool_to_the_poll() {
    let t = T0;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("removed3"), t), t);
    assert_eq!(
        d.published_state("tank"),
        Some(("SUSPENDED".into(), Some(-1)))
    );
    let out = d.observe_zfs_event(
        &path_statechange("virtio-ZD6", appliance_zfs::DeviceState::Online, t + 5),
        t + 5,
    );
    let pool_events = pool_briefs(&out.events);
    assert!(
        pool_events.is_empty(),
        "a suspended pool published as writable: {pool_events:?}"
    );
    assert_eq!(d.published_state("tank").unwrap().0, "SUSPENDED");
}

/// ZFS not answering (UNRESPONSIVE, margin None): a ZFS event must not
/// publish a pool state computed from the last poll before the outage
/// (review: its first version did).
#[test]
fn a_disk_back_does_not_end_unresponsive() {
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(text_status("removed1"), T0), T0);
    d.observe_unreachable("tank", "zpool status timed out after 30s", T0 + 10);
    let out = d.observe_zfs_event(
        &path_statechange("virtio-ZD2", appliance_zfs::DeviceState::Online, T0 + 20),
        T0 + 20,
    );
    let pool_events = pool_briefs(&out.events);
    assert!(
        pool_events.is_empty(),
        "UNRESPONSIVE ended by a stale view: {pool_events:?}"
    );
    assert_eq!(d.published_state("tank").unwrap().0, "UNRESPONSIVE");
}

/// ZFS keeps the pool DEGRADED while another disk is DEGRADED (too many
/// errors, still counted as working): the return of the removed disk must
/// not publish ONLINE, which the poll it triggers then takes back (review).
#[test]
fn a_disk_back_keeps_degraded_while_another_disk_is_degraded() {
    let mut st = text_status("removed1");
    // virtio-ZD3 DEGRADED (e.g. faulted for checksum errors by ZED: not
    // failed for the redundancy count), the pool DEGRADED because of it.
    st.root.children[0].children[2].state = appliance_zfs::DeviceState::Degraded;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&snap(st.clone(), T0), T0);
    assert_eq!(d.published_state("tank").unwrap().0, "DEGRADED");
    let out = d.observe_zfs_event(
        &path_statechange("virtio-ZD2", appliance_zfs::DeviceState::Online, T0 + 5),
        T0 + 5,
    );
    // ZFS's own view after the return: ZD2 ONLINE, pool still DEGRADED.
    let mut after = st;
    after.root.children[0].children[1].state = appliance_zfs::DeviceState::Online;
    let polled = d.observe_snapshot(&snap(after, T0 + 6), T0 + 6);
    let all = [pool_briefs(&out.events), pool_briefs(&polled)].concat();
    assert!(
        all.iter().all(|b| !b.contains("->ONLINE")),
        "published ONLINE for a DEGRADED pool: {all:?}"
    );
}

fn resilver_phases(ev: &[StorageEvent]) -> Vec<ScanEventPhase> {
    ev.iter()
        .filter_map(|e| match e {
            StorageEvent::Resilver(r) => Some(r.phase),
            _ => None,
        })
        .collect()
}

/// A resilver whose `started` went out before a restart and which ended
/// while the manager was down: the restarted deriver, seeded with the mark,
/// publishes its end at first sight, once.
#[test]
fn a_resilver_that_ended_while_nobody_watched_is_finished_after_a_restart() {
    let t = 1_795_376_700;
    let mut before = EventDeriver::default();
    before.observe_snapshot(&json_snapshot("removed2", t), t);
    before.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    let mark = before.resilver_mark("tank").unwrap();
    assert!(mark.open, "{mark:?}");

    let mut after = EventDeriver::default();
    after.set_resilver_mark("tank", mark);
    let ev = after.observe_snapshot(&json_snapshot("resilvered", t + 400), t + 400);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
    let StorageEvent::Resilver(r) = ev
        .iter()
        .find(|e| e.subject() == "storage.resilver.tank.finished")
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.scan.repaired_bytes, 109_031_424);
    let closed = after.resilver_mark("tank").unwrap();
    assert!(!closed.open);
    assert!(closed.last_end.is_some());

    // The next restart knows that end and publishes nothing of it.
    let mut again = EventDeriver::default();
    again.set_resilver_mark("tank", closed);
    let ev = again.observe_snapshot(&json_snapshot("resilvered", t + 900), t + 900);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));

    // Without a mark (a first start, or a book from before marks), an ended
    // resilver is history and is not published.
    let mut fresh = EventDeriver::default();
    let ev = fresh.observe_snapshot(&json_snapshot("resilvered", t + 900), t + 900);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
    assert_eq!(
        fresh.resilver_mark("tank").unwrap().last_end,
        closed.last_end
    );
}

/// A resilver whose `started` went out before a restart and that still runs
/// after it (or again: ZFS restarts a resilver when another disk needs it,
/// which a running deriver also takes for the same one): the restart
/// publishes its progress, not a second `started`; its one `finished`
/// follows when it ends. The same for a pool exported and imported again.
#[test]
fn a_resilver_still_running_after_a_restart_is_not_started_again() {
    let t = 1_795_376_700;
    let mut before = EventDeriver::default();
    before.observe_snapshot(&json_snapshot("removed2", t), t);
    let ev = before.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Started, ScanEventPhase::Progress]
    );
    let mark = before.resilver_mark("tank").unwrap();

    let mut after = EventDeriver::default();
    after.set_resilver_mark("tank", mark);
    let ev = after.observe_snapshot(&json_snapshot("resilvering", t + 200), t + 200);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Progress],
        "{:?}",
        briefs(&ev)
    );
    assert!(after.resilver_mark("tank").unwrap().open);
    // A `resilver_start` the event follower replays from the kernel's ring
    // is not a new resilver either.
    let out = after.observe_zfs_event(&resilver_zfs_event("resilver_start", 20, t + 40), t + 201);
    assert!(out.events.is_empty(), "{:?}", briefs(&out.events));
    let ev = after.observe_snapshot(&json_snapshot("resilvered", t + 400), t + 400);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
    assert!(!after.resilver_mark("tank").unwrap().open);

    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    d.observe_absent("tank", t + 60);
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 200), t + 200);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Progress],
        "{:?}",
        briefs(&ev)
    );
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t + 400), t + 400);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
}

/// A resilver that started and ended while the manager was down, after one
/// it knew the end of: its end is published at first sight.
#[test]
fn a_resilver_newer_than_the_last_known_end_is_finished_at_first_sight() {
    let t = 1_795_376_700;
    let mut probe = EventDeriver::default();
    probe.observe_snapshot(&json_snapshot("resilvered", t), t);
    let end = probe.resilver_mark("tank").unwrap().last_end.unwrap();

    let mut d = EventDeriver::default();
    d.set_resilver_mark(
        "tank",
        ResilverMark {
            open: false,
            last_end: Some(end - 3600),
        },
    );
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t), t);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
    assert_eq!(d.resilver_mark("tank").unwrap().last_end, Some(end));
}

/// A pool exported during a resilver and imported after it ended: the end
/// is published when the pool is back.
#[test]
fn a_resilver_that_ended_while_the_pool_was_away_is_finished_on_its_return() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    d.observe_absent("tank", t + 60);
    assert!(d.resilver_mark("tank").unwrap().open);
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t + 400), t + 400);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
}

/// ZED starts a scrub as soon as a resilver ends, and the next poll shows
/// the scrub: the resilver's `finished` is published from the last poll
/// that showed it running, once; the mark stays open until then.
#[test]
fn a_resilver_whose_scan_stats_a_scrub_replaced_is_still_finished() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 30, t + 60), t + 60);
    assert!(out.events.is_empty());
    assert!(d.resilver_mark("tank").unwrap().open);
    // A poll that read ZFS before the end still shows it running.
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 55), t + 61);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 70), t + 70);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Finished],
        "{:?}",
        briefs(&ev)
    );
    let StorageEvent::Resilver(r) = ev
        .iter()
        .find(|e| e.subject() == "storage.resilver.tank.finished")
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.scan.ended_at, Some(t + 60));
    assert!((r.scan.percent - 100.0).abs() < f64::EPSILON);
    assert!(
        r.scan.total_bytes > 0,
        "figures of the last poll: {:?}",
        r.scan
    );
    assert!(!d.resilver_mark("tank").unwrap().open);
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 90), t + 90);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
}

/// When the poll after `resilver_finish` shows the ended resilver, its
/// `finished` comes from that poll, once.
#[test]
fn a_resilver_end_reported_by_zfs_is_published_once_by_the_poll() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 30, t + 60), t + 60);
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t + 70), t + 70);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
    let StorageEvent::Resilver(r) = ev
        .iter()
        .find(|e| e.subject() == "storage.resilver.tank.finished")
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.scan.repaired_bytes, 109_031_424);
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 90), t + 90);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
}

/// A resilver whose `started` went out before a restart, which ended while
/// the manager was down, and whose scan stats a scrub (ZED's) replaced
/// since: the restarted deriver cannot read its end, but it knows the
/// resilver ended, and publishes its `finished` once.
#[test]
fn a_resilver_a_scrub_replaced_while_nobody_watched_is_finished_after_a_restart() {
    let t = 1_795_376_700;
    let mut before = EventDeriver::default();
    before.observe_snapshot(&json_snapshot("removed2", t), t);
    before.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    let mark = before.resilver_mark("tank").unwrap();
    assert!(mark.open, "{mark:?}");

    let mut after = EventDeriver::default();
    after.set_resilver_mark("tank", mark);
    let ev = after.observe_snapshot(&json_snapshot("scrub-running", t + 400), t + 400);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Finished],
        "{:?}",
        briefs(&ev)
    );
    assert!(!after.resilver_mark("tank").unwrap().open);
    let ev = after.observe_snapshot(&json_snapshot("scrub-running", t + 460), t + 460);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
}

/// The same without a restart, when no `resilver_finish` came before the
/// poll that shows the scrub (the event follower down, or behind): the
/// poll alone tells the resilver ended, since ZFS runs one scan at a time.
/// The event that comes late is older than that poll and is ignored.
#[test]
fn a_resilver_a_scrub_replaced_is_finished_without_its_zfs_event() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Started, ScanEventPhase::Progress]
    );
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 70), t + 70);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Finished],
        "{:?}",
        briefs(&ev)
    );
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 30, t + 60), t + 71);
    assert!(out.events.is_empty(), "{:?}", briefs(&out.events));
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 90), t + 90);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
    assert!(!d.resilver_mark("tank").unwrap().open);
}

/// A resilver whose `started` came from its ZFS event, and a poll that read
/// ZFS while it ran but is applied after its `resilver_finish`: that poll
/// shows it running, yet it is the same resilver, not a new one to publish
/// as started again (and whose mark would then stay open for good).
#[test]
fn a_poll_older_than_a_resilver_finish_does_not_start_it_again() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 20, t + 10), t + 10);
    assert_eq!(briefs(&out.events), ["storage.resilver.tank.started"]);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 21, t + 20), t + 20);
    assert!(out.events.is_empty());
    // Read at t + 15, applied at t + 21.
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 15), t + 21);
    assert!(
        !resilver_phases(&ev).contains(&ScanEventPhase::Started),
        "{:?}",
        briefs(&ev)
    );
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 30), t + 30);
    assert_eq!(
        resilver_phases(&ev),
        [ScanEventPhase::Finished],
        "{:?}",
        briefs(&ev)
    );
    assert!(!d.resilver_mark("tank").unwrap().open);
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 90), t + 90);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
}

/// A resilver ends (`resilver_finish`) and another starts before the next
/// poll, which shows the new one running before its `resilver_start` came
/// (that event, then older than the poll, is ignored): the first one's
/// `finished` goes out before the second one's `started`, and each once.
#[test]
fn a_new_resilver_a_poll_shows_first_publishes_the_last_ones_end_first() {
    let t = 1_795_376_700;
    let mut d = EventDeriver::default();
    d.observe_snapshot(&json_snapshot("removed2", t), t);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 20, t + 1), t + 1);
    assert_eq!(briefs(&out.events), ["storage.resilver.tank.started"]);
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_finish", 21, t + 2), t + 2);
    assert!(out.events.is_empty());
    let ev = d.observe_snapshot(&json_snapshot("resilvering", t + 50), t + 50);
    assert_eq!(
        resilver_phases(&ev),
        [
            ScanEventPhase::Finished,
            ScanEventPhase::Started,
            ScanEventPhase::Progress
        ],
        "{:?}",
        briefs(&ev)
    );
    let out = d.observe_zfs_event(&resilver_zfs_event("resilver_start", 22, t + 40), t + 51);
    assert!(out.events.is_empty(), "{:?}", briefs(&out.events));
    let ev = d.observe_snapshot(&json_snapshot("resilvered", t + 400), t + 400);
    assert_eq!(resilver_phases(&ev), [ScanEventPhase::Finished]);
    let ev = d.observe_snapshot(&json_snapshot("scrub-running", t + 500), t + 500);
    assert!(resilver_phases(&ev).is_empty(), "{:?}", briefs(&ev));
    assert!(!d.resilver_mark("tank").unwrap().open);
}
