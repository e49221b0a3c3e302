//! The in-process bus: subscription index, publish and fan-out, durable
//! subjects, subscriptions that catch up from the log, replay, statistics.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use appliance_record_log::{FsyncPolicy, Log, LogOptions, RecoveryReport, Retention};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;

use crate::message::{decode_stored, encode_stored, stored_subject, Message};
use crate::queue::{
    CloseReason, ConnOutbound, Evict, LocalQueue, LocalState, Lost, Offer, SlowConsumerPolicy,
};
use crate::stats::{
    sum, ConnCounters, ConnectionStats, Counters, DurableStats, StatsSnapshot, SubjectCounters,
};
use crate::subject::{Pattern, Subject, SubjectError};
use crate::sublist::Sublist;

/// When durable messages are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableFsync {
    /// Before the publish is acknowledged and before fan-out. Concurrent
    /// publishes share one `fdatasync` (group commit).
    Always,
    /// At most this long after the append; fan-out does not wait.
    Interval(Duration),
}

/// The durable log's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableOptions {
    /// Directory of the record log.
    pub dir: PathBuf,
    /// Patterns whose messages are stored. Default `storage.>`, `sync.>`, `system.>`.
    pub subjects: Vec<String>,
    /// See [`DurableFsync`].
    pub fsync: DurableFsync,
    /// Drop whole old segments by age and total size.
    pub retention: Retention,
    /// Segment size (see `appliance_record_log::LogOptions`).
    pub segment_max_bytes: u64,
}

impl DurableOptions {
    /// Defaults for a log in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            subjects: vec!["storage.>".into(), "sync.>".into(), "system.>".into()],
            fsync: DurableFsync::Interval(Duration::from_millis(100)),
            retention: Retention {
                max_age: Some(Duration::from_secs(30 * 24 * 3600)),
                max_total_bytes: Some(1 << 30),
            },
            segment_max_bytes: 64 << 20,
        }
    }
}

/// Dead-letter settings for in-process handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqOptions {
    /// Attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub backoff: Duration,
    /// Upper bound of the delay.
    pub max_backoff: Duration,
    /// Entries kept in the dead-letter list (oldest go first).
    pub max_entries: usize,
}

impl Default for DlqOptions {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            max_entries: 10_000,
        }
    }
}

/// Options for [`Bus::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusOptions {
    /// Messages queued per in-process subscription.
    pub subscriber_queue: usize,
    /// What happens to a subscriber that falls behind on ordinary subjects.
    pub slow_consumer: SlowConsumerPolicy,
    /// Largest payload accepted.
    pub max_payload: usize,
    /// The durable log; `None` for a bus without durable subjects.
    pub durable: Option<DurableOptions>,
    /// Dead-letter settings.
    pub dlq: DlqOptions,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            subscriber_queue: 8192,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            max_payload: 1 << 20,
            durable: None,
            dlq: DlqOptions::default(),
        }
    }
}

/// Errors from the bus API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A subject or pattern failed validation.
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] SubjectError),
    /// The payload is over `max_payload`.
    #[error("payload of {size} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The durable log failed (see the log's error).
    #[error("durable log: {0}")]
    Durable(String),
    /// The durable log could not be opened.
    #[error("opening the durable log: {0}")]
    Open(#[from] appliance_record_log::Error),
    /// Replay or `from_seq` asked of a bus without a durable log.
    #[error("this bus has no durable log")]
    NotDurable,
    /// The bus was shut down.
    #[error("the bus is shut down")]
    Closed,
    /// Serialising a typed event failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// No dead-letter entry with this id.
    #[error("no dead-letter entry with id {0}")]
    DlqNotFound(u64),
    /// The handler a dead-letter entry belongs to is gone.
    #[error("handler {0:?} is no longer running")]
    HandlerGone(String),
    /// A handler with this name is already running.
    #[error("a handler named {0:?} is already running")]
    HandlerExists(String),
    /// A handler name longer than [`MAX_HANDLER_NAME`](crate::dlq::MAX_HANDLER_NAME) bytes.
    #[error("handler name of {len} bytes exceeds the maximum of {max}")]
    HandlerNameTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `from_seq` asked of a queue group member.
    #[error("a queue group member cannot start from a sequence number: every member would receive the stored messages; replay them with one plain subscription")]
    GroupFromSeq,
}

/// Options for [`Bus::subscribe`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Share messages with other members of this group (one gets each).
    /// On a durable subject, a member that falls behind catches up from the
    /// log with the messages given to it, not the others' (a member that
    /// unsubscribes takes its undelivered share with it). Not with
    /// `from_seq`.
    pub queue_group: Option<String>,
    /// Queue bound (default: `BusOptions::subscriber_queue`).
    pub capacity: Option<usize>,
    /// Policy override (default: `BusOptions::slow_consumer`).
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// Start with stored durable messages from this sequence number, then
    /// continue live, with nothing missed or repeated in between.
    pub from_seq: Option<u64>,
}

/// What a publish returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    /// The sequence number in the durable log (durable subjects only).
    pub seq: Option<u64>,
}

/// A replay request (`appliancectl events replay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayQuery {
    /// Pattern to match.
    pub pattern: String,
    /// Start at this sequence number.
    pub from_seq: Option<u64>,
    /// Only messages at or after this time (unix ms).
    pub since_ms: Option<u64>,
    /// At most this many (capped at [`MAX_REPLAY`]).
    pub limit: usize,
}

/// Upper bound on one replay answer.
pub const MAX_REPLAY: usize = 100_000;

/// A delivery target in the index.
#[derive(Debug)]
pub(crate) enum Sink {
    Local(Arc<LocalQueue>),
    Conn(Arc<ConnHandle>),
}

/// Connection writers to wake when one publish call ends (when this is
/// dropped): a run of publishes then reaches each subscriber's writer in one
/// wake and one socket write, not a write per message. A connection is
/// added when a message lands in its empty queue, so once per drain.
#[derive(Default)]
pub(crate) struct Wakes(Vec<Arc<ConnHandle>>);

impl Drop for Wakes {
    fn drop(&mut self) {
        for c in self.0.drain(..) {
            c.out.notify.notify_one();
        }
    }
}

