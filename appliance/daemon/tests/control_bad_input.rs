//! Hostile and broken clients on the control socket: each gets a typed error
//! or a closed connection, the daemon keeps serving others, and an oversized
//! length prefix costs it no memory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use appliance_types::control::{
    decode_payload, encode_frame, ClientHello, ErrorCode, Request, Response, ServerHello,
    DEFAULT_MAX_FRAME, MAGIC, PROTOCOL_VERSION,
};
use common::Daemon;

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one frame; `None` if the daemon closed the connection instead.
fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).ok()?;
    let len = u32::from_be_bytes(prefix) as usize;
    assert!(len <= DEFAULT_MAX_FRAME as usize);
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn expect_closed(s: &mut UnixStream) {
    let mut rest = Vec::new();
    // Either EOF or a reset: the daemon is done with us.
    let _ = s.read_to_end(&mut rest);
}

fn error_of(frame: &[u8]) -> appliance_types::control::ControlError {
    match decode_payload::<Response>(frame, "response").unwrap() {
        Response::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn handshake(s: &mut UnixStream) -> ServerHello {
    s.write_all(&encode_frame(&ClientHello::new("test"), DEFAULT_MAX_FRAME).unwrap())
        .unwrap();
    decode_payload(&read_frame(s).unwrap(), "server hello").unwrap()
}

fn still_serves(d: &Daemon) {
    let out = d.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "daemon stopped serving: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_clients_get_errors_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[], &[]);

    // Random bytes as the first thing on the wire.
    {
        let mut s = connect(&d);
        let junk: Vec<u8> = (0u32..4096)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let _ = s.write_all(&junk);
        if let Some(f) = read_frame(&mut s) {
            let e = error_of(&f);
            assert!(
                matches!(e.code, ErrorCode::FrameTooLarge | ErrorCode::BadFrame),
                "{e:?}"
            );
        }
        expect_closed(&mut s);
    }
    still_serves(&d);

    // A length prefix over the maximum.
    {
        let mut s = connect(&d);
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = error_of(&read_frame(&mut s).unwrap());
        assert_eq!(e.code, ErrorCode::FrameTooLarge, "{e:?}");
        expect_closed(&mut s);
    }
    still_serves(&d);

    // A truncated frame: prefix says 100, 10 bytes arrive, then EOF.
    {
        let mut s = connect(&d);
        s.write_all(&100u32.to_be_bytes()).unwrap();
        s.write_all(&[1u8; 10]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        expect_closed(&mut s);
    }
    still_serves(&d);

    // A wrong protocol version.
    {
        let mut s = connect(&d);
        let hello = ClientHello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION + 41,
            client: "from the future".into(),
        };
        s.write_all(&encode_frame(&hello, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
        let e = error_of(&read_frame(&mut s).unwrap());
        assert_eq!(e.code, ErrorCode::UnsupportedVersion);
        assert!(
            e.message.contains(&(PROTOCOL_VERSION + 41).to_string()),
            "{e:?}"
        );
        expect_closed(&mut s);
    }
    still_serves(&d);

    // After a good handshake, an undecodable request gets BadFrame and the
    // connection stays usable.
    {
        let mut s = connect(&d);
        let hello = handshake(&mut s);
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        s.write_all(&[0, 0, 0, 3, 0xee, 0xee, 0xee]).unwrap();
        let e = error_of(&read_frame(&mut s).unwrap());
        assert_eq!(e.code, ErrorCode::BadFrame);
        s.write_all(&encode_frame(&Request::Status, DEFAULT_MAX_FRAME).unwrap())
            .unwrap();
        let r: Response = decode_payload(&read_frame(&mut s).unwrap(), "response").unwrap();
        assert!(matches!(r, Response::Status(_)), "{r:?}");
    }

    // A slow client holding a connection open does not block others.
    let idle = connect(&d);
    still_serves(&d);
    drop(idle);

    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn oversized_prefixes_cost_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &[], &[]);
    still_serves(&d);
    let (rss0, vsz0) = d.memory_kib();
    // Forty clients announce ~4 GiB frames and keep their connections open;
    // a daemon that allocated for the announced size would grow by 160 GiB of
    // address space.
    let mut held = Vec::new();
    for i in 0..40u32 {
        let mut s = connect(&d);
        s.write_all(&(u32::MAX - i).to_be_bytes()).unwrap();
        s.write_all(&[0u8; 1024]).unwrap_or(());
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, vsz1) = d.memory_kib();
    assert!(
        rss1 < rss0 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    assert!(
        vsz1 < vsz0 + 256 * 1024,
        "VmSize grew from {vsz0} KiB to {vsz1} KiB"
    );
    for mut s in held {
        let e = error_of(&read_frame(&mut s).unwrap());
        assert_eq!(e.code, ErrorCode::FrameTooLarge);
    }
    still_serves(&d);
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn non_admin_peer_cannot_mutate() {
    use std::os::unix::process::CommandExt;
    if !common::is_root() {
        eprintln!("skipped: acting as another user needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nobody must be able to reach the socket: traversable dir, socket group nogroup.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let nogroup = nix::unistd::Group::from_gid(nobody.gid).unwrap().unwrap();

    let run_as_nobody = |d: &Daemon, args: &[&str]| {
        std::process::Command::new(common::appliancectl())
            .arg("--socket")
            .arg(d.socket())
            .args(args)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap()
    };

    // 1. nobody is not in the admin group: status works, mutation is refused.
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[control]\nsocket_group = \"{}\"\nadmin_group = \"appliance-admin-for-tests\"\n",
            nogroup.name
        ),
    )
    .unwrap();
    let state = dir.path().join("a");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let out = run_as_nobody(&d, &["status"]);
    assert!(
        out.status.success(),
        "nobody cannot read status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_as_nobody(&d, &["log-level", "trace", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "permission_denied", "{doc}");
    // Root may.
    assert!(d.ctl(&["log-level", "info"]).status.success());
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));

    // 2. With nobody's group as the admin group, nobody may.
    let cfg = dir.path().join("b.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[control]\nsocket_group = \"{0}\"\nadmin_group = \"{0}\"\n",
            nogroup.name
        ),
    )
    .unwrap();
    let state = dir.path().join("b");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()], &[]);
    let out = run_as_nobody(&d, &["log-level", "debug"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.terminate(Duration::from_secs(10)).code(), Some(0));
}
