//! The response cache: which requests a rule covers, what of a response may
//! be stored and for how long (RFC 9111, as a shared cache), how variants are
//! told apart, and the counters the admin API reports.
//!
//! The proxy hooks in `proxy.rs` call into this module; the bytes themselves
//! live in [`storage`], and keys are made in [`key`].

pub mod key;
pub mod storage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use pingora::cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora::cache::filters::resp_cacheable;
use pingora::cache::key::HashBinary;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{
    CacheMeta, CacheMetaDefaults, CachePhase, NoCacheReason, RespCacheable, VarianceBuilder,
};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::{self, CacheRule};
use storage::MemoryStorage;

/// How long a request that found the cache locked waits for the filling one.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long the filling request may hold the lock before another takes over.
const LOCK_AGE: Duration = Duration::from_secs(10);

/// The process-wide cache: Pingora requires its parts to live for `'static`.
pub struct ResponseCache {
    pub storage: &'static MemoryStorage,
    pub lock: &'static CacheKeyLockImpl,
    pub stats: CacheStats,
}

impl ResponseCache {
    /// Builds the cache sized by `settings` (or by the defaults when the file has no `[cache]`).
    /// Its size is fixed for the life of the process.
    pub fn leak(settings: Option<&config::Cache>) -> &'static ResponseCache {
        let defaults = config::Cache::default();
        let settings = settings.unwrap_or(&defaults);
        let storage = Box::leak(Box::new(MemoryStorage::new(
            settings.max_size.0,
            usize::try_from(settings.max_object_size.0).unwrap_or(usize::MAX),
        )));
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(LOCK_AGE));
        Box::leak(Box::new(ResponseCache {
            storage,
            lock,
            stats: CacheStats::default(),
        }))
    }
}

/// Counters of what the cache did, for metrics and status.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub bypasses: AtomicU64,
}

impl CacheStats {
    /// Counts one response by the label it carries.
    pub fn count(&self, status: &str) {
        let counter = match status {
            "HIT" | "REVALIDATED" => &self.hits,
            "STALE" | "UPDATING" => &self.stale,
            "MISS" | "EXPIRED" => &self.misses,
            _ => &self.bypasses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The rule covering `path`: the one with the longest matching prefix.
pub fn rule_for<'a>(rules: &'a [CacheRule], path: &str) -> Option<&'a CacheRule> {
    rules.get(rule_index(rules, path)?)
}

/// The position in `rules` of [`rule_for`]'s rule.
pub fn rule_index(rules: &[CacheRule], path: &str) -> Option<usize> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| path.starts_with(r.path.as_str()))
        .max_by_key(|(_, r)| r.path.as_str().len())
        .map(|(i, _)| i)
}

/// Whether a stored fresh response may answer `req` as it is, with no lock,
/// lookup of variants or revalidation: a plain GET or HEAD that carries no
/// credentials, no conditions, no range and no cache directives of its own.
/// Everything else takes Pingora's full cache path.
pub fn plain_hit_candidate(req: &RequestHeader) -> bool {
    const DISQUALIFYING: [&str; 9] = [
        "authorization",
        "range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
        "cache-control",
        "pragma",
    ];
    matches!(req.method, http::Method::GET | http::Method::HEAD)
        && !DISQUALIFYING.iter().any(|h| req.headers.contains_key(*h))
}

/// Marks a response that a rule covers: `X-Cache-Status`, and what clients
/// are told to keep when the rule says (`client_max_age`, like nginx's `expires`).
pub fn label_response(
    resp: &mut ResponseHeader,
    status: &'static str,
    client_max_age: Option<Duration>,
) -> pingora::Result<()> {
    resp.insert_header("x-cache-status", status)?;
    if let Some(max_age) = client_max_age {
        if tells_clients_expiry(resp.status.as_u16()) {
            resp.insert_header("cache-control", format!("max-age={}", max_age.as_secs()))?;
            resp.insert_header(
                "expires",
                httpdate::fmt_http_date(SystemTime::now() + max_age),
            )?;
        }
    }
    Ok(())
}

