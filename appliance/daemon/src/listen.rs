//! Binding the daemon's network endpoints and recording them for
//! `appliancectl status`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};

use crate::supervisor::Endpoints;

/// Binds a TCP endpoint and records its actual address (an ephemeral port
/// becomes the real one) under `name`. `key` names the config key in errors.
pub async fn tcp(
    endpoints: &Endpoints,
    name: &str,
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot bind the {name} endpoint on {addr} (config key `{key}`)")
    })?;
    let local = l
        .local_addr()
        .with_context(|| format!("the {name} listener has no address"))?;
    endpoints.set(name, local.to_string());
    Ok(l)
}

/// Binds a Unix-socket endpoint, replacing a stale socket file, and records
/// it under `name`.
pub fn unix(
    endpoints: &Endpoints,
    name: &str,
    path: &Path,
    key: &str,
) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket; refusing to replace it (config key `{key}`)",
            path.display()
        );
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| {
        format!(
            "cannot bind the {name} socket {} (config key `{key}`)",
            path.display()
        )
    })?;
    endpoints.set(name, path.display().to_string());
    Ok(l)
}
