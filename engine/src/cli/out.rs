//! What the commands print on stdout and stderr, written so that a reader that went away is
//! not a crash.
//!
//! What it does: [`outln!`] and [`out!`] write to stdout; when the reader closed its end
//! (`ferry status ID | head -1`: `EPIPE`), the text is dropped, stdout is marked closed and
//! later writes are skipped, so the command ends as it would have, with its usual exit status
//! and no message. Any other write error (a full disk behind a redirect) is returned.
//! [`errln!`] writes to stderr and ignores every error: it carries progress, warnings and the
//! final error, and there is nobody left to tell when stderr itself is gone.
//!
//! What it does not: install a SIGPIPE handler (that would need `unsafe`); Rust ignores SIGPIPE,
//! so a closed pipe is an `EPIPE` write error, handled here.
//!
//! Invariants: nothing here panics; `println!`/`eprintln!` (which panic on a failed write) are
//! not used by the commands.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout met a reader that went away.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes a line to stdout: `outln!("{x}")?`. A closed reader is not an error.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out::stdout_text(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes text to stdout without a newline: `out!("{text}")?`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::stdout_text(format_args!($($arg)*))
    };
}

/// Writes a line to stderr, ignoring every error.
macro_rules! errln {
    () => {
        $crate::cli::out::stderr_text(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::stderr_text(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {errln, out, outln};

/// `true` once stdout's reader went away: a command that would only go on printing (a
/// `--watch`) stops.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Whether `e` says the reader of the stream went away.
pub fn is_closed_reader(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Writes to stdout (see the module docs); the error says it was stdout that failed.
pub fn stdout_text(args: fmt::Arguments<'_>) -> io::Result<()> {
    write_quietly(&mut io::stdout().lock(), &STDOUT_CLOSED, args)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write to stdout: {e}")))
}

/// Writes to stderr; errors are ignored (see the module docs).
pub fn stderr_text(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.flush();
}

/// Writes and flushes `args`, unless `closed`; a closed reader sets `closed` and is `Ok`.
fn write_quietly(out: &mut impl Write, closed: &AtomicBool, args: fmt::Arguments<'_>) -> io::Result<()> {
    if closed.load(Ordering::Relaxed) {
        return Ok(());
    }
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Err(e) if is_closed_reader(&e) => {
            closed.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A pipe whose reader is gone after `open_bytes` bytes, or a disk that is full.
    struct Sink {
        written: Vec<u8>,
        open_bytes: usize,
        kind: io::ErrorKind,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.written.len() + buf.len() > self.open_bytes {
                return Err(io::Error::from(self.kind));
            }
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_went_away_is_not_an_error_and_later_writes_are_skipped() {
        let closed = AtomicBool::new(false);
        let mut pipe = Sink { written: Vec::new(), open_bytes: 6, kind: io::ErrorKind::BrokenPipe };
        write_quietly(&mut pipe, &closed, format_args!("line1\n")).unwrap();
        assert!(!closed.load(Ordering::Relaxed));
        write_quietly(&mut pipe, &closed, format_args!("line2\n")).unwrap();
        assert!(closed.load(Ordering::Relaxed), "EPIPE marks stdout closed");
        pipe.open_bytes = usize::MAX;
        write_quietly(&mut pipe, &closed, format_args!("line3\n")).unwrap();
        assert_eq!(pipe.written, b"line1\n", "nothing is written once the reader went away");
    }

    #[test]
    fn other_write_errors_are_reported() {
        let closed = AtomicBool::new(false);
        let mut full = Sink { written: Vec::new(), open_bytes: 0, kind: io::ErrorKind::StorageFull };
        let err = write_quietly(&mut full, &closed, format_args!("x\n")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(!closed.load(Ordering::Relaxed));
    }
}
