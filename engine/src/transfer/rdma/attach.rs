//! Attaching an RDMA path to a transfer: what `ferry serve` (and `ferry copy`) ship chunks on.
//!
//! What it does: [`ChunkTransport`] is a node's choice, QUIC streams (the default) or RDMA
//! lanes from a [`DeviceProvider`] (the `sideway` adapter under feature `rdma`; the fake device
//! in tests and under `testkit`). After a transfer's QUIC handshake, on each connection that
//! carries chunks, the source opens one bidirectional stream and offers an RDMA path
//! ([`offer_path`]: its queue pairs, one per chunk stream); the target answers with its own
//! ([`answer_path`]) or with no lanes at all when it has no device or cannot make the path
//! (its log says why). The lanes then carry the chunks through the same `ship::send_stream`
//! and `chunks_in` as QUIC streams, so the machines, CRC32C checks and resumption are the same.
//! [`Lanes`] and [`Arrivals`] are the one type the chunk streams see, whichever path it is.
//!
//! What it does not: retry. A negotiation that cannot give RDMA (no device here, a target
//! without RDMA, a handshake refused or unanswered) falls back to QUIC for the transfer, loudly
//! ([`super::select::report_fallback`], and a notice for the daemon's per-migration
//! `rdma_fallback` event), or fails it permanently under `require_rdma`; a
//! failure after the path is up (a completion error, a lost queue pair, a timeout) is a
//! transient [`TransferError`] and the copy resumes on a new attempt, which negotiates again.
//!
//! Bounds: one device opened per node (a [`ChunkTransport`] and its clones share it), opened
//! again only after it could not make a path; the target makes at most
//! [`ferry_wire::rdma::LANES_MAX`] lanes per connection; an answer is awaited
//! [`ANSWER_TIMEOUT`] at most.

// Built with neither `rdma` nor `testkit`, no device kind exists: the device enums are empty,
// every RDMA branch is unreachable, and what only those branches use goes unused.
#![cfg_attr(
    not(any(test, feature = "testkit", feature = "rdma")),
    allow(unused_imports, unused_variables, unused_mut, unreachable_code, dead_code)
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;
use ferry_wire::rdma::RdmaHandshake;
use ferry_wire::MigrationId;
use quinn::{Connection, RecvStream, SendStream};

#[cfg(any(test, feature = "testkit"))]
use super::fake::FakeDevice;
use super::incoming::{RdmaArrivals, RdmaIncoming};
use super::lane::{RdmaLane, RdmaLanes};
use super::path::{accept_source, prepare_source, recv_handshake, send_handshake, PathConfig, SourcePrepared};
use super::select::{FallbackNotices, RdmaRequired, TransportSetting};
#[cfg(feature = "rdma")]
use super::sideway_device::SidewayDevice;
use super::verbs::{Device, VerbsError};
use crate::transfer::framing::BodyPieces;
use crate::transfer::transport::{ChunkArrivals, ChunkLane, ChunkLanes, IncomingLane};
use crate::transfer::TransferError;

/// How long the source waits for the target's answer to its RDMA offer before it falls back.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the RDMA device a node's transfers use (once, and again after it failed: see
/// [`SharedDevice`]).
pub trait DeviceProvider: std::fmt::Debug + Send + Sync + 'static {
    fn open(&self) -> Result<AnyDevice, VerbsError>;
}

/// An opened device of any kind this build knows.
#[derive(Debug)]
pub enum AnyDevice {
    #[cfg(feature = "rdma")]
    Sideway(SidewayDevice),
    #[cfg(any(test, feature = "testkit"))]
    Fake(FakeDevice),
}

/// The production provider: the device, port and GID index `select::settle` chose.
#[cfg(feature = "rdma")]
#[derive(Debug, Clone)]
pub struct SidewayProvider {
    pub device: String,
    pub port: u8,
    pub gid_index: u8,
}

#[cfg(feature = "rdma")]
impl DeviceProvider for SidewayProvider {
    fn open(&self) -> Result<AnyDevice, VerbsError> {
        SidewayDevice::open(Some(&self.device), self.port, self.gid_index).map(AnyDevice::Sideway)
    }
}

/// A provider of fake devices on one in-process fabric (tests and `testkit`).
#[cfg(any(test, feature = "testkit"))]
#[derive(Debug, Clone)]
pub struct FakeProvider {
    pub fabric: super::fake::Fabric,
    pub limits: super::verbs::DeviceLimits,
}

#[cfg(any(test, feature = "testkit"))]
impl DeviceProvider for FakeProvider {
    fn open(&self) -> Result<AnyDevice, VerbsError> {
        Ok(AnyDevice::Fake(self.fabric.device(self.limits)))
    }
}

