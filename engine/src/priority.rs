//! Bulk work below the database: the CPU and I/O priority of the threads that move a base
//! copy's chunks, and the pool of threads they run on.
//!
//! What it does: [`BulkPriority`] names what the bulk threads get (CPU: `SCHED_IDLE`, or
//! `SCHED_BATCH` at nice 10, or nothing; I/O: `IOPRIO_CLASS_IDLE`, or best-effort level 7, or
//! nothing). [`lower_this_thread`] applies it to the calling thread; [`bulk_runtime`] gives the
//! process's tokio runtime for bulk work at a priority (created on first use, its worker and
//! blocking threads lowered as they start). The source runs its chunk connections (their QUIC
//! endpoints, so packet encryption and UDP sends) and its chunk streams (reads, CRC32C) there,
//! and its io_uring reader threads lower themselves; the control stream, the WAL stream and the
//! fence stay on the daemon's runtime at the daemon's priority.
//!
//! What it does not: raise anything, or need a privilege. Every mechanism here is one an
//! unprivileged process may use on its own threads (a higher nice, `SCHED_BATCH`,
//! `SCHED_IDLE`, the idle or a lower best-effort I/O class). Where one is refused anyway (a
//! seccomp filter, a container runtime), the thread keeps what it has, the refusal is logged
//! once per mechanism, and the copy goes on. Nor does it lower the target's receiving side
//! (its chunk streams still share its one endpoint and its blocking pool with the WAL and the
//! fence).
//!
//! Notes: `SCHED_IDLE` threads run only when no other thread wants the core, and a waking
//! normal thread preempts them at once: the database's writer does not wait behind a chunk,
//! and a node with spare cores copies at full speed. On a core the database keeps busy, the
//! copy slows down to what is left (by design). I/O classes act only under an I/O scheduler
//! that honours them (BFQ fully; mq-deadline its classes since Linux 5.14); under `none` (the
//! usual NVMe default) they do nothing, and a page-cache hit (mmap reads of hot files) does
//! no I/O to prioritise.
//!
//! Invariants: the runtimes made here live until the process exits (at most one per distinct
//! setting); `unsafe` here is three syscalls on the calling thread, each with a `// SAFETY:`
//! line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

/// The CPU side of [`BulkPriority`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuPriority {
    /// `SCHED_IDLE`: run only on a core nothing else wants.
    #[default]
    Idle,
    /// `SCHED_BATCH` at nice 10: never preempts on wake-up, a small share against busy threads.
    Batch,
    /// The daemon's own priority.
    Normal,
}

/// The I/O side of [`BulkPriority`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoPriority {
    /// `IOPRIO_CLASS_IDLE`: disk time only when nobody else asks.
    #[default]
    Idle,
    /// Best effort, level 7 (the lowest).
    Low,
    /// The daemon's own class.
    Normal,
}

/// What the threads of bulk work get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BulkPriority {
    pub cpu: CpuPriority,
    pub io: IoPriority,
}

impl BulkPriority {
    /// Nothing lowered: bulk threads run like the daemon's own.
    pub const NORMAL: Self = Self { cpu: CpuPriority::Normal, io: IoPriority::Normal };

    pub fn is_normal(&self) -> bool {
        *self == Self::NORMAL
    }
}

impl CpuPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Batch => "batch",
            Self::Normal => "normal",
        }
    }
}

impl IoPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Low => "low",
            Self::Normal => "normal",
        }
    }
}

/// The nice value of [`CpuPriority::Batch`] threads (and the fallback of a refused
/// `SCHED_IDLE`).
pub const BULK_NICE: i32 = 10;

/// One refusal is logged per mechanism, not per thread.
static SCHED_REFUSED: AtomicBool = AtomicBool::new(false);
static NICE_REFUSED: AtomicBool = AtomicBool::new(false);
static IOPRIO_REFUSED: AtomicBool = AtomicBool::new(false);

