//! The sync endpoint's client enrollment on the control socket.

use serde::{Deserialize, Serialize};

/// Requests about sync clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Enroll a client: a key and certificate signed by the appliance CA,
    /// returned as a bundle. Mutating.
    ClientAdd {
        /// Client name (`[a-z0-9_-]`, at most 63 bytes).
        name: String,
        /// Byte quota for its documents.
        quota: Option<u64>,
    },
    /// Every client, revoked ones included.
    ClientList,
    /// Revoke a client: refused from now on, live connections closed.
    /// Mutating.
    ClientRevoke {
        /// Client name.
        name: String,
    },
}

impl SyncRequest {
    /// Whether the request changes the appliance.
    pub fn is_mutating(&self) -> bool {
        !matches!(self, SyncRequest::ClientList)
    }
}

/// One client as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncClient {
    /// Name.
    pub name: String,
    /// Byte quota, if any.
    pub quota: Option<u64>,
    /// Bytes its documents use.
    pub used: u64,
    /// Certificate fingerprint (BLAKE3 of the DER, hex).
    pub fingerprint: String,
    /// Enrollment time, unix seconds.
    pub enrolled_at: u64,
    /// Revocation time, unix seconds.
    pub revoked_at: Option<u64>,
    /// Live connections.
    pub connections: u64,
    /// Where its documents live (`dataset tank/documents/NAME (mounted)`,
    /// `directory …`, or why it has no place yet).
    pub storage: String,
}

/// Answers about sync clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// The client was enrolled; `bundle` is the identity file for
    /// `appliance-sync --identity` (it holds the client's private key:
    /// the CLI writes it with mode 0600, and the daemon keeps no copy).
    Enrolled {
        /// The new client.
        client: SyncClient,
        /// The bundle file's bytes.
        bundle: Vec<u8>,
    },
    /// The client list.
    Clients(Vec<SyncClient>),
    /// The client was revoked.
    Revoked(SyncClient),
}
