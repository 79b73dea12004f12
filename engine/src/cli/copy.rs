//! `ferry copy`: an offline base copy, with this process as the source; its chunks over QUIC,
//! or over RDMA lanes with `--transport rdma` (chosen and fallen back from as `ferry serve`
//! does, see `transfer::rdma::select`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_wire::path::RelPath;
use ferry_wire::retry::RetryPolicy;
use ferry_wire::session::Progress;
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};
use tokio::sync::watch;

use super::addr::parse_socket_addr;
use super::out::outln;
use super::render::{parse_byte_size, parse_size, parse_size_u32};
use crate::quic::QuicTuning;
use crate::read::ReadMode;
use crate::snapshot::Snapshot;
use crate::tls::NodeIdentity;
use crate::transfer::rdma::attach::{self, ChunkTransport};
use crate::transfer::rdma::select::{self, RdmaRequired, RdmaSettings, TransportSetting};
use crate::transfer::source::{self, CopyReport, CopyRequest, RateHandle};
use crate::transfer::walsend::WalSourceConfig;
use ferry_wire::wal::{Layout, LayoutChoice};

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// This (source) node's id: the name in its certificate.
    #[arg(long)]
    pub node_id: String,
    /// Certificate folder made by `ferry certs`.
    #[arg(long)]
    pub certs: PathBuf,
    /// The target daemon's QUIC address: ip:port or host:port (a name is resolved once).
    #[arg(long, value_parser = parse_socket_addr)]
    pub target: SocketAddr,
    /// The target's node id (the name its certificate must carry).
    #[arg(long)]
    pub target_node: String,
    /// Folder holding the shard's immutable files. One without any file is refused unless
    /// --allow-empty says an empty shard is intended.
    #[arg(long)]
    pub segments_root: PathBuf,
    /// Copy an empty shard: a --segments-root without any file is intended, not a wrong path.
    #[arg(long)]
    pub allow_empty: bool,
    /// Files to ship, relative to the root (repeatable); default: every file under it.
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// Migration id (names the staging folder); default: copy-<vshard>-<base-lsn>. Running
    /// the same copy again resumes it from what the target holds.
    #[arg(long, visible_alias = "resume")]
    pub migration_id: Option<String>,
    /// The vShard the files belong to (recorded in the target's MANIFEST.json).
    #[arg(long)]
    pub vshard: u32,
    /// Every write with an LSN at or below this one is in the files.
    #[arg(long, default_value_t = 0)]
    pub base_lsn: u64,
    /// Chunk size: bytes, or a size such as 256KiB or 1MiB.
    #[arg(long, default_value_t = ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES, value_parser = parse_size_u32)]
    pub chunk_len: u32,
    /// Parallel uni streams per connection.
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// QUIC connections for chunks, each on its own endpoint (one endpoint drives its
    /// connections on one task: more connections use more cores). With --wal-dir the control
    /// and WAL streams get one more, with a small MTU, so their messages are not paced.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(ferry_wire::api::PARALLELISM_MAX_COUNT)))]
    pub connections: u32,
    /// Rate limit in bytes per second, e.g. 500MB, 1GiB (0: unlimited).
    #[arg(long, default_value = "0", value_parser = parse_byte_size)]
    pub rate_limit: u64,
    /// How chunks are read: mmap, uring, uring-direct or pread.
    #[arg(long, default_value = "mmap")]
    pub read_mode: ReadMode,
    /// Opaque JSON copied into the target's MANIFEST.json.
    #[arg(long)]
    pub db_meta: Option<String>,
    /// Leave the staging in state `copying` instead of `released` (a live migration continues).
    #[arg(long)]
    pub no_commit: bool,
    /// The source node's WAL folder: stream the vShard's records above --base-lsn alongside
    /// the base copy (WAL catch-up). Without it, only the base is copied.
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// WAL layout: auto, a (nodedb-wal 0.1-0.4, 54-byte header) or b (nodedb-wal 0.6).
    #[arg(long, default_value = "auto")]
    pub wal_layout: String,
    /// The WAL writer's flush alignment: bytes, or a size such as 4KiB.
    #[arg(long, default_value_t = 4096, value_parser = parse_size_u32)]
    pub wal_alignment: u32,
    /// End the catch-up once every selected record at or below this LSN is durable on the
    /// target, and release the staging there. Without it, catch-up runs until interrupted.
    #[arg(long)]
    pub until_lsn: Option<u64>,
    /// Most bytes of WAL segments held (hard-linked) for the target, e.g. 4GiB; over it the
    /// copy fails.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub max_held_wal_bytes: u64,
    /// Seconds to keep retrying transient failures (no answer, a lost connection) without
    /// progress before failing; permanent ones (a certificate name, the target's allow-list,
    /// a protocol version, a refused offer) fail at once.
    #[arg(long, default_value_t = ferry_wire::retry::RETRY_DEADLINE_DEFAULT_MS / 1000)]
    pub retry_deadline_secs: u64,
    /// What carries the chunks: quic, or rdma (RDMA WRITE over reliable-connected queue
    /// pairs; needs a ferry built with the `rdma` feature, a device with an active port, and a
    /// target daemon serving with transport = "rdma"). Control messages and the WAL always go
    /// over QUIC. When RDMA cannot be had the copy falls back to QUIC: a warning on stderr,
    /// and the report's `chunk_transport` and `rdma_fallback_reason` say so.
    #[arg(long, default_value = "quic", value_parser = parse_transport)]
    pub transport: TransportSetting,
    /// The RDMA device (e.g. mlx5_0); default: the first with an active port.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// The RDMA device's port.
    #[arg(long, default_value_t = select::RDMA_PORT_DEFAULT)]
    pub rdma_port: u8,
    /// The GID table index (RoCE v2 is usually not 0).
    #[arg(long, default_value_t = select::RDMA_GID_INDEX_DEFAULT)]
    pub rdma_gid_index: u8,
    /// With --transport rdma: fail at once, saying why, instead of falling back to QUIC when
    /// RDMA cannot be had (no `rdma` build, no usable device, a target without RDMA).
    #[arg(long)]
    pub require_rdma: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_transport(text: &str) -> Result<TransportSetting, String> {
    match text {
        "quic" => Ok(TransportSetting::Quic),
        "rdma" => Ok(TransportSetting::Rdma),
        other => Err(format!("{other:?} is not a chunk transport: use quic or rdma")),
    }
}

