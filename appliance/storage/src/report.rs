//! The storage report (the seed's `check_storage_quota()`), computed from the
//! ZFS model: status, capacity, redundancy string, datasets.
//!
//! # Status rules (worst wins)
//! * **unavailable**: no pool; the pool is SUSPENDED, UNAVAIL or FAULTED (or
//!   a state word we do not know); a data vdev lost more devices than it
//!   tolerates (margin < 0); ZFS does not answer.
//! * **critical**: the next device failure loses data (some devices failed
//!   and margin is 0), or ZFS lists files with permanent errors.
//! * **degraded**: devices failed but at least one more failure is
//!   survivable; a resilver runs; devices have read/write/checksum errors
//!   (ZED does not degrade a disk whose checksum errors a scrub repaired, so
//!   the counters are read directly); an encrypted dataset's key is not
//!   loaded; or the pool reports DEGRADED for a reason the margin misses.
//! * **healthy**: none of the above.
//!
//! Capacity is the root dataset's `used` and `available` (usable space,
//! parity excluded), which is what a user can store; the raw `zpool list`
//! sizes are reported alongside.

use appliance_types::storage::{
    bytes_to_tb, DatasetReport, DeviceErrors, PoolReport, ScanKind, ScanPhase, ScanReport,
    StorageReport, StorageStatus,
};
use appliance_zfs::{
    redundancy, Dataset, DeviceState, Encryption, KeyStatus, Pool, PoolStatus, Redundancy,
    RedundancyLevel, ScanFunction, ScanState, ScanStatus, Vdev,
};

use crate::quota::usage_percent;

/// What one poll read about one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSnapshot {
    /// `zpool status`.
    pub status: PoolStatus,
    /// `zpool list` row, when read.
    pub list: Option<Pool>,
    /// `zfs list -r POOL`.
    pub datasets: Vec<Dataset>,
    /// When it was read (Unix seconds).
    pub as_of: u64,
}

/// A disk's id from a vdev name or device path: the last path component
/// without a `-partN` suffix (`/dev/disk/by-id/virtio-ZD2-part1` →
/// `virtio-ZD2`).
pub fn disk_id(name_or_path: &str) -> String {
    let base = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    if let Some((stem, n)) = base.rsplit_once("-part") {
        if !stem.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            return stem.to_owned();
        }
    }
    base.to_owned()
}

/// Error counters of a leaf as reported.
pub fn device_errors(v: &Vdev) -> DeviceErrors {
    DeviceErrors {
        disk: disk_id(&v.name),
        read: v.errors.read,
        write: v.errors.write,
        checksum: v.errors.checksum,
    }
}

/// Every leaf with non-zero counters.
pub fn devices_with_errors(status: &PoolStatus) -> Vec<DeviceErrors> {
    status
        .devices_with_errors()
        .into_iter()
        .map(device_errors)
        .collect()
}

/// Converts the model's scan to the report form.
pub fn scan_report(scan: &ScanStatus, now: u64) -> ScanReport {
    let kind = match scan.function {
        ScanFunction::Scrub => ScanKind::Scrub,
        ScanFunction::Resilver => ScanKind::Resilver,
        ScanFunction::ErrorScrub | ScanFunction::Other(_) => ScanKind::Other,
    };
    let phase = match scan.state {
        ScanState::Running => ScanPhase::Running,
        ScanState::Paused => ScanPhase::Paused,
        ScanState::Finished => ScanPhase::Finished,
        ScanState::Canceled => ScanPhase::Canceled,
        ScanState::Other(_) => ScanPhase::Other,
    };
    ScanReport {
        kind,
        phase,
        percent: (scan.progress_percent() * 100.0).round() / 100.0,
        issued_bytes: scan.issued,
        total_bytes: scan.to_examine.saturating_sub(scan.skipped),
        repaired_bytes: scan.processed,
        errors: scan.errors,
        rate_bytes_per_sec: scan.rate_bytes_per_sec(now),
        eta_secs: scan.eta_secs(now),
        started_at: scan.start_time,
        ended_at: scan.end_time,
    }
}

