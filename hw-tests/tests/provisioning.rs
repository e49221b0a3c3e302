//! First-boot provisioning of the pool (issue 3's pool and encryption
//! assertions; scenario 1 of issue 8).
//!
//! First boot creates the pool through `appliancectl storage create-pool`
//! (raidz2 of the blank non-boot disks) and the datasets; this test checks
//! the result with zpool/zfs themselves, so it cannot pass vacuously.
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
    let (_, raidz) = vdevs.iter().next().unwrap();
    assert_eq!(raidz["vdev_type"], "raidz", "{raidz:#}");
    assert_eq!(raidz["state"], "ONLINE", "{raidz:#}");
    let disks = raidz["vdevs"].as_object().expect("raidz children");
    assert_eq!(disks.len(), 6, "raidz2 of six disks: {raidz:#}");
    let parity = vm.sh_ok(
        &format!(
            "zpool get -H -o value -p ashift {pool} >/dev/null; zdb -C {pool} | grep -m1 nparity"
        ),
        cmd,
    );
    assert!(
        parity.as_ref().is_ok_and(|p| p.contains("nparity: 2")),
        "not raidz2: {parity:?}"
    );
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
    vm.shutdown(Duration::from_secs(180)).unwrap();
}
