//! Live migrations between real `ferry serve` daemons ([`crate::daemons::Node`]) for the fault
//! scenarios (`partitions.rs`, `phase_kills.rs`, `storm.rs`): the reference writer on a source
//! WAL of its own, the vShard's base exported with some bulk, `migration.start` over the
//! source's control socket, the coordinator's fence (a cancelled one resumes writes on the
//! source and is tried again) and release, and the reference verifier over the staged export,
//! the staged WAL and the target node's WAL.
//!
//! What it does not: choose what a scenario asserts in between, or time anything; every wait
//! is a generous deadline that fails the test.

use std::path::{Path, PathBuf};

use ferry_refnode::{export_base, generate_bulk, verify, RefWriter, RefWriterConfig, VerifyInput};
use ferry_wire::{Lsn, VShardId};
use serde_json::{json, Value};

use crate::daemons::{phase_is, Node, WAIT};
use crate::wait_for_writes_blocking;

/// The JSON-RPC code of `CutOverCancelled`.
pub const CUT_OVER_CANCELLED_CODE: i64 = -32004;
/// The JSON-RPC code of `FenceViolated`.
pub const FENCE_VIOLATED_CODE: i64 = -32005;

/// How a live migration is set up.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    pub writes_per_sec: u64,
    /// Filler bytes exported next to the vShard's base (the base copy's length).
    pub bulk_bytes: u64,
    /// The migration's own rate limit (0: none; the node's may still apply).
    pub rate_bytes_per_sec: u64,
    pub budget_us: u64,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions { writes_per_sec: 2_000, bulk_bytes: 1 << 20, rate_bytes_per_sec: 0, budget_us: 5_000_000 }
    }
}

/// One live migration: its writer, its base and its id.
#[derive(Debug)]
pub struct Live {
    pub id: String,
    pub writer: RefWriter,
    pub wal_dir: PathBuf,
    pub root: PathBuf,
    pub base_lsn: Lsn,
}

