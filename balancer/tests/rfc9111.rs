//! The cache against RFC 9111 (issues 14 and 28): freshness without a
//! `ttl`, `Expires` and `Age` (a list's first member), stale serving the
//! origin forbids whatever the origin's failure, fields never stored,
//! `Surrogate-Control`, invalidation by unsafe methods, 304s that update the
//! stored response but for what its body depends on, `Set-Cookie` stored
//! only when a rule says so, and the size bound. Each hit is checked on both
//! ways a hit is served: the fast path (a plain GET) and Pingora's full cache
//! path (forced by a request `Cache-Control`); issue 28's rules over HTTP/1.1
//! and HTTP/2 (h2c) clients alike.

#[path = "support/http2.rs"]
mod http2;
mod support;

use std::time::{Duration, SystemTime};

use support::*;

/// A request header that sends a hit down Pingora's full cache path.
const FULL_PATH: (&str, &str) = ("cache-control", "max-stale=0");

/// The reply of the fast path and of the full path for `url`, in that order.
fn both_paths(url: &str) -> [Reply; 2] {
    [get(url).unwrap(), get_with(url, &[FULL_PATH]).unwrap()]
}

/// Asserts that `url`, once fetched, is answered from the cache by both paths.
fn assert_stored(url: &str) -> [Reply; 2] {
    let first = get(url).unwrap();
    let hits = both_paths(url);
    for (hit, way) in hits.iter().zip(["fast", "full"]) {
        assert_eq!(
            (cache_status(hit), &hit.body),
            ("HIT", &first.body),
            "{url} should be a {way}-path hit; first reply {first:?}, then {hit:?}"
        );
    }
    hits
}

/// Asserts that `url` is not answered from the cache, by either path.
fn assert_not_stored(origin: &Origin, url: &str) {
    let path = url.split_once("/c").map(|(_, p)| format!("/c{p}")).unwrap();
    let before = origin.hits(&path);
    let first = get(url).unwrap();
    for reply in both_paths(url) {
        assert_ne!(
            cache_status(&reply),
            "HIT",
            "{url} should not be served from the cache; first reply {first:?}, then {reply:?}"
        );
    }
    assert_eq!(
        origin.hits(&path) - before,
        3,
        "{url}: every request reaches the origin"
    );
}

/// An HTTP date `offset` seconds from now (negative: in the past), kept for the test's life.
fn date(offset: i64) -> &'static str {
    let now = SystemTime::now();
    let at = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    Box::leak(httpdate::fmt_http_date(at).into_boxed_str())
}

/// How a client speaks to the balancer's plain listener.
#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    /// HTTP/2 in clear text: the balancer needs [`H2C`].
    Http2,
}

const PROTOS: [Proto; 2] = [Proto::Http1, Proto::Http2];

/// The top-level key that lets the plain listener speak HTTP/2 too.
const H2C: &str = "http2_cleartext = true";

impl Proto {
    /// GET `path` from `lb` with `headers`; any status is a reply.
    fn get(self, lb: &Balancer, path: &str, headers: &[(&str, &str)]) -> Reply {
        match self {
            Proto::Http1 => get_with(&lb.url(path), headers),
            Proto::Http2 => http2::h2c_get(lb.port, path, headers),
        }
        .unwrap_or_else(|e| panic!("{self:?} GET {path}: {e}"))
    }

    /// A path segment that keeps each protocol's entries apart.
    fn tag(self) -> &'static str {
        match self {
            Proto::Http1 => "h1",
            Proto::Http2 => "h2",
        }
    }
}

fn age(r: &Reply) -> u64 {
    r.header("age")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a hit carries a numeric Age: {r:?}"))
}

// 8. `ttl` may be left out.

