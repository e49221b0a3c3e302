#![allow(clippy::cast_possible_truncation)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::frame::{frame_size, SEGMENT_HEADER_LEN};
use crate::*;

fn opts() -> LogOptions {
    LogOptions {
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..LogOptions::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i:05}-{}", "x".repeat((i % 7) as usize)).into_bytes()
}

fn all(log: &Log) -> Vec<Record> {
    log.iter().unwrap().collect::<Result<Vec<_>>>().unwrap()
}

fn seqs(log: &Log) -> Vec<u64> {
    all(log).iter().map(|r| r.seq).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut gens: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("gen-") && !n.ends_with(".tmp")
        })
        .collect();
    gens.sort();
    let gen = gens.pop().unwrap();
    let mut v: Vec<PathBuf> = fs::read_dir(gen)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
        assert!(rep.is_clean());
        assert_eq!(rep.next_seq, 1);
        for i in 1..=100 {
            let a = log.append_at(1000 + i, &payload(i)).unwrap();
            assert_eq!(a.seq, i);
        }
        let recs = all(&log);
        assert_eq!(recs.len(), 100);
        for (i, r) in recs.iter().enumerate() {
            let i = i as u64 + 1;
            assert_eq!((r.seq, r.ts_ms, &r.payload), (i, 1000 + i, &payload(i)));
        }
        log.sync().unwrap();
    }
    let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.records_loaded, 100);
    assert_eq!(
        (rep.first_seq, rep.last_seq, rep.next_seq),
        (Some(1), Some(100), 101)
    );
    assert_eq!(log.append(b"more").unwrap().seq, 101);
    assert_eq!(seqs(&log).len(), 101);
}

#[test]
fn empty_payload_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(log.append_batch_at(5, Vec::<Vec<u8>>::new()).unwrap(), None);
    assert_eq!(log.append_at(5, b"").unwrap().seq, 1);
    let r = log.append_batch_at(6, [&b"a"[..], b"bb", b"ccc"]).unwrap();
    assert_eq!(r, Some(2..=4));
    let recs = all(&log);
    assert_eq!(
        recs.iter().map(|r| r.payload.len()).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn oversized_payload_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        max_payload_bytes: 10,
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    log.append(b"ok").unwrap();
    let e = log
        .append_batch_at(1, [&b"fine"[..], &[0u8; 11][..]])
        .unwrap_err();
    assert!(
        matches!(e, Error::PayloadTooLarge { len: 11, max: 10 }),
        "{e}"
    );
    assert_eq!(seqs(&log), vec![1]);
    assert_eq!(log.append(b"next").unwrap().seq, 2);
    let too_big = LogOptions {
        max_payload_bytes: FORMAT_MAX_PAYLOAD + 1,
        ..opts()
    };
    drop(log);
    assert!(matches!(
        Log::open(dir.path(), too_big),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn rotation_by_size_and_reads_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        segment_max_bytes: 200,
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    for i in 1..=50 {
        log.append_at(i * 10, &payload(i)).unwrap();
    }
    assert!(log.stats().segments > 5, "{:?}", log.stats());
    for f in segment_files(dir.path()) {
        let len = fs::metadata(&f).unwrap().len();
        assert!(
            len <= 200 || len == SEGMENT_HEADER_LEN + frame_size(payload(1).len() + 10),
            "{len}"
        );
    }
    assert_eq!(seqs(&log), (1..=50).collect::<Vec<_>>());
    let from: Vec<u64> = log
        .read_from_seq(37)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(from, (37..=50).collect::<Vec<_>>());
    let since: Vec<u64> = log
        .read_since(255)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(since, (26..=50).collect::<Vec<_>>());
    assert_eq!(log.read_from_seq(51).unwrap().count(), 0);
    // A record larger than a segment gets one of its own.
    let big = vec![7u8; 500];
    let a = log.append(&big).unwrap();
    assert_eq!(
        log.read_from_seq(a.seq)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .payload,
        big
    );
    drop(log);
    let (log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean());
    assert_eq!(seqs(&log), (1..=51).collect::<Vec<_>>());
}

#[test]
fn seek_by_sparse_index_in_large_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    let p = vec![1u8; 1000];
    for _ in 0..1000 {
        log.append_at(1, &p).unwrap();
    }
    for start in [1, 2, 64, 65, 500, 999, 1000] {
        let got: Vec<u64> = log
            .read_from_seq(start)
            .unwrap()
            .map(|r| r.unwrap().seq)
            .take(2)
            .collect();
        assert_eq!(got[0], start);
    }
}

#[test]
fn read_since_tolerates_clock_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    for ts in [100, 200, 50, 300, 10] {
        log.append_at(ts, b"x").unwrap();
    }
    let since: Vec<u64> = log
        .read_since(150)
        .unwrap()
        .map(|r| r.unwrap().ts_ms)
        .collect();
    assert_eq!(since, vec![200, 300]);
}

#[test]
fn snapshot_does_not_see_later_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    log.append(b"a").unwrap();
    let it = log.iter().unwrap();
    log.append(b"b").unwrap();
    assert_eq!(it.count(), 1);
}

#[test]
fn directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = Log::open(dir.path(), opts()).unwrap();
    assert!(matches!(
        Log::open(dir.path(), opts()),
        Err(Error::Locked(_))
    ));
}

fn write_n(dir: &Path, o: LogOptions, n: u64) {
    let (mut log, _) = Log::open(dir, o).unwrap();
    for i in 1..=n {
        log.append_at(i, &payload(i)).unwrap();
    }
    log.sync().unwrap();
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), opts(), 20);
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(rep.records_loaded, 19);
    assert_eq!(rep.damage.len(), 1);
    let d = &rep.damage[0];
    assert_eq!(d.kind, DamageKind::TornTail);
    assert_eq!(d.reason, DamageReason::IncompleteFrame);
    assert_eq!(d.last_good_seq, Some(19));
    assert_eq!(d.lost.at_least, 1);
    assert_eq!(d.bytes_lost, frame_size(payload(20).len()) - 5);
    assert!(d.quarantined.as_ref().unwrap().exists());
    assert_eq!(seqs(&log), (1..=19).collect::<Vec<_>>());
    // Appends continue cleanly, and a second open finds nothing to repair.
    assert_eq!(log.append(b"after").unwrap().seq, 20);
    drop(log);
    let (log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(seqs(&log), (1..=20).collect::<Vec<_>>());
}

