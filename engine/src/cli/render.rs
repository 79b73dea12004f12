//! How the control commands show a migration to people as text: byte sizes, a text bar, ETA,
//! WAL lag, the stall flag, one-line and multi-line statuses, the `ferry list` table. Also
//! parses byte sizes given on the command line (`100MB`, `1GiB`): by hand, not with
//! `bytesize`'s parser, because a CLI flag must refuse `500M` (MB or MiB?) with a message that
//! says which to write, and a rate takes `unlimited` and `/s`. Live bars redrawn on a
//! terminal are [`super::bars`] (indicatif).
//!
//! What it does not: talk to a daemon or read a clock: status in, text out, so every function
//! here is tested on fixed statuses.
//!
//! Invariants: nothing here panics on any status a daemon sends (arithmetic is saturating or
//! widened to u128); every number shown comes from the status.

use ferry_wire::api::{MigrationStatus, Phase, Role};

const BAR_WIDTH: usize = 24;

/// Formats a byte count with binary units: `512 B`, `1.5 KiB`, `4.0 GiB` (the `bytesize`
/// crate's IEC display).
pub fn format_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A rate limit as shown: `unlimited` for 0.
pub fn format_rate_limit(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "unlimited".to_owned()
    } else {
        format!("{}/s ({bytes_per_sec} bytes/s)", format_bytes(bytes_per_sec))
    }
}

/// Whole seconds as `45s`, `3m05s`, `2h07m`.
pub fn format_duration_s(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Parses a byte count or rate: `1048576`, `100MB`, `1GiB`, `1.5 GB/s`, `unlimited` (0).
/// KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024; case-insensitive.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    parse_bytes(text, Amount::Rate)
}

/// Parses a size in bytes with the syntax of [`parse_byte_size`], without its rate forms
/// (`unlimited`, a trailing `/s`): `4096`, `64KiB`, `1MiB`, `1.5GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_bytes(text, Amount::Size)
}

/// [`parse_size`] for a size that must fit in 32 bits (a chunk length, an alignment).
pub fn parse_size_u32(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text)?;
    u32::try_from(bytes).map_err(|_| format!("{text:?} is more than {} bytes", u32::MAX))
}

/// What a byte amount on the command line is: a rate takes `unlimited` and a trailing `/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Amount {
    Rate,
    Size,
}

fn parse_bytes(text: &str, amount: Amount) -> Result<u64, String> {
    let not_bytes = || match amount {
        Amount::Rate => format!("{text:?} is not a byte size; use e.g. 1048576, 100MB, 1GiB or 0 (unlimited)"),
        Amount::Size => format!(
            "{text:?} is not a size: give bytes (1048576) or a number with KiB, MiB or GiB (powers of 1024; TiB too) \
             or KB, MB, GB, TB (powers of 1000), e.g. 512MiB"
        ),
    };
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let lower = match amount {
        Amount::Rate if lower == "unlimited" => return Ok(0),
        Amount::Rate => lower.strip_suffix("/s").unwrap_or(&lower),
        Amount::Size => &lower,
    };
    let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let multiplier: u128 = match unit.trim() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "m" | "g" | "t" => {
            return Err(format!(
                "{text:?}: say {unit}B (powers of 1000) or {unit}iB (powers of 1024)",
                unit = unit.to_ascii_uppercase()
            ))
        }
        _ => return Err(not_bytes()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    // Nine fraction digits are far below a byte at any unit here; more would overflow nothing
    // but mean nothing either.
    if whole.is_empty() && fraction.is_empty() || fraction.len() > 9 || fraction.contains('.') {
        return Err(not_bytes());
    }
    let digits = |s: &str| -> Result<u128, String> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<u128>().map_err(|_| format!("{text:?} is not a byte size"))
        }
    };
    let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(9));
    let too_big = || format!("{text:?} is more than {} bytes", u64::MAX);
    let whole_bytes = digits(whole)?.checked_mul(multiplier).ok_or_else(too_big)?;
    let fraction_bytes = digits(fraction)?.checked_mul(multiplier).ok_or_else(too_big)? / scale;
    let total = whole_bytes.checked_add(fraction_bytes).ok_or_else(too_big)?;
    u64::try_from(total).map_err(|_| too_big())
}

