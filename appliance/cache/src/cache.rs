//! The thread-safe, in-process cache API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use appliance_record_log::CompactionReport;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::cell::Cell;

use crate::clock::{duration_ms, Clock, SystemClock};
use crate::key::{parse_md5_hex, Request};
use crate::persist::{Fsync, LoadReport, PersistConfig, PersistError, Persistence};
use crate::store::{
    AgentLookup, AgentOwner, Entry, Key, KeyRef, Store, StoreError, StoreLimits, StoreLock,
};

/// Default total byte bound of the memory tier: 256 MiB.
pub const DEFAULT_CAPACITY_BYTES: usize = 256 << 20;
/// Default largest value: 8 MiB, far above any text response an agent
/// produces, and small enough that one put cannot displace most of the cache.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 8 << 20;
/// Default TTL of agent responses: one day. Answers age (models and
/// documents change); plain `SET` keys follow Redis and never expire unless
/// told to.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Configuration of the memory tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Total byte bound (keys, values and per-entry overhead).
    pub capacity_bytes: usize,
    /// Largest value a put accepts.
    pub max_value_bytes: usize,
    /// TTL of agent entries put without an explicit TTL; `None` keeps them
    /// until evicted.
    pub default_agent_ttl: Option<Duration>,
    /// Per-agent TTL overrides (agent id → TTL), taking precedence over the
    /// default.
    pub agent_ttl: BTreeMap<String, Duration>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            default_agent_ttl: Some(DEFAULT_AGENT_TTL),
            agent_ttl: BTreeMap::new(),
        }
    }
}

/// Errors of cache operations.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The entry does not fit the configured limits.
    #[error("cache put refused: {0}")]
    Refused(#[from] StoreError),
    /// A zero TTL was given (the entry would be born expired).
    #[error("invalid TTL: must be at least one millisecond")]
    ZeroTtl,
    /// The persistence layer failed; the operation is not durable and must
    /// not be acknowledged to a client.
    #[error("cache persistence failed: {0}")]
    Persist(String),
}

#[allow(clippy::needless_pass_by_value)] // shaped for `map_err`
fn persist_error(e: PersistError) -> CacheError {
    CacheError::Persist(e.to_string())
}

/// What one [`Cache::maintenance`] pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    /// Expired entries dropped.
    pub purged: usize,
    /// The compaction run, if one was due.
    pub compaction: Option<CompactionReport>,
    /// The rebuild of a log that had failed, if it had (see
    /// [`Cache::heal_log`]).
    pub healed: Option<CompactionReport>,
}

/// A snapshot of the statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Lookups that returned a value.
    pub hits: u64,
    /// Lookups that returned nothing (collisions included).
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 when there were no lookups.
    pub hit_rate: f64,
    /// MD5 matches that failed the SHA-256 ownership check.
    pub collisions: u64,
    /// Entries dropped for the byte bound.
    pub evictions: u64,
    /// Entries dropped because their TTL ran out.
    pub expirations: u64,
    /// Entries held.
    pub entries: u64,
    /// Entries that have an expiry.
    pub entries_with_ttl: u64,
    /// Bytes charged (keys, values, overhead).
    pub bytes: u64,
    /// Configured byte bound.
    pub capacity_bytes: u64,
}

/// Condition of a plain `SET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetCondition {
    /// Always write.
    #[default]
    Always,
    /// Only if the key does not exist (`NX`).
    IfAbsent,
    /// Only if the key exists (`XX`).
    IfPresent,
}

/// When a plain `SET` makes its key expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetExpiry {
    /// Never: a `SET` clears any TTL the key had.
    #[default]
    Never,
    /// After this long (`EX`, `PX`).
    After(Duration),
    /// At this Unix time in milliseconds (`EXAT`, `PXAT`); a time already
    /// past deletes the key instead.
    At(u64),
    /// When the key would have (`KEEPTTL`).
    Keep,
}

/// When `EXPIRE` applies (redis 7's options): every one set must hold.
/// The default (none set) always applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireCondition {
    /// The key has no expiry (`NX`).
    pub if_none: bool,
    /// The key has one (`XX`).
    pub if_some: bool,
    /// The new expiry is later (`GT`; no expiry counts as later than any).
    pub if_later: bool,
    /// The new expiry is sooner (`LT`).
    pub if_sooner: bool,
}

/// A plain `SET` with redis 7's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetOptions {
    /// The new expiry.
    pub expiry: SetExpiry,
    /// `NX` / `XX`.
    pub condition: SetCondition,
    /// Return the value the key had (`GET`).
    pub get: bool,
}

/// What a plain `SET` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    /// The value was written (the condition held).
    pub written: bool,
    /// The value the key had, if asked for (`SetOptions::get`).
    pub old: Option<Bytes>,
}

/// Remaining lifetime of a key, as `TTL` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTtl {
    /// No such key.
    Missing,
    /// The key never expires.
    Persistent,
    /// Milliseconds left.
    Remaining(u64),
}

/// One item of a batch put.
#[derive(Debug, Clone)]
pub struct PutItem<'a> {
    /// The request.
    pub request: Request<'a>,
    /// The response to cache.
    pub response: Bytes,
    /// Explicit TTL; `None` applies the per-agent or default TTL.
    pub ttl: Option<Duration>,
}

