//! The metrics the admin listener serves (`GET /metrics`), from the default
//! registry of the `prometheus` crate that pingora-prometheus re-exports.
//!
//! Each figure is kept in one place. Per-request figures (requests by
//! status, method, route and upstream group; latencies; retries) are counted
//! by the request path as requests end (`telemetry::metrics`). Everything
//! that is state kept elsewhere (backends and their health, the cache,
//! reloads, client connections) is read from where it lives by one
//! [`LiveState`] collector at scrape time, so it is never copied, never races
//! a scrape, and a backend that is gone is gone from the metrics too.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use pingora_prometheus::prometheus::core::{Collector, Desc};
use pingora_prometheus::prometheus::proto::MetricFamily;
use pingora_prometheus::prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::cache::ResponseCache;
use crate::proxy::connections::Connections;
use crate::runtime::reload::ReloadStats;
use crate::runtime::Live;

/// The state that lives elsewhere, read at each scrape.
pub struct LiveState {
    pub certificates: Option<Arc<crate::tls::CertStore>>,
    pub acme: Option<Arc<crate::tls::acme::AcmeStatus>>,
    pub live: Arc<Live>,
    pub cache: &'static ResponseCache,
    pub reloads: Arc<ReloadStats>,
    pub connections: Arc<Connections>,
}

impl LiveState {
    /// Registers the collector in the default registry (once per process).
    pub fn register(self) {
        if let Err(e) = pingora_prometheus::prometheus::register(Box::new(self)) {
            log::error!("cannot register the live-state metrics: {e}");
        }
    }
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

/// The live-state metrics, made afresh from their sources.
struct Families {
    healthy: IntGaugeVec,
    failures: IntGaugeVec,
    in_flight: IntGaugeVec,
    backend_requests: IntCounterVec,
    cache_events: IntCounterVec,
    cache_evictions: IntCounterVec,
    cache_bytes: IntGaugeVec,
    reloads: IntCounterVec,
    connections_open: IntGaugeVec,
    connections_refused: IntCounterVec,
    header_timeouts: IntCounterVec,
    lingering: IntGaugeVec,
    access_log_dropped: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    acme_orders: IntCounterVec,
    acme_failures: IntCounterVec,
    build_info: IntGaugeVec,
}

impl Families {
    fn new() -> Families {
        let backend = ["upstream", "backend", "server"];
        Families {
            healthy: gauge("balancer_upstream_healthy", "1 when the backend takes traffic, 0 when it is out", &backend),
            failures: gauge("balancer_upstream_consecutive_failures", "Failed health checks (or connects) in a row", &backend),
            in_flight: gauge("balancer_upstream_in_flight_requests", "Requests being proxied to the backend now", &backend),
            backend_requests: counter("balancer_upstream_requests_total", "Requests sent to the backend (attempts, retries included)", &backend),
            cache_events: counter("balancer_cache_responses_total", "Responses covered by a cache rule, by outcome (hit, miss, stale, bypass)", &["outcome"]),
            cache_evictions: counter("balancer_cache_evictions_total", "Cached responses evicted to stay within cache.max_size", &[]),
            cache_bytes: gauge("balancer_cache_stored_bytes", "Bytes held by the cache (keys, metadata and bodies)", &[]),
            reloads: counter("balancer_config_reloads_total", "Configuration reloads, by result (ok, failed)", &["result"]),
            connections_open: gauge("balancer_client_connections_open", "Client connections open now", &[]),
            connections_refused: counter("balancer_client_connections_refused_total", "Client connections answered 503 and closed because limits.max_connections were open", &[]),
            header_timeouts: counter("balancer_client_header_timeouts_total", "Client connections closed because a request head took longer than limits.client_header_timeout", &[]),
            lingering: gauge("balancer_client_connections_lingering", "Client connections answered early, being read from and discarded before they close", &[]),
            access_log_dropped: counter("balancer_access_log_dropped_total", "Access-log lines dropped because the output could not keep up", &[]),
            certificate_expiry: gauge("balancer_tls_certificate_expiry_seconds", "Seconds until the certificate ends (negative: ended)", &["certificate", "hosts"]),
            acme_orders: counter("balancer_acme_orders_total", "Certificates this process obtained from the ACME CA", &["domain"]),
            acme_failures: counter("balancer_acme_failures_total", "Attempts at an ACME certificate that failed", &["domain"]),
            build_info: gauge("balancer_build_info", "Always 1; the labels say which build this is", &["version"]),
        }
    }

