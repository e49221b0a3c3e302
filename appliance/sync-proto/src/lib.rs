//! Sans-IO sync protocol of the appliance (issue 7): frames, messages,
//! path validation, content-defined chunking, and the client/server state
//! machines of an upload. No sockets, no files, no clock: bytes and events in,
//! messages and actions out. The QUIC adapter (`appliance-sync`, quinn +
//! rustls) moves frames between streams and these machines and performs the
//! storage IO they ask for; everything that decides is here, unit-tested and
//! fuzzed.
//!
//! # Layers
//! - [`frame`]: `[u32 BE payload length][u8 frame format][postcard payload]`.
//!   The length is checked against [`limits::MAX_FRAME_LEN`] before any payload
//!   byte is buffered; decoding returns typed [`FrameError`]s and never panics.
//! - [`message`]: the protocol messages (version [`PROTOCOL_VERSION`],
//!   negotiated by `Hello`/`Welcome`) and the typed [`WireError`]s users see.
//! - [`path`]: [`RelPath`], a relative path that can only be built by
//!   validation (no absolute paths, `..`, `.`, empty components, control or
//!   bidi characters, backslashes, reserved names, over-long paths).
//! - [`manifest`]: structural validation of a manifest (counts, sizes,
//!   contiguity) into a [`ValidManifest`].
//! - [`chunk`]: FastCDC (min 256 KiB / avg 1 MiB / max 4 MiB) with BLAKE3 per
//!   chunk and per file, fed incrementally.
//! - [`server`]: [`ServerUpload`], one upload on the server.
//! - [`conn`]: [`ServerConnection`], one client connection on the server:
//!   hello, upload registry and routing, request validation.
//! - [`client`]: [`ClientUpload`] and [`DownloadCheck`].
//!
//! # Conversations
//! Each runs on its own bidirectional QUIC stream unless noted.
//! - Control: `Hello` → `Welcome` (or `Error(VersionMismatch)`, then close).
//! - Upload: `Upload(manifest)` → `NeedChunks{upload, hashes}` (or a typed
//!   `Error`, e.g. `QuotaExceeded`, `PathRejected`, `ManifestTooLarge`, before
//!   any chunk moves). The client sends each requested chunk as
//!   `Chunk{upload, hash, data}` on any number of parallel streams; the
//!   server verifies each against its hash on arrival. A bad chunk gets
//!   `Error(ChunkHashMismatch)` plus `NeedChunks[hash]` on the upload's
//!   stream (at most [`limits::MAX_CHUNK_RETRIES`] times). When every chunk is
//!   durable the server assembles and verifies the file and answers
//!   `Committed`. An empty `NeedChunks` (everything deduplicated) is followed
//!   directly by `Committed`.
//! - `List{dir, after}` → `ListReply{entries, more}`; `Download{path}` →
//!   `DownloadBegin(manifest)` + `DownloadChunk`s in order; `Delete{path}` →
//!   `Deleted`; `Status` → `StatusReply`. Any of them may instead get an `Error`.
//!
//! # Invariants
//! - Nothing the peer sends can make either side allocate more than one frame
//!   ([`limits::MAX_FRAME_LEN`]) per stream, or keep more than
//!   [`limits::max_uploads`] upload sessions (8 in version 1, 32 in
//!   version 2) of at most [`limits::MAX_CHUNKS_PER_MANIFEST`] chunks each
//!   and [`limits::MAX_OPEN_MANIFEST_CHUNKS`] together per connection
//!   (the server's state for them is bounded by
//!   [`limits::MAX_OPEN_UPLOAD_STATE_BYTES`], about 80 MiB). Every chunk
//!   but a file's last is at least [`limits::MIN_CHUNK_SIZE`], so a
//!   manifest's length is paid for by file bytes that admission counts.
//! - The server only hands chunks to storage after their BLAKE3 matches, only
//!   asks for assembly when every chunk is durable, and only acknowledges
//!   after the adapter reports the file verified, fsynced and renamed.
//! - Admission (quota and free space) is decided before the first
//!   `NeedChunks`, so a refused upload transfers no chunk byte.
//! - Chunks are content-addressed in the client's store and kept when an
//!   upload fails: a retry only needs what is missing (resumption), and an
//!   unchanged file needs no chunk at all (deduplication).
//! - Idle timeouts apply only while waiting for the peer, computed from the
//!   `now` the adapter passes in; adapter work (disk writes, assembly) never
//!   times out here.
//!
//! The reasons behind every constant are in [`limits`].

pub mod chunk;
pub mod client;
pub mod conn;
pub mod frame;
pub mod hash;
pub mod limits;
pub mod manifest;
pub mod message;
pub mod path;
pub mod server;

pub use chunk::{digest_bytes, digest_reader, ChunkError, Chunker, FileDigest};
pub use client::{
    ClientAction, ClientError, ClientUpload, DownloadCheck, DownloadStep, UploadStats,
};
pub use conn::{check_welcome, client_hello, ConnAction, Request, ServerConnection};
pub use frame::{decode_payload, encode, encode_into, parse_header, FrameDecoder, FrameError};
pub use hash::Hash;
pub use manifest::{validate as validate_manifest, ValidManifest};
pub use message::*;
pub use path::{PathRejection, RelPath};
pub use server::{
    Admission, AdmissionRequest, AssembleFailure, AssembleRequest, ChunkIndex, Refusal,
    ServerAction, ServerUpload, StorageFailure, UploadOutcome,
};
