//! Everything at once (#27): what a deploy looks like, survived with nothing
//! lost. HTTP/1.1 loops on kept-alive and on new connections, HTTP/2 over
//! TLS, a cache-hit loop, a slow loop on a rate-limited route and 20 open
//! WebSockets exchanging messages run throughout, while, one after the other
//! and overlapping: a backend is killed and another started, the
//! certificate is renewed on disk, a route is added and one removed, the
//! default group's algorithm and weights change, a rate limit changes, a
//! `PURGE` runs, and a broken edit is saved and then fixed.
//!
//! Counted: failed requests, broken WebSockets, failed TLS handshakes, and
//! answers from a backend that the configuration in force did not allow
//! (all must be 0); the balancer's memory must come back within 20% of
//! where it was once warm.

#[path = "support/http2.rs"]
mod http2;
mod support;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::{Message, WebSocket};

use support::*;

const TOKEN: &str = "everything-at-once";
const WEBSOCKETS: usize = 20;
/// A pause after each request of a loop: a busy 2-core machine (shared with
/// the backends, the balancer and other tests) must keep room for all of them.
const PACE: Duration = Duration::from_millis(5);

/// What the loops count, and what they are allowed to see.
#[derive(Default)]
struct Counts {
    running: AtomicBool,
    /// When the loops started: a failure says how long after.
    since: Mutex<Option<Instant>>,
    /// Requests answered as expected, by loop.
    kept: AtomicUsize,
    fresh: AtomicUsize,
    h2: AtomicUsize,
    cached: AtomicUsize,
    limited: AtomicUsize,
    messages: AtomicUsize,
    handshakes: AtomicUsize,
    /// Everything that went wrong, as it was seen.
    failures: Mutex<Vec<String>>,
    /// The backends the default group may answer from (during an edit: those
    /// of the old and of the new configuration).
    allowed: Mutex<HashSet<String>>,
    /// The leaf certificates the TLS handshakes got.
    leaves: Mutex<HashSet<Vec<u8>>>,
}

impl Counts {
    fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    fn fail(&self, what: String) {
        let at = self.since.lock().unwrap().map(|t| t.elapsed());
        let what = match at {
            Some(at) => format!("{what} (at {:.2}s, {})", at.as_secs_f64(), wall_clock()),
            None => what,
        };
        self.failures.lock().unwrap().push(what);
    }

    /// Counts `reply` in `count` when it is as `expect` says, else as a failure.
    fn check(&self, what: &str, reply: Result<Reply, String>, expect: Expect, count: &AtomicUsize) {
        let verdict = match &reply {
            Ok(r) if r.status == 200 && matches!(expect, Expect::Any) => Ok(()),
            Ok(r) if r.status == 200 => {
                let from = container_id(r);
                match expect {
                    Expect::Backend(name) if from == name => Ok(()),
                    Expect::Backend(name) => Err(format!("answered by {from}, not {name}")),
                    Expect::Allowed if self.allowed.lock().unwrap().contains(&from) => Ok(()),
                    _ => Err(format!("answered by {from}, not allowed")),
                }
            }
            other => Err(format!("{other:?}")),
        };
        match verdict {
            Ok(()) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(format!("{what}: {e}")),
        }
    }

    fn set_allowed(&self, names: &[&str]) {
        *self.allowed.lock().unwrap() = names.iter().map(|n| n.to_string()).collect();
    }
}

