//! Programs of one's own built on the balancer, the examples under
//! `balancer/examples/`, run as a user runs them: real processes on loopback
//! ports in front of a real upstream.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use support::*;

fn upstream(port: u16) -> String {
    format!("[upstream]\nservers = [\"127.0.0.1:{port}\"]\nconnect_timeout = \"1s\"\nread_timeout = \"2s\"\n")
}

/// A key file in a directory of its own, removed with it.
struct KeyFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl KeyFile {
    fn new(text: &str) -> KeyFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-keys");
        std::fs::write(&path, text).unwrap();
        KeyFile { path, _dir: dir }
    }

    /// `[extensions.keys]` reading this file.
    fn instance(&self) -> String {
        format!(
            "[extensions.keys]\nkind = \"api_keys\"\nkeys_file = {:?}\n",
            self.path.to_str().expect("a UTF-8 temp path")
        )
    }
}

fn status_of(url: &str, headers: &[(&str, &str)]) -> u16 {
    get_with(url, headers)
        .unwrap_or_else(|e| panic!("GET {url} with {headers:?}: {e}"))
        .status
}

// api_keys

#[test]
fn api_keys_let_in_only_requests_with_a_key_of_the_file() {
    let origin = Origin::start();
    let keys = KeyFile::new("# rotated monthly\n\nk-alpha\n  k-beta  \n#k-commented\n");
    let body = format!(
        "global_extensions = [\"keys\"]\n{}{}",
        keys.instance(),
        upstream(origin.port)
    );
    let lb = start_example("api_keys", &body, &[]);
    let url = lb.url("/data");

    let r = get(&url).unwrap();
    assert_eq!(r.status, 401, "no key: expected 401, got {r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|c| c.starts_with("Bearer")),
        "no key: expected WWW-Authenticate: Bearer, got {r:?}"
    );
    assert!(r.body.contains("API key"), "a reason in the body: {r:?}");
    assert_eq!(
        status_of(&lb.url("/health-check"), &[]),
        200,
        "the balancer's own health check needs no key"
    );

    for wrong in [
        ("authorization", "Bearer k-gamma"),
        ("x-api-key", "k-gamma"),
        ("x-api-key", "#k-commented"),
        ("x-api-key", "k-commented"),
        ("authorization", "Basic k-alpha"),
    ] {
        let r = get_with(&url, &[wrong]).unwrap();
        assert_eq!(r.status, 401, "{wrong:?}: expected 401, got {r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer")),
            "{wrong:?}: expected WWW-Authenticate: Bearer, got {r:?}"
        );
    }
    assert_eq!(
        origin.hits("/data"),
        0,
        "a refused request must not be forwarded"
    );

    let r = get_with(&url, &[("authorization", "Bearer k-alpha")]).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "origin"),
        "key in Authorization: {r:?}"
    );
    assert_eq!(
        status_of(&url, &[("authorization", "bearer k-beta")]),
        200,
        "the scheme is case-insensitive and the key file's lines are trimmed"
    );
    let forwarded = origin.seen().pop().expect("the origin saw the request");
    assert_eq!(
        forwarded.header("authorization"),
        Some("bearer k-beta"),
        "Authorization is forwarded as it came: {forwarded:?}"
    );

    let r = get_with(&url, &[("x-api-key", "k-beta")]).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "origin"),
        "key in X-Api-Key: {r:?}"
    );
    let forwarded = origin.seen().pop().expect("the origin saw the request");
    assert_eq!(
        forwarded.header("x-api-key"),
        None,
        "X-Api-Key must not reach the origin: {forwarded:?}"
    );

    // A bearer token meant for the backend does not spoil a good X-Api-Key.
    assert_eq!(
        status_of(
            &url,
            &[
                ("authorization", "Bearer user-token"),
                ("x-api-key", "k-alpha")
            ]
        ),
        200
    );
}

#[test]
fn api_keys_guard_only_the_routes_that_list_them() {
    let origin = Origin::start();
    let keys = KeyFile::new("k-alpha\n");
    let body = format!(
        "{}{}[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"default\"\nextensions = [\"keys\"]\n[[route]]\nname = \"public\"\npath = \"/public/\"\nupstream = \"default\"\n",
        keys.instance(),
        upstream(origin.port)
    );
    let lb = start_example("api_keys", &body, &[]);

    assert_eq!(
        status_of(&lb.url("/api/x"), &[]),
        401,
        "route api needs a key"
    );
    assert_eq!(
        status_of(&lb.url("/api/x"), &[("x-api-key", "k-alpha")]),
        200
    );
    assert_eq!(
        status_of(&lb.url("/public/x"), &[]),
        200,
        "route public does not list the instance"
    );
    assert_eq!(
        status_of(&lb.url("/elsewhere"), &[]),
        200,
        "a request no route matches runs only the global instances (none)"
    );
    assert_eq!(status_of(&lb.url("/health-check"), &[]), 200);
}

