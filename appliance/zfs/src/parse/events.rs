//! `zpool events` output, whole (`zpool events -v`, `-H`) or incrementally
//! while following (`zpool events -f -H -v`).
//!
//! Format (from `zpool_do_events_next`/`zpool_do_events_nvprint` in
//! `cmd/zpool/zpool_main.c`, and the captures):
//!
//! ```text
//! TIME                           CLASS                 <- header, not with -H
//! Nov 22 2026 19:34:49.348000000 resource.fs.zfs.removed   (-H: a tab)
//!         class = "resource.fs.zfs.removed"            <- -v only, 8 spaces
//!         vdev_state = "REMOVED" (0x3)
//!         detector = (embedded nvlist)                 <- nesting
//!                 scheme = "zfs"
//!         (end detector)
//!         time = 0x6b0343d9 0x14be0f00
//!         eid = 0x14d
//!                                                      <- blank line ends it
//! dropped 12 events                                    <- kernel ring overflow
//! ```
//!
//! The header's time is local calendar time; the `time` field (seconds,
//! nanoseconds since the epoch) is exact and preferred. `dropped N events`
//! is surfaced as [`EventItem::Dropped`] because it means the follower
//! missed state changes and the caller must re-poll `zpool status`.
//!
//! [`EventStreamParser`] is a sans-IO state machine: feed it bytes as they
//! arrive; it splits lines (bounded by [`MAX_LINE_BYTES`]) and yields each
//! event as soon as its terminating blank line (verbose) or its header line
//! (non-verbose) has been seen. Memory per event is bounded by
//! [`MAX_FIELDS_PER_EVENT`] and [`MAX_LINE_BYTES`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_size, line_error, ParseError};
use crate::model::DeviceState;

/// Longest line kept; longer lines are reported and skipped. Real lines are
/// under 200 bytes (the longest are `zio_flags` with their flag names).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Fields kept per event; a checksum ereport has about 50. Further fields
/// are counted in [`ZpoolEvent::fields_dropped`] and not stored.
pub const MAX_FIELDS_PER_EVENT: usize = 256;

/// Deepest embedded-nvlist nesting tracked.
pub const MAX_NESTING: usize = 8;

const WHAT: &str = "zpool events";

/// One ZFS event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZpoolEvent {
    /// Event class (`resource.fs.zfs.statechange`, `ereport.fs.zfs.io`,
    /// `sysevent.fs.zfs.scrub_finish`, ...).
    pub class: String,
    /// The header's time as printed (local time).
    pub time_text: String,
    /// Seconds since the epoch from the `time` field (verbose only).
    pub time_secs: Option<u64>,
    /// Nanoseconds part of `time`.
    pub time_nanos: Option<u64>,
    /// Event id (`eid`), increasing; use it to de-duplicate.
    pub eid: Option<u64>,
    /// Pool name.
    pub pool: Option<String>,
    /// Pool GUID.
    pub pool_guid: Option<u64>,
    /// Vdev GUID.
    pub vdev_guid: Option<u64>,
    /// Vdev path (`/dev/disk/by-id/virtio-ZD2-part1`).
    pub vdev_path: Option<String>,
    /// New vdev state (statechange/removed events).
    pub vdev_state: Option<DeviceState>,
    /// Previous vdev state (statechange).
    pub vdev_laststate: Option<DeviceState>,
    /// All fields as printed (nested ones as `parent.child`), values raw.
    pub fields: BTreeMap<String, String>,
    /// Fields not stored because of [`MAX_FIELDS_PER_EVENT`].
    pub fields_dropped: usize,
}

impl ZpoolEvent {
    fn new(time_text: &str, class: &str) -> Self {
        Self {
            class: class.to_owned(),
            time_text: time_text.to_owned(),
            time_secs: None,
            time_nanos: None,
            eid: None,
            pool: None,
            pool_guid: None,
            vdev_guid: None,
            vdev_path: None,
            vdev_state: None,
            vdev_laststate: None,
            fields: BTreeMap::new(),
            fields_dropped: 0,
        }
    }

    /// The class without the `resource.fs.zfs.`/`sysevent.fs.zfs.`/
    /// `ereport.fs.zfs.` prefix (`removed`, `scrub_finish`, `checksum`).
    pub fn short_class(&self) -> &str {
        self.class
            .rsplit_once(".fs.zfs.")
            .map_or(self.class.as_str(), |(_, s)| s)
    }