/// One subscription.
#[derive(Debug)]
pub(crate) struct SubEntry {
    pub id: u64,
    pub pattern: Pattern,
    pub queue: Option<Arc<str>>,
    pub sink: Sink,
    /// Client's subscription id (connections only).
    pub sid: Arc<str>,
    /// Remove after this many deliveries in total (`u64::MAX`: never).
    pub max: AtomicU64,
    pub delivered: AtomicU64,
    /// The first durable sequence number an in-process subscription takes
    /// (0 for the others): a queue group passes an older message, still
    /// waiting for its fsync when this member joined, to another member.
    pub start_seq: u64,
}

/// The bus's view of a NATS connection.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub id: u64,
    pub peer: String,
    pub out: ConnOutbound,
    pub headers: AtomicBool,
    pub echo: AtomicBool,
    pub name: Mutex<Option<String>>,
    pub counters: ConnCounters,
    pub subs: Mutex<HashMap<Arc<str>, Arc<SubEntry>>>,
}

/// Who receives messages on one subject, and the subject's counters: one
/// cached lookup per published message.
#[derive(Debug, Default)]
struct Matched {
    plain: Vec<Arc<SubEntry>>,
    groups: Vec<Vec<Arc<SubEntry>>>,
    rr: AtomicUsize,
    counters: Arc<Counters>,
}

/// Subscriptions, plus a cache of match results per subject (cleared on
/// every change; bounded).
#[derive(Debug, Default)]
struct Index {
    subs: HashMap<u64, Arc<SubEntry>>,
    /// The same subscriptions by pattern: who matches a subject.
    sublist: Sublist,
    /// Looked up for every published message: a fast hash (seeded per
    /// process, so subjects chosen to collide are no cheaper to find).
    cache: HashMap<Box<str>, Arc<Matched>, foldhash::fast::RandomState>,
}

const MATCH_CACHE_MAX: usize = 4096;

impl Index {
    /// Removes a subscription; whether it was there. (The caller clears
    /// the match cache.)
    fn remove(&mut self, entry: &SubEntry) -> bool {
        if self.subs.remove(&entry.id).is_none() {
            return false;
        }
        let found = self.sublist.remove(entry.pattern.as_str(), entry.id);
        debug_assert!(found && self.sublist.len() == self.subs.len());
        true
    }

    fn compute(&self, subject: &str) -> Matched {
        let mut m = Matched::default();
        let mut groups: HashMap<(&str, &str), Vec<Arc<SubEntry>>> = HashMap::new();
        let mut ids = Vec::new();
        self.sublist.matches(subject, &mut ids);
        // In subscription order, as before the sublist: fan-out order and
        // the queue groups' round robin start from the oldest.
        ids.sort_unstable();
        for s in ids.iter().filter_map(|id| self.subs.get(id)) {
            match &s.queue {
                None => m.plain.push(s.clone()),
                Some(q) => groups
                    .entry((s.pattern.as_str(), q))
                    .or_default()
                    .push(s.clone()),
            }
        }
        let mut g: Vec<_> = groups.into_iter().collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        m.groups = g.into_iter().map(|(_, v)| v).collect();
        m
    }
}

#[derive(Debug, Clone, Default)]
struct SyncState {
    synced: u64,
    failed: Option<Arc<str>>,
}

#[derive(Debug)]
struct DurState {
    log: Log,
    /// Appended, waiting for the group fsync before fan-out (`Always`).
    pending: VecDeque<(Message, Option<u64>)>,
    closed: bool,
    failed: Option<String>,
}

#[derive(Debug)]
struct Durable {
    patterns: Vec<Pattern>,
    policy: DurableFsync,
    state: Mutex<DurState>,
    cond: Condvar,
    synced: watch::Sender<SyncState>,
    fsyncs: AtomicU64,
    recovery_bytes_lost: u64,
    recovery_records_lost: u64,
}

impl Durable {
    fn is_durable(&self, subject: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(subject))
    }
}

pub(crate) struct BusInner {
    pub(crate) opts: BusOptions,
    index: RwLock<Index>,
    next_id: AtomicU64,
    durable: Option<Arc<Durable>>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) subjects: SubjectCounters,
    conns: Mutex<HashMap<u64, Weak<ConnHandle>>>,
    pub(crate) closed: AtomicBool,
    pub(crate) dlq: crate::dlq::DlqState,
}

impl std::fmt::Debug for BusInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusInner")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// The event bus. Cheap to clone; all clones are the same bus.
#[derive(Debug, Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

