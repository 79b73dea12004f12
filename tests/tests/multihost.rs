//! Migrations between hosts over a lossy network: the source and target daemons (real `ferry
//! serve` processes) each run in a network namespace of their own ([`ferry_tests::netns`]),
//! joined to the test's namespace by a veth; a [`Relay`] in the test's namespace, bound on the
//! source's veth, forwards to the target's, so every datagram between the daemons crosses two
//! veths and the relay. The relay drops, corrupts, duplicates, reorders and black-holes
//! datagrams (this kernel has no netem); a link cut takes a veth down.
//!
//! Scenarios (issue 18, item 1), each printing its seed (`FERRY_MULTIHOST_SEED` replays it), its
//! shard size and its wall-time budget (a deadline that fails the test, not a measurement),
//! each ending byte-identical:
//! - 2% loss and 2% corruption during a base copy and a live WAL tail, then a fence and a
//!   release: 0 writes lost or duplicated per the reference verifier;
//! - 30% loss from the first handshake on: the connections establish and the copy completes;
//! - a black hole of 5 s on and 2 s off during a copy;
//! - link cuts (a veth down for longer than QUIC's idle timeout, so the connection dies) at
//!   random offsets: each resends at most one chunk per stream.
//!
//! What it does not: skip under `CI=true` (no root or no iproute2 fails there); delay
//! datagrams; run the 100 cuts of issue 18 by default (6 run; `FERRY_MULTIHOST_DROPS=100` is
//! the documented long run, see tests/README.md; `FERRY_MULTIHOST_BASE_MIB` sizes the live
//! scenario's base, 256 MiB by default). Both daemons run with a QUIC idle timeout of 1 s
//! (`quic_idle_timeout_ms`, a keep-alive every 200 ms), so a silent peer is seen within 1 s;
//! each cut lasts 1 s longer than that, so every cut kills its connections (asserted). The
//! 30%-loss scene keeps the default 5 s: quinn bounds each handshake by the idle timeout.
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_refnode::{export_base, generate_bulk, verify, RefWriter, RefWriterConfig, VerifyInput};
use ferry_tests::daemons::{write_config, Node};
use ferry_tests::netns::{hosts_or_skip, Host};
use ferry_tests::relay::{Faults, Relay};
use ferry_tests::{tree_sha256, wait_for_writes_blocking, write_file, Certs};
use ferry_wire::{Lsn, VShardId};
use serde_json::{json, Value};

const VSHARD: u32 = 7;
const CHUNK_LEN_BYTES: u64 = 256 << 10;
/// Both daemons' `quic_idle_timeout_ms`: a dropped link is seen within 1 s (issue 18).
const IDLE_TIMEOUT_MS: u32 = 1_000;
/// The default `quic_idle_timeout_ms`, for the scene whose handshakes cross 30% loss: quinn
/// bounds a handshake by the idle timeout too, and at 30% loss a handshake's retransmissions
/// often need more than 1 s (with 1 s, every attempt of a run timed out and the copy gave up).
const DEFAULT_IDLE_TIMEOUT_MS: u32 = 5_000;

