//! `FakeZfs`: the one in-memory [`Zfs`] shared by every test above this
//! crate (storage manager, daemon, CLI wiring).
//!
//! It keeps a small pool model and answers with the same model types as the
//! real runner. Tests drive the hardware side with plain methods:
//! [`FakeZfs::set_disk_state`] (pull, fault, offline, return a disk),
//! [`FakeZfs::add_disk_errors`], [`FakeZfs::advance_scan`] (scrub/resilver
//! progress), [`FakeZfs::set_dataset_used`], [`FakeZfs::set_hung`] and
//! [`FakeZfs::fail_next`]; time is explicit ([`FakeZfs::set_time`]).
//!
//! Behaviour follows what the captures and the QEMU experiments showed:
//! * RAID-Z*N*/mirror/stripe of whole disks; vdev names `raidz2-0`,
//!   `mirror-0`, `replacing-N`; disk names are the path's last component.
//! * Losing more slots than the parity suspends the pool (`failmode=wait`):
//!   status still answers (as in the `removed3` capture), but changes on
//!   that pool return [`ZfsError::Timeout`], as the real runner would after
//!   its timeout. Returning the disks and `clear` resumes it.
//! * `zpool scrub` on a paused scrub resumes it; scrubbing during a
//!   resilver fails with `ResilverInProgress`; `replace` starts a resilver,
//!   and finishing it swaps the new disk into the slot.
//! * Events (`statechange`, `removed`, `io_failure`, `scrub_*`,
//!   `resilver_*`, `vdev_attach`, `pool_create`) go to every follower; a
//!   full follower loses events and is then sent `Dropped(n)`, like the
//!   kernel ring. Unlike `zpool events -f`, nothing is replayed on connect.
//!
//! Space model: a dataset's `used` is what tests set plus its children;
//! usable pool space is disk size × data disks; pool `allocated` is usable
//! used scaled by width/data-disks (parity overhead).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::api::{
    DatasetSpec, EventFollower, PoolLayout, PoolSpec, ScrubAction, Zfs, EVENT_CHANNEL_CAPACITY,
};
use crate::error::{FailureKind, ZfsError};
use crate::model::{
    Capacity, Dataset, DeviceState, ErrorCounts, Pool, PoolStatus, Properties, Property,
    PropertySource, ScanFunction, ScanState, ScanStatus, Vdev, VdevClass, VdevKind,
};
use crate::parse::dataset_from_properties;
use crate::parse::events::{EventItem, ZpoolEvent};
use crate::redundancy::slot_failed;

/// Disk size used when a test did not register disks (1 GiB).
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// Operations, for [`FakeZfs::fail_next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    /// `pool_status`.
    PoolStatus,
    /// `pool_list`.
    PoolList,
    /// `pool_properties`.
    PoolProperties,
    /// `dataset_list`.
    DatasetList,
    /// `dataset_properties`.
    DatasetProperties,
    /// `create_pool`.
    CreatePool,
    /// `create_dataset`.
    CreateDataset,
    /// `set_quota`.
    SetQuota,
    /// `get_quota`.
    GetQuota,
    /// `scrub`.
    Scrub,
    /// `replace`.
    Replace,
    /// `clear`.
    Clear,
    /// `follow_events`.
    FollowEvents,
}

#[derive(Debug, Clone)]
struct FakeDisk {
    path: String,
    guid: u64,
    state: DeviceState,
    errors: ErrorCounts,
}

impl FakeDisk {
    fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn matches(&self, s: &str) -> bool {
        self.path == s || self.name() == s || self.guid.to_string() == s
    }

