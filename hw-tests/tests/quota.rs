//! Scenario 3 of issue 8: quota.
//!
//! A client enrolled with `appliancectl sync client add alice --quota 50M`
//! gets its own dataset, `tank/documents/alice`, with a 50 MiB ZFS quota,
//! encrypted under the `documents` key and mounted at
//! `/tank/documents/alice` by the root mount unit before enrollment answers.
//! Two layers hold the quota: the dataset's (enforced by ZFS, its 80/90/95 %
//! levels published by the storage manager's poll as
//! `storage.quota.tank/documents/alice`), and the client's own (the sync
//! server's admission asks before any chunk is sent; `statvfs` of the
//! client's directory is its dataset's room).
//!
//! Pushes cross 80 %, then 90 %, each raising its event. Then a push that
//! would exceed the quota is refused with the quota error before any byte
//! is sent, and nothing of it is written (no file, no staging leftover, ZFS
//! usage unchanged but for noise).
//!
//! Run: `cargo test -p appliance-hw-tests --test quota -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{write_random_file, Appliance};
use serde_json::Value;

const CLIENT: &str = "alice";
const DATASET: &str = "tank/documents/alice";
const MIB: u64 = 1 << 20;
const QUOTA: u64 = 50 * MIB;

/// The quota event inside a bus message, if it is one for `DATASET`.
fn quota_event(m: &Value) -> Option<&Value> {
    let data = &m["data"];
    let q = data.get("Quota").unwrap_or(data);
    (q["dataset"] == DATASET).then_some(q)
}

fn crossed(level: u64) -> impl Fn(&Value) -> bool {
    move |m: &Value| {
        quota_event(m).is_some_and(|q| {
            q["level_percent"].as_u64() == Some(level) && q["direction"] == "crossed"
        })
    }
}

fn zfs_used(app: &mut Appliance) -> u64 {
    app.run(&format!("sync; zfs get -Hp -o value used {DATASET}"))
        .trim()
        .parse()
        .unwrap()
}

