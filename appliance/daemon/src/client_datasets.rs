//! Each sync client's documents in its own dataset: `tank/documents/<client>`,
//! with the client's quota as the dataset's ZFS quota, so the pool enforces
//! it, `storage quota` shows and changes it, and its 80/90/95 % alerts are
//! the client's.
//!
//! Where a client's documents live is its [`Placement`], kept in the upload
//! gate ([`crate::admission::StorageGate`]):
//! - found in the storage report (a dataset named `<documents>/<client>`);
//! - or decided by the reconciler ([`run`]) for an enrolled client that has
//!   none yet: a missing or empty directory gets a new dataset through the
//!   storage manager; a directory that already holds documents (a client
//!   enrolled before per-client datasets) stays a plain directory, because
//!   mounting a dataset over it would hide them.
//!
//! The daemon creates datasets unmounted (it runs unprivileged); the root
//! mount unit mounts them when the manager's `datasets.json` changes. Until
//! the mount shows in this process's mount table, uploads for that client are
//! refused as "storage unavailable" with the reason: anything written to the
//! directory before would land in the parent dataset and be hidden by the
//! mount.
//!
//! [`decide`], [`check_client`] and [`mount_points`] are plain code; [`run`]
//! and [`is_mounted`] are the thin IO around them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use appliance_storage::StorageManager;
use appliance_sync::identity::{Authority, ClientName};
use tokio_util::sync::CancellationToken;

use crate::admission::{GateState, StorageGate};

/// How often the reconciler looks for clients without a place even when
/// nothing woke it (a failed create is retried at this pace).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// The documents dataset, when the storage manager manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedDocuments {
    /// Dataset name (`tank/documents`).
    pub dataset: String,
    /// Its mount point (`/tank/documents`).
    pub mountpoint: PathBuf,
}

impl ManagedDocuments {
    /// The dataset a client gets.
    pub fn client_dataset(&self, client: &ClientName) -> String {
        format!("{}/{}", self.dataset, client.as_str())
    }

    /// Where that dataset is mounted (ZFS's inherited mount point).
    pub fn client_dir(&self, client: &ClientName) -> PathBuf {
        self.mountpoint.join(client.as_str())
    }
}

/// Where one client's documents live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Its own dataset, mounted at `mountpoint`.
    Dataset {
        /// Dataset name.
        name: String,
        /// Mount point.
        mountpoint: PathBuf,
    },
    /// A plain directory of the documents dataset.
    Directory,
}

/// Every client's placement, and why some have none yet.
#[derive(Debug, Clone, Default)]
pub struct ClientPlaces {
    /// `None`: documents are not on a managed dataset (a development
    /// machine, the simulator); every client writes to its directory.
    pub documents: Option<ManagedDocuments>,
    /// Known placements.
    pub places: HashMap<ClientName, Placement>,
    /// The last failure to create a client's dataset.
    pub problems: HashMap<ClientName, String>,
}

impl ClientPlaces {
    /// Takes the documents dataset and the datasets under it from a storage
    /// report's dataset list (name, mount point). A client dataset found
    /// there replaces whatever was decided before; the rest are kept (a
    /// report taken while ZFS does not answer lists nothing).
    pub fn learn<'a>(
        &mut self,
        documents: Option<ManagedDocuments>,
        datasets: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        let Some(docs) = documents else {
            return;
        };
        let prefix = format!("{}/", docs.dataset);
        for (name, mountpoint) in datasets {
            let Some(child) = name.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(client) = ClientName::parse(child) else {
                continue;
            };
            self.problems.remove(&client);
            self.places.insert(
                client,
                Placement::Dataset {
                    name: name.to_owned(),
                    mountpoint: PathBuf::from(mountpoint),
                },
            );
        }
        self.documents = Some(docs);
    }
}

/// Why a client may not write yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotYet {
    /// Its dataset exists but is not mounted here.
    NotMounted { dataset: String },
    /// The documents dataset itself is not mounted: its directory is a
    /// plain directory of the root file system, never a place for them.
    DocumentsNotMounted { dataset: String },
    /// No placement yet: the reconciler must look (wake it).
    Unplaced { problem: Option<String> },
}

