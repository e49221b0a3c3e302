//! Sans-IO sync protocol of the appliance (issue 7). Docs completed below.

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
