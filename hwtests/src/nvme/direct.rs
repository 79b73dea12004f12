//! O_DIRECT reads with io_uring into registered buffers, aligned as `statx` says.
//!
//! What it does: [`alignment`] asks `statx` for `STATX_DIOALIGN` (Linux 6.1: the memory and
//! file-offset alignment O_DIRECT needs on this file) and falls back to the device's logical
//! block size when the file system reports none. [`read_direct`] reads a whole file through an
//! O_DIRECT descriptor with one ring of `queue_depth` entries, each read landing in one of
//! `queue_depth` buffers registered with the ring (`IORING_REGISTER_BUFFERS`, `READ_FIXED`): the
//! kernel pins them once instead of on every read. It can fold what it read into a CRC32C
//! (completions arrive out of order: each block's CRC is kept and the file's is combined in
//! order at the end). [`write_pattern`] writes a deterministic file and fsyncs it.
//!
//! What it does not: share the engine's reader. `ferry_engine::read::ReadMode::UringDirect`
//! aligns to a fixed 4096 bytes and submits plain `READ`s into its pooled buffers, without
//! registering them; this loop is the test's own, so that registered buffers and statx's
//! alignment are what is checked on the hardware.
//!
//! Invariants: every buffer the kernel may write into is owned by [`Buffers`], which lives
//! until every submitted read has completed ([`read_direct`] reaps them all, also on error);
//! `unsafe` is confined to the two blocks below, each with a `// SAFETY:` line.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use io_uring::{opcode, types, IoUring};

/// Buffers are aligned to a page at least, whatever `statx` allows: it is what fio does, and a
/// page boundary never costs the device anything.
const PAGE_BYTES: usize = 4096;
/// Queue depth allowed at most (the ring's entries).
pub const QUEUE_DEPTH_MAX: u32 = 1024;
/// Block size allowed at most (one registered buffer is at most 1 GiB; this is far below).
pub const BLOCK_LEN_MAX_BYTES: u32 = 64 << 20;
/// Memory of all buffers together, at most (queue depth x block size; all of it is pinned).
pub const BUFFERS_MAX_BYTES: u64 = 1 << 30;

/// O_DIRECT's alignment for one file, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Buffers must start at a multiple of this.
    pub mem_bytes: u32,
    /// File offsets and lengths must be multiples of this.
    pub offset_bytes: u32,
    /// `statx` (STATX_DIOALIGN) or the device's `queue/logical_block_size`.
    pub source: AlignmentSource,
}

/// Where an [`Alignment`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignmentSource {
    StatxDioAlign,
    LogicalBlockSize,
}

/// The alignment O_DIRECT needs on `path`: `statx`'s DIOALIGN when the file system reports it,
/// else `logical_block_size_bytes` (the device's), else an error.
pub fn alignment(path: &Path, logical_block_size_bytes: Option<u32>) -> anyhow::Result<Alignment> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let stat = statx(CWD, path, AtFlags::empty(), StatxFlags::DIOALIGN)
        .with_context(|| format!("statx(STATX_DIOALIGN) of {}", path.display()))?;
    let reported = StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::DIOALIGN);
    choose_alignment(reported, stat.stx_dio_mem_align, stat.stx_dio_offset_align, logical_block_size_bytes)
        .with_context(|| format!("O_DIRECT alignment of {}", path.display()))
}

/// The decision of [`alignment`], apart from the syscall.
pub fn choose_alignment(
    statx_reported: bool,
    dio_mem_align: u32,
    dio_offset_align: u32,
    logical_block_size_bytes: Option<u32>,
) -> anyhow::Result<Alignment> {
    if statx_reported && dio_mem_align > 0 && dio_offset_align > 0 {
        anyhow::ensure!(
            dio_mem_align.is_power_of_two() && dio_offset_align.is_power_of_two(),
            "statx reported odd DIOALIGN values (memory {dio_mem_align}, offset {dio_offset_align})"
        );
        return Ok(Alignment {
            mem_bytes: dio_mem_align,
            offset_bytes: dio_offset_align,
            source: AlignmentSource::StatxDioAlign,
        });
    }
    match logical_block_size_bytes {
        Some(lbs) if lbs > 0 && lbs.is_power_of_two() => {
            Ok(Alignment { mem_bytes: lbs, offset_bytes: lbs, source: AlignmentSource::LogicalBlockSize })
        }
        other => anyhow::bail!(
            "statx reports no DIOALIGN (kernel older than 6.1, or a file system without O_DIRECT) and the \
             device's logical block size is {other:?}"
        ),
    }
}

/// Queue depth and block size of a read run (fio's `--iodepth` and `--bs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadShape {
    pub queue_depth: u32,
    pub block_len_bytes: u32,
}

