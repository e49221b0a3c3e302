//! The server connection machine: hello, routing across streams, limits,
//! request validation, clean-up of uploads when streams or the connection end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use appliance_sync_proto::limits::{
    max_uploads, IDLE_TIMEOUT, MAX_CHUNKS_PER_MANIFEST, MAX_OPEN_MANIFEST_CHUNKS, MAX_TEXT_LEN,
    MAX_UPLOADS_PER_CONNECTION, MAX_UPLOADS_PER_CONNECTION_V2, MIN_CHUNK_SIZE,
};
use appliance_sync_proto::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Store {
    chunks: HashMap<Hash, Vec<u8>>,
}

impl ChunkIndex for Store {
    fn has_chunk(&self, hash: &Hash) -> bool {
        self.chunks.contains_key(hash)
    }
}

impl Admission for Store {
    fn admit(&mut self, _: &AdmissionRequest<'_>) -> Result<(), Refusal> {
        Ok(())
    }
}

type Conn = ServerConnection<u32>;

fn ready(store: &mut Store) -> Conn {
    let mut conn = Conn::new();
    let actions = conn.handle(0, client_hello("test-agent"), Instant::now(), store);
    let [ConnAction::Send { stream: 0, message }] = &actions[..] else {
        panic!("{actions:?}")
    };
    let welcome = check_welcome(message.clone()).unwrap();
    assert_eq!(welcome.version, PROTOCOL_VERSION);
    assert_eq!(conn.version(), Some(PROTOCOL_VERSION));
    conn
}

fn manifest(path: &str, data: &[u8]) -> Manifest {
    digest_bytes(data)
        .unwrap()
        .to_manifest(&RelPath::parse(path).unwrap(), Mtime { secs: 0, nanos: 0 })
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed))
                .to_le_bytes()[7]
        })
        .collect()
}

#[test]
fn hello_must_come_first_and_match_versions() {
    let mut store = Store::default();
    let mut conn = Conn::new();
    let actions = conn.handle(5, Message::Status, Instant::now(), &mut store);
    assert_eq!(
        actions,
        vec![ConnAction::Close {
            stream: 5,
            error: WireError::UnexpectedMessage {
                got: MessageKind::Status
            }
        }]
    );
    assert!(conn.is_closed());
    assert!(conn
        .handle(5, client_hello("x"), Instant::now(), &mut store)
        .is_empty());

    let mut conn = Conn::new();
    let hello = hello_offering(7, 9, "future");
    let actions = conn.handle(0, hello, Instant::now(), &mut store);
    assert!(matches!(
        actions[..],
        [ConnAction::Close {
            error: WireError::VersionMismatch { client_min: 7, .. },
            ..
        }]
    ));

    let mut conn = Conn::new();
    let hello = hello_offering(1, 1, "a".repeat(MAX_TEXT_LEN + 1));
    assert!(matches!(
        conn.handle(0, hello, Instant::now(), &mut store)[..],
        [ConnAction::Close {
            error: WireError::TextTooLong { .. },
            ..
        }]
    ));
    // The client helper never sends an over-long agent.
    let Message::Hello(h) = client_hello(&"é".repeat(MAX_TEXT_LEN)) else {
        panic!()
    };
    assert!(h.agent.len() <= MAX_TEXT_LEN);
}

