//! The RDMA path against the fake device: handshake, pool bounds, ordering, completion
//! errors, lost writes and queue pairs, and a base copy through the production machines.

#![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]

use std::time::Duration;

use bytes::Bytes;
use ferry_wire::frame::FrameHeader;
use ferry_wire::rdma::RdmaHandshake;

use super::fake::{Fabric, FakeDevice, Faults};
use super::incoming::{RdmaArrivals, RdmaIncoming};
use super::lane::RdmaLanes;
use super::path::{accept_source, prepare_source, PathConfig};
use super::pool::Pool;
use super::verbs::{Device, DeviceLimits};
use crate::transfer::framing::BodyPieces;
use crate::transfer::transport::{ChunkArrivals, ChunkLane, ChunkLanes, IncomingLane};
use crate::transfer::TransferError;

const LIMITS: DeviceLimits = DeviceLimits { max_mr_size_bytes: 1 << 20, max_qp_wr: 128 };

fn config(lanes_count: u32, slots_per_lane: u32) -> PathConfig {
    PathConfig {
        slots_per_lane,
        completion_timeout: Duration::from_millis(300),
        ..PathConfig::for_chunks(4096, lanes_count)
    }
}

/// Both ends of a path on one fabric, the handshakes through their codec both ways.
fn connected(faults: Faults, config: PathConfig) -> (Fabric, RdmaLanes<FakeDevice>, RdmaArrivals<FakeDevice>) {
    let fabric = Fabric::new(Faults::default());
    let (source_device, target_device) = (fabric.device(LIMITS), fabric.device(LIMITS));
    let (prepared, hello) = prepare_source(&source_device, config).unwrap();
    let hello = RdmaHandshake::decode(&hello.encode().unwrap()).unwrap();
    let (arrivals, answer) = accept_source(&target_device, &hello, config).unwrap();
    let answer = RdmaHandshake::decode(&answer.encode().unwrap()).unwrap();
    assert_eq!(answer.lanes.len(), config.lanes_count as usize);
    assert!(answer.lanes.iter().all(|l| l.slots.len() == config.slots_per_lane as usize));
    let lanes = prepared.connect(&answer).unwrap();
    fabric.set_faults(faults);
    (fabric, lanes, arrivals)
}

fn frame(i: u32) -> (FrameHeader, Bytes) {
    let body: Vec<u8> = (0..1000 + i).map(|b| (b.wrapping_mul(31) ^ i) as u8).collect();
    let header = FrameHeader::chunk(0, u64::from(i) * 4096, body.len(), ferry_wire::crc32c(&body)).unwrap();
    (header, Bytes::from(body))
}

/// Reads every frame of a lane until it finishes or fails.
async fn drain(mut incoming: RdmaIncoming<FakeDevice>) -> Result<Vec<(FrameHeader, u32)>, TransferError> {
    let mut got = Vec::new();
    let mut body = BodyPieces::default();
    while let Some(header) = incoming.next_header().await? {
        incoming.read_body(&header, &mut body).await?;
        got.push((header, body.crc32c()));
    }
    Ok(got)
}

#[tokio::test]
async fn frames_arrive_whole_and_in_order_through_delays_and_reordered_completions() {
    let faults = Faults { delay_polls: 3, reorder_receives: true, ..Faults::default() };
    let (fabric, lanes, arrivals) = connected(faults, config(2, 4));
    let receivers =
        [arrivals.accept().await.unwrap(), arrivals.accept().await.unwrap()].map(|l| tokio::spawn(drain(l)));
    for _ in 0..2 {
        let mut lane = lanes.open().await.unwrap();
        for i in 0..40 {
            let (header, body) = frame(i);
            lane.send(&header, body).await.unwrap();
        }
        lane.finish().unwrap();
    }
    assert!(lanes.open().await.is_err(), "a third lane was never connected");
    for receiver in receivers {
        let got = receiver.await.unwrap().unwrap();
        let expected: Vec<_> = (0..40).map(|i| (frame(i).0, frame(i).0.body_crc32c)).collect();
        assert_eq!(got, expected);
    }
    // Every frame and every lane's end was one write; credits were 80 more.
    assert_eq!(fabric.writes_count(), 2 * 41 + 80);
}

