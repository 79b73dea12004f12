//! `ferry migrate`: a reference coordinator driving the SOURCE daemon over its control socket.
//!
//! What it does: with `--offline` (a shard nobody writes to), builds `migration.start`'s
//! parameters from flags that mirror `ferry copy`'s, subscribes to the migration's events,
//! starts it, shows its progress on stderr (live bars on a terminal without `--json`, a line
//! per change otherwise) until it is Completed or Failed, then prints a
//! final report (text or `--json`) and exits non-zero if it failed. Running the same command
//! again is idempotent (the daemon answers `created: false`) and follows the same migration.
//!
//! Without `--offline` the migration is live: it needs `--wal-dir` and the three commands that
//! pause and resume the database's writes. Once the migration is in `WalCatchUp` it runs the
//! cut-over ([`super::coordinator::cut_over`]): prepare until the estimated pause fits the budget,
//! `--pause-cmd` (prints the last acknowledged LSN: `final_lsn`), fence, `--resume-cmd` (writes
//! resume on the target) and release; a cancelled or violated fence runs
//! `--resume-source-cmd` and is tried again up to `--fence-retries` times.
//!
//! What it does not: Ctrl-C stops following, not the migration, which carries on in the
//! daemon (`ferry abort` stops it).
//!
//! Invariants: paths sent to the daemon are absolute (it refuses relative ones); parameters are
//! checked with [`StartParams::validate`] before anything is sent; only the source role's
//! status decides the end (a loopback daemon also reports the target role).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_wire::api::{MigrationStatus, Phase, Role, StartParams, WRITE_PAUSE_BUDGET_DEFAULT_US};
use ferry_wire::MigrationId;
use serde::Serialize;

use super::addr::parse_socket_addr;
use super::bars::{Bars, Draw};
use super::coordinator::{CutOverOptions, CutOverOutcome, ShellWrites};
use super::ops::{self, SocketArgs, Tracked};
use super::out::{errln, outln};
use super::render::{format_bytes, parse_byte_size, parse_size_u32, render_line};
use crate::control::typed::MigrationEvent;
use crate::control::ErrorCode;

const MIGRATE_HELP: &str = "\
Talks to the SOURCE node's daemon (--socket or --config of the source node). The daemon copies
the shard's files (and with --wal-dir its WAL records above --base-lsn, up to --until-lsn) to
the target daemon over QUIC and releases the target's staging. Progress goes to stderr (live
bars with bytes, rate, ETA, WAL lag and \"no progress for N s\" on a terminal without --json, a
line per change otherwise); the
final report (migration id, files and bytes copied, resent bytes, duration, average rate, WAL
durable LSN, staging state) goes to stdout, as JSON with --json. Exits non-zero if the
migration fails, with its reason. Running the same command again follows the same migration.
Ctrl-C stops following; the migration continues (`ferry status ID --watch`, `ferry abort ID`).

Without --offline the migration is live (--wal-dir required): once the base is staged and the
catch-up runs, the command cuts over: migration.prepare_cutover until the estimated pause fits
--budget-us (writes are not paused before), then --pause-cmd (it must pause the vShard's writes
and print the last acknowledged LSN as its last word), migration.fence, --resume-cmd (writes
resume on the TARGET), migration.release. A fence that is cancelled (over budget) or violated
(a write above final_lsn) runs --resume-source-cmd and is tried again, up to --fence-retries.
The report gives the pause in microseconds and its parts. Commands run with `sh -c`.

Example:
  ferry migrate --offline --socket /var/lib/ferry/control/ferry.sock --vshard 7 \\
      --segments-root /data/shard-7 --target 10.0.0.2:7070 --target-node node-b --rate-limit 500MB
  ferry migrate --socket /var/lib/ferry/control/ferry.sock --vshard 7 --base-lsn 1200 \\
      --segments-root /data/export/vshard-7 --wal-dir /data/wal --target 10.0.0.2:7070 --target-node node-b \\
      --pause-cmd 'db-ctl pause 7' --resume-cmd 'db-ctl route 7 node-b' --resume-source-cmd 'db-ctl resume 7'";

