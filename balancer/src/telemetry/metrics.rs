//! The per-request metrics: counted by the request path as each request
//! ends, into the default registry of the `prometheus` crate, which the
//! admin listener serves with the rest (`admin::metrics`).

use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    Histogram, HistogramVec, IntCounter, IntCounterVec,
};

use super::access_log::Record;

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
    "Requests answered, by status class, method, route and upstream group",
    &["status_class", "method", "route", "upstream"]
));
metric!(REQUEST_SECONDS: Histogram = register_histogram!(
    "balancer_request_duration_seconds",
    "Time from the request's arrival to the end of its response",
    LATENCY_BUCKETS.to_vec()
));
metric!(UPSTREAM_SECONDS: HistogramVec = register_histogram_vec!(
    "balancer_upstream_duration_seconds",
    "Time from picking a backend to the end of its response body, by upstream group",
    &["upstream"],
    LATENCY_BUCKETS.to_vec()
));
metric!(RETRIES: IntCounter = register_int_counter!(
    "balancer_retries_total",
    "Attempts on another (or the same) backend after a failed one"
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
    let group = r.group.unwrap_or("none");
    REQUESTS
        .with_label_values(&[class, method, r.route.unwrap_or("none"), group])
        .inc();
    REQUEST_SECONDS.observe(r.time.as_secs_f64());
    if let (Some(group), Some(t)) = (r.group, r.upstream_time) {
        UPSTREAM_SECONDS
            .with_label_values(&[group])
            .observe(t.as_secs_f64());
    }
}

/// Counts one retry, when it is decided (so before its response is sent).
pub fn count_retry() {
    RETRIES.inc();
}