#[test]
fn without_a_ttl_only_stated_or_heuristic_freshness_is_stored() {
    let origin = Origin::start();
    let with = |headers: Vec<(&'static str, &'static str)>| Act::With(200, headers, "v{n}");
    origin.on("/c/max-age", with(vec![("cache-control", "max-age=60")]));
    origin.on("/c/s-maxage", with(vec![("cache-control", "s-maxage=60")]));
    origin.on(
        "/c/expires",
        with(vec![("date", date(0)), ("expires", date(60))]),
    );
    origin.on(
        "/c/surrogate",
        with(vec![("surrogate-control", "max-age=60")]),
    );
    origin.on(
        "/c/last-modified",
        with(vec![
            ("date", date(0)),
            ("last-modified", date(-10 * 86400)),
        ]),
    );
    origin.on(
        "/c/redirect-last-modified",
        Act::With(
            302,
            vec![
                ("location", "/elsewhere"),
                ("date", date(0)),
                ("last-modified", date(-10 * 86400)),
            ],
            "v{n}",
        ),
    );
    origin.on("/c/plain", Act::Answer(200, "v{n}"));
    let (lb, _) = cached(&origin, "", "");
    for path in [
        "/c/max-age",
        "/c/s-maxage",
        "/c/expires",
        "/c/surrogate",
        "/c/last-modified",
    ] {
        assert_stored(&lb.url(path));
    }
    // No freshness stated, no validator to guess from, or a status that a
    // heuristic may not cache: not stored.
    assert_not_stored(&origin, &lb.url("/c/plain"));
    assert_not_stored(&origin, &lb.url("/c/redirect-last-modified"));
}

// 4. Expires is judged against Date, not against the balancer's clock.

