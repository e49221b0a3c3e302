//! Plain data types for pools, vdevs, scans and datasets.
//!
//! Everything here is produced by the parsers (`crate::parse`) and by the
//! fake (`crate::fake`), serialises with serde, and does no IO. Values ZFS
//! may grow in future releases (states, vdev kinds, scan functions) carry an
//! `Other(String)` variant so that an unknown word is kept, not rejected.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The state of a pool or of one vdev, as ZFS names it.
///
/// Serialised as the upper-case ZFS word (`"ONLINE"`, `"REMOVED"`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum DeviceState {
    /// Working normally.
    Online,
    /// Working with reduced redundancy (an interior vdev or pool).
    Degraded,
    /// Taken out of service by ZFS after too many errors.
    Faulted,
    /// Taken out of service by the administrator (`zpool offline`).
    Offline,
    /// The device disappeared (hot-unplugged).
    Removed,
    /// Cannot be opened; for an interior vdev: insufficient replicas.
    Unavail,
    /// Pool-level: I/O suspended (`failmode=wait`).
    Suspended,
    /// A hot spare that is available.
    Avail,
    /// A hot spare that is in use.
    InUse,
    /// A word this crate does not know; kept verbatim.
    Other(String),
}

impl DeviceState {
    /// Maps a ZFS state word; unknown words become [`DeviceState::Other`].
    pub fn from_zfs(word: &str) -> Self {
        match word.trim() {
            "ONLINE" => Self::Online,
            "DEGRADED" => Self::Degraded,
            "FAULTED" => Self::Faulted,
            "OFFLINE" => Self::Offline,
            "REMOVED" => Self::Removed,
            "UNAVAIL" => Self::Unavail,
            "SUSPENDED" => Self::Suspended,
            "AVAIL" => Self::Avail,
            "INUSE" => Self::InUse,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The ZFS word for this state.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Online => "ONLINE",
            Self::Degraded => "DEGRADED",
            Self::Faulted => "FAULTED",
            Self::Offline => "OFFLINE",
            Self::Removed => "REMOVED",
            Self::Unavail => "UNAVAIL",
            Self::Suspended => "SUSPENDED",
            Self::Avail => "AVAIL",
            Self::InUse => "INUSE",
            Self::Other(s) => s,
        }
    }

    /// True when a device in this state provides no data.
    ///
    /// Unknown states count as failed: for a storage appliance a false alarm
    /// is cheaper than a missed one.
    pub fn is_failed(&self) -> bool {
        match self {
            Self::Online | Self::Degraded | Self::Avail | Self::InUse => false,
            Self::Faulted
            | Self::Offline
            | Self::Removed
            | Self::Unavail
            | Self::Suspended
            | Self::Other(_) => true,
        }
    }
}

impl From<String> for DeviceState {
    fn from(s: String) -> Self {
        Self::from_zfs(&s)
    }
}

