//! The RESP server: a thin tokio adapter around the decoder, the command
//! layer and the encoder.
//!
//! Per connection one task reads into a buffer (a large bulk body in
//! progress goes straight into its own buffer, see [`Decoder::direct_body`]),
//! decodes every complete frame in it (pipelining), and executes them in
//! order. Replies are coalesced per batch: when a read's commands leave
//! replies to send, input that is already waiting is read and run first (up
//! to `READ_AHEAD_MAX`, after yielding to the other connections so that
//! every ready client gets its turn, as in redis's event loop), then the
//! batch's log records are committed once and its replies written with
//! vectored writes (a large value goes out from the cache's own copy, see
//! [`Output`]; up to 32 such values per `writev`). Reads start at 16 KiB
//! and double while they fill up (at most `MAX_READ`, a bound on each
//! connection's turn), and a large value's body is read straight into a
//! buffer of its own. While replies wait for a client that is not reading
//! them, its input is still taken (into a backlog, see
//! `read_buffer::Backlog`), so a client that sends a whole pipeline before
//! reading any reply, as redis-py does, is answered rather than left
//! waiting on a server that waits for it: up to 64 MiB taken ahead per
//! connection, and only from the first half of the buffer budget (past
//! that, such a client waits until the budget frees or it reads, and is
//! closed after `write_stall_timeout` if neither comes; redis would buffer
//! its replies unbounded).
//!
//! A protocol error gets `-ERR Protocol error: ...` and the connection is
//! closed (its stream position is lost); other connections are unaffected.
//! Memory: a connection's read buffer holds at most one frame's budget plus
//! one read (the decoder's limits), and all read buffers together, whole
//! allocations, large bodies in progress and backlogs, are charged to
//! `max_buffered_bytes` before they are allocated (see `read_buffer`).
//! Replies are flushed every 64 KiB, a single reply is bounded by the value
//! size and the `MGET` reply cap, and the replies waiting to be written are
//! charged to the same budget before the write (they stay until the client
//! reads them), except values the cache holds too (its own bound counts
//! them): a connection whose replies do not fit is closed. Not charged: a
//! command's argument vector while it runs (freed before any await when
//! large, see `resp::KEEP_SCRATCH`), the slack of the reply buffer's allocation, and
//! a value the cache drops while a reply still holds it. The charge is made
//! once, before the write, while the cache still holds its values; a client
//! that then stops reading while the values are deleted keeps them alive
//! uncharged: at most one batch of replies per connection (the `MGET` cap,
//! 64 MiB, or one value, plus 64 KiB), so up to `max_connections` times that
//! in all, about 64 GiB at the defaults, but not for long: a client that
//! takes none of its replies for `write_stall_timeout` (60 s) is closed,
//! which frees them. Closing that gap would take charging again while a
//! write is stuck, and would still miss a value that two stuck
//! connections share; the endpoint is for the box's own services, on
//! loopback. Each share may hold up to `SHARE_SLACK_KIB` of the budget
//! beyond what it needs.
//!
//! Durability: a reply is written only after the commit of every record
//! appended before it (under `Always`, after their `fdatasync`); a failed
//! append or commit drops the connection without sending the batch's
//! replies. Under `Always` the first reply also waits for the read-ahead
//! (one `fdatasync` per batch rather than two), and a connection yields once
//! before asking for its commit, so the other connections with input ready
//! append first and one `fdatasync` covers them all (as redis's event loop
//! reads every ready client before its fsync). On the 50-client, 16-deep
//! 256 B durable benchmark this cut the `fdatasync`s from about 500 to
//! about 120 per 40,000 SETs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::cache::{Cache, PendingCommit};
use crate::commands::{execute, execute_args, ClientStats, Session};
use crate::read_buffer::{Backlog, ReadBuffer, Room};
use crate::resp::{encode, reset_scratch, Command, Decoder, Limits, Output, Reply};

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
    /// Bytes all connections together may hold in read buffers and unsent
    /// replies (256 MiB). Each connection's input is also bounded by
    /// `limits.max_frame_bytes`; this bounds the sum, so many slow or
    /// hostile clients cannot exhaust memory.
    pub max_buffered_bytes: usize,
    /// How long a connection's replies may wait for the client to take any
    /// of them (60 s). A client that stops reading is closed then, and its
    /// share of the buffer budget, its slot and the values its replies
    /// hold are freed; a slow reader that keeps taking some is not.
    /// (redis waits forever by default.)
    pub write_stall_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: 1024,
            maintenance_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            max_buffered_bytes: 256 << 20,
            write_stall_timeout: Duration::from_secs(60),
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
    let budget = Arc::new(Budget::new(budget_kib));
    let clients = Arc::new(ClientStats::new(budget_kib as u64 * 1024));
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
                    clients.rejected.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(async move {
                        let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                    });
                    continue;
                };
                let cache = cache.clone();
                let limits = config.limits;
                let stall = config.write_stall_timeout;
                let stop = stop_rx.clone();
                let counters = clients.clone();
                let share = BufferShare::new(budget.clone(), clients.clone());
                tasks.spawn(async move {
                    if let Err(e) = connection(stream, &cache, limits, stall, share, stop).await {
                        // (`connection` has told a client whose writes
                        // were not made durable why it is closed.)
                        if is_stall(&e) {
                            counters.stalled.fetch_add(1, Ordering::Relaxed);
                        }
                        // Debug, as a client could flood the journal.
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

/// Run [`Cache::maintenance`] every `every` on blocking threads until
/// `stop` changes: each tick the quick part ([`Cache::tidy`]), and a
/// compaction when one is due and none is running, on its own thread so
/// that the ticks go on meanwhile (the `Interval` fsync window and expiry
/// must not wait for a rewrite of the whole cache). `serve` runs one; a
/// daemon using the cache without the RESP endpoint runs its own. On stop,
/// a running compaction is waited for (by `serve`, for at most its
/// `shutdown_grace`; a compaction still running then finishes on its
/// blocking thread, and the runtime's shutdown waits for it). A failed
/// compaction is retried after `COMPACTION_RETRY`. A log that failed (a
/// full disk) is rebuilt from memory in the compaction's place, and
/// retried as a compaction is (see [`Cache::heal_log`]). In a third slot,
/// the log's next spare segment is written when one is wanted (see
/// [`Cache::prepare_spare_segment`]); a failure is retried a minute later.
pub async fn maintenance_loop(cache: Arc<Cache>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compaction: Option<tokio::task::JoinHandle<bool>> = None;
    // The next spare segment of the log, written in a slot of its own (a
    // second at most, paced), so that neither waits for the other.
    let mut spare: Option<tokio::task::JoinHandle<bool>> = None;
    let mut spare_not_before = tokio::time::Instant::now();
    // After a failed compaction, the next waits (each one rewrites the
    // whole cache: retried every tick, one failing for lack of space would
    // keep the disk full).
    let mut not_before = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let c = cache.clone();
                match tokio::task::spawn_blocking(move || c.tidy()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cache maintenance failed"),
                    Err(e) => tracing::warn!(error = %e, "cache maintenance task failed"),
                }
                if spare.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    if let Some(done) = spare.take() {
                        if !done.await.unwrap_or(false) {
                            spare_not_before = tokio::time::Instant::now() + COMPACTION_RETRY;
                        }
                    }
                    if tokio::time::Instant::now() >= spare_not_before {
                        let c = cache.clone();
                        spare = Some(tokio::task::spawn_blocking(move || {
                            c.prepare_spare_segment().map_err(|e| {
                                tracing::warn!(error = %e, "cache log: writing a spare segment failed; retrying in 60 s");
                            }).is_ok()
                        }));
                    }
                }
                if compaction.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    if let Some(done) = compaction.take() {
                        let ok = done.await.unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "cache log compaction task failed");
                            false
                        });
                        if !ok {
                            not_before = tokio::time::Instant::now() + COMPACTION_RETRY;
                        }
                    }
                    if tokio::time::Instant::now() >= not_before {
                        let c = cache.clone();
                        compaction = Some(tokio::task::spawn_blocking(move || {
                            if c.log_failed() {
                                return match c.heal_log() {
                                    Ok(Some(r)) => {
                                        tracing::warn!(?r, "cache log rebuilt from memory after it failed; writes are durable again");
                                        true
                                    }
                                    Ok(None) => true,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cache log has failed and could not be rebuilt; retrying in 60 s");
                                        false
                                    }
                                };
                            }
                            match c.compact_if_due() {
                                Ok(Some(r)) => {
                                    tracing::info!(?r, "cache log compacted");
                                    true
                                }
                                Ok(None) => true,
                                Err(e) => {
                                    tracing::warn!(error = %e, "cache log compaction failed; retrying in 60 s");
                                    false
                                }
                            }
                        }));
                    }
                }
            }
            _ = stop.changed() => {
                if let Some(running) = compaction.take() {
                    let _ = running.await;
                }
                if let Some(running) = spare.take() {
                    let _ = running.await;
                }
                return;
            }
        }
    }
}

