//! The memory tier: a byte-bounded LRU map with per-entry expiry.
//!
//! Sans-IO and single-threaded: every operation takes the current time as an
//! argument, and [`crate::Cache`] wraps a `Store` in a mutex. Mutations can be
//! journalled as [`Change`]s so the persistence layer can append them to the
//! record log in exactly the order they were applied.
//!
//! Invariants (checked by `check_invariants` in the tests):
//! - `bytes` is the sum of the costs of all entries in `map`, and
//!   `bytes <= capacity_bytes` after every public operation;
//! - `expiry` holds exactly one `(expires_at, key)` per entry with an expiry;
//! - `by_agent` holds exactly the MD5 keys of agent entries, under their agent.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use bytes::Bytes;
use hashlink::linked_hash_map::RawEntryMut;
use hashlink::LinkedHashMap;

use crate::key::Request;

/// Bookkeeping charged per entry on top of its key and value bytes: the hash
/// table slot and LRU links (~48 B), the expiry-index node (~40 B) and the
/// entry header. A round, slightly generous figure, so the configured byte
/// bound is a bound on real memory, not only on payload.
pub const ENTRY_OVERHEAD: usize = 128;

/// Where an entry lives.
///
/// `Hash` is written by hand so that a [`KeyRef`] hashes exactly like the
/// `Key` it borrows: lookups hash the borrowed form and need no allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// An agent response, addressed by the MD5 of the request encoding.
    Agent([u8; 16]),
    /// A plain key, stored as given (RESP `SET`/`GET`).
    Plain(Box<[u8]>),
}

impl Key {
    fn len(&self) -> usize {
        match self {
            Key::Agent(k) => k.len(),
            Key::Plain(k) => k.len(),
        }
    }

    /// The borrowed form.
    pub fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Agent(k) => KeyRef::Agent(*k),
            Key::Plain(k) => KeyRef::Plain(k),
        }
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

/// A key without ownership: what lookups take, so that looking up a plain
/// key given as a slice of the request does not copy it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRef<'a> {
    /// An agent entry's MD5.
    Agent([u8; 16]),
    /// A plain key.
    Plain(&'a [u8]),
}

impl KeyRef<'_> {
    /// The owned form.
    pub fn to_owned(self) -> Key {
        match self {
            KeyRef::Agent(k) => Key::Agent(k),
            KeyRef::Plain(k) => Key::Plain(k.into()),
        }
    }
}

impl<'a> From<&'a Key> for KeyRef<'a> {
    fn from(key: &'a Key) -> Self {
        key.as_ref()
    }
}

/// The request an agent entry belongs to, kept in one allocation (agent,
/// prompt and variant bytes, then the SHA-256) whose lengths sit beside the
/// pointer: a hit checks ownership with one dereference from the map's node,
/// and a request of another length is told apart without any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOwner {
    bytes: Arc<[u8]>,
    agent_len: usize,
    prompt_len: usize,
}

const SHA256_LEN: usize = 32;

impl AgentOwner {
    /// The owner of an entry stored for `(agent, prompt, variant)`, whose
    /// request encoding has SHA-256 `sha256`.
    pub fn new(agent: &[u8], prompt: &[u8], variant: &[u8], sha256: [u8; 32]) -> Self {
        let mut bytes = Vec::with_capacity(agent.len() + prompt.len() + variant.len() + SHA256_LEN);
        bytes.extend_from_slice(agent);
        bytes.extend_from_slice(prompt);
        bytes.extend_from_slice(variant);
        bytes.extend_from_slice(&sha256);
        Self {
            bytes: bytes.into(),
            agent_len: agent.len(),
            prompt_len: prompt.len(),
        }
    }

    /// Agent id.
    pub fn agent(&self) -> &[u8] {
        &self.bytes[..self.agent_len]
    }

    /// Prompt.
    pub fn prompt(&self) -> &[u8] {
        &self.bytes[self.agent_len..self.agent_len + self.prompt_len]
    }

    /// Variant (possibly empty).
    pub fn variant(&self) -> &[u8] {
        &self.bytes[self.agent_len + self.prompt_len..self.bytes.len() - SHA256_LEN]
    }

    /// SHA-256 of the request encoding (kept in the log; see `belongs_to`).
    pub fn sha256(&self) -> [u8; 32] {
        let mut out = [0; SHA256_LEN];
        out.copy_from_slice(&self.bytes[self.bytes.len() - SHA256_LEN..]);
        out
    }

