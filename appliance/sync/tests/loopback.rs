//! Real QUIC on 127.0.0.1: round trips, dedup, quota, refused clients,
//! hostile input and a corrupted chunk.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

mod common;

use appliance_sync::client::{ClientError, NoProgress};
use appliance_sync::events::SyncEvent;
use appliance_sync::identity::{Bundle, ClientName, BUNDLE_VERSION, SERVER_NAME};
use appliance_sync_proto::limits::{MAX_CHUNKS_PER_MANIFEST, MAX_FRAME_LEN};
use appliance_sync_proto::message::{Manifest, Mtime};
use appliance_sync_proto::{
    digest_bytes, ChunkRef, Hash, Message, PathRejection, RelPath, WireError,
};
use common::*;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_push_ls_pull_rm_status() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("alice", None);
    let client = fx.connect(&bundle).await;

    let src = fx.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let big = random_bytes(5 << 20, 1);
    let small = b"a small statement".to_vec();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("sub/small.txt"), &small).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();

    let reports = client
        .push(
            std::slice::from_ref(&src),
            Some(&RelPath::parse("backup").unwrap()),
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
    assert_eq!(reports.len(), 3);

    let entries = client.list(None).await.unwrap();
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "backup/src/big.bin",
            "backup/src/empty",
            "backup/src/sub/small.txt"
        ]
    );
    let big_entry = &entries[0];
    assert_eq!(big_entry.size, big.len() as u64);
    assert_eq!(big_entry.file_hash, Hash::of(&big));
    assert_eq!(client.list(Some("backup/src/sub")).await.unwrap().len(), 1);

    let out = fx.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    for (remote, want) in [
        ("backup/src/big.bin", &big),
        ("backup/src/sub/small.txt", &small),
        ("backup/src/empty", &Vec::new()),
    ] {
        let report = client.pull(remote, Some(&out)).await.unwrap();
        let got = std::fs::read(&report.local).unwrap();
        assert_eq!(Hash::of(&got), Hash::of(want), "{remote}");
        assert_eq!(report.file_hash, Hash::of(want).to_string());
    }
    // The mtime travelled with the file.
    let local_mtime = std::fs::metadata(src.join("big.bin"))
        .unwrap()
        .modified()
        .unwrap();
    let pulled_mtime = std::fs::metadata(out.join("big.bin"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(local_mtime, pulled_mtime);

    let status = client.status().await.unwrap();
    assert_eq!(status.files, 3);
    assert_eq!(status.used, (big.len() + small.len()) as u64);

    client.delete("backup/src/empty").await.unwrap();
    assert_eq!(client.list(None).await.unwrap().len(), 2);
    let err = client.delete("backup/src/empty").await.unwrap_err();
    assert!(
        matches!(err.wire_error(), Some(WireError::NotFound { .. })),
        "{err}"
    );
    let err = client.pull("nope", Some(&out)).await.unwrap_err();
    assert!(
        matches!(err.wire_error(), Some(WireError::NotFound { .. })),
        "{err}"
    );

    client.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = fx.events.events();
    let subjects: Vec<String> = events.iter().map(SyncEvent::subject).collect();
    assert!(subjects.contains(&"sync.client.alice.connected".to_owned()));
    assert!(subjects.contains(&"sync.client.alice.disconnected".to_owned()));
    assert_eq!(
        subjects
            .iter()
            .filter(|s| *s == "sync.upload.alice.completed")
            .count(),
        3
    );
    assert!(events.iter().any(|e| matches!(e,
        SyncEvent::UploadCompleted { path, bytes_transferred, .. }
            if path == "backup/src/big.bin" && *bytes_transferred == big.len() as u64)));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_push_sends_under_one_percent() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("alice", None);
    let file = fx.path().join("scan.pdf");
    let data = random_bytes(24 << 20, 2);
    std::fs::write(&file, &data).unwrap();

    let first = fx.connect(&bundle).await;
    let report = first
        .push(std::slice::from_ref(&file), None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(report[0].bytes_sent, data.len() as u64);
    let first_wire = first.wire_bytes_sent();
    assert!(first_wire >= data.len() as u64);
    first.close().await;

    let second = fx.connect(&bundle).await;
    let before = second.wire_bytes_sent();
    let report = second
        .push(std::slice::from_ref(&file), None, Arc::new(NoProgress))
        .await
        .unwrap();
    let wire = second.wire_bytes_sent() - before;
    assert_eq!(report[0].chunks_sent, 0);
    assert_eq!(report[0].bytes_sent, 0);
    assert!(
        wire * 100 < data.len() as u64,
        "second push put {wire} bytes on the wire for a {} byte file",
        data.len()
    );
    // A small edit re-sends about one chunk, not the file.
    let mut edited = data.clone();
    edited[10 << 20] ^= 0xff;
    std::fs::write(&file, &edited).unwrap();
    let report = second
        .push(&[file], None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(report[0].chunks_sent <= 2, "{:?}", report[0]);
    assert!(report[0].bytes_sent < 8 << 20);
    second.close().await;
    let stored = std::fs::read(fx.client_root("alice").join("scan.pdf")).unwrap();
    assert_eq!(Hash::of(&stored), Hash::of(&edited));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_writes_nothing() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("bob", Some(1 << 20));
    let client = fx.connect(&bundle).await;
    let file = fx.path().join("too-big.bin");
    std::fs::write(&file, random_bytes(2 << 20, 3)).unwrap();
    let err = client
        .push(&[file], None, Arc::new(NoProgress))
        .await
        .unwrap_err();
    match err.wire_error() {
        Some(WireError::QuotaExceeded { needed, available }) => {
            // Chunks land directly in the staging file: the peak is the file.
            assert_eq!(*needed, 2 << 20, "the assembled file");
            assert_eq!(*available, 1 << 20);
        }
        other => panic!("expected QuotaExceeded, got {other:?} ({err})"),
    }
    assert!(err.to_string().contains("quota exceeded"), "{err}");
    let root = fx.client_root("bob");
    assert!(visible_files(&root).is_empty());
    assert_eq!(stored_chunks(&root), 0);
    assert_eq!(client.status().await.unwrap().used, 0);
    // Something that fits is accepted.
    let ok = fx.path().join("ok.bin");
    std::fs::write(&ok, random_bytes(100_000, 4)).unwrap();
    client
        .push(&[ok], None, Arc::new(NoProgress))
        .await
        .unwrap();
    client.close().await;
    let events = fx.events.events();
    assert!(events.iter().any(|e| matches!(e,
        SyncEvent::UploadFailed { path, bytes_transferred: 0, .. } if path == "too-big.bin")));
    fx.stop().await;
}

/// Uploads admitted together are counted against each other: each one's
/// bytes are reserved until it ends, so one push of several files that each
/// fit the quota alone stores only what fits together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_cannot_exceed_the_quota() {
    let mut fx = Fixture::start().await;
    let quota = 1u64 << 20;
    let bundle = fx.enroll("carol", Some(quota));
    let client = fx.connect(&bundle).await;
    let mut files = Vec::new();
    for i in 0..4u64 {
        let f = fx.path().join(format!("f{i}.bin"));
        std::fs::write(&f, random_bytes(700_000, 100 + i)).unwrap();
        files.push(f);
    }
    // The client pushes all four at once; any two are more than the quota.
    let err = client
        .push(&files, None, Arc::new(NoProgress))
        .await
        .unwrap_err();
    match err.wire_error() {
        Some(WireError::QuotaExceeded { needed, available }) => {
            assert_eq!(*needed, 700_000);
            assert!(*available <= quota - 700_000, "{available}");
        }
        other => panic!("expected QuotaExceeded, got {other:?} ({err})"),
    }
    let root = fx.client_root("carol");
    let stored: Vec<u64> = visible_files(&root)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(stored, vec![700_000], "exactly one file fits");
    assert_eq!(client.status().await.unwrap().used, 700_000);
    // Nothing stays reserved by the refused or committed uploads: what
    // still fits is admitted.
    let rest = fx.path().join("rest.bin");
    std::fs::write(&rest, random_bytes(300_000, 9)).unwrap();
    client
        .push(&[rest], None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(client.status().await.unwrap().used, 1_000_000);
    client.close().await;
    fx.stop().await;
}

/// Waits until the server reports the upload of `path` failed.
async fn upload_failed(fx: &Fixture, path: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !fx
        .events
        .events()
        .iter()
        .any(|e| matches!(e, SyncEvent::UploadFailed { path: p, .. } if p == path))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no UploadFailed for {path}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the upload of `path` (`len` bytes) and returns its stream once
/// the server asked for chunks (admitted), or the refusal.
async fn start_upload(
    conn: &quinn::Connection,
    path: &str,
    len: usize,
    seed: u64,
) -> Result<quinn::SendStream, Message> {
    let data = random_bytes(len, seed);
    let manifest = digest_bytes(&data)
        .unwrap()
        .to_manifest(&RelPath::parse(path).unwrap(), Mtime { secs: 5, nanos: 0 });
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
        .await
        .unwrap();
    match read_one(&mut recv).await {
        Message::NeedChunks(_) => Ok(send),
        other => Err(other),
    }
}

/// An upload that ends without committing gives its reservation back,
/// whether its stream is reset or its connection goes: a later upload that
/// fits only without it is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_uploads_release_their_reservation() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("erin", Some(1 << 20));
    // Two of these never fit together.
    let size = 900_000;
    // The connection goes in the middle of an upload.
    let first = raw_connect(&bundle, fx.addr).await.unwrap();
    let _stream = start_upload(&first, "a.bin", size, 21).await.unwrap();
    first.close(quinn::VarInt::from_u32(0), b"gone");
    upload_failed(&fx, "a.bin").await;
    // The upload stream is reset; the connection stays.
    let second = raw_connect(&bundle, fx.addr).await.unwrap();
    let mut stream = start_upload(&second, "b.bin", size, 22)
        .await
        .expect("admitted once the dropped connection's upload ended");
    stream.reset(quinn::VarInt::from_u32(0)).unwrap();
    upload_failed(&fx, "b.bin").await;
    // While `second` is still open, a file that fits is stored.
    let file = fx.path().join("c.bin");
    std::fs::write(&file, random_bytes(size, 23)).unwrap();
    let client = fx.connect(&bundle).await;
    client
        .push(&[file], None, Arc::new(NoProgress))
        .await
        .expect("admitted once the reset upload ended");
    assert_eq!(client.status().await.unwrap().used, size as u64);
    client.close().await;
    second.close(quinn::VarInt::from_u32(0), b"done");
    fx.stop().await;
}

/// A client that reconnects while the server still holds its old
/// connection (a dead link not yet timed out) and pushes the same file
/// again shares the old upload's staging file. It was also reserved a
/// second time, so a file that fits the quota once was refused
/// (`QuotaExceeded`) until the old connection went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_resumed_while_the_old_connection_is_open_is_reserved_once() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("gail", Some(1 << 20));
    let size = 900_000;
    let old = raw_connect(&bundle, fx.addr).await.unwrap();
    let _stream = start_upload(&old, "a.bin", size, 31).await.unwrap();
    let file = fx.path().join("a.bin");
    std::fs::write(&file, random_bytes(size, 31)).unwrap();
    let client = fx.connect(&bundle).await;
    client
        .push(&[file], None, Arc::new(NoProgress))
        .await
        .expect("the same file again, while the old upload is open");
    assert_eq!(client.status().await.unwrap().used, size as u64);
    // Once the old upload ends too, nothing stays reserved.
    old.close(quinn::VarInt::from_u32(0), b"gone");
    upload_failed(&fx, "a.bin").await;
    let rest = fx.path().join("rest.bin");
    std::fs::write(&rest, random_bytes((1 << 20) - size, 32)).unwrap();
    client
        .push(&[rest], None, Arc::new(NoProgress))
        .await
        .expect("the rest of the quota");
    assert_eq!(client.status().await.unwrap().used, 1 << 20);
    client.close().await;
    fx.stop().await;
}

/// Uploads pipelined on one stream are answered in the order they were
/// sent. The server looks up one upload's staging state at a time; looked
/// up in parallel, they were answered in the order the lookups finished,
/// and each held its manifest and chunk map until handled, however many
/// were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_pipelined_on_one_stream_are_answered_in_order() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("hana", None);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut sent = Vec::new();
    // As many as a connection may have open (version 2).
    for i in 0..32u64 {
        let data = random_bytes(1000 + i as usize, 40 + i);
        let manifest = digest_bytes(&data).unwrap().to_manifest(
            &RelPath::parse(&format!("p{i}.bin")).unwrap(),
            Mtime { secs: 5, nanos: 0 },
        );
        sent.push(manifest.chunks[0].hash);
        appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
            .await
            .unwrap();
    }
    let mut answered = Vec::new();
    for _ in 0..sent.len() {
        match read_one(&mut recv).await {
            Message::NeedChunks(n) => answered.push(n.hashes[0]),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answered, sent);
    conn.close(quinn::VarInt::from_u32(0), b"done");
    fx.stop().await;
}

/// A manifest of the most chunks a manifest may have (of a file far over
/// any quota here): its staging lookup is the slowest there is.
fn largest_manifest(path: &str, seed: u32) -> Manifest {
    let n = MAX_CHUNKS_PER_MANIFEST;
    let len = 256 << 10;
    Manifest {
        path: path.into(),
        size: u64::from(n) * u64::from(len),
        mtime: Mtime { secs: 0, nanos: 0 },
        file_hash: Hash::of(&seed.to_le_bytes()),
        chunks: (0..n)
            .map(|i| ChunkRef {
                offset: u64::from(i) * u64::from(len),
                len,
                hash: Hash::of(&[seed.to_le_bytes(), i.to_le_bytes()].concat()),
            })
            .collect(),
    }
}

/// Uploads waiting for their staging lookup on a stream the client resets
/// never start: they held a reservation and an upload slot until the idle
/// timeout (120 s), so the quota was not free for the next push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_waiting_on_a_reset_stream_never_start() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("ines", Some(1 << 20));
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    // Lookups run one at a time per connection: two of the slowest kind
    // on one stream keep the next ones waiting.
    let (mut slow_send, mut slow_recv) = conn.open_bi().await.unwrap();
    for seed in 0..2 {
        let m = largest_manifest(&format!("slow{seed}.bin"), seed);
        appliance_sync::wire::write_frame(&mut slow_send, &Message::Upload(m))
            .await
            .unwrap();
    }
    let t0 = std::time::Instant::now();
    let first = read_one(&mut slow_recv).await;
    assert!(
        matches!(
            &first,
            Message::Error {
                error: WireError::QuotaExceeded { .. },
                ..
            }
        ),
        "{first:?}"
    );
    // The second slow lookup runs now. Three uploads that fit the quota
    // together wait behind it; their stream is reset meanwhile.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for i in 0..3u64 {
        let data = random_bytes(300_000, 1000 + i);
        let manifest = digest_bytes(&data).unwrap().to_manifest(
            &RelPath::parse(&format!("r{i}.bin")).unwrap(),
            Mtime { secs: 5, nanos: 0 },
        );
        appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
            .await
            .unwrap();
    }
    // Time for the frames to reach the server (a reset discards what has
    // not), far less than the slow lookup takes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    send.reset(quinn::VarInt::from_u32(0)).unwrap();
    recv.stop(quinn::VarInt::from_u32(0)).unwrap();
    let second = read_one(&mut slow_recv).await;
    let lookup = t0.elapsed();
    assert!(
        matches!(
            &second,
            Message::Error {
                error: WireError::QuotaExceeded { .. },
                ..
            }
        ),
        "{second:?}"
    );
    eprintln!("the second slow lookup ended {lookup:?} after the first");

    // 1 MB fits the 1 MiB quota only if no upload of the reset stream holds
    // a part of it.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let data = random_bytes(1_000_000, 300);
    let manifest = digest_bytes(&data).unwrap().to_manifest(
        &RelPath::parse("after.bin").unwrap(),
        Mtime { secs: 5, nanos: 0 },
    );
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
        .await
        .unwrap();
    match read_one(&mut recv).await {
        Message::NeedChunks(_) => {}
        other => panic!("the reset stream's uploads still hold the quota: {other:?}"),
    }
    conn.close(quinn::VarInt::from_u32(0), b"done");
    fx.stop().await;
}

