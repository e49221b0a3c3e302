//! Upload admission on the appliance: the storage manager says whether the
//! pool under the documents can take writes at all, before the sync
//! endpoint's own accounting (the client's quota and `statvfs` of the
//! documents dataset, which on ZFS is the dataset's quota and the pool's free
//! space) is asked about room.
//!
//! Why the gate: on a suspended pool (three disks of a RAID-Z2 gone,
//! `failmode=wait`) every write blocks in the kernel for as long as the pool
//! stays suspended. An upload admitted then would hang its connection and pin
//! a thread; refused, the client hears "storage unavailable: pool tank is
//! SUSPENDED" at once and nothing is written.
//!
//! The gate's state is computed by [`evaluate`] (plain code) from the storage
//! component's health and the manager's last report; the storage task
//! (`storage::run`) recomputes it whenever either changes.
//!
//! The gate also knows where each client's documents live (its own dataset,
//! see [`crate::client_datasets`]) and refuses a client whose dataset is not
//! mounted yet.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::Notify;

use appliance_storage::Health;
use appliance_sync::admission::{Admission, LocalAdmission, Refused, Space};
use appliance_sync::identity::ClientName;
use appliance_types::health::ComponentState;
use appliance_types::storage::{DatasetReport, PoolReport, StorageReport};

use crate::client_datasets::{check_client, ClientPlaces, ManagedDocuments, NotYet, Placement};

/// Whether uploads may go to the documents dataset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GateState {
    /// Uploads are admitted (subject to room).
    #[default]
    Open,
    /// Uploads are refused with this reason.
    Closed { reason: String },
}

/// Whether a path is a mount point in this process (injectable for tests).
pub type MountCheck = Arc<dyn Fn(&Path) -> bool + Send + Sync>;

/// The shared gate of one documents directory: written by the storage
/// task, read on every manifest. Open until the storage task says otherwise.
#[derive(Clone)]
pub struct StorageGate {
    state: Arc<RwLock<GateState>>,
    documents: Arc<PathBuf>,
    places: Arc<RwLock<ClientPlaces>>,
    wake: Arc<Notify>,
    mounted: MountCheck,
}

impl std::fmt::Debug for StorageGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageGate")
            .field("state", &self.get())
            .field("documents", &self.documents)
            .finish_non_exhaustive()
    }
}

impl StorageGate {
    /// An open gate for the documents directory `documents`.
    pub fn new(documents: PathBuf) -> Self {
        Self {
            state: Arc::default(),
            documents: Arc::new(documents),
            places: Arc::default(),
            wake: Arc::new(Notify::new()),
            mounted: Arc::new(crate::client_datasets::is_mounted),
        }
    }

    /// The same gate with another mount check (tests).
    pub fn with_mount_check(mut self, mounted: MountCheck) -> Self {
        self.mounted = mounted;
        self
    }

    /// The documents directory it guards.
    pub fn documents(&self) -> &Path {
        &self.documents
    }

    /// Recomputes the state ([`evaluate`]) and learns the documents dataset
    /// and the client datasets under it from the report.
    pub fn update(&self, health: &Health, report: Option<&StorageReport>) {
        self.set(evaluate(health, report, &self.documents));
        if let Some(report) = report {
            self.learn(report);
        }
    }

    /// Learns the documents dataset and the client datasets under it from a
    /// report (without changing the open/closed state). The sync side calls
    /// this with the manager's current report before it relies on the
    /// places, so that a client enrolled within the storage task's refresh
    /// interval after the pool appeared still gets its own dataset.
    pub fn learn(&self, report: &StorageReport) {
        let report = Some(report);
        if let Some((_, Some(ds))) = report.and_then(|r| find_documents(r, &self.documents)) {
            let docs = ManagedDocuments {
                dataset: ds.name.clone(),
                mountpoint: PathBuf::from(&ds.mountpoint),
            };
            let pools = report.map(|r| r.pools.as_slice()).unwrap_or_default();
            let listed = pools
                .iter()
                .flat_map(|p| p.datasets.iter())
                .map(|d| (d.name.as_str(), d.mountpoint.as_str()));
            self.places
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .learn(Some(docs), listed);
        }
    }

