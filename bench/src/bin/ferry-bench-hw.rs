//! ferry-bench-hw: the benches that need hardware (issue 19), each against its baseline in
//! the same run, medians of `--rounds`.
//!
//! What it does:
//! - `nvme`: O_DIRECT io_uring reads of one file on an NVMe folder (`--nvme-dir` or
//!   `FERRY_HW_NVME_DIR`), at `--qd` and `--bs`, by ferry's registered-buffer loop
//!   (`ferry_hwtests::nvme::direct`) and by the engine's `uring-direct` reader, against `fio
//!   --ioengine=io_uring --direct=1 --rw=read` on the same file at the same queue depth and
//!   block size (goal: 0.9 of fio). The order rotates each round.
//! - `rdma`: a base copy of a shard in the page cache between two `ferry serve` processes over
//!   RDMA (`transport = "rdma"`, `require_rdma`; `ferry_hwtests::rdma_daemons`), against
//!   `ib_write_bw` on the same device and port (goal: 0.85 of it), with the link's rate, one
//!   core's CRC32C rate and the daemons' CPU time, so the cores that compute CRC32C at the
//!   copy's rate can be stated.
//!
//! What it does not: fail on a figure. Without the hardware (or `fio`, `ib_write_bw`) it prints
//! `skipped: <reason>` for that part and exits 0; it fails only when a run fails.
//!
//! Run: `cargo build --release -p ferry-engine --bin ferry --features rdma && cargo run
//! --release -p ferry-bench --bin ferry-bench-hw -- --nvme-dir /mnt/nvme/ferry --rdma-device
//! mlx5_0` (bench/RESULTS.md has the method).
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use ferry_bench::curve::median;
use ferry_bench::{daemons, hw, parse_size_bytes, procstat};
use ferry_engine::transfer::rdma::select;
use ferry_hwtests::fio::FioBuffers;
use ferry_hwtests::nvme::direct::{self, ReadShape};
use ferry_hwtests::nvme::{self, sysfs, PatternFile};
use ferry_hwtests::rdma_daemons::{RdmaConfig, RdmaPair};

const MB: f64 = 1e6;

