//! Disks: a snapshot of the machine's block devices, the pure eligibility
//! rules for `create-pool` and `replace`, and the disk list.
//!
//! # Snapshot
//! [`DiskSnapshot`] holds everything the rules look at, read by a
//! [`DiskInventory`]:
//!
//! * `lsblk --json -b -O`: topology (disks, partitions, holders), sizes,
//!   serials, removable/read-only flags, mount points, device numbers;
//! * `wipefs --json --no-act DEV` for every whole disk: the signatures
//!   libblkid finds by probing the device itself (partition tables, file
//!   systems, `zfs_member` labels, RAID superblocks). lsblk's `FSTYPE` and
//!   `PTTYPE` come from the udev database and are empty where udev has not
//!   run (the captures in `tests/fixtures/disks/` show exactly that), so they
//!   are only a second opinion;
//! * `/dev/disk/by-id/*` symlinks (stable names → kernel names);
//! * `/proc/mounts`, and the device numbers of `/`, `/boot`, `/boot/efi`
//!   (`stat`), which find the boot disk even when `/proc/mounts` says
//!   `/dev/root`;
//! * `/run/udev/data/b<maj>:<min>` for our rules' properties (bay name,
//!   `APPLIANCE_BOOT_DISK`).
//!
//! # Rules ([`check_disk`], [`check_create`])
//! Always refused: names outside `/dev/disk/by-id/`, unknown names,
//! partitions (ZFS gets whole disks), the boot disk, disks of an imported
//! pool, mounted disks (or with a mounted partition), disks held by another
//! driver (device-mapper, md), read-only or removable media, disks under
//! [`MIN_DISK_BYTES`], the same disk twice (two names for one device), and
//! too few disks for the layout ([`policy_min_disks`]). Refused unless
//! `force`: partitions or signatures (including the ZFS label of an
//! exported pool) — the operator must say that the data on them may go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use appliance_types::storage::{DeviceErrors, DiskInfo, StorageLayout};
use appliance_zfs::{PoolLayout, PoolStatus, Vdev};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::report::{device_errors, disk_id};

/// Where stable disk names live.
pub const BY_ID_DIR: &str = "/dev/disk/by-id";

/// Smallest disk accepted: ZFS's own minimum vdev size (`SPA_MINDEVSIZE`,
/// 64 MiB). The QEMU test disks are a few hundred MiB, so no larger policy
/// minimum is set here.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

/// The appliance's minimum disk count per layout: parity + 2 for RAID-Z (a
/// RAID-Z*N* of *N* + 1 disks stores no more than a mirror and rebuilds
/// slower; the issue asks for at least 4 for RAID-Z2), 2 for a mirror.
/// Never below ZFS's own minimum ([`PoolLayout::min_disks`]).
pub fn policy_min_disks(layout: StorageLayout) -> usize {
    let (ours, zfs) = match layout {
        StorageLayout::Raidz1 => (3, PoolLayout::Raidz1),
        StorageLayout::Raidz2 => (4, PoolLayout::Raidz2),
        StorageLayout::Raidz3 => (5, PoolLayout::Raidz3),
        StorageLayout::Mirror => (2, PoolLayout::Mirror),
    };
    ours.max(zfs.min_disks())
}

/// The ZFS layout for a storage layout.
pub fn zfs_layout(layout: StorageLayout) -> PoolLayout {
    match layout {
        StorageLayout::Raidz1 => PoolLayout::Raidz1,
        StorageLayout::Raidz2 => PoolLayout::Raidz2,
        StorageLayout::Raidz3 => PoolLayout::Raidz3,
        StorageLayout::Mirror => PoolLayout::Mirror,
    }
}

