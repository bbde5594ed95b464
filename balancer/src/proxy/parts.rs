//! Parts of the per-request work that a bench-only build can turn off, one
//! at a time, to measure what each costs (`bench/parts.sh`, against
//! Pingora's floor). Built with the Cargo feature `bench-parts`, the
//! balancer reads `BALANCER_BENCH_OFF` (a comma-separated list of part
//! names) once, at its first request. Without the feature, which is how
//! it ships, every part is on: [`off`] is a constant `false` and its checks
//! compile to nothing.

/// A part of the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The connection guard and its timed stream (`max_connections`, the
    /// head deadline, the lingering close, the wait between requests).
    Guard,
    /// `X-Request-Id`: taken or made, sent upstream and to the client.
    RequestId,
    /// The routes (and the host they may read): every request goes to the
    /// default group.
    Routing,
    /// The request's metrics (counters and histograms with their labels).
    Metrics,
    /// Looking up a cache rule for the request's path.
    CacheLookup,
}

impl Part {
    #[cfg(feature = "bench-parts")]
    const ALL: [(Part, &'static str); 5] = [
        (Part::Guard, "guard"),
        (Part::RequestId, "request_id"),
        (Part::Routing, "routing"),
        (Part::Metrics, "metrics"),
        (Part::CacheLookup, "cache_lookup"),
    ];
}

/// Whether `part` is turned off in this process.
#[cfg(feature = "bench-parts")]
pub fn off(part: Part) -> bool {
    use std::sync::OnceLock;
    static OFF: OnceLock<Vec<Part>> = OnceLock::new();
    OFF.get_or_init(|| {
        let named = std::env::var("BALANCER_BENCH_OFF").unwrap_or_default();
        let parts: Vec<Part> = named
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                Part::ALL
                    .iter()
                    .find(|(_, name)| *name == n)
                    .map(|(p, _)| *p)
                    .unwrap_or_else(|| {
                        // A bench measuring something else than it says is worse than none.
                        let known: Vec<&str> = Part::ALL.iter().map(|(_, n)| *n).collect();
                        log::error!(
                            "BALANCER_BENCH_OFF: there is no part {n:?} (the parts: {}); stopping",
                            known.join(", ")
                        );
                        std::process::exit(2)
                    })
            })
            .collect();
        log::warn!("a bench build: parts turned off: {parts:?}");
        parts
    })
    .contains(&part)
}

/// Whether `part` is turned off: never, in a build without `bench-parts`.
#[cfg(not(feature = "bench-parts"))]
#[inline(always)]
pub const fn off(_part: Part) -> bool {
    false
}
