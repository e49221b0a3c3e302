//! The storage component: the storage manager (`appliance-storage`) over
//! real ZFS or the simulator, its health, its events on the bus, metrics
//! from its report, and `appliancectl storage ...`.
//!
//! With the `zfs` backend the component first checks that ZFS is usable on
//! this machine (`/dev/zfs` and the `zpool` tool). Without it, the component
//! is `unavailable` with the reason, and everything else runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use appliance_storage::disks::{DiskInventory, FakeDisks, SystemDisks};
use appliance_storage::{
    subject_and_payload, EventSink, ManagerConfig, StorageManager, SystemClock,
};
use appliance_types::config::{StorageBackend, StorageConfig};
use appliance_types::control::ControlError;
use appliance_types::health::ComponentState;
use appliance_types::storage::{StorageEvent, StorageReport, StorageRequest, StorageResponse};
use appliance_zfs::fake::FakeZfs;
use appliance_zfs::{RunnerConfig, Zfs, ZfsRunner};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admission::StorageGate;
use crate::health::HealthHandle;
use crate::liveness::LivenessResponder;

/// Where the ZFS user-space tools may live, in order of preference.
pub const ZPOOL_CANDIDATES: [&str; 2] = ["/usr/sbin/zpool", "/sbin/zpool"];

/// How often an unavailable ZFS is looked for again (its reason is kept
/// current; starting the manager needs a restart).
pub const RECHECK: Duration = Duration::from_secs(30);

/// Size of each simulated disk.
pub const SIMULATED_DISK_BYTES: u64 = 1 << 30;

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

/// Why ZFS cannot be used, or `None` when it can.
pub fn unavailable_reason(p: &Probe) -> Option<String> {
    match p {
        Probe::NoDevice(d) => Some(format!(
            "ZFS is not available: {} does not exist (the zfs kernel module is not loaded)",
            d.display()
        )),
        Probe::NoTools => Some(format!(
            "ZFS module is loaded but the zpool tool is missing (looked in {})",
            ZPOOL_CANDIDATES.join(", ")
        )),
        Probe::Present { .. } => None,
    }
}

/// Publishes storage events on the bus without blocking the manager.
#[derive(Debug, Clone)]
pub struct BusSink(pub crate::bus::DetachedPublisher);

impl EventSink for BusSink {
    fn publish(&self, event: &StorageEvent) {
        let (subject, payload) = subject_and_payload(event);
        self.0.publish(subject, payload);
    }
}

/// The manager's last report (metrics, the upload gate).
pub type ReportSlot = Arc<Mutex<Option<StorageReport>>>;

/// The running storage component, as the control socket sees it.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The manager; `None` when ZFS is unavailable.
    pub manager: Option<StorageManager>,
    /// Why there is no manager.
    pub unavailable: Option<String>,
    /// The latest report, for metrics.
    pub last_report: ReportSlot,
}

