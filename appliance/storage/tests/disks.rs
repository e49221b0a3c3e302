//! Disk snapshot parsers on output captured here (`tests/fixtures/disks/`,
//! see its README) and the eligibility rules for create-pool and replace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use appliance_storage::disks::{
    check_create, check_disk, list_disks, parse_lsblk, parse_mounts, parse_udev_db, parse_wipefs,
    policy_min_disks, pool_members, BlockDevice, DiskPolicy, DiskProblem, DiskSnapshot,
    EligibilityError, FakeDisks, Signature,
};
use appliance_types::storage::StorageLayout;
use appliance_zfs::parse::text;

fn fixture(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The captured machine, with by-id names given to the loop devices (the
/// container has no udev) and the root device number from `stat /`.
fn captured() -> DiskSnapshot {
    let mut snap = DiskSnapshot {
        devices: parse_lsblk(&fixture("disks/lsblk-loops.json")).unwrap(),
        mounts: parse_mounts(&fixture("disks/proc-mounts.txt")),
        boot_devnums: vec!["254:0".into()],
        ..DiskSnapshot::default()
    };
    for (i, id) in [
        "virtio-BLANK",
        "virtio-GPT",
        "virtio-EXT4",
        "virtio-MOUNTED",
    ]
    .iter()
    .enumerate()
    {
        snap.by_id.insert((*id).into(), format!("loop{i}"));
        snap.signatures.insert(
            format!("loop{i}"),
            parse_wipefs(&fixture(&format!("disks/wipefs-loop{i}.json"))).unwrap(),
        );
    }
    snap.by_id.insert("virtio-ROOT".into(), "vda".into());
    // The loop devices stand in for disks (the rules take only type "disk").
    for d in snap.devices.iter_mut().filter(|d| d.kind == "loop") {
        d.kind = "disk".into();
    }
    snap
}

#[test]
fn lsblk_capture_parses() {
    let devs = parse_lsblk(&fixture("disks/lsblk-loops.json")).unwrap();
    let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["loop0", "loop1", "loop2", "loop3", "zram0", "vda"]);
    assert_eq!(devs[0].kind, "loop");
    let vda = &devs[5];
    assert_eq!(vda.kind, "disk");
    assert_eq!(vda.size, 274_877_906_944);
    assert_eq!(vda.devnum, "254:0");
    assert_eq!(vda.mountpoints, ["/"]);
    assert_eq!(devs[3].mountpoints, ["/tmp/h7loop/m"]);
    assert_eq!(devs[0].size, 128 << 20);
    assert!(!devs[0].removable && !devs[0].read_only);
    assert!(devs[0].mountpoints.is_empty(), "[null] is no mount point");
    // Without udev lsblk knows no file system or partition table.
    assert_eq!(devs[2].fstype, None);
}

#[test]
fn lsblk_old_style_strings_and_nesting() {
    let json = r#"{"blockdevices":[{"name":"sda","type":"disk","size":"4000787030016","rm":"0","ro":"1","serial":"WD-123 ","maj:min":"8:0",
      "children":[{"name":"sda1","type":"part","size":"100","mountpoint":"/boot","children":[{"name":"md0","type":"raid1","size":"1"}]}]}]}"#;
    let d = parse_lsblk(json).unwrap();
    assert_eq!(d[0].size, 4_000_787_030_016);
    assert!(d[0].read_only);
    assert_eq!(d[0].serial.as_deref(), Some("WD-123"));
    assert_eq!(d[0].all_mountpoints(), ["/boot"]);
    assert_eq!(d[0].children[0].children[0].kind, "raid1");
    assert!(parse_lsblk("{}").is_err());
    assert!(parse_lsblk("not json").is_err());
    // Hostile nesting is bounded.
    let mut deep = String::from(r#"{"name":"x"}"#);
    for _ in 0..20 {
        deep = format!(r#"{{"name":"x","children":[{deep}]}}"#);
    }
    assert!(parse_lsblk(&format!(r#"{{"blockdevices":[{deep}]}}"#)).is_err());
}

#[test]
fn wipefs_captures_parse() {
    assert!(parse_wipefs(&fixture("disks/wipefs-loop0.json"))
        .unwrap()
        .is_empty());
    let gpt = parse_wipefs(&fixture("disks/wipefs-loop1.json")).unwrap();
    let kinds: Vec<&str> = gpt.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["gpt", "gpt", "PMBR"]);
    let ext4 = parse_wipefs(&fixture("disks/wipefs-loop2.json")).unwrap();
    assert_eq!(
        ext4,
        [Signature {
            kind: "ext4".into(),
            offset: "0x438".into()
        }]
    );
    assert!(parse_wipefs("").unwrap().is_empty());
    assert!(parse_wipefs("{\"x\":1}").is_err());
}

#[test]
fn mounts_and_udev_db_parse() {
    let m = parse_mounts(&fixture("disks/proc-mounts.txt"));
    assert!(m.iter().any(|m| m.source == "/dev/vda" && m.target == "/"));
    assert!(m
        .iter()
        .any(|m| m.source == "/dev/loop3" && m.fstype == "ext4"));
    let esc = parse_mounts("/dev/sdb1 /mnt/my\\040disk ext4 rw 0 0\n/dev/x /a\\777b ext4 rw 0 0\n");
    assert_eq!(esc[0].target, "/mnt/my disk");
    assert_eq!(
        esc[1].target, "/a\\777b",
        "out-of-range escapes stay as they are"
    );
    // Format of /run/udev/data/b<maj>:<min> (udev's database).
    let db = "S:disk/by-id/virtio-ZD1\nS:appliance/bay3\nW:12\nI:1234\nE:ID_SERIAL=ZD1\nE:APPLIANCE_DISK=1\nE:APPLIANCE_BAY=bay3\nG:appliance-disk\nQ:appliance-disk\nV:1\n";
    let p = parse_udev_db(db);
    assert_eq!(p.get("APPLIANCE_BAY").map(String::as_str), Some("bay3"));
    assert_eq!(p.len(), 3);
}

fn refused(
    r: Result<appliance_storage::disks::EligibleDisk, Vec<DiskProblem>>,
) -> Vec<DiskProblem> {
    r.expect_err("should be refused")
}

#[test]
fn eligibility_on_the_captured_machine() {
    let snap = captured();
    let none = BTreeMap::new();
    let pol = DiskPolicy::default();
    let ok = check_disk(&snap, "/dev/disk/by-id/virtio-BLANK", false, &none, &pol).unwrap();
    assert_eq!(ok.kernel, "loop0");
    assert!(ok.overridden.is_empty());
    // The root disk: boot disk and mounted, force or not.
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ROOT",
        true,
        &none,
        &pol,
    ));
    assert!(p.contains(&DiskProblem::BootDisk {
        path: "/dev/disk/by-id/virtio-ROOT".into()
    }));
    assert!(p
        .iter()
        .any(|x| matches!(x, DiskProblem::Mounted { mountpoint, .. } if mountpoint == "/")));
    // Partition table: refused, accepted with force (and reported).
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-GPT",
        false,
        &none,
        &pol,
    ));
    assert!(
        matches!(&p[..], [DiskProblem::HasPartitions { what, .. }] if what == "gpt partition table"),
        "{p:?}"
    );
    let forced = check_disk(&snap, "/dev/disk/by-id/virtio-GPT", true, &none, &pol).unwrap();
    assert_eq!(forced.overridden.len(), 1);
    // File system signature: same.
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-EXT4",
        false,
        &none,
        &pol,
    ));
    assert!(matches!(&p[..], [DiskProblem::HasSignature { what, .. }] if what == "ext4"));
    assert!(p[0].forceable());
    assert!(check_disk(&snap, "/dev/disk/by-id/virtio-EXT4", true, &none, &pol).is_ok());
    // Mounted: never, even with force.
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-MOUNTED",
        true,
        &none,
        &pol,
    ));
    assert!(
        matches!(&p[..], [DiskProblem::Mounted { mountpoint, .. }] if mountpoint == "/tmp/h7loop/m"),
        "{p:?}"
    );
    // Names.
    let p = refused(check_disk(&snap, "/dev/loop0", false, &none, &pol));
    assert!(matches!(p[0], DiskProblem::NotById { .. }));
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-NOPE",
        false,
        &none,
        &pol,
    ));
    assert!(matches!(p[0], DiskProblem::NotFound { .. }));
    assert!(p[0].to_string().contains("virtio-NOPE"));
}