#[test]
fn expires_counts_from_the_responses_date() {
    let origin = Origin::start();
    let with = |headers: Vec<(&'static str, &'static str)>| Act::With(200, headers, "v{n}");
    // Expires before Date: stale on arrival, though later than now.
    origin.on(
        "/c/before-date",
        with(vec![("date", date(600)), ("expires", date(300))]),
    );
    // The origin's clock ten minutes slow: Expires - Date is 5 minutes,
    // though Expires is already past by ours.
    origin.on(
        "/c/slow-clock",
        with(vec![("date", date(-600)), ("expires", date(-300))]),
    );
    // Ten minutes fast: Expires - Date is 5 minutes.
    origin.on(
        "/c/fast-clock",
        with(vec![("date", date(600)), ("expires", date(900))]),
    );
    origin.on(
        "/c/unreadable",
        with(vec![("date", date(0)), ("expires", "0")]),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    assert_not_stored(&origin, &lb.url("/c/before-date"));
    assert_not_stored(&origin, &lb.url("/c/unreadable"));
    for path in ["/c/slow-clock", "/c/fast-clock"] {
        let hits = assert_stored(&lb.url(path));
        for hit in &hits {
            assert!(age(hit) < 5, "counted from arrival, not from Date: {hit:?}");
        }
    }
}

// 3. Age.

#[test]
fn the_age_from_upstream_counts_and_grows() {
    let origin = Origin::start();
    let sent_date = date(-30);
    origin.on(
        "/c/max-age",
        Act::With(
            200,
            vec![
                ("cache-control", "max-age=60"),
                ("age", "30"),
                ("date", sent_date),
            ],
            "v{n}",
        ),
    );
    origin.on(
        "/c/expires",
        Act::With(
            200,
            vec![("date", sent_date), ("expires", date(30)), ("age", "30")],
            "v{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    for path in ["/c/max-age", "/c/expires"] {
        let url = lb.url(path);
        let hits = assert_stored(&url);
        for hit in &hits {
            assert!(
                (30..33).contains(&age(hit)),
                "{path}: Age starts from the origin's 30: {hit:?}"
            );
        }
        // The Age is counted in seconds: a second of storage is what is tested.
        std::thread::sleep(Duration::from_millis(1100));
        for later in both_paths(&url) {
            assert_eq!(cache_status(&later), "HIT", "{path}: {later:?}");
            assert!(
                age(&later) > age(&hits[0]),
                "{path}: the Age grows while stored: {:?} then {later:?}",
                hits[0]
            );
        }
    }
}

#[test]
fn an_age_beyond_the_lifetime_or_whose_first_member_is_unreadable_is_stale() {
    let origin = Origin::start();
    origin.on(
        "/c/older-than-max-age",
        Act::With(
            200,
            vec![("cache-control", "max-age=60"), ("age", "100")],
            "v{n}",
        ),
    );
    origin.on(
        "/c/older-than-expires",
        Act::With(
            200,
            vec![("date", date(0)), ("expires", date(60)), ("age", "100")],
            "v{n}",
        ),
    );
    let bad_ages: [Vec<&'static str>; 6] = [
        vec!["abc"],
        vec!["-1"],
        vec!["1.5"],
        vec!["old, 0"],
        vec!["1;a=b"],
        vec!["abc", "0"],
    ];
    for (i, ages) in bad_ages.iter().enumerate() {
        let mut headers = vec![("cache-control", "max-age=60")];
        headers.extend(ages.iter().map(|a| ("age", *a)));
        origin.on(&format!("/c/bad-age/{i}"), Act::With(200, headers, "v{n}"));
    }
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    assert_not_stored(&origin, &lb.url("/c/older-than-max-age"));
    assert_not_stored(&origin, &lb.url("/c/older-than-expires"));
    for (i, ages) in bad_ages.iter().enumerate() {
        let url = lb.url(&format!("/c/bad-age/{i}"));
        let first = get(&url).unwrap();
        let second = get(&url).unwrap();
        assert_ne!(
            cache_status(&second),
            "HIT",
            "Age {ages:?}: {first:?} {second:?}"
        );
    }
}

// Issue 28, 3: an Age list counts by its first member.

#[test]
fn an_age_list_counts_by_its_first_member() {
    let origin = Origin::start();
    let with_ages = |ages: &[&'static str]| {
        let mut headers = vec![("cache-control", "max-age=3600")];
        headers.extend(ages.iter().map(|a| ("age", *a)));
        Act::With(200, headers, "v{n}")
    };
    origin.on("/c/age/young-first/", with_ages(&["0,7200"]));
    origin.on("/c/age/young-first-line/", with_ages(&["0", "7200"]));
    origin.on("/c/age/old-first/", with_ages(&["7200, 0"]));
    let (lb, _) = cached_with(&origin, H2C, "", "");
    for proto in PROTOS {
        for young in ["young-first", "young-first-line"] {
            let path = format!("/c/age/{young}/{}", proto.tag());
            let first = proto.get(&lb, &path, &[]);
            for headers in [&[][..], &[FULL_PATH]] {
                let hit = proto.get(&lb, &path, headers);
                assert_eq!(
                    (cache_status(&hit), &hit.body),
                    ("HIT", &first.body),
                    "{proto:?} {path} {headers:?}: Age 0 is fresh for max-age=3600"
                );
                assert!(age(&hit) < 60, "{proto:?} {path}: counted from 0: {hit:?}");
            }
        }
        // 7200 first: older than max-age=3600 on arrival.
        let path = format!("/c/age/old-first/{}", proto.tag());
        proto.get(&lb, &path, &[]);
        let again = proto.get(&lb, &path, &[]);
        assert_ne!(cache_status(&again), "HIT", "{proto:?}: {again:?}");
        assert_eq!(origin.hits(&path), 2, "{proto:?}: both reached the origin");
    }
}

// 5. Stale copies only where the origin allows them (and issue 28, 1).

#[test]
fn revalidation_directives_forbid_serving_stale_whatever_the_failure() {
    let origin = Origin::start();
    let forbidding = [
        ("must-revalidate", "max-age=1, must-revalidate"),
        ("proxy-revalidate", "max-age=1, proxy-revalidate"),
        ("no-cache", "no-cache"),
        ("s-maxage", "s-maxage=1"),
        // Allowed by the response, but under a rule with no stale window.
        ("no-window", "max-age=1"),
    ];
    let fresh = [
        ("fresh-must-revalidate", "max-age=600, must-revalidate"),
        ("fresh-proxy-revalidate", "max-age=600, proxy-revalidate"),
        ("fresh-s-maxage", "s-maxage=600"),
    ];
    let allowed = ("allowed", "max-age=1");
    let every = || forbidding.iter().chain(&fresh).chain([&allowed]);
    for (name, cc) in every() {
        origin.on(
            &format!("/c/{name}/"),
            Act::With(200, vec![("cache-control", cc), ("etag", "\"e\"")], "v{n}"),
        );
    }
    let (lb, _) = cached_with(
        &origin,
        H2C,
        "ttl = \"1h\"\nstale_while_revalidate = \"30s\"\nstale_if_error = \"5m\"\n\
         [[cache.rule]]\npath = \"/c/no-window\"\nttl = \"1h\"",
        "",
    );
    let path = |name: &str, proto: Proto| format!("/c/{name}/{}", proto.tag());
    for proto in PROTOS {
        for (name, _) in every() {
            let stored = proto.get(&lb, &path(name, proto), &[]);
            assert_eq!(cache_status(&stored), "MISS", "{stored:?}");
        }
    }
    // Expiry is what is tested: nothing to poll for.
    std::thread::sleep(Duration::from_millis(1200));
    let failures: [(&str, Option<Act>, u16); 4] = [
        ("answers 500", Some(Act::Answer(500, "failed")), 500),
        ("closes the connection unanswered", Some(Act::Drop), 504),
        ("answers bytes that are not HTTP", Some(Act::Garbage), 502),
        ("cannot be reached", None, 504),
    ];
    for (how, act, status) in failures {
        // A stopped origin sees nothing; the others see each request.
        let reachable = act.is_some();
        match act {
            Some(act) => origin.on("/c", act),
            None => origin.stop(),
        }
        for proto in PROTOS {
            for (name, cc) in forbidding {
                let path = path(name, proto);
                let asked = origin.hits(&path);
                let reply = proto.get(&lb, &path, &[]);
                assert_eq!(
                    reply.status, status,
                    "{proto:?}, {cc}, the origin {how}: the error, not a stale copy: {reply:?}"
                );
                // The body is the balancer's reason (or the origin's 500), and
                // a 504 says why it is not the stored copy.
                let reason = if status == 504 {
                    "may not be served stale"
                } else {
                    ""
                };
                assert!(
                    !reply.body.starts_with('v') && reply.body.contains(reason),
                    "{proto:?}, {cc}: {reply:?}"
                );
                if reachable {
                    assert!(
                        origin.hits(&path) > asked,
                        "{proto:?}, {cc}: the origin was asked"
                    );
                }
            }
            // A fresh copy needs no origin, whatever its directives.
            for (name, cc) in fresh {
                let hit = proto.get(&lb, &path(name, proto), &[]);
                assert_eq!(
                    (hit.status, cache_status(&hit)),
                    (200, "HIT"),
                    "{proto:?}, {cc}, the origin {how}: {hit:?}"
                );
            }
            // The rule adds staleness where the response allows it.
            let stale = proto.get(&lb, &path(allowed.0, proto), &[]);
            assert_eq!(stale.status, 200, "{proto:?}, the origin {how}: {stale:?}");
            assert!(
                ["STALE", "UPDATING"].contains(&cache_status(&stale)),
                "{proto:?}, the origin {how}: {stale:?}"
            );
        }
    }
}

// 6. Fields that are never stored; must-understand.

#[test]
fn connection_fields_are_not_stored_and_unknown_statuses_need_understanding() {
    let origin = Origin::start();
    origin.on(
        "/c/hop",
        Act::With(
            200,
            vec![
                ("cache-control", "max-age=60"),
                ("connection", "x-hop, keep-alive"),
                ("x-hop", "secret"),
                ("keep-alive", "timeout=5"),
                ("x-kept", "yes"),
            ],
            "v{n}",
        ),
    );
    origin.on(
        "/c/unknown-status",
        Act::With(
            599,
            vec![("cache-control", "max-age=60, must-understand")],
            "v{n}",
        ),
    );
    origin.on(
        "/c/known-status",
        Act::With(
            200,
            vec![("cache-control", "max-age=60, must-understand")],
            "v{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    for hit in assert_stored(&lb.url("/c/hop")) {
        assert_eq!(hit.header("x-hop"), None, "{hit:?}");
        assert_eq!(hit.header("keep-alive"), None, "{hit:?}");
        assert_eq!(hit.header("x-kept"), Some("yes"), "{hit:?}");
    }
    assert_not_stored(&origin, &lb.url("/c/unknown-status"));
    assert_stored(&lb.url("/c/known-status"));
}

// 7. Surrogate-Control.

#[test]
fn surrogate_control_speaks_to_the_balancer_and_stops_there() {
    let origin = Origin::start();
    origin.on(
        "/c/longer",
        Act::With(
            200,
            vec![
                ("surrogate-control", "max-age=60"),
                ("cache-control", "max-age=0"),
                ("date", date(0)),
                ("expires", date(-60)),
            ],
            "v{n}",
        ),
    );
    origin.on(
        "/c/shorter",
        Act::With(
            200,
            vec![
                ("surrogate-control", "max-age=1"),
                ("cache-control", "max-age=600"),
            ],
            "v{n}",
        ),
    );
    origin.on(
        "/c/no-store",
        Act::With(
            200,
            vec![
                ("surrogate-control", "no-store"),
                ("cache-control", "max-age=600"),
            ],
            "v{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    let miss = get(&lb.url("/c/longer")).unwrap();
    assert_eq!(miss.header("surrogate-control"), None, "{miss:?}");
    for hit in assert_stored(&lb.url("/c/longer")) {
        assert_eq!(hit.header("surrogate-control"), None, "{hit:?}");
        assert_eq!(
            hit.header("cache-control"),
            Some("max-age=0"),
            "what clients are told is the origin's: {hit:?}"
        );
    }
    assert_stored(&lb.url("/c/shorter"));
    let later = first_non_hit(&lb.url("/c/shorter"), Duration::from_secs(3));
    assert_eq!(cache_status(&later), "EXPIRED", "{later:?}");
    assert_not_stored(&origin, &lb.url("/c/no-store"));
}

// 2. Unsafe methods invalidate.

#[test]
fn unsafe_methods_invalidate_the_target_and_its_locations() {
    let origin = Origin::start();
    let fresh = Act::With(200, vec![("cache-control", "max-age=600")], "v{n}");
    origin.on("/c", fresh.clone());
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    for method in ["POST", "PUT", "DELETE", "M-SEARCH", "PATCH"] {
        let url = lb.url("/c/target?q=1");
        assert_stored(&url);
        let answer = request(method, &url, &[]).unwrap();
        assert_eq!(answer.status, 200, "{method}: {answer:?}");
        assert_eq!(
            cache_status(&get(&url).unwrap()),
            "MISS",
            "after a {method} answered 200"
        );
    }
    // Variants go too.
    origin.on(
        "/c/varied",
        Act::With(
            200,
            vec![
                ("cache-control", "max-age=600"),
                ("vary", "accept-language"),
            ],
            "v{n}",
        ),
    );
    let varied = lb.url("/c/varied");
    for lang in ["en", "fr"] {
        get_with(&varied, &[("accept-language", lang)]).unwrap();
        assert_eq!(
            cache_status(&get_with(&varied, &[("accept-language", lang)]).unwrap()),
            "HIT"
        );
    }
    request("POST", &varied, &[]).unwrap();
    for lang in ["en", "fr"] {
        assert_eq!(
            cache_status(&get_with(&varied, &[("accept-language", lang)]).unwrap()),
            "MISS",
            "{lang}"
        );
    }
    // Location and Content-Location on the same host go; another host's do not.
    for path in ["/c/location", "/c/content-location", "/c/elsewhere"] {
        assert_stored(&lb.url(path));
    }
    let same_host_location: &'static str =
        Box::leak(lb.url("/c/content-location").into_boxed_str());
    origin.on(
        "/c/form",
        Act::With(
            201,
            vec![
                ("location", "/c/location"),
                ("content-location", same_host_location),
            ],
            "created",
        ),
    );
    origin.on(
        "/c/form-elsewhere",
        Act::With(
            303,
            vec![("location", "http://other.test/c/elsewhere")],
            "see other",
        ),
    );
    Client::default()
        .request("POST", &lb.url("/c/form"), &[])
        .unwrap();
    Client::default()
        .request("POST", &lb.url("/c/form-elsewhere"), &[])
        .unwrap();
    assert_eq!(cache_status(&get(&lb.url("/c/location")).unwrap()), "MISS");
    assert_eq!(
        cache_status(&get(&lb.url("/c/content-location")).unwrap()),
        "MISS"
    );
    assert_eq!(cache_status(&get(&lb.url("/c/elsewhere")).unwrap()), "HIT");
}

#[test]
fn error_answers_to_unsafe_methods_invalidate_nothing() {
    let origin = Origin::start();
    origin.on(
        "/c",
        Act::With(200, vec![("cache-control", "max-age=600")], "v{n}"),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    let url = lb.url("/c/target");
    assert_stored(&url);
    for code in [403, 404, 500, 503] {
        origin.on("/c", Act::Answer(code, "no"));
        let answer = request("POST", &url, &[]).unwrap();
        assert_eq!(answer.status, code);
        assert_eq!(
            cache_status(&get(&url).unwrap()),
            "HIT",
            "a POST answered {code} leaves the entry"
        );
    }
}

// 1. A 304 updates the stored response.

#[test]
fn a_304_replaces_the_stored_fields() {
    let origin = Origin::start();
    origin.on(
        "/c",
        Act::Exact(
            200,
            vec![
                ("content-type", "text/plain"),
                ("etag", "\"v1\""),
                ("cache-control", "max-age=1"),
                ("content-location", "/c/old"),
                ("content-security-policy", "default-src 'none'"),
                ("x-frame-options", "DENY"),
                ("test-header", "old"),
                ("x-custom", "old"),
            ],
            "body-{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    let url = lb.url("/c/r");
    let first = get(&url).unwrap();
    // Untouched while it goes stale: the first request after is the one tested.
    std::thread::sleep(Duration::from_millis(1200));
    let new_date = date(-5);
    let new_expires = date(3600);
    origin.on(
        "/c",
        Act::Exact(
            304,
            vec![
                ("content-type", "text/html"),
                ("etag", "\"v1\""),
                ("cache-control", "max-age=60"),
                ("date", new_date),
                ("expires", new_expires),
                ("content-location", "/c/new"),
                ("content-security-policy", "default-src 'self'"),
                ("x-frame-options", "SAMEORIGIN"),
                ("test-header", "new"),
                ("x-custom", "new"),
            ],
            "",
        ),
    );
    let revalidated = get(&url).unwrap();
    assert_eq!(
        (cache_status(&revalidated), revalidated.body.as_str()),
        ("REVALIDATED", first.body.as_str())
    );
    let expected = [
        ("content-type", "text/html"),
        ("cache-control", "max-age=60"),
        ("expires", new_expires),
        ("content-location", "/c/new"),
        ("content-security-policy", "default-src 'self'"),
        ("x-frame-options", "SAMEORIGIN"),
        ("test-header", "new"),
        ("x-custom", "new"),
    ];
    let body_length = first.body.len().to_string();
    for (hit, way) in
        [revalidated]
            .into_iter()
            .chain(both_paths(&url))
            .zip(["revalidated", "fast", "full"])
    {
        if way != "revalidated" {
            assert_eq!(
                cache_status(&hit),
                "HIT",
                "fresh again for the 304's max-age"
            );
        }
        for (name, value) in expected {
            assert_eq!(hit.header(name), Some(value), "{way}: {name} in {hit:?}");
        }
        assert_eq!(hit.body, first.body, "{way}");
        if let Some(length) = hit.header("content-length") {
            assert_eq!(
                length, body_length,
                "{way}: the 304's length is not the body's"
            );
        }
    }
}

// Issue 28, 2: what a 304 may not change, and Set-Cookie in it.

#[test]
fn a_304_leaves_what_the_body_depends_on_and_brings_set_cookie() {
    let origin = Origin::start();
    // Two rules: /c does not store Set-Cookie (the default), /c/keep does.
    let (lb, _) = cached_with(
        &origin,
        H2C,
        "ttl = \"1h\"\n[[cache.rule]]\npath = \"/c/keep\"\nttl = \"1h\"\nstore_set_cookie = true",
        "",
    );
    let stored_200 = Act::Exact(
        200,
        vec![
            ("content-type", "text/plain"),
            ("content-encoding", "gzip"),
            ("content-md5", "c3RvcmVk"),
            ("etag", "\"v1\""),
            ("cache-control", "max-age=1"),
        ],
        "body-{n}",
    );
    let not_modified = |cookie: bool, mark: &'static str| {
        let mut headers = vec![
            ("content-encoding", "br"),
            ("content-range", "bytes 0-1/2"),
            ("content-md5", "bmV3"),
            ("etag", "\"v2\""),
            ("cache-control", "max-age=600"),
            ("x-mark", mark),
        ];
        if cookie {
            headers.push(("set-cookie", "seen=yes; Path=/"));
        }
        Act::Exact(304, headers, "")
    };
    for proto in PROTOS {
        for rule in ["keep", "plain"] {
            let path = format!("/c/{rule}/{}", proto.tag());
            origin.on(&path, stored_200.clone());
            let first = proto.get(&lb, &path, &[]);
            assert_eq!(cache_status(&first), "MISS", "{proto:?} {path}: {first:?}");
            // Expiry is what is tested: nothing to poll for.
            std::thread::sleep(Duration::from_millis(1200));
            origin.on(&path, not_modified(true, "first"));
            let revalidated = proto.get(&lb, &path, &[]);
            let seen = origin.seen();
            let asked = seen.iter().rev().find(|s| s.path == path).unwrap();
            assert_eq!(asked.header("if-none-match"), Some("\"v1\""), "{asked:?}");
            assert_eq!(
                (cache_status(&revalidated), &revalidated.body),
                ("REVALIDATED", &first.body),
                "{proto:?} {path}"
            );
            let later: Vec<Reply> = if rule == "keep" {
                vec![
                    proto.get(&lb, &path, &[]),
                    proto.get(&lb, &path, &[FULL_PATH]),
                ]
            } else {
                Vec::new()
            };
            for reply in std::iter::once(&revalidated).chain(&later) {
                let what = format!("{proto:?} {path}: {reply:?}");
                assert_eq!(reply.header("x-mark"), Some("first"), "{what}");
                assert_eq!(reply.header("cache-control"), Some("max-age=600"), "{what}");
                assert_eq!(
                    reply.header("set-cookie"),
                    Some("seen=yes; Path=/"),
                    "{what}"
                );
                // What the stored body depends on stays as stored.
                assert_eq!(reply.header("content-encoding"), Some("gzip"), "{what}");
                assert_eq!(reply.header("content-md5"), Some("c3RvcmVk"), "{what}");
                assert_eq!(reply.header("etag"), Some("\"v1\""), "{what}");
                assert_eq!(reply.header("content-range"), None, "{what}");
                assert_eq!(reply.status, 200, "{what}");
                assert_eq!(reply.body, first.body, "{what}");
                if let Some(length) = reply.header("content-length") {
                    assert_eq!(length, first.body.len().to_string(), "{what}");
                }
            }
            for hit in &later {
                assert_eq!(cache_status(hit), "HIT", "{proto:?} {path}: {hit:?}");
            }
            if rule == "plain" {
                // The 304 with a cookie was passed on, not stored: the copy
                // is still the expired one, revalidated again.
                origin.on(&path, not_modified(false, "second"));
                let again = proto.get(&lb, &path, &[]);
                assert_eq!(
                    (cache_status(&again), again.header("set-cookie")),
                    ("REVALIDATED", None),
                    "{proto:?} {path}: {again:?}"
                );
                assert_eq!(again.header("x-mark"), Some("second"), "{again:?}");
                assert_eq!(origin.hits(&path), 3, "{proto:?} {path}");
                for hit in [
                    proto.get(&lb, &path, &[]),
                    proto.get(&lb, &path, &[FULL_PATH]),
                ] {
                    assert_eq!(
                        (
                            cache_status(&hit),
                            hit.header("set-cookie"),
                            hit.header("x-mark")
                        ),
                        ("HIT", None, Some("second")),
                        "{proto:?} {path}: {hit:?}"
                    );
                }
            }
        }
    }
}

// Issue 28, 4: Set-Cookie is stored only where a rule says so.

#[test]
fn set_cookie_is_stored_only_under_store_set_cookie() {
    let origin = Origin::start();
    let cookie = "theme=dark; Path=/";
    origin.on(
        "/c/",
        Act::With(
            200,
            vec![("cache-control", "max-age=600"), ("set-cookie", cookie)],
            "v{n}",
        ),
    );
    origin.on(
        "/c/keep/private/",
        Act::With(
            200,
            vec![
                ("cache-control", "max-age=600, private=\"set-cookie\""),
                ("set-cookie", cookie),
            ],
            "v{n}",
        ),
    );
    let (lb, _) = cached_with(
        &origin,
        H2C,
        "ttl = \"1h\"\n[[cache.rule]]\npath = \"/c/keep\"\nttl = \"1h\"\nstore_set_cookie = true",
        "",
    );
    for proto in PROTOS {
        // The default: never stored, the cookie reaches each client.
        let path = format!("/c/plain/{}", proto.tag());
        for headers in [&[][..], &[], &[FULL_PATH]] {
            let reply = proto.get(&lb, &path, headers);
            assert_ne!(cache_status(&reply), "HIT", "{proto:?} {path}: {reply:?}");
            assert_eq!(reply.header("set-cookie"), Some(cookie), "{reply:?}");
        }
        assert_eq!(
            origin.hits(&path),
            3,
            "{proto:?}: every request reached the origin"
        );
        // store_set_cookie: stored with the cookie, which every hit carries.
        let path = format!("/c/keep/{}", proto.tag());
        let first = proto.get(&lb, &path, &[]);
        assert_eq!(
            (cache_status(&first), first.header("set-cookie")),
            ("MISS", Some(cookie)),
            "{proto:?}: {first:?}"
        );
        for headers in [&[][..], &[FULL_PATH]] {
            let hit = proto.get(&lb, &path, headers);
            assert_eq!(
                (cache_status(&hit), hit.header("set-cookie"), &hit.body),
                ("HIT", Some(cookie), &first.body),
                "{proto:?} {headers:?}: {hit:?}"
            );
        }
        // ... unless the origin keeps the cookie out: private="set-cookie".
        let path = format!("/c/keep/private/{}", proto.tag());
        let first = proto.get(&lb, &path, &[]);
        assert_eq!(first.header("set-cookie"), Some(cookie), "{first:?}");
        for headers in [&[][..], &[FULL_PATH]] {
            let hit = proto.get(&lb, &path, headers);
            assert_eq!(
                (cache_status(&hit), hit.header("set-cookie")),
                ("HIT", None),
                "{proto:?} {headers:?}: {hit:?}"
            );
        }
    }
}

// Both ways of serving a hit say the same.

#[test]
fn the_fast_and_the_full_path_serve_the_same_fields() {
    let origin = Origin::start();
    origin.on(
        "/c",
        Act::With(
            200,
            vec![
                ("cache-control", "max-age=600"),
                ("etag", "\"e\""),
                ("last-modified", date(-3600)),
                ("date", date(0)),
                ("x-custom", "1"),
            ],
            "v{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"\nclient_max_age = \"20s\"", "");
    let [fast, full] = assert_stored(&lb.url("/c/same"));
    let fields = |r: &Reply| {
        let mut names: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            // These differ from one reply to the next by nature.
            .filter(|(n, _)| !["age", "x-request-id", "expires"].contains(&n.as_str()))
            .collect();
        names.sort();
        names
    };
    assert_eq!(fields(&fast), fields(&full));
    for name in ["age", "x-request-id", "expires"] {
        assert!(
            fast.header(name).is_some() && full.header(name).is_some(),
            "{name}"
        );
    }
}

// 9. The size bound holds at insertion.

#[test]
fn the_size_bound_holds_when_an_insert_returns() {
    let origin = Origin::start();
    let big: &'static str = Box::leak("x".repeat(900 << 10).into_boxed_str());
    origin.on("/c", Act::Answer(200, big));
    let (lb, admin) = cached(
        &origin,
        "ttl = \"1h\"",
        "max_size = \"8MiB\"\nmax_object_size = \"1MiB\"",
    );
    for i in 0..12 {
        get(&lb.url(&format!("/c/{i}"))).unwrap();
        let stored = status_of(admin)["cache"]["stored_bytes"].as_u64().unwrap();
        assert!(stored <= 8 << 20, "{stored} bytes held after insert {i}");
    }
    for i in 0..3 {
        let oldest = get(&lb.url(&format!("/c/{i}"))).unwrap();
        assert_eq!(
            cache_status(&oldest),
            "MISS",
            "/c/{i} was evicted when the cache filled: {:?}",
            oldest.headers
        );
    }
}

fn status_of(admin: u16) -> serde_json::Value {
    support::status(admin)
}
