//! What the integration tests share: starting the real `balancer` and
//! `backend` binaries on loopback ports, a scriptable test origin, an HTTP
//! client, development certificates, headless Chromium, and waiting by
//! polling with a deadline.

#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago. Ports are handed out from a
/// range below the kernel's ephemeral ones (where test origins and client
/// sockets get theirs), each at most once per test process, so parallel tests
/// do not race for the same port. The benchmarks in `bench/` keep below it
/// (19100-19699), so that a benchmark run beside the tests takes none of them.
pub fn free_port() -> u16 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU16> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        std::sync::atomic::AtomicU16::new(20_000 + (std::process::id() % 40) as u16 * 250)
    });
    loop {
        let port = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(port < 32_000, "ran out of test ports");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `what` until it returns `Some` or `within` passes.
pub fn wait_for<T>(within: Duration, description: &str, mut what: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = what() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {description}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The path of one of the workspace's binaries, built by `cargo test --workspace`.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; the workspace's binaries one level up.
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so that both binaries are built",
        path.display()
    );
    path
}

/// A child process that is killed when the test ends, whatever happens.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails the test, with the process's output, if it has exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited ({status}):\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (the signal `docker stop` sends).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` with its output in `log`; `dir` is removed when it ends.
pub fn spawn_logged(mut cmd: Command, log: PathBuf, dir: Option<tempfile::TempDir>) -> Proc {
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("the binary starts");
    Proc {
        child,
        log,
        _dir: dir,
    }
}

/// A real `backend` process named `name` (its `/info` container_id), ready:
/// it has answered `/info` as itself. An open port is not enough: another
/// program may hold it (the backend then exits, unable to bind), or the
/// backend may take connections before it serves them.
pub fn start_backend(name: &str, port: u16) -> Proc {
    let mut cmd = Command::new(binary("backend"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "1"])
        .env("HOSTNAME", name);
    let log = std::env::temp_dir().join(format!("backend-{name}-{port}.log"));
    let mut proc = spawn_logged(cmd, log, None);
    let url = format!("http://127.0.0.1:{port}/info");
    wait_for(
        Duration::from_secs(10),
        &format!("the backend {name} to answer on port {port}"),
        || {
            proc.assert_running(&format!("the backend {name} (port {port})"));
            let reply = get(&url).ok().filter(|r| r.status == 200)?;
            let info: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
            (info["container_id"] == name).then_some(())
        },
    );
    proc
}

/// A running balancer and the file its configuration is in.
pub struct Balancer {
    pub proc: Proc,
    pub port: u16,
    pub config: PathBuf,
}

impl Balancer {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Overwrites the configuration file in place with `body` (same listen address).
    pub fn rewrite(&self, body: &str) {
        std::fs::write(&self.config, config_text(self.port, body)).unwrap();
    }

    /// Waits until the balancer's log has a line containing `text`; returns it.
    pub fn wait_for_log(&self, text: &str) -> String {
        wait_for(
            Duration::from_secs(10),
            &format!("a log line with {text:?}"),
            || {
                self.proc
                    .log_text()
                    .lines()
                    .find(|l| l.contains(text))
                    .map(str::to_owned)
            },
        )
    }
}

pub fn config_text(port: u16, body: &str) -> String {
    format!("listen = \"127.0.0.1:{port}\"\nthreads = 2\n{body}")
}

/// Writes `body` (a config without `listen`) and starts a real `balancer` on it.
pub fn start_balancer(body: &str) -> Balancer {
    start_balancer_with_env(body, &[])
}

/// Runs `balancer ARGS` to completion: (exit code, stdout + stderr).
pub fn run_balancer(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("balancer"))
        .args(args)
        .output()
        .expect("balancer runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Sends `bytes` on a fresh connection and reads until the server closes it
/// (or 5 s pass): (what came back, whether the server closed the connection).
pub fn raw_exchange(port: u16, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).expect("send");
    read_to_close(&mut stream)
}

