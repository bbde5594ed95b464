//! Live reload: watches the configuration file and swaps a new, valid
//! configuration in without a restart.
//!
//! Three triggers lead to the same re-read: a file-system watch on the file's
//! directory (so editors that write a new file and rename it over the old one,
//! and files bind-mounted into a container through their directory, are seen)
//! and on the directories of the files extension instances were built from
//! (scripts), a periodic re-read as the fallback where no event arrives, and
//! SIGHUP. An
//! invalid file is logged with its file, line and reason and changes nothing;
//! a valid one is compiled into a new runtime snapshot and published, and
//! each changed key is logged (`diff`); settings that only apply at start-up
//! are kept and reported.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use notify::Watcher as _;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use super::{diff, Config, ConfigError};
use crate::extension::Registry;
use crate::runtime::{Live, Snapshot};
use crate::upstream::health;

/// How often the file is re-read when no event says it changed.
const POLL: Duration = Duration::from_secs(2);
/// Editors write in several steps; wait this long after an event before reading.
const SETTLE: Duration = Duration::from_millis(100);

pub struct Reloader {
    pub path: PathBuf,
    pub live: Arc<Live>,
    /// Tells the upstream upkeep that a new configuration is in force.
    pub reloaded: Arc<Notify>,
    pub stats: Arc<ReloadStats>,
    /// The extension kinds the file's instances are built from.
    pub registry: Arc<Registry>,
    /// The text last read, valid or not: unchanged text is not parsed again.
    last_text: Mutex<String>,
    /// The digest of the extensions' files last read (see `last_text`).
    last_sources: Mutex<u64>,
    /// The text in force, as TOML: what the next change is compared with.
    in_force: Mutex<toml::Table>,
}

/// What the reloads did, for metrics and status.
#[derive(Debug)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// When the configuration in force was loaded.
    pub loaded_at: Mutex<SystemTime>,
    /// The last failure's message, cleared by a success.
    pub last_error: Mutex<Option<String>>,
}

impl Default for ReloadStats {
    fn default() -> Self {
        ReloadStats {
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            loaded_at: Mutex::new(SystemTime::now()),
            last_error: Mutex::new(None),
        }
    }
}

impl Reloader {
    /// A reloader for `path`, whose `text` is the configuration in force.
    pub fn new(
        path: PathBuf,
        live: Arc<Live>,
        reloaded: Arc<Notify>,
        text: String,
        registry: Arc<Registry>,
    ) -> Reloader {
        let sources = live.load().extensions.sources_digest();
        Reloader {
            path,
            live,
            reloaded,
            registry,
            stats: Arc::default(),
            in_force: Mutex::new(text.parse().unwrap_or_default()),
            last_sources: Mutex::new(sources),
            last_text: Mutex::new(text),
        }
    }

