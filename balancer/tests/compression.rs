//! Response compression (`[compression]`) on real sockets: the encoding the
//! client's `Accept-Encoding` chooses, every case that is never compressed,
//! `Vary` and the weak `ETag`, bodies decompressed by real clients (curl
//! `--compressed`, Python's `gzip`, `brotli` and `zstandard`), a route that
//! turns it off, the cache, HTTP/2, and a reload that turns it on.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// A JSON body of 10 KiB, the same on every answer.
fn json_body() -> &'static str {
    let item = r#"{"id":12345,"name":"an item","tags":["one","two","three"],"price":9.99},"#;
    let mut body = String::from("[");
    while body.len() < 10 * 1024 {
        body.push_str(item);
    }
    body.pop();
    body.push(']');
    Box::leak(body.into_boxed_str())
}

/// What a request got back, as curl saw it on the wire (the body as sent,
/// not decoded).
#[derive(Debug)]
struct Fetched {
    version: String,
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn encoding(&self) -> &str {
        self.header("content-encoding").unwrap_or("identity")
    }
}

/// `curl ARGS URL`, the body kept as it came (no `--compressed` unless in ARGS).
fn fetch(url: &str, args: &[&str]) -> Fetched {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_version}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head).unwrap();
    // After a 100 Continue or the like, the last head is the answer's.
    let last = head
        .trim_end()
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default();
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers
                .entry(name.trim().to_ascii_lowercase())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    Fetched {
        version: String::from_utf8_lossy(&out.stdout).into_owned(),
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// `body`, decoded from `encoding` by Python's own decoders.
fn python_decode(encoding: &str, body: &[u8]) -> String {
    let script = match encoding {
        "gzip" => "import gzip, sys; sys.stdout.buffer.write(gzip.decompress(sys.stdin.buffer.read()))",
        "br" => "import brotli, sys; sys.stdout.buffer.write(brotli.decompress(sys.stdin.buffer.read()))",
        "zstd" => "import zstandard, sys; d = zstandard.ZstdDecompressor().decompressobj(); sys.stdout.buffer.write(d.decompress(sys.stdin.buffer.read())); assert d.eof, 'the zstd frame does not end'",
        other => panic!("no decoder for {other}"),
    };
    // The system Python, which has the Debian packages python3-brotli and
    // python3-zstandard (`.ci/run` installs them).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python could not decode {encoding}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// A balancer with `[compression]` (`compression` is the section's body)
/// in front of `origin`; `rest` (top-level keys, then tables) goes first.
fn compressing(origin: &Origin, compression: &str, rest: &str) -> Balancer {
    in_front_of(origin, &format!("{rest}\n[compression]\n{compression}\n"))
}

fn ae(value: &str) -> [String; 2] {
    ["-H".to_owned(), format!("Accept-Encoding: {value}")]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn accept_encoding_chooses_the_algorithm_and_real_clients_decode_the_body() {
    let origin = Origin::start();
    let body = json_body();
    origin.on(
        "/json",
        Act::Exact(
            200,
            vec![("content-type", "application/json"), ("etag", "\"v1\"")],
            body,
        ),
    );
    let lb = compressing(&origin, "algorithms = [\"gzip\", \"br\", \"zstd\"]", "");
    let url = lb.url("/json");
    for (accept, expected) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip;q=0.5, br;q=0.9, zstd;q=0.1", "br"),
        ("zstd;q=0.5, br;q=0.5, gzip;q=0.5", "gzip"), // the list's order
        ("deflate, zstd", "zstd"),
        ("identity;q=0, zstd", "zstd"),
        ("*", "gzip"),
        ("*;q=0.5, gzip;q=0", "br"),
        ("gzip;q=0, br;q=0, zstd;q=0", "identity"),
        ("identity", "identity"),
        ("deflate", "identity"),
    ] {
        let r = fetch(&url, &args(&ae(accept)));
        assert_eq!(
            (r.status, r.encoding()),
            (200, expected),
            "Accept-Encoding: {accept}: {r:?}"
        );
        assert_eq!(r.header("vary"), Some("Accept-Encoding"), "{accept}: {r:?}");
        if expected == "identity" {
            assert_eq!(r.header("etag"), Some("\"v1\""), "{accept}");
            assert_eq!(r.body, body.as_bytes(), "{accept}");
            continue;
        }
        assert_eq!(r.header("etag"), Some("W/\"v1\""), "{accept}: a weak ETag");
        assert_eq!(r.header("content-length"), None, "{accept}: streamed");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{accept}");
        assert!(
            r.body.len() < body.len() / 4,
            "{accept}: {} bytes",
            r.body.len()
        );
        assert_eq!(python_decode(expected, &r.body), body, "{accept}");
    }
    // No Accept-Encoding: nothing to compress for.
    let r = fetch(&url, &[]);
    assert_eq!(
        (r.encoding(), r.body.as_slice()),
        ("identity", body.as_bytes())
    );
    // curl decodes each one itself.
    for encoding in ["gzip", "br", "zstd"] {
        let r = fetch(
            &url,
            &[
                "--compressed",
                "-H",
                &format!("Accept-Encoding: {encoding}"),
            ],
        );
        assert_eq!(
            (r.encoding(), r.body.as_slice()),
            (encoding, body.as_bytes())
        );
    }
    // The weak ETag still answers a conditional request: the origin sees it
    // and says 304, which is passed on.
    origin.on("/json", Act::Exact(304, vec![("etag", "\"v1\"")], ""));
    let r = fetch(
        &url,
        &[
            "-H",
            "If-None-Match: W/\"v1\"",
            "-H",
            "Accept-Encoding: gzip",
        ],
    );
    assert_eq!((r.status, r.encoding()), (304, "identity"), "{r:?}");
    assert!(origin
        .seen()
        .iter()
        .any(|s| s.header("if-none-match") == Some("W/\"v1\"")));
}

#[test]
fn what_is_never_compressed() {
    let origin = Origin::start();
    let body = json_body();
    let json = ("content-type", "application/json");
    origin.on(
        "/encoded",
        Act::Exact(200, vec![json, ("content-encoding", "br")], body),
    );
    origin.on(
        "/partial",
        Act::Exact(
            206,
            vec![json, ("content-range", "bytes 0-10239/20000")],
            body,
        ),
    );
    origin.on(
        "/no-transform",
        Act::Exact(200, vec![json, ("cache-control", "no-transform")], body),
    );
    origin.on(
        "/png",
        Act::Exact(200, vec![("content-type", "image/png")], body),
    );
    origin.on("/small", Act::Exact(200, vec![json], "{\"small\":true}"));
    origin.on("/empty", Act::Exact(204, vec![json], ""));
    origin.on("/json", Act::Exact(200, vec![json], body));
    let backend_port = free_port();
    let _backend = start_backend("compress-never", backend_port);
    let lb = compressing(
        &origin,
        "algorithms = [\"gzip\"]\nmin_length = \"100B\"",
        &format!(
            "[upstreams.app]\nservers = [\"127.0.0.1:{backend_port}\"]\n\
             [[route]]\npath = \"/info\"\nupstream = \"app\"\n\
             [[route]]\npath = \"/ws\"\nupstream = \"app\"\n"
        ),
    );
    let gzip = ae("gzip");
    let with_gzip = args(&gzip);
    assert_eq!(
        fetch(&lb.url("/json"), &with_gzip).encoding(),
        "gzip",
        "the control case"
    );
    for (path, why) in [
        ("/encoded", "already encoded"),
        ("/partial", "a 206"),
        ("/no-transform", "Cache-Control: no-transform"),
        ("/png", "not a compressed type"),
        ("/small", "shorter than min_length"),
        ("/empty", "a 204"),
    ] {
        let r = fetch(&lb.url(path), &with_gzip);
        let kept = if path == "/encoded" { "br" } else { "identity" };
        assert_eq!(r.encoding(), kept, "{path} ({why}): {r:?}");
        if path != "/empty" {
            assert_eq!(
                r.body,
                if path == "/small" {
                    b"{\"small\":true}".as_slice()
                } else {
                    body.as_bytes()
                },
                "{path}"
            );
        }
    }
    // Requests that are never answered compressed.
    let mut ranged = with_gzip.clone();
    ranged.extend(["-H", "Range: bytes=0-99"]);
    let r = fetch(&lb.url("/json"), &ranged);
    assert_eq!(r.encoding(), "identity", "a Range request: {r:?}");
    let get_info = fetch(&lb.url("/info"), &with_gzip);
    assert_eq!(
        get_info.encoding(),
        "gzip",
        "the backend's JSON, by GET: {get_info:?}"
    );
    let mut head = with_gzip.clone();
    head.push("-I");
    let r = fetch(&lb.url("/json"), &head);
    assert_eq!((r.status, r.encoding()), (200, "identity"), "a HEAD: {r:?}");
    assert!(r.header("content-length").is_some(), "{r:?}");
    // An upgrade asking for gzip: its 101 and its bytes are left alone.
    let mut ws = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = ws.read(&mut buf).expect("the upgrade's answer");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 101") && !head.contains("content-encoding"),
        "{head}"
    );
}

#[test]
fn a_route_with_compression_false_is_never_compressed() {
    let origin = Origin::start();
    let body = json_body();
    origin.on(
        "/",
        Act::Exact(200, vec![("content-type", "text/html")], body),
    );
    let lb = compressing(
        &origin,
        "",
        "[[route]]\nname = \"raw\"\npath = \"/raw/\"\nupstream = \"default\"\ncompression = false\n",
    );
    let gzip = ae("gzip");
    let on = fetch(&lb.url("/page"), &args(&gzip));
    assert_eq!(on.encoding(), "gzip", "{on:?}");
    let off = fetch(&lb.url("/raw/page"), &args(&gzip));
    assert_eq!(
        (off.encoding(), off.body.as_slice()),
        ("identity", body.as_bytes()),
        "{off:?}"
    );
    assert_eq!(off.header("vary"), None, "{off:?}");
}

#[test]
fn the_cache_stores_one_uncompressed_copy_and_compresses_each_hit() {
    let origin = Origin::start();
    let body = json_body();
    origin.on(
        "/c",
        Act::Exact(
            200,
            vec![
                ("content-type", "application/json"),
                ("cache-control", "max-age=60"),
                ("etag", "\"c1\""),
            ],
            body,
        ),
    );
    let admin = free_port();
    let lb = compressing(
        &origin,
        "algorithms = [\"gzip\", \"br\"]",
        &format!("admin_listen = \"127.0.0.1:{admin}\"\n[cache]\n[[cache.rule]]\npath = \"/c\"\n"),
    );
    let url = lb.url("/c");
    let (gzip, br) = (ae("gzip"), ae("br"));
    let cache = |r: &Fetched| r.header("x-cache-status").unwrap_or("-").to_owned();
    let decoded = |r: &Fetched| match r.encoding() {
        "identity" => String::from_utf8(r.body.clone()).unwrap(),
        e => python_decode(e, &r.body),
    };

    let miss = fetch(&url, &args(&gzip));
    assert_eq!(
        (cache(&miss).as_str(), miss.encoding()),
        ("MISS", "gzip"),
        "{miss:?}"
    );
    for (accept, expected) in [(&gzip, "gzip"), (&br, "br"), (&ae("identity"), "identity")] {
        let hit = fetch(&url, &args(accept));
        assert_eq!(
            (cache(&hit).as_str(), hit.encoding()),
            ("HIT", expected),
            "{hit:?}"
        );
        assert_eq!(decoded(&hit), body, "{expected}");
        assert_eq!(hit.header("vary"), Some("Accept-Encoding"), "{hit:?}");
    }
    let plain = fetch(&url, &[]);
    assert_eq!(
        (cache(&plain).as_str(), plain.encoding()),
        ("HIT", "identity")
    );
    assert_eq!(
        plain.header("etag"),
        Some("\"c1\""),
        "the stored copy keeps its strong ETag"
    );
    assert_eq!(
        origin.hits("/c"),
        1,
        "one origin request for every encoding"
    );

    // One PURGE removes the one copy, whatever encoding each client got.
    let purged = request("PURGE", &format!("http://127.0.0.1:{admin}/c"), &[]).unwrap();
    assert_eq!(purged.status, 200, "{purged:?}");
    let again = fetch(&url, &args(&br));
    assert_eq!(
        (cache(&again).as_str(), again.encoding()),
        ("MISS", "br"),
        "{again:?}"
    );
    let after = fetch(&url, &[]);
    assert_eq!(
        (cache(&after).as_str(), after.encoding()),
        ("HIT", "identity")
    );
    assert_eq!(origin.hits("/c"), 2);
}

#[test]
fn http2_responses_are_compressed_too() {
    let origin = Origin::start();
    let body = json_body();
    origin.on(
        "/json",
        Act::Exact(200, vec![("content-type", "application/json")], body),
    );
    let lb = start_balancer(&format!(
        "http2_cleartext = true\n[upstream]\nservers = [\"127.0.0.1:{}\"]\n[compression]\nalgorithms = [\"zstd\", \"gzip\"]\n",
        origin.port
    ));
    let r = wait_for(Duration::from_secs(10), "an HTTP/2 answer", || {
        Some(fetch(
            &lb.url("/json"),
            &[
                "--http2-prior-knowledge",
                "-H",
                "Accept-Encoding: gzip, zstd",
            ],
        ))
        .filter(|r| r.status == 200)
    });
    assert_eq!((r.version.as_str(), r.encoding()), ("2", "zstd"), "{r:?}");
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(python_decode("zstd", &r.body), body);
    let r = fetch(
        &lb.url("/json"),
        &[
            "--http2-prior-knowledge",
            "--compressed",
            "-H",
            "Accept-Encoding: gzip",
        ],
    );
    assert_eq!((r.encoding(), r.body.as_slice()), ("gzip", body.as_bytes()));
}

#[test]
fn nothing_is_compressed_without_the_section_and_a_reload_turns_it_on() {
    let origin = Origin::start();
    let body = json_body();
    origin.on(
        "/json",
        Act::Exact(200, vec![("content-type", "application/json")], body),
    );
    let upstream = format!("[upstream]\nservers = [\"127.0.0.1:{}\"]\n", origin.port);
    let lb = start_balancer(&upstream);
    let gzip = ae("gzip, br, zstd");
    let before = wait_for(
        Duration::from_secs(10),
        "the origin through the balancer",
        || Some(fetch(&lb.url("/json"), &args(&gzip))).filter(|r| r.status == 200),
    );
    assert_eq!(
        (before.encoding(), before.body.as_slice()),
        ("identity", body.as_bytes())
    );
    assert_eq!(before.header("vary"), None);
    assert_eq!(
        before.header("content-length"),
        Some(body.len().to_string().as_str())
    );

    lb.rewrite(&format!("{upstream}[compression]\nalgorithms = [\"br\"]\n"));
    lb.wait_for_log("compression");
    let after = fetch(&lb.url("/json"), &args(&gzip));
    assert_eq!(after.encoding(), "br", "{after:?}");
    assert_eq!(python_decode("br", &after.body), body);
}

#[test]
fn a_revalidated_copy_is_compressed_whole() {
    // A revalidated answer is served from the cache after the origin's 304:
    // Pingora ends that body differently from a hit's.
    let origin = Origin::start();
    let body = json_body();
    let fresh = vec![
        ("content-type", "application/json"),
        ("cache-control", "max-age=1"),
        ("etag", "\"r1\""),
    ];
    origin.on("/c", Act::Exact(200, fresh.clone(), body));
    let lb = compressing(&origin, "", "[cache]\n[[cache.rule]]\npath = \"/c\"\n");
    let gzip = ae("gzip");
    let first = fetch(&lb.url("/c"), &args(&gzip));
    assert_eq!(first.header("x-cache-status"), Some("MISS"), "{first:?}");
    origin.on(
        "/c",
        Act::Exact(
            304,
            vec![("cache-control", "max-age=1"), ("etag", "\"r1\"")],
            "",
        ),
    );
    let revalidated = wait_for(Duration::from_secs(10), "a revalidated answer", || {
        Some(fetch(&lb.url("/c"), &args(&gzip)))
            .filter(|r| r.header("x-cache-status") == Some("REVALIDATED"))
    });
    assert_eq!(revalidated.encoding(), "gzip", "{revalidated:?}");
    assert_eq!(python_decode("gzip", &revalidated.body), body);
}
