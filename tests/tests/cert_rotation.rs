//! Rotating the cluster CA while a migration runs, with an overlap, each step a SIGHUP to both
//! `ferry serve` processes: trust old and new (`ca.pem` holds both), swap the node
//! certificates to ones the new CA signed, drop the old CA. Nothing may be lost: the migration
//! that started under the old CA completes byte-identical, also across a target restart made
//! after the old CA is gone (its reconnection handshakes with the new certificates only), new
//! migrations start at each step, and a node still holding only the old CA's certificate is
//! refused at the end.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use ferry_engine::certs::{self, IssueOptions};
use ferry_tests::daemons::{phase_is, write_config, Node};
use ferry_tests::{ferry_copy_command, node, tree_sha256, write_file, Certs};
use serde_json::json;

/// Sends SIGHUP to a running daemon and waits for it to say it reloaded.
fn reload(daemon: &Node) {
    let pid = daemon.child.as_ref().unwrap().id();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    daemon.line("certificates reloaded");
}

/// Copies `name`'s certificate and key from `from` into `to` (the daemons' certificate folder).
fn install_node_cert(from: &Path, to: &Path, name: &str) {
    for file in [certs::node_cert_file(&node(name)), certs::node_key_file(&node(name))] {
        std::fs::copy(from.join(&file), to.join(&file)).unwrap();
    }
}

/// A UDP port free at the time of asking (the target restarts on it).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_cluster_ca_rotates_mid_migration_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    // The daemons' certificate folder, made by the old CA.
    let shared = Certs::new().unwrap();
    let old_ca_pem = std::fs::read(shared.dir.path().join(certs::CA_CERT_FILE)).unwrap();
    // A copy of the old identities, for the node that is left behind.
    let old_only = Certs { dir: tempfile::tempdir().unwrap() };
    for file in ["ca.pem", "source.pem", "source-key.pem"] {
        std::fs::copy(shared.dir.path().join(file), old_only.dir.path().join(file)).unwrap();
    }
    // The new CA and node certificates it signs, made apart.
    let new = tempfile::tempdir().unwrap();
    certs::init_ca(new.path(), false).unwrap();
    for name in ["source", "target"] {
        certs::issue(new.path(), &node(name), &IssueOptions::default()).unwrap();
    }
    let new_ca_pem = std::fs::read(new.path().join(certs::CA_CERT_FILE)).unwrap();

    let root = dir.path().join("shard");
    write_file(&root, "L1/big.seg", 24 << 20, 1);
    write_file(&root, "small.seg", 300_000, 2);
    let target_data = dir.path().join("target-data");
    let target_listen = format!("127.0.0.1:{}", free_udp_port());
    let target_config =
        write_config(dir.path(), "target", &shared, &target_data, &target_listen, "allowed_peers = [\"source\"]\n");
    let source_config = write_config(dir.path(), "source", &shared, &dir.path().join("source-data"), "127.0.0.1:0", "");
    let mut target = Node::start(&target_config);
    let source = Node::start(&source_config);
    let params = |id: &str, vshard: u32, rate: u64| {
        json!({
            "migration_id": id, "vshard_id": vshard, "segments_root": root.display().to_string(),
            "target_address": target_listen, "target_node_id": "target", "offline": true,
            "rate_limit_bytes_per_sec": rate, "chunk_len_bytes": 262144, "streams": 2,
        })
    };

    // About 6 s of copy at 4 MiB/s: it spans every step below.
    source.call("migration.start", params("m-long", 1, 4 << 20)).unwrap();
    source.wait_for("m-long", "bytes moving", |s| s["bytes_transferred"].as_u64() > Some(0));

    // 1. Overlap: both CAs trusted.
    let both: Vec<u8> = [old_ca_pem.as_slice(), new_ca_pem.as_slice()].concat();
    std::fs::write(shared.dir.path().join(certs::CA_CERT_FILE), both).unwrap();
    reload(&source);
    reload(&target);
    source.call("migration.start", params("m-overlap", 2, 0)).unwrap();
    source.wait_for("m-overlap", "Completed", phase_is("Completed"));

    // 2. Swap the node certificates to the new CA's.
    install_node_cert(new.path(), shared.dir.path(), "source");
    install_node_cert(new.path(), shared.dir.path(), "target");
    reload(&source);
    reload(&target);
    source.call("migration.start", params("m-swapped", 3, 0)).unwrap();
    source.wait_for("m-swapped", "Completed", phase_is("Completed"));

    // 3. Drop the old CA.
    std::fs::write(shared.dir.path().join(certs::CA_CERT_FILE), &new_ca_pem).unwrap();
    reload(&source);
    reload(&target);
    source.call("migration.start", params("m-new-only", 4, 0)).unwrap();
    source.wait_for("m-new-only", "Completed", phase_is("Completed"));

    // The long migration is still running on its first connection: restart the target so it
    // reconnects and resumes under the new CA alone.
    let before = source.status("m-long");
    assert_ne!(before["phase"], "Completed", "the long migration ended before the rotation did: {before}");
    target.signal(libc::SIGKILL);
    let target = Node::start(&target_config);
    source.wait_for("m-long", "Completed", phase_is("Completed"));
    for id in ["m-long", "m-overlap", "m-swapped", "m-new-only"] {
        let staged = target_data.join("migrations").join(id).join("segments");
        assert_eq!(tree_sha256(&staged).unwrap(), tree_sha256(&root).unwrap(), "{id}");
    }

    // A node still holding only the old CA's certificate is refused, at once and by name.
    let out = ferry_copy_command(&old_only, &root, &target.addr, "m-left-behind")
        .args(["--chunk-len", "256KiB", "--retry-deadline-secs", "20"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a copy with the old CA's certificate succeeded: {stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    drop(target);
}