/// The next frame on `recv`, or `None` if the server finished the stream
/// without one (printed as "no answer" by [`answered`]).
async fn answer(recv: &mut quinn::RecvStream) -> Option<Message> {
    appliance_sync::wire::read_frame(recv, Duration::from_secs(20))
        .await
        .unwrap()
        .map(|(m, _)| m)
}

/// Keeps the connection's lookup queue busy for one slow staging lookup
/// (~2 s in a debug build): starts two uploads of the slowest kind on a
/// stream of their own (both refused by the 1 MiB quota of the tests'
/// client) and returns once the first is answered, so the second runs.
async fn keep_lookups_busy(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for seed in 0..2 {
        let m = largest_manifest(&format!("slow{seed}.bin"), seed);
        appliance_sync::wire::write_frame(&mut send, &Message::Upload(m))
            .await
            .unwrap();
    }
    expect_quota_refusal(&mut recv).await;
    (send, recv)
}

async fn expect_quota_refusal(recv: &mut quinn::RecvStream) {
    let refused = answer(recv).await;
    assert!(
        matches!(
            refused,
            Some(Message::Error {
                error: WireError::QuotaExceeded { .. },
                ..
            })
        ),
        "expected a quota refusal, got {}",
        answered(refused.as_ref())
    );
}

