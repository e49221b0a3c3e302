//! JSON import and export, in the format of the earlier JSON cache that
//! users migrate from.
//!
//! The file is one object. Each key is an MD5 in hex; each value is either
//! - a string: the response, imported as a **plain key** named by the JSON key
//!   (readable with `GET <key>`), or
//! - an object with `response` and optionally `agent`, `prompt`, `variant`
//!   and `expires_at_ms` (Unix milliseconds). In place of the `response`
//!   string it may hold `response_base64`: the response's bytes in standard
//!   base64 (padded), for a response that is not UTF-8 and so cannot be a
//!   JSON string; exactly one of the two is given. With both `agent` and `prompt`
//!   it is an **agent entry**, stored under the MD5 of our encoding (see the
//!   crate docs); when that differs from the JSON key (the old cache hashed
//!   differently) the entry is still imported and counted as `rekeyed`.
//!   Without them it is a plain key, like a string value. Other fields are
//!   ignored.
//!
//! The whole file is checked before any entry is stored: a key that appears
//! twice or a value of another shape is refused, naming the key, and nothing
//! is imported.
//!
//! Export writes agent entries as objects under their MD5 hex, plain keys
//! without expiry as strings, and plain keys with one as objects with
//! `response` and `expires_at_ms`, so an export imports back to the same
//! state. A response that is not UTF-8 is written as `response_base64` in an
//! object (never altered into a string), so it too comes back byte for byte.
//! An entry whose plain key, agent, prompt or variant is not UTF-8 cannot be
//! written (those are JSON strings and the JSON key); it is skipped and
//! counted in [`ExportReport::skipped_binary`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::cache::{Cache, CacheError, SetCondition};
use crate::key::{md5_hex, parse_md5_hex, Request};
use crate::store::Key;

/// Largest file `import_json_file` reads (1 GiB): the whole object is parsed
/// in memory, so the bound is on the input.
pub const MAX_IMPORT_BYTES: u64 = 1 << 30;

/// Errors of import and export.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Reading or writing the file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The input is larger than allowed.
    #[error("import file is larger than {max} bytes")]
    TooLarge {
        /// Limit.
        max: u64,
    },
    /// The input is not the expected JSON.
    #[error("import: not a cache JSON file, nothing was imported: {0}")]
    Parse(#[source] serde_json::Error),
    /// Writing JSON failed.
    #[error("export: {0}")]
    Write(#[source] serde_json::Error),
    /// The cache refused to persist an entry (the import stops there; the
    /// entries before it are in).
    #[error(
        "import stopped at key {key:?}: {source}; before it, {} agent entries and {} plain keys \
         were imported ({} already expired, {} refused)",
        imported.agent_entries, imported.plain_entries, imported.expired, imported.refused
    )]
    Cache {
        /// JSON key of the entry.
        key: String,
        /// Cause.
        #[source]
        source: CacheError,
        /// What went in before it.
        imported: Box<ImportReport>,
    },
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Agent entries imported.
    pub agent_entries: u64,
    /// Plain keys imported.
    pub plain_entries: u64,
    /// Agent entries whose JSON key was not the MD5 of our encoding.
    pub rekeyed: u64,
    /// Entries already expired, skipped.
    pub expired: u64,
    /// Entries refused by the cache limits (value too large), skipped; the
    /// first few keys are in `refused_keys`.
    pub refused: u64,
    /// Up to 16 refused keys, for the operator.
    pub refused_keys: Vec<String>,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// Entries written.
    pub written: u64,
    /// Entries skipped because a plain key, agent, prompt or variant is not
    /// UTF-8 (a response that is not goes out as `response_base64`).
    pub skipped_binary: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct JsonEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
}