    /// A raw field as an unsigned integer (`0x...` hex or decimal).
    pub fn field_u64(&self, name: &str) -> Option<u64> {
        self.fields.get(name).and_then(|v| parse_uint(v))
    }

    /// A raw field as a string (quotes removed).
    pub fn field_str(&self, name: &str) -> Option<String> {
        self.fields.get(name).and_then(|v| parse_string(v))
    }

    fn set_field(&mut self, key: String, value: &str, top_level: bool) {
        if top_level {
            match key.as_str() {
                "eid" => self.eid = parse_uint(value),
                "pool" => self.pool = parse_string(value),
                "pool_guid" => self.pool_guid = parse_uint(value),
                "vdev_guid" => self.vdev_guid = parse_uint(value),
                "vdev_path" => self.vdev_path = parse_string(value),
                "vdev_state" => {
                    self.vdev_state = parse_string(value).map(|s| DeviceState::from_zfs(&s));
                }
                "vdev_laststate" => {
                    self.vdev_laststate = parse_string(value).map(|s| DeviceState::from_zfs(&s));
                }
                "time" => {
                    let mut it = value.split_whitespace().map(parse_uint);
                    self.time_secs = it.next().flatten();
                    self.time_nanos = it.next().flatten();
                }
                _ => {}
            }
        }
        if self.fields.len() >= MAX_FIELDS_PER_EVENT && !self.fields.contains_key(&key) {
            self.fields_dropped += 1;
        } else {
            self.fields.insert(key, value.to_owned());
        }
    }
}

/// What the event stream yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventItem {
    /// An event (boxed: it is large and `Dropped` is tiny).
    Event(Box<ZpoolEvent>),
    /// The kernel dropped this many events (its ring buffer overflowed):
    /// the consumer must re-read pool state.
    Dropped(u64),
}

/// Parses `0x1f`, `31`, or the first word of `0x3 [FLAGS]`.
fn parse_uint(v: &str) -> Option<u64> {
    let w = v.split_whitespace().next()?;
    match w.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => w.parse().ok(),
    }
}

/// Parses `"text"` or `"REMOVED" (0x3)` into the quoted text.
fn parse_string(v: &str) -> Option<String> {
    let rest = v.strip_prefix('"')?;
    // A state prints as `"NAME" (0xN)`; a plain string ends at its last quote.
    let end = rest.rfind('"')?;
    Some(rest[..end].to_owned())
}

/// Incremental parser for a `zpool events` byte stream.
#[derive(Debug)]
pub struct EventStreamParser {
    verbose: bool,
    partial: Vec<u8>,
    skipping_long_line: bool,
    line_no: usize,
    current: Option<ZpoolEvent>,
    nest: Vec<String>,
}

impl EventStreamParser {
    /// `verbose` must match whether `-v` was given: without it every
    /// header line is a complete event.
    pub fn new(verbose: bool) -> Self {
        Self {
            verbose,
            partial: Vec::new(),
            skipping_long_line: false,
            line_no: 0,
            current: None,
            nest: Vec::new(),
        }
    }

