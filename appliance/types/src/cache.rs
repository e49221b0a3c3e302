//! The agent response cache on the control socket.

use serde::{Deserialize, Serialize};

/// Requests about the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheRequest {
    /// Look up an agent response.
    Get {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// Variant (model and parameters); empty by default.
        variant: String,
    },
    /// Store an agent response. Mutating.
    Put {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// Variant.
        variant: String,
        /// The response.
        response: Vec<u8>,
        /// Time to live in seconds; `None` for the configured default.
        ttl_secs: Option<u64>,
    },
    /// Hits, misses and the rest.
    Stats,
    /// Drop one response (`prompt` given) or all of an agent's. Mutating.
    Invalidate {
        /// Agent id.
        agent: String,
        /// Prompt; `None` drops every response of the agent.
        prompt: Option<String>,
        /// Variant (with `prompt`).
        variant: String,
    },
    /// Start an import: the client then sends the JSON file as
    /// [`CacheRequest::ImportChunk`] frames, ending with an empty one, and
    /// gets one [`CacheResponse::Imported`]. Mutating.
    Import,
    /// A piece of the file being imported.
    ImportChunk(Vec<u8>),
    /// Export every entry as JSON: [`CacheResponse::ExportChunk`] frames,
    /// then [`CacheResponse::Exported`].
    Export,
    /// Look up a response of any size the cache takes (a [`CacheRequest::Get`]
    /// answer is one frame): [`CacheResponse::HitLen`] and then
    /// [`CacheResponse::HitPiece`] frames carrying exactly that many bytes,
    /// or [`CacheResponse::Miss`].
    GetPieces {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// Variant.
        variant: String,
    },
    /// Start storing a response of `len` bytes in pieces. The daemon answers
    /// [`CacheResponse::PutReady`], or an error before a byte is sent (a
    /// `len` over the cache's maximum value size, a TTL of 0); the client then
    /// sends [`CacheRequest::PutPiece`] frames of `len` bytes in all and gets
    /// one [`CacheResponse::Stored`]. The response is stored only once every
    /// byte arrived: a client that goes away part-way stores nothing.
    /// Mutating.
    PutPieces {
        /// Agent id.
        agent: String,
        /// Prompt.
        prompt: String,
        /// Variant.
        variant: String,
        /// The response's length in bytes.
        len: u64,
        /// Time to live in seconds; `None` for the configured default.
        ttl_secs: Option<u64>,
    },
    /// A piece of the response being stored by [`CacheRequest::PutPieces`].
    PutPiece(Vec<u8>),
}

impl CacheRequest {
    /// Whether the request changes the appliance.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            CacheRequest::Put { .. }
                | CacheRequest::Invalidate { .. }
                | CacheRequest::Import
                | CacheRequest::ImportChunk(_)
                | CacheRequest::PutPieces { .. }
                | CacheRequest::PutPiece(_)
        )
    }
}

/// Cache statistics.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CacheStatsView {
    /// Lookups that returned a value.
    pub hits: u64,
    /// Lookups that returned nothing (collisions included).
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// MD5 matches that failed the ownership check.
    pub collisions: u64,
    /// Entries dropped for the byte bound.
    pub evictions: u64,
    /// Entries dropped because their TTL ran out.
    pub expirations: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes charged.
    pub bytes: u64,
    /// The byte bound.
    pub capacity_bytes: u64,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImportSummary {
    /// Agent entries imported.
    pub agent_entries: u64,
    /// Plain keys imported.
    pub plain_entries: u64,
    /// Agent entries whose key was recomputed.
    pub rekeyed: u64,
    /// Already expired, skipped.
    pub expired: u64,
    /// Refused by the limits, skipped.
    pub refused: u64,
    /// Some refused keys.
    pub refused_keys: Vec<String>,
}

/// Answers about the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CacheResponse {
    /// A hit.
    Hit(Vec<u8>),
    /// A miss.
    Miss,
    /// Stored.
    Stored,
    /// Statistics.
    Stats(CacheStatsView),
    /// Entries dropped by an invalidation.
    Invalidated(u64),
    /// The import finished.
    Imported(ImportSummary),
    /// A piece of the export.
    ExportChunk(Vec<u8>),
    /// The export finished.
    Exported {
        /// Entries written.
        written: u64,
        /// Entries skipped because their key, agent, prompt or variant is
        /// not UTF-8 (a response that is not goes out as
        /// `response_base64`).
        skipped_binary: u64,
    },
    /// Answer to [`CacheRequest::GetPieces`]: a hit of this many bytes,
    /// which follow as [`CacheResponse::HitPiece`] frames.
    HitLen(u64),
    /// A piece of a hit.
    HitPiece(Vec<u8>),
    /// The daemon takes the response announced by
    /// [`CacheRequest::PutPieces`]: send its pieces.
    PutReady,
}
