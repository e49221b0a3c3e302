//! One server connection: version negotiation, upload sessions keyed by
//! [`UploadId`], and validation of the simple requests, as a sans-IO machine.
//!
//! The adapter owns the QUIC connection. For every decoded frame it calls
//! [`ServerConnection::handle`] with an opaque, copyable token `S` naming the
//! stream the frame arrived on, and performs the returned [`ConnAction`]s in
//! order. Replies name the stream to use: an upload's replies always go to
//! the stream its manifest came on, even when the chunk that caused them
//! arrived on another. List, download, delete and status need storage IO, so
//! they come out as [`ConnAction::Serve`] with their paths already validated.

use crate::hash::Hash;
use crate::limits::{max_uploads, MAX_OPEN_MANIFEST_CHUNKS, MAX_TEXT_LEN};
use crate::limits::{MAX_CHUNKS_PER_MANIFEST, MAX_FILE_SIZE, MAX_FRAME_LEN};
use crate::message::{negotiate_version, Message, UploadId, Welcome, WireError};
use crate::path::RelPath;
use crate::server::{
    Admission, AssembleFailure, AssembleRequest, ChunkIndex, ServerAction, ServerUpload,
    StorageFailure, UploadOutcome,
};
use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Instant;

/// A request the adapter serves with storage IO. Paths are validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// List files below `dir` (`None` = the client root), strictly after
    /// `after` in path order, at most `MAX_LIST_ENTRIES` per `ListReply`.
    List {
        dir: Option<RelPath>,
        after: Option<RelPath>,
    },
    /// Send `DownloadBegin` with the stored manifest, then the chunks in order.
    Download { path: RelPath },
    /// Delete the file and answer `Deleted`.
    Delete { path: RelPath },
    /// Answer `StatusReply`.
    Status,
}

/// What the adapter must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnAction<S> {
    /// Send `message` on `stream`.
    Send { stream: S, message: Message },
    /// Persist a verified chunk, then call
    /// [`ServerConnection::chunk_written`] or [`ServerConnection::chunk_write_failed`].
    WriteChunk {
        upload: UploadId,
        hash: Hash,
        data: Vec<u8>,
    },
    /// Assemble an upload, then call [`ServerConnection::assembled`].
    Assemble(AssembleRequest),
    /// An upload ended (publish `sync.upload.*`; on failure remove staging).
    UploadFinished {
        upload: UploadId,
        outcome: UploadOutcome,
    },
    /// Serve a request on `stream`.
    Serve { stream: S, request: Request },
    /// Protocol violation: send `error` on `stream` (best effort) and close
    /// the whole connection. Every open upload has already been finished.
    Close { stream: S, error: WireError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Ready,
    Closed,
}

/// Protocol state of one client connection. See the module docs.
#[derive(Debug)]
pub struct ServerConnection<S> {
    phase: Phase,
    version: Option<u16>,
    next_upload: u64,
    uploads: HashMap<UploadId, (S, ServerUpload)>,
    /// Chunks each open upload's manifest lists (as sent), and their sum,
    /// bounded by [`MAX_OPEN_MANIFEST_CHUNKS`].
    listed: HashMap<UploadId, u64>,
    listed_total: u64,
    /// An explicit concurrent-upload limit; `None`: the negotiated
    /// version's ([`max_uploads`]).
    max_uploads: Option<u32>,
}

impl<S: Copy + Eq + Debug> Default for ServerConnection<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Copy + Eq + Debug> ServerConnection<S> {
    /// A connection that has not said `Hello` yet, with the upload limit of
    /// the version it negotiates ([`max_uploads`]).
    pub fn new() -> Self {
        Self {
            phase: Phase::AwaitingHello,
            version: None,
            next_upload: 1,
            uploads: HashMap::new(),
            listed: HashMap::new(),
            listed_total: 0,
            max_uploads: None,
        }
    }

    /// Like [`Self::new`] with another concurrent-upload limit.
    pub fn with_max_uploads(max_uploads: u32) -> Self {
        Self {
            max_uploads: Some(max_uploads),
            ..Self::new()
        }
    }

    /// The concurrent-upload limit in force.
    pub fn upload_limit(&self) -> u32 {
        self.max_uploads
            .unwrap_or_else(|| max_uploads(self.version.unwrap_or(1)))
    }

