//! Quoting untrusted text back in error messages, bounded.
//!
//! What it does: [`quote_untrusted`] renders a string from a client, a peer or a file the way
//! `{:?}` would (quoted, escaped), but keeps at most [`QUOTE_LEN_MAX_BYTES`] of the rendered
//! text and then says how long the original was. [`clip_message`] bounds a message built by
//! code ferry does not control (serde's errors quote the offending string whole, in debug
//! form): every quoted run in it (`"..."` or `` `...` ``) longer than the limit is cut the same
//! way, and the whole message is then held to [`MESSAGE_LEN_MAX_BYTES`].
//!
//! Why: an error reply that echoes a 3.6 MB string, doubled by escaping, is a 7.2 MB line: over
//! the control socket's own line limit, so ferry's client cannot even read the refusal.
//!
//! What it does not: decide what is untrusted. Callers quote what came from outside.
//!
//! Invariant: the output of either function is at most a few hundred bytes over its limit
//! (one escape sequence and the length note), whatever the input; no input panics.

use std::fmt::Write as _;

/// Most bytes of rendered (escaped) untrusted text one quote keeps.
pub const QUOTE_LEN_MAX_BYTES: usize = 200;
/// Longest error message [`clip_message`] lets through: room for a few quotes and the fixed
/// text around them (serde's list of expected field names included).
pub const MESSAGE_LEN_MAX_BYTES: usize = 2048;

/// `text` quoted and escaped like `{:?}`, cut after [`QUOTE_LEN_MAX_BYTES`] of rendered text
/// on a character boundary, then `... (N bytes)` naming the original length.
pub fn quote_untrusted(text: &str) -> String {
    let mut out = String::with_capacity(QUOTE_LEN_MAX_BYTES.min(text.len() * 2) + 32);
    out.push('"');
    let mut cut = false;
    for c in text.chars() {
        let before = out.len();
        // `escape_debug` of a char matches what `{:?}` of a string prints for it (the
        // grapheme-extend rule aside, which only changes how a mark is shown).
        let _ = write!(out, "{}", c.escape_debug());
        if out.len() - 1 > QUOTE_LEN_MAX_BYTES {
            out.truncate(before);
            cut = true;
            break;
        }
    }
    out.push('"');
    if cut {
        let _ = write!(out, "... ({} bytes)", text.len());
    }
    out
}

/// `message` with every over-long quoted run cut (see the module docs) and the whole held to
/// [`MESSAGE_LEN_MAX_BYTES`] (its head and tail kept, the middle replaced by a note).
pub fn clip_message(message: &str) -> String {
    if message.len() <= QUOTE_LEN_MAX_BYTES {
        return message.to_owned();
    }
    let clipped = clip_quoted_runs(message);
    if clipped.len() <= MESSAGE_LEN_MAX_BYTES {
        return clipped;
    }
    let half = MESSAGE_LEN_MAX_BYTES / 2;
    let head = &clipped[..floor_char_boundary(&clipped, half)];
    let tail = &clipped[ceil_char_boundary(&clipped, clipped.len() - half)..];
    format!("{head} ...({} bytes cut)... {tail}", clipped.len() - head.len() - tail.len())
}

/// Cuts each `"..."` run (with `\` escapes, as `{:?}` writes them) and each `` `...` `` run
/// longer than [`QUOTE_LEN_MAX_BYTES`]. An unterminated run is cut the same way.
fn clip_quoted_runs(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut out = String::with_capacity(message.len().min(MESSAGE_LEN_MAX_BYTES * 2));
    let mut i = 0;
    while i < bytes.len() {
        let close = match bytes.get(i) {
            Some(b'"') => b'"',
            Some(b'`') => b'`',
            _ => {
                let next = bytes[i..].iter().position(|&b| b == b'"' || b == b'`').map_or(bytes.len(), |p| i + p);
                out.push_str(&message[i..next]);
                i = next;
                continue;
            }
        };
        // Find the run's end, and the last escape boundary within the limit.
        let start = i + 1;
        let (mut j, mut keep_end) = (start, start);
        let end = loop {
            match bytes.get(j) {
                None => break None,
                Some(&b) if b == close => break Some(j),
                Some(b'\\') if close == b'"' => j = escape_end(bytes, j),
                Some(_) => j += 1,
            }
            if j - start <= QUOTE_LEN_MAX_BYTES {
                keep_end = j;
            }
        };
        let run_end = end.unwrap_or(bytes.len());
        let keep_end = floor_char_boundary(message, keep_end.min(run_end));
        out.push(close as char);
        out.push_str(&message[start..keep_end]);
        if keep_end < run_end {
            out.push(close as char);
            let _ = write!(out, "... ({} bytes)", run_end - start);
        } else if end.is_some() {
            out.push(close as char);
        }
        i = end.map_or(bytes.len(), |e| e + 1);
    }
    out
}