/// One block device from lsblk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    /// Kernel name (`vdb`, `sda1`).
    pub name: String,
    /// Device node (`/dev/vdb`).
    pub path: String,
    /// `disk`, `part`, `loop`, `rom`, `lvm`, `crypt`, `raid1`, ...
    pub kind: String,
    /// `maj:min`.
    pub devnum: String,
    /// Bytes.
    pub size: u64,
    /// Serial number.
    pub serial: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Removable medium.
    pub removable: bool,
    /// Read-only.
    pub read_only: bool,
    /// File system type (from udev; may be empty without udev).
    pub fstype: Option<String>,
    /// Partition table type (from udev; may be empty without udev).
    pub pttype: Option<String>,
    /// Partition table UUID.
    pub ptuuid: Option<String>,
    /// Where it is mounted.
    pub mountpoints: Vec<String>,
    /// Partitions and holders.
    pub children: Vec<BlockDevice>,
}

impl BlockDevice {
    /// Mount points of the device and everything under it.
    pub fn all_mountpoints(&self) -> Vec<String> {
        let mut v = self.mountpoints.clone();
        for c in &self.children {
            v.extend(c.all_mountpoints());
        }
        v
    }

    fn any_devnum(&self, nums: &[String]) -> bool {
        nums.contains(&self.devnum) || self.children.iter().any(|c| c.any_devnum(nums))
    }

    fn find(&self, name: &str) -> Option<&BlockDevice> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

/// One signature found by wipefs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// `gpt`, `PMBR`, `ext4`, `zfs_member`, ...
    pub kind: String,
    /// Byte offset as printed (`0x438`).
    pub offset: String,
}

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Source (`/dev/vda2`).
    pub source: String,
    /// Mount point.
    pub target: String,
    /// File system type.
    pub fstype: String,
}

/// Everything the rules look at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// lsblk's top-level devices.
    pub devices: Vec<BlockDevice>,
    /// `/dev/disk/by-id` name → kernel name.
    pub by_id: BTreeMap<String, String>,
    /// `/proc/mounts`.
    pub mounts: Vec<Mount>,
    /// Device numbers of `/`, `/boot`, `/boot/efi` (`maj:min`).
    pub boot_devnums: Vec<String>,
    /// wipefs signatures per kernel name (whole disks only).
    pub signatures: BTreeMap<String, Vec<Signature>>,
    /// udev properties per kernel name (whole disks only).
    pub udev: BTreeMap<String, BTreeMap<String, String>>,
}

impl DiskSnapshot {
    /// The device (disk or partition) with this kernel name.
    pub fn device(&self, name: &str) -> Option<&BlockDevice> {
        self.devices.iter().find_map(|d| d.find(name))
    }

    /// The whole disk a kernel name belongs to (itself for a disk).
    pub fn parent_disk(&self, name: &str) -> Option<&BlockDevice> {
        self.devices.iter().find(|d| d.find(name).is_some())
    }

    /// by-id names of a kernel name, sorted.
    pub fn ids_of(&self, name: &str) -> Vec<&str> {
        self.by_id
            .iter()
            .filter(|(_, k)| *k == name)
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Resolves a device path (by-id path, `/dev/X`, or a bare by-id name)
    /// to a kernel name.
    pub fn resolve(&self, path: &str) -> Option<String> {
        if let Some(id) = path.strip_prefix(&format!("{BY_ID_DIR}/")) {
            return self.by_id.get(id).cloned();
        }
        if let Some(k) = path.strip_prefix("/dev/") {
            return self.device(k).map(|d| d.name.clone());
        }
        self.by_id.get(path).cloned()
    }

    /// Whether `disk` is the boot disk.
    pub fn is_boot_disk(&self, disk: &BlockDevice, boot_ptuuid: Option<&str>) -> bool {
        if disk.any_devnum(&self.boot_devnums) {
            return true;
        }
        let boot_mounts = ["/", "/boot", "/boot/efi", "/usr"];
        if disk
            .all_mountpoints()
            .iter()
            .any(|m| boot_mounts.contains(&m.as_str()))
        {
            return true;
        }
        if self
            .udev
            .get(&disk.name)
            .and_then(|p| p.get("APPLIANCE_BOOT_DISK"))
            .is_some_and(|v| v == "1")
        {
            return true;
        }
        boot_ptuuid.is_some_and(|b| {
            disk.ptuuid
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case(b))
        })
    }

