//! The NATS endpoint: a thin tokio adapter around [`crate::proto`] and the
//! [`Bus`].
//!
//! Each connection has a reader (socket → parser → bus) and a writer (the
//! connection's bounded outbound queue → socket). The reader never waits on
//! the writer, so a client that stops reading only fills its own queue, and
//! the slow-consumer policy decides what happens (bounded memory either way).
//! A fatal protocol error gets `-ERR` and a close of that connection only.
//!
//! Other errors follow nats-server, since stock clients (nats.go, nats-py)
//! close for good on an `-ERR` they do not expect:
//! * `PUB`/`HPUB` to an invalid subject or reply: dropped and counted (the
//!   connection's `drops`), logged at debug; `-ERR 'Invalid Publish
//!   Subject'` only when the client's `CONNECT` set `pedantic` (nats-server
//!   would route it anyway; the bus cannot). The connection goes on, and a
//!   `verbose` client still gets its `+OK`.
//! * `SUB` to an invalid pattern: `-ERR 'Invalid Subject'`, connection
//!   goes on.
//! * A payload over the bus's own limit: `-ERR 'Maximum Payload
//!   Violation'` and close.
//! * A publish the durable log refuses: `-ERR 'Durable Log Failure: ...'`
//!   and close (nats-server has no such case). Dropping it quietly would
//!   lose data unseen; closing makes the failure visible to the client,
//!   whose later publishes then fail or wait for a reconnect.
//!
//! A client that stops reading altogether is caught even while its queue
//! is under the bounds: every write must make progress within
//! `ServerOptions::write_deadline` (2 s, nats-server's default). When it
//! does not, the connection is closed as a slow consumer (counted on the
//! connection and on the top-level subjects it subscribed to; no final
//! `-ERR`, which could not be written either), it is unregistered at once,
//! its queue is released and its writer task stopped. Unlike nats-server,
//! whose deadline covers a whole flush, the deadline here is on progress:
//! a client that reads, however slowly, is left to the pending-bytes bound.
//!
//! `+OK` (verbose mode) and `PONG` are sent only once every durable message
//! the connection published before them is fsynced (under
//! `DurableFsync::Always`): so `PUB` + `PING` → `PONG` is a durable
//! acknowledgement, with many publishes sharing one fsync.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, ConnHandle, Wakes};
use crate::message::{Headers, Message};
use crate::proto::{self, ClientOp, Parser, ProtocolError, ServerInfo};
use crate::queue::{CloseReason, SlowConsumerPolicy};

/// Settings of the NATS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Advertised in `INFO` and enforced (a larger `PUB` is a fatal error).
    pub max_payload: usize,
    /// Longest control line (NATS default 4096).
    pub max_control_line: usize,
    /// Concurrent connections; more get `-ERR` and are closed.
    pub max_connections: usize,
    /// Outbound bytes queued per connection before the slow-consumer policy
    /// applies (nats-server's default is 64 MiB).
    pub max_pending_bytes: usize,
    /// Outbound messages queued per connection, likewise.
    pub max_pending_msgs: usize,
    /// What to do with a connection that falls behind.
    pub slow_consumer: SlowConsumerPolicy,
    /// How often the server pings an idle client.
    pub ping_interval: Duration,
    /// Unanswered pings before the connection is considered dead.
    pub max_pings_out: u32,
    /// Longest a write to a client may go without progress (nats-server's
    /// `write_deadline`, default 2 s). A client that stops reading is closed
    /// as a slow consumer once it expires (see the module docs).
    pub write_deadline: Duration,
    /// `server_name` in `INFO`.
    pub server_name: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_payload: 1 << 20,
            max_control_line: 4096,
            max_connections: 256,
            max_pending_bytes: 64 << 20,
            max_pending_msgs: 1 << 20,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
            write_deadline: Duration::from_secs(2),
            server_name: "appliance".into(),
        }
    }
}