/// What a loop's answers must be (all of them: 200).
#[derive(Clone, Copy)]
enum Expect {
    /// From a backend the default group may answer from.
    Allowed,
    /// From this backend.
    Backend(&'static str),
    /// From anywhere (a cached copy).
    Any,
}

/// One loop of GETs.
struct Loop {
    what: &'static str,
    path: &'static str,
    /// A new connection for each request, or one kept alive.
    fresh: bool,
    expect: Expect,
    count: fn(&Counts) -> &AtomicUsize,
    /// The pause after each request.
    pace: Duration,
}

impl Loop {
    /// GETs the path on `lb` until the end.
    fn spawn(self, lb: &Balancer, counts: &Arc<Counts>) -> thread::JoinHandle<()> {
        let url = lb.url(self.path);
        spawn_loop(counts, move |c| {
            let client = Client::default();
            while c.running() {
                let reply = if self.fresh {
                    get(&url)
                } else {
                    client.get(&url)
                };
                c.check(self.what, reply, self.expect, (self.count)(&c));
                // The load's pace: nothing is waited for.
                thread::sleep(self.pace);
            }
        })
    }
}

/// The configuration, as the test edits it.
#[derive(Clone)]
struct Setup {
    admin: u16,
    tls: u16,
    cert_dir: String,
    /// The default group: (backend port, weight).
    default: Vec<(u16, u32)>,
    algorithm: &'static str,
    sockets: u16,
    side: u16,
    side_route: bool,
    old_route: bool,
    rate: u32,
}

impl Setup {
    fn toml(&self) -> String {
        let servers: Vec<String> = self
            .default
            .iter()
            .map(|(port, weight)| {
                format!("{{ address = \"127.0.0.1:{port}\", weight = {weight} }}")
            })
            .collect();
        let mut text = format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n\
             [tls]\nlisten = \"127.0.0.1:{tls}\"\ncertificate = \"{dir}/cert.pem\"\n\
             private_key = \"{dir}/key.pem\"\nhttp2 = true\n\
             [upstream]\nservers = [{servers}]\nalgorithm = \"{algorithm}\"\nconnect_timeout = \"1s\"\n\
             [upstream.health_check]\npath = \"/health\"\ninterval = \"1s\"\ntimeout = \"2s\"\n\
             healthy_threshold = 1\nunhealthy_threshold = 2\n\
             [upstreams.sockets]\nservers = [\"127.0.0.1:{sockets}\"]\n\
             [upstreams.side]\nservers = [\"127.0.0.1:{side}\"]\n\
             [[route]]\nname = \"ws\"\npath = \"/ws\"\nupstream = \"sockets\"\n\
             [[route]]\nname = \"limited\"\npath = \"/limited\"\nupstream = \"side\"\nstrip_prefix = \"/limited\"\n\
             rate_limit = {{ requests = {rate}, per = \"1s\", burst = {rate} }}\n",
            admin = self.admin,
            tls = self.tls,
            dir = self.cert_dir,
            servers = servers.join(", "),
            algorithm = self.algorithm,
            sockets = self.sockets,
            side = self.side,
            rate = self.rate,
        );
        if self.side_route {
            text += "[[route]]\nname = \"side\"\npath = \"/side\"\nupstream = \"side\"\nstrip_prefix = \"/side\"\n";
        }
        if self.old_route {
            text += "[[route]]\nname = \"old\"\npath = \"/old\"\nrespond = { status = 200, body = \"the old route\" }\n";
        }
        text
            + "[cache]\nmax_size = \"16MiB\"\n[[cache.rule]]\npath = \"/cache-me\"\nttl = \"60s\"\n"
    }
}

/// The balancer, its configuration and what the test does to both.
struct Stage {
    lb: Balancer,
    setup: Setup,
    counts: Arc<Counts>,
    /// The backends' names by port.
    names: std::collections::HashMap<u16, String>,
    reloads_before: usize,
}

impl Stage {
    /// Saves `setup` and waits until the balancer has reloaded it; the
    /// default group may answer from the old backends or the new ones until
    /// the requests routed by the old configuration are over.
    fn apply(&mut self, setup: Setup, old: &[&str], new: &[&str]) {
        self.save(&setup, old);
        self.reloaded(setup, new);
    }

    /// Saves `setup`; until [`Stage::reloaded`], the backends of `old` may
    /// answer as well as those of `setup`.
    fn save(&mut self, setup: &Setup, old: &[&str]) {
        self.reloads_before = self.reloads();
        let mut both: Vec<String> = old.iter().map(|n| n.to_string()).collect();
        both.extend(self.counts.allowed.lock().unwrap().iter().cloned());
        both.extend(self.names_in(setup));
        *self.counts.allowed.lock().unwrap() = both.into_iter().collect();
        self.lb.rewrite(&setup.toml());
    }

    /// Waits for the reload of what [`Stage::save`] saved, lets the requests
    /// routed before it end, and from then on allows only `new`.
    fn reloaded(&mut self, setup: Setup, new: &[&str]) {
        let before = self.reloads_before;
        wait_for(Duration::from_secs(10), "the edit to be reloaded", || {
            (self.reloads() > before).then_some(())
        });
        self.setup = setup;
        self.settle();
        self.counts.set_allowed(new);
    }

    /// The names of the default group's backends in `setup`.
    fn names_in(&self, setup: &Setup) -> Vec<String> {
        setup
            .default
            .iter()
            .filter_map(|(port, _)| self.names.get(port).cloned())
            .collect()
    }

    fn kill_backend(&self, backends: &mut [Option<Proc>], index: usize) {
        if let Some(mut backend) = backends[index].take() {
            backend.kill();
        }
    }