fn push(app: &mut Appliance, bundle: &std::path::Path, file: &std::path::Path) -> (bool, String) {
    let out = app
        .sync_cmd(bundle, &["push", file.to_str().unwrap()])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn crossing_levels_raises_events_and_an_upload_over_quota_writes_nothing() {
    let t0 = Instant::now();
    // The host client first, so its build is not timed as the push.
    appliance_hw_tests::scenario::sync_client().unwrap();
    let mut app = Appliance::boot("quota");
    let t_enroll = Instant::now();
    let bundle = app.enroll(CLIENT, Some(QUOTA));
    eprintln!(
        "enrolled {CLIENT} with its dataset in {:.1} s",
        t_enroll.elapsed().as_secs_f64()
    );
    // The client's own dataset: its quota, encrypted under documents' key,
    // mounted where the sync server writes, owned by the daemon's user.
    let props = app.run(&format!(
        "zfs get -Hp -o property,value quota,encryptionroot,keystatus,mounted,mountpoint {DATASET}"
    ));
    eprintln!("{DATASET}:\n{props}");
    let prop = |name: &str| {
        props
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('\t'))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(prop("quota"), QUOTA.to_string(), "{props}");
    assert_eq!(prop("encryptionroot"), "tank/documents", "{props}");
    assert_eq!(prop("keystatus"), "available", "{props}");
    assert_eq!(prop("mounted"), "yes", "{props}");
    assert_eq!(prop("mountpoint"), format!("/{DATASET}"), "{props}");
    let owner = app.run(&format!("stat -c %U /{DATASET}"));
    assert_eq!(owner.trim(), "appliance", "owner of /{DATASET}");
    let seq = app.last_seq("storage.quota.>");
    let sync_seq = app.last_seq("sync.>");

    // 41 MiB: past 80 %.
    let a = app.vm.run_dir.join("a.bin");
    write_random_file(&a, usize::try_from(41 * MIB).unwrap(), 1).unwrap();
    let (ok, text) = push(&mut app, &bundle, &a);
    app.ensure(ok, || {
        format!("41 MiB push under a 50 MiB quota failed: {text}")
    });
    let (ev80, t80) = app.wait_event(
        "storage.quota.>",
        seq,
        Duration::from_secs(120),
        "80 % quota event",
        crossed(80),
    );
    eprintln!("80 % event after {:.1} s: {ev80}", t80.as_secs_f64());
    let level80_seq = ev80["seq"].as_u64().unwrap();
    let used = zfs_used(&mut app);
    eprintln!("zfs used {used} of {QUOTA}");

    // 4.5 MiB more: past 90 %.
    let b = app.vm.run_dir.join("b.bin");
    write_random_file(&b, usize::try_from(9 * MIB / 2).unwrap(), 2).unwrap();
    let (ok, text) = push(&mut app, &bundle, &b);
    app.ensure(ok, || format!("4.5 MiB push at 82 % failed: {text}"));
    let (ev90, t90) = app.wait_event(
        "storage.quota.>",
        level80_seq,
        Duration::from_secs(120),
        "90 % quota event",
        crossed(90),
    );
    eprintln!("90 % event after {:.1} s: {ev90}", t90.as_secs_f64());
    let q90 = quota_event(&ev90).unwrap();
    assert_eq!(q90["limit_bytes"].as_u64(), Some(QUOTA), "{ev90}");
    assert!(q90["used_percent"].as_f64().unwrap() >= 90.0, "{ev90}");

    // What is there before the refused upload.
    let listing = |app: &mut Appliance| {
        app.run(&format!(
            "cd /{DATASET} && find . -path ./.appliance-meta -prune -o -print | sort"
        ))
    };
    let before = listing(&mut app);
    let used_before = zfs_used(&mut app);

    // 10 MiB would exceed both quotas: refused before any byte is sent.
    let c = app.vm.run_dir.join("c.bin");
    write_random_file(&c, usize::try_from(10 * MIB).unwrap(), 3).unwrap();
    let (ok, text) = push(&mut app, &bundle, &c);
    eprintln!("over-quota push: {}", text.trim());
    assert!(!ok, "a push over the quota succeeded: {text}");
    assert!(text.contains("quota exceeded"), "{text}");
    let events = app.events("sync.>");
    let failed = events.iter().find(|m| {
        m["seq"].as_u64() > Some(sync_seq)
            && m["subject"] == format!("sync.upload.{CLIENT}.failed").as_str()
            && m["data"]["path"] == "c.bin"
    });
    let failed = failed.unwrap_or_else(|| panic!("no failed event for c.bin: {events:#?}"));
    assert_eq!(failed["data"]["bytes_transferred"], 0, "{failed}");
    assert!(
        !events.iter().any(
            |m| m["subject"] == format!("sync.upload.{CLIENT}.completed").as_str()
                && m["data"]["path"] == "c.bin"
        ),
        "{events:#?}"
    );

    // Nothing written: same tree (staging included), usage barely moved.
    let after = listing(&mut app);
    assert_eq!(after, before, "tree of /{DATASET} changed");
    app.run(&format!("test ! -e /{DATASET}/c.bin"));
    let used_after = zfs_used(&mut app);
    eprintln!("zfs used before {used_before}, after {used_after}");
    assert!(
        used_after <= used_before + 256 * 1024,
        "usage grew by {} bytes for a refused upload",
        used_after.saturating_sub(used_before)
    );
    let out = app.sync_cmd(&bundle, &["--json", "ls"]).unwrap();
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.bin", "b.bin"], "{ls}");
    let out = app.sync_cmd(&bundle, &["--json", "status"]).unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("client status: {status}");
    assert_eq!(status["quota"].as_u64(), Some(QUOTA), "{status}");
    assert!(status["available"].as_u64().unwrap() < 10 * MIB, "{status}");

    app.run("appliancectl health ready");
    eprintln!(
        "quota: boot-to-ready {:.1} s, test {:.1} s (quota on the client's dataset {DATASET} and the client's own)",
        app.boot_to_ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
