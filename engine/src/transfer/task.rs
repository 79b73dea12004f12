//! Task ownership: a spawned task that does not outlive what spawned it.
//!
//! What it does: [`AbortOnDrop`] aborts its task when dropped, so a transfer's helper tasks
//! (control readers, chunk acceptors, WAL streams) end with the transfer, on every path.
//!
//! [`blocking`] runs blocking work (file I/O) on tokio's blocking pool.
//!
//! What it does not: wait for the task to finish; an aborted task stops at its next await.

use super::TransferError;

/// Aborts a task when dropped, so no task outlives the transfer that spawned it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `f` on the blocking pool; a task that panicked is a local failure.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))?
}
