//! Failpoints that damage a chunk's bytes in flight, for the end-to-end corruption campaign
//! (tests/tests/flips_e2e.rs; issue 18, "corruption above TLS").
//!
//! What it does: holds, per [`Site`], at most one armed damage: a [`Flip`] and how many
//! chunks to let pass first. The code at each site hands its chunk to [`damage_source_chunk`]
//! or [`damage_target_chunk`]; when the site's damage is due, the chunk's bytes are copied,
//! damaged and handed back, and the damage disarms itself. The sites:
//! - [`Site::SourceChunkAfterCrc`]: the source's chunk after its CRC32C was computed and
//!   before it is framed and sent (as a bad DIMM or a buggy copy on the source would);
//! - [`Site::TargetReceiveBuffer`]: the target's received chunk body before its CRC32C is
//!   checked (as a bad copy out of the socket would);
//! - [`Site::TargetWalBatch`]: the body of a WAL batch frame the target received (its records'
//!   headers, LSNs, lengths and payloads) before the frame's CRC32C is checked.
//!
//! What it does not: arm itself. Only code in the same process arms a site ([`arm`]): the
//! test crates link the engine as a library; the daemon reads no flag, environment variable
//! or peer message that arms one. Nor does it damage anything at rest (the tests wrap the
//! [`crate::storage::Storage`] for that) or in a frame header (the in-process campaign of
//! `ferry_wire::fuzzing::flips` covers frame headers).
//!
//! Cost when nothing is armed (always, outside those tests): one relaxed atomic load per
//! chunk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use ferry_wire::damage::Flip;

/// Where a damage applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    SourceChunkAfterCrc,
    TargetReceiveBuffer,
    TargetWalBatch,
}

/// What an armed site does to the bytes due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// This flip (offsets from the first byte; those past the end are left out).
    Flip(Flip),
    /// A flip drawn, from this seed, over the length of the bytes due (for structures whose
    /// length the test does not know, such as a WAL batch frame).
    DrawnOverLength { seed: u64 },
}

impl Damage {
    /// The flip for bytes of `len`.
    fn resolve(&self, len: usize) -> Flip {
        match self {
            Damage::Flip(flip) => flip.clone(),
            Damage::DrawnOverLength { seed } => {
                let mut state = *seed;
                // splitmix64
                let mut next = || {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let z = (state ^ (state >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^ (z >> 31)
                };
                Flip::draw(&mut next, len)
            }
        }
    }
}

#[derive(Debug)]
struct Armed {
    site: Site,
    /// Chunks to let pass at the site before the damaged one.
    skip_count: u64,
    damage: Damage,
}

/// The armed damages of a process (one [`static`](REGISTRY) instance; tests of this module
/// make their own).
#[derive(Debug)]
struct Registry {
    /// Whether anything is armed: the fast path's only cost.
    any_armed: AtomicBool,
    armed: Mutex<Vec<Armed>>,
    /// The flips applied since the last [`applied`] call, with their site.
    applied: Mutex<Vec<(Site, Flip)>>,
}

static REGISTRY: Registry = Registry::new();

impl Registry {
    const fn new() -> Self {
        Self { any_armed: AtomicBool::new(false), armed: Mutex::new(Vec::new()), applied: Mutex::new(Vec::new()) }
    }

    fn armed(&self) -> std::sync::MutexGuard<'_, Vec<Armed>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, site: Site, skip_count: u64, damage: Damage) {
        let mut all = self.armed();
        all.retain(|a| a.site != site);
        all.push(Armed { site, skip_count, damage });
        self.any_armed.store(true, Ordering::Release);
    }

    fn disarm_all(&self) -> usize {
        let mut all = self.armed();
        let left = all.len();
        all.clear();
        self.any_armed.store(false, Ordering::Release);
        left
    }

    /// The flip due at `site` for these `len` bytes, if any (counting them as passed
    /// otherwise); recorded as applied.
    fn take(&self, site: Site, len: usize) -> Option<Flip> {
        if !self.any_armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut all = self.armed();
        let at = all.iter().position(|a| a.site == site)?;
        let entry = all.get_mut(at)?;
        if entry.skip_count > 0 {
            entry.skip_count -= 1;
            return None;
        }
        let flip = all.swap_remove(at).damage.resolve(len);
        if all.is_empty() {
            self.any_armed.store(false, Ordering::Release);
        }
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).push((site, flip.clone()));
        Some(flip)
    }
}

