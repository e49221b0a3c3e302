//! Parsers and redundancy on real output captured from a six-disk RAID-Z2
//! pool in QEMU (`tests/fixtures/`, copied from `../shared/zfs-samples/`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use appliance_zfs::parse::events::{parse_zpool_events, EventItem, ZpoolEvent};
use appliance_zfs::parse::{json, text};
use appliance_zfs::{
    redundancy, DeviceState, Encryption, KeyStatus, PoolStatus, PropertySource, RedundancyLevel,
    ScanFunction, ScanState, VdevKind,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(rel: &str) -> String {
    let p = fixture_dir().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// `../shared/zfs-samples`, which CI also has. Missing is a failure, not a
/// skip: the sweep below is how new captures get covered.
fn shared_samples_dir() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/zfs-samples");
    assert!(
        p.is_dir(),
        "{} is missing: the shared ZFS captures must sit beside the repository",
        p.display()
    );
    p
}

fn status_text(v: &str, state: &str) -> PoolStatus {
    let mut pools =
        text::parse_zpool_status(&fixture(&format!("openzfs-{v}/zpool-status-p.{state}.txt")))
            .unwrap();
    assert_eq!(pools.len(), 1);
    pools.remove(0)
}

fn status_json(state: &str) -> PoolStatus {
    let mut pools = json::parse_zpool_status(&fixture(&format!(
        "openzfs-2.3.2-json/zpool_status_-j_--json-int.{state}.json"
    )))
    .unwrap();
    assert_eq!(pools.len(), 1);
    pools.remove(0)
}

fn status_json_flat(state: &str) -> PoolStatus {
    let mut pools = json::parse_zpool_status(&fixture(&format!(
        "openzfs-2.3.2-json/zpool_status_-j_--json-int_--json-flat-vdevs.{state}.json"
    )))
    .unwrap();
    pools.remove(0)
}

fn leaf_states(p: &PoolStatus) -> Vec<(String, DeviceState)> {
    p.root
        .leaves()
        .into_iter()
        .map(|v| (v.name.clone(), v.state.clone()))
        .collect()
}

fn failed_names(p: &PoolStatus) -> Vec<String> {
    p.root
        .leaves()
        .into_iter()
        .filter(|v| v.state.is_failed())
        .map(|v| v.name.clone())
        .collect()
}

// ---------------------------------------------------------------- 2.1 text

#[test]
fn text_healthy_both_versions() {
    for v in ["2.1.11", "2.3.2"] {
        let p = status_text(v, "healthy");
        assert_eq!(p.name, "tank");
        assert_eq!(p.state, DeviceState::Online);
        let top = &p.root.children[0];
        assert_eq!(top.name, "raidz2-0");
        assert_eq!(top.kind, VdevKind::Raidz { parity: 2 });
        let names: Vec<_> = top.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio-ZD1",
                "virtio-ZD2",
                "virtio-ZD3",
                "virtio-ZD4",
                "virtio-ZD5",
                "virtio-ZD6"
            ]
        );
        assert!(p.devices_with_errors().is_empty());
        let scan = p.scan.as_ref().unwrap();
        assert_eq!(scan.function, ScanFunction::Scrub);
        assert_eq!(scan.state, ScanState::Finished);
        assert_eq!(scan.processed, 0);
        assert_eq!(scan.elapsed_secs, Some(if v == "2.1.11" { 1 } else { 2 }));
        assert_eq!(scan.errors, 0);
        assert_eq!(p.data_errors, Some(0));
        let r = redundancy(&p);
        assert_eq!(r.margin, 2);
        assert_eq!(r.level, RedundancyLevel::Full);
        assert_eq!(r.summary, "RAID-Z2, 6 disks, 0 failed, survives 2 more");
    }
}