/// The copy's chunk transport from --transport and the --rdma flags, decided as `ferry serve`
/// decides from its configuration: RDMA when built in and a device is usable; else QUIC, with
/// the reason (a warning now, and in the report); or an error under --require-rdma.
fn chunk_transport(args: &CopyArgs) -> anyhow::Result<ChunkTransport> {
    if args.require_rdma && args.transport != TransportSetting::Rdma {
        anyhow::bail!("--require-rdma needs --transport rdma");
    }
    let settings = RdmaSettings {
        device: args.rdma_device.clone(),
        port: args.rdma_port,
        gid_index: args.rdma_gid_index,
        require: args.require_rdma,
    };
    let status = select::settle(args.transport, &settings).map_err(|RdmaRequired(reason)| {
        anyhow::anyhow!(
            "--require-rdma: rdma cannot be used: {reason}; fix that, or drop --require-rdma to fall back to QUIC"
        )
    })?;
    Ok(attach::for_node(&status, &settings))
}

pub fn run(args: CopyArgs) -> anyhow::Result<()> {
    let node_id = NodeId::new(args.node_id.clone()).context("invalid --node-id")?;
    let target_node = NodeId::new(args.target_node.clone()).context("invalid --target-node")?;
    let migration_id = MigrationId::new(
        args.migration_id.clone().unwrap_or_else(|| format!("copy-{}-{}", args.vshard, args.base_lsn)),
    )
    .context("invalid --migration-id")?;
    check_not_empty(&args.segments_root, !args.files.is_empty(), args.allow_empty)?;
    let files = if args.files.is_empty() {
        None
    } else {
        Some(args.files.iter().map(RelPath::new).collect::<Result<Vec<_>, _>>().context("invalid --file")?)
    };
    let db_meta = match &args.db_meta {
        Some(text) => serde_json::from_str(text).context("--db-meta is not valid JSON")?,
        None => serde_json::Value::Null,
    };
    let wal = wal_source(&args)?;
    let chunk_transport = chunk_transport(&args)?;
    let identity = NodeIdentity::from_dir(&args.certs, &node_id)?;
    let request = CopyRequest {
        migration_id,
        vshard_id: VShardId(args.vshard),
        base_lsn: Lsn(args.base_lsn),
        segments_root: args.segments_root,
        files,
        db_meta,
        target_addr: args.target,
        target_node,
        chunk_len_bytes: args.chunk_len,
        streams_count: args.streams,
        connections_count: args.connections,
        rate_limit_bytes_per_sec: args.rate_limit,
        read_mode: args.read_mode,
        commit: !args.no_commit,
        wal,
        cutover: None,
        retry: RetryPolicy::with_deadline_ms(args.retry_deadline_secs.saturating_mul(1000)),
    };
    let json = args.json;
    let (segments_root, snapshot_id) = (request.segments_root.clone(), request.migration_id.clone());
    let runtime = super::runtime()?;
    let result = runtime.block_on(async move {
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let printer = tokio::spawn(print_progress(progress_rx, request.wal.is_some()));
        let rate = RateHandle::new(request.rate_limit_bytes_per_sec, u64::from(request.chunk_len_bytes));
        let stop = stop_signal()?;
        let tuning = QuicTuning { chunk_transport, ..QuicTuning::default() };
        let copy = source::copy(&identity, &tuning, request, progress_tx, rate);
        // An interrupted copy ends like a failed one: what the target staged stays for a resume.
        let result = tokio::select! {
            result = copy => result.map_err(anyhow::Error::from),
            signal = stop => Err(anyhow::anyhow!(
                "interrupted by {signal}: the target keeps what it staged, the same command resumes"
            )),
        };
        printer.abort();
        result
    });
    // An interrupted copy's blocking reads end on their own; they are not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    // Nothing needs the links any more, whatever the outcome: a copy that succeeded is staged,
    // and one that failed resumes from what the target holds (the same command links the
    // files again). Only a process killed outright leaves them (`ferry snapshots clean`).
    if let Err(e) = Snapshot::remove(&segments_root, &snapshot_id) {
        super::out::errln!(
            "ferry: warning: {e}; `ferry snapshots clean --segments-root {} --migration-id {snapshot_id}` removes them",
            segments_root.display()
        );
    }
    print_report(&result?, json)
}

