//! Mutual TLS for the data plane: a node's identity and the rustls configs quinn runs on.
//!
//! What it does: loads a [`NodeIdentity`] (the pinned cluster CA, the node's certificate and
//! key, as [`crate::certs`] writes them; `ca.pem` may hold several CAs, each trusted, so a CA
//! rotates with an overlap: trust old and new, swap node certificates, drop the old, each step
//! a SIGHUP) and builds the QUIC server and client crypto configs:
//! TLS 1.3 only, the `ring` provider built explicitly, AES-128-GCM first, ALPN `ferry/1` on both
//! sides. The server requires a client certificate that chains to the pinned CA and, when an
//! allow-list is given, names an allowed node; the client requires a server certificate that
//! chains to the same CA and names the node it dialled (quinn's `server_name`).
//!
//! What it does not: open sockets or endpoints (that is [`crate::quic`]), exchange protocol
//! versions (the first frame does), or revoke certificates.
//!
//! Invariants:
//! - Every refusal happens inside the TLS handshake, so quinn never hands the server a
//!   connection from a peer it would refuse: no certificate, another CA, expired, a node not in
//!   the allow-list, another ALPN.
//! - Only the cluster CAs in `ca.pem` are trusted; the system's roots are never consulted.
//! - Every connection is a full handshake (no session resumption, no 0-RTT), so every
//!   connection's certificates are checked against the clock and the allow-list.
//! - A node id is the first DNS subject alternative name of its certificate that is a valid
//!   [`NodeId`] (the common name is not consulted, as webpki does not either).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_wire::ids::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::certs;

/// The one application protocol ferry speaks. A bump is a new ALPN, refused at the handshake
/// by peers that do not speak it.
pub const ALPN: &[u8] = b"ferry/1";

/// CAs `ca.pem` may hold: two during a rotation; a few more leave room for a staged one.
pub const CA_CERTS_MAX_COUNT: usize = 8;

/// A node's TLS identity: the pinned cluster CAs, its certificate chain and its private key.
pub struct NodeIdentity {
    /// Every CA in `ca.pem`, in file order (at least one).
    ca_certs: Vec<CertificateDer<'static>>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node_id: NodeId,
}

