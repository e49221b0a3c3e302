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
//! The list lives in memory; the `_dlq.*` messages are durable when a
//! durable pattern covers them.

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
        let mut e = self.entries.lock();
        while e.len() >= self.max_entries {
            e.pop_first();
        }
        e.insert(
            id,
            DlqEntry {
                id,
                handler: handler.to_owned(),
                error: error.to_owned(),
                attempts,
                failed_at_ms: appliance_record_log::now_ms(),
                message,
            },
        );
        id
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
        let mut entries = self.inner.dlq.entries.lock();
        match result {
            Ok(()) => {
                entries.remove(&id);
                Ok(RetryOutcome::Delivered)
            }
            Err(e) => {
                if let Some(x) = entries.get_mut(&id) {
                    x.attempts += 1;
                    x.error.clone_from(&e);
                    x.failed_at_ms = appliance_record_log::now_ms();
                }
                Ok(RetryOutcome::Failed(e))
            }
        }
    }
}
