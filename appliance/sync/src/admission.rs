//! Admission: may this client add this many bytes?
//!
//! [`Admission`] is the seam to the storage manager: on the appliance it is
//! answered from ZFS (the client's dataset quota and the pool's free space).
//! Without ZFS, [`LocalAdmission`] answers from our own accounting (the
//! [`UsageLedger`], which the file store keeps current) and `statvfs` of the
//! documents directory. Both produce the same [`QuotaExceeded`], which the
//! client sees as the protocol's `QuotaExceeded { needed, available }`.
//!
//! Both answer against what a client uses *now*. Uploads admitted together
//! would each pass against the same figure (four 700 kB files against a
//! 1 MiB quota), so the server admits through [`Reservations`]: each
//! admitted upload holds a [`Reservation`] of the bytes it may still add,
//! and the next upload of that client is admitted only if its bytes fit on
//! top of them, and within the space all clients share on top of every
//! client's reservations.

use crate::identity::{Authority, ClientName};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// The refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: {needed} bytes needed, {available} available")]
pub struct QuotaExceeded {
    pub needed: u64,
    pub available: u64,
}

/// Why an upload is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not enough room: the client's quota, the dataset's, or free space.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// Storage cannot take uploads at all right now (the pool is suspended,
    /// ZFS does not answer); `detail` says why, for the client.
    #[error("storage unavailable: {detail}")]
    Unavailable { detail: String },
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
    /// `Ok` if `client` may add `bytes` more bytes, while other clients'
    /// admitted uploads may still add `others` bytes to the space all
    /// clients share (the documents' file system, or on the appliance the
    /// `documents` dataset that holds the clients' datasets).
    fn admit(&self, client: &ClientName, bytes: u64, others: u64) -> Result<(), Refused>;
    /// Whether `client`'s storage can take writes at all. Must not touch
    /// the documents' file system: the server asks this *before* it opens a
    /// client's store, looks up staging state or reads a manifest, because
    /// on a suspended pool each of those blocks in the kernel for as long
    /// as the pool stays suspended, and on the appliance a client's own
    /// dataset must be mounted before anything is written under its
    /// directory. The default says yes.
    fn writable(&self, client: &ClientName) -> Result<(), Refused> {
        let _ = client;
        Ok(())
    }
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

/// Bytes that admitted, unfinished uploads may still add, per client.
///
/// Invariant: for each client, `used + reserved` bounds what its running
/// uploads can make `used` at their peak. A staging file's bytes are counted
/// in `used` as they land, and a commit adds the file's size less those, so
/// an upload may still add its size less its landed bytes: the holder
/// lowers its reservation to that as bytes land ([`Reservation::shrink_to`],
/// after they are in `used`, so nothing is counted twice for long and
/// nothing is ever counted zero times). A reservation is given back when it
/// is dropped: the upload committed (its bytes are then in `used`), failed,
/// was refused, or its connection went.
///
/// Uploads that write one staging file (the same file uploaded twice at
/// once, or again by a client that reconnected before its old connection
/// was closed) add its bytes once, so they hold one reservation between
/// them ([`Self::admit_shared`]).
///
/// A client's uploads are admitted against its quota beside its own
/// reservations, and against the free space all clients share beside
/// everybody's. Admissions are serialized, so no two pass against the same
/// figures.
#[derive(Debug, Default)]
pub struct Reservations {
    ledger: Arc<Mutex<Reserved>>,
    /// Reservations held for a staging file, by client and staging key.
    /// Locked before `ledger`.
    shared: Mutex<HashMap<(ClientName, String), Weak<Held>>>,
}

/// What is reserved, per client and in all.
#[derive(Debug, Default)]
struct Reserved {
    by_client: HashMap<ClientName, u64>,
    total: u64,
    /// Reservations made (or raised) so far.
    grants: u64,
}

impl Reservations {
    /// No reservations.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Bytes reserved for `client`.
    pub fn reserved(&self, client: &ClientName) -> u64 {
        self.ledger
            .lock()
            .by_client
            .get(client)
            .copied()
            .unwrap_or(0)
    }

    /// Bytes reserved for all clients.
    pub fn total(&self) -> u64 {
        self.ledger.lock().total
    }