fn six() -> DiskSnapshot {
    FakeDisks::blank_disks(&["ZD1", "ZD2", "ZD3", "ZD4", "ZD5", "ZD6"], 256 << 20)
}

fn ids(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("/dev/disk/by-id/virtio-ZD{i}"))
        .collect()
}

#[test]
fn layout_minimums() {
    assert_eq!(policy_min_disks(StorageLayout::Raidz2), 4);
    assert_eq!(policy_min_disks(StorageLayout::Raidz1), 3);
    assert_eq!(policy_min_disks(StorageLayout::Raidz3), 5);
    assert_eq!(policy_min_disks(StorageLayout::Mirror), 2);
    let snap = six();
    let pol = DiskPolicy::default();
    let none = BTreeMap::new();
    let e = check_create(&snap, StorageLayout::Raidz2, &ids(3), false, &none, &pol).unwrap_err();
    assert_eq!(
        e,
        EligibilityError::TooFewDisks {
            layout: "raidz2",
            min: 4,
            given: 3
        }
    );
    assert_eq!(
        check_create(&snap, StorageLayout::Raidz2, &ids(4), false, &none, &pol)
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        check_create(&snap, StorageLayout::Raidz2, &ids(6), false, &none, &pol)
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn the_same_disk_twice_and_boot_disk_by_ptuuid() {
    let mut snap = six();
    snap.by_id.insert("wwn-0x5000".into(), "vdb".into());
    let mut disks = ids(4);
    disks.push("/dev/disk/by-id/wwn-0x5000".into());
    let none = BTreeMap::new();
    let e = check_create(
        &snap,
        StorageLayout::Raidz2,
        &disks,
        false,
        &none,
        &DiskPolicy::default(),
    )
    .unwrap_err();
    let EligibilityError::Refused(p) = e else {
        panic!()
    };
    assert_eq!(
        p,
        [DiskProblem::Duplicate {
            path: "/dev/disk/by-id/wwn-0x5000".into(),
            other: "/dev/disk/by-id/virtio-ZD1".into()
        }]
    );
    // A boot disk not mounted (booted from elsewhere) but carrying the
    // image's partition-table GUID, or tagged by our udev rule.
    let guid = "5f1e3b2a-6c0d-4e8f-9a71-3b2c4d5e6f70";
    snap.devices[2].ptuuid = Some(guid.to_uppercase());
    let pol = DiskPolicy {
        boot_ptuuid: Some(guid.into()),
    };
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD2",
        true,
        &none,
        &pol,
    ));
    assert!(p.contains(&DiskProblem::BootDisk {
        path: "/dev/disk/by-id/virtio-ZD2".into()
    }));
    snap.udev.insert(
        "vdd".into(),
        [("APPLIANCE_BOOT_DISK".to_owned(), "1".to_owned())].into(),
    );
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD3",
        true,
        &none,
        &DiskPolicy::default(),
    ));
    assert!(matches!(p[0], DiskProblem::BootDisk { .. }));
}

