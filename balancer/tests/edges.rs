//! Edges of HTTP/1 that real clients reach: answers to requests refused
//! before their body was read (the lingering close), pipelining, HTTP/1.0,
//! methods and request lines the balancer refuses, what reaches the log, a
//! backend that accepts no connection, a config file that is not TOML, and
//! who may `PURGE` on the admin listener.

mod support;

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const MIB: usize = 1 << 20;

/// One HTTP/1.1 response as it came over the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits what a connection received into its responses, each framed by
/// `Content-Length`, chunked coding, or (the last one only) the close.
/// An error says where the bytes stopped making sense.
fn responses(received: &str) -> Result<Vec<Wire>, String> {
    let mut rest = received;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .find("\r\n\r\n")
            .ok_or_else(|| format!("an incomplete head after {} responses: {rest:?}", out.len()))?;
        let mut lines = rest[..end].split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not a status line: {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let after = &rest[end + 4..];
        let (body, next) = if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            dechunk(after)?
        } else if let Some(length) = find("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("a bad Content-Length: {length:?}"))?;
            if after.len() < length {
                return Err(format!(
                    "a body cut short: {} of {length} bytes: {after:?}",
                    after.len()
                ));
            }
            (after[..length].to_owned(), &after[length..])
        } else {
            (after.to_owned(), "")
        };
        out.push(Wire {
            status,
            headers,
            body,
        });
        rest = next;
    }
    Ok(out)
}

