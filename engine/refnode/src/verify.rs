//! The reference node's verification of a migration: was every acknowledged write of the
//! migrating vShard carried over exactly once, and is every staged segment file identical to
//! the source's?
//!
//! What it does: [`verify`] rebuilds the set of the migrating vShard's writer_seq values from
//! three places, with readers independent of ferry's transfer code:
//! - the export files ([`super::export`]) staged under `<staging>/segments/` (the base, LSN <=
//!   `base_lsn`);
//! - the staged WAL `<staging>/wal/`, read with [`super::walread`] in staged mode, keeping
//!   records with LSN in (`base_lsn`, `final_lsn`];
//! - the target node's own WAL (`<target data dir>/node-wal/`), where the writer put the
//!   vShard's writes after the routing flip;
//!
//! and compares it with the writer's log of acknowledged writes of that vShard: `lost` (acked,
//! found nowhere), `duplicate` (found more than once, counted beyond the first), `unexpected`
//! (a record or entry that is not an acknowledged write of the vShard: unknown writer_seq,
//! another vShard, a payload that does not check out whole, a staged LSN outside the range).
//! It also compares every file under `<staging>/segments/` with the same path under the
//! source's `segments_root` by SHA-256, both ways (a missing or extra file is a difference;
//! ferry's `.ferry-snapshot/` folder in the source root is not a segment file).
//!
//! [`verify_counting`] does the same and also returns how often each acknowledged write was
//! found, by writer_seq, so a test can check windows of the writer's log one by one.
//!
//! What it does not: read `MANIFEST.json` (ferry's own contract, checked elsewhere) or judge
//! timing: pause checks are on the [`WriterLog`](super::WriterLog) itself.
//!
//! It is meant for a completed migration (the fence at `final_lsn` held, the writer resumed on
//! the target; cancelled fences before it are fine): a write of the vShard acknowledged on the
//! source after `final_lsn` is found nowhere and counted lost.
//!
//! Invariants: a problem is reported, never panicked on; the lost and duplicated summaries are
//! listed first; at most [`PROBLEMS_LISTED_MAX`] are kept word for word, all are counted;
//! memory is one map entry per write of the vShard.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::time::Instant;

use ferry_wire::Lsn;
use sha2::{Digest, Sha256};

use super::export::{is_export_file_name, read_export_file};
use super::log::{WritePlace, WriterLog};
use super::payload::decode_payload;
use super::walread::{read_wal_folder, FolderKind, WalReadError, WalRecordRef};

/// Problems kept word for word.
pub const PROBLEMS_LISTED_MAX: usize = 20;
/// The source root's snapshot folder (DESIGN section 2): ferry's hard links, not segments.
const SNAPSHOT_DIR: &str = ".ferry-snapshot";
const HASH_BUFFER_BYTES: usize = 1 << 20;
const HASH_THREADS_MAX_COUNT: usize = 4;

/// What [`verify`] checks.
#[derive(Debug, Clone, Copy)]
pub struct VerifyInput<'a> {
    /// The writer's log: the acknowledged writes, and which vShard migrated.
    pub log: &'a WriterLog,
    pub base_lsn: Lsn,
    pub final_lsn: Lsn,
    /// `<target data dir>/migrations/<migration_id>`: its `segments/` and `wal/`.
    pub staging_dir: &'a Path,
    /// The source's `segments_root` (the export folder), compared file by file.
    pub source_segments_root: &'a Path,
    /// `<target data dir>/node-wal`, when the writer resumed on the target.
    pub target_node_wal_dir: Option<&'a Path>,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Acknowledged writes of the migrating vShard.
    pub expected_count: u64,
    pub from_export_count: u64,
    pub from_staged_wal_count: u64,
    pub from_node_wal_count: u64,
    pub lost_count: u64,
    pub duplicate_count: u64,
    pub unexpected_count: u64,
    /// Every staged segment file has the source's SHA-256, and the two sets of paths agree.
    pub segments_identical: bool,
    pub segment_files_count: u64,
    pub segment_bytes: u64,
    pub problems: Vec<String>,
    pub problems_count: u64,
    pub elapsed_us: u64,
}

impl Verification {
    /// Nothing lost, duplicated or unexpected, segments identical, no problem at all.
    pub fn passed(&self) -> bool {
        self.lost_count == 0
            && self.duplicate_count == 0
            && self.unexpected_count == 0
            && self.segments_identical
            && self.problems_count == 0
    }

