//! Routes and upstream groups over real sockets: which route a request
//! takes, what a route does to it (strip_prefix, header edits, redirect,
//! respond, rate limit), how each algorithm spreads requests over a group's
//! backends, X-Request-Id, reloads under load, `--check`, and what the admin
//! listener says about groups and routes.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// `servers = [...]` of loopback ports, each with weight 1.
fn servers(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!("servers = [{}]", list.join(", "))
}

const CHECKS: &str = "interval = \"200ms\"\ntimeout = \"500ms\"\n";

/// What `reply` says, for failure messages.
fn show(reply: &Result<Reply, String>) -> String {
    match reply {
        Ok(r) => format!("{} {:?} {:?}", r.status, r.headers, r.body),
        Err(e) => format!("transport error: {e}"),
    }
}

/// Whether `id` is one the balancer made: 32 lower-case hex digits.
fn generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn the_first_matching_route_wins_by_host_path_method_and_headers() {
    let origin = Origin::start();
    origin.on("/", Act::Answer(200, "default"));
    let respond = |body: &str| format!("respond = {{ status = 200, body = \"{body}\" }}\n");
    let lb = start_balancer(&format!(
        "[upstream]\n{}\n\
         [[route]]\nname = \"canary\"\npath = \"/api/\"\nheaders = {{ \"X-Canary\" = \"1\" }}\n{}\
         [[route]]\nname = \"token\"\npath = \"/api/\"\nheaders = {{ \"X-Token\" = \"*\" }}\n{}\
         [[route]]\nname = \"exact\"\nhost = \"API.example.com\"\n{}\
         [[route]]\nname = \"wild\"\nhost = \"*.example.com\"\n{}\
         [[route]]\nname = \"post\"\npath = \"/api/\"\nmethods = [\"POST\", \"delete\"]\n{}\
         [[route]]\nname = \"api\"\npath = \"/api/\"\n{}\
         [[route]]\nname = \"shadowed\"\npath = \"/api/v2\"\n{}",
        servers(&[origin.port]),
        respond("canary"),
        respond("token"),
        respond("exact"),
        respond("wild"),
        respond("post"),
        respond("api"),
        respond("shadowed"),
    ));
    // (method, path, request headers, the route that answers)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        // Both header routes match: the first one written wins.
        (
            "GET",
            "/api/x",
            &[("X-Canary", "1"), ("X-Token", "t")],
            "canary",
        ),
        ("GET", "/api/x", &[("x-canary", "1")], "canary"),
        ("GET", "/api/x", &[("X-Canary", "2")], "api"),
        ("GET", "/api/x", &[("X-Token", "anything at all")], "token"),
        // A route's place decides, not how specific it is.
        (
            "GET",
            "/api/x",
            &[("X-Canary", "1"), ("Host", "api.example.com")],
            "canary",
        ),
        ("POST", "/api/x", &[("Host", "api.example.com")], "exact"),
        ("GET", "/other", &[("Host", "api.example.com")], "exact"),
        (
            "GET",
            "/other",
            &[("Host", "API.Example.COM:8080")],
            "exact",
        ),
        ("GET", "/other", &[("Host", "WWW.EXAMPLE.COM")], "wild"),
        ("GET", "/other", &[("Host", "a.b.example.com:443")], "wild"),
        (
            "GET",
            "/other",
            &[("Host", "example.com")],
            "default", // the wildcard wants a name below example.com
        ),
        (
            "GET",
            "/other",
            &[("Host", "api.example.com.evil.test")],
            "default",
        ),
        ("POST", "/api/x", &[], "post"),
        ("DELETE", "/api/x", &[], "post"),
        ("POST", "/api/x", &[("X-Canary", "1")], "canary"),
        ("PUT", "/api/x", &[], "api"),
        ("GET", "/api/v2/x", &[], "api"),
        ("GET", "/apix", &[], "default"),
        ("GET", "/", &[], "default"),
    ];
    let mut wrong = Vec::new();
    for (method, path, headers, expected) in cases {
        let reply = request(method, &lb.url(path), headers);
        if !matches!(&reply, Ok(r) if r.status == 200 && r.body == *expected) {
            wrong.push(format!(
                "{method} {path} {headers:?}: expected 200 {expected:?}, got {}",
                show(&reply)
            ));
        }
    }
    assert!(wrong.is_empty(), "wrong routes:\n{}", wrong.join("\n"));
    assert_eq!(
        origin.hits_except("/health"),
        4,
        "only the unrouted requests reach the default group: {:?}",
        origin.seen()
    );
}