#[test]
fn zero_filled_tail_is_torn_and_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), opts(), 3);
    let seg = segment_files(dir.path()).pop().unwrap();
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0; 4096])
        .unwrap();
    let (_log, rep) = Log::open(dir.path(), opts()).unwrap();
    let d = &rep.damage[0];
    assert_eq!(
        (d.kind, d.reason, d.bytes_lost),
        (DamageKind::TornTail, DamageReason::ZeroFilled, 4096)
    );
    assert_eq!(d.lost.at_least, 0);
    assert!(d.quarantined.is_none());
    assert_eq!(rep.records_loaded, 3);
}

#[test]
fn zeros_with_a_record_after_them_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    write_n_then_edit(dir.path(), 3, |bytes| {
        bytes[offset_of(2) as usize..offset_of(3) as usize].fill(0);
    });
    let (log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(rep.damage.len(), 1, "{rep:?}");
    let d = &rep.damage[0];
    assert_eq!(d.offset, offset_of(2));
    // The zeroed record and record 3, which still verifies.
    assert_eq!(d.lost.at_least, 2);
    assert!(d.quarantined.is_some());
    assert_eq!(seqs(&log), vec![1]);
}

/// Writes records 1..=n (one segment) and changes its file's bytes with
/// `edit`; returns them as edited.
fn write_n_then_edit(dir: &Path, n: u64, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    write_n(dir, opts(), n);
    let seg = segment_files(dir).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    edit(&mut bytes);
    fs::write(&seg, &bytes).unwrap();
    bytes
}

/// Offset of the frame for `seq` when every record in one segment holds payload(i).
fn offset_of(seq: u64) -> u64 {
    SEGMENT_HEADER_LEN + (1..seq).map(|i| frame_size(payload(i).len())).sum::<u64>()
}

/// In a log that does not preallocate, the bytes after damage are all
/// records (or their remains): the quarantine keeps every one of them,
/// also zeros at the end that belong to the last record's payload (only a
/// preallocated segment's zeros are unused space that is left out).
#[test]
fn the_quarantine_keeps_a_records_trailing_zeros_without_preallocation() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
        for i in 1..=5u8 {
            let mut p = vec![i; 40];
            p.extend_from_slice(&[0; 24]);
            log.append_at(u64::from(i), &p).unwrap();
        }
        log.sync().unwrap();
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    assert!(bytes.ends_with(&[0; 24]));
    let second = SEGMENT_HEADER_LEN + frame_size(64);
    bytes[second as usize + 30] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();

    let (log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(rep.damage.len(), 1, "{rep:?}");
    let d = &rep.damage[0];
    assert_eq!(d.offset, second);
    assert_eq!(d.bytes_lost, bytes.len() as u64 - second);
    assert_eq!(
        fs::read(d.quarantined.as_ref().unwrap()).unwrap(),
        bytes[second as usize..]
    );
    assert_eq!(seqs(&log), vec![1]);
}

#[test]
fn flipped_byte_in_the_middle_loads_everything_before() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = write_n_then_edit(dir.path(), 100, |bytes| {
        bytes[offset_of(50) as usize + 30] ^= 0x01; // inside record 50's payload
    });

    let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(rep.records_loaded, 49);
    let d = &rep.damage[0];
    assert_eq!(d.kind, DamageKind::Corrupt);
    assert_eq!(d.reason, DamageReason::Checksum);
    assert_eq!(d.offset, offset_of(50));
    assert_eq!(d.last_good_seq, Some(49));
    assert_eq!(d.lost.at_least, 51);
    assert_eq!(d.lost.seqs, Some(50..=100));
    assert_eq!(d.bytes_lost, bytes.len() as u64 - offset_of(50));
    assert_eq!(
        fs::read(d.quarantined.as_ref().unwrap()).unwrap(),
        bytes[offset_of(50) as usize..]
    );
    assert_eq!(seqs(&log), (1..=49).collect::<Vec<_>>());
    // Numbers seen past the damage are never reused.
    assert_eq!(rep.next_seq, 101);
    assert_eq!(log.append(b"x").unwrap().seq, 101);
}

#[test]
fn damage_in_a_sealed_segment_costs_only_that_segment() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        segment_max_bytes: 300,
        ..opts()
    };
    write_n(dir.path(), o, 60);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4);
    let victim = &files[1];
    let first_of_next: u64 = files[2]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let first_of_victim: u64 = victim
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(victim).unwrap();
    // Damage the second frame's CRC.
    let second = SEGMENT_HEADER_LEN as usize + frame_size(payload(first_of_victim).len()) as usize;
    bytes[second + 5] ^= 0xff;
    fs::write(victim, &bytes).unwrap();

    let (log, rep) = Log::open(dir.path(), o).unwrap();
    assert_eq!(rep.damage.len(), 1);
    let d = &rep.damage[0];
    assert_eq!(d.last_good_seq, Some(first_of_victim));
    assert_eq!(d.lost.seqs, Some(first_of_victim + 1..=first_of_next - 1));
    assert_eq!(d.lost.at_least, first_of_next - first_of_victim - 1);
    let got = seqs(&log);
    let want: Vec<u64> = (1..=60)
        .filter(|s| *s <= first_of_victim || *s >= first_of_next)
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        rep.records_lost_at_least(),
        first_of_next - first_of_victim - 1
    );
}

#[test]
fn garbage_header_and_empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), opts(), 3);
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut b = fs::read(&seg).unwrap();
    b[..8].copy_from_slice(b"GARBAGE!");
    fs::write(&seg, &b).unwrap();
    let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(rep.damage[0].reason, DamageReason::BadSegmentHeader);
    assert_eq!(rep.records_loaded, 0);
    assert_eq!(rep.damage[0].lost.at_least, 3);
    // Never reuse the numbers that were on disk.
    assert_eq!(log.append(b"x").unwrap().seq, 4);
    drop(log);
    // A segment created but whose header never reached the disk.
    let (log, _) = Log::open(dir.path(), opts()).unwrap();
    drop(log);
    let empty = segment_files(dir.path())[0].with_file_name(format!("{:020}.seg", 1000));
    fs::write(&empty, b"").unwrap();
    let (mut log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(log.append(b"y").unwrap().seq, 1000);
}

