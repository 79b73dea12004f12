//! Live migrations over real `ferry serve` processes around the fence: a daemon killed during
//! a fence (source or target) cancels it and the next fence completes; a release after the
//! source daemon restarted completes a fence that completed; a refused re-copy under a
//! released id leaves the target as it was. Every write of the migrating vShard is verified
//! once, with the reference node.
//!
//! What it does not: time anything (every wait is a generous deadline that fails the test).

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use ferry_engine::control::ControlClient;
use ferry_refnode::{export_base, verify, RefWriter, RefWriterConfig, VerifyInput};
use ferry_tests::daemons::{cluster, phase_is, Cluster, Node, WAIT};
use ferry_tests::{wait_for_writes_blocking, write_file};
use ferry_wire::{Lsn, VShardId};
use serde_json::json;

/// A live migration with the reference writer on the source WAL and its base exported at
/// `base_lsn`; the migration is in WalCatchUp when this returns.
fn live_migration(c: &Cluster, id: &str) -> (std::sync::Arc<RefWriter>, PathBuf, Lsn) {
    let wal_dir = c._dir.path().join("wal");
    let mut config = RefWriterConfig::new(&wal_dir, VShardId(7));
    config.rate_writes_per_sec = 3_000;
    let writer = std::sync::Arc::new(RefWriter::start(config).unwrap());
    // Writes before the base export (200 ms of them).
    wait_for_writes_blocking(&writer, 600, WAIT).unwrap();
    let base_lsn = writer.acked_lsn();
    let root = c._dir.path().join("export-root");
    export_base(&root, VShardId(7), base_lsn, &writer.migrating_source_writes(base_lsn)).unwrap();
    let params = json!({
        "migration_id": id, "vshard_id": 7, "segments_root": root.display().to_string(),
        "wal_dir": wal_dir.display().to_string(), "base_lsn": base_lsn.0, "target_address": c.target.addr,
        "target_node_id": "target", "write_pause_budget_us": 5_000_000u64, "chunk_len_bytes": 65536,
    });
    c.source.call("migration.start", params).unwrap();
    c.source.wait_for(id, "WalCatchUp", phase_is("WalCatchUp"));
    (writer, root, base_lsn)
}

/// A fence that cannot drain (its final_lsn was never written), on a thread of its own: the
/// daemon dies under it. Returns the fence's answer: an error, whatever it is.
fn doomed_fence(socket: PathBuf, id: &str, final_lsn: u64) -> std::thread::JoinHandle<String> {
    let id = id.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = ControlClient::connect(&socket).await.unwrap();
            let params = json!({ "migration_id": id, "final_lsn": final_lsn });
            match client.call("migration.fence", params).await {
                Ok(v) => panic!("a fence that cannot drain succeeded: {v}"),
                Err(e) => e.to_string(),
            }
        })
    })
}

