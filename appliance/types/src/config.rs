//! The daemon's configuration: one TOML file with defaults in code.
//!
//! Rules:
//! - The file must carry `version = 1` ([`CONFIG_VERSION`]); another version is
//!   refused, so a future format change is never misread.
//! - An unknown key anywhere is refused, and every error names the key
//!   (`metrics.listen`, `control.admin_group`, ...), because a typo in a storage
//!   appliance's config must not silently fall back to a default.
//! - Paths left unset are derived: under `--state-dir DIR` everything lives in
//!   `DIR`; otherwise the production locations (`/run/appliance`,
//!   `/var/lib/appliance`, ...) apply. See [`Config::resolve`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// Production location of the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/appliance/appliance.toml";

/// Production control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/appliance/control.sock";

/// Production data directory (systemd `StateDirectory=appliance`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/appliance";

/// Production log directory (systemd `LogsDirectory=appliance`).
pub const DEFAULT_LOG_DIR: &str = "/var/log/appliance";

/// Production metrics address. 9464 is a commonly used exporter port; only
/// loopback is allowed (see [`MetricsConfig::listen`]).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// The port of [`DEFAULT_METRICS_ADDR`].
pub const DEFAULT_METRICS_PORT: u16 = 9464;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Storage manager.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Where data and logs go.
    #[serde(default)]
    pub paths: PathsConfig,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The event bus.
    #[serde(default)]
    pub bus: BusConfig,
    /// The agent response cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// The QUIC sync endpoint.
    #[serde(default)]
    pub sync: SyncConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            log: LogConfig::default(),
            control: ControlConfig::default(),
            metrics: MetricsConfig::default(),
            storage: StorageConfig::default(),
            paths: PathsConfig::default(),
            shutdown: ShutdownConfig::default(),
            bus: BusConfig::default(),
            cache: CacheConfig::default(),
            sync: SyncConfig::default(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter directive (`info`, `debug`, `info,appliance_bus=trace`).
    /// `RUST_LOG`, when set, wins over this.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// `[control]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Socket path. Default: `/run/appliance/control.sock`, or
    /// `DIR/control.sock` with `--state-dir DIR`.
    pub socket: Option<PathBuf>,
    /// Group whose members may send mutating requests (besides root and the
    /// daemon's own user). A group that does not exist on the system admits
    /// nobody extra; the daemon logs a warning.
    pub admin_group: String,
    /// Group that owns the socket file (mode 0660), so its members can connect.
    /// Unset: the daemon's primary group.
    pub socket_group: Option<String>,
    /// Largest frame accepted, in bytes (1 KiB ..= 16 MiB).
    pub max_frame_bytes: u32,
    /// Concurrent client connections; more are told `busy` and closed.
    pub max_connections: u32,
    /// A connection that sends nothing for this long is closed (seconds).
    pub idle_timeout_secs: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: None,
            admin_group: "appliance-admin".into(),
            socket_group: None,
            max_frame_bytes: crate::control::DEFAULT_MAX_FRAME,
            max_connections: 64,
            idle_timeout_secs: 60,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics.
    pub enabled: bool,
    /// Loopback address. Default `127.0.0.1:9464`; with `--state-dir`,
    /// `127.0.0.1:0` (an ephemeral port, shown by `appliancectl status`). The
    /// endpoint has no authentication, so non-loopback addresses are refused.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Whether the appliance is useless without ZFS (true on the real box).
    /// When true, missing ZFS fails the ready probe; when false it is reported
    /// as `unavailable` and everything else runs.
    pub required: bool,
    /// The ZFS control device whose presence means the module is loaded.
    pub zfs_device: PathBuf,
    /// `zfs`: the real pool through `zpool`/`zfs`. `simulator`: an in-memory
    /// pool on simulated disks (for demos and for testing the daemon, CLI
    /// and bus without ZFS; nothing is stored).
    pub backend: StorageBackend,
    /// Disks of the simulator (`virtio-SIM0..N`, 1 GiB each).
    pub simulator_disks: u32,
    /// Where encryption keys go (never inside the pool). Default `DATA/keys`.
    pub key_dir: Option<PathBuf>,
    /// How often pool state is polled to cross-check the ZFS event stream
    /// (seconds).
    pub poll_interval_secs: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            required: false,
            zfs_device: PathBuf::from("/dev/zfs"),
            backend: StorageBackend::Zfs,
            simulator_disks: 6,
            key_dir: None,
            poll_interval_secs: 10,
        }
    }
}

