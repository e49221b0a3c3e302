//! The bus inside the real daemon: a stock NATS client (async-nats) and
//! `appliancectl events` against it, the heartbeat, and durability across
//! kill -9 with fsync `always`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Daemon;
use futures_util::StreamExt;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("appliance.toml");
    std::fs::write(
        &cfg,
        "version = 1\n[bus]\nfsync = \"always\"\nheartbeat_secs = 1\n",
    )
    .unwrap();
    cfg
}

fn nats_addr(d: &Daemon) -> String {
    let out = d.ctl(&["status", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s["endpoints"]["bus_nats"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn stock_nats_client_and_ctl_share_the_bus() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = config(dir.path());
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let client = async_nats::connect(format!("nats://{}", nats_addr(&d)))
        .await
        .unwrap();

    // appliancectl publishes, the NATS client receives.
    let mut sub = client.subscribe("storage.disk.*.removed").await.unwrap();
    client.flush().await.unwrap();
    let out = d.ctl(&[
        "events",
        "publish",
        "storage.disk.bay3.removed",
        "--data",
        r#"{"bay":3}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject.as_str(), "storage.disk.bay3.removed");
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["bay"], 3);

    // The heartbeat arrives every second with the health score.
    let mut beats = client.subscribe("system.heartbeat").await.unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(5), beats.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&beat.payload).unwrap();
    assert!(v["score"].as_f64().is_some(), "{v}");
    assert!(v["components"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "bus"));

    // Replay by sequence and by time, as JSON.
    let out = d.ctl(&["events", "replay", "storage.>", "--from-seq", "1", "--json"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["subject"], "storage.disk.bay3.removed");
    assert_eq!(list[0]["data"]["bay"], 3);
    let out = d.ctl(&[
        "events",
        "replay",
        "system.heartbeat",
        "--since",
        "1h",
        "--limit",
        "1",
        "--json",
    ]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    // Bad input is refused with a typed error.
    let out = d.ctl(&["events", "publish", "storage..x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_argument"));
    let out = d.ctl(&["events", "replay", "a.>.b"]);
    assert_eq!(out.status.code(), Some(1));
    let out = d.ctl(&["events", "dlq", "retry", "424242"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));

    // `events tail` follows live messages; NATS publishes reach it.
    let mut tail = std::process::Command::new(common::appliancectl())
        .arg("--socket")
        .arg(d.socket())
        .args(["events", "tail", "sync.>", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        lines.next().unwrap().unwrap()
    });
    // Publish until the tail has subscribed and printed one.
    let mut n = 0;
    while !reader.is_finished() && n < 100 {
        client
            .publish(
                "sync.upload.laptop.completed",
                format!("{{\"n\":{n}}}").into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        n += 1;
    }
    let line = reader.join().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["subject"], "sync.upload.laptop.completed");
    tail.kill().unwrap();
    let _ = tail.wait();

    // The daemon is unharmed by the tail client going away.
    assert!(d.ctl(&["status"]).status.success());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_publish_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = config(dir.path());
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    // A raw NATS client: PUB then PING; the server sends PONG only after
    // this connection's durable publishes are fsynced (async-nats's flush()
    // does not wait for the PONG, so it cannot prove the acknowledgement).
    let payload = r#"{"from":"ONLINE","to":"DEGRADED","margin":1}"#;
    let mut s = std::net::TcpStream::connect(nats_addr(&d)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    {
        use std::io::Write;
        write!(
            s,
            "CONNECT {{\"verbose\":false}}\r\nPUB storage.pool.tank.state {}\r\n{payload}\r\nPING\r\n",
            payload.len()
        )
        .unwrap();
    }
    let mut seen = String::new();
    while !seen.contains("PONG\r\n") {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before PONG: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(!seen.contains("-ERR"), "{seen}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = d.child.wait();
    drop(s);

    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let out = d.ctl(&["events", "replay", "storage.pool.>", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["data"]["to"], "DEGRADED");
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}
