//! One node daemon, running on the caller's tokio runtime: the QUIC endpoint for peers, the
//! target context, the outbound registry, the control socket and (optionally) the metrics
//! endpoint.
//!
//! What it does: [`RunningNode::start`] brings a node up from a [`NodeConfig`] (certificates,
//! data folder, limits), resumes or aborts what an earlier run left ([`Outbound::recover`]) and
//! serves until [`RunningNode::shutdown`] (checkpoint, close the socket and the endpoint).
//! `ferry serve` runs one per process; `ferry demo` and the scenario tests run two in one
//! process, each with its own socket and QUIC port, so pausing a writer stays in-process.
//!
//! What it does not: signals (SIGTERM, SIGHUP: `ferry serve` handles them), or print anything.
//!
//! Invariants: a node owns its sockets, its tasks and its data folder's recovery; shutdown
//! checkpoints every outbound migration before the sockets close, and dropping a node stops its
//! tasks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_wire::NodeId;

use crate::config::NodeConfig;
use crate::control::{ControlConfig, ControlServer};
use crate::daemon::Daemon;
use crate::outbound::{Outbound, OutboundConfig};
use crate::quic::QuicTuning;
use crate::storage::{DiskStorage, Storage};
use crate::tls::NodeIdentity;
use crate::transfer::target::{self, TargetContext, TargetLimits};

/// A node daemon serving on the current runtime.
#[derive(Debug)]
pub struct RunningNode {
    pub node_id: NodeId,
    pub quic_addr: SocketAddr,
    pub socket_path: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub endpoint: quinn::Endpoint,
    pub ctx: Arc<TargetContext>,
    pub outbound: Arc<Outbound>,
    pub daemon: Daemon,
    /// What recovery did with each migration an earlier run left.
    pub recovered: Vec<(ferry_wire::MigrationId, String)>,
    allowed: Vec<NodeId>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop_control: Option<tokio::sync::oneshot::Sender<()>>,
    control_task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Starts a node from `config`, with its staging and records on disk.
    pub async fn start(config: &NodeConfig) -> anyhow::Result<Self> {
        Self::start_with(config, Arc::new(DiskStorage)).await
    }

    /// Starts a node whose staging and records go through `storage`.
    pub async fn start_with(config: &NodeConfig, storage: Arc<dyn Storage>) -> anyhow::Result<Self> {
        let node_id = NodeId::new(config.node_id.clone()).context("invalid node id")?;
        let allowed: Vec<NodeId> = config
            .allowed_peers
            .iter()
            .cloned()
            .map(NodeId::new)
            .collect::<Result<_, _>>()
            .context("invalid allowed peer")?;
        let transport = crate::transfer::rdma::select::settle(config.transport, &config.rdma_settings())?;
        let identity = Arc::new(NodeIdentity::from_dir(&config.certs_dir, &node_id)?);
        let crypto = crate::tls::server_crypto(&identity, &allowed)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data folder {}", config.data_dir.display()))?;
        let endpoint = crate::quic::server_endpoint(
            config.listen,
            crypto,
            &QuicTuning::with_idle_timeout_ms(config.quic_idle_timeout_ms),
        )
        .with_context(|| format!("cannot listen on {}", config.listen))?;
        let quic_addr = endpoint.local_addr()?;
        let fallbacks = crate::transfer::rdma::select::FallbackNotices::default();
        let chunk_transport = crate::transfer::rdma::attach::for_node(&transport, &config.rdma_settings())
            .with_fallback_notices(fallbacks.clone());
        let ctx = Arc::new(
            TargetContext::new(node_id.clone(), config.data_dir.clone(), storage.clone())
                .with_chunk_transport(chunk_transport.clone()),
        );
        ctx.set_limits(TargetLimits {
            max_inbound_count: config.max_inbound_migrations,
            check_free_space: config.check_free_space,
        });
        ctx.load_existing();
        let server = tokio::spawn(target::serve(endpoint.clone(), ctx.clone()));
        let mut outbound_settings = outbound_config(config);
        outbound_settings.tuning.chunk_transport = chunk_transport;
        outbound_settings.tuning.bulk = config.bulk_threads();
        let outbound = Outbound::new(outbound_settings, identity.clone(), storage);
        let daemon = Daemon::new(node_id.clone(), quic_addr, ctx.clone(), outbound.clone(), transport, fallbacks);
        daemon.set_stall_after(std::time::Duration::from_secs(config.stall_after_secs));
        let events = daemon.spawn_events();
        daemon.announce_transport();
        let recovered = outbound.recover().await;
        for (id, outcome) in &recovered {
            tracing::info!(migration = %id, "recovery: {outcome}");
            daemon.announce(id, outcome);
        }
        let mut control_config = ControlConfig::new(config.control_socket_path());
        control_config.allowed_uids = config.control_allowed_uids.clone();
        let control = ControlServer::bind(control_config, Arc::new(daemon.clone()))?;
        let socket_path = control.socket_path().to_path_buf();
        // Releases a target missed are told in the background: it may be unreachable now.
        let mut tasks = vec![server, events, tokio::spawn(outbound.clone().tell_pending_releases())];
        let metrics_addr = match config.metrics_addr {
            Some(addr) => Some(serve_metrics(addr, &daemon, &ctx).await?),
            None => None,
        };
        let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
        let control_task = tokio::spawn(control.run(async move {
            let _ = control_stopped.await;
        }));
        if config.progress_interval_ms > 0 {
            tasks.push(spawn_progress_log(ctx.clone(), Duration::from_millis(config.progress_interval_ms)));
        }
        Ok(Self {
            node_id,
            quic_addr,
            socket_path,
            metrics_addr,
            endpoint,
            ctx,
            outbound,
            daemon,
            recovered,
            allowed,
            tasks,
            stop_control: Some(stop_control),
            control_task: Some(control_task),
        })
    }

