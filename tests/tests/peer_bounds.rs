//! One peer cannot hold more than `PEER_CONNECTIONS_MAX` connections to a target: the next
//! is closed at once with a `refused` error naming the peer, while the ones it holds, and
//! another node's, go on.
//!
//! What it does not: measure memory (the budget per connection is in `wire::limits`).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::certs::{self, IssueOptions};
use ferry_engine::quic::QuicTuning;
use ferry_engine::storage::DiskStorage;
use ferry_engine::transfer::target::{self, TargetContext};
use ferry_tests::{node, Certs};
use ferry_wire::limits::PEER_CONNECTIONS_MAX;

async fn connect(
    endpoint: &quinn::Endpoint,
    certs: &Certs,
    who: &str,
    addr: std::net::SocketAddr,
) -> quinn::Connection {
    let tuning = QuicTuning::default();
    let crypto = ferry_engine::tls::client_crypto(&certs.identity(who)).unwrap();
    let config = ferry_engine::quic::client_config(crypto, &tuning);
    endpoint.connect_with(config, addr, "target").unwrap().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_connection_cap_is_refused_and_others_go_on() {
    let certs = Certs::new().unwrap();
    certs::issue(certs.dir.path(), &node("greedy"), &IssueOptions::default()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let crypto =
        ferry_engine::tls::server_crypto(&certs.identity("target"), &[node("source"), node("greedy")]).unwrap();
    let server =
        ferry_engine::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &QuicTuning::default()).unwrap();
    let addr = server.local_addr().unwrap();
    let ctx = Arc::new(TargetContext::new(node("target"), data.path().to_path_buf(), Arc::new(DiskStorage)));
    let task = tokio::spawn(target::serve(server.clone(), ctx));

    let client = ferry_engine::quic::client_endpoint(addr, &QuicTuning::default()).unwrap();
    let mut held = Vec::new();
    for _ in 0..PEER_CONNECTIONS_MAX {
        held.push(connect(&client, &certs, "greedy", addr).await);
    }
    let extra = connect(&client, &certs, "greedy", addr).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .expect("the extra connection was not closed");
    let text = closed.to_string();
    assert!(
        text.contains("node greedy holds") && text.contains(&PEER_CONNECTIONS_MAX.to_string()),
        "the refusal does not say why: {text}"
    );
    // The connections it holds are still open, and another node still gets in.
    assert!(held.iter().all(|c| c.close_reason().is_none()));
    let other = connect(&client, &certs, "source", addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(other.close_reason().is_none(), "{:?}", other.close_reason());
    // Once one closes, the peer may connect again.
    held.pop().unwrap().close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = connect(&client, &certs, "greedy", addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(again.close_reason().is_none(), "{:?}", again.close_reason());
    server.close(0u32.into(), b"done");
    task.abort();
}
