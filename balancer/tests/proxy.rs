//! The balancer and the backend as a user runs them: real processes on
//! loopback ports, driven over HTTP.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use support::*;

fn upstream(servers: &[u16], extra: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "[upstream]\nservers = [{}]\nresolve_interval = \"1s\"\nconnect_timeout = \"1s\"\nread_timeout = \"2s\"\n{extra}",
        list.join(", ")
    )
}

const CHECKS: &str = "[upstream.health_check]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

/// Waits until every one of `names` has answered `/info` through the balancer.
fn wait_for_all(lb: &Balancer, names: &[&str]) {
    let mut seen = HashSet::new();
    wait_for(
        Duration::from_secs(10),
        &format!("replies from all of {names:?}"),
        || {
            if let Ok(r) = get(&lb.url("/info")) {
                if r.status == 200 {
                    seen.insert(container_id(&r));
                }
            }
            names.iter().all(|n| seen.contains(*n)).then_some(())
        },
    );
}

#[test]
fn requests_are_spread_round_robin_with_the_forwarded_headers() {
    let ports = [free_port(), free_port(), free_port()];
    let _b: Vec<Proc> = ["one", "two", "three"]
        .iter()
        .zip(ports)
        .map(|(n, p)| start_backend(n, p))
        .collect();
    let lb = start_balancer(&upstream(&ports, CHECKS));
    wait_for_all(&lb, &["one", "two", "three"]);

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        let r = get(&lb.url("/info")).unwrap();
        assert_eq!(r.status, 200);
        *counts.entry(container_id(&r)).or_default() += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "even turns: {counts:?}"
    );

    let r = get_with(
        &lb.url("/info"),
        &[("x-forwarded-for", "203.0.113.7"), ("host", "example.test")],
    )
    .unwrap();
    let info: BTreeMap<String, String> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        info["connecting_ip"], "127.0.0.1",
        "X-Real-IP is the client address"
    );
    assert_eq!(
        info["proxy_ip"], "203.0.113.7, 127.0.0.1",
        "X-Forwarded-For is appended to"
    );
    assert_eq!(info["host"], "example.test", "the client's Host is kept");

    assert_eq!(get(&lb.url("/")).unwrap().body, "Hello World!");
    assert_eq!(
        get(&lb.url("/nowhere")).unwrap().status,
        404,
        "the backend's own 404 passes through"
    );
}

#[test]
fn the_upstream_sees_x_forwarded_proto_and_the_access_log_has_a_line() {
    let origin = Origin::start();
    let lb = start_balancer(&upstream(&[origin.port], ""));
    let r = wait_for(Duration::from_secs(10), "a proxied reply", || {
        get(&lb.url("/some/path?q=1"))
            .ok()
            .filter(|r| r.status == 200)
    });
    assert_eq!(r.body, "origin");
    let seen = origin.seen();
    let request = seen.last().unwrap();
    assert_eq!(request.header("x-forwarded-proto"), Some("http"));
    assert_eq!(request.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(request.header("x-forwarded-for"), Some("127.0.0.1"));
    let line = wait_for(Duration::from_secs(5), "the access-log line", || {
        lb.proc
            .log_text()
            .lines()
            .find(|l| l.contains("\"GET /some/path?q=1 HTTP/1.1\""))
            .map(str::to_owned)
    });
    for part in [
        " 200 ",
        &format!("upstream=127.0.0.1:{}", origin.port),
        "upstream_time=0.",
        "time=0.",
    ] {
        assert!(
            line.contains(part),
            "access log line {line:?} lacks {part:?}"
        );
    }
}

#[test]
fn the_balancer_answers_its_own_health_check() {
    let mut lb = start_balancer(&upstream(&[free_port()], ""));
    let r = get(&lb.url("/health-check")).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "success"));
    let config = lb.config.to_str().unwrap().to_owned();
    let config = config.as_str();
    assert_eq!(run_balancer(&["healthcheck", "--config", config]).0, 0);
    lb.proc.kill();
    let (code, out) = run_balancer(&["healthcheck", "--config", config]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("/health-check"), "{out}");
}

#[test]
fn the_config_option_is_offered_only_where_it_is_read() {
    for (args, offers) in [
        (&["--help"][..], true),
        (&["healthcheck", "--help"][..], true),
        (&["cert", "--help"][..], false),
    ] {
        let (code, out) = run_balancer(args);
        assert_eq!(code, 0, "{args:?}: {out}");
        assert_eq!(
            out.contains("--config"),
            offers,
            "balancer {args:?}:\n{out}"
        );
    }
    // Both orders of `healthcheck` and `--config` work (compose.yaml and the
    // Kubernetes manifests use the first).
    let lb = start_balancer(&upstream(&[free_port()], ""));
    let config = lb.config.to_str().unwrap();
    assert_eq!(run_balancer(&["healthcheck", "--config", config]).0, 0);
    assert_eq!(run_balancer(&["--config", config, "healthcheck"]).0, 0);
}

