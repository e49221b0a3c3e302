//! Commits racing on one path, and commits that stop half-way: the
//! document at a path is always a whole version, usage stays exact, and no
//! kept version is lost. Reproductions first written in review (the
//! reviewer's doc comments say what went wrong before the fix).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use appliance_sync::admission::{LocalAdmission, UsageLedger};
use appliance_sync::client::NoProgress;
use appliance_sync::events::MemorySink;
use appliance_sync::identity::{Authority, ClientName};
use appliance_sync::server::{serve, ServerConfig, Services};
use appliance_sync::store::{ClientStore, Documents, StoreError};
use appliance_sync_proto::limits::MIN_CHUNK_SIZE;
use appliance_sync_proto::message::Mtime;
use appliance_sync_proto::{digest_bytes, validate_manifest, RelPath, ValidManifest};
use common::*;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Alice's store at `root`.
fn open_store(root: &std::path::Path, keep_versions: bool) -> ClientStore {
    let name = ClientName::parse("alice").unwrap();
    ClientStore::open(name, root, keep_versions, Arc::new(AtomicU64::new(0)))
        .unwrap()
        .0
}

/// What opening Alice's store at `root` recomputes from disk.
fn open_report(root: &std::path::Path) -> appliance_sync::store::OpenReport {
    let name = ClientName::parse("alice").unwrap();
    ClientStore::open(name, root, false, Arc::new(AtomicU64::new(0)))
        .unwrap()
        .1
}

fn valid_manifest(path: &str, bytes: &[u8], secs: i64) -> ValidManifest {
    let digest = digest_bytes(bytes).unwrap();
    let m = digest.to_manifest(&RelPath::parse(path).unwrap(), Mtime { secs, nanos: 0 });
    validate_manifest(m).unwrap()
}

fn stage_all(
    store: &ClientStore,
    m: &ValidManifest,
    bytes: &[u8],
) -> Arc<appliance_sync::store::Staged> {
    let staged = store.stage(m).unwrap();
    for c in &m.chunks {
        let s = usize::try_from(c.offset).unwrap();
        store
            .write_staged(&staged, &c.hash, bytes[s..s + c.len as usize].to_vec())
            .unwrap();
    }
    staged
}

/// A manifest of chunks of `len` bytes over `bytes` (more than about 75
/// chunks make a manifest too large for the attribute: it goes to a file).
fn small_chunk_manifest(path: &str, bytes: &[u8], len: usize, secs: i64) -> ValidManifest {
    use appliance_sync_proto::message::{ChunkRef, Manifest};
    use appliance_sync_proto::Hash;
    let chunks = bytes
        .chunks(len)
        .enumerate()
        .map(|(i, c)| ChunkRef {
            offset: (i * len) as u64,
            len: u32::try_from(c.len()).unwrap(),
            hash: Hash::of(c),
        })
        .collect();
    validate_manifest(Manifest {
        path: path.into(),
        size: bytes.len() as u64,
        mtime: Mtime { secs, nanos: 0 },
        file_hash: Hash::of(bytes),
        chunks,
    })
    .unwrap()
}

