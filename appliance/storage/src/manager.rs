//! The storage manager actor.
//!
//! One tokio task owns all state (the last snapshot of every pool, the event
//! deriver, quota latches, the scrub book, the circuit breaker). It never
//! awaits ZFS: every `zpool`/`zfs` call runs in its own task under a timeout
//! ([`ManagerConfig::call_timeout`], [`ManagerConfig::change_timeout`]) and
//! reports back by message, so queries (`report`, `quota get`, `admission`)
//! are answered from the last known state even while a pool hangs.
//!
//! ```text
//!  StorageManager (handle) ──Command──▶ ┌──────────── actor ────────────┐
//!                                       │ snapshots, deriver, quotas,   │──▶ EventSink
//!  poll task (interval + on demand) ──▶ │ scrub book, breaker, health   │──▶ watch<Health>
//!  follower task (zpool events -f) ───▶ │                               │
//!  op tasks (scrub, quota, replace…) ─▶ └───────────────────────────────┘
//! ```
//!
//! * **Polling** every [`ManagerConfig::poll_interval`], and at once after a
//!   ZFS event that changes state; at most one poll runs, further requests
//!   are coalesced into one more.
//! * **Follower**: restarted with backoff when it ends; while it is down
//!   the component is `degraded` ("polling only") and nothing is missed
//!   because polling continues.
//! * **Breaker**: timeouts open it; while open, no poll is started (a hung
//!   pool does not collect one stuck process per interval), the pools are
//!   published as `UNRESPONSIVE`, and the health is `failed` with the reason.
//! * Mutating operations are serialised (one at a time) and each ends with
//!   a re-poll.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use appliance_types::health::ComponentState;
use appliance_types::storage::{
    Admission, DiskAction, DiskInfo, ProvisionOutcome, QuotaStatus, ScanEventPhase, ScrubCommand,
    ScrubStatus, StorageEvent, StorageLayout, StorageReport, StorageRequest, StorageResponse,
    StorageStatus,
};
use appliance_zfs::{
    Dataset, DatasetSpec, EventItem, FailureKind, Pool, PoolStatus, ScanFunction, ScanState,
    ScrubAction, Zfs, ZfsError,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::breaker::{
    backoff_ms, counts_as_failure, retryable, BreakerConfig, CircuitBreaker, RetryConfig,
};
use crate::clock::Clock;
use crate::datasets::{record_dataset, DATASETS_RECORD};
use crate::derive::{DeriveConfig, EventDeriver, ResilverMark};
use crate::disks::{check_create, check_disk, list_disks, pool_members, DiskInventory, DiskPolicy};
use crate::error::StorageError;
use crate::provision::{ProvisionConfig, Provisioner};
use crate::quota::{usage_percent, QuotaThresholds, QuotaTracker};
use crate::report::{disk_id, pool_state_unusable, scan_report, storage_report, PoolSnapshot};
use crate::scrub::{decide, PoolActivity, ScrubBook, ScrubDecision, ScrubSchedule};
use crate::sink::EventSink;
use crate::statefile::{read_json, write_json, StateFileError};
use crate::udev::{disk_event, DiskChange};

/// Manager settings. The daemon maps its `[storage]` config onto this.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where `scrub.json` and `provision.json` live.
    pub state_dir: PathBuf,
    /// Poll interval (10 s: the event follower gives the first notice within
    /// a second; polling is the cross-check and catches what it missed).
    pub poll_interval: Duration,
    /// Timeout for queries (45 s: above the real runner's own 30 s, so its
    /// process kill normally fires first; ours bounds anything else).
    pub call_timeout: Duration,
    /// Timeout for changes (150 s: above the runner's 120 s).
    pub change_timeout: Duration,
    /// Timeout for a whole create-pool (several commands): 10 minutes.
    pub provision_timeout: Duration,
    /// How often the scrub scheduler and heartbeats run (60 s).
    pub housekeeping_interval: Duration,
    /// Event rate limits and heartbeat interval.
    pub derive: DeriveConfig,
    /// Quota alert levels.
    pub quota: QuotaThresholds,
    /// Default scrub schedule.
    pub scrub: ScrubSchedule,
    /// Per-pool scrub schedules.
    pub scrub_per_pool: BTreeMap<String, ScrubSchedule>,
    /// Breaker.
    pub breaker: BreakerConfig,
    /// Retry of transient refusals.
    pub retry: RetryConfig,
    /// Provisioning (key directory, mount point).
    pub provision: ProvisionConfig,
    /// Disk rules.
    pub disk_policy: DiskPolicy,
    /// Follower restart backoff: first delay and cap.
    pub follower_backoff: (Duration, Duration),
}

impl ManagerConfig {
    /// Defaults with state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            provision: ProvisionConfig::new(state_dir.clone()),
            state_dir,
            poll_interval: Duration::from_secs(10),
            call_timeout: Duration::from_secs(45),
            change_timeout: Duration::from_secs(150),
            provision_timeout: Duration::from_secs(600),
            housekeeping_interval: Duration::from_secs(60),
            derive: DeriveConfig::default(),
            quota: QuotaThresholds::default(),
            scrub: ScrubSchedule::default(),
            scrub_per_pool: BTreeMap::new(),
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
            disk_policy: DiskPolicy::default(),
            follower_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    fn schedule(&self, pool: &str) -> ScrubSchedule {
        self.scrub_per_pool.get(pool).copied().unwrap_or(self.scrub)
    }
}

/// The component's health, for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// State.
    pub state: ComponentState,
    /// Why, in words an operator can act on.
    pub reason: String,
}

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

enum Command {
    Report(Reply<StorageReport>),
    Disks(Reply<Vec<DiskInfo>>),
    QuotaGet(Option<String>, Reply<Vec<QuotaStatus>>),
    QuotaSet(String, Option<u64>, Reply<Vec<QuotaStatus>>),
    Scrub(String, ScrubCommand, Reply<ScrubStatus>),
    ScrubStatus(String, Reply<ScrubStatus>),
    Replace {
        pool: String,
        old: String,
        new: String,
        force: bool,
        reply: Reply<String>,
    },
    CreatePool {
        name: String,
        layout: StorageLayout,
        disks: Vec<String>,
        force: bool,
        reply: Reply<ProvisionOutcome>,
    },
    Admission(String, u64, Reply<Admission>),
    CreateDataset {
        name: String,
        quota: Option<u64>,
        reply: Reply<bool>,
    },
    Refresh(oneshot::Sender<()>),
    Hotplug(DiskChange),
    Shutdown,
}

struct PolledPool {
    name: String,
    list: Pool,
    status: Result<PoolStatus, ZfsError>,
    datasets: Result<Vec<Dataset>, ZfsError>,
}

/// Someone waiting for a poll that starts after their request.
enum Waiter {
    Refresh(oneshot::Sender<()>),
    Scrub(String, Reply<ScrubStatus>),
}