/// What [`lower_this_thread`] managed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lowered {
    /// The scheduling policy was set (`SCHED_IDLE` or `SCHED_BATCH`).
    pub policy: bool,
    /// The nice value was raised.
    pub nice: bool,
    /// The I/O class was set.
    pub io: bool,
}

fn refused(flag: &AtomicBool, what: &str, e: &std::io::Error) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("bulk threads keep the daemon's priority: {what} was refused ({e}); the copy goes on at normal priority for it");
    }
}

/// Lowers the calling thread to `priority` (see the module docs); each refused mechanism is
/// logged once per process and skipped, never fatal.
pub fn lower_this_thread(priority: BulkPriority) -> Lowered {
    let mut lowered = Lowered::default();
    match priority.cpu {
        CpuPriority::Normal => {}
        CpuPriority::Idle => match set_policy(libc::SCHED_IDLE) {
            Ok(()) => lowered.policy = true,
            Err(e) => {
                refused(&SCHED_REFUSED, "SCHED_IDLE", &e);
                // The next best thing an unprivileged thread may do.
                lowered.nice = raise_nice(BULK_NICE);
            }
        },
        CpuPriority::Batch => {
            match set_policy(libc::SCHED_BATCH) {
                Ok(()) => lowered.policy = true,
                Err(e) => refused(&SCHED_REFUSED, "SCHED_BATCH", &e),
            }
            lowered.nice = raise_nice(BULK_NICE);
        }
    }
    let io = match priority.io {
        IoPriority::Normal => None,
        IoPriority::Idle => Some((IOPRIO_CLASS_IDLE, 0)),
        IoPriority::Low => Some((IOPRIO_CLASS_BE, 7)),
    };
    if let Some((class, level)) = io {
        match set_ioprio(class, level) {
            Ok(()) => lowered.io = true,
            Err(e) => refused(&IOPRIO_REFUSED, "the I/O priority (ioprio_set)", &e),
        }
    }
    lowered
}

fn raise_nice(nice: i32) -> bool {
    match set_nice(nice) {
        Ok(()) => true,
        Err(e) => {
            refused(&NICE_REFUSED, "a higher nice value", &e);
            false
        }
    }
}

const IOPRIO_CLASS_BE: i32 = 2;
const IOPRIO_CLASS_IDLE: i32 = 3;
const IOPRIO_CLASS_SHIFT: i32 = 13;
const IOPRIO_WHO_PROCESS: i32 = 1;

fn check(rc: libc::c_long) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `sched_setscheduler(0, policy)` on the calling thread (priority 0, as both policies need).
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    check(libc::c_long::from(rc))
}

/// `setpriority(PRIO_PROCESS, 0, nice)`: on Linux, the calling thread's nice value only.
fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain syscall on the calling thread (who = 0); no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    check(libc::c_long::from(rc))
}

/// `ioprio_set(IOPRIO_WHO_PROCESS, 0, class | level)`: the calling thread's I/O priority.
fn set_ioprio(class: i32, level: i32) -> std::io::Result<()> {
    let value = (class << IOPRIO_CLASS_SHIFT) | level;
    // SAFETY: ioprio_set takes three integers (who = 0: the calling thread); no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) };
    check(rc)
}

/// The threads of bulk work: how many, and at what priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BulkThreads {
    /// Worker threads of the bulk runtime; 0: bulk work runs on the daemon's own runtime (and
    /// only the io_uring reader threads are lowered).
    pub count: usize,
    pub priority: BulkPriority,
}

impl Default for BulkThreads {
    fn default() -> Self {
        Self { count: BULK_THREADS_DEFAULT_COUNT, priority: BulkPriority::default() }
    }
}

/// Two: enough to keep a copy at full speed on the cores a source can spare.
pub const BULK_THREADS_DEFAULT_COUNT: usize = 2;
/// The most bulk threads a setting may ask for.
pub const BULK_THREADS_MAX_COUNT: usize = 64;

