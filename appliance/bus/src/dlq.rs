//! In-process handlers with retries, and the dead-letter list.
//!
//! [`Bus::handle`] runs an async handler for each message on a pattern. A
//! handler that returns `Err` or panics (the panic is caught: each attempt
//! runs as its own task) is retried with exponential backoff; after
//! `max_attempts` the message is *dead-lettered*: published on
//! `_dlq.<original subject>` with headers `Dlq-Id`, `Dlq-Handler`,
//! `Dlq-Error`, `Dlq-Attempts`, `Dlq-Subject` and the original payload, and kept
//! in a bounded list ([`Bus::dlq_list`]). [`Bus::dlq_retry`] runs the
//! entry's handler once more: on success the entry is removed.
//!
//! Dead letters are never dead-lettered again, and reach only handlers whose
//! pattern names them (`_dlq.>`): see [`Bus::handle`], "Dead letters".
//!
//! A handler that falls behind dead-letters what it cannot keep (non-durable
//! messages, with [`OVERFLOW_ERROR`] and 0 attempts), whether its backlog or
//! its subscription overflows; durable messages wait in the log instead.
//! See [`Bus::handle`], "Falling behind".
//!
//! # Across restarts
//! When the bus has a durable log, dead letters are always stored in it
//! (`_dlq.>` is durable whatever the configured patterns), and so is the
//! outcome of every retry: a `_dlq-state.<id>` record with headers
//! `Dlq-Status` (`delivered` or `failed`), `Dlq-Error` and `Dlq-Attempts`.
//! A dead letter is stored whatever room the original message left under
//! `max_payload`: only its payload is held to that limit, and the `Dlq-*`
//! headers have [`DEAD_LETTER_HEADER_ROOM`] bytes of their own (an error
//! text too long for them is cut short and marked `[truncated]` in the
//! stored record; the in-memory entry keeps it whole). So a NATS client on
//! `_dlq.>` can receive a dead letter up to that much over `max_payload`.
//! [`Bus::open`] rebuilds the list from those records, so a dead letter
//! outlives a restart until it is delivered (or the log's retention drops
//! it). A rebuilt entry carries the original subject and payload; the
//! original message's own headers are not kept. Without a durable log the
//! list lives in memory only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::bus::{Bus, BusError, SubscribeOptions, Subscription, Ticket, Wakes};
use crate::message::{Headers, Message};
use crate::queue::{CloseReason, Evict, LocalQueue, Lost, SlowConsumerPolicy};

/// The subject prefix of dead letters.
pub const DLQ_PREFIX: &str = "_dlq.";
/// The subject prefix of retry outcomes (`_dlq-state.<id>`).
pub const DLQ_STATE_PREFIX: &str = "_dlq-state.";
/// Whether `subject` is a dead letter or a retry outcome.
pub fn is_dead_letter_subject(subject: &str) -> bool {
    subject.starts_with(DLQ_PREFIX) || subject.starts_with(DLQ_STATE_PREFIX)
}

/// The durable patterns the bus adds for dead letters and retry outcomes.
pub(crate) const DLQ_DURABLE_PATTERNS: [&str; 2] = ["_dlq.>", "_dlq-state.>"];

/// A dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    /// Id for [`Bus::dlq_retry`].
    pub id: u64,
    /// The handler that failed.
    pub handler: String,
    /// The last error (or panic message).
    pub error: String,
    /// Attempts made so far (including retries).
    pub attempts: u32,
    /// When it was dead-lettered (unix ms).
    pub failed_at_ms: u64,
    /// The original message.
    pub message: Message,
}

/// A [`DlqEntry`] without the payload bytes, for listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqSummary {
    /// Id.
    pub id: u64,
    /// Handler name.
    pub handler: String,
    /// Original subject.
    pub subject: String,
    /// Last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When (unix ms).
    pub failed_at_ms: u64,
    /// Payload size.
    pub payload_bytes: usize,
}

/// Options for [`Bus::handle`]; unset fields come from `BusOptions::dlq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerOptions {
    /// Attempts before dead-lettering.
    pub max_attempts: Option<u32>,
    /// First retry delay (doubles).
    pub backoff: Option<Duration>,
    /// Share the pattern's messages with other handlers in this group.
    pub queue_group: Option<String>,
}

/// What a retry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The handler succeeded; the entry is gone.
    Delivered,
    /// It failed again; the entry stays with the new error.
    Failed(String),
}

/// Counters of handlers and dead letters ([`Bus::dlq_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DlqStats {
    /// Entries in the dead-letter list now.
    pub entries: usize,
    /// Messages dead-lettered since start-up (any reason).
    pub dead_lettered: u64,
    /// Of those, messages dead-lettered because their handler fell behind:
    /// its backlog or its subscription was full ([`OVERFLOW_ERROR`]).
    pub overflowed: u64,
    /// Messages a handler was subscribed to that were neither handled nor
    /// dead-lettered: durable messages its subscription could not read back
    /// from the log (a read error, or removed by retention), and overflow
    /// dead letters pushed out of the dead-letter list before the handler's
    /// task could store them (see [`Bus::handle`], "Falling behind"), and
    /// messages a handler failed on after [`Bus::close`] stopped storing
    /// dead letters. Each loss is logged as an error.
    pub lost: u64,
    /// Dead letters (or retry outcomes) that a handler named explicitly
    /// failed to handle, or had to drop on overflow: logged as errors and
    /// not dead-lettered again.
    pub dead_letters_failed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct DlqCounters {
    dead_lettered: AtomicU64,
    overflowed: AtomicU64,
    lost: AtomicU64,
    dead_letters_failed: AtomicU64,
}