#[test]
fn retention_by_size_drops_oldest_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        segment_max_bytes: 1000,
        retention: Retention {
            max_total_bytes: Some(3000),
            max_age: None,
        },
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    for i in 1..=500 {
        log.append_at(i, &payload(i)).unwrap();
    }
    let st = log.stats();
    assert!(st.bytes <= 3000 + 1000, "{st:?}");
    assert!(st.bytes > 1500, "{st:?}");
    let s = seqs(&log);
    assert_eq!(*s.last().unwrap(), 500);
    assert!(
        s.windows(2).all(|w| w[1] == w[0] + 1),
        "a contiguous suffix survives"
    );
    assert_eq!(Some(s[0]), log.first_seq());
}

#[test]
fn retention_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        segment_max_bytes: 200,
        retention: Retention {
            max_total_bytes: None,
            max_age: Some(Duration::from_secs(10)),
        },
        ..opts()
    };
    let now = now_ms();
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    // 44-byte frames: four per 200-byte segment. Twelve old records fill
    // three segments exactly; eight fresh ones follow.
    let p = [0u8; 20];
    for i in 0..20 {
        let ts = if i < 12 { now - 3_600_000 } else { now };
        log.append_at(ts, &p).unwrap();
    }
    // Retention ran on each rotation, with the real clock.
    let recs = all(&log);
    assert!(
        recs.iter().all(|r| r.ts_ms == now),
        "only fresh records left"
    );
    assert_eq!(recs.len(), 8);
    assert_eq!(log.first_seq(), Some(13));
    assert_eq!(log.enforce_retention_at(now).unwrap().segments_removed, 0);
    // Far in the future everything but the active segment goes.
    log.enforce_retention_at(now + 3_600_000).unwrap();
    assert_eq!(log.stats().segments, 1);
}

#[test]
fn reader_survives_retention_deleting_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        segment_max_bytes: 200,
        retention: Retention {
            max_age: Some(Duration::from_secs(60)),
            max_total_bytes: None,
        },
        ..opts()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    let now = now_ms();
    for i in 1..=30 {
        log.append_at(now, &payload(i)).unwrap();
    }
    let it = log.iter().unwrap();
    let rep = log.enforce_retention_at(now + 3_600_000).unwrap();
    assert!(rep.segments_removed > 1);
    assert_eq!(it.count(), 30);
}

#[test]
fn fsync_always_path() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        fsync: FsyncPolicy::Always,
        segment_max_bytes: 256,
        ..LogOptions::default()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    for i in 1..=20 {
        log.append(&payload(i)).unwrap();
        assert!(!log.stats().dirty, "Always leaves nothing unsynced");
        assert_eq!(log.sync_due_in(), None);
    }
    log.append_batch_at(1, [b"a", b"b"]).unwrap();
    assert!(!log.stats().dirty);
}

#[test]
fn interval_policy_reports_when_sync_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let o = LogOptions {
        fsync: FsyncPolicy::Interval(Duration::from_millis(30)),
        ..LogOptions::default()
    };
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    assert_eq!(log.sync_due_in(), None);
    assert!(!log.sync_if_due().unwrap());
    log.append(b"x").unwrap();
    assert!(log.stats().dirty);
    assert!(log.sync_due_in().is_some());
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(log.sync_due_in(), Some(Duration::ZERO));
    assert!(log.sync_if_due().unwrap());
    assert!(!log.stats().dirty);
}

fn compaction_opts() -> LogOptions {
    LogOptions {
        segment_max_bytes: 400,
        ..opts()
    }
}

#[test]
fn compaction_keeps_chosen_records_and_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let o = compaction_opts();
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    for i in 1..=100 {
        log.append_at(i, &payload(i)).unwrap();
    }
    let (mut plan, source) = log.begin_compaction().unwrap();
    assert_eq!(plan.boundary_seq(), 101);
    // Appends go on while the plan is filled.
    for i in 101..=110 {
        log.append_at(i, &payload(i)).unwrap();
    }
    for r in source {
        let r = r.unwrap();
        if r.seq % 10 == 0 {
            plan.push(&r).unwrap();
        }
    }
    let rep = log.finish_compaction(plan).unwrap();
    assert_eq!(
        (rep.generation, rep.records_before, rep.records_after),
        (2, 100, 10)
    );
    assert!(rep.bytes_after < rep.bytes_before);
    let want: Vec<u64> = (1..=100).filter(|s| s % 10 == 0).chain(101..=110).collect();
    assert_eq!(seqs(&log), want);
    // The active segment still works after the switch.
    assert_eq!(log.append(b"z").unwrap().seq, 111);
    drop(log);
    let (log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean() && rep.removed_stale.is_empty(), "{rep:?}");
    assert_eq!(rep.generation, 2);
    let mut want = want;
    want.push(111);
    assert_eq!(seqs(&log), want);
    assert!(!dir.path().join("gen-000001").exists());
    // Payloads survived intact.
    assert!(all(&log)
        .iter()
        .all(|r| r.seq == 111 || r.payload == payload(r.seq)));
}

#[test]
fn compaction_refuses_bad_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), compaction_opts()).unwrap();
    for i in 1..=5 {
        log.append(&payload(i)).unwrap();
    }
    let (mut plan, _) = log.begin_compaction().unwrap();
    plan.push_parts(3, 0, b"x").unwrap();
    assert!(matches!(
        plan.push_parts(3, 0, b"x"),
        Err(Error::Compaction(_))
    ));
    assert!(matches!(
        plan.push_parts(6, 0, b"x"),
        Err(Error::Compaction(_))
    ));
    // Dropping an unfinished plan removes its directory.
    drop(plan);
    assert!(!dir.path().join("gen-000002.tmp").exists());
    let rep = log.compact_retain(|_| false).unwrap();
    assert_eq!(rep.records_after, 0);
    assert_eq!(seqs(&log), Vec::<u64>::new());
    assert_eq!(log.append(b"x").unwrap().seq, 6);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Builds a log with 50 records, then returns (dir, gen-1 copy, gen-2 copy):
