//! The per-client document store on real files.
//!
//! ```text
//! <documents>/<client>/                 the client's root; its documents, as uploaded
//!   .appliance-staging/<key>.data       an upload being assembled, chunks at their offsets
//!   .appliance-staging/<key>.landed     durable record of the chunks in <key>.data
//!   .appliance-meta/chunks/ab/<hash>    content-addressed chunks (legacy; still indexed)
//!   .appliance-meta/manifests/<path>    manifest (chunk list, hash, mtime) of a document
//!                                       whose manifest is too large for its attribute
//! ```
//! A document's manifest is kept in its `user.appliance-sync.manifest`
//! attribute when it fits (up to ~75 chunks; see [`MAX_XATTR_MANIFEST`]),
//! set before the document is fsynced; manifests are caches either way,
//! used only while the document's size and mtime match them.
//! The `.appliance-` prefix is reserved by the protocol's path rules, so no
//! uploaded path can reach these directories.
//!
//! **Anonymous staging**: where the file system allows (probed at open),
//! `<key>.data` starts as an `O_TMPFILE` file with no name; it is named
//! `<key>.data` before its first record (so a resumable upload looks as
//! below) or before a rename over an existing document. A new document
//! that never needed a record is linked straight into its directory.
//!
//! **Upload-keyed staging** (each chunk byte written once): an upload's
//! `<key>` is a tag of its path (16 hex digits) followed by a hash of its
//! path, size, file hash and chunk list (48), so the same push after an
//! interruption finds the same files. Each verified chunk
//! is `pwrite`n at every offset the manifest has it ([`ClientStore::write_staged`]).
//! Every [`STAGING_SYNC_BYTES`] the data file is fdatasynced, then the
//! chunks written before that sync are appended to `<key>.landed`
//! (hash + length, 36 bytes each) and it is fdatasynced: the record never
//! lists a chunk that a crash could lose. A resumed upload counts only
//! recorded chunks as present. The whole-file hash is computed in file
//! order as chunks land (out-of-order chunks wait in a bounded buffer, or
//! are read back at commit); a file of one chunk is not hashed again, its
//! verified chunk hash being its file hash.
//!
//! **Commit protocol** (a document is complete and verified, or absent):
//! 1. chunks the server already had (in documents or the chunk store) are
//!    copied into the staging file from there, each re-verified as read;
//! 2. the whole-file hash is finished and compared with the manifest; the
//!    staging file's mtime and manifest (a cache, checked against size and
//!    mtime before use; an attribute, or a file naming the inode it was
//!    written for, if too large) are set, and it is fsynced;
//! 3. the file is renamed into place (if versions are kept, a replaced
//!    document first gets its version name `name.~N~` as a hard link, so the
//!    path always holds one whole version), or, still anonymous and new,
//!    linked into place, and the directory is fsynced (one fsync shared by
//!    the commits into that directory that wait together, each started
//!    after the renames it covers);
//! 4. the record is deleted, and chunks now held by the document leave the
//!    chunk store.
//!
//! Commits (and deletes) of one path take turns (`PathTurns`), so two
//! never both replace, count or version the same document; those of
//! different paths never wait for each other, so their fsyncs overlap.
//!
//! A crash before 3 leaves only staging files. [`ClientStore::open`] keeps
//! resumable pairs (`<key>.data` + `<key>.landed`, younger than
//! [`STAGING_MAX_AGE`]) and sweeps everything else. An upload that fails
//! for good (disk full, whole-file hash mismatch, unwritable path) deletes
//! its staging files at once; one that is interrupted keeps them, until
//! its path is committed with other content or deleted (found by the
//! path's tag): the client has replaced what they would resume.
//!
//! **Chunk index**: chunk hash → where its bytes are: the chunk store or an
//! offset in a document. A re-push of an unchanged or slightly edited
//! document therefore needs no copy of the data in the chunk store, and the
//! store does not double the disk use of what it keeps. Every chunk read for
//! assembly is re-verified, so a document changed behind our back costs a
//! retry, never a wrong file.
//!
//! **Symlinks**: paths are resolved one component at a time with
//! `openat(O_NOFOLLOW)` from a descriptor of the client root, so a symlink
//! planted anywhere in the tree (by a local user; clients cannot create them)
//! is refused ([`StoreError::Symlink`]) instead of followed out of the root.
//! Renames and unlinks are done relative to those descriptors.
//!
//! **Full disk**: `ENOSPC`/`EDQUOT` at any step become [`StoreError::DiskFull`],
//! and the staging file or temporary chunk file is removed.

use crate::identity::ClientName;
use appliance_sync_proto::message::{ListEntry, Manifest, Mtime};
use appliance_sync_proto::path::{is_reserved_component, METADATA_DIR_NAME, STAGING_DIR_NAME};
use appliance_sync_proto::{digest_reader, Hash, RelPath, ValidManifest};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHUNKS_DIR: &str = "chunks";
const MANIFESTS_DIR: &str = "manifests";
/// Mode of document directories and files: owner only; the appliance serves
/// them to their owner through this protocol, nobody reads them locally.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Store failures, each naming the client and the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{client}: {path} not found")]
    NotFound { client: ClientName, path: String },
    #[error("{client}: {path} is or passes through a symlink; refused")]
    Symlink { client: ClientName, path: String },
    #[error("{client}: {path} is not a regular file or directory as expected")]
    WrongType { client: ClientName, path: String },
    #[error("{client}: disk full while writing {path}")]
    DiskFull { client: ClientName, path: String },
    #[error("{client}: chunk {hash} is missing from the store")]
    MissingChunk { client: ClientName, hash: Hash },
    #[error("{client}: stored data for chunk {hash} no longer matches it (changed on disk); it was dropped, retry the upload")]
    ChunkChanged { client: ClientName, hash: Hash },
    #[error("{client}: assembled {path} hashes to {actual}, the manifest says {expected}")]
    FileHashMismatch {
        client: ClientName,
        path: String,
        expected: Hash,
        actual: Hash,
    },
    /// The upload's staging state was settled by another upload sharing
    /// it (committed, suspended or discarded) before this one got to it.
    #[error("{client}: the upload of {path} already ended")]
    Ended { client: ClientName, path: String },
    #[error("{client}: {path}: {source}")]
    Io {
        client: ClientName,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// Whether this is a full disk (or a full filesystem quota).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }
}

fn is_enospc(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Where the bytes of an indexed chunk are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkSource {
    Store {
        len: u32,
    },
    Document {
        path: RelPath,
        offset: u64,
        len: u32,
    },
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<Hash, ChunkSource>,
    files: u64,
}

/// Bytes written to a staging file between two fdatasyncs of it (each
/// followed by an append to its durable record). Smaller costs more syncs;
/// larger loses more on a crash (never correctness: unrecorded chunks are
/// simply asked for again).
pub const STAGING_SYNC_BYTES: u64 = 16 << 20;
/// Out-of-order chunk bytes one upload holds for the in-order whole-file
/// hasher; beyond it, those chunks are read back from the staging file at
/// commit instead.
const REORDER_BYTES: usize = 32 << 20;
/// Out-of-order chunk bytes all uploads of one client hold together
/// (version 1's bound: 8 uploads of [`REORDER_BYTES`]), however many
/// uploads and connections it has open.
const REORDER_CLIENT_BYTES: usize = 8 * REORDER_BYTES;
/// Longest [`ClientStore::stage`] waits for an earlier state of the same
/// upload to settle (a suspend records what landed: one fdatasync).
const SETTLE_WAIT: Duration = Duration::from_secs(10);
/// A resumable staging pair untouched for this long is swept at start-up.
pub const STAGING_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
const DATA_SUFFIX: &str = "data";
const RECORD_SUFFIX: &str = "landed";
/// Extended attribute of a document holding its manifest (postcard), when
/// it fits [`MAX_XATTR_MANIFEST`]; see [`ClientStore::store_manifest`].
const MANIFEST_XATTR: &str = "user.appliance-sync.manifest";
/// Largest manifest kept in the attribute: ext4 stores a file's attributes
/// in one block (4 KiB by default, less its headers), so 3 KiB (about 75
/// chunks of ~39 bytes each, a file of ~75 MiB) always fits; ZFS takes more.
/// Larger manifests go to `.appliance-meta/manifests/<path>`.
const MAX_XATTR_MANIFEST: usize = 3 << 10;
/// Record entry: chunk hash (32) + length (u32 LE).
const RECORD_ENTRY: usize = 36;

/// Whole-file hash computed in file order while chunks land in any order.
#[derive(Debug, Default)]
struct Hashing {
    hasher: blake3::Hasher,
    /// Index (in the manifest) of the next chunk to hash.
    next: usize,
    buffered: HashMap<usize, Arc<Vec<u8>>>,
    buffered_bytes: usize,
}

/// One upload being assembled in its upload-keyed staging file (see
/// [`ClientStore::stage`]).
#[derive(Debug)]
pub struct Staged {
    key: String,
    name: String,
    manifest: ValidManifest,
    /// Manifest indices of each distinct chunk.
    positions: HashMap<Hash, Vec<usize>>,
    /// Chunks written to the data file (durable only once recorded).
    landed: Mutex<HashSet<Hash>>,
    /// Chunks listed in the durable record.
    recorded: Mutex<HashSet<Hash>>,
    /// Writers hold it shared while they `pwrite`; the commit takes it
    /// exclusively before the rename, so nothing writes into a document.
    file: parking_lot::RwLock<Option<Arc<File>>>,
    record: Mutex<Option<File>>,
    /// Whether `<key>.landed` may exist (an earlier attempt's, or written
    /// by this one): only then does a commit unlink it.
    record_exists: std::sync::atomic::AtomicBool,
    /// The data file has no name yet (`O_TMPFILE`): it gets `<key>.data`
    /// before its first record, or its document's name at the commit.
    /// Changed only under `file`'s lock.
    anonymous: std::sync::atomic::AtomicBool,
    /// Written, not yet synced and recorded.
    batch: Mutex<Vec<(Hash, u32)>>,
    batch_bytes: AtomicU64,
    flush: Mutex<()>,
    hashing: Mutex<Hashing>,
    /// The client's out-of-order bytes held by all its uploads
    /// ([`REORDER_CLIENT_BYTES`]); this one's share is given back as its
    /// buffered chunks are hashed, and when it is dropped.
    reorder: Arc<AtomicUsize>,
    /// Bytes this staging file adds to the client's usage.
    accounted: AtomicU64,
    /// Committed, suspended or discarded: nothing more happens to it.
    settled: std::sync::atomic::AtomicBool,
    /// Committed (or found already in place): another upload sharing this
    /// state that commits too has nothing left to do, and succeeds.
    committed: std::sync::atomic::AtomicBool,
    /// Uploads sharing this state; the last one to end suspends it.
    users: std::sync::atomic::AtomicUsize,
    /// The store's [`ClientStore::suspended`]: a state dropped unsettled
    /// (its upload went without a verdict) leaves its pair there.
    parked: Arc<Mutex<HashMap<String, u64>>>,
    /// The client's usage (see [`ClientStore::used`]).
    used: Arc<AtomicU64>,
}

impl Staged {
    /// The upload's key (its staging file's name): uploads that share this
    /// state have the same key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether chunk `hash` is durably in the staging file (listed in its
    /// record): what a resumed upload need not be sent again. Chunks written
    /// but not yet recorded are asked for again (and not rewritten).
    pub fn has_recorded(&self, hash: &Hash) -> bool {
        self.recorded.lock().contains(hash)
    }

    /// Number of chunks listed in the durable record.
    pub fn recorded_count(&self) -> usize {
        self.recorded.lock().len()
    }

    /// Bytes of the staging file counted in the client's usage.
    pub fn accounted_bytes(&self) -> u64 {
        self.accounted.load(Ordering::SeqCst)
    }

    /// The manifest being assembled.
    pub fn manifest(&self) -> &ValidManifest {
        &self.manifest
    }

    /// A file of one chunk: its whole-file hash is that chunk's hash, which
    /// was verified before the chunk was written (or read for dedup).
    fn single_chunk(&self) -> Option<Hash> {
        match self.manifest.chunks.as_slice() {
            [only] if only.offset == 0 && u64::from(only.len) == self.manifest.size => {
                Some(only.hash)
            }
            _ => None,
        }
    }

    /// Claims `n` bytes of the client's reorder budget.
    fn take_reorder(&self, n: usize) -> bool {
        let before = self.reorder.fetch_add(n, Ordering::Relaxed);
        if before + n <= REORDER_CLIENT_BYTES {
            return true;
        }
        self.reorder.fetch_sub(n, Ordering::Relaxed);
        false
    }

    fn feed(&self, positions: &[usize], data: &Arc<Vec<u8>>) {
        if self.single_chunk().is_some() {
            return;
        }
        let mut h = self.hashing.lock();
        let h = &mut *h;
        for &i in positions {
            if i == h.next {
                h.hasher.update(data);
                h.next += 1;
            } else if i > h.next
                && h.buffered_bytes + data.len() <= REORDER_BYTES
                && !h.buffered.contains_key(&i)
                && self.take_reorder(data.len())
            {
                h.buffered_bytes += data.len();
                h.buffered.insert(i, data.clone());
            }
            while let Some(d) = h.buffered.remove(&h.next) {
                h.buffered_bytes -= d.len();
                self.reorder.fetch_sub(d.len(), Ordering::Relaxed);
                h.hasher.update(&d);
                h.next += 1;
            }
        }
    }

    /// Hashes the rest of the file (read back from the staging file where
    /// no buffered copy is left) and returns the whole-file hash.
    fn finish_hash(&self, file: &File) -> io::Result<Hash> {
        if let Some(hash) = self.single_chunk() {
            return Ok(hash);
        }
        let mut h = self.hashing.lock();
        let h = &mut *h;
        // The caller holds the file exclusively, so its offset is ours.
        let mut reader = file;
        while h.next < self.manifest.chunks.len() {
            if let Some(d) = h.buffered.remove(&h.next) {
                h.buffered_bytes -= d.len();
                self.reorder.fetch_sub(d.len(), Ordering::Relaxed);
                h.hasher.update(&d);
            } else {
                // Streamed through BLAKE3's own buffer: no chunk-sized
                // buffer to allocate and zero.
                let c = &self.manifest.chunks[h.next];
                reader.seek(SeekFrom::Start(c.offset))?;
                let before = h.hasher.count();
                h.hasher
                    .update_reader((&mut reader).take(u64::from(c.len)))?;
                if h.hasher.count() - before != u64::from(c.len) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "staging file shorter than its manifest",
                    ));
                }
            }
            h.next += 1;
        }
        Ok(h.hasher.finalize().into())
    }
}

/// A manifest file: the manifest, and the inode of the document it was
/// written for (see [`ClientStore::write_manifest_file`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct ManifestFile {
    ino: u64,
    manifest: Manifest,
}

/// Turns of the commits (and deletes) of each path: one at a time per
/// path, any number of paths at once. A turn lasts a whole commit, its
/// fsyncs included (the document in the way, its accounting and its
/// version name are decided and used under it); turns of different paths
/// are independent, so their fsyncs run concurrently. It replaced 64 locks
/// striped by a hash of the path, under which ~1 in 64 pairs of different
/// paths waited for each other's fsyncs: with 32 commits of 32 KiB at once
/// and each fsync delayed 5 ms (the store alone; `LD_PRELOAD` shim),
/// 1,387 commits/s against 1,892 with no shared turns (93 with one lock).
#[derive(Debug, Default)]
struct PathTurns {
    /// Paths whose turn is taken.
    busy: Mutex<HashSet<String>>,
    /// Signalled when a turn ends.
    ended: parking_lot::Condvar,
}

impl PathTurns {
    /// Waits for `path`'s turn; it lasts until the returned guard drops.
    fn take(&self, path: &RelPath) -> PathTurn<'_> {
        let mut busy = self.busy.lock();
        while busy.contains(path.as_str()) {
            self.ended.wait(&mut busy);
        }
        busy.insert(path.as_str().to_owned());
        PathTurn {
            turns: self,
            path: path.as_str().to_owned(),
        }
    }
}

