//! The response cache: which requests a rule covers, what of a response may
//! be stored and for how long (RFC 9111, as a shared cache), how variants are
//! told apart, and the counters the admin API reports.
//!
//! The proxy hooks in `proxy.rs` call into this module; the bytes themselves
//! live in [`storage`], and keys are made in [`key`].

pub mod freshness;
pub mod key;
pub mod storage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use pingora::cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora::cache::key::HashBinary;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{CacheMeta, CachePhase, NoCacheReason, RespCacheable, VarianceBuilder};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config;
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

/// What the request path reads of `[cache]`: its rules, and the largest
/// response stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_object_size: usize,
    pub rules: Vec<Rule>,
}

impl From<&config::Cache> for Policy {
    fn from(cache: &config::Cache) -> Policy {
        Policy {
            max_object_size: usize::try_from(cache.max_object_size.0).unwrap_or(usize::MAX),
            rules: cache.rules.iter().map(Rule::from).collect(),
        }
    }
}

/// A `[[cache.rule]]`: what is cached under one path prefix, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub path: String,
    /// Freshness of a 200 whose origin gives none; `None`: only explicit
    /// or heuristic freshness.
    pub ttl: Option<Duration>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// What clients are told to keep.
    pub client_max_age: Option<Duration>,
    pub store_set_cookie: bool,
}

impl From<&config::CacheRule> for Rule {
    fn from(rule: &config::CacheRule) -> Rule {
        Rule {
            path: rule.path.as_str().to_owned(),
            ttl: rule.ttl.map(|t| t.0),
            stale_while_revalidate: rule.stale_while_revalidate.0,
            stale_if_error: rule.stale_if_error.0,
            client_max_age: rule.client_max_age.map(|a| a.0),
            store_set_cookie: rule.store_set_cookie,
        }
    }
}

impl ResponseCache {
    /// After a non-error answer to an unsafe request (any method but GET,
    /// HEAD, OPTIONS and TRACE), drops every stored response for its target
    /// and for the `Location` and `Content-Location` it names on the same host
    /// (RFC 9111, section 4.4). Returns how many were dropped. PURGE is the
    /// admin listener's: on the public one it is forwarded and drops nothing.
    pub fn invalidate_after(
        &self,
        rules: &[Rule],
        req: &RequestHeader,
        resp: &ResponseHeader,
    ) -> usize {
        let safe = matches!(
            req.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
        ) || req.method.as_str() == "PURGE";
        if safe || !(200..400).contains(&resp.status.as_u16()) {
            return 0;
        }
        let (host, target) = key::parts_of(req);
        let named = ["location", "content-location"]
            .into_iter()
            .filter_map(|name| resp.headers.get(name)?.to_str().ok())
            .filter_map(|uri| same_host_target(uri, host));
        std::iter::once(target)
            .chain(named)
            // Only what a rule covers was ever stored: the rest needs no search.
            .filter(|pq| rule_index(rules, pq.split('?').next().unwrap_or("")).is_some())
            .map(|pq| self.storage.invalidate(&key::cache_key(host, pq)))
            .sum()
    }
}

/// The path and query of `uri` when it names a resource on `host`: a path,
/// or an absolute URI whose authority is `host`.
fn same_host_target<'a>(uri: &'a str, host: &str) -> Option<&'a str> {
    if uri.starts_with('/') && !uri.starts_with("//") {
        return Some(uri);
    }
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    authority.eq_ignore_ascii_case(host).then_some(path)
}

/// Fields a `304` never changes in a stored response: those describing the
/// stored body as it was received (its length, coding, range and digest) and
/// the validator it was validated with (RFC 9111, sections 3.2 and 4.3.4).
/// A `304` has no body of its own, so its `Content-Length` is not the body's.
static KEPT_FROM_STORED: [http::HeaderName; 5] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::HeaderName::from_static("content-md5"),
    http::header::ETAG,
];

/// Removes from a `304` the fields that never update a stored response
/// ([`KEPT_FROM_STORED`]), so that no merge of it can take them.
pub fn remove_kept_fields(not_modified: &mut ResponseHeader) {
    for name in &KEPT_FROM_STORED {
        not_modified.remove_header(name);
    }
}

