//! The NATS endpoint, driven by the real `async-nats` client and by raw TCP
//! for hostile input. Everything listens on 127.0.0.1 port 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use appliance_bus::server::{serve, ServerOptions};
use appliance_bus::*;
use futures_util_lite::next;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// `StreamExt::next` without a futures dependency.
mod futures_util_lite {
    use std::future::poll_fn;
    use std::pin::Pin;

    pub async fn next<S: futures_core::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
        poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
    }
}

struct Server {
    addr: SocketAddr,
    bus: Bus,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(opts: ServerOptions) -> Self {
        Self::start_with(BusOptions::default(), opts).await
    }

    async fn start_with(bus_opts: BusOptions, opts: ServerOptions) -> Self {
        let (bus, _) = Bus::open(bus_opts).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(bus.clone(), listener, opts, stop.clone()));
        Self {
            addr,
            bus,
            stop,
            task,
        }
    }

    async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.addr.to_string()).await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn recv(s: &mut async_nats::Subscriber) -> async_nats::Message {
    timeout(Duration::from_secs(5), next(s))
        .await
        .expect("timed out")
        .expect("ended")
}

#[tokio::test]
async fn pub_sub_with_wildcards() {
    let srv = Server::start(ServerOptions::default()).await;
    let c = srv.client().await;
    let mut star = c.subscribe("storage.*.state").await.unwrap();
    let mut gt = c.subscribe("storage.>").await.unwrap();
    c.flush().await.unwrap();
    let p = srv.client().await;
    p.publish("storage.tank.state", "online".into())
        .await
        .unwrap();
    p.publish("storage.tank.disk.sda", "removed".into())
        .await
        .unwrap();
    p.publish("sync.other", "x".into()).await.unwrap();
    p.flush().await.unwrap();
    let m = recv(&mut star).await;
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("storage.tank.state", &b"online"[..])
    );
    assert_eq!(recv(&mut gt).await.subject.as_str(), "storage.tank.state");
    assert_eq!(
        recv(&mut gt).await.subject.as_str(),
        "storage.tank.disk.sda"
    );
    assert!(timeout(Duration::from_millis(100), next(&mut star))
        .await
        .is_err());
    // Headers travel as HMSG.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Disk", "sda");
    p.publish_with_headers("storage.x.state", h, "y".into())
        .await
        .unwrap();
    let m = recv(&mut star).await;
    assert_eq!(m.headers.unwrap().get("Disk").unwrap().as_str(), "sda");
    // In-process subscribers see client messages, and vice versa.
    let mut local = srv
        .bus
        .subscribe("storage.>", SubscribeOptions::default())
        .unwrap();
    p.publish("storage.y", "from client".into()).await.unwrap();
    p.flush().await.unwrap();
    let lm = timeout(Duration::from_secs(5), local.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&lm.payload[..], b"from client");
    srv.bus
        .publish("storage.z", None, "from bus")
        .await
        .unwrap();
    let mut got = recv(&mut gt).await;
    while got.subject.as_str() != "storage.z" {
        got = recv(&mut gt).await;
    }
    assert_eq!(&got.payload[..], b"from bus");
    srv.stop().await;
}

#[tokio::test]
async fn queue_groups_spread_load() {
    let srv = Server::start(ServerOptions::default()).await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let c = srv.client().await;
        let s = c.queue_subscribe("jobs.>", "workers".into()).await.unwrap();
        c.flush().await.unwrap();
        members.push((c, s));
    }
    let p = srv.client().await;
    for i in 0..300 {
        p.publish("jobs.resize", i.to_string().into())
            .await
            .unwrap();
    }
    p.flush().await.unwrap();
    let mut counts = Vec::new();
    for (_, s) in &mut members {
        let mut n = 0;
        while timeout(Duration::from_millis(200), next(s)).await.is_ok() {
            n += 1;
        }
        counts.push(n);
    }
    assert_eq!(counts.iter().sum::<i32>(), 300, "{counts:?}");
    assert!(counts.iter().all(|c| *c >= 50), "load spread: {counts:?}");
    srv.stop().await;
}

