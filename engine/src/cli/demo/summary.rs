//! The numbers of one `ferry demo` run, computed once, and the checks that decide its exit
//! status.
//!
//! What it does: [`Summary::new`] computes every number from the run (the writer's log, the
//! stamps, the lag samples, the cut-over's answer, the verification, the staging's
//! MANIFEST.json read by [`ManifestCheck`]); [`Summary::failures`] lists what makes the demo
//! fail: a failed verification, a write acknowledged while writes were paused, a longest gap
//! between acks shorter than the reported pause, pause parts that do not add up, a pause the
//! writer's own stamps disagree with, a staging not `released` at `final_lsn`, a source that
//! does not say `Completed`.
//!
//! What it does not: measure anything (the live run did) or render (see [`super::report`]).
//!
//! Invariants: latencies are nearest-rank percentiles of the writes acknowledged inside a
//! window of the writer's own CLOCK_MONOTONIC stamps; a window without acks is `None`, never 0;
//! lag in records is counted from the writer's log between the two LSNs of one daemon snapshot.

use std::path::Path;

use ferry_wire::api::Phase;
use ferry_wire::Lsn;
use serde_json::Value;

use super::live::{LagSample, LiveRun};
use super::progress::per_sec;
use super::{DemoArgs, VSHARD};
use crate::cli::coordinator::CutOverOutcome;
use ferry_refnode::{ResumedOn, Verification, WritePlace, WriterLog};

/// MANIFEST.json of the staging, read as plain JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ManifestCheck {
    pub state: Option<String>,
    pub final_lsn: Option<u64>,
    /// Why it could not be read, if it could not.
    pub problem: Option<String>,
}

impl ManifestCheck {
    pub(super) fn read(path: &Path) -> Self {
        let value: Value = match std::fs::read(path).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => {
                return Self { problem: Some(format!("{} is not JSON: {e}", path.display())), ..Self::default() }
            }
            Err(e) => return Self { problem: Some(format!("cannot read {}: {e}", path.display())), ..Self::default() },
        };
        Self {
            state: value.get("state").and_then(Value::as_str).map(str::to_owned),
            final_lsn: value.get("final_lsn").and_then(Value::as_u64),
            problem: None,
        }
    }
}

/// Ack latency of one window, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Latency {
    pub writes_count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

fn latency(log: &WriterLog, from_ns: u64, to_ns: u64) -> Option<Latency> {
    log.ack_latency(from_ns, to_ns).map(|l| Latency {
        writes_count: l.writes_count,
        p50_us: l.p50_ns / 1_000,
        p99_us: l.p99_ns / 1_000,
        max_us: l.max_ns / 1_000,
    })
}

/// vShard writes with a source LSN in (`after`, `upto`]; `lsns` is sorted.
pub(super) fn records_between(lsns: &[u64], after: u64, upto: u64) -> u64 {
    let low = lsns.partition_point(|l| *l <= after);
    let high = lsns.partition_point(|l| *l <= upto);
    high.saturating_sub(low) as u64
}

/// The lag of one sample in vShard records: read by the source's tail, not yet durable on the
/// target (nothing is durable above `base_lsn` until the daemon says so); `None` before the
/// tail has read anything.
fn lag_records(lsns: &[u64], sample: &LagSample, base_lsn: Lsn) -> Option<u64> {
    let durable = sample.durable_lsn.unwrap_or(base_lsn.0).max(base_lsn.0);
    Some(records_between(lsns, durable, sample.source_lsn?))
}

/// The lag of one sample in LSNs (the daemon's own figure).
fn lag_lsn(sample: &LagSample) -> Option<u64> {
    Some(sample.source_lsn?.saturating_sub(sample.durable_lsn.unwrap_or(0)))
}

