//! The [`Zfs`] trait: everything the storage manager asks of ZFS.
//!
//! It is an `async_trait` so that it is object-safe: the daemon holds an
//! `Arc<dyn Zfs>` and hands the real runner or the fake to the storage
//! manager without generics leaking through every layer. (Native `async fn`
//! in traits is not yet usable through `dyn`.) The cost is one boxed future
//! per call, negligible next to spawning a process.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::ZfsError;
use crate::model::{Dataset, Pool, PoolStatus, Properties};
use crate::parse::events::EventItem;

/// What the storage manager needs from ZFS.
#[async_trait]
pub trait Zfs: Send + Sync + fmt::Debug {
    /// `zpool status` of one pool.
    async fn pool_status(&self, pool: &str) -> Result<PoolStatus, ZfsError>;
    /// `zpool list` of every imported pool.
    async fn pool_list(&self) -> Result<Vec<Pool>, ZfsError>;
    /// `zpool get all` of one pool.
    async fn pool_properties(&self, pool: &str) -> Result<Properties, ZfsError>;
    /// `zfs list -r` of `root` and its descendants (filesystems and volumes).
    async fn dataset_list(&self, root: &str) -> Result<Vec<Dataset>, ZfsError>;
    /// `zfs get all` of one dataset.
    async fn dataset_properties(&self, dataset: &str) -> Result<Properties, ZfsError>;
    /// `zpool create` from a validated spec.
    async fn create_pool(&self, spec: &PoolSpec) -> Result<(), ZfsError>;
    /// `zfs create` from a validated spec.
    async fn create_dataset(&self, spec: &DatasetSpec) -> Result<(), ZfsError>;
    /// `zfs set quota=` (`None` removes the quota).
    async fn set_quota(&self, dataset: &str, quota: Option<u64>) -> Result<(), ZfsError>;
    /// `zfs get quota` (`None` when no quota is set).
    async fn get_quota(&self, dataset: &str) -> Result<Option<u64>, ZfsError>;
    /// `zpool scrub` (start or resume), `-p` (pause) or `-s` (stop).
    async fn scrub(&self, pool: &str, action: ScrubAction) -> Result<(), ZfsError>;
    /// `zpool replace POOL OLD NEW`.
    async fn replace(&self, pool: &str, old: &str, new: &str) -> Result<(), ZfsError>;
    /// `zpool clear POOL [DEVICE]`.
    async fn clear(&self, pool: &str, device: Option<&str>) -> Result<(), ZfsError>;
    /// Follows `zpool events -f -H -v`. The stream first replays the events
    /// still in the kernel's ring buffer (de-duplicate by `eid`), then
    /// follows. [`EventItem::Dropped`] means events were lost: re-poll.
    async fn follow_events(&self) -> Result<EventFollower, ZfsError>;
}

/// Scrub control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrubAction {
    /// Start a scrub, or resume a paused one (`zpool scrub POOL`).
    Start,
    /// Pause (`zpool scrub -p POOL`).
    Pause,
    /// Cancel (`zpool scrub -s POOL`).
    Stop,
}

/// Redundancy layout for a new pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolLayout {
    /// Single parity.
    Raidz1,
    /// Double parity (the appliance default).
    Raidz2,
    /// Triple parity.
    Raidz3,
    /// One N-way mirror.
    Mirror,
    /// No redundancy (tests only).
    Stripe,
}

impl PoolLayout {
    /// The vdev keyword for `zpool create` (`None` for a plain stripe).
    pub fn keyword(self) -> Option<&'static str> {
        match self {
            Self::Raidz1 => Some("raidz1"),
            Self::Raidz2 => Some("raidz2"),
            Self::Raidz3 => Some("raidz3"),
            Self::Mirror => Some("mirror"),
            Self::Stripe => None,
        }
    }

    /// Parity devices (mirror: width − 1, computed by the caller).
    pub fn parity(self) -> u8 {
        match self {
            Self::Raidz1 => 1,
            Self::Raidz2 => 2,
            Self::Raidz3 => 3,
            Self::Mirror | Self::Stripe => 0,
        }
    }

    /// ZFS's own minimum device count (parity + 1; mirror 2; stripe 1).
    /// Policy minimums (the appliance wants ≥ 4 for RAID-Z2) belong to the
    /// storage manager.
    pub fn min_disks(self) -> usize {
        match self {
            Self::Raidz1 => 2,
            Self::Raidz2 => 3,
            Self::Raidz3 => 4,
            Self::Mirror => 2,
            Self::Stripe => 1,
        }
    }
}

/// A pool to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// Pool name.
    pub name: String,
    /// Layout of its single top-level vdev (or stripe).
    pub layout: PoolLayout,
    /// Absolute device paths, preferably `/dev/disk/by-id/...`.
    pub disks: Vec<String>,
    /// Pool properties (`-o ashift=12`, `-o autoreplace=on`).
    pub pool_properties: Vec<(String, String)>,
    /// Root dataset properties (`-O compression=zstd`, `-O atime=off`).
    pub fs_properties: Vec<(String, String)>,
    /// Root mountpoint (`-m`).
    pub mountpoint: Option<String>,
    /// `-f`: override "in use" checks. The storage manager decides.
    pub force: bool,
}