    /// Asks `admission` whether `client` may add `bytes` on top of what its
    /// admitted uploads hold (and the other clients' beside them), and if
    /// so reserves them. A refusal names this upload's `bytes` as needed and
    /// what is left beside the reservations as available.
    pub fn admit(
        &self,
        admission: &dyn Admission,
        client: &ClientName,
        bytes: u64,
    ) -> Result<Reservation, Refused> {
        // Asked without the ledger locked (the admission reads file system
        // figures, which a sick pool can make slow, and every upload's
        // reservation updates take the lock): a grant made meanwhile
        // changes the figures, so the question is asked again.
        let (mut ledger, own, verdict) = loop {
            let (own, others, grants) = {
                let ledger = self.ledger.lock();
                let own = ledger.by_client.get(client).copied().unwrap_or(0);
                (own, ledger.total.saturating_sub(own), ledger.grants)
            };
            let verdict = admission.admit(client, own.saturating_add(bytes), others);
            let ledger = self.ledger.lock();
            if verdict.is_err() || ledger.grants == grants {
                break (ledger, own, verdict);
            }
        };
        match verdict {
            Ok(()) => {
                ledger.grants += 1;
                ledger.total = ledger.total.saturating_add(bytes);
                let mine = ledger.by_client.entry(client.clone()).or_default();
                *mine = mine.saturating_add(bytes);
                drop(ledger);
                Ok(Reservation {
                    held: Arc::new(Held {
                        ledger: self.ledger.clone(),
                        client: client.clone(),
                        bytes: Mutex::new(bytes),
                    }),
                })
            }
            Err(Refused::Quota(q)) => Err(Refused::Quota(QuotaExceeded {
                needed: bytes,
                available: q.available.saturating_sub(own),
            })),
            Err(other) => Err(other),
        }
    }

    /// As [`Self::admit`], for an upload into the staging file `key`: if
    /// another upload of `client` holds a reservation for that file, this
    /// one shares it (the bytes it would add are the ones already reserved;
    /// if it needs more, the file having lost bytes meanwhile, only the
    /// difference is asked for), and the reservation is given back when the
    /// last of them ends.
    pub fn admit_shared(
        &self,
        admission: &dyn Admission,
        client: &ClientName,
        key: &str,
        bytes: u64,
    ) -> Result<Reservation, Refused> {
        // The admission is asked without `shared` locked (see `admit`).
        let id = (client.clone(), key.to_owned());
        let existing = self.shared.lock().get(&id).and_then(Weak::upgrade);
        if let Some(held) = existing {
            let have = *held.bytes.lock();
            if bytes > have {
                let extra = self.admit(admission, client, bytes - have)?;
                Held::raise(&held, &extra.held, bytes);
            }
            return Ok(Reservation { held });
        }
        let reservation = self.admit(admission, client, bytes)?;
        let mut shared = self.shared.lock();
        if let Some(held) = shared.get(&id).and_then(Weak::upgrade) {
            // Another upload of the file was admitted meanwhile: share its
            // reservation, raised to what this one needs from this one's
            // (the rest given back as this one goes).
            Held::raise(&held, &reservation.held, bytes);
            return Ok(Reservation { held });
        }
        shared.retain(|_, w| w.strong_count() > 0);
        shared.insert(id, Arc::downgrade(&reservation.held));
        Ok(reservation)
    }
}

/// Bytes reserved for one admitted upload (see [`Reservations`]), or for
/// the uploads sharing its staging file; given back when the last holder
/// drops it.
#[derive(Debug)]
#[must_use = "dropping a reservation gives its bytes back at once"]
pub struct Reservation {
    held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    ledger: Arc<Mutex<Reserved>>,
    client: ClientName,
    bytes: Mutex<u64>,
}

impl Held {
    /// Moves bytes from `from` (reserved for the same client) into `to`
    /// until `to` holds `want`, or `from` is empty.
    fn raise(to: &Held, from: &Held, want: u64) {
        let mut have = to.bytes.lock();
        let mut spare = from.bytes.lock();
        let moved = want.saturating_sub(*have).min(*spare);
        *have += moved;
        *spare -= moved;
    }

    fn shrink_to(&self, bytes: u64) {
        let mut held = self.bytes.lock();
        if bytes < *held {
            let less = *held - bytes;
            let mut ledger = self.ledger.lock();
            ledger.total = ledger.total.saturating_sub(less);
            if let Some(mine) = ledger.by_client.get_mut(&self.client) {
                *mine = mine.saturating_sub(less);
                if *mine == 0 {
                    ledger.by_client.remove(&self.client);
                }
            }
            *held = bytes;
        }
    }
}