/// Reads until the server closes `stream` or its read timeout passes:
/// (what came, whether the server closed the connection or reset it).
pub fn read_to_close(stream: &mut TcpStream) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// GET `url` with extra request headers; any status is a reply, only a transport failure is an error.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    request("GET", url, headers)
}

/// Sends `method` to `url`; any status is a reply, only a transport failure is an error.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    send(&agent(), method, url, headers)
}

/// Sends `method` to `url` through `agent`; any status is a reply.
fn send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = agent.request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let resp = match req.call() {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or("").to_owned();
            (n, v)
        })
        .collect();
    let body = resp.into_string().map_err(|e| e.to_string())?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn get(url: &str) -> Result<Reply, String> {
    get_with(url, &[])
}

/// The `container_id` of an `/info` reply.
pub fn container_id(reply: &Reply) -> String {
    let info: serde_json::Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("/info is not JSON ({e}): {:?}", reply.body));
    info["container_id"].as_str().unwrap_or_default().to_owned()
}

/// What a scripted test origin does with a request.
#[derive(Clone, Debug)]
pub enum Act {
    /// Answer with this status and body; `{n}` in the body becomes the number
    /// of requests the origin has seen, so each answer differs.
    Answer(u16, &'static str),
    /// Answer with this status, these extra headers and this body (`{n}` as above).
    With(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// Answer after a delay.
    Slow(Duration, u16, &'static str),
    /// Read the request, then never answer.
    Hang,
    /// Read the request, then close the connection without answering.
    Drop,
    /// Send the status line and part of the headers, then close the connection.
    Cut,
    /// Send a whole head (`content-length: 100`) and part of the body, then
    /// close the connection.
    CutBody,
    /// Answer bytes that are not HTTP.
    Garbage,
    /// Answer with this status and body (`{n}` as above) once the gate is
    /// opened (or after 30 s): a request that is in flight for as long as
    /// the test needs, whatever the machine's load.
    Held(Gate, u16, &'static str),
    /// Answer with this status, exactly these headers (no default
    /// `content-type`; `content-length` is added) and this body (`{n}` as above).
    Exact(u16, Vec<(&'static str, &'static str)>, &'static str),
}

/// A gate that holds an origin's answers until the test opens it.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    /// Waits until the gate is open, at most `within`.
    fn pass(&self, within: Duration) {
        let (open, opened) = &*self.0;
        let guard = open.lock().unwrap();
        let _ = opened.wait_timeout_while(guard, within, |open| !*open);
    }
}

/// One request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct OriginState {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<Vec<(String, Act)>>,
    stopped: std::sync::atomic::AtomicBool,
}

/// A test origin on a real loopback socket that records every request it sees
/// and answers each path as told.
pub struct Origin {
    pub port: u16,
    state: Arc<OriginState>,
}

impl Origin {
    /// Starts an origin that answers `Act::Answer(200, "origin")` unless told otherwise.
    pub fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(OriginState::default());
        let shared = Arc::clone(&state);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        thread::spawn(move || {
            // Polls so that `stop` can close the port: connections are then refused.
            while !shared.stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let state = Arc::clone(&shared);
                        thread::spawn(move || serve(stream, &state));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Origin { port, state }
    }

    /// Closes the listening port: new connections are refused from now on.
    pub fn stop(&self) {
        self.state
            .stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        wait_for(Duration::from_secs(5), "the origin's port to close", || {
            TcpStream::connect(("127.0.0.1", self.port))
                .is_err()
                .then_some(())
        });
    }

    /// How many requests for exactly `path_and_query` were seen.
    pub fn hits(&self, path_and_query: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path == path_and_query)
            .count()
    }

    /// From now on, requests whose path starts with `prefix` get `act`.
    pub fn on(&self, prefix: &str, act: Act) {
        let mut script = self.state.script.lock().unwrap();
        script.retain(|(p, _)| p != prefix);
        script.push((prefix.to_owned(), act));
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many requests for paths other than `except` were seen.
    pub fn hits_except(&self, except: &str) -> usize {
        self.seen().iter().filter(|s| s.path != except).count()
    }

    pub fn saw_path(&self, path: &str) -> bool {
        self.seen().iter().any(|s| s.path == path)
    }
}

fn serve(stream: TcpStream, state: &OriginState) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if state.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return; // a stopped origin answers nothing, on kept-alive connections too
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_owned();
        // A HEAD is answered with the head a GET would have, and no body.
        let head_only = line.starts_with("HEAD ");
        let mut headers = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_owned());
                if n == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                }
                headers.push((n, v));
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = {
            let mut seen = state.seen.lock().unwrap();
            seen.push(Seen {
                path: path.clone(),
                headers,
            });
            seen.len()
        };
        let act = state
            .script
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, a)| a.clone())
            .unwrap_or(Act::Answer(200, "origin"));
        let (status, extra, text) = match act {
            Act::Answer(status, text) => (status, Vec::new(), text),
            Act::With(status, headers, text) => (status, headers, text),
            Act::Exact(status, headers, text) => {
                let text = text.replace("{n}", &n.to_string());
                let mut response =
                    format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", text.len());
                for (name, value) in headers {
                    response.push_str(&format!("{name}: {value}\r\n"));
                }
                response.push_str("\r\n");
                if !head_only {
                    response.push_str(&text);
                }
                if writer.write_all(response.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
            Act::Slow(delay, status, text) => {
                thread::sleep(delay);
                (status, Vec::new(), text)
            }
            Act::Held(gate, status, text) => {
                gate.pass(Duration::from_secs(30));
                (status, Vec::new(), text)
            }
            Act::Hang => {
                thread::sleep(Duration::from_secs(60));
                return;
            }
            Act::Drop => return,
            Act::Cut => {
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n");
                return;
            }
            Act::CutBody => {
                let _ = writer.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\npartial",
                );
                let _ = writer.flush();
                return;
            }
            Act::Garbage => {
                let _ = writer.write_all(b"this is not http\r\n\r\n");
                return;
            }
        };
        let text = text.replace("{n}", &n.to_string());
        let mut response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n",
            text.len()
        );
        for (name, value) in extra {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str("\r\n");
        if !head_only {
            response.push_str(&text);
        }
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

// The admin listener.

/// The value of the sample `series` (name and labels exactly as printed), or 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// GET /metrics from the admin listener `admin`.
pub fn scrape(admin: u16) -> String {
    let r = wait_for(Duration::from_secs(10), "the admin listener", || {
        get(&format!("http://127.0.0.1:{admin}/metrics")).ok()
    });
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{r:?}"
    );
    r.body
}

