//! The target's fence: it waits for its staged WAL (a `Fence` that arrives before the records
//! it names waits for them to be durable, one whose records do not come is cancelled), has no
//! flush of its own before its answer, commits `fenced` after it, and a power loss at any sync
//! from the last group commit to the release (torn writes included) ends in a release with
//! every record up to the fence and none above it, or in a clean cancel.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::manifest::{StagingManifest, StagingState, MANIFEST_FORMAT_VERSION};
use ferry_wire::message::Offer;
use ferry_wire::proto::inbound::InboundState;
use ferry_wire::proto::target::FenceAnswer;
use ferry_wire::wal::{encode_record, Layout, RecordHeader};
use ferry_wire::{Lsn, MigrationId, NodeId, VShardId};

use super::{commit_fenced, fence_staging, release_staging, unfence_hook, FenceWaits};
use crate::staging::{self, StagingLayout};
use crate::storage::{FakeStorage, Storage};
use crate::transfer::target::TargetContext;
use crate::transfer::TransferError;
use crate::wal::stage::StagedRecord;

const BASE_LSN: Lsn = Lsn(10);
const FINAL_LSN: Lsn = Lsn(20);

struct Scene {
    fs: FakeStorage,
    ctx: Arc<TargetContext>,
    offer: Offer,
    layout: StagingLayout,
}

fn id() -> MigrationId {
    MigrationId::new("m-1").unwrap()
}

/// A live staging, `copying`, with its next MANIFEST commit prepared and its staged WAL open
/// (empty: durable at the base LSN), as the WAL stream's start leaves it.
fn scene() -> Scene {
    let fs = FakeStorage::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(fs.clone());
    let layout = StagingLayout::new(Path::new("/data"), &id());
    let manifest = StagingManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        migration_id: id(),
        vshard_id: VShardId(7),
        base_lsn: BASE_LSN,
        final_lsn: None,
        state: StagingState::Copying,
        base_complete: true,
        db_meta: serde_json::Value::Null,
        segments: Vec::new(),
        wal_segments: Vec::new(),
        source_node: None,
        started_at_unix_ms: None,
        wal_follows: None,
    };
    staging::prepare_fresh(&*storage, &layout).unwrap();
    staging::write_manifest(&*storage, &layout, &manifest).unwrap();
    staging::prepare_manifest_commit(&*storage, &layout, &manifest).unwrap();
    started(fs)
}

/// The target daemon started on `fs` (after a restart: what its disk holds), with the staged
/// WAL of the migration open, as its WAL stream or a release opens it.
fn started(fs: FakeStorage) -> Scene {
    let storage: Arc<dyn Storage> = Arc::new(fs.clone());
    let ctx = Arc::new(TargetContext::new(NodeId::new("target").unwrap(), "/data".into(), storage.clone()));
    ctx.load_existing();
    let layout = StagingLayout::new(Path::new("/data"), &id());
    let wal = ctx.wal_stages.get_or_open(&storage, &layout, &id(), BASE_LSN).unwrap();
    let durable = wal.lock().unwrap().durable_lsn();
    ctx.set_wal_durable(&id(), durable);
    let offer = Offer {
        migration_id: id(),
        vshard_id: VShardId(7),
        base_lsn: BASE_LSN,
        chunk_len_bytes: 65536,
        files: Vec::new(),
        db_meta: serde_json::Value::Null,
        wal: true,
    };
    Scene { fs, ctx, offer, layout }
}

fn record(lsn: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(&RecordHeader::new(Layout::B, 1, Lsn(lsn), VShardId(7)), &[lsn.to_le_bytes()[0]; 40], &mut out)
        .unwrap();
    out
}

