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

/// A daemon with its state in `dir/state` and the tests' [`config`].
fn start_configured(dir: &std::path::Path) -> Daemon {
    let cfg = config(dir);
    let state = dir.join("state");
    Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[])
}

/// A daemon with its state in `dir/state` and no config file.
fn start_default(dir: &std::path::Path) -> Daemon {
    let state = dir.join("state");
    Daemon::start(&state, &[], &[])
}

/// A daemon with its state in `dir/{state}` and `toml` as its config,
/// written to `dir/{name}`.
fn start_with_config(dir: &std::path::Path, name: &str, toml: &str, state: &str) -> Daemon {
    let cfg = dir.join(name);
    std::fs::write(&cfg, toml).unwrap();
    let state = dir.join(state);
    Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[])
}

#[track_caller]
fn terminate_cleanly(d: &mut Daemon) {
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `appliancectl cache put AGENT PROMPT --response-file FILE`, which must
/// succeed.
fn put_file(d: &Daemon, agent: &str, prompt: &str, file: &std::path::Path) {
    ctl_ok(
        d,
        &[
            "cache",
            "put",
            agent,
            prompt,
            "--response-file",
            file.to_str().unwrap(),
        ],
    );
}

/// Writes an import file of `n` plain entries, `key0`.., each `value`.
fn write_entries(file: &std::path::Path, n: usize, value: &str) {
    let entries: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| (format!("key{i}"), serde_json::json!(value)))
        .collect();
    std::fs::write(file, serde_json::Value::Object(entries).to_string()).unwrap();
}

/// Imports 64 entries of 256 KiB (an export long enough to be caught
/// part-way) and returns an empty export directory `dir/out` and the
/// export's path in it, `cache.json`.
fn import_a_long_export(
    d: &Daemon,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let file = dir.join("in.json");
    write_entries(&file, 64, &"v".repeat(256 << 10));
    ctl_ok(d, &["cache", "import", file.to_str().unwrap()]);
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("cache.json");
    (out_dir, out)
}

/// `appliancectl --socket SOCKET cache export OUT`, run by `wrapper` (a
/// program and its arguments) if one is given.
fn export_command(wrapper: &[&str], d: &Daemon, out: &std::path::Path) -> std::process::Command {
    let mut cmd = match wrapper {
        [] => std::process::Command::new(common::appliancectl()),
        [program, args @ ..] => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).arg(common::appliancectl());
            cmd
        }
    };
    cmd.arg("--socket")
        .arg(d.socket())
        .args(["cache", "export", out.to_str().unwrap()]);
    cmd
}

/// Waits (up to 20 s) until an entry of `out_dir` shows the export has
/// started, or the export has ended.
fn wait_for_export_to_start(
    child: &mut std::process::Child,
    out_dir: &std::path::Path,
    started: impl Fn(&std::fs::DirEntry) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let started = std::fs::read_dir(out_dir)
            .unwrap()
            .any(|e| started(&e.unwrap()));
        if started || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal_child(child: &std::process::Child, signal: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        signal,
    )
}

/// Sends `m` as one control frame.
fn send<T: serde::Serialize>(s: &mut std::os::unix::net::UnixStream, m: &T) {
    use std::io::Write;
    let frame =
        appliance_types::control::encode_frame(m, appliance_types::control::DEFAULT_MAX_FRAME)
            .unwrap();
    s.write_all(&frame).unwrap();
}

