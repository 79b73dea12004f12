//! A deterministic simulator of migrations between one source and one target, on a seed.
//!
//! What it does: runs the production machines of `wire` (`SourceConversation`, `SourceWal`,
//! `TargetConversation`, `Inbounds`, the source's outbound `Lifecycle`, the fence's
//! `drain_check`) and the production target code of the engine (`transfer::steps`:
//! admission, chunk writes, part syncs, file finalisation, the base's MANIFEST, the offline
//! commit; `walrecv::stage_bodies`, the staged WAL's group step; `fence_target::fence_staging`,
//! `commit_fenced`, `unfence_hook` and `release_now`; `abort::abort_staging`; `TargetContext::forget` and
//! `load_existing`) on the crash-testing `FakeStorage`. A copy is offline (a commit at its
//! end) or live (a WAL stream of the writer's records, then a fence and a release). Everything
//! the seed draws: which message, chunk or WAL batch moves next (chunk streams reorder against
//! each other and the control stream; a chunk may arrive twice; WAL frames are staged in
//! groups of one or several), lost connections, the sync a power loss hits and how much of
//! the unsynced writes it keeps (torn writes), daemon restarts on either side, a writer of
//! three vShards in one of the two WAL layouts, and a coordinator that fences (pausing the
//! writer), cancels, aborts, releases and forgets at random moments, re-sends its calls and
//! re-uses migration ids for new copies with other files. The target's `fenced` MANIFEST
//! commit runs a few steps after its answer, and right after the answer the target's process
//! may restart or a power loss may be armed for its next syncs, so a crash between the fence's
//! answer and the release is explored (it must end released, the fence derived from the
//! staged WAL, or cleanly cancelled).
//!
//! Invariants, checked after every step: see `check.rs` (released stagings equal the source
//! and only a release the source recorded makes one; a fenced or released staged WAL holds
//! exactly the vShard's records in `(base, final]`; no write acknowledged while paused; claims
//! and slots freed; `bytes_resent` bounded; no acknowledged WAL record lost by a restart) and
//! `run.rs` (a restart never loses a recorded phase).
//!
//! What it does not (yet): joined connections; the source's phase record on disk (its
//! `Lifecycle` survives a source restart whole); the source's WAL files (the writer's records
//! are read in order, as the engine's `FolderTail` reads them); see `tests/README.md`. The
//! glue that executes the machines' actions here mirrors the daemon's async driver
//! (`transfer/target.rs`, `walrecv.rs`, `fence_source.rs`); the code each action runs is the
//! engine's own.

mod check;
mod live;
mod run;
mod target;
mod wal;
mod writer;

use std::collections::BTreeMap;
use std::fmt::Write as _;

pub use ferry_wire::plant::Bug;
pub use run::{run_seed, Outcome};

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// An index in `0..len` (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// How often each state, transition, action and fault was reached.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    pub counts: BTreeMap<String, u64>,
}

impl Coverage {
    pub fn hit(&mut self, what: impl Into<String>) {
        *self.counts.entry(what.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Coverage) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
    }

    pub fn count(&self, what: &str) -> u64 {
        self.counts.get(what).copied().unwrap_or(0)
    }

    /// One line per counter, sorted by name.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.counts {
            let _ = writeln!(out, "{v:>10}  {k}");
        }
        out
    }
}

/// The inbound-state transitions the long run must reach, and those it cannot, with why.
pub const TRANSITIONS_EXPECTED: &[&str] = &[
    "inbound: none -> receiving",
    "inbound: receiving -> interrupted",
    "inbound: interrupted -> receiving",
    "inbound: receiving -> base_staged",
    "inbound: base_staged -> released",
    "inbound: receiving -> aborted",
    "inbound: interrupted -> aborted",
    "inbound: base_staged -> aborted",
    "inbound: none -> aborted",
    "inbound: aborted -> none",
    "inbound: released -> none",
    "inbound: base_staged -> fenced",
    "inbound: fenced -> released",
    "inbound: fenced -> base_staged",
    "inbound: fenced -> aborted",
    // A crash between the fence's answer and its `fenced` commit, then the release.
    "release: fence derived from the staged WAL",
];

/// Transitions of the inbound machine the simulator does not reach, and why.
pub const TRANSITIONS_UNREACHABLE: &[(&str, &str)] = &[];

/// The transitions of `TRANSITIONS_EXPECTED` that `coverage` never reached.
pub fn transitions_missing(coverage: &Coverage) -> Vec<&'static str> {
    TRANSITIONS_EXPECTED.iter().copied().filter(|t| coverage.count(t) == 0).collect()
}
