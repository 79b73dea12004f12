//! `ferry snapshots`: the source's snapshot links left under a segments root.
//!
//! What it does: lists the `.ferry-snapshot/<migration_id>/` folders (hard links that pin a
//! migration's files against compaction) and removes the ones the operator names.
//!
//! What it does not: know whether a daemon still runs the migration. A daemon removes its
//! migrations' links itself (`migration.abort`, `migration.forget`), and `ferry copy` removes
//! its own when it ends (succeeded, failed or interrupted by SIGINT or SIGTERM); these
//! commands are for what a killed process left behind.

use std::path::PathBuf;

use clap::Subcommand;
use ferry_wire::MigrationId;

use super::out::outln;
use crate::snapshot::Snapshot;

#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// List the snapshots under a segments root: migration id, files and bytes pinned.
    List {
        /// The shard's segments root (as given to `ferry copy` or `migration.start`).
        #[arg(long)]
        segments_root: PathBuf,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshot links (never the source files). Do not remove those of a migration that
    /// is still running: it reads its files through them.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["migration_ids", "all"])))]
    Clean {
        /// The shard's segments root.
        #[arg(long)]
        segments_root: PathBuf,
        /// The migration whose links to remove; repeatable.
        #[arg(long = "migration-id")]
        migration_ids: Vec<String>,
        /// Remove every snapshot under the segments root.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(command: SnapshotsCommand) -> anyhow::Result<()> {
    match command {
        SnapshotsCommand::List { segments_root, json } => {
            let pinned = Snapshot::list_pinned(&segments_root)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&pinned)?)?;
            } else if pinned.is_empty() {
                outln!("no snapshots under {}", segments_root.display())?;
            }
            for p in pinned.iter().filter(|_| !json) {
                outln!("{}\t{} files\t{} bytes\t{}", p.migration_id, p.files_count, p.bytes, p.dir.display())?;
            }
            Ok(())
        }
        SnapshotsCommand::Clean { segments_root, migration_ids, all } => {
            let pinned = Snapshot::list_pinned(&segments_root)?;
            let ids: Vec<MigrationId> = if all {
                pinned.iter().map(|p| p.migration_id.clone()).collect()
            } else {
                let mut ids = Vec::with_capacity(migration_ids.len());
                for name in migration_ids {
                    let id = MigrationId::new(name.clone())
                        .map_err(|e| anyhow::anyhow!("invalid --migration-id {name:?}: {e}"))?;
                    if !pinned.iter().any(|p| p.migration_id == id) {
                        anyhow::bail!(
                            "no snapshot of migration {id} under {}: `ferry snapshots list --segments-root {}` shows them",
                            segments_root.display(),
                            segments_root.display()
                        );
                    }
                    ids.push(id);
                }
                ids
            };
            for id in &ids {
                Snapshot::remove(&segments_root, id)?;
                outln!("removed the snapshot of {id}")?;
            }
            if ids.is_empty() {
                outln!("no snapshots under {}", segments_root.display())?;
            }
            Ok(())
        }
    }
}
