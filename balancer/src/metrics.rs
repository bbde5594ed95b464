//! Prometheus metrics, registered in the default registry of the
//! `prometheus` crate that pingora-prometheus re-exports, and served by its
//! `PrometheusHttpApp` on the admin listener.
//!
//! Per-request figures are recorded as requests end; the state of upstreams,
//! the cache and reloads is copied in from their own counters on each scrape.

use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};

use crate::access_log::Record;
use crate::cache::ResponseCache;
use crate::connections::Connections;
use crate::reload::ReloadStats;
use crate::upstream::Pool;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

macro_rules! metric {
    ($name:ident: $ty:ty = $register:expr) => {
        static $name: LazyLock<$ty> = LazyLock::new(|| {
            $register.expect(concat!("metric ", stringify!($name), " registers once"))
        });
    };
}

metric!(REQUESTS: IntCounterVec = register_int_counter_vec!(
    "balancer_requests_total",
    "Requests answered, by status class, method and upstream address",
    &["status_class", "method", "upstream"]
));
metric!(REQUEST_SECONDS: Histogram = register_histogram!(
    "balancer_request_duration_seconds",
    "Time from the request's arrival to the end of its response",
    LATENCY_BUCKETS.to_vec()
));
metric!(UPSTREAM_SECONDS: HistogramVec = register_histogram_vec!(
    "balancer_upstream_duration_seconds",
    "Time from picking a backend to the end of its response body, by upstream address",
    &["upstream"],
    LATENCY_BUCKETS.to_vec()
));
metric!(RETRIES: IntCounter = register_int_counter!(
    "balancer_retries_total",
    "Attempts on another (or the same) backend after a failed one"
));
metric!(UPSTREAM_HEALTHY: IntGaugeVec = register_int_gauge_vec!(
    "balancer_upstream_healthy",
    "1 when the upstream address takes traffic, 0 when it is out",
    &["upstream", "server"]
));
metric!(UPSTREAM_FAILURES: IntGaugeVec = register_int_gauge_vec!(
    "balancer_upstream_consecutive_failures",
    "Failed health checks (or connects) in a row",
    &["upstream", "server"]
));
metric!(UPSTREAM_IN_FLIGHT: IntGaugeVec = register_int_gauge_vec!(
    "balancer_upstream_in_flight_requests",
    "Requests being proxied to the upstream address now",
    &["upstream", "server"]
));
metric!(CACHE_EVENTS: IntCounterVec = register_int_counter_vec!(
    "balancer_cache_responses_total",
    "Responses covered by a cache rule, by outcome (hit, miss, stale, bypass)",
    &["outcome"]
));
metric!(CACHE_EVICTIONS: IntCounter = register_int_counter!(
    "balancer_cache_evictions_total",
    "Cached responses evicted to stay within cache.max_size"
));
metric!(CACHE_BYTES: IntGauge = register_int_gauge!(
    "balancer_cache_stored_bytes",
    "Bytes held by the cache (keys, metadata and bodies)"
));
metric!(RELOADS: IntCounterVec = register_int_counter_vec!(
    "balancer_config_reloads_total",
    "Configuration reloads, by result (ok, failed)",
    &["result"]
));
metric!(CONNECTIONS_OPEN: IntGauge = register_int_gauge!(
    "balancer_client_connections_open",
    "Client connections open now"
));
metric!(CONNECTIONS_REFUSED: IntCounter = register_int_counter!(
    "balancer_client_connections_refused_total",
    "Client connections answered 503 and closed because limits.max_connections were open"
));
metric!(HEADER_TIMEOUTS: IntCounter = register_int_counter!(
    "balancer_client_header_timeouts_total",
    "Client connections closed because a request head took longer than limits.client_header_timeout"
));
metric!(CONNECTIONS_LINGERING: IntGauge = register_int_gauge!(
    "balancer_client_connections_lingering",
    "Client connections answered early, being read from and discarded before they close"
));
metric!(BUILD_INFO: IntGaugeVec = register_int_gauge_vec!(
    "balancer_build_info",
    "Always 1; the labels say which build this is",
    &["version"]
));

/// Records one finished request.
pub fn observe(r: &Record<'_>) {
    let class = match r.status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    };
    // Methods outside the standard set share one label, so clients cannot grow the series.
    let method = match r.method {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" => r.method,
        _ => "OTHER",
    };
    let upstream = r.upstream.unwrap_or("none");
    REQUESTS.with_label_values(&[class, method, upstream]).inc();
    REQUEST_SECONDS.observe(r.time.as_secs_f64());
    if let (Some(upstream), Some(t)) = (r.upstream, r.upstream_time) {
        UPSTREAM_SECONDS
            .with_label_values(&[upstream])
            .observe(t.as_secs_f64());
    }
}

/// Counts one retry, when it is decided (so before its response is sent).
pub fn count_retry() {
    RETRIES.inc();
}

/// Brings a counter that mirrors `total` up to it.
fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// Copies the current state of upstreams, cache, reloads and client
/// connections into the metrics.
pub fn refresh(
    pool: &Pool,
    cache: &ResponseCache,
    reloads: &ReloadStats,
    connections: &Connections,
) {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    for gauge in [
        &*UPSTREAM_HEALTHY,
        &*UPSTREAM_FAILURES,
        &*UPSTREAM_IN_FLIGHT,
    ] {
        gauge.reset(); // removed addresses disappear
    }
    for b in pool.members().iter() {
        let labels = [b.label.as_str(), &*b.server];
        UPSTREAM_HEALTHY
            .with_label_values(&labels)
            .set(i64::from(b.is_healthy()));
        UPSTREAM_FAILURES
            .with_label_values(&labels)
            .set(i64::from(b.consecutive_failures()));
        UPSTREAM_IN_FLIGHT
            .with_label_values(&labels)
            .set(b.in_flight());
    }
    let stats = &cache.stats;
    for (outcome, counter) in [
        ("hit", &stats.hits),
        ("miss", &stats.misses),
        ("stale", &stats.stale),
        ("bypass", &stats.bypasses),
    ] {
        catch_up(
            &CACHE_EVENTS.with_label_values(&[outcome]),
            counter.load(Ordering::Relaxed),
        );
    }
    catch_up(&CACHE_EVICTIONS, cache.storage.evictions());
    CACHE_BYTES.set(i64::try_from(cache.storage.stored_bytes()).unwrap_or(i64::MAX));
    catch_up(
        &RELOADS.with_label_values(&["ok"]),
        reloads.succeeded.load(Ordering::Relaxed),
    );
    catch_up(
        &RELOADS.with_label_values(&["failed"]),
        reloads.failed.load(Ordering::Relaxed),
    );
    CONNECTIONS_OPEN.set(i64::try_from(connections.open()).unwrap_or(i64::MAX));
    CONNECTIONS_LINGERING.set(i64::try_from(connections.lingering()).unwrap_or(i64::MAX));
    catch_up(&CONNECTIONS_REFUSED, connections.refused());
    catch_up(&HEADER_TIMEOUTS, connections.header_timeouts());
}