impl Reservation {
    /// Bytes still reserved.
    pub fn bytes(&self) -> u64 {
        *self.held.bytes.lock()
    }

    /// Lowers the reservation to `bytes` (never raises it): call it once
    /// the upload's landed bytes are counted in the client's usage. Shared,
    /// it is lowered for every holder (they write the same file).
    pub fn shrink_to(&mut self, bytes: u64) {
        self.held.shrink_to(bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    fs_space(path).map(|(free, _)| free)
}

/// Free bytes (for an unprivileged writer) and size of the filesystem
/// holding `path`. On ZFS the size of a dataset with a quota is its quota
/// (used + available), not the pool's.
pub fn fs_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field widths differ between libcs
    let fragment = u64::from(st.fragment_size());
    #[allow(clippy::useless_conversion)]
    let avail = u64::from(st.blocks_available()).saturating_mul(fragment);
    #[allow(clippy::useless_conversion)]
    let total = u64::from(st.blocks()).saturating_mul(fragment);
    Ok((avail, total))
}

/// The reserve is at most this fraction (1/N) of the filesystem.
const RESERVE_MAX_FRACTION: u64 = 16;

/// Bytes kept free on a filesystem of `total` bytes: the `configured`
/// reserve, but never more than 1/16 of the filesystem. Without the cap a
/// documents dataset with a small quota (50 MiB on the appliance, below the
/// 64 MiB default) would refuse every upload; such a dataset filling up
/// breaks nothing else, as its quota already keeps the pool's space.
pub fn effective_reserve(configured: u64, total: u64) -> u64 {
    configured.min(total / RESERVE_MAX_FRACTION)
}

/// What `client` may still add: its quota less what it uses, and the
/// filesystem's free space less the reserve (see [`effective_reserve`]).
pub fn available_bytes(
    quota: Option<u64>,
    used: u64,
    fs_free: u64,
    fs_total: u64,
    reserve: u64,
) -> u64 {
    let free = fs_free.saturating_sub(effective_reserve(reserve, fs_total));
    match quota {
        Some(q) => q.saturating_sub(used).min(free),
        None => free,
    }
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
    /// short of it. 64 MiB covers metadata and a few log segments; it is
    /// capped at 1/16 of the filesystem ([`effective_reserve`]).
    reserve: u64,
    /// Free and total bytes of the file system holding a path ([`fs_space`];
    /// replaced in tests).
    fs: fn(&Path) -> std::io::Result<(u64, u64)>,
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
            fs: fs_space,
        }
    }

    /// Changes the free-space reserve.
    pub fn with_reserve(mut self, reserve: u64) -> Self {
        self.reserve = reserve;
        self
    }

    /// Takes free and total bytes from `fs` instead of `statvfs`.
    #[cfg(test)]
    fn with_fs(mut self, fs: fn(&Path) -> std::io::Result<(u64, u64)>) -> Self {
        self.fs = fs;
        self
    }
}

impl LocalAdmission {
    /// What `client` may add by its own space (its quota; on the appliance
    /// its dataset, whose reserve is capped by its own size), and what all
    /// clients may add together by the space they share (the documents
    /// directory's file system; on the appliance the `documents` dataset)
    /// less the reserve. If statvfs fails we cannot promise anything: no
    /// space.
    fn figures(&self, client: &ClientName) -> (Space, u64) {
        let used = self.ledger.used(client);
        let quota = self.authority.quota(client);
        // The client's own directory when it exists: on the appliance it is
        // the client's dataset, whose `statvfs` is its quota and the pool's
        // free space.
        let own = self.documents.join(client.as_str());
        let (free, total) = (self.fs)(&own)
            .or_else(|_| (self.fs)(&self.documents))
            .unwrap_or((0, 0));
        let space = Space {
            used,
            available: available_bytes(quota, used, free, total, self.reserve),
            quota,
        };
        let (free, total) = (self.fs)(&self.documents).unwrap_or((0, 0));
        (space, available_bytes(None, 0, free, total, self.reserve))
    }
}

