//! The target side of the WAL stream: stages the vShard's records durably, with group commit,
//! and tells the source the durable LSN after every group.
//!
//! What it does: on the WAL stream of a transfer's connection, answers `WalStart` with the
//! staged WAL's durable LSN (the source resumes from the next record). A reader task reads
//! and checks WAL batch frames ahead of the stager; the stager takes the next frame and every
//! further frame already read (without waiting for more), up to [`GROUP_MAX_BYTES`],
//! appends all their records through [`StagedWal`] as one batch (one fdatasync per segment
//! file written, via the storage seam) and answers `WalDurable` once for the group. While a
//! group is being synced the reader goes on reading, so a slow disk makes groups larger
//! instead of making the source wait. A small group (a live tail's) commits on the receiving
//! thread: with `block_in_place`, or, after a run of small commits that each took under
//! `DIRECT_COMMIT_MAX` (tmpfs), directly, without handing the worker's other tasks to
//! another thread; a large one on the blocking pool. One [`StagedWal`] per migration lives in the
//! [`WalStages`] table, so a reconnecting source continues the same staged WAL.
//!
//! What it does not: check that the records belong to the vShard (the source selects) or
//! renumber them (the database's importer applies them under its own LSNs).
//!
//! Invariants: `WalDurable` names only an LSN whose group's syncs returned; frames after a
//! malformed one are never staged (the good frames before it are, and acknowledged, then the
//! stream fails); memory held is bounded: at most [`READ_AHEAD_MAX_BYTES`] of frame bodies
//! read ahead (or one larger frame) and [`FRAMES_QUEUED_MAX_COUNT`] frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_wire::frame::FrameKind;
use ferry_wire::proto::target::{check_wal_start, wal_durable};
use ferry_wire::walstream;
use ferry_wire::{Lsn, MigrationId};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::framing::{read_body, read_control, read_header, write_control, SMALL_CONTROL_BODY_MAX_BYTES};
use super::task::AbortOnDrop;
use super::TransferError;
use crate::staging::StagingLayout;
use crate::storage::Storage;
use crate::wal::stage::{RecordCheck, StageOptions, StagedRecord, StagedWal};

/// Most frame body bytes staged as one group (one fdatasync): frames already read are taken
/// while they fit; a frame larger than this is a group of its own.
pub const GROUP_MAX_BYTES: usize = 8 << 20;
/// Most frame body bytes the reader holds ahead of the stager; a larger frame takes it all.
pub const READ_AHEAD_MAX_BYTES: usize = 16 << 20;
/// Most frames the reader holds ahead of the stager.
pub const FRAMES_QUEUED_MAX_COUNT: usize = 1024;
/// Groups up to this size are committed on the receiving thread (see `serve_stream`).
const INLINE_GROUP_MAX_BYTES: usize = 16 << 10;

/// A small group's commit that took at most this long counts as quick: tmpfs commits take a
/// few microseconds, a disk's fdatasync tens to hundreds (a device with a write cache can
/// answer in tens now and then, so one quick commit proves nothing).
const DIRECT_COMMIT_MAX: Duration = Duration::from_micros(20);
/// Quick small commits in a row after which the next runs on the worker thread itself,
/// without `block_in_place`'s hand-off (a thread wake-up, 25 to 50 us on this kind of host,
/// `engine/src/inline.rs`). One slow commit starts the count again.
const DIRECT_AFTER_QUICK_COUNT: u32 = 16;

/// How the last small groups' commits went: whether the next runs directly on the worker.
#[derive(Debug, Default)]
struct SmallCommits {
    /// Quick small commits in a row, up to [`DIRECT_AFTER_QUICK_COUNT`].
    quick_in_a_row: u32,
}

impl SmallCommits {
    /// Whether the next small group's commit runs on the worker thread directly: only after
    /// [`DIRECT_AFTER_QUICK_COUNT`] quick ones in a row. A slow one (a disk's sync, a busy
    /// device) sends the next back to `block_in_place`.
    fn direct(&self) -> bool {
        self.quick_in_a_row >= DIRECT_AFTER_QUICK_COUNT
    }

    fn took(&mut self, elapsed: Duration) {
        self.quick_in_a_row =
            if elapsed <= DIRECT_COMMIT_MAX { (self.quick_in_a_row + 1).min(DIRECT_AFTER_QUICK_COUNT) } else { 0 };
    }
}