    /// Mount points of `disk`: lsblk's, plus `/proc/mounts` lines whose source
    /// resolves to it or one of its partitions.
    pub fn mounts_of(&self, disk: &BlockDevice) -> Vec<String> {
        let mut v = disk.all_mountpoints();
        for m in &self.mounts {
            let hit = self
                .resolve(&m.source)
                .is_some_and(|k| disk.find(&k).is_some());
            if hit && !v.contains(&m.target) {
                v.push(m.target.clone());
            }
        }
        v
    }
}

/// Why a disk cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskProblem {
    /// Not a `/dev/disk/by-id/` path.
    #[error("{path}: name disks by their stable /dev/disk/by-id/ path")]
    NotById {
        /// As given.
        path: String,
    },
    /// No such disk.
    #[error("{path}: no such disk")]
    NotFound {
        /// As given.
        path: String,
    },
    /// A partition or another non-disk device.
    #[error("{path}: is a {kind}, not a whole disk")]
    NotAWholeDisk {
        /// As given.
        path: String,
        /// lsblk type.
        kind: String,
    },
    /// The boot disk.
    #[error("{path}: is the boot disk")]
    BootDisk {
        /// As given.
        path: String,
    },
    /// Part of an imported pool.
    #[error("{path}: is part of pool {pool}")]
    InPool {
        /// As given.
        path: String,
        /// Pool.
        pool: String,
    },
    /// Mounted.
    #[error("{path}: is mounted on {mountpoint}")]
    Mounted {
        /// As given.
        path: String,
        /// Where.
        mountpoint: String,
    },
    /// Held by device-mapper, md, ...
    #[error("{path}: is in use by {holder} ({kind})")]
    Held {
        /// As given.
        path: String,
        /// Holder name.
        holder: String,
        /// Holder type.
        kind: String,
    },
    /// Read-only.
    #[error("{path}: is read-only")]
    ReadOnly {
        /// As given.
        path: String,
    },
    /// Removable medium.
    #[error("{path}: is removable media")]
    Removable {
        /// As given.
        path: String,
    },
    /// Too small.
    #[error("{path}: {size} bytes is below the {min}-byte minimum")]
    TooSmall {
        /// As given.
        path: String,
        /// Its size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// Named twice.
    #[error("{path}: is the same disk as {other}")]
    Duplicate {
        /// As given.
        path: String,
        /// The other name.
        other: String,
    },
    /// Has partitions (without `force`).
    #[error("{path}: has partitions ({what}); use --force to overwrite them")]
    HasPartitions {
        /// As given.
        path: String,
        /// What was found.
        what: String,
    },
    /// Carries a signature (without `force`).
    #[error("{path}: carries a {what} signature; use --force to overwrite it")]
    HasSignature {
        /// As given.
        path: String,
        /// The signature type.
        what: String,
    },
}

impl DiskProblem {
    /// Whether `force` overrides this problem.
    pub fn forceable(&self) -> bool {
        matches!(self, Self::HasPartitions { .. } | Self::HasSignature { .. })
    }
}

/// Why a set of disks was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EligibilityError {
    /// Too few disks for the layout.
    #[error("{layout} needs at least {min} disks, {given} given")]
    TooFewDisks {
        /// Layout.
        layout: &'static str,
        /// Minimum.
        min: usize,
        /// Given.
        given: usize,
    },
    /// Some disks cannot be used.
    #[error("disks refused: {}", join_problems(.0))]
    Refused(Vec<DiskProblem>),
}

fn join_problems(v: &[DiskProblem]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A disk that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EligibleDisk {
    /// The by-id path as given.
    pub path: String,
    /// Kernel name.
    pub kernel: String,
    /// Size.
    pub size: u64,
    /// Problems `force` overrode.
    pub overridden: Vec<DiskProblem>,
}

/// Policy knobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskPolicy {
    /// The boot disk's partition-table UUID (image/build.sh's
    /// `BOOT_DISK_GUID`), if known.
    pub boot_ptuuid: Option<String>,
}

