//! Scenario 7 of issue 8: power cut during an upload.
//!
//! The host pushes a 150 MiB file; once part of it is durably staged (the
//! upload's `<key>.landed` record in the client's `.appliance-staging` is
//! not empty: at least one 16 MiB sync batch), QEMU gets SIGKILL and the
//! same disks boot again. Then:
//! - the pool imports cleanly: ONLINE, no known data errors;
//! - no partial document is visible (not in the tree, not in `ls`);
//! - the staging area was swept: junk planted there before the cut is gone,
//!   only the resumable pair `<key>.data` + `<key>.landed` is kept;
//! - pushing the same file again resumes: it sends at most the bytes the
//!   durable record does not list, completes, and the guest's copy hashes
//!   like the host's; staging is empty afterwards.
//!
//! Run: `cargo test -p appliance-hw-tests --test power_cut -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::{host_sha256, sync_client, write_random_file, Appliance};
use base64::Engine as _;
use serde_json::Value;

const CLIENT: &str = "laptop";
const SIZE: u64 = 150 << 20;

fn staging() -> String {
    format!("/tank/documents/{CLIENT}/.appliance-staging")
}

/// Names in the staging directory, sorted.
fn staging_names(app: &mut Appliance) -> Vec<String> {
    let out = app.run(&format!("ls -A {} | sort", staging()));
    out.lines().map(str::to_owned).collect()
}