#[test]
fn upload_replies_go_to_the_control_stream_whatever_stream_chunks_use() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    let file = data(3 << 20, 1);
    let m = manifest("a/b.bin", &file);
    let actions = conn.handle(10, Message::Upload(m.clone()), now, &mut store);
    let [ConnAction::Send {
        stream: 10,
        message: Message::NeedChunks(need),
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(need.hashes.len(), m.chunks.len());
    let upload = need.upload;

    // Chunks arrive on streams 11, 12, ... in reverse order.
    let mut assembled = None;
    for (i, c) in m.chunks.iter().enumerate().rev() {
        let start = usize::try_from(c.offset).unwrap();
        let bytes = file[start..start + c.len as usize].to_vec();
        let stream = 11 + u32::try_from(i).unwrap();
        let actions = conn.handle(
            stream,
            Message::Chunk {
                upload,
                hash: c.hash,
                data: bytes,
            },
            now,
            &mut store,
        );
        for action in actions {
            match action {
                ConnAction::WriteChunk {
                    upload: u,
                    hash,
                    data,
                } => {
                    assert_eq!(u, upload);
                    store.chunks.insert(hash, data);
                    for a in conn.chunk_written(u, hash, now) {
                        match a {
                            ConnAction::Assemble(req) => assembled = Some(req),
                            other => panic!("{other:?}"),
                        }
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let request = assembled.expect("assembly requested after the last chunk");
    assert_eq!(request.upload, upload);
    assert_eq!(request.manifest.path.as_str(), "a/b.bin");
    let actions = conn.assembled(upload, Ok(()));
    assert!(matches!(
        &actions[..],
        [
            ConnAction::Send {
                stream: 10,
                message: Message::Committed(_)
            },
            ConnAction::UploadFinished {
                outcome: UploadOutcome::Committed { .. },
                ..
            }
        ]
    ));
    assert_eq!(conn.open_uploads(), 0);
    // A late duplicate chunk for the finished upload is dropped quietly...
    let c = m.chunks[0];
    let start = usize::try_from(c.offset).unwrap();
    let late = Message::Chunk {
        upload,
        hash: c.hash,
        data: file[start..start + c.len as usize].to_vec(),
    };
    assert!(conn.handle(99, late, now, &mut store).is_empty());
    // ...but a chunk for an upload that never existed closes the connection.
    let bogus = Message::Chunk {
        upload: UploadId(1000),
        hash: c.hash,
        data: vec![],
    };
    assert!(matches!(
        conn.handle(99, bogus, now, &mut store)[..],
        [ConnAction::Close {
            stream: 99,
            error: WireError::UnknownUpload { .. }
        }]
    ));
}

#[test]
fn concurrent_upload_limit_is_enforced_without_closing() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    assert_eq!(conn.upload_limit(), MAX_UPLOADS_PER_CONNECTION_V2);
    for i in 0..MAX_UPLOADS_PER_CONNECTION_V2 {
        let m = manifest(&format!("f{i}"), &data(100, u8::try_from(i).unwrap()));
        let actions = conn.handle(i, Message::Upload(m), now, &mut store);
        assert!(asks_for_chunks(&actions));
    }
    let actions = conn.handle(100, Message::Upload(manifest("x", b"x")), now, &mut store);
    assert_eq!(
        actions,
        vec![ConnAction::Send {
            stream: 100,
            message: Message::Error {
                upload: None,
                error: WireError::TooManyUploads {
                    max: MAX_UPLOADS_PER_CONNECTION_V2
                }
            }
        }]
    );
    assert!(!conn.is_closed());

    // Closing one control stream frees its slot and reports the failure.
    let actions = conn.stream_closed(3);
    assert!(matches!(
        actions[..],
        [ConnAction::UploadFinished {
            outcome: UploadOutcome::Failed {
                error: WireError::Cancelled { .. }
            },
            ..
        }]
    ));
    assert_eq!(
        conn.open_uploads(),
        MAX_UPLOADS_PER_CONNECTION_V2 as usize - 1
    );

    // Idle uploads time out together at the earliest deadline.
    assert_eq!(conn.poll_timeout(), Some(now + IDLE_TIMEOUT));
    assert!(conn.handle_timeout(now + Duration::from_secs(1)).is_empty());
    let actions = conn.handle_timeout(now + IDLE_TIMEOUT);
    let finished = actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                ConnAction::UploadFinished {
                    outcome: UploadOutcome::Failed {
                        error: WireError::IdleTimeout
                    },
                    ..
                }
            )
        })
        .count();
    assert_eq!(finished, MAX_UPLOADS_PER_CONNECTION_V2 as usize - 1);
    assert_eq!(conn.open_uploads(), 0);
    assert_eq!(conn.poll_timeout(), None);
}

#[test]
fn requests_are_validated_before_being_served() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    let mut ask = |m: Message| conn.handle(1, m, now, &mut store);

    assert_eq!(
        ask(Message::List {
            dir: String::new(),
            after: None
        }),
        vec![ConnAction::Serve {
            stream: 1,
            request: Request::List {
                dir: None,
                after: None
            }
        }]
    );
    assert_eq!(
        ask(Message::List {
            dir: "docs".into(),
            after: Some("docs/a".into())
        }),
        vec![ConnAction::Serve {
            stream: 1,
            request: Request::List {
                dir: Some(RelPath::parse("docs").unwrap()),
                after: Some(RelPath::parse("docs/a").unwrap())
            }
        }]
    );
    assert_eq!(
        ask(Message::Download {
            path: "docs/a.pdf".into()
        }),
        vec![ConnAction::Serve {
            stream: 1,
            request: Request::Download {
                path: RelPath::parse("docs/a.pdf").unwrap()
            }
        }]
    );
    assert_eq!(
        ask(Message::Status),
        vec![ConnAction::Serve {
            stream: 1,
            request: Request::Status
        }]
    );
    for bad in [
        Message::Download {
            path: "../x".into(),
        },
        Message::Delete {
            path: "/etc/passwd".into(),
        },
        Message::Delete {
            path: ".appliance-meta/chunks".into(),
        },
        Message::List {
            dir: "a/".into(),
            after: None,
        },
        Message::List {
            dir: "a".into(),
            after: Some("a\nb".into()),
        },
    ] {
        let actions = ask(bad);
        assert!(
            matches!(
                actions[..],
                [ConnAction::Send {
                    stream: 1,
                    message: Message::Error {
                        error: WireError::PathRejected { .. },
                        ..
                    }
                }]
            ),
            "{actions:?}"
        );
    }
}

#[test]
fn protocol_violation_closes_and_fails_open_uploads() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    conn.handle(1, Message::Upload(manifest("a", b"abc")), now, &mut store);
    let actions = conn.handle(2, Message::Status, now, &mut store);
    assert!(matches!(actions[..], [ConnAction::Serve { .. }]));
    let welcome_from_client = Message::Welcome(Welcome {
        version: 1,
        max_frame_len: 1,
        max_chunks_per_manifest: 1,
        max_file_size: 1,
    });
    let actions = conn.handle(2, welcome_from_client, now, &mut store);
    assert!(matches!(
        &actions[..],
        [
            ConnAction::UploadFinished {
                outcome: UploadOutcome::Failed { .. },
                ..
            },
            ConnAction::Close {
                stream: 2,
                error: WireError::UnexpectedMessage {
                    got: MessageKind::Welcome
                }
            }
        ]
    ));
    assert!(conn.is_closed());
    assert_eq!(conn.open_uploads(), 0);
}