enum Internal {
    Polled(Result<Vec<PolledPool>, ZfsError>),
    Zfs(Result<EventItem, ZfsError>),
    FollowerUp,
    FollowerDown(String),
    /// A change finished: feed the breaker; re-poll.
    OpDone(Option<ZfsError>),
    /// Fresh datasets after `quota set`, and the caller to answer.
    QuotaRead(String, Vec<Dataset>, Reply<Vec<QuotaStatus>>),
    /// A scrub command finished; answer after the next poll.
    ScrubDone(String, Reply<ScrubStatus>),
    /// A scheduled scrub could not be started.
    ScheduledScrubFailed(String, String),
    /// Disk list from the inventory, to finish with the pools.
    DisksRead(
        Result<crate::disks::DiskSnapshot, StorageError>,
        Reply<Vec<DiskInfo>>,
    ),
    ProvisionResumed(Vec<String>),
}

/// Handle to the running manager. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StorageManager {
    tx: mpsc::Sender<Command>,
    health: watch::Receiver<Health>,
}

/// Queue depth of the command channel: requests come from the control
/// socket (one at a time per client) and the sync server's admissions; 256
/// is far above any burst and bounds memory if the actor is slow.
const COMMAND_QUEUE: usize = 256;

/// Most re-polls merged while one runs (one pending is enough).
const INTERNAL_QUEUE: usize = 1024;

impl StorageManager {
    /// Starts the manager. It runs until [`StorageManager::shutdown`] or
    /// until every handle is dropped.
    pub fn spawn(
        cfg: ManagerConfig,
        zfs: Arc<dyn Zfs>,
        disks: Arc<dyn DiskInventory>,
        sink: Arc<dyn EventSink>,
        clock: Arc<dyn Clock>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (itx, irx) = mpsc::channel(INTERNAL_QUEUE);
        let (htx, hrx) = watch::channel(Health {
            state: ComponentState::Starting,
            reason: "waiting for the first ZFS poll".to_owned(),
        });
        let book: ScrubBook = match read_json(&cfg.state_dir.join("scrub.json")) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "scrub book unreadable; starting empty (scrubs may run early)");
                ScrubBook::default()
            }
        };
        let mut deriver = EventDeriver::new(cfg.derive);
        for (pool, r) in &book.pools {
            for end in [r.last_completed, r.scrub_ended].into_iter().flatten() {
                deriver.set_known_scrub_end(pool, end);
            }
            deriver.set_resilver_mark(
                pool,
                ResilverMark {
                    open: r.resilver_open,
                    last_end: r.resilver_ended,
                },
            );
            deriver.set_scrub_open(pool, r.scrub_open);
        }
        let actor = Actor {
            quotas: QuotaTracker::new(cfg.quota.clone()),
            breaker: CircuitBreaker::new(cfg.breaker),
            cfg,
            zfs,
            disks,
            sink,
            clock,
            itx,
            snapshots: BTreeMap::new(),
            deriver,
            book,
            poll_running: false,
            poll_started: 0,
            poll_again: false,
            poll_stale: false,
            polled_once: false,
            zfs_problem: None,
            follower_problem: None,
            health: htx,
            ops: Arc::new(tokio::sync::Mutex::new(())),
            waiting: Vec::new(),
            waiting_inflight: Vec::new(),
            provision_problems: Vec::new(),
            started: tokio::time::Instant::now(),
            gone: BTreeSet::new(),
        };
        let handle = tokio::spawn(actor.run(rx, irx));
        (Self { tx, health: hrx }, handle)
    }

    /// The health channel (`starting|ready|degraded|unavailable|failed`).
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| StorageError::Unavailable {
                reason: "storage manager stopped".to_owned(),
            })?;
        rx.await.map_err(|_| StorageError::Unavailable {
            reason: "storage manager stopped".to_owned(),
        })?
    }

    /// The storage report (from the last poll).
    pub async fn report(&self) -> Result<StorageReport, StorageError> {
        self.ask(Command::Report).await
    }

    /// The disks of the machine and the pools.
    pub async fn disks(&self) -> Result<Vec<DiskInfo>, StorageError> {
        self.ask(Command::Disks).await
    }

    /// Quota status of one dataset, or of all.
    pub async fn quota_get(
        &self,
        dataset: Option<String>,
    ) -> Result<Vec<QuotaStatus>, StorageError> {
        self.ask(|r| Command::QuotaGet(dataset, r)).await
    }

    /// Sets (or with `None` removes) a dataset's quota.
    pub async fn quota_set(
        &self,
        dataset: String,
        bytes: Option<u64>,
    ) -> Result<Vec<QuotaStatus>, StorageError> {
        self.ask(|r| Command::QuotaSet(dataset, bytes, r)).await
    }

    /// Starts, pauses, resumes or stops a scrub; answers with the status
    /// after the change.
    pub async fn scrub(
        &self,
        pool: String,
        command: ScrubCommand,
    ) -> Result<ScrubStatus, StorageError> {
        self.ask(|r| Command::Scrub(pool, command, r)).await
    }

    /// Scrub status and schedule of a pool.
    pub async fn scrub_status(&self, pool: String) -> Result<ScrubStatus, StorageError> {
        self.ask(|r| Command::ScrubStatus(pool, r)).await
    }

    /// Checks `new` like create-pool does, then starts `zpool replace`.
    pub async fn replace(
        &self,
        pool: String,
        old: String,
        new: String,
        force: bool,
    ) -> Result<String, StorageError> {
        self.ask(|reply| Command::Replace {
            pool,
            old,
            new,
            force,
            reply,
        })
        .await
    }

    /// Checks the disks and provisions a pool (see [`crate::provision`]).
    pub async fn create_pool(
        &self,
        name: String,
        layout: StorageLayout,
        disks: Vec<String>,
        force: bool,
    ) -> Result<ProvisionOutcome, StorageError> {
        self.ask(|reply| Command::CreatePool {
            name,
            layout,
            disks,
            force,
            reply,
        })
        .await
    }

    /// Whether `bytes` more fit into `dataset` (its quota and the pool's
    /// free space). Answered from the last poll; ZFS enforces the quota
    /// anyway, so a race between two uploads ends in a clean `EDQUOT`.
    pub async fn admission(&self, dataset: String, bytes: u64) -> Result<Admission, StorageError> {
        self.ask(|r| Command::Admission(dataset, bytes, r)).await
    }

    /// Creates the child dataset `name` (inheriting encryption, compression
    /// and mount point from its parent), with `quota`, unmounted, and
    /// records it in [`DATASETS_RECORD`] under the state directory: the
    /// appliance's root mount unit watches that file and mounts what was
    /// created. Answers `true` when it created the dataset and `false` when
    /// it already existed (the quota is then left as it is, and the record
    /// is touched again so that the mount unit runs again). The parent must
    /// exist.
    pub async fn create_dataset(
        &self,
        name: String,
        quota: Option<u64>,
    ) -> Result<bool, StorageError> {
        self.ask(|reply| Command::CreateDataset { name, quota, reply })
            .await
    }

    /// Polls now and waits until that poll was applied.
    pub async fn refresh(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Refresh(tx))
            .await
            .map_err(|_| StorageError::Unavailable {
                reason: "storage manager stopped".to_owned(),
            })?;
        rx.await.map_err(|_| StorageError::Unavailable {
            reason: "storage manager stopped".to_owned(),
        })
    }

    /// Serves one control-socket request.
    pub async fn handle(&self, req: StorageRequest) -> Result<StorageResponse, StorageError> {
        Ok(match req {
            StorageRequest::Report => StorageResponse::Report(self.report().await?),
            StorageRequest::Disks => StorageResponse::Disks(self.disks().await?),
            StorageRequest::QuotaGet { dataset } => {
                StorageResponse::Quotas(self.quota_get(dataset).await?)
            }
            StorageRequest::QuotaSet { dataset, bytes } => {
                StorageResponse::Quotas(self.quota_set(dataset, bytes).await?)
            }
            StorageRequest::Scrub { pool, command } => {
                StorageResponse::Scrub(self.scrub(pool, command).await?)
            }
            StorageRequest::ScrubStatus { pool } => {
                StorageResponse::Scrub(self.scrub_status(pool).await?)
            }
            StorageRequest::Replace {
                pool,
                old,
                new,
                force,
            } => StorageResponse::Done(self.replace(pool, old, new, force).await?),
            StorageRequest::CreatePool {
                name,
                layout,
                disks,
                force,
            } => StorageResponse::PoolCreated(self.create_pool(name, layout, disks, force).await?),
        })
    }

    /// A disk appeared or went away (from [`crate::udev::watch_udev`]).
    /// Returns false once the manager has stopped.
    pub async fn hotplug(&self, change: DiskChange) -> bool {
        self.tx.send(Command::Hotplug(change)).await.is_ok()
    }

    /// Stops the actor (running ZFS commands are left to their timeouts).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

