//! The target's inbound migrations: their lifecycle, admission slots and connection claims.
//!
//! What it does: [`Inbounds`] is the one owner of every inbound migration's state on a target
//! node. An offer is admitted and *claimed* by one control connection ([`Inbounds::claim`]);
//! only once the staging is ready does the migration become visible as receiving
//! ([`Inbounds::begin`]). From there each event the engine reports is a transition with its
//! own method (`base_staged`, `interrupted`, `fenced`, `unfenced`, `release`, `abort`,
//! `forget`...), and a transition the current state does not allow is refused with an
//! [`InboundError`] that names the state and the event.
//!
//! ```text
//!             claim + begin                base staged            fence
//!   (none) ---------------> Receiving ------------------> BaseStaged <-----> Fenced{final_lsn}
//!                             |    ^                          |   unfenced       |
//!               interrupted   v    | begin (resume)    commit |          release |
//!                          Interrupted    release with the    v                  v
//!                                         fence's durable --> Released{final_lsn} <------+
//!                                         LSN (derived)
//!   abort (any state but Released) -> Aborted{reason};   forget (Released | Aborted) -> (none)
//! ```
//!
//! What it does not: write the staging. The engine writes `MANIFEST.json` and the staged files,
//! then reports the result here. Where a transition must be checked before the disk is
//! touched and recorded after, it comes in two steps (`check_*`, then the transition), both
//! under the engine's one lock on this machine.
//!
//! Invariants:
//! - A claim never creates a visible migration: an offer refused after its claim (a staging that
//!   holds another migration, for example) leaves the migration's state exactly as it was, and
//!   its admission slot is free again as soon as the claim is released.
//! - An admission slot is held by every migration that is receiving, interrupted, base staged
//!   or fenced, and by every claim; nothing else.
//! - Only the node that claimed a migration may claim it again while the claim is held.

use std::collections::BTreeMap;

use super::Blame;
use crate::ids::{Lsn, MigrationId, VShardId};
use crate::manifest::StagingState;

/// The engine's identity for one peer connection (quinn's `stable_id`, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Where an inbound migration is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundState {
    /// Base chunks arrive on a claimed connection.
    Receiving,
    /// The base copy stopped (lost connection, restart) before every file was staged; the
    /// source resumes it.
    Interrupted,
    /// Every base file is staged and verified; the WAL catch-up (if any) goes on.
    BaseStaged,
    /// The staging is `fenced` at `final_lsn`: every selected record up to it is durable.
    Fenced { final_lsn: Lsn },
    /// The staging is the database's: the point of no return was passed.
    Released { final_lsn: Option<Lsn> },
    /// The staging was removed; a tombstone refuses the id until it is forgotten.
    Aborted { reason: Option<String> },
}

impl InboundState {
    /// The state's name, as logs and errors show it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Interrupted => "interrupted",
            Self::BaseStaged => "base_staged",
            Self::Fenced { .. } => "fenced",
            Self::Released { .. } => "released",
            Self::Aborted { .. } => "aborted",
        }
    }

    /// Whether the migration holds an admission slot.
    pub fn holds_slot(&self) -> bool {
        matches!(self, Self::Receiving | Self::Interrupted | Self::BaseStaged | Self::Fenced { .. })
    }

    /// Whether the migration is over on this node (only `forget` is left).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Released { .. } | Self::Aborted { .. })
    }

    /// The state a staging found on disk stands for (`base_complete` from its manifest).
    pub fn of_staging(state: StagingState, base_complete: bool, final_lsn: Option<Lsn>) -> Self {
        match state {
            StagingState::Copying if base_complete => Self::BaseStaged,
            StagingState::Copying => Self::Interrupted,
            StagingState::Fenced => match final_lsn {
                Some(final_lsn) => Self::Fenced { final_lsn },
                // A fenced manifest without its LSN cannot be released; treat it as staged.
                None => Self::BaseStaged,
            },
            StagingState::Released => Self::Released { final_lsn },
            StagingState::Aborted => Self::Aborted { reason: None },
        }
    }
}

