//! ferry-engine: everything in ferry that touches the operating system.
//!
//! What it does: owns every syscall, socket, thread and clock. It reads segment files (io_uring,
//! mmap, pread), runs the QUIC transport (quinn + rustls), writes the target's staging through
//! the [`storage`] seam, tails WALs, and hosts the `ferry` daemon and CLI. It feeds bytes and
//! time into the sans-IO machines of `ferry-wire` and executes the actions they return.
//!
//! What it does not: define formats or protocol rules. Those live in `ferry-wire`, so they can
//! be tested without I/O. Nor host the reference node (the database stand-in and the verifier
//! of `ferry demo`): that is `ferry-refnode`, which the engine uses and which never uses the
//! engine back. Test fakes (`FakeStorage`, the in-memory chunk lanes, dropping a target's
//! connections on purpose) are built only for tests and with the `testkit` feature.
//!
//! Invariants: `unsafe` is confined to the reader module (io_uring submission and mmap) and
//! [`priority`] (three scheduling syscalls on the calling thread), each block with a
//! `// SAFETY:` line. A failed write or fsync fails the transfer; it is never
//! retried.

pub mod certs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod failpoint;
pub mod inline;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod priority;
pub mod quic;
pub mod read;
pub mod snapshot;
pub mod staging;
pub mod storage;
pub mod tls;
pub mod transfer;
pub mod wal;
