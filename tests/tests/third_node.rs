//! A third node, allowed to talk to the target, cannot release, abort or re-offer another
//! node's migration: not while no connection holds it, and not after the target restarts
//! (the staging's manifest records its source node).
//!
//! What it does not: test the allow-list itself (`tls_handshake.rs` does).
#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::Arc;

use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::request::{request_abort, request_release};
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_engine::transfer::TransferError;
use ferry_tests::{copy, node, request, tree_sha256, write_file, Certs};
use ferry_wire::{Lsn, MigrationId};

/// A target that allows `source` and `intruder`, staging into `data_dir`.
struct Scene {
    addr: std::net::SocketAddr,
    ctx: Arc<TargetContext>,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl Scene {
    fn start(certs: &Certs, data_dir: &Path) -> Scene {
        let identity = certs.identity("target");
        let crypto = ferry_engine::tls::server_crypto(&identity, &[node("source"), node("intruder")]).unwrap();
        let endpoint =
            ferry_engine::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &QuicTuning::default())
                .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let ctx = Arc::new(TargetContext::new(node("target"), data_dir.to_path_buf(), Arc::new(DiskStorage)));
        ctx.load_existing();
        let task = tokio::spawn(target::serve(endpoint.clone(), ctx.clone()));
        Scene { addr, ctx, endpoint, task }
    }

    fn stop(self) {
        self.endpoint.close(0u32.into(), b"restart");
        self.task.abort();
    }

    async fn abort_as(&self, certs: &Certs, who: &str) -> Result<(), TransferError> {
        let id = MigrationId::new("theirs").unwrap();
        let tuning = QuicTuning::default();
        request_abort(&certs.identity(who), &tuning, self.addr, &node("target"), &id, "test").await
    }

    async fn release_as(&self, certs: &Certs, who: &str) -> Result<(), TransferError> {
        let id = MigrationId::new("theirs").unwrap();
        let tuning = QuicTuning::default();
        request_release(&certs.identity(who), &tuning, self.addr, &node("target"), &id, Lsn(42), None).await
    }
}