    fn problem(&mut self, line: String) {
        self.problems_count += 1;
        if self.problems.len() < PROBLEMS_LISTED_MAX {
            self.problems.push(line);
        }
    }

    /// A summary line, listed before the per-record lines (which may have filled the list).
    fn problem_first(&mut self, line: String) {
        self.problems_count += 1;
        self.problems.insert(0, line);
        self.problems.truncate(PROBLEMS_LISTED_MAX);
    }
}

/// The tally: acknowledged writes of the vShard (writer_seq -> where the writer put it) and
/// how often each was found.
struct Tally<'a> {
    input: &'a VerifyInput<'a>,
    expected: HashMap<u64, WritePlace>,
    seen: HashMap<u64, u32>,
    v: Verification,
}

impl Tally<'_> {
    /// Counts `writer_seq` found in `place_found` (described by `what`); false when it is not
    /// an acknowledged write of the vShard.
    fn found(&mut self, writer_seq: u64, place_found: WritePlace, what: &str) -> bool {
        let Some(written) = self.expected.get(&writer_seq).copied() else {
            self.v.unexpected_count += 1;
            self.v.problem(format!(
                "{what}: writer_seq {writer_seq} is not an acknowledged write of vShard {}",
                self.input.log.migrating_vshard()
            ));
            return false;
        };
        if written != place_found {
            self.v.problem(format!(
                "{what}: writer_seq {writer_seq} was written at {written:?}, found at {place_found:?}"
            ));
        }
        *self.seen.entry(writer_seq).or_default() += 1;
        true
    }

    fn wal_record(&mut self, record: &WalRecordRef<'_>, node_wal: bool) -> bool {
        let vshard = self.input.log.migrating_vshard();
        let what = format!(
            "{} {} offset {}",
            if node_wal { "node WAL" } else { "staged WAL" },
            record.segment,
            record.offset_bytes
        );
        let in_range = record.lsn > self.input.base_lsn && record.lsn <= self.input.final_lsn;
        if !node_wal && !in_range {
            self.v.unexpected_count += 1;
            self.v.problem(format!(
                "{what}: LSN {} is outside (base_lsn {}, final_lsn {}]",
                record.lsn, self.input.base_lsn, self.input.final_lsn
            ));
            return false;
        }
        if record.vshard != vshard {
            self.v.unexpected_count += 1;
            self.v.problem(format!("{what}: LSN {} belongs to vShard {}", record.lsn, record.vshard));
            return false;
        }
        match decode_payload(record.payload) {
            Ok((payload_vshard, writer_seq)) if payload_vshard == vshard => {
                let place = if node_wal { WritePlace::TargetNode(record.lsn) } else { WritePlace::Source(record.lsn) };
                self.found(writer_seq, place, &what)
            }
            Ok((other, _)) => {
                self.v.unexpected_count += 1;
                self.v.problem(format!("{what}: LSN {} carries a payload of vShard {other}", record.lsn));
                false
            }
            Err(e) => {
                self.v.unexpected_count += 1;
                self.v.problem(format!("{what}: LSN {}: {e}", record.lsn));
                false
            }
        }
    }
}

/// Verifies a migration's result. See the module docs.
pub fn verify(input: &VerifyInput<'_>) -> Verification {
    verify_counting(input).0
}