#[test]
fn strip_prefix_and_header_edits_reach_the_origin_and_the_client() {
    let origin = Origin::start();
    origin.on(
        "/",
        Act::With(
            200,
            vec![("Server", "origin/1.0"), ("X-Kept", "yes")],
            "from origin",
        ),
    );
    let lb = start_balancer(&format!(
        "[upstreams.api]\n{}\n\
         [[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"api\"\nstrip_prefix = \"/api\"\n\
         request_headers = {{ set = {{ \"X-Env\" = \"prod\", \"X-From\" = \"{{client_ip}} {{host}} {{path}} {{request_id}}\" }}, remove = [\"X-Debug\"] }}\n\
         response_headers = {{ set = {{ \"Strict-Transport-Security\" = \"max-age=63072000\" }}, remove = [\"Server\"] }}\n",
        servers(&[origin.port])
    ));
    let reply = request(
        "GET",
        &lb.url("/api/users/7?fields=name&x=1"),
        &[
            ("Host", "Shop.Example.com:8443"),
            ("X-Debug", "secret"),
            ("X-Env", "dev"),
            ("X-Request-Id", "trace-123"),
        ],
    );
    let r = reply.as_ref().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "from origin"), "{r:?}");
    assert_eq!(
        r.header("strict-transport-security"),
        Some("max-age=63072000"),
        "{r:?}"
    );
    assert_eq!(
        r.header("server"),
        None,
        "the origin's Server is removed: {r:?}"
    );
    assert_eq!(r.header("x-kept"), Some("yes"), "{r:?}");

    let seen = origin.seen();
    let forwarded = seen
        .iter()
        .find(|s| s.path != "/health")
        .unwrap_or_else(|| panic!("the origin saw no request: {seen:?}"));
    assert_eq!(
        forwarded.path, "/users/7?fields=name&x=1",
        "the prefix is stripped and the query kept: {forwarded:?}"
    );
    let all = |name: &str| -> Vec<&str> {
        forwarded
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(
        all("x-env"),
        ["prod"],
        "set replaces the client's value: {forwarded:?}"
    );
    assert_eq!(
        forwarded.header("x-from"),
        Some("127.0.0.1 shop.example.com /api/users/7?fields=name&x=1 trace-123"),
        "{forwarded:?}"
    );
    assert_eq!(forwarded.header("x-debug"), None, "{forwarded:?}");
    assert_eq!(forwarded.header("x-request-id"), Some("trace-123"));

    // An emptied path is forwarded as `/`.
    let r = get(&lb.url("/api/")).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        origin.saw_path("/"),
        "/api/ forwarded as /: {:?}",
        origin.seen()
    );
}

#[test]
fn redirects_fixed_answers_and_404_without_a_default_group() {
    let lb = start_balancer(
        "[[route]]\nname = \"old\"\npath = \"/old/\"\n\
         redirect = { location = \"https://example.com{path}\", status = 308 }\n\
         [[route]]\nname = \"moved\"\npath = \"/moved\"\nredirect = { location = \"/new{path}\" }\n\
         [[route]]\nname = \"maintenance\"\npath = \"/maint\"\n\
         respond = { status = 503, body = \"down for maintenance\", content_type = \"text/plain\" }\n",
    );
    let client = Client::default();

    let r = client.get(&lb.url("/old/a/b?q=1&r=2")).unwrap();
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://example.com/old/a/b?q=1&r=2"),
        "{r:?}"
    );
    let r = client.get(&lb.url("/moved/x")).unwrap();
    assert_eq!(r.status, 308, "308 is the default status: {r:?}");
    assert_eq!(r.header("location"), Some("/new/moved/x"), "{r:?}");

    for method in ["GET", "POST"] {
        let r = client.request(method, &lb.url("/maint/page"), &[]).unwrap();
        assert_eq!(
            (r.status, r.body.as_str(), r.header("content-type")),
            (503, "down for maintenance", Some("text/plain")),
            "{method}: {r:?}"
        );
    }

    let r = client.get(&lb.url("/elsewhere")).unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{r:?}"
    );
    assert!(r.body.contains("no route"), "{r:?}");
}

