//! The live part of `ferry demo`: two daemons, the reference writer, and a migration driven
//! through the source daemon's control socket from `migration.start` to `migration.release`.
//!
//! What it does: [`run`] starts both daemons on this runtime, starts the writer, waits out the
//! baseline, takes `base_lsn`, writes the export and the bulk files, starts the migration,
//! polls `migration.status` through BaseCopy and WalCatchUp (drawing a progress line per phase
//! and keeping lag samples), runs [`cut_over`] with the writer as its [`WriteControl`], lets
//! the writer write to the target for a while, stops it, waits for the source to say
//! `Completed`, and shuts both daemons down. It returns everything the report needs as a
//! [`LiveRun`].
//!
//! What it does not: verify or report (see the parent module and [`super::report`]).
//!
//! Invariants: every stamp is CLOCK_MONOTONIC ns, the writer log's clock; the writer is
//! stopped on every path (dropping a [`RefWriter`] stops it, also while paused); lag samples are
//! capped at [`LAG_SAMPLES_MAX_COUNT`]; a migration that fails, or leaves the phase expected,
//! ends the demo with its reason.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_wire::api::{MigrationStatus, Phase, StartParams};
use ferry_wire::{Lsn, MigrationId};

use super::progress::{self, ProgressLine, POLL_INTERVAL};
use super::{DemoArgs, Dirs, MIGRATION_ID, SOURCE_NODE, TARGET_NODE, VSHARD};
use crate::cli::coordinator::{cut_over, CutOverOptions, CutOverOutcome, RefWrites};
use crate::cli::out::errln;
use crate::clock::monotonic_ns;
use crate::config::NodeConfig;
use crate::control::ControlClient;
use crate::node::RunningNode;
use ferry_refnode::{BulkReport, ExportReport, RefWriter, RefWriterConfig, WriterLog};

/// Most lag samples kept: at one per poll, over an hour of migration.
const LAG_SAMPLES_MAX_COUNT: usize = 100_000;
/// How long the cut-over waits for the lag to fit the budget before giving up (writes are
/// never paused in that wait).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the release may take to show as `Completed` on the source.
const COMPLETED_WAIT: Duration = Duration::from_secs(10);

/// A look at the migration during BaseCopy and WalCatchUp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LagSample {
    pub at_ns: u64,
    pub catching_up: bool,
    /// The target's durable LSN (`wal.current_lsn`), when the daemon knows it.
    pub durable_lsn: Option<u64>,
    /// The vShard's source tip as the daemon's tail has read it (`wal.source_lsn`): from the
    /// same snapshot as `durable_lsn`, refreshed by the daemon every 100 ms.
    pub source_lsn: Option<u64>,
}

/// CLOCK_MONOTONIC ns of the run's boundaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Stamps {
    pub baseline_end_ns: u64,
    pub migration_started_ns: u64,
    /// The first poll that said `WalCatchUp`.
    pub base_done_ns: u64,
    pub cut_over_started_ns: u64,
    pub released_ns: u64,
}

/// The base copy as the source daemon reported it when it reached `WalCatchUp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct BaseCopy {
    pub bytes: u64,
    pub files_count: u64,
    pub bytes_resent: u64,
    /// The daemon's own average, since the migration started.
    pub daemon_throughput_bytes_per_sec: u64,
}

/// What the live run produced.
#[derive(Debug)]
pub(super) struct LiveRun {
    pub log: WriterLog,
    pub base_lsn: Lsn,
    pub export: ExportReport,
    pub bulk: Option<BulkReport>,
    pub stamps: Stamps,
    pub base: BaseCopy,
    pub samples: Vec<LagSample>,
    pub cut: CutOverOutcome,
    /// The source's final status (`Completed` unless something is wrong).
    pub source_final: MigrationStatus,
    /// The target daemon's view of its staging at the end.
    pub target_staging_state: Option<String>,
}

