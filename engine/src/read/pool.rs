//! A bounded pool of 4096-aligned read buffers, lent out as [`PoolBuf`] guards.
//!
//! What it does: holds at most `buffers_count` buffers of `buf_len_bytes` each. [`BufferPool::
//! acquire`] waits (asynchronously, first come first served) until a buffer is free; the buffer
//! goes back to the pool when its [`PoolBuf`] is dropped, which for a chunk handed out as
//! [`bytes::Bytes`] (through [`PoolBuf::into_bytes`], i.e. `Bytes::from_owner`) means when the
//! last clone of that `Bytes` is dropped, typically once quinn has had the chunk acknowledged.
//! Buffers are allocated lazily, on first use, and reused afterwards.
//!
//! What it does not: read files (the mmap, io_uring and pread readers do) or limit the caller
//! in any other way: a caller that holds `buffers_count` chunks and waits for one more waits
//! forever, by design. That is the memory bound.
//!
//! Invariants: every buffer is aligned to [`ALIGN_BYTES`] (what O_DIRECT needs) and zeroed at
//! allocation, so its bytes are always initialised; a buffer is owned by exactly one
//! [`PoolBuf`] (or the free list) at a time; anonymous memory never exceeds
//! `buffers_count * buf_len_bytes`.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Alignment of every pool buffer: a page, and the largest logical block size O_DIRECT asks
/// for on the devices we run on.
pub const ALIGN_BYTES: usize = 4096;

/// One heap buffer aligned to [`ALIGN_BYTES`], zeroed when allocated.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); no thread-local state.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len_bytes` (> 0) zeroed bytes; `None` if the layout is impossible.
    fn new_zeroed(len_bytes: usize) -> Option<Self> {
        if len_bytes == 0 {
            return None;
        }
        let layout = Layout::from_size_align(len_bytes, ALIGN_BYTES).ok()?;
        // SAFETY: the layout has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Some(Self { ptr, layout })
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() bytes, initialised (zeroed at allocation, then
        // only written by reads), and no `&mut` to it can exist while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

struct PoolInner {
    free: Mutex<Vec<AlignedBuf>>,
    buf_len_bytes: usize,
}

impl PoolInner {
    fn take_or_allocate(&self) -> Option<AlignedBuf> {
        let reused = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        reused.or_else(|| AlignedBuf::new_zeroed(self.buf_len_bytes))
    }

    fn give_back(&self, buf: AlignedBuf) {
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(buf);
    }
}

/// A bounded pool of aligned buffers; cheap to clone (all clones share the same buffers).
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
    permits: Arc<Semaphore>,
    buffers_count: usize,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("buffers_count", &self.buffers_count)
            .field("buf_len_bytes", &self.inner.buf_len_bytes)
            .field("available_count", &self.available_count())
            .finish()
    }
}

impl BufferPool {
    /// A pool of `buffers_count` buffers of `buf_len_bytes` each (rounded up to
    /// [`ALIGN_BYTES`]). `None` if either is zero or the size overflows.
    pub fn new(buffers_count: usize, buf_len_bytes: usize) -> Option<Self> {
        if buffers_count == 0 || buffers_count > Semaphore::MAX_PERMITS || buf_len_bytes == 0 {
            return None;
        }
        let buf_len_bytes = buf_len_bytes.checked_next_multiple_of(ALIGN_BYTES)?;
        Layout::from_size_align(buf_len_bytes, ALIGN_BYTES).ok()?;
        Some(Self {
            inner: Arc::new(PoolInner { free: Mutex::new(Vec::with_capacity(buffers_count)), buf_len_bytes }),
            permits: Arc::new(Semaphore::new(buffers_count)),
            buffers_count,
        })
    }

    /// Length of every buffer, a multiple of [`ALIGN_BYTES`].
    pub fn buf_len_bytes(&self) -> usize {
        self.inner.buf_len_bytes
    }

    /// Buffers that could be lent right now without waiting.
    pub fn available_count(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits for a free buffer. Cancel-safe: dropping the future gives nothing away.
    /// `None` only if the pool was closed, which this module never does.
    pub async fn acquire(&self) -> Option<PoolBuf> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok()?;
        Some(self.guard_with(permit))
    }

