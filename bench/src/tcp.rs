//! A plain TCP copy on loopback: the floor of what any copy costs, without TLS or checksums.
//!
//! What it does: a sender thread reads each shard file with `read` into a 1 MiB buffer and
//! `write_all`s it to a `std::net::TcpStream` on 127.0.0.1, each file preceded by a small
//! header; a receiver thread `read`s from the socket and writes each file into a folder on the
//! staging file system (the same file system ferry stages on), without fsync.
//!
//! Wire shape (little endian), per file: `name_len: u32`, `name`, `size_bytes: u64`, then
//! `size_bytes` bytes; the sender closes the socket after the last file.
//!
//! What it does not: encrypt, checksum, fsync or use `splice`/`sendfile` (both sides copy
//! through user space, as ferry does).
//!
//! Timing: from before connecting until the receiver has written every byte.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::shard::Shard;
use crate::RunResult;

const BUFFER_BYTES: usize = 1 << 20;
/// Longest file name the receiver accepts.
const NAME_LEN_MAX_BYTES: u32 = 4096;

/// Copies every file of `shard` into `target_dir` over TCP on loopback.
pub fn tcp_copy(shard: &Shard, target_dir: &Path) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(target_dir)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let target = target_dir.to_path_buf();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (stream, _) = listener.accept()?;
        receive(stream, &target)
    });
    let sent = send(TcpStream::connect(addr)?, shard);
    let received = receiver.join().map_err(|_| anyhow::anyhow!("the tcp receiver thread panicked"))??;
    let elapsed = started.elapsed();
    let sent = sent?;
    anyhow::ensure!(received == sent, "the tcp receiver wrote {received} bytes, {sent} were sent");
    Ok(RunResult { bytes_total: received, elapsed })
}

fn send(mut stream: TcpStream, shard: &Shard) -> anyhow::Result<u64> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut sent = 0u64;
    for file in &shard.files {
        let name = file.rel.as_bytes();
        let name_len = u32::try_from(name.len()).context("file name too long")?;
        stream.write_all(&name_len.to_le_bytes())?;
        stream.write_all(name)?;
        stream.write_all(&file.size_bytes.to_le_bytes())?;
        let mut source = File::open(&file.path).with_context(|| format!("cannot open {}", file.path.display()))?;
        let mut left = file.size_bytes;
        while left > 0 {
            let n = source.read(&mut buf)?;
            anyhow::ensure!(n > 0, "{} shrank while it was sent", file.path.display());
            let n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
            stream.write_all(buf.get(..n).context("read past the buffer")?)?;
            left -= n as u64;
            sent += n as u64;
        }
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

fn receive(mut stream: TcpStream, target: &Path) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut received = 0u64;
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(received),
            Err(e) => return Err(e.into()),
        }
        let name_len = u32::from_le_bytes(len);
        anyhow::ensure!(name_len <= NAME_LEN_MAX_BYTES, "file name of {name_len} bytes is over the limit");
        let mut name = vec![0u8; name_len as usize];
        stream.read_exact(&mut name)?;
        let name = String::from_utf8(name).context("file name is not UTF-8")?;
        anyhow::ensure!(!name.contains('/') && name != ".." && !name.is_empty(), "unsafe file name {name:?}");
        let mut size = [0u8; 8];
        stream.read_exact(&mut size)?;
        let mut left = u64::from_le_bytes(size);
        let path: PathBuf = target.join(&name);
        let mut out = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        while left > 0 {
            let want = usize::try_from(left.min(BUFFER_BYTES as u64)).unwrap_or(BUFFER_BYTES);
            let n = stream.read(buf.get_mut(..want).context("buffer")?)?;
            anyhow::ensure!(n > 0, "the sender closed inside {name}");
            out.write_all(buf.get(..n).context("buffer")?)?;
            left -= n as u64;
            received += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_arrive_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let shard = Shard::generate(dir.path(), (2 << 20) + 5, 2, 9).unwrap();
        let out = dir.path().join("out");
        let run = tcp_copy(&shard, &out).unwrap();
        assert_eq!(run.bytes_total, shard.size_bytes);
        for file in &shard.files {
            assert_eq!(std::fs::read(out.join(&file.rel)).unwrap(), std::fs::read(&file.path).unwrap());
        }
    }
}
