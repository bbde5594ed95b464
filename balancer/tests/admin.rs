//! Operating the balancer: metrics and status after a known sequence of
//! requests, the status page in a real browser (from the admin listener, and
//! over HTTPS through a route with the test CA trusted), JSON access logs,
//! and a graceful stop under load.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

/// The `/status` entry of `address`, once it has been resolved.
fn try_address(status: &serde_json::Value, address: &str) -> Option<serde_json::Value> {
    status["upstreams"]
        .as_array()?
        .iter()
        .flat_map(|u| u["addresses"].as_array().cloned().unwrap_or_default())
        .find(|a| a["address"] == address)
}

fn address(status: &serde_json::Value, address: &str) -> serde_json::Value {
    try_address(status, address).unwrap_or_else(|| panic!("{address} not in {status}"))
}

fn config(admin: u16, servers: &[u16], checks: bool) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    // A dead backend is found by a refused connect at once; the timeout is
    // long so that a live one, slow on a busy machine, is not taken out.
    let checks = if checks {
        "[upstream.health_check]\ninterval = \"200ms\"\ntimeout = \"2s\"\nunhealthy_threshold = 1\n"
    } else {
        ""
    };
    format!(
        "admin_listen = \"127.0.0.1:{admin}\"\n[upstream]\nservers = [{}]\n{checks}\
         [cache]\n[[cache.rule]]\npath = \"/cache-me\"\nttl = \"30s\"\n",
        list.join(", ")
    )
}

