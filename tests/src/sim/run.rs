//! One seeded run: the world (source, network, target, coordinator), its step loop and its
//! invariants.
//!
//! What it does not: use a clock or a socket. Time is the step count; the network is queues.

use std::collections::{BTreeMap, VecDeque};

use ferry_wire::message::{Message, Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::proto::inbound::ConnId;
use ferry_wire::proto::outbound::Lifecycle;
use ferry_wire::proto::source::{CopyPlan, SourceAction, SourceConversation, SourceState};
use ferry_wire::{Lsn, MigrationId, NodeId};

use super::live::FenceRun;
use super::target::{Effects, Target, TargetEnd};
use super::wal::WalStream;
use super::writer::{Writer, VSHARD};
use super::{Bug, Coverage, Rng};

/// Steps a run may take before it is called stuck.
const STEPS_MAX: u64 = 20_000;
/// Chunks the source keeps in flight on one connection.
pub(super) const WINDOW_CHUNKS: usize = 6;
pub(super) const CHUNK_LEN_BYTES: u32 = 4096;
pub(super) const SOURCE_NODE: &str = "source";

/// How a seed ended.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    /// The first invariant broken, if any.
    pub violation: Option<String>,
    pub trace: Vec<String>,
    pub coverage: Coverage,
    pub steps: u64,
}

/// One chunk frame on a chunk stream.
#[derive(Debug, Clone)]
struct Frame {
    file_index: u32,
    offset_bytes: u64,
    body: Vec<u8>,
    crc32c: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Copy,
    Request,
    /// The coordinator's release of a live copy, recorded by the source.
    LiveRelease,
}

pub(super) struct Conn {
    pub(super) id: ConnId,
    pub(super) purpose: Purpose,
    pub(super) source: SourceConversation,
    pub(super) target: TargetEnd,
    to_target: VecDeque<Message>,
    to_source: VecDeque<Message>,
    chunks: Vec<Frame>,
    sending: bool,
    /// A live copy's WAL stream, once the source opened it.
    pub(super) wal: Option<WalStream>,
}

/// A copy the source runs (one offer, re-sent on every connection until it completes).
pub(super) struct Copy {
    pub(super) offer: Offer,
    pub(super) files: Vec<Vec<u8>>,
    pub(super) completed: bool,
    /// A live copy: a WAL stream, and a fence instead of a commit.
    pub(super) live: bool,
    /// The source daemon's record of the migration (its phase, fence and release).
    pub(super) lifecycle: Lifecycle,
    /// Release calls that failed (the coordinator gives up after a few).
    pub(super) release_failures: u32,
}

/// What the source released: its files, and the `final_lsn` of a live copy's fence.
#[derive(Debug, Clone)]
pub(super) struct SourceRelease {
    pub(super) files: Vec<Vec<u8>>,
    pub(super) final_lsn: Option<Lsn>,
}

pub(super) struct World {
    pub(super) rng: Rng,
    pub(super) step: u64,
    trace: Vec<String>,
    pub(super) cov: Coverage,
    pub(super) target: Target,
    pub(super) conns: Vec<Conn>,
    next_conn: u64,
    pub(super) copy: Copy,
    generation: u32,
    /// Migrations the source itself released (an offline copy's commit, a live copy's
    /// release), with its files.
    pub(super) released_by_source: BTreeMap<MigrationId, SourceRelease>,
    /// Phases recorded durably on the target (a manifest write returned): a restart keeps them.
    pub(super) recorded: BTreeMap<MigrationId, &'static str>,
    pub(super) failures_count: u64,
    states: BTreeMap<MigrationId, &'static str>,
    /// The database's writer on the source.
    pub(super) writer: Writer,
    /// The fence the source runs, if any.
    pub(super) fence: Option<FenceRun>,
    /// The highest `WalDurable` the target sent, by migration: a restart must keep it.
    pub(super) acked: BTreeMap<MigrationId, Lsn>,
    /// The target daemon restarts after this step (its process, not a power loss).
    pub(super) target_restart: bool,
    /// An invariant broken by an event (not a state): reported by the next check.
    pub(super) broken: Option<String>,
}