/// the complete directories before and after a compaction keeping even seqs.
fn compaction_states() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let o = compaction_opts();
    let (mut log, _) = Log::open(&live, o).unwrap();
    for i in 1..=50 {
        log.append_at(i, &payload(i)).unwrap();
    }
    log.sync().unwrap();
    copy_dir(&live.join("gen-000001"), &dir.path().join("old"));
    log.compact_retain(|r| r.seq % 2 == 0).unwrap();
    copy_dir(&live.join("gen-000002"), &dir.path().join("new"));
    drop(log);
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    (dir, old, new)
}

fn assert_opens_to(root: &Path, want: &[u64], want_gen: u64) {
    let (log, rep) = Log::open(root, compaction_opts()).unwrap();
    assert_eq!(seqs(&log), want, "{rep:?}");
    assert_eq!(rep.generation, want_gen);
    let names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(
        names,
        vec![format!("gen-{want_gen:06}")],
        "stale generations removed"
    );
}

#[test]
fn compaction_crash_points() {
    let (tmp, old, new) = compaction_states();
    let all_seqs: Vec<u64> = (1..=50).collect();
    let even: Vec<u64> = (1..=50).filter(|s| s % 2 == 0).collect();

    // 1. Crash while writing the new generation: a partial .tmp (half a
    //    segment written) next to the old generation.
    let root = tmp.path().join("c1");
    copy_dir(&old, &root.join("gen-000001"));
    fs::create_dir_all(root.join("gen-000002.tmp")).unwrap();
    let first_new = fs::read_dir(&new).unwrap().next().unwrap().unwrap().path();
    let b = fs::read(&first_new).unwrap();
    fs::write(
        root.join("gen-000002.tmp")
            .join(first_new.file_name().unwrap()),
        &b[..b.len() / 2],
    )
    .unwrap();
    assert_opens_to(&root, &all_seqs, 1);

    // 2. Crash after the new generation is complete but before the rename.
    let root = tmp.path().join("c2");
    copy_dir(&old, &root.join("gen-000001"));
    copy_dir(&new, &root.join("gen-000002.tmp"));
    assert_opens_to(&root, &all_seqs, 1);

    // 3. Crash after the rename, before the old generation was removed.
    let root = tmp.path().join("c3");
    copy_dir(&old, &root.join("gen-000001"));
    copy_dir(&new, &root.join("gen-000002"));
    assert_opens_to(&root, &even, 2);

    // 4. Crash half-way through removing the old generation.
    let root = tmp.path().join("c4");
    copy_dir(&old, &root.join("gen-000001"));
    copy_dir(&new, &root.join("gen-000002"));
    let mut olds: Vec<PathBuf> = fs::read_dir(root.join("gen-000001"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    olds.sort();
    for p in olds.iter().take(olds.len() / 2) {
        fs::remove_file(p).unwrap();
    }
    assert_opens_to(&root, &even, 2);

    // 5. An empty old generation directory left at the very end.
    let root = tmp.path().join("c5");
    fs::create_dir_all(root.join("gen-000001")).unwrap();
    copy_dir(&new, &root.join("gen-000002"));
    assert_opens_to(&root, &even, 2);
}

#[test]
fn compaction_preserves_numbering_across_reopen_with_damage() {
    // After compaction, segments have gaps in their numbers; recovery must
    // still accept them and keep numbering above the highest.
    let dir = tempfile::tempdir().unwrap();
    let o = compaction_opts();
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    for i in 1..=40 {
        log.append_at(i, &payload(i)).unwrap();
    }
    log.compact_retain(|r| r.seq % 5 == 0).unwrap();
    log.sync().unwrap();
    drop(log);
    let (mut log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(seqs(&log), vec![5, 10, 15, 20, 25, 30, 35, 40]);
    assert_eq!(log.append(b"x").unwrap().seq, 41);
}

#[test]
fn pending_sync_outside_the_log_and_poison() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), opts()).unwrap();
    assert!(log.take_pending_sync().unwrap().is_none());
    log.append(b"a").unwrap();
    let ps = log.take_pending_sync().unwrap().unwrap();
    assert!(!log.stats().dirty);
    log.append(b"b").unwrap(); // appends go on meanwhile
    ps.run().unwrap();
    assert!(log.stats().dirty, "the later append is not covered");
    log.poison("simulated fsync failure");
    assert!(matches!(log.append(b"c"), Err(Error::Poisoned { .. })));
    drop(log);
    let (log, rep) = Log::open(dir.path(), opts()).unwrap();
    assert!(rep.is_clean());
    assert_eq!(seqs(&log), vec![1, 2]);
}

/// Reopens the log in `dir`: clean, holding exactly the records `want`.
fn assert_reopens_clean(dir: &Path, o: LogOptions, want: &[u64]) {
    let (log, rep) = Log::open(dir, o).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(seqs(&log), want);
}

/// `log.sync()` while `early`, taken before, runs 150 ms later on another
/// thread: the sync must not return before it.
fn assert_sync_waits_for(log: &mut Log, early: PendingSync) {
    let started = std::time::Instant::now();
    let runner = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        early.run().unwrap();
    });
    log.sync().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "sync returned after {:?}, before the earlier handle ran",
        started.elapsed()
    );
    runner.join().unwrap();
}

/// Opens the log in `dir` and appends records 1..=n (`payload(i)` at time i).
fn open_with_records(dir: &Path, o: LogOptions, n: u64) -> Log {
    let (mut log, _) = Log::open(dir, o).unwrap();
    for i in 1..=n {
        log.append_at(i, &payload(i)).unwrap();
    }
    log
}

fn deferred_opts(segment_max_bytes: u64) -> LogOptions {
    LogOptions {
        segment_max_bytes,
        defer_writes: true,
        ..opts()
    }
}

