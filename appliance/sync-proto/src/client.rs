//! Client side of one upload, and verification of one download, as sans-IO
//! state machines.
//!
//! Upload: [`ClientUpload::new`] validates the manifest locally (the same
//! rules as the server, so a hopeless upload fails before connecting) and
//! yields the `Upload` message. Each `NeedChunks` from the server becomes
//! [`ClientAction::SendChunk`]s; the adapter reads those byte ranges from the
//! file (on as many streams as it likes) and turns each into a frame with
//! [`ClientUpload::chunk_message`], which re-hashes the bytes so a file
//! modified during the push is caught instead of uploaded half-old, or with
//! [`ClientUpload::chunk_frame_prefix`], which does not (the server verifies
//! every chunk and the whole file anyway, so the stored document is always
//! the one the manifest describes; the adapter then notices a changed file
//! from its metadata, and a change it cannot see costs a failed push).
//! `Committed` ends it. Resumption needs no client state: the server's chunk
//! store remembers what arrived, so a new push simply gets a shorter
//! `NeedChunks`.
//!
//! Download: [`DownloadCheck`] verifies a `DownloadBegin` manifest and every
//! `DownloadChunk` in order against its hash, and the whole file at the end.

use crate::hash::Hash;
use crate::limits::IDLE_TIMEOUT;
use crate::manifest::{validate, ValidManifest};
use crate::message::{ChunkRef, Committed, Manifest, Message, MessageKind, UploadId, WireError};
use crate::path::RelPath;
use std::collections::HashMap;
use std::time::Instant;

/// Why an upload or download failed on the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server refused or failed, with its typed reason.
    #[error("{0}")]
    Server(WireError),
    /// The manifest breaks a protocol rule (detected locally).
    #[error("invalid manifest: {0}")]
    Manifest(WireError),
    #[error("server sent an unexpected {0:?} message")]
    UnexpectedMessage(MessageKind),
    #[error("server asked for chunk {0}, which is not part of the file")]
    UnknownChunk(Hash),
    #[error("server answered for {got}, expected {expected}")]
    WrongUpload { expected: UploadId, got: UploadId },
    #[error("the file changed while being pushed (chunk at offset {offset} no longer matches)")]
    FileChanged { offset: u64 },
    #[error("server acknowledged a different file (size {size}, hash {file_hash})")]
    AckMismatch { size: u64, file_hash: Hash },
    #[error("download chunk {index} does not match its hash: expected {expected}, got {actual}")]
    DownloadChunkMismatch {
        index: u32,
        expected: Hash,
        actual: Hash,
    },
    #[error("downloaded file does not match its hash: expected {expected}, got {actual}")]
    DownloadFileMismatch { expected: Hash, actual: Hash },
    #[error("asked for {requested:?}, server described {got:?}")]
    WrongFile { requested: String, got: String },
    #[error("no progress for too long")]
    IdleTimeout,
}

/// Instructions for the client adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Read `chunk.offset..+chunk.len` from the file and send it, built with
    /// [`ClientUpload::chunk_message`], on any stream.
    SendChunk { upload: UploadId, chunk: ChunkRef },
    /// The server rejected a chunk we sent (corrupted in transit or a
    /// changed file); it has been re-requested by a `SendChunk` that follows.
    ChunkRejected { hash: Hash },
    /// Done: the file is durable on the server.
    Committed(Committed),
    /// Done: the upload failed.
    Failed(ClientError),
}

/// Counters for progress output and the "bytes actually transferred" report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    pub chunks_requested: u32,
    pub chunks_sent: u32,
    pub bytes_sent: u64,
    pub chunks_rejected: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingNeed,
    Sending,
    Done,
}

/// One upload on the client. See the module docs.
#[derive(Debug)]
pub struct ClientUpload {
    manifest: ValidManifest,
    by_hash: HashMap<Hash, ChunkRef>,
    upload: Option<UploadId>,
    phase: Phase,
    last_activity: Instant,
    stats: UploadStats,
}

