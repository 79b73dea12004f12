//! The source's rate limit: a token bucket per copy, drawn on by every chunk stream, and
//! changeable while the copy runs.
//!
//! What it does: [`RateHandle`] wraps `ferry_wire::rate::TokenBucket` with a monotonic origin
//! and, for a daemon, a shared parent bucket (its global limit): a chunk waits for both.
//!
//! [`RateHandle::pace`] waits a chunk's turn in slices of at most [`PACE_SLICE`], re-reading
//! the debt after each, so a rate changed while a chunk waits (`set-rate 0` after a rate of
//! 1 byte/s, say) applies within one slice instead of after the wait the old rate computed.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_wire::rate::TokenBucket;

/// The longest a waiting chunk sleeps before it looks at the rate again.
pub const PACE_SLICE: Duration = Duration::from_millis(100);

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

    /// Takes `bytes` and waits until they may be sent, at the rate in force while waiting.
    pub(super) async fn pace(&self, bytes: u64) {
        let mut wait_ns = self.take(bytes);
        while wait_ns > 0 {
            tokio::time::sleep(Duration::from_nanos(wait_ns).min(PACE_SLICE)).await;
            wait_ns = self.take(0);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_rate_lifted_while_a_chunk_waits_applies_within_one_slice() {
        let rate = RateHandle::new(1, 0);
        let started = tokio::time::Instant::now();
        let lifter = rate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            lifter.set(0);
        });
        // At 1 byte/s this chunk would wait about 11.6 days.
        rate.pace(1 << 20).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + PACE_SLICE, "{waited:?}");
    }
}
