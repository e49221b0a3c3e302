//! In-process handlers and the dead-letter list: falling behind, dead
//! letters of dead letters, dead letters across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use appliance_bus::*;
use parking_lot::Mutex;

fn durable_bus(dir: &std::path::Path, queue: usize, max_payload: usize) -> Bus {
    let mut d = DurableOptions::new(dir);
    d.fsync = DurableFsync::Interval(Duration::from_millis(20));
    Bus::open(BusOptions {
        subscriber_queue: queue,
        max_payload,
        durable: Some(d),
        ..BusOptions::default()
    })
    .unwrap()
    .0
}

/// A handler that records every payload it handles and fails on "bad".
fn recording_handler(
    b: &Bus,
    name: &str,
    pattern: &str,
    backoff: Duration,
) -> (HandlerHandle, Arc<Mutex<Vec<String>>>) {
    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let h2 = handled.clone();
    let h = b
        .handle(
            name,
            pattern,
            HandlerOptions {
                max_attempts: Some(2),
                backoff: Some(backoff),
                ..HandlerOptions::default()
            },
            move |m: Message| {
                let h2 = h2.clone();
                async move {
                    let t = String::from_utf8(m.payload.to_vec()).unwrap();
                    if t == "bad" {
                        return Err("boom".to_string());
                    }
                    h2.lock().push(t);
                    Ok(())
                }
            },
        )
        .unwrap();
    (h, handled)
}

/// A bus with subscriber queues of 4 and a recording handler on `jobs.>`
/// that backs off `backoff` after "bad": "bad", then a burst of 10
/// (`burst0`..`burst9`, the publisher yielding after each if `yielding`),
/// then "later" once 4 of the burst are handled.
async fn burst_while_backing_off(
    backoff: Duration,
    yielding: bool,
) -> (Bus, HandlerHandle, Arc<Mutex<Vec<String>>>) {
    let b = memory_bus(4);
    let (h, handled) = recording_handler(&b, "jobs", "jobs.>", backoff);
    b.publish("jobs.x", None, "bad").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..10 {
        b.publish("jobs.x", None, format!("burst{i}"))
            .await
            .unwrap();
        if yielding {
            tokio::task::yield_now().await;
        }
    }
    wait_until("the burst is handled", || handled.lock().len() == 4).await;
    b.publish("jobs.x", None, "later").await.unwrap();
    wait_until("later is handled", || handled.lock().len() == 5).await;
    (b, h, handled)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bus without a durable log, with subscriber queues of `queue`.
fn memory_bus(queue: usize) -> Bus {
    Bus::open(BusOptions {
        subscriber_queue: queue,
        ..BusOptions::default()
    })
    .unwrap()
    .0
}

/// The payloads of the dead-letter list, in list order.
fn dead_letter_payloads(b: &Bus) -> Vec<String> {
    b.dlq_list()
        .iter()
        .map(|e| String::from_utf8(b.dlq_get(e.id).unwrap().message.payload.to_vec()).unwrap())
        .collect()
}

/// Publishes `{prefix}{i}` on `subject` for each `i` in `range`, without
/// yielding in between.
async fn publish_numbered(b: &Bus, subject: &str, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        b.publish(subject, None, format!("{prefix}{i}"))
            .await
            .unwrap();
    }
}

/// A durable bus under `dir` (subscriber queues of 2) with a recording
/// handler on `jobs.>` starved by m0..m4, published without yielding: the
/// handler's task has not run, so its subscription has dead-lettered m0,
/// m1, m2.
async fn starved_handler(dir: &std::path::Path) -> (Bus, HandlerHandle) {
    let b = durable_bus(dir, 2, 1 << 20);
    let (h, _handled) = recording_handler(&b, "jobs", "jobs.>", Duration::from_millis(10));
    // No yield: the handler's task does not run before the close.
    publish_numbered(&b, "jobs.x", "m", 0..5).await;
    (b, h)
}

/// Holds up the thread it is installed on at its first warning or error,
/// saying so on the returned receiver, until the returned sender is sent
/// to (or `hold` passes).
fn pause_at_first_warning(
    hold: Duration,
) -> (
    OnWarn<impl Fn() + Send + Sync + 'static>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (paused_tx, paused) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Mutex::new(Some(go_rx));
    let sub = OnWarn(move || {
        if let Some(go) = go_rx.lock().take() {
            let _ = paused_tx.send(());
            let _ = go.recv_timeout(hold);
        }
    });
    (sub, paused, go)
}

/// Runs `b.close()` on another thread, held up at its first warning
/// (after storing the dead letters recorded so far); returns once it is
/// held up, with the sender that lets it go on and the thread.
fn close_held_at_first_warning(
    b: &Bus,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (sub, paused, go) = pause_at_first_warning(Duration::from_secs(2));
    let b2 = b.clone();
    let closer = std::thread::spawn(move || {
        tracing::subscriber::with_default(sub, || b2.close());
    });
    paused.recv_timeout(Duration::from_secs(5)).unwrap();
    (go, closer)
}

