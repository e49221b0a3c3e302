//! Loopback tests of the RESP endpoint: real clients (the `redis` crate) and
//! hostile raw-TCP input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use appliance_cache::{serve, Cache, CacheConfig, ServerConfig, SetCondition};
use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

async fn client(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Ping over a fresh raw connection: proves the server still serves others.
async fn still_serving(server: &Server) {
    let mut c = client(&server.url()).await;
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_round_trips() {
    let server = Server::start().await;
    let mut c = client(&server.url()).await;

    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await
        .unwrap();
    let v: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("v"));

    let () = redis::cmd("SET")
        .arg("t")
        .arg(vec![0u8, 255, 13, 10])
        .arg("EX")
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg("t")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((99..=100).contains(&ttl), "ttl {ttl}");
    let bin: Vec<u8> = redis::cmd("GET")
        .arg("t")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(bin, vec![0u8, 255, 13, 10]);

    let () = redis::cmd("MSET")
        .arg("a")
        .arg("1")
        .arg("b")
        .arg("2")
        .query_async(&mut c)
        .await
        .unwrap();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg("a")
        .arg("missing")
        .arg("b")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got, vec![Some("1".into()), None, Some("2".into())]);

    let () = redis::cmd("AGENT.SET")
        .arg("agent-7")
        .arg("How full is the pool?")
        .arg("81%")
        .arg("EX")
        .arg(60)
        .arg("VARIANT")
        .arg("llama3")
        .query_async(&mut c)
        .await
        .unwrap();
    let hit: Option<String> = redis::cmd("AGENT.GET")
        .arg("agent-7")
        .arg("How full is the pool?")
        .arg("llama3")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(hit.as_deref(), Some("81%"));
    let other_variant: Option<String> = redis::cmd("AGENT.GET")
        .arg("agent-7")
        .arg("How full is the pool?")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(other_variant, None);
    let hex = appliance_cache::md5_hex(
        &appliance_cache::Request::new(b"agent-7", b"How full is the pool?", b"llama3").md5(),
    );
    let by_md5: Option<String> = redis::cmd("GET")
        .arg(&hex)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(by_md5.as_deref(), Some("81%"));
    let flushed: i64 = redis::cmd("AGENT.FLUSH")
        .arg("agent-7")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(flushed, 1);

    // Unsupported commands are errors, and the connection lives on.
    let err = redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(n, 4);
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(info.contains("# Cache\r\nhits:"), "{info}");
    assert_eq!(server.cache.stats().collisions, 0);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_via_hello() {
    let server = Server::start().await;
    let mut c = client(&format!("{}?protocol=resp3", server.url())).await;
    let () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query_async(&mut c)
        .await
        .unwrap();
    let name: Option<String> = redis::cmd("CLIENT")
        .arg("GETNAME")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("tester"));
    let missing: Option<String> = redis::cmd("GET")
        .arg("nope")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(missing, None);
    server.stop().await;

    // The RESP3 null and INFO's verbatim text on the wire, without a
    // client library in between.
    let server = Server::start().await;
    let reply = raw_exchange(
        server.addr,
        b"HELLO 3\r\nGET nope\r\nINFO clients\r\nQUIT\r\n",
        false,
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with(b"%7\r\n"), "{text}");
    let info_at = text.find("_\r\n=").expect("a null, then a verbatim string") + 4;
    let (len, body) = text[info_at..].split_once("\r\n").unwrap();
    let len: usize = len.parse().unwrap();
    assert!(
        body.starts_with("txt:# Clients\r\nconnected_clients:1\r\n"),
        "{text}"
    );
    assert_eq!(&body[len..], "\r\n+OK\r\n", "{text}");
    server.stop().await;
}

