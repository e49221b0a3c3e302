//! Scenario 6 of issue 8: silent corruption of one disk, found and repaired
//! by a scrub.
//!
//! Known data goes into a test dataset; the machine powers off cleanly;
//! every allocated cluster of data disk 1's qcow2 file between 8 MiB and 16
//! MiB before its end (clear of the four ZFS labels, the boot area and the
//! reserved partition 9) is overwritten with 0xAB through `qemu-io`. ZFS
//! cannot notice until it reads those blocks. After booting the same disks
//! again, without reading the data first (a read would self-heal it), a
//! scrub started with `appliancectl storage scrub start` must end in
//! `storage.scrub.tank.finished` with bytes repaired and checksum errors on
//! disk 1 only; the daemon reports the counters itself (ZED does not degrade
//! a disk for checksum errors it could repair): a
//! `storage.disk.virtio-APPLIANCE-DISK-1.errors` event and a degraded report
//! naming the disk. The data verifies.
//!
//! Run: `cargo test -p appliance-hw-tests --test scrub_corruption -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{Appliance, POOL};
use serde_json::Value;

const DATA: &str = "/tank/hwtest/known.bin";
const BAY: usize = 1;
const MIB: u64 = 1 << 20;

/// Allocated (data) ranges of a qcow2 file, guest offsets, merged.
fn allocated(file: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img map: {out:?}");
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in map {
        if e["data"] != true || e["zero"] == true {
            continue;
        }
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match ranges.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => ranges.push((s, l)),
        }
    }
    ranges
}

/// Overwrites the allocated parts of `[lo, hi)` of `file` with 0xAB;
/// returns the bytes written.
fn corrupt(file: &Path, lo: u64, hi: u64) -> u64 {
    let mut cmds = Vec::new();
    let mut total = 0;
    for (s, l) in allocated(file) {
        let (a, b) = (s.max(lo), (s + l).min(hi));
        if a < b {
            cmds.push(format!("write -P 0xAB {a} {}", b - a));
            total += b - a;
        }
    }
    for chunk in cmds.chunks(100) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2"]);
        for w in chunk {
            c.args(["-c", w]);
        }
        let out = c.arg(file).output().unwrap();
        assert!(out.status.success(), "qemu-io: {out:?}");
    }
    total
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn a_scrub_repairs_silent_corruption_of_one_disk_and_reports_it() {
    let test_t0 = Instant::now();
    let mut app = Appliance::boot("scrub_corruption");
    let first_ready = app.boot_to_ready;
    app.run(&format!(
        "zfs create -o primarycache=metadata {POOL}/hwtest && zfs get -H -o value mounted {POOL}/hwtest | grep -qx yes"
    ));
    let want = app.write_known_data(DATA, 64);
    let file = app.disk_file(BAY);
    let disk_bytes = app.cfg.data_disk_mib * MIB;
    let cfg = app.power_off();

    let before = allocated(&file);
    let in_use: u64 = before.iter().map(|(_, l)| l).sum();
    let written = corrupt(&file, 8 * MIB, disk_bytes - 16 * MIB);
    eprintln!(
        "disk {BAY}: {} MiB allocated in {} ranges; overwrote {} MiB with 0xAB",
        in_use / MIB,
        before.len(),
        written / MIB
    );
    assert!(written >= 4 * MIB, "too little to corrupt: {before:?}");

    let mut app = Appliance::boot_with(cfg);
    let second_ready = app.boot_to_ready;
    let after = app.last_seq("storage.>");
    let out = app.run(&format!("appliancectl storage scrub start {POOL}"));
    eprintln!("scrub start: {}", out.trim());
    let (fin, took) = app.wait_event(
        "storage.scrub.tank.>",
        after,
        Duration::from_secs(1200),
        "scrub finished",
        |m| m["subject"] == "storage.scrub.tank.finished",
    );
    eprintln!(
        "scrub finished event {:.1} s after the start: {fin}",
        took.as_secs_f64()
    );
    let disk = format!("virtio-APPLIANCE-DISK-{BAY}");
    let d = &fin["data"];
    let with_errors = d["devices_with_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let zs = app.run(&format!("zpool status -v {POOL}"));
    eprintln!("{zs}");
    app.ensure(
        d["scan"]["repaired_bytes"].as_u64().is_some_and(|b| b > 0)
            && d["scan"]["errors"] == 0
            && with_errors.len() == 1
            && with_errors[0]["disk"] == disk.as_str()
            && with_errors[0]["checksum"].as_u64().is_some_and(|c| c > 0),
        || format!("scrub finished event should show repairs and checksum errors on {disk} only: {fin:#}\n{zs}"),
    );

    // The daemon reports the counters itself.
    let (errs, _) = app.wait_event(
        &format!("storage.disk.{disk}.errors"),
        after,
        Duration::from_secs(120),
        "disk error-counter event",
        |m| {
            m["data"]["errors"]["checksum"]
                .as_u64()
                .is_some_and(|c| c > 0)
        },
    );
    eprintln!("disk errors event: {errs}");
    let report = app.report();
    let pool = &report["pools"][0];
    app.ensure(
        report["status"] == "degraded"
            && pool["devices_with_errors"][0]["disk"] == disk.as_str()
            && report["reasons"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|s| s.as_str().unwrap_or_default().contains(&disk))
            }),
        || format!("report after the scrub: {report:#}"),
    );

    let got = app.sha256(DATA);
    app.ensure(got == want, || {
        format!("{DATA} after the scrub: sha256 {got}, want {want}")
    });
    eprintln!(
        "figures: ready {:.1} s / {:.1} s; scrub start to finished event {:.1} s; test {:.0} s",
        first_ready.as_secs_f64(),
        second_ready.as_secs_f64(),
        took.as_secs_f64(),
        test_t0.elapsed().as_secs_f64()
    );
    app.power_off();
}