/// Decodes a chunked body: (the body, what follows it).
fn dechunk(mut rest: &str) -> Result<(String, &str), String> {
    let mut body = String::new();
    loop {
        let line_end = rest
            .find("\r\n")
            .ok_or_else(|| format!("a chunk size line cut short: {rest:?}"))?;
        let size =
            usize::from_str_radix(rest[..line_end].split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("a bad chunk size: {:?}", &rest[..line_end]))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // No trailers are expected: the empty line ends the body.
            return rest
                .strip_prefix("\r\n")
                .map(|next| (body, next))
                .ok_or_else(|| format!("no end after the last chunk: {rest:?}"));
        }
        if rest.len() < size + 2 {
            return Err(format!("a chunk cut short: {rest:?}"));
        }
        body.push_str(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Exactly one complete response, or a failure that shows what came.
fn only_response(received: &str, what: &str) -> Wire {
    let mut all = responses(received)
        .unwrap_or_else(|e| panic!("{what}: expected one complete response, got {e}"));
    assert_eq!(
        all.len(),
        1,
        "{what}: expected exactly one response, got {}: {received:?}",
        all.len()
    );
    all.remove(0)
}

/// What a client that writes its whole request before it reads (Python's
/// `http.client`, curl without `Expect`) gets back.
struct WholeRequest {
    /// Whether all of the head and body could be written, or the error.
    written: Result<(), String>,
    received: String,
    closed: bool,
}

/// Writes `head` and then `body_len` bytes of body with blocking writes, and
/// only then reads the answer until the connection closes.
fn send_whole_request_then_read(port: u16, head: &str, body_len: usize) -> WholeRequest {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A server that stops reading without closing fails the write, not the test run.
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().expect("clone");
    let head = head.to_owned();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(head.as_bytes())?;
        let chunk = vec![b'x'; MIB];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let written = sender
        .join()
        .expect("the writing thread")
        .map_err(|e| format!("{e} ({:?})", e.kind()));
    let (received, closed) = read_to_close(&mut stream);
    WholeRequest {
        written,
        received,
        closed,
    }
}

/// The body a client writes: `n` bytes.
fn filler(n: usize) -> String {
    "x".repeat(n)
}

#[test]
fn a_client_that_writes_a_whole_oversized_body_before_reading_reads_the_413() {
    let origin = Origin::start();
    let lb = in_front_of(&origin, "");
    for (path, size) in [("/upload-200mb", 200 * MIB), ("/upload-20mb", 20 * MIB)] {
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        let got = send_whole_request_then_read(lb.port, &head, size);
        assert_eq!(
            got.written,
            Ok(()),
            "{path}: expected all {size} bytes to be written while the balancer lingers; \
             the write failed; then read: {:?}",
            got.received
        );
        let reply = only_response(&got.received, path);
        assert!(
            got.received.starts_with("HTTP/1.1 413 ") && reply.body.contains("content too large"),
            "{path}: expected a whole `HTTP/1.1 413` whose body says `content too large`, got {:?}",
            got.received
        );
        assert!(
            got.closed,
            "{path}: expected the connection closed after the 413"
        );
        assert_eq!(
            origin.hits(path),
            0,
            "{path}: expected no request at the upstream, it saw {:?}",
            origin.seen()
        );
    }
    assert_eq!(
        origin.hits_except("/"),
        0,
        "expected the upstream to see nothing but the readiness GETs, it saw {:?}",
        origin.seen()
    );
}

#[test]
fn a_431_and_a_smuggling_400_reach_a_client_that_writes_20_mb_before_reading() {
    let origin = Origin::start();
    let lb = in_front_of(&origin, "");
    let size = 20 * MIB;
    // Host and Content-Length and 99 more: 101 header fields, one beyond max_headers.
    let many: String = (0..99).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let cases = [
        (
            "/too-many-fields",
            format!(
                "POST /too-many-fields HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n{many}\r\n"
            ),
            431,
            "request header fields too large",
        ),
        (
            "/length-and-chunked",
            format!(
                "POST /length-and-chunked HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            ),
            400,
            "bad request",
        ),
    ];
    for (path, head, status, reason) in cases {
        let got = send_whole_request_then_read(lb.port, &head, size);
        assert_eq!(
            got.written,
            Ok(()),
            "{path}: expected the whole 20 MB written while the balancer lingers; then read: {:?}",
            got.received
        );
        let reply = only_response(&got.received, path);
        assert!(
            got.received.starts_with(&format!("HTTP/1.1 {status} ")) && reply.body.contains(reason),
            "{path}: expected a whole `HTTP/1.1 {status}` saying {reason:?}, got {:?}",
            got.received
        );
        assert!(
            got.closed,
            "{path}: expected the connection closed after the {status}"
        );
        assert_eq!(
            origin.hits(path),
            0,
            "{path}: expected no request at the upstream, it saw {:?}",
            origin.seen()
        );
    }
}

#[test]
fn a_client_that_keeps_sending_after_a_413_is_cut_off_after_lingering_time() {
    let origin = Origin::start();
    let lb = in_front_of(
        &origin,
        "[limits]\nlingering_time = \"2s\"\nlingering_timeout = \"1s\"",
    );
    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"POST /endless HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        .unwrap();
    stream
        .write_all(filler(2 * MIB).as_bytes())
        .expect("the first 2 MB are read (and discarded) by the balancer");
    let answer = read_response(&mut stream);
    let answered = Instant::now();
    assert!(
        answer.starts_with("HTTP/1.1 413 ") && answer.contains("content too large"),
        "expected a 413 while the body was still being sent, got {answer:?}"
    );

    // Keep sending, as an endless upload would, until the balancer gives up.
    let chunk = vec![b'y'; 64 << 10];
    let mut sent = 0usize;
    let failure = loop {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        assert!(
            answered.elapsed() < Duration::from_secs(15),
            "expected the connection cut after lingering_time (2s); still writing after \
             {:?} and {sent} bytes",
            answered.elapsed()
        );
    };
    let after = answered.elapsed();
    assert!(
        !matches!(failure.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "expected the balancer to close the connection; it stopped reading but left it open \
         (write blocked for 5s after {after:?}, {sent} bytes)"
    );
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_secs(10),
        "expected writes to fail about lingering_time (2s) after the 413; they failed after \
         {after:?} ({failure}, {sent} bytes sent meanwhile)"
    );
    assert!(
        sent > MIB,
        "expected the balancer to read what was sent while lingering; only {sent} bytes went \
         through before {failure} after {after:?}"
    );
}

#[test]
fn a_client_that_goes_quiet_after_a_413_is_closed_after_lingering_timeout() {
    let origin = Origin::start();
    let admin = free_port();
    let lb = in_front_of(
        &origin,
        &format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n\
             [limits]\nlingering_time = \"30s\"\nlingering_timeout = \"1s\""
        ),
    );
    let lingering = || status(admin)["connections"]["lingering"].as_u64();
    assert_eq!(lingering(), Some(0), "expected nothing lingering at first");

    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(
            format!(
                "POST /quiet HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
                20 * MIB,
                filler(64 << 10)
            )
            .as_bytes(),
        )
        .unwrap();
    let answer = read_response(&mut stream);
    let answered = Instant::now();
    assert!(
        answer.starts_with("HTTP/1.1 413 "),
        "expected a 413 with the body outstanding, got {answer:?}"
    );
    let (more, closed) = read_to_close(&mut stream);
    assert!(
        closed && more.is_empty(),
        "expected EOF right after the 413 within 5s, got closed={closed} after {:?} with {more:?}",
        answered.elapsed()
    );

    // The half-close above says nothing of when the socket is let go: the
    // admin listener counts the connections that are still read from.
    wait_for(
        Duration::from_secs(5),
        "the refused connection to be counted as lingering",
        || (lingering() == Some(1)).then_some(()),
    );
    wait_for(
        Duration::from_secs(10),
        "the lingering connection to be closed",
        || (lingering() == Some(0)).then_some(()),
    );
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after <= Duration::from_secs(5),
        "expected the quiet connection closed about lingering_timeout (1s) after the 413, \
         not lingering_time (30s); it was closed after {after:?}"
    );
    // The client sees it too: what it sends now is answered with a reset.
    wait_for(
        Duration::from_secs(3),
        "a write on the closed connection to fail",
        || stream.write_all(b"z").err(),
    );
}

#[test]
fn refusals_and_slow_heads_are_info_not_errors_or_pingora_warnings() {
    let origin = Origin::start();
    let admin = free_port();
    let lb = in_front_of(
        &origin,
        &format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n\
             [limits]\nclient_header_timeout = \"1s\"\nlingering_timeout = \"1s\""
        ),
    );
    let big = send_whole_request_then_read(
        lb.port,
        &format!(
            "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            20 * MIB
        ),
        20 * MIB,
    );
    assert!(
        big.received.starts_with("HTTP/1.1 413 "),
        "{:?}",
        big.received
    );

    // A slowloris head: part of it, then nothing.
    let mut slow = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (answer, closed) = read_to_close(&mut slow);
    assert!(
        answer.starts_with("HTTP/1.1 408 ") && closed,
        "expected a 408 and a close for a head not finished within 1s, got closed={closed} {answer:?}"
    );

    let many: String = (0..100).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let refused: [(&str, String, &str); 3] = [
        (
            "101 header fields",
            format!("GET /many HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            "HTTP/1.1 431 ",
        ),
        (
            "Content-Length with Transfer-Encoding",
            "POST /both HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello"
                .to_owned(),
            "HTTP/1.1 400 ",
        ),
        ("TRACE", "TRACE / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), "HTTP/1.1 405 "),
    ];
    for (what, request, expected) in refused {
        let (reply, _) = raw_exchange(lb.port, request.as_bytes());
        assert!(
            reply.starts_with(expected),
            "{what}: expected {expected:?}, got {reply:?}"
        );
    }
    // Whatever the connections log as they end, they have ended.
    wait_for(Duration::from_secs(10), "no connection lingering", || {
        (status(admin)["connections"]["lingering"].as_u64() == Some(0)).then_some(())
    });

    let log = lb.proc.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "expected no ERROR line, got {errors:#?}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(" pingora"))
        .collect();
    assert!(
        warnings.is_empty(),
        "expected no WARN line from pingora, got {warnings:#?}"
    );
    let info = |text: &str| {
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(text))
    };
    assert!(
        info("refused POST /big from 127.0.0.1 with 413"),
        "expected an INFO line `refused POST /big from 127.0.0.1 with 413: ...`, the log is:\n{log}"
    );
    assert!(
        info("client_header_timeout"),
        "expected an INFO line naming client_header_timeout, the log is:\n{log}"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_proxied_cached_or_not() {
    let port = free_port();
    let _backend = start_backend("piped", port);
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{port}\"]\n\
         [cache]\n[[cache.rule]]\npath = \"/cache-me\"\nttl = \"30s\"\n"
    ));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );
    let (received, closed) = raw_exchange(
        lb.port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /cache-me HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        closed,
        "expected the close asked for by the last request: {received:?}"
    );
    let replies = responses(&received)
        .unwrap_or_else(|e| panic!("expected three whole responses, got {e}; all: {received:?}"));
    let got: Vec<(u16, &str)> = replies
        .iter()
        .map(|r| (r.status, r.body.as_str()))
        .collect();
    assert_eq!(got.len(), 3, "expected three responses, got {got:?}");
    assert_eq!(
        got[0],
        (200, "Hello World!"),
        "the first answer is `/`'s: {got:?}"
    );
    assert!(
        got[1].0 == 200 && got[1].1.contains("This response was generated"),
        "the second answer is /cache-me's: {got:?}"
    );
    let info: Result<serde_json::Value, _> = serde_json::from_str(got[2].1);
    assert!(
        got[2].0 == 200 && info.is_ok_and(|i| i["container_id"] == "piped"),
        "the third answer is /info's JSON: {got:?}"
    );

    // Ten at once, proxied ones and cache hits in between.
    let origin = Origin::start();
    const NAMES: [&str; 7] = ["p0", "p1", "p2", "p3", "p4", "p5", "p6"];
    for name in NAMES {
        origin.on(&format!("/{name}"), Act::Answer(200, name));
    }
    origin.on("/cache-me", Act::Answer(200, "cached {n}"));
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{}\"]\n\
         [cache]\n[[cache.rule]]\npath = \"/cache-me\"\nttl = \"30s\"\n",
        origin.port
    ));
    // Cached under the same Host as the pipelined requests send: it is part of the key.
    let stored = wait_for(Duration::from_secs(10), "/cache-me to be cached", || {
        let (received, _) = raw_exchange(
            lb.port,
            b"GET /cache-me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        responses(&received)
            .ok()?
            .pop()
            .filter(|r| r.header("x-cache-status") == Some("HIT"))
    });
    let order = [
        "/p0",
        "/cache-me",
        "/p1",
        "/p2",
        "/cache-me",
        "/p3",
        "/p4",
        "/cache-me",
        "/p5",
        "/p6",
    ];
    let mut pipeline = String::new();
    for (i, path) in order.iter().enumerate() {
        let close = if i == order.len() - 1 {
            "Connection: close\r\n"
        } else {
            ""
        };
        pipeline.push_str(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n{close}\r\n"));
    }
    let (received, closed) = raw_exchange(lb.port, pipeline.as_bytes());
    assert!(
        closed,
        "expected the close asked for by the last request: {received:?}"
    );
    let replies = responses(&received)
        .unwrap_or_else(|e| panic!("expected ten whole responses, got {e}; all: {received:?}"));
    let got: Vec<(u16, &str, Option<&str>)> = replies
        .iter()
        .map(|r| (r.status, r.body.as_str(), r.header("x-cache-status")))
        .collect();
    let expected: Vec<(u16, &str, Option<&str>)> = order
        .iter()
        .map(|p| match *p {
            "/cache-me" => (200, stored.body.as_str(), Some("HIT")),
            p => (200, &p[1..], None),
        })
        .collect();
    assert_eq!(got, expected, "expected ten answers in request order");
    assert_eq!(
        origin.hits("/cache-me"),
        1,
        "expected the cache hits answered without the upstream, which saw {:?}",
        origin.seen()
    );
}

#[test]
fn http_1_0_needs_no_host_but_http_1_1_does() {
    let port = free_port();
    let _backend = start_backend("old", port);
    let lb = start_balancer(&format!("[upstream]\nservers = [\"127.0.0.1:{port}\"]\n"));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );
    // Whether the connection then closes is the next test's concern.
    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let received = read_response(&mut stream);
    let reply = only_response(&received, "GET / HTTP/1.0");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Hello World!"),
        "expected the backend's answer to an HTTP/1.0 request without Host, got {received:?}"
    );
    assert!(
        reply.header("transfer-encoding").is_none(),
        "expected no chunked coding for an HTTP/1.0 client, got {received:?}"
    );

    let (received, _) = raw_exchange(lb.port, b"GET / HTTP/1.1\r\n\r\n");
    let reply = only_response(&received, "GET / HTTP/1.1 without Host");
    assert!(
        reply.status == 400 && reply.body.starts_with("400"),
        "expected the balancer's own 400 for HTTP/1.1 without Host, got {received:?}"
    );
}

