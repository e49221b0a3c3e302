//! NATS client-protocol codec (sans-IO): an incremental parser for what
//! clients send, and encoders for what the server sends.
//!
//! The parser works on a [`BytesMut`] that the caller fills from the socket.
//! [`Parser::parse`] takes one complete operation off its front, or returns
//! `Ok(None)` when more bytes are needed. Limits are enforced *before*
//! anything is buffered on their account:
//! * a control line (everything up to `\n`) longer than `max_control_line`
//!   is an error as soon as that many bytes arrive without a newline;
//! * a `PUB`/`HPUB` declaring more than `max_payload` bytes is an error when
//!   its control line is parsed, before the payload is read.
//!
//! Verbs are case-insensitive, arguments are separated by spaces or tabs, and
//! control lines end with `\r\n` (a bare `\n` is accepted, for people typing
//! at a terminal). A payload must be followed by exactly `\r\n`; anything else
//! means the client sent more (or less) than it declared.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::subject::{validate_pattern, validate_subject, Subject, SubjectError};

/// The `CONNECT` options this server reads. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ConnectOptions {
    /// Acknowledge every operation with `+OK`.
    pub verbose: bool,
    /// Stricter checking (subjects are always checked here).
    pub pedantic: bool,
    /// Deliver the connection's own messages back to it.
    pub echo: bool,
    /// The client understands `HMSG`.
    pub headers: bool,
    /// The client wants a 503 status reply when a request has no responders.
    pub no_responders: bool,
    /// Client name, for statistics and logs.
    pub name: Option<String>,
    /// Client library.
    pub lang: Option<String>,
    /// Client library version.
    pub version: Option<String>,
    /// Protocol level (1 for dynamic INFO).
    pub protocol: u8,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            verbose: false,
            pedantic: false,
            echo: true,
            headers: false,
            no_responders: false,
            name: None,
            lang: None,
            version: None,
            protocol: 0,
        }
    }
}

/// One operation from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// `CONNECT {json}`.
    Connect(Box<ConnectOptions>),
    /// `PUB` or `HPUB`.
    Pub {
        /// Subject (validated, no wildcards).
        subject: Subject,
        /// Reply subject (validated).
        reply: Option<Subject>,
        /// Raw NATS header block (`NATS/1.0\r\n...\r\n\r\n`) for `HPUB`.
        headers: Option<Bytes>,
        /// The payload.
        payload: Bytes,
    },
    /// `SUB subject [queue] sid`.
    Sub {
        /// Pattern (validated).
        subject: String,
        /// Queue group.
        queue: Option<String>,
        /// Subscription id chosen by the client.
        sid: String,
    },
    /// `UNSUB sid [max]`.
    Unsub {
        /// Subscription id.
        sid: String,
        /// Remove after this many more deliveries in total.
        max: Option<u64>,
    },
    /// `PING`.
    Ping,
    /// `PONG`.
    Pong,
}

/// A protocol violation. [`is_fatal`](Self::is_fatal) tells whether the
/// connection can go on: after a fatal error the stream position is lost,
/// so the server sends `-ERR` and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A verb this server does not know.
    #[error("unknown protocol operation {0:?}")]
    UnknownOp(String),
    /// No newline within the limit.
    #[error("maximum control line exceeded ({limit} bytes)")]
    MaxControlLine {
        /// The limit.
        limit: usize,
    },
    /// A declared payload above the limit.
    #[error("maximum payload violation: {size} bytes declared, {max} allowed")]
    MaxPayload {
        /// Declared size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The payload is not followed by `\r\n`: more (or other) bytes than declared.
    #[error("payload does not end where its declared size says")]
    PayloadSize,
    /// Wrong number or form of arguments.
    #[error("invalid arguments for {op}: {reason}")]
    InvalidArgs {
        /// The verb.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An `HPUB` header block that is not `NATS/1.0 ... \r\n\r\n`.
    #[error("malformed headers: {0}")]
    BadHeaders(String),
    /// `CONNECT` JSON that does not parse.
    #[error("invalid CONNECT json: {0}")]
    BadConnect(String),
    /// A subject or pattern that fails validation. Not fatal: the whole
    /// operation (and its payload) was consumed.
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] SubjectError),
    /// A `PUB`/`HPUB` subject or reply subject that fails validation. Not
    /// fatal: the payload was consumed. nats-server reports it only to
    /// `pedantic` clients (the server decides).
    #[error("invalid publish subject: {0}")]
    InvalidPublishSubject(SubjectError),
}