#[test]
fn a_rate_limit_answers_429_with_retry_after_and_counts_each_key_apart() {
    let origin = Origin::start();
    let lb = start_balancer(&format!(
        "[upstream]\n{}\n\
         [[route]]\nname = \"limited\"\npath = \"/limited\"\nupstream = \"default\"\n\
         rate_limit = {{ requests = 3, per = \"10s\", burst = 0, key = \"client_ip\" }}\n\
         [[route]]\nname = \"per-user\"\npath = \"/user\"\nupstream = \"default\"\n\
         rate_limit = {{ requests = 3, per = \"10s\", key = \"header:x-user\" }}\n",
        servers(&[origin.port])
    ));
    let client = Client::default();
    let statuses: Vec<u16> = (0..3)
        .map(|_| client.get(&lb.url("/limited")).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 200]);
    let r = client.get(&lb.url("/limited")).unwrap();
    assert_eq!(r.status, 429, "the 4th in 10s: {r:?}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in whole seconds: {r:?}"));
    assert!((1..=10).contains(&retry_after), "{r:?}");
    assert_eq!(
        origin.hits("/limited"),
        3,
        "the refused one is not forwarded"
    );
    assert_eq!(
        client.get(&lb.url("/free")).unwrap().status,
        200,
        "another route is not limited"
    );

    let as_user = |user: &str| {
        client
            .request("GET", &lb.url("/user"), &[("X-User", user)])
            .unwrap()
            .status
    };
    let alice: Vec<u16> = (0..4).map(|_| as_user("alice")).collect();
    let bob: Vec<u16> = (0..4).map(|_| as_user("bob")).collect();
    assert_eq!(alice, [200, 200, 200, 429]);
    assert_eq!(bob, [200, 200, 200, 429], "bob has a count of his own");
    assert_eq!(origin.hits("/user"), 6);
}

#[test]
fn round_robin_follows_the_weights() {
    let (light, heavy) = (free_port(), free_port());
    let _light = start_backend("light", light);
    let _heavy = start_backend("heavy", heavy);
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{light}\", {{ address = \"127.0.0.1:{heavy}\", weight = 3 }}]\n"
    ));
    let client = Client::default();
    wait_for(Duration::from_secs(10), "the balancer to proxy", || {
        client
            .get(&lb.url("/info"))
            .ok()
            .filter(|r| r.status == 200)
    });
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..1000 {
        let r = client.get(&lb.url("/info")).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        *counts.entry(container_id(&r)).or_default() += 1;
    }
    let share = |name: &str| counts.get(name).copied().unwrap_or(0);
    // Within 5 points of 25% and 75%. Only the shares are checked here,
    // not how evenly the heavy backend's turns are spread.
    assert!(
        (200..=300).contains(&share("light")) && (700..=800).contains(&share("heavy")),
        "weights 1 and 3 over 1000 requests: {counts:?}"
    );
}