impl Live {
    /// Starts the writer in `dir/<id>-wal` (vShard `vshard` migrating), exports the base at its
    /// acknowledged LSN into `dir/<id>-export`, and starts the migration on `source` towards
    /// `target_address` (certificate name `target_node`). Returns once the start is accepted.
    pub fn start(
        source: &Node,
        dir: &Path,
        id: &str,
        vshard: u32,
        target: (&str, &str),
        options: &LiveOptions,
    ) -> Live {
        let (target_address, target_node) = target;
        let wal_dir = dir.join(format!("{id}-wal"));
        let config = RefWriterConfig {
            rate_writes_per_sec: options.writes_per_sec,
            roll_size_bytes: 256 << 10,
            ..RefWriterConfig::new(&wal_dir, VShardId(vshard))
        };
        let writer = RefWriter::start(config).unwrap();
        // Writes before the base export (a tenth of a second of them).
        wait_for_writes_blocking(&writer, (options.writes_per_sec / 10).max(1), WAIT).unwrap();
        let base_lsn = writer.acked_lsn();
        let root = dir.join(format!("{id}-export"));
        export_base(&root, VShardId(vshard), base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
        if options.bulk_bytes > 0 {
            generate_bulk(&root, options.bulk_bytes, 4).unwrap();
        }
        let params = json!({
            "migration_id": id, "vshard_id": vshard, "segments_root": root.display().to_string(),
            "wal_dir": wal_dir.display().to_string(), "base_lsn": base_lsn.0, "target_address": target_address,
            "target_node_id": target_node, "write_pause_budget_us": options.budget_us, "chunk_len_bytes": 65536,
            "streams": 2, "rate_limit_bytes_per_sec": options.rate_bytes_per_sec,
        });
        source.call("migration.start", params).unwrap_or_else(|e| panic!("{id}: start: {e:?}"));
        Live { id: id.to_owned(), writer, wal_dir, root, base_lsn }
    }

    /// The coordinator's fence: waits for WalCatchUp, pauses the writer and fences at its last
    /// acknowledged LSN. A cancelled (or violated) fence resumes writes on the source and is
    /// tried again after a quarter of a second of writes, at most `tries` times. Returns the
    /// `final_lsn` and the fence's answer; the writer stays paused.
    pub fn fence(&self, source: &Node, tries: u32) -> (Lsn, Value) {
        let mut failed_count = 0;
        loop {
            source.wait_for(&self.id, "WalCatchUp before a fence", phase_is("WalCatchUp"));
            let ticket = self.writer.pause().unwrap();
            let params = json!({
                "migration_id": self.id, "final_lsn": ticket.last_acked_lsn.0,
                "writes_paused_at_ns": ticket.paused_at_ns,
            });
            match source.call("migration.fence", params) {
                Ok(fenced) => return (ticket.last_acked_lsn, fenced),
                Err((code, message, _))
                    if (code == CUT_OVER_CANCELLED_CODE || code == FENCE_VIOLATED_CODE) && failed_count < tries =>
                {
                    failed_count += 1;
                    eprintln!("{}: fence {failed_count} did not complete ({message}); trying again", self.id);
                    self.writer.resume_on_source();
                    wait_for_writes_blocking(&self.writer, 500, WAIT).unwrap();
                }
                Err(e) => panic!("{}: fence: {e:?}", self.id),
            }
        }
    }

    /// The routing flip and the release: writes resume on the target node's WAL `node_wal`,
    /// then `migration.release` on `source`. Returns its answer.
    pub fn resume_and_release(&self, source: &Node, node_wal: &Path) -> Result<Value, (i64, String, Option<Value>)> {
        let resumed = self.writer.resume_on_target(node_wal).unwrap();
        source.call("migration.release", json!({ "migration_id": self.id, "writes_resumed_at_ns": resumed }))
    }

    /// Stops the writer (after a tenth of a second more of writes on the target) and counts
    /// every write of the vShard across `staging`, its export and `node_wal`: none lost, none
    /// twice, nothing unexpected. Returns how many writes were verified.
    pub fn verify(self, final_lsn: Lsn, staging: &Path, node_wal: &Path) -> u64 {
        let writes = (self.writer.acked_count() / 50).clamp(1, 200);
        wait_for_writes_blocking(&self.writer, writes, WAIT).unwrap();
        let log = self.writer.stop().unwrap();
        for span in log.pauses() {
            let acked = log.acks_between(span.paused_at_ns, span.resumed_at_ns.unwrap_or(u64::MAX));
            assert_eq!(acked, 0, "{}: writes acknowledged while paused: {span:?}", self.id);
        }
        let verification = verify(&VerifyInput {
            log: &log,
            base_lsn: self.base_lsn,
            final_lsn,
            staging_dir: staging,
            source_segments_root: &self.root,
            target_node_wal_dir: Some(node_wal),
        });
        assert!(verification.passed(), "{}: {verification:#?}", self.id);
        assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0), "{}", self.id);
        assert!(verification.from_staged_wal_count > 0, "{}: nothing came through the staged WAL", self.id);
        verification.expected_count
    }
}

/// A node's config rewritten to listen where it listens now, so a restarted daemon is reached
/// at the address its peers and migrations know; then the daemon is started again.
pub fn restart_in_place(node: &mut Node) {
    let text = std::fs::read_to_string(&node.config).unwrap();
    let pinned = text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", node.addr));
    std::fs::write(&node.config, pinned).unwrap();
    let config = node.config.clone();
    *node = Node::start(&config);
}

/// The staging's MANIFEST.json under a target data folder, as JSON (Null while there is none).
pub fn manifest(target_data: &Path, id: &str) -> Value {
    match std::fs::read_to_string(target_data.join("migrations").join(id).join("MANIFEST.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(_) => Value::Null,
    }
}

/// A seed from `var` when set, else from the clock; printed with the command that replays it.
pub fn seed(var: &str, test: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(text) => text.parse().unwrap_or_else(|e| panic!("{var}={text:?}: {e}")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            now.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(now.subsec_nanos())
        }
    };
    eprintln!("seed {seed}: replay with {var}={seed} cargo test -p ferry-tests --test {test}");
    seed
}

/// The randomized runs draw from the simulator's generator (SplitMix64).
pub use crate::sim::Rng;