impl From<DeviceState> for String {
    fn from(s: DeviceState) -> Self {
        s.as_str().to_owned()
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a vdev is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VdevKind {
    /// The pool's root vdev.
    Root,
    /// RAID-Z with 1..=3 parity devices.
    Raidz {
        /// Parity devices (1, 2 or 3).
        parity: u8,
    },
    /// dRAID with 1..=3 parity; `spec` is the name's layout part
    /// (`draid2:4d:8c:1s`).
    Draid {
        /// Parity devices (1, 2 or 3).
        parity: u8,
        /// Layout part of the name.
        spec: String,
    },
    /// N-way mirror.
    Mirror,
    /// A replacement in progress (old and new device side by side).
    Replacing,
    /// A hot spare standing in for a device (interior `spare-N` vdev).
    Spare,
    /// A dRAID distributed spare (`draid2-0-0`).
    DraidSpare,
    /// A whole disk or partition.
    Disk,
    /// A file-backed vdev.
    File,
    /// Anything else (`hole`, `indirect`, future kinds), kept verbatim.
    Other {
        /// The ZFS type word or name prefix.
        name: String,
    },
}

impl VdevKind {
    /// True for devices without children.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Self::Disk | Self::File | Self::DraidSpare)
    }

    /// Derives the kind from a `zpool status` vdev name such as `raidz2-0`,
    /// `mirror-1`, `draid2:4d:8c:1s-0`, `replacing-1`, `spare-3`, or a device
    /// name. `zfs_type` is the JSON `vdev_type` when known; the name decides
    /// the parity (the JSON type is just `raidz`).
    pub fn from_name(name: &str, zfs_type: Option<&str>) -> Self {
        let prefix = name.rsplit_once('-').map_or(name, |(p, _)| p);
        let from_type = |t: &str| -> Option<Self> {
            Some(match t {
                "root" => Self::Root,
                "mirror" => Self::Mirror,
                "replacing" => Self::Replacing,
                "spare" => Self::Spare,
                "disk" => Self::Disk,
                "file" => Self::File,
                "dspare" => Self::DraidSpare,
                _ => return None,
            })
        };
        if let Some(t) = zfs_type {
            if let Some(kind) = from_type(t) {
                return kind;
            }
        }
        if let Some(rest) = prefix.strip_prefix("raidz") {
            let parity = match rest {
                "" | "1" => Some(1),
                "2" => Some(2),
                "3" => Some(3),
                _ => None,
            };
            if let Some(parity) = parity {
                return Self::Raidz { parity };
            }
        }
        if let Some(rest) = name.strip_prefix("draid") {
            // `draid2:4d:8c:1s-0` (the group) vs `draid2-0-0` (a spare).
            if rest.contains(':') {
                let parity = rest.as_bytes().first().and_then(|b| match b {
                    b'1'..=b'3' => Some(b - b'0'),
                    _ => None,
                });
                if let Some(parity) = parity {
                    return Self::Draid {
                        parity,
                        spec: prefix.to_owned(),
                    };
                }
            } else if rest.split('-').count() == 3 {
                return Self::DraidSpare;
            }
        }
        match (prefix, zfs_type) {
            ("mirror", _) => Self::Mirror,
            ("replacing", _) => Self::Replacing,
            ("spare", _) => Self::Spare,
            ("hole" | "indirect", _) => Self::Other {
                name: prefix.to_owned(),
            },
            (_, Some("raidz" | "draid")) => Self::Other {
                name: name.to_owned(),
            },
            (_, Some(t)) => Self::Other { name: t.to_owned() },
            _ if name.starts_with('/') && !name.starts_with("/dev/") => Self::File,
            _ => Self::Disk,
        }
    }
}

/// Which allocation class a top-level vdev belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VdevClass {
    /// Ordinary data vdev.
    Normal,
    /// Separate intent log (`logs`).
    Log,
    /// L2ARC read cache (`cache`).
    Cache,
    /// Hot spare (`spares`).
    Spare,
    /// Metadata / small-block class (`special`).
    Special,
    /// Dedup table class (`dedup`).
    Dedup,
    /// Unknown class word, kept verbatim.
    Other(String),
}