/// The `X-Cache-Status` value for a response in `phase`.
pub fn status_label(phase: CachePhase) -> &'static str {
    match phase {
        CachePhase::Hit => "HIT",
        CachePhase::Miss => "MISS",
        CachePhase::Stale => "STALE",
        CachePhase::StaleUpdating => "UPDATING",
        CachePhase::Expired => "EXPIRED",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        _ => "BYPASS",
    }
}

/// Whether a response stored for one request may answer a request that
/// carries `Authorization` (RFC 9111, section 3.5).
pub fn shareable_with_authorization(cc: Option<&CacheControl>) -> bool {
    cc.is_some_and(|cc| {
        cc.public() || cc.s_maxage().ok().flatten().is_some() || cc.must_revalidate()
    })
}

fn no_default_freshness(_: pingora::http::StatusCode) -> Option<Duration> {
    None
}

/// Whether and how long `resp` may be stored under `rule`. The origin's own
/// `Cache-Control` and `Expires` win; the rule's `ttl` applies only to a 200
/// that says nothing about its freshness.
pub fn cacheability(rule: &CacheRule, resp: &ResponseHeader, authorization: bool) -> RespCacheable {
    let refuse = RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    if resp.headers.contains_key("set-cookie") || vary_names(resp).any(|name| name == "*") {
        return refuse;
    }
    let cc = CacheControl::from_resp_headers(resp);
    if cc
        .as_ref()
        .is_some_and(|cc| cc.is_cacheable() == Cacheable::No)
    {
        return refuse;
    }
    if authorization && !shareable_with_authorization(cc.as_ref()) {
        return refuse;
    }
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let (swr, sie) = (
        secs(rule.stale_while_revalidate.0),
        secs(rule.stale_if_error.0),
    );
    let origin_gives_freshness = resp.headers.contains_key("expires")
        || cc.as_ref().is_some_and(|cc| {
            cc.no_cache()
                || cc.max_age().ok().flatten().is_some()
                || cc.s_maxage().ok().flatten().is_some()
        });
    if origin_gives_freshness {
        let defaults = CacheMetaDefaults::new(no_default_freshness, swr, sie);
        return resp_cacheable(cc.as_ref(), resp.clone(), authorization, &defaults);
    }
    if resp.status != 200 {
        return refuse;
    }
    let (swr, sie) = match &cc {
        Some(cc) if cc.must_revalidate() || cc.proxy_revalidate() => (0, 0),
        _ => (swr, sie),
    };
    let now = SystemTime::now();
    RespCacheable::Cacheable(CacheMeta::new(
        now + rule.ttl.0,
        now,
        swr,
        sie,
        resp.clone(),
    ))
}

fn vary_names(resp: &ResponseHeader) -> impl Iterator<Item = String> + '_ {
    resp.headers
        .get_all("vary")
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
}

/// The variant of the stored response `meta` that `req` asks for, from the
/// request headers that the response's `Vary` names.
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let mut builder = VarianceBuilder::new();
    for name in vary_names(meta.response_header()) {
        let value = req
            .headers
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        builder.add_owned_name_value(name, value);
    }
    builder.finalize()
}

