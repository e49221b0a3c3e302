//! Client and server upload machines driven against each other in memory,
//! every message passing through the real frame encoder and decoder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use appliance_sync_proto::limits::{
    IDLE_TIMEOUT, MAX_CHUNKS_PER_MANIFEST, MAX_CHUNK_RETRIES, MAX_FRAME_LEN,
};
use appliance_sync_proto::*;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// In-memory chunk store, document tree and quota: the one fake the tests share.
#[derive(Default)]
struct Store {
    chunks: HashMap<Hash, Vec<u8>>,
    files: HashMap<String, Vec<u8>>,
    /// Bytes the client may still add; `None` = unlimited.
    available: Option<u64>,
    /// Make every chunk write fail with this.
    write_failure: Option<StorageFailure>,
    admissions: Vec<(u64, u64)>,
}

impl ChunkIndex for Store {
    fn has_chunk(&self, hash: &Hash) -> bool {
        self.chunks.contains_key(hash)
    }
}

impl Admission for Store {
    fn admit(&mut self, request: &AdmissionRequest<'_>) -> Result<(), Refusal> {
        self.admissions
            .push((request.file_size, request.missing_bytes));
        match self.available {
            Some(available) if request.file_size > available => Err(Refusal::QuotaExceeded {
                needed: request.file_size,
                available,
            }),
            _ => Ok(()),
        }
    }
}

impl Store {
    fn assemble(&self, request: &AssembleRequest) -> Result<Vec<u8>, AssembleFailure> {
        let mut file = Vec::with_capacity(usize::try_from(request.manifest.size).unwrap());
        for chunk in &request.manifest.chunks {
            let data = self.chunks.get(&chunk.hash).ok_or(StorageFailure::Io {
                detail: format!("chunk {} missing", chunk.hash),
            })?;
            file.extend_from_slice(data);
        }
        let actual = Hash::of(&file);
        if actual != request.manifest.file_hash {
            return Err(AssembleFailure::FileHashMismatch { actual });
        }
        Ok(file)
    }
}

/// Sends a message over the "wire": encode, split into odd pieces, decode.
fn wire(message: Message) -> Message {
    let frame = encode(&message).unwrap();
    let out = unwire(&frame);
    assert_eq!(out, message);
    drop(message);
    out
}

#[derive(Default)]
struct Options {
    /// Tamper with the n-th chunk frame sent (0-based), by flipping a byte.
    corrupt_frames: Vec<usize>,
    /// Stop everything (client killed) after this many chunk frames arrived.
    kill_after_chunks: Option<usize>,
    /// Replace the manifest before sending (hostile client).
    tamper_manifest: Option<fn(&mut Manifest)>,
    /// Send requested chunks in reverse order (as parallel streams may).
    reverse: bool,
    /// Build chunk frames as the QUIC client does: `chunk_frame_prefix`
    /// followed by the bytes read from the file, not re-hashed.
    prefix_frames: bool,
}

/// Decodes one frame given as bytes (split into odd pieces).
fn unwire(frame: &[u8]) -> Message {
    let mut decoder = FrameDecoder::new();
    let mut out = None;
    for piece in frame.chunks(4093) {
        let mut input = piece;
        if let Some(m) = decoder.decode(&mut input).unwrap() {
            assert!(out.is_none());
            out = Some(m);
        }
    }
    decoder.finish().unwrap();
    out.unwrap()
}

#[derive(Debug, Default)]
struct Run {
    committed: Option<Committed>,
    client_error: Option<ClientError>,
    outcome: Option<UploadOutcome>,
    stats: UploadStats,
    chunk_frames_delivered: usize,
    server_errors: Vec<WireError>,
}

fn manifest_for(path: &str, data: &[u8]) -> Manifest {
    let digest = digest_bytes(data).unwrap();
    digest.to_manifest(
        &RelPath::parse(path).unwrap(),
        Mtime {
            secs: 1_700_000_000,
            nanos: 0,
        },
    )
}