type RetryRequest = (Message, oneshot::Sender<Result<(), String>>);

/// A running handler: where to send retries, and its [`Unstored`].
type Running = (mpsc::Sender<RetryRequest>, Arc<Unstored>);

#[derive(Debug)]
pub(crate) struct DlqState {
    entries: Mutex<BTreeMap<u64, DlqEntry>>,
    /// Dead letters and retry outcomes being stored (listed or applied to
    /// the list, not yet published), and whether storing has stopped: a
    /// shutdown waits for those under way before publishing stops, and
    /// refuses new ones, so none is listed but not stored.
    storing: Mutex<(usize, bool)>,
    stored: Condvar,
    counters: DlqCounters,
    /// Running handlers: where to send retries, and the dead letters their
    /// subscriptions recorded, to store at shutdown.
    handlers: Mutex<HashMap<String, Running>>,
    /// Set (under `handlers`' lock) when a shutdown takes the handlers to
    /// store what they recorded: no handler is added after that, so none
    /// records dead letters that nobody stores.
    closing: AtomicBool,
    next_id: AtomicU64,
    max_entries: usize,
}

impl DlqState {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            storing: Mutex::new((0, false)),
            stored: Condvar::new(),
            handlers: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            counters: DlqCounters::default(),
            next_id: AtomicU64::new(1),
            max_entries: max_entries.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn close(&self) {
        self.handlers.lock().clear();
    }

    /// Starts storing a dead letter or a retry outcome (see `storing`):
    /// `None` once storing has stopped. Hold the guard from the change to
    /// the list until the record is published (not across an await).
    pub(crate) fn start_storing(&self) -> Option<Storing<'_>> {
        let mut st = self.storing.lock();
        if st.1 {
            return None;
        }
        st.0 += 1;
        Some(Storing(self))
    }

    /// Stops storing: waits for the stores under way (publishes only, never
    /// anything on the publisher's path), then refuses new ones. Called by
    /// `Bus::close` before publishing stops.
    pub(crate) fn stop_storing(&self) {
        let mut st = self.storing.lock();
        st.1 = true;
        while st.0 > 0 {
            self.stored.wait(&mut st);
        }
    }

    /// Lists a dead letter and counts it (it is stored separately, see
    /// [`Bus::store_dead_letter`]). Takes no lock but the list's: safe on
    /// the publisher's path.
    fn record(&self, handler: &str, error: &str, attempts: u32, msg: Message) -> u64 {
        let subject = msg.subject.clone();
        let id = self.list(handler, error, attempts, msg);
        tracing::warn!(handler, %subject, id, error, attempts, "message dead-lettered");
        id
    }

    /// [`record`](Self::record) without the log line.
    fn list(&self, handler: &str, error: &str, attempts: u32, msg: Message) -> u64 {
        let id = self.add(handler, error, attempts, msg);
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// Counts (and logs) a dead letter or retry outcome that a handler
    /// naming them failed on: it is not dead-lettered again.
    fn refuse_dead_letter(&self, handler: &str, error: &str, msg: &Message) {
        self.counters
            .dead_letters_failed
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(handler, subject = %msg.subject, error, "handler failed on a dead letter; it is not dead-lettered again");
    }

    fn add(&self, handler: &str, error: &str, attempts: u32, message: Message) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.insert(DlqEntry {
            id,
            handler: handler.to_owned(),
            error: error.to_owned(),
            attempts,
            failed_at_ms: appliance_record_log::now_ms(),
            message,
        });
        id
    }

    fn insert(&self, entry: DlqEntry) {
        let mut e = self.entries.lock();
        while e.len() >= self.max_entries {
            e.pop_first();
        }
        e.insert(entry.id, entry);
    }

    /// Applies one stored message (oldest first) while the list is rebuilt
    /// at start-up: a dead letter adds an entry, a retry outcome removes
    /// (delivered) or updates (failed) it. Anything else, or a record
    /// without the headers it needs, is skipped. Returns whether it applied.
    pub(crate) fn restore(&self, m: &Message) -> bool {
        let h = m.headers();
        let Some(id) = h.get("Dlq-Id").and_then(|v| v.parse::<u64>().ok()) else {
            return false;
        };
        let subject = m.subject.as_str();
        let applied = if subject.starts_with(DLQ_PREFIX) {
            let (Some(handler), Some(original)) = (
                h.get("Dlq-Handler"),
                h.get("Dlq-Subject")
                    .and_then(|s| crate::subject::Subject::new(s).ok()),
            ) else {
                return false;
            };
            self.insert(DlqEntry {
                id,
                handler: handler.to_owned(),
                error: h.get("Dlq-Error").unwrap_or_default().to_owned(),
                attempts: h
                    .get("Dlq-Attempts")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                failed_at_ms: m.ts_ms,
                message: Message {
                    subject: original,
                    reply: None,
                    headers: None,
                    payload: m.payload.clone(),
                    seq: None,
                    ts_ms: m.ts_ms,
                },
            });
            true
        } else if subject.starts_with(DLQ_STATE_PREFIX) {
            let mut entries = self.entries.lock();
            match h.get("Dlq-Status") {
                Some("delivered") => entries.remove(&id).is_some(),
                Some("failed") => match entries.get_mut(&id) {
                    Some(x) => {
                        if let Some(a) = h.get("Dlq-Attempts").and_then(|v| v.parse().ok()) {
                            x.attempts = a;
                        }
                        if let Some(e) = h.get("Dlq-Error") {
                            e.clone_into(&mut x.error);
                        }
                        x.failed_at_ms = m.ts_ms;
                        true
                    }
                    None => false,
                },
                _ => false,
            }
        } else {
            false
        };
        // Ids stay unique across restarts, also past entries since removed.
        self.next_id
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
        applied
    }
}