/// Two uploads of the same file share one staging state (the module docs
/// said "the first commit wins and the other then fails"). When both reach the
/// commit together, the loser, having cloned the staging descriptor before
/// the winner took it exclusively, goes on after the winner's rename: with
/// versions kept it renames the *committed* document to `name.~N~`, then
/// fails to rename its (already moved) staging file. The document the
/// winner reported as committed is gone from its path.
#[test]
fn racing_commits_of_one_shared_upload_leave_the_document_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = Arc::new(open_store(&root, true));
    let mut lost = Vec::new();
    for round in 0..120u64 {
        let bytes = random_bytes(3 << 20, 1000 + round);
        let m = valid_manifest("doc.bin", &bytes, 1_700_000_000 + round as i64);
        let a = stage_all(&store, &m, &bytes);
        // The same upload again (a second connection): the shared state.
        let b = store.stage(&m).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let results: Vec<_> = [a, b]
            .into_iter()
            .map(|s| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    store.commit_staged(&s).map_err(|e| e.to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let now = std::fs::read(root.join("doc.bin")).ok();
        if ok > 0 && now.as_deref() != Some(&bytes[..]) {
            lost.push((round, results.clone(), now.map(|b| b.len())));
        }
    }
    assert!(
        lost.is_empty(),
        "a commit reported success but doc.bin is not its content afterwards, in {} of 120 rounds; first: {:?}",
        lost.len(),
        lost.first()
    );
}

/// Two different uploads of one path committing at once (two devices of
/// one client): nothing serialises the commits of one path, and each
/// computes what it replaces (`in_the_way`) before its rename. When both
/// look before either renames, both subtract the old document's size (and
/// a new path is counted as two files), so the live usage that admission
/// uses drifts from what is on disk until the next restart.
#[test]
fn racing_commits_of_one_path_keep_usage_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = open_store(&root, false);
    let store = Arc::new(store);
    for round in 0..200u64 {
        let path = format!("p{round}.bin");
        if round % 2 == 0 {
            // An existing document to replace.
            let old = random_bytes(1000, 7 * round);
            let m = valid_manifest(&path, &old, 1);
            let s = stage_all(&store, &m, &old);
            store.commit_staged(&s).unwrap();
        }
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = [2000usize, 3000]
            .into_iter()
            .enumerate()
            .map(|(i, len)| {
                let bytes = random_bytes(len, 10_000 + 2 * round + i as u64);
                let m = valid_manifest(&path, &bytes, 2);
                let s = stage_all(&store, &m, &bytes);
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    store.commit_staged(&s).map_err(|e| e.to_string())
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
    }
    let live = (store.used(), store.files());
    drop(store);
    let report = open_report(&root);
    assert_eq!(
        live,
        (report.used_bytes, report.files),
        "live (used, files) vs recomputed from disk"
    );
}

/// The shared-staging commit race over real QUIC, from the CLI's own push:
/// `appliance-sync push a.bin a.bin` (or overlapping arguments) uploads the
/// same file twice at once; both uploads share one staging state. With
/// versions kept, a push that reports success can leave the path empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_one_file_twice_at_once_keeps_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let authority = Authority::open(&dir.path().join("identity")).unwrap();
    let ledger = UsageLedger::new();
    let docs = dir.path().join("documents");
    let documents = Arc::new(Documents::new(&docs, true, ledger.clone()).unwrap());
    let admission = Arc::new(LocalAdmission::new(authority.clone(), ledger, &docs).with_reserve(0));
    let services = Services {
        authority: authority.clone(),
        documents,
        admission,
        events: Arc::new(MemorySink::default()),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = serve(
        ServerConfig::new("127.0.0.1:0".parse().unwrap()),
        services,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let bundle_path = dir.path().join("fay.bundle");
    authority
        .enroll(&ClientName::parse("fay").unwrap(), None, &bundle_path)
        .unwrap();
    let bundle = appliance_sync::identity::Bundle::load(&bundle_path).unwrap();
    let client = appliance_sync::client::SyncClient::connect(
        &bundle,
        Some(&server.local_addr().to_string()),
        appliance_sync::client::ClientOptions::default(),
    )
    .await
    .unwrap();
    let local = dir.path().join("a.bin");
    let mut bad = Vec::new();
    for round in 0..30u64 {
        let bytes = random_bytes(2 << 20, 77 + round);
        std::fs::write(&local, &bytes).unwrap();
        let pushed = client
            .push(&[local.clone(), local.clone()], None, Arc::new(NoProgress))
            .await;
        let now = std::fs::read(docs.join("fay").join("a.bin")).ok();
        if now.as_deref() != Some(&bytes[..]) || pushed.is_err() {
            bad.push((
                round,
                pushed.err().map(|e| e.to_string()),
                now.map(|n| n.len()),
            ));
        }
    }
    client.close().await;
    shutdown.cancel();
    server.wait().await;
    assert!(
        bad.is_empty(),
        "{} of 30 rounds wrong: {:#?}",
        bad.len(),
        bad
    );
}

/// The commit writes a large manifest to `.appliance-meta/manifests/<path>`
/// (not fsynced, "a cache") *before* the document is renamed into place.
/// If the commit stops after that (a crash or kill during the document's
/// fsync, a failed rename), the old document stays with the new manifest.
/// The cache is trusted while size and mtime match: for a new version of
/// the same size and mtime (mtime is the client's, e.g. preserved by the
/// tool that edited the file), the listing reports the new hash for the old
/// bytes, and a retry of the new version is answered `Committed` by the
/// "identical document already in place" shortcut without writing it.
/// (The failure after `store_manifest` is forced here with an immutable
/// parent directory; a crash at that point leaves the same state.)
#[test]
fn a_commit_that_stops_after_its_manifest_never_makes_the_old_document_lie() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = open_store(&root, false);
    // 80 chunks: a manifest too large for the attribute.
    let len = MIN_CHUNK_SIZE as usize;
    let v1 = random_bytes(80 * len, 1);
    let v2 = random_bytes(80 * len, 2);
    let m1 = small_chunk_manifest("d/big.bin", &v1, len, 1_700_000_000);
    let m2 = small_chunk_manifest("d/big.bin", &v2, len, 1_700_000_000);
    let s1 = stage_all(&store, &m1, &v1);
    store.commit_staged(&s1).unwrap();
    assert!(root.join(".appliance-meta/manifests/d/big.bin").exists());
    // The commit of v2 stops after its manifest was stored.
    let s2 = stage_all(&store, &m2, &v2);
    let failed = commit_with_immutable(&store, &s2, &root.join("d"));
    assert!(failed.is_err(), "the forced failure did not happen");
    drop(s2);
    assert_eq!(
        std::fs::read(root.join("d/big.bin")).unwrap(),
        v1,
        "old document in place"
    );
    let (entries, _) = store.list(None, None, 10).unwrap();
    let listed = entries[0].file_hash;
    // The client retries v2.
    let s3 = stage_all(&store, &m2, &v2);
    let retried = store.commit_staged(&s3).map_err(|e| e.to_string());
    let now = std::fs::read(root.join("d/big.bin")).unwrap();
    eprintln!(
        "listed hash is v1's: {}, v2's: {}; retry: {retried:?}; document now v2: {}",
        listed == m1.file_hash,
        listed == m2.file_hash,
        now == v2
    );
    assert_eq!(
        listed, m1.file_hash,
        "the listing must describe the bytes on disk"
    );
    assert!(
        retried.is_err() || now == v2,
        "retry answered Committed but the document is still v1"
    );
}

/// Commits `staged` while `dir` is immutable (`chattr +i`, so root too is
/// refused entries there), to force a commit to stop part-way.
fn commit_with_immutable(
    store: &ClientStore,
    staged: &appliance_sync::store::Staged,
    dir: &std::path::Path,
) -> Result<(), StoreError> {
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(dir)
            .status()
            .unwrap()
            .success()
    };
    assert!(chattr("+i"));
    let result = store.commit_staged(staged);
    assert!(chattr("-i"));
    result
}

/// With versions kept: commits v1 of `doc.bin`, then tries to replace it
/// with v2 (interrupted once and resumed, so its staging file has its name)
/// while the staging directory is immutable, so that the replace's rename
/// fails. Returns the store, v1, v2 and that commit's result.
fn fail_a_replace(
    root: &std::path::Path,
) -> (ClientStore, Vec<u8>, Vec<u8>, Result<(), StoreError>) {
    let store = open_store(root, true);
    let v1 = random_bytes(100_000, 1);
    let m1 = valid_manifest("doc.bin", &v1, 1);
    store.commit_staged(&stage_all(&store, &m1, &v1)).unwrap();
    let v2 = random_bytes(100_000, 2);
    let m2 = valid_manifest("doc.bin", &v2, 2);
    let s = stage_all(&store, &m2, &v2);
    store.suspend_staged(&s, true);
    drop(s);
    let s = store.stage(&m2).unwrap();
    let result = commit_with_immutable(&store, &s, &root.join(".appliance-staging"));
    drop(s);
    (store, v1, v2, result)
}

/// With versions kept, replacing a document is two renames (document to
/// `name.~N~`, then staging file to `name`), with no rollback if the second
/// fails and nothing atomic in between: a crash or failure there leaves the
/// path empty, the old version hidden (versions are not listed). Forced
/// here by making the second rename fail (immutable staging directory).
#[test]
fn replacing_with_versions_kept_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let (_store, v1, v2, result) = fail_a_replace(&root);
    let now = std::fs::read(root.join("doc.bin")).ok();
    eprintln!(
        "commit: {:?}; doc.bin: {:?}; doc.bin.~1~ exists: {}",
        result.as_ref().map_err(|e| e.to_string()),
        now.as_ref().map(Vec::len),
        root.join("doc.bin.~1~").exists()
    );
    assert!(result.is_err());
    assert!(
        now.as_deref() == Some(&v1[..]) || now.as_deref() == Some(&v2[..]),
        "doc.bin is gone after a failed replace"
    );
}

