//! The response cache, through a real balancer in front of an origin whose
//! answers, headers, delays and failures the test controls.

mod support;

use std::time::Duration;

use support::*;

fn admin_status(admin: u16) -> serde_json::Value {
    let r = get(&format!("http://127.0.0.1:{admin}/status")).unwrap();
    serde_json::from_str(&r.body).unwrap()
}

#[test]
fn miss_then_hit_with_the_same_body_and_an_age() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    let (lb, _) = cached(&origin, "ttl = \"30s\"\nclient_max_age = \"20s\"", "");
    let first = get(&lb.url("/c/x")).unwrap();
    let second = get(&lb.url("/c/x")).unwrap();
    assert_eq!(
        (cache_status(&first), cache_status(&second)),
        ("MISS", "HIT")
    );
    assert_eq!(first.body, second.body);
    assert_eq!(origin.hits("/c/x"), 1);
    assert!(
        second.header("age").is_some(),
        "a hit carries Age: {second:?}"
    );
    assert_eq!(
        second.header("cache-control"),
        Some("max-age=20"),
        "clients are told client_max_age"
    );
    assert!(second.header("expires").is_some_and(|e| e.ends_with("GMT")));
    let head = request("HEAD", &lb.url("/c/x"), &[]).unwrap();
    assert_eq!(
        cache_status(&head),
        "HIT",
        "HEAD is answered from the cached GET"
    );
    assert_eq!(origin.hits("/c/x"), 1);
    // Other queries and hosts are other entries.
    assert_eq!(cache_status(&get(&lb.url("/c/x?page=2")).unwrap()), "MISS");
    assert_eq!(
        cache_status(&get_with(&lb.url("/c/x"), &[("host", "other.test")]).unwrap()),
        "MISS"
    );
    // Paths that no rule covers are untouched.
    let plain = get(&lb.url("/uncovered")).unwrap();
    assert_eq!(plain.header("x-cache-status"), None);
    get(&lb.url("/uncovered")).unwrap();
    assert_eq!(origin.hits("/uncovered"), 2);
}

#[test]
fn an_entry_expires_after_its_ttl() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    let (lb, _) = cached(&origin, "ttl = \"1s\"", "");
    let first = get(&lb.url("/c")).unwrap();
    assert_eq!(cache_status(&get(&lb.url("/c")).unwrap()), "HIT");
    let later = first_non_hit(&lb.url("/c"), Duration::from_secs(3));
    assert_eq!(cache_status(&later), "EXPIRED");
    assert_ne!(later.body, first.body, "refetched");
    assert_eq!(origin.hits("/c"), 2);
}

#[test]
fn the_origin_cache_control_wins_over_the_ttl() {
    let origin = Origin::start();
    origin.on(
        "/c/short",
        Act::With(200, vec![("cache-control", "max-age=1")], "v{n}"),
    );
    let (lb, _) = cached(&origin, "ttl = \"1h\"", "");
    get(&lb.url("/c/short")).unwrap();
    assert_eq!(cache_status(&get(&lb.url("/c/short")).unwrap()), "HIT");
    // The origin's max-age=1, within the ttl's hour.
    let later = first_non_hit(&lb.url("/c/short"), Duration::from_secs(3));
    assert_eq!(cache_status(&later), "EXPIRED");
}

#[test]
fn stale_while_revalidate_serves_the_old_body_during_one_refresh() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    let (lb, _) = cached(
        &origin,
        "ttl = \"1s\"\nstale_while_revalidate = \"30s\"",
        "",
    );
    let first = get(&lb.url("/c")).unwrap();
    // Untouched while it goes stale: the first request after is the one tested.
    std::thread::sleep(Duration::from_millis(1200));
    // The refresh is held at the origin until the five requests are answered.
    let refresh = Gate::default();
    origin.on("/c", Act::Held(refresh.clone(), 200, "v{n}"));
    let stale: Vec<Reply> = (0..5).map(|_| get(&lb.url("/c")).unwrap()).collect();
    refresh.open();
    assert_eq!(cache_status(&stale[0]), "UPDATING");
    for r in &stale {
        assert_eq!(r.body, first.body, "the old body while the refresh runs");
        assert!(
            ["UPDATING", "STALE"].contains(&cache_status(r)),
            "{}",
            cache_status(r)
        );
    }
    let fresh = wait_for(Duration::from_secs(5), "the refreshed entry", || {
        get(&lb.url("/c"))
            .ok()
            .filter(|r| cache_status(r) == "HIT" && r.body != first.body)
    });
    assert_eq!(
        origin.hits("/c"),
        2,
        "exactly one background refresh; then {:?}",
        fresh.body
    );
}

