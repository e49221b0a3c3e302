//! `appliance-vm`: build the image if needed, boot the appliance in QEMU
//! (TCG) with six data disks, wait until applianced is ready, print how to
//! reach it, and keep it running until Ctrl-C (then power it off cleanly).
//!
//! ```text
//! cargo run -p appliance-hw-tests --bin appliance-vm [-- --keep-disks] [--no-wait]
//! ```
//! Needs root for the image build (mmdebstrap, chroot); the first build takes
//! about 15-20 minutes on a 2-core machine, later ones seconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use appliance_hw_tests::image::{ensure_image, run_dir};
use appliance_hw_tests::vm::{data_disk_serial, Vm, VmConfig, GUEST_SYNC_PORT};
use base64::Engine as _;

const USAGE: &str = "usage: appliance-vm [--keep-disks] [--no-wait] [--ready-timeout SECS]
  --keep-disks          reuse the VM's overlay and data disks from the last run
                        (hw-tests/out/appliance-vm) instead of blank ones
  --no-wait             exit once the appliance is ready (powers it off)
  --ready-timeout SECS  how long to wait for readiness (default 900)";

fn main() -> Result<()> {
    let mut keep = false;
    let mut no_wait = false;
    let mut ready_timeout = Duration::from_secs(900);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--keep-disks" => keep = true,
            "--no-wait" => no_wait = true,
            "--ready-timeout" => {
                let v = args.next().context("--ready-timeout needs a value")?;
                ready_timeout = Duration::from_secs(v.parse().context("--ready-timeout SECS")?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => {
                eprintln!("appliance-vm: unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    let image = ensure_image()?;
    let mut cfg = VmConfig::new(image, run_dir("appliance-vm"));
    cfg.fresh = !keep;
    eprintln!(
        "appliance-vm: booting {} under QEMU/TCG (this takes a few minutes)",
        cfg.image.display()
    );
    let mut vm = Vm::start(&cfg)?;
    eprintln!("appliance-vm: serial console: {}", vm.console_log.display());
    let ready = match vm.wait_ready(ready_timeout) {
        Ok(t) => t,
        Err(e) => {
            let diag = vm.diagnostics();
            bail!("{e:#}\n{diag}");
        }
    };
    let status = vm.sh("appliancectl status", Duration::from_secs(30))?;
    let bundle = fetch_bundle(&mut vm);

    // Ctrl-C / SIGTERM: power the guest off cleanly (QEMU runs in its own
    // process group, so the terminal's SIGINT reaches only us).
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;

    println!(
        "The appliance is ready ({:.0} s after QEMU started).",
        ready.as_secs_f64()
    );
    println!();
    println!("{}", status.stdout.trim_end());
    println!();
    println!("How to reach it:");
    println!(
        "  sync (QUIC, UDP):  127.0.0.1:{} -> guest port {GUEST_SYNC_PORT}",
        vm.forwards.sync_udp
    );
    match &bundle {
        Ok(path) => {
            println!(
                "  client bundle:     {} (a client enrolled for this host)",
                path.display()
            );
            println!(
                "  e.g.:              cargo run --release -p appliance-sync -- --identity {} --server 127.0.0.1:{} status",
                path.display(),
                vm.forwards.sync_udp
            );
        }
        Err(e) => println!("  client bundle:     not available: {e:#}"),
    }
    println!(
        "  metrics (HTTP):    curl http://127.0.0.1:{}/metrics",
        vm.forwards.metrics_tcp
    );
    println!("  serial console:    {}", vm.console_log.display());
    println!(
        "  commands inside:   the guest agent socket {}/qga.sock (qemu-ga guest-exec)",
        vm.run_dir.display()
    );
    println!("  QMP:               {}/qmp.sock", vm.run_dir.display());
    println!(
        "  data disks:        {} x serial {}..{}, files {}/disk*.qcow2",
        cfg.data_disks,
        data_disk_serial(0),
        data_disk_serial(cfg.data_disks.saturating_sub(1)),
        vm.run_dir.display()
    );
    if no_wait {
        eprintln!("appliance-vm: --no-wait: powering off");
        return vm.shutdown(Duration::from_secs(120));
    }
    println!();
    println!("Ctrl-C powers it off.");
    let since = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = vm.check_alive() {
            bail!(
                "the VM stopped after {:.0} s: {e:#}",
                since.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("appliance-vm: powering off");
    vm.shutdown(Duration::from_secs(120))
}

/// Enrolls a sync client for this host (`appliancectl sync client add`) and
/// copies its bundle out of the guest to the run directory (mode 0600).
fn fetch_bundle(vm: &mut Vm) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = format!("vm-host-{secs}");
    let guest = format!("/run/{name}.bundle");
    let b64 = vm.sh_ok(
        &format!("appliancectl sync client add {name} --out {guest} >&2 && base64 -w0 {guest}; rc=$?; rm -f {guest}; exit $rc"),
        Duration::from_secs(60),
    )?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("decoding the bundle")?;
    let path = vm.run_dir.join(format!("{name}.bundle"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, &bytes)?;
    Ok(path)
}
