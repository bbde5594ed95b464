//! The README renders as written and its examples are real: code fences
//! balance, no heading is swallowed by a code block, every link to a section
//! names a heading that exists, and every complete ```` ```toml ```` example
//! passes `balancer --check` (an example marked ```` ```toml fragment ````
//! is a part of a file, and is only parsed as TOML).

mod support;

use std::path::Path;

use support::run_balancer;

/// One fenced code block: its info string, first line number and text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

/// The README's code blocks and the headings outside them, or the problems found.
fn read_readme() -> (Vec<Block>, Vec<String>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).expect("README.md is readable");
    let (mut blocks, mut headings, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match open.take() {
                None => {
                    open = Some(Block {
                        info: info.trim().to_owned(),
                        line: number,
                        text: String::new(),
                    })
                }
                Some(block) if info.trim().is_empty() => blocks.push(block),
                Some(block) => {
                    problems.push(format!(
                        "line {number}: a fence with an info string ({info:?}) inside the block opened at line {}",
                        block.line
                    ));
                    open = Some(block);
                }
            }
            continue;
        }
        match &mut open {
            Some(block) => {
                let looks_like_heading = line.starts_with("## ") || line.starts_with("### ");
                if looks_like_heading {
                    problems.push(format!(
                        "line {number}: the heading {line:?} is inside the code block opened at line {}",
                        block.line
                    ));
                }
                block.text.push_str(line);
                block.text.push('\n');
            }
            None if line.starts_with('#') => {
                headings.push(line.trim_start_matches('#').trim().to_owned())
            }
            None => {}
        }
    }
    if let Some(block) = open {
        problems.push(format!(
            "the code block opened at line {} is never closed",
            block.line
        ));
    }
    (blocks, headings, problems)
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, most punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn fences_balance_and_no_heading_is_swallowed() {
    let (blocks, headings, problems) = read_readme();
    assert!(problems.is_empty(), "README.md: {problems:#?}");
    assert!(blocks.len() > 10, "only {} code blocks found", blocks.len());
    for expected in [
        "Configuration reference",
        "Hostile input and failing backends",
        "Edit the TOML, the balancer follows",
    ] {
        assert!(
            headings.iter().any(|h| h == expected),
            "the heading {expected:?} is not rendered as a heading; found {headings:?}"
        );
    }
}

#[test]
fn links_to_sections_name_real_headings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let (_, headings, _) = read_readme();
    let anchors: Vec<String> = headings.iter().map(|h| anchor(h)).collect();
    for link in text.split("](#").skip(1) {
        let target = link.split(')').next().unwrap_or_default();
        assert!(
            anchors.iter().any(|a| a == target),
            "the link to #{target} names no heading; the anchors are {anchors:?}"
        );
    }
}

#[test]
fn every_complete_toml_example_passes_check() {
    let (blocks, _, _) = read_readme();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for block in blocks
        .iter()
        .filter(|b| b.info.split_whitespace().next() == Some("toml"))
    {
        if block.info.split_whitespace().any(|w| w == "fragment") {
            if let Err(e) = block.text.parse::<toml::Table>() {
                panic!(
                    "the TOML fragment at README line {} does not parse: {e}",
                    block.line
                );
            }
            continue;
        }
        let file = dir.path().join(format!("readme-{}.toml", block.line));
        std::fs::write(&file, &block.text).unwrap();
        let (code, out) = run_balancer(&["--config", file.to_str().unwrap(), "--check"]);
        assert_eq!(
            code, 0,
            "the TOML example at README line {} fails `balancer --check`: {out}",
            block.line
        );
        checked += 1;
    }
    assert!(checked >= 1, "no complete TOML example was checked");
}
