//! The QMP and guest-agent clients against scripted peers on a Unix socket
//! (no QEMU needed; runs in `cargo test --workspace`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use appliance_hw_tests::agent::Agent;
use appliance_hw_tests::qmp::Qmp;
use appliance_hw_tests::vm::data_disk_serial;
use base64::Engine as _;
use serde_json::{json, Value};

fn listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sock");
    let l = UnixListener::bind(&path).unwrap();
    (dir, path, l)
}

fn read_msg(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(line.trim()).unwrap()
}

fn send(w: &mut UnixStream, v: &Value) {
    w.write_all(format!("{v}\r\n").as_bytes()).unwrap();
}

#[test]
fn qmp_negotiates_keeps_events_and_reports_errors() {
    let (_dir, path, l) = listener();
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        send(&mut w, &json!({"QMP": {"version": {}, "capabilities": []}}));
        assert_eq!(read_msg(&mut r)["execute"], "qmp_capabilities");
        send(&mut w, &json!({"return": {}}));
        // A command whose reply is preceded by an event, written in two
        // pieces to exercise partial reads.
        let m = read_msg(&mut r);
        assert_eq!(m["execute"], "device_del");
        assert_eq!(m["arguments"]["id"], "baydev2");
        w.write_all(b"{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"bay")
            .unwrap();
        w.flush().unwrap();
        thread::sleep(Duration::from_millis(50));
        w.write_all(b"dev2\"}}\r\n").unwrap();
        send(&mut w, &json!({"return": {}}));
        let m = read_msg(&mut r);
        assert_eq!(m["execute"], "nope");
        send(
            &mut w,
            &json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}),
        );
        // Silence: the next command must time out, not hang.
        let _ = read_msg(&mut r);
        thread::sleep(Duration::from_millis(700));
    });
    let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    qmp.execute(
        "device_del",
        &json!({"id": "baydev2"}),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(qmp.events().len(), 1);
    let ev = qmp
        .wait_event("DEVICE_DELETED", Duration::from_millis(10))
        .unwrap();
    assert_eq!(ev["data"]["device"], "baydev2");
    let err = qmp
        .execute("nope", &json!({}), Duration::from_secs(5))
        .unwrap_err();
    assert!(format!("{err:#}").contains("CommandNotFound"), "{err:#}");
    let t0 = Instant::now();
    let err = qmp
        .execute("query-status", &json!({}), Duration::from_millis(300))
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the deadline was not kept"
    );
    assert!(format!("{err:#}").contains("no reply"), "{err:#}");
    server.join().unwrap();
}

/// A scripted guest agent: answers guest-sync (after ignoring the first
/// one, as an agent that is not up yet would), runs one guest-exec whose
/// status is "running" once and then exited with output.
#[test]
fn agent_syncs_skips_stale_replies_and_decodes_exec_output() {
    let (_dir, path, l) = listener();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        // First sync: no answer (agent not up).
        let first = read_msg(&mut r);
        assert_eq!(first["execute"], "guest-sync");
        // Second sync: a stale reply to the first, a 0xFF marker, then the
        // right one.
        let second = read_msg(&mut r);
        send(&mut w, &json!({"return": first["arguments"]["id"]}));
        w.write_all(&[0xff]).unwrap();
        send(&mut w, &json!({"return": second["arguments"]["id"]}));
        let mut polls = 0;
        loop {
            let m = read_msg(&mut r);
            match m["execute"].as_str().unwrap() {
                "guest-sync" => send(&mut w, &json!({"return": m["arguments"]["id"]})),
                "guest-exec" => {
                    assert_eq!(m["arguments"]["path"], "/bin/sh");
                    assert_eq!(
                        m["arguments"]["arg"],
                        json!(["-c", "appliancectl health ready"])
                    );
                    assert_eq!(m["arguments"]["capture-output"], true);
                    send(&mut w, &json!({"return": {"pid": 42}}));
                }
                "guest-exec-status" => {
                    assert_eq!(m["arguments"]["pid"], 42);
                    polls += 1;
                    if polls == 1 {
                        send(&mut w, &json!({"return": {"exited": false}}));
                    } else {
                        send(
                            &mut w,
                            &json!({"return": {"exited": true, "exitcode": 1,
                                "out-data": b64("ready: no\n"), "err-data": b64("storage: unavailable\n")}}),
                        );
                        return polls;
                    }
                }
                other => panic!("unexpected {other}"),
            }
        }
    });
    let mut agent = Agent::connect(&path, Duration::from_secs(20)).unwrap();
    let out = agent
        .sh("appliancectl health ready", Duration::from_secs(10))
        .unwrap();
    assert_eq!(out.code, 1);
    assert!(!out.success());
    assert_eq!(out.stdout, "ready: no\n");
    assert_eq!(out.stderr, "storage: unavailable\n");
    assert!(out.to_string().contains("exit 1"));
    assert_eq!(server.join().unwrap(), 2);
}

#[test]
fn data_disk_serials_fit_virtio_and_are_distinct() {
    let serials: Vec<String> = (0..8).map(data_disk_serial).collect();
    for s in &serials {
        assert!(
            s.len() <= 20,
            "virtio-blk serials are at most 20 bytes: {s}"
        );
    }
    let mut sorted = serials.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), serials.len());
}