/// Kernel name of each whole disk in an imported pool → pool name.
pub fn pool_members(snap: &DiskSnapshot, pools: &[PoolStatus]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in pools {
        let mut leaves: Vec<&Vdev> = p.root.leaves();
        leaves.extend(p.cache.iter().flat_map(Vdev::leaves));
        leaves.extend(p.spares.iter().flat_map(Vdev::leaves));
        for l in leaves {
            let candidates = [
                l.path.clone(),
                Some(format!("{BY_ID_DIR}/{}", l.name)),
                Some(l.name.clone()),
            ];
            for c in candidates.into_iter().flatten() {
                if let Some(disk) = snap.resolve(&c).and_then(|k| snap.parent_disk(&k)) {
                    out.insert(disk.name.clone(), p.name.clone());
                    break;
                }
            }
        }
    }
    out
}

/// Checks one disk; `Ok` carries the problems `force` overrode.
pub fn check_disk(
    snap: &DiskSnapshot,
    path: &str,
    force: bool,
    members: &BTreeMap<String, String>,
    policy: &DiskPolicy,
) -> Result<EligibleDisk, Vec<DiskProblem>> {
    let p = || path.to_owned();
    if !path.starts_with(&format!("{BY_ID_DIR}/")) || path.len() <= BY_ID_DIR.len() + 1 {
        return Err(vec![DiskProblem::NotById { path: p() }]);
    }
    let Some(kernel) = snap.resolve(path) else {
        return Err(vec![DiskProblem::NotFound { path: p() }]);
    };
    let Some(dev) = snap.device(&kernel) else {
        return Err(vec![DiskProblem::NotFound { path: p() }]);
    };
    if dev.kind != "disk" {
        return Err(vec![DiskProblem::NotAWholeDisk {
            path: p(),
            kind: dev.kind.clone(),
        }]);
    }
    let mut hard = Vec::new();
    let mut soft = Vec::new();
    if snap.is_boot_disk(dev, policy.boot_ptuuid.as_deref()) {
        hard.push(DiskProblem::BootDisk { path: p() });
    }
    if let Some(pool) = members.get(&dev.name) {
        hard.push(DiskProblem::InPool {
            path: p(),
            pool: pool.clone(),
        });
    }
    if let Some(m) = snap.mounts_of(dev).into_iter().next() {
        hard.push(DiskProblem::Mounted {
            path: p(),
            mountpoint: m,
        });
    }
    let parts: Vec<&BlockDevice> = dev.children.iter().filter(|c| c.kind == "part").collect();
    let holder = dev
        .children
        .iter()
        .chain(parts.iter().flat_map(|c| c.children.iter()))
        .find(|c| c.kind != "part");
    if let Some(h) = holder {
        hard.push(DiskProblem::Held {
            path: p(),
            holder: h.name.clone(),
            kind: h.kind.clone(),
        });
    }
    if dev.read_only {
        hard.push(DiskProblem::ReadOnly { path: p() });
    }
    if dev.removable {
        hard.push(DiskProblem::Removable { path: p() });
    }
    if dev.size < MIN_DISK_BYTES {
        hard.push(DiskProblem::TooSmall {
            path: p(),
            size: dev.size,
            min: MIN_DISK_BYTES,
        });
    }
    let sigs = snap.signatures.get(&dev.name).cloned().unwrap_or_default();
    let table = sigs
        .iter()
        .find(|s| {
            matches!(
                s.kind.as_str(),
                "gpt" | "dos" | "PMBR" | "atari" | "sun" | "bsd"
            )
        })
        .map(|s| s.kind.clone())
        .or_else(|| dev.pttype.clone());
    if !parts.is_empty() || table.is_some() {
        let what = match (parts.len(), table) {
            (0, Some(t)) => format!("{t} partition table"),
            (n, Some(t)) => format!("{n} partitions, {t} table"),
            (n, None) => format!("{n} partitions"),
        };
        soft.push(DiskProblem::HasPartitions { path: p(), what });
    }
    let fs = sigs
        .iter()
        .find(|s| {
            !matches!(
                s.kind.as_str(),
                "gpt" | "dos" | "PMBR" | "atari" | "sun" | "bsd"
            )
        })
        .map(|s| s.kind.clone())
        .or_else(|| dev.fstype.clone());
    if let Some(what) = fs {
        soft.push(DiskProblem::HasSignature { path: p(), what });
    }
    if !hard.is_empty() || (!force && !soft.is_empty()) {
        hard.extend(soft.into_iter().filter(|_| !force));
        return Err(hard);
    }
    Ok(EligibleDisk {
        path: p(),
        kernel: dev.name.clone(),
        size: dev.size,
        overridden: soft,
    })
}