/// Statuses that nginx's `expires` touches; `client_max_age` follows it.
pub fn tells_clients_expiry(status: u16) -> bool {
    matches!(
        status,
        200 | 201 | 204 | 206 | 301 | 302 | 303 | 304 | 307 | 308
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str) -> CacheRule {
        let text = format!("path = {path:?}\nttl = \"30s\"\nstale_while_revalidate = \"10s\"\nstale_if_error = \"5m\"\n");
        toml::from_str(&text).unwrap()
    }

    fn resp(status: u16, headers: &[(&'static str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (n, v) in headers {
            r.append_header(*n, *v).unwrap();
        }
        r
    }

    fn fresh_for(c: RespCacheable) -> Option<Duration> {
        match c {
            RespCacheable::Cacheable(meta) => Some(
                meta.fresh_until()
                    .duration_since(meta.created())
                    .unwrap_or_default(),
            ),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn the_longest_prefix_wins() {
        let rules = [rule("/"), rule("/cache-me"), rule("/cache")];
        assert_eq!(
            rule_for(&rules, "/cache-me/x").unwrap().path.as_str(),
            "/cache-me"
        );
        assert_eq!(rule_for(&rules, "/other").unwrap().path.as_str(), "/");
        assert!(rule_for(&rules[1..], "/other").is_none());
    }

    #[test]
    fn the_origin_wins_over_the_ttl() {
        let r = rule("/");
        assert_eq!(
            fresh_for(cacheability(&r, &resp(200, &[]), false)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            fresh_for(cacheability(
                &r,
                &resp(200, &[("cache-control", "max-age=5")]),
                false
            )),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            fresh_for(cacheability(
                &r,
                &resp(200, &[("cache-control", "s-maxage=7, max-age=5")]),
                false
            )),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            fresh_for(cacheability(
                &r,
                &resp(200, &[("cache-control", "no-cache")]),
                false
            )),
            Some(Duration::ZERO)
        );
        assert_eq!(
            fresh_for(cacheability(&r, &resp(404, &[]), false)),
            None,
            "the ttl is for 200s only"
        );
        assert_eq!(
            fresh_for(cacheability(
                &r,
                &resp(404, &[("cache-control", "max-age=9")]),
                false
            )),
            Some(Duration::from_secs(9))
        );
    }

    #[test]
    fn what_is_never_stored() {
        let r = rule("/");
        for headers in [
            vec![("cache-control", "no-store")],
            vec![("cache-control", "private")],
            vec![("cache-control", "private, max-age=60")],
            vec![("set-cookie", "a=b")],
            vec![("vary", "*")],
            vec![("vary", "accept, *")],
        ] {
            assert_eq!(
                fresh_for(cacheability(&r, &resp(200, &headers), false)),
                None,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn authorization_needs_the_response_to_allow_sharing() {
        let r = rule("/");
        assert_eq!(fresh_for(cacheability(&r, &resp(200, &[]), true)), None);
        assert_eq!(
            fresh_for(cacheability(
                &r,
                &resp(200, &[("cache-control", "max-age=5")]),
                true
            )),
            None
        );
        for allowed in [
            "public",
            "public, max-age=5",
            "s-maxage=5",
            "must-revalidate, max-age=5",
        ] {
            assert!(
                fresh_for(cacheability(
                    &r,
                    &resp(200, &[("cache-control", allowed)]),
                    true
                ))
                .is_some(),
                "{allowed}"
            );
        }
    }

    #[test]
    fn variants_follow_the_vary_header() {
        let now = SystemTime::now();
        let meta = CacheMeta::new(
            now,
            now,
            0,
            0,
            resp(200, &[("vary", "Accept-Encoding, X-Lang")]),
        );
        let req = |enc: &str, lang: &str| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.insert_header("accept-encoding", enc).unwrap();
            r.insert_header("x-lang", lang).unwrap();
            r
        };
        assert_eq!(
            variance(&meta, &req("gzip", "en")),
            variance(&meta, &req("gzip", "en"))
        );
        assert_ne!(
            variance(&meta, &req("gzip", "en")),
            variance(&meta, &req("br", "en"))
        );
        assert_ne!(
            variance(&meta, &req("gzip", "en")),
            variance(&meta, &req("gzip", "fr"))
        );
        let plain = CacheMeta::new(now, now, 0, 0, resp(200, &[]));
        assert_eq!(variance(&plain, &req("gzip", "en")), None);
    }

    #[test]
    fn labels() {
        assert_eq!(status_label(CachePhase::Hit), "HIT");
        assert_eq!(status_label(CachePhase::StaleUpdating), "UPDATING");
        assert_eq!(
            status_label(CachePhase::Disabled(NoCacheReason::NeverEnabled)),
            "BYPASS"
        );
        let stats = CacheStats::default();
        stats.count("HIT");
        stats.count("UPDATING");
        assert_eq!(
            (
                stats.hits.load(Ordering::Relaxed),
                stats.stale.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
    }
}
