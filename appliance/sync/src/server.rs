//! The QUIC server: a thin adapter around `appliance-sync-proto`'s
//! [`ServerConnection`] state machine.
//!
//! One task owns each connection's protocol state. Stream reader tasks
//! decode frames and send them to it (a `Chunk` frame's data is read into a
//! buffer of its own and hashed on a blocking thread first, so the streams
//! of an upload are verified in parallel and that task only decides); it applies them to the state machine
//! and performs the resulting actions: replies go to per-stream writer
//! tasks, chunk writes and assembly go to blocking threads whose results
//! come back as events, and list/download/delete/status run as their own
//! tasks on their stream. Nothing but that task touches the state machine.
//!
//! Limits (reasons):
//! - [`ServerConfig::max_connections_per_client`] (4): a laptop needs one;
//!   a few allow a second device session or a reconnect racing the old one,
//!   and a stolen-but-not-yet-revoked key cannot open hundreds.
//! - [`ServerConfig::max_streams`] (64 bidirectional + 64 unidirectional
//!   per connection): the client uses one bidirectional stream per file in
//!   flight (at most 32, the protocol's upload limit in version 2) plus a
//!   few unidirectional chunk streams for each file of more than two
//!   chunks; a request (list, status, ...) takes one more bidirectional
//!   stream. A client that wants more waits for a stream, it is not refused.
//! - [`IN_FLIGHT_CHUNK_BYTES`] (64 MiB per connection): decoded chunks wait
//!   for the disk; readers stop reading (QUIC flow control then stops the
//!   client) while this much is queued.
//! - [`ServerConfig::idle_timeout`] (60 s): QUIC idle timeout; the client
//!   sends keep-alives every 10 s, so only a vanished peer hits it. A stream
//!   that stalls in the middle of a frame for [`ServerConfig::stream_idle`]
//!   ([`STREAM_IDLE`]) is dropped, and so is one silent that long between
//!   frames while the server owes it nothing (time the client waits for
//!   the server — the lookup queue, a request, a running upload whose
//!   chunks come elsewhere — does not count); each upload this ends is
//!   answered `IdleTimeout`. An upload that stops getting chunks fails
//!   after the protocol's `IDLE_TIMEOUT`.
//! - UDP socket buffers of 4 MiB ([`UDP_BUFFER_BYTES`]): with the kernel
//!   default (~200 KiB) a fast sender overflows the receive buffer and
//!   QUIC backs off on the resulting loss; the bench measured the
//!   difference. Raising them may be refused (`net.core.rmem_max`); that
//!   is logged and the server runs with what it got.

use crate::admission::{Admission, Refused, Reservation, Reservations};
use crate::events::{EventSink, SyncEvent};
use crate::identity::{Authority, ClientName};
use crate::store::{ClientStore, Documents, Staged, StoreError};
use crate::wire::{write_frame, WireIoError};
use appliance_sync_proto::frame::{chunk_head, HEADER_LEN, MAX_CHUNK_HEAD_LEN};
use appliance_sync_proto::limits::{IDLE_TIMEOUT, MAX_LIST_ENTRIES};
use appliance_sync_proto::message::{Manifest, StatusReply, UploadId};
use appliance_sync_proto::server::{
    Admission as ProtoAdmission, AdmissionRequest, ChunkIndex, Refusal,
};
use appliance_sync_proto::{
    decode_payload, parse_header, AssembleFailure, ConnAction, Hash, Message, Request,
    ServerConnection, StorageFailure, UploadOutcome, WireError,
};
use parking_lot::Mutex;
use quinn::{Connection, Endpoint, ReadExactError, RecvStream, SendStream, VarInt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bytes of decoded chunks one connection may have queued for the disk.
pub const IN_FLIGHT_CHUNK_BYTES: usize = 64 << 20;
/// A stream that sends nothing for this long in the middle of a frame, or
/// between frames while the server owes its client nothing, is stopped.
pub const STREAM_IDLE: Duration = IDLE_TIMEOUT;
/// Chunks up to this size are hashed by their stream's reader task itself
/// (BLAKE3 of 64 KiB takes about 20 µs, less than handing the buffer to a
/// blocking thread and waking the reader again); larger ones on a blocking
/// thread. Small files are one small chunk each, and every hop between
/// threads is a wake-up and a context switch per file.
pub const INLINE_HASH_BYTES: usize = 64 << 10;
/// Requested UDP socket buffer size.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// QUIC application close codes.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const REVOKED: u32 = 2;
    pub const TOO_MANY_CONNECTIONS: u32 = 3;
    pub const SHUTDOWN: u32 = 4;
    pub const NOT_ENROLLED: u32 = 5;
    /// Storage cannot take writes (the pool is suspended, ...); the close
    /// reason says why.
    pub const STORAGE_UNAVAILABLE: u32 = 6;
}