/// `ferry migrate`.
#[derive(Debug, Args)]
#[command(after_long_help = MIGRATE_HELP)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub connect: SocketArgs,
    /// The shard takes no writes during the migration: copy, then release the staging. Without
    /// it the migration is live and ends with the cut-over fence.
    #[arg(long)]
    pub offline: bool,
    /// The vShard to migrate (its records are selected from --wal-dir).
    #[arg(long, required = true)]
    pub vshard: Option<u32>,
    /// Folder holding the shard's immutable files on the source node (made absolute). One
    /// without any file is refused unless --allow-empty says an empty shard is intended.
    #[arg(long, required = true)]
    pub segments_root: Option<PathBuf>,
    /// Migrate an empty shard: a --segments-root without any file is intended, not a wrong path.
    #[arg(long)]
    pub allow_empty: bool,
    /// Files to ship, relative to the root (repeatable); default: every file under it.
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// Every write with an LSN at or below this one is in the files.
    #[arg(long, default_value_t = 0)]
    pub base_lsn: u64,
    /// The target daemon's QUIC address: ip:port or host:port (a name is resolved here, once,
    /// and the daemon is given the address).
    #[arg(long, required = true, value_parser = parse_socket_addr)]
    pub target: Option<SocketAddr>,
    /// The target's node id (the name its certificate must carry).
    #[arg(long, required = true)]
    pub target_node: Option<String>,
    /// Migration id; default m-<vshard>-<base-lsn>. The same id and flags again is idempotent.
    #[arg(long)]
    pub migration_id: Option<String>,
    /// QUIC connections for chunks (a live migration has one more for the control and WAL
    /// streams).
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Parallel streams per connection.
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// Chunk size: bytes, or a size such as 256KiB or 1MiB.
    #[arg(long, default_value_t = ferry_wire::limits::CHUNK_LEN_DEFAULT_BYTES, value_parser = parse_size_u32)]
    pub chunk_len: u32,
    /// Rate limit in bytes per second, e.g. 500MB, 1GiB (0: unlimited); `ferry set-rate`
    /// changes it while running.
    #[arg(long, default_value = "0", value_parser = parse_byte_size)]
    pub rate_limit: u64,
    /// How the source reads chunks: mmap, uring, uring-direct or pread.
    #[arg(long, default_value = "mmap")]
    pub read_mode: String,
    /// Opaque JSON copied into the target's MANIFEST.json.
    #[arg(long)]
    pub db_meta: Option<String>,
    /// The source node's WAL folder (made absolute): stream the vShard's records above
    /// --base-lsn. Without it, only the base is copied.
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// WAL layout: auto, a or b.
    #[arg(long, default_value = "auto")]
    pub wal_layout: String,
    /// The WAL writer's flush alignment: bytes, or a size such as 4KiB.
    #[arg(long, default_value_t = 4096, value_parser = parse_size_u32)]
    pub wal_alignment: u32,
    /// With --wal-dir: release once every selected record at or below this LSN is durable on
    /// the target.
    #[arg(long)]
    pub until_lsn: Option<u64>,
    /// Live: the write pause budget of the cut-over, in microseconds.
    #[arg(long, default_value_t = WRITE_PAUSE_BUDGET_DEFAULT_US)]
    pub budget_us: u64,
    /// Live: pauses the vShard's writes on the source and prints the last acknowledged LSN.
    #[arg(long)]
    pub pause_cmd: Option<String>,
    /// Live: after a completed fence, resumes the vShard's writes on the target (routing flip).
    #[arg(long)]
    pub resume_cmd: Option<String>,
    /// Live: after a cancelled fence, resumes the vShard's writes on the source.
    #[arg(long)]
    pub resume_source_cmd: Option<String>,
    /// Live: fences tried again after a cancelled or violated one.
    #[arg(long, default_value_t = 3)]
    pub fence_retries: u32,
    /// Live: give up (writes never paused) when the lag does not fit the budget within this.
    #[arg(long, default_value_t = 600)]
    pub catch_up_timeout_secs: u64,
}

/// What `ferry migrate --json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    migration_id: &'a str,
    /// `false`: the daemon already ran this migration; this command followed it.
    created: bool,
    status: &'a MigrationStatus,
    /// Live: the fence, the pause and its parts, and the fences that did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    cut_over: Option<&'a CutOverOutcome>,
}

