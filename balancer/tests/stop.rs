//! The balancer's own stop (#27): on SIGTERM nothing it accepted fails.
//! Every request on a connection it accepted, or that waits in its listen
//! backlog, is served (with `Connection: close`, HTTP/2 with a `GOAWAY`);
//! new connections are no longer completed; `/health-check` answers 503
//! while the drain lasts; `shutdown_delay` keeps it serving as usual first.

#[path = "support/http2.rs"]
mod http2;
mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// What one request on a new connection came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The connection was never completed: the request went to no one.
    NotConnected(String),
    /// A whole response: its status, and whether it closed the connection.
    Answered(u16, bool),
    /// Connected, and no whole response came: a failed request.
    Failed(String),
}

fn addr(lb: &Balancer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], lb.port))
}

/// Sends `GET path` on `stream` and reads its response.
fn exchange(stream: &mut TcpStream, path: &str) -> Outcome {
    let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Outcome::Failed(format!("write: {e}"));
    }
    let text = read_response(stream);
    let Some(status) = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
    else {
        return Outcome::Failed(format!("no response, got {text:?}"));
    };
    let head = text[..text.find("\r\n\r\n").unwrap_or(text.len())].to_ascii_lowercase();
    Outcome::Answered(status, head.contains("\r\nconnection: close"))
}

/// `GET path` on a new connection.
fn get_on_new_connection(to: SocketAddr, path: &str) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
        Ok(stream) => stream,
        Err(e) => return Outcome::NotConnected(e.to_string()),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    exchange(&mut stream, path)
}

fn signal(lb: &Balancer, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &lb.proc.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name}");
}

fn wait_for_exit(lb: &mut Balancer, within: Duration) -> std::process::ExitStatus {
    wait_for(within, "the balancer to exit", || {
        lb.proc.child.try_wait().unwrap()
    })
}

fn ready(lb: &Balancer) {
    wait_for(Duration::from_secs(10), "the origin", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
}

#[test]
fn sigterm_under_a_loop_of_new_connections_fails_no_request_it_accepted() {
    let (origin, mut lb) = balancer_with("grace_period = \"5s\"");
    origin.on("/", Act::Slow(Duration::from_millis(100), 200, "done"));
    let forwarded_before = origin.hits("/");
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let to = addr(&lb);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Four clients, each request on a new connection, until one is not completed.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let outcomes = Arc::clone(&outcomes);
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let outcome = get_on_new_connection(to, "/");
                    let stop = matches!(outcome, Outcome::NotConnected(_));
                    outcomes.lock().unwrap().push(outcome);
                    if stop {
                        break;
                    }
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(10), "the loop to run", || {
        (outcomes.lock().unwrap().len() >= 8).then_some(())
    });
    lb.proc.terminate();
    let exit = wait_for_exit(&mut lb, Duration::from_secs(10));
    for c in clients {
        c.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap();
    let answered = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Answered(200, _)))
        .count();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Answered(200, _) | Outcome::NotConnected(_)))
        .collect();
    assert!(
        failed.is_empty(),
        "every completed connection is answered 200 (no 503, no reset): {failed:?}"
    );
    assert_eq!(
        answered,
        origin.hits("/") - forwarded_before,
        "every request passed on was answered"
    );
    assert!(
        outcomes.contains(&Outcome::Answered(200, true)),
        "the requests in flight at SIGTERM were answered with Connection: close: {outcomes:?}"
    );
    let log = lb.proc.log_text();
    assert!(
        log.contains("graceful stop, grace period 5s"),
        "the stop states the grace period in force: {log}"
    );
    assert!(
        !log.contains(" ERROR ") && !log.contains("300s"),
        "a clean stop logs no error and no other grace period: {log}"
    );
    assert_eq!(exit.code(), Some(0), "{log}");
}

