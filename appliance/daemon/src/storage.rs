//! The storage component as far as this build goes: it finds out whether ZFS
//! is usable on this machine and says so in its health.
//!
//! Pool management (the storage manager of issue 6) is not in this build; on
//! a machine with ZFS the component reports `degraded` with that reason rather
//! than pretending to manage anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use appliance_types::health::ComponentState;
use tokio_util::sync::CancellationToken;

use crate::health::HealthHandle;
use crate::liveness::LivenessResponder;

/// Where the ZFS user-space tools may live, in order of preference.
pub const ZPOOL_CANDIDATES: [&str; 2] = ["/usr/sbin/zpool", "/sbin/zpool"];

/// How often to look again (a module may be loaded after start).
pub const RECHECK: Duration = Duration::from_secs(30);

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No control device: the module is not loaded.
    NoDevice(PathBuf),
    /// The module is there but the tools are not installed.
    NoTools,
    /// Both present.
    Present {
        /// The `zpool` binary found.
        zpool: PathBuf,
    },
}

/// Looks for the ZFS control device and tools.
pub fn probe(device: &Path, zpool_candidates: &[&str]) -> Probe {
    if !device.exists() {
        return Probe::NoDevice(device.to_owned());
    }
    match zpool_candidates.iter().map(Path::new).find(|p| p.exists()) {
        Some(z) => Probe::Present {
            zpool: z.to_owned(),
        },
        None => Probe::NoTools,
    }
}

/// The health a probe result implies.
pub fn assess(p: &Probe) -> (ComponentState, String) {
    match p {
        Probe::NoDevice(d) => (
            ComponentState::Unavailable,
            format!(
                "ZFS is not available: {} does not exist (the zfs kernel module is not loaded)",
                d.display()
            ),
        ),
        Probe::NoTools => (
            ComponentState::Unavailable,
            format!(
                "ZFS module is loaded but the zpool tool is missing (looked in {})",
                ZPOOL_CANDIDATES.join(", ")
            ),
        ),
        Probe::Present { zpool } => (
            ComponentState::Degraded,
            format!(
                "ZFS found ({}), but pool management is not implemented in this build",
                zpool.display()
            ),
        ),
    }
}

/// Runs the component until `shutdown`.
pub async fn run(
    device: PathBuf,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(RECHECK);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            _ = interval.tick() => {
                let (state, reason) = assess(&probe(&device, &ZPOOL_CANDIDATES));
                health.set(state, reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_assess() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("zfs");
        let p = probe(&dev, &ZPOOL_CANDIDATES);
        assert_eq!(p, Probe::NoDevice(dev.clone()));
        let (s, reason) = assess(&p);
        assert_eq!(s, ComponentState::Unavailable);
        assert!(reason.contains("does not exist"));

        std::fs::write(&dev, b"").unwrap();
        let missing = dir.path().join("nozpool");
        let missing = missing.to_str().unwrap();
        assert_eq!(probe(&dev, &[missing]), Probe::NoTools);

        let tool = dir.path().join("zpool");
        std::fs::write(&tool, b"").unwrap();
        let p = probe(&dev, &[missing, tool.to_str().unwrap()]);
        assert_eq!(p, Probe::Present { zpool: tool });
        assert_eq!(assess(&p).0, ComponentState::Degraded);
    }
}