/// Runtimes made so far, one per setting (a process may run several nodes: the demo, tests).
static RUNTIMES: OnceLock<Mutex<Vec<(BulkThreads, &'static tokio::runtime::Runtime)>>> = OnceLock::new();

/// The bulk runtime of `threads` (`None` when `threads.count` is 0, or when it cannot be
/// started: bulk work then runs on the caller's runtime, said once in the log).
pub fn bulk_runtime(threads: BulkThreads) -> Option<tokio::runtime::Handle> {
    if threads.count == 0 {
        return None;
    }
    let threads = BulkThreads { count: threads.count.min(BULK_THREADS_MAX_COUNT), ..threads };
    let mut made = RUNTIMES.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, runtime)) = made.iter().find(|(t, _)| *t == threads) {
        return Some(runtime.handle().clone());
    }
    let priority = threads.priority;
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.count)
        .thread_name("ferry-bulk")
        .on_thread_start(move || {
            lower_this_thread(priority);
        })
        .enable_all()
        .build();
    match built {
        Ok(runtime) => {
            // Lives until the process exits: a runtime may not be dropped inside another one,
            // and copies hold its handle.
            let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(runtime));
            made.push((threads, runtime));
            Some(runtime.handle().clone())
        }
        Err(e) => {
            tracing::warn!("cannot start the bulk threads ({e}); chunks go out on the daemon's own threads");
            None
        }
    }
}

/// The calling thread's scheduling policy, nice value and I/O priority (`ioprio_get`), for
/// tests and diagnostics.
pub fn this_thread_priority() -> (libc::c_int, i32, i32) {
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    let policy = unsafe { libc::sched_getscheduler(0) };
    // SAFETY: as above. getpriority returns the nice value (-1 is also a valid value; the
    // caller only compares).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // SAFETY: ioprio_get takes two integers; no memory is passed.
    let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    (policy, nice, i32::try_from(ioprio).unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Runs `f` on a fresh thread (lowering is per thread and cannot be undone unprivileged).
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_thread_lowers_itself_to_each_setting() {
        let (lowered, (policy, nice, ioprio)) = on_thread(|| {
            let lowered = lower_this_thread(BulkPriority::default());
            (lowered, this_thread_priority())
        });
        assert_eq!(lowered, Lowered { policy: true, nice: false, io: true });
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(ioprio >> IOPRIO_CLASS_SHIFT, IOPRIO_CLASS_IDLE);
        let _ = nice;

        let (lowered, (policy, nice, ioprio)) = on_thread(|| {
            let lowered = lower_this_thread(BulkPriority { cpu: CpuPriority::Batch, io: IoPriority::Low });
            (lowered, this_thread_priority())
        });
        assert_eq!(lowered, Lowered { policy: true, nice: true, io: true });
        assert_eq!((policy, nice), (libc::SCHED_BATCH, BULK_NICE));
        assert_eq!((ioprio >> IOPRIO_CLASS_SHIFT, ioprio & 0xff), (IOPRIO_CLASS_BE, 7));

        let (lowered, before, after) = on_thread(|| {
            let before = this_thread_priority();
            (lower_this_thread(BulkPriority::NORMAL), before, this_thread_priority())
        });
        assert_eq!(lowered, Lowered::default());
        assert_eq!(before, after, "normal changes nothing");
    }

    #[test]
    fn the_bulk_runtime_runs_lowered_threads_and_is_made_once_per_setting() {
        let threads = BulkThreads { count: 1, priority: BulkPriority { cpu: CpuPriority::Batch, io: IoPriority::Low } };
        let handle = bulk_runtime(threads).unwrap();
        let (policy, nice, _) = std::thread::spawn(move || {
            handle.block_on(async { tokio::spawn(async { this_thread_priority() }).await.unwrap() })
        })
        .join()
        .unwrap();
        assert_eq!((policy, nice), (libc::SCHED_BATCH, BULK_NICE));
        let again = bulk_runtime(threads).unwrap();
        let made = RUNTIMES.get().unwrap().lock().unwrap().iter().filter(|(t, _)| *t == threads).count();
        assert_eq!(made, 1);
        drop(again);
        assert!(bulk_runtime(BulkThreads { count: 0, ..threads }).is_none());
    }
}