    /// Re-reads the file; when it changed, or a file an extension instance
    /// was built from did (or `force`), applies it if valid.
    pub async fn reload(&self, force: bool) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                log::error!(
                    "config reload: cannot read {}: {e}; keeping the configuration in force",
                    self.path.display()
                );
                return;
            }
        };
        {
            // An edit of a file an extension was built from (a script) is
            // applied like an edit of the configuration, and tried once.
            let sources = self.live.load().extensions.sources_digest();
            let mut last = lock(&self.last_text);
            let mut last_sources = lock(&self.last_sources);
            if *last == text && *last_sources == sources && !force {
                return;
            }
            *last = text.clone();
            *last_sources = sources;
        }
        match self.apply(&text).await {
            Ok(changes) => {
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                *lock(&self.stats.loaded_at) = SystemTime::now();
                *lock(&self.stats.last_error) = None;
                if changes.is_empty() {
                    log::info!("config reloaded from {}: no change", self.path.display());
                } else {
                    log::info!("config reloaded: {}", changes.join("; "));
                }
                self.reloaded.notify_one();
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                log::error!("config reload failed, keeping the configuration in force: {e}");
                *lock(&self.stats.last_error) = Some(e.to_string());
            }
        }
    }

    /// Parses `text`, keeps the restart-only keys as they are, compiles and
    /// publishes the new snapshot; returns one line per changed key.
    async fn apply(&self, text: &str) -> Result<Vec<String>, ConfigError> {
        // Parsed once as it is, so that errors point at the file's own lines.
        let parsed = Config::parse(&self.path, text)?;
        for warning in parsed.warnings(text) {
            log::warn!("{}: {warning}", self.path.display());
        }
        let mut table: toml::Table = text.parse().unwrap_or_default();
        let (kept, changes) = {
            let in_force = lock(&self.in_force);
            let kept = diff::keep_restart_only(&in_force, &mut table);
            (kept, diff::changes(&in_force, &table))
        };
        for line in &kept {
            log::warn!("config reload: {line}");
        }
        let config = if kept.is_empty() {
            parsed
        } else {
            let merged = toml::to_string(&table).unwrap_or_default();
            Config::parse(&self.path, &merged)?
        };
        let previous = self.live.load_full();
        let snapshot =
            Snapshot::compile(config, Some(&previous), &self.registry).map_err(|message| {
                ConfigError::Invalid {
                    path: self.path.clone(),
                    position: None,
                    message,
                }
            })?;
        // An instance built anew while its section did not change: a file
        // it was built from (a script) did.
        let mut changes = changes;
        for instance in snapshot.extensions.iter() {
            let section = format!("extensions.{}", instance.name);
            let rebuilt = previous
                .extensions
                .get(&instance.name)
                .is_some_and(|old| !Arc::ptr_eq(old, instance));
            let in_diff = changes.iter().any(|c| {
                c.strip_prefix(&section)
                    .is_some_and(|rest| rest.starts_with(['.', ' ']))
            });
            if rebuilt && !in_diff {
                changes.push(format!("{section} rebuilt: a file it reads changed"));
            }
        }
        // A group that is new in this file is resolved (and its addresses
        // probed) before the file takes effect: a route to it must not meet
        // an empty pool. The configuration in force serves meanwhile.
        let new_groups = snapshot.groups.iter().filter(|(name, group)| {
            previous
                .groups
                .get(*name)
                .is_none_or(|old| !Arc::ptr_eq(&old.state, &group.state))
        });
        futures::future::join_all(new_groups.map(|(_, g)| health::refresh_membership(g))).await;
        self.live.store(Arc::new(snapshot));
        *lock(&self.in_force) = table;
        Ok(changes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a file-system event in a watched directory may have changed one
/// of the files named `names`. Opening and reading it do not: counting them
/// would make every re-read (ours included) trigger the next one. Docker
/// bind mounts surface as the directory changing, so any other event naming
/// the file counts; so does the swap of the `..data` link through which
/// Kubernetes updates a mounted ConfigMap.
fn may_change(event: &notify::Event, names: &[&std::ffi::OsStr]) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let content_may_differ = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    content_may_differ
        && event
            .paths
            .iter()
            .filter_map(|p| p.file_name())
            .any(|n| names.contains(&n) || n == "..data")
}

/// Forwards file-system events about `files` (the configuration first, then
/// the extensions' files) into a channel. The watch is on their directories:
/// a file renamed over the old one is a new inode that a watch on the file
/// itself would miss.
fn watch(files: &[PathBuf]) -> Option<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let dir_of = |file: &Path| {
        file.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    };
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |event: notify::Result<notify::Event>| {
        let names: Vec<&std::ffi::OsStr> = names.iter().map(|n| n.as_os_str()).collect();
        if let Ok(event) = event {
            if may_change(&event, &names) {
                let _ = tx.send(());
            }
        }
    };
    let dirs: std::collections::BTreeSet<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
    let config_dir = dir_of(files.first()?);
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            log::warn!(
                "cannot watch {}: {e}; re-reading it every {POLL:?} instead",
                config_dir.display()
            );
            return None;
        }
    };
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            log::warn!(
                "cannot watch {}: {e}; re-reading it every {POLL:?} instead",
                dir.display()
            );
            if *dir == config_dir {
                return None;
            }
        }
    }
    Some((watcher, rx))
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut watched = self.watched_files();
        let (mut _watcher, mut events) = match watch(&watched) {
            Some((w, rx)) => (Some(w), Some(rx)),
            None => (None, None),
        };
        log::info!(
            "watching {} for changes (SIGHUP reloads it too)",
            self.path.display()
        );
        loop {
            let force = tokio::select! {
                Some(()) = async { events.as_mut()?.recv().await } => {
                    tokio::time::sleep(SETTLE).await;
                    while events.as_mut().is_some_and(|e| e.try_recv().is_ok()) {}
                    false
                }
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    log::info!("SIGHUP: reloading {}", self.path.display());
                    true
                }
                _ = tokio::time::sleep(POLL) => false,
                _ = shutdown.changed() => return,
            };
            self.reload(force).await;
            // A reload may have brought in scripts of other folders.
            let now = self.watched_files();
            if now != watched {
                (_watcher, events) = match watch(&now) {
                    Some((w, rx)) => (Some(w), Some(rx)),
                    None => (None, None),
                };
                watched = now;
            }
        }
    }
}

impl Reloader {
    /// The configuration file, then the files its extensions were built from.
    fn watched_files(&self) -> Vec<PathBuf> {
        let live = self.live.load();
        let sources = live.extensions.source_files().map(Path::to_path_buf);
        std::iter::once(self.path.clone()).chain(sources).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::may_change;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RenameMode,
    };
    use std::ffi::OsStr;

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn only_events_that_may_change_the_file_trigger_a_reload() {
        let name = &[OsStr::new("balancer.toml"), OsStr::new("auth.lua")][..];
        let file = "/etc/balancer/balancer.toml";
        let changes = [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Create(CreateKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Any,
        ];
        for kind in changes {
            assert!(may_change(&event(kind, file), name), "{kind:?}");
        }
        // Reading the file (as each reload does) is no reason to read it again.
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ];
        for kind in reads {
            assert!(!may_change(&event(kind, file), name), "{kind:?}");
        }
        let modified = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!may_change(
            &event(modified, "/etc/balancer/other.toml"),
            name
        ));
        let swapped = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(
            may_change(&event(swapped, "/etc/balancer/..data"), name),
            "a Kubernetes ConfigMap update"
        );
        assert!(
            may_change(&event(modified, "/etc/balancer/scripts/auth.lua"), name),
            "a script an extension was built from"
        );
    }
}
