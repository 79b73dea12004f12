//! The `ferry` command line: daemon, reference coordinator commands and tools.
//!
//! What it does: parses arguments (clap), sets up logging, and runs one command. Every command
//! prints a clear error and exits non-zero on failure; `--json` gives machine-readable output.
//!
//! What it does not: hold transfer logic; it calls the library.
//!
//! Invariants: anyhow errors stop here (the library's errors are typed); results go to stdout,
//! progress, warnings and errors to stderr (`out`), so a `--json` reader gets only JSON.

mod addr;
mod bars;
mod certs_cmd;
pub mod coordinator;
mod copy;
mod demo;
mod migrate;
mod ops;
mod out;
mod render;
mod serve;
mod snapshots_cmd;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use out::errln;

/// ferry: moves a database shard between nodes, fast, verified and resumable.
#[derive(Debug, Parser)]
#[command(name = "ferry", version)]
pub struct Cli {
    /// Log format on stderr (default text; `ferry serve` also reads `log_format` from its
    /// --config file, and this flag wins over it).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node daemon: receives inbound migrations over QUIC into <data-dir>/migrations/.
    Serve(serve::ServeArgs),
    /// Copy a shard to a target daemon, this process being the source (no source daemon).
    ///
    /// Ships the shard's files, and with --wal-dir its WAL records as they are written; the same
    /// command again resumes. With a source daemon running, `ferry migrate --offline` is the way.
    Copy(copy::CopyArgs),
    /// Migrate a shard through the SOURCE daemon's control socket and follow it to the end:
    /// --offline for a shard nobody writes to, else live, ending with the cut-over fence.
    Migrate(migrate::MigrateArgs),
    /// Show a migration's (or every migration's) phase and progress; --watch follows it.
    Status(ops::StatusArgs),
    /// List the daemon's migrations, both roles.
    List(ops::ListArgs),
    /// Abort a migration: the target staging is removed, the source stays authoritative.
    Abort(ops::AbortArgs),
    /// Remove what the daemon holds for a finished (Completed or Failed) migration.
    Forget(ops::ForgetArgs),
    /// Change a running source migration's rate limit (bytes per second, e.g. 100MB; 0: unlimited).
    SetRate(ops::SetRateArgs),
    /// Run a live migration between two local daemons with a reference writer: base copy, WAL
    /// catch-up and the cut-over fence, with the pause measured and every write verified.
    Demo(demo::DemoArgs),
    /// Make development certificates: a cluster CA and node certificates signed by it.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Inspect WAL folders.
    #[command(subcommand)]
    Wal(WalCommand),
    /// List or remove the snapshot links (.ferry-snapshot/) a source left under a segments root.
    #[command(subcommand)]
    Snapshots(snapshots_cmd::SnapshotsCommand),
    /// Print a shell completion script, e.g. `ferry completions bash > /etc/bash_completion.d/ferry`.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `ferry man > ferry.1 && man ./ferry.1`.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// List the records of a WAL folder; exits non-zero naming the file and offset on corruption.
    Dump {
        /// The WAL folder (holding wal-<lsn>.seg files).
        #[arg(long)]
        dir: PathBuf,
        /// Only records of this vShard.
        #[arg(long)]
        vshard: Option<u32>,
        /// Only records with an LSN at or above this one.
        #[arg(long)]
        from_lsn: Option<u64>,
        /// Read a staged WAL (strictly increasing, not dense, LSNs).
        #[arg(long)]
        staged: bool,
        /// One JSON object per record.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: in a file or a pipe they are noise. A log line that
    // cannot be written (stderr closed) is dropped: reporting it would write to stderr again.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Writes generated text (completions, the man page) to stdout; a reader that went away
/// (`ferry man | head`) is not an error.
/// Generated into memory first: clap_complete panics on a failed write.
fn write_generated(generate: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> anyhow::Result<()> {
    let mut text = Vec::new();
    generate(&mut text)?;
    let mut stdout = std::io::stdout().lock();
    match std::io::Write::write_all(&mut stdout, &text).and_then(|()| std::io::Write::flush(&mut stdout)) {
        Err(e) if !out::is_closed_reader(&e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.or_else(|| match &cli.command {
        // A config that cannot be read is reported by `serve` itself; log as text until then.
        Command::Serve(args) => args.config.as_deref().and_then(|path| crate::config::NodeConfig::load(path).ok()).map(
            |config| match config.log_format {
                crate::config::LogFormatSetting::Json => LogFormat::Json,
                crate::config::LogFormatSetting::Text => LogFormat::Text,
            },
        ),
        _ => None,
    });
    init_logging(format.unwrap_or(LogFormat::Text));
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Copy(args) => copy::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Status(args) => ops::run_status(args),
        Command::List(args) => ops::run_list(args),
        Command::Abort(args) => ops::run_abort(args),
        Command::Forget(args) => ops::run_forget(args),
        Command::SetRate(args) => ops::run_set_rate(args),
        Command::Demo(args) => demo::run(args),
        Command::Certs(command) => certs_cmd::run(command),
        Command::Snapshots(command) => snapshots_cmd::run(command),
        Command::Wal(WalCommand::Dump { dir, vshard, from_lsn, staged, json }) => {
            let options = crate::wal::dump::DumpOptions {
                dir,
                vshard: vshard.map(ferry_wire::VShardId),
                from_lsn: from_lsn.map(ferry_wire::Lsn),
                staged,
                json,
            };
            let mut stdout = std::io::stdout().lock();
            match crate::wal::dump::dump(&options, &mut stdout) {
                Ok(_) => Ok(()),
                // `ferry wal dump | head`: the reader has what it wanted.
                Err(crate::wal::dump::DumpError::Output(e)) if out::is_closed_reader(&e) => Ok(()),
                Err(e) => Err(anyhow::Error::from(e)),
            }
        }
        Command::Completions { shell } => write_generated(|out| {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "ferry", out);
            Ok(())
        }),
        Command::Man => {
            write_generated(|out| clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(out))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            errln!("ferry: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A multi-threaded tokio runtime for the async commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("ferry").build()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use clap::CommandFactory;

    use super::*;

    /// Every command and every flag of `ferry`, with its path (`ferry certs init`).
    fn every_command() -> Vec<(String, clap::Command)> {
        fn walk(path: String, command: clap::Command, out: &mut Vec<(String, clap::Command)>) {
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(format!("{path} {}", sub.get_name()), sub.clone(), out);
            }
            out.push((path, command));
        }
        let mut out = Vec::new();
        walk("ferry".to_owned(), Cli::command(), &mut out);
        out
    }

    /// `true` if the text's first phrase (up to `.`, `(` or `:`) comes again later: a doc
    /// comment whose first line was left above its rewrite.
    fn doubled(text: &str) -> bool {
        let first = text.split(['.', '(', ':', '\n']).next().unwrap_or("").trim();
        first.len() >= 12 && text.matches(first).count() > 1
    }

    /// Every flag that takes a byte amount (a size, a rate) takes units, through one parser.
    #[test]
    fn every_size_flag_takes_units() {
        let mut checked = Vec::new();
        for (path, command) in every_command() {
            for arg in command.get_arguments() {
                let name = arg.get_long().unwrap_or(arg.get_id().as_str()).to_owned();
                let sized = ["chunk-len", "rate-limit", "alignment", "bytes", "shard-size"];
                if !sized.iter().any(|s| name.contains(s)) {
                    continue;
                }
                // The flag alone, with its own value parser, in a command of its own.
                let alone = clap::Command::new("one").arg(arg.clone());
                let id = arg.get_id().as_str();
                for (text, bytes) in [("1MiB", 1u64 << 20), ("500KB", 500_000), ("4096", 4096)] {
                    let argv = match arg.get_long() {
                        Some(long) => vec!["one".to_owned(), format!("--{long}"), text.to_owned()],
                        None => vec!["one".to_owned(), text.to_owned()],
                    };
                    let matches = alone.clone().try_get_matches_from(argv);
                    let matches = matches.unwrap_or_else(|e| panic!("{path} --{name} {text}: {e}"));
                    let value = match matches.try_get_one::<u64>(id) {
                        Ok(value) => value.copied(),
                        Err(_) => matches.get_one::<u32>(id).map(|v| u64::from(*v)),
                    };
                    assert_eq!(value, Some(bytes), "{path} --{name} {text}");
                }
                checked.push(format!("{path} --{name}"));
            }
        }
        // copy: chunk-len, rate-limit, wal-alignment, max-held-wal-bytes; migrate: chunk-len,
        // rate-limit, wal-alignment; set-rate: bytes_per_sec; demo: shard-size, chunk-len.
        assert_eq!(checked.len(), 10, "{checked:#?}");
    }

    #[test]
    fn every_flag_has_help_and_no_help_says_its_first_words_twice() {
        for (path, command) in every_command() {
            for text in [command.get_about(), command.get_long_about()].into_iter().flatten() {
                assert!(!doubled(&text.to_string()), "{path}: doubled about: {text}");
            }
            for arg in command.get_arguments() {
                let name = arg.get_id().as_str();
                if name == "help" || name == "version" {
                    continue;
                }
                let help = arg.get_long_help().or(arg.get_help()).map(ToString::to_string);
                let help = help.unwrap_or_else(|| panic!("{path} --{name} has no help"));
                assert!(!doubled(&help), "{path} --{name}: doubled help: {help}");
            }
        }
    }
}
