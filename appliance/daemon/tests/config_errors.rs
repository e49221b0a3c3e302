//! A bad config file stops the daemon at start-up with a message naming the key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

fn run_with_config(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("appliance.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(common::applianced())
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_is_named_and_refused() {
    let (code, err) =
        run_with_config("version = 1\n[metrics]\nlisten = \"127.0.0.1:0\"\nlistne = \"x\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("metrics.listne"), "{err}");
}

#[test]
fn wrong_type_is_named_and_refused() {
    let (code, err) = run_with_config("version = 1\n[control]\nmax_connections = \"lots\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("control.max_connections"), "{err}");
}

#[test]
fn invalid_value_and_version_are_refused() {
    let (code, err) = run_with_config("version = 1\n[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("metrics.listen") && err.contains("loopback"),
        "{err}"
    );
    let (code, err) = run_with_config("version = 7\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("version"), "{err}");
    let (code, err) = run_with_config("version = 1\n[log]\nlevel = \"applianced=shouty\"\n");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("log.level"), "{err}");
}

#[test]
fn missing_config_file_is_an_error() {
    let out = Command::new(common::applianced())
        .arg("--config")
        .arg("/nonexistent/appliance.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/appliance.toml"));
}

#[test]
fn check_config_prints_resolved_paths() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::applianced())
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&dir.path().join("control.sock").display().to_string()),
        "{text}"
    );
}