/// At the default level, the log says each thing once: no Pingora start-up
/// chatter, one line for a backend that is added healthy, one line per
/// reload, and a name that never resolved has "no address yet".
#[test]
fn the_info_log_says_each_thing_once() {
    let port = free_port();
    let _backend = start_backend("quiet", port);
    let lb = start_balancer(&upstream(&[port], CHECKS));
    wait_for_all(&lb, &["quiet"]);
    let start = lb.proc.log_text();
    for chatter in [
        "Bootstrap starting",
        "Starting services in dependency order",
        "waiting on dependencies",
        "Server starting",
    ] {
        assert!(!start.contains(chatter), "{chatter:?} at info:\n{start}");
    }
    let about_backend: Vec<&str> = start
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.1:{port}")) && l.contains("upstream default"))
        .collect();
    assert_eq!(
        about_backend.len(),
        1,
        "one line for a backend added healthy: {about_backend:?}"
    );
    assert!(about_backend[0].contains("address added") && about_backend[0].ends_with("healthy"));

    lb.rewrite(&format!(
        "{}\n[[route]]\nname = \"api\"\npath = \"/api/\"\nstrip_prefix = \"/api\"\nupstream = \"default\"\n\
         [upstreams.nowhere]\nservers = [\"no-such-host.invalid:80\"]\n",
        upstream(&[port], CHECKS)
    ));
    let line = lb.wait_for_log("config reloaded");
    assert!(
        line.contains("route[0] added") && line.contains("upstreams.nowhere added"),
        "{line}"
    );
    let warning = lb.wait_for_log("cannot resolve upstream no-such-host.invalid:80");
    assert!(warning.ends_with("no address yet"), "{warning}");
    let log = lb.proc.log_text();
    assert_eq!(
        log.matches("config reloaded").count(),
        1,
        "one line per reload:\n{log}"
    );
    assert!(
        !log.contains("route[0].path"),
        "no line per key of a new route:\n{log}"
    );
}

#[test]
fn a_killed_backend_fails_no_request_and_returns_after_its_checks_pass() {
    let ports = [free_port(), free_port(), free_port()];
    let mut backends: Vec<Proc> = ["k1", "k2", "k3"]
        .iter()
        .zip(ports)
        .map(|(n, p)| start_backend(n, p))
        .collect();
    let lb = start_balancer(&upstream(&ports, CHECKS));
    wait_for_all(&lb, &["k1", "k2", "k3"]);

    let mut failures = Vec::new();
    let mut seen_after_kill = HashSet::new();
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(3) {
        if !killed && started.elapsed() > Duration::from_millis(500) {
            backends[1].kill();
            killed = true;
        }
        match get(&lb.url("/info")) {
            Ok(r) if r.status == 200 => {
                if killed {
                    seen_after_kill.insert(container_id(&r));
                }
            }
            Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "failed GETs while a backend died: {failures:?}"
    );
    assert!(!seen_after_kill.contains("k2"));
    wait_for(
        Duration::from_secs(5),
        "the checks to mark k2 unhealthy",
        || {
            lb.proc
                .log_text()
                .contains(&format!(
                    "upstream default: 127.0.0.1:{} (127.0.0.1:{}) is unhealthy",
                    ports[1], ports[1]
                ))
                .then_some(())
        },
    );

    // Back on the same port: traffic returns only after healthy_threshold (2) passes.
    backends[1] = start_backend("k2", ports[1]);
    let back = Instant::now();
    wait_for_all(&lb, &["k2"]);
    assert!(
        back.elapsed() >= Duration::from_millis(200),
        "k2 got traffic after {:?}, before a second check could pass",
        back.elapsed()
    );
    let log = lb.proc.log_text();
    assert!(
        log.contains(&format!(
            "upstream default: 127.0.0.1:{} (127.0.0.1:{}) is healthy",
            ports[1], ports[1]
        )),
        "{log}"
    );
}

#[test]
fn no_healthy_backend_is_a_503_that_says_so() {
    let port = free_port();
    let mut backend = start_backend("only", port);
    let lb = start_balancer(&upstream(&[port], CHECKS));
    wait_for_all(&lb, &["only"]);
    backend.kill();
    let r = wait_for(Duration::from_secs(5), "a 503", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 503)
    });
    assert!(r.body.contains("no healthy upstream"), "{:?}", r.body);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    // Without active checks, a refused connect on the only backend is a 502.
    let lb = start_balancer(&upstream(&[port], ""));
    let r = get(&lb.url("/")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
}