#[tokio::test]
async fn request_reply() {
    let srv = Server::start(ServerOptions::default()).await;
    let responder = srv.client().await;
    let mut reqs = responder.subscribe("svc.echo").await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = next(&mut reqs).await {
            let mut body = b"echo: ".to_vec();
            body.extend_from_slice(&m.payload);
            responder
                .publish(m.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });
    let c = srv.client().await;
    for i in 0..20 {
        let r = timeout(
            Duration::from_secs(5),
            c.request("svc.echo", i.to_string().into()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r.payload, format!("echo: {i}").into_bytes());
    }
    // Nobody listening: the client is told at once (503 no responders).
    let e = timeout(Duration::from_secs(5), c.request("svc.nobody", "x".into()))
        .await
        .unwrap();
    assert_eq!(
        e.unwrap_err().kind(),
        async_nats::RequestErrorKind::NoResponders
    );
    srv.stop().await;
}

#[tokio::test]
async fn unsub_with_max() {
    let srv = Server::start(ServerOptions::default()).await;
    let c = srv.client().await;
    let mut s = c.subscribe("ticks").await.unwrap();
    s.unsubscribe_after(3).await.unwrap();
    c.flush().await.unwrap();
    let p = srv.client().await;
    for i in 0..10 {
        p.publish("ticks", i.to_string().into()).await.unwrap();
    }
    p.flush().await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(m)) = timeout(Duration::from_millis(500), next(&mut s)).await {
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, vec!["0", "1", "2"]);
    // The server dropped the subscription.
    let st = srv.bus.stats();
    assert_eq!(
        st.connections
            .iter()
            .map(|c| c.subscriptions)
            .sum::<usize>(),
        0
    );
    srv.stop().await;
}

#[tokio::test]
async fn durable_publish_is_acknowledged_by_pong_after_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = DurableOptions::new(dir.path());
    d.fsync = DurableFsync::Always;
    let srv = Server::start_with(
        BusOptions {
            durable: Some(d),
            ..BusOptions::default()
        },
        ServerOptions::default(),
    )
    .await;
    // async-nats's flush() does not wait for the server, so speak the
    // protocol: PUBs, then PING; the PONG is the durable acknowledgement.
    let mut r = Raw::connect(srv.addr).await;
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend_from_slice(
            format!("PUB storage.event {}\r\n{i}\r\n", i.to_string().len()).as_bytes(),
        );
    }
    batch.extend_from_slice(b"PING\r\n");
    r.send(&batch).await;
    r.expect("PONG").await;
    let st = srv.bus.stats().durable.unwrap();
    assert_eq!(st.records, 50);
    assert!(st.fsyncs >= 1);
    let all = srv
        .bus
        .replay(ReplayQuery {
            pattern: "storage.>".into(),
            from_seq: Some(1),
            since_ms: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 50);
    srv.stop().await;
}

// ---- raw TCP ----

struct Raw {
    s: TcpStream,
    seen: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        let mut r = Self {
            s: TcpStream::connect(addr).await.unwrap(),
            seen: Vec::new(),
        };
        r.expect("INFO {").await;
        r
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Reads until `needle` has been seen (or panics after 5 s).
    async fn expect(&mut self, needle: &str) {
        self.upto(needle).await;
    }