#[test]
fn stale_if_error_covers_an_origin_that_fails_or_is_down() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    let (lb, _) = cached(&origin, "ttl = \"1s\"\nstale_if_error = \"5m\"", "");
    let first = get(&lb.url("/c")).unwrap();
    // Untouched while it goes stale: the first request after is the one tested.
    std::thread::sleep(Duration::from_millis(1200));
    origin.on("/c", Act::Answer(500, "broken"));
    let on_500 = get(&lb.url("/c")).unwrap();
    assert_eq!(
        (on_500.status, cache_status(&on_500), on_500.body.as_str()),
        (200, "STALE", first.body.as_str())
    );
    origin.stop();
    let on_down = get(&lb.url("/c")).unwrap();
    assert_eq!(
        (
            on_down.status,
            cache_status(&on_down),
            on_down.body.as_str()
        ),
        (200, "STALE", first.body.as_str())
    );
    // Without a stored copy, the failure shows.
    assert_eq!(get(&lb.url("/c/never-cached")).unwrap().status, 502);
}

#[test]
fn a_hundred_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start();
    origin.on("/c", Act::Slow(Duration::from_millis(500), 200, "v{n}"));
    let (lb, _) = cached(&origin, "ttl = \"30s\"", "");
    let url = lb.url("/c/popular");
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || get(&url))
        })
        .collect();
    let replies: Vec<Reply> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.body == replies[0].body));
    assert_eq!(origin.hits("/c/popular"), 1);
}

#[test]
fn what_must_not_be_stored_is_not() {
    let origin = Origin::start();
    origin.on(
        "/c/no-store",
        Act::With(200, vec![("cache-control", "no-store")], "v{n}"),
    );
    origin.on(
        "/c/private",
        Act::With(200, vec![("cache-control", "private, max-age=60")], "v{n}"),
    );
    origin.on(
        "/c/cookie",
        Act::With(200, vec![("set-cookie", "session=1")], "v{n}"),
    );
    origin.on("/c/vary-star", Act::With(200, vec![("vary", "*")], "v{n}"));
    let (lb, _) = cached(&origin, "ttl = \"30s\"", "");
    for path in ["/c/no-store", "/c/private", "/c/cookie", "/c/vary-star"] {
        let a = get(&lb.url(path)).unwrap();
        let b = get(&lb.url(path)).unwrap();
        assert_ne!(a.body, b.body, "{path} was served from the cache");
        assert_ne!(cache_status(&b), "HIT", "{path}");
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    assert!(
        get(&lb.url("/c/cookie"))
            .unwrap()
            .header("set-cookie")
            .is_some(),
        "passed through"
    );
}

#[test]
fn authorization_is_neither_served_from_nor_stored_unless_allowed() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    origin.on(
        "/c/public",
        Act::With(200, vec![("cache-control", "public, max-age=60")], "v{n}"),
    );
    let (lb, _) = cached(&origin, "ttl = \"30s\"", "");
    let auth = [("authorization", "Bearer secret")];
    // A plain entry is not given to a request with credentials...
    let anonymous = get(&lb.url("/c/plain")).unwrap();
    let with_auth = get_with(&lb.url("/c/plain"), &auth).unwrap();
    assert_ne!(with_auth.body, anonymous.body);
    // ...and what it fetched was not stored.
    let with_auth_again = get_with(&lb.url("/c/plain"), &auth).unwrap();
    assert_ne!(with_auth_again.body, with_auth.body);
    assert_eq!(
        get(&lb.url("/c/plain")).unwrap().body,
        anonymous.body,
        "the anonymous entry is intact"
    );
    // A response that says `public` is shared.
    let a = get_with(&lb.url("/c/public"), &auth).unwrap();
    let b = get_with(&lb.url("/c/public"), &auth).unwrap();
    assert_eq!(
        (a.body.as_str(), cache_status(&b)),
        (b.body.as_str(), "HIT")
    );
}

#[test]
fn vary_keeps_variants_apart() {
    let origin = Origin::start();
    origin.on(
        "/c",
        Act::With(200, vec![("vary", "Accept-Language")], "v{n}"),
    );
    let (lb, _) = cached(&origin, "ttl = \"30s\"", "");
    let en = get_with(&lb.url("/c"), &[("accept-language", "en")]).unwrap();
    let fr = get_with(&lb.url("/c"), &[("accept-language", "fr")]).unwrap();
    assert_ne!(en.body, fr.body);
    let en2 = get_with(&lb.url("/c"), &[("accept-language", "en")]).unwrap();
    let fr2 = get_with(&lb.url("/c"), &[("accept-language", "fr")]).unwrap();
    assert_eq!(
        (en2.body.as_str(), cache_status(&en2)),
        (en.body.as_str(), "HIT")
    );
    assert_eq!(
        (fr2.body.as_str(), cache_status(&fr2)),
        (fr.body.as_str(), "HIT")
    );
    assert_eq!(origin.hits("/c"), 2);
}

