//! `scp` over loopback against a throwaway OpenSSH server on 127.0.0.1.
//!
//! What it does: makes a host key and a client key in a temp dir, writes an `sshd_config`
//! there (ListenAddress 127.0.0.1, the client key as the only authorized key, root may log
//! in with a key only, StrictModes off, no PAM, no passwords), starts `sshd -D` on a free
//! port, waits until it accepts TCP, and runs `scp` of the shard's files into a folder on the
//! staging file system. The server is killed when the [`Sshd`] drops.
//!
//! What it does not: install OpenSSH or touch the system's sshd config, host keys or
//! `~/.ssh`. When `sshd` is missing or will not start, [`Sshd::start`] says why and the
//! caller skips the scp column.
//!
//! [`tar_ssh_copy`] runs `tar -c | ssh ... 'tar -x && sync'` of a shard's folder tree instead,
//! the usual way to move many small files.
//!
//! Cipher: `scp` with no `-c` uses OpenSSH's default preference (chacha20-poly1305 first);
//! [`scp_copy`] can also force one (e.g. `aes128-gcm@openssh.com`, ferry's cipher).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::shard::Shard;
use crate::RunResult;

const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running throwaway sshd.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).chain(extra.iter().map(PathBuf::from)).find(|p| p.is_file())
}

fn run_ok(command: &mut Command) -> anyhow::Result<()> {
    let out = command.stdin(Stdio::null()).output().with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

impl Sshd {
    /// Starts sshd on 127.0.0.1; the error says why it could not.
    pub fn start() -> anyhow::Result<Self> {
        let sshd = find_program("sshd", &["/usr/sbin/sshd", "/usr/local/sbin/sshd"])
            .context("no sshd binary (install openssh-server)")?;
        find_program("scp", &[]).context("no scp binary (install openssh-client)")?;
        let keygen = find_program("ssh-keygen", &[]).context("no ssh-keygen binary (install openssh-client)")?;
        let user = whoami()?;
        let dir = tempfile::Builder::new().prefix("ferry-bench-sshd-").tempdir()?;
        for key in ["host_key", "client_key"] {
            run_ok(Command::new(&keygen).args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(dir.path().join(key)))?;
        }
        std::fs::copy(dir.path().join("client_key.pub"), dir.path().join("authorized_keys"))?;
        // The privilege separation folder sshd insists on (Debian: /run/sshd).
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port()?;
        let sftp = ["/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server"]
            .iter()
            .find(|p| Path::new(p).is_file())
            .map_or("internal-sftp".to_string(), |p| (*p).to_string());
        let d = dir.path().display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPidFile {d}/sshd.pid\nLogLevel ERROR\n\
             Subsystem sftp {sftp}\n"
        );
        std::fs::write(dir.path().join("sshd_config"), config)?;
        let log = std::fs::File::create(dir.path().join("sshd.log"))?;
        let mut child = Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", sshd.display()))?;
        let deadline = Instant::now() + SSHD_READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default();
                anyhow::bail!("sshd exited at start ({status}): {}", log.trim());
            }
            if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("sshd did not listen on 127.0.0.1:{port} within {SSHD_READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, dir, port, user })
    }

    fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }
}

fn whoami() -> anyhow::Result<String> {
    let out = Command::new("id").arg("-un").output().context("cannot run id -un")?;
    anyhow::ensure!(out.status.success(), "id -un failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Copies every shard file with `scp` into `target_dir` (created) and times the scp process.
/// `cipher`: `None` for OpenSSH's default choice.
pub fn scp_copy(sshd: &Sshd, shard: &Shard, target_dir: &Path, cipher: Option<&str>) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(target_dir)?;
    let mut command = Command::new("scp");
    command
        .args(["-q", "-B", "-P", &sshd.port.to_string(), "-i"])
        .arg(sshd.client_key())
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "LogLevel=ERROR"]);
    if let Some(cipher) = cipher {
        command.args(["-c", cipher]);
    }
    for file in &shard.files {
        command.arg(&file.path);
    }
    command.arg(format!("{}@127.0.0.1:{}/", sshd.user, target_dir.display()));
    let started = Instant::now();
    let out = command.stdin(Stdio::null()).output().context("cannot run scp")?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "scp failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut bytes_total = 0;
    for file in &shard.files {
        let len = std::fs::metadata(target_dir.join(&file.rel))
            .with_context(|| format!("scp did not deliver {}", file.rel))?
            .len();
        anyhow::ensure!(len == file.size_bytes, "scp delivered {} with {len} bytes of {}", file.rel, file.size_bytes);
        bytes_total += len;
    }
    Ok(RunResult { bytes_total, elapsed })
}

/// Copies the whole folder tree of `shard` with `tar -c -C <root> . | ssh ... 'tar -x -C
/// <target_dir> && sync'` (OpenSSH's default cipher) and times it: the files are durable
/// (`sync`) when it returns, as ferry's are at its commit. `target_dir` is created.
pub fn tar_ssh_copy(sshd: &Sshd, shard: &Shard, target_dir: &Path) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(target_dir)?;
    let remote = format!("tar -x -f - -C '{}' && sync", target_dir.display());
    let script = format!(
        "tar -c -f - -C '{root}' . | ssh -q -p {port} -i '{key}' -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o LogLevel=ERROR -o BatchMode=yes \
         {user}@127.0.0.1 \"{remote}\"",
        root = shard.root.display(),
        port = sshd.port,
        key = sshd.client_key().display(),
        user = sshd.user,
    );
    let started = Instant::now();
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .context("cannot run bash")?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "tar | ssh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    crate::ferry_copy::check_sizes(shard, target_dir)?;
    Ok(RunResult { bytes_total: shard.size_bytes, elapsed })
}