impl NotYet {
    /// The reason the client hears.
    pub fn reason(&self, client: &ClientName) -> String {
        match self {
            Self::NotMounted { dataset } => format!(
                "the dataset {dataset} of client {client} is not mounted yet; try again in a moment"
            ),
            Self::DocumentsNotMounted { dataset } => {
                format!("the documents dataset {dataset} is not mounted; try again in a moment")
            }
            Self::Unplaced { problem: None } => {
                format!("the dataset of client {client} is being created; try again in a moment")
            }
            Self::Unplaced {
                problem: Some(problem),
            } => {
                format!("the dataset of client {client} could not be created ({problem}); retrying")
            }
        }
    }
}

/// Whether `client` may write under its directory now (the pool gate aside).
pub fn check_client(
    places: &ClientPlaces,
    client: &ClientName,
    mounted: impl Fn(&Path) -> bool,
) -> Result<(), NotYet> {
    let Some(docs) = &places.documents else {
        return Ok(());
    };
    if !mounted(&docs.mountpoint) {
        return Err(NotYet::DocumentsNotMounted {
            dataset: docs.dataset.clone(),
        });
    }
    match places.places.get(client) {
        Some(Placement::Directory) => Ok(()),
        Some(Placement::Dataset { name, mountpoint }) => {
            if mounted(mountpoint) {
                Ok(())
            } else {
                Err(NotYet::NotMounted {
                    dataset: name.clone(),
                })
            }
        }
        None => Err(NotYet::Unplaced {
            problem: places.problems.get(client).cloned(),
        }),
    }
}

/// What a client's directory looks like before it has a placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    /// Not there.
    Absent,
    /// An empty directory.
    Empty,
    /// A directory with entries.
    HasEntries,
    /// Something else (a file, a symlink).
    NotADirectory,
}

/// What to do for a client without a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Create its dataset.
    Create,
    /// Keep the plain directory: it already holds documents.
    KeepDirectory,
    /// Leave it: the path is not a directory; an operator must look.
    Refuse(String),
}

/// The reconciler's choice for one directory state.
pub fn decide(state: DirState) -> Decision {
    match state {
        DirState::Absent | DirState::Empty => Decision::Create,
        DirState::HasEntries => Decision::KeepDirectory,
        DirState::NotADirectory => {
            Decision::Refuse("its path under documents is not a directory".to_owned())
        }
    }
}

/// Looks at a client's directory (without following a symlink).
pub fn dir_state(dir: &Path) -> std::io::Result<DirState> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DirState::Absent),
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => Ok(DirState::NotADirectory),
        Ok(_) => Ok(if std::fs::read_dir(dir)?.next().is_some() {
            DirState::HasEntries
        } else {
            DirState::Empty
        }),
    }
}

/// Mount points listed in a `/proc/<pid>/mountinfo` text (the fifth field,
/// with the kernel's octal escapes of space, tab, newline and backslash
/// undone).
pub fn mount_points(mountinfo: &str) -> HashSet<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .collect()
}

fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(value) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `dir` is a mount point in this process's mount namespace. Reads
/// procfs only: never the documents' file system (which may hang). The
/// table is re-read only after the kernel reports a change ([`MountTable`]),
/// so an upload's admission checks cost a `poll`, not a parse.
pub fn is_mounted(dir: &Path) -> bool {
    static TABLE: MountTable = MountTable::new("/proc/self/mountinfo");
    TABLE.is_mounted(dir)
}

/// A mount table read from a `mountinfo` file and kept until it changes.
/// The kernel marks an open `mountinfo` with `POLLPRI` after any mount or
/// unmount in the namespace; the file is then opened and read again. The
/// new descriptor's baseline is taken at open, before the read, so a change
/// during the read is reported by the next poll: the cached table is never
/// older than the last poll that saw no change.
#[derive(Debug)]
pub struct MountTable {
    path: &'static str,
    cached: std::sync::Mutex<Option<(std::fs::File, HashSet<PathBuf>)>>,
    reads: std::sync::atomic::AtomicU64,
}