fn push(store: &mut Store, path: &str, data: &[u8], options: &Options) -> Run {
    let now = Instant::now();
    let mut manifest = manifest_for(path, data);
    if let Some(tamper) = options.tamper_manifest {
        tamper(&mut manifest);
    }
    let mut run = Run::default();
    // A hostile manifest is refused by the honest client machine; send it raw.
    let (mut client, upload_message) = match ClientUpload::new(manifest.clone(), now) {
        Ok(pair) => (Some(pair.0), pair.1),
        Err(_) => (None, Message::Upload(manifest)),
    };
    let Message::Upload(manifest) = wire(upload_message) else {
        panic!("not an upload")
    };
    let (mut server, actions) = ServerUpload::start(UploadId(1), manifest, now, store);
    let mut to_client: VecDeque<Message> = VecDeque::new();
    let mut to_server: VecDeque<Message> = VecDeque::new();
    let mut chunk_frames_sent = 0usize;
    let mut server_actions: VecDeque<ServerAction> = actions.into();

    loop {
        while let Some(action) = server_actions.pop_front() {
            match action {
                ServerAction::Reply(m) => {
                    if let Message::Error { error, .. } = &m {
                        run.server_errors.push(error.clone());
                    }
                    to_client.push_back(wire(m));
                }
                ServerAction::WriteChunk { hash, data } => {
                    assert_eq!(Hash::of(&data), hash, "server wrote an unverified chunk");
                    let more = match &store.write_failure {
                        Some(f) => server.chunk_write_failed(hash, f.clone()),
                        None => {
                            store.chunks.insert(hash, data);
                            server.chunk_written(hash, now)
                        }
                    };
                    server_actions.extend(more);
                }
                ServerAction::Assemble(request) => {
                    let result = store.assemble(&request).map(|file| {
                        store
                            .files
                            .insert(request.manifest.path.as_str().to_owned(), file);
                    });
                    server_actions.extend(server.assembled(result));
                }
                ServerAction::Finished(outcome) => {
                    assert!(run.outcome.is_none());
                    run.outcome = Some(outcome);
                }
            }
        }
        if let Some(limit) = options.kill_after_chunks {
            if run.chunk_frames_delivered >= limit {
                break;
            }
        }
        if let Some(m) = to_server.pop_front() {
            let Message::Chunk { upload, hash, data } = m else {
                panic!("only chunks go to the server here")
            };
            assert_eq!(upload, UploadId(1));
            run.chunk_frames_delivered += 1;
            server_actions.extend(server.handle_chunk(hash, data, now));
            continue;
        }
        let Some(m) = to_client.pop_front() else {
            break;
        };
        let Some(client) = client.as_mut() else {
            // No honest client: just record what the server said.
            continue;
        };
        let mut actions = client.handle(m, now);
        if options.reverse {
            actions.reverse();
        }
        for action in actions {
            match action {
                ClientAction::SendChunk { chunk, .. } => {
                    let start = usize::try_from(chunk.offset).unwrap();
                    let mut bytes = data[start..start + chunk.len as usize].to_vec();
                    let corrupt = options.corrupt_frames.contains(&chunk_frames_sent);
                    chunk_frames_sent += 1;
                    if options.prefix_frames {
                        // The file "changed" after its manifest: the client
                        // sends what it read, the server must refuse it.
                        if corrupt {
                            bytes[0] ^= 0x55;
                        }
                        let mut frame = client.chunk_frame_prefix(&chunk).unwrap();
                        frame.extend_from_slice(&bytes);
                        to_server.push_back(unwire(&frame));
                        continue;
                    }
                    let mut frame = client.chunk_message(&chunk, bytes).unwrap();
                    if corrupt {
                        if let Message::Chunk { data, .. } = &mut frame {
                            data[0] ^= 0x55;
                        }
                    }
                    to_server.push_back(wire(frame));
                }
                ClientAction::ChunkRejected { .. } => {}
                ClientAction::Committed(ack) => run.committed = Some(ack),
                ClientAction::Failed(e) => run.client_error = Some(e),
            }
        }
    }
    if let Some(client) = &client {
        run.stats = client.stats();
    }
    run
}

fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn fresh_upload_commits_the_exact_file() {
    let data = sample(6 << 20, 1);
    let mut store = Store::default();
    let run = push(&mut store, "docs/scan.pdf", &data, &Options::default());
    let ack = run.committed.expect("committed");
    assert_eq!(ack.size, data.len() as u64);
    assert_eq!(ack.file_hash, Hash::of(&data));
    assert_eq!(ack.bytes_received, data.len() as u64);
    assert_eq!(store.files["docs/scan.pdf"], data);
    assert_eq!(run.stats.bytes_sent, data.len() as u64);
    assert!(matches!(
        run.outcome,
        Some(UploadOutcome::Committed { bytes_received, .. }) if bytes_received == data.len() as u64
    ));
    assert_eq!(
        store.admissions,
        vec![(data.len() as u64, data.len() as u64)]
    );
}