impl Bus {
    /// Opens the bus, and its durable log when configured (scanning and
    /// repairing it: see the returned report). Call from a context that may
    /// block (start-up, or `spawn_blocking`).
    pub fn open(opts: BusOptions) -> Result<(Self, Option<RecoveryReport>), BusError> {
        let mut report = None;
        let dlq = crate::dlq::DlqState::new(opts.dlq.max_entries);
        let durable = match &opts.durable {
            None => None,
            Some(d) => {
                let patterns = d
                    .subjects
                    .iter()
                    .map(String::as_str)
                    .chain(crate::dlq::DLQ_DURABLE_PATTERNS)
                    .map(Pattern::new)
                    .collect::<Result<Vec<_>, _>>()?;
                let log_opts = LogOptions {
                    segment_max_bytes: d.segment_max_bytes,
                    // The bus drives fsync itself (group commit, off-lock).
                    fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
                    retention: d.retention,
                    max_payload_bytes: u32::try_from(opts.max_payload + 4096).unwrap_or(u32::MAX),
                    // Replays read the log while publishes go on, so every
                    // record is written as it is appended.
                    defer_writes: false,
                    // Needs deferred writes (see `LogOptions::preallocate`).
                    preallocate: false,
                };
                let (log, rep) = Log::open(&d.dir, log_opts)?;
                let synced = rep.last_seq.unwrap_or(0);
                // Dead letters and retry outcomes, oldest first, to rebuild
                // the list (dlq.rs, "Across restarts").
                for rec in log.iter().map_err(|e| BusError::Durable(e.to_string()))? {
                    let rec = rec.map_err(|e| BusError::Durable(e.to_string()))?;
                    let Some(subject) = stored_subject(&rec.payload) else {
                        continue;
                    };
                    if !(subject.starts_with(crate::dlq::DLQ_PREFIX)
                        || subject.starts_with(crate::dlq::DLQ_STATE_PREFIX))
                    {
                        continue;
                    }
                    if let Some(m) = decode_stored(rec.seq, rec.ts_ms, &rec.payload) {
                        dlq.restore(&m);
                    }
                }
                let durable = Durable {
                    patterns,
                    policy: d.fsync,
                    state: Mutex::new(DurState {
                        log,
                        pending: VecDeque::new(),
                        closed: false,
                        failed: None,
                    }),
                    cond: Condvar::new(),
                    synced: watch::Sender::new(SyncState {
                        synced,
                        failed: None,
                    }),
                    fsyncs: AtomicU64::new(0),
                    recovery_bytes_lost: rep.bytes_lost(),
                    recovery_records_lost: rep.records_lost_at_least(),
                };
                if !rep.is_clean() {
                    tracing::warn!(
                        bytes_lost = rep.bytes_lost(),
                        records_lost_at_least = rep.records_lost_at_least(),
                        "bus durable log: damage found and truncated at start-up"
                    );
                }
                report = Some(rep);
                Some(Arc::new(durable))
            }
        };
        let inner = Arc::new(BusInner {
            dlq,
            opts,
            index: RwLock::new(Index::default()),
            next_id: AtomicU64::new(1),
            durable: durable.clone(),
            syncer: Mutex::new(None),
            subjects: SubjectCounters::default(),
            conns: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        if let Some(d) = durable {
            let weak = Arc::downgrade(&inner);
            let handle = std::thread::Builder::new()
                .name("bus-durable-sync".into())
                .spawn(move || syncer_loop(&d, &weak))
                .map_err(|e| BusError::Durable(format!("starting the sync thread: {e}")))?;
            *inner.syncer.lock() = Some(handle);
        }
        Ok((Self { inner }, report))
    }

    /// The options the bus runs with.
    pub fn options(&self) -> &BusOptions {
        &self.inner.opts
    }

    /// Whether messages on `subject` are stored in the durable log.
    pub fn is_durable(&self, subject: &str) -> bool {
        self.inner
            .durable
            .as_ref()
            .is_some_and(|d| d.is_durable(subject))
    }

    /// Publishes bytes. For a durable subject the message is appended to the
    /// log first (and with `DurableFsync::Always`, fsynced) before any
    /// subscriber sees it; the returned ack carries its sequence number.
    /// Never waits for subscribers.
    pub async fn publish(
        &self,
        subject: &str,
        headers: Option<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck, BusError> {
        let msg = self.make_message(subject, None, headers, payload.into())?;
        let ticket = self.inner.publish_msg(msg, None, &mut Wakes::default())?;
        self.settle(ticket).await
    }

    /// Publishes a request: like [`publish`](Self::publish) with a reply subject.
    pub async fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        headers: Option<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck, BusError> {
        let msg = self.make_message(subject, Some(reply), headers, payload.into())?;
        let ticket = self.inner.publish_msg(msg, None, &mut Wakes::default())?;
        self.settle(ticket).await
    }

    /// Publishes a typed event as JSON.
    pub async fn publish_json<T: serde::Serialize + ?Sized>(
        &self,
        subject: &str,
        value: &T,
    ) -> Result<PublishAck, BusError> {
        let payload = serde_json::to_vec(value)?;
        self.publish(subject, None, payload).await
    }

    pub(crate) fn make_message(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<Bytes>,
        payload: Bytes,
    ) -> Result<Message, BusError> {
        self.message(
            Subject::new(subject)?,
            reply.map(Subject::new).transpose()?,
            headers,
            payload,
        )
    }

    /// A message to publish, from subjects already validated.
    pub(crate) fn message(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        headers: Option<Bytes>,
        payload: Bytes,
    ) -> Result<Message, BusError> {
        let size = payload.len() + headers.as_ref().map_or(0, Bytes::len);
        if size > self.inner.opts.max_payload {
            return Err(BusError::PayloadTooLarge {
                size,
                max: self.inner.opts.max_payload,
            });
        }
        Ok(Message {
            subject,
            reply,
            headers,
            payload,
            seq: None,
            ts_ms: appliance_record_log::now_ms(),
        })
    }

    /// Waits until a ticket's message is durable (no-op for the others).
    pub(crate) async fn settle(&self, t: Ticket) -> Result<PublishAck, BusError> {
        if t.wait_sync {
            if let Some(seq) = t.seq {
                self.wait_synced(seq).await?;
            }
        }
        Ok(PublishAck { seq: t.seq })
    }

    /// Waits until every durable message up to `seq` is fsynced (under
    /// `DurableFsync::Always`; immediate otherwise).
    pub(crate) async fn wait_synced(&self, seq: u64) -> Result<(), BusError> {
        let Some(d) = &self.inner.durable else {
            return Ok(());
        };
        let mut rx = d.synced.subscribe();
        let st = rx
            .wait_for(|s| s.synced >= seq || s.failed.is_some())
            .await
            .map_err(|_| BusError::Closed)?;
        if st.synced >= seq {
            Ok(())
        } else {
            Err(BusError::Durable(
                st.failed.as_deref().unwrap_or("failed").to_owned(),
            ))
        }
    }

    /// Forces an fsync of the durable log now (a barrier for tests and
    /// shutdown).
    pub async fn sync_durable(&self) -> Result<(), BusError> {
        let Some(d) = self.inner.durable.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let ps = d.state.lock().log.take_pending_sync();
            match ps {
                Ok(Some(ps)) => {
                    d.fsyncs.fetch_add(1, Ordering::Relaxed);
                    ps.run().map_err(|e| {
                        let msg = e.to_string();
                        d.state.lock().log.poison(msg.clone());
                        BusError::Durable(msg)
                    })
                }
                Ok(None) => Ok(()),
                Err(e) => Err(BusError::Durable(e.to_string())),
            }
        })
        .await
        .map_err(|_| BusError::Closed)?
    }

    /// Subscribes to a pattern. The returned handle unsubscribes when dropped.
    pub fn subscribe(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        self.subscribe_evicting(pattern, opts, None, None, false)
    }

    /// [`subscribe`](Self::subscribe), with what a drop-oldest queue evicts
    /// handed to `evict` instead of being dropped, deferred durable
    /// messages it could not read back told to `lost` as it skips them,
    /// and (with `skip_dead_letters`) no dead letters or retry outcomes
    /// offered.
    pub(crate) fn subscribe_evicting(
        &self,
        pattern: &str,
        opts: SubscribeOptions,
        evict: Option<Evict>,
        lost: Option<Lost>,
        skip_dead_letters: bool,
    ) -> Result<Subscription, BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let SubscribeOptions {
            queue_group,
            capacity,
            slow_consumer,
            from_seq,
        } = opts;
        let pattern = Pattern::new(pattern)?;
        let queue_group = queue_group.as_deref().map(Subject::new).transpose()?;
        let durable = self
            .inner
            .durable
            .as_ref()
            .filter(|d| d.patterns.iter().any(|p| p.overlaps(&pattern)));
        if from_seq.is_some() && durable.is_none() {
            return Err(BusError::NotDurable);
        }
        if from_seq.is_some() && queue_group.is_some() {
            return Err(BusError::GroupFromSeq);
        }
        let cap = capacity.unwrap_or(self.inner.opts.subscriber_queue);
        let policy = slow_consumer.unwrap_or(self.inner.opts.slow_consumer);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let make = |lag_high: Option<u64>, start_seq: u64, next: u64| {
            let mut q = LocalQueue::new(
                cap,
                policy,
                durable.is_some(),
                lag_high,
                queue_group.is_some(),
            );
            if let Some(evict) = evict {
                q = q.with_evict(evict);
            }
            q.lost = lost;
            q.skip_dead_letters = skip_dead_letters;
            let st = q.state.get_mut();
            st.read_upto = next;
            st.offered_from = next;
            let q = Arc::new(q);
            let entry = Arc::new(SubEntry {
                id,
                pattern: pattern.clone(),
                queue: queue_group.as_ref().map(|g| Arc::from(g.as_str())),
                sink: Sink::Local(q.clone()),
                sid: Arc::from(""),
                max: AtomicU64::new(u64::MAX),
                delivered: AtomicU64::new(0),
                start_seq,
            });
            (q, entry)
        };
        let (queue, cursor) = match durable {
            Some(d) => {
                // Registering under the log lock pins "now" in the log: every
                // later durable message is either queued or left in the log
                // past `cursor`.
                let st = d.state.lock();
                let next = st.log.next_seq();
                let from = from_seq.unwrap_or(next);
                let lag = (from < next).then(|| next - 1);
                let (q, entry) = make(lag, from, next);
                self.inner.insert_sub(entry);
                drop(st);
                (q, from)
            }
            None => {
                let (q, entry) = make(None, 0, 0);
                self.inner.insert_sub(entry);
                (q, 0)
            }
        };
        Ok(Subscription {
            bus: self.clone(),
            id,
            pattern,
            queue,
            cursor,
            replay: VecDeque::new(),
        })
    }

