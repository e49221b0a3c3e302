//! Scenario 4 of issue 8: disk failures on the real raidz2 pool.
//!
//! 1. Known data goes into a test dataset whose data blocks are never
//!    cached (`primarycache=metadata`), so each check reads the disks.
//! 2. One data disk is hot-unplugged (QMP `device_del`), then a second: each
//!    time `storage.pool.tank.state` reports DEGRADED with margin 1, then 0,
//!    within 5 s of the unplug (measured from the guest clock just before the
//!    QMP command to the event's `ts_ms`), and the data still verifies.
//! 3. A third disk goes: the pool can no longer write and suspends
//!    (`failmode=wait`). The daemon publishes it, marks the `storage`
//!    component failed with the reason, and `appliancectl status` and
//!    `storage report` keep answering (each under `timeout 10` in the guest).
//!    An upload from the host is refused at once with "storage
//!    unavailable" and the reason (the daemon's upload gate), and nothing of
//!    it is stored.
//! 4. Power cycle with all six disks back: the pool imports, the data
//!    verifies, and the pool returns to ONLINE with margin 2 (after the
//!    resilver of the stale disks).
//!
//! Run: `cargo test -p appliance-hw-tests --test disk_failures -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{sync_client, write_random_file, Appliance, POOL};
use serde_json::Value;

const STATE: &str = "storage.pool.tank.state";
const DATA: &str = "/tank/hwtest/known.bin";
/// The bound from the unplug to the DEGRADED event.
const DEGRADED_WITHIN_MS: u64 = 5_000;

fn component<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// Pulls `bay` and waits for the pool state event with `state`/`margin`;
/// returns the latency from just before `device_del` to the event's
/// `ts_ms` (guest clock) and the event.
fn pull_and_wait(app: &mut Appliance, bay: usize, margin: i64) -> (u64, Value) {
    // Let the pool commit what it is writing (after a first pull: the new
    // configuration in every label) before the next disk goes. In one CI
    // run under load, a read after the second pull hung in the guest
    // kernel (zio_wait, txg_sync blocked for minutes), which this scenario
    // is not about: it tests what the daemon reports.
    app.run(&format!("zpool sync {POOL}"));
    // The disks pulled so far, and only they, are failed: a disk the daemon
    // (or ZFS) failed on its own would make the pull below change nothing.
    let before = app.report();
    let failed_before = 1 - margin;
    app.ensure(before["pools"][0]["failed"] == failed_before, || {
        format!("before pulling bay {bay}, the daemon should count {failed_before} failed disk(s): {before:#}")
    });
    let after = app.last_seq("storage.>");
    let t0 = app.guest_ms();
    let host_t0 = Instant::now();
    app.unplug_disk(bay);
    let unplugged = host_t0.elapsed();
    let (ev, seen) = app.wait_event(
        STATE,
        after,
        Duration::from_secs(120),
        &format!("DEGRADED with margin {margin} after pulling bay {bay}"),
        |m| m["data"]["new_state"] == "DEGRADED" && m["data"]["new_margin"] == margin,
    );
    let ts = ev["ts_ms"].as_u64().unwrap();
    let latency = ts.saturating_sub(t0);
    eprintln!(
        "bay {bay} pulled: DEVICE_DELETED after {:.1} s; DEGRADED (margin {margin}) event {latency} ms after device_del (guest clock); seen by the test after {:.1} s\n  {ev}",
        unplugged.as_secs_f64(),
        (unplugged + seen).as_secs_f64(),
    );
    // Where the time went: the disk's own event (from `zpool events`) comes
    // before the pool state (from the poll it triggers).
    let disk = format!("storage.disk.virtio-APPLIANCE-DISK-{bay}.>");
    for m in app.events(&disk) {
        if m["seq"].as_u64().is_some_and(|s| s > after) {
            eprintln!(
                "  {} {} ms after device_del (source {})",
                m["subject"],
                m["ts_ms"].as_u64().unwrap_or(0).saturating_sub(t0),
                m["data"]["source"]
            );
        }
    }
    (latency, ev)
}