/// Updates `header`, a stored response (or one being sent from it), with
/// the `304` that revalidated it: each field of the `304` replaces the one
/// of that name (RFC 9111, section 4.3.4), but the fields never stored
/// ([`strip_unstorable`]) and those the stored body depends on
/// ([`KEPT_FROM_STORED`]). Pingora's own merge takes only the caching fields.
pub fn update_from_304(
    header: &mut ResponseHeader,
    not_modified: &ResponseHeader,
) -> pingora::Result<()> {
    let mut fields = not_modified.clone();
    strip_unstorable(&mut fields);
    remove_kept_fields(&mut fields);
    for name in fields.headers.keys() {
        header.remove_header(name);
    }
    for (name, value) in fields.headers.iter() {
        header.append_header(name.clone(), value.clone())?;
    }
    Ok(())
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
pub fn rule_for<'a>(rules: &'a [Rule], path: &str) -> Option<&'a Rule> {
    rules.get(rule_index(rules, path)?)
}

/// The position in `rules` of [`rule_for`]'s rule.
pub fn rule_index(rules: &[Rule], path: &str) -> Option<usize> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| path.starts_with(r.path.as_str()))
        .max_by_key(|(_, r)| r.path.len())
        .map(|(i, _)| i)
}

/// Whether a stored fresh response may answer `req` as it is, with no lock,
/// lookup of variants or revalidation: a plain GET or HEAD that carries no
/// credentials, no conditions, no range and no cache directives of its own.
/// Everything else takes Pingora's full cache path.
pub fn plain_hit_candidate(req: &RequestHeader) -> bool {
    use http::header::{
        AUTHORIZATION, CACHE_CONTROL, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
        IF_UNMODIFIED_SINCE, PRAGMA, RANGE,
    };
    // Standard names, compared as such: the request's few fields are each
    // held against the list, cheaper than hashing the nine names to look
    // each one up.
    const DISQUALIFYING: [http::HeaderName; 9] = [
        AUTHORIZATION,
        RANGE,
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_MATCH,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
        CACHE_CONTROL,
        PRAGMA,
    ];
    matches!(req.method, http::Method::GET | http::Method::HEAD)
        && !req.headers.keys().any(|name| DISQUALIFYING.contains(name))
}

/// Marks a response that a rule covers: `X-Cache-Status`, and what clients
/// are told to keep when the rule says (`client_max_age`, like nginx's `expires`).
pub fn label_response(
    resp: &mut ResponseHeader,
    status: &'static str,
    client_max_age: Option<Duration>,
) -> pingora::Result<()> {
    resp.insert_header(X_CACHE_STATUS.clone(), status)?;
    tell_clients(resp, client_max_age)
}

/// `x-cache-status`, made once: a header name given as text is parsed on every use.
pub static X_CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");

/// With `client_max_age`, tells clients how long to keep `resp`:
/// `Cache-Control: max-age` and `Expires`.
pub fn tell_clients(
    resp: &mut ResponseHeader,
    client_max_age: Option<Duration>,
) -> pingora::Result<()> {
    if let Some(max_age) = client_max_age {
        if tells_clients_expiry(resp.status.as_u16()) {
            resp.insert_header(
                http::header::CACHE_CONTROL,
                format!("max-age={}", max_age.as_secs()),
            )?;
            resp.insert_header(http::header::EXPIRES, expires_in(max_age))?;
        }
    }
    Ok(())
}

