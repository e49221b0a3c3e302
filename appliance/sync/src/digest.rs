//! Client-side file digests: FastCDC chunking with per-chunk BLAKE3 and the
//! whole-file BLAKE3, computed in memory for small files and as a
//! three-stage pipeline for large ones (read + cut, per-chunk hashes,
//! whole-file hash on their own threads, see [`digest_file`]), and a digest
//! cache keyed by `(dev, inode, size, mtime, ctime)` so re-pushing an
//! unchanged file does not read it at all.
//!
//! The chunk boundaries are exactly those of `appliance_sync_proto`'s
//! [`Chunker`](appliance_sync_proto::Chunker) (same FastCDC 2020 parameters
//! and masks, checked by a test), so dedup against earlier uploads and
//! against the server's own recomputation holds.
//!
//! **Cache safety**: an entry is used only if all five key fields match
//! (`ctime` changes on every write and cannot be set by users), and a
//! digest is cached only if the file's mtime and ctime were at least
//! [`RACY_WINDOW`] old when hashing started, so a write in the same
//! timestamp tick as the hash cannot hide behind an unchanged key. The
//! server verifies every chunk and the whole file anyway; a wrong entry
//! costs a failed push, never a wrong document.

use appliance_sync_proto::limits::{AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_FILE_SIZE, MIN_CHUNK_SIZE};
use appliance_sync_proto::{ChunkRef, FileDigest, Hash};
use fastcdc::v2020;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Files modified this recently before hashing started are not cached.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// Entries kept in the cache file (about 45 KB per GiB of file each).
pub const MAX_CACHE_ENTRIES: usize = 65_536;
/// Read size of the chunking stage, and the largest file digested in
/// memory on the calling thread.
const READ_BLOCK: usize = 8 << 20;

/// Identity of a file's content as far as the filesystem can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileKey {
    /// The key of an open file.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Entry {
    key: FileKey,
    file_hash: Hash,
    chunks: Vec<ChunkRef>,
}

/// Digests by file key, optionally persisted in a file.
#[derive(Debug, Default)]
pub struct DigestCache {
    path: Option<PathBuf>,
    map: Mutex<HashMap<FileKey, Arc<Entry>>>,
    dirty: std::sync::atomic::AtomicBool,
}

impl DigestCache {
    /// An in-memory cache (lives as long as the client).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A cache persisted at `path`; a missing or unreadable file is an
    /// empty cache (it is only an optimisation).
    pub fn load(path: &Path) -> Self {
        let entries: Vec<Entry> = std::fs::read(path)
            .ok()
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        Self {
            path: Some(path.to_path_buf()),
            map: Mutex::new(entries.into_iter().map(|e| (e.key, Arc::new(e))).collect()),
            dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, key: &FileKey) -> Option<FileDigest> {
        self.map.lock().get(key).map(|e| FileDigest {
            size: e.key.size,
            file_hash: e.file_hash,
            chunks: e.chunks.clone(),
        })
    }

    fn insert(&self, key: FileKey, digest: &FileDigest) {
        let mut map = self.map.lock();
        if map.len() >= MAX_CACHE_ENTRIES {
            if let Some(victim) = map.keys().next().copied() {
                map.remove(&victim);
            }
        }
        map.insert(
            key,
            Arc::new(Entry {
                key,
                file_hash: digest.file_hash,
                chunks: digest.chunks.clone(),
            }),
        );
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes the cache file (0600, atomically) if anything changed.
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let entries: Vec<Entry> = self.map.lock().values().map(|e| (**e).clone()).collect();
        let bytes = postcard::to_allocvec(&entries).map_err(io::Error::other)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
        }
        std::fs::rename(&tmp, path)
    }

    /// The digest of `file`: from the cache if its key matches, otherwise
    /// computed (and cached when safe). `true` if it came from the cache.
    pub fn digest(&self, file: &File) -> io::Result<(FileDigest, bool)> {
        let started = SystemTime::now();
        let meta = file.metadata()?;
        let key = FileKey::of(&meta);
        if let Some(d) = self.get(&key) {
            return Ok((d, true));
        }
        let digest = digest_file(file)?;
        // The file must not have changed while it was read, and must be
        // older than the racy window.
        let after = FileKey::of(&file.metadata()?);
        let horizon = started
            .checked_sub(RACY_WINDOW)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        if after == key && key.mtime_ns < horizon && key.ctime_ns < horizon {
            self.insert(key, &digest);
        }
        Ok((digest, false))
    }
}

