//! Server side of one upload, as a sans-IO state machine.
//!
//! ```text
//!  Upload(manifest) ─▶ validate ─▶ missing = chunks the index lacks
//!        │                  └─▶ admission(file size, missing bytes) ──refused──▶ Error, Finished
//!        ▼
//!   Receiving ──Chunk ok──▶ WriteChunk ──chunk_written──▶ (all present?) ──▶ Assembling
//!        │  └─Chunk bad──▶ Error(ChunkHashMismatch) + NeedChunks[hash]   (≤ MAX_CHUNK_RETRIES)
//!        └─idle ≥ IDLE_TIMEOUT──▶ Error(IdleTimeout), Finished
//!   Assembling ──assembled(Ok)──▶ Committed, Finished(Committed)
//!              └─assembled(Err)─▶ Error, Finished(Failed)
//! ```
//!
//! The machine never touches storage. It asks the adapter, through
//! [`ServerAction`]s, to persist verified chunks ([`ServerAction::WriteChunk`])
//! and to assemble the file ([`ServerAction::Assemble`]: staging, whole-file
//! hash check, fsync of file and directory, atomic rename). The adapter
//! reports back with [`ServerUpload::chunk_written`],
//! [`ServerUpload::chunk_write_failed`] and [`ServerUpload::assembled`].
//! A chunk only counts as present once the adapter says it is durable, so
//! assembly never starts on chunks that are still in flight to disk.
//!
//! Time is an input (`now`); [`ServerUpload::poll_timeout`] says when the
//! adapter should call [`ServerUpload::handle_timeout`].

use crate::hash::Hash;
use crate::limits::{IDLE_TIMEOUT, MAX_CHUNK_RETRIES, MAX_TEXT_LEN};
use crate::manifest::{validate, ValidManifest};
use crate::message::{Committed, Manifest, Message, NeedChunks, UploadId, WireError};
use crate::path::RelPath;
use std::collections::HashMap;
use std::time::Instant;

/// Query into the client's content-addressed chunk store.
pub trait ChunkIndex {
    /// Whether a durable, verified chunk with this hash is already stored.
    fn has_chunk(&self, hash: &Hash) -> bool;
}

/// What the storage manager is asked before an upload is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionRequest<'a> {
    pub upload: UploadId,
    pub path: &'a RelPath,
    /// Size of the file once assembled.
    pub file_size: u64,
    /// Bytes of chunks the server does not have yet and will receive.
    pub missing_bytes: u64,
}

/// Why the storage manager refused an upload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client's quota or the pool's free space is insufficient.
    #[error("quota exceeded: {needed} bytes needed, {available} available")]
    QuotaExceeded { needed: u64, available: u64 },
    /// Storage cannot take uploads at all right now (pool degraded, read-only…).
    #[error("storage unavailable: {detail}")]
    Unavailable { detail: String },
}

/// Admission policy: quota and free space (the storage manager implements it).
pub trait Admission {
    /// `Ok` to accept the upload, or the reason not to.
    fn admit(&mut self, request: &AdmissionRequest<'_>) -> Result<(), Refusal>;
}

impl<I: ChunkIndex + ?Sized, A: ?Sized> ChunkIndex for (&I, &mut A) {
    fn has_chunk(&self, hash: &Hash) -> bool {
        self.0.has_chunk(hash)
    }
}

impl<I: ?Sized, A: Admission + ?Sized> Admission for (&I, &mut A) {
    fn admit(&mut self, request: &AdmissionRequest<'_>) -> Result<(), Refusal> {
        self.1.admit(request)
    }
}

/// A storage failure the adapter reports back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageFailure {
    #[error("disk full")]
    DiskFull,
    #[error("{detail}")]
    Io { detail: String },
}

/// Why assembly failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleFailure {
    /// The chunks were all correct but the whole file does not hash to the
    /// manifest's `file_hash` (a lying or buggy client).
    #[error("assembled file hashes to {actual}")]
    FileHashMismatch { actual: Hash },
    #[error(transparent)]
    Storage(#[from] StorageFailure),
}

/// What the adapter must do with one assembled upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembleRequest {
    pub upload: UploadId,
    pub manifest: ValidManifest,
}

/// How an upload ended (for the `sync.upload.*` events and clean-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// The file is durable and visible.
    Committed {
        path: RelPath,
        size: u64,
        file_hash: Hash,
        bytes_received: u64,
        chunks_received: u32,
    },
    /// The upload failed; the adapter removes any staging file. Chunks already
    /// written stay in the chunk store so a retry resumes from them.
    Failed { error: WireError },
}

/// Instructions for the adapter, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Send on the upload's control stream.
    Reply(Message),
    /// Persist a verified chunk in the client's chunk store, then call
    /// [`ServerUpload::chunk_written`] or [`ServerUpload::chunk_write_failed`].
    WriteChunk { hash: Hash, data: Vec<u8> },
    /// All chunks are durable: assemble, verify, fsync, rename, then call
    /// [`ServerUpload::assembled`].
    Assemble(AssembleRequest),
    /// The session is over; drop it after performing the preceding actions.
    Finished(UploadOutcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Requested from the client; `retries` failed verifications so far.
    Missing { retries: u32 },
    /// Verified and handed to the adapter; not yet durable.
    Writing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Receiving,
    Assembling,
    Finished,
}

