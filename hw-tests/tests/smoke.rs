//! The image smoke test (issue 3): the real image, booted from disk (no
//! `-kernel`) under OVMF in QEMU/TCG with six data disks.
//!
//! Run: `cargo test -p appliance-hw-tests --test smoke -- --ignored --nocapture`
//! (as root: it builds the image first if its inputs changed).
//!
//! One test, two boots of the same disks, so that only one VM runs at a time
//! on a 2-core machine:
//! 1. first boot: multi-user.target with no failed unit; applianced active
//!    and ready; the udev bay links, tags and scheduler (also through
//!    `udevadm test`); the boot disk left out; the first-boot key written;
//!    no disk of the new pool disturbed (no state change, I/O or checksum
//!    error, or resilver), and no udev watch on data disks or their
//!    partitions;
//! 2. second boot: ready again, the pool undisturbed, and the first boot
//!    changed nothing (same key, every step skipped).
//!
//! The pool and `documents` assertions wait for the storage manager: see
//! tests/provisioning.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use appliance_hw_tests::image::{ensure_image, run_dir};
use appliance_hw_tests::vm::{data_disk_serial, Vm, VmConfig};
use serde_json::Value;

const READY_TIMEOUT: Duration = Duration::from_secs(900);
const CMD: Duration = Duration::from_secs(60);

/// Runs a command that must succeed; on failure panics with the console and
/// journal tails.
fn run(vm: &mut Vm, script: &str) -> String {
    match vm.sh_ok(script, CMD) {
        Ok(out) => out,
        Err(e) => {
            let diag = vm.diagnostics();
            panic!("{e:#}\n{diag}");
        }
    }
}

/// The pool is in `/etc/zfs/zpool.cache` soon after it is created (within 45 s
/// of ready), so a restart right after provisioning imports it. applianced
/// cannot write that file (it runs sandboxed, /etc read-only), and ZFS's own
/// retry comes about five minutes later; appliance-zfs-mount writes it.
/// On disks under about 1 GiB ZED's relabelling wrote it too, which hid
/// this: with 2 GiB disks a second boot found no pool.
fn assert_pool_cached(vm: &mut Vm) {
    let out = run(
        vm,
        "for i in $(seq 45); do \
           grep -qa tank /etc/zfs/zpool.cache 2>/dev/null && { echo cached; exit 0; }; \
           sleep 1; \
         done; ls -l /etc/zfs; journalctl -b -u appliance-zfs-mount --no-pager -o cat | tail -20",
    );
    ensure(
        vm,
        out.trim() == "cached",
        &format!("the pool is not in /etc/zfs/zpool.cache 45 s after ready:\n{out}"),
    );
}

fn ensure(vm: &mut Vm, ok: bool, what: &str) {
    if !ok {
        let diag = vm.diagnostics();
        panic!("{what}\n{diag}");
    }
}

fn wait_ready(vm: &mut Vm) -> Duration {
    match vm.wait_ready(READY_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            let diag = vm.diagnostics();
            panic!("{e:#}\n{diag}");
        }
    }
}

/// True if some object in `v` has `name == component` and `state == state`.
fn has_component(v: &Value, component: &str, state: &str) -> bool {
    match v {
        Value::Object(m) => {
            (m.get("name").and_then(Value::as_str) == Some(component)
                && m.get("state").and_then(Value::as_str) == Some(state))
                || m.values().any(|x| has_component(x, component, state))
        }
        Value::Array(a) => a.iter().any(|x| has_component(x, component, state)),
        _ => false,
    }
}

fn assert_system_healthy(vm: &mut Vm) {
    // Waits until boot has finished; "running" means no unit failed.
    let state = vm
        .sh(
            "systemctl is-system-running --wait",
            Duration::from_secs(300),
        )
        .unwrap();
    let failed = run(
        vm,
        "systemctl list-units --failed --plain --no-legend --no-pager",
    );
    ensure(
        vm,
        state.stdout.trim() == "running" && failed.trim().is_empty(),
        &format!(
            "system state {:?}, failed units:\n{failed}",
            state.stdout.trim()
        ),
    );
    let target = run(vm, "systemctl is-active multi-user.target");
    ensure(
        vm,
        target.trim() == "active",
        "multi-user.target is not active",
    );
}

