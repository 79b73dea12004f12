//! Development certificates: a cluster CA and the node certificates it signs.
//!
//! What it does: `ferry certs init` and `ferry certs issue` call [`init_ca`] and [`issue`].
//! [`init_ca`] makes an ECDSA P-256 CA and writes `ca.pem` and `ca-key.pem` into a folder;
//! [`issue`] makes a node key and certificate signed by that CA and writes `<node>.pem` and
//! `<node>-key.pem` beside them. Node certificates are good for both TLS server and client
//! authentication, so one pair serves a node as source and as target.
//!
//! What it does not: parse command lines, load certificates for TLS (that is [`crate::tls`]),
//! revoke, or rotate. It is a development tool; production clusters bring their own PKI.
//!
//! Invariants:
//! - A node certificate's first DNS subject alternative name is its node id (also its CN);
//!   [`crate::tls`] reads the peer's node id from there.
//! - Private keys are written with mode 0600, every file through a temporary file, fsync and
//!   rename, so a crash leaves the old file or the new one, never half of one.
//! - An existing CA is never overwritten unless the caller says `force`.
//! - The CA's subject is derived from its public key, so [`issue`] rebuilds the issuer from
//!   `ca-key.pem` alone and checks it against `ca.pem` before signing anything.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferry_wire::ids::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// File name of the cluster CA certificate inside a certificate folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key inside a certificate folder.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long a development CA is valid.
const CA_VALIDITY_DAYS: u32 = 3650;
/// Certificates start this far in the past, so nodes whose clocks lag a little accept them.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);
const SECONDS_PER_DAY: u64 = 86_400;

/// File name of a node's certificate: `<node>.pem`.
pub fn node_cert_file(name: &NodeId) -> String {
    format!("{name}.pem")
}

/// File name of a node's private key: `<node>-key.pem`.
pub fn node_key_file(name: &NodeId) -> String {
    format!("{name}-key.pem")
}

/// Where [`init_ca`] wrote the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where [`issue`] wrote a node's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a node certificate holds besides its node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// More subject alternative names: DNS names or IP addresses (`10.0.0.7`, `::1`).
    pub extra_sans: Vec<String>,
    /// Validity from now (less a one-hour clock skew allowance), in days. Must be at least 1.
    pub validity_days: u32,
    /// Overrides the start of validity (tests use it to make expired certificates).
    pub not_before: Option<SystemTime>,
    /// Overrides the end of validity; wins over `validity_days`.
    pub not_after: Option<SystemTime>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self { extra_sans: Vec::new(), validity_days: 365, not_before: None, not_after: None }
    }
}