#[test]
fn second_push_of_the_same_file_sends_zero_chunks() {
    let data = sample(5 << 20, 2);
    let mut store = Store::default();
    push(&mut store, "a.bin", &data, &Options::default());
    let again = push(&mut store, "a.bin", &data, &Options::default());
    assert!(again.committed.is_some());
    assert_eq!(again.stats.chunks_sent, 0);
    assert_eq!(again.stats.bytes_sent, 0);
    assert_eq!(again.committed.unwrap().bytes_received, 0);
    // Same content under another name: also zero chunks.
    let copy = push(&mut store, "copy/a.bin", &data, &Options::default());
    assert_eq!(copy.stats.chunks_sent, 0);
    assert_eq!(store.files["copy/a.bin"], data);
}

#[test]
fn edited_file_resends_only_changed_chunks() {
    let data = sample(16 << 20, 3);
    let mut store = Store::default();
    let first = push(&mut store, "f", &data, &Options::default());
    let mut edited = data.clone();
    edited.splice(500..500, b"inserted".iter().copied());
    let second = push(&mut store, "f", &edited, &Options::default());
    assert!(second.committed.is_some());
    assert!(
        second.stats.chunks_sent <= 2,
        "{} of {} chunks resent",
        second.stats.chunks_sent,
        first.stats.chunks_sent
    );
    assert_eq!(store.files["f"], edited);
}

#[test]
fn interrupted_push_resumes_with_only_the_missing_chunks() {
    let data = sample(10 << 20, 4);
    let total = digest_bytes(&data).unwrap().chunks.len();
    assert!(total >= 6, "need several chunks, got {total}");
    let mut store = Store::default();
    let killed = push(
        &mut store,
        "big.iso",
        &data,
        &Options {
            kill_after_chunks: Some(3),
            ..Options::default()
        },
    );
    assert!(killed.committed.is_none());
    assert!(
        !store.files.contains_key("big.iso"),
        "nothing partial visible"
    );
    assert_eq!(store.chunks.len(), 3);

    let resumed = push(&mut store, "big.iso", &data, &Options::default());
    assert!(resumed.committed.is_some());
    assert_eq!(resumed.stats.chunks_requested as usize, total - 3);
    assert_eq!(resumed.stats.chunks_sent as usize, total - 3);
    assert_eq!(store.files["big.iso"], data);
}

#[test]
fn corrupted_chunk_is_rejected_and_re_requested() {
    let data = sample(4 << 20, 5);
    let mut store = Store::default();
    let run = push(
        &mut store,
        "c.pdf",
        &data,
        &Options {
            corrupt_frames: vec![1],
            reverse: true,
            ..Options::default()
        },
    );
    assert!(run.committed.is_some(), "{run:?}");
    assert_eq!(run.stats.chunks_rejected, 1);
    assert!(matches!(
        run.server_errors.as_slice(),
        [WireError::ChunkHashMismatch { .. }]
    ));
    // The corrupted chunk was sent twice.
    assert_eq!(run.stats.chunks_sent, run.stats.chunks_requested);
    assert_eq!(
        run.stats.chunks_sent as usize,
        digest_bytes(&data).unwrap().chunks.len() + 1
    );
    assert_eq!(store.files["c.pdf"], data);
    // No corrupted chunk reached the store.
    assert!(store.chunks.iter().all(|(h, d)| Hash::of(d) == *h));
}

/// Frames built from `chunk_frame_prefix` + file bytes (no client re-hash)
/// carry the same upload; bytes that no longer match the manifest (a file
/// changed during the push) are refused by the server, re-requested, and the
/// upload fails after the retry limit with nothing stored.
#[test]
fn prefix_frames_upload_and_changed_bytes_are_refused() {
    let data = sample(6 << 20, 11);
    let mut store = Store::default();
    let options = Options {
        prefix_frames: true,
        reverse: true,
        ..Options::default()
    };
    let run = push(&mut store, "p/scan.tiff", &data, &options);
    assert!(run.committed.is_some(), "{run:?}");
    assert_eq!(store.files["p/scan.tiff"], data);
    assert_eq!(run.stats.bytes_sent, data.len() as u64);

    let data = sample(100_000, 12);
    let mut store = Store::default();
    let attempts = MAX_CHUNK_RETRIES as usize + 1;
    let run = push(
        &mut store,
        "changed.pdf",
        &data,
        &Options {
            prefix_frames: true,
            corrupt_frames: (0..attempts).collect(),
            ..Options::default()
        },
    );
    assert_eq!(
        run.client_error,
        Some(ClientError::Server(WireError::TooManyChunkRetries {
            hash: Hash::of(&data)
        }))
    );
    assert_eq!(run.stats.chunks_rejected as usize, attempts - 1);
    assert!(store.files.is_empty() && store.chunks.is_empty());
}

