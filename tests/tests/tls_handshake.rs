//! Mutual-TLS handshakes over real quinn endpoints on 127.0.0.1.
//!
//! What it checks: a node with a certificate from the cluster CA, in the server's allow-list,
//! speaking `ferry/1`, connects and exchanges a byte; every other peer is refused at the
//! handshake (no certificate, another CA on either side, another name than dialled, a node
//! outside the allow-list, an expired certificate, another ALPN). For each refusal the client
//! cannot exchange data and the server's accept loop never gets a connection, and after the
//! refusals the same server still serves a good client.
//!
//! What it does not: test frames, versions or transfers (other scenarios do), or timing.
//! Every await has a timeout so a wrong behaviour fails the test instead of hanging it.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_engine::certs::{self, init_ca, issue, IssueOptions};
use ferry_engine::tls::{self, NodeIdentity, ALPN};
use ferry_wire::ids::NodeId;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Endpoint, ServerConfig};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(86_400);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// The server is node-a; node-b and node-old are allowed to connect to it; node-c is in the
/// cluster but not allowed. `other` is a second CA with its own node-a and node-b.
struct Cluster {
    cluster: TempDir,
    other: TempDir,
}

impl Cluster {
    fn new() -> Self {
        let cluster = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        init_ca(cluster.path(), false).unwrap();
        init_ca(other.path(), false).unwrap();
        for name in ["node-a", "node-b", "node-c"] {
            issue(cluster.path(), &node(name), &IssueOptions::default()).unwrap();
        }
        let now = SystemTime::now();
        let expired =
            IssueOptions { not_before: Some(now - 2 * DAY), not_after: Some(now - DAY), ..IssueOptions::default() };
        issue(cluster.path(), &node("node-old"), &expired).unwrap();
        for name in ["node-a", "node-b"] {
            issue(other.path(), &node(name), &IssueOptions::default()).unwrap();
        }
        Self { cluster, other }
    }

    fn allowed() -> Vec<NodeId> {
        vec![node("node-b"), node("node-old")]
    }

    fn identity(&self, name: &str) -> NodeIdentity {
        NodeIdentity::from_dir(self.cluster.path(), &node(name)).unwrap()
    }

    /// Trusts the cluster CA but holds a certificate from the other CA.
    fn foreign_identity(&self, name: &str) -> NodeIdentity {
        let name = node(name);
        let other: &Path = self.other.path();
        NodeIdentity::load(
            &self.cluster.path().join(certs::CA_CERT_FILE),
            &other.join(certs::node_cert_file(&name)),
            &other.join(certs::node_key_file(&name)),
        )
        .unwrap()
    }

    fn client(&self, name: &str) -> Arc<QuicClientConfig> {
        tls::client_crypto(&self.identity(name)).unwrap()
    }
}

/// What the server's accept loop made of one incoming connection.
#[derive(Debug)]
enum Accepted {
    Connection { peer: Option<NodeId> },
    Refused(String),
}

/// A node-a endpoint that accepts every incoming connection, reports it, and answers one
/// byte `b` with `b + 1` on the first bidirectional stream.
struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Accepted>,
}

impl Server {
    fn start(identity: &NodeIdentity, allowed: &[NodeId]) -> Self {
        let crypto = tls::server_crypto(identity, allowed).unwrap();
        let config = ServerConfig::with_crypto(crypto);
        let endpoint = Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, outcomes) = mpsc::unbounded_channel();
        let accept = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => {
                            let _ = tx.send(Accepted::Connection { peer: tls::peer_node_id(&conn) });
                            let _ = timeout(WAIT, echo_one_byte(&conn)).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Accepted::Refused(e.to_string()));
                        }
                    }
                });
            }
        });
        Self { endpoint, addr, outcomes }
    }

    async fn next(&mut self) -> Accepted {
        match timeout(WAIT, self.outcomes.recv()).await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => panic!("server accept loop ended"),
            Err(_) => panic!("server saw no incoming connection within {WAIT:?}"),
        }
    }

    /// The next incoming connection must have been refused, for a reason naming `why`.
    async fn assert_refused(&mut self, why: &str) {
        match self.next().await {
            Accepted::Refused(reason) => {
                eprintln!("server refused as expected: {reason}");
                assert!(reason.to_lowercase().contains(why), "refused for {reason:?}, expected {why:?}")
            }
            Accepted::Connection { peer } => panic!("server got a connection from {peer:?}"),
        }
    }

    async fn assert_accepted(&mut self, expected: &str) {
        match self.next().await {
            Accepted::Connection { peer } => assert_eq!(peer, Some(node(expected))),
            Accepted::Refused(reason) => panic!("server refused a good client: {reason}"),
        }
        assert!(self.outcomes.try_recv().is_err(), "server saw an extra connection");
    }
}