fn answered(answer: Option<&Message>) -> String {
    answer.map_or_else(
        || "no answer: the server ended the stream".to_owned(),
        |m| format!("{m:?}"),
    )
}

fn small_upload(name: &str, len: usize, seed: u64) -> (Vec<u8>, Manifest) {
    let data = random_bytes(len, seed);
    let manifest = digest_bytes(&data)
        .unwrap()
        .to_manifest(&RelPath::parse(name).unwrap(), Mtime { secs: 5, nanos: 0 });
    (data, manifest)
}

/// A server whose streams are dropped after `idle` without traffic, and a
/// raw connection of client "ines" (with `quota`) to it.
async fn idle_limited_server(idle: Duration, quota: Option<u64>) -> (Fixture, quinn::Connection) {
    let fx = Fixture::start_configured(|c| c.stream_idle = idle).await;
    let bundle = fx.enroll("ines", quota);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    (fx, conn)
}

/// Opens a stream of its own and sends the `Upload` of a [`small_upload`]
/// on it; returns the stream.
async fn send_small_upload(
    conn: &quinn::Connection,
    name: &str,
    len: usize,
    seed: u64,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let (_, manifest) = small_upload(name, len, seed);
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
        .await
        .unwrap();
    (send, recv)
}

async fn close_and_stop(conn: quinn::Connection, mut fx: Fixture) {
    conn.close(quinn::VarInt::from_u32(0), b"done");
    fx.stop().await;
}