impl ProtocolError {
    /// Whether the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Self::InvalidSubject(_) | Self::InvalidPublishSubject(_)
        )
    }

    /// The text for `-ERR '...'`, using `nats-server`'s wording where one exists
    /// (clients match on some of these).
    pub fn err_text(&self) -> String {
        match self {
            Self::UnknownOp(_) => "Unknown Protocol Operation".into(),
            Self::MaxControlLine { .. } => "Maximum Control Line Exceeded".into(),
            Self::MaxPayload { .. } => "Maximum Payload Violation".into(),
            Self::InvalidSubject(_) => "Invalid Subject".into(),
            Self::InvalidPublishSubject(_) => "Invalid Publish Subject".into(),
            other => format!("Parser Error: {other}"),
        }
    }
}

/// Incremental parser for client operations.
#[derive(Debug, Clone)]
pub struct Parser {
    max_control_line: usize,
    max_payload: usize,
    /// A `PUB`/`HPUB` whose control line is consumed, waiting for its payload.
    pending: Option<PendingPub>,
    /// The subject of the last `PUB`: a publisher usually repeats it, and
    /// then it is neither validated nor allocated again.
    last_subject: Option<Subject>,
}

#[derive(Debug, Clone)]
struct PendingPub {
    subject: Result<Subject, SubjectError>,
    reply: Option<Subject>,
    header_len: Option<usize>,
    total: usize,
}

/// Finds the end of the control line: index of `\n`.
fn find_newline(buf: &[u8], limit: usize) -> Option<usize> {
    memchr::memchr(b'\n', &buf[..buf.len().min(limit + 1)])
}

/// The arguments of a control line, without allocating: every verb takes
/// at most four, so more are only counted (for the error).
struct Args<'a> {
    items: [&'a [u8]; 4],
    len: usize,
}

impl<'a> Args<'a> {
    fn len(&self) -> usize {
        self.len
    }

    fn as_slice(&self) -> &[&'a [u8]] {
        &self.items[..self.len.min(self.items.len())]
    }
}

impl<'a> std::ops::Index<usize> for Args<'a> {
    type Output = &'a [u8];
    fn index(&self, i: usize) -> &&'a [u8] {
        &self.as_slice()[i]
    }
}

fn args(line: &[u8]) -> Args<'_> {
    let mut a = Args {
        items: [&[]; 4],
        len: 0,
    };
    for arg in line
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|a| !a.is_empty())
    {
        if let Some(slot) = a.items.get_mut(a.len) {
            *slot = arg;
        }
        a.len += 1;
    }
    a
}

fn utf8<'a>(op: &'static str, b: &'a [u8]) -> Result<&'a str, ProtocolError> {
    std::str::from_utf8(b).map_err(|_| ProtocolError::InvalidArgs {
        op,
        reason: "not UTF-8".into(),
    })
}

fn number(op: &'static str, b: &[u8]) -> Result<u64, ProtocolError> {
    let s = utf8(op, b)?;
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(ProtocolError::InvalidArgs {
            op,
            reason: format!("{s:?} is not a size"),
        });
    }
    s.parse().map_err(|_| ProtocolError::InvalidArgs {
        op,
        reason: format!("{s:?} is not a size"),
    })
}

fn bad_args(op: &'static str, n: usize) -> ProtocolError {
    ProtocolError::InvalidArgs {
        op,
        reason: format!("unexpected number of arguments ({n})"),
    }
}

impl Parser {
    /// `text` as a validated subject, reusing the previous one if equal.
    fn subject(&mut self, text: &str) -> Result<Subject, SubjectError> {
        if let Some(s) = self.last_subject.as_ref().filter(|s| s.as_str() == text) {
            return Ok(s.clone());
        }
        let s = Subject::new(text)?;
        self.last_subject = Some(s.clone());
        Ok(s)
    }

