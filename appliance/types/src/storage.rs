//! Storage types: the storage report, disk list, quota and scrub status, the
//! payloads of the `storage.*` bus subjects, and the control requests and
//! responses for storage operations.
//!
//! Plain serde data, no IO. The daemon fills these from `appliance-storage`;
//! `appliancectl` prints them (as text or `--json`).
//!
//! Everything here is encoded with postcard on the control socket, so the
//! usual postcard rules hold: enums are externally tagged (no
//! `#[serde(tag)]`, no `flatten`, no skipped fields), and new variants and
//! fields are only ever appended at the end.
//!
//! # Units
//! Bytes are exact `u64`s. The `*_tb` fields are decimal terabytes
//! (10^12 bytes), the unit disks are sold in, rounded to 3 decimals; they are
//! for display only.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One decimal terabyte in bytes.
pub const TB: u64 = 1_000_000_000_000;

/// `bytes` as decimal terabytes rounded to 3 decimals (display only).
pub fn bytes_to_tb(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // display value; exact bytes are kept alongside
    let tb = bytes as f64 / TB as f64;
    (tb * 1000.0).round() / 1000.0
}

/// Overall storage status, worst first in severity order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageStatus {
    /// Every device works; full redundancy.
    Healthy,
    /// Data is safe, but redundancy is reduced (a failed disk, a resilver, or
    /// devices with error counts) and at least one more failure is survivable.
    Degraded,
    /// The next device failure loses data (margin 0).
    Critical,
    /// The data cannot be served: no pool, a suspended or unavailable pool,
    /// or ZFS does not answer.
    Unavailable,
}

impl StorageStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Critical => "critical",
            Self::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for StorageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceErrors {
    /// Disk id (the `/dev/disk/by-id` name without `-partN`).
    pub disk: String,
    /// Read errors.
    pub read: u64,
    /// Write errors.
    pub write: u64,
    /// Checksum errors (silent corruption found and repaired by ZFS).
    pub checksum: u64,
}

/// Scrub or resilver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanKind {
    /// `zpool scrub`.
    Scrub,
    /// Resilver after a replace or a returning disk.
    Resilver,
    /// Another scan function (error scrub).
    Other,
}

/// Where a scan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanPhase {
    /// Running.
    Running,
    /// Paused (scrubs only).
    Paused,
    /// Completed.
    Finished,
    /// Cancelled.
    Canceled,
    /// A state word the daemon does not know.
    Other,
}

/// The last or current scan of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    /// Scrub or resilver.
    pub kind: ScanKind,
    /// Running, paused, finished, canceled.
    pub phase: ScanPhase,
    /// Percent done, 0..=100.
    pub percent: f64,
    /// Bytes issued (verified) so far.
    pub issued_bytes: u64,
    /// Bytes to scan in total.
    pub total_bytes: u64,
    /// Bytes repaired (scrub) or resilvered (resilver).
    pub repaired_bytes: u64,
    /// Unrecoverable errors found.
    pub errors: u64,
    /// Current rate, while running.
    pub rate_bytes_per_sec: Option<u64>,
    /// Estimated seconds left, while running.
    pub eta_secs: Option<u64>,
    /// Start (Unix seconds), when known.
    pub started_at: Option<u64>,
    /// End (Unix seconds), when known.
    pub ended_at: Option<u64>,
}

/// One dataset in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReport {
    /// Full name (`tank/documents`).
    pub name: String,
    /// Bytes used (with descendants).
    pub used_bytes: u64,
    /// Bytes still available to it (quota and pool free space both count).
    pub available_bytes: u64,
    /// Quota, if one is set.
    pub quota_bytes: Option<u64>,
    /// Used percentage of the quota, or of used + available without a quota.
    pub used_percent: f64,
    /// Natively encrypted.
    pub encrypted: bool,
    /// For encrypted datasets: whether the key is loaded.
    pub key_loaded: Option<bool>,
    /// Compression setting.
    pub compression: String,
    /// Mountpoint.
    pub mountpoint: String,
}