/// Runs `seed` with `bug` planted (or none).
pub fn run_seed(seed: u64, bug: Option<Bug>) -> Outcome {
    ferry_wire::plant::plant(bug);
    let mut world = World::new(seed);
    let violation = world.run();
    ferry_wire::plant::plant(None);
    Outcome { seed, violation, trace: world.trace, coverage: world.cov, steps: world.step }
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let storage = ferry_engine::storage::FakeStorage::new();
        // The data folder exists before the daemon starts, durably (an operator made it).
        {
            use ferry_engine::storage::Storage as _;
            let made = storage.create_dir_all(std::path::Path::new(super::target::DATA_DIR));
            let synced = storage.sync_dir(std::path::Path::new("/"));
            assert!(made.is_ok() && synced.is_ok(), "the fake storage makes the data folder");
        }
        // A power loss at a sync the seed draws (often past the run's end: none then).
        storage.crash_at_sync(1 + rng.below(120));
        let writer = Writer::new(&mut rng);
        let id = MigrationId::new("m-0").unwrap_or_else(|_| bad_id());
        let copy = new_copy(&mut rng, 0, &id, writer.last_lsn());
        Self {
            rng,
            step: 0,
            trace: Vec::new(),
            cov: Coverage::default(),
            target: Target::start(storage),
            conns: Vec::new(),
            next_conn: 1,
            copy,
            generation: 0,
            released_by_source: BTreeMap::new(),
            recorded: BTreeMap::new(),
            failures_count: 0,
            states: BTreeMap::new(),
            writer,
            fence: None,
            acked: BTreeMap::new(),
            target_restart: false,
            broken: None,
        }
    }

    pub(super) fn log(&mut self, line: String) {
        self.trace.push(format!("{:>6} {line}", self.step));
    }

    fn run(&mut self) -> Option<String> {
        while self.step < STEPS_MAX {
            self.step += 1;
            if self.copy.completed && self.generation >= 2 && self.conns.is_empty() && !self.release_pending() {
                return None;
            }
            self.one_step();
            self.fence_progress();
            let power_loss = self.target.storage.has_crashed();
            if power_loss || std::mem::take(&mut self.target_restart) {
                if let Some(v) = self.restart_target(power_loss) {
                    return Some(v);
                }
            }
            self.track_states();
            if let Some(v) = self.check() {
                self.log(format!("VIOLATION: {v}"));
                return Some(v);
            }
        }
        Some(format!("stuck: no end after {STEPS_MAX} steps"))
    }

    fn one_step(&mut self) {
        let r = self.rng.below(1000);
        match r {
            0..=9 if !self.conns.is_empty() => {
                let i = self.rng.index(self.conns.len());
                self.cov.hit("fault: connection lost");
                self.log(format!("conn {} lost", self.conns[i].id.0));
                self.drop_conn(i);
            }
            10..=11 => {
                self.cov.hit("fault: source daemon restart");
                self.log("source daemon restarts".into());
                while !self.conns.is_empty() {
                    self.drop_conn(0);
                }
            }
            201..=202 => {
                // A process restart, not a power loss: what was written stays, synced or not.
                self.cov.hit("fault: target daemon restart");
                self.target_restart = true;
            }
            12..=24 if self.copy.live => self.coordinator_live(),
            12..=24 => self.coordinator(),
            25..=50 if !self.has_copy_conn() && !self.copy.completed => self.connect(Purpose::Copy, None),
            51..=60 if self.release_pending() => self.release_live(),
            61..=200 => {
                let step = self.step;
                if let Some(lsn) = self.writer.write(&mut self.rng, step) {
                    self.cov.hit("writer: record acknowledged");
                    self.log(format!("writer acknowledges {lsn}"));
                }
            }
            _ => {
                if self.conns.is_empty() {
                    if !self.copy.completed {
                        self.connect(Purpose::Copy, None);
                    } else if self.release_pending() {
                        self.release_live();
                    } else {
                        self.next_generation();
                    }
                    return;
                }
                let i = self.rng.index(self.conns.len());
                self.step_conn(i);
            }
        }
    }

    fn has_copy_conn(&self) -> bool {
        self.conns.iter().any(|c| c.purpose == Purpose::Copy)
    }

    /// The peer re-uses migration ids: a new copy under an id it used before, with the same
    /// files or other ones.
    fn next_generation(&mut self) {
        self.generation += 1;
        let reuse = self.rng.chance(600);
        let id = match reuse {
            true => self.copy.offer.migration_id.clone(),
            false => MigrationId::new(format!("m-{}", self.generation)).unwrap_or_else(|_| bad_id()),
        };
        let same_files = reuse && self.rng.chance(500);
        self.cov.hit(if reuse { "coordinator: re-use a migration id" } else { "coordinator: new migration id" });
        let step = self.step;
        self.writer.resume(&mut self.rng, step);
        self.writer.move_back();
        self.fence = None;
        if !same_files {
            // Another offer under the same id replaces its staging, staged WAL included.
            self.acked.remove(&id);
            self.copy = new_copy(&mut self.rng, self.generation, &id, self.writer.last_lsn());
        } else {
            self.copy.completed = false;
            self.copy.release_failures = 0;
            self.copy.lifecycle = Lifecycle::BaseCopy;
        }
        self.log(format!("new copy {id} (generation {}, same files: {same_files})", self.generation));
    }

    pub(super) fn connect(&mut self, purpose: Purpose, request: Option<SourceConversation>) {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let node = NodeId::new(SOURCE_NODE).unwrap_or_else(|_| bad_node());
        let source = match request {
            Some(conversation) => conversation,
            None => {
                let live = self.copy.live;
                let plan = CopyPlan { wal: live, cutover: live, commit: !live };
                SourceConversation::copy(&node, self.copy.offer.clone(), plan)
            }
        };
        let target = TargetEnd::new(id, SOURCE_NODE, self.target.ctx.node_id.clone());
        self.log(format!("conn {} opens ({purpose:?})", id.0));
        self.conns.push(Conn {
            id,
            purpose,
            source,
            target,
            to_target: VecDeque::new(),
            to_source: VecDeque::new(),
            chunks: Vec::new(),
            sending: false,
            wal: None,
        });
        let i = self.conns.len() - 1;
        self.drain_source(i);
    }

    /// The coordinator, at a random moment: abort, release (any LSN, from any phase), or
    /// forget, sometimes twice in a row (a re-sent call).
    fn coordinator(&mut self) {
        let id = self.copy.offer.migration_id.clone();
        let node = NodeId::new(SOURCE_NODE).unwrap_or_else(|_| bad_node());
        let times = 1 + self.rng.below(2);
        for _ in 0..times {
            match self.rng.below(3) {
                0 => {
                    self.cov.hit("coordinator: abort");
                    self.log(format!("coordinator aborts {id}"));
                    let request = SourceConversation::abort(&node, id.clone(), "coordinator".into());
                    self.connect(Purpose::Request, Some(request));
                }
                1 => {
                    self.cov.hit("coordinator: release");
                    let lsn = Lsn(self.rng.below(3));
                    self.log(format!("coordinator releases {id} at {lsn}"));
                    let request = SourceConversation::release(&node, id.clone(), lsn, None);
                    self.connect(Purpose::Request, Some(request));
                }
                _ => self.forget(),
            }
        }
    }

    /// The coordinator forgets the migration on the target.
    pub(super) fn forget(&mut self) {
        let id = self.copy.offer.migration_id.clone();
        self.cov.hit("coordinator: forget");
        let result = self.target.rt.block_on(self.target.ctx.forget(&id));
        self.log(format!("coordinator forgets {id}: {result:?}"));
        if result.is_ok() {
            self.cov.hit("coordinator: forget taken");
            self.recorded.remove(&id);
            self.released_by_source.remove(&id);
            self.acked.remove(&id);
        }
    }

    /// One event on connection `i`, drawn among those that can happen.
    fn step_conn(&mut self, i: usize) {
        // The target runs a fence once its staged WAL holds what it waits for, or now and
        // then before (its wait then runs out).
        let fence_move = self.conns[i].target.pending_fence.is_some() && (self.fence_ready(i) || self.rng.chance(100));
        let conn = &self.conns[i];
        let mut moves: Vec<u8> = Vec::new();
        if !conn.to_target.is_empty() {
            moves.push(0);
        }
        if !conn.to_source.is_empty() {
            moves.push(1);
        }
        if !conn.chunks.is_empty() {
            moves.push(2);
        }
        if !conn.target.events.is_empty() {
            moves.push(3);
        }
        if conn.sending && conn.chunks.len() < WINDOW_CHUNKS {
            moves.push(4);
        }
        let running = conn.source.state() != SourceState::Done;
        if let Some(wal) = conn.wal.as_ref().filter(|_| running) {
            if !wal.to_target.is_empty() {
                moves.push(5);
            }
            if !wal.to_source.is_empty() {
                moves.push(6);
            }
            if wal.can_read(&self.writer) {
                moves.push(7);
            }
            if wal.can_send() {
                moves.push(8);
            }
        }
        if fence_move {
            moves.push(9);
        }
        // The `fenced` commit runs soon after the answer, not at once: the window between
        // them is open to restarts, power losses and an early release.
        if conn.target.pending_commit.is_some() && self.rng.chance(400) {
            moves.push(10);
        }
        if moves.is_empty() {
            if conn.wal.is_some() && running && !self.copy.completed {
                // A live copy waits for writes or a fence: nothing moves now.
                return;
            }
            // Nothing moves: the conversation is over (or stuck: its end is a lost connection).
            self.log(format!("conn {} ends", conn.id.0));
            self.drop_conn(i);
            return;
        }
        let pick = moves[self.rng.index(moves.len())];
        let result = match pick {
            0 => self.deliver_to_target(i),
            1 => self.deliver_to_source(i),
            2 => self.deliver_chunk(i),
            3 => self.flush_events(i),
            4 => {
                self.send_chunk(i);
                Ok(())
            }
            _ => self.step_live(i, pick),
        };
        if let Err(e) = result {
            if self.conns[i].purpose == Purpose::LiveRelease {
                self.copy.release_failures += 1;
                // The source recorded the release (its point of no return) of a fence the
                // target answered: a target that refuses it leaves the migration stuck.
                let refused = ["cannot be released", "fence again before releasing", "records are missing"];
                if refused.iter().any(|r| e.contains(r)) {
                    self.broken = Some(format!("the target refused a release the source recorded: {e}"));
                }
            }
            if self.conns[i].purpose == Purpose::Copy && e.contains("refused") {
                // A refusal is permanent: the source gives the copy up.
                self.cov.hit("conn: copy refused");
                self.copy.completed = true;
            }
            self.cov.hit("conn: failed");
            self.log(format!("conn {} fails: {e}", self.conns[i].id.0));
            self.failures_count += 1;
            self.drop_conn(i);
        }
    }

    fn deliver_to_target(&mut self, i: usize) -> Result<(), String> {
        let message = self.conns[i].to_target.pop_front();
        self.log(format!("conn {} -> target: {}", self.conns[i].id.0, message.as_ref().map_or("end", |m| m.name())));
        let conn = &mut self.conns[i];
        conn.target.conversation.handle_message(message).map_err(|e| e.to_string())?;
        self.drain_target(i)
    }

    fn deliver_to_source(&mut self, i: usize) -> Result<(), String> {
        let message = self.conns[i].to_source.pop_front();
        self.log(format!("conn {} -> source: {}", self.conns[i].id.0, message.as_ref().map_or("end", |m| m.name())));
        let step = self.step;
        self.conns[i].source.handle_message(message, step).map_err(|e| e.to_string())?;
        self.drain_source(i);
        Ok(())
    }

    fn deliver_chunk(&mut self, i: usize) -> Result<(), String> {
        let conn = &mut self.conns[i];
        // Chunk streams reorder against each other; a chunk may arrive twice.
        let k = self.rng.index(conn.chunks.len());
        let frame = match self.rng.chance(30) {
            true => {
                self.cov.hit("fault: duplicated chunk");
                conn.chunks[k].clone()
            }
            false => conn.chunks.swap_remove(k),
        };
        if k != 0 {
            self.cov.hit("fault: reordered chunk");
        }
        let target = &self.target;
        let (file_index, offset, crc) = (frame.file_index, frame.offset_bytes, frame.crc32c);
        self.conns[i].target.on_chunk(target, file_index, offset, &frame.body, crc).map_err(|e| e.to_string())
    }

    fn flush_events(&mut self, i: usize) -> Result<(), String> {
        let events = std::mem::take(&mut self.conns[i].target.events);
        self.conns[i].target.conversation.handle_chunks(&events).map_err(|e| e.to_string())?;
        self.drain_target(i)
    }

    fn send_chunk(&mut self, i: usize) {
        let step = self.step;
        let conn = &mut self.conns[i];
        let Some(span) = conn.source.poll_chunk(step) else {
            conn.sending = false;
            self.drain_source(i);
            return;
        };
        let body = chunk_bytes(&self.copy.files, &span).to_vec();
        let crc32c = crc32c::crc32c(&body);
        if conn.source.handle_chunk_read(&span, crc32c).is_ok() {
            conn.chunks.push(Frame {
                file_index: span.chunk.file_index,
                offset_bytes: span.offset_bytes,
                body,
                crc32c,
            });
        }
        self.drain_source(i);
    }

    pub(super) fn drain_target(&mut self, i: usize) -> Result<(), String> {
        let mut fx = Effects::default();
        let result = self.conns[i].target.drain(&self.target, &mut self.cov, &mut fx);
        self.conns[i].to_source.extend(fx.to_source);
        for closed in fx.close {
            if let Some(k) = self.conns.iter().position(|c| c.id == closed) {
                if k != i {
                    self.log(format!("conn {} closed by the target", closed.0));
                    self.conns[k].target.claimed = None;
                    self.conns[k].chunks.clear();
                    self.conns[k].to_target.clear();
                    self.conns[k].to_target.push_back(Message::error(ferry_wire::message::ErrorKind::Cancelled, "cut"));
                }
            }
        }
        result.map_err(|e| e.to_string())
    }

    pub(super) fn drain_source(&mut self, i: usize) {
        while let Some(action) = self.conns[i].source.poll_action() {
            self.cov.hit(format!("source action: {}", source_action_name(&action)));
            match action {
                SourceAction::Send(message) | SourceAction::SendFileDone { message, .. } => {
                    if let Message::Commit { .. } = message {
                        // The source releases an offline copy by committing it.
                        let id = self.copy.offer.migration_id.clone();
                        let release = SourceRelease { files: self.copy.files.clone(), final_lsn: None };
                        self.released_by_source.insert(id, release);
                    }
                    self.conns[i].to_target.push_back(message)
                }
                SourceAction::SendChunks => self.conns[i].sending = true,
                SourceAction::Recheck(spans) => {
                    for span in spans {
                        let crc = crc32c::crc32c(chunk_bytes(&self.copy.files, &span));
                        let _ = self.conns[i].source.handle_chunk_read(&span, crc);
                    }
                }
                SourceAction::Finish { committed, fenced, .. } => {
                    if fenced {
                        self.log("source: the live copy is over (fence kept)".into());
                        self.copy.completed = true;
                    }
                    if committed {
                        let id = self.copy.offer.migration_id.clone();
                        self.log(format!("source: {id} committed"));
                        self.copy.completed = true;
                    }
                    // Nothing more is sent: the connection ends when the step loop finds no move.
                }
                SourceAction::Answered => {
                    self.cov.hit("coordinator: request answered");
                    self.request_answered(i);
                }
                SourceAction::Accepted { .. } => {}
                SourceAction::StartWal => self.conns[i].wal = Some(WalStream::open(self.copy.offer.base_lsn)),
                SourceAction::BaseStaged { .. } => {
                    let live = self.copy.live;
                    self.copy.lifecycle.base_staged(live);
                }
                SourceAction::ServeCutOver => {}
                SourceAction::Fenced { final_lsn, durable_lsn, .. } => self.source_fenced(i, final_lsn, durable_lsn),
                SourceAction::FenceCancelled { final_lsn, reason } => {
                    self.fence_failed(final_lsn, &format!("the target cancelled it: {reason}"))
                }
                SourceAction::FenceTimedOut { final_lsn } => self.fence_failed(final_lsn, "no answer by its deadline"),
                SourceAction::FinishWal => self.log("source action not simulated: finish_wal".into()),
            }
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let mut conn = self.conns.remove(i);
        // A daemon whose connection ends after the `Fenced` answer was written may still run
        // the `fenced` commit that follows it, or may not (its write failed first).
        if conn.target.pending_commit.is_some() && self.rng.chance(500) {
            let wrote = conn.target.commit_fence(&self.target);
            self.log(format!("target commits its fence as conn {} ends: {wrote:?}", conn.id.0));
        }
        conn.target.end(&self.target);
    }

    /// A power loss on the target: the daemon restarts on what the disk kept (torn or not).
    fn restart_target(&mut self, power_loss: bool) -> Option<String> {
        self.conns.clear();
        if power_loss {
            let torn = self.rng.chance(500);
            self.cov.hit(if torn { "fault: power loss, torn writes" } else { "fault: power loss" });
            self.log(format!("target power loss (torn: {torn}); restart"));
            let rng = &mut self.rng;
            let storage = match torn {
                true => self.target.storage.recover_torn(&mut |n| rng.below(n)),
                false => self.target.storage.recover(),
            };
            storage.crash_at_sync(1 + self.rng.below(200));
            self.target = Target::start(storage);
        } else {
            self.log("target daemon restarts".into());
            self.target = Target::start(self.target.storage.clone());
        }
        self.failures_count += 1;
        self.states.clear();
        for (id, phase) in &self.recorded {
            let now = self.target.ctx.machine().get(id).map(|m| m.state.name());
            let kept = match *phase {
                // A later phase may have been under way (a fence, a release, an abort; after a
                // fence, an unfence: records above a fence the source cancelled).
                "base_staged" | "fenced" => matches!(now, Some("base_staged" | "fenced" | "released" | "aborted")),
                other => now == Some(other),
            };
            if !kept {
                return Some(format!("restart lost phase {phase} of {id}: now {now:?}"));
            }
        }
        self.acked_lost()
    }

    fn track_states(&mut self) {
        let now: BTreeMap<MigrationId, &'static str> =
            self.target.ctx.machine().iter().map(|(id, m)| (id.clone(), m.state.name())).collect();
        for (id, state) in &now {
            let before = self.states.get(id).copied().unwrap_or("none");
            if before != *state {
                self.cov.hit(format!("inbound: {before} -> {state}"));
            }
        }
        for (id, before) in &self.states {
            if !now.contains_key(id) {
                self.cov.hit(format!("inbound: {before} -> none"));
            }
        }
        // A staging removed (aborted, forgotten) takes its staged WAL with it.
        self.acked.retain(|id, _| now.get(id).is_some_and(|s| *s != "aborted"));
        for (id, state) in &now {
            self.cov.hit(format!("state: {state}"));
            // The machine moves to these only after the manifest that says so is durable, but
            // for `fenced`: its commit follows the fence's answer, and a restart before it
            // finds the staging base staged (the release then derives the fence).
            if matches!(*state, "base_staged" | "fenced" | "released" | "aborted") {
                self.recorded.insert(id.clone(), state);
            }
        }
        self.states = now;
    }
}