fn seed() -> u64 {
    std::env::var("FERRY_MULTIHOST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_0118)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Two daemons on hosts of their own and the relay between them. Fields drop in order: the
/// daemons first, then the relay and its runtime, then the namespaces.
struct Scene {
    source: Node,
    _target: Node,
    relay: Arc<Relay>,
    _runtime: tokio::runtime::Runtime,
    /// The source's host, then the target's.
    hosts: Vec<Host>,
    _certs: Certs,
    dir: tempfile::TempDir,
    target_data: PathBuf,
    /// The source's metrics endpoint, then the target's (reached over their veths).
    metrics_addrs: [String; 2],
}

/// The scene, or `None` when namespaces cannot be made here (printed; a failure in CI); both
/// daemons run with `quic_idle_timeout_ms = idle_timeout_ms`.
fn scene(test: &str, idle_timeout_ms: u32) -> Option<Scene> {
    let hosts = hosts_or_skip(2, test)?;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new().unwrap();
    let target_data = dir.path().join("target-data");
    let config = |name: &str, data: &std::path::Path, host: &Host, extra: &str| {
        let extra = format!("metrics_addr = \"{}:0\"\nquic_idle_timeout_ms = {idle_timeout_ms}\n{extra}", host.ip);
        write_config(dir.path(), name, &certs, data, &format!("{}:0", host.ip), &extra)
    };
    let target_config = config("target", &target_data, &hosts[1], "allowed_peers = [\"source\"]");
    let source_config = config("source", &dir.path().join("source-data"), &hosts[0], "");
    let target = Node::start_via(&hosts[1].exec_prefix(), &target_config, &[]);
    let source = Node::start_via(&hosts[0].exec_prefix(), &source_config, &[]);
    let metrics =
        |node: &Node| node.line("metrics at http://").trim_start_matches("metrics at http://").replace("/metrics", "");
    let metrics_addrs = [metrics(&source), metrics(&target)];
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let upstream: SocketAddr = target.addr.parse().unwrap();
    let front = SocketAddr::from((hosts[0].host_ip, 0));
    let relay = Arc::new(runtime.block_on(Relay::start_at(front, upstream)).unwrap());
    Some(Scene {
        source,
        _target: target,
        relay,
        _runtime: runtime,
        hosts,
        _certs: certs,
        dir,
        target_data,
        metrics_addrs,
    })
}

impl Scene {
    /// The counter `name` (`ferry_bytes_sent_total`, ...) of the source (`0`) or target (`1`).
    fn counter(&self, which: usize, name: &str) -> u64 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.metrics_addrs[which]).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let line = text.lines().find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("shard")
    }

    /// `migration.start` of `id` through the relay, with `extra` fields added.
    fn start(&self, id: &str, extra: Value) {
        let mut params = json!({
            "migration_id": id, "vshard_id": VSHARD, "segments_root": self.root().display().to_string(),
            "target_address": self.relay.addr.to_string(), "target_node_id": "target",
            "chunk_len_bytes": CHUNK_LEN_BYTES, "streams": 2,
        });
        params.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.source.call("migration.start", params).unwrap();
    }

    /// Waits (within `budget`) until the source's status of `id` satisfies `done`; a failed
    /// migration fails the test at once.
    fn wait(&self, id: &str, what: &str, budget: Duration, done: impl Fn(&Value) -> bool) -> Value {
        self.source.wait_for_within(id, what, budget, |s| {
            assert_ne!(s["phase"], "Failed", "{id} failed while waiting for {what}: {s}");
            done(s)
        })
    }

    /// An offline copy of the files under the root, run to `Completed`: checks the staging
    /// equals the source; the source's final status.
    fn offline_copy(&self, id: &str, rate_bytes_per_sec: u64, budget: Duration) -> Value {
        self.start(id, json!({ "offline": true, "rate_limit_bytes_per_sec": rate_bytes_per_sec }));
        let done = self.wait(id, "Completed", budget, |s| s["phase"] == "Completed");
        let staged = self.target_data.join("migrations").join(id).join("segments");
        assert_eq!(tree_sha256(&staged).unwrap(), tree_sha256(&self.root()).unwrap(), "the staging differs");
        done
    }
}

fn announce(what: &str, shard_bytes: u64, budget: Duration, faults: &Faults) {
    println!(
        "{what}: seed {} (FERRY_MULTIHOST_SEED), shard {} MiB, budget {budget:?}, {faults:?}",
        faults.seed,
        shard_bytes >> 20
    );
}

