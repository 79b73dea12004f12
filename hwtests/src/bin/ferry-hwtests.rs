//! Runs every hardware probe and test; prints each outcome; exits non-zero if one failed.
//! With `FERRY_HW_REQUIRE=1` (bare-metal CI), a skipped test fails too. `FERRY_HW=nvme` asks
//! for the NVMe test (with `FERRY_HW_NVME_DIR`), `FERRY_HW=rdma` for the RDMA tests (a binary
//! built with `--features rdma`, and `FERRY_HW_RDMA_DEVICE`); `FERRY_HW=nvme,rdma` for both.

use ferry_hwtests::{
    nvme_direct_read, probe, rdma_copy, rdma_daemon_copy, rdma_fallback, rdma_transfer, requested, Outcome,
};

/// One hardware test: the probe and whether `FERRY_HW` asked for it in, its outcome out.
type Test = fn(&ferry_hwtests::Probe, bool) -> Outcome;

fn main() -> std::process::ExitCode {
    let probe = probe();
    println!("probe: {probe:?}");
    let require = std::env::var("FERRY_HW_REQUIRE").is_ok_and(|v| v == "1");
    let mut failed = false;
    let (nvme, rdma) = (requested("nvme"), requested("rdma"));
    let tests: [(&str, Test, bool); 5] = [
        ("nvme_direct_read", nvme_direct_read, nvme),
        ("rdma_transfer", rdma_transfer, rdma),
        ("rdma_copy", rdma_copy, rdma),
        ("rdma_daemon_copy", rdma_daemon_copy, rdma),
        ("rdma_fallback", rdma_fallback, rdma),
    ];
    for (name, test, asked) in tests {
        match test(&probe, asked) {
            Outcome::Passed(s) => println!("PASS {name}: {s}"),
            Outcome::Skipped(s) => {
                println!("SKIP {name}: {s}");
                failed |= require;
            }
            Outcome::Failed(s) => {
                println!("FAIL {name}: {s}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
