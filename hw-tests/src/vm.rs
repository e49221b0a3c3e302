//! One appliance VM: QEMU under TCG booting the image from disk under OVMF.
//!
//! Machine layout (the udev bay map in udev/61-appliance-bays.rules matches
//! it):
//! - `pc` machine (i440fx: ACPI PCI hot-plug on bus 0, so a data disk can be
//!   pulled with QMP `device_del` and a blank one added in its slot);
//! - boot disk: a qcow2 overlay on the raw image (the image stays pristine),
//!   virtio-blk in PCI slot 0x05;
//! - data disk N: a sparse qcow2 file, virtio-blk in slot 0x10+N (bay N),
//!   `serial=` [`data_disk_serial`] (by-id `virtio-<serial>`);
//! - user-mode networking; only host 127.0.0.1 forwards: the sync UDP port
//!   and the metrics TCP port;
//! - serial console to `console.log`, QMP on `qmp.sock`, the guest agent on a
//!   virtio-serial port (`qga.sock`).
//!
//! `-accel tcg` always: KVM hangs on these machines.

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::agent::{Agent, ExecOutput};
use crate::qmp::Qmp;

/// The guest's sync (QUIC) UDP port that is forwarded: `sync.listen` of the
/// default config (`0.0.0.0:7443`, appliance-types `DEFAULT_SYNC_PORT`).
pub const GUEST_SYNC_PORT: u16 = 7443;
/// The guest port of the VM-only metrics forward (image unit
/// appliance-vm-metrics.socket -> 127.0.0.1:9464 in the guest).
pub const GUEST_METRICS_PORT: u16 = 19464;
/// PCI slot of data disk 0; disk N sits in slot `FIRST_BAY_SLOT + N`.
pub const FIRST_BAY_SLOT: u8 = 0x10;
/// Bays the bay map knows (slots 0x10..=0x17).
pub const MAX_BAYS: usize = 8;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The serial of data disk `index` (at most 20 bytes for virtio-blk).
pub fn data_disk_serial(index: usize) -> String {
    format!("APPLIANCE-DISK-{index}")
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The raw appliance image (never written).
    pub image: PathBuf,
    /// Holds the overlay, data disks, sockets and logs. Kept between boots
    /// of the same VM; [`VmConfig::fresh`] empties it first.
    pub run_dir: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub data_disks: usize,
    pub data_disk_mib: u64,
    /// Remove the run directory's disks before the first boot.
    pub fresh: bool,
}

impl VmConfig {
    /// Six data disks of 512 MiB, 1.5 GiB of RAM, 2 vCPUs, a fresh run
    /// directory.
    pub fn new(image: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            image,
            run_dir,
            memory_mib: 1536,
            cpus: 2,
            data_disks: 6,
            data_disk_mib: 512,
            fresh: true,
        }
    }
}

/// The host ends of the port forwards (all on 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwards {
    pub sync_udp: u16,
    pub metrics_tcp: u16,
}