/// 2% of the datagrams lost and 2% corrupted each way (1% duplicated, 1% reordered) during a
/// live migration's base copy, its WAL tail, its fence and its release: every acknowledged
/// write of the vShard arrives exactly once and the segments are byte-identical.
#[test]
fn loss_and_corruption_during_a_base_copy_and_a_live_tail_lose_nothing() {
    let base_bytes = env_u64("FERRY_MULTIHOST_BASE_MIB", 256) << 20;
    let budget = Duration::from_secs(180 + (base_bytes >> 20));
    let faults =
        Faults { seed: seed(), drop_per_10k: 200, corrupt_per_10k: 200, duplicate_per_10k: 100, reorder_per_10k: 100 };
    let Some(s) = scene("loss and corruption, live", IDLE_TIMEOUT_MS) else { return };
    announce("2% loss, 2% corrupt, live (FERRY_MULTIHOST_BASE_MIB)", base_bytes, budget, &faults);
    let started = Instant::now();
    let wal_dir = s.dir.path().join("wal");
    let writer = RefWriter::start(RefWriterConfig {
        rate_writes_per_sec: 2_000,
        ..RefWriterConfig::new(&wal_dir, VShardId(VSHARD))
    })
    .unwrap();
    wait_for_writes_blocking(&writer, 400, budget).unwrap();
    let base_lsn = writer.acked_lsn();
    export_base(&s.root(), VShardId(VSHARD), base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
    generate_bulk(&s.root(), base_bytes, 4).unwrap();
    s.relay.set_faults(Some(faults));
    let id = "lossy-live";
    s.start(
        id,
        json!({
            "wal_dir": wal_dir.display().to_string(), "base_lsn": base_lsn.0, "write_pause_budget_us": 5_000_000u64,
            "connections": 2, "streams": 4,
        }),
    );
    s.wait(id, "WalCatchUp", budget, |st| st["phase"] == "WalCatchUp");
    println!("base copied after {:?}; relay {:?}", started.elapsed(), s.relay.counts());
    // The tail under loss: a second of writes more, then the target durable up to them.
    wait_for_writes_blocking(&writer, 2_000, budget).unwrap();
    let acked = writer.acked_lsn().0;
    s.wait(id, "the tail to catch up", budget, |st| st["wal"]["current_lsn"].as_u64() >= Some(acked));
    let final_lsn = fence_and_release(&s, id, &writer, budget);
    let log = writer.stop().unwrap();
    let verification = verify(&VerifyInput {
        log: &log,
        base_lsn,
        final_lsn,
        staging_dir: &s.target_data.join("migrations").join(id),
        source_segments_root: &s.root(),
        target_node_wal_dir: Some(&s.target_data.join("node-wal")),
    });
    let counts = s.relay.counts();
    println!("done in {:?}; relay {counts:?}; {verification:?}", started.elapsed());
    assert!(verification.passed(), "{verification:?}");
    assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0));
    assert!(verification.from_staged_wal_count > 0, "no write came through the tail: {verification:?}");
    assert!(counts.dropped_count > 0 && counts.corrupted_count > 0, "the relay damaged nothing: {counts:?}");
}

/// Pauses the writer and fences at its last acknowledged LSN (a fence cancelled by the lossy
/// path resumes writes on the source and is tried again, as a coordinator does), resumes the
/// writer on the target and releases; the final LSN.
fn fence_and_release(s: &Scene, id: &str, writer: &RefWriter, budget: Duration) -> Lsn {
    let mut cancelled_count = 0;
    let fenced = loop {
        let ticket = writer.pause().unwrap();
        let params = json!({ "migration_id": id, "final_lsn": ticket.last_acked_lsn.0, "writes_paused_at_ns": ticket.paused_at_ns });
        match s.source.call("migration.fence", params) {
            Ok(fenced) => break fenced,
            Err((-32004, message, _)) if cancelled_count < 10 => {
                cancelled_count += 1;
                println!("fence cancelled ({message}); trying again");
                writer.resume_on_source();
                s.wait(id, "WalCatchUp again", budget, |st| st["phase"] == "WalCatchUp");
                wait_for_writes_blocking(writer, 1_000, budget).unwrap();
            }
            Err(e) => panic!("fence: {e:?}"),
        }
    };
    let resumed = writer.resume_on_target(&s.target_data.join("node-wal")).unwrap();
    let released = s.source.call("migration.release", json!({ "migration_id": id, "writes_resumed_at_ns": resumed }));
    let released = released.unwrap_or_else(|e| panic!("release after {fenced}: {e:?}"));
    // Writes on the target node (100 ms of them), counted by the verifier too.
    wait_for_writes_blocking(writer, 200, budget).unwrap();
    Lsn(released["final_lsn"].as_u64().unwrap())
}