/// The index after the escape sequence starting at `at` (a backslash): `\u{...}` up to its
/// brace, any other escape two bytes (a multi-byte char after it is finished by the caller).
fn escape_end(bytes: &[u8], at: usize) -> usize {
    if bytes.get(at + 1) == Some(&b'u') && bytes.get(at + 2) == Some(&b'{') {
        let close = bytes[at..].iter().take(16).position(|&b| b == b'}');
        return close.map_or(at + 2, |p| at + p + 1);
    }
    (at + 2).min(bytes.len())
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn ceil_char_boundary(text: &str, mut at: usize) -> usize {
    while at < text.len() && !text.is_char_boundary(at) {
        at += 1;
    }
    at.min(text.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn short_text_is_quoted_like_debug() {
        for text in ["", "abc", "a\"b", "tab\there", "back\\slash", "é ü 日本"] {
            assert_eq!(quote_untrusted(text), format!("{text:?}"));
        }
    }

    #[test]
    fn long_text_keeps_about_200_bytes_and_names_its_length() {
        let text = "x".repeat(3_600_000);
        let quoted = quote_untrusted(&text);
        assert!(quoted.len() < QUOTE_LEN_MAX_BYTES + 40, "{}", quoted.len());
        assert!(quoted.ends_with("\"... (3600000 bytes)"), "{quoted}");
        // Backslashes double when escaped: the limit is on the rendered text.
        let quoted = quote_untrusted(&"\\".repeat(3_600_000));
        assert!(quoted.len() < QUOTE_LEN_MAX_BYTES + 40, "{}", quoted.len());
        assert!(quoted.starts_with("\"\\\\\\\\"), "{quoted}");
        let inner = quoted.strip_prefix('"').and_then(|q| q.strip_suffix("\"... (3600000 bytes)")).unwrap();
        assert!(
            inner.len().is_multiple_of(2) && inner.bytes().all(|b| b == b'\\'),
            "a cut never splits an escape: {quoted}"
        );
    }

    #[test]
    fn cuts_fall_on_char_boundaries() {
        for pad in 0..4 {
            let text = format!("{}{}", "a".repeat(pad), "日".repeat(1000));
            let quoted = quote_untrusted(&text);
            assert!(quoted.len() < QUOTE_LEN_MAX_BYTES + 40);
            let message = clip_message(&format!("bad {text:?} here {}", "é".repeat(5000)));
            assert!(message.len() <= MESSAGE_LEN_MAX_BYTES + 100, "{}", message.len());
        }
    }

    #[test]
    fn serde_messages_keep_their_shape_and_lose_the_bulk() {
        let huge = "7".repeat(3_600_000);
        let err = serde_json::from_value::<u32>(serde_json::Value::String(huge)).unwrap_err().to_string();
        let clipped = clip_message(&err);
        assert!(clipped.len() < 400, "{clipped}");
        assert!(clipped.starts_with("invalid type: string \"777"), "{clipped}");
        assert!(clipped.ends_with("... (3600000 bytes), expected u32"), "{clipped}");

        let slashes = "\\".repeat(3_600_000);
        let err = serde_json::from_value::<u32>(serde_json::Value::String(slashes)).unwrap_err().to_string();
        let clipped = clip_message(&err);
        assert!(clipped.len() < 400, "{clipped}");
        assert!(clipped.ends_with("... (7200000 bytes), expected u32"), "{clipped}");

        let field = format!("unknown field `{}`, expected one of `a`, `b`", "f".repeat(100_000));
        let clipped = clip_message(&field);
        assert!(clipped.len() < 400 && clipped.ends_with("... (100000 bytes), expected one of `a`, `b`"), "{clipped}");
    }

    #[test]
    fn short_and_unquoted_messages_pass_or_are_bounded() {
        assert_eq!(clip_message("plain"), "plain");
        let m = format!("a `short` and \"short\" run {}", "-".repeat(300));
        assert_eq!(clip_message(&m), m);
        let unquoted = "z".repeat(1_000_000);
        let clipped = clip_message(&unquoted);
        assert!(clipped.len() <= MESSAGE_LEN_MAX_BYTES + 40 && clipped.contains("bytes cut"), "{}", clipped.len());
        // An unterminated quote is cut too.
        let open = format!("oops \"{}", "q".repeat(10_000));
        assert!(clip_message(&open).len() < 300, "{}", clip_message(&open));
    }

    #[test]
    fn no_input_panics() {
        for text in ["\"", "`", "\\", "\"\\", "\"\\u{", "\"\\u{1f", "`é", "\"é\\é"] {
            let long = format!("{text}{}", text.repeat(500));
            let _ = clip_message(&long);
            let _ = quote_untrusted(&long);
        }
    }
}