fn node_config(dirs: &Dirs, name: &str, data_dir: &Path, peer: &str) -> NodeConfig {
    NodeConfig {
        node_id: name.into(),
        data_dir: data_dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        certs_dir: dirs.certs.clone(),
        allowed_peers: vec![peer.into()],
        progress_interval_ms: 0,
        ..NodeConfig::default()
    }
}

fn absolute(path: &Path) -> anyhow::Result<String> {
    let path = std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))?;
    path.to_str().map(str::to_owned).with_context(|| format!("{} is not valid UTF-8", path.display()))
}

fn start_params(args: &DemoArgs, dirs: &Dirs, base_lsn: Lsn, target: SocketAddr) -> anyhow::Result<StartParams> {
    let params = StartParams {
        migration_id: Some(MIGRATION_ID.into()),
        vshard_id: VSHARD.0,
        segments_root: absolute(&dirs.export_root)?,
        files: None,
        wal_dir: Some(absolute(&dirs.source_wal)?),
        wal_layout: "a".into(),
        wal_alignment_bytes: 4096,
        base_lsn: base_lsn.0,
        target_address: target.to_string(),
        target_node_id: TARGET_NODE.into(),
        write_pause_budget_us: args.budget_us,
        rate_limit_bytes_per_sec: 0,
        connections: args.connections,
        streams: args.streams,
        chunk_len_bytes: args.chunk_len,
        read_mode: "mmap".into(),
        db_meta: serde_json::json!({ "demo": true, "reference_node": "ferry refnode export + bulk" }),
        offline: false,
        until_lsn: None,
    };
    params.validate().context("the demo built invalid migration.start params")?;
    Ok(params)
}

