//! What changed between two versions of the file, key by key, in the words
//! of the file (`upstream.health_check.interval 2s -> 1s`), found by walking
//! both as TOML: a key added to the configuration types is covered without
//! a line of code here. The keys that apply only at start-up are declared
//! once, in [`RESTART_ONLY`].

use std::collections::{BTreeMap, BTreeSet};

use toml::{Table, Value};

/// Dotted keys whose new value is kept out until a restart.
pub const RESTART_ONLY: [&str; 9] = [
    "listen",
    "reuse_port",
    "admin_listen",
    "threads",
    "http2_cleartext",
    "tls.listen",
    "tls.http2",
    "cache.max_size",
    "cache.max_object_size",
];

/// Sections whose appearing or going away needs a restart (a listener, or
/// the ACME renewal, starts with the process).
const RESTART_ONLY_SECTIONS: [&str; 2] = ["tls", "tls.acme"];

/// One entry per change: `KEY OLD -> NEW`, with `(absent)` for a key that is
/// not written; a list of plain values reports what was added to it and
/// removed from it instead; a whole table that appears or goes away (a new
/// `[[route]]`, an `[upstreams.NAME]` removed) is one entry, `route[2] added`,
/// not one per key in it.
pub fn changes(old: &Table, new: &Table) -> Vec<String> {
    let (old, new) = (flatten(old), flatten(new));
    let added = topmost(&new.tables, &old.tables);
    let removed = topmost(&old.tables, &new.tables);
    let mut lines: Vec<String> = added
        .iter()
        .map(|p| format!("{p} added"))
        .chain(removed.iter().map(|p| format!("{p} removed")))
        .collect();
    let keys: BTreeSet<&String> = old.leaves.keys().chain(new.leaves.keys()).collect();
    for key in keys {
        if added.iter().chain(&removed).any(|table| within(key, table)) {
            continue;
        }
        match (old.leaves.get(key), new.leaves.get(key)) {
            (Some(Leaf::List(a)), Some(Leaf::List(b))) => {
                lines.extend(
                    b.iter()
                        .filter(|v| !a.contains(v))
                        .map(|v| format!("{key} added {v}")),
                );
                lines.extend(
                    a.iter()
                        .filter(|v| !b.contains(v))
                        .map(|v| format!("{key} removed {v}")),
                );
            }
            (a, b) if a != b => lines.push(format!("{key} {} -> {}", show(key, a), show(key, b))),
            _ => {}
        }
    }
    lines
}

/// Whether the dotted `path` lies inside the table at `table` (`route[2].path` in `route[2]`).
fn within(path: &str, table: &str) -> bool {
    path.strip_prefix(table)
        .is_some_and(|rest| rest.starts_with(['.', '[']))
}

/// The tables of `these` that `those` lacks, without the ones inside another such table.
fn topmost<'a>(these: &'a BTreeSet<String>, those: &BTreeSet<String>) -> Vec<&'a String> {
    let only: Vec<&String> = these.iter().filter(|p| !those.contains(*p)).collect();
    only.iter()
        .filter(|p| !only.iter().any(|outer| within(p, outer)))
        .copied()
        .collect()
}

/// Puts back into `new` the old value (or absence) of every restart-only key
/// that changed, and says so: `listen 0.0.0.0:80 -> 0.0.0.0:8080 needs a restart; keeping 0.0.0.0:80`.
pub fn keep_restart_only(old: &Table, new: &mut Table) -> Vec<String> {
    let mut kept = Vec::new();
    for section in RESTART_ONLY_SECTIONS {
        let (was, is) = (
            lookup(old, section).cloned(),
            lookup(new, section).is_some(),
        );
        if was.is_some() != is {
            let what = if is { "added" } else { "removed" };
            kept.push(format!(
                "[{section}] {what}: that needs a restart; keeping it as it was"
            ));
            set(new, section, was);
        }
    }
    for key in RESTART_ONLY {
        let (was, is) = (lookup(old, key).cloned(), lookup(new, key).cloned());
        if was == is {
            continue;
        }
        let (was_text, is_text) = (show_value(key, was.as_ref()), show_value(key, is.as_ref()));
        kept.push(format!(
            "{key} {was_text} -> {is_text} needs a restart; keeping {was_text}"
        ));
        set(new, key, was);
    }
    kept
}

/// A value as written, for lists of plain values item by item.
#[derive(Debug, PartialEq)]
enum Leaf {
    One(String),
    List(Vec<String>),
}

/// A file walked once: every value by its dotted key, and the dotted path of
/// every table (`upstreams.api`, `route[2]`), the top one excluded, and so is
/// a table that only names others (`upstreams`): its tables are what appears
/// or goes away.
#[derive(Default)]
struct Flat {
    leaves: BTreeMap<String, Leaf>,
    tables: BTreeSet<String>,
}

fn flatten(table: &Table) -> Flat {
    let mut out = Flat::default();
    walk("", &Value::Table(table.clone()), &mut out);
    out
}

