//! A client sending one small argument per read must not make the server
//! hold a read buffer per argument. Measured with a counting allocator (the
//! only test in this binary, so nothing else allocates meanwhile): dhat's
//! heap statistics.

use std::time::Duration;

use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn live_bytes() -> usize {
    dhat::HeapStats::get().curr_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_argument_per_read_does_not_pin_a_read_buffer_each() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let server = Server::start().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"*1001\r\n$3\r\nDEL\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = live_bytes();
    // All but the last of the DEL's 1,000 keys.
    for _ in 0..999 {
        // Each its own segment and, after the pause, its own read.
        s.write_all(b"$1\r\na\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let grown = live_bytes().saturating_sub(before);
    // Pinned, each argument held a read buffer of 16 KiB: 16 MB.
    assert!(
        grown < 2 << 20,
        "{grown} bytes more live after 999 one-byte arguments"
    );
    s.write_all(b"$1\r\na\r\n").await.unwrap();
    let mut reply = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b":0\r\n");
    server.stop().await;
}