/// Starts the manager for the configured backend, or reports why not.
pub fn start(cfg: &StorageConfig, data_dir: &Path, bus: &appliance_bus::Bus) -> Storage {
    let (zfs, disks): (Arc<dyn Zfs>, Arc<dyn DiskInventory>) = match cfg.backend {
        StorageBackend::Simulator => {
            let serials: Vec<String> = (0..cfg.simulator_disks)
                .map(|i| format!("SIM{i}"))
                .collect();
            let paths: Vec<String> = serials
                .iter()
                .map(|s| format!("/dev/disk/by-id/virtio-{s}"))
                .collect();
            let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
            (
                Arc::new(FakeZfs::with_disks(&paths, SIMULATED_DISK_BYTES)),
                Arc::new(FakeDisks::new(FakeDisks::blank_disks(
                    &refs,
                    SIMULATED_DISK_BYTES,
                ))),
            )
        }
        StorageBackend::Zfs => {
            let found = probe(&cfg.zfs_device, &ZPOOL_CANDIDATES);
            if let Some(reason) = unavailable_reason(&found) {
                return Storage {
                    manager: None,
                    unavailable: Some(reason),
                    last_report: Arc::default(),
                };
            }
            match ZfsRunner::new(RunnerConfig::default()) {
                Ok(r) => (Arc::new(r), Arc::new(SystemDisks::default())),
                Err(e) => {
                    return Storage {
                        manager: None,
                        unavailable: Some(format!("ZFS tools are not usable: {e}")),
                        last_report: Arc::default(),
                    }
                }
            }
        }
    };
    let state_dir = data_dir.join("storage");
    let mut mcfg = ManagerConfig::new(&state_dir);
    mcfg.provision.key_dir = cfg.key_dir.clone().unwrap_or_else(|| data_dir.join("keys"));
    mcfg.poll_interval = Duration::from_secs(cfg.poll_interval_secs);
    let (manager, _task) = StorageManager::spawn(
        mcfg,
        zfs,
        disks,
        Arc::new(BusSink(crate::bus::DetachedPublisher::new(bus.clone()))),
        Arc::new(SystemClock),
    );
    if cfg.backend == StorageBackend::Zfs {
        let m = manager.clone();
        tokio::spawn(async move {
            if let Err(e) = appliance_storage::udev::watch_udev(m).await {
                warn!(error = %e, "cannot watch udev for disk hot-plug; disk changes come from ZFS and polling only");
            }
        });
    }
    Storage {
        manager: Some(manager),
        unavailable: None,
        last_report: Arc::default(),
    }
}

/// Carries out one storage request.
pub async fn handle(
    storage: &Storage,
    req: StorageRequest,
) -> Result<StorageResponse, ControlError> {
    match &storage.manager {
        None => Err(ControlError::new(
            appliance_types::control::ErrorCode::Unavailable,
            storage
                .unavailable
                .clone()
                .unwrap_or_else(|| "the storage manager is not running".to_owned()),
        )),
        Some(m) => m
            .handle(req)
            .await
            .map_err(|e| ControlError::new(e.code(), e.to_string())),
    }
}

/// The component's task: mirrors the manager's health, keeps the report for
/// metrics, answers liveness.
pub async fn run(
    storage: Storage,
    gate: StorageGate,
    device: PathBuf,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let Some(manager) = storage.manager.clone() else {
        // No ZFS: say why, and keep the reason current.
        let mut interval = tokio::time::interval(RECHECK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                alive = liveness.answer_next() => if !alive { return },
                _ = interval.tick() => {
                    let reason = match unavailable_reason(&probe(&device, &ZPOOL_CANDIDATES)) {
                        Some(r) => r,
                        None => "ZFS has appeared since start-up; restart applianced to manage it".to_owned(),
                    };
                    health.set(ComponentState::Unavailable, reason);
                }
            }
        }
    };
    let mut health_rx = manager.health();
    let mut refresh = tokio::time::interval(Duration::from_secs(10));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    {
        let h = health_rx.borrow().clone();
        health.set(h.state, h.reason);
    }
    // The upload gate follows every health change and every report.
    let update_gate = |gate: &StorageGate, h: &appliance_storage::Health, slot: &ReportSlot| {
        let report = slot.lock().unwrap_or_else(PoisonError::into_inner);
        gate.update(h, report.as_ref());
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            changed = health_rx.changed() => {
                if changed.is_err() {
                    health.set(ComponentState::Failed, "the storage manager stopped");
                    break;
                }
                let h = health_rx.borrow().clone();
                update_gate(&gate, &h, &storage.last_report);
                health.set(h.state, h.reason);
            }
            _ = refresh.tick() => {
                // The report answers from the manager's last poll: quick.
                let m = manager.clone();
                let slot = storage.last_report.clone();
                let gate = gate.clone();
                let health_now = health_rx.clone();
                tokio::spawn(async move {
                    if let Ok(r) = m.report().await {
                        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                        let h = health_now.borrow().clone();
                        update_gate(&gate, &h, &slot);
                    }
                });
            }
        }
    }
    health.set(ComponentState::Starting, "shutting down");
    manager.shutdown().await;
}

/// The storage report as Prometheus gauges, from the last report.
#[derive(Debug)]
pub struct StorageCollector {
    last: Arc<Mutex<Option<StorageReport>>>,
}

