//! The RESP server: a thin tokio adapter around the decoder, the command
//! layer and the encoder.
//!
//! Per connection one task reads into a buffer, decodes every complete frame
//! in it (pipelining), executes them in order, and writes all replies with one
//! write. A protocol error gets `-ERR Protocol error: ...` and the connection
//! is closed (its stream position is lost); other connections are unaffected.
//! Memory: a connection's read buffer holds at most one frame's budget plus
//! one read (the decoder's limits), and all read buffers together are charged
//! to `max_buffered_bytes`; replies are flushed every 256 KiB, and a single
//! reply is bounded by the value size and the `MGET` reply cap.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cache::Cache;
use crate::commands::{execute, execute_args, Session};
use crate::resp::{encode, Command, Decoder, Limits, Reply};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Decoder limits.
    pub limits: Limits,
    /// Most simultaneous connections; more are told so and closed. 1024:
    /// each costs a task and a buffer, and the box's clients are a few services.
    pub max_connections: usize,
    /// How often [`Cache::maintenance`] runs (purge expired entries, sync
    /// under `Interval`, compact). 100 ms: the default `Interval` fsync
    /// window is bounded by the log's own check on every commit plus this.
    pub maintenance_interval: Duration,
    /// How long shutdown waits for connections to finish their current batch.
    pub shutdown_grace: Duration,
    /// Read-buffer bytes all connections together may hold (256 MiB). Each
    /// connection is also bounded by `limits.max_frame_bytes`; this bounds
    /// the sum, so many slow or hostile clients cannot exhaust memory.
    pub max_buffered_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: 1024,
            maintenance_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            max_buffered_bytes: 256 << 20,
        }
    }
}

/// Initial read buffer per connection; grows up to the frame budget.
const READ_CHUNK: usize = 16 << 10;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Serve RESP on a TCP listener until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    cache: Arc<Cache>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(
        || async {
            let (s, _) = listener.accept().await?;
            // Replies are written in one call per batch; Nagle only adds latency.
            s.set_nodelay(true)?;
            Ok(s)
        },
        cache,
        config,
        shutdown,
    )
    .await
}

/// Serve RESP on a Unix socket listener until `shutdown` completes.
pub async fn serve_unix(
    listener: UnixListener,
    cache: Arc<Cache>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(
        || async { listener.accept().await.map(|(s, _)| s) },
        cache,
        config,
        shutdown,
    )
    .await
}

