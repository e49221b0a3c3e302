//! Content-defined chunking (FastCDC 2020, via the `fastcdc` crate) and BLAKE3
//! hashing of chunks and whole files, as an incremental, IO-free API.
//!
//! [`Chunker`] is fed byte slices of any size in file order and produces the
//! same chunk boundaries as running FastCDC over the whole file at once: it
//! only asks FastCDC for a cut point once it holds at least
//! [`MAX_CHUNK_SIZE`] bytes (or the input has ended), because a cut point
//! never lies further than that. It buffers at most `MAX_CHUNK_SIZE` bytes
//! plus the slice being fed, and hashes the whole file in the same pass.
//!
//! Parameters ([`MIN_CHUNK_SIZE`], [`AVG_CHUNK_SIZE`], [`MAX_CHUNK_SIZE`],
//! normalisation level 1, the crate's default gear table) are part of the
//! protocol in practice: a client that chunked differently would still be
//! correct, but would lose deduplication against what it uploaded before.

use crate::hash::Hash;
use crate::limits::{AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_FILE_SIZE, MIN_CHUNK_SIZE};
use crate::message::{ChunkRef, Manifest, Mtime};
use crate::path::RelPath;
use fastcdc::v2020;
use std::io::Read;

/// Why a file could not be chunked.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("file is larger than the {max}-byte limit")]
    FileTooLarge { max: u64 },
    #[error("reading the file failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The result of chunking a whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    pub file_hash: Hash,
    pub chunks: Vec<ChunkRef>,
}

impl FileDigest {
    /// The upload manifest for this file at `path`.
    pub fn to_manifest(&self, path: &RelPath, mtime: Mtime) -> Manifest {
        Manifest {
            path: path.as_str().to_owned(),
            size: self.size,
            mtime,
            file_hash: self.file_hash,
            chunks: self.chunks.clone(),
        }
    }
}

/// The FastCDC gear masks (small, large) for our parameters: normalisation
/// level 1 around [`AVG_CHUNK_SIZE`], as `fastcdc` computes them. The
/// server's streaming digest uses the same masks, so both sides cut the
/// same chunks.
pub fn fastcdc_masks() -> (u64, u64) {
    let bits = v2020::logarithm2(AVG_CHUNK_SIZE);
    let level = v2020::Normalization::Level1.bits();
    // bits = 20 for 1 MiB; MASKS has 26 entries, so both indices are in range.
    let small = v2020::MASKS
        .get((bits + level) as usize)
        .copied()
        .unwrap_or(u64::MAX);
    let large = v2020::MASKS
        .get((bits - level) as usize)
        .copied()
        .unwrap_or(0);
    (small, large)
}

/// [`fastcdc_masks`], as the chunker keeps them.
#[derive(Debug, Clone, Copy)]
struct Masks {
    small: u64,
    large: u64,
}

impl Masks {
    fn new() -> Self {
        let (small, large) = fastcdc_masks();
        Self { small, large }
    }

    /// Length of the next chunk at the start of `data`.
    fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = v2020::cut(
            data,
            MIN_CHUNK_SIZE as usize,
            AVG_CHUNK_SIZE as usize,
            MAX_CHUNK_SIZE as usize,
            self.small,
            self.large,
            self.small << 1,
            self.large << 1,
        );
        len
    }
}