/// Native encryption for a new dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionSpec {
    /// Cipher (`aes-256-gcm`).
    pub cipher: String,
    /// Key format.
    pub keyformat: KeyFormat,
    /// `file:///absolute/path` (or `prompt`); must not be inside the pool.
    pub keylocation: String,
}

/// `keyformat` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// 32 raw bytes.
    Raw,
    /// 64 hex characters.
    Hex,
    /// A passphrase.
    Passphrase,
}

impl KeyFormat {
    /// The ZFS word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hex => "hex",
            Self::Passphrase => "passphrase",
        }
    }
}

/// A dataset to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// Full name (`tank/documents`).
    pub name: String,
    /// `compression=` (`zstd`).
    pub compression: Option<String>,
    /// Native encryption.
    pub encryption: Option<EncryptionSpec>,
    /// `quota=` in bytes.
    pub quota: Option<u64>,
    /// `mountpoint=`.
    pub mountpoint: Option<String>,
    /// Further `-o` properties.
    pub properties: Vec<(String, String)>,
}

impl DatasetSpec {
    /// A spec with only a name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            compression: None,
            encryption: None,
            quota: None,
            mountpoint: None,
            properties: Vec::new(),
        }
    }

    /// All `-o key=value` properties in a stable order.
    pub fn all_properties(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(c) = &self.compression {
            out.push(("compression".to_owned(), c.clone()));
        }
        if let Some(e) = &self.encryption {
            out.push(("encryption".to_owned(), e.cipher.clone()));
            out.push(("keyformat".to_owned(), e.keyformat.as_str().to_owned()));
            out.push(("keylocation".to_owned(), e.keylocation.clone()));
        }
        if let Some(q) = self.quota {
            out.push(("quota".to_owned(), q.to_string()));
        }
        if let Some(m) = &self.mountpoint {
            out.push(("mountpoint".to_owned(), m.clone()));
        }
        out.extend(self.properties.iter().cloned());
        out
    }
}

fn invalid(what: &'static str, value: &str, reason: &str) -> ZfsError {
    ZfsError::InvalidArgument {
        what,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Longest dataset name ZFS accepts (`ZFS_MAX_DATASET_NAME_LEN` − 1).
pub const MAX_NAME_LEN: usize = 255;

fn name_component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Checks a pool name: starts with a letter, then `[A-Za-z0-9_.:-]`, not
/// a reserved word. Names go to argv unquoted, so a leading `-` (an
/// option) must never pass.
pub fn validate_pool_name(name: &str) -> Result<(), ZfsError> {
    const WHAT: &str = "pool name";
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(WHAT, name, "too long"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) || !name_component_ok(name) {
        return Err(invalid(
            WHAT,
            name,
            "must start with a letter and use [A-Za-z0-9_.:-]",
        ));
    }
    let reserved = ["mirror", "raidz", "draid", "spare", "log"];
    if reserved.iter().any(|r| name.starts_with(r)) || matches!(name, "c0" | "c1") {
        return Err(invalid(WHAT, name, "reserved by ZFS"));
    }
    Ok(())
}

/// Checks a dataset name: `pool[/component...]`, components of
/// `[A-Za-z0-9_.:-]` not starting with `-`, no snapshots (`@`).
pub fn validate_dataset_name(name: &str) -> Result<(), ZfsError> {
    const WHAT: &str = "dataset name";
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(WHAT, name, "too long"));
    }
    let mut parts = name.split('/');
    let pool = parts.next().unwrap_or_default();
    validate_pool_name(pool)
        .map_err(|_| invalid(WHAT, name, "does not start with a valid pool name"))?;
    for c in parts {
        if !name_component_ok(c) || c.starts_with('-') || c == "." || c == ".." {
            return Err(invalid(
                WHAT,
                name,
                "components must be non-empty [A-Za-z0-9_.:-]",
            ));
        }
    }
    Ok(())
}

/// Checks a device argument: an absolute path without control characters
/// (so it can never be read as an option or a vdev keyword).
pub fn validate_device(path: &str) -> Result<(), ZfsError> {
    const WHAT: &str = "device path";
    if !path.starts_with('/') || path.len() > 4096 || path.chars().any(char::is_control) {
        return Err(invalid(
            WHAT,
            path,
            "must be an absolute path without control characters",
        ));
    }
    Ok(())
}

/// Checks a `key=value` property pair.
pub fn validate_property(key: &str, value: &str) -> Result<(), ZfsError> {
    let key_ok = !key.is_empty()
        && key.len() <= 256
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'@' | b'.' | b'-'));
    if !key_ok {
        return Err(invalid("property name", key, "must be [a-z][a-z0-9_:@.-]*"));
    }
    if value.is_empty() || value.len() > 4096 || value.chars().any(char::is_control) {
        return Err(invalid(
            "property value",
            value,
            "must be non-empty without control characters",
        ));
    }
    Ok(())
}

