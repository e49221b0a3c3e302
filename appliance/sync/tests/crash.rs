//! Interrupted uploads over real QUIC: the real `appliance-sync` binary
//! killed mid-push, and the stand-alone server (examples/sync-server)
//! killed with SIGKILL mid-upload and restarted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use appliance_sync::client::{ClientOptions, NoProgress, SyncClient};
use appliance_sync::identity::{Authority, Bundle, ClientName};
use appliance_sync_proto::{digest_bytes, Hash};
use common::*;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Big enough that the push takes a while even on loopback.
const FILE_SIZE: usize = 96 << 20;

fn distinct_chunks(data: &[u8]) -> usize {
    let digest = digest_bytes(data).unwrap();
    digest
        .chunks
        .iter()
        .map(|c| c.hash)
        .collect::<HashSet<_>>()
        .len()
}

/// Waits until at least `n` chunks are stored under `root`; panics if the
/// child exits first or it takes too long.
fn wait_for_chunks(root: &Path, n: usize, child: &mut Child) {
    let start = Instant::now();
    while stored_chunks(root) < n {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited ({status}) before {n} chunks were stored");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no chunks arrived"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the chunk count under `root` stops changing.
fn settled_chunks(root: &Path) -> usize {
    let mut last = stored_chunks(root);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = stored_chunks(root);
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_resumes_with_only_the_missing_chunks() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("alice", None);
    let file = fx.path().join("archive.bin");
    let data = random_bytes(FILE_SIZE, 11);
    std::fs::write(&file, &data).unwrap();
    let total = distinct_chunks(&data);
    let root = fx.client_root("alice");

    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance-sync"))
        .arg("--identity")
        .arg(&bundle)
        .arg("--server")
        .arg(fx.addr.to_string())
        .arg("push")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_chunks(&root, 4, &mut child);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = settled_chunks(&root);
    assert!(
        stored >= 4 && stored < total,
        "{stored} of {total} chunks stored"
    );
    assert!(
        visible_files(&root).is_empty(),
        "nothing partial is visible"
    );

    let client = fx.connect(&bundle).await;
    let report = client
        .push(std::slice::from_ref(&file), None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(
        report[0].chunks_sent as usize,
        total - stored,
        "only the {} missing chunks are sent",
        total - stored
    );
    client.close().await;
    let stored_file = std::fs::read(root.join("archive.bin")).unwrap();
    assert_eq!(Hash::of(&stored_file), Hash::of(&data));
    assert_eq!(stored_chunks(&root), 0, "chunks moved into the document");
    fx.stop().await;
}

fn example_server() -> PathBuf {
    // target/<profile>/deps/crash-<hash> -> target/<profile>/examples/sync-server
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples").join("sync-server");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test -p appliance-sync` (which builds examples)",
        path.display()
    );
    path
}

fn start_server(identity: &Path, documents: &Path, port: u16) -> (Child, String) {
    let mut child = Command::new(example_server())
        .arg("--identity")
        .arg(identity)
        .arg("--documents")
        .arg(documents)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected server output {line:?}"))
        .to_owned();
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_upload_restarts_clean_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity");
    let documents = dir.path().join("documents");
    let bundle_path = dir.path().join("alice.bundle");
    Authority::open(&identity)
        .unwrap()
        .enroll(&ClientName::parse("alice").unwrap(), None, &bundle_path)
        .unwrap();
    let bundle = Bundle::load(&bundle_path).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.path().join("archive.bin");
    let data = random_bytes(FILE_SIZE, 12);
    std::fs::write(&file, &data).unwrap();
    let total = distinct_chunks(&data);
    let root = documents.join("alice");

    let (mut server, addr) = start_server(&identity, &documents, port);
    let client = SyncClient::connect(&bundle, Some(&addr), ClientOptions::default())
        .await
        .unwrap();
    let pushing = {
        let client = client.clone();
        let file = file.clone();
        tokio::spawn(async move { client.push(&[file], None, Arc::new(NoProgress)).await })
    };
    let root_clone = root.clone();
    tokio::task::spawn_blocking(move || {
        wait_for_chunks(&root_clone, 4, &mut server);
        server.kill().unwrap(); // SIGKILL: no shutdown code runs
        server.wait().unwrap();
    })
    .await
    .unwrap();
    // The client would only notice at the QUIC idle timeout; give up now.
    pushing.abort();
    drop(client);
    let stored = stored_chunks(&root);
    assert!(stored >= 4 && stored < total, "{stored} of {total}");
    assert!(
        visible_files(&root).is_empty(),
        "no partial document after the crash"
    );

    // Junk in staging (an assembly that can never complete) is swept at
    // start-up; the interrupted upload's staging file and its durable
    // record of landed chunks are kept for the resume.
    let staging = root.join(".appliance-staging");
    std::fs::write(staging.join("half-written"), b"junk").unwrap();
    let (mut server, addr) = start_server(&identity, &documents, port);
    let names = staging_names(&root);
    assert_eq!(names.len(), 2, "only the resumable pair is kept: {names:?}");
    assert!(names[0].ends_with(".data") && names[1].ends_with(".landed"));
    assert!(
        visible_files(&root).is_empty(),
        "still nothing partial visible"
    );
    let client = SyncClient::connect(&bundle, Some(&addr), ClientOptions::default())
        .await
        .unwrap();
    let report = client
        .push(std::slice::from_ref(&file), None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(report[0].chunks_sent as usize, total - stored);
    client.close().await;
    let stored_file = std::fs::read(root.join("archive.bin")).unwrap();
    assert_eq!(Hash::of(&stored_file), Hash::of(&data));
    assert!(
        staging_names(&root).is_empty(),
        "staging settled by the commit"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}
