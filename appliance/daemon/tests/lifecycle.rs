//! The real daemon under a real notify socket: READY, status, probes,
//! watchdog pings, SIGTERM → STOPPING and exit 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::Daemon;

#[test]
fn ready_status_watchdog_and_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    // 1 s watchdog: the daemon must ping at least every 500 ms.
    let mut d = Daemon::start(dir.path(), &[], &[("WATCHDOG_USEC", "1000000")]);

    // STATUS= lines came before READY=1.
    let lines = d.notify.lines();
    let ready_at = lines.iter().position(|l| l == "READY=1").unwrap();
    assert!(
        lines[..ready_at].iter().any(|l| l.starts_with("STATUS=")),
        "no STATUS= before READY=1: {lines:?}"
    );

    // Status as JSON.
    let out = d.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_secs"].as_u64().is_some());
    for p in ["live", "ready", "startup"] {
        assert_eq!(s["probes"][p]["pass"], true, "probe {p}: {s}");
    }
    let score = s["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert!(
        (score - 1.0).abs() < 1e-9,
        "control and metrics ready, storage optional: {s}"
    );
    let comps = s["components"].as_array().unwrap();
    let storage = comps.iter().find(|c| c["name"] == "storage").unwrap();
    if !std::path::Path::new("/dev/zfs").exists() {
        assert_eq!(storage["state"], "unavailable");
        assert!(storage["reason"].as_str().unwrap().contains("/dev/zfs"));
    }
    assert!(comps
        .iter()
        .any(|c| c["name"] == "control" && c["state"] == "ready"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "control socket mode");
    }
    let endpoints = &s["endpoints"];
    assert_eq!(endpoints["control"], d.socket().display().to_string());
    let metrics_addr = endpoints["metrics"].as_str().unwrap();

    // The metrics endpoint answers with Prometheus text.
    let body = http_get(metrics_addr, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("process_resident_memory_bytes"));
    assert!(body.contains("appliance_health_score"));

    // Probes as exit codes.
    for p in ["live", "ready", "startup"] {
        let out = d.ctl(&["health", p]);
        assert!(
            out.status.success(),
            "health {p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Watchdog pings from the main loop.
    assert!(
        d.notify.wait_for("WATCHDOG=1", 2, Duration::from_secs(5)),
        "fewer than two WATCHDOG=1: {:?}",
        d.notify.lines()
    );

    // Graceful stop.
    let status = d.terminate(Duration::from_secs(10));
    assert!(
        d.notify.wait_for("STOPPING=1", 1, Duration::from_secs(1)),
        "{:?}",
        d.notify.lines()
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{}", d.stderr());
    assert!(!d.socket().exists(), "socket left behind");
}

#[test]
fn wedged_daemon_stops_watchdog_pings() {
    // SIGSTOP freezes every thread: no detached timer may keep pinging.
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[], &[("WATCHDOG_USEC", "400000")]);
    assert!(d.notify.wait_for("WATCHDOG=1", 2, Duration::from_secs(5)));
    let pid = nix::unistd::Pid::from_raw(d.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = d.notify.count("WATCHDOG=1");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(d.notify.count("WATCHDOG=1"), before, "pings while stopped");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(d
        .notify
        .wait_for("WATCHDOG=1", before + 1, Duration::from_secs(5)));
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn second_daemon_on_same_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[], &[]);
    let out = std::process::Command::new(common::applianced())
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first daemon is unharmed.
    assert!(d.ctl(&["status"]).status.success());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on, as after a crash.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("control.sock")).unwrap());
    let mut d = Daemon::start(dir.path(), &[], &[]);
    assert!(d.ctl(&["status"]).status.success());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn state_dir_mode_needs_no_root() {
    use std::os::unix::process::CommandExt;
    if !common::is_root() {
        eprintln!("skipped: switching to another user needs root (CI runs as root)");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut child = std::process::Command::new(common::applianced())
        .arg("--state-dir")
        .arg(&state)
        .env_remove("NOTIFY_SOCKET")
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = state.join("control.sock");
    let ctl = || {
        std::process::Command::new(common::appliancectl())
            .arg("--socket")
            .arg(&socket)
            .args(["health", "ready"])
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap()
    };
    let mut ready = false;
    for _ in 0..100 {
        if socket.exists() && ctl().status.success() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready,
        "applianced --state-dir did not become ready as an unprivileged user"
    );
    // Everything it wrote is under the state dir and owned by that user.
    let meta = std::fs::metadata(state.join("data")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        nobody.uid.as_raw()
    );
}