#[tokio::test]
async fn the_source_never_has_more_frames_in_flight_than_the_target_has_slots() {
    let (_fabric, lanes, arrivals) = connected(Faults::default(), config(1, 2));
    let mut lane = lanes.open().await.unwrap();
    let mut incoming = arrivals.accept().await.unwrap();
    for i in 0..2 {
        let (header, body) = frame(i);
        lane.send(&header, body).await.unwrap();
    }
    // The third waits for a credit the target never gives: it times out, retryably.
    let (header, body) = frame(2);
    let err = lane.send(&header, body).await.unwrap_err();
    assert!(matches!(err, TransferError::Timeout(_)) && err.is_transient(), "{err}");
    // Once the target reads one, a slot is free again.
    let header = incoming.next_header().await.unwrap().unwrap();
    incoming.read_body(&header, &mut BodyPieces::default()).await.unwrap();
    let (header, body) = frame(2);
    lane.send(&header, body).await.unwrap();
}

#[tokio::test]
async fn the_pool_splits_at_max_mr_size_and_lends_no_more_than_it_has() {
    let device = Fabric::default().device(DeviceLimits { max_mr_size_bytes: 3 * 4096, max_qp_wr: 16 });
    let pool = Pool::register(&device, 4096, 10).unwrap();
    assert_eq!(pool.regions_count(), 4, "10 buffers, 3 per region");
    let lent: Vec<_> = (0..10).map(|_| pool.try_acquire().unwrap()).collect();
    assert!(pool.try_acquire().is_none());
    // No two buffers overlap, and each lies inside its region.
    let mut places: Vec<_> = lent.iter().map(|b| (b.remote().rkey, b.remote().addr)).collect();
    places.sort_unstable();
    places.dedup();
    assert_eq!(places.len(), 10);
    for buffer in &lent {
        let (region, offset) = buffer.region();
        assert!(offset + 4096 <= super::verbs::Region::len_bytes(region));
    }
    assert!(lent[0].fill(&[&[0u8; 4097]]).is_err(), "a fill past the buffer is refused");
    drop(lent);
    assert_eq!(pool.available_count(), 10);
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move {
            let held: Vec<_> = (0..10).map(|_| pool.try_acquire().unwrap()).collect();
            let late = tokio::spawn({
                let pool = pool.clone();
                async move { pool.acquire().await.len_bytes() }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!late.is_finished(), "an 11th buffer waits");
            drop(held);
            late.await.unwrap()
        }
    });
    assert_eq!(waiter.await.unwrap(), 4096);
    // A buffer larger than one region may be is refused, not split.
    assert!(Pool::register(&device, 4 * 4096, 1).is_err());
}