/// The HTTP date `max_age` from now, formatted at most once a second per
/// thread and `max_age` (the date has a resolution of one second).
fn expires_in(max_age: Duration) -> http::HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(u64, Duration, http::HeaderValue)>> = const { RefCell::new(None) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with_borrow_mut(|last| match last {
        Some((s, age, value)) if *s == second && *age == max_age => value.clone(),
        _ => {
            let value = http::HeaderValue::from_str(&httpdate::fmt_http_date(now + max_age))
                .unwrap_or_else(|_| http::HeaderValue::from_static("0"));
            *last = Some((second, max_age, value.clone()));
            value
        }
    })
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

/// Whether and how long `resp` may be stored under `rule` (RFC 9111, as a
/// shared cache and a surrogate). The origin's `Surrogate-Control`,
/// `Cache-Control` and `Expires` win; the rule's `ttl` applies only to a 200
/// that says nothing about its freshness; without a `ttl`, `Last-Modified`
/// may give a heuristic lifetime. The rule's stale windows apply only to
/// responses that allow serving stale. A response with `Set-Cookie` is
/// stored only when the rule says `store_set_cookie`.
pub fn cacheability(rule: &Rule, resp: &ResponseHeader, authorization: bool) -> RespCacheable {
    let refuse = RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    let cookie_refused =
        !rule.store_set_cookie && resp.headers.contains_key(http::header::SET_COOKIE);
    if cookie_refused || vary_names(resp).any(|name| name == "*") {
        return refuse;
    }
    let cc = CacheControl::from_resp_headers(resp);
    let surrogate = freshness::surrogate_control(resp);
    let must_understand_unknown = cc.as_ref().is_some_and(|cc| cc.has_key("must-understand"))
        && !understood_status(resp.status.as_u16());
    if cc
        .as_ref()
        .is_some_and(|cc| cc.is_cacheable() == Cacheable::No)
        || surrogate.as_ref().is_some_and(CacheControl::no_store)
        || must_understand_unknown
    {
        return refuse;
    }
    if authorization && !shareable_with_authorization(cc.as_ref()) {
        return refuse;
    }
    let now = SystemTime::now();
    let lifetime = match freshness::explicit_lifetime(resp, cc.as_ref(), surrogate.as_ref(), now) {
        Some(lifetime) => lifetime,
        None => match rule.ttl.filter(|_| resp.status == 200) {
            Some(ttl) => ttl,
            None => match freshness::heuristic_lifetime(resp, cc.as_ref(), now) {
                Some(lifetime) => lifetime,
                None => return refuse,
            },
        },
    };
    let (fresh_until, epoch) = freshness::timeline(now, lifetime, freshness::age_value(resp));
    let (swr, sie) = stale_windows(rule, cc.as_ref());
    let mut stored = resp.clone();
    strip_unstorable(&mut stored);
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut stored);
    }
    RespCacheable::Cacheable(CacheMeta::new(fresh_until, epoch, swr, sie, stored))
}

/// How long after expiry a response may still be served: while one request
/// revalidates it, and when the origin fails. The origin's own
/// `stale-while-revalidate`/`stale-if-error` win over the rule's; and
/// `must-revalidate`, `proxy-revalidate`, `no-cache` and `s-maxage` forbid
/// serving stale at all (RFC 9111, sections 4.2.4 and 5.2.2).
fn stale_windows(rule: &Rule, cc: Option<&CacheControl>) -> (u32, u32) {
    if cc.is_some_and(|cc| {
        // s-maxage forbids it even with a value that cannot be read: it
        // still says that shared caches must revalidate (section 5.2.2.10).
        cc.must_revalidate() || cc.proxy_revalidate() || cc.no_cache() || cc.has_key("s-maxage")
    }) {
        return (0, 0);
    }
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let swr = cc.and_then(|cc| cc.stale_while_revalidate().ok().flatten());
    let sie = cc.and_then(|cc| cc.stale_if_error().ok().flatten());
    (
        swr.unwrap_or_else(|| secs(rule.stale_while_revalidate)),
        sie.unwrap_or_else(|| secs(rule.stale_if_error)),
    )
}

/// Fields that belong to one connection or one hop, or to the balancer
/// alone, and so are never stored (RFC 9111, section 3.1): the hop-by-hop
/// ones, those that `Connection` names, `Age` (a hit computes its own) and
/// `Surrogate-Control`.
pub fn strip_unstorable(resp: &mut ResponseHeader) {
    const NEVER_STORED: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "age",
        "surrogate-control",
    ];
    let named: Vec<String> = resp
        .headers
        .get_all("connection")
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named.iter().map(String::as_str).chain(NEVER_STORED) {
        resp.remove_header(name);
    }
}

