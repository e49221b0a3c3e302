//! First-boot provisioning of the pool (issue 3's pool and encryption
//! assertions; scenario 1 of issue 8).
//!
//! First boot creates the pool through `appliancectl storage create-pool`
//! (raidz2 of the blank non-boot disks) and the datasets; this test checks
//! the result with zpool/zfs themselves, so it cannot pass vacuously. Then
//! `appliancectl --json storage report` must say what zpool and zfs say
//! (scenario 1): state, sizes, layout and margin, datasets.
//!
//! Run: `cargo test -p appliance-hw-tests --test provisioning -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_hw_tests::image::{ensure_image, run_dir};
use appliance_hw_tests::vm::{data_disk_serial, Vm, VmConfig};
use serde_json::Value;

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn first_boot_creates_raidz2_of_six_disks_with_encrypted_documents() {
    let image = ensure_image().unwrap();
    let cfg = VmConfig::new(image, run_dir("provisioning"));
    let mut vm = Vm::start(&cfg).unwrap();
    if let Err(e) = vm.wait_ready(Duration::from_secs(900)) {
        let diag = vm.diagnostics();
        panic!("{e:#}\n{diag}");
    }
    let cmd = Duration::from_secs(60);

    // Exactly one pool, ONLINE, one raidz2 vdev of the six data disks.
    let pools = vm.sh("zpool list -H -o name", cmd).unwrap();
    let names: Vec<&str> = pools.stdout.lines().collect();
    if names.len() != 1 {
        let diag = vm.diagnostics();
        panic!("expected one pool after first boot, found {names:?} ({pools})\n{diag}");
    }
    let pool = names[0].to_owned();
    let status = vm
        .sh_ok(&format!("zpool status -j --json-int {pool}"), cmd)
        .unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    let p = &status["pools"][&pool];
    assert_eq!(p["state"], "ONLINE", "{status:#}");
    let vdevs = p["vdevs"][&pool]["vdevs"]
        .as_object()
        .expect("root vdev children");
    assert_eq!(vdevs.len(), 1, "one top-level vdev: {status:#}");
    let (raidz_name, raidz) = vdevs.iter().next().unwrap();
    assert_eq!(raidz["vdev_type"], "raidz", "{raidz:#}");
    // ZFS names a top-level RAID-Z vdev after its parity: raidz2-N.
    assert!(
        raidz_name.starts_with("raidz2-"),
        "not raidz2: {raidz_name} {raidz:#}"
    );
    assert_eq!(raidz["state"], "ONLINE", "{raidz:#}");
    let disks = raidz["vdevs"].as_object().expect("raidz children");
    assert_eq!(disks.len(), 6, "raidz2 of six disks: {raidz:#}");
    for i in 0..6 {
        let serial = data_disk_serial(i);
        let by_id = vm.sh_ok(
            &format!("zpool status -P {pool} | grep -c virtio-{serial}"),
            cmd,
        );
        assert!(
            by_id.is_ok(),
            "disk {serial} is not in the pool (by-id path)"
        );
    }

    // documents is encrypted, with its key on the state partition.
    let enc = vm
        .sh_ok(
            &format!("zfs get -H -o value encryption,keylocation,keystatus {pool}/documents"),
            cmd,
        )
        .unwrap();
    let vals: Vec<&str> = enc.lines().collect();
    assert_eq!(vals.first().copied(), Some("aes-256-gcm"), "{enc}");
    assert!(
        vals.get(1)
            .is_some_and(|l| l.starts_with("file:///var/lib/appliance/")),
        "{enc}"
    );
    assert_eq!(vals.get(2).copied(), Some("available"), "{enc}");

    report_matches_zfs(&mut vm, &pool, &status);
    vm.shutdown(Duration::from_secs(180)).unwrap();
}

/// Whether `a` and `b` differ by at most `tol` bytes.
fn near(a: &Value, b: u64, tol: u64) -> bool {
    a.as_u64().is_some_and(|a| a.abs_diff(b) <= tol)
}

