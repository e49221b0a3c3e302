//! Sync events for the document vault's status, published through a small
//! [`EventSink`] the daemon implements over the bus.

use crate::identity::ClientName;
use parking_lot::Mutex;
use std::net::SocketAddr;

/// One event. [`SyncEvent::subject`] gives its bus subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// A manifest was admitted; chunks are being requested.
    UploadStarted {
        client: ClientName,
        path: String,
        size: u64,
    },
    /// The document is durable and visible.
    UploadCompleted {
        client: ClientName,
        path: String,
        size: u64,
        /// Chunk bytes actually received (after deduplication).
        bytes_transferred: u64,
    },
    /// The upload ended without a document (refused, failed or abandoned).
    UploadFailed {
        client: ClientName,
        path: String,
        size: u64,
        bytes_transferred: u64,
        error: String,
    },
    /// A client completed the handshake.
    ClientConnected {
        client: ClientName,
        remote: SocketAddr,
    },
    /// A client's connection ended.
    ClientDisconnected { client: ClientName, reason: String },
}

impl SyncEvent {
    /// `sync.upload.<client>.started|completed|failed` or
    /// `sync.client.<client>.connected|disconnected`. Client names are
    /// valid subject tokens by construction (no dots, no wildcards).
    pub fn subject(&self) -> String {
        match self {
            SyncEvent::UploadStarted { client, .. } => format!("sync.upload.{client}.started"),
            SyncEvent::UploadCompleted { client, .. } => format!("sync.upload.{client}.completed"),
            SyncEvent::UploadFailed { client, .. } => format!("sync.upload.{client}.failed"),
            SyncEvent::ClientConnected { client, .. } => format!("sync.client.{client}.connected"),
            SyncEvent::ClientDisconnected { client, .. } => {
                format!("sync.client.{client}.disconnected")
            }
        }
    }

    /// The client concerned.
    pub fn client(&self) -> &ClientName {
        match self {
            SyncEvent::UploadStarted { client, .. }
            | SyncEvent::UploadCompleted { client, .. }
            | SyncEvent::UploadFailed { client, .. }
            | SyncEvent::ClientConnected { client, .. }
            | SyncEvent::ClientDisconnected { client, .. } => client,
        }
    }
}

/// Where events go. Must not block: called from the connection tasks.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    fn publish(&self, event: SyncEvent);
}

/// Drops every event (a server without a bus).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn publish(&self, _event: SyncEvent) {}
}

/// Keeps every event in memory (tests, diagnostics).
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<SyncEvent>>,
}

impl MemorySink {
    /// A copy of the events so far.
    pub fn events(&self) -> Vec<SyncEvent> {
        self.events.lock().clone()
    }
}

impl EventSink for MemorySink {
    fn publish(&self, event: SyncEvent) {
        self.events.lock().push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        let client = ClientName::parse("alice").unwrap();
        let e = SyncEvent::UploadFailed {
            client: client.clone(),
            path: "a".into(),
            size: 1,
            bytes_transferred: 0,
            error: "x".into(),
        };
        assert_eq!(e.subject(), "sync.upload.alice.failed");
        let e = SyncEvent::ClientDisconnected {
            client,
            reason: "bye".into(),
        };
        assert_eq!(e.subject(), "sync.client.alice.disconnected");
    }
}
