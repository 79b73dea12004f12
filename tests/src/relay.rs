//! A UDP relay between two QUIC endpoints that a test can switch to drop every datagram: a
//! network partition on loopback, with no root and no firewall.
//!
//! What it does: [`Relay::start`] binds a loopback socket (give its address to the client side
//! as the peer's address; the TLS name is checked apart from the address, so the handshake
//! still passes) and forwards every datagram it receives to `upstream`. Each distinct sender
//! gets an upstream socket of its own, so the upstream's answers go back to that sender, as a
//! NAT does. [`Relay::set_dropping`] drops every datagram in both directions until switched
//! back; [`Relay::counts`] says how many were forwarded and dropped.
//!
//! What it does not: reorder, delay, duplicate or corrupt datagrams, or forget a sender.
//!
//! Invariants: at most [`SENDERS_MAX_COUNT`] senders get an upstream socket (datagrams of more
//! are dropped and counted); a datagram is at most [`DATAGRAM_LEN_MAX_BYTES`]; every task the
//! relay spawns ends when it is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};

/// Most senders one relay serves (a migration opens a few connections, each abort or release
/// one more).
pub const SENDERS_MAX_COUNT: usize = 64;
/// Largest datagram relayed (UDP's own limit).
pub const DATAGRAM_LEN_MAX_BYTES: usize = 65_535;

#[derive(Debug, Default)]
struct Shared {
    dropping: AtomicBool,
    forwarded_count: AtomicU64,
    dropped_count: AtomicU64,
}

impl Shared {
    /// Whether a datagram may pass; counts it either way.
    fn pass(&self) -> bool {
        if self.dropping.load(Ordering::Acquire) {
            self.dropped_count.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.forwarded_count.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// Datagrams relayed and dropped so far, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCounts {
    pub forwarded_count: u64,
    pub dropped_count: u64,
}

/// A running relay. See the module docs.
#[derive(Debug)]
pub struct Relay {
    /// The address to give the client side instead of `upstream`.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Binds a loopback port and relays it to `upstream` (forwarding, not dropping).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(front_loop(front, upstream, shared.clone()));
        Ok(Relay { addr, shared, task })
    }

    /// `true`: drop every datagram, both ways, from now on; `false`: forward them again.
    pub fn set_dropping(&self, dropping: bool) {
        self.shared.dropping.store(dropping, Ordering::Release);
    }

    pub fn counts(&self) -> RelayCounts {
        RelayCounts {
            forwarded_count: self.shared.forwarded_count.load(Ordering::Relaxed),
            dropped_count: self.shared.dropped_count.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The front task owns the per-sender tasks (a JoinSet): aborting it ends them all.
        self.task.abort();
    }
}

/// Receives from senders; forwards each datagram through that sender's upstream socket.
async fn front_loop(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut senders: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut back_tasks = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM_LEN_MAX_BYTES];
    loop {
        let Ok((len, sender)) = front.recv_from(&mut buf).await else {
            // A loopback socket only fails this way when something is badly wrong; stop relaying
            // (the peers see a partition that does not heal, and the test's deadlines fire).
            return;
        };
        if !shared.pass() {
            continue;
        }
        let socket = match senders.get(&sender) {
            Some(socket) => socket.clone(),
            None if senders.len() >= SENDERS_MAX_COUNT => {
                shared.dropped_count.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            None => {
                let Ok(socket) = connected(upstream).await else {
                    shared.dropped_count.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let socket = Arc::new(socket);
                senders.insert(sender, socket.clone());
                back_tasks.spawn(back_loop(socket.clone(), front.clone(), sender, shared.clone()));
                socket
            }
        };
        // A send error (the upstream is gone: ECONNREFUSED) is a lost datagram, as on a network.
        let _ = socket.send(buf.get(..len).unwrap_or_default()).await;
    }
}

async fn connected(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Relays the upstream's answers to one sender.
async fn back_loop(socket: Arc<UdpSocket>, front: Arc<UdpSocket>, sender: SocketAddr, shared: Arc<Shared>) {
    let mut buf = vec![0u8; DATAGRAM_LEN_MAX_BYTES];
    loop {
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            // ECONNREFUSED from an earlier send to a closed upstream port: keep listening.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        if shared.pass() {
            let _ = front.send_to(buf.get(..len).unwrap_or_default(), sender).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn relays_both_ways_and_drops_when_told() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(server.local_addr().unwrap()).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        client.send_to(b"ping", relay.addr).await.unwrap();
        let (len, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"ping");
        server.send_to(b"pong", from).await.unwrap();
        let (len, back) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..len], back), (&b"pong"[..], relay.addr));

        relay.set_dropping(true);
        client.send_to(b"lost", relay.addr).await.unwrap();
        server.send_to(b"lost too", from).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), server.recv_from(&mut buf)).await;
        assert!(quiet.is_err(), "a dropped datagram arrived");
        let quiet = tokio::time::timeout(Duration::from_millis(100), client.recv_from(&mut buf)).await;
        assert!(quiet.is_err(), "a dropped answer arrived");
        assert_eq!(relay.counts(), RelayCounts { forwarded_count: 2, dropped_count: 2 });

        relay.set_dropping(false);
        client.send_to(b"again", relay.addr).await.unwrap();
        let (len, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"again");
    }
}
