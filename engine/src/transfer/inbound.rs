//! The target node's inbound migrations: the driver around `ferry_wire::proto::inbound`.
//!
//! What it does: [`TargetContext`] owns the one [`Inbounds`] machine of a target node, behind
//! one lock, and the I/O around it: the live peer connections (so a claim superseded or cut
//! can close one), the staged WALs, the notifications that waiters use instead of polling
//! (a claim released, a staged WAL durable further, the database's ingest reported). It
//! lists the stagings an earlier run left, and forgets finished ones.
//!
//! What it does not: decide. Every state change is a transition of the machine, and a refused
//! transition comes back as a [`TransferError::Inbound`] naming the state and the event. It
//! does not run the conversation with a source either (`target`), fence (`fence_target`) or
//! abort (`abort`): those modules drive the machine through this one, and nothing here
//! imports them back.
//!
//! Invariants: a claim is released exactly once, when the conversation that took it ends
//! ([`ClaimGuard`]), and every release wakes the waiters; a connection is listed here from its
//! handshake until its conversation ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::limits::PEER_CONNECTIONS_MAX;
use ferry_wire::message::Offer;
use ferry_wire::proto::inbound::{Claimed, ConnId, Disk, Inbound, InboundState, Inbounds, Limits, OfferSummary};
use ferry_wire::{Lsn, MigrationId, NodeId};
use quinn::{Connection, VarInt};

use super::manifests::{self, Manifests};
use super::rdma::attach::ChunkTransport;
use super::walrecv::WalStages;
use super::TransferError;
use crate::staging::{self, StagingError, StagingLayout};
use crate::storage::Storage;
use ferry_wire::manifest::StagingManifest;

/// The close code a cut inbound connection gets: the source must not retry it.
pub(crate) const CUT_CLOSE_CODE: u32 = crate::quic::close_code::REFUSED;

/// How long a reconnecting source waits for its old connection's claim to be released.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(5);

/// An inbound migration as the daemon shows it: the machine's view, plus what this process
/// counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundStatus {
    pub migration: Inbound,
    /// Chunk bytes received for this migration by this process, over every connection. Unlike
    /// `bytes_resent` it does not survive a restart; it shows what resumption saved.
    pub bytes_received_in_process: u64,
}

/// What the target admits (DESIGN section 11.5: admission).
pub type TargetLimits = Limits;

/// What the receiver needs: where staging goes, how it is written, who this node is, and the
/// state of every inbound migration.
pub struct TargetContext {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    machine: Mutex<Inbounds>,
    /// Live peer connections, in the order they connected.
    /// Established connections, with the node id of the peer each came from.
    connections: Mutex<Vec<(Connection, Option<String>)>>,
    received: Mutex<HashMap<MigrationId, Arc<AtomicU64>>>,
    /// The staged WALs open on this node.
    pub wal_stages: WalStages,
    /// The stagings' manifests, kept as last written (never read back on a hot path).
    manifests: Manifests,
    /// Woken when a claim is released.
    claims_changed: tokio::sync::Notify,
    /// Woken when a database reports progress with `migration.applied`.
    pub(crate) applied: tokio::sync::Notify,
    /// Woken when a staged WAL's durable LSN moves (a fence waits for its `through_lsn`).
    pub(crate) wal_durable: tokio::sync::Notify,
    /// What this node answers a source's RDMA offer with (QUIC by default: no lanes).
    pub(crate) chunk_transport: ChunkTransport,
}

impl std::fmt::Debug for TargetContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetContext").field("node_id", &self.node_id).field("data_dir", &self.data_dir).finish()
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The machine's connection id of a quinn connection.
pub(crate) fn conn_id(conn: &Connection) -> ConnId {
    ConnId(conn.stable_id() as u64)
}

