//! The simulated target daemon: a `TargetContext` on the fake storage, and the execution of
//! one connection's `TargetConversation` actions with the engine's own target steps.
//!
//! What it does not: any I/O beyond the fake storage, or any decision: the machines decide,
//! `ferry_engine::transfer::steps` (and the release, abort and forget functions) do the work.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ferry_engine::staging::{self, StagingLayout};
use ferry_engine::storage::{FakeStorage, StorageFile};
use ferry_engine::transfer::chunklog::ChunkLog;
use ferry_engine::transfer::fence_target::{commit_fenced, fence_staging, release_now, FenceWaits};
use ferry_engine::transfer::inbound::{now_unix_ms, summary};
use ferry_engine::transfer::steps::{self, Start};
use ferry_engine::transfer::target::TargetContext;
use ferry_engine::transfer::TransferError;
use ferry_wire::checkpoint::LogRecord;
use ferry_wire::message::{ChunkRef, Message, Offer};
use ferry_wire::proto::inbound::{Claimed, ConnId, Disk, ReleaseStep};
use ferry_wire::proto::target::{Admitted, ChunkEvent, FenceRequest, TargetAction, TargetConversation};
use ferry_wire::session::ChunkVerdict;
use ferry_wire::{Lsn, MigrationId, NodeId};

use super::Coverage;

pub const DATA_DIR: &str = "/data";
/// Unsynced bytes after which the target machine asks for a sync: a few chunks, so syncs (and
/// the crashes drawn at them) happen within a small copy.
pub const SYNC_BATCH_BYTES: u64 = 3 * 4096;

/// The target daemon: its storage and its context (rebuilt on a restart).
pub struct Target {
    pub storage: FakeStorage,
    pub ctx: Arc<TargetContext>,
    pub rt: tokio::runtime::Runtime,
}

impl Target {
    pub fn start(storage: FakeStorage) -> Self {
        let node_id = NodeId::new("target").unwrap_or_else(|_| unreachable_id());
        let ctx = Arc::new(TargetContext::new(node_id, DATA_DIR.into(), Arc::new(storage.clone())));
        ctx.load_existing();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("a tokio runtime for the simulator: {e}"));
        Self { storage, ctx, rt }
    }

    pub fn layout(&self, id: &MigrationId) -> StagingLayout {
        StagingLayout::new(Path::new(DATA_DIR), id)
    }
}

fn unreachable_id() -> NodeId {
    panic!("\"target\" is a valid node id")
}

/// A base copy being received on one connection.
pub struct Receive {
    pub id: MigrationId,
    pub offer: Offer,
    pub layout: StagingLayout,
    pub log: Arc<ChunkLog>,
    pub parts: HashMap<u32, Arc<dyn StorageFile>>,
}

/// The target's side of one connection.
pub struct TargetEnd {
    pub conn: ConnId,
    pub peer: String,
    pub conversation: TargetConversation,
    pub admitted: Option<(Offer, StagingLayout)>,
    pub receive: Option<Receive>,
    pub claimed: Option<MigrationId>,
    pub events: Vec<ChunkEvent>,
    pub finished: bool,
    /// A fence the source asked for, to run when the world lets it (its WAL may still be on
    /// the way, as on a real connection).
    pub pending_fence: Option<FenceRequest>,
    /// The `fenced` MANIFEST commit the machine asked for after its `Fenced` answer went out,
    /// to run when the world lets it: a restart, a power loss or the release may come first.
    pub pending_commit: Option<Lsn>,
}

/// What executing actions asks of the world.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages for the source, in order.
    pub to_source: Vec<Message>,
    /// Connections to close (superseded or cut by an abort).
    pub close: Vec<ConnId>,
}

impl TargetEnd {
    pub fn new(conn: ConnId, peer: &str, node_id: NodeId) -> Self {
        Self {
            conn,
            peer: peer.to_owned(),
            conversation: TargetConversation::new(node_id, SYNC_BATCH_BYTES),
            admitted: None,
            receive: None,
            claimed: None,
            events: Vec::new(),
            finished: false,
            pending_fence: None,
            pending_commit: None,
        }
    }

