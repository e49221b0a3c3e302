//! Request key encoding: MD5 for addressing, SHA-256 for proof.
//!
//! See the crate documentation for the byte layout and why the lengths
//! follow the fields instead of preceding them.

use md5::{Digest as _, Md5};
use sha2::Sha256;

/// Format version byte that closes every encoding.
pub const ENCODING_VERSION: u8 = 1;

/// Size of the fixed trailer: three little-endian `u64` lengths + version.
pub const TRAILER_LEN: usize = 3 * 8 + 1;

/// A request as the cache sees it: who asked, what, and under which variant
/// (model name and parameters; empty by default).
///
/// All three parts are raw bytes: agent ids and prompts arrive over RESP as
/// binary-safe bulk strings, and nothing in the cache needs them to be UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Agent identifier.
    pub agent: &'a [u8],
    /// Prompt text.
    pub prompt: &'a [u8],
    /// Variant (model and parameters); empty when not given.
    pub variant: &'a [u8],
}

impl<'a> Request<'a> {
    /// A request with the given parts.
    pub fn new(agent: &'a [u8], prompt: &'a [u8], variant: &'a [u8]) -> Self {
        Self {
            agent,
            prompt,
            variant,
        }
    }

    /// The fixed trailer that makes the encoding unambiguous.
    pub fn trailer(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..8].copy_from_slice(&(self.agent.len() as u64).to_le_bytes());
        t[8..16].copy_from_slice(&(self.prompt.len() as u64).to_le_bytes());
        t[16..24].copy_from_slice(&(self.variant.len() as u64).to_le_bytes());
        t[24] = ENCODING_VERSION;
        t
    }

    /// The full encoding as one buffer (for tools and tests; the hashes
    /// below stream the parts without building it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.agent.len() + self.prompt.len() + self.variant.len() + TRAILER_LEN,
        );
        out.extend_from_slice(self.agent);
        out.extend_from_slice(self.prompt);
        out.extend_from_slice(self.variant);
        out.extend_from_slice(&self.trailer());
        out
    }

    /// MD5 of the encoding: the cache key.
    pub fn md5(&self) -> [u8; 16] {
        let mut h = Md5::new();
        h.update(self.agent);
        h.update(self.prompt);
        h.update(self.variant);
        h.update(self.trailer());
        h.finalize().into()
    }

    /// SHA-256 of the encoding: the proof stored with the entry.
    pub fn sha256(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.agent);
        h.update(self.prompt);
        h.update(self.variant);
        h.update(self.trailer());
        h.finalize().into()
    }

    /// Both digests.
    pub fn digests(&self) -> Digests {
        Digests {
            md5: self.md5(),
            sha256: self.sha256(),
        }
    }
}

/// The two digests of one request encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digests {
    /// Cache address.
    pub md5: [u8; 16],
    /// Ownership proof.
    pub sha256: [u8; 32],
}

/// Lower-case hex of an MD5 key, as used by `GET <md5 hex>` and the JSON files.
pub fn md5_hex(md5: &[u8; 16]) -> String {
    hex::encode(md5)
}

/// Parse a 32-character hex MD5 key (either case). `None` if it is not one.
pub fn parse_md5_hex(s: &[u8]) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed independently (Python `hashlib` over the documented
    /// layout), so they pin the format, not this implementation.
    /// (agent, prompt, variant, encoding hex, md5 hex, sha256 hex)
    type Vector = (
        &'static [u8],
        &'static [u8],
        &'static [u8],
        &'static str,
        &'static str,
        &'static str,
    );

    #[test]
    fn encoding_vectors() {
        let cases: [Vector; 5] = [
            (
                b"",
                b"",
                b"",
                "00000000000000000000000000000000000000000000000001",
                "be0d38706d1d396b6c041c49afde8c65",
                "ea72712e10c3ad613a0b9d6fa25b0d92a531981d4974570198d01a5c1fd2eaa2",
            ),
            (
                b"agent-1",
                b"What is RAID-Z2?",
                b"",
                "6167656e742d315768617420697320524149442d5a323f07000000000000001000000000000000000000000000000001",
                "cdfc3ae134a69f68c67e780d84b23ede",
                "6a2bdb14c2e1514166a3b61c56e0f6e9b12bf000d22ebc0dfc68fa5e95b8ef95",
            ),
            (
                b"ab",
                b"c",
                b"",
                "61626302000000000000000100000000000000000000000000000001",
                "c051ad2e461639b315575172cae0be98",
                "ce2735d38df3c95ef7150ee5efbe0ef363483826dee007a95f4d4e897aa63e21",
            ),
            (
                b"a",
                b"bc",
                b"",
                "61626301000000000000000200000000000000000000000000000001",
                "0d1b24ab9d13f2671ca350a3bf330d78",
                "4a8b86efb3783c9f2ebfe5300f679b705e133adb7bff0216d39f301d1b6ca40b",
            ),
            (
                b"agent-1",
                b"What is RAID-Z2?",
                b"model=llama3;t=0.2",
                "6167656e742d315768617420697320524149442d5a323f6d6f64656c3d6c6c616d61333b743d302e3207000000000000001000000000000000120000000000000001",
                "c14a330050a7152cf53ca91ffe80c88f",
                "b6bf627d3862db94fb720cd3705b6f3dc69570168fc1eb7fb6cfcd127844d6cd",
            ),
        ];
        for (agent, prompt, variant, enc, md5, sha) in cases {
            let r = Request::new(agent, prompt, variant);
            assert_eq!(hex::encode(r.encode()), enc, "encoding of {r:?}");
            assert_eq!(md5_hex(&r.md5()), md5, "md5 of {r:?}");
            assert_eq!(hex::encode(r.sha256()), sha, "sha256 of {r:?}");
            // The streamed digests equal digests of the materialised buffer.
            assert_eq!(r.md5(), <[u8; 16]>::from(Md5::digest(r.encode())));
            assert_eq!(r.sha256(), <[u8; 32]>::from(Sha256::digest(r.encode())));
        }
    }

    #[test]
    fn shifting_bytes_between_fields_changes_the_key() {
        let a = Request::new(b"ab", b"c", b"");
        let b = Request::new(b"a", b"bc", b"");
        let c = Request::new(b"a", b"b", b"c");
        assert_ne!(a.encode(), b.encode());
        assert_ne!(a.md5(), b.md5());
        assert_ne!(b.md5(), c.md5());
        assert_ne!(a.sha256(), c.sha256());
    }

    #[test]
    fn md5_hex_round_trip() {
        let k = Request::new(b"x", b"y", b"").md5();
        let h = md5_hex(&k);
        assert_eq!(parse_md5_hex(h.as_bytes()), Some(k));
        assert_eq!(parse_md5_hex(h.to_uppercase().as_bytes()), Some(k));
        assert_eq!(parse_md5_hex(b"abc"), None);
        assert_eq!(parse_md5_hex(&[b'z'; 32]), None);
    }
}
