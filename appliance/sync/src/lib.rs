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
//!
//! # Invariants
//! - No byte of storage is touched for a client whose certificate is not
//!   enrolled and unrevoked: the verifier runs in the handshake and the
//!   client's store is opened only after it.
//! - A document is complete and verified on disk or absent: it is renamed
//!   into place only after its whole-file BLAKE3 matched and it was fsynced.
//! - A chunk is acknowledged to the protocol only once it is durable, so
//!   resume never relies on data a crash could lose.
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
//! Constants and their reasons are documented where they are defined
//! ([`server`] limits, [`admission::DEFAULT_RESERVE`],
//! [`identity::MAX_CLIENT_NAME_LEN`]); protocol limits live in
//! `appliance_sync_proto::limits`.

pub mod admission;
pub mod client;
pub mod events;
pub mod fsutil;
pub mod identity;
pub mod server;
pub mod store;
pub mod tls;
pub mod wire;