/// A dead letter or retry outcome being stored ([`DlqState::start_storing`]).
/// Ends on drop, also if publishing panics: a shutdown must not hang.
pub(crate) struct Storing<'a>(&'a DlqState);

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.0.storing.lock().0 -= 1;
        self.0.stored.notify_all();
    }
}

/// Runs a handler for a running [`Bus::handle`]; stops it when dropped.
#[derive(Debug)]
pub struct HandlerHandle {
    name: String,
    bus: Bus,
    task: tokio::task::JoinHandle<()>,
    unstored: Arc<Unstored>,
    /// The task's subscription's queue: closed on drop, so nothing more is
    /// handed to it (a queue group's other members get it instead).
    queue: Arc<LocalQueue>,
}

impl HandlerHandle {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for HandlerHandle {
    fn drop(&mut self) {
        // Offered nothing more, also before the task has stopped.
        self.queue.close(CloseReason::Unsubscribed);
        self.task.abort();
        self.bus.inner.dlq.handlers.lock().remove(&self.name);
        // Dead letters its subscription recorded that the task had not
        // stored yet. The subscription goes with the task, which may not
        // have stopped yet: what a publish under way still evicts from it
        // is not dead-lettered (like what it still holds, it is not this
        // handler's any more).
        self.bus.store_unstored(&self.name, &self.unstored, true);
    }
}

/// Runs one attempt as its own task, so a panic is caught.
async fn attempt<F, Fut>(f: &Arc<F>, msg: Message) -> Result<(), String>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let fut = f(msg);
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let text = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(format!("handler panicked: {text}"))
        }
        Err(_) => Err("handler task was cancelled".into()),
    }
}

/// What a handler task needs to deliver one message.
struct Worker<F> {
    f: Arc<F>,
    bus: Bus,
    name: String,
    max_attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    /// The pattern names dead letters explicitly (`_dlq.>`, ...): only
    /// then are they delivered to this handler.
    wants_dead_letters: bool,
}

impl<F, Fut> Worker<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    /// Up to `max_attempts` attempts with backoff, then a dead letter.
    async fn deliver(self: Arc<Self>, msg: Message) {
        let mut delay = self.backoff;
        let mut last_err = String::new();
        for n in 1..=self.max_attempts {
            match attempt(&self.f, msg.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(handler = %self.name, subject = %msg.subject, attempt = n, error = %e, "handler failed");
                    last_err = e;
                    if n < self.max_attempts {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(self.max_backoff);
                    }
                }
            }
        }
        self.dead_letter(&last_err, self.max_attempts, msg).await;
    }

    /// Dead-letters a message this handler could not handle, unless it is a
    /// dead letter itself: that is logged and counted instead, so that a
    /// failing handler on `_dlq.>` cannot feed on its own output.
    async fn dead_letter(&self, error: &str, attempts: u32, msg: Message) {
        if self.refuse_dead_letter(error, &msg) {
            return;
        }
        self.bus.dead_letter(&self.name, error, attempts, msg).await;
    }

    /// [`dead_letter`](Self::dead_letter) without waiting for an fsync;
    /// whether it was dead-lettered (listed).
    fn dead_letter_now(&self, error: &str, attempts: u32, msg: Message) -> bool {
        if self.refuse_dead_letter(error, &msg) {
            return false;
        }
        // Not listed once the bus has stopped storing dead letters
        // (counted lost instead, not as overflowed).
        self.bus
            .dead_letter_now(&self.name, error, attempts, msg)
            .is_some()
    }

    fn refuse_dead_letter(&self, error: &str, msg: &Message) -> bool {
        if !is_dead_letter_subject(msg.subject.as_str()) {
            return false;
        }
        self.bus
            .inner
            .dlq
            .refuse_dead_letter(&self.name, error, msg);
        true
    }
}

/// Dead letters a handler's subscription recorded for what it evicted (see
/// [`Bus::handle`], "Falling behind"), waiting for the handler's task to
/// store them: the eviction happens on the publisher's path, which must not
/// publish. At most `max` ids are kept: an older one is sure to be out of
/// the dead-letter list already (it holds the newest `max_entries`).
#[derive(Debug)]
struct Unstored {
    state: Mutex<UnstoredState>,
    notify: Notify,
    max: usize,
}

