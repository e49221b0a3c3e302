//! The control socket server.
//!
//! A Unix stream socket (mode 0660) speaking the framed postcard protocol of
//! `appliance_types::control`. Each connection gets its own task; a hostile or
//! broken client can only ever hurt its own connection:
//! - the length prefix is checked before anything is allocated, so an
//!   oversized prefix costs nothing and closes the connection;
//! - the handshake must arrive within [`HANDSHAKE_TIMEOUT`] and every later
//!   frame within `control.idle_timeout_secs`;
//! - at most `control.max_connections` connections are served at once; the
//!   next is told `busy` and closed.
//!
//! Mutating requests need an admin peer: root, the daemon's own uid, or a
//! member of `control.admin_group` (primary or supplementary group). The
//! peer's uid/gid/pid come from `SO_PEERCRED` (via nix) and its supplementary
//! groups from `/proc/<pid>/status`, read when it connects.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_types::control::{
    check_frame_len, check_hello, decode_payload, encode_frame, ClientHello, ControlError,
    ErrorCode, FrameError, Request, Response, ServerHello, LEN_PREFIX, PROTOCOL_VERSION,
};
use appliance_types::health::{self, ComponentState, StatusReport};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::health::{HealthHandle, HealthRegistry};
use crate::liveness::LivenessResponder;
use crate::logging::LogControl;
use crate::supervisor::{Endpoints, LoopState};

/// How long a new connection has to send its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Process id (0 if unknown).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, as far as they could be read.
    pub groups: Vec<u32>,
}

/// The authorisation rule for mutating requests.
pub fn may_mutate(peer: &Peer, daemon_uid: u32, admin_gid: Option<u32>) -> bool {
    peer.uid == 0
        || peer.uid == daemon_uid
        || admin_gid.is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
}

/// Parses the `Groups:` line of `/proc/<pid>/status`.
pub fn parse_proc_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Settings of the server, resolved from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Socket path.
    pub path: PathBuf,
    /// Largest frame.
    pub max_frame: u32,
    /// Connection limit.
    pub max_connections: u32,
    /// Idle timeout per connection.
    pub idle_timeout: Duration,
    /// The daemon's uid.
    pub daemon_uid: u32,
    /// The admin group's gid, if the group exists.
    pub admin_gid: Option<u32>,
    /// Group to own the socket, if configured.
    pub socket_gid: Option<u32>,
}

/// Everything a request may need from the daemon.
#[derive(Debug, Clone)]
pub struct Context {
    /// Component health.
    pub health: HealthRegistry,
    /// Listening addresses.
    pub endpoints: Endpoints,
    /// The main loop's last liveness result.
    pub loop_state: LoopState,
    /// Run-time log filter.
    pub log: Option<LogControl>,
    /// When the daemon started.
    pub started: Instant,
    /// The event bus.
    pub bus: Option<appliance_bus::Bus>,
    /// The agent response cache.
    pub cache: Option<std::sync::Arc<appliance_cache::Cache>>,
    /// The sync endpoint, once it has started.
    pub sync: crate::sync::SyncSlot,
    /// The storage manager.
    pub storage: Option<crate::storage::Storage>,
}

impl Context {
    /// Builds the status report.
    pub fn status(&self) -> StatusReport {
        let components = self.health.snapshot();
        let loop_alive = self.loop_state.alive();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            probes: health::probes(&components, loop_alive),
            score: health::score(&components),
            components,
            endpoints: self.endpoints.snapshot(),
        }
    }

    /// Carries out one authorised request that has a single answer.
    pub fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(self.status()),
            Request::Health(p) => {
                let status = self.status();
                Response::Health(status.probes.get(p).clone())
            }
            Request::SetLogFilter(directive) => match &self.log {
                None => Response::Error(ControlError::new(
                    ErrorCode::Unavailable,
                    "run-time log control is not available in this process",
                )),
                Some(log) => match log.set_filter(&directive) {
                    Ok(()) => {
                        info!(filter = %directive, "log filter changed");
                        Response::Done(format!("log filter is now {directive:?}"))
                    }
                    Err(e) => Response::Error(ControlError::new(ErrorCode::InvalidArgument, e)),
                },
            },
            Request::Events(_) | Request::Cache(_) | Request::Sync(_) | Request::Storage(_) => {
                Response::Error(ControlError::new(
                    ErrorCode::Internal,
                    "this request is served by the asynchronous path",
                ))
            }
        }
    }
}

