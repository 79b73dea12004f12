//! The target's fence waiting for its staged WAL: a `Fence` that arrives before the records it
//! names waits for them to be durable, and one whose records do not come is cancelled.
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

use super::{fence_staging, FenceWaits};
use crate::staging::{self, StagingLayout};
use crate::storage::{FakeStorage, Storage};
use crate::transfer::target::TargetContext;
use crate::wal::stage::StagedRecord;

const BASE_LSN: Lsn = Lsn(10);

struct Scene {
    ctx: Arc<TargetContext>,
    offer: Offer,
    layout: StagingLayout,
}

/// A live staging, `copying`, with its next MANIFEST commit prepared and its staged WAL open
/// (empty: durable at the base LSN), as the WAL stream's start leaves it.
fn scene() -> Scene {
    let fs = FakeStorage::new();
    fs.create_dir_all(Path::new("/data")).unwrap();
    fs.sync_dir(Path::new("/")).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(fs);
    let ctx = Arc::new(TargetContext::new(NodeId::new("target").unwrap(), "/data".into(), storage.clone()));
    let id = MigrationId::new("m-1").unwrap();
    let layout = StagingLayout::new(Path::new("/data"), &id);
    let manifest = StagingManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        migration_id: id.clone(),
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
    ctx.wal_stages.get_or_open(&storage, &layout, &id, BASE_LSN).unwrap();
    // The staging as the machine knows it once the base is staged.
    ctx.machine().adopt(&id, InboundState::BaseStaged, None);
    ctx.set_wal_durable(&id, BASE_LSN);
    let offer = Offer {
        migration_id: id,
        vshard_id: VShardId(7),
        base_lsn: BASE_LSN,
        chunk_len_bytes: 65536,
        files: Vec::new(),
        db_meta: serde_json::Value::Null,
        wal: true,
    };
    Scene { ctx, offer, layout }
}

/// Stages the records `lsns` durably and tells the waiting fence, as the WAL stream does.
fn stage(scene: &Scene, lsns: &[u64]) {
    let bytes: Vec<Vec<u8>> = lsns
        .iter()
        .map(|lsn| {
            let mut out = Vec::new();
            encode_record(&RecordHeader::new(Layout::B, 1, Lsn(*lsn), VShardId(7)), &[1; 40], &mut out).unwrap();
            out
        })
        .collect();
    let records: Vec<StagedRecord<'_>> = lsns
        .iter()
        .zip(&bytes)
        .map(|(lsn, b)| StagedRecord { lsn: Lsn(*lsn), bytes: b, source_preamble: None })
        .collect();
    let wal = scene.ctx.wal_stages.get(&scene.offer.migration_id).unwrap();
    let durable = wal.lock().unwrap().append_batch(&records).unwrap();
    scene.ctx.set_wal_durable(&scene.offer.migration_id, durable);
}

fn state(scene: &Scene) -> (StagingState, Option<Lsn>) {
    let manifest = staging::read_manifest(&*scene.ctx.storage, &scene.layout).unwrap().unwrap();
    (manifest.state, manifest.final_lsn)
}

fn waits(through_lsn: Option<u64>, wal_wait_max_us: u64) -> FenceWaits {
    FenceWaits { through_lsn: through_lsn.map(Lsn), wal_wait_max_us, apply_wait_max_us: 0 }
}

/// The `Fence` overtook the last records on their way (another QUIC stream): the target
/// fences only once they are durable, and the staged WAL it lists holds them.
#[tokio::test]
async fn a_fence_ahead_of_its_records_waits_for_them_then_fences() {
    let scene = Arc::new(scene());
    stage(&scene, &[11, 12]);
    let fence = {
        let scene = scene.clone();
        tokio::spawn(async move {
            fence_staging(&scene.ctx, &scene.offer, &scene.layout, Lsn(20), waits(Some(14), 10_000_000)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!fence.is_finished(), "fenced before record 14 was durable");
    assert_eq!(state(&scene), (StagingState::Copying, None));
    stage(&scene, &[13]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!fence.is_finished(), "fenced before record 14 was durable");
    stage(&scene, &[14]);
    let answer = tokio::time::timeout(Duration::from_secs(10), fence).await.unwrap().unwrap().unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(14), .. }), "{answer:?}");
    assert_eq!(state(&scene), (StagingState::Fenced, Some(Lsn(20))));
    let manifest = staging::read_manifest(&*scene.ctx.storage, &scene.layout).unwrap().unwrap();
    assert_eq!(manifest.wal_segments.iter().map(|s| s.last_lsn).max(), Some(Lsn(14)));
}

/// Records already durable: no wait; records that never come: cancelled once the wait is
/// over, the staging left `copying`. (A `through_lsn` above `final_lsn` never reaches the
/// engine: `ferry_wire::proto::target` cancels it, and its tests check that.)
#[tokio::test]
async fn a_fence_whose_records_do_not_come_is_cancelled_and_the_staging_is_left_copying() {
    let scene = scene();
    stage(&scene, &[11, 12]);
    let started = std::time::Instant::now();
    let answer =
        fence_staging(&scene.ctx, &scene.offer, &scene.layout, Lsn(20), waits(Some(16), 30_000)).await.unwrap();
    let FenceAnswer::Cancelled { reason } = answer else { panic!("{answer:?}") };
    assert!(reason.contains("durable up to 12, not up to record 16"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(state(&scene), (StagingState::Copying, None));

    // A fence with nothing to wait for (the source saw it durable, or an earlier ferry).
    let answer = fence_staging(&scene.ctx, &scene.offer, &scene.layout, Lsn(20), waits(None, 0)).await.unwrap();
    assert!(matches!(answer, FenceAnswer::Fenced { durable_lsn: Lsn(12), .. }), "{answer:?}");
    assert_eq!(state(&scene), (StagingState::Fenced, Some(Lsn(20))));
}
