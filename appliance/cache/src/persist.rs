//! Persistence: every applied mutation as a postcard record in an
//! `appliance-record-log`, replayed on start-up and compacted in the
//! background.
//!
//! ## Records
//! Each log record's payload is the postcard encoding of `Rec`: variant 0
//! `Put { key, value, expires_at, owner }` (the whole entry, so a put is an
//! idempotent assignment), variant 1 `Remove { key }` (delete, eviction or
//! expiry), or variant 2 `PutLz4 { key, value_lz4, value_len, expires_at,
//! owner }`, a put whose value is an LZ4 block (`lz4_flex::block`) of
//! `value_len` bytes. Keys are variant 0 `Agent([u8; 16])` or 1
//! `Plain(bytes)`.
//!
//! Appends write `Put`: compressing on the serving thread would cost more
//! than the write it saves. Compaction, in the background, writes `PutLz4`
//! for values of at least [`COMPRESS_MIN`] bytes that shrink by at least an
//! eighth (as redis compresses strings in the RDB preamble of its
//! rewritten AOF): agent responses are text and about halve, so the
//! rewrite writes and fsyncs half as much, the log takes half the disk,
//! and start-up reads half as much. Incompressible values are detected
//! quickly by LZ4 and stay `Put`. Logs written before `PutLz4` existed are
//! read unchanged; a log holding `PutLz4` records is not readable by
//! older versions.
//!
//! Variant 3 `Group { members }` is a transaction (`EXEC`, see
//! `Cache::atomically`): the payloads its changes would have had as
//! records of their own (`Put`, `PutLz4` or `Remove`, never a group), in
//! order, in one record. Its CRC covers them all, so a write torn by a
//! crash loses the whole transaction, never a part of it, and a group
//! damaged anywhere is skipped whole. A transaction whose members would
//! pass `MAX_RECORD_BYTES` (64 MiB) is logged record by record, without
//! that guarantee. Older versions report a `Group` as undecodable (and
//! a compaction run by one would drop those writes). Garbage is counted in
//! changes, a group's members each counting, so transactions do not keep
//! the log from compacting; and as a compaction numbers its records below
//! the first one it keeps, one that has more live entries than numbers
//! (they came from groups) writes them in groups too.
//!
//! Replaying the records in order rebuilds the memory tier. An eviction is
//! logged as a `Remove` after the `Put` that caused it, so the replay lets
//! the bytes run past the bound until then (see `Store::insert_replayed`)
//! and the entries the running cache kept are the ones loaded. Entries
//! whose expiry has passed by then are dropped and counted, then entries
//! a capacity lowered since has no room for are evicted, and all these
//! removals are logged: a clock that later steps back, or a later replay,
//! does not revive them.
//!
//! ## Ordering and durability
//! Records are appended (a `write(2)` into the page cache) while the cache
//! lock is held, so the log order is the order in which mutations were
//! applied. Making them durable happens after the cache lock is released:
//! - `Always`: `fdatasync` before the caller is acknowledged, as a group
//!   commit: one thread takes the pending `fdatasync` out of the log
//!   (`Log::take_pending_sync`) and runs it holding neither lock, so appends
//!   go on meanwhile; writers whose records it covers wait for it instead of
//!   issuing their own. The log defers its writes (`LogOptions::defer_writes`):
//!   an append only encodes the records into memory, and the syncer's
//!   `PendingSync` writes them just before its `fdatasync`. So the thread
//!   serving clients never enters the kernel for the log (a `write(2)` can
//!   wait several milliseconds for a journal commit), and each `fdatasync`
//!   flushes exactly what it acknowledges, not also the appends racing with
//!   it (as redis writes its AOF buffer and fsyncs it with no write in
//!   between). On the 50-client 16 KiB durable SET benchmark this raised
//!   throughput by 15-30 % (A/B, same machine, alternating runs). In-process callers wait on a condition variable. The
//!   RESP server defers the commit to the end of each pipelined batch and
//!   waits asynchronously (`Cache::commit_async`): a dedicated syncer thread
//!   runs one `fdatasync` for everything appended so far whenever a batch is
//!   waiting, so every batch that arrives, from any connection, while one
//!   `fdatasync` runs is covered by the next one, and no runtime thread
//!   blocks on the disk (redis's `appendfsync always` groups per event-loop
//!   iteration and blocks its loop meanwhile). A failed `fdatasync` poisons
//!   the log and fails every waiter after it: nothing is acknowledged that
//!   was not synced.
//!
//!   Under `Always` the log's segments are preallocated
//!   (`PersistConfig::preallocate`): the maintenance loop writes a spare
//!   segment of zeros ahead of time, and the log moves into it at once, so
//!   that the `fdatasync`s overwrite written blocks instead of growing a
//!   file, which costs each one an inode write. Spares are written only
//!   while the `fdatasync`s are small (`SPARE_MAX_BYTES_PER_SYNC`), where
//!   that saving is worth the zeros.
//! - `Interval(d)`: the caller is acknowledged after the `write(2)` (the record
//!   survives a crash of the process); `fdatasync` runs at most `d` later,
//!   from the commit path (the syncer thread, for the RESP server) or the
//!   maintenance timer.
//!
//! ## Compaction
//! When the log holds more dead records than live entries times
//! `compact_garbage_ratio` (and at least `compact_min_garbage` of them, and
//! the log is at least `compact_min_log_bytes`), a
//! compaction starts: the log seals its active segment (the *boundary*), then
//! the live entries are cloned under the cache lock, then, without locks,
//! they are written as the new generation's records (numbered 1..=n in LRU
//! order; below the boundary, since every live entry came from a distinct
//! earlier record), and the record log switches to the new generation with
//! one `rename(2)` after everything is fsynced. Writes go on meanwhile and
//! land above the boundary; replaying them over the copy gives the current
//! state because each record assigns or removes a whole entry. A crash at any
//! point leaves either the old or the new generation, both complete.
//!
//! A compaction is background work and is kept out of the clients' way:
//! the new generation is written by a thread at nice +10, paced to
//! `COMPACTION_BYTES_PER_SEC`, with an `fdatasync` every 4 MiB (the record
//! log's); the maintenance loop runs it apart from its other ticks; only
//! the switch takes the log lock, at normal priority; and the replaced
//! generation's blocks are freed a step at a time afterwards, with no lock
//! held (`RELEASE_STEP`, `RELEASE_PAUSE`). Values that compress by an
//! eighth are written as LZ4 blocks (see Records).
//!
//! ## A failed log
//! A failed write or `fdatasync` (a full disk, most often) poisons the
//! log: what reached the file is unknown, so nothing more is appended. The
//! writes it was for get an error, not an acknowledgement (they stay in
//! memory: they were applied before the failure was known); every later
//! write is refused with an error before it touches memory; reads are
//! answered from memory, without waiting on the log. The maintenance loop then rebuilds the log from the memory
//! tier (`Persistence::heal`, through `Log::rebuild`: a new generation
//! written and fsynced beside the old one and switched to with one
//! `rename(2)`, holding the cache lock throughout so that the log is
//! exactly the memory tier), at most once a minute and only when the file
//! system has room for the entries; writes are durable again without a
//! restart. INFO shows the state as `aof_last_write_status` (`ok`/`err`)
//! and the rebuilds as `log_heals`.
//!
//! Lock order: cache, then log (appends run under the cache lock). Nothing
//! takes the cache lock while holding the log lock. Known cost: an append
//! that has to wait for the log lock (a segment rotation or a compaction's
//! sealing fsync) holds the cache lock meanwhile.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use appliance_record_log::{
    CompactionReport, FsyncPolicy, Log, LogOptions, RecoveryReport, SpareJob,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{AgentOwner, Change, Entry, Key, Store, StoreLock};

