//! The event bus inside the daemon: opening it from the config, the NATS
//! endpoint, the `system.heartbeat`, metrics, and the control-socket side of
//! `appliancectl events ...`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use appliance_bus::server::ServerOptions;
use appliance_bus::{
    Bus, BusOptions, DlqOptions, DurableFsync, DurableOptions, Message, ReplayQuery, Retention,
    SlowConsumerPolicy, SubscribeOptions,
};
use appliance_types::config::{BusConfig, FsyncMode, SlowConsumerPolicy as CfgPolicy};
use appliance_types::control::{ControlError, ErrorCode};
use appliance_types::events::{
    ComponentBeat, DeadLetter, EventMessage, EventsRequest, EventsResponse, Heartbeat,
};
use appliance_types::health::{self, ComponentState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::health::{HealthHandle, HealthRegistry};
use crate::liveness::LivenessResponder;

/// Subject of the heartbeat.
pub const HEARTBEAT_SUBJECT: &str = "system.heartbeat";

/// How long one heartbeat publish may take before it is given up (a durable
/// subject with fsync `always` waits for the disk; a hung disk must not pile
/// up heartbeats).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bus options from the config; the durable log lives in `DATA/bus`.
pub fn options(cfg: &BusConfig, data_dir: &Path) -> BusOptions {
    let fsync = match cfg.fsync {
        FsyncMode::Always => DurableFsync::Always,
        FsyncMode::Interval => DurableFsync::Interval(Duration::from_millis(cfg.fsync_interval_ms)),
    };
    let mut durable = DurableOptions::new(data_dir.join("bus"));
    durable.subjects.clone_from(&cfg.durable_subjects);
    durable.fsync = fsync;
    durable.retention = Retention {
        max_age: (cfg.retention_secs > 0).then(|| Duration::from_secs(cfg.retention_secs)),
        max_total_bytes: Some(cfg.retention_bytes),
    };
    BusOptions {
        subscriber_queue: cfg.subscriber_queue as usize,
        slow_consumer: policy(cfg.slow_consumer),
        max_payload: cfg.max_payload as usize,
        durable: Some(durable),
        dlq: DlqOptions {
            max_attempts: cfg.dlq_max_attempts,
            backoff: Duration::from_millis(cfg.dlq_backoff_ms),
            ..DlqOptions::default()
        },
    }
}

fn policy(p: CfgPolicy) -> SlowConsumerPolicy {
    match p {
        CfgPolicy::Disconnect => SlowConsumerPolicy::Disconnect,
        CfgPolicy::DropOldest => SlowConsumerPolicy::DropOldest,
    }
}

/// NATS endpoint options from the config.
pub fn server_options(cfg: &BusConfig) -> ServerOptions {
    ServerOptions {
        max_payload: cfg.max_payload as usize,
        max_connections: cfg.max_connections as usize,
        slow_consumer: policy(cfg.slow_consumer),
        ..ServerOptions::default()
    }
}

/// Opens the bus (scanning its durable log) off the async threads.
pub async fn open(cfg: &BusConfig, data_dir: &Path) -> anyhow::Result<Bus> {
    let opts = options(cfg, data_dir);
    let dir = data_dir.join("bus");
    let (bus, report) = tokio::task::spawn_blocking(move || Bus::open(opts))
        .await
        .context("the bus opener panicked")?
        .with_context(|| {
            format!(
                "cannot open the event bus's durable log in {}",
                dir.display()
            )
        })?;
    if let Some(r) = report {
        if !r.is_clean() {
            warn!(
                bytes_lost = r.bytes_lost(),
                records_lost_at_least = r.records_lost_at_least(),
                "the bus's durable log was damaged; everything before the damage was loaded"
            );
        }
    }
    Ok(bus)
}

/// The bus component's own task: answers liveness, publishes the heartbeat,
/// and keeps the bus's health current.
pub async fn run(
    bus: Bus,
    heartbeat_every: Duration,
    registry: HealthRegistry,
    health: HealthHandle,
    started: Instant,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    // The first beat comes one period after start, when start-up is over.
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat_every,
        heartbeat_every,
    );
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
    assess(&bus, &health);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            _ = beat.tick() => {
                assess(&bus, &health);
                if in_flight.as_ref().is_some_and(|h| !h.is_finished()) {
                    warn!("the previous heartbeat is still being written; skipping one");
                    continue;
                }
                let beat = heartbeat(&registry, started);
                let bus = bus.clone();
                in_flight = Some(tokio::spawn(async move {
                    match tokio::time::timeout(HEARTBEAT_TIMEOUT, bus.publish_json(HEARTBEAT_SUBJECT, &beat)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(error = %e, "cannot publish the heartbeat"),
                        Err(_) => warn!("publishing the heartbeat took longer than {HEARTBEAT_TIMEOUT:?}"),
                    }
                }));
            }
        }
    }
    health.set(ComponentState::Starting, "shutting down");
    // Flush what the durable log holds before the daemon exits.
    if let Err(e) = bus.sync_durable().await {
        warn!(error = %e, "cannot flush the bus's durable log at shutdown");
    }
    bus.close();
}

