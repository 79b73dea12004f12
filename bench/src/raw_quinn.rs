//! The raw quinn baselines: the fastest plain quinn streams move bytes on this machine.
//!
//! What it does: the sender writes clones of one static 1 MiB `Bytes` with `write_chunk` on
//! uni streams until the asked number of bytes is sent, the receiver reads with `read_chunk`
//! and discards. Both use ferry's own rustls configs ([`ferry_engine::tls::server_crypto`] /
//! [`ferry_engine::tls::client_crypto`]), so the crypto provider, TLS 1.3, the cipher suite
//! (AES-128-GCM first) and mutual certificate checks are the same as ferry's. Two settings
//! ([`RawSettings`]):
//! - [`RawSettings::QuinnDefault`]: one connection, one stream, quinn's default
//!   `TransportConfig`, `EndpointConfig` and UDP socket buffers (MTU bound 1452, quinn's
//!   windows): the old baseline;
//! - [`RawSettings::Ferry`]: ferry's endpoints exactly, built by the engine's own code
//!   ([`ferry_engine::quic::server_endpoint`], [`ferry_engine::quic::client_endpoint`],
//!   [`ferry_engine::quic::bulk_client_config`] with [`QuicTuning::default`]): the MTU bound of
//!   6400, ferry's windows, its socket buffers, and each connection on its own client endpoint
//!   as ferry's source opens them; `connections_count` x `streams_count` streams, each
//!   carrying an equal share. This is the transport's own ceiling ferry is held to.
//!
//! What it does not: read files, checksum, frame, write or fsync anything.
//!
//! Timing: from before the client endpoints are made until the receiver, having read every
//! byte of a connection, has closed it and the sender has seen every close.
//!
//! Two shapes: sender and receiver in one process ([`raw_quinn_copy`]), or the receiver in a
//! child process ([`receiver_endpoint`] + [`receive_all`], which `ferry-bench-e2e` runs as a
//! hidden mode) and the sender in the bench ([`send_all`]), like ferry's two daemons.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ferry_engine::quic::QuicTuning;
use ferry_engine::tls::NodeIdentity;
use quinn::{ClientConfig, Connection, Endpoint, ServerConfig, VarInt};

use crate::certs::{node, BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::RunResult;

/// The one block the sender writes, over and over.
pub const RAW_QUINN_BLOCK_BYTES: usize = 1 << 20;

/// Which endpoint and transport settings, and how many connections and streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawSettings {
    /// quinn's defaults, one connection, one uni stream.
    QuinnDefault,
    /// ferry's endpoint, transport and socket settings ([`QuicTuning::default`]).
    Ferry { connections_count: u32, streams_count: u32 },
}

impl RawSettings {
    /// ferry's settings with `ferry copy`'s default shape: 1 connection, 4 streams.
    pub const FERRY_DEFAULT: Self = Self::Ferry { connections_count: 1, streams_count: 4 };

    /// `(connections, streams per connection)`.
    pub fn shape(self) -> (u32, u32) {
        match self {
            Self::QuinnDefault => (1, 1),
            Self::Ferry { connections_count, streams_count } => (connections_count.max(1), streams_count.max(1)),
        }
    }

    /// The command-line form the receiver child takes: `quinn` or `ferry:<conns>:<streams>`.
    pub fn to_arg(self) -> String {
        match self {
            Self::QuinnDefault => "quinn".into(),
            Self::Ferry { connections_count, streams_count } => format!("ferry:{connections_count}:{streams_count}"),
        }
    }

    /// Parses [`RawSettings::to_arg`]'s form.
    pub fn from_arg(text: &str) -> anyhow::Result<Self> {
        if text == "quinn" {
            return Ok(Self::QuinnDefault);
        }
        let mut parts = text.split(':');
        let (Some("ferry"), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("{text:?} is not `quinn` or `ferry:<connections>:<streams>`");
        };
        let connections_count: u32 = c.parse().with_context(|| format!("bad connection count in {text:?}"))?;
        let streams_count: u32 = s.parse().with_context(|| format!("bad stream count in {text:?}"))?;
        anyhow::ensure!(connections_count > 0 && streams_count > 0, "{text:?}: counts must be at least 1");
        Ok(Self::Ferry { connections_count, streams_count })
    }
}

/// Sends `bytes_total` bytes over loopback with `settings` and times it, sender and receiver
/// in this process.
pub async fn raw_quinn_copy(certs: &BenchCerts, bytes_total: u64, settings: RawSettings) -> anyhow::Result<RunResult> {
    let server = receiver_endpoint(certs.path(), settings)?;
    let server_addr = server.local_addr()?;
    let receiver = tokio::spawn(receive_all(server.clone(), settings));
    let sent = send_all(certs.path(), server_addr, bytes_total, settings).await;
    let received = receiver.await.map_err(|e| anyhow::anyhow!("the receiver task failed: {e}"))??;
    server.close(VarInt::from_u32(0), b"done");
    let run = sent?;
    anyhow::ensure!(received == bytes_total, "the raw quinn receiver got {received} bytes, {bytes_total} were sent");
    Ok(run)
}