/// One pool in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Pool name.
    pub name: String,
    /// ZFS's state word (`ONLINE`, `DEGRADED`, `SUSPENDED`, ...).
    pub state: String,
    /// Status classification.
    pub status: StorageStatus,
    /// Why it is not healthy, in words an operator can act on.
    pub reasons: Vec<String>,
    /// Usable bytes (root dataset used + available; parity excluded).
    pub total_bytes: u64,
    /// Bytes used by data (root dataset `used`).
    pub used_bytes: u64,
    /// Bytes still free for data (root dataset `available`).
    pub free_bytes: u64,
    /// `total_bytes` in TB.
    pub total_tb: f64,
    /// `used_bytes` in TB.
    pub used_tb: f64,
    /// `free_bytes` in TB.
    pub free_tb: f64,
    /// Raw size from `zpool list` (parity included).
    pub raw_size_bytes: u64,
    /// Raw allocated bytes from `zpool list`.
    pub raw_allocated_bytes: u64,
    /// Free-space fragmentation, when ZFS knows it.
    pub fragmentation_percent: Option<u64>,
    /// "RAID-Z2, 6 disks, 1 failed, survives 1 more".
    pub redundancy: String,
    /// Data disks.
    pub disks: u32,
    /// Failed data disks.
    pub failed: u32,
    /// More failures survivable now; negative when data is lost.
    pub margin: i64,
    /// Names of the failed disks.
    pub failed_devices: Vec<String>,
    /// Devices with non-zero error counters.
    pub devices_with_errors: Vec<DeviceErrors>,
    /// Last or current scan.
    pub scan: Option<ScanReport>,
    /// Datasets of this pool.
    pub datasets: Vec<DatasetReport>,
}

/// `appliancectl storage report`: the answer to "is my data safe, and how
/// much room is left?".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    /// Worst status over the pools (`unavailable` without a pool).
    pub status: StorageStatus,
    /// Why, when not healthy.
    pub reasons: Vec<String>,
    /// Sum over pools of usable bytes.
    pub total_bytes: u64,
    /// Sum over pools of used bytes.
    pub used_bytes: u64,
    /// Sum over pools of free bytes.
    pub free_bytes: u64,
    /// `total_bytes` in TB.
    pub total_tb: f64,
    /// `used_bytes` in TB.
    pub used_tb: f64,
    /// `free_bytes` in TB.
    pub free_tb: f64,
    /// The redundancy string of the pool (pools joined with "; ").
    pub redundancy: String,
    /// Per pool.
    pub pools: Vec<PoolReport>,
    /// When the data was read from ZFS (Unix seconds); older than the poll
    /// interval means ZFS stopped answering and this is the last known state.
    pub as_of: u64,
}

/// One disk in `appliancectl storage disks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk id: the `/dev/disk/by-id` name (`ata-WDC_..._WD-123`, `virtio-ZD1`).
    pub id: String,
    /// Full by-id path, when the disk is present.
    pub path: Option<String>,
    /// Kernel name (`sda`, `vdb`), when present.
    pub dev: Option<String>,
    /// Bay name from the udev rules (`bay3`).
    pub bay: Option<String>,
    /// Serial number.
    pub serial: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Size in bytes (0 when absent).
    pub size_bytes: u64,
    /// Pool it belongs to.
    pub pool: Option<String>,
    /// Its state in the pool (`ONLINE`, `REMOVED`, ...).
    pub state: Option<String>,
    /// Error counters in the pool.
    pub errors: Option<DeviceErrors>,
    /// The disk the system boots from.
    pub boot: bool,
    /// Why it cannot be used for a new pool or a replacement (empty: usable).
    pub problems: Vec<String>,
}

/// `appliancectl storage quota get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// Dataset.
    pub dataset: String,
    /// Quota, if set.
    pub quota_bytes: Option<u64>,
    /// Used bytes.
    pub used_bytes: u64,
    /// Available bytes.
    pub available_bytes: u64,
    /// Used percent (of the quota, or of used + available).
    pub used_percent: f64,
    /// Alert levels currently crossed (percent).
    pub levels_crossed: Vec<u8>,
}