#[test]
fn a_new_backend_gets_no_traffic_before_its_first_check_passes() {
    let healthy = Origin::start();
    let newcomer = Origin::start();
    newcomer.on("/health", Act::Answer(500, "not yet"));
    let lb = start_balancer(&upstream(&[healthy.port, newcomer.port], CHECKS));
    for _ in 0..20 {
        assert_eq!(get(&lb.url("/work")).map(|r| r.status), Ok(200));
    }
    assert_eq!(
        newcomer.hits_except("/health"),
        0,
        "the unchecked backend got traffic"
    );
    assert!(newcomer.saw_path("/health"), "it was probed");
    newcomer.on("/health", Act::Answer(200, "ok"));
    wait_for(
        Duration::from_secs(5),
        "traffic to the newcomer once healthy",
        || {
            let _ = get(&lb.url("/work"));
            (newcomer.hits_except("/health") > 0).then_some(())
        },
    );
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    let origin = Origin::start();
    origin.on("/hang", Act::Hang);
    origin.on("/garbage", Act::Garbage);
    let lb = start_balancer(&upstream(&[origin.port], ""));
    wait_for(
        Duration::from_secs(10),
        "the origin to be reachable",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );
    let started = Instant::now();
    let r = get(&lb.url("/hang")).unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        r.body.contains("did not answer within read_timeout"),
        "{:?}",
        r.body
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "read_timeout is 2s"
    );
    let r = get(&lb.url("/garbage")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(get(&lb.url("/")).unwrap().status, 200, "still serving");
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_promptly() {
    let origin = Origin::start();
    origin.on(
        "/slow",
        Act::Slow(Duration::from_millis(800), 200, "slow but sure"),
    );
    let mut lb = start_balancer(&upstream(&[origin.port], ""));
    wait_for(Duration::from_secs(10), "the origin", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
    let url = lb.url("/slow");
    let pending = std::thread::spawn(move || get(&url));
    wait_for(
        Duration::from_secs(5),
        "the slow request to reach the origin",
        || origin.saw_path("/slow").then_some(()),
    );
    let stopped = Instant::now();
    lb.proc.terminate();
    let reply = pending
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((reply.status, reply.body.as_str()), (200, "slow but sure"));
    let status = wait_for(Duration::from_secs(8), "the balancer to exit", || {
        lb.proc.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", lb.proc.log_text());
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "exited after {:?}",
        stopped.elapsed()
    );
}

#[test]
fn bad_configs_are_rejected_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[upstream]\nservers = [\"b:80\"]\nconect_timeout = \"1s\"\n",
            "line 3",
            "conect_timeout",
        ),
        (
            "[upstream]\nservers = [\"b:80\"]\nread_timeout = \"soon\"\n",
            "line 3",
            "soon",
        ),
        ("[upstream]\nservers = [\"b\"]\n", "line 2", "\"b\""),
        ("listen = \"0.0.0.0:80\"\n", "", "upstream"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap();
        for args in [vec!["--config", path, "--check"], vec!["--config", path]] {
            let (code, out) = run_balancer(&args);
            assert_eq!(code, 1, "{args:?} on {text:?} should fail: {out}");
            for part in [path, line, what] {
                assert!(out.contains(part), "{args:?}: {out:?} lacks {part:?}");
            }
        }
    }
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[upstream]\nservers = [\"backend:8000\"]\n").unwrap();
    let (code, out) = run_balancer(&["--config", good.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_balancer(&["--config", "/nonexistent/balancer.toml", "--check"]);
    assert_eq!(code, 1);
    assert!(out.contains("/nonexistent/balancer.toml"), "{out}");
}

/// mimalloc would back its arenas with 2 MiB transparent huge pages, each
/// resident once a byte of it is touched: the balancer turns them off for
/// itself. (On a kernel with THP "never" this holds whatever the balancer does.)
#[test]
fn the_balancer_keeps_its_memory_in_small_pages() {
    let port = free_port();
    let _backend = start_backend("small-pages", port);
    let lb = start_balancer(&upstream(&[port], ""));
    wait_for_all(&lb, &["small-pages"]);
    for _ in 0..200 {
        assert_eq!(get(&lb.url("/")).unwrap().status, 200);
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", lb.proc.pid()))
        .expect("the balancer's /proc/PID/smaps_rollup");
    let huge = smaps
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .expect("an AnonHugePages line");
    assert_eq!(
        huge.split_whitespace().nth(1),
        Some("0"),
        "the balancer holds transparent huge pages: {huge}"
    );
}
