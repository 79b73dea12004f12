//! Operator commands over a daemon's control socket: `ferry status`, `list`, `abort`, `forget`
//! and `set-rate`, and what they share with `ferry migrate` (socket lookup, tracking).
//!
//! What it does: finds the control socket (`--socket`, `--config`, `$FERRY_SOCKET`, the default
//! configuration's), calls the typed client ([`crate::control::typed`]), and prints either
//! text for people (progress bars, rate, ETA, WAL lag, held WAL) or JSON for scripts.
//! `status --watch` follows `migration.event`s and re-reads the status every 500 ms, with live
//! bars on stderr when it is a terminal ([`super::bars`]) and one line (or JSON object) per
//! change on stdout when the bars are not shown or stdout is not a terminal.
//!
//! What it does not: decide anything about a migration; the daemon does. Rendering is in
//! [`super::render`], pure and tested without a daemon or a clock.
//!
//! Invariants: every number shown comes from the daemon's status (the ETA uses its average
//! throughput); nothing the daemon sends panics the CLI (a malformed answer is an error).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ferry_wire::api::{MigrationStatus, Phase};
use ferry_wire::MigrationId;

use super::bars::{Bars, Draw};
use super::out::{errln, outln, stdout_closed};
use super::render::{format_rate_limit, parse_byte_size, render_block, render_line, render_table};
use crate::config::NodeConfig;
use crate::control::typed::MigrationEvent;
use crate::control::ControlClient;

/// The environment variable naming the control socket when `--socket` and `--config` are absent.
pub const SOCKET_ENV: &str = "FERRY_SOCKET";
/// How often `--watch` and `ferry migrate` re-read the status between events.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How to reach the daemon, and how to print: every control command takes these.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// The daemon's control socket. Default: the control socket of --config; else
    /// $FERRY_SOCKET; else the default configuration's (/var/lib/ferry/control/ferry.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// The daemon's configuration file (node.toml): its control socket is used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

impl SocketArgs {
    /// The socket in force: `--socket`, then `--config`'s, then `$FERRY_SOCKET`, then the
    /// default configuration's.
    pub fn socket_path(&self) -> anyhow::Result<PathBuf> {
        resolve_socket(self, std::env::var_os(SOCKET_ENV))
    }
}

fn resolve_socket(args: &SocketArgs, env: Option<OsString>) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.socket {
        return Ok(path.clone());
    }
    if let Some(config) = &args.config {
        return Ok(NodeConfig::load(config)?.control_socket_path());
    }
    match env {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Ok(NodeConfig::default().control_socket_path()),
    }
}

pub(super) async fn connect(path: &Path) -> anyhow::Result<ControlClient> {
    // The connect error chains its cause: `ferry: error: {:#}` prints it once.
    Ok(ControlClient::connect(path).await?)
}

pub(super) fn parse_migration_id(text: &str) -> Result<MigrationId, String> {
    MigrationId::new(text).map_err(|e| e.to_string())
}

const STATUS_HELP: &str = "\
Fields:
  phase       BaseCopy -> WalCatchUp -> AtomicCutOver -> Completed | Failed
  base        bytes of the shard's files verified on the target, of the total; files staged
  rate        the daemon's average throughput since the migration (or its restart) began
  ETA         of the base copy, from that average
  wal lag     LSNs between the source's tip and the target's durable LSN (source - current)
  held        bytes of WAL segments the source holds (hard-linked) for this migration
  rate limit  in force for this migration (0: unlimited; change it with `ferry set-rate`)
  no progress for N s  work is left and nothing moved for the daemon's stall threshold
With --watch, live bars on stderr (a terminal, without --json) follow every event and a status
every 500 ms until the migration is final (or Ctrl-C); without them, or when stdout is not a
terminal, one line is printed on stdout per change. --watch on one
migration exits non-zero if it ends Failed. --json prints the status (with --watch, one JSON
object per line per change).

Example:
  ferry status m-7-0 --watch --socket /var/lib/ferry/control/ferry.sock";

/// `ferry status`.
#[derive(Debug, Args)]
#[command(after_long_help = STATUS_HELP)]
pub struct StatusArgs {
    /// The migration; without it, every migration on the node.
    #[arg(value_parser = parse_migration_id)]
    pub migration_id: Option<MigrationId>,
    /// Follow until the migration is final (or Ctrl-C).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub connect: SocketArgs,
}

const LIST_HELP: &str = "\
Columns: migration id, role (source or target: a loopback migration is listed twice), phase,
vShard, the other node, base progress, average rate, WAL lag (LSNs) and held WAL bytes.
--json prints the daemon's statuses as a JSON array.

