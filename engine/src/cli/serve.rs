//! `ferry serve`: the node daemon: target of inbound migrations, source of the migrations its
//! coordinator starts on the control socket, recovery of both after a restart, SIGHUP
//! certificate reload, graceful SIGTERM/SIGINT.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ferry_wire::NodeId;

use super::addr::parse_socket_addr;
use super::out::out;
use crate::config::NodeConfig;
use crate::node::RunningNode;
use crate::outbound::Outbound;
use crate::quic::QuicTuning;
use crate::tls::NodeIdentity;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); flags given here override it. See --print-default-config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the default configuration, commented, and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// This node's id: the name in its certificate. Required unless the --config file sets
    /// node_id.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Data folder: staging lands in <data-dir>/migrations/<migration_id>/.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// QUIC listen address: ip:port or host:port (a name is resolved once, at start).
    #[arg(long, value_parser = parse_socket_addr)]
    pub listen: Option<SocketAddr>,
    /// Certificate folder made by `ferry certs` (ca.pem, <node-id>.pem, <node-id>-key.pem);
    /// default: certs_dir of the --config file, else /etc/ferry/certs.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Node ids allowed to connect (repeatable); none: any node with a certificate from the CA.
    #[arg(long = "allow-peer")]
    pub allow_peers: Vec<String>,
    /// Log each inbound transfer's progress this often, in milliseconds (0: never).
    #[arg(long)]
    pub progress_interval_ms: Option<u64>,
    /// The coordinator's control socket (JSON-RPC 2.0, one object per line); default
    /// <data-dir>/control/ferry.sock. Try: socat - UNIX-CONNECT:PATH, then {"jsonrpc":"2.0","id":1,"method":"node.info"}
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// A migration with work left that makes no progress for this many seconds is flagged
    /// stalled: its status's no_progress_for_s is set and a `stalled` event goes out (0: never;
    /// default: stall_after_secs in the --config file, else 10).
    #[arg(long)]
    pub stall_after_secs: Option<u64>,
}

/// Where a setting in force came from, for the log and for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Flag(&'static str),
    ConfigFile { path: PathBuf, key: &'static str },
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Flag(flag) => write!(f, "the {flag} flag"),
            Self::ConfigFile { path, key } => write!(f, "{key} in {}", path.display()),
            Self::Default => f.write_str("the default"),
        }
    }
}

/// The configuration in force (the file or the defaults, then the flags), and where the node
/// id and the certificate folder came from.
#[derive(Debug)]
struct Resolved {
    config: NodeConfig,
    node_id_from: Origin,
    certs_from: Origin,
}

/// Where `key` came from: the flag, else the file if it sets the key, else the default.
fn origin(flag: Option<&'static str>, file: Option<(&PathBuf, &BTreeSet<String>)>, key: &'static str) -> Origin {
    match (flag, file) {
        (Some(flag), _) => Origin::Flag(flag),
        (None, Some((path, keys))) if keys.contains(key) => Origin::ConfigFile { path: path.clone(), key },
        _ => Origin::Default,
    }
}

/// The configuration in force: the file (or the defaults), then the flags. With neither a
/// --config file nor --node-id there is no node id: an error, not the default's.
fn resolve(args: ServeArgs) -> anyhow::Result<Resolved> {
    let (mut config, keys) = match &args.config {
        Some(path) => {
            let (config, keys) = NodeConfig::load_with_keys(path)?;
            (config, Some(keys))
        }
        None => (NodeConfig::default(), None),
    };
    let file = args.config.as_ref().zip(keys.as_ref());
    let node_id_from = origin(args.node_id.as_ref().map(|_| "--node-id"), file, "node_id");
    let certs_from = origin(args.certs.as_ref().map(|_| "--certs"), file, "certs_dir");
    if args.config.is_none() && args.node_id.is_none() {
        anyhow::bail!(
            "no node id: pass --node-id NAME (the name in this node's certificate), or set node_id in a --config file"
        );
    }
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.certs {
        config.certs_dir = v;
    }
    if !args.allow_peers.is_empty() {
        config.allowed_peers = args.allow_peers;
    }
    if let Some(v) = args.stall_after_secs {
        config.stall_after_secs = v;
    }
    if let Some(v) = args.progress_interval_ms {
        config.progress_interval_ms = v;
    }
    if let Some(v) = args.control_socket {
        config.control_socket = Some(v);
    }
    Ok(Resolved { config, node_id_from, certs_from })
}