/// When writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// `fdatasync` before acknowledging.
    Always,
    /// `fdatasync` at most this often (milliseconds).
    IntervalMs(u64),
}

/// Persistence settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistConfig {
    /// The log directory (created if missing; locked while open).
    pub dir: PathBuf,
    /// Durability policy.
    pub fsync: Fsync,
    /// Compact when dead records exceed live entries times this (default 1.0:
    /// the log is at most about twice its live size plus the minimum).
    pub compact_garbage_ratio: f64,
    /// ... and there are at least this many dead records (default 10,000, so a
    /// small cache does not compact on every maintenance tick).
    pub compact_min_garbage: u64,
    /// ... and the log holds at least this many bytes (default 64 MiB, as
    /// redis's `auto-aof-rewrite-min-size`). A compaction rewrites every
    /// live entry and fsyncs the files and directories of a new generation;
    /// for small values, 10,000 dead records are a few megabytes, and at
    /// 60,000 writes a second the record minimum alone compacted ten times a
    /// second, each one stalling the clients' `fdatasync`s behind its own
    /// (p99 of 50-client durable SETs of 256 B: 3.4-4.6 ms, against
    /// redis's 1 ms). A log this small replays in well under a second.
    pub compact_min_log_bytes: u64,
    /// Segment size of the record log (default 64 MiB).
    pub segment_max_bytes: u64,
    /// Under `Always`: start each new segment in a file of zeros written
    /// ahead of time by the maintenance loop (default on; see
    /// `LogOptions::preallocate` in `appliance-record-log`), so that the
    /// clients' `fdatasync`s overwrite allocated blocks instead of growing
    /// the file. Costs each segment's bytes written twice, in the
    /// background, and up to two segments of disk space beyond the
    /// records: the spare and the active segment's unused zeros.
    pub preallocate: bool,
}

impl PersistConfig {
    /// Defaults for a directory: `Always`, ratio 1.0, 10,000 records, a
    /// 64 MiB log before compacting, 64 MiB segments.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: Fsync::Always,
            compact_garbage_ratio: 1.0,
            compact_min_garbage: 10_000,
            compact_min_log_bytes: 64 << 20,
            segment_max_bytes: 64 << 20,
            preallocate: true,
        }
    }
}

/// Largest record: a maximal value plus a maximal prompt fit, with room.
const MAX_RECORD_BYTES: u32 = 64 << 20;

/// Errors of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The record log failed (names the operation and path).
    #[error("cache log: {0}")]
    Log(#[from] appliance_record_log::Error),
    /// A record could not be encoded.
    #[error("cache log: cannot encode a record: {0}")]
    Encode(#[from] postcard::Error),
    /// An earlier write or `fdatasync` failed; the log accepts nothing
    /// durable until [`crate::Cache::heal_log`] rebuilds it.
    #[error("cache log: {0}")]
    Failed(String),
    /// A heal was not tried: the file system has less free space than the
    /// entries need.
    #[error("cache log: not rebuilt, {free} bytes free on its file system, the entries need {needed} and a margin")]
    NoSpace {
        /// Bytes the entries take in memory (the log takes about as much).
        needed: u64,
        /// Bytes free for this process.
        free: u64,
    },
    /// The syncer thread could not be started.
    #[error("cache log: cannot start the sync thread: {0}")]
    Thread(String),
}

/// What start-up found.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Entries in the cache after loading.
    pub entries: u64,
    /// Log records read.
    pub records_read: u64,
    /// Entries dropped because they had expired while the cache was down.
    pub expired: u64,
    /// Records that passed their CRC but did not decode (another format
    /// version); skipped.
    pub undecodable: u64,
    /// Time to open, recover and replay.
    pub elapsed: Duration,
    /// The record log's own report: damage found, bytes and records lost.
    pub recovery: RecoveryReport,
}

impl LoadReport {
    /// Nothing was lost.
    pub fn is_clean(&self) -> bool {
        self.recovery.is_clean() && self.undecodable == 0
    }
}

/// Counters of the persistence layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistStats {
    /// Records in the log.
    pub log_records: u64,
    /// Bytes of the log's records (on disk it takes more when preallocated:
    /// the active segment's unused zeros and a spare segment).
    pub log_bytes: u64,
    /// Compactions finished since start-up.
    pub compactions: u64,
    /// A compaction is running (writing the new generation, switching, or
    /// freeing the old one).
    pub compacting: bool,
    /// A spare segment is being written (see
    /// [`PersistConfig::preallocate`]).
    #[serde(default)]
    pub writing_spare: bool,
    /// Why the log takes no writes, while it does not (a write or an
    /// `fdatasync` failed; see [`crate::Cache::heal_log`]).
    #[serde(default)]
    pub failed: Option<String>,
    /// Times the log was rebuilt from memory after such a failure.
    #[serde(default)]
    pub heals: u64,
}

#[derive(Serialize, Deserialize)]
enum RecKey<'a> {
    Agent([u8; 16]),
    Plain(#[serde(with = "serde_bytes", borrow)] Cow<'a, [u8]>),
}

#[derive(Serialize, Deserialize)]
struct RecOwner<'a> {
    #[serde(with = "serde_bytes", borrow)]
    agent: Cow<'a, [u8]>,
    #[serde(with = "serde_bytes", borrow)]
    prompt: Cow<'a, [u8]>,
    #[serde(with = "serde_bytes", borrow)]
    variant: Cow<'a, [u8]>,
    sha256: [u8; 32],
}

/// The record payload (see the module docs).
#[derive(Serialize, Deserialize)]
enum Rec<'a> {
    Put {
        #[serde(borrow)]
        key: RecKey<'a>,
        #[serde(with = "serde_bytes", borrow)]
        value: Cow<'a, [u8]>,
        expires_at: Option<u64>,
        #[serde(borrow)]
        owner: Option<RecOwner<'a>>,
    },
    Remove {
        #[serde(borrow)]
        key: RecKey<'a>,
    },
    PutLz4 {
        #[serde(borrow)]
        key: RecKey<'a>,
        #[serde(with = "serde_bytes", borrow)]
        value_lz4: Cow<'a, [u8]>,
        value_len: u32,
        expires_at: Option<u64>,
        #[serde(borrow)]
        owner: Option<RecOwner<'a>>,
    },
    /// The records of one transaction (`EXEC`), in order, each encoded as
    /// it would be on its own (`Put`, `PutLz4` or `Remove`; never a group):
    /// one record, so one CRC covers them all and a torn write loses all of
    /// them, never a part.
    Group {
        #[serde(borrow)]
        members: Vec<&'a serde_bytes::Bytes>,
    },
}

/// Smallest value compaction tries to compress (128 bytes): below it the
/// saving is a few bytes per record.
pub const COMPRESS_MIN: usize = 128;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
    #[error("compressed value: {0}")]
    Lz4(String),
    #[error("a group of records inside a group")]
    NestedGroup,
}

fn rec_key(key: &Key) -> RecKey<'_> {
    match key {
        Key::Agent(k) => RecKey::Agent(*k),
        Key::Plain(k) => RecKey::Plain(Cow::Borrowed(k)),
    }
}

