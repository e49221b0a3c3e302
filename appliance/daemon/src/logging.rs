//! Logging through `tracing`.
//!
//! Under systemd (`JOURNAL_STREAM` set) events go to journald as structured
//! fields (`tracing-journald`); otherwise human-readable lines go to stderr.
//! The filter comes from `RUST_LOG` when set, else from `log.level`, and can be
//! changed at run time through the control socket ([`LogControl`]).

use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter at run time.
#[derive(Clone)]
pub struct LogControl {
    handle: Arc<reload::Handle<EnvFilter, Registry>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl").finish_non_exhaustive()
    }
}

impl LogControl {
    /// Replaces the filter. The directive is validated first; a bad one changes
    /// nothing.
    pub fn set_filter(&self, directive: &str) -> Result<(), String> {
        let filter = parse_filter(directive)?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot apply log filter: {e}"))
    }
}

/// Parses a filter directive strictly (an unknown level is an error, not
/// silently ignored).
pub fn parse_filter(directive: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(directive)
        .map_err(|e| format!("invalid log filter {directive:?}: {e}"))
}

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// journald, with structured fields.
    Journald,
    /// Human-readable lines on stderr.
    Stderr,
}

/// Installs the global subscriber. `config_level` is `log.level`; `RUST_LOG`
/// wins when set. Returns the sink chosen and the run-time control.
pub fn init(config_level: &str) -> Result<(Sink, LogControl), String> {
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| config_level.to_owned());
    let filter = parse_filter(&directive)?;
    let (filter_layer, handle) = reload::Layer::new(filter);

    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let sink = if journald.is_some() {
        Sink::Journald
    } else {
        Sink::Stderr
    };
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(true)
    });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(journald)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok((
        sink,
        LogControl {
            handle: Arc::new(handle),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_validation() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("info,applianced=debug").is_ok());
        assert!(parse_filter("applianced=notalevel").is_err());
    }
}
