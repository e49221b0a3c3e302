//! `appliance-sync`: push, pull, list and delete documents on the appliance.
//!
//! Exit codes: 0 success, 1 error (the server's typed error in words),
//! 2 usage (clap's own code for bad arguments).
//!
//! `push` tries every file, also after one failed: an entry of a pushed
//! directory that cannot be stored (a name the appliance reserves, such as
//! an Emacs backup `notes.txt.~1~`; a socket, FIFO or device; something
//! unreadable) is skipped with a warning on stderr, a file whose upload
//! fails is reported on stderr, and the rest are pushed. The exit code is 1
//! if any file failed or was skipped. With `--json`, stdout is one object:
//! `files` lists every file in argument and directory order with its
//! `status` (`committed`, `deduplicated`: nothing needed sending,
//! `failed` with `error`, `skipped` with `reason`) and, when pushed, the
//! report (`path`, `size`, `file_hash`, `chunks`, `chunks_sent`,
//! `bytes_sent`, ...); `pushed` repeats the reports of the files on the
//! appliance, and `failed` and `skipped` count the others. Other commands
//! print `{"error": ...}` on failure.

use anyhow::Context as _;
use appliance_sync::client::{
    print_out, ClientOptions, NoProgress, Progress, PushOutcome, SyncClient,
};
use appliance_sync::identity::Bundle;
use appliance_sync_proto::RelPath;
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "appliance-sync",
    version,
    about = "Sync documents with the appliance over QUIC"
)]
struct Cli {
    /// Identity bundle written by `appliancectl sync client add`.
    #[arg(long, env = "APPLIANCE_SYNC_IDENTITY")]
    identity: PathBuf,
    /// HOST:PORT of the appliance (default: the address in the bundle).
    #[arg(long)]
    server: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload files and directories (recursively); only missing chunks are sent.
    ///
    /// Every file is tried; entries that cannot be stored (reserved names
    /// such as `name.~1~`, sockets, FIFOs) are skipped with a warning. Exits
    /// 1 if any file failed or was skipped. `--json` reports each file's
    /// status: committed, deduplicated, failed (with error) or skipped
    /// (with reason).
    Push {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Remote directory to put them in.
        #[arg(long)]
        to: Option<String>,
    },
    /// Download a file, verified against its hash.
    Pull {
        remote: String,
        local: Option<PathBuf>,
    },
    /// List files (sizes, hashes, mtimes).
    Ls { dir: Option<String> },
    /// Delete a file.
    Rm { path: String },
    /// Quota and usage.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APPLIANCE_SYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("appliance-sync: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<PushIncomplete>() => {
            // Each file's outcome is already printed (stdout and stderr).
            eprintln!("appliance-sync: {e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            if json {
                let text = serde_json::json!({ "error": format!("{e:#}") }).to_string();
                print_out(format!("{text}\n").as_bytes());
            }
            eprintln!("appliance-sync: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `$XDG_CACHE_HOME/appliance-sync/digests` (or `~/.cache/...`): file
/// digests kept between runs so an unchanged file is not re-read.
fn default_digest_cache() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("appliance-sync").join("digests"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bundle = Bundle::load(&cli.identity)?;
    let options = ClientOptions {
        digest_cache: default_digest_cache(),
        ..ClientOptions::default()
    };
    let client = SyncClient::connect(&bundle, cli.server.as_deref(), options)
        .await
        .context("cannot reach the appliance")?;
    let result = command(&client, cli.command, cli.json).await;
    client.close().await;
    result
}

fn emit(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        print_out(format!("{value}\n").as_bytes());
    } else if !text.is_empty() {
        print_out(format!("{text}\n").as_bytes());
    }
}

async fn command(client: &SyncClient, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Push { paths, to } => {
            let to = to
                .as_deref()
                .map(|t| RelPath::parse(t.trim_end_matches('/')))
                .transpose()
                .context("--to is not a valid remote directory")?;
            let progress: Arc<dyn Progress> = if std::io::stderr().is_terminal() && !json {
                Arc::new(Bars::default())
            } else if json {
                Arc::new(NoProgress)
            } else {
                Arc::new(Lines)
            };
            let outcomes = client.push_each(&paths, to.as_ref(), progress).await;
            report_push(json, &outcomes)?;
        }
        Command::Pull { remote, local } => {
            let report = client.pull(&remote, local.as_deref()).await?;
            let text = format!(
                "{} -> {}  {} bytes, blake3 {}",
                report.path,
                report.local.display(),
                report.size,
                report.file_hash
            );
            emit(json, &serde_json::json!({ "pulled": report }), &text);
        }
        Command::Ls { dir } => {
            let entries = client.list(dir.as_deref()).await?;
            let values: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "path": e.path,
                        "size": e.size,
                        "blake3": e.file_hash.to_string(),
                        "mtime": e.mtime.secs,
                        "mtime_nanos": e.mtime.nanos,
                    })
                })
                .collect();
            let text = entries
                .iter()
                .map(|e| {
                    format!(
                        "{:>12}  {}  {}  {}",
                        e.size, e.mtime.secs, e.file_hash, e.path
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            emit(json, &serde_json::json!({ "entries": values }), &text);
        }
        Command::Rm { path } => {
            client.delete(&path).await?;
            emit(
                json,
                &serde_json::json!({ "deleted": path }),
                &format!("deleted {path}"),
            );
        }
        Command::Status => {
            let s = client.status().await?;
            let quota = s.quota.map_or("none".to_owned(), |q| q.to_string());
            emit(
                json,
                &serde_json::json!({
                    "used": s.used, "available": s.available, "quota": s.quota, "files": s.files
                }),
                &format!(
                    "files {}\nused {} bytes\navailable {} bytes\nquota {quota}",
                    s.files, s.used, s.available
                ),
            );
        }
    }
    Ok(())
}