/// 30% of the datagrams lost from the first handshake on: QUIC retries the handshakes of every
/// connection until they pass, and the copy completes byte-identical.
#[test]
fn handshakes_through_thirty_percent_loss_complete() {
    // Measured 6 to 98 s (QUIC's backoff under this loss, and a handshake the target timed out
    // now and then, retried by the source).
    let budget = Duration::from_secs(240);
    let faults = Faults { seed: seed() ^ 1, drop_per_10k: 3_000, ..Faults::default() };
    let Some(s) = scene("30% loss", DEFAULT_IDLE_TIMEOUT_MS) else { return };
    announce("30% loss through the handshakes", (1 << 20) + 300_000, budget, &faults);
    write_file(&s.root(), "L1/a.seg", 1 << 20, faults.seed);
    write_file(&s.root(), "L2/b.seg", 300_000, faults.seed + 1);
    s.relay.set_faults(Some(faults));
    let started = Instant::now();
    let done = s.offline_copy("lossy-handshakes", 0, budget);
    let counts = s.relay.counts();
    println!("done in {:?}; relay {counts:?}; {done}", started.elapsed());
    assert!(counts.dropped_count > 0, "nothing was dropped: {counts:?}");
}

/// The path black-holes for 5 s, then works for 2 s, over and over, during a copy paced to
/// last through at least two holes: the copy rides them out (or reconnects after one that
/// outlasts QUIC's idle timeout) and ends byte-identical.
#[test]
fn a_copy_through_recurring_black_holes_ends_byte_identical() {
    let budget = Duration::from_secs(150);
    let faults = Faults { seed: seed() ^ 2, ..Faults::default() };
    let Some(s) = scene("black holes", IDLE_TIMEOUT_MS) else { return };
    // 6 MiB at 1 MiB/s: more than two open windows of 2 s each.
    announce("black holes 5 s on, 2 s off", 6 << 20, budget, &faults);
    write_file(&s.root(), "L1/a.seg", 4 << 20, faults.seed);
    write_file(&s.root(), "L1/b.seg", 2 << 20, faults.seed + 1);
    let (stop, holes_count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU32::new(0)));
    let holing = {
        let (relay, stop, holes_count) = (s.relay.clone(), stop.clone(), holes_count.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                // The fault schedule (2 s open, 5 s black), not a wait.
                std::thread::sleep(Duration::from_secs(2));
                relay.set_dropping(true);
                holes_count.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(5));
                relay.set_dropping(false);
            }
        })
    };
    let started = Instant::now();
    let done = s.offline_copy("black-holes", 1 << 20, budget);
    stop.store(true, Ordering::Release);
    holing.join().unwrap();
    let holes_count = holes_count.load(Ordering::Relaxed);
    println!("done in {:?}; {holes_count} black holes; relay {:?}; {done}", started.elapsed(), s.relay.counts());
    assert!(holes_count >= 2, "the copy ended before two black holes: {holes_count}");
}