/// One upload on the server. See the module docs.
#[derive(Debug)]
pub struct ServerUpload {
    id: UploadId,
    manifest: Option<ValidManifest>,
    /// Length of every distinct chunk of the manifest.
    lengths: HashMap<Hash, u32>,
    /// Chunks not yet durable.
    pending: HashMap<Hash, ChunkState>,
    phase: Phase,
    last_activity: Instant,
    bytes_received: u64,
    chunks_received: u32,
}

impl ServerUpload {
    /// Starts an upload from the client's manifest: validates it, computes the
    /// chunks the index lacks, asks for admission, and answers. If anything
    /// refuses, the returned actions are `[Reply(Error), Finished(Failed)]`
    /// and no chunk is ever requested.
    ///
    /// `storage` answers both "have chunk?" and admission; an adapter holding
    /// the two separately can pass the pair `(&index, &mut admission)`.
    pub fn start<S>(
        id: UploadId,
        manifest: Manifest,
        now: Instant,
        storage: &mut S,
    ) -> (Self, Vec<ServerAction>)
    where
        S: ChunkIndex + Admission + ?Sized,
    {
        let mut session = Self {
            id,
            manifest: None,
            lengths: HashMap::new(),
            pending: HashMap::new(),
            phase: Phase::Receiving,
            last_activity: now,
            bytes_received: 0,
            chunks_received: 0,
        };
        let manifest = match validate(manifest) {
            Ok(m) => m,
            Err(error) => return session.fail_with(error),
        };
        let distinct = manifest.distinct_chunks();
        let mut missing = Vec::new();
        let mut missing_bytes = 0u64;
        for &(hash, len) in &distinct {
            session.lengths.insert(hash, len);
            if !storage.has_chunk(&hash) {
                missing.push(hash);
                missing_bytes += u64::from(len);
                session
                    .pending
                    .insert(hash, ChunkState::Missing { retries: 0 });
            }
        }
        let request = AdmissionRequest {
            upload: id,
            path: &manifest.path,
            file_size: manifest.size,
            missing_bytes,
        };
        if let Err(refusal) = storage.admit(&request) {
            let error = match refusal {
                Refusal::QuotaExceeded { needed, available } => {
                    WireError::QuotaExceeded { needed, available }
                }
                Refusal::Unavailable { detail } => WireError::Storage {
                    detail: bounded(detail),
                },
            };
            session.pending.clear();
            return session.fail_with(error);
        }
        session.manifest = Some(manifest);
        let mut actions = vec![ServerAction::Reply(Message::NeedChunks(NeedChunks {
            upload: id,
            hashes: missing,
        }))];
        session.maybe_assemble(&mut actions);
        (session, actions)
    }

    /// The upload's id.
    pub fn id(&self) -> UploadId {
        self.id
    }

    /// Whether the session is over (after a `Finished` action).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Number of chunks still to be received or made durable.
    pub fn pending_chunks(&self) -> usize {
        self.pending.len()
    }

    /// Handles a `Chunk` frame for this upload.
    pub fn handle_chunk(&mut self, hash: Hash, data: Vec<u8>, now: Instant) -> Vec<ServerAction> {
        self.chunk(hash, data, Hash::of, now)
    }

    /// Like [`Self::handle_chunk`], with `actual` the BLAKE3 of `data` as the
    /// adapter computed it (off the connection's task, in parallel across
    /// streams). The decision (accept, ask again, give up) is still made
    /// here from that hash.
    pub fn handle_hashed_chunk(
        &mut self,
        hash: Hash,
        data: Vec<u8>,
        actual: Hash,
        now: Instant,
    ) -> Vec<ServerAction> {
        self.chunk(hash, data, |_| actual, now)
    }

    /// A chunk whose BLAKE3 `actual` gives, computed only when needed.
    fn chunk(
        &mut self,
        hash: Hash,
        data: Vec<u8>,
        actual: impl FnOnce(&[u8]) -> Hash,
        now: Instant,
    ) -> Vec<ServerAction> {
        if self.phase != Phase::Receiving {
            // Stragglers from parallel streams after the upload moved on.
            return Vec::new();
        }
        self.last_activity = now;
        let Some(&expected_len) = self.lengths.get(&hash) else {
            return self.fail(WireError::UnexpectedChunk { hash });
        };
        let retries = match self.pending.get(&hash) {
            Some(ChunkState::Missing { retries }) => *retries,
            // Already durable or being written: a duplicate, harmless.
            Some(ChunkState::Writing) | None => return Vec::new(),
        };
        let actual = actual(&data);
        if actual != hash || data.len() != expected_len as usize {
            let retries = retries + 1;
            if retries > MAX_CHUNK_RETRIES {
                return self.fail(WireError::TooManyChunkRetries { hash });
            }
            self.pending.insert(hash, ChunkState::Missing { retries });
            return vec![
                ServerAction::Reply(Message::Error {
                    upload: Some(self.id),
                    error: WireError::ChunkHashMismatch {
                        expected: hash,
                        actual,
                    },
                }),
                ServerAction::Reply(Message::NeedChunks(NeedChunks {
                    upload: self.id,
                    hashes: vec![hash],
                })),
            ];
        }
        self.pending.insert(hash, ChunkState::Writing);
        self.bytes_received += data.len() as u64;
        self.chunks_received += 1;
        vec![ServerAction::WriteChunk { hash, data }]
    }