/// The gap between the last ack at or before `paused_at_ns` and the first at or after
/// `resumed_at_ns`: how long the writer saw nothing acknowledged around the pause.
fn ack_gap_across(log: &WriterLog, paused_at_ns: u64, resumed_at_ns: u64) -> Option<u64> {
    let mut before = None;
    for w in log.writes() {
        if w.ack_ns <= paused_at_ns {
            before = Some(w.ack_ns);
        } else if w.ack_ns >= resumed_at_ns {
            return Some(w.ack_ns.saturating_sub(before?) / 1_000);
        }
    }
    None
}

fn us_between(from_ns: u64, to_ns: u64) -> u64 {
    to_ns.saturating_sub(from_ns) / 1_000
}

/// Every number the reports print, computed once.
#[derive(Debug)]
pub(super) struct Summary {
    pub verification: Verification,
    pub manifest: ManifestCheck,
    pub cut: CutOverOutcome,
    pub base_lsn: u64,
    pub export_files_count: u64,
    pub export_bytes: u64,
    pub export_entries_count: u64,
    pub bulk_files_count: u64,
    pub bulk_bytes: u64,
    pub generate_us: u64,
    pub base_bytes: u64,
    pub base_files_count: u64,
    pub base_bytes_resent: u64,
    pub base_elapsed_us: u64,
    pub base_throughput_bytes_per_sec: u64,
    pub daemon_throughput_bytes_per_sec: u64,
    pub writes_count: u64,
    pub vshard_writes_count: u64,
    pub node_wal_writes_count: u64,
    pub flushes_count: u64,
    pub rate_writes_per_sec: u64,
    pub ack_without_migration: Option<Latency>,
    pub ack_during_copy: Option<Latency>,
    pub ack_during_catch_up: Option<Latency>,
    pub ack_after_release: Option<Latency>,
    pub longest_ack_gap_us: Option<u64>,
    pub acks_during_pause_count: u64,
    pub pauses_count: u64,
    /// The completed cut-over's pause by the writer's own stamps.
    pub writer_pause_us: Option<u64>,
    /// Last ack before the completed pause to the first after it.
    pub ack_gap_across_pause_us: Option<u64>,
    pub lag_max_records_during_copy: Option<u64>,
    pub lag_max_records: Option<u64>,
    pub lag_max_lsn: Option<u64>,
    pub lag_at_cut_over_records: Option<u64>,
    pub lag_samples_count: u64,
    pub baseline_us: u64,
    pub catch_up_us: u64,
    pub cut_over_us: u64,
    pub after_release_us: u64,
    pub source_phase: Phase,
    pub target_staging_state: Option<String>,
}

