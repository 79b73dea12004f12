//! The target's blocking steps of a base copy: what each of the target machine's actions does
//! to staging, as plain functions.
//!
//! What it does: prepares a staging for an admitted offer (fresh, resumed from its chunk log,
//! or found staged), writes and logs a verified chunk, syncs part files before the log that
//! names them, finalises a verified file, writes the base's `MANIFEST.json` and commits an
//! offline copy. The daemon's driver (`target.rs`, `chunks_in.rs`) runs them on the blocking
//! pool; the deterministic simulator in `tests/` runs the same functions on the fake storage,
//! so the code it tests is the code that ships.
//!
//! What it does not: decide what comes next (the target machine, `ferry_wire::proto::target`,
//! does), touch the network, or wait: every step runs to its end or fails.

use std::io::IoSlice;
use std::sync::{Arc, Mutex};

use ferry_wire::checkpoint::LogRecord;
use ferry_wire::manifest::{StagedSegment, StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::message::{ChunkRef, Offer};
use ferry_wire::path::RelPath;
use ferry_wire::proto::inbound::{Begin, ConnId, Inbound};
use ferry_wire::session::{FileDone, TargetSession};
use ferry_wire::{Lsn, MigrationId, NodeId};

use super::chunklog::{self, ChunkLog};
use super::inbound::TargetContext;
use super::TransferError;
use crate::staging::{self, StagingLayout};
use crate::storage::StorageFile;
use crate::wal::stage::StagedWal;

/// How an admitted offer's staging starts.
#[derive(Debug)]
pub enum Start {
    /// The base was staged before; its manifest says where the staging is.
    AlreadyStaged { state: StagingState, final_lsn: Option<Lsn> },
    /// Chunks arrive next; `session` holds what earlier runs verified.
    Receive { session: TargetSession, log: Arc<ChunkLog>, restored: chunklog::Restored },
}

/// Decides how to start: the base is staged already; an earlier run left chunks to resume
/// from; or a fresh staging (which records `source_node`, the only node that may act on it).
pub fn start_staging(
    ctx: &TargetContext,
    layout: &StagingLayout,
    offer: &Offer,
    source_node: Option<&str>,
) -> Result<Start, TransferError> {
    let storage = &*ctx.storage;
    if let Some(manifest) = ctx.manifest(layout, &offer.migration_id)? {
        let same = manifest.base_complete
            && manifest.vshard_id == offer.vshard_id
            && manifest.base_lsn == offer.base_lsn
            && manifest.segments.len() == offer.files.len()
            && manifest
                .segments
                .iter()
                .zip(&offer.files)
                .all(|(s, f)| s.path == f.path && s.size_bytes == f.size_bytes);
        if !same || manifest.state == StagingState::Aborted {
            return Err(TransferError::Refused(format!(
                "staging {} already holds a different or aborted migration {}: forget it or use a new migration id",
                layout.root.display(),
                manifest.migration_id
            )));
        }
        return Ok(Start::AlreadyStaged { state: manifest.state, final_lsn: manifest.final_lsn });
    }
    let mut session = TargetSession::new(offer);
    if let Some(replay) = ChunkLog::replay_existing(storage, layout, offer) {
        let log = ChunkLog::reopen(storage, layout, &replay)?;
        let restored = chunklog::restore(storage, layout, offer, &replay, &mut session)?;
        return Ok(Start::Receive { session, log: Arc::new(log), restored });
    }
    staging::prepare_fresh(storage, layout)?;
    if let Some(node) = source_node {
        staging::write_source_node(storage, layout, node)?;
    }
    let log = ChunkLog::create(storage, layout, offer)?;
    Ok(Start::Receive { session, log: Arc::new(log), restored: chunklog::Restored::default() })
}

/// Prepares the staging of an offer `conn` claimed, then makes the migration visible
/// (`begin`). An offer the staging refuses leaves the migration as it was: its slot is freed
/// with the claim.
pub fn admit_staging(
    ctx: &TargetContext,
    layout: &StagingLayout,
    offer: &Offer,
    conn: ConnId,
    source_node: Option<&str>,
    now_unix_ms: u64,
) -> Result<Start, TransferError> {
    let summary = super::inbound::summary(offer);
    if ferry_wire::plant::planted(ferry_wire::plant::Bug::PhantomMigration) {
        // Planted bug: the migration becomes visible before its staging is found usable.
        ctx.machine().begin(&summary, conn, Begin::Receive, now_unix_ms)?;
    }
    let start = start_staging(ctx, layout, offer, source_node)?;
    let begin = match &start {
        Start::AlreadyStaged { state, final_lsn } => Begin::AlreadyStaged { state: *state, final_lsn: *final_lsn },
        Start::Receive { .. } => Begin::Receive,
    };
    ctx.machine().begin(&summary, conn, begin, now_unix_ms)?;
    Ok(start)
}

/// Writes a verified chunk body (`slices`, in order) at `offset_bytes` of its part file with
/// one gathered write, then logs the chunk verified with its CRC32C.
pub fn write_chunk(
    part: &dyn StorageFile,
    layout: &StagingLayout,
    log: &ChunkLog,
    chunk: ChunkRef,
    offset_bytes: u64,
    slices: &[IoSlice<'_>],
    crc32c: u32,
) -> Result<(), TransferError> {
    part.write_all_vectored_at(slices, offset_bytes).map_err(|cause| {
        let path = layout.part_path(chunk.file_index);
        TransferError::Staging(staging::StagingError::Io { what: "write", path, cause })
    })?;
    let (file_index, chunk_index) = (chunk.file_index, chunk.chunk_index);
    log.append(LogRecord::Verified { file_index, chunk_index, crc32c })?;
    Ok(())
}

/// Makes written chunks durable: the part files first, then the log that names them.
pub fn sync_parts(
    layout: &StagingLayout,
    parts: &[(u32, Arc<dyn StorageFile>)],
    log: &ChunkLog,
) -> Result<(), TransferError> {
    for (index, part) in parts {
        part.sync_data().map_err(|cause| {
            TransferError::Staging(staging::StagingError::Io { what: "fsync", path: layout.part_path(*index), cause })
        })?;
    }
    Ok(log.sync()?)
}

/// Renames a verified file into `segments/`, durably, and logs it staged.
pub fn finalize_file(
    ctx: &TargetContext,
    layout: &StagingLayout,
    log: &ChunkLog,
    path: &RelPath,
    done: FileDone,
) -> Result<(), TransferError> {
    staging::finalize_file(&*ctx.storage, layout, done.file_index, path, done.size_bytes, done.crc32c)?;
    log.append(LogRecord::Staged { file_index: done.file_index, crc32c: done.crc32c })?;
    Ok(())
}

/// The `MANIFEST.json` of a staged base: `copying`, one CRC32C per offered file, and from
/// the machine's record of it (`recorded`), the node that alone may release, abort or join it
/// (also after a restart) and when it started.
pub fn base_manifest(offer: &Offer, segment_crcs: Vec<u32>, recorded: Option<&Inbound>) -> StagingManifest {
    StagingManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        migration_id: offer.migration_id.clone(),
        vshard_id: offer.vshard_id,
        base_lsn: offer.base_lsn,
        final_lsn: None,
        state: StagingState::Copying,
        base_complete: true,
        db_meta: offer.db_meta.clone(),
        segments: offer
            .files
            .iter()
            .zip(segment_crcs)
            .map(|(f, crc32c)| StagedSegment { path: f.path.clone(), size_bytes: f.size_bytes, crc32c })
            .collect(),
        wal_segments: Vec::new(),
        source_node: recorded.and_then(|m| m.source_node.as_deref()).and_then(|n| NodeId::new(n).ok()),
        started_at_unix_ms: recorded.map(|m| m.started_at_unix_ms).filter(|&ms| ms != 0),
        wal_follows: Some(offer.wal),
    }
}

/// Every file is staged and its parts synced: syncs the segment tree's folders and writes
/// `manifest` (for a live copy, also prepares the fence's MANIFEST commit, off the pause).
pub fn write_base_manifest(
    ctx: &TargetContext,
    layout: &StagingLayout,
    offer: &Offer,
    manifest: &StagingManifest,
) -> Result<(), TransferError> {
    let paths: Vec<_> = offer.files.iter().map(|f| f.path.clone()).collect();
    let storage = &*ctx.storage;
    staging::sync_segment_tree(storage, layout, &paths)?;
    ctx.write_manifest(layout, manifest)?;
    if offer.wal {
        staging::prepare_manifest_commit(storage, layout, manifest)?;
    }
    Ok(())
}

/// Marks the staging of an offline copy released at `final_lsn`, with its staged WAL's
/// segments (trimmed first: records back to back, no preallocated zeros) when it had one.
pub fn commit_offline(
    ctx: &TargetContext,
    layout: &StagingLayout,
    id: &MigrationId,
    final_lsn: Lsn,
    staged_wal: Option<&Mutex<StagedWal>>,
) -> Result<(), TransferError> {
    let wal = match staged_wal {
        Some(staged) => {
            let mut wal = staged.lock().unwrap_or_else(|e| e.into_inner());
            wal.trim().map_err(|e| TransferError::Local(format!("trimming the staged WAL: {e}")))?;
            Some(wal.segments())
        }
        None => None,
    };
    let mut manifest =
        ctx.manifest(layout, id)?.ok_or_else(|| TransferError::Local("MANIFEST.json vanished before commit".into()))?;
    if manifest.state != StagingState::Released {
        manifest.state = StagingState::Released;
        manifest.final_lsn = Some(final_lsn);
        if let Some(segments) = wal {
            manifest.wal_segments = segments;
        }
        ctx.write_manifest(layout, &manifest)?;
    }
    Ok(())
}