fn total_file_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn deferred_appends_are_written_by_their_pending_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_with_records(dir.path(), deferred_opts(64 << 20), 3);
    // Nothing reached the file (only the header `open` wrote), and readers
    // see only written records.
    assert_eq!(total_file_bytes(dir.path()), SEGMENT_HEADER_LEN);
    assert!(seqs(&log).is_empty());
    let ps = log.take_pending_sync().unwrap().unwrap();
    log.append_at(4, &payload(4)).unwrap(); // after the take: not covered
    ps.run().unwrap();
    let written: u64 = (1..=3).map(|i| frame_size(payload(i).len())).sum();
    assert_eq!(total_file_bytes(dir.path()), SEGMENT_HEADER_LEN + written);
    assert_eq!(seqs(&log), vec![1, 2, 3]);
    assert!(log.stats().dirty);
    // Closing writes what is still owed.
    drop(log);
    assert_reopens_clean(dir.path(), deferred_opts(64 << 20), &[1, 2, 3, 4]);
    let (log, _) = Log::open(dir.path(), deferred_opts(64 << 20)).unwrap();
    assert_eq!(all(&log)[3].payload, payload(4));
}

#[test]
fn deferred_rotation_is_sealed_by_the_next_pending_sync() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(200);
    let mut log = open_with_records(dir.path(), o, 50);
    let segments = log.stats().segments;
    assert!(segments > 5, "{segments}");
    // Rotation created the files but wrote nothing, not even the headers.
    let files = segment_files(dir.path());
    assert_eq!(files.len(), segments);
    assert_eq!(total_file_bytes(dir.path()), SEGMENT_HEADER_LEN);
    let ps = log.take_pending_sync().unwrap().unwrap();
    ps.run().unwrap();
    assert!(!log.stats().dirty);
    assert!(log.take_pending_sync().unwrap().is_none());
    assert_eq!(total_file_bytes(dir.path()), log.stats().bytes);
    assert_eq!(seqs(&log), (1..=50).collect::<Vec<_>>());
    // The same layout as immediate writes give.
    let plain = tempfile::tempdir().unwrap();
    let (mut plain_log, _) = Log::open(
        plain.path(),
        LogOptions {
            defer_writes: false,
            ..o
        },
    )
    .unwrap();
    for i in 1..=50 {
        plain_log.append_at(i, &payload(i)).unwrap();
    }
    let sizes = |d: &Path| -> Vec<(String, u64)> {
        segment_files(d)
            .iter()
            .map(|f| {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                (name, fs::metadata(f).unwrap().len())
            })
            .collect()
    };
    assert_eq!(sizes(dir.path()), sizes(plain.path()));
    drop(log);
    assert_reopens_clean(dir.path(), o, &(1..=50).collect::<Vec<_>>());
}

#[test]
fn deferred_writes_land_in_append_order_whoever_writes_them() {
    // A PendingSync taken first but run late, on another thread, still
    // writes before a later `sync()` on this one; the frames are in order.
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(300);
    let mut log = open_with_records(dir.path(), o, 10);
    let early = log.take_pending_sync().unwrap().unwrap();
    for i in 11..=30 {
        log.append_at(i, &payload(i)).unwrap();
    }
    let runner = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        early.run().unwrap();
    });
    log.sync().unwrap(); // waits for `early`'s bytes, then writes its own
    runner.join().unwrap();
    assert_eq!(seqs(&log), (1..=30).collect::<Vec<_>>());
    drop(log);
    assert_reopens_clean(dir.path(), o, &(1..=30).collect::<Vec<_>>());
}

#[test]
fn deferred_pending_sync_dropped_unrun_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(64 << 20);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    log.append(b"a").unwrap();
    log.take_pending_sync().unwrap().unwrap().run().unwrap();
    log.append(b"b").unwrap();
    drop(log.take_pending_sync().unwrap().unwrap());
    assert!(matches!(log.append(b"c"), Err(Error::Poisoned { .. })));
    assert!(matches!(log.sync(), Err(Error::Poisoned { .. })));
    drop(log);
    // Only the written record is there.
    assert_reopens_clean(dir.path(), o, &[1]);
}

#[test]
fn deferred_writes_are_bounded_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), deferred_opts(64 << 20)).unwrap();
    let big = vec![5u8; 1 << 20];
    for _ in 0..9 {
        log.append(&big).unwrap();
    }
    // The eighth append took the owed bytes past MAX_UNWRITTEN, so the
    // first eight were written without a sync; the ninth is still owed.
    let frame = frame_size(big.len());
    assert_eq!(total_file_bytes(dir.path()), SEGMENT_HEADER_LEN + 8 * frame);
    assert!(log.stats().dirty);
    assert_eq!(seqs(&log).len(), 8);
}

#[test]
fn deferred_compaction_reads_every_record_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(400);
    let mut log = open_with_records(dir.path(), o, 60);
    // Nothing synced or written yet: compaction must still see all 60.
    let mut seen = 0;
    log.compact_retain(|r| {
        seen += 1;
        r.seq % 3 == 0
    })
    .unwrap();
    assert_eq!(seen, 60);
    for i in 61..=70 {
        log.append_at(i, &payload(i)).unwrap();
    }
    log.take_pending_sync().unwrap().unwrap().run().unwrap();
    let want: Vec<u64> = (1..=60).filter(|s| s % 3 == 0).chain(61..=70).collect();
    assert_eq!(seqs(&log), want);
    drop(log);
    assert_reopens_clean(dir.path(), o, &want);
}

#[test]
fn superseded_segments_are_freed_in_steps_after_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let o = compaction_opts();
    let mut log = open_with_records(dir.path(), o, 100);
    let old_gen = dir.path().join("gen-000001");
    let (mut plan, source) = log.begin_compaction().unwrap();
    let boundary = plan.boundary_seq();
    for rec in source {
        let rec = rec.unwrap();
        if rec.seq % 10 == 0 {
            plan.push(&rec).unwrap();
        }
    }
    let replaced: u64 = fs::read_dir(&old_gen)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let seq: u64 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            seq < boundary
        })
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    for i in 101..=105 {
        log.append_at(i, &payload(i)).unwrap();
    }
    let (report, old) = log.finish_compaction_keeping(plan).unwrap();
    assert_eq!(report.generation, 2);
    // The names are gone at once; the blocks wait for `release`.
    assert!(!old_gen.exists());
    assert_eq!(old.bytes(), replaced);
    assert_eq!(old.release(100, Duration::ZERO), replaced);
    let want: Vec<u64> = (10..=100).step_by(10).chain(101..=105).collect();
    assert_eq!(seqs(&log), want);
    log.sync().unwrap();
    drop(log);
    assert_reopens_clean(dir.path(), o, &want);
}

