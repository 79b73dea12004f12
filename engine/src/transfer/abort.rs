//! Aborting a migration on the target: the removal of its staging.
//!
//! What it does: [`abort_staging`] runs on the target, for a source's `Abort` request (sent by
//! [`super::request`]) or for the target's own coordinator: it cuts the connection receiving the migration with a
//! code the source does not retry, forgets its staged WAL, removes the staging and leaves a
//! `MANIFEST.json` in state `aborted`, so a late retry of the same id is refused until the
//! migration is forgotten.
//!
//! What it does not: decide when to abort (the coordinator does), or touch a released staging:
//! after `release` the target is authoritative and an abort is refused.

use std::sync::Arc;
use std::time::Duration;

use ferry_wire::manifest::{StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::proto::inbound::{AbortStep, InboundState};
use ferry_wire::{Lsn, MigrationId, VShardId};

use super::inbound::TargetContext;
use super::TransferError;
use crate::staging::{self, StagingLayout};

/// How long an abort waits for the receiving task of a cut connection to stop.
const RECEIVER_STOP_WAIT: Duration = Duration::from_secs(10);

/// What an abort found on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aborted {
    /// A staging existed and is gone.
    Removed,
    /// No staging existed (never started, or forgotten); a tombstone now refuses the id.
    NothingStaged,
    /// It was aborted before: nothing to do.
    Already,
}

/// Aborts `id` on this target: cuts its connection, removes its staging, leaves an `aborted`
/// manifest. Refused (`TransferError::Refused`) for a released staging.
pub async fn abort_staging(ctx: &Arc<TargetContext>, id: &MigrationId, reason: &str) -> Result<Aborted, TransferError> {
    let layout = StagingLayout::new(&ctx.data_dir, id);
    let existing = {
        let (ctx, layout, id) = (ctx.clone(), layout.clone(), id.clone());
        tokio::task::spawn_blocking(move || ctx.manifest(&layout, &id))
            .await
            .map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
    };
    // A manifest we cannot read is not a released one: the abort goes ahead and replaces it.
    let existing = existing.ok().flatten();
    if let Some(m) = &existing {
        // A staging this node had not listed (unreadable at start-up) is known from now on.
        let source_node = m.source_node.as_ref().map(ToString::to_string);
        ctx.machine().adopt(id, InboundState::of_staging(m.state, m.base_complete, m.final_lsn), source_node);
    }
    if ctx.machine().check_abort(id)? == AbortStep::Already {
        return Ok(Aborted::Already);
    }
    ctx.cut(id, &format!("migration aborted: {reason}"));
    // The receiving task releases its claim when it sees the cut; only then do its files go.
    if !ctx.wait_unclaimed(id, tokio::time::Instant::now() + RECEIVER_STOP_WAIT).await {
        return Err(TransferError::Local(format!(
            "the receiver of {id} did not stop within {} s of its connection's cut; retry the abort",
            RECEIVER_STOP_WAIT.as_secs()
        )));
    }
    ctx.wal_stages.forget(id);
    let had_staging = ctx.storage.exists(&layout.root);
    let tombstone = StagingManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        migration_id: id.clone(),
        vshard_id: existing.as_ref().map_or(VShardId(0), |m| m.vshard_id),
        base_lsn: existing.as_ref().map_or(Lsn(0), |m| m.base_lsn),
        final_lsn: None,
        state: StagingState::Aborted,
        base_complete: false,
        db_meta: serde_json::Value::Null,
        segments: Vec::new(),
        wal_segments: Vec::new(),
        source_node: existing.as_ref().and_then(|m| m.source_node.clone()),
        started_at_unix_ms: existing.as_ref().and_then(|m| m.started_at_unix_ms),
        wal_follows: existing.as_ref().and_then(|m| m.wal_follows),
    };
    let (storage, ctx_owned) = (ctx.storage.clone(), ctx.clone());
    ctx.forget_manifest(id);
    tokio::task::spawn_blocking(move || -> Result<(), TransferError> {
        // The tombstone first, durably, beside what is staged: a power loss from here on
        // leaves the migration aborted, never a staging that is neither staged nor aborted
        // (found by the simulator). Only then does the rest go.
        storage.create_dir_all(&layout.ferry_dir()).map_err(staging::io_err("create", &layout.root))?;
        // Every folder whose entry may be new, up to the data folder: the first abort on a
        // fresh data folder creates `migrations/` too, and its tombstone must outlive a power
        // loss (found by the simulator).
        let migrations = layout.migrations_dir();
        let data = migrations.parent().map(std::path::Path::to_path_buf);
        for dir in [Some(layout.root.clone()), Some(migrations), data].into_iter().flatten() {
            storage.sync_dir(&dir).map_err(staging::io_err("sync", &dir))?;
        }
        ctx_owned.write_manifest(&layout, &tombstone)?;
        remove_all_but_tombstone(&*storage, &layout)
    })
    .await
    .map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))??;
    ctx.machine().aborted(id, reason)?;
    tracing::warn!(migration = %id, "inbound migration aborted: {reason}");
    Ok(if had_staging { Aborted::Removed } else { Aborted::NothingStaged })
}

/// Removes everything of an aborted staging but its tombstone `MANIFEST.json`, durably.
fn remove_all_but_tombstone(
    storage: &dyn crate::storage::Storage,
    layout: &StagingLayout,
) -> Result<(), TransferError> {
    let manifest_path = layout.manifest_path();
    for dir in [layout.root.clone(), layout.ferry_dir()] {
        for name in storage.list_dir(&dir).map_err(staging::io_err("list", &dir))? {
            let path = dir.join(&name);
            if path == layout.ferry_dir() || path == manifest_path {
                continue;
            }
            // A file or a folder: the storage seam has no stat, so try both.
            if storage.remove_file(&path).is_err() {
                storage.remove_dir_all(&path).map_err(staging::io_err("remove", &path))?;
            }
        }
        storage.sync_dir(&dir).map_err(staging::io_err("sync", &dir))?;
    }
    Ok(())
}