#[test]
fn text_removed_one_two_three() {
    for v in ["2.1.11", "2.3.2"] {
        let p = status_text(v, "removed1");
        assert_eq!(p.state, DeviceState::Degraded);
        assert_eq!(failed_names(&p), ["virtio-ZD2"]);
        assert_eq!(p.root.children[0].state, DeviceState::Degraded);
        assert!(p
            .status
            .as_deref()
            .unwrap()
            .contains("removed by the administrator"));
        let r = redundancy(&p);
        assert_eq!((r.failed, r.margin), (1, 1));
        assert_eq!(r.summary, "RAID-Z2, 6 disks, 1 failed, survives 1 more");
        assert_eq!(r.level, RedundancyLevel::Reduced);

        let p = status_text(v, "removed2");
        assert_eq!(failed_names(&p), ["virtio-ZD2", "virtio-ZD3"]);
        let r = redundancy(&p);
        assert_eq!((r.failed, r.margin), (2, 0));
        assert_eq!(r.level, RedundancyLevel::Exhausted);
        assert_eq!(r.summary, "RAID-Z2, 6 disks, 2 failed, survives no more");

        let p = status_text(v, "removed3");
        assert_eq!(p.state, DeviceState::Suspended);
        assert_eq!(p.root.state, DeviceState::Unavail);
        assert_eq!(p.root.note.as_deref(), Some("insufficient replicas"));
        assert_eq!(
            p.root.children[0].note.as_deref(),
            Some("insufficient replicas")
        );
        assert_eq!(failed_names(&p), ["virtio-ZN3", "virtio-ZD5", "virtio-ZD6"]);
        let r = redundancy(&p);
        assert_eq!((r.failed, r.margin), (3, -1));
        assert_eq!(r.level, RedundancyLevel::Lost);
        let expect_errors = if v == "2.1.11" { 5 } else { 4 };
        assert_eq!(p.data_errors, Some(expect_errors));
        let scan = p.scan.unwrap();
        assert_eq!(scan.function, ScanFunction::Resilver);
        assert_eq!(scan.state, ScanState::Finished);
    }
}

#[test]
fn text_checksum_errors_are_reported_without_a_state_change() {
    let p = status_text("2.1.11", "cksum");
    assert_eq!(p.state, DeviceState::Online);
    let bad = p.devices_with_errors();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].name, "virtio-ZD1");
    assert_eq!(bad[0].errors.checksum, 1197);
    assert_eq!((bad[0].errors.read, bad[0].errors.write), (0, 0));
    let scan = p.scan.as_ref().unwrap();
    assert_eq!(scan.processed, 35 * 1024 * 1024);
    assert_eq!(scan.elapsed_secs, Some(16));
    assert!(p.action.as_deref().unwrap().contains("zpool clear"));
    // Errors alone do not reduce the margin: ZED did not fault the disk.
    assert_eq!(redundancy(&p).margin, 2);
}

#[test]
fn text_blkdebug_io_errors_on_a_mirror() {
    for v in ["2.1.11", "2.3.2"] {
        let p = status_text(v, "blkdebug-eio");
        assert_eq!(p.name, "epool");
        let m = &p.root.children[0];
        assert_eq!(m.kind, VdevKind::Mirror);
        let eio = &m.children[0];
        assert_eq!(eio.name, "virtio-EIO1");
        let (counts, repaired) = if v == "2.1.11" {
            ((75, 0, 117), 17_301_504) // 16.5M
        } else {
            ((74, 0, 21), 6_815_744) // 6.50M
        };
        assert_eq!(
            (eio.errors.read, eio.errors.write, eio.errors.checksum),
            counts
        );
        assert_eq!(p.scan.as_ref().unwrap().processed, repaired);
        assert_eq!(p.devices_with_errors().len(), 1);
        let r = redundancy(&p);
        assert_eq!(r.margin, 1);
        assert_eq!(
            r.summary,
            "2-way mirror, 2 disks, 0 failed, survives 1 more"
        );
    }
}