impl Summary {
    pub(super) fn new(args: &DemoArgs, run: &LiveRun, verification: Verification, manifest: ManifestCheck) -> Self {
        let (log, s) = (&run.log, &run.stamps);
        let lsns: Vec<u64> = log.migrating_source_writes(Lsn(u64::MAX)).iter().map(|e| e.source_lsn.0).collect();
        let lag = |catching_up: bool| {
            run.samples
                .iter()
                .filter(move |x| x.catching_up == catching_up)
                .filter_map(|x| lag_records(&lsns, x, run.base_lsn))
        };
        let mut acks_during_pause_count = 0;
        let mut writer_pause_us = None;
        let mut ack_gap_across_pause_us = None;
        for pause in log.pauses() {
            if let Some(resumed_at_ns) = pause.resumed_at_ns {
                acks_during_pause_count += log.acks_between(pause.paused_at_ns, resumed_at_ns);
                if pause.resumed_on == Some(ResumedOn::Target) {
                    writer_pause_us = Some(us_between(pause.paused_at_ns, resumed_at_ns));
                    ack_gap_across_pause_us = ack_gap_across(log, pause.paused_at_ns, resumed_at_ns);
                }
            }
        }
        let writes_count = log.writes_count();
        let base_elapsed_us = us_between(s.migration_started_ns, s.base_done_ns);
        let writing_us = us_between(log.started_ns(), log.finished_ns());
        let catching_up = run.samples.iter().filter(|x| x.catching_up);
        Summary {
            base_lsn: run.base_lsn.0,
            export_files_count: run.export.files.len() as u64,
            export_bytes: run.export.bytes,
            export_entries_count: run.export.entries_count,
            bulk_files_count: run.bulk.as_ref().map_or(0, |b| b.files.len() as u64),
            bulk_bytes: run.bulk.as_ref().map_or(0, |b| b.bytes),
            generate_us: us_between(s.baseline_end_ns, s.migration_started_ns),
            base_bytes: run.base.bytes,
            base_files_count: run.base.files_count,
            base_bytes_resent: run.base.bytes_resent,
            base_elapsed_us,
            base_throughput_bytes_per_sec: per_sec(run.base.bytes, base_elapsed_us),
            daemon_throughput_bytes_per_sec: run.base.daemon_throughput_bytes_per_sec,
            writes_count,
            vshard_writes_count: log.writes().filter(|w| w.vshard == VSHARD).count() as u64,
            node_wal_writes_count: log.writes().filter(|w| matches!(w.place, WritePlace::TargetNode(_))).count() as u64,
            flushes_count: log.flushes_count(),
            rate_writes_per_sec: per_sec(writes_count, writing_us),
            ack_without_migration: latency(log, log.started_ns(), s.baseline_end_ns),
            ack_during_copy: latency(log, s.migration_started_ns, s.base_done_ns),
            ack_during_catch_up: latency(log, s.base_done_ns, s.cut_over_started_ns),
            ack_after_release: latency(log, s.released_ns, log.finished_ns()),
            longest_ack_gap_us: log.longest_ack_gap().map(|g| g.gap_ns / 1_000),
            acks_during_pause_count,
            pauses_count: log.pauses().len() as u64 + log.pauses_unlogged_count(),
            writer_pause_us,
            ack_gap_across_pause_us,
            lag_max_records_during_copy: lag(false).max(),
            lag_max_records: lag(true).max(),
            lag_max_lsn: catching_up.filter_map(lag_lsn).max(),
            lag_at_cut_over_records: lag(true).next_back(),
            lag_samples_count: run.samples.len() as u64,
            baseline_us: args.baseline_ms.saturating_mul(1_000),
            catch_up_us: us_between(s.base_done_ns, s.cut_over_started_ns),
            cut_over_us: us_between(s.cut_over_started_ns, s.released_ns),
            after_release_us: us_between(s.released_ns, log.finished_ns()),
            source_phase: run.source_final.phase,
            target_staging_state: run.target_staging_state.clone(),
            cut: run.cut.clone(),
            verification,
            manifest,
        }
    }

    pub(super) fn pause_parts_sum_us(&self) -> u64 {
        self.cut.release.pause.breakdown.total_us()
    }

    /// Why the demo fails; empty when it passes.
    pub(super) fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let v = &self.verification;
        if !v.passed() {
            out.push(format!(
                "verification: lost {}, duplicated {}, unexpected {}, segments {}, {} problem(s)",
                v.lost_count,
                v.duplicate_count,
                v.unexpected_count,
                if v.segments_identical { "identical" } else { "DIFFERENT" },
                v.problems_count
            ));
        }
        if self.acks_during_pause_count != 0 {
            out.push(format!("{} write(s) acknowledged while writes were paused", self.acks_during_pause_count));
        }
        let pause_us = self.cut.release.pause.pause_duration_us;
        match self.longest_ack_gap_us {
            Some(gap) if gap >= pause_us => {}
            gap => out.push(format!(
                "the writer's longest gap between acks ({} us) is shorter than the reported pause ({pause_us} us)",
                gap.map_or_else(|| "none".to_owned(), |g| g.to_string())
            )),
        }
        if self.pause_parts_sum_us() != pause_us {
            out.push(format!("the pause's parts add up to {} us, not {pause_us} us", self.pause_parts_sum_us()));
        }
        if self.writer_pause_us != Some(pause_us) {
            out.push(format!(
                "the daemon reported a {pause_us} us pause, the writer's own stamps say {:?} us",
                self.writer_pause_us
            ));
        }
        let final_lsn = self.cut.release.final_lsn;
        if self.manifest.state.as_deref() != Some("released") || self.manifest.final_lsn != Some(final_lsn) {
            out.push(format!(
                "MANIFEST.json says state {:?} at final_lsn {:?}, expected \"released\" at {final_lsn}{}",
                self.manifest.state,
                self.manifest.final_lsn,
                self.manifest.problem.as_deref().map(|p| format!(" ({p})")).unwrap_or_default()
            ));
        }
        if self.source_phase != Phase::Completed {
            out.push(format!("the source daemon says {:?}, not Completed", self.source_phase));
        }
        out
    }
}