/// Statuses whose caching rules the balancer knows (RFC 9110, section 15):
/// `must-understand` on any other forbids storing (RFC 9111, section 5.2.2.3).
fn understood_status(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 501
    )
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

    #[test]
    fn only_a_plain_get_or_head_may_take_a_fresh_hit_as_it_is() {
        let request = |method: &str, fields: &[(&str, &str)]| {
            let mut req = RequestHeader::build(method, b"/cache-me", None).unwrap();
            for (name, value) in fields {
                req.insert_header(name.to_string(), *value).unwrap();
            }
            req
        };
        let plain = [
            ("Host", "localhost"),
            ("User-Agent", "curl"),
            ("Accept", "*/*"),
        ];
        assert!(plain_hit_candidate(&request("GET", &plain)));
        assert!(plain_hit_candidate(&request("HEAD", &[])));
        assert!(!plain_hit_candidate(&request("POST", &plain)));
        for field in [
            "Authorization",
            "Range",
            "If-None-Match",
            "If-Modified-Since",
            "If-Match",
            "If-Unmodified-Since",
            "If-Range",
            "cache-control",
            "PRAGMA",
        ] {
            let mut fields = plain.to_vec();
            fields.push((field, "x"));
            assert!(
                !plain_hit_candidate(&request("GET", &fields)),
                "{field} takes the full cache path"
            );
        }
    }

    fn rule(path: &str) -> Rule {
        let text = format!("path = {path:?}\nttl = \"30s\"\nstale_while_revalidate = \"10s\"\nstale_if_error = \"5m\"\n");
        Rule::from(&toml::from_str::<config::CacheRule>(&text).unwrap())
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
    fn revalidation_directives_close_the_stale_windows() {
        let r = rule("/");
        let after_expiry =
            |cc: &str| match cacheability(&r, &resp(200, &[("cache-control", cc)]), false) {
                RespCacheable::Cacheable(meta) => {
                    let later = meta.fresh_until() + Duration::from_secs(1);
                    (
                        meta.serve_stale_while_revalidate(later),
                        meta.serve_stale_if_error(later),
                    )
                }
                RespCacheable::Uncacheable(why) => panic!("{cc}: not stored: {why:?}"),
            };
        for cc in [
            "max-age=5, must-revalidate",
            "max-age=5, proxy-revalidate",
            "no-cache",
            "s-maxage=5",
            "s-maxage=abc, max-age=5",
            "max-age=5, stale-if-error=60, must-revalidate",
        ] {
            assert_eq!(after_expiry(cc), (false, false), "{cc}");
        }
        assert_eq!(
            after_expiry("max-age=5"),
            (true, true),
            "the rule's windows"
        );
    }

    #[test]
    fn set_cookie_is_stored_only_when_the_rule_says_so() {
        let cookie = resp(
            200,
            &[("set-cookie", "a=b"), ("cache-control", "max-age=9")],
        );
        assert_eq!(fresh_for(cacheability(&rule("/"), &cookie, false)), None);
        let mut keep = rule("/");
        keep.store_set_cookie = true;
        match cacheability(&keep, &cookie, false) {
            RespCacheable::Cacheable(meta) => assert_eq!(
                meta.response_header().headers.get("set-cookie").unwrap(),
                "a=b"
            ),
            RespCacheable::Uncacheable(why) => panic!("not stored: {why:?}"),
        }
        // The origin may still keep the cookie out of the stored copy.
        for cc in [
            "max-age=9, private=\"set-cookie\"",
            "max-age=9, no-cache=\"Set-Cookie\"",
        ] {
            let kept_out = resp(200, &[("set-cookie", "a=b"), ("cache-control", cc)]);
            match cacheability(&keep, &kept_out, false) {
                RespCacheable::Cacheable(meta) => {
                    assert!(
                        !meta.response_header().headers.contains_key("set-cookie"),
                        "{cc}"
                    );
                    assert_eq!(
                        fresh_for(RespCacheable::Cacheable(meta)),
                        Some(Duration::from_secs(9))
                    );
                }
                RespCacheable::Uncacheable(why) => panic!("{cc}: not stored: {why:?}"),
            }
        }
    }

    #[test]
    fn a_304_updates_all_but_what_the_stored_body_depends_on() {
        let mut stored = resp(
            200,
            &[
                ("content-length", "5"),
                ("content-encoding", "gzip"),
                ("content-md5", "old"),
                ("etag", "\"v1\""),
                ("cache-control", "max-age=1"),
                ("x-a", "old"),
                ("x-b", "kept"),
                ("set-cookie", "old=1"),
            ],
        );
        let not_modified = resp(
            304,
            &[
                ("content-length", "0"),
                ("content-encoding", "br"),
                ("content-range", "bytes 0-1/2"),
                ("content-md5", "new"),
                ("etag", "\"v2\""),
                ("cache-control", "max-age=60"),
                ("x-a", "new"),
                ("set-cookie", "new=1"),
                ("set-cookie", "new=2"),
                ("age", "7"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
            ],
        );
        update_from_304(&mut stored, &not_modified).unwrap();
        let field = |name: &str| -> Vec<&str> {
            let values = stored.headers.get_all(name).iter();
            values.map(|v| v.to_str().unwrap()).collect()
        };
        for (name, expected) in [
            ("content-length", vec!["5"]),
            ("content-encoding", vec!["gzip"]),
            ("content-md5", vec!["old"]),
            ("etag", vec!["\"v1\""]),
            ("content-range", vec![]),
            ("cache-control", vec!["max-age=60"]),
            ("x-a", vec!["new"]),
            ("x-b", vec!["kept"]),
            ("set-cookie", vec!["new=1", "new=2"]),
            ("age", vec![]),
            ("x-hop", vec![]),
        ] {
            assert_eq!(field(name), expected, "{name}");
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
