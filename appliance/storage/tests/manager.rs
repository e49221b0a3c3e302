//! The manager actor against the shared fake ZFS with a fake clock (tokio's
//! paused time drives both the timers and the wall clock): provisioning,
//! quota alerts, scrubs, disks pulled one, two and three at a time, a hung
//! pool, replace and resilver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance_storage::disks::{EligibilityError, FakeDisks};
use appliance_storage::{
    CollectingSink, Health, ManagerConfig, StorageError, StorageManager, TokioClock,
};
use appliance_types::health::ComponentState;
use appliance_types::storage::{
    Admission, DiskAction, QuotaDirection, ScanEventPhase, ScrubCommand, StorageEvent,
    StorageLayout, StorageStatus,
};
use appliance_zfs::fake::FakeZfs;
use appliance_zfs::{
    Dataset, DatasetSpec, DeviceState, ErrorCounts, EventFollower, Pool, PoolSpec, PoolStatus,
    Properties, ScrubAction, Zfs, ZfsError,
};
use async_trait::async_trait;

/// 2026-11-22 19:00 UTC.
const T0: u64 = 1_795_374_000;
const MB: u64 = 1 << 20;

/// FakeZfs, plus calls that never return for chosen pools (the way
/// `zpool`/`zfs` sleep in D state on a suspended pool).
#[derive(Debug)]
struct HangingZfs {
    inner: Arc<FakeZfs>,
    hung: Mutex<BTreeSet<String>>,
    /// While set, `pool_status` reads the pool and then waits for this
    /// before answering (a poll that read the pool before a change).
    held: Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// While set, `pool_status` answers without scan start and end times,
    /// like the text form of OpenZFS 2.1 (`zpool status -p`).
    text_form: Mutex<bool>,
}

impl HangingZfs {
    async fn maybe_hang(&self, pool: &str) {
        let hung = self
            .hung
            .lock()
            .unwrap()
            .contains(pool.split('/').next().unwrap_or(pool));
        if hung {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl Zfs for HangingZfs {
    async fn pool_status(&self, pool: &str) -> Result<PoolStatus, ZfsError> {
        self.maybe_hang(pool).await;
        let mut status = self.inner.pool_status(pool).await;
        if *self.text_form.lock().unwrap() {
            if let Ok(Some(scan)) = status.as_mut().map(|s| s.scan.as_mut()) {
                scan.start_time = None;
                scan.end_time = None;
            }
        }
        let held = self.held.lock().unwrap().clone();
        if let Some(gate) = held {
            gate.notified().await;
        }
        status
    }
    async fn pool_list(&self) -> Result<Vec<Pool>, ZfsError> {
        self.inner.pool_list().await
    }
    async fn pool_properties(&self, pool: &str) -> Result<Properties, ZfsError> {
        self.maybe_hang(pool).await;
        self.inner.pool_properties(pool).await
    }
    async fn dataset_list(&self, root: &str) -> Result<Vec<Dataset>, ZfsError> {
        self.maybe_hang(root).await;
        self.inner.dataset_list(root).await
    }
    async fn dataset_properties(&self, dataset: &str) -> Result<Properties, ZfsError> {
        self.maybe_hang(dataset).await;
        self.inner.dataset_properties(dataset).await
    }
    async fn create_pool(&self, spec: &PoolSpec) -> Result<(), ZfsError> {
        self.inner.create_pool(spec).await
    }
    async fn create_dataset(&self, spec: &DatasetSpec) -> Result<(), ZfsError> {
        self.maybe_hang(&spec.name).await;
        self.inner.create_dataset(spec).await
    }
    async fn set_quota(&self, dataset: &str, quota: Option<u64>) -> Result<(), ZfsError> {
        self.maybe_hang(dataset).await;
        self.inner.set_quota(dataset, quota).await
    }
    async fn get_quota(&self, dataset: &str) -> Result<Option<u64>, ZfsError> {
        self.maybe_hang(dataset).await;
        self.inner.get_quota(dataset).await
    }
    async fn scrub(&self, pool: &str, action: ScrubAction) -> Result<(), ZfsError> {
        self.maybe_hang(pool).await;
        self.inner.scrub(pool, action).await
    }
    async fn replace(&self, pool: &str, old: &str, new: &str) -> Result<(), ZfsError> {
        self.maybe_hang(pool).await;
        self.inner.replace(pool, old, new).await
    }
    async fn clear(&self, pool: &str, device: Option<&str>) -> Result<(), ZfsError> {
        self.maybe_hang(pool).await;
        self.inner.clear(pool, device).await
    }
    async fn follow_events(&self) -> Result<EventFollower, ZfsError> {
        self.inner.follow_events().await
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    cfg: ManagerConfig,
    fake: Arc<FakeZfs>,
    zfs: Arc<HangingZfs>,
    disks: Arc<FakeDisks>,
    sink: Arc<CollectingSink>,
    clock: Arc<TokioClock>,
    mgr: StorageManager,
}

fn serials() -> Vec<&'static str> {
    vec!["ZD1", "ZD2", "ZD3", "ZD4", "ZD5", "ZD6", "ZN2"]
}

fn by_id(serial: &str) -> String {
    format!("/dev/disk/by-id/virtio-{serial}")
}

fn six() -> Vec<String> {
    serials()[..6].iter().map(|s| by_id(s)).collect()
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let paths: Vec<String> = serials().iter().map(|s| by_id(s)).collect();
        let fake = Arc::new(FakeZfs::with_disks(&paths, 256 * MB));
        let zfs = Arc::new(HangingZfs {
            inner: fake.clone(),
            hung: Mutex::new(BTreeSet::new()),
            held: Mutex::new(None),
            text_form: Mutex::new(false),
        });
        // ZN2 is the spare disk, hot-added later.
        let disks = Arc::new(FakeDisks::new(FakeDisks::blank_disks(
            &serials()[..6],
            256 * MB,
        )));
        let mut cfg = ManagerConfig::new(&state_dir);
        cfg.provision.key_dir = dir.path().join("keys");
        let clock = Arc::new(TokioClock::new(T0));
        fake.set_time(T0);
        let sink = Arc::new(CollectingSink::new());
        let (mgr, _) = StorageManager::spawn(
            cfg.clone(),
            zfs.clone(),
            disks.clone(),
            sink.clone(),
            clock.clone(),
        );
        Self {
            _dir: dir,
            state_dir,
            cfg,
            fake,
            zfs,
            disks,
            sink,
            clock,
            mgr,
        }
    }

    /// Brings the fake's clock to the manager's.
    fn sync(&self) {
        use appliance_storage::Clock;
        self.fake.set_time(self.clock.now_unix());
    }

    async fn provisioned() -> Self {
        let rig = Self::new();
        rig.mgr
            .create_pool("tank".into(), StorageLayout::Raidz2, six(), false)
            .await
            .unwrap();
        rig.mgr.refresh().await.unwrap();
        rig
    }

    /// A provisioned rig with 100 MB of documents and a scrub under way
    /// (its first `progress` published).
    async fn scrubbing() -> Self {
        let rig = Self::provisioned().await;
        rig.fake
            .set_dataset_used("tank/documents", 100 * MB)
            .unwrap();
        rig.sync();
        rig.mgr
            .scrub("tank".into(), ScrubCommand::Start)
            .await
            .unwrap();
        rig.wait_events("progress", |e| count(e, "storage.scrub.tank.progress") == 1)
            .await;
        rig
    }

    /// [`Self::scrubbing`], that scrub completed, and an hour later a
    /// second one under way (its first `progress` published).
    async fn scrubbing_again() -> Self {
        let rig = Self::scrubbing().await;
        rig.finish_scan_after(30).await;
        rig.wait_events("finished", |e| count(e, "storage.scrub.tank.finished") == 1)
            .await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        rig.sync();
        rig.mgr
            .scrub("tank".into(), ScrubCommand::Start)
            .await
            .unwrap();
        rig.wait_events("progress", |e| count(e, "storage.scrub.tank.progress") == 2)
            .await;
        rig
    }

    /// A provisioned rig with 60 MB of documents whose ZD2 was pulled and
    /// replaced by the hot-added ZN2: the resilver's `started` is out.
    async fn resilvering() -> Self {
        let rig = Self::provisioned().await;
        rig.fake
            .set_dataset_used("tank/documents", 60 * MB)
            .unwrap();
        rig.fake
            .set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
            .unwrap();
        rig.disks.update(|s| {
            *s = FakeDisks::blank_disks(&serials(), 256 * MB);
        });
        rig.sync();
        rig.mgr
            .replace("tank".into(), by_id("ZD2"), by_id("ZN2"), false)
            .await
            .unwrap();
        rig.wait_events("resilver started", |e| {
            count(e, "storage.resilver.tank.started") == 1
        })
        .await;
        rig
    }

    /// After `secs` seconds, the running scan ends.
    async fn finish_scan_after(&self, secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        self.sync();
        self.fake.advance_scan("tank", u64::MAX / 2).unwrap();
    }

    /// The persisted scrub book, as text.
    fn book(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("scrub.json")).unwrap()
    }

    /// Spawns another manager on the rig's ZFS, disks and clock, with
    /// `sink` (as a restart of the daemon does).
    fn restart_with(
        &self,
        sink: Arc<dyn appliance_storage::EventSink>,
    ) -> (StorageManager, tokio::task::JoinHandle<()>) {
        StorageManager::spawn(
            self.cfg.clone(),
            self.zfs.clone(),
            self.disks.clone(),
            sink,
            self.clock.clone(),
        )
    }

    /// Starts a manager with `crashing`, a sink that panics the actor on
    /// the event under test, waits for that crash, then starts another and
    /// returns it with what it published at its first poll.
    async fn crash_then_restart(
        &self,
        crashing: Arc<dyn appliance_storage::EventSink>,
    ) -> (StorageManager, Vec<StorageEvent>) {
        let (mgr, actor) = self.restart_with(crashing);
        let _ = mgr.refresh().await;
        let end = tokio::time::timeout(Duration::from_secs(120), actor)
            .await
            .expect("no finished was published: the actor did not crash on it");
        assert!(end.is_err(), "the actor crashed on the finished");
        let (mgr, sink) = self.restarted();
        mgr.refresh().await.unwrap();
        (mgr, sink.snapshot())
    }

    /// Restarts the manager twice in a row (each polls once and shuts
    /// down); how many times each start published `subject`.
    async fn published_at_two_starts(&self, subject: &str) -> Vec<usize> {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (mgr, sink) = self.restarted();
            mgr.refresh().await.unwrap();
            seen.push(count(&sink.snapshot(), subject));
            mgr.shutdown().await;
        }
        seen
    }