/// The staged WALs open on this node, by migration.
#[derive(Debug, Default)]
pub struct WalStages {
    open: Mutex<HashMap<MigrationId, Arc<Mutex<StagedWal>>>>,
}

impl WalStages {
    /// The staged WAL of a migration, opened (and recovered) on first use.
    pub fn get_or_open(
        &self,
        storage: &Arc<dyn Storage>,
        layout: &StagingLayout,
        id: &MigrationId,
        base_lsn: Lsn,
    ) -> Result<Arc<Mutex<StagedWal>>, TransferError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wal) = open.get(id) {
            return Ok(wal.clone());
        }
        let dir = wal_dir(layout);
        let (wal, report) = StagedWal::open(storage.clone(), &dir, StageOptions::new(base_lsn))
            .map_err(|e| TransferError::Local(format!("cannot open the staged WAL: {e}")))?;
        if report.truncated_bytes > 0 {
            tracing::info!(migration = %id, truncated_bytes = report.truncated_bytes, "cut a torn tail off the staged WAL");
        }
        let wal = Arc::new(Mutex::new(wal));
        open.insert(id.clone(), wal.clone());
        Ok(wal)
    }

    /// The staged WAL of a migration, if it is open.
    pub fn get(&self, id: &MigrationId) -> Option<Arc<Mutex<StagedWal>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    pub fn forget(&self, id: &MigrationId) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// The staged WAL folder of a staging.
pub fn wal_dir(layout: &StagingLayout) -> std::path::PathBuf {
    layout.root.join("wal")
}

/// Called with a group's last LSN while the staged WAL is locked, before the group is staged
/// (the target undoes a cancelled fence there; see `target.rs`).
pub type BeforeGroup = Arc<dyn Fn(Lsn) -> Result<(), TransferError> + Send + Sync>;

/// Serves one WAL stream until the source finishes it or the connection ends.
pub async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    wal: Arc<Mutex<StagedWal>>,
    before_group: BeforeGroup,
    on_durable: impl Fn(Lsn) + Send,
) -> Result<(), TransferError> {
    check_wal_start(read_control(&mut recv, SMALL_CONTROL_BODY_MAX_BYTES).await?)?;
    let durable = wal.lock().unwrap_or_else(|e| e.into_inner()).durable_lsn();
    on_durable(durable);
    write_control(&mut send, &wal_durable(durable)).await?;
    let (frames_tx, mut frames) = mpsc::channel(FRAMES_QUEUED_MAX_COUNT);
    let budget = Arc::new(Semaphore::new(READ_AHEAD_MAX_BYTES));
    let _reader = AbortOnDrop(tokio::spawn(read_frames(recv, frames_tx, budget)));
    let mut held: Option<Frame> = None;
    let mut commits = SmallCommits::default();
    loop {
        let first = match held.take() {
            Some(frame) => frame,
            None => match frames.recv().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(e),
                None => break,
            },
        };
        let (group, failed) = take_group(first, &mut frames, &mut held, GROUP_MAX_BYTES);
        let group_bytes: usize = group.iter().map(|f| f.body.len()).sum();
        // A small group is a live tail's: its commit is on the path of the writer's next
        // acknowledgement and of the fence's drain, so it runs on this thread (two thread
        // wake-ups fewer). A large one is catch-up, where the blocking pool costs less CPU.
        // Frames keep being read by their own task either way.
        let durable = if group_bytes <= INLINE_GROUP_MAX_BYTES && commits.direct() {
            // The last small commits were quicker than handing this worker's other tasks to
            // another thread (tmpfs, a fast device): no hand-off at all.
            let started = Instant::now();
            let durable = stage_group(&wal, &group, &*before_group);
            commits.took(started.elapsed());
            durable?
        } else if group_bytes <= INLINE_GROUP_MAX_BYTES {
            let (wal, before_group) = (wal.clone(), before_group.clone());
            let staged = crate::inline::run(move || {
                let started = Instant::now();
                stage_group(&wal, &group, &*before_group).map(|durable| (durable, started.elapsed()))
            })
            .await;
            let (durable, took) =
                staged.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))??;
            commits.took(took);
            durable
        } else {
            let (wal, before_group) = (wal.clone(), before_group.clone());
            let staged = tokio::task::spawn_blocking(move || stage_group(&wal, &group, &*before_group)).await;
            staged.map_err(|e| TransferError::Local(format!("a blocking task failed: {e}")))??
        };
        on_durable(durable);
        write_control(&mut send, &wal_durable(durable)).await?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let _ = send.finish();
    Ok(())
}