/// A new copy: offline (a commit at its end) or live (a WAL stream from `base_lsn`, then a
/// fence and a release), with files the seed draws.
fn new_copy(rng: &mut Rng, generation: u32, id: &MigrationId, base_lsn: Lsn) -> Copy {
    let live = rng.chance(600);
    let files_count = 1 + rng.index(3);
    let mut files = Vec::new();
    let mut offered = Vec::new();
    for f in 0..files_count {
        let len = 1 + rng.index(5 * CHUNK_LEN_BYTES as usize);
        let fill = (generation.to_le_bytes()[0]).wrapping_mul(31).wrapping_add(f.to_le_bytes()[0]);
        let bytes: Vec<u8> = (0..len).map(|k| fill.wrapping_add((k % 251).to_le_bytes()[0])).collect();
        let path = RelPath::new(format!("g{generation}/f{f}.seg")).unwrap_or_else(|_| panic!("a valid path"));
        offered.push(OfferFile { path, size_bytes: len as u64 });
        files.push(bytes);
    }
    let offer = Offer {
        migration_id: id.clone(),
        vshard_id: VSHARD,
        base_lsn: if live { base_lsn } else { Lsn(0) },
        chunk_len_bytes: CHUNK_LEN_BYTES,
        files: offered,
        db_meta: serde_json::Value::Null,
        wal: live,
    };
    Copy { offer, files, completed: false, live, lifecycle: Lifecycle::BaseCopy, release_failures: 0 }
}