/// Why a CA or a node certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Caller misuse: `init` over an existing CA without `force`.
    #[error("a cluster CA already exists at {path}: keep it, or pass --force to replace it (node certificates it issued will then be refused)")]
    CaExists { path: PathBuf },
    /// Configuration: `issue` before `init`.
    #[error("no cluster CA at {path}: run `ferry certs init --dir {dir}` first")]
    NoCa { path: PathBuf, dir: PathBuf },
    /// Configuration: a file that is not the PEM it should be.
    #[error("{path} is not a PEM {what} ({reason}): restore it or run `ferry certs init --dir {dir} --force`")]
    BadPem { path: PathBuf, what: &'static str, reason: String, dir: PathBuf },
    /// Configuration: `ca.pem` and `ca-key.pem` were not made together by `ferry certs init`.
    #[error("{cert} was not made from {key} by `ferry certs init`: restore the pair, or run `ferry certs init --dir {dir} --force` and reissue every node")]
    CaMismatch { cert: PathBuf, key: PathBuf, dir: PathBuf },
    /// Caller misuse: a subject alternative name that is neither an IP address nor a DNS name.
    #[error("subject alternative name {san:?} is neither an IP address nor a DNS name: pass names like `node-a.cluster` or `10.0.0.7`")]
    BadSan { san: String },
    /// Caller misuse: an empty or unrepresentable validity window.
    #[error("bad validity: {reason}")]
    BadValidity { reason: String },
    /// rcgen refused to build or sign a certificate (a bug or an exhausted random source).
    #[error("could not generate the {what}: {cause}")]
    Generate { what: &'static str, cause: rcgen::Error },
    /// I/O on the certificate folder.
    #[error("could not {action} {path}: {cause}")]
    Io { action: &'static str, path: PathBuf, cause: io::Error },
}

/// Makes a development cluster CA in `dir` (created if missing, mode 0700): `ca.pem` and
/// `ca-key.pem` (mode 0600). Refuses if either file exists, unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<CaPaths, CertError> {
    let paths = CaPaths { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) };
    if !force {
        for path in [&paths.cert, &paths.key] {
            if path.symlink_metadata().is_ok() {
                return Err(CertError::CaExists { path: path.clone() });
            }
        }
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| CertError::Generate { what: "CA key", cause: source })?;
    let mut params = ca_params(&key);
    let now = SystemTime::now();
    params.not_before = to_datetime(now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now))?;
    params.not_after = to_datetime(days_after(now, CA_VALIDITY_DAYS)?)?;
    let cert =
        params.self_signed(&key).map_err(|source| CertError::Generate { what: "CA certificate", cause: source })?;

    create_dir(dir)?;
    // Key first: a crash in between leaves a key without a certificate, which `issue`
    // reports, rather than a certificate whose key is lost.
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(paths)
}

/// Makes a key and certificate for node `name`, signed by the CA in `dir`: `<name>.pem` and
/// `<name>-key.pem` (mode 0600). Replaces an earlier certificate for the same node (renewal).
pub fn issue(dir: &Path, name: &NodeId, opts: &IssueOptions) -> Result<NodePaths, CertError> {
    // The node id is dialled as a TLS server name, so it must be a DNS name (labels of at
    // most 63 bytes, not all-numeric), which `NodeId` alone does not guarantee.
    let mut sans = vec![parse_san(name.as_str())?];
    if !matches!(sans.first(), Some(SanType::DnsName(_))) {
        return Err(CertError::BadSan { san: name.to_string() });
    }
    for san in &opts.extra_sans {
        let parsed = parse_san(san)?;
        if !sans.contains(&parsed) {
            sans.push(parsed);
        }
    }
    let (not_before, not_after) = validity(opts)?;
    let issuer = load_issuer(dir)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| CertError::Generate { what: "node key", cause: source })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertError::Generate { what: "node certificate", cause: source })?;

    let paths = NodePaths { cert: dir.join(node_cert_file(name)), key: dir.join(node_key_file(name)) };
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(paths)
}

/// The CA's parameters, all derived from its key: the subject carries a fingerprint of the
/// public key, so two development CAs never share a name and `issue` can rebuild the issuer.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let digest = Sha256::digest(key.subject_public_key_info());
    let fingerprint: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, format!("ferry development CA {fingerprint}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Loads `ca-key.pem`, rebuilds the issuer from it and checks that `ca.pem` has the same
/// subject and public key, so what we sign chains to the CA that peers pin.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let key_pem = read_ca_file(dir, &key_path)?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| bad_pem(dir, &key_path, "private key", "not UTF-8"))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad_pem(dir, &key_path, "private key", &e.to_string()))?;
    let cert_pem = read_ca_file(dir, &cert_path)?;
    let on_disk = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| bad_pem(dir, &cert_path, "certificate", &e.to_string()))?;
    let on_disk = webpki::EndEntityCert::try_from(&on_disk)
        .map_err(|e| bad_pem(dir, &cert_path, "certificate", &e.to_string()))?;

    let params = ca_params(&key);
    let rebuilt =
        params.self_signed(&key).map_err(|source| CertError::Generate { what: "CA issuer", cause: source })?;
    let rebuilt = webpki::EndEntityCert::try_from(rebuilt.der())
        .map_err(|e| bad_pem(dir, &cert_path, "certificate", &e.to_string()))?;
    let same = on_disk.subject() == rebuilt.subject()
        && on_disk.subject_public_key_info().as_ref() == rebuilt.subject_public_key_info().as_ref();
    if !same {
        return Err(CertError::CaMismatch { cert: cert_path, key: key_path, dir: dir.to_owned() });
    }
    Ok(Issuer::new(params, key))
}