    /// A parser with the given limits (bytes).
    pub fn new(max_control_line: usize, max_payload: usize) -> Self {
        Self {
            max_control_line,
            max_payload,
            pending: None,
            last_subject: None,
        }
    }

    /// Takes one operation off the front of `buf`; `Ok(None)` means "need
    /// more bytes". After an error with `is_fatal()`, stop parsing.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<ClientOp>, ProtocolError> {
        if let Some(p) = &self.pending {
            if buf.len() < p.total + 1 {
                return Ok(None);
            }
            // The payload must be followed by exactly "\r\n".
            match (buf[p.total], buf.get(p.total + 1)) {
                (b'\r', Some(b'\n')) => {}
                (b'\r', None) => return Ok(None),
                _ => return Err(ProtocolError::PayloadSize),
            }
            let Some(p) = self.pending.take() else {
                return Ok(None);
            };
            let mut body = buf.split_to(p.total).freeze();
            buf.advance(2);
            let headers = match p.header_len {
                Some(h) => {
                    let hdr = body.split_to(h);
                    check_headers(&hdr)?;
                    Some(hdr)
                }
                None => None,
            };
            let subject = p.subject.map_err(ProtocolError::InvalidPublishSubject)?;
            return Ok(Some(ClientOp::Pub {
                subject,
                reply: p.reply,
                headers,
                payload: body,
            }));
        }
        let Some(nl) = find_newline(buf, self.max_control_line) else {
            if buf.len() > self.max_control_line {
                return Err(ProtocolError::MaxControlLine {
                    limit: self.max_control_line,
                });
            }
            return Ok(None);
        };
        let line = buf.split_to(nl + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (verb, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let mut upper = [0u8; 8];
        if verb.len() > upper.len() {
            return Err(ProtocolError::UnknownOp(
                String::from_utf8_lossy(verb).into_owned(),
            ));
        }
        for (u, v) in upper.iter_mut().zip(verb) {
            *u = v.to_ascii_uppercase();
        }
        match &upper[..verb.len()] {
            b"PUB" => self.parse_pub(rest, false, buf),
            b"HPUB" => self.parse_pub(rest, true, buf),
            b"SUB" => parse_sub(rest).map(Some),
            b"UNSUB" => parse_unsub(rest).map(Some),
            b"PING" => Ok(Some(ClientOp::Ping)),
            b"PONG" => Ok(Some(ClientOp::Pong)),
            b"CONNECT" => {
                let opts: ConnectOptions = serde_json::from_slice(rest)
                    .map_err(|e| ProtocolError::BadConnect(e.to_string()))?;
                Ok(Some(ClientOp::Connect(Box::new(opts))))
            }
            _ => Err(ProtocolError::UnknownOp(
                String::from_utf8_lossy(verb).into_owned(),
            )),
        }
    }

    fn parse_pub(
        &mut self,
        rest: &[u8],
        hpub: bool,
        buf: &mut BytesMut,
    ) -> Result<Option<ClientOp>, ProtocolError> {
        let op = if hpub { "HPUB" } else { "PUB" };
        let a = args(rest);
        let nums = if hpub { 2 } else { 1 };
        if a.len() != nums + 1 && a.len() != nums + 2 {
            return Err(bad_args(op, a.len()));
        }
        let subject = utf8(op, a[0])?;
        let reply = if a.len() == nums + 2 {
            Some(utf8(op, a[1])?)
        } else {
            None
        };
        let sizes = &a.as_slice()[a.len() - nums..];
        let total = number(op, sizes[nums - 1])?;
        if total > self.max_payload as u64 {
            return Err(ProtocolError::MaxPayload {
                size: total,
                max: self.max_payload,
            });
        }
        let total = usize::try_from(total).map_err(|_| bad_args(op, a.len()))?;
        let header_len = if hpub {
            let h = usize::try_from(number(op, sizes[0])?).unwrap_or(usize::MAX);
            if h > total || h < 12 {
                return Err(ProtocolError::BadHeaders(format!(
                    "header size {h} does not fit in total size {total}"
                )));
            }
            Some(h)
        } else {
            None
        };
        // A fatal problem with the reply subject would desynchronise nothing,
        // but the client clearly misbehaves; treat it like the subject.
        let reply = reply.map(Subject::new).transpose();
        let subject = self.subject(subject).and_then(|s| Ok((s, reply?)));
        let (subject, reply) = match subject {
            Ok((s, r)) => (Ok(s), r),
            Err(e) => (Err(e), None),
        };
        self.pending = Some(PendingPub {
            subject,
            reply,
            header_len,
            total,
        });
        self.parse(buf)
    }
}

fn parse_sub(rest: &[u8]) -> Result<ClientOp, ProtocolError> {
    let a = args(rest);
    let (subject, queue, sid) = match a.as_slice() {
        [s, sid] => (*s, None, *sid),
        [s, q, sid] => (*s, Some(*q), *sid),
        _ => return Err(bad_args("SUB", a.len())),
    };
    let subject = utf8("SUB", subject)?;
    validate_pattern(subject)?;
    let queue = match queue {
        Some(q) => {
            let q = utf8("SUB", q)?;
            validate_subject(q)?;
            Some(q.to_owned())
        }
        None => None,
    };
    Ok(ClientOp::Sub {
        subject: subject.to_owned(),
        queue,
        sid: utf8("SUB", sid)?.to_owned(),
    })
}

fn parse_unsub(rest: &[u8]) -> Result<ClientOp, ProtocolError> {
    let a = args(rest);
    let (sid, max) = match a.as_slice() {
        [sid] => (*sid, None),
        [sid, max] => (*sid, Some(number("UNSUB", max)?)),
        _ => return Err(bad_args("UNSUB", a.len())),
    };
    Ok(ClientOp::Unsub {
        sid: utf8("UNSUB", sid)?.to_owned(),
        max,
    })
}

/// Checks a NATS header block: `NATS/1.0[ status[ text]]\r\n` then
/// `Key: value\r\n` lines, then `\r\n`.
pub fn check_headers(h: &[u8]) -> Result<(), ProtocolError> {
    let bad = |m: &str| Err(ProtocolError::BadHeaders(m.into()));
    if !h.starts_with(b"NATS/1.0") {
        return bad("must start with NATS/1.0");
    }
    if !h.ends_with(b"\r\n\r\n") {
        return bad("must end with an empty line");
    }
    let body = &h[..h.len() - 2];
    let mut lines = body.split(|b| *b == b'\n');
    let _version = lines.next();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some(line) = line.strip_suffix(b"\r") else {
            return bad("line without \\r\\n");
        };
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return bad("header line without ':'");
        };
        if colon == 0
            || line[..colon]
                .iter()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return bad("invalid header name");
        }
    }
    Ok(())
}