impl MountTable {
    /// A table read from `path` (`/proc/self/mountinfo` or another
    /// process's) at first use.
    pub const fn new(path: &'static str) -> Self {
        Self {
            path,
            cached: std::sync::Mutex::new(None),
            reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times the file was read.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `dir` is a mount point now. When the table cannot be read,
    /// nothing counts as mounted (so nothing is written).
    pub fn is_mounted(&self, dir: &Path) -> bool {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = cached.as_ref().is_some_and(|(f, _)| !changed(f));
        if !fresh {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *cached = read_table(self.path).ok();
        }
        cached
            .as_ref()
            .is_some_and(|(_, points)| points.contains(dir))
    }
}

/// Whether the kernel reported a mount table change on `file` since it
/// was opened or last polled (any doubt counts as a change).
fn changed(file: &std::fs::File) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
    // Any event (POLLPRI | POLLERR on a change) or an error means re-read.
    !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

fn read_table(path: &str) -> std::io::Result<(std::fs::File, HashSet<PathBuf>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok((file, mount_points(&text)))
}

/// How often the mount of one dataset is asked for again while it does not
/// show in the mount table.
pub const MOUNT_RETRY: Duration = Duration::from_secs(15);

/// When each dataset's mount was last asked for (rate limit of
/// [`request_mount`]).
#[derive(Debug, Default)]
pub struct MountRequests {
    last: HashMap<String, tokio::time::Instant>,
}

/// Asks the root mount unit to run again for `dataset` (the manager records
/// it again), at most once per [`MOUNT_RETRY`]. For a dataset that exists
/// and should be mounted but is not: a mount unit run that missed it.
pub async fn request_mount(
    requests: &mut MountRequests,
    manager: &StorageManager,
    dataset: &str,
    quota: Option<u64>,
) {
    let now = tokio::time::Instant::now();
    if requests
        .last
        .get(dataset)
        .is_some_and(|t| now.duration_since(*t) < MOUNT_RETRY)
    {
        return;
    }
    requests.last.insert(dataset.to_owned(), now);
    tracing::warn!(%dataset, "dataset not mounted; asking the mount unit again");
    if let Err(e) = manager.create_dataset(dataset.to_owned(), quota).await {
        tracing::warn!(%dataset, error = %e, "cannot ask for the mount again");
    }
}

/// One pass: every enrolled, unrevoked client without a placement gets one;
/// a dataset (documents, or a client's) not mounted is asked for again.
pub async fn reconcile(
    gate: &StorageGate,
    manager: &StorageManager,
    authority: &Authority,
    requests: &mut MountRequests,
) {
    // The manager's current view, not the storage task's last refresh (up
    // to 10 s old).
    if let Ok(report) = manager.report().await {
        gate.learn(&report);
    }
    let Some(docs) = gate.places().documents else {
        return;
    };
    if matches!(gate.get(), GateState::Closed { .. }) {
        return;
    }
    if !gate.is_mounted(&docs.mountpoint) {
        request_mount(requests, manager, &docs.dataset, None).await;
        return;
    }
    for info in authority.list() {
        if info.revoked_at.is_some() {
            continue;
        }
        match gate.places().places.get(&info.name) {
            None => {}
            Some(Placement::Dataset { name, mountpoint }) => {
                // Created but not mounted (a mount unit run that missed
                // it): record it again, which runs the unit.
                if !gate.is_mounted(mountpoint) {
                    request_mount(requests, manager, name, info.quota).await;
                }
                continue;
            }
            Some(Placement::Directory) => continue,
        }
        let client = info.name.clone();
        let dir = docs.client_dir(&client);
        let looked = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || dir_state(&dir)).await
        };
        let state = match looked {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                gate.set_problem(&client, format!("cannot look at {}: {e}", dir.display()));
                continue;
            }
            Err(e) => {
                gate.set_problem(&client, e.to_string());
                continue;
            }
        };
        match decide(state) {
            Decision::Create => {
                let name = docs.client_dataset(&client);
                match manager.create_dataset(name.clone(), info.quota).await {
                    Ok(created) => {
                        tracing::info!(
                            client = %client,
                            dataset = %name,
                            quota = ?info.quota,
                            created,
                            "client dataset ready; waiting for the mount unit"
                        );
                        gate.set_placement(
                            &client,
                            Placement::Dataset {
                                name,
                                mountpoint: dir,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(client = %client, dataset = %name, error = %e, "cannot create the client's dataset; retrying");
                        gate.set_problem(&client, e.to_string());
                    }
                }
            }
            Decision::KeepDirectory => {
                tracing::warn!(
                    client = %client,
                    dir = %dir.display(),
                    "the client's documents are in a plain directory of the documents dataset \
                     (it held documents before per-client datasets); its quota is enforced by \
                     the daemon's accounting, not by ZFS"
                );
                gate.set_placement(&client, Placement::Directory);
            }
            Decision::Refuse(why) => {
                tracing::error!(client = %client, dir = %dir.display(), %why, "client has no place for documents");
                gate.set_problem(&client, why);
            }
        }
    }
}

/// The reconciler's task: a pass at start, whenever the gate is woken (an
/// enrollment, an upload from a client without a place) and every
/// [`RECONCILE_EVERY`].
pub async fn run(
    gate: StorageGate,
    manager: StorageManager,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
) {
    let mut requests = MountRequests::default();
    loop {
        reconcile(&gate, &manager, &authority, &mut requests).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = gate.woken() => {}
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_storage::disks::FakeDisks;
    use appliance_storage::{CollectingSink, ManagerConfig, SystemClock};
    use appliance_types::health::ComponentState;
    use appliance_types::storage::StorageLayout;
    use appliance_zfs::fake::FakeZfs;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn name(s: &str) -> ClientName {
        ClientName::parse(s).unwrap()
    }

    const MOUNT_CHILD: &str = "client_datasets::tests::mount_table_in_private_namespace";

    /// Runs [`mount_table_in_private_namespace`] in a private mount
    /// namespace (`unshare -m`), where it may mount without touching the
    /// host. Needs root, as CI has.
    #[test]
    fn mount_table_follows_mounts_and_reads_only_after_a_change() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private"])
            .arg(exe)
            .args(["--exact", MOUNT_CHILD, "--ignored", "--nocapture"])
            .output()
            .expect("unshare (util-linux) runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child test ran: {text}");
    }

    #[test]
    #[ignore = "run in a private mount namespace by mount_table_follows_mounts_and_reads_only_after_a_change"]
    fn mount_table_in_private_namespace() {
        let table = MountTable::new("/proc/self/mountinfo");
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        assert!(table.is_mounted(Path::new("/proc")));
        assert!(!table.is_mounted(&dir));
        let reads = table.reads();
        for _ in 0..100 {
            assert!(!table.is_mounted(&dir));
        }
        assert_eq!(table.reads(), reads, "no change, no re-read");
        let mount = |args: &[&str]| {
            let st = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap();
            assert!(st.success(), "{args:?}");
        };
        let d = dir.to_str().unwrap();
        mount(&["mount", "-t", "tmpfs", "none", d]);
        assert!(table.is_mounted(&dir), "a new mount is seen at once");
        assert_eq!(table.reads(), reads + 1);
        assert!(table.is_mounted(&dir));
        assert_eq!(table.reads(), reads + 1);
        mount(&["umount", d]);
        assert!(!table.is_mounted(&dir), "an unmount is seen at once");
    }

    fn docs() -> ManagedDocuments {
        ManagedDocuments {
            dataset: "tank/documents".into(),
            mountpoint: PathBuf::from("/tank/documents"),
        }
    }

    #[test]
    fn mount_points_are_read_from_mountinfo_with_escapes_undone() {
        let text = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
98 25 0:52 / /tank/documents rw,noatime shared:50 - zfs tank/documents rw,xattr
99 98 0:53 / /tank/documents/laptop rw,noatime shared:51 - zfs tank/documents/laptop rw
100 98 0:54 / /tank/documents/my\\040docs\\134x rw shared:52 - zfs tank/documents/b rw
101 98 0:55 / /odd\\12 rw - tmpfs none rw
";
        let points = mount_points(text);
        assert!(points.contains(Path::new("/tank/documents/laptop")));
        assert!(points.contains(Path::new("/tank/documents")));
        assert!(points.contains(Path::new("/tank/documents/my docs\\x")));
        // An escape cut short is kept as written.
        assert!(points.contains(Path::new("/odd\\12")));
        assert!(!points.contains(Path::new("/tank/documents/phone")));
        assert!(!points.contains(Path::new("/tank")));
    }

    #[test]
    fn missing_or_empty_directories_get_a_dataset_and_full_ones_stay() {
        assert_eq!(decide(DirState::Absent), Decision::Create);
        assert_eq!(decide(DirState::Empty), Decision::Create);
        assert_eq!(decide(DirState::HasEntries), Decision::KeepDirectory);
        assert!(matches!(
            decide(DirState::NotADirectory),
            Decision::Refuse(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("laptop");
        assert_eq!(dir_state(&p).unwrap(), DirState::Absent);
        std::fs::create_dir(&p).unwrap();
        assert_eq!(dir_state(&p).unwrap(), DirState::Empty);
        std::fs::write(p.join("a.pdf"), b"x").unwrap();
        assert_eq!(dir_state(&p).unwrap(), DirState::HasEntries);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(dir_state(&link).unwrap(), DirState::NotADirectory);
    }

    #[test]
    fn a_client_writes_only_once_its_dataset_is_mounted() {
        let laptop = name("laptop");
        // Not on a managed dataset: always.
        let plain = ClientPlaces::default();
        assert_eq!(check_client(&plain, &laptop, |_| false), Ok(()));
        let mut places = ClientPlaces::default();
        places.learn(
            Some(docs()),
            [
                ("tank", "/tank"),
                ("tank/documents", "/tank/documents"),
                ("tank/documents/laptop", "/tank/documents/laptop"),
                ("tank/documents/Not_A_Client!", "/tank/documents/x"),
                ("tank/other/phone", "/tank/other/phone"),
            ],
        );
        assert_eq!(places.places.len(), 1);
        let mountpoint = Path::new("/tank/documents/laptop");
        let documents = Path::new("/tank/documents");
        assert_eq!(
            check_client(&places, &laptop, |p| p == mountpoint || p == documents),
            Ok(())
        );
        // Never into an unmounted documents dataset's directory (it is the
        // root file system, unencrypted).
        let err = check_client(&places, &laptop, |p| p == mountpoint).unwrap_err();
        assert_eq!(
            err,
            NotYet::DocumentsNotMounted {
                dataset: "tank/documents".into()
            }
        );
        assert!(err
            .reason(&laptop)
            .contains("documents dataset tank/documents is not mounted"));
        let err = check_client(&places, &laptop, |p| p == documents).unwrap_err();
        assert_eq!(
            err,
            NotYet::NotMounted {
                dataset: "tank/documents/laptop".into()
            }
        );
        assert!(err.reason(&laptop).contains("not mounted yet"));
        // A client not placed yet waits for the reconciler, with its problem.
        let phone = name("phone");
        assert_eq!(
            check_client(&places, &phone, |_| true),
            Err(NotYet::Unplaced { problem: None })
        );
        places.problems.insert(phone.clone(), "pool is full".into());
        let err = check_client(&places, &phone, |_| true).unwrap_err();
        assert!(
            err.reason(&phone).contains("pool is full"),
            "{}",
            err.reason(&phone)
        );
        places.places.insert(phone.clone(), Placement::Directory);
        assert_eq!(check_client(&places, &phone, |p| p == documents), Ok(()));
    }

    /// The reconciler against the storage manager over the fake ZFS: a new
    /// client gets its dataset with its quota; a client whose directory
    /// already holds documents keeps it; revoked clients get nothing; the
    /// gate refuses until the mount shows.
    #[tokio::test]
    async fn the_reconciler_creates_client_datasets_with_their_quotas() {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<String> = (0..6)
            .map(|i| format!("/dev/disk/by-id/virtio-Z{i}"))
            .collect();
        let serials: Vec<String> = (0..6).map(|i| format!("Z{i}")).collect();
        let serial_refs: Vec<&str> = serials.iter().map(String::as_str).collect();
        let fake = Arc::new(FakeZfs::with_disks(&disks, 1 << 30));
        let mut cfg = ManagerConfig::new(dir.path().join("state"));
        cfg.provision.key_dir = dir.path().join("keys");
        // The pool's mount point is a real directory, so that the
        // reconciler finds the client directories there.
        let pool_mount = dir.path().join("tank");
        cfg.provision.mountpoint = Some(pool_mount.to_string_lossy().into_owned());
        let (manager, _task) = StorageManager::spawn(
            cfg,
            fake.clone(),
            Arc::new(FakeDisks::new(FakeDisks::blank_disks(
                &serial_refs,
                1 << 30,
            ))),
            Arc::new(CollectingSink::new()),
            Arc::new(SystemClock),
        );
        manager
            .create_pool("tank".into(), StorageLayout::Raidz2, disks, false)
            .await
            .unwrap();
        manager.refresh().await.unwrap();
        let documents = pool_mount.join("documents");
        std::fs::create_dir_all(documents.join("old")).unwrap();
        std::fs::write(documents.join("old").join("kept.pdf"), b"kept").unwrap();

        let authority = Authority::open(&dir.path().join("identity")).unwrap();
        for (client, quota) in [("laptop", Some(50 << 20)), ("old", None), ("gone", None)] {
            authority
                .enroll(
                    &name(client),
                    quota,
                    &dir.path().join(format!("{client}.bundle")),
                )
                .unwrap();
        }
        authority.revoke(&name("gone")).unwrap();

        let mounted = Arc::new(AtomicBool::new(false));
        let flag = mounted.clone();
        // The documents dataset is mounted; the client's follows the flag.
        let docs_dir = documents.clone();
        let gate =
            StorageGate::new(documents.clone()).with_mount_check(Arc::new(move |p: &Path| {
                p == docs_dir || flag.load(Ordering::SeqCst)
            }));
        let health = appliance_storage::Health {
            state: ComponentState::Ready,
            reason: "ok".into(),
        };
        gate.update(&health, Some(&manager.report().await.unwrap()));
        assert_eq!(gate.places().documents.unwrap().dataset, "tank/documents");
        let reason = gate.check(&name("laptop")).unwrap_err().to_string();
        assert!(reason.contains("being created"), "{reason}");

        let mut requests = MountRequests::default();
        reconcile(&gate, &manager, &authority, &mut requests).await;
        let names = fake.dataset_names();
        assert!(
            names.contains(&"tank/documents/laptop".to_owned()),
            "{names:?}"
        );
        assert!(
            !names.contains(&"tank/documents/old".to_owned()),
            "{names:?}"
        );
        assert!(
            !names.contains(&"tank/documents/gone".to_owned()),
            "{names:?}"
        );
        let quota = manager
            .quota_get(Some("tank/documents/laptop".into()))
            .await
            .unwrap();
        assert_eq!(quota[0].quota_bytes, Some(50 << 20));
        assert_eq!(gate.check(&name("old")), Ok(()));
        let reason = gate.check(&name("laptop")).unwrap_err().to_string();
        assert!(reason.contains("not mounted yet"), "{reason}");
        assert_eq!(
            gate.describe_place(&name("laptop")),
            "dataset tank/documents/laptop (not mounted yet)"
        );
        mounted.store(true, Ordering::SeqCst);
        assert_eq!(gate.check(&name("laptop")), Ok(()));
        assert_eq!(
            gate.describe_place(&name("laptop")),
            "dataset tank/documents/laptop (mounted)"
        );
        assert!(gate
            .describe_place(&name("old"))
            .contains("no dataset of its own"));

        // After a restart the placement comes from the report alone.
        manager.refresh().await.unwrap();
        let fresh = StorageGate::new(documents).with_mount_check(Arc::new(|_: &Path| true));
        fresh.update(&health, Some(&manager.report().await.unwrap()));
        assert_eq!(fresh.check(&name("laptop")), Ok(()));
        // While the pool cannot take writes, the pool's reason wins.
        fresh.set(GateState::Closed {
            reason: "pool tank is SUSPENDED".into(),
        });
        let reason = fresh.check(&name("laptop")).unwrap_err().to_string();
        assert!(reason.contains("SUSPENDED"), "{reason}");

        // A gate the storage task has not told about the pool yet (its
        // refresh lags the pool's creation): the reconciler asks the manager
        // itself, and the new client still gets its own dataset.
        authority
            .enroll(&name("desk"), None, &dir.path().join("desk.bundle"))
            .unwrap();
        let untold = StorageGate::new(pool_mount.join("documents"))
            .with_mount_check(Arc::new(|_: &Path| true));
        assert!(untold.places().documents.is_none());
        reconcile(&untold, &manager, &authority, &mut MountRequests::default()).await;
        assert!(fake
            .dataset_names()
            .contains(&"tank/documents/desk".to_owned()));
        assert_eq!(untold.check(&name("desk")), Ok(()));

        // The documents dataset not mounted (a mount unit run missed it):
        // nothing is created, and its mount is asked for again through the
        // record the mount unit watches.
        let unmounted = StorageGate::new(pool_mount.join("documents"))
            .with_mount_check(Arc::new(|_: &Path| false));
        unmounted.update(&health, Some(&manager.report().await.unwrap()));
        authority
            .enroll(&name("tablet"), None, &dir.path().join("tablet.bundle"))
            .unwrap();
        let record = dir.path().join("state").join("datasets.json");
        let before = std::fs::read_to_string(&record).unwrap();
        assert!(!before.contains("\"tank/documents\""), "{before}");
        reconcile(
            &unmounted,
            &manager,
            &authority,
            &mut MountRequests::default(),
        )
        .await;
        let after = std::fs::read_to_string(&record).unwrap();
        assert!(after.contains("\"tank/documents\""), "{after}");
        assert!(!fake
            .dataset_names()
            .contains(&"tank/documents/tablet".to_owned()));
    }
}
