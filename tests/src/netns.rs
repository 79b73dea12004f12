//! Network namespaces for multi-host scenarios: each [`Host`] is a namespace of its own, with
//! `lo` up and a veth pair to the test process's namespace (the "host" side), so daemons run
//! as separate hosts that reach each other only through the test process (a relay, see
//! [`crate::relay`]).
//!
//! What it does: [`Host::new`] creates a namespace named `ferryt-<pid>-<n>` and a veth pair
//! `fyt<pid>n<n>` (test side) / `veth0` (namespace side) with a /30 of 198.18.0.0/15 (the
//! range set aside for benchmarking networks): the test side gets `.1`, the namespace `.2`.
//! [`Host::command`] runs a program inside it (`ip netns exec`); [`Host::set_link`] takes the
//! test side of the veth down or up (a real link cut: the kernel drops what is sent either
//! way). Before the first namespace of a process, namespaces and veths of this naming whose
//! pid is no longer alive are removed (processes still inside them are killed first: they are
//! daemons a killed test left). On drop, a host kills what still runs inside it and removes
//! its veth and namespace, also when the test panics (unwinding runs the drop).
//!
//! What it does not: route between namespaces (no default route, no forwarding: a datagram
//! from one host reaches another only through a socket of the test process), emulate delay
//! (this kernel has no netem), or run without root and `ip` (iproute2): [`hosts_or_skip`]
//! says why it cannot, and fails instead of skipping when `CI=true`.
//!
//! Invariants: names are unique per live process (pid and a per-process counter); a host's
//! addresses are checked free on the test side before use.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// Every namespace this harness creates starts so; the pid of the process that made it follows.
pub const NAMESPACE_PREFIX: &str = "ferryt-";
/// The test side of every veth this harness creates starts so (an interface name has at most
/// 15 bytes: `fyt` + a 7-digit pid + `n` + 3 digits fits).
pub const VETH_PREFIX: &str = "fyt";
/// The veth's name inside a namespace.
pub const NAMESPACE_VETH: &str = "veth0";
/// 198.18.0.0/15 (RFC 2544): 32,768 subnets of 4 addresses.
const SUBNETS_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const SUBNETS_COUNT: u32 = 1 << 15;
/// Subnets tried for one host before giving up (each taken one is skipped).
const SUBNET_TRIES_MAX_COUNT: u32 = 64;

static HOSTS_MADE_COUNT: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the test's own by a veth pair. See the module docs.
#[derive(Debug)]
pub struct Host {
    /// The namespace's name.
    pub name: String,
    /// The test side of the veth.
    pub veth: String,
    /// The test side's address: what this host reaches the test process at.
    pub host_ip: Ipv4Addr,
    /// The namespace side's address: where the test process reaches this host.
    pub ip: Ipv4Addr,
}

