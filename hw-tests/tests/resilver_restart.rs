//! A resilver that ends while `applianced` is stopped (an upgrade, a crash
//! loop, a restart by hand) is still published as finished.
//!
//! With known data on the pool, bay 3 is pulled and a blank disk replaces
//! it through `appliancectl storage replace`. The new disk is throttled on
//! the host (QMP `block_set_io_throttle`), so the resilver is still running
//! when `storage.resilver.tank.started` has been published and the daemon
//! is stopped. The limit is then lifted and the resilver ends with nobody
//! watching. Once the daemon is started again it publishes
//! `storage.resilver.tank.finished` (its `started` went out before the
//! stop), exactly once, also across a further restart; the pool is ONLINE
//! with margin 2 and the data verifies.
//!
//! Run: `cargo test -p appliance-hw-tests --test resilver_restart -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{Appliance, POOL};
use serde_json::Value;

const DATA: &str = "/tank/hwtest/known.bin";
const BAY: usize = 3;
const NEW_SERIAL: &str = "APPLIANCE-NEW-0";
/// The new disk's throughput until the daemon is stopped: the resilver
/// writes about a quarter of the data and parity (16 MiB of 64) to it, so
/// it takes about a minute at this rate.
const THROTTLE_BPS: u64 = 256 << 10;

fn finished_since(app: &mut Appliance, after: u64) -> Vec<Value> {
    app.events("storage.resilver.tank.>")
        .into_iter()
        .filter(|m| {
            m["seq"].as_u64().is_some_and(|s| s > after)
                && m["subject"] == "storage.resilver.tank.finished"
        })
        .collect()
}

/// `zpool status` says a resilver is in progress.
fn resilvering(app: &mut Appliance) -> bool {
    let out = app.run(&format!("zpool status {POOL}"));
    out.contains("resilver in progress")
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn a_resilver_that_ends_while_the_daemon_is_stopped_is_published_after_it_starts() {
    let test_t0 = Instant::now();
    let mut app = Appliance::boot("resilver_restart");
    app.run(&format!(
        "zfs create -o primarycache=metadata {POOL}/hwtest && zfs get -H -o value mounted {POOL}/hwtest | grep -qx yes"
    ));
    let want = app.write_known_data(DATA, 64);

    let after = app.last_seq("storage.>");
    app.unplug_disk(BAY);
    app.wait_event(
        "storage.pool.tank.state",
        after,
        Duration::from_secs(120),
        "DEGRADED with margin 1",
        |m| m["data"]["new_state"] == "DEGRADED" && m["data"]["new_margin"] == 1,
    );
    let new = app.hotplug_disk(BAY, NEW_SERIAL, 512);
    let old = Appliance::disk_by_id(BAY);
    app.throttle_disk(BAY, THROTTLE_BPS);

    let after = app.last_seq("storage.>");
    let out = app.run(&format!("appliancectl storage replace {POOL} {old} {new}"));
    eprintln!("replace: {}", out.trim());
    app.wait_event(
        "storage.resilver.tank.>",
        after,
        Duration::from_secs(300),
        "resilver started",
        |m| m["subject"] == "storage.resilver.tank.started",
    );
    app.run("systemctl stop applianced");
    let still = resilvering(&mut app);
    let status = app.run(&format!("zpool status {POOL}"));
    app.ensure(still, || {
        format!("the resilver ended before the daemon stopped (lower THROTTLE_BPS):\n{status}")
    });
    eprintln!("daemon stopped mid-resilver:\n{status}");

    app.throttle_disk(BAY, 0);
    let t_wait = Instant::now();
    app.run_for(
        &format!("zpool wait -t resilver,replace {POOL}"),
        Duration::from_secs(900),
    );
    eprintln!(
        "resilver ended {:.1} s after the limit was lifted, daemon stopped",
        t_wait.elapsed().as_secs_f64()
    );
    let still = resilvering(&mut app);
    app.ensure(!still, || "still resilvering after zpool wait".to_owned());

    // `systemctl start` returns once the daemon is ready (Type=notify).
    app.run_for("systemctl start applianced", Duration::from_secs(300));
    let (fin, waited) = app.wait_event(
        "storage.resilver.tank.>",
        after,
        Duration::from_secs(180),
        "resilver finished after the restart",
        |m| m["subject"] == "storage.resilver.tank.finished",
    );
    eprintln!(
        "finished published {:.1} s after the daemon was ready: {fin}",
        waited.as_secs_f64()
    );
    app.ensure(
        fin["data"]["scan"]["kind"] == "resilver" && fin["data"]["scan"]["phase"] == "finished",
        || format!("finished event: {fin}"),
    );
    let (ev, _) = app.wait_event(
        "storage.pool.tank.state",
        after,
        Duration::from_secs(120),
        "ONLINE with margin 2 after the restart",
        |m| m["data"]["new_state"] == "ONLINE" && m["data"]["new_margin"] == 2,
    );
    eprintln!("pool state after the restart: {ev}");

    // Another restart: the end is known now and is not published again.
    let before_restart = app.last_seq("storage.>");
    app.run_for("systemctl restart applianced", Duration::from_secs(300));
    // The restarted daemon republishes the pool state from its first poll.
    app.wait_event(
        "storage.pool.tank.state",
        before_restart,
        Duration::from_secs(120),
        "the restarted daemon's pool state",
        |m| m["data"]["old_state"].is_null(),
    );
    std::thread::sleep(Duration::from_secs(15));
    let fins = finished_since(&mut app, after);
    app.ensure(fins.len() == 1, || {
        format!("want one resilver finished since the replace, got {fins:#?}")
    });
    let report = app.report();
    let pool = &report["pools"][0];
    app.ensure(
        pool["state"] == "ONLINE" && pool["margin"] == 2 && pool["failed"] == 0,
        || format!("report after the restarts: {report:#}"),
    );
    let got = app.sha256(DATA);
    app.ensure(got == want, || {
        format!("{DATA} after the resilver: sha256 {got}, want {want}")
    });
    eprintln!(
        "figures: ready {:.1} s; test {:.0} s",
        app.boot_to_ready.as_secs_f64(),
        test_t0.elapsed().as_secs_f64()
    );
    app.power_off();
}