#[test]
fn an_http_1_0_request_without_keep_alive_is_answered_and_closed() {
    let origin = Origin::start();
    let lb = in_front_of(&origin, "");
    // Persistence is not HTTP/1.0's default (RFC 9112, section 9.3): a
    // client that reads its answer until the close must get the close.
    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .write_all(b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let (received, closed) = read_to_close(&mut stream);
    let reply = only_response(&received, "GET /old HTTP/1.0");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "origin"),
        "expected the origin's answer, got {received:?}"
    );
    assert!(
        closed
            && !reply
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("keep-alive")),
        "expected the connection closed after the answer to an HTTP/1.0 request without \
         `Connection: keep-alive`; closed={closed} (read for 3s) after {received:?}"
    );
}

#[test]
fn trace_is_refused_405_with_allow_and_not_forwarded() {
    let origin = Origin::start();
    let lb = in_front_of(&origin, "");
    let before = origin.hits("/");
    let (received, _) = raw_exchange(lb.port, b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n");
    let reply = only_response(&received, "TRACE /");
    assert_eq!(
        reply.status, 405,
        "expected 405 for TRACE, got {received:?}"
    );
    assert!(
        reply.header("allow").is_some_and(|a| a.contains("GET")),
        "expected an Allow header listing GET, got {received:?}"
    );
    assert_eq!(
        origin.hits("/"),
        before,
        "expected TRACE not forwarded; the upstream saw {:?}",
        origin.seen()
    );
}

#[test]
fn a_request_target_with_a_space_is_refused_400_and_not_forwarded() {
    let origin = Origin::start();
    let lb = in_front_of(&origin, "");
    let (received, closed) = raw_exchange(lb.port, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n");
    let reply = only_response(&received, "GET /a b");
    assert_eq!(reply.status, 400, "expected 400, got {received:?}");
    assert!(closed, "expected the connection closed after the 400");

    // The same as the second request of a kept-alive connection.
    let mut stream = TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let first = read_response(&mut stream);
    assert!(first.starts_with("HTTP/1.1 200 "), "{first:?}");
    stream
        .write_all(b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let second = read_response(&mut stream);
    assert!(
        second.starts_with("HTTP/1.1 400 "),
        "expected 400 for `GET /a b` after a served request, got {second:?}"
    );

    let seen: Vec<String> = origin.seen().into_iter().map(|s| s.path).collect();
    assert!(
        !seen.iter().any(|p| p.starts_with("/a")),
        "expected nothing forwarded; the upstream saw {seen:?}"
    );
}

#[test]
fn health_check_probes_are_access_logged_only_when_asked() {
    let origin = Origin::start();
    let probes_then_x = b"GET /health-check HTTP/1.1\r\nHost: x\r\n\r\n\
                          GET /health-check HTTP/1.1\r\nHost: x\r\n\r\n\
                          GET /health-check HTTP/1.1\r\nHost: x\r\n\r\n\
                          GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for (setting, logged_probes) in [("", 0), ("log_health_checks = true", 3)] {
        let lb = in_front_of(&origin, setting);
        // One connection: its requests are logged in the order they are served.
        let (received, _) = raw_exchange(lb.port, probes_then_x);
        let statuses: Vec<u16> = responses(&received)
            .unwrap_or_else(|e| panic!("{setting:?}: expected four responses, got {e}"))
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [200, 200, 200, 200], "{setting:?}: {received:?}");
        lb.wait_for_log("access] 127.0.0.1 \"GET /x ");
        let log = lb.proc.log_text();
        let probes = log
            .lines()
            .filter(|l| l.contains(" access] ") && l.contains("\"GET /health-check "))
            .count();
        assert_eq!(
            probes, logged_probes,
            "{setting:?}: expected {logged_probes} access lines for /health-check, the log is:\n{log}"
        );
    }
}

#[test]
fn a_backend_that_accepts_no_connection_in_time_is_a_504_naming_connect_timeout() {
    // A listener that never accepts: once its backlog is full, Linux drops
    // further SYNs, and connecting to it times out.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().unwrap();
    let mut held = Vec::new();
    let full = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == ErrorKind::TimedOut => break true,
            Err(e) => panic!(
                "filling the backlog of {addr}: {e} after {} connections",
                held.len()
            ),
        }
        if held.len() > 5000 {
            break false;
        }
    };
    assert!(
        full,
        "expected a connect to time out once the backlog is full; {} connections were accepted \
         into it without one timing out",
        held.len()
    );

    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"{addr}\"]\nconnect_timeout = \"500ms\"\n"
    ));
    let asked = Instant::now();
    let reply = get(&lb.url("/nobody-home")).expect("an answer from the balancer");
    let took = asked.elapsed();
    assert!(
        reply.status == 504
            && reply
                .body
                .contains("could not connect to the upstream server within connect_timeout"),
        "expected a 504 naming connect_timeout, got {reply:?} after {took:?}; log:\n{}",
        lb.proc.log_text()
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "expected the 504 after about connect_timeout (500ms), it came after {took:?}"
    );
}