fn cut(data: &[u8], (small, large): (u64, u64)) -> usize {
    let (_, len) = v2020::cut(
        data,
        MIN_CHUNK_SIZE as usize,
        AVG_CHUNK_SIZE as usize,
        MAX_CHUNK_SIZE as usize,
        small,
        large,
        small << 1,
        large << 1,
    );
    len.clamp(1, data.len())
}

/// Reads into `buf` (appending, without zeroing its spare capacity) from
/// `file` at `offset` until it holds `until` bytes or the file ends.
/// Returns whether the file ended.
fn fill(file: &File, buf: &mut Vec<u8>, offset: u64, until: usize) -> io::Result<bool> {
    use std::os::unix::fs::FileExt as _;
    /// `pread`s from a moving offset (the file's own cursor is not used).
    struct At<'a> {
        file: &'a File,
        offset: u64,
    }
    impl Read for At<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.file.read_at(out, self.offset)?;
            self.offset += n as u64;
            Ok(n)
        }
    }
    let want = until.saturating_sub(buf.len());
    let got = At { file, offset }.take(want as u64).read_to_end(buf)?;
    Ok(got < want)
}

/// Chunks and hashes a whole file. Files of at most one read block are read
/// into memory and digested on this thread (a file of one chunk is hashed
/// once: its chunk hash is its file hash). Larger files go through a
/// three-stage pipeline: this thread reads blocks straight into one of a
/// few reusable windows (the unchunked tail of the previous window first)
/// and finds cut points; one thread hashes the chunks, one the whole file,
/// both reading the shared window, so each byte is copied once from the
/// page cache and hashed twice.
pub fn digest_file(file: &File) -> io::Result<FileDigest> {
    let masks = appliance_sync_proto::chunk::fastcdc_masks();
    let mut data = Vec::new();
    if !fill(file, &mut data, 0, READ_BLOCK + 1)? {
        return digest_large(file, masks, data);
    }
    let mut chunks = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let len = cut(&data[start..], masks);
        chunks.push(ChunkRef {
            offset: start as u64,
            len: u32::try_from(len).unwrap_or(MAX_CHUNK_SIZE),
            hash: Hash::of(&data[start..start + len]),
        });
        start += len;
    }
    let file_hash = match chunks.as_slice() {
        [only] => only.hash,
        _ => Hash::of(&data),
    };
    Ok(FileDigest {
        size: data.len() as u64,
        file_hash,
        chunks,
    })
}

/// Windows in rotation in [`digest_large`]: one being filled, up to two
/// being hashed.
const WINDOWS: usize = 3;

/// What the hashing threads get: a filled window, and which part of it
/// they hash.
struct Work {
    window: Arc<Vec<u8>>,
    /// Whole-file hasher: the bytes read into this window (after the tail
    /// carried over, which it already hashed).
    fresh: std::ops::Range<usize>,
    /// Chunk hasher: `(file offset, window start, length)` of each chunk cut.
    cuts: Vec<(u64, usize, usize)>,
}