impl VdevClass {
    /// Maps the JSON `class` word or a `zpool status` section header.
    pub fn from_zfs(word: &str) -> Self {
        match word {
            "normal" => Self::Normal,
            "log" | "logs" => Self::Log,
            "l2cache" | "cache" => Self::Cache,
            "spare" | "spares" => Self::Spare,
            "special" => Self::Special,
            "dedup" => Self::Dedup,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Whether losing a vdev of this class loses the pool.
    pub fn holds_pool_data(&self) -> bool {
        matches!(self, Self::Normal | Self::Special | Self::Dedup)
    }
}

/// Read, write and checksum error counters of one vdev.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// Read errors.
    pub read: u64,
    /// Write errors.
    pub write: u64,
    /// Checksum errors.
    pub checksum: u64,
}

impl ErrorCounts {
    /// True when any counter is non-zero.
    pub fn any(&self) -> bool {
        self.read != 0 || self.write != 0 || self.checksum != 0
    }
}

/// One node of a pool's vdev tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vdev {
    /// Name as `zpool status` prints it (`raidz2-0`, `virtio-ZD1`).
    pub name: String,
    /// What this vdev is.
    pub kind: VdevKind,
    /// Allocation class (for the children of the root and the aux groups).
    pub class: VdevClass,
    /// Current state.
    pub state: DeviceState,
    /// GUID when known (JSON form only).
    pub guid: Option<u64>,
    /// Device path (`/dev/disk/by-id/virtio-ZD1-part1`) when known.
    pub path: Option<String>,
    /// Error counters.
    pub errors: ErrorCounts,
    /// Extra words ZFS prints after the counters (`insufficient replicas`,
    /// `was /dev/...`, `(resilvering)`) or the JSON `aux`/`was` fields.
    pub note: Option<String>,
    /// Children, in ZFS order.
    pub children: Vec<Vdev>,
}

impl Vdev {
    /// Every leaf device under (and including) this vdev.
    pub fn leaves(&self) -> Vec<&Vdev> {
        let mut out = Vec::new();
        self.collect_leaves(&mut out);
        out
    }

    fn collect_leaves<'a>(&'a self, out: &mut Vec<&'a Vdev>) {
        if self.children.is_empty() {
            out.push(self);
        } else {
            for c in &self.children {
                c.collect_leaves(out);
            }
        }
    }

    /// Depth-first search by name or by path.
    pub fn find(&self, name_or_path: &str) -> Option<&Vdev> {
        if self.name == name_or_path || self.path.as_deref() == Some(name_or_path) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name_or_path))
    }
}

/// What a scan is doing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanFunction {
    /// `zpool scrub`.
    Scrub,
    /// Resilver after a replace or a returning device.
    Resilver,
    /// Error scrub (`zpool scrub -e`).
    ErrorScrub,
    /// Unknown word, kept verbatim.
    Other(String),
}

/// Where a scan stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanState {
    /// Running now.
    Running,
    /// Scrub paused by `zpool scrub -p`.
    Paused,
    /// Completed.
    Finished,
    /// Stopped by `zpool scrub -s` (or a resilver that was cancelled).
    Canceled,
    /// Unknown word, kept verbatim.
    Other(String),
}

/// Progress and result of the pool's last or current scrub/resilver.
///
/// Byte counts follow `pool_scan_stat_t`: `to_examine` is the pool's
/// allocated size at scan start, `issued` counts data actually read and
/// verified, `processed` is what was repaired (scrub) or rebuilt (resilver).
/// Times are Unix seconds; the text form of OpenZFS 2.1 prints local
/// calendar time, which the parser does not guess a zone for, so there they
/// are `None` and only `elapsed_secs` of a finished scan is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStatus {
    /// Scrub or resilver.
    pub function: ScanFunction,
    /// Running, paused, finished or canceled.
    pub state: ScanState,
    /// Scan start (Unix seconds).
    pub start_time: Option<u64>,
    /// Scan end (Unix seconds), for finished/canceled scans.
    pub end_time: Option<u64>,
    /// Start of the current pass (after a pause/resume or import).
    pub pass_start: Option<u64>,
    /// When the scrub was paused (Unix seconds), if paused.
    pub paused_since: Option<u64>,
    /// Seconds spent paused during this pass.
    pub spent_paused_secs: u64,
    /// Bytes to examine in total.
    pub to_examine: u64,
    /// Bytes examined (metadata walked).
    pub examined: u64,
    /// Bytes skipped (not needing a scan).
    pub skipped: u64,
    /// Bytes issued (read and verified); the progress measure.
    pub issued: u64,
    /// Bytes issued in the current pass; the rate measure.
    pub pass_issued: u64,
    /// Bytes repaired (scrub) or resilvered (resilver).
    pub processed: u64,
    /// Unrecoverable errors found.
    pub errors: u64,
    /// Wall-clock seconds the scan took, when the output says so.
    pub elapsed_secs: Option<u64>,
    /// `done` percentage printed by the text form, when present.
    pub percent_done_text: Option<String>,
}