#[test]
fn least_connections_sends_most_requests_to_the_backend_that_is_not_busy() {
    let slow = Origin::start();
    slow.on("/slow", Act::Slow(Duration::from_millis(400), 200, "slow"));
    let fast = Origin::start();
    fast.on("/slow", Act::Answer(200, "fast"));
    let lb = start_balancer(&format!(
        "[upstream]\n{}\nalgorithm = \"least_connections\"\n",
        servers(&[slow.port, fast.port])
    ));
    // Eight clients, each sending its next request as soon as the last is
    // answered. Round-robin would send every other request to the slow
    // backend (about half); least connections sends one there only while it
    // has nothing in flight.
    let until = Instant::now() + Duration::from_millis(1500);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let url = lb.url("/slow");
            thread::spawn(move || {
                let client = Client::default();
                let mut bodies = Vec::new();
                while Instant::now() < until {
                    let reply = client.get(&url);
                    match &reply {
                        Ok(r) if r.status == 200 => bodies.push(r.body.clone()),
                        _ => bodies.push(show(&reply)),
                    }
                }
                bodies
            })
        })
        .collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for worker in workers {
        for body in worker.join().unwrap() {
            *counts.entry(body).or_default() += 1;
        }
    }
    let (to_slow, to_fast) = (counts.get("slow").copied(), counts.get("fast").copied());
    let total: usize = counts.values().sum();
    assert_eq!(
        to_slow.unwrap_or(0) + to_fast.unwrap_or(0),
        total,
        "every answer is 200: {counts:?}"
    );
    assert!(total >= 20, "the clients ran: {counts:?}");
    assert!(
        to_slow.unwrap_or(0) * 10 < total,
        "under a tenth of the requests to the busy backend: {counts:?}"
    );
}

/// Which backend each user is sent to: one request per user, with `X-User`.
fn owners(client: &Client, lb: &Balancer, users: &[String]) -> Result<Vec<String>, String> {
    users
        .iter()
        .map(|user| {
            let reply = client.request("GET", &lb.url("/info"), &[("X-User", user)]);
            match &reply {
                Ok(r) if r.status == 200 => Ok(container_id(r)),
                _ => Err(format!("{user}: {}", show(&reply))),
            }
        })
        .collect()
}

#[test]
fn consistent_hashing_keeps_users_on_their_backend_through_changes() {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let names = ["h1", "h2", "h3", "h4"];
    let mut backends: Vec<Proc> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| start_backend(n, *p))
        .collect();
    // A probe that times out counts against a backend as much as a refused
    // one: on a machine busy enough that a check takes over its timeout, a
    // live backend leaves the rotation for a moment and its users move, as
    // they would in production. This test is about where the ring sends
    // users, so its checks are patient with a live backend (3 s) and still
    // quick to see a dead one (a refused connect fails at once).
    let checks = "interval = \"200ms\"\ntimeout = \"3s\"\nunhealthy_threshold = 3\n";
    let config = |count: usize| {
        format!(
            "[upstream]\n{}\nalgorithm = \"consistent_hash\"\nhash_key = \"header:x-user\"\n\
             [upstream.health_check]\n{checks}",
            servers(&ports[..count])
        )
    };
    let lb = start_balancer(&config(3));
    let client = Client::default();
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let before = wait_for(Duration::from_secs(10), "every user answered", || {
        owners(&client, &lb, &users).ok()
    });
    let again = owners(&client, &lb, &users).unwrap();
    assert_eq!(before, again, "users keep their backend");
    let used: HashSet<&str> = before.iter().map(String::as_str).collect();
    assert_eq!(
        used,
        HashSet::from(["h1", "h2", "h3"]),
        "200 users spread over all three"
    );

    // A fourth server: about a quarter of the users move, all of them to it.
    lb.rewrite(&config(4));
    lb.wait_for_log(&format!("upstream.servers added 127.0.0.1:{}", ports[3]));
    wait_for(Duration::from_secs(10), "the fourth server in use", || {
        owners(&client, &lb, &users)
            .ok()
            .filter(|o| o.iter().any(|n| n == "h4"))
    });
    let four = owners(&client, &lb, &users).unwrap();
    let moved: Vec<(&String, &String, &String)> = users
        .iter()
        .zip(&before)
        .zip(&four)
        .filter(|((_, b), a)| b != a)
        .map(|((u, b), a)| (u, b, a))
        .collect();
    assert!(
        (20..=90).contains(&moved.len()),
        "{} of 200 users moved, expected about 50",
        moved.len()
    );
    let astray: Vec<_> = moved.iter().filter(|(_, _, to)| *to != "h4").collect();
    assert!(
        astray.is_empty(),
        "users moved between the old servers: {astray:?}"
    );

    // A backend killed: only its users move, and they come back with it.
    backends[0].kill();
    let without = wait_for(
        Duration::from_secs(10),
        "every user answered without h1",
        || {
            owners(&client, &lb, &users)
                .ok()
                .filter(|o| o.iter().all(|n| n != "h1"))
        },
    );
    let needless: Vec<_> = users
        .iter()
        .zip(&four)
        .zip(&without)
        .filter(|((_, was), is)| *was != "h1" && was != is)
        .collect();
    assert!(
        needless.is_empty(),
        "users of healthy backends moved: {needless:?}"
    );
    backends[0] = start_backend("h1", ports[0]);
    wait_for(Duration::from_secs(10), "h1's users back on h1", || {
        owners(&client, &lb, &users).ok().filter(|o| *o == four)
    });
}