    /// Takes a free buffer if one is available now.
    pub fn try_acquire(&self) -> Option<PoolBuf> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(self.guard_with(permit))
    }

    fn guard_with(&self, permit: OwnedSemaphorePermit) -> PoolBuf {
        // Allocation failure of a valid layout aborts (handle_alloc_error), so this is Some.
        let buf = self.inner.take_or_allocate();
        PoolBuf { buf, start_bytes: 0, len_bytes: 0, inner: Arc::clone(&self.inner), _permit: permit }
    }
}

/// A buffer lent by a [`BufferPool`]; returns to the pool on drop.
///
/// It carries a window (`start_bytes..start_bytes + len_bytes`) that [`AsRef`] exposes, so a
/// read that had to start earlier (O_DIRECT alignment) hands out only the asked bytes.
pub struct PoolBuf {
    buf: Option<AlignedBuf>,
    start_bytes: usize,
    len_bytes: usize,
    inner: Arc<PoolInner>,
    // Dropped after Drop::drop has put the buffer back, so the next waiter finds it.
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("capacity_bytes", &self.capacity_bytes())
            .field("start_bytes", &self.start_bytes)
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl PoolBuf {
    /// The whole buffer's length.
    pub fn capacity_bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, AlignedBuf::len)
    }

    /// The whole buffer, for a reader to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut().map_or(&mut [], AlignedBuf::as_mut_slice)
    }

    /// Sets the window handed out by [`AsRef`]. Returns false (and changes nothing) if the
    /// window does not fit in the buffer.
    pub fn set_window(&mut self, start_bytes: usize, len_bytes: usize) -> bool {
        match start_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.capacity_bytes() => {
                self.start_bytes = start_bytes;
                self.len_bytes = len_bytes;
                true
            }
            _ => false,
        }
    }

    /// Hands the window out as `Bytes` without copying; the buffer returns to the pool when
    /// the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        let whole = self.buf.as_ref().map_or(&[][..], AlignedBuf::as_slice);
        // set_window keeps start + len within the buffer; get() keeps this total anyway.
        whole.get(self.start_bytes..self.start_bytes.saturating_add(self.len_bytes)).unwrap_or(&[])
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.inner.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn rejects_empty_pools() {
        assert!(BufferPool::new(0, 4096).is_none());
        assert!(BufferPool::new(1, 0).is_none());
        assert!(BufferPool::new(1, usize::MAX).is_none());
    }

    #[test]
    fn buffers_are_aligned_and_rounded_up() {
        let pool = BufferPool::new(2, 5000).unwrap();
        assert_eq!(pool.buf_len_bytes(), 8192);
        let mut buf = pool.try_acquire().unwrap();
        assert_eq!(buf.capacity_bytes(), 8192);
        assert_eq!(buf.as_mut_slice().as_ptr() as usize % ALIGN_BYTES, 0);
    }

    #[test]
    fn window_is_checked_and_exposed() {
        let pool = BufferPool::new(1, 4096).unwrap();
        let mut buf = pool.try_acquire().unwrap();
        buf.as_mut_slice()[10..14].copy_from_slice(b"abcd");
        assert!(!buf.set_window(4000, 97));
        assert!(!buf.set_window(usize::MAX, 2));
        assert!(buf.set_window(10, 4));
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], b"abcd");
    }

    #[tokio::test]
    async fn bound_holds_until_bytes_dropped() {
        let pool = BufferPool::new(2, 4096).unwrap();
        let a = pool.acquire().await.unwrap().into_bytes();
        let b = pool.acquire().await.unwrap().into_bytes();
        assert_eq!(pool.available_count(), 0);
        assert!(pool.try_acquire().is_none());
        let waiting = tokio::time::timeout(Duration::from_millis(50), pool.acquire()).await;
        assert!(waiting.is_err(), "a third buffer was lent while two were out");
        let a_clone = a.clone();
        drop(a);
        assert!(pool.try_acquire().is_none(), "a clone still holds the buffer");
        drop(a_clone);
        let c = tokio::time::timeout(Duration::from_secs(10), pool.acquire()).await;
        assert!(c.is_ok(), "the buffer did not come back when its bytes were dropped");
        drop(b);
    }

    #[tokio::test]
    async fn buffers_are_reused() {
        let pool = BufferPool::new(1, 4096).unwrap();
        let mut first = pool.acquire().await.unwrap();
        let ptr = first.as_mut_slice().as_ptr();
        drop(first);
        let mut second = pool.acquire().await.unwrap();
        assert_eq!(second.as_mut_slice().as_ptr(), ptr);
    }
}
