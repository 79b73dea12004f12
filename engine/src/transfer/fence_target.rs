//! The target's side of the cut-over: `fenced`, then `released` (DESIGN sections 2 and 3).
//!
//! What it does: [`fence_staging`] answers the source's `Fence{final_lsn, through_lsn}`: it
//! waits for the staged WAL to be durable up to `through_lsn` (the last record of the vShard
//! the source read up to `final_lsn`; its group's fdatasync is the staged WAL's flush on the
//! fence's path, and the source does not wait for its acknowledgement before it asks), checks
//! that the staged WAL holds nothing above `final_lsn`, writes `MANIFEST.json` in state
//! `fenced` with `final_lsn` and the staged WAL's segments (one MANIFEST commit: temp file,
//! fsync, rename, folder fsync, into a temp file prepared when the base was staged so its
//! flush has no allocation to journal, [`staging::prepare_manifest_commit`]), and, when the
//! target's
//! database acknowledges ingest (`migration.applied`), waits within the fence's time for the
//! applied LSN to reach `final_lsn`. [`unfence_hook`] puts a staging fenced by a fence the source then cancelled (its answer came
//! too late) back to `copying` when records above its `final_lsn` arrive. [`release_staging`]
//! answers a `Release` (a connection of its own): a staging `fenced` at exactly that
//! `final_lsn` becomes `released`; a repeated release is idempotent. [`set_applied`] records
//! `migration.applied`.
//!
//! What it does not: decide to fence or release (the source's daemon does, for its
//! coordinator), or import anything (the database does, from a `released` staging).
//!
//! Invariants: a staging is released only from `fenced` at the same `final_lsn`, and only when
//! its staged WAL holds no record above it: the database never imports a staging whose WAL
//! disagrees with the fence it was released at. The fence's check and MANIFEST commit and the
//! unfence hook run under the staged WAL's lock, so a staging is never left `fenced` below a
//! record it holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_wire::manifest::StagingState;
use ferry_wire::message::Offer;
use ferry_wire::proto::inbound::ReleaseStep;
use ferry_wire::proto::target::FenceAnswer;
use ferry_wire::{Lsn, MigrationId};

use super::inbound::TargetContext;
use super::TransferError;
use crate::staging::{self, StagingLayout};

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
}

/// As [`blocking`], on this thread (the fence's commit is on the pause's path).
async fn inline<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    crate::inline::run(f).await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
}

/// How long a fence may wait on the target, each from the `Fence`'s arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceWaits {
    /// The staged WAL must be durable up to here before the staging is fenced (`None`: no
    /// wait).
    pub through_lsn: Option<Lsn>,
    pub wal_wait_max_us: u64,
    /// For the database's ingest (`migration.applied`), when it acknowledges ingest.
    pub apply_wait_max_us: u64,
}