#[test]
fn a_group_whose_backend_is_down_answers_503_while_the_default_group_answers() {
    let default = Origin::start();
    let api = Origin::start();
    let lb = start_balancer(&format!(
        "[upstream]\n{}\n[upstream.health_check]\n{CHECKS}\
         [upstreams.api]\n{}\n[upstreams.api.health_check]\npath = \"/health\"\n{CHECKS}\
         [[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"api\"\n",
        servers(&[default.port]),
        servers(&[api.port])
    ));
    wait_for(Duration::from_secs(10), "the api group to answer", || {
        get(&lb.url("/api/x")).ok().filter(|r| r.status == 200)
    });
    api.stop();
    let r = wait_for(Duration::from_secs(10), "a 503 from the api route", || {
        get(&lb.url("/api/x")).ok().filter(|r| r.status == 503)
    });
    assert!(r.body.contains("no healthy upstream"), "{r:?}");
    for _ in 0..5 {
        let r = get(&lb.url("/api/x")).unwrap();
        assert_eq!(r.status, 503, "{r:?}");
        let r = get(&lb.url("/other")).unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "origin"),
            "the default group is up: {r:?}"
        );
    }
    assert!(
        default.hits("/health") > 0 && api.hits("/health") > 0,
        "each group checks its own backends"
    );
}

#[test]
fn every_request_carries_an_x_request_id_to_the_origin_the_client_and_the_log() {
    let origin = Origin::start();
    let lb = start_balancer(&format!(
        "[upstream]\n{}\n\
         [[route]]\nname = \"local\"\npath = \"/local\"\nrespond = {{ status = 200, body = \"here\" }}\n",
        servers(&[origin.port])
    ));
    let long = "x".repeat(129);
    let cases: &[(&str, Option<&str>, bool)] = &[
        ("/absent", None, false),
        ("/kept", Some("trace-42.a:b_C"), true),
        ("/bad-char", Some("bad/id"), false),
        ("/spaces", Some("has spaces"), false),
        ("/too-long", Some(&long), false),
    ];
    let mut ids = HashSet::new();
    for (path, sent, kept) in cases {
        let headers: Vec<(&str, &str)> = sent.iter().map(|id| ("X-Request-Id", *id)).collect();
        let r = request("GET", &lb.url(path), &headers).unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let id = r
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{path}: no X-Request-Id in {r:?}"))
            .to_owned();
        if *kept {
            assert_eq!(Some(id.as_str()), *sent, "{path}: a well-formed id is kept");
        } else {
            assert!(
                generated(&id),
                "{path}: sent {sent:?}, got {id:?}, expected 32 hex digits"
            );
        }
        assert!(ids.insert(id.clone()), "{path}: {id} was given before");
        let seen = origin.seen();
        let forwarded = seen
            .iter()
            .find(|s| s.path == *path)
            .unwrap_or_else(|| panic!("{path} never reached the origin: {seen:?}"));
        assert_eq!(
            forwarded.header("x-request-id"),
            Some(id.as_str()),
            "{path}: the origin saw {forwarded:?}"
        );
        let line = lb.wait_for_log(&format!("request_id={id}"));
        assert!(
            line.contains(&format!("\"GET {path}")) && line.contains("group=default"),
            "{path}: {line}"
        );
    }

    // An answer of the balancer's own has one too.
    let r = get(&lb.url("/local")).unwrap();
    let id = r.header("x-request-id").unwrap_or_default().to_owned();
    assert!(generated(&id), "{r:?}");
    let line = lb.wait_for_log(&format!("request_id={id}"));
    assert!(line.contains("route=local"), "{line}");
}