/// `[######------]` filled to `done / total` (full when there is nothing to do).
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        let ratio = u128::from(done.min(total)) * width as u128 / u128::from(total);
        usize::try_from(ratio).unwrap_or(width).min(width)
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Seconds left of the base copy at the daemon's average throughput; `None` when unknown.
pub fn eta_s(status: &MigrationStatus) -> Option<u64> {
    let remaining = status.bytes_total.saturating_sub(status.bytes_transferred);
    if remaining == 0 {
        return Some(0);
    }
    if status.throughput_bytes_per_sec == 0 {
        return None;
    }
    Some(remaining.div_ceil(status.throughput_bytes_per_sec))
}

fn role_and_peer(status: &MigrationStatus) -> String {
    let peer = status.peer_node.as_deref().unwrap_or("?");
    match status.role {
        Role::Source => format!("source -> {peer}"),
        Role::Target => format!("target <- {peer}"),
    }
}

fn phase_text(status: &MigrationStatus) -> String {
    match status.phase {
        Phase::Failed => format!("Failed: {}", status.reason.as_deref().unwrap_or("no reason given")),
        Phase::Completed => match status.pause_duration_us {
            Some(us) => format!("Completed (write pause {:.3} ms)", us as f64 / 1e3),
            None => "Completed".to_owned(),
        },
        phase => format!("{phase:?}"),
    }
}

/// The daemon has not sized the base yet (0 of 0 bytes and files while copying): showing
/// 100% would be a lie.
fn sizing(status: &MigrationStatus) -> bool {
    status.phase == Phase::BaseCopy && status.bytes_total == 0 && status.files_total == 0
}

/// `" 25.0%"`, or `"  --%"` while the base is not sized.
fn percent_text(status: &MigrationStatus) -> String {
    if sizing(status) {
        "  --%".to_owned()
    } else {
        format!("{:5.1}%", status.percent())
    }
}

fn eta_text(status: &MigrationStatus) -> String {
    if status.phase != Phase::BaseCopy {
        return "base done".to_owned();
    }
    if sizing(status) {
        return "ETA --".to_owned();
    }
    match eta_s(status) {
        Some(s) => format!("ETA {}", format_duration_s(s)),
        None => "ETA --".to_owned(),
    }
}

fn wal_text(status: &MigrationStatus) -> String {
    let wal = &status.wal;
    if wal.start_lsn.is_none() && wal.current_lsn.is_none() && wal.source_lsn.is_none() {
        return format!("wal none  held {}", format_bytes(wal.held_bytes));
    }
    let lsn = |l: Option<u64>| l.map_or("-".to_owned(), |l| l.to_string());
    let lag = wal.lag_lsn().map_or("-".to_owned(), |l| format!("{l} LSN"));
    format!(
        "wal lag {lag} (durable {}, source {})  held {}",
        lsn(wal.current_lsn),
        lsn(wal.source_lsn),
        format_bytes(wal.held_bytes)
    )
}

/// `"  no progress for 12 s"` when the daemon flags the migration as stalled, else nothing.
pub fn stall_text(status: &MigrationStatus) -> String {
    status.no_progress_for_s.map(|s| format!("  no progress for {s} s")).unwrap_or_default()
}

/// A status as a few lines for a terminal.
pub fn render_block(status: &MigrationStatus) -> Vec<String> {
    let vshard = status.vshard_id.map_or("-".to_owned(), |v| v.to_string());
    let staging = status.staging_state.as_deref().map(|s| format!("  staging {s}")).unwrap_or_default();
    vec![
        format!(
            "{}  {}  vshard {vshard}  {}{staging}{}",
            status.migration_id,
            role_and_peer(status),
            phase_text(status),
            stall_text(status)
        ),
        format!(
            "  base {} {}  {} / {}  files {}/{}  {}/s  {}  resent {}",
            if sizing(status) {
                bar(0, 1, BAR_WIDTH)
            } else {
                bar(status.bytes_transferred, status.bytes_total, BAR_WIDTH)
            },
            percent_text(status),
            format_bytes(status.bytes_transferred),
            format_bytes(status.bytes_total),
            status.files_staged,
            status.files_total,
            format_bytes(status.throughput_bytes_per_sec),
            eta_text(status),
            format_bytes(status.bytes_resent),
        ),
        format!("  {}  rate limit {}", wal_text(status), format_rate_limit(status.rate_limit_bytes_per_sec)),
    ]
}