fn read_ca_file(dir: &Path, path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertError::NoCa { path: path.to_owned(), dir: dir.to_owned() },
        _ => CertError::Io { action: "read", path: path.to_owned(), cause: source },
    })
}

fn bad_pem(dir: &Path, path: &Path, what: &'static str, reason: &str) -> CertError {
    CertError::BadPem { path: path.to_owned(), what, reason: reason.to_owned(), dir: dir.to_owned() }
}

fn parse_san(san: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if DnsName::try_from(san).is_err() {
        return Err(CertError::BadSan { san: san.to_owned() });
    }
    Ok(SanType::DnsName(ia5(san)?))
}

fn ia5(name: &str) -> Result<rcgen::string::Ia5String, CertError> {
    rcgen::string::Ia5String::try_from(name).map_err(|_| CertError::BadSan { san: name.to_owned() })
}

/// The validity window `opts` asks for, checked to be non-empty.
fn validity(opts: &IssueOptions) -> Result<(SystemTime, SystemTime), CertError> {
    let now = SystemTime::now();
    let not_before = match opts.not_before {
        Some(t) => t,
        None => now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
    };
    let not_after = match opts.not_after {
        Some(t) => t,
        None if opts.validity_days == 0 => {
            return Err(CertError::BadValidity { reason: "validity must be at least 1 day".into() })
        }
        None => days_after(now, opts.validity_days)?,
    };
    if not_after <= not_before {
        return Err(CertError::BadValidity {
            reason: "the certificate would expire before it starts: pass a later not_after".into(),
        });
    }
    Ok((not_before, not_after))
}

fn days_after(t: SystemTime, days: u32) -> Result<SystemTime, CertError> {
    u64::from(days)
        .checked_mul(SECONDS_PER_DAY)
        .and_then(|secs| t.checked_add(Duration::from_secs(secs)))
        .ok_or_else(|| CertError::BadValidity { reason: format!("{days} days is too long") })
}

fn to_datetime(t: SystemTime) -> Result<OffsetDateTime, CertError> {
    let too_far = || CertError::BadValidity { reason: "certificate dates must lie between 1970 and 9999".into() };
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| too_far())?.as_secs();
    let secs = i64::try_from(secs).map_err(|_| too_far())?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| too_far())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| CertError::Io {
        action: "create folder",
        path: dir.to_owned(),
        cause: source,
    })
}