    /// Like [`expect`](Self::expect); returns everything up to and including
    /// `needle`.
    async fn upto(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = find(&self.seen, needle.as_bytes()) {
                let out: Vec<u8> = self.seen.drain(..i + needle.len()).collect();
                return String::from_utf8_lossy(&out).into_owned();
            }
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut b))
                .await
                .unwrap_or_else(|_| {
                    panic!("no {needle:?} in {:?}", String::from_utf8_lossy(&self.seen))
                })
                .unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&self.seen)
            );
            self.seen.extend_from_slice(&b[..n]);
        }
    }

    /// Reads until the server closes the connection.
    async fn expect_closed(&mut self) {
        let mut b = [0u8; 4096];
        loop {
            match timeout(Duration::from_secs(5), self.s.read(&mut b))
                .await
                .expect("not closed")
            {
                Ok(0) | Err(_) => return,
                Ok(n) => self.seen.extend_from_slice(&b[..n]),
            }
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A well-behaved client next to each hostile one: it must keep working.
async fn bystander_still_works(addr: SocketAddr) {
    let mut r = Raw::connect(addr).await;
    r.send(b"CONNECT {\"verbose\":true}\r\nSUB ok.x 1\r\nPUB ok.x 2\r\nhi\r\nPING\r\n")
        .await;
    r.expect("+OK").await;
    r.expect("MSG ok.x 1 2\r\nhi\r\n").await;
    r.expect("PONG").await;
}

#[tokio::test]
async fn hostile_input_gets_err_and_disturbs_no_one() {
    let srv = Server::start(ServerOptions {
        max_payload: 1024,
        max_control_line: 1024,
        ..ServerOptions::default()
    })
    .await;
    let mut watcher = Raw::connect(srv.addr).await;
    watcher.send(b"SUB > 1\r\nPING\r\n").await;
    watcher.expect("PONG").await;

    let cases: &[(&[u8], &str)] = &[
        (b"HELLO world\r\n", "-ERR 'Unknown Protocol Operation'"),
        (b"PUB a 3\r\nabcdef\r\n", "-ERR 'Parser Error"),
        (b"PUB a 100000\r\n", "-ERR 'Maximum Payload Violation'"),
        (
            b"HPUB a 13 15\r\nGARBAGE/1.0\r\nxx\r\n",
            "-ERR 'Parser Error: malformed headers",
        ),
        (
            b"CONNECT {not json\r\n",
            "-ERR 'Parser Error: invalid CONNECT json",
        ),
    ];
    for (input, err) in cases {
        let mut r = Raw::connect(srv.addr).await;
        r.send(input).await;
        r.expect(err).await;
        r.expect_closed().await;
        bystander_still_works(srv.addr).await;
    }
    // A huge control line: the server cuts it off at the limit instead of
    // buffering it.
    let mut r = Raw::connect(srv.addr).await;
    let huge = vec![b'A'; 1 << 20];
    let _ = r.s.write_all(&huge).await; // the server may close mid-write
    r.expect("-ERR 'Maximum Control Line Exceeded'").await;
    r.expect_closed().await;
    bystander_still_works(srv.addr).await;

    // A bad subject is not fatal: a SUB gets -ERR, a PUB (from a client
    // that is not pedantic) is dropped without one, as in nats-server.
    let mut r = Raw::connect(srv.addr).await;
    r.send(b"PUB a..b 1\r\nx\r\nSUB a.>.b 9\r\nPING\r\n").await;
    let seen = r.upto("PONG").await;
    assert_eq!(seen.matches("-ERR").count(), 1, "{seen:?}");
    assert!(seen.contains("-ERR 'Invalid Subject'"), "{seen:?}");

    // None of the bad publishes reached the watcher.
    watcher.send(b"PING\r\n").await;
    watcher.expect("PONG").await;
    assert!(
        find(&watcher.seen, b"MSG a ").is_none(),
        "{:?}",
        String::from_utf8_lossy(&watcher.seen)
    );
    srv.stop().await;
}

#[tokio::test]
async fn client_that_stops_reading_is_cut_off_with_bounded_memory() {
    let srv = Server::start(ServerOptions {
        max_pending_bytes: 256 * 1024,
        ..ServerOptions::default()
    })
    .await;
    // The slow one subscribes and never reads again.
    let mut slow = Raw::connect(srv.addr).await;
    slow.send(b"SUB flood.> 1\r\nPING\r\n").await;
    slow.expect("PONG").await;
    // A healthy subscriber and a publisher.
    let fast = srv.client().await;
    let mut fs = fast.subscribe("flood.>").await.unwrap();
    fast.flush().await.unwrap();
    let p = srv.client().await;
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let n: usize = 20_000;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            if timeout(Duration::from_secs(10), next(&mut fs))
                .await
                .ok()
                .flatten()
                .is_none()
            {
                break;
            }
            got += 1;
        }
        got
    });
    for _ in 0..n {
        p.publish("flood.data", payload.clone()).await.unwrap();
    }
    p.flush().await.unwrap();
    assert_eq!(
        reader.await.unwrap(),
        n,
        "the healthy subscriber got everything"
    );
    let st = srv.bus.stats();
    assert!(st.subjects["flood"].slow_consumers >= 1, "{st:?}");
    // Kernel socket buffers absorb some of it; the rest hit the bound and the
    // connection was closed with -ERR 'Slow Consumer'.
    slow.expect_closed().await;
    assert!(find(&slow.seen, b"-ERR 'Slow Consumer'").is_some() || slow.seen.len() < n * 1024);
    srv.stop().await;
}

