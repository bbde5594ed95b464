//! Lua scripts as extensions (`kind = "lua"`), run as a user runs them: a
//! real balancer on loopback ports, scripts in files beside it, real
//! upstreams, plain HTTP/1.1, h2c and TLS clients. Each request field and
//! each decision a script can make, the sandbox's refusals, its instruction
//! and memory limits, `--check` and reloads of edited scripts, and the
//! examples shipped in `deploy/examples/scripts/`.

mod support;

#[path = "support/http2.rs"]
mod http2;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Scripts in a folder of their own, named by absolute path in the TOML.
struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Writes `name` and returns its path as a TOML string.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write the script");
        toml_path(&path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A shipped example script, as a TOML string.
fn example_script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/scripts")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    toml_path(&path)
}

fn upstreams(default: u16, canary: u16) -> String {
    format!(
        "[upstream]\nservers = [\"127.0.0.1:{default}\"]\nconnect_timeout = \"1s\"\nread_timeout = \"2s\"\n\
         [upstreams.canary]\nservers = [\"127.0.0.1:{canary}\"]\nconnect_timeout = \"1s\"\nread_timeout = \"2s\"\n"
    )
}

fn lua_instance(name: &str, script: &str, extra: &str) -> String {
    format!("[extensions.{name}]\nkind = \"lua\"\nscript = {script}\n{extra}\n")
}

fn route(name: &str, path: &str, extensions: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"default\"\nextensions = [{extensions}]\n"
    )
}

fn must_get(url: &str, headers: &[(&str, &str)]) -> Reply {
    get_with(url, headers).unwrap_or_else(|e| panic!("GET {url} with {headers:?}: {e}"))
}

/// The `key=value` lines of a body, as pairs.
fn lines(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn field<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key}= line in {pairs:?}"))
}

// The request as a script sees it.

