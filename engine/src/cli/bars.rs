//! Live progress bars on stderr for `ferry status --watch` and `ferry migrate`, drawn by
//! `indicatif`: one bar per migration and role, with bytes, rate, ETA, the phase, WAL lag and
//! the daemon's "no progress for N s" flag.
//!
//! What it does: [`Bars`] keeps a bar per (migration, role) and moves it to each status it is
//! given; indicatif redraws them in place, measures the rate and the ETA from the positions it
//! sees, and draws nothing when its target is hidden. [`bar_message`] is the text beside each
//! bar, from the status alone (tested on fixed statuses).
//!
//! What it does not: decide what goes to stdout (the commands print their lines or JSON there,
//! untouched by the bars), or talk to a daemon.
//!
//! Invariants: bars are drawn only when stderr is a terminal (and `TERM` is set and not
//! `dumb`: indicatif's own test) and `--json` is off; otherwise the draw target is hidden and
//! nothing reaches stderr from here.

use ferry_wire::api::{MigrationStatus, Phase, Role};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::render::format_bytes;

/// The bar's line: who, the bar, then indicatif's own byte counts, rate and ETA.
const TEMPLATE: &str =
    "{prefix} [{bar:24}] {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}";
/// While the daemon has not sized the base: no bar, no percentage (it would be a lie).
const SIZING_TEMPLATE: &str = "{prefix} [{spinner}] sizing the base {msg}";

/// Where the bars are asked to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// On stderr if it is a terminal (indicatif hides them otherwise).
    Stderr,
    /// Nowhere.
    Hidden,
}

impl Draw {
    /// No bars with `--json`; else stderr, if it is a terminal.
    pub fn for_output(json: bool) -> Self {
        if json {
            Self::Hidden
        } else {
            Self::Stderr
        }
    }
}

/// One bar per migration and role.
#[derive(Debug)]
pub struct Bars {
    multi: MultiProgress,
    shown: bool,
    bars: Vec<(String, Role, ProgressBar)>,
    /// The "waiting for migrations" line while there is no bar.
    waiting: Option<ProgressBar>,
}

impl Bars {
    pub fn new(draw: Draw) -> Self {
        let target = match draw {
            Draw::Stderr => ProgressDrawTarget::stderr(),
            Draw::Hidden => ProgressDrawTarget::hidden(),
        };
        let shown = !target.is_hidden();
        Self { multi: MultiProgress::with_draw_target(target), shown, bars: Vec::new(), waiting: None }
    }

    /// Whether the bars are drawn (a command prints its own lines when not).
    pub fn shown(&self) -> bool {
        self.shown
    }

    /// Moves the bar of `status`'s migration and role to it (a new bar for a new one).
    pub fn show(&mut self, status: &MigrationStatus) {
        if let Some(waiting) = self.waiting.take() {
            waiting.finish_and_clear();
            self.multi.remove(&waiting);
        }
        let found = self.bars.iter().find(|(id, role, _)| *id == status.migration_id && *role == status.role);
        let bar = match found {
            Some((_, _, bar)) => bar.clone(),
            None => {
                // Styled and placed before it is added: its first frame is already this status.
                let bar = ProgressBar::hidden()
                    .with_style(style(TEMPLATE))
                    .with_prefix(format!("{} {}", status.migration_id, role_text(status.role)))
                    .with_position(status.bytes_transferred);
                bar.set_length(status.bytes_total);
                let bar = self.multi.add(bar);
                // Joining a copy half way is not a burst of speed: the rate starts from here.
                bar.tick();
                bar.reset_eta();
                self.bars.push((status.migration_id.clone(), status.role, bar.clone()));
                bar
            }
        };
        let sizing = status.phase == Phase::BaseCopy && status.bytes_total == 0 && status.files_total == 0;
        bar.set_style(style(if sizing { SIZING_TEMPLATE } else { TEMPLATE }));
        bar.set_length(status.bytes_total);
        bar.set_position(status.bytes_transferred);
        bar.set_message(bar_message(status));
        if status.phase.is_final() && !bar.is_finished() {
            bar.finish();
        }
    }

