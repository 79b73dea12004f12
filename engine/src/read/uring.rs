//! The io_uring reader: dedicated reader threads, each with its own ring, filling pooled
//! buffers; the async side waits on a oneshot.
//!
//! What it does: [`UringReader::new`] sets up one ring per thread (probing that the kernel
//! allows io_uring and supports `IORING_OP_READ`, else [`ReadError::UringUnavailable`]) and
//! starts the threads. [`UringReader::read`] takes a buffer from the [`BufferPool`] (waiting if
//! all are out), sends the request to a thread (round robin, over a bounded tokio channel) and
//! awaits the reply. A thread keeps up to `ring_entries` reads in flight, resubmits the rest
//! of a short read, and replies with the buffer as `Bytes` (`Bytes::from_owner`, no copy).
//!
//! O_DIRECT (`direct = true`): the read goes through [`SourceFile::direct_file`] and must be
//! aligned in offset, length and memory. It reads the 4096-aligned span that covers the chunk
//! (up to 4095 bytes before and after) into the aligned buffer and hands out only the chunk;
//! at the tail of a file whose size is not a multiple of 4096, the kernel's short read at end
//! of file is enough as long as it covers the chunk.
//!
//! What it does not: register buffers or files with the ring (plain `READ`, not `READ_FIXED`),
//! poll (no SQPOLL/IOPOLL), or read anything but regular files.
//!
//! Invariants: a request's buffer and file (and so its descriptor) are owned by the thread's
//! in-flight table from submission until its completion is reaped; a thread exits only when
//! nothing is in flight (and leaks, rather than frees, anything still in flight if it must stop
//! early). Dropping the reader closes the channels and joins the threads, which first finish
//! their in-flight reads.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::{mpsc, oneshot};

use super::pool::{BufferPool, PoolBuf, ALIGN_BYTES};
use super::{ReadError, ReaderConfig, SourceFile};

/// Reads chunks with io_uring on dedicated threads.
pub struct UringReader {
    senders: Vec<mpsc::Sender<Request>>,
    threads: Vec<JoinHandle<()>>,
    next_thread: AtomicUsize,
    pool: BufferPool,
    live_threads: Arc<AtomicUsize>,
}

impl fmt::Debug for UringReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringReader").field("threads", &self.threads.len()).field("pool", &self.pool).finish()
    }
}

/// One chunk read, owned by the caller until sent, then by a reader thread until replied.
struct Request {
    file: Arc<SourceFile>,
    direct: bool,
    buf: PoolBuf,
    /// The caller's chunk.
    offset_bytes: u64,
    len_bytes: u32,
    /// Where the kernel read starts: `offset_bytes`, or aligned down for O_DIRECT.
    read_offset_bytes: u64,
    /// How much to ask the kernel for: `len_bytes`, or the aligned span for O_DIRECT.
    read_len_bytes: u32,
    /// Where the chunk starts in the buffer (`offset_bytes - read_offset_bytes`).
    window_start_bytes: u32,
    /// Bytes the kernel has filled so far.
    filled_bytes: u32,
    reply: oneshot::Sender<Result<Bytes, ReadError>>,
}

impl Request {
    /// The buffer must be filled up to here for the chunk to be complete.
    fn needed_bytes(&self) -> u32 {
        self.window_start_bytes.saturating_add(self.len_bytes)
    }

    fn fd(&self) -> i32 {
        match (self.direct, self.file.direct.get()) {
            (true, Some(direct)) => direct.as_raw_fd(),
            _ => self.file.file().as_raw_fd(),
        }
    }

    fn finish(self, result: Result<(), ReadError>) {
        let Request { buf, window_start_bytes, len_bytes, reply, .. } = self;
        let result = result.map(|()| {
            let mut buf = buf;
            buf.set_window(window_start_bytes as usize, len_bytes as usize);
            buf.into_bytes()
        });
        // A caller that gave up dropped its receiver; the buffer goes back to the pool here.
        let _ = reply.send(result);
    }

    fn short_read(&self) -> ReadError {
        let got_bytes = self.filled_bytes.saturating_sub(self.window_start_bytes);
        let got_bytes = got_bytes.min(self.len_bytes);
        self.file.short_read(self.offset_bytes, self.len_bytes, u64::from(got_bytes))
    }
}