    fn forget_upload(&mut self, id: UploadId) {
        self.uploads.remove(&id);
        if let Some(n) = self.listed.remove(&id) {
            self.listed_total -= n;
        }
    }

    /// The negotiated protocol version, after `Hello`.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Number of uploads in progress.
    pub fn open_uploads(&self) -> usize {
        self.uploads.len()
    }

    /// Whether the connection must be (or has been) closed.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Handles one message that arrived on `stream`.
    pub fn handle<T>(
        &mut self,
        stream: S,
        message: Message,
        now: Instant,
        storage: &mut T,
    ) -> Vec<ConnAction<S>>
    where
        T: ChunkIndex + Admission + ?Sized,
    {
        match self.phase {
            Phase::Closed => return Vec::new(),
            Phase::AwaitingHello => return self.handle_hello(stream, message),
            Phase::Ready => {}
        }
        match message {
            Message::Upload(manifest) => {
                let limit = self.upload_limit();
                // A manifest over the per-manifest limit counts as a full
                // one: validation refuses it with `ManifestTooLarge`, which
                // says more than `TooManyUploads` would.
                let listed = (manifest.chunks.len() as u64).min(u64::from(MAX_CHUNKS_PER_MANIFEST));
                if self.uploads.len() >= limit as usize
                    || self.listed_total + listed > MAX_OPEN_MANIFEST_CHUNKS
                {
                    return vec![send_error(
                        stream,
                        None,
                        WireError::TooManyUploads { max: limit },
                    )];
                }
                let id = UploadId(self.next_upload);
                self.next_upload += 1;
                let (session, actions) = ServerUpload::start(id, manifest, now, storage);
                self.uploads.insert(id, (stream, session));
                self.listed.insert(id, listed);
                self.listed_total += listed;
                self.map_actions(id, actions)
            }
            Message::Chunk { upload, hash, data } => match self.uploads.get_mut(&upload) {
                Some((_, session)) => {
                    let actions = session.handle_chunk(hash, data, now);
                    self.map_actions(upload, actions)
                }
                // A straggler for an upload that already ended: drop it.
                None if upload.0 < self.next_upload => Vec::new(),
                None => self.close(stream, WireError::UnknownUpload { upload }),
            },
            Message::List { dir, after } => {
                let dir = if dir.is_empty() {
                    None
                } else {
                    match RelPath::parse(&dir) {
                        Ok(p) => Some(p),
                        Err(reason) => return path_error(stream, reason),
                    }
                };
                let after = match after.as_deref().map(RelPath::parse).transpose() {
                    Ok(a) => a,
                    Err(reason) => return path_error(stream, reason),
                };
                serve(stream, Request::List { dir, after })
            }
            Message::Download { path } => match RelPath::parse(&path) {
                Ok(path) => serve(stream, Request::Download { path }),
                Err(reason) => path_error(stream, reason),
            },
            Message::Delete { path } => match RelPath::parse(&path) {
                Ok(path) => serve(stream, Request::Delete { path }),
                Err(reason) => path_error(stream, reason),
            },
            Message::Status => serve(stream, Request::Status),
            Message::Error {
                upload: Some(upload),
                error,
            } => {
                // The client gives up on an upload.
                match self.uploads.get_mut(&upload) {
                    Some((_, session)) => {
                        let actions = session.abort(error);
                        self.map_actions(upload, actions)
                    }
                    None => Vec::new(),
                }
            }
            Message::Error { upload: None, .. } => Vec::new(),
            other => self.close(stream, WireError::UnexpectedMessage { got: other.kind() }),
        }
    }