impl JsonEntry {
    /// An entry object for `response`: a string if it is UTF-8, else
    /// base64.
    fn with_response(response: &[u8]) -> Self {
        let (text, base64) = match std::str::from_utf8(response) {
            Ok(t) => (Some(t.to_owned()), None),
            Err(_) => (None, Some(BASE64.encode(response))),
        };
        Self {
            agent: None,
            prompt: None,
            variant: None,
            response: text,
            response_base64: base64,
            expires_at_ms: None,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum JsonValue {
    Text(String),
    Entry(JsonEntry),
}

/// One checked entry of an import file.
#[derive(Debug)]
struct Entry {
    agent: Option<String>,
    prompt: Option<String>,
    variant: Option<String>,
    response: Vec<u8>,
    expires_at_ms: Option<u64>,
}

impl Entry {
    /// The entry of an object: exactly one of `response` and
    /// `response_base64`, the latter valid base64.
    fn from_json(key: &str, e: JsonEntry) -> Result<Self, String> {
        let response = match (e.response, e.response_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => BASE64
                .decode(b64.as_bytes())
                .map_err(|err| format!("entry {key:?}: response_base64 is not base64: {err}"))?,
            (Some(_), Some(_)) => {
                return Err(format!(
                    "entry {key:?} has both \"response\" and \"response_base64\"; give one"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "entry {key:?} has no \"response\" string (nor \"response_base64\")"
                ))
            }
        };
        Ok(Self {
            agent: e.agent,
            prompt: e.prompt,
            variant: e.variant,
            response,
            expires_at_ms: e.expires_at_ms,
        })
    }
}

const MAX_REFUSED_KEYS: usize = 16;

/// The file's entries in order, every one checked before any is stored: a
/// duplicate key (which a map would keep only the last of) and a value that
/// is neither a response string nor an entry object are refused, naming the
/// key.
struct Entries(Vec<(String, Entry)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of md5-hex keys to responses")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                use serde::de::Error as _;
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format!(
                            "key {key:?} appears more than once"
                        )));
                    }
                    let value: serde_json::Value = map.next_value()?;
                    let entry = match value {
                        serde_json::Value::String(response) => Entry {
                            agent: None,
                            prompt: None,
                            variant: None,
                            response: response.into_bytes(),
                            expires_at_ms: None,
                        },
                        v @ serde_json::Value::Object(_) => {
                            let e = serde_json::from_value(v)
                                .map_err(|e| A::Error::custom(format!("entry {key:?}: {e}")))?;
                            Entry::from_json(&key, e).map_err(A::Error::custom)?
                        }
                        other => {
                            return Err(A::Error::custom(format!(
                                "entry {key:?} is {other}, not a response string or an \
                                 object with a \"response\" string (or \"response_base64\")"
                            )))
                        }
                    };
                    out.push((key, entry));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Import entries from JSON read from `r` (at most `max_bytes`). The whole
/// input is read and checked first, so bad input imports nothing; only a
/// failure to persist can stop an import part-way, and its error says what
/// went in before it.
pub fn import_json(cache: &Cache, r: impl Read, max_bytes: u64) -> Result<ImportReport, JsonError> {
    let mut limited = r.take(max_bytes.saturating_add(1));
    let mut text = Vec::new();
    limited
        .read_to_end(&mut text)
        .map_err(|source| JsonError::Io {
            op: "read",
            path: PathBuf::from("<input>"),
            source,
        })?;
    if text.len() as u64 > max_bytes {
        return Err(JsonError::TooLarge { max: max_bytes });
    }
    let Entries(entries) = serde_json::from_slice(&text).map_err(JsonError::Parse)?;
    drop(text);
    let mut report = ImportReport::default();
    let now = cache.now_ms();
    for (json_key, entry) in entries {
        let ttl = match entry.expires_at_ms {
            Some(at) if at <= now => {
                report.expired += 1;
                continue;
            }
            Some(at) => Some(Duration::from_millis(at - now)),
            None => None,
        };
        let response = Bytes::from(entry.response);
        let (result, agent) = match (&entry.agent, &entry.prompt) {
            (Some(agent), Some(prompt)) => {
                let variant = entry.variant.as_deref().unwrap_or("");
                let md5 =
                    Request::new(agent.as_bytes(), prompt.as_bytes(), variant.as_bytes()).md5();
                let rekeyed = parse_md5_hex(json_key.as_bytes()) != Some(md5);
                let result = cache.put(
                    agent.as_bytes(),
                    prompt.as_bytes(),
                    variant.as_bytes(),
                    response,
                    ttl,
                );
                (result, Some(rekeyed))
            }
            _ => (
                cache
                    .set_plain(json_key.as_bytes(), response, ttl, SetCondition::Always)
                    .map(|_| ()),
                None,
            ),
        };
        match (result, agent) {
            (Ok(()), Some(rekeyed)) => {
                report.agent_entries += 1;
                report.rekeyed += u64::from(rekeyed);
            }
            (Ok(()), None) => report.plain_entries += 1,
            (Err(CacheError::Refused(_)), _) => {
                report.refused += 1;
                if report.refused_keys.len() < MAX_REFUSED_KEYS {
                    report.refused_keys.push(json_key);
                }
            }
            (Err(source), _) => {
                return Err(JsonError::Cache {
                    key: json_key,
                    source,
                    imported: Box::new(report),
                })
            }
        }
    }
    Ok(report)
}

/// Export every live entry as JSON to `w`.
pub fn export_json(cache: &Cache, w: impl Write) -> Result<ExportReport, JsonError> {
    let mut report = ExportReport::default();
    let mut ser = serde_json::Serializer::pretty(w);
    let mut map = ser.serialize_map(None).map_err(JsonError::Write)?;
    for (key, entry) in cache.snapshot() {
        let (name, value) = match (&key, entry.owner.as_ref()) {
            (Key::Agent(md5), Some(owner)) => {
                let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
                let (Some(agent), Some(prompt), Some(variant)) = (
                    text(owner.agent()),
                    text(owner.prompt()),
                    text(owner.variant()),
                ) else {
                    report.skipped_binary += 1;
                    continue;
                };
                (
                    md5_hex(md5),
                    JsonValue::Entry(JsonEntry {
                        agent: Some(agent),
                        prompt: Some(prompt),
                        variant: (!variant.is_empty()).then_some(variant),
                        expires_at_ms: entry.expires_at,
                        ..JsonEntry::with_response(&entry.value)
                    }),
                )
            }
            (Key::Plain(k), _) => {
                let Ok(name) = String::from_utf8(k.to_vec()) else {
                    report.skipped_binary += 1;
                    continue;
                };
                let value = match (entry.expires_at, std::str::from_utf8(&entry.value)) {
                    (None, Ok(text)) => JsonValue::Text(text.to_owned()),
                    (at, _) => JsonValue::Entry(JsonEntry {
                        expires_at_ms: at,
                        ..JsonEntry::with_response(&entry.value)
                    }),
                };
                (name, value)
            }
            // An agent key without its owner is never stored.
            (Key::Agent(_), None) => continue,
        };
        map.serialize_entry(&name, &value)
            .map_err(JsonError::Write)?;
        report.written += 1;
    }
    map.end().map_err(JsonError::Write)?;
    Ok(report)
}

/// Import from a file (at most [`MAX_IMPORT_BYTES`]).
pub fn import_json_file(cache: &Cache, path: &Path) -> Result<ImportReport, JsonError> {
    let io = |op| {
        move |source| JsonError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let f = File::open(path).map_err(io("open"))?;
    let len = f.metadata().map_err(io("stat"))?.len();
    if len > MAX_IMPORT_BYTES {
        return Err(JsonError::TooLarge {
            max: MAX_IMPORT_BYTES,
        });
    }
    import_json(cache, BufReader::new(f), MAX_IMPORT_BYTES)
}

/// Export to a file atomically: write `<path>.tmp`, fsync, rename.
pub fn export_json_file(cache: &Cache, path: &Path) -> Result<ExportReport, JsonError> {
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| JsonError::Io {
            op,
            path: p,
            source,
        }
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let f = File::create(&tmp).map_err(io("create", &tmp))?;
    let mut w = BufWriter::new(f);
    let report = export_json(cache, &mut w)?;
    w.write_all(b"\n").map_err(io("write", &tmp))?;
    let f = w
        .into_inner()
        .map_err(|e| io("write", &tmp)(e.into_error()))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, KeyTtl};
    use crate::clock::ManualClock;
    use std::sync::Arc;

    fn cache() -> (Arc<ManualClock>, Cache) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let cache = Cache::with_clock(CacheConfig::default(), clock.clone());
        (clock, cache)
    }

