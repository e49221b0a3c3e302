//! Validation of client-supplied relative paths.
//!
//! A path arrives from the network as text and ends up joined onto a client's
//! root directory on the appliance. [`RelPath`] can only be built by
//! [`RelPath::parse`] (or [`RelPath::from_bytes`]), so holding one proves the
//! path passed every rule below; the server never joins raw wire text.
//!
//! Rules (each failure is a distinct [`PathRejection`]):
//! - valid UTF-8, not empty, at most [`MAX_PATH_LEN`] bytes, at most
//!   [`MAX_PATH_DEPTH`] components of at most [`MAX_COMPONENT_LEN`] bytes;
//! - relative: no leading `/`; `/` is the only separator and a backslash is
//!   refused outright (it is a separator for Windows clients and a classic way
//!   to smuggle `..\..`);
//! - no empty component (so no `//` and no trailing `/`), no `.` and no `..`:
//!   each path has exactly one spelling, and none can climb out of the root;
//! - no control characters (Unicode `Cc`: NUL, C0, DEL, C1) and no bidirectional
//!   override/isolate characters, which make a name display as something else;
//! - no reserved component: names starting with [`RESERVED_PREFIX`] (the
//!   server's staging and metadata directories), `.zfs` (the ZFS snapshot
//!   directory), and names ending in a version suffix `.~N~`, which the
//!   server creates for kept versions of replaced documents. Reserved names are
//!   compared ASCII-case-insensitively so a case-folding client cannot collide.
//!
//! Symlinks are not a path-text property: the server adapter must still open
//! paths without following symlinks (`O_NOFOLLOW`/`openat2` `RESOLVE_BENEATH`).

use crate::limits::{MAX_COMPONENT_LEN, MAX_PATH_DEPTH, MAX_PATH_LEN};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Prefix reserved for the server's own directories inside a client root.
pub const RESERVED_PREFIX: &str = ".appliance-";
/// Name of the server's staging directory (under the client root).
pub const STAGING_DIR_NAME: &str = ".appliance-staging";
/// Name of the server's metadata / chunk-store directory (under the client root).
pub const METADATA_DIR_NAME: &str = ".appliance-meta";
/// The ZFS snapshot control directory, present at every dataset root.
pub const ZFS_CONTROL_DIR: &str = ".zfs";

/// Why a path was refused. Sent to the client inside `PathRejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PathRejection {
    #[error("path is empty")]
    Empty,
    #[error("path is not valid UTF-8")]
    NotUtf8,
    #[error("path is absolute (starts with '/')")]
    Absolute,
    #[error("path contains a backslash at byte {index}")]
    Backslash { index: u32 },
    #[error("path contains control or bidi character U+{code:04X} at byte {index}")]
    ForbiddenChar { index: u32, code: u32 },
    #[error("path has an empty component (\"//\" or a trailing '/')")]
    EmptyComponent,
    #[error("path has a '.' component")]
    DotComponent,
    #[error("path has a '..' component")]
    DotDotComponent,
    #[error("path is {len} bytes long; the limit is {max}")]
    TooLong { len: u32, max: u32 },
    #[error("path component is {len} bytes long; the limit is {max}")]
    ComponentTooLong { len: u32, max: u32 },
    #[error("path has more than {max} components")]
    TooDeep { max: u32 },
    #[error("path component {component:?} is a reserved name")]
    Reserved { component: String },
}

/// A validated, normalised relative path (`a/b/c.pdf`). See the module docs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Validates raw bytes from the wire (they must be UTF-8).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PathRejection> {
        let text = std::str::from_utf8(bytes).map_err(|_| PathRejection::NotUtf8)?;
        Self::parse(text)
    }

    /// Validates `text` against every rule in the module docs.
    pub fn parse(text: &str) -> Result<Self, PathRejection> {
        if text.is_empty() {
            return Err(PathRejection::Empty);
        }
        if text.len() > MAX_PATH_LEN {
            return Err(PathRejection::TooLong {
                len: saturating_u32(text.len()),
                max: saturating_u32(MAX_PATH_LEN),
            });
        }
        if text.starts_with('/') {
            return Err(PathRejection::Absolute);
        }
        for (index, ch) in text.char_indices() {
            if ch == '\\' {
                return Err(PathRejection::Backslash {
                    index: saturating_u32(index),
                });
            }
            if is_forbidden_char(ch) {
                return Err(PathRejection::ForbiddenChar {
                    index: saturating_u32(index),
                    code: u32::from(ch),
                });
            }
        }
        let mut depth = 0usize;
        for component in text.split('/') {
            depth += 1;
            if depth > MAX_PATH_DEPTH {
                return Err(PathRejection::TooDeep {
                    max: saturating_u32(MAX_PATH_DEPTH),
                });
            }
            check_component(component)?;
        }
        Ok(Self(text.to_owned()))
    }

    /// The path as text, components separated by `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as a relative [`std::path::Path`], for joining onto a root.
    pub fn as_path(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }

    /// The components, in order. Never empty, never `.`/`..`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The parent directory, or `None` for a single-component path.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| RelPath(parent.to_owned()))
    }

    /// `self/other`, re-validated (the result may exceed the length or depth
    /// limits even if both halves are fine).
    pub fn join(&self, other: &RelPath) -> Result<RelPath, PathRejection> {
        RelPath::parse(&format!("{}/{}", self.0, other.0))
    }

    /// Consumes the path, returning its text.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.0)
    }
}