struct Actor {
    cfg: ManagerConfig,
    zfs: Arc<dyn Zfs>,
    disks: Arc<dyn DiskInventory>,
    sink: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    itx: mpsc::Sender<Internal>,
    snapshots: BTreeMap<String, PoolSnapshot>,
    deriver: EventDeriver,
    quotas: QuotaTracker,
    book: ScrubBook,
    breaker: CircuitBreaker,
    poll_running: bool,
    /// When the running (or last) poll started reading ZFS (Unix seconds):
    /// its snapshot is as of then, and a ZFS event from after it is news.
    poll_started: u64,
    poll_again: bool,
    /// The running poll started before a ZFS event that was published: its
    /// snapshot may predate the change and must not undo it (the poll
    /// queued behind it gives the fresh view).
    poll_stale: bool,
    polled_once: bool,
    zfs_problem: Option<String>,
    follower_problem: Option<String>,
    health: watch::Sender<Health>,
    ops: Arc<tokio::sync::Mutex<()>>,
    /// Waiting for the next poll to start.
    waiting: Vec<Waiter>,
    /// Waiting for the running poll to be applied.
    waiting_inflight: Vec<Waiter>,
    provision_problems: Vec<String>,
    started: tokio::time::Instant,
    /// Pool members udev reported removed and not added since (by disk id):
    /// REMOVED in every snapshot, whatever ZFS says (see
    /// [`crate::derive::mark_gone`]).
    gone: BTreeSet<String>,
}