/// Arms `site`: the bytes after the next `skip_count` there (a chunk body, a WAL batch body)
/// get `damage`. Replaces what was armed at the site. Process-wide: meant for a test binary
/// that runs one copy at a time.
pub fn arm(site: Site, skip_count: u64, damage: Damage) {
    REGISTRY.arm(site, skip_count, damage);
}

/// The flips applied since the last call, each with its site (taken: the next call starts
/// empty).
pub fn applied() -> Vec<(Site, Flip)> {
    std::mem::take(&mut *REGISTRY.applied.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Disarms every site; returns how many damages were still armed (not yet applied).
pub fn disarm_all() -> usize {
    REGISTRY.disarm_all()
}

/// The source's chunk `data`, damaged when [`Site::SourceChunkAfterCrc`] is due.
pub(crate) fn damage_source_chunk(data: Bytes) -> Bytes {
    match REGISTRY.take(Site::SourceChunkAfterCrc, data.len()) {
        Some(flip) => damaged(&data, &flip),
        None => data,
    }
}

/// The target's received body `pieces` as one damaged piece when
/// [`Site::TargetReceiveBuffer`] is due; `None` (nothing to change) otherwise.
pub(crate) fn damage_target_chunk(pieces: &[Bytes]) -> Option<Bytes> {
    let len = pieces.iter().map(Bytes::len).sum();
    let flip = REGISTRY.take(Site::TargetReceiveBuffer, len)?;
    Some(damaged(&pieces.concat(), &flip))
}

/// Damages the received WAL batch frame `body` in place when [`Site::TargetWalBatch`] is due.
pub(crate) fn damage_target_wal_batch(body: &mut [u8]) {
    if let Some(flip) = REGISTRY.take(Site::TargetWalBatch, body.len()) {
        flip.apply(body, 0);
    }
}

fn damaged(bytes: &[u8], flip: &Flip) -> Bytes {
    let mut copy = bytes.to_vec();
    flip.apply(&mut copy, 0);
    Bytes::from(copy)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_armed_damage_hits_one_chunk_after_its_skip_count_then_disarms() {
        // A registry of its own: the process-wide one is left alone, so copies run by other
        // tests of this binary are never damaged.
        let registry = Registry::new();
        let flip = Flip::draw(&mut || 3, 8);
        registry.arm(Site::SourceChunkAfterCrc, 2, Damage::Flip(flip.clone()));
        assert_eq!(registry.take(Site::TargetReceiveBuffer, 8), None, "another site");
        assert_eq!(registry.take(Site::SourceChunkAfterCrc, 8), None);
        assert_eq!(registry.take(Site::SourceChunkAfterCrc, 8), None);
        assert_eq!(registry.take(Site::SourceChunkAfterCrc, 8), Some(flip.clone()));
        assert_eq!(registry.take(Site::SourceChunkAfterCrc, 8), None, "disarmed after one hit");
        assert!(!registry.any_armed.load(Ordering::Relaxed));
        assert_eq!(*registry.applied.lock().unwrap(), [(Site::SourceChunkAfterCrc, flip.clone())]);
        registry.arm(Site::TargetReceiveBuffer, 5, Damage::Flip(flip));
        assert_eq!(registry.disarm_all(), 1);
        assert_eq!(registry.take(Site::TargetReceiveBuffer, 8), None);
    }

    #[test]
    fn a_drawn_damage_falls_inside_the_bytes_due_and_replays_from_its_seed() {
        let registry = Registry::new();
        for len in [1usize, 7, 300, 70_000] {
            registry.arm(Site::TargetWalBatch, 0, Damage::DrawnOverLength { seed: len as u64 });
            let flip = registry.take(Site::TargetWalBatch, len).unwrap();
            assert!(!flip.is_empty() && flip.first() < len, "{len}: {flip:?}");
            assert_eq!(flip, Damage::DrawnOverLength { seed: len as u64 }.resolve(len));
        }
    }

    #[test]
    fn a_damaged_chunk_is_a_copy_with_the_flip_applied() {
        let flip = Flip::draw(&mut || 3, 8);
        let mut expected = b"abcdefgh".to_vec();
        flip.apply(&mut expected, 0);
        let joined: Vec<u8> = [Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh")].concat();
        assert_eq!(damaged(&joined, &flip), expected);
        assert_ne!(expected, b"abcdefgh");
    }
}
