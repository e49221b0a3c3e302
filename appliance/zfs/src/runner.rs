//! The real [`Zfs`] implementation: runs `zpool`/`zfs` as child processes.
//!
//! * Binaries are absolute paths checked at construction
//!   ([`ZfsRunner::new`] names the missing one).
//! * Machine-readable output: `-j --json-int` (OpenZFS ≥ 2.3, the default)
//!   or `-Hp` / `status -p` ([`OutputFormat::Text`], OpenZFS 2.1).
//! * Every call has a timeout. On a suspended pool commands sleep in D
//!   state and ignore signals, so on timeout the runner sends SIGKILL to
//!   the child's process group, returns [`ZfsError::Timeout`] at once, and
//!   drops the child; tokio reaps it whenever it finally exits. Nothing
//!   ever awaits a hung child.
//! * `LC_ALL=C` so stderr is the English libzfs wording that
//!   [`FailureKind::classify`] matches; stdout and stderr are read with a
//!   size limit.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::api::{
    validate_dataset_name, validate_device, validate_pool_name, DatasetSpec, EventFollower,
    PoolSpec, ScrubAction, Zfs, EVENT_CHANNEL_CAPACITY,
};
use crate::error::{FailureKind, ZfsError};
use crate::model::{Dataset, Pool, PoolStatus, Properties, DATASET_COLUMNS};
use crate::parse::events::EventStreamParser;
use crate::parse::{json, text, ParseError, MAX_OUTPUT_BYTES};

/// Which output format to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// `-j --json-int` (OpenZFS 2.3+).
    Json,
    /// `-Hp` and `zpool status -p` (OpenZFS 2.1).
    Text,
}

/// Runner configuration.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Absolute path of `zpool` (Debian: `/usr/sbin/zpool`).
    pub zpool: PathBuf,
    /// Absolute path of `zfs` (Debian: `/usr/sbin/zfs`).
    pub zfs: PathBuf,
    /// Output format.
    pub format: OutputFormat,
    /// Timeout for queries (status, list, get). Healthy pools answer in
    /// milliseconds; 30 s leaves room for a loaded TCG guest and still
    /// reports a hung pool well within a health-probe period.
    pub query_timeout: Duration,
    /// Timeout for changes (create, set, scrub, replace, clear). `zpool
    /// create` labels every disk and may wait for udev; 120 s.
    pub change_timeout: Duration,
    /// Most stdout bytes accepted per call.
    pub max_output: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            zpool: PathBuf::from("/usr/sbin/zpool"),
            zfs: PathBuf::from("/usr/sbin/zfs"),
            format: OutputFormat::Json,
            query_timeout: Duration::from_secs(30),
            change_timeout: Duration::from_secs(120),
            max_output: MAX_OUTPUT_BYTES,
        }
    }
}

/// Most stderr bytes kept (messages are a few lines).
const MAX_STDERR: usize = 64 * 1024;

/// Read size for the event follower.
const EVENT_READ_CHUNK: usize = 8 * 1024;

