//! Subjects and patterns (sans-IO).
//!
//! A subject is one or more tokens separated by `.`, such as
//! `storage.pool.tank.state`. A pattern may also use two wildcards, each
//! as a whole token: `*` matches exactly one token, and `>` matches one or
//! more tokens and may only be last. So `storage.*.tank.>` matches
//! `storage.pool.tank.state` but not `storage.pool.tank`.
//!
//! Rejected, with a [`SubjectError`] naming the position: an empty subject,
//! an empty token (`a..b`, `.a`, `a.`), whitespace or control characters
//! anywhere, a wildcard inside a token (`a*`, `>b`), `>` before the last
//! token, a wildcard in a subject used for publishing, and anything longer
//! than [`MAX_SUBJECT_LEN`] bytes.

use std::fmt;
use std::sync::Arc;

/// Longest subject or pattern accepted, in bytes. NATS itself sets no fixed
/// limit; 1 KiB is far above anything the appliance uses and keeps a hostile
/// client from making every match walk megabytes.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Why a subject or pattern is invalid. Positions are byte offsets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Nothing at all.
    #[error("subject is empty")]
    Empty,
    /// Longer than [`MAX_SUBJECT_LEN`].
    #[error("subject is {len} bytes long; the maximum is {MAX_SUBJECT_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Two dots in a row, or a dot at either end.
    #[error("empty token at byte {at} (two dots in a row, or a dot at the start or end)")]
    EmptyToken {
        /// Byte offset of the empty token.
        at: usize,
    },
    /// A space, tab, newline or other control character.
    #[error("whitespace or control character at byte {at}")]
    Whitespace {
        /// Byte offset of the character.
        at: usize,
    },
    /// `*` or `>` together with other characters in one token.
    #[error("wildcard inside token {token:?} at byte {at}: '*' and '>' must be whole tokens")]
    WildcardInToken {
        /// The token.
        token: String,
        /// Byte offset of the token.
        at: usize,
    },
    /// `>` somewhere other than the last token.
    #[error("'>' at byte {at} is not the last token")]
    FullWildcardNotLast {
        /// Byte offset of the `>`.
        at: usize,
    },
    /// A wildcard where a literal subject is needed (publishing).
    #[error("wildcard at byte {at} in a subject to publish to")]
    WildcardInSubject {
        /// Byte offset of the wildcard token.
        at: usize,
    },
}

/// Checks the common rules and calls `on_token(token, offset, is_last)`.
fn check_tokens(
    s: &str,
    mut on_token: impl FnMut(&str, usize, bool) -> Result<(), SubjectError>,
) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong { len: s.len() });
    }
    // One pass over the bytes (this runs for every published message).
    // Whitespace anywhere is reported before any token error.
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut wildcard = false;
    let mut first_err = None;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'.' => {
                if first_err.is_none() {
                    first_err = token(s, start, i, wildcard, &mut on_token, false).err();
                }
                start = i + 1;
                wildcard = false;
            }
            b'*' | b'>' => wildcard = true,
            _ if b.is_ascii_whitespace() || b.is_ascii_control() => {
                return Err(SubjectError::Whitespace { at: i });
            }
            _ => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => token(s, start, bytes.len(), wildcard, &mut on_token, true),
    }
}

/// Checks the token `s[start..end]` (`wildcard`: it holds `*` or `>`).
fn token(
    s: &str,
    start: usize,
    end: usize,
    wildcard: bool,
    on_token: &mut impl FnMut(&str, usize, bool) -> Result<(), SubjectError>,
    last: bool,
) -> Result<(), SubjectError> {
    let tok = &s[start..end];
    if tok.is_empty() {
        return Err(SubjectError::EmptyToken { at: start });
    }
    if wildcard && tok.len() > 1 {
        return Err(SubjectError::WildcardInToken {
            token: tok.to_owned(),
            at: start,
        });
    }
    on_token(tok, start, last)
}

/// Checks a subject to publish to: no wildcards.
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    check_tokens(s, |tok, at, _| {
        if tok == "*" || tok == ">" {
            Err(SubjectError::WildcardInSubject { at })
        } else {
            Ok(())
        }
    })
}

/// Checks a pattern to subscribe with: wildcards allowed as whole tokens,
/// `>` only last.
pub fn validate_pattern(s: &str) -> Result<(), SubjectError> {
    check_tokens(s, |tok, at, last| {
        if tok == ">" && !last {
            Err(SubjectError::FullWildcardNotLast { at })
        } else {
            Ok(())
        }
    })
}

