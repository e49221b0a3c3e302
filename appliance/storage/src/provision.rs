//! Pool provisioning with persisted intent.
//!
//! `create_pool` records an [`Intent`] (the inputs and a [`ProvisionState`])
//! in `provision.json` under the state directory *before* touching a disk,
//! and advances it after each step:
//!
//! ```text
//! Planned ──zpool create──▶ PoolCreated ──zfs create…──▶ DatasetsCreated ──verify──▶ Done
//! ```
//!
//! Every step is idempotent, so [`Provisioner::resume_all`] at start-up (or
//! the same request again) completes an interrupted attempt instead of
//! repeating it blindly:
//!
//! * the key file is created only if absent and never overwritten (a new key
//!   would make the existing `documents` unreadable); an existing one must be
//!   exactly 32 bytes;
//! * `zpool create` answering "already exists" is accepted when the existing
//!   pool has exactly the intended disks (a crash after the command and
//!   before the intent was advanced), and refused otherwise;
//! * datasets that exist are verified (encryption), not recreated.
//!
//! An intent for the same pool with other inputs is refused
//! ([`ProvisionError::Conflict`]) until it is done: two half-finished plans
//! for one pool name would leave nobody knowing which disks hold it.
//!
//! # Standard datasets
//! * `<pool>` itself: `compression=zstd`, `atime=off`, `xattr=sa` (set at
//!   creation with `-O`, inherited by everything below).
//! * `<pool>/documents`: native encryption `aes-256-gcm`, `keyformat=raw`,
//!   `keylocation=file://<key file>`. The key file lives outside the pool
//!   (configurable, default under `/var/lib/appliance/keys/`, mode 0400 in a
//!   0700 directory); a location inside the pool's mount point is refused,
//!   since the pool could then never be unlocked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use appliance_types::storage::{ProvisionOutcome, ProvisionState, StorageLayout};
use appliance_zfs::{
    DatasetSpec, Encryption, EncryptionSpec, FailureKind, KeyFormat, PoolSpec, Zfs, ZfsError,
};
use serde::{Deserialize, Serialize};

use crate::disks::zfs_layout;
use crate::report::disk_id;
use crate::statefile::{read_json, write_atomic, write_json, StateFileError};

/// Key length for `keyformat=raw` with AES-256.
pub const KEY_BYTES: usize = 32;

/// The cipher of `documents`.
pub const CIPHER: &str = "aes-256-gcm";

/// Provisioning settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionConfig {
    /// Where `provision.json` lives (the daemon's state directory).
    pub state_dir: PathBuf,
    /// Directory for key files (`<pool>-documents.key` inside it).
    pub key_dir: PathBuf,
    /// Pool mount point; `None` = ZFS's default `/<pool>`.
    pub mountpoint: Option<String>,
}

impl ProvisionConfig {
    /// Defaults under `state_dir`, keys in `/var/lib/appliance/keys`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            key_dir: PathBuf::from("/var/lib/appliance/keys"),
            mountpoint: None,
        }
    }

    fn intents_path(&self) -> PathBuf {
        self.state_dir.join("provision.json")
    }

    /// The key file of `pool`'s `documents`.
    pub fn key_file(&self, pool: &str) -> PathBuf {
        self.key_dir.join(format!("{pool}-documents.key"))
    }

    fn pool_mountpoint(&self, pool: &str) -> String {
        self.mountpoint
            .clone()
            .unwrap_or_else(|| format!("/{pool}"))
    }
}

