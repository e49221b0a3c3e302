//! # appliance-bus
//!
//! The appliance's event bus: publish once, fan out to every local
//! component and to stock NATS clients (nats-py, async-nats, the `nats` CLI,
//! nats.js), which connect to the NATS endpoint served by [`server::serve`].
//!
//! ## Pieces
//! * [`subject`] (sans-IO): subject and pattern validation (`*` one token,
//!   `>` one or more at the end) and matching.
//! * [`proto`] (sans-IO): the NATS client-protocol parser and the server-op
//!   encoders, with limits checked before anything is buffered.
//! * [`Bus`]: publish, subscribe with a bounded queue per subscription, queue
//!   groups, the slow-consumer policy, durable subjects, replay, statistics.
//! * [`dlq`]: handlers with retries, backoff, panic capture, dead letters.
//! * [`server`]: the NATS endpoint (TCP and Unix socket) around the codec.
//!
//! ## Fan-out and slow consumers
//! Publishing never waits for a subscriber. Each in-process subscription
//! has a queue of `subscriber_queue` messages; each NATS connection has one
//! outbound buffer bounded in bytes and messages. When a queue is full:
//! * [`SlowConsumerPolicy::Disconnect`] closes the subscriber (a NATS client
//!   gets `-ERR 'Slow Consumer'` and is disconnected), as nats-server does;
//! * [`SlowConsumerPolicy::DropOldest`] drops its oldest queued message and
//!   counts the drop (a [`dlq`] handler's subscription dead-letters it
//!   instead: see [`Bus::handle`], "Falling behind").
//!
//! In both cases the publisher and every other subscriber go on untouched.
//!
//! ## Durable subjects
//! Messages on subjects matching the durable patterns (default `storage.>`,
//! `sync.>`, `system.>`) are appended to an `appliance-record-log` (postcard
//! records with a CRC and a sequence number) **before** fan-out, so every
//! delivered durable message has a sequence number and is in the log.
//! * `DurableFsync::Always`: a dedicated thread fsyncs pending appends as a
//!   group, then fans the group out in sequence order, then acknowledges
//!   the publishers (an in-process `publish` returns, a NATS client's next
//!   `PONG` or `+OK` is sent).
//! * `DurableFsync::Interval`: append and fan-out happen inline, in sequence
//!   order (under the log's lock); the thread fsyncs on the interval.
//!
//! A durable message is never dropped for an in-process subscriber: when
//! its queue is full, the subscriber is marked *lagging* and later reads the
//! missed messages back from the log, in order, before going live again
//! (sequence numbers make this exact: nothing missed, nothing repeated).
//! `SubscribeOptions::from_seq` starts a subscription the same way. NATS
//! connections get the slow-consumer policy for every subject, as stock
//! clients expect; they can read history through [`Bus::replay`] (the
//! `appliancectl events replay` command).
//!
//! On start-up the log is scanned; a torn or corrupt tail is truncated to the
//! last good record and the loss is in the returned report and in
//! [`StatsSnapshot::durable`].
//!
//! ## Ordering
//! Messages from one publisher on one subject reach each subscriber in
//! publish order. Durable messages reach each subscriber in sequence
//! order. Between a durable and a non-durable subject there is no promise
//! (a lagging subscriber may see later non-durable messages first).

pub mod bus;
pub mod dlq;
pub mod message;
pub mod proto;
pub mod queue;
pub mod server;
pub mod stats;
pub mod subject;
mod sublist;

pub use bus::{
    Bus, BusError, BusOptions, DlqOptions, DurableFsync, DurableOptions, PublishAck, ReplayQuery,
    SubscribeOptions, Subscription, MAX_REPLAY,
};
pub use dlq::{
    is_dead_letter_subject, DlqEntry, DlqStats, DlqSummary, HandlerHandle, HandlerOptions,
    RetryOutcome, DLQ_PREFIX, DLQ_STATE_PREFIX, MAX_HANDLER_NAME, OVERFLOW_ERROR,
};
pub use message::{Headers, Message};
pub use queue::{CloseReason, SlowConsumerPolicy};
pub use stats::{ConnectionStats, DurableStats, StatsSnapshot, TrafficStats};
pub use subject::{Pattern, Subject, SubjectError};

/// Re-exported for configuring durable retention.
pub use appliance_record_log::{RecoveryReport, Retention};