fn verify(app: &mut Appliance, want: &str, when: &str) {
    // Data blocks of the dataset are not cached (primarycache=metadata):
    // this reads the disks that are left.
    let got = app.sha256(DATA);
    app.ensure(got == want, || {
        format!("{DATA} changed {when}: sha256 {got}, want {want}")
    });
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn pulled_disks_degrade_then_suspend_and_the_pool_recovers_after_power_cycle() {
    let test_t0 = Instant::now();
    // The host's sync client, built before the VM boots.
    let client = sync_client().unwrap();
    let mut app = Appliance::boot("disk_failures");
    let first_ready = app.boot_to_ready;

    app.run(&format!(
        "zfs create -o primarycache=metadata {POOL}/hwtest && zfs get -H -o value mounted {POOL}/hwtest | grep -qx yes"
    ));
    let want = app.write_known_data(DATA, 8);
    verify(&mut app, &want, "right after writing");
    let fm = app.run(&format!("zpool get -H -o value failmode {POOL}"));
    assert_eq!(fm.trim(), "wait", "failmode");
    // A laptop, to try an upload while the pool is suspended.
    let bundle = app.enroll("laptop", None);
    let upload = app.vm.run_dir.join("during-suspension.bin");
    write_random_file(&upload, 1 << 20, 44).unwrap();

    // --- first and second pull: DEGRADED, margin 1 then 0, within 5 s.
    let (lat1, ev1) = pull_and_wait(&mut app, 1, 1);
    app.ensure(ev1["data"]["status"] == "degraded", || {
        format!("margin 1 should be status degraded: {ev1}")
    });
    verify(&mut app, &want, "after pulling bay 1");
    let (lat2, ev2) = pull_and_wait(&mut app, 4, 0);
    app.ensure(ev2["data"]["status"] == "critical", || {
        format!("margin 0 should be status critical: {ev2}")
    });
    verify(&mut app, &want, "after pulling bay 4");
    let report = app.report();
    let pool = &report["pools"][0];
    app.ensure(
        pool["state"] == "DEGRADED" && pool["margin"] == 0 && pool["failed"] == 2,
        || format!("report after two pulls: {report:#}"),
    );

    // --- third pull: the pool suspends; the daemon keeps answering.
    let after = app.last_seq(STATE);
    let t0 = app.guest_ms();
    app.unplug_disk(2);
    // Something to write, so the pool's next sync fails and it suspends;
    // in the background, since it blocks on a suspended pool.
    app.run(
        "(setsid sh -c 'dd if=/dev/urandom of=/tank/hwtest/after-third.bin bs=1M count=4 conv=fsync' >/dev/null 2>&1 &) ; true",
    );
    let (ev3, _) = app.wait_event(
        STATE,
        after,
        Duration::from_secs(180),
        "the pool's loss (state beyond DEGRADED, status unavailable) after pulling bay 2",
        |m| {
            let d = &m["data"];
            d["new_state"] != "ONLINE"
                && d["new_state"] != "DEGRADED"
                && d["status"] == "unavailable"
        },
    );
    let lat3 = ev3["ts_ms"].as_u64().unwrap().saturating_sub(t0);
    eprintln!("bay 2 pulled: pool loss published {lat3} ms after device_del\n  {ev3}");
    app.ensure(
        !ev3["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        || format!("no reason in {ev3}"),
    );
    // For the log only: on a suspending pool this can block in the kernel
    // (no signal ends it), so its failure is not the test's.
    match app.vm.sh(
        &format!("timeout 10 zpool list -H -o health {POOL}"),
        Duration::from_secs(20),
    ) {
        Ok(out) => eprintln!("zpool list -o health after the third pull: {out}"),
        Err(e) => eprintln!("zpool list -o health after the third pull: {e:#}"),
    }

    // The component is failed with the reason, and status keeps answering
    // (several times, over half a minute of the suspended pool).
    let deadline = Instant::now() + Duration::from_secs(120);
    let storage = loop {
        let asked = Instant::now();
        let status = app.status_within(Duration::from_secs(10));
        let took = asked.elapsed();
        let c = component(&status, "storage")
            .cloned()
            .unwrap_or(Value::Null);
        eprintln!(
            "appliancectl status answered in {:.1} s: storage {c}",
            took.as_secs_f64()
        );
        if c["state"] == "failed" || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    app.ensure(
        (storage["state"] == "failed" || storage["state"] == "degraded")
            && !storage["reason"].as_str().unwrap_or_default().is_empty(),
        || format!("storage component after losing three disks: {storage}"),
    );
    for _ in 0..3 {
        let status = app.status_within(Duration::from_secs(10));
        app.ensure(component(&status, "storage").is_some(), || {
            format!("no storage component: {status}")
        });
        let report = app.json("timeout 10 appliancectl --json storage report");
        eprintln!(
            "report during the suspension: status {} pools {} reasons {}",
            report["status"],
            report["pools"].as_array().map_or(0, Vec::len),
            report["reasons"]
        );
        app.ensure(
            report["status"] == "unavailable" || report["status"] == "critical",
            || format!("storage report with a suspended pool: {report:#}"),
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    for m in app.events(STATE) {
        if m["seq"].as_u64().is_some_and(|s| s > after) {
            eprintln!(
                "  since the third pull: {} {} margin {} ({})",
                m["ts_ms"], m["data"]["new_state"], m["data"]["new_margin"], m["data"]["source"]
            );
        }
    }
    // An upload now is refused at once, with the reason, not left hanging
    // on the suspended pool.
    let asked = Instant::now();
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(&client)
        .arg("--identity")
        .arg(&bundle)
        .arg("--server")
        .arg(app.sync_addr())
        .arg("push")
        .arg(&upload)
        .output()
        .unwrap();
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "push during the suspension: {} after {:.1} s: {}",
        out.status,
        took.as_secs_f64(),
        stderr.trim()
    );
    app.ensure(
        out.status.code() == Some(1) && stderr.contains("storage unavailable"),
        || format!("the push should be refused as storage unavailable: {out:?}"),
    );
    let before_cycle = app.last_seq(STATE);

    // --- power cycle with the disks back.
    let t_cycle = Instant::now();
    let mut app = app.power_cycle();
    let second_ready = app.boot_to_ready;
    let zs = app.run(&format!("zpool status {POOL}"));
    eprintln!("after the power cycle:\n{zs}");
    verify(&mut app, &want, "after the power cycle");
    let listed = app
        .sync_cmd(&bundle, &["--json", "ls"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap();
    app.ensure(
        listed.contains("\"entries\"") && !listed.contains("during-suspension.bin"),
        || format!("the refused upload is stored, or ls failed: {listed}"),
    );
    // Back to ONLINE with margin 2 (a resilver of the stale disks first).
    let (ev, _) = app.wait_event(
        STATE,
        before_cycle,
        Duration::from_secs(900),
        "ONLINE with margin 2 after the power cycle",
        |m| m["data"]["new_state"] == "ONLINE" && m["data"]["new_margin"] == 2,
    );
    eprintln!(
        "ONLINE again {:.1} s after the power cycle began: {ev}",
        t_cycle.elapsed().as_secs_f64()
    );
    app.run_for(
        &format!("zpool wait -t resilver {POOL}"),
        Duration::from_secs(900),
    );
    let st: Value = app.json(&format!("zpool status -j --json-int {POOL}"));
    let p = &st["pools"][POOL];
    app.ensure(p["state"] == "ONLINE", || format!("{st:#}"));
    let zs = app.run(&format!("zpool status -v {POOL}"));
    eprintln!("after recovery:\n{zs}");
    verify(&mut app, &want, "after recovery");
    let report = app.report();
    eprintln!("report after recovery: {report}");
    app.ensure(
        report["pools"][0]["state"] == "ONLINE" && report["pools"][0]["margin"] == 2,
        || format!("report after recovery: {report:#}"),
    );

    eprintln!(
        "figures: ready {:.1} s / {:.1} s; DEGRADED latency {lat1} ms (pull 1), {lat2} ms (pull 2); loss published {lat3} ms after pull 3; test {:.0} s",
        first_ready.as_secs_f64(),
        second_ready.as_secs_f64(),
        test_t0.elapsed().as_secs_f64()
    );
    assert!(
        lat1 <= DEGRADED_WITHIN_MS && lat2 <= DEGRADED_WITHIN_MS,
        "DEGRADED events took {lat1} ms and {lat2} ms (bound {DEGRADED_WITHIN_MS} ms)"
    );
    app.power_off();
}
