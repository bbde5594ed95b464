//! The README renders as written and its examples are real: code fences
//! balance, no heading is swallowed by a code block, every link to a section
//! names a heading that exists, and every complete ```` ```toml ```` example
//! passes `balancer --check` (an example marked ```` ```toml fragment ````
//! is a part of a file, and is only parsed as TOML).

mod support;

use std::path::Path;
use std::time::Duration;

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

/// The README's samples of what the balancer prints, out of its code blocks:
/// metric series, access-log lines (text and JSON) and log lines with their
/// target. Each is compared with what a real balancer prints, so the
/// samples cannot drift from the program.
#[test]
fn the_readme_samples_match_what_the_balancer_prints() {
    let (blocks, _, _) = read_readme();
    let lines: Vec<(usize, &str)> = blocks
        .iter()
        .filter(|b| b.info.split_whitespace().next() != Some("toml"))
        .flat_map(|b| {
            b.text
                .lines()
                .enumerate()
                .map(move |(i, l)| (b.line + 1 + i, l.trim()))
        })
        .collect();

    // What a real balancer prints: a proxied request, a cache miss and hit,
    // a route's own answer, then the same as JSON after a reload.
    let backend_port = support::free_port();
    let _backend = support::start_backend("readme", backend_port);
    let admin = support::free_port();
    let config = |extra: &str| {
        format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n{extra}[upstream]\nservers = [\"127.0.0.1:{backend_port}\"]\n\
             [upstream.health_check]\n[cache]\n[[cache.rule]]\npath = \"/cache-me\"\nttl = \"30s\"\n\
             [[route]]\nname = \"hello\"\npath = \"/hello\"\nrespond = {{ status = 200, body = \"hi\" }}\n"
        )
    };
    let lb = support::start_balancer(&config(""));
    for path in ["/info", "/cache-me", "/cache-me", "/hello"] {
        if let Err(e) = support::get(&lb.url(path)) {
            panic!("GET {path}: {e}\n{}", lb.proc.log_text());
        }
    }
    let metrics = support::scrape(admin);
    lb.rewrite(&config("log_format = \"json\"\n"));
    lb.wait_for_log("config reloaded");
    if let Err(e) = support::get(&lb.url("/info")) {
        panic!("GET /info after the reload: {e}\n{}", lb.proc.log_text());
    }
    let log = support::wait_for(Duration::from_secs(10), "a JSON access-log line", || {
        let log = lb.proc.log_text();
        log.contains("access] {").then_some(log)
    });
    let access_text = log
        .lines()
        .find(|l| l.contains("access] ") && !l.contains("access] {"))
        .expect("a text access-log line");
    let access_json = log
        .lines()
        .find(|l| l.contains("access] {"))
        .expect("a JSON access-log line");

    let mut checked = 0;
    for (line_no, sample) in lines {
        if let Some((name, labels)) = metric_series(sample) {
            let real = metrics
                .lines()
                .filter_map(metric_series)
                .find(|(n, _)| *n == name);
            let Some((_, real_labels)) = real else {
                panic!("README line {line_no}: the balancer exports no {name}: {sample}");
            };
            assert_eq!(
                labels, real_labels,
                "README line {line_no}: {name}'s labels differ from the balancer's"
            );
            checked += 1;
        } else if let Some(rest) = sample.split_once("access] ").map(|(_, r)| r) {
            if rest.starts_with('{') {
                assert_eq!(
                    json_keys(rest),
                    json_keys(access_json.split_once("access] ").unwrap().1),
                    "README line {line_no}: the JSON access-log fields differ from the balancer's"
                );
            } else {
                assert_eq!(
                    text_shape(rest),
                    text_shape(access_text.split_once("access] ").unwrap().1),
                    "README line {line_no}: the access-log line differs in shape from the balancer's:\n  README: {rest}\n  real:   {access_text}"
                );
            }
            checked += 1;
        } else if let Some(target) = log_target(sample) {
            let module = target.trim_start_matches("balancer::").replace("::", "/");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
            assert!(
                src.join(format!("{module}.rs")).exists()
                    || src.join(&module).join("mod.rs").exists(),
                "README line {line_no}: the log target {target} is no module of the balancer: {sample}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "only {checked} samples found in the README's code blocks"
    );
}

/// `name{a="1",b="2"} 3` -> (name, [a, b]) for one of the balancer's series.
fn metric_series(line: &str) -> Option<(&str, Vec<&str>)> {
    let (name, rest) = line.split_once('{')?;
    if !name.starts_with("balancer_") || name.contains(' ') {
        return None;
    }
    let labels = rest.split_once('}')?.0;
    let mut names: Vec<&str> = labels
        .split(',')
        .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    names.sort_unstable();
    Some((name, names))
}

/// The keys of a JSON object, in their written order.
fn json_keys(text: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '"' => {
                let end = text[i + 1..].find('"').map_or(text.len(), |e| i + 1 + e);
                let after = text[end + 1..].trim_start();
                if depth == 1 && after.starts_with(':') {
                    keys.push(text[i + 1..end].to_owned());
                }
                while chars.peek().is_some_and(|(j, _)| *j <= end) {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    keys
}

/// A text access-log line's shape: how many words its quoted request line
/// has, then its `key=` fields in order.
fn text_shape(text: &str) -> (usize, Vec<String>) {
    let request = text.split('"').nth(1).unwrap_or_default();
    let fields = text
        .split_whitespace()
        .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    (request.split_whitespace().count(), fields)
}

/// The target of a log line as env_logger writes it: `LEVEL  balancer::x]`.
fn log_target(line: &str) -> Option<&str> {
    let level_end = ["ERROR ", "WARN  ", "INFO  ", "DEBUG "]
        .iter()
        .find_map(|level| line.find(level).map(|at| at + level.len()))?;
    let (target, _) = line[level_end..].split_once(']')?;
    target.starts_with("balancer").then_some(target)
}