/// The payload of the next control frame.
fn recv(s: &mut std::os::unix::net::UnixStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)?;
    let mut buf = vec![0u8; u32::from_be_bytes(prefix) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// A raw connection to the daemon's control socket, past the hellos,
/// reads timing out after 10 s.
fn connect_raw(d: &Daemon) -> std::os::unix::net::UnixStream {
    use appliance_types::control::{decode_payload, ClientHello, ServerHello};
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(&mut s, &ClientHello::new("test"));
    let _: ServerHello = decode_payload(&recv(&mut s).unwrap(), "server hello").unwrap();
    s
}

/// The request that starts a put in pieces of `len` bytes for agent "a".
fn put_pieces(prompt: &str, len: u64) -> appliance_types::control::Request {
    appliance_types::control::Request::Cache(appliance_types::cache::CacheRequest::PutPieces {
        agent: "a".into(),
        prompt: prompt.into(),
        variant: String::new(),
        len,
        ttl_secs: None,
    })
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
    let mut d = start_configured(dir.path());
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
    terminate_cleanly(&mut d);
}

#[test]
fn export_and_import_fit_the_control_frame_whatever_the_entries() {
    // The defaults: values up to 8 MiB, control frames up to 1 MiB.
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
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
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v["0123456789abcdef0123456789abcdef"], big.as_str());
    assert_eq!(v.as_object().unwrap().len(), 2);
    terminate_cleanly(&mut d);

    // The smallest frames the config allows.
    let mut d = start_with_config(
        dir.path(),
        "small-frames.toml",
        "version = 1\n[control]\nmax_frame_bytes = 4096\n",
        "state2",
    );
    let small = dir.path().join("small.json");
    write_entries(&small, 100, &"y".repeat(100));
    let v: serde_json::Value = serde_json::from_str(&ctl_ok(
        &d,
        &["cache", "import", small.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    assert_eq!(v["plain_entries"], 100, "{v}");
    ctl_ok(&d, &["cache", "export", out.to_str().unwrap()]);
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v.as_object().unwrap().len(), 100);
    terminate_cleanly(&mut d);
}

#[test]
fn export_does_not_widen_who_may_read_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_configured(dir.path());
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
    terminate_cleanly(&mut d);
}

/// A get or a put is cut into pieces that fit the control frame (1 MiB by
/// default): any value the cache takes (up to 8 MiB by default) goes both
/// ways byte for byte, and `cache get` writes exactly the response's bytes.
/// A response over the cache's maximum is refused on its announced length,
/// before the file is read or sent.
#[test]
fn get_and_put_take_any_value_the_cache_takes() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
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
    assert_eq!(out.stdout.len(), 2 << 20);
    assert!(out.stdout.iter().all(|b| *b == b'z'));
    // Put from a file and read back, at 2 MiB and at the largest value the
    // cache takes; every byte value, so a piece boundary out of place shows.
    for (prompt, len) in [("q", (2usize << 20) + 7), ("max", 8 << 20)] {
        let big = dir.path().join(format!("{prompt}.bin"));
        let content: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        std::fs::write(&big, &content).unwrap();
        put_file(&d, "a", prompt, &big);
        let out = d.ctl(&["cache", "get", "a", prompt]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == content,
            "{prompt}: the response came back altered"
        );
    }
    // One byte over: refused at once, naming the limit, without reading
    // the file (a sparse 1 TiB one would take far longer than the deadline).
    let huge = dir.path().join("huge.bin");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let over = dir.path().join("over.bin");
    std::fs::write(&over, vec![b'o'; (8 << 20) + 1]).unwrap();
    for f in [&huge, &over] {
        let started = std::time::Instant::now();
        let out = d.ctl(&[
            "cache",
            "put",
            "a",
            "r",
            "--response-file",
            f.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("8388608") && err.contains("cache.max_value_bytes"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    }
    assert_eq!(d.ctl(&["cache", "get", "a", "r"]).status.code(), Some(1));
    terminate_cleanly(&mut d);

    // The smallest frames the config allows.
    let mut d = start_with_config(
        dir.path(),
        "small-frames.toml",
        "version = 1\n[control]\nmax_frame_bytes = 1024\n",
        "state2",
    );
    let content: Vec<u8> = (0..100_000u32)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    let f = dir.path().join("small-frames.bin");
    std::fs::write(&f, &content).unwrap();
    put_file(&d, "a", "p", &f);
    let out = d.ctl(&["cache", "get", "a", "p"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == content, "the response came back altered");
    terminate_cleanly(&mut d);
}

/// A put in pieces is stored only once every announced byte arrived: a
/// client that goes away part-way, or sends more than it announced, stores
/// nothing, and the daemon keeps serving.
#[test]
fn a_put_cut_off_part_way_stores_nothing() {
    use appliance_types::cache::{CacheRequest, CacheResponse};
    use appliance_types::control::{decode_payload, Request, Response};

    fn response(s: &mut std::os::unix::net::UnixStream) -> Response {
        decode_payload(&recv(s).unwrap(), "response").unwrap()
    }
    let start = |prompt: &str| put_pieces(prompt, 1000);
    let piece = |n: usize| Request::Cache(CacheRequest::PutPiece(vec![b'x'; n]));

    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
    let connect = || connect_raw(&d);

    // Gone after 999 of 1000 bytes.
    let mut s = connect();
    send(&mut s, &start("cut"));
    assert_eq!(response(&mut s), Response::Cache(CacheResponse::PutReady));
    send(&mut s, &piece(500));
    send(&mut s, &piece(499));
    drop(s);

    // More than announced: refused, and the connection still serves.
    let mut s = connect();
    send(&mut s, &start("long"));
    assert_eq!(response(&mut s), Response::Cache(CacheResponse::PutReady));
    send(&mut s, &piece(600));
    send(&mut s, &piece(401));
    match response(&mut s) {
        Response::Error(e) => assert!(e.message.contains("1000 bytes announced"), "{e}"),
        other => panic!("a put past its length was answered {other:?}"),
    }
    // The whole response, in the same connection: stored.
    send(&mut s, &start("whole"));
    assert_eq!(response(&mut s), Response::Cache(CacheResponse::PutReady));
    send(&mut s, &piece(1000));
    assert_eq!(response(&mut s), Response::Cache(CacheResponse::Stored));
    drop(s);

    assert_eq!(
        ctl_ok(&d, &["cache", "get", "a", "whole"]),
        "x".repeat(1000)
    );
    for prompt in ["cut", "long"] {
        let out = d.ctl(&["cache", "get", "a", prompt]);
        assert_eq!(out.status.code(), Some(1), "{prompt} was stored");
    }
    terminate_cleanly(&mut d);
}

/// A response that is not UTF-8 is never altered: `cache get` writes its
/// bytes, `cache get --json` gives them as `response_base64` (and a UTF-8
/// one as `response`), and an export writes it as `response_base64`, which
/// imports back byte for byte.
#[test]
fn get_json_does_not_alter_a_binary_response() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_configured(dir.path());
    let bytes = b"\xff\xfebin".to_vec();
    let file = dir.path().join("bin.txt");
    std::fs::write(&file, &bytes).unwrap();
    put_file(&d, "a", "p", &file);
    ctl_ok(&d, &["cache", "put", "a", "t", "--response", "text é"]);
    let check = |d: &Daemon| {
        let out = d.ctl(&["cache", "get", "a", "p", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains('\u{fffd}'),
            "exit {:?}, a response that was never stored: {text}",
            out.status.code()
        );
        assert!(out.status.success(), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["hit"], true, "{v}");
        assert!(v.get("response").is_none(), "{v}");
        let b64 = v["response_base64"].as_str().unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            bytes
        );
        let out = d.ctl(&["cache", "get", "a", "p"]);
        assert!(out.status.success());
        assert_eq!(out.stdout, bytes);
    };
    check(&d);
    let v: serde_json::Value =
        serde_json::from_str(&ctl_ok(&d, &["cache", "get", "a", "t", "--json"])).unwrap();
    assert_eq!(v, serde_json::json!({"hit": true, "response": "text é"}));

    // Export, drop everything, import: the same bytes.
    let export = dir.path().join("export.json");
    let out = ctl_ok(&d, &["cache", "export", export.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["written"].as_u64(), v["skipped_binary"].as_u64()),
        (Some(2), Some(0)),
        "{v}"
    );
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(
        text.contains("response_base64") && !text.contains('\u{fffd}'),
        "{text}"
    );
    ctl_ok(&d, &["cache", "invalidate", "a"]);
    assert_eq!(d.ctl(&["cache", "get", "a", "p"]).status.code(), Some(1));
    ctl_ok(&d, &["cache", "import", export.to_str().unwrap()]);
    check(&d);
    terminate_cleanly(&mut d);
}

/// An export stopped by a signal (Ctrl-C, SIGTERM, a closed terminal's
/// SIGHUP) removes its half-written temporary file, `.NAME.tmp-PID`, and ends
/// by that signal; the older export is intact. What an export killed outright
/// (SIGKILL, a power cut) leaves is removed by the next export to the same
/// file, unless its process still exists.
#[test]
fn an_interrupted_export_leaves_nothing_behind() {
    use nix::sys::signal::Signal;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
    let (out_dir, out) = import_a_long_export(&d, dir.path());
    std::fs::write(&out, "{}").unwrap();
    let left = || -> Vec<_> {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "cache.json")
            .collect()
    };
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let mut child = export_command(&[], &d, &out).spawn().unwrap();
        // Stop it once its temporary file has something in it.
        wait_for_export_to_start(&mut child, &out_dir, |e| {
            e.file_name() != "cache.json" && e.metadata().is_ok_and(|m| m.len() > 0)
        });
        signal_child(&child, signal).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(signal as i32), "{signal}: {status}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{}",
            "{signal}: {status}"
        );
        assert!(
            left().is_empty(),
            "{signal}: {status}; left behind: {:?}",
            left()
        );
    }

    // What a SIGKILL leaves: gone with the next export, unless the process
    // that wrote it still exists.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let dead = out_dir.join(format!(".cache.json.tmp-{gone_pid}"));
    let live = out_dir.join(format!(".cache.json.tmp-{}", d.pid()));
    std::fs::write(&dead, "partial").unwrap();
    std::fs::write(&live, "partial").unwrap();
    ctl_ok(&d, &["cache", "export", out.to_str().unwrap()]);
    assert!(!dead.exists(), "{:?}", left());
    assert!(live.exists(), "the file of a live process was removed");
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v.as_object().unwrap().len(), 64);
    terminate_cleanly(&mut d);
}