#[test]
fn persistently_corrupted_chunk_fails_after_the_retry_limit() {
    let data = sample(100_000, 6);
    let mut store = Store::default();
    let attempts = MAX_CHUNK_RETRIES as usize + 1;
    let run = push(
        &mut store,
        "c.pdf",
        &data,
        &Options {
            corrupt_frames: (0..attempts).collect(),
            ..Options::default()
        },
    );
    let hash = Hash::of(&data);
    assert_eq!(
        run.client_error,
        Some(ClientError::Server(WireError::TooManyChunkRetries { hash }))
    );
    assert_eq!(run.chunk_frames_delivered, attempts);
    assert!(store.files.is_empty() && store.chunks.is_empty());
}

#[test]
fn quota_refusal_transfers_no_chunk() {
    let data = sample(3 << 20, 7);
    let mut store = Store {
        available: Some(1 << 20),
        ..Store::default()
    };
    let run = push(&mut store, "too-big.bin", &data, &Options::default());
    assert_eq!(
        run.client_error,
        Some(ClientError::Server(WireError::QuotaExceeded {
            needed: data.len() as u64,
            available: 1 << 20
        }))
    );
    assert_eq!(run.chunk_frames_delivered, 0);
    assert_eq!(run.stats.chunks_sent, 0);
    assert!(store.chunks.is_empty() && store.files.is_empty());
    assert!(matches!(
        run.outcome,
        Some(UploadOutcome::Failed {
            error: WireError::QuotaExceeded { .. }
        })
    ));
}

#[test]
fn hostile_paths_are_refused_before_anything_is_stored() {
    let hostile: [fn(&mut Manifest); 6] = [
        |m| m.path = "/etc/passwd".into(),
        |m| m.path = "../../outside".into(),
        |m| m.path = "a\0b".into(),
        |m| m.path = "a//b".into(),
        |m| m.path = ".appliance-staging/x".into(),
        |m| m.path = "x".repeat(5000),
    ];
    for tamper in hostile {
        let mut store = Store::default();
        let run = push(
            &mut store,
            "ok",
            b"data",
            &Options {
                tamper_manifest: Some(tamper),
                ..Options::default()
            },
        );
        assert!(
            matches!(
                run.outcome,
                Some(UploadOutcome::Failed {
                    error: WireError::PathRejected { .. }
                })
            ),
            "{:?}",
            run.outcome
        );
        assert!(store.admissions.is_empty(), "admission not even asked");
        assert!(store.files.is_empty() && store.chunks.is_empty());
    }
}

#[test]
fn absurd_chunk_counts_are_refused() {
    let mut store = Store::default();
    let run = push(
        &mut store,
        "x",
        b"tiny",
        &Options {
            tamper_manifest: Some(|m| {
                let c = m.chunks[0];
                m.chunks = vec![c; MAX_CHUNKS_PER_MANIFEST as usize + 1];
            }),
            ..Options::default()
        },
    );
    assert!(matches!(
        run.outcome,
        Some(UploadOutcome::Failed {
            error: WireError::ManifestTooLarge { .. }
        })
    ));
    assert!(store.admissions.is_empty());
}

#[test]
fn lying_manifest_hash_is_caught_at_assembly() {
    let mut store = Store::default();
    let run = push(
        &mut store,
        "x",
        b"some document",
        &Options {
            tamper_manifest: Some(|m| m.file_hash = Hash([7; 32])),
            ..Options::default()
        },
    );
    assert!(matches!(
        run.outcome,
        Some(UploadOutcome::Failed {
            error: WireError::FileHashMismatch { .. }
        })
    ));
    assert!(store.files.is_empty());
}