/// GET /status from the admin listener `admin`, parsed.
pub fn status(admin: u16) -> serde_json::Value {
    // The admin listener may start a moment after the public one.
    let reply = wait_for(Duration::from_secs(10), "the admin listener", || {
        get(&format!("http://127.0.0.1:{admin}/status")).ok()
    });
    serde_json::from_str(&reply.body).unwrap()
}

/// Like [`start_balancer`], with extra environment variables (such as
/// `BALANCER_ADMIN_TOKEN`) set for the balancer process.
pub fn start_balancer_with_env(body: &str, env: &[(&str, &str)]) -> Balancer {
    start_program(&binary("balancer"), body, env)
}

/// Starts `program` (the balancer, or a program of one's own built on it)
/// on `body`; fails at once, with its output, if it exits instead of listening.
pub fn start_program(program: &Path, body: &str, env: &[(&str, &str)]) -> Balancer {
    start_program_on(program, free_port(), body, env)
}

/// [`start_program`] with its plain listener on `port`.
pub fn start_program_on(program: &Path, port: u16, body: &str, env: &[(&str, &str)]) -> Balancer {
    let mut balancer = spawn_balancer(program, port, body, env);
    let name = program.display().to_string();
    wait_for(
        Duration::from_secs(10),
        &format!("{name} to listen"),
        || {
            balancer.proc.assert_running(&name);
            TcpStream::connect(("127.0.0.1", balancer.port)).ok()
        },
    );
    balancer
}

