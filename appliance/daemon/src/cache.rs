//! The agent response cache inside the daemon: opening it (a damaged log
//! marks the component failed instead of stopping the daemon), the RESP
//! endpoint, `cache.stats` on the bus, metrics, and the control-socket side
//! of `appliancectl cache ...`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use appliance_cache::persist::{Fsync, PersistConfig};
use appliance_cache::server::ServerConfig;
use appliance_cache::{Cache, CacheConfig as EngineConfig};
use appliance_types::cache::{CacheRequest, CacheResponse, CacheStatsView, ImportSummary};
use appliance_types::config::{CacheConfig, FsyncMode};
use appliance_types::control::{ControlError, ErrorCode};
use appliance_types::health::ComponentState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::HealthHandle;
use crate::liveness::LivenessResponder;

/// Subject of the periodic statistics.
pub const STATS_SUBJECT: &str = "cache.stats";

/// Largest JSON file `cache import` reads (1 GiB): far above any cache that
/// fits the memory bound, and a stop for a runaway stream.
pub const MAX_IMPORT_BYTES: u64 = 1 << 30;

/// Largest piece an export is sent in.
pub const EXPORT_CHUNK: usize = 256 * 1024;

/// Room for the envelope around an export piece in a control frame (the
/// response's variant tags and the piece's length take at most 7 bytes).
pub const PIECE_ENVELOPE: usize = 64;

/// The export piece that fits a control frame of `max_frame` bytes.
pub fn export_piece(max_frame: u32) -> usize {
    (max_frame as usize)
        .saturating_sub(PIECE_ENVELOPE)
        .clamp(1, EXPORT_CHUNK)
}

/// The engine's settings from the config.
pub fn engine_config(cfg: &CacheConfig) -> EngineConfig {
    EngineConfig {
        capacity_bytes: usize::try_from(cfg.max_bytes).unwrap_or(usize::MAX),
        max_value_bytes: usize::try_from(cfg.max_value_bytes).unwrap_or(usize::MAX),
        default_agent_ttl: (cfg.default_ttl_secs > 0)
            .then(|| Duration::from_secs(cfg.default_ttl_secs)),
        agent_ttl: cfg
            .agent_ttl_secs
            .iter()
            .map(|(a, s)| (a.clone(), Duration::from_secs(*s)))
            .collect(),
    }
}

/// Persistence settings; the log lives in `DATA/cache`.
pub fn persist_config(cfg: &CacheConfig, data_dir: &Path) -> PersistConfig {
    let mut p = PersistConfig::new(data_dir.join("cache"));
    p.fsync = match cfg.fsync {
        FsyncMode::Always => Fsync::Always,
        FsyncMode::Interval => Fsync::IntervalMs(cfg.fsync_interval_ms),
    };
    p
}

/// Opens the cache and replays its log, off the async threads.
pub async fn open(cfg: &CacheConfig, data_dir: &Path) -> anyhow::Result<Arc<Cache>> {
    let engine = engine_config(cfg);
    let persist = persist_config(cfg, data_dir);
    let dir = persist.dir.clone();
    let (cache, report) = tokio::task::spawn_blocking(move || Cache::open(engine, persist))
        .await
        .context("the cache opener panicked")?
        .with_context(|| format!("cannot open the cache's log in {}", dir.display()))?;
    if report.is_clean() {
        info!(
            entries = report.entries,
            load_ms = report.elapsed.as_millis(),
            "cache loaded"
        );
    } else {
        warn!(
            entries = report.entries,
            bytes_lost = report.recovery.bytes_lost(),
            records_lost_at_least = report.recovery.records_lost_at_least(),
            undecodable = report.undecodable,
            "the cache's log was damaged; everything before the damage was loaded"
        );
    }
    Ok(Arc::new(cache))
}

/// RESP server settings from the config.
pub fn server_config(cfg: &CacheConfig) -> ServerConfig {
    ServerConfig {
        max_connections: cfg.max_connections as usize,
        ..ServerConfig::default()
    }
}

