//! What the scenario tests (issue 8) share: a provisioned appliance booted
//! fresh for one test, checks that fail with the console and journal tails,
//! bus events read back through `appliancectl events replay`, disks pulled and
//! added over QMP, and the host-side `appliance-sync` client.
//!
//! Every test gets its own run directory (`hw-tests/out/<name>`) with fresh
//! data disks, so scenarios never depend on each other.
//!
//! Its checks panic on purpose: this is assertion code for `#[test]`s, and a
//! panic with the guest's console and journal tails is how a test fails.
#![allow(clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::agent::ExecOutput;
use crate::image::{ensure_image, repo_root, run_dir};
use crate::vm::{data_disk_serial, Vm, VmConfig, FIRST_BAY_SLOT};

/// Boot to ready, first boot included (pool creation under TCG).
pub const READY_TIMEOUT: Duration = Duration::from_secs(900);
/// One ordinary command in the guest.
pub const CMD: Duration = Duration::from_secs(60);

/// The pool first boot creates (image/rootfs appliance-firstboot).
pub const POOL: &str = "tank";

/// A booted, provisioned appliance under test.
#[derive(Debug)]
pub struct Appliance {
    pub vm: Vm,
    pub cfg: VmConfig,
    /// How long the boot took until `appliancectl health ready` passed.
    pub boot_to_ready: Duration,
    /// Disk files created by [`Appliance::hotplug_disk`], by bay.
    added: Vec<(usize, PathBuf)>,
}

impl Appliance {
    /// Builds the image if needed, boots it with six blank disks in a fresh
    /// `hw-tests/out/<name>` and waits until the daemon is ready (first boot
    /// provisions the pool).
    pub fn boot(name: &str) -> Self {
        let image = ensure_image().unwrap_or_else(|e| panic!("{e:#}"));
        Self::boot_with(VmConfig::new(image, run_dir(name)))
    }

    /// Boots `cfg` and waits until the daemon is ready.
    pub fn boot_with(cfg: VmConfig) -> Self {
        let mut vm = Vm::start(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
        let boot_to_ready = match vm.wait_ready(READY_TIMEOUT) {
            Ok(t) => t,
            Err(e) => {
                let diag = vm.diagnostics();
                panic!("{e:#}\n{diag}");
            }
        };
        eprintln!(
            "{}: ready {:.1} s after QEMU started",
            cfg.run_dir.display(),
            boot_to_ready.as_secs_f64()
        );
        Self {
            vm,
            cfg,
            boot_to_ready,
            added: Vec::new(),
        }
    }

    /// Powers off cleanly and boots the same disks again (the disk files of
    /// bays pulled with [`Appliance::unplug_disk`] are still in place, so
    /// this restores them).
    pub fn reboot(self) -> Self {
        let mut cfg = self.cfg.clone();
        self.vm
            .shutdown(Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("{e:#}"));
        cfg.fresh = false;
        Self::boot_with(cfg)
    }

    /// Powers off cleanly and returns the configuration to boot the same
    /// disks again with [`Appliance::boot_with`] (for changes to the disk
    /// files while the machine is off).
    pub fn power_off(self) -> VmConfig {
        let mut cfg = self.cfg.clone();
        self.vm
            .shutdown(Duration::from_secs(240))
            .unwrap_or_else(|e| panic!("{e:#}"));
        cfg.fresh = false;
        cfg
    }

    /// Pulls the plug (SIGKILL to QEMU) and boots the same disks again.
    pub fn power_cycle(self) -> Self {
        let mut cfg = self.cfg.clone();
        self.vm.kill().unwrap_or_else(|e| panic!("{e:#}"));
        cfg.fresh = false;
        Self::boot_with(cfg)
    }

    /// Panics with `what`, the console tail and the journal tail.
    pub fn fail(&mut self, what: &str) -> ! {
        let diag = self.vm.diagnostics();
        panic!("{what}\n{diag}");
    }

    /// Panics (with diagnostics) unless `ok`.
    pub fn ensure(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let what = what();
            self.fail(&what);
        }
    }

    /// Runs a guest command that must exit 0 within [`CMD`]; returns stdout.
    pub fn run(&mut self, script: &str) -> String {
        self.run_for(script, CMD)
    }

    /// Like [`Appliance::run`] with its own time limit.
    pub fn run_for(&mut self, script: &str, timeout: Duration) -> String {
        match self.vm.sh_ok(script, timeout) {
            Ok(out) => out,
            Err(e) => self.fail(&format!("{e:#}")),
        }
    }