impl fmt::Debug for NodeIdentity {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("cert_chain_count", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

/// Why a TLS identity or config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Configuration: a file that should exist does not.
    #[error("no {what} at {path}: {hint}")]
    Missing { what: &'static str, path: PathBuf, hint: String },
    /// Configuration: a file that is not the PEM it should be, or a certificate without a
    /// usable node id.
    #[error("{path} is not a usable {what} ({reason}): {hint}")]
    BadFile { what: &'static str, path: PathBuf, reason: String, hint: String },
    /// Configuration: rustls refused the identity (for example a key that does not match
    /// the certificate).
    #[error("tls refused the node identity ({0}): reissue the node certificate with `ferry certs issue`")]
    Rustls(rustls::Error),
    /// Configuration: quinn refused the TLS config (a missing QUIC cipher suite).
    #[error("quic cannot use this tls config ({0}): this is a bug in ferry's tls setup")]
    Quic(String),
    /// Configuration: the node certificate does not chain to the pinned CA, or is not valid
    /// now (see [`NodeIdentity::verify`]).
    #[error("the node certificate is not usable with this cluster CA ({reason}): reissue it with `ferry certs issue`")]
    Unusable { reason: String },
    /// I/O reading a certificate or key.
    #[error("could not read {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

/// The cause goes in the message only (not chained again as a source).
impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        Self::Rustls(e)
    }
}

impl NodeIdentity {
    /// Loads the CA certificate, the node certificate chain and the node key from PEM files.
    pub fn load(ca_cert: &Path, node_cert: &Path, node_key: &Path) -> Result<Self, TlsError> {
        let hint = "make one with `ferry certs init` and `ferry certs issue`";
        Self::load_with_hints(ca_cert, node_cert, node_key, hint, hint)
    }

    /// Loads node `name`'s identity from a folder laid out by [`crate::certs`].
    pub fn from_dir(dir: &Path, name: &NodeId) -> Result<Self, TlsError> {
        let ca_hint = format!("run `ferry certs init --dir {}`", dir.display());
        let node_hint = format!("run `ferry certs issue --dir {} --name {name}`", dir.display());
        let node_cert = dir.join(certs::node_cert_file(name));
        let identity = Self::load_with_hints(
            &dir.join(certs::CA_CERT_FILE),
            &node_cert,
            &dir.join(certs::node_key_file(name)),
            &ca_hint,
            &node_hint,
        )?;
        if identity.node_id != *name {
            let reason = format!("it names node {}, not {name}", identity.node_id);
            return Err(bad_file("node certificate", &node_cert, reason, &node_hint));
        }
        Ok(identity)
    }

    /// Checks, before any peer does, that the node certificate chains to the pinned CA and is
    /// valid now for both server and client authentication. Daemons call it at start so a bad
    /// identity fails there with a clear message rather than as refused handshakes.
    pub fn verify(&self) -> Result<(), TlsError> {
        let leaf = self.cert_chain.first().ok_or_else(|| TlsError::Unusable { reason: "no certificate".into() })?;
        let unusable = |e: webpki::Error| TlsError::Unusable { reason: format!("{e:?}") };
        let anchors = self
            .ca_certs
            .iter()
            .map(|ca| webpki::anchor_from_trusted_cert(ca).map_err(unusable))
            .collect::<Result<Vec<_>, _>>()?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(unusable)?;
        let intermediates = self.cert_chain.get(1..).unwrap_or_default();
        let algs = crypto_provider().signature_verification_algorithms.all;
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            cert.verify_for_usage(algs, &anchors, intermediates, UnixTime::now(), usage, None, None)
                .map_err(unusable)?;
        }
        Ok(())
    }

    fn load_with_hints(
        ca_cert: &Path,
        node_cert: &Path,
        node_key: &Path,
        ca_hint: &str,
        node_hint: &str,
    ) -> Result<Self, TlsError> {
        let ca_pem = read("CA certificate", ca_cert, ca_hint)?;
        let ca_certs = CertificateDer::pem_slice_iter(&ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_file("CA certificate", ca_cert, e.to_string(), ca_hint))?;
        if ca_certs.is_empty() {
            return Err(bad_file("CA certificate", ca_cert, "no certificate in it".into(), ca_hint));
        }
        if ca_certs.len() > CA_CERTS_MAX_COUNT {
            let reason = format!("{} certificates, at most {CA_CERTS_MAX_COUNT}", ca_certs.len());
            return Err(bad_file("CA certificate", ca_cert, reason, ca_hint));
        }
        for ca in &ca_certs {
            webpki::anchor_from_trusted_cert(ca)
                .map_err(|e| bad_file("CA certificate", ca_cert, format!("{e:?}"), ca_hint))?;
        }

        let cert_pem = read("node certificate", node_cert, node_hint)?;
        let cert_chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_file("node certificate", node_cert, e.to_string(), node_hint))?;
        let leaf = cert_chain
            .first()
            .ok_or_else(|| bad_file("node certificate", node_cert, "no certificate in it".into(), node_hint))?;
        let node_id = cert_node_id(leaf)
            .ok_or_else(|| bad_file("node certificate", node_cert, "no node id in its DNS names".into(), node_hint))?;

        let key_pem = read("node key", node_key, node_hint)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad_file("node key", node_key, e.to_string(), node_hint))?;
        Ok(Self { ca_certs, cert_chain, key, node_id })
    }

    /// The node id this identity's certificate names.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The pinned cluster CA certificates (several while a CA rotates).
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// This node's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca_certs {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }
}

