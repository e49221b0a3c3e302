//! The Prometheus endpoint.
//!
//! A `prometheus-client` registry that components add their metrics to, plus
//! two collectors evaluated at scrape time: process metrics (CPU, memory, open
//! file descriptors, start time, threads) and the health of every component.
//! Served as text over HTTP/1.1 (hyper) at `/metrics` on a loopback address.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use appliance_types::health::{self, ComponentState};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::health::{HealthHandle, HealthRegistry};
use crate::liveness::LivenessResponder;

/// The shared registry components register into.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// A registry with the process and health collectors.
    pub fn new(health: HealthRegistry) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector::new()));
        registry.register_collector(Box::new(HealthCollector { health }));
        Self {
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    /// Lets a component register its metrics (under its own prefix).
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut r)
    }

    /// Renders the text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

/// Process metrics, read at scrape time.
#[derive(Debug)]
struct ProcessCollector {
    start_time: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self { start_time }
    }
}

fn encode_gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        {
            let tv = |t: nix::sys::time::TimeVal| {
                #[allow(clippy::cast_precision_loss)]
                let s = t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
                s
            };
            let c = ConstCounter::new(tv(usage.user_time()) + tv(usage.system_time()));
            let m = enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()
                .flatten()
                .unwrap_or(4096);
            let fields: Vec<f64> = statm
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            #[allow(clippy::cast_precision_loss)]
            let page = page as f64;
            if let [size, resident, ..] = fields[..] {
                encode_gauge(
                    &mut enc,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    size * page,
                )?;
                encode_gauge(
                    &mut enc,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    resident * page,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            #[allow(clippy::cast_precision_loss)]
            let n = dir.count() as f64;
            encode_gauge(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors.",
                n,
            )?;
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(threads) = status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|t| t.trim().parse::<f64>().ok())
            {
                encode_gauge(
                    &mut enc,
                    "process_threads",
                    "Number of OS threads.",
                    threads,
                )?;
            }
        }
        encode_gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time,
        )?;
        Ok(())
    }
}

/// Component states and the health score, read at scrape time.
#[derive(Debug)]
struct HealthCollector {
    health: HealthRegistry,
}

impl Collector for HealthCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let components = self.health.snapshot();
        encode_gauge(
            &mut enc,
            "appliance_health_score",
            "Health score from 0 (nothing serves) to 1 (all ready).",
            health::score(&components),
        )?;
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        for c in &components {
            for s in ComponentState::ALL {
                family
                    .get_or_create(&vec![
                        ("component".to_owned(), c.name.clone()),
                        ("state".to_owned(), s.as_str().to_owned()),
                    ])
                    .set(i64::from(c.state == s));
            }
        }
        let m = enc.encode_descriptor(
            "appliance_component_state",
            "1 for the state each component is in, 0 for the others.",
            None,
            family.metric_type(),
        )?;
        family.encode(m)
    }
}

async fn respond(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => match metrics.render() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                    r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                }
                r
            }
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "see /metrics\n".into()),
    }
}

/// Serves `/metrics` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    health.set(ComponentState::Ready, format!("serving /metrics on {addr}"));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        r = conn => if let Err(e) = r { debug!(%peer, error = %e, "metrics connection ended with an error") },
                        () = shutdown.cancelled() => {}
                    }
                });
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_process_and_health_metrics() {
        let health = HealthRegistry::default();
        let h = health.register("storage", false);
        h.set(ComponentState::Unavailable, "no ZFS");
        let m = Metrics::new(health);
        let text = m.render().unwrap();
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
        assert!(
            text.contains(
                r#"appliance_component_state{component="storage",state="unavailable"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"appliance_component_state{component="storage",state="ready"} 0"#),
            "{text}"
        );
        assert!(text.contains("appliance_health_score 0"), "{text}");
    }
}
