//! The storage manager inside the real daemon, on the simulator backend (the
//! shared fake `Zfs`): `appliancectl storage`, health, metrics and the
//! `storage.*` events on the bus. Real ZFS is proven in QEMU (hw-tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Daemon;

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let out = d.ctl(args);
    assert!(
        out.status.success(),
        "appliancectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn component(d: &Daemon, name: &str) -> serde_json::Value {
    let s = json(d, &["status", "--json"]);
    s["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

#[test]
fn simulator_create_pool_report_quota_scrub_events() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("appliance.toml");
    std::fs::write(&cfg, "version = 1\n[storage]\nbackend = \"simulator\"\npoll_interval_secs = 1\nrequired = true\n").unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);

    // No pool yet: the required storage component keeps the daemon unready.
    let c = component(&d, "storage");
    assert_ne!(c["state"], "ready", "{c}");
    assert_eq!(d.ctl(&["health", "ready"]).status.code(), Some(1));

    // Disks are listed; the boot disk is marked.
    let disks = json(&d, &["storage", "disks", "--json"]);
    let disks = disks.as_array().unwrap();
    assert!(disks.iter().any(|x| x["boot"] == true));
    assert_eq!(
        disks
            .iter()
            .filter(|x| x["id"].as_str().unwrap().starts_with("virtio-SIM"))
            .count(),
        6
    );

    // Bad create-pool requests are refused with typed errors.
    let out = d.ctl(&[
        "storage",
        "create-pool",
        "tank",
        "--layout",
        "raidz2",
        "/dev/disk/by-id/virtio-SIM0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.ctl(&[
        "storage",
        "create-pool",
        "tank",
        "/dev/disk/by-id/virtio-BOOT",
        "/dev/disk/by-id/virtio-SIM1",
        "/dev/disk/by-id/virtio-SIM2",
        "/dev/disk/by-id/virtio-SIM3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("boot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.ctl(&[
        "storage",
        "create-pool",
        "tank",
        "/dev/sdb",
        "/dev/sdc",
        "/dev/sdd",
        "/dev/sde",
    ]);
    assert_eq!(out.status.code(), Some(1));

    // Create the RAID-Z2 pool of six disks.
    let disks: Vec<String> = (0..6)
        .map(|i| format!("/dev/disk/by-id/virtio-SIM{i}"))
        .collect();
    let mut args = vec![
        "storage",
        "create-pool",
        "tank",
        "--layout",
        "raidz2",
        "--json",
    ];
    args.extend(disks.iter().map(String::as_str));
    let created = json(&d, &args);
    assert_eq!(created["pool"], "tank");
    assert!(created["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == "tank/documents"));
    let key = std::path::PathBuf::from(created["key_file"].as_str().unwrap());
    assert!(key.starts_with(state.join("data/keys")), "{key:?}");
    // Idempotent: again reports it done.
    let again = json(&d, &args);
    assert_eq!(again["already_done"], true, "{again}");

    // The report: healthy RAID-Z2 of 6 that survives 2 more, documents encrypted.
    let r = json(&d, &["storage", "report", "--json"]);
    assert_eq!(r["status"], "healthy", "{r}");
    assert_eq!(
        r["redundancy"],
        "RAID-Z2, 6 disks, 0 failed, survives 2 more"
    );
    let pool = &r["pools"][0];
    assert_eq!(pool["margin"], 2);
    let docs = pool["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "tank/documents")
        .unwrap();
    assert_eq!(docs["encrypted"], true);
    assert_eq!(docs["compression"], "zstd");

    // The component turns ready, and so does the daemon.
    let mut ready = false;
    for _ in 0..100 {
        if component(&d, "storage")["state"] == "ready"
            && d.ctl(&["health", "ready"]).status.success()
        {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready, "{}", component(&d, "storage"));

    // Quotas.
    let q = json(
        &d,
        &["storage", "quota", "set", "tank/documents", "50M", "--json"],
    );
    assert!(
        q.as_array()
            .unwrap()
            .iter()
            .any(|x| x["dataset"] == "tank/documents" && x["quota_bytes"] == 50 << 20),
        "{q}"
    );
    let q = json(&d, &["storage", "quota", "get", "tank/documents", "--json"]);
    assert_eq!(q[0]["quota_bytes"], 50 << 20);
    assert_eq!(
        d.ctl(&["storage", "quota", "set", "tank/nope", "1G"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        d.ctl(&["storage", "quota", "set", "tank/documents", "lots"])
            .status
            .code(),
        Some(1)
    );

    // Scrub.
    json(&d, &["storage", "scrub", "start", "tank", "--json"]);
    let s = json(&d, &["storage", "scrub", "status", "tank", "--json"]);
    assert_eq!(s["pool"], "tank");
    assert!(s["scan"].is_object(), "{s}");

    // The events reached the bus's durable log.
    let mut found = false;
    for _ in 0..50 {
        let ev = json(&d, &["events", "replay", "storage.>", "--json"]);
        let subjects: Vec<String> = ev
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["subject"].as_str().unwrap().to_owned())
            .collect();
        if subjects.iter().any(|s| s == "storage.pool.tank.state")
            && subjects
                .iter()
                .any(|s| s.starts_with("storage.scrub.tank."))
        {
            let st = ev
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["subject"] == "storage.pool.tank.state")
                .unwrap();
            assert_eq!(st["data"]["new_state"], "ONLINE");
            assert_eq!(st["data"]["new_margin"], 2);
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(found, "storage events missing");

    // Metrics carry the report.
    let metrics = json(&d, &["status", "--json"])["endpoints"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut body = String::new();
    for _ in 0..50 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        body.clear();
        s.read_to_string(&mut body).unwrap();
        if body.contains("appliance_storage_pool_redundancy_margin{pool=\"tank\"} 2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        body.contains("appliance_storage_pool_redundancy_margin{pool=\"tank\"} 2"),
        "{body}"
    );

    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn without_zfs_storage_is_unavailable_with_the_reason() {
    if std::path::Path::new("/dev/zfs").exists() {
        eprintln!("skipped: this machine has ZFS");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[], &[]);
    let c = component(&d, "storage");
    assert_eq!(c["state"], "unavailable");
    assert!(c["reason"].as_str().unwrap().contains("/dev/zfs"));
    let out = d.ctl(&["storage", "report"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unavailable") && err.contains("/dev/zfs"),
        "{err}"
    );
    assert!(d.ctl(&["health", "ready"]).status.success());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}