async fn echo_one_byte(conn: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut byte = [0u8; 1];
    recv.read_exact(&mut byte).await?;
    send.write_all(&[byte[0].wrapping_add(1)]).await?;
    send.finish()?;
    conn.closed().await;
    Ok(())
}

/// What a client saw: a full exchange (with the server's node id), or the step that failed.
#[derive(Debug)]
enum Exchange {
    Done { server: Option<NodeId> },
    Failed(String),
}

/// Connects to `addr` expecting `server_name`, sends 41 and expects 42 back. A failure after
/// the handshake reports why the connection closed, as a user of `quinn::Connection` would.
async fn exchange(crypto: Arc<QuicClientConfig>, addr: SocketAddr, server_name: &str) -> Exchange {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let result = timeout(WAIT, async {
        let connecting = endpoint.connect_with(ClientConfig::new(crypto), addr, server_name)?;
        let conn = connecting.await.map_err(|e| anyhow::anyhow!("connect: {e}"))?;
        let closed = |step: &str| {
            let reason = conn.close_reason().map(|e| e.to_string());
            anyhow::anyhow!("{step}: {}", reason.unwrap_or_else(|| "no close reason".into()))
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|_| closed("open"))?;
        send.write_all(&[41]).await.map_err(|_| closed("write"))?;
        send.finish().map_err(|_| closed("finish"))?;
        let mut byte = [0u8; 1];
        recv.read_exact(&mut byte).await.map_err(|_| closed("read"))?;
        anyhow::ensure!(byte == [42], "server answered {byte:?}");
        let server = tls::peer_node_id(&conn);
        conn.close(0u32.into(), b"done");
        Ok(server)
    })
    .await;
    let outcome = match result {
        Ok(Ok(server)) => Exchange::Done { server },
        Ok(Err(e)) => Exchange::Failed(e.to_string()),
        Err(_) => panic!("client neither exchanged nor failed within {WAIT:?}"),
    };
    let _ = timeout(WAIT, endpoint.wait_idle()).await;
    outcome
}

fn assert_client_failed(outcome: &Exchange) {
    match outcome {
        Exchange::Failed(reason) => {
            eprintln!("client failed as expected: {reason}");
            assert!(reason.contains("handshake failed"), "client failed for {reason:?}");
        }
        Exchange::Done { server } => panic!("client exchanged data with {server:?}"),
    }
}

async fn assert_good_client(cluster: &Cluster, server: &mut Server) {
    let outcome = exchange(cluster.client("node-b"), server.addr, "node-a").await;
    match outcome {
        Exchange::Done { server: peer } => assert_eq!(peer, Some(node("node-a"))),
        Exchange::Failed(e) => panic!("good client failed: {e}"),
    }
    server.assert_accepted("node-b").await;
}

fn rustls_client(cluster: &Cluster) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cluster.identity("node-b").ca_certs() {
        roots.add(ca.clone()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
}

fn quic_client(config: rustls::ClientConfig) -> Arc<QuicClientConfig> {
    Arc::new(QuicClientConfig::try_from(config).unwrap())
}

/// Each way a handshake must be refused, and a fragment of the reason the server logs.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NoClientCert,
    ClientFromOtherCa,
    ServerFromOtherCa,
    WrongServerName,
    PeerNotAllowed,
    ExpiredClientCert,
    OtherAlpn,
}

const REFUSALS: [Refusal; 7] = [
    Refusal::NoClientCert,
    Refusal::ClientFromOtherCa,
    Refusal::ServerFromOtherCa,
    Refusal::WrongServerName,
    Refusal::PeerNotAllowed,
    Refusal::ExpiredClientCert,
    Refusal::OtherAlpn,
];

