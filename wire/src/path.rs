//! The path rules for segment files (DESIGN section 2).
//!
//! A [`RelPath`] is a relative path that stays inside the segments root: non-empty, `/`
//! separated, no empty, `.` or `..` components, no absolute prefix, no NUL, valid UTF-8, at
//! most [`PATH_LEN_MAX_BYTES`](crate::limits::PATH_LEN_MAX_BYTES) long. It is checked
//! purely lexically here; whether a component is a symlink or a non-regular file is the
//! engine's check, against the real filesystem.
//!
//! The same type is used for paths a peer sends: a target never joins an unchecked string onto
//! its staging folder.
//!
//! What it does not: touch the filesystem (no I/O in this crate).
//!
//! Invariants: a `RelPath` that exists passed these rules; joined onto a root, it names a path
//! under that root.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::PATH_LEN_MAX_BYTES;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty: name a file inside the segments root")]
    Empty,
    #[error("path {} is absolute: segment paths must be relative to the segments root", crate::quote::quote_untrusted(.0))]
    Absolute(String),
    #[error("path {} contains '..': segment paths must stay inside the segments root", crate::quote::quote_untrusted(.0))]
    ParentComponent(String),
    #[error("path {} has an empty or '.' component: write it in normal form (a/b/c)", crate::quote::quote_untrusted(.0))]
    NotNormal(String),
    #[error("path {} contains a NUL byte or a backslash", crate::quote::quote_untrusted(.0))]
    BadCharacter(String),
    #[error("path of {len} bytes is longer than the limit of {max} bytes")]
    TooLong { len: usize, max: u32 },
    #[error("path {} is inside ferry's own folders (.ferry-snapshot, .ferry), which are never shipped", crate::quote::quote_untrusted(.0))]
    Reserved(String),
}

/// A checked relative path of a segment file, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

/// Folder names at the top of a segments root (or staging) that belong to ferry.
pub const RESERVED_TOP_NAMES: [&str; 2] = [".ferry-snapshot", ".ferry"];

impl RelPath {
    pub fn new(value: impl Into<String>) -> Result<Self, PathError> {
        let value = value.into();
        if value.is_empty() {
            return Err(PathError::Empty);
        }
        if value.len() > PATH_LEN_MAX_BYTES as usize {
            return Err(PathError::TooLong { len: value.len(), max: PATH_LEN_MAX_BYTES });
        }
        if value.contains('\0') || value.contains('\\') {
            return Err(PathError::BadCharacter(value));
        }
        if value.starts_with('/') {
            return Err(PathError::Absolute(value));
        }
        let mut components = value.split('/');
        let first = components.clone().next().unwrap_or_default();
        for component in &mut components {
            match component {
                ".." => return Err(PathError::ParentComponent(value)),
                "" | "." => return Err(PathError::NotNormal(value)),
                _ => {}
            }
        }
        if RESERVED_TOP_NAMES.contains(&first) {
            return Err(PathError::Reserved(value));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent folders of this path, shallowest first (`a/b/c` gives `a`, `a/b`).
    pub fn parents(&self) -> Vec<&str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i]).collect()
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(value: String) -> Result<Self, PathError> {
        Self::new(value)
    }
}

impl From<RelPath> for String {
    fn from(path: RelPath) -> String {
        path.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::type_complexity)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_normal_relative_paths() {
        for ok in ["a", "a/b/c.seg", "L1/000001.sst", "..a", "a..", ".hidden"] {
            assert_eq!(RelPath::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_escapes_and_odd_forms() {
        let cases: [(&str, fn(&PathError) -> bool); 10] = [
            ("", |e| matches!(e, PathError::Empty)),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("..", |e| matches!(e, PathError::ParentComponent(_))),
            ("a/../../b", |e| matches!(e, PathError::ParentComponent(_))),
            ("a//b", |e| matches!(e, PathError::NotNormal(_))),
            ("./a", |e| matches!(e, PathError::NotNormal(_))),
            ("a/", |e| matches!(e, PathError::NotNormal(_))),
            ("a\0b", |e| matches!(e, PathError::BadCharacter(_))),
            (".ferry-snapshot/x", |e| matches!(e, PathError::Reserved(_))),
            (".ferry", |e| matches!(e, PathError::Reserved(_))),
        ];
        for (input, expected) in cases {
            let err = RelPath::new(input).unwrap_err();
            assert!(expected(&err), "{input:?} gave {err:?}");
        }
        assert!(matches!(RelPath::new("a".repeat(5000)), Err(PathError::TooLong { .. })));
    }

    #[test]
    fn parents_are_shallowest_first() {
        assert_eq!(RelPath::new("a/b/c").unwrap().parents(), vec!["a", "a/b"]);
        assert!(RelPath::new("c").unwrap().parents().is_empty());
    }

    proptest! {
        #[test]
        fn any_string_is_checked_without_panic(s in ".*") {
            if let Ok(p) = RelPath::new(s.clone()) {
                prop_assert!(!p.components().any(|c| c == ".." || c.is_empty() || c == "."));
                prop_assert!(!s.starts_with('/'));
            }
        }
    }
}