#[derive(Debug, Default)]
struct UnstoredState {
    ids: VecDeque<u64>,
    /// Ids let go at the bound, not yet counted as lost.
    pushed_out: u64,
    /// The handle was dropped: nothing more is recorded, as nobody would
    /// store it.
    closed: bool,
}

impl Unstored {
    fn new(max: usize) -> Self {
        Self {
            state: Mutex::new(UnstoredState::default()),
            notify: Notify::new(),
            max: max.max(1),
        }
    }

    /// Lists `msg` as a dead letter (`list` returns its id) and keeps the
    /// id for storing, in one step: it cannot be in the list and not here,
    /// where a retry or a dropped handle would miss it. Once closed,
    /// nothing is listed and `msg` is given back; else the id, and whether
    /// it is the first one waiting.
    fn record(
        &self,
        msg: Message,
        list: impl FnOnce(Message) -> u64,
    ) -> Result<(u64, bool), Message> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(msg);
        }
        let first = st.ids.is_empty() && st.pushed_out == 0;
        let id = list(msg);
        if st.ids.len() >= self.max {
            st.ids.pop_front();
            st.pushed_out += 1;
        }
        st.ids.push_back(id);
        drop(st);
        self.notify.notify_one();
        Ok((id, first))
    }
}

/// The evict sink of a handler's subscription: dead-letters each message
/// the subscription evicts, with [`OVERFLOW_ERROR`] and 0 attempts. It is
/// listed and counted at once; storing it (publishing `_dlq.<subject>`) is
/// left to the handler's task through `unstored`.
fn overflow_sink(
    bus: std::sync::Weak<crate::bus::BusInner>,
    handler: String,
    wants_dead_letters: bool,
    cap: usize,
    unstored: Arc<Unstored>,
) -> Evict {
    let error = format!("{OVERFLOW_ERROR} ({cap} messages waiting in its subscription)");
    Evict(Box::new(move |msg: Message| {
        let Some(inner) = bus.upgrade() else {
            return Err(msg);
        };
        if is_dead_letter_subject(msg.subject.as_str()) {
            // Never dead-lettered again; a handler not naming them would
            // have skipped it anyway.
            if wants_dead_letters {
                inner.dlq.refuse_dead_letter(&handler, &error, &msg);
                return Ok(());
            }
            return Err(msg);
        }
        let subject = msg.subject.clone();
        // Once the handle is dropped it is not this handler's any more.
        let (id, first) = unstored.record(msg, |msg| inner.dlq.list(&handler, &error, 0, msg))?;
        inner
            .dlq
            .counters
            .overflowed
            .fetch_add(1, Ordering::Relaxed);
        // Not a line per message: this is the publisher's path, possibly
        // under the log's lock, and a flood evicts every message. The task
        // logs how many it stored.
        if first {
            tracing::warn!(handler, %subject, id, error, "handler's subscription overflows: dead-lettering what it evicts");
        }
        Ok(())
    }))
}

/// The [`Lost`] hook of a handler's subscription: durable messages it
/// could not read back from the log are counted in [`DlqStats::lost`] (and
/// logged) as the subscription skips them, in the handler's task.
fn lost_sink(bus: std::sync::Weak<crate::bus::BusInner>, handler: String) -> Lost {
    Lost(Box::new(move |n: u64| {
        let Some(inner) = bus.upgrade() else {
            return;
        };
        inner.dlq.counters.lost.fetch_add(n, Ordering::Relaxed);
        tracing::error!(handler, lost = n, "handler's subscription could not read durable messages back from the log: dropped without a dead letter");
    }))
}

/// The messages a handler has taken from its subscription but not yet run,
/// oldest first, bounded by `cap` (see [`Bus::handle`], "Falling behind").
struct Backlog {
    msgs: VecDeque<Message>,
    cap: usize,
    /// How many of `msgs` are not durable (could be dead-lettered on
    /// overflow).
    plain: usize,
}

impl Backlog {
    fn new(cap: usize) -> Self {
        Self {
            msgs: VecDeque::new(),
            cap: cap.max(1),
            plain: 0,
        }
    }

    /// Whether to take another message from the subscription: while there
    /// is room, or while an overflow can evict a non-durable message. A
    /// backlog full of durable messages leaves the next ones in the
    /// subscription, which reads them back from the log later.
    fn wants_more(&self) -> bool {
        self.msgs.len() < self.cap || self.plain > 0
    }

    /// Adds a message; returns the one evicted to stay within the bound:
    /// the oldest non-durable message.
    fn push(&mut self, msg: Message) -> Option<Message> {
        if msg.seq.is_none() {
            self.plain += 1;
        }
        self.msgs.push_back(msg);
        if self.msgs.len() <= self.cap {
            return None;
        }
        let i = self.msgs.iter().position(|m| m.seq.is_none())?;
        self.plain -= 1;
        self.msgs.remove(i)
    }

    fn pop(&mut self) -> Option<Message> {
        let m = self.msgs.pop_front()?;
        if m.seq.is_none() {
            self.plain -= 1;
        }
        Some(m)
    }
}

/// Longest handler name accepted by [`Bus::handle`], in bytes. The name
/// is in every dead letter's `Dlq-Handler` header, which has to fit in
/// [`DEAD_LETTER_HEADER_ROOM`] with the subject and some of the error.
pub const MAX_HANDLER_NAME: usize = 256;

