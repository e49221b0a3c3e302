//! The appliance's document sync over QUIC (issue 7): the server the daemon
//! runs, the client library, the enrollment CA, and the `appliance-sync`
//! binary.
//!
//! # Shape
//! ```text
//!  appliance-sync ──QUIC (TLS 1.3, ALPN appliance-sync/1, mutual auth)──▶ server
//!   client.rs                                                         server.rs
//!     chunk + hash (sync-proto)                     EnrolledClientVerifier (tls.rs)
//!     ClientUpload machine                          ServerConnection machine (sync-proto)
//!     chunks over N uni streams                     ├─ Admission (admission.rs)
//!                                                    ├─ ClientStore (store.rs): chunk store,
//!                                                    │   staging, verified atomic commit
//!                                                    └─ EventSink (events.rs)
//! ```
//! - [`identity`]: the CA, server certificate and client registry; enroll,
//!   list, revoke. Files 0600 in a 0700 directory.
//! - [`tls`]: rustls configs (ring provider, TLS 1.3 only); the verifier
//!   refuses unknown, self-signed and revoked clients during the handshake.
//! - [`store`]: one directory per client; content-addressed chunks;
//!   assemble → verify → fsync → rename → fsync dir; symlink-safe `openat`.
//! - [`admission`]: the [`admission::Admission`] seam to the storage
//!   manager, and [`admission::LocalAdmission`] (own accounting + statvfs).
//! - [`server`]: [`server::serve`], one actor task per connection driving
//!   the sans-IO state machine; every protocol decision is made there, the
//!   adapter only moves bytes and runs storage IO on blocking threads.
//! - [`client`]: [`client::SyncClient`], used by the binary and the tests.
//! - [`digest`]: the client's pipelined chunking/hashing and its digest
//!   cache keyed by `(dev, inode, size, mtime, ctime)`.
//!
//! # Invariants
//! - No byte of storage is touched for a client whose certificate is not
//!   enrolled and unrevoked: the verifier runs in the handshake and the
//!   client's store is opened only after it.
//! - A document is complete and verified on disk or absent: it is renamed
//!   into place only after its whole-file BLAKE3 matched and it was fsynced.
//! - Resume relies only on a staging file's durable record, which lists a
//!   chunk only after the data file was fdatasynced with it (chunks are
//!   acknowledged to the protocol once written; the commit fsyncs the
//!   whole file before the rename).
//! - Revocation is persisted before it is announced; live connections of
//!   the revoked client are closed on the announcement.
//!
//! # For the daemon
//! Build an [`identity::Authority`] (under the state dir), a
//! [`store::Documents`] with a [`admission::UsageLedger`], an
//! [`admission::Admission`] and an [`events::EventSink`]; call
//! [`server::serve`] with a `CancellationToken`. `appliancectl sync client
//! add|list|revoke` map to [`identity::Authority::enroll`], `list` and
//! `revoke` on the same `Arc<Authority>` (revoke closes live connections).
//!
//! # Benchmark
//! Issue 7's benchmark — (a) one 1 GiB file, (b) 2,000 files of 32 KiB,
//! (c) a re-push of (a) — against `rsync -e ssh` and `scp` to a throwaway
//! sshd it starts on 127.0.0.1, and a bare quinn stream sink, printing a
//! table and PASS/MISS per target (needs `openssh-server` and `rsync`):
//! ```text
//! cargo bench -p appliance-sync --bench sync_bench
//! ```
//! See `benches/sync_bench.rs` for the knobs (`SYNC_BENCH_REPS`, ...).
//!
//! Constants and their reasons are documented where they are defined
//! ([`server`] limits, [`admission::DEFAULT_RESERVE`],
//! [`identity::MAX_CLIENT_NAME_LEN`]); protocol limits live in
//! `appliance_sync_proto::limits`.

pub mod admission;
pub mod client;
pub mod digest;
pub mod events;
pub mod fsutil;
pub mod identity;
pub mod server;
pub mod store;
pub mod tls;
pub mod wire;