impl ScanStatus {
    /// Percentage done, 0.0..=100.0, computed like `zpool status`:
    /// issued / (to_examine - skipped). A finished scan is 100.
    pub fn progress_percent(&self) -> f64 {
        if self.state == ScanState::Finished {
            return 100.0;
        }
        let total = self.to_examine.saturating_sub(self.skipped);
        if total == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)] // bytes < 2^53 on any real pool
        let pct = self.issued as f64 * 100.0 / total as f64;
        pct.clamp(0.0, 100.0)
    }

    /// Seconds of active scanning in the current pass at `now` (Unix
    /// seconds), never less than 1 (as `zpool status` does).
    pub fn active_secs(&self, now: u64) -> u64 {
        let Some(start) = self.pass_start else {
            return 1;
        };
        let end = match (&self.state, self.paused_since) {
            (ScanState::Paused, Some(p)) => p,
            _ => now,
        };
        end.saturating_sub(start)
            .saturating_sub(self.spent_paused_secs)
            .max(1)
    }

    /// Issue rate in bytes per second at `now`; `None` unless running.
    pub fn rate_bytes_per_sec(&self, now: u64) -> Option<u64> {
        if self.state != ScanState::Running {
            return None;
        }
        Some(self.pass_issued / self.active_secs(now))
    }

    /// Estimated seconds left at `now`; `None` unless running with a
    /// non-zero rate.
    pub fn eta_secs(&self, now: u64) -> Option<u64> {
        let rate = self.rate_bytes_per_sec(now)?;
        if rate == 0 {
            return None;
        }
        let total = self.to_examine.saturating_sub(self.skipped);
        Some(total.saturating_sub(self.issued) / rate)
    }
}

/// The state of one pool as `zpool status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Pool state (`ONLINE`, `DEGRADED`, `SUSPENDED`, ...).
    pub state: DeviceState,
    /// Pool GUID (JSON form only).
    pub guid: Option<u64>,
    /// The `status:` explanation, if any.
    pub status: Option<String>,
    /// The `action:` advice, if any.
    pub action: Option<String>,
    /// Last or current scan; `None` if the pool was never scanned.
    pub scan: Option<ScanStatus>,
    /// The root vdev; its children are the top-level data vdevs, and also
    /// `special`/`dedup`/`logs` vdevs with their [`VdevClass`].
    pub root: Vdev,
    /// L2ARC devices.
    pub cache: Vec<Vdev>,
    /// Hot spares.
    pub spares: Vec<Vdev>,
    /// Number of persistent data errors, when reported.
    pub data_errors: Option<u64>,
}

impl PoolStatus {
    /// Top-level vdevs of every class (data, special, dedup, log).
    pub fn top_level(&self) -> &[Vdev] {
        &self.root.children
    }

    /// True while a resilver runs.
    pub fn resilvering(&self) -> bool {
        self.scan
            .as_ref()
            .is_some_and(|s| s.function == ScanFunction::Resilver && s.state == ScanState::Running)
    }

    /// Every leaf device (data, log, cache, spares) with non-zero error
    /// counters, which ZED does not always turn into a state change.
    pub fn devices_with_errors(&self) -> Vec<&Vdev> {
        let mut v: Vec<&Vdev> = self.root.leaves();
        v.extend(self.cache.iter().flat_map(Vdev::leaves));
        v.extend(self.spares.iter().flat_map(Vdev::leaves));
        v.into_iter().filter(|d| d.errors.any()).collect()
    }
}

/// Capacity of a pool in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Raw size (for RAID-Z this includes parity).
    pub size: u64,
    /// Allocated bytes.
    pub allocated: u64,
    /// Free bytes.
    pub free: u64,
    /// Free-space fragmentation in percent, if ZFS knows it.
    pub fragmentation_percent: Option<u64>,
    /// Allocated percentage as ZFS rounds it.
    pub capacity_percent: Option<u64>,
}

