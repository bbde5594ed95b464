//! What changed between two versions of the file, key by key, in the words
//! of the file (`upstream.health_check.interval 2s -> 1s`), found by walking
//! both as TOML: a key added to the configuration types is covered without
//! a line of code here.
//!
//! Which keys apply only at start-up is declared on the types themselves:
//! each section of the file implements [`Section`], whose walk names every
//! field of the section, as live or as restart-only. The walk destructures
//! the section whole, so a field added to a section does not compile until
//! it is declared there, and a test checks that the declared names are the
//! file's keys. A reload walks the new configuration beside the one in force
//! and puts back what only a restart may change ([`keep_restart_only`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use toml::{Table, Value};

use super::Config;

/// A section of the file that declares, key by key, when a new value of
/// its keys takes effect.
pub trait Section {
    /// Declares every key of `self` (the new version) to `keys`, beside
    /// `old` (the version in force): [`Keys::live`], [`Keys::restart`] or a
    /// subsection. Destructure `self` whole, without `..`: a new field then
    /// fails to compile until it is declared.
    fn keys(&mut self, old: &Self, keys: &mut Keys);
}

/// One walk of a configuration beside the one in force: where it is in the
/// file, what it declared, and what it put back.
#[derive(Debug, Default)]
pub struct Keys {
    /// The dotted path of the section being walked, with its trailing dot.
    prefix: String,
    /// Every key and section walked, dotted, and whether it is restart-only.
    declared: Vec<(String, bool)>,
    /// One line per restart-only value put back.
    kept: Vec<String>,
}

impl Keys {
    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn declare(&mut self, name: &str, restart_only: bool) -> String {
        let path = self.path(name);
        self.declared.push((path.clone(), restart_only));
        path
    }

    /// A key (or a whole section, or list of sections) whose new value
    /// applies at once.
    pub fn live<T>(&mut self, name: &'static str, _value: &T) {
        self.declare(name, false);
    }

    /// A key whose new value waits for a restart: the value in force is put
    /// back, and said so with `show`'s words for both.
    pub fn restart<T: PartialEq + Clone>(
        &mut self,
        name: &'static str,
        new: &mut T,
        old: &T,
        show: impl Fn(&T) -> String,
    ) {
        let path = self.declare(name, true);
        if new != old {
            let (was, is) = (show(old), show(new));
            self.kept.push(format!(
                "{path} {was} -> {is} needs a restart; keeping {was}"
            ));
            *new = old.clone();
        }
    }

    /// A section whose appearing or going away waits for a restart (a
    /// listener, or a loop, starts with the process); when it is on both
    /// sides, its own keys are walked.
    pub fn restart_section<S: Section + Clone>(
        &mut self,
        name: &'static str,
        new: &mut Option<S>,
        old: &Option<S>,
    ) {
        let path = self.declare(name, true);
        match (new.as_mut(), old) {
            (Some(new), Some(old)) => self.within(name, new, old),
            (None, None) => {}
            (is, _) => {
                let what = if is.is_some() { "added" } else { "removed" };
                self.kept.push(format!(
                    "[{path}] {what}: that needs a restart; keeping it as it was"
                ));
                *new = old.clone();
            }
        }
    }

    /// A section that may appear or go away live: where it is absent, its
    /// keys are compared with their defaults (what is in force without it).
    pub fn live_section<S: Section + Default>(
        &mut self,
        name: &'static str,
        new: &mut Option<S>,
        old: &Option<S>,
    ) {
        self.declare(name, false);
        let defaults = S::default();
        let old = old.as_ref().unwrap_or(&defaults);
        match new {
            Some(new) => self.within(name, new, old),
            // Nothing to put back into: the values in force stay in force
            // (they were fixed at start-up); the walk still says so.
            None => self.within(name, &mut S::default(), old),
        }
    }

    /// A section that is always there (its keys have defaults).
    pub fn section<S: Section>(&mut self, name: &'static str, new: &mut S, old: &S) {
        self.declare(name, false);
        self.within(name, new, old);
    }

    fn within<S: Section>(&mut self, name: &str, new: &mut S, old: &S) {
        let outer = self.prefix.len();
        self.prefix.push_str(name);
        self.prefix.push('.');
        new.keys(old, self);
        self.prefix.truncate(outer);
    }
}

/// What [`keep_restart_only`] did.
#[derive(Debug, Default)]
pub struct Kept {
    /// One line per value or section put back: `listen 0.0.0.0:80 -> 0.0.0.0:8080 needs a restart; keeping 0.0.0.0:80`.
    pub lines: Vec<String>,
    /// Every restart-only key and section walked, dotted: what [`changes`]
    /// leaves out, since no new value of theirs is applied.
    pub restart_only: Vec<String>,
}

