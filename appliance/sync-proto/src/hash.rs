//! The content hash used everywhere in the protocol: BLAKE3, 32 bytes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A BLAKE3 hash of a chunk or a whole file.
///
/// On the wire it is 32 raw bytes (no length prefix). `Display` and `Debug`
/// print lowercase hex, as users and logs expect.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Length of a hash in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` in one call.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Option<Self> {
        blake3::Hash::from_hex(text)
            .ok()
            .map(|h| Self(*h.as_bytes()))
    }
}

impl From<blake3::Hash> for Hash {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_known_vector() {
        // BLAKE3 of the empty input, from the BLAKE3 specification.
        let empty = Hash::of(b"");
        assert_eq!(
            empty.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(Hash::from_hex(&empty.to_string()), Some(empty));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_ne!(Hash::of(b"a"), Hash::of(b"b"));
    }

    #[test]
    fn encodes_as_32_raw_bytes() {
        let h = Hash::of(b"x");
        let bytes = postcard::to_allocvec(&h).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..], h.as_bytes());
    }
}