#[tokio::test]
async fn a_completion_in_error_fails_both_ends_retryably() {
    // Write 1 is the first frame; write 3 (a frame or a credit, as the ends race) fails.
    let (_fabric, lanes, arrivals) = connected(Faults { fail_write: Some(3), ..Faults::default() }, config(1, 4));
    let receiver = tokio::spawn(drain(arrivals.accept().await.unwrap()));
    let mut lane = lanes.open().await.unwrap();
    let mut failed = None;
    for i in 0..10 {
        let (header, body) = frame(i);
        if let Err(e) = lane.send(&header, body).await {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.expect("the source saw the failed completion");
    assert!(failed.is_transient(), "{failed}");
    let target = receiver.await.unwrap().unwrap_err();
    assert!(target.is_transient(), "{target}");
}

#[tokio::test]
async fn a_lost_write_times_out_and_a_lost_queue_pair_fails_at_once() {
    let (_fabric, lanes, arrivals) = connected(Faults { lose_write: Some(1), ..Faults::default() }, config(1, 1));
    let _incoming = arrivals.accept().await.unwrap();
    let mut lane = lanes.open().await.unwrap();
    let (header, body) = frame(0);
    lane.send(&header, body).await.unwrap();
    let (header, body) = frame(1);
    let err = lane.send(&header, body).await.unwrap_err();
    assert!(matches!(err, TransferError::Timeout(_)), "{err}");

    let (_fabric, lanes, arrivals) = connected(Faults { lose_qp_at_write: Some(2), ..Faults::default() }, config(1, 4));
    let receiver = tokio::spawn(drain(arrivals.accept().await.unwrap()));
    let mut lane = lanes.open().await.unwrap();
    let (header, body) = frame(0);
    lane.send(&header, body).await.unwrap();
    let (header, body) = frame(1);
    let err = lane.send(&header, body).await.unwrap_err();
    assert!(matches!(err, TransferError::Connection(_)) && err.to_string().contains("lost"), "{err}");
    assert!(receiver.await.unwrap().unwrap_err().is_transient());
    arrivals.close();
    assert!(arrivals.accept().await.is_err(), "a closed path accepts no lane");
}

#[tokio::test]
async fn a_handshake_the_target_cannot_take_is_refused() {
    let fabric = Fabric::default();
    let device = fabric.device(LIMITS);
    let (_prepared, hello) = prepare_source(&device, config(4, 4)).unwrap();
    let err = accept_source(&device, &hello, config(2, 4)).unwrap_err();
    assert!(matches!(err, TransferError::Protocol(_)), "{err}");
    let (prepared, hello) = prepare_source(&device, config(2, 4)).unwrap();
    let (_arrivals, mut answer) = accept_source(&device, &hello, config(2, 4)).unwrap();
    answer.lanes.pop();
    assert!(matches!(prepared.connect(&answer), Err(TransferError::Protocol(_))));
    assert!(device.create_qp(LIMITS.max_qp_wr + 1).is_err());
}

#[tokio::test]
async fn a_base_copy_crosses_fake_rdma_lanes_between_the_real_machines() {
    let config = PathConfig { slots_per_lane: 4, ..PathConfig::for_chunks(64 << 10, 3) };
    let faults = Faults { delay_polls: 2, reorder_receives: true, ..Faults::default() };
    let (_fabric, lanes, arrivals) = connected(faults, config);
    crate::transfer::transport_tests::copy_one_file_over(lanes, arrivals, 3).await;
}

#[tokio::test]
async fn a_copy_cut_by_a_lost_completion_or_queue_pair_resumes_and_sends_only_what_is_missing() {
    use crate::transfer::transport_tests::Rig;
    let config = PathConfig {
        slots_per_lane: 4,
        completion_timeout: Duration::from_millis(300),
        ..PathConfig::for_chunks(64 << 10, 3)
    };
    // The first write (always a frame: credits only follow frames) vanishes with its
    // completion; on one lane, the source stalls on its credit four frames later. From the
    // eighth write on (frames and credits), every queue pair is lost.
    let lost_completion = (Faults { lose_write: Some(1), ..Faults::default() }, 1);
    let lost_queue_pair = (Faults { lose_qp_at_write: Some(8), ..Faults::default() }, 3);
    for (faults, lanes_count) in [lost_completion, lost_queue_pair] {
        let config = PathConfig { lanes_count, ..config };
        let rig = Rig::new();
        let (_fabric, lanes, arrivals) = connected(faults.clone(), config);
        let first = rig.attempt(lanes, arrivals, lanes_count as usize, &[]).await;
        let err = first.source_error.expect("the fault failed the attempt");
        assert!(err.is_transient(), "{faults:?}: {err}");
        assert!(first.written.len() < rig.chunks_count(), "{faults:?}: nothing was missing");
        // A new attempt on a new path: the target's accept lists what it holds, and only the
        // rest is sent.
        let (_fabric, lanes, arrivals) = connected(Faults::default(), config);
        let second = rig.attempt(lanes, arrivals, lanes_count as usize, &first.written).await;
        assert!(second.source_error.is_none(), "{:?}", second.source_error);
        assert_eq!(first.written.len() + second.written.len(), rig.chunks_count(), "{faults:?}");
        assert_eq!(rig.part(), rig.data);
    }
}

#[tokio::test]
async fn a_lane_whose_last_write_vanishes_fails_its_attempt_and_the_copy_resumes() {
    use crate::transfer::transport_tests::Rig;
    let config = PathConfig {
        slots_per_lane: 4,
        completion_timeout: Duration::from_millis(300),
        ..PathConfig::for_chunks(64 << 10, 1)
    };
    let rig = Rig::new();
    // One lane carries every chunk; its last frame's write vanishes with its completion (the
    // lane's end still arrives). The second attempt's queue pair writes one frame only.
    let faults = Faults { lose_payload_write_per_qp: Some(rig.chunks_count() as u64), ..Faults::default() };
    let (_fabric, lanes, arrivals) = connected(faults.clone(), config);
    let first = tokio::time::timeout(Duration::from_secs(20), rig.attempt(lanes, arrivals, 1, &[]))
        .await
        .expect("the attempt ended: a lane whose last write vanished must not wait for it for ever");
    let err = first.source_error.expect("the lane whose last write never completed failed");
    assert!(matches!(err, TransferError::Timeout(_)) && err.is_transient(), "{err}");
    assert_eq!(first.written.len(), rig.chunks_count() - 1, "every frame but the lost one was written");
    let (_fabric, lanes, arrivals) = connected(faults, config);
    let second = rig.attempt(lanes, arrivals, 1, &first.written).await;
    assert!(second.source_error.is_none(), "{:?}", second.source_error);
    assert_eq!(second.written.len(), 1, "only the lost chunk was sent again");
    assert_eq!(rig.part(), rig.data);
}
