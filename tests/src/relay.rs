//! A UDP relay between two QUIC endpoints that a test can switch to drop every datagram (a
//! network partition on loopback, with no root and no firewall), or make lossy.
//!
//! What it does: [`Relay::start`] binds a loopback socket (give its address to the client side
//! as the peer's address; the TLS name is checked apart from the address, so the handshake
//! still passes) and forwards every datagram it receives to `upstream`; [`Relay::start_at`]
//! binds a given address instead (the test side of a network namespace's veth, see
//! [`crate::netns`]). Each distinct sender gets an upstream socket of its own, so the
//! upstream's answers go back to that sender, as a NAT does; [`RelayCounts::senders_count`]
//! counts them (a QUIC client opens a new UDP socket for each connection, so this counts
//! connections that reached the relay). [`Relay::set_dropping`] drops every datagram in both directions until switched
//! back; [`Relay::set_faults`] makes it drop, corrupt (one bit flipped), duplicate or
//! reorder (held back behind the next datagram) a share of the datagrams each way, drawn from
//! a seed; [`Relay::set_answer_delay`] holds every answer (upstream to sender) for a fixed
//! time, deciding only when it goes out whether it is dropped (a lost reply); [`Relay::counts`]
//! says how many were forwarded, dropped and damaged.
//!
//! What it does not: delay requests (sender to upstream), or forget a sender.
//!
//! Invariants: at most [`SENDERS_MAX_COUNT`] senders have an upstream socket at once (a new
//! one takes the place of the one heard from least recently); a datagram is at most [`DATAGRAM_LEN_MAX_BYTES`]; every task the
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

/// Shares of datagrams (per 10,000, each way) the relay damages, and the seed it draws from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub seed: u64,
    pub drop_per_10k: u32,
    pub corrupt_per_10k: u32,
    pub duplicate_per_10k: u32,
    pub reorder_per_10k: u32,
}

/// What the relay does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Drop,
    Pass { corrupt_bit: Option<usize>, duplicate: bool, hold: bool },
}

#[derive(Debug, Default)]
struct Shared {
    dropping: AtomicBool,
    /// Answers (upstream to sender) wait this long, in milliseconds, before they go out
    /// (0: at once); whether one is dropped is decided when it goes out.
    answer_delay_ms: AtomicU64,
    faults: std::sync::Mutex<Option<(Faults, u64)>>,
    forwarded_count: AtomicU64,
    dropped_count: AtomicU64,
    corrupted_count: AtomicU64,
    duplicated_count: AtomicU64,
    reordered_count: AtomicU64,
    senders_count: AtomicU64,
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