fn assert_daemon_ready(vm: &mut Vm) {
    let active = run(vm, "systemctl is-active applianced.service");
    ensure(vm, active.trim() == "active", "applianced is not active");
    run(vm, "appliancectl health ready");
    let status: Value = serde_json::from_str(&run(vm, "appliancectl status --json")).unwrap();
    ensure(
        vm,
        has_component(&status, "storage", "ready"),
        &format!("storage is not ready in appliancectl status: {status:#}"),
    );
}

/// ZFS event classes that mean a disk of the pool was disturbed: it changed
/// state, failed I/O, returned bad data, or was resilvered. A boot of healthy
/// disks has none of them (the events are those since the module loaded,
/// i.e. this boot's).
const DISTURBED: [&str; 6] = [
    "resource.fs.zfs.statechange",
    "sysevent.fs.zfs.resilver_start",
    "ereport.fs.zfs.checksum",
    "ereport.fs.zfs.io",
    "ereport.fs.zfs.vdev.",
    "ereport.fs.zfs.probe_failure",
];

/// The class of a `zpool events -H` line: its last field, after the time.
fn event_class(line: &str) -> &str {
    line.split_whitespace().last().unwrap_or_default()
}

/// udev keeps no inotify watch on a data disk or any of its partitions, and
/// keeps one on the boot disk (so that the check can fail). A watch turns
/// each close after a write into an event on which ZED reopens the pool (see
/// 62-appliance-disks.rules). udev records a watch as a pair of symlinks
/// pointing at each other, `/run/udev/watch/b<major>:<minor>` and
/// `/run/udev/watch/<number>`, hence `test -L`. Run after `udevadm settle`:
/// udev lifts a device's watch while it handles an event of it.
fn assert_watches(vm: &mut Vm) {
    run(vm, "udevadm settle --timeout=60");
    // One line per disk or partition of the boot disk and the data disks:
    // "<kind> <name> watched|unwatched", kind boot, boot-part, data or
    // data-part.
    let script = r#"set -e
for d in /sys/class/block/*; do
  n=$(basename "$d")
  disk=$n
  if [ -e "$d/partition" ]; then disk=$(basename "$(readlink -f "$d/..")"); fi
  p=$(udevadm info --query=property --name="$disk")
  case "$p" in
    *APPLIANCE_BOOT_DISK=1*) kind=boot ;;
    *APPLIANCE_DISK=1*) kind=data ;;
    *) continue ;;
  esac
  if [ -e "$d/partition" ]; then kind=$kind-part; fi
  num=$(cat "$d/dev")
  if [ -L "/run/udev/watch/b$num" ]; then w=watched; else w=unwatched; fi
  echo "$kind $n $w"
done"#;
    let out = run(vm, script);
    let rows: Vec<(&str, &str)> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.nth(1)?))
        })
        .collect();
    let count = |kind: &str| rows.iter().filter(|(k, _)| *k == kind).count();
    let wrong = rows.iter().any(|(kind, w)| match *kind {
        "boot" => *w != "watched",
        "data" | "data-part" => *w != "unwatched",
        _ => false,
    });
    ensure(
        vm,
        count("boot") == 1 && count("data") == 6 && count("data-part") >= 12 && !wrong,
        &format!(
            "udev watches (want: the boot disk watched; the 6 data disks and \
             their partitions not):\n{out}"
        ),
    );
}

/// Nothing disturbed the pool this boot (see [`DISTURBED`]); `zpool history`
/// says how often ZED reopened it, for the log.
fn assert_pool_undisturbed(vm: &mut Vm, boot: &str, start: &str) {
    let events = run(vm, "zpool events -H");
    // The list reaches back to the pool's creation or import, so that an
    // empty or cut list cannot pass for a quiet one.
    ensure(
        vm,
        events.lines().any(|l| event_class(l) == start),
        &format!("{boot} boot: no {start} in zpool events:\n{events}"),
    );
    let bad: Vec<&str> = events
        .lines()
        .filter(|l| DISTURBED.iter().any(|d| event_class(l).starts_with(d)))
        .collect();
    let reopens = run(vm, "zpool history -il | grep -c 'ioctl reopen' || true");
    eprintln!("smoke: {boot} boot: {} pool reopens", reopens.trim());
    ensure(
        vm,
        bad.is_empty(),
        &format!(
            "{boot} boot: the pool's disks were disturbed:\n{}",
            bad.join("\n")
        ),
    );
}

fn assert_bays(vm: &mut Vm) {
    for i in 0..6 {
        let serial = data_disk_serial(i);
        let bay = format!("bay{i}");
        // The bay link and the by-id (serial) link are the same disk.
        let dev = run(vm, &format!("readlink -f /dev/appliance/{bay}"));
        let by_id = run(vm, &format!("readlink -f /dev/disk/by-id/virtio-{serial}"));
        ensure(
            vm,
            dev.trim() == by_id.trim(),
            &format!("/dev/appliance/{bay} -> {dev}, serial {serial} -> {by_id}"),
        );
        let dev = dev.trim().to_owned();
        let props = run(vm, &format!("udevadm info --query=property --name={dev}"));
        for want in [
            "APPLIANCE_DISK=1",
            &format!("APPLIANCE_BAY={bay}"),
            &format!("ID_SERIAL={serial}"),
        ] {
            ensure(
                vm,
                props.lines().any(|l| l == want),
                &format!("{dev}: no {want} in\n{props}"),
            );
        }
        ensure(
            vm,
            props
                .lines()
                .any(|l| l.starts_with("TAGS=") && l.contains(":appliance-disk:")),
            &format!("{dev} is not tagged appliance-disk:\n{props}"),
        );
        let name = dev.trim_start_matches("/dev/");
        let sched = run(vm, &format!("cat /sys/block/{name}/queue/scheduler"));
        ensure(
            vm,
            sched.contains("[none]"),
            &format!("{dev} scheduler: {sched}"),
        );
    }
    let links = run(vm, "ls /dev/appliance | sort | tr '\\n' ' '");
    ensure(
        vm,
        links.trim() == "bay0 bay1 bay2 bay3 bay4 bay5",
        &format!("/dev/appliance holds: {links}"),
    );

    // The boot disk (the one holding /) is no data disk.
    let boot = run(vm, "lsblk -no PKNAME \"$(findmnt -no SOURCE /)\"");
    let props = run(
        vm,
        &format!("udevadm info --query=property --name=/dev/{}", boot.trim()),
    );
    ensure(
        vm,
        !props.contains("APPLIANCE_DISK=1") && props.contains("APPLIANCE_BOOT_DISK=1"),
        &format!(
            "the boot disk {} is treated as a data disk:\n{props}",
            boot.trim()
        ),
    );

    // The rules themselves, through `udevadm test` (a dry run of an add
    // event: what the rules would set, without applying it).
    let dev = run(
        vm,
        &format!("readlink -f /dev/disk/by-id/virtio-{}", data_disk_serial(3)),
    );
    let name = dev.trim().trim_start_matches("/dev/").to_owned();
    let out = vm
        .sh(
            &format!("udevadm test --action=add /sys/class/block/{name} 2>&1"),
            CMD,
        )
        .unwrap();
    ensure(
        vm,
        out.success()
            && out.stdout.contains("APPLIANCE_BAY=bay3")
            && out.stdout.contains("appliance/bay3")
            && out.stdout.contains("62-appliance-disks.rules"),
        &format!("udevadm test {name}: {out}"),
    );
    let out = vm
        .sh(
            &format!(
                "udevadm test --action=add /sys/class/block/{} 2>&1",
                boot.trim()
            ),
            CMD,
        )
        .unwrap();
    ensure(
        vm,
        out.success()
            && out.stdout.contains("APPLIANCE_BOOT_DISK=1")
            && !out.stdout.contains("APPLIANCE_DISK=1"),
        &format!("udevadm test boot disk: {out}"),
    );
}

const KEY: &str = "/var/lib/appliance/keys/tank-documents.key";

fn key_fingerprint(vm: &mut Vm) -> String {
    run(
        vm,
        &format!("stat -c '%s %U %a' {KEY} && sha256sum < {KEY}"),
    )
}

#[test]
#[ignore = "boots the image in QEMU/TCG (minutes, root): cargo test -p appliance-hw-tests --test smoke -- --ignored"]
fn image_boots_from_disk_to_ready_with_six_disks_and_second_boot_changes_nothing() {
    let image = ensure_image().unwrap();
    let mut cfg = VmConfig::new(image, run_dir("smoke"));
    // Disks past the size at which ZED takes every event for growth and
    // relabels (under about 1 GiB): the smaller ones hid that the pool's
    // cache file was left unwritten (see assert_pool_cached). Sparse: they
    // cost only what is written.
    cfg.data_disk_mib = 2048;

    // First boot, blank data disks. What does not need the daemon is
    // checked first, so that a daemon failure still leaves these verified.
    let mut vm = Vm::start(&cfg).unwrap();
    if let Err(e) = vm.agent(READY_TIMEOUT) {
        panic!("{e:#}");
    }
    assert_bays(&mut vm);
    // The state partition is mounted and holds the key first boot made.
    let mnt = run(&mut vm, "findmnt -no SOURCE,FSTYPE /var/lib/appliance");
    ensure(
        &mut vm,
        mnt.contains("ext4"),
        &format!("/var/lib/appliance is not the state partition: {mnt}"),
    );
    let key = key_fingerprint(&mut vm);
    ensure(
        &mut vm,
        key.starts_with("32 appliance 400"),
        &format!("{KEY}: {key}"),
    );
    let log = run(
        &mut vm,
        "journalctl -b -t appliance-firstboot --no-pager -o cat",
    );
    ensure(
        &mut vm,
        log.contains("documents-key: generated"),
        &format!("first-boot journal:\n{log}"),
    );

    let first = wait_ready(&mut vm);
    eprintln!(
        "smoke: first boot: ready {:.1} s after QEMU started",
        first.as_secs_f64()
    );
    assert_system_healthy(&mut vm);
    assert_watches(&mut vm);
    assert_pool_undisturbed(&mut vm, "first", "sysevent.fs.zfs.pool_create");
    assert_daemon_ready(&mut vm);
    assert_pool_cached(&mut vm);
    vm.shutdown(Duration::from_secs(180)).unwrap();

    // Second boot of the same disks: nothing changes.
    cfg.fresh = false;
    let mut vm = Vm::start(&cfg).unwrap();
    let second = wait_ready(&mut vm);
    eprintln!(
        "smoke: second boot: ready {:.1} s after QEMU started",
        second.as_secs_f64()
    );
    assert_system_healthy(&mut vm);
    assert_watches(&mut vm);
    assert_pool_undisturbed(&mut vm, "second", "sysevent.fs.zfs.pool_import");
    assert_daemon_ready(&mut vm);
    // Imported from the cache file the first boot wrote, not by the scan
    // that stands in when there is none.
    let import = run(
        &mut vm,
        "systemctl is-active zfs-import-cache.service zfs-import-scan.service || true",
    );
    ensure(
        &mut vm,
        import.split_whitespace().collect::<Vec<_>>() == ["active", "inactive"],
        &format!("zfs-import-cache, zfs-import-scan: {import}"),
    );
    let key2 = key_fingerprint(&mut vm);
    ensure(
        &mut vm,
        key == key2,
        &format!("the key changed on the second boot: {key} -> {key2}"),
    );
    let log = run(
        &mut vm,
        "journalctl -b -t appliance-firstboot --no-pager -o cat",
    );
    // Once first boot is complete its units are skipped (their condition
    // is the completion record), so no step may run again; if they do run,
    // every step must find itself done.
    run(&mut vm, "test -e /var/lib/appliance/firstboot/complete");
    ensure(
        &mut vm,
        !log.contains("generated") && !log.contains("running"),
        &format!("second boot's first-boot journal:\n{log}"),
    );
    run(&mut vm, "test -e /dev/appliance/bay5");
    vm.shutdown(Duration::from_secs(180)).unwrap();
    eprintln!(
        "smoke: boot-to-ready {:.1} s (first boot), {:.1} s (second boot)",
        first.as_secs_f64(),
        second.as_secs_f64()
    );
}