impl ClientUpload {
    /// Validates `manifest` and returns the machine with the `Upload` message
    /// to send on a new stream.
    pub fn new(manifest: Manifest, now: Instant) -> Result<(Self, Message), ClientError> {
        let manifest = validate(manifest).map_err(ClientError::Manifest)?;
        let by_hash = manifest.chunks.iter().map(|c| (c.hash, *c)).collect();
        let message = Message::Upload(manifest.to_manifest());
        Ok((
            Self {
                manifest,
                by_hash,
                upload: None,
                phase: Phase::AwaitingNeed,
                last_activity: now,
                stats: UploadStats::default(),
            },
            message,
        ))
    }

    /// The validated manifest being uploaded.
    pub fn manifest(&self) -> &ValidManifest {
        &self.manifest
    }

    /// Progress counters.
    pub fn stats(&self) -> UploadStats {
        self.stats
    }

    /// The server-assigned id, once known.
    pub fn upload_id(&self) -> Option<UploadId> {
        self.upload
    }

    /// Whether the upload has ended (after `Committed` or `Failed`).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Handles a message from the upload's control stream.
    pub fn handle(&mut self, message: Message, now: Instant) -> Vec<ClientAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        self.last_activity = now;
        match message {
            Message::NeedChunks(need) => {
                if let Some(err) = self.check_upload(need.upload) {
                    return self.fail(err);
                }
                self.upload = Some(need.upload);
                self.phase = Phase::Sending;
                let mut actions = Vec::with_capacity(need.hashes.len());
                for hash in need.hashes {
                    let Some(chunk) = self.by_hash.get(&hash) else {
                        return self.fail(ClientError::UnknownChunk(hash));
                    };
                    self.stats.chunks_requested += 1;
                    actions.push(ClientAction::SendChunk {
                        upload: need.upload,
                        chunk: *chunk,
                    });
                }
                actions
            }
            Message::Committed(ack) => {
                if let Some(err) = self.check_upload(ack.upload) {
                    return self.fail(err);
                }
                if ack.size != self.manifest.size || ack.file_hash != self.manifest.file_hash {
                    return self.fail(ClientError::AckMismatch {
                        size: ack.size,
                        file_hash: ack.file_hash,
                    });
                }
                self.phase = Phase::Done;
                vec![ClientAction::Committed(ack)]
            }
            Message::Error {
                error: WireError::ChunkHashMismatch { expected, .. },
                ..
            } if self.phase == Phase::Sending => {
                self.stats.chunks_rejected += 1;
                vec![ClientAction::ChunkRejected { hash: expected }]
            }
            Message::Error { error, .. } => self.fail(ClientError::Server(error)),
            other => self.fail(ClientError::UnexpectedMessage(other.kind())),
        }
    }

    /// Builds the `Chunk` frame for a requested chunk from the bytes the
    /// adapter read, checking they still hash to what the manifest says.
    pub fn chunk_message(
        &mut self,
        chunk: &ChunkRef,
        data: Vec<u8>,
    ) -> Result<Message, ClientError> {
        let upload = self
            .upload
            .ok_or(ClientError::UnexpectedMessage(MessageKind::Chunk))?;
        if data.len() != chunk.len as usize || Hash::of(&data) != chunk.hash {
            return Err(ClientError::FileChanged {
                offset: chunk.offset,
            });
        }
        self.stats.chunks_sent += 1;
        self.stats.bytes_sent += data.len() as u64;
        Ok(Message::Chunk {
            upload,
            hash: chunk.hash,
            data,
        })
    }

    /// The start of the `Chunk` frame for a requested chunk (see
    /// [`crate::frame::encode_chunk_prefix`]): the adapter sends it followed
    /// by exactly `chunk.len` bytes read from the file at `chunk.offset`, so
    /// the chunk goes from its read buffer to the transport without another
    /// copy or a second BLAKE3 pass. The bytes are not checked here (see the
    /// module docs); the server rejects a chunk that does not match.
    pub fn chunk_frame_prefix(&mut self, chunk: &ChunkRef) -> Result<Vec<u8>, ClientError> {
        let upload = self
            .upload
            .ok_or(ClientError::UnexpectedMessage(MessageKind::Chunk))?;
        if self.by_hash.get(&chunk.hash) != Some(chunk) {
            return Err(ClientError::UnknownChunk(chunk.hash));
        }
        let prefix = crate::frame::encode_chunk_prefix(upload, &chunk.hash, chunk.len as usize)
            .map_err(|e| ClientError::Manifest(e.into()))?;
        self.stats.chunks_sent += 1;
        self.stats.bytes_sent += u64::from(chunk.len);
        Ok(prefix)
    }

    /// When [`Self::handle_timeout`] should be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != Phase::Done).then(|| self.last_activity + IDLE_TIMEOUT)
    }

    /// Fails the upload if the server has been silent for [`IDLE_TIMEOUT`].
    /// The adapter should call [`Self::touch`] whenever a chunk send
    /// completes, so a long transfer of many chunks does not look idle.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ClientAction> {
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => self.fail(ClientError::IdleTimeout),
            _ => Vec::new(),
        }
    }

    /// Records progress that is not a message (a chunk fully sent).
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = self.last_activity.max(now);
    }

    fn check_upload(&self, got: UploadId) -> Option<ClientError> {
        match self.upload {
            Some(expected) if expected != got => Some(ClientError::WrongUpload { expected, got }),
            _ => None,
        }
    }

    fn fail(&mut self, error: ClientError) -> Vec<ClientAction> {
        self.phase = Phase::Done;
        vec![ClientAction::Failed(error)]
    }
}