/// Marks the staging of `offer` `fenced` at `final_lsn` once its staged WAL is durable up to
/// `waits.through_lsn`; answers `Fenced` or `FenceCancelled` (the WAL or, when it is awaited,
/// the database's ingest not there within its wait). An I/O failure fails the transfer (never
/// retried).
pub async fn fence_staging(
    ctx: &Arc<TargetContext>,
    offer: &Offer,
    layout: &StagingLayout,
    final_lsn: Lsn,
    waits: FenceWaits,
) -> Result<FenceAnswer, TransferError> {
    let id = &offer.migration_id;
    let arrived = tokio::time::Instant::now();
    let deadline = arrived + Duration::from_micros(waits.apply_wait_max_us);
    let Some(wal) = ctx.wal_stages.get(id) else {
        return Ok(FenceAnswer::Cancelled { reason: "the WAL stream of this migration was never opened".into() });
    };
    if let Some(through_lsn) = waits.through_lsn {
        let wal_deadline = arrived + Duration::from_micros(waits.wal_wait_max_us);
        if let Some(reason) = wait_wal_durable(ctx, id, through_lsn, wal_deadline).await {
            return Ok(FenceAnswer::Cancelled { reason });
        }
    }
    let started = Instant::now();
    let (ctx_owned, layout_owned, id_owned) = (ctx.clone(), layout.clone(), id.clone());
    let committed = inline(move || {
        // Under the staged WAL's lock: no group is staged between the check and the commit, so
        // a staging is never fenced below a record it holds (see `unfence_hook`).
        let wal = wal.lock().unwrap_or_else(|e| e.into_inner());
        let (segments, durable) = (wal.segments(), wal.durable_lsn());
        if let Some(above) = segments.iter().map(|s| s.last_lsn).filter(|l| *l > final_lsn).max() {
            return Ok(Err(above));
        }
        ctx_owned.machine().check_fence(&id_owned)?;
        let mut manifest = ctx_owned
            .manifest(&layout_owned, &id_owned)?
            .ok_or_else(|| TransferError::Local("MANIFEST.json vanished before the fence".into()))?;
        manifest.state = StagingState::Fenced;
        manifest.final_lsn = Some(final_lsn);
        manifest.wal_segments = segments;
        ctx_owned.write_manifest_prepared(&layout_owned, &manifest)?;
        // Still under the lock, so a group staged next sees the staging fenced.
        ctx_owned.machine().fenced(&id_owned, final_lsn)?;
        Ok(Ok(durable))
    })
    .await?;
    let durable = match committed {
        Ok(durable) => durable,
        Err(above) => {
            return Ok(FenceAnswer::Cancelled {
                reason: format!(
                    "the staged WAL holds record {above}, above final_lsn {final_lsn}: the writer did not pause"
                ),
            })
        }
    };
    let commit_us = micros(started.elapsed());
    let mut apply_wait_us = 0;
    if ctx.applied_lsn(id).is_some() {
        let apply_started = Instant::now();
        if let Some(reason) = wait_applied(ctx, id, final_lsn, deadline).await {
            return Ok(FenceAnswer::Cancelled { reason });
        }
        apply_wait_us = micros(apply_started.elapsed());
    }
    tracing::info!(migration = %id, %final_lsn, commit_us, apply_wait_us, "staging fenced");
    Ok(FenceAnswer::Fenced { durable_lsn: durable, commit_us, apply_wait_us })
}

