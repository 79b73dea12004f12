//! The target's side of the cut-over: `fenced`, then `released` (DESIGN sections 2, 3 and 8).
//!
//! What it does: [`fence_staging`] answers the source's `Fence{final_lsn, through_lsn}`: it
//! waits for the staged WAL to be durable up to `through_lsn` (the last record of the vShard
//! the source read up to `final_lsn`; its group's fdatasync is the only flush on the fence's
//! path, and the source does not wait for its acknowledgement before it asks), checks under
//! the staged WAL's lock that the staged WAL holds nothing above `final_lsn`, marks the
//! migration fenced in memory and, when the target's database acknowledges ingest
//! (`migration.applied`), waits within the fence's time for the applied LSN to reach
//! `final_lsn`. [`commit_fenced`] runs after the `Fenced` answer is out, off the pause: the
//! MANIFEST commit of state `fenced` with `final_lsn` and the staged WAL's segments (temp file,
//! fsync, rename, folder fsync, into the temp file prepared when the base was staged,
//! [`staging::prepare_manifest_commit`]). [`unfence_hook`] puts a staging fenced by a fence the
//! source then cancelled (its answer came too late) back to `copying` when records above its
//! `final_lsn` arrive. [`release_staging`] answers a `Release` (a connection of its own): a
//! staging fenced at exactly that `final_lsn` becomes `released`; so does a base-staged one
//! whose `fenced` commit was lost (a crash between the answer and the commit), when the release
//! names the durable LSN the fence was answered with and the staged WAL is durable from it to
//! at most `final_lsn` (derived from the durable staged WAL); a repeated release is idempotent.
//! [`set_applied`] records `migration.applied`.
//!
//! What it does not: decide to fence or release (the source's daemon does, for its
//! coordinator), or import anything (the database does, from a `released` staging).
//!
//! Invariants: a staging is released only at a fence the target answered (fenced in memory or
//! on disk at the same `final_lsn`, or derived as above), and only when its staged WAL holds
//! no record above `final_lsn` and every record the fence made durable: the database never
//! imports a staging whose WAL disagrees with the fence it was released at. The fence's check,
//! the `fenced` commit, the release and the unfence hook run under the staged WAL's lock, so a
//! staging is never left `fenced` below a record it holds, and a late `fenced` commit never
//! overwrites a release or an unfence.

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