#[test]
fn revalidation_with_a_validator_refreshes_instead_of_refetching() {
    let origin = Origin::start();
    origin.on(
        "/c",
        Act::With(
            200,
            vec![("etag", "\"v1\""), ("cache-control", "max-age=1")],
            "body-{n}",
        ),
    );
    let (lb, _) = cached(&origin, "ttl = \"30s\"", "");
    let first = get(&lb.url("/c")).unwrap();
    // Untouched while it goes stale: the first request after is the one tested.
    std::thread::sleep(Duration::from_millis(1200));
    origin.on(
        "/c",
        Act::With(
            304,
            vec![("etag", "\"v1\""), ("cache-control", "max-age=30")],
            "",
        ),
    );
    let revalidated = get(&lb.url("/c")).unwrap();
    assert_eq!(
        (cache_status(&revalidated), revalidated.body.as_str()),
        ("REVALIDATED", first.body.as_str())
    );
    let conditional = origin.seen().into_iter().rfind(|s| s.path == "/c").unwrap();
    assert_eq!(conditional.header("if-none-match"), Some("\"v1\""));
    assert_eq!(
        cache_status(&get(&lb.url("/c")).unwrap()),
        "HIT",
        "fresh again for max-age=30"
    );
}

#[test]
fn oversize_responses_pass_through_and_the_bound_evicts() {
    let origin = Origin::start();
    let big: &'static str = Box::leak("x".repeat(3000).into_boxed_str());
    let item: &'static str = Box::leak("i".repeat(1000).into_boxed_str());
    origin.on("/c/big", Act::Answer(200, big));
    origin.on("/c/item", Act::Answer(200, item));
    let (lb, admin) = cached(
        &origin,
        "ttl = \"30s\"",
        "max_size = \"16KiB\"\nmax_object_size = \"2KiB\"",
    );
    for _ in 0..2 {
        let r = get(&lb.url("/c/big")).unwrap();
        assert_eq!(r.body.len(), 3000, "passed through whole");
        assert_ne!(cache_status(&r), "HIT");
    }
    assert_eq!(origin.hits("/c/big"), 2);
    for i in 0..40 {
        get(&lb.url(&format!("/c/item/{i}"))).unwrap();
    }
    let cache = &admin_status(admin)["cache"];
    assert!(
        cache["stored_bytes"].as_u64().unwrap() <= 16 << 10,
        "{cache}"
    );
    assert!(cache["evictions"].as_u64().unwrap() > 0, "{cache}");
    assert_eq!(
        cache_status(&get(&lb.url("/c/item/39")).unwrap()),
        "HIT",
        "the newest entry is kept"
    );
}

#[test]
fn purge_on_the_admin_listener_only() {
    let origin = Origin::start();
    origin.on("/c", Act::Answer(200, "v{n}"));
    let (lb, admin) = cached(&origin, "ttl = \"30s\"", "");
    get(&lb.url("/c")).unwrap();
    get_with(&lb.url("/c"), &[("host", "other.test")]).unwrap();
    assert_eq!(cache_status(&get(&lb.url("/c")).unwrap()), "HIT");
    // The public listener passes PURGE to the origin like any method and purges nothing.
    request("PURGE", &lb.url("/c"), &[]).unwrap();
    assert_eq!(cache_status(&get(&lb.url("/c")).unwrap()), "HIT");
    let purged = request("PURGE", &format!("http://127.0.0.1:{admin}/c"), &[]).unwrap();
    assert_eq!(purged.status, 200, "{purged:?}");
    assert!(purged.body.contains("purged 2"), "{:?}", purged.body);
    assert_eq!(cache_status(&get(&lb.url("/c")).unwrap()), "MISS");
    let cache = &admin_status(admin)["cache"];
    assert!(
        cache["hits"].as_u64().unwrap() >= 2 && cache["misses"].as_u64().unwrap() >= 3,
        "{cache}"
    );
    let nothing = request("PURGE", &format!("http://127.0.0.1:{admin}/nothing"), &[]).unwrap();
    assert_eq!(nothing.status, 404);
}

#[test]
fn a_config_without_a_cache_section_caches_nothing() {
    let origin = Origin::start();
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{}\"]\n",
        origin.port
    ));
    origin.on("/cache-me", Act::Answer(200, "v{n}"));
    wait_for(Duration::from_secs(10), "the origin", || {
        get(&lb.url("/cache-me")).ok().filter(|r| r.status == 200)
    });
    let a = get(&lb.url("/cache-me")).unwrap();
    let b = get(&lb.url("/cache-me")).unwrap();
    assert_ne!(a.body, b.body);
    assert_eq!(a.header("x-cache-status"), None);
}