    /// Waits until the default group answers from `name`.
    fn wait_for_backend(&self, name: &str) {
        wait_for(
            Duration::from_secs(15),
            &format!("{name} to answer"),
            || {
                (0..4)
                    .filter_map(|_| get(&self.lb.url("/info")).ok())
                    .any(|r| container_id(&r) == name)
                    .then_some(())
            },
        );
    }

    /// Waits until a TLS handshake has got the leaf certificate of `pki`.
    fn wait_for_leaf(&self, pki: &Pki) {
        let leaf = CertificateDer::pem_file_iter(&pki.cert)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        wait_for(
            Duration::from_secs(15),
            "a handshake with the renewed certificate",
            || {
                self.counts
                    .leaves
                    .lock()
                    .unwrap()
                    .contains(&leaf)
                    .then_some(())
            },
        );
    }

    fn refusals(&self) -> usize {
        self.lb
            .proc
            .log_text()
            .matches("config reload failed")
            .count()
    }

    fn reloads(&self) -> usize {
        self.lb.proc.log_text().matches("config reloaded:").count()
    }

    /// Lets the loops run a moment under what was just done.
    fn settle(&self) {
        let mark = self.counts.kept.load(Ordering::Relaxed) + 30;
        wait_for(Duration::from_secs(20), "the loops to go on", || {
            (self.counts.kept.load(Ordering::Relaxed) >= mark).then_some(())
        });
        thread::sleep(Duration::from_secs(2)); // pacing only: nothing is waited for
    }
}

/// The time of day (UTC), as the balancer's log lines give it.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let of_day = now.as_secs_f64() % 86_400.0;
    let (h, m, s) = (of_day as u64 / 3600, of_day as u64 / 60 % 60, of_day % 60.0);
    format!("{h:02}:{m:02}:{s:06.3}Z")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn tls_client(cas: &[&Path]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// HTTP/2 over TLS: a new connection (a full handshake) every 50 requests.
fn h2_loop(counts: Arc<Counts>, port: u16, config: Arc<rustls::ClientConfig>) {
    http2::block_on(async move {
        let connector = tokio_rustls::TlsConnector::from(config);
        let uri = format!("https://localhost:{port}/info");
        while counts.running() {
            let tls = async {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from("localhost").expect("a name");
                connector.connect(name, tcp).await
            };
            let tls = match tls.await {
                Ok(tls) => tls,
                Err(e) => {
                    counts.fail(format!("TLS handshake: {e}"));
                    continue;
                }
            };
            counts.handshakes.fetch_add(1, Ordering::Relaxed);
            if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                counts.leaves.lock().unwrap().insert(leaf.to_vec());
            }
            let (send, connection) = match h2::client::handshake(tls).await {
                Ok(pair) => pair,
                Err(e) => {
                    counts.fail(format!("HTTP/2 handshake: {e}"));
                    continue;
                }
            };
            let driver = tokio::spawn(connection);
            for _ in 0..50 {
                if !counts.running() {
                    break;
                }
                let reply = http2::get(&send, &uri, &[]).await;
                counts.check("HTTP/2", reply, Expect::Allowed, &counts.h2);
                // The load's pace: nothing is waited for.
                tokio::time::sleep(PACE).await;
            }
            drop(send);
            let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
        }
    })
}

fn websocket(port: u16) -> WebSocket<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (ws, response) = tungstenite::client(format!("ws://127.0.0.1:{port}/ws"), tcp)
        .expect("the WebSocket handshake");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// The open WebSockets, each echoing a message in turn, until the end.
fn websocket_loop(counts: Arc<Counts>, mut sockets: Vec<WebSocket<TcpStream>>) {
    let mut n = 0u64;
    while counts.running() {
        for (i, ws) in sockets.iter_mut().enumerate() {
            n += 1;
            let text = format!("socket {i} message {n}");
            let echoed = ws.send(Message::text(text.clone())).and_then(|()| loop {
                match ws.read()? {
                    Message::Text(t) => break Ok(t.to_string()),
                    _ => continue,
                }
            });
            match echoed {
                Ok(t) if t == text => {
                    counts.messages.fetch_add(1, Ordering::Relaxed);
                }
                other => counts.fail(format!("WebSocket {i}: {other:?}")),
            }
        }
        // The load's pace: nothing is waited for.
        thread::sleep(Duration::from_millis(100));
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        if let Err(e) = ws.close(None) {
            counts.fail(format!("closing WebSocket {i}: {e}"));
        }
        while ws.read().is_ok() {}
    }
}

