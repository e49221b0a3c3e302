//! The client library behind `appliance-sync`: connect with a bundle, push
//! (resumable, deduplicated, chunks over several streams), pull (verified),
//! list, delete, status.
//!
//! Resumption needs no client state: the manifest of a file is recomputed
//! on every push and the server answers with the chunks it lacks, so an
//! interrupted push simply sends less the next time.

use crate::digest::{DigestCache, FileKey};
use crate::identity::{Bundle, BundleError};
use crate::tls::{client_crypto, server_name, TlsError};
use crate::wire::{read_frame, write_frame, WireIoError};
use appliance_sync_proto::limits::IDLE_TIMEOUT;
use appliance_sync_proto::message::{ListEntry, Mtime, StatusReply};
use appliance_sync_proto::{
    check_welcome, client_hello, ChunkRef, ClientAction, ClientUpload, DownloadCheck, DownloadStep,
    Message, RelPath, WireError,
};
use parking_lot::Mutex;
use quinn::{Connection, Endpoint, SendStream};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Client failures, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no server address: the bundle has none; pass --server HOST:PORT")]
    NoServer,
    #[error("cannot resolve {server}: {detail}")]
    Resolve { server: String, detail: String },
    #[error("cannot connect to {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error("the appliance refused this device or the connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{context}: {error}")]
    Server { context: String, error: WireError },
    #[error("{context}: {error}")]
    Protocol {
        context: String,
        error: appliance_sync_proto::ClientError,
    },
    #[error("{context}: {error}")]
    Wire { context: String, error: WireIoError },
    #[error("{path}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    LocalPath { path: PathBuf, detail: String },
    #[error("{context}: the server sent an unexpected {got:?} message")]
    Unexpected {
        context: String,
        got: appliance_sync_proto::MessageKind,
    },
}

impl ClientError {
    /// The server's typed error, if that is what this is.
    pub fn wire_error(&self) -> Option<&WireError> {
        match self {
            ClientError::Server { error, .. } => Some(error),
            ClientError::Protocol {
                error: appliance_sync_proto::ClientError::Server(error),
                ..
            } => Some(error),
            _ => None,
        }
    }
}

fn wire(context: &str) -> impl FnOnce(WireIoError) -> ClientError + '_ {
    move |error| ClientError::Wire {
        context: context.to_owned(),
        error,
    }
}

/// Progress callbacks (the binary draws bars or prints lines).
pub trait Progress: Send + Sync {
    /// A file is about to be sent: `to_send` bytes of its `size` are missing.
    fn file_started(&self, path: &str, size: u64, to_send: u64);
    /// `bytes` more bytes of `path` were sent.
    fn sent(&self, path: &str, bytes: u64);
    /// The file is committed (or failed).
    fn file_finished(&self, path: &str, ok: bool);
}

/// No progress output.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn file_started(&self, _: &str, _: u64, _: u64) {}
    fn sent(&self, _: &str, _: u64) {}
    fn file_finished(&self, _: &str, _: bool) {}
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Extra unidirectional streams per file for its chunks. Several streams
    /// keep one lost packet from stalling every chunk behind it.
    pub chunk_streams: usize,
    /// Files pushed at once (at most the server's per-connection upload limit).
    pub parallel_files: usize,
    /// Keep-alive interval, well below the server's idle timeout.
    pub keep_alive: Duration,
    /// Where to persist file digests between runs (see [`crate::digest`]);
    /// `None` keeps them in memory for this client only.
    pub digest_cache: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            chunk_streams: 4,
            // The protocol's per-connection upload limit: small files are
            // latency-bound (a round trip and an fsync each), so as many
            // run at once as the server accepts (fewer if it negotiated
            // protocol version 1, see `push`).
            parallel_files: appliance_sync_proto::limits::MAX_UPLOADS_PER_CONNECTION_V2 as usize,
            keep_alive: Duration::from_secs(10),
            digest_cache: None,
        }
    }
}

/// Result of pushing one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    pub local: PathBuf,
    pub path: String,
    pub size: u64,
    pub file_hash: String,
    pub chunks: u32,
    pub chunks_sent: u32,
    pub bytes_sent: u64,
    pub chunks_rejected: u32,
}