impl Admission for LocalAdmission {
    fn admit(&self, client: &ClientName, bytes: u64, others: u64) -> Result<(), Refused> {
        // Within its own space, and within the shared space beside what
        // the other clients' uploads may still add.
        let (space, shared) = self.figures(client);
        let available = space.available.min(shared.saturating_sub(others));
        if bytes > available {
            Err(Refused::Quota(QuotaExceeded {
                needed: bytes,
                available,
            }))
        } else {
            Ok(())
        }
    }

    fn space(&self, client: &ClientName) -> Space {
        let (mut space, shared) = self.figures(client);
        space.available = space.available.min(shared);
        space
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alice enrolled with `quota`, and admission over a fresh directory
    /// with no reserve.
    fn alice_enrolled(
        quota: Option<u64>,
    ) -> (
        tempfile::TempDir,
        ClientName,
        Arc<UsageLedger>,
        LocalAdmission,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        authority
            .enroll(&alice, quota, &dir.path().join("alice.bundle"))
            .unwrap();
        let ledger = UsageLedger::new();
        let admission = LocalAdmission::new(authority, ledger.clone(), dir.path()).with_reserve(0);
        (dir, alice, ledger, admission)
    }

    #[test]
    fn quota_and_free_space() {
        let (dir, alice, ledger, admission) = alice_enrolled(Some(1000));
        assert!(admission.admit(&alice, 1000, 0).is_ok());
        ledger.counter(&alice).store(400, Ordering::SeqCst);
        assert_eq!(
            admission.admit(&alice, 601, 0),
            Err(Refused::Quota(QuotaExceeded {
                needed: 601,
                available: 600
            }))
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
        assert!(admission.admit(&bob, free + (1 << 40), 0).is_err());
    }
    #[test]
    fn reservations_count_admitted_uploads_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        let bob = ClientName::parse("bob").unwrap();
        authority
            .enroll(&alice, Some(1000), &dir.path().join("a"))
            .unwrap();
        authority
            .enroll(&bob, Some(1000), &dir.path().join("b"))
            .unwrap();
        let ledger = UsageLedger::new();
        let admission = LocalAdmission::new(authority, ledger.clone(), dir.path()).with_reserve(0);
        let reservations = Reservations::new();
        ledger.counter(&alice).store(100, Ordering::SeqCst);
        let mut first = reservations.admit(&admission, &alice, 600).unwrap();
        assert_eq!(reservations.reserved(&alice), 600);
        // Alone it would fit (100 used + 400); beside the first it does not.
        assert_eq!(
            reservations.admit(&admission, &alice, 400).unwrap_err(),
            Refused::Quota(QuotaExceeded {
                needed: 400,
                available: 300
            })
        );
        assert_eq!(
            reservations.reserved(&alice),
            600,
            "a refusal reserves nothing"
        );
        // Another client's quota is its own.
        let other = reservations.admit(&admission, &bob, 1000).unwrap();
        // 200 bytes of the first land (now in `used`): it may add 400 more.
        ledger.counter(&alice).store(300, Ordering::SeqCst);
        first.shrink_to(400);
        first.shrink_to(500); // never raised
        assert_eq!(first.bytes(), 400);
        assert_eq!(reservations.reserved(&alice), 400);
        let second = reservations.admit(&admission, &alice, 300).unwrap();
        assert!(reservations.admit(&admission, &alice, 1).is_err());
        // Dropped (committed, failed, connection gone): the bytes are back.
        drop(first);
        drop(second);
        assert_eq!(reservations.reserved(&alice), 0);
        assert!(reservations.admit(&admission, &alice, 700).is_ok());
        assert_eq!(reservations.reserved(&alice), 0, "the last one was dropped");
        drop(other);
        assert_eq!(reservations.reserved(&bob), 0);
    }

    /// Clients share the file system's free space: each client's uploads
    /// were admitted beside its own reservations only, so two clients'
    /// uploads admitted together could take the space the reserve keeps,
    /// and then fail on a full disk.
    #[test]
    fn clients_share_the_free_space_beside_each_others_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        let bob = ClientName::parse("bob").unwrap();
        for (c, f) in [(&alice, "a"), (&bob, "b")] {
            authority.enroll(c, None, &dir.path().join(f)).unwrap();
        }
        // 1000 bytes free beside a reserve of 100.
        let admission = LocalAdmission::new(authority, UsageLedger::new(), dir.path())
            .with_reserve(100)
            .with_fs(|_| Ok((1100, 1 << 20)));
        let reservations = Reservations::new();
        let a = reservations.admit(&admission, &alice, 600).unwrap();
        assert_eq!(
            reservations.admit(&admission, &bob, 500).unwrap_err(),
            Refused::Quota(QuotaExceeded {
                needed: 500,
                available: 400
            })
        );
        let b = reservations.admit(&admission, &bob, 400).unwrap();
        assert_eq!(reservations.total(), 1000);
        assert!(reservations.admit(&admission, &alice, 1).is_err());
        // Alice's upload ends: its space is Bob's to take.
        drop(a);
        let b2 = reservations.admit(&admission, &bob, 600).unwrap();
        assert_eq!(
            (reservations.reserved(&bob), reservations.total()),
            (1000, 1000)
        );
        drop((b, b2));
        assert_eq!(reservations.total(), 0);
    }