/// The control connection as a sink for streamed answers.
struct ConnSink<'a> {
    stream: &'a mut UnixStream,
    max_frame: u32,
}

impl crate::bus::EventSink for ConnSink<'_> {
    async fn send(
        &mut self,
        r: Result<appliance_types::events::EventsResponse, ControlError>,
    ) -> std::io::Result<()> {
        let resp = match r {
            Ok(e) => Response::Events(e),
            Err(e) => Response::Error(e),
        };
        write_msg(self.stream, &resp, self.max_frame).await
    }

    async fn closed(&mut self) {
        // The client sends nothing while it listens: any readable event is
        // its hang-up (or a protocol violation, which ends the stream too).
        let mut byte = [0u8; 1];
        let _ = self.stream.read(&mut byte).await;
    }
}

/// Room left in a frame for a message's payload after its envelope.
const ENVELOPE_ROOM: usize = 16 * 1024;

async fn serve_request(
    ctx: &Context,
    req: Request,
    stream: &mut UnixStream,
    max_frame: u32,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    match req {
        Request::Events(ev) => {
            let Some(bus) = &ctx.bus else {
                let e = ControlError::new(ErrorCode::Unavailable, "the event bus is not running");
                return write_msg(stream, &Response::Error(e), max_frame).await;
            };
            let max_payload = (max_frame as usize).saturating_sub(ENVELOPE_ROOM);
            let mut sink = ConnSink { stream, max_frame };
            crate::bus::handle(bus, ev, &mut sink, max_payload, shutdown).await
        }
        Request::Cache(req) => {
            let Some(cache) = &ctx.cache else {
                let e = ControlError::new(
                    ErrorCode::Unavailable,
                    "the agent response cache is not running",
                );
                return write_msg(stream, &Response::Error(e), max_frame).await;
            };
            cache_request(cache, req, stream, max_frame, idle_timeout).await
        }
        Request::Sync(req) => {
            let resp = match ctx.sync.get() {
                None => Response::Error(ControlError::new(
                    ErrorCode::Unavailable,
                    "the sync endpoint is not running (see `appliancectl status`; config key `sync.enabled`)",
                )),
                Some(sync) => match crate::sync::handle(sync, req).await {
                    Ok(r) => Response::Sync(r),
                    Err(e) => Response::Error(e),
                },
            };
            write_msg(stream, &resp, max_frame).await
        }
        Request::Storage(req) => {
            let resp = match &ctx.storage {
                None => Response::Error(ControlError::new(
                    ErrorCode::Unavailable,
                    "the storage component is not running",
                )),
                Some(s) => match crate::storage::handle(s, req).await {
                    Ok(r) => Response::Storage(r),
                    Err(e) => Response::Error(e),
                },
            };
            write_msg(stream, &resp, max_frame).await
        }
        other => write_msg(stream, &ctx.handle(other), max_frame).await,
    }
}

fn cache_reply(r: Result<appliance_types::cache::CacheResponse, ControlError>) -> Response {
    match r {
        Ok(c) => Response::Cache(c),
        Err(e) => Response::Error(e),
    }
}