/// Runs one refused handshake against `server` (or, for a server from another CA, against an
/// impostor) and asserts both sides saw the refusal.
async fn assert_refusal(cluster: &Cluster, server: &mut Server, case: Refusal) {
    let (client, name, why) = match case {
        Refusal::NoClientCert => {
            let mut config = rustls_client(cluster).with_no_client_auth();
            config.alpn_protocols = vec![ALPN.to_vec()];
            (quic_client(config), "node-a", "no certificates")
        }
        Refusal::ClientFromOtherCa => {
            let crypto = tls::client_crypto(&cluster.foreign_identity("node-b")).unwrap();
            (crypto, "node-a", "unknownissuer")
        }
        Refusal::ServerFromOtherCa => {
            let mut impostor = Server::start(&cluster.foreign_identity("node-a"), &Cluster::allowed());
            let outcome = exchange(cluster.client("node-b"), impostor.addr, "node-a").await;
            assert_client_failed(&outcome);
            impostor.assert_refused("unknownissuer").await;
            impostor.endpoint.close(0u32.into(), b"done");
            return;
        }
        Refusal::WrongServerName => (cluster.client("node-b"), "node-c", "not valid for name"),
        // A plain message naming the refused node (no `Other(OtherError(..))` debug text).
        Refusal::PeerNotAllowed => (
            cluster.client("node-c"),
            "node-a",
            "other error: node node-c is not in this server's allow-list (node-b, node-old)",
        ),
        Refusal::ExpiredClientCert => (cluster.client("node-old"), "node-a", "expired"),
        Refusal::OtherAlpn => {
            let mut config = tls::client_tls_config(&cluster.identity("node-b")).unwrap();
            config.alpn_protocols = vec![b"ferry/2".to_vec()];
            (quic_client(config), "node-a", "known protocol")
        }
    };
    let outcome = exchange(client, server.addr, name).await;
    assert_client_failed(&outcome);
    server.assert_refused(why).await;
}

fn start_server(cluster: &Cluster) -> Server {
    Server::start(&cluster.identity("node-a"), &Cluster::allowed())
}

async fn refused_then_good_client_served(case: Refusal) {
    let cluster = Cluster::new();
    let mut server = start_server(&cluster);
    assert_refusal(&cluster, &mut server, case).await;
    assert_good_client(&cluster, &mut server).await;
}

#[tokio::test]
async fn good_mutual_auth_exchanges_a_byte() {
    let cluster = Cluster::new();
    let mut server = start_server(&cluster);
    assert_good_client(&cluster, &mut server).await;
    // An empty allow-list admits any node of the cluster, and the server learns which.
    let mut open = Server::start(&cluster.identity("node-a"), &[]);
    let outcome = exchange(cluster.client("node-c"), open.addr, "node-a").await;
    assert!(matches!(outcome, Exchange::Done { .. }), "{outcome:?}");
    open.assert_accepted("node-c").await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    refused_then_good_client_served(Refusal::NoClientCert).await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    refused_then_good_client_served(Refusal::ClientFromOtherCa).await;
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_refused() {
    refused_then_good_client_served(Refusal::ServerFromOtherCa).await;
}

#[tokio::test]
async fn server_with_another_name_than_dialled_is_refused() {
    refused_then_good_client_served(Refusal::WrongServerName).await;
}

#[tokio::test]
async fn client_outside_the_allow_list_is_refused() {
    refused_then_good_client_served(Refusal::PeerNotAllowed).await;
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    refused_then_good_client_served(Refusal::ExpiredClientCert).await;
}

#[tokio::test]
async fn client_with_another_alpn_is_refused() {
    refused_then_good_client_served(Refusal::OtherAlpn).await;
}

#[tokio::test]
async fn server_still_serves_after_every_refusal() {
    let cluster = Cluster::new();
    let mut server = start_server(&cluster);
    for case in REFUSALS {
        assert_refusal(&cluster, &mut server, case).await;
    }
    assert_good_client(&cluster, &mut server).await;
    assert_good_client(&cluster, &mut server).await;
}
