//! Where events go: a small trait the daemon implements over the bus.

use std::sync::Mutex;

use appliance_types::storage::StorageEvent;

/// Publishes storage events. The daemon implements it over the bus
/// (`subject()` and the JSON payload of the inner event); tests collect.
///
/// `publish` must not block: the manager calls it from its actor loop. A
/// bus with bounded queues should enqueue or count a drop, never wait.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Publishes one event.
    fn publish(&self, event: &StorageEvent);
}

/// The subject and JSON payload of an event, for a bus that takes
/// `(subject, serde_json::Value)`: the payload is the inner event struct
/// (`{"pool": "tank", "new_state": "DEGRADED", ...}`), without the enum tag,
/// since the subject already says what it is.
pub fn subject_and_payload(event: &StorageEvent) -> (String, serde_json::Value) {
    let payload = match event {
        StorageEvent::PoolState(e) => serde_json::to_value(e),
        StorageEvent::Disk(e) => serde_json::to_value(e),
        StorageEvent::Scrub(e) | StorageEvent::Resilver(e) => serde_json::to_value(e),
        StorageEvent::PoolHealthy(e) => serde_json::to_value(e),
        StorageEvent::Quota(e) => serde_json::to_value(e),
    };
    // These types serialise infallibly (no maps with non-string keys); a
    // failure would still publish the subject with a null payload.
    (event.subject(), payload.unwrap_or(serde_json::Value::Null))
}

/// An [`EventSink`] that keeps every event (tests, and the daemon before the
/// bus is up).
#[derive(Debug, Default)]
pub struct CollectingSink {
    events: Mutex<Vec<StorageEvent>>,
}

impl CollectingSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the events collected so far.
    pub fn take(&self) -> Vec<StorageEvent> {
        match self.events.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    /// A copy of the events collected so far.
    pub fn snapshot(&self) -> Vec<StorageEvent> {
        match self.events.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl EventSink for CollectingSink {
    fn publish(&self, event: &StorageEvent) {
        match self.events.lock() {
            Ok(mut v) => v.push(event.clone()),
            Err(p) => p.into_inner().push(event.clone()),
        }
    }
}
