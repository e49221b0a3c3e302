//! `appliancectl`: the operator's command line for `applianced`.
//!
//! It speaks the control protocol of `appliance_types::control` over the
//! daemon's Unix socket, and depends on nothing of the daemon but those types.
//!
//! Exit codes: 0 success; 1 error (including a failing probe and a daemon that
//! is not running); 2 usage.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use appliance_types::config::DEFAULT_CONTROL_SOCKET;
use appliance_types::control::{
    check_frame_len, decode_payload, encode_frame, ClientHello, ControlError, Request, Response,
    ServerHello, DEFAULT_MAX_FRAME, LEN_PREFIX,
};
use appliance_types::health::{Probe, ProbeResult, StatusReport};
use clap::{Parser, Subcommand, ValueEnum};

mod cache;
mod events;
mod storage;
mod sync;

#[derive(Debug, Parser)]
#[command(
    name = "appliancectl",
    version,
    about = "Control the storage appliance daemon"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, env = "APPLIANCE_SOCKET", default_value = DEFAULT_CONTROL_SOCKET, global = true)]
    socket: PathBuf,

    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, uptime, probes, health score, components and endpoints.
    Status,
    /// Exit 0 if the probe passes, 1 otherwise (for health checks).
    Health {
        /// Which probe.
        probe: ProbeArg,
    },
    /// Change the daemon's log filter at run time (needs admin rights).
    LogLevel {
        /// A tracing filter such as `debug` or `info,applianced=trace`.
        filter: String,
    },
    /// The event bus: publish, follow, replay, dead letters.
    #[command(subcommand)]
    Events(events::EventsCmd),
    /// The agent response cache.
    #[command(subcommand)]
    Cache(cache::CacheCmd),
    /// The QUIC sync endpoint.
    #[command(subcommand)]
    Sync(sync::SyncCmd),
    /// The storage manager: pool report, disks, quotas, scrubs, replace, create-pool.
    #[command(subcommand)]
    Storage(storage::StorageCmd),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProbeArg {
    Live,
    Ready,
    Startup,
}

impl From<ProbeArg> for Probe {
    fn from(p: ProbeArg) -> Self {
        match p {
            ProbeArg::Live => Probe::Live,
            ProbeArg::Ready => Probe::Ready,
            ProbeArg::Startup => Probe::Startup,
        }
    }
}

/// How long to wait for the daemon to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Client {
    stream: UnixStream,
    max_frame: u32,
}

