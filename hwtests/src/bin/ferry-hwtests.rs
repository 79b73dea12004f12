//! Runs every hardware probe and test; prints each outcome; exits non-zero if one failed.
//! With `FERRY_HW_REQUIRE=1` (bare-metal CI), a skipped test fails too. `FERRY_HW=rdma` asks
//! for the RDMA loopback and the RDMA base copy (a binary built with `--features rdma`).

use ferry_hwtests::{nvme_direct_read, probe, rdma_copy, rdma_transfer, requested, Outcome};

fn main() -> std::process::ExitCode {
    let probe = probe();
    println!("probe: {probe:?}");
    let require = std::env::var("FERRY_HW_REQUIRE").is_ok_and(|v| v == "1");
    let mut failed = false;
    let rdma = requested("rdma");
    for (name, outcome) in [
        ("nvme_direct_read", nvme_direct_read(&probe)),
        ("rdma_transfer", rdma_transfer(&probe, rdma)),
        ("rdma_copy", rdma_copy(&probe, rdma)),
    ] {
        match outcome {
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