/// Scenario 1: `appliancectl --json storage report` says what zpool and zfs
/// say (pool state, raw size/alloc/free, usable space of the root dataset,
/// the raidz2-of-six layout with margin 2, the datasets and encryption).
/// Sizes agree within 1 MiB: allocations move between the two reads (the
/// daemon's last poll is up to 10 s old), nothing else may differ.
fn report_matches_zfs(vm: &mut Vm, pool: &str, status: &Value) {
    let cmd = Duration::from_secs(60);
    const TOL: u64 = 1 << 20;
    // A fresh poll before reading the report (and a quiet pool).
    vm.sh_ok("sync; sleep 11", cmd).unwrap();
    let report: Value =
        serde_json::from_str(&vm.sh_ok("appliancectl --json storage report", cmd).unwrap())
            .unwrap();
    let list = vm
        .sh_ok(
            &format!("zpool list -Hp -o name,size,alloc,free,health {pool}"),
            cmd,
        )
        .unwrap();
    let cols: Vec<&str> = list.trim().split('\t').collect();
    assert_eq!(cols.len(), 5, "{list}");
    let num = |i: usize| cols[i].parse::<u64>().unwrap();
    let (size, alloc, free) = (num(1), num(2), num(3));
    let datasets = vm
        .sh_ok(
            &format!("zfs list -Hp -r -o name,used,avail,encryption {pool}"),
            cmd,
        )
        .unwrap();
    let datasets: Vec<Vec<&str>> = datasets.lines().map(|l| l.split('\t').collect()).collect();
    eprintln!("storage report: {report:#}\nzpool list: {list}");

    assert_eq!(report["status"], "healthy", "{report:#}");
    assert_eq!(
        report["pools"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    let p = &report["pools"][0];
    assert_eq!(p["name"], pool);
    assert_eq!(p["state"], cols[4], "state vs zpool list");
    assert_eq!(
        p["state"], status["pools"][pool]["state"],
        "state vs zpool status"
    );
    assert!(near(&p["raw_size_bytes"], size, 0), "size {size}: {p:#}");
    assert!(
        near(&p["raw_allocated_bytes"], alloc, TOL),
        "alloc {alloc}: {p:#}"
    );
    assert!(
        near(&p["raw_size_bytes"], alloc + free, TOL),
        "size != alloc + free ({alloc} + {free}): {p:#}"
    );
    // Usable space: the root dataset's used and available.
    let root = datasets.iter().find(|d| d[0] == pool).unwrap();
    let (used, avail) = (
        root[1].parse::<u64>().unwrap(),
        root[2].parse::<u64>().unwrap(),
    );
    assert!(near(&p["used_bytes"], used, TOL), "used {used}: {p:#}");
    assert!(near(&p["free_bytes"], avail, TOL), "avail {avail}: {p:#}");
    assert!(
        near(&report["total_bytes"], used + avail, 2 * TOL),
        "{report:#}"
    );
    // Layout: one raidz2 of six (checked against zpool status above), no
    // failures, two more survivable.
    assert_eq!(p["disks"], 6, "{p:#}");
    assert_eq!(p["failed"], 0, "{p:#}");
    assert_eq!(p["margin"], 2, "{p:#}");
    assert_eq!(
        p["redundancy"], "RAID-Z2, 6 disks, 0 failed, survives 2 more",
        "{p:#}"
    );
    assert_eq!(report["redundancy"], p["redundancy"]);
    assert_eq!(p["failed_devices"], Value::Array(vec![]), "{p:#}");
    // Datasets: the same names, sizes and encryption.
    let rep: Vec<&Value> = p["datasets"].as_array().unwrap().iter().collect();
    let mut want: Vec<&str> = datasets.iter().map(|d| d[0]).collect();
    let mut got: Vec<&str> = rep.iter().map(|d| d["name"].as_str().unwrap()).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "datasets");
    assert!(
        want.contains(&format!("{pool}/documents").as_str()),
        "{want:?}"
    );
    for d in &datasets {
        let r = rep.iter().find(|r| r["name"] == d[0]).unwrap();
        assert!(
            near(&r["used_bytes"], d[1].parse().unwrap(), TOL),
            "{d:?}: {r}"
        );
        assert!(
            near(&r["available_bytes"], d[2].parse().unwrap(), TOL),
            "{d:?}: {r}"
        );
        assert_eq!(r["encrypted"], d[3] != "off", "{d:?}: {r}");
        if d[3] != "off" {
            assert_eq!(r["key_loaded"], true, "{d:?}: {r}");
        }
    }
}
