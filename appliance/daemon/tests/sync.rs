//! The sync endpoint inside the real daemon: enrollment over the control
//! socket, a real `appliance-sync` push over QUIC on loopback, the sync
//! events on the bus, quota refusal, and revocation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::Daemon;

fn appliance_sync() -> PathBuf {
    let p = common::applianced().with_file_name("appliance-sync");
    assert!(
        p.exists(),
        "{} is missing: run the tests for the whole workspace (cargo test --workspace)",
        p.display()
    );
    p
}

fn sync_cmd(bundle: &Path, server: &str, args: &[&str]) -> Output {
    Command::new(appliance_sync())
        .arg("--identity")
        .arg(bundle)
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn enroll_push_events_quota_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &[], &[]);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&d.ctl(&["status", "--json"]), "status")).unwrap();
    let server = status["endpoints"]["sync_quic"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        status["components"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "sync" && c["state"] == "ready"),
        "{status}"
    );

    // Enroll: the bundle is written 0600 and not kept by the daemon.
    let bundle = dir.path().join("laptop.bundle");
    ok(
        &d.ctl(&[
            "sync",
            "client",
            "add",
            "laptop",
            "--quota",
            "1M",
            "--out",
            bundle.to_str().unwrap(),
        ]),
        "add",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let scratch: Vec<_> = std::fs::read_dir(state.join("data/sync/scratch"))
        .unwrap()
        .collect();
    assert!(scratch.is_empty(), "the daemon kept a bundle: {scratch:?}");
    // A second enrollment of the same name is refused; so is a bad name.
    assert_eq!(
        d.ctl(&[
            "sync",
            "client",
            "add",
            "laptop",
            "--out",
            dir.path().join("x").to_str().unwrap()
        ])
        .status
        .code(),
        Some(1)
    );
    let out = d.ctl(&[
        "sync",
        "client",
        "add",
        "../etc",
        "--out",
        dir.path().join("y").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_argument"));

    // Push a document over QUIC and find it in the client's namespace.
    let doc = dir.path().join("contract.pdf");
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&doc, &body).unwrap();
    ok(
        &sync_cmd(
            &bundle,
            &server,
            &["push", doc.to_str().unwrap(), "--to", "contracts"],
        ),
        "push",
    );
    let ls = ok(&sync_cmd(&bundle, &server, &["ls", "--json"]), "ls");
    assert!(ls.contains("contracts/contract.pdf"), "{ls}");
    let stored = std::fs::read(state.join("data/documents/laptop/contracts/contract.pdf")).unwrap();
    assert_eq!(stored, body);

    // The upload and connection events are on the bus (durable `sync.>`).
    let mut completed = false;
    for _ in 0..50 {
        let out = ok(&d.ctl(&["events", "replay", "sync.>", "--json"]), "replay");
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let subjects: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["subject"].as_str().unwrap().to_owned())
            .collect();
        if subjects.iter().any(|s| s == "sync.upload.laptop.completed") {
            assert!(
                subjects.iter().any(|s| s == "sync.upload.laptop.started"),
                "{subjects:?}"
            );
            assert!(
                subjects.iter().any(|s| s == "sync.client.laptop.connected"),
                "{subjects:?}"
            );
            let done = list
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["subject"] == "sync.upload.laptop.completed")
                .unwrap();
            assert_eq!(done["data"]["path"], "contracts/contract.pdf");
            assert_eq!(done["data"]["size"], 300_000);
            completed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(completed, "no sync.upload.laptop.completed event");

    // Over quota: refused before any byte, nothing written.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 2 << 20]).unwrap();
    let out = sync_cmd(&bundle, &server, &["push", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("quota"), "{err}");
    assert!(!state.join("data/documents/laptop/big.bin").exists());

    // List shows usage; revoke locks the client out.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&d.ctl(&["sync", "client", "list", "--json"]), "list")).unwrap();
    assert_eq!(list[0]["name"], "laptop");
    assert_eq!(list[0]["quota"], 1 << 20);
    ok(&d.ctl(&["sync", "client", "revoke", "laptop"]), "revoke");
    let out = sync_cmd(&bundle, &server, &["ls"]);
    assert_eq!(out.status.code(), Some(1), "a revoked client was let in");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&d.ctl(&["sync", "client", "list", "--json"]), "list")).unwrap();
    assert!(list[0]["revoked_at"].as_u64().is_some());
    assert_eq!(
        d.ctl(&["sync", "client", "revoke", "laptop"]).status.code(),
        Some(1)
    );
    assert_eq!(
        d.ctl(&["sync", "client", "revoke", "nobody-here"])
            .status
            .code(),
        Some(1)
    );

    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn sync_waits_for_its_documents_directory() {
    // On the appliance the documents directory is the pool's dataset, which
    // first boot creates after the daemon has started: until then sync is
    // unavailable (the daemon runs on), and it never creates the directory.
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("tank/documents");
    let cfg = dir.path().join("appliance.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[sync]\ndocuments_dir = \"{}\"\n",
            docs.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let component = |d: &Daemon| -> serde_json::Value {
        let s: serde_json::Value =
            serde_json::from_str(&ok(&d.ctl(&["status", "--json"]), "status")).unwrap();
        s["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "sync")
            .unwrap()
            .clone()
    };
    let c = component(&d);
    assert_eq!(c["state"], "unavailable", "{c}");
    assert!(c["reason"].as_str().unwrap().contains("create-pool"), "{c}");
    assert!(!docs.exists(), "the daemon created the documents directory");
    // The CA exists already: first boot checks for it before the pool.
    let ca = state.join("data/sync/identity/ca.cert.pem");
    let mut tries = 0;
    while !ca.exists() && tries < 50 {
        std::thread::sleep(Duration::from_millis(100));
        tries += 1;
    }
    assert!(ca.exists(), "no CA at {}", ca.display());
    let out = d.ctl(&["sync", "client", "list"]);
    assert_eq!(out.status.code(), Some(1));

    std::fs::create_dir_all(&docs).unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if component(&d)["state"] == "ready" {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready, "{}", component(&d));
    ok(&d.ctl(&["sync", "client", "list"]), "list");
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

/// `appliancectl sync client add laptop --out OUT`.
fn add_laptop(d: &Daemon, out: &std::path::Path) -> std::process::Output {
    d.ctl(&[
        "sync",
        "client",
        "add",
        "laptop",
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn a_bundle_that_cannot_be_written_does_not_use_up_the_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &[], &[]);
    let nowhere = dir.path().join("no-such-dir/laptop.bundle");
    let out = add_laptop(&d, &nowhere);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such file or directory"), "{err}");
    // The identity went nowhere, so the name must still be free.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&d.ctl(&["sync", "client", "list", "--json"]), "list")).unwrap();
    assert_eq!(list, serde_json::json!([]), "enrolled without a bundle");
    let bundle = dir.path().join("laptop.bundle");
    ok(&add_laptop(&d, &bundle), "add after the failed one");
    assert!(std::fs::metadata(&bundle).unwrap().len() > 0);

    // A bundle that fails part-way through writing (here the file size
    // limit, SIGXFSZ ignored as a full disk would fail it) is removed, so
    // the same --out can be used once the client is revoked.
    let cut = dir.path().join("cut.bundle");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"trap "" XFSZ; exec prlimit --fsize=64 "$@""#)
        .arg("bash")
        .arg(common::appliancectl())
        .arg("--socket")
        .arg(d.socket())
        .args(["sync", "client", "add", "desk", "--out"])
        .arg(&cut)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoke it"), "{err}");
    assert!(!cut.exists(), "a bundle cut off part-way was left behind");

    // A refused enrollment leaves no empty bundle behind.
    let again = dir.path().join("again.bundle");
    let out = add_laptop(&d, &again);
    assert_eq!(out.status.code(), Some(1));
    assert!(!again.exists());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}
