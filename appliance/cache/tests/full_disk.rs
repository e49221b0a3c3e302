//! A write the file system refuses fails the log, as a full disk does: the
//! cache keeps answering and refuses further writes with an error; once
//! space is back, the log is rebuilt from memory and writes are durable
//! again, without a restart. The refusal comes from `RLIMIT_FSIZE` (a write
//! past the limit fails with EFBIG), which is per process: this file holds
//! one test so that nothing else runs under the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use appliance_cache::{Cache, CacheConfig, Fsync, PersistConfig, SetCondition};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};

/// The largest segment under `dir`, and whether a temporary generation is there.
fn scan(dir: &Path) -> (u64, bool) {
    let tmp = std::fs::read_dir(dir)
        .unwrap()
        .any(|g| g.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
    (common::largest_segment(dir), tmp)
}

/// Sets `key` to `len` bytes that do not compress (a compaction or a
/// rebuild writes compressible values smaller).
fn set(cache: &Cache, key: &str, len: usize) -> bool {
    let value = noise(len);
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
    the_resp_servers_upkeep_heals_the_log();
}

/// Incompressible bytes of `len`.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The same through the RESP endpoint: a refused SET drops its connection
/// (nothing is acknowledged), and the server's maintenance loop heals the
/// log on its own.
fn the_resp_servers_upkeep_heals_the_log() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut persist = PersistConfig::new(dir.path());
    // Appends that grow the file, which the limit refuses (a preallocated
    // segment has its blocks already: the disk fills at a rotation).
    persist.preallocate = false;
    persist.fsync = Fsync::Always;
    let (cache, _) = Cache::open(CacheConfig::default(), persist).unwrap();
    let cache = std::sync::Arc::new(cache);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = appliance_cache::ServerConfig {
            maintenance_interval: std::time::Duration::from_millis(100),
            ..appliance_cache::ServerConfig::default()
        };
        let server = tokio::spawn(appliance_cache::serve(
            listener,
            cache.clone(),
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let connect = || async {
            let client = redis::Client::open(url.as_str()).unwrap();
            client.get_multiplexed_async_connection().await.unwrap()
        };
        let mut con = connect().await;
        let set = |key: &'static str, value: Vec<u8>| redis::cmd("SET").arg(key).arg(value).clone();
        let ok: String = set("first", noise(1000))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(ok, "OK");

        let (soft, hard) = getrlimit(Resource::RLIMIT_FSIZE).unwrap();
        let (largest, _) = scan(dir.path());
        setrlimit(Resource::RLIMIT_FSIZE, largest + 500, hard).unwrap();
        let refused: redis::RedisResult<String> =
            set("big", noise(64 << 10)).query_async(&mut con).await;
        // Not acknowledged, and told why (not just a closed connection).
        let err = refused.expect_err("a SET past the limit was acknowledged");
        assert_eq!(err.kind(), redis::ErrorKind::ResponseError, "{err:?}");
        assert!(
            err.to_string().contains("cache log") && err.to_string().contains("not acknowledged"),
            "{err}"
        );
        assert!(cache.log_failed());
        setrlimit(Resource::RLIMIT_FSIZE, soft, hard).unwrap();

        // The loop's first try comes within a tick; should it have come
        // before the limit was lifted, the retry is a minute later.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
        let mut con = connect().await;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(&mut con)
                .await
                .unwrap();
            if info.contains("aof_last_write_status:ok\r\nlog_heals:1\r\n") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "not healed: {info}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let ok: String = set("after", noise(1000))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(ok, "OK");
        let big: Vec<u8> = redis::cmd("GET")
            .arg("big")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(big.len(), 64 << 10);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
    let stats = cache.persistence().unwrap().stats();
    assert_eq!((stats.failed, stats.heals), (None, 1));
}

fn full_then_room_again(fsync: Fsync) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut persist = PersistConfig::new(dir.path());
    // Appends that grow the file, which the limit refuses (a preallocated
    // segment has its blocks already: the disk fills at a rotation).
    persist.preallocate = false;
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

    // A pipelined batch of new keys, past the limit: refused, nothing of
    // it acknowledged. (Under `Interval` its append fails outright, so its
    // 40 entries got no record numbers: more entries than the log has
    // numbers, which the rebuild must handle.)
    let (_, pending) = cache.defer(|| {
        for i in 0..40 {
            set(&cache, &format!("batch-{i}"), 2000);
        }
    });
    assert!(
        pending.and_then(|p| cache.commit(p)).is_err(),
        "{fsync:?}: a batch past the limit was acknowledged"
    );
    assert!(cache.log_failed(), "{fsync:?}");
    // From now on writes are refused before they touch memory, on both
    // paths; reads are answered, on both.
    for i in 0..30 {
        let key = format!("refused-{i}");
        assert!(
            !set(&cache, &key, 10),
            "{fsync:?}: the failed log acknowledged a write"
        );
    }
    assert!(!set_async(&rt, &cache, "refused-async"), "{fsync:?}");
    assert!(cache.get_plain(b"refused-0").is_none());
    assert_eq!(cache.get_plain(b"before-3").unwrap().len(), 1000);
    let (seen, pending) = cache.defer(|| cache.get_plain(b"before-4"));
    assert_eq!(seen.unwrap().len(), 1000);
    assert!(rt.block_on(cache.commit_async(pending.unwrap())).is_ok());
    let stats = cache.persistence().unwrap().stats();
    assert!(stats.failed.is_some(), "{stats:?}");
    let info = appliance_cache::commands::info(&cache);
    assert!(
        info.contains("aof_last_write_status:err\r\nlog_heals:0\r\n"),
        "{info}"
    );

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
    // The 20 entries, and the batch whose commit failed: it was applied in
    // memory before the failure was known, so the rebuilt log has it.
    assert_eq!(report.records_after, 60);
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
    assert_eq!(cache.len(), 62);
    for i in 0..20 {
        let v = cache.get_plain(format!("before-{i}").as_bytes()).unwrap();
        assert_eq!(v.len(), 1000);
    }
    assert_eq!(cache.get_plain(b"batch-39").unwrap().len(), 2000);
    assert!(cache.get_plain(b"refused-29").is_none());
    assert!(cache.get_plain(b"refused-async").is_none());
    assert_eq!(cache.get_plain(b"after").unwrap().len(), 1000);
    assert!(cache.get_plain(b"after-async").is_some());
}
