//! The reference coordinator's cut-over: prepare, pause, fence, resume, release, with retries.
//!
//! What it does: [`cut_over`] drives a live migration in `WalCatchUp` to `Completed` over the
//! source daemon's socket: it asks `migration.prepare_cutover` until the estimate fits the
//! budget (writes are never paused before that), pauses the writer ([`WriteControl::pause`]:
//! the last acknowledged LSN becomes `final_lsn`), fences, and on success resumes writes on the
//! target and releases; a cancelled or violated fence resumes writes on the source and is
//! tried again, up to `fence_retries` more times. `ferry migrate` runs it with shell commands
//! (`--pause-cmd`, `--resume-cmd`, `--resume-source-cmd`); `ferry demo` with its in-process
//! reference writer.
//!
//! What it does not: start the migration or render progress (its callers do).
//!
//! Invariants: writes are paused only after a successful prepare; every pause is followed by a
//! resume (on the target after a completed fence, else on the source), also when the fence
//! call itself fails.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_wire::api::{FenceResult, ReleaseResult};
use ferry_wire::MigrationId;
use serde::Serialize;

use crate::control::{ControlClient, ErrorCode};

/// Pausing and resuming the database's writes for one vShard (the coordinator's side).
pub trait WriteControl {
    /// Pauses writes; returns the last acknowledged LSN (`final_lsn`) and the CLOCK_MONOTONIC
    /// ns writes were paused at.
    fn pause(&mut self) -> anyhow::Result<(u64, u64)>;
    /// Resumes writes on the target after a completed fence; returns the CLOCK_MONOTONIC ns.
    fn resume_on_target(&mut self) -> anyhow::Result<u64>;
    /// Resumes writes on the source after a cancelled fence; returns the CLOCK_MONOTONIC ns.
    fn resume_on_source(&mut self) -> anyhow::Result<u64>;
}

/// How persistent the coordinator is.
#[derive(Debug, Clone, Copy)]
pub struct CutOverOptions {
    /// Fences tried again after a cancelled or violated one.
    pub fence_retries: u32,
    /// How long to wait for the lag to fit the budget before giving up (writes never paused).
    pub catch_up_timeout: Duration,
    /// Between two prepares that did not fit, and after a cancelled fence.
    pub retry_interval: Duration,
}

impl Default for CutOverOptions {
    fn default() -> Self {
        Self {
            fence_retries: 3,
            catch_up_timeout: Duration::from_secs(600),
            retry_interval: Duration::from_millis(100),
        }
    }
}

/// One fence attempt that did not complete.
#[derive(Debug, Clone, Serialize)]
pub struct FailedFence {
    pub final_lsn: u64,
    /// `CutOverCancelled` or `FenceViolated`.
    pub error: String,
    /// Writes paused to resumed on the source, us.
    pub paused_us: u64,
}

/// A completed cut-over.
#[derive(Debug, Clone, Serialize)]
pub struct CutOverOutcome {
    pub fence: FenceResult,
    pub release: ReleaseResult,
    pub prepares_count: u32,
    pub failed_fences: Vec<FailedFence>,
}

