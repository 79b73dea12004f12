//! A token-bucket rate limit in bytes per second, with time passed in.
//!
//! What it does: decides how long a sender must wait before it may send `n` bytes, for a
//! rate that can change while a transfer runs. The bucket holds at most one burst
//! (`burst_bytes`), so after an idle spell a sender cannot exceed the rate by more than that.
//!
//! What it does not: sleep. The engine sleeps for what [`TokenBucket::take`] answers.
//!
//! Invariants: the bucket never holds more than one burst (`burst_bytes`); a rate of 0 is
//! unlimited and never makes a sender wait; a time earlier than the last one given earns
//! nothing (the clock is not assumed to be monotonic).

/// A token bucket. Rate 0 means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_bytes_per_sec: u64,
    burst_bytes: u64,
    /// Tokens available at `updated_at_ns`; negative while a sender is in debt.
    tokens: i128,
    updated_at_ns: u64,
}

impl TokenBucket {
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64, now_ns: u64) -> Self {
        Self { rate_bytes_per_sec, burst_bytes, tokens: i128::from(burst_bytes), updated_at_ns: now_ns }
    }

    pub fn rate_bytes_per_sec(&self) -> u64 {
        self.rate_bytes_per_sec
    }

    /// Changes the rate from now on; tokens earned so far are kept.
    pub fn set_rate(&mut self, rate_bytes_per_sec: u64, now_ns: u64) {
        self.refill(now_ns);
        self.rate_bytes_per_sec = rate_bytes_per_sec;
        if rate_bytes_per_sec == 0 {
            self.tokens = i128::from(self.burst_bytes);
        }
    }

    fn refill(&mut self, now_ns: u64) {
        let elapsed_ns = now_ns.saturating_sub(self.updated_at_ns);
        self.updated_at_ns = self.updated_at_ns.max(now_ns);
        let earned = i128::from(elapsed_ns) * i128::from(self.rate_bytes_per_sec) / 1_000_000_000;
        self.tokens = (self.tokens + earned).min(i128::from(self.burst_bytes));
    }

    /// Takes `bytes` tokens and returns how long the caller must wait before sending them
    /// (0 when it may send now). Going into debt lets chunks larger than the burst through.
    pub fn take(&mut self, bytes: u64, now_ns: u64) -> u64 {
        if self.rate_bytes_per_sec == 0 {
            return 0;
        }
        self.refill(now_ns);
        self.tokens -= i128::from(bytes);
        if self.tokens >= 0 {
            return 0;
        }
        let wait_ns = (-self.tokens) * 1_000_000_000 / i128::from(self.rate_bytes_per_sec);
        u64::try_from(wait_ns).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_never_waits() {
        let mut bucket = TokenBucket::new(0, 0, 0);
        assert_eq!(bucket.take(u64::MAX, 0), 0);
    }

    #[test]
    fn waits_for_the_deficit_at_the_rate() {
        let mut bucket = TokenBucket::new(1_000_000, 1_000_000, 0);
        assert_eq!(bucket.take(1_000_000, 0), 0);
        assert_eq!(bucket.take(500_000, 0), 500_000_000);
        // After the wait the debt is paid.
        assert_eq!(bucket.take(0, 500_000_000), 0);
    }

    #[test]
    fn rate_changes_apply_at_once() {
        let mut bucket = TokenBucket::new(1_000, 0, 0);
        assert_eq!(bucket.take(1_000, 0), 1_000_000_000);
        bucket.set_rate(0, 0);
        assert_eq!(bucket.take(1_000, 0), 0);
        bucket.set_rate(2_000, 0);
        assert_eq!(bucket.take(2_000, 0), 1_000_000_000);
    }

    proptest! {
        /// Over any schedule of takes (each honouring the wait), the bytes sent by time t are
        /// at most burst + rate * t.
        #[test]
        fn never_exceeds_rate_plus_burst(rate in 1u64..10_000_000, burst in 0u64..1_000_000, sizes in proptest::collection::vec(0u64..2_000_000, 1..50)) {
            let mut bucket = TokenBucket::new(rate, burst, 0);
            let mut now_ns = 0u64;
            let mut sent = 0u128;
            for size in sizes {
                let wait = bucket.take(size, now_ns);
                now_ns = now_ns.saturating_add(wait);
                sent += u128::from(size);
                let allowed = u128::from(burst) + u128::from(rate) * u128::from(now_ns) / 1_000_000_000 + 1;
                prop_assert!(sent <= allowed, "sent {} allowed {}", sent, allowed);
            }
        }
    }
}
