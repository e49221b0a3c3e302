//! Deterministic "fuzz smoke" test for the frame decoder: seeded, bounded,
//! runs on stable in every `cargo test`. It mirrors the cargo-fuzz target in
//! `fuzz/fuzz_targets/frame_decoder.rs` (which needs nightly): pseudo-random
//! bytes and mutations of valid frames (bit flips, byte changes, insertions,
//! deletions, truncation, rewritten length prefixes, splices of two frames),
//! fed through the streaming decoder at random split points and through
//! `decode_payload`. Nothing may panic, and every decoded message must
//! re-encode to a frame that decodes to the same message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use appliance_sync_proto::frame::HEADER_LEN;
use appliance_sync_proto::limits::MAX_FRAME_LEN;
use appliance_sync_proto::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n as u64).max(1)).unwrap()
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let h = Hash::of(b"seed");
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    let manifest = digest_bytes(&data).unwrap().to_manifest(
        &RelPath::parse("docs/a.pdf").unwrap(),
        Mtime { secs: 5, nanos: 6 },
    );
    let messages = vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 2,
            agent: "smoke".into(),
        }),
        Message::Welcome(Welcome {
            version: 1,
            max_frame_len: MAX_FRAME_LEN,
            max_chunks_per_manifest: 7,
            max_file_size: 9,
        }),
        Message::Upload(manifest.clone()),
        Message::DownloadBegin(manifest),
        Message::NeedChunks(NeedChunks {
            upload: UploadId(3),
            hashes: vec![h, Hash::of(b"2")],
        }),
        Message::Chunk {
            upload: UploadId(3),
            hash: h,
            data: b"chunk bytes".to_vec(),
        },
        Message::DownloadChunk {
            hash: h,
            data: vec![0; 40],
        },
        Message::List {
            dir: "a".into(),
            after: Some("b".into()),
        },
        Message::ListReply {
            entries: vec![ListEntry {
                path: "a/b".into(),
                size: 1,
                file_hash: h,
                mtime: Mtime { secs: 1, nanos: 1 },
            }],
            more: true,
        },
        Message::Delete { path: "a".into() },
        Message::Status,
        Message::StatusReply(StatusReply {
            used: 1,
            available: 2,
            quota: None,
            files: 3,
        }),
        Message::Error {
            upload: Some(UploadId(1)),
            error: WireError::ManifestInvalid {
                reason: ManifestProblem::NotContiguous {
                    index: 1,
                    offset: 2,
                    expected: 3,
                },
            },
        },
    ];
    messages.iter().map(|m| encode(m).unwrap()).collect()
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(8) {
            0 => {
                let i = rng.below(bytes.len());
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(bytes.len());
                if let Some(b) = bytes.get_mut(i) {
                    *b = rng.byte();
                }
            }
            2 => {
                let i = rng.below(bytes.len() + 1);
                bytes.insert(i, rng.byte());
            }
            3 => {
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    bytes.remove(i);
                }
            }
            4 => {
                let keep = rng.below(bytes.len() + 1);
                bytes.truncate(keep);
            }
            5 => {
                // Rewrite the length prefix to something plausible or absurd.
                let len = match rng.below(3) {
                    0 => u32::try_from(rng.below(bytes.len() + 16)).unwrap(),
                    1 => MAX_FRAME_LEN + u32::try_from(rng.below(10)).unwrap(),
                    _ => u32::MAX - u32::try_from(rng.below(10)).unwrap(),
                };
                if bytes.len() >= 4 {
                    bytes[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(bytes.len() + 1);
                let from = rng.below(other.len());
                bytes.truncate(at);
                bytes.extend_from_slice(&other[from..]);
            }
            _ => {
                // Overwrite a run with a large varint (claimed lengths).
                let i = rng.below(bytes.len());
                for (k, b) in [0xff, 0xff, 0xff, 0xff, 0x0f].iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
        }
    }
    bytes
}

fn check(message: &Message) {
    let frame = encode(message).unwrap();
    assert!(frame.len() - HEADER_LEN <= MAX_FRAME_LEN as usize);
    assert_eq!(&decode_payload(&frame[HEADER_LEN..]).unwrap(), message);
    if let Message::Upload(m) | Message::DownloadBegin(m) = message {
        if let Ok(valid) = validate_manifest(m.clone()) {
            assert!(valid.path.components().all(|c| c != ".." && c != "."));
        }
    }
}

fn run_one(rng: &mut Rng, input: &[u8]) -> usize {
    let mut decoded = 0;
    let step = rng.below(64) + 1;
    let mut decoder = FrameDecoder::new();
    'outer: for piece in input.chunks(step) {
        let mut rest = piece;
        loop {
            match decoder.decode(&mut rest) {
                Ok(Some(m)) => {
                    check(&m);
                    decoded += 1;
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    let _ = decoder.finish();
    if input.len() > HEADER_LEN {
        if let Ok(m) = decode_payload(&input[HEADER_LEN..]) {
            check(&m);
        }
    }
    if let Ok(m) = decode_payload(input) {
        check(&m);
    }
    decoded
}

#[test]
fn decoder_survives_mutated_and_random_frames() {
    let seeds = seeds();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut decoded = 0usize;
    let iterations = 20_000;
    for i in 0..iterations {
        let input = if i % 5 == 0 {
            let len = rng.below(200);
            (0..len).map(|_| rng.byte()).collect()
        } else {
            mutate(&mut rng, &seeds)
        };
        decoded += run_one(&mut rng, &input);
    }
    // Unmutated seeds decode, and mutation keeps a good share decodable, so
    // the test exercises the message decoders and not only the header check.
    for seed in &seeds {
        assert_eq!(run_one(&mut rng, seed), 1);
    }
    eprintln!("fuzz smoke: {iterations} inputs, {decoded} frames decoded");
    assert!(decoded > iterations / 20, "only {decoded} frames decoded");
}