/// Runs the cut-over of `id` (see the module docs).
pub async fn cut_over(
    client: &mut ControlClient,
    id: &MigrationId,
    writes: &mut dyn WriteControl,
    options: CutOverOptions,
) -> anyhow::Result<CutOverOutcome> {
    let started = Instant::now();
    let mut prepares_count = 0u32;
    let mut failed_fences = Vec::new();
    loop {
        prepares_count += 1;
        match client.prepare_cutover(id).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::PauseBudgetExceeded) => {
                if started.elapsed() > options.catch_up_timeout {
                    return Err(anyhow::Error::from(e).context(format!(
                        "the lag did not fit the pause budget within {:?}; writes were never paused",
                        options.catch_up_timeout
                    )));
                }
                tokio::time::sleep(options.retry_interval).await;
                continue;
            }
            Err(e) => return Err(anyhow::Error::from(e).context("migration.prepare_cutover failed")),
        }
        let (final_lsn, paused_at_ns) = tokio::task::block_in_place(|| writes.pause()).context("pausing writes")?;
        match client.fence(id, final_lsn, Some(paused_at_ns)).await {
            Ok(fence) => {
                let resumed_at_ns = tokio::task::block_in_place(|| writes.resume_on_target())
                    .context("resuming writes on the target")?;
                let release = client.release(id, Some(resumed_at_ns)).await.context("migration.release failed")?;
                return Ok(CutOverOutcome { fence, release, prepares_count, failed_fences });
            }
            Err(e) => {
                // Whatever went wrong, the source is still authoritative: writes resume there.
                let resumed_at_ns = tokio::task::block_in_place(|| writes.resume_on_source())
                    .context("resuming writes on the source")?;
                let retryable = matches!(e.code(), Some(ErrorCode::CutOverCancelled | ErrorCode::FenceViolated));
                failed_fences.push(FailedFence {
                    final_lsn,
                    error: e.to_string(),
                    paused_us: resumed_at_ns.saturating_sub(paused_at_ns) / 1_000,
                });
                if !retryable {
                    return Err(anyhow::Error::from(e).context("migration.fence failed; writes resumed on the source"));
                }
                if failed_fences.len() > options.fence_retries as usize {
                    return Err(anyhow::Error::from(e).context(format!(
                        "{} fences did not complete (--fence-retries {}); writes resumed on the source, the migration stays in WalCatchUp",
                        failed_fences.len(),
                        options.fence_retries
                    )));
                }
                tokio::time::sleep(options.retry_interval).await;
            }
        }
    }
}

/// The reference writer as the coordinator's write fence: pause, then resume on the target
/// (its vShard's writes go to the target's `node-wal/`; with `target_node_wal: None` they stay
/// on the source, for benches that move the same vShard again and again) or on the source.
#[derive(Debug)]
pub struct RefWrites<'a> {
    pub writer: &'a ferry_refnode::RefWriter,
    pub target_node_wal: Option<&'a std::path::Path>,
}

impl WriteControl for RefWrites<'_> {
    fn pause(&mut self) -> anyhow::Result<(u64, u64)> {
        let ticket = self.writer.pause()?;
        Ok((ticket.last_acked_lsn.0, ticket.paused_at_ns))
    }

    fn resume_on_target(&mut self) -> anyhow::Result<u64> {
        match self.target_node_wal {
            Some(dir) => Ok(self.writer.resume_on_target(dir)?),
            None => Ok(self.writer.resume_on_source()),
        }
    }

    fn resume_on_source(&mut self) -> anyhow::Result<u64> {
        Ok(self.writer.resume_on_source())
    }
}

/// [`WriteControl`] by shell commands (`sh -c`): the pause command prints the last
/// acknowledged LSN on its stdout.
#[derive(Debug, Clone)]
pub struct ShellWrites {
    pub pause_cmd: String,
    pub resume_cmd: String,
    pub resume_source_cmd: String,
}

fn run_shell(what: &str, command: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new("sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run the {what} command {command:?}"))?;
    if !output.status.success() {
        anyhow::bail!("the {what} command {command:?} failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl WriteControl for ShellWrites {
    fn pause(&mut self) -> anyhow::Result<(u64, u64)> {
        // Stamped before the command: the pause reported includes the command's own time.
        let paused_at_ns = crate::clock::monotonic_ns();
        let out = run_shell("--pause-cmd", &self.pause_cmd)?;
        let last = out.split_whitespace().last().unwrap_or("");
        let final_lsn = last.parse::<u64>().with_context(|| {
            format!("--pause-cmd must print the last acknowledged LSN as its last word; it printed {out:?}")
        })?;
        Ok((final_lsn, paused_at_ns))
    }

    fn resume_on_target(&mut self) -> anyhow::Result<u64> {
        run_shell("--resume-cmd", &self.resume_cmd)?;
        Ok(crate::clock::monotonic_ns())
    }

    fn resume_on_source(&mut self) -> anyhow::Result<u64> {
        run_shell("--resume-source-cmd", &self.resume_source_cmd)?;
        Ok(crate::clock::monotonic_ns())
    }
}
