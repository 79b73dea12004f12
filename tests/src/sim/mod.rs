//! A deterministic simulator of base copies between one source and one target, on a seed.
//!
//! What it does: runs the production machines of `wire` (`SourceConversation`,
//! `TargetConversation`, `Inbounds`) and the production target steps of the engine
//! (`transfer::steps`: admission, chunk writes, part syncs, file finalisation, the base's
//! MANIFEST, the offline commit; `fence_target::release_staging`; `abort::abort_staging`;
//! `TargetContext::forget` and `load_existing`) on the crash-testing `FakeStorage`. Everything
//! the seed draws: which message or chunk is delivered next (chunk streams reorder against
//! each other and the control stream; a chunk may arrive twice), lost connections, the sync a
//! power loss hits and how much of the unsynced writes it keeps (torn writes), daemon restarts
//! on either side, and a coordinator that aborts, releases and forgets at random moments,
//! re-sends its calls and re-uses migration ids for new copies with other files.
//!
//! Invariants, checked after every step ([`check`]): a `released` staging is byte for byte
//! the source's, and only the source's commit released it; every claim belongs to a live
//! connection and no migration shows `receiving` without one (a phantom holding a slot);
//! `bytes_resent` stays within its bound; and a restart never loses a recorded phase.
//!
//! What it does not (yet): the WAL stream, the fence and live cut-over, joined connections,
//! or the source's durable phase record; see `tests/README.md`. The glue that executes the
//! machines' actions here mirrors the daemon's async driver (`transfer/target.rs`); the code
//! each action runs is the engine's own.

mod run;
mod target;

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
];

/// Transitions of the inbound machine the simulator does not reach, and why.
pub const TRANSITIONS_UNREACHABLE: &[(&str, &str)] = &[
    ("inbound: base_staged -> fenced", "the simulator runs offline copies only: no WAL stream, no fence yet"),
    ("inbound: fenced -> released", "no fence yet (as above)"),
    ("inbound: fenced -> base_staged", "no fence yet: unfence needs records above a cancelled fence"),
    ("inbound: fenced -> aborted", "no fence yet (as above)"),
];

/// The transitions of `TRANSITIONS_EXPECTED` that `coverage` never reached.
pub fn transitions_missing(coverage: &Coverage) -> Vec<&'static str> {
    TRANSITIONS_EXPECTED.iter().copied().filter(|t| coverage.count(t) == 0).collect()
}