impl Client {
    fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                anyhow::anyhow!(
                    "cannot reach applianced at {}: {e}. The control socket is open to root \
                     and to the group the daemon gives it (config key `control.socket_group`); \
                     run as one of them",
                    path.display()
                )
            } else {
                anyhow::anyhow!(
                    "cannot reach applianced at {}: {e}. Is the daemon running? \
                     (set --socket or APPLIANCE_SOCKET for another socket)",
                    path.display()
                )
            }
        })?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Client {
            stream,
            max_frame: DEFAULT_MAX_FRAME,
        };
        c.send(&ClientHello::new(concat!(
            "appliancectl ",
            env!("CARGO_PKG_VERSION")
        )))?;
        let payload = c.recv_payload()?;
        // The daemon answers either a ServerHello or an error response.
        match decode_payload::<ServerHello>(&payload, "server hello") {
            Ok(h) => {
                c.max_frame = h.max_frame;
                Ok(c)
            }
            Err(_) => match decode_payload::<Response>(&payload, "response") {
                Ok(Response::Error(e)) => Err(e.into()),
                _ => bail!(
                    "{} does not speak the appliance control protocol",
                    path.display()
                ),
            },
        }
    }

    pub(crate) fn send<T: serde::Serialize>(&mut self, msg: &T) -> anyhow::Result<()> {
        let frame = encode_frame(msg, self.max_frame)?;
        self.stream
            .write_all(&frame)
            .context("cannot send to applianced")
    }

    fn recv_payload(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut prefix = [0u8; LEN_PREFIX];
        if let Err(e) = self.stream.read_exact(&mut prefix) {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                let waited = self
                    .stream
                    .read_timeout()
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                bail!(
                    "applianced did not answer within {} s; the operation may still complete (check `appliancectl status`)",
                    waited.as_secs()
                );
            }
            return Err(anyhow::Error::new(e).context("applianced closed the connection"));
        }
        let len = check_frame_len(prefix, self.max_frame.max(DEFAULT_MAX_FRAME))?;
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .context("applianced closed the connection mid-answer")?;
        Ok(payload)
    }

    pub(crate) fn request(&mut self, req: &Request) -> anyhow::Result<Response> {
        self.send(req)?;
        self.next_response()
    }

    /// Reads the next response of a streamed answer; a typed error becomes
    /// an `Err`.
    pub(crate) fn next_response(&mut self) -> anyhow::Result<Response> {
        let payload = self.recv_payload()?;
        match decode_payload::<Response>(&payload, "response")? {
            Response::Error(e) => Err(e.into()),
            r => Ok(r),
        }
    }

    /// Waits up to `timeout` for each answer from now on.
    pub(crate) fn answer_within(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// Waits without a time limit (for `events tail`).
    pub(crate) fn no_read_timeout(&mut self) -> anyhow::Result<()> {
        self.stream.set_read_timeout(None)?;
        Ok(())
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mark(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

fn print_status(s: &StatusReport) {
    println!(
        "applianced {}  up {}s  health {:.2}",
        s.version, s.uptime_secs, s.score
    );
    for p in [&s.probes.live, &s.probes.ready, &s.probes.startup] {
        if p.pass {
            println!("  probe {:<8} {}", p.probe.as_str(), mark(p.pass));
        } else {
            println!(
                "  probe {:<8} {}  {}",
                p.probe.as_str(),
                mark(p.pass),
                p.reason
            );
        }
    }
    println!("components:");
    for c in &s.components {
        let req = if c.required { "" } else { " (optional)" };
        println!(
            "  {:<10} {:<11} {}{}",
            c.name,
            c.state.as_str(),
            c.reason,
            req
        );
    }
    println!("endpoints:");
    for (k, v) in &s.endpoints {
        println!("  {k:<10} {v}");
    }
}

fn print_probe(p: &ProbeResult) {
    if p.pass {
        println!("{}: pass", p.probe.as_str());
    } else {
        println!("{}: fail: {}", p.probe.as_str(), p.reason);
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(&cli.socket)?;
    match &cli.command {
        Command::Status => match client.request(&Request::Status)? {
            Response::Status(s) => {
                if cli.json {
                    print_json(&s)?;
                } else {
                    print_status(&s);
                }
                Ok(ExitCode::SUCCESS)
            }
            other => bail!("unexpected answer from applianced: {other:?}"),
        },
        Command::Health { probe } => match client.request(&Request::Health((*probe).into()))? {
            Response::Health(p) => {
                if cli.json {
                    print_json(&p)?;
                } else {
                    print_probe(&p);
                }
                Ok(if p.pass {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            other => bail!("unexpected answer from applianced: {other:?}"),
        },
        Command::LogLevel { filter } => {
            match client.request(&Request::SetLogFilter(filter.clone()))? {
                Response::Done(msg) => {
                    if cli.json {
                        print_json(&serde_json::json!({ "ok": true, "message": msg }))?;
                    } else {
                        println!("{msg}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from applianced: {other:?}"),
            }
        }
        Command::Events(cmd) => events::run(&mut client, cmd, cli.json),
        Command::Cache(cmd) => cache::run(&mut client, cmd, cli.json),
        Command::Sync(cmd) => sync::run(&mut client, cmd, cli.json),
        Command::Storage(cmd) => storage::run(&mut client, cmd, cli.json),
    }
}

/// Restores the default SIGPIPE action, so that `appliancectl ... | head`
/// ends quietly when the reader goes away, as Unix tools do (Rust ignores
/// SIGPIPE by default, which turns every later print into a panic).
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists;
    // setting a signal disposition to SIG_DFL has no other preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap exits 2 for usage errors and 0 for --help/--version.
            e.exit();
        }
    };
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            let typed = e.downcast_ref::<ControlError>().cloned();
            if cli.json {
                let doc = match typed {
                    Some(t) => {
                        serde_json::json!({ "error": { "code": t.code.as_str(), "message": t.message } })
                    }
                    None => {
                        serde_json::json!({ "error": { "code": "client", "message": format!("{e:#}") } })
                    }
                };
                println!("{doc}");
            }
            eprintln!("appliancectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