impl PushReport {
    /// Whether every chunk was already on the appliance (nothing was sent).
    pub fn deduplicated(&self) -> bool {
        self.chunks > 0 && self.chunks_sent == 0
    }
}

/// What happened to one file (or one entry of a pushed directory) in
/// [`SyncClient::push_each`].
#[derive(Debug)]
pub enum PushOutcome {
    /// Committed on the appliance.
    Pushed(PushReport),
    /// The upload failed; nothing of it is visible on the appliance.
    Failed {
        local: PathBuf,
        path: String,
        error: ClientError,
    },
    /// Not sent: the entry cannot be stored (a name the appliance reserves
    /// or refuses, a socket, FIFO or device, something unreadable).
    Skipped { local: PathBuf, reason: String },
}

impl PushOutcome {
    /// The local path this outcome is about.
    pub fn local(&self) -> &Path {
        match self {
            Self::Pushed(r) => &r.local,
            Self::Failed { local, .. } | Self::Skipped { local, .. } => local,
        }
    }

    /// `committed`, `deduplicated`, `failed` or `skipped`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Pushed(r) if r.deduplicated() => "deduplicated",
            Self::Pushed(_) => "committed",
            Self::Failed { .. } => "failed",
            Self::Skipped { .. } => "skipped",
        }
    }

    /// Whether the file is on the appliance.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Pushed(_))
    }

    /// The outcome as one JSON object: `local`, `status`, and either the
    /// report's fields or `error` (failed, with `path`) / `reason`
    /// (skipped).
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = match self {
            Self::Pushed(r) => serde_json::to_value(r).unwrap_or_default(),
            Self::Failed { local, path, error } => serde_json::json!({
                "local": local,
                "path": path,
                "error": error.to_string(),
            }),
            Self::Skipped { local, reason } => serde_json::json!({
                "local": local,
                "reason": reason,
            }),
        };
        if let Some(object) = value.as_object_mut() {
            object.insert("status".into(), self.status().into());
        }
        value
    }
}

/// Result of pulling one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PullReport {
    pub path: String,
    pub local: PathBuf,
    pub size: u64,
    pub file_hash: String,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct SyncClient {
    endpoint: Endpoint,
    conn: Connection,
    options: ClientOptions,
    digests: Arc<DigestCache>,
    /// The protocol version the server agreed to (its upload limit
    /// depends on it).
    version: u16,
}

impl SyncClient {
    /// Connects to `server` (or the bundle's address) and says hello.
    pub async fn connect(
        bundle: &Bundle,
        server: Option<&str>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let server = server
            .map(str::to_owned)
            .or_else(|| bundle.server.clone())
            .ok_or(ClientError::NoServer)?;
        let addr = resolve(&server).await?;
        let crypto = client_crypto(bundle)?;
        let mut config = quinn::ClientConfig::new(crypto);
        let mut transport =
            crate::server::transport_config(64, Duration::from_secs(60)).map_err(|detail| {
                ClientError::Connect {
                    server: server.clone(),
                    detail,
                }
            })?;
        transport.keep_alive_interval(Some(options.keep_alive));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let connect_err = |detail: String| ClientError::Connect {
            server: server.clone(),
            detail,
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(|e| connect_err(e.to_string()))?;
        crate::server::set_udp_buffers(&socket);
        let runtime =
            quinn::default_runtime().ok_or_else(|| connect_err("no async runtime".into()))?;
        let mut endpoint = Endpoint::new(crate::server::endpoint_config(), None, socket, runtime)
            .map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(addr, server_name(bundle))
            .map_err(|e| connect_err(e.to_string()))?
            .await?;
        let digests = Arc::new(match &options.digest_cache {
            Some(path) => DigestCache::load(path),
            None => DigestCache::in_memory(),
        });
        let mut client = Self {
            endpoint,
            conn,
            options,
            digests,
            version: 1,
        };
        client.version = client.hello().await?;
        Ok(client)
    }

    /// Says hello; returns the negotiated protocol version.
    async fn hello(&self) -> Result<u16, ClientError> {
        let context = "hello";
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &client_hello(concat!("appliance-sync ", env!("CARGO_PKG_VERSION"))),
        )
        .await
        .map_err(wire(context))?;
        let _ = send.finish();
        let reply = self.read_reply(&mut recv, context).await?;
        let welcome = check_welcome(reply).map_err(|error| ClientError::Protocol {
            context: context.into(),
            error,
        })?;
        Ok(welcome.version)
    }