/// [`verify`], also returning how often each acknowledged write of the migrating vShard was
/// found, by writer_seq: 1 is right, 0 is lost, 2 or more duplicated. Every acknowledged write
/// of the vShard has an entry; a record that is not one (counted `unexpected`) has none. A
/// test buckets these by its own windows of the writer's log.
pub fn verify_counting(input: &VerifyInput<'_>) -> (Verification, BTreeMap<u64, u32>) {
    let started = Instant::now();
    let vshard = input.log.migrating_vshard();
    let expected: HashMap<u64, WritePlace> =
        input.log.writes().filter(|w| w.vshard == vshard).map(|w| (w.writer_seq, w.place)).collect();
    let mut tally = Tally {
        input,
        v: Verification { expected_count: expected.len() as u64, ..Verification::default() },
        expected,
        seen: HashMap::new(),
    };
    let segments = input.staging_dir.join("segments");
    tally_exports(&mut tally, &segments);
    tally_wal(&mut tally, &input.staging_dir.join("wal"), false);
    if let Some(node_wal) = input.target_node_wal_dir {
        tally_wal(&mut tally, node_wal, true);
    }
    let Tally { expected, seen, mut v, .. } = tally;
    let mut lost: Vec<u64> = expected.keys().filter(|seq| !seen.contains_key(seq)).copied().collect();
    lost.sort_unstable();
    v.lost_count = lost.len() as u64;
    if !lost.is_empty() {
        let first: Vec<String> = lost.iter().take(10).map(u64::to_string).collect();
        v.problem_first(format!(
            "{} acknowledged write(s) of vShard {vshard} LOST, writer_seq {}",
            lost.len(),
            first.join(", ")
        ));
    }
    let counts: BTreeMap<u64, u32> = expected.keys().map(|seq| (*seq, seen.get(seq).copied().unwrap_or(0))).collect();
    let mut duplicated: Vec<(u64, u32)> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    duplicated.sort_unstable();
    v.duplicate_count = duplicated.iter().map(|(_, n)| u64::from(n - 1)).sum();
    if !duplicated.is_empty() {
        let first: Vec<String> = duplicated.iter().take(10).map(|(s, n)| format!("{s} ({n} times)")).collect();
        v.problem_first(format!(
            "{} write(s) of vShard {vshard} DUPLICATED, writer_seq {}",
            duplicated.len(),
            first.join(", ")
        ));
    }
    compare_segments(&mut v, input.source_segments_root, &segments);
    v.elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    (v, counts)
}

fn tally_exports(tally: &mut Tally<'_>, segments: &Path) {
    let mut names = BTreeSet::new();
    if let Err(e) = list_files(segments, segments, &mut names) {
        tally.v.problem(format!("cannot list the staged segments in {}: {e}", segments.display()));
        return;
    }
    let exports: Vec<&String> = names.iter().filter(|n| is_export_file_name(n)).collect();
    if exports.is_empty() {
        tally.v.problem(format!("no export files (*.rfx) under {}: the base is missing", segments.display()));
    }
    let vshard = tally.input.log.migrating_vshard();
    for rel in exports {
        let file = match read_export_file(&segments.join(rel)) {
            Ok(file) => file,
            Err(e) => {
                tally.v.problem(format!("staged export file unreadable: {e}"));
                continue;
            }
        };
        if file.vshard != vshard || file.base_lsn != tally.input.base_lsn {
            tally.v.problem(format!(
                "{rel}: exports vShard {} up to base_lsn {}, expected vShard {vshard} up to {}",
                file.vshard, file.base_lsn, tally.input.base_lsn
            ));
        }
        if file.vshard != vshard {
            tally.v.unexpected_count += file.entries.len() as u64;
            continue;
        }
        for entry in file.entries {
            if tally.found(entry.writer_seq, WritePlace::Source(entry.source_lsn), rel) {
                tally.v.from_export_count += 1;
            }
        }
    }
}

fn tally_wal(tally: &mut Tally<'_>, dir: &Path, node_wal: bool) {
    let kind = if node_wal { FolderKind::Dense } else { FolderKind::Staged };
    let mut found_count = 0u64;
    let result = read_wal_folder(dir, kind, |record| {
        if tally.wal_record(record, node_wal) {
            found_count += 1;
        }
    });
    match result {
        Ok(report) => {
            let listed_count = report.problems.len() as u64;
            for line in report.problems {
                tally.v.problem(format!("{}: {line}", dir.display()));
            }
            // Problems beyond the reader's listed ones are still counted.
            tally.v.problems_count += report.problems_count.saturating_sub(listed_count);
        }
        // A missing staged WAL is legal when nothing was written after base_lsn: lost
        // writes say whether anything is missing.
        Err(WalReadError::Missing { .. }) if !node_wal => {}
        Err(e) => tally.v.problem(format!("cannot read {}: {e}", dir.display())),
    }
    if node_wal {
        tally.v.from_node_wal_count += found_count;
    } else {
        tally.v.from_staged_wal_count += found_count;
    }
}

