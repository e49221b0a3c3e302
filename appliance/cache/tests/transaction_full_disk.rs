//! A transaction that the log fails part way through: not acknowledged,
//! and never made durable in part. A file of its own: RLIMIT_FSIZE, which
//! stands in for a full disk, is per process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use appliance_cache::{Cache, CacheConfig, Fsync, PersistConfig, SetCondition};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};

/// Another client's `fdatasync` fails while a transaction holds the cache
/// (review): before, the transaction's later writes were refused and its
/// earlier ones stayed, and the heal made that half durable. Now the log is
/// asked once, before the transaction: it runs whole, is not acknowledged
/// (its commit fails), and the heal writes all of it from memory.
#[test]
fn a_transaction_the_log_fails_during_is_kept_whole() {
    #[allow(unsafe_code)]
    // SAFETY: no handler code runs; nothing else in this process uses
    // SIGXFSZ (a write past RLIMIT_FSIZE then fails with EFBIG).
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut persist = PersistConfig::new(dir.path());
    persist.preallocate = false;
    persist.fsync = Fsync::Always;
    let (owner, _) = Cache::open(CacheConfig::default(), persist.clone()).unwrap();
    let cache = &owner;
    for i in 0..5 {
        cache
            .set_plain(
                format!("before-{i}").as_bytes(),
                vec![b'x'; 1000],
                None,
                SetCondition::Always,
            )
            .unwrap();
    }
    // Another client's batch: appended (held in memory under `Always`),
    // its commit not yet run.
    let (_, pending) =
        cache.defer(|| cache.set_plain(b"other", vec![b'y'; 4000], None, SetCondition::Always));
    let pending = pending.unwrap();
    // The disk fills.
    let (soft, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
    setrlimit(
        Resource::RLIMIT_FSIZE,
        common::largest_segment(dir.path()) + 500,
        hard,
    )
    .unwrap();

    let (halfway_tx, halfway) = std::sync::mpsc::channel();
    let (go_tx, go) = std::sync::mpsc::channel();
    let outcome = std::thread::scope(|s| {
        let tx = s.spawn(move || {
            cache.atomically(|| {
                let a = cache.set_plain(b"tx-a", "1", None, SetCondition::Always);
                halfway_tx.send(()).unwrap();
                go.recv().unwrap();
                let b = cache.set_plain(b"tx-b", "1", None, SetCondition::Always);
                (a.is_ok(), b.is_ok())
            })
        });
        halfway.recv().unwrap();
        // The other client's commit runs the fdatasync, which fails: the
        // log refuses writes from now on, while the transaction runs.
        assert!(cache.commit(pending).is_err());
        go_tx.send(()).unwrap();
        tx.join().unwrap()
    });
    assert!(
        outcome.is_err(),
        "acknowledged without its commit: {outcome:?}"
    );
    // A transaction that starts while the log refuses writes does not run.
    let ran = std::cell::Cell::new(false);
    assert!(cache.atomically(|| ran.set(true)).is_err());
    assert!(!ran.get());
    // Space is back; the upkeep rebuilds the log from memory.
    setrlimit(Resource::RLIMIT_FSIZE, soft, hard).unwrap();
    cache.heal_log().unwrap().expect("healed");
    drop(owner);
    let (reopened, _) = Cache::open(CacheConfig::default(), persist).unwrap();
    assert_eq!(
        (reopened.exists(b"tx-a"), reopened.exists(b"tx-b")),
        (true, true),
        "the whole transaction, from memory"
    );
}