const FIELDS: &str = r#"
local order = { "method", "path", "query", "host", "client_ip", "route", "group", "request_id" }
function on_request(req)
  local out = {}
  for _, k in ipairs(order) do out[#out + 1] = k .. "=" .. tostring(req[k]) end
  out[#out + 1] = "x-multi=" .. tostring(req.headers["X-Multi"])
  out[#out + 1] = "missing=" .. tostring(req.headers["x-missing"])
  local names = {}
  for name, value in pairs(req.headers) do names[#names + 1] = name .. ":" .. value end
  table.sort(names)
  out[#out + 1] = "headers=" .. table.concat(names, ";")
  out[#out + 1] = "settings=" .. settings.greeting .. "," .. settings.nested.n .. "," .. #settings.list
  return { status = 200, body = table.concat(out, "\n") .. "\n" }
end
"#;

#[test]
fn a_script_reads_every_field_of_the_request() {
    let origin = Origin::start();
    let scripts = Scripts::new();
    let script = scripts.write("fields.lua", FIELDS);
    let lb = start_balancer(&format!(
        "global_extensions = [\"fields\"]\n{}{}{}",
        lua_instance(
            "fields",
            &script,
            "settings = { greeting = \"hi\", nested = { n = 3 }, list = [1, 2] }"
        ),
        upstreams(origin.port, origin.port),
        "[[route]]\nname = \"named\"\npath = \"/f\"\nupstream = \"canary\"\n",
    ));

    let (reply, _) = raw_exchange(
        lb.port,
        b"GET /f/x?a=1&b=2 HTTP/1.1\r\nHost: Example.TEST:8080\r\nX-Request-Id: trace-1\r\n\
          X-Multi: a\r\nX-Multi: b\r\nConnection: close\r\n\r\n",
    );
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let got = lines(body);
    for (key, want) in [
        ("method", "GET"),
        ("path", "/f/x"),
        ("query", "a=1&b=2"),
        ("host", "example.test"),
        ("client_ip", "127.0.0.1"),
        ("route", "named"),
        ("group", "canary"),
        ("request_id", "trace-1"),
        ("x-multi", "a, b"),
        ("missing", "nil"),
        ("settings", "hi,3,2"),
    ] {
        assert_eq!(field(&got, key), want, "{key} in {reply}");
    }
    let headers = field(&got, "headers");
    assert!(
        headers.contains("host:Example.TEST:8080") && headers.contains("x-multi:a, b"),
        "pairs(req.headers) lists every header, lower case: {headers}"
    );

    // No route, no query, no host (HTTP/1.0): nil, and the default group.
    let (reply, _) = raw_exchange(lb.port, b"POST /g HTTP/1.0\r\n\r\n");
    let got = lines(reply.split("\r\n\r\n").nth(1).unwrap_or_default());
    for (key, want) in [
        ("method", "POST"),
        ("query", "nil"),
        ("host", "nil"),
        ("route", "nil"),
        ("group", "default"),
    ] {
        assert_eq!(field(&got, key), want, "{key} in {reply}");
    }
    assert_eq!(
        field(&got, "request_id").len(),
        32,
        "a new request id: {reply}"
    );
    assert_eq!(
        origin.hits_except("/"),
        0,
        "every request was answered by the script"
    );
}

const EDITS: &str = r#"
function on_request(req)
  req.headers["x-added"] = "yes"
  req.headers["x-number"] = 42
  req.headers["x-list"] = { "one", "two" }
  req.headers["x-remove-me"] = nil
  req.headers["Authorization"] = "Bearer replaced"
  req.ctx.path = req.path
  req.ctx.n = 7
  req.ctx.f = 1.5
  req.ctx.flag = true
  req.ctx.nested = { list = { "a", "b" }, deep = { x = "y" } }
end

function on_response(resp)
  local c = resp.ctx
  resp.headers["x-status-seen"] = resp.status
  resp.headers["x-ctx"] = string.format("%s|%d|%.1f|%s|%s%s|%s", c.path, c.n, c.f,
    tostring(c.flag), c.nested.list[1], c.nested.list[2], c.nested.deep.x)
  resp.headers["x-secret"] = nil
  resp.headers["x-origin"] = "changed:" .. (resp.headers["x-origin"] or "none")
end
"#;

#[test]
fn header_edits_reach_the_upstream_and_the_client_and_ctx_reaches_on_response() {
    let origin = Origin::start();
    origin.on(
        "/edit",
        Act::With(201, vec![("x-secret", "s"), ("x-origin", "o")], "made"),
    );
    let scripts = Scripts::new();
    let script = scripts.write("edits.lua", EDITS);
    let lb = start_balancer(&format!(
        "{}{}{}",
        lua_instance("edits", &script, ""),
        upstreams(origin.port, origin.port),
        route("edited", "/edit", "\"edits\""),
    ));

    let r = must_get(
        &lb.url("/edit/1"),
        &[("x-remove-me", "1"), ("authorization", "Bearer original")],
    );
    assert_eq!((r.status, r.body.as_str()), (201, "made"), "{r:?}");
    assert_eq!(r.header("x-status-seen"), Some("201"), "{r:?}");
    assert_eq!(r.header("x-ctx"), Some("/edit/1|7|1.5|true|ab|y"), "{r:?}");
    assert_eq!(r.header("x-secret"), None, "removed by on_response: {r:?}");
    assert_eq!(r.header("x-origin"), Some("changed:o"), "{r:?}");

    let seen = origin.seen().pop().expect("the origin saw the request");
    assert_eq!(seen.header("x-added"), Some("yes"), "{seen:?}");
    assert_eq!(seen.header("x-number"), Some("42"), "{seen:?}");
    let list: Vec<&str> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "x-list")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(list, ["one", "two"], "a list sets one field each: {seen:?}");
    assert_eq!(seen.header("x-remove-me"), None, "{seen:?}");
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer replaced"),
        "{seen:?}"
    );
}

// What a script decides.

const DECISIONS: &str = r#"
local answers = {
  ["/respond"] = function() return { status = 418, body = "teapot\n",
    headers = { ["x-made"] = "lua", ["set-cookie"] = { "a=1", "b=2" } } } end,
  ["/json"] = function() return { status = 200, body = "{}",
    headers = { ["content-type"] = "application/json" } } end,
  ["/empty"] = function() return { status = 204 } end,
  ["/redirect"] = function() return { redirect = "https://example.com/new" } end,
  ["/redirect302"] = function() return { redirect = "/elsewhere", status = 302 } end,
  ["/canary"] = function() return { upstream = "canary" } end,
  ["/computed"] = function(req) return { upstream = req.headers["x-group"] } end,
  ["/backend"] = function(req) return { backend = req.headers["x-backend"] } end,
  ["/string"] = function() return "yes" end,
  ["/typo"] = function() return { stauts = 200 } end,
  ["/status99"] = function() return { status = 99 } end,
  ["/both"] = function() return { upstream = "canary", status = 200 } end,
  ["/error"] = function() error("boom") end,
  ["/badheader"] = function(req) req.headers["x-bad"] = "a\nb" end,
  ["/badctx"] = function(req) req.ctx.f = print end,
}

function on_request(req)
  local answer = answers[req.path]
  if answer then return answer(req) end
end

-- Defined so that req.ctx is kept (and checked) for it.
function on_response(resp) end
"#;

#[test]
fn every_decision_a_script_returns_is_carried_out_and_a_wrong_one_answers_500() {
    let default = Origin::start();
    default.on("/", Act::Answer(200, "default"));
    let canary = Origin::start();
    canary.on("/", Act::Answer(200, "canary"));
    let admin = free_port();
    let scripts = Scripts::new();
    let script = scripts.write("decide.lua", DECISIONS);
    let lb = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin}\"\nglobal_extensions = [\"decide\"]\n{}{}",
        lua_instance("decide", &script, ""),
        upstreams(default.port, canary.port),
    ));
    let client = Client::default();
    let get = |path: &str, headers: &[(&str, &str)]| {
        client
            .request("GET", &lb.url(path), headers)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };

    let (raw, _) = raw_exchange(
        lb.port,
        b"GET /respond HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 418"), "{raw}");
    let lower = raw.to_ascii_lowercase();
    for line in [
        "x-made: lua",
        "set-cookie: a=1",
        "set-cookie: b=2",
        "content-type: text/plain; charset=utf-8",
    ] {
        assert!(lower.contains(line), "{line:?} in {raw}");
    }
    assert!(raw.ends_with("teapot\n"), "{raw}");
    let r = get("/json", &[]);
    assert_eq!(
        (r.status, r.header("content-type"), r.body.as_str()),
        (200, Some("application/json"), "{}"),
        "{r:?}"
    );
    assert_eq!(get("/empty", &[]).status, 204);

    let r = get("/redirect", &[]);
    assert_eq!(
        (r.status, r.header("location")),
        (308, Some("https://example.com/new")),
        "a redirect is 308 unless it says: {r:?}"
    );
    let r = get("/redirect302", &[]);
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("/elsewhere")),
        "{r:?}"
    );

    assert_eq!(get("/canary", &[]).body, "canary");
    assert_eq!(get("/computed", &[("x-group", "canary")]).body, "canary");
    assert_eq!(get("/computed", &[("x-group", "default")]).body, "default");
    let canary_addr = format!("127.0.0.1:{}", canary.port);
    let r = get("/backend", &[("x-backend", &canary_addr)]);
    assert_eq!((r.status, r.body.as_str()), (200, "canary"), "{r:?}");
    assert!(
        canary.saw_path("/backend"),
        "the backend chosen got the request"
    );
    assert_eq!(get("/nothing-decided", &[]).body, "default");

    // Each wrong decision answers 500, is logged with why (at most once a
    // second, so each is asked until its line shows), and the balancer
    // goes on serving.
    let line_of = |text: &str| {
        let at = DECISIONS
            .lines()
            .position(|l| l.contains(text))
            .expect("in the script");
        format!("decide.lua:{}:", at + 1)
    };
    let (boom, bad_header) = (line_of("boom"), line_of("x-bad"));
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let wrong: [(&str, Headers, &str); 10] = [
        (
            "/computed",
            &[("x-group", "nosuch")],
            "upstream = \"nosuch\", which is not a group",
        ),
        (
            "/backend",
            &[("x-backend", "not-an-address")],
            "backend = \"not-an-address\"",
        ),
        ("/string", &[], "on_request returned a string"),
        ("/typo", &[], "the key \"stauts\""),
        ("/status99", &[], "status 99 must be from 200 to 599"),
        ("/both", &[], "upstream goes alone"),
        ("/error", &[], &format!("{boom} boom")),
        ("/badheader", &[], &format!("{bad_header} header x-bad")),
        ("/badctx", &[], "req.ctx[\"f\"] is a function"),
        (
            "/computed",
            &[],
            "a table without status, redirect, upstream or backend",
        ),
    ];
    for (path, headers, why) in wrong {
        wait_for(
            Duration::from_secs(5),
            &format!("{path} logged with {why:?}"),
            || {
                let r = get(path, headers);
                assert_eq!(r.status, 500, "{path} {headers:?}: {r:?}");
                assert!(r.body.contains("script"), "{r:?}");
                lb.proc
                    .log_text()
                    .lines()
                    .any(|l| {
                        l.contains("extension decide (lua): on_request failed") && l.contains(why)
                    })
                    .then_some(())
            },
        );
        assert_eq!(get("/", &[]).body, "default", "the balancer serves on");
    }
    let metrics = scrape(admin);
    let errors = sample(&metrics, "balancer_lua_errors_total{instance=\"decide\"}");
    assert!(errors >= 10.0, "every failure counted: {errors}\n{metrics}");
    let calls = sample(
        &metrics,
        "balancer_lua_calls_total{hook=\"on_request\",instance=\"decide\"}",
    );
    assert!(calls >= 22.0, "every call counted: {calls}\n{metrics}");
}

