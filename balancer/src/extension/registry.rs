//! Kinds and instances: the [`Registry`] of the kinds a program knows, and
//! the [`Instances`] a configuration declares, built from it once per load.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{Extension, GroupRef};
use crate::config::{Config, ExtensionDecl};

/// Makes instances of one kind from their settings.
pub trait Factory: Send + Sync + 'static {
    /// Builds the instance `build.instance()` from the settings of its
    /// section (every key but `kind`). May block (read files, compile); the
    /// error says what is wrong with the settings, and how to put it right.
    fn build(
        &self,
        settings: toml::Table,
        build: &mut Build<'_>,
    ) -> Result<Arc<dyn Extension>, String>;
}

/// The kinds of extension a program knows, by name.
#[derive(Clone)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn Factory>>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new()
    }
}

impl Registry {
    /// The kinds built into the balancer: `lua` (scripts, see `extension::lua`).
    pub fn new() -> Registry {
        Registry {
            kinds: BTreeMap::new(),
        }
        .register("lua", super::lua::build)
    }

    /// Registers the kind `kind`: its instances' settings are deserialised
    /// into `S` (an unknown or ill-typed setting is an error naming the
    /// instance and its line), and `make` turns them into the extension.
    pub fn register<S, E, F>(self, kind: &str, make: F) -> Registry
    where
        S: DeserializeOwned + 'static,
        E: Extension,
        F: Fn(S, &mut Build<'_>) -> Result<E, String> + Send + Sync + 'static,
    {
        let typed = Typed {
            make,
            _settings: std::marker::PhantomData::<fn() -> (S, E)>,
        };
        self.register_factory(kind, Arc::new(typed))
    }

    /// Registers the kind `kind` with a factory of its own.
    pub fn register_factory(mut self, kind: &str, factory: Arc<dyn Factory>) -> Registry {
        self.kinds.insert(kind.to_owned(), factory);
        self
    }

    /// The names of the kinds it knows.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}

/// A factory from a typed closure.
struct Typed<F, M> {
    make: F,
    _settings: std::marker::PhantomData<M>,
}

impl<S, E, F> Factory for Typed<F, fn() -> (S, E)>
where
    S: DeserializeOwned + 'static,
    E: Extension,
    F: Fn(S, &mut Build<'_>) -> Result<E, String> + Send + Sync + 'static,
{
    fn build(
        &self,
        settings: toml::Table,
        build: &mut Build<'_>,
    ) -> Result<Arc<dyn Extension>, String> {
        let settings = S::deserialize(toml::Value::Table(settings))
            .map_err(|e| e.message().trim().to_owned())?;
        Ok(Arc::new((self.make)(settings, build)?))
    }
}

/// What an instance is built with besides its settings: its name, the
/// groups of the configuration, and the files it may read.
pub struct Build<'a> {
    instance: &'a str,
    dir: &'a Path,
    groups: &'a BTreeSet<&'a str>,
    sources: Vec<Source>,
    named_groups: Vec<Arc<str>>,
}

impl Build<'_> {
    /// The instance's name (`keys` for `[extensions.keys]`).
    pub fn instance(&self) -> &str {
        self.instance
    }

    /// The upstream group `name` (`default` is `[upstream]`), or an error
    /// that lists the groups there are.
    pub fn group(&mut self, name: &str) -> Result<GroupRef, String> {
        if !self.groups.contains(name) {
            let there: Vec<&str> = self.groups.iter().copied().collect();
            return Err(format!(
                "upstream group {name:?} is not defined (the groups are: {})",
                there.join(", ")
            ));
        }
        let name: Arc<str> = Arc::from(name);
        self.named_groups.push(Arc::clone(&name));
        Ok(GroupRef(name))
    }

    /// The names of every upstream group of the configuration (a name that
    /// is used must still be taken with [`Build::group`]).
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().copied()
    }

    /// `path` as the configuration means it: relative to the configuration
    /// file's folder, unless absolute.
    pub fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        self.dir.join(path)
    }

    /// Reads the file at `path` (see [`Build::path`]). The instance is built
    /// again when a reload finds the file changed, and a change to it alone
    /// triggers that reload.
    pub fn read_to_string(&mut self, path: impl AsRef<Path>) -> Result<String, String> {
        let path = self.path(path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.sources.push(Source {
            digest: digest(text.as_bytes()),
            path,
        });
        Ok(text)
    }
}