#[test]
fn a_failed_compaction_switch_keeps_the_directory_fsync_owed() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(400);
    let mut log = open_with_records(dir.path(), o, 20);
    log.sync().unwrap();
    let (plan, _) = log.begin_compaction().unwrap();
    // Appends during the compaction fill segments: the next ones are
    // created in gen-000001, whose fsync is now owed.
    for i in 21..=40 {
        log.append_at(i, &payload(i)).unwrap();
    }
    assert!(log.dir_unsynced.is_some());
    // Something in the way of the rename: the switch fails.
    let blocker = dir.path().join("gen-000002");
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("x"), b"x").unwrap();
    assert!(log.finish_compaction(plan).is_err());
    assert!(
        log.dir_unsynced.is_some(),
        "the old generation is still the log and still owes its fsync"
    );
    log.append_at(41, &payload(41)).unwrap();
    log.sync().unwrap();
    assert!(log.dir_unsynced.is_none());
    drop(log);
    fs::remove_dir_all(&blocker).unwrap();
    assert_reopens_clean(dir.path(), o, &(1..=41).collect::<Vec<_>>());
}

#[test]
fn deferred_sync_returns_only_after_an_earlier_pending_sync_finished() {
    // The earlier handle owes a sealed segment's fsync and the directory's;
    // a later sync() must not report durability before those are done.
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(200);
    let mut log = open_with_records(dir.path(), o, 10);
    let early = log.take_pending_sync().unwrap().unwrap();
    log.append_at(11, &payload(11)).unwrap();
    assert_sync_waits_for(&mut log, early);
    drop(log);
    assert_reopens_clean(dir.path(), o, &(1..=11).collect::<Vec<_>>());
}

#[test]
fn deferred_sync_with_nothing_new_still_waits_for_an_earlier_pending_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(dir.path(), deferred_opts(64 << 20)).unwrap();
    log.append(b"a").unwrap();
    let early = log.take_pending_sync().unwrap().unwrap();
    assert!(!log.stats().dirty);
    assert_sync_waits_for(&mut log, early);
}