/// What to do with one verified download chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadStep {
    /// Write `data` at `offset` in the temporary file.
    Write { offset: u64, data: Vec<u8> },
    /// Write `data` at `offset`; the whole file is now verified, so fsync and
    /// rename it into place.
    Finish { offset: u64, data: Vec<u8> },
}

/// Verifies a download: the manifest, each chunk in order, the whole file.
#[derive(Debug)]
pub struct DownloadCheck {
    manifest: ValidManifest,
    next: usize,
    hasher: blake3::Hasher,
}

impl DownloadCheck {
    /// Starts from the server's `DownloadBegin` manifest, which must describe
    /// the file that was asked for.
    pub fn new(requested: &RelPath, manifest: Manifest) -> Result<Self, ClientError> {
        let manifest = validate(manifest).map_err(ClientError::Manifest)?;
        if manifest.path != *requested {
            return Err(ClientError::WrongFile {
                requested: requested.as_str().to_owned(),
                got: manifest.path.into_string(),
            });
        }
        Ok(Self {
            manifest,
            next: 0,
            hasher: blake3::Hasher::new(),
        })
    }

    /// The verified manifest (path, size, mtime to restore).
    pub fn manifest(&self) -> &ValidManifest {
        &self.manifest
    }

    /// Whether every chunk has been received and verified. Also true at once
    /// for an empty file (after checking its hash).
    pub fn is_complete(&self) -> Result<bool, ClientError> {
        if self.next < self.manifest.chunks.len() {
            return Ok(false);
        }
        let actual: Hash = self.hasher.finalize().into();
        if actual == self.manifest.file_hash {
            Ok(true)
        } else {
            Err(ClientError::DownloadFileMismatch {
                expected: self.manifest.file_hash,
                actual,
            })
        }
    }

    /// Verifies the next `DownloadChunk`.
    pub fn chunk(&mut self, hash: Hash, data: Vec<u8>) -> Result<DownloadStep, ClientError> {
        let index = u32::try_from(self.next).unwrap_or(u32::MAX);
        let Some(expected) = self.manifest.chunks.get(self.next).copied() else {
            return Err(ClientError::UnexpectedMessage(MessageKind::DownloadChunk));
        };
        let actual = Hash::of(&data);
        if hash != expected.hash || actual != expected.hash || data.len() != expected.len as usize {
            return Err(ClientError::DownloadChunkMismatch {
                index,
                expected: expected.hash,
                actual,
            });
        }
        self.hasher.update(&data);
        self.next += 1;
        if self.is_complete()? {
            Ok(DownloadStep::Finish {
                offset: expected.offset,
                data,
            })
        } else {
            Ok(DownloadStep::Write {
                offset: expected.offset,
                data,
            })
        }
    }
}