fn walk(prefix: &str, value: &Value, out: &mut Flat) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Table(table) => {
            for (key, value) in table {
                walk(&join(key), value, out);
            }
            // An element of an array of tables is one whatever it holds.
            let names_others =
                !prefix.ends_with(']') && !table.is_empty() && table.values().all(Value::is_table);
            if !prefix.is_empty() && !names_others {
                out.tables.insert(prefix.to_owned());
            }
        }
        // An array of tables (`[[route]]`): each by its position.
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
            for (i, item) in items.iter().enumerate() {
                walk(&format!("{prefix}[{i}]"), item, out);
            }
        }
        Value::Array(items) => {
            out.leaves.insert(
                prefix.to_owned(),
                Leaf::List(items.iter().map(plain).collect()),
            );
        }
        other => {
            out.leaves
                .insert(prefix.to_owned(), Leaf::One(plain(other)));
        }
    }
}

/// A value as a reader wants it: strings without quotes, the rest as TOML.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a key that is not written means.
fn absent(key: &str) -> String {
    match key {
        "admin_listen" => "(off)",
        "threads" => "(one per CPU)",
        "reuse_port" => "false",
        _ => "(absent)",
    }
    .to_owned()
}

fn show(key: &str, leaf: Option<&Leaf>) -> String {
    match leaf {
        None => absent(key),
        Some(Leaf::One(v)) => v.clone(),
        Some(Leaf::List(items)) => format!("[{}]", items.join(", ")),
    }
}

fn show_value(key: &str, value: Option<&Value>) -> String {
    value.map_or_else(|| absent(key), plain)
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn set(table: &mut Table, key: &str, value: Option<Value>) {
    match key.split_once('.') {
        None => {
            match value {
                Some(v) => table.insert(key.to_owned(), v),
                None => table.remove(key),
            };
        }
        Some((head, rest)) => {
            if let Some(Value::Table(inner)) = table.get_mut(head) {
                set(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn every_changed_key_is_named_with_old_and_new() {
        let old = table("listen = \"0.0.0.0:80\"\n[upstream]\nservers = [\"a:1\", \"b:1\"]\n[upstream.health_check]\ninterval = \"2s\"\n[[route]]\npath = \"/a\"\nupstream = \"x\"\n");
        let new = table("listen = \"0.0.0.0:80\"\nlog_format = \"json\"\n[upstream]\nservers = [\"b:1\", \"c:1\"]\n[upstream.health_check]\ninterval = \"1s\"\n[[route]]\npath = \"/b\"\nupstream = \"x\"\n");
        let lines = changes(&old, &new);
        for expected in [
            "log_format (absent) -> json",
            "upstream.servers added c:1",
            "upstream.servers removed a:1",
            "upstream.health_check.interval 2s -> 1s",
            "route[0].path /a -> /b",
        ] {
            assert!(
                lines.iter().any(|l| l == expected),
                "{expected:?} not in {lines:?}"
            );
        }
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(changes(&old, &old).is_empty());
    }

    #[test]
    fn a_table_that_appears_or_goes_is_one_change() {
        let old = table("[upstreams.old]\nservers = [\"a:1\"]\n[upstreams.old.health_check]\npath = \"/h\"\n[[route]]\npath = \"/a\"\nupstream = \"old\"\n");
        let new = table("[upstreams.new]\nservers = [\"b:1\"]\n[[route]]\npath = \"/a\"\nupstream = \"new\"\n[[route]]\npath = \"/b\"\nupstream = \"new\"\nmethods = [\"GET\"]\n");
        let mut lines = changes(&old, &new);
        lines.sort();
        assert_eq!(
            lines,
            [
                "route[0].upstream old -> new",
                "route[1] added",
                "upstreams.new added",
                "upstreams.old removed",
            ]
        );
    }

    #[test]
    fn restart_only_keys_keep_their_old_value() {
        let old = table("listen = \"0.0.0.0:80\"\n[cache]\nmax_size = \"64MiB\"\n");
        let mut new =
            table("listen = \"0.0.0.0:8080\"\nthreads = 4\n[cache]\nmax_size = \"1GiB\"\n");
        let kept = keep_restart_only(&old, &mut new);
        assert_eq!(
            kept,
            [
                "listen 0.0.0.0:80 -> 0.0.0.0:8080 needs a restart; keeping 0.0.0.0:80",
                "threads (one per CPU) -> 4 needs a restart; keeping (one per CPU)",
                "cache.max_size 64MiB -> 1GiB needs a restart; keeping 64MiB",
            ]
        );
        assert_eq!(
            new,
            table("listen = \"0.0.0.0:80\"\n[cache]\nmax_size = \"64MiB\"\n")
        );
    }

    #[test]
    fn an_acme_section_added_or_removed_waits_for_a_restart() {
        let without = table("[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n");
        let with = table("[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[tls.acme]\ndomains = [\"a.example.com\"]\n");
        let mut new = with.clone();
        let kept = keep_restart_only(&without, &mut new);
        assert_eq!(
            kept,
            ["[tls.acme] added: that needs a restart; keeping it as it was"]
        );
        assert_eq!(new, without);
        let mut new = without.clone();
        let kept = keep_restart_only(&with, &mut new);
        assert_eq!(
            kept,
            ["[tls.acme] removed: that needs a restart; keeping it as it was"]
        );
        assert_eq!(new, with);
        // Its keys change live.
        let mut new = table("[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[tls.acme]\ndomains = [\"b.example.com\"]\n");
        assert!(keep_restart_only(&with, &mut new).is_empty());
    }
}