/// `appliancectl storage scrub ... POOL` and the scrub part of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// Pool.
    pub pool: String,
    /// Current or last scan.
    pub scan: Option<ScanReport>,
    /// Last completed scrub (Unix seconds).
    pub last_completed_at: Option<u64>,
    /// When the scheduler will next start one (Unix seconds).
    pub next_due_at: Option<u64>,
    /// The scheduler's view in words ("due", "outside window", "resilvering").
    pub schedule: String,
}

/// Answer to an upload admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Admission {
    /// The upload fits; `available` bytes were free for the dataset.
    Admitted {
        /// Bytes available before this upload.
        available: u64,
    },
    /// The upload does not fit.
    QuotaExceeded {
        /// Bytes the upload needs.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
}

/// Pool layout for `storage create-pool --layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageLayout {
    /// Single parity.
    Raidz1,
    /// Double parity (the default).
    Raidz2,
    /// Triple parity.
    Raidz3,
    /// N-way mirror.
    Mirror,
}

impl StorageLayout {
    /// The CLI word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raidz1 => "raidz1",
            Self::Raidz2 => "raidz2",
            Self::Raidz3 => "raidz3",
            Self::Mirror => "mirror",
        }
    }

    /// Parses the CLI word (`raidz` is `raidz1`).
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "raidz" | "raidz1" => Some(Self::Raidz1),
            "raidz2" => Some(Self::Raidz2),
            "raidz3" => Some(Self::Raidz3),
            "mirror" => Some(Self::Mirror),
            _ => None,
        }
    }
}

/// Manual scrub control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubCommand {
    /// Start a scrub now.
    Start,
    /// Pause the running scrub.
    Pause,
    /// Resume a paused scrub.
    Resume,
    /// Cancel the scrub.
    Stop,
}

/// Steps of pool provisioning, persisted before each is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionState {
    /// Inputs checked and recorded; nothing done to the disks yet.
    Planned,
    /// `zpool create` succeeded.
    PoolCreated,
    /// The standard datasets exist.
    DatasetsCreated,
    /// Finished.
    Done,
}

/// Result of `storage create-pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionOutcome {
    /// Pool.
    pub pool: String,
    /// State reached (always `Done` on success).
    pub state: ProvisionState,
    /// Datasets created or found.
    pub datasets: Vec<String>,
    /// Where the `documents` key file is.
    pub key_file: String,
    /// The request completed an earlier, interrupted attempt.
    pub resumed: bool,
    /// Nothing was left to do: the same request had already completed.
    pub already_done: bool,
}

/// Storage requests on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageRequest {
    /// `storage report`.
    Report,
    /// `storage disks`.
    Disks,
    /// `storage quota get [DATASET]`.
    QuotaGet {
        /// One dataset, or all.
        dataset: Option<String>,
    },
    /// `storage quota set DATASET SIZE|none`. Mutating.
    QuotaSet {
        /// Dataset.
        dataset: String,
        /// Bytes, `None` removes the quota.
        bytes: Option<u64>,
    },
    /// `storage scrub start|pause|resume|stop POOL`. Mutating.
    Scrub {
        /// Pool.
        pool: String,
        /// What to do.
        command: ScrubCommand,
    },
    /// `storage scrub status POOL`.
    ScrubStatus {
        /// Pool.
        pool: String,
    },
    /// `storage replace POOL OLD NEW [--force]`. Mutating.
    Replace {
        /// Pool.
        pool: String,
        /// Disk to replace (id, by-id path, or the name `zpool status` shows).
        old: String,
        /// New disk (`/dev/disk/by-id/...`).
        new: String,
        /// Accept a disk with partitions or signatures.
        force: bool,
    },
    /// `storage create-pool NAME --layout L DISK...`. Mutating.
    CreatePool {
        /// Pool name.
        name: String,
        /// Layout.
        layout: StorageLayout,
        /// `/dev/disk/by-id/...` paths.
        disks: Vec<String>,
        /// Accept disks with partitions or signatures.
        force: bool,
    },
}