    /// Stored durable messages matching a pattern (for `appliancectl events
    /// replay`). Reads on a blocking thread.
    pub async fn replay(&self, q: ReplayQuery) -> Result<Vec<Message>, BusError> {
        let pattern = Pattern::new(&q.pattern)?;
        let Some(d) = self.inner.durable.clone() else {
            return Err(BusError::NotDurable);
        };
        let limit = q.limit.min(MAX_REPLAY);
        tokio::task::spawn_blocking(move || {
            let iter = {
                let st = d.state.lock();
                match (q.from_seq, q.since_ms) {
                    (Some(s), _) => st.log.read_from_seq(s),
                    (None, Some(t)) => st.log.read_since(t),
                    (None, None) => st.log.iter(),
                }
            }
            .map_err(|e| BusError::Durable(e.to_string()))?;
            let mut out = Vec::new();
            for rec in iter {
                if out.len() >= limit {
                    break;
                }
                let rec = rec.map_err(|e| BusError::Durable(e.to_string()))?;
                if q.since_ms.is_some_and(|t| rec.ts_ms < t) {
                    continue;
                }
                if let Some(m) = decode_stored(rec.seq, rec.ts_ms, &rec.payload) {
                    if pattern.matches(m.subject.as_str()) {
                        out.push(m);
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| BusError::Closed)?
    }

    /// Reads up to `limit` stored messages matching `pattern` from `from`,
    /// and the sequence number after the last record looked at.
    async fn read_durable(
        &self,
        pattern: Pattern,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Message>, u64), BusError> {
        let Some(d) = self.inner.durable.clone() else {
            return Err(BusError::NotDurable);
        };
        tokio::task::spawn_blocking(move || {
            let iter = d
                .state
                .lock()
                .log
                .read_from_seq(from)
                .map_err(|e| BusError::Durable(e.to_string()))?;
            let mut out = Vec::new();
            let mut next = from;
            for (scanned, rec) in iter.enumerate() {
                let rec = rec.map_err(|e| BusError::Durable(e.to_string()))?;
                next = rec.seq + 1;
                if let Some(m) = decode_stored(rec.seq, rec.ts_ms, &rec.payload) {
                    if pattern.matches(m.subject.as_str()) {
                        out.push(m);
                    }
                }
                if out.len() >= limit || scanned >= 65_536 {
                    break;
                }
            }
            Ok((out, next))
        })
        .await
        .map_err(|_| BusError::Closed)?
    }

    /// Whether anyone is subscribed to something matching `subject`.
    pub fn has_interest(&self, subject: &str) -> bool {
        let m = self.inner.lookup(subject);
        !m.plain.is_empty() || !m.groups.is_empty()
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> StatsSnapshot {
        let subjects = self.inner.subjects.snapshot();
        let total = sum(&subjects);
        let mut connections: Vec<ConnectionStats> = self
            .inner
            .conns
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .map(|c| ConnectionStats {
                id: c.id,
                peer: c.peer.clone(),
                name: c.name.lock().clone(),
                subscriptions: c.subs.lock().len(),
                traffic: c.counters.snapshot(),
            })
            .collect();
        connections.sort_by_key(|c| c.id);
        let local_subscriptions = self
            .inner
            .index
            .read()
            .subs
            .values()
            .filter(|s| matches!(s.sink, Sink::Local(_)))
            .count();
        let durable = self.inner.durable.as_ref().map(|d| {
            let st = d.state.lock();
            let ls = st.log.stats();
            DurableStats {
                records: ls.records,
                bytes: ls.bytes,
                segments: ls.segments,
                first_seq: ls.first_seq,
                last_seq: ls.last_seq,
                fsyncs: d.fsyncs.load(Ordering::Relaxed),
                recovery_bytes_lost: d.recovery_bytes_lost,
                recovery_records_lost: d.recovery_records_lost,
                failed: st.failed.is_some(),
            }
        });
        StatsSnapshot {
            subjects,
            total,
            connections,
            local_subscriptions,
            durable,
            dlq_entries: self.inner.dlq.len(),
        }
    }

    /// Shuts the bus down: subscriptions end with [`CloseReason::BusClosed`],
    /// the durable log gets a last fsync, and its thread stops. Blocks briefly.
    /// Every dead letter listed by then is stored first (it waits for those
    /// being stored); a handler that fails on a message after that does not
    /// dead-letter it (counted in [`DlqStats::lost`](crate::DlqStats::lost)).
    pub fn close(&self) {
        if self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        // While publishing still works: the dead letters handlers'
        // subscriptions recorded that their tasks have not stored yet, and
        // the dead letters and retry outcomes being stored; none after.
        self.store_all_unstored();
        self.inner.dlq.stop_storing();
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let subs: Vec<Arc<SubEntry>> = self
            .inner
            .index
            .write()
            .subs
            .drain()
            .map(|(_, s)| s)
            .collect();
        self.inner.index.write().cache.clear();
        for s in subs {
            match &s.sink {
                Sink::Local(q) => q.close(CloseReason::BusClosed),
                Sink::Conn(c) => c.out.close(CloseReason::BusClosed),
            }
        }
        self.inner.dlq.close();
        if let Some(d) = &self.inner.durable {
            d.state.lock().closed = true;
            d.cond.notify_all();
        }
        if let Some(h) = self.inner.syncer.lock().take() {
            let _ = h.join();
        }
    }

    pub(crate) fn register_conn(
        &self,
        peer: String,
        max_pending_bytes: usize,
        max_pending_msgs: usize,
        policy: SlowConsumerPolicy,
    ) -> Arc<ConnHandle> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(ConnHandle {
            id,
            peer,
            out: ConnOutbound::new(max_pending_bytes, max_pending_msgs, policy),
            headers: AtomicBool::new(false),
            echo: AtomicBool::new(true),
            name: Mutex::new(None),
            counters: ConnCounters::default(),
            subs: Mutex::new(HashMap::new()),
        });
        self.inner.conns.lock().insert(id, Arc::downgrade(&c));
        if self.inner.closed.load(Ordering::Acquire) {
            c.out.close(CloseReason::BusClosed);
        }
        c
    }

    pub(crate) fn unregister_conn(&self, conn: &ConnHandle) {
        let subs: Vec<Arc<SubEntry>> = conn.subs.lock().drain().map(|(_, s)| s).collect();
        {
            let mut idx = self.inner.index.write();
            for s in &subs {
                idx.remove(s);
            }
            idx.cache.clear();
        }
        self.inner.conns.lock().remove(&conn.id);
    }

    pub(crate) fn conn_subscribe(
        &self,
        conn: &Arc<ConnHandle>,
        sid: &str,
        pattern: &str,
        queue: Option<&str>,
    ) -> Result<(), BusError> {
        let pattern = Pattern::new(pattern)?;
        let sid: Arc<str> = Arc::from(sid);
        let entry = Arc::new(SubEntry {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            pattern,
            queue: queue.map(Arc::from),
            sink: Sink::Conn(conn.clone()),
            sid: sid.clone(),
            max: AtomicU64::new(u64::MAX),
            delivered: AtomicU64::new(0),
            start_seq: 0,
        });
        // A repeated sid replaces the old subscription, as in nats-server.
        if let Some(old) = conn.subs.lock().insert(sid, entry.clone()) {
            let mut idx = self.inner.index.write();
            if idx.remove(&old) {
                idx.cache.clear();
            }
        }
        self.inner.insert_sub(entry);
        Ok(())
    }

    pub(crate) fn conn_unsubscribe(&self, conn: &ConnHandle, sid: &str, max: Option<u64>) {
        let Some(entry) = conn.subs.lock().get(sid).cloned() else {
            return;
        };
        match max {
            Some(m) if entry.delivered.load(Ordering::Acquire) < m => {
                entry.max.store(m, Ordering::Release);
            }
            _ => self.inner.remove_sub(&entry),
        }
    }
}

/// A ticket from the synchronous part of a publish.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub seq: Option<u64>,
    pub wait_sync: bool,
}

impl BusInner {
    fn insert_sub(&self, entry: Arc<SubEntry>) {
        let mut idx = self.index.write();
        idx.sublist.insert(entry.pattern.as_str(), entry.id);
        idx.subs.insert(entry.id, entry);
        debug_assert_eq!(idx.sublist.len(), idx.subs.len());
        idx.cache.clear();
    }

    pub(crate) fn remove_sub(&self, entry: &SubEntry) {
        {
            let mut idx = self.index.write();
            if idx.remove(entry) {
                idx.cache.clear();
            }
        }
        if let Sink::Conn(c) = &entry.sink {
            let mut subs = c.subs.lock();
            if subs.get(&entry.sid).is_some_and(|s| s.id == entry.id) {
                subs.remove(&entry.sid);
            }
        }
    }

    fn lookup(&self, subject: &str) -> Arc<Matched> {
        if let Some(m) = self.index.read().cache.get(subject) {
            return m.clone();
        }
        let mut idx = self.index.write();
        if let Some(m) = idx.cache.get(subject) {
            return m.clone();
        }
        let mut m = idx.compute(subject);
        m.counters = self.subjects.get(top_token(subject));
        let m = Arc::new(m);
        if idx.cache.len() >= MATCH_CACHE_MAX {
            idx.cache.clear();
        }
        idx.cache.insert(subject.into(), m.clone());
        m
    }

    /// The synchronous part of publishing: durable append (and, unless the
    /// policy is `Always`, fan-out). `origin` is the publishing connection.
    pub(crate) fn publish_msg(
        &self,
        mut msg: Message,
        origin: Option<&ConnHandle>,
        wakes: &mut Wakes,
    ) -> Result<Ticket, BusError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let no_echo = no_echo(origin);
        let Some(d) = self
            .durable
            .as_ref()
            .filter(|d| d.is_durable(msg.subject.as_str()))
        else {
            let m = self.lookup(msg.subject.as_str());
            count_publish(&m, &msg, origin);
            self.fan_out(&m, &msg, no_echo, wakes);
            return Ok(Ticket {
                seq: None,
                wait_sync: false,
            });
        };
        let record = encode_stored(&msg);
        let mut st = d.state.lock();
        // Subscribers are looked up under the log lock: one that registers
        // (also under it) with "next sequence N" is then either in this
        // list or reads this message from the log, never neither.
        let m = self.lookup(msg.subject.as_str());
        count_publish(&m, &msg, origin);
        if let Some(f) = &st.failed {
            return Err(BusError::Durable(f.clone()));
        }
        let appended = match st.log.append_at(msg.ts_ms, &record) {
            Ok(a) => a,
            Err(e) => {
                let text = e.to_string();
                if matches!(e, appliance_record_log::Error::Poisoned { .. }) {
                    st.failed = Some(text.clone());
                }
                return Err(BusError::Durable(text));
            }
        };
        msg.seq = Some(appended.seq);
        match d.policy {
            DurableFsync::Interval(_) => {
                // Fan-out under the log lock keeps delivery in sequence order.
                self.fan_out(&m, &msg, no_echo, wakes);
                Ok(Ticket {
                    seq: msg.seq,
                    wait_sync: false,
                })
            }
            DurableFsync::Always => {
                st.pending.push_back((msg, no_echo));
                drop(st);
                d.cond.notify_one();
                Ok(Ticket {
                    seq: Some(appended.seq),
                    wait_sync: true,
                })
            }
        }
    }

    /// Publishes messages in order, appending each run of consecutive
    /// durable messages to the log with one write. Returns the combined
    /// ticket and the errors of the messages that failed. `msgs` is left
    /// empty, with its capacity kept for the next batch.
    pub(crate) fn publish_batch(
        &self,
        msgs: &mut Vec<Message>,
        origin: Option<&ConnHandle>,
    ) -> (Ticket, Vec<BusError>) {
        let mut ticket = Ticket {
            seq: None,
            wait_sync: false,
        };
        let mut errors = Vec::new();
        let mut wakes = Wakes::default();
        let mut merge = |r: Result<Ticket, BusError>| match r {
            Ok(t) => {
                ticket.seq = ticket.seq.max(t.seq);
                ticket.wait_sync |= t.wait_sync;
            }
            Err(e) => errors.push(e),
        };
        let durable = self.durable.as_ref();
        let is_durable = |m: &Message| durable.is_some_and(|d| d.is_durable(m.subject.as_str()));
        let mut run: Vec<Message> = Vec::new();
        for m in msgs.drain(..) {
            if is_durable(&m) {
                run.push(m);
                continue;
            }
            if !run.is_empty() {
                merge(self.publish_durable_run(std::mem::take(&mut run), origin, &mut wakes));
            }
            merge(self.publish_msg(m, origin, &mut wakes));
        }
        if !run.is_empty() {
            merge(self.publish_durable_run(run, origin, &mut wakes));
        }
        (ticket, errors)
    }

    fn publish_durable_run(
        &self,
        mut run: Vec<Message>,
        origin: Option<&ConnHandle>,
        wakes: &mut Wakes,
    ) -> Result<Ticket, BusError> {
        let (Some(d), Some(first)) = (self.durable.as_ref(), run.first()) else {
            return Ok(Ticket {
                seq: None,
                wait_sync: false,
            });
        };
        if run.len() == 1 {
            return self.publish_msg(run.swap_remove(0), origin, wakes);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        let ts = first.ts_ms;
        let no_echo = no_echo(origin);
        let records: Vec<Vec<u8>> = run.iter().map(encode_stored).collect();
        let mut st = d.state.lock();
        // Under the log lock, as in `publish_msg`.
        let matched: Vec<Arc<Matched>> = run
            .iter()
            .map(|msg| {
                let m = self.lookup(msg.subject.as_str());
                count_publish(&m, msg, origin);
                m
            })
            .collect();
        if let Some(f) = &st.failed {
            return Err(BusError::Durable(f.clone()));
        }
        let range = match st.log.append_batch_at(ts, &records) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Ok(Ticket {
                    seq: None,
                    wait_sync: false,
                })
            }
            Err(e) => {
                let text = e.to_string();
                if matches!(e, appliance_record_log::Error::Poisoned { .. }) {
                    st.failed = Some(text.clone());
                }
                return Err(BusError::Durable(text));
            }
        };
        for (m, seq) in run.iter_mut().zip(range.clone()) {
            m.seq = Some(seq);
            m.ts_ms = ts;
        }
        let wait_sync = match d.policy {
            DurableFsync::Interval(_) => {
                for (msg, m) in run.iter().zip(&matched) {
                    self.fan_out(m, msg, no_echo, wakes);
                }
                false
            }
            DurableFsync::Always => {
                st.pending.extend(run.into_iter().map(|m| (m, no_echo)));
                drop(st);
                d.cond.notify_one();
                true
            }
        };
        Ok(Ticket {
            seq: Some(*range.end()),
            wait_sync,
        })
    }

    /// Offers `msg` to every matching subscription (one per queue group).
    /// Returns how many took it. Never blocks.
    fn fan_out(
        &self,
        m: &Matched,
        msg: &Message,
        no_echo: Option<u64>,
        wakes: &mut Wakes,
    ) -> usize {
        let counters = &*m.counters;
        let mut n = 0;
        for s in &m.plain {
            if no_echo.is_some() && matches!(&s.sink, Sink::Conn(c) if Some(c.id) == no_echo) {
                continue;
            }
            match self.deliver(s, msg, counters, wakes) {
                Took::Yes => n += 1,
                Took::Refused(q) => self.drop_refused(&[q], msg, counters),
                Took::No => {}
            }
        }
        if !m.groups.is_empty() {
            let start = m.rr.fetch_add(1, Ordering::Relaxed);
            for g in &m.groups {
                // The members that refused it, in order: if no other
                // member takes it, they drop (or dead-letter) it (no
                // allocation unless one refuses).
                let mut refused = Vec::new();
                let mut took = false;
                for k in 0..g.len() {
                    let member = &g[(start + k) % g.len()];
                    // Joined after this message was stored (its fan-out
                    // waited for an fsync): it would skip it.
                    if msg.seq.is_some_and(|s| s < member.start_seq) {
                        continue;
                    }
                    match self.deliver(member, msg, counters, wakes) {
                        Took::Yes => {
                            took = true;
                            break;
                        }
                        Took::Refused(q) => refused.push(q),
                        Took::No => {}
                    }
                }
                if took {
                    n += 1;
                } else if !refused.is_empty() {
                    self.drop_refused(&refused, msg, counters);
                }
            }
        }
        counters.deliver_many(n, msg.payload.len());
        n
    }

    /// A message that `refused` (one subscription, or a queue group's
    /// members that refused it, in order: [`Offer::Dropped`]) refused and
    /// nobody took: counted once on the subject. The first of them with an
    /// evict sink that takes it (a handler's subscription dead-letters it)
    /// gets it, whichever refused first: a group with a handler among its
    /// members loses nothing without a dead letter. Else it is counted
    /// dropped by the first that refused it.
    fn drop_refused(&self, refused: &[Arc<LocalQueue>], msg: &Message, counters: &Counters) {
        let Some(first) = refused.first() else {
            return;
        };
        counters.drop_one();
        let mut msg = msg.clone();
        for q in refused.iter().filter(|q| q.evicts()) {
            match q.evict(msg) {
                Ok(()) => return,
                Err(m) => msg = m,
            }
        }
        first.count_dropped();
    }

    fn deliver(
        &self,
        s: &Arc<SubEntry>,
        msg: &Message,
        counters: &Counters,
        wakes: &mut Wakes,
    ) -> Took {
        if matches!(&s.sink, Sink::Local(q) if q.skip_dead_letters)
            && crate::dlq::is_dead_letter_subject(msg.subject.as_str())
        {
            return Took::No;
        }
        let max = s.max.load(Ordering::Acquire);
        let mut last = false;
        if max != u64::MAX {
            let n = s.delivered.fetch_add(1, Ordering::AcqRel) + 1;
            if n > max {
                return Took::No;
            }
            last = n == max;
        } else {
            s.delivered.fetch_add(1, Ordering::Relaxed);
        }
        let size = msg.payload.len();
        let (offer, conn) = match &s.sink {
            Sink::Local(q) => (q.offer(msg), None),
            Sink::Conn(c) => {
                let (offer, first) =
                    c.out
                        .offer_msg(msg, &s.sid, c.headers.load(Ordering::Relaxed));
                if first && matches!(offer, Offer::Queued | Offer::QueuedDroppedOldest) {
                    wakes.0.push(c.clone());
                }
                (offer, Some(c))
            }
        };
        let took = match offer {
            Offer::Queued | Offer::Deferred => Took::Yes,
            Offer::QueuedDroppedOldest => {
                counters.drop_one();
                if let Some(c) = conn {
                    c.counters.counters.drop_one();
                }
                Took::Yes
            }
            // Only in-process queues refuse a message.
            Offer::Dropped => match &s.sink {
                Sink::Local(q) => Took::Refused(q.clone()),
                Sink::Conn(_) => Took::No,
            },
            Offer::SlowConsumer => {
                counters.slow_consumer();
                if let Some(c) = conn {
                    c.counters.counters.slow_consumer();
                    c.counters.slow.store(true, Ordering::Relaxed);
                }
                tracing::warn!(subject = %msg.subject, pattern = %s.pattern, "slow consumer closed");
                Took::No
            }
            Offer::Closed => Took::No,
        };
        // The subject's delivery count is added once per message, by fan_out.
        if matches!(took, Took::Yes) {
            if let Some(c) = conn {
                c.counters.counters.deliver(size);
            }
        }
        if last {
            self.remove_sub(s);
        }
        took
    }
}

/// Whether a subscription took a message ([`BusInner::deliver`]).
enum Took {
    Yes,
    /// Its queue refused it ([`Offer::Dropped`]): the caller drops it
    /// (see [`BusInner::drop_refused`]) unless another queue group member
    /// takes it.
    Refused(Arc<LocalQueue>),
    No,
}

/// Counts a published message on its subject and its connection.
fn count_publish(m: &Matched, msg: &Message, origin: Option<&ConnHandle>) {
    let size = msg.payload.len();
    m.counters.publish(size);
    if let Some(o) = origin {
        o.counters.counters.publish(size);
    }
}

/// The first token of a subject (`storage` in `storage.pool.tank`).
fn top_token(subject: &str) -> &str {
    subject.split_once('.').map_or(subject, |(top, _)| top)
}

/// The connection whose own messages must not come back to it.
fn no_echo(origin: Option<&ConnHandle>) -> Option<u64> {
    origin
        .filter(|o| !o.echo.load(Ordering::Relaxed))
        .map(|o| o.id)
}

/// The durable log's fsync thread: group commit under `Always` (fsync, then
/// fan out the batch in order, then acknowledge), a timer under `Interval`.
fn syncer_loop(d: &Durable, bus: &Weak<BusInner>) {
    loop {
        let mut st = d.state.lock();
        match d.policy {
            DurableFsync::Always => {
                while st.pending.is_empty() && !st.closed {
                    d.cond.wait(&mut st);
                }
            }
            DurableFsync::Interval(iv) => {
                if !st.closed {
                    let t = st.log.sync_due_in().unwrap_or(iv);
                    d.cond.wait_for(&mut st, t);
                }
            }
        }
        let batch: Vec<(Message, Option<u64>)> = st.pending.drain(..).collect();
        let closed = st.closed;
        let due = closed || !batch.is_empty() || st.log.sync_due_in().is_some_and(|t| t.is_zero());
        let ps = if due {
            st.log.take_pending_sync()
        } else {
            Ok(None)
        };
        drop(st);
        let result = match ps {
            Ok(Some(ps)) => {
                d.fsyncs.fetch_add(1, Ordering::Relaxed);
                ps.run().map_err(|e| {
                    let text = e.to_string();
                    let mut st = d.state.lock();
                    st.log.poison(text.clone());
                    st.failed = Some(text.clone());
                    text
                })
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                if let Some(last) = batch.last().and_then(|(m, _)| m.seq) {
                    if let Some(inner) = bus.upgrade() {
                        let mut wakes = Wakes::default();
                        for (msg, no_echo) in &batch {
                            let m = inner.lookup(msg.subject.as_str());
                            inner.fan_out(&m, msg, *no_echo, &mut wakes);
                        }
                    }
                    d.synced.send_modify(|s| s.synced = s.synced.max(last));
                }
            }
            Err(text) => {
                tracing::error!(error = %text, "bus durable log: fsync failed; durable publishing stops");
                d.synced
                    .send_modify(|s| s.failed = Some(text.as_str().into()));
            }
        }
        if closed {
            break;
        }
    }
}

/// An in-process subscription. Unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription {
    bus: Bus,
    id: u64,
    pattern: Pattern,
    queue: Arc<LocalQueue>,
    /// Durable messages below this were delivered (or skipped).
    cursor: u64,
    replay: VecDeque<Message>,
}