/// `Upload` frames waiting for the connection's lookup queue are answered
/// however long the queue takes: the server makes the client wait, so the
/// wait does not count against the stream's idle limit. Their streams were
/// dropped after `stream_idle` without any answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_waiting_for_the_lookup_queue_are_answered_past_the_stream_idle_limit() {
    let idle = Duration::from_millis(200);
    let (fx, conn) = idle_limited_server(idle, Some(1 << 20)).await;
    // The second slow upload waits for the first's lookup, its stream
    // silent since it was sent.
    let (_slow_send, mut slow_recv) = keep_lookups_busy(&conn).await;
    // One more waits behind the second's lookup on a stream of its own.
    let (_send, mut recv) = send_small_upload(&conn, "queued.bin", 300_000, 1).await;
    let sent = std::time::Instant::now();
    expect_quota_refusal(&mut slow_recv).await;
    let got = answer(&mut recv).await;
    let waited = sent.elapsed();
    eprintln!("the queued upload was answered after {waited:?}");
    assert!(
        matches!(got, Some(Message::NeedChunks(_))),
        "after {waited:?} waiting for the lookup queue: {}",
        answered(got.as_ref())
    );
    assert!(
        waited > idle,
        "the queue was not busy long enough: {waited:?}"
    );
    close_and_stop(conn, fx).await;
}

/// Sends `upload`'s chunks slower than `idle`, each on a new stream of its
/// own (`per_chunk`) or all on one, and returns the upload's answer on its
/// control stream, which carries nothing meanwhile.
async fn paced_upload(
    conn: &quinn::Connection,
    idle: Duration,
    per_chunk: bool,
) -> (Option<Message>, Hash) {
    let data = random_bytes(3 << 20, 8);
    let digest = digest_bytes(&data).unwrap();
    assert!(digest.chunks.len() >= 3, "{}", digest.chunks.len());
    let manifest = digest.to_manifest(
        &RelPath::parse("long.bin").unwrap(),
        Mtime { secs: 5, nanos: 0 },
    );
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
        .await
        .unwrap();
    let Some(Message::NeedChunks(need)) = answer(&mut recv).await else {
        panic!("no NeedChunks")
    };
    let mut shared = None;
    for c in &digest.chunks {
        tokio::time::sleep(idle * 2).await;
        let start = usize::try_from(c.offset).unwrap();
        let chunk = Message::Chunk {
            upload: need.upload,
            hash: c.hash,
            data: data[start..start + c.len as usize].to_vec(),
        };
        if per_chunk {
            let mut own = conn.open_uni().await.unwrap();
            appliance_sync::wire::write_frame(&mut own, &chunk)
                .await
                .unwrap();
            own.finish().unwrap();
        } else {
            let stream = match &mut shared {
                Some(s) => s,
                None => shared.insert(conn.open_uni().await.unwrap()),
            };
            appliance_sync::wire::write_frame(stream, &chunk)
                .await
                .expect("the server stopped reading the chunk stream");
        }
    }
    let done = answer(&mut recv).await;
    if let Some(mut s) = shared {
        s.finish().unwrap();
    }
    (done, digest.file_hash)
}

#[track_caller]
fn assert_committed(done: Option<&Message>, file_hash: Hash) {
    assert!(
        matches!(done, Some(Message::Committed(c)) if c.file_hash == file_hash),
        "expected Committed, got {}",
        answered(done)
    );
}

/// While an upload runs with its chunks on other streams, its control
/// stream carries nothing: the client waits for the server, it is not
/// idle. The upload was cancelled ("upload stream closed by the client")
/// once its control stream had been silent for `stream_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_upload_outlives_its_silent_control_stream() {
    let idle = Duration::from_millis(300);
    let (fx, conn) = idle_limited_server(idle, None).await;
    let (done, file_hash) = paced_upload(&conn, idle, true).await;
    assert_committed(done.as_ref(), file_hash);
    close_and_stop(conn, fx).await;
}

/// A stream that carries a running upload's chunks may pause between them
/// (the client's chunk senders wait for the next chunk, a re-request, or
/// the commit); the upload's own idle limit watches that. The server
/// stopped the stream after `stream_idle`, failing the next chunk's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_stream_may_pause_between_chunks_of_a_running_upload() {
    let idle = Duration::from_millis(300);
    let (fx, conn) = idle_limited_server(idle, None).await;
    let (done, file_hash) = paced_upload(&conn, idle, false).await;
    assert_committed(done.as_ref(), file_hash);
    close_and_stop(conn, fx).await;
}

