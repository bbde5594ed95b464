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
//! each changed key is logged (`config::diff`); settings that only apply at
//! start-up are kept and reported.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use notify::Watcher as _;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use crate::config::{diff, Config, ConfigError};
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
    /// The text of the file in force: what the next one is compared with,
    /// key by key. (The values in force are the snapshot's.)
    in_force: Mutex<String>,
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
            in_force: Mutex::new(text.clone()),
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
        let mut config = Config::parse(&self.path, text)?;
        for warning in config.warnings(text) {
            log::warn!("{}: {warning}", self.path.display());
        }
        let previous = self.live.load_full();
        let invalid = |message| ConfigError::Invalid {
            path: self.path.clone(),
            position: None,
            message,
        };
        let kept = diff::keep_restart_only(&previous.config, &mut config).map_err(invalid)?;
        for line in &kept.lines {
            log::warn!("config reload: {line}");
        }
        let changes = diff::changes(
            &lock(&self.in_force).parse().unwrap_or_default(),
            &text.parse().unwrap_or_default(),
            &kept.restart_only,
        );
        let snapshot =
            Snapshot::compile(config, Some(&previous), &self.registry).map_err(invalid)?;
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
        *lock(&self.in_force) = text.to_owned();
        Ok(changes)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a file-system event in a watched directory may have changed one
/// of the files named `names`. Opening and reading them do not: counting
/// them would make every re-read (ours included) trigger the next one.
/// Docker bind mounts surface as the directory changing, so any other event
/// naming a file counts; so does the swap of the `..data` link through which
/// Kubernetes updates a mounted ConfigMap.
fn may_change(event: &notify::Event, names: &[OsString]) -> bool {
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
            .any(|n| n == "..data" || names.iter().any(|name| name == n))
}

/// File-system events about the configuration file and the files its
/// extension instances were built from (scripts, key files), forwarded into
/// a channel. The watches are on their directories: a file renamed over the
/// old one is a new inode that a watch on the file itself would miss.
struct Watch {
    watcher: notify::RecommendedWatcher,
    names: Arc<Mutex<Vec<OsString>>>,
    dirs: Vec<PathBuf>,
}

impl Watch {
    fn start(file: &Path) -> Option<(Watch, mpsc::UnboundedReceiver<()>)> {
        let names = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::clone(&names);
        let handler = move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if may_change(&event, &lock(&seen)) {
                    let _ = tx.send(());
                }
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("cannot watch for changes: {e}; re-reading the configuration every {POLL:?} instead");
                return None;
            }
        };
        let mut watch = Watch {
            watcher,
            names,
            dirs: Vec::new(),
        };
        watch.follow(file).then_some((watch, rx))
    }

    /// Watches `file` too; false when its directory cannot be watched (the
    /// periodic re-read still finds its changes).
    fn follow(&mut self, file: &Path) -> bool {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        if let Some(name) = file.file_name() {
            let mut names = lock(&self.names);
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        if self.dirs.contains(&dir) {
            return true;
        }
        if let Err(e) = self
            .watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
        {
            log::warn!(
                "cannot watch {}: {e}; re-reading it every {POLL:?} instead",
                dir.display()
            );
            return false;
        }
        self.dirs.push(dir);
        true
    }
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
        let (mut watch, mut events) = match Watch::start(&self.path) {
            Some((w, rx)) => (Some(w), Some(rx)),
            None => (None, None),
        };
        log::info!(
            "watching {} for changes (SIGHUP reloads it too)",
            self.path.display()
        );
        loop {
            if let Some(watch) = watch.as_mut() {
                for file in self.live.load().extensions.source_files() {
                    watch.follow(file);
                }
            }
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
            // A reload may bring in files of other folders: they are
            // followed from the next turn on.
            self.reload(force).await;
        }
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
        let name = &[OsStr::new("balancer.toml").to_owned()];
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
        let with_script = &[name[0].clone(), OsStr::new("auth.lua").to_owned()];
        let edited = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(
            may_change(
                &event(edited, "/etc/balancer/scripts/auth.lua"),
                with_script
            ),
            "a script an extension instance was built from"
        );
    }
}
