//! Command-line arguments and config loading.

use std::path::{Path, PathBuf};

use anyhow::Context;
use appliance_types::config::{Config, DEFAULT_CONFIG_PATH};
use clap::Parser;

/// `applianced` command line.
#[derive(Debug, Parser)]
#[command(name = "applianced", version, about = "The storage appliance daemon")]
pub struct Args {
    /// Config file (TOML). Default: /etc/appliance/appliance.toml when neither
    /// --config nor --state-dir is given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Run with every path (control socket, data, logs) under DIR, needing no
    /// root and no config file. Listeners default to ephemeral loopback ports.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Check the configuration, print the resolved paths, and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// Reads and validates the configuration the arguments point at.
pub fn load_config(args: &Args) -> anyhow::Result<Config> {
    let path: Option<&Path> = match (&args.config, &args.state_dir) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => Some(Path::new(DEFAULT_CONFIG_PATH)),
    };
    let Some(path) = path else {
        return Ok(Config::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    Config::from_toml(&text).with_context(|| format!("invalid config file {}", path.display()))
}