/// A stream that stalls in the middle of a frame is still dropped after
/// `stream_idle`, even while its `Upload` waits for the lookup queue; that
/// upload is answered with a typed `IdleTimeout` and holds nothing (its
/// quota is free for the next upload). It ended without any answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stalled_mid_frame_answers_its_waiting_upload() {
    let (fx, conn) = idle_limited_server(Duration::from_millis(100), Some(1 << 20)).await;
    let (_slow_send, mut slow_recv) = keep_lookups_busy(&conn).await;
    let (mut send, mut recv) = send_small_upload(&conn, "stalled.bin", 900_000, 2).await;
    // Two bytes of the next frame's header, then nothing.
    send.write_all(&[0, 0]).await.unwrap();
    let got = answer(&mut recv).await;
    assert!(
        matches!(
            got,
            Some(Message::Error {
                upload: None,
                error: WireError::IdleTimeout
            })
        ),
        "expected IdleTimeout, got {}",
        answered(got.as_ref())
    );
    assert_eq!(answer(&mut recv).await, None);
    expect_quota_refusal(&mut slow_recv).await;
    // 1 MB fits the 1 MiB quota only if the dropped upload holds none of it.
    let (_send, mut recv) = send_small_upload(&conn, "after.bin", 1_000_000, 3).await;
    let got = answer(&mut recv).await;
    assert!(
        matches!(got, Some(Message::NeedChunks(_))),
        "the dropped upload still holds the quota: {}",
        answered(got.as_ref())
    );
    close_and_stop(conn, fx).await;
}

/// A running upload whose control stream stalls in the middle of a frame
/// ends with a typed `IdleTimeout` told to the client, and gives its
/// reservation back. It ended silently, as if the client had reset it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_stream_stalls_mid_frame_is_told_why_it_ends() {
    let (fx, conn) = idle_limited_server(Duration::from_millis(300), Some(1 << 20)).await;
    let (mut send, mut recv) = send_small_upload(&conn, "stalled.bin", 900_000, 2).await;
    let Some(Message::NeedChunks(need)) = answer(&mut recv).await else {
        panic!("no NeedChunks")
    };
    // Two bytes of a chunk frame's header, then nothing.
    send.write_all(&[0, 0]).await.unwrap();
    let got = answer(&mut recv).await;
    assert_eq!(
        got,
        Some(Message::Error {
            upload: Some(need.upload),
            error: WireError::IdleTimeout
        }),
        "{}",
        answered(got.as_ref())
    );
    assert_eq!(answer(&mut recv).await, None);
    // 1 MB fits the 1 MiB quota only if the ended upload holds none of it.
    let (_send, mut recv) = send_small_upload(&conn, "after.bin", 1_000_000, 3).await;
    let got = answer(&mut recv).await;
    assert!(
        matches!(got, Some(Message::NeedChunks(_))),
        "the ended upload still holds the quota: {}",
        answered(got.as_ref())
    );
    close_and_stop(conn, fx).await;
}