/// Versions kept, two different uploads of one path commit at once: both
/// pick the same free `name.~N~` (computed from a directory listing, then
/// renamed over without a check), so one kept version overwrites another.
#[test]
fn racing_commits_with_versions_kept_lose_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = open_store(&root, true);
    let store = Arc::new(store);
    let mut lost = 0;
    for round in 0..100u64 {
        let path = format!("p{round}.bin");
        let v0 = random_bytes(1000, 3 * round);
        store
            .commit_staged(&stage_all(&store, &valid_manifest(&path, &v0, 1), &v0))
            .unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let mut all = vec![v0];
        let threads: Vec<_> = (1..=2u64)
            .map(|i| {
                let bytes = random_bytes(1000, 3 * round + i);
                all.push(bytes.clone());
                let s = stage_all(&store, &valid_manifest(&path, &bytes, 2), &bytes);
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.commit_staged(&s).map_err(|e| e.to_string())
                })
            })
            .collect();
        let ok = threads
            .into_iter()
            .filter(|_| true)
            .map(|t| t.join().unwrap())
            .filter(Result::is_ok)
            .count();
        let kept: Vec<Vec<u8>> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&path))
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        if ok == 2 && !all.iter().all(|v| kept.contains(v)) {
            lost += 1;
        }
    }
    assert_eq!(
        lost, 0,
        "rounds where both commits succeeded but a version was lost"
    );
}