/// A checked WAL batch frame body, holding its share of the read-ahead budget.
#[derive(Debug)]
struct Frame {
    body: Vec<u8>,
    _budget: OwnedSemaphorePermit,
}

type Frames = mpsc::Receiver<Result<Frame, TransferError>>;

/// Reads frames until the stream ends (the channel closes) or fails (the error is sent).
async fn read_frames(mut recv: RecvStream, frames: mpsc::Sender<Result<Frame, TransferError>>, budget: Arc<Semaphore>) {
    loop {
        match read_frame(&mut recv, &budget).await {
            Ok(Some(frame)) => {
                if frames.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = frames.send(Err(e)).await;
                return;
            }
        }
    }
}

async fn read_frame(recv: &mut RecvStream, budget: &Arc<Semaphore>) -> Result<Option<Frame>, TransferError> {
    let Some(header) = read_header(recv).await? else { return Ok(None) };
    if header.kind != FrameKind::WalBatch {
        return Err(TransferError::Protocol(format!("a {:?} frame on the WAL stream", header.kind)));
    }
    // The header's length is checked against the frame kind's limit by its decoder.
    let share = u32::try_from((header.body_len_bytes as usize).min(READ_AHEAD_MAX_BYTES)).unwrap_or(u32::MAX);
    let permit = Arc::clone(budget)
        .acquire_many_owned(share)
        .await
        .map_err(|_| TransferError::Local("the WAL read-ahead budget was closed".into()))?;
    let mut body = read_body(recv, &header).await?;
    crate::failpoint::damage_target_wal_batch(&mut body);
    header.check_body(&body)?;
    Ok(Some(Frame { body, _budget: permit }))
}

/// The group that starts with `first`: every further frame already read, while the group
/// stays within `group_max_bytes`. A frame that does not fit goes to `held` (it starts the
/// next group); a read error ends the group and is returned, to be raised once the group is
/// durable.
fn take_group(
    first: Frame,
    frames: &mut Frames,
    held: &mut Option<Frame>,
    group_max_bytes: usize,
) -> (Vec<Frame>, Option<TransferError>) {
    let mut group_bytes = first.body.len();
    let mut group = vec![first];
    loop {
        match frames.try_recv() {
            Ok(Ok(frame)) if group_bytes.saturating_add(frame.body.len()) <= group_max_bytes => {
                group_bytes += frame.body.len();
                group.push(frame);
            }
            Ok(Ok(frame)) => {
                *held = Some(frame);
                return (group, None);
            }
            Ok(Err(e)) => return (group, Some(e)),
            // Nothing more read yet, or the stream ended: the next receive tells which.
            Err(_) => return (group, None),
        }
    }
}

/// Decodes every frame of a group and stages all their records as one batch: one fdatasync
/// per segment file written. Returns the durable LSN.
fn stage_group(
    wal: &Mutex<StagedWal>,
    group: &[Frame],
    before_group: &(dyn Fn(Lsn) -> Result<(), TransferError> + Send + Sync),
) -> Result<Lsn, TransferError> {
    let bodies: Vec<&[u8]> = group.iter().map(|f| f.body.as_slice()).collect();
    stage_bodies(wal, &bodies, before_group)
}

