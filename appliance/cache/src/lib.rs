//! # appliance-cache: the agent response cache
//!
//! AI agents on the appliance ask the same questions again and again. This
//! crate answers repeats from memory in microseconds, never returns an answer
//! that belongs to a different question, stays within a byte bound, and
//! speaks the Redis protocol so Python and Go services can use it unchanged.
//!
//! ## Layers
//! - [`key`]: the request encoding and its digests (pure functions).
//! - [`store`]: the memory tier, a byte-bounded LRU with per-entry expiry;
//!   sans-IO, the current time is an argument.
//! - [`Cache`]: the thread-safe in-process API over a `Store` (one mutex; every
//!   critical section is a hash lookup or an insert plus evictions).
//! - [`persist`]: every mutation as a postcard record in an
//!   `appliance-record-log`; replay on open with a [`LoadReport`]; group
//!   commit under `fsync: always`; background compaction.
//! - [`json`]: import/export in the earlier JSON cache's format.
//! - [`resp`]: the sans-IO RESP2/RESP3 codec with hard limits.
//! - [`commands`]: one frame in, one reply out (GET/SET/…/AGENT.*).
//! - [`server`]: the thin tokio adapter (`serve`, `serve_unix`,
//!   `maintenance_loop`).
//! - `appliance-cache-server` (binary): a stand-alone endpoint for benchmarks,
//!   the kill -9 test and redis-cli; the appliance serves from `applianced`.
//!
//! ## Using it from the daemon
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use appliance_cache::{Cache, CacheConfig, PersistConfig, ServerConfig};
//! let (cache, report) = Cache::open(CacheConfig::default(), PersistConfig::new("/var/lib/appliance/cache"))?;
//! let cache = Arc::new(cache);
//! cache.put(b"agent-1", b"What is RAID-Z2?", b"", "Two-disk parity.", None)?;
//! assert!(cache.get(b"agent-1", b"What is RAID-Z2?", b"").is_some());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:6379").await?;
//! appliance_cache::serve(listener, cache.clone(), ServerConfig::default(), std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! ## Key encoding (format version 1)
//! A request is three byte strings: the agent id `A`, the prompt `P` and the
//! variant `V` (model name and parameters; empty by default). Its encoding is
//!
//! ```text
//! A ‖ P ‖ V ‖ LE64(|A|) ‖ LE64(|P|) ‖ LE64(|V|) ‖ 0x01
//! ```
//!
//! where `LE64` is an unsigned 64-bit little-endian length and `0x01` is the
//! format version. The cache key is `MD5(encoding)` (shown as 32 lower-case hex
//! digits by `GET <md5 hex>` and in the JSON files); the entry also stores
//! the request itself (agent, prompt, variant) and `SHA-256(encoding)`, and a
//! hit is only a hit if the stored request equals the asked one byte for
//! byte (the encoding is injective, so this is the same test as comparing
//! the SHA-256, without hashing on every lookup). A mismatch is reported as
//! a miss and counted as a `collision`.
//!
//! Example: `("agent-1", "What is RAID-Z2?", "")` encodes as the 23 bytes of
//! the two strings, then `07 00.. 10 00.. 00 00.. 01`, and has MD5
//! `cdfc3ae134a69f68c67e780d84b23ede` (more vectors in the `key` tests).
//!
//! **Why the lengths come last.** The encoding is injective: the final 25 bytes
//! have a fixed size, so a reader takes them off the end, reads the three
//! lengths, and splits the front at those lengths; `("ab","c")` and
//! `("a","bc")` differ in their trailers. A length *prefix* would be just as
//! unambiguous, but it would make collision handling untestable with
//! published data: known MD5 collision pairs (Wang et al. 2004; Stevens'
//! identical-prefix pairs) are two equal-length messages that collide only
//! when hashing starts from MD5's standard initial state at their first byte.
//! With the agent id first, such a pair used as agent id starts at offset 0;
//! both encodings then continue with identical bytes (same prompt, variant and
//! trailer, since the lengths are equal), and by MD5's Merkle–Damgård
//! structure identical suffixes keep the collision. The test
//! `collision_pair_is_a_miss_and_counted` does exactly this with the
//! Wang et al. pair and checks first that the pair really collides.
//! (With an empty agent id, a pair used as the prompt collides the same way.)
//!
//! ## Memory tier
//! A hand-written LRU on `hashlink::LinkedHashMap` (a maintained linked hash
//! map) plus a `BTreeSet` expiry index. moka and quick_cache were considered:
//! moka's TinyLFU admission and its asynchronous maintenance make eviction
//! order nondeterministic, and its clock cannot be injected through its public
//! API; quick_cache has no per-entry TTL. The tests here need exact eviction
//! order and TTL expiry on a [`ManualClock`], and the persistence layer needs
//! every eviction and expiry reported in order, so the policy is our own code
//! (about 300 lines) and the data structure is the crate's.
//!
//! Cost per operation: a lookup hashes a borrowed [`KeyRef`] and probes the
//! map once (hashlink's raw entry API), which both checks expiry and relinks
//! the entry; a `SET` of an existing key replaces the value in place; a key
//! is copied only when it is new. `store::tests::matches_a_simple_lru_model`
//! checks order, eviction and expiry against a plain list.
//!
//! Invariants: the charged bytes (key + value + owner request + SHA-256 +
//! [`store::ENTRY_OVERHEAD`]) never exceed `capacity_bytes` after an operation;
//! an entry whose expiry instant has been reached is never returned. Expired
//! entries are dropped lazily on access, by [`Cache::purge_expired`], or by
//! the eviction scan, and counted once as an expiration.
//!
//! Expiry instants are absolute Unix milliseconds from a [`Clock`] so that
//! they mean the same after a restart.
//!
//! ## TTL policy
//! An agent put with an explicit TTL uses it; otherwise the agent's entry in
//! [`CacheConfig::agent_ttl`], otherwise [`CacheConfig::default_agent_ttl`].
//! Plain `SET` keys follow Redis: no expiry unless `EX`/`PX`/`EXPIRE` says so.
//!
//! ## Two key spaces, one bound
//! Agent entries live under their 16-byte MD5, plain keys under their bytes;
//! both share the LRU and the byte bound. A RESP key is resolved plain first,
//! then, if it is 32 hex digits, as an agent MD5: so `GET`/`DEL`/`EXISTS`/
//! `TTL`/`EXPIRE <md5 hex>` reach agent entries, and a plain key spelled like
//! an MD5 shadows the agent entry of that MD5 for those commands (never for
//! `AGENT.*`, which always hash).

pub mod cache;
pub mod clock;
pub mod commands;
pub mod json;
pub mod key;
pub mod persist;
mod read_buffer;
pub mod resp;
pub mod server;
pub mod store;

pub use cache::{
    Cache, CacheConfig, CacheError, CacheStats, ExpireCondition, KeyTtl, Maintenance,
    PendingCommit, PutItem, SetCondition, SetExpiry, SetOptions, SetOutcome,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use json::{
    export_json, export_json_file, import_json, import_json_file, ExportReport, ImportReport,
    JsonError,
};
pub use key::{md5_hex, parse_md5_hex, Digests, Request};
pub use persist::{Fsync, LoadReport, PersistConfig, PersistError, PersistStats};
pub use resp::{Command, Limits, Protocol, ProtocolError};
pub use server::{maintenance_loop, serve, serve_unix, ServerConfig};
pub use store::{AgentOwner, Change, Entry, Key, KeyRef, StoreError};
