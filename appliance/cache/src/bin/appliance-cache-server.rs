//! Stand-alone RESP endpoint over a persistent cache: for benchmarks, the
//! kill -9 durability test and manual poking with redis-cli. The appliance
//! itself serves the cache from `applianced`.
//!
//! ```text
//! appliance-cache-server --listen 127.0.0.1:7379 --dir /tmp/cache-log \
//!     [--fsync always|interval:MS] [--capacity-bytes N] [--max-value-bytes N]
//!     [--worker-threads N]
//! ```
//! Prints `listening on ADDR` once bound; stops on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use appliance_cache::{serve, Cache, CacheConfig, Fsync, PersistConfig, ServerConfig};
use clap::Parser;

/// mimalloc rather than glibc malloc: every SET allocates its value and
/// frees the one it replaces, and for 16 KiB values glibc's `_int_malloc` /
/// `_int_free` were about 10% of the server's CPU time (redis-server links
/// jemalloc for the same reason). Built with `no_thp`: by default mimalloc
/// asks for transparent huge pages on its memory, and with the kernel's
/// THP defrag policy `madvise` a fault in such memory may compact memory
/// synchronously to find 2 MiB; in the slow runs of 16 KiB SETs on a fresh
/// server, 17% of the server's time was zeroing huge pages in those faults
/// (perf: `do_huge_pmd_anonymous_page` -> `clear_page_rep`), against 2%
/// in the fast ones. redis-server turns THP off for itself for the same
/// latency reason (`disable-thp yes`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "RESP endpoint over a persistent appliance cache")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7379")]
    listen: SocketAddr,
    /// Log directory; without it the cache is memory-only.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// `always` or `interval:MS`.
    #[arg(long, default_value = "always")]
    fsync: String,
    /// Memory bound in bytes.
    #[arg(long, default_value_t = appliance_cache::cache::DEFAULT_CAPACITY_BYTES)]
    capacity_bytes: usize,
    /// Runtime worker threads; 0 runs everything on the main thread. One by
    /// default, like redis-server: the box has two cores and a client or
    /// the rest of the appliance needs the other. `fdatasync` runs on the
    /// log's own thread, so a batch waiting for it never stalls the others.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Largest value in bytes.
    #[arg(long, default_value_t = appliance_cache::cache::DEFAULT_MAX_VALUE_BYTES)]
    max_value_bytes: usize,
}

fn parse_fsync(s: &str) -> anyhow::Result<Fsync> {
    if s == "always" {
        return Ok(Fsync::Always);
    }
    if let Some(ms) = s.strip_prefix("interval:") {
        return Ok(Fsync::IntervalMs(
            ms.parse().context("interval milliseconds")?,
        ));
    }
    bail!("--fsync must be `always` or `interval:MS`, not {s:?}")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = if args.worker_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = CacheConfig {
        capacity_bytes: args.capacity_bytes,
        max_value_bytes: args.max_value_bytes,
        ..CacheConfig::default()
    };
    let cache = match &args.dir {
        Some(dir) => {
            let mut p = PersistConfig::new(dir);
            p.fsync = parse_fsync(&args.fsync)?;
            let (cache, report) = Cache::open(config, p)
                .with_context(|| format!("opening the cache log in {}", dir.display()))?;
            eprintln!(
                "loaded {} entries from {} records in {:?} ({} bytes lost, at least {} records lost, {} undecodable, {} expired)",
                report.entries,
                report.records_read,
                report.elapsed,
                report.recovery.bytes_lost(),
                report.recovery.records_lost_at_least(),
                report.undecodable,
                report.expired
            );
            cache
        }
        None => Cache::new(config),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let shutdown = async {
        let terminate = tokio::signal::unix::SignalKind::terminate();
        let Ok(mut term) = tokio::signal::unix::signal(terminate) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    serve(listener, Arc::new(cache), ServerConfig::default(), shutdown).await?;
    Ok(())
}