#[test]
fn text_replace_and_recover() {
    let p = status_text("2.1.11", "replaced1");
    assert_eq!(
        leaf_states(&p)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        [
            "virtio-ZD1",
            "virtio-ZN2",
            "virtio-ZD3",
            "virtio-ZD4",
            "virtio-ZD5",
            "virtio-ZD6"
        ]
    );
    assert_eq!(failed_names(&p), ["virtio-ZD3"]);
    assert_eq!(redundancy(&p).margin, 1);
    let scan = p.scan.unwrap();
    assert_eq!(
        (scan.function, scan.elapsed_secs),
        (ScanFunction::Resilver, Some(2))
    );

    let p = status_text("2.1.11", "replaced2");
    assert_eq!(p.state, DeviceState::Online);
    assert!(failed_names(&p).is_empty());
    assert_eq!(redundancy(&p).margin, 2);

    let p = status_text("2.1.11", "recovered");
    assert_eq!(p.state, DeviceState::Online);
    assert_eq!(p.scan.unwrap().processed, 12 * 1024);
    let p = status_text("2.3.2", "recovered");
    assert_eq!(p.scan.unwrap().processed, 168 * 1024);
}

#[test]
fn text_zpool_list_and_get() {
    let pools = text::parse_zpool_list(&fixture("openzfs-2.1.11/zpool-list-Hp.txt")).unwrap();
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p.name, "tank");
    assert_eq!(p.health, DeviceState::Online);
    assert_eq!(p.capacity.size, 1_476_395_008);
    assert_eq!(p.capacity.allocated, 159_965_184);
    assert_eq!(p.capacity.free, 1_316_429_824);
    assert_eq!(p.capacity.fragmentation_percent, Some(0));
    assert_eq!(p.capacity.capacity_percent, Some(10));

    let pools = text::parse_zpool_list(&fixture("openzfs-2.1.11/zpool-list-Hpv.txt")).unwrap();
    assert_eq!(pools.len(), 1);
    let v = &pools[0].vdevs;
    assert_eq!(v.len(), 7);
    assert_eq!(v[0].name, "raidz2-0");
    assert_eq!(v[0].allocated, Some(159_965_184));
    assert_eq!(v[1].name, "virtio-ZD1");
    assert_eq!(v[1].size, Some(257_949_696));
    assert_eq!(v[1].allocated, None);
    assert_eq!(v[6].health, Some(DeviceState::Online));

    let got = text::parse_get(
        "zpool get -Hp",
        &fixture("openzfs-2.3.2/zpool-get-Hp-all.txt"),
    )
    .unwrap();
    assert_eq!(got.len(), 1);
    let (pool, props) = &got[0];
    assert_eq!(pool, "tank");
    assert_eq!(props.len(), 78);
    assert_eq!(props.u64("guid"), Some(12_314_353_467_679_041_643));
    assert_eq!(props.get("failmode"), Some("wait"));
    assert_eq!(props.0["ashift"].source, PropertySource::Local);
    assert_eq!(props.0["autotrim"].source, PropertySource::Default);
    assert_eq!(props.get("feature@raidz_expansion"), Some("enabled"));
}

#[test]
fn text_zfs_list_and_encryption_get() {
    // This capture used `-o name,used,avail,refer,quota,mountpoint` (six
    // columns; the fourth equals `used` of an empty parent).
    let cols = ["name", "used", "avail", "refer", "quota", "mountpoint"];
    let ds = text::parse_zfs_list(&fixture("openzfs-2.1.11/zfs-list-Hp.txt"), &cols).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[0].name, "tank");
    assert_eq!(ds[0].used, 105_966_432);
    assert_eq!(ds[0].available, 743_117_984);
    assert_eq!(ds[1].name, "tank/data");
    assert_eq!(ds[1].mountpoint, "/tank/data");
    assert_eq!(ds[1].quota, None);

    // `zfs get -H` lines from the encryption capture (timing lines removed).
    let enc = fixture("openzfs-2.1.11/encryption.txt");
    let lines: String = enc
        .lines()
        .filter(|l| l.starts_with("tank/"))
        .take(4)
        .map(|l| format!("{l}\n"))
        .collect();
    let got = text::parse_get("zfs get -H", &lines).unwrap();
    let props = &got[0].1;
    assert_eq!(props.get("encryption"), Some("aes-256-gcm"));
    assert_eq!(props.get("keyformat"), Some("raw"));
    assert_eq!(props.get("keylocation"), Some("file:///root/tank.key"));
    assert_eq!(props.0["keylocation"].source, PropertySource::Local);
}

// ---------------------------------------------------------------- 2.3 JSON