/// Loads the node's certificates before anything starts, so a missing folder is reported with
/// where its path came from and how to give another.
fn check_certs(resolved: &Resolved) -> anyhow::Result<()> {
    let config = &resolved.config;
    let node_id = NodeId::new(config.node_id.clone())
        .with_context(|| format!("invalid node id {:?} (from {})", config.node_id, resolved.node_id_from))?;
    NodeIdentity::from_dir(&config.certs_dir, &node_id).map(|_| ()).with_context(|| {
        let dir = config.certs_dir.display();
        match &resolved.certs_from {
            Origin::Default => format!(
                "no usable certificates for node {node_id} in {dir} (the default certs_dir): pass --certs DIR or \
                 set certs_dir in the --config file to use another folder"
            ),
            other => format!("no usable certificates for node {node_id} in {dir} (from {other})"),
        }
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_default_config {
        out!("{}", NodeConfig::default_toml())?;
        return Ok(());
    }
    let resolved = resolve(args)?;
    if resolved.node_id_from == Origin::Default {
        tracing::warn!(
            node = %resolved.config.node_id,
            "the node id is the default: neither --node-id nor node_id in the --config file set it; \
             peers expect the name in this node's certificate"
        );
    }
    check_certs(&resolved)?;
    let Resolved { config, node_id_from, certs_from } = resolved;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        // Signal handlers first: a SIGTERM right after the "listening on" line must stop the
        // daemon cleanly, not kill it with the default action.
        let shutdown = shutdown_signal()?;
        let node = RunningNode::start(&config).await?;
        tracing::info!(
            node = %node.node_id,
            node_id_from = %node_id_from,
            certs = %config.certs_dir.display(),
            certs_from = %certs_from,
            listening = %node.quic_addr,
            data_dir = %config.data_dir.display(),
            "ferry serve: listening"
        );
        // Lines on stdout that scripts and tests can wait for. A reader that went away is not
        // the daemon's problem: write errors are ignored (println! would panic on EPIPE).
        let _ = writeln!(std::io::stdout(), "listening on {}", node.quic_addr);
        let _ = writeln!(std::io::stdout(), "control socket at {}", node.socket().display());
        if let Some(bound) = node.metrics_addr {
            let _ = writeln!(std::io::stdout(), "metrics at http://{bound}/metrics");
        }
        // Under systemd (`Type=notify`): ready only now, with the QUIC endpoint bound and the
        // control socket listening. Without NOTIFY_SOCKET this does nothing.
        let status = format!("listening on {}, control socket at {}", node.quic_addr, node.socket().display());
        notify_service_manager(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
        let _reload = tokio::spawn(reload_on_sighup(
            node.endpoint.clone(),
            node.outbound.clone(),
            config.clone(),
            node.node_id.clone(),
            node.allowed_peers().to_vec(),
        ));
        shutdown.await;
        tracing::info!("shutting down");
        notify_service_manager(&[sd_notify::NotifyState::Stopping]);
        node.shutdown().await;
        Ok(())
    })
}

/// Tells systemd (when it started the daemon with `NOTIFY_SOCKET`) about the daemon's state. A
/// service manager that cannot be told is logged, not fatal: the daemon serves either way.
fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

/// On SIGHUP, reads the certificates again: new peer connections and new outbound connections
/// use them; established connections keep theirs. A bad certificate folder is logged and the
/// old certificates stay in force.
async fn reload_on_sighup(
    endpoint: quinn::Endpoint,
    outbound: Arc<Outbound>,
    config: NodeConfig,
    node_id: NodeId,
    allowed: Vec<NodeId>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    while hup.recv().await.is_some() {
        let loaded = NodeIdentity::from_dir(&config.certs_dir, &node_id)
            .map_err(anyhow::Error::from)
            .and_then(|identity| Ok((crate::tls::server_crypto(&identity, &allowed)?, identity)));
        match loaded {
            Ok((crypto, identity)) => {
                endpoint.set_server_config(Some(crate::quic::server_config(
                    crypto,
                    &QuicTuning::with_idle_timeout_ms(config.quic_idle_timeout_ms),
                )));
                outbound.set_identity(Arc::new(identity));
                tracing::info!(certs = %config.certs_dir.display(), "SIGHUP: certificates reloaded");
                let _ = writeln!(std::io::stdout(), "certificates reloaded");
            }
            Err(e) => tracing::error!("SIGHUP: certificates not reloaded, the old ones stay in force: {e:#}"),
        }
    }
    Ok(())
}

fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["ferry", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn without_a_config_file_the_node_id_must_be_given() {
        let err = resolve(parse(&["--listen", "127.0.0.1:0"])).unwrap_err().to_string();
        assert!(err.contains("no node id") && err.contains("--node-id") && err.contains("node_id"), "{err}");
        let resolved = resolve(parse(&["--node-id", "node-b", "--listen", "localhost:7070"])).unwrap();
        assert_eq!(resolved.config.node_id, "node-b");
        assert!(resolved.config.listen.ip().is_loopback());
        assert_eq!(resolved.node_id_from.to_string(), "the --node-id flag");
        assert_eq!(resolved.certs_from, Origin::Default);
    }

    #[test]
    fn the_node_id_and_certs_say_where_they_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = \"node-c\"\ncerts_dir = \"/srv/certs\"\n").unwrap();
        let config = path.to_str().unwrap();
        let resolved = resolve(parse(&["--config", config])).unwrap();
        assert_eq!(resolved.config.node_id, "node-c");
        assert_eq!(resolved.node_id_from.to_string(), format!("node_id in {config}"));
        assert_eq!(resolved.certs_from.to_string(), format!("certs_dir in {config}"));
        let flagged = resolve(parse(&["--config", config, "--node-id", "node-d", "--certs", "/c"])).unwrap();
        assert_eq!((flagged.config.node_id.as_str(), flagged.node_id_from), ("node-d", Origin::Flag("--node-id")));
        assert_eq!(flagged.certs_from, Origin::Flag("--certs"));

        // A file without node_id: the default's id, and the caller warns that it is the default.
        std::fs::write(&path, "listen = \"127.0.0.1:0\"\n").unwrap();
        let defaulted = resolve(parse(&["--config", config])).unwrap();
        assert_eq!(
            (defaulted.config.node_id, defaulted.node_id_from),
            (NodeConfig::default().node_id, Origin::Default)
        );
    }

    #[test]
    fn missing_default_certificates_say_how_to_give_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut resolved = resolve(parse(&["--node-id", "node-b"])).unwrap();
        resolved.config.certs_dir = dir.path().join("certs");
        let err = format!("{:#}", check_certs(&resolved).unwrap_err());
        for needle in ["--certs DIR", "certs_dir", "ferry certs init --dir"] {
            assert!(err.contains(needle), "{needle:?} missing from {err}");
        }
        resolved.certs_from = Origin::Flag("--certs");
        let err = format!("{:#}", check_certs(&resolved).unwrap_err());
        assert!(err.contains("from the --certs flag") && err.contains("ferry certs init --dir"), "{err}");
    }
}