impl ReadShape {
    /// Checks the shape against its limits and the alignment.
    pub fn check(&self, align: &Alignment) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth),
            "queue depth {} is outside 1..={QUEUE_DEPTH_MAX}",
            self.queue_depth
        );
        anyhow::ensure!(
            (1..=BLOCK_LEN_MAX_BYTES).contains(&self.block_len_bytes),
            "block size {} is outside 1..={BLOCK_LEN_MAX_BYTES}",
            self.block_len_bytes
        );
        let buffers_bytes = u64::from(self.queue_depth) * u64::from(self.block_len_bytes);
        anyhow::ensure!(
            buffers_bytes <= BUFFERS_MAX_BYTES,
            "queue depth x block size is {buffers_bytes} bytes of pinned buffers, over {BUFFERS_MAX_BYTES}"
        );
        anyhow::ensure!(
            self.block_len_bytes.is_multiple_of(align.offset_bytes),
            "block size {} is not a multiple of the O_DIRECT offset alignment {}",
            self.block_len_bytes,
            align.offset_bytes
        );
        Ok(())
    }
}

/// What one [`read_direct`] run read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadRun {
    pub bytes: u64,
    pub elapsed: Duration,
    /// The file's CRC32C, when asked for.
    pub crc32c: Option<u32>,
}

impl ReadRun {
    pub fn bytes_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        }
    }
}

/// `queue_depth` buffers of `block_len_bytes` in one allocation, each aligned.
struct Buffers {
    memory: Vec<u8>,
    start: usize,
    block_len_bytes: usize,
    count: usize,
}

impl Buffers {
    fn new(count: usize, block_len_bytes: usize, align_bytes: usize) -> anyhow::Result<Self> {
        let align_bytes = align_bytes.max(PAGE_BYTES);
        // Each buffer is a multiple of the alignment apart, so all start aligned.
        let stride = block_len_bytes.next_multiple_of(align_bytes);
        let len = stride.checked_mul(count).and_then(|n| n.checked_add(align_bytes)).context("buffers too large")?;
        let memory = vec![0u8; len];
        let start = memory.as_ptr().align_offset(align_bytes);
        anyhow::ensure!(start < align_bytes, "cannot align a buffer to {align_bytes} bytes");
        Ok(Self { memory, start, block_len_bytes: stride, count })
    }

    fn iovecs(&mut self) -> Vec<libc::iovec> {
        let (start, stride) = (self.start, self.block_len_bytes);
        let base = self.memory.as_mut_ptr();
        (0..self.count)
            .map(|i| libc::iovec { iov_base: base.wrapping_add(start + i * stride).cast(), iov_len: stride })
            .collect()
    }

    fn slice(&self, index: usize, len: usize) -> Option<&[u8]> {
        let at = self.start + index * self.block_len_bytes;
        self.memory.get(at..at + len.min(self.block_len_bytes))
    }
}

/// One read in flight: which buffer, where in the file, how long.
#[derive(Debug, Clone, Copy)]
struct Slot {
    block_index: usize,
    offset_bytes: u64,
    len_bytes: u32,
}

