//! Live reload: watches the configuration file and swaps a new, valid
//! configuration in without a restart.
//!
//! Three triggers lead to the same re-read: a file-system watch on the file's
//! directory (so editors that write a new file and rename it over the old one,
//! and files bind-mounted into a container through their directory, are seen),
//! a periodic re-read as the fallback where no event arrives, and SIGHUP. An
//! invalid file is logged with its file, line and reason and changes nothing;
//! settings that only apply at start-up are kept and reported.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::Watcher as _;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use crate::config::{Config, HealthCheck};

/// How often the file is re-read when no event says it changed.
const POLL: Duration = Duration::from_secs(2);
/// Editors write in several steps; wait this long after an event before reading.
const SETTLE: Duration = Duration::from_millis(100);

pub struct Reloader {
    pub path: PathBuf,
    pub config: Arc<ArcSwap<Config>>,
    /// Tells the upstream upkeep that a new configuration is in force.
    pub reloaded: Arc<Notify>,
    pub stats: Arc<ReloadStats>,
    /// The text last read, valid or not: unchanged text is not parsed again.
    last_text: Mutex<String>,
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
        config: Arc<ArcSwap<Config>>,
        reloaded: Arc<Notify>,
        text: String,
    ) -> Reloader {
        Reloader {
            path,
            config,
            reloaded,
            stats: Arc::default(),
            last_text: Mutex::new(text),
        }
    }

    /// Re-reads the file; when it changed (or `force`), applies it if valid.
    pub fn reload(&self, force: bool) {
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
            let mut last = lock(&self.last_text);
            if *last == text && !force {
                return;
            }
            *last = text.clone();
        }
        let mut new = match Config::parse(&self.path, &text) {
            Ok(config) => config,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                log::error!("config reload failed, keeping the configuration in force: {e}");
                *lock(&self.stats.last_error) = Some(e.to_string());
                return;
            }
        };
        let old = self.config.load_full();
        keep_startup_settings(&old, &mut new);
        let changes = describe_changes(&old, &new);
        self.config.store(Arc::new(new));
        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
        *lock(&self.stats.loaded_at) = SystemTime::now();
        *lock(&self.stats.last_error) = None;
        if changes.is_empty() {
            log::info!("config reloaded from {}: no change", self.path.display());
        }
        for change in changes {
            log::info!("config reloaded: {change}");
        }
        self.reloaded.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `listen`, `admin_listen`, `threads` and the cache's size bounds are fixed
/// for the life of the process: keep them, and say so.
fn keep_startup_settings(old: &Config, new: &mut Config) {
    fn keep<T: PartialEq + Clone>(key: &str, old: &T, new: &mut T, show: fn(&T) -> String) {
        if old != new {
            let (was, is) = (show(old), show(new));
            log::warn!("config reload: {key} {was} -> {is} needs a restart; keeping {was}");
            *new = old.clone();
        }
    }
    keep("listen", &old.listen, &mut new.listen, |a| a.to_string());
    keep(
        "admin_listen",
        &old.admin_listen,
        &mut new.admin_listen,
        |a| a.map_or_else(|| "(off)".to_owned(), |a| a.to_string()),
    );
    keep("threads", &old.threads, &mut new.threads, |t| {
        t.map_or_else(|| "(one per CPU)".to_owned(), |t| t.to_string())
    });
    if let (Some(old_cache), Some(new_cache)) = (&old.cache, &mut new.cache) {
        keep(
            "cache.max_size",
            &old_cache.max_size.0,
            &mut new_cache.max_size.0,
            u64::to_string,
        );
        keep(
            "cache.max_object_size",
            &old_cache.max_object_size.0,
            &mut new_cache.max_object_size.0,
            u64::to_string,
        );
    }
}