    /// The fate of a datagram of `len` bytes, drawn from the faults' seed.
    fn fate(&self, len: usize) -> Fate {
        if !self.pass() {
            return Fate::Drop;
        }
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let Some((f, state)) = faults.as_mut() else {
            return Fate::Pass { corrupt_bit: None, duplicate: false, hold: false };
        };
        let mut draw = |per_10k: u32| splitmix(state) % 10_000 < u64::from(per_10k);
        if draw(f.drop_per_10k) {
            self.dropped_count.fetch_add(1, Ordering::Relaxed);
            return Fate::Drop;
        }
        let corrupt = draw(f.corrupt_per_10k) && len > 0;
        let duplicate = draw(f.duplicate_per_10k);
        let hold = draw(f.reorder_per_10k);
        let corrupt_bit = corrupt.then(|| usize::try_from(splitmix(state) % (len as u64 * 8)).unwrap_or(0));
        for (happened, count) in
            [(corrupt, &self.corrupted_count), (duplicate, &self.duplicated_count), (hold, &self.reordered_count)]
        {
            if happened {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        Fate::Pass { corrupt_bit, duplicate, hold }
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Datagrams relayed, dropped and damaged so far, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCounts {
    pub forwarded_count: u64,
    pub dropped_count: u64,
    pub corrupted_count: u64,
    pub duplicated_count: u64,
    pub reordered_count: u64,
    /// Distinct senders (source addresses) heard from so far.
    pub senders_count: u64,
}

/// Sends one datagram as its fate says; a datagram held back (`hold`) goes out after the next
/// one sent the same way.
struct Sender {
    held: Option<Vec<u8>>,
}

impl Sender {
    fn plan(&mut self, bytes: &[u8], fate: Fate) -> Vec<Vec<u8>> {
        let Fate::Pass { corrupt_bit, duplicate, hold } = fate else { return Vec::new() };
        let mut datagram = bytes.to_vec();
        if let Some(bit) = corrupt_bit {
            if let Some(byte) = datagram.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
        }
        let mut out = Vec::new();
        if hold && self.held.is_none() {
            self.held = Some(datagram);
            return out;
        }
        if duplicate {
            out.push(datagram.clone());
        }
        out.push(datagram);
        out.extend(self.held.take());
        out
    }
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
        Relay::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Binds `front` (port 0: any) and relays it to `upstream`, forwarding.
    pub async fn start_at(front: SocketAddr, upstream: SocketAddr) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(front).await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(front_loop(front, upstream, shared.clone()));
        Ok(Relay { addr, shared, task })
    }

    /// `true`: drop every datagram, both ways, from now on; `false`: forward them again.
    pub fn set_dropping(&self, dropping: bool) {
        self.shared.dropping.store(dropping, Ordering::Release);
    }

    /// Delays every answer (upstream to sender) by `delay` from now on (zero: none). Whether a
    /// delayed answer is dropped ([`Relay::set_dropping`]) is decided when it goes out, so a
    /// test can lose a reply whose request it has seen take effect: delay, wait for the effect,
    /// drop.
    pub fn set_answer_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.answer_delay_ms.store(ms, Ordering::Release);
    }

    /// Damages datagrams as `faults` says from now on (`None`: relays them intact).
    pub fn set_faults(&self, faults: Option<Faults>) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults.map(|f| (f, f.seed));
    }

    pub fn counts(&self) -> RelayCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayCounts {
            forwarded_count: load(&self.shared.forwarded_count),
            dropped_count: load(&self.shared.dropped_count),
            corrupted_count: load(&self.shared.corrupted_count),
            duplicated_count: load(&self.shared.duplicated_count),
            reordered_count: load(&self.shared.reordered_count),
            senders_count: load(&self.shared.senders_count),
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
    // Each sender's upstream socket, the task relaying its answers, and when it last sent.
    let mut senders: HashMap<SocketAddr, (Arc<UdpSocket>, tokio::task::AbortHandle, u64)> = HashMap::new();
    let mut back_tasks = JoinSet::new();
    let mut sent_count = 0u64;
    let mut buf = vec![0u8; DATAGRAM_LEN_MAX_BYTES];
    let mut outs: HashMap<SocketAddr, Sender> = HashMap::new();
    loop {
        let Ok((len, sender)) = front.recv_from(&mut buf).await else {
            // A loopback socket only fails this way when something is badly wrong; stop relaying
            // (the peers see a partition that does not heal, and the test's deadlines fire).
            return;
        };
        let fate = shared.fate(len);
        if fate == Fate::Drop {
            continue;
        }
        sent_count += 1;
        let socket = match senders.get_mut(&sender) {
            Some((socket, _, last)) => {
                *last = sent_count;
                socket.clone()
            }
            None => {
                if senders.len() >= SENDERS_MAX_COUNT {
                    // The sender heard from least recently gives way (a client that retries
                    // from new ports must not find the relay full).
                    let oldest = senders.iter().min_by_key(|(_, (_, _, last))| *last).map(|(addr, _)| *addr);
                    if let Some((_, task, _)) = oldest.and_then(|addr| senders.remove(&addr)) {
                        task.abort();
                    }
                    if let Some(addr) = oldest {
                        outs.remove(&addr);
                    }
                }
                let Ok(socket) = connected(upstream).await else {
                    shared.dropped_count.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                shared.senders_count.fetch_add(1, Ordering::Relaxed);
                let socket = Arc::new(socket);
                let task = back_tasks.spawn(back_loop(socket.clone(), front.clone(), sender, shared.clone()));
                senders.insert(sender, (socket.clone(), task, sent_count));
                socket
            }
        };
        let out = outs.entry(sender).or_insert(Sender { held: None });
        for datagram in out.plan(buf.get(..len).unwrap_or_default(), fate) {
            // A send error (the upstream is gone: ECONNREFUSED) is a lost datagram, as on a
            // network.
            let _ = socket.send(&datagram).await;
        }
    }
}

/// A socket connected to `upstream`: on loopback when the upstream is, else on any address
/// (the kernel picks the one on the upstream's route, a veth's in [`crate::netns`]).
async fn connected(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(a) if a.ip().is_loopback() => ([127, 0, 0, 1], 0).into(),
        SocketAddr::V6(a) if a.ip().is_loopback() => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Relays the upstream's answers to one sender.
async fn back_loop(socket: Arc<UdpSocket>, front: Arc<UdpSocket>, sender: SocketAddr, shared: Arc<Shared>) {
    let mut buf = vec![0u8; DATAGRAM_LEN_MAX_BYTES];
    let mut out = Sender { held: None };
    loop {
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            // ECONNREFUSED from an earlier send to a closed upstream port: keep listening.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        let delay_ms = shared.answer_delay_ms.load(Ordering::Acquire);
        if delay_ms > 0 {
            let (datagram, front, shared) =
                (buf.get(..len).unwrap_or_default().to_vec(), front.clone(), shared.clone());
            // Bounded by the upstream's sending rate times the delay: tests delay light traffic.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                if shared.pass() {
                    let _ = front.send_to(&datagram, sender).await;
                }
            });
            continue;
        }
        for datagram in out.plan(buf.get(..len).unwrap_or_default(), shared.fate(len)) {
            let _ = front.send_to(&datagram, sender).await;
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
        let counts = relay.counts();
        assert_eq!((counts.forwarded_count, counts.dropped_count, counts.senders_count), (2, 2, 1));

        relay.set_dropping(false);
        client.send_to(b"again", relay.addr).await.unwrap();
        let (len, _) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"again");
    }

    #[tokio::test]
    async fn a_delayed_answer_is_dropped_when_dropping_starts_before_it_goes_out() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(server.local_addr().unwrap()).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        relay.set_answer_delay(Duration::from_millis(200));
        client.send_to(b"request", relay.addr).await.unwrap();
        let (_, from) = server.recv_from(&mut buf).await.unwrap();
        server.send_to(b"late", from).await.unwrap();
        let started = std::time::Instant::now();
        let (len, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"late");
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        server.send_to(b"lost", from).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay.set_dropping(true);
        let quiet = tokio::time::timeout(Duration::from_millis(400), client.recv_from(&mut buf)).await;
        assert!(quiet.is_err(), "an answer delayed past the start of dropping arrived");
    }

