//! Append notices: wakes a WAL tailer soon after anything is written to the WAL folder.
//!
//! What it does: [`AppendNotice::watch`] puts an inotify watch on a folder (writes to its
//! files, files created or moved in) and [`AppendNotice::wait`] returns as soon as one of
//! those happened since the previous wait, or when the timeout passes, whichever is first,
//! saying whether a file was created or moved in ([`Noticed::created`]: a tailer that reads
//! through links of its own links the new segment now, not at its next periodic listing).
//! A tailer polls its [`FolderTail`](super::tail::FolderTail) until it has nothing more, then
//! waits here: an append is noticed within tens of microseconds instead of the poll period.
//!
//! What it does not: say what changed (the tailer re-reads and its cursor decides), or
//! guarantee a notice: writes through a shared mmap raise no inotify event, a watch can fail
//! (no inotify, too many watches) and the event queue can overflow. So the timeout stays the
//! tailer's poll period, and without a watch `wait` is a plain sleep of the timeout.
//!
//! Invariants: no notice is lost between a tailer's last read and its wait: the watch exists
//! before the first wait, events queue in the kernel until read, and a wait first drains
//! what is queued and returns at once if anything was. A spurious wake-up costs one poll.
//! No `unsafe` here (inotify and its event records through rustix, the timed wait through
//! mio).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

/// Bytes read from the inotify queue at a time (each read holds whole events).
const DRAIN_BUF_BYTES: usize = 4096;

/// What a wait saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Noticed {
    /// Something was written to the folder.
    pub written: bool,
    /// A file was created or moved into the folder, or events were lost (the queue
    /// overflowed): list the folder again now.
    pub created: bool,
}

/// Wakes a tailer when its WAL folder is written to. See the module docs.
#[derive(Debug)]
pub struct AppendNotice {
    watch: Option<Watch>,
}

#[derive(Debug)]
struct Watch {
    fd: OwnedFd,
    poll: Poll,
    events: Events,
    buf: Box<[MaybeUninit<u8>; DRAIN_BUF_BYTES]>,
}

impl AppendNotice {
    /// Watches `dir`. When inotify is not available the notice sleeps instead; the error
    /// says why (log it, nothing else changes).
    pub fn watch(dir: &Path) -> (AppendNotice, Option<io::Error>) {
        match Watch::new(dir) {
            Ok(watch) => (AppendNotice { watch: Some(watch) }, None),
            Err(e) => (AppendNotice::sleeping(), Some(e)),
        }
    }

    /// A notice that never fires: every wait sleeps its whole timeout (the plain poll).
    pub fn sleeping() -> AppendNotice {
        AppendNotice { watch: None }
    }

    /// Whether writes wake the waiter (else waits are sleeps).
    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Returns once the folder was written to since the last wait, or after `timeout`, with
    /// what it saw. A failing watch is dropped (waits become sleeps) and its error returned,
    /// once.
    pub fn wait(&mut self, timeout: Duration) -> Result<Noticed, io::Error> {
        let Some(watch) = self.watch.as_mut() else {
            std::thread::sleep(timeout);
            return Ok(Noticed::default());
        };
        match watch.wait(timeout) {
            Ok(noticed) => Ok(noticed),
            Err(e) => {
                self.watch = None;
                Err(e)
            }
        }
    }
}

impl Watch {
    fn new(dir: &Path) -> io::Result<Watch> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        inotify::add_watch(&fd, dir, WatchFlags::MODIFY | WatchFlags::CREATE | WatchFlags::MOVED_TO)?;
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&fd.as_raw_fd()), Token(0), Interest::READABLE)?;
        Ok(Watch {
            fd,
            poll,
            events: Events::with_capacity(4),
            buf: Box::new([MaybeUninit::uninit(); DRAIN_BUF_BYTES]),
        })
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<Noticed> {
        // mio registers edge-triggered: the queue is always drained before sleeping, so a
        // new event is a new edge.
        let queued = self.drain()?;
        if queued.written || queued.created {
            return Ok(queued);
        }
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.drain()
    }

    /// Reads every queued event; what they say.
    fn drain(&mut self) -> io::Result<Noticed> {
        let mut noticed = Noticed::default();
        let mut reader = inotify::Reader::new(&self.fd, &mut self.buf[..]);
        loop {
            match reader.next() {
                Ok(event) => {
                    let flags = event.events();
                    noticed.written |= flags.contains(ReadFlags::MODIFY);
                    noticed.created |=
                        flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO | ReadFlags::QUEUE_OVERFLOW);
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(noticed),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    /// A write made before the wait is not lost (it is queued), and a wait with nothing
    /// written returns after its timeout. No timing is asserted beyond "it returned".
    #[test]
    fn a_write_before_the_wait_is_noticed_and_an_idle_wait_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (mut notice, err) = AppendNotice::watch(dir.path());
        if let Some(e) = err {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI has inotify, and a test does not skip there: {e}"
            );
            eprintln!("SKIPPED: no inotify here: {e}");
            return;
        }
        assert!(notice.is_watching());
        let mut file = std::fs::File::create(dir.path().join("wal-00000000000000000001.seg")).unwrap();
        file.write_all(b"x").unwrap();
        // Drains the create and the write; then nothing is queued.
        let noticed = notice.wait(Duration::from_secs(3600)).unwrap();
        assert_eq!(noticed, Noticed { written: true, created: true });
        let watch = notice.watch.as_mut().unwrap();
        assert_eq!(watch.drain().unwrap(), Noticed::default(), "the wait left events queued");
        file.write_all(b"y").unwrap();
        assert_eq!(watch.drain().unwrap(), Noticed { written: true, created: false }, "a write raised no event");
        // A file moved in is a new file too.
        std::fs::write(dir.path().join(".wal-00000000000000000009.tmp"), b"z").unwrap();
        watch.drain().unwrap();
        std::fs::rename(
            dir.path().join(".wal-00000000000000000009.tmp"),
            dir.path().join("wal-00000000000000000009.seg"),
        )
        .unwrap();
        assert_eq!(watch.drain().unwrap(), Noticed { written: false, created: true });
        assert_eq!(notice.wait(Duration::from_millis(1)).unwrap(), Noticed::default());
    }

    /// A write from another thread wakes a waiter that would otherwise wait an hour.
    #[test]
    fn a_write_wakes_a_long_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (mut notice, err) = AppendNotice::watch(dir.path());
        if let Some(e) = err {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI has inotify, and a test does not skip there: {e}"
            );
            eprintln!("SKIPPED: no inotify here: {e}");
            return;
        }
        let path = dir.path().join("wal-00000000000000000001.seg");
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            notice.wait(Duration::from_secs(3600)).unwrap();
            done_tx.send(()).unwrap();
        });
        // Keep writing until the waiter is woken (it may start waiting after a write).
        // A waiter never woken fails the test after 600 writes instead of hanging for an hour.
        let mut file = std::fs::File::create(&path).unwrap();
        let woken = (0..600).any(|_| {
            file.write_all(b"x").unwrap();
            done_rx.recv_timeout(Duration::from_millis(50)).is_ok()
        });
        assert!(woken, "600 writes did not wake the waiter");
        waiter.join().unwrap();
    }

    #[test]
    fn without_a_watch_a_wait_sleeps() {
        let mut notice = AppendNotice::sleeping();
        assert!(!notice.is_watching());
        assert_eq!(notice.wait(Duration::from_millis(1)).unwrap(), Noticed::default());
        let (notice, err) = AppendNotice::watch(Path::new("/nonexistent/ferry/wal"));
        assert!(err.is_some() && !notice.is_watching());
    }
}