fn assess(bus: &Bus, health: &HealthHandle) {
    let stats = bus.stats();
    match stats.durable {
        Some(d) if d.failed => health.set(
            ComponentState::Degraded,
            "the durable log failed a write or fsync; durable publishing is refused until restart",
        ),
        Some(d) => health.set(
            ComponentState::Ready,
            match (d.first_seq, d.last_seq) {
                (Some(a), Some(b)) => format!("{} durable messages stored (#{a}..#{b})", d.records),
                _ => "no durable messages stored yet".to_owned(),
            },
        ),
        None => health.set(ComponentState::Ready, "serving (no durable log)"),
    }
}

/// The heartbeat payload from the current health.
pub fn heartbeat(registry: &HealthRegistry, started: Instant) -> Heartbeat {
    let components = registry.snapshot();
    Heartbeat {
        score: health::score(&components),
        uptime_secs: started.elapsed().as_secs(),
        components: components
            .into_iter()
            .map(|c| ComponentBeat {
                name: c.name,
                state: c.state,
                reason: c.reason,
            })
            .collect(),
    }
}

/// How many events a [`DetachedPublisher`] holds while the bus is busy
/// (storage and sync publish a few per second at most; a log stuck for
/// minutes would fill it and the overflow is logged and counted).
pub const DETACHED_QUEUE: usize = 4096;

