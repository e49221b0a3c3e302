//! kill -9 of a writer right after appends were acknowledged: every
//! acknowledged record is there after reopening, and recovery is clean or
//! reports only a torn tail.
//!
//! The test re-runs its own binary as the writer (`child_writer`, a no-op
//! unless `RLOG_KILL9_DIR` is set).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use appliance_record_log::{DamageKind, FsyncPolicy, Log, LogOptions};

const DIR_VAR: &str = "RLOG_KILL9_DIR";

#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let opts = LogOptions {
        fsync: FsyncPolicy::Always,
        segment_max_bytes: 64 * 1024,
        ..LogOptions::default()
    };
    let (mut log, _) = Log::open(&dir, opts).unwrap();
    let out = std::io::stdout();
    let mut out = out.lock();
    loop {
        let payload = vec![0xAB; 300];
        let a = log.append(&payload).unwrap();
        writeln!(out, "acked {}", a.seq).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill9_after_acknowledged_append_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_acked = 0u64;
    while last_acked < 500 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            last_acked = n.parse().unwrap();
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (log, rep) = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert!(
        rep.damage.iter().all(|d| d.kind == DamageKind::TornTail),
        "{rep:?}"
    );
    let seqs: Vec<u64> = log.iter().unwrap().map(|r| r.unwrap().seq).collect();
    assert!(
        seqs.len() as u64 >= last_acked,
        "lost acknowledged records: {rep:?}"
    );
    let n = usize::try_from(last_acked).unwrap();
    assert_eq!(seqs[..n], (1..=last_acked).collect::<Vec<_>>()[..]);
}