#[test]
fn json_status_healthy_and_removed() {
    let p = status_json("healthy");
    assert_eq!(p.state, DeviceState::Online);
    assert_eq!(p.guid, Some(13_996_624_258_021_284_860));
    assert_eq!(p.scan, None, "this pool was never scrubbed");
    let d1 = p.root.find("virtio-ZD1").unwrap();
    assert_eq!(d1.path.as_deref(), Some("/dev/disk/by-id/virtio-ZD1-part1"));
    assert_eq!(d1.guid, Some(8_187_556_943_743_175_291));
    assert_eq!(redundancy(&p).margin, 2);

    let p = status_json("removed1");
    assert_eq!(p.state, DeviceState::Degraded);
    assert_eq!(failed_names(&p), ["virtio-ZD2"]);
    assert_eq!(
        redundancy(&p).summary,
        "RAID-Z2, 6 disks, 1 failed, survives 1 more"
    );
    // The last scrub is still reported.
    let s = p.scan.unwrap();
    assert_eq!(
        (s.function, s.state),
        (ScanFunction::Scrub, ScanState::Finished)
    );

    let p = status_json("removed2");
    assert_eq!(failed_names(&p), ["virtio-ZD2", "virtio-ZD3"]);
    assert_eq!(redundancy(&p).margin, 0);
}

#[test]
fn json_status_resilvering_and_resilvered() {
    let p = status_json("resilvering");
    let top = &p.root.children[0];
    let rep = &top.children[1];
    assert_eq!(rep.name, "replacing-1");
    assert_eq!(rep.kind, VdevKind::Replacing);
    assert_eq!(rep.state, DeviceState::Degraded);
    assert_eq!(rep.children[0].state, DeviceState::Removed);
    assert_eq!(rep.children[1].name, "virtio-ZN2");
    assert!(p.resilvering());
    let s = p.scan.as_ref().unwrap();
    assert_eq!(
        (&s.function, &s.state),
        (&ScanFunction::Resilver, &ScanState::Running)
    );
    assert_eq!(s.issued, 133_718_016);
    assert_eq!(s.to_examine, 651_448_320);
    assert_eq!(s.processed, 5_410_816);
    let pct = s.progress_percent();
    assert!((pct - 20.545).abs() < 0.01, "{pct}");
    // ZD3 is removed and ZN2 does not hold its data yet: no margin left.
    let r = redundancy(&p);
    assert_eq!(r.margin, 0);
    assert_eq!(r.vdevs[0].failed_devices, ["replacing-1", "virtio-ZD3"]);
    // Rate and ETA at a given time: 10 s after the pass started.
    let now = s.pass_start.unwrap() + 10;
    assert_eq!(s.rate_bytes_per_sec(now), Some(13_371_801));
    assert_eq!(s.eta_secs(now), Some(38));

    let p = status_json("resilvered");
    let s = p.scan.as_ref().unwrap();
    assert_eq!(s.state, ScanState::Finished);
    assert_eq!(s.elapsed_secs, Some(13));
    assert_eq!(s.processed, 109_031_424);
    assert_eq!(failed_names(&p), ["virtio-ZD3"]);
    assert_eq!(redundancy(&p).margin, 1);
}

#[test]
fn json_status_scrub_running_paused_done() {
    let s = status_json("scrub-running").scan.unwrap();
    assert_eq!(
        (&s.function, &s.state),
        (&ScanFunction::Scrub, &ScanState::Running)
    );
    assert_eq!(s.issued, 148_881_408);
    assert!((s.progress_percent() - 22.83).abs() < 0.01);

    let s = status_json("scrub-paused").scan.unwrap();
    assert_eq!(s.state, ScanState::Paused);
    assert_eq!(s.paused_since, Some(1_795_376_698));
    assert_eq!(s.rate_bytes_per_sec(1_795_376_800), None);

    let s = status_json("scrub-done").scan.unwrap();
    assert_eq!(s.state, ScanState::Finished);
    assert_eq!(s.spent_paused_secs, 4);
    assert_eq!(s.elapsed_secs, Some(24));
    assert_eq!(s.errors, 0);
    assert_eq!(s.processed, 0);
    assert!((s.progress_percent() - 100.0).abs() < 1e-9);
}