impl AsRef<std::path::Path> for RelPath {
    fn as_ref(&self) -> &std::path::Path {
        self.as_path()
    }
}

/// Whether `name` is a reserved component (see module docs). The server
/// adapter should also hide such entries from listings.
pub fn is_reserved_component(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with(RESERVED_PREFIX) || lower == ZFS_CONTROL_DIR || has_version_suffix(name)
}

/// Whether `name` ends in `.~N~` with N one or more ASCII digits.
fn has_version_suffix(name: &str) -> bool {
    let Some(body) = name.strip_suffix('~') else {
        return false;
    };
    let digits_start = body.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    digits_start < body.len() && body[..digits_start].ends_with(".~")
}

fn check_component(component: &str) -> Result<(), PathRejection> {
    match component {
        "" => return Err(PathRejection::EmptyComponent),
        "." => return Err(PathRejection::DotComponent),
        ".." => return Err(PathRejection::DotDotComponent),
        _ => {}
    }
    if component.len() > MAX_COMPONENT_LEN {
        return Err(PathRejection::ComponentTooLong {
            len: saturating_u32(component.len()),
            max: saturating_u32(MAX_COMPONENT_LEN),
        });
    }
    if is_reserved_component(component) {
        return Err(PathRejection::Reserved {
            component: component.to_owned(),
        });
    }
    Ok(())
}

