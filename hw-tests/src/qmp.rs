//! QEMU Machine Protocol client: commands with deadlines, events kept.
//!
//! QMP sends asynchronous events (`SHUTDOWN`, `DEVICE_DELETED`,
//! `BLOCK_IO_ERROR`, ...) between command replies; they are collected in
//! [`Qmp::events`] so that a test can wait for one after the fact.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::jsonline::JsonLines;

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    conn: JsonLines,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket and leaves capabilities negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut conn = JsonLines::connect(path, "QMP", timeout)?;
        let greeting = conn
            .recv(deadline)?
            .ok_or_else(|| anyhow!("no QMP greeting within {timeout:?}"))?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        let mut qmp = Self {
            conn,
            events: Vec::new(),
        };
        qmp.execute("qmp_capabilities", &json!({}), timeout)?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: &Value,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.conn
            .send(&json!({ "execute": command, "arguments": arguments }))?;
        loop {
            let msg = self
                .conn
                .recv(deadline)?
                .ok_or_else(|| anyhow!("QMP {command}: no reply within {timeout:?}"))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                bail!("QMP {command} failed: {err}");
            }
        }
    }

    /// Waits for an event named `name` (one already received counts), and
    /// removes it from the queue.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i));
            }
            match self.conn.recv(deadline)? {
                Some(msg) if msg.get("event").is_some() => self.events.push(msg),
                Some(_) => {}
                None => bail!("QMP event {name} did not come within {timeout:?}"),
            }
        }
    }

    /// Events received so far and not yet taken by [`Qmp::wait_event`].
    pub fn events(&self) -> &[Value] {
        &self.events
    }
}
