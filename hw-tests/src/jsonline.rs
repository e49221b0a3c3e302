//! A JSON-per-line connection over a Unix socket with deadlines: the framing
//! both QMP and the QEMU guest agent use.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One connected socket; reads whole lines, each one JSON document.
#[derive(Debug)]
pub(crate) struct JsonLines {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    what: String,
}

impl JsonLines {
    /// Connects, retrying until `timeout` (QEMU creates its sockets a moment
    /// after it starts).
    pub(crate) fn connect(path: &Path, what: &str, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to {what} at {}", path.display()))
                }
            }
        };
        let writer = stream.try_clone().context("cloning socket")?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            what: what.to_owned(),
        })
    }

    pub(crate) fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(msg)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("writing to {}", self.what))?;
        Ok(())
    }

    /// Reads the next JSON document, or `None` when `deadline` passes first.
    /// Lines that are not JSON (the guest agent's 0xFF sync marker, blank
    /// lines) are skipped.
    pub(crate) fn recv(&mut self, deadline: Instant) -> Result<Option<Value>> {
        let mut line = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => bail!("{} closed the connection", self.what),
                Ok(_) if line.ends_with(b"\n") => {
                    let text: Vec<u8> = line.iter().copied().filter(|b| *b != 0xff).collect();
                    line.clear();
                    let text = String::from_utf8_lossy(&text);
                    let text = text.trim();
                    if text.is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Value>(text) {
                        Ok(v) => return Ok(Some(v)),
                        Err(_) => continue,
                    }
                }
                // A partial line: keep it and read on.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading from {}", self.what)),
            }
        }
    }
}
