//! QUIC endpoints with windows and socket buffers sized for bulk transfer.
//!
//! What it does: builds quinn endpoints (server and client) on UDP sockets whose kernel
//! buffers are set explicitly, with a [`TransportConfig`](quinn::TransportConfig) whose flow
//! control windows cover the bandwidth-delay product of a fast link, not quinn's defaults.
//!
//! What it does not: TLS (see [`crate::tls`]) or any protocol logic.
//!
//! Sizing: at 10 Gbit/s and 2 ms round trip the bandwidth-delay product is 2.5 MB; a stream
//! window of 16 MiB and a connection window of 32 MiB keep a sender busy up to about
//! 25 Gbit/s x 10 ms while bounding what one connection can make a target buffer.
//!
//! Invariants: every window is bounded (what one connection can make a target buffer has a
//! limit), and MTU discovery stays between the QUIC minimum and `MTU_UPPER_BOUND_MAX_BYTES`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Path MTU discovery's upper bound. Discovery probes up to it and keeps what the path carries
/// (1452 on a plain Ethernet path), so a higher bound costs only a few probes; where the path
/// carries more (jumbo frames, loopback), four times fewer packets per byte is the largest
/// saving in the sender's and receiver's CPU (measured: `ferry-bench-e2e`, bench/RESULTS.md).
pub const MTU_UPPER_BOUND_DEFAULT_BYTES: u16 = MTU_UPPER_BOUND_MAX_BYTES;

/// The largest bound that is safe: quinn sends up to 10 packets in one UDP GSO batch, and a
/// batch must fit one 64 KiB datagram, so 10 packets of this size plus headers stay under it.
/// Above it every full batch is refused by the kernel and lost (measured at 7000: 5 MB/s).
pub const MTU_UPPER_BOUND_MAX_BYTES: u16 = 6400;

/// QUIC's minimum UDP payload (RFC 9000 section 14).
const MTU_MIN_BYTES: u16 = 1200;

/// The default QUIC idle timeout: a peer that vanishes without a close (killed, its host gone,
/// a cut cable) is seen after this long, 5 keep-alives missed. At 30 s a killed target cost a
/// running copy 30 s before it reconnected (tests/tests/cert_rotation.rs measured it); lower
/// values are the operator's choice (`quic_idle_timeout_ms`): the multi-host tests run at
/// 1 s, but on a loaded node a connection whose peer cannot send for that long is closed.
pub const IDLE_TIMEOUT_DEFAULT_MS: u32 = 5_000;
/// The smallest idle timeout the configuration accepts (a keep-alive every 40 ms).
pub const IDLE_TIMEOUT_MIN_MS: u32 = 200;
/// The largest idle timeout the configuration accepts (10 minutes).
pub const IDLE_TIMEOUT_MAX_MS: u32 = 600_000;

/// Tuning of one QUIC endpoint.
#[derive(Debug, Clone)]
pub struct QuicTuning {
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub send_window_bytes: u64,
    pub socket_buffer_bytes: usize,
    pub uni_streams_max_count: u32,
    /// A connection with nothing heard from the peer for this long is closed (QUIC's idle
    /// timeout, the smaller of both ends' wins).
    pub idle_timeout_ms: u32,
    /// A PING after this long without sending, so a healthy idle connection never times out.
    pub keep_alive_ms: u64,
    /// The largest UDP payload path MTU discovery probes for on bulk connections (chunks);
    /// connections that carry latency-sensitive traffic keep quinn's 1452 (see
    /// [`QuicTuning::transport`]).
    pub mtu_upper_bound_bytes: u16,
    /// What a copy's chunks go on: QUIC uni streams (the default), or RDMA lanes negotiated
    /// over the copy's connections. Here because every copy is given its node's tuning.
    pub chunk_transport: crate::transfer::rdma::attach::ChunkTransport,
    /// The threads a copy's chunk connections and chunk streams run on, and their priority
    /// (see [`crate::priority`]): below the control and WAL streams, which stay on the
    /// caller's runtime.
    pub bulk: crate::priority::BulkThreads,
}

impl Default for QuicTuning {
    fn default() -> Self {
        Self {
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 32 << 20,
            send_window_bytes: 32 << 20,
            socket_buffer_bytes: 8 << 20,
            uni_streams_max_count: 64,
            idle_timeout_ms: IDLE_TIMEOUT_DEFAULT_MS,
            keep_alive_ms: u64::from(IDLE_TIMEOUT_DEFAULT_MS / 5),
            mtu_upper_bound_bytes: MTU_UPPER_BOUND_DEFAULT_BYTES,
            chunk_transport: crate::transfer::rdma::attach::ChunkTransport::quic(),
            bulk: crate::priority::BulkThreads::default(),
        }
    }
}

impl QuicTuning {
    /// The defaults with the idle timeout `idle_timeout_ms` and a keep-alive every fifth of it.
    pub fn with_idle_timeout_ms(idle_timeout_ms: u32) -> Self {
        Self { idle_timeout_ms, keep_alive_ms: u64::from(idle_timeout_ms / 5).max(1), ..Self::default() }
    }

    /// The endpoint: it accepts UDP payloads up to the MTU bound (quinn's default, 1472,
    /// would cap what the peer's discovery may use).
    pub fn endpoint(&self) -> EndpointConfig {
        let mut endpoint = EndpointConfig::default();
        if let Err(e) = endpoint.max_udp_payload_size(self.mtu_upper_bound()) {
            tracing::warn!("cannot accept UDP payloads of {} bytes: {e}", self.mtu_upper_bound());
        }
        endpoint
    }

