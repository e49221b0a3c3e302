//! Shared fixture for the loopback tests: a real server on 127.0.0.1 with a
//! real identity, real files, and clients enrolled against it.
#![allow(dead_code)]

use appliance_sync::admission::{Admission, LocalAdmission, UsageLedger};
use appliance_sync::client::{ClientOptions, SyncClient};
use appliance_sync::events::MemorySink;
use appliance_sync::identity::{Authority, Bundle, ClientName};
use appliance_sync::server::{serve, ServerConfig, Services, SyncServer};
use appliance_sync::store::Documents;
use appliance_sync::wire::{read_frame, write_frame};
use appliance_sync_proto::{client_hello, Message};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub authority: Arc<Authority>,
    pub documents: Arc<Documents>,
    pub events: Arc<MemorySink>,
    pub server: Option<SyncServer>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
}

impl Fixture {
    pub async fn start() -> Self {
        Self::start_with(|local| local).await
    }

    /// A server whose admission is `wrap` around the local one.
    pub async fn start_with(wrap: impl FnOnce(Arc<dyn Admission>) -> Arc<dyn Admission>) -> Self {
        Self::start_full(wrap, |_| {}).await
    }

    /// A server with settings changed by `configure`.
    pub async fn start_configured(configure: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_full(|local| local, configure).await
    }

    async fn start_full(
        wrap: impl FnOnce(Arc<dyn Admission>) -> Arc<dyn Admission>,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::open(&dir.path().join("identity")).unwrap();
        let ledger = UsageLedger::new();
        let docs_dir = dir.path().join("documents");
        let documents = Arc::new(Documents::new(&docs_dir, false, ledger.clone()).unwrap());
        let admission = wrap(Arc::new(
            LocalAdmission::new(authority.clone(), ledger, &docs_dir).with_reserve(0),
        ));
        let events = Arc::new(MemorySink::default());
        let services = Services {
            authority: authority.clone(),
            documents: documents.clone(),
            admission,
            events: events.clone(),
        };
        let shutdown = CancellationToken::new();
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        let server = serve(config, services, shutdown.clone()).await.unwrap();
        let addr = server.local_addr();
        Self {
            dir,
            authority,
            documents,
            events,
            server: Some(server),
            addr,
            shutdown,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn client_root(&self, name: &str) -> PathBuf {
        self.dir.path().join("documents").join(name)
    }

    /// Enrolls `name`, returning its bundle path.
    pub fn enroll(&self, name: &str, quota: Option<u64>) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.bundle"));
        self.authority
            .enroll(&ClientName::parse(name).unwrap(), quota, &path)
            .unwrap();
        path
    }

    pub async fn connect(&self, bundle: &Path) -> SyncClient {
        self.try_connect(bundle).await.unwrap()
    }

    pub async fn try_connect(
        &self,
        bundle: &Path,
    ) -> Result<SyncClient, appliance_sync::client::ClientError> {
        let bundle = Bundle::load(bundle).unwrap();
        SyncClient::connect(
            &bundle,
            Some(&self.addr.to_string()),
            ClientOptions::default(),
        )
        .await
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.wait().await;
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw QUIC connection with a bundle's identity, for speaking the
/// protocol frame by frame (hostile and corrupt inputs).
pub async fn raw_connect(bundle: &Path, addr: SocketAddr) -> Result<quinn::Connection, String> {
    let bundle = Bundle::load(bundle).map_err(|e| e.to_string())?;
    raw_connect_bundle(&bundle, addr).await
}

pub async fn raw_connect_bundle(
    bundle: &Bundle,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let crypto = appliance_sync::tls::client_crypto(bundle).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(crypto));
    let conn = endpoint
        .connect(addr, &bundle.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the server checks the client certificate after the client
    // considers the handshake done, so "hello" is where a refusal shows.
    // A refusal can surface at any of these steps; report the server's
    // close reason (the TLS alert) rather than the local symptom.
    let why = |e: String| {
        conn.close_reason()
            .map_or_else(|| e.clone(), |r| r.to_string())
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| why(e.to_string()))?;
    write_frame(&mut send, &client_hello("raw test"))
        .await
        .map_err(|e| why(e.to_string()))?;
    let _ = send.finish();
    match read_frame(&mut recv, Duration::from_secs(10)).await {
        Ok(Some((Message::Welcome(_), _))) => Ok(conn),
        Ok(other) => Err(format!("unexpected hello answer: {other:?}")),
        Err(e) => Err(why(e.to_string())),
    }
}

/// Sends `message` on a fresh stream and returns every reply until the
/// server finishes the stream (or `max` replies).
pub async fn exchange(conn: &quinn::Connection, message: &Message, max: usize) -> Vec<Message> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, message).await.unwrap();
    let _ = send.finish();
    let mut out = Vec::new();
    while out.len() < max {
        match read_frame(&mut recv, Duration::from_secs(20)).await {
            Ok(Some((m, _))) => out.push(m),
            _ => break,
        }
    }
    out
}

/// Files under a client root, excluding the server's reserved directories.
pub fn visible_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".appliance-") {
                continue;
            }
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(root, &mut out);
    out
}

/// Durable chunks held for unfinished uploads: chunk files in the chunk
/// store plus the distinct chunks listed in the durable records
/// (`<key>.landed`, 36-byte entries) of resumable staging files.
pub fn stored_chunks(root: &Path) -> usize {
    let dir = root.join(".appliance-meta").join("chunks");
    let in_store = std::fs::read_dir(dir).map_or(0, |shards| {
        shards
            .flatten()
            .filter_map(|s| std::fs::read_dir(s.path()).ok())
            .flat_map(|d| d.flatten())
            .filter(|f| {
                let name = f.file_name();
                let name = name.to_string_lossy();
                name.len() == 64 && !name.contains(".tmp")
            })
            .count()
    });
    let staged = std::fs::read_dir(root.join(".appliance-staging")).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".landed"))
            .map(|e| {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                bytes
                    .chunks_exact(36)
                    .map(|c| c[..32].to_vec())
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            })
            .sum::<usize>()
    });
    in_store + staged
}

/// Names in a client's staging directory.
pub fn staging_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(".appliance-staging"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