/// The cut-over's lines, for people.
pub fn cut_over_report(cut: &CutOverOutcome) -> String {
    let p = &cut.release.pause;
    let b = &p.breakdown;
    let mut text = format!(
        "cut-over at final_lsn {}: writes paused {} us (estimate {} us, budget {} us{}): before fence {} us, drain {} us, target durable {} us, apply wait {} us, after fence {} us",
        cut.release.final_lsn,
        p.pause_duration_us,
        p.estimate_us,
        p.budget_us,
        if p.over_budget { ", OVER BUDGET" } else { "" },
        b.before_fence_us,
        b.drain_us,
        b.target_durable_us,
        b.apply_wait_us,
        b.after_fence_us,
    );
    for failed in &cut.failed_fences {
        text.push_str(&format!(
            "\n  fence at {} did not complete ({} us paused, resumed on the source): {}",
            failed.final_lsn, failed.paused_us, failed.error
        ));
    }
    text
}

fn absolute(flag: &str, path: &Path) -> anyhow::Result<String> {
    let path = std::path::absolute(path).with_context(|| format!("cannot make {flag} {} absolute", path.display()))?;
    path.to_str().map(str::to_owned).with_context(|| format!("{flag} {} is not valid UTF-8", path.display()))
}

fn required<T>(value: Option<T>, flag: &str) -> anyhow::Result<T> {
    value.with_context(|| format!("{flag} is required"))
}

/// The `migration.start` parameters the flags describe (offline).
pub fn start_params(args: &MigrateArgs) -> anyhow::Result<StartParams> {
    let vshard_id = required(args.vshard, "--vshard")?;
    let segments_root = absolute("--segments-root", required(args.segments_root.as_deref(), "--segments-root")?)?;
    let wal_dir = args.wal_dir.as_deref().map(|dir| absolute("--wal-dir", dir)).transpose()?;
    let db_meta = match &args.db_meta {
        Some(text) => serde_json::from_str(text).context("--db-meta is not valid JSON")?,
        None => serde_json::Value::Null,
    };
    let mut params = StartParams {
        migration_id: args.migration_id.clone(),
        vshard_id,
        segments_root,
        files: if args.files.is_empty() { None } else { Some(args.files.clone()) },
        wal_dir,
        wal_layout: args.wal_layout.clone(),
        wal_alignment_bytes: args.wal_alignment,
        base_lsn: args.base_lsn,
        target_address: required(args.target, "--target")?.to_string(),
        target_node_id: required(args.target_node.clone(), "--target-node")?,
        write_pause_budget_us: args.budget_us,
        rate_limit_bytes_per_sec: args.rate_limit,
        connections: args.connections,
        streams: args.streams,
        chunk_len_bytes: args.chunk_len,
        read_mode: args.read_mode.clone(),
        db_meta,
        offline: args.offline,
        until_lsn: args.until_lsn,
    };
    if !args.offline && params.wal_dir.is_none() {
        anyhow::bail!(
            "a live migration needs --wal-dir (the source WAL to stream until the cut-over); for a shard nobody writes to, add --offline"
        );
    }
    if !args.offline && args.until_lsn.is_some() {
        anyhow::bail!("--until-lsn ends an offline migration; a live one ends with the cut-over fence");
    }
    // Name the id explicitly so the subscription made before the start matches it.
    params.migration_id = Some(params.migration_id().context("invalid --migration-id")?.as_str().to_owned());
    params.validate().context("invalid migrate flags (see `ferry migrate --help`)")?;
    Ok(params)
}