#[test]
fn connections_waiting_in_the_listen_backlog_at_sigterm_are_served() {
    let (origin, mut lb) = balancer_with("");
    // Stopped, the balancer accepts nothing: the kernel completes the
    // connections and queues them, with their requests, in the backlog.
    // (Whether the drain or the accept loop runs first once it goes on is
    // a race: a response may or may not close its connection.)
    signal(&lb, "STOP");
    let mut waiting: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut stream = TcpStream::connect(addr(&lb)).expect("the kernel completes it");
            let request = format!("GET /queued/{i} HTTP/1.1\r\nHost: lb\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            stream
        })
        .collect();
    signal(&lb, "TERM");
    signal(&lb, "CONT");
    for (i, stream) in waiting.iter_mut().enumerate() {
        let text = read_response(stream);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "queued connection {i} is served: {text:?}\n{}",
            lb.proc.log_text()
        );
    }
    assert_eq!(origin.hits_except("/"), 20, "each was passed on once");
    let exit = wait_for_exit(&mut lb, Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", lb.proc.log_text());
}

#[test]
fn while_draining_kept_alive_connections_are_served_and_closed_and_the_health_check_fails() {
    let (origin, mut lb) = balancer_with("http2_cleartext = true");
    origin.on("/slow", Act::Slow(Duration::from_millis(1500), 200, "slow"));
    let connect = || {
        let stream = TcpStream::connect(addr(&lb)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let (mut kept, mut checker) = (connect(), connect());
    assert_eq!(exchange(&mut kept, "/"), Outcome::Answered(200, false));
    assert_eq!(
        exchange(&mut checker, "/health-check"),
        Outcome::Answered(200, false)
    );
    // A slow request keeps the drain going; an HTTP/2 connection carries another.
    let slow_url = lb.url("/slow");
    let slow = std::thread::spawn(move || get(&slow_url));
    let port = lb.port;
    let h2 = std::thread::spawn(move || {
        http2::block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let (send, connection) = h2::client::handshake(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            let uri = format!("http://127.0.0.1:{port}/slow");
            let reply = http2::get(&send, &uri, &[]).await?;
            drop(send);
            // The GOAWAY ends the connection once its last stream is served.
            let closed = tokio::time::timeout(Duration::from_secs(10), driver).await;
            Ok::<_, String>((reply.status, format!("{closed:?}")))
        })
    });
    wait_for(Duration::from_secs(5), "both slow requests", || {
        (origin.hits("/slow") == 2).then_some(())
    });
    lb.proc.terminate();
    lb.wait_for_log("graceful stop");
    assert_eq!(
        exchange(&mut kept, "/"),
        Outcome::Answered(200, true),
        "a kept-alive connection is served, and told it closes"
    );
    assert_eq!(
        exchange(&mut checker, "/health-check"),
        Outcome::Answered(503, true),
        "the health check fails from the drain's start"
    );
    assert!(
        TcpStream::connect_timeout(&addr(&lb), Duration::from_millis(500)).is_err(),
        "no new connection is completed while draining"
    );
    let slow = slow.join().unwrap().expect("the slow request is answered");
    assert_eq!((slow.status, slow.body.as_str()), (200, "slow"));
    let (status, closed) = h2.join().unwrap().expect("the HTTP/2 request is answered");
    assert_eq!(status, 200);
    assert_eq!(
        closed, "Ok(Ok(Ok(())))",
        "the HTTP/2 connection ends cleanly"
    );
    let exit = wait_for_exit(&mut lb, Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "{}", lb.proc.log_text());
}

#[test]
fn shutdown_delay_serves_as_usual_before_the_drain_starts() {
    let (_origin, mut lb) = balancer_with("shutdown_delay = \"3s\"");
    let signalled = Instant::now();
    lb.proc.terminate();
    lb.wait_for_log("SIGTERM: serving as usual for 3s (shutdown_delay), then draining");
    let request = get_on_new_connection(addr(&lb), "/");
    let health = get_on_new_connection(addr(&lb), "/health-check");
    let within = signalled.elapsed();
    assert!(
        within < Duration::from_secs(3),
        "the checks ran within the delay ({within:?} after SIGTERM)"
    );
    assert_eq!(request, Outcome::Answered(200, false), "served as usual");
    assert_eq!(health, Outcome::Answered(200, false), "still healthy");
    let exit = wait_for_exit(&mut lb, Duration::from_secs(15));
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "the drain came after the delay"
    );
    assert_eq!(exit.code(), Some(0), "{}", lb.proc.log_text());
    assert!(lb.proc.log_text().contains("graceful stop, grace period"));
}

