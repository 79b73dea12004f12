//! `ferry demo`'s progress on stderr: one line per phase (base copy, WAL catch-up, cut-over),
//! redrawn in place on a terminal (by `indicatif`), printed about once a second otherwise.
//!
//! What it does: [`ProgressLine`] draws; the `*_line` functions turn a status (and the demo's
//! own elapsed time) into text, so they are tested on fixed statuses. The same text is the
//! terminal's line and the log's: that is why the base copy's bar is drawn here as text
//! ([`bar`]) rather than by indicatif's bar, whose glyphs only reach a terminal.
//!
//! What it does not: poll the daemon or read a clock (the caller passes elapsed times).
//!
//! Invariants: nothing here panics on any status a daemon sends (arithmetic is saturating or
//! widened); each phase ends with a line of its own, whatever the output is.

use std::io::Write;
use std::time::{Duration, Instant};

use ferry_wire::api::MigrationStatus;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::coordinator::CutOverOutcome;
use crate::cli::render::{bar, format_bytes};

/// How often the demo asks the source daemon for the migration's status.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Off a terminal, a progress line at most this often (phase ends are always printed).
const LINE_EVERY_OFF_TERMINAL: Duration = Duration::from_secs(1);
const BAR_WIDTH: usize = 24;

/// The current phase's line on stderr.
#[derive(Debug)]
pub(super) struct ProgressLine {
    /// Whether stderr is a terminal indicatif draws on.
    terminal: bool,
    /// The phase's line, redrawn by indicatif, once the phase showed something.
    live: Option<ProgressBar>,
    last_printed: Option<Instant>,
}

impl ProgressLine {
    pub(super) fn new() -> Self {
        // indicatif hides a target that is not a terminal (or whose TERM is dumb).
        let terminal = !ProgressDrawTarget::stderr().is_hidden();
        Self { terminal, live: None, last_printed: None }
    }

    fn phase_line() -> ProgressBar {
        let line = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        line.set_style(ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
        line
    }

    /// Shows `line` as the phase's current progress.
    pub(super) fn show(&mut self, line: &str) {
        if self.terminal {
            self.live.get_or_insert_with(Self::phase_line).set_message(line.to_owned());
        } else if self.last_printed.is_none_or(|at| at.elapsed() >= LINE_EVERY_OFF_TERMINAL) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
            let _ = err.flush();
            self.last_printed = Some(Instant::now());
        }
    }

    /// Ends the phase with `line` (left on the terminal; the next phase gets a line of its own).
    pub(super) fn finish(&mut self, line: &str) {
        if self.terminal {
            self.live.take().unwrap_or_else(Self::phase_line).finish_with_message(line.to_owned());
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
            let _ = err.flush();
        }
        self.last_printed = None;
    }
}