/// A summary of a run that passed every check (for the renderers' tests).
#[cfg(test)]
pub(super) fn passing_for_tests() -> Summary {
    use ferry_wire::api::{FenceResult, ReleaseResult};
    use ferry_wire::fence::{PauseBreakdown, PauseReport};
    let pause = PauseReport {
        pause_duration_us: 3_000,
        breakdown: PauseBreakdown {
            before_fence_us: 100,
            drain_us: 900,
            target_durable_us: 1_700,
            apply_wait_us: 0,
            after_fence_us: 300,
        },
        estimate_us: 4_000,
        budget_us: 500_000,
        over_budget: false,
    };
    let fence = FenceResult {
        final_lsn: 90,
        target_durable_lsn: 88,
        drain_us: 900,
        target_durable_us: 1_700,
        apply_wait_us: 0,
        paused_so_far_us: 2_700,
        estimate_us: 4_000,
        budget_us: 500_000,
    };
    Summary {
        verification: Verification { segments_identical: true, expected_count: 10, ..Verification::default() },
        manifest: ManifestCheck { state: Some("released".into()), final_lsn: Some(90), problem: None },
        cut: CutOverOutcome {
            fence,
            release: ReleaseResult { final_lsn: 90, pause_duration_us: 3_000, pause },
            prepares_count: 1,
            failed_fences: Vec::new(),
        },
        base_lsn: 10,
        export_files_count: 1,
        export_bytes: 64,
        export_entries_count: 2,
        bulk_files_count: 2,
        bulk_bytes: 1 << 20,
        generate_us: 1,
        base_bytes: (1 << 20) + 64,
        base_files_count: 3,
        base_bytes_resent: 0,
        base_elapsed_us: 1_000,
        base_throughput_bytes_per_sec: 1,
        daemon_throughput_bytes_per_sec: 1,
        writes_count: 100,
        vshard_writes_count: 25,
        node_wal_writes_count: 5,
        flushes_count: 50,
        rate_writes_per_sec: 100,
        ack_without_migration: None,
        ack_during_copy: None,
        ack_during_catch_up: None,
        ack_after_release: None,
        longest_ack_gap_us: Some(3_200),
        acks_during_pause_count: 0,
        pauses_count: 1,
        writer_pause_us: Some(3_000),
        ack_gap_across_pause_us: Some(3_200),
        lag_max_records_during_copy: None,
        lag_max_records: Some(4),
        lag_max_lsn: Some(16),
        lag_at_cut_over_records: Some(1),
        lag_samples_count: 3,
        baseline_us: 1,
        catch_up_us: 1,
        cut_over_us: 1,
        after_release_us: 1,
        source_phase: Phase::Completed,
        target_staging_state: Some("released".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn lag_counts_the_vshard_records_read_but_not_yet_durable() {
        let lsns = [4, 8, 12, 16];
        assert_eq!(records_between(&lsns, 4, 12), 2);
        assert_eq!(records_between(&lsns, 0, 3), 0);
        assert_eq!(records_between(&lsns, 12, 12), 0);
        assert_eq!(records_between(&lsns, 3, 100), 4);
        assert_eq!(records_between(&lsns, 20, 10), 0, "a durable LSN past the acked one is no lag");
        let sample = |durable_lsn, source_lsn| LagSample { at_ns: 0, catching_up: true, durable_lsn, source_lsn };
        assert_eq!(lag_records(&lsns, &sample(Some(8), Some(16)), Lsn(4)), Some(2));
        assert_eq!(lag_lsn(&sample(Some(8), Some(16))), Some(8));
        assert_eq!(lag_records(&lsns, &sample(None, Some(16)), Lsn(4)), Some(3), "nothing durable: all above base_lsn");
        assert_eq!(lag_records(&lsns, &sample(Some(1), Some(16)), Lsn(4)), Some(3), "counted from base_lsn at least");
        assert_eq!(lag_records(&lsns, &sample(Some(8), None), Lsn(4)), None, "the tail has read nothing yet");
        assert_eq!(lag_lsn(&sample(Some(8), None)), None);
    }

    #[test]
    fn the_manifest_is_read_as_plain_json_and_its_absence_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("MANIFEST.json");
        let missing = ManifestCheck::read(&path);
        assert!(missing.state.is_none() && missing.problem.unwrap().contains("cannot read"));
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(ManifestCheck::read(&path).problem.unwrap().contains("is not JSON"));
        std::fs::write(&path, br#"{"state": "released", "final_lsn": 42, "segments": []}"#).unwrap();
        assert_eq!(
            ManifestCheck::read(&path),
            ManifestCheck { state: Some("released".into()), final_lsn: Some(42), problem: None }
        );
    }

    /// A log of writes 0..8 acked 1 ms apart, with a 10 ms pause between the acks of 3 and 4.
    fn log() -> WriterLog {
        let acks = (0..8u64).map(|seq| {
            let ack_ns = 1_000_000 * (seq + 1) + if seq >= 4 { 10_000_000 } else { 0 };
            (WritePlace::Source(Lsn(seq + 1)), ack_ns)
        });
        WriterLog::with_acks(1_000, VSHARD, 4, vec![ferry_wire::VShardId(3)], acks)
    }

    #[test]
    fn the_gap_across_the_pause_is_from_the_last_ack_before_to_the_first_after() {
        let log = log();
        // Paused after the ack of write 3 (4 ms), resumed at 14.5 ms; write 4 acked at 15 ms.
        assert_eq!(ack_gap_across(&log, 4_200_000, 14_500_000), Some(11_000));
        assert_eq!(ack_gap_across(&log, 4_200_000, 100_000_000), None, "nothing acked after");
        assert_eq!(ack_gap_across(&log, 500_000, 2_000_000), None, "nothing acked before");
    }

    #[test]
    fn the_demo_fails_on_each_broken_promise_and_says_which() {
        assert_eq!(passing_for_tests().failures(), Vec::<String>::new());
        type Breaker = fn(&mut Summary);
        let cases: [(Breaker, &str); 7] = [
            (|s| s.verification.lost_count = 2, "verification: lost 2"),
            (|s| s.verification.segments_identical = false, "segments DIFFERENT"),
            (|s| s.acks_during_pause_count = 1, "1 write(s) acknowledged while writes were paused"),
            (|s| s.longest_ack_gap_us = Some(2_999), "longest gap between acks (2999 us) is shorter"),
            (|s| s.cut.release.pause.breakdown.drain_us = 0, "parts add up to 2100 us, not 3000 us"),
            (|s| s.manifest.state = Some("fenced".into()), "MANIFEST.json says state Some(\"fenced\")"),
            (|s| s.source_phase = Phase::AtomicCutOver, "the source daemon says AtomicCutOver"),
        ];
        for (break_it, needle) in cases {
            let mut s = passing_for_tests();
            break_it(&mut s);
            let failures = s.failures().join("; ");
            assert!(failures.contains(needle), "{needle:?} not in {failures:?}");
        }
        let mut s = passing_for_tests();
        s.writer_pause_us = Some(2_000);
        assert!(s.failures().join("").contains("the writer's own stamps say Some(2000)"));
    }
}