/// The staged WAL's hook before each group: records above the `final_lsn` a staging is fenced
/// at mean that fence was cancelled (the source gave up on its answer and writes resumed on
/// the source), so the staging goes back to `copying` (MANIFEST commit, once) and the
/// migration back to catching up, as on the source. Runs under the staged WAL's lock.
pub fn unfence_hook(ctx: Arc<TargetContext>, id: MigrationId, layout: StagingLayout) -> super::walrecv::BeforeGroup {
    Arc::new(move |last_lsn: Lsn| {
        let Some(fenced_at) = ctx.fenced_at(&id).filter(|f| last_lsn.0 > *f) else { return Ok(()) };
        if let Some(mut manifest) = ctx.manifest(&layout, &id)? {
            if manifest.state == StagingState::Fenced {
                manifest.state = StagingState::Copying;
                manifest.final_lsn = None;
                ctx.write_manifest(&layout, &manifest)?;
                // The next fence's commit, ready.
                staging::prepare_manifest_commit(&*ctx.storage, &layout, &manifest)?;
            }
        }
        if let Err(e) = ctx.machine().unfenced(&id) {
            tracing::debug!(migration = %id, "not unfenced: {e}");
        }
        tracing::info!(migration = %id, fenced_at, %last_lsn, "records above a cancelled fence arrive: the staging is copying again");
        Ok(())
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// When the database acknowledges ingest, waits for it to reach `final_lsn`; `Some(why)` when
/// it did not by `deadline`.
async fn wait_applied(
    ctx: &TargetContext,
    id: &MigrationId,
    final_lsn: Lsn,
    deadline: tokio::time::Instant,
) -> Option<String> {
    let applied = wait_for(&ctx.applied, final_lsn, deadline, || ctx.applied_lsn(id)).await.err()?;
    Some(format!(
        "the target's database has applied up to {applied}, not final_lsn {final_lsn}, within the pause budget"
    ))
}

/// Waits for the staged WAL of `id` to be durable up to `through_lsn`; `Some(why)` when it was
/// not by `deadline`.
async fn wait_wal_durable(
    ctx: &TargetContext,
    id: &MigrationId,
    through_lsn: Lsn,
    deadline: tokio::time::Instant,
) -> Option<String> {
    let durable =
        wait_for(&ctx.wal_durable, through_lsn, deadline, || Some(ctx.wal_durable_lsn(id).unwrap_or(0))).await.err()?;
    Some(format!(
        "the staged WAL is durable up to {durable}, not up to record {through_lsn} (the last the source read up to the fence), within the pause budget"
    ))
}

/// Waits, woken by `notify`, until `reached()` is at least `goal` (or `None`: nothing to wait
/// for); `Err(what it last was)` at `deadline`.
async fn wait_for(
    notify: &tokio::sync::Notify,
    goal: Lsn,
    deadline: tokio::time::Instant,
    reached: impl Fn() -> Option<u64>,
) -> Result<(), u64> {
    loop {
        // Made before the check: a notify_waiters() between the check and the wait wakes it.
        let notified = notify.notified();
        let Some(now) = reached() else { return Ok(()) };
        if now >= goal.0 {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(now);
        }
    }
}

/// Records the target database's ingest progress (`migration.applied`); it only grows.
pub fn set_applied(ctx: &TargetContext, id: &MigrationId, applied_lsn: Lsn) -> Result<u64, TransferError> {
    let now = ctx.machine().applied(id, applied_lsn)?;
    ctx.applied.notify_waiters();
    Ok(now.0)
}

/// Marks the staging of `id`, fenced at `final_lsn`, `released`. Idempotent.
pub async fn release_staging(ctx: &Arc<TargetContext>, id: &MigrationId, final_lsn: Lsn) -> Result<(), TransferError> {
    if !ctx.has_inbound(id) {
        return Err(TransferError::Refused(format!(
            "migration {id} has no staging on this target: nothing to release"
        )));
    }
    if ctx.machine().check_release(id, final_lsn)? == ReleaseStep::Already {
        return Ok(());
    }
    let layout = StagingLayout::new(&ctx.data_dir, id);
    let manifest = {
        let (ctx, layout, id) = (ctx.clone(), layout.clone(), id.clone());
        blocking(move || Ok(ctx.manifest(&layout, &id)?)).await?
    };
    let Some(mut manifest) = manifest else {
        return Err(TransferError::Local(format!("the staging of {id} lost its MANIFEST.json while fenced")));
    };
    // The staged WAL may have grown after the fence only if a writer did not pause; then the
    // staging must not be released at this fence.
    let wal = ctx.wal_stages.get_or_open(&ctx.storage, &layout, id, manifest.base_lsn)?;
    let durable = wal.lock().unwrap_or_else(|e| e.into_inner()).durable_lsn();
    if durable > final_lsn {
        return Err(TransferError::Refused(format!(
            "the staged WAL of {id} holds records up to {durable}, above final_lsn {final_lsn}: fence again before releasing"
        )));
    }
    manifest.state = StagingState::Released;
    let (storage, ctx_owned) = (ctx.storage.clone(), ctx.clone());
    blocking(move || {
        // Records back to back before the staging is released (no preallocated zeros).
        wal.lock()
            .unwrap_or_else(|e| e.into_inner())
            .trim()
            .map_err(|e| TransferError::Local(format!("trimming the staged WAL: {e}")))?;
        ctx_owned.write_manifest(&layout, &manifest)?;
        Ok(staging::release_held_manifest(&*storage, &layout)?)
    })
    .await?;
    ctx.machine().released(id, final_lsn)?;
    tracing::info!(migration = %id, %final_lsn, "staging released");
    Ok(())
}

#[cfg(test)]
#[path = "fence_target_tests.rs"]
mod tests;