/// Stages the records `lsns` (one group commit) and tells the waiting fence, as the WAL stream
/// does.
fn try_stage(scene: &Scene, lsns: &[u64]) -> Result<Lsn, TransferError> {
    let bytes: Vec<Vec<u8>> = lsns.iter().map(|lsn| record(*lsn)).collect();
    let records: Vec<StagedRecord<'_>> = lsns
        .iter()
        .zip(&bytes)
        .map(|(lsn, b)| StagedRecord { lsn: Lsn(*lsn), bytes: b, source_preamble: None })
        .collect();
    let wal = scene.ctx.wal_stages.get(&scene.offer.migration_id).unwrap();
    let durable = wal.lock().unwrap().append_batch(&records).map_err(|e| TransferError::Local(e.to_string()))?;
    scene.ctx.set_wal_durable(&scene.offer.migration_id, durable);
    Ok(durable)
}

fn stage(scene: &Scene, lsns: &[u64]) {
    try_stage(scene, lsns).unwrap();
}

fn manifest(scene: &Scene) -> StagingManifest {
    staging::read_manifest(&*scene.ctx.storage, &scene.layout).unwrap().unwrap()
}

fn state(scene: &Scene) -> (StagingState, Option<Lsn>) {
    let m = manifest(scene);
    (m.state, m.final_lsn)
}

fn waits(through_lsn: Option<u64>, wal_wait_max_us: u64) -> FenceWaits {
    FenceWaits { through_lsn: through_lsn.map(Lsn), wal_wait_max_us, apply_wait_max_us: 0 }
}

/// The staged records the manifest lists, by LSN, each byte for byte as sent.
fn listed_records(scene: &Scene) -> Vec<u64> {
    let m = manifest(scene);
    let mut lsns = Vec::new();
    for segment in &m.wal_segments {
        let bytes = scene.fs.read_all(&scene.layout.root.join("wal").join(&segment.name)).unwrap();
        let mut rest = bytes.get(..usize::try_from(segment.size_bytes).unwrap()).unwrap();
        while !rest.is_empty() {
            let (header, len) = ferry_wire::wal::check_record(Layout::B, rest).unwrap();
            assert_eq!(&rest[..len], record(header.lsn.0).as_slice(), "record {} as sent", header.lsn);
            lsns.push(header.lsn.0);
            rest = &rest[len..];
        }
    }
    lsns
}

/// The `Fence` overtook the last records on their way (another QUIC stream): the target
/// fences only once they are durable; the `fenced` commit follows the answer and lists them.
#[tokio::test]
async fn a_fence_ahead_of_its_records_waits_for_them_then_fences() {
    let scene = Arc::new(scene());
    stage(&scene, &[11, 12]);
    let fence = {
        let scene = scene.clone();
        tokio::spawn(
            async move { fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(14), 10_000_000)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!fence.is_finished(), "fenced before record 14 was durable");
    stage(&scene, &[13]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!fence.is_finished(), "fenced before record 14 was durable");
    stage(&scene, &[14]);
    let answer = tokio::time::timeout(Duration::from_secs(10), fence).await.unwrap().unwrap().unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(14), .. }), "{answer:?}");
    assert_eq!(scene.ctx.fenced_at(&id()), Some(20));
    assert_eq!(state(&scene), (StagingState::Copying, None), "the fenced commit follows the answer");
    assert!(commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap());
    assert_eq!(state(&scene), (StagingState::Fenced, Some(FINAL_LSN)));
    assert_eq!(manifest(&scene).wal_segments.iter().map(|s| s.last_lsn).max(), Some(Lsn(14)));
    assert!(!commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap(), "committed once");
}

/// The staged WAL's group commit is the only flush before the answer: with the records
/// durable already, the fence syncs nothing; its MANIFEST commit comes after.
#[tokio::test]
async fn the_fence_has_no_flush_of_its_own_before_its_answer() {
    let scene = scene();
    stage(&scene, &[11, 12, 14]);
    let before = scene.fs.syncs_count();
    let answer = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(14), 1_000_000)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(14), .. }), "{answer:?}");
    assert_eq!(scene.fs.syncs_count(), before, "a sync on the fence's path");
    assert!(commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap());
    assert!(scene.fs.syncs_count() > before, "the fenced commit is durable");
}