/// The receiver's endpoint on an ephemeral loopback port, node `target` (allowing node
/// `source`), with the certificates in `certs_dir`.
pub fn receiver_endpoint(certs_dir: &Path, settings: RawSettings) -> anyhow::Result<Endpoint> {
    let identity = NodeIdentity::from_dir(certs_dir, &node(TARGET_NODE)?)?;
    let crypto = ferry_engine::tls::server_crypto(&identity, &[node(SOURCE_NODE)?])?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(match settings {
        // `with_crypto` keeps quinn's default transport config.
        RawSettings::QuinnDefault => Endpoint::server(ServerConfig::with_crypto(crypto), addr)?,
        RawSettings::Ferry { .. } => ferry_engine::quic::server_endpoint(addr, crypto, &QuicTuning::default())?,
    })
}

/// Accepts the connections `settings` names and every stream on each, reads them to the end
/// with `read_chunk` (discarding), closes each connection once its streams are read (so the
/// sender learns every byte arrived), and returns the bytes read.
pub async fn receive_all(endpoint: Endpoint, settings: RawSettings) -> anyhow::Result<u64> {
    let (connections_count, streams_count) = settings.shape();
    let mut conns = Vec::new();
    for _ in 0..connections_count {
        let incoming =
            endpoint.accept().await.ok_or_else(|| anyhow::anyhow!("the endpoint closed before a peer came"))?;
        conns.push(tokio::spawn(receive_connection(incoming, streams_count)));
    }
    let mut received = 0u64;
    for conn in conns {
        received += conn.await.map_err(|e| anyhow::anyhow!("a receiver task failed: {e}"))??;
    }
    Ok(received)
}

async fn receive_connection(incoming: quinn::Incoming, streams_count: u32) -> anyhow::Result<u64> {
    let conn = incoming.await?;
    let mut streams = Vec::new();
    for _ in 0..streams_count {
        let mut recv = conn.accept_uni().await?;
        streams.push(tokio::spawn(async move {
            let mut received = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                received += chunk.bytes.len() as u64;
            }
            anyhow::Ok(received)
        }));
    }
    let mut received = 0u64;
    for stream in streams {
        received += stream.await.map_err(|e| anyhow::anyhow!("a stream task failed: {e}"))??;
    }
    conn.close(VarInt::from_u32(0), b"received");
    Ok(received)
}

/// Connects to `server_addr` as node `source` (certificates in `certs_dir`), writes
/// `bytes_total` bytes spread evenly over the streams of `settings`, and returns once the
/// receiver has closed every connection after reading it all. Timed from before the client
/// endpoints are made.
pub async fn send_all(
    certs_dir: &Path,
    server_addr: SocketAddr,
    bytes_total: u64,
    settings: RawSettings,
) -> anyhow::Result<RunResult> {
    let identity = NodeIdentity::from_dir(certs_dir, &node(SOURCE_NODE)?)?;
    let crypto = ferry_engine::tls::client_crypto(&identity)?;
    let block = Bytes::from(block_bytes());
    let (connections_count, streams_count) = settings.shape();
    let shares = split_evenly(bytes_total, u64::from(connections_count) * u64::from(streams_count));
    let started = Instant::now();
    let mut links = Vec::new();
    for _ in 0..connections_count {
        links.push(connect(crypto.clone(), server_addr, settings).await?);
    }
    let mut writers = Vec::new();
    for (index, share) in shares.into_iter().enumerate() {
        let conn_index = index / streams_count as usize;
        let (_, conn) = links.get(conn_index).context("a stream without its connection")?;
        let stream = conn.open_uni().await?;
        writers.push(tokio::spawn(write_share(stream, block.clone(), share)));
    }
    for writer in writers {
        writer.await.map_err(|e| anyhow::anyhow!("a writer task failed: {e}"))??;
    }
    for (_, conn) in &links {
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(0) => {}
            other => anyhow::bail!("a raw quinn connection ended badly: {other}"),
        }
    }
    let elapsed = started.elapsed();
    for (endpoint, _) in links {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    Ok(RunResult { bytes_total, elapsed })
}

/// One connection on its own client endpoint, as ferry's source opens its chunk connections.
async fn connect(
    crypto: Arc<quinn::crypto::rustls::QuicClientConfig>,
    server_addr: SocketAddr,
    settings: RawSettings,
) -> anyhow::Result<(Endpoint, Connection)> {
    let (endpoint, config) = match settings {
        // `ClientConfig::new` keeps quinn's default transport config.
        RawSettings::QuinnDefault => {
            (Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?, ClientConfig::new(crypto))
        }
        RawSettings::Ferry { .. } => {
            let tuning = QuicTuning::default();
            (
                ferry_engine::quic::client_endpoint(server_addr, &tuning)?,
                ferry_engine::quic::bulk_client_config(crypto, &tuning),
            )
        }
    };
    let conn = endpoint.connect_with(config, server_addr, TARGET_NODE)?.await?;
    Ok((endpoint, conn))
}