#[test]
fn disk_full_during_transfer_fails_cleanly() {
    let mut store = Store {
        write_failure: Some(StorageFailure::DiskFull),
        ..Store::default()
    };
    let run = push(&mut store, "x", &sample(1 << 20, 8), &Options::default());
    assert_eq!(
        run.client_error,
        Some(ClientError::Server(WireError::DiskFull))
    );
    assert!(store.files.is_empty());
}

#[test]
fn repeated_chunks_within_a_file_are_requested_once() {
    // Zeros cut at the maximum chunk size: two identical 4 MiB chunks + tail.
    let data = vec![0u8; 9 << 20];
    let mut store = Store::default();
    let run = push(&mut store, "zeros.img", &data, &Options::default());
    assert!(run.committed.is_some());
    assert_eq!(run.stats.chunks_requested, 2);
    assert_eq!(run.stats.bytes_sent, 5 << 20);
    assert_eq!(store.files["zeros.img"], data);
}

#[test]
fn empty_file_uploads_without_chunks() {
    let mut store = Store::default();
    let run = push(&mut store, "empty.txt", b"", &Options::default());
    assert!(run.committed.is_some());
    assert_eq!(store.files["empty.txt"], b"");
}

fn started(store: &mut Store, data: &[u8], now: Instant) -> (ServerUpload, Vec<ServerAction>) {
    let manifest = manifest_for("t", data);
    ServerUpload::start(UploadId(9), manifest, now, &mut (&Store::default(), store))
}

#[test]
fn server_times_out_an_idle_client_only_after_the_deadline() {
    let t0 = Instant::now();
    let mut store = Store::default();
    let (mut server, _) = started(&mut store, &sample(1000, 9), t0);
    assert_eq!(server.poll_timeout(), Some(t0 + IDLE_TIMEOUT));
    assert!(server
        .handle_timeout(t0 + IDLE_TIMEOUT - Duration::from_millis(1))
        .is_empty());
    let actions = server.handle_timeout(t0 + IDLE_TIMEOUT);
    assert_eq!(
        actions.last(),
        Some(&ServerAction::Finished(UploadOutcome::Failed {
            error: WireError::IdleTimeout
        }))
    );
    assert!(server.is_finished());
    assert_eq!(server.poll_timeout(), None);
}

#[test]
fn activity_pushes_the_deadline_and_assembly_cannot_time_out() {
    let t0 = Instant::now();
    let data = sample(1000, 10);
    let mut store = Store::default();
    let (mut server, _) = started(&mut store, &data, t0);
    let t1 = t0 + Duration::from_secs(60);
    let actions = server.handle_chunk(Hash::of(&data), data.clone(), t1);
    assert!(matches!(actions[..], [ServerAction::WriteChunk { .. }]));
    // Waiting for our own disk is not the client's fault.
    assert_eq!(server.poll_timeout(), None);
    let actions = server.chunk_written(Hash::of(&data), t1);
    assert!(matches!(actions[..], [ServerAction::Assemble(_)]));
    assert!(server.handle_timeout(t1 + IDLE_TIMEOUT * 10).is_empty());
    assert!(!server.is_finished());
}

#[test]
fn unrequested_chunks_are_fatal_and_duplicates_harmless() {
    let now = Instant::now();
    let data = sample(1000, 11);
    let hash = Hash::of(&data);
    let mut store = Store::default();
    let (mut server, _) = started(&mut store, &data, now);
    assert!(matches!(
        server.handle_chunk(hash, data.clone(), now)[..],
        [ServerAction::WriteChunk { .. }]
    ));
    assert!(server.handle_chunk(hash, data.clone(), now).is_empty());

    let (mut server, _) = started(&mut store, &data, now);
    let stranger = b"not in the manifest".to_vec();
    let actions = server.handle_chunk(Hash::of(&stranger), stranger.clone(), now);
    assert!(matches!(
        actions.last(),
        Some(ServerAction::Finished(UploadOutcome::Failed {
            error: WireError::UnexpectedChunk { .. }
        }))
    ));
    // After the end, further frames are ignored.
    assert!(server.handle_chunk(hash, data, now).is_empty());
}