Example:
  ferry list --config /etc/ferry/node.toml";

/// `ferry list`.
#[derive(Debug, Args)]
#[command(after_long_help = LIST_HELP)]
pub struct ListArgs {
    #[command(flatten)]
    pub connect: SocketArgs,
}

const ABORT_HELP: &str = "\
Stops the migration: it ends Failed with reason \"aborted: <REASON>\", the target's staging is
removed and the source stays authoritative. A completed migration cannot be aborted. Afterwards
`ferry forget ID` removes what ferry still holds for it.

Example:
  ferry abort m-7-0 --reason \"maintenance window over\"";

/// `ferry abort`.
#[derive(Debug, Args)]
#[command(after_long_help = ABORT_HELP)]
pub struct AbortArgs {
    /// The migration id (as `ferry list` shows it).
    #[arg(value_parser = parse_migration_id)]
    pub migration_id: MigrationId,
    /// Why; recorded in the migration's failure reason.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connect: SocketArgs,
}

const FORGET_HELP: &str = "\
Removes what ferry holds for a final (Completed or Failed) migration: its record and any WAL it
still holds. A running migration is refused: abort it first.

Example:
  ferry forget m-7-0";

/// `ferry forget`.
#[derive(Debug, Args)]
#[command(after_long_help = FORGET_HELP)]
pub struct ForgetArgs {
    /// The migration id (as `ferry list` shows it).
    #[arg(value_parser = parse_migration_id)]
    pub migration_id: MigrationId,
    #[command(flatten)]
    pub connect: SocketArgs,
}

const SET_RATE_HELP: &str = "\
Changes a running source migration's rate limit at once. BYTES_PER_SEC takes a suffix:
KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), case-insensitive, an
optional trailing /s; 0 or \"unlimited\" removes the limit (the daemon's global limit still applies).

Example:
  ferry set-rate m-7-0 100MB
  ferry set-rate m-7-0 1.5GiB/s";

/// `ferry set-rate`.
#[derive(Debug, Args)]
#[command(after_long_help = SET_RATE_HELP)]
pub struct SetRateArgs {
    /// The migration id (as `ferry list` shows it).
    #[arg(value_parser = parse_migration_id)]
    pub migration_id: MigrationId,
    /// The new limit, e.g. 100MB, 1GiB, 0 (unlimited).
    #[arg(value_parser = parse_byte_size)]
    pub bytes_per_sec: u64,
    #[command(flatten)]
    pub connect: SocketArgs,
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let socket = args.connect.socket_path()?;
    let json = args.connect.json;
    super::runtime()?.block_on(async move {
        if args.watch {
            return watch(&socket, args.migration_id, json).await;
        }
        let mut client = connect(&socket).await?;
        let statuses = match &args.migration_id {
            Some(id) => vec![client.status(id).await?],
            None => client.list().await?,
        };
        if json {
            match (&args.migration_id, statuses.as_slice()) {
                (Some(_), [one]) => outln!("{}", serde_json::to_string_pretty(one)?)?,
                _ => outln!("{}", serde_json::to_string_pretty(&statuses)?)?,
            }
        } else if statuses.is_empty() {
            outln!("no migrations on this node")?;
        } else {
            for status in &statuses {
                for line in render_block(status) {
                    outln!("{line}")?;
                }
            }
        }
        Ok(())
    })
}

pub fn run_list(args: ListArgs) -> anyhow::Result<()> {
    let socket = args.connect.socket_path()?;
    let statuses =
        super::runtime()?.block_on(async { connect(&socket).await?.list().await.map_err(anyhow::Error::from) })?;
    if args.connect.json {
        outln!("{}", serde_json::to_string_pretty(&statuses)?)?;
    } else if statuses.is_empty() {
        outln!("no migrations on this node")?;
    } else {
        for line in render_table(&statuses) {
            outln!("{line}")?;
        }
    }
    Ok(())
}

pub fn run_abort(args: AbortArgs) -> anyhow::Result<()> {
    let socket = args.connect.socket_path()?;
    let id = args.migration_id;
    let aborted = super::runtime()?.block_on(async {
        connect(&socket).await?.abort(&id, args.reason.as_deref()).await.map_err(anyhow::Error::from)
    })?;
    if args.connect.json {
        outln!("{}", serde_json::to_string_pretty(&aborted)?)?;
    } else {
        outln!(
            "{id} aborted (phase {:?}): the target staging is removed and the source stays authoritative; \
             `ferry forget {id}` removes what ferry still holds for it",
            aborted.phase
        )?;
    }
    Ok(())
}