/// How long a client waits for the answer to a storage change (240 s): the
/// storage manager bounds each change by 150 s (its `change_timeout`, above
/// the ZFS runner's own 120 s), after up to 45 s reading the disks (its
/// `call_timeout`, for replace), so its own timeout answers first.
pub const CHANGE_ANSWER_SECS: u64 = 240;

/// How long a client waits for `create-pool` (660 s): the manager bounds a
/// whole pool creation by 600 s (`provision_timeout`); under QEMU/TCG it
/// took over 30 s.
pub const CREATE_POOL_ANSWER_SECS: u64 = 660;

/// How long a client waits for a query (30 s): queries are answered from
/// the last poll and never wait for ZFS.
pub const QUERY_ANSWER_SECS: u64 = 30;

impl StorageRequest {
    /// How long a client should wait for the answer: longer than the
    /// daemon's own bound for the operation, so that a slow but successful
    /// change is not reported as a failure by the client.
    pub fn answer_within(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Self::CreatePool { .. } => CREATE_POOL_ANSWER_SECS,
            r if r.is_mutating() => CHANGE_ANSWER_SECS,
            _ => QUERY_ANSWER_SECS,
        })
    }

    /// Whether the request changes the appliance (needs an admin peer).
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Self::QuotaSet { .. }
                | Self::Scrub { .. }
                | Self::Replace { .. }
                | Self::CreatePool { .. }
        )
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Report => "storage-report",
            Self::Disks => "storage-disks",
            Self::QuotaGet { .. } => "storage-quota-get",
            Self::QuotaSet { .. } => "storage-quota-set",
            Self::Scrub { .. } => "storage-scrub",
            Self::ScrubStatus { .. } => "storage-scrub-status",
            Self::Replace { .. } => "storage-replace",
            Self::CreatePool { .. } => "storage-create-pool",
        }
    }
}

/// Storage responses on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StorageResponse {
    /// Answer to `Report`.
    Report(StorageReport),
    /// Answer to `Disks`.
    Disks(Vec<DiskInfo>),
    /// Answer to `QuotaGet` and `QuotaSet`.
    Quotas(Vec<QuotaStatus>),
    /// Answer to `Scrub` and `ScrubStatus`.
    Scrub(ScrubStatus),
    /// Answer to `Replace`: what was started.
    Done(String),
    /// Answer to `CreatePool`.
    PoolCreated(ProvisionOutcome),
}

// ------------------------------------------------------------------ events

/// Escapes a name for use as one bus subject token.
///
/// Subject tokens are separated by `.` and may not contain whitespace or the
/// wildcards `*` and `>`; pool, dataset and disk names may contain `.`
/// (`nvme-eui.0025...`). Those bytes and `%` itself are written as `%XX`
/// (upper-case hex), which is reversible and leaves ordinary names
/// (`tank`, `tank/documents`, `virtio-ZD1`) unchanged. The payload always
/// carries the real name.
pub fn subject_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c == '.' || c == '*' || c == '>' || c == '%' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Where an event's change was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// `zpool events -f`.
    ZfsEvent,
    /// Polling `zpool status`.
    Poll,
    /// The udev monitor.
    Udev,
    /// The daemon itself (timeouts, scheduler).
    Daemon,
}

/// `storage.pool.<pool>.state`: the pool's state or margin changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStateEvent {
    /// Pool.
    pub pool: String,
    /// Previous state word (`None` when first seen since start).
    pub old_state: Option<String>,
    /// New state word (`ONLINE`, `DEGRADED`, `SUSPENDED`, or `UNRESPONSIVE`
    /// when ZFS stopped answering).
    pub new_state: String,
    /// Previous margin.
    pub old_margin: Option<i64>,
    /// New margin (`None` when unknown because ZFS does not answer).
    pub new_margin: Option<i64>,
    /// Status classification.
    pub status: StorageStatus,
    /// Redundancy string.
    pub redundancy: String,
    /// Failed disks.
    pub failed_devices: Vec<String>,
    /// Why, in words.
    pub reason: String,
    /// Where the change was seen.
    pub source: EventSource,
    /// Unix seconds.
    pub at: u64,
}