/// One path's turn (see [`PathTurns`]); ends when dropped, also on unwind.
#[must_use]
struct PathTurn<'a> {
    turns: &'a PathTurns,
    path: String,
}

impl Drop for PathTurn<'_> {
    fn drop(&mut self) {
        self.turns.busy.lock().remove(&self.path);
        self.turns.ended.notify_all();
    }
}

/// One client's documents. Cheap to share (`Arc`); every method is
/// blocking IO and belongs on a blocking thread.
#[derive(Debug)]
pub struct ClientStore {
    client: ClientName,
    root: PathBuf,
    root_fd: OwnedFd,
    keep_versions: bool,
    used: Arc<AtomicU64>,
    state: Mutex<State>,
    staging_seq: AtomicU64,
    /// Staging state of uploads in progress, by key: a second upload of
    /// the same file (a client that reconnected before the server noticed
    /// the old connection died) shares it.
    active: Mutex<HashMap<String, std::sync::Weak<Staged>>>,
    /// Resumable staging pairs on disk that no upload has open, by key,
    /// with the bytes of them counted in `used` (kept at start-up, or
    /// suspended since). Taken out when an upload resumes one; swept when
    /// their path is committed or deleted (see [`Self::sweep_superseded`]).
    /// Locked after `active`.
    suspended: Arc<Mutex<HashMap<String, u64>>>,
    /// Out-of-order chunk bytes held by all uploads ([`REORDER_CLIENT_BYTES`]).
    reorder: Arc<AtomicUsize>,
    /// `.appliance-staging`, opened once (every upload creates, renames and
    /// unlinks there; walking to it each time cost two `openat`s, a `dup`
    /// and a `mkdirat` per use).
    staging_fd: OwnedFd,
    /// `.appliance-meta/manifests`, opened once (see [`Self::remove_manifest_file`]).
    manifests_fd: OwnedFd,
    /// Directory fsyncs shared by the commits that wait for them together
    /// (see [`DirSyncs`]).
    dir_syncs: DirSyncs,
    /// Commits of one path take turns: two at once would both see the same
    /// document in the way, both account for it, and both pick the same
    /// version name.
    commit_turns: PathTurns,
    /// Whether staging files start anonymous (`O_TMPFILE`, see
    /// [`Self::with_staged_file`]): probed at open, cleared if the file
    /// system refuses them later.
    tmpfile: std::sync::atomic::AtomicBool,
}

/// Group commit of directory fsyncs. A commit renames its document into
/// place, then needs an fsync of the directory that *starts after* its
/// rename; with many uploads committing into one directory at once, one
/// fsync covers every rename finished before it started. So each caller
/// takes a ticket after its rename; a caller finds its ticket covered by a
/// finished sync, or starts one (covering every ticket taken so far) if
/// none is running, or waits for the running one and checks again. No
/// caller returns before an fsync that began after its rename succeeded;
/// a failed fsync covers nobody (each waiter then tries its own).
#[derive(Debug, Default)]
struct DirSyncs {
    /// By directory `(st_dev, st_ino)`; an entry lives while callers use it.
    dirs: Mutex<HashMap<(u64, u64), Arc<DirSync>>>,
    /// fsyncs actually issued (for tests).
    issued: AtomicU64,
    /// fsyncs still to fail with `EIO` (for tests).
    #[cfg(test)]
    failing: AtomicU64,
}

#[derive(Debug, Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    done: parking_lot::Condvar,
}

#[derive(Debug, Default)]
struct DirSyncState {
    /// Tickets handed out (renames finished and waiting for a sync).
    taken: u64,
    /// Every ticket up to this one is covered by a successful fsync.
    synced: u64,
    syncing: bool,
}

impl DirSyncs {
    /// Returns once an fsync of `dir` that started after this call did
    /// succeed (or with the error of the one this caller ran itself).
    fn sync(&self, dir: &OwnedFd) -> Result<(), Errno> {
        let st = nix::sys::stat::fstat(dir)?;
        #[allow(clippy::useless_conversion)] // the field types differ by target
        let key = (u64::from(st.st_dev), u64::from(st.st_ino));
        let entry = self.dirs.lock().entry(key).or_default().clone();
        let result = self.sync_entry(&entry, || {
            #[cfg(test)]
            if self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Errno::EIO);
            }
            nix::unistd::fsync(dir)
        });
        let mut dirs = self.dirs.lock();
        // Only the map and this caller hold it: nobody else can be waiting
        // on it (new callers take it from the map, under this lock).
        if Arc::strong_count(&entry) == 2 {
            dirs.remove(&key);
        }
        result
    }

    fn sync_entry(
        &self,
        entry: &DirSync,
        fsync: impl Fn() -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        let mut state = entry.state.lock();
        state.taken += 1;
        let ticket = state.taken;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if !state.syncing {
                state.syncing = true;
                let covers = state.taken;
                drop(state);
                self.issued.fetch_add(1, Ordering::Relaxed);
                let result = fsync();
                let mut state = entry.state.lock();
                state.syncing = false;
                if result.is_ok() {
                    state.synced = state.synced.max(covers);
                }
                entry.done.notify_all();
                return result;
            }
            entry.done.wait(&mut state);
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let held = self.hashing.get_mut().buffered_bytes;
        self.reorder.fetch_sub(held, Ordering::Relaxed);
        // Dropped without a verdict: a pair on disk stays resumable and
        // counted, as if suspended (without the chunks not yet recorded).
        // Without a record its data file is no pair: an anonymous one is
        // gone with its descriptor, a named one is swept at start-up.
        if !*self.settled.get_mut() {
            let accounted = *self.accounted.get_mut();
            // Chunks written since the last record are asked for again on
            // a resume (and counted again as they are rewritten): the pair
            // keeps the count of what its record lists.
            let unrecorded: u64 = {
                let recorded = self.recorded.get_mut();
                self.landed
                    .get_mut()
                    .iter()
                    .filter(|h| !recorded.contains(*h))
                    .filter_map(|h| {
                        let at = self.positions.get(h)?;
                        let len = self.manifest.chunks.get(*at.first()?)?.len;
                        Some(u64::from(len) * at.len() as u64)
                    })
                    .sum()
            };
            let (kept, released) = if *self.record_exists.get_mut() {
                let kept = accounted.saturating_sub(unrecorded);
                (Some(kept), accounted - kept)
            } else {
                (None, accounted)
            };
            if let Some(kept) = kept {
                self.parked.lock().insert(self.key.clone(), kept);
            }
            let _ = self
                .used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                    Some(u.saturating_sub(released))
                });
        }
    }
}

/// Result of a start-up scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub files: u64,
    pub chunks_in_store: u64,
    pub staging_swept: u64,
    pub used_bytes: u64,
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits)
}