/// Where a property's value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertySource {
    /// Read-only / computed (`-`).
    None,
    /// Built-in default.
    Default,
    /// Set on this dataset/pool.
    Local,
    /// Inherited from the named dataset.
    Inherited(String),
    /// Temporary mount option.
    Temporary,
    /// Received with `zfs receive`.
    Received,
    /// Unknown word, kept verbatim.
    Other(String),
}

impl PropertySource {
    /// Parses the text form's source column.
    pub fn from_text(s: &str) -> Self {
        match s {
            "-" | "" => Self::None,
            "default" => Self::Default,
            "local" => Self::Local,
            "temporary" => Self::Temporary,
            "received" => Self::Received,
            other => match other.strip_prefix("inherited from ") {
                Some(from) => Self::Inherited(from.to_owned()),
                None => Self::Other(other.to_owned()),
            },
        }
    }

    /// Parses the JSON form's `{"type": ..., "data": ...}`.
    pub fn from_json(kind: &str, data: &str) -> Self {
        match kind {
            "NONE" => Self::None,
            "DEFAULT" => Self::Default,
            "LOCAL" => Self::Local,
            "TEMPORARY" => Self::Temporary,
            "RECEIVED" => Self::Received,
            "INHERITED" => Self::Inherited(data.to_owned()),
            other => Self::Other(other.to_owned()),
        }
    }
}

/// One property value with its source. Numbers are kept as their decimal
/// text so that every property fits one type; use [`Properties::u64`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Property {
    /// The value (`-` when ZFS has none).
    pub value: String,
    /// Where it came from.
    pub source: PropertySource,
}

/// Properties of one pool or dataset, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties(pub BTreeMap<String, Property>);

impl Properties {
    /// The raw value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|p| p.value.as_str())
    }

    /// The value of `name` as an integer; `None` if absent or not a number
    /// (`-`, `none`, `on`).
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| v.parse().ok())
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One row of `zpool list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Pool health.
    pub health: DeviceState,
    /// Pool GUID when known.
    pub guid: Option<u64>,
    /// Sizes in bytes.
    pub capacity: Capacity,
    /// The properties the listing carried (JSON form); empty for text.
    pub properties: Properties,
    /// Per-vdev rows of `zpool list -v` (text form only), in order.
    pub vdevs: Vec<VdevListEntry>,
}

/// One vdev row of `zpool list -Hpv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdevListEntry {
    /// Vdev name.
    pub name: String,
    /// Size in bytes, if printed.
    pub size: Option<u64>,
    /// Allocated bytes, if printed (top-level vdevs only).
    pub allocated: Option<u64>,
    /// Free bytes, if printed.
    pub free: Option<u64>,
    /// Health, if printed.
    pub health: Option<DeviceState>,
}

/// Native encryption of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// Not encrypted.
    Off,
    /// Encrypted with this cipher (`aes-256-gcm`).
    Cipher(String),
}

/// Whether an encrypted dataset's key is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Key loaded.
    Available,
    /// Key not loaded.
    Unavailable,
    /// Unknown word, kept verbatim.
    Other(String),
}

/// One dataset with the fields the storage manager reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// Full name (`tank/documents`).
    pub name: String,
    /// Bytes used by the dataset and its descendants.
    pub used: u64,
    /// Bytes available to it.
    pub available: u64,
    /// `quota` (None when 0 = none).
    pub quota: Option<u64>,
    /// `refquota` (None when 0 = none).
    pub refquota: Option<u64>,
    /// Native encryption.
    pub encryption: Encryption,
    /// Key status; `None` for unencrypted datasets.
    pub keystatus: Option<KeyStatus>,
    /// Compression setting (`zstd`, `lz4`, `on`, `off`).
    pub compression: String,
    /// Mountpoint (`/tank/documents`, `none`, `legacy`).
    pub mountpoint: String,
}

