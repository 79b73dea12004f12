//! What an operator installs ferry with: the systemd unit and example config in
//! `engine/dist/`, the readiness notification, shell completions and the man page.
//!
//! What it checks: `ferry serve` under a `NOTIFY_SOCKET` says `READY=1` only once its QUIC
//! endpoint is bound and its control socket answers, and `STOPPING=1` on SIGTERM; the unit's
//! `ExecStart` is a command line `ferry` accepts, its `Type=notify` matches; the example
//! config parses and is the daemon's own default; completions and the man page name every
//! command.
//!
//! What it does not: run systemd (CI has none); the notification socket is the test's own.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_engine::cli::{Cli, Command as FerryCommand};
use ferry_engine::config::NodeConfig;
use ferry_tests::{ferry_bin, Certs};

const DIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/dist");

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn datagram(socket: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no {what} notification within the deadline: {e}"));
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[test]
fn serve_notifies_ready_once_it_listens_and_stopping_on_sigterm() {
    let certs = Certs::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let config = dir.path().join("ferry.toml");
    let socket = dir.path().join("data").join("control").join("ferry.sock");
    std::fs::write(
        &config,
        format!(
            "node_id = \"target\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ncerts_dir = \"{}\"\n",
            dir.path().join("data").display(),
            certs.dir.path().display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut serve = Proc(
        Command::new(ferry_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let ready = datagram(&notify, "READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means serving: the control socket answers and the QUIC address is the one bound.
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("{ready:?}"));
    assert!(status.contains(&format!("control socket at {}", socket.display())), "{status}");
    std::os::unix::net::UnixStream::connect(&socket).unwrap_or_else(|e| panic!("READY=1 before the socket: {e}"));
    let mut stdout = BufReader::new(serve.0.stdout.take().unwrap());
    let mut listening = String::new();
    stdout.read_line(&mut listening).unwrap();
    let addr = listening.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{listening:?}"));
    assert!(status.contains(&format!("listening on {addr}")), "{status} vs {listening}");
    assert!(std::net::UdpSocket::bind(addr).is_err(), "READY=1 before the QUIC endpoint bound {addr}");

    let pid = libc::pid_t::try_from(serve.0.id()).unwrap();
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping = datagram(&notify, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let exit = serve.0.wait().unwrap();
    assert!(exit.success(), "ferry serve exited {exit:?} on SIGTERM");
    println!("service: READY=1 and STOPPING=1 in {:?}", started.elapsed());
}

#[test]
fn the_unit_runs_a_command_ferry_accepts_with_the_example_config() {
    let unit = std::fs::read_to_string(Path::new(DIST).join("ferry.service")).unwrap();
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the unit has no {key}="))
            .to_owned()
    };
    assert_eq!(line("Type"), "notify", "serve notifies readiness: the unit must wait for it");
    let exec = line("ExecStart");
    let mut args: Vec<&str> = exec.split_whitespace().collect();
    assert!(args[0].ends_with("/ferry"), "{exec}");
    args[0] = "ferry";
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("ExecStart={exec}: {e}"));
    let FerryCommand::Serve(_) = cli.command else { panic!("ExecStart runs no `ferry serve`: {exec}") };
    let config_path = args.iter().position(|a| *a == "--config").map(|i| args[i + 1]).unwrap();
    assert_eq!(Path::new(config_path).file_name(), Some("ferry.toml".as_ref()), "{exec}");

    // The example config is the daemon's own default, with the node id left to set.
    let example = Path::new(DIST).join("ferry.toml");
    let config = NodeConfig::load(&example).unwrap();
    assert_eq!(config.node_id, "CHANGE-ME");
    let text = std::fs::read_to_string(&example).unwrap();
    let default = NodeConfig::default_toml().replace("node_id = \"node-a\"", "node_id = \"CHANGE-ME\"");
    assert_eq!(
        text.trim_end(),
        default.trim_end(),
        "engine/dist/ferry.toml differs from `ferry serve --print-default-config`"
    );
}

#[test]
fn completions_and_the_man_page_name_every_command() {
    let run = |args: &[&str]| {
        let out = Command::new(ferry_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let commands =
        ["serve", "copy", "migrate", "status", "list", "abort", "forget", "set-rate", "demo", "certs", "wal"];
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for command in commands {
            assert!(script.contains(command), "{shell} completions lack {command}");
        }
    }
    // roff escapes the hyphen of `set-rate`.
    let man = run(&["man"]).replace("\\-", "-");
    assert!(man.contains(".TH ferry 1"), "{}", &man[..man.len().min(300)]);
    for command in commands {
        assert!(man.contains(command), "the man page lacks {command}");
    }
    let out = Command::new(ferry_bin()).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}
