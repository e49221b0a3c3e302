//! Scenario 2 of issue 8: sync from the host.
//!
//! A client enrolled in the guest pushes a tree of files (one of 100 MB)
//! from the host through the forwarded UDP port. The guest's copies hash
//! like the host's (SHA-256 on both sides; the image has no BLAKE3 tool),
//! the BLAKE3 that `appliance-sync --json ls` reports matches the host's,
//! and a `sync.upload.<client>.completed` event was published per file.
//!
//! Run: `cargo test -p appliance-hw-tests --test sync_from_host -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use appliance_hw_tests::scenario::{host_sha256, write_random_file, Appliance};
use serde_json::Value;

const CLIENT: &str = "laptop";
/// Where the server keeps a client's documents (appliance/sync/src/store.rs).
const DOCS: &str = "/tank/documents";

fn host_blake3(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn push_from_the_host_lands_verified_in_the_guest() {
    let t0 = Instant::now();
    // The host client first, so its build is not timed as the push.
    appliance_hw_tests::scenario::sync_client().unwrap();
    let mut app = Appliance::boot("sync_from_host");
    let bundle = app.enroll(CLIENT, None);

    // The tree: small files in a subdirectory and one of 100 MB.
    let tree = app.vm.run_dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    let files: Vec<(&str, usize)> = vec![
        ("notes.txt", 1_234),
        ("sub/photo.bin", 3 << 20),
        ("sub/deeper/scan.bin", 1 << 20),
        ("sub/empty.txt", 0),
        ("big.bin", 100 << 20),
    ];
    for (i, (rel, len)) in files.iter().enumerate() {
        write_random_file(&tree.join(rel), *len, 0x5eed + i as u64).unwrap();
    }
    let total: usize = files.iter().map(|(_, l)| l).sum();

    let seq = app.last_seq("sync.>");
    let t = Instant::now();
    let out = app
        .sync_cmd(&bundle, &["--json", "push", tree.to_str().unwrap()])
        .unwrap();
    let push_time = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    app.ensure(out.status.success(), || {
        format!("push failed ({}):\n{stdout}\n{stderr}", out.status)
    });
    eprintln!(
        "pushed {total} bytes in {:.1} s: {:.2} MB/s through the forward",
        push_time.as_secs_f64(),
        total as f64 / push_time.as_secs_f64() / 1e6
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    let pushed = report["pushed"].as_array().unwrap();
    assert_eq!(pushed.len(), files.len(), "{report:#}");

    // Inside the guest: every file in the client's tree, same SHA-256.
    let local = |rel: &str| -> PathBuf { tree.join(rel) };
    for (rel, len) in &files {
        let guest = format!("{DOCS}/{CLIENT}/tree/{rel}");
        let size: usize = app
            .run(&format!("stat -c %s '{guest}'"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(size, *len, "{guest}");
        let want = host_sha256(&local(rel)).unwrap();
        let got = app.sha256(&guest);
        app.ensure(got == want, || {
            format!("{guest}: guest sha256 {got}, host {want}")
        });
    }

    // The BLAKE3 the server lists is the host's.
    let out = app.sync_cmd(&bundle, &["--json", "ls"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: BTreeMap<String, (u64, String)> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_owned(),
                (
                    e["size"].as_u64().unwrap(),
                    e["blake3"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    for (rel, len) in &files {
        let remote = format!("tree/{rel}");
        let (size, hash) = listed
            .get(&remote)
            .unwrap_or_else(|| panic!("{remote} not listed: {ls:#}"));
        assert_eq!(*size, *len as u64, "{remote}");
        assert_eq!(*hash, host_blake3(&local(rel)), "{remote}: blake3");
    }

    // One completed event per file, with its size.
    let events = app.events("sync.>");
    let subject = format!("sync.upload.{CLIENT}.completed");
    for (rel, len) in &files {
        let remote = format!("tree/{rel}");
        let found = events.iter().any(|m| {
            m["seq"].as_u64().is_some_and(|s| s > seq)
                && m["subject"] == subject.as_str()
                && m["data"]["path"] == remote.as_str()
                && m["data"]["size"].as_u64() == Some(*len as u64)
        });
        app.ensure(found, || {
            format!("no {subject} for {remote}; events:\n{events:#?}")
        });
    }

    // Health is unaffected.
    app.run("appliancectl health ready");
    eprintln!(
        "sync_from_host: boot-to-ready {:.1} s, push {:.1} s, test {:.1} s",
        app.boot_to_ready.as_secs_f64(),
        push_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
