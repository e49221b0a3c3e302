//! The RESP server: a thin tokio adapter around the decoder, the command
//! layer and the encoder.
//!
//! Per connection one task reads into a buffer, decodes every complete frame
//! in it (pipelining), executes them in order, and writes all replies with one
//! write. A protocol error gets `-ERR Protocol error: ...` and the connection
//! is closed (its stream position is lost); other connections are unaffected.
//! The buffer is bounded by the decoder's limits: it never holds more than one
//! frame's budget plus one read.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cache::Cache;
use crate::commands::{execute, Session};
use crate::resp::{encode, Decoder, Limits, Reply};

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: 1024,
            maintenance_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
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
                tasks.spawn(async move {
                    if let Err(e) = connection(stream, &cache, limits, stop).await {
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

fn multi_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Decode and execute every complete frame in `buf`, encoding replies into
/// `out`. Returns whether the connection must close after writing them.
fn decode_and_run(
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    cache: &Cache,
    session: &mut Session,
    out: &mut BytesMut,
) -> bool {
    loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                let outcome = execute(cache, session, frame);
                encode(&outcome.reply, session.protocol, out);
                if outcome.close {
                    return true;
                }
            }
            Ok(None) => return false,
            Err(e) => {
                let reply = Reply::err(format!("Protocol error: {e}"));
                encode(&reply, session.protocol, out);
                return true;
            }
        }
    }
}

/// Serve one connection until EOF, QUIT, a protocol error or shutdown.
pub async fn connection<S>(
    mut stream: S,
    cache: &Cache,
    limits: Limits,
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
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            r = stream.read_buf(&mut buf) => r?,
            _ = stop.changed() => return Ok(()),
        };
        if n == 0 {
            // EOF; a partial frame (truncated input) is simply dropped.
            return Ok(());
        }
        let mut process = || {
            cache
                .deferring(|| decode_and_run(&mut decoder, &mut buf, cache, &mut session, &mut out))
        };
        let (close, committed) = if cache.commit_blocks() && multi_thread() {
            // fdatasync ahead: keep this worker's other tasks moving.
            tokio::task::block_in_place(process)
        } else {
            process()
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
        if close {
            stream.shutdown().await?;
            return Ok(());
        }
    }
}