fn digest_large(file: &File, masks: (u64, u64), first: Vec<u8>) -> io::Result<FileDigest> {
    let capacity = READ_BLOCK + MAX_CHUNK_SIZE as usize;
    std::thread::scope(|scope| {
        let (whole_tx, whole_rx) = mpsc::sync_channel::<Work>(WINDOWS);
        let (chunk_tx, chunk_rx) = mpsc::sync_channel::<Work>(WINDOWS);
        let (done_tx, done_rx) = mpsc::channel::<Arc<Vec<u8>>>();
        let done = done_tx.clone();
        let whole = scope.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for work in whole_rx {
                hasher.update(&work.window[work.fresh.clone()]);
                let _ = done.send(work.window);
            }
            Hash::from(hasher.finalize())
        });
        let done = done_tx;
        let chunks = scope.spawn(move || {
            let mut out = Vec::new();
            for work in chunk_rx {
                for &(offset, start, len) in &work.cuts {
                    out.push(ChunkRef {
                        offset,
                        len: u32::try_from(len).unwrap_or(MAX_CHUNK_SIZE),
                        hash: Hash::of(&work.window[start..start + len]),
                    });
                }
                let _ = done.send(work.window);
            }
            out
        });
        let result = (|| {
            let mut allocated = 1usize;
            let mut next = Some(first);
            let mut prev: Option<(Arc<Vec<u8>>, usize)> = None;
            // File offset of the next byte to read, and of window[0].
            let mut next_read = 0u64;
            let mut offset = 0u64;
            loop {
                let mut window = match next.take() {
                    Some(w) => w,
                    None if allocated < WINDOWS => {
                        allocated += 1;
                        Vec::with_capacity(capacity)
                    }
                    // Each window comes back twice (once per hasher); the
                    // second return is the last reference.
                    None => loop {
                        let back = done_rx
                            .recv()
                            .map_err(|_| io::Error::other("digest hasher stopped"))?;
                        if let Ok(w) = Arc::try_unwrap(back) {
                            break w;
                        }
                    },
                };
                let tail = match prev.take() {
                    // The first window arrives already filled.
                    None => 0,
                    Some((p, start)) => {
                        window.clear();
                        window.extend_from_slice(&p[start..]);
                        window.len()
                    }
                };
                let eof = if tail == 0 && next_read == 0 {
                    // `first`: the first bytes of the file, already read.
                    window.len() <= READ_BLOCK
                } else {
                    fill(file, &mut window, next_read, tail + READ_BLOCK)?
                };
                let fresh = tail..window.len();
                next_read += fresh.len() as u64;
                if next_read > MAX_FILE_SIZE {
                    return Err(io::Error::other(format!(
                        "file is larger than the {MAX_FILE_SIZE}-byte limit"
                    )));
                }
                let mut start = 0usize;
                let mut cuts = Vec::new();
                while window.len() - start >= MAX_CHUNK_SIZE as usize
                    || (eof && window.len() > start)
                {
                    let len = cut(&window[start..], masks);
                    cuts.push((offset, start, len));
                    offset += len as u64;
                    start += len;
                }
                let window = Arc::new(window);
                let sent = whole_tx
                    .send(Work {
                        window: window.clone(),
                        fresh,
                        cuts: Vec::new(),
                    })
                    .and_then(|()| {
                        chunk_tx.send(Work {
                            window: window.clone(),
                            fresh: 0..0,
                            cuts,
                        })
                    });
                if sent.is_err() {
                    return Err(io::Error::other("digest hasher stopped"));
                }
                if eof {
                    return Ok(offset);
                }
                prev = Some((window, start));
            }
        })();
        drop(whole_tx);
        drop(chunk_tx);
        let file_hash = whole
            .join()
            .map_err(|_| io::Error::other("whole-file hasher panicked"))?;
        let chunks = chunks
            .join()
            .map_err(|_| io::Error::other("chunk hasher panicked"))?;
        let size = result?;
        Ok(FileDigest {
            size,
            file_hash,
            chunks,
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;
    use std::io::Write as _;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn same_digest_as_the_protocol_chunker() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in [
            0usize,
            1,
            300_000,
            4 << 20,
            8 << 20,
            (8 << 20) + 1,
            (8 << 20) + 5,
            (12 << 20) + 3,
            21 << 20,
            40 << 20,
        ]
        .into_iter()
        .enumerate()
        {
            let data = bytes(len, i as u64 + 7);
            let path = dir.path().join(format!("f{i}"));
            std::fs::File::create(&path)
                .unwrap()
                .write_all(&data)
                .unwrap();
            let ours = digest_file(&File::open(&path).unwrap()).unwrap();
            let theirs = appliance_sync_proto::digest_bytes(&data).unwrap();
            assert_eq!(ours, theirs, "length {len}");
        }
    }

    #[test]
    fn cache_hits_only_for_an_unchanged_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes(600_000, 1)).unwrap();
        let cache_path = dir.path().join("cache");
        let cache = DigestCache::load(&cache_path);
        // Just written: inside the racy window, not cached.
        let (_, hit) = cache.digest(&File::open(&path).unwrap()).unwrap();
        assert!(!hit);
        assert!(cache.is_empty());
        // Made old: cached, persisted, and a hit for a fresh cache.
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // ctime is now; wait out the racy window for it.
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(100));
        let (d1, hit) = cache.digest(&File::open(&path).unwrap()).unwrap();
        assert!(!hit);
        assert_eq!(cache.len(), 1);
        cache.save().unwrap();
        let cache = DigestCache::load(&cache_path);
        let (d2, hit) = cache.digest(&File::open(&path).unwrap()).unwrap();
        assert!(hit);
        assert_eq!(d1, d2);
        // Any write changes the key: recomputed.
        std::fs::write(&path, bytes(600_000, 2)).unwrap();
        let (d3, hit) = cache.digest(&File::open(&path).unwrap()).unwrap();
        assert!(!hit);
        assert_ne!(d3.file_hash, d1.file_hash);
    }
}
