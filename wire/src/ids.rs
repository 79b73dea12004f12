//! Identities and positions that cross modules: LSNs, vShard ids, migration ids, node ids.
//!
//! They are newtypes so a vShard id cannot be passed where an LSN is expected. Ids that come
//! from callers (migration ids, node ids) are validated on construction, so every holder of
//! one knows it is safe to use in a file name or a TLS server name.
//!
//! What it does not: give an id a meaning; which migration or node an id names is the
//! engine's and the coordinator's business.
//!
//! Invariants: a `MigrationId` or `NodeId` that exists passed its checks (no way to build one
//! unchecked from outside this module); LSNs and vShard ids are plain numbers with no checks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A log sequence number: node-global, increasing, as the database's WAL assigns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN after this one, or `None` at the end of the LSN space.
    pub fn next(self) -> Option<Lsn> {
        self.0.checked_add(1).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of a virtual shard: the unit a database moves between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VShardId(pub u32);

impl fmt::Display for VShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a caller-supplied id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must be 1 to {max} characters, got {len}")]
    Length { kind: &'static str, len: usize, max: usize },
    #[error(
        "{kind} {} may only hold ASCII letters, digits, '-', '_' and '.' and must not start with '.' or '-'",
        crate::quote::quote_untrusted(.value)
    )]
    Charset { kind: &'static str, value: String },
}

fn check_id(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() || value.len() > max {
        return Err(IdError::Length { kind, len: value.len(), max });
    }
    let ok_chars = value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    let ok_start = !value.starts_with('.') && !value.starts_with('-');
    if !ok_chars || !ok_start {
        return Err(IdError::Charset { kind, value: value.to_owned() });
    }
    Ok(())
}

/// A migration id. Used as a folder name on both sides, so it is restricted to a safe
/// charset and length.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationId(String);

impl MigrationId {
    /// Longest accepted id, in bytes.
    pub const LEN_MAX: usize = 128;

    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_id("migration id", &value, Self::LEN_MAX)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MigrationId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::new(value)
    }
}

impl From<MigrationId> for String {
    fn from(id: MigrationId) -> String {
        id.0
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node id: the name in a node's certificate, and the name a peer expects to see.
/// Restricted to what is valid as a DNS name label sequence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Longest accepted id, in bytes (a DNS name's limit).
    pub const LEN_MAX: usize = 253;

    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_id("node id", &value, Self::LEN_MAX)?;
        if value.contains('_') || value.contains("..") || value.ends_with('.') {
            return Err(IdError::Charset { kind: "node id", value });
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::new(value)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_are_safe_folder_names() {
        assert!(MigrationId::new("mig-42_a.b").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "-x", "a\0b", &"x".repeat(129)] {
            assert!(MigrationId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn node_ids_are_dns_names() {
        assert!(NodeId::new("node-a.cluster").is_ok());
        for bad in ["", "a_b", "a..b", "a.", "-a", "a b"] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lsn_next_saturates_to_none() {
        assert_eq!(Lsn(1).next(), Some(Lsn(2)));
        assert_eq!(Lsn(u64::MAX).next(), None);
    }
}