/// Bytes listed in the durable record(s): 36-byte entries, hash then u32 LE
/// length.
fn recorded_bytes(app: &mut Appliance) -> (u64, usize) {
    let b64 = app.run(&format!("cat {}/*.landed | base64 -w0", staging()));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap();
    assert_eq!(bytes.len() % 36, 0, "record of {} bytes", bytes.len());
    let total = bytes
        .chunks_exact(36)
        .map(|e| u64::from(u32::from_le_bytes(e[32..36].try_into().unwrap())))
        .sum();
    (total, bytes.len() / 36)
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn upload_cut_by_power_loss_leaves_nothing_partial_and_resumes() {
    let t0 = Instant::now();
    // The host client first, so its build is not timed as the push.
    appliance_hw_tests::scenario::sync_client().unwrap();
    let mut app = Appliance::boot("power_cut");
    let bundle = app.enroll(CLIENT, None);
    let big = app.vm.run_dir.join("big.bin");
    write_random_file(&big, usize::try_from(SIZE).unwrap(), 0xc0ffee).unwrap();
    let want = host_sha256(&big).unwrap();

    // A first connection creates the client's root; then junk in staging,
    // as a crash in an older version might have left it.
    let out = app.sync_cmd(&bundle, &["ls"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    app.run(&format!(
        "test -d {s} && head -c 4096 /dev/urandom > {s}/leftover.1 && chown appliance:appliance {s}/leftover.1 && sync",
        s = staging()
    ));

    // The push, in the background.
    let log = app.vm.run_dir.join("push1.log");
    let mut child = Command::new(sync_client().unwrap())
        .arg("--identity")
        .arg(&bundle)
        .arg("--server")
        .arg(app.sync_addr())
        .args(["push", big.to_str().unwrap()])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(app.vm.run_dir.join("push1.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let t_push = Instant::now();

    // Wait until at least one batch is durably recorded. The sizes read
    // here are the page cache's: a record's first batch is visible before
    // its fdatasync and the staging directory's fsync (which make the pair's
    // names durable). The next batch is appended only after those, so the
    // record growing past the size first seen proves the first durable.
    let mut first_seen = None;
    let (landed, data) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            app.fail(&format!(
                "the push ended ({status}) before the power cut: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        let out = app.run(&format!(
            "cd {} && echo $(cat *.landed 2>/dev/null | wc -c) $(du -cb --apparent-size *.data 2>/dev/null | tail -1 | cut -f1) 0",
            staging()
        ));
        let f: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        match first_seen {
            Some(first) if f[0] > first => break (f[0], f[1]),
            None if f[0] >= 36 => first_seen = Some(f[0]),
            _ => {}
        }
        if t_push.elapsed() > Duration::from_secs(900) {
            app.fail("no chunk recorded in staging within 900 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let elapsed = t_push.elapsed();
    eprintln!(
        "cutting power {:.1} s into the push: record {landed} bytes, data file size {data} bytes",
        elapsed.as_secs_f64()
    );

    // Pull the plug; the same disks boot again.
    let mut app = app.power_cycle();
    eprintln!(
        "after the power cut: ready {:.1} s after QEMU started",
        app.boot_to_ready.as_secs_f64()
    );
    let t_wait = Instant::now();
    while child.try_wait().unwrap().is_none() && t_wait.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    eprintln!(
        "first push (cut): {status}: {}",
        std::fs::read_to_string(app.vm.run_dir.join("push1.err")).unwrap_or_default()
    );
    assert!(!status.success(), "the cut push reported success");

    // The pool imported cleanly.
    let health = app.run("zpool list -H -o health tank");
    assert_eq!(health.trim(), "ONLINE");
    let x = app.run("zpool status -x tank");
    assert!(x.contains("is healthy"), "{x}");
    let v = app.run("zpool status -v tank");
    assert!(v.contains("errors: No known data errors"), "{v}");
    app.run("zfs get -H -o value mounted tank/documents | grep -qx yes");

    // No partial document.
    app.run(&format!("test ! -e /tank/documents/{CLIENT}/big.bin"));
    let out = app.sync_cmd(&bundle, &["--json", "ls"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ls["entries"].as_array().map(Vec::len), Some(0), "{ls}");

    // Staging swept: junk gone, the resumable pair kept.
    let names = staging_names(&mut app);
    eprintln!("staging after the cut: {names:?}");
    assert_eq!(names.len(), 2, "{names:?}");
    let key = names[0].strip_suffix(".data").expect("a .data file");
    assert_eq!(names[1], format!("{key}.landed"), "{names:?}");
    let journal = app.run("journalctl -b -u applianced --no-pager -o cat");
    assert!(journal.contains("swept staging leftovers"), "{journal}");
    assert!(
        journal.contains("kept resumable staged uploads"),
        "{journal}"
    );
    let (recorded, entries) = recorded_bytes(&mut app);
    eprintln!("durable record: {entries} chunks, {recorded} bytes of {SIZE}");
    assert!(recorded > 0 && recorded < SIZE, "{recorded}");

    // The same push resumes and sends only what was missing.
    let t = Instant::now();
    let out = app
        .sync_cmd(&bundle, &["--json", "push", big.to_str().unwrap()])
        .unwrap();
    let resume_time = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    app.ensure(out.status.success(), || {
        format!(
            "resumed push failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    let pushed = &report["pushed"][0];
    let sent = pushed["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "resumed push: sent {sent} of {SIZE} bytes ({} chunks of {}) in {:.1} s",
        pushed["chunks_sent"],
        pushed["chunks"],
        resume_time.as_secs_f64()
    );
    assert_eq!(pushed["size"].as_u64(), Some(SIZE), "{report}");
    assert!(
        sent <= SIZE - recorded,
        "sent {sent} bytes; {recorded} of {SIZE} were already recorded"
    );
    let got = app.sha256(&format!("/tank/documents/{CLIENT}/big.bin"));
    assert_eq!(got, want, "sha256 of the resumed document");
    assert!(
        staging_names(&mut app).is_empty(),
        "staging not empty after the commit"
    );
    let events = app.events("sync.>");
    let done = events
        .iter()
        .rev()
        .find(|m| m["subject"] == format!("sync.upload.{CLIENT}.completed").as_str())
        .unwrap_or_else(|| panic!("no completed event: {events:#?}"));
    eprintln!("completed event: {done}");
    assert!(done["data"]["bytes_transferred"].as_u64().unwrap() <= SIZE - recorded);

    app.run("appliancectl health ready");
    eprintln!(
        "power_cut: boot-to-ready {:.1} s after the cut, test {:.1} s",
        app.boot_to_ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