async fn cache_request(
    cache: &std::sync::Arc<appliance_cache::Cache>,
    req: appliance_types::cache::CacheRequest,
    stream: &mut UnixStream,
    max_frame: u32,
    idle_timeout: Duration,
) -> std::io::Result<()> {
    use appliance_types::cache::{CacheRequest, CacheResponse};
    match req {
        CacheRequest::Import => {
            let mut import = crate::cache::Import::start(cache);
            loop {
                let Ok(payload) = read_frame(stream, max_frame, idle_timeout).await else {
                    // The client went away mid-import: the file is parsed
                    // whole before any entry goes in, so nothing is imported.
                    let _ = import.finish().await;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "import interrupted",
                    ));
                };
                match decode_payload::<Request>(&payload, "request") {
                    Ok(Request::Cache(CacheRequest::ImportChunk(piece))) if piece.is_empty() => {
                        break
                    }
                    Ok(Request::Cache(CacheRequest::ImportChunk(piece))) => import.feed(piece),
                    _ => {
                        let _ = import.finish().await;
                        let e = ControlError::new(
                            ErrorCode::BadFrame,
                            "expected the next piece of the import (an empty piece ends it)",
                        );
                        return write_msg(stream, &Response::Error(e), max_frame).await;
                    }
                }
            }
            write_msg(stream, &cache_reply(import.finish().await), max_frame).await
        }
        CacheRequest::Export => {
            let (mut pieces, task) = crate::cache::export(cache, max_frame);
            while let Some(piece) = pieces.recv().await {
                write_msg(
                    stream,
                    &Response::Cache(CacheResponse::ExportChunk(piece)),
                    max_frame,
                )
                .await?;
            }
            let done = task.await.unwrap_or_else(|e| {
                Err(ControlError::new(
                    ErrorCode::Internal,
                    format!("export task failed: {e}"),
                ))
            });
            write_msg(stream, &cache_reply(done), max_frame).await
        }
        CacheRequest::GetPieces {
            agent,
            prompt,
            variant,
        } => {
            // The value is shared with the cache (no copy); at most one
            // piece of it is copied into a frame at a time.
            let Some(value) = cache.get(agent.as_bytes(), prompt.as_bytes(), variant.as_bytes())
            else {
                return write_msg(stream, &Response::Cache(CacheResponse::Miss), max_frame).await;
            };
            let len = CacheResponse::HitLen(value.len() as u64);
            write_msg(stream, &Response::Cache(len), max_frame).await?;
            for piece in value.chunks(crate::cache::export_piece(max_frame)) {
                let piece = CacheResponse::HitPiece(piece.to_vec());
                write_msg(stream, &Response::Cache(piece), max_frame).await?;
            }
            Ok(())
        }
        CacheRequest::PutPieces {
            agent,
            prompt,
            variant,
            len,
            ttl_secs,
        } => {
            // Refused on the announced length, before the client sends a
            // byte of it.
            let put = crate::cache::check_ttl(ttl_secs).and_then(|()| {
                crate::cache::PutAssembly::start(len, cache.config().max_value_bytes)
            });
            let mut put = match put {
                Ok(p) => p,
                Err(e) => return write_msg(stream, &Response::Error(e), max_frame).await,
            };
            write_msg(stream, &Response::Cache(CacheResponse::PutReady), max_frame).await?;
            while !put.is_complete() {
                let Ok(payload) = read_frame(stream, max_frame, idle_timeout).await else {
                    // The client went away (or stalled) mid-put: the pieces
                    // are dropped and nothing is stored.
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "put interrupted",
                    ));
                };
                let fed = match decode_payload::<Request>(&payload, "request") {
                    Ok(Request::Cache(CacheRequest::PutPiece(piece))) => put.feed(&piece),
                    _ => Err(ControlError::new(
                        ErrorCode::BadFrame,
                        "expected the next piece of the response being put; nothing was stored",
                    )),
                };
                if let Err(e) = fed {
                    return write_msg(stream, &Response::Error(e), max_frame).await;
                }
            }
            let req = CacheRequest::Put {
                agent,
                prompt,
                variant,
                response: put.into_response(),
                ttl_secs,
            };
            write_msg(
                stream,
                &cache_reply(crate::cache::handle(cache, req).await),
                max_frame,
            )
            .await
        }
        other => {
            write_msg(
                stream,
                &cache_reply(crate::cache::handle(cache, other).await),
                max_frame,
            )
            .await
        }
    }
}