impl Host {
    /// Creates a namespace with `lo` and a veth up (see the module docs); needs root.
    pub fn new() -> anyhow::Result<Host> {
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(|| {
            if let Err(e) = remove_stale() {
                eprintln!("netns: stale namespaces not all removed: {e:#}");
            }
        });
        let pid = std::process::id();
        let n = HOSTS_MADE_COUNT.fetch_add(1, Ordering::Relaxed) % 1000;
        let (host_ip, ip) = free_subnet(pid, n)?;
        let name = format!("{NAMESPACE_PREFIX}{pid}-{n}");
        let veth = format!("{VETH_PREFIX}{pid}n{n}");
        ip_cmd(&["netns", "add", &name])?;
        // From here on the drop removes whatever was made, should a later step fail.
        let host = Host { name, veth, host_ip, ip };
        let peer = ["peer", "name", NAMESPACE_VETH, "netns", &host.name];
        ip_cmd(&[&["link", "add", &host.veth, "type", "veth"][..], &peer[..]].concat())?;
        ip_cmd(&["addr", "add", &format!("{host_ip}/30"), "dev", &host.veth])?;
        ip_cmd(&["link", "set", &host.veth, "up"])?;
        let inside = |args: &[&str]| ip_cmd(&[&["-n", &host.name][..], args].concat());
        inside(&["addr", "add", &format!("{ip}/30"), "dev", NAMESPACE_VETH])?;
        inside(&["link", "set", NAMESPACE_VETH, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// The words that run a program inside this namespace: `ip netns exec NAME`.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// `program` run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Takes the test side of the veth down (`false`: nothing passes either way) or up again.
    pub fn set_link(&self, up: bool) -> anyhow::Result<()> {
        ip_cmd(&["link", "set", &self.veth, if up { "up" } else { "down" }]).map(drop)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        kill_inside(&self.name);
        // Deleting one end of a veth deletes both; the namespace goes once nothing is in it.
        let _ = ip_cmd(&["link", "del", &self.veth]);
        if let Err(e) = ip_cmd(&["netns", "del", &self.name]) {
            eprintln!("netns: {e:#}");
        }
    }
}

/// `count` hosts, or `None` after printing why they cannot be made here (not root, no `ip`,
/// no permission for namespaces). Under `CI=true` that is a failure: CI runs as root with
/// iproute2 installed (`.ci/run`), and a multi-host test does not skip there.
pub fn hosts_or_skip(count: usize, test: &str) -> Option<Vec<Host>> {
    let made = (|| {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("network namespaces need root");
        }
        Command::new("ip").arg("-V").output().context("cannot run `ip` (install iproute2)")?;
        (0..count).map(|_| Host::new()).collect::<anyhow::Result<Vec<Host>>>()
    })();
    match made {
        Ok(hosts) => Some(hosts),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: a multi-host test does not skip in CI (CI=true): {e:#}")
        }
        Err(e) => {
            println!("{test}: SKIPPED: {e:#}");
            None
        }
    }
}

/// Runs `ip ARGS`; its stdout, or an error with its stderr.
fn ip_cmd(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("cannot run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The test-side and namespace-side addresses of a /30 no interface of the test's namespace
/// holds yet, chosen from the pid and the host's number.
fn free_subnet(pid: u32, n: u32) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let taken = ip_cmd(&["-o", "-4", "addr", "show"])?;
    let first = (pid % 1024) * 32 + n % 32;
    for i in 0..SUBNET_TRIES_MAX_COUNT {
        let subnet = SUBNETS_BASE + ((first + i) % SUBNETS_COUNT) * 4;
        let (host_ip, ip) = (Ipv4Addr::from(subnet + 1), Ipv4Addr::from(subnet + 2));
        let used = |a: Ipv4Addr| taken.contains(&format!("inet {a}/"));
        if !used(host_ip) && !used(ip) {
            return Ok((host_ip, ip));
        }
    }
    bail!("no free /30 in 198.18.0.0/15 after {SUBNET_TRIES_MAX_COUNT} tries")
}

/// The pid in a name this harness made (`ferryt-<pid>-<n>`, `fyt<pid>n<n>`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAMESPACE_PREFIX).map(|r| r.split('-').next());
    let rest = rest.or_else(|| name.strip_prefix(VETH_PREFIX).map(|r| r.split('n').next()));
    let digits = rest??;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// SIGKILLs every process inside namespace `name` (daemons a test started there).
fn kill_inside(name: &str) {
    let Ok(pids) = ip_cmd(&["netns", "pids", name]) else { return };
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
        // SAFETY: kill(2) of a process inside a namespace this harness made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes the namespaces and veths of this naming whose process is gone (see the module docs).
fn remove_stale() -> anyhow::Result<()> {
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !alive(pid));
    let namespaces = ip_cmd(&["netns", "list"])?;
    for name in namespaces.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| stale(n)) {
        kill_inside(name);
        ip_cmd(&["netns", "del", name])?;
        eprintln!("netns: removed stale namespace {name}");
    }
    // `12: fyt123n4@if11: <...>`: a veth whose namespace end is gone with its namespace goes
    // with it; one left in the test's namespace alone is removed here.
    let links = ip_cmd(&["-o", "link", "show"])?;
    let names = links.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n));
    for name in names.filter(|n| n.starts_with(VETH_PREFIX) && stale(n)) {
        // Its pair may have gone already with an earlier one of the same pair.
        if ip_cmd(&["link", "del", name]).is_ok() {
            eprintln!("netns: removed stale veth {name}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_are_read_from_both_namings_only() {
        assert_eq!(owner_pid("ferryt-1234-7"), Some(1234));
        assert_eq!(owner_pid("fyt1234n7"), Some(1234));
        assert_eq!(owner_pid("ferryt-x-1"), None);
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("fytn1"), None);
        assert_eq!(owner_pid("ferryt-"), None);
    }

    /// Needs root and iproute2 (skips otherwise, fails so under `CI=true`): a host is made,
    /// reachable from the test's namespace, cut and restored, and gone after its drop, veth
    /// included.
    #[test]
    fn a_host_is_reachable_cut_restored_and_removed() {
        let Some(mut hosts) = hosts_or_skip(1, "netns") else { return };
        let host = hosts.pop().unwrap();
        assert!(host.veth.len() <= 15, "{}", host.veth);
        let listener = host.command("true").status().unwrap();
        assert!(listener.success(), "cannot run a program inside {}", host.name);
        // A UDP echo inside the namespace: the test's namespace reaches it over the veth.
        let echo = std::net::UdpSocket::bind((host.host_ip, 0)).unwrap();
        echo.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let to = echo.local_addr().unwrap();
        let send = |what: &str| {
            let script = format!("printf {what} > /dev/udp/{}/{}", to.ip(), to.port());
            host.command("bash").args(["-c", &script]).status().unwrap()
        };
        assert!(send("hello").success());
        let mut buf = [0u8; 16];
        let (len, from) = echo.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..len], from.ip()), (&b"hello"[..], std::net::IpAddr::V4(host.ip)));
        host.set_link(false).unwrap();
        let _ = send("lost");
        echo.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
        assert!(echo.recv_from(&mut buf).is_err(), "a datagram crossed a link that is down");
        host.set_link(true).unwrap();
        echo.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        // The link comes back: the first datagrams may race its carrier, so send until one lands.
        let mut landed = false;
        for _ in 0..50 {
            let _ = send("again");
            if echo.recv_from(&mut buf).is_ok_and(|(len, _)| &buf[..len] == b"again") {
                landed = true;
                break;
            }
        }
        assert!(landed, "nothing crossed the link after it came back up");
        let (name, veth) = (host.name.clone(), host.veth.clone());
        drop(host);
        assert!(!namespace_exists(&name), "{name} is left");
        assert!(ip_cmd(&["link", "show", &veth]).is_err(), "{veth} is left");
    }

    fn namespace_exists(name: &str) -> bool {
        ip_cmd(&["netns", "list"]).unwrap().lines().any(|l| l.split_whitespace().next() == Some(name))
    }

    /// A test that panics with a host and a process inside it leaves neither behind.
    #[test]
    fn a_panicking_test_leaves_no_namespace_and_no_process() {
        let Some(mut hosts) = hosts_or_skip(1, "netns") else { return };
        let host = hosts.pop().unwrap();
        let name = host.name.clone();
        let mut sleeper = host.command("sleep").arg("600").spawn().unwrap();
        let inside = || ip_cmd(&["netns", "pids", &name]).unwrap().split_whitespace().count();
        crate::wait_until_blocking("the sleeper inside", std::time::Duration::from_secs(10), || inside() == 1).unwrap();
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _host = host;
            panic!("the test fails");
        }));
        assert!(failed.is_err());
        assert!(!namespace_exists(&name), "{name} is left");
        let status = sleeper.wait().unwrap();
        assert!(!status.success(), "the process inside was not killed: {status}");
    }
}