/// Statistics in the shared types.
pub fn stats_view(cache: &Cache) -> CacheStatsView {
    let s = cache.stats();
    CacheStatsView {
        hits: s.hits,
        misses: s.misses,
        hit_rate: s.hit_rate,
        collisions: s.collisions,
        evictions: s.evictions,
        expirations: s.expirations,
        entries: s.entries,
        bytes: s.bytes,
        capacity_bytes: s.capacity_bytes,
    }
}

/// The cache component's task: liveness, `cache.stats` on the bus, health.
/// (Expiry, fsync under `interval` and compaction are the RESP server's
/// maintenance loop, which runs whether or not clients connect.)
pub async fn run(
    cache: Arc<Cache>,
    bus: appliance_bus::Bus,
    stats_every: Duration,
    health: HealthHandle,
    mut liveness: LivenessResponder,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + stats_every, stats_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.set(ComponentState::Ready, describe(&stats_view(&cache)));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            alive = liveness.answer_next() => if !alive { break },
            _ = tick.tick() => {
                let stats = stats_view(&cache);
                health.set(ComponentState::Ready, describe(&stats));
                if let Err(e) = bus.publish_json(STATS_SUBJECT, &stats).await {
                    warn!(error = %e, "cannot publish cache.stats");
                }
            }
        }
    }
    health.set(ComponentState::Starting, "shutting down");
}

fn describe(s: &CacheStatsView) -> String {
    format!(
        "{} entries, {} of {} bytes, hit rate {:.1}%",
        s.entries,
        s.bytes,
        s.capacity_bytes,
        s.hit_rate * 100.0
    )
}

fn cache_error(e: &appliance_cache::CacheError) -> ControlError {
    use appliance_cache::CacheError as E;
    let code = match e {
        E::Refused(_) | E::ZeroTtl => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    ControlError::new(code, e.to_string())
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, ControlError> {
    r.map_err(|e| ControlError::new(ErrorCode::Internal, format!("cache task failed: {e}")))
}

/// A put's TTL: at least 1 second, or `None` for the configured default.
pub fn check_ttl(ttl_secs: Option<u64>) -> Result<(), ControlError> {
    if ttl_secs == Some(0) {
        return Err(ControlError::new(
            ErrorCode::InvalidArgument,
            "--ttl must be at least 1 second",
        ));
    }
    Ok(())
}

/// Carries out a single-answer cache request. Anything that may fsync runs on
/// a blocking thread.
pub async fn handle(cache: &Arc<Cache>, req: CacheRequest) -> Result<CacheResponse, ControlError> {
    match req {
        CacheRequest::Get {
            agent,
            prompt,
            variant,
        } => Ok(
            match cache.get(agent.as_bytes(), prompt.as_bytes(), variant.as_bytes()) {
                Some(v) => CacheResponse::Hit(v.to_vec()),
                None => CacheResponse::Miss,
            },
        ),
        CacheRequest::Put {
            agent,
            prompt,
            variant,
            response,
            ttl_secs,
        } => {
            check_ttl(ttl_secs)?;
            let c = cache.clone();
            joined(
                tokio::task::spawn_blocking(move || {
                    c.put(
                        agent.as_bytes(),
                        prompt.as_bytes(),
                        variant.as_bytes(),
                        response,
                        ttl_secs.map(Duration::from_secs),
                    )
                })
                .await,
            )?
            .map(|()| CacheResponse::Stored)
            .map_err(|e| cache_error(&e))
        }
        CacheRequest::Stats => Ok(CacheResponse::Stats(stats_view(cache))),
        CacheRequest::Invalidate {
            agent,
            prompt,
            variant,
        } => {
            let c = cache.clone();
            joined(
                tokio::task::spawn_blocking(move || match prompt {
                    Some(p) => c
                        .invalidate(agent.as_bytes(), p.as_bytes(), variant.as_bytes())
                        .map(u64::from),
                    None => c.invalidate_agent(agent.as_bytes()).map(|n| n as u64),
                })
                .await,
            )?
            .map(CacheResponse::Invalidated)
            .map_err(|e| cache_error(&e))
        }
        CacheRequest::Import
        | CacheRequest::ImportChunk(_)
        | CacheRequest::Export
        | CacheRequest::GetPieces { .. }
        | CacheRequest::PutPieces { .. }
        | CacheRequest::PutPiece(_) => Err(ControlError::new(
            ErrorCode::InvalidArgument,
            "import, export and get and put in pieces are streamed; this request is out of \
             place here",
        )),
    }
}

/// A response arriving in pieces (`cache put` of any size): the announced
/// length is checked against the cache's maximum value size before the
/// client sends anything, and the response is handed out only once every
/// byte arrived. It never holds more than the announced length, which is at
/// most one value, and never reserves more than twice what arrived: an
/// announced length is only a claim (cache.max_value_bytes may be as large
/// as cache.max_bytes, and reserving it up front for every connection, or
/// one larger than memory, would abort the daemon).
#[derive(Debug)]
pub struct PutAssembly {
    len: usize,
    buf: Vec<u8>,
}

impl PutAssembly {
    /// Starts a put of `len` bytes into a cache that takes values of at most
    /// `max_value` bytes.
    pub fn start(len: u64, max_value: usize) -> Result<Self, ControlError> {
        match usize::try_from(len) {
            Ok(len) if len <= max_value => Ok(Self {
                len,
                buf: Vec::new(),
            }),
            _ => Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the response is {len} bytes; the cache takes responses of at most \
                     {max_value} bytes (config key cache.max_value_bytes); nothing was stored"
                ),
            )),
        }
    }

    /// Whether every byte arrived.
    pub fn is_complete(&self) -> bool {
        self.buf.len() == self.len
    }

    /// Adds the next piece; more than was announced is refused.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), ControlError> {
        if piece.len() > self.len - self.buf.len() {
            return Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the pieces of the response run past the {} bytes announced; nothing was \
                     stored",
                    self.len
                ),
            ));
        }
        // Doubling, as a Vec grows, but never past the announced length.
        let want = (self.buf.len() + piece.len())
            .max(self.buf.capacity().saturating_mul(2))
            .min(self.len);
        self.buf.reserve_exact(want - self.buf.len());
        self.buf.extend_from_slice(piece);
        Ok(())
    }

    /// The whole response, once [`PutAssembly::is_complete`].
    pub fn into_response(self) -> Vec<u8> {
        self.buf
    }
}