fn spawn_loop(
    counts: &Arc<Counts>,
    body: impl FnOnce(Arc<Counts>) + Send + 'static,
) -> thread::JoinHandle<()> {
    let counts = Arc::clone(counts);
    thread::spawn(move || body(counts))
}

#[test]
fn everything_at_once_fails_nothing() {
    let names = ["a", "b", "c", "d", "e"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let mut backends: Vec<Option<Proc>> = names[..3]
        .iter()
        .zip(&ports)
        .map(|(name, port)| Some(start_backend(name, *port)))
        .collect();
    let (first, renewed) = (Pki::new(&["localhost"]), Pki::new(&["localhost"]));
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    first.install(&cert, &key);
    let setup = Setup {
        admin: free_port(),
        tls: free_port(),
        cert_dir: certs.path().to_str().unwrap().to_owned(),
        default: vec![(ports[0], 1), (ports[1], 1)],
        algorithm: "round_robin",
        sockets: ports[0],
        side: ports[2],
        side_route: false,
        old_route: true,
        rate: 50,
    };
    let lb = start_balancer_with_env(&setup.toml(), &[("BALANCER_ADMIN_TOKEN", TOKEN)]);
    let counts = Arc::new(Counts::default());
    counts.set_allowed(&["a", "b"]);
    counts.running.store(true, Ordering::Relaxed);
    *counts.since.lock().unwrap() = Some(Instant::now());
    let mut stage = Stage {
        lb,
        setup,
        counts: Arc::clone(&counts),
        names: ports
            .iter()
            .zip(names)
            .map(|(port, name)| (*port, name.to_owned()))
            .collect(),
        reloads_before: 0,
    };
    let (port, tls_port) = (stage.lb.port, stage.setup.tls);
    wait_for(Duration::from_secs(10), "both backends", || {
        let seen: HashSet<String> = (0..6)
            .filter_map(|_| get(&stage.lb.url("/info")).ok().filter(|r| r.status == 200))
            .map(|r| container_id(&r))
            .collect();
        (seen.len() == 2).then_some(())
    });

    let sockets: Vec<_> = (0..WEBSOCKETS).map(|_| websocket(port)).collect();
    let http1 = |what, path, fresh, expect, count: fn(&Counts) -> &AtomicUsize, pace| {
        let each = Loop {
            what,
            path,
            fresh,
            expect,
            count,
            pace,
        };
        each.spawn(&stage.lb, &counts)
    };
    // The rate-limited loop stays well below the lowest limit (20/s).
    let slow = Duration::from_millis(100);
    let loops = vec![
        http1(
            "kept-alive",
            "/info",
            false,
            Expect::Allowed,
            |c| &c.kept,
            PACE,
        ),
        http1(
            "new connection",
            "/info",
            true,
            Expect::Allowed,
            |c| &c.fresh,
            PACE,
        ),
        http1(
            "cache",
            "/cache-me",
            false,
            Expect::Any,
            |c| &c.cached,
            PACE,
        ),
        http1(
            "rate-limited",
            "/limited/info",
            false,
            Expect::Backend("c"),
            |c| &c.limited,
            slow,
        ),
        spawn_loop(&counts, {
            let config = tls_client(&[&first.ca, &renewed.ca]);
            move |c| h2_loop(c, tls_port, config)
        }),
        spawn_loop(&counts, move |c| websocket_loop(c, sockets)),
    ];
    stage.settle();
    let rss_warm = rss_kib(stage.lb.proc.pid());
    let started = Instant::now();

    // A backend is killed; another is started and takes its place in the
    // file, while the certificate is renewed on disk.
    stage.kill_backend(&mut backends, 1);
    stage.settle();
    backends.push(Some(start_backend("d", ports[3])));
    renewed.install(&cert, &key);
    let mut next = stage.setup.clone();
    next.default = vec![(ports[0], 1), (ports[3], 1)];
    stage.apply(next, &["a", "b"], &["a", "d"]);
    stage.wait_for_backend("d");
    stage.wait_for_leaf(&renewed);

    // A route is added and one removed, while a PURGE runs.
    let mut next = stage.setup.clone();
    next.side_route = true;
    next.old_route = false;
    stage.save(&next, &["a", "d"]);
    let purged = request(
        "PURGE",
        &format!("http://127.0.0.1:{}/cache-me", stage.setup.admin),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    )
    .unwrap();
    assert_eq!(purged.status, 200, "{purged:?}");
    stage.reloaded(next, &["a", "d"]);
    let side = get(&stage.lb.url("/side/info")).unwrap();
    assert_eq!(container_id(&side), "c", "the added route is in force");
    let old = get(&stage.lb.url("/old")).unwrap();
    assert_ne!(old.body, "the old route", "the removed route is gone");

    // The default group's algorithm and weights change.
    let mut next = stage.setup.clone();
    next.algorithm = "least_connections";
    next.default = vec![(ports[0], 3), (ports[3], 1)];
    stage.apply(next, &["a", "d"], &["a", "d"]);

    // A broken edit is saved; while it is on disk a backend is killed and
    // another started; then the fix, with the new backend, is saved.
    let refused_before = stage.refusals();
    stage.lb.rewrite("[upstream\nservers = \n");
    wait_for(
        Duration::from_secs(10),
        "the broken edit to be refused",
        || (stage.refusals() > refused_before).then_some(()),
    );
    stage.kill_backend(&mut backends, 3);
    backends.push(Some(start_backend("e", ports[4])));
    stage.settle();
    let mut fixed = stage.setup.clone();
    fixed.default = vec![(ports[0], 3), (ports[4], 1)];
    stage.apply(fixed, &["a", "d"], &["a", "e"]);
    stage.wait_for_backend("e");

    // A rate limit changes, while the certificate is renewed again.
    first.install(&cert, &key);
    let mut next = stage.setup.clone();
    next.rate = 20;
    stage.apply(next, &["a", "e"], &["a", "e"]);
    stage.wait_for_leaf(&first);

    let took = started.elapsed();
    counts.running.store(false, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let failures = counts.failures.lock().unwrap().clone();
    let count = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let kinds = |prefix: &str| failures.iter().filter(|f| f.starts_with(prefix)).count();
    let summary = format!(
        "in {took:.0?}: {} kept-alive, {} new-connection, {} HTTP/2 over TLS ({} handshakes), \
         {} cache, {} rate-limited requests; {} WebSocket messages on {WEBSOCKETS} sockets; \
         {} failed (requests {}, broken WebSockets {}, failed handshakes {}, answers from a \
         backend not allowed {})",
        count(&counts.kept),
        count(&counts.fresh),
        count(&counts.h2),
        count(&counts.handshakes),
        count(&counts.cached),
        count(&counts.limited),
        count(&counts.messages),
        failures.len(),
        failures.len()
            - kinds("WebSocket")
            - kinds("closing WebSocket")
            - kinds("TLS")
            - kinds("HTTP/2 handshake"),
        kinds("WebSocket") + kinds("closing WebSocket"),
        kinds("TLS") + kinds("HTTP/2 handshake"),
        failures
            .iter()
            .filter(|f| f.ends_with("not allowed"))
            .count(),
    );
    eprintln!("everything at once {summary}");
    let upstream_log: Vec<String> = stage
        .lb
        .proc
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("upstream ")
                || l.contains("reload")
                || l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.contains("panicked")
                || l.contains("closed a client connection")
                || l.contains("refus")
                || (l.contains("\"GET ") && !l.contains("\" 200 "))
        })
        .map(str::to_owned)
        .collect();
    assert!(
        failures.is_empty(),
        "{summary}: {:#?}\nthe balancer's upstream, reload, warning, error, refusal and panic lines and its access-log lines of requests not answered 200: {upstream_log:#?}",
        &failures[..failures.len().min(20)]
    );
    assert!(
        count(&counts.handshakes) >= 5 && count(&counts.messages) >= WEBSOCKETS * 10,
        "the loops ran: {summary}"
    );
    // The memory comes back once the load is gone (idle connections closed,
    // caches of the request path released). What stays is what the run
    // added for good: the renewed certificates' and the reloaded
    // configurations' state, the TLS session cache, upstream connections
    // kept for reuse, the allocator's free pages (5 to 10% in most runs,
    // now and then a little more). A connection or request that leaked
    // would leave far more: the test makes about 3,000 of each kind, and a
    // request's state alone is some 25 KiB.
    let limit = rss_warm + rss_warm / 5;
    let pid = stage.lb.proc.pid();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rss_end = loop {
        let rss = rss_kib(pid);
        if rss <= limit {
            break rss;
        }
        seen.push(rss);
        assert!(
            Instant::now() < deadline,
            "the memory did not come back within 30 s: {rss_warm} KiB warm, at most {limit} KiB wanted; \
             seen after the load: {} KiB first, {} KiB lowest, {} KiB last",
            seen[0],
            seen.iter().min().unwrap_or(&rss),
            rss
        );
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("RSS: {rss_warm} KiB warm, {rss_end} KiB after");
    stage.lb.proc.assert_running("the balancer");
}