    /// [`Self::restart_with`] a fresh collecting sink.
    fn restarted(&self) -> (StorageManager, Arc<CollectingSink>) {
        let sink = Arc::new(CollectingSink::new());
        let (mgr, _) = self.restart_with(sink.clone());
        (mgr, sink)
    }

    /// Replaces the rig's manager by one that scrubs daily, creates the
    /// pool with 50 MB of documents, and returns that manager and its sink.
    async fn with_daily_scrubs(&self) -> (StorageManager, Arc<CollectingSink>) {
        let mut cfg = self.cfg.clone();
        cfg.scrub.threshold_days = 1;
        self.mgr.shutdown().await;
        let sink = Arc::new(CollectingSink::new());
        let (mgr, _) = StorageManager::spawn(
            cfg,
            self.zfs.clone(),
            self.disks.clone(),
            sink.clone(),
            self.clock.clone(),
        );
        mgr.create_pool("tank".into(), StorageLayout::Raidz2, six(), false)
            .await
            .unwrap();
        mgr.refresh().await.unwrap();
        self.fake
            .set_dataset_used("tank/documents", 50 * MB)
            .unwrap();
        (mgr, sink)
    }

    /// Waits (in paused time) until `pred` holds for the events so far.
    async fn wait_events(
        &self,
        what: &str,
        pred: impl Fn(&[StorageEvent]) -> bool,
    ) -> Vec<StorageEvent> {
        for _ in 0..3000 {
            let ev = self.sink.snapshot();
            if pred(&ev) {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "timed out waiting for {what}; events: {:#?}",
            subjects(&self.sink.snapshot())
        );
    }

    async fn wait_health(&self, what: &str, pred: impl Fn(&Health) -> bool) -> Health {
        let mut rx = self.mgr.health();
        for _ in 0..3000 {
            let h = rx.borrow_and_update().clone();
            if pred(&h) {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for health {what}: {:?}", rx.borrow());
    }
}

fn subjects(ev: &[StorageEvent]) -> Vec<String> {
    ev.iter().map(StorageEvent::subject).collect()
}

fn count(ev: &[StorageEvent], subject: &str) -> usize {
    ev.iter().filter(|e| e.subject() == subject).count()
}

/// Asserts that `subject` was published `n` times in `ev`, listing them all
/// if not.
#[track_caller]
fn assert_published(ev: &[StorageEvent], subject: &str, n: usize) {
    assert_eq!(count(ev, subject), n, "{subject}: {:#?}", subjects(ev));
}

/// What udev reports when the disk `id` (kernel name `devname`) leaves `bay`.
fn pulled(id: &str, devname: &str, bay: &str) -> appliance_storage::udev::DiskChange {
    appliance_storage::udev::DiskChange {
        action: DiskAction::Removed,
        id: id.into(),
        devname: Some(devname.into()),
        bay: Some(bay.into()),
        serial: id.strip_prefix("virtio-").map(Into::into),
    }
}

fn pool_states(ev: &[StorageEvent]) -> Vec<(String, Option<i64>)> {
    ev.iter()
        .filter_map(|e| match e {
            StorageEvent::PoolState(p) => Some((p.new_state.clone(), p.new_margin)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn create_pool_report_health_and_idempotence() {
    let rig = Rig::new();
    // No pool yet.
    rig.mgr.refresh().await.unwrap();
    let h = rig
        .wait_health("unavailable", |h| h.state == ComponentState::Unavailable)
        .await;
    assert!(h.reason.contains("create-pool"), "{h:?}");
    // Three disks are too few for RAID-Z2.
    let e = rig
        .mgr
        .create_pool(
            "tank".into(),
            StorageLayout::Raidz2,
            six()[..3].to_vec(),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Eligibility(EligibilityError::TooFewDisks { min: 4, .. })
        ),
        "{e}"
    );
    // The boot disk is refused.
    let mut with_boot = six()[..4].to_vec();
    with_boot.push("/dev/disk/by-id/virtio-BOOT".into());
    let e = rig
        .mgr
        .create_pool("tank".into(), StorageLayout::Raidz2, with_boot, false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("boot disk"), "{e}");

    let out = rig
        .mgr
        .create_pool("tank".into(), StorageLayout::Raidz2, six(), false)
        .await
        .unwrap();
    assert_eq!(out.datasets, ["tank/documents"]);
    rig.mgr.refresh().await.unwrap();
    let h = rig
        .wait_health("ready", |h| h.state == ComponentState::Ready)
        .await;
    assert!(
        h.reason
            .contains("RAID-Z2, 6 disks, 0 failed, survives 2 more"),
        "{h:?}"
    );
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Healthy);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 0 failed, survives 2 more");
    assert!(r.total_bytes > 0 && r.free_bytes > 0);
    let docs = r.pools[0]
        .datasets
        .iter()
        .find(|d| d.name == "tank/documents")
        .unwrap();
    assert!(docs.encrypted);
    let ev = rig.sink.snapshot();
    assert_eq!(pool_states(&ev), [("ONLINE".to_owned(), Some(2))]);

    // Idempotent: the same request answers "already done", though the
    // disks are now in a pool.
    let again = rig
        .mgr
        .create_pool("tank".into(), StorageLayout::Raidz2, six(), false)
        .await
        .unwrap();
    assert!(again.already_done);
    // The disk list shows membership.
    let list = rig.mgr.disks().await.unwrap();
    let zd1 = list.iter().find(|d| d.id == "virtio-ZD1").unwrap();
    assert_eq!(zd1.pool.as_deref(), Some("tank"));
    assert_eq!(zd1.state.as_deref(), Some("ONLINE"));
    assert!(!zd1.problems.is_empty(), "a pool member is not eligible");
    // Heartbeat of the healthy pool.
    rig.wait_events("heartbeat", |e| count(e, "storage.pool.tank.healthy") >= 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn quota_alerts_and_admission() {
    let rig = Rig::provisioned().await;
    let q = rig
        .mgr
        .quota_set("tank/documents".into(), Some(100 * MB))
        .await
        .unwrap();
    assert_eq!(q[0].quota_bytes, Some(100 * MB));
    assert_eq!(
        rig.mgr
            .admission("tank/documents".into(), 50 * MB)
            .await
            .unwrap(),
        Admission::Admitted {
            available: 100 * MB
        }
    );
    rig.fake
        .set_dataset_used("tank/documents", 85 * MB)
        .unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.mgr.refresh().await.unwrap();
    let ev = rig
        .wait_events("80 %", |e| count(e, "storage.quota.tank/documents") == 1)
        .await;
    let StorageEvent::Quota(qe) = ev
        .iter()
        .find(|e| matches!(e, StorageEvent::Quota(_)))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(
        (qe.level_percent, qe.direction),
        (80, QuotaDirection::Crossed)
    );
    rig.fake
        .set_dataset_used("tank/documents", 91 * MB)
        .unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.mgr.refresh().await.unwrap();
    let ev = rig
        .wait_events("90 %", |e| count(e, "storage.quota.tank/documents") == 2)
        .await;
    assert!(ev
        .iter()
        .any(|e| matches!(e, StorageEvent::Quota(q) if q.level_percent == 90)));
    // An upload that does not fit is refused before any byte moves.
    assert_eq!(
        rig.mgr
            .admission("tank/documents".into(), 20 * MB)
            .await
            .unwrap(),
        Admission::QuotaExceeded {
            needed: 20 * MB,
            available: 9 * MB
        }
    );
    let st = rig
        .mgr
        .quota_get(Some("tank/documents".into()))
        .await
        .unwrap();
    assert_eq!(st[0].levels_crossed, [80, 90]);
    // Time passes, polls repeat: no further alerts.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        count(&rig.sink.snapshot(), "storage.quota.tank/documents"),
        2
    );
    // Errors name the dataset.
    let e = rig
        .mgr
        .quota_get(Some("tank/nope".into()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tank/nope"));
    let e = rig
        .mgr
        .quota_set("tank/documents".into(), Some(MB))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tank/documents"), "{e}");
    let e = rig.mgr.admission("tank/nope".into(), 1).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_client_dataset_is_created_with_its_quota_recorded_and_alerted_on() {
    let rig = Rig::provisioned().await;
    let name = "tank/documents/laptop";
    assert!(rig
        .mgr
        .create_dataset(name.into(), Some(50 * MB))
        .await
        .unwrap());
    // Recorded for the mount unit.
    let record: appliance_storage::datasets::DatasetsRecord = serde_json::from_slice(
        &std::fs::read(
            rig.state_dir
                .join(appliance_storage::datasets::DATASETS_RECORD),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record.datasets.len(), 1);
    assert_eq!(record.datasets[0].name, name);
    assert_eq!(record.datasets[0].quota, Some(50 * MB));
    // It inherits the encryption of documents and carries the quota.
    assert!(rig.fake.dataset_encryption(name).is_some());
    rig.mgr.refresh().await.unwrap();
    let st = rig.mgr.quota_get(Some(name.into())).await.unwrap();
    assert_eq!(st[0].quota_bytes, Some(50 * MB));
    // Asking again changes nothing.
    assert!(!rig
        .mgr
        .create_dataset(name.into(), Some(10 * MB))
        .await
        .unwrap());
    let st = rig.mgr.quota_get(Some(name.into())).await.unwrap();
    assert_eq!(st[0].quota_bytes, Some(50 * MB));
    // Its quota alerts like any dataset's.
    rig.fake.set_dataset_used(name, 46 * MB).unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.wait_events("90 % of the client dataset", |e| {
        count(e, &format!("storage.quota.{name}")) == 2
    })
    .await;
    // Refusals name what is wrong.
    let e = rig
        .mgr
        .create_dataset("tank/nope/laptop".into(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StorageError::NotFound { what: "dataset", name } if name == "tank/nope"),
        "{e}"
    );
    let e = rig
        .mgr
        .create_dataset("pool2/documents".into(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StorageError::NotFound { what: "pool", .. }),
        "{e}"
    );
    let e = rig
        .mgr
        .create_dataset("tank".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument { .. }), "{e}");
    let e = rig
        .mgr
        .create_dataset("tank/documents/../x".into(), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        appliance_types::control::ErrorCode::InvalidArgument,
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn scrub_progress_pause_finish_checksum_errors_and_persistence() {
    let rig = Rig::provisioned().await;
    rig.fake
        .set_dataset_used("tank/documents", 100 * MB)
        .unwrap();
    rig.sync();
    let st = rig
        .mgr
        .scrub("tank".into(), ScrubCommand::Start)
        .await
        .unwrap();
    let scan = st.scan.unwrap();
    let total = scan.total_bytes;
    assert!(total > 0);
    rig.wait_events("progress", |e| count(e, "storage.scrub.tank.progress") == 1)
        .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    rig.sync();
    rig.fake.advance_scan("tank", total / 2).unwrap();
    rig.fake
        .add_disk_errors(
            "tank",
            "virtio-ZD1",
            ErrorCounts {
                read: 0,
                write: 0,
                checksum: 12,
            },
        )
        .unwrap();
    rig.wait_events("second progress", |e| {
        count(e, "storage.scrub.tank.progress") == 2
    })
    .await;
    rig.wait_events("checksum errors", |e| {
        count(e, "storage.disk.virtio-ZD1.errors") == 1
    })
    .await;
    let st = rig
        .mgr
        .scrub("tank".into(), ScrubCommand::Pause)
        .await
        .unwrap();
    assert_eq!(
        st.scan.unwrap().phase,
        appliance_types::storage::ScanPhase::Paused
    );
    rig.wait_events("paused", |e| count(e, "storage.scrub.tank.paused") == 1)
        .await;
    rig.mgr
        .scrub("tank".into(), ScrubCommand::Resume)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    rig.sync();
    rig.fake.advance_scan("tank", total).unwrap();
    let ev = rig
        .wait_events("finished", |e| count(e, "storage.scrub.tank.finished") == 1)
        .await;
    let fin = ev
        .iter()
        .find_map(|e| match e {
            StorageEvent::Scrub(s) if s.phase == ScanEventPhase::Finished => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(fin.scan.errors, 0);
    assert_eq!(fin.devices_with_errors[0].disk, "virtio-ZD1");
    assert_eq!(fin.devices_with_errors[0].checksum, 12);
    let ended = fin.scan.ended_at.unwrap();
    // The report shows the errors, and the pool stays ONLINE.
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Degraded);
    assert_eq!(r.pools[0].state, "ONLINE");
    // The completion is persisted: a restarted manager neither republishes
    // the finish nor wants to scrub.
    let book = std::fs::read_to_string(rig.state_dir.join("scrub.json")).unwrap();
    assert!(book.contains(&ended.to_string()), "{book}");
    rig.mgr.shutdown().await;
    let sink2 = Arc::new(CollectingSink::new());
    let (mgr2, _) = StorageManager::spawn(
        rig.cfg.clone(),
        rig.zfs.clone(),
        rig.disks.clone(),
        sink2.clone(),
        rig.clock.clone(),
    );
    mgr2.refresh().await.unwrap();
    let st = mgr2.scrub_status("tank".into()).await.unwrap();
    assert_eq!(st.last_completed_at, Some(ended));
    assert_eq!(st.next_due_at, Some(ended + 35 * 86_400));
    assert_eq!(count(&sink2.snapshot(), "storage.scrub.tank.finished"), 0);
}

#[tokio::test(start_paused = true)]
async fn scheduled_scrub_runs_when_due_and_not_during_resilver() {
    let rig = Rig::new();
    let (mgr, sink) = rig.with_daily_scrubs().await;
    // A day later the scheduler starts a scrub by itself.
    tokio::time::sleep(Duration::from_secs(86_400 + 120)).await;
    rig.sync();
    mgr.refresh().await.unwrap();
    let st = mgr.scrub_status("tank".into()).await.unwrap();
    assert_eq!(
        st.scan.as_ref().map(|s| s.kind),
        Some(appliance_types::storage::ScanKind::Scrub),
        "{st:?}"
    );
    let book = std::fs::read_to_string(rig.state_dir.join("scrub.json")).unwrap();
    assert!(book.contains("requested_at"), "{book}");
    assert!(sink
        .snapshot()
        .iter()
        .any(|e| e.subject() == "storage.scrub.tank.progress"));
}

/// When the appliance first saw the pool is persisted at once: a restart
/// before anything else saved the book does not push the first scheduled
/// scrub out (restarts more often than the threshold kept it from ever
/// running).
#[tokio::test(start_paused = true)]
async fn a_restart_does_not_postpone_the_first_scheduled_scrub() {
    let rig = Rig::new();
    let (mgr, _) = rig.with_daily_scrubs().await;
    tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
    mgr.shutdown().await;
    let mut cfg = rig.cfg.clone();
    cfg.scrub.threshold_days = 1;
    let sink = Arc::new(CollectingSink::new());
    let (mgr, _) = StorageManager::spawn(
        cfg,
        rig.zfs.clone(),
        rig.disks.clone(),
        sink.clone(),
        rig.clock.clone(),
    );
    rig.sync();
    mgr.refresh().await.unwrap();
    // A day after the pool was first seen, half a day after the restart.
    tokio::time::sleep(Duration::from_secs(12 * 3600 + 120)).await;
    rig.sync();
    mgr.refresh().await.unwrap();
    let st = mgr.scrub_status("tank".into()).await.unwrap();
    assert_eq!(
        st.scan.as_ref().map(|s| s.kind),
        Some(appliance_types::storage::ScanKind::Scrub),
        "{st:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn one_and_two_disks_pulled_publish_degraded_with_margin_once() {
    let rig = Rig::provisioned().await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    let ev = rig
        .wait_events("DEGRADED margin 1", |e| {
            pool_states(e).contains(&("DEGRADED".to_owned(), Some(1)))
        })
        .await;
    assert_eq!(count(&ev, "storage.disk.virtio-ZD2.removed"), 1);
    let h = rig
        .wait_health("degraded", |h| h.state == ComponentState::Degraded)
        .await;
    assert!(h.reason.contains("survives 1 more"), "{h:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD3", DeviceState::Removed)
        .unwrap();
    rig.wait_events("DEGRADED margin 0", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(0)))
    })
    .await;
    // Many polls later, every change was still published exactly once,
    // though the follower and the polls both saw it.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ev = rig.sink.snapshot();
    assert_eq!(count(&ev, "storage.disk.virtio-ZD2.removed"), 1);
    assert_eq!(count(&ev, "storage.disk.virtio-ZD3.removed"), 1);
    assert_eq!(
        pool_states(&ev),
        [
            ("ONLINE".to_owned(), Some(2)),
            ("DEGRADED".to_owned(), Some(1)),
            ("DEGRADED".to_owned(), Some(0))
        ]
    );
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Critical);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 2 failed, survives no more");
    // The disk was seen by the follower first.
    let first = ev
        .iter()
        .find_map(|e| match e {
            StorageEvent::Disk(d) if d.disk == "virtio-ZD2" => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(first.action, DiskAction::Removed);
}

#[tokio::test(start_paused = true)]
async fn three_pulled_fails_cleanly_and_a_hung_pool_never_blocks_queries() {
    let rig = Rig::provisioned().await;
    for d in ["virtio-ZD2", "virtio-ZD3", "virtio-ZD5"] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rig.sync();
        rig.fake
            .set_disk_state("tank", d, DeviceState::Removed)
            .unwrap();
    }
    let ev = rig
        .wait_events("SUSPENDED", |e| {
            pool_states(e).iter().any(|(s, _)| s == "SUSPENDED")
        })
        .await;
    let last = pool_states(&ev).last().cloned().unwrap();
    assert_eq!(last, ("SUSPENDED".to_owned(), Some(-1)));
    let h = rig
        .wait_health("failed", |h| h.state == ComponentState::Failed)
        .await;
    assert!(h.reason.contains("SUSPENDED"), "{h:?}");
    // Uploads are refused cleanly.
    let e = rig
        .mgr
        .admission("tank/documents".into(), 1)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
    // A change on the suspended pool times out (the fake says so at once).
    let e = rig
        .mgr
        .quota_set("tank/documents".into(), Some(MB))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");

    // Now the commands hang for real: the manager's own timeouts fire, the
    // pool is published UNRESPONSIVE once, and every query still answers.
    rig.zfs.hung.lock().unwrap().insert("tank".into());
    let ev = rig
        .wait_events("UNRESPONSIVE", |e| {
            pool_states(e).iter().any(|(s, _)| s == "UNRESPONSIVE")
        })
        .await;
    assert_eq!(
        pool_states(&ev)
            .iter()
            .filter(|(s, _)| s == "UNRESPONSIVE")
            .count(),
        1
    );
    let h = rig
        .wait_health("failed: not answering", |h| {
            h.reason.contains("not answering")
        })
        .await;
    assert_eq!(h.state, ComponentState::Failed);
    let t = tokio::time::Instant::now();
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(
        t.elapsed(),
        Duration::ZERO,
        "answered from the last known state"
    );
    assert_eq!(r.status, StorageStatus::Unavailable);
    assert!(r.reasons[0].contains("last known state"), "{:?}", r.reasons);
    let e = rig
        .mgr
        .scrub("tank".into(), ScrubCommand::Start)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Unavailable { .. }), "{e}");
    // Ten minutes of hanging: no pile-up of events.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        pool_states(&rig.sink.snapshot())
            .iter()
            .filter(|(s, _)| s == "UNRESPONSIVE")
            .count(),
        1
    );

    // The disks come back, the pool answers again: recovery is published.
    rig.zfs.hung.lock().unwrap().clear();
    rig.sync();
    for d in ["virtio-ZD2", "virtio-ZD3", "virtio-ZD5"] {
        rig.fake
            .set_disk_state("tank", d, DeviceState::Online)
            .unwrap();
    }
    rig.fake.clear("tank", None).await.unwrap();
    rig.wait_health("ready again", |h| h.state == ComponentState::Ready)
        .await;
    let ev = rig.sink.snapshot();
    assert_eq!(
        pool_states(&ev).last().cloned().unwrap(),
        ("ONLINE".to_owned(), Some(2))
    );
}

#[tokio::test(start_paused = true)]
async fn replace_and_resilver() {
    let rig = Rig::provisioned().await;
    rig.fake
        .set_dataset_used("tank/documents", 60 * MB)
        .unwrap();
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    rig.wait_events("degraded", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(1)))
    })
    .await;
    // The new disk is not plugged in yet.
    let e = rig
        .mgr
        .replace("tank".into(), "virtio-ZD2".into(), by_id("ZN2"), false)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::DiskRefused(_)), "{e}");
    // A disk of the pool cannot replace another.
    let e = rig
        .mgr
        .replace("tank".into(), "virtio-ZD2".into(), by_id("ZD4"), true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("part of pool tank"), "{e}");
    // Hot-add ZN2.
    rig.disks.update(|s| {
        let fresh = FakeDisks::blank_disks(&serials(), 256 * MB);
        *s = fresh;
    });
    let e = rig
        .mgr
        .replace("tank".into(), "virtio-NOPE".into(), by_id("ZN2"), false)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e}");
    rig.sync();
    let msg = rig
        .mgr
        .replace(
            "tank".into(),
            "/dev/disk/by-id/virtio-ZD2".into(),
            by_id("ZN2"),
            false,
        )
        .await
        .unwrap();
    assert!(msg.contains("resilver started"), "{msg}");
    rig.wait_events("resilver started", |e| {
        count(e, "storage.resilver.tank.started") == 1
    })
    .await;
    rig.wait_events("ZN2 added", |e| {
        count(e, "storage.disk.virtio-ZN2.added") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    rig.sync();
    let total = rig.mgr.report().await.unwrap().pools[0]
        .scan
        .as_ref()
        .unwrap()
        .total_bytes;
    rig.fake.advance_scan("tank", total / 2).unwrap();
    rig.wait_events("resilver progress", |e| {
        count(e, "storage.resilver.tank.progress") >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    rig.sync();
    rig.fake.advance_scan("tank", total).unwrap();
    let ev = rig
        .wait_events("resilver finished", |e| {
            count(e, "storage.resilver.tank.finished") == 1
        })
        .await;
    rig.wait_events("ONLINE", |e| {
        pool_states(e).last() == Some(&("ONLINE".to_owned(), Some(2)))
    })
    .await;
    assert_eq!(count(&ev, "storage.resilver.tank.started"), 1);
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Healthy);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 0 failed, survives 2 more");
    // No scrub during the resilver was possible.
    assert_eq!(
        count(&rig.sink.snapshot(), "storage.scrub.tank.progress"),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn hotplug_events_from_udev() {
    use appliance_storage::udev::DiskChange;
    let rig = Rig::provisioned().await;
    let change = |action, id: &str| DiskChange {
        action,
        id: id.into(),
        devname: Some("vdh".into()),
        bay: Some("bay6".into()),
        serial: Some("ZN2".into()),
    };
    assert!(
        rig.mgr
            .hotplug(change(DiskAction::Added, "virtio-ZN2"))
            .await
    );
    let ev = rig
        .wait_events("udev add", |e| {
            count(e, "storage.disk.virtio-ZN2.added") == 1
        })
        .await;
    let StorageEvent::Disk(d) = ev
        .iter()
        .find(|e| e.subject() == "storage.disk.virtio-ZN2.added")
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(d.bay.as_deref(), Some("bay6"));
    assert_eq!(d.source, appliance_types::storage::EventSource::Udev);
    assert_eq!(d.pool, None);
    assert!(
        rig.mgr
            .hotplug(change(DiskAction::Removed, "virtio-ZN2"))
            .await
    );
    rig.wait_events("udev remove", |e| {
        count(e, "storage.disk.virtio-ZN2.removed") == 1
    })
    .await;
    // A pool member pulled: udev sees it first, ZFS reports it (once).
    assert!(
        rig.mgr
            .hotplug(change(DiskAction::Removed, "virtio-ZD4"))
            .await
    );
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Removed)
        .unwrap();
    rig.wait_events("degraded", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(1)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ev = rig.sink.snapshot();
    assert_eq!(count(&ev, "storage.disk.virtio-ZD4.removed"), 1);
    let StorageEvent::Disk(d) = ev
        .iter()
        .find(|e| e.subject() == "storage.disk.virtio-ZD4.removed")
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(d.pool.as_deref(), Some("tank"));
    assert_eq!(d.state, "REMOVED");
    rig.mgr.shutdown().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        !rig.mgr.hotplug(change(DiskAction::Added, "x")).await,
        "stopped manager says so"
    );
}

/// A member pulled from an idle pool that ZFS does not notice (ZED did not
/// mark it and no I/O failed): udev's removal alone degrades the pool at
/// once, the polls that follow (ZFS still says ONLINE) keep it degraded,
/// and the disk coming back restores the pool's state.
#[tokio::test(start_paused = true)]
async fn a_pulled_member_zfs_does_not_notice_still_degrades_the_pool() {
    use appliance_storage::udev::DiskChange;
    let rig = Rig::provisioned().await;
    let change = |action| DiskChange {
        action,
        id: "virtio-ZD4".into(),
        devname: Some("vdd".into()),
        bay: Some("bay3".into()),
        serial: Some("ZD4".into()),
    };
    assert!(rig.mgr.hotplug(change(DiskAction::Removed)).await);
    let ev = rig
        .wait_events("degraded", |e| {
            pool_states(e).contains(&("DEGRADED".to_owned(), Some(1)))
        })
        .await;
    let StorageEvent::PoolState(p) = ev
        .iter()
        .find(|e| matches!(e, StorageEvent::PoolState(p) if p.new_state == "DEGRADED"))
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(p.source, appliance_types::storage::EventSource::Udev);
    assert_eq!(p.failed_devices, ["virtio-ZD4"]);
    // The disk's REMOVED says where it was, from udev.
    let removed = ev
        .iter()
        .find_map(|e| match e {
            StorageEvent::Disk(d) if d.action == DiskAction::Removed => Some(d),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (
            removed.disk.as_str(),
            removed.bay.as_deref(),
            removed.serial.as_deref()
        ),
        ("virtio-ZD4", Some("bay3"), Some("ZD4"))
    );
    // Minutes of polls in which ZFS still reports every disk ONLINE.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let ev = rig.sink.snapshot();
    assert_eq!(
        pool_states(&ev).last(),
        Some(&("DEGRADED".to_owned(), Some(1))),
        "{:?}",
        pool_states(&ev)
    );
    assert_eq!(count(&ev, "storage.disk.virtio-ZD4.removed"), 1);
    assert_eq!(count(&ev, "storage.disk.virtio-ZD4.online"), 0);
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Degraded);
    assert_eq!(r.redundancy, "RAID-Z2, 6 disks, 1 failed, survives 1 more");
    // The disk is back: the next poll takes ZFS's word again.
    assert!(rig.mgr.hotplug(change(DiskAction::Added)).await);
    rig.wait_events("online again", |e| {
        pool_states(e).last() == Some(&("ONLINE".to_owned(), Some(2)))
    })
    .await;
    let r = rig.mgr.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Healthy);

    // Pulled again, and back again with ZFS reporting it working (a
    // statechange to ONLINE) but udev's add lost: ZFS's word clears it.
    assert!(rig.mgr.hotplug(change(DiskAction::Removed)).await);
    rig.wait_events("degraded again", |e| {
        pool_states(e).last() == Some(&("DEGRADED".to_owned(), Some(1)))
    })
    .await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Removed)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Online)
        .unwrap();
    rig.wait_events("online without udev", |e| {
        pool_states(e).last() == Some(&("ONLINE".to_owned(), Some(2)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        pool_states(&rig.sink.snapshot()).last(),
        Some(&("ONLINE".to_owned(), Some(2)))
    );
}

/// A poll that read the pool before a disk was pulled finishes after the
/// ZFS event was published: it must not undo the DEGRADED state (no
/// DEGRADED -> ONLINE -> DEGRADED flapping).
#[tokio::test(start_paused = true)]
async fn a_poll_older_than_a_zfs_event_does_not_undo_it() {
    let rig = Rig::provisioned().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    *rig.zfs.held.lock().unwrap() = Some(gate.clone());
    // A poll starts and reads the healthy pool, then is held.
    let mgr = rig.mgr.clone();
    let polled = tokio::spawn(async move { mgr.refresh().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rig.sink.snapshot().len();
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    rig.wait_events("DEGRADED from the ZFS event", |ev| {
        pool_states(&ev[before..]).contains(&("DEGRADED".to_owned(), Some(1)))
    })
    .await;
    // The report and the health agree with the event before any poll does.
    let report = rig.mgr.report().await.unwrap();
    assert_eq!(
        (report.pools[0].state.as_str(), report.pools[0].margin),
        ("DEGRADED", 1),
        "{report:#?}"
    );
    rig.wait_health("degraded", |h| h.state == ComponentState::Degraded)
        .await;
    // The old poll finishes; the next ones read the pool as it is.
    *rig.zfs.held.lock().unwrap() = None;
    gate.notify_waiters();
    polled.await.unwrap().unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.mgr.refresh().await.unwrap();
    let ev = rig.sink.snapshot();
    assert_eq!(
        pool_states(&ev[before..]),
        [("DEGRADED".to_owned(), Some(1))],
        "{:#?}",
        subjects(&ev[before..])
    );
}

/// A provisioned pool with virtio-ZD2 pulled (DEGRADED, margin 1 published),
/// two seconds on.
async fn degraded_by_zd2() -> Rig {
    let rig = Rig::provisioned().await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD2", DeviceState::Removed)
        .unwrap();
    rig.wait_events("margin 1", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(1)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig
}

/// ZFS faults a disk on its own (a failed probe during a degraded read):
/// DEGRADED with the lower margin at once. Pulling that disk afterwards
/// changes nothing about the pool, so only the disk's REMOVED follows (the
/// s13 hardware-test failure: its pull found the margin already at 0).
#[tokio::test(start_paused = true)]
async fn pulling_a_disk_zfs_already_failed_publishes_only_the_disk() {
    let rig = degraded_by_zd2().await;
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Faulted)
        .unwrap();
    rig.wait_events("margin 0", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(0)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_pull = rig.sink.snapshot().len();
    assert!(rig.mgr.hotplug(pulled("virtio-ZD4", "vdf", "bay4")).await);
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Removed)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ev = rig.sink.snapshot();
    assert_eq!(pool_states(&ev[before_pull..]), []);
    assert_eq!(
        count(&ev[before_pull..], "storage.disk.virtio-ZD4.removed"),
        1
    );
}

/// A disk that ZFS faults and brings back between two polls (while a slow
/// poll is under way, as under TCG): its return raises the published
/// margin again at once, so pulling it for real afterwards is published.
/// Before, the published view kept the disk failed until a poll that was
/// not stale, the pull was "no lower" than that, and neither the return to
/// margin 1 nor the pull's margin 0 was ever published (review of the s13
/// hardware-test failure).
#[tokio::test(start_paused = true)]
async fn a_disk_back_from_a_brief_fault_then_pulled_is_published_both_times() {
    let rig = degraded_by_zd2().await;
    // A slow poll is under way.
    let gate = Arc::new(tokio::sync::Notify::new());
    *rig.zfs.held.lock().unwrap() = Some(gate.clone());
    let mgr = rig.mgr.clone();
    let polled = tokio::spawn(async move { mgr.refresh().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ZD4 fails for a moment and comes back.
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Faulted)
        .unwrap();
    rig.wait_events("brief margin 0", |e| {
        pool_states(e).contains(&("DEGRADED".to_owned(), Some(0)))
    })
    .await;
    let before_return = rig.sink.snapshot().len();
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Online)
        .unwrap();
    rig.wait_events("ZD4 online", |e| {
        count(e, "storage.disk.virtio-ZD4.online") == 1
    })
    .await;
    let ev = rig.sink.snapshot();
    assert_eq!(
        pool_states(&ev[before_return..]),
        [("DEGRADED".to_owned(), Some(1))],
        "the return is published with the disk event"
    );
    // Now it is pulled for real.
    let before_pull = ev.len();
    assert!(rig.mgr.hotplug(pulled("virtio-ZD4", "vdf", "bay4")).await);
    rig.sync();
    rig.fake
        .set_disk_state("tank", "virtio-ZD4", DeviceState::Removed)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The slow poll ends; fresh polls follow and agree.
    *rig.zfs.held.lock().unwrap() = None;
    gate.notify_waiters();
    polled.await.unwrap().unwrap();
    rig.mgr.refresh().await.unwrap();
    rig.mgr.refresh().await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ev = rig.sink.snapshot();
    assert_eq!(
        pool_states(&ev[before_pull..]),
        [("DEGRADED".to_owned(), Some(0))],
        "the pull, published once: {:?}",
        pool_states(&ev)
    );
}

/// A resilver that ends while the manager is down (a restart, an upgrade):
/// the restarted manager publishes its `finished`, since its `started` went
/// out before; the one after that does not publish it again.
#[tokio::test(start_paused = true)]
async fn a_resilver_that_ends_while_the_manager_is_down_is_finished_after_the_restart() {
    let rig = Rig::resilvering().await;
    let book = rig.book();
    assert!(book.contains("\"resilver_open\": true"), "{book}");
    rig.mgr.shutdown().await;

    rig.finish_scan_after(600).await;

    let (mgr2, sink2) = rig.restarted();
    mgr2.refresh().await.unwrap();
    let ev = sink2.snapshot();
    assert_published(&ev, "storage.resilver.tank.finished", 1);
    let r = mgr2.report().await.unwrap();
    assert_eq!(r.status, StorageStatus::Healthy);
    let book = rig.book();
    assert!(!book.contains("\"resilver_open\": true"), "{book}");
    assert!(book.contains("\"resilver_ended\": "), "{book}");
    mgr2.shutdown().await;

    let (mgr3, sink3) = rig.restarted();
    mgr3.refresh().await.unwrap();
    let ev = sink3.snapshot();
    assert_published(&ev, "storage.resilver.tank.finished", 0);
    // The restart still republishes the pool's state.
    assert_published(&ev, "storage.pool.tank.state", 1);
}

/// The daemon restarts while a resilver runs: the restart publishes its
/// progress, not its `started` again, and the one `finished` follows.
#[tokio::test(start_paused = true)]
async fn a_restart_during_a_resilver_does_not_start_it_again() {
    let rig = Rig::resilvering().await;
    rig.mgr.shutdown().await;

    let (mgr2, sink2) = rig.restarted();
    mgr2.refresh().await.unwrap();
    let ev = sink2.snapshot();
    assert_published(&ev, "storage.resilver.tank.started", 0);
    assert_published(&ev, "storage.resilver.tank.progress", 1);
    assert!(rig.book().contains("\"resilver_open\": true"));
    rig.finish_scan_after(600).await;
    mgr2.refresh().await.unwrap();
    let ev = sink2.snapshot();
    assert_published(&ev, "storage.resilver.tank.finished", 1);
    assert_eq!(count(&ev, "storage.resilver.tank.started"), 0);
    assert!(!rig.book().contains("\"resilver_open\": true"));
    mgr2.shutdown().await;
}

/// A sink that "crashes the daemon" (panics the actor) when it is handed a
/// resilver's `finished`: whatever the manager persisted before that went
/// to disk, the event did not go out.
#[derive(Debug, Default)]
struct CrashOnResilverEnd;

impl appliance_storage::EventSink for CrashOnResilverEnd {
    fn publish(&self, event: &StorageEvent) {
        assert_ne!(
            event.subject(),
            "storage.resilver.tank.finished",
            "crash before the finished goes out"
        );
    }
}

/// The daemon dies between persisting a resilver's end and publishing its
/// `finished`: the next start must still publish it (a crash may repeat an
/// event, never lose the `finished` of a published `started`).
#[tokio::test(start_paused = true)]
async fn a_crash_before_a_resilver_finished_goes_out_does_not_lose_it() {
    let rig = Rig::resilvering().await;
    rig.mgr.shutdown().await;

    rig.finish_scan_after(600).await;

    let (mgr3, ev) = rig.crash_then_restart(Arc::new(CrashOnResilverEnd)).await;
    assert_published(&ev, "storage.resilver.tank.finished", 1);
    mgr3.shutdown().await;
}

/// Crashes the manager when a scrub's `finished` is about to go out.
#[derive(Debug)]
struct CrashOnScrubEnd;

impl appliance_storage::EventSink for CrashOnScrubEnd {
    fn publish(&self, event: &StorageEvent) {
        assert_ne!(
            event.subject(),
            "storage.scrub.tank.finished",
            "crash before the finished goes out"
        );
    }
}

/// A pool's first scrub: the manager stops while it runs, and the
/// restarted one crashes as its `finished` is about to go out. The start
/// after that still publishes it, once; its completion is then persisted.
#[tokio::test(start_paused = true)]
async fn a_scrub_finished_while_the_manager_is_down_is_published_despite_a_crash() {
    let rig = Rig::scrubbing().await;
    let book = rig.book();
    assert!(book.contains("\"scrub_open\": true"), "{book}");
    rig.mgr.shutdown().await;

    rig.finish_scan_after(600).await;

    let (mgr3, ev) = rig.crash_then_restart(Arc::new(CrashOnScrubEnd)).await;
    assert_published(&ev, "storage.scrub.tank.finished", 1);
    let st = mgr3.scrub_status("tank".into()).await.unwrap();
    assert!(st.last_completed_at.is_some(), "{st:?}");
    let book = rig.book();
    assert!(!book.contains("\"scrub_open\": true"), "{book}");
    mgr3.shutdown().await;

    let (mgr4, sink4) = rig.restarted();
    mgr4.refresh().await.unwrap();
    let ev = sink4.snapshot();
    assert_published(&ev, "storage.scrub.tank.finished", 0);
}

/// A scrub stopped (`zpool scrub -s`) after an earlier one completed: its
/// `canceled` goes out once, not again at every restart (its end is newer
/// than the last completion, the only end the book kept).
#[tokio::test(start_paused = true)]
async fn a_canceled_scrub_is_not_published_again_after_a_restart() {
    let rig = Rig::scrubbing_again().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    rig.sync();
    rig.mgr
        .scrub("tank".into(), ScrubCommand::Stop)
        .await
        .unwrap();
    rig.wait_events("canceled", |e| count(e, "storage.scrub.tank.canceled") == 1)
        .await;
    rig.mgr.shutdown().await;

    let seen = rig
        .published_at_two_starts("storage.scrub.tank.canceled")
        .await;
    assert_eq!(seen, vec![0, 0], "canceled published at a start");
}

/// A scrub canceled while the manager is down, after an earlier one
/// completed: published once at the next start, not at the one after.
#[tokio::test(start_paused = true)]
async fn a_scrub_canceled_while_the_manager_is_down_is_published_once() {
    let rig = Rig::scrubbing_again().await;
    rig.mgr.shutdown().await;

    tokio::time::sleep(Duration::from_secs(600)).await;
    rig.sync();
    rig.fake.scrub("tank", ScrubAction::Stop).await.unwrap();

    let seen = rig
        .published_at_two_starts("storage.scrub.tank.canceled")
        .await;
    assert_eq!(seen, vec![1, 0], "canceled published at each start");
}

/// ZFS restarts a running scrub as a resilver (a disk replaced): the
/// scrub's `progress` went out, so its end must too (as `canceled`: it
/// never completed), before the resilver's `started`.
#[tokio::test(start_paused = true)]
async fn a_scrub_replaced_by_a_resilver_is_published_as_canceled() {
    let rig = Rig::scrubbing().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    rig.sync();
    rig.fake
        .replace("tank", "virtio-ZD2", &by_id("ZN2"))
        .await
        .unwrap();
    rig.wait_events("resilver started", |e| {
        count(e, "storage.resilver.tank.started") == 1
    })
    .await;
    rig.finish_scan_after(30).await;
    let ev = rig
        .wait_events("resilver finished", |e| {
            count(e, "storage.resilver.tank.finished") == 1
        })
        .await;
    let scrub_ends: Vec<String> = subjects(&ev)
        .into_iter()
        .filter(|s| s.ends_with(".canceled") || s == "storage.scrub.tank.finished")
        .collect();
    assert_eq!(
        scrub_ends,
        vec!["storage.scrub.tank.canceled".to_owned()],
        "{:#?}",
        subjects(&ev)
    );
    let at = |s: &str| subjects(&ev).iter().position(|x| x == s).unwrap();
    assert!(at("storage.scrub.tank.canceled") < at("storage.resilver.tank.started"));
    let book = rig.book();
    assert!(!book.contains("\"scrub_open\": true"), "{book}");
}

/// The same while the manager is down: the next start publishes the open
/// scrub's `canceled`, once.
#[tokio::test(start_paused = true)]
async fn a_scrub_replaced_by_a_resilver_while_the_manager_is_down_is_published_as_canceled() {
    let rig = Rig::scrubbing().await;
    rig.mgr.shutdown().await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    rig.sync();
    rig.fake
        .replace("tank", "virtio-ZD2", &by_id("ZN2"))
        .await
        .unwrap();

    let seen = rig
        .published_at_two_starts("storage.scrub.tank.canceled")
        .await;
    assert_eq!(seen, vec![1, 0], "the replaced scrub's end");
}

/// With the 2.1 text form (no scan start or end times) a finished scrub is
/// still a completion: the scheduler does not start another one as soon as
/// its request's grace is over.
#[tokio::test(start_paused = true)]
async fn a_scheduled_scrub_without_scan_times_is_not_repeated() {
    let rig = Rig::new();
    *rig.zfs.text_form.lock().unwrap() = true;
    let (mgr, sink) = rig.with_daily_scrubs().await;
    tokio::time::sleep(Duration::from_secs(86_400 + 120)).await;
    rig.sync();
    mgr.refresh().await.unwrap();
    assert_eq!(count(&sink.snapshot(), "storage.scrub.tank.progress"), 1);
    tokio::time::sleep(Duration::from_secs(60)).await;
    rig.sync();
    rig.fake.advance_scan("tank", u64::MAX / 2).unwrap();
    mgr.refresh().await.unwrap();
    assert_eq!(count(&sink.snapshot(), "storage.scrub.tank.finished"), 1);
    // Well past the request's grace, within the threshold.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    rig.sync();
    mgr.refresh().await.unwrap();
    let ev = sink.snapshot();
    assert_eq!(
        count(&ev, "storage.scrub.tank.progress"),
        1,
        "another scrub ran: {:#?}",
        subjects(&ev)
    );
    let st = mgr.scrub_status("tank".into()).await.unwrap();
    assert!(st.last_completed_at.is_some(), "{st:?}");
}