    fn vdev(&self) -> Vdev {
        Vdev {
            name: self.name().to_owned(),
            kind: VdevKind::Disk,
            class: VdevClass::Normal,
            state: self.state.clone(),
            guid: Some(self.guid),
            path: Some(self.path.clone()),
            errors: self.errors,
            note: None,
            children: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    disk: FakeDisk,
    incoming: Option<FakeDisk>,
}

#[derive(Debug, Clone)]
struct FakePool {
    guid: u64,
    layout: PoolLayout,
    disk_size: u64,
    slots: Vec<Slot>,
    scan: Option<ScanStatus>,
    suspended: bool,
    pool_properties: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct FakeDataset {
    own_used: u64,
    quota: Option<u64>,
    encryption: Option<(String, String, String)>,
    compression: String,
    mountpoint: String,
}

#[derive(Debug)]
struct Follower {
    tx: mpsc::Sender<Result<EventItem, ZfsError>>,
    dropped: u64,
}

#[derive(Debug, Default)]
struct State {
    now: u64,
    next_guid: u64,
    next_eid: u64,
    known_disks: BTreeMap<String, u64>,
    pools: BTreeMap<String, FakePool>,
    datasets: BTreeMap<String, FakeDataset>,
    failures: Vec<(FakeOp, FailureKind)>,
    hung: BTreeSet<String>,
    followers: Vec<Follower>,
}

/// The in-memory [`Zfs`].
#[derive(Debug, Default)]
pub struct FakeZfs {
    state: Mutex<State>,
}

fn failed(command: String, kind: FailureKind, stderr: String) -> ZfsError {
    ZfsError::Failed {
        command,
        kind,
        exit_code: Some(1),
        stderr,
    }
}

fn no_pool(cmd: &str, pool: &str) -> ZfsError {
    failed(
        format!("zpool {cmd} {pool}"),
        FailureKind::NoSuchPool,
        format!("cannot open '{pool}': no such pool"),
    )
}

fn no_dataset(cmd: &str, ds: &str) -> ZfsError {
    failed(
        format!("zfs {cmd} {ds}"),
        FailureKind::NoSuchDataset,
        format!("cannot open '{ds}': dataset does not exist"),
    )
}

fn pool_of(dataset: &str) -> &str {
    dataset.split('/').next().unwrap_or(dataset)
}

impl FakePool {
    fn width(&self) -> usize {
        self.slots.len()
    }

    fn data_disks(&self) -> u64 {
        let w = self.width() as u64;
        match self.layout {
            PoolLayout::Mirror => 1,
            PoolLayout::Stripe => w,
            l => w.saturating_sub(u64::from(l.parity())),
        }
    }

    fn tolerated(&self) -> usize {
        match self.layout {
            PoolLayout::Mirror => self.width().saturating_sub(1),
            PoolLayout::Stripe => 0,
            l => usize::from(l.parity()),
        }
    }

    fn resilvering(&self) -> bool {
        self.scan
            .as_ref()
            .is_some_and(|s| s.function == ScanFunction::Resilver && s.state == ScanState::Running)
    }

    fn slot_vdev(&self, i: usize, slot: &Slot) -> Vdev {
        match &slot.incoming {
            None => slot.disk.vdev(),
            Some(new) => {
                let children = vec![slot.disk.vdev(), new.vdev()];
                let state = if children.iter().all(|c| c.state.is_failed()) {
                    DeviceState::Unavail
                } else if children.iter().any(|c| c.state.is_failed()) {
                    DeviceState::Degraded
                } else {
                    DeviceState::Online
                };
                Vdev {
                    name: format!("replacing-{i}"),
                    kind: VdevKind::Replacing,
                    class: VdevClass::Normal,
                    state,
                    guid: None,
                    path: None,
                    errors: ErrorCounts::default(),
                    note: None,
                    children,
                }
            }
        }
    }

    /// Failed slots per top-level vdev vs. tolerance: true if data is lost.
    fn lost(&self) -> bool {
        let resilvering = self.resilvering();
        let failed = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| slot_failed(&self.slot_vdev(*i, s), resilvering))
            .count();
        failed > self.tolerated()
    }

    fn status(&self, name: &str) -> PoolStatus {
        let resilvering = self.resilvering();
        let slots: Vec<Vdev> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| self.slot_vdev(i, s))
            .collect();
        let top_state = |children: &[Vdev], tolerated: usize| -> (DeviceState, Option<String>) {
            let failed = children
                .iter()
                .filter(|c| slot_failed(c, resilvering))
                .count();
            let any_degraded = children.iter().any(|c| c.state != DeviceState::Online);
            if failed > tolerated {
                (
                    DeviceState::Unavail,
                    Some("insufficient replicas".to_owned()),
                )
            } else if failed > 0 || any_degraded {
                (DeviceState::Degraded, None)
            } else {
                (DeviceState::Online, None)
            }
        };
        let top: Vec<Vdev> = match self.layout.keyword() {
            None => slots
                .into_iter()
                .map(|mut v| {
                    if v.state.is_failed() {
                        v.note = Some("insufficient replicas".to_owned());
                    }
                    v
                })
                .collect(),
            Some(kw) => {
                let kind = match self.layout {
                    PoolLayout::Mirror => VdevKind::Mirror,
                    l => VdevKind::Raidz { parity: l.parity() },
                };
                let (state, note) = top_state(&slots, self.tolerated());
                vec![Vdev {
                    name: format!("{kw}-0"),
                    kind,
                    class: VdevClass::Normal,
                    state,
                    guid: Some(self.guid ^ 0x5a5a),
                    path: None,
                    errors: ErrorCounts::default(),
                    note,
                    children: slots,
                }]
            }
        };
        let root_state = if top.iter().any(|v| v.state.is_failed()) {
            DeviceState::Unavail
        } else if top.iter().any(|v| v.state != DeviceState::Online) {
            DeviceState::Degraded
        } else {
            DeviceState::Online
        };
        let pool_state = if self.suspended {
            DeviceState::Suspended
        } else {
            root_state.clone()
        };
        let (status, action) = match pool_state {
            DeviceState::Online => (None, None),
            DeviceState::Suspended => (
                Some("One or more devices are faulted in response to IO failures.".to_owned()),
                Some(
                    "Make sure the affected devices are connected, then run 'zpool clear'."
                        .to_owned(),
                ),
            ),
            _ => (
                Some("One or more devices has been removed or faulted.".to_owned()),
                Some("Online the device or replace it with 'zpool replace'.".to_owned()),
            ),
        };
        PoolStatus {
            name: name.to_owned(),
            state: pool_state,
            guid: Some(self.guid),
            status,
            action,
            scan: self.scan.clone(),
            root: Vdev {
                name: name.to_owned(),
                kind: VdevKind::Root,
                class: VdevClass::Normal,
                state: root_state,
                guid: Some(self.guid),
                path: None,
                errors: ErrorCounts::default(),
                note: None,
                children: top,
            },
            cache: Vec::new(),
            spares: Vec::new(),
            data_errors: Some(0),
        }
    }
}

fn prop(value: impl Into<String>, source: PropertySource) -> Property {
    Property {
        value: value.into(),
        source,
    }
}

impl State {
    fn guid(&mut self) -> u64 {
        self.next_guid += 1;
        0x1000_0000_0000_0000 ^ self.next_guid.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn check(&mut self, op: FakeOp, pool: Option<&str>, command: &str) -> Result<(), ZfsError> {
        if let Some(i) = self.failures.iter().position(|(o, _)| *o == op) {
            let (_, kind) = self.failures.remove(i);
            return Err(failed(
                command.to_owned(),
                kind,
                format!("injected {kind:?}"),
            ));
        }
        if let Some(p) = pool {
            if self.hung.contains(p) {
                return Err(ZfsError::Timeout {
                    command: command.to_owned(),
                    after: Duration::from_secs(30),
                });
            }
        }
        Ok(())
    }

    /// Changes on a suspended pool hang in reality; report the timeout.
    fn check_writable(&self, pool: &str, command: &str) -> Result<(), ZfsError> {
        if self.pools.get(pool).is_some_and(|p| p.suspended) {
            return Err(ZfsError::Timeout {
                command: command.to_owned(),
                after: Duration::from_secs(120),
            });
        }
        Ok(())
    }

    fn emit(
        &mut self,
        class: &str,
        pool: &str,
        disk: Option<&FakeDisk>,
        last: Option<&DeviceState>,
    ) {
        self.next_eid += 1;
        let mut e = ZpoolEvent {
            class: class.to_owned(),
            time_text: String::new(),
            time_secs: Some(self.now),
            time_nanos: Some(0),
            eid: Some(self.next_eid),
            pool: Some(pool.to_owned()),
            pool_guid: self.pools.get(pool).map(|p| p.guid),
            vdev_guid: disk.map(|d| d.guid),
            vdev_path: disk.map(|d| d.path.clone()),
            vdev_state: disk.map(|d| d.state.clone()),
            vdev_laststate: last.cloned(),
            fields: BTreeMap::new(),
            fields_dropped: 0,
        };
        e.fields.insert("class".to_owned(), format!("\"{class}\""));
        e.fields.insert("pool".to_owned(), format!("\"{pool}\""));
        e.fields
            .insert("eid".to_owned(), format!("0x{:x}", self.next_eid));
        self.followers.retain_mut(|f| {
            if f.dropped > 0 {
                match f.tx.try_send(Ok(EventItem::Dropped(f.dropped))) {
                    Ok(()) => f.dropped = 0,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        f.dropped += 1;
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            match f.tx.try_send(Ok(EventItem::Event(Box::new(e.clone())))) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    f.dropped += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn pool(&self, name: &str, cmd: &str) -> Result<&FakePool, ZfsError> {
        self.pools.get(name).ok_or_else(|| no_pool(cmd, name))
    }

    fn pool_mut(&mut self, name: &str, cmd: &str) -> Result<&mut FakePool, ZfsError> {
        self.pools.get_mut(name).ok_or_else(|| no_pool(cmd, name))
    }

    fn used(&self, ds: &str) -> u64 {
        let prefix = format!("{ds}/");
        self.datasets
            .iter()
            .filter(|(n, _)| *n == ds || n.starts_with(&prefix))
            .map(|(_, d)| d.own_used)
            .sum()
    }

    fn usable(&self, pool: &str) -> u64 {
        self.pools
            .get(pool)
            .map_or(0, |p| p.disk_size.saturating_mul(p.data_disks()))
    }

    fn available(&self, ds: &str) -> u64 {
        let pool = pool_of(ds);
        let mut avail = self.usable(pool).saturating_sub(self.used(pool));
        // Every quota on the path limits what is available.
        let mut name = String::new();
        for part in ds.split('/') {
            if !name.is_empty() {
                name.push('/');
            }
            name.push_str(part);
            if let Some(q) = self.datasets.get(&name).and_then(|d| d.quota) {
                avail = avail.min(q.saturating_sub(self.used(&name)));
            }
        }
        avail
    }

    fn dataset_props(&self, name: &str) -> Option<Properties> {
        let d = self.datasets.get(name)?;
        let mut p = BTreeMap::new();
        let none = PropertySource::None;
        p.insert(
            "used".to_owned(),
            prop(self.used(name).to_string(), none.clone()),
        );
        p.insert(
            "available".to_owned(),
            prop(self.available(name).to_string(), none.clone()),
        );
        p.insert(
            "quota".to_owned(),
            match d.quota {
                Some(q) => prop(q.to_string(), PropertySource::Local),
                None => prop("0", PropertySource::Default),
            },
        );
        p.insert("refquota".to_owned(), prop("0", PropertySource::Default));
        match &d.encryption {
            Some((cipher, format, location)) => {
                p.insert("encryption".to_owned(), prop(cipher.clone(), none.clone()));
                p.insert("keystatus".to_owned(), prop("available", none.clone()));
                p.insert("keyformat".to_owned(), prop(format.clone(), none.clone()));
                p.insert(
                    "keylocation".to_owned(),
                    prop(location.clone(), PropertySource::Local),
                );
            }
            None => {
                p.insert(
                    "encryption".to_owned(),
                    prop("off", PropertySource::Default),
                );
                p.insert("keystatus".to_owned(), prop("-", none.clone()));
            }
        }
        p.insert(
            "compression".to_owned(),
            prop(d.compression.clone(), PropertySource::Local),
        );
        p.insert(
            "mountpoint".to_owned(),
            prop(d.mountpoint.clone(), PropertySource::Default),
        );
        p.insert("type".to_owned(), prop("filesystem", none));
        Some(Properties(p))
    }

    fn capacity(&self, name: &str, p: &FakePool) -> Capacity {
        let size = p.disk_size.saturating_mul(p.width() as u64);
        let data = p.data_disks().max(1);
        let allocated = self.used(name).saturating_mul(p.width() as u64) / data;
        let allocated = allocated.min(size);
        Capacity {
            size,
            allocated,
            free: size - allocated,
            fragmentation_percent: Some(0),
            capacity_percent: Some(allocated.saturating_mul(100).checked_div(size).unwrap_or(0)),
        }
    }

    fn find_disk<'a>(p: &'a mut FakePool, disk: &str) -> Option<&'a mut FakeDisk> {
        p.slots.iter_mut().find_map(|s| {
            if s.disk.matches(disk) {
                Some(&mut s.disk)
            } else {
                s.incoming.as_mut().filter(|d| d.matches(disk))
            }
        })
    }

    fn disk_in_use(&self, path: &str) -> Option<String> {
        self.pools.iter().find_map(|(n, p)| {
            let used = p.slots.iter().any(|s| {
                s.disk.path == path && !matches!(s.disk.state, DeviceState::Removed)
                    || s.incoming.as_ref().is_some_and(|d| d.path == path)
            });
            used.then(|| n.clone())
        })
    }

    fn new_disk(&mut self, path: &str) -> FakeDisk {
        FakeDisk {
            path: path.to_owned(),
            guid: self.guid(),
            state: DeviceState::Online,
            errors: ErrorCounts::default(),
        }
    }

    fn disk_size(&self, path: &str) -> Result<u64, ZfsError> {
        if self.known_disks.is_empty() {
            return Ok(DEFAULT_DISK_SIZE);
        }
        self.known_disks.get(path).copied().ok_or_else(|| {
            failed(
                format!("zpool (disk {path})"),
                FailureKind::Other,
                format!("cannot open '{path}': no such device in /dev"),
            )
        })
    }

    fn start_scan(&mut self, pool: &str, function: ScanFunction) {
        let now = self.now;
        let allocated = self
            .pools
            .get(pool)
            .map_or(0, |p| self.capacity(pool, p).allocated);
        if let Some(p) = self.pools.get_mut(pool) {
            p.scan = Some(ScanStatus {
                function,
                state: ScanState::Running,
                start_time: Some(now),
                end_time: None,
                pass_start: Some(now),
                paused_since: None,
                spent_paused_secs: 0,
                to_examine: allocated,
                examined: allocated,
                skipped: 0,
                issued: 0,
                pass_issued: 0,
                processed: 0,
                errors: 0,
                elapsed_secs: None,
                percent_done_text: None,
            });
        }
    }
}

impl FakeZfs {
    /// An empty fake that accepts any disk path (each [`DEFAULT_DISK_SIZE`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty fake that only knows these disks, each `size` bytes.
    pub fn with_disks<S: AsRef<str>>(disks: &[S], size: u64) -> Self {
        let f = Self::default();
        f.lock()
            .known_disks
            .extend(disks.iter().map(|d| (d.as_ref().to_owned(), size)));
        f
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not cascade.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the clock (Unix seconds) used for scan times and events.
    pub fn set_time(&self, now: u64) {
        self.lock().now = now;
    }

    /// Advances the clock.
    pub fn advance_time(&self, secs: u64) {
        let mut s = self.lock();
        s.now = s.now.saturating_add(secs);
    }

    /// Makes the next call of `op` fail with `kind`.
    pub fn fail_next(&self, op: FakeOp, kind: FailureKind) {
        self.lock().failures.push((op, kind));
    }

    /// Makes every call touching `pool` time out (a hung pool).
    pub fn set_hung(&self, pool: &str, hung: bool) {
        let mut s = self.lock();
        if hung {
            s.hung.insert(pool.to_owned());
        } else {
            s.hung.remove(pool);
        }
    }

    /// Sets a disk's state: `Removed` (pulled), `Faulted`, `Offline`, or
    /// `Online` (returned). Emits `statechange` (and `removed`); suspends
    /// the pool with an `io_failure` event if redundancy is exceeded.
    pub fn set_disk_state(
        &self,
        pool: &str,
        disk: &str,
        state: DeviceState,
    ) -> Result<(), ZfsError> {
        let mut s = self.lock();
        let p = s.pool_mut(pool, "status")?;
        let d = State::find_disk(p, disk).ok_or_else(|| {
            failed(
                format!("fake set_disk_state {pool} {disk}"),
                FailureKind::NoSuchDevice,
                format!("cannot find {disk}: no such device in pool"),
            )
        })?;
        let last = std::mem::replace(&mut d.state, state);
        let snapshot = d.clone();
        let lost = p.lost();
        let newly_suspended = lost && !p.suspended;
        if lost {
            p.suspended = true;
        }
        s.emit(
            "resource.fs.zfs.statechange",
            pool,
            Some(&snapshot),
            Some(&last),
        );
        if snapshot.state == DeviceState::Removed {
            s.emit("resource.fs.zfs.removed", pool, Some(&snapshot), None);
        }
        if newly_suspended {
            s.emit("ereport.fs.zfs.io_failure", pool, None, None);
        }
        Ok(())
    }

    /// Adds read/write/checksum errors to a disk (no state change, as ZED
    /// did not degrade the disk for checksum errors in the experiments).
    pub fn add_disk_errors(
        &self,
        pool: &str,
        disk: &str,
        errors: ErrorCounts,
    ) -> Result<(), ZfsError> {
        let mut s = self.lock();
        let p = s.pool_mut(pool, "status")?;
        let d = State::find_disk(p, disk).ok_or_else(|| {
            failed(
                format!("fake add_disk_errors {pool} {disk}"),
                FailureKind::NoSuchDevice,
                format!("cannot find {disk}: no such device in pool"),
            )
        })?;
        d.errors.read += errors.read;
        d.errors.write += errors.write;
        d.errors.checksum += errors.checksum;
        Ok(())
    }

    /// Sets the bytes a dataset itself uses.
    pub fn set_dataset_used(&self, dataset: &str, bytes: u64) -> Result<(), ZfsError> {
        let mut s = self.lock();
        let d = s
            .datasets
            .get_mut(dataset)
            .ok_or_else(|| no_dataset("set", dataset))?;
        d.own_used = bytes;
        Ok(())
    }

    /// Advances a running scrub/resilver by `bytes` issued; finishes it when
    /// everything was issued (resilver: swaps replaced disks in). Returns
    /// the scan state afterwards.
    pub fn advance_scan(&self, pool: &str, bytes: u64) -> Result<Option<ScanStatus>, ZfsError> {
        let mut s = self.lock();
        let now = s.now;
        let p = s.pool_mut(pool, "status")?;
        let Some(scan) = p.scan.as_mut() else {
            return Ok(None);
        };
        if scan.state != ScanState::Running {
            return Ok(Some(scan.clone()));
        }
        scan.issued = scan.issued.saturating_add(bytes).min(scan.to_examine);
        scan.pass_issued = scan.issued;
        let resilver = scan.function == ScanFunction::Resilver;
        if resilver {
            scan.processed = scan.issued;
        }
        if scan.issued < scan.to_examine {
            return Ok(Some(scan.clone()));
        }
        scan.state = ScanState::Finished;
        scan.end_time = Some(now);
        scan.elapsed_secs = scan.start_time.map(|t| now.saturating_sub(t));
        let done = scan.clone();
        let mut detached = Vec::new();
        if resilver {
            for slot in &mut p.slots {
                if let Some(new) = slot.incoming.take() {
                    detached.push(std::mem::replace(&mut slot.disk, new));
                }
            }
        }
        let class = if resilver {
            "sysevent.fs.zfs.resilver_finish"
        } else {
            "sysevent.fs.zfs.scrub_finish"
        };
        s.emit(class, pool, None, None);
        for d in &detached {
            s.emit("sysevent.fs.zfs.vdev_remove", pool, Some(d), None);
        }
        Ok(Some(done))
    }
}

#[async_trait]
impl Zfs for FakeZfs {
    async fn pool_status(&self, pool: &str) -> Result<PoolStatus, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::PoolStatus, Some(pool), "zpool status")?;
        Ok(s.pool(pool, "status")?.status(pool))
    }

    async fn pool_list(&self) -> Result<Vec<Pool>, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::PoolList, None, "zpool list")?;
        let names: Vec<String> = s.pools.keys().cloned().collect();
        if let Some(h) = names.iter().find(|n| s.hung.contains(*n)) {
            return Err(ZfsError::Timeout {
                command: format!("zpool list (hung pool {h})"),
                after: Duration::from_secs(30),
            });
        }
        Ok(names
            .iter()
            .filter_map(|n| {
                let p = s.pools.get(n)?;
                Some(Pool {
                    name: n.clone(),
                    health: p.status(n).state,
                    guid: Some(p.guid),
                    capacity: s.capacity(n, p),
                    properties: Properties::default(),
                    vdevs: Vec::new(),
                })
            })
            .collect())
    }

    async fn pool_properties(&self, pool: &str) -> Result<Properties, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::PoolProperties, Some(pool), "zpool get")?;
        let p = s.pool(pool, "get")?;
        let cap = s.capacity(pool, p);
        let none = PropertySource::None;
        let mut m = BTreeMap::new();
        m.insert("size".to_owned(), prop(cap.size.to_string(), none.clone()));
        m.insert(
            "allocated".to_owned(),
            prop(cap.allocated.to_string(), none.clone()),
        );
        m.insert("free".to_owned(), prop(cap.free.to_string(), none.clone()));
        m.insert(
            "health".to_owned(),
            prop(p.status(pool).state.as_str(), none.clone()),
        );
        m.insert("guid".to_owned(), prop(p.guid.to_string(), none));
        m.insert("failmode".to_owned(), prop("wait", PropertySource::Default));
        for (k, v) in &p.pool_properties {
            m.insert(k.clone(), prop(v.clone(), PropertySource::Local));
        }
        Ok(Properties(m))
    }

