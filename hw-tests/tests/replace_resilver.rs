//! Scenario 5 of issue 8: replace a pulled disk and resilver.
//!
//! With known data on the pool, the disk in bay 3 is hot-unplugged (the pool
//! goes DEGRADED, margin 1), a blank disk is hot-added into the empty bay,
//! and `appliancectl storage replace` swaps it in. The resilver's
//! `storage.resilver.tank.*` events follow (started or progress, then
//! finished), and once `zpool wait -t resilver,replace` returns the old disk
//! is detached: the raidz2 has six ONLINE children, the new disk among them
//! and the old one gone, the daemon publishes ONLINE with margin 2, and the
//! data verifies.
//!
//! Run: `cargo test -p appliance-hw-tests --test replace_resilver -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{Appliance, POOL};
use serde_json::Value;

const DATA: &str = "/tank/hwtest/known.bin";
const BAY: usize = 3;
const NEW_SERIAL: &str = "APPLIANCE-NEW-0";

/// Leaf names (`vdevs` keys) of the pool's single top-level vdev.
fn leaves(status: &Value) -> Vec<(String, Value)> {
    let top = status["pools"][POOL]["vdevs"][POOL]["vdevs"]
        .as_object()
        .and_then(|m| m.values().next())
        .cloned()
        .unwrap_or(Value::Null);
    top["vdevs"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn a_pulled_disk_is_replaced_by_a_hot_added_one_and_resilvered() {
    let test_t0 = Instant::now();
    let mut app = Appliance::boot("replace_resilver");
    app.run(&format!(
        "zfs create -o primarycache=metadata {POOL}/hwtest && zfs get -H -o value mounted {POOL}/hwtest | grep -qx yes"
    ));
    let want = app.write_known_data(DATA, 32);

    // Pull bay 3: DEGRADED with margin 1.
    let after = app.last_seq("storage.>");
    app.unplug_disk(BAY);
    app.wait_event(
        "storage.pool.tank.state",
        after,
        Duration::from_secs(120),
        "DEGRADED with margin 1",
        |m| m["data"]["new_state"] == "DEGRADED" && m["data"]["new_margin"] == 1,
    );

    // A blank disk into the empty bay, then replace.
    let new = app.hotplug_disk(BAY, NEW_SERIAL, 512);
    let old = Appliance::disk_by_id(BAY);
    let disks = app.json("appliancectl --json storage disks");
    eprintln!("storage disks after the hot-add: {disks}");
    let after = app.last_seq("storage.>");
    let t_replace = Instant::now();
    let out = app.run(&format!("appliancectl storage replace {POOL} {old} {new}"));
    eprintln!("replace: {}", out.trim());

    let (fin, waited) = app.wait_event(
        "storage.resilver.tank.>",
        after,
        Duration::from_secs(900),
        "resilver finished",
        |m| m["subject"] == "storage.resilver.tank.finished",
    );
    eprintln!(
        "resilver finished event {:.1} s after the replace command: {fin}",
        waited.as_secs_f64()
    );
    let resilver_events: Vec<Value> = app
        .events("storage.resilver.tank.>")
        .into_iter()
        .filter(|m| m["seq"].as_u64().is_some_and(|s| s > after))
        .collect();
    for e in &resilver_events {
        eprintln!("  {} {}", e["subject"], e["data"]["scan"]);
    }
    app.ensure(
        resilver_events.iter().any(|m| {
            m["subject"] == "storage.resilver.tank.started"
                || m["subject"] == "storage.resilver.tank.progress"
        }),
        || format!("no resilver started/progress event before finished: {resilver_events:#?}"),
    );
    app.ensure(
        fin["data"]["scan"]["kind"] == "resilver" && fin["data"]["scan"]["phase"] == "finished",
        || format!("finished event: {fin}"),
    );

    // The replace completes: the old disk is detached.
    app.run_for(
        &format!("zpool wait -t resilver,replace {POOL}"),
        Duration::from_secs(600),
    );
    let replaced_after = t_replace.elapsed();
    let st = app.json(&format!("zpool status -j --json-int -P {POOL}"));
    let leaves = leaves(&st);
    let names: Vec<String> = leaves
        .iter()
        .map(|(k, v)| v["path"].as_str().unwrap_or(k).to_owned())
        .collect();
    app.ensure(
        st["pools"][POOL]["state"] == "ONLINE"
            && leaves.len() == 6
            && leaves
                .iter()
                .all(|(_, v)| v["state"] == "ONLINE" && v["vdev_type"] == "disk")
            && names.iter().any(|n| n.contains(NEW_SERIAL))
            && !names
                .iter()
                .any(|n| n.contains(&format!("virtio-APPLIANCE-DISK-{BAY}"))),
        || format!("after the replace: {names:?}\n{st:#}"),
    );

    // The daemon sees it: ONLINE with margin 2, healthy report.
    let (ev, _) = app.wait_event(
        "storage.pool.tank.state",
        after,
        Duration::from_secs(120),
        "ONLINE with margin 2 after the replace",
        |m| m["data"]["new_state"] == "ONLINE" && m["data"]["new_margin"] == 2,
    );
    eprintln!("pool state after the replace: {ev}");
    let report = app.report();
    let pool = &report["pools"][0];
    app.ensure(
        pool["state"] == "ONLINE" && pool["margin"] == 2 && pool["failed"] == 0,
        || format!("report after the replace: {report:#}"),
    );
    let got = app.sha256(DATA);
    app.ensure(got == want, || {
        format!("{DATA} after the resilver: sha256 {got}, want {want}")
    });
    eprintln!(
        "figures: ready {:.1} s; replace to finished event {:.1} s; replace to detached {:.1} s; test {:.0} s",
        app.boot_to_ready.as_secs_f64(),
        waited.as_secs_f64(),
        replaced_after.as_secs_f64(),
        test_t0.elapsed().as_secs_f64()
    );
    app.power_off();
}