/// Publishes from callbacks that must not block (the sync and storage
/// components' event sinks). Messages go through a queue to one task on
/// the daemon's runtime, which publishes them one after the other, so they
/// take sequence numbers in the order they were handed over: a pool's
/// DEGRADED is never stored after the ONLINE that followed it. A failure is
/// logged; a full queue drops the message with a warning.
#[derive(Debug, Clone)]
pub struct DetachedPublisher {
    tx: tokio::sync::mpsc::Sender<(String, serde_json::Value)>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DetachedPublisher {
    /// A publisher onto `bus`, its task spawned on the current runtime. The
    /// task ends when the last clone of the publisher is dropped.
    pub fn new(bus: Bus) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(String, serde_json::Value)>(DETACHED_QUEUE);
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            type Publishing = std::pin::Pin<
                Box<
                    dyn std::future::Future<Output = (String, Result<(), appliance_bus::BusError>)>
                        + Send,
                >,
            >;
            fn report((subject, result): (String, Result<(), appliance_bus::BusError>)) {
                if let Err(e) = result {
                    warn!(subject, error = %e, "cannot publish an event");
                }
            }
            // Publishes still waiting for their fsync (`fsync = "always"`).
            let mut settling = futures_util::stream::FuturesUnordered::<Publishing>::new();
            loop {
                tokio::select! {
                    next = rx.recv() => {
                        let Some((subject, payload)) = next else { break };
                        let bus = bus.clone();
                        let mut publishing: Publishing = Box::pin(async move {
                            let r = bus.publish_json(&subject, &payload).await.map(|_| ());
                            (subject, r)
                        });
                        // The first poll appends the message and so takes its
                        // sequence number, here, in order; what may remain is
                        // the wait for its fsync, which runs beside the next
                        // messages' appends instead of before them.
                        let first = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(publishing.as_mut().poll(cx))
                        })
                        .await;
                        match first {
                            std::task::Poll::Ready(done) => report(done),
                            std::task::Poll::Pending => settling.push(publishing),
                        }
                    }
                    Some(done) = settling.next(), if !settling.is_empty() => report(done),
                }
            }
            while let Some(done) = settling.next().await {
                report(done);
            }
        });
        Self {
            tx,
            dropped: std::sync::Arc::default(),
        }
    }

    /// Queues `payload` for `subject`, without waiting.
    pub fn publish(&self, subject: String, payload: serde_json::Value) {
        use tokio::sync::mpsc::error::TrySendError;
        match self.tx.try_send((subject, payload)) {
            Ok(()) => {}
            Err(TrySendError::Full((subject, _))) => {
                let n = self
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                warn!(
                    subject,
                    dropped = n,
                    "event queue full ({DETACHED_QUEUE} waiting): event dropped"
                );
            }
            Err(TrySendError::Closed((subject, _))) => {
                warn!(subject, "the bus publisher has stopped: event dropped");
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Converts a bus message for the control socket, cutting a payload that
/// would not fit in `max_payload` bytes.
pub fn to_event(m: &Message, max_payload: usize) -> EventMessage {
    let h = m.headers();
    let mut headers = h.entries;
    if let Some(status) = h.status {
        headers.insert(0, ("NATS-Status".into(), status));
    }
    let cut = m.payload.len().min(max_payload);
    EventMessage {
        subject: m.subject.as_str().to_owned(),
        seq: m.seq,
        ts_ms: m.ts_ms,
        headers,
        payload: m.payload[..cut].to_vec(),
        payload_len: m.payload.len() as u64,
    }
}

fn bus_error(e: &appliance_bus::BusError) -> ControlError {
    use appliance_bus::BusError as B;
    let code = match e {
        B::InvalidSubject(_) | B::PayloadTooLarge { .. } | B::Json(_) => ErrorCode::InvalidArgument,
        B::DlqNotFound(_) => ErrorCode::NotFound,
        B::NotDurable | B::HandlerGone(_) | B::Closed => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    ControlError::new(code, e.to_string())
}

/// Where streamed answers go (the control connection).
#[allow(async_fn_in_trait)]
pub trait EventSink {
    /// Sends one answer; an error means the client is gone.
    async fn send(&mut self, r: Result<EventsResponse, ControlError>) -> std::io::Result<()>;
    /// Resolves when the client hangs up.
    async fn closed(&mut self);
}

/// Carries out one events request, streaming where the request streams.
pub async fn handle<S: EventSink>(
    bus: &Bus,
    req: EventsRequest,
    out: &mut S,
    max_payload: usize,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    match req {
        EventsRequest::Publish { subject, payload } => {
            let r = bus
                .publish(&subject, None, payload)
                .await
                .map(|ack| EventsResponse::Published { seq: ack.seq })
                .map_err(|e| bus_error(&e));
            out.send(r).await
        }
        EventsRequest::DlqList => {
            let list = bus
                .dlq_list()
                .into_iter()
                .map(|d| DeadLetter {
                    id: d.id,
                    handler: d.handler,
                    subject: d.subject,
                    error: d.error,
                    attempts: d.attempts,
                    failed_at_ms: d.failed_at_ms,
                    payload_bytes: d.payload_bytes as u64,
                })
                .collect();
            out.send(Ok(EventsResponse::DeadLetters(list))).await
        }
        EventsRequest::DlqRetry { id } => {
            let r = bus
                .dlq_retry(id)
                .await
                .map(|o| match o {
                    appliance_bus::RetryOutcome::Delivered => EventsResponse::Retried {
                        delivered: true,
                        error: String::new(),
                    },
                    appliance_bus::RetryOutcome::Failed(e) => EventsResponse::Retried {
                        delivered: false,
                        error: e,
                    },
                })
                .map_err(|e| bus_error(&e));
            out.send(r).await
        }
        EventsRequest::Replay {
            pattern,
            from_seq,
            since_ms,
            limit,
        } => {
            let q = ReplayQuery {
                pattern,
                from_seq,
                since_ms,
                limit: limit as usize,
            };
            match bus.replay(q).await {
                Err(e) => out.send(Err(bus_error(&e))).await,
                Ok(msgs) => {
                    let count = msgs.len() as u64;
                    for m in &msgs {
                        out.send(Ok(EventsResponse::Message(to_event(m, max_payload))))
                            .await?;
                    }
                    out.send(Ok(EventsResponse::End {
                        count,
                        reason: String::new(),
                    }))
                    .await
                }
            }
        }
        EventsRequest::Tail { pattern } => {
            let opts = SubscribeOptions {
                // A terminal can fall behind; it loses the oldest lines, not
                // the connection.
                slow_consumer: Some(SlowConsumerPolicy::DropOldest),
                ..SubscribeOptions::default()
            };
            let mut sub = match bus.subscribe(&pattern, opts) {
                Ok(s) => s,
                Err(e) => return out.send(Err(bus_error(&e))).await,
            };
            let mut count = 0u64;
            let reason = loop {
                tokio::select! {
                    () = shutdown.cancelled() => break "the daemon is shutting down".to_owned(),
                    () = out.closed() => {
                        debug!(count, "events tail: client hung up");
                        return Ok(());
                    }
                    m = sub.recv() => match m {
                        Ok(m) => {
                            count += 1;
                            out.send(Ok(EventsResponse::Message(to_event(&m, max_payload)))).await?;
                        }
                        Err(reason) => break reason.to_string(),
                    },
                }
            };
            out.send(Ok(EventsResponse::End { count, reason })).await
        }
    }
}

/// Bus statistics for Prometheus, read at scrape time.
#[derive(Debug)]
pub struct BusCollector {
    bus: Bus,
}

impl BusCollector {
    /// A collector over `bus`.
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }
}

type Labels = Vec<(String, String)>;

fn counter_family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let family = Family::<Labels, Counter>::default();
    for (labels, v) in rows {
        family.get_or_create(labels).inc_by(*v);
    }
    let m = enc.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(m)
}

impl Collector for BusCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.bus.stats();
        let by_subject = |f: fn(&appliance_bus::TrafficStats) -> u64| -> Vec<(Labels, u64)> {
            s.subjects
                .iter()
                .map(|(k, t)| (vec![("subject".to_owned(), k.clone())], f(t)))
                .collect()
        };
        counter_family(
            &mut enc,
            "appliance_bus_messages_published",
            "Messages published, by top-level subject token.",
            &by_subject(|t| t.messages_in),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_bytes_published",
            "Payload bytes published, by top-level subject token.",
            &by_subject(|t| t.bytes_in),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_messages_delivered",
            "Messages delivered to subscribers, by top-level subject token.",
            &by_subject(|t| t.messages_out),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_drops",
            "Messages dropped for slow consumers, by top-level subject token.",
            &by_subject(|t| t.drops),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_slow_consumers",
            "Subscribers closed as slow consumers, by top-level subject token.",
            &by_subject(|t| t.slow_consumers),
        )?;
        let by_conn = |f: fn(&appliance_bus::TrafficStats) -> u64| -> Vec<(Labels, u64)> {
            s.connections
                .iter()
                .map(|c| {
                    (
                        vec![
                            ("connection".to_owned(), c.id.to_string()),
                            ("name".to_owned(), c.name.clone().unwrap_or_default()),
                        ],
                        f(&c.traffic),
                    )
                })
                .collect()
        };
        counter_family(
            &mut enc,
            "appliance_bus_connection_messages_published",
            "Messages published by each NATS connection.",
            &by_conn(|t| t.messages_in),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_connection_messages_delivered",
            "Messages delivered to each NATS connection.",
            &by_conn(|t| t.messages_out),
        )?;
        counter_family(
            &mut enc,
            "appliance_bus_connection_drops",
            "Messages dropped for each NATS connection.",
            &by_conn(|t| t.drops),
        )?;
        let gauge = |enc: &mut DescriptorEncoder<'_>,
                     name: &str,
                     help: &str,
                     v: i64|
         -> Result<(), std::fmt::Error> {
            let g = Gauge::<i64>::default();
            g.set(v);
            let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        gauge(
            &mut enc,
            "appliance_bus_connections",
            "Open NATS connections.",
            i64::try_from(s.connections.len()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut enc,
            "appliance_bus_dlq_entries",
            "Entries in the dead-letter list.",
            i64::try_from(s.dlq_entries).unwrap_or(i64::MAX),
        )?;
        if let Some(d) = s.durable {
            gauge(
                &mut enc,
                "appliance_bus_durable_records",
                "Records in the durable log.",
                i64::try_from(d.records).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut enc,
                "appliance_bus_durable_bytes",
                "Bytes of the durable log on disk.",
                i64::try_from(d.bytes).unwrap_or(i64::MAX),
            )?;
            counter_family(
                &mut enc,
                "appliance_bus_durable_recovery_bytes_lost",
                "Bytes of the durable log lost to damage found at start-up.",
                &[(Vec::new(), d.recovery_bytes_lost)],
            )?;
            counter_family(
                &mut enc,
                "appliance_bus_durable_recovery_records_lost",
                "Records (at least) of the durable log lost to damage found at start-up.",
                &[(Vec::new(), d.recovery_records_lost)],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use appliance_bus::{BusOptions, SubscribeOptions};

    use super::*;

    /// Events handed over one after the other are stored and delivered in
    /// that order, with increasing sequence numbers, even on a runtime with
    /// several workers (one task per event raced: a later event could take
    /// the earlier sequence number).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn detached_events_keep_the_order_they_were_handed_over() {
        for fsync in [
            appliance_bus::DurableFsync::Interval(Duration::from_millis(100)),
            appliance_bus::DurableFsync::Always,
        ] {
            keep_order(fsync).await;
        }
    }

    async fn keep_order(fsync: appliance_bus::DurableFsync) {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _) = Bus::open(BusOptions {
            durable: Some(appliance_bus::DurableOptions {
                fsync,
                ..appliance_bus::DurableOptions::new(dir.path())
            }),
            ..BusOptions::default()
        })
        .unwrap();
        let mut sub = bus
            .subscribe("storage.>", SubscribeOptions::default())
            .unwrap();
        let publisher = DetachedPublisher::new(bus.clone());
        const N: u64 = 2000;
        for i in 0..N {
            publisher.publish(
                format!("storage.pool.p{}.state", i % 3),
                serde_json::json!({ "i": i }),
            );
        }
        let mut last_seq = 0;
        for want in 0..N {
            let m = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                .await
                .expect("delivered in time")
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["i"], want, "delivered out of order ({fsync:?})");
            let seq = m.seq.expect("a durable subject has a sequence number");
            assert!(seq > last_seq, "seq {seq} after {last_seq}");
            last_seq = seq;
        }
        assert_eq!(publisher.dropped(), 0);
    }
}