    /// Whether this entry was stored for `request`: the stored request
    /// equals it byte for byte (the same test as equal SHA-256s of the
    /// injective encoding, without hashing on every lookup).
    pub fn belongs_to(&self, request: &Request<'_>) -> bool {
        self.agent_len == request.agent.len()
            && self.prompt_len == request.prompt.len()
            && self.len()
                == request.agent.len() + request.prompt.len() + request.variant.len() + SHA256_LEN
            && self.agent() == request.agent
            && self.prompt() == request.prompt
            && self.variant() == request.variant
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// A cached value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The response or plain value.
    pub value: Bytes,
    /// Absolute expiry in Unix milliseconds; `None` never expires.
    pub expires_at: Option<u64>,
    /// Set for agent entries.
    pub owner: Option<AgentOwner>,
}

impl Entry {
    fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// The store behind the cache's lock. Re-entrant: a transaction (`EXEC`)
/// holds it across the commands it runs, each of which takes it again on
/// the same thread, while other threads wait for the whole transaction.
#[derive(Debug)]
pub struct StoreLock(parking_lot::ReentrantMutex<RefCell<Store>>);

impl StoreLock {
    /// `store`, unlocked.
    pub fn new(store: Store) -> Self {
        Self(parking_lot::ReentrantMutex::new(RefCell::new(store)))
    }

    /// Runs `f` with the store locked. Not from inside another `with` on
    /// the same thread: the store is borrowed there, and that panics (with
    /// a plain mutex it would have deadlocked).
    pub fn with<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let held = self.0.lock();
        let mut store = held.borrow_mut();
        f(&mut store)
    }

    /// Holds the lock, without borrowing the store, until the guard drops:
    /// [`with`](Self::with) still works on this thread, and every other
    /// thread waits.
    pub fn hold(&self) -> parking_lot::ReentrantMutexGuard<'_, RefCell<Store>> {
        self.0.lock()
    }
}

/// One applied mutation, for the persistence journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `key` now holds `entry` (insert, replace or new expiry).
    Put {
        /// Key written.
        key: Key,
        /// Its new entry.
        entry: Entry,
    },
    /// `key` is gone (delete, eviction or expiry).
    Remove {
        /// Key removed.
        key: Key,
    },
    /// The changes of one transaction (`EXEC`), in order: logged as one
    /// record, so a restart finds all of them or none. A group inside (a
    /// transaction run inside another) is logged as its members.
    Group(Vec<Change>),
}

/// Limits of the memory tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Total cost of all entries (see [`ENTRY_OVERHEAD`]).
    pub capacity_bytes: usize,
    /// Largest value accepted by a put.
    pub max_value_bytes: usize,
}

/// Why a put was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The value alone exceeds the configured maximum.
    #[error("value of {size} bytes exceeds the maximum value size of {max} bytes")]
    ValueTooLarge {
        /// Value size.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// Key, value and bookkeeping together exceed the whole cache.
    #[error("entry of {cost} bytes (key, value and overhead) exceeds the cache capacity of {capacity} bytes")]
    EntryTooLarge {
        /// Entry cost.
        cost: usize,
        /// Configured capacity.
        capacity: usize,
    },
}

/// Monotonic event counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lookups that returned a value.
    pub hits: u64,
    /// Lookups that returned nothing (including collisions and expired entries).
    pub misses: u64,
    /// Agent lookups whose MD5 matched an entry of a different request.
    pub collisions: u64,
    /// Entries dropped to stay within the byte bound.
    pub evictions: u64,
    /// Entries dropped because their TTL ran out.
    pub expirations: u64,
}

/// Result of an agent lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentLookup {
    /// The entry belongs to the request.
    Hit(Bytes),
    /// No live entry under that MD5.
    Miss,
    /// An entry exists under that MD5 but belongs to another request.
    Collision,
}

#[derive(Debug)]
struct Slot {
    entry: Entry,
    cost: usize,
}

/// The side indexes and the byte count, kept beside the map so that they can
/// be updated while an entry of the map is borrowed.
#[derive(Debug, Default)]
struct Side {
    expiry: BTreeSet<(u64, Key)>,
    by_agent: HashMap<Box<[u8]>, HashSet<[u8; 16]>>,
    bytes: usize,
}

impl Side {
    /// Undo the side indexes and byte count of an entry taken out of the map.
    fn detach(&mut self, key: KeyRef<'_>, slot: &Slot) {
        self.bytes -= slot.cost;
        if let Some(at) = slot.entry.expires_at {
            self.expiry.remove(&(at, key.to_owned()));
        }
        if let (KeyRef::Agent(md5), Some(owner)) = (key, slot.entry.owner.as_ref()) {
            if let Some(set) = self.by_agent.get_mut(owner.agent()) {
                set.remove(&md5);
                if set.is_empty() {
                    self.by_agent.remove(owner.agent());
                }
            }
        }
    }

    fn attach(&mut self, key: KeyRef<'_>, entry: &Entry, cost: usize) {
        self.bytes += cost;
        if let Some(at) = entry.expires_at {
            self.expiry.insert((at, key.to_owned()));
        }
        if let (KeyRef::Agent(md5), Some(owner)) = (key, entry.owner.as_ref()) {
            self.by_agent
                .entry(owner.agent().into())
                .or_default()
                .insert(md5);
        }
    }
}

fn record(journal: &mut Option<Vec<Change>>, change: impl FnOnce() -> Change) {
    if let Some(j) = journal.as_mut() {
        j.push(change());
    }
}

