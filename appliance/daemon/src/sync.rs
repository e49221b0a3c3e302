//! The QUIC sync endpoint inside the daemon: the appliance CA and client
//! registry under `DATA/sync/identity`, documents under `sync.documents_dir`,
//! sync events onto the bus, and `appliancectl sync client ...`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use appliance_sync::admission::{LocalAdmission, UsageLedger};

use crate::admission::{GatedAdmission, StorageGate};
use appliance_storage::StorageManager;
use appliance_sync::events::{EventSink, SyncEvent};
use appliance_sync::identity::{Authority, ClientInfo, ClientName};
use appliance_sync::server::{ServerConfig, Services, SyncServer};
use appliance_sync::store::Documents;
use appliance_types::config::SyncConfig;
use appliance_types::control::{ControlError, ErrorCode};
use appliance_types::health::ComponentState;
use appliance_types::sync::{SyncClient, SyncRequest, SyncResponse};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::health::HealthHandle;
use crate::liveness::LivenessResponder;

/// Publishes sync events on the bus without blocking the connection tasks.
#[derive(Debug, Clone)]
pub struct BusSink(pub crate::bus::DetachedPublisher);

/// The JSON payload of a sync event.
pub fn payload(e: &SyncEvent) -> serde_json::Value {
    match e {
        SyncEvent::UploadStarted { client, path, size } => {
            serde_json::json!({ "client": client.as_str(), "path": path, "size": size })
        }
        SyncEvent::UploadCompleted {
            client,
            path,
            size,
            bytes_transferred,
        } => serde_json::json!({
            "client": client.as_str(), "path": path, "size": size, "bytes_transferred": bytes_transferred
        }),
        SyncEvent::UploadFailed {
            client,
            path,
            size,
            bytes_transferred,
            error,
        } => serde_json::json!({
            "client": client.as_str(), "path": path, "size": size,
            "bytes_transferred": bytes_transferred, "error": error
        }),
        SyncEvent::ClientConnected { client, remote } => {
            serde_json::json!({ "client": client.as_str(), "remote": remote.to_string() })
        }
        SyncEvent::ClientDisconnected { client, reason } => {
            serde_json::json!({ "client": client.as_str(), "reason": reason })
        }
    }
}

impl EventSink for BusSink {
    fn publish(&self, event: SyncEvent) {
        self.0.publish(event.subject(), payload(&event));
    }
}

/// The running endpoint and what `appliancectl sync` needs.
#[derive(Debug, Clone)]
pub struct Sync {
    /// The CA and client registry.
    pub authority: Arc<Authority>,
    /// Per-client usage.
    pub ledger: Arc<UsageLedger>,
    /// Where bundles are written briefly before they are handed out.
    pub scratch: PathBuf,
    /// The server, for live connection counts.
    pub server: Arc<SyncServerHandle>,
    /// The upload gate (where each client's documents live).
    pub gate: StorageGate,
    /// The storage manager, when there is one (client datasets).
    pub manager: Option<StorageManager>,
}

/// Live-connection counts of the server.
#[derive(Debug)]
pub struct SyncServerHandle {
    server: tokio::sync::Mutex<Option<SyncServer>>,
    addr: SocketAddr,
}

/// Opens (on first start: creates) the appliance CA, server certificate and
/// client registry under `DATA/sync/identity`.
pub async fn open_authority(data_dir: &Path) -> anyhow::Result<Arc<Authority>> {
    let identity_dir = data_dir.join("sync").join("identity");
    let dir = identity_dir.clone();
    tokio::task::spawn_blocking(move || Authority::open(&dir))
        .await
        .context("the identity opener panicked")?
        .with_context(|| {
            format!(
                "cannot open the sync identity in {}",
                identity_dir.display()
            )
        })
}