/// The live cut-over's settings from the flags (`None` for an offline migration).
fn live(args: &MigrateArgs) -> anyhow::Result<Option<(ShellWrites, CutOverOptions)>> {
    if args.offline {
        return Ok(None);
    }
    let need = |value: &Option<String>, flag: &str| {
        value.clone().with_context(|| {
            format!("{flag} is required for a live migration (without --offline); see `ferry migrate --help`")
        })
    };
    let writes = ShellWrites {
        pause_cmd: need(&args.pause_cmd, "--pause-cmd")?,
        resume_cmd: need(&args.resume_cmd, "--resume-cmd")?,
        resume_source_cmd: need(&args.resume_source_cmd, "--resume-source-cmd")?,
    };
    let options = CutOverOptions {
        fence_retries: args.fence_retries,
        catch_up_timeout: Duration::from_secs(args.catch_up_timeout_secs),
        ..CutOverOptions::default()
    };
    Ok(Some((writes, options)))
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let mut live = live(&args)?;
    let params = start_params(&args)?;
    // The control socket is local: the daemon reads the same folder this command sees.
    super::copy::check_not_empty(Path::new(&params.segments_root), params.files.is_some(), args.allow_empty)?;
    let socket = args.connect.socket_path()?;
    let json = args.connect.json;
    let draw = Draw::for_output(json);
    let (created, status, cut) = super::runtime()?.block_on(coordinate(&socket, &params, live.as_mut(), draw))?;
    if json {
        let report = Report { migration_id: &status.migration_id, created, status: &status, cut_over: cut.as_ref() };
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!("{}", final_report(&status))?;
        if let Some(cut) = &cut {
            outln!("{}", cut_over_report(cut))?;
        }
    }
    if status.phase == Phase::Failed {
        anyhow::bail!(
            "migration {} failed: {}",
            status.migration_id,
            status.reason.as_deref().unwrap_or("the daemon gave no reason")
        );
    }
    Ok(())
}

/// Starts (or rejoins) the migration and follows it to a final phase; a live one is cut over
/// once it is in `WalCatchUp`.
async fn coordinate(
    socket: &Path,
    params: &StartParams,
    mut live: Option<&mut (ShellWrites, CutOverOptions)>,
    draw: Draw,
) -> anyhow::Result<(bool, MigrationStatus, Option<CutOverOutcome>)> {
    let mut cut = None;
    let id = params.migration_id()?;
    let mut events = ops::connect(socket).await?.migration_events(Some(&id)).await?;
    let mut calls = ops::connect(socket).await?;
    let started = match calls.start(params).await {
        Ok(started) => started,
        Err(e) if e.code() == Some(ErrorCode::MigrationInProgress) => {
            let vshard = e.vshard_in_progress().map_or("the vShard".to_owned(), |v| format!("vShard {v}"));
            return Err(anyhow::Error::from(e)
                .context(format!("{vshard} is already migrating under another id; see `ferry list`")));
        }
        Err(e) => return Err(anyhow::Error::from(e).context("the source daemon refused migration.start")),
    };
    errln!(
        "ferry migrate: {} {} (vShard {} to {} at {})",
        if started.created { "started" } else { "already known to the daemon, following" },
        started.migration_id,
        params.vshard_id,
        params.target_node_id,
        params.target_address,
    );
    let mut bars = Bars::new(draw);
    let mut tracked = Tracked::default();
    let mut tick = tokio::time::interval(ops::POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let update = tokio::select! {
            event = events.next() => match event {
                Ok(Some(MigrationEvent::Status { status, .. })) => Some(*status),
                Ok(Some(MigrationEvent::Dropped { .. })) => None,
                Ok(None) => anyhow::bail!(
                    "the source daemon closed the event stream; {id} may still be running: `ferry status {id}`"
                ),
                Err(e) => {
                    bars.suspend(|| errln!("ferry migrate: warning: {e}"));
                    None
                }
            },
            _ = tick.tick() => poll_source(&mut calls, &id).await?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!(
                "interrupted: migration {id} continues in the daemon; follow it with `ferry status {id} --watch`, \
                 stop it with `ferry abort {id}`"
            ),
        };
        let Some(status) = update.filter(|s| s.role == Role::Source) else { continue };
        bars.show(&status);
        if tracked.update(status.clone()) && !bars.shown() {
            errln!("{}", render_line(&status));
        }
        if status.phase.is_final() {
            bars.finish();
            return Ok((started.created, status, cut));
        }
        if status.phase == Phase::WalCatchUp && cut.is_none() {
            if let Some((writes, options)) = live.as_deref_mut() {
                bars.suspend(|| {
                    errln!(
                        "ferry migrate: {id} is catching up; cutting over (budget {} us)",
                        params.write_pause_budget_us
                    )
                });
                let outcome = super::coordinator::cut_over(&mut calls, &id, writes, *options).await?;
                bars.suspend(|| errln!("ferry migrate: {}", cut_over_report(&outcome)));
                cut = Some(outcome);
            }
        }
    }
}