/// One answer the traffic loop got.
struct Answer {
    path: &'static str,
    body: String,
    route: Option<String>,
}

/// A few clients requesting `PATHS` in turn until stopped, recording every
/// answer and every failure.
struct Traffic {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<usize>>,
}

const PATHS: [&str; 3] = ["/info", "/new/info", "/extra/info"];

impl Traffic {
    fn start(lb: &Balancer, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|i| {
                let (stop, answers, failures) = (
                    Arc::clone(&stop),
                    Arc::clone(&answers),
                    Arc::clone(&failures),
                );
                let base = lb.url("");
                thread::spawn(move || {
                    // The first client opens a connection per request, the others keep theirs.
                    let client = Client::default();
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) && sent < 100_000 {
                        let path = PATHS[sent % PATHS.len()];
                        sent += 1;
                        let url = format!("{base}{path}");
                        let reply = if i == 0 { get(&url) } else { client.get(&url) };
                        match reply {
                            Ok(r) if r.status == 200 => answers.lock().unwrap().push(Answer {
                                path,
                                route: r.header("x-route").map(str::to_owned),
                                body: r.body,
                            }),
                            other => failures
                                .lock()
                                .unwrap()
                                .push(format!("GET {path}: {}", show(&other))),
                        }
                    }
                    sent
                })
            })
            .collect();
        Traffic {
            stop,
            answers,
            failures,
            threads,
        }
    }

    /// How many answers came so far.
    fn mark(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Waits until an answer after `mark` satisfies `wanted`.
    fn wait_for(&self, mark: usize, description: &str, wanted: impl Fn(&Answer) -> bool) {
        wait_for(Duration::from_secs(10), description, || {
            self.answers.lock().unwrap()[mark..]
                .iter()
                .any(&wanted)
                .then_some(())
        });
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.threads.into_iter().map(|t| t.join().unwrap()).sum();
        (sent, self.failures.lock().unwrap().clone())
    }
}

#[test]
fn routes_groups_and_algorithms_change_live_under_load_with_no_failed_request() {
    let origins: Vec<Origin> = (0..3).map(|_| Origin::start()).collect();
    for (origin, name) in origins.iter().zip(["a", "b", "c"]) {
        origin.on("/", Act::Answer(200, name));
    }
    let port = |i: usize| origins[i].port;
    let default_group = |ports: &[u16], algorithm: &str| {
        format!(
            "[upstream]\n{}\nalgorithm = \"{algorithm}\"\n",
            servers(ports)
        )
    };
    let new_route = "[[route]]\nname = \"new\"\npath = \"/new/\"\nupstream = \"default\"\n\
                     strip_prefix = \"/new\"\nresponse_headers = { set = { \"X-Route\" = \"new\" } }\n";
    let extra_group = format!(
        "[upstreams.extra]\n{}\n[upstreams.extra.health_check]\n{CHECKS}",
        servers(&[port(1)])
    );
    let extra_route = "[[route]]\nname = \"extra\"\npath = \"/extra/\"\nupstream = \"extra\"\n\
                       strip_prefix = \"/extra\"\n";

    let lb = start_balancer(&default_group(&[port(0)], "round_robin"));
    wait_for(Duration::from_secs(10), "the balancer to proxy", || {
        get(&lb.url("/info")).ok().filter(|r| r.status == 200)
    });
    let traffic = Traffic::start(&lb, 3);

    // A new route.
    let mark = traffic.mark();
    lb.rewrite(&format!(
        "{}{new_route}",
        default_group(&[port(0)], "round_robin")
    ));
    traffic.wait_for(mark, "the new route to answer", |a| {
        a.path == "/new/info" && a.route.as_deref() == Some("new")
    });

    // A new group, and a route to it, in one edit.
    let mark = traffic.mark();
    lb.rewrite(&format!(
        "{}{extra_group}{new_route}{extra_route}",
        default_group(&[port(0)], "round_robin")
    ));
    traffic.wait_for(mark, "the new group to answer", |a| {
        a.path == "/extra/info" && a.body == "b"
    });

    // Another algorithm, and another server, for the default group.
    let mark = traffic.mark();
    lb.rewrite(&format!(
        "{}{extra_group}{new_route}{extra_route}",
        default_group(&[port(0), port(2)], "least_connections")
    ));
    lb.wait_for_log("upstream.algorithm round_robin -> least_connections");
    traffic.wait_for(mark, "the default group's new server", |a| {
        a.path == "/info" && a.body == "c"
    });
    let mark = traffic.mark();
    wait_for(Duration::from_secs(10), "300 more answers", || {
        (traffic.mark() >= mark + 300).then_some(())
    });

    let (sent, failures) = traffic.finish();
    assert!(sent > 300, "the clients ran ({sent} requests)");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}\nthe balancer's log about the reloads:\n{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        lb.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("config reloaded") || l.contains("upstream extra"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        origins[1].saw_path("/info") && !origins[1].saw_path("/extra/info"),
        "the new group sees the stripped path: {:?}",
        origins[1].seen()
    );
}