/// Marks the staging of `offer` fenced at `final_lsn` (in memory) once its staged WAL is
/// durable up to `waits.through_lsn`; answers `Fenced` or `FenceCancelled` (the WAL or, when it
/// is awaited, the database's ingest not there within its wait). Writes nothing: the flush on
/// the fence's path is the staged WAL's group commit it waits for, and the `fenced` MANIFEST
/// commit follows the answer ([`commit_fenced`], DESIGN section 8).
pub async fn fence_staging(
    ctx: &Arc<TargetContext>,
    offer: &Offer,
    final_lsn: Lsn,
    waits: FenceWaits,
) -> Result<FenceAnswer, TransferError> {
    let id = &offer.migration_id;
    let arrived = tokio::time::Instant::now();
    let deadline = arrived + Duration::from_micros(waits.apply_wait_max_us);
    let Some(wal) = ctx.wal_stages.get(id) else {
        return Ok(FenceAnswer::Cancelled { reason: "the WAL stream of this migration was never opened".into() });
    };
    // Planted bug `FenceWithoutWalWait`: the fence answers without its last records durable.
    let wait_for_wal = !ferry_wire::plant::planted(ferry_wire::plant::Bug::FenceWithoutWalWait);
    if let Some(through_lsn) = waits.through_lsn.filter(|_| wait_for_wal) {
        let wal_deadline = arrived + Duration::from_micros(waits.wal_wait_max_us);
        if let Some(reason) = wait_wal_durable(ctx, id, through_lsn, wal_deadline).await {
            return Ok(FenceAnswer::Cancelled { reason });
        }
    }
    let started = Instant::now();
    let (ctx_owned, id_owned) = (ctx.clone(), id.clone());
    let checked = inline(move || {
        // Under the staged WAL's lock: no group is staged between the check and the mark, so
        // a staging is never fenced below a record it holds (see `unfence_hook`).
        let wal = wal.lock().unwrap_or_else(|e| e.into_inner());
        let (last_lsn, durable) = (wal.segments().iter().map(|s| s.last_lsn).max(), wal.durable_lsn());
        if let Some(above) = last_lsn.filter(|l| *l > final_lsn) {
            return Ok(Err(above));
        }
        // Still under the lock, so a group staged next sees the staging fenced.
        ctx_owned.machine().fenced(&id_owned, final_lsn)?;
        Ok(Ok(durable))
    })
    .await?;
    let durable = match checked {
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

/// After the `Fenced` answer is out: makes the staging's `fenced` state durable, off the
/// pause (one MANIFEST commit through the prepared temp file: `fenced`, `final_lsn`, the
/// staged WAL's segments). Returns whether it wrote: a staging no longer fenced at `final_lsn`
/// in memory (unfenced, released, aborted since) or already committed is left alone. A failed
/// commit is not retried (DESIGN section 8): the staging goes back to base staged in memory, as
/// a crash there would leave it, and the error is returned; a release then derives the fence
/// from the durable staged WAL. Blocking.
pub fn commit_fenced(
    ctx: &TargetContext,
    layout: &StagingLayout,
    id: &MigrationId,
    final_lsn: Lsn,
) -> Result<bool, TransferError> {
    let Some(wal) = ctx.wal_stages.get(id) else { return Ok(false) };
    let wal = wal.lock().unwrap_or_else(|e| e.into_inner());
    if ctx.fenced_at(id) != Some(final_lsn.0) {
        return Ok(false);
    }
    let Some(mut manifest) = ctx.manifest(layout, id)? else {
        return Err(TransferError::Local(format!("the staging of {id} lost its MANIFEST.json while fenced")));
    };
    if manifest.state == StagingState::Fenced && manifest.final_lsn == Some(final_lsn) {
        return Ok(false);
    }
    manifest.state = StagingState::Fenced;
    manifest.final_lsn = Some(final_lsn);
    manifest.wal_segments = wal.segments();
    if let Err(e) = ctx.write_manifest_prepared(layout, &manifest) {
        if let Err(refused) = ctx.machine().unfenced(id) {
            tracing::debug!(migration = %id, "not unfenced: {refused}");
        }
        return Err(e.into());
    }
    tracing::debug!(migration = %id, %final_lsn, "the fence is durable in MANIFEST.json");
    Ok(true)
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

/// Marks the staging of `id`, fenced at `final_lsn`, `released`. Idempotent. A staging that
/// is base staged, not fenced (its `fenced` commit lost after the fence's answer), is released
/// when `fenced_durable_lsn` (the durable LSN the fence was answered with) is given and its
/// staged WAL is durable from it to at most `final_lsn`. See [`release_now`].
pub async fn release_staging(
    ctx: &Arc<TargetContext>,
    id: &MigrationId,
    final_lsn: Lsn,
    fenced_durable_lsn: Option<Lsn>,
) -> Result<(), TransferError> {
    let (ctx_owned, id_owned) = (ctx.clone(), id.clone());
    blocking(move || release_now(&ctx_owned, &id_owned, final_lsn, fenced_durable_lsn).map(|_| ())).await
}

/// [`release_staging`], blocking: the check and the write run under the staged WAL's lock (the
/// `fenced` commit or the unfence hook may run meanwhile). Returns how it released (`None`:
/// released already).
pub fn release_now(
    ctx: &TargetContext,
    id: &MigrationId,
    final_lsn: Lsn,
    fenced_durable_lsn: Option<Lsn>,
) -> Result<Option<ReleaseStep>, TransferError> {
    if !ctx.has_inbound(id) {
        return Err(TransferError::Refused(format!(
            "migration {id} has no staging on this target: nothing to release"
        )));
    }
    if ctx.machine().check_release(id, final_lsn, fenced_durable_lsn)? == ReleaseStep::Already {
        return Ok(None);
    }
    let layout = StagingLayout::new(&ctx.data_dir, id);
    let lost = || TransferError::Local(format!("the staging of {id} lost its MANIFEST.json while fenced"));
    let base_lsn = ctx.manifest(&layout, id)?.ok_or_else(lost)?.base_lsn;
    let wal = ctx.wal_stages.get_or_open(&ctx.storage, &layout, id, base_lsn)?;
    let mut wal = wal.lock().unwrap_or_else(|e| e.into_inner());
    let step = ctx.machine().check_release(id, final_lsn, fenced_durable_lsn)?;
    if step == ReleaseStep::Already {
        return Ok(None);
    }
    // The staged WAL may have grown after the fence only if a writer did not pause; then the
    // staging must not be released at this fence.
    let durable = wal.durable_lsn();
    if durable > final_lsn {
        return Err(TransferError::Refused(format!(
            "the staged WAL of {id} holds records up to {durable}, above final_lsn {final_lsn}: fence again before releasing"
        )));
    }
    // Every record the fence made durable is still there (its answer named where it was).
    if let Some(answered) = fenced_durable_lsn.filter(|answered| durable < *answered) {
        return Err(TransferError::Refused(format!(
            "the staged WAL of {id} is durable up to {durable}, below the {answered} its fence was answered with: records are missing, abort the migration"
        )));
    }
    let mut manifest = ctx.manifest(&layout, id)?.ok_or_else(lost)?;
    // Records back to back before the staging is released (no preallocated zeros).
    wal.trim().map_err(|e| TransferError::Local(format!("trimming the staged WAL: {e}")))?;
    manifest.state = StagingState::Released;
    manifest.final_lsn = Some(final_lsn);
    manifest.wal_segments = wal.segments();
    ctx.write_manifest(&layout, &manifest)?;
    staging::release_held_manifest(&*ctx.storage, &layout)?;
    ctx.machine().released(id, final_lsn, fenced_durable_lsn)?;
    let derived = matches!(step, ReleaseStep::Derive { .. });
    tracing::info!(migration = %id, %final_lsn, derived, "staging released");
    Ok(Some(step))
}

#[cfg(test)]
#[path = "fence_target_tests.rs"]
mod tests;