    /// The node ids allowed to connect (for a certificate reload).
    pub fn allowed_peers(&self) -> &[NodeId] {
        &self.allowed
    }

    pub fn socket(&self) -> &Path {
        &self.socket_path
    }

    /// Checkpoints running migrations, closes the control socket and the QUIC endpoint.
    pub async fn shutdown(mut self) {
        self.outbound.checkpoint_all().await;
        if let Some(stop) = self.stop_control.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.control_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        self.endpoint.close(quinn::VarInt::from_u32(crate::quic::close_code::CANCELLED), b"daemon shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// The outbound registry's settings, from the node's configuration.
fn outbound_config(config: &NodeConfig) -> OutboundConfig {
    OutboundConfig {
        data_dir: config.data_dir.clone(),
        max_outbound_count: config.max_outbound_migrations,
        global_rate_limit_bytes_per_sec: config.rate_limit_bytes_per_sec,
        max_held_wal_bytes: config.max_held_wal_bytes,
        abort_timeout: Duration::from_secs(config.abort_timeout_secs),
        tuning: QuicTuning::with_idle_timeout_ms(config.quic_idle_timeout_ms),
        retry: ferry_wire::retry::RetryPolicy::with_deadline_ms(config.retry_deadline_secs.saturating_mul(1000)),
    }
}

/// Serves the Prometheus metrics on `addr` (`metrics_addr`), read from the daemon at each
/// scrape; the address bound.
async fn serve_metrics(addr: SocketAddr, daemon: &Daemon, ctx: &Arc<TargetContext>) -> anyhow::Result<SocketAddr> {
    let (daemon, ctx) = (daemon.clone(), ctx.clone());
    let scrape = Arc::new(move || {
        let received = ctx.inbound().values().map(|s| s.bytes_received_in_process).sum();
        crate::metrics::render(&daemon.statuses(), received)
    });
    let bound = crate::metrics::start(addr, scrape)
        .await
        .with_context(|| format!("cannot serve metrics on {addr} (metrics_addr)"))?;
    tracing::info!(%bound, "serving Prometheus metrics at /metrics");
    Ok(bound)
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(task) = &self.control_task {
            task.abort();
        }
    }
}

fn spawn_progress_log(ctx: Arc<TargetContext>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for (id, status) in ctx.inbound() {
                let m = &status.migration;
                if m.state == ferry_wire::proto::inbound::InboundState::Receiving {
                    tracing::info!(
                        migration = %id,
                        bytes_transferred = m.bytes_verified,
                        bytes_total = m.bytes_total,
                        files_staged = m.files_staged_count,
                        files_total = m.files_total_count,
                        "inbound base copy"
                    );
                }
            }
        }
    })
}
