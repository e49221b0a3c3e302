//! `applianced` binary: parses arguments, loads the config, sets up logging
//! and runs the daemon.

use std::process::ExitCode;

use applianced::cli::{load_config, Args};
use clap::Parser;

/// mimalloc: the embedded cache allocates and frees a block per SET (see appliance-cache's docs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for configuration errors (`EX_CONFIG` from sysexits.h). The
/// unit lists it in `RestartPreventExitStatus=` so a bad config does not
/// restart-loop.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("applianced: {e:#}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let resolved = config.resolve(args.state_dir.as_deref());
    if args.check_config {
        println!("config ok");
        println!("control socket: {}", resolved.control_socket.display());
        println!("data dir:       {}", resolved.data_dir.display());
        println!("log dir:        {}", resolved.log_dir.display());
        match resolved.metrics_listen {
            Some(a) => println!("metrics:        {a}"),
            None => println!("metrics:        disabled"),
        }
        return ExitCode::SUCCESS;
    }
    // Files we create are private to the daemon (the control socket gets 0660 explicitly).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let log = match applianced::logging::init(&resolved.config.log.level) {
        Ok((_, log)) => Some(log),
        Err(e) => {
            eprintln!("applianced: config key `log.level`: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("applianced: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(applianced::run(resolved, log));
    // Every task that holds state was awaited by `run`; a blocking thread
    // still parked in a read (a QUIC socket, a channel) must not hold the
    // exit back past systemd's stop timeout.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "applianced failed");
            eprintln!("applianced: {e:#}");
            ExitCode::FAILURE
        }
    }
}