/// Resolves with the signal's name at the first SIGINT or SIGTERM.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

/// The WAL to stream (`--wal-dir` and the flags about it), if any.
fn wal_source(args: &CopyArgs) -> anyhow::Result<Option<WalSourceConfig>> {
    let Some(dir) = &args.wal_dir else { return Ok(None) };
    let layout = match args.wal_layout.as_str() {
        "auto" => LayoutChoice::Auto,
        "a" | "A" => LayoutChoice::Fixed(Layout::A),
        "b" | "B" => LayoutChoice::Fixed(Layout::B),
        other => anyhow::bail!("invalid --wal-layout {other:?}: use auto, a or b"),
    };
    Ok(Some(WalSourceConfig {
        dir: dir.clone(),
        layout,
        alignment_bytes: args.wal_alignment,
        until_lsn: args.until_lsn.map(Lsn),
        max_held_wal_bytes: args.max_held_wal_bytes,
        poll_interval: crate::transfer::walsend::POLL_INTERVAL,
    }))
}

/// The copy's final report on stdout: JSON with `--json`, else one line.
fn print_report(report: &CopyReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?)?;
    } else if report.already_staged {
        outln!(
            "{} files, {} bytes were already staged on the target: nothing sent; staging {}",
            report.files_count,
            report.bytes_total,
            if report.committed { "released" } else { "copying" },
        )?;
    } else {
        // A resumed copy says how much the target held already (not sent again).
        let resumed = match report.bytes_resumed {
            0 => String::new(),
            bytes => format!(", resumed: {bytes} bytes were on the target already"),
        };
        // RDMA, asked for: whether the chunks had it, or why not.
        let transport = match (report.chunk_transport, &report.rdma_fallback_reason) {
            (_, Some(reason)) => format!(", chunks over quic: rdma fell back ({reason})"),
            (Some(TransportSetting::Rdma), None) => ", chunks over rdma".to_owned(),
            _ => String::new(),
        };
        outln!(
            "copied {} files, {} bytes in {:.3} s ({:.1} MB/s), resent {} bytes, {} reconnects, read with {}, staging {}{resumed}{transport}",
            report.files_count,
            report.bytes_total,
            report.elapsed_us as f64 / 1e6,
            report.throughput_bytes_per_sec as f64 / 1e6,
            report.bytes_resent,
            report.reconnects_count,
            report.read_mode,
            if report.committed { "released" } else { "copying" },
        )?;
    }
    Ok(())
}

/// Refuses a segments root without any file, unless `allow_empty`: a copy of nothing that
/// "succeeds" is almost always a wrong path. Files named with --file are checked by the copy.
/// `ferry copy` and `ferry migrate` both check with it.
pub(super) fn check_not_empty(segments_root: &Path, files_named: bool, allow_empty: bool) -> anyhow::Result<()> {
    if files_named || allow_empty {
        return Ok(());
    }
    if Snapshot::list(segments_root)?.is_empty() {
        anyhow::bail!(
            "--segments-root {} holds no files: check the path, or pass --allow-empty if an empty shard is intended",
            segments_root.display()
        );
    }
    Ok(())
}

