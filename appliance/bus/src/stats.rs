//! Counters per top-level subject token and per connection, and plain
//! snapshot structs for the daemon to export (Prometheus, `appliancectl`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Serialize;

/// Distinct top-level tokens tracked; the rest are counted under
/// [`OTHER_SUBJECTS`], so a client inventing subjects cannot grow the map
/// (or a metrics label set) without bound.
pub const MAX_TRACKED_SUBJECTS: usize = 256;
/// Bucket for top-level tokens beyond [`MAX_TRACKED_SUBJECTS`].
pub const OTHER_SUBJECTS: &str = "_other";

/// Live counters (atomics).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub drops: AtomicU64,
    pub slow_consumers: AtomicU64,
}

impl Counters {
    pub fn publish(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn deliver(&self, bytes: usize) {
        self.deliver_many(1, bytes);
    }
    /// `n` deliveries of a message of `bytes` bytes.
    pub fn deliver_many(&self, n: usize, bytes: usize) {
        if n > 0 {
            self.messages_out.fetch_add(n as u64, Ordering::Relaxed);
            self.bytes_out
                .fetch_add((n * bytes) as u64, Ordering::Relaxed);
        }
    }
    pub fn drop_one(&self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
    pub fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> TrafficStats {
        TrafficStats {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            slow_consumers: self.slow_consumers.load(Ordering::Relaxed),
        }
    }
}

/// Message counts. `in` is published, `out` is delivered (one per
/// subscriber that got it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrafficStats {
    /// Messages published.
    pub messages_in: u64,
    /// Payload bytes published.
    pub bytes_in: u64,
    /// Messages delivered.
    pub messages_out: u64,
    /// Payload bytes delivered.
    pub bytes_out: u64,
    /// Messages dropped for slow consumers (drop-oldest policy, or not delivered).
    pub drops: u64,
    /// Subscribers or connections closed as slow consumers.
    pub slow_consumers: u64,
}

/// One connection's numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionStats {
    /// Connection id (as in `INFO client_id`).
    pub id: u64,
    /// Peer address.
    pub peer: String,
    /// Client name from `CONNECT`.
    pub name: Option<String>,
    /// Subscriptions held.
    pub subscriptions: usize,
    /// Counts (in: published by it, out: delivered to it).
    pub traffic: TrafficStats,
}

/// The durable log's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DurableStats {
    /// Records in the log.
    pub records: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Lowest stored sequence number.
    pub first_seq: Option<u64>,
    /// Highest stored sequence number.
    pub last_seq: Option<u64>,
    /// fsyncs done by the bus.
    pub fsyncs: u64,
    /// Bytes lost to damage found when the log was opened.
    pub recovery_bytes_lost: u64,
    /// Records lost (at least) to damage found when the log was opened.
    pub recovery_records_lost: u64,
    /// Whether a write or fsync failed (durable publishing then fails).
    pub failed: bool,
}

/// Everything, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Per top-level subject token (`storage`, `sync`, ...).
    pub subjects: BTreeMap<String, TrafficStats>,
    /// Sum over subjects.
    pub total: TrafficStats,
    /// Per NATS connection.
    pub connections: Vec<ConnectionStats>,
    /// In-process subscriptions.
    pub local_subscriptions: usize,
    /// The durable log, when configured.
    pub durable: Option<DurableStats>,
    /// Entries in the dead-letter list.
    pub dlq_entries: usize,
}

/// Registry of per-subject counters.
#[derive(Debug, Default)]
pub(crate) struct SubjectCounters {
    /// Looked up for every published message (see the match cache).
    map: RwLock<HashMap<Box<str>, Arc<Counters>, foldhash::fast::RandomState>>,
}

impl SubjectCounters {
    pub fn get(&self, top: &str) -> Arc<Counters> {
        if let Some(c) = self.map.read().get(top) {
            return c.clone();
        }
        let mut map = self.map.write();
        let key = if map.len() >= MAX_TRACKED_SUBJECTS && !map.contains_key(top) {
            OTHER_SUBJECTS
        } else {
            top
        };
        map.entry(key.into()).or_default().clone()
    }

    pub fn snapshot(&self) -> BTreeMap<String, TrafficStats> {
        self.map
            .read()
            .iter()
            .map(|(k, v)| (k.to_string(), v.snapshot()))
            .collect()
    }
}

/// Per-connection counters, shared with the server.
#[derive(Debug, Default)]
pub(crate) struct ConnCounters {
    pub counters: Counters,
    pub slow: AtomicBool,
}

impl ConnCounters {
    pub fn snapshot(&self) -> TrafficStats {
        self.counters.snapshot()
    }
}

pub(crate) fn sum(map: &BTreeMap<String, TrafficStats>) -> TrafficStats {
    map.values()
        .fold(TrafficStats::default(), |a, b| TrafficStats {
            messages_in: a.messages_in + b.messages_in,
            bytes_in: a.bytes_in + b.bytes_in,
            messages_out: a.messages_out + b.messages_out,
            bytes_out: a.bytes_out + b.bytes_out,
            drops: a.drops + b.drops,
            slow_consumers: a.slow_consumers + b.slow_consumers,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_map_is_bounded() {
        let s = SubjectCounters::default();
        for i in 0..(MAX_TRACKED_SUBJECTS + 50) {
            s.get(&format!("t{i}")).publish(1);
        }
        let snap = s.snapshot();
        assert_eq!(snap.len(), MAX_TRACKED_SUBJECTS + 1);
        assert_eq!(snap[OTHER_SUBJECTS].messages_in, 50);
        assert_eq!(sum(&snap).messages_in, (MAX_TRACKED_SUBJECTS + 50) as u64);
    }
}