/// The rustls provider ferry uses: `ring`, TLS 1.3 suites only, AES-128-GCM first (hardware
/// AES on the hosts we target; also the suite QUIC requires for its initial packets).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The rustls server config behind [`server_crypto`], for callers that need to adjust it.
pub fn server_tls_config(identity: &NodeIdentity, allowed_peers: &[NodeId]) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(identity.roots()?, provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(NodeClientVerifier { inner: webpki, allowed_peers: allowed_peers.to_vec() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: a resumed session would skip the client certificate checks (expiry,
    // allow-list), and ferry's few long-lived connections gain nothing from it.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The rustls client config behind [`client_crypto`], for callers that need to adjust it.
pub fn client_tls_config(identity: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// QUIC server crypto: requires a client certificate from the cluster CA whose node id is in
/// `allowed_peers` (an empty list allows any node of the cluster).
pub fn server_crypto(identity: &NodeIdentity, allowed_peers: &[NodeId]) -> Result<Arc<QuicServerConfig>, TlsError> {
    let config = server_tls_config(identity, allowed_peers)?;
    let quic = QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// QUIC client crypto: presents this node's certificate and requires the server's to come
/// from the cluster CA and name the node dialled (pass its node id as quinn's `server_name`).
pub fn client_crypto(identity: &NodeIdentity) -> Result<Arc<QuicClientConfig>, TlsError> {
    let config = client_tls_config(identity)?;
    let quic = QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The node id of the peer on an established connection, from its certificate.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_node_id(chain.first()?)
}

/// The node id a certificate names: its first DNS SAN that is a valid [`NodeId`].
pub fn cert_node_id(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let first = cert.valid_dns_names().find_map(|name| NodeId::new(name).ok());
    first
}

/// Wraps webpki's client verifier (chain to the pinned CA, validity, client-auth EKU) and then
/// checks the client's node id against the allow-list, so a refusal is a handshake failure.
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed_peers: Vec<NodeId>,
}

/// Why a client certificate that chains to the cluster CA was refused: the node it names (its
/// node id, else every name it carries) is not in the allow-list.
#[derive(Debug, thiserror::Error)]
#[error(
    "node {client} is not in this server's allow-list ({allowed}): add it to allowed_peers (--allow-peer) \
     or connect as an allowed node"
)]
struct NotAllowedPeer {
    client: String,
    allowed: String,
}

impl NotAllowedPeer {
    fn new(cert: &webpki::EndEntityCert<'_>, allowed_peers: &[NodeId]) -> Self {
        let names: Vec<&str> = cert.valid_dns_names().collect();
        let client = match names.iter().find_map(|name| NodeId::new(*name).ok()) {
            Some(node) => node.to_string(),
            None if names.is_empty() => "(a certificate without a DNS name)".to_owned(),
            None => format!("({})", names.join(", ")),
        };
        let allowed: Vec<&str> = allowed_peers.iter().map(NodeId::as_str).collect();
        Self { client, allowed: allowed.join(", ") }
    }

    /// As rustls reports it: `Error::Other`, whose message is this one's (an
    /// `InvalidCertificate` would print it wrapped in `Other(OtherError(..))` debug text).
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::Other(rustls::OtherError(Arc::new(self)))
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_peers.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let allowed = self.allowed_peers.iter().any(|peer| {
            ServerName::try_from(peer.as_str()).is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
        });
        if allowed {
            return Ok(verified);
        }
        Err(NotAllowedPeer::new(&cert, &self.allowed_peers).into_rustls())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read(what: &'static str, path: &Path, hint: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing { what, path: path.to_owned(), hint: hint.to_owned() },
        _ => TlsError::Io { path: path.to_owned(), cause: source },
    })
}

fn bad_file(what: &'static str, path: &Path, reason: String, hint: &str) -> TlsError {
    TlsError::BadFile { what, path: path.to_owned(), reason, hint: hint.to_owned() }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::certs::{init_ca, issue, IssueOptions};

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[test]
    fn a_node_outside_the_allow_list_is_refused_by_name_in_plain_words() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        issue(tmp.path(), &node("node-c"), &IssueOptions::default()).unwrap();
        let server = NodeIdentity::from_dir(tmp.path(), &node("node-c")).unwrap();
        let client = server.cert_chain()[0].clone();
        let webpki =
            WebPkiClientVerifier::builder_with_provider(server.roots().unwrap(), crypto_provider()).build().unwrap();
        let verifier = NodeClientVerifier { inner: webpki, allowed_peers: vec![node("node-a"), node("node-b")] };
        let err = verifier.verify_client_cert(&client, &[], UnixTime::now()).unwrap_err().to_string();
        assert!(err.contains("node node-c is not in this server's allow-list (node-a, node-b)"), "{err}");
        assert!(err.contains("allowed_peers (--allow-peer)") && !err.contains("OtherError"), "{err}");
        let open = NodeClientVerifier { allowed_peers: vec![node("node-c")], ..verifier };
        open.verify_client_cert(&client, &[], UnixTime::now()).unwrap();
    }

    #[test]
    fn from_dir_loads_what_certs_writes() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        issue(tmp.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let identity = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap();
        assert_eq!(identity.node_id(), &node("node-a"));
        assert_eq!(cert_node_id(&identity.cert_chain()[0]), Some(node("node-a")));
        assert!(server_crypto(&identity, &[]).is_ok());
        assert!(client_crypto(&identity).is_ok());
        identity.verify().unwrap();
        let debug = format!("{identity:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
    }

    #[test]
    fn missing_files_say_which_command_makes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let err = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap_err();
        assert!(err.to_string().contains("ferry certs init --dir"), "{err}");
        init_ca(tmp.path(), false).unwrap();
        let err = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap_err();
        assert!(matches!(err, TlsError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("ferry certs issue --dir"), "{err}");
        assert!(err.to_string().contains("--name node-a"), "{err}");
    }

    #[test]
    fn verify_refuses_expired_and_foreign_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        init_ca(other.path(), false).unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let expired =
            IssueOptions { not_before: Some(now - 2 * day), not_after: Some(now - day), ..Default::default() };
        issue(tmp.path(), &node("old"), &expired).unwrap();
        let err = NodeIdentity::from_dir(tmp.path(), &node("old")).unwrap().verify().unwrap_err();
        assert!(err.to_string().contains("Expired"), "{err}");

        let foreign = issue(other.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let identity = NodeIdentity::load(&tmp.path().join(certs::CA_CERT_FILE), &foreign.cert, &foreign.key).unwrap();
        let err = identity.verify().unwrap_err();
        assert!(matches!(err, TlsError::Unusable { .. }), "{err}");
    }

    #[test]
    fn a_ca_bundle_trusts_each_of_its_cas_and_only_those() {
        let old = tempfile::tempdir().unwrap();
        let new = tempfile::tempdir().unwrap();
        let stranger = tempfile::tempdir().unwrap();
        for dir in [&old, &new, &stranger] {
            init_ca(dir.path(), false).unwrap();
        }
        let from_old = issue(old.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let from_new = issue(new.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let from_stranger = issue(stranger.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let bundle = old.path().join("bundle.pem");
        let pems: Vec<u8> =
            [&old, &new].iter().flat_map(|d| std::fs::read(d.path().join(certs::CA_CERT_FILE)).unwrap()).collect();
        std::fs::write(&bundle, pems).unwrap();
        for trusted in [&from_old, &from_new] {
            let identity = NodeIdentity::load(&bundle, &trusted.cert, &trusted.key).unwrap();
            assert_eq!(identity.ca_certs().len(), 2);
            identity.verify().unwrap();
            // Each CA of the bundle is a root of the peer verifiers.
            assert_eq!(identity.roots().unwrap().len(), 2);
        }
        let err = NodeIdentity::load(&bundle, &from_stranger.cert, &from_stranger.key).unwrap().verify().unwrap_err();
        assert!(matches!(err, TlsError::Unusable { .. }), "{err}");
        std::fs::write(&bundle, b"").unwrap();
        let err = NodeIdentity::load(&bundle, &from_old.cert, &from_old.key).unwrap_err();
        assert!(err.to_string().contains("no certificate in it"), "{err}");
    }

    #[test]
    fn from_dir_refuses_a_certificate_for_another_node() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        let b = issue(tmp.path(), &node("node-b"), &IssueOptions::default()).unwrap();
        std::fs::copy(&b.cert, tmp.path().join("node-a.pem")).unwrap();
        std::fs::copy(&b.key, tmp.path().join("node-a-key.pem")).unwrap();
        let err = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap_err();
        assert!(err.to_string().contains("names node node-b"), "{err}");
    }

    #[test]
    fn garbage_pem_is_a_config_error() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        issue(tmp.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        std::fs::write(tmp.path().join("node-a-key.pem"), b"not pem").unwrap();
        let err = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap_err();
        assert!(matches!(err, TlsError::BadFile { what: "node key", .. }), "{err}");
    }

    #[test]
    fn provider_prefers_aes_128_gcm_and_speaks_only_tls13() {
        let provider = crypto_provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ]
        );
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        issue(tmp.path(), &node("node-a"), &IssueOptions::default()).unwrap();
        let identity = NodeIdentity::from_dir(tmp.path(), &node("node-a")).unwrap();
        let server = server_tls_config(&identity, &[]).unwrap();
        assert_eq!(server.alpn_protocols, [ALPN.to_vec()]);
        assert_eq!(server.send_tls13_tickets, 0);
        assert_eq!(server.max_early_data_size, 0);
        let client = client_tls_config(&identity).unwrap();
        assert_eq!(client.alpn_protocols, [ALPN.to_vec()]);
        assert!(!client.enable_early_data);
    }
}
