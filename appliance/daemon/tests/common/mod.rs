//! Helpers shared by the daemon's integration tests: start the real
//! `applianced` binary with a real notify socket, and run the real
//! `appliancectl` against it.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the daemon binary under test.
pub fn applianced() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_applianced"))
}

/// Path of `appliancectl`, built beside `applianced` by `cargo test --workspace`.
pub fn appliancectl() -> PathBuf {
    let p = applianced().with_file_name("appliancectl");
    assert!(
        p.exists(),
        "{} is missing: run the tests for the whole workspace (cargo test --workspace) \
         or `cargo build -p appliancectl` first",
        p.display()
    );
    p
}

/// Collects every datagram sent to a notify socket.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => m
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if Arc::strong_count(&m) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Self { path, messages }
    }

    /// All lines received so far.
    pub fn lines(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .flat_map(|m| m.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    pub fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    /// Waits until `line` has been received `n` times.
    pub fn wait_for(&self, line: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(line) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// A running daemon; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub state_dir: PathBuf,
    pub notify: NotifySocket,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `applianced --state-dir DIR [extra args]` with `NOTIFY_SOCKET`
    /// and waits for `READY=1`.
    pub fn start(state_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(state_dir).unwrap();
        let _ = std::fs::remove_file(state_dir.join("notify.sock"));
        let notify = NotifySocket::bind(state_dir);
        let stderr_path = state_dir.join("daemon.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(applianced());
        cmd.arg("--state-dir")
            .arg(state_dir)
            .args(extra_args)
            .env("NOTIFY_SOCKET", &notify.path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut d = Self {
            child,
            state_dir: state_dir.to_owned(),
            notify,
            stderr_path,
        };
        if !d.notify.wait_for("READY=1", 1, Duration::from_secs(30)) {
            let status = d.child.try_wait().unwrap();
            panic!(
                "applianced did not send READY=1 (exit: {status:?}); stderr:\n{}",
                d.stderr()
            );
        }
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Runs `appliancectl --socket SOCK args...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(appliancectl())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "applianced did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `VmRSS` and `VmSize` of the daemon, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmSize:"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the test runs as root (needed to act as another user).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