/// One inbound migration: its state and its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub state: InboundState,
    pub source_node: Option<String>,
    pub vshard_id: Option<VShardId>,
    /// When this node began receiving it (Unix milliseconds, from the engine's clock): the
    /// first `begin`, kept when the source resumes; 0 while unknown (a migration found on
    /// disk whose manifest does not record it).
    pub started_at_unix_ms: u64,
    /// Whether a WAL stream follows the base (the offer's `wal`): `false` for an offline copy
    /// without one, and while unknown.
    pub wal_follows: bool,
    pub bytes_verified: u64,
    pub bytes_total: u64,
    pub bytes_resent: u64,
    pub files_staged_count: u64,
    pub files_total_count: u64,
    /// The staged WAL's durable LSN, once its WAL stream has started.
    pub wal_durable_lsn: Option<Lsn>,
    /// What the target's database reported applied; once set, a fence waits for it.
    pub applied_lsn: Option<Lsn>,
}

impl Inbound {
    fn new(state: InboundState) -> Self {
        Self {
            state,
            source_node: None,
            vshard_id: None,
            started_at_unix_ms: 0,
            wal_follows: false,
            bytes_verified: 0,
            bytes_total: 0,
            bytes_resent: 0,
            files_staged_count: 0,
            files_total_count: 0,
            wal_durable_lsn: None,
            applied_lsn: None,
        }
    }

    /// The LSN the staging is fenced or released at.
    pub fn final_lsn(&self) -> Option<Lsn> {
        match self.state {
            InboundState::Fenced { final_lsn } => Some(final_lsn),
            InboundState::Released { final_lsn } => final_lsn,
            _ => None,
        }
    }

    /// Why the migration was aborted, when it was.
    pub fn reason(&self) -> Option<&str> {
        match &self.state {
            InboundState::Aborted { reason } => reason.as_deref(),
            _ => None,
        }
    }
}

/// What the target admits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Inbound migrations held at once (a resumed one does not count twice); 0: unlimited.
    pub max_inbound_count: usize,
    /// Refuse a new migration whose base does not fit in the data folder's free space.
    pub check_free_space: bool,
}

/// What the machine needs of an offer to admit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSummary {
    pub migration_id: MigrationId,
    pub vshard_id: VShardId,
    pub bytes_total: u64,
    pub files_count: u64,
    /// Whether a WAL stream follows the base.
    pub wal: bool,
}

/// What the engine measured for an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    /// Whether the migration's staging folder exists (a resumed or repeated migration, which
    /// was admitted before and is not checked against the limits again).
    pub staging_exists: bool,
    /// The data folder's free bytes, measured when [`Inbounds::needs_free_space`] says so.
    pub free_bytes: Option<u64>,
}

/// The outcome of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Claimed {
    /// The connection holds the migration now.
    Taken,
    /// An older connection from the same node holds it (its source reconnected): close that
    /// connection, wait for its claim to be released, and claim again.
    Superseding { old: ConnId },
}

/// How a staging was started, as [`Inbounds::begin`] learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// A fresh staging, or one resumed from its chunk log: chunks are to be received.
    Receive,
    /// The base was staged before; the staging's manifest is in `state`.
    AlreadyStaged { state: StagingState, final_lsn: Option<Lsn> },
}

/// What `check_release` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum ReleaseStep {
    /// Released at this LSN already: answer as if done (releases are idempotent).
    Already,
    /// Fenced at this LSN: write the release, then call [`Inbounds::released`].
    Write,
    /// Base staged, not fenced, but the source names the durable LSN the target answered its
    /// fence with: the `fenced` MANIFEST commit, which follows the answer, was lost (a crash
    /// or a failed commit between the answer and the release). The engine releases only when
    /// its staged WAL is durable from `durable_lsn` to at most `final_lsn` (every record the
    /// fence made durable is there, nothing above the fence is), then calls
    /// [`Inbounds::released`] with the same LSN.
    Derive { durable_lsn: Lsn },
}

/// What `check_abort` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum AbortStep {
    /// Aborted before: nothing to do.
    Already,
    /// Cut its connection (if any), remove its staging, write the tombstone, then call
    /// [`Inbounds::aborted`].
    Remove,
}