/// Sleeps `duration`, or fails when the user interrupts.
async fn sleep_or_interrupt(duration: Duration) -> anyhow::Result<()> {
    tokio::select! {
        _ = tokio::time::sleep(duration) => Ok(()),
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// Polls the source's status of the migration; the sample is kept (up to the cap).
async fn poll(
    client: &mut ControlClient,
    id: &MigrationId,
    samples: &mut Vec<LagSample>,
) -> anyhow::Result<(MigrationStatus, u64)> {
    let status = client.status(id).await.context("migration.status on the source daemon failed")?;
    let at_ns = monotonic_ns();
    if samples.len() < LAG_SAMPLES_MAX_COUNT {
        samples.push(LagSample {
            at_ns,
            catching_up: status.phase == Phase::WalCatchUp,
            durable_lsn: status.wal.current_lsn,
            source_lsn: status.wal.source_lsn,
        });
    }
    if status.phase == Phase::Failed {
        bail!("the migration failed: {}", status.reason.as_deref().unwrap_or("the daemon gave no reason"));
    }
    Ok((status, at_ns))
}

/// The polls of the source's status from `migration.start` to the cut-over: the samples kept,
/// the progress line drawn.
struct Watch<'a> {
    client: &'a mut ControlClient,
    id: &'a MigrationId,
    samples: Vec<LagSample>,
    tick: tokio::time::Interval,
    line: ProgressLine,
}

impl<'a> Watch<'a> {
    fn new(client: &'a mut ControlClient, id: &'a MigrationId) -> Self {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watch { client, id, samples: Vec::new(), tick, line: ProgressLine::new() }
    }

    /// Polls until the base is copied (the first `WalCatchUp`): the base copy as the daemon
    /// reported it, and when that poll was.
    async fn base_copy(&mut self, started_ns: u64) -> anyhow::Result<(BaseCopy, u64)> {
        let (base_status, base_done_ns) = loop {
            tokio::select! {
                _ = self.tick.tick() => {}
                _ = tokio::signal::ctrl_c() => bail!("interrupted during the base copy"),
            }
            let (status, at_ns) = poll(self.client, self.id, &mut self.samples).await?;
            let elapsed_us = at_ns.saturating_sub(started_ns) / 1_000;
            match status.phase {
                Phase::BaseCopy => self.line.show(&progress::base_copy_line(&status, elapsed_us)),
                Phase::WalCatchUp => {
                    self.line.finish(&progress::base_done_line(status.bytes_total, status.files_total, elapsed_us));
                    break (status, at_ns);
                }
                other => bail!("the migration went to {other:?} before the cut-over; expected BaseCopy or WalCatchUp"),
            }
        };
        let base = BaseCopy {
            bytes: base_status.bytes_total,
            files_count: base_status.files_total,
            bytes_resent: base_status.bytes_resent,
            daemon_throughput_bytes_per_sec: base_status.throughput_bytes_per_sec,
        };
        Ok((base, base_done_ns))
    }

    /// Polls through `catch_up_us` of WAL catch-up after `base_done_ns`.
    async fn catch_up(&mut self, base_done_ns: u64, catch_up_us: u64) -> anyhow::Result<()> {
        loop {
            let elapsed_us = monotonic_ns().saturating_sub(base_done_ns) / 1_000;
            if elapsed_us >= catch_up_us {
                break;
            }
            tokio::select! {
                _ = self.tick.tick() => {}
                _ = tokio::signal::ctrl_c() => bail!("interrupted during the WAL catch-up"),
            }
            let (status, at_ns) = poll(self.client, self.id, &mut self.samples).await?;
            if status.phase != Phase::WalCatchUp {
                bail!("the migration left WalCatchUp for {:?} before the cut-over", status.phase);
            }
            let elapsed_us = at_ns.saturating_sub(base_done_ns) / 1_000;
            self.line.show(&progress::catch_up_line(&status, elapsed_us, catch_up_us));
        }
        let (status, _) = poll(self.client, self.id, &mut self.samples).await?;
        self.line.finish(&progress::catch_up_line(&status, catch_up_us, catch_up_us));
        Ok(())
    }
}

/// The base at the writer's last acknowledged LSN: the reference node's export of the
/// migrating vShard's writes up to it, and bulk files up to `--shard-size`.
fn prepare_base(
    args: &DemoArgs,
    dirs: &Dirs,
    writer: &RefWriter,
) -> anyhow::Result<(Lsn, ExportReport, Option<BulkReport>)> {
    let base_lsn = writer.acked_lsn();
    let entries = writer.migrating_source_writes(base_lsn);
    let export = ferry_refnode::export_base(&dirs.export_root, VSHARD, base_lsn, &entries)
        .context("the reference node's base export failed")?;
    let bulk_bytes = args.shard_size.saturating_sub(export.bytes);
    errln!(
        "ferry demo: base_lsn {}: exported {} vShard-{} writes ({}); generating {} of bulk files (not timed as copy)",
        base_lsn.0,
        export.entries_count,
        VSHARD.0,
        crate::cli::render::format_bytes(export.bytes),
        crate::cli::render::format_bytes(bulk_bytes),
    );
    let bulk = if bulk_bytes > 0 {
        Some(
            ferry_refnode::generate_bulk(&dirs.export_root, bulk_bytes, args.files)
                .context("cannot generate the bulk files")?,
        )
    } else {
        None
    };
    Ok((base_lsn, export, bulk))
}

/// Runs the live part of the demo (see the module docs).
pub(super) async fn run(args: &DemoArgs, dirs: &Dirs) -> anyhow::Result<LiveRun> {
    let source = RunningNode::start(&node_config(dirs, SOURCE_NODE, &dirs.source_data, TARGET_NODE))
        .await
        .context("cannot start the source daemon")?;
    let target = RunningNode::start(&node_config(dirs, TARGET_NODE, &dirs.target_data, SOURCE_NODE))
        .await
        .context("cannot start the target daemon")?;
    errln!(
        "ferry demo: daemons up: {SOURCE_NODE} (QUIC {}, control socket {}) and {TARGET_NODE} (QUIC {}, control socket {})",
        source.quic_addr,
        source.socket().display(),
        target.quic_addr,
        target.socket().display()
    );
    let writer = RefWriter::start(RefWriterConfig {
        rate_writes_per_sec: args.write_rate,
        ..RefWriterConfig::new(&dirs.source_wal, VSHARD)
    })
    .context("cannot start the reference writer")?;
    errln!(
        "ferry demo: reference writer: {} writes/s to {} (NodeDB layout A, one in four to vShard {}); {} ms alone for the latency baseline",
        args.write_rate,
        dirs.source_wal.display(),
        VSHARD.0,
        args.baseline_ms
    );
    sleep_or_interrupt(Duration::from_millis(args.baseline_ms)).await?;
    let mut stamps = Stamps { baseline_end_ns: monotonic_ns(), ..Stamps::default() };

    let (base_lsn, export, bulk) = prepare_base(args, dirs, &writer)?;

    let id = MigrationId::new(MIGRATION_ID)?;
    let params = start_params(args, dirs, base_lsn, target.quic_addr)?;
    let mut client = ControlClient::connect(source.socket()).await.context("cannot connect to the source daemon")?;
    stamps.migration_started_ns = monotonic_ns();
    client.start(&params).await.context("the source daemon refused migration.start")?;
    errln!("ferry demo: migration.start {MIGRATION_ID} (live, base_lsn {}) on {SOURCE_NODE}'s socket", base_lsn.0);

    let mut watch = Watch::new(&mut client, &id);
    let (base, base_done_ns) = watch.base_copy(stamps.migration_started_ns).await?;
    stamps.base_done_ns = base_done_ns;
    watch.catch_up(stamps.base_done_ns, args.catch_up_ms.saturating_mul(1_000)).await?;
    let Watch { mut line, samples, .. } = watch;

    errln!(
        "cut-over      prepare until the estimate fits {} us, pause the writer, fence, resume it on {TARGET_NODE}, release",
        args.budget_us
    );
    let node_wal = dirs.node_wal();
    let mut writes = RefWrites { writer: &writer, target_node_wal: Some(&node_wal) };
    let options = CutOverOptions {
        fence_retries: 3,
        catch_up_timeout: CATCH_UP_TIMEOUT,
        retry_interval: Duration::from_millis(100),
    };
    stamps.cut_over_started_ns = monotonic_ns();
    let cut = cut_over(&mut client, &id, &mut writes, options).await.context("the cut-over failed")?;
    stamps.released_ns = monotonic_ns();
    line.finish(&progress::cut_over_line(&cut));

    errln!(
        "ferry demo: after release: vShard {}'s writes go to {} for {} ms",
        VSHARD.0,
        node_wal.display(),
        args.after_ms
    );
    sleep_or_interrupt(Duration::from_millis(args.after_ms)).await?;
    let log = writer.stop().context("the reference writer failed")?;

    let source_final = wait_completed(&mut client, &id).await?;
    let target_staging_state = match ControlClient::connect(target.socket()).await {
        Ok(mut target_client) => target_client.status(&id).await.ok().and_then(|s| s.staging_state),
        Err(_) => None,
    };
    source.shutdown().await;
    target.shutdown().await;
    Ok(LiveRun { log, base_lsn, export, bulk, stamps, base, samples, cut, source_final, target_staging_state })
}

/// The source's status once it says `Completed` (or the last one seen, after a deadline).
async fn wait_completed(client: &mut ControlClient, id: &MigrationId) -> anyhow::Result<MigrationStatus> {
    let deadline = tokio::time::Instant::now() + COMPLETED_WAIT;
    loop {
        let status = client.status(id).await.context("migration.status on the source daemon failed")?;
        if status.phase.is_final() || tokio::time::Instant::now() >= deadline {
            return Ok(status);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