/// The group step on checked WAL batch frame bodies (the daemon's stager and the simulator
/// in `tests/` both run it): decodes every body, calls `before_group` with the group's last
/// LSN under the staged WAL's lock, and stages all the records as one batch. Returns the
/// durable LSN, the one `WalDurable` may name. The bodies' frame CRCs were checked when they
/// were read, so the records are checked as [`RecordCheck::Framed`] (headers, lengths and
/// order, not each record's CRC again).
pub fn stage_bodies(
    wal: &Mutex<StagedWal>,
    bodies: &[&[u8]],
    before_group: &(dyn Fn(Lsn) -> Result<(), TransferError> + Send + Sync),
) -> Result<Lsn, TransferError> {
    let mut staged: Vec<StagedRecord<'_>> = Vec::new();
    for body in bodies {
        let records = walstream::decode(body).map_err(|e| TransferError::Malformed(e.to_string()))?;
        staged.extend(records.iter().map(|r| StagedRecord {
            lsn: r.lsn,
            bytes: r.bytes,
            source_preamble: r.source_preamble,
        }));
    }
    let mut wal = wal.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(last_lsn) = staged.iter().map(|r| r.lsn).max() {
        before_group(last_lsn)?;
    }
    wal.append_checked_batch(&staged, RecordCheck::Framed)
        .map_err(|e| TransferError::Local(format!("staging WAL records: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::path::Path;

    use ferry_wire::wal::{encode_record, Layout, RecordHeader};
    use ferry_wire::walstream::WalBatchRecord;
    use ferry_wire::VShardId;

    use super::*;
    use crate::storage::FakeStorage;

    fn record(lsn: u64) -> Vec<u8> {
        let header = RecordHeader::new(Layout::B, 1, Lsn(lsn), VShardId(7));
        let mut out = Vec::new();
        encode_record(&header, &[lsn.to_le_bytes()[0]; 40], &mut out).unwrap();
        out
    }

    /// A frame body holding the records `lsns`, with its budget share.
    fn frame(budget: &Arc<Semaphore>, lsns: &[u64]) -> Frame {
        let mut body = Vec::new();
        for lsn in lsns {
            let bytes = record(*lsn);
            assert!(walstream::push(
                &mut body,
                &WalBatchRecord { lsn: Lsn(*lsn), source_preamble: None, bytes: &bytes }
            ));
        }
        let permit = Arc::clone(budget).try_acquire_many_owned(u32::try_from(body.len()).unwrap()).unwrap();
        Frame { body, _budget: permit }
    }

    fn staged_wal(fs: &FakeStorage) -> Arc<Mutex<StagedWal>> {
        fs.create_dir_all(Path::new("/s")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let storage: Arc<dyn Storage> = Arc::new(fs.clone());
        let (wal, _) = StagedWal::open(storage, Path::new("/s/wal"), StageOptions::new(Lsn(0))).unwrap();
        Arc::new(Mutex::new(wal))
    }

    /// Frames already waiting are staged together: one data sync (and one folder sync for
    /// the segment created) for three frames, and the group's durable LSN is its last.
    #[test]
    fn frames_already_waiting_share_one_sync() {
        let budget = Arc::new(Semaphore::new(READ_AHEAD_MAX_BYTES));
        let (tx, mut rx) = mpsc::channel(8);
        for lsns in [&[2u64, 3][..], &[5], &[6, 9]] {
            tx.try_send(Ok(frame(&budget, lsns))).unwrap();
        }
        let first = rx.try_recv().unwrap().unwrap();
        let mut held = None;
        let (group, failed) = take_group(first, &mut rx, &mut held, GROUP_MAX_BYTES);
        assert!(failed.is_none() && held.is_none());
        assert_eq!(group.len(), 3);
        let fs = FakeStorage::new();
        let wal = staged_wal(&fs);
        let syncs_before = fs.syncs_count();
        assert_eq!(stage_group(&wal, &group, &|_| Ok(())).unwrap(), Lsn(9));
        assert_eq!(fs.syncs_count() - syncs_before, 2);
        // Staged with every record, and only what is synced survives a power loss: all of it.
        let recovered: Arc<dyn Storage> = Arc::new(fs.recover());
        let (_, report) = StagedWal::open(recovered, Path::new("/s/wal"), StageOptions::new(Lsn(0))).unwrap();
        assert_eq!((report.durable_lsn, report.records_count), (Lsn(9), 5));
        // The budget comes back once the group is dropped.
        drop(group);
        assert_eq!(budget.available_permits(), READ_AHEAD_MAX_BYTES);
    }

    /// A group stops before the frame that would take it over the cap (that frame starts the
    /// next group), and at a read error, which comes back with the frames before it.
    #[test]
    fn groups_are_capped_and_stop_at_an_error() {
        let budget = Arc::new(Semaphore::new(READ_AHEAD_MAX_BYTES));
        let (tx, mut rx) = mpsc::channel(8);
        let one = frame(&budget, &[1]);
        let cap = one.body.len() * 2;
        tx.try_send(Ok(frame(&budget, &[2]))).unwrap();
        tx.try_send(Ok(frame(&budget, &[3]))).unwrap();
        tx.try_send(Err(TransferError::Malformed("bad frame".into()))).unwrap();
        tx.try_send(Ok(frame(&budget, &[4]))).unwrap();
        let mut held = None;
        let (group, failed) = take_group(one, &mut rx, &mut held, cap);
        assert_eq!((group.len(), failed.is_none()), (2, true));
        let next = held.take().unwrap();
        let (group2, failed) = take_group(next, &mut rx, &mut held, cap);
        assert_eq!(group2.len(), 1);
        assert!(matches!(failed, Some(TransferError::Malformed(_))));
        assert!(held.is_none());
        let fs = FakeStorage::new();
        let wal = staged_wal(&fs);
        assert_eq!(stage_group(&wal, &group, &|_| Ok(())).unwrap(), Lsn(2));
        assert_eq!(stage_group(&wal, &group2, &|_| Ok(())).unwrap(), Lsn(3));
    }

    /// Small commits run on the worker only after a run of quick ones; one slow commit sends
    /// the next back to the hand-off and starts the count again.
    #[test]
    fn only_a_run_of_quick_small_commits_skips_the_hand_off() {
        let mut commits = SmallCommits::default();
        assert!(!commits.direct(), "the first small commits are timed under the hand-off");
        for _ in 1..DIRECT_AFTER_QUICK_COUNT {
            commits.took(Duration::from_micros(5));
        }
        assert!(!commits.direct());
        commits.took(DIRECT_COMMIT_MAX);
        assert!(commits.direct());
        commits.took(DIRECT_COMMIT_MAX + Duration::from_micros(1));
        assert!(!commits.direct());
        commits.took(Duration::from_micros(5));
        assert!(!commits.direct());
    }

    /// A damaged batch is refused whole: a flipped bit anywhere in a body fails the frame's
    /// CRC (what `read_frame` checks before anything is decoded); a checked body whose record
    /// disagrees with the batch (its header's LSN, its length) fails the group's staging, and
    /// nothing of that group is staged.
    #[test]
    fn a_damaged_batch_is_refused_and_stages_nothing() {
        let budget = Arc::new(Semaphore::new(READ_AHEAD_MAX_BYTES));
        let fs = FakeStorage::new();
        let wal = staged_wal(&fs);
        assert_eq!(stage_group(&wal, &[frame(&budget, &[1, 2])], &|_| Ok(())).unwrap(), Lsn(2));
        let good = frame(&budget, &[3, 4]);
        let header = ferry_wire::frame::FrameHeader::wal_batch(&good.body).unwrap();
        for bit in [0, 8 * 9 + 3, 8 * (good.body.len() - 1)] {
            let mut damaged = good.body.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(header.check_body(&damaged).is_err(), "bit {bit}");
        }
        let (r3, r5) = (record(3), record(5));
        let mut wrong_lsn = Vec::new();
        for (lsn, bytes) in [(3, &r3), (4, &r5)] {
            assert!(walstream::push(&mut wrong_lsn, &WalBatchRecord { lsn: Lsn(lsn), source_preamble: None, bytes }));
        }
        let err = stage_bodies(&wal, &[&wrong_lsn], &|_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("carries LSN 5"), "{err}");
        let mut short = Vec::new();
        assert!(walstream::push(
            &mut short,
            &WalBatchRecord { lsn: Lsn(3), source_preamble: None, bytes: &r3[..r3.len() - 1] }
        ));
        let err = stage_bodies(&wal, &[&short], &|_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("record given as LSN 3"), "{err}");
        assert_eq!(wal.lock().unwrap().durable_lsn(), Lsn(2));
        assert_eq!(stage_group(&wal, &[good], &|_| Ok(())).unwrap(), Lsn(4));
    }

    /// A sync that fails fails the group: nothing is reported durable, and after the crash
    /// the staged WAL holds only what earlier groups made durable.
    #[test]
    fn a_failed_sync_acknowledges_nothing() {
        let budget = Arc::new(Semaphore::new(READ_AHEAD_MAX_BYTES));
        let fs = FakeStorage::new();
        let wal = staged_wal(&fs);
        assert_eq!(stage_group(&wal, &[frame(&budget, &[1, 2])], &|_| Ok(())).unwrap(), Lsn(2));
        fs.crash_at_sync(1);
        assert!(stage_group(&wal, &[frame(&budget, &[3]), frame(&budget, &[4])], &|_| Ok(())).is_err());
        let recovered: Arc<dyn Storage> = Arc::new(fs.recover());
        let (_, report) = StagedWal::open(recovered, Path::new("/s/wal"), StageOptions::new(Lsn(0))).unwrap();
        assert_eq!(report.durable_lsn, Lsn(2));
    }
}
