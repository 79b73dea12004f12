//! A bounded pool of registered buffers: the source's staging buffers (a chunk is copied in,
//! then written to the target from there) and the target's receive slots.
//!
//! What it does: registers `buffers_count` buffers of `buffer_len_bytes` once, in as few memory
//! regions as the device's `max_mr_size` allows (a buffer never straddles two regions), and
//! lends them out; a [`PooledBuffer`] goes back when dropped.
//!
//! What it does not: register the source's files or mmaps. Registering a page-cache mapping
//! pins it for the life of the registration; the chunk is copied into a staging buffer
//! instead, and the copy is bounded by this pool.
//!
//! Invariants: at most `buffers_count` buffers are lent at once (a waiter waits, it never
//! allocates more); every buffer lies inside one region.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::verbs::{Device, Region, RemoteBuffer, VerbsError};

/// Registered buffers, lent one at a time.
#[derive(Debug)]
pub struct Pool<R: Region> {
    regions: Vec<R>,
    buffer_len_bytes: u64,
    buffers_per_region: u64,
    free: Mutex<Vec<u32>>,
    permits: Arc<Semaphore>,
}

/// One lent buffer; back in the pool when dropped.
#[derive(Debug)]
pub struct PooledBuffer<R: Region> {
    pool: Arc<Pool<R>>,
    index: u32,
    _permit: OwnedSemaphorePermit,
}

impl<R: Region> Pool<R> {
    /// Registers the pool's regions on `device`.
    pub fn register<D: Device<Region = R>>(
        device: &D,
        buffer_len_bytes: u64,
        buffers_count: u32,
    ) -> Result<Arc<Self>, VerbsError> {
        let max_mr_size_bytes = device.limits().max_mr_size_bytes;
        if buffer_len_bytes == 0 || buffer_len_bytes > max_mr_size_bytes {
            return Err(VerbsError::Device(format!(
                "a buffer of {buffer_len_bytes} bytes does not fit the device's max_mr_size of {max_mr_size_bytes} bytes"
            )));
        }
        let buffers_per_region = max_mr_size_bytes / buffer_len_bytes;
        let mut regions = Vec::new();
        let mut left = u64::from(buffers_count);
        while left > 0 {
            let count = left.min(buffers_per_region);
            regions.push(device.register(count * buffer_len_bytes)?);
            left -= count;
        }
        Ok(Arc::new(Self {
            regions,
            buffer_len_bytes,
            buffers_per_region,
            free: Mutex::new((0..buffers_count).rev().collect()),
            permits: Arc::new(Semaphore::new(buffers_count as usize)),
        }))
    }

    /// Memory regions registered (each at most the device's `max_mr_size`).
    pub fn regions_count(&self) -> usize {
        self.regions.len()
    }

    pub fn buffer_len_bytes(&self) -> u64 {
        self.buffer_len_bytes
    }

    /// Buffers not lent now.
    pub fn available_count(&self) -> usize {
        self.permits.available_permits()
    }

    /// The next free buffer, waiting while every buffer is lent.
    pub async fn acquire(self: &Arc<Self>) -> PooledBuffer<R> {
        #[allow(clippy::expect_used)] // the semaphore is never closed
        let permit = self.permits.clone().acquire_owned().await.expect("the pool's semaphore is never closed");
        self.take(permit)
    }

    /// A free buffer now, or `None` when every buffer is lent.
    pub fn try_acquire(self: &Arc<Self>) -> Option<PooledBuffer<R>> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.take(permit))
    }

    fn take(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> PooledBuffer<R> {
        // A permit stands for one free index: the list is never empty while one is held.
        #[allow(clippy::expect_used)]
        let index =
            self.free.lock().unwrap_or_else(|e| e.into_inner()).pop().expect("a permit stands for a free buffer");
        PooledBuffer { pool: self.clone(), index, _permit: permit }
    }

    fn place(&self, index: u32) -> (&R, u64) {
        let region_index = u64::from(index) / self.buffers_per_region;
        let offset_bytes = (u64::from(index) % self.buffers_per_region) * self.buffer_len_bytes;
        // Indices come from `0..buffers_count`, and `register` made a region for each.
        #[allow(clippy::indexing_slicing, clippy::cast_possible_truncation)]
        (&self.regions[region_index as usize], offset_bytes)
    }
}

impl<R: Region> PooledBuffer<R> {
    pub fn len_bytes(&self) -> u64 {
        self.pool.buffer_len_bytes
    }

    /// The region the buffer is in and its offset there (for a local write's source).
    pub fn region(&self) -> (&R, u64) {
        self.pool.place(self.index)
    }

    /// The buffer as the peer addresses it.
    pub fn remote(&self) -> RemoteBuffer {
        let (region, offset_bytes) = self.region();
        let start = region.remote();
        RemoteBuffer { addr: start.addr + offset_bytes, rkey: start.rkey }
    }

    /// Copies `pieces` in, one after another from the buffer's start.
    pub fn fill(&self, pieces: &[&[u8]]) -> Result<u64, VerbsError> {
        let (region, start) = self.region();
        let mut at = 0u64;
        for piece in pieces {
            let len = piece.len() as u64;
            if at + len > self.len_bytes() {
                return Err(VerbsError::OutOfRange {
                    offset_bytes: at,
                    len_bytes: len,
                    region_len_bytes: self.len_bytes(),
                });
            }
            region.write(start + at, piece)?;
            at += len;
        }
        Ok(at)
    }

    /// Copies `len_bytes` out from `offset_bytes` into the buffer.
    pub fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>, VerbsError> {
        if offset_bytes.checked_add(len_bytes).is_none_or(|end| end > self.len_bytes()) {
            return Err(VerbsError::OutOfRange { offset_bytes, len_bytes, region_len_bytes: self.len_bytes() });
        }
        let (region, start) = self.region();
        region.read(start + offset_bytes, len_bytes)
    }
}

impl<R: Region> Drop for PooledBuffer<R> {
    fn drop(&mut self) {
        self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.index);
    }
}