/// What a node whose start settled on `status` carries chunks on: RDMA lanes on the chosen
/// device (feature `rdma`), else QUIC.
pub fn for_node(status: &super::select::TransportStatus, settings: &super::select::RdmaSettings) -> ChunkTransport {
    #[cfg(feature = "rdma")]
    if let (TransportSetting::Rdma, Some(device)) = (status.in_use, &status.rdma_device) {
        let provider = SidewayProvider { device: device.clone(), port: settings.port, gid_index: settings.gid_index };
        return ChunkTransport::rdma(Arc::new(provider), settings.require);
    }
    let _ = settings;
    match &status.fallback_reason {
        Some(reason) => ChunkTransport::quic_fallback(reason.clone()),
        None => ChunkTransport::quic(),
    }
}

/// What a node's transfers carry chunks on.
#[derive(Debug, Clone, Default)]
pub struct ChunkTransport {
    rdma: Option<RdmaUse>,
    /// RDMA was asked for and this node cannot have it at all (decided at its start): why.
    /// Its transfers ship over QUIC and each says so as a fallback.
    unavailable: Option<String>,
    /// Where each transfer's fallback is queued for the daemon's event stream.
    notices: Option<FallbackNotices>,
}

#[derive(Debug, Clone)]
struct RdmaUse {
    /// Shared by every clone of the transport: the node's source and target ends.
    device: Arc<SharedDevice>,
    /// Fail a transfer that cannot have RDMA instead of falling back to QUIC.
    require: bool,
}

impl ChunkTransport {
    /// QUIC uni streams (the default).
    pub fn quic() -> Self {
        Self::default()
    }

    /// RDMA lanes from `provider`'s device where the peer takes them.
    pub fn rdma(provider: Arc<dyn DeviceProvider>, require: bool) -> Self {
        Self { rdma: Some(RdmaUse { device: Arc::new(SharedDevice::new(provider)), require }), ..Self::default() }
    }

    /// QUIC, because RDMA was asked for and cannot be had here (`reason`): every transfer
    /// reports the fallback, as one whose target refuses RDMA does.
    pub fn quic_fallback(reason: String) -> Self {
        Self { unavailable: Some(reason), ..Self::default() }
    }

    /// Queues each transfer's fallback to QUIC in `notices` (the daemon's event stream).
    #[must_use]
    pub fn with_fallback_notices(mut self, notices: FallbackNotices) -> Self {
        self.notices = Some(notices);
        self
    }

    /// A transfer of `migration` asked for RDMA and ships over QUIC: the log line, the
    /// metric and the notice.
    fn fell_back(&self, migration: &MigrationId, reason: &str) {
        super::select::report_fallback(reason, Some(migration));
        if let Some(notices) = &self.notices {
            notices.push(migration, reason);
        }
    }

    pub fn setting(&self) -> TransportSetting {
        if self.rdma.is_some() {
            TransportSetting::Rdma
        } else {
            TransportSetting::Quic
        }
    }
}

/// The source's end of a connection's chunk path: QUIC streams or RDMA lanes.
#[derive(Debug, Clone)]
pub enum Lanes {
    Quic(Connection),
    #[cfg(feature = "rdma")]
    Sideway(RdmaLanes<SidewayDevice>),
    #[cfg(any(test, feature = "testkit"))]
    Fake(RdmaLanes<FakeDevice>),
}

/// One lane of [`Lanes`].
#[derive(Debug)]
pub enum Lane {
    Quic(SendStream),
    #[cfg(feature = "rdma")]
    Sideway(RdmaLane<SidewayDevice>),
    #[cfg(any(test, feature = "testkit"))]
    Fake(RdmaLane<FakeDevice>),
}

impl ChunkLanes for Lanes {
    type Lane = Lane;

    async fn open(&self) -> Result<Lane, TransferError> {
        Ok(match self {
            Self::Quic(conn) => Lane::Quic(ChunkLanes::open(conn).await?),
            #[cfg(feature = "rdma")]
            Self::Sideway(lanes) => Lane::Sideway(lanes.open().await?),
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(lanes) => Lane::Fake(lanes.open().await?),
        })
    }
}

impl ChunkLane for Lane {
    async fn send(&mut self, header: &FrameHeader, body: Bytes) -> Result<(), TransferError> {
        match self {
            Self::Quic(stream) => ChunkLane::send(stream, header, body).await,
            #[cfg(feature = "rdma")]
            Self::Sideway(lane) => lane.send(header, body).await,
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(lane) => lane.send(header, body).await,
        }
    }