/// Records already durable: no wait; records that never come: cancelled once the wait is
/// over, the staging left `copying`. (A `through_lsn` above `final_lsn` never reaches the
/// engine: `ferry_wire::proto::target` cancels it, and its tests check that.)
#[tokio::test]
async fn a_fence_whose_records_do_not_come_is_cancelled_and_the_staging_is_left_copying() {
    let scene = scene();
    stage(&scene, &[11, 12]);
    let started = std::time::Instant::now();
    let answer = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(16), 30_000)).await.unwrap();
    let FenceAnswer::Cancelled { reason } = answer else { panic!("{answer:?}") };
    assert!(reason.contains("durable up to 12, not up to record 16"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(state(&scene), (StagingState::Copying, None));
    assert_eq!(scene.ctx.fenced_at(&id()), None);

    // A fence with nothing to wait for (the source saw it durable, or an earlier ferry).
    let answer = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(None, 0)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(12), .. }), "{answer:?}");
    assert!(commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap());
    assert_eq!(state(&scene), (StagingState::Fenced, Some(FINAL_LSN)));
}

/// A fence the source gave up on (its answer came late): records above it arrive before its
/// `fenced` commit ran; the commit then writes nothing, and the staging stays `copying`.
#[tokio::test]
async fn a_late_fenced_commit_never_overwrites_an_unfence() {
    let scene = scene();
    stage(&scene, &[11, 12]);
    let answer = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(12), 1_000_000)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { .. }), "{answer:?}");
    let hook = unfence_hook(scene.ctx.clone(), id(), scene.layout.clone());
    hook(Lsn(21)).unwrap();
    assert_eq!(scene.ctx.fenced_at(&id()), None);
    assert!(!commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap());
    assert_eq!(state(&scene), (StagingState::Copying, None));
}

/// A release that arrives before the `fenced` commit (another connection) releases the
/// staging whole (`final_lsn` and segments); the commit that comes after writes nothing.
#[tokio::test]
async fn a_release_ahead_of_the_fenced_commit_releases_and_the_commit_then_writes_nothing() {
    let scene = scene();
    stage(&scene, &[11, 13]);
    let answer = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(13), 1_000_000)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(13), .. }), "{answer:?}");
    release_staging(&scene.ctx, &id(), FINAL_LSN, Some(Lsn(13))).await.unwrap();
    assert_eq!(state(&scene), (StagingState::Released, Some(FINAL_LSN)));
    assert_eq!(listed_records(&scene), [11, 13]);
    assert!(!commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).unwrap());
    assert_eq!(state(&scene), (StagingState::Released, Some(FINAL_LSN)));
}

/// After a restart that lost the `fenced` commit, a release is refused without the durable
/// LSN of the fence's answer, and with one the staged WAL does not reach.
#[tokio::test]
async fn a_derived_release_needs_the_answers_durable_lsn_and_a_staged_wal_that_reaches_it() {
    let before = scene();
    stage(&before, &[11, 12]);
    let answer = fence_staging(&before.ctx, &before.offer, FINAL_LSN, waits(Some(12), 1_000_000)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(12), .. }), "{answer:?}");
    // The process restarts before the commit: the disk says copying.
    let scene = started(before.fs.clone());
    assert_eq!(scene.ctx.machine().get(&id()).map(|m| m.state.clone()), Some(InboundState::BaseStaged));
    let e = release_staging(&scene.ctx, &id(), FINAL_LSN, None).await.unwrap_err();
    assert!(e.to_string().contains("not fenced at 20"), "{e}");
    let e = release_staging(&scene.ctx, &id(), FINAL_LSN, Some(Lsn(15))).await.unwrap_err();
    assert!(e.to_string().contains("below the 15 its fence was answered with"), "{e}");
    assert_eq!(state(&scene), (StagingState::Copying, None));
    release_staging(&scene.ctx, &id(), FINAL_LSN, Some(Lsn(12))).await.unwrap();
    assert_eq!(state(&scene), (StagingState::Released, Some(FINAL_LSN)));
    assert_eq!(listed_records(&scene), [11, 12]);
}

