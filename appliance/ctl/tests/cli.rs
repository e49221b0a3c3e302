//! `appliancectl` without a daemon: clear errors and the documented exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn ctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_appliancectl"))
}

#[test]
fn no_daemon_names_the_socket_and_exits_1() {
    let out = ctl()
        .args(["--socket", "/nonexistent/dir/control.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dir/control.sock"), "{err}");
    assert!(err.contains("Is the daemon running?"), "{err}");
}

#[test]
fn socket_from_environment() {
    let out = ctl()
        .env("APPLIANCE_SOCKET", "/nonexistent/env.sock")
        .args(["health", "live"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env.sock"));
}

#[test]
fn json_error_document() {
    let out = ctl()
        .args(["--socket", "/nonexistent.sock", "status", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent.sock"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        ctl().arg("frobnicate").output().unwrap().status.code(),
        Some(2)
    );
    assert_eq!(
        ctl()
            .args(["health", "sideways"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert_eq!(ctl().output().unwrap().status.code(), Some(2));
}

#[test]
fn a_socket_that_is_not_the_daemon_is_reported() {
    // Something that accepts and answers garbage.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"\x00\x00\x00\x03abc");
    });
    let out = ctl()
        .arg("--socket")
        .arg(&path)
        .arg("status")
        .output()
        .unwrap();
    t.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not speak the appliance control protocol"),
        "{err}"
    );
}

#[test]
fn a_ttl_of_zero_is_a_usage_error() {
    let out = ctl()
        .args([
            "--socket",
            "/nonexistent.sock",
            "cache",
            "put",
            "agent",
            "prompt",
            "--response",
            "r",
            "--ttl",
            "0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--ttl"), "{err}");
}

#[test]
fn a_socket_the_user_may_not_open_is_not_called_a_missing_daemon() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: acting as another user needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("control.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // nobody/nogroup.
    let out = ctl()
        .arg("--socket")
        .arg(&path)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        !err.contains("Is the daemon running?"),
        "the daemon is running; the user lacks the rights: {err}"
    );
    assert!(err.contains("socket_group"), "{err}");
}
