//! Event-bus messages as the control protocol carries them, and the payloads
//! of the events the daemon itself publishes.

use serde::{Deserialize, Serialize};

use crate::health::ComponentState;

/// One bus message, as `appliancectl events tail|replay` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    /// Subject.
    pub subject: String,
    /// Sequence number in the durable log (durable subjects only).
    pub seq: Option<u64>,
    /// Publish time, unix milliseconds.
    pub ts_ms: u64,
    /// NATS-style headers, if any.
    pub headers: Vec<(String, String)>,
    /// The payload (JSON for the appliance's own events).
    pub payload: Vec<u8>,
    /// The payload's full length; larger than `payload.len()` when the
    /// payload was cut to fit a control frame.
    pub payload_len: u64,
}

/// Requests about the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventsRequest {
    /// Publish one message. Mutating.
    Publish {
        /// Subject (no wildcards).
        subject: String,
        /// Payload bytes.
        payload: Vec<u8>,
    },
    /// Stored messages of durable subjects matching `pattern`, streamed as
    /// [`EventsResponse::Message`] frames and closed by [`EventsResponse::End`].
    Replay {
        /// Subject pattern.
        pattern: String,
        /// Start at this sequence number.
        from_seq: Option<u64>,
        /// Or at this time (unix ms).
        since_ms: Option<u64>,
        /// At most this many messages.
        limit: u32,
    },
    /// Follow live messages matching `pattern` until the client hangs up:
    /// [`EventsResponse::Message`] frames, and [`EventsResponse::End`] if the
    /// daemon stops first.
    Tail {
        /// Subject pattern.
        pattern: String,
    },
    /// The dead-letter list.
    DlqList,
    /// Hand one dead letter to its handler again. Mutating.
    DlqRetry {
        /// Entry id from the list.
        id: u64,
    },
}

impl EventsRequest {
    /// Whether the request changes the appliance.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            EventsRequest::Publish { .. } | EventsRequest::DlqRetry { .. }
        )
    }
}

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Entry id.
    pub id: u64,
    /// The handler that failed.
    pub handler: String,
    /// The original subject.
    pub subject: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was dead-lettered (unix ms).
    pub failed_at_ms: u64,
    /// Payload size.
    pub payload_bytes: u64,
}

/// Answers about the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventsResponse {
    /// A publish was accepted (and, for a durable subject, stored as `seq`).
    Published {
        /// Sequence number for durable subjects.
        seq: Option<u64>,
    },
    /// One message of a replay or tail.
    Message(EventMessage),
    /// The end of a replay or tail.
    End {
        /// Messages sent.
        count: u64,
        /// Why it ended (empty for a completed replay).
        reason: String,
    },
    /// The dead-letter list.
    DeadLetters(Vec<DeadLetter>),
    /// A retry's outcome: delivered, or failed again with this error.
    Retried {
        /// Whether the handler succeeded this time.
        delivered: bool,
        /// The new error when it did not.
        error: String,
    },
}

/// Payload of `system.heartbeat`: what the monitor's health sparklines plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Health score, 0.0 ..= 1.0.
    pub score: f64,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Each component's state and reason.
    pub components: Vec<ComponentBeat>,
}

/// One component in a [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentBeat {
    /// Component name.
    pub name: String,
    /// Its state.
    pub state: ComponentState,
    /// Why.
    pub reason: String,
}
