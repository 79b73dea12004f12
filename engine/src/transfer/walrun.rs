//! The source's WAL stream of one transfer attempt, as the copy and the fence both drive it.
//!
//! What it does: [`start_wal`] opens the WAL stream on the transfer's connection, subscribes
//! to the folder's shared tail from the first record the target does not hold, and publishes
//! the WAL fields of the progress; [`WalRun`] owns that stream's task and ends it when
//! dropped.
//!
//! What it does not: read the WAL (the hub does), frame records (`walsend`), or decide when
//! a fence has drained (`ferry_wire::fence`, driven by `fence_source`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::message::{Message, Offer};
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, VShardId};
use quinn::Connection;
use tokio::sync::{mpsc, watch};

use super::walsend::{self, TailShared, WalSourceConfig};
use super::waltail_hub::{self, SubscribeRequest};
use super::TransferError;

/// Messages from the target's control stream, read by their own task.
pub(super) type Messages = mpsc::Receiver<Result<Option<Message>, TransferError>>;

/// The WAL stream of one attempt: its task, its subscription to the folder's tail, and the
/// task that publishes its progress.
pub(super) struct WalRun {
    task: Option<tokio::task::JoinHandle<Result<Lsn, TransferError>>>,
    /// The durable LSN the stream ended with, when it ended before `finish`.
    ended_at: Option<Lsn>,
    pub(super) shared: Arc<TailShared>,
    until: Option<Lsn>,
    /// Publishes the WAL fields of the progress from the start of the stream, so they move
    /// during the base copy too.
    _publisher: super::task::AbortOnDrop,
}

/// How often the WAL fields of the progress are refreshed.
const WAL_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

impl Drop for WalRun {
    fn drop(&mut self) {
        // Leaves the folder's tail (the hub drops the subscription at its next turn).
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl WalRun {
    /// Whether the stream task still runs.
    pub(super) fn running(&self) -> bool {
        self.task.is_some()
    }

    /// Waits for the stream task to end (while the base copy runs); keeps its result.
    pub(super) async fn ended(&mut self) -> Result<(), TransferError> {
        let Some(task) = self.task.as_mut() else { return Ok(()) };
        let joined = task.await;
        self.task = None;
        let durable = joined.map_err(|e| TransferError::Local(format!("the WAL task failed: {e}")))??;
        self.ended_at = Some(durable);
        Ok(())
    }

    /// Waits until every selected record up to `until_lsn` is durable (forever without one).
    /// Returns the final LSN.
    pub(super) async fn finish(&mut self, progress: &watch::Sender<Progress>) -> Result<Lsn, TransferError> {
        if let Some(durable) = self.ended_at {
            publish_wal(&self.shared, progress);
            return Ok(self.until.unwrap_or(durable));
        }
        let Some(task) = self.task.as_mut() else {
            return Err(TransferError::Local("the WAL stream already ended".into()));
        };
        let durable = task.await;
        self.task = None;
        let durable = durable.map_err(|e| TransferError::Local(format!("the WAL task failed: {e}")))??;
        publish_wal(&self.shared, progress);
        Ok(self.until.unwrap_or(durable))
    }
}

/// Publishes the WAL fields of the progress; watchers are woken only when one changed.
pub(super) fn publish_wal(shared: &TailShared, progress: &watch::Sender<Progress>) {
    let durable = shared.durable_lsn.load(Ordering::Relaxed);
    let source = shared.source_lsn.load(Ordering::Relaxed).max(durable);
    let held_bytes = shared.held_bytes.load(Ordering::Relaxed);
    let lag_bytes =
        shared.queued_bytes.load(Ordering::Relaxed).saturating_add(shared.inflight_bytes.load(Ordering::Relaxed));
    let rate = shared.rate_bytes_per_sec.load(Ordering::Relaxed);
    let group_commit_us = shared.group_commit_us.load(Ordering::Relaxed);
    progress.send_if_modified(|p| {
        let changed = p.wal_durable_lsn != Some(durable)
            || p.wal_source_lsn != Some(source)
            || p.wal_held_bytes != held_bytes
            || p.wal_lag_bytes != lag_bytes
            || p.wal_rate_bytes_per_sec != rate
            || p.wal_group_commit_us != group_commit_us;
        p.wal_durable_lsn = Some(durable);
        p.wal_source_lsn = Some(source);
        p.wal_held_bytes = held_bytes;
        p.wal_lag_bytes = lag_bytes;
        p.wal_rate_bytes_per_sec = rate;
        p.wal_group_commit_us = group_commit_us;
        changed
    });
}

/// Opens the WAL stream, subscribes to the folder's tail from the first record the target
/// does not hold, and starts publishing the WAL progress.
pub(super) async fn start_wal(
    conn: &Connection,
    config: &WalSourceConfig,
    migration_id: &MigrationId,
    vshard_id: VShardId,
    offer: &Offer,
    progress: &watch::Sender<Progress>,
) -> Result<WalRun, TransferError> {
    let (wal_send, wal_recv, machine, durable) = walsend::open(conn, offer.base_lsn).await?;
    let start = durable.next().ok_or_else(|| TransferError::Local("the LSN space is exhausted".into()))?;
    let shared = Arc::new(TailShared::default());
    shared.durable_lsn.store(durable.0, Ordering::Relaxed);
    shared.source_lsn.store(durable.0, Ordering::Relaxed);
    // Every record up to the durable LSN needs no reading: the drain counts it as read.
    shared.scanned_lsn.store(durable.0, Ordering::Relaxed);
    let subscription = SubscribeRequest {
        config: config.clone(),
        migration_id: migration_id.clone(),
        vshard_id,
        from_lsn: start,
        queue_max_bytes: walsend::QUEUE_MAX_BYTES,
    };
    let events = {
        let shared = shared.clone();
        // canonicalize and a channel send: quick, but file system calls stay off the runtime.
        tokio::task::spawn_blocking(move || waltail_hub::subscribe(subscription, shared))
            .await
            .map_err(|e| TransferError::Local(format!("the WAL subscription task failed: {e}")))??
    };
    let task = tokio::spawn(walsend::stream(wal_send, wal_recv, events, shared.clone(), machine));
    publish_wal(&shared, progress);
    let publisher = {
        let (shared, progress) = (shared.clone(), progress.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WAL_PROGRESS_INTERVAL);
            loop {
                tick.tick().await;
                publish_wal(&shared, &progress);
            }
        })
    };
    Ok(WalRun {
        task: Some(task),
        ended_at: None,
        shared,
        until: config.until_lsn,
        _publisher: super::task::AbortOnDrop(publisher),
    })
}