/// A close reason short enough for any path MTU (at most 200 bytes, cut
/// at a character boundary).
fn truncate_reason(text: &str) -> &str {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to bind (`endpoints.sync_quic`).
    pub listen: SocketAddr,
    pub max_connections_per_client: usize,
    pub max_streams: u32,
    pub idle_timeout: Duration,
    /// A stream that stalls this long waiting for the rest of a frame (or
    /// for its next frame, counting only time the server owes its client
    /// nothing) is dropped; default [`STREAM_IDLE`].
    pub stream_idle: Duration,
    /// Time a graceful shutdown waits for connections to finish.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    /// Defaults (see the module docs) listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            max_connections_per_client: 4,
            max_streams: 64,
            idle_timeout: Duration::from_secs(60),
            stream_idle: STREAM_IDLE,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The components the server uses; the daemon builds them (and may swap
/// the admission for the storage manager's).
#[derive(Debug, Clone)]
pub struct Services {
    pub authority: Arc<Authority>,
    pub documents: Arc<Documents>,
    pub admission: Arc<dyn Admission>,
    pub events: Arc<dyn EventSink>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("start-up recovery failed: {0}")]
    Recovery(#[from] StoreError),
    #[error("invalid transport setting: {0}")]
    Transport(String),
}

/// A running server.
#[derive(Debug)]
pub struct SyncServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
    live: Arc<LiveConnections>,
}

impl SyncServer {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of live connections of `client`.
    pub fn connections_of(&self, client: &ClientName) -> usize {
        self.live.count(client)
    }

    /// Waits until the server has shut down (after the token is cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

#[derive(Debug, Default)]
struct LiveConnections {
    next: Mutex<u64>,
    by_client: Mutex<HashMap<ClientName, Vec<(u64, Connection)>>>,
    /// What admitted uploads may still add, shared by all connections of a
    /// client (see [`Reservations`]).
    reservations: Arc<Reservations>,
}

impl LiveConnections {
    fn add(&self, client: &ClientName, conn: Connection, max: usize) -> Option<u64> {
        let mut map = self.by_client.lock();
        let list = map.entry(client.clone()).or_default();
        if list.len() >= max {
            return None;
        }
        let mut next = self.next.lock();
        *next += 1;
        list.push((*next, conn));
        Some(*next)
    }

    fn remove(&self, client: &ClientName, id: u64) {
        let mut map = self.by_client.lock();
        if let Some(list) = map.get_mut(client) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                map.remove(client);
            }
        }
    }

    fn count(&self, client: &ClientName) -> usize {
        self.by_client.lock().get(client).map_or(0, Vec::len)
    }

    fn close_client(&self, client: &ClientName, code: u32, reason: &[u8]) {
        let conns: Vec<Connection> = self
            .by_client
            .lock()
            .get(client)
            .map(|l| l.iter().map(|(_, c)| c.clone()).collect())
            .unwrap_or_default();
        for c in conns {
            c.close(VarInt::from_u32(code), reason);
        }
    }

    fn all(&self) -> Vec<(ClientName, Connection)> {
        self.by_client
            .lock()
            .iter()
            .flat_map(|(n, l)| l.iter().map(|(_, c)| (n.clone(), c.clone())))
            .collect()
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    set_udp_buffers(&socket);
    Ok(socket)
}

/// Asks for [`UDP_BUFFER_BYTES`] send and receive buffers; logs what it got.
pub fn set_udp_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let rcv = setsockopt(socket, sockopt::RcvBuf, &UDP_BUFFER_BYTES);
    let snd = setsockopt(socket, sockopt::SndBuf, &UDP_BUFFER_BYTES);
    let got_rcv = getsockopt(socket, sockopt::RcvBuf).unwrap_or(0);
    let got_snd = getsockopt(socket, sockopt::SndBuf).unwrap_or(0);
    // Linux doubles the requested value for bookkeeping; half is usable.
    if rcv.is_err() || snd.is_err() || got_rcv < UDP_BUFFER_BYTES || got_snd < UDP_BUFFER_BYTES {
        tracing::warn!(
            requested = UDP_BUFFER_BYTES,
            receive = got_rcv,
            send = got_snd,
            "UDP socket buffers are smaller than requested (raise net.core.rmem_max/wmem_max)"
        );
    }
}

/// Transport settings shared by server and client.
pub fn transport_config(
    max_streams: u32,
    idle: Duration,
) -> Result<quinn::TransportConfig, String> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(max_streams));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).map_err(|e| e.to_string())?,
    ));
    // Windows sized for a fast LAN or loopback: one stream may carry a full
    // chunk frame without stalling; the connection a few chunks at once.
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    // Path MTU discovery may look beyond Ethernet's 1500 bytes (jumbo
    // frames on a LAN, 64 KiB on loopback): at 1452-byte packets quinn's
    // per-packet costs (frame building, header protection, ACKs) dominate
    // its CPU use. Discovery starts from the safe initial MTU and keeps
    // only sizes the path acknowledged. See [`MTU_UPPER_BOUND`].
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// Largest UDP payload path MTU discovery searches for: 6,550 bytes.
/// quinn hands the kernel up to 10 packets per `sendmsg` with UDP GSO, and
/// the kernel refuses (`EMSGSIZE`) a batch over 65,507 bytes; quinn-udp
/// drops such a batch silently (it expects that only of MTU probes). With
/// a larger bound, the packets discovery finds are lost ten at a time,
/// congestion control backs off, and after a few such bursts quinn's black
/// hole detection falls back to 1,200 bytes for a minute (measured on
/// loopback: the bare sink went from 0.3 GB/s at 1,452 bytes, and the
/// same at a 16 or 64 KiB bound, to 1.2 GB/s at this one). Paths of
/// Ethernet's MTU are unaffected.
pub const MTU_UPPER_BOUND: u16 = 6_550;

/// Endpoint settings shared by server and client: datagrams up to
/// [`MTU_UPPER_BOUND`] are accepted (quinn's default is 1,472), so the
/// peer's path MTU discovery can use what the path allows.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    // Cannot fail: the value is within QUIC's range (1200..=65527).
    let _ = e.max_udp_payload_size(MTU_UPPER_BOUND);
    e
}

/// Starts the server: start-up recovery (staging sweep of every client),
/// then the QUIC endpoint. Returns once bound. Cancelling `shutdown` stops
/// accepting, lets connections finish for `shutdown_grace`, then closes.
pub async fn serve(
    config: ServerConfig,
    services: Services,
    shutdown: CancellationToken,
) -> Result<SyncServer, ServeError> {
    let documents = services.documents.clone();
    let recovered = tokio::task::spawn_blocking(move || documents.recover_all())
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))??;
    for (client, report) in &recovered {
        tracing::info!(%client, ?report, "sync store recovered");
    }
    let crypto = crate::tls::server_crypto(&services.authority)?;
    let mut server_config = quinn::ServerConfig::with_crypto(crypto);
    server_config.transport_config(Arc::new(
        transport_config(config.max_streams, config.idle_timeout).map_err(ServeError::Transport)?,
    ));
    let socket = udp_socket(config.listen).map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| ServeError::Transport("no async runtime".into()))?;
    let endpoint = Endpoint::new(endpoint_config(), Some(server_config), socket, runtime).map_err(
        |source| ServeError::Bind {
            addr: config.listen,
            source,
        },
    )?;
    let addr = endpoint.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    if services.authority.public_address().is_none() {
        services
            .authority
            .set_public_address(Some(addr.to_string()));
    }
    tracing::info!(%addr, "sync server listening");
    let live = Arc::new(LiveConnections::default());
    let task = tokio::spawn(accept_loop(
        endpoint,
        config,
        services,
        shutdown,
        live.clone(),
    ));
    Ok(SyncServer { addr, task, live })
}