/// A client that stops reading while far below `max_pending_bytes`: its
/// writes stall, and once they make no progress for `write_deadline` the
/// server closes it as a slow consumer, drops it from its connections and
/// releases its queue, though the client itself never sends another byte.
#[tokio::test]
async fn client_that_stops_reading_is_closed_at_the_write_deadline() {
    let srv = Server::start(ServerOptions {
        write_deadline: Duration::from_millis(300),
        ..ServerOptions::default()
    })
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = Raw {
        s: sock.connect(srv.addr).await.unwrap(),
        seen: Vec::new(),
    };
    slow.send(b"CONNECT {}\r\nSUB flood.> 1\r\nPING\r\n").await;
    slow.expect("PONG").await;
    assert_eq!(srv.bus.stats().connections.len(), 1);

    // 16 MiB: far more than the socket buffers hold, far less than the
    // default max_pending_bytes (64 MiB), so only the deadline can act.
    let payload = bytes::Bytes::from(vec![b'x'; 8192]);
    for _ in 0..2048 {
        srv.bus
            .publish("flood.data", None, payload.clone())
            .await
            .unwrap();
    }
    let start = tokio::time::Instant::now();
    while !srv.bus.stats().connections.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the stalled connection is still registered: {:?}",
            srv.bus.stats().connections
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = srv.bus.stats();
    assert_eq!(st.subjects["flood"].slow_consumers, 1, "{st:?}");
    // The socket is closed: reading drains what the kernels had buffered,
    // then ends (EOF or reset), well short of what was published.
    slow.expect_closed().await;
    assert!(slow.seen.len() < 2048 * 8192, "{} bytes", slow.seen.len());
    srv.stop().await;
}

/// A PUB to an invalid subject: nats-server reports it only to pedantic
/// clients (stock clients close for good on an unexpected -ERR). Here it is
/// dropped either way (the bus cannot route it) and counted; the connection
/// goes on.
#[tokio::test]
async fn invalid_publish_subject_gets_err_only_when_pedantic() {
    let srv = Server::start(ServerOptions::default()).await;
    let mut watcher = Raw::connect(srv.addr).await;
    watcher.send(b"SUB > 1\r\nPING\r\n").await;
    watcher.expect("PONG").await;

    let mut quiet = Raw::connect(srv.addr).await;
    quiet
        .send(b"CONNECT {\"verbose\":true}\r\nPUB a..b 1\r\nx\r\nPUB a.* 1\r\ny\r\nPUB ok.a 1\r\nz\r\nPING\r\n")
        .await;
    let seen = quiet.upto("PONG").await;
    assert!(!seen.contains("-ERR"), "{seen:?}");
    // One +OK for CONNECT and one per PUB, as nats-server sends.
    assert_eq!(seen.matches("+OK").count(), 4, "{seen:?}");
    let st = srv.bus.stats();
    let c = st.connections.iter().find(|c| c.traffic.drops > 0).unwrap();
    assert_eq!((c.traffic.drops, c.traffic.messages_in), (2, 1), "{st:?}");

    let mut strict = Raw::connect(srv.addr).await;
    strict
        .send(b"CONNECT {\"pedantic\":true}\r\nPUB a..b 1\r\nx\r\nPING\r\n")
        .await;
    strict.expect("-ERR 'Invalid Publish Subject'").await;
    strict.expect("PONG").await;
    strict.send(b"PUB ok.b 1\r\nw\r\nPING\r\n").await;
    strict.expect("PONG").await;

    watcher.send(b"PING\r\n").await;
    let seen = watcher.upto("PONG").await;
    assert!(
        seen.contains("MSG ok.a 1 1") && seen.contains("MSG ok.b 1 1") && !seen.contains("MSG a."),
        "{seen:?}"
    );
    srv.stop().await;
}