    /// The current state.
    pub fn get(&self) -> GateState {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the state; logs when it changes.
    pub fn set(&self, state: GateState) {
        let mut cur = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if *cur != state {
            match &state {
                GateState::Open => tracing::info!("uploads admitted again"),
                GateState::Closed { reason } => {
                    tracing::warn!(%reason, "uploads refused until storage recovers");
                }
            }
            *cur = state;
        }
    }

    /// Where clients' documents live.
    pub fn places(&self) -> ClientPlaces {
        self.places
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records where `client`'s documents live.
    pub fn set_placement(&self, client: &ClientName, placement: Placement) {
        let mut places = self.places.write().unwrap_or_else(PoisonError::into_inner);
        places.problems.remove(client);
        places.places.insert(client.clone(), placement);
    }

    /// Records why `client` has no placement yet.
    pub fn set_problem(&self, client: &ClientName, problem: String) {
        self.places
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .problems
            .insert(client.clone(), problem);
    }

    /// Whether `dir` is a mount point (this process's mount table).
    pub fn is_mounted(&self, dir: &Path) -> bool {
        (self.mounted)(dir)
    }

    /// Where `client`'s documents live, in words (`sync client list`).
    pub fn describe_place(&self, client: &ClientName) -> String {
        let places = self.places();
        let Some(docs) = &places.documents else {
            return format!(
                "directory {}",
                self.documents.join(client.as_str()).display()
            );
        };
        match places.places.get(client) {
            Some(Placement::Dataset { name, mountpoint }) => {
                let state = if self.is_mounted(mountpoint) {
                    "mounted"
                } else {
                    "not mounted yet"
                };
                format!("dataset {name} ({state})")
            }
            Some(Placement::Directory) => format!(
                "directory {} of {} (no dataset of its own)",
                docs.client_dir(client).display(),
                docs.dataset
            ),
            None => match places.problems.get(client) {
                Some(p) => format!("no dataset yet: {p}"),
                None => "no dataset yet".to_owned(),
            },
        }
    }

    /// Asks the reconciler to look now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when someone called [`Self::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether `client` may write now: the pool gate, then its own
    /// dataset's mount. A client with no placement yet wakes the reconciler.
    pub fn check(&self, client: &ClientName) -> Result<(), Refused> {
        if let GateState::Closed { reason } = self.get() {
            return Err(Refused::Unavailable { detail: reason });
        }
        let places = self.places.read().unwrap_or_else(PoisonError::into_inner);
        check_client(&places, client, |p| (self.mounted)(p)).map_err(|not_yet| {
            if matches!(not_yet, NotYet::Unplaced { .. }) {
                self.wake();
            }
            Refused::Unavailable {
                detail: not_yet.reason(client),
            }
        })
    }
}

/// The dataset a documents directory is, by ZFS's default mountpoints
/// (`/tank/documents` is `tank/documents`), which is how provisioning lays
/// them out. `None` for a path that cannot be a dataset's.
pub fn dataset_for_dir(dir: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in dir.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_str()?),
            _ => return None,
        }
    }
    if parts.is_empty() || !dir.is_absolute() {
        return None;
    }
    Some(parts.join("/"))
}

/// Pool states that take writes (a DEGRADED pool still stores data safely
/// within its margin).
fn writable(pool_state: &str) -> bool {
    matches!(pool_state, "ONLINE" | "DEGRADED")
}

/// The pool and dataset of the documents directory `dir` in a report: the
/// dataset mounted at `dir` or, when the report has no such mount point, the
/// one named after it ([`dataset_for_dir`]). While a pool is suspended its
/// datasets may be missing from the report (`zfs list` fails): the pool
/// named by the path still counts, without a dataset. `None` when the
/// documents are not on a managed pool.
fn find_documents<'r>(
    report: &'r StorageReport,
    dir: &Path,
) -> Option<(&'r PoolReport, Option<&'r DatasetReport>)> {
    let by_name = dataset_for_dir(dir);
    let dataset = report.pools.iter().find_map(|p| {
        p.datasets
            .iter()
            .find(|d| Path::new(&d.mountpoint) == dir)
            .or_else(|| {
                p.datasets
                    .iter()
                    .find(|d| by_name.as_deref() == Some(d.name.as_str()))
            })
            .map(|d| (p, d))
    });
    match dataset {
        Some((p, d)) => Some((p, Some(d))),
        None => {
            let pool_name = by_name
                .as_deref()
                .and_then(|n| n.split('/').next())
                .unwrap_or_default();
            report
                .pools
                .iter()
                .find(|p| p.name == pool_name)
                .map(|p| (p, None))
        }
    }
}