/// A single-threaded runtime with IO and timers, for a test's own thread.
fn thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Drops `b` and gives the aborted handler tasks time to let go of it
/// (and of the durable log's lock), so that the log can be opened again.
async fn let_go(b: Bus) {
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A handler that records every payload it handles, held up before each
/// until the returned gate has a permit.
fn gated_handler(
    b: &Bus,
    name: &str,
    pattern: &str,
    opts: HandlerOptions,
) -> (
    HandlerHandle,
    Arc<tokio::sync::Semaphore>,
    Arc<Mutex<Vec<String>>>,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let (g2, h2) = (gate.clone(), handled.clone());
    let h = b
        .handle(name, pattern, opts, move |m: Message| {
            let (g2, h2) = (g2.clone(), h2.clone());
            async move {
                g2.acquire().await.unwrap().forget();
                h2.lock()
                    .push(String::from_utf8(m.payload.to_vec()).unwrap());
                Ok(())
            }
        })
        .unwrap();
    (h, gate, handled)
}

/// A handler on a non-durable subject that falls behind while it backs off
/// keeps running: the overflow is dead-lettered (oldest first, with the
/// overflow reason, counted), the rest is handled, and later messages are
/// handled too.
#[tokio::test]
async fn handler_falling_behind_dead_letters_the_overflow_and_keeps_running() {
    // A burst while the handler backs off: 4 fit in its backlog, 6 do not.
    // (The publisher yields as another task or a NATS connection would;
    // see the next test for a burst that does not.)
    let (b, _h, handled) = burst_while_backing_off(Duration::from_millis(200), true).await;
    assert_eq!(
        *handled.lock(),
        ["burst6", "burst7", "burst8", "burst9", "later"]
    );
    let dlq = b.dlq_list();
    let overflowed: Vec<u64> = dlq
        .iter()
        .filter(|e| e.error.starts_with(OVERFLOW_ERROR))
        .map(|e| e.id)
        .collect();
    assert_eq!(overflowed.len(), 6, "{dlq:?}");
    assert!(dlq.iter().any(|e| e.error == "boom"), "{dlq:?}");
    let first = b.dlq_get(overflowed[0]).unwrap();
    assert_eq!(&first.message.payload[..], b"burst0");
    assert_eq!(first.attempts, 0);
    let stats = b.dlq_stats();
    assert_eq!(
        (
            stats.overflowed,
            stats.dead_lettered,
            stats.lost,
            stats.entries
        ),
        (6, 7, 0, 7)
    );

    // An overflowed message can be retried like any dead letter.
    assert_eq!(
        b.dlq_retry(overflowed[0]).await.unwrap(),
        RetryOutcome::Delivered
    );
    assert_eq!(handled.lock().last().unwrap(), "burst0");
}

/// On durable subjects nothing is evicted: a handler that falls behind
/// handles every message, in order, reading the rest back from the log.
#[tokio::test]
async fn handler_falling_behind_on_a_durable_subject_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = durable_bus(dir.path(), 4, 1 << 20);
    let (_h, handled) = recording_handler(&b, "disks", "storage.>", Duration::from_millis(200));
    b.publish("storage.d", None, "bad").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let want: Vec<String> = (0..30).map(|i| format!("e{i}")).collect();
    for w in &want {
        b.publish("storage.d", None, w.clone()).await.unwrap();
    }
    wait_until("all handled", || handled.lock().len() == want.len()).await;
    assert_eq!(*handled.lock(), want);
    let stats = b.dlq_stats();
    assert_eq!(
        (stats.overflowed, stats.lost, stats.dead_lettered),
        (0, 0, 1)
    );
}

/// A burst published without yielding on the handler's own thread fills
/// the handler's subscription before its task runs: the subscription
/// dead-letters the oldest messages (overflow, 0 attempts), its task stores
/// them, and the handler goes on. Nothing is lost.
#[tokio::test]
async fn handler_starved_by_a_burst_dead_letters_the_overflow_and_keeps_running() {
    let (b, _h, handled) = burst_while_backing_off(Duration::from_millis(100), false).await;
    assert_eq!(
        *handled.lock(),
        ["burst6", "burst7", "burst8", "burst9", "later"]
    );
    let stats = b.dlq_stats();
    assert_eq!(
        (stats.lost, stats.overflowed, stats.dead_lettered),
        (0, 6, 7)
    );
    let overflowed: Vec<DlqEntry> = b
        .dlq_list()
        .iter()
        .filter(|e| e.error.starts_with(OVERFLOW_ERROR))
        .map(|e| b.dlq_get(e.id).unwrap())
        .collect();
    let payloads: Vec<&[u8]> = overflowed.iter().map(|e| &e.message.payload[..]).collect();
    assert_eq!(
        payloads,
        [b"burst0", b"burst1", b"burst2", b"burst3", b"burst4", b"burst5"]
    );
    assert!(overflowed
        .iter()
        .all(|e| e.attempts == 0 && e.handler == "jobs"));
    assert_eq!(
        b.dlq_retry(overflowed[5].id).await.unwrap(),
        RetryOutcome::Delivered
    );
    assert_eq!(handled.lock().last().unwrap(), "burst5");
}

/// The dead letters a starved handler's subscription records are published
/// on `_dlq.<subject>` by its task once it runs, like any other.
#[tokio::test]
async fn dead_letters_of_a_starved_handler_are_published() {
    let b = memory_bus(2);
    let mut dead = b
        .subscribe(
            "_dlq.>",
            SubscribeOptions {
                capacity: Some(16),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    let (_h, handled) = recording_handler(&b, "jobs", "jobs.>", Duration::from_millis(10));
    // No yield: the handler's task does not run before the last publish.
    for i in 0..5 {
        b.publish("jobs.x", None, format!("m{i}")).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(5), dead.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.headers().get("Dlq-Attempts"), Some("0"));
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["m0", "m1", "m2"]);
    wait_until("the rest is handled", || handled.lock().len() == 2).await;
    assert_eq!(*handled.lock(), ["m3", "m4"]);
    assert_eq!(b.dlq_stats().lost, 0);
}

/// A failing catch-all handler: one failure makes one dead letter. The
/// handler is not given the dead letter (a plain subscription on `>` still
/// sees it, as in NATS).
#[tokio::test]
async fn catch_all_handler_does_not_get_dead_letters() {
    let (b, _) = Bus::open(BusOptions::default()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let _h = b
        .handle(
            "forwarder",
            ">",
            HandlerOptions {
                max_attempts: Some(1),
                ..HandlerOptions::default()
            },
            move |m: Message| {
                s2.lock().push(m.subject.to_string());
                async { Err::<(), _>("sink down".to_string()) }
            },
        )
        .unwrap();
    let mut all = b.subscribe(">", SubscribeOptions::default()).unwrap();
    b.publish("events.one", None, "x").await.unwrap();
    let first = all.recv().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), all.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.subject.as_str(), second.subject.as_str()),
        ("events.one", "_dlq.events.one")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let subjects: Vec<String> = b.dlq_list().into_iter().map(|e| e.subject).collect();
    assert_eq!(subjects, ["events.one"]);
    assert_eq!(*seen.lock(), ["events.one"]);
    assert_eq!(b.dlq_stats().dead_lettered, 1);
}

