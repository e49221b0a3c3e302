//! Start-up, the main loop and shutdown.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use appliance_types::config::Resolved;
use appliance_types::health::ComponentState;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::control;
use crate::health::HealthRegistry;
use crate::listen;
use crate::liveness;
use crate::logging::LogControl;
use crate::metrics::{self, Metrics};
use crate::notify::Notifier;
use crate::supervisor::{self, Endpoints, LoopState};

/// How long components may take to leave `starting` before the daemon
/// declares itself ready anyway (the ready probe then says who is late).
pub const STARTUP_GRACE: Duration = Duration::from_secs(30);

fn ensure_dir(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(path)
        .with_context(|| format!("cannot create directory {}", path.display()))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(resolved: Resolved, log: Option<LogControl>) -> anyhow::Result<()> {
    let cfg = &resolved.config;
    let notifier = Notifier::from_env();
    let started = Instant::now();
    // Signals first, so a SIGTERM during start-up is not lost.
    let mut sigterm =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let health = HealthRegistry::default();
    let endpoints = Endpoints::default();
    let tick = supervisor::tick_interval(notifier.watchdog_timeout());
    let loop_state = LoopState::new(tick * 3 + Duration::from_secs(2));
    let mut probes = Vec::new();

    notifier.status("preparing directories");
    ensure_dir(&resolved.data_dir)?;
    ensure_dir(&resolved.log_dir)?;

    // Control socket.
    notifier.status("binding the control socket");
    let admin_gid = control::group_gid(&cfg.control.admin_group).with_context(|| {
        format!(
            "cannot look up control.admin_group {:?}",
            cfg.control.admin_group
        )
    })?;
    if admin_gid.is_none() {
        warn!(group = %cfg.control.admin_group, "control.admin_group does not exist; only root and the daemon's user may change the appliance");
    }
    let socket_gid = match &cfg.control.socket_group {
        None => None,
        Some(name) => Some(control::group_gid(name)?.with_context(|| {
            format!("config key `control.socket_group`: group {name:?} does not exist")
        })?),
    };
    let settings = control::Settings {
        path: resolved.control_socket.clone(),
        max_frame: cfg.control.max_frame_bytes,
        max_connections: cfg.control.max_connections,
        idle_timeout: Duration::from_secs(cfg.control.idle_timeout_secs),
        daemon_uid: nix::unistd::getuid().as_raw(),
        admin_gid,
        socket_gid,
    };
    let listener = control::bind(&settings)?;
    endpoints.set("control", resolved.control_socket.display().to_string());

    // Metrics.
    let metrics = Metrics::new(health.clone());
    let metrics_listener = match resolved.metrics_listen {
        Some(addr) => {
            notifier.status("binding the metrics endpoint");
            Some(listen::tcp(&endpoints, "metrics", addr, "metrics.listen").await?)
        }
        None => None,
    };

    // The event bus and its NATS endpoint.
    notifier.status("opening the event bus");
    let bus = crate::bus::open(&cfg.bus, &resolved.data_dir).await?;
    metrics.with_registry(|r| {
        r.register_collector(Box::new(crate::bus::BusCollector::new(bus.clone())));
    });
    let nats_listener = match resolved.bus_listen {
        Some(addr) => {
            notifier.status("binding the NATS endpoint");
            Some(listen::tcp(&endpoints, "bus_nats", addr, "bus.listen").await?)
        }
        None => None,
    };
    let nats_unix = match &cfg.bus.unix_socket {
        Some(path) => Some(listen::unix(
            &endpoints,
            "bus_nats_unix",
            path,
            "bus.unix_socket",
        )?),
        None => None,
    };

    // The agent response cache and its RESP endpoint. A cache that cannot
    // open its log is reported as failed; the daemon serves on without it.
    notifier.status("opening the agent response cache");
    let cache_health = health.register("cache", false);
    let cache = match crate::cache::open(&cfg.cache, &resolved.data_dir).await {
        Ok(c) => {
            metrics.with_registry(|r| {
                r.register_collector(Box::new(crate::cache::CacheCollector::new(c.clone())));
            });
            Some(c)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the agent response cache is unavailable");
            cache_health.set(ComponentState::Failed, format!("{e:#}"));
            None
        }
    };
    let resp_listener = match (resolved.cache_listen, &cache) {
        (Some(addr), Some(_)) => {
            notifier.status("binding the RESP endpoint");
            Some(listen::tcp(&endpoints, "cache_resp", addr, "cache.listen").await?)
        }
        _ => None,
    };

    // The QUIC sync endpoint starts in its component task, once its
    // documents directory exists.
    let sync_slot = crate::sync::SyncSlot::default();

    // The storage manager (real ZFS, or the simulator).
    notifier.status("starting the storage manager");
    let storage = crate::storage::start(&cfg.storage, &resolved.data_dir, &bus);
    // Uploads ask the storage manager whether the documents' pool takes
    // writes (admission.rs); the storage task keeps the gate current.
    let gate = crate::admission::StorageGate::new(crate::sync::documents_dir(
        &cfg.sync,
        &resolved.data_dir,
    ));
    metrics.with_registry(|r| {
        r.register_collector(Box::new(crate::storage::StorageCollector::new(&storage)));
    });

    // Start the components.
    notifier.status("starting components");
    let ctx = control::Context {
        health: health.clone(),
        endpoints: endpoints.clone(),
        loop_state: loop_state.clone(),
        log,
        started,
        bus: Some(bus.clone()),
        cache: cache.clone(),
        sync: sync_slot.clone(),
        storage: Some(storage.clone()),
    };
    {
        let h = health.register("control", true);
        let (p, r) = liveness::pair("control");
        probes.push(p);
        tracker.spawn(control::serve(
            listener,
            settings,
            ctx,
            h,
            r,
            shutdown.clone(),
        ));
    }
    if let Some(l) = metrics_listener {
        let h = health.register("metrics", false);
        let (p, r) = liveness::pair("metrics");
        probes.push(p);
        tracker.spawn(metrics::serve(l, metrics.clone(), h, r, shutdown.clone()));
    }
    {
        let h = health.register("bus", true);
        let (p, r) = liveness::pair("bus");
        probes.push(p);
        let every = Duration::from_secs(cfg.bus.heartbeat_secs);
        tracker.spawn(crate::bus::run(
            bus.clone(),
            every,
            health.clone(),
            h,
            started,
            r,
            shutdown.clone(),
        ));
        let opts = crate::bus::server_options(&cfg.bus);
        if let Some(l) = nats_listener {
            let (bus, opts, shutdown) = (bus.clone(), opts.clone(), shutdown.clone());
            tracker.spawn(async move {
                if let Err(e) = appliance_bus::server::serve(bus, l, opts, shutdown).await {
                    tracing::error!(error = %e, "the NATS endpoint stopped");
                }
            });
        }
        if let Some(l) = nats_unix {
            let (bus, shutdown) = (bus.clone(), shutdown.clone());
            tracker.spawn(async move {
                if let Err(e) = appliance_bus::server::serve_unix(bus, l, opts, shutdown).await {
                    tracing::error!(error = %e, "the NATS Unix endpoint stopped");
                }
            });
        }
    }
    if let Some(cache) = &cache {
        let (p, r) = liveness::pair("cache");
        probes.push(p);
        let every = Duration::from_secs(cfg.cache.stats_secs);
        tracker.spawn(crate::cache::run(
            cache.clone(),
            bus.clone(),
            every,
            cache_health.clone(),
            r,
            shutdown.clone(),
        ));
        let server_cfg = crate::cache::server_config(&cfg.cache);
        // The RESP server also runs the cache's maintenance (expiry, interval
        // fsync, compaction); without an endpoint the daemon runs it itself.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        {
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                shutdown.cancelled().await;
                let _ = stop_tx.send(true);
            });
        }
        if let Some(path) = &cfg.cache.unix_socket {
            let l = listen::unix(&endpoints, "cache_resp_unix", path, "cache.unix_socket")?;
            let (cache, cfg2, shutdown) = (cache.clone(), server_cfg.clone(), shutdown.clone());
            tracker.spawn(async move {
                if let Err(e) =
                    appliance_cache::serve_unix(l, cache, cfg2, shutdown.cancelled_owned()).await
                {
                    tracing::error!(error = %e, "the RESP Unix endpoint stopped");
                }
            });
        }
        match resp_listener {
            Some(l) => {
                let (cache, shutdown) = (cache.clone(), shutdown.clone());
                tracker.spawn(async move {
                    if let Err(e) =
                        appliance_cache::serve(l, cache, server_cfg, shutdown.cancelled_owned())
                            .await
                    {
                        tracing::error!(error = %e, "the RESP endpoint stopped");
                    }
                });
            }
            None => {
                tracker.spawn(appliance_cache::maintenance_loop(
                    cache.clone(),
                    server_cfg.maintenance_interval,
                    stop_rx,
                ));
            }
        }
    }
    if let Some(listen) = resolved.sync_listen {
        let h = health.register("sync", true);
        let (p, r) = liveness::pair("sync");
        probes.push(p);
        tracker.spawn(crate::sync::run(
            cfg.sync.clone(),
            listen,
            resolved.data_dir.clone(),
            bus.clone(),
            gate.clone(),
            storage.manager.clone(),
            sync_slot.clone(),
            endpoints.clone(),
            h,
            r,
            shutdown.clone(),
        ));
    }
    {
        let h = health.register("storage", cfg.storage.required);
        let (p, r) = liveness::pair("storage");
        probes.push(p);
        tracker.spawn(crate::storage::run(
            storage.clone(),
            gate.clone(),
            cfg.storage.zfs_device.clone(),
            h,
            r,
            shutdown.clone(),
        ));
    }

    // Wait for every component to leave `starting` (a stop request during
    // start-up is honoured at once).
    let deadline = Instant::now() + STARTUP_GRACE;
    let mut stop_during_startup = None;
    loop {
        let late: Vec<String> = health
            .snapshot()
            .into_iter()
            .filter(|c| c.state == ComponentState::Starting)
            .map(|c| c.name)
            .collect();
        if late.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            warn!(?late, "components still starting after the grace period");
            break;
        }
        notifier.status(&format!("waiting for {}", late.join(", ")));
        tokio::select! {
            _ = sigterm.recv() => { stop_during_startup = Some("SIGTERM"); break; }
            _ = sigint.recv() => { stop_during_startup = Some("SIGINT"); break; }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // Prove liveness once before READY, so the live probe is true from the start.
    let failures = supervisor::tick(&probes, tick / 2, &notifier, &loop_state).await;
    let summary: Vec<String> = health
        .snapshot()
        .iter()
        .map(|c| format!("{}={}", c.name, c.state))
        .collect();
    let status = format!("ready: {}", summary.join(" "));
    notifier.ready(&status);
    info!(
        control = %resolved.control_socket.display(),
        endpoints = ?endpoints.snapshot(),
        startup_ms = started.elapsed().as_millis(),
        liveness_failures = failures.len(),
        "applianced ready"
    );

    // The main loop.
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal_name = loop {
        if let Some(s) = stop_during_startup {
            break s;
        }
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = interval.tick() => {
                supervisor::tick(&probes, tick / 2, &notifier, &loop_state).await;
            }
        }
    };

    // Shutdown.
    info!(signal = signal_name, "shutting down");
    notifier.stopping();
    shutdown.cancel();
    tracker.close();
    let limit = Duration::from_secs(cfg.shutdown.timeout_secs);
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        warn!(?limit, "in-flight work did not finish in time; aborting it");
    }
    let _ = std::fs::remove_file(&resolved.control_socket);
    info!("stopped");
    Ok(())
}