#[test]
fn client_can_cancel_its_upload() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    let actions = conn.handle(1, Message::Upload(manifest("a", b"abc")), now, &mut store);
    let [ConnAction::Send {
        message: Message::NeedChunks(need),
        ..
    }] = &actions[..]
    else {
        panic!()
    };
    let cancel = Message::Error {
        upload: Some(need.upload),
        error: WireError::Cancelled {
            detail: "user pressed ^C".into(),
        },
    };
    let actions = conn.handle(1, cancel, now, &mut store);
    assert!(matches!(
        actions[..],
        [ConnAction::UploadFinished {
            outcome: UploadOutcome::Failed {
                error: WireError::Cancelled { .. }
            },
            ..
        }]
    ));
    assert_eq!(conn.open_uploads(), 0);
}

/// The adapter may hash a chunk itself (off the connection's task) and pass
/// the result: the machine accepts the chunk only if that hash is the one
/// requested, asks again otherwise, and treats stragglers and unknown
/// uploads as `handle` does.
#[test]
fn adapter_hashed_chunks_are_decided_by_the_machine() {
    let mut store = Store::default();
    let mut conn = Conn::new();
    let now = Instant::now();
    let file = data(600_000, 3);
    let m = manifest("h.bin", &file);
    assert_eq!(m.chunks.len(), 1);
    let c = m.chunks[0];
    // Before hello: a protocol violation, as for a `Chunk` message.
    assert!(matches!(
        conn.handle_hashed_chunk(5, UploadId(1), c.hash, file.clone(), c.hash, now)[..],
        [ConnAction::Close { stream: 5, .. }]
    ));
    let mut conn = ready(&mut store);
    let actions = conn.handle(10, Message::Upload(m), now, &mut store);
    let [ConnAction::Send {
        message: Message::NeedChunks(need),
        ..
    }] = &actions[..]
    else {
        panic!("{actions:?}")
    };
    let upload = need.upload;
    // The adapter's hash says the bytes are not the chunk: asked again on
    // the control stream, nothing written.
    let wrong = Hash::of(b"not it");
    let actions = conn.handle_hashed_chunk(11, upload, c.hash, file.clone(), wrong, now);
    assert!(
        matches!(
            &actions[..],
            [
                ConnAction::Send {
                    stream: 10,
                    message: Message::Error {
                        error: WireError::ChunkHashMismatch { actual, .. },
                        ..
                    }
                },
                ConnAction::Send {
                    stream: 10,
                    message: Message::NeedChunks(_)
                }
            ] if *actual == wrong
        ),
        "{actions:?}"
    );
    // The right hash: written.
    let actions = conn.handle_hashed_chunk(11, upload, c.hash, file.clone(), c.hash, now);
    assert!(
        matches!(&actions[..], [ConnAction::WriteChunk { hash, .. }] if *hash == c.hash),
        "{actions:?}"
    );
    for a in conn.chunk_written(upload, c.hash, now) {
        assert!(matches!(a, ConnAction::Assemble(_)), "{a:?}");
    }
    let actions = conn.assembled(upload, Ok(()));
    assert!(matches!(
        &actions[..],
        [
            ConnAction::Send {
                message: Message::Committed(_),
                ..
            },
            ConnAction::UploadFinished { .. }
        ]
    ));
    // A straggler is dropped; an upload that never existed closes.
    assert!(conn
        .handle_hashed_chunk(12, upload, c.hash, file, c.hash, now)
        .is_empty());
    assert!(matches!(
        conn.handle_hashed_chunk(12, UploadId(77), c.hash, vec![], c.hash, now)[..],
        [ConnAction::Close {
            stream: 12,
            error: WireError::UnknownUpload { .. }
        }]
    ));
}