impl UringReader {
    /// Sets up `config.threads` rings of `config.ring_entries` and starts their threads.
    pub fn new(config: &ReaderConfig, pool: BufferPool) -> Result<Self, ReadError> {
        let mut rings = Vec::with_capacity(config.threads);
        for _ in 0..config.threads {
            rings.push(probe_ring(config.ring_entries)?);
        }
        let live_threads = Arc::new(AtomicUsize::new(0));
        let mut reader = Self {
            senders: Vec::with_capacity(config.threads),
            threads: Vec::with_capacity(config.threads),
            next_thread: AtomicUsize::new(0),
            pool,
            live_threads: Arc::clone(&live_threads),
        };
        for (index, ring) in rings.into_iter().enumerate() {
            let (sender, receiver) = mpsc::channel(config.buffers_count);
            let live = Arc::clone(&live_threads);
            live.fetch_add(1, Ordering::SeqCst);
            let priority = config.priority;
            let spawned = std::thread::Builder::new().name(format!("ferry-uring-{index}")).spawn(move || {
                let _live = LiveGuard(live);
                crate::priority::lower_this_thread(priority);
                if let Err(err) = run(ring, receiver) {
                    tracing::error!(error = %err, "io_uring reader thread stopped");
                }
            });
            match spawned {
                Ok(handle) => {
                    reader.senders.push(sender);
                    reader.threads.push(handle);
                }
                Err(source) => {
                    // The closure (and its LiveGuard) was dropped unrun.
                    return Err(ReadError::UringUnavailable { cause: source });
                }
            }
        }
        Ok(reader)
    }

    /// Buffers free now.
    pub fn available_count(&self) -> usize {
        self.pool.available_count()
    }

    /// Reader threads still running (they stop when the reader is dropped).
    pub fn live_thread_count(&self) -> usize {
        self.live_threads.load(Ordering::SeqCst)
    }

    /// Reads `len_bytes` (> 0, inside the file as opened) at `offset_bytes`.
    pub async fn read(
        &self,
        file: &Arc<SourceFile>,
        offset_bytes: u64,
        len_bytes: u32,
        direct: bool,
    ) -> Result<Bytes, ReadError> {
        if direct {
            file.direct_file()?;
        }
        let (read_offset_bytes, read_len_bytes, window_start_bytes) =
            span(offset_bytes, len_bytes, direct).ok_or_else(|| too_large(len_bytes))?;
        let buf = self.pool.acquire().await.ok_or(ReadError::ReaderGone)?;
        if read_len_bytes as usize > buf.capacity_bytes() {
            return Err(too_large(len_bytes));
        }
        let (reply, replied) = oneshot::channel();
        let request = Request {
            file: Arc::clone(file),
            direct,
            buf,
            offset_bytes,
            len_bytes,
            read_offset_bytes,
            read_len_bytes,
            window_start_bytes,
            filled_bytes: 0,
            reply,
        };
        let turn = self.next_thread.fetch_add(1, Ordering::Relaxed);
        let sender = self.senders.get(turn % self.senders.len().max(1)).ok_or(ReadError::ReaderGone)?;
        sender.send(request).await.map_err(|_| ReadError::ReaderGone)?;
        replied.await.map_err(|_| ReadError::ReaderGone)?
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        // Closing the channels lets each thread finish its in-flight reads and exit.
        self.senders.clear();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("an io_uring reader thread panicked");
            }
        }
    }
}

fn too_large(len_bytes: u32) -> ReadError {
    ReadError::ChunkTooLarge { len_bytes, chunk_len_max_bytes: super::CHUNK_LEN_MAX_BYTES }
}

/// `(read_offset, read_len, window_start)` for a chunk; aligned to [`ALIGN_BYTES`] if direct.
fn span(offset_bytes: u64, len_bytes: u32, direct: bool) -> Option<(u64, u32, u32)> {
    if !direct {
        return Some((offset_bytes, len_bytes, 0));
    }
    let align = ALIGN_BYTES as u64;
    let start = offset_bytes - offset_bytes % align;
    let end = offset_bytes.checked_add(u64::from(len_bytes))?.checked_next_multiple_of(align)?;
    let read_len = u32::try_from(end - start).ok()?;
    let window_start = u32::try_from(offset_bytes - start).ok()?;
    Some((start, read_len, window_start))
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Builds a ring and checks that it works and supports READ; the clear error for a refusal.
fn probe_ring(entries: u32) -> Result<IoUring, ReadError> {
    let unavailable = |source| ReadError::UringUnavailable { cause: source };
    let mut ring = IoUring::new(entries).map_err(unavailable)?;
    let mut probe = Probe::new();
    // IORING_REGISTER_PROBE is newer than IORING_OP_READ by nothing (both 5.6); a kernel that
    // lacks it lacks READ too.
    ring.submitter().register_probe(&mut probe).map_err(unavailable)?;
    if !probe.is_supported(opcode::Read::CODE) {
        return Err(unavailable(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel's io_uring has no READ operation (needs Linux 5.6 or later)",
        )));
    }
    // A NOP round trip: some sandboxes allow io_uring_setup but refuse io_uring_enter.
    let nop = opcode::Nop::new().build().user_data(u64::MAX);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| unavailable(io::Error::other("the new ring's submission queue is full")))?;
    ring.submit_and_wait(1).map_err(unavailable)?;
    let nop_result = ring.completion().next().map(|cqe| cqe.result());
    match nop_result {
        Some(res) if res >= 0 => Ok(ring),
        Some(res) => Err(unavailable(io::Error::from_raw_os_error(-res))),
        None => Err(unavailable(io::Error::other("the ring completed no NOP"))),
    }
}

