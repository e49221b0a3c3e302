//! Benchmark: our NATS endpoint against `nats-server`, with the same client
//! (async-nats) on the same machine in one run.
//!
//! ```text
//! cargo run --release -p appliance-bus --example nats_bench -- [MESSAGES] [RATE] [ROUNDS]
//! ```
//! Each round runs every target once, in turn (so slow drift of the
//! machine hits all of them alike); the table shows the median of each
//! figure over ROUNDS (default 3) rounds, and each round is printed to
//! stderr.
//! One publisher and three subscribers, 128-byte messages. Two phases per
//! target:
//! * throughput: MESSAGES (default 200000) published as fast as the client
//!   goes; figure = deliveries per second (3 per message) until the last
//!   subscriber has all of them;
//! * latency: 20000 messages at RATE per second (default 20000), each carrying
//!   its send time; figure = publish→deliver p50 and p99 over all deliveries.
//!
//! Targets: `nats-server` (Debian package, started here on 127.0.0.1), our
//! endpoint, and our endpoint on a durable subject with fsync `interval`
//! (100 ms). Our server runs on its own 2-thread runtime, like a separate
//! process would. Needs `nats-server` on PATH for the first row.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use appliance_bus::server::{serve, ServerOptions};
use appliance_bus::{Bus, BusOptions, DurableFsync, DurableOptions};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

const SUBSCRIBERS: usize = 3;
const SIZE: usize = 128;
const LATENCY_MESSAGES: usize = 20_000;

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

async fn next(s: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *s), cx))
        .await
}

struct Phase {
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

/// Publishes `n` messages (at `rate` per second, or flat out) to three
/// subscribers; returns the time until all were delivered and every latency.
async fn phase(url: &str, subject: &str, n: usize, rate: Option<u64>) -> Phase {
    let mut subs = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        // The client drops messages past its per-subscription channel
        // (64k by default); make room for a whole burst.
        let c = async_nats::ConnectOptions::new()
            .subscription_capacity(n + 1024)
            .connect(url)
            .await
            .unwrap();
        let mut s = c.subscribe(subject.to_owned()).await.unwrap();
        let ready = ready_tx.clone();
        subs.push(tokio::spawn(async move {
            let _keep = c;
            let mut lat = Vec::with_capacity(n);
            let mut warmed = false;
            while lat.len() < n {
                let m = tokio::time::timeout(Duration::from_secs(30), next(&mut s))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("delivery stalled after {} of {n} messages", lat.len())
                    })
                    .expect("subscription ended");
                if m.payload.len() != SIZE {
                    if !warmed {
                        warmed = true;
                        ready.send(()).await.unwrap();
                    }
                    continue;
                }
                let mut t = [0u8; 8];
                t.copy_from_slice(&m.payload[..8]);
                lat.push(now_ns().saturating_sub(u64::from_le_bytes(t)));
            }
            lat
        }));
    }
    drop(ready_tx);
    let p = async_nats::connect(url).await.unwrap();
    // Warm up until every subscription is live at the server.
    let mut ready = 0;
    while ready < SUBSCRIBERS {
        p.publish(subject.to_owned(), Bytes::from_static(b"w"))
            .await
            .unwrap();
        p.flush().await.unwrap();
        while let Ok(Some(())) =
            tokio::time::timeout(Duration::from_millis(50), ready_rx.recv()).await
        {
            ready += 1;
        }
    }
    let start = Instant::now();
    let mut body = vec![0u8; SIZE];
    for i in 0..n {
        if let Some(r) = rate {
            let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / r);
            tokio::time::sleep_until(due.into()).await;
        }
        body[..8].copy_from_slice(&now_ns().to_le_bytes());
        p.publish(subject.to_owned(), Bytes::copy_from_slice(&body))
            .await
            .unwrap();
        if rate.is_some() {
            p.flush().await.unwrap();
        }
    }
    p.flush().await.unwrap();
    let mut latencies_ns = Vec::with_capacity(n * SUBSCRIBERS);
    for s in subs {
        latencies_ns.extend(s.await.unwrap());
    }
    Phase {
        elapsed: start.elapsed(),
        latencies_ns,
    }
}