fn rec_owner(owner: Option<&AgentOwner>) -> Option<RecOwner<'_>> {
    owner.map(|o| RecOwner {
        agent: Cow::Borrowed(o.agent()),
        prompt: Cow::Borrowed(o.prompt()),
        variant: Cow::Borrowed(o.variant()),
        sha256: o.sha256(),
    })
}

fn encode_put(key: &Key, entry: &Entry) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(&Rec::Put {
        key: rec_key(key),
        value: Cow::Borrowed(&entry.value),
        expires_at: entry.expires_at,
        owner: rec_owner(entry.owner.as_ref()),
    })
}

/// A put as compaction writes it: `PutLz4` when the value compresses by at
/// least an eighth, else `Put` (see the module docs).
fn encode_compacted(key: &Key, entry: &Entry) -> Result<Vec<u8>, postcard::Error> {
    let value = &entry.value;
    if value.len() >= COMPRESS_MIN {
        if let Ok(value_len) = u32::try_from(value.len()) {
            let packed = lz4_flex::block::compress(value);
            if packed.len() <= value.len() - value.len() / 8 {
                return postcard::to_stdvec(&Rec::PutLz4 {
                    key: rec_key(key),
                    value_lz4: Cow::Borrowed(&packed),
                    value_len,
                    expires_at: entry.expires_at,
                    owner: rec_owner(entry.owner.as_ref()),
                });
            }
        }
    }
    encode_put(key, entry)
}

/// The payloads of `changes`, in order: one per change, and one per group
/// ([`Rec::Group`]) unless the group would exceed [`MAX_RECORD_BYTES`]; its
/// records are then logged one by one, without the all-or-nothing.
fn encode_changes(changes: &[Change]) -> Result<Encoded, postcard::Error> {
    let mut out = Vec::with_capacity(changes.len());
    let mut folded = 0u64;
    for change in changes {
        match change {
            Change::Group(members) => {
                let mut encoded = Vec::with_capacity(members.len());
                encode_flat(members, &mut encoded)?;
                // Each member adds at most a 5-byte length; the tag and the
                // count at most 6 more.
                let size = encoded.iter().map(|m| m.len() + 5).sum::<usize>() + 6;
                if size <= MAX_RECORD_BYTES as usize {
                    folded += encoded.len().saturating_sub(1) as u64;
                    let members = encoded.iter().map(|m| serde_bytes::Bytes::new(m)).collect();
                    out.push(postcard::to_stdvec(&Rec::Group { members })?);
                } else {
                    tracing::warn!(
                        records = encoded.len(),
                        bytes = size,
                        "cache log: a transaction too large for one record is logged record by record"
                    );
                    out.extend(encoded);
                }
            }
            single => encode_flat(std::slice::from_ref(single), &mut out)?,
        }
    }
    Ok(Encoded {
        payloads: out,
        folded,
    })
}

/// Payloads to append, and how many changes they hold beyond one per
/// payload (the members of each group after its first).
struct Encoded {
    payloads: Vec<Vec<u8>>,
    folded: u64,
}

/// One payload per `Put` and `Remove` of `changes`, a group's members in
/// place of the group.
fn encode_flat(changes: &[Change], out: &mut Vec<Vec<u8>>) -> Result<(), postcard::Error> {
    for change in changes {
        match change {
            Change::Put { key, entry } => out.push(encode_put(key, entry)?),
            Change::Remove { key } => {
                out.push(postcard::to_stdvec(&Rec::Remove { key: rec_key(key) })?);
            }
            Change::Group(members) => encode_flat(members, out)?,
        }
    }
    Ok(())
}

fn owned_key(k: RecKey<'_>) -> Key {
    match k {
        RecKey::Agent(k) => Key::Agent(k),
        RecKey::Plain(k) => Key::Plain(k.into_owned().into_boxed_slice()),
    }
}

fn owned_owner(owner: Option<RecOwner<'_>>) -> Option<AgentOwner> {
    owner.map(|o| AgentOwner::new(&o.agent, &o.prompt, &o.variant, o.sha256))
}

/// Applies one record's change at start-up (see [`Persistence::open`]).
fn replay(
    store: &mut Store,
    change: Change,
    now_ms: u64,
    evicted: &mut std::collections::HashSet<Key>,
    dropped: &mut Vec<Key>,
) {
    match change {
        Change::Put { key, entry } => {
            // Refused entries (the limits shrank since) are dropped like
            // evictions; the next compaction forgets them. The running
            // cache's evictions follow as `Remove`s.
            evicted.remove(&key);
            let _ = store.insert_replayed(key, entry, now_ms, dropped);
            evicted.extend(dropped.drain(..));
        }
        Change::Remove { key } => {
            evicted.remove(&key);
            store.discard(&key);
        }
        Change::Group(members) => {
            for m in members {
                replay(store, m, now_ms, evicted, dropped);
            }
        }
    }
}

