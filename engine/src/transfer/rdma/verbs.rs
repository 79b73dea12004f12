//! The verbs seam: the few RDMA operations ferry uses, as traits a real device (the `sideway`
//! adapter, feature `rdma`) and the in-process fake (`fake`, tests and `testkit`) both implement.
//!
//! What it does: names them. Register a memory region the peer may write into; create a
//! reliable-connected queue pair and connect it from the peer's QPN/LID/GID; post an RDMA WRITE
//! with immediate data (zero-length for a credit) and a receive for the immediate; poll
//! completions without blocking.
//!
//! What it does not: hold any logic. Which slot a chunk goes to, how many are in flight, what
//! an immediate means and when a buffer is free again are decided above the seam (`lane`,
//! `incoming`, `pool`), so they run the same on the fake device as on hardware.
//!
//! Invariants: a region's `write`/`read` check their range and never touch memory outside it;
//! a queue pair that failed (a completion in error, a lost peer) fails every later post.

/// What the device allows, from its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// The largest memory region one registration may cover (`max_mr_size`).
    pub max_mr_size_bytes: u64,
    /// Work requests one queue may hold (`max_qp_wr`).
    pub max_qp_wr: u32,
}

/// Where a queue pair is, as its peer needs to know it (carried in the handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddress {
    pub qpn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

/// A remote buffer: the peer's address and the rkey of the region it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    pub addr: u64,
    pub rkey: u32,
}

/// One RDMA WRITE with immediate: `len_bytes` from `local_offset_bytes` of a local region to
/// `remote`, then a receive completion carrying `imm` on the peer. `len_bytes` 0 sends only the
/// immediate (a credit) and needs no local region.
#[derive(Debug)]
pub struct WriteImm<'a, R> {
    pub wr_id: u64,
    pub local: Option<&'a R>,
    pub local_offset_bytes: u64,
    pub len_bytes: u32,
    pub remote: RemoteBuffer,
    pub imm: u32,
}

/// What a completion was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// A posted write has been placed at the peer (the local buffer is free again).
    WriteDone,
    /// A write with immediate from the peer consumed one posted receive.
    RecvImm { imm: u32, len_bytes: u32 },
}

/// One entry of a completion queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub kind: CompletionKind,
    /// `None`: success; else the device's status, named (`remote access error`, `flush`...).
    pub error: Option<String>,
}

/// Why a verbs call failed (the device's or the fabric's fault, never the peer's bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbsError {
    #[error("rdma device: {0}")]
    Device(String),
    #[error("rdma queue pair {qpn:#x} is in error: {reason}")]
    QpBroken { qpn: u32, reason: String },
    #[error("rdma region: {offset_bytes}+{len_bytes} is outside its {region_len_bytes} bytes")]
    OutOfRange { offset_bytes: u64, len_bytes: u64, region_len_bytes: u64 },
}

/// A registered memory region (local buffers the device may read, or the peer may write).
pub trait Region: std::fmt::Debug + Send + Sync + 'static {
    fn len_bytes(&self) -> u64;
    /// Where the peer writes (the region's start) and with which key.
    fn remote(&self) -> RemoteBuffer;
    /// Copies `bytes` in at `offset_bytes` (a staging buffer being filled).
    fn write(&self, offset_bytes: u64, bytes: &[u8]) -> Result<(), VerbsError>;
    /// Copies `len_bytes` out from `offset_bytes` (a slot the peer's write completed into).
    fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>, VerbsError>;
}

/// A reliable-connected queue pair with its own completion queue.
pub trait QueuePair: std::fmt::Debug + Send + 'static {
    type Region: Region;
    fn address(&self) -> QpAddress;
    /// INIT, RTR, RTS towards `peer`.
    fn connect(&mut self, peer: &QpAddress) -> Result<(), VerbsError>;
    fn post_write_imm(&mut self, wr: WriteImm<'_, Self::Region>) -> Result<(), VerbsError>;
    /// One receive for one incoming immediate (every write with immediate consumes one).
    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError>;
    /// Appends a batch of the completions ready now (the device's poll batch); never blocks.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError>;
}

/// An opened device (a context and a protection domain on one port and GID index).
pub trait Device: std::fmt::Debug + Send + Sync + 'static {
    type Region: Region;
    type Qp: QueuePair<Region = Self::Region>;
    fn name(&self) -> &str;
    fn limits(&self) -> DeviceLimits;
    /// Allocates and registers `len_bytes` (at most `max_mr_size_bytes`) for local and
    /// remote write.
    fn register(&self, len_bytes: u64) -> Result<Self::Region, VerbsError>;
    /// A queue pair whose send and receive queues each hold `depth` work requests.
    fn create_qp(&self, depth: u32) -> Result<Self::Qp, VerbsError>;
}