async fn write_share(mut stream: quinn::SendStream, block: Bytes, share_bytes: u64) -> anyhow::Result<()> {
    let mut left = share_bytes;
    while left > 0 {
        let n = usize::try_from(left.min(RAW_QUINN_BLOCK_BYTES as u64)).unwrap_or(RAW_QUINN_BLOCK_BYTES);
        let chunk = if n == RAW_QUINN_BLOCK_BYTES { block.clone() } else { block.slice(..n) };
        stream.write_chunk(chunk).await?;
        left -= n as u64;
    }
    stream.finish()?;
    Ok(())
}

/// What one two-process run measured.
#[derive(Debug, Clone, Copy)]
pub struct TwoProcessRun {
    pub run: RunResult,
    pub sender_cpu_secs: f64,
    pub receiver_cpu_secs: f64,
}

/// The baseline with the receiver in a child process (`exe` run as `<exe> <receiver_mode>
/// <certs dir> <settings>`, which must call [`run_receiver`]) and the sender in this process
/// on `runtime`; each side's CPU time is measured (this process is otherwise idle while it
/// sends, so its CPU time is the sender's).
pub fn two_process(
    exe: &Path,
    receiver_mode: &str,
    runtime: &tokio::runtime::Runtime,
    certs: &BenchCerts,
    bytes_total: u64,
    settings: RawSettings,
) -> anyhow::Result<TwoProcessRun> {
    let mut child = std::process::Command::new(exe)
        .arg(receiver_mode)
        .arg(certs.path())
        .arg(settings.to_arg())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the raw quinn receiver process")?;
    let result = (|| {
        let (addr, lines) = crate::daemons::wait_listening(&mut child)?;
        let (_, sender_ticks_before) = crate::procstat::read_cpu_ticks(std::process::id())?;
        let run = runtime.block_on(send_all(certs.path(), addr, bytes_total, settings))?;
        let (_, sender_ticks_after) = crate::procstat::read_cpu_ticks(std::process::id())?;
        let sender_cpu_secs = crate::procstat::ticks_to_secs(sender_ticks_after.saturating_sub(sender_ticks_before));
        let (status, receiver_cpu_secs) = crate::procstat::wait_with_cpu(&mut child)?;
        anyhow::ensure!(status.success(), "the raw quinn receiver failed ({status})");
        let received = lines
            .iter()
            .find_map(|line| line.strip_prefix("received ").and_then(|n| n.trim().parse::<u64>().ok()))
            .context("the raw quinn receiver did not say how much it received")?;
        anyhow::ensure!(received == bytes_total, "the raw quinn receiver got {received} of {bytes_total} bytes");
        Ok(TwoProcessRun { run, sender_cpu_secs, receiver_cpu_secs })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The child side of [`two_process`]: listen, print `listening on ADDR`, receive, print
/// `received N`.
pub fn run_receiver(certs_dir: &Path, settings: RawSettings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let endpoint = receiver_endpoint(certs_dir, settings)?;
        println!("listening on {}", endpoint.local_addr()?);
        std::io::Write::flush(&mut std::io::stdout())?;
        let received = receive_all(endpoint.clone(), settings).await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        println!("received {received}");
        Ok(())
    })
}

/// `total` split into `parts` shares that differ by at most one byte and add up to it.
fn split_evenly(total: u64, parts: u64) -> Vec<u64> {
    let parts = parts.max(1);
    (0..parts).map(|i| total / parts + u64::from(i < total % parts)).collect()
}

/// Non-constant content, so nothing on the way could take a shortcut on zeros.
pub fn block_bytes() -> Vec<u8> {
    (0..RAW_QUINN_BLOCK_BYTES).map(|i| u8::try_from((i.wrapping_mul(131) >> 3) & 0xff).unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_byte_arrives_including_a_partial_block() {
        let certs = BenchCerts::new().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let total = 3 * RAW_QUINN_BLOCK_BYTES as u64 + 12_345;
        for settings in [RawSettings::QuinnDefault, RawSettings::Ferry { connections_count: 2, streams_count: 3 }] {
            let run = runtime.block_on(raw_quinn_copy(&certs, total, settings)).unwrap();
            assert_eq!(run.bytes_total, total, "{settings:?}");
        }
    }

    #[test]
    fn shares_add_up_and_settings_round_trip() {
        assert_eq!(split_evenly(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(split_evenly(3, 4).iter().sum::<u64>(), 3);
        for settings in [RawSettings::QuinnDefault, RawSettings::FERRY_DEFAULT] {
            assert_eq!(RawSettings::from_arg(&settings.to_arg()).unwrap(), settings);
        }
        assert!(RawSettings::from_arg("ferry:0:4").is_err());
        assert!(RawSettings::from_arg("ferry:1").is_err());
    }
}
