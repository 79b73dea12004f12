//! The source host's monotonic clock, as the control socket's timestamps use it.
//!
//! What it does: [`monotonic_ns`] reads CLOCK_MONOTONIC in nanoseconds, the clock a coordinator
//! stamps `writes_paused_at_ns` and `writes_resumed_at_ns` with (DESIGN section 4), and
//! [`instant_at`] turns such a stamp into a tokio deadline.
//!
//! What it does not: compare clocks of two hosts (monotonic clocks of two hosts cannot be
//! subtracted; every pause is measured on the source host).
//!
//! Invariants: one clock for every stamp a pause is measured with, CLOCK_MONOTONIC, which
//! the reference node (`ferry_refnode::monotonic_ns`) reads too; nothing here panics on a stamp
//! (a stamp already past is "now", arithmetic saturates).

use std::time::Duration;

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The tokio instant at CLOCK_MONOTONIC `at_ns` (now, when it is past).
pub fn instant_at(at_ns: u64) -> tokio::time::Instant {
    let now_ns = monotonic_ns();
    tokio::time::Instant::now() + Duration::from_nanos(at_ns.saturating_sub(now_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_and_matches_std() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
        // A deadline 50 ms ahead is about 50 ms ahead.
        let deadline = instant_at(monotonic_ns() + 50_000_000);
        let ahead = deadline - tokio::time::Instant::now();
        assert!(ahead <= Duration::from_millis(50) && ahead >= Duration::from_millis(40), "{ahead:?}");
    }
}