    /// A lone client's upload is checked against the space all clients
    /// share too: the check was made only beside other clients'
    /// reservations, and a client's own dataset caps the reserve at 1/16
    /// of its own size, so alone it could take the documents' reserve.
    #[test]
    fn the_shared_space_is_checked_without_other_reservations_too() {
        const MIB: u64 = 1 << 20;
        // Alice's dataset: 50 MiB quota, 45 MiB free. The documents file
        // system: 100 MiB free, so 36 MiB beside its 64 MiB reserve.
        fn fs(path: &Path) -> std::io::Result<(u64, u64)> {
            if path.ends_with("alice") {
                Ok((45 * MIB, 50 * MIB))
            } else {
                Ok((100 * MIB, 1024 * MIB))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        authority
            .enroll(&alice, Some(50 * MIB), &dir.path().join("a"))
            .unwrap();
        let admission = LocalAdmission::new(authority, UsageLedger::new(), dir.path()).with_fs(fs);
        for others in [0, 1] {
            assert_eq!(
                admission.admit(&alice, 40 * MIB, others),
                Err(Refused::Quota(QuotaExceeded {
                    needed: 40 * MIB,
                    available: 36 * MIB - others
                }))
            );
        }
        assert!(admission.admit(&alice, 36 * MIB, 0).is_ok());
        assert_eq!(admission.space(&alice).available, 36 * MIB);
    }

    /// An upload that joins a shared reservation needing more than is left
    /// of it (the staging file lost its landed bytes meanwhile: discarded
    /// for the holder that hit a full disk) is reserved the difference; it
    /// shared what was left, and another upload was admitted into the
    /// space it would write.
    #[test]
    fn a_shared_reservation_is_topped_up_to_what_the_joiner_needs() {
        let (_dir, alice, ledger, admission) = alice_enrolled(Some(1000));
        let reservations = Reservations::new();
        let mut first = reservations
            .admit_shared(&admission, &alice, "k1", 700)
            .unwrap();
        // 600 bytes land and are counted; the reservation is lowered.
        ledger.counter(&alice).store(600, Ordering::SeqCst);
        first.shrink_to(100);
        // The staging file is discarded: its 600 bytes are given back.
        ledger.counter(&alice).store(0, Ordering::SeqCst);
        let second = reservations
            .admit_shared(&admission, &alice, "k1", 700)
            .unwrap();
        assert_eq!((second.bytes(), reservations.reserved(&alice)), (700, 700));
        assert!(reservations.admit(&admission, &alice, 400).is_err());
        // More than the quota allows beside it: refused, nothing reserved.
        ledger.counter(&alice).store(500, Ordering::SeqCst);
        first.shrink_to(0);
        assert!(reservations
            .admit_shared(&admission, &alice, "k1", 600)
            .is_err());
        assert_eq!(reservations.reserved(&alice), 0);
        drop((first, second));
        assert_eq!(reservations.total(), 0);
    }

    /// Two uploads of one file admitted at the same time (each asked the
    /// admission before either held the file's reservation) end up sharing
    /// one, raised to what the larger needs; the rest is given back.
    #[test]
    fn uploads_of_one_file_admitted_at_once_share_one_reservation() {
        /// Admits, and on its first question admits another upload of the
        /// same file first (what a second connection does meanwhile).
        #[derive(Debug)]
        struct Meanwhile {
            inner: LocalAdmission,
            reservations: Arc<Reservations>,
            other: Mutex<Option<Reservation>>,
            asked: std::sync::atomic::AtomicBool,
        }
        impl Admission for Meanwhile {
            fn admit(&self, client: &ClientName, bytes: u64, others: u64) -> Result<(), Refused> {
                if !self.asked.swap(true, Ordering::SeqCst) {
                    let r = self
                        .reservations
                        .admit_shared(&self.inner, client, "k1", 500)
                        .unwrap();
                    *self.other.lock() = Some(r);
                }
                self.inner.admit(client, bytes, others)
            }
            fn space(&self, client: &ClientName) -> Space {
                self.inner.space(client)
            }
        }
        let (_dir, alice, _ledger, inner) = alice_enrolled(Some(1000));
        let reservations = Reservations::new();
        let meanwhile = Meanwhile {
            inner,
            reservations: reservations.clone(),
            other: Mutex::new(None),
            asked: std::sync::atomic::AtomicBool::new(false),
        };
        let mine = reservations
            .admit_shared(&meanwhile, &alice, "k1", 300)
            .unwrap();
        let other = meanwhile.other.lock().take().unwrap();
        assert_eq!((mine.bytes(), other.bytes()), (500, 500));
        assert_eq!(reservations.reserved(&alice), 500);
        drop(mine);
        assert_eq!(reservations.reserved(&alice), 500);
        drop(other);
        assert_eq!(reservations.total(), 0);
    }

    /// Uploads into one staging file hold one reservation: the second is
    /// admitted without reserving its bytes again, lowering it lowers it
    /// for both, and it is given back when the last of them ends.
    #[test]
    fn uploads_sharing_a_staging_file_hold_one_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("id")).unwrap();
        let alice = ClientName::parse("alice").unwrap();
        authority
            .enroll(&alice, Some(1000), &dir.path().join("a"))
            .unwrap();
        let admission =
            LocalAdmission::new(authority, UsageLedger::new(), dir.path()).with_reserve(0);
        let reservations = Reservations::new();
        let first = reservations
            .admit_shared(&admission, &alice, "k1", 700)
            .unwrap();
        // 1400 would not fit the quota: shared, nothing more is reserved.
        let mut second = reservations
            .admit_shared(&admission, &alice, "k1", 700)
            .unwrap();
        assert_eq!(reservations.reserved(&alice), 700);
        second.shrink_to(500);
        assert_eq!((first.bytes(), reservations.reserved(&alice)), (500, 500));
        // Another staging file is reserved on its own, against the quota.
        assert!(reservations
            .admit_shared(&admission, &alice, "k2", 600)
            .is_err());
        let other = reservations
            .admit_shared(&admission, &alice, "k2", 400)
            .unwrap();
        assert_eq!(reservations.reserved(&alice), 900);
        // The first upload ends (its connection went): still held.
        drop(first);
        assert_eq!(reservations.reserved(&alice), 900);
        drop(second);
        assert_eq!(reservations.reserved(&alice), 400);
        // Given back: the next upload into k1 is admitted and reserved anew.
        let again = reservations
            .admit_shared(&admission, &alice, "k1", 600)
            .unwrap();
        assert_eq!(reservations.reserved(&alice), 1000);
        drop((again, other));
        assert_eq!(reservations.reserved(&alice), 0);
    }