/// What the server advertises in `INFO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    /// Unique id of this server instance.
    pub server_id: String,
    /// Name.
    pub server_name: String,
    /// Version string.
    pub version: String,
    /// Implementation (nats-server puts the Go version here).
    pub go: String,
    /// Listening host.
    pub host: String,
    /// Listening port.
    pub port: u16,
    /// `HPUB`/`HMSG` supported.
    pub headers: bool,
    /// Largest payload accepted.
    pub max_payload: usize,
    /// Protocol level.
    pub proto: u8,
    /// This connection's id.
    pub client_id: u64,
    /// The client's address as seen by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
}

/// `INFO {json}\r\n`.
pub fn encode_info(info: &ServerInfo, out: &mut BytesMut) {
    out.put_slice(b"INFO ");
    // Serialising this plain struct cannot fail.
    out.put_slice(serde_json::to_string(info).unwrap_or_default().as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends a decimal number.
fn put_num(out: &mut BytesMut, n: usize) {
    let mut b = [0u8; 20];
    let mut i = b.len();
    let mut n = n;
    loop {
        i -= 1;
        b[i] = b"0123456789"[n % 10];
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&b[i..]);
}

/// `MSG subject sid [reply] len\r\npayload\r\n`.
pub fn encode_msg(
    out: &mut BytesMut,
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    payload: &[u8],
) {
    out.reserve(subject.len() + sid.len() + reply.map_or(0, str::len) + payload.len() + 32);
    put_envelope(out, b"MSG ", subject, sid, reply);
    put_num(out, payload.len());
    out.put_slice(b"\r\n");
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// The common start of `MSG` and `HMSG`: `VERB subject sid [reply] `.
fn put_envelope(out: &mut BytesMut, verb: &[u8], subject: &str, sid: &str, reply: Option<&str>) {
    out.put_slice(verb);
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(sid.as_bytes());
    out.put_u8(b' ');
    if let Some(r) = reply {
        out.put_slice(r.as_bytes());
        out.put_u8(b' ');
    }
}

/// `HMSG subject sid [reply] hdr_len total_len\r\nheaders payload\r\n`.
pub fn encode_hmsg(
    out: &mut BytesMut,
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
) {
    out.reserve(
        subject.len() + sid.len() + reply.map_or(0, str::len) + headers.len() + payload.len() + 48,
    );
    put_envelope(out, b"HMSG ", subject, sid, reply);
    put_num(out, headers.len());
    out.put_u8(b' ');
    put_num(out, headers.len() + payload.len());
    out.put_slice(b"\r\n");
    out.put_slice(headers);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// `PING\r\n`.
pub const PING: &[u8] = b"PING\r\n";
/// `PONG\r\n`.
pub const PONG: &[u8] = b"PONG\r\n";
/// `+OK\r\n`.
pub const OK: &[u8] = b"+OK\r\n";

/// `-ERR 'text'\r\n` (quotes in the text are replaced so the line stays parseable).
pub fn encode_err(out: &mut BytesMut, text: &str) {
    out.put_slice(b"-ERR '");
    for c in text.chars() {
        let c = match c {
            '\'' => '"',
            '\r' | '\n' => ' ',
            c => c,
        };
        let mut b = [0u8; 4];
        out.put_slice(c.encode_utf8(&mut b).as_bytes());
    }
    out.put_slice(b"'\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> Parser {
        Parser::new(4096, 1024)
    }

    fn parse_all(p: &mut Parser, input: &[u8]) -> Vec<Result<ClientOp, ProtocolError>> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match p.parse(&mut buf) {
                Ok(Some(op)) => out.push(Ok(op)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        break;
                    }
                }
            }
        }
        out
    }

    fn pub_op(
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> ClientOp {
        ClientOp::Pub {
            subject: Subject::new(subject).unwrap(),
            reply: reply.map(|r| Subject::new(r).unwrap()),
            headers: headers.map(Bytes::copy_from_slice),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn all_client_ops() {
        let input = b"CONNECT {\"verbose\":true,\"headers\":true,\"name\":\"t\",\"extra\":[1]}\r\n\
            PUB a.b 5\r\nhello\r\n\
            pub a.b reply.1 0\r\n\r\n\
            HPUB a.b 18 23\r\nNATS/1.0\r\nK: v\r\n\r\nhello\r\n\
            SUB a.* 1\r\n\
            SUB a.> workers 2\r\n\
            UNSUB 1\r\n\
            UNSUB 2 10\r\n\
            PING\r\nPONG\r\nping\n";
        let ops = parse_all(&mut parser(), input);
        let ops: Vec<ClientOp> = ops.into_iter().map(Result::unwrap).collect();
        let ClientOp::Connect(c) = &ops[0] else {
            panic!()
        };
        assert!(c.verbose && c.headers && c.echo);
        assert_eq!(c.name.as_deref(), Some("t"));
        assert_eq!(ops[1], pub_op("a.b", None, None, b"hello"));
        assert_eq!(ops[2], pub_op("a.b", Some("reply.1"), None, b""));
        assert_eq!(
            ops[3],
            pub_op("a.b", None, Some(b"NATS/1.0\r\nK: v\r\n\r\n"), b"hello")
        );
        assert_eq!(
            ops[4],
            ClientOp::Sub {
                subject: "a.*".into(),
                queue: None,
                sid: "1".into()
            }
        );
        assert_eq!(
            ops[5],
            ClientOp::Sub {
                subject: "a.>".into(),
                queue: Some("workers".into()),
                sid: "2".into()
            }
        );
        assert_eq!(
            ops[6],
            ClientOp::Unsub {
                sid: "1".into(),
                max: None
            }
        );
        assert_eq!(
            ops[7],
            ClientOp::Unsub {
                sid: "2".into(),
                max: Some(10)
            }
        );
        assert_eq!(&ops[8..], &[ClientOp::Ping, ClientOp::Pong, ClientOp::Ping]);
    }

    #[test]
    fn byte_at_a_time() {
        let input = b"PUB a 3\r\nabc\r\nHPUB b r 12 14\r\nNATS/1.0\r\n\r\nxy\r\nPING\r\n";
        let mut p = parser();
        let mut buf = BytesMut::new();
        let mut ops = Vec::new();
        for b in input {
            buf.put_u8(*b);
            while let Some(op) = p.parse(&mut buf).unwrap() {
                ops.push(op);
            }
        }
        assert_eq!(ops.len(), 3);
        assert_eq!(
            ops[1],
            pub_op("b", Some("r"), Some(b"NATS/1.0\r\n\r\n"), b"xy")
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn unknown_verbs() {
        for bad in [
            &b"FOO bar\r\n"[..],
            b"PUBLISH a 1\r\n",
            b"\r\n",
            b"\x00\x01\x02\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            let r = parse_all(&mut parser(), bad);
            assert!(
                matches!(r[0], Err(ProtocolError::UnknownOp(_))),
                "{bad:?}: {r:?}"
            );
            assert!(r[0].as_ref().unwrap_err().is_fatal());
        }
        assert_eq!(
            ProtocolError::UnknownOp("x".into()).err_text(),
            "Unknown Protocol Operation"
        );
    }

    #[test]
    fn payload_longer_than_declared() {
        let r = parse_all(&mut parser(), b"PUB a 3\r\nabcdef\r\n");
        assert_eq!(r, vec![Err(ProtocolError::PayloadSize)]);
        // Shorter than declared: the following bytes are taken as payload and
        // the terminator check catches it.
        let r = parse_all(&mut parser(), b"PUB a 10\r\nabc\r\nPING\r\nxxxxxx");
        assert_eq!(r, vec![Err(ProtocolError::PayloadSize)]);
    }

    #[test]
    fn payload_over_max_is_refused_before_buffering() {
        let mut p = parser();
        let mut buf = BytesMut::from(&b"PUB a 1025\r\n"[..]);
        assert_eq!(
            p.parse(&mut buf),
            Err(ProtocolError::MaxPayload {
                size: 1025,
                max: 1024
            })
        );
        let mut buf = BytesMut::from(&b"HPUB a 12 99999999999999999\r\n"[..]);
        assert!(matches!(
            parser().parse(&mut buf),
            Err(ProtocolError::MaxPayload { .. })
        ));
        let mut buf = BytesMut::from(&b"PUB a 999999999999999999999999\r\n"[..]);
        assert!(matches!(
            parser().parse(&mut buf),
            Err(ProtocolError::InvalidArgs { .. })
        ));
        assert_eq!(
            ProtocolError::MaxPayload { size: 1, max: 0 }.err_text(),
            "Maximum Payload Violation"
        );
    }

    #[test]
    fn huge_control_line() {
        let mut p = parser();
        let mut buf = BytesMut::from(&vec![b'A'; 4096][..]);
        assert_eq!(p.parse(&mut buf), Ok(None), "at the limit, still waiting");
        buf.put_u8(b'A');
        assert_eq!(
            p.parse(&mut buf),
            Err(ProtocolError::MaxControlLine { limit: 4096 })
        );
        // A newline beyond the limit does not help.
        let mut buf = BytesMut::from(&[vec![b'A'; 5000], b"\r\n".to_vec()].concat()[..]);
        assert!(matches!(
            parser().parse(&mut buf),
            Err(ProtocolError::MaxControlLine { .. })
        ));
    }

    #[test]
    fn garbage_headers() {
        for bad in [
            &b"HPUB a 12 12\r\nHTTP/1.1 200\r\n"[..],
            b"HPUB a 12 14\r\nNATS/1.0\r\nxy\r\n\r\n",
            b"HPUB a 21 21\r\nNATS/1.0\r\nnocolon\r\n\r\n\r\n",
            b"HPUB a 5 5\r\nNATS/\r\n",
            b"HPUB a 30 20\r\n",
        ] {
            let r = parse_all(&mut parser(), bad);
            assert!(
                matches!(r.last(), Some(Err(ProtocolError::BadHeaders(_)))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        check_headers(b"NATS/1.0 503\r\n\r\n").unwrap();
        check_headers(b"NATS/1.0\r\nA: 1\r\nB-c: two words\r\n\r\n").unwrap();
    }

    #[test]
    fn invalid_subjects_are_not_fatal_and_consume_the_payload() {
        let r = parse_all(
            &mut parser(),
            b"PUB a..b 3\r\nabc\r\nPUB a.* 1\r\nx\r\nSUB a.>.b 1\r\nSUB a b c d\r\nPING\r\n",
        );
        assert!(matches!(
            r[0],
            Err(ProtocolError::InvalidPublishSubject(
                SubjectError::EmptyToken { .. }
            ))
        ));
        assert!(matches!(
            r[1],
            Err(ProtocolError::InvalidPublishSubject(
                SubjectError::WildcardInSubject { .. }
            ))
        ));
        assert!(matches!(
            r[2],
            Err(ProtocolError::InvalidSubject(
                SubjectError::FullWildcardNotLast { .. }
            ))
        ));
        assert!(matches!(
            r[3],
            Err(ProtocolError::InvalidArgs { op: "SUB", .. })
        ));
        assert_eq!(r.len(), 4, "InvalidArgs is fatal");
        let r = parse_all(&mut parser(), b"PUB a..b 3\r\nabc\r\nPING\r\n");
        assert_eq!(r[1], Ok(ClientOp::Ping));
    }

    #[test]
    fn bad_arguments() {
        for bad in [
            &b"PUB\r\n"[..],
            b"PUB a\r\n",
            b"PUB a b c d\r\n",
            b"PUB a -1\r\n",
            b"PUB a 1x\r\n",
            b"UNSUB\r\n",
            b"UNSUB 1 x\r\n",
            b"SUB a\r\n",
            b"CONNECT {nope\r\n",
        ] {
            let r = parse_all(&mut parser(), bad);
            assert!(r[0].as_ref().unwrap_err().is_fatal(), "{bad:?}: {r:?}");
        }
    }

    #[test]
    fn encoders() {
        let mut b = BytesMut::new();
        encode_msg(&mut b, "a.b", "7", None, b"hi");
        encode_msg(&mut b, "a.b", "7", Some("r.1"), b"");
        encode_hmsg(&mut b, "a", "1", None, b"NATS/1.0\r\n\r\n", b"xy");
        encode_err(&mut b, "it's bad\r\n");
        assert_eq!(
            &b[..],
            &b"MSG a.b 7 2\r\nhi\r\nMSG a.b 7 r.1 0\r\n\r\nHMSG a 1 12 14\r\nNATS/1.0\r\n\r\nxy\r\n-ERR 'it\"s bad  '\r\n"[..]
        );
        let mut b = BytesMut::new();
        encode_info(
            &ServerInfo {
                server_id: "id".into(),
                server_name: "n".into(),
                version: "0.1.0".into(),
                go: "rust".into(),
                host: "127.0.0.1".into(),
                port: 4222,
                headers: true,
                max_payload: 1024,
                proto: 1,
                client_id: 3,
                client_ip: None,
            },
            &mut b,
        );
        assert!(b.starts_with(b"INFO {\"server_id\":\"id\""));
        assert!(b.ends_with(b"}\r\n"));
        let v: serde_json::Value = serde_json::from_slice(&b[5..b.len() - 2]).unwrap();
        assert_eq!(v["max_payload"], 1024);
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics_and_respects_limits(chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..16)) {
            let mut p = Parser::new(128, 64);
            let mut buf = BytesMut::new();
            'outer: for c in chunks {
                buf.put_slice(&c);
                loop {
                    match p.parse(&mut buf) {
                        Ok(Some(ClientOp::Pub { payload, headers, .. })) => {
                            proptest::prop_assert!(payload.len() + headers.map_or(0, |h| h.len()) <= 64);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) if e.is_fatal() => break 'outer,
                        Err(_) => {}
                    }
                }
                // Never more buffered than a control line plus a payload.
                proptest::prop_assert!(buf.len() <= 128 + 1 + 64 + 2 + 64);
            }
        }
    }
}