/// Binds the socket: refuses to steal a live daemon's socket, removes a stale
/// one, sets mode 0660 and the group.
pub fn bind(settings: &Settings) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};

    let path = &settings.path;
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another applianced is already listening on {}; stop it first",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    if let Some(gid) = settings.socket_gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

/// Runs the accept loop until `shutdown`; then waits for open connections to
/// finish their current request.
pub async fn serve(
    listener: UnixListener,
    settings: Settings,
    ctx: Context,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.max_connections as usize));
    let tracker = TaskTracker::new();
    health.set(
        ComponentState::Ready,
        format!("listening on {}", settings.path.display()),
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let settings = settings.clone();
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tracker.spawn(async move {
                            connection(stream, &settings, &ctx, shutdown).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracker.spawn(async move {
                            let mut stream = stream;
                            let err = Response::Error(ControlError::new(ErrorCode::Busy, "too many control connections; try again"));
                            let _ = write_msg(&mut stream, &err, settings.max_frame).await;
                        });
                    }
                }
            }
        }
    }
    health.set(ComponentState::Starting, "shutting down");
    drop(listener);
    let _ = std::fs::remove_file(&settings.path);
    tracker.close();
    tracker.wait().await;
}

fn peer_of(stream: &UnixStream) -> Peer {
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => {
            let groups = std::fs::read_to_string(format!("/proc/{}/status", c.pid()))
                .map(|s| parse_proc_groups(&s))
                .unwrap_or_default();
            Peer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
                groups,
            }
        }
        Err(e) => {
            // Without credentials nobody is trusted with a mutating request.
            warn!(error = %e, "cannot read peer credentials");
            Peer {
                pid: 0,
                uid: u32::MAX,
                gid: u32::MAX,
                groups: Vec::new(),
            }
        }
    }
}

enum ReadError {
    /// The peer closed (cleanly or mid-frame).
    Closed,
    /// Nothing arrived in time.
    Timeout,
    /// The prefix was out of range; the stream is out of sync.
    Frame(FrameError),
    /// Socket error.
    Io(std::io::Error),
}

async fn read_frame(
    stream: &mut UnixStream,
    max: u32,
    timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    let read = async {
        let mut prefix = [0u8; LEN_PREFIX];
        if let Err(e) = stream.read_exact(&mut prefix).await {
            return Err(io_to_read_error(e));
        }
        let len = check_frame_len(prefix, max).map_err(ReadError::Frame)?;
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .await
            .map_err(io_to_read_error)?;
        Ok(payload)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ReadError::Timeout))
}

fn io_to_read_error(e: std::io::Error) -> ReadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ReadError::Closed
    } else {
        ReadError::Io(e)
    }
}

async fn write_msg<T: serde::Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    max: u32,
) -> std::io::Result<()> {
    let frame = match encode_frame(msg, max) {
        Ok(f) => f,
        Err(e) => {
            // The answer itself is too large: say so instead.
            let err = Response::Error(ControlError::new(ErrorCode::Internal, e.to_string()));
            encode_frame(&err, max).map_err(std::io::Error::other)?
        }
    };
    tokio::time::timeout(Duration::from_secs(10), stream.write_all(&frame))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer is not reading"))?
}