/// A second balancer on the port of another (`reuse_port = true` in both),
/// ready: it has served a request of its own.
pub fn start_balancer_beside(other: &Balancer, body: &str) -> Balancer {
    let mut balancer = spawn_balancer(&binary("balancer"), other.port, body, &[]);
    wait_for(
        Duration::from_secs(20),
        "the second balancer to take a share of the new connections",
        || {
            balancer.proc.assert_running("the second balancer");
            let _ = get(&balancer.url("/?beside"));
            balancer.proc.log_text().contains("/?beside").then_some(())
        },
    );
    balancer
}

/// Starts `program` on `body`, listening on `port`.
fn spawn_balancer(program: &Path, port: u16, body: &str, env: &[(&str, &str)]) -> Balancer {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("balancer.toml");
    std::fs::write(&config, config_text(port, body)).unwrap();
    let mut cmd = Command::new(program);
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    cmd.envs(env.iter().copied());
    let log = dir.path().join("balancer.log");
    let proc = spawn_logged(cmd, log, Some(dir));
    Balancer { proc, port, config }
}

/// Reads one response (head and `Content-Length` body) from a connection
/// that may stay open, and no more.
pub fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return text,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that keeps its connections open from one request to the next
/// (`get` and `request` open one each time) and does not follow redirects.
pub struct Client(ureq::Agent);

impl Default for Client {
    fn default() -> Self {
        Client(
            ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .redirects(0)
                .build(),
        )
    }
}

impl Client {
    pub fn get(&self, url: &str) -> Result<Reply, String> {
        self.request("GET", url, &[])
    }

    /// Sends `method` to `url`; any status is a reply, only a transport failure is an error.
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        send(&self.0, method, url, headers)
    }
}

// Programs of one's own: the balancer's examples (`balancer/examples/`).

/// The path of the balancer's example `name`, which `cargo test` builds
/// (as `cargo build --examples` does).
pub fn example(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().expect("the test executable has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test` (which builds the examples) or `cargo build --examples` first",
        path.display()
    );
    path
}

/// Like [`start_balancer_with_env`], running the example `name` instead of
/// `balancer`; fails at once, with its output, if it exits instead of listening.
pub fn start_example(name: &str, body: &str, env: &[(&str, &str)]) -> Balancer {
    start_program(&example(name), body, env)
}

/// Runs the example `name` with `args` to completion, with `env` set and
/// the variables in `unset` removed: (exit code, stdout + stderr).
pub fn run_example(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    unset: &[&str],
) -> (i32, String) {
    let mut cmd = Command::new(example(name));
    cmd.args(args).envs(env.iter().copied());
    for var in unset {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("the example runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A balancer in front of `origin`, once it has answered a `GET /`;
/// `extra` (top-level keys, then tables) goes first.
pub fn in_front_of(origin: &Origin, extra: &str) -> Balancer {
    let lb = start_balancer(&format!(
        "{extra}\n[upstream]\nservers = [\"127.0.0.1:{}\"]\nread_timeout = \"2s\"\n",
        origin.port
    ));
    wait_for(
        Duration::from_secs(10),
        "the origin through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );
    lb
}

/// A balancer in front of `origin` with one cache rule for `/c` (`rule` is
/// the rest of it, `cache` the rest of `[cache]`) and an admin listener.
pub fn cached(origin: &Origin, rule: &str, cache: &str) -> (Balancer, u16) {
    cached_with(origin, "", rule, cache)
}

/// [`cached`], with `top` (top-level keys such as `http2_cleartext`) too.
pub fn cached_with(origin: &Origin, top: &str, rule: &str, cache: &str) -> (Balancer, u16) {
    let admin = free_port();
    let lb = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin}\"\n{top}\n\
         [upstream]\nservers = [\"127.0.0.1:{}\"]\nread_timeout = \"2s\"\n\
         [cache]\n{cache}\n[[cache.rule]]\npath = \"/c\"\n{rule}\n",
        origin.port
    ));
    wait_for(
        Duration::from_secs(10),
        "the origin through the balancer",
        || get(&lb.url("/warmup")).ok().filter(|r| r.status == 200),
    );
    (lb, admin)
}

/// The `X-Cache-Status` of a reply.
pub fn cache_status(r: &Reply) -> &str {
    r.header("x-cache-status").unwrap_or("(none)")
}

/// The first answer for `url` that is no cache hit, asked for until it
/// comes (a hit leaves the entry as it is) or `within` passes: the end of
/// an entry's freshness, seen as it happens.
pub fn first_non_hit(url: &str, within: Duration) -> Reply {
    wait_for(within, &format!("{url} to be no cache hit"), || {
        get(url).ok().filter(|r| cache_status(r) != "HIT")
    })
}

// Development certificates.

/// A development CA and a certificate it signed, as `balancer cert` writes them.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// The certificate `balancer cert --self-signed` makes for `hosts`.
    pub fn new(hosts: &[&str]) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().to_str().expect("a UTF-8 temp dir").to_owned();
        let mut args = vec!["cert", "--self-signed"];
        for host in hosts {
            args.extend(["--host", host]);
        }
        args.extend(["--out", &out]);
        let (code, output) = run_balancer(&args);
        assert_eq!(code, 0, "balancer cert {args:?} failed: {output}");
        Pki {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        }
    }

    /// Copies the certificate and key over `cert` and `key`: certificate first,
    /// as a renewal that writes files in place does.
    pub fn install(&self, cert: &Path, key: &Path) {
        std::fs::copy(&self.cert, cert).expect("copy the certificate");
        std::fs::copy(&self.key, key).expect("copy the key");
    }
}