async fn accept_loop(
    endpoint: Endpoint,
    config: ServerConfig,
    services: Services,
    shutdown: CancellationToken,
    live: Arc<LiveConnections>,
) {
    let mut revocations = services.authority.subscribe_revocations();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            revoked = revocations.recv() => match revoked {
                Ok(client) => live.close_client(&client, close_code::REVOKED, b"client revoked"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed some: re-check every live connection.
                    for (client, conn) in live.all() {
                        if services.authority.client(&client).is_none_or(|c| !c.is_active()) {
                            conn.close(VarInt::from_u32(close_code::REVOKED), b"client revoked");
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let services = services.clone();
                let live = live.clone();
                let config = config.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => handle_connection(conn, config, services, live, shutdown).await,
                        // Refused handshakes (unknown, self-signed, revoked
                        // clients) end here, before any storage access.
                        Err(e) => tracing::info!(%remote, error = %e, "sync handshake failed"),
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // Graceful shutdown: no new connections; give the live ones a moment.
    endpoint.set_server_config(None);
    let grace = tokio::time::sleep(config.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            () = &mut grace => break,
            next = tasks.join_next() => if next.is_none() { break },
        }
    }
    endpoint.close(
        VarInt::from_u32(close_code::SHUTDOWN),
        b"server shutting down",
    );
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    endpoint.wait_idle().await;
}

fn peer_client(conn: &Connection, authority: &Authority) -> Option<ClientName> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    authority.client_for_cert(certs.first()?)
}

async fn handle_connection(
    conn: Connection,
    config: ServerConfig,
    services: Services,
    live: Arc<LiveConnections>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    // The verifier already refused unknown and revoked certificates; this
    // maps the certificate to its client (and closes the race with a
    // revocation that landed during the handshake).
    let Some(client) = peer_client(&conn, &services.authority) else {
        conn.close(
            VarInt::from_u32(close_code::NOT_ENROLLED),
            b"client not enrolled",
        );
        return;
    };
    let Some(id) = live.add(&client, conn.clone(), config.max_connections_per_client) else {
        tracing::warn!(%client, %remote, "too many connections");
        conn.close(
            VarInt::from_u32(close_code::TOO_MANY_CONNECTIONS),
            b"too many connections for this client",
        );
        return;
    };
    services.events.publish(SyncEvent::ClientConnected {
        client: client.clone(),
        remote,
    });
    // Opening the store touches the documents' file system: not while
    // storage cannot take writes (it would hang on a suspended pool).
    if let Err(refused) = services.admission.writable(&client) {
        let text = refused.to_string();
        tracing::warn!(%client, reason = %text, "connection refused: storage unavailable");
        conn.close(
            VarInt::from_u32(close_code::STORAGE_UNAVAILABLE),
            truncate_reason(&text).as_bytes(),
        );
        services.events.publish(SyncEvent::ClientDisconnected {
            client: client.clone(),
            reason: text,
        });
        return;
    }
    let documents = services.documents.clone();
    let name = client.clone();
    let store = match tokio::task::spawn_blocking(move || documents.client(&name)).await {
        Ok(Ok(store)) => Some(store),
        Ok(Err(e)) => {
            tracing::error!(%client, error = %e, "cannot open client store");
            None
        }
        Err(e) => {
            tracing::error!(%client, error = %e, "store task failed");
            None
        }
    };
    let reason = match store {
        Some(store) => {
            let actor = ConnActor::new(
                conn.clone(),
                client.clone(),
                store,
                services.clone(),
                live.reservations.clone(),
                config.stream_idle,
            );
            actor.run(shutdown).await
        }
        None => {
            conn.close(
                VarInt::from_u32(close_code::PROTOCOL),
                b"storage unavailable",
            );
            "storage unavailable".to_owned()
        }
    };
    live.remove(&client, id);
    services
        .events
        .publish(SyncEvent::ClientDisconnected { client, reason });
}

/// Identifies a stream within one connection.
type StreamKey = u64;

enum Event {
    Frame {
        stream: StreamKey,
        message: Message,
        _permit: Option<OwnedSemaphorePermit>,
    },
    ReadFailed {
        stream: StreamKey,
        error: WireIoError,
    },
    ReaderDone {
        stream: StreamKey,
    },
    ChunkWritten {
        upload: UploadId,
        hash: Hash,
        len: u64,
        result: Result<(), StoreError>,
    },
    Assembled {
        upload: UploadId,
        result: Result<(), StoreError>,
    },
    ServeDone {
        stream: StreamKey,
    },
    /// A `Chunk` frame, hashed by its reader (see [`read_message`]).
    Chunk {
        stream: StreamKey,
        upload: UploadId,
        hash: Hash,
        data: Vec<u8>,
        actual: Hash,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// An `Upload` frame whose staging state was looked up off the loop.
    UploadPrepared {
        stream: StreamKey,
        message: Message,
        staged: Option<Arc<Staged>>,
        /// The `Upload` frame's memory, held until it is handled.
        permit: Option<OwnedSemaphorePermit>,
    },
}

/// The storage view handed to the state machine for one call.
struct StorageView<'a> {
    store: &'a ClientStore,
    admission: &'a dyn Admission,
    reservations: &'a Reservations,
    /// The reservation of the upload admitted by this call, for the caller
    /// to keep with it.
    reservation: Option<Reservation>,
    /// [`Admission::writable`], asked once per call: while it is an error
    /// nothing below touches the file system.
    writable: Result<(), Refused>,
    client: &'a ClientName,
    /// The staging state of the upload being started, if any: chunks that
    /// landed in it before (a resumed upload) count as present.
    staged: Option<&'a Staged>,
}

impl ChunkIndex for StorageView<'_> {
    fn has_chunk(&self, hash: &Hash) -> bool {
        self.writable.is_ok()
            && (self.staged.is_some_and(|s| s.has_recorded(hash)) || self.store.has_chunk(hash))
    }
}

impl ProtoAdmission for StorageView<'_> {
    fn admit(&mut self, request: &AdmissionRequest<'_>) -> Result<(), Refusal> {
        if let Err(Refused::Unavailable { detail }) = &self.writable {
            return Err(Refusal::Unavailable {
                detail: format!("storage unavailable: {detail}"),
            });
        }
        // Bytes this upload adds at its peak: the staging file the chunks
        // land in (the assembled file), less what an interrupted attempt
        // already put there (counted in usage). The replaced document is
        // freed only at the rename, so it is not subtracted. An identical
        // document already in place adds nothing.
        let needed = match self.store.current_manifest(request.path) {
            Some(m) if m.size == request.file_size && request.missing_bytes == 0 => 0,
            _ => request
                .file_size
                .saturating_sub(self.staged.map_or(0, Staged::accounted_bytes)),
        };
        // Admitted against what this client's other running uploads may
        // still add, and reserved until this one ends (once for uploads
        // that share a staging file).
        let admitted = match self.staged {
            Some(staged) => {
                self.reservations
                    .admit_shared(self.admission, self.client, staged.key(), needed)
            }
            None => self.reservations.admit(self.admission, self.client, needed),
        };
        admitted
            .map(|reservation| self.reservation = Some(reservation))
            .map_err(|r| match r {
                Refused::Quota(q) => Refusal::QuotaExceeded {
                    needed: q.needed,
                    available: q.available,
                },
                Refused::Unavailable { detail } => Refusal::Unavailable {
                    detail: format!("storage unavailable: {detail}"),
                },
            })
    }
}