/// A transition the machine refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error(
        "target is at capacity: {active_count} inbound migrations, limit max_inbound_migrations = {limit}; retry later"
    )]
    AtCapacity { active_count: usize, limit: usize },
    #[error("target lacks disk space: the base needs {needed_bytes} bytes, the data folder has {free_bytes} free")]
    LacksSpace { needed_bytes: u64, free_bytes: u64 },
    #[error("migration {id} is received from another node")]
    HeldByOtherNode { id: MigrationId },
    #[error("migration {id} was aborted on this target: forget it or use a new id")]
    WasAborted { id: MigrationId },
    #[error("no inbound migration {id} on this node")]
    NotFound { id: MigrationId },
    #[error("migration {id} is not claimed by this connection")]
    NotClaimed { id: MigrationId },
    #[error("inbound migration {id} is {state}: abort it first, or wait until it is released")]
    NotFinal { id: MigrationId, state: &'static str },
    #[error("inbound migration {id} still has a connection; retry")]
    StillReceiving { id: MigrationId },
    #[error("migration {id} is released: the target is authoritative and its staging is the database's; it cannot be aborted")]
    ReleasedCannotAbort { id: MigrationId },
    #[error(
        "migration {id} is {state} at final_lsn {at} on this target, not fenced at {final_lsn}: it cannot be released"
    )]
    NotFencedAt { id: MigrationId, state: &'static str, at: String, final_lsn: Lsn },
    #[error("migration {id} is {from}: it cannot be {event}")]
    Illegal { id: MigrationId, from: &'static str, event: &'static str },
}

impl InboundError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            Self::AtCapacity { .. } | Self::LacksSpace { .. } | Self::HeldByOtherNode { .. } => Blame::Peer,
            Self::WasAborted { .. } | Self::NotFencedAt { .. } => Blame::Peer,
            Self::NotFound { .. } | Self::NotFinal { .. } | Self::StillReceiving { .. } => Blame::Caller,
            Self::ReleasedCannotAbort { .. } => Blame::Caller,
            Self::NotClaimed { .. } | Self::Illegal { .. } => Blame::Local,
        }
    }

    /// Whether the same request may succeed later without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::AtCapacity { .. } | Self::LacksSpace { .. } | Self::StillReceiving { .. } | Self::NotFinal { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    conn: ConnId,
    peer: Option<String>,
}

/// Every inbound migration of one target node.
#[derive(Debug, Clone, Default)]
pub struct Inbounds {
    limits: Limits,
    migrations: BTreeMap<MigrationId, Inbound>,
    claims: BTreeMap<MigrationId, Claim>,
}