/// Reads all of `path` with O_DIRECT io_uring `READ_FIXED`s into registered buffers; the file's
/// CRC32C too when `checksum` is set. The file's size must be a multiple of `align.offset_bytes`.
pub fn read_direct(path: &Path, shape: ReadShape, align: &Alignment, checksum: bool) -> anyhow::Result<ReadRun> {
    shape.check(align)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("cannot open {} with O_DIRECT", path.display()))?;
    let size_bytes = file.metadata()?.len();
    anyhow::ensure!(
        size_bytes.is_multiple_of(u64::from(align.offset_bytes)),
        "{} is {size_bytes} bytes, not a multiple of the O_DIRECT alignment {}",
        path.display(),
        align.offset_bytes
    );
    let depth = shape.queue_depth as usize;
    let block = u64::from(shape.block_len_bytes);
    let blocks_count = usize::try_from(size_bytes.div_ceil(block)).context("file too large")?;
    let mut buffers = Buffers::new(depth, shape.block_len_bytes as usize, align.mem_bytes as usize)?;
    let buf_indices: Vec<u16> = (0..depth).map(u16::try_from).collect::<Result<_, _>>().context("queue depth")?;
    let mut ring = IoUring::new(shape.queue_depth).context("cannot set up an io_uring")?;
    let iovecs = buffers.iovecs();
    // SAFETY: the iovecs point into `buffers.memory`, which outlives the ring's use of them:
    // every read is reaped before this function drops the ring and then the buffers (or the
    // buffers are leaked when reads could not be reaped).
    unsafe { ring.submitter().register_buffers(&iovecs) }
        .context("cannot register the read buffers with the ring (RLIMIT_MEMLOCK too low?)")?;
    let mut crcs: Vec<u32> = if checksum { vec![0; blocks_count] } else { Vec::new() };
    // Slot i is registered buffer i; a read's user_data is its slot.
    let mut slots: Vec<Option<Slot>> = vec![None; depth];
    let (mut next_block, mut in_flight, mut read_bytes) = (0usize, 0usize, 0u64);
    let mut failure: Option<anyhow::Error> = None;
    let started = Instant::now();
    loop {
        while failure.is_none() && in_flight < depth && next_block < blocks_count {
            let Some(index) = slots.iter().position(Option::is_none) else { break };
            let (Some(iovec), Some(&buf_index)) = (iovecs.get(index), buf_indices.get(index)) else { break };
            let offset_bytes = next_block as u64 * block;
            // At most one block: fits the u32 it came from.
            let len_bytes = u32::try_from(block.min(size_bytes - offset_bytes)).unwrap_or(shape.block_len_bytes);
            let sqe = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), iovec.iov_base.cast(), len_bytes, buf_index)
                .offset(offset_bytes)
                .build()
                .user_data(index as u64);
            // SAFETY: the read targets registered buffer `index` (free: its slot is empty) with
            // `len_bytes` <= its length, and `file` stays open; both outlive the read, which is
            // reaped below before either is dropped.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            if let Some(slot) = slots.get_mut(index) {
                *slot = Some(Slot { block_index: next_block, offset_bytes, len_bytes });
            }
            in_flight += 1;
            next_block += 1;
        }
        if in_flight == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // Nothing more can be reaped safely: leak the buffers rather than free memory
                // the kernel may still write into.
                std::mem::forget(buffers);
                return Err(e).context("io_uring_enter failed with reads in flight");
            }
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (user_data, result) in done {
            let index = usize::try_from(user_data).unwrap_or(usize::MAX);
            let Some(slot) = slots.get_mut(index).and_then(Option::take) else {
                failure.get_or_insert_with(|| anyhow::anyhow!("a completion for slot {user_data}, never submitted"));
                continue;
            };
            in_flight -= 1;
            if result < 0 {
                let err = std::io::Error::from_raw_os_error(-result);
                failure.get_or_insert_with(|| anyhow::anyhow!("O_DIRECT read at {} failed: {err}", slot.offset_bytes));
                continue;
            }
            if u32::try_from(result).ok() != Some(slot.len_bytes) {
                failure.get_or_insert_with(|| {
                    anyhow::anyhow!(
                        "short O_DIRECT read at {}: {result} of {} bytes",
                        slot.offset_bytes,
                        slot.len_bytes
                    )
                });
                continue;
            }
            read_bytes += u64::from(slot.len_bytes);
            if let (Some(crc), Some(bytes)) =
                (crcs.get_mut(slot.block_index), buffers.slice(index, slot.len_bytes as usize))
            {
                *crc = ferry_wire::crc32c(bytes);
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(failure) = failure {
        return Err(failure);
    }
    anyhow::ensure!(read_bytes == size_bytes, "read {read_bytes} of {size_bytes} bytes");
    let crc32c = checksum.then(|| combine(&crcs, block, size_bytes));
    drop(ring);
    drop(buffers);
    Ok(ReadRun { bytes: read_bytes, elapsed, crc32c })
}

/// The CRC32C of a file from its blocks' CRC32Cs, in order.
fn combine(crcs: &[u32], block: u64, size_bytes: u64) -> u32 {
    let mut crc = 0u32;
    for (index, block_crc) in crcs.iter().enumerate() {
        let start = index as u64 * block;
        let len = block.min(size_bytes.saturating_sub(start));
        crc = if index == 0 { *block_crc } else { ferry_wire::crc32c_combine(crc, *block_crc, len) };
    }
    crc
}

/// Writes `size_bytes` of a deterministic pattern (`seed` varies it) to `path`, fsyncs it and
/// returns the CRC32C of what was written.
pub fn write_pattern(path: &Path, size_bytes: u64, seed: u64) -> anyhow::Result<u32> {
    const PIECE_BYTES: usize = 1 << 20;
    let mut file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut crc = 0u32;
    let mut piece = vec![0u8; PIECE_BYTES];
    let mut at = 0u64;
    while at < size_bytes {
        let len = piece.len().min(usize::try_from(size_bytes - at).unwrap_or(usize::MAX));
        let Some(bytes) = piece.get_mut(..len) else { break };
        fill(bytes, at, seed);
        file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
        crc = ferry_wire::crc32c_append(crc, bytes);
        at += len as u64;
    }
    file.sync_all().with_context(|| format!("fsync of {} failed", path.display()))?;
    Ok(crc)
}

/// The pattern: each 8-byte word holds its file offset mixed with the seed, so a block read
/// from the wrong place never matches.
fn fill(bytes: &mut [u8], at: u64, seed: u64) {
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let word = (at + i as u64 * 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        let le = word.to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(le.get(..n).unwrap_or(&le));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn statx_alignment_wins_and_the_block_size_is_the_fallback() {
        let statx = choose_alignment(true, 4, 512, Some(4096)).unwrap();
        assert_eq!(statx, Alignment { mem_bytes: 4, offset_bytes: 512, source: AlignmentSource::StatxDioAlign });
        // The file system reports 0 (or the kernel does not know DIOALIGN): the device's size.
        for (reported, mem, offset) in [(true, 0, 0), (false, 4, 512), (true, 4, 0)] {
            let fallback = choose_alignment(reported, mem, offset, Some(4096)).unwrap();
            assert_eq!(fallback.source, AlignmentSource::LogicalBlockSize);
            assert_eq!((fallback.mem_bytes, fallback.offset_bytes), (4096, 4096));
        }
        assert!(choose_alignment(false, 0, 0, None).is_err());
        assert!(choose_alignment(false, 0, 0, Some(1000)).is_err(), "not a power of two");
        assert!(choose_alignment(true, 3, 512, None).is_err(), "not a power of two");
    }

    #[test]
    fn shapes_are_checked_against_limits_and_alignment() {
        let align = choose_alignment(true, 512, 512, None).unwrap();
        assert!(ReadShape { queue_depth: 8, block_len_bytes: 1 << 20 }.check(&align).is_ok());
        assert!(ReadShape { queue_depth: 0, block_len_bytes: 1 << 20 }.check(&align).is_err());
        assert!(ReadShape { queue_depth: 2000, block_len_bytes: 1 << 20 }.check(&align).is_err());
        assert!(ReadShape { queue_depth: 8, block_len_bytes: 1000 }.check(&align).is_err());
        assert!(ReadShape { queue_depth: 8, block_len_bytes: 128 << 20 }.check(&align).is_err());
        assert!(ReadShape { queue_depth: 1024, block_len_bytes: 64 << 20 }.check(&align).is_err(), "64 GiB pinned");
        assert!(ReadShape { queue_depth: 16, block_len_bytes: 64 << 20 }.check(&align).is_ok());
    }

    #[test]
    fn block_crcs_combine_into_the_files() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let crcs: Vec<u32> = data.chunks(4096).map(ferry_wire::crc32c).collect();
        assert_eq!(combine(&crcs, 4096, data.len() as u64), ferry_wire::crc32c(&data));
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        fill(&mut a, 0, 1);
        fill(&mut b, 0, 2);
        assert_ne!(a, b, "the seed changes the pattern");
        fill(&mut b, 8, 1);
        assert_eq!(a.get(8..16), b.get(..8), "a word depends on its offset only");
    }

    /// The whole read path on this machine's disk (O_DIRECT works on ext4 and xfs; tmpfs
    /// refuses it, which is a clear error, not a pass).
    #[test]
    fn a_written_file_reads_back_with_its_crc_through_registered_buffers() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("pattern.bin");
        let size = (3 << 20) + 8192;
        let written = write_pattern(&path, size, 7).unwrap();
        let align = alignment(&path, Some(4096)).unwrap();
        for (queue_depth, block_len_bytes) in [(1, 1 << 20), (4, 256 << 10), (16, 65536)] {
            let shape = ReadShape { queue_depth, block_len_bytes };
            match read_direct(&path, shape, &align, true) {
                Ok(run) => {
                    assert_eq!(run.bytes, size);
                    assert_eq!(run.crc32c, Some(written), "{shape:?}");
                }
                Err(err) => {
                    let text = format!("{err:#}");
                    // Sandboxes without io_uring or O_DIRECT: say so, do not pass silently.
                    assert!(text.contains("io_uring") || text.contains("O_DIRECT"), "{text}");
                    return eprintln!("SKIP: {text}");
                }
            }
        }
        // A file whose size is not aligned is refused before any read.
        let odd = dir.path().join("odd.bin");
        write_pattern(&odd, 1000, 1).unwrap();
        let err = read_direct(&odd, ReadShape { queue_depth: 2, block_len_bytes: 4096 }, &align, true).unwrap_err();
        assert!(format!("{err:#}").contains("not a multiple"), "{err:#}");
    }
}