/// Progress on stderr every 500 ms. Without a WAL (`streams_wal` false) there is no catch-up:
/// the phase stays `BaseCopy` until the commit.
async fn print_progress(mut progress: watch::Receiver<Progress>, streams_wal: bool) {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let p = *progress.borrow_and_update();
        if p.bytes_total == 0 && p.files_total_count == 0 {
            continue;
        }
        let percent =
            if p.bytes_total == 0 { 100.0 } else { p.bytes_transferred as f64 * 100.0 / p.bytes_total as f64 };
        let rate = p.bytes_transferred as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let mut err = std::io::stderr().lock();
        let wal = match (p.wal_durable_lsn, p.wal_source_lsn) {
            (Some(durable), Some(source)) => {
                format!(", WAL durable LSN {durable}, source LSN {source}, lag {}", source.saturating_sub(durable))
            }
            _ => String::new(),
        };
        let phase = if p.base_staged && streams_wal { "WalCatchUp" } else { "BaseCopy" };
        let _ = writeln!(
            err,
            "{phase}: {}/{} bytes ({percent:.1}%), {}/{} files staged, {:.1} MB/s{wal}",
            p.bytes_transferred,
            p.bytes_total,
            p.files_staged_count,
            p.files_total_count,
            rate / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(extra: &[&str]) -> CopyArgs {
        let mut argv = vec!["ferry", "copy", "--node-id", "a", "--certs", "/c", "--target-node", "b", "--vshard", "7"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Copy(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn an_empty_segments_root_is_refused_unless_allowed() {
        let root = tempfile::tempdir().unwrap();
        let err = check_not_empty(root.path(), false, false).unwrap_err().to_string();
        assert!(err.contains("holds no files") && err.contains("--allow-empty"), "{err}");
        check_not_empty(root.path(), false, true).unwrap();
        check_not_empty(root.path(), true, false).unwrap();
        std::fs::write(root.path().join("seg-1"), b"x").unwrap();
        check_not_empty(root.path(), false, false).unwrap();
        let missing = root.path().join("missing");
        let err = format!("{:#}", check_not_empty(&missing, false, false).unwrap_err());
        assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    }

    #[test]
    fn the_rdma_flags_default_as_the_daemon_s_keys_and_refuse_what_they_cannot_use() {
        let plain = parse(&["--target", "10.0.0.2:7070", "--segments-root", "/s"]);
        let config = crate::config::NodeConfig::default();
        assert_eq!(
            (plain.transport, plain.rdma_device.clone(), plain.rdma_port, plain.rdma_gid_index, plain.require_rdma),
            (config.transport, config.rdma_device, config.rdma_port, config.rdma_gid_index, config.require_rdma)
        );
        assert_eq!(chunk_transport(&plain).unwrap().setting(), TransportSetting::Quic);
        let rdma = parse(&["--target", "10.0.0.2:7070", "--segments-root", "/s", "--transport", "rdma"]);
        assert_eq!(rdma.transport, TransportSetting::Rdma);
        let argv = ["ferry", "copy", "--node-id", "a", "--certs", "/c", "--target-node", "b", "--vshard", "7"];
        let err = Cli::try_parse_from(argv.iter().chain(&[
            "--target",
            "10.0.0.2:7070",
            "--segments-root",
            "/s",
            "--transport",
            "tcp",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("use quic or rdma"), "{err}");
        let err = Cli::try_parse_from(argv.iter().chain(&[
            "--target",
            "10.0.0.2:7070",
            "--segments-root",
            "/s",
            "--rdma-port",
            "256",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("--rdma-port"), "{err}");
        let alone = parse(&["--target", "10.0.0.2:7070", "--segments-root", "/s", "--require-rdma"]);
        let err = chunk_transport(&alone).unwrap_err().to_string();
        assert!(err.contains("--require-rdma needs --transport rdma"), "{err}");
    }

    #[test]
    fn sizes_and_host_names_are_accepted() {
        let args = parse(&[
            "--target",
            "localhost:7070",
            "--segments-root",
            "/s",
            "--rate-limit",
            "500MB",
            "--chunk-len",
            "256KiB",
            "--wal-alignment",
            "4KiB",
            "--max-held-wal-bytes",
            "1GiB",
        ]);
        assert!(args.target.ip().is_loopback() && args.target.port() == 7070);
        assert_eq!((args.rate_limit, args.chunk_len, args.wal_alignment), (500_000_000, 256 << 10, 4096));
        assert_eq!(args.max_held_wal_bytes, 1 << 30);
        let plain = parse(&["--target", "10.0.0.2:7070", "--segments-root", "/s", "--rate-limit", "1000"]);
        assert_eq!((plain.rate_limit, plain.chunk_len), (1000, ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES));
        assert_eq!((plain.max_held_wal_bytes, plain.wal_alignment, plain.allow_empty), (4 << 30, 4096, false));
    }
}