struct UploadInfo {
    path: String,
    size: u64,
    bytes: u64,
    started: bool,
    /// Bytes it may still add (see [`Reservations`]); given back when the
    /// upload ends, as this entry goes.
    reservation: Option<Reservation>,
}

struct StreamState {
    writer: Option<mpsc::Sender<Message>>,
    reader_done: bool,
    serving: bool,
    /// Upload manifests from this stream whose staging lookup is running.
    preparing: usize,
    /// The client reset the stream (or reading it failed): its uploads
    /// ended, and its `Upload` frames still waiting for their lookup are
    /// dropped instead of starting uploads nobody drives.
    failed: bool,
    /// What the client is told about each upload its failed stream ends:
    /// none after a reset (the client gave up), a typed error when it may
    /// still be listening (see [`failure_answer`]).
    answer: Option<WireError>,
    /// Running uploads whose chunks came on this stream.
    carrying: HashSet<UploadId>,
    /// Frames of this stream handled so far.
    handled: u64,
    /// What the stream's reader knows of the above: it does not count the
    /// client's silence while the server owes it something (see
    /// [`next_frame_header`]).
    owing: watch::Sender<Owing>,
}

/// What a stream's reader is told by the connection's task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Owing {
    /// Frames of the stream handled: the reader knows how many it handed
    /// on, and those not handled yet are owed an answer too.
    handled: u64,
    /// See [`StreamState::owed`].
    owed: bool,
}

impl StreamState {
    /// Whether the client waits for the server on this stream, so its
    /// silence is not idleness: an `Upload` waiting for its lookup, a
    /// request being served, a running upload it controls (its chunks may
    /// come on other streams) or carries chunks of. The protocol machine's
    /// per-upload idle limit watches the uploads meanwhile.
    fn owed(&self, controls_upload: bool) -> bool {
        self.preparing > 0 || self.serving || controls_upload || !self.carrying.is_empty()
    }
}

struct ConnActor {
    conn: Connection,
    client: ClientName,
    store: Arc<ClientStore>,
    services: Services,
    reservations: Arc<Reservations>,
    stream_idle: Duration,
    proto: ServerConnection<StreamKey>,
    streams: HashMap<StreamKey, StreamState>,
    uploads: HashMap<UploadId, UploadInfo>,
    /// Number of running uploads each stream controls.
    upload_streams: HashMap<StreamKey, usize>,
    upload_stream_of: HashMap<UploadId, StreamKey>,
    /// Staging state of each running upload.
    staged: HashMap<UploadId, Arc<Staged>>,
    /// Whether an upload's staging state is being looked up. One is at a
    /// time: each lookup holds a copy of its manifest and a map of its
    /// chunks (up to ~40 MiB for a full one) until the protocol machine
    /// admits or refuses it, so lookups run in parallel could hold far more
    /// than the open-upload bound ([`MAX_OPEN_UPLOAD_STATE_BYTES`]) the
    /// machine enforces only when each is handled.
    ///
    /// [`MAX_OPEN_UPLOAD_STATE_BYTES`]: appliance_sync_proto::limits::MAX_OPEN_UPLOAD_STATE_BYTES
    preparing: bool,
    /// `Upload` frames waiting for their lookup, in the order they came,
    /// each holding its frame's memory: once they hold the connection's
    /// [`IN_FLIGHT_CHUNK_BYTES`], its streams are not read further. Handled
    /// in order, so uploads pipelined on one stream are answered in order.
    /// Those of a stream the client resets meanwhile are dropped (see
    /// [`StreamState::failed`]); of one that stalls mid-frame, answered with
    /// [`StreamState::answer`]. The wait does not count as the client's
    /// silence (see [`Owing`]).
    waiting: VecDeque<(StreamKey, Manifest, Option<OwnedSemaphorePermit>)>,
    next_stream: StreamKey,
    /// Memory reservation of the frame being handled, for its chunk write.
    pending_permit: Option<OwnedSemaphorePermit>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    memory: Arc<Semaphore>,
}