/// The link is cut (a veth down, on the source's side or the target's, drawn from the seed)
/// at random offsets of a copy, each time for longer than QUIC's idle timeout, so the
/// connection dies and the copy reconnects once the link is back: it ends byte-identical,
/// having resent at most one chunk per stream per cut. Before each cut the copy has moved
/// since the last one came back, so a connection is live to be cut.
#[test]
fn link_cuts_at_random_offsets_resend_at_most_one_chunk_per_stream_each() {
    let cuts_count = env_u64("FERRY_MULTIHOST_DROPS", 6);
    let streams = 2u64;
    let down = Duration::from_millis(u64::from(IDLE_TIMEOUT_MS) + 1_000);
    // Each cut: the link down, then a reconnection and a slot of copying.
    let budget = Duration::from_secs(60) + (down + Duration::from_secs(6)) * cuts_count as u32;
    let mut rng = seed() ^ 3;
    let faults = Faults { seed: rng, ..Faults::default() };
    let Some(s) = scene("link cuts", IDLE_TIMEOUT_MS) else { return };
    let slot_bytes = 3u64 << 20;
    let total_bytes = cuts_count * slot_bytes + (4 << 20);
    announce(&format!("{cuts_count} link cuts (FERRY_MULTIHOST_DROPS)"), total_bytes, budget, &faults);
    for i in 0..4 {
        write_file(&s.root(), &format!("seg/{i}.seg"), (total_bytes / 4) as usize, rng.wrapping_add(i));
    }
    // A point in each slot, at least 2 MiB before its end.
    let points: Vec<u64> =
        (0..cuts_count).map(|i| i * slot_bytes + next(&mut rng) % (slot_bytes - (2 << 20))).collect();
    let id = "link-cuts";
    let started = Instant::now();
    s.start(id, json!({ "offline": true, "rate_limit_bytes_per_sec": 8u64 << 20, "streams": streams }));
    let mut moved_from = 0u64;
    for (i, point) in points.iter().enumerate() {
        let what = format!("{point} bytes copied, more than {moved_from} (cut {i})");
        let st = s.wait(id, &what, budget, |st| {
            let bytes = st["bytes_transferred"].as_u64().unwrap_or(0);
            (bytes >= *point && bytes > moved_from) || st["phase"] == "Completed"
        });
        assert_ne!(st["phase"], "Completed", "the copy ended before cut {i}: {st}");
        let host = &s.hosts[(next(&mut rng) % 2) as usize];
        println!(
            "cut {i}: {} of {} bytes copied, the veth of {} down",
            st["bytes_transferred"], total_bytes, host.name
        );
        host.set_link(false).unwrap();
        // The cut's length (past the idle timeout), not a wait for an event.
        std::thread::sleep(down);
        host.set_link(true).unwrap();
        moved_from = s.source.status(id)["bytes_transferred"].as_u64().unwrap();
    }
    let done = s.wait(id, "Completed", budget, |st| st["phase"] == "Completed");
    let staged = s.target_data.join("migrations").join(id).join("segments");
    assert_eq!(tree_sha256(&staged).unwrap(), tree_sha256(&s.root()).unwrap(), "the staging differs");
    let counts = s.relay.counts();
    let resent = done["bytes_resent"].as_u64().unwrap();
    println!("done in {:?}; {cuts_count} cuts, {resent} bytes resent; relay {counts:?}", started.elapsed());
    let bound = cuts_count * streams * CHUNK_LEN_BYTES;
    let sent = s.counter(0, "ferry_bytes_sent_total");
    let received = s.counter(1, "ferry_bytes_received_total");
    // Sent counts what went into connections that then died (up to a flow-control window a
    // cut): printed, not bounded. What the target received is what DESIGN section 8 bounds.
    println!("{sent} chunk bytes sent, {received} received, for {total_bytes}; bound {bound} over it");
    assert!(resent <= bound, "resent {resent} bytes over {cuts_count} cuts, bound {bound}");
    // The same bound on what the target daemon really received (its own counter, read apart
    // from the source's report).
    assert!(received <= total_bytes + bound, "received {received} bytes for {total_bytes}, bound {bound} over it");
    // Each connection opens a UDP socket of its own: a cut that killed its connection brought a
    // new sender to the relay.
    assert!(
        counts.senders_count > cuts_count,
        "{} senders for {cuts_count} cuts: a cut did not reconnect",
        counts.senders_count
    );
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
