//! Base copies through a lossy network: every datagram between source and target goes through
//! a [`Relay`] that drops, corrupts (one bit flipped), duplicates and reorders a share of
//! them, drawn from a printed seed. QUIC recovers the losses and its packet protection
//! refuses the corrupted datagrams; the copy must end byte-identical with nothing resent
//! beyond what its resume allows.
//!
//! And a path that black-holes for 5 s every 7 s during a copy.
//!
//! What it does not: run between network namespaces with real daemons, or stream a WAL tail
//! under loss (`multihost.rs` does both, as root), delay datagrams. These run without root,
//! in-process on loopback.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_tests::relay::{Faults, Relay};
use ferry_tests::{copy, node, request, tree_sha256, write_file, Certs};

/// Wall-time budget of each scenario: a deadline that fails the test, not a measurement.
const BUDGET: Duration = Duration::from_secs(240);

fn seed() -> u64 {
    std::env::var("FERRY_LOSSY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_0018)
}

/// Copies `files` (sizes in bytes) through a relay with `faults` (and, with `holes`, black
/// holes of `holes.0` every `holes.0 + holes.1`, at `rate` bytes/s); checks the staging
/// equals the source.
async fn copy_through(faults: Faults, files: &[usize], what: &str) {
    copy_with_holes(faults, files, what, None, 0).await;
}

async fn copy_with_holes(faults: Faults, files: &[usize], what: &str, holes: Option<(Duration, Duration)>, rate: u64) {
    let total: usize = files.iter().sum();
    println!(
        "{what}: seed {} (FERRY_LOSSY_SEED), {} MiB in {} files, budget {BUDGET:?}, {faults:?}",
        faults.seed,
        total >> 20,
        files.len()
    );
    let certs = Certs::new().unwrap();
    let (root, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (i, size) in files.iter().enumerate() {
        write_file(root.path(), &format!("seg/{i}.seg"), *size, faults.seed.wrapping_add(i as u64));
    }
    let crypto = ferry_engine::tls::server_crypto(&certs.identity("target"), &[node("source")]).unwrap();
    let server =
        ferry_engine::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &QuicTuning::default()).unwrap();
    let ctx = Arc::new(TargetContext::new(node("target"), data.path().to_path_buf(), Arc::new(DiskStorage)));
    let task = tokio::spawn(target::serve(server.clone(), ctx));
    let relay = Arc::new(Relay::start(server.local_addr().unwrap()).await.unwrap());
    relay.set_faults(Some(faults));
    let holes_count = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let holing = holes.map(|(on, off)| {
        let (relay, holes_count) = (relay.clone(), holes_count.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(off).await;
                relay.set_dropping(true);
                holes_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(on).await;
                relay.set_dropping(false);
            }
        })
    });

    let started = Instant::now();
    let mut req = request("lossy", root.path(), relay.addr, 256 << 10);
    req.connections_count = 2;
    req.rate_limit_bytes_per_sec = rate;
    let report = tokio::time::timeout(BUDGET, copy(&certs, req)).await.expect("over its budget").unwrap();
    if let Some(task) = holing {
        task.abort();
    }
    let counts = relay.counts();
    let holes_count = holes_count.load(std::sync::atomic::Ordering::Relaxed);
    println!("{what}: done in {:?}; {holes_count} black holes; relay {counts:?}; {report:?}", started.elapsed());
    assert!(holes.is_none() || holes_count >= 2, "the copy ended before two black holes: {holes_count}");
    assert!(counts.dropped_count > 0 || faults.drop_per_10k == 0, "nothing was dropped: {counts:?}");
    let staged = data.path().join("migrations/lossy/segments");
    assert_eq!(tree_sha256(&staged).unwrap(), tree_sha256(root.path()).unwrap(), "the staging differs from the source");
    server.close(0u32.into(), b"done");
    task.abort();
}

/// 2% of the datagrams lost and 2% corrupted each way, 1% duplicated and 1% reordered, during
/// a 64 MiB base copy on two connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_copy_through_loss_and_corruption_ends_byte_identical() {
    let faults =
        Faults { seed: seed(), drop_per_10k: 200, corrupt_per_10k: 200, duplicate_per_10k: 100, reorder_per_10k: 100 };
    copy_through(faults, &[24 << 20, 24 << 20, 16 << 20], "2% loss, 2% corrupt").await;
}

/// 30% of the datagrams lost from the first handshake on: the handshakes (of the control and
/// the chunk connection) are retried by QUIC until they pass, and the copy completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_through_thirty_percent_loss_complete() {
    let faults = Faults { seed: seed() ^ 1, drop_per_10k: 3_000, ..Faults::default() };
    copy_through(faults, &[1 << 20, 300_000], "30% loss").await;
}

/// The path black-holes for 5 s, then works for 2 s, over and over, during a copy paced to
/// last through at least two holes: QUIC rides each hole out (its idle timeout is longer),
/// and the copy ends byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_through_recurring_black_holes_ends_byte_identical() {
    let faults = Faults { seed: seed() ^ 2, ..Faults::default() };
    let holes = Some((Duration::from_secs(5), Duration::from_secs(2)));
    copy_with_holes(faults, &[8 << 20, 4 << 20], "black holes 5 s on, 2 s off", holes, 1 << 20).await;
}
