//! The code cites the compatibility contract, `docs/patroni-compat.md`, by section number
//! ("section sign" followed by `4.10`). These tests keep those citations honest: every cited
//! section exists as a heading of the document, every file that cites a section names the
//! document (a bare number is useless to a reader who does not know which document it means),
//! and nothing points at the document under another path.
//!
//! Convention: in this repository a section sign always means a section of
//! `docs/patroni-compat.md`. Ranges (`4.2-4.7`) are checked at both ends.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

const SECTION_SIGN: char = '\u{a7}';
const DOC: &str = "docs/patroni-compat.md";
/// The document's file name, spelled so that this file does not contain it without `docs/`.
const FILE_NAME: &str = concat!("patroni", "-compat.md");

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// The section numbers of the document's headings: `## 1. DCS layout` gives `1`,
/// `#### 1.3.1 members/<name>` gives `1.3.1`.
fn sections(doc: &str) -> Vec<String> {
    doc.lines()
        .filter_map(|line| {
            let title = line
                .strip_prefix("##")?
                .trim_start_matches('#')
                .strip_prefix(' ')?;
            let number: String = title
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.');
            (!number.is_empty()).then(|| number.to_string())
        })
        .collect()
}

/// A dotted section number at the start of `text` (`4.10` of `4.10).`), if any.
fn number_at(text: &str) -> Option<String> {
    let number: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let number = number.trim_end_matches('.');
    (!number.is_empty() && number.starts_with(|c: char| c.is_ascii_digit())).then(|| number.to_string())
}

/// Every section a text cites, with its line number: the number after each section sign, and
/// the end of a range (`4.2-4.7`, with or without a second sign).
fn citations(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices(SECTION_SIGN) {
            let rest = &line[at + SECTION_SIGN.len_utf8()..];
            let Some(number) = number_at(rest) else {
                continue;
            };
            let after = &rest[number.len()..];
            found.push((index + 1, number));
            // `4.2-4.7`: the end has no sign of its own (with one, the loop finds it anyway).
            if let Some(end) = after.strip_prefix('-').and_then(number_at) {
                found.push((index + 1, end));
            }
        }
    }
    found
}

/// The repository's sources and documents: `.rs`, `.md`, `.toml`, `.sh`, `.yml` files outside
/// build output and hidden directories.
fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            source_files(&path, out);
        } else if ["rs", "md", "toml", "sh", "yml"]
            .iter()
            .any(|ext| path.extension().is_some_and(|e| e == *ext))
        {
            out.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn headings_give_unique_section_numbers() {
    let doc = read(&repository_root().join(DOC));
    let numbers = sections(&doc);
    let unique: BTreeSet<&String> = numbers.iter().collect();
    assert_eq!(
        unique.len(),
        numbers.len(),
        "{DOC} has duplicate section numbers: {numbers:?}"
    );
    // The document's skeleton: the parts the code relies on most.
    for expected in [
        "1", "1.3.1", "1.5", "2.3", "2.6", "3.3", "3.4", "4.2", "4.10", "4.13", "5.8", "6", "8",
    ] {
        assert!(
            unique.contains(&expected.to_string()),
            "{DOC} has no section {expected}"
        );
    }
}

#[test]
fn every_cited_section_exists() {
    let root = repository_root();
    let known: BTreeSet<String> = sections(&read(&root.join(DOC))).into_iter().collect();
    let mut files = Vec::new();
    source_files(&root, &mut files);
    let mut cited = 0;
    let mut missing = Vec::new();
    for path in &files {
        for (line, number) in citations(&read(path)) {
            cited += 1;
            if !known.contains(&number) {
                let shown = path.strip_prefix(&root).unwrap_or(path).display();
                missing.push(format!("{shown}:{line}: section {number}"));
            }
        }
    }
    // The walk must have found the code's citations, or this test proves nothing.
    assert!(
        cited > 50,
        "only {cited} citations found under {}",
        root.display()
    );
    assert!(
        missing.is_empty(),
        "citations of sections that {DOC} does not have:\n{}",
        missing.join("\n")
    );
}

#[test]
fn files_that_cite_sections_name_the_document() {
    let root = repository_root();
    let mut files = Vec::new();
    source_files(&root, &mut files);
    let mut unnamed = Vec::new();
    let mut elsewhere = Vec::new();
    for path in &files {
        let shown = path.strip_prefix(&root).unwrap_or(path);
        if shown == Path::new(DOC) {
            continue;
        }
        let text = read(path);
        if text.contains(SECTION_SIGN) && !text.contains(DOC) {
            unnamed.push(shown.display().to_string());
        }
        // Inside docs/, a Markdown link target is relative to docs/ and may omit the folder.
        let in_docs = shown.starts_with("docs");
        let bare = text.match_indices(FILE_NAME).any(|(at, _)| {
            let before = &text[..at];
            let named = before.ends_with("docs/") || (in_docs && before.ends_with("]("));
            !named
        });
        if bare {
            elsewhere.push(shown.display().to_string());
        }
    }
    assert!(
        unnamed.is_empty(),
        "these files cite sections without naming {DOC} (write `{DOC}` next to the first citation):\n{}",
        unnamed.join("\n")
    );
    assert!(
        elsewhere.is_empty(),
        "these files name the document without its path {DOC}:\n{}",
        elsewhere.join("\n")
    );
}

#[test]
fn citation_parsing() {
    let text = format!(
        "a (x {s}4.10). b {s}4.2-{s}4.7 and {s}1.4-1.5, {s}5.3 step 4\nnone {s} here",
        s = SECTION_SIGN
    );
    let found: Vec<String> = citations(&text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(found, ["4.10", "4.2", "4.7", "1.4", "1.5", "5.3"]);
    let doc = "# Title\n## 1. DCS\n### 1.3 Values\n#### 1.3.1 `members`\n## Words only\n## 8. Pain\n";
    assert_eq!(sections(doc), ["1", "1.3", "1.3.1", "8"]);
}
