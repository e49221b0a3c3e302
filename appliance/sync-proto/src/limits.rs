//! Protocol limits. Every allocation driven by peer input is bounded by one of
//! these, checked before allocating. The reasons are part of the contract: the
//! limits are chosen so that every legal object fits every frame that carries it.

/// Target average content-defined chunk size (fastcdc `avg`). About 1 MiB, as
/// the design asks: large enough that per-chunk overhead (one hash, one frame,
/// one chunk-store entry) is negligible against the data, small enough that an
/// edit near the start of a large scan re-sends about one megabyte.
pub const AVG_CHUNK_SIZE: u32 = 1 << 20;

/// Minimum chunk size (fastcdc `min`): a quarter of the average. FastCDC skips
/// this many bytes before looking for a cut point ("cut-point skipping"), which
/// both speeds up chunking and guarantees that no chunk but a file's last is
/// smaller than this. That lower bound is what lets [`MAX_FILE_SIZE`] be
/// derived from [`MAX_CHUNKS_PER_MANIFEST`]. A quarter keeps dedup quality:
/// boundaries shifted by an insertion re-synchronise within a chunk or two.
pub const MIN_CHUNK_SIZE: u32 = 256 << 10;

/// Maximum chunk size (fastcdc `max`): four times the average. Low-entropy data
/// (runs of zeros in disk images, blank scan pages) has no natural cut points,
/// so chunks there are cut at this size. Four MiB bounds the memory one chunk in
/// flight costs on either side, and keeps a chunk frame within
/// [`MAX_FRAME_LEN`] with room for its header.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;

/// Maximum number of chunks one manifest may list. A chunk entry costs at most
/// [`MAX_ENCODED_CHUNK_REF_LEN`] bytes on the wire, so a full manifest is about
/// 5.5 MiB and fits [`MAX_FRAME_LEN`]. The server keeps about
/// [`SERVER_BYTES_PER_LISTED_CHUNK`] bytes per listed chunk while the upload
/// is open (about 80 MiB for a full manifest); what bounds that per
/// connection is [`MAX_OPEN_MANIFEST_CHUNKS`].
pub const MAX_CHUNKS_PER_MANIFEST: u32 = 1 << 17;

/// Largest file that can be uploaded: `MAX_CHUNKS_PER_MANIFEST * MIN_CHUNK_SIZE`
/// = 32 GiB. Because every chunk but the last is at least [`MIN_CHUNK_SIZE`],
/// any file up to this size is guaranteed to chunk into at most
/// [`MAX_CHUNKS_PER_MANIFEST`] chunks, whatever its content. The appliance
/// stores documents (contracts, statements, scans); 32 GiB leaves room for
/// large archives and videos while keeping manifests in one frame.
pub const MAX_FILE_SIZE: u64 = MAX_CHUNKS_PER_MANIFEST as u64 * MIN_CHUNK_SIZE as u64;

/// Upper bound on the encoded size of one chunk reference in a manifest:
/// offset varint (at most 10 bytes) + length varint (at most 5) + 32-byte hash.
pub const MAX_ENCODED_CHUNK_REF_LEN: usize = 10 + 5 + 32;

/// Maximum frame payload length (the postcard body, after the header). 8 MiB:
/// the largest legal frames are a full manifest (~6.2 MiB, see
/// [`MAX_CHUNKS_PER_MANIFEST`]) and a maximum chunk (4 MiB + ~40 bytes). The
/// decoder rejects a larger length prefix before buffering a single body byte.
pub const MAX_FRAME_LEN: u32 = 8 << 20;

/// Maximum length in bytes of a relative path. Linux `PATH_MAX` is 4096 and
/// includes the client root and the staging prefix on the server; 1024 leaves
/// ample room for both while being far beyond any real document name.
pub const MAX_PATH_LEN: usize = 1024;

/// Maximum length in bytes of one path component. Linux `NAME_MAX` is 255; the
/// server needs room to append a version suffix (`.~12345~`) or a staging
/// suffix to a name without exceeding it, so we keep 55 bytes in reserve.
pub const MAX_COMPONENT_LEN: usize = 200;

/// Maximum number of components in a path. Bounds the directories the server
/// may have to create for one upload and the recursion of any tree walk.
pub const MAX_PATH_DEPTH: usize = 64;

/// Maximum entries in one list reply page. An entry is at most ~1.1 KiB
/// (path + size + hash + mtime), so a page stays below 5 MiB.
pub const MAX_LIST_ENTRIES: u32 = 4096;

/// Maximum length of free-text fields (client agent string, storage error
/// detail). Long enough for a useful message, short enough to log safely.
pub const MAX_TEXT_LEN: usize = 512;