#[test]
fn json_flat_vdevs_equal_nested() {
    for state in [
        "healthy",
        "removed1",
        "removed2",
        "resilvering",
        "resilvered",
        "scrub-running",
        "scrub-paused",
        "scrub-done",
    ] {
        let (flat, nested) = (status_json_flat(state), status_json(state));
        // The two forms were captured moments apart: the tree must match,
        // the scan counters may have moved on.
        assert_eq!(flat.root, nested.root, "{state}");
        assert_eq!(flat.state, nested.state, "{state}");
        let phase = |p: &PoolStatus| {
            p.scan
                .as_ref()
                .map(|s| (s.function.clone(), s.state.clone()))
        };
        assert_eq!(phase(&flat), phase(&nested), "{state}");
    }
}

#[test]
fn json_list_get_and_datasets() {
    let pools = json::parse_zpool_list(&fixture(
        "openzfs-2.3.2-json/zpool_list_-j_--json-int.removed1.json",
    ))
    .unwrap();
    let p = &pools[0];
    assert_eq!(p.name, "tank");
    assert_eq!(p.health, DeviceState::Degraded);
    assert_eq!(p.guid, Some(13_996_624_258_021_284_860));
    assert_eq!(p.capacity.size, 1_476_395_008);
    assert_eq!(p.capacity.allocated, 652_124_160);
    assert_eq!(p.capacity.free, 824_270_848);
    assert_eq!(p.capacity.fragmentation_percent, Some(9));
    assert_eq!(p.capacity.capacity_percent, Some(44));
    assert_eq!(p.properties.get("dedupratio"), Some("1.00"));

    let got = json::parse_zpool_get(&fixture(
        "openzfs-2.3.2-json/zpool_get_-j_--json-int_all_tank.healthy.json",
    ))
    .unwrap();
    let props = &got[0].1;
    assert_eq!(props.len(), 78);
    assert_eq!(props.get("failmode"), Some("wait"));
    assert_eq!(props.0["ashift"].source, PropertySource::Local);
    // 2.3.2 clamps this property to i64::MAX; the model takes pool_guid.
    assert_eq!(props.u64("guid"), Some(9_223_372_036_854_775_807));

    let ds = json::parse_zfs_list(&fixture(
        "openzfs-2.3.2-json/zfs_list_-j_--json-int_-o_name,used,available,quota,refquota,encryption,keystatus,compression,mountpoint.removed1.json",
    ))
    .unwrap();
    let names: Vec<_> = ds.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["tank", "tank/data", "tank/documents", "tank/q"]);
    let docs = &ds[2];
    assert_eq!(docs.encryption, Encryption::Cipher("aes-256-gcm".into()));
    assert_eq!(docs.keystatus, Some(KeyStatus::Available));
    assert_eq!(docs.compression, "zstd");
    assert_eq!(docs.used, 2_258_784);
    assert_eq!(docs.available, 415_201_472);
    assert_eq!(ds[0].encryption, Encryption::Off);
    assert_eq!(ds[0].keystatus, None);
    let q = &ds[3];
    assert_eq!(q.quota, Some(52_428_800));
    assert_eq!(q.refquota, None);
    assert_eq!(q.used, 10_688_304);
    assert_eq!(q.available, 41_740_496);

    let got = json::parse_zfs_get(&fixture(
        "openzfs-2.3.2-json/zfs_get_-j_--json-int_all_tank_documents.healthy.json",
    ))
    .unwrap();
    let (name, props) = &got[0];
    assert_eq!(name, "tank/documents");
    assert_eq!(props.len(), 77);
    assert_eq!(props.get("keylocation"), Some("file:///root/documents.key"));
    assert_eq!(props.get("keyformat"), Some("raw"));
    assert_eq!(props.get("encryptionroot"), Some("tank/documents"));
    assert_eq!(props.0["compression"].source, PropertySource::Local);
}

// ------------------------------------------------------------------ events

fn events(rel: &str, verbose: bool) -> Vec<ZpoolEvent> {
    parse_zpool_events(&fixture(rel), verbose)
        .unwrap()
        .into_iter()
        .map(|i| match i {
            EventItem::Event(e) => *e,
            EventItem::Dropped(n) => panic!("{rel}: unexpected dropped {n}"),
        })
        .collect()
}

