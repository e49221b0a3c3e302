//! Manifest validation: the server's first line of defence for an upload and
//! the client's check of a download's manifest.

use crate::hash::Hash;
use crate::limits::{MAX_CHUNKS_PER_MANIFEST, MAX_CHUNK_SIZE, MAX_FILE_SIZE, MIN_CHUNK_SIZE};
use crate::message::{ChunkRef, Manifest, ManifestProblem, Mtime, WireError};
use crate::path::RelPath;
use std::collections::HashMap;

/// A manifest that passed [`validate`]: its path is a [`RelPath`], its size is
/// within [`MAX_FILE_SIZE`], its chunks are contiguous, cover exactly
/// `0..size`, are each `1..=MAX_CHUNK_SIZE` bytes, every one but the last
/// is at least [`MIN_CHUNK_SIZE`] bytes (as the protocol's chunker cuts
/// them), there are at most [`MAX_CHUNKS_PER_MANIFEST`] of them, and a hash
/// that repeats always has the same length.
///
/// The minimum is what ties a manifest's length to its file's size: a
/// file of `size` bytes lists at most `size / MIN_CHUNK_SIZE + 1` chunks,
/// so the per-chunk state the server keeps for an open upload (see
/// [`crate::limits::SERVER_BYTES_PER_LISTED_CHUNK`]) is paid for by bytes
/// that admission counts against the client's quota, not by a 128 KiB
/// file cut into 1-byte chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidManifest {
    pub path: RelPath,
    pub size: u64,
    pub mtime: Mtime,
    pub file_hash: Hash,
    pub chunks: Vec<ChunkRef>,
}

impl ValidManifest {
    /// The wire form.
    pub fn to_manifest(&self) -> Manifest {
        Manifest {
            path: self.path.as_str().to_owned(),
            size: self.size,
            mtime: self.mtime,
            file_hash: self.file_hash,
            chunks: self.chunks.clone(),
        }
    }

    /// Distinct chunk hashes with their lengths, in order of first occurrence.
    pub fn distinct_chunks(&self) -> Vec<(Hash, u32)> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        self.chunks
            .iter()
            .filter(|c| seen.insert(c.hash))
            .map(|c| (c.hash, c.len))
            .collect()
    }
}

/// Checks every structural rule of a manifest, cheapest checks first, and
/// returns the typed error to send back on failure.
pub fn validate(manifest: Manifest) -> Result<ValidManifest, WireError> {
    let count = manifest.chunks.len();
    if count > MAX_CHUNKS_PER_MANIFEST as usize {
        return Err(WireError::ManifestTooLarge {
            chunks: count as u64,
            max: MAX_CHUNKS_PER_MANIFEST,
        });
    }
    if manifest.size > MAX_FILE_SIZE {
        return Err(WireError::FileTooLarge {
            size: manifest.size,
            max: MAX_FILE_SIZE,
        });
    }
    let path =
        RelPath::parse(&manifest.path).map_err(|reason| WireError::PathRejected { reason })?;
    if !manifest.mtime.is_valid() {
        return Err(invalid(ManifestProblem::BadMtime {
            nanos: manifest.mtime.nanos,
        }));
    }
    let mut expected = 0u64;
    let mut lengths: HashMap<Hash, u32> = HashMap::with_capacity(count);
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        // `count` is at most MAX_CHUNKS_PER_MANIFEST, so the index fits.
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        if chunk.len == 0 || chunk.len > MAX_CHUNK_SIZE {
            return Err(invalid(ManifestProblem::BadChunkLength {
                index,
                len: chunk.len,
                max: MAX_CHUNK_SIZE,
            }));
        }
        if chunk.len < MIN_CHUNK_SIZE && index as usize + 1 < count {
            return Err(invalid(ManifestProblem::ChunkTooSmall {
                index,
                len: chunk.len,
                min: MIN_CHUNK_SIZE,
            }));
        }
        if chunk.offset != expected {
            return Err(invalid(ManifestProblem::NotContiguous {
                index,
                offset: chunk.offset,
                expected,
            }));
        }
        // Cannot overflow: expected <= MAX_FILE_SIZE-ish bounds are checked
        // below, and each step adds at most 4 MiB to a value <= size.
        expected = expected.saturating_add(u64::from(chunk.len));
        if expected > manifest.size {
            return Err(invalid(ManifestProblem::SizeMismatch {
                covered: expected,
                size: manifest.size,
            }));
        }
        if *lengths.entry(chunk.hash).or_insert(chunk.len) != chunk.len {
            return Err(invalid(ManifestProblem::InconsistentChunk {
                hash: chunk.hash,
            }));
        }
    }
    if expected != manifest.size {
        return Err(invalid(ManifestProblem::SizeMismatch {
            covered: expected,
            size: manifest.size,
        }));
    }
    Ok(ValidManifest {
        path,
        size: manifest.size,
        mtime: manifest.mtime,
        file_hash: manifest.file_hash,
        chunks: manifest.chunks,
    })
}

