//! What each `lua` instance did, by instance name: calls, failures, limits
//! reached and time spent, counted where the hooks run and read by one
//! Prometheus collector at scrape time (served on the admin listener with
//! the balancer's other metrics).
//!
//! The figures belong to the instance's name, not to one build of it: a
//! script edited and reloaded goes on counting where it was. An instance
//! that is no longer in the file is gone from the metrics at the next scrape.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use pingora_prometheus::prometheus::core::{Collector, Desc};
use pingora_prometheus::prometheus::proto::MetricFamily;
use pingora_prometheus::prometheus::{CounterVec, IntCounterVec, Opts};

use super::sandbox::Limit;
use crate::telemetry::logging::Throttle;

/// The figures of one instance, and the throttles of its log lines.
#[derive(Default)]
pub struct Stats {
    on_request: AtomicU64,
    on_response: AtomicU64,
    failures: AtomicU64,
    instructions_spent: AtomicU64,
    memory_full: AtomicU64,
    nanos: AtomicU64,
    /// Failures are logged at most once a second per instance.
    pub failure_log: Throttle,
    /// So are the script's `print` lines.
    pub print_log: Throttle,
}

/// Which hook ran.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    Request,
    Response,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Request => "on_request",
            Hook::Response => "on_response",
        }
    }
}

impl Stats {
    /// Counts one call of `hook` that took `time`; `limit` when it ran into one.
    pub fn called(&self, hook: Hook, time: Duration, failed: bool, limit: Option<Limit>) {
        let calls = match hook {
            Hook::Request => &self.on_request,
            Hook::Response => &self.on_response,
        };
        calls.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        match limit {
            Some(Limit::Instructions) => self.instructions_spent.fetch_add(1, Ordering::Relaxed),
            Some(Limit::Memory) => self.memory_full.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
}

/// Every instance's figures, by name.
static BY_INSTANCE: Mutex<BTreeMap<String, Arc<Stats>>> = Mutex::new(BTreeMap::new());

/// The figures of the instance `name`, kept from its previous build if any.
pub fn stats_for(name: &str) -> Arc<Stats> {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        if let Err(e) = pingora_prometheus::prometheus::register(Box::new(Scraped)) {
            log::error!("cannot register the Lua metrics: {e}");
        }
    });
    let mut all = BY_INSTANCE.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(all.entry(name.to_owned()).or_default())
}

/// The collector: reads [`BY_INSTANCE`] at each scrape.
struct Scraped;

struct Families {
    calls: IntCounterVec,
    failures: IntCounterVec,
    limits: IntCounterVec,
    seconds: CounterVec,
}

impl Families {
    fn new() -> Families {
        let opts = Opts::new;
        // Valid names and labels: these only fail on a typo, caught by the tests.
        Families {
            calls: IntCounterVec::new(
                opts("balancer_lua_calls_total", "Calls of a Lua instance's hook, by instance and hook"),
                &["instance", "hook"],
            )
            .expect("a valid metric"),
            failures: IntCounterVec::new(
                opts(
                    "balancer_lua_errors_total",
                    "Calls of a Lua instance's hook that failed (an error, something unexpected returned, or a limit reached) and answered 500",
                ),
                &["instance"],
            )
            .expect("a valid metric"),
            limits: IntCounterVec::new(
                opts(
                    "balancer_lua_limits_reached_total",
                    "Calls of a Lua instance's hook cut short by a limit: its instruction budget (max_instructions) or its memory (max_memory)",
                ),
                &["instance", "limit"],
            )
            .expect("a valid metric"),
            seconds: CounterVec::new(
                opts("balancer_lua_seconds_total", "Time spent in a Lua instance's hooks (and making its per-thread states)"),
                &["instance"],
            )
            .expect("a valid metric"),
        }
    }

    fn all(&self) -> [&dyn Collector; 4] {
        [&self.calls, &self.failures, &self.limits, &self.seconds]
    }
}

static DESCS: std::sync::LazyLock<Vec<Desc>> = std::sync::LazyLock::new(|| {
    Families::new()
        .all()
        .iter()
        .flat_map(|c| c.desc().into_iter().cloned())
        .collect()
});

impl Collector for Scraped {
    fn desc(&self) -> Vec<&Desc> {
        DESCS.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let f = Families::new();
        let mut all = BY_INSTANCE.lock().unwrap_or_else(|e| e.into_inner());
        // Held only here: the instance is gone from every configuration.
        all.retain(|_, stats| Arc::strong_count(stats) > 1);
        for (name, s) in all.iter() {
            let name = name.as_str();
            let read = |n: &AtomicU64| n.load(Ordering::Relaxed);
            for (hook, calls) in [
                ("on_request", &s.on_request),
                ("on_response", &s.on_response),
            ] {
                f.calls.with_label_values(&[name, hook]).inc_by(read(calls));
            }
            f.failures
                .with_label_values(&[name])
                .inc_by(read(&s.failures));
            for (limit, n) in [
                ("instructions", &s.instructions_spent),
                ("memory", &s.memory_full),
            ] {
                f.limits.with_label_values(&[name, limit]).inc_by(read(n));
            }
            f.seconds
                .with_label_values(&[name])
                .inc_by(Duration::from_nanos(read(&s.nanos)).as_secs_f64());
        }
        drop(all);
        f.all().iter().flat_map(|c| c.collect()).collect()
    }
}