/// What happened to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskAction {
    /// Gone (hot-unplugged, or REMOVED in the pool).
    Removed,
    /// Appeared (hot-plugged, or a new member of the pool).
    Added,
    /// Taken out of service (FAULTED, UNAVAIL, OFFLINE, DEGRADED).
    Faulted,
    /// Back to ONLINE.
    Online,
    /// Its error counters went up (ZED does not always change the state,
    /// for example after a scrub repaired checksum errors).
    Errors,
}

impl DiskAction {
    /// The subject's last token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Added => "added",
            Self::Faulted => "faulted",
            Self::Online => "online",
            Self::Errors => "errors",
        }
    }
}

/// `storage.disk.<id>.<action>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEvent {
    /// Disk id (by-id name without `-partN`).
    pub disk: String,
    /// What happened.
    pub action: DiskAction,
    /// Pool it belongs to.
    pub pool: Option<String>,
    /// New state word (`REMOVED`, `ONLINE`, ...; `ABSENT`/`PRESENT` from udev).
    pub state: String,
    /// Previous state word.
    pub previous_state: Option<String>,
    /// Error counters.
    pub errors: DeviceErrors,
    /// Bay, when known.
    pub bay: Option<String>,
    /// Serial, when known.
    pub serial: Option<String>,
    /// Where the change was seen.
    pub source: EventSource,
    /// Unix seconds.
    pub at: u64,
}

/// Phase of a scan event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanEventPhase {
    /// A resilver started (`storage.resilver.<pool>.started`).
    Started,
    /// Progress (rate-limited).
    Progress,
    /// Completed; carries the bytes repaired and the errors.
    Finished,
    /// A scrub was paused.
    Paused,
    /// A scan was cancelled.
    Canceled,
}

impl ScanEventPhase {
    /// The subject's last token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Finished => "finished",
            Self::Paused => "paused",
            Self::Canceled => "canceled",
        }
    }
}

/// `storage.scrub.<pool>.*` and `storage.resilver.<pool>.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanEvent {
    /// Pool.
    pub pool: String,
    /// Phase.
    pub phase: ScanEventPhase,
    /// The scan.
    pub scan: ScanReport,
    /// Devices with non-zero error counters at this point (checksum errors
    /// a scrub found are reported here even though the disks stay ONLINE).
    pub devices_with_errors: Vec<DeviceErrors>,
    /// Unix seconds.
    pub at: u64,
}

/// `storage.pool.<pool>.healthy`: periodic heartbeat of a healthy pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolHealthyEvent {
    /// Pool.
    pub pool: String,
    /// Redundancy string.
    pub redundancy: String,
    /// Margin.
    pub margin: i64,
    /// Usable free bytes.
    pub free_bytes: u64,
    /// Unix seconds.
    pub at: u64,
}

/// Direction of a quota threshold event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaDirection {
    /// Usage rose to or above the level.
    Crossed,
    /// Usage fell below the level minus the hysteresis; the level is armed
    /// again.
    Cleared,
}

/// `storage.quota.<dataset>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaEvent {
    /// Dataset.
    pub dataset: String,
    /// The level (percent).
    pub level_percent: u8,
    /// Crossed or cleared.
    pub direction: QuotaDirection,
    /// Usage now (percent).
    pub used_percent: f64,
    /// Used bytes.
    pub used_bytes: u64,
    /// The limit the percentage is of (quota, or used + available).
    pub limit_bytes: u64,
    /// Unix seconds.
    pub at: u64,
}

/// Every event the storage manager publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StorageEvent {
    /// `storage.pool.<pool>.state`.
    PoolState(PoolStateEvent),
    /// `storage.disk.<id>.<action>`.
    Disk(DiskEvent),
    /// `storage.scrub.<pool>.<phase>`.
    Scrub(ScanEvent),
    /// `storage.resilver.<pool>.<phase>`.
    Resilver(ScanEvent),
    /// `storage.pool.<pool>.healthy`.
    PoolHealthy(PoolHealthyEvent),
    /// `storage.quota.<dataset>`.
    Quota(QuotaEvent),
}

