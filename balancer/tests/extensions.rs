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

    fn env(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
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
    let lb = start_example(
        "api_keys",
        &upstream(origin.port),
        &[("API_KEYS_FILE", keys.env())],
    );
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
fn api_keys_guard_only_the_routes_named() {
    let origin = Origin::start();
    let keys = KeyFile::new("k-alpha\n");
    let body = format!(
        "{}[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"default\"\n[[route]]\nname = \"public\"\npath = \"/public/\"\nupstream = \"default\"\n",
        upstream(origin.port)
    );
    let lb = start_example(
        "api_keys",
        &body,
        &[("API_KEYS_FILE", keys.env()), ("API_KEYS_ROUTES", " api ,")],
    );

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
        "route public is not in API_KEYS_ROUTES"
    );
    assert_eq!(
        status_of(&lb.url("/elsewhere"), &[]),
        200,
        "a request no route matches is not guarded when API_KEYS_ROUTES is set"
    );
    assert_eq!(status_of(&lb.url("/health-check"), &[]), 200);

    assert_eq!(
        status_of(&lb.url("/public/y"), &[("x-api-key", "k-alpha")]),
        200
    );
    let forwarded = origin.seen().pop().expect("the origin saw the request");
    assert_eq!(
        (forwarded.path.as_str(), forwarded.header("x-api-key")),
        ("/public/y", None),
        "X-Api-Key is removed on open routes too: {forwarded:?}"
    );
}

#[test]
fn api_keys_follow_the_key_file_without_a_restart() {
    let origin = Origin::start();
    let keys = KeyFile::new("k-old\n");
    let mut lb = start_example(
        "api_keys",
        &upstream(origin.port),
        &[("API_KEYS_FILE", keys.env())],
    );
    let url = lb.url("/data");
    assert_eq!(status_of(&url, &[("x-api-key", "k-old")]), 200);
    assert_eq!(status_of(&url, &[("x-api-key", "k-new")]), 401);

    std::fs::write(&keys.path, "# rotated\nk-new\n").unwrap();
    wait_for(
        Duration::from_millis(2500),
        "the new key to be accepted",
        || (status_of(&url, &[("x-api-key", "k-new")]) == 200).then_some(()),
    );
    assert_eq!(
        status_of(&url, &[("x-api-key", "k-old")]),
        401,
        "the old key, removed from the file, must be refused"
    );
    lb.wait_for_log("keys now");
    assert!(
        lb.proc.child.try_wait().unwrap().is_none(),
        "the same process serves on, not a restarted one"
    );
}

#[test]
fn api_keys_refuse_to_start_without_a_readable_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("balancer.toml");
    std::fs::write(&config, config_text(free_port(), &upstream(free_port()))).unwrap();
    let args = ["--config", config.to_str().unwrap()];

    let (code, out) = run_example("api_keys", &args, &[], &["API_KEYS_FILE"]);
    assert_eq!(
        code, 2,
        "API_KEYS_FILE unset: expected exit 2, got {code}: {out}"
    );
    assert!(
        out.contains("API_KEYS_FILE is not set"),
        "the message names the variable: {out}"
    );

    let missing = dir.path().join("no-such-file");
    let (code, out) = run_example(
        "api_keys",
        &args,
        &[("API_KEYS_FILE", missing.to_str().unwrap())],
        &[],
    );
    assert_eq!(
        code, 2,
        "an unreadable file: expected exit 2, got {code}: {out}"
    );
    assert!(
        out.contains("API_KEYS_FILE") && out.contains("no-such-file"),
        "the message names the variable and the file: {out}"
    );

    let keys = KeyFile::new("k-alpha\n");
    let (code, out) = run_example(
        "api_keys",
        &args,
        &[("API_KEYS_FILE", keys.env()), ("API_KEYS_ROUTES", " , ")],
        &[],
    );
    assert_eq!(
        code, 2,
        "API_KEYS_ROUTES naming nothing guards nothing: expected exit 2, got {code}: {out}"
    );
    assert!(
        out.contains("API_KEYS_ROUTES"),
        "the message names the variable: {out}"
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
        "{}[upstreams.canary]\nservers = [\"127.0.0.1:{}\"]\n[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"default\"\n",
        upstream(stable.port),
        canary.port
    );
    let lb = start_example("canary", &body, &[]);
    let url = lb.url("/api/x");
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
        !lb.proc.log_text().contains("extension canary"),
        "no request made the extension fail:\n{}",
        lb.proc.log_text()
    );
}

// A hook that panics

#[test]
fn a_panicking_hook_answers_500_and_the_balancer_serves_on() {
    let port = free_port();
    let _backend = start_backend("one", port);
    let mut lb = start_example("panicky", &upstream(port), &[]);
    assert_eq!(get(&lb.url("/")).unwrap().status, 200);

    let r = get(&lb.url("/boom")).unwrap();
    assert_eq!(r.status, 500, "the panicking hook's request: {r:?}");
    let line = lb.wait_for_log("extension panicky: request hook failed: panicked");
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