/// How long the maintenance loop waits after a failed compaction.
const COMPACTION_RETRY: Duration = Duration::from_secs(60);

/// The server-wide buffer budget, in KiB permits, and a wake-up for the
/// connections waiting for some of it to come back (see [`BudgetWaiter`]).
#[derive(Debug)]
struct Budget {
    permits: Semaphore,
    freed: Arc<Notify>,
    /// Live [`BudgetWaiter`]s: while none, a give-back wakes nobody and
    /// skips the `Notify`'s lock.
    waiting: AtomicUsize,
}

impl Budget {
    fn new(kib: usize) -> Self {
        Self {
            permits: Semaphore::new(kib),
            freed: Arc::new(Notify::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn give_back(&self, kib: usize) {
        self.permits.add_permits(kib);
        // Pairs with the fence in `BudgetWaiter::new`: either the waiter
        // sees these permits, or this sees the waiter.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// Registered before a connection is refused more of the budget, so that a
/// give-back after that refusal wakes it.
struct BudgetWaiter {
    freed: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    budget: Arc<Budget>,
}

impl BudgetWaiter {
    fn new(budget: &Arc<Budget>) -> Self {
        budget.waiting.fetch_add(1, Ordering::Relaxed);
        let mut freed = Box::pin(budget.freed.clone().notified_owned());
        freed.as_mut().enable();
        std::sync::atomic::fence(Ordering::SeqCst);
        Self {
            freed,
            budget: budget.clone(),
        }
    }
}

impl Drop for BudgetWaiter {
    fn drop(&mut self) {
        self.budget.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's share of the server-wide buffer budget, in KiB, returned
/// on drop. It also keeps the connection counted in the server's
/// [`ClientStats`] while it lives.
#[derive(Debug)]
struct BufferShare {
    budget: Arc<Budget>,
    kib: u32,
    clients: Arc<ClientStats>,
}

/// KiB a share keeps beyond what it covers before giving the rest back (16:
/// a connection's small replies come and go with every request, and would
/// otherwise take and return a permit or two each time).
const SHARE_SLACK_KIB: u32 = 16;

impl BufferShare {
    /// An empty share of `budget` for a new connection.
    fn new(budget: Arc<Budget>, clients: Arc<ClientStats>) -> Self {
        clients.connected.fetch_add(1, Ordering::Relaxed);
        Self {
            budget,
            kib: 0,
            clients,
        }
    }

    /// [`BufferShare::cover`], but only while half of the server-wide
    /// budget stays free: for what a connection may take ahead (its
    /// backlog), so that clients sending big pipelines without reading
    /// cannot leave the others nothing to read or reply with.
    fn cover_from_first_half(&mut self, bytes: usize) -> bool {
        let want = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let half = usize::try_from(self.clients.buffer_limit / 1024 / 2).unwrap_or(usize::MAX);
        let more = want.saturating_sub(self.kib) as usize;
        self.budget.permits.available_permits() >= more.saturating_add(half) && self.cover(bytes)
    }

    /// Hold enough for `bytes`; false if the server-wide budget is exhausted.
    fn cover(&mut self, bytes: usize) -> bool {
        let want = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if want > self.kib {
            match self.budget.permits.try_acquire_many(want - self.kib) {
                Ok(permit) => permit.forget(),
                Err(_) => return false,
            }
            let more = u64::from(want - self.kib) * 1024;
            self.clients
                .buffered_bytes
                .fetch_add(more, Ordering::Relaxed);
            self.kib = want;
        } else if self.kib - want > SHARE_SLACK_KIB {
            self.budget.give_back((self.kib - want) as usize);
            let less = u64::from(self.kib - want) * 1024;
            self.clients
                .buffered_bytes
                .fetch_sub(less, Ordering::Relaxed);
            self.kib = want;
        }
        true
    }
}

impl Drop for BufferShare {
    fn drop(&mut self) {
        self.budget.give_back(self.kib as usize);
        let held = u64::from(self.kib) * 1024;
        self.clients
            .buffered_bytes
            .fetch_sub(held, Ordering::Relaxed);
        self.clients.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Replies are flushed once this much is pending, so a long pipeline does
/// not build one huge reply buffer, and the other connections get a turn
/// between such parts (64 KiB, as redis's per-client write limit per turn).
const FLUSH_AT: usize = 64 << 10;

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

/// Decode and execute complete frames from `input`, encoding replies into
/// `out`, until input runs out, the replies need flushing, or the connection
/// must close.
///
/// `args` is scratch space for one command's arguments, emptied after each
/// command so that no slice of the read buffer outlives its command.
fn decode_and_run(
    decoder: &mut Decoder,
    input: &mut ReadBuffer,
    args: &mut Vec<Bytes>,
    cache: &Cache,
    session: &mut Session,
    out: &mut Output,
) -> Step {
    loop {
        if out.len() >= FLUSH_AT {
            return Step::Flush;
        }
        match decoder.decode_command(&mut input.buf, args) {
            Ok(Some(command)) => {
                let outcome = match command {
                    Command::Args => execute_args(cache, session, args),
                    Command::Other(frame) => execute(cache, session, frame),
                };
                // A large vector is freed as soon as its command has run,
                // so it never lives across an await: at any moment there is
                // at most one per runtime worker.
                reset_scratch(args);
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

/// The next read's size: doubled after a read that filled it (more input
/// is probably waiting: a pipelined batch of large values), back down after
/// a short one, between [`READ_CHUNK`] and [`MAX_READ`].
fn next_read_size(current: usize, asked: usize, got: usize) -> usize {
    if got == asked {
        (current * 2).min(MAX_READ)
    } else if got < current / 4 {
        (current / 2).max(READ_CHUNK)
    } else {
        current
    }
}

/// Largest single read into the read buffer (32 KiB; a large bulk body is
/// read straight into its own buffer, see `read_some`). While a connection
/// reads ahead it yields between reads, so this is also its share of a
/// turn (when no large body is arriving), and what bounds how long a
/// client whose batch has just arrived waits for its first reply while the
/// others' long pipelines are read (redis reads 16 KiB of each client per
/// event-loop turn). Measured with 50 clients pipelining
/// 16 SETs of 16 KiB, client and server on CPUs of their own, medians of
/// 8 rounds (redis-benchmark's latency of a pipelined batch is the time to
/// its first reply): 64 KiB gave 194k SETs/s at p99 1.6-2.3 ms, 128 KiB
/// 192k at 2.4 ms, this 171k at 1.05 ms; redis-server 159k at 1.6 ms.
const MAX_READ: usize = 32 << 10;

/// An empty read buffer larger than this (128 KiB) is given back.
const KEEP_READ_BUFFER: usize = 128 << 10;

/// Read-ahead when the replies wait for an `fdatasync` (64 KiB): every
/// command read ahead holds back the replies before it until the sync that
/// covers it, so beyond one batch of small commands (or four 16 KiB
/// values) it only adds latency; the syncer groups the connections'
/// appends anyway (redis reads at most 16 KiB of a client per event-loop
/// turn). Measured, 50 clients pipelining 16 SETs of 16 KiB under
/// `fsync always`: mean latency 20-28 ms with the 1 MiB read-ahead, 7-15 ms
/// with this, at the same throughput.
const DURABLE_READ_AHEAD: usize = 64 << 10;

/// Input read ahead, without waiting, before the replies so far are sent:
/// at most this much (1 MiB), so a client streaming commands still gets
/// its replies in bounded time.
const READ_AHEAD_MAX: usize = 1 << 20;

/// Read into the decoder's direct body if one is in progress, else into
/// `buf`, which has room (see [`ReadBuffer::room_for`]): from the backlog
/// first, if input was taken while replies waited. `wait: false` polls
/// once and returns `None` when nothing is ready.
async fn read_some<S>(
    stream: &mut S,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    backlog: &mut Backlog,
    wait: bool,
) -> Option<io::Result<(usize, usize)>>
where
    S: AsyncRead + Unpin,
{
    let target = match decoder.direct_body() {
        Some(body) => body,
        None => buf,
    };
    // With no spare room `read_buf` would grow the buffer itself, past
    // what was charged.
    debug_assert!(target.capacity() > target.len());
    let asked = target.capacity() - target.len();
    let taken = backlog.drain_into(target);
    if taken > 0 {
        return Some(Ok((taken, asked)));
    }
    let read = stream.read_buf(target);
    if wait {
        return Some(read.await.map(|n| (n, asked)));
    }
    let mut read = std::pin::pin!(read);
    // One poll: `read_buf` consumes nothing unless it returns `Ready`, so
    // dropping it while pending loses no input.
    std::future::poll_fn(|cx| {
        Poll::Ready(match read.as_mut().poll(cx) {
            Poll::Ready(r) => Some(r.map(|n| (n, asked))),
            Poll::Pending => None,
        })
    })
    .await
}

/// Let the runtime's other ready tasks run before this one goes on.
///
/// Unlike `tokio::task::yield_now`, which defers the task until the
/// runtime has polled its I/O driver (one more `epoll_wait` per turn),
/// this wakes the task at once: tokio puts a task that wakes itself while
/// it is polled at the back of its run queue (never in the LIFO slot),
/// behind the tasks already made ready, such as the connections the same
/// `epoll_wait` woke. A client whose input arrives in the meantime waits
/// for the driver's next poll: when the queue runs dry, or after 61 tasks.
///
/// So it is used only where a connection yields once before writing
/// replies that owe no `fdatasync` (see `flush`); reading ahead and long
/// replies, which may yield turn after turn, use tokio's yield. Measured
/// with 50 clients getting 256 B one at a time, server and client on CPUs
/// of their own, three runs each: 0.38-0.50 `epoll_wait` per request
/// instead of 0.59-0.76 (redis-server: 0.42-0.57). The effect on latency
/// is within this machine's noise: in two runs of 12 alternating rounds
/// against tokio's yield, the median per-round ratio of p99 was 0.81 and
/// 0.95 (intervals 0.65-1.13 and 0.79-1.16), and of CPU per request 0.98
/// and 1.00.
async fn let_others_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// Serve one connection until EOF, QUIT, a protocol error or shutdown.
///
/// Its buffers are charged to `share` (its part of the KiB permits shared
/// by all connections); a connection whose buffers would exceed what is
/// left is closed (counted in `ClientStats::over_budget`), so hostile
/// clients together cannot buffer more than the server-wide bound.
///
/// Replies are coalesced (see the module docs): the first commands after
/// an idle wait are answered at once; after that, input that is already
/// waiting is read and run too (up to `READ_AHEAD_MAX`) before the batch
/// is committed and its replies are written with one `writev` (a few for
/// many large values). The rest of a pipelined batch that arrives in
/// several reads therefore costs one commit and one write, not one per
/// read (and wakes the client once).
async fn connection<S>(
    mut stream: S,
    cache: &Cache,
    limits: Limits,
    stall: Duration,
    share: BufferShare,
    stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = serve_connection(&mut stream, cache, limits, stall, share, stop).await;
    if let Err(e) = &result {
        if let Some(Unacknowledged(why)) = e.get_ref().and_then(|i| i.downcast_ref()) {
            // The batch's writes are not durable and none of its replies
            // was sent: its first command is answered with why, then the
            // connection closes (its other commands get no reply, so a
            // client can tell none of them was acknowledged). Best effort,
            // briefly: the stream is at a reply boundary.
            let farewell = format!(
                "-ERR {}\r\n",
                crate::commands::clip(why, 400).replace(['\r', '\n'], " ")
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(farewell.as_bytes()).await?;
                stream.flush().await
            })
            .await;
        }
    }
    result
}

async fn serve_connection<S>(
    mut stream: S,
    cache: &Cache,
    limits: Limits,
    stall: Duration,
    mut share: BufferShare,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn::new(limits, stall);
    conn.session.clients = Some(share.clients.clone());
    let mut read_size = READ_CHUNK;
    // Input read since the replies were last written (bounds read-ahead).
    let mut unanswered = 0usize;
    // Wait for input (idle), or take only what is already waiting.
    let mut wait = true;
    let durable = cache.commit_blocks();
    loop {
        // Reads grow while they keep filling up, to at most MAX_READ. What
        // the buffers will hold is charged before anything is allocated.
        let size = read_size;
        let room = if conn.decoder.direct_in_progress() {
            Room::Ready
        } else {
            let mut room = conn.input.room_for(size);
            if room != Room::Ready && conn.decoder.in_frame() {
                // The frame's arguments so far keep the buffer shared: with
                // copies of their own, its room is reused (or it is freed
                // when replaced) instead of staying pinned.
                conn.decoder.unpin();
                room = conn.input.room_for(size);
            }
            room
        };
        let want = conn.input.held_after(room)
            + conn.decoder.direct_capacity_for_read()
            + conn.decoder.partial_bytes()
            + conn.out.held_alone()
            + conn.backlog.held()
            + conn.session.queued_bytes();
        if !share.cover(want) {
            // Replies read ahead still wait for their commit: acknowledge
            // nothing before it (`answer` commits, then writes them).
            conn.answer(cache, &mut stream, &mut share).await?;
            share.clients.over_budget.fetch_add(1, Ordering::Relaxed);
            return conn.refuse(&mut stream).await;
        }
        conn.input.make_room(room);
        let got = if wait {
            tokio::select! {
                r = read_some(&mut stream, &mut conn.decoder, &mut conn.input.buf, &mut conn.backlog, true) => r,
                _ = stop.changed() => return Ok(()),
            }
        } else {
            read_some(
                &mut stream,
                &mut conn.decoder,
                &mut conn.input.buf,
                &mut conn.backlog,
                false,
            )
            .await
        };
        let mut step = match got {
            None => {
                // Nothing more waiting: answer what was read ahead, and
                // give back what the batch needed before going idle.
                conn.answer(cache, &mut stream, &mut share).await?;
                conn.shrink();
                unanswered = 0;
                wait = true;
                continue;
            }
            Some(r) => {
                let (n, asked) = r?;
                if n == 0 {
                    // EOF (or the client shut down its side): answer what
                    // was read; a partial frame (truncated input) is dropped.
                    conn.answer(cache, &mut stream, &mut share).await?;
                    return Ok(());
                }
                if asked > 0 && conn.decoder.direct_capacity() == 0 {
                    read_size = next_read_size(read_size, asked, n);
                }
                unanswered += n;
                if !wait {
                    // Read ahead: other connections take their turn first
                    // (as every ready client does in redis's event loop),
                    // so their first replies do not wait for this batch.
                    // tokio's yield: the driver is polled first, so a
                    // client whose input arrived since also gets its turn
                    // (see `let_others_run`).
                    tokio::task::yield_now().await;
                }
                let step = conn.run_batch(cache)?;
                if step == Step::NeedInput {
                    if conn.out.is_empty() {
                        // Only part of a frame so far: wait for the rest.
                        wait = true;
                        continue;
                    }
                    // Coalesce: take what else is waiting first. When the
                    // replies wait for an `fdatasync` (`fsync always` and
                    // a write among them), also before the first reply, as
                    // a batch split over two of them would take twice as
                    // long; but then only up to DURABLE_READ_AHEAD, since
                    // the replies wait for the sync covering the last
                    // command read.
                    let syncing = durable && conn.owes_commit();
                    let limit = if syncing {
                        DURABLE_READ_AHEAD
                    } else {
                        READ_AHEAD_MAX
                    };
                    if (!wait || syncing) && unanswered < limit {
                        wait = false;
                        continue;
                    }
                }
                step
            }
        };
        // Answer: commit what the replies acknowledge, then write them.
        loop {
            conn.answer(cache, &mut stream, &mut share).await?;
            match step {
                Step::NeedInput => break,
                Step::Close => {
                    stream.shutdown().await?;
                    return Ok(());
                }
                Step::Flush => {
                    // Other connections get their turn between the parts of
                    // a long reply (redis writes at most 64 KiB per client
                    // per event-loop turn), so a client fetching large
                    // values does not hold up everyone's first reply.
                    tokio::task::yield_now().await;
                    step = conn.run_batch(cache)?;
                }
            }
        }
        unanswered = 0;
        // Then read ahead: the rest of a pipelined batch may be waiting.
        // (After a short read tokio knows the socket is drained, so this
        // costs no syscall when nothing is there.)
        wait = false;
        conn.shrink();
    }
}

/// One connection's protocol state: its decoder and input, the command
/// being run, the replies not yet written and the commit they wait for.
struct Conn {
    session: Session,
    decoder: Decoder,
    input: ReadBuffer,
    /// Scratch space for one command's arguments (see [`decode_and_run`]).
    args: Vec<Bytes>,
    out: Output,
    /// The commit the replies in `out` wait for.
    owed: Option<PendingCommit>,
    /// Input taken while replies waited, not yet read (see [`Backlog`]).
    backlog: Backlog,
    /// `ServerConfig::write_stall_timeout`.
    stall: Duration,
}

impl Conn {
    fn new(limits: Limits, stall: Duration) -> Self {
        Self {
            session: Session {
                id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
                ..Session::default()
            },
            decoder: Decoder::new(limits),
            input: ReadBuffer::with_capacity(READ_CHUNK),
            args: Vec::new(),
            out: Output::with_capacity(READ_CHUNK),
            owed: None,
            backlog: Backlog::default(),
            stall,
        }
    }

    /// Decode and run the complete commands in `buf` with their log writes
    /// deferred; the commit they need joins `owed`. A failed append fails
    /// the connection: nothing in the batch may be acknowledged.
    fn run_batch(&mut self, cache: &Cache) -> io::Result<Step> {
        let Self {
            session,
            decoder,
            input,
            args,
            out,
            owed,
            backlog: _,
            stall: _,
        } = self;
        let (step, pending) =
            cache.defer(|| decode_and_run(decoder, input, args, cache, session, out));
        match pending {
            Ok(p) => {
                *owed = Some(match owed.take() {
                    Some(earlier) => earlier.join(p),
                    None => p,
                });
                Ok(step)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache RESP: log append failed, dropping connection");
                Err(io::Error::other(Unacknowledged(format!(
                    "{e}; this connection's unanswered commands were not acknowledged"
                ))))
            }
        }
    }

    /// Whether the replies so far wait for log records to be committed.
    fn owes_commit(&self) -> bool {
        self.owed.as_ref().is_some_and(|p| !p.is_empty())
    }

    /// Bytes the connection alone holds now: its read buffer's allocation,
    /// a large body in progress, the frame so far outside them, the
    /// replies waiting to be written (values the cache holds too are the
    /// cache's, see [`Output::held_alone`]), the backlog, and a
    /// transaction's queue.
    fn held(&self) -> usize {
        self.input.held_after(Room::Ready)
            + self.decoder.direct_capacity()
            + self.decoder.partial_bytes()
            + self.out.held_alone()
            + self.backlog.held()
            + self.session.queued_bytes()
    }

    /// Commit what the replies acknowledge, then write them (see [`flush`]
    /// for when the other connections run first). The replies are charged
    /// to the buffer budget first, as they are held until the client reads
    /// them. If they do not fit, the connection is closed without any of
    /// them (an error return): the client sees its connection lost, and
    /// the outcome of the batch's commands unknown (some may have been
    /// applied), as when any connection breaks. An error reply in their
    /// place would be read as the answer to the batch's first command.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cache: &Cache,
        stream: &mut S,
        share: &mut BufferShare,
    ) -> io::Result<()> {
        let held = self.held();
        if !share.cover(held) {
            // Logged (at debug, as any connection ending in an error) by
            // the accept loop: a warning per refusal would let a client
            // flood the journal.
            self.out.clear();
            share.clients.over_budget.fetch_add(1, Ordering::Relaxed);
            let _ = stream.shutdown().await;
            return Err(io::Error::other(
                "replies exceed the server's buffer budget",
            ));
        }
        let more_coming =
            self.decoder.in_frame() || !self.input.buf.is_empty() || !self.backlog.is_empty();
        let yield_first = !more_coming || (cache.commit_blocks() && self.owes_commit());
        let owed = self.owed.take();
        let taker = Taker {
            base: held - self.backlog.held(),
            backlog: &mut self.backlog,
            share,
            waiter: None,
        };
        let out = &mut self.out;
        flush(
            cache,
            stream,
            out,
            owed,
            yield_first,
            self.stall,
            Some(taker),
        )
        .await
    }

    /// Tells the client the buffer budget is exhausted, and closes.
    async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<()> {
        let reply = Reply::err("server buffer memory exhausted, closing connection");
        encode(&reply, self.session.protocol, &mut self.out);
        write_out(stream, &mut self.out, self.stall, None).await?;
        stream.shutdown().await
    }

    /// Give back what a large frame or reply needed once it is consumed.
    fn shrink(&mut self) {
        self.input
            .give_back(KEEP_READ_BUFFER, READ_CHUNK, self.decoder.in_frame());
        if self.out.peak() > 2 * FLUSH_AT {
            self.out = Output::with_capacity(READ_CHUNK);
        }
    }
}

/// Wait for `owed` to be durable (the log's syncer thread runs the
/// `fdatasync`; this task waits without holding up the others), then write
/// the replies. A failed commit sends none of them.
async fn flush<S>(
    cache: &Cache,
    stream: &mut S,
    out: &mut Output,
    owed: Option<PendingCommit>,
    yield_first: bool,
    stall: Duration,
    taker: Option<Taker<'_>>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if out.is_empty() && owed.as_ref().is_none_or(PendingCommit::is_empty) {
        return Ok(());
    }
    // The other connections with input ready run first: so one `fdatasync`
    // covers all their appends, and the replies leave in one burst rather
    // than one by one as they are made (redis's event loop likewise reads
    // every ready client, then fsyncs, then writes all the replies). A
    // client juggling many connections then finds several replies per
    // `epoll_wait`: redis-benchmark, 50 connections, GET of 256 B, one
    // request at a time, went from 161.8-163.3k to 165.6-168.9k requests/s
    // (redis-server: 163.5-166.1k in the same rounds).
    //
    // Not when the connection's own batch is still arriving (a frame read
    // in part, or input not yet run) and no `fdatasync` is owed: then its
    // replies so far leave at once, as waiting a round of the others only
    // delays a long pipeline's first reply (50 clients pipelining 16 SETs
    // of 16 KiB: median latency to the first reply 1.15 -> 0.79 ms). An
    // owed `fdatasync` still waits for the round, so that it covers the
    // others' appends too.
    if yield_first {
        if cache.commit_blocks() && owed.as_ref().is_some_and(|p| !p.is_empty()) {
            // The replies wait for an `fdatasync`: tokio's yield polls the
            // driver first, so the connections whose input arrived since
            // the last `epoll_wait` append too, and the sync covers them.
            // One more `epoll_wait` is nothing next to the sync.
            tokio::task::yield_now().await;
        } else {
            let_others_run().await;
        }
    }
    if let Some(p) = owed.filter(|p| !p.is_empty()) {
        if let Err(e) = cache.commit_async(p).await {
            // Nothing in this batch is durable: acknowledge none of it.
            tracing::warn!(error = %e, "cache RESP: commit failed, dropping connection");
            return Err(io::Error::other(Unacknowledged(format!(
                "{e}; this connection's unanswered commands were not acknowledged"
            ))));
        }
    }
    if !out.is_empty() {
        // Vectored: a large value goes out from where the cache holds it.
        write_out(stream, out, stall, taker).await?;
        out.clear();
    }
    Ok(())
}

/// Write all of `out` (vectored). While the client takes none of it, its
/// input is taken into the backlog meanwhile, if a `taker` is given (see
/// [`Backlog`]). A client that takes none of it for `stall` is not
/// reading: the write fails with a [`Stalled`] error, which closes the
/// connection.
async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Output,
    stall: Duration,
    mut taker: Option<Taker<'_>>,
) -> io::Result<()> {
    while out.has_remaining() {
        let written = std::future::poll_fn(|cx| poll_write_some(cx, stream, out, taker.as_mut()));
        let mut written = std::pin::pin!(written);
        // Tried once before a timer is set: a write usually goes at once.
        let first = std::future::poll_fn(|cx| Poll::Ready(written.as_mut().poll(cx))).await;
        let done = match first {
            Poll::Ready(r) => r,
            Poll::Pending => match tokio::time::timeout(stall, written).await {
                Ok(r) => r,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled(stall))),
            },
        };
        done?;
    }
    Ok(())
}

/// One vectored write of `out` (up to 64 pieces, as tokio's `write_buf`);
/// while it would block, the client's input is taken into the backlog.
fn poll_write_some<S: AsyncRead + AsyncWrite + Unpin>(
    cx: &mut std::task::Context<'_>,
    stream: &mut S,
    out: &mut Output,
    mut taker: Option<&mut Taker<'_>>,
) -> Poll<io::Result<()>> {
    loop {
        let mut slices = [io::IoSlice::new(&[]); 64];
        let n = out.chunks_vectored(&mut slices);
        match std::pin::Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some(t) = taker.as_deref_mut() else {
            return Poll::Pending;
        };
        match t.poll_take(cx, stream) {
            // Took some: the write may be ready by now.
            Poll::Ready(Ok(true)) => {}
            // Full, or the client shut down its side: wait for the write.
            Poll::Ready(Ok(false)) | Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
        }
    }
}

/// Takes a client's input into its backlog while its replies wait.
struct Taker<'a> {
    backlog: &'a mut Backlog,
    share: &'a mut BufferShare,
    /// What the connection holds besides the backlog (covered already).
    base: usize,
    /// Set while the budget refuses more: a give-back wakes the connection
    /// to try again (its write may never be ready: a client may send its
    /// whole pipeline before it reads).
    waiter: Option<BudgetWaiter>,
}

impl Taker<'_> {
    /// Reads what the client has sent into the backlog, while the buffer
    /// budget and [`Backlog::MAX`] allow. `Ready(Ok(true))`: took some;
    /// `Ready(Ok(false))`: can take no more (full, or the client shut down
    /// its side, or the budget refuses: then a give-back wakes the task);
    /// `Pending`: nothing has arrived.
    fn poll_take<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        stream: &mut S,
    ) -> Poll<io::Result<bool>> {
        if self.backlog.eof {
            return Poll::Ready(Ok(false));
        }
        if self.backlog.room().is_none() {
            let after = self.backlog.held() + Backlog::CHUNK;
            if after > Backlog::MAX {
                return Poll::Ready(Ok(false));
            }
            loop {
                let waiter = self
                    .waiter
                    .get_or_insert_with(|| BudgetWaiter::new(&self.share.budget));
                if self.share.cover_from_first_half(self.base + after) {
                    self.waiter = None;
                    break;
                }
                match waiter.freed.as_mut().poll(cx) {
                    // Given back since the waiter was set: try again.
                    Poll::Ready(()) => self.waiter = None,
                    Poll::Pending => return Poll::Ready(Ok(false)),
                }
            }
            self.backlog.add_chunk();
        }
        let Some(room) = self.backlog.room() else {
            return Poll::Ready(Ok(false));
        };
        let mut buf = tokio::io::ReadBuf::new(room);
        std::task::ready!(std::pin::Pin::new(stream).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if n == 0 {
            self.backlog.eof = true;
            return Poll::Ready(Ok(false));
        }
        self.backlog.filled(n);
        Poll::Ready(Ok(true))
    }
}

/// A batch's writes could not be made durable: nothing of it is
/// acknowledged, and the client is told why before the connection closes.
#[derive(Debug)]
struct Unacknowledged(String);

impl std::fmt::Display for Unacknowledged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unacknowledged {}

/// The client took none of its replies for this long.
#[derive(Debug)]
struct Stalled(Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client read none of its replies for {:?}", self.0)
    }
}

impl std::error::Error for Stalled {}

fn is_stall(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Stalled>())
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cache::CacheConfig;

    fn wire(parts: &[&str]) -> Vec<u8> {
        let mut w = format!("*{}\r\n", parts.len()).into_bytes();
        for p in parts {
            w.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
        }
        w
    }

    /// Letting the others run wakes the task at once, inside the runtime
    /// (tokio's `yield_now` hands the waker to the scheduler until its next
    /// driver poll instead), and goes on at the next poll.
    #[tokio::test]
    async fn letting_the_others_run_does_not_wait_for_the_io_driver() {
        struct Wakes(AtomicU64);
        impl std::task::Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Wakes(AtomicU64::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut turn = std::pin::pin!(let_others_run());
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(turn.as_mut().poll(&mut cx).is_ready());
    }

    /// What `let_others_run` is for: the tasks that were ready when it was
    /// called run before the task goes on (tokio puts a task that wakes
    /// itself at the back of its run queue, not in the LIFO slot), on the
    /// current-thread runtime and on one worker of the multi-thread one.
    #[test]
    fn letting_the_others_run_runs_the_ready_ones_first() {
        fn check(runtime: &tokio::runtime::Runtime) {
            runtime.block_on(async {
                // Spawned from a task on the worker, so that all of them
                // are queued on it before any runs.
                tokio::spawn(async {
                    let ran = Arc::new(AtomicU64::new(0));
                    let r = ran.clone();
                    let yielder = tokio::spawn(async move {
                        let before = r.load(Ordering::SeqCst);
                        let_others_run().await;
                        (before, r.load(Ordering::SeqCst))
                    });
                    let others: Vec<_> = (0..5)
                        .map(|_| {
                            let r = ran.clone();
                            tokio::spawn(async move {
                                r.fetch_add(1, Ordering::SeqCst);
                            })
                        })
                        .collect();
                    let (before, after) = yielder.await.unwrap();
                    for o in others {
                        o.await.unwrap();
                    }
                    assert!(before < 5, "every other task ran before the yielder");
                    assert_eq!(after, 5, "the yielder went on before the others ran");
                })
                .await
                .unwrap();
            });
        }
        check(
            &tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        check(
            &tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .build()
                .unwrap(),
        );
    }

    /// A command of thousands of arguments does not keep its argument
    /// vector into the await that writes its reply (it would sit outside
    /// the buffer budget, one per waiting connection); an ordinary command
    /// keeps the vector for the next.
    #[test]
    fn a_command_of_many_arguments_frees_its_vector_before_its_reply_is_written() {
        let cache = Cache::new(CacheConfig::default());
        let mut session = Session::default();
        let mut decoder = Decoder::new(Limits::default());
        let mut input = ReadBuffer::with_capacity(READ_CHUNK);
        let mut args = Vec::new();
        let mut out = Output::with_capacity(READ_CHUNK);
        let mut run = |bytes: &[u8], args: &mut Vec<Bytes>| {
            input.buf.extend_from_slice(bytes);
            let step = decode_and_run(
                &mut decoder,
                &mut input,
                args,
                &cache,
                &mut session,
                &mut out,
            );
            assert_eq!(step, Step::NeedInput);
            out.copy_to_bytes(out.remaining())
        };

        assert_eq!(run(&wire(&["SET", "k7", "v"]), &mut args), "+OK\r\n");
        assert!(args.capacity() >= 3, "kept for the next command");

        let keys: Vec<String> = (0..5000).map(|i| format!("k{i}")).collect();
        let mut exists = vec!["EXISTS"];
        exists.extend(keys.iter().map(String::as_str));
        assert_eq!(run(&wire(&exists), &mut args), ":1\r\n");
        assert_eq!(args.capacity(), 0, "5001 argument slots were kept");

        // The same, decoded in parts (the general decoder's path).
        let mut w = wire(&exists);
        let rest = w.split_off(w.len() / 2);
        assert_eq!(run(&w, &mut args), "");
        assert_eq!(run(&rest, &mut args), ":1\r\n");
        assert_eq!(args.capacity(), 0, "5001 argument slots were kept");
    }
}
