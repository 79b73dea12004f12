//! The raw quinn baseline: the fastest a plain quinn stream moves bytes on this machine.
//!
//! What it does: one connection, one uni stream; the sender writes clones of one static
//! 1 MiB `Bytes` with `write_chunk` until the asked number of bytes is sent, the receiver reads
//! with `read_chunk` and discards. The endpoints use quinn's default `TransportConfig`,
//! `EndpointConfig` and UDP socket buffers (quinn's default windows), and ferry's own rustls
//! configs ([`ferry_engine::tls::server_crypto`] / [`ferry_engine::tls::client_crypto`]), so the
//! crypto provider, TLS 1.3, the cipher suite (AES-128-GCM first) and mutual certificate
//! checks are the same as ferry's.
//!
//! What it does not: read files, checksum, frame, write or fsync anything. It is the ceiling
//! ferry's transport is measured against, in the same run.
//!
//! Timing: from before the client connects until the receiver, having read every byte, has
//! closed the connection and the sender has seen the close.
//!
//! Two shapes: sender and receiver in one process ([`raw_quinn_copy`]), or the receiver in a
//! child process ([`receiver_endpoint`] + [`receive_all`], which `ferry-bench-e2e` runs as a
//! hidden mode) and the sender in the bench ([`send_all`]), like ferry's two daemons.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_engine::tls::NodeIdentity;
use quinn::{ClientConfig, Endpoint, ServerConfig, VarInt};

use crate::certs::{node, BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::RunResult;

/// The one block the sender writes, over and over.
pub const RAW_QUINN_BLOCK_BYTES: usize = 1 << 20;

/// Sends `bytes_total` bytes over one quinn uni stream on loopback and times it, sender and
/// receiver in this process.
pub async fn raw_quinn_copy(certs: &BenchCerts, bytes_total: u64) -> anyhow::Result<RunResult> {
    let server = receiver_endpoint(certs.path())?;
    let server_addr = server.local_addr()?;
    let receiver = tokio::spawn(receive_all(server.clone()));
    let sent = send_all(certs.path(), server_addr, bytes_total).await;
    let received = receiver.await.map_err(|e| anyhow::anyhow!("the receiver task failed: {e}"))??;
    server.close(VarInt::from_u32(0), b"done");
    let run = sent?;
    anyhow::ensure!(received == bytes_total, "the raw quinn receiver got {received} bytes, {bytes_total} were sent");
    Ok(run)
}

/// The receiver's endpoint on an ephemeral loopback port: quinn's default transport, endpoint
/// config and socket, ferry's server crypto for node `target` (allowing node `source`), with
/// the certificates in `certs_dir`.
pub fn receiver_endpoint(certs_dir: &Path) -> anyhow::Result<Endpoint> {
    let identity = NodeIdentity::from_dir(certs_dir, &node(TARGET_NODE)?)?;
    let crypto = ferry_engine::tls::server_crypto(&identity, &[node(SOURCE_NODE)?])?;
    // `with_crypto` keeps quinn's default transport config.
    Ok(Endpoint::server(ServerConfig::with_crypto(crypto), SocketAddr::from(([127, 0, 0, 1], 0)))?)
}

/// Accepts one connection and one uni stream, reads it to the end with `read_chunk`
/// (discarding), closes the connection (so the sender learns every byte arrived), and returns
/// the stream's length.
pub async fn receive_all(endpoint: Endpoint) -> anyhow::Result<u64> {
    let incoming = endpoint.accept().await.ok_or_else(|| anyhow::anyhow!("the endpoint closed before a peer came"))?;
    let conn = incoming.await?;
    let mut recv = conn.accept_uni().await?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    conn.close(VarInt::from_u32(0), b"received");
    Ok(received)
}

/// Connects to `server_addr` as node `source` (certificates in `certs_dir`), writes
/// `bytes_total` bytes on one uni stream, and returns once the receiver has closed the
/// connection after reading them all. Timed from before the client endpoint is made.
pub async fn send_all(certs_dir: &Path, server_addr: SocketAddr, bytes_total: u64) -> anyhow::Result<RunResult> {
    let identity = NodeIdentity::from_dir(certs_dir, &node(SOURCE_NODE)?)?;
    let crypto = ferry_engine::tls::client_crypto(&identity)?;
    let block = Bytes::from(block_bytes());
    let started = Instant::now();
    let client = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    // `ClientConfig::new` keeps quinn's default transport config.
    let conn = client.connect_with(ClientConfig::new(crypto), server_addr, TARGET_NODE)?.await?;
    let mut stream = conn.open_uni().await?;
    let mut left = bytes_total;
    while left > 0 {
        let n = usize::try_from(left.min(RAW_QUINN_BLOCK_BYTES as u64)).unwrap_or(RAW_QUINN_BLOCK_BYTES);
        let chunk = if n == RAW_QUINN_BLOCK_BYTES { block.clone() } else { block.slice(..n) };
        stream.write_chunk(chunk).await?;
        left -= n as u64;
    }
    stream.finish()?;
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(0) => {}
        other => anyhow::bail!("the raw quinn connection ended badly: {other}"),
    }
    let elapsed = started.elapsed();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.wait_idle()).await;
    Ok(RunResult { bytes_total, elapsed })
}

/// Non-constant content, so nothing on the way could take a shortcut on zeros.
fn block_bytes() -> Vec<u8> {
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
        let run = runtime.block_on(raw_quinn_copy(&certs, total)).unwrap();
        assert_eq!(run.bytes_total, total);
    }
}
