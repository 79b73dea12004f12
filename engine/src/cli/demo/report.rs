//! `ferry demo`'s report: one run's [`Summary`] as text for people or as one JSON object.
//!
//! The JSON names are a contract the tests read: `base_copy.bytes`,
//! `base_copy.throughput_bytes_per_sec`, `catch_up.*`, `pause.pause_duration_us` and its parts
//! (`pause.before_fence_us`, `drain_us`, `target_durable_us`, `apply_wait_us`,
//! `after_fence_us`), `pause.estimate_us`, `writer.longest_ack_gap_us`,
//! `writer.ack_p99_us_during_copy`, `writer.ack_p99_us_without_migration`,
//! `writer.ack_p99_ratio_copy_over_without_migration` (the first over the second),
//! `writer.acks_during_pause_count`, `verification.lost_count`, `duplicate_count`,
//! `segments_identical`; `passed` and `failures` say what [`Summary::failures`] found.
//!
//! What it does not: compute (see [`super::summary`]) or print (the caller does).
//!
//! Invariants: the text and the JSON are rendered from the same [`Summary`], so they never
//! disagree; a number that was not measured is `null` in JSON and `n/a` in text, never 0.

use std::path::Path;

use serde_json::{json, Value};

use super::summary::{Latency, Summary};
use super::{DemoArgs, MIGRATION_ID, SOURCE_NODE, TARGET_NODE, VSHARD};
use crate::cli::render::format_bytes;

/// What this demo does not do, by name (the text and the JSON say the same).
const NOT_DONE: [&str; 2] = ["target_database_import", "migration_applied"];
const NOT_DONE_NOTE: &str = "nothing imports the staging on the target (the verifier reads it as an \
importer would); migration.applied is not exercised, so the pause's apply wait holds no database ingest";

fn latency_json(l: Option<Latency>) -> Value {
    l.map_or(
        Value::Null,
        |l| json!({ "writes": l.writes_count, "p50_us": l.p50_us, "p99_us": l.p99_us, "max_us": l.max_us }),
    )
}

/// The report as one JSON object (see the module docs for the names that are a contract).
pub(super) fn json_report(args: &DemoArgs, work: &Path, kept: bool, s: &Summary) -> Value {
    let p = &s.cut.release.pause;
    let b = &p.breakdown;
    let v = &s.verification;
    let failures = s.failures();
    json!({
        "mode": "live_cut_over",
        "migration_id": MIGRATION_ID,
        "vshard": VSHARD.0,
        "source_node": SOURCE_NODE,
        "target_node": TARGET_NODE,
        "work_dir": work.display().to_string(),
        "work_dir_kept": kept,
        "shard": {
            "bytes_requested": args.shard_size,
            "export_files": s.export_files_count,
            "export_bytes": s.export_bytes,
            "export_writes": s.export_entries_count,
            "bulk_files": s.bulk_files_count,
            "bulk_bytes": s.bulk_bytes,
            "generate_elapsed_us": s.generate_us,
        },
        "base_copy": {
            "bytes": s.base_bytes,
            "files": s.base_files_count,
            "base_lsn": s.base_lsn,
            "elapsed_us": s.base_elapsed_us,
            "throughput_bytes_per_sec": s.base_throughput_bytes_per_sec,
            // The daemon reports 0 once its average is no longer kept: not measured, so null.
            "daemon_throughput_bytes_per_sec": (s.daemon_throughput_bytes_per_sec > 0).then_some(s.daemon_throughput_bytes_per_sec),
            "bytes_resent": s.base_bytes_resent,
            "connections": args.connections,
            "streams": args.streams,
            "chunk_len_bytes": args.chunk_len,
            "read_mode": "mmap",
        },
        "catch_up": {
            "start_lsn": s.base_lsn + 1,
            "final_lsn": s.cut.release.final_lsn,
            "records": v.from_staged_wal_count,
            "lag_max_records_during_copy": s.lag_max_records_during_copy,
            "lag_max_records": s.lag_max_records,
            "lag_max_lsn": s.lag_max_lsn,
            "lag_at_cut_over_records": s.lag_at_cut_over_records,
            "lag_samples": s.lag_samples_count,
            "lag_sample_interval_us": u64::try_from(super::progress::POLL_INTERVAL.as_micros()).unwrap_or(u64::MAX),
            "duration_us": s.catch_up_us,
        },
        "cut_over": {
            "elapsed_us": s.cut_over_us,
            "prepares": s.cut.prepares_count,
            "failed_fences": s.cut.failed_fences,
            "fence": s.cut.fence,
        },
        "pause": {
            "pause_duration_us": p.pause_duration_us,
            "before_fence_us": b.before_fence_us,
            "drain_us": b.drain_us,
            "target_durable_us": b.target_durable_us,
            "apply_wait_us": b.apply_wait_us,
            "after_fence_us": b.after_fence_us,
            "parts_sum_us": s.pause_parts_sum_us(),
            "estimate_us": p.estimate_us,
            "budget_us": p.budget_us,
            "over_budget": p.over_budget,
            "final_lsn": s.cut.release.final_lsn,
            "writer_measured_pause_us": s.writer_pause_us,
        },
        "writer": writer_json(args, s),
        "verification": verification_json(s),
        "passed": failures.is_empty(),
        "failures": failures,
        "not_done": NOT_DONE,
        "not_done_note": NOT_DONE_NOTE,
    })
}