/// The gate for the documents directory `dir`, from the storage component's
/// health and the manager's last report. The dataset is the one mounted at
/// `dir` (or, when the report has no such mountpoint, the one named after
/// it: [`dataset_for_dir`]). Only a dataset the storage manager manages is
/// gated: documents elsewhere (a development machine) are always open.
pub fn evaluate(health: &Health, report: Option<&StorageReport>, dir: &Path) -> GateState {
    let Some((pool, ds)) = report.and_then(|r| find_documents(r, dir)) else {
        return GateState::Open;
    };
    if health.state == ComponentState::Failed {
        return GateState::Closed {
            reason: format!("storage has failed: {}", health.reason),
        };
    }
    if !writable(&pool.state) {
        return GateState::Closed {
            reason: format!("pool {} is {}", pool.name, pool.state),
        };
    }
    let Some(ds) = ds else {
        return GateState::Open;
    };
    if ds.encrypted && ds.key_loaded == Some(false) {
        return GateState::Closed {
            reason: format!("the encryption key of {} is not loaded", ds.name),
        };
    }
    GateState::Open
}

/// The sync endpoint's admission on the appliance: the gate, then the local
/// accounting.
#[derive(Debug)]
pub struct GatedAdmission {
    gate: StorageGate,
    local: LocalAdmission,
}

impl GatedAdmission {
    /// `local` behind `gate`.
    pub fn new(gate: StorageGate, local: LocalAdmission) -> Self {
        Self { gate, local }
    }
}

impl Admission for GatedAdmission {
    fn admit(&self, client: &ClientName, bytes: u64, others: u64) -> Result<(), Refused> {
        self.writable(client)?;
        self.local.admit(client, bytes, others)
    }

    fn writable(&self, client: &ClientName) -> Result<(), Refused> {
        self.gate.check(client)
    }

    fn space(&self, client: &ClientName) -> Space {
        let mut space = self.local.space(client);
        if matches!(self.gate.get(), GateState::Closed { .. }) {
            space.available = 0;
        }
        space
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_types::storage::{DatasetReport, PoolReport, StorageStatus};

    fn health(state: ComponentState, reason: &str) -> Health {
        Health {
            state,
            reason: reason.to_owned(),
        }
    }

    fn report(pool_state: &str, key_loaded: Option<bool>) -> StorageReport {
        let json = serde_json::json!({
            "status": "healthy", "reasons": [], "total_bytes": 0, "used_bytes": 0,
            "free_bytes": 0, "total_tb": 0.0, "used_tb": 0.0, "free_tb": 0.0,
            "redundancy": "", "pools": [], "as_of": 0
        });
        let mut r: StorageReport = serde_json::from_value(json).unwrap();
        let pool = serde_json::json!({
            "name": "tank", "state": pool_state, "status": "healthy", "reasons": [],
            "total_bytes": 0, "used_bytes": 0, "free_bytes": 0, "total_tb": 0.0,
            "used_tb": 0.0, "free_tb": 0.0, "raw_size_bytes": 0, "raw_allocated_bytes": 0,
            "fragmentation_percent": null, "redundancy": "RAID-Z2, 6 disks",
            "disks": 6, "failed": 0, "margin": 2, "failed_devices": [],
            "devices_with_errors": [], "scan": null, "datasets": []
        });
        let mut pool: PoolReport = serde_json::from_value(pool).unwrap();
        pool.status = StorageStatus::Healthy;
        let ds = serde_json::json!({
            "name": "tank/documents", "used_bytes": 0, "available_bytes": 1000,
            "quota_bytes": null, "used_percent": 0.0, "encrypted": true,
            "key_loaded": key_loaded, "compression": "zstd",
            "mountpoint": "/tank/documents"
        });
        let ds: DatasetReport = serde_json::from_value(ds).unwrap();
        pool.datasets.push(ds);
        r.pools.push(pool);
        r
    }

    const DOCS: &str = "/tank/documents";

    fn docs() -> &'static Path {
        Path::new(DOCS)
    }

    #[test]
    fn documents_dir_names_its_dataset() {
        assert_eq!(
            dataset_for_dir(Path::new("/tank/documents")).as_deref(),
            Some("tank/documents")
        );
        assert_eq!(
            dataset_for_dir(Path::new("/tank/documents/")).as_deref(),
            Some("tank/documents")
        );
        assert_eq!(dataset_for_dir(Path::new("/")), None);
        assert_eq!(dataset_for_dir(Path::new("tank/documents")), None);
        assert_eq!(dataset_for_dir(Path::new("/tank/../etc")), None);
    }