/// Checks the disks of a new pool.
pub fn check_create(
    snap: &DiskSnapshot,
    layout: StorageLayout,
    disks: &[String],
    force: bool,
    members: &BTreeMap<String, String>,
    policy: &DiskPolicy,
) -> Result<Vec<EligibleDisk>, EligibilityError> {
    let min = policy_min_disks(layout);
    let mut problems = Vec::new();
    let mut ok: Vec<EligibleDisk> = Vec::new();
    for d in disks {
        match check_disk(snap, d, force, members, policy) {
            Ok(e) => {
                if let Some(other) = ok.iter().find(|o| o.kernel == e.kernel) {
                    problems.push(DiskProblem::Duplicate {
                        path: d.clone(),
                        other: other.path.clone(),
                    });
                } else {
                    ok.push(e);
                }
            }
            Err(p) => problems.extend(p),
        }
    }
    if disks.len() < min {
        return Err(EligibilityError::TooFewDisks {
            layout: layout.as_str(),
            min,
            given: disks.len(),
        });
    }
    if !problems.is_empty() {
        return Err(EligibilityError::Refused(problems));
    }
    Ok(ok)
}

/// The disk list for `storage disks`: every whole disk with a by-id name,
/// plus pool members that are not present (pulled disks).
pub fn list_disks(snap: &DiskSnapshot, pools: &[PoolStatus], policy: &DiskPolicy) -> Vec<DiskInfo> {
    let members = pool_members(snap, pools);
    // Pool leaf by disk id, for state and counters.
    let mut leaves: BTreeMap<String, (String, &Vdev)> = BTreeMap::new();
    for p in pools {
        let mut v: Vec<&Vdev> = p.root.leaves();
        v.extend(p.cache.iter().flat_map(Vdev::leaves));
        v.extend(p.spares.iter().flat_map(Vdev::leaves));
        for l in v {
            leaves.insert(disk_id(&l.name), (p.name.clone(), l));
        }
    }
    let mut out = Vec::new();
    let mut seen_ids = Vec::new();
    for dev in snap.devices.iter().filter(|d| d.kind == "disk") {
        let ids = snap.ids_of(&dev.name);
        // Prefer the id a pool uses, else the first (ata-/nvme-/virtio-
        // sort before wwn-).
        let id = ids
            .iter()
            .find(|i| leaves.contains_key(**i))
            .or_else(|| ids.first())
            .map(|s| (*s).to_owned());
        let Some(id) = id else { continue };
        seen_ids.extend(ids.iter().map(|s| (*s).to_owned()));
        let path = format!("{BY_ID_DIR}/{id}");
        let leaf = leaves.get(&id);
        let problems = match check_disk(snap, &path, false, &members, policy) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        };
        let udev = snap.udev.get(&dev.name);
        out.push(DiskInfo {
            id: id.clone(),
            path: Some(path),
            dev: Some(dev.name.clone()),
            bay: udev
                .and_then(|u| u.get("APPLIANCE_BAY"))
                .filter(|b| !b.is_empty())
                .cloned(),
            serial: dev
                .serial
                .clone()
                .or_else(|| udev.and_then(|u| u.get("ID_SERIAL_SHORT")).cloned()),
            model: dev.model.clone(),
            size_bytes: dev.size,
            pool: members.get(&dev.name).cloned(),
            state: leaf.map(|(_, l)| l.state.as_str().to_owned()),
            errors: leaf.map(|(_, l)| device_errors(l)),
            boot: snap.is_boot_disk(dev, policy.boot_ptuuid.as_deref()),
            problems,
        });
    }
    for (id, (pool, leaf)) in &leaves {
        if seen_ids.contains(id) {
            continue;
        }
        out.push(DiskInfo {
            id: id.clone(),
            path: None,
            dev: None,
            bay: None,
            serial: None,
            model: None,
            size_bytes: 0,
            pool: Some(pool.clone()),
            state: Some(leaf.state.as_str().to_owned()),
            errors: Some(DeviceErrors {
                disk: id.clone(),
                ..device_errors(leaf)
            }),
            boot: false,
            problems: vec![format!("{id}: not present")],
        });
    }
    out
}