/// Permits are counted in KiB so a 4 MiB chunk fits the semaphore's range.
fn permits_for(len: usize) -> u32 {
    u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl ConnActor {
    fn new(
        conn: Connection,
        client: ClientName,
        store: Arc<ClientStore>,
        services: Services,
        reservations: Arc<Reservations>,
        stream_idle: Duration,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(256);
        Self {
            conn,
            client,
            store,
            services,
            reservations,
            stream_idle,
            proto: ServerConnection::new(),
            streams: HashMap::new(),
            uploads: HashMap::new(),
            upload_streams: HashMap::new(),
            upload_stream_of: HashMap::new(),
            staged: HashMap::new(),
            preparing: false,
            waiting: VecDeque::new(),
            next_stream: 0,
            pending_permit: None,
            events_tx,
            events_rx,
            memory: Arc::new(Semaphore::new(IN_FLIGHT_CHUNK_BYTES / 1024)),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> String {
        let reason = loop {
            let deadline = self.proto.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Level-triggered: once cancelled, the connection closes as
                // soon as its running uploads have finished.
                () = shutdown.cancelled(), if self.uploads.is_empty() => {
                    self.conn.close(VarInt::from_u32(close_code::SHUTDOWN), b"server shutting down");
                    break "server shutting down".to_owned();
                }
                bi = self.conn.accept_bi() => match bi {
                    Ok((send, recv)) => self.add_stream(Some(send), recv),
                    Err(e) => break e.to_string(),
                },
                uni = self.conn.accept_uni() => match uni {
                    Ok(recv) => self.add_stream(None, recv),
                    Err(e) => break e.to_string(),
                },
                Some(event) = self.events_rx.recv() => self.handle_event(event),
                () = sleep => {
                    let actions = self.proto.handle_timeout(Instant::now());
                    self.perform(actions);
                }
            }
            if self.proto.is_closed() {
                break "protocol error".to_owned();
            }
        };
        let actions = self.proto.connection_closed(&WireError::Cancelled {
            detail: reason.clone(),
        });
        self.perform(actions);
        reason
    }

    fn add_stream(&mut self, send: Option<SendStream>, recv: RecvStream) {
        let key = self.next_stream;
        self.next_stream += 1;
        let writer = send.map(|send| {
            let (tx, rx) = mpsc::channel::<Message>(64);
            tokio::spawn(writer_task(send, rx));
            tx
        });
        let (owing, owing_rx) = watch::channel(Owing::default());
        self.streams.insert(
            key,
            StreamState {
                writer,
                reader_done: false,
                serving: false,
                preparing: 0,
                failed: false,
                answer: None,
                carrying: HashSet::new(),
                handled: 0,
                owing,
            },
        );
        tokio::spawn(reader_task(
            key,
            recv,
            self.events_tx.clone(),
            self.memory.clone(),
            self.stream_idle,
            owing_rx,
        ));
    }

    /// Applies `event`; a frame's stream learns that it was handled and
    /// what the server owes it now (see [`Owing`]).
    fn handle_event(&mut self, event: Event) {
        let frame_of = match &event {
            Event::Frame { stream, .. } | Event::Chunk { stream, .. } => Some(*stream),
            _ => None,
        };
        if let Some(s) = frame_of.and_then(|stream| self.streams.get_mut(&stream)) {
            s.handled += 1;
        }
        self.apply_event(event);
        if let Some(stream) = frame_of {
            self.update_owed(stream);
        }
    }

    fn apply_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Frame {
                stream,
                message: Message::Upload(manifest),
                _permit: permit,
            } => {
                // Look up (resume) the upload's staging state off the loop;
                // the manifest goes to the machine when that is done. No
                // chunk of it can arrive before the machine asks for it.
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.preparing += 1;
                }
                self.waiting.push_back((stream, manifest, permit));
                self.prepare_next(now);
            }
            Event::UploadPrepared {
                stream,
                message,
                staged,
                permit,
            } => {
                self.preparing = false;
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.preparing = s.preparing.saturating_sub(1);
                }
                if self.stream_failed(stream) {
                    // Its stream went while it was looked up: the upload
                    // ends before it starts, resumable as any other.
                    if let Some(staged) = staged {
                        let store = self.store.clone();
                        tokio::task::spawn_blocking(move || store.suspend_staged(&staged, true));
                    }
                    self.answer_dropped_upload(stream);
                } else {
                    self.handle_frame(stream, message, None, staged.as_ref(), now);
                }
                drop(permit);
                self.maybe_drop_stream(stream);
                self.prepare_next(now);
            }
            Event::Frame {
                stream,
                message,
                _permit: permit,
            } => self.handle_frame(stream, message, permit, None, now),
            Event::ReadFailed { stream, error } => {
                tracing::info!(client = %self.client, stream, %error, "stream failed");
                let actions = match error {
                    WireIoError::Frame(e) => {
                        // Malformed or oversized frame: a protocol violation.
                        let wire: WireError = e.into();
                        let mut actions = self.proto.connection_closed(&wire);
                        actions.push(ConnAction::Close {
                            stream,
                            error: wire,
                        });
                        actions
                    }
                    _ => {
                        let answer = failure_answer(&error);
                        if let Some(s) = self.streams.get_mut(&stream) {
                            s.failed = true;
                            s.answer.clone_from(&answer);
                        }
                        match answer {
                            Some(answer) => self.proto.stream_failed(stream, &answer),
                            None => self.proto.stream_closed(stream),
                        }
                    }
                };
                self.perform(actions);
                self.mark_reader_done(stream);
            }
            Event::ReaderDone { stream } => self.mark_reader_done(stream),
            Event::Chunk {
                stream,
                upload,
                hash,
                data,
                actual,
                permit,
            } => {
                if self.uploads.contains_key(&upload) {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.carrying.insert(upload);
                    }
                }
                let actions = self
                    .proto
                    .handle_hashed_chunk(stream, upload, hash, data, actual, now);
                // The chunk's memory stays reserved until it is on disk.
                self.pending_permit = permit;
                self.perform(actions);
                self.pending_permit = None;
            }
            Event::ChunkWritten {
                upload,
                hash,
                len,
                result,
            } => {
                let actions = match result {
                    Ok(()) => {
                        if let Some(info) = self.uploads.get_mut(&upload) {
                            info.bytes += len;
                            // What landed is in `used` now; the upload may
                            // add only the rest (the commit adds its size
                            // less what its staging file counts).
                            if let (Some(reservation), Some(staged)) =
                                (info.reservation.as_mut(), self.staged.get(&upload))
                            {
                                reservation
                                    .shrink_to(info.size.saturating_sub(staged.accounted_bytes()));
                            }
                        }
                        self.proto.chunk_written(upload, hash, now)
                    }
                    Err(e) => {
                        tracing::warn!(client = %self.client, %upload, error = %e, "chunk write failed");
                        self.proto
                            .chunk_write_failed(upload, hash, storage_failure(&e))
                    }
                };
                self.perform(actions);
            }
            Event::Assembled { upload, result } => {
                let result = result.map_err(|e| {
                    tracing::warn!(client = %self.client, %upload, error = %e, "assembly failed");
                    match e {
                        StoreError::FileHashMismatch { actual, .. } => {
                            AssembleFailure::FileHashMismatch { actual }
                        }
                        other => AssembleFailure::Storage(storage_failure(&other)),
                    }
                });
                let actions = self.proto.assembled(upload, result);
                self.perform(actions);
            }
            Event::ServeDone { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.serving = false;
                }
                self.maybe_drop_stream(stream);
            }
        }
    }

    /// Starts the staging lookup of the next waiting `Upload` frame, unless
    /// one is running (see [`Self::preparing`]).
    fn prepare_next(&mut self, now: Instant) {
        while !self.preparing {
            let Some((stream, manifest, permit)) = self.waiting.pop_front() else {
                return;
            };
            if self.stream_failed(stream) {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.preparing = s.preparing.saturating_sub(1);
                }
                drop(permit);
                self.answer_dropped_upload(stream);
                self.maybe_drop_stream(stream);
                continue;
            }
            if self.services.admission.writable(&self.client).is_err() {
                // Refused by admission (StorageView), without touching
                // the staging area.
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.preparing = s.preparing.saturating_sub(1);
                }
                self.handle_frame(stream, Message::Upload(manifest), None, None, now);
                drop(permit);
                self.maybe_drop_stream(stream);
                continue;
            }
            self.preparing = true;
            let store = self.store.clone();
            let tx = self.events_tx.clone();
            tokio::task::spawn_blocking(move || {
                // Answered whatever happens: the next lookup waits for it.
                let staged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let valid = appliance_sync_proto::validate_manifest(manifest.clone()).ok()?;
                    match store.stage(&valid) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot open staging state");
                            None
                        }
                    }
                }))
                .unwrap_or_else(|_| {
                    tracing::error!("looking up an upload's staging state panicked");
                    None
                });
                let sent = tx.blocking_send(Event::UploadPrepared {
                    stream,
                    message: Message::Upload(manifest),
                    staged,
                    permit,
                });
                // The connection went meanwhile: the upload ends here, as
                // its connection's other uploads did.
                if let Err(mpsc::error::SendError(Event::UploadPrepared {
                    staged: Some(staged),
                    ..
                })) = sent
                {
                    store.suspend_staged(&staged, true);
                }
            });
        }
    }

    fn handle_frame(
        &mut self,
        stream: StreamKey,
        message: Message,
        permit: Option<OwnedSemaphorePermit>,
        staged: Option<&Arc<Staged>>,
        now: Instant,
    ) {
        let starting = match &message {
            Message::Upload(m) => Some((m.path.clone(), m.size)),
            _ => None,
        };
        let mut view = StorageView {
            store: &self.store,
            admission: self.services.admission.as_ref(),
            reservations: &self.reservations,
            reservation: None,
            writable: self.services.admission.writable(&self.client),
            client: &self.client,
            staged: staged.map(AsRef::as_ref),
        };
        let actions = self.proto.handle(stream, message, now, &mut view);
        // Dropped (given back) at the end of this call unless it became an
        // upload's.
        let reservation = view.reservation.take();
        if let Some((path, size)) = starting {
            // The new upload's id appears in its first action.
            let id = actions.iter().find_map(|a| match a {
                ConnAction::Send {
                    message: Message::NeedChunks(n),
                    ..
                } => Some(n.upload),
                ConnAction::UploadFinished { upload, .. } => Some(*upload),
                _ => None,
            });
            match (id, staged.cloned()) {
                (Some(id), Some(staged)) => {
                    self.staged.insert(id, staged);
                }
                (None, Some(staged)) => {
                    // Refused before it became an upload (too many uploads).
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.suspend_staged(&staged, true));
                }
                _ => {}
            }
            if let Some(id) = id {
                self.uploads.insert(
                    id,
                    UploadInfo {
                        path,
                        size,
                        bytes: 0,
                        started: false,
                        reservation,
                    },
                );
            }
        }
        // The chunk's memory stays reserved until it is on disk.
        self.pending_permit = permit;
        self.perform(actions);
        self.pending_permit = None;
    }

    /// Whether `stream` was reset by the client (see [`StreamState::failed`]).
    fn stream_failed(&self, stream: StreamKey) -> bool {
        self.streams.get(&stream).is_some_and(|s| s.failed)
    }

    /// Tells the client of a failed stream that an `Upload` frame it sent
    /// there was dropped before it became an upload (nothing was reserved
    /// for it yet), unless it reset the stream (see [`StreamState::answer`]).
    fn answer_dropped_upload(&mut self, stream: StreamKey) {
        if let Some(error) = self.streams.get(&stream).and_then(|s| s.answer.clone()) {
            self.send(
                stream,
                Message::Error {
                    upload: None,
                    error,
                },
            );
        }
    }

    /// Tells `stream`'s reader what the server owes its client now (see
    /// [`Owing`]).
    fn update_owed(&self, stream: StreamKey) {
        if let Some(s) = self.streams.get(&stream) {
            let now = Owing {
                handled: s.handled,
                owed: s.owed(self.proto_controls(stream)),
            };
            s.owing
                .send_if_modified(|was| std::mem::replace(was, now) != now);
        }
    }

    fn mark_reader_done(&mut self, stream: StreamKey) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.reader_done = true;
        }
        self.maybe_drop_stream(stream);
    }

    /// Finishes a stream's writer once nothing can still reply on it;
    /// until then, updates what its reader knows (see [`Self::update_owed`]).
    fn maybe_drop_stream(&mut self, stream: StreamKey) {
        self.update_owed(stream);
        let Some(s) = self.streams.get(&stream) else {
            return;
        };
        let controls_upload = self.proto_controls(stream);
        if s.reader_done && !s.serving && s.preparing == 0 && !controls_upload {
            self.streams.remove(&stream);
        }
    }

    fn proto_controls(&self, stream: StreamKey) -> bool {
        // Uploads are tracked here from start to `UploadFinished`; the
        // stream key of each is the one its manifest arrived on.
        self.upload_streams.get(&stream).is_some_and(|n| *n > 0)
    }

    fn send(&mut self, stream: StreamKey, message: Message) {
        if let Some(writer) = self.streams.get(&stream).and_then(|s| s.writer.as_ref()) {
            if let Err(mpsc::error::TrySendError::Full(message)) = writer.try_send(message) {
                // The client is slow to read its replies; queue behind them.
                let writer = writer.clone();
                tokio::spawn(async move {
                    let _ = writer.send(message).await;
                });
            }
        }
    }

    fn perform(&mut self, actions: Vec<ConnAction<StreamKey>>) {
        for action in actions {
            match action {
                ConnAction::Send { stream, message } => {
                    if let Message::NeedChunks(n) = &message {
                        self.note_upload_stream(n.upload, stream);
                    }
                    self.send(stream, message);
                }
                ConnAction::WriteChunk { upload, hash, data } => {
                    let store = self.store.clone();
                    let tx = self.events_tx.clone();
                    let len = data.len() as u64;
                    let permit = self.pending_permit.take();
                    let staged = self.staged.get(&upload).cloned();
                    tokio::task::spawn_blocking(move || {
                        let result = match staged {
                            Some(staged) => store.write_staged(&staged, &hash, data),
                            None => store.write_chunk(&hash, &data),
                        };
                        drop(permit);
                        let _ = tx.blocking_send(Event::ChunkWritten {
                            upload,
                            hash,
                            len,
                            result,
                        });
                    });
                }
                ConnAction::Assemble(request) => {
                    let store = self.store.clone();
                    let tx = self.events_tx.clone();
                    let staged = self.staged.get(&request.upload).cloned();
                    tokio::task::spawn_blocking(move || {
                        let result = match staged {
                            Some(staged) => store.commit_staged(&staged),
                            None => store.assemble(&request.manifest),
                        };
                        let _ = tx.blocking_send(Event::Assembled {
                            upload: request.upload,
                            result,
                        });
                    });
                }
                ConnAction::UploadFinished { upload, outcome } => {
                    self.finish_upload(upload, outcome);
                }
                ConnAction::Serve { stream, request } => {
                    let writer = self.streams.get_mut(&stream).and_then(|s| {
                        s.serving = true;
                        s.writer.clone()
                    });
                    self.update_owed(stream);
                    if let Some(writer) = writer {
                        let store = self.store.clone();
                        let tx = self.events_tx.clone();
                        let admission = self.services.admission.clone();
                        let client = self.client.clone();
                        tokio::spawn(async move {
                            serve_request(store, admission, client, request, writer).await;
                            let _ = tx.send(Event::ServeDone { stream }).await;
                        });
                    }
                }
                ConnAction::Close { stream, error } => {
                    self.send(
                        stream,
                        Message::Error {
                            upload: None,
                            error: error.clone(),
                        },
                    );
                    let conn = self.conn.clone();
                    let reason = error.to_string();
                    // Let the error frame go out before the close.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        conn.close(VarInt::from_u32(close_code::PROTOCOL), reason.as_bytes());
                    });
                }
            }
        }
    }
}