/// Incremental chunker and hasher. See the module docs.
#[derive(Debug)]
pub struct Chunker {
    masks: Masks,
    /// Unchunked bytes live in `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    /// File offset of `buf[start]`.
    offset: u64,
    file_hasher: blake3::Hasher,
    chunks: Vec<ChunkRef>,
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunker {
    /// A chunker at the start of a file.
    pub fn new() -> Self {
        Self {
            masks: Masks::new(),
            buf: Vec::new(),
            start: 0,
            offset: 0,
            file_hasher: blake3::Hasher::new(),
            chunks: Vec::new(),
        }
    }

    /// Total bytes fed so far.
    pub fn bytes_fed(&self) -> u64 {
        self.offset + (self.buf.len() - self.start) as u64
    }

    /// Chunks completed so far (all but the tail still buffered).
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, data: &[u8]) -> Result<(), ChunkError> {
        if self.bytes_fed().saturating_add(data.len() as u64) > MAX_FILE_SIZE {
            return Err(ChunkError::FileTooLarge { max: MAX_FILE_SIZE });
        }
        self.file_hasher.update(data);
        // Compact lazily: moving the unchunked tail (< MAX_CHUNK_SIZE bytes)
        // only after at least MAX_CHUNK_SIZE bytes were consumed keeps the
        // copying overhead below one extra pass over the data.
        if self.start >= MAX_CHUNK_SIZE as usize {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        while self.buf.len() - self.start >= MAX_CHUNK_SIZE as usize {
            self.cut_one();
        }
        Ok(())
    }

    /// Ends the file: chunks the buffered tail and returns the digest.
    pub fn finish(mut self) -> FileDigest {
        while self.buf.len() > self.start {
            self.cut_one();
        }
        FileDigest {
            size: self.offset,
            file_hash: self.file_hasher.finalize().into(),
            chunks: self.chunks,
        }
    }

    fn cut_one(&mut self) {
        let pending = &self.buf[self.start..];
        // FastCDC never returns 0 for non-empty input; guard anyway so a
        // library change cannot make this loop forever.
        let len = self.masks.cut(pending).clamp(1, pending.len());
        let data = &pending[..len];
        // len <= MAX_CHUNK_SIZE (FastCDC caps it), so it fits in u32.
        let len32 = u32::try_from(len).unwrap_or(MAX_CHUNK_SIZE);
        self.chunks.push(ChunkRef {
            offset: self.offset,
            len: len32,
            hash: Hash::of(data),
        });
        self.offset += len as u64;
        self.start += len;
    }
}

/// Chunks and hashes everything `reader` yields, reading 1 MiB at a time.
pub fn digest_reader<R: Read>(mut reader: R) -> Result<FileDigest, ChunkError> {
    let mut chunker = Chunker::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        chunker.update(&block[..n])?;
    }
    Ok(chunker.finish())
}

