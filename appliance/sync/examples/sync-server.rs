//! A stand-alone sync server for development and for the crash tests: the
//! same `serve` the daemon calls, with local admission and events logged.
//!
//! ```text
//! sync-server --identity DIR --documents DIR --listen 127.0.0.1:7443 [--keep-versions]
//! ```
//! Prints `listening <addr>` on stdout once bound; stops on SIGINT/SIGTERM.

use anyhow::Context as _;
use appliance_sync::admission::{LocalAdmission, UsageLedger};
use appliance_sync::events::{EventSink, SyncEvent};
use appliance_sync::identity::Authority;
use appliance_sync::server::{serve, ServerConfig, Services};
use appliance_sync::store::Documents;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct LogSink;

impl EventSink for LogSink {
    fn publish(&self, event: SyncEvent) {
        tracing::info!(subject = %event.subject(), ?event, "event");
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let identity = PathBuf::from(arg(&args, "--identity").context("--identity DIR is required")?);
    let documents_dir =
        PathBuf::from(arg(&args, "--documents").context("--documents DIR is required")?);
    let listen: SocketAddr = arg(&args, "--listen")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .context("--listen must be IP:PORT")?;
    let keep_versions = args.iter().any(|a| a == "--keep-versions");

    let authority = Authority::open(&identity)?;
    let ledger = UsageLedger::new();
    let documents = Arc::new(Documents::new(
        &documents_dir,
        keep_versions,
        ledger.clone(),
    )?);
    let admission = Arc::new(LocalAdmission::new(
        authority.clone(),
        ledger,
        &documents_dir,
    ));
    let services = Services {
        authority,
        documents,
        admission,
        events: Arc::new(LogSink),
    };
    let shutdown = CancellationToken::new();
    let server = serve(ServerConfig::new(listen), services, shutdown.clone()).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", server.local_addr())?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    server.wait().await;
    Ok(())
}