/// The report's `writer` object: the reference writer's rate and its acknowledgement latencies.
fn writer_json(args: &DemoArgs, s: &Summary) -> Value {
    json!({
        "layout": "A",
        "flush": "o_direct_style_stale_leftovers",
        "rate_writes_per_sec_requested": args.write_rate,
        "rate_writes_per_sec": s.rate_writes_per_sec,
        "writes": s.writes_count,
        "vshard_writes": s.vshard_writes_count,
        "target_node_wal_writes": s.node_wal_writes_count,
        "flushes": s.flushes_count,
        "baseline_window_us": s.baseline_us,
        "ack_p99_us_without_migration": s.ack_without_migration.map(|l| l.p99_us),
        "ack_p99_us_during_copy": s.ack_during_copy.map(|l| l.p99_us),
        // Issue 21's interference figure: the copy's p99 over the same run's no-migration p99.
        "ack_p99_ratio_copy_over_without_migration": copy_ratio(s),
        "ack_p99_us_during_catch_up": s.ack_during_catch_up.map(|l| l.p99_us),
        "ack_p99_us_after_release": s.ack_after_release.map(|l| l.p99_us),
        "ack_without_migration": latency_json(s.ack_without_migration),
        "ack_during_copy": latency_json(s.ack_during_copy),
        "ack_during_catch_up": latency_json(s.ack_during_catch_up),
        "ack_after_release": latency_json(s.ack_after_release),
        "longest_ack_gap_us": s.longest_ack_gap_us,
        "ack_gap_across_pause_us": s.ack_gap_across_pause_us,
        "acks_during_pause_count": s.acks_during_pause_count,
        "pauses": s.pauses_count,
        "after_release_us": s.after_release_us,
    })
}

/// The report's `verification` object: what the verifier counted and where it found each write.
fn verification_json(s: &Summary) -> Value {
    let v = &s.verification;
    json!({
        "lost_count": v.lost_count,
        "duplicate_count": v.duplicate_count,
        "unexpected_count": v.unexpected_count,
        "segments_identical": v.segments_identical,
        "expected_count": v.expected_count,
        "from_export_count": v.from_export_count,
        "from_staged_wal_count": v.from_staged_wal_count,
        "from_node_wal_count": v.from_node_wal_count,
        "segment_files": v.segment_files_count,
        "segment_bytes": v.segment_bytes,
        "manifest_state": s.manifest.state,
        "manifest_final_lsn": s.manifest.final_lsn,
        "source_phase": s.source_phase,
        "target_staging_state": s.target_staging_state,
        "problems": v.problems,
        "problems_count": v.problems_count,
        "elapsed_us": v.elapsed_us,
    })
}

/// `812 us`, or `12.3 ms` from 10 ms on; `n/a` for a window without acks.
fn us_text(us: Option<u64>) -> String {
    match us {
        Some(us) if us >= 10_000 => format!("{:.1} ms", us as f64 / 1e3),
        Some(us) => format!("{us} us"),
        None => "n/a".into(),
    }
}

/// The writer's ack p99 during the base copy over its p99 without a migration (same run);
/// `None` when either window has no acks.
fn copy_ratio(s: &Summary) -> Option<f64> {
    let (copy, base) = (s.ack_during_copy?, s.ack_without_migration?);
    (base.p99_us > 0).then(|| (copy.p99_us as f64 / base.p99_us as f64 * 100.0).round() / 100.0)
}

fn p99(l: Option<Latency>) -> String {
    us_text(l.map(|l| l.p99_us))
}