/// A status as one line (logs, pipes, `ferry migrate`'s stderr).
pub fn render_line(status: &MigrationStatus) -> String {
    format!(
        "{} {} {} {} {}/{} files {}/{} {}/s {} {}{}",
        status.migration_id,
        role_and_peer(status),
        phase_text(status),
        percent_text(status).trim_start(),
        format_bytes(status.bytes_transferred),
        format_bytes(status.bytes_total),
        status.files_staged,
        status.files_total,
        format_bytes(status.throughput_bytes_per_sec),
        eta_text(status),
        wal_text(status),
        stall_text(status),
    )
}

/// Statuses as an aligned table with a header.
pub fn render_table(statuses: &[MigrationStatus]) -> Vec<String> {
    let header = ["ID", "ROLE", "PHASE", "VSHARD", "PEER", "BASE", "RATE", "WAL LAG", "HELD"].map(str::to_owned);
    let mut rows = vec![header.to_vec()];
    for s in statuses {
        rows.push(vec![
            s.migration_id.clone(),
            format!("{:?}", s.role).to_lowercase(),
            format!("{:?}", s.phase),
            s.vshard_id.map_or("-".to_owned(), |v| v.to_string()),
            s.peer_node.clone().unwrap_or_else(|| "-".to_owned()),
            percent_text(s).trim_start().to_owned(),
            format!("{}/s", format_bytes(s.throughput_bytes_per_sec)),
            s.wal.lag_lsn().map_or("-".to_owned(), |l| l.to_string()),
            format_bytes(s.wal.held_bytes),
        ]);
    }
    let columns = header.len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    /// A source migration in BaseCopy, a quarter copied (shared with the other CLI tests).
    pub(crate) fn status() -> MigrationStatus {
        serde_json::from_value(json!({"migration_id": "m-7-0", "role": "source", "phase": "BaseCopy",
            "vshard_id": 7, "peer_node": "node-b", "bytes_transferred": 1_048_576, "bytes_total": 4_194_304,
            "bytes_resent": 0, "files_staged": 1, "files_total": 4,
            "wal": {"start_lsn": 1, "current_lsn": 90, "source_lsn": 100, "held_bytes": 65536},
            "rate_limit_bytes_per_sec": 0, "throughput_bytes_per_sec": 1_048_576, "pause_duration_us": null,
            "reason": null, "staging_state": "copying", "started_at_unix_ms": 1000, "updated_at_unix_ms": 2000}))
        .unwrap()
    }

    #[test]
    fn byte_sizes_parse_with_decimal_and_binary_suffixes() {
        let cases: [(&str, u64); 16] = [
            ("0", 0),
            ("unlimited", 0),
            ("1048576", 1_048_576),
            ("512B", 512),
            ("100MB", 100_000_000),
            ("100mb", 100_000_000),
            ("100 MB/s", 100_000_000),
            ("1KB", 1000),
            ("1KiB", 1024),
            ("1GiB", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("1.5 GB/s", 1_500_000_000),
            (".5KiB", 512),
            ("2TiB", 2 << 40),
            ("3tb", 3_000_000_000_000),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, want) in cases {
            assert_eq!(parse_byte_size(text), Ok(want), "{text}");
        }
        for bad in
            ["", "MB", "abc", "-5", "1.2.3", "10 MBX", "1e9", "18446744073709551616", "20000000000TB", "1.0000000001GB"]
        {
            assert!(parse_byte_size(bad).is_err(), "{bad} accepted");
        }
        let ambiguous = parse_byte_size("1G").unwrap_err();
        assert!(ambiguous.contains("GB") && ambiguous.contains("GiB"), "{ambiguous}");
    }

    #[test]
    fn sizes_take_the_same_syntax_without_the_rate_forms() {
        for (text, want) in [("4096", 4096), ("64KiB", 64 << 10), ("1MiB", 1 << 20), ("1.5GB", 1_500_000_000), ("0", 0)]
        {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["unlimited", "1MB/s", "", "MiB", "1G", "-1"] {
            let err = parse_size(bad).unwrap_err();
            assert!(!err.contains("0 (unlimited)"), "a size is never unlimited: {err}");
        }
        // The words `ferry demo --shard-size` always used.
        let err = parse_size("nonsense").unwrap_err();
        assert!(err.contains("\"nonsense\" is not a size") && err.contains("KiB, MiB or GiB"), "{err}");
        assert_eq!(parse_size_u32("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size_u32("4294967295"), Ok(u32::MAX));
        assert!(parse_size_u32("4GiB").unwrap_err().contains("more than 4294967295 bytes"));
    }

    #[test]
    fn byte_counts_and_durations_format_for_people() {
        let bytes = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (4 << 20, "4.0 MiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (n, want) in bytes {
            assert_eq!(format_bytes(n), want);
        }
        let durations = [(0, "0s"), (59, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (7260, "2h01m")];
        for (s, want) in durations {
            assert_eq!(format_duration_s(s), want);
        }
        assert_eq!(format_rate_limit(0), "unlimited");
        assert_eq!(format_rate_limit(1 << 20), "1.0 MiB/s (1048576 bytes/s)");
    }

    #[test]
    fn bars_fill_in_proportion_and_never_overflow() {
        assert_eq!(bar(0, 100, 10), "[----------]");
        assert_eq!(bar(50, 100, 10), "[#####-----]");
        assert_eq!(bar(99, 100, 10), "[#########-]");
        assert_eq!(bar(100, 100, 10), "[##########]");
        assert_eq!(bar(200, 100, 10), "[##########]");
        assert_eq!(bar(0, 0, 4), "[####]");
        assert_eq!(bar(u64::MAX - 1, u64::MAX, 24).len(), 26);
    }

    #[test]
    fn eta_uses_the_daemons_average_and_admits_when_it_is_unknown() {
        let mut s = status();
        assert_eq!(eta_s(&s), Some(3), "3 MiB left at 1 MiB/s");
        s.throughput_bytes_per_sec = 1000;
        s.bytes_transferred = s.bytes_total - 1;
        assert_eq!(eta_s(&s), Some(1), "rounded up");
        s.throughput_bytes_per_sec = 0;
        assert_eq!(eta_s(&s), None);
        s.bytes_transferred = s.bytes_total;
        assert_eq!(eta_s(&s), Some(0));
    }

    #[test]
    fn a_status_renders_progress_rate_eta_wal_lag_and_held_wal() {
        let block = render_block(&status()).join("\n");
        for needle in [
            "m-7-0  source -> node-b  vshard 7  BaseCopy  staging copying",
            "[######------------------]  25.0%",
            "1.0 MiB / 4.0 MiB",
            "files 1/4",
            "1.0 MiB/s",
            "ETA 3s",
            "wal lag 10 LSN (durable 90, source 100)",
            "held 64.0 KiB",
            "rate limit unlimited",
        ] {
            assert!(block.contains(needle), "{needle:?} missing from\n{block}");
        }
        let line = render_line(&status());
        assert!(!line.contains('\n'));
        assert!(line.contains("25.0%") && line.contains("wal lag 10 LSN") && line.contains("ETA 3s"), "{line}");

        let mut failed = status();
        failed.phase = Phase::Failed;
        failed.reason = Some("aborted: maintenance".into());
        failed.role = Role::Target;
        failed.wal = Default::default();
        let block = render_block(&failed).join("\n");
        assert!(block.contains("target <- node-b") && block.contains("Failed: aborted: maintenance"), "{block}");
        assert!(block.contains("wal none") && block.contains("base done"), "{block}");

        let mut unsized_base = status();
        (unsized_base.bytes_transferred, unsized_base.bytes_total, unsized_base.files_total) = (0, 0, 0);
        let block = render_block(&unsized_base).join("\n");
        assert!(block.contains("[------------------------]   --%") && block.contains("ETA --"), "{block}");
        assert!(!render_line(&unsized_base).contains("100.0%"));

        let mut stalled = status();
        stalled.no_progress_for_s = Some(12);
        assert!(render_block(&stalled)[0].ends_with("staging copying  no progress for 12 s"));
        assert!(render_line(&stalled).ends_with("  no progress for 12 s"), "{}", render_line(&stalled));
        assert!(!render_line(&status()).contains("no progress"));

        let mut done = status();
        done.phase = Phase::Completed;
        done.pause_duration_us = Some(1500);
        assert!(render_line(&done).contains("Completed (write pause 1.500 ms)"));
    }

    #[test]
    fn the_list_table_aligns_its_columns() {
        let mut other = status();
        other.migration_id = "a-much-longer-migration-id".into();
        other.phase = Phase::WalCatchUp;
        let lines = render_table(&[status(), other]);
        assert_eq!(lines.len(), 3);
        let column = |line: &str, word: &str| line.find(word).unwrap();
        assert_eq!(column(&lines[0], "PHASE"), column(&lines[1], "BaseCopy"));
        assert_eq!(column(&lines[0], "PHASE"), column(&lines[2], "WalCatchUp"));
        assert_eq!(column(&lines[0], "WAL LAG"), column(&lines[1], "10 "));
    }
}