/// Whether `pattern` matches `subject`. Both are assumed valid (a literal
/// pattern matches only itself).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(pt), Some(st)) if pt == st => {}
            _ => return false,
        }
    }
}

/// Whether some subject matches both patterns (used to tell whether a
/// subscription can see durable subjects).
pub fn pattern_overlaps(a: &str, b: &str) -> bool {
    let mut p = a.split('.');
    let mut q = b.split('.');
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// A validated subject (no wildcards). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Arc<str>);

impl Subject {
    /// Validates and wraps.
    pub fn new(s: &str) -> Result<Self, SubjectError> {
        validate_subject(s)?;
        Ok(Self(s.into()))
    }

    /// The subject text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first token (`storage` in `storage.pool.tank`), used for
    /// per-subject statistics.
    pub fn top_token(&self) -> &str {
        self.0.split('.').next().unwrap_or("")
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Subject {
    type Error = SubjectError;
    fn try_from(s: &str) -> Result<Self, SubjectError> {
        Self::new(s)
    }
}

/// A validated pattern (wildcards allowed). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern(Arc<str>);

impl Pattern {
    /// Validates and wraps.
    pub fn new(s: &str) -> Result<Self, SubjectError> {
        validate_pattern(s)?;
        Ok(Self(s.into()))
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it matches `subject`.
    pub fn matches(&self, subject: &str) -> bool {
        matches(&self.0, subject)
    }

    /// Whether some subject matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        pattern_overlaps(&self.0, &other.0)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for Pattern {
    type Error = SubjectError;
    fn try_from(s: &str) -> Result<Self, SubjectError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_and_invalid() {
        for ok in [
            "a",
            "a.b.c",
            "storage.pool.tank-1.state",
            "_dlq.x",
            "ünï.cödé",
        ] {
            validate_subject(ok).unwrap();
            validate_pattern(ok).unwrap();
        }
        for ok in ["*", ">", "a.*", "a.>", "*.*.>", "a.*.c"] {
            validate_pattern(ok).unwrap();
        }
        use SubjectError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("a..b", E::EmptyToken { at: 2 }),
            (".a", E::EmptyToken { at: 0 }),
            ("a.", E::EmptyToken { at: 2 }),
            ("a b", E::Whitespace { at: 1 }),
            ("a\tb", E::Whitespace { at: 1 }),
            ("a\r\n", E::Whitespace { at: 1 }),
            ("a\u{7}b", E::Whitespace { at: 1 }),
            (
                "a.b*",
                E::WildcardInToken {
                    token: "b*".into(),
                    at: 2,
                },
            ),
            (
                ">x",
                E::WildcardInToken {
                    token: ">x".into(),
                    at: 0,
                },
            ),
        ];
        for (s, e) in cases {
            assert_eq!(validate_pattern(s).unwrap_err(), *e, "{s:?}");
            assert_eq!(validate_subject(s).unwrap_err(), *e, "{s:?}");
        }
        assert_eq!(
            validate_pattern("a.>.b").unwrap_err(),
            E::FullWildcardNotLast { at: 2 }
        );
        assert_eq!(
            validate_subject("a.*").unwrap_err(),
            E::WildcardInSubject { at: 2 }
        );
        assert_eq!(
            validate_subject(">").unwrap_err(),
            E::WildcardInSubject { at: 0 }
        );
        let long = "a".repeat(MAX_SUBJECT_LEN + 1);
        assert_eq!(
            validate_subject(&long).unwrap_err(),
            E::TooLong { len: long.len() }
        );
        // Errors read well.
        assert_eq!(
            validate_subject("a..b").unwrap_err().to_string(),
            "empty token at byte 2 (two dots in a row, or a dot at the start or end)"
        );
    }

    #[test]
    fn matching_examples() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(!matches("a.*", "a"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a"));
        assert!(matches("*.*.c", "a.b.c"));
        assert!(matches("storage.*.tank.>", "storage.pool.tank.state"));
        assert!(!matches("storage.*.tank.>", "storage.pool.tank"));
        assert_eq!(
            Subject::new("storage.disk.x").unwrap().top_token(),
            "storage"
        );
    }

    #[test]
    fn overlap_examples() {
        let p = |s: &str| Pattern::new(s).unwrap();
        assert!(p("storage.>").overlaps(&p(">")));
        assert!(p("storage.>").overlaps(&p("*.disk")));
        assert!(p("storage.>").overlaps(&p("storage.x")));
        assert!(!p("storage.>").overlaps(&p("sync.>")));
        assert!(!p("storage.>").overlaps(&p("storage")));
        assert!(!p("a.*").overlaps(&p("a.b.c")));
    }

    /// Reference matcher: the obvious recursive definition over token lists.
    fn reference(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&">"), Some(_)) => p.len() == 1,
            (Some(&"*"), Some(_)) => reference(&p[1..], &s[1..]),
            (Some(a), Some(b)) => a == b && reference(&p[1..], &s[1..]),
            _ => false,
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("cc".to_string()),
            "[a-z0-9_-]{1,3}"
        ]
    }

    fn subject() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(token(), 1..6)
    }

    fn pattern() -> impl Strategy<Value = Vec<String>> {
        (
            prop::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 1..6),
            any::<bool>(),
        )
            .prop_map(|(mut toks, gt)| {
                if gt {
                    *toks.last_mut().unwrap() = ">".into();
                }
                toks
            })
    }

    /// Validation written the obvious way (split on dots), to check the
    /// one-pass validator against.
    fn reference_validate(s: &str, pattern: bool) -> Result<(), SubjectError> {
        if s.is_empty() {
            return Err(SubjectError::Empty);
        }
        if s.len() > MAX_SUBJECT_LEN {
            return Err(SubjectError::TooLong { len: s.len() });
        }
        if let Some(at) = s
            .bytes()
            .position(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(SubjectError::Whitespace { at });
        }
        let toks: Vec<&str> = s.split('.').collect();
        let mut at = 0;
        for (i, tok) in toks.iter().enumerate() {
            if tok.is_empty() {
                return Err(SubjectError::EmptyToken { at });
            }
            if tok.len() > 1 && tok.contains(['*', '>']) {
                return Err(SubjectError::WildcardInToken {
                    token: (*tok).to_owned(),
                    at,
                });
            }
            let last = i + 1 == toks.len();
            if pattern && *tok == ">" && !last {
                return Err(SubjectError::FullWildcardNotLast { at });
            }
            if !pattern && (*tok == "*" || *tok == ">") {
                return Err(SubjectError::WildcardInSubject { at });
            }
            at += tok.len() + 1;
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn validation_agrees_with_reference(s in "[ab.*> \t\\x00é]{0,12}") {
            prop_assert_eq!(validate_subject(&s), reference_validate(&s, false), "subject {:?}", s);
            prop_assert_eq!(validate_pattern(&s), reference_validate(&s, true), "pattern {:?}", s);
        }

        #[test]
        fn matching_agrees_with_reference(p in pattern(), s in subject()) {
            let ps = p.join(".");
            let ss = s.join(".");
            prop_assert!(validate_pattern(&ps).is_ok());
            prop_assert!(validate_subject(&ss).is_ok());
            let pr: Vec<&str> = p.iter().map(String::as_str).collect();
            let sr: Vec<&str> = s.iter().map(String::as_str).collect();
            prop_assert_eq!(matches(&ps, &ss), reference(&pr, &sr), "{} vs {}", ps, ss);
        }

        #[test]
        fn a_pattern_built_from_a_subject_matches_it(s in subject(), mask in prop::collection::vec(any::<bool>(), 6), cut in 0usize..6) {
            // Replace some tokens with '*', maybe the tail with '>'.
            let mut p: Vec<String> = s.iter().zip(&mask).map(|(t, m)| if *m { "*".into() } else { t.clone() }).collect();
            if cut < p.len() {
                p.truncate(cut + 1);
                *p.last_mut().unwrap() = ">".into();
            }
            prop_assert!(matches(&p.join("."), &s.join(".")));
        }

        #[test]
        fn validation_never_panics_and_valid_subjects_match_themselves(s in "\\PC{0,40}") {
            let _ = validate_pattern(&s);
            if validate_subject(&s).is_ok() {
                prop_assert!(matches(&s, &s));
                prop_assert!(matches(">", &s));
            }
        }

        #[test]
        fn overlap_is_exact_on_small_alphabet(p in pattern(), q in pattern(), s in subject()) {
            let (ps, qs, ss) = (p.join("."), q.join("."), s.join("."));
            if matches(&ps, &ss) && matches(&qs, &ss) {
                prop_assert!(pattern_overlaps(&ps, &qs));
            }
        }
    }
}