/// Starts the endpoint on an opened authority.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    cfg: &SyncConfig,
    listen: SocketAddr,
    data_dir: &Path,
    authority: Arc<Authority>,
    bus: appliance_bus::Bus,
    gate: StorageGate,
    manager: Option<StorageManager>,
    shutdown: CancellationToken,
) -> anyhow::Result<Sync> {
    authority.set_public_address(cfg.public_address.clone());
    let documents_dir = documents_dir(cfg, data_dir);
    let ledger = UsageLedger::new();
    let documents = Arc::new(
        Documents::new(&documents_dir, cfg.keep_versions, ledger.clone()).with_context(|| {
            format!(
                "cannot use {} for documents (config key `sync.documents_dir`)",
                documents_dir.display()
            )
        })?,
    );
    // Before the first connection: are documents on a managed dataset? (The
    // storage task's refresh may not have told the gate yet.)
    if let Some(m) = &manager {
        if let Ok(report) = m.report().await {
            gate.learn(&report);
        }
    }
    let admission = Arc::new(GatedAdmission::new(
        gate.clone(),
        LocalAdmission::new(authority.clone(), ledger.clone(), &documents_dir),
    ));
    let services = Services {
        authority: authority.clone(),
        documents,
        admission,
        events: Arc::new(BusSink(crate::bus::DetachedPublisher::new(bus))),
    };
    let mut server_cfg = ServerConfig::new(listen);
    server_cfg.max_connections_per_client = cfg.max_connections_per_client as usize;
    let server = appliance_sync::server::serve(server_cfg, services, shutdown.clone())
        .await
        .with_context(|| {
            format!("cannot start the sync endpoint on UDP {listen} (config key `sync.listen`)")
        })?;
    let addr = server.local_addr();
    let scratch = data_dir.join("sync").join("scratch");
    private_scratch(&scratch)?;
    // Each client's documents in its own dataset (on the appliance).
    if let Some(manager) = manager.clone() {
        tokio::spawn(crate::client_datasets::run(
            gate.clone(),
            manager,
            authority.clone(),
            shutdown.clone(),
        ));
    }
    Ok(Sync {
        authority,
        ledger,
        scratch,
        server: Arc::new(SyncServerHandle {
            server: tokio::sync::Mutex::new(Some(server)),
            addr,
        }),
        gate,
        manager,
    })
}

/// Creates the scratch directory (0700) and removes anything left in it: a
/// crash between writing and handing out a bundle must not leave a private
/// key behind.
fn private_scratch(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove leftover {}", path.display()))?;
        warn!(path = %path.display(), "removed a leftover client bundle");
    }
    Ok(())
}

impl Sync {
    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.addr
    }

    async fn connections_of(&self, name: &ClientName) -> u64 {
        self.server
            .server
            .lock()
            .await
            .as_ref()
            .map_or(0, |s| s.connections_of(name) as u64)
    }

    async fn view(&self, info: ClientInfo) -> SyncClient {
        let connections = self.connections_of(&info.name).await;
        SyncClient {
            used: self.ledger.used(&info.name),
            name: info.name.as_str().to_owned(),
            quota: info.quota,
            fingerprint: info.fingerprint,
            enrolled_at: info.enrolled_at,
            revoked_at: info.revoked_at,
            connections,
            storage: self.gate.describe_place(&info.name),
        }
    }

    /// Waits for the server to finish after shutdown.
    pub async fn wait(&self) {
        let server = self.server.server.lock().await.take();
        if let Some(s) = server {
            s.wait().await;
        }
    }
}

fn name_of(name: &str) -> Result<ClientName, ControlError> {
    ClientName::parse(name)
        .map_err(|e| ControlError::new(ErrorCode::InvalidArgument, e.to_string()))
}

fn identity_error(e: &appliance_sync::identity::IdentityError) -> ControlError {
    use appliance_sync::identity::IdentityError as E;
    let code = match e {
        E::AlreadyEnrolled { .. } | E::AlreadyRevoked { .. } => ErrorCode::InvalidArgument,
        E::UnknownClient { .. } => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    };
    ControlError::new(code, e.to_string())
}

/// Carries out one sync request.
pub async fn handle(sync: &Sync, req: SyncRequest) -> Result<SyncResponse, ControlError> {
    match req {
        SyncRequest::ClientList => {
            let mut out = Vec::new();
            for info in sync.authority.list() {
                out.push(sync.view(info).await);
            }
            Ok(SyncResponse::Clients(out))
        }
        SyncRequest::ClientRevoke { name } => {
            let name = name_of(&name)?;
            let authority = sync.authority.clone();
            let info = tokio::task::spawn_blocking(move || authority.revoke(&name))
                .await
                .map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))?
                .map_err(|e| identity_error(&e))?;
            Ok(SyncResponse::Revoked(sync.view(info).await))
        }
        SyncRequest::ClientAdd { name, quota } => {
            let name = name_of(&name)?;
            let authority = sync.authority.clone();
            // The bundle holds the client's private key: it is written to a
            // private scratch file, read back, and removed; the daemon keeps
            // no copy.
            let path =
                sync.scratch
                    .join(format!("{}.bundle.{}", name.as_str(), std::process::id()));
            let (info, bundle) = tokio::task::spawn_blocking(move || {
                let info = authority.enroll(&name, quota, &path);
                let bundle = info.as_ref().ok().map(|_| std::fs::read(&path));
                let _ = std::fs::remove_file(&path);
                (info, bundle)
            })
            .await
            .map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))?;
            let info = info.map_err(|e| identity_error(&e))?;
            ready_for_uploads(
                &sync.gate,
                sync.manager.as_ref(),
                &info.name,
                ENROLL_PLACE_WAIT,
            )
            .await;
            let bundle = bundle
                .unwrap_or_else(|| Err(std::io::Error::other("no bundle")))
                .map_err(|e| {
                    ControlError::new(
                        ErrorCode::Internal,
                        format!("cannot read the new bundle: {e}"),
                    )
                })?;
            Ok(SyncResponse::Enrolled {
                client: sync.view(info).await,
                bundle,
            })
        }
    }
}