impl StorageEvent {
    /// The bus subject.
    pub fn subject(&self) -> String {
        match self {
            Self::PoolState(e) => format!("storage.pool.{}.state", subject_token(&e.pool)),
            Self::Disk(e) => format!(
                "storage.disk.{}.{}",
                subject_token(&e.disk),
                e.action.as_str()
            ),
            Self::Scrub(e) => format!(
                "storage.scrub.{}.{}",
                subject_token(&e.pool),
                e.phase.as_str()
            ),
            Self::Resilver(e) => format!(
                "storage.resilver.{}.{}",
                subject_token(&e.pool),
                e.phase.as_str()
            ),
            Self::PoolHealthy(e) => format!("storage.pool.{}.healthy", subject_token(&e.pool)),
            Self::Quota(e) => format!("storage.quota.{}", subject_token(&e.dataset)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn subject_tokens_escape_only_what_the_bus_refuses() {
        assert_eq!(subject_token("tank"), "tank");
        assert_eq!(subject_token("tank/documents"), "tank/documents");
        assert_eq!(subject_token("virtio-ZD1"), "virtio-ZD1");
        assert_eq!(subject_token("nvme-eui.0025"), "nvme-eui%2E0025");
        assert_eq!(subject_token("a b*>%"), "a%20b%2A%3E%25");
        assert_eq!(subject_token(""), "%00");
        for s in ["x.y", "a b", "*", ">", "\n"] {
            let t = subject_token(s);
            assert!(!t.contains(['.', ' ', '*', '>', '\n']), "{t}");
        }
    }

    #[test]
    fn tb_is_decimal_and_rounded() {
        assert!((bytes_to_tb(4 * TB) - 4.0).abs() < 1e-12);
        assert!((bytes_to_tb(1_476_395_008) - 0.001).abs() < 1e-12);
        assert!((bytes_to_tb(1_234_567_890_123) - 1.235).abs() < 1e-12);
    }

    #[test]
    fn requests_round_trip_through_postcard_and_know_what_mutates() {
        let reqs = [
            StorageRequest::Report,
            StorageRequest::QuotaSet {
                dataset: "tank/documents".into(),
                bytes: Some(50 << 20),
            },
            StorageRequest::CreatePool {
                name: "tank".into(),
                layout: StorageLayout::Raidz2,
                disks: vec!["/dev/disk/by-id/virtio-ZD1".into()],
                force: false,
            },
        ];
        for r in reqs {
            let bytes = postcard::to_allocvec(&r).unwrap();
            let back: StorageRequest = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, r);
        }
        assert!(!StorageRequest::Report.is_mutating());
        assert!(StorageRequest::Scrub {
            pool: "tank".into(),
            command: ScrubCommand::Pause
        }
        .is_mutating());
        assert_eq!(StorageLayout::parse("raidz"), Some(StorageLayout::Raidz1));
        assert_eq!(StorageLayout::parse("raid5"), None);
    }

    #[test]
    fn events_have_the_documented_subjects_and_survive_postcard() {
        let disk = StorageEvent::Disk(DiskEvent {
            disk: "virtio-ZD2".into(),
            action: DiskAction::Removed,
            pool: Some("tank".into()),
            state: "REMOVED".into(),
            previous_state: Some("ONLINE".into()),
            errors: DeviceErrors::default(),
            bay: None,
            serial: None,
            source: EventSource::ZfsEvent,
            at: 1,
        });
        assert_eq!(disk.subject(), "storage.disk.virtio-ZD2.removed");
        let bytes = postcard::to_allocvec(&disk).unwrap();
        let back: StorageEvent = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, disk);
        let q = StorageEvent::Quota(QuotaEvent {
            dataset: "tank/documents/alice".into(),
            level_percent: 80,
            direction: QuotaDirection::Crossed,
            used_percent: 81.0,
            used_bytes: 81,
            limit_bytes: 100,
            at: 1,
        });
        assert_eq!(q.subject(), "storage.quota.tank/documents/alice");
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["Quota"]["direction"], "crossed");
    }
}