/// A test origin and a balancer in front of it with `top` (top-level keys)
/// in its file, ready.
fn balancer_with(top: &str) -> (Origin, Balancer) {
    let origin = Origin::start();
    let lb = start_balancer(&format!("{top}\n{}", upstream_at(origin.port)));
    ready(&lb);
    (origin, lb)
}

fn upstream_at(port: u16) -> String {
    format!("[upstream]\nservers = [\"127.0.0.1:{port}\"]\n")
}

/// A rolling update on one host, as on the host network: the next balancer
/// starts beside the old one on the same port (`reuse_port`), the old one
/// gets SIGTERM, and clients on new and on kept-alive connections see no
/// failure. A connection the kernel hands the old one while it drains waits
/// for a retransmitted SYN, which the new one answers.
#[test]
fn a_rolling_update_on_one_host_with_reuse_port_fails_no_request() {
    let origin = Origin::start();
    let body = format!(
        "reuse_port = true\nshutdown_delay = \"1s\"\n{}",
        upstream_at(origin.port)
    );
    let mut old = start_balancer(&body);
    ready(&old);
    let to = addr(&old);
    let url = old.url("/");
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (running, failures) = (Arc::clone(&running), Arc::clone(&failures));
            let (answered, slowest, url) =
                (Arc::clone(&answered), Arc::clone(&slowest), url.clone());
            std::thread::spawn(move || {
                // Two clients open a connection per request, two keep theirs.
                let kept = Client::default();
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let failure = if i % 2 == 0 {
                        match get_on_new_connection(to, "/") {
                            Outcome::Answered(200, _) => None,
                            other => Some(format!("new connection: {other:?}")),
                        }
                    } else {
                        match kept.get(&url) {
                            Ok(r) if r.status == 200 => None,
                            other => Some(format!("kept-alive: {other:?}")),
                        }
                    };
                    match failure {
                        Some(f) => failures.lock().unwrap().push(f),
                        None => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let took = started.elapsed();
                            let mut slowest = slowest.lock().unwrap();
                            *slowest = (*slowest).max(took);
                        }
                    }
                }
            })
        })
        .collect();
    let count = || answered.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(Duration::from_secs(10), "the loops to run", || {
        (count() >= 20).then_some(())
    });
    let new = start_balancer_beside(&old, &body);
    old.proc.terminate();
    let exit = wait_for_exit(&mut old, Duration::from_secs(15));
    let after_old = count();
    wait_for(
        Duration::from_secs(10),
        "the loops to go on through the new one",
        || (count() >= after_old + 40).then_some(()),
    );
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(exit.code(), Some(0), "{}", old.proc.log_text());
    assert!(old.proc.log_text().contains("graceful stop"));
    eprintln!(
        "rolling update on one host: {} requests, 0 failed, the slowest took {:?}",
        count(),
        slowest.lock().unwrap()
    );
    drop(new);
}

#[test]
fn a_connection_that_sends_nothing_does_not_hold_the_stop_for_the_grace_period() {
    let (_origin, mut lb) = balancer_with("grace_period = \"20s\"");
    // A browser's preconnected socket: connected, nothing sent yet (in the
    // backlog or accepted, the drain waits for it the same way).
    let _silent = TcpStream::connect(addr(&lb)).unwrap();
    let signalled = Instant::now();
    lb.proc.terminate();
    let exit = wait_for_exit(&mut lb, Duration::from_secs(15));
    assert_eq!(exit.code(), Some(0), "{}", lb.proc.log_text());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "the stop took {:?}, not the grace period",
        signalled.elapsed()
    );
    assert!(
        lb.proc
            .log_text()
            .contains("(1 connections that sent no request closed)"),
        "{}",
        lb.proc.log_text()
    );
}