    #[test]
    fn imports_the_legacy_format() {
        let (_, c) = cache();
        let md5 = md5_hex(&Request::new(b"bot", b"hi", b"").md5());
        let input = format!(
            r#"{{
              "{md5}": {{"agent": "bot", "prompt": "hi", "response": "hello", "created": 5}},
              "0123456789abcdef0123456789abcdef": {{"agent": "bot", "prompt": "bye", "variant": "m", "response": "ciao"}},
              "fedcba9876543210fedcba9876543210": "plain answer",
              "ffffffffffffffffffffffffffffffff": {{"response": "no owner"}},
              "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee": {{"response": "old", "expires_at_ms": 5}}
            }}"#
        );
        let r = import_json(&c, input.as_bytes(), 1 << 20).unwrap();
        assert_eq!(
            r,
            ImportReport {
                agent_entries: 2,
                plain_entries: 2,
                rekeyed: 1,
                expired: 1,
                refused: 0,
                refused_keys: vec![],
            }
        );
        assert_eq!(c.get(b"bot", b"hi", b""), Some(Bytes::from("hello")));
        assert_eq!(c.get(b"bot", b"bye", b"m"), Some(Bytes::from("ciao")));
        assert_eq!(
            c.get_plain(b"fedcba9876543210fedcba9876543210"),
            Some(Bytes::from("plain answer"))
        );
        assert_eq!(
            c.get_plain(b"ffffffffffffffffffffffffffffffff"),
            Some(Bytes::from("no owner"))
        );
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn export_then_import_restores_the_state() {
        let (clock, a) = cache();
        a.put(b"bot", b"q1", b"", "r1", None).unwrap();
        a.put(b"bot", b"q2", b"gpt", "r2", Some(Duration::from_secs(60)))
            .unwrap();
        a.set_plain(b"k", "v", None, SetCondition::Always).unwrap();
        a.set_plain(
            b"t",
            "w",
            Some(Duration::from_secs(30)),
            SetCondition::Always,
        )
        .unwrap();
        // Responses that are not UTF-8: a plain key with and without expiry,
        // an agent entry. Each byte value once, so nothing is lost on the way.
        let every_byte: Vec<u8> = (0..=255u8).rev().collect();
        a.set_plain(b"bin", vec![0xff, 0xfe], None, SetCondition::Always)
            .unwrap();
        a.set_plain(
            b"bin-ttl",
            every_byte.clone(),
            Some(Duration::from_secs(30)),
            SetCondition::Always,
        )
        .unwrap();
        a.put(b"bot", b"q3", b"", every_byte.clone(), None).unwrap();
        // A plain key that is not UTF-8 cannot be a JSON key.
        a.set_plain(b"\xffkey", "v", None, SetCondition::Always)
            .unwrap();
        let mut out = Vec::new();
        let ex = export_json(&a, &mut out).unwrap();
        assert_eq!(
            ex,
            ExportReport {
                written: 7,
                skipped_binary: 1
            }
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains(r#""k": "v""#), "{text}");
        assert!(!text.contains('\u{fffd}'), "{text}");
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["bin"], serde_json::json!({"response_base64": "//4="}));

        let b = Cache::with_clock(CacheConfig::default(), clock);
        let im = import_json(&b, &out[..], 1 << 20).unwrap();
        assert_eq!((im.agent_entries, im.plain_entries, im.rekeyed), (3, 4, 0));
        assert_eq!(b.get_plain(b"bin"), Some(Bytes::from(vec![0xff, 0xfe])));
        assert_eq!(
            b.get_plain(b"bin-ttl"),
            Some(Bytes::from(every_byte.clone()))
        );
        assert_eq!(b.ttl(b"bin-ttl"), KeyTtl::Remaining(30_000));
        assert_eq!(b.get(b"bot", b"q3", b""), Some(Bytes::from(every_byte)));
        assert_eq!(b.get(b"bot", b"q1", b""), Some(Bytes::from("r1")));
        assert_eq!(b.get(b"bot", b"q2", b"gpt"), Some(Bytes::from("r2")));
        assert_eq!(b.ttl(b"t"), KeyTtl::Remaining(30_000));
        assert_eq!(b.ttl(b"k"), KeyTtl::Persistent);
        let hex = md5_hex(&Request::new(b"bot", b"q2", b"gpt").md5());
        assert_eq!(b.ttl(hex.as_bytes()), KeyTtl::Remaining(60_000));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let (_, c) = cache();
        assert!(matches!(
            import_json(&c, &b"[1,2]"[..], 1 << 20),
            Err(JsonError::Parse(_))
        ));
        assert!(matches!(
            import_json(&c, &br#"{"a": 5}"#[..], 1 << 20),
            Err(JsonError::Parse(_))
        ));
        assert!(matches!(
            import_json(&c, &br#"{"a": "bbbbbbbb"}"#[..], 8),
            Err(JsonError::TooLarge { max: 8 })
        ));
        let small = Cache::new(CacheConfig {
            max_value_bytes: 3,
            ..CacheConfig::default()
        });
        let r = import_json(&small, &br#"{"a": "long value", "b": "ok"}"#[..], 1 << 20).unwrap();
        assert_eq!((r.plain_entries, r.refused), (1, 1));
        assert_eq!(r.refused_keys, vec!["a".to_string()]);
        assert!(c.is_empty());
    }

    #[test]
    fn an_entry_that_is_not_a_response_imports_nothing_and_is_named() {
        let (_, c) = cache();
        // Keys come out of the object in order, so "a" would go in before
        // "b" is found wanting.
        for input in [
            &br#"{"a": "x", "b": 5, "c": "y"}"#[..],
            &br#"{"a": "x", "b": null}"#[..],
            &br#"{"a": "x", "b": {"agent": "bot", "prompt": "p"}}"#[..],
            &br#"{"a": "x", "b": {"response": 7}}"#[..],
        ] {
            let e = import_json(&c, input, 1 << 20).unwrap_err();
            assert!(matches!(e, JsonError::Parse(_)), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(r#""b""#), "the bad entry is not named: {msg}");
            assert!(msg.contains("nothing was imported"), "{msg}");
            assert!(c.is_empty(), "a failed import stored entries: {msg}");
        }
    }

    #[test]
    fn response_base64_is_one_response_or_the_entry_is_refused() {
        let (_, c) = cache();
        let r = import_json(
            &c,
            &br#"{"a": {"response_base64": "AP8="}, "b": {"agent": "x", "prompt": "y", "response_base64": ""}}"#[..],
            1 << 20,
        )
        .unwrap();
        assert_eq!((r.plain_entries, r.agent_entries), (1, 1));
        assert_eq!(c.get_plain(b"a"), Some(Bytes::from(vec![0, 0xff])));
        assert_eq!(c.get(b"x", b"y", b""), Some(Bytes::new()));
        let (_, c) = cache();
        for (input, says) in [
            (
                &br#"{"a": "x", "b": {"response": "r", "response_base64": "AA=="}}"#[..],
                "both",
            ),
            (
                &br#"{"a": "x", "b": {"response_base64": "not base64!"}}"#[..],
                "not base64",
            ),
            (
                &br#"{"a": "x", "b": {"response_base64": 5}}"#[..],
                "invalid type",
            ),
            (
                &br#"{"a": "x", "b": {"agent": "x", "prompt": "y"}}"#[..],
                "no \"response\"",
            ),
        ] {
            let e = import_json(&c, input, 1 << 20).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, JsonError::Parse(_)), "{msg}");
            assert!(msg.contains(r#""b""#) && msg.contains(says), "{msg}");
            assert!(c.is_empty(), "a failed import stored entries: {msg}");
        }
    }

    #[test]
    fn a_duplicate_key_is_refused_instead_of_losing_a_value() {
        let (_, c) = cache();
        let e = import_json(
            &c,
            &br#"{"k": "first", "j": "x", "k": "second"}"#[..],
            1 << 20,
        )
        .unwrap_err();
        assert!(matches!(e, JsonError::Parse(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(r#""k""#) && msg.contains("more than once"),
            "{msg}"
        );
        assert!(c.is_empty());
    }

    #[test]
    fn a_refused_agent_entry_is_not_counted_as_rekeyed() {
        let small = Cache::new(CacheConfig {
            max_value_bytes: 3,
            ..CacheConfig::default()
        });
        let input = br#"{"0123456789abcdef0123456789abcdef": {"agent": "a", "prompt": "p", "response": "too long"}}"#;
        let r = import_json(&small, &input[..], 1 << 20).unwrap();
        assert_eq!((r.agent_entries, r.rekeyed, r.refused), (0, 0, 1));
    }

    #[test]
    fn file_round_trip_is_atomic() {
        let (_, c) = cache();
        c.set_plain(b"k", "v", None, SetCondition::Always).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        export_json_file(&c, &path).unwrap();
        assert!(!dir.path().join("cache.json.tmp").exists());
        let (_, d) = cache();
        assert_eq!(import_json_file(&d, &path).unwrap().plain_entries, 1);
        assert!(matches!(
            import_json_file(&d, &dir.path().join("missing.json")),
            Err(JsonError::Io { op: "open", .. })
        ));
    }
}