    /// Runs a guest command whatever its exit code; fails only if it could
    /// not be run or did not finish within `timeout`.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> ExecOutput {
        match self.vm.sh(script, timeout) {
            Ok(out) => out,
            Err(e) => self.fail(&format!("{e:#}")),
        }
    }

    /// A guest command's stdout parsed as JSON.
    pub fn json(&mut self, script: &str) -> Value {
        let out = self.run(script);
        match serde_json::from_str(&out) {
            Ok(v) => v,
            Err(e) => self.fail(&format!("`{script}` printed no JSON ({e}):\n{out}")),
        }
    }

    /// Every stored message of the durable subjects matching `pattern`, in
    /// order (`appliancectl events replay PATTERN --from-seq 0 --json`).
    /// Each is `{subject, seq, ts_ms, time, data}`.
    pub fn events(&mut self, pattern: &str) -> Vec<Value> {
        let v = self.json(&format!(
            "appliancectl --json events replay '{pattern}' --from-seq 0 --limit 100000"
        ));
        match v {
            Value::Array(a) => a,
            other => self.fail(&format!("events replay printed {other}")),
        }
    }

    /// The bus's next sequence number: events published after this call
    /// have a larger `seq`.
    pub fn last_seq(&mut self, pattern: &str) -> u64 {
        self.events(pattern)
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Waits up to `timeout` for a message on `pattern` with `seq > after`
    /// that `pred` accepts; returns it and how long it took.
    pub fn wait_event(
        &mut self,
        pattern: &str,
        after: u64,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Duration) {
        let t0 = Instant::now();
        loop {
            let events = self.events(pattern);
            if let Some(m) = events
                .iter()
                .find(|m| m["seq"].as_u64().is_some_and(|s| s > after) && pred(m))
            {
                return (m.clone(), t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                let since = |events: &[Value]| -> Vec<String> {
                    events
                        .iter()
                        .filter(|m| m["seq"].as_u64().is_some_and(|s| s > after))
                        .map(|m| m.to_string())
                        .collect()
                };
                let seen = since(&events);
                // The newest 60 durable messages, whatever their subject and
                // sequence number: what the daemon said instead, including
                // what it may have said before `after`.
                let all: Vec<String> = self.events(">").iter().map(Value::to_string).collect();
                let all = &all[all.len().saturating_sub(60)..];
                self.fail(&format!(
                    "no {what} on {pattern} within {timeout:?}; seen since seq {after}:\n{}\n--- the newest 60 durable messages, any subject\n{}",
                    seen.join("\n"),
                    all.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The guest's clock in Unix milliseconds (bus `ts_ms` is on this clock).
    pub fn guest_ms(&mut self) -> u64 {
        let out = self.run("date +%s%3N");
        match out.trim().parse() {
            Ok(ms) => ms,
            Err(e) => self.fail(&format!("`date +%s%3N` printed {out:?}: {e}")),
        }
    }

    /// Writes `mib` MiB of random bytes to `path` in the guest, syncs, and
    /// returns their SHA-256 (computed while writing, not read back).
    pub fn write_known_data(&mut self, path: &str, mib: u64) -> String {
        let out = self.run_for(
            &format!("head -c {mib}M /dev/urandom | tee '{path}' | sha256sum && sync -f '{path}'"),
            Duration::from_secs(300),
        );
        out.split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// `appliancectl --json status`, which must answer within `timeout`
    /// (run under `timeout(1)` in the guest, so a hang is a failure, not a
    /// stuck test).
    pub fn status_within(&mut self, timeout: Duration) -> Value {
        let secs = timeout.as_secs().max(1);
        self.json(&format!("timeout {secs} appliancectl --json status"))
    }

    /// `appliancectl --json storage report`.
    pub fn report(&mut self) -> Value {
        self.json("appliancectl --json storage report")
    }

    /// Hot-unplugs the data disk in `bay` (QMP `device_del`, as pulling it
    /// from the box) and waits until QEMU has removed it.
    pub fn unplug_disk(&mut self, bay: usize) {
        let id = self.device_id(bay);
        let res = self.vm.qmp().and_then(|mut q| {
            q.execute("device_del", &json!({ "id": id }), Duration::from_secs(10))?;
            q.wait_event("DEVICE_DELETED", Duration::from_secs(120))
        });
        if let Err(e) = res {
            self.fail(&format!("unplugging bay {bay} ({id}): {e:#}"));
        }
    }

    /// Hot-adds a blank disk of `mib` MiB with serial `serial` into `bay`'s
    /// (empty) slot; returns its by-id path in the guest once it is there.
    pub fn hotplug_disk(&mut self, bay: usize, serial: &str, mib: u64) -> String {
        let file = self.vm.run_dir.join(format!("added-{serial}.qcow2"));
        let _ = fs::remove_file(&file);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg(format!("{mib}M"))
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => self.fail(&format!("qemu-img create {}: {other:?}", file.display())),
        }
        let node = format!("added{bay}-{}", self.added.len());
        let dev = format!("{node}dev");
        let slot = usize::from(FIRST_BAY_SLOT) + bay;
        let res = self.vm.qmp().and_then(|mut q| {
            q.execute(
                "blockdev-add",
                &json!({
                    "node-name": node,
                    "driver": "qcow2",
                    "file": { "driver": "file", "filename": file.to_string_lossy() },
                }),
                Duration::from_secs(10),
            )?;
            q.execute(
                "device_add",
                &json!({
                    "driver": "virtio-blk-pci",
                    "id": dev,
                    "drive": node,
                    "serial": serial,
                    "addr": format!("{slot:#04x}"),
                }),
                Duration::from_secs(10),
            )
        });
        if let Err(e) = res {
            self.fail(&format!("hot-adding {serial} into bay {bay}: {e:#}"));
        }
        self.added.push((bay, file));
        let by_id = format!("/dev/disk/by-id/virtio-{serial}");
        self.run(&format!(
            "for i in $(seq 1 120); do test -e {by_id} && exit 0; sleep 0.5; done; exit 1"
        ));
        by_id
    }

    /// Limits the disk now in `bay` to `bytes_per_sec` of reads and writes
    /// together (QMP `block_set_io_throttle`, on the host: a slow disk the
    /// guest cannot tell from a real one); 0 lifts the limit.
    pub fn throttle_disk(&mut self, bay: usize, bytes_per_sec: u64) {
        // The block backend is the virtio-blk-pci proxy's inner device.
        let id = format!("/machine/peripheral/{}/virtio-backend", self.device_id(bay));
        let res = self.vm.qmp().and_then(|mut q| {
            q.execute(
                "block_set_io_throttle",
                &json!({
                    "id": id,
                    "bps": bytes_per_sec,
                    "bps_rd": 0,
                    "bps_wr": 0,
                    "iops": 0,
                    "iops_rd": 0,
                    "iops_wr": 0,
                }),
                Duration::from_secs(10),
            )
        });
        if let Err(e) = res {
            self.fail(&format!(
                "throttling bay {bay} to {bytes_per_sec} B/s: {e:#}"
            ));
        }
    }

    /// The QEMU device id of the disk now in `bay`.
    fn device_id(&self, bay: usize) -> String {
        match self.added.iter().rposition(|(b, _)| *b == bay) {
            Some(i) => format!("added{bay}-{i}dev"),
            None => format!("baydev{bay}"),
        }
    }

    /// The guest's by-id path of the original disk in `bay`.
    pub fn disk_by_id(bay: usize) -> String {
        format!("/dev/disk/by-id/virtio-{}", data_disk_serial(bay))
    }

    /// The host file behind the original data disk in `bay`.
    pub fn disk_file(&self, bay: usize) -> PathBuf {
        self.vm.run_dir.join(format!("disk{bay}.qcow2"))
    }

    /// Enrolls sync client `name` (with an optional quota in bytes) and
    /// copies its identity bundle to the host (mode 0600); returns its path.
    pub fn enroll(&mut self, name: &str, quota: Option<u64>) -> PathBuf {
        let quota = quota.map(|q| format!(" --quota {q}")).unwrap_or_default();
        let guest = format!("/run/{name}.bundle");
        self.run(&format!(
            "appliancectl sync client add {name}{quota} --out {guest} >/dev/null && base64 -w0 {guest} >/dev/null"
        ));
        let b64 = self.run(&format!("base64 -w0 {guest} && rm -f {guest}"));
        let bytes = match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(b) => b,
            Err(e) => self.fail(&format!("bundle of {name} is not base64: {e}")),
        };
        let host = self.vm.run_dir.join(format!("{name}.bundle"));
        if let Err(e) = write_private(&host, &bytes) {
            self.fail(&format!("writing {}: {e:#}", host.display()));
        }
        host
    }

    /// `127.0.0.1:<forwarded sync port>`.
    pub fn sync_addr(&self) -> String {
        format!("127.0.0.1:{}", self.vm.forwards.sync_udp)
    }

    /// Runs the host's `appliance-sync` with `bundle` against the forwarded
    /// sync port.
    pub fn sync_cmd(&self, bundle: &Path, args: &[&str]) -> Result<Output> {
        Command::new(sync_client()?)
            .arg("--identity")
            .arg(bundle)
            .arg("--server")
            .arg(self.sync_addr())
            .args(args)
            .output()
            .context("running appliance-sync")
    }

    /// SHA-256 of a file in the guest (coreutils `sha256sum`; the image has
    /// no BLAKE3 tool), to compare with [`host_sha256`] of the source.
    pub fn sha256(&mut self, path: &str) -> String {
        let out = self.run_for(&format!("sha256sum '{path}'"), Duration::from_secs(300));
        out.split_whitespace().next().unwrap_or_default().to_owned()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The host's `appliance-sync` client: `target/release/appliance-sync`,
/// built (`cargo build --release -p appliance-sync`) on first use.
pub fn sync_client() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), PathBuf::from);
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "build",
                    "--release",
                    "-p",
                    "appliance-sync",
                    "--bin",
                    "appliance-sync",
                ])
                .current_dir(&root)
                .status()
                .map_err(|e| format!("running cargo: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build -p appliance-sync failed ({status})"));
            }
            Ok(target.join("release/appliance-sync"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Writes a file of `len` pseudo-random bytes (seeded, so reruns compare).
pub fn write_random_file(path: &Path, len: usize, seed: u64) -> Result<()> {
    use std::io::Write as _;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.sync_all()?;
    Ok(())
}

/// SHA-256 of a host file (`sha256sum`).
pub fn host_sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!("sha256sum {}: {:?}", path.display(), out);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