/// What the machine needs of an offer.
pub fn summary(offer: &Offer) -> OfferSummary {
    OfferSummary {
        migration_id: offer.migration_id.clone(),
        vshard_id: offer.vshard_id,
        bytes_total: offer.bytes_total(),
        files_count: offer.files.len() as u64,
        wal: offer.wal,
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl TargetContext {
    pub fn new(node_id: NodeId, data_dir: PathBuf, storage: Arc<dyn Storage>) -> Self {
        Self {
            node_id,
            data_dir,
            storage,
            machine: Mutex::new(Inbounds::default()),
            connections: Mutex::new(Vec::new()),
            received: Mutex::new(HashMap::new()),
            wal_stages: WalStages::default(),
            manifests: Manifests::default(),
            claims_changed: tokio::sync::Notify::new(),
            applied: tokio::sync::Notify::new(),
            wal_durable: tokio::sync::Notify::new(),
            chunk_transport: ChunkTransport::quic(),
        }
    }

    /// Answers sources' RDMA offers from `transport` (a node whose `settle` chose RDMA).
    #[must_use]
    pub fn with_chunk_transport(mut self, transport: ChunkTransport) -> Self {
        self.chunk_transport = transport;
        self
    }

    /// Sets the admission limits (from the daemon's configuration).
    pub fn set_limits(&self, limits: TargetLimits) {
        self.machine().set_limits(limits);
    }

    /// The inbound machine, locked. Hold it only for a transition and what must happen
    /// atomically with it, never across an await.
    pub fn machine(&self) -> MutexGuard<'_, Inbounds> {
        locked(&self.machine)
    }

    /// Lists the stagings an earlier run of the daemon left (state from their MANIFEST.json;
    /// a staging without one was interrupted during its base copy), so a restarted target
    /// shows them before their sources reconnect. Unreadable entries are logged and skipped.
    pub fn load_existing(&self) {
        let dir = self.data_dir.join("migrations");
        let Ok(names) = self.storage.list_dir(&dir) else { return };
        for name in names {
            let Ok(id) = MigrationId::new(name.clone()) else { continue };
            match self.state_on_disk(&id) {
                Ok((state, source_node)) => self.machine().adopt(&id, state, source_node),
                Err(e) => tracing::warn!(migration = %id, "cannot read the staging's manifest: {e}"),
            }
        }
    }

    /// Makes sure the machine knows `id` when a staging of it is on disk (one unreadable at
    /// start-up, say), so the node recorded as its source is checked before anyone acts on
    /// it. Blocking. An error when the staging exists but cannot be read: then nobody may act.
    pub fn adopt_from_disk(&self, id: &MigrationId) -> Result<(), TransferError> {
        if self.machine().get(id).is_some() || !self.storage.exists(&StagingLayout::new(&self.data_dir, id).root) {
            return Ok(());
        }
        let (state, source_node) = self.state_on_disk(id)?;
        self.machine().adopt(id, state, source_node);
        Ok(())
    }

    /// The state a staging's manifest stands for (interrupted without one), and the source
    /// node it records.
    fn state_on_disk(&self, id: &MigrationId) -> Result<(InboundState, Option<String>), TransferError> {
        let layout = StagingLayout::new(&self.data_dir, id);
        Ok(match self.manifest(&layout, id)? {
            Some(m) => {
                (InboundState::of_staging(m.state, m.base_complete, m.final_lsn), m.source_node.map(|n| n.to_string()))
            }
            // Interrupted during its base copy: the node that started it is recorded apart.
            None => (InboundState::Interrupted, staging::read_source_node(&*self.storage, &layout)?),
        })
    }

    /// The staging's `MANIFEST.json` (`None`: it has none yet), as this process last wrote or
    /// read it. Blocking (a first read goes to the disk).
    pub(crate) fn manifest(
        &self,
        layout: &StagingLayout,
        id: &MigrationId,
    ) -> Result<Option<StagingManifest>, StagingError> {
        self.manifests.get(&*self.storage, layout, id)
    }

    /// Writes the staging's manifest durably and keeps it. Blocking.
    pub(crate) fn write_manifest(
        &self,
        layout: &StagingLayout,
        manifest: &StagingManifest,
    ) -> Result<(), StagingError> {
        self.manifests.write(&*self.storage, layout, manifest, manifests::Write::Atomic)
    }

    /// Writes the staging's manifest through its prepared commit (the fence's) and keeps it.
    pub(crate) fn write_manifest_prepared(
        &self,
        layout: &StagingLayout,
        manifest: &StagingManifest,
    ) -> Result<(), StagingError> {
        self.manifests.write(&*self.storage, layout, manifest, manifests::Write::Prepared)
    }

    /// Drops the kept manifest of a staging about to be removed.
    pub(crate) fn forget_manifest(&self, id: &MigrationId) {
        self.manifests.forget(id);
    }

    /// Registers a live connection (from its handshake until its conversation ends).
    /// Registers an established connection from `peer`; refused (not registered) when that
    /// peer holds [`PEER_CONNECTIONS_MAX`] already.
    pub(crate) fn connected(&self, conn: &Connection, peer: Option<&str>) -> Result<(), TransferError> {
        let mut connections = locked(&self.connections);
        let held = connections.iter().filter(|(_, p)| p.as_deref() == peer).count();
        if held >= PEER_CONNECTIONS_MAX {
            let who = peer.unwrap_or("a peer without a node id");
            return Err(TransferError::Refused(format!(
                "node {who} holds {held} connections to this target, the most one peer may (PEER_CONNECTIONS_MAX): close some, or lower --connections"
            )));
        }
        connections.push((conn.clone(), peer.map(str::to_owned)));
        Ok(())
    }

    pub(crate) fn disconnected(&self, conn: &Connection) {
        locked(&self.connections).retain(|(c, _)| c.stable_id() != conn.stable_id());
    }

    fn close(&self, conn: ConnId, code: u32, reason: &str) {
        if let Some((conn, _)) = locked(&self.connections).iter().find(|(c, _)| conn_id(c) == conn) {
            conn.close(VarInt::from_u32(code), reason.as_bytes());
        }
    }

    /// Admits `offer` and claims it for `conn`. A claim held by an older connection of the same
    /// peer is taken over: that connection is closed and its claim's release awaited.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        offer: &Offer,
        conn: &Connection,
        peer: Option<&str>,
    ) -> Result<ClaimGuard, TransferError> {
        let summary = summary(offer);
        let layout = StagingLayout::new(&self.data_dir, &offer.migration_id);
        let deadline = tokio::time::Instant::now() + SUPERSEDE_WAIT;
        loop {
            let staging_exists = self.storage.exists(&layout.root);
            let free_bytes = match self.machine().needs_free_space() && !staging_exists {
                true => Some(free_space_bytes(&self.data_dir).map_err(|e| {
                    TransferError::Local(format!("cannot read free space of {}: {e}", self.data_dir.display()))
                })?),
                false => None,
            };
            let released = self.claims_changed.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let disk = Disk { staging_exists, free_bytes };
            match self.machine().claim(&summary, conn_id(conn), peer, disk)? {
                Claimed::Taken => {
                    return Ok(ClaimGuard { ctx: self.clone(), id: offer.migration_id.clone(), conn: conn_id(conn) })
                }
                Claimed::Superseding { old } => {
                    self.close(old, crate::quic::close_code::CANCELLED, "superseded by a new connection");
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(TransferError::Refused(format!(
                    "migration {} is still held by an old connection; retry",
                    offer.migration_id
                )));
            }
        }
    }

    /// Cuts the connection receiving `id` (the source does not retry the code).
    pub(crate) fn cut(&self, id: &MigrationId, reason: &str) {
        let claimant = self.machine().claimant(id);
        if let Some(conn) = claimant {
            self.close(conn, CUT_CLOSE_CODE, reason);
        }
    }

    /// Waits until no connection holds `id`; false if one still does at `deadline`.
    pub(crate) async fn wait_unclaimed(&self, id: &MigrationId, deadline: tokio::time::Instant) -> bool {
        loop {
            let released = self.claims_changed.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.machine().is_claimed(id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return !self.machine().is_claimed(id);
            }
        }
    }

    /// Removes what this node holds for a finished (released or aborted) inbound migration:
    /// its staging folder and its status. A migration still in progress is refused.
    pub async fn forget(&self, id: &MigrationId) -> Result<(), TransferError> {
        self.machine().check_forget(id)?;
        self.forget_manifest(id);
        let layout = StagingLayout::new(&self.data_dir, id);
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || -> Result<(), TransferError> {
            if storage.exists(&layout.root) {
                storage.remove_dir_all(&layout.root).map_err(staging::io_err("remove", &layout.root))?;
            }
            // Synced even when the folder is gone already: a forget retried after a failed
            // sync must not answer before the removal is durable (found by the simulator).
            if storage.exists(&layout.migrations_dir()) {
                storage
                    .sync_dir(&layout.migrations_dir())
                    .map_err(staging::io_err("sync", &layout.migrations_dir()))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))??;
        self.wal_stages.forget(id);
        self.machine().forgotten(id)?;
        locked(&self.received).remove(id);
        Ok(())
    }

    pub(crate) fn received_counter(&self, id: &MigrationId) -> Arc<AtomicU64> {
        locked(&self.received).entry(id.clone()).or_default().clone()
    }

    /// A copy of every inbound migration's status. One found on disk and not offered again
    /// since takes its vShard and files from its staging's manifest.
    pub fn inbound(&self) -> BTreeMap<MigrationId, InboundStatus> {
        let all: Vec<(MigrationId, Inbound)> = self.machine().iter().map(|(id, m)| (id.clone(), m.clone())).collect();
        all.into_iter()
            .map(|(id, mut migration)| {
                self.manifests.fill_from_kept(&id, &mut migration);
                let bytes_received_in_process = self.received_counter(&id).load(Ordering::Relaxed);
                (id, InboundStatus { migration, bytes_received_in_process })
            })
            .collect()
    }

    /// Whether `id` is an inbound migration here (without copying every status).
    pub fn has_inbound(&self, id: &MigrationId) -> bool {
        self.machine().get(id).is_some()
    }

    /// What the target's database reported applied for `id` (`migration.applied`), if anything.
    pub fn applied_lsn(&self, id: &MigrationId) -> Option<u64> {
        self.machine().get(id).and_then(|m| m.applied_lsn).map(|l| l.0)
    }

    /// The durable LSN of the staged WAL of `id`, once its WAL stream has started.
    pub fn wal_durable_lsn(&self, id: &MigrationId) -> Option<u64> {
        self.machine().get(id).and_then(|m| m.wal_durable_lsn).map(|l| l.0)
    }

    /// The staged WAL of `id` is durable up to `lsn`: recorded, and the fence's waiters woken.
    pub fn set_wal_durable(&self, id: &MigrationId, lsn: Lsn) {
        if let Err(e) = self.machine().wal_durable(id, lsn) {
            tracing::debug!(migration = %id, "durable LSN of an unknown migration: {e}");
        }
        self.wal_durable.notify_waiters();
    }

    /// The `final_lsn` the staging of `id` is fenced at, if it is fenced (not released).
    pub fn fenced_at(&self, id: &MigrationId) -> Option<u64> {
        self.machine().fenced_at(id).map(|l| l.0)
    }

    /// Closes every live peer connection, as a network cut would. Transfers resume when their
    /// source reconnects. Tests use it to interrupt copies at chosen points (built only for
    /// tests and with the `testkit` feature).
    #[cfg(any(test, feature = "testkit"))]
    pub fn drop_connections(&self) -> usize {
        // In the order they connected: a transfer's control connection before its data
        // connections, as a network cut would be seen.
        let connections = std::mem::take(&mut *locked(&self.connections));
        for (conn, _) in &connections {
            conn.close(VarInt::from_u32(crate::quic::close_code::CANCELLED), b"connection dropped on purpose");
        }
        connections.len()
    }
}

/// A connection's claim on one migration; released (and its waiters woken) when dropped.
#[derive(Debug)]
pub(crate) struct ClaimGuard {
    ctx: Arc<TargetContext>,
    id: MigrationId,
    conn: ConnId,
}

impl ClaimGuard {
    pub(crate) fn conn(&self) -> ConnId {
        self.conn
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.ctx.machine().release_claim(&self.id, self.conn) {
            self.ctx.claims_changed.notify_waiters();
        }
    }
}

/// Bytes available to this process on the filesystem holding `path`.
fn free_space_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}