fn raise(status: &mut StorageStatus, to: StorageStatus) {
    if to > *status {
        *status = to;
    }
}

/// Whether a pool state word means the pool cannot serve I/O.
pub fn pool_state_unusable(state: &DeviceState) -> bool {
    !matches!(state, DeviceState::Online | DeviceState::Degraded)
}

/// Classifies a pool: status and reasons.
pub fn classify(status: &PoolStatus, red: &Redundancy) -> (StorageStatus, Vec<String>) {
    let pool = &status.name;
    let mut st = StorageStatus::Healthy;
    let mut reasons = Vec::new();
    if pool_state_unusable(&status.state) {
        raise(&mut st, StorageStatus::Unavailable);
        let why = status
            .status
            .as_deref()
            .map(|s| format!(": {}", s.split_whitespace().collect::<Vec<_>>().join(" ")))
            .unwrap_or_default();
        reasons.push(format!("pool {pool} is {}{why}", status.state));
    }
    match red.level {
        RedundancyLevel::Lost => {
            raise(&mut st, StorageStatus::Unavailable);
            reasons.push(format!(
                "pool {pool}: {}; reconnect the missing disks",
                red.summary
            ));
        }
        RedundancyLevel::Exhausted => {
            raise(&mut st, StorageStatus::Critical);
            reasons.push(format!(
                "pool {pool}: {}; replace {} now",
                red.summary,
                red.vdevs
                    .iter()
                    .flat_map(|v| v.failed_devices.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        RedundancyLevel::Reduced => {
            raise(&mut st, StorageStatus::Degraded);
            reasons.push(format!(
                "pool {pool}: {}; replace {}",
                red.summary,
                red.vdevs
                    .iter()
                    .flat_map(|v| v.failed_devices.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        RedundancyLevel::Full => {}
    }
    if let Some(n) = status.data_errors.filter(|n| *n > 0) {
        raise(&mut st, StorageStatus::Critical);
        reasons.push(format!(
            "pool {pool}: {n} permanent data errors (zpool status -v {pool} lists the files)"
        ));
    }
    if status.resilvering() {
        raise(&mut st, StorageStatus::Degraded);
        let pct = status
            .scan
            .as_ref()
            .map_or(0.0, ScanStatus::progress_percent);
        reasons.push(format!("pool {pool}: resilver in progress ({pct:.1} %)"));
    }
    for e in devices_with_errors(status) {
        raise(&mut st, StorageStatus::Degraded);
        reasons.push(format!(
            "disk {} in pool {pool}: {} read, {} write, {} checksum errors; check the disk, then `zpool clear {pool}`",
            e.disk, e.read, e.write, e.checksum
        ));
    }
    if status.state == DeviceState::Degraded && st == StorageStatus::Healthy {
        raise(&mut st, StorageStatus::Degraded);
        reasons.push(format!("pool {pool} reports DEGRADED"));
    }
    (st, reasons)
}

fn dataset_report(d: &Dataset) -> DatasetReport {
    let (pct, _) = usage_percent(d.used, d.available, d.quota);
    DatasetReport {
        name: d.name.clone(),
        used_bytes: d.used,
        available_bytes: d.available,
        quota_bytes: d.quota,
        used_percent: (pct * 100.0).round() / 100.0,
        encrypted: d.encryption != Encryption::Off,
        key_loaded: d
            .keystatus
            .as_ref()
            .map(|k| matches!(k, KeyStatus::Available)),
        compression: d.compression.clone(),
        mountpoint: d.mountpoint.clone(),
    }
}

/// The report of one pool.
pub fn pool_report(snap: &PoolSnapshot, now: u64) -> PoolReport {
    let red = redundancy(&snap.status);
    let (mut status, mut reasons) = classify(&snap.status, &red);
    let pool = &snap.status.name;
    let datasets: Vec<&Dataset> = snap
        .datasets
        .iter()
        .filter(|d| d.name == *pool || d.name.starts_with(&format!("{pool}/")))
        .collect();
    for d in &datasets {
        if matches!(d.keystatus, Some(KeyStatus::Unavailable)) {
            raise(&mut status, StorageStatus::Degraded);
            reasons.push(format!(
                "dataset {}: encryption key not loaded (`zfs load-key {}`)",
                d.name, d.name
            ));
        }
    }
    let root = datasets.iter().find(|d| d.name == *pool);
    let (used, free) = root.map_or_else(
        || {
            snap.list
                .as_ref()
                .map_or((0, 0), |l| (l.capacity.allocated, l.capacity.free))
        },
        |r| (r.used, r.available),
    );
    let total = used.saturating_add(free);
    let cap = snap.list.as_ref().map(|l| l.capacity).unwrap_or_default();
    let failed_devices: Vec<String> = red
        .vdevs
        .iter()
        .flat_map(|v| v.failed_devices.iter().map(|d| disk_id(d)))
        .collect();
    PoolReport {
        name: pool.clone(),
        state: snap.status.state.as_str().to_owned(),
        status,
        reasons,
        total_bytes: total,
        used_bytes: used,
        free_bytes: free,
        total_tb: bytes_to_tb(total),
        used_tb: bytes_to_tb(used),
        free_tb: bytes_to_tb(free),
        raw_size_bytes: cap.size,
        raw_allocated_bytes: cap.allocated,
        fragmentation_percent: cap.fragmentation_percent,
        redundancy: red.summary.clone(),
        disks: red.disks,
        failed: red.failed,
        margin: red.margin,
        failed_devices,
        devices_with_errors: devices_with_errors(&snap.status),
        scan: snap.status.scan.as_ref().map(|s| scan_report(s, now)),
        datasets: datasets.into_iter().map(dataset_report).collect(),
    }
}

/// The whole report. `zfs_problem` is set when ZFS stopped answering: the
/// pools are then the last known state and the status is unavailable.
pub fn storage_report(
    pools: &[PoolSnapshot],
    now: u64,
    zfs_problem: Option<&str>,
) -> StorageReport {
    let reports: Vec<PoolReport> = pools.iter().map(|p| pool_report(p, now)).collect();
    let mut status = reports
        .iter()
        .map(|p| p.status)
        .max()
        .unwrap_or(StorageStatus::Unavailable);
    let mut reasons: Vec<String> = reports.iter().flat_map(|p| p.reasons.clone()).collect();
    if reports.is_empty() {
        reasons.push("no pool: create one with `appliancectl storage create-pool`".to_owned());
    }
    if let Some(p) = zfs_problem {
        status = StorageStatus::Unavailable;
        reasons.insert(
            0,
            format!("ZFS is not answering ({p}); showing the last known state"),
        );
    }
    let total: u64 = reports.iter().map(|p| p.total_bytes).sum();
    let used: u64 = reports.iter().map(|p| p.used_bytes).sum();
    let free: u64 = reports.iter().map(|p| p.free_bytes).sum();
    let redundancy = if reports.len() == 1 {
        reports[0].redundancy.clone()
    } else {
        reports
            .iter()
            .map(|p| format!("{}: {}", p.name, p.redundancy))
            .collect::<Vec<_>>()
            .join("; ")
    };
    StorageReport {
        status,
        reasons,
        total_bytes: total,
        used_bytes: used,
        free_bytes: free,
        total_tb: bytes_to_tb(total),
        used_tb: bytes_to_tb(used),
        free_tb: bytes_to_tb(free),
        redundancy,
        pools: reports,
        as_of: pools.iter().map(|p| p.as_of).min().unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_drop_paths_and_partition_suffixes() {
        assert_eq!(disk_id("/dev/disk/by-id/virtio-ZD2-part1"), "virtio-ZD2");
        assert_eq!(disk_id("virtio-ZD2"), "virtio-ZD2");
        assert_eq!(disk_id("ata-X-party"), "ata-X-party");
        assert_eq!(disk_id("nvme-eui.0025-part12"), "nvme-eui.0025");
        assert_eq!(disk_id("-part1"), "-part1");
    }
}