    /// Feeds raw bytes; returns every item completed by them.
    pub fn push_bytes(&mut self, mut bytes: &[u8]) -> Vec<Result<EventItem, ParseError>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|b| *b == b'\n');
            let (chunk, rest, complete) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if !self.skipping_long_line {
                if self.partial.len() + chunk.len() > MAX_LINE_BYTES {
                    self.line_no += 1;
                    out.push(Err(line_error(
                        WHAT,
                        self.line_no,
                        format!("line longer than {MAX_LINE_BYTES} bytes skipped"),
                        &String::from_utf8_lossy(&chunk[..chunk.len().min(200)]),
                    )));
                    self.partial.clear();
                    self.skipping_long_line = !complete;
                    continue;
                }
                self.partial.extend_from_slice(chunk);
            } else if complete {
                self.skipping_long_line = false;
                continue;
            }
            if complete && !self.skipping_long_line {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                out.extend(self.push_line(&line));
            }
        }
        out
    }

    /// Feeds one line (without its newline); returns the items it
    /// completed (at most two: an unterminated event and a control line).
    pub fn push_line(&mut self, line: &str) -> Vec<Result<EventItem, ParseError>> {
        self.line_no += 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            self.nest.clear();
            return self
                .current
                .take()
                .map(|e| Ok(EventItem::Event(Box::new(e))))
                .into_iter()
                .collect();
        }
        if line.starts_with([' ', '\t']) {
            return self.field_line(line.trim()).into_iter().collect();
        }
        // A header or control line ends any unterminated event.
        let mut out: Vec<_> = self
            .current
            .take()
            .map(|e| Ok(EventItem::Event(Box::new(e))))
            .into_iter()
            .collect();
        self.nest.clear();
        out.extend(self.header_line(line));
        out
    }

    /// Flushes an event left unterminated at end of input.
    pub fn finish(&mut self) -> Option<EventItem> {
        self.nest.clear();
        self.current.take().map(|e| EventItem::Event(Box::new(e)))
    }

    fn header_line(&mut self, line: &str) -> Option<Result<EventItem, ParseError>> {
        if line.starts_with("TIME ") && line.trim_end().ends_with("CLASS") {
            return None;
        }
        if let Some(n) = line
            .strip_prefix("dropped ")
            .and_then(|r| r.strip_suffix(" events"))
            .and_then(|n| n.trim().parse().ok())
        {
            return Some(Ok(EventItem::Dropped(n)));
        }
        let split = line.split_once('\t').or_else(|| line.rsplit_once(' '));
        let Some((time, class)) = split else {
            return Some(Err(line_error(
                WHAT,
                self.line_no,
                "not an event header",
                line,
            )));
        };
        let class = class.trim();
        if class.is_empty() || class.contains(char::is_whitespace) || !class.contains('.') {
            return Some(Err(line_error(
                WHAT,
                self.line_no,
                "not an event class",
                line,
            )));
        }
        let event = ZpoolEvent::new(time.trim(), class);
        if self.verbose {
            self.current = Some(event);
            None
        } else {
            Some(Ok(EventItem::Event(Box::new(event))))
        }
    }

    fn field_line(&mut self, text: &str) -> Option<Result<EventItem, ParseError>> {
        let Some(event) = self.current.as_mut() else {
            return Some(Err(line_error(
                WHAT,
                self.line_no,
                "field outside an event",
                text,
            )));
        };
        if text.starts_with("(end ") && text.ends_with(')') {
            self.nest.pop();
            return None;
        }
        let Some((name, value)) = text.split_once(" = ").or_else(|| {
            // `vdev_spare_paths = ` (empty array) loses its trailing space.
            text.strip_suffix(" =").map(|n| (n, ""))
        }) else {
            return Some(Err(line_error(
                WHAT,
                self.line_no,
                "expected `name = value`",
                text,
            )));
        };
        let top_level = self.nest.is_empty();
        let key = if top_level {
            name.to_owned()
        } else {
            format!("{}.{name}", self.nest.join("."))
        };
        let value = value.trim_end();
        let opens = value == "(embedded nvlist)"
            || (value.starts_with('(') && value.ends_with(" embedded nvlists)"));
        if opens {
            if self.nest.len() >= MAX_NESTING {
                return Some(Err(line_error(
                    WHAT,
                    self.line_no,
                    "nvlists nested too deep",
                    text,
                )));
            }
            self.nest.push(name.to_owned());
            return None;
        }
        event.set_field(key, value, top_level);
        None
    }
}

