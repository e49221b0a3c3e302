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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use hashlink::LinkedHashMap;

/// Bookkeeping charged per entry on top of its key and value bytes: the hash
/// table slot and LRU links (~48 B), the expiry-index node (~40 B) and the
/// entry header. A round, slightly generous figure, so the configured byte
/// bound is a bound on real memory, not only on payload.
pub const ENTRY_OVERHEAD: usize = 128;

/// Where an entry lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
}

/// The request an agent entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOwner {
    /// Agent id.
    pub agent: Box<[u8]>,
    /// Prompt.
    pub prompt: Box<[u8]>,
    /// Variant (possibly empty).
    pub variant: Box<[u8]>,
    /// SHA-256 of the request encoding; compared on every hit.
    pub sha256: [u8; 32],
}

impl AgentOwner {
    fn len(&self) -> usize {
        self.agent.len() + self.prompt.len() + self.variant.len() + self.sha256.len()
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
    pub owner: Option<Arc<AgentOwner>>,
}

impl Entry {
    fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
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

/// The memory tier. See the module docs.
#[derive(Debug)]
pub struct Store {
    map: LinkedHashMap<Key, Slot>,
    expiry: BTreeSet<(u64, Key)>,
    by_agent: HashMap<Box<[u8]>, HashSet<[u8; 16]>>,
    bytes: usize,
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
            expiry: BTreeSet::new(),
            by_agent: HashMap::new(),
            bytes: 0,
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
        self.expiry.len()
    }