struct Row {
    name: &'static str,
    msgs_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn pct(v: &mut [u64], q: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1000.0
}

async fn measure(name: &'static str, url: &str, subject: &str, n: usize, rate: u64) -> Row {
    let t = phase(url, subject, n, None).await;
    let msgs_per_sec = (n * SUBSCRIBERS) as f64 / t.elapsed.as_secs_f64();
    let mut l = phase(url, subject, LATENCY_MESSAGES, Some(rate))
        .await
        .latencies_ns;
    Row {
        name,
        msgs_per_sec,
        p50_us: pct(&mut l, 0.50),
        p99_us: pct(&mut l, 0.99),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Our endpoint on its own runtime (2 worker threads), like a process.
fn start_ours(
    durable: Option<std::path::PathBuf>,
) -> (SocketAddr, CancellationToken, std::thread::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let token = stop.clone();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bus-server")
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let durable = durable.map(|dir| {
                let mut d = DurableOptions::new(dir);
                d.subjects = vec!["storage.>".into()];
                d.fsync = DurableFsync::Interval(Duration::from_millis(100));
                d
            });
            let (bus, _) = Bus::open(BusOptions {
                durable,
                ..BusOptions::default()
            })
            .unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            serve(bus.clone(), l, ServerOptions::default(), token)
                .await
                .unwrap();
            bus.close();
        });
    });
    (rx.recv().unwrap(), stop, h)
}

/// Median of the figures of one target over the rounds.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round: `nats-server` (if installed), ours, ours durable.
async fn round(n: usize, rate: u64, rows: &mut Vec<Row>) {
    let port = free_port();
    match Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            let url = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(&url).await.is_err() {
                assert!(Instant::now() < deadline, "nats-server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rows.push(measure("nats-server", &url, "bench.x", n, rate).await);
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(e) => {
            eprintln!("nats-server not started ({e}); install the Debian package nats-server");
        }
    }

    let (addr, stop, h) = start_ours(None);
    rows.push(measure("appliance-bus", &addr.to_string(), "bench.x", n, rate).await);
    stop.cancel();
    h.join().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, h) = start_ours(Some(dir.path().to_path_buf()));
    rows.push(
        measure(
            "appliance-bus durable (fsync interval 100ms)",
            &addr.to_string(),
            "storage.bench",
            n,
            rate,
        )
        .await,
    );
    stop.cancel();
    h.join().unwrap();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let rate: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    let mut all = Vec::new();
    for r in 0..rounds {
        let mut rows = Vec::new();
        round(n, rate, &mut rows).await;
        eprintln!("round {}/{rounds}:", r + 1);
        for row in &rows {
            eprintln!(
                "  {}: {:.0} deliveries/s, p50 {:.1} µs, p99 {:.1} µs",
                row.name, row.msgs_per_sec, row.p50_us, row.p99_us
            );
        }
        all.extend(rows);
    }
    // Medians per target, in the order the targets ran.
    let mut rows: Vec<Row> = Vec::new();
    for name in all.iter().map(|r| r.name) {
        if rows.iter().any(|r| r.name == name) {
            continue;
        }
        let of =
            |f: fn(&Row) -> f64| median(all.iter().filter(|r| r.name == name).map(f).collect());
        rows.push(Row {
            name,
            msgs_per_sec: of(|r| r.msgs_per_sec),
            p50_us: of(|r| r.p50_us),
            p99_us: of(|r| r.p99_us),
        });
    }

    println!();
    println!("1 publisher, {SUBSCRIBERS} subscribers, {SIZE}-byte messages, async-nats client; throughput over {n} messages, latency at {rate} msg/s; medians of {rounds} rounds (targets alternate within each round)");
    println!("| target | deliveries/s | p50 µs | p99 µs | vs nats-server (throughput) |");
    println!("|---|---:|---:|---:|---:|");
    let base = rows
        .iter()
        .find(|r| r.name == "nats-server")
        .map(|r| r.msgs_per_sec);
    for r in &rows {
        let ratio = base.map_or("-".into(), |b| format!("{:.2}x", r.msgs_per_sec / b));
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {} |",
            r.name, r.msgs_per_sec, r.p50_us, r.p99_us, ratio
        );
    }
    if let (Some(plain), Some(dur)) = (rows.iter().find(|r| r.name == "appliance-bus"), rows.last())
    {
        println!(
            "durable / non-durable throughput: {:.2}x",
            dur.msgs_per_sec / plain.msgs_per_sec
        );
    }
}