/// A running VM. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    pub run_dir: PathBuf,
    pub forwards: Forwards,
    pub console_log: PathBuf,
    qmp_sock: PathBuf,
    qga_sock: PathBuf,
    agent: Option<Agent>,
    /// When QEMU was started: boot times are measured from here.
    pub started: Instant,
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("running qemu-img (apt-get install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

impl Vm {
    /// Prepares the run directory (overlay, data disks, OVMF variables) where
    /// missing, and starts QEMU.
    pub fn start(cfg: &VmConfig) -> Result<Self> {
        if cfg.data_disks > MAX_BAYS {
            bail!("at most {MAX_BAYS} data disks (bays) are mapped");
        }
        if !Path::new(OVMF_CODE).is_file() {
            bail!("{OVMF_CODE} missing (apt-get install ovmf)");
        }
        let image = fs::canonicalize(&cfg.image)
            .with_context(|| format!("image {}", cfg.image.display()))?;
        let dir = &cfg.run_dir;
        if cfg.fresh && dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = fs::canonicalize(dir)?;

        // The overlay's backing file is this run's own link to the image, so
        // an image rebuilt meanwhile (build.sh replaces it by rename) never
        // ends up under an overlay made for the old one when this VM boots
        // again. A copy where a hard link is not possible.
        let image = {
            let pinned = dir.join("image.raw");
            if !pinned.exists() && fs::hard_link(&image, &pinned).is_err() {
                fs::copy(&image, &pinned).with_context(|| {
                    format!("copying {} into the run directory", image.display())
                })?;
            }
            pinned
        };
        let overlay = dir.join("boot.qcow2");
        if !overlay.exists() {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                path_str(&image)?,
                path_str(&overlay)?,
            ])?;
        }
        let vars = dir.join("OVMF_VARS.fd");
        if !vars.exists() {
            fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS}"))?;
        }
        let mut disks = Vec::new();
        for i in 0..cfg.data_disks {
            let disk = dir.join(format!("disk{i}.qcow2"));
            if !disk.exists() {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    path_str(&disk)?,
                    &format!("{}M", cfg.data_disk_mib),
                ])?;
            }
            disks.push(disk);
        }

        let console_log = dir.join("console.log");
        if console_log.exists() {
            fs::rename(&console_log, dir.join("console.prev.log"))?;
        }
        let qmp_sock = dir.join("qmp.sock");
        let qga_sock = dir.join("qga.sock");
        for s in [&qmp_sock, &qga_sock] {
            let _ = fs::remove_file(s);
        }
        let forwards = Forwards {
            sync_udp: free_udp_port()?,
            metrics_tcp: free_tcp_port()?,
        };

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-name",
            "appliance",
            "-machine",
            "pc,accel=tcg",
            "-cpu",
            "max",
        ])
        .args([
            "-m",
            &cfg.memory_mib.to_string(),
            "-smp",
            &cfg.cpus.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        ])
        .args([
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", path_str(&vars)?),
        ])
        .args([
            "-drive",
            &format!(
                "if=none,id=bootdisk,format=qcow2,cache=unsafe,discard=unmap,file={}",
                path_str(&overlay)?
            ),
        ])
        .args([
            "-device",
            "virtio-blk-pci,drive=bootdisk,id=bootdev,addr=0x05,bootindex=0",
        ]);
        for (i, disk) in disks.iter().enumerate() {
            let slot = usize::from(FIRST_BAY_SLOT) + i;
            cmd.args([
                "-drive",
                &format!(
                    "if=none,id=bay{i},format=qcow2,cache=unsafe,discard=unmap,file={}",
                    path_str(disk)?
                ),
            ])
            .args([
                "-device",
                &format!(
                    "virtio-blk-pci,drive=bay{i},id=baydev{i},serial={},addr={slot:#04x}",
                    data_disk_serial(i)
                ),
            ]);
        }
        cmd.args([
            "-netdev",
            &format!(
                "user,id=net0,hostfwd=udp:127.0.0.1:{}-:{GUEST_SYNC_PORT},hostfwd=tcp:127.0.0.1:{}-:{GUEST_METRICS_PORT}",
                forwards.sync_udp, forwards.metrics_tcp
            ),
        ])
        .args(["-device", "virtio-net-pci,netdev=net0,addr=0x03"])
        .args(["-device", "virtio-rng-pci,addr=0x04"])
        .args(["-chardev", &format!("file,id=con0,path={}", path_str(&console_log)?)])
        .args(["-serial", "chardev:con0"])
        .args(["-chardev", &format!("socket,id=qmp0,path={},server=on,wait=off", path_str(&qmp_sock)?)])
        .args(["-mon", "chardev=qmp0,mode=control"])
        .args(["-device", "virtio-serial-pci,id=vser0,addr=0x06"])
        .args(["-chardev", &format!("socket,id=qga0,path={},server=on,wait=off", path_str(&qga_sock)?)])
        .args(["-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]);
        let qemu_log = fs::File::create(dir.join("qemu.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log);
        // Its own process group: a Ctrl-C meant for the runner must not kill
        // QEMU before the guest is powered off.
        cmd.process_group(0);
        fs::write(dir.join("qemu.cmdline"), format!("{cmd:?}\n"))?;

        let started = Instant::now();
        let child = cmd
            .spawn()
            .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
        let mut vm = Self {
            child: Some(child),
            run_dir: dir,
            forwards,
            console_log,
            qmp_sock,
            qga_sock,
            agent: None,
            started,
        };
        // QEMU refuses bad arguments at once: fail here with its message.
        std::thread::sleep(Duration::from_millis(300));
        vm.check_alive()?;
        Ok(vm)
    }

    /// Fails (with QEMU's own log) if QEMU has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(self.run_dir.join("qemu.log")).unwrap_or_default();
                self.child = None;
                bail!(
                    "QEMU exited ({status}):\n{log}\n--- console tail\n{}",
                    self.console_tail(40)
                );
            }
            Ok(())
        } else {
            bail!("QEMU is not running")
        }
    }

    /// A new QMP connection.
    pub fn qmp(&self) -> Result<Qmp> {
        Qmp::connect(&self.qmp_sock, Duration::from_secs(10))
    }

    /// The guest agent, waiting up to `timeout` for it to answer.
    pub fn agent(&mut self, timeout: Duration) -> Result<&mut Agent> {
        let deadline = Instant::now() + timeout;
        if self.agent.is_none() {
            loop {
                self.check_alive()?;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!(
                        "the guest agent did not answer within {timeout:?}\n--- console tail\n{}",
                        self.console_tail(40)
                    );
                }
                match Agent::connect(&self.qga_sock, left.min(Duration::from_secs(15))) {
                    Ok(a) => {
                        self.agent = Some(a);
                        break;
                    }
                    Err(_) => continue,
                }
            }
        }
        self.agent.as_mut().context("guest agent")
    }

    /// Runs `sh -c script` in the guest (as root), up to `timeout`.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<ExecOutput> {
        self.check_alive()?;
        let res = self.agent(Duration::from_secs(30))?.sh(script, timeout);
        if res.is_err() {
            // The connection may be out of step: reconnect next time.
            self.agent = None;
        }
        res
    }

    /// Runs `script`, failing unless it exits 0; returns its stdout.
    pub fn sh_ok(&mut self, script: &str, timeout: Duration) -> Result<String> {
        let out = self.sh(script, timeout)?;
        if !out.success() {
            bail!("`{script}` in the guest: {out}");
        }
        Ok(out.stdout)
    }

    /// Waits until the guest agent answers and then until
    /// `appliancectl health ready` exits 0 in the guest; returns the time
    /// since QEMU started.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = self.started + timeout;
        self.agent(deadline.saturating_duration_since(Instant::now()))?;
        loop {
            let last = match self.sh("appliancectl health ready", Duration::from_secs(20)) {
                Ok(out) if out.success() => return Ok(self.started.elapsed()),
                Ok(out) => out.to_string(),
                Err(e) => format!("{e:#}"),
            };
            // systemd gave up restarting it (start limit): no use waiting on.
            let gave_up = self
                .sh(
                    "systemctl show -p ActiveState --value applianced.service",
                    Duration::from_secs(20),
                )
                .is_ok_and(|o| o.stdout.trim() == "failed");
            if gave_up || Instant::now() >= deadline {
                let why = if gave_up {
                    "applianced failed (systemd stopped restarting it)".to_owned()
                } else {
                    format!("applianced was not ready within {timeout:?}")
                };
                let status = self
                    .sh(
                        "appliancectl status; systemctl status applianced --no-pager -n 30",
                        Duration::from_secs(20),
                    )
                    .map(|o| o.to_string())
                    .unwrap_or_default();
                let journal = self
                    .sh(
                        "journalctl -u applianced.service -o cat --no-pager -n 15",
                        Duration::from_secs(20),
                    )
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                bail!(
                    "{why}; last `appliancectl health ready`: {last}\n{status}\n--- applianced journal\n{journal}\n--- console tail\n{}",
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// The last `lines` lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = fs::read(&self.console_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// What to show when a check fails: console tail and journal tail.
    ///
    /// The journal leaves out the guest agent's own lines (one per command
    /// the test runs, which would fill the tail); ZFS's view (pool status,
    /// the newest pool events) comes last, each under a time limit since a
    /// suspended pool can block them.
    pub fn diagnostics(&mut self) -> String {
        let journal = self
            .sh(
                "journalctl -b --no-pager -o short-monotonic | grep -v ' qemu-ga\\[' | tail -n 80",
                Duration::from_secs(30),
            )
            .map_or_else(|e| format!("(no journal: {e:#})"), |o| o.stdout);
        // The daemon's own lines with their fields (tracing-journald puts
        // them in journal fields, which the short format leaves out).
        let daemon = self
            .sh(
                "journalctl -b -u applianced.service --no-pager -n 40 -o verbose \
                 | grep -Ev '^ +(_|SYSLOG_|CODE_|INVOCATION_ID|SYSLOG_IDENTIFIER|MESSAGE_ID)'; \
                 echo '--- appliancectl status'; timeout 10 appliancectl --json status",
                Duration::from_secs(30),
            )
            .map_or_else(|e| format!("(no daemon journal: {e:#})"), |o| o.to_string());
        let zfs = self
            .sh(
                "timeout -s KILL 10 zpool status -P; \
                 echo '--- zpool history -il (newest 30: commands run, and the scans ZFS started itself)'; \
                 timeout -s KILL 10 zpool history -il | tail -n 30; \
                 echo '--- zfs dbgmsg (newest 20: why a vdev failed to open)'; \
                 tail -n 20 /proc/spl/kstat/zfs/dbgmsg; \
                 echo '--- zpool events (newest 40)'; \
                 timeout -s KILL 10 zpool events -H | tail -n 40",
                Duration::from_secs(30),
            )
            .map_or_else(|e| format!("(no zpool status: {e:#})"), |o| o.to_string());
        format!(
            "--- console tail\n{}\n--- journal tail (without qemu-ga)\n{journal}\n--- applianced journal\n{daemon}\n--- zpool status -P\n{zfs}",
            self.console_tail(40)
        )
    }

    /// Clean power-off: ACPI power button, then wait for QEMU to exit; kills
    /// it after `timeout`.
    pub fn shutdown(mut self, timeout: Duration) -> Result<()> {
        let requested = self.qmp().and_then(|mut q| {
            q.execute("system_powerdown", &json!({}), Duration::from_secs(10))
                .map(|_| ())
        });
        let deadline = Instant::now() + timeout;
        if let Some(mut child) = self.child.take() {
            if requested.is_ok() {
                while Instant::now() < deadline {
                    if let Some(status) = child.try_wait()? {
                        return if status.success() {
                            Ok(())
                        } else {
                            bail!("QEMU exited with {status}")
                        };
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not power off within {timeout:?}; QEMU killed\n--- console tail\n{}",
                self.console_tail(30)
            );
        }
        Ok(())
    }

    /// Pulls the plug (SIGKILL to QEMU), as a power cut would.
    pub fn kill(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