/// What one run of the fence's sequence reached before the power loss.
#[derive(Debug, Default)]
struct Reached {
    group_durable: bool,
    answered: Option<Lsn>,
}

/// The last group commit, the fence, its `fenced` commit and the release, as the target runs
/// them; stops at the first failure (the power loss).
async fn fence_to_release(scene: &Scene) -> Reached {
    let mut reached = Reached::default();
    if try_stage(scene, &[13, 14]).is_err() {
        return reached;
    }
    reached.group_durable = true;
    let fence = fence_staging(&scene.ctx, &scene.offer, FINAL_LSN, waits(Some(14), 1_000_000)).await;
    let Ok(FenceAnswer::Fenced { durable_lsn, .. }) = fence else { return reached };
    reached.answered = Some(durable_lsn);
    if commit_fenced(&scene.ctx, &scene.layout, &id(), FINAL_LSN).is_err() {
        return reached;
    }
    let _ = release_staging(&scene.ctx, &id(), FINAL_LSN, Some(durable_lsn)).await;
    reached
}

/// A power loss at every sync from the group commit that makes the fence's last records
/// durable to the release, with the unsynced writes lost or torn: a fence the target answered
/// ends released, by a release that names the answer's durable LSN, with every record up to
/// `final_lsn` and none above (also when the `fenced` commit was lost: derived from the staged
/// WAL); one it did not answer leaves the staging `copying` with every acknowledged record (a
/// clean cancel: the source resumes writes and fences again).
#[tokio::test]
async fn a_power_loss_at_any_sync_between_the_fences_flush_and_the_release_ends_released_or_cleanly_cancelled() {
    let base = scene();
    stage(&base, &[11, 12]);
    let whole = started(base.fs.fork());
    let syncs_before = whole.fs.syncs_count();
    let reached = fence_to_release(&whole).await;
    assert_eq!(reached.answered, Some(Lsn(14)));
    assert_eq!(state(&whole), (StagingState::Released, Some(FINAL_LSN)));
    let syncs_count = whole.fs.syncs_count() - syncs_before;
    let (mut derived, mut fenced_on_disk, mut cancelled) = (0, 0, 0);
    let tears: [fn(u64) -> u64; 3] = [|_| 0, |n| n / 2, |n| n.saturating_sub(1)];
    for n in 1..=syncs_count {
        for (t, tear) in tears.iter().enumerate() {
            let attempt = started(base.fs.fork());
            attempt.fs.crash_at_sync(n);
            let reached = fence_to_release(&attempt).await;
            assert!(attempt.fs.has_crashed(), "crash at sync {n}: no crash");
            let after = started(attempt.fs.recover_torn(&mut |k| tear(k)));
            let what = format!("crash at sync {n} of {syncs_count}, tear {t}, reached {reached:?}");
            let durable = after.ctx.wal_durable_lsn(&id()).unwrap();
            assert!(durable >= 12, "{what}: acknowledged records lost (durable {durable})");
            let on_disk = state(&after);
            let Some(answered) = reached.answered else {
                assert_eq!(on_disk, (StagingState::Copying, None), "{what}");
                assert!(!reached.group_durable || durable >= 14, "{what}: the group's records lost");
                cancelled += 1;
                continue;
            };
            match on_disk.0 {
                StagingState::Copying => derived += 1,
                StagingState::Fenced => fenced_on_disk += 1,
                _ => {}
            }
            // The source recorded the release: it tells the target (again) with the answer.
            release_staging(&after.ctx, &id(), FINAL_LSN, Some(answered))
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(state(&after), (StagingState::Released, Some(FINAL_LSN)), "{what}");
            assert_eq!(listed_records(&after), [11, 12, 13, 14], "{what}");
        }
    }
    assert!(derived > 0 && fenced_on_disk > 0 && cancelled > 0, "{derived} {fenced_on_disk} {cancelled}");
}