    async fn read_reply(
        &self,
        recv: &mut quinn::RecvStream,
        context: &str,
    ) -> Result<Message, ClientError> {
        match read_frame(recv, IDLE_TIMEOUT).await {
            Ok(Some((message, _))) => Ok(message),
            Ok(None) => Err(self.closed_error(context)),
            Err(e) => {
                if let Some(reason) = self.conn.close_reason() {
                    return Err(ClientError::Connection(reason));
                }
                Err(wire(context)(e))
            }
        }
    }

    fn closed_error(&self, context: &str) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => ClientError::Connection(reason),
            None => ClientError::Wire {
                context: context.into(),
                error: WireIoError::NoAnswer,
            },
        }
    }

    /// The protocol version the server agreed to.
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// UDP payload bytes this client has sent so far (QUIC's own counter).
    pub fn wire_bytes_sent(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }

    /// The connection's path statistics (MTU found, packets lost, RTT).
    pub fn path_stats(&self) -> quinn::PathStats {
        self.conn.stats().path
    }

    /// Closes the connection and waits for the close to be sent.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }

    /// One request/answer exchange on a fresh stream.
    async fn request(&self, message: &Message, context: &str) -> Result<Message, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(&mut send, message)
            .await
            .map_err(wire(context))?;
        let _ = send.finish();
        match self.read_reply(&mut recv, context).await? {
            Message::Error { error, .. } => Err(ClientError::Server {
                context: context.into(),
                error,
            }),
            other => Ok(other),
        }
    }

    /// Every file below `dir` (or the root), with sizes, hashes and mtimes.
    pub async fn list(&self, dir: Option<&str>) -> Result<Vec<ListEntry>, ClientError> {
        let context = format!("ls {}", dir.unwrap_or("/"));
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let request = Message::List {
                dir: dir.unwrap_or("").to_owned(),
                after: after.clone(),
            };
            match self.request(&request, &context).await? {
                Message::ListReply { entries, more } => {
                    after = entries.last().map(|e| e.path.clone());
                    out.extend(entries);
                    if !more || after.is_none() {
                        return Ok(out);
                    }
                }
                other => {
                    return Err(ClientError::Unexpected {
                        context,
                        got: other.kind(),
                    })
                }
            }
        }
    }

    /// Deletes a remote file.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let context = format!("rm {path}");
        match self
            .request(&Message::Delete { path: path.into() }, &context)
            .await?
        {
            Message::Deleted { .. } => Ok(()),
            other => Err(ClientError::Unexpected {
                context,
                got: other.kind(),
            }),
        }
    }

    /// Quota and usage.
    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        let context = "status";
        match self.request(&Message::Status, context).await? {
            Message::StatusReply(s) => Ok(s),
            other => Err(ClientError::Unexpected {
                context: context.into(),
                got: other.kind(),
            }),
        }
    }

    /// Pushes files and directories (recursively) under `to`, stopping at
    /// nothing: every file is tried. `Ok` with a report per file if all
    /// were committed; otherwise, once all were tried, the error of the
    /// first (in argument and directory order) that failed or was skipped.
    /// [`Self::push_each`] says what happened to each.
    pub async fn push(
        &self,
        paths: &[PathBuf],
        to: Option<&RelPath>,
        progress: Arc<dyn Progress>,
    ) -> Result<Vec<PushReport>, ClientError> {
        let mut reports = Vec::new();
        for outcome in self.push_each(paths, to, progress).await {
            match outcome {
                PushOutcome::Pushed(report) => reports.push(report),
                PushOutcome::Failed { error, .. } => return Err(error),
                PushOutcome::Skipped { local, reason } => {
                    return Err(ClientError::LocalPath {
                        path: local,
                        detail: reason,
                    })
                }
            }
        }
        Ok(reports)
    }

    /// Pushes files and directories (recursively) under `to` and says what
    /// happened to each file, in argument and directory order. An entry
    /// that cannot be stored (see [`PushOutcome::Skipped`]) is skipped and
    /// the rest pushed; a file that fails does not stop the others.
    /// Symbolic links are not followed and not reported (a warning is
    /// logged).
    pub async fn push_each(
        &self,
        paths: &[PathBuf],
        to: Option<&RelPath>,
        progress: Arc<dyn Progress>,
    ) -> Vec<PushOutcome> {
        let mut entries = Vec::new();
        for path in paths {
            collect_files(path, to, &mut entries);
        }
        let server_limit = appliance_sync_proto::limits::max_uploads(self.version) as usize;
        let limit = Arc::new(tokio::sync::Semaphore::new(
            self.options.parallel_files.clamp(1, server_limit),
        ));
        // The server also bounds the chunks its open uploads list together.
        let listed = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(appliance_sync_proto::limits::MAX_OPEN_MANIFEST_CHUNKS)
                .unwrap_or(usize::MAX >> 4),
        ));
        let mut outcomes: Vec<Option<PushOutcome>> = Vec::with_capacity(entries.len());
        let mut remotes = HashMap::new();
        let mut set = tokio::task::JoinSet::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let (local, remote) = match entry {
                Entry::Skip { local, reason } => {
                    outcomes.push(Some(PushOutcome::Skipped { local, reason }));
                    continue;
                }
                Entry::File { local, remote } => (local, remote),
            };
            outcomes.push(None);
            remotes.insert(index, (local.clone(), remote.to_string()));
            let client = self.clone();
            let progress = progress.clone();
            let limit = limit.clone();
            let listed = listed.clone();
            set.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let pushed = client
                    .push_file_within(&local, &remote, progress, Some(&listed))
                    .await;
                (index, pushed)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (index, outcome) = match joined {
                Ok((index, Ok(report))) => (index, PushOutcome::Pushed(report)),
                Ok((index, Err(error))) => {
                    let (local, path) = remotes.remove(&index).unwrap_or_default();
                    (index, PushOutcome::Failed { local, path, error })
                }
                Err(e) => {
                    // A panicked upload task: its file is the one not
                    // reported yet (the slot is filled below).
                    tracing::warn!(error = %e, "push task failed");
                    continue;
                }
            };
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = Some(outcome);
            }
        }
        let digests = self.digests.clone();
        let saved = tokio::task::spawn_blocking(move || digests.save()).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(error = %e, "cannot save the digest cache");
        }
        outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| {
                outcome.unwrap_or_else(|| {
                    let (local, path) = remotes.remove(&index).unwrap_or_default();
                    PushOutcome::Failed {
                        error: ClientError::LocalPath {
                            path: local.clone(),
                            detail: "push task failed".into(),
                        },
                        local,
                        path,
                    }
                })
            })
            .collect()
    }

    /// Pushes one local file to `remote`.
    pub async fn push_file(
        &self,
        local: &Path,
        remote: &RelPath,
        progress: Arc<dyn Progress>,
    ) -> Result<PushReport, ClientError> {
        self.push_file_within(local, remote, progress, None).await
    }

    /// [`Self::push_file`]; with `listed`, the upload first takes one permit
    /// per chunk its manifest lists and holds them until it ends (the
    /// server's [`MAX_OPEN_MANIFEST_CHUNKS`] bound on a connection's open
    /// uploads).
    ///
    /// [`MAX_OPEN_MANIFEST_CHUNKS`]: appliance_sync_proto::limits::MAX_OPEN_MANIFEST_CHUNKS
    async fn push_file_within(
        &self,
        local: &Path,
        remote: &RelPath,
        progress: Arc<dyn Progress>,
        listed: Option<&tokio::sync::Semaphore>,
    ) -> Result<PushReport, ClientError> {
        let context = format!("push {}", remote);
        let local_err = |source: std::io::Error| ClientError::Local {
            path: local.to_path_buf(),
            source,
        };
        let path = local.to_path_buf();
        let digests = self.digests.clone();
        let (file, digest, mtime, key) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)?;
            let meta = file.metadata()?;
            let mtime = Mtime::from_system_time(meta.modified()?);
            // Taken before the digest: any write after it changes the key,
            // which the chunk senders check (see `chunk_worker`).
            let key = FileKey::of(&meta);
            let (digest, _cached) = digests.digest(&file)?;
            Ok::<_, std::io::Error>((file, digest, mtime, key))
        })
        .await
        .map_err(|e| local_err(std::io::Error::other(e.to_string())))?
        .map_err(local_err)?;
        // One descriptor shared by the chunk workers; each read is a seek
        // and a read under the lock (see `append_chunk`).
        let file = Arc::new(Mutex::new(file));
        let manifest = digest.to_manifest(remote, mtime);
        let _listed = match listed {
            Some(budget) => {
                // Clamped: an oversized manifest must reach the server to
                // be refused, not wait here forever.
                let max = appliance_sync_proto::limits::MAX_OPEN_MANIFEST_CHUNKS;
                let n = u32::try_from((manifest.chunks.len() as u64).min(max)).unwrap_or(u32::MAX);
                budget.acquire_many(n).await.ok()
            }
            None => None,
        };
        let (machine, upload_msg) =
            ClientUpload::new(manifest, Instant::now()).map_err(|error| ClientError::Protocol {
                context: context.clone(),
                error,
            })?;
        let machine = Arc::new(Mutex::new(machine));
        let (mut control_send, mut control_recv) = self.conn.open_bi().await?;
        write_frame(&mut control_send, &upload_msg)
            .await
            .map_err(wire(&context))?;
        let control_send = Arc::new(tokio::sync::Mutex::new(control_send));

        // Replies arrive on their own task so the wait below can also watch
        // the machine's idle deadline without cancelling a read mid-frame.
        let (reply_tx, mut reply_rx) = mpsc::channel::<Result<Message, WireIoError>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let next = read_frame(&mut control_recv, IDLE_TIMEOUT * 4).await;
                let done = !matches!(next, Ok(Some(_)));
                let item = match next {
                    Ok(Some((m, _))) => Ok(m),
                    Ok(None) => Err(WireIoError::NoAnswer),
                    Err(e) => Err(e),
                };
                if reply_tx.send(item).await.is_err() || done {
                    return;
                }
            }
        });

        let (chunk_tx, chunk_rx) = mpsc::unbounded_channel::<ChunkRef>();
        let chunk_rx = Arc::new(tokio::sync::Mutex::new(chunk_rx));
        let (fail_tx, mut fail_rx) = mpsc::channel::<ClientError>(4);
        let mut workers = Vec::new();
        let mut chunk_tx = Some(chunk_tx);
        let path_str = remote.to_string();
        let mut started = false;
        let result: Result<(), ClientError> = loop {
            let deadline = machine.lock().poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            let actions = tokio::select! {
                reply = reply_rx.recv() => match reply {
                    Some(Ok(message)) => machine.lock().handle(message, Instant::now()),
                    Some(Err(e)) => break Err(match self.conn.close_reason() {
                        Some(reason) => ClientError::Connection(reason),
                        None => wire(&context)(e),
                    }),
                    None => break Err(self.closed_error(&context)),
                },
                Some(error) = fail_rx.recv() => break Err(error),
                () = sleep => machine.lock().handle_timeout(Instant::now()),
            };
            let mut outcome = None;
            let sends: Vec<ChunkRef> = actions
                .iter()
                .filter_map(|a| match a {
                    ClientAction::SendChunk { chunk, .. } => Some(*chunk),
                    _ => None,
                })
                .collect();
            if !started
                && (!sends.is_empty()
                    || actions
                        .iter()
                        .any(|a| matches!(a, ClientAction::Committed(_))))
            {
                started = true;
                let to_send: u64 = sends.iter().map(|c| u64::from(c.len)).sum();
                progress.file_started(&path_str, digest.size, to_send);
                // Small uploads go on the control stream; larger ones fan
                // out over extra streams.
                let streams = if sends.len() <= 2 {
                    0
                } else {
                    self.options.chunk_streams.min(sends.len())
                };
                for _ in 0..streams.max(1) {
                    let target = if streams == 0 {
                        ChunkTarget::Control(control_send.clone())
                    } else {
                        match self.conn.open_uni().await {
                            Ok(s) => ChunkTarget::Own(s),
                            Err(e) => {
                                outcome = Some(Err(ClientError::Connection(e)));
                                break;
                            }
                        }
                    };
                    workers.push(tokio::spawn(chunk_worker(
                        target,
                        chunk_rx.clone(),
                        machine.clone(),
                        file.clone(),
                        key,
                        fail_tx.clone(),
                        progress.clone(),
                        path_str.clone(),
                        context.clone(),
                    )));
                }
            }
            for action in actions {
                match action {
                    ClientAction::SendChunk { chunk, .. } => {
                        if let Some(tx) = &chunk_tx {
                            let _ = tx.send(chunk);
                        }
                    }
                    ClientAction::ChunkRejected { hash } => {
                        tracing::warn!(%hash, path = %path_str, "server rejected a chunk; resending");
                    }
                    ClientAction::Committed(_) => outcome = Some(Ok(())),
                    ClientAction::Failed(error) => {
                        outcome = Some(Err(match error {
                            appliance_sync_proto::ClientError::Server(error) => {
                                ClientError::Server {
                                    context: context.clone(),
                                    error,
                                }
                            }
                            error => ClientError::Protocol {
                                context: context.clone(),
                                error,
                            },
                        }));
                    }
                }
            }
            if let Some(outcome) = outcome {
                break outcome;
            }
        };
        // Stop the workers (they finish their streams) and the reader.
        chunk_tx.take();
        for w in workers {
            if result.is_err() {
                w.abort();
            }
            let _ = w.await;
        }
        reader.abort();
        {
            let mut send = control_send.lock().await;
            if result.is_err() {
                let _ = send.reset(0u32.into());
            } else {
                let _ = send.finish();
            }
        }
        progress.file_finished(&path_str, result.is_ok());
        result?;
        let stats = machine.lock().stats();
        Ok(PushReport {
            local: local.to_path_buf(),
            path: path_str,
            size: digest.size,
            file_hash: digest.file_hash.to_string(),
            chunks: u32::try_from(digest.chunks.len()).unwrap_or(u32::MAX),
            chunks_sent: stats.chunks_sent,
            bytes_sent: stats.bytes_sent,
            chunks_rejected: stats.chunks_rejected,
        })
    }

    /// Downloads `remote` to `local` (a file path, or a directory to put it
    /// in; default: the current directory). Each chunk and the whole file
    /// are verified before the file is renamed into place.
    pub async fn pull(
        &self,
        remote: &str,
        local: Option<&Path>,
    ) -> Result<PullReport, ClientError> {
        let context = format!("pull {remote}");
        let remote_path = RelPath::parse(remote).map_err(|reason| ClientError::Server {
            context: context.clone(),
            error: WireError::PathRejected { reason },
        })?;
        let target = match local {
            None => PathBuf::from(remote_path.file_name()),
            Some(p) if p.is_dir() => p.join(remote_path.file_name()),
            Some(p) => p.to_path_buf(),
        };
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &Message::Download {
                path: remote.to_owned(),
            },
        )
        .await
        .map_err(wire(&context))?;
        let _ = send.finish();
        let manifest = match self.read_reply(&mut recv, &context).await? {
            Message::DownloadBegin(m) => m,
            Message::Error { error, .. } => return Err(ClientError::Server { context, error }),
            other => {
                return Err(ClientError::Unexpected {
                    context,
                    got: other.kind(),
                })
            }
        };
        let protocol = |error| ClientError::Protocol {
            context: context.clone(),
            error,
        };
        let mut check = DownloadCheck::new(&remote_path, manifest).map_err(protocol)?;
        let size = check.manifest().size;
        let file_hash = check.manifest().file_hash;
        let mtime = check.manifest().mtime;
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = target.file_name().map_or_else(
            || remote_path.file_name().to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let tmp = dir.join(format!(".{name}.appliance-sync-partial"));
        let local_err = |source| ClientError::Local {
            path: tmp.clone(),
            source,
        };
        let file = std::fs::File::create(&tmp).map_err(local_err)?;
        let result: Result<(), ClientError> = async {
            let mut complete = check.is_complete().map_err(protocol)?;
            while !complete {
                let message = self.read_reply(&mut recv, &context).await?;
                let (hash, data) = match message {
                    Message::DownloadChunk { hash, data } => (hash, data),
                    Message::Error { error, .. } => {
                        return Err(ClientError::Server {
                            context: context.clone(),
                            error,
                        })
                    }
                    other => {
                        return Err(ClientError::Unexpected {
                            context: context.clone(),
                            got: other.kind(),
                        })
                    }
                };
                let (offset, data, last) = match check.chunk(hash, data).map_err(protocol)? {
                    DownloadStep::Write { offset, data } => (offset, data, false),
                    DownloadStep::Finish { offset, data } => (offset, data, true),
                };
                file.write_all_at(&data, offset).map_err(local_err)?;
                complete = last;
            }
            file.set_modified(crate::client::system_time(mtime))
                .map_err(local_err)?;
            file.sync_all().map_err(local_err)?;
            std::fs::rename(&tmp, &target).map_err(|source| ClientError::Local {
                path: target.clone(),
                source,
            })?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        Ok(PullReport {
            path: remote.to_owned(),
            local: target,
            size,
            file_hash: file_hash.to_string(),
        })
    }
}