/// Writes `bytes` to `path` through `path.tmp`: created fresh with `mode`, fsynced, renamed.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io { action, path, cause: source }
    };
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale", &tmp)(e)),
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| CertError::Io {
        action: "fsync folder",
        path: dir.to_owned(),
        cause: source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn init_writes_ca_with_private_key_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let paths = init_ca(&dir, false).unwrap();
        assert_eq!(paths.cert, dir.join("ca.pem"));
        assert_eq!(paths.key, dir.join("ca-key.pem"));
        assert_eq!(mode(&paths.key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let der = cert_der(&paths.cert);
        assert!(webpki::anchor_from_trusted_cert(&der).is_ok());
        assert!(!dir.join("ca-key.pem.tmp").exists());
    }

    #[test]
    fn init_refuses_to_overwrite_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init_ca(tmp.path(), false).unwrap();
        let before = fs::read(&first.key).unwrap();
        let err = init_ca(tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(&first.key).unwrap(), before, "refused init changed the key");

        let second = init_ca(tmp.path(), true).unwrap();
        assert_ne!(fs::read(&second.key).unwrap(), before, "forced init kept the old key");
        assert_eq!(mode(&second.key), 0o600);
    }

    #[test]
    fn issue_writes_a_node_certificate_that_chains_to_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = init_ca(tmp.path(), false).unwrap();
        let opts = IssueOptions { extra_sans: vec!["10.0.0.7".into(), "a.example".into()], ..IssueOptions::default() };
        let paths = issue(tmp.path(), &node("node-a"), &opts).unwrap();
        assert_eq!(paths.cert, tmp.path().join("node-a.pem"));
        assert_eq!(paths.key, tmp.path().join("node-a-key.pem"));
        assert_eq!(mode(&paths.key), 0o600);

        let ca_der = cert_der(&ca.cert);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let der = cert_der(&paths.cert);
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let algs = webpki::ring::ECDSA_P256_SHA256;
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            cert.verify_for_usage(&[algs], std::slice::from_ref(&anchor), &[], now, usage, None, None).unwrap();
        }
        let names: Vec<&str> = cert.valid_dns_names().collect();
        assert_eq!(names, ["node-a", "a.example"]);
        let ip = rustls_pki_types::ServerName::try_from("10.0.0.7").unwrap();
        cert.verify_is_valid_for_subject_name(&ip).unwrap();
    }

    #[test]
    fn issue_without_ca_says_to_run_init() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue(tmp.path(), &node("node-a"), &IssueOptions::default()).unwrap_err();
        assert!(matches!(err, CertError::NoCa { .. }), "{err}");
        assert!(err.to_string().contains("ferry certs init"), "{err}");
    }

    #[test]
    fn issue_refuses_a_ca_cert_that_does_not_match_the_key() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        init_ca(one.path(), false).unwrap();
        let other = init_ca(two.path(), false).unwrap();
        fs::copy(&other.cert, one.path().join(CA_CERT_FILE)).unwrap();
        let err = issue(one.path(), &node("node-a"), &IssueOptions::default()).unwrap_err();
        assert!(matches!(err, CertError::CaMismatch { .. }), "{err}");
    }

    #[test]
    fn issue_refuses_bad_sans_and_empty_validity() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        let name = node("node-a");
        let bad_san = IssueOptions { extra_sans: vec!["not a name".into()], ..IssueOptions::default() };
        assert!(matches!(issue(tmp.path(), &name, &bad_san), Err(CertError::BadSan { .. })));
        let long_label = node(&"x".repeat(64));
        let err = issue(tmp.path(), &long_label, &IssueOptions::default());
        assert!(matches!(err, Err(CertError::BadSan { .. })), "{err:?}");
        let numeric = node("10.0.0.7");
        let err = issue(tmp.path(), &numeric, &IssueOptions::default());
        assert!(matches!(err, Err(CertError::BadSan { .. })), "{err:?}");
        let zero = IssueOptions { validity_days: 0, ..IssueOptions::default() };
        assert!(matches!(issue(tmp.path(), &name, &zero), Err(CertError::BadValidity { .. })));
        let now = SystemTime::now();
        let backwards = IssueOptions { not_before: Some(now), not_after: Some(now), ..IssueOptions::default() };
        assert!(matches!(issue(tmp.path(), &name, &backwards), Err(CertError::BadValidity { .. })));
        assert!(!tmp.path().join("node-a.pem").exists());
    }

    #[test]
    fn issue_can_make_an_expired_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = init_ca(tmp.path(), false).unwrap();
        let now = SystemTime::now();
        let opts = IssueOptions {
            not_before: Some(now - Duration::from_secs(2 * SECONDS_PER_DAY)),
            not_after: Some(now - Duration::from_secs(SECONDS_PER_DAY)),
            ..IssueOptions::default()
        };
        let paths = issue(tmp.path(), &node("old"), &opts).unwrap();
        let ca_der = cert_der(&ca.cert);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let der = cert_der(&paths.cert);
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        let err = cert
            .verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                &[anchor],
                &[],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .err();
        assert!(matches!(err, Some(webpki::Error::CertExpired { .. })), "{err:?}");
    }
}