/// One recorded provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Pool.
    pub pool: String,
    /// Layout.
    pub layout: StorageLayout,
    /// Disks (by-id paths), as checked.
    pub disks: Vec<String>,
    /// `--force` was given.
    pub force: bool,
    /// Key file.
    pub key_file: String,
    /// Step reached.
    pub state: ProvisionState,
    /// Last failure, if the attempt stopped.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct IntentBook {
    intents: Vec<Intent>,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A ZFS command failed at a step.
    #[error("provisioning pool {pool} at step {step:?}: {source}")]
    Zfs {
        /// Pool.
        pool: String,
        /// The step that failed (the intent stays there).
        step: ProvisionState,
        /// The ZFS error (boxed: it is large and errors are rare).
        #[source]
        source: Box<ZfsError>,
    },
    /// The intent file.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// The key file.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file would be inside the pool.
    #[error("key file {key} is inside pool {pool}'s mount point {mountpoint}; it must live outside the pool")]
    KeyInsidePool {
        /// Pool.
        pool: String,
        /// Key path.
        key: PathBuf,
        /// Mount point.
        mountpoint: String,
    },
    /// Another, unfinished intent for this pool.
    #[error("pool {pool}: an unfinished provisioning with other inputs ({layout} of {disks}) is recorded at step {state:?}; finish it with the same request")]
    Conflict {
        /// Pool.
        pool: String,
        /// Its layout.
        layout: &'static str,
        /// Its disks.
        disks: String,
        /// Its step.
        state: ProvisionState,
    },
    /// A pool of that name exists with other disks.
    #[error("pool {pool} already exists with other disks ({found})")]
    PoolExistsWithOtherDisks {
        /// Pool.
        pool: String,
        /// Its disks.
        found: String,
    },
    /// A dataset exists but is not what we create.
    #[error("dataset {dataset} exists but {reason}")]
    DatasetMismatch {
        /// Dataset.
        dataset: String,
        /// What is wrong.
        reason: String,
    },
}

/// Runs provisioning.
#[derive(Debug, Clone)]
pub struct Provisioner {
    zfs: Arc<dyn Zfs>,
    cfg: ProvisionConfig,
}

fn same_disks(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<String> = a.iter().map(|d| disk_id(d)).collect();
    let mut b: Vec<String> = b.iter().map(|d| disk_id(d)).collect();
    a.sort();
    b.sort();
    a == b
}

/// Creates the key file if absent (32 random bytes, 0400, directory 0700);
/// checks an existing one.
fn ensure_key_file(path: &Path) -> Result<bool, ProvisionError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let err = |reason: String| ProvisionError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) => {
            let len = usize::try_from(m.len()).unwrap_or(usize::MAX);
            if len != KEY_BYTES {
                return Err(err(format!(
                    "exists with {len} bytes, expected {KEY_BYTES}; not overwriting a key"
                )));
            }
            return Ok(false);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(e.to_string()))?;
    }
    let mut key = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| err(format!("reading /dev/urandom: {e}")))?;
    write_atomic(path, &key, 0o400)?;
    Ok(true)
}

