//! A write the file system refuses fails the log, as a full disk does: the
//! cache keeps answering and refuses further writes with an error; once
//! space is back, the log is rebuilt from memory and writes are durable
//! again, without a restart. The refusal comes from `RLIMIT_FSIZE` (a write
//! past the limit fails with EFBIG), which is per process: this file holds
//! one test so that nothing else runs under the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use appliance_cache::{Cache, CacheConfig, Fsync, PersistConfig, SetCondition};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};

/// The largest file under `dir`, and whether a temporary generation is there.
fn scan(dir: &Path) -> (u64, bool) {
    let mut largest = 0;
    let mut tmp = false;
    for gen in std::fs::read_dir(dir).unwrap() {
        let gen = gen.unwrap();
        tmp |= gen.file_name().to_string_lossy().ends_with(".tmp");
        if !gen.file_type().unwrap().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(gen.path()).unwrap() {
            largest = largest.max(f.unwrap().metadata().unwrap().len());
        }
    }
    (largest, tmp)
}

/// Sets `key` to `len` bytes that do not compress (a compaction or a
/// rebuild writes compressible values smaller).
fn set(cache: &Cache, key: &str, len: usize) -> bool {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ key.len() as u64;
    let value: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    cache
        .set_plain(key.as_bytes(), value, None, SetCondition::Always)
        .is_ok()
}

/// A write through the RESP server's path: deferred, then committed
/// asynchronously (under `Always`, by the syncer thread, waited for on the
/// watch channel).
fn set_async(rt: &tokio::runtime::Runtime, cache: &Cache, key: &str) -> bool {
    let (res, pending) =
        cache.defer(|| cache.set_plain(key.as_bytes(), "v", None, SetCondition::Always));
    let committed = pending.map(|p| rt.block_on(cache.commit_async(p)));
    res.is_ok() && matches!(committed, Ok(Ok(())))
}

#[test]
fn a_log_that_ran_out_of_space_is_rebuilt_from_memory_once_space_is_back() {
    // A write past the limit raises SIGXFSZ, whose default action ends the
    // process; ignored, the write fails with EFBIG instead.
    #[allow(unsafe_code)]
    // SAFETY: `SigIgn` installs no handler code, and nothing in this test
    // process uses SIGXFSZ otherwise.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    // One after the other: the limit is the process's.
    full_then_room_again(Fsync::Always);
    full_then_room_again(Fsync::IntervalMs(10));
}

fn full_then_room_again(fsync: Fsync) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut persist = PersistConfig::new(dir.path());
    persist.fsync = fsync;
    let (cache, _) = Cache::open(CacheConfig::default(), persist.clone()).unwrap();
    for i in 0..20 {
        assert!(set(&cache, &format!("before-{i}"), 1000));
    }
    assert!(!cache.log_failed());

    // The disk is "full": nothing may grow past a few hundred bytes more.
    let (soft, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
    let (largest, _) = scan(dir.path());
    setrlimit(Resource::RLIMIT_FSIZE, largest + 500, hard).unwrap();

    // The write is refused and not acknowledged; the log takes nothing
    // more; reads go on.
    assert!(
        !set(&cache, "big", 64 << 10),
        "{fsync:?}: a write past the limit was acknowledged"
    );
    assert!(cache.log_failed(), "{fsync:?}");
    // More refused writes than the log has records: new keys, in memory.
    for i in 0..30 {
        let key = format!("refused-{i}");
        assert!(
            !set(&cache, &key, 10),
            "{fsync:?}: the failed log acknowledged a write"
        );
    }
    assert!(!set_async(&rt, &cache, "refused-async"), "{fsync:?}");
    let stats = cache.persistence().unwrap().stats();
    assert!(stats.failed.is_some(), "{stats:?}");
    let info = appliance_cache::commands::info(&cache);
    assert!(
        info.contains("aof_last_write_status:err\r\nlog_heals:0\r\n"),
        "{info}"
    );
    assert_eq!(cache.get_plain(b"before-3").unwrap().len(), 1000);

    // While space is short, a rebuild fails too, and leaves nothing behind.
    assert!(cache.heal_log().is_err());
    assert!(cache.log_failed());
    assert!(!scan(dir.path()).1, "a failed rebuild left its directory");

    // Space is back: the periodic upkeep rebuilds the log from memory, and
    // it takes writes, on both paths.
    setrlimit(Resource::RLIMIT_FSIZE, soft, hard).unwrap();
    let report = cache
        .maintenance()
        .unwrap()
        .healed
        .expect("the failed log was rebuilt");
    // The 20 entries, and the 32 whose writes were refused: they were
    // applied in memory, so the rebuilt log has them.
    assert_eq!(report.records_after, 52);
    assert!(!cache.log_failed());
    let stats = cache.persistence().unwrap().stats();
    assert_eq!((stats.failed.clone(), stats.heals), (None, 1), "{stats:?}");
    let info = appliance_cache::commands::info(&cache);
    assert!(
        info.contains("aof_last_write_status:ok\r\nlog_heals:1\r\n"),
        "{info}"
    );
    assert!(
        cache.heal_log().unwrap().is_none(),
        "a healthy log is left alone"
    );
    // The asynchronous path first: the failure must be gone from what its
    // waiters watch, not only from the state a blocking write looks at.
    assert!(set_async(&rt, &cache, "after-async"), "{fsync:?}");
    assert!(set(&cache, "after", 1000));
    cache.persistence().unwrap().sync().unwrap();
    drop(cache);

    // Everything is there after a restart, from a clean log.
    let (cache, report) = Cache::open(CacheConfig::default(), persist).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(cache.len(), 54);
    for i in 0..20 {
        let v = cache.get_plain(format!("before-{i}").as_bytes()).unwrap();
        assert_eq!(v.len(), 1000);
    }
    assert_eq!(cache.get_plain(b"big").unwrap().len(), 64 << 10);
    assert!(cache.get_plain(b"refused-29").is_some());
    assert!(cache.get_plain(b"refused-async").is_some());
    assert_eq!(cache.get_plain(b"after").unwrap().len(), 1000);
    assert!(cache.get_plain(b"after-async").is_some());
}