impl ConnActor {
    fn note_upload_stream(&mut self, upload: UploadId, stream: StreamKey) {
        if let Some(info) = self.uploads.get_mut(&upload) {
            if !info.started {
                info.started = true;
                *self.upload_streams.entry(stream).or_default() += 1;
                self.upload_stream_of.insert(upload, stream);
                self.services.events.publish(SyncEvent::UploadStarted {
                    client: self.client.clone(),
                    path: info.path.clone(),
                    size: info.size,
                });
                self.update_owed(stream);
            }
        }
    }

    fn finish_upload(&mut self, upload: UploadId, outcome: UploadOutcome) {
        let info = self.uploads.remove(&upload);
        if let Some(staged) = self.staged.remove(&upload) {
            if let UploadOutcome::Failed { error } = &outcome {
                // Keep what landed for a resume unless the disk is full
                // (the staging area must be cleaned) or the file can never
                // verify. A commit already settled its staging state.
                let keep = !matches!(
                    error,
                    WireError::DiskFull | WireError::FileHashMismatch { .. }
                );
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.suspend_staged(&staged, keep));
            }
        }
        if let Some(stream) = self.upload_stream_of.remove(&upload) {
            if let Some(n) = self.upload_streams.get_mut(&stream) {
                *n = n.saturating_sub(1);
            }
            self.maybe_drop_stream(stream);
        }
        let carriers: Vec<StreamKey> = self
            .streams
            .iter_mut()
            .filter_map(|(key, s)| s.carrying.remove(&upload).then_some(*key))
            .collect();
        for stream in carriers {
            self.maybe_drop_stream(stream);
        }
        let (path, size, bytes) = info.map_or((String::new(), 0, 0), |i| (i.path, i.size, i.bytes));
        let event = match outcome {
            UploadOutcome::Committed {
                path,
                size,
                bytes_received,
                ..
            } => SyncEvent::UploadCompleted {
                client: self.client.clone(),
                path: path.into_string(),
                size,
                bytes_transferred: bytes_received,
            },
            UploadOutcome::Failed { error } => SyncEvent::UploadFailed {
                client: self.client.clone(),
                path,
                size,
                bytes_transferred: bytes,
                error: error.to_string(),
            },
        };
        self.services.events.publish(event);
    }
}