/// The generation directories at the top of `dir`, temporary ones included.
fn generation_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_poisoned_log_is_rebuilt_from_the_callers_state_and_writable_again() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(256);
    let mut log = open_with_records(dir.path(), o, 30);
    log.sync().unwrap();
    // Records owed but never written, then a failure: the log refuses.
    log.append_at(31, &payload(31)).unwrap();
    drop(log.take_pending_sync().unwrap().unwrap());
    assert!(matches!(log.append(b"x"), Err(Error::Poisoned { .. })));
    let next = log.next_seq();
    assert_eq!(next, 32);
    let gen = log.gen;

    // The caller's state: three records, numbered just below the boundary.
    let report = log
        .rebuild(3, |plan| {
            assert_eq!(plan.boundary_seq(), next);
            for (i, seq) in (next - 3..next).enumerate() {
                plan.push_parts(seq, 7, format!("state-{i}").as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(report.records_after, 3);
    assert_eq!(report.generation, gen + 1);
    assert_eq!(log.gen, gen + 1);
    // Numbering goes on; the log takes appends and syncs again.
    assert_eq!(log.next_seq(), next);
    assert_eq!(seqs(&log), vec![29, 30, 31]);
    assert_eq!(log.append(b"after").unwrap().seq, next);
    log.sync().unwrap();
    assert_eq!(
        generation_dirs(dir.path()),
        vec![crate::log::gen_dir_name(gen + 1)]
    );
    drop(log);
    let (log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let recs = all(&log);
    let got: Vec<(u64, Vec<u8>)> = recs.into_iter().map(|r| (r.seq, r.payload)).collect();
    assert_eq!(
        got,
        vec![
            (29, b"state-0".to_vec()),
            (30, b"state-1".to_vec()),
            (31, b"state-2".to_vec()),
            (32, b"after".to_vec()),
        ]
    );
}

#[test]
fn a_rebuild_to_nothing_keeps_the_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(64 << 20);
    let mut log = open_with_records(dir.path(), o, 5);
    log.sync().unwrap();
    log.rebuild(0, |_| Ok(())).unwrap();
    assert!(seqs(&log).is_empty());
    assert_eq!(log.next_seq(), 6);
    drop(log);
    let (mut log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(log.next_seq(), 6);
    assert_eq!(log.append(b"a").unwrap().seq, 6);
}

#[test]
fn a_failed_rebuild_leaves_the_log_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(64 << 20);
    let mut log = open_with_records(dir.path(), o, 5);
    log.sync().unwrap();
    let gen = log.gen;
    // A record out of range: refused, the temporary generation removed,
    // and the old log still the log, still writable.
    let err = log.rebuild(1, |plan| plan.push_parts(plan.boundary_seq(), 1, b"x"));
    assert!(matches!(err, Err(Error::Compaction(_))), "{err:?}");
    assert_eq!(
        generation_dirs(dir.path()),
        vec![crate::log::gen_dir_name(gen)]
    );
    assert_eq!(log.append(b"more").unwrap().seq, 6);
    log.sync().unwrap();
    drop(log);
    assert_reopens_clean(dir.path(), o, &[1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_rebuild_with_more_records_than_numbers_moves_the_numbering_up() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(64 << 20);
    let mut log = open_with_records(dir.path(), o, 2);
    log.sync().unwrap();
    log.poison("simulated write failure");
    log.rebuild(10, |plan| {
        assert_eq!(plan.boundary_seq(), 11);
        for seq in 1..=10 {
            plan.push_parts(seq, 1, &payload(seq))?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seqs(&log), (1..=10).collect::<Vec<_>>());
    assert_eq!(log.append(b"next").unwrap().seq, 11);
    log.sync().unwrap();
    drop(log);
    assert_reopens_clean(dir.path(), o, &(1..=11).collect::<Vec<_>>());
}

#[test]
fn a_rebuild_that_fails_after_its_rename_poisons_the_log_and_the_next_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let o = deferred_opts(64 << 20);
    let mut log = open_with_records(dir.path(), o, 4);
    log.sync().unwrap();
    crate::compact::FAIL_AFTER_RENAME.with(|f| f.set(true));
    let one = |plan: &mut Compaction| plan.push_parts(4, 1, b"first");
    assert!(log.rebuild(1, one).is_err());
    // The renamed generation is the log on disk now: writing on into the
    // old one would put records where the next open drops them.
    assert!(matches!(log.append(b"lost"), Err(Error::Poisoned { .. })));
    log.rebuild(1, |plan| plan.push_parts(4, 1, b"second"))
        .unwrap();
    assert_eq!(log.append(b"kept").unwrap().seq, 5);
    log.sync().unwrap();
    drop(log);
    let (log, _) = Log::open(dir.path(), o).unwrap();
    let got: Vec<(u64, Vec<u8>)> = all(&log).into_iter().map(|r| (r.seq, r.payload)).collect();
    assert_eq!(got, vec![(4, b"second".to_vec()), (5, b"kept".to_vec())]);
    assert_eq!(generation_dirs(dir.path()).len(), 1);
}

fn prealloc_opts(segment_max_bytes: u64) -> LogOptions {
    LogOptions {
        preallocate: true,
        ..deferred_opts(segment_max_bytes)
    }
}

/// Opens the log in `dir`, writes a spare and appends records 1..=n: the
/// first in the log's first segment, the rest in the spare.
fn log_in_a_spare(dir: &Path, o: LogOptions, n: u64) -> Log {
    let (mut log, _) = Log::open(dir, o).unwrap();
    log.spare_job().unwrap().run(|| {}).unwrap();
    log.spare_written();
    append_and_sync(&mut log, 1..=n);
    log
}

fn append_and_sync(log: &mut Log, seqs: std::ops::RangeInclusive<u64>) {
    for i in seqs {
        log.append_at(i, &payload(i)).unwrap();
        if i % 10 == 0 {
            log.take_pending_sync().unwrap().unwrap().run().unwrap();
        }
    }
    log.sync().unwrap();
}

/// (file length, logical length) of each segment of `log`.
fn lengths(log: &Log) -> Vec<(u64, u64)> {
    log.segments
        .iter()
        .map(|s| (fs::metadata(&s.path).unwrap().len(), s.len))
        .collect()
}

#[test]
fn rotations_start_the_next_segment_in_a_ready_spare() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), deferred_opts(8192)).unwrap();
    assert!(log.spare_job().is_none(), "not without the option");
    drop(log);
    let o = prealloc_opts(8192);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    let spare = log.gen_dir.join(crate::log::SPARE_NAME);
    let job = log.spare_job().expect("a spare is wanted");
    assert_eq!(job.len(), 8192);
    let mut steps = 0;
    job.run(|| steps += 1).unwrap();
    assert_eq!((steps, fs::metadata(&spare).unwrap().len()), (1, 8192));
    assert!(log.spare_job().is_none(), "one is ready");
    log.spare_written();

    // The first segment (not a spare) is left at the next append that
    // finds a record in it: the records after it overwrite the spare.
    append_and_sync(&mut log, 1..=5);
    assert!(!spare.exists());
    let l = lengths(&log);
    assert_eq!(l.len(), 2);
    assert_eq!(
        l[0].0, l[0].1,
        "a created segment is as long as its records"
    );
    assert_eq!(l[1].0, 8192, "the spare keeps its size");
    assert!(l[1].1 < 8192);
    assert_eq!(seqs(&log), (1..=5).collect::<Vec<_>>());

    // With no spare ready, the rotation by size creates a file as before.
    append_and_sync(&mut log, 6..=300);
    let l = lengths(&log);
    assert_eq!(l.len(), 3);
    assert_eq!(l[2].0, l[2].1);
    // A spare made meanwhile is taken by the next rotation by size.
    log.spare_job().unwrap().run(|| {}).unwrap();
    append_and_sync(&mut log, 301..=600);
    assert!(!spare.exists());
    let l = lengths(&log);
    assert_eq!(l[3].0, 8192, "{l:?}");
    assert_eq!(seqs(&log), (1..=600).collect::<Vec<_>>());
    drop(log);

    // The zeros after the records are no damage; the active segment's are
    // cut off, so appends follow its last record.
    assert_reopens_clean_and_appends(dir.path(), o, 600);
}

/// The log in `dir` reopens clean with records 1..=n, takes ten more, and
/// reopens clean with those too.
fn assert_reopens_clean_and_appends(dir: &Path, o: LogOptions, n: u64) {
    assert_reopens_clean(dir, o, &(1..=n).collect::<Vec<_>>());
    let (mut log, _) = Log::open(dir, o).unwrap();
    append_and_sync(&mut log, n + 1..=n + 10);
    drop(log);
    assert_reopens_clean(dir, o, &(1..=n + 10).collect::<Vec<_>>());
}

#[test]
fn a_spare_moved_into_place_but_never_written_opens_as_an_empty_segment() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(4096);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    append_and_sync(&mut log, 1..=20);
    let gen_dir = log.gen_dir.clone();
    drop(log);
    // A crash right after a rotation renamed the spare: its header and
    // records were never written.
    fs::write(
        gen_dir.join(crate::log::segment_file_name(21)),
        vec![0u8; 4096],
    )
    .unwrap();
    assert_reopens_clean_and_appends(dir.path(), o, 20);
}

#[test]
fn a_failed_spare_job_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), prealloc_opts(4096)).unwrap();
    let job = log.spare_job().unwrap();
    // Something in the way of the final rename: the zeros are written, the
    // rename fails, and the temporary file goes.
    let ready = log.gen_dir.join(crate::log::SPARE_NAME);
    fs::create_dir(&ready).unwrap();
    fs::write(ready.join("in-the-way"), b"x").unwrap();
    let mut steps = 0;
    assert!(job.run(|| steps += 1).is_err());
    assert_eq!(steps, 1, "the zeros were written first");
    let mut left: Vec<String> = fs::read_dir(&log.gen_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            "00000000000000000001.seg".to_string(),
            crate::log::SPARE_NAME.to_string()
        ]
    );
}

#[test]
fn zeros_after_the_last_records_of_a_preallocating_log_are_unused_space() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(64 << 10);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    append_and_sync(&mut log, 1..=3);
    let seg = log.segments[0].path.clone();
    let len = fs::metadata(&seg).unwrap().len();
    drop(log);
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0; 4096])
        .unwrap();
    // Cut off unreported, so appends follow the last record.
    assert_reopens_clean_and_appends(dir.path(), o, 3);
    assert!(fs::metadata(&seg).unwrap().len() > len);
    // Without preallocation the same zeros are reported (the last test).
}

