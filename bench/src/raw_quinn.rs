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
//! Timing: from before the client connects until the receiver has counted every byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{ClientConfig, Endpoint, ServerConfig, VarInt};

use crate::certs::{node, BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::RunResult;

/// The one block the sender writes, over and over.
pub const RAW_QUINN_BLOCK_BYTES: usize = 1 << 20;

/// Sends `bytes_total` bytes over one quinn uni stream on loopback and times it.
pub async fn raw_quinn_copy(certs: &BenchCerts, bytes_total: u64) -> anyhow::Result<RunResult> {
    let server_crypto = ferry_engine::tls::server_crypto(&certs.identity(TARGET_NODE)?, &[node(SOURCE_NODE)?])?;
    let client_crypto = ferry_engine::tls::client_crypto(&certs.identity(SOURCE_NODE)?)?;
    // `with_crypto` and `ClientConfig::new` keep quinn's default transport config.
    let server = Endpoint::server(ServerConfig::with_crypto(server_crypto), SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let server_addr = server.local_addr()?;
    let receiver = tokio::spawn(receive_all(server.clone()));

    let started = Instant::now();
    let client = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let conn = client.connect_with(ClientConfig::new(client_crypto), server_addr, TARGET_NODE)?.await?;
    let mut stream = conn.open_uni().await?;
    let block = Bytes::from(block_bytes());
    let mut left = bytes_total;
    while left > 0 {
        let n = usize::try_from(left.min(RAW_QUINN_BLOCK_BYTES as u64)).unwrap_or(RAW_QUINN_BLOCK_BYTES);
        let chunk = if n == RAW_QUINN_BLOCK_BYTES { block.clone() } else { block.slice(..n) };
        stream.write_chunk(chunk).await?;
        left -= n as u64;
    }
    stream.finish()?;
    let received = receiver.await.map_err(|e| anyhow::anyhow!("the receiver task failed: {e}"))??;
    let elapsed = started.elapsed();
    conn.close(VarInt::from_u32(0), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), client.wait_idle()).await;
    server.close(VarInt::from_u32(0), b"done");
    anyhow::ensure!(received == bytes_total, "the raw quinn receiver got {received} bytes, {bytes_total} were sent");
    Ok(RunResult { bytes_total: received, elapsed })
}

/// Accepts one connection and one uni stream, reads it to the end, and returns its length.
async fn receive_all(endpoint: Endpoint) -> anyhow::Result<u64> {
    let incoming = endpoint.accept().await.ok_or_else(|| anyhow::anyhow!("the endpoint closed before a peer came"))?;
    let conn = incoming.await?;
    let mut recv = conn.accept_uni().await?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    Ok(received)
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