    /// Total cost of all entries.
    pub fn bytes(&self) -> usize {
        self.bytes
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

    fn record(&mut self, change: Change) {
        if let Some(j) = self.journal.as_mut() {
            j.push(change);
        }
    }

    /// Undo the side indexes and byte count of an entry already taken out of `map`.
    fn detach(&mut self, key: &Key, slot: &Slot) {
        self.bytes -= slot.cost;
        if let Some(at) = slot.entry.expires_at {
            self.expiry.remove(&(at, key.clone()));
        }
        if let (Key::Agent(md5), Some(owner)) = (key, slot.entry.owner.as_ref()) {
            if let Some(set) = self.by_agent.get_mut(&owner.agent) {
                set.remove(md5);
                if set.is_empty() {
                    self.by_agent.remove(&owner.agent);
                }
            }
        }
    }

    fn attach(&mut self, key: &Key, slot: &Slot) {
        self.bytes += slot.cost;
        if let Some(at) = slot.entry.expires_at {
            self.expiry.insert((at, key.clone()));
        }
        if let (Key::Agent(md5), Some(owner)) = (key, slot.entry.owner.as_ref()) {
            self.by_agent
                .entry(owner.agent.clone())
                .or_default()
                .insert(*md5);
        }
    }

    /// Remove `key` if present, journalling the removal.
    fn take(&mut self, key: &Key) -> Option<Entry> {
        let slot = self.map.remove(key)?;
        self.detach(key, &slot);
        self.record(Change::Remove { key: key.clone() });
        Some(slot.entry)
    }

    /// Drop `key` if it has expired; returns whether a live entry remains.
    fn ensure_live(&mut self, key: &Key, now: u64) -> bool {
        match self.map.get(key) {
            None => false,
            Some(slot) if slot.entry.is_expired(now) => {
                self.take(key);
                self.counters.expirations += 1;
                false
            }
            Some(_) => true,
        }
    }

    /// Look up an agent entry and prove it belongs to the request.
    pub fn get_agent(&mut self, md5: &[u8; 16], sha256: &[u8; 32], now: u64) -> AgentLookup {
        let key = Key::Agent(*md5);
        if !self.ensure_live(&key, now) {
            self.counters.misses += 1;
            return AgentLookup::Miss;
        }
        let Some(slot) = self.map.to_back(&key) else {
            self.counters.misses += 1;
            return AgentLookup::Miss;
        };
        let owned = slot
            .entry
            .owner
            .as_ref()
            .is_some_and(|o| &o.sha256 == sha256);
        if owned {
            let value = slot.entry.value.clone();
            self.counters.hits += 1;
            AgentLookup::Hit(value)
        } else {
            self.counters.misses += 1;
            self.counters.collisions += 1;
            AgentLookup::Collision
        }
    }

    /// Look up any entry, counting a hit or miss and refreshing its recency.
    pub fn get(&mut self, key: &Key, now: u64) -> Option<&Entry> {
        if !self.ensure_live(key, now) {
            self.counters.misses += 1;
            return None;
        }
        self.counters.hits += 1;
        self.map.to_back(key).map(|s| &s.entry)
    }

    /// Look up a live entry and refresh its recency without counting (the
    /// caller counts once with [`Store::count_lookup`] after trying every
    /// spelling of a key).
    pub fn touch(&mut self, key: &Key, now: u64) -> Option<&Entry> {
        if !self.ensure_live(key, now) {
            return None;
        }
        self.map.to_back(key).map(|s| &s.entry)
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
    pub fn peek(&self, key: &Key, now: u64) -> Option<&Entry> {
        self.map
            .get(key)
            .map(|s| &s.entry)
            .filter(|e| !e.is_expired(now))
    }

    /// Whether a live entry exists (expired ones are dropped on the way).
    pub fn contains(&mut self, key: &Key, now: u64) -> bool {
        self.ensure_live(key, now)
    }

    /// Insert or replace `key`, evicting least recently used entries to stay
    /// within the byte bound.
    pub fn insert(&mut self, key: Key, entry: Entry, now: u64) -> Result<(), StoreError> {
        if entry.value.len() > self.limits.max_value_bytes {
            return Err(StoreError::ValueTooLarge {
                size: entry.value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        let cost = Self::cost_of(&key, &entry);
        if cost > self.limits.capacity_bytes {
            return Err(StoreError::EntryTooLarge {
                cost,
                capacity: self.limits.capacity_bytes,
            });
        }
        if let Some(old) = self.map.remove(&key) {
            self.detach(&key, &old);
        }
        self.record(Change::Put {
            key: key.clone(),
            entry: entry.clone(),
        });
        let slot = Slot { entry, cost };
        self.attach(&key, &slot);
        self.map.insert(key, slot);
        self.evict_to_bound(now);
        Ok(())
    }

    fn evict_to_bound(&mut self, now: u64) {
        while self.bytes > self.limits.capacity_bytes {
            let Some((key, slot)) = self.map.pop_front() else {
                break;
            };
            self.detach(&key, &slot);
            if slot.entry.is_expired(now) {
                self.counters.expirations += 1;
            } else {
                self.counters.evictions += 1;
            }
            self.record(Change::Remove { key });
        }
    }

    /// Delete `key`; returns whether a live entry was there.
    pub fn remove(&mut self, key: &Key, now: u64) -> bool {
        if !self.ensure_live(key, now) {
            return false;
        }
        self.take(key).is_some()
    }

    /// Delete `key` whether or not it has expired, counting nothing (log
    /// replay); returns whether it was there.
    pub fn discard(&mut self, key: &Key) -> bool {
        self.take(key).is_some()
    }

    /// Delete every entry of `agent`; returns how many live ones went.
    pub fn remove_agent(&mut self, agent: &[u8], now: u64) -> usize {
        let Some(keys) = self.by_agent.get(agent) else {
            return 0;
        };
        let keys: Vec<[u8; 16]> = keys.iter().copied().collect();
        keys.iter()
            .filter(|md5| self.remove(&Key::Agent(**md5), now))
            .count()
    }

    /// Drop every entry whose expiry is at or before `now`; returns how many.
    pub fn purge_expired(&mut self, now: u64) -> usize {
        let mut n = 0;
        while let Some((at, key)) = self.expiry.first().cloned() {
            if at > now {
                break;
            }
            if self.take(&key).is_none() {
                // Unreachable while the invariants hold; never loop on it.
                self.expiry.remove(&(at, key));
                continue;
            }
            self.counters.expirations += 1;
            n += 1;
        }
        n
    }

    /// Set or clear the expiry of a live entry; returns whether it exists.
    /// An expiry at or before `now` deletes the entry (as Redis does).
    pub fn set_expiry(&mut self, key: &Key, expires_at: Option<u64>, now: u64) -> bool {
        if !self.ensure_live(key, now) {
            return false;
        }
        if expires_at.is_some_and(|at| at <= now) {
            self.take(key);
            self.counters.expirations += 1;
            return true;
        }
        let Some(slot) = self.map.get_mut(key) else {
            return false;
        };
        let old = slot.entry.expires_at;
        slot.entry.expires_at = expires_at;
        let entry = slot.entry.clone();
        if let Some(at) = old {
            self.expiry.remove(&(at, key.clone()));
        }
        if let Some(at) = expires_at {
            self.expiry.insert((at, key.clone()));
        }
        self.record(Change::Put {
            key: key.clone(),
            entry,
        });
        true
    }

    /// Remaining lifetime of a live entry: `None` if absent, `Some(None)` if
    /// it never expires, `Some(Some(ms))` otherwise.
    pub fn ttl_ms(&mut self, key: &Key, now: u64) -> Option<Option<u64>> {
        if !self.ensure_live(key, now) {
            return None;
        }
        let slot = self.map.get(key)?;
        Some(slot.entry.expires_at.map(|at| at.saturating_sub(now)))
    }

    /// Entries from least to most recently used (expired ones included).
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.map.iter().map(|(k, s)| (k, &s.entry))
    }

    /// Drop everything (journalled as removals).
    pub fn clear(&mut self) {
        let keys: Vec<Key> = self.map.keys().cloned().collect();
        for key in keys {
            self.take(&key);
        }
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let sum: usize = self.map.values().map(|s| s.cost).sum();
        assert_eq!(sum, self.bytes, "byte count");
        assert!(self.bytes <= self.limits.capacity_bytes, "byte bound");
        let with_expiry = self
            .map
            .values()
            .filter(|s| s.entry.expires_at.is_some())
            .count();
        assert_eq!(with_expiry, self.expiry.len(), "expiry index size");
        for (at, key) in &self.expiry {
            let slot = self.map.get(key).expect("indexed key present");
            assert_eq!(slot.entry.expires_at, Some(*at));
        }
        let agent_entries = self
            .map
            .iter()
            .filter(|(k, _)| matches!(k, Key::Agent(_)))
            .count();
        let indexed: usize = self.by_agent.values().map(HashSet::len).sum();
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

    fn owner(agent: &str, prompt: &str) -> Arc<AgentOwner> {
        let r = crate::Request::new(agent.as_bytes(), prompt.as_bytes(), b"");
        Arc::new(AgentOwner {
            agent: r.agent.into(),
            prompt: r.prompt.into(),
            variant: r.variant.into(),
            sha256: r.sha256(),
        })
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
                Change::Put { .. } => None,
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
        assert_eq!(
            s.get_agent(&[0; 16], &o1.sha256, 0),
            AgentLookup::Hit(Bytes::from("r0"))
        );
        assert_eq!(s.get_agent(&[0; 16], &o2.sha256, 0), AgentLookup::Collision);
        assert_eq!(s.get_agent(&[9; 16], &o2.sha256, 0), AgentLookup::Miss);
        let c = s.counters();
        assert_eq!((c.hits, c.misses, c.collisions), (1, 2, 1));
        assert_eq!(s.remove_agent(b"a1", 0), 2);
        assert_eq!(s.remove_agent(b"a1", 0), 0);
        assert_eq!(s.len(), 1);
        s.check_invariants();
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