/// The error recorded for a message dead-lettered because its handler's
/// backlog was full.
pub const OVERFLOW_ERROR: &str = "handler queue overflow";

type Busy = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Room for the `Dlq-*` headers of a stored dead letter, on top of the
/// payload. The durable log accepts records of up to `max_payload + 4096`
/// bytes (`Bus::open`); a dead letter's record also holds its subject (up to
/// [`MAX_SUBJECT_LEN`](crate::subject::MAX_SUBJECT_LEN) bytes) and some
/// framing: 4096 - 1024 - 64 leaves this much.
pub const DEAD_LETTER_HEADER_ROOM: usize = 3008;

/// Headers built by `build` with `error` shortened (marked) until they fit
/// in `room` bytes. Handler errors can be any length (a panic message, a
/// remote server's reply); the stored record must not be.
fn fit_error(room: usize, error: &str, build: impl Fn(&str) -> bytes::Bytes) -> bytes::Bytes {
    let full = build(error);
    if full.len() <= room {
        return full;
    }
    const MARK: &str = " [truncated]";
    let over = full.len() - room;
    let mut keep = error.len().saturating_sub(over + MARK.len());
    while !error.is_char_boundary(keep) {
        keep -= 1;
    }
    build(&format!("{}{MARK}", &error[..keep]))
}