// The sandbox.

const PROBES: &str = r#"
local helper = require "helper"
local probes = {
  io = function() return io end,
  os = function() return os end,
  debug = function() return debug end,
  package = function() return package end,
  dofile = function() return dofile end,
  loadfile = function() return loadfile end,
  collectgarbage = function() return collectgarbage end,
  dump = function() return string.dump end,
  bytecode = function() return (load(string.char(27) .. "Lua")) end,
  unlisted_module = function() local name = "help" .. "er2" return (pcall(require, name)) or nil end,
  finalizer = function() return (pcall(setmetatable, {}, { __gc = function() end })) or nil end,
}

function on_request(req)
  print("probing", req.path)
  local out = {}
  for name, probe in pairs(probes) do out[#out + 1] = name .. "=" .. tostring(probe()) end
  table.sort(out)
  out[#out + 1] = "text_load=" .. load("return 40 + 2")()
  out[#out + 1] = "module=" .. helper.greet()
  return { status = 200, body = table.concat(out, "\n") .. "\n" }
end
"#;

#[test]
fn the_sandbox_refuses_what_reaches_outside() {
    let origin = Origin::start();
    let scripts = Scripts::new();
    let script = scripts.write("probe.lua", PROBES);
    scripts.write(
        "helper.lua",
        "return { greet = function() return \"hello\" end }\n",
    );
    scripts.write("helper2.lua", "return {}\n");
    let lb = start_balancer(&format!(
        "global_extensions = [\"probe\"]\n{}{}",
        lua_instance("probe", &script, ""),
        upstreams(origin.port, origin.port),
    ));
    let r = must_get(&lb.url("/probe"), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let got = lines(&r.body);
    for refused in [
        "io",
        "os",
        "debug",
        "package",
        "dofile",
        "loadfile",
        "collectgarbage",
        "dump",
        "bytecode",
        "unlisted_module",
        "finalizer",
    ] {
        assert_eq!(field(&got, refused), "nil", "{refused}: {}", r.body);
    }
    assert_eq!(field(&got, "text_load"), "42", "load of text works");
    assert_eq!(
        field(&got, "module"),
        "hello",
        "require finds a module of the script's folder"
    );
    lb.wait_for_log("extension probe (lua): probing\t/probe");
}

// The limits.

const WORK: &str = r#"
local kept = {}
function on_request(req)
  local n = tonumber(req.query and req.query:match("n=(%d+)") or "0")
  local work = settings.work
  if work == "loop" then
    while true do end
  elseif work == "count" then
    local x = 0
    for i = 1, n do x = x + i end
    return { status = 200, body = tostring(x) }
  elseif work == "rep" then
    return { status = 200, body = tostring(#string.rep("x", n)) }
  elseif work == "grow" then
    kept[#kept + 1] = string.rep("x", n) .. #kept
    return { status = 200, body = tostring(#kept) }
  end
end
"#;

#[test]
fn an_endless_loop_or_a_memory_hog_answers_500_and_the_balancer_serves_on() {
    let origin = Origin::start();
    let admin = free_port();
    let scripts = Scripts::new();
    let script = scripts.write("work.lua", WORK);
    let instances = [
        ("loop", "settings = { work = \"loop\" }"),
        (
            "tight",
            "settings = { work = \"count\" }\nmax_instructions = 10000",
        ),
        ("roomy", "settings = { work = \"count\" }"),
        (
            "small",
            "settings = { work = \"rep\" }\nmax_memory = \"1MiB\"",
        ),
        ("big", "settings = { work = \"rep\" }"),
        (
            "grow",
            "settings = { work = \"grow\" }\nmax_memory = \"4MiB\"",
        ),
    ];
    let mut body = format!("admin_listen = \"127.0.0.1:{admin}\"\n");
    for (name, settings) in instances {
        body += &lua_instance(name, &script, settings);
    }
    body += &upstreams(origin.port, origin.port);
    for (name, _) in instances {
        body += &route(name, &format!("/{name}"), &format!("\"{name}\""));
    }
    let lb = start_balancer(&body);

    for _ in 0..3 {
        let started = Instant::now();
        let r = must_get(&lb.url("/loop"), &[]);
        let took = started.elapsed();
        assert_eq!(r.status, 500, "{r:?}");
        assert!(
            took < Duration::from_secs(1),
            "an endless loop is cut well under a second, took {took:?}"
        );
        assert_eq!(
            must_get(&lb.url("/"), &[]).status,
            200,
            "the balancer serves on"
        );
    }
    lb.wait_for_log("used its whole instruction budget (max_instructions = 1000000)");

    let r = must_get(&lb.url("/tight?n=100000"), &[]);
    assert_eq!(r.status, 500, "max_instructions = 10000: {r:?}");
    let r = must_get(&lb.url("/roomy?n=100000"), &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "5000050000"), "{r:?}");

    let r = must_get(&lb.url("/small?n=2000000"), &[]);
    assert_eq!(r.status, 500, "max_memory = 1MiB: {r:?}");
    let r = must_get(&lb.url("/big?n=2000000"), &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "2000000"), "{r:?}");

    // A module-level table that grows per request fills its state (one per
    // worker thread); that request answers 500, and the state is made anew.
    let mut failed_at = None;
    for i in 1..=40 {
        let r = must_get(&lb.url("/grow?n=500000"), &[]);
        if r.status == 500 {
            failed_at = Some(i);
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(
        failed_at.is_some(),
        "4 MiB per state filled up within 40 requests of 500 KB"
    );
    // Each worker thread's state fills on its own: one fresh one soon answers
    // its first request again.
    let fresh = (0..40).any(|_| must_get(&lb.url("/grow?n=500000"), &[]).body == "1");
    assert!(fresh, "a state made anew after the limit");

    let metrics = scrape(admin);
    let at = |series: &str| sample(&metrics, series);
    assert!(
        at("balancer_lua_limits_reached_total{instance=\"loop\",limit=\"instructions\"}") >= 3.0,
        "{metrics}"
    );
    assert_eq!(
        at("balancer_lua_limits_reached_total{instance=\"tight\",limit=\"instructions\"}"),
        1.0
    );
    assert_eq!(
        at("balancer_lua_limits_reached_total{instance=\"small\",limit=\"memory\"}"),
        1.0
    );
    assert!(at("balancer_lua_limits_reached_total{instance=\"grow\",limit=\"memory\"}") >= 1.0);
    assert_eq!(at("balancer_lua_errors_total{instance=\"roomy\"}"), 0.0);
    assert_eq!(
        at("balancer_lua_calls_total{hook=\"on_request\",instance=\"roomy\"}"),
        1.0
    );
    assert!(
        at("balancer_lua_seconds_total{instance=\"loop\"}") > 0.0,
        "{metrics}"
    );
}

// Loading: `--check` and reloads.

/// Runs `balancer --check` on `body` with the scripts `files` beside it.
fn check(body: &str, files: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let config = dir.path().join("balancer.toml");
    std::fs::write(&config, config_text(free_port(), body)).unwrap();
    run_balancer(&["--config", config.to_str().unwrap(), "--check"])
}

#[test]
fn check_compiles_the_scripts_and_refuses_each_mistake_with_its_file_and_line() {
    let body = |settings: &str| {
        format!(
            "[upstream]\nservers = [\"127.0.0.1:1\"]\n\
             [extensions.s]\nkind = \"lua\"\nscript = \"scripts/s.lua\"\n{settings}\n\
             [[route]]\npath = \"/\"\nupstream = \"default\"\nextensions = [\"s\"]\n"
        )
    };
    let good = "local lib = require \"lib\"\nfunction on_request(req) return { upstream = \"default\" } end\n";
    let (code, out) = check(
        &body("settings = { a = 1 }\nmax_instructions = 5000\nmax_memory = \"2MiB\""),
        &[("scripts/s.lua", good), ("scripts/lib.lua", "return {}\n")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");

    let refused: [(&str, &str, &str); 9] = [
        (
            "function on_request(req)\n  local = 1\nend\n",
            "",
            "syntax error in scripts/s.lua:2:",
        ),
        (
            "function on_request(req)\n  return { upstream = \"nosuch\" }\nend\n",
            "",
            "scripts/s.lua:2: upstream group \"nosuch\" is not defined",
        ),
        (
            "local x = require \"../secret\"\nfunction on_request() end\n",
            "",
            "scripts/s.lua:1: require \"../secret\"",
        ),
        (
            "local x = require \"nothere\"\nfunction on_request() end\n",
            "",
            "require \"nothere\": cannot read",
        ),
        (
            "local x = 1\n",
            "",
            "defines neither on_request nor on_response",
        ),
        (
            "nosuch()\nfunction on_request() end\n",
            "",
            "scripts/s.lua:1: attempt to call a nil value (global 'nosuch')",
        ),
        (
            "while true do end\n",
            "",
            "used its whole instruction budget",
        ),
        (
            "function on_request() end\n",
            "scirpt = \"x\"",
            "unknown field `scirpt`",
        ),
        ("on_request = 5\n", "", "on_request is a number"),
    ];
    for (script, settings, expected) in refused {
        let (code, out) = check(&body(settings), &[("scripts/s.lua", script)]);
        assert_eq!(code, 1, "{script:?}: expected --check to fail: {out}");
        assert!(
            out.contains("[extensions.s] (line")
                && out.contains("kind \"lua\"")
                && out.contains(expected),
            "{script:?}: expected {expected:?} with the instance named, got: {out}"
        );
    }
    let (code, out) = check(&body(""), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cannot read") && out.contains("s.lua"),
        "{out}"
    );
}

/// Requests in a loop on kept-alive connections until stopped: what each
/// answer's `x-version` was, and what failed.
struct Load {
    stop: Arc<AtomicBool>,
    versions: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, versions, failures, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&versions),
                    Arc::clone(&failures),
                    url.clone(),
                );
                thread::spawn(move || {
                    let client = Client::default();
                    // Bounded: a test that forgets to stop it still ends.
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match client.get(&url) {
                            Ok(r) if r.status == 200 => versions
                                .lock()
                                .unwrap()
                                .push(r.header("x-version").unwrap_or("none").to_owned()),
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.body)),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            versions,
            failures,
            threads,
        }
    }

    /// Waits until the last 20 answers all say `version`.
    fn wait_for_only(&self, version: &str, within: Duration) {
        wait_for(within, &format!("only x-version {version}"), || {
            let seen = self.versions.lock().unwrap();
            (seen.len() >= 20 && seen.iter().rev().take(20).all(|v| v == version)).then_some(())
        });
    }

    fn answered(&self) -> usize {
        self.versions.lock().unwrap().len()
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let answered = self.answered();
        (answered, self.failures.lock().unwrap().clone())
    }
}

fn versioned(version: &str) -> String {
    format!("function on_response(resp)\n  resp.headers[\"x-version\"] = \"{version}\"\nend\n")
}

#[test]
fn an_edited_script_takes_effect_under_load_and_a_broken_edit_keeps_the_old_one() {
    let origin = Origin::start();
    let scripts = Scripts::new();
    let script = scripts.write("live.lua", &versioned("v1"));
    let lb = start_balancer(&format!(
        "global_extensions = [\"live\"]\n{}{}",
        lua_instance("live", &script, ""),
        upstreams(origin.port, origin.port),
    ));
    let load = Load::start(lb.url("/live"), 4);
    load.wait_for_only("v1", Duration::from_secs(10));

    // The script's folder is watched (beside the configuration's): the
    // edit is seen at once rather than at the next periodic re-read.
    let edited = Instant::now();
    std::fs::write(scripts.path("live.lua"), versioned("v2")).unwrap();
    load.wait_for_only("v2", Duration::from_secs(5));
    let took = edited.elapsed();
    lb.wait_for_log("config reloaded: extensions.live rebuilt: a file it reads changed");

    std::fs::write(
        scripts.path("live.lua"),
        "function on_response(resp)\n  resp.headers[\"x-version\"] = \n",
    )
    .unwrap();
    let refused = lb.wait_for_log("config reload failed");
    assert!(
        refused.contains("[extensions.live]") && refused.contains("live.lua:3:"),
        "the failed reload names the script and the line: {refused}"
    );
    let before = load.answered();
    wait_for(
        Duration::from_secs(10),
        "more answers after the broken edit",
        || (load.answered() >= before + 50).then_some(()),
    );
    load.wait_for_only("v2", Duration::from_secs(1));

    std::fs::write(scripts.path("live.lua"), versioned("v3")).unwrap();
    load.wait_for_only("v3", Duration::from_secs(5));
    let (answered, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {answered} failed: {failures:?}",
        failures.len()
    );
    eprintln!(
        "the edit took effect for every request within {took:?}; {answered} answered, none failed"
    );
}

// HTTP/2 and TLS.

const MARK: &str = r#"
function on_request(req)
  if req.path == "/answer" then return { status = 200, body = "lua answered" } end
  req.ctx.path = req.path
end

function on_response(resp)
  resp.headers["x-lua"] = "seen " .. resp.ctx.path
end
"#;

/// `curl` with `args`: (HTTP version, status, the `x-lua` header, body).
fn curl(args: &[&str]) -> (String, u16, Option<String>, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut status_line = head.lines().next().unwrap_or_default().split_whitespace();
    let version = status_line
        .next()
        .unwrap_or_default()
        .trim_start_matches("HTTP/")
        .to_owned();
    let status = status_line.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mark = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("x-lua: ")
            .map(str::to_owned)
    });
    (version, status, mark, body.to_owned())
}

#[test]
fn http2_and_tls_requests_run_the_script() {
    let origin = Origin::start();
    let pki = Pki::new(&["localhost"]);
    let scripts = Scripts::new();
    let script = scripts.write("mark.lua", MARK);
    let tls_port = free_port();
    let lb = start_balancer(&format!(
        "http2_cleartext = true\nglobal_extensions = [\"mark\"]\n{}\
         [tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = {}\nprivate_key = {}\n{}",
        lua_instance("mark", &script, ""),
        toml_path(&pki.cert),
        toml_path(&pki.key),
        upstreams(origin.port, origin.port),
    ));
    wait_for(Duration::from_secs(10), "the TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok()
    });

    let r = http2::h2c_get(lb.port, "/h2c", &[]).expect("an h2c answer");
    assert_eq!(
        (r.status, r.header("x-lua")),
        (200, Some("seen /h2c")),
        "{r:?}"
    );
    let r = http2::h2c_get(lb.port, "/answer", &[]).expect("an h2c answer");
    assert_eq!((r.status, r.body.as_str()), (200, "lua answered"), "{r:?}");

    let resolve = format!("localhost:{tls_port}:127.0.0.1");
    let ca = pki.ca.to_str().expect("a UTF-8 path");
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let url = format!("https://localhost:{tls_port}/tls");
        let got = curl(&[flag, "--cacert", ca, "--resolve", &resolve, &url]);
        assert_eq!(
            (got.0.as_str(), got.1, got.2.as_deref()),
            (version, 200, Some("seen /tls")),
            "{flag}: {got:?}"
        );
        let url = format!("https://localhost:{tls_port}/answer");
        let got = curl(&[flag, "--cacert", ca, "--resolve", &resolve, &url]);
        assert_eq!(
            (got.1, got.3.as_str()),
            (200, "lua answered"),
            "{flag}: {got:?}"
        );
    }
}

// The examples of deploy/examples/scripts/.

#[test]
fn the_shipped_example_scripts_do_what_they_say() {
    let default = Origin::start();
    default.on("/", Act::Answer(200, "default"));
    default.on(
        "/site/page",
        Act::Exact(
            200,
            vec![
                ("content-type", "text/html; charset=utf-8"),
                ("x-frame-options", "SAMEORIGIN"),
            ],
            "<p>hi</p>",
        ),
    );
    default.on(
        "/site/data",
        Act::Exact(200, vec![("content-type", "application/json")], "{}"),
    );
    let canary = Origin::start();
    canary.on("/", Act::Answer(200, "canary"));
    let body = |maintenance: &str| {
        [
            lua_instance(
                "keys",
                &example_script("api-keys.lua"),
                "settings = { keys = [\"k-alpha\", \"k-beta\"] }",
            ),
            lua_instance(
                "canary",
                &example_script("canary.lua"),
                "settings = { percent = 0 }",
            ),
            lua_instance("security", &example_script("security-headers.lua"), ""),
            lua_instance(
                "maintenance",
                &example_script("maintenance.lua"),
                maintenance,
            ),
            upstreams(default.port, canary.port),
            route("api", "/api", "\"keys\""),
            route("app", "/app", "\"canary\""),
            route("site", "/site", "\"security\""),
            route("shop", "/shop", "\"maintenance\""),
        ]
        .concat()
    };
    let lb = start_balancer(&body(
        "settings = { enabled = true, retry_after = 120, allow = [\"10.9.9.9\"] }",
    ));

    // api-keys.lua
    let r = must_get(&lb.url("/api/x"), &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{r:?}"
    );
    assert_eq!(
        must_get(&lb.url("/api/x"), &[("x-api-key", "k-gamma")]).status,
        401
    );
    let r = must_get(&lb.url("/api/x"), &[("x-api-key", "k-alpha")]);
    assert_eq!((r.status, r.body.as_str()), (200, "default"), "{r:?}");
    let seen = default.seen().pop().expect("the origin saw it");
    assert_eq!(
        seen.header("x-api-key"),
        None,
        "the key is not forwarded: {seen:?}"
    );
    let r = must_get(&lb.url("/api/x"), &[("authorization", "Bearer k-beta")]);
    assert_eq!(r.status, 200, "{r:?}");

    // canary.lua
    let r = must_get(&lb.url("/app"), &[]);
    assert_eq!(
        (r.body.as_str(), r.header("x-canary")),
        ("default", None),
        "{r:?}"
    );
    let r = must_get(&lb.url("/app"), &[("x-canary", "always")]);
    assert_eq!(
        (r.body.as_str(), r.header("x-canary")),
        ("canary", Some("served")),
        "{r:?}"
    );

    // security-headers.lua
    let r = must_get(&lb.url("/site/page"), &[]);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
    assert_eq!(
        r.header("content-security-policy"),
        Some("default-src 'self'"),
        "{r:?}"
    );
    assert_eq!(
        r.header("x-frame-options"),
        Some("SAMEORIGIN"),
        "the upstream's own is kept: {r:?}"
    );
    let r = must_get(&lb.url("/site/data"), &[]);
    assert_eq!(r.header("x-content-type-options"), None, "not HTML: {r:?}");

    // maintenance.lua, switched on, then off by a reload of the settings.
    let r = must_get(&lb.url("/shop"), &[]);
    assert_eq!(
        (r.status, r.header("retry-after")),
        (503, Some("120")),
        "{r:?}"
    );
    assert!(r.body.contains("maintenance"), "{r:?}");
    assert_eq!(
        must_get(&lb.url("/app"), &[]).status,
        200,
        "other routes are open"
    );
    lb.rewrite(&body(
        "settings = { enabled = true, allow = [\"127.0.0.1\"] }",
    ));
    wait_for(
        Duration::from_secs(10),
        "the allowed address to pass",
        || (must_get(&lb.url("/shop"), &[]).status == 200).then_some(()),
    );
    lb.rewrite(&body("settings = { enabled = false }"));
    lb.wait_for_log("config reloaded");
    assert_eq!(must_get(&lb.url("/shop"), &[]).body, "default");
}

#[test]
fn the_quick_start_configuration_and_its_script_pass_check() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let config = deploy.join("balancer.toml");
    let (code, out) = run_balancer(&["--config", config.to_str().unwrap(), "--check"]);
    assert_eq!(code, 0, "deploy/balancer.toml: {out}");
    let script = std::fs::read_to_string(deploy.join("scripts/hello.lua")).unwrap();
    assert!(script.contains("function on_request"), "{script}");
}
