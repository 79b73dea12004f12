//! Short blocking work on the latency-critical path, run without a thread hop.
//!
//! What it does: [`run`] runs a closure that blocks briefly (a MANIFEST commit, a staged WAL
//! group's write and fdatasync) on the calling thread with `block_in_place` on a multi-thread
//! runtime: the worker's other tasks move to another thread meanwhile, and the caller goes on
//! without waiting to be woken. Elsewhere (a current-thread runtime, as in some tests) it runs
//! the closure on the blocking pool.
//!
//! What it does not: run long work (a whole file's checksum, a snapshot): that goes to the
//! blocking pool, where it does not hold a worker thread's place.
//!
//! Why: on this kind of host a thread wake-up costs about 25 us (a pipe round trip between two
//! threads takes 47 to 50 us, `perf bench sched pipe`), and a trip through the blocking pool
//! costs two of them. The cut-over's pause crosses threads about ten times.
//!
//! Invariants: the closure runs exactly once, and its result comes back to the caller.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f` on this thread when the runtime allows it, else on the blocking pool.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, tokio::task::JoinError> {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => Ok(tokio::task::block_in_place(f)),
        _ => tokio::task::spawn_blocking(f).await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_this_thread_in_a_multi_thread_runtime() {
        let here = std::thread::current().id();
        let ran_on = run(move || std::thread::current().id()).await.unwrap();
        assert_eq!(ran_on, here);
    }

    #[tokio::test]
    async fn runs_on_the_blocking_pool_in_a_current_thread_runtime() {
        let here = std::thread::current().id();
        let ran_on = run(move || std::thread::current().id()).await.unwrap();
        assert_ne!(ran_on, here);
    }
}