#[test]
fn api_keys_follow_the_key_file_without_a_restart() {
    let origin = Origin::start();
    let keys = KeyFile::new("k-old\n");
    let body = format!(
        "global_extensions = [\"keys\"]\n{}{}",
        keys.instance(),
        upstream(origin.port)
    );
    let mut lb = start_example("api_keys", &body, &[]);
    let url = lb.url("/data");
    assert_eq!(status_of(&url, &[("x-api-key", "k-old")]), 200);
    assert_eq!(status_of(&url, &[("x-api-key", "k-new")]), 401);

    std::fs::write(&keys.path, "# rotated\nk-new\n").unwrap();
    wait_for(
        Duration::from_secs(10),
        "the new key to be accepted",
        || (status_of(&url, &[("x-api-key", "k-new")]) == 200).then_some(()),
    );
    assert_eq!(
        status_of(&url, &[("x-api-key", "k-old")]),
        401,
        "the old key, removed from the file, must be refused"
    );
    lb.wait_for_log("config reloaded");

    // A key file that cannot be read any more keeps the keys in force.
    std::fs::remove_file(&keys.path).unwrap();
    let line = lb.wait_for_log("config reload failed");
    assert!(
        line.contains("[extensions.keys]") && line.contains("api-keys"),
        "the failure names the instance and the file: {line}"
    );
    assert_eq!(
        status_of(&url, &[("x-api-key", "k-new")]),
        200,
        "the keys in force still let their requests in"
    );
    assert!(
        lb.proc.child.try_wait().unwrap().is_none(),
        "the same process serves on, not a restarted one"
    );
}

/// `--check` on `body` (written as `balancer.toml` in `dir`) with the
/// example `program`: (exit code, what it said).
fn check(program: &str, dir: &std::path::Path, body: &str) -> (i32, String) {
    let config = dir.join("balancer.toml");
    std::fs::write(&config, config_text(free_port(), body)).unwrap();
    run_example(
        program,
        &["--check", "--config", config.to_str().unwrap()],
        &[],
        &[],
    )
}

#[test]
fn check_refuses_instances_that_cannot_run_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "k-alpha\n").unwrap();
    let group = upstream(free_port());
    let route = |extensions: &str| {
        format!("[[route]]\npath = \"/api/\"\nupstream = \"default\"\nextensions = {extensions}\n")
    };
    let keys = "[extensions.keys]\nkind = \"api_keys\"\nkeys_file = \"keys.txt\"\n";

    // A key file named relative to the configuration's folder: valid.
    let (code, out) = check(
        "api_keys",
        dir.path(),
        &format!("{keys}{group}{}", route("[\"keys\"]")),
    );
    assert_eq!(code, 0, "a valid configuration: {out}");

    let cases = [
        (
            "a misspelt instance on a route",
            format!("{keys}{group}{}", route("[\"kyes\"]")),
            vec!["\"kyes\"", "line 13", "[extensions.kyes]", "declared: keys"],
        ),
        (
            "a misspelt instance in global_extensions",
            format!("global_extensions = [\"key\"]\n{keys}{group}"),
            vec!["global_extensions", "\"key\"", "line 3"],
        ),
        (
            "an unknown kind",
            format!("[extensions.keys]\nkind = \"api_key\"\n{group}"),
            vec![
                "[extensions.keys] (line 3)",
                "unknown kind \"api_key\"",
                "knows: api_keys",
            ],
        ),
        (
            "an instance without kind",
            format!("[extensions.keys]\nkeys_file = \"keys.txt\"\n{group}"),
            vec!["line 3", "kind"],
        ),
        (
            "a key file that cannot be read",
            format!("[extensions.keys]\nkind = \"api_keys\"\nkeys_file = \"nope.txt\"\n{group}"),
            vec!["[extensions.keys] (line 3)", "keys_file", "nope.txt"],
        ),
        (
            "a setting the kind does not know",
            format!("[extensions.keys]\nkind = \"api_keys\"\nkey_file = \"keys.txt\"\n{group}"),
            vec!["[extensions.keys] (line 3)", "key_file"],
        ),
    ];
    for (what, body, expected) in cases {
        let (code, out) = check("api_keys", dir.path(), &body);
        assert_eq!(code, 1, "{what}: expected exit 1, got {code}: {out}");
        for text in expected {
            assert!(out.contains(text), "{what}: expected {text:?} in: {out}");
        }
    }

    let (code, out) = check(
        "canary",
        dir.path(),
        &format!("[extensions.canary]\nkind = \"canary\"\nupstream = \"canaries\"\n{group}"),
    );
    assert_eq!(code, 1, "a group that is not defined: {out}");
    assert!(
        out.contains("[extensions.canary] (line 3)")
            && out.contains("\"canaries\" is not defined")
            && out.contains("default"),
        "names the instance, the group and the groups there are: {out}"
    );
}

