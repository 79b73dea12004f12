//! Every design reference in the repository resolves to a section of `wire/DESIGN.md`.
//!
//! What it does: walks the repository (from this crate's folder, one level up), skipping
//! `target/` and `.git/`, reads every UTF-8 text file, and finds each reference of the form
//! `DESIGN section N`, `DESIGN sections N and M`, `DESIGN §N` or `DESIGN.md section N` (the
//! words may be split over comment lines, `N` may be a subsection such as `11.4`). Each `N`
//! must be the number of a heading in `wire/DESIGN.md` (`## N. Title`, `### N.M Title`). A bare
//! `DESIGN` that names no section (such as "the DESIGN table") is vague and fails too; a plain
//! mention of the file `DESIGN.md` (a link) is not a reference. Failures name `file:line`.
//!
//! What it does not: judge whether a section is about what the citing code is about; that is
//! the writer's job, and the document's numbering is kept stable so it stays right.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files larger than this are data, not source or documentation.
const FILE_LEN_MAX_BYTES: u64 = 4 << 20;

/// The repository's root: the workspace folder above this crate.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The section numbers the document's headings carry: `## 3. Staging` gives "3",
/// `### 11.4 Inbounds` gives "11.4".
fn headings(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix('#') else { continue };
        let rest = rest.trim_start_matches('#').trim_start();
        let number = take_number(rest);
        if !number.is_empty() {
            out.insert(number.to_owned());
        }
    }
    out
}

/// The leading section number of `text` (`11.4` of `11.4 Inbounds`, `3` of `3. Staging`).
fn take_number(text: &str) -> &str {
    let bytes = text.as_bytes();
    let mut end = 0;
    while let Some(&b) = bytes.get(end) {
        // A dot belongs to the number only between digits (`11.4`), not after it (`3. Staging`).
        let digit_next = bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
        if !(b.is_ascii_digit() || (b == b'.' && end > 0 && digit_next)) {
            break;
        }
        end += 1;
    }
    &text[..end]
}

/// One design reference found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    line: usize,
    /// The section numbers it names; empty for a vague reference.
    sections: Vec<String>,
}

/// Skips whitespace and comment leaders (`//!`, `///`, `//`, `#`, `*`, `>`), also across lines.
fn skip_filler(text: &str, mut at: usize) -> usize {
    loop {
        let rest = &text[at..];
        let trimmed = rest.trim_start();
        at += rest.len() - trimmed.len();
        let leader = ["//!", "///", "//", "#", "*", ">"].iter().find(|l| trimmed.starts_with(**l));
        match leader {
            Some(l) if at == 0 || text[..at].trim_end_matches([' ', '\t']).ends_with('\n') => {
                at += l.len();
            }
            _ => return at,
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every design reference in `text`.
fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find("DESIGN") {
        let start = from + found;
        let mut at = start + "DESIGN".len();
        from = at;
        if (start > 0 && is_word_byte(bytes[start - 1])) || bytes.get(at).copied().is_some_and(is_word_byte) {
            continue;
        }
        let line = text[..start].matches('\n').count() + 1;
        let is_file = text[at..].starts_with(".md");
        if is_file {
            at += ".md".len();
        }
        at = skip_filler(text, at);
        let rest = &text[at..];
        let keyword = ["sections", "section", "Sections", "Section", "§§", "§"].iter().find(|k| rest.starts_with(**k));
        let Some(keyword) = keyword else {
            if !is_file {
                out.push(Reference { line, sections: Vec::new() });
            }
            continue;
        };
        at += keyword.len();
        let mut sections = Vec::new();
        loop {
            at = skip_filler(text, at);
            let number = take_number(&text[at..]);
            if !number.is_empty() {
                sections.push(number.to_owned());
                at += number.len();
                continue;
            }
            let rest = &text[at..];
            match [",", "and ", "or ", "&"].iter().find(|s| rest.starts_with(**s)) {
                Some(sep) if !sections.is_empty() => at += sep.len(),
                _ => break,
            }
        }
        from = at;
        out.push(Reference { line, sections });
    }
    out
}

/// Every text file under `dir`, skipping `target/`, `.git/` and symlinks.
fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        let name = entry.file_name();
        if kind.is_dir() {
            if name != "target" && name != ".git" {
                text_files(&path, out);
            }
        } else if kind.is_file() && entry.metadata().is_ok_and(|m| m.len() <= FILE_LEN_MAX_BYTES) {
            out.push(path);
        }
    }
}

#[test]
fn every_design_reference_names_a_section_of_wire_design_md() {
    let root = repo_root();
    let doc_path = root.join("wire").join("DESIGN.md");
    let doc = std::fs::read_to_string(&doc_path).expect("wire/DESIGN.md is readable");
    let sections = headings(&doc);
    assert!(sections.len() >= 10, "wire/DESIGN.md has only these numbered headings: {sections:?}");
    let this_file = Path::new(file!()).file_name();
    let mut files = Vec::new();
    text_files(&root, &mut files);
    files.sort();
    let (mut failures, mut count) = (Vec::new(), 0usize);
    for path in files {
        let relative = path.strip_prefix(&root).unwrap_or(&path);
        if relative == Path::new("wire/DESIGN.md")
            || (relative.starts_with("wire/tests") && relative.file_name() == this_file)
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        for reference in references(&text) {
            count += 1;
            let at = format!("{}:{}", relative.display(), reference.line);
            if reference.sections.is_empty() {
                failures.push(format!("{at}: a design reference without a section number (write `DESIGN section N`)"));
            }
            for section in &reference.sections {
                if !sections.contains(section) {
                    failures.push(format!("{at}: DESIGN section {section} is not a heading of wire/DESIGN.md"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} design references do not resolve:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The code cites the document some forty times: finding far fewer means the scan broke.
    assert!(count >= 20, "only {count} design references found: is the scan still reading the repository?");
}

#[test]
fn the_scanner_reads_the_reference_forms_the_code_uses() {
    let text = "//! The fence (DESIGN sections 2 and 5).\n\
                /// Default budget (DESIGN section 4).\n\
                //! The cut-over (DESIGN\n//! sections 2, 4 and 5).\n\
                # as DESIGN section 9 asks\n\
                see DESIGN §11.4: admission; DESIGN.md section 3\n\
                by hand from the DESIGN table\n\
                a link to [wire/DESIGN.md](wire/DESIGN.md)\n\
                NODESIGN DESIGNS DESIGN_X are words, not references\n";
    let found = references(text);
    let names = |r: &Reference| r.sections.iter().map(String::as_str).collect::<Vec<_>>().join(" ");
    let seen: Vec<(usize, String)> = found.iter().map(|r| (r.line, names(r))).collect();
    assert_eq!(
        seen,
        vec![
            (1, "2 5".to_owned()),
            (2, "4".to_owned()),
            (3, "2 4 5".to_owned()),
            (5, "9".to_owned()),
            (6, "11.4".to_owned()),
            (6, "3".to_owned()),
            (7, String::new()),
        ]
    );
}

#[test]
fn headings_give_their_numbers_and_a_missing_one_is_caught() {
    let doc = "# ferry design\n\n## 1. Roles\n\n### 11.4 Inbounds\n\n## Not numbered\n";
    let sections = headings(doc);
    assert_eq!(sections.into_iter().collect::<Vec<_>>(), vec!["1".to_owned(), "11.4".to_owned()]);
    let bad = references("// DESIGN section 12\n");
    assert_eq!(bad, vec![Reference { line: 1, sections: vec!["12".to_owned()] }]);
    assert!(!headings(doc).contains("12"));
}