fn foreign_bundle(fx: &Fixture, cert_pem: String, key_pem: String) -> Bundle {
    Bundle {
        version: BUNDLE_VERSION,
        client: ClientName::parse("mallory").unwrap(),
        server: Some(fx.addr.to_string()),
        server_name: SERVER_NAME.into(),
        ca_pem: fx.authority.ca_pem().to_owned(),
        cert_pem,
        key_pem,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_self_signed_and_revoked_clients_are_refused() {
    let mut fx = Fixture::start().await;

    // Unknown: a certificate from another appliance's CA.
    let other_dir = fx.path().join("other");
    let other = appliance_sync::identity::Authority::open(&other_dir.join("id")).unwrap();
    let stranger = other_dir.join("mallory.bundle");
    other
        .enroll(&ClientName::parse("mallory").unwrap(), None, &stranger)
        .unwrap();
    let stranger = Bundle::load(&stranger).unwrap();
    let unknown = foreign_bundle(&fx, stranger.cert_pem.clone(), stranger.key_pem.clone());
    // (Both CAs carry the same name, so WebPKI finds "our" CA as issuer and
    // then fails the signature: refused in the handshake either way.)
    let err = raw_connect_bundle(&unknown, fx.addr).await.unwrap_err();
    assert!(
        err.contains("handshake failed") && err.contains("certificate"),
        "{err}"
    );

    // Self-signed, with our client's name.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["alice".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    let self_signed = foreign_bundle(&fx, cert.pem(), key.serialize_pem());
    let err = raw_connect_bundle(&self_signed, fx.addr).await.unwrap_err();
    assert!(
        err.contains("handshake failed") && err.contains("certificate"),
        "{err}"
    );

    // Revoked: works before, refused after, and a live connection is closed.
    let bundle = fx.enroll("carol", None);
    let live = fx.connect(&bundle).await;
    live.status().await.unwrap();
    fx.authority
        .revoke(&ClientName::parse("carol").unwrap())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = live.status().await.unwrap_err();
    assert!(matches!(err, ClientError::Connection(_)), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    let err = raw_connect(&bundle, fx.addr).await.unwrap_err();
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    assert_eq!(
        fx.server
            .as_ref()
            .unwrap()
            .connections_of(&ClientName::parse("carol").unwrap()),
        0
    );

    // None of the refused identities ever reached storage.
    assert!(!fx.client_root("mallory").exists());
    assert!(!fx.client_root("alice").exists());
    let events = fx.events.events();
    assert!(!events
        .iter()
        .any(|e| e.client().as_str() == "mallory" || e.client().as_str() == "alice"));
    fx.stop().await;
}

fn manifest_with_path(path: &str) -> Message {
    Message::Upload(Manifest {
        path: path.to_owned(),
        size: 1,
        mtime: Mtime { secs: 0, nanos: 0 },
        file_hash: Hash::of(b"x"),
        chunks: vec![ChunkRef {
            offset: 0,
            len: 1,
            hash: Hash::of(b"x"),
        }],
    })
}

fn rejection(replies: &[Message]) -> Option<PathRejection> {
    replies.iter().find_map(|m| match m {
        Message::Error {
            error: WireError::PathRejected { reason },
            ..
        } => Some(reason.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_without_touching_the_filesystem() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("eve", None);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    let root = fx.client_root("eve");
    let outside = fx.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"keep out").unwrap();

    let hostile = [
        "/etc/passwd",
        "../../etc/shadow",
        "a/../../b",
        "a\0b",
        "line\nbreak",
        "esc\u{1b}[2J",
        "a//b",
        "trailing/",
        ".",
        "..\\..\\x",
        ".appliance-staging/x",
        ".appliance-meta/chunks/aa/x",
        ".zfs/snapshot/x",
        "doc.pdf.~3~",
        "invoice\u{202e}fdp.exe",
    ];
    let long_component = "c".repeat(201);
    let long_path = vec!["d".repeat(100); 11].join("/");
    let deep = vec!["d"; 65].join("/");
    for path in hostile.iter().map(|s| (*s).to_owned()).chain([
        long_component,
        long_path,
        deep,
        String::new(),
    ]) {
        for message in [
            manifest_with_path(&path),
            Message::Download { path: path.clone() },
            Message::Delete { path: path.clone() },
            Message::List {
                dir: path.clone(),
                after: None,
            },
        ] {
            if path.is_empty() && matches!(message, Message::List { .. }) {
                continue; // "" is the root for a listing
            }
            let replies = exchange(&conn, &message, 4).await;
            assert!(
                rejection(&replies).is_some(),
                "{path:?} in {:?} was not rejected: {replies:?}",
                message.kind()
            );
        }
    }
    assert!(visible_files(&root).is_empty());

    // Symlink tricks: a directory symlink and a file symlink out of the root.
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).unwrap();
    let replies = exchange(
        &conn,
        &Message::Download {
            path: "link".into(),
        },
        4,
    )
    .await;
    assert!(
        matches!(&replies[..], [Message::Error { error: WireError::Storage { detail }, .. }] if detail.contains("symlink")),
        "{replies:?}"
    );
    let replies = exchange(
        &conn,
        &Message::Download {
            path: "escape/secret".into(),
        },
        4,
    )
    .await;
    assert!(
        matches!(&replies[..], [Message::Error { .. }]),
        "{replies:?}"
    );
    let replies = exchange(
        &conn,
        &Message::Delete {
            path: "link".into(),
        },
        4,
    )
    .await;
    assert!(
        matches!(&replies[..], [Message::Error { .. }]),
        "{replies:?}"
    );
    let digest = digest_bytes(b"payload").unwrap();
    let upload = digest.to_manifest(
        &RelPath::parse("escape/new").unwrap(),
        Mtime { secs: 0, nanos: 0 },
    );
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(upload))
        .await
        .unwrap();
    let need = appliance_sync::wire::read_frame(&mut recv, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        .0;
    let Message::NeedChunks(need) = need else {
        panic!("{need:?}")
    };
    appliance_sync::wire::write_frame(
        &mut send,
        &Message::Chunk {
            upload: need.upload,
            hash: digest.chunks[0].hash,
            data: b"payload".to_vec(),
        },
    )
    .await
    .unwrap();
    let reply = appliance_sync::wire::read_frame(&mut recv, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert!(
        matches!(&reply, Message::Error { error: WireError::Storage { detail }, .. } if detail.contains("symlink")),
        "{reply:?}"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"keep out");

    // A manifest with an absurd chunk count.
    let chunk = ChunkRef {
        offset: 0,
        len: 1,
        hash: Hash::of(b"x"),
    };
    let absurd = Message::Upload(Manifest {
        path: "absurd".into(),
        size: u64::from(MAX_CHUNKS_PER_MANIFEST) + 1,
        mtime: Mtime { secs: 0, nanos: 0 },
        file_hash: Hash::of(b"x"),
        chunks: (0..=u64::from(MAX_CHUNKS_PER_MANIFEST))
            .map(|i| ChunkRef { offset: i, ..chunk })
            .collect(),
    });
    let replies = exchange(&conn, &absurd, 2).await;
    assert!(
        matches!(
            &replies[..],
            [Message::Error {
                error: WireError::ManifestTooLarge { .. },
                ..
            }]
        ),
        "{replies:?}"
    );

    // An oversized frame: refused from its header, and the connection closed.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut header = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    header.push(1);
    send.write_all(&header).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert!(closed.to_string().contains("exceeds"), "{closed}");
    assert!(visible_files(&root)
        .iter()
        .all(|p| p.ends_with("escape") || p.ends_with("link")));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunk_is_rejected_and_re_requested() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("dave", None);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    let data = random_bytes(3 << 20, 7);
    let digest = digest_bytes(&data).unwrap();
    let manifest = digest.to_manifest(
        &RelPath::parse("c.bin").unwrap(),
        Mtime { secs: 5, nanos: 0 },
    );
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    appliance_sync::wire::write_frame(&mut send, &Message::Upload(manifest))
        .await
        .unwrap();
    let Message::NeedChunks(need) = read_one(&mut recv).await else {
        panic!()
    };
    assert_eq!(need.hashes.len(), digest.chunks.len());
    let first = digest.chunks[0];
    let slice =
        |c: &ChunkRef| data[c.offset as usize..(c.offset + u64::from(c.len)) as usize].to_vec();
    let mut corrupt = slice(&first);
    corrupt[100] ^= 1;
    appliance_sync::wire::write_frame(
        &mut send,
        &Message::Chunk {
            upload: need.upload,
            hash: first.hash,
            data: corrupt,
        },
    )
    .await
    .unwrap();
    let rejected = read_one(&mut recv).await;
    assert!(
        matches!(rejected, Message::Error { error: WireError::ChunkHashMismatch { expected, .. }, .. } if expected == first.hash),
        "{rejected:?}"
    );
    let again = read_one(&mut recv).await;
    assert!(
        matches!(&again, Message::NeedChunks(n) if n.hashes == vec![first.hash]),
        "{again:?}"
    );
    // Nothing of the corrupt chunk was stored.
    assert_eq!(stored_chunks(&fx.client_root("dave")), 0);
    for c in &digest.chunks {
        appliance_sync::wire::write_frame(
            &mut send,
            &Message::Chunk {
                upload: need.upload,
                hash: c.hash,
                data: slice(c),
            },
        )
        .await
        .unwrap();
    }
    let done = read_one(&mut recv).await;
    assert!(
        matches!(&done, Message::Committed(c) if c.file_hash == digest.file_hash),
        "{done:?}"
    );
    let stored = std::fs::read(fx.client_root("dave").join("c.bin")).unwrap();
    assert_eq!(Hash::of(&stored), Hash::of(&data));
    fx.stop().await;
}

async fn read_one(recv: &mut quinn::RecvStream) -> Message {
    appliance_sync::wire::read_frame(recv, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        .0
}

/// Admission that refuses everything while `closed` holds a reason (as the
/// daemon's storage gate does while the pool is suspended).
#[derive(Debug)]
struct Gate {
    closed: parking_lot::Mutex<Option<String>>,
    inner: Arc<dyn appliance_sync::admission::Admission>,
}

impl appliance_sync::admission::Admission for Gate {
    fn admit(
        &self,
        client: &ClientName,
        bytes: u64,
        others: u64,
    ) -> Result<(), appliance_sync::admission::Refused> {
        self.writable(client)?;
        self.inner.admit(client, bytes, others)
    }

    fn writable(&self, _client: &ClientName) -> Result<(), appliance_sync::admission::Refused> {
        match self.closed.lock().clone() {
            Some(detail) => Err(appliance_sync::admission::Refused::Unavailable { detail }),
            None => Ok(()),
        }
    }

    fn space(&self, client: &ClientName) -> appliance_sync::admission::Space {
        self.inner.space(client)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_unavailable_refuses_uploads_with_the_reason_and_writes_nothing() {
    let gate = Arc::new(std::sync::OnceLock::<Arc<Gate>>::new());
    let g = gate.clone();
    let mut fx = Fixture::start_with(move |inner| {
        let gate = Arc::new(Gate {
            closed: parking_lot::Mutex::new(Some("pool tank is SUSPENDED".into())),
            inner,
        });
        let _ = g.set(gate.clone());
        gate
    })
    .await;
    let set = |reason: Option<&str>| *gate.get().unwrap().closed.lock() = reason.map(Into::into);
    let bundle = fx.enroll("carol", None);
    let file = fx.path().join("report.pdf");
    std::fs::write(&file, random_bytes(300_000, 9)).unwrap();
    let root = fx.client_root("carol");

    // Closed when the client connects: the connection is closed with the
    // reason before the client's store is even opened.
    let err = fx.try_connect(&bundle).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("storage unavailable: pool tank is SUSPENDED"),
        "{text}"
    );
    assert!(!root.exists(), "the client's store was opened");

    // Open: the same push goes through.
    set(None);
    let client = fx.connect(&bundle).await;
    client
        .push(std::slice::from_ref(&file), None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(visible_files(&root).len(), 1);

    // Closed while connected: the next upload is refused with the reason,
    // and nothing of it is written.
    set(Some("pool tank is SUSPENDED"));
    let other = fx.path().join("other.pdf");
    std::fs::write(&other, random_bytes(200_000, 10)).unwrap();
    let chunks_before = stored_chunks(&root);
    let err = client
        .push(&[other], None, Arc::new(NoProgress))
        .await
        .unwrap_err();
    match err.wire_error() {
        Some(WireError::Storage { detail }) => {
            assert_eq!(detail, "storage unavailable: pool tank is SUSPENDED");
        }
        other => panic!("expected a storage refusal, got {other:?} ({err})"),
    }
    assert_eq!(visible_files(&root).len(), 1);
    assert_eq!(stored_chunks(&root), chunks_before);
    client.close().await;
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_finishes_its_frame_is_dropped_and_the_connection_goes_on() {
    let mut fx = Fixture::start_configured(|c| c.stream_idle = Duration::from_millis(300)).await;
    let bundle = fx.enroll("dave", None);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    // Two bytes of a four-byte frame header, then nothing: the server stops
    // reading the stream after `stream_idle` (default 120 s).
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), send.stopped())
        .await
        .expect("the server kept waiting on a stalled stream");
    assert!(stopped.is_ok(), "{stopped:?}");
    // The connection itself is fine: a request on a new stream is answered.
    let replies = exchange(&conn, &Message::Status, 1).await;
    assert!(
        matches!(replies.first(), Some(Message::StatusReply(_))),
        "{replies:?}"
    );
    conn.close(0u32.into(), b"done");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_client_limit_are_refused() {
    let mut fx = Fixture::start_configured(|c| c.max_connections_per_client = 2).await;
    let bundle = fx.enroll("erin", None);
    let first = raw_connect(&bundle, fx.addr).await.unwrap();
    let second = raw_connect(&bundle, fx.addr).await.unwrap();
    let third = raw_connect(&bundle, fx.addr).await;
    let err = third.expect_err("a third connection was accepted");
    assert!(err.contains("too many connections"), "{err}");
    // Another client has its own allowance.
    let other = fx.enroll("frank", None);
    let theirs = raw_connect(&other, fx.addr).await.unwrap();
    // One closes: a new one fits again.
    first.close(0u32.into(), b"bye");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match raw_connect(&bundle, fx.addr).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.contains("too many connections"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no room after a connection closed: {e}"),
        }
    };
    for c in [second, theirs, again] {
        c.close(0u32.into(), b"done");
    }
    fx.stop().await;
}

/// Protocol version 2: a connection may hold 32 uploads open at once (8 in
/// version 1); the 33rd is refused with `TooManyUploads`, nothing is
/// closed. Then the client library, which negotiates version 2, pushes more
/// small files than version 1's limit in one push, and every one lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_holds_32_uploads_open_and_pushes_many_small_files() {
    use appliance_sync::wire::{read_frame, write_frame};
    use appliance_sync_proto::limits::MAX_UPLOADS_PER_CONNECTION_V2;

    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("carol", None);
    let conn = raw_connect(&bundle, fx.addr).await.unwrap();
    let mut open = Vec::new();
    for i in 0..=MAX_UPLOADS_PER_CONNECTION_V2 {
        let bytes = random_bytes(1000, 900 + u64::from(i));
        let manifest = digest_bytes(&bytes).unwrap().to_manifest(
            &RelPath::parse(&format!("open/{i}")).unwrap(),
            Mtime { secs: 0, nanos: 0 },
        );
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &Message::Upload(manifest))
            .await
            .unwrap();
        let reply = read_frame(&mut recv, Duration::from_secs(20))
            .await
            .unwrap()
            .map(|(m, _)| m);
        if i < MAX_UPLOADS_PER_CONNECTION_V2 {
            assert!(
                matches!(reply, Some(Message::NeedChunks(_))),
                "upload {i}: {reply:?}"
            );
        } else {
            assert!(
                matches!(
                    reply,
                    Some(Message::Error {
                        error: WireError::TooManyUploads { max: 32 },
                        ..
                    })
                ),
                "upload {i}: {reply:?}"
            );
        }
        // The control streams stay open: the uploads stay open.
        open.push((send, recv));
    }
    assert!(conn.close_reason().is_none());
    drop(open);
    conn.close(0u32.into(), b"done");

    let client = fx.connect(&bundle).await;
    assert_eq!(client.protocol_version(), 2);
    let src = fx.path().join("many");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<Vec<u8>> = (0..100).map(|i| random_bytes(32 << 10, 1000 + i)).collect();
    for (i, bytes) in files.iter().enumerate() {
        std::fs::write(src.join(format!("f{i:03}")), bytes).unwrap();
    }
    let reports = client
        .push(std::slice::from_ref(&src), None, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(reports.len(), files.len());
    let root = fx.client_root("carol");
    for (i, bytes) in files.iter().enumerate() {
        let stored = std::fs::read(root.join(format!("many/f{i:03}"))).unwrap();
        assert_eq!(Hash::of(&stored), Hash::of(bytes), "f{i:03}");
    }
    assert!(staging_names(&root).is_empty());
    client.close().await;
    fx.stop().await;
}

/// A push of a directory holding an entry the appliance cannot store (an
/// Emacs backup `notes.txt.~1~`, whose name is reserved for versions; a
/// socket) and a file over the quota: the CLI pushes everything else,
/// warns about each on stderr, reports every file's outcome with
/// `--json`, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_push_reports_every_file_and_skips_unstorable_entries() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("kim", Some(1 << 20));
    let docs = fx.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), b"first").unwrap();
    std::fs::write(docs.join("big.bin"), random_bytes(2 << 20, 9)).unwrap();
    std::fs::write(docs.join("notes.txt"), b"today").unwrap();
    std::fs::write(docs.join("notes.txt.~1~"), b"yesterday").unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(docs.join("sock")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("appliance-sync");
    let run = |args: Vec<std::ffi::OsString>| {
        let (bin, bundle, addr) = (bin.clone(), bundle.clone(), fx.addr.to_string());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .arg("--identity")
                .arg(&bundle)
                .arg("--server")
                .arg(addr)
                .args(args)
                .env("HOME", "/nonexistent")
                .output()
                .unwrap()
        })
    };
    let out = run(vec!["--json".into(), "push".into(), docs.clone().into()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let status = |name: &str| {
        value["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["local"].as_str().unwrap().ends_with(name))
            .map(|f| f["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status("/a.txt").as_deref(), Some("committed"), "{stdout}");
    assert_eq!(status("/notes.txt").as_deref(), Some("committed"));
    assert_eq!(status("/big.bin").as_deref(), Some("failed"));
    assert_eq!(status("/notes.txt.~1~").as_deref(), Some("skipped"));
    assert_eq!(status("/sock").as_deref(), Some("skipped"));
    assert_eq!(value["files"].as_array().unwrap().len(), 5);
    assert_eq!(
        (value["failed"].as_u64(), value["skipped"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        value["files"][1]["error"]
            .as_str()
            .unwrap()
            .contains("quota exceeded"),
        "{stdout}"
    );
    assert!(
        stderr.contains("skipped") && stderr.contains("notes.txt.~1~"),
        "{stderr}"
    );
    assert!(stderr.contains("socket"), "{stderr}");
    // Pushing the same files again: nothing needs sending.
    let out = run(vec![
        "--json".into(),
        "push".into(),
        docs.join("a.txt").into(),
        docs.join("notes.txt").into(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(value["files"][0]["status"], "deduplicated", "{stdout}");
    let mut stored: Vec<String> = visible_files(&fx.client_root("kim"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    fx.stop().await;
    // docs/a.txt and docs/notes.txt, then a.txt and notes.txt at the root.
    assert_eq!(stored, ["a.txt", "a.txt", "notes.txt", "notes.txt"]);
}

/// The library's `push` tries every file too: one unstorable entry in a
/// directory does not stop the others, and the error names it at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_of_a_directory_pushes_the_rest_past_an_unstorable_entry() {
    let mut fx = Fixture::start().await;
    let bundle = fx.enroll("lou", None);
    let client = fx.connect(&bundle).await;
    let docs = fx.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("notes.txt"), b"today").unwrap();
    std::fs::write(docs.join("notes.txt.~1~"), b"yesterday").unwrap();
    let result = client.push(&[docs], None, Arc::new(NoProgress)).await;
    let stored = visible_files(&fx.client_root("lou"));
    client.close().await;
    fx.stop().await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ClientError::LocalPath { path, .. } if path.ends_with("notes.txt.~1~")),
        "{err}"
    );
    assert_eq!(stored.len(), 1, "{stored:?}");
}