/// One line per changed setting, in the words of the file.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    let old_servers: Vec<String> = old
        .upstream
        .servers
        .iter()
        .map(ToString::to_string)
        .collect();
    let new_servers: Vec<String> = new
        .upstream
        .servers
        .iter()
        .map(ToString::to_string)
        .collect();
    for s in new_servers.iter().filter(|s| !old_servers.contains(s)) {
        lines.push(format!("upstream added {s}"));
    }
    for s in old_servers.iter().filter(|s| !new_servers.contains(s)) {
        lines.push(format!("upstream removed {s}"));
    }
    // Each live setting, as the file names it and as it is shown.
    type Show<T> = fn(&T) -> String;
    let settings: [(&str, Show<Config>); 15] = [
        ("upstream.resolve_interval", |c| {
            c.upstream.resolve_interval.to_string()
        }),
        ("upstream.connect_timeout", |c| {
            c.upstream.connect_timeout.to_string()
        }),
        ("upstream.read_timeout", |c| {
            c.upstream.read_timeout.to_string()
        }),
        ("grace_period", |c| c.grace_period.to_string()),
        ("log_format", |c| {
            format!("{:?}", c.log_format).to_lowercase()
        }),
        ("log_health_checks", |c| c.log_health_checks.to_string()),
        ("admin_token_file", |c| {
            c.admin_token_file
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        }),
        ("limits.lingering_time", |c| {
            c.limits.lingering_time.to_string()
        }),
        ("limits.lingering_timeout", |c| {
            c.limits.lingering_timeout.to_string()
        }),
        ("limits.max_header_size", |c| {
            c.limits.max_header_size.0.to_string()
        }),
        ("limits.max_headers", |c| c.limits.max_headers.to_string()),
        ("limits.max_body_size", |c| {
            c.limits.max_body_size.0.to_string()
        }),
        ("limits.keepalive_timeout", |c| {
            c.limits.keepalive_timeout.to_string()
        }),
        ("limits.client_header_timeout", |c| {
            c.limits.client_header_timeout.to_string()
        }),
        ("limits.max_connections", |c| {
            c.limits.max_connections.to_string()
        }),
    ];
    let checks: [(&str, Show<HealthCheck>); 5] = [
        ("health_check.path", |h| h.path.as_str().to_owned()),
        ("health_check.interval", |h| h.interval.to_string()),
        ("health_check.timeout", |h| h.timeout.to_string()),
        ("health_check.healthy_threshold", |h| {
            h.healthy_threshold.to_string()
        }),
        ("health_check.unhealthy_threshold", |h| {
            h.unhealthy_threshold.to_string()
        }),
    ];
    fn compare<T>(lines: &mut Vec<String>, old: &T, new: &T, settings: &[(&str, Show<T>)]) {
        for (key, show) in settings {
            let (was, is) = (show(old), show(new));
            if was != is {
                lines.push(format!("{key} {was} -> {is}"));
            }
        }
    }
    compare(&mut lines, old, new, &settings);
    match (&old.upstream.health_check, &new.upstream.health_check) {
        (Some(a), Some(b)) => compare(&mut lines, a, b, &checks),
        (None, Some(_)) => lines.push("health checks turned on".to_owned()),
        (Some(_), None) => {
            lines.push("health checks turned off: every address takes traffic".to_owned())
        }
        (None, None) => {}
    }
    let rules = |c: &Config| {
        c.cache
            .as_ref()
            .map(|c| c.rules.clone())
            .unwrap_or_default()
    };
    let (old_rules, new_rules) = (rules(old), rules(new));
    for rule in new_rules.iter().filter(|r| !old_rules.contains(r)) {
        lines.push(format!("cache rule for {} set: {rule}", rule.path.as_str()));
    }
    for rule in old_rules
        .iter()
        .filter(|r| !new_rules.iter().any(|n| n.path == r.path))
    {
        lines.push(format!("cache rule for {} removed", rule.path.as_str()));
    }
    lines
}

/// Whether a file-system event in the file's directory may have changed the
/// file named `name`. Opening and reading it do not: counting them would make
/// every re-read (ours included) trigger the next one. Docker bind mounts
/// surface as the directory changing, so any other event naming the file
/// counts; so does the swap of the `..data` link through which Kubernetes
/// updates a mounted ConfigMap.
fn may_change(event: &notify::Event, name: &std::ffi::OsStr) -> bool {
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
            .any(|n| n == name || n == "..data")
}

/// Forwards file-system events about `file` into a channel. The watch is on
/// the directory: a file renamed over the old one is a new inode that a watch
/// on the file itself would miss.
fn watch(file: &Path) -> Option<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file.file_name()?.to_owned();
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if may_change(&event, &name) {
                let _ = tx.send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            log::warn!(
                "cannot watch {}: {e}; re-reading it every {POLL:?} instead",
                dir.display()
            );
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        log::warn!(
            "cannot watch {}: {e}; re-reading it every {POLL:?} instead",
            dir.display()
        );
        return None;
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
        let (_watcher, mut events) = match watch(&self.path) {
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
            self.reload(force);
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
        let name = OsStr::new("balancer.toml");
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
    }
}