/// How long enrollment waits for the new client's dataset to be created
/// and mounted, so that its first upload is admitted: below `appliancectl`'s
/// 30 s answer timeout. Under QEMU/TCG both steps took a few seconds.
pub const ENROLL_PLACE_WAIT: Duration = Duration::from_secs(20);

/// Waits (at most `limit`) until `client` may upload; logs when it may not
/// yet. Enrollment has succeeded either way: the client's identity exists,
/// and an early upload is refused with the reason, not lost.
async fn ready_for_uploads(
    gate: &StorageGate,
    manager: Option<&StorageManager>,
    client: &ClientName,
    limit: Duration,
) {
    // Whether documents are on a managed dataset, from the manager's current
    // view: the gate's own may predate the pool by up to one refresh, and
    // would then wave the client through to the parent dataset.
    if let Some(report) = match manager {
        Some(m) => m.report().await.ok(),
        None => None,
    } {
        gate.learn(&report);
    }
    gate.wake();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let Err(refused) = gate.check(client) else {
            return;
        };
        if tokio::time::Instant::now() >= deadline {
            warn!(%client, reason = %refused, "enrolled, but uploads are not admitted yet");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where the running endpoint is published once it has started.
pub type SyncSlot = Arc<std::sync::OnceLock<Sync>>;

/// How often a missing documents directory is looked for again.
pub const DOCUMENTS_RECHECK: Duration = Duration::from_secs(5);

/// Where documents live: `sync.documents_dir`, or `DATA/documents`.
pub fn documents_dir(cfg: &SyncConfig, data_dir: &Path) -> PathBuf {
    cfg.documents_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("documents"))
}

/// Whether the endpoint can start on `documents_dir`: a configured directory
/// must exist (it is the encrypted dataset's mount point; the daemon never
/// creates it on the root filesystem); the default one under the data
/// directory is created.
pub fn documents_ready(cfg: &SyncConfig, documents_dir: &Path) -> Result<(), String> {
    if cfg.documents_dir.is_none() || documents_dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "the documents directory {} does not exist yet (on the appliance it is the pool's \
             `documents` dataset: create the pool with `appliancectl storage create-pool`)",
            documents_dir.display()
        ))
    }
}

/// The sync component's task: starts the endpoint once its documents
/// directory is there (retrying a failed start), then answers liveness
/// until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: SyncConfig,
    listen: SocketAddr,
    data_dir: PathBuf,
    bus: appliance_bus::Bus,
    gate: StorageGate,
    manager: Option<StorageManager>,
    slot: SyncSlot,
    endpoints: crate::supervisor::Endpoints,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let documents_dir = documents_dir(&cfg, &data_dir);
    let mut retry = tokio::time::interval(DOCUMENTS_RECHECK);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The CA comes first, whether or not documents can be stored yet: first
    // boot checks for it, and clients can be enrolled before the pool exists.
    let mut authority: Option<Arc<Authority>> = None;
    let mut mount_requests = crate::client_datasets::MountRequests::default();
    let sync = loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            alive = liveness.answer_next() => if !alive { return },
            _ = retry.tick() => {
                let auth = match &authority {
                    Some(a) => a.clone(),
                    None => match open_authority(&data_dir).await {
                        Ok(a) => {
                            authority = Some(a.clone());
                            a
                        }
                        Err(e) => {
                            health.set(ComponentState::Failed, format!("{e:#}"));
                            continue;
                        }
                    },
                };
                if let Err(reason) = documents_ready(&cfg, &documents_dir) {
                    health.set(ComponentState::Unavailable, reason);
                    // The documents dataset exists but is not mounted (a
                    // mount unit run that missed it): ask again.
                    if let (Some(m), Some(docs)) = (&manager, gate.places().documents) {
                        crate::client_datasets::request_mount(&mut mount_requests, m, &docs.dataset, None).await;
                    }
                    continue;
                }
                match start(&cfg, listen, &data_dir, auth, bus.clone(), gate.clone(), manager.clone(), shutdown.clone()).await {
                    Ok(s) => break s,
                    Err(e) => health.set(ComponentState::Failed, format!("{e:#}")),
                }
            }
        }
    };
    endpoints.set("sync_quic", sync.local_addr().to_string());
    let _ = slot.set(sync.clone());
    health.set(
        ComponentState::Ready,
        format!(
            "QUIC on UDP {}, {} clients enrolled",
            sync.local_addr(),
            sync.authority.list().len()
        ),
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
        }
    }
    health.set(ComponentState::Starting, "shutting down");
    sync.wait().await;
}