fn refused_as_another_nodes(result: Result<(), TransferError>) {
    let e = result.expect_err("a third node was obeyed");
    assert!(e.to_string().contains("received from another node"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_node_cannot_release_abort_or_reoffer_another_nodes_migration_even_after_a_restart() {
    let certs = Certs::new().unwrap();
    certs::issue(certs.dir.path(), &node("intruder"), &IssueOptions::default()).unwrap();
    let (root, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_file(root.path(), "a.seg", 300_000, 1);
    let scene = Scene::start(&certs, data.path());

    // The source stages the base and leaves it `copying` (a live migration would fence next);
    // its connection is gone afterwards, so no claim protects the migration.
    let mut req = request("theirs", root.path(), scene.addr, 65536);
    req.commit = false;
    copy(&certs, req).await.unwrap();
    let staged = data.path().join("migrations/theirs");
    let manifest = std::fs::read_to_string(staged.join("MANIFEST.json")).unwrap();
    assert!(manifest.contains("\"source_node\": \"source\""), "{manifest}");

    refused_as_another_nodes(scene.abort_as(&certs, "intruder").await);
    refused_as_another_nodes(scene.release_as(&certs, "intruder").await);
    // Nor may it offer under the same id.
    let mut theirs = request("theirs", root.path(), scene.addr, 65536);
    theirs.commit = false;
    let rate = ferry_engine::transfer::source::RateHandle::new(0, 65536);
    let offered = ferry_engine::transfer::source::copy(
        &certs.identity("intruder"),
        &QuicTuning::default(),
        theirs,
        tokio::sync::watch::channel(Default::default()).0,
        rate,
    )
    .await;
    let e = offered.expect_err("a third node's offer under another node's id was taken");
    assert!(e.to_string().contains("received from another node"), "{e}");

    // After a restart the manifest still says whose migration it is.
    scene.stop();
    let scene = Scene::start(&certs, data.path());
    let known = scene.ctx.inbound();
    let theirs = known.get(&MigrationId::new("theirs").unwrap()).expect("listed after the restart");
    assert_eq!(theirs.migration.source_node.as_deref(), Some("source"));
    refused_as_another_nodes(scene.abort_as(&certs, "intruder").await);
    assert_eq!(tree_sha256(&staged.join("segments")).unwrap(), tree_sha256(root.path()).unwrap(), "left as it was");

    // The source itself may abort it.
    scene.abort_as(&certs, "source").await.unwrap();
    assert!(!staged.join("segments").exists());
    scene.stop();
}

/// Issue 18: the source node is known also for a staging interrupted during its base copy,
/// before `MANIFEST.json` exists (`.ferry/source_node` records it when the staging is
/// created): after a restart a third node can neither abort it nor resume it under the same
/// id, and the source can. A staging whose records cannot be read is refused to every peer
/// rather than aborted on a third node's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_node_cannot_abort_or_resume_a_base_copy_interrupted_by_a_restart() {
    let certs = Certs::new().unwrap();
    certs::issue(certs.dir.path(), &node("intruder"), &IssueOptions::default()).unwrap();
    let (root, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_file(root.path(), "a.seg", 4 << 20, 1);
    let scene = Scene::start(&certs, data.path());

    // A slow copy (256 KiB/s of a 4 MiB file), stopped a moment after its staging exists.
    let staged = data.path().join("migrations/theirs");
    let req = request("theirs", root.path(), scene.addr, 65536);
    let rate = ferry_engine::transfer::source::RateHandle::new(256 << 10, 65536);
    let identity = certs.identity("source");
    let copying = tokio::spawn(async move {
        let progress = tokio::sync::watch::channel(Default::default()).0;
        ferry_engine::transfer::source::copy(&identity, &QuicTuning::default(), req, progress, rate).await
    });
    ferry_tests::wait_until("the staging's chunk log", std::time::Duration::from_secs(30), || {
        staged.join(".ferry/chunks.log").exists()
    })
    .await
    .unwrap();
    copying.abort();
    let _ = copying.await;
    assert!(!staged.join("MANIFEST.json").exists(), "the base copy was not interrupted early enough");
    assert_eq!(std::fs::read_to_string(staged.join(".ferry/source_node")).unwrap(), "source");

    scene.stop();
    let scene = Scene::start(&certs, data.path());
    let theirs = scene.ctx.inbound();
    let theirs = theirs.get(&MigrationId::new("theirs").unwrap()).expect("listed after the restart");
    assert_eq!(theirs.migration.source_node.as_deref(), Some("source"));
    refused_as_another_nodes(scene.abort_as(&certs, "intruder").await);
    assert!(staged.join(".ferry/chunks.log").exists(), "the staging is left as it was");
    let offered = ferry_engine::transfer::source::copy(
        &certs.identity("intruder"),
        &QuicTuning::default(),
        request("theirs", root.path(), scene.addr, 65536),
        tokio::sync::watch::channel(Default::default()).0,
        ferry_engine::transfer::source::RateHandle::new(0, 65536),
    )
    .await;
    let e = offered.expect_err("a third node resumed another node's base copy");
    assert!(e.to_string().contains("received from another node"), "{e}");

    // A damaged record of the source node: nobody's word is taken for it.
    scene.stop();
    std::fs::write(staged.join(".ferry/source_node"), "not a node id!").unwrap();
    let scene = Scene::start(&certs, data.path());
    let e = scene.abort_as(&certs, "intruder").await.expect_err("aborted on a third node's word");
    assert!(e.to_string().contains("does not hold a node id"), "{e}");
    assert!(staged.join(".ferry/chunks.log").exists(), "the staging is left as it was");

    // Repaired, the source itself may abort it.
    scene.stop();
    std::fs::write(staged.join(".ferry/source_node"), "source").unwrap();
    let scene = Scene::start(&certs, data.path());
    scene.abort_as(&certs, "source").await.unwrap();
    assert!(!staged.join(".ferry/chunks.log").exists());
    scene.stop();
}
