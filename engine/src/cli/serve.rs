//! `ferry serve`: the node daemon: target of inbound migrations, source of the migrations its
//! coordinator starts on the control socket, recovery of both after a restart, SIGHUP
//! certificate reload, graceful SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// This node's id: the name in its certificate.
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
}

/// The configuration in force: the file (or the defaults), then the flags.
fn resolve(args: ServeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
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
    if let Some(v) = args.progress_interval_ms {
        config.progress_interval_ms = v;
    }
    if let Some(v) = args.control_socket {
        config.control_socket = Some(v);
    }
    Ok(config)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_default_config {
        out!("{}", NodeConfig::default_toml())?;
        return Ok(());
    }
    let config = resolve(args)?;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        // Signal handlers first: a SIGTERM right after the "listening on" line must stop the
        // daemon cleanly, not kill it with the default action.
        let shutdown = shutdown_signal()?;
        let node = RunningNode::start(&config).await?;
        tracing::info!(node = %node.node_id, listening = %node.quic_addr, data_dir = %config.data_dir.display(), "ferry serve: listening");
        // Lines on stdout that scripts and tests can wait for. A reader that went away is not
        // the daemon's problem: write errors are ignored (println! would panic on EPIPE).
        let _ = writeln!(std::io::stdout(), "listening on {}", node.quic_addr);
        let _ = writeln!(std::io::stdout(), "control socket at {}", node.socket().display());
        if let Some(bound) = node.metrics_addr {
            let _ = writeln!(std::io::stdout(), "metrics at http://{bound}/metrics");
        }
        let _reload = tokio::spawn(reload_on_sighup(
            node.endpoint.clone(),
            node.outbound.clone(),
            config.clone(),
            node.node_id.clone(),
            node.allowed_peers().to_vec(),
        ));
        shutdown.await;
        tracing::info!("shutting down");
        node.shutdown().await;
        Ok(())
    })
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
                endpoint.set_server_config(Some(crate::quic::server_config(crypto, &QuicTuning::default())));
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