// ---------------------------------------------------------------- parsers

/// Why a snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// Output that does not parse.
    #[error("{what}: {reason}")]
    Parse {
        /// Which command or file.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A command failed or timed out.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: {reason}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn s(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn b(v: &Value, key: &str) -> bool {
    match v.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "1" || s == "true",
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        _ => false,
    }
}

fn u(v: &Value, key: &str) -> u64 {
    match v.get(key) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

const MAX_DEPTH: usize = 8;

fn device_from(v: &Value, depth: usize) -> Result<BlockDevice, DiskError> {
    let err = |reason: &str| DiskError::Parse {
        what: "lsblk",
        reason: reason.to_owned(),
    };
    if depth > MAX_DEPTH {
        return Err(err("device tree too deep"));
    }
    let name = s(v, "name")
        .or_else(|| s(v, "kname"))
        .ok_or_else(|| err("device without a name"))?;
    let mut mountpoints: Vec<String> = match v.get("mountpoints") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if let Some(m) = s(v, "mountpoint") {
        if !mountpoints.contains(&m) {
            mountpoints.push(m);
        }
    }
    let children = match v.get("children") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| device_from(c, depth + 1))
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    Ok(BlockDevice {
        path: s(v, "path").unwrap_or_else(|| format!("/dev/{name}")),
        kind: s(v, "type").unwrap_or_default(),
        devnum: s(v, "maj:min").unwrap_or_default(),
        size: u(v, "size"),
        serial: s(v, "serial").map(|x| x.trim().to_owned()),
        model: s(v, "model").map(|x| x.trim().to_owned()),
        removable: b(v, "rm"),
        read_only: b(v, "ro"),
        fstype: s(v, "fstype"),
        pttype: s(v, "pttype"),
        ptuuid: s(v, "ptuuid"),
        mountpoints,
        children,
        name,
    })
}

/// Parses `lsblk --json -b -O` (util-linux ≥ 2.33; booleans and numbers are
/// accepted typed or as strings, as older versions print them).
pub fn parse_lsblk(json: &str) -> Result<Vec<BlockDevice>, DiskError> {
    let v: Value = serde_json::from_str(json).map_err(|e| DiskError::Parse {
        what: "lsblk",
        reason: e.to_string(),
    })?;
    let Some(Value::Array(devs)) = v.get("blockdevices") else {
        return Err(DiskError::Parse {
            what: "lsblk",
            reason: "no \"blockdevices\" array".to_owned(),
        });
    };
    devs.iter().map(|d| device_from(d, 0)).collect()
}