    fn finish(self) -> Result<(), TransferError> {
        match self {
            Self::Quic(stream) => ChunkLane::finish(stream),
            #[cfg(feature = "rdma")]
            Self::Sideway(lane) => lane.finish(),
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(lane) => lane.finish(),
        }
    }

    async fn end(self) -> Result<(), TransferError> {
        match self {
            Self::Quic(stream) => ChunkLane::end(stream).await,
            #[cfg(feature = "rdma")]
            Self::Sideway(lane) => lane.end().await,
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(lane) => lane.end().await,
        }
    }
}

/// The target's end of a connection's RDMA path.
#[derive(Debug, Clone)]
pub enum Arrivals {
    #[cfg(feature = "rdma")]
    Sideway(RdmaArrivals<SidewayDevice>),
    #[cfg(any(test, feature = "testkit"))]
    Fake(RdmaArrivals<FakeDevice>),
}

/// One lane of [`Arrivals`].
#[derive(Debug)]
pub enum Incoming {
    #[cfg(feature = "rdma")]
    Sideway(RdmaIncoming<SidewayDevice>),
    #[cfg(any(test, feature = "testkit"))]
    Fake(RdmaIncoming<FakeDevice>),
}

impl ChunkArrivals for Arrivals {
    type Incoming = Incoming;

    async fn accept(&self) -> Result<Incoming, TransferError> {
        match *self {
            #[cfg(feature = "rdma")]
            Self::Sideway(ref arrivals) => Ok(Incoming::Sideway(arrivals.accept().await?)),
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(ref arrivals) => Ok(Incoming::Fake(arrivals.accept().await?)),
        }
    }
}

impl IncomingLane for Incoming {
    async fn next_header(&mut self) -> Result<Option<FrameHeader>, TransferError> {
        match *self {
            #[cfg(feature = "rdma")]
            Self::Sideway(ref mut lane) => lane.next_header().await,
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(ref mut lane) => lane.next_header().await,
        }
    }

    async fn read_body(&mut self, header: &FrameHeader, body: &mut BodyPieces) -> Result<(), TransferError> {
        match *self {
            #[cfg(feature = "rdma")]
            Self::Sideway(ref mut lane) => lane.read_body(header, body).await,
            #[cfg(any(test, feature = "testkit"))]
            Self::Fake(ref mut lane) => lane.read_body(header, body).await,
        }
    }
}

/// What the source's chunk streams go on for one attempt, and why RDMA was not had.
#[derive(Debug)]
pub struct Attached {
    pub lanes: Vec<Lanes>,
    pub in_use: TransportSetting,
    /// RDMA was asked for and this attempt uses QUIC: why.
    pub fallback_reason: Option<String>,
}

/// Why this attempt cannot have RDMA (a fallback), or a failure of the connection itself.
enum Refusal {
    Fallback(String),
    Failed(TransferError),
}

impl From<TransferError> for Refusal {
    fn from(e: TransferError) -> Self {
        Self::Failed(e)
    }
}

/// The source's chunk paths on `conns`: RDMA lanes on each when the node asks for RDMA and
/// every target end takes them, else QUIC streams (loudly, or an error under `require_rdma`).
pub async fn attach_source(
    transport: &ChunkTransport,
    migration: &MigrationId,
    conns: &[Connection],
    streams_count: u32,
    chunk_len_bytes: u32,
) -> Result<Attached, TransferError> {
    let quic = || conns.iter().cloned().map(Lanes::Quic).collect::<Vec<_>>();
    let Some(rdma) = &transport.rdma else {
        let fallback_reason = transport.unavailable.clone();
        if let Some(reason) = &fallback_reason {
            transport.fell_back(migration, reason);
        }
        return Ok(Attached { lanes: quic(), in_use: TransportSetting::Quic, fallback_reason });
    };
    let config = PathConfig::for_chunks(chunk_len_bytes, streams_count.max(1));
    let reason = match offer_paths(rdma, conns, config).await {
        Ok(lanes) => return Ok(Attached { lanes, in_use: TransportSetting::Rdma, fallback_reason: None }),
        Err(Refusal::Failed(e)) => return Err(e),
        Err(Refusal::Fallback(reason)) => reason,
    };
    if rdma.require {
        return Err(TransferError::Local(RdmaRequired(reason).to_string()));
    }
    transport.fell_back(migration, &reason);
    Ok(Attached { lanes: quic(), in_use: TransportSetting::Quic, fallback_reason: Some(reason) })
}