async fn serve_with<S, F, Fut>(
    mut accept: F,
    cache: Arc<Cache>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let budget_kib = (config.max_buffered_bytes / 1024).min(Semaphore::MAX_PERMITS);
    let budget = Arc::new(Semaphore::new(budget_kib));
    let mut tasks = JoinSet::new();
    tasks.spawn(maintenance_loop(
        cache.clone(),
        config.maintenance_interval,
        stop_rx.clone(),
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = accept() => {
                let mut stream = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors and similar: back off, keep serving.
                        tracing::warn!(error = %e, "cache RESP: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tasks.spawn(async move {
                        let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                    });
                    continue;
                };
                let cache = cache.clone();
                let limits = config.limits;
                let stop = stop_rx.clone();
                let budget = budget.clone();
                tasks.spawn(async move {
                    if let Err(e) = connection(stream, &cache, limits, budget, stop).await {
                        tracing::debug!(error = %e, "cache RESP: connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}

/// Run [`Cache::maintenance`] every `every` on a blocking thread until
/// `stop` changes. `serve` runs one; a daemon using the cache without the
/// RESP endpoint runs its own.
pub async fn maintenance_loop(cache: Arc<Cache>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let c = cache.clone();
                match tokio::task::spawn_blocking(move || c.maintenance()).await {
                    Ok(Ok(m)) => {
                        if let Some(r) = m.compaction {
                            tracing::info!(?r, "cache log compacted");
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cache maintenance failed"),
                    Err(e) => tracing::warn!(error = %e, "cache maintenance task failed"),
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// A share of the server-wide buffer budget, in KiB, returned on drop.
#[derive(Debug)]
struct BufferShare {
    budget: Arc<Semaphore>,
    kib: u32,
}

impl BufferShare {
    /// Hold enough for `bytes`; false if the server-wide budget is exhausted.
    fn cover(&mut self, bytes: usize) -> bool {
        let want = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if want > self.kib {
            match self.budget.try_acquire_many(want - self.kib) {
                Ok(permit) => permit.forget(),
                Err(_) => return false,
            }
        } else if want < self.kib {
            self.budget.add_permits((self.kib - want) as usize);
        }
        self.kib = want;
        true
    }
}

impl Drop for BufferShare {
    fn drop(&mut self) {
        self.budget.add_permits(self.kib as usize);
    }
}

/// Replies are flushed once this much is pending, so a long pipeline does
/// not build one huge reply buffer.
const FLUSH_AT: usize = 256 << 10;

/// What the connection does after a decode-and-run pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Every complete frame was handled; read more.
    NeedInput,
    /// Replies reached [`FLUSH_AT`]; write them, then go on decoding.
    Flush,
    /// Write the replies and close (QUIT or a protocol error).
    Close,
}

/// Decode and execute complete frames from `buf`, encoding replies into
/// `out`, until input runs out, the replies need flushing, or the connection
/// must close.
///
/// `args` is scratch space for one command's arguments, emptied after each
/// command so that no slice of the read buffer outlives its command.
fn decode_and_run(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    args: &mut Vec<Bytes>,
    cache: &Cache,
    session: &mut Session,
    out: &mut BytesMut,
) -> Step {
    loop {
        if out.len() >= FLUSH_AT {
            return Step::Flush;
        }
        match decoder.decode_command(buf, args) {
            Ok(Some(command)) => {
                let outcome = match command {
                    Command::Args => execute_args(cache, session, args),
                    Command::Other(frame) => execute(cache, session, frame),
                };
                args.clear();
                encode(&outcome.reply, session.protocol, out);
                if outcome.close {
                    return Step::Close;
                }
            }
            Ok(None) => return Step::NeedInput,
            Err(e) => {
                let reply = Reply::err(format!("Protocol error: {e}"));
                encode(&reply, session.protocol, out);
                return Step::Close;
            }
        }
    }
}

/// Serve one connection until EOF, QUIT, a protocol error or shutdown.
///
/// Its read buffer is charged to `budget` (KiB permits shared by all
/// connections); a connection whose buffer would exceed what is left gets an
/// error and is closed, so hostile clients together cannot buffer more than
/// the server-wide bound.
pub async fn connection<S>(
    mut stream: S,
    cache: &Cache,
    limits: Limits,
    budget: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
        ..Session::default()
    };
    let mut decoder = Decoder::new(limits);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    let mut args = Vec::new();
    let mut share = BufferShare { budget, kib: 0 };
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        if !share.cover(buf.capacity()) {
            let reply = Reply::err("server buffer memory exhausted, closing connection");
            encode(&reply, session.protocol, &mut out);
            stream.write_all(&out).await?;
            stream.shutdown().await?;
            return Ok(());
        }
        let n = tokio::select! {
            r = stream.read_buf(&mut buf) => r?,
            _ = stop.changed() => return Ok(()),
        };
        if n == 0 {
            // EOF; a partial frame (truncated input) is simply dropped.
            return Ok(());
        }
        loop {
            let (step, pending) = cache.defer(|| {
                decode_and_run(
                    &mut decoder,
                    &mut buf,
                    &mut args,
                    cache,
                    &mut session,
                    &mut out,
                )
            });
            let committed = match pending {
                Ok(p) if p.is_empty() => Ok(()),
                // The log's syncer thread runs the fdatasync; this task waits
                // without holding up the others, and the replies go out after.
                Ok(p) => cache.commit_async(p).await,
                Err(e) => Err(e),
            };
            if let Err(e) = committed {
                // Nothing in this batch is durable: acknowledge none of it.
                tracing::warn!(error = %e, "cache RESP: commit failed, dropping connection");
                return Err(io::Error::other(e.to_string()));
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            match step {
                Step::NeedInput => break,
                Step::Flush => continue,
                Step::Close => {
                    stream.shutdown().await?;
                    return Ok(());
                }
            }
        }
        // Give back what a large frame needed once it is consumed.
        if buf.is_empty() && buf.capacity() > 4 * READ_CHUNK {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        if args.capacity() > 1024 {
            args = Vec::new();
        }
        if out.capacity() > 4 * FLUSH_AT {
            out = BytesMut::with_capacity(READ_CHUNK);
        }
    }
}