/// Every regular file under `dir`, as `/`-separated paths relative to `root`, leaving out the
/// root's snapshot folder.
fn list_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if dir == root && entry.file_name() == SNAPSHOT_DIR {
                continue;
            }
            list_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn sha256_file(path: &Path, buf: &mut [u8]) -> io::Result<([u8; 32], u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut len_bytes = 0u64;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            return Ok((hasher.finalize().into(), len_bytes));
        }
        hasher.update(buf.get(..n).unwrap_or_default());
        len_bytes += n as u64;
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares the staged segment files with the source's, by SHA-256, on a few threads.
fn compare_segments(v: &mut Verification, source_root: &Path, staged_root: &Path) {
    let (mut source_names, mut staged_names) = (BTreeSet::new(), BTreeSet::new());
    let listed = list_files(source_root, source_root, &mut source_names)
        .map_err(|e| format!("cannot list the source segments in {}: {e}", source_root.display()))
        .and_then(|()| {
            list_files(staged_root, staged_root, &mut staged_names)
                .map_err(|e| format!("cannot list the staged segments in {}: {e}", staged_root.display()))
        });
    if let Err(line) = listed {
        v.segments_identical = false;
        v.problem(line);
        return;
    }
    let mut identical = true;
    for missing in source_names.difference(&staged_names) {
        identical = false;
        v.problem(format!("{missing}: in the source, not staged"));
    }
    for extra in staged_names.difference(&source_names) {
        identical = false;
        v.problem(format!("{extra}: staged, but the source has no such file"));
    }
    let both: Vec<&String> = source_names.intersection(&staged_names).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, HASH_THREADS_MAX_COUNT);
    let threads = threads.min(both.len()).max(1);
    let outcomes: Vec<(String, Result<u64, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let both = &both;
                scope.spawn(move || {
                    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
                    let mut out = Vec::new();
                    for rel in both.iter().skip(t).step_by(threads) {
                        out.push((
                            (*rel).clone(),
                            compare_one(&source_root.join(rel), &staged_root.join(rel), &mut buf),
                        ));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|_| vec![("?".into(), Err("a hashing thread died".into()))]))
            .collect()
    });
    for (rel, outcome) in outcomes {
        match outcome {
            Ok(len_bytes) => {
                v.segment_files_count += 1;
                v.segment_bytes += len_bytes;
            }
            Err(line) => {
                identical = false;
                v.problem(format!("{rel}: {line}"));
            }
        }
    }
    v.segments_identical = identical;
}