/// Columns the real runner asks `zfs list` for, in this order; the text
/// parser reads them positionally.
pub const DATASET_COLUMNS: &[&str] = &[
    "name",
    "used",
    "available",
    "quota",
    "refquota",
    "encryption",
    "keystatus",
    "compression",
    "mountpoint",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words_round_trip_and_unknown_is_kept() {
        for w in [
            "ONLINE",
            "DEGRADED",
            "FAULTED",
            "OFFLINE",
            "REMOVED",
            "UNAVAIL",
            "SUSPENDED",
            "AVAIL",
            "INUSE",
        ] {
            assert_eq!(DeviceState::from_zfs(w).as_str(), w);
            assert!(!matches!(DeviceState::from_zfs(w), DeviceState::Other(_)));
        }
        let odd = DeviceState::from_zfs("SPLIT");
        assert_eq!(odd, DeviceState::Other("SPLIT".into()));
        assert!(odd.is_failed());
        let json = serde_json::to_string(&DeviceState::Removed).unwrap();
        assert_eq!(json, "\"REMOVED\"");
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, DeviceState::Removed);
    }

    #[test]
    fn vdev_kind_from_names() {
        assert_eq!(
            VdevKind::from_name("raidz2-0", Some("raidz")),
            VdevKind::Raidz { parity: 2 }
        );
        assert_eq!(
            VdevKind::from_name("raidz-1", None),
            VdevKind::Raidz { parity: 1 }
        );
        assert_eq!(
            VdevKind::from_name("raidz3-2", None),
            VdevKind::Raidz { parity: 3 }
        );
        assert_eq!(VdevKind::from_name("mirror-0", None), VdevKind::Mirror);
        assert_eq!(
            VdevKind::from_name("replacing-1", Some("replacing")),
            VdevKind::Replacing
        );
        assert_eq!(VdevKind::from_name("spare-4", None), VdevKind::Spare);
        assert_eq!(
            VdevKind::from_name("draid2:4d:8c:1s-0", None),
            VdevKind::Draid {
                parity: 2,
                spec: "draid2:4d:8c:1s".into()
            }
        );
        assert_eq!(
            VdevKind::from_name("draid2-0-0", None),
            VdevKind::DraidSpare
        );
        assert_eq!(VdevKind::from_name("virtio-ZD1", None), VdevKind::Disk);
        assert_eq!(VdevKind::from_name("/var/tmp/f1", None), VdevKind::File);
        assert_eq!(
            VdevKind::from_name("whatever-0", Some("newfangled")),
            VdevKind::Other {
                name: "newfangled".into()
            }
        );
        assert_eq!(
            VdevKind::from_name("raidz9-0", Some("raidz")),
            VdevKind::Other {
                name: "raidz9-0".into()
            }
        );
    }

    fn scan(state: ScanState) -> ScanStatus {
        ScanStatus {
            function: ScanFunction::Scrub,
            state,
            start_time: Some(1000),
            end_time: None,
            pass_start: Some(1000),
            paused_since: None,
            spent_paused_secs: 10,
            to_examine: 1100,
            examined: 900,
            skipped: 100,
            issued: 250,
            pass_issued: 250,
            processed: 0,
            errors: 0,
            elapsed_secs: None,
            percent_done_text: None,
        }
    }

    #[test]
    fn scan_progress_rate_eta() {
        let s = scan(ScanState::Running);
        assert!((s.progress_percent() - 25.0).abs() < 1e-9);
        // 60 s since pass start, 10 s of it paused: 50 s active.
        assert_eq!(s.active_secs(1060), 50);
        assert_eq!(s.rate_bytes_per_sec(1060), Some(5));
        assert_eq!(s.eta_secs(1060), Some(150));
        let mut p = scan(ScanState::Paused);
        p.paused_since = Some(1030);
        assert_eq!(p.active_secs(5000), 20);
        assert_eq!(p.rate_bytes_per_sec(5000), None);
        assert!((scan(ScanState::Finished).progress_percent() - 100.0).abs() < 1e-9);
    }
}