    /// A `Chunk` frame that arrived on `stream`, decoded by the adapter
    /// itself, with `actual` the BLAKE3 of `data` as the adapter computed it
    /// (so the hashing of parallel streams runs in parallel, off the task
    /// that owns this machine). Same outcome as [`Self::handle`] with the
    /// `Message::Chunk`: the chunk is accepted only if `actual` is its hash.
    pub fn handle_hashed_chunk(
        &mut self,
        stream: S,
        upload: UploadId,
        hash: Hash,
        data: Vec<u8>,
        actual: Hash,
        now: Instant,
    ) -> Vec<ConnAction<S>> {
        match self.phase {
            Phase::Closed => return Vec::new(),
            Phase::AwaitingHello => {
                return self.handle_hello(stream, Message::Chunk { upload, hash, data })
            }
            Phase::Ready => {}
        }
        match self.uploads.get_mut(&upload) {
            Some((_, session)) => {
                let actions = session.handle_hashed_chunk(hash, data, actual, now);
                self.map_actions(upload, actions)
            }
            // A straggler for an upload that already ended: drop it.
            None if upload.0 < self.next_upload => Vec::new(),
            None => self.close(stream, WireError::UnknownUpload { upload }),
        }
    }

    /// The adapter stored a chunk of `upload`.
    pub fn chunk_written(
        &mut self,
        upload: UploadId,
        hash: Hash,
        now: Instant,
    ) -> Vec<ConnAction<S>> {
        match self.uploads.get_mut(&upload) {
            Some((_, session)) => {
                let actions = session.chunk_written(hash, now);
                self.map_actions(upload, actions)
            }
            None => Vec::new(),
        }
    }

    /// The adapter failed to store a chunk of `upload`.
    pub fn chunk_write_failed(
        &mut self,
        upload: UploadId,
        hash: Hash,
        failure: StorageFailure,
    ) -> Vec<ConnAction<S>> {
        match self.uploads.get_mut(&upload) {
            Some((_, session)) => {
                let actions = session.chunk_write_failed(hash, failure);
                self.map_actions(upload, actions)
            }
            None => Vec::new(),
        }
    }

    /// The adapter finished assembling `upload`.
    pub fn assembled(
        &mut self,
        upload: UploadId,
        result: Result<(), AssembleFailure>,
    ) -> Vec<ConnAction<S>> {
        match self.uploads.get_mut(&upload) {
            Some((_, session)) => {
                let actions = session.assembled(result);
                self.map_actions(upload, actions)
            }
            None => Vec::new(),
        }
    }