fn storage_failure(e: &StoreError) -> StorageFailure {
    if e.is_disk_full() {
        StorageFailure::DiskFull
    } else {
        StorageFailure::Io {
            detail: e.to_string(),
        }
    }
}

async fn writer_task(mut send: SendStream, mut rx: mpsc::Receiver<Message>) {
    while let Some(message) = rx.recv().await {
        if write_frame(&mut send, &message).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn reader_task(
    stream: StreamKey,
    mut recv: RecvStream,
    events: mpsc::Sender<Event>,
    memory: Arc<Semaphore>,
    idle: Duration,
    mut owing: watch::Receiver<Owing>,
) {
    // Frames handed on to the connection's task.
    let mut sent = 0u64;
    loop {
        let len = match next_frame_header(&mut recv, idle, &mut owing, sent).await {
            Ok(Some(len)) => len,
            Ok(None) => {
                let _ = events.send(Event::ReaderDone { stream }).await;
                return;
            }
            Err(error) => {
                let _ = recv.stop(VarInt::from_u32(close_code::PROTOCOL));
                let _ = events.send(Event::ReadFailed { stream, error }).await;
                return;
            }
        };
        // Reserve memory for the payload before reading it.
        let permit = memory
            .clone()
            .acquire_many_owned(permits_for(len))
            .await
            .ok();
        let event = match read_message(&mut recv, len, idle).await {
            Ok(Incoming::Message(message)) => Ok(Event::Frame {
                stream,
                message,
                _permit: permit,
            }),
            Ok(Incoming::Chunk {
                upload,
                hash,
                data,
                actual,
            }) => Ok(Event::Chunk {
                stream,
                upload,
                hash,
                data,
                actual,
                permit,
            }),
            Err(e) => Err(e),
        };
        match event {
            Ok(event) => {
                if events.send(event).await.is_err() {
                    return;
                }
                sent += 1;
            }
            Err(error) => {
                let _ = recv.stop(VarInt::from_u32(close_code::PROTOCOL));
                let _ = events.send(Event::ReadFailed { stream, error }).await;
                return;
            }
        }
    }
}

/// Reads the next frame's header: `Ok(None)` at a clean end of the stream.
/// The wait for its first byte is limited to `idle` of the client's
/// silence, not counting the time the server owes the client something on
/// this stream: an answer to one of the `sent` frames handed on, or what
/// [`StreamState::owed`] says. A client waiting for the server is not
/// idle. Once a frame has begun, every wait for more of it is limited to
/// `idle`.
async fn next_frame_header(
    recv: &mut RecvStream,
    idle: Duration,
    owing: &mut watch::Receiver<Owing>,
    sent: u64,
) -> Result<Option<usize>, WireIoError> {
    let mut header = [0u8; HEADER_LEN];
    let first = tokio::select! {
        read = recv.read(&mut header[..1]) => read?,
        () = client_silence(owing, sent, idle) => return Err(WireIoError::Idle(idle)),
    };
    match first {
        None => return Ok(None),
        Some(0) => return Err(WireIoError::Truncated),
        Some(_) => {}
    }
    match tokio::time::timeout(idle, recv.read_exact(&mut header[1..])).await {
        Err(_) => Err(WireIoError::Idle(idle)),
        Ok(Ok(())) => Ok(Some(parse_header(&header)?)),
        Ok(Err(ReadExactError::FinishedEarly(_))) => Err(WireIoError::Truncated),
        Ok(Err(ReadExactError::ReadError(e))) => Err(e.into()),
    }
}

/// Ends once the client has been silent for `idle` while the server owed
/// it nothing (see [`next_frame_header`]); each time the server owes it
/// something the count restarts. Without the connection's task (the
/// sender is gone), `idle` plainly.
async fn client_silence(owing: &mut watch::Receiver<Owing>, sent: u64, idle: Duration) {
    loop {
        if owing
            .wait_for(|o| o.handled >= sent && !o.owed)
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(idle, owing.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
        }
    }
    tokio::time::sleep(idle).await;
}

/// The typed error the client gets for each upload a failed stream ends,
/// if it may still be listening: it stalled in the middle of a frame
/// ([`WireError::IdleTimeout`]) or ended its side in one. A reset stream
/// or a lost connection gets none.
fn failure_answer(error: &WireIoError) -> Option<WireError> {
    match error {
        WireIoError::Idle(_) => Some(WireError::IdleTimeout),
        WireIoError::Truncated => Some(WireError::Malformed {
            detail: error.to_string(),
        }),
        _ => None,
    }
}

/// A frame as a reader task hands it on.
enum Incoming {
    Message(Message),
    /// A `Chunk` frame, read straight into its own buffer and hashed on a
    /// blocking thread: `actual` is the BLAKE3 of `data`, which the protocol
    /// machine compares with `hash`.
    Chunk {
        upload: UploadId,
        hash: Hash,
        data: Vec<u8>,
        actual: Hash,
    },
}

/// Reads a payload of `len` bytes. A `Chunk` (recognised from its first
/// bytes by [`chunk_head`]) has its data read from quinn's buffers into a
/// buffer of its own, without the copy a decode would make, and is hashed
/// off the async workers, so the connection's task only decides. Anything
/// else is decoded as usual (which also reports a malformed chunk).
async fn read_message(
    recv: &mut RecvStream,
    len: usize,
    idle: Duration,
) -> Result<Incoming, WireIoError> {
    let mut start = Vec::with_capacity(len.min(MAX_CHUNK_HEAD_LEN));
    read_into(recv, &mut start, len.min(MAX_CHUNK_HEAD_LEN), idle).await?;
    let Some(head) = chunk_head(&start, len) else {
        let mut payload = start;
        payload.reserve_exact(len - payload.len());
        read_into(recv, &mut payload, len, idle).await?;
        return Ok(Incoming::Message(decode_payload(&payload)?));
    };
    let mut data = Vec::with_capacity(head.data_len);
    data.extend_from_slice(&start[head.head_len..]);
    read_into(recv, &mut data, head.data_len, idle).await?;
    let (data, actual) = if data.len() <= INLINE_HASH_BYTES {
        let actual = Hash::of(&data);
        (data, actual)
    } else {
        tokio::task::spawn_blocking(move || {
            let actual = Hash::of(&data);
            (data, actual)
        })
        .await
        .map_err(|_| WireIoError::Truncated)?
    };
    Ok(Incoming::Chunk {
        upload: head.upload,
        hash: head.hash,
        data,
        actual,
    })
}

/// Appends stream bytes to `buf` until it holds `until` bytes; `idle`
/// bounds each wait.
async fn read_into(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
    until: usize,
    idle: Duration,
) -> Result<(), WireIoError> {
    while buf.len() < until {
        match tokio::time::timeout(idle, recv.read_chunk(until - buf.len(), true)).await {
            Err(_) => return Err(WireIoError::Idle(idle)),
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk.bytes),
            Ok(Ok(None)) => return Err(WireIoError::Truncated),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

fn store_wire_error(e: StoreError) -> WireError {
    match e {
        StoreError::NotFound { path, .. } => WireError::NotFound { path },
        StoreError::DiskFull { .. } => WireError::DiskFull,
        other => WireError::Storage {
            detail: other.to_string(),
        },
    }
}

async fn serve_request(
    store: Arc<ClientStore>,
    admission: Arc<dyn Admission>,
    client: ClientName,
    request: Request,
    writer: mpsc::Sender<Message>,
) {
    let error = |error: WireError| Message::Error {
        upload: None,
        error,
    };
    match request {
        Request::List { dir, after } => {
            let s = store.clone();
            let limit = MAX_LIST_ENTRIES as usize;
            let result =
                tokio::task::spawn_blocking(move || s.list(dir.as_ref(), after.as_ref(), limit))
                    .await;
            let message = match result {
                Ok(Ok((entries, more))) => Message::ListReply { entries, more },
                Ok(Err(e)) => error(store_wire_error(e)),
                Err(e) => error(WireError::Storage {
                    detail: e.to_string(),
                }),
            };
            let _ = writer.send(message).await;
        }
        Request::Delete { path } => {
            let s = store.clone();
            let p = path.clone();
            let message = match tokio::task::spawn_blocking(move || s.delete(&p)).await {
                Ok(Ok(())) => Message::Deleted {
                    path: path.into_string(),
                },
                Ok(Err(e)) => error(store_wire_error(e)),
                Err(e) => error(WireError::Storage {
                    detail: e.to_string(),
                }),
            };
            let _ = writer.send(message).await;
        }
        Request::Status => {
            let space = admission.space(&client);
            let _ = writer
                .send(Message::StatusReply(StatusReply {
                    used: space.used,
                    available: space.available,
                    quota: space.quota,
                    files: store.files(),
                }))
                .await;
        }
        Request::Download { path } => {
            // The manifest is taken from the file itself (recomputed if the
            // stored one is stale) and the file stays open, so what is sent
            // is what the manifest describes; the client verifies anyway.
            let s = store.clone();
            let p = path.clone();
            let opened = tokio::task::spawn_blocking(move || {
                let file = s.open_document(&p)?;
                let manifest = s.document_manifest(&p)?;
                Ok::<_, StoreError>((file, manifest))
            })
            .await;
            let (file, manifest) = match opened {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    let _ = writer.send(error(store_wire_error(e))).await;
                    return;
                }
                Err(e) => {
                    let _ = writer
                        .send(error(WireError::Storage {
                            detail: e.to_string(),
                        }))
                        .await;
                    return;
                }
            };
            let chunks = manifest.chunks.clone();
            if writer.send(Message::DownloadBegin(manifest)).await.is_err() {
                return;
            }
            let file = Arc::new(Mutex::new(file));
            for chunk in chunks {
                let f = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut file = f.lock();
                    ClientStore::read_at(&mut file, chunk.offset, chunk.len)
                })
                .await;
                let data = match read {
                    Ok(Ok(data)) => data,
                    Ok(Err(e)) => {
                        let _ = writer
                            .send(error(WireError::Storage {
                                detail: format!("{client}: {path}: {e}"),
                            }))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                if writer
                    .send(Message::DownloadChunk {
                        hash: chunk.hash,
                        data,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}