/// Whether the answer is exactly one `NeedChunks` (an upload accepted).
fn asks_for_chunks(actions: &[ConnAction<u32>]) -> bool {
    matches!(
        actions,
        [ConnAction::Send {
            message: Message::NeedChunks(_),
            ..
        }]
    )
}

/// A `Hello` offering versions `min..=max`.
fn hello_offering(min_version: u16, max_version: u16, agent: impl Into<String>) -> Message {
    Message::Hello(Hello {
        min_version,
        max_version,
        agent: agent.into(),
    })
}

/// A client that speaks only version 1 keeps version 1's limit of 8.
#[test]
fn version_1_connection_keeps_eight_uploads() {
    let mut store = Store::default();
    let mut conn = Conn::new();
    let hello = hello_offering(1, 1, "old");
    let actions = conn.handle(0, hello, Instant::now(), &mut store);
    assert!(matches!(
        &actions[..],
        [ConnAction::Send { message: Message::Welcome(w), .. }] if w.version == 1
    ));
    assert_eq!(conn.upload_limit(), MAX_UPLOADS_PER_CONNECTION);
    assert_eq!(max_uploads(1), MAX_UPLOADS_PER_CONNECTION);
    let now = Instant::now();
    for i in 0..MAX_UPLOADS_PER_CONNECTION {
        let m = manifest(&format!("f{i}"), &data(100, u8::try_from(i).unwrap()));
        let actions = conn.handle(i + 1, Message::Upload(m), now, &mut store);
        assert!(asks_for_chunks(&actions));
    }
    let actions = conn.handle(100, Message::Upload(manifest("x", b"x")), now, &mut store);
    assert!(matches!(
        &actions[..],
        [ConnAction::Send {
            message: Message::Error {
                error: WireError::TooManyUploads { max: 8 },
                ..
            },
            ..
        }]
    ));
}

/// A manifest of `chunks` minimum-size chunks (never sent: only listed).
fn listing_manifest(path: &str, chunks: u32) -> Manifest {
    let chunks: Vec<ChunkRef> = (0..chunks)
        .map(|i| ChunkRef {
            offset: u64::from(i) * u64::from(MIN_CHUNK_SIZE),
            len: MIN_CHUNK_SIZE,
            hash: Hash::of(format!("{path} {i}").as_bytes()),
        })
        .collect();
    Manifest {
        path: path.into(),
        size: chunks.len() as u64 * u64::from(MIN_CHUNK_SIZE),
        mtime: Mtime { secs: 0, nanos: 0 },
        file_hash: Hash::of(path.as_bytes()),
        chunks,
    }
}