/// Decode a payload into a change.
fn decode(payload: &[u8]) -> Result<Change, DecodeError> {
    decode_rec(postcard::from_bytes::<Rec<'_>>(payload)?)
}

fn decode_rec(rec: Rec<'_>) -> Result<Change, DecodeError> {
    Ok(match rec {
        Rec::Put {
            key,
            value,
            expires_at,
            owner,
        } => Change::Put {
            key: owned_key(key),
            entry: Entry {
                value: Bytes::from(value.into_owned()),
                expires_at,
                owner: owned_owner(owner),
            },
        },
        Rec::PutLz4 {
            key,
            value_lz4,
            value_len,
            expires_at,
            owner,
        } => {
            // The declared length sizes the output buffer: bound it first.
            if value_len > MAX_RECORD_BYTES {
                return Err(DecodeError::Lz4(format!(
                    "declared length {value_len} exceeds {MAX_RECORD_BYTES}"
                )));
            }
            let value = lz4_flex::block::decompress(&value_lz4, value_len as usize)
                .map_err(|e| DecodeError::Lz4(e.to_string()))?;
            if value.len() != value_len as usize {
                return Err(DecodeError::Lz4(format!(
                    "{} bytes decompressed, {value_len} declared",
                    value.len()
                )));
            }
            Change::Put {
                key: owned_key(key),
                entry: Entry {
                    value: Bytes::from(value),
                    expires_at,
                    owner: owned_owner(owner),
                },
            }
        }
        Rec::Remove { key } => Change::Remove {
            key: owned_key(key),
        },
        Rec::Group { members } => Change::Group(
            members
                .iter()
                .map(|m| match postcard::from_bytes::<Rec<'_>>(m)? {
                    // Refused before its members are looked at: a crafted
                    // record cannot make the decoder recurse.
                    Rec::Group { .. } => Err(DecodeError::NestedGroup),
                    single => decode_rec(single),
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Best effort, before `finish_compaction`: `fdatasync` the new
/// generation's segments (in the log's `*.tmp` directory) without holding
/// the log lock. `finish_compaction` fsyncs its last segment under the
/// lock, and appends (hence the whole RESP server, which appends under the
/// cache lock) wait for that lock, so every client stalls for as long as
/// that fsync takes; it can cover up to a whole segment (64 MiB) of data
/// the kernel has not written back yet. After this it covers little more
/// than the writer's last buffer (measured: 0.46 ms under the lock after a
/// 1.4 ms pre-sync, compacting 16 KiB values). Errors are only logged: the
/// log's own fsync under the lock remains the one that counts.
fn presync_compaction(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() || path.extension().is_none_or(|e| e != "tmp") {
            continue;
        }
        let Ok(segments) = std::fs::read_dir(&path) else {
            continue;
        };
        for seg in segments.flatten() {
            let seg = seg.path();
            if let Err(e) = std::fs::File::open(&seg).and_then(|f| f.sync_data()) {
                tracing::debug!(path = %seg.display(), error = %e, "cache log: compaction pre-sync failed");
            }
        }
    }
}

/// The replaced generation's blocks are freed 8 MiB at a time, 10 ms
/// apart (see `appliance_record_log::Superseded::release`): freeing the
/// 320 MB generation of a 16 KiB-value benchmark at once stalled the next
/// `fdatasync` for 157 ms. At this pace 320 MB takes about 0.4 s, on the
/// maintenance thread, with no lock held; the next compaction waits for it.
const RELEASE_STEP: u64 = 8 << 20;
const RELEASE_PAUSE: Duration = Duration::from_millis(10);

/// How fast a compaction writes (128 MiB/s, about a seventh of what this
/// machine's disk takes with `fdatasync`): the clients' appends and their
/// `fdatasync`s keep most of the disk. Unpaced, a 160 MB rewrite took the
/// disk for a third of a second and the clients' p99 followed (16 KiB
/// durable SETs, 50 clients, one long-lived server, our server alone:
/// p99 15.0 ms unpaced, 8.1-9.5 ms paced at 64-256 MiB/s; pipelined 16
/// deep, 26.1 ms against 17.4-22.9 ms). The log grows meanwhile by what
/// the clients write during the compaction, and the next compaction
/// reclaims it, so its size stays bounded; a slower compaction only lets
/// it grow further between two.
const COMPACTION_BYTES_PER_SEC: f64 = 128.0 * 1024.0 * 1024.0;

/// Sleeps as needed so that the bytes reported to [`Pacer::wrote`] do not
/// run ahead of a rate (checked once per MiB).
struct Pacer {
    started: Instant,
    bytes_per_sec: f64,
    bytes: usize,
    next_check: usize,
}

impl Pacer {
    fn new(bytes_per_sec: f64) -> Self {
        Self {
            started: Instant::now(),
            bytes_per_sec,
            bytes: 0,
            next_check: PACE_STEP,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.bytes += n;
        if self.bytes < self.next_check {
            return;
        }
        self.next_check = self.bytes + PACE_STEP;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

const PACE_STEP: usize = 1 << 20;

/// Background priority for the thread writing a compaction (nice +10; on
/// Linux the nice value is per thread). Rewriting the live entries is a few
/// hundred milliseconds of copying and checksumming for a large cache; at
/// the same priority it takes a core from the server's runtime thread and
/// the log's syncer, and the clients' tail latency shows it (A/B on the
/// 50-client 16 KiB durable SET benchmark: p99 15.7-17.9 ms without,
/// 12.3-13.5 ms with; redis 13.5-20.7 ms in the same rounds). It holds no
/// lock meanwhile, and it still runs whenever the serving threads wait, so
/// it only finishes later under load. A failure to lower it is harmless.
fn lower_priority() {
    if let Err(e) = rustix::process::nice(10) {
        tracing::debug!(error = %e, "cache log: could not lower the compaction thread's priority");
    }
}

/// How fast a spare segment's zeros are written (64 MiB/s: a 64 MiB spare
/// in a second), so that they take the disk from the clients' `fdatasync`s
/// in small steps rather than all at once.
const SPARE_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;

/// Spares are written only while the `fdatasync`s carry at most this much
/// each on average (64 KiB). Overwriting a spare saves a fixed cost per
/// `fdatasync` (0.1-0.2 ms on the test machine's disk: the inode write of a
/// growing file); its zeros cost disk time per byte (about 0.1 ms per 64
/// KiB at that disk's 600 MB/s). On the 50-client durable SET benchmark
/// (two servers, alternating rounds, 100,000 SETs each): 256 B values
/// (about 6 KiB per `fdatasync`) went from 50-54k to 52-67k SETs/s with
/// spares; 16 KiB values 16 deep (megabytes per `fdatasync`) had a worse
/// p99 with them (53-91 ms against 27-66 ms), so they get none.
const SPARE_MAX_BYTES_PER_SYNC: u64 = 64 << 10;

/// Runs `work` on a thread of its own named `name`, at background priority
/// ([`lower_priority`]; the caller's thread keeps its own), with a
/// [`Pacer`] at `bytes_per_sec`, and waits for it.
fn in_background<T: Send>(
    name: &str,
    bytes_per_sec: f64,
    work: impl FnOnce(&mut Pacer) -> Result<T, PersistError> + Send,
) -> Result<T, PersistError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, || {
                lower_priority();
                work(&mut Pacer::new(bytes_per_sec))
            })
            .map_err(|e| PersistError::Thread(e.to_string()))?
            .join()
            .map_err(|_| PersistError::Thread(format!("the {name} thread panicked")))?
    })
}

/// A rewrite of the log is running; dropping it clears the flag however
/// the rewrite ends, a panic included.
struct Rewriting<'a>(&'a AtomicU8);

impl Drop for Rewriting<'_> {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::Release);
    }
}

/// What background work on the log files runs (one at a time): nothing, a
/// rewrite (compaction or heal), or a spare segment.
const IDLE: u8 = 0;
const REWRITING: u8 = 1;
const SPARING: u8 = 2;

/// Free space a heal leaves beside the entries it writes.
const HEAL_SPARE_BYTES: u64 = 16 << 20;

/// Bytes an unprivileged process may still write on the file system of
/// `dir`, if `statvfs` can tell.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Group-commit state: how far the log is known durable, whether a thread
/// is running an `fdatasync` for everyone, and what the syncer thread is
/// asked to cover.
#[derive(Debug, Default)]
struct SyncState {
    durable_seq: u64,
    syncing: bool,
    /// Highest record an asynchronous waiter needs durable.
    requested: u64,
    /// Set when an `fdatasync` (or taking one) failed: the log is poisoned
    /// and nothing after `durable_seq` will ever be durable.
    failed: Option<String>,
    /// The syncer thread should exit.
    stop: bool,
}

/// What asynchronous waiters watch: `durable_seq` and the failure, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Durable {
    seq: u64,
    failed: Option<String>,
}

/// The state shared with the syncer thread.
#[derive(Debug)]
struct Shared {
    log: Mutex<Log>,
    sync_state: Mutex<SyncState>,
    /// Blocking waiters: an `fdatasync` finished.
    sync_done: Condvar,
    /// The syncer thread: a waiter asked for more.
    work: Condvar,
    /// Asynchronous waiters: every change of `durable_seq` or `failed`.
    durable: watch::Sender<Durable>,
    /// The log has failed: mutations are refused before they touch memory
    /// (checked on every write, so an atomic; `is_failed` is the full check).
    refusing: AtomicBool,
}

/// The log behind a cache.
#[derive(Debug)]
pub struct Persistence {
    shared: Arc<Shared>,
    syncer: Option<std::thread::JoinHandle<()>>,
    config: PersistConfig,
    /// `IDLE`, `REWRITING` or `SPARING`.
    busy: AtomicU8,
    compactions: AtomicU64,
    /// Changes the log holds beyond one per record: the members of each
    /// group after its first. Garbage is counted in changes, so that
    /// transactions do not keep the log from compacting. Changed under the
    /// log lock.
    folded: AtomicU64,
    heals: AtomicU64,
    /// `Log::sync_totals` at the last spare decision.
    spare_seen: Mutex<(u64, u64)>,
}