/// The line (from 1) of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

#[test]
fn check_refuses_broken_routes_and_warns_of_unreachable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = "[upstream]\nservers = [\"127.0.0.1:1\"]\n";
    // (file text, the lines the error may name, what it must say)
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            format!("{upstream}\n[[route]]\nname = \"vars\"\nrequest_headers = {{ set = {{ \"X-A\" = \"{{client_ip}} {{nope}}\" }} }}\nupstream = \"default\"\n"),
            "[[route]]",
            "upstream = \"default\"",
            "unknown variable {nope}",
        ),
        (
            format!("{upstream}\n[[route]]\nname = \"undefined\"\npath = \"/x\"\nupstream = \"nope\"\n"),
            "[[route]]",
            "upstream = \"nope\"",
            "upstream \"nope\" is not defined",
        ),
        (
            format!("{upstream}\n[[route]]\nname = \"two\"\nupstream = \"default\"\nrespond = {{ status = 200 }}\n"),
            "[[route]]",
            "respond = ",
            "more than one of upstream, redirect and respond",
        ),
        (
            format!("{upstream}\n[[route]]\nname = \"none\"\npath = \"/x\"\n"),
            "[[route]]",
            "path = \"/x\"",
            "does nothing",
        ),
        (
            format!("{upstream}hash_key = \"header:x-user\"\n\n[[route]]\npath = \"/x\"\nupstream = \"default\"\n"),
            "[upstream]",
            "hash_key = ",
            "hash_key is only for algorithm = \"consistent_hash\"",
        ),
        (
            "[upstreams.api]\nservers = [\"127.0.0.1:1\"]\nalgorithm = \"random\"\nhash_key = \"cookie:session\"\n".to_owned(),
            "[upstreams.api]",
            "hash_key = ",
            "hash_key is only for algorithm = \"consistent_hash\"",
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (text, first, last, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let file = path.display().to_string();
        let (code, out) = run_balancer(&["--config", &file, "--check"]);
        let lines = line_of(text, first)..=line_of(text, last);
        let line = out
            .split(", line ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<usize>().ok());
        let ok = code == 1
            && out.contains(&file)
            && out.contains(reason)
            && line.is_some_and(|l| lines.contains(&l));
        if !ok {
            wrong.push(format!(
                "case {i}: expected exit 1, {file}, a line in {lines:?} and {reason:?}; \
                 got exit {code}: {out}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let text = format!(
        "{upstream}\n[[route]]\nname = \"canary\"\npath = \"/api/\"\nheaders = {{ \"X-Canary\" = \"1\" }}\nupstream = \"default\"\n\
         \n[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"default\"\n\
         \n[[route]]\nname = \"api-v1\"\npath = \"/api/v1/\"\nmethods = [\"GET\"]\nupstream = \"default\"\n"
    );
    let path = dir.path().join("shadowed.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, out) = run_balancer(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "a warning is not an error: {out}");
    let expected = format!(
        "warning: the route at line {} (api-v1) is unreachable: the route at line {} (api) matches every request it would",
        line_of(&text, "name = \"api-v1\"") - 1,
        line_of(&text, "name = \"api\"") - 1,
    );
    assert!(out.contains(&expected), "expected {expected:?} in {out}");
    assert_eq!(
        out.matches("warning").count(),
        1,
        "a header condition makes the canary route no shadow: {out}"
    );
}

#[test]
fn status_and_metrics_show_groups_and_routes() {
    let (default, api1, api2) = (Origin::start(), Origin::start(), Origin::start());
    let admin = free_port();
    let lb = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin}\"\n\
         [upstream]\n{}\n\
         [upstreams.api]\nservers = [\"127.0.0.1:{}\", {{ address = \"127.0.0.1:{}\", weight = 3 }}]\n\
         algorithm = \"least_connections\"\n\
         [[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"api\"\n\
         [[route]]\nname = \"maintenance\"\npath = \"/maint\"\nrespond = {{ status = 503, body = \"down\" }}\n",
        servers(&[default.port]),
        api1.port,
        api2.port,
    ));
    let (d, a1, a2) = (
        format!("127.0.0.1:{}", default.port),
        format!("127.0.0.1:{}", api1.port),
        format!("127.0.0.1:{}", api2.port),
    );

    let s = status(admin);
    let group = |name: &str| -> serde_json::Value {
        s["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no group {name} in {s}"))
    };
    let api = group("api");
    assert_eq!(api["algorithm"], "least_connections", "{api}");
    let entries: Vec<(String, u64, Vec<String>)> = api["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("{api}"))
        .iter()
        .map(|e| {
            let addresses = e["addresses"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|a| a["address"].as_str().unwrap_or_default().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["weight"].as_u64().unwrap_or(0),
                addresses,
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (a1.clone(), 1, vec![a1.clone()]),
            (a2.clone(), 3, vec![a2.clone()])
        ],
        "{api}"
    );
    let fallback = group("default");
    assert_eq!(fallback["algorithm"], "round_robin", "{fallback}");
    assert_eq!(fallback["servers"][0]["name"], d.as_str(), "{fallback}");
    let routes: Vec<(String, String, String)> = s["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("no routes in {s}"))
        .iter()
        .map(|r| {
            let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (text("name"), text("path"), text("action"))
        })
        .collect();
    assert_eq!(
        routes,
        [
            ("api".into(), "/api/".into(), "upstream api".into()),
            ("maintenance".into(), "/maint".into(), "respond 503".into())
        ]
    );

    for _ in 0..4 {
        assert_eq!(get(&lb.url("/api/x")).unwrap().status, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&lb.url("/other")).unwrap().status, 200);
    }
    assert_eq!(get(&lb.url("/maint")).unwrap().status, 503);

    let requests = |route: &str, class: &str, upstream: &str| {
        format!("balancer_requests_total{{method=\"GET\",route=\"{route}\",status_class=\"{class}\",upstream=\"{upstream}\"}}")
    };
    let attempts = |backend: &str, upstream: &str| {
        format!("balancer_upstream_requests_total{{backend=\"{backend}\",server=\"{backend}\",upstream=\"{upstream}\"}}")
    };
    // Requests are counted as they are logged, just after their response is sent.
    let metrics = wait_for(Duration::from_secs(5), "all seven requests counted", || {
        let m = scrape(admin);
        (sample(&m, "balancer_request_duration_seconds_count") >= 7.0).then_some(m)
    });
    assert_eq!(
        sample(&metrics, &requests("api", "2xx", "api")),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &requests("none", "2xx", "default")),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &requests("maintenance", "5xx", "none")),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &attempts(&a1, "api")) + sample(&metrics, &attempts(&a2, "api")),
        4.0,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, &attempts(&d, "default")), 2.0, "{metrics}");
}
