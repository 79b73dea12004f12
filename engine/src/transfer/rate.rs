//! The source's rate limit: a token bucket per copy, drawn on by every chunk stream, and
//! changeable while the copy runs.
//!
//! What it does: [`RateHandle`] wraps `ferry_wire::rate::TokenBucket` with a monotonic origin
//! and, for a daemon, a shared parent bucket (its global limit): a chunk waits for both.
//!
//! What it does not: sleep; it says how long to wait, and the chunk stream waits.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ferry_wire::rate::TokenBucket;

/// A handle to change the rate limit of a running copy. It may draw on a shared parent bucket
/// too (the daemon's global limit): a chunk then waits for both.
#[derive(Debug, Clone)]
pub struct RateHandle(Arc<Mutex<TokenBucket>>, Instant, Option<Arc<RateHandle>>);

impl RateHandle {
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64) -> Self {
        Self(Arc::new(Mutex::new(TokenBucket::new(rate_bytes_per_sec, burst_bytes, 0))), Instant::now(), None)
    }

    /// A handle whose chunks also take from `parent` (shared by every copy of a daemon).
    pub fn with_parent(rate_bytes_per_sec: u64, burst_bytes: u64, parent: Arc<RateHandle>) -> Self {
        Self(Arc::new(Mutex::new(TokenBucket::new(rate_bytes_per_sec, burst_bytes, 0))), Instant::now(), Some(parent))
    }

    fn lock(&self) -> MutexGuard<'_, TokenBucket> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a new rate at once (0: unlimited), to a running copy or the next one.
    pub fn set(&self, rate_bytes_per_sec: u64) {
        let mut bucket = self.lock();
        let now_ns = since(self.1);
        bucket.set_rate(rate_bytes_per_sec, now_ns);
    }

    /// The rate in force.
    pub fn rate_bytes_per_sec(&self) -> u64 {
        self.lock().rate_bytes_per_sec()
    }

    /// Sets the burst for a copy; a rate given in the request wins over the handle's.
    pub(super) fn start(&self, request_rate_bytes_per_sec: u64, burst_bytes: u64) {
        let mut bucket = self.lock();
        let rate =
            if request_rate_bytes_per_sec > 0 { request_rate_bytes_per_sec } else { bucket.rate_bytes_per_sec() };
        *bucket = TokenBucket::new(rate, burst_bytes, since(self.1));
    }

    pub(super) fn take(&self, bytes: u64) -> u64 {
        let now_ns = since(self.1);
        let own_ns = self.lock().take(bytes, now_ns);
        let parent_ns = self.2.as_ref().map_or(0, |parent| parent.take(bytes));
        own_ns.max(parent_ns)
    }
}

/// Monotonic nanoseconds since `origin`.
pub(super) fn since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