/// The memory tier. See the module docs.
///
/// The LRU order is the order of `map` (hashlink's linked hash map: one
/// allocation-free hash probe finds an entry and relinks it at the back).
/// Every lookup hashes a [`KeyRef`] and probes once: an expired entry is
/// dropped, a live one is refreshed, in the same probe.
#[derive(Debug)]
pub struct Store {
    map: LinkedHashMap<Key, Slot>,
    side: Side,
    limits: StoreLimits,
    counters: Counters,
    journal: Option<Vec<Change>>,
}

impl Store {
    /// An empty store. With `journal`, mutations are recorded for
    /// [`Store::take_journal`].
    pub fn new(limits: StoreLimits, journal: bool) -> Self {
        Self {
            map: LinkedHashMap::new(),
            side: Side::default(),
            limits,
            counters: Counters::default(),
            journal: journal.then(Vec::new),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Number of entries (live or expired but not yet purged).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries that have an expiry.
    pub fn with_expiry(&self) -> usize {
        self.side.expiry.len()
    }

    /// Total cost of all entries.
    pub fn bytes(&self) -> usize {
        self.side.bytes
    }

    /// Event counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Start or stop recording mutations (off while replaying the log).
    pub fn set_journal(&mut self, on: bool) {
        self.journal = on.then(Vec::new);
    }

    /// Zero the event counters (after replaying the log at start-up).
    pub fn reset_counters(&mut self) {
        self.counters = Counters::default();
    }

    /// Whether journalled mutations are waiting to be drained.
    pub fn journal_pending(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| !j.is_empty())
    }

    /// How many mutations the journal holds (0 when it is off): a mark for
    /// [`Store::group_journal_from`].
    pub fn journal_len(&self) -> usize {
        self.journal.as_ref().map_or(0, Vec::len)
    }

    /// Makes the mutations recorded since `mark` one [`Change::Group`] (when
    /// there are two or more). The caller has held the store since taking
    /// the mark, so they are all its own and nothing was drained meanwhile.
    pub fn group_journal_from(&mut self, mark: usize) {
        if let Some(j) = self.journal.as_mut() {
            if j.len() >= mark + 2 {
                let group = j.split_off(mark);
                j.push(Change::Group(group));
            }
        }
    }

    /// Drain the mutations recorded since the last call.
    pub fn take_journal(&mut self) -> Vec<Change> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The cost charged for an entry.
    pub fn cost_of(key: &Key, entry: &Entry) -> usize {
        key.len() + entry.value.len() + entry.owner.as_ref().map_or(0, |o| o.len()) + ENTRY_OVERHEAD
    }

    fn hash_of(&self, key: KeyRef<'_>) -> u64 {
        self.map.hasher().hash_one(key)
    }

    /// Remove `key` if present (live or not), journalling the removal.
    fn take(&mut self, key: KeyRef<'_>) -> Option<Entry> {
        let hash = self.hash_of(key);
        let RawEntryMut::Occupied(o) = self
            .map
            .raw_entry_mut()
            .from_hash(hash, |k| k.as_ref() == key)
        else {
            return None;
        };
        let (key, slot) = o.remove_entry();
        self.side.detach(key.as_ref(), &slot);
        record(&mut self.journal, || Change::Remove { key });
        Some(slot.entry)
    }

    /// Find a live entry in one probe. An entry whose expiry has passed is
    /// dropped (and counted as an expiration); with `refresh`, a live one
    /// becomes the most recently used.
    fn live(&mut self, key: KeyRef<'_>, now: u64, refresh: bool) -> Option<&mut Slot> {
        let hash = self.hash_of(key);
        match self
            .map
            .raw_entry_mut()
            .from_hash(hash, |k| k.as_ref() == key)
        {
            RawEntryMut::Vacant(_) => None,
            RawEntryMut::Occupied(o) if o.get().entry.is_expired(now) => {
                let (key, slot) = o.remove_entry();
                self.side.detach(key.as_ref(), &slot);
                self.counters.expirations += 1;
                record(&mut self.journal, || Change::Remove { key });
                None
            }
            RawEntryMut::Occupied(mut o) => {
                if refresh {
                    o.to_back();
                }
                Some(o.into_mut())
            }
        }
    }

    /// Look up an agent entry and prove it belongs to the request.
    pub fn get_agent(&mut self, md5: &[u8; 16], request: &Request<'_>, now: u64) -> AgentLookup {
        let found = self.live(KeyRef::Agent(*md5), now, true).map(|slot| {
            let owned = slot
                .entry
                .owner
                .as_ref()
                .is_some_and(|o| o.belongs_to(request));
            owned.then(|| slot.entry.value.clone())
        });
        match found {
            None => {
                self.counters.misses += 1;
                AgentLookup::Miss
            }
            Some(Some(value)) => {
                self.counters.hits += 1;
                AgentLookup::Hit(value)
            }
            Some(None) => {
                self.counters.misses += 1;
                self.counters.collisions += 1;
                AgentLookup::Collision
            }
        }
    }

    /// Look up any entry, counting a hit or miss and refreshing its recency.
    pub fn get<'k>(&mut self, key: impl Into<KeyRef<'k>>, now: u64) -> Option<&Entry> {
        let hit = self.live(key.into(), now, true).is_some();
        self.count_lookup(hit);
        // A refreshed entry is the most recently used one.
        self.map.back().filter(|_| hit).map(|(_, s)| &s.entry)
    }

