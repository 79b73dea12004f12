//! `ferry serve`: the node daemon (for now: the target side of base copies).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_wire::NodeId;

use crate::config::NodeConfig;
use crate::control::{ControlConfig, ControlServer};
use crate::daemon::Daemon;
use crate::quic::QuicTuning;
use crate::storage::DiskStorage;
use crate::tls::NodeIdentity;
use crate::transfer::target::{self, TargetContext};

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
    /// QUIC listen address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Certificate folder made by `ferry certs` (ca.pem, <node-id>.pem, <node-id>-key.pem).
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
        print!("{}", NodeConfig::default_toml());
        return Ok(());
    }
    let config = resolve(args)?;
    let node_id = NodeId::new(config.node_id.clone()).context("invalid node id")?;
    let allowed: Vec<NodeId> = config
        .allowed_peers
        .iter()
        .cloned()
        .map(NodeId::new)
        .collect::<Result<_, _>>()
        .context("invalid allowed peer")?;
    let identity = NodeIdentity::from_dir(&config.certs_dir, &node_id)?;
    let crypto = crate::tls::server_crypto(&identity, &allowed)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
    let args = config;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let endpoint = crate::quic::server_endpoint(args.listen, crypto, &QuicTuning::default())
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let listening = endpoint.local_addr()?;
        tracing::info!(node = %node_id, %listening, data_dir = %args.data_dir.display(), "ferry serve: listening");
        // Lines on stdout that scripts and tests can wait for. A reader that went away is not
        // the daemon's problem: write errors are ignored (println! would panic on EPIPE).
        let _ = writeln!(std::io::stdout(), "listening on {listening}");
        let ctx = Arc::new(TargetContext::new(node_id.clone(), args.data_dir.clone(), Arc::new(DiskStorage)));
        let server = tokio::spawn(target::serve(endpoint.clone(), ctx.clone()));
        let daemon = Daemon::new(node_id, listening, ctx.clone());
        let _events = daemon.spawn_events();
        let mut control_config = ControlConfig::new(args.control_socket_path());
        control_config.allowed_uids = args.control_allowed_uids.clone();
        let control = ControlServer::bind(control_config, Arc::new(daemon))?;
        let _ = writeln!(std::io::stdout(), "control socket at {}", control.socket_path().display());
        let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
        let control_task = tokio::spawn(control.run(async move {
            let _ = control_stopped.await;
        }));
        if args.progress_interval_ms > 0 {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(args.progress_interval_ms));
                loop {
                    tick.tick().await;
                    for (id, status) in ctx.inbound() {
                        if status.state == "receiving" {
                            tracing::info!(
                                migration = %id,
                                bytes_transferred = status.bytes_verified,
                                bytes_total = status.bytes_total,
                                files_staged = status.files_staged_count,
                                files_total = status.files_total_count,
                                "inbound base copy"
                            );
                        }
                    }
                }
            });
        }
        shutdown_signal().await?;
        tracing::info!("shutting down");
        let _ = stop_control.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), control_task).await;
        endpoint.close(quinn::VarInt::from_u32(crate::quic::close_code::CANCELLED), b"daemon shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        server.abort();
        Ok(())
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