async fn connection(
    mut stream: UnixStream,
    settings: &Settings,
    ctx: &Context,
    shutdown: CancellationToken,
) {
    let peer = peer_of(&stream);
    let admin = may_mutate(&peer, settings.daemon_uid, settings.admin_gid);
    debug!(pid = peer.pid, uid = peer.uid, admin, "control connection");

    // Handshake.
    let hello = match read_frame(&mut stream, settings.max_frame, HANDSHAKE_TIMEOUT).await {
        Ok(p) => p,
        Err(e) => {
            reject_read_error(&mut stream, e, settings.max_frame, &peer).await;
            return;
        }
    };
    let hello: ClientHello = match decode_payload(&hello, "client hello") {
        Ok(h) => h,
        Err(e) => {
            debug!(pid = peer.pid, error = %e, "bad hello");
            let _ = write_msg(&mut stream, &Response::Error(e.into()), settings.max_frame).await;
            return;
        }
    };
    if let Err(e) = check_hello(&hello) {
        debug!(pid = peer.pid, client = %hello.client, error = %e, "hello refused");
        let _ = write_msg(&mut stream, &Response::Error(e), settings.max_frame).await;
        return;
    }
    let server_hello = ServerHello {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        max_frame: settings.max_frame,
        admin,
    };
    if write_msg(&mut stream, &server_hello, settings.max_frame)
        .await
        .is_err()
    {
        return;
    }

    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => {
                let bye = Response::Error(ControlError::new(ErrorCode::ShuttingDown, "applianced is shutting down"));
                let _ = write_msg(&mut stream, &bye, settings.max_frame).await;
                return;
            }
            f = read_frame(&mut stream, settings.max_frame, settings.idle_timeout) => f,
        };
        let payload = match frame {
            Ok(p) => p,
            Err(e) => {
                reject_read_error(&mut stream, e, settings.max_frame, &peer).await;
                return;
            }
        };
        let response = match decode_payload::<Request>(&payload, "request") {
            // The frame boundary is intact, so the connection stays usable.
            Err(e) => Response::Error(e.into()),
            Ok(req) if req.is_mutating() && !admin => {
                warn!(
                    pid = peer.pid,
                    uid = peer.uid,
                    request = req.name(),
                    "mutating request refused"
                );
                Response::Error(ControlError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "{} changes the appliance and needs root or membership of the admin group (uid {} is neither)",
                        req.name(),
                        peer.uid
                    ),
                ))
            }
            Ok(req) => {
                if serve_request(
                    ctx,
                    req,
                    &mut stream,
                    settings.max_frame,
                    settings.idle_timeout,
                    &shutdown,
                )
                .await
                .is_err()
                {
                    return;
                }
                continue;
            }
        };
        if write_msg(&mut stream, &response, settings.max_frame)
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn reject_read_error(stream: &mut UnixStream, e: ReadError, max: u32, peer: &Peer) {
    match e {
        ReadError::Closed => {}
        ReadError::Timeout => {
            debug!(pid = peer.pid, "control connection idle; closing");
        }
        ReadError::Io(e) => debug!(pid = peer.pid, error = %e, "control connection error"),
        ReadError::Frame(e) => {
            debug!(pid = peer.pid, error = %e, "bad frame; closing");
            let _ = write_msg(stream, &Response::Error(e.into()), max).await;
        }
    }
}

/// Resolves a group name to its gid, `None` if the group does not exist.
pub fn group_gid(name: &str) -> anyhow::Result<Option<u32>> {
    Ok(nix::unistd::Group::from_name(name)?.map(|g| g.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn who_may_mutate() {
        let daemon = 990;
        let admin = Some(995);
        assert!(may_mutate(&peer(0, 0, &[]), daemon, admin));
        assert!(may_mutate(&peer(990, 990, &[]), daemon, admin));
        assert!(may_mutate(&peer(1000, 995, &[]), daemon, admin));
        assert!(may_mutate(&peer(1000, 1000, &[27, 995]), daemon, admin));
        assert!(!may_mutate(&peer(1000, 1000, &[27]), daemon, admin));
        assert!(!may_mutate(&peer(1000, 1000, &[995]), daemon, None));
        assert!(!may_mutate(&peer(u32::MAX, u32::MAX, &[]), daemon, admin));
    }

    #[test]
    fn proc_groups_parse() {
        let status = "Name:\tbash\nUmask:\t0022\nGroups:\t4 24 27 1000 \nNSpid:\t1\n";
        assert_eq!(parse_proc_groups(status), vec![4, 24, 27, 1000]);
        assert_eq!(parse_proc_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_proc_groups("nothing here"), Vec::<u32>::new());
    }
}