pub(crate) fn system_time(mtime: Mtime) -> std::time::SystemTime {
    let nanos = Duration::from_nanos(u64::from(mtime.nanos));
    let base = std::time::UNIX_EPOCH;
    if mtime.secs >= 0 {
        base + Duration::from_secs(mtime.secs.unsigned_abs()) + nanos
    } else {
        base - Duration::from_secs(mtime.secs.unsigned_abs()) + nanos
    }
}

async fn resolve(server: &str) -> Result<SocketAddr, ClientError> {
    let resolve_err = |detail: String| ClientError::Resolve {
        server: server.to_owned(),
        detail,
    };
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .map_err(|e| resolve_err(e.to_string()))?;
    addrs.next().ok_or_else(|| resolve_err("no address".into()))
}

/// One entry found by [`collect_files`]. A file goes to `to/<name>`; a
/// directory `d` to `to/d/...`, recursively. Symlinks are skipped (their
/// targets may lie anywhere), with a warning.
enum Entry {
    File { local: PathBuf, remote: RelPath },
    Skip { local: PathBuf, reason: String },
}

/// The files below `path` (itself if a file) with their remote paths under
/// `to`, in directory order; an entry that cannot be pushed (no usable
/// name, a name the appliance refuses, not a file or directory, unreadable)
/// becomes an [`Entry::Skip`] saying why, and the walk goes on.
fn collect_files(path: &Path, to: Option<&RelPath>, out: &mut Vec<Entry>) {
    let skip = |reason: String| Entry::Skip {
        local: path.to_path_buf(),
        reason,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return out.push(skip(format!("cannot read it: {e}"))),
    };
    if meta.file_type().is_symlink() {
        tracing::warn!(path = %path.display(), "skipping symlink");
        return;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return out.push(skip("has no usable UTF-8 file name".into()));
    };
    let remote = match to {
        Some(dir) => RelPath::parse(&format!("{dir}/{name}")),
        None => RelPath::parse(name),
    };
    let remote = match remote {
        Ok(remote) => remote,
        Err(reason) => {
            return out.push(skip(format!("cannot be stored under that name: {reason}")))
        }
    };
    if meta.is_file() {
        return out.push(Entry::File {
            local: path.to_path_buf(),
            remote,
        });
    }
    if !meta.is_dir() {
        let kind = meta.file_type();
        let what = if kind.is_socket() {
            "a socket"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return out.push(skip(format!(
            "is {what}; only regular files and directories are pushed"
        )));
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => return out.push(skip(format!("cannot read the directory: {e}"))),
    };
    entries.sort();
    for entry in entries {
        collect_files(&entry, Some(&remote), out);
    }
}

enum ChunkTarget {
    Control(Arc<tokio::sync::Mutex<SendStream>>),
    Own(SendStream),
}

/// Sends requested chunks from `queue` on `target` until the queue closes.
/// Each chunk is read from the file straight behind its frame prefix and
/// handed to quinn as one buffer (no copy, no second BLAKE3 pass: the server
/// verifies every chunk and the whole file). A file whose key (size, mtime,
/// ctime, inode) differs from `key`, taken before its manifest was computed,
/// has changed since: the push fails with "file changed" instead of sending
/// bytes the server would refuse.
#[allow(clippy::too_many_arguments)]
async fn chunk_worker(
    mut target: ChunkTarget,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ChunkRef>>>,
    machine: Arc<Mutex<ClientUpload>>,
    file: Arc<Mutex<std::fs::File>>,
    key: FileKey,
    fail: mpsc::Sender<ClientError>,
    progress: Arc<dyn Progress>,
    path: String,
    context: String,
) {
    loop {
        let next = queue.lock().await.recv().await;
        let Some(chunk) = next else { break };
        let prefix = machine.lock().chunk_frame_prefix(&chunk);
        let prefix = match prefix {
            Ok(p) => p,
            Err(error) => {
                let _ = fail
                    .send(ClientError::Protocol {
                        context: context.clone(),
                        error,
                    })
                    .await;
                return;
            }
        };
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut frame = prefix;
            let file = f.lock();
            append_chunk(&file, chunk.offset, chunk.len, &mut frame)?;
            let unchanged = FileKey::of(&file.metadata()?) == key;
            Ok::<_, std::io::Error>((frame, unchanged))
        })
        .await;
        let frame = match read {
            Ok(Ok((frame, true))) => frame,
            Ok(Ok((_, false))) => {
                let _ = fail
                    .send(ClientError::Protocol {
                        context: context.clone(),
                        error: appliance_sync_proto::ClientError::FileChanged {
                            offset: chunk.offset,
                        },
                    })
                    .await;
                return;
            }
            Ok(Err(e)) => {
                let _ = fail
                    .send(ClientError::LocalPath {
                        path: PathBuf::from(&path),
                        detail: format!("reading chunk at {}: {e}", chunk.offset),
                    })
                    .await;
                return;
            }
            Err(_) => return,
        };
        let written = match &mut target {
            ChunkTarget::Control(send) => send.lock().await.write_chunk(frame.into()).await,
            ChunkTarget::Own(send) => send.write_chunk(frame.into()).await,
        };
        if let Err(e) = written {
            let _ = fail.send(wire(&context)(WireIoError::Write(e))).await;
            return;
        }
        machine.lock().touch(Instant::now());
        progress.sent(&path, u64::from(chunk.len));
    }
    if let ChunkTarget::Own(mut send) = target {
        let _ = send.finish();
    }
}

/// Appends the `len` bytes of `file` at `offset` to `buf`. They are read
/// into `buf`'s spare capacity (`read_to_end` on a `Take`), so a chunk's
/// buffer is written once, by the kernel, and never zero-filled first (a
/// positional read needs an initialised slice; zeroing 1 GiB of frames
/// cost about 0.2 CPU-seconds). The caller holds the file's lock: the seek
/// and the read share its offset.
fn append_chunk(
    mut file: &std::fs::File,
    offset: u64,
    len: u32,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    buf.reserve_exact(len as usize);
    file.seek(SeekFrom::Start(offset))?;
    let got = file.take(u64::from(len)).read_to_end(buf)?;
    if got != len as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("file ended {got} bytes into a {len}-byte chunk"),
        ));
    }
    Ok(())
}

/// Writes `bytes` to stdout, ignoring a closed pipe.
pub fn print_out(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}