async fn offer_paths(rdma: &RdmaUse, conns: &[Connection], config: PathConfig) -> Result<Vec<Lanes>, Refusal> {
    let cannot_open = |e: VerbsError| Refusal::Fallback(format!("this node cannot open its device: {e}"));
    let device = rdma.device.get().map_err(cannot_open)?;
    // Every lane is made before anything is offered, so a device that fails here is opened
    // again and the lanes made anew with nothing half sent.
    let prepared = match prepare_any(&device, conns.len(), config) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::warn!(error = %e, "rdma: the opened device cannot make lanes; opening it again");
            rdma.device.forget(&device);
            let device = rdma.device.get().map_err(cannot_open)?;
            prepare_any(&device, conns.len(), config)
                .map_err(|e| Refusal::Fallback(format!("this node cannot make its lanes: {e}")))?
        }
    };
    match prepared {
        #[cfg(feature = "rdma")]
        Prepared::Sideway(prepared) => offer_prepared(prepared, conns, Lanes::Sideway).await,
        #[cfg(any(test, feature = "testkit"))]
        Prepared::Fake(prepared) => offer_prepared(prepared, conns, Lanes::Fake).await,
    }
}

/// One connection's queue pairs and staging, and the handshake offering them.
type SourceHalf<D> = (SourcePrepared<D>, RdmaHandshake);

/// The source's half of a path per connection, on a device of any kind.
enum Prepared {
    #[cfg(feature = "rdma")]
    Sideway(Vec<SourceHalf<SidewayDevice>>),
    #[cfg(any(test, feature = "testkit"))]
    Fake(Vec<SourceHalf<FakeDevice>>),
}

fn prepare_any(device: &AnyDevice, conns_count: usize, config: PathConfig) -> Result<Prepared, TransferError> {
    // The device kind is matched once: a build without any kind (neither `rdma` nor
    // `testkit`) then has no arm at all.
    match *device {
        #[cfg(feature = "rdma")]
        AnyDevice::Sideway(ref device) => prepare_all(device, conns_count, config).map(Prepared::Sideway),
        #[cfg(any(test, feature = "testkit"))]
        AnyDevice::Fake(ref device) => prepare_all(device, conns_count, config).map(Prepared::Fake),
    }
}

fn prepare_all<D: Device>(
    device: &D,
    conns_count: usize,
    config: PathConfig,
) -> Result<Vec<SourceHalf<D>>, TransferError> {
    (0..conns_count).map(|_| prepare_source(device, config)).collect()
}

/// Offers each prepared path on its connection; `wrap` names the device kind.
async fn offer_prepared<D: Device>(
    prepared: Vec<SourceHalf<D>>,
    conns: &[Connection],
    wrap: fn(RdmaLanes<D>) -> Lanes,
) -> Result<Vec<Lanes>, Refusal> {
    let mut lanes = Vec::with_capacity(conns.len());
    for (conn, half) in conns.iter().zip(prepared) {
        lanes.push(wrap(offer_path(half, conn).await?));
    }
    Ok(lanes)
}

/// Offers a prepared RDMA path on `conn`; the lanes the target's answer connected.
async fn offer_path<D: Device>((prepared, hello): SourceHalf<D>, conn: &Connection) -> Result<RdmaLanes<D>, Refusal> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(TransferError::from)?;
    send_handshake(&mut send, &hello).await?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv_handshake(&mut recv)).await.map_err(|_| {
        Refusal::Fallback(format!("the target did not answer the rdma handshake in {ANSWER_TIMEOUT:?}"))
    })??;
    let _ = send.finish();
    if answer.lanes.is_empty() {
        return Err(Refusal::Fallback("the target cannot take rdma lanes (see its log for why)".into()));
    }
    prepared.connect(&answer).map_err(|e| Refusal::Fallback(format!("the target's answer cannot be used: {e}")))
}

/// The target's end: reads the source's offer from `send`/`recv` and answers it, with lanes
/// when this node has RDMA and can make them (the arrivals to take chunks from), else with
/// none (and says why in the log).
pub async fn answer_path(
    transport: &ChunkTransport,
    send: &mut SendStream,
    recv: &mut RecvStream,
    chunk_len_bytes: u32,
) -> Result<Option<Arrivals>, TransferError> {
    let offer = recv_handshake(recv).await?;
    let config = PathConfig::for_chunks(chunk_len_bytes, super::count_u32(ferry_wire::rdma::LANES_MAX));
    let accepted = match &transport.rdma {
        None => Err(match &transport.unavailable {
            Some(reason) => format!("this node cannot use rdma: {reason}"),
            None => "this node's transport is quic".to_owned(),
        }),
        Some(rdma) => accept_on(&rdma.device, &offer, config),
    };
    let (arrivals, answer) = match accepted {
        Ok((arrivals, answer)) => (Some(arrivals), answer),
        Err(reason) => {
            tracing::warn!(reason, "answered a source's rdma offer without lanes: its chunks come over QUIC");
            (None, RdmaHandshake { lanes: Vec::new() })
        }
    };
    send_handshake(send, &answer).await?;
    let _ = send.finish();
    Ok(arrivals)
}

