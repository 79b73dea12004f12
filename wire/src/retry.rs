//! The retry policy: how long a source keeps reconnecting after a transient failure.
//!
//! What it does: [`Retries`] decides, from the time (an argument) and whether the last attempt
//! moved the copy forward, whether to try again and after what back-off, and bounds the next
//! attempt's handshake by what is left of the deadline. The deadline counts from the last
//! attempt that made progress (or from the start), so a long copy that loses its link now and
//! then is never cut, while a target that never answers fails within the deadline.
//!
//! What it does not: classify errors. Whether an error is transient is a property of the
//! blame-typed error itself (`is_transient` on the wire machines' errors and on the engine's
//! `TransferError`); a permanent error (a certificate name, the allow-list, a version, a
//! refused offer, a malformed peer) is never handed to this machine: it fails the copy at once.
//!
//! Invariants: the back-off never exceeds [`RetryPolicy::backoff_max_ms`] nor what is left of
//! the deadline; once the deadline has passed without progress, the answer is always
//! [`Decision::GiveUp`].

/// The default deadline: a wrong address (nothing listening) fails within about 30 s.
pub const RETRY_DEADLINE_DEFAULT_MS: u64 = 30_000;

/// How a source retries transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total time spent retrying without progress before the copy fails.
    pub deadline_ms: u64,
    /// The first back-off; each failure without progress adds as much again.
    pub backoff_step_ms: u64,
    /// The longest back-off.
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { deadline_ms: RETRY_DEADLINE_DEFAULT_MS, backoff_step_ms: 250, backoff_max_ms: 2_000 }
    }
}

impl RetryPolicy {
    /// The default policy with another deadline.
    pub fn with_deadline_ms(deadline_ms: u64) -> Self {
        Self { deadline_ms, ..Self::default() }
    }
}

/// What to do after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then try again.
    RetryAfterMs(u64),
    /// The deadline passed without progress: fail, after this much time spent retrying.
    GiveUp { waited_ms: u64 },
}

/// The retry state of one copy.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: RetryPolicy,
    /// When the window without progress began (the start, or the last attempt that moved).
    since_ms: u64,
    /// Failures without progress since `since_ms`.
    failures_count: u64,
}

impl Retries {
    pub fn new(policy: RetryPolicy, now_ms: u64) -> Self {
        Self { policy, since_ms: now_ms, failures_count: 0 }
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// How long the next attempt may wait for its handshake: `cap_ms`, or less when the
    /// deadline is nearer (never 0, so an attempt can still be made and fail by itself).
    pub fn attempt_budget_ms(&self, now_ms: u64, cap_ms: u64) -> u64 {
        let left = self.deadline_at_ms().saturating_sub(now_ms);
        cap_ms.min(left).max(1)
    }

    /// A transient failure happened at `now_ms`; `progressed`: the failed attempt moved the
    /// copy forward (bytes arrived), which opens a new deadline window.
    pub fn failed(&mut self, now_ms: u64, progressed: bool) -> Decision {
        if progressed {
            self.since_ms = now_ms;
            self.failures_count = 0;
        }
        self.failures_count = self.failures_count.saturating_add(1);
        let left = self.deadline_at_ms().saturating_sub(now_ms);
        if left == 0 {
            return Decision::GiveUp { waited_ms: now_ms.saturating_sub(self.since_ms) };
        }
        let backoff = self.policy.backoff_step_ms.saturating_mul(self.failures_count).min(self.policy.backoff_max_ms);
        Decision::RetryAfterMs(backoff.min(left))
    }

    fn deadline_at_ms(&self) -> u64 {
        self.since_ms.saturating_add(self.policy.deadline_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_deadline_is_30_s() {
        assert_eq!(RetryPolicy::default().deadline_ms, 30_000);
        assert_eq!(RetryPolicy::with_deadline_ms(2_000).backoff_max_ms, RetryPolicy::default().backoff_max_ms);
    }

    #[test]
    fn backs_off_then_gives_up_at_the_deadline() {
        let mut retries = Retries::new(RetryPolicy::default(), 1_000);
        assert_eq!(retries.attempt_budget_ms(1_000, 15_000), 15_000);
        // A handshake that timed out after 15 s, twice: the second attempt gets what is left.
        assert_eq!(retries.failed(16_000, false), Decision::RetryAfterMs(250));
        assert_eq!(retries.attempt_budget_ms(16_250, 15_000), 14_750);
        assert_eq!(retries.failed(31_000, false), Decision::GiveUp { waited_ms: 30_000 });
        assert_eq!(retries.failed(40_000, false), Decision::GiveUp { waited_ms: 39_000 });
        assert_eq!(retries.attempt_budget_ms(40_000, 15_000), 1, "never a zero budget");
    }

    #[test]
    fn the_back_off_grows_to_its_cap_and_never_passes_the_deadline() {
        let mut retries = Retries::new(RetryPolicy::default(), 0);
        let waits: Vec<_> = (1..=10).map(|i| retries.failed(i, false)).collect();
        assert_eq!(waits[0], Decision::RetryAfterMs(250));
        assert_eq!(waits[3], Decision::RetryAfterMs(1_000));
        assert_eq!(waits[9], Decision::RetryAfterMs(2_000));
        assert_eq!(retries.failed(29_900, false), Decision::RetryAfterMs(100));
    }

    #[test]
    fn progress_opens_a_new_window() {
        let mut retries = Retries::new(RetryPolicy::with_deadline_ms(1_000), 0);
        assert_eq!(retries.failed(900, false), Decision::RetryAfterMs(100));
        // The next attempt moved bytes before it failed: a fresh deadline and back-off.
        assert_eq!(retries.failed(5_000, true), Decision::RetryAfterMs(250));
        assert_eq!(retries.failed(5_900, false), Decision::RetryAfterMs(100));
        assert_eq!(retries.failed(6_000, false), Decision::GiveUp { waited_ms: 1_000 });
    }
}