/// Puts back into `new` the value in force (in `old`) of every restart-only
/// key and section that changed, and says so. The error: what the result
/// fails of the checks across sections (a kept `[tls.acme]` whose names
/// came from routes that are gone).
pub fn keep_restart_only(old: &Config, new: &mut Config) -> Result<Kept, String> {
    let mut keys = Keys::default();
    new.keys(old, &mut keys);
    if !keys.kept.is_empty() {
        new.validate().map_err(|(_, message)| {
            format!("{message} (with what needs a restart kept as it is in force)")
        })?;
    }
    Ok(Kept {
        lines: keys.kept,
        restart_only: keys
            .declared
            .into_iter()
            .filter(|(_, restart_only)| *restart_only)
            .map(|(path, _)| path)
            .collect(),
    })
}

/// A value as a reload reports it: `(off)`, `(one per CPU)`, or the value.
pub(super) fn shown<T: fmt::Display>(value: &Option<T>, absent: &str) -> String {
    value
        .as_ref()
        .map_or_else(|| absent.to_owned(), ToString::to_string)
}

/// One entry per change: `KEY OLD -> NEW`, with `(absent)` for a key that is
/// not written; a list of plain values reports what was added to it and
/// removed from it instead; a whole table that appears or goes away (a new
/// `[[route]]`, an `[upstreams.NAME]` removed) is one entry, `route[2] added`,
/// not one per key in it. The keys and sections of `restart_only` are left
/// out: their new values are not applied ([`Kept::lines`] says so).
pub fn changes(old: &Table, new: &Table, restart_only: &[String]) -> Vec<String> {
    let (old, new) = (flatten(old), flatten(new));
    let applied = |path: &String| !restart_only.contains(path);
    let added = topmost(&new.tables, &old.tables);
    let removed = topmost(&old.tables, &new.tables);
    let mut lines: Vec<String> = added
        .iter()
        .filter(|p| applied(p))
        .map(|p| format!("{p} added"))
        .chain(
            removed
                .iter()
                .filter(|p| applied(p))
                .map(|p| format!("{p} removed")),
        )
        .collect();
    let keys: BTreeSet<&String> = old.leaves.keys().chain(new.leaves.keys()).collect();
    for key in keys {
        let in_new_table = added.iter().chain(&removed).any(|table| within(key, table));
        if in_new_table || !applied(key) {
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
            (a, b) if a != b => lines.push(format!("{key} {} -> {}", show(a), show(b))),
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

fn show(leaf: Option<&Leaf>) -> String {
    match leaf {
        None => "(absent)".to_owned(),
        Some(Leaf::One(v)) => v.clone(),
        Some(Leaf::List(items)) => format!("[{}]", items.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    fn config(text: &str) -> Config {
        let text = format!("{text}\n[upstream]\nservers = [\"b:1\"]\n");
        Config::parse(Path::new("lb.toml"), &text).unwrap()
    }

    #[test]
    fn every_changed_key_is_named_with_old_and_new() {
        let old = table("listen = \"0.0.0.0:80\"\n[upstream]\nservers = [\"a:1\", \"b:1\"]\n[upstream.health_check]\ninterval = \"2s\"\n[[route]]\npath = \"/a\"\nupstream = \"x\"\n");
        let new = table("listen = \"0.0.0.0:80\"\nlog_format = \"json\"\n[upstream]\nservers = [\"b:1\", \"c:1\"]\n[upstream.health_check]\ninterval = \"1s\"\n[[route]]\npath = \"/b\"\nupstream = \"x\"\n");
        let lines = changes(&old, &new, &[]);
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
        assert!(changes(&old, &old, &[]).is_empty());
    }

    #[test]
    fn a_table_that_appears_or_goes_is_one_change() {
        let old = table("[upstreams.old]\nservers = [\"a:1\"]\n[upstreams.old.health_check]\npath = \"/h\"\n[[route]]\npath = \"/a\"\nupstream = \"old\"\n");
        let new = table("[upstreams.new]\nservers = [\"b:1\"]\n[[route]]\npath = \"/a\"\nupstream = \"new\"\n[[route]]\npath = \"/b\"\nupstream = \"new\"\nmethods = [\"GET\"]\n");
        let mut lines = changes(&old, &new, &[]);
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
        let old = config("listen = \"0.0.0.0:80\"\n[cache]\nmax_size = \"64MiB\"\n");
        let mut new = config("listen = \"0.0.0.0:8080\"\nthreads = 4\nlog_format = \"json\"\n[cache]\nmax_size = \"1GiB\"\n[[cache.rule]]\npath = \"/x\"\n");
        let kept = keep_restart_only(&old, &mut new).unwrap();
        assert_eq!(
            kept.lines,
            [
                "listen 0.0.0.0:80 -> 0.0.0.0:8080 needs a restart; keeping 0.0.0.0:80",
                "threads (one per CPU) -> 4 needs a restart; keeping (one per CPU)",
                "cache.max_size 64MiB -> 1GiB needs a restart; keeping 64MiB",
            ]
        );
        let mut expected = config("listen = \"0.0.0.0:80\"\nlog_format = \"json\"\n[cache]\nmax_size = \"64MiB\"\n[[cache.rule]]\npath = \"/x\"\n");
        assert_eq!(new, expected, "what applies live is applied");
        // What changed in the file, without what waits for a restart.
        let lines = changes(
            &table("listen = \"0.0.0.0:80\"\n[cache]\nmax_size = \"64MiB\"\n"),
            &table("listen = \"0.0.0.0:8080\"\nthreads = 4\nlog_format = \"json\"\n[cache]\nmax_size = \"1GiB\"\n"),
            &kept.restart_only,
        );
        assert_eq!(lines, ["log_format (absent) -> json"]);
        // The second time, the same.
        assert_eq!(
            keep_restart_only(&expected.clone(), &mut expected)
                .unwrap()
                .lines
                .len(),
            0
        );
    }

    #[test]
    fn an_acme_section_added_or_removed_waits_for_a_restart() {
        let tls = "[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n";
        let acme =
            "[tls.acme]\ndirectory = \"https://ca.example/dir\"\nstorage = \"/var/lib/acme\"\n";
        let without = config(tls);
        let with = config(&format!("{tls}{acme}domains = [\"a.example.com\"]\n"));
        let mut new = with.clone();
        let kept = keep_restart_only(&without, &mut new).unwrap();
        assert_eq!(
            kept.lines,
            ["[tls.acme] added: that needs a restart; keeping it as it was"]
        );
        assert_eq!(new, without);
        let mut new = without.clone();
        let kept = keep_restart_only(&with, &mut new).unwrap();
        assert_eq!(
            kept.lines,
            ["[tls.acme] removed: that needs a restart; keeping it as it was"]
        );
        assert_eq!(new, with);
        // Its keys change live.
        let mut new = config(&format!("{tls}{acme}domains = [\"b.example.com\"]\n"));
        assert!(keep_restart_only(&with, &mut new).unwrap().lines.is_empty());
        assert_eq!(
            new.acme_domains(),
            ["b.example.com"],
            "the new domains are in force"
        );
    }

    /// The names serde reads a struct's fields by: what the file calls its keys.
    fn file_keys<'de, T: serde::Deserialize<'de>>() -> Vec<&'static str> {
        use serde::de::{self, value::Error, Visitor};
        struct Names<'a>(&'a mut &'static [&'static str]);
        impl<'de> de::Deserializer<'de> for Names<'_> {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Error> {
                *self.0 = fields;
                Err(de::Error::custom("names read"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut names: &'static [&'static str] = &[];
        let _ = T::deserialize(Names(&mut names));
        names.to_vec()
    }

    #[test]
    fn every_key_of_every_section_is_declared_live_or_restart_only() {
        // Every optional section present, so that the walk enters each.
        let text = "[tls]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n[tls.acme]\ndirectory = \"https://ca.example/dir\"\nstorage = \"/s\"\ndomains = [\"a.example.com\"]\n[cache]\n[compression]\n";
        let (old, mut new) = (config(text), config(text));
        let mut keys = Keys::default();
        new.keys(&old, &mut keys);
        let declared = |prefix: &str| -> BTreeSet<String> {
            keys.declared
                .iter()
                .filter_map(|(path, _)| path.strip_prefix(prefix))
                .filter(|key| !key.contains('.'))
                .map(str::to_owned)
                .collect()
        };
        let sections = [
            ("", file_keys::<Config>()),
            ("tls.", file_keys::<super::super::Tls>()),
            ("tls.acme.", file_keys::<super::super::Acme>()),
            ("cache.", file_keys::<super::super::Cache>()),
            ("limits.", file_keys::<super::super::Limits>()),
            ("compression.", file_keys::<super::super::Compression>()),
        ];
        for (prefix, fields) in sections {
            assert!(!fields.is_empty(), "{prefix}: serde named no field");
            let fields: BTreeSet<String> = fields.iter().map(|f| (*f).to_owned()).collect();
            assert_eq!(
                declared(prefix),
                fields,
                "the keys that [{prefix}] declares (Section::keys) and the ones the file may write differ"
            );
        }
        let restart_only: Vec<&str> = keys
            .declared
            .iter()
            .filter(|(_, restart_only)| *restart_only)
            .map(|(path, _)| path.as_str())
            .collect();
        assert_eq!(
            restart_only,
            [
                "listen",
                "reuse_port",
                "admin_listen",
                "threads",
                "tls",
                "tls.listen",
                "tls.http2",
                "tls.acme",
                "http2_cleartext",
                "cache.max_size",
                "cache.max_object_size",
            ]
        );
    }
}