#[test]
fn a_reload_that_breaks_an_instance_is_refused_and_one_that_changes_it_rebuilds_it() {
    let stable = Origin::start();
    stable.on("/", Act::Answer(200, "stable"));
    let canary = Origin::start();
    canary.on("/", Act::Answer(200, "canary"));
    let body = |instance: &str| {
        format!(
            "global_extensions = [\"canary\"]\n[extensions.canary]\nkind = \"canary\"\nupstream = \"canary\"\n{instance}{}[upstreams.canary]\nservers = [\"127.0.0.1:{}\"]\n",
            upstream(stable.port),
            canary.port
        )
    };
    let lb = start_example("canary", &body(""), &[]);
    let url = lb.url("/x");
    expect_route(&url, "X-Canary", &[("x-canary", "1")], "canary", true);

    lb.rewrite(&body("header = \"x-beta\"\n"));
    wait_for(
        Duration::from_secs(10),
        "the instance rebuilt with its new header",
        || {
            get_with(&url, &[("x-beta", "1")])
                .ok()
                .filter(|r| r.body == "canary")
        },
    );
    expect_route(
        &url,
        "the old header",
        &[("x-canary", "1")],
        "stable",
        false,
    );

    lb.rewrite(&body("header = \"not a header\"\n"));
    let line = lb.wait_for_log("config reload failed");
    assert!(
        line.contains("[extensions.canary]") && line.contains("header"),
        "the refusal names the instance and the setting: {line}"
    );
    expect_route(
        &url,
        "after a refused reload",
        &[("x-beta", "1")],
        "canary",
        true,
    );
}

// canary

/// An unsigned JWT with `payload` as its claims.
fn jwt(payload: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(payload)
    )
}

/// GETs `url` with `headers`: a 200 from the origin that answers `origin`,
/// with `X-Canary-Routed: 1` when `marked` and without it otherwise.
fn expect_route(url: &str, what: &str, headers: &[(&str, &str)], origin: &str, marked: bool) {
    let r = get_with(url, headers).unwrap_or_else(|e| panic!("{what}: GET {url}: {e}"));
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, origin),
        "{what}: expected 200 from {origin}, got {r:?}"
    );
    assert_eq!(
        r.header("x-canary-routed"),
        marked.then_some("1"),
        "{what}: X-Canary-Routed, in {r:?}"
    );
}