fn dir_flags() -> OFlag {
    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl ClientStore {
    /// Opens (creating if needed) `root` for `client`, sweeps staging
    /// leftovers, and rebuilds the chunk index and usage. `used` receives the
    /// client's byte usage and is kept current by every operation.
    pub fn open(
        client: ClientName,
        root: &Path,
        keep_versions: bool,
        used: Arc<AtomicU64>,
    ) -> Result<(Self, OpenReport), StoreError> {
        let err_client = client.clone();
        let io_at = |path: &Path| {
            let client = err_client.clone();
            let path = path.display().to_string();
            move |source: io::Error| StoreError::Io {
                client,
                path,
                source,
            }
        };
        crate::fsutil::ensure_dir(root, DIR_MODE).map_err(io_at(root))?;
        let root_fd = nix::fcntl::open(root, dir_flags(), Mode::empty())
            .map_err(|e| io_at(root)(errno_io(e)))?;
        // The internal directories, created (safely, below the root) by a
        // first store on the same descriptor.
        let (staging_fd, manifests_fd) = {
            let bootstrap = Self {
                client: client.clone(),
                root: root.to_path_buf(),
                root_fd: root_fd.try_clone().map_err(io_at(root))?,
                keep_versions,
                used: Arc::default(),
                state: Mutex::new(State::default()),
                staging_seq: AtomicU64::new(0),
                active: Mutex::new(HashMap::new()),
                suspended: Arc::default(),
                reorder: Arc::default(),
                staging_fd: root_fd.try_clone().map_err(io_at(root))?,
                manifests_fd: root_fd.try_clone().map_err(io_at(root))?,
                dir_syncs: DirSyncs::default(),
                commit_turns: PathTurns::default(),
                tmpfile: std::sync::atomic::AtomicBool::new(false),
            };
            let staging_fd = bootstrap.open_internal_dir(STAGING_DIR_NAME, true)?;
            bootstrap.open_internal_dir(METADATA_DIR_NAME, true)?;
            bootstrap.open_internal_dir(&format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}"), true)?;
            let manifests_fd = bootstrap
                .open_internal_dir(&format!("{METADATA_DIR_NAME}/{MANIFESTS_DIR}"), true)?;
            (staging_fd, manifests_fd)
        };
        let store = Self {
            client,
            root: root.to_path_buf(),
            root_fd,
            keep_versions,
            used,
            state: Mutex::new(State::default()),
            staging_seq: AtomicU64::new(0),
            active: Mutex::new(HashMap::new()),
            suspended: Arc::default(),
            reorder: Arc::default(),
            staging_fd,
            manifests_fd,
            dir_syncs: DirSyncs::default(),
            commit_turns: PathTurns::default(),
            tmpfile: std::sync::atomic::AtomicBool::new(false),
        };
        let mut report = OpenReport::default();
        // 1. Sweep staging. Kept: resumable pairs `<key>.data` +
        // `<key>.landed` (an interrupted upload the client may resume)
        // younger than STAGING_MAX_AGE. Everything else is an assembly that
        // can never complete and goes. Kept data files count as usage.
        let staging = root.join(STAGING_DIR_NAME);
        let names: Vec<String> = std::fs::read_dir(&staging)
            .map_err(io_at(&staging))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .collect();
        let is_key = |k: &str| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit());
        let regular = |name: &str| {
            std::fs::symlink_metadata(staging.join(name))
                .ok()
                .filter(std::fs::Metadata::is_file)
        };
        let now = SystemTime::now();
        let mut staged_used = 0u64;
        let mut kept = 0u64;
        for name in &names {
            let keep = match name.rsplit_once('.') {
                Some((key, suffix)) if is_key(key) => {
                    let data = regular(&format!("{key}.{DATA_SUFFIX}"));
                    let record = regular(&format!("{key}.{RECORD_SUFFIX}"));
                    let fresh = record
                        .as_ref()
                        .and_then(|m| m.modified().ok())
                        .is_some_and(|t| {
                            now.duration_since(t).unwrap_or_default() < STAGING_MAX_AGE
                        });
                    match (suffix, data, record) {
                        (DATA_SUFFIX, Some(d), Some(_)) if fresh => {
                            let counted = d.blocks().saturating_mul(512);
                            staged_used += counted;
                            kept += 1;
                            store.suspended.lock().insert(key.to_owned(), counted);
                            true
                        }
                        (RECORD_SUFFIX, Some(_), Some(_)) => fresh,
                        _ => false,
                    }
                }
                _ => false,
            };
            if keep {
                continue;
            }
            let path = staging.join(name);
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let removed = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => report.staging_swept += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        if report.staging_swept > 0 {
            crate::fsutil::fsync_dir(&staging).map_err(io_at(&staging))?;
            tracing::info!(client = %store.client, swept = report.staging_swept, "swept staging leftovers");
        }
        if kept > 0 {
            tracing::info!(client = %store.client, uploads = kept, bytes = staged_used, "kept resumable staged uploads");
        }
        store.tmpfile.store(store.probe_tmpfile(), Ordering::SeqCst);
        // 2. Chunk store: index chunks; drop temporaries and damaged names.
        let mut state = State::default();
        let mut used = staged_used;
        let chunks = root.join(METADATA_DIR_NAME).join(CHUNKS_DIR);
        for shard in std::fs::read_dir(&chunks).map_err(io_at(&chunks))? {
            let shard = shard.map_err(io_at(&chunks))?;
            if !shard.file_type().map_err(io_at(&chunks))?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(shard.path()).map_err(io_at(&shard.path()))? {
                let entry = entry.map_err(io_at(&shard.path()))?;
                let path = entry.path();
                let name = entry.file_name();
                let parsed = name.to_str().and_then(Hash::from_hex);
                let meta = entry.metadata().map_err(io_at(&path))?;
                match parsed {
                    Some(hash) if meta.is_file() && meta.len() <= u64::from(u32::MAX) => {
                        let len = u32::try_from(meta.len()).unwrap_or(u32::MAX);
                        state.index.insert(hash, ChunkSource::Store { len });
                        used += meta.len();
                        report.chunks_in_store += 1;
                    }
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        // 3. Documents: count, index their chunks from the manifests.
        let mut docs = Vec::new();
        store.walk(None, &mut docs)?;
        for (rel, size) in docs {
            used += size;
            state.files += 1;
            let stored = store
                .open_document(&rel)
                .and_then(|file| store.read_manifest(&file, &rel));
            if let Ok(Some(manifest)) = stored {
                for c in &manifest.chunks {
                    state.index.entry(c.hash).or_insert(ChunkSource::Document {
                        path: rel.clone(),
                        offset: c.offset,
                        len: c.len,
                    });
                }
            }
        }
        used += store.version_bytes()?;
        report.files = state.files;
        report.used_bytes = used;
        store.used.store(used, Ordering::SeqCst);
        *store.state.lock() = state;
        Ok((store, report))
    }

    /// The client this store belongs to.
    pub fn client(&self) -> &ClientName {
        &self.client
    }

    /// The client's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes used by the client (documents, kept versions, chunk store).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Number of documents.
    pub fn files(&self) -> u64 {
        self.state.lock().files
    }

    /// Number of chunks waiting in the chunk store (not yet in a document).
    pub fn chunks_in_store(&self) -> usize {
        self.state
            .lock()
            .index
            .values()
            .filter(|s| matches!(s, ChunkSource::Store { .. }))
            .count()
    }

    /// Whether the bytes of `hash` are available (chunk store or document).
    pub fn has_chunk(&self, hash: &Hash) -> bool {
        self.state.lock().index.contains_key(hash)
    }

    /// The size of the document at `path`, if there is one.
    pub fn existing_size(&self, path: &RelPath) -> Option<u64> {
        let (parent, name) = self.open_parent(path, false).ok()?;
        let st = fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        (SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG)
            .then(|| u64::try_from(st.st_size).unwrap_or(0))
    }

    /// The stored manifest of `path` if it matches the document now there.
    pub fn current_manifest(&self, path: &RelPath) -> Option<Manifest> {
        self.document_manifest(path).ok()
    }

    fn err_io(&self, path: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let path = path.into();
        move |source| {
            if is_enospc(&source) {
                StoreError::DiskFull {
                    client: self.client.clone(),
                    path,
                }
            } else {
                StoreError::Io {
                    client: self.client.clone(),
                    path,
                    source,
                }
            }
        }
    }

    fn err_errno(&self, path: impl Into<String>, e: Errno) -> StoreError {
        let path = path.into();
        match e {
            Errno::ELOOP => StoreError::Symlink {
                client: self.client.clone(),
                path,
            },
            Errno::ENOENT => StoreError::NotFound {
                client: self.client.clone(),
                path,
            },
            Errno::ENOTDIR => StoreError::WrongType {
                client: self.client.clone(),
                path,
            },
            other => self.err_io(path)(errno_io(other)),
        }
    }

    /// Opens a directory below the root by walking `components` with
    /// `O_NOFOLLOW`, creating missing ones if `create`.
    fn open_dir_walk<'a>(
        &self,
        components: impl Iterator<Item = &'a str>,
        create: bool,
        shown: &str,
    ) -> Result<OwnedFd, StoreError> {
        let mut fd = self
            .root_fd
            .try_clone()
            .map_err(self.err_io(shown.to_owned()))?;
        for component in components {
            if create {
                match mkdirat(&fd, component, mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(self.err_errno(shown, e)),
                }
            }
            fd = match openat(&fd, component, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                // O_NOFOLLOW|O_DIRECTORY on a symlink gives ELOOP or ENOTDIR
                // depending on the kernel; tell the two apart.
                Err(Errno::ENOTDIR) | Err(Errno::ELOOP) if self.is_symlink_at(&fd, component) => {
                    return Err(StoreError::Symlink {
                        client: self.client.clone(),
                        path: shown.to_owned(),
                    })
                }
                Err(e) => return Err(self.err_errno(shown, e)),
            };
        }
        Ok(fd)
    }

    fn is_symlink_at(&self, dir: &OwnedFd, name: &str) -> bool {
        fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
    }

    fn open_internal_dir(&self, rel: &str, create: bool) -> Result<OwnedFd, StoreError> {
        self.open_dir_walk(rel.split('/'), create, rel)
    }

    /// The parent directory of `path` (walked safely) and the last component.
    fn open_parent<'p>(
        &self,
        path: &'p RelPath,
        create: bool,
    ) -> Result<(OwnedFd, &'p str), StoreError> {
        let components: Vec<&str> = path.components().collect();
        let (name, parents) = components
            .split_last()
            .ok_or_else(|| StoreError::NotFound {
                client: self.client.clone(),
                path: path.to_string(),
            })?;
        let fd = self.open_dir_walk(parents.iter().copied(), create, path.as_str())?;
        Ok((fd, name))
    }

    fn open_file_at(
        &self,
        dir: &OwnedFd,
        name: &str,
        flags: OFlag,
        file_mode: u32,
        shown: &str,
    ) -> Result<File, StoreError> {
        match openat(
            dir,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            mode(file_mode),
        ) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::ELOOP) => Err(StoreError::Symlink {
                client: self.client.clone(),
                path: shown.to_owned(),
            }),
            Err(e) => Err(self.err_errno(shown, e)),
        }
    }

    /// Opens a document for reading, refusing symlinks and non-files.
    pub fn open_document(&self, path: &RelPath) -> Result<File, StoreError> {
        let (parent, name) = self.open_parent(path, false)?;
        let file = self.open_file_at(&parent, name, OFlag::O_RDONLY, 0, path.as_str())?;
        let meta = file.metadata().map_err(self.err_io(path.as_str()))?;
        if !meta.is_file() {
            return Err(StoreError::WrongType {
                client: self.client.clone(),
                path: path.to_string(),
            });
        }
        Ok(file)
    }

    fn chunk_name(hash: &Hash) -> (String, String) {
        let hex = hash.to_string();
        (hex[..2].to_owned(), hex)
    }

    /// Stores a verified chunk durably (file fsynced before its rename, so
    /// a chunk that exists after a crash has its full content). The caller
    /// has checked the hash; it is checked again here because the store
    /// trusts nothing it did not hash itself.
    pub fn write_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        if Hash::of(data) != *hash {
            return Err(StoreError::ChunkChanged {
                client: self.client.clone(),
                hash: *hash,
            });
        }
        if self.has_chunk(hash) {
            return Ok(());
        }
        let len = u32::try_from(data.len()).map_err(|_| {
            self.err_io(hash.to_string())(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk too large",
            ))
        })?;
        let (shard, hex) = Self::chunk_name(hash);
        let shown = format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}/{shard}/{hex}");
        let dir =
            self.open_internal_dir(&format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}/{shard}"), true)?;
        let seq = self.staging_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("{hex}.tmp{seq}");
        let result = (|| {
            let mut file = self.open_file_at(
                &dir,
                &tmp,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                FILE_MODE,
                &shown,
            )?;
            file.write_all(data).map_err(self.err_io(shown.clone()))?;
            file.sync_data().map_err(self.err_io(shown.clone()))?;
            renameat(&dir, tmp.as_str(), &dir, hex.as_str())
                .map_err(|e| self.err_errno(shown.clone(), e))
        })();
        if let Err(e) = result {
            let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        let mut state = self.state.lock();
        if !state.index.contains_key(hash) {
            state.index.insert(*hash, ChunkSource::Store { len });
            self.used.fetch_add(u64::from(len), Ordering::SeqCst);
        }
        Ok(())
    }

    /// Reads and verifies the bytes of a chunk from wherever the index says.
    fn read_chunk(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        let source = self.state.lock().index.get(hash).cloned();
        let data = match source {
            None => {
                return Err(StoreError::MissingChunk {
                    client: self.client.clone(),
                    hash: *hash,
                })
            }
            Some(ChunkSource::Store { len }) => {
                let (shard, hex) = Self::chunk_name(hash);
                let dir = self.open_internal_dir(
                    &format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}/{shard}"),
                    false,
                )?;
                let mut file = self.open_file_at(&dir, &hex, OFlag::O_RDONLY, 0, &hex)?;
                let mut data = Vec::with_capacity(len as usize);
                file.read_to_end(&mut data).map_err(self.err_io(hex))?;
                data
            }
            Some(ChunkSource::Document { path, offset, len }) => {
                let mut data = vec![0u8; len as usize];
                let read = self.open_document(&path).and_then(|f| {
                    f.read_exact_at(&mut data, offset)
                        .map_err(self.err_io(path.as_str()))
                });
                match read {
                    Ok(()) => data,
                    Err(_) => Vec::new(), // fails verification below
                }
            }
        };
        if Hash::of(&data) != *hash {
            self.drop_chunk(hash);
            return Err(StoreError::ChunkChanged {
                client: self.client.clone(),
                hash: *hash,
            });
        }
        Ok(data)
    }

    /// Forgets a chunk (and deletes it from the chunk store if it is there).
    fn drop_chunk(&self, hash: &Hash) {
        let removed = self.state.lock().index.remove(hash);
        if let Some(ChunkSource::Store { len }) = removed {
            let (shard, hex) = Self::chunk_name(hash);
            if let Ok(dir) =
                self.open_internal_dir(&format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}/{shard}"), false)
            {
                if unlinkat(&dir, hex.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                    self.used.fetch_sub(u64::from(len), Ordering::SeqCst);
                }
            }
        }
    }

    /// Assembles, verifies and commits `manifest` from chunks the index
    /// already has (chunk store or documents): [`Self::stage`] then
    /// [`Self::commit_staged`]. On any error the staging file is removed
    /// (unless chunks went missing: then what landed is kept for a retry)
    /// and the document tree is unchanged.
    pub fn assemble(&self, manifest: &ValidManifest) -> Result<(), StoreError> {
        let staged = self.stage(manifest)?;
        let result = self.commit_staged(&staged);
        if result.is_err() {
            self.suspend_staged(&staged, true);
        }
        result
    }

    /// An upload's key: its path's tag ([`Self::path_tag`], 16 hex digits)
    /// and the first 48 hex digits of [`Self::content_key`], so the pairs
    /// left for one path are found by their names.
    fn staging_key(manifest: &ValidManifest) -> String {
        let mut key = Self::path_tag(&manifest.path);
        key.push_str(&Self::content_key(manifest)[..48]);
        key
    }

    /// The first 16 hex digits of a hash of `path`.
    fn path_tag(path: &RelPath) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"appliance-sync staging path\0");
        h.update(path.as_str().as_bytes());
        h.finalize().to_hex()[..16].to_owned()
    }

    /// A hash of the path, size, file hash and chunk list: an upload's whole
    /// key before keys began with their path's tag (see [`Self::adopt_untagged`]).
    fn content_key(manifest: &ValidManifest) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"appliance-sync staging v1\0");
        h.update(manifest.path.as_str().as_bytes());
        h.update(b"\0");
        h.update(&manifest.size.to_le_bytes());
        h.update(manifest.file_hash.as_bytes());
        for c in &manifest.chunks {
            h.update(&c.offset.to_le_bytes());
            h.update(&c.len.to_le_bytes());
            h.update(c.hash.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    /// Opens the staging state of an upload of `manifest`: the upload-keyed
    /// staging file `<key>.data` and its durable record `<key>.landed` if an
    /// earlier attempt left them (the key is a hash of the path, size, file
    /// hash and chunk list, so only the very same upload resumes). Creates
    /// nothing: files appear with the first chunk. If the same upload is
    /// still running (its client reconnected before the old connection
    /// timed out), both share one state: they write the same verified bytes
    /// at the same offsets; the first commit puts it in place and the
    /// other's commit then succeeds with nothing left to do.
    pub fn stage(&self, manifest: &ValidManifest) -> Result<Arc<Staged>, StoreError> {
        let key = Self::staging_key(manifest);
        let since = std::time::Instant::now();
        let mut active = loop {
            let active = self.active.lock();
            match active.get(&key).and_then(std::sync::Weak::upgrade) {
                Some(running) if !running.settled.load(Ordering::SeqCst) => {
                    running.users.fetch_add(1, Ordering::SeqCst);
                    return Ok(running);
                }
                // Being committed, suspended or discarded: its files are
                // in flux until it leaves `active` (a suspend records what
                // landed, then parks the pair), so wait for that.
                Some(_) if since.elapsed() < SETTLE_WAIT => {
                    drop(active);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Some(_) => {
                    tracing::warn!(client = %self.client, key = %key, "an upload's staging state is still settling; starting over beside it");
                    break active;
                }
                None => break active,
            }
        };
        let mut positions: HashMap<Hash, Vec<usize>> = HashMap::new();
        for (i, c) in manifest.chunks.iter().enumerate() {
            positions.entry(c.hash).or_default().push(i);
        }
        let staged = Staged {
            name: key.clone(),
            key: key.clone(),
            manifest: manifest.clone(),
            positions,
            landed: Mutex::new(HashSet::new()),
            recorded: Mutex::new(HashSet::new()),
            file: parking_lot::RwLock::new(None),
            record: Mutex::new(None),
            record_exists: std::sync::atomic::AtomicBool::new(false),
            anonymous: std::sync::atomic::AtomicBool::new(false),
            batch: Mutex::new(Vec::new()),
            batch_bytes: AtomicU64::new(0),
            flush: Mutex::new(()),
            hashing: Mutex::new(Hashing::default()),
            reorder: self.reorder.clone(),
            parked: self.suspended.clone(),
            used: self.used.clone(),
            accounted: AtomicU64::new(0),
            settled: std::sync::atomic::AtomicBool::new(false),
            committed: std::sync::atomic::AtomicBool::new(false),
            users: std::sync::atomic::AtomicUsize::new(1),
        };
        self.adopt_untagged(&staged);
        self.load_staged(&staged)?;
        let staged = Arc::new(staged);
        active.insert(key, Arc::downgrade(&staged));
        Ok(staged)
    }

    /// Renames a resumable pair kept under its untagged key (left by a
    /// daemon from before keys began with their path's tag) to the upload's
    /// key, so an upgrade does not lose an interrupted upload's progress.
    /// Called with `active` held.
    fn adopt_untagged(&self, staged: &Staged) {
        let old = Self::content_key(&staged.manifest);
        let mut suspended = self.suspended.lock();
        if suspended.contains_key(&staged.key) {
            return;
        }
        let Some(counted) = suspended.remove(&old) else {
            return;
        };
        let dir = &self.staging_fd;
        let name = |key: &str, suffix: &str| format!("{key}.{suffix}");
        let new = &staged.key;
        let moved = renameat(
            dir,
            name(&old, RECORD_SUFFIX).as_str(),
            dir,
            name(new, RECORD_SUFFIX).as_str(),
        )
        .and_then(|()| {
            renameat(
                dir,
                name(&old, DATA_SUFFIX).as_str(),
                dir,
                name(new, DATA_SUFFIX).as_str(),
            )
            .inspect_err(|_| {
                // Put the record back with its data file; failing that,
                // the pair is no pair any more and goes (below).
                if renameat(
                    dir,
                    name(new, RECORD_SUFFIX).as_str(),
                    dir,
                    name(&old, RECORD_SUFFIX).as_str(),
                )
                .is_err()
                {
                    let _ = unlinkat(
                        dir,
                        name(new, RECORD_SUFFIX).as_str(),
                        UnlinkatFlags::NoRemoveDir,
                    );
                }
            })
        });
        match moved {
            Ok(()) => {
                suspended.insert(new.clone(), counted);
            }
            Err(e) => {
                tracing::warn!(client = %self.client, error = %e, key = %old, "cannot rename a staged upload to its new key; it starts over");
                let intact = [RECORD_SUFFIX, DATA_SUFFIX].iter().all(|suffix| {
                    fstatat(
                        dir,
                        name(&old, suffix).as_str(),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .is_ok()
                });
                if intact {
                    suspended.insert(old, counted);
                } else {
                    for suffix in [RECORD_SUFFIX, DATA_SUFFIX] {
                        let _ =
                            unlinkat(dir, name(&old, suffix).as_str(), UnlinkatFlags::NoRemoveDir);
                    }
                    self.sub_used(counted);
                }
            }
        }
    }

    /// Reads a previous attempt's record: only chunks it lists (durable in
    /// the data file before they were recorded) count as landed.
    /// Called with `active` held.
    fn load_staged(&self, staged: &Staged) -> Result<(), StoreError> {
        // What of the pair is counted in `used` (none if no upload left it).
        let counted = self.suspended.lock().remove(&staged.key);
        let keep_counted = |counted: Option<u64>| {
            if let Some(c) = counted {
                self.suspended.lock().insert(staged.key.clone(), c);
            }
        };
        let dir = &self.staging_fd;
        let record_name = format!("{}.{RECORD_SUFFIX}", staged.name);
        let data_name = format!("{}.{DATA_SUFFIX}", staged.name);
        let mut record =
            match self.open_file_at(dir, &record_name, OFlag::O_RDONLY, 0, &record_name) {
                Ok(f) => f,
                Err(StoreError::NotFound { .. }) => {
                    self.sub_used(counted.unwrap_or(0));
                    return Ok(());
                }
                Err(e) => {
                    keep_counted(counted);
                    return Err(e);
                }
            };
        let file = match self.open_file_at(dir, &data_name, OFlag::O_RDWR, 0, &data_name) {
            Ok(f) => f,
            Err(StoreError::NotFound { .. }) => {
                let _ = unlinkat(dir, record_name.as_str(), UnlinkatFlags::NoRemoveDir);
                self.sub_used(counted.unwrap_or(0));
                return Ok(());
            }
            Err(e) => {
                keep_counted(counted);
                return Err(e);
            }
        };
        staged.record_exists.store(true, Ordering::SeqCst);
        let mut bytes = Vec::new();
        if let Err(e) = record.read_to_end(&mut bytes) {
            keep_counted(counted);
            return Err(self.err_io(record_name)(e));
        }
        let lengths: HashMap<Hash, u32> = staged
            .manifest
            .chunks
            .iter()
            .map(|c| (c.hash, c.len))
            .collect();
        let mut landed = staged.landed.lock();
        for entry in bytes.chunks_exact(RECORD_ENTRY) {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&entry[..32]);
            let mut len = [0u8; 4];
            len.copy_from_slice(&entry[32..]);
            let hash = Hash(hash);
            if lengths.get(&hash) == Some(&u32::from_le_bytes(len)) {
                landed.insert(hash);
            }
        }
        *staged.recorded.lock() = landed.clone();
        drop(landed);
        let counted = match counted {
            Some(c) => c,
            // Found by this upload while the one that left it was still
            // being suspended (see [`Self::park`]): counted here.
            None => {
                let on_disk = file
                    .metadata()
                    .map_err(self.err_io(data_name))?
                    .blocks()
                    .saturating_mul(512);
                self.used.fetch_add(on_disk, Ordering::SeqCst);
                on_disk
            }
        };
        staged.accounted.store(counted, Ordering::SeqCst);
        *staged.file.write() = Some(Arc::new(file));
        Ok(())
    }

    /// An anonymous staging file (`O_TMPFILE` in the staging directory), or
    /// `None` if the file system does not make them (then staging files
    /// are created with their names). An anonymous file costs no entry in
    /// the staging directory: creating one does not lock that directory
    /// (the named creates of concurrent uploads serialised on it, spinning,
    /// for the whole inode allocation), fsyncing it does not write that
    /// directory, and a new document is linked straight into its own
    /// directory instead of renamed across from staging. A failed upload
    /// leaves nothing to delete.
    fn create_anonymous(&self, shown: &str) -> Result<Option<File>, StoreError> {
        if !self.tmpfile.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match openat(
            &self.staging_fd,
            ".",
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            mode(FILE_MODE),
        ) {
            Ok(fd) => Ok(Some(File::from(fd))),
            // No O_TMPFILE here (EISDIR: a kernel that predates it).
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {
                self.tmpfile.store(false, Ordering::SeqCst);
                Ok(None)
            }
            Err(e) => Err(self.err_errno(shown, e)),
        }
    }

    /// Gives the open, anonymous `file` the name `name` in `dir`: by its
    /// descriptor (`AT_EMPTY_PATH`, which needs `CAP_DAC_READ_SEARCH`), or
    /// else through `/proc/self/fd`.
    fn link_anonymous(file: &File, dir: &OwnedFd, name: &str) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        match nix::unistd::linkat(file, "", dir, name, nix::fcntl::AtFlags::AT_EMPTY_PATH) {
            Err(Errno::ENOENT | Errno::EPERM | Errno::EACCES | Errno::EINVAL) => {
                let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    proc.as_str(),
                    dir,
                    name,
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                )
            }
            other => other,
        }
    }

    /// Whether anonymous staging files can be made and named here (see
    /// [`Self::create_anonymous`]); a name that cannot be given would fail
    /// every commit, so this is tried once with a probe file.
    fn probe_tmpfile(&self) -> bool {
        const PROBE: &str = "probe.tmpfile";
        if is_zfs(&self.staging_fd) {
            // ZFS does not log the link of an O_TMPFILE file in its intent
            // log: `zfs_link` waits for the whole transaction group to sync
            // (OpenZFS zfs_vnops_os.c), tens of milliseconds to seconds
            // under write load, where renaming a named file is one ZIL
            // commit. The appliance's documents live on ZFS.
            tracing::info!(client = %self.client, "staging on ZFS: using named staging files");
            return false;
        }
        let Ok(fd) = openat(
            &self.staging_fd,
            ".",
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            mode(FILE_MODE),
        ) else {
            return false;
        };
        let file = File::from(fd);
        let _ = unlinkat(&self.staging_fd, PROBE, UnlinkatFlags::NoRemoveDir);
        let linked = Self::link_anonymous(&file, &self.staging_fd, PROBE).is_ok();
        let _ = unlinkat(&self.staging_fd, PROBE, UnlinkatFlags::NoRemoveDir);
        if !linked {
            tracing::info!(client = %self.client, "anonymous staging files cannot be linked; using named ones");
        }
        linked
    }

    /// Names an anonymous staging file `<key>.data` (before its first
    /// record, or before a commit that renames it over a document). A
    /// leftover of that name belongs to no running upload (one state per
    /// key) and is replaced. The caller holds `staged.file`'s lock.
    fn name_staged(&self, staged: &Staged, file: &File) -> Result<(), StoreError> {
        if !staged.anonymous.load(Ordering::SeqCst) {
            return Ok(());
        }
        let name = format!("{}.{DATA_SUFFIX}", staged.name);
        let shown = format!("{STAGING_DIR_NAME}/{name}");
        let mut linked = Self::link_anonymous(file, &self.staging_fd, &name);
        if linked == Err(Errno::EEXIST) {
            let _ = unlinkat(&self.staging_fd, name.as_str(), UnlinkatFlags::NoRemoveDir);
            linked = Self::link_anonymous(file, &self.staging_fd, &name);
        }
        linked.map_err(|e| self.err_errno(shown, e))?;
        staged.anonymous.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Runs `f` on the staging file (created on first use) while holding
    /// it shared, so a commit cannot rename it away in the middle.
    fn with_staged_file<T>(
        &self,
        staged: &Staged,
        f: impl FnOnce(&File) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let ended = || self.ended(staged);
        {
            let slot = staged.file.read();
            if staged.settled.load(Ordering::SeqCst) {
                return Err(ended());
            }
            if let Some(file) = slot.as_ref() {
                return f(file);
            }
        }
        let mut slot = staged.file.write();
        if staged.settled.load(Ordering::SeqCst) {
            return Err(ended());
        }
        if slot.is_none() {
            let name = format!("{}.{DATA_SUFFIX}", staged.name);
            let shown = format!("{STAGING_DIR_NAME}/{name}");
            let file = match self.create_anonymous(&shown)? {
                Some(file) => {
                    staged.anonymous.store(true, Ordering::SeqCst);
                    file
                }
                None => self.open_file_at(
                    &self.staging_fd,
                    &name,
                    OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_TRUNC,
                    FILE_MODE,
                    &shown,
                )?,
            };
            *slot = Some(Arc::new(file));
        }
        let slot = parking_lot::RwLockWriteGuard::downgrade(slot);
        match slot.as_ref() {
            Some(file) => f(file),
            None => Err(ended()),
        }
    }

    /// Writes a verified chunk once, at every offset where the manifest has
    /// it (`pwrite`), and feeds the in-order whole-file hasher. The caller
    /// (the protocol machine) has verified the hash. Every
    /// [`STAGING_SYNC_BYTES`] the data file is fdatasynced and the chunks
    /// written since are appended to the durable record.
    pub fn write_staged(
        &self,
        staged: &Staged,
        hash: &Hash,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let Some(positions) = staged.positions.get(hash) else {
            return Err(StoreError::MissingChunk {
                client: self.client.clone(),
                hash: *hash,
            });
        };
        if staged.landed.lock().contains(hash) {
            return Ok(());
        }
        let shown = format!("{STAGING_DIR_NAME}/{}.{DATA_SUFFIX}", staged.name);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let written = self.with_staged_file(staged, |file| {
            for &i in positions {
                let offset = staged.manifest.chunks[i].offset;
                file.write_all_at(&data, offset)
                    .map_err(self.err_io(shown.clone()))?;
            }
            // Counted under the file's hold, so a discard taking the file
            // afterwards gives back these bytes too.
            self.account_staged(staged, u64::from(len) * positions.len() as u64);
            Ok(())
        });
        match written {
            // The other upload sharing the state landed this chunk after
            // the check above and settled the state since (its commit, which
            // needs every chunk): nothing is missing. This upload's own
            // commit finds the document committed, or the state ended.
            Err(StoreError::Ended { .. }) if staged.landed.lock().contains(hash) => {
                tracing::debug!(client = %self.client, path = %staged.manifest.path, chunk = %hash, "chunk landed by the other upload sharing the staged state, since settled");
                return Ok(());
            }
            r => r?,
        }
        staged.landed.lock().insert(*hash);
        staged.feed(positions, &Arc::new(data));
        staged.batch.lock().push((*hash, len));
        let pending = staged
            .batch_bytes
            .fetch_add(u64::from(len), Ordering::SeqCst);
        if pending + u64::from(len) >= STAGING_SYNC_BYTES {
            self.flush_staged(staged)?;
        }
        Ok(())
    }

    /// Makes the chunks written so far durable and records them.
    fn flush_staged(&self, staged: &Staged) -> Result<(), StoreError> {
        let _flushing = staged.flush.lock();
        let entries = std::mem::take(&mut *staged.batch.lock());
        staged.batch_bytes.store(0, Ordering::SeqCst);
        if entries.is_empty() {
            return Ok(());
        }
        let Some(file) = staged.file.read().clone() else {
            return Ok(());
        };
        let name = format!("{}.{RECORD_SUFFIX}", staged.name);
        let shown = format!("{STAGING_DIR_NAME}/{name}");
        file.sync_data().map_err(self.err_io(shown.clone()))?;
        let mut record = staged.record.lock();
        let fresh = record.is_none();
        if fresh {
            // The record will list chunks of `<key>.data`: the data file
            // needs that name first. Under the file's lock, so a commit
            // cannot be linking it elsewhere meanwhile; a file a commit or
            // a discard has already taken away needs no record.
            let slot = staged.file.read();
            let Some(current) = slot.as_ref() else {
                return Ok(());
            };
            self.name_staged(staged, current)?;
            drop(slot);
            let f = self.open_file_at(
                &self.staging_fd,
                &name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
                FILE_MODE,
                &shown,
            )?;
            *record = Some(f);
            staged.record_exists.store(true, Ordering::SeqCst);
        }
        let mut bytes = Vec::with_capacity(entries.len() * RECORD_ENTRY);
        for (hash, len) in &entries {
            bytes.extend_from_slice(hash.as_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
        }
        if let Some(f) = record.as_mut() {
            f.write_all(&bytes).map_err(self.err_io(shown.clone()))?;
            f.sync_data().map_err(self.err_io(shown.clone()))?;
        }
        staged
            .recorded
            .lock()
            .extend(entries.iter().map(|(h, _)| *h));
        if fresh {
            // The pair must survive a crash to be found again.
            nix::unistd::fsync(&self.staging_fd).map_err(|e| self.err_errno(shown, e))?;
        }
        Ok(())
    }

    /// An upload ended without a commit. With `keep` (the client may come
    /// back: connection lost, cancelled) what landed is made durable and
    /// recorded so the next push of the same file resumes; otherwise (disk
    /// full, a file that can never verify) the staging files are deleted.
    pub fn suspend_staged(&self, staged: &Staged, keep: bool) {
        // Another upload still uses it (unless this is a disk-full discard).
        let before = staged
            .users
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(1);
        if before > 1 && keep {
            return;
        }
        if staged.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        let keep = keep && !staged.landed.lock().is_empty();
        if keep {
            match self.flush_staged(staged) {
                Ok(()) => return self.park(staged),
                Err(e) => {
                    tracing::warn!(client = %self.client, error = %e, "cannot record staged chunks; dropping them");
                    self.discard_staged(staged);
                }
            }
        } else {
            self.discard_staged(staged);
        }
        self.release_key(staged);
    }

    /// Hands a suspended upload's pair, and the bytes of it counted in
    /// `used`, to [`Self::suspended`] (taking the file exclusively first, so
    /// no write still in flight counts more afterwards).
    fn park(&self, staged: &Staged) {
        let counted = {
            let _hold = staged.file.write();
            staged.accounted.swap(0, Ordering::SeqCst)
        };
        let mut active = self.active.lock();
        if remove_if_ours(&mut active, staged) {
            self.suspended.lock().insert(staged.key.clone(), counted);
        } else {
            // A new upload of the same file took the pair over meanwhile
            // and counted what it found itself.
            self.sub_used(counted);
        }
    }

    /// Removes the resumable pairs left for `path` by interrupted uploads
    /// of other content, once the path has been committed or deleted: they
    /// could only bring back what the client has since replaced, and they
    /// count against its quota until they age out (see [`STAGING_MAX_AGE`]).
    /// Pairs that an upload has open are not in [`Self::suspended`].
    fn sweep_superseded(&self, path: &RelPath) {
        let tag = Self::path_tag(path);
        let mut suspended = self.suspended.lock();
        let doomed: Vec<String> = suspended
            .keys()
            .filter(|k| k.starts_with(&tag))
            .cloned()
            .collect();
        let mut swept = 0u64;
        for key in doomed {
            let data = format!("{key}.{DATA_SUFFIX}");
            match unlinkat(&self.staging_fd, data.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => {
                    tracing::warn!(client = %self.client, error = %e, file = %data, "cannot remove a superseded staged upload");
                    continue;
                }
            }
            let _ = unlinkat(
                &self.staging_fd,
                format!("{key}.{RECORD_SUFFIX}").as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            if let Some(counted) = suspended.remove(&key) {
                self.sub_used(counted);
            }
            swept += 1;
        }
        if swept > 0 {
            tracing::info!(client = %self.client, path = %path, uploads = swept, "removed interrupted uploads of a path since replaced");
        }
    }

    fn ended(&self, staged: &Staged) -> StoreError {
        StoreError::Ended {
            client: self.client.clone(),
            path: staged.manifest.path.to_string(),
        }
    }

    fn release_key(&self, staged: &Staged) {
        remove_if_ours(&mut self.active.lock(), staged);
    }

    fn discard_staged(&self, staged: &Staged) {
        // Its pair, if parked meanwhile, goes with it.
        if let Some(counted) = self.suspended.lock().remove(&staged.key) {
            self.sub_used(counted);
        }
        for suffix in [DATA_SUFFIX, RECORD_SUFFIX] {
            let _ = unlinkat(
                &self.staging_fd,
                format!("{}.{suffix}", staged.name).as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
        *staged.file.write() = None;
        *staged.record.lock() = None;
        staged.landed.lock().clear();
        staged.recorded.lock().clear();
        let accounted = staged.accounted.swap(0, Ordering::SeqCst);
        self.sub_used(accounted);
    }

    /// Counts bytes written to `staged`'s file; called while holding the
    /// file (see [`Self::with_staged_file`]).
    fn account_staged(&self, staged: &Staged, bytes: u64) {
        staged.accounted.fetch_add(bytes, Ordering::SeqCst);
        self.used.fetch_add(bytes, Ordering::SeqCst);
    }

    fn sub_used(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// Completes a staged upload (see the module docs): copies the chunks
    /// that were already present elsewhere into the staging file, finishes
    /// the whole-file hash, compares it, sets the mtime, fsyncs, renames
    /// into place and fsyncs the directory.
    pub fn commit_staged(&self, staged: &Staged) -> Result<(), StoreError> {
        let result = self.commit_staged_inner(staged);
        match &result {
            Ok(()) => {
                self.release_key(staged);
                self.sweep_superseded(&staged.manifest.path);
            }
            // The index lost a chunk it promised: the state stays open and
            // the caller suspends it (keeping what landed); the client's
            // retry is asked for the rest.
            Err(StoreError::MissingChunk { .. } | StoreError::ChunkChanged { .. }) => {}
            // Settled by the other upload sharing it, which dealt with its
            // files (they may be another upload's by now).
            Err(StoreError::Ended { .. }) => {}
            // Anything else (a file that does not verify, a path that cannot
            // be written, a full disk): the staging file goes.
            Err(_) => {
                staged.settled.store(true, Ordering::SeqCst);
                self.discard_staged(staged);
                self.release_key(staged);
            }
        }
        result
    }

    fn commit_staged_inner(&self, staged: &Staged) -> Result<(), StoreError> {
        let manifest = &staged.manifest;
        let path = &manifest.path;
        let _turn = self.commit_turns.take(path);
        // Another upload sharing this state committed it while this one
        // waited for its turn: the document is in place.
        if staged.committed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // An identical document already in place: only the mtime may differ.
        if let Ok(current) = self.document_manifest(path) {
            if current.file_hash == manifest.file_hash && current.size == manifest.size {
                if current.mtime != manifest.mtime {
                    let file = self.open_document(path)?;
                    file.set_modified(system_time(manifest.mtime))
                        .map_err(self.err_io(path.as_str()))?;
                    self.store_manifest(&file, manifest)?;
                    file.sync_all().map_err(self.err_io(path.as_str()))?;
                }
                if staged.settled.swap(true, Ordering::SeqCst) {
                    // Discarded meanwhile (disk full for the other upload
                    // sharing it): its files may be another upload's now.
                    return Err(self.ended(staged));
                }
                staged.committed.store(true, Ordering::SeqCst);
                self.discard_staged(staged);
                self.release_store_chunks(manifest);
                return Ok(());
            }
        }
        // Chunks the index had (dedup) are copied from where they are.
        let missing: Vec<Hash> = staged
            .positions
            .keys()
            .filter(|h| !staged.landed.lock().contains(h))
            .copied()
            .collect();
        for hash in missing {
            let data = self.read_chunk(&hash)?;
            self.write_staged_no_batch(staged, &hash, data)?;
        }
        let data_name = format!("{}.{DATA_SUFFIX}", staged.name);
        let shown = format!("{STAGING_DIR_NAME}/{data_name}");
        // From here on nobody else writes: take the file exclusively.
        let file = self.with_staged_file(staged, |f| Ok(f.try_clone()))?;
        let file = file.map_err(self.err_io(shown.clone()))?;
        let mut exclusive = staged.file.write();
        if staged.settled.swap(true, Ordering::SeqCst) {
            // Suspended or discarded meanwhile (the other upload sharing it
            // ended): the file taken above is not to be committed.
            return Err(self.ended(staged));
        }
        file.set_len(manifest.size)
            .map_err(self.err_io(shown.clone()))?;
        let actual = staged
            .finish_hash(&file)
            .map_err(self.err_io(shown.clone()))?;
        if actual != manifest.file_hash {
            return Err(StoreError::FileHashMismatch {
                client: self.client.clone(),
                path: path.to_string(),
                expected: manifest.file_hash,
                actual,
            });
        }
        file.set_modified(system_time(manifest.mtime))
            .map_err(self.err_io(shown.clone()))?;
        // Before the fsync: an attribute manifest is durable with the data.
        self.store_manifest(&file, manifest)?;
        file.sync_all().map_err(self.err_io(shown))?;
        let staging = &self.staging_fd;
        let (parent, name) = self.open_parent(path, true)?;
        // What is in the way: a document (replaced, or kept as a version),
        // or something we must not clobber.
        let mut replaced = self.in_the_way(&parent, name, path)?;
        let mut linked = false;
        if replaced.is_none() && staged.anonymous.load(Ordering::SeqCst) {
            // A new document: the anonymous file is linked straight into
            // place (atomically: a name appears, complete).
            match Self::link_anonymous(&file, &parent, name) {
                Ok(()) => {
                    staged.anonymous.store(false, Ordering::SeqCst);
                    linked = true;
                }
                // A document appeared meanwhile (a concurrent upload of
                // the same path): replaced like any other.
                Err(Errno::EEXIST) => replaced = self.in_the_way(&parent, name, path)?,
                Err(e) => return Err(self.err_errno(path.as_str(), e)),
            }
        }
        if !linked {
            // Replacing a document: only a rename does that atomically.
            self.name_staged(staged, &file)?;
            let version = match (replaced, self.keep_versions) {
                // The current document gets a second name first, so the
                // rename below replaces it atomically: at every moment the
                // path holds the old document or the new one.
                (Some(_), true) => self.link_version(&parent, name, path)?,
                _ => None,
            };
            if let Err(e) = renameat(staging, data_name.as_str(), &parent, name) {
                // The old document stays; its second name would be a
                // duplicate version.
                if let Some(v) = version {
                    let _ = unlinkat(&parent, v.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                return Err(self.err_errno(path.as_str(), e));
            }
        }
        // Shared with the commits renaming into the same directory now.
        // If it fails the commit is not known to be durable and fails, but
        // the document is in place (the rename is done): it is counted as
        // such, so usage matches what is there.
        let synced = self
            .dir_syncs
            .sync(&parent)
            .map_err(|e| self.err_errno(path.as_str(), e));
        // The record is useless now; a copy that survives a crash has no
        // data file and is swept. Most uploads never wrote one.
        if staged.record_exists.load(Ordering::SeqCst) {
            let _ = unlinkat(
                staging,
                format!("{}.{RECORD_SUFFIX}", staged.name).as_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
        staged.committed.store(true, Ordering::SeqCst);
        // Cleared under the same hold: a flush of the record that got in
        // between would otherwise find the file and name it again.
        *exclusive = None;
        drop(exclusive);
        *staged.record.lock() = None;
        // The document counts its size; what the staging file counted goes.
        let accounted = staged.accounted.swap(0, Ordering::SeqCst);
        self.used.fetch_add(manifest.size, Ordering::SeqCst);
        self.sub_used(accounted);
        {
            let mut state = self.state.lock();
            match replaced {
                Some(old) => {
                    if !self.keep_versions {
                        self.sub_used(old);
                    }
                    // Index entries pointing into the replaced document are stale.
                    state.index.retain(
                        |_, s| !matches!(s, ChunkSource::Document { path: p, .. } if p == path),
                    );
                }
                None => state.files += 1,
            }
        }
        // Chunks now held by the document leave the chunk store, unless the
        // rename may not survive a crash.
        synced?;
        self.release_store_chunks(manifest);
        Ok(())
    }

    /// A symlink at `path` is refused as such, anything else that is not a
    /// regular file as the wrong type.
    fn require_regular(
        &self,
        st: &nix::sys::stat::FileStat,
        path: &RelPath,
    ) -> Result<(), StoreError> {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            return Err(StoreError::Symlink {
                client: self.client.clone(),
                path: path.to_string(),
            });
        }
        if kind != SFlag::S_IFREG {
            return Err(StoreError::WrongType {
                client: self.client.clone(),
                path: path.to_string(),
            });
        }
        Ok(())
    }

    /// The size of the document at `name` in `parent` that a commit of
    /// `path` would replace, if any; a symlink or a non-file there is
    /// refused.
    fn in_the_way(
        &self,
        parent: &OwnedFd,
        name: &str,
        path: &RelPath,
    ) -> Result<Option<u64>, StoreError> {
        match fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                self.require_regular(&st, path)?;
                Ok(Some(u64::try_from(st.st_size).unwrap_or(0)))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.err_errno(path.as_str(), e)),
        }
    }

    fn write_staged_no_batch(
        &self,
        staged: &Staged,
        hash: &Hash,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let Some(positions) = staged.positions.get(hash) else {
            return Ok(());
        };
        let shown = format!("{STAGING_DIR_NAME}/{}.{DATA_SUFFIX}", staged.name);
        self.with_staged_file(staged, |file| {
            for &i in positions {
                file.write_all_at(&data, staged.manifest.chunks[i].offset)
                    .map_err(self.err_io(shown.clone()))?;
            }
            self.account_staged(staged, data.len() as u64 * positions.len() as u64);
            Ok(())
        })?;
        staged.landed.lock().insert(*hash);
        staged.feed(positions, &Arc::new(data));
        Ok(())
    }

    /// After a commit: the document now holds these chunks, so the index
    /// points at it and the chunk-store copies are deleted.
    fn release_store_chunks(&self, manifest: &ValidManifest) {
        let mut released = Vec::new();
        {
            let mut state = self.state.lock();
            for c in &manifest.chunks {
                let previous = state.index.insert(
                    c.hash,
                    ChunkSource::Document {
                        path: manifest.path.clone(),
                        offset: c.offset,
                        len: c.len,
                    },
                );
                if let Some(ChunkSource::Store { len }) = previous {
                    released.push((c.hash, len));
                }
            }
        }
        for (hash, len) in released {
            let (shard, hex) = Self::chunk_name(&hash);
            if let Ok(dir) =
                self.open_internal_dir(&format!("{METADATA_DIR_NAME}/{CHUNKS_DIR}/{shard}"), false)
            {
                if unlinkat(&dir, hex.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                    self.used.fetch_sub(u64::from(len), Ordering::SeqCst);
                }
            }
        }
    }

    /// Links the document `name` in `dir` as its next version `name.~N~`
    /// (a hard link: the document stays where it is), and returns that name;
    /// `None` if the newest version already is this document (a replace
    /// that stopped between the link and its rename left it). A name taken
    /// meanwhile is skipped.
    fn link_version(
        &self,
        dir: &OwnedFd,
        name: &str,
        path: &RelPath,
    ) -> Result<Option<String>, StoreError> {
        let current = fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.err_errno(path.as_str(), e))?;
        for _ in 0..16 {
            let (version, newest) = self.next_version_name(dir, name)?;
            if let Some(newest) = newest {
                if fstatat(
                    dir,
                    newest.as_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .is_ok_and(|v| v.st_ino == current.st_ino && v.st_dev == current.st_dev)
                {
                    return Ok(None);
                }
            }
            match nix::unistd::linkat(
                dir,
                name,
                dir,
                version.as_str(),
                nix::fcntl::AtFlags::empty(),
            ) {
                Ok(()) => return Ok(Some(version)),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(self.err_errno(path.as_str(), e)),
            }
        }
        Err(self.err_errno(path.as_str(), Errno::EEXIST))
    }

    /// The next free version name of `name`, and the newest one there is.
    fn next_version_name(
        &self,
        dir: &OwnedFd,
        name: &str,
    ) -> Result<(String, Option<String>), StoreError> {
        // A fresh descriptor: a dup would share (and exhaust) the offset.
        let fresh =
            openat(dir, ".", dir_flags(), Mode::empty()).map_err(|e| self.err_errno(name, e))?;
        let listing = nix::dir::Dir::from_fd(fresh).map_err(|e| self.err_errno(name, e))?;
        let prefix = format!("{name}.~");
        let mut max = 0u64;
        for entry in listing {
            let Ok(entry) = entry else { continue };
            let Ok(entry_name) = entry.file_name().to_str() else {
                continue;
            };
            if let Some(n) = entry_name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix('~'))
                .and_then(|digits| digits.parse::<u64>().ok())
            {
                max = max.max(n);
            }
        }
        let newest = (max > 0).then(|| format!("{name}.~{max}~"));
        Ok((format!("{name}.~{}~", max + 1), newest))
    }

    fn manifest_components(path: &RelPath) -> Vec<&str> {
        let mut v = vec![METADATA_DIR_NAME, MANIFESTS_DIR];
        v.extend(path.components());
        v
    }

    /// Keeps `manifest` with the document being committed (`file`): in its
    /// [`MANIFEST_XATTR`] attribute if it fits [`MAX_XATTR_MANIFEST`] and the
    /// file system takes user attributes, otherwise in the manifest file.
    /// The attribute costs no inode, directory walk or rename per document
    /// (creating the manifest file was half the inode allocations of a
    /// small upload, and ext4's inode allocation dominated the server's CPU
    /// time for 2,000 small files), and goes wherever the document goes.
    fn store_manifest(&self, file: &File, manifest: &ValidManifest) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(&manifest.to_manifest())
            .map_err(|e| self.err_io(manifest.path.as_str())(io::Error::other(e)))?;
        if bytes.len() <= MAX_XATTR_MANIFEST
            && rustix::fs::fsetxattr(
                file,
                MANIFEST_XATTR,
                &bytes,
                rustix::fs::XattrFlags::empty(),
            )
            .is_ok()
        {
            // An older manifest file of this path would only be read if the
            // attribute went missing; remove it anyway.
            self.remove_manifest_file(&manifest.path);
            return Ok(());
        }
        // An attribute left from an earlier manifest of this inode must not
        // shadow the file.
        let _ = rustix::fs::fremovexattr(file, MANIFEST_XATTR);
        let ino = file
            .metadata()
            .map_err(self.err_io(manifest.path.as_str()))?
            .ino();
        self.write_manifest_file(manifest, ino)
    }

    /// Removes the manifest file of `path`, if there is one. Most documents
    /// have none (their manifest is an attribute): a lookup of the path's
    /// first component in the manifests directory settles that without
    /// the walk, or the `unlinkat`, which locks that directory exclusively
    /// and so serialised concurrent commits.
    fn remove_manifest_file(&self, path: &RelPath) {
        let Some(first) = path.components().next() else {
            return;
        };
        if fstatat(
            &self.manifests_fd,
            first,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) == Err(Errno::ENOENT)
        {
            return;
        }
        let components = Self::manifest_components(path);
        if let Some((name, parents)) = components.split_last() {
            if let Ok(dir) = self.open_dir_walk(parents.iter().copied(), false, path.as_str()) {
                let _ = unlinkat(&dir, *name, UnlinkatFlags::NoRemoveDir);
            }
        }
    }

    /// Writes the manifest file of `manifest.path` for the document whose
    /// inode is `ino`. A commit writes it before its rename; if the commit
    /// stops between them, the document still in place has another inode,
    /// so it never takes this manifest as its own.
    fn write_manifest_file(&self, manifest: &ValidManifest, ino: u64) -> Result<(), StoreError> {
        let components = Self::manifest_components(&manifest.path);
        let shown = components.join("/");
        let (name, parents) = components
            .split_last()
            .ok_or_else(|| self.err_io(shown.clone())(io::Error::other("empty path")))?;
        let dir = self.open_dir_walk(parents.iter().copied(), true, &shown)?;
        let bytes = postcard::to_allocvec(&ManifestFile {
            ino,
            manifest: manifest.to_manifest(),
        })
        .map_err(|e| self.err_io(shown.clone())(io::Error::other(e)))?;
        let tmp = format!("{name}.tmp");
        let result = (|| {
            let mut file = self.open_file_at(
                &dir,
                &tmp,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
                FILE_MODE,
                &shown,
            )?;
            // Not fsynced: a manifest is a cache, trusted only while the
            // document's size and mtime match it, recomputed otherwise.
            file.write_all(&bytes).map_err(self.err_io(shown.clone()))?;
            renameat(&dir, tmp.as_str(), &dir, *name).map_err(|e| self.err_errno(shown.clone(), e))
        })();
        if result.is_err() {
            let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// The stored manifest of the document `file` at `path`: its attribute,
    /// or else its manifest file. Unchecked: callers compare it with the
    /// file (size, mtime, path) or re-verify every chunk they read.
    fn read_manifest(&self, file: &File, path: &RelPath) -> Result<Option<Manifest>, StoreError> {
        let mut buf = vec![0u8; MAX_XATTR_MANIFEST];
        // ENODATA (none), ENOTSUP (no user attributes), ERANGE (not ours):
        // fall back to the manifest file.
        if let Ok(n) = rustix::fs::fgetxattr(file, MANIFEST_XATTR, &mut buf[..]) {
            if let Some(m) = buf
                .get(..n)
                .and_then(|b| postcard::from_bytes::<Manifest>(b).ok())
            {
                return Ok(Some(m));
            }
        }
        let ino = file.metadata().map_err(self.err_io(path.as_str()))?.ino();
        self.read_manifest_file(path, ino)
    }

    /// The manifest file of `path`, if it was written for inode `ino`.
    fn read_manifest_file(&self, path: &RelPath, ino: u64) -> Result<Option<Manifest>, StoreError> {
        let components = Self::manifest_components(path);
        let shown = components.join("/");
        let Some((name, parents)) = components.split_last() else {
            return Ok(None);
        };
        let dir = match self.open_dir_walk(parents.iter().copied(), false, &shown) {
            Ok(dir) => dir,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut file = match self.open_file_at(&dir, name, OFlag::O_RDONLY, 0, &shown) {
            Ok(f) => f,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(self.err_io(shown))?;
        // One of another inode, or in the older form without one, is
        // recomputed from the document (and stored again).
        Ok(postcard::from_bytes::<ManifestFile>(&bytes)
            .ok()
            .filter(|f| f.ino == ino)
            .map(|f| f.manifest))
    }

    /// The manifest of the document at `path`: the stored one if it matches
    /// the file's size and mtime, otherwise recomputed from the file (and
    /// stored again).
    pub fn document_manifest(&self, path: &RelPath) -> Result<Manifest, StoreError> {
        let file = self.open_document(path)?;
        let meta = file.metadata().map_err(self.err_io(path.as_str()))?;
        let mtime = Mtime::from_system_time(meta.modified().map_err(self.err_io(path.as_str()))?);
        if let Some(stored) = self.read_manifest(&file, path)? {
            if stored.size == meta.len() && stored.mtime == mtime && stored.path == path.as_str() {
                return Ok(stored);
            }
        }
        let digest = digest_reader(io::BufReader::new(&file)).map_err(|e| match e {
            appliance_sync_proto::ChunkError::Io(io) => self.err_io(path.as_str())(io),
            other => self.err_io(path.as_str())(io::Error::other(other.to_string())),
        })?;
        let manifest = digest.to_manifest(path, mtime);
        if let Ok(valid) = appliance_sync_proto::validate_manifest(manifest.clone()) {
            // Best effort: a listing must not fail because the cache could not be written.
            let _ = self.store_manifest(&file, &valid);
        }
        Ok(manifest)
    }

    /// Walks the documents below `dir` (or the root), skipping reserved
    /// names and symlinks, collecting `(path, size)`.
    fn walk(&self, dir: Option<&RelPath>, out: &mut Vec<(RelPath, u64)>) -> Result<(), StoreError> {
        let fd = match dir {
            // A fresh descriptor: a dup would share (and exhaust) the offset.
            None => openat(&self.root_fd, ".", dir_flags(), Mode::empty())
                .map_err(|e| self.err_errno("", e))?,
            Some(d) => self.open_dir_walk(d.components(), false, d.as_str())?,
        };
        let shown = dir.map(RelPath::to_string).unwrap_or_default();
        let listing = nix::dir::Dir::from_fd(fd).map_err(|e| self.err_errno(shown.clone(), e))?;
        let mut subdirs = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| self.err_errno(shown.clone(), e))?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." || is_reserved_component(name) {
                continue;
            }
            let Ok(child) = (match dir {
                None => RelPath::parse(name),
                Some(d) => RelPath::parse(&format!("{d}/{name}")),
            }) else {
                continue; // a name we could never have written; not ours to serve
            };
            let (parent, last) = self.open_parent(&child, false)?;
            let Ok(st) = fstatat(&parent, last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFREG {
                out.push((child, u64::try_from(st.st_size).unwrap_or(0)));
            } else if kind == SFlag::S_IFDIR {
                subdirs.push(child);
            }
        }
        for sub in subdirs {
            self.walk(Some(&sub), out)?;
        }
        Ok(())
    }

    /// Bytes of kept versions (`name.~N~`), which `walk` skips.
    fn version_bytes(&self) -> Result<u64, StoreError> {
        fn visit(dir: &Path, total: &mut u64) -> io::Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let ft = entry.file_type()?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if ft.is_dir() && !name.starts_with(".appliance-") {
                    visit(&entry.path(), total)?;
                } else if ft.is_file()
                    && is_reserved_component(&name)
                    && !name.starts_with(".appliance-")
                {
                    *total += entry.metadata()?.len();
                }
            }
            Ok(())
        }
        let mut total = 0;
        visit(&self.root, &mut total).map_err(self.err_io(""))?;
        Ok(total)
    }

    /// One page of the listing below `dir`, strictly after `after`, sorted by
    /// path; `true` if more entries follow.
    pub fn list(
        &self,
        dir: Option<&RelPath>,
        after: Option<&RelPath>,
        limit: usize,
    ) -> Result<(Vec<ListEntry>, bool), StoreError> {
        let mut docs = Vec::new();
        self.walk(dir, &mut docs)?;
        docs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut entries = Vec::new();
        let mut more = false;
        for (path, _size) in docs {
            if after.is_some_and(|a| path.as_str() <= a.as_str()) {
                continue;
            }
            if entries.len() == limit {
                more = true;
                break;
            }
            let manifest = match self.document_manifest(&path) {
                Ok(m) => m,
                Err(StoreError::NotFound { .. }) => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            entries.push(ListEntry {
                path: path.into_string(),
                size: manifest.size,
                file_hash: manifest.file_hash,
                mtime: manifest.mtime,
            });
        }
        Ok((entries, more))
    }

    /// Deletes a document (and its manifest). Symlinks are refused.
    pub fn delete(&self, path: &RelPath) -> Result<(), StoreError> {
        // A commit of the path in between would be counted wrong (or have
        // its new document deleted in place of the old one).
        let _turn = self.commit_turns.take(path);
        let (parent, name) = self.open_parent(path, false)?;
        let st = fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.err_errno(path.as_str(), e))?;
        self.require_regular(&st, path)?;
        unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| self.err_errno(path.as_str(), e))?;
        self.dir_syncs
            .sync(&parent)
            .map_err(|e| self.err_errno(path.as_str(), e))?;
        // An attribute manifest went with the file.
        self.remove_manifest_file(path);
        let mut state = self.state.lock();
        state.files = state.files.saturating_sub(1);
        state
            .index
            .retain(|_, s| !matches!(s, ChunkSource::Document { path: p, .. } if p == path));
        self.used
            .fetch_sub(u64::try_from(st.st_size).unwrap_or(0), Ordering::SeqCst);
        drop(state);
        self.sweep_superseded(path);
        Ok(())
    }

    /// Reads `len` bytes at `offset` of an open document.
    pub fn read_at(file: &mut File, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut data)?;
        Ok(data)
    }
}

/// Takes `staged` out of a store's `active` map if it is the state there
/// under its key (a later upload of the same file may have replaced it).
fn remove_if_ours(active: &mut HashMap<String, std::sync::Weak<Staged>>, staged: &Staged) -> bool {
    let ours = active
        .get(&staged.key)
        .is_some_and(|w| std::ptr::eq(w.as_ptr(), staged));
    if ours {
        active.remove(&staged.key);
    }
    ours
}

fn system_time(mtime: Mtime) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(mtime.nanos));
    if mtime.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(mtime.secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(mtime.secs.unsigned_abs()) + nanos
    }
}

/// Every client's store under one documents directory.
#[derive(Debug)]
pub struct Documents {
    base: PathBuf,
    keep_versions: bool,
    ledger: Arc<crate::admission::UsageLedger>,
    open: Mutex<HashMap<ClientName, Arc<ClientStore>>>,
}

impl Documents {
    /// Documents under `base` (one directory per client).
    pub fn new(
        base: &Path,
        keep_versions: bool,
        ledger: Arc<crate::admission::UsageLedger>,
    ) -> Result<Self, io::Error> {
        crate::fsutil::ensure_dir(base, DIR_MODE)?;
        Ok(Self {
            base: base.to_path_buf(),
            keep_versions,
            ledger,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The base directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The client's store, opened (swept and indexed) on first use.
    pub fn client(&self, name: &ClientName) -> Result<Arc<ClientStore>, StoreError> {
        if let Some(store) = self.open.lock().get(name) {
            return Ok(store.clone());
        }
        let root = self.base.join(name.as_str());
        let (store, report) = ClientStore::open(
            name.clone(),
            &root,
            self.keep_versions,
            self.ledger.counter(name),
        )?;
        tracing::debug!(client = %name, ?report, "opened client store");
        let store = Arc::new(store);
        Ok(self
            .open
            .lock()
            .entry(name.clone())
            .or_insert(store)
            .clone())
    }

    /// Opens every client directory present, sweeping staging leftovers
    /// (start-up recovery).
    pub fn recover_all(&self) -> Result<Vec<(ClientName, OpenReport)>, StoreError> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| ClientName::parse(n).ok())
            else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let store = self.client(&name)?;
            out.push((
                name,
                OpenReport {
                    files: store.files(),
                    chunks_in_store: store.chunks_in_store() as u64,
                    staging_swept: 0,
                    used_bytes: store.used(),
                },
            ));
        }
        Ok(out)
    }
}

/// `f_type` of ZFS in `statfs(2)` (`ZFS_SUPER_MAGIC`).
const ZFS_SUPER_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x2fc1_2fc1);

