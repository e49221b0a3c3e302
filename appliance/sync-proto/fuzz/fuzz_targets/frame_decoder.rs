//! Fuzz target for the frame decoder: arbitrary bytes, split at arbitrary
//! points, must never panic, never buffer more than one frame, and every
//! message that decodes must re-encode to a frame that decodes to itself.
//! Decoded manifests and paths are also run through validation.
#![no_main]

use appliance_sync_proto::frame::HEADER_LEN;
use appliance_sync_proto::limits::MAX_FRAME_LEN;
use appliance_sync_proto::{
    decode_payload, encode, validate_manifest, FrameDecoder, Message, RelPath,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&split, data)) = input.split_first() else {
        return;
    };
    // Stream decoding with pieces of 1..=256 bytes.
    let step = usize::from(split) + 1;
    let mut decoder = FrameDecoder::new();
    'outer: for piece in data.chunks(step) {
        let mut rest = piece;
        loop {
            match decoder.decode(&mut rest) {
                Ok(Some(message)) => check(&message),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    let _ = decoder.finish();

    // Direct payload decoding of the raw bytes.
    if let Ok(message) = decode_payload(data) {
        check(&message);
    }
});

fn check(message: &Message) {
    let frame = encode(message).expect("a decoded message re-encodes");
    assert!(frame.len() - HEADER_LEN <= MAX_FRAME_LEN as usize);
    let again = decode_payload(&frame[HEADER_LEN..]).expect("re-encoded frame decodes");
    assert_eq!(&again, message);
    match message {
        Message::Upload(manifest) | Message::DownloadBegin(manifest) => {
            if let Ok(valid) = validate_manifest(manifest.clone()) {
                assert!(valid.path.components().all(|c| c != ".." && c != "." && !c.is_empty()));
            }
        }
        Message::Download { path } | Message::Delete { path } => {
            let _ = RelPath::parse(path);
        }
        _ => {}
    }
}