    /// The adapter made chunk `hash` durable.
    pub fn chunk_written(&mut self, hash: Hash, now: Instant) -> Vec<ServerAction> {
        if self.phase != Phase::Receiving {
            return Vec::new();
        }
        self.last_activity = now;
        if self.pending.get(&hash) == Some(&ChunkState::Writing) {
            self.pending.remove(&hash);
        }
        let mut actions = Vec::new();
        self.maybe_assemble(&mut actions);
        actions
    }

    /// The adapter failed to store chunk `hash`.
    pub fn chunk_write_failed(&mut self, hash: Hash, failure: StorageFailure) -> Vec<ServerAction> {
        if self.phase != Phase::Receiving || self.pending.get(&hash) != Some(&ChunkState::Writing) {
            return Vec::new();
        }
        self.fail(storage_error(failure))
    }

    /// The adapter finished (or failed) the assembly it was asked for.
    pub fn assembled(&mut self, result: Result<(), AssembleFailure>) -> Vec<ServerAction> {
        if self.phase != Phase::Assembling {
            return Vec::new();
        }
        let Some(manifest) = self.manifest.as_ref() else {
            return Vec::new();
        };
        match result {
            Ok(()) => {
                self.phase = Phase::Finished;
                vec![
                    ServerAction::Reply(Message::Committed(Committed {
                        upload: self.id,
                        path: manifest.path.as_str().to_owned(),
                        size: manifest.size,
                        file_hash: manifest.file_hash,
                        bytes_received: self.bytes_received,
                    })),
                    ServerAction::Finished(UploadOutcome::Committed {
                        path: manifest.path.clone(),
                        size: manifest.size,
                        file_hash: manifest.file_hash,
                        bytes_received: self.bytes_received,
                        chunks_received: self.chunks_received,
                    }),
                ]
            }
            Err(AssembleFailure::FileHashMismatch { actual }) => {
                let expected = manifest.file_hash;
                self.fail(WireError::FileHashMismatch { expected, actual })
            }
            Err(AssembleFailure::Storage(failure)) => self.fail(storage_error(failure)),
        }
    }

    /// When [`Self::handle_timeout`] should next be called, if at all. Only
    /// waiting for the client can time out; adapter work cannot.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waiting_for_client = self.phase == Phase::Receiving
            && self
                .pending
                .values()
                .any(|s| matches!(s, ChunkState::Missing { .. }));
        waiting_for_client.then(|| self.last_activity + IDLE_TIMEOUT)
    }

    /// Fails the upload if the client has been idle for [`IDLE_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ServerAction> {
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => self.fail(WireError::IdleTimeout),
            _ => Vec::new(),
        }
    }

    /// Ends the upload because its connection or stream went away.
    pub fn abort(&mut self, error: WireError) -> Vec<ServerAction> {
        if self.phase == Phase::Finished {
            return Vec::new();
        }
        self.phase = Phase::Finished;
        vec![ServerAction::Finished(UploadOutcome::Failed { error })]
    }

    /// Ends the upload with `error`, told to the client: its control
    /// stream failed in a way that leaves the client waiting for an answer
    /// (it stalled in the middle of a frame, say).
    pub fn give_up(&mut self, error: WireError) -> Vec<ServerAction> {
        if self.phase == Phase::Finished {
            return Vec::new();
        }
        self.fail(error)
    }

    fn maybe_assemble(&mut self, actions: &mut Vec<ServerAction>) {
        if self.phase == Phase::Receiving && self.pending.is_empty() {
            if let Some(manifest) = &self.manifest {
                self.phase = Phase::Assembling;
                actions.push(ServerAction::Assemble(AssembleRequest {
                    upload: self.id,
                    manifest: manifest.clone(),
                }));
            }
        }
    }

    fn fail(&mut self, error: WireError) -> Vec<ServerAction> {
        self.phase = Phase::Finished;
        self.pending.clear();
        vec![
            ServerAction::Reply(Message::Error {
                upload: Some(self.id),
                error: error.clone(),
            }),
            ServerAction::Finished(UploadOutcome::Failed { error }),
        ]
    }

    fn fail_with(mut self, error: WireError) -> (Self, Vec<ServerAction>) {
        let actions = self.fail(error);
        (self, actions)
    }
}

fn storage_error(failure: StorageFailure) -> WireError {
    match failure {
        StorageFailure::DiskFull => WireError::DiskFull,
        StorageFailure::Io { detail } => WireError::Storage {
            detail: bounded(detail),
        },
    }
}

/// Truncates free text to [`MAX_TEXT_LEN`] bytes on a character boundary.
pub(crate) fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