    /// The bound, between QUIC's minimum (1200) and [`MTU_UPPER_BOUND_MAX_BYTES`].
    fn mtu_upper_bound(&self) -> u16 {
        self.mtu_upper_bound_bytes.clamp(MTU_MIN_BYTES, MTU_UPPER_BOUND_MAX_BYTES)
    }

    /// The transport of a connection that carries control messages and the WAL stream (and,
    /// on the target, every connection: it sends only acknowledgements and answers): quinn's
    /// MTU bound of 1452. quinn paces every packet as if it were a full MTU, and a connection
    /// carrying light traffic keeps a small congestion window, so with a 6400-byte bound a
    /// lone WAL batch or fence message waited for the pacer: the fence's p99 went from about
    /// 1 ms to 7 ms (`ferry-bench-cutover`, bench/RESULTS.md).
    pub fn transport(&self) -> TransportConfig {
        self.transport_with_mtu(MtuDiscoveryConfig::default())
    }

    /// The transport of a connection that carries only chunks: MTU discovery up to
    /// [`QuicTuning::mtu_upper_bound_bytes`].
    pub fn bulk_transport(&self) -> TransportConfig {
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound());
        self.transport_with_mtu(mtu)
    }

    fn transport_with_mtu(&self, mtu: MtuDiscoveryConfig) -> TransportConfig {
        let mut transport = TransportConfig::default();
        transport
            .stream_receive_window(VarInt::from_u32(self.stream_window_bytes))
            .receive_window(VarInt::from_u32(self.connection_window_bytes))
            .send_window(self.send_window_bytes)
            .max_concurrent_uni_streams(VarInt::from_u32(self.uni_streams_max_count))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .max_idle_timeout(Some(VarInt::from_u32(self.idle_timeout_ms).into()))
            .keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)))
            .mtu_discovery_config(Some(mtu));
        transport
    }
}

/// A UDP socket with its buffers sized as asked (the kernel may cap them at its
/// `net.core.rmem_max`/`wmem_max`).
fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // The kernel caps these at net.core.rmem_max / wmem_max unless the process may exceed
    // them (CAP_NET_ADMIN: SO_RCVBUFFORCE); a smaller buffer costs throughput (drops when the
    // receiver is descheduled), not correctness, so a refusal is logged, not fatal.
    if force_recv_buffer(&socket, buffer_bytes).is_err() {
        if let Err(e) = socket.set_recv_buffer_size(buffer_bytes) {
            tracing::warn!("cannot size the UDP receive buffer to {buffer_bytes} bytes: {e}");
        }
    }
    if let Err(e) = socket.set_send_buffer_size(buffer_bytes) {
        tracing::warn!("cannot size the UDP send buffer to {buffer_bytes} bytes: {e}");
    }
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < buffer_bytes {
        tracing::debug!(
            "UDP receive buffer is {granted} bytes (asked {buffer_bytes}); raise net.core.rmem_max for more"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// SO_RCVBUFFORCE: the receive buffer past `net.core.rmem_max`, when this process may.
fn force_recv_buffer(socket: &socket2::Socket, buffer_bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    rustix::net::sockopt::set_socket_recv_buffer_size_force(socket.as_fd(), buffer_bytes).map_err(std::io::Error::from)
}

/// A server endpoint listening on `addr` (which also serves as a client, for a daemon that
/// both receives and sends).
pub fn server_endpoint(
    addr: SocketAddr,
    crypto: Arc<QuicServerConfig>,
    tuning: &QuicTuning,
) -> std::io::Result<Endpoint> {
    let socket = udp_socket(addr, tuning.socket_buffer_bytes)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found for quinn"))?;
    Endpoint::new(tuning.endpoint(), Some(server_config(crypto, tuning)), socket, runtime)
}

/// The server configuration of [`server_endpoint`] (also used to swap certificates on a running
/// endpoint with `Endpoint::set_server_config`).
pub fn server_config(crypto: Arc<QuicServerConfig>, tuning: &QuicTuning) -> quinn::ServerConfig {
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(Arc::new(tuning.transport()));
    server
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(peer: SocketAddr, tuning: &QuicTuning) -> std::io::Result<Endpoint> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = udp_socket(bind, tuning.socket_buffer_bytes)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found for quinn"))?;
    Endpoint::new(tuning.endpoint(), None, socket, runtime)
}

/// The client configuration for connections made with [`client_endpoint`].
pub fn client_config(crypto: Arc<QuicClientConfig>, tuning: &QuicTuning) -> quinn::ClientConfig {
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(Arc::new(tuning.transport()));
    config
}

/// A client configuration for a connection that carries only chunks ([`QuicTuning::bulk_transport`]).
pub fn bulk_client_config(crypto: Arc<QuicClientConfig>, tuning: &QuicTuning) -> quinn::ClientConfig {
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(Arc::new(tuning.bulk_transport()));
    config
}

/// Application error codes a connection is closed with.
pub mod close_code {
    pub const DONE: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const MALFORMED: u32 = 2;
    pub const INCOMPATIBLE_VERSION: u32 = 3;
    pub const STORAGE: u32 = 4;
    pub const REFUSED: u32 = 5;
    pub const CHECKSUM: u32 = 6;
    pub const SOURCE_CHANGED: u32 = 7;
    pub const CANCELLED: u32 = 8;
    pub const TIMEOUT: u32 = 9;
}