/// Parses a complete `zpool events [-H] [-v]` output.
///
/// Malformed lines are errors here (captured output should be clean); the
/// streaming parser instead reports them and continues.
pub fn parse_zpool_events(input: &str, verbose: bool) -> Result<Vec<EventItem>, ParseError> {
    check_size(WHAT, input)?;
    let mut p = EventStreamParser::new(verbose);
    let mut out = Vec::new();
    for line in input.lines() {
        for item in p.push_line(line) {
            out.push(item?);
        }
    }
    out.extend(p.finish());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"TIME                           CLASS
Nov 22 2026 19:34:49.348000000 resource.fs.zfs.statechange
        version = 0x0
        class = "resource.fs.zfs.statechange"
        pool = "tank"
        vdev_state = "REMOVED" (0x3)
        vdev_laststate = "ONLINE" (0x7)
        detector = (embedded nvlist)
                scheme = "zfs"
                pool = 0xaa
        (end detector)
        vdev_spare_paths =
        time = 0x6b0343d9 0x14be0f00 
        eid = 0x14c

dropped 3 events
Nov 22 2026 19:34:50.000000000 sysevent.fs.zfs.config_sync
        pool = "tank"
        eid = 0x14d
Nov 22 2026 19:34:51.000000000 sysevent.fs.zfs.config_sync
        eid = 0x14e
dropped 1 events
"#;

    #[test]
    fn parses_fields_nesting_and_dropped() {
        let items = parse_zpool_events(TWO, true).unwrap();
        assert_eq!(items.len(), 5);
        let EventItem::Event(e) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(e.short_class(), "statechange");
        assert_eq!(e.pool.as_deref(), Some("tank"));
        assert_eq!(e.vdev_state, Some(DeviceState::Removed));
        assert_eq!(e.vdev_laststate, Some(DeviceState::Online));
        assert_eq!(e.time_secs, Some(0x6b03_43d9));
        assert_eq!(e.time_nanos, Some(0x14be_0f00));
        assert_eq!(e.eid, Some(0x14c));
        assert_eq!(
            e.fields.get("detector.pool").map(String::as_str),
            Some("0xaa")
        );
        assert_eq!(e.field_str("detector.scheme").as_deref(), Some("zfs"));
        assert_eq!(items[1], EventItem::Dropped(3));
        let EventItem::Event(e) = &items[2] else {
            panic!("{items:?}")
        };
        assert_eq!(e.eid, Some(0x14d));
        // Unterminated events are closed by the next header/control line.
        let EventItem::Event(e) = &items[3] else {
            panic!("{items:?}")
        };
        assert_eq!(e.eid, Some(0x14e));
        assert_eq!(items[4], EventItem::Dropped(1));
    }

    #[test]
    fn byte_stream_split_anywhere_gives_same_result() {
        let whole = parse_zpool_events(TWO, true).unwrap();
        for chunk in [1usize, 2, 7, 64] {
            let mut p = EventStreamParser::new(true);
            let mut got = Vec::new();
            for c in TWO.as_bytes().chunks(chunk) {
                for item in p.push_bytes(c) {
                    got.push(item.unwrap());
                }
            }
            got.extend(p.finish());
            assert_eq!(got, whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn event_is_yielded_at_its_blank_line_not_later() {
        let mut p = EventStreamParser::new(true);
        let head =
            "Nov 22 2026 19:34:50.000000000\tsysevent.fs.zfs.scrub_start\n        pool = \"t\"\n";
        assert!(p.push_bytes(head.as_bytes()).is_empty());
        let out = p.push_bytes(b"\n");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn non_verbose_yields_per_header() {
        let mut p = EventStreamParser::new(false);
        let out = p.push_bytes(b"Nov 22 2026 19:44:15.776000722\tsysevent.fs.zfs.pool_create\n");
        assert_eq!(out.len(), 1);
        let Ok(EventItem::Event(e)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(e.time_text, "Nov 22 2026 19:44:15.776000722");
        assert_eq!(e.class, "sysevent.fs.zfs.pool_create");
    }

    #[test]
    fn hostile_input_is_bounded_and_reported() {
        let mut p = EventStreamParser::new(true);
        let long = vec![b'x'; MAX_LINE_BYTES * 3];
        let out = p.push_bytes(&long);
        assert_eq!(out.len(), 1);
        assert!(out[0].is_err());
        // The rest of the overlong line is skipped, then parsing resumes.
        let out = p.push_bytes(b"yyy\nNov 1 2026 00:00:00.0 a.b\n\n");
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Ok(EventItem::Event(_))));
        // Too many fields are counted, not stored.
        let mut text = String::from("Nov 1 2026 00:00:00.0 a.b\n");
        for i in 0..(MAX_FIELDS_PER_EVENT + 10) {
            text.push_str(&format!("        f{i} = 0x1\n"));
        }
        let items = parse_zpool_events(&text, true).unwrap();
        let EventItem::Event(e) = &items[0] else {
            panic!()
        };
        assert_eq!(e.fields.len(), MAX_FIELDS_PER_EVENT);
        assert_eq!(e.fields_dropped, 10);
        // Garbage header and orphan field lines are errors, not panics.
        assert!(parse_zpool_events("no class here\n", true).is_err());
        assert!(parse_zpool_events("        x = 1\n", true).is_err());
        let mut deep = String::from("Nov 1 2026 00:00:00.0 a.b\n");
        for i in 0..=MAX_NESTING {
            deep.push_str(&format!("        n{i} = (embedded nvlist)\n"));
        }
        assert!(parse_zpool_events(&deep, true).is_err());
    }
}