    async fn dataset_list(&self, root: &str) -> Result<Vec<Dataset>, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::DatasetList, Some(pool_of(root)), "zfs list")?;
        if !s.datasets.contains_key(root) {
            return Err(no_dataset("list", root));
        }
        let prefix = format!("{root}/");
        let names: Vec<String> = s
            .datasets
            .keys()
            .filter(|n| *n == root || n.starts_with(&prefix))
            .cloned()
            .collect();
        names
            .iter()
            .map(|n| {
                let props = s.dataset_props(n).ok_or_else(|| no_dataset("list", n))?;
                dataset_from_properties("fake zfs list", n, &props).map_err(|source| {
                    ZfsError::Parse {
                        command: "fake zfs list".to_owned(),
                        source,
                    }
                })
            })
            .collect()
    }

    async fn dataset_properties(&self, dataset: &str) -> Result<Properties, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::DatasetProperties, Some(pool_of(dataset)), "zfs get")?;
        s.dataset_props(dataset)
            .ok_or_else(|| no_dataset("get", dataset))
    }

    async fn create_pool(&self, spec: &PoolSpec) -> Result<(), ZfsError> {
        spec.validate()?;
        let mut s = self.lock();
        let cmd = format!("zpool create {}", spec.name);
        s.check(FakeOp::CreatePool, Some(&spec.name), &cmd)?;
        if s.pools.contains_key(&spec.name) {
            return Err(failed(
                cmd,
                FailureKind::AlreadyExists,
                format!("cannot create '{}': pool already exists", spec.name),
            ));
        }
        let mut size = u64::MAX;
        for d in &spec.disks {
            if let Some(other) = s.disk_in_use(d) {
                return Err(failed(
                    cmd,
                    FailureKind::DeviceInUse,
                    format!("invalid vdev specification\n{d} is part of active pool '{other}'"),
                ));
            }
            size = size.min(s.disk_size(d)?);
        }
        let slots = spec
            .disks
            .iter()
            .map(|d| Slot {
                disk: s.new_disk(d),
                incoming: None,
            })
            .collect();
        let guid = s.guid();
        s.pools.insert(
            spec.name.clone(),
            FakePool {
                guid,
                layout: spec.layout,
                disk_size: size,
                slots,
                scan: None,
                suspended: false,
                pool_properties: spec.pool_properties.clone(),
            },
        );
        let fs = |k: &str| {
            spec.fs_properties
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        s.datasets.insert(
            spec.name.clone(),
            FakeDataset {
                own_used: 0,
                quota: None,
                encryption: None,
                compression: fs("compression").unwrap_or_else(|| "on".to_owned()),
                mountpoint: spec
                    .mountpoint
                    .clone()
                    .unwrap_or_else(|| format!("/{}", spec.name)),
            },
        );
        s.emit("sysevent.fs.zfs.pool_create", &spec.name, None, None);
        Ok(())
    }

    async fn create_dataset(&self, spec: &DatasetSpec) -> Result<(), ZfsError> {
        spec.validate()?;
        let mut s = self.lock();
        let cmd = format!("zfs create {}", spec.name);
        let pool = pool_of(&spec.name).to_owned();
        s.check(FakeOp::CreateDataset, Some(&pool), &cmd)?;
        s.pool(&pool, "create")?;
        s.check_writable(&pool, &cmd)?;
        if s.datasets.contains_key(&spec.name) {
            return Err(failed(
                cmd,
                FailureKind::AlreadyExists,
                format!("cannot create '{}': dataset already exists", spec.name),
            ));
        }
        let parent = spec
            .name
            .rsplit_once('/')
            .map_or(pool.as_str(), |(p, _)| p)
            .to_owned();
        let Some(parent_ds) = s.datasets.get(&parent) else {
            return Err(failed(
                cmd,
                FailureKind::NoSuchDataset,
                format!("cannot create '{}': parent does not exist", spec.name),
            ));
        };
        let compression = spec
            .compression
            .clone()
            .unwrap_or_else(|| parent_ds.compression.clone());
        // Like ZFS: a child of an encrypted dataset is encrypted under the
        // parent's encryption root unless it brings its own.
        let inherited = parent_ds.encryption.clone();
        let mountpoint = spec.mountpoint.clone().unwrap_or_else(|| {
            format!(
                "{}/{}",
                parent_ds.mountpoint,
                spec.name.rsplit('/').next().unwrap_or_default()
            )
        });
        s.datasets.insert(
            spec.name.clone(),
            FakeDataset {
                own_used: 0,
                quota: spec.quota,
                encryption: spec
                    .encryption
                    .as_ref()
                    .map(|e| {
                        (
                            e.cipher.clone(),
                            e.keyformat.as_str().to_owned(),
                            e.keylocation.clone(),
                        )
                    })
                    .or(inherited),
                compression,
                mountpoint,
            },
        );
        Ok(())
    }

    async fn set_quota(&self, dataset: &str, quota: Option<u64>) -> Result<(), ZfsError> {
        crate::api::validate_dataset_name(dataset)?;
        let mut s = self.lock();
        let cmd = format!("zfs set quota {dataset}");
        s.check(FakeOp::SetQuota, Some(pool_of(dataset)), &cmd)?;
        s.check_writable(pool_of(dataset), &cmd)?;
        if !s.datasets.contains_key(dataset) {
            return Err(no_dataset("set", dataset));
        }
        let used = s.used(dataset);
        if let Some(q) = quota {
            if q < used {
                return Err(failed(
                    cmd,
                    FailureKind::QuotaBelowUsage,
                    format!("cannot set property for '{dataset}': size is less than current used or reserved space"),
                ));
            }
        }
        if let Some(d) = s.datasets.get_mut(dataset) {
            d.quota = quota.filter(|q| *q != 0);
        }
        Ok(())
    }

    async fn get_quota(&self, dataset: &str) -> Result<Option<u64>, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::GetQuota, Some(pool_of(dataset)), "zfs get quota")?;
        s.datasets
            .get(dataset)
            .map(|d| d.quota)
            .ok_or_else(|| no_dataset("get", dataset))
    }

    async fn scrub(&self, pool: &str, action: ScrubAction) -> Result<(), ZfsError> {
        let mut s = self.lock();
        let cmd = format!("zpool scrub {action:?} {pool}");
        s.check(FakeOp::Scrub, Some(pool), &cmd)?;
        s.pool(pool, "scrub")?;
        s.check_writable(pool, &cmd)?;
        let now = s.now;
        let p = s.pool_mut(pool, "scrub")?;
        let current = p.scan.clone();
        let is = |f: ScanFunction, st: ScanState| {
            current
                .as_ref()
                .is_some_and(|c| c.function == f && c.state == st)
        };
        match action {
            ScrubAction::Start => {
                if is(ScanFunction::Resilver, ScanState::Running) {
                    return Err(failed(
                        cmd,
                        FailureKind::ResilverInProgress,
                        format!("cannot scrub {pool}: currently resilvering"),
                    ));
                }
                if is(ScanFunction::Scrub, ScanState::Running) {
                    return Err(failed(cmd, FailureKind::ScrubInProgress, format!("cannot scrub {pool}: currently scrubbing; use 'zpool scrub -s' to cancel the current scrub")));
                }
                if is(ScanFunction::Scrub, ScanState::Paused) {
                    if let Some(scan) = p.scan.as_mut() {
                        let paused = scan.paused_since.take().unwrap_or(now);
                        scan.spent_paused_secs += now.saturating_sub(paused);
                        scan.state = ScanState::Running;
                    }
                    s.emit("sysevent.fs.zfs.scrub_resume", pool, None, None);
                } else {
                    s.start_scan(pool, ScanFunction::Scrub);
                    s.emit("sysevent.fs.zfs.scrub_start", pool, None, None);
                }
            }
            ScrubAction::Pause => {
                if !is(ScanFunction::Scrub, ScanState::Running) {
                    return Err(failed(
                        cmd,
                        FailureKind::NoActiveScrub,
                        format!("cannot pause scrubbing {pool}: there is no active scrub"),
                    ));
                }
                if let Some(scan) = p.scan.as_mut() {
                    scan.state = ScanState::Paused;
                    scan.paused_since = Some(now);
                }
                s.emit("sysevent.fs.zfs.scrub_paused", pool, None, None);
            }
            ScrubAction::Stop => {
                if !(is(ScanFunction::Scrub, ScanState::Running)
                    || is(ScanFunction::Scrub, ScanState::Paused))
                {
                    return Err(failed(
                        cmd,
                        FailureKind::NoActiveScrub,
                        format!("cannot cancel scrubbing {pool}: there is no active scrub"),
                    ));
                }
                if let Some(scan) = p.scan.as_mut() {
                    scan.state = ScanState::Canceled;
                    scan.paused_since = None;
                    scan.end_time = Some(now);
                }
                s.emit("sysevent.fs.zfs.scrub_abort", pool, None, None);
            }
        }
        Ok(())
    }

    async fn replace(&self, pool: &str, old: &str, new: &str) -> Result<(), ZfsError> {
        crate::api::validate_device(new)?;
        let mut s = self.lock();
        let cmd = format!("zpool replace {pool} {old} {new}");
        s.check(FakeOp::Replace, Some(pool), &cmd)?;
        s.pool(pool, "replace")?;
        s.check_writable(pool, &cmd)?;
        if let Some(other) = s.disk_in_use(new) {
            return Err(failed(
                cmd,
                FailureKind::DeviceInUse,
                format!("invalid vdev specification\n{new} is part of active pool '{other}'"),
            ));
        }
        s.disk_size(new)?;
        let disk = s.new_disk(new);
        let p = s.pool_mut(pool, "replace")?;
        let Some(slot) = p.slots.iter_mut().find(|sl| sl.disk.matches(old)) else {
            return Err(failed(
                cmd,
                FailureKind::NoSuchDevice,
                format!("cannot replace {old} with {new}: no such device in pool"),
            ));
        };
        if slot.incoming.is_some() {
            return Err(failed(
                cmd,
                FailureKind::Busy,
                format!("cannot replace {old} with {new}: {old} is busy"),
            ));
        }
        slot.incoming = Some(disk.clone());
        s.start_scan(pool, ScanFunction::Resilver);
        s.emit("sysevent.fs.zfs.vdev_attach", pool, Some(&disk), None);
        s.emit("sysevent.fs.zfs.resilver_start", pool, None, None);
        Ok(())
    }

    async fn clear(&self, pool: &str, device: Option<&str>) -> Result<(), ZfsError> {
        let mut s = self.lock();
        let cmd = format!("zpool clear {pool}");
        s.check(FakeOp::Clear, Some(pool), &cmd)?;
        let p = s.pool_mut(pool, "clear")?;
        let mut changed = Vec::new();
        for slot in &mut p.slots {
            for d in std::iter::once(&mut slot.disk).chain(slot.incoming.as_mut()) {
                if device.is_none_or(|dev| d.matches(dev)) {
                    d.errors = ErrorCounts::default();
                    if d.state == DeviceState::Faulted {
                        let last = std::mem::replace(&mut d.state, DeviceState::Online);
                        changed.push((d.clone(), last));
                    }
                }
            }
        }
        if device.is_some()
            && changed.is_empty()
            && !p
                .slots
                .iter()
                .any(|sl| device.is_some_and(|dev| sl.disk.matches(dev)))
        {
            return Err(failed(
                cmd,
                FailureKind::NoSuchDevice,
                "no such device in pool".to_owned(),
            ));
        }
        if p.suspended && !p.lost() {
            p.suspended = false;
        }
        for (d, last) in changed {
            s.emit("resource.fs.zfs.statechange", pool, Some(&d), Some(&last));
        }
        Ok(())
    }

    async fn follow_events(&self) -> Result<EventFollower, ZfsError> {
        let mut s = self.lock();
        s.check(FakeOp::FollowEvents, None, "zpool events -f")?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        s.followers.push(Follower { tx, dropped: 0 });
        Ok(EventFollower::new(rx, None))
    }
}

impl FakeZfs {
    /// Dataset names, for assertions.
    pub fn dataset_names(&self) -> Vec<String> {
        self.lock().datasets.keys().cloned().collect()
    }

    /// The encryption settings a dataset was created with (cipher,
    /// keyformat, keylocation), for assertions.
    pub fn dataset_encryption(&self, dataset: &str) -> Option<(String, String, String)> {
        self.lock()
            .datasets
            .get(dataset)
            .and_then(|d| d.encryption.clone())
    }
}
