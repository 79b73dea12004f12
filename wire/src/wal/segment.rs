//! WAL segment file names: `wal-<first_lsn, 20 digits zero-padded>.seg`.
//!
//! What it does: formats and parses segment names. The number is the LSN of the segment's
//! first record (in a staged WAL, segment k > 0 is named after the last LSN of segment k - 1
//! plus one), so sorting names sorts segments.
//!
//! What it does not: list folders. Every other file in a WAL folder (`.dwb` double-write
//! buffers, audit logs, temp files) is not a segment, and [`parse_segment_name`] says so by
//! returning `None` rather than an error.

use crate::Lsn;

/// Digits of the LSN in a segment name.
pub const SEGMENT_NAME_DIGITS: usize = 20;

/// The file name of the segment whose first LSN is `first_lsn`.
pub fn segment_name(first_lsn: Lsn) -> String {
    format!("wal-{:020}.seg", first_lsn.0)
}

/// The first LSN of a segment named `name`, or `None` when `name` is not a segment name
/// (exactly `wal-`, 20 ASCII digits, `.seg`).
pub fn parse_segment_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok().map(Lsn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_format_and_parse() {
        assert_eq!(segment_name(Lsn(42)), "wal-00000000000000000042.seg");
        assert_eq!(parse_segment_name("wal-00000000000000000042.seg"), Some(Lsn(42)));
        for other in [
            "wal-42.seg",
            "wal-0000000000000000004x.seg",
            "wal-00000000000000000042.seg.tmp",
            "wal-00000000000000000042.dwb",
            "audit.log",
            "wal-+0000000000000000042.seg",
            "wal-99999999999999999999.seg", // above u64::MAX
        ] {
            assert_eq!(parse_segment_name(other), None, "{other}");
        }
    }

    proptest! {
        #[test]
        fn names_round_trip(lsn in any::<u64>()) {
            prop_assert_eq!(parse_segment_name(&segment_name(Lsn(lsn))), Some(Lsn(lsn)));
        }

        #[test]
        fn any_name_never_panics(name in ".{0,40}") {
            let _ = parse_segment_name(&name);
        }
    }
}