/// Chunks and hashes an in-memory file.
pub fn digest_bytes(data: &[u8]) -> Result<FileDigest, ChunkError> {
    let mut chunker = Chunker::new();
    chunker.update(data)?;
    Ok(chunker.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Deterministic pseudo-random bytes (xorshift64*), so tests need no RNG
    /// dependency and are reproducible.
    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn check_invariants(data: &[u8], digest: &FileDigest) {
        assert_eq!(digest.size, data.len() as u64);
        assert_eq!(digest.file_hash, Hash::of(data));
        let mut offset = 0u64;
        for (i, c) in digest.chunks.iter().enumerate() {
            assert_eq!(c.offset, offset);
            assert!(c.len <= MAX_CHUNK_SIZE);
            if i + 1 < digest.chunks.len() {
                assert!(c.len >= MIN_CHUNK_SIZE, "chunk {i} is {} bytes", c.len);
            }
            let start = usize::try_from(c.offset).unwrap();
            assert_eq!(c.hash, Hash::of(&data[start..start + c.len as usize]));
            offset += u64::from(c.len);
        }
        assert_eq!(offset, data.len() as u64);
    }

    #[test]
    fn matches_whole_buffer_fastcdc_for_any_feed_size() {
        let data = pseudo_random(12 << 20, 42);
        let reference: Vec<(usize, usize)> =
            v2020::FastCDC::new(&data, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE)
                .map(|c| (c.offset, c.length))
                .collect();
        assert!(reference.len() > 4, "expected several chunks");
        for feed in [1000, 65_536, 1 << 20, 3 << 20, 5 << 20, data.len()] {
            let mut chunker = Chunker::new();
            for piece in data.chunks(feed) {
                chunker.update(piece).unwrap();
            }
            let digest = chunker.finish();
            check_invariants(&data, &digest);
            let ours: Vec<(usize, usize)> = digest
                .chunks
                .iter()
                .map(|c| (usize::try_from(c.offset).unwrap(), c.len as usize))
                .collect();
            assert_eq!(ours, reference, "feed size {feed}");
        }
    }

    #[test]
    fn small_empty_and_uniform_files() {
        let empty = digest_bytes(&[]).unwrap();
        assert_eq!(empty.size, 0);
        assert!(empty.chunks.is_empty());
        assert_eq!(empty.file_hash, Hash::of(b""));

        let small = digest_bytes(b"hello").unwrap();
        check_invariants(b"hello", &small);
        assert_eq!(small.chunks.len(), 1);

        // Zeros have no content-defined cut points: cut at the maximum.
        let zeros = vec![0u8; 9 << 20];
        let digest = digest_bytes(&zeros).unwrap();
        check_invariants(&zeros, &digest);
        assert_eq!(
            digest.chunks.iter().map(|c| c.len).collect::<Vec<_>>(),
            vec![MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, 1 << 20]
        );
        // ...and the two full chunks are identical, i.e. deduplicated.
        assert_eq!(digest.chunks[0].hash, digest.chunks[1].hash);
    }

    #[test]
    fn reader_api_matches_slice_api() {
        let data = pseudo_random(3 << 20, 7);
        let from_reader = digest_reader(std::io::Cursor::new(&data)).unwrap();
        assert_eq!(from_reader, digest_bytes(&data).unwrap());
    }

    #[test]
    fn average_chunk_size_is_about_one_mib() {
        let data = pseudo_random(48 << 20, 3);
        let digest = digest_bytes(&data).unwrap();
        check_invariants(&data, &digest);
        let avg = data.len() / digest.chunks.len();
        assert!(
            ((1 << 20) * 3 / 4..=(1 << 20) * 2).contains(&avg),
            "average chunk {avg} bytes over {} chunks",
            digest.chunks.len()
        );
    }

    #[test]
    fn insertion_near_the_start_changes_only_a_few_chunks() {
        let original = pseudo_random(32 << 20, 11);
        let mut edited = original[..1000].to_vec();
        edited.extend_from_slice(b"an inserted clause in the contract");
        edited.extend_from_slice(&original[1000..]);

        let before = digest_bytes(&original).unwrap();
        let after = digest_bytes(&edited).unwrap();
        let old: HashSet<Hash> = before.chunks.iter().map(|c| c.hash).collect();
        let new_chunks: Vec<&ChunkRef> = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .collect();
        assert!(before.chunks.len() >= 16);
        assert!(
            (1..=2).contains(&new_chunks.len()),
            "{} of {} chunks changed",
            new_chunks.len(),
            after.chunks.len()
        );
        let resent: u64 = new_chunks.iter().map(|c| u64::from(c.len)).sum();
        assert!(resent <= 2 * u64::from(MAX_CHUNK_SIZE));
        assert_ne!(before.file_hash, after.file_hash);
    }

    /// A file built from runs of pseudo-random bytes (cut points where the
    /// content says) and of one repeated byte (no cut point: cut at the
    /// maximum), the lengths chosen around the chunker's bounds.
    fn mixed_file(runs: &[(bool, usize, u64)]) -> Vec<u8> {
        let mut data = Vec::new();
        for &(random, len, seed) in runs {
            if random {
                data.extend_from_slice(&pseudo_random(len, seed));
            } else {
                data.resize(data.len() + len, seed.to_le_bytes()[0]);
            }
        }
        data
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever the content and however it is fed, the chunker cuts no
        /// chunk but the last below MIN_CHUNK_SIZE, so every manifest a
        /// real client sends passes the server's validation.
        #[test]
        fn every_chunk_but_the_last_is_at_least_the_minimum(
            runs in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    proptest::prop_oneof![
                        0..=2 * MIN_CHUNK_SIZE as usize,
                        MIN_CHUNK_SIZE as usize - 2..=MIN_CHUNK_SIZE as usize + 2,
                        MAX_CHUNK_SIZE as usize - 2..=MAX_CHUNK_SIZE as usize + 2,
                    ],
                    proptest::num::u64::ANY,
                ),
                0..4,
            ),
            feed in 1usize..(3 << 20),
        ) {
            let data = mixed_file(&runs);
            let mut chunker = Chunker::new();
            for piece in data.chunks(feed) {
                chunker.update(piece).unwrap();
            }
            let digest = chunker.finish();
            check_invariants(&data, &digest);
            let manifest = digest.to_manifest(
                &RelPath::parse("p").unwrap(),
                Mtime { secs: 0, nanos: 0 },
            );
            proptest::prop_assert_eq!(
                crate::manifest::validate(manifest).map(|_| ()),
                Ok(())
            );
        }
    }

    #[test]
    fn refuses_files_over_the_limit() {
        let mut chunker = Chunker::new();
        // Pretend most of the limit was already chunked.
        chunker.offset = MAX_FILE_SIZE - 10;
        assert!(chunker.update(&[0; 10]).is_ok());
        assert!(matches!(
            chunker.update(&[0; 1]),
            Err(ChunkError::FileTooLarge { .. })
        ));
    }
}