/// The source's bytes of a chunk the machine handed out (empty past the file: the machine
/// only hands out spans inside it).
fn chunk_bytes<'a>(files: &'a [Vec<u8>], span: &ferry_wire::session::ChunkSpan) -> &'a [u8] {
    let file = files.get(usize::try_from(span.chunk.file_index).unwrap_or(usize::MAX));
    let start = usize::try_from(span.offset_bytes).unwrap_or(usize::MAX);
    let end = start.saturating_add(usize::try_from(span.len_bytes).unwrap_or(0));
    file.and_then(|f| f.get(start..end)).unwrap_or_default()
}

fn bad_id() -> MigrationId {
    panic!("the simulator's migration ids are valid")
}

fn bad_node() -> NodeId {
    panic!("the simulator's node ids are valid")
}

fn source_action_name(action: &SourceAction) -> &'static str {
    match action {
        SourceAction::Send(_) => "send",
        SourceAction::SendFileDone { .. } => "send_file_done",
        SourceAction::Accepted { .. } => "accepted",
        SourceAction::StartWal => "start_wal",
        SourceAction::Recheck(_) => "recheck",
        SourceAction::SendChunks => "send_chunks",
        SourceAction::BaseStaged { .. } => "base_staged",
        SourceAction::FinishWal => "finish_wal",
        SourceAction::ServeCutOver => "serve_cut_over",
        SourceAction::Fenced { .. } => "fenced",
        SourceAction::FenceCancelled { .. } => "fence_cancelled",
        SourceAction::FenceTimedOut { .. } => "fence_timed_out",
        SourceAction::Answered => "answered",
        SourceAction::Finish { .. } => "finish",
    }
}