/// A publish the durable log refuses is not dropped silently: the client
/// gets -ERR 'Durable Log Failure: ...' and the connection is closed, so
/// the failure surfaces in the client. Other connections go on.
#[tokio::test]
async fn durable_log_failure_closes_the_publishing_connection() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let mut d = DurableOptions::new(&log_dir);
    d.fsync = DurableFsync::Interval(Duration::from_millis(20));
    d.segment_max_bytes = 4096;
    let srv = Server::start_with(
        BusOptions {
            durable: Some(d),
            ..BusOptions::default()
        },
        ServerOptions::default(),
    )
    .await;
    // The disk goes away: the next segment cannot be created.
    std::fs::remove_dir_all(&log_dir).unwrap();
    let mut r = Raw::connect(srv.addr).await;
    let payload = vec![b'x'; 1000];
    let mut pubs = Vec::new();
    for _ in 0..10 {
        pubs.extend_from_slice(b"PUB storage.disk 1000\r\n");
        pubs.extend_from_slice(&payload);
        pubs.extend_from_slice(b"\r\n");
    }
    pubs.extend_from_slice(b"PING\r\n");
    let _ = r.s.write_all(&pubs).await;
    r.expect("-ERR 'Durable Log Failure: ").await;
    r.expect_closed().await;
    assert!(
        find(&r.seen, b"PONG").is_none(),
        "{:?}",
        String::from_utf8_lossy(&r.seen)
    );
    bystander_still_works(srv.addr).await;
    srv.stop().await;
}

#[tokio::test]
async fn drop_oldest_connection_keeps_latest() {
    let srv = Server::start(ServerOptions {
        max_pending_msgs: 5,
        slow_consumer: SlowConsumerPolicy::DropOldest,
        ..ServerOptions::default()
    })
    .await;
    // Publishing in-process while the connection's writer is not scheduled:
    // use a current-thread burst (no await between publishes).
    let mut r = Raw::connect(srv.addr).await;
    r.send(b"SUB d 1\r\nPING\r\n").await;
    r.expect("PONG").await;
    for i in 0..1000 {
        let _ = srv.bus.publish("d", None, format!("m{i}")).await;
    }
    r.send(b"PING\r\n").await;
    r.expect("m999\r\n").await;
    r.expect("PONG").await;
    let st = srv.bus.stats();
    assert!(st.subjects["d"].drops > 0, "{st:?}");
    srv.stop().await;
}

#[tokio::test]
async fn verbose_mode_acks() {
    let srv = Server::start(ServerOptions::default()).await;
    let mut r = Raw::connect(srv.addr).await;
    r.send(b"CONNECT {\"verbose\":true}\r\n").await;
    r.expect("+OK\r\n").await;
    r.send(b"SUB a 1\r\n").await;
    r.expect("+OK\r\n").await;
    r.send(b"PUB a 1\r\nx\r\n").await;
    // Fan-out happens while the PUB is processed, so the MSG comes first.
    r.expect("MSG a 1 1\r\nx\r\n").await;
    r.expect("+OK\r\n").await;
    r.send(b"UNSUB 1\r\n").await;
    r.expect("+OK\r\n").await;
    srv.stop().await;
}

#[tokio::test]
async fn max_payload_is_advertised() {
    let srv = Server::start(ServerOptions {
        max_payload: 4096,
        ..ServerOptions::default()
    })
    .await;
    let c = srv.client().await;
    assert_eq!(c.server_info().max_payload, 4096);
    assert!(c.server_info().headers);
    srv.stop().await;
}

#[tokio::test]
async fn connection_limit() {
    let srv = Server::start(ServerOptions {
        max_connections: 1,
        ..ServerOptions::default()
    })
    .await;
    let _first = Raw::connect(srv.addr).await;
    let mut second = TcpStream::connect(srv.addr).await.unwrap();
    let mut b = Vec::new();
    timeout(Duration::from_secs(5), second.read_to_end(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&b).contains("-ERR 'maximum connections exceeded'"));
    srv.stop().await;
}

#[tokio::test]
async fn unix_socket_endpoint() {
    use appliance_bus::server::serve_unix;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nats.sock");
    let (bus, _) = Bus::open(BusOptions::default()).unwrap();
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_unix(
        bus.clone(),
        listener,
        ServerOptions::default(),
        stop.clone(),
    ));
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut seen = Vec::new();
    s.write_all(b"CONNECT {}\r\nSUB u.* 1\r\nPUB u.x 2\r\nhi\r\nPING\r\n")
        .await
        .unwrap();
    let mut b = [0u8; 4096];
    while find(&seen, b"PONG").is_none() {
        let n = timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&b[..n]);
    }
    assert!(seen.starts_with(b"INFO {"));
    assert!(find(&seen, b"MSG u.x 1 2\r\nhi\r\n").is_some());
    stop.cancel();
    timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
