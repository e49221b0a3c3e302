//! A RESP server on loopback for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use appliance_cache::{serve, Cache, CacheConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A server task and what the tests reach it by.
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub cache: Arc<Cache>,
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cache = Arc::new(Cache::new(CacheConfig::default()));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, cache.clone(), config, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task,
            cache,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// The size of the largest log segment under `dir` (a cache's log
/// directory; spare segments, zeros written ahead, are not counted).
pub fn largest_segment(dir: &std::path::Path) -> u64 {
    let mut largest = 0;
    for gen in std::fs::read_dir(dir).unwrap() {
        let gen = gen.unwrap();
        if !gen.file_type().unwrap().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(gen.path()).unwrap() {
            let f = f.unwrap();
            if f.file_name().to_string_lossy().ends_with(".seg") {
                largest = largest.max(f.metadata().unwrap().len());
            }
        }
    }
    largest
}
