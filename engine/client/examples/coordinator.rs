//! A coordinator's first steps with ferry-client: who is the daemon, what does it migrate, and
//! what happens next.
//!
//! `cargo run -p ferry-client --example coordinator -- /var/lib/ferry/control/ferry.sock [SECONDS]`
//!
//! Calls `node.info` and `migration.list` on one connection, then subscribes to every
//! migration's events on a second one (a subscribed connection only streams) and prints them
//! for SECONDS (10 by default). It starts nothing: `ControlClient::start` with a
//! `StartParams` does that.

use std::time::Duration;

use anyhow::Context as _;
use ferry_client::{ControlClient, MigrationEvent};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().context("usage: coordinator SOCKET_PATH [SECONDS]")?;
    let watch_secs: u64 =
        args.next().map(|s| s.parse()).transpose().context("SECONDS is a whole number")?.unwrap_or(10);

    let mut calls = ControlClient::connect(&socket).await?;
    let info = calls.node_info().await?;
    println!(
        "node {} (ferry {}, protocol {}) at {}",
        info.node_id, info.version, info.protocol_version, info.quic_address
    );
    for m in calls.list().await? {
        println!(
            "{} {:?} {:?} vshard {:?} {}/{} bytes",
            m.migration_id, m.role, m.phase, m.vshard_id, m.bytes_transferred, m.bytes_total
        );
    }

    let mut events = ControlClient::connect(&socket).await?.migration_events(None).await?;
    let watch = async {
        while let Some(event) = events.next().await? {
            match event {
                MigrationEvent::Status { kind, status } => println!(
                    "event {kind:?}: {} {:?} {:?} {}/{} bytes",
                    status.migration_id, status.role, status.phase, status.bytes_transferred, status.bytes_total
                ),
                MigrationEvent::Dropped { dropped_count } => {
                    println!("{dropped_count} events dropped; ask the status again")
                }
            }
        }
        println!("the daemon closed the connection");
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(watch_secs), watch).await {
        Ok(done) => done,
        Err(_elapsed) => Ok(()),
    }
}