/// Runs `f` with a timeout, retrying transient refusals with backoff.
async fn call<T, F, Fut>(
    timeout: Duration,
    retry: RetryConfig,
    what: &str,
    mut f: F,
) -> Result<T, ZfsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ZfsError>>,
{
    let mut attempt = 0;
    loop {
        let r = match tokio::time::timeout(timeout, f()).await {
            Ok(r) => r,
            Err(_) => Err(ZfsError::Timeout {
                command: what.to_owned(),
                after: timeout,
            }),
        };
        match r {
            Err(e) if retryable(&e) && attempt < retry.retries => {
                tokio::time::sleep(Duration::from_millis(backoff_ms(&retry, attempt))).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

impl Actor {
    fn now(&self) -> u64 {
        self.clock.now_unix()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn publish(&mut self, events: Vec<StorageEvent>) {
        for e in events {
            // A scan event's pool, and whether it opens a scan (a
            // resilver's `started`, a scrub's `progress` or `paused`).
            let scan = match &e {
                StorageEvent::Resilver(r) => {
                    Some((r.pool.clone(), r.phase == ScanEventPhase::Started))
                }
                StorageEvent::Scrub(s) => Some((
                    s.pool.clone(),
                    matches!(s.phase, ScanEventPhase::Progress | ScanEventPhase::Paused),
                )),
                _ => None,
            };
            if let Some((pool, true)) = &scan {
                // Before the event goes out: a scan whose open mark is lost
                // would never be followed by its end after a restart.
                self.save_scan_marks(pool, false);
            }
            self.sink.publish(&e);
            // After it: an end persisted before its event went out would,
            // after a crash in between, lose that event (the next start
            // takes the end for one it published). A crash repeats it
            // instead.
            let mut completed = false;
            if let StorageEvent::Scrub(s) = &e {
                if s.phase == ScanEventPhase::Finished {
                    // The text form (OpenZFS 2.1) gives no end time: the
                    // scrub ended by the poll that shows it ended. Without
                    // a completion the scheduler would start another scrub
                    // once the request's grace is over, and again after it.
                    let end = s.scan.ended_at.unwrap_or(s.at);
                    completed = self.book.completed(&s.pool, end);
                }
            }
            if let Some((pool, _)) = &scan {
                self.save_scan_marks(pool, completed);
            }
        }
    }

    /// Persists what the deriver knows of `pool`'s open scans and last
    /// scan ends if it changed (or if `changed` already).
    fn save_scan_marks(&mut self, pool: &str, mut changed: bool) {
        if let Some(mark) = self.deriver.resilver_mark(pool) {
            changed |= self.book.resilver(pool, mark);
        }
        if let Some(end) = self.deriver.known_scrub_end(pool) {
            changed |= self.book.scrub_ended(pool, end);
        }
        if self.deriver.published_state(pool).is_some() || self.book.get(pool).scrub_open {
            changed |= self.book.scrub_open(pool, self.deriver.scrub_open(pool));
        }
        if changed {
            self.save_book();
        }
    }

    /// Publishes what a ZFS event or udev changed between two polls. A pool
    /// state among them goes into the snapshot too, so the report and the
    /// health say the same until the next poll confirms it; a poll already
    /// running read the pool before the change and must not undo it.
    fn publish_between_polls(&mut self, events: Vec<StorageEvent>) {
        if self.poll_running && !events.is_empty() {
            self.poll_stale = true;
        }
        let mut changed = false;
        for e in &events {
            if let StorageEvent::PoolState(p) = e {
                let status = self.deriver.last_status(&p.pool).cloned();
                if let (Some(status), Some(snap)) = (status, self.snapshots.get_mut(&p.pool)) {
                    snap.status = status;
                    changed = true;
                }
            }
        }
        self.publish(events);
        if changed {
            self.update_health();
        }
    }

    fn save_book(&self) {
        // A few hundred bytes on the state directory (boot disk, not the
        // pool); a failure is logged: the worst outcome is an early scrub.
        if let Err(e) = write_json(&self.cfg.state_dir.join("scrub.json"), &self.book) {
            tracing::error!(error = %e, "could not persist the scrub book");
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut irx: mpsc::Receiver<Internal>) {
        self.spawn_follower();
        self.spawn_resume_provisioning();
        self.start_poll();
        let mut poll = tokio::time::interval(self.cfg.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut house = tokio::time::interval(self.cfg.housekeeping_interval);
        house.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None | Some(Command::Shutdown) => break,
                    Some(c) => self.command(c),
                },
                Some(msg) = irx.recv() => self.internal(msg),
                _ = poll.tick() => self.start_poll(),
                _ = house.tick() => self.housekeeping(),
            }
        }
    }

    fn update_health(&self) {
        let h = self.compute_health();
        self.health.send_if_modified(|cur| {
            if *cur == h {
                false
            } else {
                tracing::info!(state = %h.state, reason = %h.reason, "storage health");
                *cur = h;
                true
            }
        });
    }

    fn compute_health(&self) -> Health {
        let mk = |state, reason: String| Health { state, reason };
        if let Some(p) = &self.zfs_problem {
            return mk(ComponentState::Failed, format!("ZFS not answering: {p}"));
        }
        if !self.polled_once {
            return mk(
                ComponentState::Starting,
                "waiting for the first ZFS poll".to_owned(),
            );
        }
        if self.snapshots.is_empty() {
            return mk(
                ComponentState::Unavailable,
                "no pool; create one with `appliancectl storage create-pool`".to_owned(),
            );
        }
        let report = storage_report(
            &self.snapshots.values().cloned().collect::<Vec<_>>(),
            self.now(),
            None,
        );
        let mut reasons = report.reasons.clone();
        reasons.extend(self.provision_problems.iter().cloned());
        match report.status {
            StorageStatus::Unavailable => mk(ComponentState::Failed, reasons.join("; ")),
            StorageStatus::Critical | StorageStatus::Degraded => {
                mk(ComponentState::Degraded, reasons.join("; "))
            }
            StorageStatus::Healthy => {
                if let Some(f) = &self.follower_problem {
                    mk(
                        ComponentState::Degraded,
                        format!("ZFS event follower down ({f}); polling only"),
                    )
                } else if !self.provision_problems.is_empty() {
                    mk(ComponentState::Degraded, self.provision_problems.join("; "))
                } else {
                    mk(
                        ComponentState::Ready,
                        format!("{} ({})", report.redundancy, report.status),
                    )
                }
            }
        }
    }

    // ------------------------------------------------------------ polling

    fn start_poll(&mut self) {
        if self.poll_running {
            self.poll_again = true;
            return;
        }
        let now_ms = self.now_ms();
        if let Err(open) = self.breaker.allow(now_ms) {
            tracing::debug!(%open, "poll skipped: breaker open");
            // Nobody waits for a poll that will not run: answer from the
            // last known state.
            let w = std::mem::take(&mut self.waiting);
            self.answer(w);
            return;
        }
        self.poll_running = true;
        self.poll_started = self.now();
        self.poll_again = false;
        self.waiting_inflight.append(&mut self.waiting);
        let zfs = self.zfs.clone();
        let timeout = self.cfg.call_timeout;
        let retry = self.cfg.retry;
        let itx = self.itx.clone();
        tokio::spawn(async move {
            let res = async {
                let pools = call(timeout, retry, "zpool list", || zfs.pool_list()).await?;
                let mut out = Vec::new();
                for list in pools {
                    let name = list.name.clone();
                    let status = call(timeout, retry, &format!("zpool status {name}"), || {
                        zfs.pool_status(&name)
                    })
                    .await;
                    let datasets = match &status {
                        Err(e) if e.is_timeout() => Err(e.clone()),
                        _ => {
                            call(timeout, retry, &format!("zfs list -r {name}"), || {
                                zfs.dataset_list(&name)
                            })
                            .await
                        }
                    };
                    out.push(PolledPool {
                        name,
                        list,
                        status,
                        datasets,
                    });
                }
                Ok(out)
            }
            .await;
            let _ = itx.send(Internal::Polled(res)).await;
        });
    }

    fn apply_poll(&mut self, res: Result<Vec<PolledPool>, ZfsError>) {
        self.poll_running = false;
        let stale = std::mem::take(&mut self.poll_stale);
        let now = self.now();
        let now_ms = self.now_ms();
        match res {
            Err(e) => {
                if counts_as_failure(&e) {
                    self.breaker.failure(now_ms, &e.to_string());
                    self.zfs_problem = Some(e.to_string());
                    let pools: Vec<String> = self.snapshots.keys().cloned().collect();
                    for p in pools {
                        let ev = self.deriver.observe_unreachable(&p, &e.to_string(), now);
                        self.publish(ev);
                    }
                } else {
                    tracing::warn!(error = %e, "zpool list failed");
                }
            }
            Ok(pools) => {
                let mut any_failure = None;
                let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
                for p in pools {
                    match (p.status, p.datasets) {
                        (Ok(status), datasets) => {
                            let datasets = match datasets {
                                Ok(d) => d,
                                Err(e) => {
                                    if counts_as_failure(&e) {
                                        any_failure = Some(e.to_string());
                                    }
                                    self.snapshots
                                        .get(&p.name)
                                        .map(|s| s.datasets.clone())
                                        .unwrap_or_default()
                                }
                            };
                            if self.book.saw_pool(&p.name, now) {
                                // At once: the first scheduled scrub is due
                                // a threshold after this, not after the
                                // first poll of the next restart.
                                self.save_book();
                            }
                            let mut status = status;
                            crate::derive::mark_gone(&mut status, &self.gone);
                            let mut snap = PoolSnapshot {
                                status,
                                list: Some(p.list),
                                datasets,
                                as_of: self.poll_started,
                            };
                            if stale {
                                // Keep the state the event published; the
                                // poll queued behind this one brings it all.
                                if let Some(st) = self.deriver.last_status(&p.name) {
                                    snap.status = st.clone();
                                }
                            } else {
                                let ev = self.deriver.observe_snapshot(&snap, now);
                                self.publish(ev);
                                // An end seen without an event (at first
                                // sight) is the one the next start compares with.
                                self.save_scan_marks(&p.name, false);
                            }
                            for d in &snap.datasets {
                                let ev =
                                    self.quotas
                                        .observe(&d.name, d.used, d.available, d.quota, now);
                                self.publish(ev.into_iter().map(StorageEvent::Quota).collect());
                            }
                            self.snapshots.insert(p.name.clone(), snap);
                        }
                        (Err(e), _) => {
                            if counts_as_failure(&e) {
                                any_failure = Some(e.to_string());
                                let ev =
                                    self.deriver
                                        .observe_unreachable(&p.name, &e.to_string(), now);
                                self.publish(ev);
                            }
                        }
                    }
                }
                let gone: Vec<String> = self
                    .snapshots
                    .keys()
                    .filter(|k| !names.contains(k))
                    .cloned()
                    .collect();
                for g in gone {
                    self.snapshots.remove(&g);
                    let ev = self.deriver.observe_absent(&g, now);
                    self.publish(ev);
                }
                // Disks no longer in any pool (replaced) are not watched.
                let members: BTreeSet<String> = self
                    .snapshots
                    .values()
                    .flat_map(|s| s.status.root.leaves())
                    .map(|l| disk_id(&l.name))
                    .collect();
                self.gone.retain(|id| members.contains(id));
                let present: Vec<String> = self
                    .snapshots
                    .values()
                    .flat_map(|s| s.datasets.iter().map(|d| d.name.clone()))
                    .collect();
                self.quotas
                    .retain_datasets(&present.iter().map(String::as_str).collect::<Vec<_>>());
                match any_failure {
                    Some(f) => {
                        self.breaker.failure(now_ms, &f);
                        self.zfs_problem = Some(f);
                    }
                    None => {
                        self.breaker.success();
                        self.zfs_problem = None;
                    }
                }
                self.polled_once = true;
            }
        }
        let hb = self.deriver.tick(now);
        self.publish(hb);
        let w = std::mem::take(&mut self.waiting_inflight);
        self.answer(w);
        self.update_health();
        if self.poll_again {
            self.start_poll();
        }
    }

    // ------------------------------------------------------------ follower

    fn spawn_follower(&self) {
        let zfs = self.zfs.clone();
        let itx = self.itx.clone();
        let timeout = self.cfg.call_timeout;
        let (first, cap) = self.cfg.follower_backoff;
        tokio::spawn(async move {
            let mut delay = first;
            loop {
                let started = tokio::time::Instant::now();
                let reason = match tokio::time::timeout(timeout, zfs.follow_events()).await {
                    Err(_) => format!("zpool events -f did not start within {timeout:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(mut f)) => {
                        if itx.send(Internal::FollowerUp).await.is_err() {
                            return;
                        }
                        let mut reason = "event stream closed".to_owned();
                        while let Some(item) = f.next().await {
                            if let Err(e) = &item {
                                reason = e.to_string();
                            }
                            if itx.send(Internal::Zfs(item)).await.is_err() {
                                return;
                            }
                        }
                        reason
                    }
                };
                if itx.send(Internal::FollowerDown(reason)).await.is_err() {
                    return;
                }
                // A follower that ran for a while was healthy: start over.
                if started.elapsed() > cap {
                    delay = first;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(cap);
            }
        });
    }

    fn spawn_resume_provisioning(&self) {
        let p = Provisioner::new(self.zfs.clone(), self.cfg.provision.clone());
        let itx = self.itx.clone();
        let ops = self.ops.clone();
        let timeout = self.cfg.provision_timeout;
        tokio::spawn(async move {
            let _g = ops.lock().await;
            let problems = match tokio::time::timeout(timeout, p.resume_all()).await {
                Err(_) => vec![format!("resuming an unfinished pool creation timed out after {timeout:?}")],
                Ok(results) => results
                    .into_iter()
                    .filter_map(|r| match r {
                        Ok(o) => {
                            tracing::info!(pool = %o.pool, "completed an interrupted pool creation");
                            None
                        }
                        Err(e) => Some(format!("unfinished pool creation: {e}")),
                    })
                    .collect(),
            };
            let _ = itx.send(Internal::ProvisionResumed(problems)).await;
        });
    }

    // ------------------------------------------------------------ messages

    fn internal(&mut self, msg: Internal) {
        let now = self.now();
        match msg {
            Internal::Polled(r) => self.apply_poll(r),
            Internal::Zfs(Ok(EventItem::Event(ev))) => {
                let out = self.deriver.observe_zfs_event(&ev, now);
                // ZFS itself has a gone disk working again: it is back, even
                // if udev's add was lost (a monitor overflow) or comes later.
                for e in &out.events {
                    if let StorageEvent::Disk(d) = e {
                        if d.action == DiskAction::Online {
                            self.gone.remove(&d.disk);
                        }
                    }
                }
                self.publish_between_polls(out.events);
                if out.repoll {
                    self.start_poll();
                }
            }
            Internal::Zfs(Ok(EventItem::Dropped(n))) => {
                tracing::warn!(dropped = n, "ZFS dropped events; re-polling");
                self.start_poll();
            }
            Internal::Zfs(Err(e)) => tracing::warn!(error = %e, "ZFS event stream error"),
            Internal::FollowerUp => {
                self.follower_problem = None;
                // Anything may have happened while it was down.
                self.start_poll();
                self.update_health();
            }
            Internal::FollowerDown(reason) => {
                tracing::warn!(%reason, "ZFS event follower ended; restarting with backoff");
                self.follower_problem = Some(reason);
                self.update_health();
            }
            Internal::OpDone(err) => {
                let now_ms = self.now_ms();
                if let Some(e) = err.filter(counts_as_failure) {
                    self.breaker.failure(now_ms, &e.to_string());
                }
                self.start_poll();
            }
            Internal::QuotaRead(dataset, fresh, reply) => {
                let pool = dataset.split('/').next().unwrap_or_default().to_owned();
                if let Some(s) = self.snapshots.get_mut(&pool) {
                    for d in fresh {
                        match s.datasets.iter_mut().find(|x| x.name == d.name) {
                            Some(x) => *x = d,
                            None => s.datasets.push(d),
                        }
                    }
                }
                if let Some(d) = self.find_dataset(&dataset).cloned() {
                    let ev = self
                        .quotas
                        .observe(&d.name, d.used, d.available, d.quota, now);
                    self.publish(ev.into_iter().map(StorageEvent::Quota).collect());
                }
                let _ = reply.send(self.quota_status(Some(&dataset)));
                self.start_poll();
            }
            Internal::ScrubDone(pool, reply) => {
                self.waiting.push(Waiter::Scrub(pool, reply));
                self.start_poll();
            }
            Internal::ScheduledScrubFailed(pool, reason) => {
                tracing::warn!(%pool, %reason, "scheduled scrub could not start");
                self.book.request_failed(&pool);
                self.save_book();
            }
            Internal::DisksRead(snap, reply) => {
                let statuses: Vec<PoolStatus> =
                    self.snapshots.values().map(|s| s.status.clone()).collect();
                let _ = reply.send(snap.map(|s| list_disks(&s, &statuses, &self.cfg.disk_policy)));
            }
            Internal::ProvisionResumed(problems) => {
                self.provision_problems = problems;
                self.start_poll();
                self.update_health();
            }
        }
    }

    fn answer(&self, waiters: Vec<Waiter>) {
        for w in waiters {
            match w {
                Waiter::Refresh(tx) => {
                    let _ = tx.send(());
                }
                Waiter::Scrub(pool, reply) => {
                    let _ = reply.send(self.scrub_status(&pool));
                }
            }
        }
    }

    fn find_dataset(&self, name: &str) -> Option<&Dataset> {
        self.snapshots
            .values()
            .flat_map(|s| s.datasets.iter())
            .find(|d| d.name == name)
    }

    /// The last snapshot of the pool `dataset` (or a pool name) is in.
    fn pool_of(&self, dataset: &str) -> Result<&PoolSnapshot, StorageError> {
        let pool = dataset.split('/').next().unwrap_or_default();
        self.snapshots
            .get(pool)
            .ok_or_else(|| StorageError::NotFound {
                what: "pool",
                name: pool.to_owned(),
            })
    }

    /// Checks a `create_dataset` request against the last poll: a valid
    /// name, a child of an existing dataset of a known pool. `Ok(true)` when
    /// the dataset exists already.
    fn check_new_dataset(&self, name: &str) -> Result<bool, StorageError> {
        appliance_zfs::api::validate_dataset_name(name)
            .map_err(|e| StorageError::zfs("create dataset", name, e))?;
        let Some((parent, _)) = name.rsplit_once('/') else {
            return Err(StorageError::InvalidArgument {
                what: "dataset",
                value: name.to_owned(),
                reason: "a pool's root dataset is made by create-pool".to_owned(),
            });
        };
        let snap = self.pool_of(name)?;
        if snap.datasets.iter().any(|d| d.name == name) {
            return Ok(true);
        }
        if !snap.datasets.iter().any(|d| d.name == parent) {
            return Err(StorageError::NotFound {
                what: "dataset",
                name: parent.to_owned(),
            });
        }
        Ok(false)
    }

    fn quota_status(&self, dataset: Option<&str>) -> Result<Vec<QuotaStatus>, StorageError> {
        let all: Vec<&Dataset> = self
            .snapshots
            .values()
            .flat_map(|s| s.datasets.iter())
            .filter(|d| dataset.is_none_or(|n| d.name == n))
            .collect();
        if let (Some(n), true) = (dataset, all.is_empty()) {
            return Err(StorageError::NotFound {
                what: "dataset",
                name: n.to_owned(),
            });
        }
        Ok(all
            .into_iter()
            .map(|d| {
                let (pct, _) = usage_percent(d.used, d.available, d.quota);
                QuotaStatus {
                    dataset: d.name.clone(),
                    quota_bytes: d.quota,
                    used_bytes: d.used,
                    available_bytes: d.available,
                    used_percent: (pct * 100.0).round() / 100.0,
                    levels_crossed: self.quotas.crossed(&d.name),
                }
            })
            .collect())
    }

    fn scrub_status(&self, pool: &str) -> Result<ScrubStatus, StorageError> {
        let snap = self.pool_of(pool)?;
        let now = self.now();
        let record = self.book.get(pool);
        let schedule = self.cfg.schedule(pool);
        let decision = decide(now, &schedule, &record, activity(&snap.status));
        let next_due_at = match decision {
            ScrubDecision::NotDue { due_at } => Some(due_at),
            ScrubDecision::OutsideWindow { opens_at } => Some(opens_at),
            ScrubDecision::Start => Some(now),
            _ => None,
        };
        Ok(ScrubStatus {
            pool: pool.to_owned(),
            scan: snap.status.scan.as_ref().map(|s| scan_report(s, now)),
            last_completed_at: record.last_completed,
            next_due_at,
            schedule: decision.describe(),
        })
    }

    fn housekeeping(&mut self) {
        let now = self.now();
        let hb = self.deriver.tick(now);
        self.publish(hb);
        if self.zfs_problem.is_some() {
            return;
        }
        let pools: Vec<(String, PoolActivity)> = self
            .snapshots
            .iter()
            .map(|(n, s)| (n.clone(), activity(&s.status)))
            .collect();
        for (pool, act) in pools {
            let d = decide(now, &self.cfg.schedule(&pool), &self.book.get(&pool), act);
            if d != ScrubDecision::Start {
                continue;
            }
            // Intent first, then the command.
            self.book.requested(&pool, now);
            self.save_book();
            tracing::info!(%pool, "starting a scheduled scrub");
            let zfs = self.zfs.clone();
            let itx = self.itx.clone();
            let ops = self.ops.clone();
            let timeout = self.cfg.change_timeout;
            let retry = self.cfg.retry;
            tokio::spawn(async move {
                let _g = ops.lock().await;
                let r = call(timeout, retry, &format!("zpool scrub {pool}"), || {
                    zfs.scrub(&pool, ScrubAction::Start)
                })
                .await;
                if let Err(e) = &r {
                    let _ = itx
                        .send(Internal::ScheduledScrubFailed(pool.clone(), e.to_string()))
                        .await;
                }
                let _ = itx.send(Internal::OpDone(r.err())).await;
            });
        }
    }

    /// Refuses changes while the breaker is open.
    fn gate(&mut self) -> Result<(), StorageError> {
        let now_ms = self.now_ms();
        if self.breaker.is_open(now_ms) || self.zfs_problem.is_some() {
            return Err(StorageError::Unavailable {
                reason: format!(
                    "ZFS is not answering ({}); try again later",
                    self.zfs_problem
                        .as_deref()
                        .or(self.breaker.last_failure())
                        .unwrap_or("timeouts")
                ),
            });
        }
        Ok(())
    }

    fn command(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Shutdown => {}
            Command::Hotplug(change) => {
                let pool = self
                    .snapshots
                    .values()
                    .find(|s| {
                        s.status
                            .root
                            .leaves()
                            .iter()
                            .any(|l| disk_id(&l.name) == change.id)
                    })
                    .map(|s| s.status.name.clone());
                // Every removal is remembered, a member's or not: before the
                // first poll no pool is known yet, and the next poll drops
                // the ids that belong to no pool.
                if change.action == DiskAction::Removed {
                    self.gone.insert(change.id.clone());
                }
                match (&change.action, pool) {
                    // A pool member pulled: REMOVED now (and DEGRADED if that
                    // lowers the margin), whether or not ZFS has noticed; the
                    // polls keep it so until udev sees the disk again.
                    (DiskAction::Removed, Some(pool)) => {
                        let mut ev = self.deriver.observe_disk_gone(&pool, &change.id, now);
                        locate(&mut ev, &change);
                        self.publish_between_polls(ev);
                    }
                    (action, pool) => {
                        if *action != DiskAction::Removed {
                            self.gone.remove(&change.id);
                        }
                        self.publish(vec![disk_event(&change, pool.as_deref(), now)]);
                    }
                }
                self.start_poll();
            }
            Command::Refresh(done) => {
                self.waiting.push(Waiter::Refresh(done));
                self.start_poll();
            }
            Command::Report(reply) => {
                let snaps: Vec<PoolSnapshot> = self.snapshots.values().cloned().collect();
                let _ = reply.send(Ok(storage_report(&snaps, now, self.zfs_problem.as_deref())));
            }
            Command::QuotaGet(ds, reply) => {
                let _ = reply.send(self.quota_status(ds.as_deref()));
            }
            Command::ScrubStatus(pool, reply) => {
                let _ = reply.send(self.scrub_status(&pool));
            }
            Command::Admission(dataset, bytes, reply) => {
                let _ = reply.send(self.admission(&dataset, bytes));
            }
            Command::Disks(reply) => {
                let inv = self.disks.clone();
                let itx = self.itx.clone();
                let timeout = self.cfg.call_timeout;
                tokio::spawn(async move {
                    let snap = match tokio::time::timeout(timeout, inv.snapshot()).await {
                        Ok(r) => r.map_err(StorageError::from),
                        Err(_) => Err(StorageError::Unavailable {
                            reason: format!("reading the disks timed out after {timeout:?}"),
                        }),
                    };
                    let _ = itx.send(Internal::DisksRead(snap, reply)).await;
                });
            }
            Command::QuotaSet(dataset, bytes, reply) => {
                if let Err(e) = self.gate().and_then(|()| {
                    appliance_zfs::api::validate_dataset_name(&dataset)
                        .map_err(|e| StorageError::zfs("set quota", &dataset, e))
                }) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let zfs = self.zfs.clone();
                let itx = self.itx.clone();
                let ops = self.ops.clone();
                let (ct, qt, retry) = (
                    self.cfg.change_timeout,
                    self.cfg.call_timeout,
                    self.cfg.retry,
                );
                tokio::spawn(async move {
                    let _g = ops.lock().await;
                    let r = call(ct, retry, &format!("zfs set quota {dataset}"), || {
                        zfs.set_quota(&dataset, bytes)
                    })
                    .await;
                    if let Err(e) = r {
                        let _ = itx.send(Internal::OpDone(Some(e.clone()))).await;
                        let _ = reply.send(Err(StorageError::zfs("set quota", &dataset, e)));
                        return;
                    }
                    match call(qt, retry, &format!("zfs list {dataset}"), || {
                        zfs.dataset_list(&dataset)
                    })
                    .await
                    {
                        Ok(fresh) => {
                            let _ = itx.send(Internal::QuotaRead(dataset, fresh, reply)).await;
                        }
                        Err(e) => {
                            let _ = itx.send(Internal::OpDone(Some(e.clone()))).await;
                            let _ =
                                reply.send(Err(StorageError::zfs("read back quota", &dataset, e)));
                        }
                    }
                });
            }
            Command::CreateDataset { name, quota, reply } => {
                let exists = match self.gate().and_then(|()| self.check_new_dataset(&name)) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                    Ok(exists) => exists,
                };
                let zfs = self.zfs.clone();
                let itx = self.itx.clone();
                let ops = self.ops.clone();
                let record = self.cfg.state_dir.join(DATASETS_RECORD);
                let (ct, retry) = (self.cfg.change_timeout, self.cfg.retry);
                tokio::spawn(async move {
                    let _g = ops.lock().await;
                    let mut spec = DatasetSpec::new(name.clone());
                    spec.quota = quota;
                    // An existing dataset is recorded again all the same:
                    // the record's change is what runs the mount unit, and a
                    // dataset that is still not mounted gets another go.
                    let created = if exists {
                        false
                    } else {
                        match call(ct, retry, &format!("zfs create {name}"), || {
                            zfs.create_dataset(&spec)
                        })
                        .await
                        {
                            Ok(()) => true,
                            // A retried create whose first attempt went through.
                            Err(e) if e.kind() == Some(FailureKind::AlreadyExists) => false,
                            Err(e) => {
                                let _ = itx.send(Internal::OpDone(Some(e.clone()))).await;
                                let _ =
                                    reply.send(Err(StorageError::zfs("create dataset", &name, e)));
                                return;
                            }
                        }
                    };
                    let n = name.clone();
                    let recorded =
                        tokio::task::spawn_blocking(move || record_dataset(&record, &n, quota))
                            .await
                            .unwrap_or_else(|e| {
                                Err(StateFileError::Io {
                                    path: PathBuf::from(DATASETS_RECORD),
                                    source: std::io::Error::other(e.to_string()),
                                })
                            });
                    let _ = itx.send(Internal::OpDone(None)).await;
                    let _ = reply.send(recorded.map(|()| created).map_err(StorageError::from));
                });
            }
            Command::Scrub(pool, command, reply) => {
                let check = self.gate().and_then(|()| {
                    let snap = self
                        .snapshots
                        .get(&pool)
                        .ok_or_else(|| StorageError::NotFound {
                            what: "pool",
                            name: pool.clone(),
                        })?;
                    if matches!(command, ScrubCommand::Start | ScrubCommand::Resume)
                        && snap.status.resilvering()
                    {
                        return Err(StorageError::Conflict {
                            pool: pool.clone(),
                            reason: "a resilver is running; scrub after it finishes".to_owned(),
                        });
                    }
                    Ok(())
                });
                if let Err(e) = check {
                    let _ = reply.send(Err(e));
                    return;
                }
                let action = match command {
                    ScrubCommand::Start | ScrubCommand::Resume => ScrubAction::Start,
                    ScrubCommand::Pause => ScrubAction::Pause,
                    ScrubCommand::Stop => ScrubAction::Stop,
                };
                let zfs = self.zfs.clone();
                let itx = self.itx.clone();
                let ops = self.ops.clone();
                let (ct, retry) = (self.cfg.change_timeout, self.cfg.retry);
                tokio::spawn(async move {
                    let _g = ops.lock().await;
                    let r = call(ct, retry, &format!("zpool scrub {pool}"), || {
                        zfs.scrub(&pool, action)
                    })
                    .await;
                    match r {
                        Ok(()) => {
                            let _ = itx.send(Internal::ScrubDone(pool, reply)).await;
                        }
                        Err(e) => {
                            let _ = itx.send(Internal::OpDone(Some(e.clone()))).await;
                            let _ = reply.send(Err(StorageError::zfs("scrub", &pool, e)));
                        }
                    }
                });
            }
            Command::Replace {
                pool,
                old,
                new,
                force,
                reply,
            } => {
                let check = self.gate().and_then(|()| {
                    let snap = self
                        .snapshots
                        .get(&pool)
                        .ok_or_else(|| StorageError::NotFound {
                            what: "pool",
                            name: pool.clone(),
                        })?;
                    let want = disk_id(&old);
                    let leaf = snap
                        .status
                        .root
                        .leaves()
                        .into_iter()
                        .find(|l| {
                            disk_id(&l.name) == want || l.path.as_deref() == Some(old.as_str())
                        })
                        .ok_or_else(|| StorageError::NotFound {
                            what: "disk",
                            name: format!("{old} in pool {pool}"),
                        })?;
                    Ok(leaf.name.clone())
                });
                let old_name = match check {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let statuses: Vec<PoolStatus> =
                    self.snapshots.values().map(|s| s.status.clone()).collect();
                let (zfs, inv, itx, ops) = (
                    self.zfs.clone(),
                    self.disks.clone(),
                    self.itx.clone(),
                    self.ops.clone(),
                );
                let policy = self.cfg.disk_policy.clone();
                let (qt, ct, retry) = (
                    self.cfg.call_timeout,
                    self.cfg.change_timeout,
                    self.cfg.retry,
                );
                tokio::spawn(async move {
                    let _g = ops.lock().await;
                    let snap = match tokio::time::timeout(qt, inv.snapshot()).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            let _ = reply.send(Err(e.into()));
                            return;
                        }
                        Err(_) => {
                            let _ = reply.send(Err(StorageError::Unavailable {
                                reason: "reading the disks timed out".to_owned(),
                            }));
                            return;
                        }
                    };
                    let members = pool_members(&snap, &statuses);
                    if let Err(p) = check_disk(&snap, &new, force, &members, &policy) {
                        let _ = reply.send(Err(StorageError::DiskRefused(p)));
                        return;
                    }
                    let r = call(ct, retry, &format!("zpool replace {pool}"), || {
                        zfs.replace(&pool, &old_name, &new)
                    })
                    .await;
                    let _ = itx.send(Internal::OpDone(r.as_ref().err().cloned())).await;
                    let _ = reply.send(
                        r.map(|()| {
                            format!(
                                "replacing {old_name} with {new} in pool {pool}; resilver started"
                            )
                        })
                        .map_err(|e| {
                            StorageError::zfs("replace", format!("{old_name} in {pool}"), e)
                        }),
                    );
                });
            }
            Command::CreatePool {
                name,
                layout,
                disks,
                force,
                reply,
            } => {
                if let Err(e) = self.gate() {
                    let _ = reply.send(Err(e));
                    return;
                }
                let statuses: Vec<PoolStatus> =
                    self.snapshots.values().map(|s| s.status.clone()).collect();
                let (inv, itx, ops) = (self.disks.clone(), self.itx.clone(), self.ops.clone());
                let policy = self.cfg.disk_policy.clone();
                let provisioner = Provisioner::new(self.zfs.clone(), self.cfg.provision.clone());
                let (qt, pt) = (self.cfg.call_timeout, self.cfg.provision_timeout);
                tokio::spawn(async move {
                    let _g = ops.lock().await;
                    // A request that already completed (or is being
                    // completed) does not need the disks to be free.
                    let recorded = provisioner
                        .intents()
                        .ok()
                        .and_then(|v| v.into_iter().find(|i| i.pool == name));
                    if recorded.is_none() {
                        let snap = match tokio::time::timeout(qt, inv.snapshot()).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                let _ = reply.send(Err(e.into()));
                                return;
                            }
                            Err(_) => {
                                let _ = reply.send(Err(StorageError::Unavailable {
                                    reason: "reading the disks timed out".to_owned(),
                                }));
                                return;
                            }
                        };
                        let members = pool_members(&snap, &statuses);
                        if let Err(e) =
                            check_create(&snap, layout, &disks, force, &members, &policy)
                        {
                            let _ = reply.send(Err(e.into()));
                            return;
                        }
                    }
                    let r = match tokio::time::timeout(pt, provisioner.create_pool(&name, layout, &disks, force)).await {
                        Ok(r) => r.map_err(StorageError::from),
                        Err(_) => Err(StorageError::Unavailable {
                            reason: format!("creating pool {name} timed out after {pt:?}; it is resumed at the next start"),
                        }),
                    };
                    let _ = itx.send(Internal::OpDone(None)).await;
                    let _ = reply.send(r);
                });
            }
        }
    }

    fn admission(&self, dataset: &str, bytes: u64) -> Result<Admission, StorageError> {
        if let Some(p) = &self.zfs_problem {
            return Err(StorageError::Unavailable {
                reason: format!("ZFS is not answering ({p})"),
            });
        }
        let snap = self.pool_of(dataset)?;
        if pool_state_unusable(&snap.status.state) {
            return Err(StorageError::Unavailable {
                reason: format!("pool {} is {}", snap.status.name, snap.status.state),
            });
        }
        let d = self
            .find_dataset(dataset)
            .ok_or_else(|| StorageError::NotFound {
                what: "dataset",
                name: dataset.to_owned(),
            })?;
        let mut available = d.available;
        if let Some(q) = d.quota {
            available = available.min(q.saturating_sub(d.used));
        }
        Ok(if bytes > available {
            Admission::QuotaExceeded {
                needed: bytes,
                available,
            }
        } else {
            Admission::Admitted { available }
        })
    }
}