/// A handler that asks for dead letters by name gets them; when it fails
/// on one, the failure is counted and logged, and not dead-lettered again.
#[tokio::test]
async fn failing_dead_letter_handler_does_not_dead_letter_again() {
    let (b, _) = Bus::open(BusOptions::default()).unwrap();
    let fail = |_m: Message| async { Err::<(), _>("down".to_string()) };
    let opts = || HandlerOptions {
        max_attempts: Some(1),
        ..HandlerOptions::default()
    };
    let _jobs = b.handle("jobs", "jobs.>", opts(), fail).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let _alerts = b
        .handle("alerts", "_dlq.>", opts(), move |m: Message| {
            s2.lock().push(m.subject.to_string());
            async { Err::<(), _>("pager down".to_string()) }
        })
        .unwrap();
    b.publish("jobs.a", None, "x").await.unwrap();
    wait_until("the alert handler failed", || {
        b.dlq_stats().dead_letters_failed == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*seen.lock(), ["_dlq.jobs.a"]);
    let list = b.dlq_list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].subject.as_str(), list[0].handler.as_str()),
        ("jobs.a", "jobs")
    );
    assert_eq!(b.dlq_stats().dead_lettered, 1);
}

/// A dead letter of a message at the payload limit, with an error text
/// far longer than any header room, is stored, and so is a failed retry
/// of it: after a restart the entry is back, payload intact, with the
/// retry's attempt count and a shortened error.
#[tokio::test]
async fn dead_letter_of_a_message_at_the_limit_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4096;
    let long_error = format!("remote said: {}", "é".repeat(8000));
    {
        let b = durable_bus(dir.path(), 16, max);
        let err = long_error.clone();
        let h = b
            .handle(
                "fails",
                "storage.>",
                HandlerOptions {
                    max_attempts: Some(1),
                    ..HandlerOptions::default()
                },
                move |_m: Message| {
                    let err = err.clone();
                    async move { Err::<(), _>(err) }
                },
            )
            .unwrap();
        b.publish("storage.big", None, vec![b'x'; max])
            .await
            .unwrap();
        wait_until("dead-lettered", || b.dlq_list().len() == 1).await;
        let id = b.dlq_list()[0].id;
        assert_eq!(
            b.dlq_retry(id).await.unwrap(),
            RetryOutcome::Failed(long_error.clone())
        );
        b.sync_durable().await.unwrap();
        drop(h);
        b.close();
        // The aborted handler task lets go of its bus (and the log's lock)
        // once the runtime drops it.
        let_go(b).await;
    }
    let b = durable_bus(dir.path(), 16, max);
    let list = b.dlq_list();
    assert_eq!(list.len(), 1, "dead letter did not survive the restart");
    let e = b.dlq_get(list[0].id).unwrap();
    assert_eq!(
        (
            e.message.subject.as_str(),
            e.message.payload.len(),
            e.attempts
        ),
        ("storage.big", max, 2)
    );
    assert!(e.error.starts_with("remote said: éé"), "{}", &e.error[..40]);
    assert!(e.error.ends_with(" [truncated]"));
    assert!(e.error.len() < dlq::DEAD_LETTER_HEADER_ROOM);
}