impl PoolSpec {
    /// Validates names, paths, properties and the device count.
    pub fn validate(&self) -> Result<(), ZfsError> {
        validate_pool_name(&self.name)?;
        if self.disks.len() < self.layout.min_disks() {
            return Err(invalid(
                "disk list",
                &self.disks.join(" "),
                &format!(
                    "{:?} needs at least {} disks",
                    self.layout,
                    self.layout.min_disks()
                ),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            validate_device(d)?;
            if self.disks[..i].contains(d) {
                return Err(invalid("disk list", d, "listed twice"));
            }
        }
        for (k, v) in self.pool_properties.iter().chain(&self.fs_properties) {
            validate_property(k, v)?;
        }
        if let Some(m) = &self.mountpoint {
            validate_property("mountpoint", m)?;
        }
        Ok(())
    }
}

impl DatasetSpec {
    /// Validates the name and every property.
    pub fn validate(&self) -> Result<(), ZfsError> {
        validate_dataset_name(&self.name)?;
        if let Some(e) = &self.encryption {
            let ok = e.keylocation == "prompt"
                || e.keylocation
                    .strip_prefix("file://")
                    .is_some_and(|p| p.starts_with('/'));
            if !ok {
                return Err(invalid(
                    "keylocation",
                    &e.keylocation,
                    "must be prompt or file:///absolute/path",
                ));
            }
        }
        for (k, v) in self.all_properties() {
            validate_property(&k, &v)?;
        }
        Ok(())
    }
}

/// Capacity of the follower's channel. The reader blocks when it is full,
/// and the kernel's own ring buffer (`zfs_zevent_len_max`, default 512)
/// holds further events; overflow there is reported as `Dropped`.
pub const EVENT_CHANNEL_CAPACITY: usize = 256;

/// A running `zpool events -f` (or the fake's equivalent).
///
/// Dropping it stops the follower and kills its process.
#[derive(Debug)]
pub struct EventFollower {
    rx: mpsc::Receiver<Result<EventItem, ZfsError>>,
    task: Option<JoinHandle<()>>,
}

impl EventFollower {
    /// Wraps a channel fed by `task` (aborted on drop), or by someone else.
    pub fn new(
        rx: mpsc::Receiver<Result<EventItem, ZfsError>>,
        task: Option<JoinHandle<()>>,
    ) -> Self {
        Self { rx, task }
    }

    /// The next item; `None` once the follower has ended and everything
    /// was read (an ending is first reported as `EventStreamEnded`).
    pub async fn next(&mut self) -> Option<Result<EventItem, ZfsError>> {
        self.rx.recv().await
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_be_options_are_refused() {
        assert!(validate_pool_name("tank").is_ok());
        assert!(validate_pool_name("-f").is_err());
        assert!(validate_pool_name("mirror").is_err());
        assert!(validate_pool_name("raidz2x").is_err());
        assert!(validate_pool_name("tank pool").is_err());
        assert!(validate_dataset_name("tank/documents").is_ok());
        assert!(validate_dataset_name("tank/-o").is_err());
        assert!(validate_dataset_name("tank//x").is_err());
        assert!(validate_dataset_name("tank/a@snap").is_err());
        assert!(validate_dataset_name("tank/..").is_err());
        assert!(validate_device("/dev/disk/by-id/virtio-ZD1").is_ok());
        assert!(validate_device("virtio-ZD1").is_err());
        assert!(validate_device("/dev/x\n").is_err());
        assert!(validate_property("compression", "zstd").is_ok());
        assert!(validate_property("-o", "x").is_err());
        assert!(validate_property("quota", "").is_err());
    }

    #[test]
    fn pool_spec_checks_count_duplicates_and_paths() {
        let mut spec = PoolSpec {
            name: "tank".into(),
            layout: PoolLayout::Raidz2,
            disks: vec!["/dev/a".into(), "/dev/b".into()],
            pool_properties: vec![("ashift".into(), "12".into())],
            fs_properties: vec![],
            mountpoint: None,
            force: false,
        };
        assert!(spec.validate().is_err(), "raidz2 needs 3 disks");
        spec.disks.push("/dev/c".into());
        assert!(spec.validate().is_ok());
        spec.disks.push("/dev/c".into());
        assert!(spec.validate().is_err(), "duplicate");
    }

    #[test]
    fn dataset_spec_properties_and_keylocation() {
        let mut spec = DatasetSpec::new("tank/documents");
        spec.compression = Some("zstd".into());
        spec.encryption = Some(EncryptionSpec {
            cipher: "aes-256-gcm".into(),
            keyformat: KeyFormat::Raw,
            keylocation: "file:///var/lib/appliance/documents.key".into(),
        });
        spec.quota = Some(1 << 30);
        assert!(spec.validate().is_ok());
        let keys: Vec<String> = spec.all_properties().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "compression",
                "encryption",
                "keyformat",
                "keylocation",
                "quota"
            ]
        );
        spec.encryption.as_mut().unwrap().keylocation = "file://relative".into();
        assert!(spec.validate().is_err());
    }
}