/// See [`StorageConfig::backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Real ZFS.
    Zfs,
    /// In-memory simulation.
    Simulator,
}

/// `[paths]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Persistent data (logs of the bus and cache, sync staging, keys).
    pub data_dir: Option<PathBuf>,
    /// File logs, where a component keeps any.
    pub log_dir: Option<PathBuf>,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight work may take to finish after SIGTERM (1..=60 s).
    /// The daemon exits 0 within this, aborting what is left. Keep it below
    /// the unit's `TimeoutStopSec=`.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout_secs: 8 }
    }
}

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Every record is fsynced before it is acknowledged.
    Always,
    /// Records are fsynced at least every `fsync_interval_ms`; a power cut
    /// may lose that window.
    Interval,
}

/// What happens to an ordinary (non-durable) subscriber that falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// NATS behaviour: `-ERR 'Slow Consumer'` and disconnect.
    Disconnect,
    /// Drop the oldest queued messages and count them.
    DropOldest,
}

/// `[bus]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// Run the bus's NATS endpoint (the in-process bus always runs).
    pub enabled: bool,
    /// NATS endpoint on loopback. Default `127.0.0.1:4222` (the NATS port);
    /// with `--state-dir`, an ephemeral port.
    pub listen: Option<SocketAddr>,
    /// Optional Unix socket for the NATS endpoint.
    pub unix_socket: Option<PathBuf>,
    /// Largest message payload, advertised in `INFO` (bytes, 1 KiB ..= 64 MiB).
    pub max_payload: u32,
    /// Concurrent NATS connections.
    pub max_connections: u32,
    /// Messages queued per subscriber before the slow-consumer policy applies.
    pub subscriber_queue: u32,
    /// See [`SlowConsumerPolicy`].
    pub slow_consumer: SlowConsumerPolicy,
    /// Subjects (patterns) whose messages are written to the durable log.
    pub durable_subjects: Vec<String>,
    /// Durability of the log.
    pub fsync: FsyncMode,
    /// Interval for [`FsyncMode::Interval`] (1 ..= 60000 ms).
    pub fsync_interval_ms: u64,
    /// Drop durable messages older than this (seconds, 0 = keep by age forever).
    pub retention_secs: u64,
    /// Keep the durable log under this many bytes (oldest segments go first).
    pub retention_bytes: u64,
    /// `system.heartbeat` period in seconds.
    pub heartbeat_secs: u64,
    /// Attempts for an in-process handler before its message is dead-lettered.
    pub dlq_max_attempts: u32,
    /// First retry delay; doubles with each attempt (ms).
    pub dlq_backoff_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            unix_socket: None,
            max_payload: 1024 * 1024,
            max_connections: 256,
            subscriber_queue: 8192,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            durable_subjects: vec!["storage.>".into(), "sync.>".into(), "system.>".into()],
            fsync: FsyncMode::Interval,
            fsync_interval_ms: 100,
            retention_secs: 30 * 24 * 3600,
            retention_bytes: 1024 * 1024 * 1024,
            heartbeat_secs: 10,
            dlq_max_attempts: 5,
            dlq_backoff_ms: 100,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Run the cache's RESP endpoint (the in-process cache always runs).
    pub enabled: bool,
    /// RESP endpoint on loopback. Default `127.0.0.1:6379` (the Redis port,
    /// so stock clients need no flags); with `--state-dir`, an ephemeral port.
    pub listen: Option<SocketAddr>,
    /// Optional Unix socket for the RESP endpoint.
    pub unix_socket: Option<PathBuf>,
    /// Memory bound: keys, values and overhead (bytes, at least 1 MiB).
    pub max_bytes: u64,
    /// Largest value a put accepts (bytes).
    pub max_value_bytes: u64,
    /// TTL of agent responses put without one (seconds; 0 = no expiry).
    pub default_ttl_secs: u64,
    /// Per-agent TTL overrides in seconds.
    pub agent_ttl_secs: std::collections::BTreeMap<String, u64>,
    /// Durability of the cache's log.
    pub fsync: FsyncMode,
    /// Interval for [`FsyncMode::Interval`] (1 ..= 60000 ms).
    pub fsync_interval_ms: u64,
    /// Concurrent RESP connections.
    pub max_connections: u32,
    /// `cache.stats` on the bus every this many seconds.
    pub stats_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            unix_socket: None,
            max_bytes: 256 * 1024 * 1024,
            max_value_bytes: 8 * 1024 * 1024,
            default_ttl_secs: 24 * 3600,
            agent_ttl_secs: std::collections::BTreeMap::new(),
            fsync: FsyncMode::Interval,
            fsync_interval_ms: 100,
            max_connections: 1024,
            stats_secs: 10,
        }
    }
}

