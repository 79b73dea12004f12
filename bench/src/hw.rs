//! The baselines of the hardware benches: `ib_write_bw` on the RDMA link, the link's rate, and
//! how fast one core computes CRC32C.
//!
//! What it does: [`ib_write_bw`] runs perftest's `ib_write_bw` as a server and a client on the
//! same device and port (a loopback through the HCA, as the two daemons of the RDMA bench are)
//! and parses the client's average bandwidth ([`parse_ib_write_bw`]); [`link_rate`] reads
//! `/sys/class/infiniband/DEV/ports/N/rate`; [`crc32c_bytes_per_sec_one_core`] times CRC32C on
//! this thread. The O_DIRECT bench's baseline, fio, is `ferry_hwtests::fio`.
//!
//! What it does not: install perftest, or judge a figure.
//!
//! Invariants: both `ib_write_bw` processes are killed and reaped, also on error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Message size of the `ib_write_bw` baseline: the chunk size of the ferry copy it is beside.
pub const IB_MESSAGE_BYTES: u32 = 1 << 20;
/// TCP port `ib_write_bw` exchanges its queue pair numbers on (`-p`), off perftest's default.
const IB_PORT_TCP: u16 = 18_615;

/// `ib_write_bw` on PATH, if there is one.
pub fn find_ib_write_bw() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("ib_write_bw")).find(|p| p.is_file())
}

/// The words of one `ib_write_bw` side; `server` is `None` for the server, the host for the client.
pub fn ib_write_bw_args(device: &str, port: u8, gid_index: u8, iterations: u32, server: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "-d".to_owned(),
        device.to_owned(),
        "-i".to_owned(),
        port.to_string(),
        "-x".to_owned(),
        gid_index.to_string(),
        "-s".to_owned(),
        IB_MESSAGE_BYTES.to_string(),
        "-n".to_owned(),
        iterations.to_string(),
        "-p".to_owned(),
        IB_PORT_TCP.to_string(),
        "-F".to_owned(),
        "--report_gbits".to_owned(),
    ];
    args.extend(server.map(str::to_owned));
    args
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `ib_write_bw` server and client on `device`/`port`; the client's average in bytes/s.
pub fn ib_write_bw(bin: &Path, device: &str, port: u8, gid_index: u8, iterations: u32) -> anyhow::Result<f64> {
    let server = Command::new(bin)
        .args(ib_write_bw_args(device, port, gid_index, iterations, None))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let _server = Killed(server);
    // The server needs a moment to listen; the client retries until it connects.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(bin)
            .args(ib_write_bw_args(device, port, gid_index, iterations, Some("127.0.0.1")))
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            return parse_ib_write_bw(&text);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "ib_write_bw client failed ({}): {}{}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// The average bandwidth of an `ib_write_bw` report, in bytes per second: the fourth number of
/// the line under the `#bytes #iterations BW peak BW average MsgRate` header, in the header's
/// unit (`Gb/sec` with `--report_gbits`, else `MB/sec`, perftest's MiB).
pub fn parse_ib_write_bw(text: &str) -> anyhow::Result<f64> {
    let mut lines = text.lines();
    let header = lines.by_ref().find(|l| l.contains("BW average[")).context("no `BW average` header in the report")?;
    let unit =
        header.split("BW average[").nth(1).and_then(|rest| rest.split(']').next()).context("no unit in the header")?;
    let scale = match unit {
        "Gb/sec" => 1e9 / 8.0,
        "MB/sec" => 1_048_576.0,
        other => anyhow::bail!("unknown bandwidth unit {other:?}"),
    };
    let values: Vec<f64> = lines
        .map(|l| l.split_whitespace().filter_map(|w| w.parse::<f64>().ok()).collect::<Vec<_>>())
        .find(|numbers| numbers.len() >= 4)
        .context("no result line under the header")?;
    let average = values.get(3).copied().context("no average column")?;
    anyhow::ensure!(average > 0.0, "ib_write_bw measured {average}");
    Ok(average * scale)
}

/// The port's rate as the kernel states it (`100 Gb/sec (4X EDR)`), or why it cannot be read.
pub fn link_rate(device: &str, port: u8) -> String {
    let path = Path::new("/sys/class/infiniband").join(device).join("ports").join(port.to_string()).join("rate");
    std::fs::read_to_string(&path)
        .map_or_else(|e| format!("unknown ({}: {e})", path.display()), |s| s.trim().to_owned())
}

/// CRC32C bytes per second on this thread (one core): 64 MiB, best of three passes.
#[allow(clippy::cast_possible_truncation)] // the pattern takes a byte of each word
pub fn crc32c_bytes_per_sec_one_core() -> f64 {
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut best = f64::MAX;
    let mut sink = 0u32;
    for _ in 0..3 {
        let started = Instant::now();
        sink ^= ferry_wire::crc32c(&data);
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    data.len() as f64 / best.max(1e-9)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The layout perftest 4.x prints (written from its source's format strings: no RDMA
    /// hardware here to capture one).
    const REPORT_GBITS: &str = "\
---------------------------------------------------------------------------------------
                    RDMA_Write BW Test
 Dual-port       : OFF		Device         : mlx5_0
 Number of qps   : 1		Transport type : IB
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]
 1048576    5000             97.61              97.58  		   0.011633
---------------------------------------------------------------------------------------
";

    #[test]
    fn the_average_column_is_read_in_its_unit() {
        let bytes_per_sec = parse_ib_write_bw(REPORT_GBITS).unwrap();
        assert!((bytes_per_sec - 97.58e9 / 8.0).abs() < 1.0, "{bytes_per_sec}");
        let mib = REPORT_GBITS.replace("[Gb/sec]", "[MB/sec]").replace("97.58", "11632.5");
        assert!((parse_ib_write_bw(&mib).unwrap() - 11632.5 * 1_048_576.0).abs() < 1.0);
        assert!(parse_ib_write_bw("Couldn't connect to 127.0.0.1:18615").is_err());
        assert!(parse_ib_write_bw(&REPORT_GBITS.replace("[Gb/sec]", "[furlongs]")).is_err());
        let cut = REPORT_GBITS.split(" 1048576").next().unwrap();
        assert!(parse_ib_write_bw(cut).is_err());
    }

    #[test]
    fn both_sides_name_device_port_gid_and_size() {
        let client = ib_write_bw_args("mlx5_0", 1, 3, 5000, Some("127.0.0.1")).join(" ");
        assert_eq!(client, "-d mlx5_0 -i 1 -x 3 -s 1048576 -n 5000 -p 18615 -F --report_gbits 127.0.0.1");
        assert!(!ib_write_bw_args("mlx5_0", 1, 3, 5000, None).join(" ").contains("127.0.0.1"));
        assert!(link_rate("ferry-no-such-device", 1).starts_with("unknown"));
        assert!(crc32c_bytes_per_sec_one_core() > 0.0);
    }
}