pub fn run_forget(args: ForgetArgs) -> anyhow::Result<()> {
    let socket = args.connect.socket_path()?;
    let id = args.migration_id;
    let forgotten =
        super::runtime()?.block_on(async { connect(&socket).await?.forget(&id).await.map_err(anyhow::Error::from) })?;
    if args.connect.json {
        outln!("{}", serde_json::to_string_pretty(&forgotten)?)?;
    } else {
        outln!("{id} forgotten")?;
    }
    Ok(())
}

pub fn run_set_rate(args: SetRateArgs) -> anyhow::Result<()> {
    let socket = args.connect.socket_path()?;
    let id = args.migration_id;
    let set = super::runtime()?.block_on(async {
        connect(&socket).await?.set_rate_limit(&id, args.bytes_per_sec).await.map_err(anyhow::Error::from)
    })?;
    if args.connect.json {
        outln!("{}", serde_json::to_string_pretty(&set)?)?;
    } else {
        outln!("{id} rate limit: {}", format_rate_limit(set.rate_limit_bytes_per_sec))?;
    }
    Ok(())
}

/// The statuses being watched, one per (migration, role).
#[derive(Debug, Default)]
pub(super) struct Tracked {
    pub statuses: Vec<MigrationStatus>,
}

impl Tracked {
    /// Records a status; `true` if it changed what is shown.
    pub fn update(&mut self, status: MigrationStatus) -> bool {
        let slot = self.statuses.iter_mut().find(|s| s.migration_id == status.migration_id && s.role == status.role);
        match slot {
            Some(old) if *old == status => false,
            Some(old) => {
                *old = status;
                true
            }
            None => {
                self.statuses.push(status);
                true
            }
        }
    }

    /// Drops what the daemon no longer lists (forgotten migrations).
    pub fn keep_only(&mut self, listed: &[MigrationStatus]) {
        self.statuses.retain(|s| listed.iter().any(|l| l.migration_id == s.migration_id && l.role == s.role));
    }

    /// Every tracked status is final (and there is at least one).
    pub fn all_final(&self) -> bool {
        !self.statuses.is_empty() && self.statuses.iter().all(|s| s.phase.is_final())
    }
}

async fn watch(socket: &Path, id: Option<MigrationId>, json: bool) -> anyhow::Result<()> {
    // Subscribe before the first read so no change falls between them.
    let mut events = connect(socket).await?.migration_events(id.as_ref()).await?;
    let mut calls = connect(socket).await?;
    let mut bars = Bars::new(Draw::for_output(json));
    // With bars on the terminal, stdout carries lines only when it goes elsewhere.
    let lines = !bars.shown() || !std::io::stdout().is_terminal();
    let result = follow(&mut events, &mut calls, id.as_ref(), json, lines, &mut bars).await;
    bars.finish();
    result
}