fn compare_one(source: &Path, staged: &Path, buf: &mut [u8]) -> Result<u64, String> {
    let (source_sha, len_bytes) = sha256_file(source, buf).map_err(|e| format!("cannot read the source file: {e}"))?;
    let (staged_sha, _) = sha256_file(staged, buf).map_err(|e| format!("cannot read the staged file: {e}"))?;
    if source_sha != staged_sha {
        return Err(format!("source SHA-256 {}, staged SHA-256 {}", hex(&source_sha), hex(&staged_sha)));
    }
    Ok(len_bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::{export_base, generate_bulk, walread, RefWriter, RefWriterConfig, RECORD_TYPE_PUT};
    use ferry_wire::wal::{encode_record, Layout, RecordHeader};
    use ferry_wire::VShardId;
    use std::path::PathBuf;
    use std::time::Duration;

    const VSHARD: VShardId = VShardId(7);

    /// A finished synthetic migration: the source export and WAL, a fake staging, the target
    /// node WAL, and the records a correct catch-up stages.
    struct Flow {
        _dir: tempfile::TempDir,
        log: WriterLog,
        base_lsn: Lsn,
        final_lsn: Lsn,
        shard: PathBuf,
        staging: PathBuf,
        node_wal: PathBuf,
        /// (LSN, raw bytes) of the vShard's source records in (base_lsn, final_lsn].
        catch_up: Vec<(Lsn, Vec<u8>)>,
    }

    impl Flow {
        fn input(&self) -> VerifyInput<'_> {
            VerifyInput {
                log: &self.log,
                base_lsn: self.base_lsn,
                final_lsn: self.final_lsn,
                staging_dir: &self.staging,
                source_segments_root: &self.shard,
                target_node_wal_dir: Some(&self.node_wal),
            }
        }

        /// Replaces the staged WAL with `records`, in two segments named by the staged rules.
        fn stage_wal(&self, records: &[(Lsn, Vec<u8>)]) {
            let wal = self.staging.join("wal");
            let _ = fs::remove_dir_all(&wal);
            fs::create_dir_all(&wal).unwrap();
            let half = records.len() / 2;
            let (first, second) = records.split_at(half);
            let name = |lsn: u64| wal.join(format!("wal-{lsn:020}.seg"));
            if let Some((lsn, _)) = first.first() {
                fs::write(name(lsn.0), first.iter().flat_map(|r| r.1.clone()).collect::<Vec<u8>>()).unwrap();
            }
            if let Some((lsn, _)) = second.first() {
                let named = first.last().map_or(lsn.0, |(last, _)| last.0 + 1);
                fs::write(name(named), second.iter().flat_map(|r| r.1.clone()).collect::<Vec<u8>>()).unwrap();
            }
        }
    }

    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &to.join(entry.file_name()));
            } else {
                fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    fn flow(layout: Layout) -> Flow {
        let dir = tempfile::tempdir().unwrap();
        let (source_wal, shard) = (dir.path().join("source/wal"), dir.path().join("source/shard"));
        let staging = dir.path().join("target/migrations/m1");
        let node_wal = dir.path().join("target/node-wal");
        let config =
            RefWriterConfig { rate_writes_per_sec: 5_000, layout, ..RefWriterConfig::new(&source_wal, VSHARD) };
        let writer = RefWriter::start(config).unwrap();

        std::thread::sleep(Duration::from_millis(100));
        let base_lsn = writer.acked_lsn();
        let entries = writer.migrating_source_writes(base_lsn);
        assert!(!entries.is_empty());
        export_base(&shard, VSHARD, base_lsn, &entries).unwrap();
        generate_bulk(&shard, 200_000, 3).unwrap();

        std::thread::sleep(Duration::from_millis(120));
        let ticket = writer.pause().unwrap();
        let final_lsn = ticket.last_acked_lsn;
        assert!(final_lsn > base_lsn);
        copy_tree(&shard, &staging.join("segments"));
        // The catch-up: the vShard's records in (base_lsn, final_lsn], copied byte for byte
        // from the source WAL as the writer left it (read independently, leftovers and all).
        let mut catch_up = Vec::new();
        let report = walread::read_wal_folder(&source_wal, FolderKind::Aligned { alignment_bytes: 4096 }, |r| {
            if r.vshard == VSHARD && r.lsn > base_lsn && r.lsn <= final_lsn {
                catch_up.push((r.lsn, r.bytes.to_vec()));
            }
        })
        .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.last_lsn, Some(final_lsn), "the paused writer's last record is the acked one");

        let resumed_at_ns = writer.resume_on_target(&node_wal).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        let log = writer.stop().unwrap();
        assert_eq!(log.acks_between(ticket.paused_at_ns, resumed_at_ns), 0);
        let flow = Flow { _dir: dir, log, base_lsn, final_lsn, shard, staging, node_wal, catch_up };
        flow.stage_wal(&flow.catch_up);
        flow
    }

    #[test]
    fn a_whole_synthetic_migration_verifies_and_each_fault_is_counted() {
        let flow = flow(Layout::A);
        let (v, counts) = verify_counting(&flow.input());
        assert!(v.passed(), "{v:#?}");
        assert_eq!(counts.len() as u64, v.expected_count);
        assert!(counts.values().all(|n| *n == 1), "every write found once");
        assert_eq!((v.lost_count, v.duplicate_count, v.unexpected_count), (0, 0, 0));
        assert!(v.from_export_count > 0 && v.from_staged_wal_count > 0 && v.from_node_wal_count > 0, "{v:#?}");
        assert_eq!(v.from_export_count + v.from_staged_wal_count + v.from_node_wal_count, v.expected_count);
        assert_eq!(v.segment_files_count, 4, "one export file and three bulk files");
        assert!(v.segments_identical);

        // One staged record deleted: one write lost.
        let mut fewer = flow.catch_up.clone();
        let gone = fewer.remove(1);
        flow.stage_wal(&fewer);
        let (v, counts) = verify_counting(&flow.input());
        assert_eq!((v.lost_count, v.duplicate_count, v.unexpected_count), (1, 0, 0), "{:?}", v.problems);
        let seq = decode_payload(&gone.1[walread::HEADER_LEN_BYTES..]).unwrap().1;
        assert_eq!(counts[&seq], 0);
        assert_eq!(counts.values().filter(|n| **n != 1).count(), 1);
        assert!(v.problems.iter().any(|p| p.contains("LOST") && p.contains(&seq.to_string())), "{:?}", v.problems);

        // One staged record twice, byte for byte: one duplicate (and an LSN order problem).
        let mut twice = flow.catch_up.clone();
        twice.insert(2, twice[2].clone());
        flow.stage_wal(&twice);
        let (v, counts) = verify_counting(&flow.input());
        assert_eq!((v.lost_count, v.duplicate_count, v.unexpected_count), (0, 1, 0), "{:?}", v.problems);
        let twice_seq = decode_payload(&twice[2].1[walread::HEADER_LEN_BYTES..]).unwrap().1;
        assert_eq!(counts[&twice_seq], 2);
        assert!(v.problems.iter().any(|p| p.contains("DUPLICATED")), "{:?}", v.problems);
        assert!(v.problems.iter().any(|p| p.contains("is not above the previous")), "{:?}", v.problems);

        // A vShard record past final_lsn (the writer did not pause): unexpected.
        let mut late = flow.catch_up.clone();
        let mut bytes = Vec::new();
        let header = RecordHeader::new(Layout::A, RECORD_TYPE_PUT, Lsn(flow.final_lsn.0 + 1), VSHARD);
        encode_record(&header, &crate::encode_payload(VSHARD, 1_000_000_003), &mut bytes).unwrap();
        late.push((Lsn(flow.final_lsn.0 + 1), bytes));
        flow.stage_wal(&late);
        let v = verify(&flow.input());
        assert_eq!((v.lost_count, v.duplicate_count, v.unexpected_count), (0, 0, 1), "{:?}", v.problems);

        // A staged bulk file with one byte changed, and the staged WAL gone.
        flow.stage_wal(&flow.catch_up);
        let victim = flow.staging.join("segments/bulk/L1/000001.bulk");
        let mut bulk = fs::read(&victim).unwrap();
        bulk[1234] ^= 1;
        fs::write(&victim, bulk).unwrap();
        fs::remove_dir_all(flow.staging.join("wal")).unwrap();
        let v = verify(&flow.input());
        assert!(!v.segments_identical);
        assert_eq!(v.lost_count, flow.catch_up.len() as u64);
        assert!(v.problems.iter().any(|p| p.contains("bulk/L1/000001.bulk: source SHA-256")), "{:?}", v.problems);
    }

    #[test]
    fn a_layout_b_migration_verifies_and_a_lost_write_is_counted() {
        let flow = flow(Layout::B);
        assert!(flow.catch_up.iter().all(|(_, bytes)| walread::detect_layout(bytes) == Some(walread::RecordLayout::B)));
        let v = verify(&flow.input());
        assert!(v.passed(), "{v:#?}");
        assert!(v.from_export_count > 0 && v.from_staged_wal_count > 0 && v.from_node_wal_count > 0, "{v:#?}");
        assert_eq!(v.from_export_count + v.from_staged_wal_count + v.from_node_wal_count, v.expected_count);

        let mut fewer = flow.catch_up.clone();
        let gone = fewer.remove(3);
        flow.stage_wal(&fewer);
        let (v, counts) = verify_counting(&flow.input());
        assert_eq!((v.lost_count, v.duplicate_count, v.unexpected_count), (1, 0, 0), "{:?}", v.problems);
        let seq = decode_payload(&gone.1[walread::HEADER_B_LEN_BYTES..]).unwrap().1;
        assert_eq!(counts[&seq], 0);
    }

    #[test]
    fn missing_and_foreign_staged_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (source, staging) = (dir.path().join("source"), dir.path().join("staging"));
        export_base(&source, VSHARD, Lsn(0), &[]).unwrap();
        fs::create_dir_all(source.join(".ferry-snapshot/m1")).unwrap();
        fs::write(source.join(".ferry-snapshot/m1/x"), b"link").unwrap();
        copy_tree(&source.join("export"), &staging.join("segments/export"));
        fs::write(staging.join("segments/stray.bin"), b"x").unwrap();
        let log = crate::log::WriterLog::new(crate::log::Schedule {
            started_ns: 0,
            rate_writes_per_sec: 1,
            migrating_vshard: VSHARD,
            migrating_every: 1,
            other_vshards: Vec::new(),
        });
        let input = VerifyInput {
            log: &log,
            base_lsn: Lsn(0),
            final_lsn: Lsn(0),
            staging_dir: &staging,
            source_segments_root: &source,
            target_node_wal_dir: None,
        };
        let v = verify(&input);
        assert_eq!((v.expected_count, v.lost_count, v.unexpected_count), (0, 0, 0));
        assert!(!v.segments_identical);
        assert_eq!(v.problems, vec!["stray.bin: staged, but the source has no such file".to_owned()]);
    }
}
