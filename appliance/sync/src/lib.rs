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