async fn follow(
    events: &mut crate::control::typed::MigrationEvents,
    calls: &mut ControlClient,
    id: Option<&MigrationId>,
    json: bool,
    lines: bool,
    bars: &mut Bars,
) -> anyhow::Result<()> {
    let mut tracked = Tracked::default();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changed: Vec<MigrationStatus> = Vec::new();
    loop {
        changed.clear();
        tokio::select! {
            event = events.next() => match event {
                Ok(Some(MigrationEvent::Status { status, .. })) => changed.push(*status),
                // Lost events are caught up by the next poll.
                Ok(Some(MigrationEvent::Dropped { .. })) => {}
                Ok(None) => anyhow::bail!("the daemon closed the event stream; it may have stopped"),
                Err(e) => bars.suspend(|| errln!("ferry: warning: {e}")),
            },
            _ = tick.tick() => match id {
                Some(id) => changed.push(calls.status(id).await?),
                None => {
                    let listed = calls.list().await?;
                    tracked.keep_only(&listed);
                    bars.keep_only(&listed);
                    changed.extend(listed);
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        for status in changed.drain(..) {
            bars.show(&status);
            if tracked.update(status.clone()) && lines {
                if json {
                    outln!("{}", serde_json::to_string(&status)?)?;
                } else {
                    outln!("{}", render_line(&status))?;
                }
            }
        }
        if tracked.statuses.is_empty() {
            bars.show_waiting("no migrations on this node (waiting; Ctrl-C to stop)");
        }
        // Nobody reads what is watched any more (`ferry status --watch | head -3`).
        if stdout_closed() {
            return Ok(());
        }
        if let Some(id) = id {
            if tracked.all_final() {
                if let Some(failed) = tracked.statuses.iter().find(|s| s.phase == Phase::Failed) {
                    anyhow::bail!("migration {id} failed: {}", failed.reason.as_deref().unwrap_or("no reason given"));
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use clap::Parser;
    use ferry_wire::api::Role;

    use super::*;
    use crate::cli::render::tests::status;
    use crate::cli::{Cli, Command};

    #[test]
    fn tracking_is_per_migration_and_role_and_reports_changes() {
        let mut tracked = Tracked::default();
        assert!(!tracked.all_final());
        assert!(tracked.update(status()));
        assert!(!tracked.update(status()), "an unchanged status is not an update");
        let mut target = status();
        target.role = Role::Target;
        target.phase = Phase::Completed;
        assert!(tracked.update(target));
        assert_eq!(tracked.statuses.len(), 2);
        assert!(!tracked.all_final());
        let mut source = status();
        source.phase = Phase::Completed;
        assert!(tracked.update(source.clone()));
        assert!(tracked.all_final());
        tracked.keep_only(&[source]);
        assert_eq!(tracked.statuses.len(), 1);
        assert_eq!(tracked.statuses[0].role, Role::Source);
    }

    #[test]
    fn the_socket_comes_from_the_flag_then_the_config_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node.toml");
        std::fs::write(&config, "control_socket = \"/run/ferry/from-config.sock\"\n").unwrap();
        let args = |socket: Option<&str>, config: Option<&Path>| SocketArgs {
            socket: socket.map(PathBuf::from),
            config: config.map(Path::to_owned),
            json: false,
        };
        let env = || Some(OsString::from("/run/ferry/from-env.sock"));
        assert_eq!(resolve_socket(&args(Some("/s.sock"), None), env()).unwrap(), PathBuf::from("/s.sock"));
        assert_eq!(
            resolve_socket(&args(None, Some(&config)), env()).unwrap(),
            PathBuf::from("/run/ferry/from-config.sock")
        );
        assert_eq!(resolve_socket(&args(None, None), env()).unwrap(), PathBuf::from("/run/ferry/from-env.sock"));
        assert_eq!(resolve_socket(&args(None, None), None).unwrap(), NodeConfig::default().control_socket_path());
        assert!(resolve_socket(&args(None, Some(&dir.path().join("missing.toml"))), None).is_err());
    }

    #[test]
    fn control_commands_parse() {
        let cli =
            Cli::try_parse_from(["ferry", "status", "m-7-0", "--watch", "--json", "--socket", "/s.sock"]).unwrap();
        let Command::Status(args) = cli.command else { panic!("not status") };
        assert_eq!(args.migration_id.unwrap().as_str(), "m-7-0");
        assert!(args.watch && args.connect.json);
        assert_eq!(args.connect.socket, Some(PathBuf::from("/s.sock")));

        let Command::Status(args) = Cli::try_parse_from(["ferry", "status"]).unwrap().command else { panic!() };
        assert!(args.migration_id.is_none() && !args.watch);

        let Command::SetRate(args) = Cli::try_parse_from(["ferry", "set-rate", "m-7-0", "1GiB"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(args.bytes_per_sec, 1 << 30);
        let Command::Abort(args) =
            Cli::try_parse_from(["ferry", "abort", "m-7-0", "--reason", "window over", "--config", "/n.toml"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!(args.reason.as_deref(), Some("window over"));
        assert!(matches!(
            Cli::try_parse_from(["ferry", "forget", "m-7-0", "--json"]).unwrap().command,
            Command::Forget(_)
        ));
        assert!(matches!(Cli::try_parse_from(["ferry", "list"]).unwrap().command, Command::List(_)));

        for bad in [
            vec!["ferry", "set-rate", "m-7-0", "1G"],
            vec!["ferry", "set-rate", "m-7-0"],
            vec!["ferry", "abort"],
            vec!["ferry", "abort", "bad id"],
            vec!["ferry", "list", "--socket", "/s", "--config", "/n.toml"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn help_explains_fields_and_gives_an_example() {
        for command in ["status", "list", "abort", "forget", "set-rate", "migrate"] {
            let err = Cli::try_parse_from(["ferry", command, "--help"]).unwrap_err();
            let help = err.to_string();
            assert!(help.contains("Example:") && help.contains("--socket"), "{command}: {help}");
        }
        let help = Cli::try_parse_from(["ferry", "copy", "--help"]).unwrap_err().to_string();
        assert!(help.contains("ferry migrate --offline"), "{help}");
    }
}