fn is_forbidden_char(ch: char) -> bool {
    ch.is_control()
        || matches!(ch, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    fn rejected(text: &str) -> PathRejection {
        RelPath::parse(text).unwrap_err()
    }

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a",
            "contract.pdf",
            "2024/bank/statement-03.pdf",
            "Ünïcödé/файл.txt",
            ".hidden",
            "..foo",
            "foo..",
            "a.b/c.d",
            "name~",
            "name.~x~",
            "name.~~",
            "v.~1",
            "appliance-staging",
            "x.appliance-meta",
            ".zfsx",
            "trailing space ",
        ] {
            let path = RelPath::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
            assert_eq!(path.as_str(), ok);
        }
    }

    #[test]
    fn rejects_structural_problems() {
        assert_eq!(rejected(""), PathRejection::Empty);
        assert_eq!(rejected("/etc/passwd"), PathRejection::Absolute);
        assert_eq!(rejected("/"), PathRejection::Absolute);
        assert_eq!(rejected("a//b"), PathRejection::EmptyComponent);
        assert_eq!(rejected("a/"), PathRejection::EmptyComponent);
        assert_eq!(rejected("./a"), PathRejection::DotComponent);
        assert_eq!(rejected("a/./b"), PathRejection::DotComponent);
        assert_eq!(rejected("."), PathRejection::DotComponent);
        assert_eq!(rejected(".."), PathRejection::DotDotComponent);
        assert_eq!(rejected("../x"), PathRejection::DotDotComponent);
        assert_eq!(rejected("a/../../x"), PathRejection::DotDotComponent);
        assert_eq!(rejected("a/.."), PathRejection::DotDotComponent);
        assert_eq!(
            rejected("..\\..\\etc"),
            PathRejection::Backslash { index: 2 }
        );
        assert_eq!(rejected("a\\b"), PathRejection::Backslash { index: 1 });
    }

    #[test]
    fn rejects_forbidden_characters() {
        assert_eq!(
            rejected("a\0b"),
            PathRejection::ForbiddenChar { index: 1, code: 0 }
        );
        assert_eq!(
            rejected("line\nbreak"),
            PathRejection::ForbiddenChar {
                index: 4,
                code: 0x0a
            }
        );
        assert_eq!(
            rejected("del\u{7f}"),
            PathRejection::ForbiddenChar {
                index: 3,
                code: 0x7f
            }
        );
        assert_eq!(
            rejected("c1\u{85}"),
            PathRejection::ForbiddenChar {
                index: 2,
                code: 0x85
            }
        );
        assert_eq!(
            rejected("invoice\u{202E}fdp.exe"),
            PathRejection::ForbiddenChar {
                index: 7,
                code: 0x202E
            }
        );
        assert_eq!(
            rejected("\u{1b}[31m"),
            PathRejection::ForbiddenChar {
                index: 0,
                code: 0x1b
            }
        );
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            RelPath::from_bytes(b"ok/\xff\xfe").unwrap_err(),
            PathRejection::NotUtf8
        );
        assert_eq!(
            RelPath::from_bytes(b"a/\xc0\xaf").unwrap_err(),
            PathRejection::NotUtf8
        );
        assert_eq!(RelPath::from_bytes(b"a/b").unwrap().as_str(), "a/b");
    }

    #[test]
    fn rejects_reserved_names_anywhere() {
        for bad in [
            ".appliance-staging",
            "docs/.appliance-staging/x",
            ".appliance-meta/chunks",
            ".APPLIANCE-STAGING",
            ".appliance-anything",
            ".zfs",
            ".ZFS/snapshot/x",
            "a/.zfs",
            "report.pdf.~1~",
            "dir/report.pdf.~12345~/x",
            ".~7~",
        ] {
            assert!(
                matches!(rejected(bad), PathRejection::Reserved { .. }),
                "{bad:?} should be reserved"
            );
        }
        assert_eq!(
            rejected("x/.zfs/y"),
            PathRejection::Reserved {
                component: ".zfs".into()
            }
        );
        assert!(is_reserved_component(STAGING_DIR_NAME));
        assert!(is_reserved_component(METADATA_DIR_NAME));
        assert!(!is_reserved_component("report.pdf"));
    }

    #[test]
    fn enforces_length_limits_exactly() {
        let max_component = "c".repeat(MAX_COMPONENT_LEN);
        assert!(RelPath::parse(&max_component).is_ok());
        assert_eq!(
            rejected(&"c".repeat(MAX_COMPONENT_LEN + 1)),
            PathRejection::ComponentTooLong { len: 201, max: 200 }
        );
        // Multi-byte characters count in bytes: 101 two-byte chars = 202 bytes.
        assert!(matches!(
            rejected(&"é".repeat(101)),
            PathRejection::ComponentTooLong { len: 202, .. }
        ));

        let parts = vec!["d".repeat(100); 10];
        let long = parts.join("/"); // 1009 bytes
        assert!(RelPath::parse(&long).is_ok());
        let too_long = format!("{long}/{}", "e".repeat(14)); // 1024 bytes
        assert!(RelPath::parse(&too_long).is_ok());
        let too_long = format!("{too_long}x");
        assert_eq!(
            rejected(&too_long),
            PathRejection::TooLong {
                len: 1025,
                max: 1024
            }
        );

        let deep = vec!["d"; MAX_PATH_DEPTH].join("/");
        assert!(RelPath::parse(&deep).is_ok());
        assert_eq!(
            rejected(&format!("{deep}/d")),
            PathRejection::TooDeep { max: 64 }
        );
    }

    #[test]
    fn accessors() {
        let p = RelPath::parse("a/b/c.pdf").unwrap();
        assert_eq!(p.file_name(), "c.pdf");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.components().collect::<Vec<_>>(), ["a", "b", "c.pdf"]);
        let single = RelPath::parse("c.pdf").unwrap();
        assert_eq!(single.file_name(), "c.pdf");
        assert!(single.parent().is_none());
        assert_eq!(
            RelPath::parse("to").unwrap().join(&p).unwrap().as_str(),
            "to/a/b/c.pdf"
        );
        let deep = RelPath::parse(&vec!["d"; MAX_PATH_DEPTH].join("/")).unwrap();
        assert!(deep.join(&single).is_err());
    }

    /// Lexically resolves `root/rel` the way the kernel would (ignoring
    /// symlinks) and checks the result stays strictly below `root`.
    fn stays_below(root: &Path, rel: &RelPath) -> bool {
        let joined = root.join(rel.as_path());
        let mut stack: Vec<Component<'_>> = Vec::new();
        for component in joined.components() {
            match component {
                Component::ParentDir => {
                    stack.pop();
                }
                Component::CurDir => {}
                other => stack.push(other),
            }
        }
        let resolved: std::path::PathBuf = stack.iter().collect();
        resolved.starts_with(root)
            && resolved != root
            && resolved.components().count() == root.components().count() + rel.components().count()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary strings built from the characters that matter: no
        /// accepted path can escape the root or change its shape.
        #[test]
        fn accepted_paths_never_escape_root(
            text in "([a-z./\\\\~0-9\u{0}\n\u{202e}é]|\\.\\.|/\\.\\./|\\.appliance-|\\.~1~){0,40}"
        ) {
            if let Ok(path) = RelPath::parse(&text) {
                prop_assert!(stays_below(Path::new("/srv/clients/alice"), &path), "{path:?}");
                prop_assert!(!path.components().any(|c| c.is_empty() || c == "." || c == ".."));
                prop_assert!(!path.components().any(is_reserved_component));
                prop_assert!(!path.as_str().chars().any(is_forbidden_char));
                prop_assert_eq!(path.as_str(), text.as_str());
            }
        }

        /// Completely arbitrary bytes never panic and, if accepted, behave.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(path) = RelPath::from_bytes(&bytes) {
                prop_assert!(stays_below(Path::new("/root"), &path));
            }
        }

        /// Paths built from valid components are always accepted.
        #[test]
        fn valid_components_are_accepted(parts in proptest::collection::vec("[a-zA-Z0-9 _-][a-zA-Z0-9 ._-]{0,30}", 1..10)) {
            let text = parts.join("/");
            let path = RelPath::parse(&text);
            prop_assert!(path.is_ok(), "{:?}: {:?}", text, path);
        }
    }
}