/// Parses `wipefs --json --no-act DEV` (empty output means no signature).
pub fn parse_wipefs(json: &str) -> Result<Vec<Signature>, DiskError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(json).map_err(|e| DiskError::Parse {
        what: "wipefs",
        reason: e.to_string(),
    })?;
    let Some(Value::Array(sigs)) = v.get("signatures") else {
        return Err(DiskError::Parse {
            what: "wipefs",
            reason: "no \"signatures\" array".to_owned(),
        });
    };
    Ok(sigs
        .iter()
        .filter_map(|s| {
            Some(Signature {
                kind: s.get("type")?.as_str()?.to_owned(),
                offset: s
                    .get("offset")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            })
        })
        .collect())
}

/// Undoes `/proc/mounts` octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let n = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            match u8::try_from(n) {
                Ok(c) => out.push(c),
                Err(_) => out.extend_from_slice(&bytes[i..i + 4]),
            }
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/mounts`.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Mount {
                source: unescape_mount(f.next()?),
                target: unescape_mount(f.next()?),
                fstype: f.next()?.to_owned(),
            })
        })
        .collect()
}

/// Parses a udev database file (`/run/udev/data/b8:0`): the `E:KEY=VALUE`
/// lines.
pub fn parse_udev_db(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("E:"))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

// ---------------------------------------------------------------- adapters

/// Reads a [`DiskSnapshot`].
#[async_trait]
pub trait DiskInventory: Send + Sync + fmt::Debug {
    /// Reads the machine's block devices now.
    async fn snapshot(&self) -> Result<DiskSnapshot, DiskError>;
}

/// A fixed snapshot (tests, and machines without lsblk).
#[derive(Debug, Default)]
pub struct FakeDisks {
    snap: std::sync::Mutex<DiskSnapshot>,
}

impl FakeDisks {
    /// A fake returning `snap`.
    pub fn new(snap: DiskSnapshot) -> Self {
        Self {
            snap: std::sync::Mutex::new(snap),
        }
    }

    /// Changes the snapshot (hot-plug in tests).
    pub fn update(&self, f: impl FnOnce(&mut DiskSnapshot)) {
        match self.snap.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// A snapshot with blank whole disks named `virtio-<SERIAL>` (kernel
    /// names `vdb`, `vdc`, ...) of `size` bytes, and a boot disk `vda`
    /// mounted on `/`.
    pub fn blank_disks(serials: &[&str], size: u64) -> DiskSnapshot {
        let mut snap = DiskSnapshot {
            boot_devnums: vec!["254:0".to_owned()],
            ..DiskSnapshot::default()
        };
        snap.devices.push(BlockDevice {
            name: "vda".into(),
            path: "/dev/vda".into(),
            kind: "disk".into(),
            devnum: "254:0".into(),
            size: 3 << 30,
            mountpoints: vec!["/".into()],
            ..BlockDevice::default()
        });
        snap.by_id.insert("virtio-BOOT".into(), "vda".into());
        for (i, serial) in serials.iter().enumerate() {
            let letter = char::from(b'b' + u8::try_from(i % 24).unwrap_or(0));
            let name = format!("vd{letter}");
            snap.devices.push(BlockDevice {
                name: name.clone(),
                path: format!("/dev/{name}"),
                kind: "disk".into(),
                devnum: format!("254:{}", (i + 1) * 16),
                size,
                serial: Some((*serial).to_owned()),
                ..BlockDevice::default()
            });
            snap.by_id.insert(format!("virtio-{serial}"), name);
        }
        snap
    }
}

#[async_trait]
impl DiskInventory for FakeDisks {
    async fn snapshot(&self) -> Result<DiskSnapshot, DiskError> {
        Ok(match self.snap.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

/// The real inventory: lsblk, wipefs, `/dev/disk/by-id`, `/proc/mounts`,
/// `stat`, the udev database.
#[derive(Debug, Clone)]
pub struct SystemDisks {
    /// `lsblk` (absolute).
    pub lsblk: PathBuf,
    /// `wipefs` (absolute).
    pub wipefs: PathBuf,
    /// `/dev/disk/by-id`.
    pub by_id_dir: PathBuf,
    /// `/proc/self/mounts` (the same table as `/proc/mounts`, which is a
    /// symlink to it; under systemd's `ProcSubset=pid` only the per-process
    /// entries exist, so the symlink is gone).
    pub mounts: PathBuf,
    /// `/run/udev/data`.
    pub udev_data: PathBuf,
    /// Per command. lsblk and wipefs read sysfs and a few sectors; 10 s
    /// covers a slow disk and still bounds a hung one.
    pub timeout: Duration,
}

impl Default for SystemDisks {
    fn default() -> Self {
        Self {
            lsblk: PathBuf::from("/usr/bin/lsblk"),
            wipefs: PathBuf::from("/usr/sbin/wipefs"),
            by_id_dir: PathBuf::from(BY_ID_DIR),
            mounts: PathBuf::from("/proc/self/mounts"),
            udev_data: PathBuf::from("/run/udev/data"),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Most output bytes read from lsblk/wipefs (a machine with hundreds of
/// disks prints well under 1 MiB with `-O`).
const MAX_TOOL_OUTPUT: usize = 8 << 20;

async fn run_tool(path: &Path, args: &[&str], timeout: Duration) -> Result<String, DiskError> {
    let command = format!("{} {}", path.display(), args.join(" "));
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| DiskError::Command {
            command: command.clone(),
            reason: format!("timed out after {timeout:?}"),
        })?
        .map_err(|e| DiskError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(DiskError::Command {
            command,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    if out.stdout.len() > MAX_TOOL_OUTPUT {
        return Err(DiskError::Command {
            command,
            reason: "output too large".to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn devnum_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ))
}

#[async_trait]
impl DiskInventory for SystemDisks {
    async fn snapshot(&self) -> Result<DiskSnapshot, DiskError> {
        let devices =
            parse_lsblk(&run_tool(&self.lsblk, &["--json", "-b", "-O"], self.timeout).await?)?;
        let mut snap = DiskSnapshot {
            devices,
            ..DiskSnapshot::default()
        };
        // by-id links. A missing directory (no udev) is an empty map.
        if let Ok(rd) = std::fs::read_dir(&self.by_id_dir) {
            for e in rd.flatten() {
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let Some(kernel) = target.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Some(id) = e.file_name().to_str() {
                    snap.by_id.insert(id.to_owned(), kernel.to_owned());
                }
            }
        }
        let mounts = std::fs::read_to_string(&self.mounts).map_err(|e| DiskError::Io {
            path: self.mounts.clone(),
            reason: e.to_string(),
        })?;
        snap.mounts = parse_mounts(&mounts);
        for p in ["/", "/boot", "/boot/efi"] {
            if let Some(n) = devnum_of(Path::new(p)) {
                if !snap.boot_devnums.contains(&n) {
                    snap.boot_devnums.push(n);
                }
            }
        }
        let disks: Vec<(String, String)> = snap
            .devices
            .iter()
            .filter(|d| d.kind == "disk" && d.size > 0)
            .map(|d| (d.name.clone(), d.devnum.clone()))
            .collect();
        for (name, devnum) in disks {
            let dev = format!("/dev/{name}");
            match run_tool(&self.wipefs, &["--json", "--no-act", &dev], self.timeout).await {
                Ok(out) => {
                    snap.signatures.insert(name.clone(), parse_wipefs(&out)?);
                }
                Err(e) => {
                    // A disk wipefs cannot read is reported as a signature
                    // so that it is never taken without --force.
                    tracing::warn!(disk = %name, error = %e, "wipefs failed");
                    snap.signatures.insert(
                        name.clone(),
                        vec![Signature {
                            kind: "unreadable".to_owned(),
                            offset: String::new(),
                        }],
                    );
                }
            }
            if let Ok(t) = std::fs::read_to_string(self.udev_data.join(format!("b{devnum}"))) {
                snap.udev.insert(name, parse_udev_db(&t));
            }
        }
        Ok(snap)
    }
}
