//! Development certificates for a bench run: a cluster CA and the nodes `source` and `target`.
//!
//! What it does: writes them with [`ferry_engine::certs`] into a temp dir, in the same layout
//! `ferry certs init` / `ferry certs issue` use, so in-process runs and `ferry serve` /
//! `ferry copy` child processes share one folder.
//!
//! What it does not: anything a production deployment should copy (keys sit in /tmp).

use std::path::Path;

use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::tls::NodeIdentity;
use ferry_wire::NodeId;

/// The node name of the receiving side in every bench.
pub const TARGET_NODE: &str = "target";
/// The node name of the sending side in every bench.
pub const SOURCE_NODE: &str = "source";

/// A certificate folder, removed on drop.
#[derive(Debug)]
pub struct BenchCerts {
    dir: tempfile::TempDir,
}

impl BenchCerts {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-bench-certs-").tempdir()?;
        certs::init_ca(dir.path(), false)?;
        for name in [SOURCE_NODE, TARGET_NODE] {
            certs::issue(dir.path(), &node(name)?, &IssueOptions::default())?;
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn identity(&self, name: &str) -> anyhow::Result<NodeIdentity> {
        Ok(NodeIdentity::from_dir(self.dir.path(), &node(name)?)?)
    }
}

pub fn node(name: &str) -> anyhow::Result<NodeId> {
    Ok(NodeId::new(name)?)
}