#[test]
fn canary_sends_flagged_requests_and_tokens_to_their_group() {
    let stable = Origin::start();
    stable.on("/", Act::Answer(200, "stable"));
    let canary = Origin::start();
    canary.on("/", Act::Answer(200, "canary"));
    let body = format!(
        "[extensions.canary]\nkind = \"canary\"\nupstream = \"canary\"\n{}[upstreams.canary]\nservers = [\"127.0.0.1:{}\"]\n[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"default\"\nextensions = [\"canary\"]\n",
        upstream(stable.port),
        canary.port
    );
    let lb = start_example("canary", &body, &[]);
    let url = lb.url("/api/x");
    expect_route(
        &lb.url("/other"),
        "a route without the instance",
        &[("x-canary", "1")],
        "stable",
        false,
    );
    let bearer = |claims: &str| format!("Bearer {}", jwt(claims));
    let not_json = format!(
        "Bearer e30.{}.sig",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("canary")
    );

    expect_route(&url, "plain", &[], "stable", false);
    expect_route(&url, "X-Canary: 1", &[("x-canary", "1")], "canary", true);
    expect_route(&url, "X-Canary: 0", &[("x-canary", "0")], "stable", false);
    for (what, claims, origin, marked) in [
        (
            "canary claim",
            r#"{"sub":"u1","canary":true}"#,
            "canary",
            true,
        ),
        ("canary claim false", r#"{"canary":false}"#, "stable", false),
        (
            "group claim default",
            r#"{"group":"default"}"#,
            "stable",
            true,
        ),
        (
            "group claim canary",
            r#"{"group":"canary"}"#,
            "canary",
            true,
        ),
        (
            "group not allowed",
            r#"{"group":"nowhere"}"#,
            "stable",
            false,
        ),
    ] {
        let token = bearer(claims);
        expect_route(&url, what, &[("authorization", &token)], origin, marked);
    }
    for (what, token) in [
        ("malformed JWT", "Bearer not.a!!.jwt"),
        ("payload that is not JSON", &not_json),
        ("one-segment token", "Bearer opaque-token"),
    ] {
        expect_route(&url, what, &[("authorization", token)], "stable", false);
    }
    assert!(
        !lb.proc
            .log_text()
            .contains("extension canary (kind canary)"),
        "no request made the extension fail:\n{}",
        lb.proc.log_text()
    );
}

// A hook that panics

/// The `panicky` fixture, its extension on every request, in front of a
/// backend (returned with it) that answers it.
fn start_panicky(backend: &str) -> (Balancer, Proc) {
    let port = free_port();
    let backend = start_backend(backend, port);
    let body = format!(
        "global_extensions = [\"p\"]\n[extensions.p]\nkind = \"panicky\"\n{}",
        upstream(port)
    );
    let lb = start_example("panicky", &body, &[]);
    assert_eq!(get(&lb.url("/")).unwrap().status, 200);
    (lb, backend)
}

#[test]
fn a_panicking_hook_answers_500_and_the_balancer_serves_on() {
    let (mut lb, _backend) = start_panicky("one");

    let r = get(&lb.url("/boom")).unwrap();
    assert_eq!(r.status, 500, "the panicking hook's request: {r:?}");
    let line = lb.wait_for_log("extension p (kind panicky): request hook failed: panicked");
    assert!(
        line.contains("boom, on purpose"),
        "the panic's message: {line}"
    );

    let r = get(&lb.url("/")).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "Hello World!"),
        "the next request on the same balancer: {r:?}"
    );
    assert!(lb.proc.child.try_wait().unwrap().is_none(), "still running");
}

// A response hook that refuses an upgrade

#[test]
fn a_response_hook_that_refuses_a_backends_101_answers_the_client_without_a_tunnel() {
    let (lb, _backend) = start_panicky("ws-refused");
    let upgrade = |extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };

    // The backend accepts the upgrade; the hook turns its 101 into a 403.
    // The client sent frames right after its request (as it may), more
    // than is read with it: still unread when the answer goes, they do not
    // reset the answer away.
    let mut refused = upgrade("Fixture-Refuse: upgrade\r\n").into_bytes();
    for _ in 0..4096 {
        refused.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, 105, 103, 111, 104, 110]);
    }
    let (reply, closed) = raw_exchange(lb.port, &refused);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let head = reply.to_ascii_lowercase();
    assert!(head.contains("content-length: 0\r\n"), "{reply}");
    assert!(
        !head.contains("upgrade") && !head.contains("sec-websocket-accept"),
        "nothing of the switch reaches the client: {reply}"
    );
    assert!(reply.ends_with("\r\n\r\n"), "no body, no tunnel: {reply}");
    assert!(closed, "the connection closes after the refusal: {reply}");
    lb.wait_for_log("\"GET /ws HTTP/1.1\" 403");

    // A hook that makes a 101 of an answer that switched nothing (the
    // backend answers `/` with a 200) is a failing hook: 500, no tunnel.
    let fake = upgrade("Fixture-Refuse: fake-switch\r\n").replace("GET /ws ", "GET / ");
    let (reply, _) = raw_exchange(lb.port, fake.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 500"), "{reply}");
    lb.wait_for_log("\"GET / HTTP/1.1\" 500");

    // Another 1xx is no answer at all: 500.
    let (reply, _) = raw_exchange(lb.port, upgrade("Fixture-Refuse: interim\r\n").as_bytes());
    assert!(reply.starts_with("HTTP/1.1 500"), "{reply}");

    // Without the header the same upgrade switches.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    std::io::Write::write_all(&mut stream, upgrade("").as_bytes()).unwrap();
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "{}", String::from_utf8_lossy(&head));
}
