//! The process log: `env_logger` (levels from `RUST_LOG`, default `info`),
//! with Pingora's own lines put at the level that fits this balancer.
//!
//! `ERROR` is for what an operator must act on. Pingora logs a few things
//! louder than that: a client that was too slow to send its request head, a
//! header compression dictionary nobody configures, the length of a grace
//! period that the balancer does not use (it drains by itself, see `drain`).
//! And all of its `INFO` lines (`Bootstrap starting`, `Starting services in
//! dependency order`, `spent 5ms waiting on dependencies`...) are start-up and
//! shutdown chatter: the balancer says its own start and stop. Those lines are
//! lowered to `DEBUG` here; the balancer writes its own words for them
//! where they matter. Also here: [`Throttle`], which keeps a flood of one kind
//! of event from flooding the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use log::{Level, Log, Metadata, Record};

/// Installs the logger; `RUST_LOG` works as `env_logger` documents it.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Levels { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// The level a Pingora log line of `level` should have here, when it is not
/// its own. `None`: leave it as it is.
pub fn level_for(target: &str, level: Level, message: &str) -> Option<Level> {
    if !target.starts_with("pingora") {
        return None;
    }
    if level == Level::Info {
        return Some(Level::Debug);
    }
    const LOWERED: [(&str, Level); 7] = [
        // A slowloris cut: the balancer counts it and logs it at info itself.
        ("(limits.client_header_timeout)", Level::Debug),
        // Only matters to users of Pingora's compression dictionaries.
        ("no header compression dictionary loaded", Level::Debug),
        // The balancer's drain states the grace period in force.
        ("Graceful shutdown: grace period", Level::Debug),
        // A client that went away while its request was refused or answered.
        ("failed to send error response to downstream", Level::Debug),
        // A client that failed its TLS handshake (an old protocol, no SNI
        // match under min_version 1.3, a scanner).
        ("Downstream handshake error", Level::Debug),
        // A client that closed its connection before its HTTP/2 preface (a
        // browser drops the spare connection it opened in advance).
        ("H2 handshake error", Level::Debug),
        // A client that closed or broke its connection while sending a head.
        ("Fail to proxy: Downstream", Level::Debug),
    ];
    LOWERED
        .iter()
        .find(|(text, _)| message.contains(text))
        .map(|(_, level)| *level)
}

struct Levels {
    inner: env_logger::Logger,
}

impl Log for Levels {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        // Only Pingora's lines at INFO and above can change level; its
        // warnings and errors are worth the formatting it takes to look.
        let pingora = record.target().starts_with("pingora");
        if pingora && record.level() <= Level::Info && self.inner.matches(record) {
            let message = record.args().to_string();
            if let Some(level) = level_for(record.target(), record.level(), &message) {
                let metadata = Metadata::builder()
                    .level(level)
                    .target(record.target())
                    .build();
                if self.inner.enabled(&metadata) {
                    self.inner.log(
                        &Record::builder()
                            .metadata(metadata)
                            .args(format_args!("{message}"))
                            .module_path(record.module_path())
                            .file(record.file())
                            .line(record.line())
                            .build(),
                    );
                }
                return;
            }
        }
        if self.inner.matches(record) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Lets one event of a kind through per second; the others are counted by
/// whoever keeps the figures, not logged.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Seconds since the process's first throttle was made, at the last line let through.
    last: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            last: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now.
    pub fn allow(&self) -> bool {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pingoras_known_noise_is_lowered() {
        assert_eq!(
            level_for(
                "pingora_proxy",
                Level::Error,
                "Fail to proxy: no complete request head within 1s (limits.client_header_timeout)"
            ),
            Some(Level::Debug)
        );
        assert_eq!(
            level_for(
                "pingora_cache::meta",
                Level::Warn,
                "no header compression dictionary loaded"
            ),
            Some(Level::Debug)
        );
        assert_eq!(
            level_for(
                "pingora_core::services::listening",
                Level::Error,
                "Downstream handshake error from 127.0.0.1:1: TLSHandshakeFailure"
            ),
            Some(Level::Debug)
        );
        assert_eq!(
            level_for(
                "pingora_core::apps",
                Level::Error,
                "H2 handshake error Broken pipe (os error 32)"
            ),
            Some(Level::Debug)
        );
        assert_eq!(
            level_for(
                "pingora_proxy",
                Level::Error,
                "Fail to proxy: Upstream ConnectRefused"
            ),
            None,
            "a failing backend stays an error"
        );
        assert_eq!(
            level_for(
                "balancer::proxy",
                Level::Info,
                "(limits.client_header_timeout)"
            ),
            None,
            "the balancer's own lines keep their level"
        );
        for chatter in [
            "Bootstrap starting",
            "Starting services in dependency order: [\"proxy\"]",
        ] {
            assert_eq!(
                level_for("pingora_core::server", Level::Info, chatter),
                Some(Level::Debug),
                "{chatter}"
            );
        }
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_second() {
        let throttle = Throttle::new();
        assert!(throttle.allow());
        assert!(!throttle.allow());
        assert!(!throttle.allow());
    }
}