#[derive(Debug, Parser)]
#[command(about = "ferry's hardware benches: O_DIRECT reads against fio, an RDMA copy against ib_write_bw")]
struct Args {
    /// Rounds per contender; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only this part: `nvme` or `rdma`.
    #[arg(long)]
    only: Option<String>,
    /// Folder on an NVMe device (default: FERRY_HW_NVME_DIR).
    #[arg(long)]
    nvme_dir: Option<PathBuf>,
    /// Measure a folder that is not on NVMe anyway (to try the method; not the goal's figure).
    #[arg(long)]
    allow_non_nvme: bool,
    /// Size of the file read.
    #[arg(long, default_value = "4GiB")]
    nvme_size: String,
    /// Queue depth (fio's --iodepth).
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Block size (fio's --bs).
    #[arg(long, default_value = "1MiB")]
    bs: String,
    /// RDMA device (default: FERRY_HW_RDMA_DEVICE, else the first with an active port).
    #[arg(long)]
    rdma_device: Option<String>,
    #[arg(long, default_value_t = 1)]
    rdma_port: u8,
    #[arg(long, default_value_t = 0)]
    rdma_gid_index: u8,
    /// Files in the shard the RDMA copy moves.
    #[arg(long, default_value_t = 8)]
    rdma_files: usize,
    /// Size of each file.
    #[arg(long, default_value = "512MiB")]
    rdma_file_size: String,
    /// Chunk size and streams of the copy.
    #[arg(long, default_value = "1MiB")]
    chunk_len: String,
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Iterations of ib_write_bw (1 MiB messages).
    #[arg(long, default_value_t = 5000)]
    ib_iterations: u32,
    /// Where the shard and the target's staging go (default /dev/shm: the page cache, no disk).
    #[arg(long, default_value = "/dev/shm")]
    work_dir: PathBuf,
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or("unknown".into(), |t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let wants = |part: &str| args.only.as_deref().is_none_or(|only| only == part);
    if let Some(only) = &args.only {
        anyhow::ensure!(only == "nvme" || only == "rdma", "--only takes nvme or rdma, not {only:?}");
    }
    println!("load average at start: {}", load_average());
    if wants("nvme") {
        if let Err(skip) = nvme_bench(&args)? {
            println!("nvme: skipped: {skip}");
        }
    }
    if wants("rdma") {
        if let Err(skip) = rdma_bench(&args)? {
            println!("rdma: skipped: {skip}");
        }
    }
    println!("load average at end: {}", load_average());
    Ok(())
}

/// `Ok(Err(reason))`: skipped; `Err`: a run failed.
type Part = anyhow::Result<Result<(), String>>;

fn nvme_bench(args: &Args) -> Part {
    let controllers = ferry_hwtests::probe().nvme_controllers;
    let Some(dir) = args.nvme_dir.clone().or_else(|| std::env::var_os("FERRY_HW_NVME_DIR").map(PathBuf::from)) else {
        return Ok(Err(format!(
            "no NVMe folder: pass --nvme-dir or set FERRY_HW_NVME_DIR (controllers seen: {controllers:?})"
        )));
    };
    let device = match sysfs::device_of(&dir) {
        Ok(device) => device,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if !device.is_nvme() && !args.allow_non_nvme {
        return Ok(Err(format!(
            "{} is on {}, not NVMe (--allow-non-nvme measures it anyway)",
            dir.display(),
            device.describe()
        )));
    }
    let shape = ReadShape {
        queue_depth: args.qd,
        block_len_bytes: u32::try_from(parse_size_bytes(&args.bs)?).context("--bs is too large")?,
    };
    let file = PatternFile::write(&dir, parse_size_bytes(&args.nvme_size)?, device.logical_block_size_bytes())?;
    shape.check(&file.alignment)?;
    let fio = ferry_hwtests::fio::find();
    println!(
        "\n=== nvme: {} on {}, {} MiB file, qd {} bs {}, alignment {}/{} from {:?} ===",
        dir.display(),
        device.describe(),
        file.size_bytes >> 20,
        shape.queue_depth,
        shape.block_len_bytes,
        file.alignment.mem_bytes,
        file.alignment.offset_bytes,
        file.alignment.source
    );
    if let Some(fio) = &fio {
        for buffers in [FioBuffers::Plain, FioBuffers::Registered] {
            let command = ferry_hwtests::fio::command(fio, &file.path, file.size_bytes, shape, buffers);
            println!("fio: {}", ferry_hwtests::fio::command_line(&command));
        }
    }
    let (mut fixed, mut engine, mut plain, mut registered) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Rotate the order so no contender always runs first (or right after another).
        for turn in 0..4 {
            match ((round + turn) % 4, &fio) {
                (0, _) => fixed.push(direct::read_direct(&file.path, shape, &file.alignment, false)?.bytes_per_sec()),
                (1, _) => engine.push(nvme::engine_read(&file, shape)?.bytes_per_sec()),
                (2, Some(fio)) => plain.push(fio_rate(fio, &file, shape, FioBuffers::Plain)?),
                (_, Some(fio)) => registered.push(fio_rate(fio, &file, shape, FioBuffers::Registered)?),
                (_, None) => {}
            }
        }
        let last = |values: &Vec<f64>| values.last().map_or("skipped".into(), |b| format!("{:.0} MB/s", b / MB));
        println!(
            "round {}: loop {}, engine {}, fio {}, fio --fixedbufs {} (load {})",
            round + 1,
            last(&fixed),
            last(&engine),
            last(&plain),
            last(&registered),
            load_average()
        );
    }
    let (base, base_registered) = (median(&plain), median(&registered));
    println!(
        "| reader | MB/s median (min-max) | ratio to fio (goal {}) | ratio to fio --fixedbufs |",
        nvme::FIO_RATIO_GOAL
    );
    println!("|---|---|---|---|");
    for (name, values) in [
        ("registered-buffer loop (READ_FIXED)", &fixed),
        ("engine uring-direct (plain READ)", &engine),
        ("fio", &plain),
        ("fio --fixedbufs=1", &registered),
    ] {
        let ratios = match fio {
            Some(_) => format!(
                "{:.2} | {:.2}",
                nvme::ratio(median(values), base),
                nvme::ratio(median(values), base_registered)
            ),
            None => "- | -".into(),
        };
        println!("| {name} | {} | {ratios} |", spread(values));
    }
    if fio.is_none() {
        println!("fio: skipped: not on PATH (apt-get install fio); no ratio");
    }
    Ok(Ok(()))
}

fn fio_rate(fio: &Path, file: &PatternFile, shape: ReadShape, buffers: FioBuffers) -> anyhow::Result<f64> {
    Ok(ferry_hwtests::fio::run(fio, &file.path, file.size_bytes, shape, buffers)?.bytes_per_sec as f64)
}

/// `median (min-max)` in MB/s (`-` for none).
fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{:.0} ({:.0}-{:.0})", median(values) / MB, min / MB, max / MB)
}

fn rdma_bench(args: &Args) -> Part {
    let devices = select::probe_devices(Path::new(select::SYSFS_DEVICES), args.rdma_port);
    let named = args.rdma_device.clone().or_else(|| std::env::var("FERRY_HW_RDMA_DEVICE").ok());
    let device = match named {
        Some(name) if devices.iter().any(|d| d.name == name && d.usable) => name,
        Some(name) => {
            return Ok(Err(format!("device {name} port {} is not usable here (devices: {devices:?})", args.rdma_port)))
        }
        None => match devices.iter().find(|d| d.usable) {
            Some(d) => d.name.clone(),
            None if devices.is_empty() => return Ok(Err(format!("no RDMA device under {}", select::SYSFS_DEVICES))),
            None => return Ok(Err(format!("no RDMA device with an active port {} ({devices:?})", args.rdma_port))),
        },
    };
    let config = RdmaConfig { device: Some(device.clone()), port: args.rdma_port, gid_index: args.rdma_gid_index };
    let bin = daemons::ferry_bin()?;
    let file_size = parse_size_bytes(&args.rdma_file_size)?;
    let chunk_len = u32::try_from(parse_size_bytes(&args.chunk_len)?).context("--chunk-len is too large")?;
    let mut pair = RdmaPair::start(&bin, &args.work_dir, &config, &device, args.rdma_files, file_size)?;
    let ib = hw::find_ib_write_bw();
    let crc_one_core = hw::crc32c_bytes_per_sec_one_core();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n=== rdma: {device} port {} gid {}, link {}, {} files x {} MiB in {} ===",
        args.rdma_port,
        args.rdma_gid_index,
        hw::link_rate(&device, args.rdma_port),
        args.rdma_files,
        file_size >> 20,
        args.work_dir.display()
    );
    if let Some(ib) = &ib {
        let server = hw::ib_write_bw_args(&device, args.rdma_port, args.rdma_gid_index, args.ib_iterations, None);
        println!("ib_write_bw: server `{} {}`, client the same + 127.0.0.1", ib.display(), server.join(" "));
    }
    let (mut ferry, mut baseline, mut cpu_per_gb) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if let Some(ib) = &ib {
            baseline.push(hw::ib_write_bw(ib, &device, args.rdma_port, args.rdma_gid_index, args.ib_iterations)?);
        }
        let before = (procstat::read_cpu_ticks(pair.source.pid())?.1, procstat::read_cpu_ticks(pair.target.pid())?.1);
        let run = pair.copy(chunk_len, args.streams)?;
        let after = (procstat::read_cpu_ticks(pair.source.pid())?.1, procstat::read_cpu_ticks(pair.target.pid())?.1);
        let rate = run.bytes as f64 / run.elapsed.as_secs_f64().max(1e-9);
        ferry.push(rate);
        let gb = run.bytes as f64 / 1e9;
        let cpu = |a: u64, b: u64| procstat::ticks_to_secs(b.saturating_sub(a)) / gb.max(1e-9);
        cpu_per_gb.push((cpu(before.0, after.0), cpu(before.1, after.1)));
        println!(
            "round {}: ferry {:.0} MB/s, ib_write_bw {} (load {})",
            round + 1,
            rate / MB,
            baseline.last().map_or("skipped".into(), |b| format!("{:.0} MB/s", b / MB)),
            load_average()
        );
    }
    let copy = median(&ferry);
    println!("| contender | MB/s median (min-max) | ratio (goal 0.85) |");
    println!("|---|---|---|");
    match ib {
        Some(_) => {
            let base = median(&baseline);
            println!("| ferry copy, two daemons over RDMA | {} | {:.2} |", spread(&ferry), nvme::ratio(copy, base));
            println!("| ib_write_bw, 1 MiB writes | {} | 1.00 |", spread(&baseline));
        }
        None => {
            println!("| ferry copy, two daemons over RDMA | {} | - |", spread(&ferry));
            println!("ib_write_bw: skipped: not on PATH (apt-get install perftest); no ratio");
        }
    }
    let source_cpu = median(&cpu_per_gb.iter().map(|c| c.0).collect::<Vec<_>>());
    let target_cpu = median(&cpu_per_gb.iter().map(|c| c.1).collect::<Vec<_>>());
    println!(
        "CRC32C: one core here does {:.0} MB/s; one pass over the copy's bytes at {:.0} MB/s takes {:.2} cores. \
         CPU-s per GB: source daemon {source_cpu:.2}, target daemon {target_cpu:.2} ({cores} cores; the source \
         computes CRC32C on its bulk_threads, 2 by default, the target on its runtime's workers)",
        crc_one_core / MB,
        copy / MB,
        copy / crc_one_core.max(1.0)
    );
    Ok(Ok(()))
}