/// `[sync]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Run the QUIC sync endpoint.
    pub enabled: bool,
    /// UDP address. Default `0.0.0.0:7443` (laptops reach it over the
    /// network; every client must hold a certificate from the appliance CA);
    /// with `--state-dir`, `127.0.0.1:0`.
    pub listen: Option<SocketAddr>,
    /// `HOST:PORT` written into client bundles, if the box has a stable name.
    pub public_address: Option<String>,
    /// Where documents live (one directory per client). Default
    /// `DATA/documents`; on the appliance, the encrypted `documents` dataset.
    pub documents_dir: Option<PathBuf>,
    /// Keep a replaced document's previous version as `name.~N~`.
    pub keep_versions: bool,
    /// Concurrent connections per client (1 ..= 64).
    pub max_connections_per_client: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            public_address: None,
            documents_dir: None,
            keep_versions: false,
            max_connections_per_client: 4,
        }
    }
}

/// Production sync (QUIC, UDP) port.
pub const DEFAULT_SYNC_PORT: u16 = 7443;

/// Production NATS endpoint port.
pub const DEFAULT_NATS_PORT: u16 = 4222;

/// Production RESP endpoint port.
pub const DEFAULT_RESP_PORT: u16 = 6379;

/// A configuration error that names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key (`metrics.listen`), or empty when the file is not TOML at all.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "config key `{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("", format!("not valid TOML: {}", e.message())))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_owned();
            // serde_path_to_error already includes an unknown field in the
            // path; a missing field is named only in the message.
            let key = match missing_field_name(&msg) {
                Some(field) if path == "." || path.is_empty() => field,
                Some(field) => format!("{path}.{field}"),
                None if path == "." => String::new(),
                None => path,
            };
            let message = msg;
            ConfigError::new(key, message)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::new(
                "version",
                format!(
                    "this daemon reads config version {CONFIG_VERSION}, the file says {}",
                    self.version
                ),
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::new(
                "log.level",
                "must not be empty (try \"info\")",
            ));
        }
        if self.control.admin_group.trim().is_empty() {
            return Err(ConfigError::new("control.admin_group", "must not be empty"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.control.max_frame_bytes) {
            return Err(ConfigError::new(
                "control.max_frame_bytes",
                format!(
                    "{} is outside 1024..=16777216",
                    self.control.max_frame_bytes
                ),
            ));
        }
        if !(1..=4096).contains(&self.control.max_connections) {
            return Err(ConfigError::new(
                "control.max_connections",
                format!("{} is outside 1..=4096", self.control.max_connections),
            ));
        }
        if !(1..=86_400).contains(&self.control.idle_timeout_secs) {
            return Err(ConfigError::new(
                "control.idle_timeout_secs",
                format!("{} is outside 1..=86400", self.control.idle_timeout_secs),
            ));
        }
        if let Some(addr) = self.metrics.listen {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::new(
                    "metrics.listen",
                    format!("{addr} is not a loopback address; the metrics endpoint has no authentication"),
                ));
            }
        }
        if !(1..=60).contains(&self.shutdown.timeout_secs) {
            return Err(ConfigError::new(
                "shutdown.timeout_secs",
                format!("{} is outside 1..=60", self.shutdown.timeout_secs),
            ));
        }
        self.validate_bus()?;
        self.validate_cache()?;
        check_range(
            "storage.simulator_disks",
            u64::from(self.storage.simulator_disks),
            1,
            64,
        )?;
        check_range(
            "storage.poll_interval_secs",
            self.storage.poll_interval_secs,
            1,
            3600,
        )?;
        check_range(
            "sync.max_connections_per_client",
            u64::from(self.sync.max_connections_per_client),
            1,
            64,
        )?;
        if let Some(a) = &self.sync.public_address {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(ConfigError::new(
                    "sync.public_address",
                    format!("{a:?} is not HOST:PORT"),
                ));
            }
        }
        for (key, p) in [
            ("bus.unix_socket", self.bus.unix_socket.as_deref()),
            ("sync.documents_dir", self.sync.documents_dir.as_deref()),
            ("storage.key_dir", self.storage.key_dir.as_deref()),
            ("cache.unix_socket", self.cache.unix_socket.as_deref()),
            ("control.socket", self.control.socket.as_deref()),
            ("paths.data_dir", self.paths.data_dir.as_deref()),
            ("paths.log_dir", self.paths.log_dir.as_deref()),
            (
                "storage.zfs_device",
                Some(self.storage.zfs_device.as_path()),
            ),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(ConfigError::new(
                        key,
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_bus(&self) -> Result<(), ConfigError> {
        let b = &self.bus;
        check_loopback("bus.listen", b.listen)?;
        check_range(
            "bus.max_payload",
            u64::from(b.max_payload),
            1024,
            64 * 1024 * 1024,
        )?;
        check_range(
            "bus.max_connections",
            u64::from(b.max_connections),
            1,
            65_536,
        )?;
        check_range(
            "bus.subscriber_queue",
            u64::from(b.subscriber_queue),
            16,
            10_000_000,
        )?;
        check_range("bus.fsync_interval_ms", b.fsync_interval_ms, 1, 60_000)?;
        check_range(
            "bus.retention_bytes",
            b.retention_bytes,
            1024 * 1024,
            u64::MAX,
        )?;
        check_range("bus.heartbeat_secs", b.heartbeat_secs, 1, 3600)?;
        check_range(
            "bus.dlq_max_attempts",
            u64::from(b.dlq_max_attempts),
            1,
            100,
        )?;
        check_range("bus.dlq_backoff_ms", b.dlq_backoff_ms, 1, 600_000)?;
        for (i, pattern) in b.durable_subjects.iter().enumerate() {
            if !plausible_pattern(pattern) {
                return Err(ConfigError::new(
                    format!("bus.durable_subjects[{i}]"),
                    format!("{pattern:?} is not a subject pattern (dot-separated tokens, `*` or a final `>`)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_cache(&self) -> Result<(), ConfigError> {
        let c = &self.cache;
        check_loopback("cache.listen", c.listen)?;
        check_range("cache.max_bytes", c.max_bytes, 1024 * 1024, u64::MAX)?;
        check_range("cache.max_value_bytes", c.max_value_bytes, 1, c.max_bytes)?;
        check_range("cache.fsync_interval_ms", c.fsync_interval_ms, 1, 60_000)?;
        check_range(
            "cache.max_connections",
            u64::from(c.max_connections),
            1,
            65_536,
        )?;
        check_range("cache.stats_secs", c.stats_secs, 1, 3600)?;
        for (agent, ttl) in &c.agent_ttl_secs {
            if *ttl == 0 {
                return Err(ConfigError::new(
                    format!("cache.agent_ttl_secs.{agent}"),
                    "must be at least 1 second",
                ));
            }
        }
        Ok(())
    }

    /// Fills in every unset path and address. With `state_dir`, everything
    /// lives under it and listeners default to ephemeral loopback ports (so
    /// several daemons can run side by side in tests); without it the
    /// production defaults apply.
    pub fn resolve(&self, state_dir: Option<&Path>) -> Resolved {
        let pick = |explicit: &Option<PathBuf>, under: &str, prod: &str| -> PathBuf {
            match (explicit, state_dir) {
                (Some(p), _) => p.clone(),
                (None, Some(dir)) => dir.join(under),
                (None, None) => PathBuf::from(prod),
            }
        };
        let metrics_listen = self.metrics.listen.unwrap_or_else(|| {
            if state_dir.is_some() {
                SocketAddr::from(([127, 0, 0, 1], 0))
            } else {
                SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))
            }
        });
        let listen = |explicit: Option<SocketAddr>,
                      enabled: bool,
                      port: u16|
         -> Option<SocketAddr> {
            enabled.then(|| {
                explicit.unwrap_or_else(|| {
                    SocketAddr::from(([127, 0, 0, 1], if state_dir.is_some() { 0 } else { port }))
                })
            })
        };
        Resolved {
            bus_listen: listen(self.bus.listen, self.bus.enabled, DEFAULT_NATS_PORT),
            cache_listen: listen(self.cache.listen, self.cache.enabled, DEFAULT_RESP_PORT),
            sync_listen: self.sync.enabled.then(|| {
                self.sync.listen.unwrap_or_else(|| {
                    if state_dir.is_some() {
                        SocketAddr::from(([127, 0, 0, 1], 0))
                    } else {
                        SocketAddr::from(([0, 0, 0, 0], DEFAULT_SYNC_PORT))
                    }
                })
            }),
            control_socket: pick(&self.control.socket, "control.sock", DEFAULT_CONTROL_SOCKET),
            data_dir: pick(&self.paths.data_dir, "data", DEFAULT_DATA_DIR),
            log_dir: pick(&self.paths.log_dir, "logs", DEFAULT_LOG_DIR),
            metrics_listen: self.metrics.enabled.then_some(metrics_listen),
            config: self.clone(),
        }
    }
}

/// A configuration with every path and address decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The control socket path.
    pub control_socket: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The log directory.
    pub log_dir: PathBuf,
    /// Where metrics are served, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the NATS endpoint listens, if enabled.
    pub bus_listen: Option<SocketAddr>,
    /// Where the RESP endpoint listens, if enabled.
    pub cache_listen: Option<SocketAddr>,
    /// Where the QUIC sync endpoint listens (UDP), if enabled.
    pub sync_listen: Option<SocketAddr>,
    /// The validated file contents.
    pub config: Config,
}

fn check_loopback(key: &str, addr: Option<SocketAddr>) -> Result<(), ConfigError> {
    match addr {
        Some(a) if !a.ip().is_loopback() => Err(ConfigError::new(
            key,
            format!("{a} is not a loopback address; this endpoint has no authentication and serves only the box itself"),
        )),
        _ => Ok(()),
    }
}

fn check_range(key: &str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&v) {
        Ok(())
    } else if max == u64::MAX {
        Err(ConfigError::new(
            key,
            format!("{v} is below the minimum of {min}"),
        ))
    } else {
        Err(ConfigError::new(
            key,
            format!("{v} is outside {min}..={max}"),
        ))
    }
}

/// A cheap syntactic check of a subject pattern; the bus validates fully.
fn plausible_pattern(p: &str) -> bool {
    let tokens: Vec<&str> = p.split('.').collect();
    !p.is_empty()
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && !t.chars().any(char::is_whitespace)
                && (*t == "*" || (*t == ">" && i == tokens.len() - 1) || !t.contains(['*', '>']))
        })
}

/// Extracts `foo` from serde's "missing field `foo`" message.
fn missing_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_toml("version = 1\n").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
version = 1
[log]
level = "debug"
[control]
socket = "/tmp/x.sock"
admin_group = "wheel"
max_frame_bytes = 4096
[metrics]
listen = "127.0.0.1:9999"
[storage]
required = true
[paths]
data_dir = "/srv/data"
[shutdown]
timeout_secs = 5
"#,
        )
        .unwrap();
        assert_eq!(c.control.admin_group, "wheel");
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert!(c.storage.required);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("version = 1\n[control]\nsockett = \"/x\"\n").unwrap_err();
        assert_eq!(e.key, "control.sockett");
        assert!(e.to_string().contains("control.sockett"), "{e}");
        let e = Config::from_toml("version = 1\nbogus = 3\n").unwrap_err();
        assert_eq!(e.key, "bogus");
        let e = Config::from_toml("version = 1\n[nope]\n").unwrap_err();
        assert_eq!(e.key, "nope");
    }

    #[test]
    fn wrong_type_is_named() {
        let e =
            Config::from_toml("version = 1\n[control]\nmax_connections = \"many\"\n").unwrap_err();
        assert_eq!(e.key, "control.max_connections");
        assert!(e.message.contains("invalid type"), "{e}");
        let e =
            Config::from_toml("version = 1\n[metrics]\nlisten = \"not an address\"\n").unwrap_err();
        assert_eq!(e.key, "metrics.listen");
    }

    #[test]
    fn invalid_values_are_named() {
        let e = Config::from_toml("version = 2\n").unwrap_err();
        assert_eq!(e.key, "version");
        let e = Config::from_toml("").unwrap_err();
        assert_eq!(e.key, "version");
        let e =
            Config::from_toml("version = 1\n[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap_err();
        assert_eq!(e.key, "metrics.listen");
        let e = Config::from_toml("version = 1\n[control]\nmax_frame_bytes = 1\n").unwrap_err();
        assert_eq!(e.key, "control.max_frame_bytes");
        let e = Config::from_toml("version = 1\n[paths]\ndata_dir = \"relative\"\n").unwrap_err();
        assert_eq!(e.key, "paths.data_dir");
        let e = Config::from_toml("version = 1\n[shutdown]\ntimeout_secs = 0\n").unwrap_err();
        assert_eq!(e.key, "shutdown.timeout_secs");
    }

    #[test]
    fn bus_and_cache_sections() {
        let c = Config::from_toml(
            "version = 1\n[bus]\nfsync = \"always\"\nslow_consumer = \"drop-oldest\"\ndurable_subjects = [\"a.*.b\", \"c.>\"]\n[cache]\nmax_bytes = 16777216\n[cache.agent_ttl_secs]\nsummariser = 60\n",
        )
        .unwrap();
        assert_eq!(c.bus.fsync, FsyncMode::Always);
        assert_eq!(c.bus.slow_consumer, SlowConsumerPolicy::DropOldest);
        assert_eq!(c.cache.agent_ttl_secs.get("summariser"), Some(&60));
        let e = Config::from_toml("version = 1\n[bus]\nfsync = \"sometimes\"\n").unwrap_err();
        assert_eq!(e.key, "bus.fsync");
        let e =
            Config::from_toml("version = 1\n[bus]\ndurable_subjects = [\"ok.>\", \"bad..x\"]\n")
                .unwrap_err();
        assert_eq!(e.key, "bus.durable_subjects[1]");
        let e =
            Config::from_toml("version = 1\n[bus]\ndurable_subjects = [\"a.>.b\"]\n").unwrap_err();
        assert_eq!(e.key, "bus.durable_subjects[0]");
        let e =
            Config::from_toml("version = 1\n[cache]\nlisten = \"192.168.1.2:6379\"\n").unwrap_err();
        assert_eq!(e.key, "cache.listen");
        let e = Config::from_toml("version = 1\n[cache]\nmax_value_bytes = 0\n").unwrap_err();
        assert_eq!(e.key, "cache.max_value_bytes");
        let e = Config::from_toml("version = 1\n[cache.agent_ttl_secs]\nx = 0\n").unwrap_err();
        assert_eq!(e.key, "cache.agent_ttl_secs.x");
        let e = Config::from_toml("version = 1\n[sync]\npublic_address = \"nas\"\n").unwrap_err();
        assert_eq!(e.key, "sync.public_address");
        let c = Config::from_toml("version = 1\n[sync]\npublic_address = \"nas.local:7443\"\n")
            .unwrap();
        assert_eq!(c.sync.public_address.as_deref(), Some("nas.local:7443"));
        let e = Config::from_toml("version = 1\n[cache]\nmax_bytes = \"big\"\n").unwrap_err();
        assert_eq!(e.key, "cache.max_bytes");
        let r = Config::default().resolve(Some(Path::new("/s")));
        assert_eq!(r.bus_listen.unwrap().port(), 0);
        assert_eq!(r.cache_listen.unwrap().port(), 0);
        let r = Config::default().resolve(None);
        assert_eq!(r.bus_listen.unwrap().port(), DEFAULT_NATS_PORT);
        assert_eq!(r.cache_listen.unwrap().port(), DEFAULT_RESP_PORT);
        assert_eq!(r.sync_listen.unwrap().port(), DEFAULT_SYNC_PORT);
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = Config::from_toml("version = = 1").unwrap_err();
        assert!(e.message.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn resolve_under_state_dir_and_production() {
        let c = Config::default();
        let r = c.resolve(Some(Path::new("/tmp/s")));
        assert_eq!(r.control_socket, PathBuf::from("/tmp/s/control.sock"));
        assert_eq!(r.data_dir, PathBuf::from("/tmp/s/data"));
        assert_eq!(r.metrics_listen.unwrap().port(), 0);
        let r = c.resolve(None);
        assert_eq!(r.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(r.metrics_listen.unwrap().to_string(), DEFAULT_METRICS_ADDR);
        let mut c = Config::default();
        c.control.socket = Some("/elsewhere.sock".into());
        c.metrics.enabled = false;
        let r = c.resolve(Some(Path::new("/tmp/s")));
        assert_eq!(r.control_socket, PathBuf::from("/elsewhere.sock"));
        assert_eq!(r.metrics_listen, None);
    }
}