    /// Shows that nothing is there to watch yet.
    pub fn show_waiting(&mut self, text: &str) {
        if self.bars.is_empty() && self.waiting.is_none() {
            let line = self.multi.add(ProgressBar::new_spinner());
            line.set_style(style("{msg}"));
            line.set_message(text.to_owned());
            line.tick();
            self.waiting = Some(line);
        }
    }

    /// Drops the bars of migrations not in `listed` (forgotten ones).
    pub fn keep_only(&mut self, listed: &[MigrationStatus]) {
        let multi = &self.multi;
        self.bars.retain(|(id, role, bar)| {
            let keep = listed.iter().any(|s| s.migration_id == *id && s.role == *role);
            if !keep {
                bar.finish_and_clear();
                multi.remove(bar);
            }
            keep
        });
    }

    /// Runs `print` (a line on stderr) with the bars cleared, then draws them again.
    pub fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        self.multi.suspend(print)
    }

    /// Leaves every bar as last drawn (the command is ending).
    pub fn finish(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.finish_and_clear();
        }
        for (_, _, bar) in &self.bars {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants checked by the tests: a bad one falls back to the default.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("#>-")
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

/// The text beside a bar: the phase, the stall flag, WAL lag and held WAL, files, the rate
/// limit.
pub fn bar_message(status: &MigrationStatus) -> String {
    let mut parts = vec![match status.phase {
        Phase::Failed => format!("Failed: {}", status.reason.as_deref().unwrap_or("no reason given")),
        phase => format!("{phase:?}"),
    }];
    if let Some(s) = status.no_progress_for_s {
        parts.push(format!("no progress for {s} s"));
    }
    if let Some(lag) = status.wal.lag_lsn() {
        parts.push(format!("wal lag {lag} LSN"));
    }
    if status.wal.held_bytes > 0 {
        parts.push(format!("held {}", format_bytes(status.wal.held_bytes)));
    }
    parts.push(format!("files {}/{}", status.files_staged, status.files_total));
    if status.rate_limit_bytes_per_sec > 0 {
        parts.push(format!("limit {}/s", format_bytes(status.rate_limit_bytes_per_sec)));
    }
    parts.join("  ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::render::tests::status;

    #[test]
    fn the_templates_parse() {
        for template in [TEMPLATE, SIZING_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn the_message_says_phase_stall_lag_and_files() {
        let mut s = status();
        assert_eq!(bar_message(&s), "BaseCopy  wal lag 10 LSN  held 64.0 KiB  files 1/4");
        s.no_progress_for_s = Some(12);
        s.rate_limit_bytes_per_sec = 1 << 20;
        assert_eq!(
            bar_message(&s),
            "BaseCopy  no progress for 12 s  wal lag 10 LSN  held 64.0 KiB  files 1/4  limit 1.0 MiB/s"
        );
        s.phase = Phase::Failed;
        s.reason = Some("target disk full".into());
        assert!(bar_message(&s).starts_with("Failed: target disk full  "));
    }

    #[test]
    fn hidden_bars_follow_statuses_without_drawing() {
        let mut bars = Bars::new(Draw::Hidden);
        assert!(!bars.shown());
        bars.show_waiting("no migrations");
        let mut s = status();
        bars.show(&s);
        s.role = Role::Target;
        bars.show(&s);
        s.bytes_transferred = s.bytes_total;
        s.phase = Phase::Completed;
        bars.show(&s);
        assert_eq!(bars.bars.len(), 2);
        assert!(bars.waiting.is_none());
        assert!(bars.bars[1].2.is_finished());
        assert_eq!(bars.bars[1].2.position(), s.bytes_total);
        bars.keep_only(&[s]);
        assert_eq!(bars.bars.len(), 1);
        bars.finish();
    }
}