    /// Damage is drawn from the seed: a duplicated datagram arrives twice, a corrupted one with
    /// one bit flipped, a held one after the next.
    #[test]
    fn planned_fates_duplicate_corrupt_and_reorder() {
        let mut out = Sender { held: None };
        let pass = |corrupt_bit, duplicate, hold| Fate::Pass { corrupt_bit, duplicate, hold };
        assert_eq!(out.plan(b"a", pass(None, true, false)), vec![b"a".to_vec(), b"a".to_vec()]);
        assert_eq!(out.plan(&[0b0000_0000], pass(Some(3), false, false)), vec![vec![0b0000_1000]]);
        assert!(out.plan(b"first", pass(None, false, true)).is_empty());
        assert_eq!(out.plan(b"second", pass(None, false, false)), vec![b"second".to_vec(), b"first".to_vec()]);
        assert!(out.plan(b"gone", Fate::Drop).is_empty());
        let shared = Shared::default();
        *shared.faults.lock().unwrap() = Some((
            Faults { seed: 1, drop_per_10k: 5_000, corrupt_per_10k: 0, duplicate_per_10k: 0, reorder_per_10k: 0 },
            1,
        ));
        let dropped = (0..1000).filter(|_| shared.fate(10) == Fate::Drop).count();
        assert!((400..600).contains(&dropped), "{dropped} of 1000 dropped at 50%");
    }
}
