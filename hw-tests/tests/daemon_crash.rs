//! Scenario 8 of issue 8: the daemon crashes, then hangs.
//!
//! `kill -9` of applianced's main PID: systemd restarts it (Restart=
//! on-failure, RestartSec=2s) within 5 s, it is ready again, and what the
//! bus and the cache had stored durably before the kill is still there.
//! Then `kill -STOP`: the daemon stops pinging, the watchdog (WatchdogSec=
//! 20s in systemd/applianced.service) fires, systemd kills and restarts it,
//! the journal says so, and it is ready again.
//!
//! The restart times are measured inside the guest (`date +%s%N` around a
//! tight poll of `systemctl show -p MainPID`), so guest-agent round trips
//! do not inflate them.
//!
//! Run: `cargo test -p appliance-hw-tests --test daemon_crash -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_hw_tests::scenario::Appliance;

/// Prints `OLD NEW MS_TO_NEW_PID MS_TO_READY` after running `signal` on the
/// main PID.
fn restart_script(signal: &str) -> String {
    format!(
        r#"old=$(systemctl show -p MainPID --value applianced)
test "$old" -gt 0 || exit 3
t0=$(date +%s%N)
kill -{signal} "$old"
while :; do
  p=$(systemctl show -p MainPID --value applianced)
  if [ "$p" != 0 ] && [ "$p" != "$old" ]; then break; fi
  sleep 0.05
done
t1=$(date +%s%N)
until appliancectl health ready >/dev/null 2>&1; do sleep 0.1; done
t2=$(date +%s%N)
echo "$old $p $(( (t1 - t0) / 1000000 )) $(( (t2 - t0) / 1000000 ))""#
    )
}

/// `(old pid, new pid, time to the new pid, time to ready)`.
fn restart(app: &mut Appliance, signal: &str, timeout: Duration) -> (u64, u64, Duration, Duration) {
    let out = app.run_for(&restart_script(signal), timeout);
    let f: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(f.len(), 4, "{out}");
    (
        f[0],
        f[1],
        Duration::from_millis(f[2]),
        Duration::from_millis(f[3]),
    )
}

#[test]
#[ignore = "boots the image in QEMU/TCG (root, several minutes)"]
fn killed_and_hung_daemon_is_restarted_with_its_data_intact() {
    let t0 = Instant::now();
    let mut app = Appliance::boot("daemon_crash");

    // Durable data before the crash: a bus message and a cache entry.
    app.run(
        r#"appliancectl events publish system.test.crash --data '{"marker":"before-kill-9","n":42}'"#,
    );
    app.run("appliancectl cache put hwtest 'what survives a crash?' --response 'the record log' --ttl 86400");
    let restarts_before: u32 = app
        .run("systemctl show -p NRestarts --value applianced")
        .trim()
        .parse()
        .unwrap();

    // kill -9: restarted within 5 s.
    let (old, new, to_pid, to_ready) = restart(&mut app, "9", Duration::from_secs(180));
    eprintln!(
        "kill -9 {old}: new main PID {new} after {} ms, ready after {} ms",
        to_pid.as_millis(),
        to_ready.as_millis()
    );
    app.ensure(to_pid <= Duration::from_secs(5), || {
        format!("systemd took {to_pid:?} to restart the daemon after kill -9 (limit 5 s)")
    });
    let restarts: u32 = app
        .run("systemctl show -p NRestarts --value applianced")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(restarts, restarts_before + 1, "one restart by systemd");
    app.run("systemctl is-active applianced");

    // The bus message and the cache entry survived.
    let events = app.events("system.test.>");
    let found = events.iter().any(|m| {
        m["subject"] == "system.test.crash"
            && m["data"]["marker"] == "before-kill-9"
            && m["data"]["n"] == 42
    });
    app.ensure(found, || {
        format!("system.test.crash lost after kill -9: {events:#?}")
    });
    let got = app.run("appliancectl cache get hwtest 'what survives a crash?'");
    assert_eq!(got.trim(), "the record log", "cache entry after kill -9");
    // The bus still takes new messages after the restart.
    app.run(r#"appliancectl events publish system.test.crash --data '{"marker":"after-kill-9"}'"#);
    let events = app.events("system.test.>");
    assert!(
        events.iter().any(|m| m["data"]["marker"] == "after-kill-9"),
        "{events:#?}"
    );

    // kill -STOP: the watchdog fires (20 s), systemd kills and restarts it.
    let journal_cursor = app
        .run("journalctl -u applianced -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'")
        .trim()
        .to_owned();
    let (old, new, to_pid, to_ready) = restart(&mut app, "STOP", Duration::from_secs(240));
    eprintln!(
        "kill -STOP {old}: new main PID {new} after {} ms, ready after {} ms",
        to_pid.as_millis(),
        to_ready.as_millis()
    );
    let journal = app.run(&format!(
        "journalctl -u applianced --after-cursor '{journal_cursor}' --no-pager -o cat"
    ));
    app.ensure(journal.contains("Watchdog timeout"), || {
        format!("no watchdog timeout in the journal after kill -STOP:\n{journal}")
    });
    // Not before the watchdog period, and not much after it (the abort
    // signal, then SIGKILL after TimeoutAbortSec at worst, then RestartSec).
    app.ensure(
        to_pid >= Duration::from_secs(19) && to_pid <= Duration::from_secs(60),
        || format!("watchdog restart after {to_pid:?}, expected 20 s + restart"),
    );
    let state = app.run("systemctl show -p ActiveState,SubState --value applianced");
    assert_eq!(
        state.split_whitespace().collect::<Vec<_>>(),
        ["active", "running"],
        "{state}"
    );
    let got = app.run("appliancectl cache get hwtest 'what survives a crash?'");
    assert_eq!(
        got.trim(),
        "the record log",
        "cache entry after the watchdog"
    );
    let events = app.events("system.test.>");
    assert!(
        events.iter().any(|m| m["data"]["marker"] == "after-kill-9"),
        "{events:#?}"
    );

    eprintln!(
        "daemon_crash: boot-to-ready {:.1} s, test {:.1} s",
        app.boot_to_ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
