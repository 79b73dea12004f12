//! One seeded run: the world (source, network, target, coordinator), its step loop and its
//! invariants.
//!
//! What it does not: use a clock or a socket. Time is the step count; the network is queues.

use std::collections::{BTreeMap, VecDeque};

use ferry_engine::staging;
use ferry_wire::manifest::StagingState;
use ferry_wire::message::{Message, Offer, OfferFile};
use ferry_wire::path::RelPath;
use ferry_wire::proto::inbound::{ConnId, InboundState};
use ferry_wire::proto::source::{CopyPlan, SourceAction, SourceConversation};
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};

use super::target::{Effects, Target, TargetEnd};
use super::{Bug, Coverage, Rng};

/// Steps a run may take before it is called stuck.
const STEPS_MAX: u64 = 20_000;
/// Chunks the source keeps in flight on one connection.
const WINDOW_CHUNKS: usize = 6;
const CHUNK_LEN_BYTES: u32 = 4096;
const SOURCE_NODE: &str = "source";

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
enum Purpose {
    Copy,
    Request,
}

struct Conn {
    id: ConnId,
    purpose: Purpose,
    source: SourceConversation,
    target: TargetEnd,
    to_target: VecDeque<Message>,
    to_source: VecDeque<Message>,
    chunks: Vec<Frame>,
    sending: bool,
}

/// A copy the source runs (one offer, re-sent on every connection until it completes).
struct Copy {
    offer: Offer,
    files: Vec<Vec<u8>>,
    completed: bool,
}