    /// A chunk frame arrived: checked by the machine, verified, written and logged.
    pub fn on_chunk(
        &mut self,
        target: &Target,
        file_index: u32,
        offset_bytes: u64,
        body: &[u8],
        crc32c: u32,
    ) -> Result<(), TransferError> {
        let len_bytes = u32::try_from(body.len()).map_err(|_| TransferError::Local("chunk too long".into()))?;
        let verdict = self.conversation.check_chunk(file_index, offset_bytes, len_bytes)?;
        let receive = self.receive.as_mut().ok_or_else(|| TransferError::Local("no base copy received".into()))?;
        let chunk_index = match verdict {
            ChunkVerdict::Duplicate { chunk_index } | ChunkVerdict::Write { chunk_index } => chunk_index,
        };
        receive.log.append(LogRecord::Receiving { file_index, chunk_index, len_bytes })?;
        let found = crc32c::crc32c(body);
        if found != crc32c {
            return Err(TransferError::ChunkChecksum { file_index, offset_bytes, expected: crc32c, found });
        }
        let chunk = ChunkRef { file_index, chunk_index };
        let event = match verdict {
            ChunkVerdict::Duplicate { .. } => ChunkEvent::Duplicate(chunk),
            ChunkVerdict::Write { .. } => {
                let part = match receive.parts.get(&file_index) {
                    Some(part) => part.clone(),
                    None => {
                        let part = staging::open_part(&*target.ctx.storage, &receive.layout, file_index)?;
                        receive.parts.insert(file_index, part.clone());
                        part
                    }
                };
                let slices = [std::io::IoSlice::new(body)];
                steps::write_chunk(&*part, &receive.layout, &receive.log, chunk, offset_bytes, &slices, crc32c)?;
                ChunkEvent::Written { chunk, crc32c, len_bytes }
            }
        };
        self.events.push(event);
        Ok(())
    }

    /// Executes the machine's actions until it has none.
    pub fn drain(&mut self, target: &Target, cov: &mut Coverage, fx: &mut Effects) -> Result<(), TransferError> {
        while let Some(action) = self.conversation.poll_action() {
            cov.hit(format!("target action: {}", action_name(&action)));
            self.execute(action, target, cov, fx)?;
        }
        Ok(())
    }

    fn execute(
        &mut self,
        action: TargetAction,
        target: &Target,
        cov: &mut Coverage,
        fx: &mut Effects,
    ) -> Result<(), TransferError> {
        let ctx = &target.ctx;
        match action {
            TargetAction::Send(message) => fx.to_source.push(message),
            TargetAction::Admit(offer) => self.admit(*offer, target, fx)?,
            TargetAction::Sync => {
                let receive = self.receiving()?;
                let parts: Vec<_> = receive.parts.iter().map(|(i, p)| (*i, p.clone())).collect();
                steps::sync_parts(&receive.layout, &parts, &receive.log)?;
            }
            TargetAction::FinalizeFile { path, done } => {
                let receive = self.receive.as_mut().ok_or_else(|| TransferError::Local("not receiving".into()))?;
                receive.parts.remove(&done.file_index);
                steps::finalize_file(ctx, &receive.layout, &receive.log, &path, done)?;
                let id = receive.id.clone();
                self.conversation.handle_file_finalized(done.file_index)?;
                ctx.machine().files_staged(&id, self.conversation.files_staged_count())?;
            }
            TargetAction::StageBase { segment_crcs, bytes_resent } => {
                let receive = self.receive.take().ok_or_else(|| TransferError::Local("not receiving".into()))?;
                let parts: Vec<_> = receive.parts.iter().map(|(i, p)| (*i, p.clone())).collect();
                steps::sync_parts(&receive.layout, &parts, &receive.log)?;
                let manifest = steps::base_manifest(&receive.offer, segment_crcs, ctx.machine().get(&receive.id));
                steps::write_base_manifest(ctx, &receive.layout, &receive.offer, &manifest)?;
                ctx.machine().base_staged(&receive.id, bytes_resent)?;
                let bytes_resent = ctx.machine().get(&receive.id).map_or(0, |m| m.bytes_resent);
                self.conversation.handle_base_written(bytes_resent)?;
            }
            TargetAction::Commit { final_lsn } => {
                let (offer, layout) = self.admitted.as_ref().ok_or_else(|| TransferError::Local("no offer".into()))?;
                steps::commit_offline(ctx, layout, &offer.migration_id, final_lsn, None)?;
                ctx.machine().committed(&offer.migration_id, final_lsn)?;
                self.conversation.handle_committed()?;
            }
            TargetAction::Release { migration_id, final_lsn, fenced_durable_lsn } => {
                self.check_peer(ctx, &migration_id)?;
                // `release_staging` runs this on the blocking pool; here on this thread, where
                // the planted bugs are.
                let step = release_now(ctx, &migration_id, final_lsn, fenced_durable_lsn)?;
                if let Some(ReleaseStep::Derive { .. }) = step {
                    cov.hit("release: fence derived from the staged WAL");
                }
                self.conversation.handle_answered()?;
            }
            TargetAction::Abort { migration_id, reason } => {
                self.check_peer(ctx, &migration_id)?;
                // The engine cuts the connection holding the migration before it removes it.
                let holder = ctx.machine().claimant(&migration_id);
                if let Some(holder) = holder {
                    fx.close.push(holder);
                    ctx.machine().release_claim(&migration_id, holder);
                }
                let abort = ferry_engine::transfer::abort::abort_staging(ctx, &migration_id, &reason);
                target.rt.block_on(abort)?;
                self.conversation.handle_answered()?;
            }
            TargetAction::Finish => self.finished = true,
            TargetAction::Fence(request) => self.pending_fence = Some(request),
            TargetAction::CommitFenced { final_lsn } => self.pending_commit = Some(final_lsn),
            TargetAction::Join { .. } | TargetAction::CarryChunks => {
                return Err(TransferError::Local(format!("{} is not simulated", action_name(&action))));
            }
        }
        Ok(())
    }