/// Send `input`, optionally half-close, and read until EOF or 5 s of silence.
async fn raw_exchange(addr: std::net::SocketAddr, input: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close while we are still writing; that is a valid answer.
    let _ = s.write_all(input).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

async fn assert_protocol_error_and_close(server: &Server, input: &[u8], expect: &str) {
    let reply = raw_exchange(server.addr, input, false).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-ERR Protocol error: ") && text.contains(expect),
        "got {text:?}"
    );
    still_serving(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_an_error_and_the_server_keeps_serving() {
    let server = Server::start().await;

    assert_protocol_error_and_close(
        &server,
        b"*2\r\n$3\r\nGET\r\n$1099511627776\r\n",
        "invalid bulk length 1099511627776",
    )
    .await;
    assert_protocol_error_and_close(&server, b"*1\r\n$-7\r\n", "invalid bulk length -7").await;
    assert_protocol_error_and_close(&server, b"*-3\r\n", "invalid multibulk length -3").await;
    assert_protocol_error_and_close(&server, &b"*1\r\n".repeat(10_000), "nested deeper than 8")
        .await;

    // 10 MB inline command: refused at 64 KiB; the client may see the error or
    // a reset while still writing.
    let big = vec![b'a'; 10 << 20];
    let reply = raw_exchange(server.addr, &big, false).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || text.starts_with("-ERR Protocol error: too big inline request"),
        "got {text:?}"
    );
    still_serving(&server).await;

    // Truncated frame, then EOF: no reply, connection closed, server fine.
    let reply = raw_exchange(server.addr, b"*2\r\n$3\r\nGET\r\n$10\r\nabc", true).await;
    assert!(
        reply.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&reply)
    );
    still_serving(&server).await;

    // A pipelined good command before a bad one is answered first.
    let reply = raw_exchange(server.addr, b"PING\r\n*1\r\n$-2\r\n", false).await;
    assert!(
        reply.starts_with(b"+PONG\r\n-ERR Protocol error"),
        "{reply:?}"
    );
    assert_eq!(server.cache.len(), 0);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_and_many_clients() {
    let server = Server::start().await;
    let mut handles = Vec::new();
    for t in 0..8 {
        let url = server.url();
        handles.push(tokio::spawn(async move {
            let mut c = client(&url).await;
            let mut pipe = redis::pipe();
            for i in 0..200 {
                pipe.cmd("SET").arg(format!("k{t}-{i}")).arg(i).ignore();
            }
            for i in 0..200 {
                pipe.cmd("GET").arg(format!("k{t}-{i}"));
            }
            let got: Vec<i64> = pipe.query_async(&mut c).await.unwrap();
            assert_eq!(got, (0..200).collect::<Vec<_>>());
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(server.cache.len(), 1600);
    server.stop().await;
}

/// A RESP `SET` command.
fn set_frame(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = format!("*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).into_bytes();
    v.extend_from_slice(key);
    v.extend_from_slice(format!("\r\n${}\r\n", value.len()).as_bytes());
    v.extend_from_slice(value);
    v.extend_from_slice(b"\r\n");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_written_in_small_pieces_and_a_half_close() {
    let server = Server::start().await;
    // Values around the decoder's direct-read threshold and far above it,
    // pipelined, written in pieces that split headers and bodies anywhere.
    let values: Vec<Vec<u8>> = [100usize, 8 << 10, 16 << 10, 70_000, 300_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| u8::try_from((i * 31 + j) % 253).unwrap())
                .collect()
        })
        .collect();
    let mut input = Vec::new();
    for (i, v) in values.iter().enumerate() {
        input.extend_from_slice(&set_frame(format!("big{i}").as_bytes(), v));
    }
    input.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    for piece in input.chunks(1_357) {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let expected = "+OK\r\n".repeat(values.len()) + "+PONG\r\n";
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("replies arrive")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    let mut c = client(&server.url()).await;
    for (i, v) in values.iter().enumerate() {
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(format!("big{i}"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(stored == *v, "value {i} of {} bytes round-trips", v.len());
    }

    // Commands followed by a half-close are answered before the server
    // closes its side.
    let mut input = set_frame(b"last", &values[2]);
    input.extend_from_slice(b"PING\r\n");
    let reply = raw_exchange(server.addr, &input, true).await;
    assert_eq!(reply, b"+OK\r\n+PONG\r\n");
    assert_eq!(server.cache.get_plain(b"last").unwrap(), values[2]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_durable_pipelines() {
    use appliance_cache::PersistConfig;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("cache.sock");
    let log_dir = tmp.path().join("log");
    let (cache, _) = Cache::open(CacheConfig::default(), PersistConfig::new(&log_dir)).unwrap();
    let cache = Arc::new(cache);
    let (tx, task) = serve_on_unix(&sock, &cache);
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend_from_slice(format!("SET key{i} value{i}\r\n").as_bytes());
    }
    batch.extend_from_slice(b"QUIT\r\n");
    s.write_all(&batch).await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"+OK\r\n".repeat(101));
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    // The log is locked until the last handle (a maintenance pass may still
    // be finishing on a blocking thread) is gone.
    let mut cache = cache;
    for _ in 0..100 {
        match Arc::try_unwrap(cache) {
            Ok(c) => {
                drop(c);
                break;
            }
            Err(c) => {
                cache = c;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    let (cache, report) =
        Cache::open(CacheConfig::default(), PersistConfig::new(&log_dir)).unwrap();
    assert_eq!(report.entries, 100);
    assert_eq!(
        cache.get_plain(b"key99"),
        Some(bytes::Bytes::from("value99"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bytes_are_bounded_across_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cache = Arc::new(Cache::new(CacheConfig::default()));
    let (tx, rx) = oneshot::channel::<()>();
    let config = ServerConfig {
        max_buffered_bytes: 2 << 20,
        ..ServerConfig::default()
    };
    let task = tokio::spawn(serve(listener, cache.clone(), config, async move {
        let _ = rx.await;
    }));

    // A holds ~600 KB of a pending 1 MB value.
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1000000\r\n")
        .await
        .unwrap();
    a.write_all(&vec![b'x'; 600_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // B tries to buffer 1.5 MB more: refused, closed.
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1500000\r\n")
        .await
        .unwrap();
    let _ = b.write_all(&vec![b'y'; 1_500_000]).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-ERR server buffer memory exhausted"),
        "{text:?}"
    );

    // A completes normally, and its share comes back.
    a.write_all(&vec![b'x'; 400_000]).await.unwrap();
    a.write_all(b"\r\n").await.unwrap();
    let mut ok = [0u8; 5];
    a.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(n, 1);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// Long pipelines whose reads end inside frames need about one read of
/// buffer at a time, also by the server-wide budget's count: several
/// clients pipelining 10 MB each at once pass under a 1 MiB budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_pipelines_fit_a_small_buffer_budget() {
    let server = Server::start_with(ServerConfig {
        max_buffered_bytes: 1 << 20,
        ..ServerConfig::default()
    })
    .await;
    let addr = server.addr;
    const N: usize = 5000;
    let mut clients = Vec::new();
    for c in 0..4 {
        clients.push(tokio::spawn(async move {
            let value = vec![b'v'; 2000];
            let mut input = Vec::new();
            for i in 0..N {
                input.extend_from_slice(&set_frame(format!("c{c}-{i}").as_bytes(), &value));
            }
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let writer = tokio::spawn(async move {
                // Odd-sized writes, so that reads end inside frames.
                for part in input.chunks(7001) {
                    if w.write_all(part).await.is_err() {
                        break; // refused: the reader reports the reply
                    }
                }
                w
            });
            let mut replies = vec![0u8; 5 * N];
            let got =
                tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut replies)).await;
            let text = String::from_utf8_lossy(&replies[..replies.len().min(200)]).into_owned();
            assert!(got.is_ok_and(|r| r.is_ok()), "client {c}: {text:?}");
            assert!(
                replies.chunks(5).all(|r| r == b"+OK\r\n"),
                "client {c}: {text:?}"
            );
            drop(writer.await.unwrap());
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(server.cache.len(), 4 * N);
    server.stop().await;
}

/// Sends `command` (an inline `MGET`) and reads its reply of `n` values of
/// `len` bytes: `Err` with what came before the connection closed instead.
async fn mget(s: &mut TcpStream, command: &str, n: usize, len: usize) -> Result<(), Vec<u8>> {
    s.write_all(command.as_bytes())
        .await
        .map_err(|_| Vec::new())?;
    let whole = format!("*{n}\r\n").len() + n * (format!("${len}\r\n").len() + len + 2);
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    while got.len() < whole {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Err(got),
            Ok(Ok(k)) => got.extend_from_slice(&chunk[..k]),
            Err(_) => panic!("neither a reply nor a close in 10 s"),
        }
    }
    assert_eq!(got.len(), whole);
    assert!(got.starts_with(format!("*{n}\r\n${len}\r\n").as_bytes()));
    Ok(())
}

/// `MGET s0 .. s{n-1}`, inline.
fn mget_small(n: usize) -> String {
    let keys: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    format!("MGET {}\r\n", keys.join(" "))
}

/// Replies wait in the server until the client reads them, so what only
/// they hold (copies of small values, headers) counts against the
/// server-wide buffer budget like requests. A connection whose replies do
/// not fit is closed without them, and a client that does not read holds
/// its share until it goes away. Large values the cache holds are not
/// counted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_count_against_the_buffer_budget() {
    const SMALL: usize = 3000; // copied into the reply
    const LARGE: usize = 800_000; // the cache's own copy is sent
    let server = Server::start_with(ServerConfig {
        max_buffered_bytes: 2 << 20,
        ..ServerConfig::default()
    })
    .await;
    let addr = server.addr;
    let mut c = client(&server.url()).await;
    for batch in 0..7 {
        let mut mset = redis::cmd("MSET");
        for i in batch * 100..(batch + 1) * 100 {
            mset.arg(format!("s{i}")).arg(vec![b's'; SMALL]);
        }
        let () = mset.query_async(&mut c).await.unwrap();
    }
    let () = redis::cmd("SET")
        .arg("v")
        .arg(vec![b'v'; LARGE])
        .query_async(&mut c)
        .await
        .unwrap();

    // 1.2 MB of copies fits, 2.1 MB does not: the connection is closed
    // with no reply at all, not even to the SET before the MGET.
    let mut s = TcpStream::connect(addr).await.unwrap();
    mget(&mut s, &mget_small(400), 400, SMALL).await.unwrap();
    let cut = mget(
        &mut s,
        &format!("SET k x\r\n{}", mget_small(700)),
        700,
        SMALL,
    )
    .await
    .unwrap_err();
    assert!(cut.is_empty(), "{:?}", String::from_utf8_lossy(&cut));
    still_serving(&server).await;

    // 2.4 MB of the cache's own value, to four clients at once: all fit.
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            mget(&mut s, "MGET v v v\r\n", 3, LARGE).await
        }));
    }
    for r in readers {
        assert!(r.await.unwrap().is_ok());
    }

    // A client asks for 63 MB of copies and reads nothing: once the socket
    // buffers are full, the server holds a 1 MB reply for it, and 1.2 MB
    // more no longer fits beside that.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut hog = socket.connect(addr).await.unwrap();
    hog.write_all(mget_small(350).repeat(60).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(mget(&mut s, &mget_small(400), 400, SMALL).await.is_err());

    // Once it goes away, its share comes back.
    drop(hog);
    let mut back = false;
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if mget(&mut s, &mget_small(400), 400, SMALL).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the share of a closed connection did not come back");

    // INFO tells the operator.
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    let field = |name| info_field(&info, name);
    assert_eq!(field("client_buffer_limit"), 2 << 20);
    assert!(field("clients_closed_over_buffer_limit") >= 2, "{info}");
    assert!(field("client_buffer_bytes") < 2 << 20, "{info}");
    server.stop().await;
}

/// Serves `cache` on a Unix socket at `sock` until the sender is used.
fn serve_on_unix(
    sock: &std::path::Path,
    cache: &Arc<Cache>,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(appliance_cache::serve_unix(
        listener,
        cache.clone(),
        ServerConfig::default(),
        async move {
            let _ = rx.await;
        },
    ));
    (tx, task)
}

/// `INFO clients`.
async fn clients_info(c: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("INFO")
        .arg("clients")
        .query_async(c)
        .await
        .unwrap()
}

/// The number in an INFO field.
fn info_field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {info}"))
        .trim()
        .parse()
        .unwrap()
}

/// Connections over `max_connections` are told so and closed; INFO counts
/// them, and the connections being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_and_its_counters() {
    let server = Server::start_with(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut a = client(&server.url()).await;
    let mut b = TcpStream::connect(server.addr).await.unwrap();
    b.write_all(b"PING\r\n").await.unwrap();
    let mut pong = [0u8; 7];
    b.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let refused = raw_exchange(server.addr, b"PING\r\n", false).await;
    assert_eq!(refused, b"-ERR max number of clients reached\r\n");

    let counters = |info: &str| {
        (
            info_field(info, "connected_clients"),
            info_field(info, "rejected_connections"),
        )
    };
    let info: String = redis::cmd("INFO").query_async(&mut a).await.unwrap();
    assert_eq!(counters(&info), (2, 1));
    // The section alone, as `redis-cli INFO clients` asks for it.
    let info: String = clients_info(&mut a).await;
    assert!(
        info.starts_with("# Clients\r\nconnected_clients:2\r\n"),
        "{info:?}"
    );
    assert!(!info.contains("# Server"), "{info:?}");
    drop(b);
    let mut now = (0, 0);
    for _ in 0..50 {
        let info: String = redis::cmd("INFO").query_async(&mut a).await.unwrap();
        now = counters(&info);
        if now.0 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(now, (1, 1));
    server.stop().await;
}

/// A client that asks and then reads nothing is closed once its replies
/// have made no progress for `write_stall_timeout`, and INFO counts it; a
/// slow client that keeps taking some of them is served for as long as
/// it takes, well past that timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    const VALUE: usize = 2 << 20;
    let stall = Duration::from_millis(1000);
    let server = Server::start_with(ServerConfig {
        write_stall_timeout: stall,
        ..ServerConfig::default()
    })
    .await;
    let mut c = client(&server.url()).await;
    let () = redis::cmd("SET")
        .arg("v")
        .arg(vec![b'v'; VALUE])
        .query_async(&mut c)
        .await
        .unwrap();
    let whole = "*3\r\n".len() + 3 * (format!("${VALUE}\r\n").len() + VALUE + 2);
    // Small receive buffers, so that the server's writes block soon.
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(server.addr).await.unwrap();
        s.write_all(b"MGET v v v\r\n").await.unwrap();
        s
    };

    // Slow but steady: 512 KiB, then a pause of a fifth of the timeout.
    let started = std::time::Instant::now();
    let mut slow = connect().await;
    let mut got = 0;
    let mut chunk = vec![0u8; 64 << 10];
    let mut since_pause = 0;
    while got < whole {
        let n = slow.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the slow reader was closed after {got} bytes");
        got += n;
        since_pause += n;
        if since_pause >= 512 << 10 {
            since_pause = 0;
            tokio::time::sleep(stall / 5).await;
        }
    }
    assert_eq!(got, whole);
    assert!(started.elapsed() > stall * 2, "{:?}", started.elapsed());

    // Stopped: closed after the timeout, with most of the reply unsent.
    let mut stuck = connect().await;
    let mut closed = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let info: String = clients_info(&mut c).await;
        closed = info_field(&info, "clients_closed_not_reading");
        if closed == 1 {
            // Left: this client and the slow one.
            assert_eq!(info_field(&info, "connected_clients"), 2, "{info}");
            break;
        }
    }
    assert_eq!(closed, 1, "the client that reads nothing was not closed");
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest).await;
    assert!(
        rest.len() < whole,
        "the whole reply was sent: {}",
        rest.len()
    );
    still_serving(&server).await;
    server.stop().await;
}

/// A client may send its whole pipeline before it reads any reply (as
/// redis-py's pipelines do): while the replies wait for it, the server
/// goes on taking its input, so neither side waits for the other. Over a
/// Unix socket, where the kernel buffers only about 200 KB each way, a
/// megabyte of GETs with 100 MB of replies is enough to show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_sent_whole_before_reading_is_answered() {
    const VALUE: usize = 2000;
    const GETS: usize = 50_000;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("cache.sock");
    let cache = Arc::new(Cache::new(CacheConfig::default()));
    cache
        .set_plain(b"v", vec![b'v'; VALUE], None, SetCondition::Always)
        .unwrap();
    let (tx, task) = serve_on_unix(&sock, &cache);
    let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let pipeline = b"*2\r\n$3\r\nGET\r\n$1\r\nv\r\n".repeat(GETS);
    tokio::time::timeout(Duration::from_secs(20), wr.write_all(&pipeline))
        .await
        .expect("the server stopped taking input while its replies waited")
        .unwrap();
    let one = format!("${VALUE}\r\n{}\r\n", "v".repeat(VALUE));
    let mut got = 0;
    let mut chunk = vec![0u8; 1 << 20];
    while got < GETS * one.len() {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        for &b in &chunk[..n] {
            assert_eq!(b, one.as_bytes()[got % one.len()], "at byte {got}");
            got += 1;
        }
    }
    assert_eq!(got, GETS * one.len());
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// A client library's transaction (`MULTI` ... `EXEC`, as redis-py's
/// default pipeline sends it): the replies come back as one array after
/// `EXEC`, and a command refused while queueing aborts the lot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_from_a_client_library() {
    let server = Server::start().await;
    let mut c = client(&server.url()).await;
    let (set, got, ttl): (String, String, i64) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("tx")
        .arg("1")
        .arg("EX")
        .arg(100)
        .cmd("GET")
        .arg("tx")
        .cmd("TTL")
        .arg("tx")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((set.as_str(), got.as_str(), ttl), ("OK", "1", 100));

    let aborted: redis::RedisResult<(String, String)> = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("no")
        .arg("1")
        .cmd("NOSUCH")
        .arg("x")
        .query_async(&mut c)
        .await;
    // The library reports the first error: the refusal of NOSUCH.
    let e = aborted.unwrap_err();
    assert!(format!("{e:?}").contains("NOSUCH"), "{e:?}");
    let no: Option<String> = redis::cmd("GET")
        .arg("no")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(no, None);
    still_serving(&server).await;
    server.stop().await;
}

/// A client that sends 21 MB of `GET v` and reads none of the replies (its
/// receive buffer is 4 KiB): the read half, kept open, and the writer.
async fn start_hog(
    addr: std::net::SocketAddr,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let hog = socket.connect(addr).await.unwrap();
    let (hog_read, mut hog_write) = hog.into_split();
    let pipeline = b"GET v\r\n".repeat(3_000_000);
    let writer = tokio::spawn(async move {
        let _ = hog_write.write_all(&pipeline).await;
        hog_write
    });
    (hog_read, writer)
}

/// Taking input ahead while replies wait uses only the first half of the
/// server's buffer budget: a client streaming commands without reading
/// cannot leave the others nothing to reply with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_taken_ahead_leaves_half_the_budget_to_the_others() {
    const SMALL: usize = 3000; // copied into the reply
    let server = Server::start_with(ServerConfig {
        max_buffered_bytes: 4 << 20,
        ..ServerConfig::default()
    })
    .await;
    let mut c = client(&server.url()).await;
    let mut mset = redis::cmd("MSET");
    for i in 0..400 {
        mset.arg(format!("s{i}")).arg(vec![b's'; SMALL]);
    }
    let () = mset.query_async(&mut c).await.unwrap();
    let () = redis::cmd("SET")
        .arg("v")
        .arg(vec![b'v'; 1 << 20])
        .query_async(&mut c)
        .await
        .unwrap();

    // 20 MB of GETs of a 1 MiB value, and nothing read: the replies (the
    // cache's own value) soon block, and the rest of the input is taken
    // ahead until half the budget is held.
    let (hog_read, writer) = start_hog(server.addr).await;
    let mut held = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let info: String = clients_info(&mut c).await;
        held = info_field(&info, "client_buffer_bytes");
        assert!(held <= (2 << 20) + (256 << 10), "{info}");
        if held > 3 << 19 {
            break;
        }
    }
    assert!(held > 3 << 19, "not taken ahead: {held} bytes held");
    // And no more once it has had time to take all it can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info: String = clients_info(&mut c).await;
    assert!(
        info_field(&info, "client_buffer_bytes") <= (2 << 20) + (256 << 10),
        "{info}"
    );

    // The others still get 1.2 MB of copied replies.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    mget(&mut s, &mget_small(400), 400, SMALL).await.unwrap();
    writer.abort();
    drop(hog_read);
    server.stop().await;
}

/// Bytes of the buffer budget held by all connections, once it has stayed
/// the same for 300 ms (or after about 5 s).
async fn settled_buffer_bytes(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = info_field(&clients_info(c).await, "client_buffer_bytes");
        if held == last {
            break;
        }
        last = held;
    }
    last
}

/// A client whose input could not be taken ahead because the others held
/// the budget gets its turn when they give it back, not only when it reads
/// a reply (it may never: a client that writes its whole pipeline before
/// it reads would wait for the write stall timeout, and be closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_is_taken_ahead_again_when_the_budget_frees() {
    let server = Server::start_with(ServerConfig {
        max_buffered_bytes: 4 << 20,
        write_stall_timeout: Duration::from_secs(120),
        ..ServerConfig::default()
    })
    .await;
    let mut c = client(&server.url()).await;
    let () = redis::cmd("SET")
        .arg("v")
        .arg(vec![b'v'; 1 << 20])
        .query_async(&mut c)
        .await
        .unwrap();

    // Another client holds about 1.2 MB of the budget: the body of a SET
    // still arriving.
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    other
        .write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1400000\r\n")
        .await
        .unwrap();
    other.write_all(&vec![b'b'; 1_200_000]).await.unwrap();
    let before_hog = settled_buffer_bytes(&mut c).await;
    assert!(before_hog > 1_100_000, "the body is not held: {before_hog}");

    // The hog: GETs of a 1 MiB value, none read. Its input is taken ahead
    // while all held stays under half the budget, so it gets less now.
    let (hog_read, writer) = start_hog(server.addr).await;
    let squeezed = settled_buffer_bytes(&mut c).await;
    assert!(
        squeezed > before_hog + (256 << 10) && squeezed <= (2 << 20) + (256 << 10),
        "before the hog {before_hog}, with it {squeezed}"
    );

    // The other client goes, and its 1.2 MB with it: the hog takes more
    // than it had (without the wake-up it kept what it had, or less).
    drop(other);
    let hog_before = squeezed - before_hog;
    let freed = settled_buffer_bytes(&mut c).await;
    assert!(
        freed > hog_before + (512 << 10) && freed <= (2 << 20) + (256 << 10),
        "the hog held {hog_before} beside the other client; all held after it went: {freed}"
    );
    writer.abort();
    drop(hog_read);
    server.stop().await;
}