#[test]
fn events_removed_disks() {
    let ev = events("openzfs-2.1.11/zpool-events-v.removed.txt", true);
    let classes: Vec<_> = ev.iter().map(ZpoolEvent::short_class).collect();
    assert_eq!(
        classes,
        [
            "statechange",
            "removed",
            "config_sync",
            "statechange",
            "removed",
            "config_sync"
        ]
    );
    let e = &ev[0];
    assert_eq!(e.pool.as_deref(), Some("tank"));
    assert_eq!(e.pool_guid, Some(0xf033_e35b_3654_14f4));
    assert_eq!(e.vdev_guid, Some(0x8cd3_d43f_0e10_0fdd));
    assert_eq!(
        e.vdev_path.as_deref(),
        Some("/dev/disk/by-id/virtio-ZD2-part1")
    );
    assert_eq!(e.vdev_state, Some(DeviceState::Removed));
    assert_eq!(e.vdev_laststate, Some(DeviceState::Online));
    assert_eq!(e.time_secs, Some(0x6b03_43d9));
    assert_eq!(e.eid, Some(0x14c));
    assert_eq!(
        ev[4].vdev_path.as_deref(),
        Some("/dev/disk/by-id/virtio-ZD3-part1")
    );
    assert_eq!(ev[5].eid, Some(0x151));

    let ev = events("openzfs-2.3.2/zpool-events-v.removed3.txt", true);
    assert_eq!(ev.len(), 816);
    let count = |c: &str| ev.iter().filter(|e| e.short_class() == c).count();
    assert_eq!(count("io_failure"), 801);
    assert_eq!(count("vdev.no_replicas"), 1);
    assert_eq!(count("removed"), 3);
    // The first event is a FAULTED disk on another pool (the blkdebug one).
    assert_eq!(ev[0].pool.as_deref(), Some("epool"));
    assert_eq!(ev[0].vdev_state, Some(DeviceState::Faulted));
    let failmode = ev.iter().find(|e| e.short_class() == "io_failure").unwrap();
    assert_eq!(failmode.field_str("pool_failmode").as_deref(), Some("wait"));
}

#[test]
fn events_checksum_ereports_carry_counters() {
    let ev = events("openzfs-2.3.2/zpool-events-v.cksum.txt", true);
    assert_eq!(ev.len(), 376);
    let ck: Vec<_> = ev
        .iter()
        .filter(|e| e.short_class() == "checksum")
        .collect();
    assert_eq!(ck.len(), 372);
    let first = ck[0];
    assert_eq!(
        first.vdev_path.as_deref(),
        Some("/dev/disk/by-id/virtio-ZD1-part1")
    );
    assert_eq!(first.field_u64("vdev_cksum_errors"), Some(1));
    assert_eq!(first.field_str("parent_type").as_deref(), Some("raidz"));
    assert_eq!(
        first.fields.get("detector.vdev").map(String::as_str),
        Some("0x7a9180b5d5ecd8f1")
    );
    assert_eq!(first.field_u64("zio_flags"), Some(0x2000b0));
    assert_eq!(first.fields_dropped, 0);
    assert!(ev.iter().any(|e| e.short_class() == "scrub_finish"));
    // eids strictly increase through the capture.
    assert!(ev.windows(2).all(|w| w[0].eid < w[1].eid));
}

#[test]
fn events_scripted_short_form() {
    let ev = events("openzfs-2.3.2-json/zpool_events_-H.resilvering.txt", false);
    assert_eq!(ev.len(), 70);
    let tail: Vec<_> = ev[ev.len() - 4..]
        .iter()
        .map(ZpoolEvent::short_class)
        .collect();
    assert_eq!(
        tail,
        [
            "vdev_attach",
            "resilver_start",
            "history_event",
            "config_sync"
        ]
    );
    assert!(ev.iter().any(|e| e.short_class() == "scrub_paused"));
    assert_eq!(ev[0].time_text, "Nov 22 2026 19:44:15.776000722");
    assert_eq!(ev[0].eid, None, "-H without -v has no fields");
}