impl StorageCollector {
    /// A collector over the component's latest report.
    pub fn new(storage: &Storage) -> Self {
        Self {
            last: storage.last_report.clone(),
        }
    }
}

type Labels = Vec<(String, String)>;

fn family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: Vec<(Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in rows {
        f.get_or_create(&l).set(v);
    }
    let m = enc.encode_descriptor(name, help, None, f.metric_type())?;
    f.encode(m)
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for StorageCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(r) = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let pool = |p: &str| vec![("pool".to_owned(), p.to_owned())];
        family(
            &mut enc,
            "appliance_storage_pool_total_bytes",
            "Usable size of each pool.",
            r.pools
                .iter()
                .map(|p| (pool(&p.name), gauge_i64(p.total_bytes)))
                .collect(),
        )?;
        family(
            &mut enc,
            "appliance_storage_pool_used_bytes",
            "Used bytes of each pool.",
            r.pools
                .iter()
                .map(|p| (pool(&p.name), gauge_i64(p.used_bytes)))
                .collect(),
        )?;
        family(
            &mut enc,
            "appliance_storage_pool_free_bytes",
            "Free bytes of each pool.",
            r.pools
                .iter()
                .map(|p| (pool(&p.name), gauge_i64(p.free_bytes)))
                .collect(),
        )?;
        family(&mut enc, "appliance_storage_pool_redundancy_margin", "How many more disk failures each pool survives now (negative: data is lost or unreachable).", r.pools.iter().map(|p| (pool(&p.name), p.margin)).collect())?;
        family(
            &mut enc,
            "appliance_storage_pool_failed_disks",
            "Failed, removed or unavailable disks of each pool.",
            r.pools
                .iter()
                .map(|p| (pool(&p.name), i64::from(p.failed)))
                .collect(),
        )?;
        family(
            &mut enc,
            "appliance_storage_pool_status",
            "1 for each pool's status (healthy, degraded, critical, unavailable), 0 for the others.",
            r.pools
                .iter()
                .flat_map(|p| {
                    ["healthy", "degraded", "critical", "unavailable"].into_iter().map(move |s| {
                        (
                            vec![("pool".to_owned(), p.name.clone()), ("status".to_owned(), s.to_owned())],
                            i64::from(p.status.as_str() == s),
                        )
                    })
                })
                .collect(),
        )?;
        let ds = |p: &str, d: &str| {
            vec![
                ("pool".to_owned(), p.to_owned()),
                ("dataset".to_owned(), d.to_owned()),
            ]
        };
        family(
            &mut enc,
            "appliance_storage_dataset_used_bytes",
            "Used bytes of each dataset.",
            r.pools
                .iter()
                .flat_map(|p| {
                    p.datasets
                        .iter()
                        .map(|d| (ds(&p.name, &d.name), gauge_i64(d.used_bytes)))
                })
                .collect(),
        )?;
        family(
            &mut enc,
            "appliance_storage_dataset_quota_bytes",
            "Quota of each dataset that has one.",
            r.pools
                .iter()
                .flat_map(|p| {
                    p.datasets
                        .iter()
                        .filter_map(|d| d.quota_bytes.map(|q| (ds(&p.name, &d.name), gauge_i64(q))))
                })
                .collect(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("zfs");
        let p = probe(&dev, &ZPOOL_CANDIDATES);
        assert_eq!(p, Probe::NoDevice(dev.clone()));
        assert!(unavailable_reason(&p).unwrap().contains("does not exist"));

        std::fs::write(&dev, b"").unwrap();
        let missing = dir.path().join("nozpool");
        let missing = missing.to_str().unwrap();
        assert_eq!(probe(&dev, &[missing]), Probe::NoTools);
        assert!(unavailable_reason(&Probe::NoTools)
            .unwrap()
            .contains("zpool"));

        let tool = dir.path().join("zpool");
        std::fs::write(&tool, b"").unwrap();
        let p = probe(&dev, &[missing, tool.to_str().unwrap()]);
        assert_eq!(p, Probe::Present { zpool: tool });
        assert_eq!(unavailable_reason(&p), None);
    }
}