/// The report for people.
pub(super) fn text_report(args: &DemoArgs, work: &Path, kept: bool, staging: &Path, s: &Summary) -> String {
    let p = &s.cut.release.pause;
    let b = &p.breakdown;
    let v = &s.verification;
    let secs = |us: u64| us as f64 / 1e6;
    let kept = if kept {
        format!("kept; staging in {}", staging.display())
    } else {
        "removed at exit; --keep DIR keeps it".into()
    };
    let failed_fences = s
        .cut
        .failed_fences
        .iter()
        .map(|f| {
            format!(
                "\n                fence at {} cancelled ({} us paused, resumed on the source): {}",
                f.final_lsn, f.paused_us, f.error
            )
        })
        .collect::<String>();
    let failures = s.failures();
    let verdict = if failures.is_empty() { "PASSED".to_owned() } else { format!("FAILED: {}", failures.join("; ")) };
    format!(
        "\
ferry demo: LIVE migration of vShard {vshard} from {SOURCE_NODE} to {TARGET_NODE} through two daemons' control sockets, cut over with the fence
  work folder   {work} ({kept})
  shard         {shard}: export of {exported} vShard-{vshard} writes up to base_lsn {base_lsn} ({export}) + {bulk} in {bulk_files} bulk files;
                generated in {generate:.2} s, not counted below
  writer        {writes} writes ({vwrites} to vShard {vshard}, {node_writes} of them to the target's node WAL after the release) at {rate}/s ({asked}/s asked),
                NodeDB layout A, O_DIRECT-style flushes with stale leftovers, {flushes} group commits
                ack p99: {p99_base} without migration (first {baseline:.1} s), {p99_copy} during the base copy ({ratio} x), {p99_catch} during the catch-up,
                {p99_after} after the release; longest gap between acks {gap} ({gap_pause} across the pause); acks while paused: {acks_paused}
  base copy     {bytes} bytes ({bytes_h}), {files} files in {base_s:.2} s = {tput}/s over 127.0.0.1 QUIC, mutual TLS,
                {conns} chunk connection(s) x {streams} stream(s) + 1 for control and WAL, {chunk} byte chunks; resent {resent} bytes
  wal catch-up  vShard-{vshard} records from LSN {start} streamed alongside the base copy; {staged} records staged up to final_lsn;
                {catch_s:.2} s in WalCatchUp before the cut-over; lag (records read by the source's tail, not yet durable on the
                target; daemon snapshots every 100 ms): max {lag_copy} while copying, max {lag_max} ({lag_lsn} LSN) catching up, {lag_cut} last
  cut-over      {prepares} prepare(s), fenced and released at final_lsn {final_lsn} in {cut_ms:.1} ms{failed_fences}
  pause         {pause} us (estimate {estimate} us, budget {budget} us{over}) = before fence {before} + drain {drain} + target durable {durable}
                + apply wait {apply} + after fence {after} us; the writer's own stamps: {writer_pause} us
  verification  {expected} acknowledged vShard-{vshard} writes: lost {lost}, duplicated {dup}, unexpected {unexpected}
                (export {from_export}, staged WAL {from_wal}, target node WAL {from_node}); {seg_files} staged files {identical} (SHA-256);
                MANIFEST.json {state} at final_lsn {m_final}; source {phase:?}
  not done      {not_done}
  result        {verdict}
  note: one machine: writer, source and target daemons share its cores; loopback network; the writer's ack is a write to the
        segment file, no fdatasync; the target fsyncs every staged file and its staged WAL
",
        vshard = VSHARD.0,
        work = work.display(),
        shard = format_bytes(s.export_bytes + s.bulk_bytes),
        exported = s.export_entries_count,
        base_lsn = s.base_lsn,
        export = format_bytes(s.export_bytes),
        bulk = format_bytes(s.bulk_bytes),
        bulk_files = s.bulk_files_count,
        generate = secs(s.generate_us),
        writes = s.writes_count,
        vwrites = s.vshard_writes_count,
        node_writes = s.node_wal_writes_count,
        rate = s.rate_writes_per_sec,
        asked = args.write_rate,
        flushes = s.flushes_count,
        p99_base = p99(s.ack_without_migration),
        baseline = secs(s.baseline_us),
        p99_copy = p99(s.ack_during_copy),
        ratio = copy_ratio(s).map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}")),
        p99_catch = p99(s.ack_during_catch_up),
        p99_after = p99(s.ack_after_release),
        gap = us_text(s.longest_ack_gap_us),
        gap_pause = us_text(s.ack_gap_across_pause_us),
        acks_paused = s.acks_during_pause_count,
        bytes = s.base_bytes,
        bytes_h = format_bytes(s.base_bytes),
        files = s.base_files_count,
        base_s = secs(s.base_elapsed_us),
        tput = format_bytes(s.base_throughput_bytes_per_sec),
        conns = args.connections,
        streams = args.streams,
        chunk = args.chunk_len,
        resent = s.base_bytes_resent,
        start = s.base_lsn + 1,
        lag_copy = s.lag_max_records_during_copy.map_or_else(|| "n/a".to_owned(), |l| l.to_string()),
        catch_s = secs(s.catch_up_us),
        lag_max = s.lag_max_records.map_or_else(|| "n/a".to_owned(), |l| l.to_string()),
        lag_lsn = s.lag_max_lsn.map_or_else(|| "n/a".to_owned(), |l| l.to_string()),
        lag_cut = s.lag_at_cut_over_records.map_or_else(|| "n/a".to_owned(), |l| l.to_string()),
        staged = v.from_staged_wal_count,
        prepares = s.cut.prepares_count,
        final_lsn = s.cut.release.final_lsn,
        cut_ms = s.cut_over_us as f64 / 1e3,
        pause = p.pause_duration_us,
        estimate = p.estimate_us,
        budget = p.budget_us,
        over = if p.over_budget { ", OVER BUDGET" } else { "" },
        before = b.before_fence_us,
        drain = b.drain_us,
        durable = b.target_durable_us,
        apply = b.apply_wait_us,
        after = b.after_fence_us,
        writer_pause = s.writer_pause_us.map_or_else(|| "n/a".to_owned(), |u| u.to_string()),
        expected = v.expected_count,
        lost = v.lost_count,
        dup = v.duplicate_count,
        unexpected = v.unexpected_count,
        from_export = v.from_export_count,
        from_wal = v.from_staged_wal_count,
        from_node = v.from_node_wal_count,
        seg_files = v.segment_files_count,
        identical = if v.segments_identical { "identical to the source" } else { "DIFFERENT from the source" },
        state = s.manifest.state.as_deref().unwrap_or("missing"),
        m_final = s.manifest.final_lsn.map_or_else(|| "none".to_owned(), |l| l.to_string()),
        phase = s.source_phase,
        not_done = NOT_DONE_NOTE,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::cli::demo::summary::passing_for_tests;

    #[test]
    fn both_reports_carry_the_contract_names() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: DemoArgs,
        }
        let args = Wrapper::try_parse_from(["demo"]).unwrap().args;
        let s = passing_for_tests();
        let json = json_report(&args, Path::new("/tmp/w"), false, &s);
        for (section, field) in [
            ("base_copy", "bytes"),
            ("base_copy", "throughput_bytes_per_sec"),
            ("pause", "pause_duration_us"),
            ("pause", "before_fence_us"),
            ("pause", "drain_us"),
            ("pause", "target_durable_us"),
            ("pause", "apply_wait_us"),
            ("pause", "after_fence_us"),
            ("pause", "estimate_us"),
            ("writer", "longest_ack_gap_us"),
            ("writer", "acks_during_pause_count"),
            ("verification", "lost_count"),
            ("verification", "duplicate_count"),
            ("verification", "segments_identical"),
        ] {
            assert!(!json[section][field].is_null(), "{section}.{field} is missing");
        }
        for field in ["ack_p99_us_during_copy", "ack_p99_us_without_migration"] {
            assert!(json["writer"].get(field).is_some(), "writer.{field} is missing");
        }
        assert!(json["catch_up"].is_object());
        assert_eq!(json["passed"], true);
        let text = text_report(&args, Path::new("/tmp/w"), false, Path::new("/tmp/w/s"), &s);
        assert!(
            text.contains("pause         3000 us (estimate 4000 us, budget 500000 us) = before fence 100"),
            "{text}"
        );
        assert!(text.contains("result        PASSED"), "{text}");
    }

    #[test]
    fn the_copy_ratio_is_the_copy_p99_over_the_baseline_p99() {
        let mut s = passing_for_tests();
        assert_eq!(copy_ratio(&s), None, "no acks in a window: no ratio");
        let latency = |p99_us| Some(Latency { writes_count: 10, p50_us: 1, p99_us, max_us: p99_us });
        (s.ack_without_migration, s.ack_during_copy) = (latency(2_000), latency(2_500));
        assert_eq!(copy_ratio(&s), Some(1.25));
        (s.ack_without_migration, s.ack_during_copy) = (latency(3_000), latency(1_000));
        assert_eq!(copy_ratio(&s), Some(0.33));
        assert_eq!(copy_ratio(&Summary { ack_without_migration: latency(0), ..s }), None);
        let json = writer_json_for_tests(&Summary {
            ack_without_migration: latency(2_000),
            ack_during_copy: latency(2_500),
            ..passing_for_tests()
        });
        assert_eq!(json["ack_p99_ratio_copy_over_without_migration"], 1.25);
    }

    fn writer_json_for_tests(s: &Summary) -> Value {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: DemoArgs,
        }
        writer_json(&Wrapper::try_parse_from(["demo"]).unwrap().args, s)
    }

    #[test]
    fn microseconds_read_well() {
        assert_eq!(us_text(Some(812)), "812 us");
        assert_eq!(us_text(Some(12_345)), "12.3 ms");
        assert_eq!(us_text(None), "n/a");
    }
}
