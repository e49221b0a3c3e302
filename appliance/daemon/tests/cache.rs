//! The agent response cache inside the real daemon: a stock Redis client
//! (the `redis` crate), `appliancectl cache`, `cache.stats` on the bus, and
//! durability across kill -9 with fsync `always`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Daemon;
use futures_util::StreamExt;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("appliance.toml");
    std::fs::write(
        &cfg,
        "version = 1\n[cache]\nfsync = \"always\"\nstats_secs = 1\nmax_value_bytes = 65536\n",
    )
    .unwrap();
    cfg
}

fn endpoint(d: &Daemon, name: &str) -> String {
    let out = d.ctl(&["status", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s["endpoints"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no endpoint {name}: {s}"))
        .to_owned()
}

fn ctl_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.ctl(args);
    assert!(
        out.status.success(),
        "appliancectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_client_ctl_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let resp = endpoint(&d, "cache_resp");
    let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();

    // Plain keys with EX, MGET.
    let () = redis::cmd("SET")
        .arg("k1")
        .arg("v1")
        .arg("EX")
        .arg(60)
        .query_async(&mut con)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg("k2")
        .arg("v2")
        .query_async(&mut con)
        .await
        .unwrap();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg("k1")
        .arg("k2")
        .arg("nope")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, vec![Some("v1".into()), Some("v2".into()), None]);
    let ttl: i64 = redis::cmd("TTL")
        .arg("k1")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");

    // AGENT.* hashes on the server; appliancectl sees the same entry.
    let () = redis::cmd("AGENT.SET")
        .arg("summariser")
        .arg("What is RAID-Z2?")
        .arg("Two parity disks.")
        .query_async(&mut con)
        .await
        .unwrap();
    let v: Option<String> = redis::cmd("AGENT.GET")
        .arg("summariser")
        .arg("What is RAID-Z2?")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("Two parity disks."));
    let out = ctl_ok(&d, &["cache", "get", "summariser", "What is RAID-Z2?"]);
    assert_eq!(out.trim(), "Two parity disks.");

    // appliancectl put → Redis reads it by the md5 key too.
    ctl_ok(
        &d,
        &[
            "cache",
            "put",
            "triage",
            "disk 3?",
            "--response",
            "replace it",
            "--ttl",
            "600",
        ],
    );
    let v: Option<String> = redis::cmd("AGENT.GET")
        .arg("triage")
        .arg("disk 3?")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("replace it"));

    // A miss exits 1.
    let out = d.ctl(&["cache", "get", "triage", "unknown prompt"]);
    assert_eq!(out.status.code(), Some(1));

    // Export, invalidate, import brings it back.
    let file = dir.path().join("export.json");
    ctl_ok(&d, &["cache", "export", file.to_str().unwrap()]);
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let obj = exported.as_object().unwrap();
    assert!(
        obj.values().any(|v| v["response"] == "replace it"),
        "{exported}"
    );
    let out = ctl_ok(&d, &["cache", "invalidate", "triage", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["invalidated"], 1);
    assert_eq!(
        d.ctl(&["cache", "get", "triage", "disk 3?"]).status.code(),
        Some(1)
    );
    let out = ctl_ok(&d, &["cache", "import", file.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["agent_entries"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(
        ctl_ok(&d, &["cache", "get", "triage", "disk 3?"]).trim(),
        "replace it"
    );

    // A legacy file: md5 keys to plain strings and entries.
    let legacy = dir.path().join("legacy.json");
    std::fs::write(
        &legacy,
        r#"{"0123456789abcdef0123456789abcdef": "an old answer",
            "ffffffffffffffffffffffffffffffff": {"agent": "old", "prompt": "p", "response": "r"}}"#,
    )
    .unwrap();
    let out = ctl_ok(&d, &["cache", "import", legacy.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["plain_entries"], 1, "{v}");
    assert_eq!(v["agent_entries"], 1, "{v}");
    let got: Option<String> = redis::cmd("GET")
        .arg("0123456789abcdef0123456789abcdef")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("an old answer"));

    // A broken file is refused with a clear error and changes nothing.
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, b"{\"abc\": ").unwrap();
    let before = ctl_ok(&d, &["cache", "stats", "--json"]);
    let out = d.ctl(&["cache", "import", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let after = ctl_ok(&d, &["cache", "stats", "--json"]);
    let (b, a): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    assert_eq!(b["entries"], a["entries"]);

    // An oversized value is refused by the cache (the limit is 64 KiB here).
    let big = dir.path().join("big.txt");
    std::fs::write(&big, vec![b'x'; 100 << 10]).unwrap();
    let out = d.ctl(&[
        "cache",
        "put",
        "a",
        "b",
        "--response-file",
        big.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_argument"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stats: on the CLI and, every second, on the bus.
    let v: serde_json::Value =
        serde_json::from_str(&ctl_ok(&d, &["cache", "stats", "--json"])).unwrap();
    assert!(v["hits"].as_u64().unwrap() >= 3, "{v}");
    assert!(v["misses"].as_u64().unwrap() >= 2, "{v}");
    let nats = async_nats::connect(format!("nats://{}", endpoint(&d, "bus_nats")))
        .await
        .unwrap();
    let mut sub = nats.subscribe("cache.stats").await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert!(v["entries"].as_u64().unwrap() >= 3, "{v}");

    // Metrics carry the cache.
    let metrics = endpoint(&d, "metrics");
    let body = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    assert!(body.contains("appliance_cache_hits_total"), "{body}");
    assert!(
        body.contains("appliance_bus_messages_published_total"),
        "{body}"
    );

    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_set_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let client = redis::Client::open(format!("redis://{}/", endpoint(&d, "cache_resp"))).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("durable")
        .arg("yes")
        .query_async(&mut con)
        .await
        .unwrap();
    let () = redis::cmd("AGENT.SET")
        .arg("a")
        .arg("p")
        .arg("r")
        .query_async(&mut con)
        .await
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = d.child.wait();
    drop(con);

    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let client = redis::Client::open(format!("redis://{}/", endpoint(&d, "cache_resp"))).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<String> = redis::cmd("GET")
        .arg("durable")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("yes"));
    assert_eq!(ctl_ok(&d, &["cache", "get", "a", "p"]).trim(), "r");
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn damaged_cache_log_fails_the_component_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Something that is not a log directory where the cache's log belongs.
    std::fs::create_dir_all(state.join("data")).unwrap();
    std::fs::write(state.join("data/cache"), b"not a directory").unwrap();
    let mut d = Daemon::start(&state, &[], &[]);
    let out = d.ctl(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cache = s["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cache")
        .unwrap()
        .clone();
    assert_eq!(cache["state"], "failed", "{s}");
    assert!(
        cache["reason"].as_str().unwrap().contains("cache"),
        "{cache}"
    );
    assert!(s["endpoints"].get("cache_resp").is_none());
    let out = d.ctl(&["cache", "stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unavailable"));
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn a_file_with_one_bad_entry_imports_nothing_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    // "a" comes before "b" in the object: it must not go in on its own.
    let file = dir.path().join("half.json");
    std::fs::write(&file, r#"{"a": "an answer", "b": 5, "c": "another"}"#).unwrap();
    let out = d.ctl(&["cache", "import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#""b""#), "the bad entry is not named: {err}");
    assert!(err.contains("nothing was imported"), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&ctl_ok(&d, &["cache", "stats", "--json"])).unwrap();
    assert_eq!(v["entries"], 0, "a failed import stored entries: {v}");

    // A key given twice would silently lose one of its values.
    std::fs::write(&file, r#"{"k": "first", "k": "second"}"#).unwrap();
    let out = d.ctl(&["cache", "import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#""k""#) && err.contains("more than once"),
        "{err}"
    );
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn export_and_import_fit_the_control_frame_whatever_the_entries() {
    // The defaults: values up to 8 MiB, control frames up to 1 MiB.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &[], &[]);
    let big = "x".repeat(2 << 20);
    let file = dir.path().join("big.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "0123456789abcdef0123456789abcdef": big,
            "k": {"agent": "a", "prompt": "p", "response": big},
        })
        .to_string(),
    )
    .unwrap();
    ctl_ok(&d, &["cache", "import", file.to_str().unwrap()]);
    let out = dir.path().join("export.json");
    ctl_ok(&d, &["cache", "export", out.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["0123456789abcdef0123456789abcdef"], big.as_str());
    assert_eq!(v.as_object().unwrap().len(), 2);
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));

    // The smallest frames the config allows.
    let cfg = dir.path().join("small-frames.toml");
    std::fs::write(&cfg, "version = 1\n[control]\nmax_frame_bytes = 4096\n").unwrap();
    let state = dir.path().join("state2");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let small = dir.path().join("small.json");
    let entries: serde_json::Map<String, serde_json::Value> = (0..100)
        .map(|i| (format!("key{i}"), serde_json::json!("y".repeat(100))))
        .collect();
    std::fs::write(&small, serde_json::Value::Object(entries).to_string()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(
        &d,
        &["cache", "import", small.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    assert_eq!(v["plain_entries"], 100, "{v}");
    ctl_ok(&d, &["cache", "export", out.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 100);
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn export_does_not_widen_who_may_read_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    ctl_ok(&d, &["cache", "put", "a", "p", "--response", "private"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    // An older export the operator kept to themselves keeps its mode.
    let kept = dir.path().join("kept.json");
    std::fs::write(&kept, "{}").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    ctl_ok(&d, &["cache", "export", kept.to_str().unwrap()]);
    assert_eq!(
        mode(&kept),
        0o600,
        "the export replaced a 0600 file with a wider one"
    );

    // A new export holds cached responses: readable by its owner only.
    let new = dir.path().join("new.json");
    ctl_ok(&d, &["cache", "export", new.to_str().unwrap()]);
    assert_eq!(mode(&new) & 0o077, 0, "mode {:o}", mode(&new));
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

/// Not fixed: a single get or put is one control frame (1 MiB by default),
/// while the cache takes values up to 8 MiB. Run with `--ignored`.
#[test]
#[ignore = "fault: cache get/put of a value over the control frame fails (1 MiB frames, 8 MiB values)"]
fn get_and_put_take_any_value_the_cache_takes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &[], &[]);
    let big = dir.path().join("big.txt");
    std::fs::write(&big, vec![b'z'; 2 << 20]).unwrap();
    // Stored through an import (pieces), then read back.
    let file = dir.path().join("big.json");
    std::fs::write(
        &file,
        serde_json::json!({"k": {"agent": "a", "prompt": "p", "response": "z".repeat(2 << 20)}})
            .to_string(),
    )
    .unwrap();
    ctl_ok(&d, &["cache", "import", file.to_str().unwrap()]);
    let out = d.ctl(&["cache", "get", "a", "p"]);
    assert!(
        out.status.success(),
        "get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), (2 << 20) + 1);
    ctl_ok(
        &d,
        &[
            "cache",
            "put",
            "a",
            "q",
            "--response-file",
            big.to_str().unwrap(),
        ],
    );
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

/// Not fixed: `cache get --json` turns a response that is not UTF-8 into
/// U+FFFD characters and reports a hit, so the JSON holds a response that
/// was never stored. Run with `--ignored`.
#[test]
#[ignore = "fault: cache get --json alters a response that is not UTF-8"]
fn get_json_does_not_alter_a_binary_response() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let file = dir.path().join("bin.txt");
    std::fs::write(&file, b"\xff\xfebin").unwrap();
    ctl_ok(
        &d,
        &[
            "cache",
            "put",
            "a",
            "p",
            "--response-file",
            file.to_str().unwrap(),
        ],
    );
    let out = d.ctl(&["cache", "get", "a", "p", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{fffd}'),
        "exit {:?}, a response that was never stored: {text}",
        out.status.code()
    );
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

/// Not fixed: an export stopped by a signal (Ctrl-C, SIGTERM) leaves its
/// half-written temporary file, `.NAME.tmp-PID`, beside the export for good
/// (the older export itself is intact). Run with `--ignored`.
#[test]
#[ignore = "fault: an interrupted export leaves its half-written temporary file behind"]
fn an_interrupted_export_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state, &[], &[]);
    let entries: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("key{i}"), serde_json::json!("v".repeat(256 << 10))))
        .collect();
    let file = dir.path().join("in.json");
    std::fs::write(&file, serde_json::Value::Object(entries).to_string()).unwrap();
    ctl_ok(&d, &["cache", "import", file.to_str().unwrap()]);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("cache.json");
    std::fs::write(&out, "{}").unwrap();
    let mut child = std::process::Command::new(common::appliancectl())
        .arg("--socket")
        .arg(d.socket())
        .args(["cache", "export", out.to_str().unwrap()])
        .spawn()
        .unwrap();
    // Stop it once its temporary file has something in it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let started = std::fs::read_dir(&out_dir).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name() != "cache.json" && e.metadata().unwrap().len() > 0
        });
        if started || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "{}", "{status}");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "cache.json")
        .collect();
    assert!(left.is_empty(), "{status}; left behind: {left:?}");
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}
