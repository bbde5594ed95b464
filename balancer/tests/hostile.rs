//! Hostile clients and failing backends: limits, request smuggling, and
//! faults that must neither take the balancer down nor reach the client.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

fn one_origin(origin: &Origin, extra: &str) -> Balancer {
    let lb = start_balancer(&format!(
        "{extra}\n[upstream]\nservers = [\"127.0.0.1:{}\"]\nread_timeout = \"2s\"\n",
        origin.port
    ));
    wait_for(Duration::from_secs(10), "the origin", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
    lb
}

#[test]
fn smuggling_attempts_are_refused_and_never_reach_the_upstream() {
    let origin = Origin::start();
    let lb = one_origin(&origin, "");
    let cases: [(&str, &[u8]); 6] = [
        (
            "Content-Length with Transfer-Encoding",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "two different Content-Lengths",
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "obsolete line folding",
            b"GET /c HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "an invalid chunk size",
            b"POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
        ),
        (
            "an unknown transfer coding",
            b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "two transfer codings",
            b"POST /f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let (reply, closed) = raw_exchange(lb.port, bytes);
        assert!(reply.starts_with("HTTP/1.1 400 "), "{what}: {reply:?}");
        assert!(closed, "{what}: the connection is closed after the 400");
        assert_eq!(
            reply.matches("HTTP/1.1").count(),
            1,
            "{what}: one response only: {reply:?}"
        );
        assert_eq!(
            get(&lb.url("/after")).map(|r| r.status),
            Ok(200),
            "{what}: a fresh connection still works"
        );
    }
    let seen: Vec<String> = origin.seen().into_iter().map(|s| s.path).collect();
    assert!(
        !seen
            .iter()
            .any(|p| p == "/smuggled" || p == "/a" || p == "/b" || p == "/c"),
        "the upstream saw {seen:?}"
    );
}

#[test]
fn oversized_heads_and_bodies_are_refused() {
    let origin = Origin::start();
    let lb = one_origin(
        &origin,
        "[limits]\nmax_header_size = \"4KiB\"\nmax_headers = 20\nmax_body_size = \"1KiB\"",
    );
    let long = "a".repeat(5000);
    let r = get_with(&lb.url("/big-head"), &[("x-long", &long)]).unwrap();
    assert_eq!(r.status, 431, "{r:?}");
    let many: Vec<(String, String)> = (0..25)
        .map(|i| (format!("x-h{i}"), "1".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(get_with(&lb.url("/many"), &many).unwrap().status, 431);

    let declared = raw_exchange(
        lb.port,
        format!(
            "POST /declared HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{}",
            "b".repeat(2000)
        )
        .as_bytes(),
    );
    assert!(declared.0.starts_with("HTTP/1.1 413 "), "{declared:?}");
    let chunk = "c".repeat(600);
    let chunked = raw_exchange(
        lb.port,
        format!("POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n").as_bytes(),
    );
    assert!(chunked.0.starts_with("HTTP/1.1 413 "), "{chunked:?}");
    let small = raw_exchange(
        lb.port,
        b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(small.0.starts_with("HTTP/1.1 200 "), "{small:?}");
    let seen: Vec<String> = origin.seen().into_iter().map(|s| s.path).collect();
    for refused in ["/big-head", "/many", "/declared"] {
        assert!(
            !seen.iter().any(|p| p == refused),
            "{refused} reached the upstream"
        );
    }
}

#[test]
fn an_idle_client_is_cut_off_after_the_keepalive_timeout() {
    let origin = Origin::start();
    let lb = one_origin(&origin, "[limits]\nkeepalive_timeout = \"1s\"");
    let mut stream = served_connection(lb.port, "/");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let idle = Instant::now();
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(closed, "the idle connection was closed");
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
}

#[test]
fn a_client_that_pauses_less_than_the_keepalive_timeout_is_kept_however_long_it_stays() {
    let origin = Origin::start();
    let lb = one_origin(&origin, "[limits]\nkeepalive_timeout = \"2s\"");
    let mut stream = served_connection(lb.port, "/");
    // Five pauses of 1.2 s: each shorter than the timeout, all together
    // three times as long. (The waits share one timer, set for the first
    // one's deadline: it fires during the second pause and must be moved on.)
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(1200));
        stream
            .write_all(format!("GET /again-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("pause {i}: the connection was closed: {e}"));
        let reply = read_response(&mut stream);
        assert!(
            reply.starts_with("HTTP/1.1 200 "),
            "after pause {i}: {reply:?}"
        );
    }
    // ...and then, idle, it is closed after the timeout.
    let idle = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let after = idle.elapsed();
    assert!(closed, "the idle connection was closed");
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(6),
        "closed after {after:?}"
    );
}

/// A group of two origins, both answering through the balancer: one to
/// stay good, one for the test to make bad.
fn good_and_bad() -> (Origin, Origin, Balancer) {
    let good = Origin::start();
    let bad = Origin::start();
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nread_timeout = \"2s\"\n",
        good.port, bad.port
    ));
    wait_for(Duration::from_secs(10), "both origins", || {
        (get(&lb.url("/")).is_ok_and(|r| r.status == 200) && bad.hits_except("") > 0).then_some(())
    });
    (good, bad, lb)
}

#[test]
fn failing_backends_fail_no_get_while_another_is_healthy() {
    let (good, bad, lb) = good_and_bad();
    for (what, act) in [
        ("drops the request", Act::Drop),
        ("cuts its answer short", Act::Cut),
    ] {
        bad.on("/", act);
        for i in 0..6 {
            let r = get(&lb.url(&format!("/x{i}"))).unwrap();
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "origin"),
                "when a backend {what}"
            );
        }
        assert!(
            bad.seen().iter().any(|s| s.path.starts_with("/x")),
            "the bad backend was tried ({what})"
        );
    }
    // A request that is not safe to repeat is not repeated.
    bad.on("/", Act::Drop);
    let posts: Vec<u16> = (0..4)
        .map(|i| raw_exchange(lb.port, format!("POST /p{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()))
        .map(|(reply, _)| reply.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0))
        .collect();
    assert!(
        posts.contains(&502),
        "a dropped POST is a 502, not a retry: {posts:?}"
    );
    let posted: usize = (0..4)
        .map(|i| {
            good.seen()
                .iter()
                .chain(bad.seen().iter())
                .filter(|s| s.path == format!("/p{i}"))
                .count()
        })
        .sum();
    assert_eq!(posted, 4, "each POST reached one backend once");
    assert_eq!(get(&lb.url("/")).unwrap().status, 200, "still serving");
}

#[test]
fn a_backend_that_dies_in_its_answer_is_not_tried_again_into_that_answer() {
    let (good, bad, lb) = good_and_bad();
    // The head (200, 100 bytes to come) and 7 bytes of the body, then the
    // connection closes: the client has been answered in part, and a GET
    // sent again to the good backend would put its body after the 7 bytes.
    bad.on("/", Act::CutBody);
    let mut cut = 0;
    for i in 0..8 {
        let path = format!("/y{i}");
        let (reply, _) = raw_exchange(
            lb.port,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let went_bad = bad.seen().iter().any(|s| s.path == path);
        let went_good = good.seen().iter().any(|s| s.path == path);
        if went_bad {
            cut += 1;
            assert!(
                !went_good,
                "{path}: tried again on the good backend after the bad one had begun to answer: {reply:?}"
            );
            assert!(
                !reply.contains("origin"),
                "{path}: another backend's body in the answer: {reply:?}"
            );
        } else {
            assert!(
                reply.starts_with("HTTP/1.1 200") && reply.ends_with("origin"),
                "{path}: {reply:?}"
            );
        }
    }
    assert!(cut > 0, "the bad backend was tried");
    assert_eq!(get(&lb.url("/")).unwrap().status, 200, "still serving");
}

/// A keep-alive connection that has had one request answered 200.
fn served_connection(port: u16, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let reply = read_response(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 200 "), "{path}: {reply:?}");
    stream
}

/// Sends `head` on `stream` a few bytes at a time, one piece every 100 ms, for
/// as long as the server keeps the connection open (at most `for_at_most`);
/// then reads what the server answered. Returns (answer, whether the server
/// ended the connection before the client had finished).
fn trickle(mut stream: TcpStream, head: &str, for_at_most: Duration) -> (String, bool) {
    let started = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let pieces: Vec<u8> = head.bytes().collect();
    let sender = std::thread::spawn(move || {
        // The piece size stretches the head over `for_at_most`.
        let per_piece = (pieces.len() / (for_at_most.as_millis() as usize / 100)).max(1);
        for piece in pieces.chunks(per_piece) {
            if writer.write_all(piece).is_err() {
                return;
            }
            // The client's slowness is what is tested.
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    stream
        .set_read_timeout(Some(for_at_most + Duration::from_secs(5)))
        .unwrap();
    let (answer, _) = read_to_close(&mut stream);
    let cut_early = started.elapsed() < for_at_most;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sender.join().unwrap();
    (answer, cut_early)
}

#[test]
fn a_request_head_sent_too_slowly_is_cut_off_but_a_slow_body_or_an_idle_pause_is_not() {
    let origin = Origin::start();
    let admin = free_port();
    let lb = one_origin(
        &origin,
        &format!("admin_listen = \"127.0.0.1:{admin}\"\n[limits]\nclient_header_timeout = \"1s\""),
    );
    // Each piece arrives long before Pingora's 60 s per read, but the whole
    // head would take 10 s: the connection is answered 408 and closed first.
    let slow_head = format!(
        "GET /slowloris HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Pad: y\r\n".repeat(20)
    );
    let fresh = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    let (answer, cut_early) = trickle(fresh, &slow_head, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(cut_early, "the client was cut off while still sending");

    // The same on a kept-alive connection's second request.
    let kept = served_connection(lb.port, "/first");
    let (answer, cut_early) = trickle(kept, &slow_head, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(cut_early);

    // A client that connects and sends nothing is closed without an answer
    // (a browser's preconnected socket must not read a stray 408).
    let (answer, closed) = raw_exchange(lb.port, b"");
    assert_eq!((answer.as_str(), closed), ("", true));
    assert!(
        !origin.saw_path("/slowloris"),
        "the slow head never reached the upstream"
    );

    // A body may take longer than the head's limit...
    let head = "POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n";
    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    for _ in 0..20 {
        // The client's slowness is what is tested.
        std::thread::sleep(Duration::from_millis(100));
        stream.write_all(b"b").unwrap();
    }
    let reply = read_response(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
    assert!(origin.saw_path("/slow-body"));

    // ...and a kept-alive client may pause between requests (that wait is
    // keepalive_timeout's, 60 s here) before sending its next head at once.
    // The pause, longer than client_header_timeout, is what is tested.
    std::thread::sleep(Duration::from_millis(1500));
    stream
        .write_all(b"GET /after-a-pause HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut stream);
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");

    assert_eq!(
        sample(&scrape(admin), "balancer_client_header_timeouts_total"),
        3.0,
        "two slow heads and one silent client"
    );
    assert_eq!(status(admin)["connections"]["header_timeouts"], 3);
}

#[test]
fn connections_beyond_max_connections_are_answered_503_and_the_limit_reloads_live() {
    let origin = Origin::start();
    let admin = free_port();
    let settings = |max: u32| {
        format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n[limits]\nmax_connections = {max}\n\
             [upstream]\nservers = [\"127.0.0.1:{}\"]\n",
            origin.port
        )
    };
    let lb = start_balancer(&settings(2));
    let mut first = served_connection(lb.port, "/one");
    let _second = served_connection(lb.port, "/two");

    let (reply, closed) = raw_exchange(lb.port, b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 503 "), "{reply:?}");
    assert!(reply.contains("Retry-After: 1"), "{reply:?}");
    assert!(reply.ends_with("too many open connections; try again in a moment\n"));
    assert!(closed, "the refused connection is closed");
    assert!(!origin.saw_path("/three"));

    // The connections already open go on being served.
    first
        .write_all(b"GET /one-again HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut first).starts_with("HTTP/1.1 200 "));
    let s = status(admin);
    assert_eq!(s["connections"]["open"], 2, "{s}");
    assert_eq!(s["connections"]["max"], 2);
    assert_eq!(s["connections"]["refused"], 1);
    let metrics = scrape(admin);
    assert_eq!(
        sample(&metrics, "balancer_client_connections_refused_total"),
        1.0
    );
    assert_eq!(sample(&metrics, "balancer_client_connections_open"), 2.0);

    // A closed connection frees its place.
    drop(first);
    let third = wait_for(Duration::from_secs(10), "a free place", || {
        let (reply, _) = raw_exchange(
            lb.port,
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        reply.starts_with("HTTP/1.1 200 ").then_some(reply)
    });
    assert!(third.ends_with("origin"), "{third:?}");

    // Raising the limit takes effect without a restart.
    let _third = served_connection(lb.port, "/held");
    lb.rewrite(&settings(3));
    lb.wait_for_log("limits.max_connections 2 -> 3");
    let _fourth = served_connection(lb.port, "/fourth");
    assert_eq!(status(admin)["connections"]["open"], 3);
}