#[test]
fn partitions_holders_small_removable() {
    let mut snap = six();
    let part = |name: &str, children: Vec<BlockDevice>| BlockDevice {
        name: name.into(),
        kind: "part".into(),
        size: 1 << 20,
        children,
        ..BlockDevice::default()
    };
    snap.devices[1].children = vec![part("vdb1", vec![])];
    snap.devices[2].children = vec![part(
        "vdc1",
        vec![BlockDevice {
            name: "md0".into(),
            kind: "raid1".into(),
            ..BlockDevice::default()
        }],
    )];
    snap.devices[3].size = 1 << 20;
    snap.devices[4].removable = true;
    snap.devices[5].read_only = true;
    snap.by_id.insert("virtio-ZD1-part1".into(), "vdb1".into());
    let none = BTreeMap::new();
    let pol = DiskPolicy::default();
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD1",
        false,
        &none,
        &pol,
    ));
    assert!(matches!(&p[..], [DiskProblem::HasPartitions { what, .. }] if what == "1 partitions"));
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD1-part1",
        true,
        &none,
        &pol,
    ));
    assert!(matches!(&p[..], [DiskProblem::NotAWholeDisk { kind, .. }] if kind == "part"));
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD2",
        true,
        &none,
        &pol,
    ));
    assert!(
        matches!(&p[0], DiskProblem::Held { holder, .. } if holder == "md0"),
        "{p:?}"
    );
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD3",
        true,
        &none,
        &pol,
    ));
    assert!(matches!(p[0], DiskProblem::TooSmall { .. }));
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD4",
        true,
        &none,
        &pol,
    ));
    assert!(matches!(p[0], DiskProblem::Removable { .. }));
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD5",
        true,
        &none,
        &pol,
    ));
    assert!(matches!(p[0], DiskProblem::ReadOnly { .. }));
}