/// A `Read` over pieces arriving from the control connection.
#[derive(Debug)]
struct PieceReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(piece) => {
                    self.current = piece;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// An import in progress: feed pieces, then finish.
#[derive(Debug)]
pub struct Import {
    tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    task: tokio::task::JoinHandle<
        Result<appliance_cache::json::ImportReport, appliance_cache::json::JsonError>,
    >,
}

impl Import {
    /// Starts importing into `cache` on a blocking thread.
    pub fn start(cache: &Arc<Cache>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = cache.clone();
        let task = tokio::task::spawn_blocking(move || {
            let reader = PieceReader {
                rx,
                current: Vec::new(),
                pos: 0,
            };
            appliance_cache::json::import_json(&c, reader, MAX_IMPORT_BYTES)
        });
        Self { tx: Some(tx), task }
    }

    /// Hands over one piece. After a parse error the rest is drained and
    /// ignored; the error comes from [`Import::finish`].
    pub fn feed(&mut self, piece: Vec<u8>) {
        if let Some(tx) = &self.tx {
            if tx.send(piece).is_err() {
                self.tx = None;
            }
        }
    }

    /// Ends the input and waits for the result.
    pub async fn finish(mut self) -> Result<CacheResponse, ControlError> {
        self.tx = None;
        let report = joined(self.task.await)?
            .map_err(|e| ControlError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        Ok(CacheResponse::Imported(ImportSummary {
            agent_entries: report.agent_entries,
            plain_entries: report.plain_entries,
            rekeyed: report.rekeyed,
            expired: report.expired,
            refused: report.refused,
            refused_keys: report.refused_keys,
        }))
    }
}

/// A `Write` that sends pieces of at most `piece` bytes to the control
/// connection (one write may carry a whole multi-megabyte response).
struct PieceWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    piece: usize,
}

impl PieceWriter {
    fn send(&self, piece: Vec<u8>) -> std::io::Result<()> {
        self.tx.blocking_send(piece).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }

    /// Sends every full piece in the buffer.
    fn send_full(&mut self) -> std::io::Result<()> {
        while self.buf.len() >= self.piece {
            let rest = self.buf.split_off(self.piece);
            let piece = std::mem::replace(&mut self.buf, rest);
            self.send(piece)?;
        }
        Ok(())
    }
}

impl Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.send_full()?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_full()?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::take(&mut self.buf);
        self.send(piece)
    }
}