/// A handler on a pattern covering a durable and a non-durable subject
/// whose backlog is full of durable messages stops taking messages from
/// its subscription (durable ones are never evicted). Non-durable messages
/// published meanwhile overflow the subscription: each is either handled
/// or dead-lettered (with the overflow reason, retriable), none is lost.
/// `before` durable messages are published first (the first one runs, held
/// up; 4 fill the backlog; the subscription holds 4), then 10 non-durable
/// ones, then `after` durable ones.
async fn durable_backlog_then_plain_burst(before: usize, after: usize) {
    let dir = tempfile::tempdir().unwrap();
    let b = durable_bus(dir.path(), 4, 1 << 20);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let (g2, h2) = (gate.clone(), handled.clone());
    let _h = b
        .handle(
            "mixed",
            "*.d",
            HandlerOptions::default(),
            move |m: Message| {
                let (g2, h2) = (g2.clone(), h2.clone());
                async move {
                    // Held up until the test opens the gate.
                    g2.acquire().await.unwrap().forget();
                    h2.lock()
                        .push(String::from_utf8(m.payload.to_vec()).unwrap());
                    Ok(())
                }
            },
        )
        .unwrap();
    let durable: Vec<String> = (0..before + after).map(|i| format!("s{i}")).collect();
    let plain: Vec<String> = (0..10).map(|i| format!("j{i}")).collect();
    let order = durable[..before]
        .iter()
        .map(|s| ("storage.d", s))
        .chain(plain.iter().map(|j| ("jobs.d", j)))
        .chain(durable[before..].iter().map(|s| ("storage.d", s)));
    for (subject, payload) in order {
        b.publish(subject, None, payload.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.add_permits(1000);
    wait_until("the durable messages are handled", || {
        durable.iter().all(|s| handled.lock().contains(s))
    })
    .await;
    // Whatever of the non-durable ones is still on its way.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let got = handled.lock().clone();
    let got_durable: Vec<&String> = got.iter().filter(|t| t.starts_with('s')).collect();
    assert_eq!(got_durable, durable.iter().collect::<Vec<_>>(), "in order");
    let dlq = b.dlq_list();
    let overflowed: Vec<&DlqSummary> = dlq
        .iter()
        .filter(|e| e.error.starts_with(OVERFLOW_ERROR))
        .collect();
    let stats = b.dlq_stats();
    let missing: Vec<&String> = plain
        .iter()
        .filter(|j| !got.contains(j))
        .filter(|j| {
            !overflowed
                .iter()
                .any(|e| b.dlq_get(e.id).unwrap().message.payload == j.as_bytes())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "neither handled nor dead-lettered: {missing:?}; handled {got:?}; {stats:?}"
    );
    assert!(!overflowed.is_empty(), "nothing overflowed: {got:?}");
    assert_eq!(
        (stats.lost, stats.overflowed, stats.dead_lettered),
        (0, overflowed.len() as u64, overflowed.len() as u64),
        "{dlq:?}"
    );
    assert_eq!(
        got.iter().filter(|t| t.starts_with('j')).count() + overflowed.len(),
        plain.len(),
        "each non-durable message once: {got:?} {dlq:?}"
    );
    // The dead letters are stored, and retried like any other.
    b.sync_durable().await.unwrap();
    let stored = b
        .replay(ReplayQuery {
            pattern: "_dlq.jobs.d".into(),
            from_seq: None,
            since_ms: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), overflowed.len());
    let first = overflowed[0].id;
    let payload = b.dlq_get(first).unwrap().message.payload;
    assert_eq!(b.dlq_retry(first).await.unwrap(), RetryOutcome::Delivered);
    assert_eq!(handled.lock().last().unwrap().as_bytes(), &payload[..]);
    assert!(b.dlq_get(first).is_none());
}

#[tokio::test]
async fn handler_with_a_durable_backlog_dead_letters_what_its_subscription_cannot_hold() {
    // The subscription is full of durable messages: no room for any of
    // the non-durable ones.
    durable_backlog_then_plain_burst(12, 0).await;
}

#[tokio::test]
async fn handler_with_a_durable_backlog_dead_letters_its_subscriptions_oldest_overflow() {
    // The subscription holds 2 durable messages and the newest non-durable
    // ones; the durable messages after the burst wait in the log.
    durable_backlog_then_plain_burst(7, 3).await;
}

/// A handler name goes into every dead letter's headers: one over
/// MAX_HANDLER_NAME bytes is refused; one at the limit works, and its dead
/// letters are stored, whatever the subject's length and the error's.
#[tokio::test]
async fn handler_names_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = durable_bus(dir.path(), 16, 1 << 20);
    let fail = |_m: Message| async { Err::<(), _>("x".repeat(10_000)) };
    let opts = || HandlerOptions {
        max_attempts: Some(1),
        ..HandlerOptions::default()
    };
    let long = "n".repeat(MAX_HANDLER_NAME + 1);
    match b.handle(&long, "storage.>", opts(), fail) {
        Err(BusError::HandlerNameTooLong { len, max }) => {
            assert_eq!((len, max), (MAX_HANDLER_NAME + 1, MAX_HANDLER_NAME));
        }
        other => panic!("{other:?}"),
    }
    assert!(b.dlq_stats() == DlqStats::default());
    let name = "n".repeat(MAX_HANDLER_NAME);
    let _h = b.handle(&name, "storage.>", opts(), fail).unwrap();
    // The longest subject a dead letter can have.
    let subject = format!("storage.{}", "s".repeat(1024 - "_dlq.storage.".len()));
    b.publish(&subject, None, "x").await.unwrap();
    wait_until("dead-lettered", || b.dlq_list().len() == 1).await;
    assert_eq!(b.dlq_list()[0].handler, name);
    b.sync_durable().await.unwrap();
    let stored = b
        .replay(ReplayQuery {
            pattern: "_dlq.>".into(),
            from_seq: None,
            since_ms: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the dead letter is stored");
    assert_eq!(stored[0].headers().get("Dlq-Handler"), Some(name.as_str()));
}

/// A catch-all handler (`>`) on a bus without a durable log, starved by a
/// burst: its subscription dead-letters the overflow, and its task stores
/// those dead letters on `_dlq.<subject>`, which its own pattern matches.
/// It skips dead letters, so they must not take room in its subscription
/// either: only the overflow is dead-lettered, the rest is handled.
#[tokio::test]
async fn catch_all_handler_own_dead_letters_evict_nothing() {
    let b = memory_bus(4);
    let (_h, handled) = recording_handler(&b, "all", ">", Duration::from_millis(10));
    // No yield: the handler's task does not run before the last publish.
    for i in 0..8 {
        b.publish("jobs.x", None, format!("m{i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead: Vec<String> = b
        .dlq_list()
        .iter()
        .map(|e| String::from_utf8(b.dlq_get(e.id).unwrap().message.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        (handled.lock().clone(), dead),
        (
            vec!["m4".to_string(), "m5".into(), "m6".into(), "m7".into()],
            vec!["m0".to_string(), "m1".into(), "m2".into(), "m3".into()]
        )
    );
}

/// Every dead letter in the list of a durable bus is stored, also one its
/// subscription recorded after the handle was dropped (the aborted task
/// had not run yet, so the subscription was still there).
#[tokio::test]
async fn no_dead_letter_is_listed_unstored_after_the_handle_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = durable_bus(dir.path(), 2, 1 << 20);
    let (h, _handled) = recording_handler(&b, "jobs", "jobs.>", Duration::from_millis(10));
    drop(h);
    // No yield: the aborted task has not let go of its subscription.
    for i in 0..5 {
        b.publish("jobs.x", None, format!("m{i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.sync_durable().await.unwrap();
    let stored = b
        .replay(ReplayQuery {
            pattern: "_dlq.>".into(),
            from_seq: None,
            since_ms: None,
            limit: 100,
        })
        .await
        .unwrap();
    let stored: Vec<Option<String>> = stored
        .iter()
        .map(|m| m.headers().get("Dlq-Id").map(str::to_owned))
        .collect();
    let listed: Vec<Option<String>> = b
        .dlq_list()
        .iter()
        .map(|e| Some(e.id.to_string()))
        .collect();
    assert_eq!(listed, stored, "listed vs stored");
}

/// A tracing subscriber that runs its closure on each warning or error
/// logged on its thread (the tests' window on the publisher's path).
struct OnWarn<F>(F);

impl<F: Fn() + Send + Sync + 'static> tracing::Subscriber for OnWarn<F> {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        if *e.metadata().level() <= tracing::Level::WARN {
            (self.0)();
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// An overflow dead letter is in the list (and retriable) as soon as the
/// subscription evicts it. Retried and delivered before the handler's task
/// stored it, it is not counted as lost (as if pushed out of the list).
#[tokio::test]
async fn overflow_dead_letter_retried_at_once_is_not_lost() {
    let b = memory_bus(1);
    let (_h, handled) = recording_handler(&b, "jobs", "jobs.>", Duration::from_millis(10));
    // No yield: the handler's task does not run; m0 waits in its
    // subscription, which m1 (on another thread) then overflows.
    b.publish("jobs.x", None, "m0").await.unwrap();
    let (paused_tx, paused) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let b2 = b.clone();
    let done = paused_tx.clone();
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Holds up the thread at its first warning until `go` (or 2 s
        // pass), saying so on `paused`: widens the gap between listing a
        // dead letter and keeping its id.
        let go_rx = Mutex::new(Some(go_rx));
        let sub = OnWarn(move || {
            if let Some(go) = go_rx.lock().take() {
                let _ = paused_tx.send(());
                let _ = go.recv_timeout(Duration::from_secs(2));
            }
        });
        tracing::subscriber::with_default(sub, || {
            rt.block_on(b2.publish("jobs.x", None, "m1")).unwrap();
        });
        let _ = done.send(());
    });
    paused.recv().unwrap();
    let id = b.dlq_list()[0].id;
    assert_eq!(b.dlq_retry(id).await.unwrap(), RetryOutcome::Delivered);
    let _ = go.send(());
    publisher.join().unwrap();
    wait_until("m1 is handled", || handled.lock().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut got = handled.lock().clone();
    got.sort();
    assert_eq!(got, ["m0", "m1"]);
    let stats = b.dlq_stats();
    assert_eq!(
        (stats.lost, stats.overflowed, stats.entries),
        (0, 1, 0),
        "{stats:?}"
    );
}

/// A handler on `_dlq.>` whose backlog overflows with dead letters does not
/// dead-letter them again: they count in `dead_letters_failed`, not in
/// `overflowed` (which counts dead letters made, a part of
/// `dead_lettered`).
#[tokio::test]
async fn dead_letters_a_backlog_overflows_with_are_not_counted_as_overflowed() {
    let b = memory_bus(1);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g2 = gate.clone();
    let _h = b
        .handle(
            "alerts",
            "_dlq.>",
            HandlerOptions::default(),
            move |_m: Message| {
                let g2 = g2.clone();
                async move {
                    g2.acquire().await.unwrap().forget();
                    Ok(())
                }
            },
        )
        .unwrap();
    // The first is held up, the second waits in the backlog, the next ones
    // push it out (the publisher yields: the backlog overflows, not the
    // subscription).
    for i in 0..4 {
        b.publish("_dlq.jobs.x", None, format!("d{i}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = b.dlq_stats();
    gate.add_permits(100);
    assert_eq!(
        (
            stats.dead_letters_failed,
            stats.overflowed,
            stats.dead_lettered
        ),
        (2, 0, 0),
        "{stats:?}"
    );
}

/// A flood to a starved handler dead-letters its subscription's overflow
/// on the publisher's path (under the durable log's lock, for a durable
/// message's fan-out): that path does not log a line per message.
#[tokio::test]
async fn a_flood_to_a_starved_handler_does_not_log_per_message_on_the_publisher() {
    let b = memory_bus(4);
    let (_h, _handled) = recording_handler(&b, "jobs", "jobs.>", Duration::from_millis(10));
    let logged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = logged.clone();
    let counter = OnWarn(move || {
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let b2 = b.clone();
    // Joined without yielding: the handler's task does not run meanwhile.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(counter, || {
            rt.block_on(async {
                for i in 0..1000 {
                    b2.publish("jobs.x", None, format!("m{i}")).await.unwrap();
                }
            });
        });
    })
    .join()
    .unwrap();
    assert_eq!(b.dlq_stats().overflowed, 996);
    let logged = logged.load(std::sync::atomic::Ordering::Relaxed);
    assert!(logged <= 1, "{logged} lines logged by the publisher");
}

/// The dead letters a starved handler's subscription recorded are stored
/// when the bus shuts down before the handler's task ran: they are in the
/// list after a restart, as they were before it.
#[tokio::test]
async fn dead_letters_of_a_starved_handler_survive_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (b, h) = starved_handler(dir.path()).await;
        assert_eq!(b.dlq_list().len(), 3);
        b.close();
        drop(h);
        // The aborted handler task lets go of its bus (and the log's lock)
        // once the runtime drops it.
        let_go(b).await;
    }
    let b = durable_bus(dir.path(), 2, 1 << 20);
    let restored = dead_letter_payloads(&b);
    assert_eq!(restored, ["m0", "m1", "m2"], "after a restart");
}

/// A gated handler on `*.d` in queue group `g`, sharing it with a plain
/// drop-oldest subscription that never reads (subscribed first, so it is
/// offered the group's first message). Both queues are filled with durable
/// messages (`storage.d`, one at a time so the handler's task takes its
/// share), so both refuse the non-durable ones. Returns the bus, the gate,
/// the plain member and what the handler handled.
async fn mixed_group_full_of_durable_messages(
    dir: &std::path::Path,
) -> (
    Bus,
    HandlerHandle,
    Arc<tokio::sync::Semaphore>,
    Subscription,
    Arc<Mutex<Vec<String>>>,
) {
    let b = durable_bus(dir, 2, 1 << 20);
    let plain = b
        .subscribe(
            "*.d",
            SubscribeOptions {
                queue_group: Some("g".into()),
                slow_consumer: Some(SlowConsumerPolicy::DropOldest),
                ..SubscribeOptions::default()
            },
        )
        .unwrap();
    let (h, gate, handled) = gated_handler(
        &b,
        "mixed",
        "*.d",
        HandlerOptions {
            queue_group: Some("g".into()),
            ..HandlerOptions::default()
        },
    );
    // Round robin: the plain member gets s0, s2, ... (2 queued, the rest
    // deferred to the log), the handler s1, s3, ... (1 running, 2 in its
    // backlog, 2 in its subscription, the rest deferred).
    for i in 0..14 {
        b.publish("storage.d", None, format!("s{i}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (b, h, gate, plain, handled)
}

/// A non-durable message that every member of a queue group refuses (their queues full of durable messages) is
/// dead-lettered by the handler member, whichever member refused it first;
/// it is not dropped through the plain member. Each is counted once: as a
/// dead letter (stored on `_dlq.jobs.d`), not as lost, not as the plain
/// member's drop.
#[tokio::test]
async fn queue_group_dead_letters_what_a_plain_member_and_a_handler_both_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _h, gate, mut plain, handled) = mixed_group_full_of_durable_messages(dir.path()).await;
    // The group's round robin for jobs.d starts at the plain member: j0,
    // j2 are refused by it first, j1, j3 by the handler first.
    for i in 0..4 {
        b.publish("jobs.d", None, format!("j{i}")).await.unwrap();
    }
    let stats = b.dlq_stats();
    assert_eq!(
        (
            stats.dead_lettered,
            stats.overflowed,
            stats.lost,
            plain.dropped()
        ),
        (4, 4, 0, 0),
        "{stats:?}"
    );
    let mut listed = dead_letter_payloads(&b);
    listed.sort();
    assert_eq!(listed, ["j0", "j1", "j2", "j3"]);
    assert_eq!(b.stats().subjects["jobs"].drops, 4, "each counted once");
    // Every durable message reaches one member, in order.
    gate.add_permits(1000);
    let mut got_plain = Vec::new();
    for _ in 0..7 {
        let m = tokio::time::timeout(Duration::from_secs(5), plain.recv())
            .await
            .unwrap()
            .unwrap();
        got_plain.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got_plain, ["s0", "s2", "s4", "s6", "s8", "s10", "s12"]);
    wait_until("the handler's share is handled", || {
        handled.lock().len() == 7
    })
    .await;
    assert_eq!(
        *handled.lock(),
        ["s1", "s3", "s5", "s7", "s9", "s11", "s13"]
    );
    // Stored, once each.
    wait_until("stored", || b.dlq_stats().dead_lettered == 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.sync_durable().await.unwrap();
    let stored = b
        .replay(ReplayQuery {
            pattern: "_dlq.jobs.d".into(),
            from_seq: None,
            since_ms: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(b.dlq_stats().lost, 0);
}

/// Flips a byte of the one stored record holding `marker` (12 bytes) in the
/// durable log under `dir`.
fn damage_record(dir: &std::path::Path, marker: &[u8]) {
    let mut damaged = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let mut bytes = std::fs::read(&p).unwrap();
            if let Some(i) = bytes.windows(marker.len()).position(|w| w == marker) {
                bytes[i] ^= 0xff;
                std::fs::write(&p, bytes).unwrap();
                damaged += 1;
            }
        }
    }
    assert_eq!(damaged, 1);
}

/// A handler whose subscription cannot read its deferred durable messages
/// back from the log (a damaged record) counts them in `DlqStats::lost`
/// when the read fails, not when its next message comes: with no further
/// message they are counted all the same. Counted once.
#[tokio::test]
async fn a_handlers_failed_catch_up_is_counted_lost_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = durable_bus(dir.path(), 2, 1 << 20);
    let (_h, gate, handled) = gated_handler(&b, "disks", "storage.>", HandlerOptions::default());
    // m0 runs (held up), m1 and m2 fill the backlog, m3 and m4 the
    // subscription; m5..m9 are deferred to the log.
    for i in 0..10 {
        b.publish("storage.d", None, format!("marker-{i}-xyz"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.sync_durable().await.unwrap();
    damage_record(dir.path(), b"marker-7-xyz");
    gate.add_permits(1000);
    wait_until("m0..m4 are handled", || handled.lock().len() == 5).await;
    wait_until("the failed catch-up is counted", || b.dlq_stats().lost == 5).await;
    assert_eq!(
        *handled.lock(),
        [0, 1, 2, 3, 4].map(|i| format!("marker-{i}-xyz"))
    );
    // The next message is handled; the loss is not counted again.
    b.publish("storage.d", None, "after").await.unwrap();
    wait_until("after is handled", || handled.lock().len() == 6).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = b.dlq_stats();
    assert_eq!((stats.lost, stats.dead_lettered), (5, 0), "{stats:?}");
}

/// A starved handler's subscription that overflows while the bus shuts
/// down (the closing thread held up after storing the dead letters
/// recorded so far, publishing still accepted): what it evicts from then on
/// is not listed, as the handler is stopping, so every dead letter listed
/// after the close is stored, and is back after a restart.
#[tokio::test]
async fn dead_letters_listed_while_the_bus_closes_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let listed: Vec<String>;
    {
        let (b, h) = starved_handler(dir.path()).await;
        let (go, closer) = close_held_at_first_warning(&b);
        // Published meanwhile (the close has not begun refusing yet): the
        // subscription evicts m3, m4, m5.
        publish_numbered(&b, "jobs.x", "m", 5..8).await;
        go.send(()).unwrap();
        closer.join().unwrap();
        listed = dead_letter_payloads(&b);
        drop(h);
        let_go(b).await;
    }
    assert_eq!(listed, ["m0", "m1", "m2"]);
    let b = durable_bus(dir.path(), 2, 1 << 20);
    let restored = dead_letter_payloads(&b);
    assert_eq!(restored, listed, "after a restart");
}

/// `Bus::close` while a handler's task is storing the overflow dead letters
/// its subscription recorded (closed as soon as the first is published, by
/// another thread): the close waits for the task to store them all, so
/// every one listed is back after a restart.
#[tokio::test]
async fn close_waits_for_a_handler_storing_its_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let listed;
    {
        let b = durable_bus(dir.path(), 2, 1 << 20);
        let mut dead = b
            .subscribe(
                "_dlq.>",
                SubscribeOptions {
                    capacity: Some(1 << 16),
                    ..SubscribeOptions::default()
                },
            )
            .unwrap();
        let b2 = b.clone();
        let worker = std::thread::spawn(move || {
            let rt = thread_runtime();
            rt.block_on(async {
                let (h, _handled) =
                    recording_handler(&b2, "jobs", "jobs.>", Duration::from_millis(10));
                // No yield: all but the last 2 are evicted, then the task
                // stores them in one go.
                publish_numbered(&b2, "jobs.x", "m", 0..3000).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(h);
            });
        });
        tokio::time::timeout(Duration::from_secs(5), dead.recv())
            .await
            .unwrap()
            .unwrap();
        b.close();
        worker.join().unwrap();
        listed = b.dlq_list().len();
        let_go(b).await;
    }
    assert_eq!(listed, 2998);
    let b = durable_bus(dir.path(), 2, 1 << 20);
    assert_eq!(b.dlq_list().len(), listed, "after a restart");
}

/// `Bus::close` between a failed message being listed as a dead letter and
/// its record being published (the handler's thread held up there, at the
/// "message dead-lettered" warning): the dead letter listed after the
/// close is stored, and is back after a restart.
#[tokio::test]
async fn close_while_a_handler_dead_letters_stores_it() {
    let dir = tempfile::tempdir().unwrap();
    let listed;
    {
        let b = durable_bus(dir.path(), 16, 1 << 20);
        let (sub, paused, go) = pause_at_first_warning(Duration::from_secs(5));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let b2 = b.clone();
        let worker = std::thread::spawn(move || {
            let rt = thread_runtime();
            tracing::subscriber::with_default(sub, || {
                rt.block_on(async {
                    let h = recording_handler(&b2, "jobs", "jobs.>", Duration::from_millis(1));
                    ready_tx.send(()).unwrap();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    drop(h);
                });
            });
        });
        ready.recv().unwrap();
        b.publish("jobs.x", None, "bad").await.unwrap();
        paused.recv_timeout(Duration::from_secs(5)).unwrap();
        let b3 = b.clone();
        let closer = std::thread::spawn(move || b3.close());
        std::thread::sleep(Duration::from_millis(100));
        go.send(()).unwrap();
        closer.join().unwrap();
        worker.join().unwrap();
        listed = b.dlq_list().len();
        let_go(b).await;
    }
    let b = durable_bus(dir.path(), 16, 1 << 20);
    assert_eq!(
        (listed, b.dlq_list().len()),
        (1, 1),
        "listed, then back after a restart"
    );
}

/// A handler held up on a message, with a dead-letter retry waiting for it
/// (so its task keeps running after the close): its backlog overflows
/// after `Bus::close` stopped storing dead letters. What it evicts then is
/// not dead-lettered, so it is counted lost, and not as overflowed:
/// `overflowed` counts dead letters.
#[tokio::test]
async fn a_backlog_overflow_after_close_is_lost_not_overflowed() {
    let b = memory_bus(2);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g2 = gate.clone();
    let _h = b
        .handle(
            "jobs",
            "jobs.>",
            HandlerOptions {
                max_attempts: Some(1),
                ..HandlerOptions::default()
            },
            move |m: Message| {
                let g2 = g2.clone();
                async move {
                    match &m.payload[..] {
                        b"bad" => Err("boom".to_string()),
                        b"hold" => {
                            let _ = g2.acquire().await;
                            Ok(())
                        }
                        _ => Ok(()),
                    }
                }
            },
        )
        .unwrap();
    b.publish("jobs.x", None, "bad").await.unwrap();
    wait_until("bad is dead-lettered", || b.dlq_list().len() == 1).await;
    let id = b.dlq_list()[0].id;
    b.publish("jobs.x", None, "hold").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Waits behind "hold", keeping the handler's retry channel open.
    let b2 = b.clone();
    let retry = tokio::spawn(async move { b2.dlq_retry(id).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // a0, a1 fill the backlog; a2, a3 wait in the subscription.
    for i in 0..2 {
        b.publish("jobs.x", None, format!("a{i}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 2..4 {
        b.publish("jobs.x", None, format!("a{i}")).await.unwrap();
    }
    assert_eq!(b.dlq_stats().overflowed, 0);
    b.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), retry)
        .await
        .expect("the retry ends once the handler stops");
    let stats = b.dlq_stats();
    assert!(stats.overflowed <= stats.dead_lettered, "{stats:?}");
    assert_eq!(
        (stats.dead_lettered, stats.overflowed, stats.lost),
        (1, 0, 2),
        "{stats:?}"
    );
}

/// A dead-letter retry whose handler succeeds while the bus shuts down
/// (`Bus::close` after the handler answered, before the retry took the
/// answer): its outcome can no longer be stored, so the entry is left as
/// it is; the list then matches the one rebuilt after a restart.
#[tokio::test]
async fn a_retry_answered_while_the_bus_closes_leaves_the_list_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (listed, outcome);
    {
        let b = durable_bus(dir.path(), 16, 1 << 20);
        let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (f2, r2, g2) = (fixed.clone(), ran.clone(), gate.clone());
        let h = b
            .handle(
                "jobs",
                "jobs.>",
                HandlerOptions {
                    max_attempts: Some(1),
                    ..HandlerOptions::default()
                },
                move |_m: Message| {
                    let ok = f2.load(std::sync::atomic::Ordering::SeqCst);
                    r2.store(ok, std::sync::atomic::Ordering::SeqCst);
                    let g2 = g2.clone();
                    async move {
                        if ok {
                            let _ = g2.acquire().await;
                            Ok(())
                        } else {
                            Err("boom".to_string())
                        }
                    }
                },
            )
            .unwrap();
        b.publish("jobs.x", None, "m").await.unwrap();
        wait_until("m is dead-lettered", || b.dlq_list().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.sync_durable().await.unwrap();
        let id = b.dlq_list()[0].id;
        fixed.store(true, std::sync::atomic::Ordering::SeqCst);
        outcome = {
            let mut retry = std::pin::pin!(b.dlq_retry(id));
            // Polled until the handler runs; then not, while it answers.
            tokio::select! {
                biased;
                r = &mut retry => panic!("the retry ended early: {r:?}"),
                () = wait_until("the retry runs", || ran.load(std::sync::atomic::Ordering::SeqCst)) => {}
            }
            gate.add_permits(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            b.close();
            tokio::time::timeout(Duration::from_secs(5), retry)
                .await
                .unwrap()
        };
        listed = b.dlq_list().len();
        drop(h);
        let_go(b).await;
    }
    let b = durable_bus(dir.path(), 16, 1 << 20);
    assert_eq!(
        b.dlq_list().len(),
        listed,
        "after a restart (the retry returned {outcome:?})"
    );
}

/// Once a queue group member's handle is dropped, the group's messages go
/// to the members still running: none is handed to the stopping member's
/// subscription (where it would be neither handled, nor counted, nor
/// dead-lettered), also before its task has stopped.
#[tokio::test]
async fn a_dropped_queue_group_member_gets_no_more_messages() {
    let (b, _) = Bus::open(BusOptions::default()).unwrap();
    let group = || HandlerOptions {
        queue_group: Some("g".into()),
        ..HandlerOptions::default()
    };
    let member = |name: &str, handled: &Arc<Mutex<Vec<String>>>| {
        let h2 = handled.clone();
        b.handle(name, "jobs.>", group(), move |m: Message| {
            let h2 = h2.clone();
            async move {
                h2.lock()
                    .push(String::from_utf8(m.payload.to_vec()).unwrap());
                Ok(())
            }
        })
        .unwrap()
    };
    let (got_a, got_b) = (Arc::default(), Arc::default());
    let ha = member("a", &got_a);
    let _hb = member("b", &got_b);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // No yield: the dropped member's task has not stopped yet.
    drop(ha);
    for i in 0..4 {
        b.publish("jobs.x", None, format!("m{i}")).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while got_b.lock().len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = b.dlq_stats();
    assert_eq!(
        (
            got_a.lock().len(),
            got_b.lock().len(),
            stats.lost,
            stats.dead_lettered
        ),
        (0, 4, 0, 0),
        "{stats:?}"
    );
}

/// A handler started while `Bus::close` stores the handlers' overflow dead
/// letters (the closing thread held up at its first warning, after it
/// took the list of handlers), its pattern then flooded before the close
/// goes on: the handler is refused (the bus is shutting down) or what its
/// subscription dead-letters is stored; none is listed but not stored.
#[tokio::test]
async fn a_handler_started_while_the_bus_closes_lists_nothing_unstored() {
    let dir = tempfile::tempdir().unwrap();
    let listed: Vec<String>;
    {
        let (b, h) = starved_handler(dir.path()).await;
        let (go, closer) = close_held_at_first_warning(&b);
        let late = b.handle(
            "late",
            "late.>",
            HandlerOptions::default(),
            |_m: Message| async { Ok(()) },
        );
        assert!(matches!(late, Ok(_) | Err(BusError::Closed)), "{late:?}");
        publish_numbered(&b, "late.x", "n", 0..5).await;
        go.send(()).unwrap();
        closer.join().unwrap();
        listed = dead_letter_payloads(&b);
        drop(late);
        drop(h);
        let_go(b).await;
    }
    let b = durable_bus(dir.path(), 2, 1 << 20);
    let restored = dead_letter_payloads(&b);
    assert_eq!(restored, listed, "after a restart");
}