#[test]
fn a_toml_syntax_error_is_reported_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[upstream\nservers = [\"b:1\"]\n").unwrap();
    let (code, output) = run_balancer(&["--config", path.to_str().unwrap(), "--check"]);
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(code, 1, "expected exit code 1, got {code}: {output:?}");
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line message, got {} lines: {output:?}",
        lines.len()
    );
}

/// PURGE /x on the admin listener at `admin` with these headers: (status, body).
fn purge(admin: u16, headers: &[(&str, &str)]) -> (u16, String) {
    let url = format!("http://127.0.0.1:{admin}/x");
    let reply = wait_for(Duration::from_secs(10), "the admin listener", || {
        request("PURGE", &url, headers).ok()
    });
    (reply.status, reply.body)
}

#[test]
fn purge_needs_the_admin_token_when_one_is_set_or_the_listener_is_not_loopback() {
    let origin = Origin::start();
    let servers = format!("[upstream]\nservers = [\"127.0.0.1:{}\"]\n", origin.port);

    // Loopback and no token: whoever can reach it may purge.
    let admin = free_port();
    let _open = start_balancer(&format!("admin_listen = \"127.0.0.1:{admin}\"\n{servers}"));
    let (code, body) = purge(admin, &[]);
    assert!(
        code == 200 || code == 404,
        "loopback, no token: expected PURGE allowed (200 or 404), got {code} {body:?}"
    );

    // A token from the environment, or from a file.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let admin_env = free_port();
    let _from_env = start_balancer_with_env(
        &format!("admin_listen = \"127.0.0.1:{admin_env}\"\n{servers}"),
        &[("BALANCER_ADMIN_TOKEN", "s3cret")],
    );
    let admin_file = free_port();
    let _from_file = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin_file}\"\nadmin_token_file = {:?}\n{servers}",
        token_file.to_str().unwrap()
    ));
    for (how, admin) in [("env", admin_env), ("file", admin_file)] {
        let (code, body) = purge(admin, &[]);
        assert!(
            code == 401 && body.contains("Authorization: Bearer"),
            "token from {how}, none sent: expected 401 naming `Authorization: Bearer`, got {code} {body:?}"
        );
        let (code, body) = purge(admin, &[("Authorization", "Bearer wrong")]);
        assert_eq!(code, 401, "token from {how}, a wrong one sent: {body:?}");
        let (code, body) = purge(admin, &[("Authorization", "Bearer s3cret")]);
        assert!(
            code == 200 || code == 404,
            "token from {how}, the right one sent: expected PURGE allowed, got {code} {body:?}"
        );
    }

    // Not loopback and no token: nobody may purge, anyone may look.
    let admin_any = free_port();
    let _exposed = start_balancer(&format!(
        "admin_listen = \"0.0.0.0:{admin_any}\"\n{servers}"
    ));
    let (code, body) = purge(admin_any, &[]);
    assert!(
        code == 401 && body.contains("BALANCER_ADMIN_TOKEN"),
        "0.0.0.0, no token: expected 401 naming BALANCER_ADMIN_TOKEN, got {code} {body:?}"
    );
    let status = get(&format!("http://127.0.0.1:{admin_any}/status")).expect("GET /status");
    assert_eq!(
        status.status, 200,
        "0.0.0.0, no token: expected GET /status open, got {status:?}"
    );
}
