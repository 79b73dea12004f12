//! Planted bugs: test-only switches that put known, fixed bugs back, so the simulator in
//! `tests/` can prove it finds them.
//!
//! What it does: [`planted`] says whether a bug is planted on this thread. Without the
//! `testkit` feature it is always false and nothing can plant one: a shipped build never
//! carries a planted bug.
//!
//! What it does not: change any behaviour by itself. Each site that can carry a bug checks
//! [`planted`] and names the bug in a comment.

/// A bug the simulator must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// An admitted offer becomes visible (`begin`) before its staging is found usable, so a
    /// refused re-copy leaves a phantom inbound migration holding an admission slot.
    PhantomMigration,
    /// `Inbounds::check_release` accepts a release of a staging that was never fenced.
    ReleaseFromCopying,
    /// The staged WAL reports a group of records durable (so the target acknowledges it with
    /// `WalDurable`) without its fdatasync: a power loss then loses acknowledged records.
    AckBeforeSync,
    /// The target answers a fence without waiting for its staged WAL to be durable up to the
    /// last record the source selected (`through_lsn`): the flush the fence's answer stands
    /// on, the only one on its path.
    FenceWithoutWalWait,
}

#[cfg(feature = "testkit")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<Bug>> = const { std::cell::Cell::new(None) };
}

/// Whether `bug` is planted on this thread.
pub fn planted(bug: Bug) -> bool {
    #[cfg(feature = "testkit")]
    {
        PLANTED.with(|p| p.get() == Some(bug))
    }
    #[cfg(not(feature = "testkit"))]
    {
        let _ = bug;
        false
    }
}

/// Plants `bug` (or none) on this thread, for the simulator's planted-bug tests.
#[cfg(feature = "testkit")]
pub fn plant(bug: Option<Bug>) {
    PLANTED.with(|p| p.set(bug));
}
