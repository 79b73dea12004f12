//! The bodies of the fuzz targets in `wire/fuzz`, and the generator of their seed corpora.
//!
//! What it does: one `pub fn(&[u8])` per decoder ([`formats`]) and per protocol machine
//! ([`proto`]), each asserting that nothing panics and, where it is cheap, an invariant (a
//! decoded value encodes back to the same bytes, a returned range lies inside its input). The
//! fuzz crate's targets call these and nothing else, and this module's tests replay every
//! committed corpus (and any committed crash file) through the same functions, so the normal
//! test run keeps every input the fuzzer ever kept.
//!
//! Checksums: where a format carries a CRC32C, the first input byte picks whether the target
//! first fixes the CRCs up (three inputs in four, like quinn's targets that build valid
//! packets) so the fuzzer reaches the decoder beyond the check, or leaves them as mutated.
//!
//! What it does not: build without `cfg(test)` or the `fuzzing` feature (production builds
//! never carry it), or run libFuzzer (the fuzz crate does; see `wire/fuzz/README.md`).
#![allow(clippy::panic, clippy::unwrap_used)]

#[cfg(test)]
mod flips;
pub mod formats;
pub mod proto;
pub mod seeds;

/// A fuzz target's body: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target: its name (the fuzz crate's target and corpus folder) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", formats::frame),
    ("message", formats::message),
    ("manifest", formats::manifest),
    ("wal_segment", formats::wal_segment),
    ("wal_batch", formats::wal_batch),
    ("chunk_log", formats::chunk_log),
    ("phase_slots", formats::phase_slots),
    ("control_request", formats::control_request),
    ("proto_target", proto::target),
    ("proto_source", proto::source),
];

/// Splits an input into "fix the CRCs up" (three inputs in four) and the bytes after the
/// mode byte.
pub fn split_mode(data: &[u8]) -> (bool, &[u8]) {
    match data.split_first() {
        Some((mode, rest)) => (mode % 4 != 3, rest),
        None => (false, data),
    }
}

/// Writes `value` little-endian at `at` when the bytes are there (fix-ups on short inputs
/// do nothing).
fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(slot) = bytes.get_mut(at..at.saturating_add(4)) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        files
    }

    /// Replays every committed corpus, and every crash kept as a regression, through the
    /// targets' bodies: the normal test run keeps what the fuzzer found.
    #[test]
    fn every_corpus_replays_without_a_panic() {
        for (name, body) in TARGETS {
            let corpus = files_in(&fuzz_dir().join("corpus").join(name));
            assert!(corpus.len() >= 20, "corpus of {name} has {} seeds; run the seeds generator", corpus.len());
            let artifacts = files_in(&fuzz_dir().join("artifacts").join(name));
            for file in corpus.iter().chain(&artifacts) {
                let bytes = std::fs::read(file).unwrap();
                if let Err(cause) = std::panic::catch_unwind(|| body(&bytes)) {
                    std::panic::resume_unwind(Box::new(format!("{name} panics on {}: {cause:?}", file.display())));
                }
            }
        }
    }

    /// The generated seeds are what is committed: a format change that makes them stale shows
    /// here, and the generator is rerun (`cargo test -p ferry-wire --lib write_seed_corpora
    /// -- --ignored`).
    #[test]
    fn committed_corpora_hold_the_current_seeds() {
        for (name, seeds) in seeds::all() {
            assert!(seeds.len() >= 20, "{name} has only {} seeds", seeds.len());
            let dir = fuzz_dir().join("corpus").join(name);
            for (i, seed) in seeds.iter().enumerate() {
                let path = dir.join(format!("seed-{i:03}"));
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(committed == *seed, "{} is stale or missing; rerun the seeds generator", path.display());
            }
        }
    }

    /// Writes the seed corpora from valid encodings (run by hand after a format change).
    #[test]
    #[ignore = "writes files: run by hand to regenerate the seed corpora"]
    fn write_seed_corpora() {
        for (name, seeds) in seeds::all() {
            let dir = fuzz_dir().join("corpus").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for old in files_in(&dir)
                .iter()
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")))
            {
                std::fs::remove_file(old).unwrap();
            }
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
            }
        }
    }
}