impl Drop for Persistence {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.work.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

/// The syncer thread: whenever an asynchronous waiter needs records durable
/// that are not yet, run one group `fdatasync` covering everything appended
/// so far. Appends go on while it runs; the next round covers them. So under
/// load each `fdatasync` acknowledges every batch that arrived during the
/// previous one, and no runtime thread ever blocks on the disk.
fn syncer(shared: &Shared) {
    loop {
        let target = {
            let mut st = shared.state();
            loop {
                if st.stop {
                    return;
                }
                if st.requested > st.durable_seq && st.failed.is_none() {
                    break st.requested;
                }
                st = shared.work.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        // Errors reach the waiters through `failed`.
        let _ = shared.sync_to(target);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // The log poisons itself on failed writes; a panicked holder leaves
        // it consistent (every method restores its invariants before IO).
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> MutexGuard<'_, SyncState> {
        self.sync_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Group commit: one thread at a time takes the pending `fdatasync` out of
    /// the log (so appends, which run under the cache lock, never wait for
    /// the disk) and runs it; threads whose records it covers just wait.
    fn sync_to(&self, target: u64) -> Result<(), PersistError> {
        let mut st = self.state();
        loop {
            if st.durable_seq >= target {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                return Err(PersistError::Failed(f.clone()));
            }
            if !st.syncing {
                break;
            }
            st = self
                .sync_done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.syncing = true;
        drop(st);
        let taken = {
            let mut log = self.lock();
            let upto = log.next_seq().saturating_sub(1);
            log.take_pending_sync().map(|p| (p, upto))
        };
        let result = match taken {
            Ok((pending, upto)) => {
                let ran = pending.map_or(Ok(()), appliance_record_log::PendingSync::run);
                if let Err(e) = &ran {
                    // The kernel may have dropped the pages: never retry.
                    self.lock().poison(format!("fdatasync failed: {e}"));
                }
                ran.map(|()| upto).map_err(PersistError::from)
            }
            Err(e) => Err(PersistError::from(e)),
        };
        let mut st = self.state();
        st.syncing = false;
        match &result {
            Ok(upto) => st.durable_seq = st.durable_seq.max(*upto),
            Err(e) => {
                st.failed = Some(e.to_string());
                self.refusing.store(true, Ordering::Release);
            }
        }
        let durable = Durable {
            seq: st.durable_seq,
            failed: st.failed.clone(),
        };
        drop(st);
        self.sync_done.notify_all();
        self.durable.send_replace(durable);
        result.map(|_| ())
    }
}

impl Persistence {
    /// Open the log and replay it into `store` (whose journal must be off).
    pub(crate) fn open(
        config: PersistConfig,
        store: &mut Store,
        now_ms: u64,
    ) -> Result<(Self, LoadReport), PersistError> {
        let started = Instant::now();
        let fsync = match config.fsync {
            // Syncing is driven by `commit`, outside the cache lock; the log's
            // own timer is never due.
            Fsync::Always => FsyncPolicy::Interval(Duration::from_secs(u64::from(u32::MAX))),
            Fsync::IntervalMs(ms) => FsyncPolicy::Interval(Duration::from_millis(ms)),
        };
        let opts = LogOptions {
            segment_max_bytes: config.segment_max_bytes,
            fsync,
            max_payload_bytes: MAX_RECORD_BYTES,
            // Under `Always` nothing is acknowledged before the syncer's
            // `PendingSync` ran, so the records can wait in memory until it
            // writes them (see the module docs). Under `Interval` an
            // acknowledged record must be in the kernel at once.
            defer_writes: config.fsync == Fsync::Always,
            preallocate: config.preallocate,
            ..LogOptions::default()
        };
        let (log, recovery) = Log::open(&config.dir, opts)?;
        let mut report = LoadReport {
            entries: 0,
            records_read: 0,
            expired: 0,
            undecodable: 0,
            elapsed: Duration::ZERO,
            recovery,
        };
        // Keys the replay evicted (for a capacity lowered since) whose last
        // record so far is a Put: their removal is not in the log yet. A
        // later Put or Remove of the key takes it out again, so that the
        // removals appended at the end are each needed, and once only.
        let mut evicted = std::collections::HashSet::new();
        let mut dropped = Vec::new();
        let mut folded = 0u64;
        for rec in log.iter()? {
            let rec = rec?;
            report.records_read += 1;
            match decode(&rec.payload) {
                Ok(change) => {
                    if let Change::Group(members) = &change {
                        folded += members.len().saturating_sub(1) as u64;
                    }
                    replay(store, change, now_ms, &mut evicted, &mut dropped);
                }
                Err(e) => {
                    report.undecodable += 1;
                    tracing::warn!(seq = rec.seq, error = %e, "cache log: undecodable record skipped");
                }
            }
        }
        // What expired while the cache was down goes, then what a capacity
        // lowered since leaves no room for, and the log says so: a restart
        // must not bring those entries back (should the clock step back,
        // or the eviction choose otherwise).
        store.set_journal(true);
        store.purge_expired(now_ms);
        store.enforce_bound(now_ms);
        let mut removed = store.take_journal();
        store.set_journal(false);
        removed.extend(
            evicted
                .into_iter()
                .filter(|key| store.peek(key.as_ref(), now_ms).is_none())
                .map(|key| Change::Remove { key }),
        );
        report.expired = store.counters().expirations;
        report.entries = store.len() as u64;
        report.elapsed = started.elapsed();
        store.reset_counters();
        let shared = Arc::new(Shared {
            log: Mutex::new(log),
            sync_state: Mutex::new(SyncState::default()),
            sync_done: Condvar::new(),
            work: Condvar::new(),
            durable: watch::Sender::new(Durable::default()),
            refusing: AtomicBool::new(false),
        });
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("cache-log-sync".into())
                .spawn(move || syncer(&shared))
                .map_err(|e| PersistError::Thread(e.to_string()))?
        };
        let persistence = Self {
            shared,
            syncer: Some(syncer),
            config,
            busy: AtomicU8::new(IDLE),
            compactions: AtomicU64::new(0),
            folded: AtomicU64::new(folded),
            heals: AtomicU64::new(0),
            spare_seen: Mutex::new((0, 0)),
        };
        persistence.record_removed_at_load(&removed, now_ms);
        Ok((persistence, report))
    }

    /// Appends and commits the removals made at start-up. Best effort: if
    /// the log takes nothing (a full disk), it refuses writes until a heal
    /// rewrites it from memory, where they are gone.
    fn record_removed_at_load(&self, removed: &[Change], now_ms: u64) {
        if removed.is_empty() {
            return;
        }
        if let Err(e) = self
            .append(removed, now_ms)
            .and_then(|target| self.commit(target))
        {
            tracing::warn!(error = %e, "cache log: could not record the entries removed at start-up");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.shared.lock()
    }

    /// The durability policy.
    pub fn fsync(&self) -> Fsync {
        self.config.fsync
    }

    /// Append changes in order (called with the cache lock held). Returns the
    /// sequence number of the last record, the target for [`Self::commit`].
    /// (With no changes, nothing is written and the target is the last
    /// record so far, which covers changes another thread drained for us.)
    pub(crate) fn append(&self, changes: &[Change], now_ms: u64) -> Result<u64, PersistError> {
        let Encoded { payloads, folded } = encode_changes(changes)?;
        let mut log = self.lock();
        if !payloads.is_empty() {
            if let Err(e) = log.append_batch_at(now_ms, payloads) {
                if matches!(e, appliance_record_log::Error::Io { .. }) {
                    // The change is in memory and not in the log (a write
                    // refused for lack of space, under `Interval`): take
                    // nothing more until a heal has made the log the
                    // memory tier again, or a later delete could be undone
                    // by a restart.
                    log.poison(format!("append failed: {e}"));
                }
                if log.failure().is_some() {
                    self.shared.refusing.store(true, Ordering::Release);
                }
                return Err(e.into());
            }
            self.folded.fetch_add(folded, Ordering::Relaxed);
        }
        Ok(log.next_seq().saturating_sub(1))
    }

    /// Make the log durable up to `target` per the policy: under `Always`,
    /// wait for an `fdatasync` covering it; under `Interval`, run one only if
    /// the interval has passed.
    pub(crate) fn commit(&self, target: u64) -> Result<(), PersistError> {
        match self.config.fsync {
            Fsync::Always => self.sync_to(target),
            Fsync::IntervalMs(_) => {
                let due = self.lock().sync_due_in().is_some_and(|d| d.is_zero());
                if due {
                    self.sync_to(target)?;
                }
                Ok(())
            }
        }
    }

    fn sync_to(&self, target: u64) -> Result<(), PersistError> {
        self.shared.sync_to(target)
    }

    /// The asynchronous [`Self::commit`]: under `Always`, hand `target` to
    /// the syncer thread and wait (without blocking a thread) until an
    /// `fdatasync` covers it; under `Interval`, ask the syncer for one if
    /// the interval has passed and return at once.
    pub(crate) async fn commit_async(&self, target: u64) -> Result<(), PersistError> {
        let mut durable = self.shared.durable.subscribe();
        {
            let mut st = self.shared.state();
            if st.durable_seq >= target {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                return Err(PersistError::Failed(f.clone()));
            }
            let wanted = match self.config.fsync {
                Fsync::Always => true,
                Fsync::IntervalMs(_) => {
                    drop(st);
                    let due = self.lock().sync_due_in().is_some_and(|d| d.is_zero());
                    st = self.shared.state();
                    due
                }
            };
            if !wanted {
                return Ok(());
            }
            st.requested = st.requested.max(target);
        }
        self.shared.work.notify_one();
        if self.config.fsync != Fsync::Always {
            return Ok(());
        }
        // `wait_for` looks at the current value first: a round that finished
        // between the request and here is not missed.
        let seen = durable
            .wait_for(|d| d.seq >= target || d.failed.is_some())
            .await
            .map(|d| d.clone());
        match seen {
            Ok(d) if d.seq >= target => Ok(()),
            Ok(d) => Err(PersistError::Failed(d.failed.unwrap_or_default())),
            // The sender lives as long as `self`.
            Err(_) => Err(PersistError::Failed("the log was closed".into())),
        }
    }

    /// Whether the records up to `target` are known durable.
    pub(crate) fn is_durable(&self, target: u64) -> bool {
        self.shared.state().durable_seq >= target
    }

    /// Under `Interval`: `fdatasync` if the interval has passed since the
    /// last one and records are waiting (the maintenance timer calls this so
    /// the window is bounded even when no writes arrive).
    pub fn sync_if_due(&self) -> Result<(), PersistError> {
        let target = self.lock().next_seq().saturating_sub(1);
        match self.config.fsync {
            Fsync::Always => Ok(()),
            Fsync::IntervalMs(_) => self.commit(target),
        }
    }

    /// `fdatasync` everything appended so far.
    pub fn sync(&self) -> Result<(), PersistError> {
        let target = self.lock().next_seq().saturating_sub(1);
        self.sync_to(target)
    }

    /// Log size.
    pub fn stats(&self) -> PersistStats {
        let (s, failed) = {
            let log = self.lock();
            (log.stats(), log.failure())
        };
        PersistStats {
            log_records: s.records,
            log_bytes: s.bytes,
            compactions: self.compactions.load(Ordering::Relaxed),
            compacting: self.busy.load(Ordering::Relaxed) == REWRITING,
            writing_spare: self.busy.load(Ordering::Relaxed) == SPARING,
            failed: failed.or_else(|| self.shared.state().failed.clone()),
            heals: self.heals.load(Ordering::Relaxed),
        }
    }

    /// Whether the garbage threshold is passed for `live` entries.
    pub(crate) fn needs_compaction(&self, live: u64) -> bool {
        let (stats, folded) = {
            let log = self.lock();
            (log.stats(), self.folded.load(Ordering::Relaxed))
        };
        let garbage = (stats.records + folded).saturating_sub(live);
        stats.bytes >= self.config.compact_min_log_bytes
            && garbage >= self.config.compact_min_garbage
            && garbage as f64 >= self.config.compact_garbage_ratio * live as f64
    }

    /// Why writes are refused, if the log has failed: the cache checks this
    /// before applying a mutation, so that memory does not run ahead of a
    /// log that takes nothing.
    pub fn refusal(&self) -> Option<String> {
        if !self.shared.refusing.load(Ordering::Acquire) {
            return None;
        }
        let failed = self.shared.state().failed.clone();
        Some(
            failed
                .or_else(|| self.lock().failure())
                .unwrap_or_else(|| "the log has failed".into()),
        )
    }

    /// Whether the log takes no writes (a write or an `fdatasync` failed).
    pub fn is_failed(&self) -> bool {
        let sync_failed = self.shared.state().failed.is_some();
        sync_failed || self.lock().failure().is_some()
    }

    /// After a failed write or `fdatasync` (typically a full disk), the log
    /// takes nothing more: what reached the file is unknown, and records
    /// cannot be skipped. Everything the cache holds is in memory, so this
    /// rebuilds the log from it ([`Log::rebuild`]: a new generation written
    /// and fsynced beside the old, switched with one `rename(2)`), and
    /// writes are durable again. Returns `None` if the log has not failed,
    /// or if a compaction or another heal is running.
    ///
    /// It holds the cache lock throughout, so that the log is exactly the
    /// memory tier when writes resume: the cache answers nothing for as
    /// long as writing it takes. The writes whose commit failed were
    /// applied in memory before the failure was known (their callers got
    /// an error, not an acknowledgement), so they are in the rebuilt log;
    /// writes after it were refused before they were applied.
    /// When the file system has less free space than the entries take,
    /// nothing is tried ([`PersistError::NoSpace`]). A failed attempt
    /// leaves the log failed and removes what it wrote.
    pub(crate) fn heal(
        &self,
        store: &StoreLock,
        now_ms: u64,
    ) -> Result<Option<CompactionReport>, PersistError> {
        if !self.is_failed() {
            return Ok(None);
        }
        let Some(_running) = self.start_rewrite() else {
            return Ok(None);
        };
        // No `fdatasync` runs meanwhile, and none starts: any `PendingSync`
        // taken from the failed log has run (or failed) by now.
        {
            let mut st = self.shared.state();
            while st.syncing {
                st = self
                    .shared
                    .sync_done
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            st.syncing = true;
        }
        /// Lets the others sync again however the heal ends, a panic
        /// included.
        struct Syncing<'a>(&'a Shared);
        impl Drop for Syncing<'_> {
            fn drop(&mut self) {
                self.0.state().syncing = false;
                self.0.sync_done.notify_all();
            }
        }
        let syncing = Syncing(&self.shared);
        let result = self.rebuild(store, now_ms);
        {
            let mut st = self.shared.state();
            if let Ok((_, durable)) = &result {
                st.failed = None;
                st.durable_seq = st.durable_seq.max(*durable);
                st.requested = st.requested.max(*durable);
                self.shared.refusing.store(false, Ordering::Release);
            } else {
                self.shared.refusing.store(true, Ordering::Release);
            }
            st.syncing = false;
            // Under the state lock: a waiter that saw the cleared state
            // must not then read the failure from the channel.
            self.shared.durable.send_replace(Durable {
                seq: st.durable_seq,
                failed: st.failed.clone(),
            });
        }
        drop(syncing);
        let (report, _) = result?;
        self.heals.fetch_add(1, Ordering::Relaxed);
        Ok(Some(report))
    }

    /// The body of [`Self::heal`]: returns the report and the last sequence
    /// number the rebuilt log holds durably.
    fn rebuild(
        &self,
        store: &StoreLock,
        now_ms: u64,
    ) -> Result<(CompactionReport, u64), PersistError> {
        store.with(|store| self.rebuild_from(store, now_ms))
    }

    fn rebuild_from(
        &self,
        store: &mut Store,
        now_ms: u64,
    ) -> Result<(CompactionReport, u64), PersistError> {
        let needed = store.bytes() as u64;
        if let Some(free) = free_bytes(&self.config.dir) {
            if free < needed.saturating_add(HEAL_SPARE_BYTES) {
                return Err(PersistError::NoSpace { needed, free });
            }
        }
        // The snapshot below holds every change the journal still has.
        drop(store.take_journal());
        let entries: Vec<(&Key, &Entry)> = store
            .iter()
            .filter(|(_, e)| e.expires_at.is_none_or(|at| at > now_ms))
            .collect();
        let mut log = self.lock();
        // More entries than records is possible: writes refused by the
        // failed log got no number, but are in memory.
        let report = log.rebuild(entries.len() as u64, |plan| {
            let first = plan.boundary_seq() - entries.len() as u64;
            for (seq, (key, entry)) in (first..).zip(&entries) {
                let record = encode_compacted(key, entry)
                    .map_err(|e| appliance_record_log::Error::Compaction(e.to_string()))?;
                plan.push_parts(seq, now_ms, &record)?;
            }
            Ok(())
        })?;
        // One record per entry now.
        self.folded.store(0, Ordering::Relaxed);
        let durable = log.next_seq().saturating_sub(1);
        Ok((report, durable))
    }

    /// Writes the log's next spare segment if one is wanted (see
    /// [`PersistConfig::preallocate`]), on a thread of its own at
    /// background priority, paced, holding no lock. Returns whether it
    /// wrote one. Never while a compaction or heal runs, nor they while it
    /// does (one due meanwhile waits for the next tick): a new generation
    /// replaces the directory the spare goes into, and freeing a spare
    /// there at once would stall the clients.
    pub(crate) fn prepare_spare(&self) -> Result<bool, PersistError> {
        let (wanted, totals) = {
            let log = self.lock();
            (log.spare_job().is_some(), log.sync_totals())
        };
        let (bytes, syncs) = {
            let mut seen = self
                .spare_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (b0, s0) = std::mem::replace(&mut *seen, totals);
            (totals.0.saturating_sub(b0), totals.1.saturating_sub(s0))
        };
        // Since the last tick, the `fdatasync`s carried so much each that
        // the zeros would cost more disk time than they save (the saving
        // is per `fdatasync`, the cost per byte): no spare for now.
        if !wanted || (syncs > 0 && bytes / syncs > SPARE_MAX_BYTES_PER_SYNC) {
            return Ok(false);
        }
        // Only now the flag, so that the ticks with nothing to do never
        // keep a compaction from starting.
        let Some(_busy) = self.start(SPARING) else {
            return Ok(false);
        };
        let (job, gen) = {
            let log = self.lock();
            (log.spare_job(), log.generation())
        };
        let Some(job) = job else {
            return Ok(false);
        };
        let written = in_background("cache-spare", SPARE_BYTES_PER_SEC, |pace| {
            job.run(|| pace.wrote(SpareJob::STEP))
                .map_err(PersistError::from)
        });
        let mut log = self.lock();
        if log.generation() != gen {
            // Cannot happen while no rewrite runs; should one ever, the
            // spare (or its failure) went with the replaced directory.
            return Ok(false);
        }
        written?;
        log.spare_written();
        Ok(true)
    }

    /// Compact: `begin` runs under the caller's cache lock and returns the
    /// snapshot to write; see the module docs.
    pub(crate) fn compact(
        &self,
        store: &StoreLock,
        now_ms: u64,
    ) -> Result<Option<CompactionReport>, PersistError> {
        let Some(_running) = self.start_rewrite() else {
            return Ok(None);
        };
        self.compact_inner(store, now_ms)
    }

    /// Marks a rewrite of the log (a compaction or a heal) as running, or
    /// `None` if one already is: they never overlap.
    fn start_rewrite(&self) -> Option<Rewriting<'_>> {
        self.start(REWRITING)
    }

    /// Marks background work of `kind` as running, or `None` if some is.
    fn start(&self, kind: u8) -> Option<Rewriting<'_>> {
        self.busy
            .compare_exchange(IDLE, kind, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(Rewriting(&self.busy))
    }

    fn compact_inner(
        &self,
        store: &StoreLock,
        now_ms: u64,
    ) -> Result<Option<CompactionReport>, PersistError> {
        // The log seals its active segment first (fsyncs, under the log lock
        // only, so readers of the cache are not held up), then the live
        // entries are copied under the cache lock only. The copy is a state
        // at or after the boundary; replaying the records appended since the
        // boundary on top of it gives the current state, because every record
        // assigns a whole entry or removes it.
        // The groups appended before the boundary go with the old records;
        // those appended after it stay in the new generation.
        let (mut plan, _replaced, folded_before) = {
            let mut log = self.lock();
            let (plan, replaced) = log.begin_compaction()?;
            (plan, replaced, self.folded.load(Ordering::Relaxed))
        };
        let snapshot: Vec<(Key, Entry)> = store.with(|store| {
            store
                .iter()
                .filter(|(_, e)| e.expires_at.is_none_or(|at| at > now_ms))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect()
        });
        // The new records are numbered below the boundary. Each entry came
        // from a change, but a transaction's changes share one record, so
        // there can be more entries than numbers: entries then go into
        // groups, as many to a group as it takes.
        let Some(chunks) = snapshot_chunks(&snapshot, plan.boundary_seq() - 1) else {
            // Cannot happen while every entry came from a record or a group
            // of at most MAX_RECORD_BYTES; refuse rather than write records
            // out of range.
            tracing::warn!("cache log: compaction skipped, more entries than records can hold");
            return Ok(None);
        };
        let dir = &self.config.dir;
        let (plan, folded_snapshot) =
            in_background("cache-compact", COMPACTION_BYTES_PER_SEC, |pace| {
                let mut folded = 0u64;
                for (seq, chunk) in (1u64..).zip(chunks) {
                    let record = match chunk {
                        [(key, entry)] => encode_compacted(key, entry)?,
                        group => {
                            let members = group
                                .iter()
                                .map(|(k, e)| encode_compacted(k, e))
                                .collect::<Result<Vec<_>, _>>()?;
                            folded += members.len() as u64 - 1;
                            postcard::to_stdvec(&Rec::Group {
                                members: members
                                    .iter()
                                    .map(|m| serde_bytes::Bytes::new(m))
                                    .collect(),
                            })?
                        }
                    };
                    plan.push_parts(seq, now_ms, &record)?;
                    pace.wrote(record.len());
                }
                presync_compaction(dir);
                Ok((plan, folded))
            })?;
        // The switch takes the log lock: back on this thread, at normal
        // priority, so appends never wait for a deprioritised lock holder.
        let (report, superseded) = {
            let mut log = self.lock();
            let done = log.finish_compaction_keeping(plan)?;
            self.folded.fetch_sub(folded_before, Ordering::Relaxed);
            self.folded.fetch_add(folded_snapshot, Ordering::Relaxed);
            done
        };
        // Then, holding no lock, free the old generation a step at a time.
        drop(_replaced);
        let freed = superseded.release(RELEASE_STEP, RELEASE_PAUSE);
        tracing::debug!(freed, "cache log: the replaced generation is freed");
        self.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(Some(report))
    }
}

/// Splits a compaction's entries into at most `records` runs, in order: one
/// entry each when they fit, else groups. The groups are of equal count
/// where the bytes allow, else filled as far as the bytes allow (the
/// fewest runs in this order); a group holds at most [`MAX_RECORD_BYTES`]
/// less 64 bytes counted as [`Store::cost_of`], which is more than each
/// entry takes encoded with its length. `None` if they do not fit.
fn snapshot_chunks(entries: &[(Key, Entry)], records: u64) -> Option<Vec<&[(Key, Entry)]>> {
    let records = usize::try_from(records).unwrap_or(usize::MAX);
    if entries.len() <= records {
        return Some(entries.chunks(1).collect());
    }
    let cap = MAX_RECORD_BYTES as usize - 64;
    let runs = |per: usize| {
        let mut chunks = Vec::new();
        let mut start = 0;
        let mut bytes = 0usize;
        for (i, (k, e)) in entries.iter().enumerate() {
            let size = Store::cost_of(k, e);
            if i > start && (i - start == per || bytes + size > cap) {
                chunks.push(&entries[start..i]);
                start = i;
                bytes = 0;
            }
            bytes += size;
        }
        if start < entries.len() {
            chunks.push(&entries[start..]);
        }
        // (A run passes `cap` only as one entry of its own, written alone.)
        chunks
    };
    let even = runs(entries.len().div_ceil(records.max(1)));
    if even.len() <= records {
        return Some(even);
    }
    let filled = runs(usize::MAX);
    (filled.len() <= records).then_some(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_writes_to_its_rate() {
        let started = Instant::now();
        // 10 MiB at 100 MiB/s: at least 0.1 s.
        let mut pace = Pacer::new(100.0 * 1024.0 * 1024.0);
        for _ in 0..160 {
            pace.wrote(64 << 10);
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(95), "{took:?}");
        // And nothing is held back below one step.
        let started = Instant::now();
        let mut pace = Pacer::new(1.0);
        pace.wrote(PACE_STEP - 1);
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn the_compaction_thread_alone_runs_at_lower_priority() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = std::thread::spawn(|| {
            lower_priority();
            rustix::process::getpriority_process(None).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + 10).min(19));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }

    #[test]
    fn records_round_trip() {
        let owner = AgentOwner::new(b"a", b"p", b"", [7; 32]);
        let changes = [
            Change::Put {
                key: Key::Agent([1; 16]),
                entry: Entry {
                    value: Bytes::from_static(b"resp"),
                    expires_at: Some(99),
                    owner: Some(owner),
                },
            },
            Change::Put {
                key: Key::Plain(b"k".as_slice().into()),
                entry: Entry {
                    value: Bytes::from_static(b"\x00\xff"),
                    expires_at: None,
                    owner: None,
                },
            },
            Change::Remove {
                key: Key::Plain(b"k".as_slice().into()),
            },
        ];
        for c in &changes {
            let bytes = encode_changes(std::slice::from_ref(c)).unwrap().payloads;
            assert_eq!(bytes.len(), 1);
            assert_eq!(&decode(&bytes[0]).unwrap(), c);
        }
        // Pin the layout of the simplest record: variant 1, key variant 1,
        // varint length 1, "k".
        assert_eq!(
            encode_changes(&changes[2..]).unwrap().payloads,
            vec![vec![1, 1, 1, b'k']]
        );
        assert!(decode(&[9, 9]).is_err());

        // A transaction is one record holding its members' payloads
        // (variant 3, then the count), and decodes to the same group.
        let group = Change::Group(changes.to_vec());
        let encoded = encode_changes(std::slice::from_ref(&group)).unwrap();
        assert_eq!(encoded.folded, 2, "three changes in one record");
        let bytes = encoded.payloads;
        assert_eq!(bytes.len(), 1);
        assert_eq!(bytes[0][..2], [3, 3]);
        assert_eq!(decode(&bytes[0]).unwrap(), group);
        // A group inside a group is refused.
        let inner = postcard::to_stdvec(&Rec::Group {
            members: vec![serde_bytes::Bytes::new(&bytes[0])],
        })
        .unwrap();
        assert!(matches!(decode(&inner), Err(DecodeError::NestedGroup)));
    }

    fn agent_entry(value: Vec<u8>) -> (Key, Entry) {
        let owner = AgentOwner::new(b"agent", b"prompt", b"v", [3; 32]);
        let entry = Entry {
            value: Bytes::from(value),
            expires_at: Some(1234),
            owner: Some(owner),
        };
        (Key::Agent([9; 16]), entry)
    }

    fn text(len: usize) -> Vec<u8> {
        let words = ["the ", "answer ", "is ", "{\"tokens\": ", "42}, ", "and "];
        let mut out = Vec::new();
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn compaction_compresses_values_that_shrink_and_reads_them_back() {
        let (key, entry) = agent_entry(text(16 << 10));
        let packed = encode_compacted(&key, &entry).unwrap();
        assert_eq!(packed[0], 2, "variant PutLz4");
        assert!(packed.len() < entry.value.len() / 2, "{}", packed.len());
        let want = Change::Put { key, entry };
        assert_eq!(decode(&packed).unwrap(), want);
    }

    #[test]
    fn incompressible_and_small_values_stay_plain_puts() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        for value in [noise, text(COMPRESS_MIN - 1)] {
            let (key, entry) = agent_entry(value);
            let bytes = encode_compacted(&key, &entry).unwrap();
            assert_eq!(bytes, encode_put(&key, &entry).unwrap());
            assert_eq!(bytes[0], 0, "variant Put");
        }
    }

    #[test]
    fn a_damaged_compressed_value_is_an_error_not_a_panic() {
        let (key, entry) = agent_entry(text(8 << 10));
        let packed = lz4_flex::block::compress(&entry.value);
        let record = |value_lz4: &[u8], value_len: u32| {
            postcard::to_stdvec(&Rec::PutLz4 {
                key: rec_key(&key),
                value_lz4: Cow::Borrowed(value_lz4),
                value_len,
                expires_at: None,
                owner: None,
            })
            .unwrap()
        };
        let len = u32::try_from(entry.value.len()).unwrap();
        assert!(decode(&record(&packed, len)).is_ok());
        // Truncated block, wrong declared lengths, an absurd length.
        assert!(decode(&record(&packed[..packed.len() / 2], len)).is_err());
        assert!(decode(&record(&packed, len - 1)).is_err());
        assert!(decode(&record(&packed, len + 1)).is_err());
        assert!(matches!(
            decode(&record(&packed, u32::MAX)),
            Err(DecodeError::Lz4(e)) if e.contains("exceeds")
        ));
    }
}