/// A TOML string for `path`.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("a UTF-8 path"))
}

// A real browser.

/// Headless Chromium with a home directory of its own. On Linux, Chromium
/// trusts the CAs of the NSS database in `$HOME/.pki/nssdb` beyond its
/// built-in ones: that database is where a test CA is made trusted, as a
/// user's `certutil` would, with no flag that turns certificate checks off.
pub struct Browser {
    program: &'static str,
    home: tempfile::TempDir,
}

/// What one page load printed: `out` (the DOM with `--dump-dom`) and `log`
/// (Chromium's stderr, where a failed load says why, e.g. `net::ERR_CERT_AUTHORITY_INVALID`).
pub struct Loaded {
    pub out: String,
    pub log: String,
}

impl Browser {
    /// Chromium with an empty home: the NSS database it makes there trusts nothing more.
    pub fn new() -> Browser {
        let program = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("a headless Chromium is needed for this test: apt-get install chromium (.ci/run installs it)");
        Browser {
            program,
            home: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Chromium whose NSS database, made here with `certutil`, trusts the
    /// CAs in `cas` (PEM files) to identify websites, and nothing more.
    pub fn trusting(cas: &[&Path]) -> Browser {
        let browser = Browser::new();
        let db = browser.home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&db).expect("the NSS database's directory");
        let db = format!("sql:{}", db.display());
        certutil(&["-N", "-d", &db, "--empty-password"]);
        for (i, ca) in cas.iter().enumerate() {
            let name = format!("test-ca-{i}");
            let ca = ca.to_str().expect("a UTF-8 path");
            // C,,: a CA trusted to issue server certificates (not e-mail or code signing ones).
            certutil(&["-A", "-d", &db, "-n", &name, "-t", "C,,", "-i", ca]);
        }
        browser
    }

    /// Loads `url` in a fresh profile, with the flags `extra` (such as
    /// `--dump-dom`), giving the page's scripts 3 s of virtual time.
    pub fn load(&self, url: &str, extra: &[&str]) -> Loaded {
        let profile = tempfile::tempdir().expect("temp dir");
        let out = Command::new(self.program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .env("HOME", self.home.path())
            .output()
            .expect("chromium runs");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "chromium failed: {log}");
        Loaded {
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            log,
        }
    }
}

/// Runs `certutil ARGS` (Debian's libnss3-tools), failing the test if it fails.
fn certutil(args: &[&str]) {
    let out = Command::new("certutil").args(args).output().expect(
        "certutil is needed for this test: apt-get install libnss3-tools (.ci/run installs it)",
    );
    assert!(
        out.status.success(),
        "certutil {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