    /// Runs the fence the source asked for with the engine's `fence_staging` (which waits, in
    /// real microseconds within the fence's budget, for a staged WAL that is not durable yet)
    /// and hands its answer to the machine.
    pub fn answer_fence(&mut self, target: &Target) -> Result<(), TransferError> {
        let Some(request) = self.pending_fence.take() else { return Ok(()) };
        let (offer, _) = self.admitted.as_ref().ok_or_else(|| TransferError::Local("no offer".into()))?;
        let waits = FenceWaits {
            through_lsn: request.through_lsn,
            wal_wait_max_us: request.wal_wait_max_us,
            apply_wait_max_us: request.apply_wait_max_us,
        };
        let fence = fence_staging(&target.ctx, offer, request.final_lsn, waits);
        let answer = target.rt.block_on(fence)?;
        self.conversation.handle_fence_answer(answer)?;
        Ok(())
    }

    /// Runs the `fenced` MANIFEST commit the machine asked for after its answer (the engine's
    /// `commit_fenced`, which the daemon runs right after writing the answer); whether it
    /// wrote.
    pub fn commit_fence(&mut self, target: &Target) -> Result<bool, TransferError> {
        let Some(final_lsn) = self.pending_commit.take() else { return Ok(false) };
        let (offer, layout) = self.admitted.as_ref().ok_or_else(|| TransferError::Local("no offer".into()))?;
        commit_fenced(&target.ctx, layout, &offer.migration_id, final_lsn)
    }

    fn admit(&mut self, offer: Offer, target: &Target, fx: &mut Effects) -> Result<(), TransferError> {
        let ctx = &target.ctx;
        let layout = target.layout(&offer.migration_id);
        let disk = Disk { staging_exists: ctx.storage.exists(&layout.root), free_bytes: None };
        let claimed = ctx.machine().claim(&summary(&offer), self.conn, Some(&self.peer), disk)?;
        if let Claimed::Superseding { old } = claimed {
            // The engine closes the old connection and waits for its claim's release.
            fx.close.push(old);
            ctx.machine().release_claim(&offer.migration_id, old);
            if let Claimed::Superseding { .. } =
                ctx.machine().claim(&summary(&offer), self.conn, Some(&self.peer), disk)?
            {
                return Err(TransferError::Local("a superseded claim was not released".into()));
            }
        }
        self.claimed = Some(offer.migration_id.clone());
        let start = steps::admit_staging(ctx, &layout, &offer, self.conn, Some(&self.peer), now_unix_ms())?;
        match start {
            Start::AlreadyStaged { .. } => {
                let bytes_resent = ctx.machine().get(&offer.migration_id).map_or(0, |m| m.bytes_resent);
                self.conversation.handle_admitted(Admitted::AlreadyStaged { bytes_resent })?;
            }
            Start::Receive { session, log, .. } => {
                self.conversation.handle_admitted(Admitted::Receive { session })?;
                self.receive = Some(Receive {
                    id: offer.migration_id.clone(),
                    offer: offer.clone(),
                    layout: layout.clone(),
                    log,
                    parts: HashMap::new(),
                });
            }
        }
        self.admitted = Some((offer, layout));
        Ok(())
    }

    fn receiving(&self) -> Result<&Receive, TransferError> {
        self.receive.as_ref().ok_or_else(|| TransferError::Local("no base copy is being received".into()))
    }

    fn check_peer(&self, ctx: &TargetContext, id: &MigrationId) -> Result<(), TransferError> {
        if ctx.machine().may_act(id, Some(&self.peer)) {
            return Ok(());
        }
        Err(TransferError::Refused(format!("migration {id} is received from another node")))
    }

    /// The connection ended, however: a base copy under way is interrupted, the claim freed
    /// (as the daemon's `ClaimGuard` does).
    pub fn end(&mut self, target: &Target) {
        if let Some(receive) = &self.receive {
            let _ = target.ctx.machine().interrupted(&receive.id);
        }
        if let Some(id) = self.claimed.take() {
            target.ctx.machine().release_claim(&id, self.conn);
        }
    }
}

pub fn action_name(action: &TargetAction) -> &'static str {
    match action {
        TargetAction::Send(_) => "send",
        TargetAction::Admit(_) => "admit",
        TargetAction::Join { .. } => "join",
        TargetAction::Release { .. } => "release",
        TargetAction::Abort { .. } => "abort",
        TargetAction::Sync => "sync",
        TargetAction::FinalizeFile { .. } => "finalize_file",
        TargetAction::StageBase { .. } => "stage_base",
        TargetAction::Commit { .. } => "commit",
        TargetAction::Fence(_) => "fence",
        TargetAction::CommitFenced { .. } => "commit_fenced",
        TargetAction::CarryChunks => "carry_chunks",
        TargetAction::Finish => "finish",
    }
}
