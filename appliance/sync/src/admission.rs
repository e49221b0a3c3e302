//! Admission: may this client add this many bytes?
//!
//! [`Admission`] is the seam to the storage manager: on the appliance it is
//! answered from ZFS (the client's dataset quota and the pool's free space).
//! Without ZFS, [`LocalAdmission`] answers from our own accounting (the
//! [`UsageLedger`], which the file store keeps current) and `statvfs` of the
//! documents directory. Both produce the same [`QuotaExceeded`], which the
//! client sees as the protocol's `QuotaExceeded { needed, available }`.

use crate::identity::{Authority, ClientName};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: {needed} bytes needed, {available} available")]
pub struct QuotaExceeded {
    pub needed: u64,
    pub available: u64,
}

/// Space figures for one client (the `status` request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub used: u64,
    pub available: u64,
    pub quota: Option<u64>,
}

/// Admission policy. Implementations must be cheap: it is called on the
/// connection's task for every manifest.
pub trait Admission: Send + Sync + std::fmt::Debug {
    /// `Ok` if `client` may add `bytes` more bytes.
    fn admit(&self, client: &ClientName, bytes: u64) -> Result<(), QuotaExceeded>;
    /// Used and available bytes for `client`.
    fn space(&self, client: &ClientName) -> Space;
}

/// Bytes used per client, kept current by the file store.
#[derive(Debug, Default)]
pub struct UsageLedger {
    counters: Mutex<HashMap<ClientName, Arc<AtomicU64>>>,
}

impl UsageLedger {
    /// An empty ledger.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counter of `client` (created at zero).
    pub fn counter(&self, client: &ClientName) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .entry(client.clone())
            .or_default()
            .clone()
    }

    /// Bytes used by `client`.
    pub fn used(&self, client: &ClientName) -> u64 {
        self.counters
            .lock()
            .get(client)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field widths differ between libcs
    let avail = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
    Ok(avail)
}

/// Admission without ZFS: per-client quota from the enrollment registry
/// against the ledger, and free space from `statvfs`.
#[derive(Debug)]
pub struct LocalAdmission {
    authority: Arc<Authority>,
    ledger: Arc<UsageLedger>,
    documents: PathBuf,
    /// Bytes always left free on the filesystem: a full filesystem breaks
    /// everything else on the box (logs, the record log), so uploads stop
    /// short of it. 64 MiB covers metadata and a few log segments.
    reserve: u64,
}

/// Default free-space reserve of [`LocalAdmission`].
pub const DEFAULT_RESERVE: u64 = 64 << 20;

impl LocalAdmission {
    /// Admission over `documents` (the directory `statvfs` looks at).
    pub fn new(authority: Arc<Authority>, ledger: Arc<UsageLedger>, documents: &Path) -> Self {
        Self {
            authority,
            ledger,
            documents: documents.to_path_buf(),
            reserve: DEFAULT_RESERVE,
        }
    }

    /// Changes the free-space reserve.
    pub fn with_reserve(mut self, reserve: u64) -> Self {
        self.reserve = reserve;
        self
    }
}

impl Admission for LocalAdmission {
    fn admit(&self, client: &ClientName, bytes: u64) -> Result<(), QuotaExceeded> {
        let space = self.space(client);
        if bytes > space.available {
            Err(QuotaExceeded {
                needed: bytes,
                available: space.available,
            })
        } else {
            Ok(())
        }
    }

    fn space(&self, client: &ClientName) -> Space {
        let used = self.ledger.used(client);
        let quota = self.authority.quota(client);
        // If statvfs fails we cannot promise anything: report no space.
        let free = free_bytes(&self.documents)
            .unwrap_or(0)
            .saturating_sub(self.reserve);
        let available = match quota {
            Some(q) => q.saturating_sub(used).min(free),
            None => free,
        };
        Space {
            used,
            available,
            quota,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_and_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        authority
            .enroll(&alice, Some(1000), &dir.path().join("b"))
            .unwrap();
        let ledger = UsageLedger::new();
        let admission = LocalAdmission::new(authority, ledger.clone(), dir.path()).with_reserve(0);
        assert!(admission.admit(&alice, 1000).is_ok());
        ledger.counter(&alice).store(400, Ordering::SeqCst);
        assert_eq!(
            admission.admit(&alice, 601),
            Err(QuotaExceeded {
                needed: 601,
                available: 600
            })
        );
        let space = admission.space(&alice);
        assert_eq!(
            (space.used, space.available, space.quota),
            (400, 600, Some(1000))
        );
        // No quota: bounded by the filesystem only.
        let bob = ClientName::parse("bob").unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert!(admission.admit(&bob, free + (1 << 40)).is_err());
    }
}