#[test]
fn a_sealed_segment_whose_records_end_in_zeros_too_early_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(1024);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    append_and_sync(&mut log, 1..=100);
    let sealed = log.segments[1].clone();
    drop(log);
    let (first, last) = (sealed.first_seq.unwrap(), sealed.last_seq.unwrap());
    assert!(last > first + 2);
    // Acknowledged records of a sealed segment turned to zeros (a disk
    // that lost them): they were there, as the next segment's name says.
    let mut bytes = fs::read(&sealed.path).unwrap();
    let cut = SEGMENT_HEADER_LEN as usize
        + (first..first + 2)
            .map(|i| frame_size(payload(i).len()) as usize)
            .sum::<usize>();
    bytes[cut..].fill(0);
    fs::write(&sealed.path, &bytes).unwrap();
    let (_log, rep) = Log::open(dir.path(), o).unwrap();
    assert_eq!(rep.damage.len(), 1, "{rep:?}");
    let d = &rep.damage[0];
    assert_eq!(d.reason, DamageReason::ZeroFilled);
    assert_eq!(d.lost.seqs, Some(first + 2..=last));
}

#[test]
fn a_torn_frame_in_a_preallocated_segment_costs_only_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(64 << 10);
    let log = log_in_a_spare(dir.path(), o, 10);
    let seg = log.segments[1].clone();
    assert_eq!(fs::metadata(&seg.path).unwrap().len(), 64 << 10, "a spare");
    drop(log);
    // Half of a next frame reached the disk before the power went.
    let mut frame = Vec::new();
    crate::frame::encode_frame(&mut frame, 11, 11, &payload(11));
    let half = &frame[..frame.len() / 2];
    let f = OpenOptions::new().write(true).open(&seg.path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, half, seg.len).unwrap();
    let (_log, rep) = Log::open(dir.path(), o).unwrap();
    assert_eq!(rep.damage.len(), 1, "{rep:?}");
    let d = &rep.damage[0];
    assert_eq!(d.kind, DamageKind::TornTail);
    // Up to its last byte that is not zero (not the spare's zeros after).
    assert!(
        d.bytes_lost > 0 && d.bytes_lost <= half.len() as u64,
        "{d:?}"
    );
    let kept = fs::metadata(d.quarantined.as_ref().unwrap()).unwrap().len();
    assert_eq!(kept, d.bytes_lost);
    assert_eq!(rep.records_loaded, 10);
}

#[test]
fn a_spare_that_cannot_be_used_gives_way_to_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(4096);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    append_and_sync(&mut log, 1..=3);
    // Something that is not a file under the spare's name.
    let spare = log.gen_dir.join(crate::log::SPARE_NAME);
    fs::create_dir(&spare).unwrap();
    log.spare_written();
    append_and_sync(&mut log, 4..=200);
    assert!(spare.is_dir());
    assert!(log.segments.len() > 2);
    drop(log);
    fs::remove_dir(&spare).unwrap();
    assert_reopens_clean_and_appends(dir.path(), o, 200);
}

#[test]
fn a_crash_during_a_rotation_into_a_spare_is_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(4096);
    let (mut log, _) = Log::open(dir.path(), o).unwrap();
    log.spare_job().unwrap().run(|| {}).unwrap();
    log.spare_written();
    append_and_sync(&mut log, 1..=60);
    log.spare_job().unwrap().run(|| {}).unwrap();
    append_and_sync(&mut log, 61..=300);
    assert!(log.segments.len() >= 4);
    // Segment 1 was a spare and segment 2 the next one: on disk as after a
    // kill in the rotation between them, before the sync that would have
    // written segment 1's last records and then segment 2's header.
    let (s1, s2) = (log.segments[1].clone(), log.segments[2].clone());
    let later: Vec<PathBuf> = log.segments[3..].iter().map(|s| s.path.clone()).collect();
    drop(log);
    for p in later {
        fs::remove_file(p).unwrap();
    }
    assert_eq!(fs::metadata(&s1.path).unwrap().len(), 4096, "a spare");
    let mut bytes = fs::read(&s1.path).unwrap();
    let keep = (SEGMENT_HEADER_LEN
        + (s1.first_seq.unwrap()..s1.first_seq.unwrap() + 5)
            .map(|i| frame_size(payload(i).len()))
            .sum::<u64>()) as usize;
    bytes[keep..].fill(0);
    fs::write(&s1.path, &bytes).unwrap();
    fs::write(&s2.path, vec![0u8; 4096]).unwrap();
    // The same zeros with segment 2's header on the disk: that sync went
    // as far as segment 2, so segment 1's records were written, and lost.
    let control = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), control.path());
    let s2_copy = control
        .path()
        .join(s2.path.parent().unwrap().file_name().unwrap())
        .join(s2.path.file_name().unwrap());
    let mut with_header = vec![0u8; 4096];
    with_header[..8].copy_from_slice(b"APLRLOG1");
    fs::write(&s2_copy, &with_header).unwrap();

    let last_kept = s1.first_seq.unwrap() + 4;
    let (log, rep) = Log::open(dir.path(), o).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(seqs(&log), (1..=last_kept).collect::<Vec<_>>());
    let (_log, rep) = Log::open(control.path(), o).unwrap();
    assert_eq!(rep.damage.len(), 1, "{rep:?}");
    assert_eq!(rep.damage[0].reason, DamageReason::ZeroFilled);
    assert_eq!(
        rep.damage[0].lost.seqs,
        Some(last_kept + 1..=s2.name_seq - 1)
    );
}

#[test]
fn a_clean_close_trims_the_unused_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let o = prealloc_opts(64 << 10);
    let log = log_in_a_spare(dir.path(), o, 10);
    let active = log.segments.last().unwrap().path.clone();
    assert_eq!(fs::metadata(&active).unwrap().len(), 64 << 10);
    drop(log);
    assert!(fs::metadata(&active).unwrap().len() < 64 << 10);
    // So the log opens clean without preallocation too.
    assert_reopens_clean_and_appends(dir.path(), deferred_opts(64 << 10), 10);
}
