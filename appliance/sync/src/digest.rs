//! Client-side file digests: FastCDC chunking with per-chunk BLAKE3 and the
//! whole-file BLAKE3, computed as a three-stage pipeline (read + cut,
//! per-chunk hashes, whole-file hash on their own threads), and a digest
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
/// Read size of the chunking stage.
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

/// Chunks and hashes a whole file with three threads: this one reads and
/// finds cut points, one hashes each chunk, one hashes the whole file.
pub fn digest_file(file: &File) -> io::Result<FileDigest> {
    let masks = appliance_sync_proto::chunk::fastcdc_masks();
    std::thread::scope(|scope| {
        let (whole_tx, whole_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(4);
        let (chunk_tx, chunk_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(16);
        let whole = scope.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for block in whole_rx {
                hasher.update(&block);
            }
            Hash::from(hasher.finalize())
        });
        let chunks = scope.spawn(move || {
            let mut out = Vec::new();
            for (offset, data) in chunk_rx {
                out.push(ChunkRef {
                    offset,
                    len: u32::try_from(data.len()).unwrap_or(MAX_CHUNK_SIZE),
                    hash: Hash::of(&data),
                });
            }
            out
        });
        let mut reader = file;
        let mut buf: Vec<u8> = Vec::with_capacity(READ_BLOCK + MAX_CHUNK_SIZE as usize);
        let mut start = 0usize;
        let mut offset = 0u64;
        let mut total = 0u64;
        let mut result = Ok(());
        let mut eof = false;
        while !eof {
            let mut block = vec![0u8; READ_BLOCK];
            let mut filled = 0;
            while filled < block.len() {
                match reader.read(&mut block[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        result = Err(e);
                        eof = true;
                        break;
                    }
                }
            }
            block.truncate(filled);
            total += filled as u64;
            if total > MAX_FILE_SIZE {
                result = Err(io::Error::other(format!(
                    "file is larger than the {MAX_FILE_SIZE}-byte limit"
                )));
                break;
            }
            if start > 0 {
                buf.drain(..start);
                start = 0;
            }
            buf.extend_from_slice(&block);
            if whole_tx.send(Arc::new(block)).is_err() {
                break;
            }
            while buf.len() - start >= MAX_CHUNK_SIZE as usize || (eof && buf.len() > start) {
                let len = cut(&buf[start..], masks);
                if chunk_tx
                    .send((offset, buf[start..start + len].to_vec()))
                    .is_err()
                {
                    break;
                }
                offset += len as u64;
                start += len;
            }
        }
        drop(whole_tx);
        drop(chunk_tx);
        let file_hash = whole
            .join()
            .map_err(|_| io::Error::other("whole-file hasher panicked"))?;
        let chunks = chunks
            .join()
            .map_err(|_| io::Error::other("chunk hasher panicked"))?;
        result?;
        Ok(FileDigest {
            size: offset,
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
        for (i, len) in [0usize, 1, 300_000, 4 << 20, (8 << 20) + 5, 21 << 20]
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