    #[test]
    fn open_while_the_pool_takes_writes() {
        let ready = health(ComponentState::Ready, "ok");
        for state in ["ONLINE", "DEGRADED"] {
            assert_eq!(
                evaluate(&ready, Some(&report(state, Some(true))), docs()),
                GateState::Open,
                "{state}"
            );
        }
        let degraded = health(ComponentState::Degraded, "1 disk failed");
        assert_eq!(
            evaluate(&degraded, Some(&report("DEGRADED", Some(true))), docs()),
            GateState::Open
        );
    }

    #[test]
    fn closed_when_the_pool_cannot_take_writes_with_the_reason() {
        let ready = health(ComponentState::Ready, "ok");
        for state in ["SUSPENDED", "UNAVAIL", "FAULTED"] {
            assert_eq!(
                evaluate(&ready, Some(&report(state, Some(true))), docs()),
                GateState::Closed {
                    reason: format!("pool tank is {state}")
                }
            );
        }
        let failed = health(
            ComponentState::Failed,
            "pool tank is suspended (3 disks lost)",
        );
        assert_eq!(
            evaluate(&failed, Some(&report("ONLINE", Some(true))), docs()),
            GateState::Closed {
                reason: "storage has failed: pool tank is suspended (3 disks lost)".into()
            }
        );
        assert_eq!(
            evaluate(&ready, Some(&report("ONLINE", Some(false))), docs()),
            GateState::Closed {
                reason: "the encryption key of tank/documents is not loaded".into()
            }
        );
    }

    #[test]
    fn a_suspended_pool_closes_the_gate_even_when_its_datasets_are_not_listed() {
        let ready = health(ComponentState::Ready, "ok");
        let mut r = report("SUSPENDED", Some(true));
        r.pools[0].datasets.clear();
        assert_eq!(
            evaluate(&ready, Some(&r), docs()),
            GateState::Closed {
                reason: "pool tank is SUSPENDED".into()
            }
        );
        let failed = health(ComponentState::Failed, "ZFS not answering");
        let mut r = report("ONLINE", Some(true));
        r.pools[0].datasets.clear();
        assert_eq!(
            evaluate(&failed, Some(&r), docs()),
            GateState::Closed {
                reason: "storage has failed: ZFS not answering".into()
            }
        );
    }

    #[test]
    fn documents_outside_the_managed_pool_are_not_gated() {
        let failed = health(ComponentState::Failed, "zpool not answering");
        assert_eq!(evaluate(&failed, None, docs()), GateState::Open);
        let r = report("SUSPENDED", Some(true));
        assert_eq!(
            evaluate(&failed, Some(&r), Path::new("/other/documents")),
            GateState::Open
        );
        assert_eq!(
            evaluate(&failed, Some(&r), Path::new("/srv/documents")),
            GateState::Open
        );
    }

    #[test]
    fn gated_admission_refuses_with_the_reason_then_admits() {
        let dir = tempfile::tempdir().unwrap();
        let authority = appliance_sync::identity::Authority::open(&dir.path().join("id")).unwrap();
        let client = ClientName::parse("laptop").unwrap();
        authority
            .enroll(&client, None, &dir.path().join("laptop.bundle"))
            .unwrap();
        let ledger = appliance_sync::admission::UsageLedger::new();
        let local = LocalAdmission::new(authority, ledger, dir.path()).with_reserve(0);
        let gate = StorageGate::new(dir.path().to_path_buf());
        let adm = GatedAdmission::new(gate.clone(), local);
        assert_eq!(adm.admit(&client, 10, 0), Ok(()));
        gate.set(GateState::Closed {
            reason: "pool tank is SUSPENDED".into(),
        });
        assert_eq!(
            adm.admit(&client, 10, 0),
            Err(Refused::Unavailable {
                detail: "pool tank is SUSPENDED".into()
            })
        );
        assert_eq!(
            adm.writable(&client),
            Err(Refused::Unavailable {
                detail: "pool tank is SUSPENDED".into()
            })
        );
        assert_eq!(adm.space(&client).available, 0);
        gate.set(GateState::Open);
        assert_eq!(adm.writable(&client), Ok(()));
        assert_eq!(adm.admit(&client, 10, 0), Ok(()));
    }
}