/// A file an instance was built from, and what it held then.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    digest: u64,
}

impl Source {
    /// Whether the file now holds something else (or cannot be read).
    fn changed(&self) -> bool {
        std::fs::read(&self.path).map_or(true, |bytes| digest(&bytes) != self.digest)
    }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// One built instance.
pub struct Instance {
    pub name: Arc<str>,
    pub kind: Arc<str>,
    pub extension: Arc<dyn Extension>,
    /// What it was built from: a reload that finds all of it unchanged keeps it.
    decl: ExtensionDecl,
    sources: Vec<Source>,
    groups: Vec<Arc<str>>,
}

/// The instances one configuration declares, by name.
#[derive(Default)]
pub struct Instances {
    by_name: BTreeMap<String, Arc<Instance>>,
}

impl Instances {
    /// Builds the instances `config` declares with `registry`'s kinds,
    /// keeping those of `previous` that nothing changed for. The error names
    /// the instance, its line and what is wrong.
    pub fn build(
        config: &Config,
        registry: &Registry,
        previous: Option<&Instances>,
    ) -> Result<Instances, String> {
        let groups: BTreeSet<&str> = config.groups().map(|(name, _)| name).collect();
        let mut by_name = BTreeMap::new();
        for (name, decl) in &config.extensions {
            let decl = decl.get_ref();
            let kept = previous
                .and_then(|p| p.by_name.get(name))
                .filter(|old| old.unchanged(decl, &groups));
            let instance = match kept {
                Some(old) => Arc::clone(old),
                None => Arc::new(build_one(name, decl, registry, &groups)?),
            };
            by_name.insert(name.clone(), instance);
        }
        Ok(Instances { by_name })
    }

    /// The instance `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Instance>> {
        self.by_name.get(name)
    }

    /// Whether the file declares none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every instance, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.by_name.values()
    }

    /// What the files the instances were built from hold now, in one
    /// number: a reload is due when it changes.
    pub fn sources_digest(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for source in self.iter().flat_map(|i| &i.sources) {
            source.path.hash(&mut hasher);
            std::fs::read(&source.path).ok().hash(&mut hasher);
        }
        hasher.finish()
    }

    /// The files the instances were built from.
    pub fn source_files(&self) -> impl Iterator<Item = &Path> {
        self.iter()
            .flat_map(|i| i.sources.iter().map(|s| s.path.as_path()))
    }
}

impl Instance {
    fn unchanged(&self, decl: &ExtensionDecl, groups: &BTreeSet<&str>) -> bool {
        self.decl == *decl
            && self.groups.iter().all(|g| groups.contains(&**g))
            && !self.sources.iter().any(Source::changed)
    }
}

fn build_one(
    name: &str,
    decl: &ExtensionDecl,
    registry: &Registry,
    groups: &BTreeSet<&str>,
) -> Result<Instance, String> {
    let at = format!("[extensions.{name}] (line {})", decl.line);
    let Some(factory) = registry.kinds.get(&decl.kind) else {
        let kinds: Vec<&str> = registry.kinds().collect();
        return Err(format!(
            "{at}: unknown kind {:?}; this balancer knows: {}",
            decl.kind,
            if kinds.is_empty() {
                "none".to_owned()
            } else {
                kinds.join(", ")
            }
        ));
    };
    let mut build = Build {
        instance: name,
        dir: &decl.dir,
        groups,
        sources: Vec::new(),
        named_groups: Vec::new(),
    };
    // A factory that panics on its settings refuses them, like one that says so.
    let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
        factory.build(decl.settings.clone(), &mut build)
    }))
    .unwrap_or_else(|panic| Err(format!("panicked while building: {}", panic_text(&*panic))));
    let extension = built.map_err(|e| format!("{at}, kind {:?}: {e}", decl.kind))?;
    Ok(Instance {
        name: Arc::from(name),
        kind: Arc::from(decl.kind.as_str()),
        extension,
        decl: decl.clone(),
        sources: build.sources,
        groups: build.named_groups,
    })
}