/// The in-flight table of one thread: slot index = the SQE's user_data.
struct InFlight {
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
}

impl InFlight {
    fn new(entries: usize) -> Self {
        Self { slots: (0..entries).map(|_| None).collect(), free: (0..entries).rev().collect() }
    }

    fn count(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues the (rest of the) request's read on the ring, or replies with the error.
    fn submit(&mut self, ring: &mut IoUring, slot: usize, mut request: Request) {
        let filled = request.filled_bytes as usize;
        let wanted = request.read_len_bytes as usize;
        let at = request.read_offset_bytes.saturating_add(u64::from(request.filled_bytes));
        let fd = request.fd();
        if slot >= self.slots.len() {
            // Cannot happen: slots come from `free`, which holds only indices of `slots`.
            return request.finish(Err(ReadError::ReaderGone));
        }
        let Some(rest) = request.buf.as_mut_slice().get_mut(filled..wanted) else {
            let too_large = too_large(request.len_bytes);
            self.free.push(slot);
            return request.finish(Err(too_large));
        };
        let rest_len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let sqe =
            opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest_len).offset(at).build().user_data(slot as u64);
        // Buffered reads of cached pages would otherwise be copied inline, on this one thread;
        // IOSQE_ASYNC hands them to the kernel's io-wq workers, which copy on every core (the
        // bench measured ~0.65x -> ~0.9x of pread when hot). O_DIRECT reads are truly async
        // already, and io-wq would only add a hop.
        let sqe = if request.direct { sqe } else { sqe.flags(squeue::Flags::ASYNC) };
        // SAFETY: the buffer (heap memory owned by `request.buf`) and the descriptor (owned by
        // `request.file`) stay alive until this read's completion is reaped: the request moves
        // into `slots[slot]` (checked in range above) right below and leaves it only in
        // `complete`, or is leaked by `InFlight::drop` on an early exit.
        let pushed = unsafe { ring.submission().push(&sqe) };
        match (pushed, self.slots.get_mut(slot)) {
            (Ok(()), Some(entry)) => *entry = Some(request),
            (Ok(()), None) => std::mem::forget(request),
            (Err(_), _) => {
                // Cannot happen: entries in flight never exceed the ring's size.
                self.free.push(slot);
                let err = io::Error::other("io_uring submission queue full");
                let err = request.file.io_error(at, err);
                request.finish(Err(err));
            }
        }
    }

    /// Handles one completion: done, failed, or resubmitted for the rest.
    fn complete(&mut self, ring: &mut IoUring, slot: usize, result: i32) {
        let Some(mut request) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if result < 0 {
            let source = io::Error::from_raw_os_error(result.saturating_neg());
            match source.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => return self.submit(ring, slot, request),
                Some(libc::EINVAL) if request.direct => {
                    self.free.push(slot);
                    let err = ReadError::DirectUnsupported { path: request.file.path().to_path_buf(), cause: source };
                    return request.finish(Err(err));
                }
                _ => {
                    self.free.push(slot);
                    let at = request.read_offset_bytes.saturating_add(u64::from(request.filled_bytes));
                    let err = request.file.io_error(at, source);
                    return request.finish(Err(err));
                }
            }
        }
        let got = u32::try_from(result).unwrap_or(0);
        request.filled_bytes = request.filled_bytes.saturating_add(got);
        if request.filled_bytes >= request.needed_bytes() {
            self.free.push(slot);
            return request.finish(Ok(()));
        }
        let unaligned = request.direct && !(request.filled_bytes as usize).is_multiple_of(ALIGN_BYTES);
        if got == 0 || unaligned || request.filled_bytes >= request.read_len_bytes {
            // End of file before the chunk's end: the file shrank.
            self.free.push(slot);
            let err = request.short_read();
            return request.finish(Err(err));
        }
        self.submit(ring, slot, request);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Only on an early exit: the kernel may still write into these buffers, so they must
        // never be freed or reused. Leak them (and keep their descriptors open).
        for request in self.slots.drain(..).flatten() {
            std::mem::forget(request);
        }
    }
}

