//! The balancer's modules stay in layers: a module uses only modules of
//! lower layers, so that what each one means can be read from below without
//! a circle. This reads every `balancer/src/**/*.rs`, finds each path into
//! another top-level module of the crate (`use crate::x`, the groups of
//! `use crate::{x, y::z}`, inline `crate::x::f(...)`, and `super::` paths
//! that climb out of their module), and fails naming the file, the line and
//! the import for each one that reaches its own layer or above.
//!
//! The layers are written here and in `balancer/src/lib.rs`'s doc; the test
//! checks that both say the same.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top. A module of one layer may use modules of the layers
/// before it, none of its own layer or after it.
const LAYERS: &[&[&str]] = &[
    &["telemetry"],
    &["config"],
    &["tls", "upstream", "routing", "cache", "extension"],
    &["runtime"],
    &["proxy"],
    &["admin"],
    &["server"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// One path from a file into a top-level module of the crate.
#[derive(Debug, PartialEq, Eq)]
struct Import {
    line: usize,
    module: String,
}

#[test]
fn every_module_uses_only_modules_of_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "only {} files found under {}",
        files.len(),
        src.display()
    );
    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let Some((top, depth)) = module_of(relative) else {
            continue; // lib.rs and main.rs: the crate's roots
        };
        let Some(own) = layer_of(&top) else {
            problems.push(format!(
                "src/{}: the module `{top}` is in no layer: add it to LAYERS here and to lib.rs's list",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("a readable source file");
        for import in imports(&text, depth) {
            if import.module == top {
                continue;
            }
            let Some(theirs) = layer_of(&import.module) else {
                continue; // not a module of the crate (an item at its root, or none)
            };
            if theirs >= own {
                let line = text.lines().nth(import.line - 1).unwrap_or("").trim();
                problems.push(format!(
                    "src/{}:{}: `{top}` (layer {own}) uses `{}` (layer {theirs}): {line}",
                    relative.display(),
                    import.line,
                    import.module,
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "a module may use only modules of lower layers (see balancer/src/lib.rs):\n{}",
        problems.join("\n")
    );
}

#[test]
fn lib_rs_lists_the_same_layers_and_every_module() {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let text = std::fs::read_to_string(&lib).expect("lib.rs is readable");
    // The doc's list: `//! N. `a`, `b`: why`, one line a layer.
    let written: Vec<Vec<String>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter_map(|l| {
            let (number, rest) = l.split_once(". ")?;
            number.parse::<usize>().ok()?;
            let names = rest.split_once(':').map_or(rest, |(names, _)| names);
            Some(
                names
                    .split(',')
                    .map(|n| n.trim().trim_matches('`').to_owned())
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<Vec<String>> = LAYERS
        .iter()
        .map(|layer| layer.iter().map(|m| (*m).to_owned()).collect())
        .collect();
    assert_eq!(
        written, expected,
        "lib.rs's doc lists other layers than tests/layers.rs"
    );
    let declared: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    let layered: BTreeSet<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    assert_eq!(
        declared, layered,
        "lib.rs declares other modules than the layers name"
    );
}

#[test]
fn imports_are_found_in_every_form_and_nowhere_else() {
    let text = r##"//! crate::admin in a doc comment is no import
use crate::config::{self, Config};
use crate::{cache, routing::Route,
    upstream::{Backend, Pool}};
pub use crate::telemetry::access_log::LogFormat;
fn f() {
    let s = "crate::proxy in a string"; // crate::server in a comment
    let r = r#"crate::cli"#;
    let c = '"'; let t = crate::tls::read_certificates(p);
    /* crate::admin
       in a block comment */ let x = mycrate::admin::f();
    use super::super::server::run;
}
"##;
    let found: Vec<(usize, &str)> = imports(text, 1)
        .iter()
        .map(|i| (i.line, layer_name(&i.module)))
        .collect();
    assert_eq!(
        found,
        [
            (2, "config"),
            (3, "cache"),
            (3, "routing"),
            (4, "upstream"),
            (5, "telemetry"),
            (9, "tls"),
            (12, "server"),
        ]
    );
    // Two levels down (`proxy/drain.rs`), one `super` stays in the module.
    assert!(imports("use super::tunnel;", 2).is_empty());
}

/// The name as a `&'static str` of the layer list, for the comparison above.
fn layer_name(module: &str) -> &'static str {
    LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .find(|m| **m == module)
        .copied()
        .unwrap_or("?")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("a readable directory");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to, and how deep its module is
/// (`cli.rs` and `proxy/mod.rs` 1, `proxy/drain.rs` 2); `None` for the roots.
fn module_of(relative: &Path) -> Option<(String, usize)> {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let top = parts.first()?.trim_end_matches(".rs").to_owned();
    if parts.len() == 1 && (top == "lib" || top == "main") {
        return None;
    }
    let depth = parts.len() - usize::from(parts.last().is_some_and(|f| f == "mod.rs"));
    Some((top, depth.max(1)))
}

/// Every path into a top-level module of the crate in `text`, a file whose
/// module is `depth` levels below the crate's root.
fn imports(text: &str, depth: usize) -> Vec<Import> {
    let code: Vec<char> = code_only(text).chars().collect();
    let line_at = |i: usize| code[..i].iter().filter(|c| **c == '\n').count() + 1;
    let mut found = Vec::new();
    let mut i = 0;
    while i < code.len() {
        let starts_word = i == 0 || !is_ident(code[i - 1]);
        if starts_word && at(&code, i, "crate::") {
            let after = skip_space(&code, i + "crate::".len());
            for (at, module) in first_segments(&code, after) {
                found.push(Import {
                    line: line_at(at),
                    module,
                });
            }
            i = after;
        } else if starts_word && at(&code, i, "super::") {
            // `super::` k times climbs out of the top module when k >= depth;
            // modules declared inside a file only add depth, so this never
            // reports a path that stays inside.
            let mut j = i;
            let mut climbs = 0;
            while at(&code, j, "super::") {
                climbs += 1;
                j = skip_space(&code, j + "super::".len());
            }
            if climbs >= depth {
                for (at, module) in first_segments(&code, j) {
                    found.push(Import {
                        line: line_at(at),
                        module,
                    });
                }
            }
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

/// The first segment of the path at `i` (`x` of `x::y`), or of each path
/// of the group at `i` (`x`, `y` of `{x, y::z}`), with where each begins.
fn first_segments(code: &[char], i: usize) -> Vec<(usize, String)> {
    if code.get(i) != Some(&'{') {
        return ident_at(code, i).map(|n| (i, n)).into_iter().collect();
    }
    let mut segments = Vec::new();
    let (mut depth, mut expect) = (0usize, true);
    let mut j = i;
    while j < code.len() {
        match code[j] {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect = true,
            c if depth == 1 && expect && is_ident(c) => {
                let name = ident_at(code, j).unwrap_or_default();
                if name != "self" {
                    segments.push((j, name.clone()));
                }
                expect = false;
                j += name.len();
                continue;
            }
            _ => {}
        }
        j += 1;
    }
    segments
}

fn ident_at(code: &[char], i: usize) -> Option<String> {
    let name: String = code[i..].iter().take_while(|c| is_ident(**c)).collect();
    (!name.is_empty()).then_some(name)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `word` stands at `i`.
fn at(code: &[char], i: usize, word: &str) -> bool {
    word.chars()
        .enumerate()
        .all(|(k, w)| code.get(i + k) == Some(&w))
}

fn skip_space(code: &[char], mut i: usize) -> usize {
    while code.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

/// `text` with its comments and the insides of its string and character
/// literals blanked out, line breaks kept (so line numbers stay true).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    // What is blanked out keeps only its line breaks.
    let blank = |out: &mut String, c: char| {
        if c == '\n' {
            out.push('\n');
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        // `r` begins a raw string unless it ends a name (`br` is a raw byte string).
        let raw_may_begin = match i {
            0 => true,
            1 => !is_ident(chars[0]) || chars[0] == 'b',
            _ => !is_ident(chars[i - 1]) || (chars[i - 1] == 'b' && !is_ident(chars[i - 2])),
        };
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if at(&chars, i, "/*") {
                    depth += 1;
                    i += 2;
                } else if at(&chars, i, "*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r' && raw_may_begin && matches!(next, Some('#' | '"')) {
            // A raw string: r"...", r#"..."#, ...
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let close: Vec<char> = close.chars().collect();
            i += 2 + hashes;
            while i < chars.len() && !chars[i..].starts_with(&close) {
                blank(&mut out, chars[i]);
                i += 1;
            }
            i += close.len();
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A character literal ('a', '\n', '\''); a lifetime has no closing quote.
            i += if next == Some('\\') { 3 } else { 2 };
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}