/// What a panic said, when it said it in text.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Weak;

    /// A kind that reads one file and may name a group.
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        file: String,
        #[serde(default)]
        group: Option<String>,
    }

    struct Reads;

    impl Extension for Reads {}

    fn registry() -> Registry {
        Registry::new().register("reads", |s: Settings, build: &mut Build<'_>| {
            build.read_to_string(&s.file)?;
            if let Some(group) = &s.group {
                build.group(group)?;
            }
            Ok(Reads)
        })
    }

    fn config(dir: &Path, instance: &str, groups: &str) -> Config {
        let text = format!("[extensions.one]\nkind = \"reads\"\n{instance}\n{groups}");
        Config::parse(&dir.join("balancer.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
    }

    const GROUPS: &str = "[upstream]\nservers = [\"127.0.0.1:1\"]\n[upstreams.canary]\nservers = [\"127.0.0.1:2\"]\n";

    #[test]
    fn a_reload_keeps_what_nothing_changed_for_and_rebuilds_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        let registry = registry();
        let settings = "file = \"a.txt\"\ngroup = \"canary\"";
        let first =
            Instances::build(&config(dir.path(), settings, GROUPS), &registry, None).unwrap();
        let kept = Instances::build(
            &config(dir.path(), settings, GROUPS),
            &registry,
            Some(&first),
        )
        .unwrap();
        assert!(
            Arc::ptr_eq(first.get("one").unwrap(), kept.get("one").unwrap()),
            "the same settings and file: the same instance"
        );

        let digest = kept.sources_digest();
        std::fs::write(dir.path().join("a.txt"), "two").unwrap();
        assert_ne!(
            kept.sources_digest(),
            digest,
            "the file's edit shows in the digest"
        );
        let rebuilt = Instances::build(
            &config(dir.path(), settings, GROUPS),
            &registry,
            Some(&kept),
        )
        .unwrap();
        assert!(
            !Arc::ptr_eq(kept.get("one").unwrap(), rebuilt.get("one").unwrap()),
            "an edited file: built again"
        );

        let other = Instances::build(
            &config(dir.path(), "file = \"a.txt\"", GROUPS),
            &registry,
            Some(&rebuilt),
        )
        .unwrap();
        assert!(
            !Arc::ptr_eq(rebuilt.get("one").unwrap(), other.get("one").unwrap()),
            "other settings: built again"
        );
    }

    #[test]
    fn an_instance_whose_group_is_gone_is_built_again_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        let registry = registry();
        let settings = "file = \"a.txt\"\ngroup = \"canary\"";
        let first =
            Instances::build(&config(dir.path(), settings, GROUPS), &registry, None).unwrap();
        let without = "[upstream]\nservers = [\"127.0.0.1:1\"]\n";
        let e = Instances::build(
            &config(dir.path(), settings, without),
            &registry,
            Some(&first),
        )
        .err()
        .expect("the group it names is gone");
        assert!(
            e.contains("[extensions.one] (line 1)") && e.contains("\"canary\" is not defined"),
            "{e}"
        );
    }

    #[test]
    fn an_instance_is_dropped_after_the_last_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        let registry = registry();
        let first = Instances::build(
            &config(dir.path(), "file = \"a.txt\"", GROUPS),
            &registry,
            None,
        )
        .unwrap();
        // A request in flight holds its snapshot, and so the instance.
        let in_flight = Arc::clone(first.get("one").unwrap());
        let weak: Weak<Instance> = Arc::downgrade(&in_flight);
        std::fs::write(dir.path().join("a.txt"), "two").unwrap();
        let next = Instances::build(
            &config(dir.path(), "file = \"a.txt\"", GROUPS),
            &registry,
            Some(&first),
        )
        .unwrap();
        drop(first);
        assert!(
            weak.upgrade().is_some(),
            "still used by the request in flight"
        );
        drop(in_flight);
        assert!(weak.upgrade().is_none(), "dropped after its last request");
        assert!(next.get("one").is_some());
    }

    #[test]
    fn a_factory_that_panics_refuses_its_settings() {
        let registry = Registry::new().register("boom", |_: toml::Table, _: &mut Build<'_>| {
            if true {
                panic!("no such luck");
            }
            Ok(Reads)
        });
        let text = "[extensions.b]\nkind = \"boom\"\n[upstream]\nservers = [\"127.0.0.1:1\"]\n";
        let config = Config::parse(Path::new("b.toml"), text).unwrap();
        let e = Instances::build(&config, &registry, None)
            .err()
            .expect("refused");
        assert!(e.contains("panicked while building: no such luck"), "{e}");
    }
}