/// Serves NATS clients on a TCP listener until `shutdown` is cancelled, then
/// closes every connection and returns.
pub async fn serve(
    bus: Bus,
    listener: TcpListener,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let opts = Arc::new(opts);
    let limit = Arc::new(Semaphore::new(opts.max_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "NATS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let info = (local.ip().to_string(), local.port(), Some(peer.ip().to_string()));
                conns.spawn(run_conn(bus.clone(), stream, peer.to_string(), info, opts.clone(), limit.clone(), shutdown.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Serves NATS clients on a Unix socket until `shutdown` is cancelled.
pub async fn serve_unix(
    bus: Bus,
    listener: UnixListener,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let opts = Arc::new(opts);
    let limit = Arc::new(Semaphore::new(opts.max_connections));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS accept (unix) failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let info = ("unix".to_owned(), 0, None);
                conns.spawn(run_conn(bus.clone(), stream, "unix".into(), info, opts.clone(), limit.clone(), shutdown.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}

fn server_id() -> String {
    let t = appliance_record_log::now_ms();
    format!("APPLIANCE{:08X}{t:012X}", std::process::id())
}

async fn run_conn<S>(
    bus: Bus,
    stream: S,
    peer: String,
    (host, port, client_ip): (String, u16, Option<String>),
    opts: Arc<ServerOptions>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let Ok(_permit) = limit.try_acquire_owned() else {
        let mut b = BytesMut::new();
        proto::encode_err(&mut b, "maximum connections exceeded");
        let _ = wr.write_all(&b).await;
        let _ = wr.shutdown().await;
        return;
    };
    let conn = bus.register_conn(
        peer.clone(),
        opts.max_pending_bytes,
        opts.max_pending_msgs,
        opts.slow_consumer,
    );
    let info = ServerInfo {
        server_id: server_id(),
        server_name: opts.server_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        go: "appliance-bus".into(),
        host,
        port,
        headers: true,
        max_payload: opts.max_payload,
        proto: 1,
        client_id: conn.id,
        client_ip,
    };
    let mut b = BytesMut::new();
    proto::encode_info(&info, &mut b);
    conn.out.push_control(&b);

    let mut writer = tokio::spawn(write_loop(
        bus.clone(),
        conn.clone(),
        wr,
        opts.write_deadline,
    ));
    // The connection ends when either side does: a writer that gave up (write
    // deadline, write error, slow consumer) ends it even while the client
    // sends nothing.
    let (reason, writer_done) = tokio::select! {
        r = read_loop(&bus, &conn, &mut rd, &opts, &shutdown) => (r, false),
        _ = &mut writer => (End::Writer, true),
    };
    tracing::debug!(peer, id = conn.id, ?reason, "NATS connection ending");
    bus.unregister_conn(&conn);
    conn.out.close(CloseReason::ConnectionClosed);
    // Let the writer flush what is queued (a final -ERR) for at most one
    // write deadline, then stop it: it owns the socket's write half.
    if !writer_done
        && tokio::time::timeout(opts.write_deadline, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
    // Release whatever is still queued now, not when the last reference to
    // the connection goes.
    let _ = conn.out.take_into(&mut BytesMut::new());
}

/// Writes all of `buf`, failing with `TimedOut` when a write makes no
/// progress for `deadline`.
async fn write_by<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut BytesMut,
    deadline: Duration,
) -> io::Result<()> {
    while !buf.is_empty() {
        match tokio::time::timeout(deadline, wr.write_buf(buf)).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(
    bus: Bus,
    conn: Arc<ConnHandle>,
    mut wr: W,
    deadline: Duration,
) {
    let mut buf = BytesMut::new();
    loop {
        match conn.out.take_into(&mut buf) {
            Ok(true) => match write_by(&mut wr, &mut buf, deadline).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    write_deadline_exceeded(&bus, &conn, deadline, buf.len());
                    return;
                }
                Err(_) => {
                    conn.out.close(CloseReason::ConnectionClosed);
                    return;
                }
            },
            Ok(false) => conn.out.notify.notified().await,
            Err(reason) => {
                if reason == CloseReason::SlowConsumer {
                    let mut b = BytesMut::new();
                    proto::encode_err(&mut b, "Slow Consumer");
                    let _ = write_by(&mut wr, &mut b, deadline).await;
                }
                let _ = tokio::time::timeout(deadline, wr.shutdown()).await;
                return;
            }
        }
    }
}

/// A client stopped reading: close it as a slow consumer (as nats-server
/// does on `write_deadline`, without a final `-ERR`, which could not be
/// written either), and count it on the connection and on the top-level
/// subjects it subscribed to.
fn write_deadline_exceeded(bus: &Bus, conn: &ConnHandle, deadline: Duration, unsent: usize) {
    conn.out.close(CloseReason::SlowConsumer);
    conn.counters.counters.slow_consumer();
    conn.counters.slow.store(true, Ordering::Relaxed);
    let mut tops: Vec<String> = conn
        .subs
        .lock()
        .values()
        .filter_map(|s| {
            let top = s.pattern.as_str().split('.').next()?;
            (top != "*" && top != ">").then(|| top.to_owned())
        })
        .collect();
    tops.sort_unstable();
    tops.dedup();
    for top in &tops {
        bus.inner.subjects.get(top).slow_consumer();
    }
    tracing::warn!(peer = %conn.peer, id = conn.id, ?deadline, unsent, "NATS slow consumer: write deadline exceeded, closing the connection");
}

/// Why the connection ended.
#[derive(Debug)]
enum End {
    Eof,
    ReadError,
    Protocol,
    /// The outbound side was closed (slow consumer, failed publish).
    Closed,
    Stale,
    Shutdown,
    /// The writer stopped (write deadline, write error, slow consumer).
    Writer,
}

async fn read_loop<R: AsyncRead + Unpin>(
    bus: &Bus,
    conn: &Arc<ConnHandle>,
    rd: &mut R,
    opts: &ServerOptions,
    shutdown: &CancellationToken,
) -> End {
    let mut parser = Parser::new(opts.max_control_line, opts.max_payload);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut verbose = false;
    let mut pedantic = false;
    let mut no_responders = false;
    let mut pending_sync: Option<u64> = None;
    // Consecutive PUBs from one read are published together, so a run of
    // durable messages costs one write to the log.
    let mut batch: Vec<Message> = Vec::new();
    let mut pings_out = 0u32;
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + opts.ping_interval,
        opts.ping_interval,
    );
    loop {
        if conn.out.is_closed() {
            return End::Closed;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return End::Shutdown,
            _ = ping.tick() => {
                if pings_out >= opts.max_pings_out {
                    let mut b = BytesMut::new();
                    proto::encode_err(&mut b, "Stale Connection");
                    conn.out.push_control(&b);
                    return End::Stale;
                }
                pings_out += 1;
                conn.out.push_control(proto::PING);
                continue;
            }
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(_) => return End::ReadError,
            },
        }
        loop {
            if conn.out.is_closed() {
                flush_batch(bus, conn, &mut batch, &mut pending_sync);
                return End::Closed;
            }
            let op = match parser.parse(&mut buf) {
                Ok(Some(op)) => op,
                Ok(None) => {
                    flush_batch(bus, conn, &mut batch, &mut pending_sync);
                    break;
                }
                Err(ProtocolError::InvalidPublishSubject(e)) => {
                    // As nats-server: reported only to pedantic clients
                    // (stock clients close for good on an unexpected -ERR).
                    // nats-server would still route it; a subject the bus
                    // cannot match is dropped instead, and counted.
                    flush_batch(bus, conn, &mut batch, &mut pending_sync);
                    conn.counters.counters.drop_one();
                    tracing::debug!(peer = %conn.peer, error = %e, pedantic, "NATS publish to an invalid subject dropped");
                    if pedantic {
                        err(conn, "Invalid Publish Subject");
                    }
                    if verbose {
                        conn.out.push_control(proto::OK);
                    }
                    continue;
                }
                Err(e) => {
                    flush_batch(bus, conn, &mut batch, &mut pending_sync);
                    tracing::debug!(peer = %conn.peer, error = %e, "NATS protocol error");
                    let mut b = BytesMut::new();
                    proto::encode_err(&mut b, &e.err_text());
                    conn.out.push_control(&b);
                    if e.is_fatal() {
                        return End::Protocol;
                    }
                    continue;
                }
            };
            if !matches!(op, ClientOp::Pub { .. }) {
                flush_batch(bus, conn, &mut batch, &mut pending_sync);
            }
            match op {
                ClientOp::Connect(c) => {
                    verbose = c.verbose;
                    pedantic = c.pedantic;
                    no_responders = c.no_responders && c.headers;
                    conn.headers.store(c.headers, Ordering::Relaxed);
                    conn.echo.store(c.echo, Ordering::Relaxed);
                    *conn.name.lock() = c.name.clone();
                    if verbose {
                        conn.out.push_control(proto::OK);
                    }
                }
                ClientOp::Pub {
                    subject,
                    reply,
                    headers,
                    payload,
                } => {
                    if let Some(r) = reply.as_ref().filter(|_| no_responders) {
                        if !bus.has_interest(subject.as_str()) {
                            flush_batch(bus, conn, &mut batch, &mut pending_sync);
                            send_no_responders(bus, r.as_str());
                            if verbose {
                                conn.out.push_control(proto::OK);
                            }
                            continue;
                        }
                    }
                    let msg = match bus.message(subject, reply, headers, payload) {
                        Ok(m) => m,
                        Err(e) => {
                            // Only a payload over the bus's own limit (lower
                            // than the advertised one): fatal, as in nats-server.
                            flush_batch(bus, conn, &mut batch, &mut pending_sync);
                            tracing::debug!(peer = %conn.peer, error = %e, "NATS publish refused");
                            fail(conn, "Maximum Payload Violation");
                            return End::Protocol;
                        }
                    };
                    batch.push(msg);
                    if verbose || batch.len() >= MAX_BATCH {
                        flush_batch(bus, conn, &mut batch, &mut pending_sync);
                    }
                    if verbose && ack_after_sync(bus, conn, &mut pending_sync).await {
                        conn.out.push_control(proto::OK);
                    }
                }
                ClientOp::Sub {
                    subject,
                    queue,
                    sid,
                } => match bus.conn_subscribe(conn, &sid, &subject, queue.as_deref()) {
                    Ok(()) if verbose => {
                        conn.out.push_control(proto::OK);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "NATS subscribe refused");
                        err(conn, "Invalid Subject");
                    }
                },
                ClientOp::Unsub { sid, max } => {
                    bus.conn_unsubscribe(conn, &sid, max);
                    if verbose {
                        conn.out.push_control(proto::OK);
                    }
                }
                ClientOp::Ping => {
                    if ack_after_sync(bus, conn, &mut pending_sync).await {
                        conn.out.push_control(proto::PONG);
                    }
                }
                ClientOp::Pong => pings_out = 0,
            }
        }
    }
}

/// Most PUBs published as one batch.
const MAX_BATCH: usize = 256;

fn flush_batch(bus: &Bus, conn: &ConnHandle, batch: &mut Vec<Message>, pending: &mut Option<u64>) {
    if batch.is_empty() {
        return;
    }
    let (t, errors) = bus.inner.publish_batch(batch, Some(conn));
    if t.wait_sync {
        *pending = t.seq.max(*pending);
    }
    if let Some(e) = errors.first() {
        publish_failed(conn, e);
    }
}

/// A publish the bus refused (the durable log failed, or the bus is shutting
/// down). Dropping it silently would lose data unseen, so the connection is
/// closed after an `-ERR`: the client reports the error (nats.go and
/// nats-py close on an unknown `-ERR`; others reconnect), and its later
/// publishes fail visibly instead of vanishing.
fn publish_failed(conn: &ConnHandle, e: &BusError) {
    tracing::error!(peer = %conn.peer, id = conn.id, error = %e, "NATS publish failed; closing the connection");
    match e {
        BusError::Durable(text) => fail(conn, &format!("Durable Log Failure: {text}")),
        // Shutting down: the connection is closed anyway, as nats-server
        // does, without an error.
        BusError::Closed => conn.out.close(CloseReason::ConnectionClosed),
        other => fail(conn, &format!("Publish Failed: {other}")),
    }
}

/// Sends `-ERR` and closes the connection (what was queued is still sent).
fn fail(conn: &ConnHandle, text: &str) {
    err(conn, text);
    conn.out.close(CloseReason::ConnectionClosed);
}

fn err(conn: &ConnHandle, text: &str) {
    let mut b = BytesMut::new();
    proto::encode_err(&mut b, text);
    conn.out.push_control(&b);
}

/// Waits until the connection's durable publishes are fsynced. On failure
/// sends `-ERR` and returns false.
async fn ack_after_sync(bus: &Bus, conn: &ConnHandle, pending: &mut Option<u64>) -> bool {
    let Some(seq) = pending.take() else {
        return true;
    };
    match bus.wait_synced(seq).await {
        Ok(()) => true,
        Err(e) => {
            publish_failed(conn, &e);
            false
        }
    }
}

/// A request with nobody to answer: tell the requester at once with a
/// `503` status message (what nats-server does for `no_responders` clients).
fn send_no_responders(bus: &Bus, reply: &str) {
    let h = Headers {
        status: Some("503".into()),
        entries: Vec::new(),
    };
    if let Ok(m) = bus.make_message(reply, None, Some(h.encode()), Bytes::new()) {
        let _ = bus.inner.publish_msg(m, None, &mut Wakes::default());
    }
}