/// How often one chunk may fail hash verification in one upload before the
/// server gives up on the upload. A flipped bit on a bad link deserves a retry;
/// a client that keeps sending wrong data for the same hash is broken or
/// hostile, and re-requesting forever would let it burn the server's CPU.
pub const MAX_CHUNK_RETRIES: u32 = 3;

/// Idle timeout of an upload session on either side: if no frame arrives for
/// this long while the session waits for its peer, it fails with a timeout.
/// A bad link may stall for tens of seconds; two minutes tolerates that while
/// freeing the server's session and staging promptly for a vanished client.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Concurrent uploads one connection may have open in protocol version 1:
/// 8 files in flight already keep a fast link busy (each upload itself
/// sends its chunks over parallel streams). The memory their state takes
/// is bounded by [`MAX_OPEN_MANIFEST_CHUNKS`], not by this count.
pub const MAX_UPLOADS_PER_CONNECTION: u32 = 8;

/// Concurrent uploads on a connection that negotiated protocol version 2.
/// Small files are latency-bound (a round trip, a staging file and two
/// fsyncs each), and ext4 commits the fsyncs that wait together in one
/// journal transaction, so more of them in flight is faster: 2,000 files
/// of 32 KiB on loopback went from about 1,000 to 1,400 files per second
/// on a loaded 2-core machine from 8 to 32. The memory bound is kept by
/// [`MAX_OPEN_MANIFEST_CHUNKS`].
pub const MAX_UPLOADS_PER_CONNECTION_V2: u32 = 32;

/// Bytes the server holds per chunk listed by an open upload, worst case
/// (every chunk distinct, every chunk arrived), measured on the real
/// server code by `appliance-sync`'s `upload_memory` test (587 bytes just
/// past a hash table's growth, 529 at a full manifest), rounded up for the
/// allocator's overhead on the one small allocation per chunk:
/// - the protocol machine ([`crate::ServerUpload`]): the manifest's
///   `ChunkRef`s (48 bytes each) and two hash maps over the distinct chunks
///   (lengths, pending);
/// - the sync adapter's staging state (`appliance_sync::store::Staged`): its
///   own copy of the manifest, a map from each chunk to its positions (a
///   small vector each), and the landed and recorded sets, which grow to
///   every chunk as they arrive.
///
/// Sharing one manifest between the two layers would save 48 bytes of
/// this; the maps are most of it.
pub const SERVER_BYTES_PER_LISTED_CHUNK: u64 = 640;

/// Bytes the server holds per open upload whatever its size (the session,
/// the staging state's structure, empty maps, its file handles): measured
/// as under 4 KiB by the same test, doubled for the allocator and the
/// adapter's own bookkeeping.
pub const SERVER_BYTES_PER_UPLOAD: u64 = 8 << 10;

/// Chunks the manifests of one connection's open uploads may list in
/// total: one full manifest's worth. At [`SERVER_BYTES_PER_LISTED_CHUNK`]
/// that is 80 MiB, so a connection's open-upload state stays within
/// [`MAX_OPEN_UPLOAD_STATE_BYTES`] (about 80 MiB; the server allows a
/// client 4 connections) however many uploads are open. Because every chunk
/// but a file's last is at least [`MIN_CHUNK_SIZE`], this many chunks are at
/// least 32 GiB of files in flight (about 128 GiB at the average chunk
/// size), which no real push needs at once; the client waits for earlier
/// uploads of a connection to end before listing more. An upload that would
/// exceed it is refused with `TooManyUploads`, like one over the count.
///
/// It was 8 full manifests while the server's state per chunk was taken to
/// be the protocol machine's alone (~80 bytes); with the adapter's staging
/// state it is ~600, and 8 full manifests held about 530 MiB per
/// connection.
pub const MAX_OPEN_MANIFEST_CHUNKS: u64 = MAX_CHUNKS_PER_MANIFEST as u64;

/// The documented bound on the server's open-upload state per connection:
/// the chunks of [`MAX_OPEN_MANIFEST_CHUNKS`] plus the fixed part of every
/// upload version 2 lets a connection open (80.25 MiB). Transient copies
/// while an upload starts (the frame, the validation's maps, the
/// `NeedChunks` reply) come on top for the uploads being started.
pub const MAX_OPEN_UPLOAD_STATE_BYTES: u64 = MAX_OPEN_MANIFEST_CHUNKS
    * SERVER_BYTES_PER_LISTED_CHUNK
    + MAX_UPLOADS_PER_CONNECTION_V2 as u64 * SERVER_BYTES_PER_UPLOAD;

/// The concurrent-upload limit of a connection speaking `version`.
pub const fn max_uploads(version: u16) -> u32 {
    if version >= 2 {
        MAX_UPLOADS_PER_CONNECTION_V2
    } else {
        MAX_UPLOADS_PER_CONNECTION
    }
}