impl Inbounds {
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Self::default() }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether an admission needs the data folder's free space measured.
    pub fn needs_free_space(&self) -> bool {
        self.limits.check_free_space
    }

    /// A staging found on disk (at start-up, or before an abort decides about an id this node
    /// had not seen), with the source node its manifest records. An id already known keeps
    /// its state.
    pub fn adopt(&mut self, id: &MigrationId, state: InboundState, source_node: Option<String>) {
        self.migrations.entry(id.clone()).or_insert_with(|| Inbound { source_node, ..Inbound::new(state) });
    }

    pub fn get(&self, id: &MigrationId) -> Option<&Inbound> {
        self.migrations.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&MigrationId, &Inbound)> {
        self.migrations.iter()
    }

    /// Whether a connection holds `id` now.
    pub fn is_claimed(&self, id: &MigrationId) -> bool {
        self.claims.contains_key(id)
    }

    /// The connection that holds `id`, if one does.
    pub fn claimant(&self, id: &MigrationId) -> Option<ConnId> {
        self.claims.get(id).map(|c| c.conn)
    }

    /// Whether `peer` may act on `id` (offer, release, abort, join): no other node holds it,
    /// and it is the node that sent the base, where that is known.
    pub fn may_act(&self, id: &MigrationId, peer: Option<&str>) -> bool {
        let recorded = self.migrations.get(id).and_then(|m| m.source_node.as_deref());
        self.claims.get(id).is_none_or(|c| c.peer.as_deref() == peer) && recorded.is_none_or(|s| Some(s) == peer)
    }

    /// Slots held, leaving out `id`.
    fn active_count_without(&self, id: &MigrationId) -> usize {
        let held = self.migrations.iter().filter(|(other, m)| *other != id && m.state.holds_slot());
        let claimed_only = self
            .claims
            .keys()
            .filter(|other| *other != id && !self.migrations.get(*other).is_some_and(|m| m.state.holds_slot()));
        held.count() + claimed_only.count()
    }

    /// Admits `offer` and claims it for `conn`. The migration's visible state does not change
    /// until [`Self::begin`].
    pub fn claim(
        &mut self,
        offer: &OfferSummary,
        conn: ConnId,
        peer: Option<&str>,
        disk: Disk,
    ) -> Result<Claimed, InboundError> {
        let id = &offer.migration_id;
        if self.migrations.get(id).is_some_and(|m| matches!(m.state, InboundState::Aborted { .. })) {
            return Err(InboundError::WasAborted { id: id.clone() });
        }
        if !self.may_act(id, peer) && !self.claims.contains_key(id) {
            // Another node's migration under the same id.
            return Err(InboundError::HeldByOtherNode { id: id.clone() });
        }
        match self.claims.get(id) {
            Some(c) if c.conn == conn => return Ok(Claimed::Taken),
            Some(c) if c.peer.as_deref() == peer => return Ok(Claimed::Superseding { old: c.conn }),
            Some(_) => return Err(InboundError::HeldByOtherNode { id: id.clone() }),
            None => {}
        }
        if !disk.staging_exists {
            let limit = self.limits.max_inbound_count;
            let active_count = self.active_count_without(id);
            if limit > 0 && active_count >= limit {
                return Err(InboundError::AtCapacity { active_count, limit });
            }
            if let Some(free_bytes) = disk.free_bytes.filter(|_| self.limits.check_free_space) {
                if free_bytes < offer.bytes_total {
                    return Err(InboundError::LacksSpace { needed_bytes: offer.bytes_total, free_bytes });
                }
            }
        }
        self.claims.insert(id.clone(), Claim { conn, peer: peer.map(str::to_owned) });
        Ok(Claimed::Taken)
    }

    /// Ends `conn`'s claim on `id` (its conversation ended, however). Returns whether it held
    /// it; a claim taken over by a newer connection is left alone.
    pub fn release_claim(&mut self, id: &MigrationId, conn: ConnId) -> bool {
        if self.claims.get(id).is_some_and(|c| c.conn == conn) {
            self.claims.remove(id);
            return true;
        }
        false
    }

    fn claimed_by(&self, id: &MigrationId, conn: ConnId) -> Result<&Claim, InboundError> {
        self.claims.get(id).filter(|c| c.conn == conn).ok_or_else(|| InboundError::NotClaimed { id: id.clone() })
    }

    fn entry(&mut self, id: &MigrationId) -> Result<&mut Inbound, InboundError> {
        self.migrations.get_mut(id).ok_or_else(|| InboundError::NotFound { id: id.clone() })
    }

    /// The staging of a claimed offer is ready: the migration is visible from now on.
    pub fn begin(
        &mut self,
        offer: &OfferSummary,
        conn: ConnId,
        begin: Begin,
        now_unix_ms: u64,
    ) -> Result<&Inbound, InboundError> {
        let id = &offer.migration_id;
        let peer = self.claimed_by(id, conn)?.peer.clone();
        let before = self.migrations.get(id).map(|m| &m.state);
        let next = match begin {
            Begin::Receive => match before {
                None | Some(InboundState::Receiving | InboundState::Interrupted) => InboundState::Receiving,
                // Planted bug `PhantomMigration`: any migration is shown receiving again.
                Some(_) if crate::plant::planted(crate::plant::Bug::PhantomMigration) => InboundState::Receiving,
                Some(other) => {
                    return Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "received" })
                }
            },
            Begin::AlreadyStaged { state, final_lsn } => match (before, state) {
                (Some(InboundState::Aborted { .. }), _) | (_, StagingState::Aborted) => {
                    return Err(InboundError::WasAborted { id: id.clone() })
                }
                _ => InboundState::of_staging(state, true, final_lsn),
            },
        };
        let entry = self.migrations.entry(id.clone()).or_insert_with(|| Inbound::new(InboundState::Receiving));
        let kept = (entry.wal_durable_lsn, entry.applied_lsn);
        let started_at_unix_ms = if entry.started_at_unix_ms == 0 { now_unix_ms } else { entry.started_at_unix_ms };
        *entry = Inbound {
            source_node: peer,
            vshard_id: Some(offer.vshard_id),
            started_at_unix_ms,
            wal_follows: offer.wal,
            bytes_total: offer.bytes_total,
            files_total_count: offer.files_count,
            wal_durable_lsn: kept.0,
            applied_lsn: kept.1,
            ..Inbound::new(next)
        };
        if !matches!(entry.state, InboundState::Receiving) {
            entry.bytes_verified = entry.bytes_total;
            entry.files_staged_count = entry.files_total_count;
        }
        Ok(entry)
    }

    /// Chunk progress of a receiving migration.
    pub fn progress(&mut self, id: &MigrationId, bytes_verified: u64, bytes_resent: u64) -> Result<(), InboundError> {
        let entry = self.entry(id)?;
        entry.bytes_verified = bytes_verified;
        entry.bytes_resent = bytes_resent;
        Ok(())
    }

    /// Files staged so far.
    pub fn files_staged(&mut self, id: &MigrationId, files_staged_count: u64) -> Result<(), InboundError> {
        self.entry(id)?.files_staged_count = files_staged_count;
        Ok(())
    }

    /// The staged WAL's durable LSN moved.
    pub fn wal_durable(&mut self, id: &MigrationId, lsn: Lsn) -> Result<(), InboundError> {
        self.entry(id)?.wal_durable_lsn = Some(lsn);
        Ok(())
    }

    /// The target's database reported its ingest (`migration.applied`); it only grows.
    /// Returns the applied LSN in force.
    pub fn applied(&mut self, id: &MigrationId, lsn: Lsn) -> Result<Lsn, InboundError> {
        let entry = self.entry(id)?;
        let now = entry.applied_lsn.map_or(lsn, |before| before.max(lsn));
        entry.applied_lsn = Some(now);
        Ok(now)
    }

    /// Every base file is staged.
    pub fn base_staged(&mut self, id: &MigrationId, bytes_resent: u64) -> Result<(), InboundError> {
        let entry = self.entry(id)?;
        match entry.state {
            InboundState::Receiving | InboundState::BaseStaged => {}
            ref other => {
                return Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "base staged" })
            }
        }
        entry.state = InboundState::BaseStaged;
        entry.bytes_verified = entry.bytes_total;
        entry.files_staged_count = entry.files_total_count;
        entry.bytes_resent = bytes_resent;
        Ok(())
    }

    /// The base copy of a receiving migration stopped before it was staged.
    pub fn interrupted(&mut self, id: &MigrationId) -> Result<(), InboundError> {
        let entry = self.entry(id)?;
        match entry.state {
            InboundState::Receiving | InboundState::Interrupted => {
                entry.state = InboundState::Interrupted;
                Ok(())
            }
            ref other => Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "interrupted" }),
        }
    }

    /// Whether a fence may be committed now (the staging is base staged or fenced).
    pub fn check_fence(&self, id: &MigrationId) -> Result<(), InboundError> {
        let entry = self.migrations.get(id).ok_or_else(|| InboundError::NotFound { id: id.clone() })?;
        match entry.state {
            InboundState::BaseStaged | InboundState::Fenced { .. } => Ok(()),
            ref other => Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "fenced" }),
        }
    }

    /// The staging's `fenced` commit is written.
    pub fn fenced(&mut self, id: &MigrationId, final_lsn: Lsn) -> Result<(), InboundError> {
        self.check_fence(id)?;
        self.entry(id)?.state = InboundState::Fenced { final_lsn };
        Ok(())
    }

    /// The LSN `id` is fenced at, while it is fenced.
    pub fn fenced_at(&self, id: &MigrationId) -> Option<Lsn> {
        match self.migrations.get(id)?.state {
            InboundState::Fenced { final_lsn } => Some(final_lsn),
            _ => None,
        }
    }

    /// Records above the fence arrived (the fence was cancelled on the source): the staging
    /// is copying again.
    pub fn unfenced(&mut self, id: &MigrationId) -> Result<(), InboundError> {
        let entry = self.entry(id)?;
        match entry.state {
            InboundState::Fenced { .. } => {
                entry.state = InboundState::BaseStaged;
                Ok(())
            }
            ref other => Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "unfenced" }),
        }
    }

    /// Whether `id` may be released at `final_lsn`: from `fenced` at that LSN, or, when the
    /// release names the durable LSN of the fence's answer (`fenced_durable_lsn`, at most
    /// `final_lsn`), from base staged ([`ReleaseStep::Derive`]).
    pub fn check_release(
        &self,
        id: &MigrationId,
        final_lsn: Lsn,
        fenced_durable_lsn: Option<Lsn>,
    ) -> Result<ReleaseStep, InboundError> {
        let entry = self.migrations.get(id).ok_or_else(|| InboundError::NotFound { id: id.clone() })?;
        let derivable = fenced_durable_lsn.filter(|d| *d <= final_lsn);
        match entry.state {
            InboundState::Released { final_lsn: Some(at) } if at == final_lsn => Ok(ReleaseStep::Already),
            InboundState::Fenced { final_lsn: at } if at == final_lsn => Ok(ReleaseStep::Write),
            InboundState::BaseStaged if derivable.is_some() => {
                Ok(ReleaseStep::Derive { durable_lsn: derivable.unwrap_or(final_lsn) })
            }
            // Planted bug `ReleaseFromCopying`: a staging that was never fenced is released.
            InboundState::BaseStaged | InboundState::Receiving | InboundState::Interrupted
                if crate::plant::planted(crate::plant::Bug::ReleaseFromCopying) =>
            {
                Ok(ReleaseStep::Write)
            }
            ref other => Err(InboundError::NotFencedAt {
                id: id.clone(),
                state: other.name(),
                at: entry.final_lsn().map_or_else(|| "none".to_owned(), |l| l.to_string()),
                final_lsn,
            }),
        }
    }

    /// The release at `final_lsn` is written (`fenced_durable_lsn`: as given to
    /// [`Self::check_release`]).
    pub fn released(
        &mut self,
        id: &MigrationId,
        final_lsn: Lsn,
        fenced_durable_lsn: Option<Lsn>,
    ) -> Result<(), InboundError> {
        match self.check_release(id, final_lsn, fenced_durable_lsn)? {
            ReleaseStep::Already | ReleaseStep::Write | ReleaseStep::Derive { .. } => {}
        }
        self.entry(id)?.state = InboundState::Released { final_lsn: Some(final_lsn) };
        Ok(())
    }

    /// An offline end (`Commit`): a base-staged migration is released without a fence.
    pub fn committed(&mut self, id: &MigrationId, final_lsn: Lsn) -> Result<(), InboundError> {
        let entry = self.entry(id)?;
        match entry.state {
            InboundState::BaseStaged | InboundState::Released { .. } => {
                entry.state = InboundState::Released { final_lsn: Some(final_lsn) };
                Ok(())
            }
            ref other => Err(InboundError::Illegal { id: id.clone(), from: other.name(), event: "committed" }),
        }
    }

    /// Whether `id` may be aborted: any state but released. An unknown id may be (it leaves a
    /// tombstone).
    pub fn check_abort(&self, id: &MigrationId) -> Result<AbortStep, InboundError> {
        match self.migrations.get(id).map(|m| &m.state) {
            Some(InboundState::Released { .. }) => Err(InboundError::ReleasedCannotAbort { id: id.clone() }),
            Some(InboundState::Aborted { .. }) => Ok(AbortStep::Already),
            _ => Ok(AbortStep::Remove),
        }
    }

    /// The abort's tombstone is written.
    pub fn aborted(&mut self, id: &MigrationId, reason: &str) -> Result<(), InboundError> {
        if let AbortStep::Already = self.check_abort(id)? {
            return Ok(());
        }
        let entry = self.migrations.entry(id.clone()).or_insert_with(|| Inbound::new(InboundState::Interrupted));
        entry.state = InboundState::Aborted { reason: Some(reason.to_owned()) };
        Ok(())
    }

    /// Whether `id` may be forgotten: final, and no connection holds it.
    pub fn check_forget(&self, id: &MigrationId) -> Result<(), InboundError> {
        let entry = self.migrations.get(id).ok_or_else(|| InboundError::NotFound { id: id.clone() })?;
        if !entry.state.is_final() {
            return Err(InboundError::NotFinal { id: id.clone(), state: entry.state.name() });
        }
        if self.claims.contains_key(id) {
            return Err(InboundError::StillReceiving { id: id.clone() });
        }
        Ok(())
    }

    /// The staging is removed: the id is unknown again.
    pub fn forgotten(&mut self, id: &MigrationId) -> Result<(), InboundError> {
        self.check_forget(id)?;
        self.migrations.remove(id);
        Ok(())
    }
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