/// The server's state per open upload, measured: what
/// [`appliance_sync_proto::limits::SERVER_BYTES_PER_LISTED_CHUNK`] claims.
#[cfg(test)]
mod upload_memory {
    #![allow(clippy::unwrap_used)]
    use crate::identity::ClientName;
    use crate::store::ClientStore;
    use appliance_sync_proto::limits::{
        MAX_CHUNKS_PER_MANIFEST, MAX_OPEN_MANIFEST_CHUNKS, MAX_OPEN_UPLOAD_STATE_BYTES,
        MAX_UPLOADS_PER_CONNECTION_V2, MIN_CHUNK_SIZE, SERVER_BYTES_PER_LISTED_CHUNK,
        SERVER_BYTES_PER_UPLOAD,
    };
    use appliance_sync_proto::message::{ChunkRef, Manifest, Mtime, UploadId};
    use appliance_sync_proto::server::{
        Admission, AdmissionRequest, ChunkIndex, Refusal, ServerUpload,
    };
    use appliance_sync_proto::Hash;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Counts the bytes allocated and not yet freed by each thread, so a
    /// measurement on one test's thread is not disturbed by the others.
    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        let _ = LIVE.try_with(|live| live.set(live.get() + delta));
    }

    // Test-only: the measurement needs a global allocator, which is an
    // unsafe trait; each method only forwards to `System`.
    #[allow(unsafe_code, clippy::cast_possible_wrap)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            System.alloc(layout)
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            System.alloc_zeroed(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            System.dealloc(ptr, layout);
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    fn live() -> isize {
        LIVE.with(Cell::get)
    }

    /// A store with no chunks that admits everything.
    struct Empty;
    impl ChunkIndex for Empty {
        fn has_chunk(&self, _: &Hash) -> bool {
            false
        }
    }
    impl Admission for Empty {
        fn admit(&mut self, _: &AdmissionRequest<'_>) -> Result<(), Refusal> {
            Ok(())
        }
    }

    /// Bytes the server holds for one open upload whose manifest lists `n`
    /// distinct minimum-size chunks (the worst case per chunk): the
    /// decoded manifest the protocol machine keeps with its maps, the
    /// staging state (`ClientStore::stage`, as the server prepares an
    /// upload: its own manifest copy and position map), and the staging
    /// state's landed and recorded sets once every chunk arrived (sets of
    /// the same type, filled here: filling the real ones takes writing
    /// `n` chunks of 256 KiB).
    fn open_upload_bytes(store: &ClientStore, n: u32) -> usize {
        let before = live();
        let chunks: Vec<ChunkRef> = (0..n)
            .map(|i| ChunkRef {
                offset: u64::from(i) * u64::from(MIN_CHUNK_SIZE),
                len: MIN_CHUNK_SIZE,
                hash: Hash::of(&i.to_le_bytes()),
            })
            .collect();
        let manifest = Manifest {
            path: format!("big{n}.bin"),
            size: u64::from(n) * u64::from(MIN_CHUNK_SIZE),
            mtime: Mtime { secs: 1, nanos: 0 },
            file_hash: Hash([7; 32]),
            chunks,
        };
        let valid = appliance_sync_proto::validate_manifest(manifest.clone()).unwrap();
        let staged = store.stage(&valid).unwrap();
        drop(valid);
        let (session, actions) =
            ServerUpload::start(UploadId(1), manifest, std::time::Instant::now(), &mut Empty);
        assert!(!session.is_finished(), "{actions:?}");
        drop(actions);
        let mut landed = HashSet::new();
        let mut recorded = HashSet::new();
        for c in &staged.manifest().chunks {
            landed.insert(c.hash);
            recorded.insert(c.hash);
        }
        let held = usize::try_from(live() - before).unwrap();
        drop((session, staged, landed, recorded));
        held
    }

    #[test]
    fn open_upload_state_stays_within_the_documented_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = ClientStore::open(
            ClientName::parse("alice").unwrap(),
            &dir.path().join("alice"),
            false,
            Arc::new(AtomicU64::new(0)),
        )
        .unwrap();
        let fixed = open_upload_bytes(&store, 1) as u64;
        println!("an upload of one chunk: {fixed} bytes");
        assert!(fixed <= SERVER_BYTES_PER_UPLOAD, "{fixed} bytes");
        // Hash tables grow by doubling and are emptiest just after: the
        // most bytes per chunk are right past a growth (7/8 of a power of
        // two), the most in total at a full manifest.
        let mut full = 0;
        for n in [1024, 7169, 114_689, MAX_CHUNKS_PER_MANIFEST] {
            let bytes = open_upload_bytes(&store, n) as u64;
            println!(
                "{n} chunks: {bytes} bytes, {} per chunk",
                bytes / u64::from(n)
            );
            assert!(
                bytes <= SERVER_BYTES_PER_UPLOAD + u64::from(n) * SERVER_BYTES_PER_LISTED_CHUNK,
                "{n} chunks hold {bytes} bytes, over {SERVER_BYTES_PER_LISTED_CHUNK} per chunk"
            );
            full = bytes;
        }
        // The worst a connection can open: its chunk budget in full
        // manifests, and the rest of its uploads small.
        let full_manifests = MAX_OPEN_MANIFEST_CHUNKS / u64::from(MAX_CHUNKS_PER_MANIFEST);
        let others = u64::from(MAX_UPLOADS_PER_CONNECTION_V2) - full_manifests;
        let worst = full_manifests * full + others * fixed;
        println!("worst connection: {worst} bytes, bound {MAX_OPEN_UPLOAD_STATE_BYTES}");
        assert!(worst <= MAX_OPEN_UPLOAD_STATE_BYTES);
        // ... which is the "about 80 MiB" the limits document.
        const _: () = assert!(MAX_OPEN_UPLOAD_STATE_BYTES <= 81 << 20);
    }
}