/// What the scheduler needs to know about a pool.
fn activity(status: &PoolStatus) -> PoolActivity {
    if pool_state_unusable(&status.state) {
        return PoolActivity::Unusable;
    }
    match &status.scan {
        Some(s) if s.state == ScanState::Running && s.function == ScanFunction::Resilver => {
            PoolActivity::Resilvering
        }
        Some(s) if s.state == ScanState::Running => PoolActivity::Scrubbing,
        Some(s) if s.state == ScanState::Paused => PoolActivity::ScrubPaused,
        _ => PoolActivity::Idle,
    }
}

/// Udev names the bay and serial of the disk it saw go: the operator's
/// REMOVED event carries them (ZFS knows neither).
fn locate(events: &mut [StorageEvent], change: &DiskChange) {
    for e in events {
        if let StorageEvent::Disk(d) = e {
            if d.disk == change.id {
                d.bay.clone_from(&change.bay);
                d.serial.clone_from(&change.serial);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `appliancectl` waits `answer_within` for an answer; a change the
    /// manager is still allowed to finish must not be reported as failed by
    /// the client first (first boot's create-pool took over 30 s under TCG
    /// and the client gave up while the pool was being made).
    #[test]
    fn clients_wait_longer_than_the_manager_bounds_each_request() {
        let cfg = ManagerConfig::new("/nonexistent");
        let create = StorageRequest::CreatePool {
            name: "tank".to_owned(),
            layout: appliance_types::storage::StorageLayout::Raidz2,
            disks: Vec::new(),
            force: false,
        };
        assert!(create.answer_within() > cfg.provision_timeout);
        let changes = [
            StorageRequest::Replace {
                pool: "tank".to_owned(),
                old: "a".to_owned(),
                new: "b".to_owned(),
                force: false,
            },
            StorageRequest::Scrub {
                pool: "tank".to_owned(),
                command: ScrubCommand::Start,
            },
            StorageRequest::QuotaSet {
                dataset: "tank/documents".to_owned(),
                bytes: None,
            },
        ];
        for r in changes {
            assert!(r.is_mutating());
            // Replace reads the disks (a query) before the change.
            assert!(
                r.answer_within() > cfg.call_timeout + cfg.change_timeout,
                "{r:?}"
            );
        }
        assert!(StorageRequest::Report.answer_within() >= Duration::from_secs(30));
    }
}
