//! The QEMU guest agent (qemu-ga in the image) as the command channel into the
//! guest.
//!
//! It runs over its own virtio-serial port, so it works when the serial
//! console is busy or a command hangs (a suspended pool blocks whatever
//! touches it): each command is a separate `guest-exec` with its own
//! deadline, and a hung one only costs its own timeout. The agent starts only
//! where the port `org.qemu.guest_agent.0` exists, i.e. never on real
//! hardware.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::jsonline::JsonLines;

/// Output of one command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (`-1` when the guest reported a signal instead).
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

impl fmt::Display for ExecOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {}", self.code)?;
        if !self.stdout.is_empty() {
            write!(f, "\n--- stdout\n{}", self.stdout.trim_end())?;
        }
        if !self.stderr.is_empty() {
            write!(f, "\n--- stderr\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// A connection to the guest agent.
#[derive(Debug)]
pub struct Agent {
    conn: JsonLines,
    next_id: u64,
}

impl Agent {
    /// Connects to the host side of the agent's port and waits until the
    /// agent in the guest answers (`guest-sync`), up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let conn = JsonLines::connect(path, "guest agent", timeout)?;
        let seed = u64::from(std::process::id()) << 20;
        let mut agent = Self {
            conn,
            next_id: seed,
        };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                bail!("the guest agent did not answer within {timeout:?}");
            }
            if agent.sync(remaining.min(Duration::from_secs(3)))? {
                return Ok(agent);
            }
        }
    }

    /// `guest-sync` with a fresh id: true once the agent echoes it. Replies
    /// to earlier, timed-out requests are skipped.
    fn sync(&mut self, timeout: Duration) -> Result<bool> {
        self.next_id += 1;
        let id = self.next_id;
        let deadline = Instant::now() + timeout;
        self.conn
            .send(&json!({ "execute": "guest-sync", "arguments": { "id": id } }))?;
        while let Some(msg) = self.conn.recv(deadline)? {
            if msg.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn call(&mut self, command: &str, arguments: &Value, timeout: Duration) -> Result<Value> {
        if !self.sync(timeout)? {
            bail!("guest agent: no answer to guest-sync before {command}");
        }
        let deadline = Instant::now() + timeout;
        self.conn
            .send(&json!({ "execute": command, "arguments": arguments }))?;
        let msg = self
            .conn
            .recv(deadline)?
            .ok_or_else(|| anyhow!("guest agent: {command}: no reply within {timeout:?}"))?;
        if let Some(err) = msg.get("error") {
            bail!("guest agent: {command} failed: {err}");
        }
        msg.get("return")
            .cloned()
            .ok_or_else(|| anyhow!("guest agent: {command}: unexpected reply {msg}"))
    }

    /// Runs `sh -c script` in the guest as root and waits for it to finish,
    /// up to `timeout`.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec("/bin/sh", &["-c", script], timeout)
    }

    /// Runs `path args...` in the guest as root and waits for it, up to
    /// `timeout`. A command still running then is killed.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let step = Duration::from_secs(10).min(timeout.max(Duration::from_secs(1)));
        let started = self
            .call(
                "guest-exec",
                &json!({ "path": path, "arg": args, "capture-output": true }),
                step,
            )
            .with_context(|| format!("starting {path} {args:?} in the guest"))?;
        let pid = started["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("guest-exec returned no pid: {started}"))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let status = self.call("guest-exec-status", &json!({ "pid": pid }), step)?;
            if status["exited"].as_bool() == Some(true) {
                let code = status["exitcode"].as_i64().unwrap_or(-1);
                return Ok(ExecOutput {
                    code,
                    stdout: decode(&status["out-data"])?,
                    stderr: decode(&status["err-data"])?,
                });
            }
            if Instant::now() >= deadline {
                let _ = self.call(
                    "guest-exec",
                    &json!({ "path": "/bin/kill", "arg": ["-KILL", pid.to_string()] }),
                    step,
                );
                bail!("{path} {args:?} did not finish within {timeout:?} in the guest (killed)");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

fn decode(v: &Value) -> Result<String> {
    match v.as_str() {
        None => Ok(String::new()),
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .context("guest agent output is not base64")?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}
