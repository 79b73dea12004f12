//! rustls over one TCP connection on loopback: how TCP-based databases stream their files.
//!
//! What it does: a receiver thread accepts one TCP connection and serves TLS with ferry's own
//! rustls server config ([`ferry_engine::tls::server_tls_config`]: rustls 0.23 with `ring`,
//! TLS 1.3 only, mutual certificates); the sender connects with ferry's client config and
//! writes clones of one 1 MiB block with `write_all` until the asked number of bytes is sent,
//! then a `close_notify`; the receiver reads into a 1 MiB buffer and discards. The negotiated
//! suite must be TLS13_AES_128_GCM_SHA256 (ferry's first choice, as in QUIC), or the run fails.
//!
//! What it does not: read files, write or fsync anything (like the raw quinn baseline: it is
//! a transport ceiling), or use kernel TLS.
//!
//! Timing: from before connecting until the receiver has read the `close_notify` after every
//! byte.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use crate::certs::{BenchCerts, SOURCE_NODE, TARGET_NODE};
use crate::raw_quinn::{block_bytes, RAW_QUINN_BLOCK_BYTES};
use crate::RunResult;

/// Sends `bytes_total` bytes over rustls on one TCP connection on loopback and times it.
pub fn tls_tcp_copy(certs: &BenchCerts, bytes_total: u64) -> anyhow::Result<RunResult> {
    let server_config =
        ferry_engine::tls::server_tls_config(&certs.identity(TARGET_NODE)?, &[crate::certs::node(SOURCE_NODE)?])?;
    let client_config = ferry_engine::tls::client_tls_config(&certs.identity(SOURCE_NODE)?)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let block = block_bytes();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (socket, _) = listener.accept()?;
        let conn = ServerConnection::new(Arc::new(server_config))?;
        receive(StreamOwned::new(conn, socket))
    });
    let sent = send(client_config, addr, &block, bytes_total);
    let received = receiver.join().map_err(|_| anyhow::anyhow!("the TLS receiver thread panicked"))??;
    let elapsed = started.elapsed();
    sent?;
    anyhow::ensure!(received == bytes_total, "the TLS receiver got {received} bytes, {bytes_total} were sent");
    Ok(RunResult { bytes_total, elapsed })
}

fn send(
    config: rustls::ClientConfig,
    addr: std::net::SocketAddr,
    block: &[u8],
    bytes_total: u64,
) -> anyhow::Result<()> {
    let name = ServerName::try_from(TARGET_NODE.to_string()).context("the target's node name")?;
    let conn = ClientConnection::new(Arc::new(config), name)?;
    let socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    let mut stream = StreamOwned::new(conn, socket);
    let mut left = bytes_total;
    while left > 0 {
        let n = usize::try_from(left.min(RAW_QUINN_BLOCK_BYTES as u64)).unwrap_or(RAW_QUINN_BLOCK_BYTES);
        stream.write_all(block.get(..n).context("block length")?)?;
        left -= n as u64;
    }
    let suite = stream.conn.negotiated_cipher_suite().map(|s| s.suite());
    anyhow::ensure!(
        suite == Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        "rustls negotiated {suite:?}, not TLS13_AES_128_GCM_SHA256"
    );
    stream.conn.send_close_notify();
    stream.flush()?;
    Ok(())
}

fn receive(mut stream: StreamOwned<ServerConnection, TcpStream>) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; RAW_QUINN_BLOCK_BYTES];
    let mut received = 0u64;
    loop {
        // `read` returns 0 only at the peer's close_notify (a bare TCP close is an error).
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(received);
        }
        received += n as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_byte_arrives_over_aes_128_gcm() {
        let certs = BenchCerts::new().unwrap();
        let total = 2 * RAW_QUINN_BLOCK_BYTES as u64 + 777;
        let run = tls_tcp_copy(&certs, total).unwrap();
        assert_eq!(run.bytes_total, total);
    }
}