    #[test]
    fn small_quota_dataset_is_usable_despite_the_reserve() {
        const MIB: u64 = 1 << 20;
        // A 50 MiB documents dataset (ZFS quota): statvfs shows 50 MiB.
        assert_eq!(effective_reserve(DEFAULT_RESERVE, 50 * MIB), 50 * MIB / 16);
        // Empty: a 41 MiB upload of a client with a 50 MiB quota fits.
        let avail = available_bytes(Some(50 * MIB), 0, 50 * MIB, 50 * MIB, DEFAULT_RESERVE);
        assert!(avail >= 41 * MIB, "{avail}");
        // At 41 MiB used, 4.5 MiB more still fits; 10 MiB does not.
        let avail = available_bytes(Some(50 * MIB), 41 * MIB, 9 * MIB, 50 * MIB, DEFAULT_RESERVE);
        assert!((9 * MIB / 2..10 * MIB).contains(&avail), "{avail}");
        // A large filesystem keeps the whole reserve.
        assert_eq!(effective_reserve(DEFAULT_RESERVE, 2 << 30), DEFAULT_RESERVE);
        assert_eq!(
            available_bytes(None, 0, 100 * MIB, 2 << 30, DEFAULT_RESERVE),
            100 * MIB - DEFAULT_RESERVE
        );
    }
}