/// However many uploads may be open, their manifests together list at
/// most MAX_OPEN_MANIFEST_CHUNKS chunks (the memory bound of 8 full
/// manifests); a finished upload gives its share back.
#[test]
fn open_manifests_are_bounded_by_their_chunk_total() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    let full = u64::from(MAX_CHUNKS_PER_MANIFEST);
    let fit = u32::try_from(MAX_OPEN_MANIFEST_CHUNKS / full).unwrap();
    assert!(fit < MAX_UPLOADS_PER_CONNECTION_V2);
    for i in 0..fit {
        let actions = conn.handle(
            i + 1,
            Message::Upload(listing_manifest(
                &format!("big{i}"),
                MAX_CHUNKS_PER_MANIFEST,
            )),
            now,
            &mut store,
        );
        assert!(asks_for_chunks(&actions), "upload {i}");
    }
    let refused = |actions: &[ConnAction<u32>]| {
        matches!(
            actions,
            [ConnAction::Send {
                message: Message::Error {
                    error: WireError::TooManyUploads { .. },
                    ..
                },
                ..
            }]
        )
    };
    // One more chunk does not fit, even in a small upload.
    let actions = conn.handle(
        50,
        Message::Upload(listing_manifest("one", 1)),
        now,
        &mut store,
    );
    assert!(refused(&actions), "{actions:?}");
    assert_eq!(conn.open_uploads(), fit as usize);
    // The first upload's stream ends: its chunks are free again.
    let actions = conn.stream_closed(1);
    assert!(actions
        .iter()
        .any(|a| matches!(a, ConnAction::UploadFinished { .. })));
    let actions = conn.handle(
        51,
        Message::Upload(listing_manifest("one", 1)),
        now,
        &mut store,
    );
    assert!(asks_for_chunks(&actions), "{actions:?}");
}

/// A manifest over the per-manifest chunk limit is refused for what it is
/// (`ManifestTooLarge`), not as over the connection's open-chunk budget,
/// which is one full manifest.
#[test]
fn an_oversized_manifest_is_refused_as_too_large() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let actions = conn.handle(
        1,
        Message::Upload(listing_manifest("huge", MAX_CHUNKS_PER_MANIFEST + 1)),
        Instant::now(),
        &mut store,
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            ConnAction::Send {
                message: Message::Error {
                    error: WireError::ManifestTooLarge { .. },
                    ..
                },
                ..
            }
        )),
        "{actions:?}"
    );
    assert_eq!(conn.open_uploads(), 0);
}

#[test]
fn a_failed_stream_tells_its_uploads_why_they_end() {
    let mut store = Store::default();
    let mut conn = ready(&mut store);
    let now = Instant::now();
    let actions = conn.handle(
        1,
        Message::Upload(manifest("a", &data(100, 1))),
        now,
        &mut store,
    );
    assert!(asks_for_chunks(&actions));
    let actions = conn.handle(
        2,
        Message::Upload(manifest("b", &data(100, 2))),
        now,
        &mut store,
    );
    assert!(asks_for_chunks(&actions));
    let upload = |actions: &[ConnAction<u32>]| {
        actions
            .iter()
            .find_map(|a| match a {
                ConnAction::Send {
                    message: Message::NeedChunks(n),
                    ..
                } => Some(n.upload),
                _ => None,
            })
            .unwrap()
    };
    let b = upload(&actions);

    let actions = conn.stream_failed(2, &WireError::IdleTimeout);
    assert_eq!(
        actions,
        vec![
            ConnAction::Send {
                stream: 2,
                message: Message::Error {
                    upload: Some(b),
                    error: WireError::IdleTimeout
                }
            },
            ConnAction::UploadFinished {
                upload: b,
                outcome: UploadOutcome::Failed {
                    error: WireError::IdleTimeout
                }
            }
        ]
    );
    // Only that stream's upload ended, and only once.
    assert_eq!(conn.open_uploads(), 1);
    assert!(conn.stream_failed(2, &WireError::IdleTimeout).is_empty());
    assert!(conn.stream_closed(2).is_empty());
    assert!(!conn.is_closed());
}