struct World {
    rng: Rng,
    step: u64,
    trace: Vec<String>,
    cov: Coverage,
    target: Target,
    conns: Vec<Conn>,
    next_conn: u64,
    copy: Copy,
    generation: u32,
    /// Migrations the source itself released (an offline copy's commit), with its files.
    released_by_source: BTreeMap<MigrationId, Vec<Vec<u8>>>,
    /// Phases recorded durably on the target (a manifest write returned): a restart keeps them.
    recorded: BTreeMap<MigrationId, &'static str>,
    failures_count: u64,
    states: BTreeMap<MigrationId, &'static str>,
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
        let copy = new_copy(&mut rng, 0, &MigrationId::new("m-0").unwrap_or_else(|_| bad_id()));
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
        }
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("{:>6} {line}", self.step));
    }

    fn run(&mut self) -> Option<String> {
        while self.step < STEPS_MAX {
            self.step += 1;
            if self.copy.completed && self.generation >= 2 && self.conns.is_empty() {
                return None;
            }
            self.one_step();
            if self.target.storage.has_crashed() {
                if let Some(v) = self.restart_target() {
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
            12..=24 => self.coordinator(),
            25..=50 if !self.has_copy_conn() => self.connect(Purpose::Copy, None),
            _ => {
                if self.conns.is_empty() {
                    if !self.copy.completed {
                        self.connect(Purpose::Copy, None);
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
        if !same_files {
            self.copy = new_copy(&mut self.rng, self.generation, &id);
        } else {
            self.copy.completed = false;
        }
        self.log(format!("new copy {id} (generation {}, same files: {same_files})", self.generation));
    }

    fn connect(&mut self, purpose: Purpose, request: Option<SourceConversation>) {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let node = NodeId::new(SOURCE_NODE).unwrap_or_else(|_| bad_node());
        let source = match request {
            Some(conversation) => conversation,
            None => SourceConversation::copy(
                &node,
                self.copy.offer.clone(),
                CopyPlan { wal: false, cutover: false, commit: true },
            ),
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
                    let request = SourceConversation::release(&node, id.clone(), lsn);
                    self.connect(Purpose::Request, Some(request));
                }
                _ => {
                    self.cov.hit("coordinator: forget");
                    let result = self.target.rt.block_on(self.target.ctx.forget(&id));
                    self.log(format!("coordinator forgets {id}: {result:?}"));
                    if result.is_ok() {
                        self.cov.hit("coordinator: forget taken");
                        self.recorded.remove(&id);
                        self.released_by_source.remove(&id);
                    }
                }
            }
        }
    }

    /// One event on connection `i`, drawn among those that can happen.
    fn step_conn(&mut self, i: usize) {
        let conn = &self.conns[i];
        let mut moves = Vec::new();
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
        if moves.is_empty() {
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
            _ => {
                self.send_chunk(i);
                Ok(())
            }
        };
        if let Err(e) = result {
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

    fn drain_target(&mut self, i: usize) -> Result<(), String> {
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

    fn drain_source(&mut self, i: usize) {
        while let Some(action) = self.conns[i].source.poll_action() {
            self.cov.hit(format!("source action: {}", source_action_name(&action)));
            match action {
                SourceAction::Send(message) | SourceAction::SendFileDone { message, .. } => {
                    if let Message::Commit { .. } = message {
                        // The source releases an offline copy by committing it.
                        let id = self.copy.offer.migration_id.clone();
                        self.released_by_source.insert(id, self.copy.files.clone());
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
                SourceAction::Finish { committed, .. } => {
                    if committed {
                        let id = self.copy.offer.migration_id.clone();
                        self.log(format!("source: {id} committed"));
                        self.copy.completed = true;
                    }
                    // Nothing more is sent: the connection ends when the step loop finds no move.
                }
                SourceAction::Answered => self.cov.hit("coordinator: request answered"),
                SourceAction::Accepted { .. } | SourceAction::BaseStaged { .. } => {}
                other => self.log(format!("source action not simulated: {}", source_action_name(&other))),
            }
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let mut conn = self.conns.remove(i);
        conn.target.end(&self.target);
    }

    /// A power loss on the target: the daemon restarts on what the disk kept (torn or not).
    fn restart_target(&mut self) -> Option<String> {
        let torn = self.rng.chance(500);
        self.cov.hit(if torn { "fault: power loss, torn writes" } else { "fault: power loss" });
        self.log(format!("target power loss (torn: {torn}); restart"));
        self.conns.clear();
        let rng = &mut self.rng;
        let storage = match torn {
            true => self.target.storage.recover_torn(&mut |n| rng.below(n)),
            false => self.target.storage.recover(),
        };
        storage.crash_at_sync(1 + self.rng.below(200));
        self.target = Target::start(storage);
        self.failures_count += 1;
        self.states.clear();
        for (id, phase) in &self.recorded {
            let now = self.target.ctx.machine().get(id).map(|m| m.state.name());
            let kept = match *phase {
                "base_staged" => matches!(now, Some("base_staged" | "fenced" | "released" | "aborted")),
                other => now == Some(other),
            };
            if !kept {
                return Some(format!("restart lost phase {phase} of {id}: now {now:?}"));
            }
        }
        None
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
        for (id, state) in &now {
            self.cov.hit(format!("state: {state}"));
            // The machine moves to these only after the manifest that says so is durable.
            if matches!(*state, "base_staged" | "fenced" | "released" | "aborted") {
                self.recorded.insert(id.clone(), state);
            }
        }
        self.states = now;
    }

    /// The invariants; the first one broken, if any.
    fn check(&self) -> Option<String> {
        let live: Vec<ConnId> = self.conns.iter().map(|c| c.id).collect();
        let machine = self.target.ctx.machine();
        for (id, m) in machine.iter() {
            let claimant = machine.claimant(id);
            if let Some(c) = claimant {
                if !live.contains(&c) {
                    return Some(format!("{id} is claimed by conn {}, which is gone", c.0));
                }
            }
            if m.state == InboundState::Receiving && claimant.is_none() {
                return Some(format!("{id} shows receiving with no connection: a phantom holding a slot"));
            }
            if let InboundState::Released { .. } = m.state {
                let Some(files) = self.released_by_source.get(id) else {
                    return Some(format!("{id} is released on the target, but the source never released it"));
                };
                if let Some(v) = self.released_differs(id, files) {
                    return Some(v);
                }
            }
            let bound = (self.failures_count + 1) * (WINDOW_CHUNKS as u64 + 4) * u64::from(CHUNK_LEN_BYTES);
            if m.bytes_resent > bound {
                return Some(format!("{id} resent {} bytes, over the bound of {bound}", m.bytes_resent));
            }
        }
        None
    }

    /// Whether a released staging's files differ from the source's.
    fn released_differs(&self, id: &MigrationId, files: &[Vec<u8>]) -> Option<String> {
        let storage = &*self.target.ctx.storage;
        let layout = self.target.layout(id);
        let manifest = match staging::read_manifest(storage, &layout) {
            Ok(Some(m)) => m,
            other => return Some(format!("released {id} has no readable manifest: {other:?}")),
        };
        if manifest.state != StagingState::Released {
            return Some(format!("released {id}'s manifest says {:?}", manifest.state));
        }
        for (segment, source) in manifest.segments.iter().zip(files) {
            match storage.read_all(&layout.segment_path(&segment.path)) {
                Ok(bytes) if bytes == *source => {}
                Ok(_) => return Some(format!("released {id}: {} differs from the source", segment.path)),
                Err(e) => return Some(format!("released {id}: {} unreadable: {e}", segment.path)),
            }
        }
        None
    }
}

fn new_copy(rng: &mut Rng, generation: u32, id: &MigrationId) -> Copy {
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
        vshard_id: VShardId(7),
        base_lsn: Lsn(0),
        chunk_len_bytes: CHUNK_LEN_BYTES,
        files: offered,
        db_meta: serde_json::Value::Null,
        wal: false,
    };
    Copy { offer, files, completed: false }
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