#[test]
fn oversized_frames_never_reach_the_machines() {
    let mut decoder = FrameDecoder::new();
    let mut header = (MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    header.push(1);
    let mut input = &header[..];
    assert!(matches!(
        decoder.decode(&mut input),
        Err(FrameError::TooLarge { .. })
    ));
    let too_big = Message::Chunk {
        upload: UploadId(1),
        hash: Hash([0; 32]),
        data: vec![0; MAX_FRAME_LEN as usize],
    };
    assert!(matches!(encode(&too_big), Err(FrameError::TooLarge { .. })));
}

#[test]
fn client_rejects_server_nonsense() {
    let now = Instant::now();
    let (mut client, _) = ClientUpload::new(manifest_for("a", b"abc"), now).unwrap();
    let actions = client.handle(
        Message::NeedChunks(NeedChunks {
            upload: UploadId(1),
            hashes: vec![Hash([1; 32])],
        }),
        now,
    );
    assert_eq!(
        actions,
        vec![ClientAction::Failed(ClientError::UnknownChunk(Hash(
            [1; 32]
        )))]
    );

    let (mut client, _) = ClientUpload::new(manifest_for("a", b"abc"), now).unwrap();
    let actions = client.handle(Message::Status, now);
    assert_eq!(
        actions,
        vec![ClientAction::Failed(ClientError::UnexpectedMessage(
            MessageKind::Status
        ))]
    );

    let (mut client, _) = ClientUpload::new(manifest_for("a", b"abc"), now).unwrap();
    let actions = client.handle(
        Message::NeedChunks(NeedChunks {
            upload: UploadId(1),
            hashes: vec![Hash::of(b"abc")],
        }),
        now,
    );
    let [ClientAction::SendChunk { chunk, .. }] = actions[..] else {
        panic!("{actions:?}")
    };
    // The file changed under us between chunking and sending.
    assert_eq!(
        client.chunk_message(&chunk, b"abd".to_vec()),
        Err(ClientError::FileChanged { offset: 0 })
    );
    let actions = client.handle(
        Message::Committed(Committed {
            upload: UploadId(1),
            path: "a".into(),
            size: 3,
            file_hash: Hash([0; 32]),
            bytes_received: 3,
        }),
        now,
    );
    assert!(matches!(
        actions[..],
        [ClientAction::Failed(ClientError::AckMismatch { .. })]
    ));

    let (mut client, _) = ClientUpload::new(manifest_for("a", b"abc"), now).unwrap();
    assert!(client.handle_timeout(now + IDLE_TIMEOUT / 2).is_empty());
    assert_eq!(
        client.handle_timeout(now + IDLE_TIMEOUT),
        vec![ClientAction::Failed(ClientError::IdleTimeout)]
    );
}

#[test]
fn download_is_verified_chunk_by_chunk_and_whole() {
    let data = sample(3 << 20, 12);
    let manifest = manifest_for("d.bin", &data);
    let requested = RelPath::parse("d.bin").unwrap();
    assert!(matches!(
        DownloadCheck::new(&RelPath::parse("other").unwrap(), manifest.clone()),
        Err(ClientError::WrongFile { .. })
    ));
    let mut check = DownloadCheck::new(&requested, manifest.clone()).unwrap();
    let mut rebuilt = vec![0u8; data.len()];
    let n = manifest.chunks.len();
    for (i, c) in manifest.chunks.iter().enumerate() {
        let start = usize::try_from(c.offset).unwrap();
        let bytes = data[start..start + c.len as usize].to_vec();
        let step = check.chunk(c.hash, bytes).unwrap();
        match step {
            DownloadStep::Write { offset, data } | DownloadStep::Finish { offset, data } => {
                let o = usize::try_from(offset).unwrap();
                rebuilt[o..o + data.len()].copy_from_slice(&data);
            }
        }
        assert_eq!(check.is_complete().unwrap(), i + 1 == n);
    }
    assert_eq!(rebuilt, data);

    // A tampered chunk is refused.
    let mut check = DownloadCheck::new(&requested, manifest.clone()).unwrap();
    let c = manifest.chunks[0];
    let mut bytes = data[..c.len as usize].to_vec();
    bytes[10] ^= 1;
    assert!(matches!(
        check.chunk(c.hash, bytes),
        Err(ClientError::DownloadChunkMismatch { index: 0, .. })
    ));

    // A manifest whose file hash lies is caught at the end.
    let mut lying = manifest_for("d.bin", b"xyz");
    lying.file_hash = Hash([3; 32]);
    let mut check = DownloadCheck::new(&requested, lying.clone()).unwrap();
    assert!(matches!(
        check.chunk(lying.chunks[0].hash, b"xyz".to_vec()),
        Err(ClientError::DownloadFileMismatch { .. })
    ));
}
