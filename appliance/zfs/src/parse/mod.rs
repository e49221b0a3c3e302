//! Pure parsers for `zpool`/`zfs` output.
//!
//! * [`json`]: OpenZFS 2.3 `-j --json-int` forms (the runner's default).
//! * [`text`]: OpenZFS 2.1 scripted/parsable forms (`-Hp`, `status -p`).
//! * [`events`]: `zpool events [-H] [-v]`, whole or incrementally while
//!   following `zpool events -f`.
//!
//! Every parser takes `&str`, returns typed [`ParseError`]s that say which
//! command's output and which line or field was wrong, never panics, and
//! refuses input larger than [`MAX_OUTPUT_BYTES`] before looking at it.
//! Words ZFS may add later (states, vdev types, properties) are kept as
//! `Other(..)` values rather than rejected.

pub mod events;
pub mod json;
pub mod text;

use crate::model::{Dataset, Encryption, KeyStatus, Properties};

/// Largest command output any parser accepts (and the runner reads).
///
/// The largest capture we have is 650 KB (`zpool events -v` after a scrub
/// that found 372 checksum errors); a pool with hundreds of disks prints
/// well under 1 MB of status. 32 MiB leaves room for long event histories
/// while bounding memory if a binary misbehaves.
pub const MAX_OUTPUT_BYTES: usize = 32 * 1024 * 1024;

/// Deepest vdev nesting accepted (real pools: root/raidz/replacing/spare/disk
/// is 5).
pub const MAX_VDEV_DEPTH: usize = 16;

/// Why some output could not be parsed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The output was larger than [`MAX_OUTPUT_BYTES`].
    #[error("{what}: output of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Which output.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The JSON did not have the expected shape.
    #[error("{what}: invalid JSON: {message}")]
    Json {
        /// Which output.
        what: &'static str,
        /// serde_json's message (with line and column).
        message: String,
    },
    /// A line of text output could not be understood.
    #[error("{what}: line {line}: {reason}: {text:?}")]
    Line {
        /// Which output.
        what: &'static str,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
        /// The line (truncated to 200 bytes).
        text: String,
    },
    /// A required field or property was missing or malformed.
    #[error("{what}: {object}: field {field:?}: {reason}")]
    Field {
        /// Which output.
        what: &'static str,
        /// The pool, dataset or vdev it belongs to.
        object: String,
        /// The field or property.
        field: String,
        /// What was wrong.
        reason: String,
    },
}

pub(crate) fn check_size(what: &'static str, input: &str) -> Result<(), ParseError> {
    if input.len() > MAX_OUTPUT_BYTES {
        return Err(ParseError::TooLarge {
            what,
            len: input.len(),
            limit: MAX_OUTPUT_BYTES,
        });
    }
    Ok(())
}

pub(crate) fn line_error(
    what: &'static str,
    line: usize,
    reason: impl Into<String>,
    text: &str,
) -> ParseError {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ParseError::Line {
        what,
        line,
        reason: reason.into(),
        text: text[..end].to_owned(),
    }
}

/// Parses a size as ZFS prints it for humans (`35.0M`, `0B`, `12K`,
/// `1.50T`), 1024-based, or a plain integer. Returns `None` for anything
/// else (including `-`).
pub fn parse_human_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let shift = match unit {
        "B" => 0,
        "K" | "KB" | "KiB" => 10,
        "M" | "MB" | "MiB" => 20,
        "G" | "GB" | "GiB" => 30,
        "T" | "TB" | "TiB" => 40,
        "P" | "PB" | "PiB" => 50,
        "E" | "EB" | "EiB" => 60,
        _ => return None,
    };
    let value: f64 = num.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let bytes = value * 2f64.powi(shift);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // checked finite, non-negative; `as` saturates at u64::MAX
    Some(bytes.round() as u64)
}

/// Builds a [`Dataset`] from its properties (JSON or text); `used` and
/// `available` are required, the rest default to "none"/"off".
pub fn dataset_from_properties(
    what: &'static str,
    name: &str,
    props: &Properties,
) -> Result<Dataset, ParseError> {
    let field = |field: &str, reason: &str| ParseError::Field {
        what,
        object: name.to_owned(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    let required = |p: &str| -> Result<u64, ParseError> {
        match props.get(p) {
            None => Err(field(p, "missing")),
            Some(v) => v.parse().map_err(|_| field(p, "not an integer")),
        }
    };
    let optional_size = |p: &str| -> Result<Option<u64>, ParseError> {
        match props.get(p) {
            None | Some("-" | "none" | "0") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| field(p, "not an integer")),
        }
    };
    let encryption = match props.get("encryption") {
        None | Some("off" | "-") => Encryption::Off,
        Some(c) => Encryption::Cipher(c.to_owned()),
    };
    let keystatus = match props.get("keystatus") {
        None | Some("-" | "none") => None,
        Some("available") => Some(KeyStatus::Available),
        Some("unavailable") => Some(KeyStatus::Unavailable),
        Some(other) => Some(KeyStatus::Other(other.to_owned())),
    };
    Ok(Dataset {
        name: name.to_owned(),
        used: required("used")?,
        available: required("available")?,
        quota: optional_size("quota")?,
        refquota: optional_size("refquota")?,
        encryption,
        keystatus,
        compression: props.get("compression").unwrap_or("-").to_owned(),
        mountpoint: props.get("mountpoint").unwrap_or("-").to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes() {
        assert_eq!(parse_human_bytes("0B"), Some(0));
        assert_eq!(parse_human_bytes("12K"), Some(12 * 1024));
        assert_eq!(parse_human_bytes("35.0M"), Some(35 * 1024 * 1024));
        assert_eq!(parse_human_bytes("38.3M"), Some(40_160_461));
        assert_eq!(parse_human_bytes("1.50T"), Some(1_649_267_441_664));
        assert_eq!(parse_human_bytes("1234"), Some(1234));
        assert_eq!(parse_human_bytes("-"), None);
        assert_eq!(parse_human_bytes("M"), None);
        assert_eq!(parse_human_bytes("1.0Q"), None);
        assert_eq!(parse_human_bytes("-1K"), None);
        assert_eq!(parse_human_bytes("99999999999E"), Some(u64::MAX));
    }

    #[test]
    fn line_error_truncates_on_char_boundary() {
        let long = "é".repeat(300);
        let ParseError::Line { text, .. } = line_error("x", 1, "bad", &long) else {
            unreachable!("line_error builds Line");
        };
        assert!(text.len() <= 200);
    }
}