/// The source role's status of `id` (`migration.list` shows both roles of a loopback daemon).
async fn poll_source(
    calls: &mut crate::control::ControlClient,
    id: &MigrationId,
) -> anyhow::Result<Option<MigrationStatus>> {
    let statuses = calls.list().await?;
    let status = statuses.into_iter().find(|s| s.migration_id == id.as_str() && s.role == Role::Source);
    status.map(Some).with_context(|| format!("the source daemon no longer lists migration {id} (was it forgotten?)"))
}

/// The daemon's average throughput, or (when it reports none) bytes over its own timestamps.
fn average_bytes_per_sec(status: &MigrationStatus, elapsed_ms: u64) -> u64 {
    if status.throughput_bytes_per_sec > 0 || elapsed_ms == 0 {
        return status.throughput_bytes_per_sec;
    }
    let average = u128::from(status.bytes_transferred) * 1000 / u128::from(elapsed_ms);
    u64::try_from(average).unwrap_or(u64::MAX)
}

/// The final report, for people.
pub fn final_report(status: &MigrationStatus) -> String {
    let elapsed_ms = status.updated_at_unix_ms.saturating_sub(status.started_at_unix_ms);
    let peer = status.peer_node.as_deref().unwrap_or("the target");
    let wal = match status.wal.current_lsn {
        Some(lsn) => format!("; WAL durable on the target up to LSN {lsn}"),
        None => String::new(),
    };
    let staging = status.staging_state.as_deref().map(|s| format!("; target staging {s}")).unwrap_or_default();
    match status.phase {
        Phase::Failed => format!(
            "migration {} FAILED after {:.1} s: {}; {} of {} copied{wal}{staging}",
            status.migration_id,
            elapsed_ms as f64 / 1e3,
            status.reason.as_deref().unwrap_or("no reason given"),
            format_bytes(status.bytes_transferred),
            format_bytes(status.bytes_total),
        ),
        _ => format!(
            "migration {} {:?}: {} files, {} copied to {peer} in {:.1} s (average {}/s), resent {}{wal}{staging}",
            status.migration_id,
            status.phase,
            status.files_staged,
            format_bytes(status.bytes_transferred),
            elapsed_ms as f64 / 1e3,
            format_bytes(average_bytes_per_sec(status, elapsed_ms)),
            format_bytes(status.bytes_resent),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::Parser;
    use ferry_wire::control::RpcError;
    use serde_json::{json, Value};
    use tokio::sync::{broadcast, oneshot};

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::control::{CallFuture, ControlConfig, ControlServer, Handler, Reply, Subscription};

    fn parse(extra: &[&str]) -> Result<MigrateArgs, clap::Error> {
        let mut argv = vec!["ferry", "migrate"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Migrate(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    const OFFLINE: [&str; 9] = [
        "--offline",
        "--vshard",
        "7",
        "--segments-root",
        "rel/seg",
        "--target",
        "127.0.0.1:7070",
        "--target-node",
        "node-b",
    ];

    /// The offline flags with `extra` added; a `--segments-root` in `extra` replaces the default.
    fn offline(extra: &[&str]) -> MigrateArgs {
        let mut argv = OFFLINE.to_vec();
        if extra.contains(&"--segments-root") {
            argv.drain(3..5);
        }
        argv.extend_from_slice(extra);
        parse(&argv).unwrap()
    }

    #[test]
    fn a_live_migration_needs_its_wal_and_the_pause_and_resume_commands() {
        let err = run(parse(&OFFLINE[1..]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("--pause-cmd is required for a live migration"), "{err}");
        let mut argv = OFFLINE[1..].to_vec();
        argv.extend_from_slice(&["--pause-cmd", "echo 1", "--resume-cmd", "true"]);
        let err = run(parse(&argv).unwrap()).unwrap_err().to_string();
        assert!(err.contains("--resume-source-cmd"), "{err}");
        argv.extend_from_slice(&["--resume-source-cmd", "true"]);
        let err = run(parse(&argv).unwrap()).unwrap_err().to_string();
        assert!(err.contains("needs --wal-dir"), "{err}");
        argv.extend_from_slice(&["--wal-dir", "/w", "--until-lsn", "9"]);
        let err = run(parse(&argv).unwrap()).unwrap_err().to_string();
        assert!(err.contains("--until-lsn ends an offline migration"), "{err}");
    }

    #[test]
    fn the_pause_command_must_print_an_lsn() {
        use crate::cli::coordinator::WriteControl;
        let mut writes = ShellWrites {
            pause_cmd: "echo paused; echo 1234".into(),
            resume_cmd: "true".into(),
            resume_source_cmd: "exit 3".into(),
        };
        let (lsn, paused_at) = writes.pause().unwrap();
        assert_eq!(lsn, 1234);
        assert!(paused_at > 0 && writes.resume_on_target().unwrap() >= paused_at);
        assert!(writes.resume_on_source().unwrap_err().to_string().contains("--resume-source-cmd"));
        writes.pause_cmd = "echo nope".into();
        let err = writes.pause().unwrap_err().to_string();
        assert!(err.contains("last acknowledged LSN"), "{err}");
    }

    #[test]
    fn offline_needs_the_shard_and_the_target() {
        assert!(parse(&["--offline"]).is_err());
        for skip in [1, 3, 5, 7] {
            let argv: Vec<&str> =
                OFFLINE.iter().enumerate().filter(|(i, _)| *i != skip && *i != skip + 1).map(|(_, a)| *a).collect();
            assert!(parse(&argv).is_err(), "{argv:?} accepted");
        }
    }

    #[test]
    fn flags_become_absolute_validated_start_params() {
        let args = offline(&[
            "--wal-dir",
            "wal",
            "--file",
            "a.seg",
            "--file",
            "b/c.seg",
            "--rate-limit",
            "500MB",
            "--until-lsn",
            "90",
            "--base-lsn",
            "3",
            "--db-meta",
            r#"{"table":"t"}"#,
            "--json",
        ]);
        assert!(args.connect.json);
        let params = start_params(&args).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(params.segments_root, cwd.join("rel/seg").to_str().unwrap());
        assert_eq!(params.wal_dir.as_deref(), Some(cwd.join("wal").to_str().unwrap()));
        assert_eq!(params.files, Some(vec!["a.seg".to_owned(), "b/c.seg".to_owned()]));
        assert_eq!(params.migration_id.as_deref(), Some("m-7-3"));
        assert_eq!((params.rate_limit_bytes_per_sec, params.until_lsn, params.offline), (500_000_000, Some(90), true));
        assert_eq!((params.target_address.as_str(), params.target_node_id.as_str()), ("127.0.0.1:7070", "node-b"));
        assert_eq!(params.db_meta, json!({"table": "t"}));

        let plain = start_params(&offline(&["--segments-root", "/abs"])).unwrap();
        assert_eq!((plain.segments_root.as_str(), plain.wal_dir.as_deref()), ("/abs", None));

        for (bad, needle) in [
            (vec!["--read-mode", "dma"], "read_mode"),
            (vec!["--until-lsn", "5"], "until_lsn"),
            (vec!["--streams", "0"], "streams"),
            (vec!["--migration-id", "a b"], "--migration-id"),
            (vec!["--db-meta", "{"], "--db-meta"),
        ] {
            let err = format!("{:#}", start_params(&offline(&bad)).unwrap_err());
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        assert!(parse(&[&OFFLINE[..], &["--rate-limit", "fast"]].concat()).is_err());
    }

    fn completed(role: &str, phase: &str) -> Value {
        json!({"migration_id": "m-7-0", "role": role, "phase": phase, "vshard_id": 7, "peer_node": "node-b",
            "bytes_transferred": 4096, "bytes_total": 4096, "bytes_resent": 0, "files_staged": 2, "files_total": 2,
            "wal": {"start_lsn": null, "current_lsn": null, "source_lsn": null, "held_bytes": 0},
            "reason": if phase == "Failed" { json!("target disk full") } else { Value::Null },
            "staging_state": "released", "throughput_bytes_per_sec": 4096,
            "started_at_unix_ms": 1000, "updated_at_unix_ms": 2500})
    }

    type Script = dyn Fn(&str, &Value) -> Result<Reply, RpcError> + Send + Sync;

    struct Scripted {
        script: Box<Script>,
        calls: Mutex<Vec<(String, Value)>>,
    }

    impl Handler for Scripted {
        fn call(&self, method: String, params: Value) -> CallFuture {
            let answer = (self.script)(&method, &params);
            self.calls.lock().unwrap().push((method, params));
            Box::pin(async move { answer })
        }
    }

    /// Runs `coordinate` against a scripted source daemon whose list answers `listed`.
    async fn coordinate_against(
        start: Result<Value, RpcError>,
        listed: Vec<Value>,
    ) -> (anyhow::Result<(bool, MigrationStatus)>, Vec<(String, Value)>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ctl").join("ferry.sock");
        let (events, _) = broadcast::channel::<Value>(4);
        let handler = Arc::new(Scripted {
            script: Box::new(move |method, _| match method {
                "events.subscribe" => Ok(Reply::Subscription(Subscription {
                    result: json!({"subscribed": true}),
                    events: events.subscribe(),
                    migration_id: Some("m-7-0".into()),
                })),
                "migration.start" => start.clone().map(Reply::Value),
                "migration.list" => Ok(Reply::Value(json!({"migrations": listed}))),
                other => Err(RpcError::method_not_found(other)),
            }),
            calls: Mutex::new(Vec::new()),
        });
        let server = ControlServer::bind(ControlConfig::new(&socket), handler.clone()).unwrap();
        let (_stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let params = start_params(&offline(&["--segments-root", "/seg"])).unwrap();
        let result =
            coordinate(&socket, &params, None, Draw::Hidden).await.map(|(created, status, _)| (created, status));
        let calls = handler.calls.lock().unwrap().clone();
        (result, calls)
    }

    #[tokio::test]
    async fn it_starts_on_the_source_and_ends_on_the_source_roles_final_phase() {
        let start = Ok(json!({"migration_id": "m-7-0", "created": true}));
        // A loopback daemon lists the target role too; only the source's phase decides.
        let (result, calls) =
            coordinate_against(start, vec![completed("target", "Failed"), completed("source", "Completed")]).await;
        let (created, status) = result.unwrap();
        assert!(created);
        assert_eq!((status.role, status.phase), (Role::Source, Phase::Completed));
        let methods: Vec<&str> = calls.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(&methods[..3], ["events.subscribe", "migration.start", "migration.list"]);
        assert_eq!(calls[0].1, json!({"migration_id": "m-7-0"}));
        let sent: StartParams = serde_json::from_value(calls[1].1.clone()).unwrap();
        assert!(sent.offline && sent.segments_root == "/seg");

        let report = final_report(&status);
        assert!(report.contains("m-7-0 Completed: 2 files, 4.0 KiB copied to node-b in 1.5 s"), "{report}");
        assert!(report.contains("average 4.0 KiB/s"), "the daemon's own average: {report}");
        let mut silent = status.clone();
        silent.throughput_bytes_per_sec = 0;
        assert!(final_report(&silent).contains("average 2.7 KiB/s"), "4096 bytes in 1.5 s");
        assert!(report.contains("staging released"), "{report}");
    }

    #[tokio::test]
    async fn a_failed_migration_is_reported_with_its_reason() {
        let start = Ok(json!({"migration_id": "m-7-0", "created": false}));
        let (result, _) = coordinate_against(start, vec![completed("source", "Failed")]).await;
        let (created, status) = result.unwrap();
        assert!(!created);
        assert_eq!(status.phase, Phase::Failed);
        let report = final_report(&status);
        assert!(report.contains("FAILED after 1.5 s: target disk full"), "{report}");
    }

    #[tokio::test]
    async fn a_vshard_already_migrating_is_named() {
        let start = Err(RpcError::new(ErrorCode::MigrationInProgress, "vshard 7 is migrating as m-7-9")
            .with_data(json!({"vshard_id": 7})));
        let (result, calls) = coordinate_against(start, Vec::new()).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("vShard 7 is already migrating") && err.contains("m-7-9"), "{err}");
        assert!(!calls.iter().any(|(m, _)| m == "migration.list"));
    }

    #[tokio::test]
    async fn a_migration_the_daemon_no_longer_lists_is_an_error_not_a_hang() {
        let start = Ok(json!({"migration_id": "m-7-0", "created": true}));
        let (result, _) = coordinate_against(start, Vec::new()).await;
        assert!(result.unwrap_err().to_string().contains("no longer lists"));
    }
}