/// A handler's task: takes messages from the subscription into the backlog
/// while the current one runs (so a handler backing off never stops
/// reading), runs them one at a time, and runs dead-letter retries between
/// them.
async fn run_handler<F, Fut>(
    w: Arc<Worker<F>>,
    mut sub: Subscription,
    mut rx: mpsc::Receiver<RetryRequest>,
    cap: usize,
    unstored: Arc<Unstored>,
) where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut backlog = Backlog::new(cap);
    let mut retry: Option<RetryRequest> = None;
    let mut busy: Option<Busy> = None;
    let end = loop {
        // Before any retry: a retried entry is then stored before its
        // outcome.
        w.bus.store_unstored(&w.name, &unstored, false);
        if busy.is_none() {
            if let Some((msg, reply)) = retry.take() {
                let f = w.f.clone();
                busy = Some(Box::pin(async move {
                    let _ = reply.send(attempt(&f, msg).await);
                }));
            } else if let Some(msg) = backlog.pop() {
                busy = Some(Box::pin(w.clone().deliver(msg)));
            }
        }
        tokio::select! {
            () = async {
                match busy.as_mut() {
                    Some(b) => b.await,
                    None => std::future::pending().await,
                }
            } => busy = None,
            () = unstored.notify.notified() => {}
            r = rx.recv(), if retry.is_none() => match r {
                Some(req) => retry = Some(req),
                // The bus dropped the retry channel: it is shutting down.
                None => break None,
            },
            m = sub.recv(), if backlog.wants_more() => match m {
                // Dead letters go only to handlers that ask for them by name
                // (see Bus::handle, "Dead letters").
                Ok(msg) if !w.wants_dead_letters && is_dead_letter_subject(msg.subject.as_str()) => {}
                Ok(msg) => {
                    if let Some(victim) = backlog.push(msg) {
                        let error = format!("{OVERFLOW_ERROR} ({} messages waiting)", backlog.cap);
                        if w.dead_letter_now(&error, 0, victim) {
                            w.bus.inner.dlq.counters.overflowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(reason) => break Some(reason),
            },
        }
    };
    match end {
        Some(CloseReason::BusClosed) | None if w.bus.inner.closed.load(Ordering::Acquire) => {
            tracing::debug!(handler = %w.name, "handler stopped: the bus is shut down");
        }
        reason => {
            let reason =
                reason.map_or_else(|| "retry channel closed".to_owned(), |r| r.to_string());
            tracing::error!(handler = %w.name, pattern = %sub.pattern(), %reason, "handler stopped; messages on its pattern are no longer handled");
        }
    }
}

impl Bus {
    /// Runs `handler` for every message matching `pattern`, with retries and
    /// dead-lettering (see the module docs). `name` identifies the handler in
    /// dead-letter entries and must be unique among running handlers, and
    /// at most [`MAX_HANDLER_NAME`] bytes long
    /// ([`BusError::HandlerNameTooLong`]). [`BusError::Closed`] once the
    /// bus is shutting down. Must be called inside a tokio runtime.
    ///
    /// Messages are handled one at a time, in order.
    ///
    /// # Falling behind
    /// A handler never stops because it falls behind (for instance while
    /// it backs off retrying a failing message), and what it cannot keep is
    /// dead-lettered, not dropped: it keeps taking messages into a backlog
    /// of `BusOptions::subscriber_queue` messages while the current one
    /// runs. When the backlog is full:
    /// * the oldest waiting message on a non-durable subject is
    ///   dead-lettered at once, with error [`OVERFLOW_ERROR`] and 0
    ///   attempts (counted in [`DlqStats::overflowed`]), so it can be
    ///   retried with [`Bus::dlq_retry`] like any other dead letter;
    /// * messages on durable subjects are never evicted: they wait in the
    ///   durable log and are handled, in order, once there is room.
    ///
    /// Messages wait in the handler's subscription (also
    /// `subscriber_queue` long) until its task takes them. The task stops
    /// taking them while its backlog is full of durable messages, and does
    /// not run at all while a task that does not yield publishes a burst on
    /// the same thread. When the subscription is full:
    /// * its oldest waiting non-durable message (or, if it holds only
    ///   durable ones, the new message) is dead-lettered the same way:
    ///   [`OVERFLOW_ERROR`], 0 attempts, counted in
    ///   [`DlqStats::overflowed`]. It is in the dead-letter list (and
    ///   retriable) at once; its `_dlq.<subject>` record is published by the
    ///   handler's task when it next runs, when the handle is dropped, or
    ///   when the bus shuts down (the publisher's path, where the eviction
    ///   happens, cannot publish).
    ///   Once the handle is dropped its subscription is offered nothing
    ///   more (in a queue group the other members get the messages), and
    ///   what it still holds is not handled or dead-lettered;
    /// * durable messages are left in the log, and read back from it in
    ///   order, as above. (In a queue group, a durable message that no
    ///   member can take, each having `2^20` waiting in the log, is
    ///   dead-lettered too.)
    ///
    /// In a queue group, a message that no member takes (each refusing it,
    /// its queue full of durable messages) is dead-lettered by a handler
    /// among the members, whichever member was offered it first: a plain
    /// subscription in the group does not drop it past the handler.
    ///
    /// So every message the handler is subscribed to is handled or
    /// dead-lettered, except (counted in [`DlqStats::lost`], logged as an
    /// error): durable messages its subscription cannot read back, because
    /// reading the log fails or the log's retention removed them first; and
    /// overflow dead letters pushed out of the dead-letter list (by
    /// `DlqOptions::max_entries` newer ones) before the task could store
    /// them.
    ///
    /// The task ends only when the bus shuts down (any other end is logged
    /// as an error) or when the returned handle is dropped.
    ///
    /// # Dead letters
    /// Dead letters (`_dlq.<subject>`) and retry outcomes
    /// (`_dlq-state.<id>`) reach a handler only if its pattern starts with
    /// `_dlq.` or `_dlq-state.`: a wildcard handler (`>`, `*.x`) does not get
    /// them. NATS itself gives such subjects no special treatment, and plain
    /// [`Bus::subscribe`] and NATS clients still see them under `>`; but a
    /// dead letter is a copy of a message some handler already got, so
    /// handing it to a catch-all handler would process it twice (and, when
    /// that handler fails, dead-letter its own dead letters in a loop).
    /// A handler that does name them and fails on one (or overflows with
    /// one) does not dead-letter it again: the failure is logged as an error
    /// and counted in [`DlqStats::dead_letters_failed`]; the original entry
    /// stays in the list.
    pub fn handle<F, Fut>(
        &self,
        name: &str,
        pattern: &str,
        opts: HandlerOptions,
        handler: F,
    ) -> Result<HandlerHandle, BusError>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let HandlerOptions {
            max_attempts,
            backoff,
            queue_group,
        } = opts;
        if name.len() > MAX_HANDLER_NAME {
            return Err(BusError::HandlerNameTooLong {
                len: name.len(),
                max: MAX_HANDLER_NAME,
            });
        }
        let cap = self.inner.opts.subscriber_queue.max(1);
        let wants_dead_letters = is_dead_letter_subject(pattern);
        let unstored = Arc::new(Unstored::new(self.inner.dlq.max_entries));
        let (tx, rx) = mpsc::channel::<RetryRequest>(16);
        // Registered before it subscribes: what its subscription records
        // is then stored by a shutdown, which registers no handler after
        // it has taken them (see `Bus::store_all_unstored`).
        {
            let mut handlers = self.inner.dlq.handlers.lock();
            if self.inner.dlq.closing.load(Ordering::Acquire) {
                return Err(BusError::Closed);
            }
            if handlers.contains_key(name) {
                return Err(BusError::HandlerExists(name.to_owned()));
            }
            handlers.insert(name.to_owned(), (tx, unstored.clone()));
        }
        let sub = match self.subscribe_evicting(
            pattern,
            SubscribeOptions {
                queue_group,
                capacity: Some(cap),
                // The task drains this queue into its backlog, except while
                // the backlog is full of durable messages or the task is
                // starved; what overflows then is dead-lettered, which
                // keeps the handler alive and loses nothing.
                slow_consumer: Some(SlowConsumerPolicy::DropOldest),
                ..SubscribeOptions::default()
            },
            Some(overflow_sink(
                Arc::downgrade(&self.inner),
                name.to_owned(),
                wants_dead_letters,
                cap,
                unstored.clone(),
            )),
            Some(lost_sink(Arc::downgrade(&self.inner), name.to_owned())),
            // Its task would skip them.
            !wants_dead_letters,
        ) {
            Ok(sub) => sub,
            Err(e) => {
                self.inner.dlq.handlers.lock().remove(name);
                return Err(e);
            }
        };
        let queue = sub.queue().clone();
        let defaults = self.inner.opts.dlq;
        let backoff = backoff.unwrap_or(defaults.backoff);
        let worker = Arc::new(Worker {
            f: Arc::new(handler),
            bus: self.clone(),
            name: name.to_owned(),
            max_attempts: max_attempts.unwrap_or(defaults.max_attempts).max(1),
            backoff,
            max_backoff: defaults.max_backoff.max(backoff),
            wants_dead_letters,
        });
        let task = tokio::spawn(run_handler(worker, sub, rx, cap, unstored.clone()));
        Ok(HandlerHandle {
            name: name.to_owned(),
            bus: self.clone(),
            task,
            unstored,
            queue,
        })
    }

    /// Counters of handlers and dead letters.
    pub fn dlq_stats(&self) -> DlqStats {
        let c = &self.inner.dlq.counters;
        DlqStats {
            entries: self.inner.dlq.len(),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            overflowed: c.overflowed.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            dead_letters_failed: c.dead_letters_failed.load(Ordering::Relaxed),
        }
    }

    async fn dead_letter(&self, handler: &str, error: &str, attempts: u32, msg: Message) {
        if let Some(Some(ticket)) = self.dead_letter_now(handler, error, attempts, msg) {
            if let Err(e) = self.settle(ticket).await {
                tracing::warn!(error = %e, handler, "could not store dead letter");
            }
        }
    }

    /// Records a dead letter and publishes it without waiting for the
    /// durable log's fsync. `None` if it was not listed (the bus has
    /// stopped storing dead letters: counted lost); else the ticket to wait
    /// on, if published.
    fn dead_letter_now(
        &self,
        handler: &str,
        error: &str,
        attempts: u32,
        msg: Message,
    ) -> Option<Option<Ticket>> {
        // Listed and stored, or (the bus shutting down) neither.
        let Some(_storing) = self.inner.dlq.start_storing() else {
            self.inner.dlq.counters.lost.fetch_add(1, Ordering::Relaxed);
            tracing::error!(handler, subject = %msg.subject, error, "the bus is shut down: a message its handler failed on is not dead-lettered; lost");
            return None;
        };
        let id = self.inner.dlq.record(handler, error, attempts, msg.clone());
        Some(self.store_dead_letter(id, handler, error, attempts, msg))
    }

    /// Stores what every handler's subscription recorded and its task has
    /// not stored yet (see [`Unstored`]), for a shutdown: they record no
    /// more. Call before publishing stops.
    pub(crate) fn store_all_unstored(&self) {
        let all: Vec<(String, Arc<Unstored>)> = {
            let handlers = self.inner.dlq.handlers.lock();
            // No handler is added after this: these are all.
            self.inner.dlq.closing.store(true, Ordering::Release);
            handlers
                .iter()
                .map(|(name, (_, u))| (name.clone(), u.clone()))
                .collect()
        };
        for (name, u) in all {
            self.store_unstored(&name, &u, true);
        }
    }

    /// Stores the dead letters a handler's subscription recorded (see
    /// [`Unstored`]), without waiting for an fsync. One whose entry is
    /// already out of the list (pushed out by newer ones before it could
    /// be stored) is gone: counted in [`DlqStats::lost`]. With `close`,
    /// the subscription records no more (its handle is dropped, or the bus
    /// shuts down). Once the bus has stopped storing dead letters
    /// ([`DlqState::stop_storing`]) there is nothing left to store.
    fn store_unstored(&self, handler: &str, unstored: &Unstored, close: bool) {
        let Some(_storing) = self.inner.dlq.start_storing() else {
            unstored.state.lock().closed |= close;
            return;
        };
        let (ids, pushed_out) = {
            let mut st = unstored.state.lock();
            st.closed |= close;
            if st.ids.is_empty() && st.pushed_out == 0 {
                return;
            }
            (
                std::mem::take(&mut st.ids),
                std::mem::take(&mut st.pushed_out),
            )
        };
        self.store_taken(handler, ids, pushed_out);
    }

    /// Stores the dead letters `ids` (see [`store_unstored`](Self::store_unstored)).
    fn store_taken(&self, handler: &str, ids: VecDeque<u64>, pushed_out: u64) {
        let mut gone = pushed_out;
        let (mut stored, first_id, last_id) = (0u64, ids.front().copied(), ids.back().copied());
        for id in ids {
            match self.dlq_get(id) {
                Some(e) => {
                    self.store_dead_letter(id, &e.handler, &e.error, e.attempts, e.message);
                    stored += 1;
                }
                None => gone += 1,
            }
        }
        if stored > 0 {
            tracing::warn!(
                handler,
                dead_lettered = stored,
                first_id,
                last_id,
                error = OVERFLOW_ERROR,
                "messages dead-lettered: the handler's subscription overflowed"
            );
        }
        if gone > 0 {
            self.inner
                .dlq
                .counters
                .lost
                .fetch_add(gone, Ordering::Relaxed);
            tracing::error!(
                handler,
                lost = gone,
                "dead letters pushed out of the dead-letter list before they could be stored: lost"
            );
        }
    }

    /// Publishes the record of dead letter `id`; returns the ticket to wait
    /// on for its fsync, if published.
    fn store_dead_letter(
        &self,
        id: u64,
        handler: &str,
        error: &str,
        attempts: u32,
        msg: Message,
    ) -> Option<Ticket> {
        let subject = format!("{DLQ_PREFIX}{}", msg.subject);
        let headers = fit_error(DEAD_LETTER_HEADER_ROOM, error, |error| {
            Headers::new()
                .with("Dlq-Id", &id.to_string())
                .with("Dlq-Handler", handler)
                .with("Dlq-Error", error)
                .with("Dlq-Attempts", &attempts.to_string())
                .with("Dlq-Subject", msg.subject.as_str())
                .encode()
        });
        // A dead letter whose subject grows too long is still listed; it is
        // only not published.
        match self.publish_dlq_record(&subject, headers, msg.payload) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, handler, id, "could not publish dead letter; it is listed but not stored");
                None
            }
        }
    }

    /// Publishes a dead letter or a retry outcome. Unlike [`Bus::publish`]
    /// only the payload is held to `max_payload` (it was accepted when the
    /// original message was published): the `Dlq-*` headers have their own
    /// room in the log's record limit (see [`DEAD_LETTER_HEADER_ROOM`]), so
    /// the record is stored whatever room the original message left.
    fn publish_dlq_record(
        &self,
        subject: &str,
        headers: bytes::Bytes,
        payload: bytes::Bytes,
    ) -> Result<Ticket, BusError> {
        let max = self.inner.opts.max_payload;
        if payload.len() > max || headers.len() > DEAD_LETTER_HEADER_ROOM {
            return Err(BusError::PayloadTooLarge {
                size: payload.len() + headers.len(),
                max: max + DEAD_LETTER_HEADER_ROOM,
            });
        }
        let msg = Message {
            subject: crate::subject::Subject::new(subject)?,
            reply: None,
            headers: Some(headers),
            payload,
            seq: None,
            ts_ms: appliance_record_log::now_ms(),
        };
        self.inner.publish_msg(msg, None, &mut Wakes::default())
    }

    /// The dead-letter list, oldest first.
    pub fn dlq_list(&self) -> Vec<DlqSummary> {
        self.inner
            .dlq
            .entries
            .lock()
            .values()
            .map(|e| DlqSummary {
                id: e.id,
                handler: e.handler.clone(),
                subject: e.message.subject.to_string(),
                error: e.error.clone(),
                attempts: e.attempts,
                failed_at_ms: e.failed_at_ms,
                payload_bytes: e.message.payload.len(),
            })
            .collect()
    }

    /// One entry, with its message.
    pub fn dlq_get(&self, id: u64) -> Option<DlqEntry> {
        self.inner.dlq.entries.lock().get(&id).cloned()
    }

    /// Runs the entry's handler once more with the original message.
    /// [`BusError::Closed`] if the bus shut down before the outcome could
    /// be stored: the entry is then left unchanged (even if the handler
    /// succeeded), as it is after a restart.
    pub async fn dlq_retry(&self, id: u64) -> Result<RetryOutcome, BusError> {
        let entry = self.dlq_get(id).ok_or(BusError::DlqNotFound(id))?;
        let tx = self
            .inner
            .dlq
            .handlers
            .lock()
            .get(&entry.handler)
            .map(|(tx, _)| tx.clone())
            .ok_or_else(|| BusError::HandlerGone(entry.handler.clone()))?;
        let (rtx, rrx) = oneshot::channel();
        tx.send((entry.message.clone(), rtx))
            .await
            .map_err(|_| BusError::HandlerGone(entry.handler.clone()))?;
        let result = rrx
            .await
            .map_err(|_| BusError::HandlerGone(entry.handler.clone()))?;
        // From the change to the list until its record is published, so a
        // shutdown cannot come in between. After one the outcome cannot be
        // stored: the entry is left as stored, to be retried after a
        // restart, not changed here only.
        let Some(storing) = self.inner.dlq.start_storing() else {
            tracing::warn!(id, "the bus shut down before the outcome of a dead-letter retry could be stored; the entry is kept");
            return Err(BusError::Closed);
        };
        let (outcome, status, error, attempts) = {
            let mut entries = self.inner.dlq.entries.lock();
            match result {
                Ok(()) => {
                    entries.remove(&id);
                    (RetryOutcome::Delivered, "delivered", None, None)
                }
                Err(e) => {
                    let attempts = entries.get_mut(&id).map_or(entry.attempts + 1, |x| {
                        x.attempts += 1;
                        x.error.clone_from(&e);
                        x.failed_at_ms = appliance_record_log::now_ms();
                        x.attempts
                    });
                    (
                        RetryOutcome::Failed(e.clone()),
                        "failed",
                        Some(e),
                        Some(attempts),
                    )
                }
            }
        };
        // The outcome is stored, so that the list rebuilt at the next start
        // matches this one.
        let headers = fit_error(
            DEAD_LETTER_HEADER_ROOM,
            error.as_deref().unwrap_or(""),
            |e| {
                let mut h = Headers::new().with("Dlq-Status", status);
                if error.is_some() {
                    h = h.with("Dlq-Error", e);
                }
                if let Some(a) = attempts {
                    h = h.with("Dlq-Attempts", &a.to_string());
                }
                h.with("Dlq-Id", &id.to_string()).encode()
            },
        );
        let published = self.publish_dlq_record(
            &format!("{DLQ_STATE_PREFIX}{id}"),
            headers,
            bytes::Bytes::new(),
        );
        drop(storing);
        let stored = match published {
            Ok(t) => self.settle(t).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, id, "could not store the outcome of a dead-letter retry");
        }
        Ok(outcome)
    }
}