/// The records of `msgs` (in sequence order) that were deferred to a queue
/// group member, taken out of `deferred`; deferred numbers below the
/// records read are gone from the log and are dropped.
fn keep_deferred(msgs: Vec<Message>, deferred: &mut VecDeque<u64>) -> Vec<Message> {
    let mut kept = Vec::new();
    for m in msgs {
        let Some(seq) = m.seq else { continue };
        while deferred.front().is_some_and(|&d| d < seq) {
            deferred.pop_front();
        }
        if deferred.front() == Some(&seq) {
            deferred.pop_front();
            kept.push(m);
        }
    }
    kept
}

/// How many stored messages a catching-up subscriber reads at a time.
const CATCH_UP_BATCH: usize = 256;

impl Subscription {
    /// The next message. Ends with the reason once the subscription is
    /// closed (slow consumer, bus shut down). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Message, CloseReason> {
        loop {
            if let Some(m) = self.replay.pop_front() {
                if let Some(s) = m.seq {
                    self.cursor = s + 1;
                }
                return Ok(m);
            }
            let from = {
                let mut st = self.queue.state.lock();
                let mut got = None;
                while let Some(m) = st.buf.pop_front() {
                    match m.seq {
                        Some(s) if self.queue_has_catch_up() && s < self.cursor => continue,
                        Some(s) => self.cursor = s + 1,
                        None => {}
                    }
                    got = Some(m);
                    break;
                }
                if let Some(m) = got {
                    return Ok(m);
                }
                if let Some(r) = st.closed {
                    return Err(r);
                }
                match st.lag_high {
                    Some(h) if self.cursor > h => {
                        st.lag_high = None;
                        if let Some(d) = st.deferred.as_mut() {
                            d.clear();
                        }
                        // Deferred, then skipped (removed from the log).
                        self.drop_lagged(&mut st);
                        continue;
                    }
                    Some(_) => Some(self.cursor),
                    None => None,
                }
            };
            match from {
                None => self.queue.notify.notified().await,
                Some(from) => match self
                    .bus
                    .read_durable(self.pattern.clone(), from, CATCH_UP_BATCH)
                    .await
                {
                    Ok((msgs, next)) => {
                        let empty_read = msgs.is_empty();
                        let mut st = self.queue.state.lock();
                        let lag_high = st.lag_high;
                        let (msgs, next) = match (st.deferred.as_mut(), lag_high) {
                            (Some(deferred), Some(h)) => {
                                // Only records up to `h` were all offered
                                // already: past it, one may yet be deferred
                                // to this member.
                                (keep_deferred(msgs, deferred), next.min(h + 1))
                            }
                            _ => (msgs, next),
                        };
                        // Never offered to it, so not deferred either.
                        let msgs: Vec<Message> = if self.queue.skip_dead_letters {
                            msgs.into_iter()
                                .filter(|m| !crate::dlq::is_dead_letter_subject(m.subject.as_str()))
                                .collect()
                        } else {
                            msgs
                        };
                        if let Some(h) = lag_high {
                            // Deferred ones read back (a record past `h`
                            // was not deferred yet; once it is, it counts as
                            // read, below `read_upto`).
                            let offered = st.offered_from;
                            let back = msgs
                                .iter()
                                .filter(|m| m.seq.is_some_and(|s| s >= offered && s <= h))
                                .count() as u64;
                            st.lagged = st.lagged.saturating_sub(back);
                        }
                        st.read_upto = st.read_upto.max(next);
                        if msgs.is_empty() {
                            self.cursor = self.cursor.max(next);
                            if empty_read && next == from {
                                // Nothing at or after `from` in the log (e.g.
                                // removed by retention): skip what was deferred.
                                if let Some(h) = st.lag_high {
                                    self.cursor = self.cursor.max(h + 1);
                                    st.lag_high = None;
                                }
                                if let Some(d) = st.deferred.as_mut() {
                                    d.clear();
                                }
                                self.drop_lagged(&mut st);
                            }
                        }
                        drop(st);
                        self.replay.extend(msgs);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pattern = %self.pattern, "subscription could not catch up from the durable log");
                        let mut st = self.queue.state.lock();
                        if let Some(h) = st.lag_high.take() {
                            if let Some(d) = st.deferred.as_mut() {
                                d.clear();
                            }
                            self.drop_lagged(&mut st);
                            self.cursor = h + 1;
                        }
                    }
                },
            }
        }
    }

    /// Counts the deferred messages not read back as dropped, and tells
    /// the queue's [`Lost`] hook: catching up skipped them.
    fn drop_lagged(&self, st: &mut LocalState) {
        let n = std::mem::take(&mut st.lagged);
        if n > 0 {
            self.queue.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(pattern = %self.pattern, dropped = n, "subscription skipped durable messages it could not read back from the log");
            if let Some(lost) = &self.queue.lost {
                (lost.0)(n);
            }
        }
    }

    fn queue_has_catch_up(&self) -> bool {
        self.bus.inner.durable.is_some()
    }

    /// Messages dropped for this subscriber: by the drop-oldest policy
    /// (except those a handler's subscription dead-letters instead), and
    /// durable messages deferred to the log that it could not read back (a
    /// read error, or removed by retention first).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// Its queue (for a handler's handle to close it).
    pub(crate) fn queue(&self) -> &Arc<LocalQueue> {
        &self.queue
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.close(CloseReason::Unsubscribed);
        let entry = self.bus.inner.index.read().subs.get(&self.id).cloned();
        if let Some(e) = entry {
            self.bus.inner.remove_sub(&e);
        }
    }
}