/// Some files of a push were not pushed (each was reported already).
#[derive(Debug, thiserror::Error)]
#[error("{failed} file(s) failed and {skipped} skipped of {total}")]
struct PushIncomplete {
    failed: usize,
    skipped: usize,
    total: usize,
}

/// Prints what happened to each file of a push (see the module docs) and
/// fails with [`PushIncomplete`] if any file was not pushed.
fn report_push(json: bool, outcomes: &[PushOutcome]) -> Result<(), PushIncomplete> {
    let mut lines = Vec::new();
    let mut reports = Vec::new();
    let (mut failed, mut skipped) = (0, 0);
    for outcome in outcomes {
        match outcome {
            PushOutcome::Pushed(r) => {
                lines.push(format!(
                    "{}  {} bytes, sent {} of {} chunks ({} bytes){}",
                    r.path,
                    r.size,
                    r.chunks_sent,
                    r.chunks,
                    r.bytes_sent,
                    if r.deduplicated() {
                        ", deduplicated"
                    } else {
                        ""
                    }
                ));
                reports.push(r);
            }
            PushOutcome::Failed { local, error, .. } => {
                failed += 1;
                eprintln!("appliance-sync: failed {}: {error}", local.display());
            }
            PushOutcome::Skipped { local, reason } => {
                skipped += 1;
                eprintln!(
                    "appliance-sync: warning: skipped {}: {reason}",
                    local.display()
                );
            }
        }
    }
    let sent: u64 = reports.iter().map(|r| r.bytes_sent).sum();
    let total: u64 = reports.iter().map(|r| r.size).sum();
    let mut summary = format!(
        "{} file(s), {total} bytes, {sent} bytes sent",
        reports.len()
    );
    if failed + skipped > 0 {
        summary.push_str(&format!("; {failed} failed, {skipped} skipped"));
    }
    lines.push(summary);
    let value = serde_json::json!({
        "files": outcomes.iter().map(PushOutcome::to_json).collect::<Vec<_>>(),
        "pushed": reports,
        "failed": failed,
        "skipped": skipped,
    });
    emit(json, &value, &lines.join("\n"));
    if failed + skipped > 0 {
        return Err(PushIncomplete {
            failed,
            skipped,
            total: outcomes.len(),
        });
    }
    Ok(())
}

/// Plain progress lines for a non-terminal stderr.
struct Lines;

impl Progress for Lines {
    fn file_started(&self, path: &str, size: u64, to_send: u64) {
        eprintln!("push {path}: {size} bytes, {to_send} to send");
    }
    fn sent(&self, _path: &str, _bytes: u64) {}
    fn file_finished(&self, path: &str, ok: bool) {
        eprintln!("push {path}: {}", if ok { "done" } else { "failed" });
    }
}

/// indicatif bars with rate and ETA, one per file in flight.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn file_started(&self, path: &str, _size: u64, to_send: u64) {
        let bar = self.multi.add(ProgressBar::new(to_send));
        let style = ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(path.to_owned());
        self.bars.lock().insert(path.to_owned(), bar);
    }
    fn sent(&self, path: &str, bytes: u64) {
        if let Some(bar) = self.bars.lock().get(path) {
            bar.inc(bytes);
        }
    }
    fn file_finished(&self, path: &str, ok: bool) {
        if let Some(bar) = self.bars.lock().remove(path) {
            if ok {
                bar.finish();
            } else {
                bar.abandon_with_message(format!("{path} (failed)"));
            }
        }
    }
}