/// With versions kept, a replace whose rename failed left the version's
/// hard link behind (a second name of the document still in place); the
/// retry links it again: one old version, kept twice (and counted twice
/// by `version_bytes` at the next open).
#[test]
fn a_failed_replace_leaves_no_duplicate_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let (store, _v1, v2, result) = fail_a_replace(&root);
    assert!(result.is_err(), "forced failure");
    let doc_ino = std::fs::metadata(root.join("doc.bin")).unwrap().ino();
    let leftover = std::fs::metadata(root.join("doc.bin.~1~"))
        .ok()
        .map(|m| (m.ino() == doc_ino, m.nlink()));
    eprintln!(
        "after the failed replace: doc.bin.~1~ (same inode as doc.bin, nlink) = {leftover:?}"
    );
    // The client retries (another mtime: a fresh staging state).
    let m3 = valid_manifest("doc.bin", &v2, 3);
    store.commit_staged(&stage_all(&store, &m3, &v2)).unwrap();
    let mut versions: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("doc.bin.~"))
        .collect();
    versions.sort();
    eprintln!("versions after the retry: {versions:?}");
    assert_eq!(versions.len(), 1, "v1 kept once, not {versions:?}");
}

/// `delete` did not take the path's commit turn: a delete landing between
/// a commit's `in_the_way` and its rename (or a commit landing between the
/// delete's `fstatat` and `unlinkat`) subtracts the old size twice or
/// drops the new file's count; live usage drifts from the disk.
#[test]
fn a_delete_racing_a_commit_keeps_usage_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = open_store(&root, false);
    let store = Arc::new(store);
    for round in 0..300u64 {
        let path = format!("p{round}.bin");
        let old = random_bytes(1000, 7 * round);
        store
            .commit_staged(&stage_all(&store, &valid_manifest(&path, &old, 1), &old))
            .unwrap();
        let new = random_bytes(5000, 10_000 + round);
        let s = stage_all(&store, &valid_manifest(&path, &new, 2), &new);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let c = {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let _ = store.commit_staged(&s);
            })
        };
        let d = {
            let (store, barrier) = (store.clone(), barrier.clone());
            let p = RelPath::parse(&path).unwrap();
            std::thread::spawn(move || {
                barrier.wait();
                std::thread::sleep(std::time::Duration::from_micros((round * 53) % 4000));
                let _ = store.delete(&p);
            })
        };
        c.join().unwrap();
        d.join().unwrap();
    }
    let live = (store.used(), store.files());
    drop(store);
    let report = open_report(&root);
    assert_eq!(
        live,
        (report.used_bytes, report.files),
        "live (used, files) vs recomputed from disk"
    );
}

/// A replace with versions kept that stopped between its hard link and its
/// rename (a crash) left `doc.bin.~1~` as a second name of `doc.bin`: the
/// next replace keeps that as the old version rather than linking it again.
#[test]
fn a_version_link_left_by_a_crash_is_not_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("alice");
    let store = open_store(&root, true);
    let v1 = random_bytes(100_000, 1);
    store
        .commit_staged(&stage_all(&store, &valid_manifest("doc.bin", &v1, 1), &v1))
        .unwrap();
    std::fs::hard_link(root.join("doc.bin"), root.join("doc.bin.~1~")).unwrap();
    let v2 = random_bytes(100_000, 2);
    store
        .commit_staged(&stage_all(&store, &valid_manifest("doc.bin", &v2, 2), &v2))
        .unwrap();
    let mut versions: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("doc.bin.~"))
        .collect();
    versions.sort();
    assert_eq!(versions, ["doc.bin.~1~"]);
    assert_eq!(std::fs::read(root.join("doc.bin.~1~")).unwrap(), v1);
    assert_eq!(std::fs::read(root.join("doc.bin")).unwrap(), v2);
    let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
    assert_ne!(ino("doc.bin"), ino("doc.bin.~1~"));
}