/// The agent response cache. Cheap to share behind an `Arc`; every method
/// takes `&self`.
#[derive(Debug)]
pub struct Cache {
    store: StoreLock,
    clock: Arc<dyn Clock>,
    config: CacheConfig,
    persist: Option<Persistence>,
}

thread_local! {
    /// Set while a [`Cache::defer`] closure runs on this thread: mutations
    /// leave their records in the store's journal (in apply order, under the
    /// cache lock) and the closure's end appends them in one write.
    static DEFER_COMMIT: Cell<bool> = const { Cell::new(false) };
    /// Set when a deferred mutation left records in the journal.
    static DEFERRED_DIRTY: Cell<bool> = const { Cell::new(false) };
    /// Set while [`Cache::atomically`] runs on this thread: it asked the
    /// log once, and its mutations are not refused one by one.
    static IN_TRANSACTION: Cell<bool> = const { Cell::new(false) };
}

/// A durable commit still owed for deferred mutations; see [`Cache::defer`].
#[derive(Debug)]
#[must_use = "the mutations are not durable until `Cache::commit` runs"]
pub struct PendingCommit {
    target: u64,
}

impl PendingCommit {
    /// Nothing to commit (no writes, or no persistence).
    pub fn is_empty(&self) -> bool {
        self.target == 0
    }

    /// One commit covering both (log positions only grow, so the later
    /// target covers the earlier).
    #[allow(clippy::needless_pass_by_value)] // both tokens are used up: one commit for both
    pub fn join(self, other: PendingCommit) -> PendingCommit {
        PendingCommit {
            target: self.target.max(other.target),
        }
    }
}