#[test]
fn metrics_and_status_follow_a_known_sequence() {
    let (pa, pb) = (free_port(), free_port());
    let _a = start_backend("a", pa);
    let mut b = start_backend("b", pb);
    let admin = free_port();
    let lb = start_balancer(&config(admin, &[pa, pb], true));
    let (a, b_addr) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    wait_for(Duration::from_secs(10), "both backends healthy", || {
        let s = status(admin);
        let healthy = |addr: &str| try_address(&s, addr).is_some_and(|e| e["healthy"] == true);
        (healthy(&a) && healthy(&b_addr)).then_some(())
    });
    let before = scrape(admin);
    let requests = |upstream: &str, class: &str| {
        format!("balancer_requests_total{{method=\"GET\",route=\"none\",status_class=\"{class}\",upstream=\"{upstream}\"}}")
    };
    let attempts = |backend: &str| {
        format!("balancer_upstream_requests_total{{backend=\"{backend}\",server=\"{backend}\",upstream=\"default\"}}")
    };
    let delta = |after: &str, series: &str| sample(after, series) - sample(&before, series);

    for _ in 0..4 {
        assert_eq!(get(&lb.url("/")).unwrap().status, 200);
    }
    let statuses: Vec<String> = (0..3)
        .map(|_| {
            get(&lb.url("/cache-me"))
                .unwrap()
                .header("x-cache-status")
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(statuses, ["MISS", "HIT", "HIT"]);
    b.kill();
    wait_for(Duration::from_secs(10), "b marked down", || {
        try_address(&status(admin), &b_addr)
            .filter(|e| e["healthy"] == false)
            .map(|_| ())
    });
    for _ in 0..2 {
        assert_eq!(get(&lb.url("/")).unwrap().status, 200);
    }
    assert_eq!(get(&lb.url("/nowhere")).unwrap().status, 404);

    // Requests are counted as they are logged, just after their response is sent.
    let after = wait_for(Duration::from_secs(5), "all ten requests counted", || {
        let after = scrape(admin);
        (delta(&after, "balancer_request_duration_seconds_count") >= 10.0).then_some(after)
    });
    assert_eq!(
        delta(&after, &requests("default", "2xx")),
        7.0,
        "4 + 1 miss + 2 after the kill:\n{after}"
    );
    let to_a = delta(&after, &attempts(&a));
    let to_b = delta(&after, &attempts(&b_addr));
    assert_eq!(to_a + to_b, 8.0, "7 and the 404:\n{after}");
    assert!(to_a >= 4.0 && to_b >= 2.0, "a {to_a}, b {to_b}");
    assert_eq!(
        delta(&after, &requests("none", "2xx")),
        2.0,
        "cache hits reach no upstream"
    );
    assert_eq!(delta(&after, &requests("default", "4xx")), 1.0);
    assert_eq!(
        delta(&after, "balancer_request_duration_seconds_count"),
        10.0
    );
    assert!(
        delta(
            &after,
            "balancer_upstream_duration_seconds_count{upstream=\"default\"}"
        ) >= 7.0
    );
    assert_eq!(
        sample(
            &after,
            &format!(
                "balancer_upstream_healthy{{backend=\"{a}\",server=\"{a}\",upstream=\"default\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            &format!("balancer_upstream_healthy{{backend=\"{b_addr}\",server=\"{b_addr}\",upstream=\"default\"}}")
        ),
        0.0
    );
    assert!(sample(&after, &format!("balancer_upstream_consecutive_failures{{backend=\"{b_addr}\",server=\"{b_addr}\",upstream=\"default\"}}")) >= 1.0);
    assert_eq!(
        sample(
            &after,
            &format!("balancer_upstream_in_flight_requests{{backend=\"{a}\",server=\"{a}\",upstream=\"default\"}}")
        ),
        0.0
    );
    assert_eq!(
        delta(&after, "balancer_cache_responses_total{outcome=\"hit\"}"),
        2.0
    );
    assert_eq!(
        delta(&after, "balancer_cache_responses_total{outcome=\"miss\"}"),
        1.0
    );
    assert!(sample(&after, "balancer_cache_stored_bytes") > 0.0);
    assert_eq!(sample(&after, "balancer_cache_evictions_total"), 0.0);
    assert_eq!(
        sample(&after, "balancer_config_reloads_total{result=\"ok\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &after,
            &format!(
                "balancer_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );

    let s = status(admin);
    assert_eq!(s["config"]["path"], lb.config.display().to_string());
    assert!(s["config"]["loaded_at"].as_str().unwrap().ends_with("GMT"));
    let down = address(&s, &b_addr);
    assert_eq!(down["last_check"]["ok"], false);
    assert!(
        down["last_check"]["error"]
            .as_str()
            .unwrap()
            .contains("onnect"),
        "{down}"
    );
    let up = address(&s, &a);
    assert_eq!(up["last_check"]["ok"], true);
    assert!(up["requests"].as_u64().unwrap() >= 4);
    assert_eq!(s["cache"]["hits"], 2);
    assert_eq!(s["cache"]["misses"], 1);
    assert_eq!(s["upstreams"][0]["name"], a);

    // A reload shows up in both.
    lb.rewrite(&config(admin, &[pa], true));
    lb.wait_for_log("upstream.servers removed");
    wait_for(Duration::from_secs(5), "the reload counted", || {
        (sample(
            &scrape(admin),
            "balancer_config_reloads_total{result=\"ok\"}",
        ) == 1.0)
            .then_some(())
    });
    assert_eq!(status(admin)["config"]["reloads_succeeded"], 1);
}

#[test]
fn a_failed_connect_is_counted_as_a_retry() {
    let pa = free_port();
    let _a = start_backend("a", pa);
    let dead = free_port();
    let admin = free_port();
    let lb = start_balancer(&config(admin, &[pa, dead], false));
    wait_for(Duration::from_secs(10), "the balancer", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
    let before = sample(&scrape(admin), "balancer_retries_total");
    for _ in 0..6 {
        assert_eq!(
            get(&lb.url("/")).unwrap().status,
            200,
            "retried on the live backend"
        );
    }
    let retries = sample(&scrape(admin), "balancer_retries_total") - before;
    assert!((2.0..=6.0).contains(&retries), "{retries} retries");
}

#[test]
fn the_access_log_can_be_json() {
    let origin = Origin::start();
    let lb = start_balancer(&format!(
        "log_format = \"json\"\n[upstream]\nservers = [\"127.0.0.1:{}\"]\n[cache]\n[[cache.rule]]\npath = \"/c\"\nttl = \"30s\"\n",
        origin.port
    ));
    wait_for(Duration::from_secs(10), "the origin", || {
        get(&lb.url("/c")).ok().filter(|r| r.status == 200)
    });
    get(&lb.url("/c?second")).unwrap();
    get(&lb.url("/c?second")).unwrap();
    let line = lb.wait_for_log("\"cache\":\"HIT\"");
    let json: serde_json::Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(json["uri"], "/c?second");
    assert_eq!(json["status"], 200);
    assert_eq!(json["retries"], 0);
    assert_eq!(json["method"], "GET");
    assert!(json["time"].as_f64().is_some());
    assert_eq!(json["client"], "127.0.0.1");
}

/// The rows of the status page's upstream table in the DOM Chromium rendered.
fn backend_rows(dom: &str) -> Vec<&str> {
    dom.split("<tr class=\"backend\"").skip(1).collect()
}

/// The row of the status page's upstream table for `address`.
fn backend_row<'a>(dom: &'a str, address: &str) -> &'a str {
    backend_rows(dom)
        .into_iter()
        .find(|r| r.contains(&format!("data-address=\"{address}\"")))
        .unwrap_or_else(|| panic!("no row for {address} in the rendered table:\n{dom}"))
}

/// Asserts that the rendered status page shows `live` healthy and `dead` down.
fn assert_health_shown(dom: &str, live: &str, dead: &str) {
    let live = backend_row(dom, live);
    assert!(
        live.contains("data-healthy=\"true\"") && live.contains("class=\"health up\""),
        "the live backend shown healthy: {live}"
    );
    let dead = backend_row(dom, dead);
    assert!(
        dead.contains("data-healthy=\"false\"") && dead.contains("class=\"health down\""),
        "the dead backend shown down: {dead}"
    );
}

/// Waits until `/status` has checked `live` healthy and `dead` down.
fn wait_for_health(admin: u16, live: &str, dead: &str) {
    wait_for(Duration::from_secs(10), "one backend up, one down", || {
        let s = status(admin);
        let healthy = |a: &str| try_address(&s, a).map(|e| e["healthy"] == true);
        (healthy(live) == Some(true) && healthy(dead) == Some(false)).then_some(())
    });
}

#[test]
fn the_status_page_shows_the_upstreams_in_a_real_browser() {
    let browser = Browser::new();
    let (pa, dead) = (free_port(), free_port());
    let _a = start_backend("a", pa);
    let admin = free_port();
    let routes = "[[route]]\nname = \"maintenance\"\npath = \"/old/\"\nrespond = { status = 503, body = \"gone\" }\n";
    let lb = start_balancer(&format!("{}{routes}", config(admin, &[pa, dead], true)));
    wait_for(Duration::from_secs(10), "the live backend admitted", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
    for _ in 0..5 {
        get(&lb.url("/")).unwrap();
        get(&lb.url("/cache-me")).unwrap();
    }
    let page = format!("http://127.0.0.1:{admin}/");
    let dom = browser.load(&page, &["--dump-dom"]).out;
    assert_eq!(
        backend_rows(&dom).len(),
        2,
        "two upstream rows in the rendered table:\n{dom}"
    );
    let (live, dead) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{dead}"));
    assert_health_shown(&dom, &live, &dead);
    assert!(dom.contains("id=\"hit-ratio\">80 %<"), "4 hits of 5: {dom}");
    assert!(
        backend_row(&dom, &live).contains("<td>default (round_robin)</td>"),
        "the group and its algorithm: {dom}"
    );
    let route = dom
        .split("<tr class=\"route\" data-route=\"maintenance\">")
        .nth(1)
        .unwrap_or_else(|| panic!("a row for the route: {dom}"));
    assert!(
        route.starts_with(
            "<td>maintenance</td><td>any</td><td>/old/</td><td>any</td><td>respond 503</td>"
        ),
        "the route's row: {route}"
    );
    assert!(dom.contains("class=\"bar-row\""), "the bar chart is drawn");
    assert!(
        dom.contains(" / 4096</div>"),
        "open client connections of max_connections: {dom}"
    );

    let shot: PathBuf = std::env::temp_dir().join("balancer-status-page.png");
    let _ = std::fs::remove_file(&shot);
    browser.load(
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,700",
            "--hide-scrollbars",
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// The README's way to the status page over HTTPS: a route on the TLS
/// listener sends a host name to the admin listener, an upstream like any other.
#[test]
fn the_status_page_over_https_renders_with_the_test_ca_trusted_and_not_without_it() {
    let pki = Pki::new(&["status.localhost"]);
    let (pa, dead) = (free_port(), free_port());
    let _a = start_backend("a", pa);
    let (admin, tls) = (free_port(), free_port());
    let lb = start_balancer(&format!(
        "{}[upstreams.admin]\nservers = [\"127.0.0.1:{admin}\"]\n\
         [[route]]\nname = \"status\"\nhost = \"status.localhost\"\nmethods = [\"GET\"]\nupstream = \"admin\"\n\
         [tls]\nlisten = \"127.0.0.1:{tls}\"\ncertificate = {}\nprivate_key = {}\n",
        config(admin, &[pa, dead], true),
        toml_path(&pki.cert),
        toml_path(&pki.key),
    ));
    let (live, dead) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{dead}"));
    wait_for_health(admin, &live, &dead);
    wait_for(Duration::from_secs(10), "the TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", tls)).ok()
    });
    // Chromium resolves every *.localhost name to loopback by itself.
    let page = format!("https://status.localhost:{tls}/");
    let through_the_route = || {
        let log = lb.proc.log_text();
        log.lines()
            .filter(|l| l.contains("\"GET /status HTTP/2+TLS\" 200") && l.contains("route=status"))
            .count()
    };

    let untrusting = Browser::trusting(&[]).load(&page, &["--dump-dom"]);
    assert!(
        untrusting.log.contains("ERR_CERT_AUTHORITY_INVALID"),
        "without the CA the certificate is refused as from an unknown issuer: {}",
        untrusting.log
    );
    assert!(
        backend_rows(&untrusting.out).is_empty() && !untrusting.out.contains("data-route"),
        "nothing of /status rendered without the CA:\n{}",
        untrusting.out
    );
    assert_eq!(through_the_route(), 0, "no /status fetched without the CA");

    let dom = Browser::trusting(&[&pki.ca])
        .load(&page, &["--dump-dom"])
        .out;
    assert_eq!(
        backend_rows(&dom).len(),
        3,
        "the default group's two backends and the admin listener:\n{dom}"
    );
    assert_health_shown(&dom, &live, &dead);
    assert!(
        dom.contains("<tr class=\"route\" data-route=\"status\"><td>status</td><td>status.localhost</td><td>/</td><td>GET</td><td>upstream admin</td>"),
        "the route's row: {dom}"
    );
    // The admin listener, seen as a backend of the route, had a request in
    // flight when it answered /status: the page's own fetch, over HTTPS.
    let admin_row = backend_row(&dom, &format!("127.0.0.1:{admin}"));
    let numbers: Vec<u64> = admin_row
        .split("<td class=\"num\">")
        .skip(1)
        .filter_map(|cell| cell.split('<').next()?.parse().ok())
        .collect();
    assert!(
        matches!(numbers[..], [requests, in_flight] if requests >= 1 && in_flight >= 1),
        "the admin listener's row counts the page's requests, /status in flight: {admin_row}"
    );
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "no fetch failed: {dom}"
    );
    // Access-log lines are written in batches, a moment after their request.
    wait_for(
        Duration::from_secs(5),
        "the access-log line of /status over TLS through the route",
        || (through_the_route() >= 1).then_some(()),
    );
}