/// The real runner.
#[derive(Debug, Clone)]
pub struct ZfsRunner {
    cfg: RunnerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bin {
    Zpool,
    Zfs,
}

fn check_binary(name: &'static str, path: &Path) -> Result<(), ZfsError> {
    let err = |reason: &str| ZfsError::MissingBinary {
        name,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.is_absolute() {
        return Err(err("not an absolute path"));
    }
    let meta = std::fs::metadata(path).map_err(|e| err(&e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not executable"));
    }
    Ok(())
}

/// Reads at most `limit` bytes; `Err(())` if there was more.
async fn read_limited<R: AsyncRead + Unpin>(r: Option<R>, limit: usize) -> Result<Vec<u8>, ()> {
    let Some(r) = r else { return Ok(Vec::new()) };
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    match r.take(cap).read_to_end(&mut buf).await {
        Ok(_) if buf.len() > limit => Err(()),
        Ok(_) => Ok(buf),
        // A read error (EIO on the pipe) ends the output; the exit status
        // still decides success.
        Err(_) => Ok(buf),
    }
}

fn kill_group(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // The child leads its own process group (process_group(0)), so
        // this also reaches anything it forked. Errors mean it is gone.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

impl ZfsRunner {
    /// Checks both binaries (absolute, existing, executable) and builds the
    /// runner.
    pub fn new(cfg: RunnerConfig) -> Result<Self, ZfsError> {
        check_binary("zpool", &cfg.zpool)?;
        check_binary("zfs", &cfg.zfs)?;
        Ok(Self { cfg })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RunnerConfig {
        &self.cfg
    }

    fn path(&self, bin: Bin) -> &Path {
        match bin {
            Bin::Zpool => &self.cfg.zpool,
            Bin::Zfs => &self.cfg.zfs,
        }
    }

    fn command_line(&self, bin: Bin, args: &[String]) -> String {
        let mut s = self.path(bin).display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    fn command(&self, bin: Bin, args: &[String]) -> Command {
        let mut cmd = Command::new(self.path(bin));
        cmd.args(args.iter().map(OsString::from))
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        cmd
    }

    /// Runs one command to completion within `timeout`; returns stdout.
    async fn run(&self, bin: Bin, args: &[String], timeout: Duration) -> Result<String, ZfsError> {
        let command = self.command_line(bin, args);
        let mut child = self
            .command(bin, args)
            .spawn()
            .map_err(|e| ZfsError::Spawn {
                command: command.clone(),
                message: e.to_string(),
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let limit = self.cfg.max_output;
        let outcome = {
            let child_ref = &mut child;
            let work = async move {
                let out = read_limited(stdout, limit).await;
                if out.is_err() {
                    kill_group(child_ref);
                }
                let err = read_limited(stderr, MAX_STDERR).await;
                let status = child_ref.wait().await;
                (out, err, status)
            };
            tokio::time::timeout(timeout, work).await
        };
        let Ok((out, err, status)) = outcome else {
            kill_group(&child);
            let _ = child.start_kill();
            tracing::warn!(%command, ?timeout, "zfs command timed out; killed");
            return Err(ZfsError::Timeout {
                command,
                after: timeout,
            });
        };
        let status = status.map_err(|e| ZfsError::Spawn {
            command: command.clone(),
            message: e.to_string(),
        })?;
        let Ok(out) = out else {
            return Err(ZfsError::OutputTooLarge { command, limit });
        };
        let stderr_text = match err {
            Ok(e) => String::from_utf8_lossy(&e).trim().to_owned(),
            Err(()) => "(stderr over 64 KiB, not kept)".to_owned(),
        };
        if !status.success() {
            return Err(ZfsError::Failed {
                kind: FailureKind::classify(&stderr_text, bin == Bin::Zpool),
                command,
                exit_code: status.code(),
                stderr: stderr_text,
            });
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    async fn query<T>(
        &self,
        bin: Bin,
        args: &[&str],
        parse: impl FnOnce(&str) -> Result<T, ParseError>,
    ) -> Result<T, ZfsError> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let out = self.run(bin, &args, self.cfg.query_timeout).await?;
        parse(&out).map_err(|source| ZfsError::Parse {
            command: self.command_line(bin, &args),
            source,
        })
    }

    async fn change(&self, bin: Bin, args: Vec<String>) -> Result<(), ZfsError> {
        self.run(bin, &args, self.cfg.change_timeout)
            .await
            .map(|_| ())
    }

    fn json(&self) -> bool {
        self.cfg.format == OutputFormat::Json
    }

    fn missing(&self, bin: Bin, args: &[&str], name: &str) -> ZfsError {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        ZfsError::MissingFromOutput {
            command: self.command_line(bin, &args),
            name: name.to_owned(),
        }
    }

    async fn get_props(&self, bin: Bin, props: &str, name: &str) -> Result<Properties, ZfsError> {
        let (args, what): (Vec<&str>, &'static str) = match (bin, self.json()) {
            (Bin::Zpool, true) => (vec!["get", "-j", "--json-int", props, name], ""),
            (Bin::Zfs, true) => (vec!["get", "-j", "--json-int", props, name], ""),
            (Bin::Zpool, false) => (vec!["get", "-Hp", props, name], "zpool get -Hp"),
            (Bin::Zfs, false) => (vec!["get", "-Hp", props, name], "zfs get -Hp"),
        };
        let json = self.json();
        let list = self
            .query(bin, &args, |s| match (bin, json) {
                (Bin::Zpool, true) => json::parse_zpool_get(s),
                (Bin::Zfs, true) => json::parse_zfs_get(s),
                (_, false) => text::parse_get(what, s),
            })
            .await?;
        list.into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| self.missing(bin, &args, name))
    }
}

#[async_trait]
impl Zfs for ZfsRunner {
    async fn pool_status(&self, pool: &str) -> Result<PoolStatus, ZfsError> {
        validate_pool_name(pool)?;
        let args: Vec<&str> = if self.json() {
            vec!["status", "-j", "--json-int", pool]
        } else {
            vec!["status", "-p", pool]
        };
        let json = self.json();
        let pools = self
            .query(Bin::Zpool, &args, |s| {
                if json {
                    json::parse_zpool_status(s)
                } else {
                    text::parse_zpool_status(s)
                }
            })
            .await?;
        pools
            .into_iter()
            .find(|p| p.name == pool)
            .ok_or_else(|| self.missing(Bin::Zpool, &args, pool))
    }

    async fn pool_list(&self) -> Result<Vec<Pool>, ZfsError> {
        if self.json() {
            self.query(
                Bin::Zpool,
                &["list", "-j", "--json-int"],
                json::parse_zpool_list,
            )
            .await
        } else {
            self.query(Bin::Zpool, &["list", "-Hp"], text::parse_zpool_list)
                .await
        }
    }

    async fn pool_properties(&self, pool: &str) -> Result<Properties, ZfsError> {
        validate_pool_name(pool)?;
        self.get_props(Bin::Zpool, "all", pool).await
    }

    async fn dataset_list(&self, root: &str) -> Result<Vec<Dataset>, ZfsError> {
        validate_dataset_name(root)?;
        let cols = DATASET_COLUMNS.join(",");
        let types = "filesystem,volume";
        if self.json() {
            let args = [
                "list",
                "-j",
                "--json-int",
                "-r",
                "-t",
                types,
                "-o",
                &cols,
                root,
            ];
            self.query(Bin::Zfs, &args, json::parse_zfs_list).await
        } else {
            let args = ["list", "-Hp", "-r", "-t", types, "-o", &cols, root];
            self.query(Bin::Zfs, &args, |s| {
                text::parse_zfs_list(s, DATASET_COLUMNS)
            })
            .await
        }
    }

    async fn dataset_properties(&self, dataset: &str) -> Result<Properties, ZfsError> {
        validate_dataset_name(dataset)?;
        self.get_props(Bin::Zfs, "all", dataset).await
    }

    async fn create_pool(&self, spec: &PoolSpec) -> Result<(), ZfsError> {
        spec.validate()?;
        let mut args = vec!["create".to_owned()];
        if spec.force {
            args.push("-f".to_owned());
        }
        for (k, v) in &spec.pool_properties {
            args.push("-o".to_owned());
            args.push(format!("{k}={v}"));
        }
        for (k, v) in &spec.fs_properties {
            args.push("-O".to_owned());
            args.push(format!("{k}={v}"));
        }
        if let Some(m) = &spec.mountpoint {
            args.push("-m".to_owned());
            args.push(m.clone());
        }
        args.push(spec.name.clone());
        if let Some(k) = spec.layout.keyword() {
            args.push(k.to_owned());
        }
        args.extend(spec.disks.iter().cloned());
        self.change(Bin::Zpool, args).await
    }

    async fn create_dataset(&self, spec: &DatasetSpec) -> Result<(), ZfsError> {
        spec.validate()?;
        // `-u`: never mount here. libzfs mounts only as uid 0, and the
        // daemon runs unprivileged in its own mount namespace; the appliance
        // mounts datasets as root in the host namespace (`zfs mount -l -a`,
        // see systemd/appliance-zfs-mount.service). Found on the image's first boot.
        let mut args = vec!["create".to_owned(), "-u".to_owned()];
        for (k, v) in spec.all_properties() {
            args.push("-o".to_owned());
            args.push(format!("{k}={v}"));
        }
        args.push(spec.name.clone());
        self.change(Bin::Zfs, args).await
    }

    async fn set_quota(&self, dataset: &str, quota: Option<u64>) -> Result<(), ZfsError> {
        validate_dataset_name(dataset)?;
        let value = quota.map_or_else(|| "none".to_owned(), |q| q.to_string());
        self.change(
            Bin::Zfs,
            vec![
                "set".to_owned(),
                format!("quota={value}"),
                dataset.to_owned(),
            ],
        )
        .await
    }

    async fn get_quota(&self, dataset: &str) -> Result<Option<u64>, ZfsError> {
        validate_dataset_name(dataset)?;
        let props = self.get_props(Bin::Zfs, "quota", dataset).await?;
        match props.get("quota") {
            None => Err(self.missing(Bin::Zfs, &["get", "quota", dataset], "quota")),
            Some("0" | "none" | "-") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| ZfsError::Parse {
                command: self.command_line(Bin::Zfs, &["get".to_owned(), "quota".to_owned()]),
                source: ParseError::Field {
                    what: "zfs get quota",
                    object: dataset.to_owned(),
                    field: "quota".to_owned(),
                    reason: format!("not an integer: {v:?}"),
                },
            }),
        }
    }

    async fn scrub(&self, pool: &str, action: ScrubAction) -> Result<(), ZfsError> {
        validate_pool_name(pool)?;
        let mut args = vec!["scrub".to_owned()];
        match action {
            ScrubAction::Start => {}
            ScrubAction::Pause => args.push("-p".to_owned()),
            ScrubAction::Stop => args.push("-s".to_owned()),
        }
        args.push(pool.to_owned());
        self.change(Bin::Zpool, args).await
    }

    async fn replace(&self, pool: &str, old: &str, new: &str) -> Result<(), ZfsError> {
        validate_pool_name(pool)?;
        // `old` may be a vdev name or GUID as zpool status prints it.
        if old.is_empty() || old.starts_with('-') || old.chars().any(char::is_control) {
            return Err(ZfsError::InvalidArgument {
                what: "device",
                value: old.to_owned(),
                reason: "must be a device path, vdev name or GUID".to_owned(),
            });
        }
        validate_device(new)?;
        let args = ["replace", pool, old, new].map(str::to_owned).to_vec();
        self.change(Bin::Zpool, args).await
    }

    async fn clear(&self, pool: &str, device: Option<&str>) -> Result<(), ZfsError> {
        validate_pool_name(pool)?;
        let mut args = vec!["clear".to_owned(), pool.to_owned()];
        if let Some(d) = device {
            if d.is_empty() || d.starts_with('-') || d.chars().any(char::is_control) {
                return Err(ZfsError::InvalidArgument {
                    what: "device",
                    value: d.to_owned(),
                    reason: "must be a device path, vdev name or GUID".to_owned(),
                });
            }
            args.push(d.to_owned());
        }
        self.change(Bin::Zpool, args).await
    }

    async fn follow_events(&self) -> Result<EventFollower, ZfsError> {
        let args = ["events", "-f", "-H", "-v"].map(str::to_owned).to_vec();
        let command = self.command_line(Bin::Zpool, &args);
        let mut child = self
            .command(Bin::Zpool, &args)
            .spawn()
            .map_err(|e| ZfsError::Spawn {
                command: command.clone(),
                message: e.to_string(),
            })?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let task = tokio::spawn(async move {
            let mut parser = EventStreamParser::new(true);
            let mut stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let mut buf = vec![0u8; EVENT_READ_CHUNK];
            let reason = loop {
                let Some(out) = stdout.as_mut() else {
                    break "no stdout".to_owned();
                };
                match out.read(&mut buf).await {
                    Ok(0) => break "end of output".to_owned(),
                    Ok(n) => {
                        for item in parser.push_bytes(&buf[..n]) {
                            let item = item.map_err(|source| ZfsError::Parse {
                                command: command.clone(),
                                source,
                            });
                            if tx.send(item).await.is_err() {
                                return; // follower dropped; child killed on drop
                            }
                        }
                    }
                    Err(e) => break format!("read error: {e}"),
                }
            };
            if let Some(item) = parser.finish() {
                let _ = tx.send(Ok(item)).await;
            }
            kill_group(&child);
            let err =
                tokio::time::timeout(Duration::from_secs(5), read_limited(stderr, MAX_STDERR))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let _ = tx
                .send(Err(ZfsError::EventStreamEnded {
                    reason: format!(
                        "`{command}`: {reason}; status {status:?}; stderr: {}",
                        String::from_utf8_lossy(&err).trim()
                    ),
                }))
                .await;
        });
        Ok(EventFollower::new(rx, Some(task)))
    }
}