impl Cache {
    /// A cache on the system clock.
    pub fn new(config: CacheConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A cache on the given clock (tests use [`crate::ManualClock`]).
    pub fn with_clock(config: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let limits = StoreLimits {
            capacity_bytes: config.capacity_bytes,
            max_value_bytes: config.max_value_bytes,
        };
        Self {
            store: StoreLock::new(Store::new(limits, false)),
            clock,
            config,
            persist: None,
        }
    }

    /// A persistent cache on the system clock: opens (or creates) the log in
    /// `persist.dir` and replays it.
    pub fn open(
        config: CacheConfig,
        persist: PersistConfig,
    ) -> Result<(Self, LoadReport), PersistError> {
        Self::open_with_clock(config, persist, Arc::new(SystemClock))
    }

    /// [`Cache::open`] on the given clock.
    pub fn open_with_clock(
        config: CacheConfig,
        persist: PersistConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, LoadReport), PersistError> {
        let limits = StoreLimits {
            capacity_bytes: config.capacity_bytes,
            max_value_bytes: config.max_value_bytes,
        };
        let mut store = Store::new(limits, false);
        let (persistence, report) = Persistence::open(persist, &mut store, clock.now_ms())?;
        store.set_journal(true);
        tracing::info!(
            entries = report.entries,
            records = report.records_read,
            expired = report.expired,
            elapsed_ms = crate::clock::duration_ms(report.elapsed),
            bytes_lost = report.recovery.bytes_lost(),
            records_lost_at_least = report.recovery.records_lost_at_least(),
            undecodable = report.undecodable,
            "cache loaded from its log"
        );
        Ok((
            Self {
                store: StoreLock::new(store),
                clock,
                config,
                persist: Some(persistence),
            },
            report,
        ))
    }

    /// The persistence layer, if the cache has one.
    pub fn persistence(&self) -> Option<&Persistence> {
        self.persist.as_ref()
    }

    /// Whether a commit can block on `fdatasync` (persistent with `Always`).
    pub fn commit_blocks(&self) -> bool {
        self.persist
            .as_ref()
            .is_some_and(|p| p.fsync() == Fsync::Always)
    }

    /// Run `f` with the log writes of its mutations deferred to its end: the
    /// records stay in the store's journal (so log order is still apply
    /// order: whoever drains the journal does so under the cache lock) and are
    /// appended with one write when `f` returns. The returned
    /// [`PendingCommit`] must go to [`Cache::commit`] before any of those
    /// mutations is acknowledged; under `Always` that is one `fdatasync` for
    /// the whole batch. The RESP server wraps each pipelined batch in this.
    pub fn defer<T>(&self, f: impl FnOnce() -> T) -> (T, Result<PendingCommit, CacheError>) {
        let none = PendingCommit { target: 0 };
        /// Puts the thread's deferring back however `f` ends: left set
        /// after a panic, every later batch on the thread would take the
        /// nested path below and be acknowledged without its commit.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                DEFER_COMMIT.with(|d| d.set(self.0));
            }
        }
        let was = DEFER_COMMIT.with(|d| d.replace(true));
        let restore = Restore(was);
        let out = f();
        drop(restore);
        if was {
            // The outer `defer` appends and commits.
            return (out, Ok(none));
        }
        let dirty = DEFERRED_DIRTY.with(|d| d.replace(false));
        let Some(persist) = self.persist.as_ref() else {
            return (out, Ok(none));
        };
        // A batch that only read waits under `Always` too, for the writes
        // it may have seen: their records are appended (drained from the
        // journal here if their own batch has not yet) and its replies wait
        // for their fdatasync, so no client is shown a value that a power
        // cut could still take back (redis likewise writes every reply of
        // an event-loop turn after its fsync). When everything appended is
        // durable already, as in a read-only load, nothing waits.
        if !dirty && persist.fsync() != Fsync::Always {
            return (out, Ok(none));
        }
        if let Some(reason) = persist.refusal() {
            // The log has failed. A batch that wrote (before the failure was
            // known) is not acknowledged. One that only read is answered
            // from memory without waiting on a log that takes nothing.
            //
            // The journal is left alone: the heal's rebuild drops it under
            // the cache lock, its snapshot holding what the records did.
            // Dropped here, it could hold another batch's records: this
            // refusal may be stale by the time the lock is taken (a heal
            // finished meanwhile and that batch wrote after it), and that
            // batch, finding nothing of its own left to append, would be
            // acknowledged with its writes in no log at all.
            return if dirty {
                (out, Err(CacheError::Persist(reason)))
            } else {
                (out, Ok(none))
            };
        }
        let now = self.clock.now_ms();
        let appended = self.store.with(|store| {
            let changes = store.take_journal();
            persist.append(&changes, now)
        });
        let pending = appended.map_err(persist_error).map(|target| {
            if dirty || !persist.is_durable(target) {
                PendingCommit { target }
            } else {
                none
            }
        });
        (out, pending)
    }

    /// Make deferred mutations durable (blocking under `Always`).
    #[allow(clippy::needless_pass_by_value)] // the token is used up: one commit per batch
    pub fn commit(&self, pending: PendingCommit) -> Result<(), CacheError> {
        let target = pending.target;
        match self.persist.as_ref() {
            Some(p) if target > 0 => p.commit(target).map_err(persist_error),
            _ => Ok(()),
        }
    }

    /// [`Cache::commit`] without blocking a thread: under `Always` the
    /// log's syncer thread runs the `fdatasync` (one for every batch that
    /// arrived meanwhile, from any connection) and this waits for it; under
    /// `Interval` it returns after asking for a due sync. The RESP server
    /// acknowledges a batch only after this returns `Ok`.
    pub async fn commit_async(&self, pending: PendingCommit) -> Result<(), CacheError> {
        let target = pending.target;
        match self.persist.as_ref() {
            Some(p) if target > 0 => p.commit_async(target).await.map_err(persist_error),
            _ => Ok(()),
        }
    }

    /// [`Cache::defer`] and [`Cache::commit`] in one call.
    pub fn deferring<T>(&self, f: impl FnOnce() -> T) -> (T, Result<(), CacheError>) {
        let (out, pending) = self.defer(f);
        (out, pending.and_then(|p| self.commit(p)))
    }

    /// Runs `f` as one transaction (`EXEC`): no other thread reads or
    /// writes the cache until it returns, and the changes it makes are
    /// logged as one record ([`crate::store::Change::Group`]), so a restart
    /// finds all of them or none. Its mutations are deferred as in
    /// [`Cache::defer`]: inside a `defer` (the RESP server's batch) that
    /// batch's commit covers them; otherwise this commits before it
    /// returns.
    ///
    /// Whether the log takes writes is asked once, before `f` runs: if it
    /// does not, `f` does not run and this is the error. Inside, mutations
    /// are not refused one by one, so a log failing part way cannot split
    /// the transaction (its commit then fails, and a heal writes all of it
    /// from memory). A panic in `f` still ends the transaction: what it
    /// changed so far is one group.
    ///
    /// `f` may call this cache's methods (the lock is re-entrant on this
    /// thread), but must not wait for another thread that uses the cache,
    /// nor for durability (`commit`, `maintenance`, `heal_log`, ...).
    pub fn atomically<T>(&self, f: impl FnOnce() -> T) -> Result<T, CacheError> {
        /// Ends the transaction however `f` ends.
        struct Ends<'a> {
            store: &'a StoreLock,
            mark: usize,
            was: bool,
        }
        impl Drop for Ends<'_> {
            fn drop(&mut self) {
                IN_TRANSACTION.with(|t| t.set(self.was));
                self.store.with(|s| s.group_journal_from(self.mark));
            }
        }
        let (out, done) = self.deferring(|| {
            let _held = self.store.hold();
            let was = IN_TRANSACTION.with(Cell::get);
            if !was {
                if let Some(reason) = self.persist.as_ref().and_then(Persistence::refusal) {
                    return Err(CacheError::Persist(reason));
                }
            }
            let mark = self.store.with(|s| s.journal_len());
            IN_TRANSACTION.with(|t| t.set(true));
            let _ends = Ends {
                store: &self.store,
                mark,
                was,
            };
            Ok(f())
        });
        let out = out?;
        done.map(|()| out)
    }

    /// Periodic upkeep: rebuild the log if it failed, purge expired
    /// entries, sync under `Interval`, and compact the log when its garbage
    /// passes the threshold. Blocking (it may `fdatasync` and rewrite the
    /// log): run it on a blocking thread.
    pub fn maintenance(&self) -> Result<Maintenance, CacheError> {
        let healed = if self.log_failed() {
            self.heal_log()?
        } else {
            None
        };
        let purged = self.tidy()?;
        let compaction = self.compact_if_due()?;
        Ok(Maintenance {
            purged,
            compaction,
            healed,
        })
    }

    /// The quick part of [`maintenance`](Self::maintenance): purge expired
    /// entries and, under `Interval`, `fdatasync` if the interval passed.
    /// Returns the entries purged.
    pub fn tidy(&self) -> Result<usize, CacheError> {
        if self.log_failed() {
            // Nothing can be recorded until the log is rebuilt (expired
            // entries are misses all the same, and the rebuild leaves them
            // out); failing every tick would only fill the journal.
            return Ok(0);
        }
        let purged = self.purge_expired()?;
        if let Some(p) = self.persist.as_ref() {
            p.sync_if_due().map_err(persist_error)?;
        }
        Ok(purged)
    }

    /// The slow part: compact the log if its garbage passed the thresholds
    /// (`None` if not, or if a compaction is already running). Takes as long
    /// as rewriting the live entries; [`crate::maintenance_loop`] runs it
    /// apart from [`tidy`](Self::tidy), so the `Interval` fsync window
    /// and expiry do not wait for it.
    pub fn compact_if_due(&self) -> Result<Option<CompactionReport>, CacheError> {
        match self.persist.as_ref() {
            Some(p) if p.needs_compaction(self.len() as u64) => p
                .compact(&self.store, self.clock.now_ms())
                .map_err(persist_error),
            _ => Ok(None),
        }
    }

    /// Write the log's next spare segment, if one is wanted (see
    /// [`crate::PersistConfig::preallocate`]); whether one was written.
    /// Paced, at background priority, holding no lock;
    /// [`crate::maintenance_loop`] runs it in a slot of its own.
    pub fn prepare_spare_segment(&self) -> Result<bool, CacheError> {
        match self.persist.as_ref() {
            Some(p) => p.prepare_spare().map_err(persist_error),
            None => Ok(false),
        }
    }

    /// Whether the log has failed and takes no writes (see
    /// [`Cache::heal_log`]).
    pub fn log_failed(&self) -> bool {
        self.persist.as_ref().is_some_and(Persistence::is_failed)
    }

    /// Rebuild a failed log from the memory tier, so that writes are
    /// durable again once the cause (a full disk) is gone: see
    /// `Persistence::heal`. `None` if the log has not failed or another
    /// rewrite is running. Holds the cache lock while it writes.
    pub fn heal_log(&self) -> Result<Option<CompactionReport>, CacheError> {
        match self.persist.as_ref() {
            Some(p) => p
                .heal(&self.store, self.clock.now_ms())
                .map_err(persist_error),
            None => Ok(None),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The current time of the cache's clock (Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Run an operation under the lock and hand its journal to the
    /// persistence layer, then commit outside the lock. The operation's
    /// result is returned even when persisting fails, with the error beside it.
    fn apply<T>(&self, f: impl FnOnce(&mut Store, u64) -> T) -> (T, Result<(), CacheError>) {
        let now = self.clock.now_ms();
        let Some(persist) = self.persist.as_ref() else {
            return (self.store.with(|store| f(store, now)), Ok(()));
        };
        let (out, appended) = self.store.with(|store| {
            let out = f(store, now);
            if DEFER_COMMIT.with(Cell::get) {
                if store.journal_pending() {
                    DEFERRED_DIRTY.with(|d| d.set(true));
                }
                return (out, Ok(None));
            }
            let changes = store.take_journal();
            let appended = if changes.is_empty() {
                Ok(None)
            } else {
                persist
                    .append(&changes, now)
                    .map(Some)
                    .map_err(persist_error)
            };
            (out, appended)
        });
        match appended {
            Ok(Some(target)) => (out, persist.commit(target).map_err(persist_error)),
            Ok(None) => (out, Ok(())),
            Err(e) => (out, Err(e)),
        }
    }

    /// A mutation: fails if it could not be made durable. The memory tier
    /// has applied it regardless, so a reader may see a value whose writer
    /// got an error; the writer must treat its write as not acknowledged.
    /// Once the log has failed, mutations are refused before they are
    /// applied, until [`Cache::heal_log`] has rebuilt it.
    fn mutate<T>(&self, f: impl FnOnce(&mut Store, u64) -> T) -> Result<T, CacheError> {
        if !IN_TRANSACTION.with(Cell::get) {
            if let Some(reason) = self.persist.as_ref().and_then(Persistence::refusal) {
                return Err(CacheError::Persist(reason));
            }
        }
        let (out, done) = self.apply(f);
        done.map(|()| out)
    }

    /// A read; it can expire entries, and failing to record that is logged,
    /// not returned (the answer itself is right).
    fn read<T>(&self, f: impl FnOnce(&mut Store, u64) -> T) -> T {
        let (out, done) = self.apply(f);
        if let Err(e) = done {
            tracing::warn!(error = %e, "cache: could not persist an expiry");
        }
        out
    }

    /// The TTL for an agent put without an explicit TTL.
    fn agent_ttl(&self, agent: &[u8]) -> Option<Duration> {
        std::str::from_utf8(agent)
            .ok()
            .and_then(|a| self.config.agent_ttl.get(a).copied())
            .or(self.config.default_agent_ttl)
    }

    fn expiry(now: u64, ttl: Option<Duration>) -> Result<Option<u64>, CacheError> {
        match ttl {
            None => Ok(None),
            Some(d) if d.is_zero() => Err(CacheError::ZeroTtl),
            Some(d) => Ok(Some(now.saturating_add(duration_ms(d).max(1)))),
        }
    }

    // ----- agent API -----

    /// The cached response to a request, if any. A stored entry under the same
    /// MD5 that belongs to another request is a miss (and a collision).
    pub fn get(&self, agent: &[u8], prompt: &[u8], variant: &[u8]) -> Option<Bytes> {
        let request = Request::new(agent, prompt, variant);
        let md5 = request.md5();
        self.read(|s, now| match s.get_agent(&md5, &request, now) {
            AgentLookup::Hit(v) => Some(v),
            AgentLookup::Miss | AgentLookup::Collision => None,
        })
    }

    /// Cache a response. `ttl: None` applies the agent's override or the default.
    pub fn put(
        &self,
        agent: &[u8],
        prompt: &[u8],
        variant: &[u8],
        response: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        self.put_many(&[PutItem {
            request: Request::new(agent, prompt, variant),
            response: response.into(),
            ttl,
        }])
        .into_iter()
        .next()
        .unwrap_or(Ok(()))
    }

    fn agent_entry(&self, item: &PutItem<'_>, now: u64) -> Result<(Key, Entry), CacheError> {
        let r = item.request;
        let ttl = item.ttl.or_else(|| self.agent_ttl(r.agent));
        let expires_at = Self::expiry(now, ttl)?;
        let d = r.digests();
        let owner = AgentOwner::new(r.agent, r.prompt, r.variant, d.sha256);
        Ok((
            Key::Agent(d.md5),
            Entry {
                value: item.response.clone(),
                expires_at,
                owner: Some(owner),
            },
        ))
    }

    /// Batch put under one lock acquisition; one result per item.
    pub fn put_many(&self, items: &[PutItem<'_>]) -> Vec<Result<(), CacheError>> {
        let (results, done) = self.apply(|s, now| {
            items
                .iter()
                .map(|item| {
                    let (key, entry) = self.agent_entry(item, now)?;
                    s.insert(key, entry, now).map_err(CacheError::from)
                })
                .collect::<Vec<_>>()
        });
        match done {
            Ok(()) => results,
            Err(e) => {
                let msg = e.to_string();
                results
                    .into_iter()
                    .map(|r| r.and_then(|()| Err(CacheError::Persist(msg.clone()))))
                    .collect()
            }
        }
    }

    /// Batch get under one lock acquisition.
    pub fn get_many(&self, requests: &[Request<'_>]) -> Vec<Option<Bytes>> {
        let keys: Vec<_> = requests.iter().map(Request::md5).collect();
        self.read(|s, now| {
            keys.iter()
                .zip(requests)
                .map(|(md5, request)| match s.get_agent(md5, request, now) {
                    AgentLookup::Hit(v) => Some(v),
                    AgentLookup::Miss | AgentLookup::Collision => None,
                })
                .collect()
        })
    }

    /// Drop the cached response to one request; returns whether it was there.
    /// An entry of a different request under the same MD5 is left alone.
    pub fn invalidate(
        &self,
        agent: &[u8],
        prompt: &[u8],
        variant: &[u8],
    ) -> Result<bool, CacheError> {
        let request = Request::new(agent, prompt, variant);
        let md5 = request.md5();
        self.mutate(|s, now| {
            let key = Key::Agent(md5);
            let owned = s
                .peek(&key, now)
                .and_then(|e| e.owner.as_ref())
                .is_some_and(|o| o.belongs_to(&request));
            owned && s.remove(&key, now)
        })
    }

    /// Drop every cached response of an agent; returns how many.
    pub fn invalidate_agent(&self, agent: &[u8]) -> Result<usize, CacheError> {
        self.mutate(|s, now| s.remove_agent(agent, now))
    }

    // ----- plain key-value tier (RESP GET/SET) -----

    /// Resolve a RESP key: a plain key as given, else a 32-hex-digit MD5
    /// naming an agent entry.
    fn resolve<'k>(s: &mut Store, key: &'k [u8], now: u64) -> Option<KeyRef<'k>> {
        let plain = KeyRef::Plain(key);
        if s.contains(plain, now) {
            return Some(plain);
        }
        let agent = KeyRef::Agent(parse_md5_hex(key)?);
        s.contains(agent, now).then_some(agent)
    }

    /// `GET key`: a plain key, or an agent entry by its MD5 hex.
    pub fn get_plain(&self, key: &[u8]) -> Option<Bytes> {
        self.read(|s, now| {
            let mut found = s.touch(KeyRef::Plain(key), now).map(|e| e.value.clone());
            if found.is_none() {
                if let Some(md5) = parse_md5_hex(key) {
                    found = s.touch(KeyRef::Agent(md5), now).map(|e| e.value.clone());
                }
            }
            s.count_lookup(found.is_some());
            found
        })
    }

    /// `SET key value [ttl] [NX|XX]`; returns whether the value was written.
    pub fn set_plain(
        &self,
        key: &[u8],
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
        condition: SetCondition,
    ) -> Result<bool, CacheError> {
        let expiry = ttl.map_or(SetExpiry::Never, SetExpiry::After);
        let options = SetOptions {
            expiry,
            condition,
            get: false,
        };
        self.set_plain_with(key, value, options)
            .map(|done| done.written)
    }

    /// `SET key value` with any of redis 7's options, in one step under the
    /// cache lock (the old value for `GET` and the TTL for `KEEPTTL` are
    /// the ones replaced).
    pub fn set_plain_with(
        &self,
        key: &[u8],
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<SetOutcome, CacheError> {
        let value = value.into();
        let res = self.mutate(|s, now| {
            // Looked up only when an option needs it: a plain SET is hot.
            let needs_current = options.get || options.expiry == SetExpiry::Keep;
            let existing = if options.condition != SetCondition::Always || needs_current {
                Self::resolve(s, key, now)
            } else {
                None
            };
            let current = existing.and_then(|k| s.peek(k, now));
            let old = current.filter(|_| options.get).map(|e| e.value.clone());
            let kept = current.and_then(|e| e.expires_at);
            let go = match options.condition {
                SetCondition::Always => true,
                SetCondition::IfAbsent => existing.is_none(),
                SetCondition::IfPresent => existing.is_some(),
            };
            if !go {
                return Ok(SetOutcome {
                    written: false,
                    old,
                });
            }
            let expires_at = match options.expiry {
                SetExpiry::Never => None,
                SetExpiry::After(d) => Self::expiry(now, Some(d))?,
                SetExpiry::At(at) if at <= now => {
                    s.remove(KeyRef::Plain(key), now);
                    return Ok(SetOutcome { written: true, old });
                }
                SetExpiry::At(at) => Some(at),
                SetExpiry::Keep => kept,
            };
            let entry = Entry {
                value,
                expires_at,
                owner: None,
            };
            s.insert_ref(KeyRef::Plain(key), entry, now)?;
            Ok(SetOutcome { written: true, old })
        });
        res?
    }

    /// `DEL key`; returns whether a key was deleted.
    pub fn del_plain(&self, key: &[u8]) -> Result<bool, CacheError> {
        self.mutate(|s, now| Self::resolve(s, key, now).is_some_and(|k| s.remove(k, now)))
    }

    /// `EXISTS key`.
    pub fn exists(&self, key: &[u8]) -> bool {
        self.read(|s, now| Self::resolve(s, key, now).is_some())
    }

    /// `EXPIRE`/`PERSIST`: set (or clear with `None`) a key's TTL; a zero TTL
    /// deletes it. Returns whether the key exists.
    pub fn expire(&self, key: &[u8], ttl: Option<Duration>) -> Result<bool, CacheError> {
        self.expire_if(key, ttl, ExpireCondition::default())
    }

    /// [`Cache::expire`] if `condition` holds for the key's expiry now (in
    /// one step under the cache lock); returns whether it was applied.
    pub fn expire_if(
        &self,
        key: &[u8],
        ttl: Option<Duration>,
        condition: ExpireCondition,
    ) -> Result<bool, CacheError> {
        self.mutate(|s, now| {
            let Some(k) = Self::resolve(s, key, now) else {
                return false;
            };
            let at = ttl.map(|d| now.saturating_add(duration_ms(d)));
            let current = s.peek(k, now).and_then(|e| e.expires_at);
            // No expiry counts as later than any.
            let later = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => a > b,
                (a, b) => a.is_none() && b.is_some(),
            };
            let go = (!condition.if_none || current.is_none())
                && (!condition.if_some || current.is_some())
                && (!condition.if_later || later(at, current))
                && (!condition.if_sooner || later(current, at));
            go && s.set_expiry(k, at, now)
        })
    }

    /// `TTL`/`PTTL`.
    pub fn ttl(&self, key: &[u8]) -> KeyTtl {
        self.read(|s, now| match Self::resolve(s, key, now) {
            None => KeyTtl::Missing,
            Some(k) => match s.ttl_ms(k, now) {
                None => KeyTtl::Missing,
                Some(None) => KeyTtl::Persistent,
                Some(Some(ms)) => KeyTtl::Remaining(ms),
            },
        })
    }

    /// Drop expired entries now (the server calls this periodically).
    pub fn purge_expired(&self) -> Result<usize, CacheError> {
        self.mutate(|s, now| s.purge_expired(now))
    }

    /// Drop everything.
    pub fn clear(&self) -> Result<(), CacheError> {
        self.mutate(|s, _| s.clear())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.store.with(|s| s.len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.store.with(|s| s.is_empty())
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> CacheStats {
        self.store.with(|s| {
            let c = s.counters();
            let lookups = c.hits + c.misses;
            CacheStats {
                hits: c.hits,
                misses: c.misses,
                hit_rate: if lookups == 0 {
                    0.0
                } else {
                    c.hits as f64 / lookups as f64
                },
                collisions: c.collisions,
                evictions: c.evictions,
                expirations: c.expirations,
                entries: s.len() as u64,
                entries_with_ttl: s.with_expiry() as u64,
                bytes: s.bytes() as u64,
                capacity_bytes: s.limits().capacity_bytes as u64,
            }
        })
    }

    /// A copy of every live entry, least recently used first (export,
    /// compaction).
    pub fn snapshot(&self) -> Vec<(Key, Entry)> {
        let now = self.clock.now_ms();
        self.store.with(|s| {
            s.iter()
                .filter(|(k, _)| s.peek(*k, now).is_some())
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use md5::{Digest as _, Md5};

    /// A batch that panics (a bug in a command, say) leaves the thread
    /// deferring no longer: the next batch on it still owes its commit.
    #[test]
    fn a_panicking_batch_leaves_the_next_one_owing_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut persist = PersistConfig::new(dir.path());
        persist.fsync = Fsync::Always;
        let (cache, _) = Cache::open(CacheConfig::default(), persist).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.defer(|| -> () { panic!("a command's bug") })
        }));
        assert!(panicked.is_err());
        assert!(!DEFER_COMMIT.with(Cell::get));
        let (res, pending) =
            cache.defer(|| cache.set_plain(b"after", "v", None, SetCondition::Always));
        assert!(res.unwrap());
        let pending = pending.unwrap();
        assert!(
            pending.target > 0,
            "the write would be acknowledged uncommitted"
        );
        cache.commit(pending).unwrap();
    }

    /// The first published MD5 collision (Wang, Feng, Lai, Yu, 2004): two
    /// 128-byte messages that differ in six bytes and share the MD5
    /// 79054025255fb1a26e4bc422aef54eb4.
    const WANG_M1: &str = "d131dd02c5e6eec4693d9a0698aff95c2fcab58712467eab4004583eb8fb7f89\
                           55ad340609f4b30283e488832571415a085125e8f7cdc99fd91dbdf280373c5b\
                           d8823e3156348f5bae6dacd436c919c6dd53e2b487da03fd02396306d248cda0\
                           e99f33420f577ee8ce54b67080a80d1ec69821bcb6a8839396f9652b6ff72a70";
    const WANG_M2: &str = "d131dd02c5e6eec4693d9a0698aff95c2fcab50712467eab4004583eb8fb7f89\
                           55ad340609f4b30283e4888325f1415a085125e8f7cdc99fd91dbd7280373c5b\
                           d8823e3156348f5bae6dacd436c919c6dd53e23487da03fd02396306d248cda0\
                           e99f33420f577ee8ce54b67080280d1ec69821bcb6a8839396f965ab6ff72a70";

    fn collision_pair() -> (Vec<u8>, Vec<u8>) {
        let m1 = hex::decode(WANG_M1).unwrap();
        let m2 = hex::decode(WANG_M2).unwrap();
        // Check the pair before relying on it.
        assert_eq!(m1.len(), 128);
        assert_ne!(m1, m2, "the pair must differ");
        let (h1, h2) = (Md5::digest(&m1), Md5::digest(&m2));
        assert_eq!(h1, h2, "the pair must collide under MD5");
        assert_eq!(hex::encode(h1), "79054025255fb1a26e4bc422aef54eb4");
        (m1, m2)
    }

    fn cache_at(clock: &Arc<ManualClock>, config: CacheConfig) -> Cache {
        Cache::with_clock(config, clock.clone())
    }

    #[test]
    fn collision_pair_is_a_miss_and_counted() {
        let (m1, m2) = collision_pair();
        for (agent1, agent2, prompt1, prompt2) in [
            // As agent id.
            (&m1[..], &m2[..], &b"which pool?"[..], &b"which pool?"[..]),
            // As prompt, with an empty agent id so the prompt starts at offset 0.
            (&b""[..], &b""[..], &m1[..], &m2[..]),
        ] {
            let r1 = Request::new(agent1, prompt1, b"v");
            let r2 = Request::new(agent2, prompt2, b"v");
            assert_eq!(r1.md5(), r2.md5(), "requests collide inside the encoding");
            assert_ne!(r1.sha256(), r2.sha256());

            let cache = Cache::new(CacheConfig::default());
            cache.put(agent1, prompt1, b"v", "answer-1", None).unwrap();
            assert_eq!(cache.get(agent2, prompt2, b"v"), None);
            let st = cache.stats();
            assert_eq!((st.hits, st.misses, st.collisions), (0, 1, 1));
            assert_eq!(
                cache.get(agent1, prompt1, b"v"),
                Some(Bytes::from("answer-1"))
            );
            // Invalidating the other request must not drop this entry.
            assert!(!cache.invalidate(agent2, prompt2, b"v").unwrap());
            assert_eq!(cache.len(), 1);
            // Writing the other request replaces the slot; now the first misses.
            cache.put(agent2, prompt2, b"v", "answer-2", None).unwrap();
            assert_eq!(cache.get(agent1, prompt1, b"v"), None);
            assert_eq!(
                cache.get(agent2, prompt2, b"v"),
                Some(Bytes::from("answer-2"))
            );
            assert_eq!(cache.stats().collisions, 2);
        }
    }

    #[test]
    fn ttl_default_override_and_explicit() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let mut config = CacheConfig {
            default_agent_ttl: Some(Duration::from_secs(60)),
            ..CacheConfig::default()
        };
        config
            .agent_ttl
            .insert("fast".into(), Duration::from_secs(5));
        let cache = cache_at(&clock, config);
        cache.put(b"slow", b"p", b"", "a", None).unwrap();
        cache.put(b"fast", b"p", b"", "b", None).unwrap();
        cache
            .put(b"slow", b"q", b"", "c", Some(Duration::from_secs(2)))
            .unwrap();
        clock.advance(Duration::from_millis(1_999));
        assert!(cache.get(b"slow", b"q", b"").is_some());
        clock.advance(Duration::from_millis(1));
        assert!(cache.get(b"slow", b"q", b"").is_none(), "explicit TTL");
        clock.advance(Duration::from_secs(3));
        assert!(cache.get(b"fast", b"p", b"").is_none(), "per-agent TTL");
        assert!(cache.get(b"slow", b"p", b"").is_some());
        clock.advance(Duration::from_secs(55));
        assert!(cache.get(b"slow", b"p", b"").is_none(), "default TTL");
        let st = cache.stats();
        assert_eq!(st.expirations, 3);
        assert_eq!(st.entries, 0);
        assert!(matches!(
            cache.put(b"a", b"p", b"", "x", Some(Duration::ZERO)),
            Err(CacheError::ZeroTtl)
        ));
    }

    #[test]
    fn plain_tier_and_md5_hex_reads() {
        let clock = Arc::new(ManualClock::new(0));
        let cache = cache_at(&clock, CacheConfig::default());
        assert!(cache
            .set_plain(b"k", "v", None, SetCondition::Always)
            .unwrap());
        assert!(!cache
            .set_plain(b"k", "w", None, SetCondition::IfAbsent)
            .unwrap());
        assert!(!cache
            .set_plain(b"x", "w", None, SetCondition::IfPresent)
            .unwrap());
        assert_eq!(cache.get_plain(b"k"), Some(Bytes::from("v")));
        assert_eq!(cache.ttl(b"k"), KeyTtl::Persistent);
        assert_eq!(cache.ttl(b"x"), KeyTtl::Missing);
        assert!(cache.expire(b"k", Some(Duration::from_secs(10))).unwrap());
        assert_eq!(cache.ttl(b"k"), KeyTtl::Remaining(10_000));
        clock.advance(Duration::from_secs(10));
        assert!(!cache.exists(b"k"));

        cache.put(b"agent", b"prompt", b"", "resp", None).unwrap();
        let hex = crate::md5_hex(&Request::new(b"agent", b"prompt", b"").md5());
        assert_eq!(cache.get_plain(hex.as_bytes()), Some(Bytes::from("resp")));
        assert_eq!(
            cache.get_plain(hex.to_uppercase().as_bytes()),
            Some(Bytes::from("resp"))
        );
        assert!(cache.exists(hex.as_bytes()));
        assert!(matches!(cache.ttl(hex.as_bytes()), KeyTtl::Remaining(_)));
        assert!(cache.del_plain(hex.as_bytes()).unwrap());
        assert_eq!(cache.get(b"agent", b"prompt", b""), None);
    }

    #[test]
    fn batch_and_invalidate_agent() {
        let cache = Cache::new(CacheConfig::default());
        const PROMPTS: [[u8; 1]; 5] = [[0], [1], [2], [3], [4]];
        let items: Vec<PutItem<'_>> = (0..5u8)
            .map(|i| PutItem {
                request: Request::new(
                    if i < 3 { b"a" } else { b"b" },
                    &PROMPTS[usize::from(i)],
                    b"",
                ),
                response: Bytes::from(vec![i]),
                ttl: None,
            })
            .collect();
        assert!(cache.put_many(&items).iter().all(Result::is_ok));
        let reqs: Vec<_> = items.iter().map(|i| i.request).collect();
        let got = cache.get_many(&reqs);
        assert_eq!(got.len(), 5);
        for (g, p) in got.iter().zip(PROMPTS.iter()) {
            assert_eq!(g.as_deref(), Some(&p[..]));
        }
        assert_eq!(cache.invalidate_agent(b"a").unwrap(), 3);
        assert_eq!(cache.len(), 2);
        assert!(cache.invalidate(b"b", &[3], b"").unwrap());
        assert_eq!(cache.len(), 1);
        let st = cache.stats();
        assert_eq!((st.hits, st.misses), (5, 0));
        assert!((st.hit_rate - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn oversized_put_is_refused_with_a_clear_error() {
        let cache = Cache::new(CacheConfig {
            max_value_bytes: 16,
            ..CacheConfig::default()
        });
        let err = cache.put(b"a", b"p", b"", vec![0u8; 17], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cache put refused: value of 17 bytes exceeds the maximum value size of 16 bytes"
        );
        assert!(cache.is_empty());
    }
}
