//! The RDMA loopback: the engine's RDMA lanes (the same code the fake-device tests run) over
//! a real device, source and target queue pairs on one device connected to each other.
//!
//! What it proves: the `sideway` adapter's verbs calls work on this device (open, query,
//! register, create and connect RC queue pairs, WRITE with immediate, receives, polling), and
//! chunk frames cross whole: every body's CRC32C is checked against the one the header carries.
//!
//! What it does not: run a copy between daemons (`rdma_copy` does) or
//! compare with `ib_write_bw` (the README's performance section gives that method).

use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use ferry_engine::transfer::framing::BodyPieces;
use ferry_engine::transfer::rdma::path::{accept_source, prepare_source, PathConfig};
use ferry_engine::transfer::rdma::sideway_device::SidewayDevice;
use ferry_engine::transfer::transport::{ChunkArrivals, ChunkLane, ChunkLanes, IncomingLane};
use ferry_wire::frame::FrameHeader;

use crate::rdma_daemons::RdmaConfig;

const CHUNK_LEN_BYTES: u32 = 1 << 20;
const CHUNKS_PER_LANE: u32 = 128;
const LANES_COUNT: u32 = 2;

#[allow(clippy::cast_possible_truncation)]
fn chunk(lane: u32, index: u32) -> anyhow::Result<(FrameHeader, Bytes)> {
    let seed = lane.wrapping_mul(0x9e37_79b9) ^ index;
    let body: Vec<u8> = (0..CHUNK_LEN_BYTES).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8).collect();
    let offset_bytes = u64::from(index) * u64::from(CHUNK_LEN_BYTES);
    let header = FrameHeader::chunk(lane, offset_bytes, body.len(), ferry_wire::crc32c(&body))?;
    Ok((header, Bytes::from(body)))
}

/// Runs the loopback; a summary with the rate on success.
pub fn loopback(config: &RdmaConfig) -> anyhow::Result<String> {
    let device = SidewayDevice::open(config.device.as_deref(), config.port, config.gid_index)
        .with_context(|| format!("opening rdma device {:?} port {}", config.device, config.port))?;
    let path = PathConfig::for_chunks(CHUNK_LEN_BYTES, LANES_COUNT);
    let (prepared, hello) = prepare_source(&device, path)?;
    let (arrivals, answer) = accept_source(&device, &hello, path)?;
    let lanes = prepared.connect(&answer)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    runtime.block_on(async {
        let mut receivers = Vec::new();
        for _ in 0..LANES_COUNT {
            let mut incoming = arrivals.accept().await?;
            receivers.push(tokio::spawn(async move {
                let mut body = BodyPieces::default();
                let mut count = 0u32;
                while let Some(header) = incoming.next_header().await? {
                    incoming.read_body(&header, &mut body).await?;
                    anyhow::ensure!(
                        body.crc32c() == header.body_crc32c,
                        "chunk {header:?} arrived with another CRC32C"
                    );
                    count += 1;
                }
                Ok::<_, anyhow::Error>(count)
            }));
        }
        for lane_index in 0..LANES_COUNT {
            let mut lane = lanes.open().await?;
            for index in 0..CHUNKS_PER_LANE {
                let (header, body) = chunk(lane_index, index)?;
                lane.send(&header, body).await?;
            }
            lane.finish()?;
        }
        for receiver in receivers {
            let count = receiver.await??;
            anyhow::ensure!(count == CHUNKS_PER_LANE, "a lane delivered {count} of {CHUNKS_PER_LANE} chunks");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    let mib = f64::from(LANES_COUNT * CHUNKS_PER_LANE);
    Ok(format!(
        "{mib} MiB over {LANES_COUNT} RC lanes of {} (port {}, gid {}) in {secs:.3} s ({:.0} MiB/s), every CRC32C checked",
        device_name(&device),
        config.port,
        config.gid_index,
        mib / secs
    ))
}

fn device_name(device: &SidewayDevice) -> String {
    ferry_engine::transfer::rdma::verbs::Device::name(device).to_owned()
}