/// Ends a live migration with a real fence and release after the kill, then counts every write.
fn finish_and_verify(c: &Cluster, id: &str, writer: std::sync::Arc<RefWriter>, root: &Path, base_lsn: Lsn) {
    // As a coordinator does: a cancelled fence (the copy may still be reconnecting) resumes
    // writes on the source and is tried again.
    let mut tries = 0;
    let fenced = loop {
        c.source.wait_for(id, "WalCatchUp again", phase_is("WalCatchUp"));
        let ticket = writer.pause().unwrap();
        let params = json!({ "migration_id": id, "final_lsn": ticket.last_acked_lsn.0, "writes_paused_at_ns": ticket.paused_at_ns });
        match c.source.call("migration.fence", params) {
            Ok(fenced) => break fenced,
            Err((-32004, message, _)) if tries < 10 => {
                tries += 1;
                eprintln!("fence cancelled ({message}); retrying");
                writer.resume_on_source();
                // The writer runs again (500 ms of writes) before the next fence.
                wait_for_writes_blocking(&writer, 1_500, WAIT).unwrap();
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert!(fenced["final_lsn"].as_u64().is_some(), "{fenced}");
    assert_eq!(ferry_tests::manifest_json_when(&c.target_data, id, "fenced").unwrap()["state"], "fenced");
    let node_wal = c.target_data.join("node-wal");
    let resumed = writer.resume_on_target(&node_wal).unwrap();
    let released =
        c.source.call("migration.release", json!({ "migration_id": id, "writes_resumed_at_ns": resumed })).unwrap();
    assert_eq!(c.manifest_state(id), "released");
    // Writes on the target node (100 ms of them).
    wait_for_writes_blocking(&writer, 300, WAIT).unwrap();
    let writer = std::sync::Arc::try_unwrap(writer).unwrap_or_else(|_| panic!("the writer is shared"));
    let log = writer.stop().unwrap();
    let verification = verify(&VerifyInput {
        log: &log,
        base_lsn,
        final_lsn: Lsn(released["final_lsn"].as_u64().unwrap()),
        staging_dir: &c.staged(id),
        source_segments_root: root,
        target_node_wal_dir: Some(&node_wal),
    });
    assert!(verification.passed(), "{verification:?}");
    assert_eq!((verification.lost_count, verification.duplicate_count), (0, 0));
}

/// Which daemon a test kills during a fence.
#[derive(Clone, Copy, PartialEq)]
enum Killed {
    Source,
    Target,
}

/// Starts a fence that cannot drain, SIGKILLs `killed` under it, resumes writes on the source
/// (as a coordinator does when the fence fails) and restarts the daemon where it listened; the
/// next fence and release must then complete with every write once. Returns the failed fence's
/// error.
fn kill_during_a_fence(id: &str, killed: Killed) -> String {
    let mut c = cluster("", "", &[]);
    let (writer, root, base_lsn) = live_migration(&c, id);
    let ticket = writer.pause().unwrap();
    let fence = doomed_fence(c.source.socket.clone(), id, ticket.last_acked_lsn.0 + 1_000_000);
    c.source.wait_for(id, "AtomicCutOver", phase_is("AtomicCutOver"));
    let node = if killed == Killed::Source { &mut c.source } else { &mut c.target };
    node.signal(libc::SIGKILL);
    let error = fence.join().unwrap();
    writer.resume_on_source();
    assert_ne!(c.manifest_state(id), "released");
    let node = if killed == Killed::Source { &mut c.source } else { &mut c.target };
    // The restarted daemon listens where its peer reaches it.
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", node.addr)))
        .unwrap();
    let config = node.config.clone();
    *node = Node::start(&config);
    finish_and_verify(&c, id, writer, &root, base_lsn);
    error
}

/// SIGKILL of the source daemon during a fence: the coordinator's fence fails, writes resume on
/// the source, the restarted daemon resumes the migration in WalCatchUp (the fence cancelled),
/// and the next fence and release complete with every write once.
#[test]
fn a_source_daemon_killed_during_the_fence_restarts_cancelled_and_the_next_fence_completes() {
    let error = kill_during_a_fence("m-kill-src", Killed::Source);
    assert!(!error.is_empty());
}

/// SIGKILL of the target daemon during a fence: the fence is cancelled (`CutOverCancelled`),
/// writes resume on the source, the copy reconnects to the restarted target, and the next fence
/// and release complete with every write once.
#[test]
fn a_target_daemon_killed_during_the_fence_cancels_it_and_the_next_fence_completes() {
    let error = kill_during_a_fence("m-kill-tgt", Killed::Target);
    assert!(error.contains("-32004") || error.contains("cancelled"), "{error}");
}

/// SIGKILL of the source daemon after a completed fence and before the release: the restarted
/// daemon resumes the migration, and the coordinator's release still completes it, because the
/// target confirms its staging is fenced at exactly that final_lsn; nothing is lost.
#[test]
fn a_release_after_the_source_daemon_restarted_completes_a_fence_that_completed() {
    let mut c = cluster("", "", &[]);
    let (writer, root, base_lsn) = live_migration(&c, "m-kill-rel");
    let ticket = writer.pause().unwrap();
    let params = json!({ "migration_id": "m-kill-rel", "final_lsn": ticket.last_acked_lsn.0, "writes_paused_at_ns": ticket.paused_at_ns });
    c.source.call("migration.fence", params).unwrap();
    assert_eq!(ferry_tests::manifest_json_when(&c.target_data, "m-kill-rel", "fenced").unwrap()["state"], "fenced");
    let node_wal = c.target_data.join("node-wal");
    let resumed = writer.resume_on_target(&node_wal).unwrap();
    c.source.signal(libc::SIGKILL);
    let config = c.source.config.clone();
    c.source = Node::start(&config);
    let released = c
        .source
        .call("migration.release", json!({ "migration_id": "m-kill-rel", "writes_resumed_at_ns": resumed }))
        .unwrap();
    assert_eq!(released["final_lsn"], ticket.last_acked_lsn.0, "{released}");
    assert_eq!(c.manifest_state("m-kill-rel"), "released");
    assert_eq!(c.source.status("m-kill-rel")["phase"], "Completed");
    // Writes on the target node (100 ms of them).
    wait_for_writes_blocking(&writer, 300, WAIT).unwrap();
    let writer = std::sync::Arc::try_unwrap(writer).unwrap_or_else(|_| panic!("the writer is shared"));
    let log = writer.stop().unwrap();
    let verification = verify(&VerifyInput {
        log: &log,
        base_lsn,
        final_lsn: ticket.last_acked_lsn,
        staging_dir: &c.staged("m-kill-rel"),
        source_segments_root: &root,
        target_node_wal_dir: Some(&node_wal),
    });
    assert!(verification.passed(), "{verification:?}");
}

#[test]
fn a_refused_recopy_under_a_released_id_leaves_the_target_as_it_was() {
    // The phantom-migration sequence: a released migration's id offered again with other
    // files is refused; the target must still show it released, hold no admission slot for
    // it, and let it be forgotten.
    let c = cluster("", "max_inbound_migrations = 1", &[("a.seg", 1 << 20)]);
    c.source.call("migration.start", c.params("m-1", 1, 0)).unwrap();
    c.source.wait_for("m-1", "the first copy", phase_is("Completed"));
    c.target.wait_for("m-1", "the staging released", phase_is("Completed"));
    c.source.call("migration.forget", json!({ "migration_id": "m-1" })).unwrap();

    let other_root = c.source_root.parent().unwrap().join("other-shard");
    write_file(&other_root, "b.seg", 1 << 20, 9);
    let mut params = c.params("m-1", 1, 0);
    params["segments_root"] = json!(other_root.display().to_string());
    c.source.call("migration.start", params).unwrap();
    let refused = c.source.wait_for("m-1", "the refusal", phase_is("Failed"));
    assert!(refused["reason"].as_str().unwrap().contains("different or aborted"), "{refused}");

    let inbound = c.target.status("m-1");
    assert_eq!((inbound["phase"].as_str(), inbound["staging_state"].as_str()), (Some("Completed"), Some("released")));
    assert_eq!(c.manifest_state("m-1"), "released");
    let list = c.target.call("migration.list", json!({})).unwrap();
    let base_copies = list["migrations"].as_array().unwrap().iter().filter(|m| m["phase"] == "BaseCopy").count();
    assert_eq!(base_copies, 0, "{list}");

    // The only admission slot is free: a new migration is admitted and completes.
    c.source.call("migration.start", c.params("m-2", 2, 0)).unwrap();
    c.source.wait_for("m-2", "the second copy", phase_is("Completed"));
    c.target.call("migration.forget", json!({ "migration_id": "m-1" })).unwrap();
    assert!(!c.staged("m-1").exists());
}