/// Whether `fd` is on ZFS (false if `fstatfs` fails).
fn is_zfs(fd: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|s| s.filesystem_type() == ZFS_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_sync_proto::limits::MIN_CHUNK_SIZE;
    use appliance_sync_proto::{digest_bytes, validate_manifest, ChunkRef};

    fn name() -> ClientName {
        ClientName::parse("alice").unwrap()
    }

    fn open(root: &Path, keep_versions: bool) -> ClientStore {
        ClientStore::open(name(), root, keep_versions, Arc::new(AtomicU64::new(0)))
            .unwrap()
            .0
    }

    #[test]
    fn anonymous_staging_is_used_off_zfs_only() {
        // The test machine's file systems are not ZFS; the QEMU tier runs
        // the daemon on a real pool, where named staging files are used.
        let dir = tempfile::tempdir().unwrap();
        let fd: OwnedFd = File::open(dir.path()).unwrap().into();
        let f_type = nix::sys::statfs::fstatfs(&fd).unwrap().filesystem_type();
        assert_eq!(is_zfs(&fd), f_type == ZFS_SUPER_MAGIC);
        let store = open(dir.path(), false);
        assert_eq!(
            store.tmpfile.load(Ordering::SeqCst),
            !is_zfs(&fd) && store.probe_tmpfile(),
            "anonymous staging files exactly when off ZFS and linkable"
        );
    }

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24).to_le_bytes()[0]
            })
            .collect()
    }

    fn manifest_for(path: &str, bytes: &[u8]) -> ValidManifest {
        let digest = digest_bytes(bytes).unwrap();
        let m = digest.to_manifest(
            &RelPath::parse(path).unwrap(),
            Mtime {
                secs: 1_700_000_000,
                nanos: 42,
            },
        );
        validate_manifest(m).unwrap()
    }

    /// Chunk `i` of `m` as (hash, bytes) from the file's `bytes`.
    fn chunk_of(m: &ValidManifest, bytes: &[u8], i: usize) -> (Hash, Vec<u8>) {
        let c = &m.chunks[i];
        let start = usize::try_from(c.offset).unwrap();
        (c.hash, bytes[start..start + c.len as usize].to_vec())
    }

    /// Writes every chunk of `m` into its staged upload, in order.
    fn write_all_staged(store: &ClientStore, staged: &Staged, m: &ValidManifest, bytes: &[u8]) {
        for i in 0..m.chunks.len() {
            let (hash, data) = chunk_of(m, bytes, i);
            store.write_staged(staged, &hash, data).unwrap();
        }
    }

    fn upload(store: &ClientStore, m: &ValidManifest, bytes: &[u8]) -> Result<(), StoreError> {
        for c in &m.chunks {
            if !store.has_chunk(&c.hash) {
                let start = usize::try_from(c.offset).unwrap();
                store.write_chunk(&c.hash, &bytes[start..start + c.len as usize])?;
            }
        }
        store.assemble(m)
    }

    /// Runs `threads` callers of one [`DirSync`], each "renaming" (taking
    /// the next rename number) and then syncing, with a fake fsync that
    /// notes how many renames had finished when it started and fails when
    /// `fails` says so. Returns, per caller, its rename number, its result,
    /// and the starts of the successful fsyncs finished before it returned.
    #[allow(clippy::type_complexity)]
    fn grouped_syncs(
        threads: usize,
        fails: impl Fn(u64) -> bool + Send + Sync,
    ) -> (Vec<(u64, Result<(), Errno>, Vec<u64>)>, u64) {
        let syncs = DirSyncs::default();
        let entry = DirSync::default();
        let renamed = AtomicU64::new(0);
        let calls = AtomicU64::new(0);
        let done: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let barrier = std::sync::Barrier::new(threads);
        let out = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let mine = renamed.fetch_add(1, Ordering::SeqCst) + 1;
                        let result = syncs.sync_entry(&entry, || {
                            let started = renamed.load(Ordering::SeqCst);
                            let call = calls.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(5));
                            if fails(call) {
                                return Err(Errno::EIO);
                            }
                            done.lock().push(started);
                            Ok(())
                        });
                        let seen = done.lock().clone();
                        (mine, result, seen)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        (out, syncs.issued.load(Ordering::SeqCst))
    }

    #[test]
    fn grouped_directory_syncs_cover_every_caller_before_it_returns() {
        let threads = 16;
        let (out, issued) = grouped_syncs(threads, |_| false);
        for (mine, result, seen) in &out {
            assert_eq!(*result, Ok(()));
            // A successful fsync that started after this caller's rename
            // had finished before the caller returned.
            assert!(
                seen.iter().any(|started| started >= mine),
                "rename {mine} returned with only {seen:?} synced"
            );
        }
        // Callers waiting together shared fsyncs.
        assert!(issued >= 1 && issued < threads as u64, "{issued} fsyncs");
    }

    #[test]
    fn a_failed_directory_sync_covers_nobody() {
        // The first fsync fails: its caller gets the error; every other
        // caller still returns only after a successful fsync that started
        // after its rename (or with an error of its own).
        let (out, _) = grouped_syncs(8, |call| call == 0);
        let failed = out.iter().filter(|(_, r, _)| r.is_err()).count();
        assert_eq!(failed, 1);
        for (mine, result, seen) in &out {
            if result.is_ok() {
                assert!(seen.iter().any(|started| started >= mine));
            }
        }
    }

    /// Commits of different paths never wait for each other, so their
    /// fsyncs overlap; a commit waits only for one of its own path. `b` is
    /// a path that shared `a.bin`'s lock under the former 64 striped
    /// locks, where its commit waited for all of `a.bin`'s, fsyncs and all.
    #[test]
    fn a_commit_waits_only_for_commits_of_its_own_path() {
        use std::hash::{Hash as _, Hasher as _};
        let old_stripe = |p: &str| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.hash(&mut h);
            h.finish() % 64
        };
        let b = (0..)
            .map(|i| format!("b{i}.bin"))
            .find(|p| old_stripe(p) == old_stripe("a.bin"))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), false);
        let (bytes_a, bytes_b) = (data(6000, 1), data(5000, 2));
        let (ma, mb) = (manifest_for("a.bin", &bytes_a), manifest_for(&b, &bytes_b));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            // A commit of a.bin holds its turn (in its fsyncs, say).
            let turn = store.commit_turns.take(&RelPath::parse("a.bin").unwrap());
            let (store, tx_b, mb, bytes_b) = (&store, tx.clone(), &mb, &bytes_b);
            scope.spawn(move || {
                upload(store, mb, bytes_b).unwrap();
                tx_b.send("b").unwrap();
            });
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(10)),
                Ok("b"),
                "the commit of {b} waited for a commit of a.bin"
            );
            let (tx_a, ma, bytes_a) = (tx.clone(), &ma, &bytes_a);
            scope.spawn(move || {
                upload(store, ma, bytes_a).unwrap();
                tx_a.send("a").unwrap();
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "a second commit of a.bin did not wait for its turn"
            );
            drop(turn);
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
        });
        assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), bytes_a);
        assert_eq!(std::fs::read(dir.path().join(&b)).unwrap(), bytes_b);
        assert_eq!(store.files(), 2);
        // Nothing is left behind for paths whose turns ended.
        assert!(store.commit_turns.busy.lock().is_empty());
    }

    #[test]
    fn concurrent_commits_into_one_directory_share_its_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), false));
        let files: Vec<(ValidManifest, Vec<u8>)> = (0..24)
            .map(|i| {
                let bytes = data(5000 + i, i as u64 + 1);
                (manifest_for(&format!("d/f{i}"), &bytes), bytes)
            })
            .collect();
        let barrier = std::sync::Barrier::new(files.len());
        std::thread::scope(|scope| {
            for (m, bytes) in &files {
                let (store, barrier) = (&store, &barrier);
                scope.spawn(move || {
                    let staged = store.stage(m).unwrap();
                    let c = &m.chunks[0];
                    store.write_staged(&staged, &c.hash, bytes.clone()).unwrap();
                    barrier.wait();
                    store.commit_staged(&staged).unwrap();
                });
            }
        });
        for (m, bytes) in &files {
            let got = std::fs::read(dir.path().join(m.path.as_str())).unwrap();
            assert_eq!(&got, bytes);
        }
        assert_eq!(store.files(), files.len() as u64);
        let issued = store.dir_syncs.issued.load(Ordering::SeqCst);
        assert!((1..=files.len() as u64).contains(&issued), "{issued}");
        // Nothing is left behind for finished directories.
        assert!(store.dir_syncs.dirs.lock().is_empty());
    }

    #[test]
    fn assemble_commit_list_read_delete() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let bytes = data(3 << 20, 1);
        let m = manifest_for("docs/contract.pdf", &bytes);
        upload(&store, &m, &bytes).unwrap();
        assert_eq!(
            std::fs::read(root.join("docs/contract.pdf")).unwrap(),
            bytes
        );
        // Chunks moved into the document: the store holds none, and usage is the file.
        assert_eq!(store.chunks_in_store(), 0);
        assert_eq!(store.used(), bytes.len() as u64);
        assert!(m.chunks.iter().all(|c| store.has_chunk(&c.hash)));
        let meta = std::fs::metadata(root.join("docs/contract.pdf")).unwrap();
        assert_eq!(Mtime::from_system_time(meta.modified().unwrap()), m.mtime);
        let (entries, more) = store.list(None, None, 10).unwrap();
        assert!(!more);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, "docs/contract.pdf");
        assert_eq!(entries[0].file_hash, m.file_hash);
        assert_eq!(entries[0].size, bytes.len() as u64);
        // Reserved directories never show up.
        assert!(std::fs::metadata(root.join(STAGING_DIR_NAME)).is_ok());
        // A fresh store (restart) rebuilds the same index from the manifests.
        drop(store);
        let store = open(&root, false);
        assert!(m.chunks.iter().all(|c| store.has_chunk(&c.hash)));
        assert_eq!(store.files(), 1);
        assert_eq!(store.used(), bytes.len() as u64);
        store.delete(&m.path).unwrap();
        assert!(!root.join("docs/contract.pdf").exists());
        assert!(!store.has_chunk(&m.chunks[0].hash));
        assert_eq!(store.used(), 0);
        assert!(matches!(
            store.delete(&m.path),
            Err(StoreError::NotFound { .. })
        ));
    }

    /// Small manifests live in the document's attribute (no manifest file),
    /// large ones in the manifest file; both are found again after a
    /// restart, and a manifest file alone (an older store) is still read.
    #[test]
    fn manifests_live_in_an_attribute_or_a_file_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let manifest_file = |p: &str| root.join(METADATA_DIR_NAME).join(MANIFESTS_DIR).join(p);
        let attribute = |p: &str| {
            let file = File::open(root.join(p)).unwrap();
            let mut buf = vec![0u8; MAX_XATTR_MANIFEST];
            rustix::fs::fgetxattr(&file, MANIFEST_XATTR, &mut buf[..])
                .ok()
                .map(|n| postcard::from_bytes::<Manifest>(&buf[..n]).unwrap())
        };

        let small = data(100_000, 31);
        let m = manifest_for("d/small.bin", &small);
        upload(&store, &m, &small).unwrap();
        assert_eq!(attribute("d/small.bin"), Some(m.to_manifest()));
        assert!(!manifest_file("d/small.bin").exists());

        // 100 chunks of 256 KiB: too large for the attribute.
        let chunk = MIN_CHUNK_SIZE;
        let big = data(100 * chunk as usize, 32);
        let chunks: Vec<ChunkRef> = big
            .chunks(chunk as usize)
            .enumerate()
            .map(|(i, c)| ChunkRef {
                offset: i as u64 * u64::from(chunk),
                len: chunk,
                hash: Hash::of(c),
            })
            .collect();
        let m_big = validate_manifest(Manifest {
            path: "d/big.bin".into(),
            size: big.len() as u64,
            mtime: Mtime {
                secs: 1_700_000_000,
                nanos: 0,
            },
            file_hash: Hash::of(&big),
            chunks,
        })
        .unwrap();
        upload(&store, &m_big, &big).unwrap();
        assert_eq!(attribute("d/big.bin"), None);
        assert!(manifest_file("d/big.bin").exists());

        // A restart indexes the chunks of both from where they are kept.
        drop(store);
        let store = open(&root, false);
        assert!(m.chunks.iter().all(|c| store.has_chunk(&c.hash)));
        assert!(m_big.chunks.iter().all(|c| store.has_chunk(&c.hash)));
        let small_path = RelPath::parse("d/small.bin").unwrap();
        assert_eq!(
            store.document_manifest(&small_path).unwrap(),
            m.to_manifest()
        );

        // An older store: the manifest only in its file.
        let file = File::open(root.join("d/small.bin")).unwrap();
        rustix::fs::fremovexattr(&file, MANIFEST_XATTR).unwrap();
        let ino = file.metadata().unwrap().ino();
        store.write_manifest_file(&m, ino).unwrap();
        assert_eq!(
            store.read_manifest(&file, &small_path).unwrap(),
            Some(m.to_manifest())
        );
        // Deleting the document removes both forms.
        store.delete(&small_path).unwrap();
        assert!(!manifest_file("d/small.bin").exists());
    }

    #[test]
    fn wrong_whole_file_hash_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let bytes = data(100_000, 2);
        let mut m = manifest_for("a.pdf", &bytes);
        m.file_hash = Hash::of(b"something else");
        let err = upload(&store, &m, &bytes).unwrap_err();
        assert!(matches!(err, StoreError::FileHashMismatch { .. }), "{err}");
        assert!(!root.join("a.pdf").exists());
        assert_eq!(
            std::fs::read_dir(root.join(STAGING_DIR_NAME))
                .unwrap()
                .count(),
            0
        );
        // The chunk stays for a retry; usage counts only it.
        assert_eq!(store.chunks_in_store(), 1);
        assert_eq!(store.used(), bytes.len() as u64);
    }

    #[test]
    fn chunk_with_wrong_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("alice"), false);
        assert!(matches!(
            store.write_chunk(&Hash::of(b"x"), b"y"),
            Err(StoreError::ChunkChanged { .. })
        ));
        assert_eq!(store.chunks_in_store(), 0);
    }

    #[test]
    fn staging_leftovers_are_swept_and_chunks_kept_for_resume() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let bytes = data(10_000, 3);
        let m = manifest_for("x.bin", &bytes);
        store.write_chunk(&m.chunks[0].hash, &bytes).unwrap();
        drop(store);
        std::fs::write(root.join(STAGING_DIR_NAME).join("half-written"), b"partial").unwrap();
        let tmp_chunk = root.join(METADATA_DIR_NAME).join(CHUNKS_DIR).join("zz");
        std::fs::create_dir_all(&tmp_chunk).unwrap();
        std::fs::write(tmp_chunk.join("abc.tmp3"), b"junk").unwrap();
        let (store, report) =
            ClientStore::open(name(), &root, false, Arc::new(AtomicU64::new(0))).unwrap();
        assert_eq!(report.staging_swept, 1);
        assert_eq!(report.chunks_in_store, 1);
        assert!(!tmp_chunk.join("abc.tmp3").exists());
        assert!(store.has_chunk(&m.chunks[0].hash));
        assert_eq!(
            std::fs::read_dir(root.join(STAGING_DIR_NAME))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"do not touch").unwrap();
        let store = open(&root, false);
        // A directory symlink pointing out of the root.
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let bytes = data(1000, 4);
        let m = manifest_for("escape/new.pdf", &bytes);
        let err = upload(&store, &m, &bytes).unwrap_err();
        assert!(matches!(err, StoreError::Symlink { .. }), "{err}");
        assert!(!outside.join("new.pdf").exists());
        let secret = RelPath::parse("escape/secret").unwrap();
        assert!(matches!(
            store.open_document(&secret),
            Err(StoreError::Symlink { .. })
        ));
        assert!(matches!(
            store.delete(&secret),
            Err(StoreError::Symlink { .. })
        ));
        // A file symlink: neither read, nor replaced, nor deleted through.
        std::os::unix::fs::symlink(outside.join("secret"), root.join("link.pdf")).unwrap();
        let link = RelPath::parse("link.pdf").unwrap();
        assert!(matches!(
            store.open_document(&link),
            Err(StoreError::Symlink { .. })
        ));
        let m = manifest_for("link.pdf", &bytes);
        assert!(matches!(
            upload(&store, &m, &bytes),
            Err(StoreError::Symlink { .. })
        ));
        assert!(matches!(
            store.delete(&link),
            Err(StoreError::Symlink { .. })
        ));
        assert_eq!(
            std::fs::read(outside.join("secret")).unwrap(),
            b"do not touch"
        );
        // Listings skip symlinks.
        assert!(store.list(None, None, 100).unwrap().0.is_empty());
    }

    #[test]
    fn previous_versions_are_kept_when_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, true);
        let v1 = data(5000, 5);
        let v2 = data(6000, 6);
        let v3 = data(7000, 7);
        for v in [&v1, &v2, &v3] {
            upload(&store, &manifest_for("doc.txt", v), v).unwrap();
        }
        assert_eq!(std::fs::read(root.join("doc.txt")).unwrap(), v3);
        assert_eq!(std::fs::read(root.join("doc.txt.~1~")).unwrap(), v1);
        assert_eq!(std::fs::read(root.join("doc.txt.~2~")).unwrap(), v2);
        assert_eq!(store.used(), 18_000);
        let (entries, _) = store.list(None, None, 100).unwrap();
        assert_eq!(entries.len(), 1, "versions are not listed");

        // Off (the default): replaced in place, no version files.
        let root2 = dir.path().join("bob");
        let store = open(&root2, false);
        upload(&store, &manifest_for("doc.txt", &v1), &v1).unwrap();
        upload(&store, &manifest_for("doc.txt", &v2), &v2).unwrap();
        assert!(!root2.join("doc.txt.~1~").exists());
        assert_eq!(store.used(), 6000);
    }

    #[test]
    fn listing_pages_and_stale_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        for i in 0..5 {
            let bytes = data(100 + i, i as u64);
            upload(&store, &manifest_for(&format!("d/f{i}"), &bytes), &bytes).unwrap();
        }
        let (page, more) = store.list(None, None, 2).unwrap();
        assert_eq!(page.len(), 2);
        assert!(more);
        let after = RelPath::parse(&page[1].path).unwrap();
        let (rest, more) = store.list(None, Some(&after), 10).unwrap();
        assert_eq!(rest.len(), 3);
        assert!(!more);
        let d = RelPath::parse("d").unwrap();
        assert_eq!(store.list(Some(&d), None, 10).unwrap().0.len(), 5);
        // Changed behind our back: the listing reports the real hash.
        std::fs::write(root.join("d/f0"), b"changed").unwrap();
        let (all, _) = store.list(None, None, 10).unwrap();
        assert_eq!(all[0].file_hash, Hash::of(b"changed"));
    }

    /// Out-of-order chunks held for the whole-file hash count against the
    /// client's shared reorder budget, and every byte is given back: when
    /// the chunks before them arrive, and when an upload ends with some
    /// still held.
    #[test]
    fn out_of_order_chunks_are_held_within_the_clients_budget_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let bytes = data(6 << 20, 23);
        let m = manifest_for("d/a.bin", &bytes);
        let n = m.chunks.len();
        assert!(n >= 3, "{n} chunks");
        let chunk = |i: usize| chunk_of(&m, &bytes, i);
        let held = || store.reorder.load(Ordering::Relaxed);
        let staged = store.stage(&m).unwrap();
        let mut expect = 0;
        for i in (1..n).rev() {
            let (h, d) = chunk(i);
            expect += d.len();
            store.write_staged(&staged, &h, d).unwrap();
            assert_eq!(held(), expect, "after chunk {i}");
        }
        let (h, d) = chunk(0);
        store.write_staged(&staged, &h, d).unwrap();
        assert_eq!(held(), 0, "all hashed in order once chunk 0 came");
        store.commit_staged(&staged).unwrap();
        drop(staged);
        assert_eq!(std::fs::read(root.join("d/a.bin")).unwrap(), bytes);

        // An upload that ends with chunks still held gives them back.
        let other = data(6 << 20, 24);
        let m2 = manifest_for("d/b.bin", &other);
        let staged = store.stage(&m2).unwrap();
        let c = &m2.chunks[1];
        let start = usize::try_from(c.offset).unwrap();
        store
            .write_staged(
                &staged,
                &c.hash,
                other[start..start + c.len as usize].to_vec(),
            )
            .unwrap();
        assert_eq!(held(), c.len as usize);
        store.suspend_staged(&staged, false);
        drop(staged);
        assert_eq!(held(), 0);
    }

    /// The upload-keyed staging design: an interrupted upload keeps its
    /// staging file and durable record across a restart (junk and orphans
    /// are swept), resumes with only the recorded chunks present, and
    /// commits; chunks written but never recorded are not trusted.
    #[test]
    fn staged_upload_resumes_after_restart_from_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let bytes = data(9 << 20, 21);
        let m = manifest_for("big/scan.tiff", &bytes);
        assert!(m.chunks.len() >= 4, "{} chunks", m.chunks.len());
        let chunk = |i: usize| chunk_of(&m, &bytes, i);
        let staging = root.join(STAGING_DIR_NAME);
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };

        // 1. Written but never recorded (a crash before the first sync):
        //    the orphan data file is swept, nothing is trusted.
        //    An anonymous data file (O_TMPFILE) leaves nothing at all.
        let store = open(&root, false);
        let anonymous = store.tmpfile.load(Ordering::SeqCst);
        let staged = store.stage(&m).unwrap();
        let (h, d) = chunk(0);
        store.write_staged(&staged, &h, d).unwrap();
        assert_eq!(staged.recorded_count(), 0);
        assert_eq!(names().is_empty(), anonymous);
        drop(staged);
        drop(store);
        let (store, report) =
            ClientStore::open(name(), &root, false, Arc::new(AtomicU64::new(0))).unwrap();
        assert_eq!(report.staging_swept, u64::from(!anonymous));
        assert!(names().is_empty());
        assert_eq!(store.used(), 0);

        // 2. Interrupted: two chunks land and are recorded (suspend keeps
        //    them), then the server restarts with junk in staging.
        let staged = store.stage(&m).unwrap();
        for i in 0..2 {
            let (h, d) = chunk(i);
            store.write_staged(&staged, &h, d).unwrap();
        }
        store.suspend_staged(&staged, true);
        let key = ClientStore::staging_key(&m);
        assert_eq!(
            names(),
            vec![format!("{key}.data"), format!("{key}.landed")]
        );
        drop(staged);
        drop(store);
        std::fs::write(staging.join("leftover.7"), b"junk").unwrap();
        std::fs::write(
            staging.join(format!("{}.landed", "ab".repeat(32))),
            [0u8; 36],
        )
        .unwrap();
        let (store, report) =
            ClientStore::open(name(), &root, false, Arc::new(AtomicU64::new(0))).unwrap();
        assert_eq!(report.staging_swept, 2, "junk and an orphan record");
        assert_eq!(names().len(), 2, "the resumable pair is kept");
        assert!(store.used() >= u64::from(m.chunks[0].len + m.chunks[1].len));
        assert!(std::fs::read_dir(&root).unwrap().all(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".appliance-")));

        // 3. Resume: exactly the recorded chunks count as present.
        let staged = store.stage(&m).unwrap();
        assert_eq!(staged.recorded_count(), 2);
        for (i, c) in m.chunks.iter().enumerate() {
            assert_eq!(staged.has_recorded(&c.hash), i < 2, "chunk {i}");
        }
        for i in 2..m.chunks.len() {
            let (h, d) = chunk(i);
            store.write_staged(&staged, &h, d).unwrap();
        }
        store.commit_staged(&staged).unwrap();
        assert_eq!(std::fs::read(root.join("big/scan.tiff")).unwrap(), bytes);
        assert!(names().is_empty(), "the commit settles staging");
        assert_eq!(store.used(), bytes.len() as u64);
        assert!(m.chunks.iter().all(|c| store.has_chunk(&c.hash)));
    }

    fn staging_names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(STAGING_DIR_NAME))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// A client root in a fresh directory (kept while the first is) and
    /// its store.
    fn fresh() -> (tempfile::TempDir, PathBuf, ClientStore) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        (dir, root, store)
    }

    /// An interrupted upload of `c.bin` whose pair is under its untagged
    /// key, as a daemon from before keys began with their path's tag left
    /// it, with no store open: (dir, root, bytes, manifest).
    fn untagged_upload() -> (tempfile::TempDir, PathBuf, Vec<u8>, ValidManifest) {
        let (dir, root, store) = fresh();
        let bytes = data(600_001, 6);
        let m = interrupt(&store, "c.bin", &bytes);
        drop(store);
        let (key, old) = (ClientStore::staging_key(&m), ClientStore::content_key(&m));
        let staging = root.join(STAGING_DIR_NAME);
        for (from, to) in pair(&key).iter().zip(pair(&old)) {
            std::fs::rename(staging.join(from), staging.join(to)).unwrap();
        }
        (dir, root, bytes, m)
    }

    fn pair(key: &str) -> Vec<String> {
        vec![
            format!("{key}.{DATA_SUFFIX}"),
            format!("{key}.{RECORD_SUFFIX}"),
        ]
    }

    /// Leaves an interrupted upload of `bytes` to `path`, every chunk landed
    /// and recorded.
    fn interrupt(store: &ClientStore, path: &str, bytes: &[u8]) -> ValidManifest {
        let m = manifest_for(path, bytes);
        let staged = store.stage(&m).unwrap();
        write_all_staged(store, &staged, &m, bytes);
        store.suspend_staged(&staged, true);
        m
    }

    /// An interrupted upload of a path that was then committed with other
    /// content, or deleted, stayed in staging and counted against the quota
    /// until a restart at least 7 days later. It goes with that commit or
    /// delete. A pair of another path, and one an upload has open, stay;
    /// usage is exact throughout (a pair suspended and resumed in one run
    /// was counted by its bytes written, then by its blocks on disk).
    #[test]
    fn interrupted_uploads_of_a_replaced_or_deleted_path_are_removed() {
        let (_dir, root, store) = fresh();
        let commit = |m: &ValidManifest, bytes: &[u8]| {
            let staged = store.stage(m).unwrap();
            write_all_staged(&store, &staged, m, bytes);
            store.commit_staged(&staged).unwrap();
        };
        let old = data(300_001, 1);
        let m_old = interrupt(&store, "a.bin", &old);
        let other = data(200_001, 2);
        let m_other = interrupt(&store, "b.bin", &other);
        let mut both = pair(&ClientStore::staging_key(&m_old));
        both.extend(pair(&ClientStore::staging_key(&m_other)));
        both.sort();
        assert_eq!(staging_names(&root), both);

        // a.bin committed with other content: its pair goes, b.bin's stays.
        let new = data(100_001, 3);
        commit(&manifest_for("a.bin", &new), &new);
        assert_eq!(
            staging_names(&root),
            pair(&ClientStore::staging_key(&m_other))
        );
        assert_eq!(store.used(), (new.len() + other.len()) as u64);

        // b.bin resumes with every chunk; an upload that has the pair open
        // keeps it through a commit of other content to the same path.
        let resumed = store.stage(&m_other).unwrap();
        assert_eq!(resumed.recorded_count(), m_other.chunks.len());
        let newer = data(50_001, 4);
        commit(&manifest_for("b.bin", &newer), &newer);
        store.commit_staged(&resumed).unwrap();
        assert_eq!(std::fs::read(root.join("b.bin")).unwrap(), other);
        assert!(staging_names(&root).is_empty());
        assert_eq!(store.used(), (new.len() + other.len()) as u64);

        // Kept by a restart, then the path deleted: the pair goes.
        let m_gone = interrupt(&store, "b.bin", &data(150_001, 5));
        drop(store);
        let store = open(&root, false);
        assert_eq!(
            staging_names(&root),
            pair(&ClientStore::staging_key(&m_gone))
        );
        store.delete(&RelPath::parse("b.bin").unwrap()).unwrap();
        assert!(staging_names(&root).is_empty());
        assert_eq!(store.used(), new.len() as u64);
        drop(store);
        let (_, report) =
            ClientStore::open(name(), &root, false, Arc::new(AtomicU64::new(0))).unwrap();
        assert_eq!(report.used_bytes, new.len() as u64);
    }

    /// What a fresh open recomputes from disk (with no other store open).
    fn recomputed(root: &Path) -> u64 {
        ClientStore::open(name(), root, false, Arc::new(AtomicU64::new(0)))
            .unwrap()
            .1
            .used_bytes
    }

    /// A resumed state dropped without a verdict (the server's lookup
    /// finishing after its connection went) left its pair counted but out
    /// of `suspended`: the next resume counted it again.
    #[test]
    fn a_resumed_state_dropped_without_a_verdict_stays_resumable_and_counted_once() {
        let (_dir, root, store) = fresh();
        let bytes = data(300_001, 7);
        let m = interrupt(&store, "a.bin", &bytes);
        drop(store);
        let store = open(&root, false);
        let before = store.used();
        drop(store.stage(&m).unwrap());
        let staged = store.stage(&m).unwrap();
        assert_eq!(store.used(), before, "the pair is counted once");
        assert_eq!(staged.recorded_count(), m.chunks.len());
        store.commit_staged(&staged).unwrap();
        let used = store.used();
        drop((staged, store));
        assert_eq!(used, recomputed(&root));
        assert_eq!(used, bytes.len() as u64);
    }

    /// A state dropped without a verdict kept the count of every chunk it
    /// wrote, also those written since its last record: a resume is asked
    /// for those again and counted them twice (up to STAGING_SYNC_BYTES per
    /// pair, until a commit or a restart). It keeps what its record lists.
    #[test]
    fn a_dropped_state_keeps_the_count_of_its_recorded_chunks_only() {
        let (_dir, root, store) = fresh();
        // Over STAGING_SYNC_BYTES: the first 16 MiB are recorded, the rest
        // only written.
        let bytes = data(24 << 20, 11);
        let m = manifest_for("big.bin", &bytes);
        let first = store.stage(&m).unwrap();
        write_all_staged(&store, &first, &m, &bytes);
        let recorded = first.recorded_count();
        assert!(recorded > 0 && recorded < m.chunks.len(), "{recorded}");
        drop(first);
        let second = store.stage(&m).unwrap();
        assert_eq!(second.recorded_count(), recorded);
        for i in 0..m.chunks.len() {
            let (h, d) = chunk_of(&m, &bytes, i);
            if !second.has_recorded(&h) {
                store.write_staged(&second, &h, d).unwrap();
            }
        }
        store.suspend_staged(&second, true);
        drop(second);
        let used = store.used();
        drop(store);
        assert_eq!(used, recomputed(&root));
    }

    /// A resume between a suspend's settling and its record being written
    /// found no pair and started over; the suspend then took the new state
    /// for one that had counted its pair. The pair stayed on disk, counted
    /// by nobody. Now the resume waits for the suspend and takes its pair.
    #[test]
    fn a_resume_racing_the_suspend_of_the_same_upload_takes_its_pair() {
        let (_dir, root, store) = fresh();
        let store = Arc::new(store);
        let bytes = data(3_000_001, 8);
        let m = manifest_for("a.bin", &bytes);
        let first = store.stage(&m).unwrap();
        // Under STAGING_SYNC_BYTES: nothing recorded yet.
        write_all_staged(&store, &first, &m, &bytes);
        let suspending = {
            let (store, first) = (store.clone(), first.clone());
            std::thread::spawn(move || store.suspend_staged(&first, true))
        };
        while !first.settled.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let second = store.stage(&m).unwrap();
        suspending.join().unwrap();
        assert_eq!(second.recorded_count(), m.chunks.len(), "resumed");
        store.commit_staged(&second).unwrap();
        let (used, left) = (store.used(), staging_names(&root));
        drop((first, second, store));
        assert_eq!((used, left), (recomputed(&root), Vec::<String>::new()));
        assert_eq!(used, bytes.len() as u64);
    }

    /// An untagged pair whose adoption fails half-way (its new name is
    /// taken) keeps its old name and its count: the upload starts over
    /// beside it, and the next resume adopts it.
    #[test]
    fn a_half_failed_adoption_keeps_the_pair_under_its_old_name() {
        let (_dir, root, _bytes, m) = untagged_upload();
        let (key, old) = (ClientStore::staging_key(&m), ClientStore::content_key(&m));
        let staging = root.join(STAGING_DIR_NAME);
        let store = open(&root, false);
        let before = store.used();
        // The data file's rename fails (something in the way).
        let blocker = staging.join(format!("{key}.{DATA_SUFFIX}"));
        std::fs::create_dir(&blocker).unwrap();
        let first = store.stage(&m).unwrap();
        assert_eq!(first.recorded_count(), 0, "started over");
        let mut names = pair(&old);
        names.push(format!("{key}.{DATA_SUFFIX}"));
        names.sort();
        assert_eq!(staging_names(&root), names);
        store.suspend_staged(&first, true);
        drop(first);
        assert_eq!(store.used(), before);
        std::fs::remove_dir(&blocker).unwrap();
        let staged = store.stage(&m).unwrap();
        assert_eq!(staged.recorded_count(), m.chunks.len(), "adopted now");
        store.commit_staged(&staged).unwrap();
        let used = store.used();
        drop((staged, store));
        assert_eq!(used, recomputed(&root));
        assert!(staging_names(&root).is_empty());
    }

    /// A commit by an upload whose shared state the other upload discarded
    /// (disk full) failed, and its failure path deleted the staging files
    /// by name: by then another upload's pair, resumed and complete.
    #[test]
    fn a_commit_of_a_state_settled_by_the_other_upload_leaves_the_files_alone() {
        let (_dir, root, store) = fresh();
        let bytes = data(300_001, 9);
        let m = manifest_for("d.bin", &bytes);
        // The same content stored under another name: a commit of d.bin
        // takes every chunk from there, and finds the chunks present.
        let copy = manifest_for("copy.bin", &bytes);
        let s = store.stage(&copy).unwrap();
        write_all_staged(&store, &s, &copy, &bytes);
        store.commit_staged(&s).unwrap();
        let a = store.stage(&m).unwrap();
        let b = store.stage(&m).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        store.suspend_staged(&a, false);
        // Another connection pushes it, is interrupted, and resumes.
        let c = store.stage(&m).unwrap();
        write_all_staged(&store, &c, &m, &bytes);
        store.suspend_staged(&c, true);
        let d = store.stage(&m).unwrap();
        assert_eq!(d.recorded_count(), m.chunks.len());
        assert!(matches!(
            store.commit_staged(&b),
            Err(StoreError::Ended { .. })
        ));
        store.commit_staged(&d).unwrap();
        assert_eq!(std::fs::read(root.join("d.bin")).unwrap(), bytes);
        let used = store.used();
        drop((a, b, c, d, s, store));
        assert_eq!(used, recomputed(&root));
    }

    /// A commit whose directory fsync fails (after its rename) fails, with
    /// the new document in place and counted: usage lost the staging
    /// file's count without gaining the document's until a restart. A
    /// retry finds the document in place.
    #[test]
    fn a_failed_directory_sync_after_the_rename_keeps_usage_exact() {
        let (_dir, root, store) = fresh();
        let commit = |m: &ValidManifest, bytes: &[u8]| {
            let staged = store.stage(m).unwrap();
            write_all_staged(&store, &staged, m, bytes);
            store.commit_staged(&staged)
        };
        let (v1, v2, b) = (data(100_001, 1), data(200_001, 2), data(50_001, 3));
        commit(&manifest_for("a.bin", &v1), &v1).unwrap();
        for (path, bytes) in [("a.bin", &v2), ("b.bin", &b)] {
            store.dir_syncs.failing.store(1, Ordering::SeqCst);
            let m = manifest_for(path, bytes);
            let err = commit(&m, bytes).unwrap_err();
            assert!(err.to_string().contains("Input/output error"), "{err}");
            assert_eq!(&std::fs::read(root.join(path)).unwrap(), bytes);
            commit(&m, bytes).expect("a retry finds it in place");
        }
        assert_eq!(store.files(), 2);
        let used = store.used();
        drop(store);
        assert_eq!(used, (v2.len() + b.len()) as u64);
        assert_eq!(used, recomputed(&root));
    }

    /// A pair kept under its untagged key (by a daemon from before keys
    /// began with their path's tag) still resumes, under the new key.
    #[test]
    fn a_pair_under_its_untagged_key_still_resumes() {
        let (_dir, root, bytes, m) = untagged_upload();
        let (key, old) = (ClientStore::staging_key(&m), ClientStore::content_key(&m));
        let store = open(&root, false);
        assert_eq!(staging_names(&root), pair(&old));
        let staged = store.stage(&m).unwrap();
        assert_eq!(staged.recorded_count(), m.chunks.len());
        assert_eq!(staging_names(&root), pair(&key));
        store.commit_staged(&staged).unwrap();
        assert_eq!(std::fs::read(root.join("c.bin")).unwrap(), bytes);
        assert!(staging_names(&root).is_empty());
        assert_eq!(store.used(), bytes.len() as u64);
    }

    /// Staging files start anonymous where the file system allows it: a
    /// new document is linked into place, a replaced one renamed over from
    /// its staging name, and named files remain the fallback.
    #[test]
    fn anonymous_staging_files_are_named_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        // Linux file systems a test directory lives on (ext4, xfs, btrfs,
        // tmpfs) all make O_TMPFILE files.
        assert!(store.tmpfile.load(Ordering::SeqCst));
        let staging = root.join(STAGING_DIR_NAME);
        let names = || std::fs::read_dir(&staging).unwrap().count();
        let put = |store: &ClientStore, path: &str, bytes: &[u8], named_before_commit: bool| {
            let m = manifest_for(path, bytes);
            let staged = store.stage(&m).unwrap();
            write_all_staged(store, &staged, &m, bytes);
            assert_eq!(names(), usize::from(named_before_commit), "{path}");
            store.commit_staged(&staged).unwrap();
            assert_eq!(names(), 0, "{path}");
            assert_eq!(std::fs::read(root.join(path)).unwrap(), bytes);
        };
        // New, then replaced (same path, other bytes).
        put(&store, "docs/a.pdf", &data(70_000, 1), false);
        put(&store, "docs/a.pdf", &data(90_000, 2), false);
        assert_eq!(store.files(), 1);
        assert_eq!(store.used(), 90_000);
        // Without O_TMPFILE: named from the first chunk, as before.
        store.tmpfile.store(false, Ordering::SeqCst);
        put(&store, "docs/b.pdf", &data(50_000, 3), true);
        put(&store, "docs/a.pdf", &data(10_000, 4), true);
        assert_eq!(store.files(), 2);
        assert_eq!(store.used(), 60_000);
    }

    /// A staged upload whose chunks do not add up to the file hash leaves
    /// nothing behind.
    #[test]
    fn staged_hash_mismatch_discards_staging() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("alice");
        let store = open(&root, false);
        let bytes = data(3 << 20, 22);
        let mut m = manifest_for("x.pdf", &bytes);
        m.file_hash = Hash::of(b"a lie");
        let staged = store.stage(&m).unwrap();
        write_all_staged(&store, &staged, &m, &bytes);
        let err = store.commit_staged(&staged).unwrap_err();
        assert!(matches!(err, StoreError::FileHashMismatch { .. }), "{err}");
        assert_eq!(
            std::fs::read_dir(root.join(STAGING_DIR_NAME))
                .unwrap()
                .count(),
            0
        );
        assert!(!root.join("x.pdf").exists());
        assert_eq!(store.used(), 0);
    }

    /// A real full filesystem (a 2 MiB tmpfs): ENOSPC mid-assembly gives a
    /// typed error and leaves neither the file nor a staging leftover.
    #[test]
    fn full_disk_is_a_clean_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("small");
        std::fs::create_dir(&mount).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&mount)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _guard = Unmount(mount.clone());
        let root = mount.join("alice");
        let store = open(&root, false);
        // 1.5 MiB of chunks fit; assembling a second 1.5 MiB copy does not.
        let bytes = data(1_500_000, 9);
        let m = manifest_for("big.bin", &bytes);
        let err = upload(&store, &m, &bytes).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert!(!root.join("big.bin").exists());
        assert_eq!(
            std::fs::read_dir(root.join(STAGING_DIR_NAME))
                .unwrap()
                .count(),
            0
        );
        // Chunk writes that do not fit fail the same way, without leftovers.
        let more = data(1_500_000, 10);
        let err = store.write_chunk(&Hash::of(&more), &more).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        assert_eq!(store.chunks_in_store(), 1);
    }
}