    /// Look up a live entry and refresh its recency without counting (the
    /// caller counts once with [`Store::count_lookup`] after trying every
    /// spelling of a key).
    pub fn touch<'k>(&mut self, key: impl Into<KeyRef<'k>>, now: u64) -> Option<&Entry> {
        self.live(key.into(), now, true).map(|s| &s.entry)
    }

    /// Count one lookup as a hit or a miss.
    pub fn count_lookup(&mut self, hit: bool) {
        if hit {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
    }

    /// Look at an entry without counting or refreshing it (expired entries are
    /// reported as absent but left for the purge).
    pub fn peek<'k>(&self, key: impl Into<KeyRef<'k>>, now: u64) -> Option<&Entry> {
        let key = key.into();
        self.map
            .raw_entry()
            .from_hash(self.hash_of(key), |k| k.as_ref() == key)
            .map(|(_, s)| &s.entry)
            .filter(|e| !e.is_expired(now))
    }

    /// Whether a live entry exists (expired ones are dropped on the way).
    pub fn contains<'k>(&mut self, key: impl Into<KeyRef<'k>>, now: u64) -> bool {
        self.live(key.into(), now, false).is_some()
    }

    /// Insert or replace `key`, evicting least recently used entries to stay
    /// within the byte bound.
    pub fn insert(&mut self, key: Key, entry: Entry, now: u64) -> Result<(), StoreError> {
        let bound = self.limits.capacity_bytes;
        self.insert_inner(KeyRef::Plain(&[]), Some(key), entry, now, bound)
    }

    /// [`Store::insert`] for log replay: the byte bound is not enforced
    /// until twice the capacity, so that the entries the running cache
    /// evicted are the ones that go, by the `Remove` records that follow
    /// their evicting `Put` in the log (evicting here as well would take
    /// the replay's oldest entry, which need not be the one the running
    /// cache dropped: GETs reorder it, and are not logged). Twice: an
    /// unchanged capacity never needs more (an entry costs at most the
    /// capacity), a capacity lowered since is held to that during the
    /// replay. [`Store::enforce_bound`] ends the replay. The keys evicted
    /// here (the journal is off while replaying) are added to `evicted`,
    /// for the caller to log the ones still gone at the end.
    pub fn insert_replayed(
        &mut self,
        key: Key,
        entry: Entry,
        now: u64,
        evicted: &mut Vec<Key>,
    ) -> Result<(), StoreError> {
        self.insert_inner(KeyRef::Plain(&[]), Some(key), entry, now, usize::MAX)?;
        let bound = self.limits.capacity_bytes.saturating_mul(2);
        self.evict_to_with(bound, now, |k| evicted.push(k.clone()));
        Ok(())
    }

    /// Evicts least recently used entries until the byte bound holds again
    /// (after [`Store::insert_replayed`]).
    pub fn enforce_bound(&mut self, now: u64) {
        self.evict_to(self.limits.capacity_bytes, now);
    }

    /// [`Store::insert`] with a borrowed key: the key is copied only if it is
    /// new (or journalled or indexed), not when an entry is replaced.
    pub fn insert_ref(
        &mut self,
        key: KeyRef<'_>,
        entry: Entry,
        now: u64,
    ) -> Result<(), StoreError> {
        let bound = self.limits.capacity_bytes;
        self.insert_inner(key, None, entry, now, bound)
    }

    /// Insert under `owned` if given, else under `key`, then evict down to
    /// `bound` bytes.
    fn insert_inner(
        &mut self,
        key: KeyRef<'_>,
        owned: Option<Key>,
        entry: Entry,
        now: u64,
        bound: usize,
    ) -> Result<(), StoreError> {
        let key = owned.as_ref().map_or(key, Key::as_ref);
        if entry.value.len() > self.limits.max_value_bytes {
            return Err(StoreError::ValueTooLarge {
                size: entry.value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        let key_len = match key {
            KeyRef::Agent(k) => k.len(),
            KeyRef::Plain(k) => k.len(),
        };
        let cost = key_len
            + entry.value.len()
            + entry.owner.as_ref().map_or(0, |o| o.len())
            + ENTRY_OVERHEAD;
        if cost > self.limits.capacity_bytes {
            return Err(StoreError::EntryTooLarge {
                cost,
                capacity: self.limits.capacity_bytes,
            });
        }
        let hash = self.hash_of(key);
        match self
            .map
            .raw_entry_mut()
            .from_hash(hash, |k| k.as_ref() == key)
        {
            RawEntryMut::Occupied(mut o) => {
                // Replaced in place: the key stays, the node moves to the back.
                o.to_back();
                record(&mut self.journal, || Change::Put {
                    key: o.key().clone(),
                    entry: entry.clone(),
                });
                let old = o.replace_value(Slot { entry, cost });
                self.side.detach(key, &old);
                self.side.attach(key, &o.get().entry, cost);
            }
            RawEntryMut::Vacant(v) => {
                let owned = match owned {
                    Some(k) => k,
                    None => key.to_owned(),
                };
                record(&mut self.journal, || Change::Put {
                    key: owned.clone(),
                    entry: entry.clone(),
                });
                self.side.attach(owned.as_ref(), &entry, cost);
                v.insert_hashed_nocheck(hash, owned, Slot { entry, cost });
            }
        }
        self.evict_to(bound, now);
        Ok(())
    }

    fn evict_to(&mut self, bound: usize, now: u64) {
        self.evict_to_with(bound, now, |_| {});
    }

    /// [`Store::evict_to`], telling `evicted` each key it drops.
    fn evict_to_with(&mut self, bound: usize, now: u64, mut evicted: impl FnMut(&Key)) {
        while self.side.bytes > bound {
            let Some((key, slot)) = self.map.pop_front() else {
                break;
            };
            self.side.detach(key.as_ref(), &slot);
            if slot.entry.is_expired(now) {
                self.counters.expirations += 1;
            } else {
                self.counters.evictions += 1;
            }
            evicted(&key);
            record(&mut self.journal, || Change::Remove { key });
        }
    }

    /// Delete `key`; returns whether a live entry was there.
    pub fn remove<'k>(&mut self, key: impl Into<KeyRef<'k>>, now: u64) -> bool {
        let key = key.into();
        if self.live(key, now, false).is_none() {
            return false;
        }
        self.take(key).is_some()
    }

    /// Delete `key` whether or not it has expired, counting nothing (log
    /// replay); returns whether it was there.
    pub fn discard<'k>(&mut self, key: impl Into<KeyRef<'k>>) -> bool {
        self.take(key.into()).is_some()
    }

    /// Delete every entry of `agent`; returns how many live ones went.
    pub fn remove_agent(&mut self, agent: &[u8], now: u64) -> usize {
        let Some(keys) = self.side.by_agent.get(agent) else {
            return 0;
        };
        let keys: Vec<[u8; 16]> = keys.iter().copied().collect();
        keys.iter()
            .filter(|md5| self.remove(KeyRef::Agent(**md5), now))
            .count()
    }

    /// Drop every entry whose expiry is at or before `now`; returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let mut n = 0;
        while let Some((at, key)) = self.side.expiry.first().cloned() {
            if at > now {
                break;
            }
            if self.take(key.as_ref()).is_none() {
                // Unreachable while the invariants hold; never loop on it.
                self.side.expiry.remove(&(at, key));
                continue;
            }
            self.counters.expirations += 1;
            n += 1;
        }
        n
    }

    /// Set or clear the expiry of a live entry; returns whether it exists.
    /// An expiry at or before `now` deletes the entry (as Redis does).
    pub fn set_expiry<'k>(
        &mut self,
        key: impl Into<KeyRef<'k>>,
        expires_at: Option<u64>,
        now: u64,
    ) -> bool {
        let key = key.into();
        let Some(slot) = self.live(key, now, false) else {
            return false;
        };
        if expires_at.is_some_and(|at| at <= now) {
            self.take(key);
            self.counters.expirations += 1;
            return true;
        }
        let old = slot.entry.expires_at;
        slot.entry.expires_at = expires_at;
        let entry = slot.entry.clone();
        if let Some(at) = old {
            self.side.expiry.remove(&(at, key.to_owned()));
        }
        if let Some(at) = expires_at {
            self.side.expiry.insert((at, key.to_owned()));
        }
        record(&mut self.journal, || Change::Put {
            key: key.to_owned(),
            entry,
        });
        true
    }

    /// Remaining lifetime of a live entry: `None` if absent, `Some(None)` if
    /// it never expires, `Some(Some(ms))` otherwise.
    pub fn ttl_ms<'k>(&mut self, key: impl Into<KeyRef<'k>>, now: u64) -> Option<Option<u64>> {
        let slot = self.live(key.into(), now, false)?;
        Some(slot.entry.expires_at.map(|at| at.saturating_sub(now)))
    }

    /// Entries from least to most recently used (expired ones included).
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.map.iter().map(|(k, s)| (k, &s.entry))
    }

    /// Drop everything (journalled as removals).
    pub fn clear(&mut self) {
        while let Some((key, slot)) = self.map.pop_front() {
            self.side.detach(key.as_ref(), &slot);
            record(&mut self.journal, || Change::Remove { key });
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let sum: usize = self.map.values().map(|s| s.cost).sum();
        assert_eq!(sum, self.side.bytes, "byte count");
        assert!(self.side.bytes <= self.limits.capacity_bytes, "byte bound");
        let with_expiry = self
            .map
            .values()
            .filter(|s| s.entry.expires_at.is_some())
            .count();
        assert_eq!(with_expiry, self.side.expiry.len(), "expiry index size");
        for (at, key) in &self.side.expiry {
            let slot = self.map.get(key).expect("indexed key present");
            assert_eq!(slot.entry.expires_at, Some(*at));
        }
        let agent_entries = self
            .map
            .iter()
            .filter(|(k, _)| matches!(k, Key::Agent(_)))
            .count();
        let indexed: usize = self.side.by_agent.values().map(HashSet::len).sum();
        assert_eq!(agent_entries, indexed, "agent index size");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(k: &str) -> Key {
        Key::Plain(k.as_bytes().into())
    }

    fn val(n: usize) -> Entry {
        Entry {
            value: Bytes::from(vec![b'v'; n]),
            expires_at: None,
            owner: None,
        }
    }

    fn owner(agent: &str, prompt: &str) -> AgentOwner {
        let r = crate::Request::new(agent.as_bytes(), prompt.as_bytes(), b"");
        AgentOwner::new(r.agent, r.prompt, r.variant, r.sha256())
    }

    #[test]
    fn an_owner_belongs_only_to_its_exact_request() {
        let o = owner("ab", "c");
        assert_eq!(
            (o.agent(), o.prompt(), o.variant()),
            (&b"ab"[..], &b"c"[..], &b""[..])
        );
        assert_eq!(o.sha256(), Request::new(b"ab", b"c", b"").sha256());
        let v = AgentOwner::new(b"", b"p", b"variant", [9; 32]);
        assert_eq!(
            (v.agent(), v.prompt(), v.variant()),
            (&b""[..], &b"p"[..], &b"variant"[..])
        );
        assert_eq!((v.sha256(), v.len()), ([9; 32], 8 + 32));
        assert!(o.belongs_to(&Request::new(b"ab", b"c", b"")));
        // Same concatenation, other split; another variant; a prefix.
        assert!(!o.belongs_to(&Request::new(b"a", b"bc", b"")));
        assert!(!o.belongs_to(&Request::new(b"ab", b"c", b"v")));
        assert!(!o.belongs_to(&Request::new(b"ab", b"", b"")));
        // Exactly when the SHA-256 of the encodings match.
        for r in [
            Request::new(b"ab", b"c", b""),
            Request::new(b"a", b"bc", b""),
            Request::new(b"ab", b"c", b"v"),
        ] {
            assert_eq!(o.belongs_to(&r), o.sha256() == r.sha256());
        }
    }

    /// Capacity for exactly `n` plain entries of a 1-byte key and `v`-byte value.
    fn limits_for(n: usize, v: usize) -> StoreLimits {
        StoreLimits {
            capacity_bytes: n * (1 + v + ENTRY_OVERHEAD),
            max_value_bytes: 1 << 20,
        }
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut s = Store::new(limits_for(3, 10), true);
        for k in ["a", "b", "c"] {
            s.insert(plain(k), val(10), 0).unwrap();
        }
        assert!(s.get(&plain("a"), 0).is_some()); // a is now most recent
        s.insert(plain("d"), val(10), 0).unwrap();
        assert!(s.peek(&plain("b"), 0).is_none(), "b was least recent");
        assert!(s.peek(&plain("a"), 0).is_some());
        s.insert(plain("e"), val(10), 0).unwrap();
        assert!(s.peek(&plain("c"), 0).is_none(), "c next");
        let order: Vec<_> = s.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(order, vec![plain("a"), plain("d"), plain("e")]);
        assert_eq!(s.counters().evictions, 2);
        s.check_invariants();
        let removed: Vec<_> = s
            .take_journal()
            .into_iter()
            .filter_map(|c| match c {
                Change::Remove { key } => Some(key),
                Change::Put { .. } | Change::Group(_) => None,
            })
            .collect();
        assert_eq!(removed, vec![plain("b"), plain("c")]);
    }

    #[test]
    fn byte_bound_holds_with_mixed_sizes() {
        let limits = StoreLimits {
            capacity_bytes: 10_000,
            max_value_bytes: 5_000,
        };
        let mut s = Store::new(limits, false);
        for i in 0..200usize {
            let k = plain(&format!("k{i}"));
            s.insert(k, val((i * 37) % 4_000), 0).unwrap();
            assert!(s.bytes() <= 10_000);
            s.check_invariants();
        }
        // One big value pushes out many small ones.
        s.insert(plain("big"), val(4_999), 0).unwrap();
        assert!(s.peek(&plain("big"), 0).is_some());
        s.check_invariants();
    }

    #[test]
    fn oversized_values_are_refused() {
        let limits = StoreLimits {
            capacity_bytes: 1_000,
            max_value_bytes: 2_000,
        };
        let mut s = Store::new(limits, false);
        assert_eq!(
            s.insert(plain("a"), val(2_001), 0),
            Err(StoreError::ValueTooLarge {
                size: 2_001,
                max: 2_000
            })
        );
        let err = s.insert(plain("a"), val(1_000), 0).unwrap_err();
        assert!(matches!(
            err,
            StoreError::EntryTooLarge {
                capacity: 1_000,
                ..
            }
        ));
        assert!(s.is_empty());
        s.check_invariants();
    }

    #[test]
    fn ttl_expiry_is_lazy_and_purged() {
        let mut s = Store::new(limits_for(10, 1), true);
        let mut e = val(1);
        e.expires_at = Some(1_000);
        s.insert(plain("a"), e.clone(), 0).unwrap();
        s.insert(plain("b"), e, 0).unwrap();
        s.insert(plain("c"), val(1), 0).unwrap();
        assert!(s.get(&plain("a"), 999).is_some());
        assert_eq!(s.ttl_ms(&plain("a"), 400), Some(Some(600)));
        assert_eq!(s.ttl_ms(&plain("c"), 400), Some(None));
        // At the expiry instant the entry is gone.
        assert!(s.get(&plain("a"), 1_000).is_none());
        assert_eq!(s.counters().expirations, 1);
        assert_eq!(s.counters().misses, 1);
        assert_eq!(s.purge_expired(1_000), 1); // b
        assert_eq!(s.counters().expirations, 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.ttl_ms(&plain("a"), 1_000), None);
        s.check_invariants();
    }

    #[test]
    fn set_expiry_moves_and_clears_deadlines() {
        let mut s = Store::new(limits_for(10, 1), false);
        s.insert(plain("a"), val(1), 0).unwrap();
        assert!(s.set_expiry(&plain("a"), Some(50), 0));
        s.check_invariants();
        assert!(s.set_expiry(&plain("a"), Some(500), 10));
        assert_eq!(s.purge_expired(100), 0);
        assert!(s.set_expiry(&plain("a"), None, 100));
        assert_eq!(s.purge_expired(10_000), 0);
        assert!(
            s.set_expiry(&plain("a"), Some(5), 10),
            "past expiry deletes"
        );
        assert!(!s.contains(&plain("a"), 10));
        assert!(!s.set_expiry(&plain("missing"), None, 0));
        s.check_invariants();
    }

    #[test]
    fn agent_entries_prove_ownership_and_flush_by_agent() {
        let mut s = Store::new(limits_for(100, 100), false);
        let o1 = owner("a1", "p1");
        let o2 = owner("a1", "p2");
        let o3 = owner("a2", "p1");
        for (i, o) in (0u8..).zip([&o1, &o2, &o3]) {
            let entry = Entry {
                value: Bytes::from(format!("r{i}")),
                expires_at: None,
                owner: Some(o.clone()),
            };
            s.insert(Key::Agent([i; 16]), entry, 0).unwrap();
        }
        let r1 = Request::new(o1.agent(), o1.prompt(), o1.variant());
        let r2 = Request::new(o2.agent(), o2.prompt(), o2.variant());
        assert_eq!(
            s.get_agent(&[0; 16], &r1, 0),
            AgentLookup::Hit(Bytes::from("r0"))
        );
        assert_eq!(s.get_agent(&[0; 16], &r2, 0), AgentLookup::Collision);
        assert_eq!(s.get_agent(&[9; 16], &r2, 0), AgentLookup::Miss);
        let c = s.counters();
        assert_eq!((c.hits, c.misses, c.collisions), (1, 2, 1));
        assert_eq!(s.remove_agent(b"a1", 0), 2);
        assert_eq!(s.remove_agent(b"a1", 0), 0);
        assert_eq!(s.len(), 1);
        s.check_invariants();
    }

    #[test]
    fn replacing_in_place_keeps_indexes_journal_and_order() {
        let mut s = Store::new(limits_for(3, 10), true);
        for k in ["a", "b", "c"] {
            s.insert(plain(k), val(10), 0).unwrap();
        }
        s.take_journal();
        // Replace "a" with a TTL through a borrowed key: it becomes the most
        // recent entry, the expiry index follows, and the journal has the put.
        let mut e = val(10);
        e.expires_at = Some(50);
        s.insert_ref(KeyRef::Plain(b"a"), e.clone(), 0).unwrap();
        let order: Vec<_> = s.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(order, vec![plain("b"), plain("c"), plain("a")]);
        assert_eq!(s.with_expiry(), 1);
        s.check_invariants();
        assert_eq!(
            s.take_journal(),
            vec![Change::Put {
                key: plain("a"),
                entry: e.clone()
            }]
        );
        // Same expiry instant again, then none: the index never holds a stale pair.
        s.insert_ref(KeyRef::Plain(b"a"), e, 0).unwrap();
        s.check_invariants();
        s.insert_ref(KeyRef::Plain(b"a"), val(10), 0).unwrap();
        assert_eq!(s.with_expiry(), 0);
        s.check_invariants();
        // A new key through a borrowed key evicts the least recent ("b").
        s.insert_ref(KeyRef::Plain(b"d"), val(10), 0).unwrap();
        assert!(s.peek(KeyRef::Plain(b"b"), 0).is_none());
        assert_eq!(s.counters().evictions, 1);
        s.check_invariants();
    }

    /// A straightforward model of the store: a list in LRU order.
    #[derive(Default)]
    struct Model {
        items: Vec<(u8, usize, Option<u64>)>,
        evictions: u64,
        expirations: u64,
    }

    impl Model {
        const CAP: usize = 6 * (1 + 16 + ENTRY_OVERHEAD);

        fn cost(v: usize) -> usize {
            1 + v + ENTRY_OVERHEAD
        }

        fn pos(&self, k: u8) -> Option<usize> {
            self.items.iter().position(|i| i.0 == k)
        }

        /// Drop `k` if it has expired; its position if it is live.
        fn live(&mut self, k: u8, now: u64) -> Option<usize> {
            let i = self.pos(k)?;
            if self.items[i].2.is_some_and(|at| at <= now) {
                self.items.remove(i);
                self.expirations += 1;
                return None;
            }
            Some(i)
        }

        fn insert(&mut self, k: u8, v: usize, at: Option<u64>, now: u64) {
            if let Some(i) = self.pos(k) {
                self.items.remove(i);
            }
            self.items.push((k, v, at));
            while self.items.iter().map(|i| Self::cost(i.1)).sum::<usize>() > Self::CAP {
                let (_, _, at) = self.items.remove(0);
                if at.is_some_and(|at| at <= now) {
                    self.expirations += 1;
                } else {
                    self.evictions += 1;
                }
            }
        }
    }

    #[test]
    fn matches_a_simple_lru_model() {
        let limits = StoreLimits {
            capacity_bytes: Model::CAP,
            max_value_bytes: 40,
        };
        let mut s = Store::new(limits, true);
        let mut m = Model::default();
        let mut now = 0u64;
        // A fixed pseudo-random sequence (64-bit LCG), so failures repeat.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (x >> 33) % n
        };
        for step in 0..20_000 {
            let k = u8::try_from(next(10)).unwrap();
            let key = Key::Plain(vec![k].into());
            match next(8) {
                0..=2 => {
                    let v = usize::try_from(next(30)).unwrap();
                    let at = (next(3) == 0).then(|| now + 1 + next(20));
                    let entry = Entry {
                        value: Bytes::from(vec![k; v]),
                        expires_at: at,
                        owner: None,
                    };
                    if next(2) == 0 {
                        s.insert(key, entry, now).unwrap();
                    } else {
                        s.insert_ref(KeyRef::Plain(&[k]), entry, now).unwrap();
                    }
                    m.insert(k, v, at, now);
                }
                3 | 4 => {
                    let got = s.get(&key, now).map(|e| e.value.len());
                    let want = m.live(k, now).map(|i| {
                        let item = m.items.remove(i);
                        m.items.push(item);
                        item.1
                    });
                    assert_eq!(got, want, "get at step {step}");
                }
                5 => {
                    let want = m.live(k, now).map(|i| m.items.remove(i)).is_some();
                    assert_eq!(s.remove(&key, now), want, "remove at step {step}");
                }
                6 => {
                    let at = (next(2) == 0).then(|| now + next(10));
                    let found = s.set_expiry(&key, at, now);
                    let want = match m.live(k, now) {
                        None => false,
                        Some(i) if at.is_some_and(|at| at <= now) => {
                            m.items.remove(i);
                            m.expirations += 1;
                            true
                        }
                        Some(i) => {
                            m.items[i].2 = at;
                            true
                        }
                    };
                    assert_eq!(found, want, "set_expiry at step {step}");
                }
                _ => {
                    if next(4) == 0 {
                        let before = m.items.len();
                        m.items.retain(|i| i.2.is_none_or(|at| at > now));
                        let purged = before - m.items.len();
                        m.expirations += purged as u64;
                        assert_eq!(s.purge_expired(now), purged, "purge at step {step}");
                    }
                    now += next(4);
                }
            }
            let order: Vec<u8> = s
                .iter()
                .map(|(k, _)| match k {
                    Key::Plain(b) => b[0],
                    Key::Agent(_) => unreachable!(),
                })
                .collect();
            let want: Vec<u8> = m.items.iter().map(|i| i.0).collect();
            assert_eq!(order, want, "LRU order at step {step}");
            let c = s.counters();
            assert_eq!((c.evictions, c.expirations), (m.evictions, m.expirations));
            if step % 100 == 0 {
                s.check_invariants();
                s.take_journal();
            }
        }
        s.check_invariants();
        assert!(
            m.evictions > 100 && m.expirations > 100,
            "the sequence exercises both"
        );
    }

    #[test]
    fn eviction_of_an_expired_entry_counts_as_expiration() {
        let mut s = Store::new(limits_for(1, 1), false);
        let mut e = val(1);
        e.expires_at = Some(5);
        s.insert(plain("a"), e, 0).unwrap();
        s.insert(plain("b"), val(1), 10).unwrap();
        let c = s.counters();
        assert_eq!((c.evictions, c.expirations), (0, 1));
    }
}