impl Provisioner {
    /// A provisioner over `zfs`.
    pub fn new(zfs: Arc<dyn Zfs>, cfg: ProvisionConfig) -> Self {
        Self { zfs, cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &ProvisionConfig {
        &self.cfg
    }

    /// Every recorded intent.
    pub fn intents(&self) -> Result<Vec<Intent>, ProvisionError> {
        Ok(read_json::<IntentBook>(&self.cfg.intents_path())?
            .unwrap_or_default()
            .intents)
    }

    fn save(&self, intent: &Intent) -> Result<(), ProvisionError> {
        let path = self.cfg.intents_path();
        let mut book = read_json::<IntentBook>(&path)?.unwrap_or_default();
        match book.intents.iter_mut().find(|i| i.pool == intent.pool) {
            Some(i) => *i = intent.clone(),
            None => book.intents.push(intent.clone()),
        }
        write_json(&path, &book)?;
        Ok(())
    }

    /// Creates pool `name` from disks already checked by
    /// [`crate::disks::check_create`], with the standard datasets.
    /// Idempotent; completes an interrupted attempt with the same inputs.
    pub async fn create_pool(
        &self,
        name: &str,
        layout: StorageLayout,
        disks: &[String],
        force: bool,
    ) -> Result<ProvisionOutcome, ProvisionError> {
        appliance_zfs::api::validate_pool_name(name).map_err(|source| ProvisionError::Zfs {
            pool: name.to_owned(),
            step: ProvisionState::Planned,
            source: Box::new(source),
        })?;
        let key = self.cfg.key_file(name);
        let mountpoint = self.cfg.pool_mountpoint(name);
        if !key.is_absolute() || key.starts_with(&mountpoint) {
            return Err(ProvisionError::KeyInsidePool {
                pool: name.to_owned(),
                key,
                mountpoint,
            });
        }
        let existing = self.intents()?.into_iter().find(|i| i.pool == name);
        let (intent, resumed) = match existing {
            Some(i) if i.layout == layout && same_disks(&i.disks, disks) => {
                if i.state == ProvisionState::Done {
                    return Ok(self.outcome(&i, false, true));
                }
                (i, true)
            }
            Some(i) if i.state != ProvisionState::Done => {
                return Err(ProvisionError::Conflict {
                    pool: name.to_owned(),
                    layout: i.layout.as_str(),
                    disks: i.disks.join(" "),
                    state: i.state,
                });
            }
            // A finished intent with other inputs: the pool was destroyed
            // and is being created anew; the new intent replaces it.
            _ => {
                let i = Intent {
                    pool: name.to_owned(),
                    layout,
                    disks: disks.to_vec(),
                    force,
                    key_file: key.to_string_lossy().into_owned(),
                    state: ProvisionState::Planned,
                    last_error: None,
                };
                self.save(&i)?;
                (i, false)
            }
        };
        self.drive(intent, resumed).await
    }

    /// Completes every unfinished intent (call at start-up). Each result
    /// names its pool.
    pub async fn resume_all(&self) -> Vec<Result<ProvisionOutcome, ProvisionError>> {
        let intents = match self.intents() {
            Ok(i) => i,
            Err(e) => return vec![Err(e)],
        };
        let mut out = Vec::new();
        for i in intents
            .into_iter()
            .filter(|i| i.state != ProvisionState::Done)
        {
            out.push(self.drive(i, true).await);
        }
        out
    }

    fn outcome(&self, i: &Intent, resumed: bool, already_done: bool) -> ProvisionOutcome {
        ProvisionOutcome {
            pool: i.pool.clone(),
            state: i.state,
            datasets: self
                .standard_datasets(&i.pool)
                .into_iter()
                .map(|d| d.name)
                .collect(),
            key_file: i.key_file.clone(),
            resumed,
            already_done,
        }
    }

    /// The standard datasets of `pool` (see the module docs).
    pub fn standard_datasets(&self, pool: &str) -> Vec<DatasetSpec> {
        let mut docs = DatasetSpec::new(format!("{pool}/documents"));
        docs.compression = Some("zstd".to_owned());
        docs.encryption = Some(EncryptionSpec {
            cipher: CIPHER.to_owned(),
            keyformat: KeyFormat::Raw,
            keylocation: format!("file://{}", self.cfg.key_file(pool).to_string_lossy()),
        });
        vec![docs]
    }

    async fn drive(
        &self,
        mut i: Intent,
        resumed: bool,
    ) -> Result<ProvisionOutcome, ProvisionError> {
        let result = self.steps(&mut i).await;
        if let Err(e) = &result {
            i.last_error = Some(e.to_string());
            // The error itself is what the caller needs; a failure to record
            // it is logged, not allowed to hide it.
            if let Err(se) = self.save(&i) {
                tracing::error!(pool = %i.pool, error = %se, "could not record provisioning failure");
            }
        }
        result.map(|()| self.outcome(&i, resumed, false))
    }

    async fn advance(&self, i: &mut Intent, to: ProvisionState) -> Result<(), ProvisionError> {
        i.state = to;
        i.last_error = None;
        self.save(i)
    }

    async fn steps(&self, i: &mut Intent) -> Result<(), ProvisionError> {
        let pool = i.pool.clone();
        let zerr = |step, source| ProvisionError::Zfs {
            pool: pool.clone(),
            step,
            source: Box::new(source),
        };
        if i.state == ProvisionState::Planned {
            let key = PathBuf::from(&i.key_file);
            tokio::task::spawn_blocking(move || ensure_key_file(&key))
                .await
                .map_err(|e| ProvisionError::KeyFile {
                    path: PathBuf::from(&i.key_file),
                    reason: e.to_string(),
                })??;
            let spec = PoolSpec {
                name: pool.clone(),
                layout: zfs_layout(i.layout),
                disks: i.disks.clone(),
                pool_properties: vec![
                    ("ashift".to_owned(), "12".to_owned()),
                    ("autoexpand".to_owned(), "on".to_owned()),
                ],
                fs_properties: vec![
                    ("compression".to_owned(), "zstd".to_owned()),
                    ("atime".to_owned(), "off".to_owned()),
                    ("xattr".to_owned(), "sa".to_owned()),
                    // The root dataset holds no documents and is never
                    // mounted; its children inherit the mount point and are
                    // mounted by root in the host namespace.
                    ("canmount".to_owned(), "off".to_owned()),
                ],
                mountpoint: self.cfg.mountpoint.clone(),
                force: i.force,
            };
            match self.zfs.create_pool(&spec).await {
                Ok(()) => {}
                Err(e) if e.kind() == Some(FailureKind::AlreadyExists) => {
                    let status = self
                        .zfs
                        .pool_status(&pool)
                        .await
                        .map_err(|s| zerr(ProvisionState::Planned, s))?;
                    let found: Vec<String> = status
                        .root
                        .leaves()
                        .iter()
                        .map(|l| l.path.clone().unwrap_or_else(|| l.name.clone()))
                        .collect();
                    if !same_disks(&found, &i.disks) {
                        return Err(ProvisionError::PoolExistsWithOtherDisks {
                            pool: pool.clone(),
                            found: found.join(" "),
                        });
                    }
                }
                Err(e) => return Err(zerr(ProvisionState::Planned, e)),
            }
            self.advance(i, ProvisionState::PoolCreated).await?;
        }
        if i.state == ProvisionState::PoolCreated {
            let existing = self
                .zfs
                .dataset_list(&pool)
                .await
                .map_err(|e| zerr(ProvisionState::PoolCreated, e))?;
            for spec in self.standard_datasets(&pool) {
                if existing.iter().any(|d| d.name == spec.name) {
                    continue;
                }
                match self.zfs.create_dataset(&spec).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == Some(FailureKind::AlreadyExists) => {}
                    Err(e) => return Err(zerr(ProvisionState::PoolCreated, e)),
                }
            }
            self.advance(i, ProvisionState::DatasetsCreated).await?;
        }
        if i.state == ProvisionState::DatasetsCreated {
            let existing = self
                .zfs
                .dataset_list(&pool)
                .await
                .map_err(|e| zerr(ProvisionState::DatasetsCreated, e))?;
            for spec in self.standard_datasets(&pool) {
                let Some(d) = existing.iter().find(|d| d.name == spec.name) else {
                    return Err(ProvisionError::DatasetMismatch {
                        dataset: spec.name,
                        reason: "is missing after creation".to_owned(),
                    });
                };
                if spec.encryption.is_some()
                    && d.encryption != Encryption::Cipher(CIPHER.to_owned())
                {
                    return Err(ProvisionError::DatasetMismatch {
                        dataset: spec.name,
                        reason: format!("is not encrypted with {CIPHER} ({:?})", d.encryption),
                    });
                }
            }
            self.advance(i, ProvisionState::Done).await?;
        }
        Ok(())
    }
}
