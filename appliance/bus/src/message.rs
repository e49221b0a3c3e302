//! Messages, NATS headers, and how durable messages are stored.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::subject::Subject;

/// A message on the bus. Cloning is cheap (reference counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Where it was published.
    pub subject: Subject,
    /// Where replies go (request/reply).
    pub reply: Option<Subject>,
    /// A raw NATS header block (`NATS/1.0\r\nKey: value\r\n\r\n`); see [`Headers`].
    pub headers: Option<Bytes>,
    /// The body. Typed events are JSON.
    pub payload: Bytes,
    /// Sequence number in the durable log, for durable subjects.
    pub seq: Option<u64>,
    /// When it was published (unix ms).
    pub ts_ms: u64,
}

impl Message {
    /// The headers, parsed.
    pub fn headers(&self) -> Headers {
        self.headers
            .as_deref()
            .map(Headers::parse)
            .unwrap_or_default()
    }

    /// The payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// NATS headers: an optional status line and ordered key/value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Status code and description from the first line (`NATS/1.0 503`).
    pub status: Option<String>,
    /// Pairs in order; keys may repeat.
    pub entries: Vec<(String, String)>,
}

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pair (builder style). CR and LF in either part are replaced by
    /// spaces, and a key's ':' by '-', so the block always stays well formed.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds a pair; see [`with`](Self::with).
    pub fn insert(&mut self, key: &str, value: &str) {
        let clean = |s: &str, colon: bool| -> String {
            s.chars()
                .map(|c| match c {
                    '\r' | '\n' => ' ',
                    ':' if colon => '-',
                    c => c,
                })
                .collect()
        };
        let key = clean(key, true).replace(' ', "-");
        self.entries.push((key, clean(value, false)));
    }

    /// First value for `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Parses a header block leniently (the codec has already checked it).
    pub fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("NATS/1.0"))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let entries = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Self { status, entries }
    }

    /// The wire form.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(32);
        b.put_slice(b"NATS/1.0");
        if let Some(s) = &self.status {
            b.put_u8(b' ');
            b.put_slice(s.as_bytes());
        }
        b.put_slice(b"\r\n");
        for (k, v) in &self.entries {
            b.put_slice(k.as_bytes());
            b.put_slice(b": ");
            b.put_slice(v.as_bytes());
            b.put_slice(b"\r\n");
        }
        b.put_slice(b"\r\n");
        b.freeze()
    }
}

/// A durable message as stored in the record log (postcard). The sequence
/// number and timestamp are the log record's own.
#[derive(Serialize)]
struct StoredRef<'a> {
    subject: &'a str,
    reply: Option<&'a str>,
    #[serde(with = "serde_bytes")]
    headers: Option<&'a [u8]>,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

#[derive(Deserialize)]
struct StoredOwned {
    subject: String,
    reply: Option<String>,
    #[serde(with = "serde_bytes")]
    headers: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// Encodes a message for the log.
pub(crate) fn encode_stored(m: &Message) -> Vec<u8> {
    let r = StoredRef {
        subject: m.subject.as_str(),
        reply: m.reply.as_ref().map(Subject::as_str),
        headers: m.headers.as_deref(),
        payload: &m.payload,
    };
    // Serialising borrowed strings and bytes into a Vec cannot fail.
    postcard::to_allocvec(&r).unwrap_or_default()
}

/// Decodes a log record back into a message.
/// The subject of a stored message, without decoding the rest.
pub(crate) fn stored_subject(bytes: &[u8]) -> Option<&str> {
    // `StoredOwned` starts with the subject; postcard encodes a string the
    // same whether it is owned or borrowed.
    postcard::take_from_bytes::<&str>(bytes)
        .ok()
        .map(|(s, _)| s)
}

pub(crate) fn decode_stored(seq: u64, ts_ms: u64, bytes: &[u8]) -> Option<Message> {
    let s: StoredOwned = postcard::from_bytes(bytes).ok()?;
    Some(Message {
        subject: Subject::new(&s.subject).ok()?,
        reply: s.reply.as_deref().and_then(|r| Subject::new(r).ok()),
        headers: s.headers.map(Bytes::from),
        payload: Bytes::from(s.payload),
        seq: Some(seq),
        ts_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::check_headers;

    #[test]
    fn headers_round_trip_and_stay_well_formed() {
        let h = Headers::new()
            .with("Dlq-Error", "boom\r\nInjected: yes")
            .with("Bad:Key name", "v");
        let raw = h.encode();
        check_headers(&raw).unwrap();
        let p = Headers::parse(&raw);
        assert_eq!(p.get("dlq-error"), Some("boom  Injected: yes"));
        assert_eq!(p.get("Bad-Key-name"), Some("v"));
        assert_eq!(p.entries.len(), 2);
        let s = Headers::parse(b"NATS/1.0 503\r\n\r\n");
        assert_eq!(s.status.as_deref(), Some("503"));
    }

    #[test]
    fn stored_round_trip() {
        let m = Message {
            subject: Subject::new("storage.disk.sda").unwrap(),
            reply: Some(Subject::new("_INBOX.x").unwrap()),
            headers: Some(Headers::new().with("a", "b").encode()),
            payload: Bytes::from_static(b"{\"x\":1}"),
            seq: None,
            ts_ms: 0,
        };
        let enc = encode_stored(&m);
        let back = decode_stored(7, 99, &enc).unwrap();
        assert_eq!(back.seq, Some(7));
        assert_eq!(back.ts_ms, 99);
        assert_eq!(
            (back.subject, back.reply, back.headers, back.payload),
            (m.subject, m.reply, m.headers, m.payload)
        );
        assert!(decode_stored(1, 1, b"\xff\xff garbage").is_none());
    }
}