/// `bytes` over `elapsed_us`, per second (0 when no time passed).
pub(super) fn per_sec(bytes: u64, elapsed_us: u64) -> u64 {
    if elapsed_us == 0 {
        return 0;
    }
    u64::try_from(u128::from(bytes) * 1_000_000 / u128::from(elapsed_us)).unwrap_or(u64::MAX)
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn wal_lag(status: &MigrationStatus) -> String {
    match (status.wal.lag_lsn(), status.wal.current_lsn, status.wal.source_lsn) {
        (Some(lag), durable, Some(tip)) => format!(
            "lag {lag} LSN (durable on the target {}, source tip {tip})",
            durable.map_or_else(|| "-".to_owned(), |d| d.to_string())
        ),
        _ => "lag -".to_owned(),
    }
}

/// `base copy     [#####-------]  41.2%  211.0 MiB / 512.0 MiB  240.1 MiB/s  ETA 2s  wal lag 48 LSN`.
pub(super) fn base_copy_line(status: &MigrationStatus, elapsed_us: u64) -> String {
    let (done, total) = (status.bytes_transferred, status.bytes_total);
    let rate = per_sec(done, elapsed_us);
    let eta = match total.saturating_sub(done) {
        _ if total == 0 => "ETA --".to_owned(),
        0 => "ETA 0s".to_owned(),
        _ if rate == 0 => "ETA --".to_owned(),
        left => format!("ETA {}s", left.div_ceil(rate)),
    };
    let percent = if total == 0 { "  --%".to_owned() } else { format!("{:5.1}%", status.percent()) };
    format!(
        "base copy     {} {percent}  {} / {}  {}/s  {eta}  files {}/{}  wal {}",
        bar(done, total.max(1), BAR_WIDTH),
        format_bytes(done),
        format_bytes(total),
        format_bytes(rate),
        status.files_staged,
        status.files_total,
        wal_lag(status),
    )
}

/// The base copy's last line: what was staged, in how long, at what rate.
pub(super) fn base_done_line(bytes: u64, files_count: u64, elapsed_us: u64) -> String {
    format!(
        "base copy     {} 100.0%  {} in {files_count} files staged in {:.2} s = {}/s",
        bar(1, 1, BAR_WIDTH),
        format_bytes(bytes),
        secs(elapsed_us),
        format_bytes(per_sec(bytes, elapsed_us)),
    )
}

/// `wal catch-up  lag 40 LSN (durable on the target 20004, source tip 20044)  0.6 s / 1.0 s before the cut-over`.
pub(super) fn catch_up_line(status: &MigrationStatus, elapsed_us: u64, planned_us: u64) -> String {
    format!(
        "wal catch-up  {}  {:.1} s / {:.1} s before the cut-over",
        wal_lag(status),
        secs(elapsed_us.min(planned_us)),
        secs(planned_us)
    )
}

/// The cut-over's line: where it fenced and how long writes were paused.
pub(super) fn cut_over_line(cut: &CutOverOutcome) -> String {
    let p = &cut.release.pause;
    format!(
        "cut-over      released at final_lsn {}: writes paused {:.3} ms (estimate {:.3} ms, budget {:.0} ms{}); {} prepare(s), {} fence(s) cancelled",
        cut.release.final_lsn,
        p.pause_duration_us as f64 / 1e3,
        p.estimate_us as f64 / 1e3,
        p.budget_us as f64 / 1e3,
        if p.over_budget { ", OVER BUDGET" } else { "" },
        cut.prepares_count,
        cut.failed_fences.len(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use ferry_wire::api::{FenceResult, ReleaseResult};
    use ferry_wire::fence::{PauseBreakdown, PauseReport};

    fn status(phase: &str, done: u64, total: u64) -> MigrationStatus {
        serde_json::from_value(serde_json::json!({
            "migration_id": "demo-vshard-7", "role": "source", "phase": phase, "vshard_id": 7,
            "peer_node": "demo-target", "bytes_transferred": done, "bytes_total": total, "bytes_resent": 0,
            "files_staged": 3, "files_total": 9,
            "wal": {"start_lsn": 1001, "current_lsn": 1040, "source_lsn": 1080, "held_bytes": 0},
        }))
        .unwrap()
    }

    #[test]
    fn the_base_copy_line_shows_bar_percent_bytes_rate_and_lag() {
        let line = base_copy_line(&status("BaseCopy", 256 << 20, 512 << 20), 2_000_000);
        assert!(line.starts_with("base copy     [############------------]  50.0%"), "{line}");
        assert!(line.contains("256.0 MiB / 512.0 MiB  128.0 MiB/s  ETA 2s"), "{line}");
        assert!(line.contains("files 3/9"), "{line}");
        assert!(line.contains("lag 40 LSN (durable on the target 1040, source tip 1080)"), "{line}");
        // Not sized yet, no time elapsed: no division by zero, no false 100%.
        let line = base_copy_line(&status("BaseCopy", 0, 0), 0);
        assert!(line.contains("  --%") && line.contains("ETA --"), "{line}");
        let done = base_done_line(512 << 20, 9, 4_000_000);
        assert!(done.contains("100.0%  512.0 MiB in 9 files staged in 4.00 s = 128.0 MiB/s"), "{done}");
    }

    #[test]
    fn the_catch_up_line_shows_lag_and_time_left() {
        let line = catch_up_line(&status("WalCatchUp", 1, 1), 600_000, 1_000_000);
        assert_eq!(
            line,
            "wal catch-up  lag 40 LSN (durable on the target 1040, source tip 1080)  0.6 s / 1.0 s before the cut-over"
        );
        let mut no_wal = status("WalCatchUp", 1, 1);
        no_wal.wal = Default::default();
        assert!(catch_up_line(&no_wal, 2_000_000, 1_000_000).contains("lag -  1.0 s / 1.0 s"));
    }

    #[test]
    fn rates_never_divide_by_zero_or_overflow() {
        assert_eq!(per_sec(100, 0), 0);
        assert_eq!(per_sec(1 << 20, 500_000), 2 << 20);
        assert_eq!(per_sec(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn the_cut_over_line_says_the_pause_and_the_estimate() {
        let pause = PauseReport {
            pause_duration_us: 3_215,
            breakdown: PauseBreakdown {
                before_fence_us: 100,
                drain_us: 900,
                target_durable_us: 2_000,
                apply_wait_us: 0,
                after_fence_us: 215,
            },
            estimate_us: 4_100,
            budget_us: 500_000,
            over_budget: false,
        };
        let fence = FenceResult {
            final_lsn: 9,
            target_durable_lsn: 8,
            drain_us: 900,
            target_durable_us: 2_000,
            apply_wait_us: 0,
            paused_so_far_us: 3_000,
            estimate_us: 4_100,
            budget_us: 500_000,
        };
        let cut = CutOverOutcome {
            fence,
            release: ReleaseResult { final_lsn: 9, pause_duration_us: 3_215, pause },
            prepares_count: 1,
            failed_fences: Vec::new(),
        };
        assert_eq!(
            cut_over_line(&cut),
            "cut-over      released at final_lsn 9: writes paused 3.215 ms (estimate 4.100 ms, budget 500 ms); 1 prepare(s), 0 fence(s) cancelled"
        );
    }
}