/// An export started with SIGHUP ignored (`nohup appliancectl cache export
/// ... &`, then the terminal closes) goes on as it would have without the
/// clean-up watch: a signal the process was told to ignore neither removes
/// its temporary file nor ends it.
#[test]
fn an_export_under_nohup_survives_a_hangup() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
    let (out_dir, out) = import_a_long_export(&d, dir.path());
    // nohup(1) ignores SIGHUP and runs the command in its place (same
    // process); an ignored signal stays ignored across exec.
    let mut cmd = export_command(&["nohup"], &d, &out);
    cmd.stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    wait_for_export_to_start(&mut child, &out_dir, |e| {
        e.metadata().is_ok_and(|m| m.len() > 0)
    });
    let _ = signal_child(&child, Signal::SIGHUP);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "an export with SIGHUP ignored was ended by it: {status}"
    );
    let v: serde_json::Value = read_json(&out);
    assert_eq!(v.as_object().unwrap().len(), 64);
    terminate_cleanly(&mut d);
}

/// A put in pieces holds what has arrived, not what was announced: a
/// length the config allows (cache.max_value_bytes may be as large as
/// cache.max_bytes) but memory cannot hold at once is not reserved up front,
/// so announcing it neither takes the memory nor aborts the daemon.
#[test]
fn a_put_announcing_more_than_memory_does_not_stop_the_daemon() {
    use appliance_types::cache::CacheResponse;
    use appliance_types::control::{decode_payload, Response};

    let dir = tempfile::tempdir().unwrap();
    // 1 PiB: accepted by the config check, more than any address space
    // (47 bits of user addresses on x86-64) can reserve.
    let mut d = start_with_config(
        dir.path(),
        "big-values.toml",
        "version = 1\n[cache]\nmax_bytes = 1125899906842624\nmax_value_bytes = 1125899906842624\n",
        "state",
    );
    let mut s = connect_raw(&d);
    send(&mut s, &put_pieces("p", 1 << 50));
    let answer = recv(&mut s).map(|p| decode_payload::<Response>(&p, "response").unwrap());
    assert!(
        matches!(
            answer,
            Ok(Response::Cache(CacheResponse::PutReady) | Response::Error(_))
        ),
        "announcing a 1 PiB put was answered {answer:?}; daemon's stderr:\n{}",
        d.stderr()
    );
    drop(s);
    let out = d.ctl(&["cache", "stats"]);
    assert!(
        out.status.success(),
        "the daemon stopped serving after a 1 PiB put was announced: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    terminate_cleanly(&mut d);
}

/// The temporary file of a live export is not removed by an export that
/// cannot see its process: one in another PID namespace (a container) or on
/// another host sharing the directory (NFS), where `kill(PID, 0)` says ESRCH
/// for a process that is writing. Needs root for `unshare --pid`.
#[test]
fn an_export_in_another_pid_namespace_keeps_a_live_temporary() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: unshare --pid needs root (CI has it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_default(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("cache.json");
    // The daemon stands for the live writer: it exists, here.
    let live = out_dir.join(format!(".cache.json.tmp-{}", d.pid()));
    std::fs::write(&live, "partial").unwrap();
    // ...and holds the lock a writer holds on its temporary file.
    let _writing = nix::fcntl::Flock::lock(
        std::fs::File::open(&live).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let status = export_command(&["unshare", "--pid", "--fork"], &d, &out)
        .status()
        .unwrap();
    assert!(status.success(), "unshare --pid needs root: {status}");
    assert!(
        live.exists(),
        "an export in another PID namespace removed a live export's temporary file"
    );
    terminate_cleanly(&mut d);
}