#[test]
fn pool_members_come_from_zpool_status_and_show_in_the_list() {
    let mut snap = six();
    for (i, l) in ["b", "c", "d", "e", "f", "g"].iter().enumerate() {
        snap.by_id
            .insert(format!("virtio-ZD{}-part1", i + 1), format!("vd{l}1"));
        snap.devices[i + 1].children.push(BlockDevice {
            name: format!("vd{l}1"),
            kind: "part".into(),
            size: 200 << 20,
            ..BlockDevice::default()
        });
    }
    // ZD2 was pulled: it is gone from the machine but still in the pool.
    snap.devices.remove(2);
    snap.by_id.retain(|k, _| !k.starts_with("virtio-ZD2"));
    let status = text::parse_zpool_status(&fixture("text/zpool-status-p.removed1.txt"))
        .unwrap()
        .remove(0);
    let members = pool_members(&snap, std::slice::from_ref(&status));
    assert_eq!(members.get("vdb").map(String::as_str), Some("tank"));
    assert_eq!(members.len(), 5);
    let p = refused(check_disk(
        &snap,
        "/dev/disk/by-id/virtio-ZD1",
        true,
        &members,
        &DiskPolicy::default(),
    ));
    assert!(p.contains(&DiskProblem::InPool {
        path: "/dev/disk/by-id/virtio-ZD1".into(),
        pool: "tank".into()
    }));
    let list = list_disks(&snap, std::slice::from_ref(&status), &DiskPolicy::default());
    let boot = list
        .iter()
        .find(|d| d.dev.as_deref() == Some("vda"))
        .unwrap();
    assert!(boot.boot);
    let zd1 = list.iter().find(|d| d.id == "virtio-ZD1").unwrap();
    assert_eq!(zd1.pool.as_deref(), Some("tank"));
    assert_eq!(zd1.state.as_deref(), Some("ONLINE"));
    assert_eq!(zd1.serial.as_deref(), Some("ZD1"));
    let zd2 = list.iter().find(|d| d.id == "virtio-ZD2").unwrap();
    assert_eq!(zd2.state.as_deref(), Some("REMOVED"));
    assert!(zd2.path.is_none());
    assert_eq!(list.len(), 7);
}

fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    // Copied into place by `cp`, so this process never holds the script
    // open for writing: a fork by a parallel test in that window would make
    // its exec fail with ETXTBSY.
    let source = dir.join(format!("{name}.source"));
    std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
    assert!(std::process::Command::new("cp")
        .arg(&source)
        .arg(&p)
        .status()
        .unwrap()
        .success());
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn system_inventory_with_mimic_tools() {
    use appliance_storage::disks::{DiskError, DiskInventory, SystemDisks};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    // The loop devices stand in for disks (only whole disks are probed).
    let lsblk_json =
        fixture("disks/lsblk-loops.json").replace("\"type\": \"loop\"", "\"type\": \"disk\"");
    let lsblk = script(
        dir.path(),
        "lsblk",
        &format!("cat <<'EOF'\n{lsblk_json}\nEOF"),
    );
    let wipefs = script(
        dir.path(),
        "wipefs",
        &format!(
            "case \"$3\" in /dev/loop2) cat <<'EOF'\n{}\nEOF\n;; /dev/loop3) exit 1;; *) echo '{{\"signatures\": []}}';; esac",
            fixture("disks/wipefs-loop2.json")
        ),
    );
    let by_id = dir.path().join("by-id");
    std::fs::create_dir(&by_id).unwrap();
    std::os::unix::fs::symlink("../../loop0", by_id.join("virtio-BLANK")).unwrap();
    let inv = SystemDisks {
        lsblk: lsblk.clone(),
        wipefs,
        by_id_dir: by_id,
        mounts: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/disks/proc-mounts.txt"),
        udev_data: dir.path().join("no-udev"),
        timeout: Duration::from_secs(10),
    };
    let snap = inv.snapshot().await.unwrap();
    assert_eq!(snap.devices.len(), 6);
    assert_eq!(
        snap.by_id.get("virtio-BLANK").map(String::as_str),
        Some("loop0")
    );
    assert!(snap.signatures["loop0"].is_empty());
    assert_eq!(snap.signatures["loop2"][0].kind, "ext4");
    // A disk wipefs cannot probe is never taken without --force.
    assert_eq!(snap.signatures["loop3"][0].kind, "unreadable");
    assert!(snap.mounts.iter().any(|m| m.target == "/"));
    assert!(
        !snap.boot_devnums.is_empty(),
        "stat / always gives a device number"
    );

    // A hung lsblk is cut off by the timeout.
    let slow = script(dir.path(), "slow-lsblk", "sleep 30");
    let inv = SystemDisks {
        lsblk: slow,
        timeout: Duration::from_millis(200),
        ..inv
    };
    let started = std::time::Instant::now();
    let e = inv.snapshot().await.unwrap_err();
    assert!(
        matches!(e, DiskError::Command { ref reason, .. } if reason.contains("timed out")),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
