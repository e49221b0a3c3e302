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
//! # Across restarts
//! When the bus has a durable log, dead letters are always stored in it
//! (`_dlq.>` is durable whatever the configured patterns), and so is the
//! outcome of every retry: a `_dlq-state.<id>` record with headers
//! `Dlq-Status` (`delivered` or `failed`), `Dlq-Error` and `Dlq-Attempts`.
//! [`Bus::open`] rebuilds the list from those records, so a dead letter
//! outlives a restart until it is delivered (or the log's retention drops
//! it). A rebuilt entry carries the original subject and payload; the
//! original message's own headers are not kept. Without a durable log the
//! list lives in memory only.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::bus::{Bus, BusError, SubscribeOptions};
use crate::message::{Headers, Message};

/// The subject prefix of dead letters.
pub const DLQ_PREFIX: &str = "_dlq.";
/// The subject prefix of retry outcomes (`_dlq-state.<id>`).
pub const DLQ_STATE_PREFIX: &str = "_dlq-state.";
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

type RetryRequest = (Message, oneshot::Sender<Result<(), String>>);

#[derive(Debug)]
pub(crate) struct DlqState {
    entries: Mutex<BTreeMap<u64, DlqEntry>>,
    handlers: Mutex<HashMap<String, mpsc::Sender<RetryRequest>>>,
    next_id: AtomicU64,
    max_entries: usize,
}

impl DlqState {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            handlers: Mutex::new(HashMap::new()),
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

/// Runs a handler for a running [`Bus::handle`]; stops it when dropped.
#[derive(Debug)]
pub struct HandlerHandle {
    name: String,
    bus: Bus,
    task: tokio::task::JoinHandle<()>,
}

impl HandlerHandle {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for HandlerHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.bus.inner.dlq.handlers.lock().remove(&self.name);
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

impl Bus {
    /// Runs `handler` for every message matching `pattern`, with retries and
    /// dead-lettering (see the module docs). `name` identifies the handler in
    /// dead-letter entries and must be unique among running handlers.
    /// Must be called inside a tokio runtime.
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
        let mut sub = self.subscribe(
            pattern,
            SubscribeOptions {
                queue_group,
                ..SubscribeOptions::default()
            },
        )?;
        let (tx, mut rx) = mpsc::channel::<RetryRequest>(16);
        {
            let mut handlers = self.inner.dlq.handlers.lock();
            if handlers.contains_key(name) {
                return Err(BusError::HandlerExists(name.to_owned()));
            }
            handlers.insert(name.to_owned(), tx);
        }
        let defaults = self.inner.opts.dlq;
        let max_attempts = max_attempts.unwrap_or(defaults.max_attempts).max(1);
        let backoff = backoff.unwrap_or(defaults.backoff);
        let max_backoff = defaults.max_backoff.max(backoff);
        let f = Arc::new(handler);
        let bus = self.clone();
        let hname = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = sub.recv() => {
                        let Ok(msg) = m else { break };
                        let mut delay = backoff;
                        let mut last_err = String::new();
                        let mut ok = false;
                        for n in 1..=max_attempts {
                            match attempt(&f, msg.clone()).await {
                                Ok(()) => { ok = true; break; }
                                Err(e) => {
                                    tracing::debug!(handler = %hname, subject = %msg.subject, attempt = n, error = %e, "handler failed");
                                    last_err = e;
                                    if n < max_attempts {
                                        tokio::time::sleep(delay).await;
                                        delay = (delay * 2).min(max_backoff);
                                    }
                                }
                            }
                        }
                        if !ok {
                            bus.dead_letter(&hname, &last_err, max_attempts, msg).await;
                        }
                    }
                    r = rx.recv() => {
                        let Some((msg, reply)) = r else { break };
                        let _ = reply.send(attempt(&f, msg).await);
                    }
                }
            }
        });
        Ok(HandlerHandle {
            name: name.to_owned(),
            bus: self.clone(),
            task,
        })
    }

    async fn dead_letter(&self, handler: &str, error: &str, attempts: u32, msg: Message) {
        let id = self.inner.dlq.add(handler, error, attempts, msg.clone());
        tracing::warn!(handler, subject = %msg.subject, id, error, attempts, "message dead-lettered");
        let subject = format!("{DLQ_PREFIX}{}", msg.subject);
        let headers = Headers::new()
            .with("Dlq-Id", &id.to_string())
            .with("Dlq-Handler", handler)
            .with("Dlq-Error", error)
            .with("Dlq-Attempts", &attempts.to_string())
            .with("Dlq-Subject", msg.subject.as_str())
            .encode();
        // A dead letter whose subject grows too long is still listed; it is
        // only not published.
        if let Err(e) = self
            .publish(&subject, Some(headers), msg.payload.clone())
            .await
        {
            tracing::warn!(error = %e, "could not publish dead letter");
        }
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
    pub async fn dlq_retry(&self, id: u64) -> Result<RetryOutcome, BusError> {
        let entry = self.dlq_get(id).ok_or(BusError::DlqNotFound(id))?;
        let tx = self
            .inner
            .dlq
            .handlers
            .lock()
            .get(&entry.handler)
            .cloned()
            .ok_or_else(|| BusError::HandlerGone(entry.handler.clone()))?;
        let (rtx, rrx) = oneshot::channel();
        tx.send((entry.message.clone(), rtx))
            .await
            .map_err(|_| BusError::HandlerGone(entry.handler.clone()))?;
        let result = rrx
            .await
            .map_err(|_| BusError::HandlerGone(entry.handler.clone()))?;
        let (outcome, state) = {
            let mut entries = self.inner.dlq.entries.lock();
            match result {
                Ok(()) => {
                    entries.remove(&id);
                    (
                        RetryOutcome::Delivered,
                        Headers::new().with("Dlq-Status", "delivered"),
                    )
                }
                Err(e) => {
                    let attempts = entries.get_mut(&id).map_or(entry.attempts + 1, |x| {
                        x.attempts += 1;
                        x.error.clone_from(&e);
                        x.failed_at_ms = appliance_record_log::now_ms();
                        x.attempts
                    });
                    let h = Headers::new()
                        .with("Dlq-Status", "failed")
                        .with("Dlq-Error", &e)
                        .with("Dlq-Attempts", &attempts.to_string());
                    (RetryOutcome::Failed(e), h)
                }
            }
        };
        // The outcome is stored, so that the list rebuilt at the next start
        // matches this one.
        let headers = state.with("Dlq-Id", &id.to_string()).encode();
        if let Err(e) = self
            .publish(
                &format!("{DLQ_STATE_PREFIX}{id}"),
                Some(headers),
                bytes::Bytes::new(),
            )
            .await
        {
            tracing::warn!(error = %e, id, "could not store the outcome of a dead-letter retry");
        }
        Ok(outcome)
    }
}