/// The reader thread: take requests, submit, reap, until the channel closes and nothing is in
/// flight.
fn run(mut ring: IoUring, mut receiver: mpsc::Receiver<Request>) -> io::Result<()> {
    let entries = ring.params().sq_entries() as usize;
    let mut in_flight = InFlight::new(entries);
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(entries);
    let mut closed = false;
    loop {
        while in_flight.has_room() && !closed {
            let next = if in_flight.count() == 0 {
                receiver.blocking_recv()
            } else {
                match receiver.try_recv() {
                    Ok(request) => Some(request),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match (next, in_flight.free.pop()) {
                (Some(request), Some(slot)) => in_flight.submit(&mut ring, slot, request),
                (Some(request), None) => request.finish(Err(ReadError::ReaderGone)),
                (None, slot) => {
                    in_flight.free.extend(slot);
                    closed = true;
                }
            }
        }
        if in_flight.count() == 0 {
            if closed {
                return Ok(());
            }
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => {}
            Err(err) => return Err(err),
        }
        done.clear();
        done.extend(
            ring.completion().map(|cqe| (usize::try_from(cqe.user_data()).unwrap_or(usize::MAX), cqe.result())),
        );
        for &(slot, result) in &done {
            in_flight.complete(&mut ring, slot, result);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::super::test_support::*;
    use super::super::{ChunkReader, ReadMode, ReaderConfig};
    use super::*;

    #[test]
    fn direct_span_is_aligned_and_covers_the_chunk() {
        assert_eq!(span(0, 4096, true), Some((0, 4096, 0)));
        assert_eq!(span(1, 1, true), Some((0, 4096, 1)));
        assert_eq!(span(4095, 2, true), Some((0, 8192, 4095)));
        assert_eq!(span(8192, 4097, true), Some((8192, 8192, 0)));
        assert_eq!(span(4097, 100, false), Some((4097, 100, 0)));
        assert_eq!(span(u64::MAX - 1, 10, true), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_exact_bytes() {
        for mode in [ReadMode::Uring, ReadMode::UringDirect] {
            let Some(reader) = reader_or_skip(mode, small_config()) else { continue };
            check_exact_bytes(&reader).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_exact_bytes_with_many_threads_and_a_tiny_ring() {
        for mode in [ReadMode::Uring, ReadMode::UringDirect] {
            let config = ReaderConfig { threads: 3, ring_entries: 2, ..small_config() };
            let Some(reader) = reader_or_skip(mode, config) else { continue };
            check_exact_bytes(&reader).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_reads_past_eof() {
        for mode in [ReadMode::Uring, ReadMode::UringDirect] {
            let Some(reader) = reader_or_skip(mode, small_config()) else { continue };
            check_past_eof(&reader).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounds_buffers_out() {
        for mode in [ReadMode::Uring, ReadMode::UringDirect] {
            let config = ReaderConfig { buffers_count: 2, ..small_config() };
            let Some(reader) = reader_or_skip(mode, config) else { continue };
            check_pool_bound(&reader).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_a_shrunk_file() {
        for mode in [ReadMode::Uring, ReadMode::UringDirect] {
            let Some(reader) = reader_or_skip(mode, small_config()) else { continue };
            check_shrunk_file(&reader).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_reader_stops_its_threads() {
        let config = ReaderConfig { threads: 2, ..small_config() };
        let Some(pool) = super::super::new_pool(&config).ok() else { panic!("pool") };
        let reader = match UringReader::new(&config, pool) {
            Ok(reader) => reader,
            Err(err) => return skip_loudly("dropping_the_reader_stops_its_threads", &err),
        };
        assert_eq!(reader.live_thread_count(), 2);
        let live = Arc::clone(&reader.live_threads);
        let (_dir, file, data) = make_file(3 * 4096 + 5);
        // A chunk still held by the caller must not keep the threads alive, nor break.
        let held = reader.read(&file, 4096, 4096, false).await.unwrap();
        let handle = tokio::task::spawn_blocking(move || drop(reader));
        tokio::time::timeout(std::time::Duration::from_secs(30), handle)
            .await
            .expect("dropping the reader hung")
            .unwrap();
        assert_eq!(live.load(Ordering::SeqCst), 0, "reader threads still running");
        assert_eq!(&held[..], &data[4096..8192]);
    }

    #[tokio::test]
    async fn chunk_reader_in_uring_mode_reports_its_mode() {
        let Some(reader) = reader_or_skip(ReadMode::Uring, small_config()) else { return };
        assert_eq!(reader.mode(), ReadMode::Uring);
        let fallback = ChunkReader::new_or_pread(ReadMode::Uring, small_config()).unwrap();
        assert_eq!(fallback.mode(), ReadMode::Uring);
    }
}