/// The target's half of a path on the node's device; a device that cannot make it is opened
/// again, once (an offer the source got wrong says nothing about the device).
fn accept_on(
    device: &SharedDevice,
    offer: &RdmaHandshake,
    config: PathConfig,
) -> Result<(Arrivals, RdmaHandshake), String> {
    let cannot_open = |e: VerbsError| format!("cannot open the rdma device: {e}");
    let opened = device.get().map_err(cannot_open)?;
    match accept_any(&opened, offer, config) {
        Ok(accepted) => Ok(accepted),
        Err(e @ TransferError::Protocol(_)) => Err(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "rdma: the opened device cannot make lanes; opening it again");
            device.forget(&opened);
            let opened = device.get().map_err(cannot_open)?;
            accept_any(&opened, offer, config).map_err(|e| e.to_string())
        }
    }
}

fn accept_any(
    device: &AnyDevice,
    offer: &RdmaHandshake,
    config: PathConfig,
) -> Result<(Arrivals, RdmaHandshake), TransferError> {
    match *device {
        #[cfg(feature = "rdma")]
        AnyDevice::Sideway(ref device) => accept_source(device, offer, config).map(|(a, h)| (Arrivals::Sideway(a), h)),
        #[cfg(any(test, feature = "testkit"))]
        AnyDevice::Fake(ref device) => accept_source(device, offer, config).map(|(a, h)| (Arrivals::Fake(a), h)),
    }
}

/// A node's device, opened at its first use and shared by every attempt and connection after
/// (a context and a protection domain held for the daemon's life, not made per transfer);
/// opened again once it cannot make a path (a reset, a port gone: a device-level error).
#[derive(Debug)]
pub struct SharedDevice {
    provider: Arc<dyn DeviceProvider>,
    opened: Mutex<Option<Arc<AnyDevice>>>,
}

impl SharedDevice {
    pub fn new(provider: Arc<dyn DeviceProvider>) -> Self {
        Self { provider, opened: Mutex::new(None) }
    }

    /// The opened device, opening it if it is not (held, so concurrent first uses open once).
    pub fn get(&self) -> Result<Arc<AnyDevice>, VerbsError> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = &*opened {
            return Ok(device.clone());
        }
        let device = Arc::new(self.provider.open()?);
        *opened = Some(device.clone());
        Ok(device)
    }

    /// `device` failed: the next [`Self::get`] opens the device again (unless another caller
    /// has already replaced it). Lanes made on it keep it alive until they end.
    pub fn forget(&self, device: &Arc<AnyDevice>) {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if opened.as_ref().is_some_and(|current| Arc::ptr_eq(current, device)) {
            *opened = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::transfer::rdma::fake::Fabric;
    use crate::transfer::rdma::verbs::DeviceLimits;

    #[derive(Debug, Default)]
    struct Counting {
        fabric: Fabric,
        opened_count: AtomicU32,
    }

    impl DeviceProvider for Counting {
        fn open(&self) -> Result<AnyDevice, VerbsError> {
            self.opened_count.fetch_add(1, Ordering::SeqCst);
            let limits = DeviceLimits { max_mr_size_bytes: 1 << 20, max_qp_wr: 64 };
            FakeProvider { fabric: self.fabric.clone(), limits }.open()
        }
    }

    #[test]
    fn the_device_is_opened_once_and_again_only_after_it_failed() {
        let provider = Arc::new(Counting::default());
        let shared = SharedDevice::new(provider.clone());
        let first = shared.get().unwrap();
        for _ in 0..5 {
            assert!(Arc::ptr_eq(&shared.get().unwrap(), &first));
        }
        assert_eq!(provider.opened_count.load(Ordering::SeqCst), 1);
        shared.forget(&first);
        let second = shared.get().unwrap();
        assert!(!Arc::ptr_eq(&second, &first));
        // A late report about the device already replaced changes nothing.
        shared.forget(&first);
        assert!(Arc::ptr_eq(&shared.get().unwrap(), &second));
        assert_eq!(provider.opened_count.load(Ordering::SeqCst), 2);
    }
}