/// Starts an export in pieces that fit a control frame of `max_frame`
/// bytes: pieces arrive on the receiver; the handle gives the summary once
/// every piece was sent.
pub fn export(
    cache: &Arc<Cache>,
    max_frame: u32,
) -> (
    tokio::sync::mpsc::Receiver<Vec<u8>>,
    tokio::task::JoinHandle<Result<CacheResponse, ControlError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let c = cache.clone();
    let piece = export_piece(max_frame);
    let task = tokio::task::spawn_blocking(move || {
        let mut w = PieceWriter {
            tx,
            buf: Vec::with_capacity(piece),
            piece,
        };
        let report = appliance_cache::json::export_json(&c, &mut w)
            .map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))?;
        w.flush()
            .map_err(|e| ControlError::new(ErrorCode::Internal, e.to_string()))?;
        Ok(CacheResponse::Exported {
            written: report.written,
            skipped_binary: report.skipped_binary,
        })
    });
    (rx, task)
}

/// Cache statistics for Prometheus, read at scrape time.
#[derive(Debug)]
pub struct CacheCollector {
    cache: Arc<Cache>,
}

impl CacheCollector {
    /// A collector over `cache`.
    pub fn new(cache: Arc<Cache>) -> Self {
        Self { cache }
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = stats_view(&self.cache);
        for (name, help, v) in [
            (
                "appliance_cache_hits",
                "Cache lookups that returned a value.",
                s.hits,
            ),
            (
                "appliance_cache_misses",
                "Cache lookups that returned nothing.",
                s.misses,
            ),
            (
                "appliance_cache_collisions",
                "MD5 matches that failed the SHA-256 ownership check.",
                s.collisions,
            ),
            (
                "appliance_cache_evictions",
                "Entries dropped for the byte bound.",
                s.evictions,
            ),
            (
                "appliance_cache_expirations",
                "Entries dropped because their TTL ran out.",
                s.expirations,
            ),
        ] {
            let c = ConstCounter::new(v);
            let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        #[allow(clippy::cast_precision_loss)]
        for (name, help, v) in [
            ("appliance_cache_entries", "Entries held.", s.entries as f64),
            (
                "appliance_cache_bytes",
                "Bytes charged against the bound.",
                s.bytes as f64,
            ),
            (
                "appliance_cache_capacity_bytes",
                "The byte bound.",
                s.capacity_bytes as f64,
            ),
            (
                "appliance_cache_hit_rate",
                "Hits / (hits + misses) since start.",
                s.hit_rate,
            ),
        ] {
            let g = ConstGauge::new(v);
            let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_in_pieces_takes_exactly_what_was_announced() {
        assert_eq!(
            PutAssembly::start(9, 8).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(PutAssembly::start(u64::MAX, usize::MAX >> 1).is_err());
        let mut p = PutAssembly::start(5, 8).unwrap();
        assert!(!p.is_complete());
        p.feed(b"ab").unwrap();
        p.feed(b"").unwrap();
        assert!(
            p.feed(b"cdef").is_err(),
            "one byte past the announced length"
        );
        assert!(!p.is_complete());
        p.feed(b"cde").unwrap();
        assert!(p.is_complete());
        assert!(p.feed(b"f").is_err());
        assert_eq!(p.into_response(), b"abcde");
        assert!(PutAssembly::start(0, 8).unwrap().is_complete());
    }

    #[test]
    fn a_put_in_pieces_reserves_what_arrived_not_what_was_announced() {
        let mut p = PutAssembly::start(1 << 50, usize::MAX).unwrap();
        assert_eq!(p.buf.capacity(), 0);
        p.feed(&[7; 1000]).unwrap();
        assert!(p.buf.capacity() < 1 << 20, "{}", p.buf.capacity());
        let mut p = PutAssembly::start(1500, 1500).unwrap();
        p.feed(&[1; 1000]).unwrap();
        p.feed(&[2; 500]).unwrap();
        assert!(p.is_complete());
        assert_eq!(p.buf.capacity(), 1500);
    }
}