fn invalid(reason: ManifestProblem) -> WireError {
    WireError::ManifestInvalid { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::PathRejection;

    fn chunk(offset: u64, len: u32, tag: u8) -> ChunkRef {
        ChunkRef {
            offset,
            len,
            hash: Hash([tag; 32]),
        }
    }

    /// The minimum length of every chunk but the last.
    const M: u32 = MIN_CHUNK_SIZE;
    const M64: u64 = MIN_CHUNK_SIZE as u64;

    fn manifest(size: u64, chunks: Vec<ChunkRef>) -> Manifest {
        Manifest {
            path: "docs/a.pdf".into(),
            size,
            mtime: Mtime { secs: 1, nanos: 0 },
            file_hash: Hash([9; 32]),
            chunks,
        }
    }

    #[test]
    fn accepts_a_consistent_manifest() {
        let m = manifest(
            3 * M64 + 10,
            vec![
                chunk(0, M, 1),
                chunk(M64, M, 2),
                chunk(2 * M64, M, 1),
                chunk(3 * M64, 10, 3),
            ],
        );
        let valid = validate(m).unwrap();
        assert_eq!(valid.path.as_str(), "docs/a.pdf");
        assert_eq!(
            valid.distinct_chunks(),
            vec![(Hash([1; 32]), M), (Hash([2; 32]), M), (Hash([3; 32]), 10)]
        );
        assert!(validate(manifest(0, vec![])).is_ok());
        // A file smaller than the minimum is one short chunk.
        assert!(validate(manifest(1, vec![chunk(0, 1, 1)])).is_ok());
    }

    #[test]
    fn rejects_each_problem_with_its_own_error() {
        assert_eq!(
            validate(manifest(10, vec![chunk(1, 10, 1)])),
            Err(invalid(ManifestProblem::NotContiguous {
                index: 0,
                offset: 1,
                expected: 0
            }))
        );
        assert_eq!(
            validate(manifest(
                M64 + 5,
                vec![chunk(0, M, 1), chunk(M64 + 1, 4, 2)]
            )),
            Err(invalid(ManifestProblem::NotContiguous {
                index: 1,
                offset: M64 + 1,
                expected: M64
            }))
        );
        assert_eq!(
            validate(manifest(10, vec![chunk(0, 0, 1)])),
            Err(invalid(ManifestProblem::BadChunkLength {
                index: 0,
                len: 0,
                max: MAX_CHUNK_SIZE
            }))
        );
        assert!(matches!(
            validate(manifest(
                u64::from(MAX_CHUNK_SIZE) + 1,
                vec![chunk(0, MAX_CHUNK_SIZE + 1, 1)]
            )),
            Err(WireError::ManifestInvalid {
                reason: ManifestProblem::BadChunkLength { .. }
            })
        ));
        assert_eq!(
            validate(manifest(11, vec![chunk(0, 10, 1)])),
            Err(invalid(ManifestProblem::SizeMismatch {
                covered: 10,
                size: 11
            }))
        );
        assert_eq!(
            validate(manifest(5, vec![chunk(0, 10, 1)])),
            Err(invalid(ManifestProblem::SizeMismatch {
                covered: 10,
                size: 5
            }))
        );
        assert_eq!(
            validate(manifest(M64 + 5, vec![chunk(0, M, 1), chunk(M64, 5, 1)])),
            Err(invalid(ManifestProblem::InconsistentChunk {
                hash: Hash([1; 32])
            }))
        );
        assert_eq!(
            validate(manifest(
                2 * M64,
                vec![
                    chunk(0, M, 1),
                    chunk(M64, M - 1, 2),
                    chunk(2 * M64 - 1, 1, 3)
                ]
            )),
            Err(invalid(ManifestProblem::ChunkTooSmall {
                index: 1,
                len: M - 1,
                min: M
            }))
        );
        let mut bad_time = manifest(0, vec![]);
        bad_time.mtime.nanos = 1_000_000_000;
        assert!(matches!(
            validate(bad_time),
            Err(WireError::ManifestInvalid {
                reason: ManifestProblem::BadMtime { .. }
            })
        ));
        let mut bad_path = manifest(0, vec![]);
        bad_path.path = "../../etc/shadow".into();
        assert_eq!(
            validate(bad_path),
            Err(WireError::PathRejected {
                reason: PathRejection::DotDotComponent
            })
        );
    }

    /// A small file cut into many tiny chunks would carry a full-length
    /// manifest (and the server's per-chunk state for it) while admission
    /// only counts its few bytes: refused at its first chunk, with an
    /// error that names it.
    #[test]
    fn refuses_a_small_file_in_tiny_chunks() {
        let n = MAX_CHUNKS_PER_MANIFEST;
        let chunks = (0..n)
            .map(|i| ChunkRef {
                offset: u64::from(i),
                len: 1,
                hash: Hash::of(&i.to_le_bytes()),
            })
            .collect();
        let refused = validate(manifest(u64::from(n), chunks)).unwrap_err();
        assert_eq!(
            refused,
            invalid(ManifestProblem::ChunkTooSmall {
                index: 0,
                len: 1,
                min: M
            })
        );
        assert_eq!(
            refused.to_string(),
            format!(
                "manifest is inconsistent: chunk 0 has length 1, but every chunk except the last must be at least {M} bytes"
            )
        );
    }

    #[test]
    fn rejects_absurd_sizes_and_counts_before_looking_further() {
        assert_eq!(
            validate(manifest(u64::MAX, vec![])),
            Err(WireError::FileTooLarge {
                size: u64::MAX,
                max: MAX_FILE_SIZE
            })
        );
        let too_many = vec![chunk(0, 1, 0); MAX_CHUNKS_PER_MANIFEST as usize + 1];
        let mut m = manifest(0, too_many);
        m.path = "/absolute".into(); // not reached: the count is checked first
        assert_eq!(
            validate(m),
            Err(WireError::ManifestTooLarge {
                chunks: u64::from(MAX_CHUNKS_PER_MANIFEST) + 1,
                max: MAX_CHUNKS_PER_MANIFEST
            })
        );
    }
}