// ------------------------------------------------------------------- sweep

/// Parses every file in the shared samples folder with the parser its name
/// calls for, and checks the copies in `tests/fixtures` are identical. A new
/// capture without a parser fails here until it is handled.
#[test]
fn every_shared_sample_parses() {
    let root = shared_samples_dir();
    let mut checked = 0;
    for dir in ["openzfs-2.1.11", "openzfs-2.3.2", "openzfs-2.3.2-json"] {
        let d = root.join(dir);
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let body = std::fs::read_to_string(&path).unwrap();
            let copy = fixture_dir().join(dir).join(&name);
            if copy.exists() {
                assert_eq!(
                    std::fs::read_to_string(&copy).unwrap(),
                    body,
                    "{dir}/{name} drifted"
                );
            }
            let ctx = format!("{dir}/{name}");
            if name.starts_with("zpool-status-p.") {
                let p = text::parse_zpool_status(&body).unwrap();
                assert_eq!(p.len(), 1, "{ctx}");
                assert!(p[0].root.leaves().len() >= 2, "{ctx}");
                assert!(p[0].scan.is_some(), "{ctx}");
            } else if name.starts_with("zpool-list-Hp") {
                let p = text::parse_zpool_list(&body).unwrap();
                assert!(p[0].capacity.size > 0, "{ctx}");
            } else if name.starts_with("zpool-get-Hp") {
                assert!(
                    text::parse_get("zpool get", &body).unwrap()[0].1.len() > 50,
                    "{ctx}"
                );
            } else if name.starts_with("zfs-list-Hp") {
                let cols = ["name", "used", "avail", "refer", "quota", "mountpoint"];
                assert!(
                    !text::parse_zfs_list(&body, &cols).unwrap().is_empty(),
                    "{ctx}"
                );
            } else if name.starts_with("zpool-events-v.") || name.starts_with("zpool_events_-H.") {
                let verbose = name.contains("-v.");
                let items = parse_zpool_events(&body, verbose).unwrap();
                // Independent count: header lines are the unindented ones.
                let headers = body
                    .lines()
                    .filter(|l| {
                        !l.is_empty() && !l.starts_with([' ', '\t']) && !l.starts_with("TIME ")
                    })
                    .count();
                assert_eq!(items.len(), headers, "{ctx}");
                for i in &items {
                    let EventItem::Event(e) = i else {
                        panic!("{ctx}: {i:?}")
                    };
                    assert!(e.class.contains(".fs.zfs."), "{ctx}: {}", e.class);
                    if verbose {
                        assert!(e.eid.is_some() && e.time_secs.is_some(), "{ctx}: {e:?}");
                    }
                }
            } else if name.starts_with("zpool_status_-j") {
                let p = json::parse_zpool_status(&body).unwrap();
                assert_eq!(
                    p[0].root.leaves().len(),
                    6 + usize::from(name.contains(".resilvering.")),
                    "{ctx}"
                );
            } else if name.starts_with("zpool_list_-j") {
                assert_eq!(
                    json::parse_zpool_list(&body).unwrap()[0].capacity.size,
                    1_476_395_008,
                    "{ctx}"
                );
            } else if name.starts_with("zpool_get_-j") {
                assert!(
                    json::parse_zpool_get(&body).unwrap()[0].1.len() > 50,
                    "{ctx}"
                );
            } else if name.starts_with("zfs_list_-j") {
                assert_eq!(json::parse_zfs_list(&body).unwrap().len(), 4, "{ctx}");
            } else if name.starts_with("zfs_get_-j") {
                assert!(json::parse_zfs_get(&body).unwrap()[0].1.len() > 50, "{ctx}");
            } else if name.starts_with("zpool_version")
                || ["disk-names.txt", "encryption.txt", "quota-edquot.txt"].contains(&name.as_str())
            {
                // Not command output this crate parses (version banner,
                // `ls`/`lsblk`, a shell transcript); covered by name only.
            } else {
                panic!("{ctx}: new sample without a parser; add it to this sweep");
            }
            checked += 1;
        }
    }
    assert!(checked >= 90, "only {checked} samples found");
}