    /// The earliest upload deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.uploads
            .values()
            .filter_map(|(_, s)| s.poll_timeout())
            .min()
    }

    /// Times out every upload whose client has been idle too long.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<ConnAction<S>> {
        let mut ids: Vec<UploadId> = self.uploads.keys().copied().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            if let Some((_, session)) = self.uploads.get_mut(&id) {
                let actions = session.handle_timeout(now);
                out.extend(self.map_actions(id, actions));
            }
        }
        out
    }

    /// A stream was closed or reset by the peer: uploads controlled by it end.
    pub fn stream_closed(&mut self, stream: S) -> Vec<ConnAction<S>> {
        self.end_uploads_of(stream, |session| {
            session.abort(WireError::Cancelled {
                detail: "upload stream closed by the client".into(),
            })
        })
    }

    /// Reading a stream failed while its client may still be listening
    /// (it stalled in the middle of a frame, or ended in one): the uploads
    /// it controls end with `error`, each told to the client on it.
    pub fn stream_failed(&mut self, stream: S, error: &WireError) -> Vec<ConnAction<S>> {
        self.end_uploads_of(stream, |session| session.give_up(error.clone()))
    }

    /// Ends each upload `stream` controls, in id order, with `end`.
    fn end_uploads_of(
        &mut self,
        stream: S,
        mut end: impl FnMut(&mut ServerUpload) -> Vec<ServerAction>,
    ) -> Vec<ConnAction<S>> {
        let mut ids: Vec<UploadId> = self
            .uploads
            .iter()
            .filter(|(_, (s, _))| *s == stream)
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            if let Some((_, session)) = self.uploads.get_mut(&id) {
                let actions = end(session);
                out.extend(self.map_actions(id, actions));
            }
        }
        out
    }

    /// The connection ended: every open upload fails.
    pub fn connection_closed(&mut self, error: &WireError) -> Vec<ConnAction<S>> {
        self.phase = Phase::Closed;
        self.abort_all(error)
    }

    fn handle_hello(&mut self, stream: S, message: Message) -> Vec<ConnAction<S>> {
        let Message::Hello(hello) = message else {
            return self.close(
                stream,
                WireError::UnexpectedMessage {
                    got: message.kind(),
                },
            );
        };
        if hello.agent.len() > MAX_TEXT_LEN {
            return self.close(
                stream,
                WireError::TextTooLong {
                    len: hello.agent.len() as u64,
                    max: u32::try_from(MAX_TEXT_LEN).unwrap_or(u32::MAX),
                },
            );
        }
        match negotiate_version(&hello) {
            Ok(version) => {
                self.phase = Phase::Ready;
                self.version = Some(version);
                vec![ConnAction::Send {
                    stream,
                    message: Message::Welcome(Welcome {
                        version,
                        max_frame_len: MAX_FRAME_LEN,
                        max_chunks_per_manifest: MAX_CHUNKS_PER_MANIFEST,
                        max_file_size: MAX_FILE_SIZE,
                    }),
                }]
            }
            Err(error) => self.close(stream, error),
        }
    }

    fn close(&mut self, stream: S, error: WireError) -> Vec<ConnAction<S>> {
        self.phase = Phase::Closed;
        let mut actions = self.abort_all(&error);
        actions.push(ConnAction::Close { stream, error });
        actions
    }

    fn abort_all(&mut self, error: &WireError) -> Vec<ConnAction<S>> {
        let mut ids: Vec<UploadId> = self.uploads.keys().copied().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            if let Some((_, mut session)) = self.uploads.remove(&id) {
                if let Some(n) = self.listed.remove(&id) {
                    self.listed_total -= n;
                }
                for action in session.abort(error.clone()) {
                    if let ServerAction::Finished(outcome) = action {
                        out.push(ConnAction::UploadFinished {
                            upload: id,
                            outcome,
                        });
                    }
                }
            }
        }
        out
    }

    fn map_actions(&mut self, id: UploadId, actions: Vec<ServerAction>) -> Vec<ConnAction<S>> {
        let Some(&(stream, _)) = self.uploads.get(&id) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(actions.len());
        for action in actions {
            out.push(match action {
                ServerAction::Reply(message) => ConnAction::Send { stream, message },
                ServerAction::WriteChunk { hash, data } => ConnAction::WriteChunk {
                    upload: id,
                    hash,
                    data,
                },
                ServerAction::Assemble(request) => ConnAction::Assemble(request),
                ServerAction::Finished(outcome) => {
                    self.forget_upload(id);
                    ConnAction::UploadFinished {
                        upload: id,
                        outcome,
                    }
                }
            });
        }
        out
    }
}

fn serve<S>(stream: S, request: Request) -> Vec<ConnAction<S>> {
    vec![ConnAction::Serve { stream, request }]
}

fn send_error<S>(stream: S, upload: Option<UploadId>, error: WireError) -> ConnAction<S> {
    ConnAction::Send {
        stream,
        message: Message::Error { upload, error },
    }
}

fn path_error<S>(stream: S, reason: crate::path::PathRejection) -> Vec<ConnAction<S>> {
    vec![send_error(stream, None, WireError::PathRejected { reason })]
}

/// The client's opening message.
pub fn client_hello(agent: &str) -> Message {
    let mut agent = agent.to_owned();
    agent = crate::server::bounded(agent);
    Message::Hello(crate::message::Hello {
        min_version: crate::message::MIN_PROTOCOL_VERSION,
        max_version: crate::message::PROTOCOL_VERSION,
        agent,
    })
}

/// Checks the server's answer to [`client_hello`].
pub fn check_welcome(message: Message) -> Result<Welcome, crate::client::ClientError> {
    use crate::client::ClientError;
    match message {
        Message::Welcome(w)
            if (crate::message::MIN_PROTOCOL_VERSION..=crate::message::PROTOCOL_VERSION)
                .contains(&w.version) =>
        {
            Ok(w)
        }
        Message::Welcome(w) => Err(ClientError::Server(WireError::VersionMismatch {
            client_min: crate::message::MIN_PROTOCOL_VERSION,
            client_max: crate::message::PROTOCOL_VERSION,
            server_min: w.version,
            server_max: w.version,
        })),
        Message::Error { error, .. } => Err(ClientError::Server(error)),
        other => Err(ClientError::UnexpectedMessage(other.kind())),
    }
}