    fn all(&self) -> [&dyn Collector; 17] {
        [
            &self.healthy,
            &self.failures,
            &self.in_flight,
            &self.backend_requests,
            &self.cache_events,
            &self.cache_evictions,
            &self.cache_bytes,
            &self.reloads,
            &self.connections_open,
            &self.connections_refused,
            &self.header_timeouts,
            &self.lingering,
            &self.access_log_dropped,
            &self.certificate_expiry,
            &self.acme_orders,
            &self.acme_failures,
            &self.build_info,
        ]
    }
}

static DESCS: LazyLock<Vec<Desc>> = LazyLock::new(|| {
    Families::new()
        .all()
        .iter()
        .flat_map(|c| c.desc().into_iter().cloned())
        .collect()
});

fn level(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for LiveState {
    fn desc(&self) -> Vec<&Desc> {
        DESCS.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let f = Families::new();
        f.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self.read_backends(&f);
        self.read_cache(&f);
        self.read_counts(&f);
        self.read_certificates(&f);
        f.all().iter().flat_map(|c| c.collect()).collect()
    }
}

/// Each family read from where its state lives.
impl LiveState {
    /// Every backend of every group in the snapshot in force.
    fn read_backends(&self, f: &Families) {
        let snapshot = self.live.load();
        for (name, group) in &snapshot.groups {
            for b in group.state.pool.members().iter() {
                let labels = [name.as_str(), b.label.as_str(), &*b.server];
                f.healthy
                    .with_label_values(&labels)
                    .set(i64::from(b.is_healthy()));
                f.failures
                    .with_label_values(&labels)
                    .set(i64::from(b.consecutive_failures()));
                f.in_flight.with_label_values(&labels).set(b.in_flight());
                f.backend_requests
                    .with_label_values(&labels)
                    .inc_by(b.requests());
            }
        }
    }

    fn read_cache(&self, f: &Families) {
        let stats = &self.cache.stats;
        for (outcome, counter) in [
            ("hit", &stats.hits),
            ("miss", &stats.misses),
            ("stale", &stats.stale),
            ("bypass", &stats.bypasses),
        ] {
            f.cache_events
                .with_label_values(&[outcome])
                .inc_by(counter.load(Ordering::Relaxed));
        }
        f.cache_evictions
            .with_label_values::<&str>(&[])
            .inc_by(self.cache.storage.evictions());
        f.cache_bytes
            .with_label_values::<&str>(&[])
            .set(level(self.cache.storage.stored_bytes()));
    }

    /// What the reloads, the client connections and the access log counted.
    fn read_counts(&self, f: &Families) {
        f.reloads
            .with_label_values(&["ok"])
            .inc_by(self.reloads.succeeded.load(Ordering::Relaxed));
        f.reloads
            .with_label_values(&["failed"])
            .inc_by(self.reloads.failed.load(Ordering::Relaxed));
        let c = &self.connections;
        f.connections_open
            .with_label_values::<&str>(&[])
            .set(level(c.open() as u64));
        f.connections_refused
            .with_label_values::<&str>(&[])
            .inc_by(c.refused());
        f.header_timeouts
            .with_label_values::<&str>(&[])
            .inc_by(c.header_timeouts());
        f.lingering
            .with_label_values::<&str>(&[])
            .set(level(c.lingering() as u64));
        f.access_log_dropped
            .with_label_values::<&str>(&[])
            .inc_by(crate::telemetry::access_log::dropped());
    }

    /// The TLS listener's certificates and the ACME orders.
    fn read_certificates(&self, f: &Families) {
        let now = std::time::SystemTime::now();
        for c in self
            .certificates
            .iter()
            .flat_map(|store| store.certificates())
        {
            let left = match c.not_after.duration_since(now) {
                Ok(d) => level(d.as_secs()),
                Err(e) => -level(e.duration().as_secs()),
            };
            let file = c.file.display().to_string();
            f.certificate_expiry
                .with_label_values(&[file.as_str(), &c.hosts.join(",")])
                .set(left);
        }
        for (domain, status) in self.acme.iter().flat_map(|a| a.domains()) {
            f.acme_orders
                .with_label_values(&[domain.as_str()])
                .inc_by(status.orders);
            f.acme_failures
                .with_label_values(&[domain.as_str()])
                .inc_by(status.failures);
        }
    }
}
