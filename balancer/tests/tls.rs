//! HTTPS, HTTP/2 and WebSockets on real sockets: the `[tls]` listener (HTTP/1.1
//! and h2 by ALPN, certificates chosen by SNI, renewed and refused while it
//! runs, the oldest TLS version it accepts), the redirect from the plain
//! listener, h2c on the plain listener, backends spoken to in h2c or over
//! verified TLS (nginx as the backend), WebSockets through both listeners,
//! and what `--check` says about certificate files.
//!
//! Certificates come from `balancer cert --self-signed`; the clients are
//! curl, `openssl s_client`, and rustls, h2 and tungstenite in the test.

#[path = "support/http2.rs"]
mod http2;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tungstenite::{Message, WebSocket};

use support::*;

/// What the tests read of a certificate `Pki` made (kept here: the backend's
/// tests share `support` and have no TLS library).
trait Leaf {
    /// The leaf certificate (the first of cert.pem), as it goes over the wire.
    fn leaf(&self) -> Vec<u8>;
}

impl Leaf for Pki {
    fn leaf(&self) -> Vec<u8> {
        CertificateDer::pem_file_iter(&self.cert)
            .expect("a readable certificate file")
            .next()
            .expect("a certificate in the file")
            .expect("a PEM certificate")
            .to_vec()
    }
}

// A balancer with a TLS listener.

/// A running balancer with its `[tls]` listener on `tls_port`.
struct Https {
    lb: Balancer,
    tls_port: u16,
}

/// Starts a balancer whose `[tls]` listener serves `cert`/`key` with the
/// keys `tls_extra`. `top` goes before `[tls]` (top-level keys, or a table
/// such as `[limits]`); `upstream` after it (the whole `[upstream]` table).
fn start_https(top: &str, cert: &Path, key: &Path, tls_extra: &str, upstream: &str) -> Https {
    let tls_port = free_port();
    let lb = start_balancer(&format!(
        "{top}\n[tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = {}\nprivate_key = {}\n{tls_extra}\n{upstream}\n",
        toml_path(cert),
        toml_path(key),
    ));
    wait_for(Duration::from_secs(10), "the TLS listener", || {
        TcpStream::connect(("127.0.0.1", tls_port)).ok()
    });
    Https { lb, tls_port }
}

fn upstream_at(port: u16, extra: &str) -> String {
    format!("[upstream]\nservers = [\"127.0.0.1:{port}\"]\n{extra}\n")
}

// A TLS client (rustls), HTTP/1.1 over it.

const TLS12_AND_13: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A client configuration trusting only the CAs in `cas`, offering `versions`
/// and ALPN `alpn`, that never resumes a session: every connection is a full
/// handshake, so it sees the certificate served now.
fn client_config(
    cas: &[&Path],
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        for cert in CertificateDer::pem_file_iter(ca).expect("a readable CA file") {
            roots.add(cert.expect("a PEM CA")).expect("a usable CA");
        }
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("supported versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A TLS client trusting `cas`, TLS 1.2 and 1.3, no ALPN (so HTTP/1.1).
fn trusting(cas: &[&Path]) -> Arc<ClientConfig> {
    client_config(cas, TLS12_AND_13, &[])
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to 127.0.0.1:`port` sending SNI `name`, and completes the handshake
/// (which checks the certificate against the config's CAs and `name`).
fn connect_tls(port: u16, name: &str, config: &Arc<ClientConfig>) -> Result<TlsStream, String> {
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::clone(config), server_name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("TLS handshake with {name}: {e}"))?;
    }
    Ok(stream)
}

/// The leaf certificate the server sent on `stream`.
fn served_leaf(stream: &TlsStream) -> Vec<u8> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

/// An HTTPS response, with the certificate it came under.
#[derive(Debug)]
struct Fetched {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    leaf: Vec<u8>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// GET `path` over a fresh TLS connection to `port` (SNI and Host `name`) in
/// HTTP/1.1; any status is a reply, a handshake or transport failure an error.
fn https_get(
    port: u16,
    name: &str,
    config: &Arc<ClientConfig>,
    path: &str,
) -> Result<Fetched, String> {
    let mut stream = connect_tls(port, name, config)?;
    let leaf = served_leaf(&stream);
    let head = format!("GET {path} HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("send: {e}"))?;
    Ok(Fetched {
        leaf,
        ..read_http1(&mut stream)?
    })
}

/// Reads one HTTP/1.1 response (framed by Content-Length, chunked, or the
/// close); its `leaf` is left empty.
fn read_http1(stream: &mut impl Read) -> Result<Fetched, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    let mut fill = |got: &mut Vec<u8>, closed: &mut bool| -> Result<(), String> {
        match stream.read(&mut buf) {
            Ok(0) => *closed = true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => *closed = true,
            Err(e) => return Err(format!("read: {e}")),
        }
        Ok(())
    };
    let end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if closed {
            return Err(format!(
                "the connection closed before a whole head: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        fill(&mut got, &mut closed)?;
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not a status line: {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let start = end + 4;
    let body = if let Some(length) = find("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("Content-Length {length:?}"))?;
        while got.len() < start + length && !closed {
            fill(&mut got, &mut closed)?;
        }
        if got.len() < start + length {
            return Err(format!(
                "a body cut short: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        got[start..start + length].to_vec()
    } else if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        while !got[start..].ends_with(b"0\r\n\r\n") && !closed {
            fill(&mut got, &mut closed)?;
        }
        dechunk(&got[start..])?
    } else {
        while !closed {
            fill(&mut got, &mut closed)?;
        }
        got[start..].to_vec()
    };
    Ok(Fetched {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        leaf: Vec::new(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line cut short")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("a bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("a chunk cut short".to_owned());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// Command-line clients.

/// Runs `program args` with no input, killed after 20 s (exit code 124): (exit code, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("timeout")
        .arg("20")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `curl -sS ARGS -w '\n%{http_version} %{http_code}'`: (HTTP version, status, body),
/// or what curl said when it failed.
fn curl(args: &[&str]) -> Result<(String, u16, String), String> {
    let mut all = vec![
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_version} %{http_code}",
    ];
    all.extend(args);
    let (code, out, err) = run("curl", &all);
    if code != 0 {
        return Err(format!("curl {args:?} failed: {err}{out}"));
    }
    let (body, tail) = out.rsplit_once('\n').unwrap_or(("", &out));
    let (version, code) = tail.split_once(' ').unwrap_or((tail, "0"));
    Ok((
        version.to_owned(),
        code.parse().unwrap_or(0),
        body.to_owned(),
    ))
}

/// `openssl s_client -connect 127.0.0.1:PORT ARGS`: (whether a handshake
/// completed, everything it printed).
fn s_client(port: u16, args: &[&str]) -> (bool, String) {
    let connect = format!("127.0.0.1:{port}");
    let mut all = vec!["s_client", "-connect", &connect];
    all.extend(args);
    let (code, out, err) = run("openssl", &all);
    let text = format!("{out}{err}");
    let completed = text
        .lines()
        .any(|l| l.starts_with("New, TLSv1") && !l.contains("(NONE)"));
    (code == 0 && completed, text)
}

/// The `subject=` line `openssl s_client` printed for the served certificate.
fn subject(s_client_output: &str) -> &str {
    s_client_output
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or("no certificate")
}

// nginx as a backend.

/// An nginx serving one `server` on a loopback port, stopped when dropped.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// Starts nginx with `listen 127.0.0.1:PORT {listen_flags};` and `server_extra`
    /// in its one server, which answers every request 200 with the protocol
    /// it was asked in. Its access log records `$server_protocol`.
    fn start(listen_flags: &str, server_extra: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               log_format proto '$request_method $request_uri $server_protocol sni=$ssl_server_name';\n\
               access_log {d}/access.log proto;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen 127.0.0.1:{port} {listen_flags};\n\
                 {server_extra}\n\
                 location / {{ default_type text/plain; return 200 \"nginx $server_protocol\\n\"; }}\n\
               }}\n\
             }}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { child, dir, port };
        wait_for(Duration::from_secs(10), "nginx to listen", || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.file("error.log"));
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        nginx
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        self.file("access.log")
    }

    /// The access log once it mentions `text` (nginx writes a request's line
    /// after its response, so a client can be faster), or after 5 s.
    fn access_log_with(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.access_log();
            if log.contains(text) || Instant::now() >= deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    /// SIGTERM, so that the master stops its workers too (a SIGKILLed master
    /// leaves them running); SIGKILL if it has not exited after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// HTTP/2 (the h2 crate, through `support/http2.rs`) and WebSockets (tungstenite).

/// Two GETs of `uri` on one HTTP/2 connection over `io`, with the connection
/// left idle for `pause` between them.
async fn h2_twice_with_pause<T>(
    io: T,
    uri: &str,
    pause: Duration,
) -> Result<[(u16, String); 2], String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::handshake(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let first = http2::get(&send, uri, &[]).await?;
    // The idleness is what is tested: nothing to poll for.
    tokio::time::sleep(pause).await;
    if driver.is_finished() {
        return Err(format!(
            "the connection ended during the {pause:?} pause: {:?}",
            driver.await
        ));
    }
    let second = http2::get(&send, uri, &[])
        .await
        .map_err(|e| format!("the second request, after {pause:?} idle: {e}"))?;
    Ok([first, second].map(|r| (r.status, r.body)))
}

/// Opens a WebSocket to `url` over `stream`.
fn ws_open<S: Read + Write>(url: &str, stream: S) -> WebSocket<S> {
    match tungstenite::client(url, stream) {
        Ok((ws, response)) => {
            assert_eq!(response.status().as_u16(), 101, "{url}: {response:?}");
            ws
        }
        Err(e) => panic!("the WebSocket handshake with {url} failed: {e}"),
    }
}

/// A plain connection to the balancer's listener on `port`, for a WebSocket.
fn plain_tcp(port: u16) -> TcpStream {
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect to the balancer");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp
}

/// Opens `/ws` through the plain listener on `port`.
fn ws_plain(port: u16) -> WebSocket<TcpStream> {
    ws_open(&format!("ws://127.0.0.1:{port}/ws"), plain_tcp(port))
}

/// Sends `text` and expects it back; the error says which went wrong.
fn ws_round_trip<S: Read + Write>(ws: &mut WebSocket<S>, text: &str) -> Result<(), String> {
    ws.send(Message::text(text))
        .map_err(|e| format!("send {text:?}: {e}"))?;
    match ws.read() {
        Ok(Message::Text(echo)) if echo.as_str() == text => Ok(()),
        other => Err(format!("expected {text:?} back, got {other:?}")),
    }
}

/// Sends a text and a binary message and reads each echoed back.
fn ws_echo<S: Read + Write>(ws: &mut WebSocket<S>, text: &str) {
    ws.send(Message::text(text)).expect("send a text message");
    match ws.read() {
        Ok(Message::Text(echo)) => assert_eq!(echo.as_str(), text),
        other => panic!("expected the text {text:?} back, got {other:?}"),
    }
    let binary = vec![0u8, 1, 2, 254, 255];
    ws.send(Message::binary(binary.clone()))
        .expect("send a binary message");
    match ws.read() {
        Ok(Message::Binary(echo)) => assert_eq!(echo.as_ref(), binary.as_slice()),
        other => panic!("expected the binary {binary:?} back, got {other:?}"),
    }
}

/// Closes from the client side: the server's close frame comes back, then
/// the connection ends.
fn ws_close<S: Read + Write>(ws: &mut WebSocket<S>) {
    ws.close(None).expect("send the close frame");
    let mut close_came = false;
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => close_came = true,
            Ok(other) => panic!("expected the close frame back, got {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            // Over TLS, a server that closes TCP without close_notify.
            Err(tungstenite::Error::Io(e))
                if close_came && e.kind() == ErrorKind::UnexpectedEof =>
            {
                break
            }
            Err(e) => panic!("expected a clean close, got {e} (close frame came: {close_came})"),
        }
    }
    assert!(close_came, "the server's close frame never came");
}

// 1. HTTPS with HTTP/1.1 and HTTP/2.

#[test]
fn https_serves_http1_and_http2_with_the_development_certificate() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let backend_port = free_port();
    let _backend = start_backend("tls-hello", backend_port);
    let https = start_https("", &pki.cert, &pki.key, "", &upstream_at(backend_port, ""));
    let port = https.tls_port;

    let client = trusting(&[&pki.ca]);
    let r = wait_for(Duration::from_secs(10), "an HTTPS answer", || {
        https_get(port, "localhost", &client, "/").ok()
    });
    assert_eq!((r.status, r.body.as_str()), (200, "Hello World!"), "{r:?}");
    assert_eq!(
        r.leaf,
        pki.leaf(),
        "the served certificate is not cert.pem's"
    );
    https.lb.wait_for_log("\"GET / HTTP/1.1+TLS\" 200");

    // By IP address (no SNI): the default certificate, valid for 127.0.0.1 too.
    let r = https_get(port, "127.0.0.1", &client, "/").expect("HTTPS by IP address");
    assert_eq!((r.status, r.body.as_str()), (200, "Hello World!"), "{r:?}");

    let url = format!("https://localhost:{port}/");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = pki.ca.to_str().unwrap();
    let (version, status, body) =
        curl(&["--http2", "--cacert", ca, "--resolve", &resolve, &url]).unwrap();
    assert_eq!(
        (version.as_str(), status, body.as_str()),
        ("2", 200, "Hello World!"),
        "curl --http2 over TLS"
    );
    https.lb.wait_for_log("\"GET / HTTP/2+TLS\" 200");

    // A client that does not trust the CA is refused by its own check.
    let (_, _, refused) = run("curl", &["-sS", "--resolve", &resolve, &url]);
    assert!(
        refused.contains("certificate"),
        "curl without --cacert should fail the certificate check, said: {refused}"
    );
}

#[test]
fn https_requests_reach_the_upstream_marked_https_and_plain_ones_http() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https("", &pki.cert, &pki.key, "", &upstream_at(origin.port, ""));
    let client = trusting(&[&pki.ca]);

    let r = wait_for(Duration::from_secs(10), "an HTTPS answer", || {
        https_get(https.tls_port, "localhost", &client, "/over-tls").ok()
    });
    assert_eq!((r.status, r.body.as_str()), (200, "origin"), "{r:?}");
    let url = format!("https://localhost:{}/over-h2", https.tls_port);
    let resolve = format!("localhost:{}:127.0.0.1", https.tls_port);
    let (version, status, _) = curl(&[
        "--http2",
        "--cacert",
        pki.ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ])
    .unwrap();
    assert_eq!((version.as_str(), status), ("2", 200));
    let r = get(&https.lb.url("/over-plain")).unwrap();
    assert_eq!(r.status, 200);

    let proto = |path: &str| {
        origin
            .seen()
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("the origin never saw {path}: {:?}", origin.seen()))
            .header("x-forwarded-proto")
            .map(str::to_owned)
    };
    assert_eq!(proto("/over-tls").as_deref(), Some("https"));
    assert_eq!(proto("/over-h2").as_deref(), Some("https"));
    assert_eq!(proto("/over-plain").as_deref(), Some("http"));
}

#[test]
fn http2_false_offers_only_http1_over_tls() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https(
        "",
        &pki.cert,
        &pki.key,
        "http2 = false",
        &upstream_at(origin.port, ""),
    );
    let url = format!("https://localhost:{}/", https.tls_port);
    let resolve = format!("localhost:{}:127.0.0.1", https.tls_port);
    let (version, status, body) = curl(&[
        "--http2",
        "--cacert",
        pki.ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ])
    .unwrap();
    assert_eq!(
        (version.as_str(), status, body.as_str()),
        ("1.1", 200, "origin"),
        "with http2 = false, ALPN must not offer h2"
    );
    let h2_only = client_config(&[&pki.ca], TLS12_AND_13, &[b"h2", b"http/1.1"]);
    let stream = connect_tls(https.tls_port, "localhost", &h2_only).unwrap();
    assert_ne!(stream.conn.alpn_protocol(), Some(&b"h2"[..]));
}

// 2. SNI.

#[test]
fn sni_chooses_among_the_certificates() {
    let default = Pki::new(&["localhost", "127.0.0.1"]);
    let api = Pki::new(&["api.example.com", "*.internal.example.com"]);
    let backend_port = free_port();
    let _backend = start_backend("tls-sni", backend_port);
    let https = start_https(
        "",
        &default.cert,
        &default.key,
        &format!(
            "[[tls.certificate_for]]\nhosts = [\"api.example.com\", \"*.internal.example.com\"]\ncertificate = {}\nprivate_key = {}\n",
            toml_path(&api.cert),
            toml_path(&api.key)
        ),
        &upstream_at(backend_port, ""),
    );
    let port = https.tls_port;

    for (name, expected) in [
        ("localhost", "subject=CN = localhost"),
        ("api.example.com", "subject=CN = api.example.com"),
        ("API.Example.COM", "subject=CN = api.example.com"),
        ("db.internal.example.com", "subject=CN = api.example.com"),
        ("internal.example.com", "subject=CN = localhost"),
        ("other.example.com", "subject=CN = localhost"),
    ] {
        let (done, out) = s_client(port, &["-servername", name]);
        assert!(
            done,
            "openssl s_client -servername {name}: no handshake:\n{out}"
        );
        assert_eq!(subject(&out), expected, "for SNI {name}");
    }
    let (done, out) = s_client(port, &["-noservername"]);
    assert!(done, "openssl s_client -noservername: no handshake:\n{out}");
    assert_eq!(subject(&out), "subject=CN = localhost", "without SNI");

    // Each chain verifies for its names, end to end.
    let api_client = trusting(&[&api.ca]);
    for name in ["api.example.com", "db.internal.example.com"] {
        let r = https_get(port, name, &api_client, "/").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((r.status, r.body.as_str()), (200, "Hello World!"), "{name}");
        assert_eq!(r.leaf, api.leaf(), "{name}");
    }
    let url = format!("https://api.example.com:{port}/");
    let resolve = format!("api.example.com:{port}:127.0.0.1");
    let (_, status, body) = curl(&[
        "--cacert",
        api.ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ])
    .unwrap();
    assert_eq!((status, body.as_str()), (200, "Hello World!"));
    let r = https_get(port, "localhost", &trusting(&[&default.ca]), "/").unwrap();
    assert_eq!(r.leaf, default.leaf());
}

// 3 and 4. Renewal, and a broken edit.

/// The live certificate files of a balancer, in a directory of their own.
struct LiveFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl LiveFiles {
    fn of(pki: &Pki) -> LiveFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let live = LiveFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        pki.install(&live.cert, &live.key);
        live
    }
}

#[test]
fn a_renewed_certificate_is_served_to_the_next_connections_without_a_failed_request() {
    let old = Pki::new(&["localhost"]);
    let new = Pki::new(&["localhost"]);
    let files = LiveFiles::of(&old);
    let backend_port = free_port();
    let _backend = start_backend("tls-renew", backend_port);
    let https = start_https(
        "",
        &files.cert,
        &files.key,
        "",
        &upstream_at(backend_port, ""),
    );
    let port = https.tls_port;
    let pid = https.lb.proc.pid();
    let both = trusting(&[&old.ca, &new.ca]);
    wait_for(Duration::from_secs(10), "an HTTPS answer", || {
        https_get(port, "localhost", &both, "/").ok()
    });

    let stop = Arc::new(AtomicBool::new(false));
    // Each request's response, or its error.
    let results: Arc<Mutex<Vec<Result<Fetched, String>>>> = Arc::default();
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (stop, results, both) =
                (Arc::clone(&stop), Arc::clone(&results), Arc::clone(&both));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = https_get(port, "localhost", &both, "/");
                    results.lock().unwrap().push(r);
                }
            })
        })
        .collect();
    let count = |leaf: &[u8]| {
        results
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.leaf == leaf))
            .count()
    };
    wait_for(
        Duration::from_secs(10),
        "requests under the old certificate",
        || (count(&old.leaf()) >= 20).then_some(()),
    );

    let renewed = Instant::now();
    new.install(&files.cert, &files.key);
    let only_new = trusting(&[&new.ca]);
    let r = wait_for(
        Duration::from_secs(10),
        "a fresh connection to get the new certificate",
        || https_get(port, "localhost", &only_new, "/").ok(),
    );
    let took = renewed.elapsed();
    assert_eq!((r.status, r.leaf), (200, new.leaf()));
    assert!(
        took < Duration::from_secs(5),
        "the new certificate took {took:?} to be served (expected within a few seconds)"
    );
    wait_for(
        Duration::from_secs(10),
        "requests under the new certificate",
        || (count(&new.leaf()) >= 20).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("a request loop");
    }

    let results = results.lock().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the renewal, e.g. {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
    let (old_leaf, new_leaf) = (old.leaf(), new.leaf());
    for r in results.iter().flatten() {
        assert_eq!((r.status, r.body.as_str()), (200, "Hello World!"));
        assert!(
            r.leaf == old_leaf || r.leaf == new_leaf,
            "an unknown certificate was served"
        );
    }
    // No restart: the process started with the old certificate serves the new one.
    let mut lb = https.lb;
    assert!(
        matches!(lb.proc.child.try_wait(), Ok(None)),
        "the balancer (pid {pid}) exited during the renewal:\n{}",
        lb.proc.log_text()
    );
    let log = lb.proc.log_text();
    assert!(
        log.contains("certificate reloaded"),
        "no reload logged:\n{log}"
    );
    assert!(
        !log.contains("certificate reload refused"),
        "the certificate and key, written one after the other, were read half-written:\n{log}"
    );
}

#[test]
fn curl_trusting_a_bundle_of_two_development_cas_accepts_either_certificate() {
    // During a renewal, clients trust the old CA and the new one: with
    // OpenSSL, the order of the bundle must not matter.
    let served = Pki::new(&["localhost"]);
    let other = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https(
        "",
        &served.cert,
        &served.key,
        "",
        &upstream_at(origin.port, ""),
    );
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://localhost:{}/", https.tls_port);
    let resolve = format!("localhost:{}:127.0.0.1", https.tls_port);
    for (name, first, second) in [
        ("served-first.pem", &served.ca, &other.ca),
        ("served-last.pem", &other.ca, &served.ca),
    ] {
        let bundle = dir.path().join(name);
        let text =
            std::fs::read_to_string(first).unwrap() + &std::fs::read_to_string(second).unwrap();
        std::fs::write(&bundle, text).unwrap();
        let got = curl(&[
            "--cacert",
            bundle.to_str().unwrap(),
            "--resolve",
            &resolve,
            &url,
        ]);
        assert!(
            got.as_ref().is_ok_and(|(_, status, _)| *status == 200),
            "curl --cacert {name} (two CAs from `balancer cert`, the served one {}): {got:?}",
            if name == "served-first.pem" {
                "first"
            } else {
                "last"
            }
        );
    }
}

#[test]
fn a_broken_certificate_edit_is_refused_and_the_old_one_kept_until_fixed() {
    let old = Pki::new(&["localhost"]);
    let new = Pki::new(&["localhost"]);
    let files = LiveFiles::of(&old);
    let origin = Origin::start();
    let https = start_https(
        "",
        &files.cert,
        &files.key,
        "",
        &upstream_at(origin.port, ""),
    );
    let port = https.tls_port;
    let old_client = trusting(&[&old.ca]);
    let serves_old = || {
        let r = https_get(port, "localhost", &old_client, "/")
            .unwrap_or_else(|e| panic!("the old certificate is no longer served: {e}"));
        assert_eq!((r.status, r.leaf), (200, old.leaf()));
    };
    wait_for(Duration::from_secs(10), "an HTTPS answer", || {
        https_get(port, "localhost", &old_client, "/").ok()
    });
    let refusals = || {
        https
            .lb
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("certificate reload refused"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let cert_name = files.cert.display().to_string();
    let key_name = files.key.display().to_string();

    // Garbage in cert.pem.
    std::fs::write(&files.cert, "this is not a certificate\n").unwrap();
    let line = wait_for(Duration::from_secs(10), "the garbage to be refused", || {
        refusals().first().cloned()
    });
    assert!(
        line.contains(&cert_name) && line.contains("no certificate"),
        "the refusal should name {cert_name} and why: {line}"
    );
    serves_old();

    // A certificate whose key is not key.pem.
    std::fs::copy(&new.cert, &files.cert).unwrap();
    let line = wait_for(
        Duration::from_secs(10),
        "the mismatched pair to be refused",
        || refusals().get(1).cloned(),
    );
    assert!(
        line.contains(&cert_name)
            && line.contains(&key_name)
            && line.contains("do not go together"),
        "the refusal should name both files and why: {line}"
    );
    serves_old();

    // The matching key: the new pair takes effect.
    std::fs::copy(&new.key, &files.key).unwrap();
    let new_client = trusting(&[&new.ca]);
    let r = wait_for(
        Duration::from_secs(10),
        "the fixed pair to be served",
        || https_get(port, "localhost", &new_client, "/").ok(),
    );
    assert_eq!((r.status, r.leaf), (200, new.leaf()));
    https.lb.wait_for_log("certificate reloaded");
    assert_eq!(
        refusals().len(),
        2,
        "one refusal per broken edit: {:?}",
        refusals()
    );
}

// 5. TLS versions.

#[test]
fn tls_1_1_is_refused_and_1_2_and_1_3_accepted_by_default() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https("", &pki.cert, &pki.key, "", &upstream_at(origin.port, ""));
    let ca = pki.ca.to_str().unwrap();
    let port = https.tls_port;
    let verified = [
        "-CAfile",
        ca,
        "-verify_return_error",
        "-servername",
        "localhost",
    ];

    // SECLEVEL=0 lets this OpenSSL offer TLS 1.1 at all: the refusal must be the server's.
    let (done, out) = s_client(
        port,
        &[
            &verified[..],
            &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
        ]
        .concat(),
    );
    assert!(!done, "TLS 1.1 was accepted:\n{out}");
    assert!(
        out.contains("alert"),
        "expected the server's alert refusing TLS 1.1:\n{out}"
    );
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (done, out) = s_client(port, &[&verified[..], &[flag]].concat());
        assert!(done, "{version} was refused:\n{out}");
        assert!(out.contains(&format!("New, {version}, Cipher is")), "{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    }
    let tls12 = client_config(&[&pki.ca], &[&rustls::version::TLS12], &[]);
    let r = https_get(port, "localhost", &tls12, "/").expect("a TLS 1.2 client");
    assert_eq!(r.status, 200);
}

#[test]
fn min_version_1_3_refuses_tls_1_2() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https(
        "",
        &pki.cert,
        &pki.key,
        "min_version = \"1.3\"",
        &upstream_at(origin.port, ""),
    );
    let ca = pki.ca.to_str().unwrap();
    let port = https.tls_port;
    let verified = [
        "-CAfile",
        ca,
        "-verify_return_error",
        "-servername",
        "localhost",
    ];
    let (done, out) = s_client(port, &[&verified[..], &["-tls1_2"]].concat());
    assert!(
        !done,
        "TLS 1.2 was accepted with min_version = \"1.3\":\n{out}"
    );
    let (done, out) = s_client(port, &[&verified[..], &["-tls1_3"]].concat());
    assert!(done, "TLS 1.3 was refused:\n{out}");
    assert!(out.contains("New, TLSv1.3, Cipher is"), "{out}");

    // rustls lists its TLS 1.3 cipher suites even when it offers TLS 1.2
    // only, so its handshake may complete; the balancer then closes the
    // connection before serving anything over TLS 1.2.
    let tls12 = client_config(&[&pki.ca], &[&rustls::version::TLS12], &[]);
    if let Ok(r) = https_get(port, "localhost", &tls12, "/") {
        panic!(
            "a TLS 1.2-only client (rustls) was answered {} with min_version = \"1.3\"",
            r.status
        );
    }
    let r = https_get(port, "localhost", &trusting(&[&pki.ca]), "/").expect("a TLS 1.3 client");
    assert_eq!(r.status, 200);
}

// 6. The redirect from the plain listener.

#[test]
fn redirect_http_sends_plain_requests_to_https_except_the_health_check() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https(
        "",
        &pki.cert,
        &pki.key,
        "redirect_http = true",
        &upstream_at(origin.port, ""),
    );
    let (plain, tls_port) = (https.lb.port, https.tls_port);

    let request =
        format!("GET /x?y=1 HTTP/1.1\r\nHost: localhost:{plain}\r\nConnection: close\r\n\r\n");
    let (reply, _) = raw_exchange(plain, request.as_bytes());
    assert!(
        reply.starts_with("HTTP/1.1 308"),
        "expected a 308, got {reply:?}"
    );
    let location = location(&reply);
    assert_eq!(location, format!("https://localhost:{tls_port}/x?y=1"));
    assert!(
        !origin.saw_path("/x?y=1"),
        "a redirected request reached the upstream"
    );

    let r = Client::default()
        .get(&format!("http://127.0.0.1:{plain}/health-check"))
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "success"), "{r:?}");

    // Following the redirect works: HTTPS itself is not redirected.
    let r = https_get(tls_port, "localhost", &trusting(&[&pki.ca]), "/x?y=1").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "origin"), "{r:?}");
    assert_eq!(r.header("location"), None, "{r:?}");
    assert!(origin.saw_path("/x?y=1"));
}

#[test]
fn redirect_http_leaves_out_port_443() {
    // A loopback address of its own, so that no other 443 is in the way.
    let tls_listen = "127.0.4.43:443";
    // A privileged port: .ci/prerequisites checks that the tests may bind it.
    if let Err(e) = std::net::TcpListener::bind(tls_listen) {
        panic!(
            "this test needs to listen on {tls_listen} ({e}): run the tests as root, or \
             allow unprivileged ports (sysctl -w net.ipv4.ip_unprivileged_port_start=0)"
        );
    }
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let lb = start_balancer(&format!(
        "[tls]\nlisten = \"{tls_listen}\"\ncertificate = {}\nprivate_key = {}\nredirect_http = true\n{}",
        toml_path(&pki.cert),
        toml_path(&pki.key),
        upstream_at(origin.port, "")
    ));
    let request = format!(
        "GET /a/b?c=d HTTP/1.1\r\nHost: example.com:{}\r\nConnection: close\r\n\r\n",
        lb.port
    );
    let (reply, _) = raw_exchange(lb.port, request.as_bytes());
    assert!(
        reply.starts_with("HTTP/1.1 308"),
        "expected a 308, got {reply:?}"
    );
    assert_eq!(location(&reply), "https://example.com/a/b?c=d");
}

/// The Location header of a raw response.
fn location(reply: &str) -> &str {
    reply
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("location"))
                .map(|(_, value)| value.trim())
        })
        .unwrap_or_else(|| panic!("no Location in {reply:?}"))
}

#[test]
fn redirect_http_keeps_an_ipv6_host_in_brackets() {
    let pki = Pki::new(&["localhost"]);
    let origin = Origin::start();
    let https = start_https(
        "",
        &pki.cert,
        &pki.key,
        "redirect_http = true",
        &upstream_at(origin.port, ""),
    );
    let request = format!(
        "GET /v6 HTTP/1.1\r\nHost: [::1]:{}\r\nConnection: close\r\n\r\n",
        https.lb.port
    );
    let (reply, _) = raw_exchange(https.lb.port, request.as_bytes());
    let location = location(&reply);
    assert_eq!(location, format!("https://[::1]:{}/v6", https.tls_port));
}

// 7. h2c on the plain listener.

#[test]
fn h2c_serves_http2_and_http1_on_the_plain_listener_and_outlives_the_header_timeout() {
    let backend_port = free_port();
    let _backend = start_backend("tls-h2c", backend_port);
    let lb = start_balancer(&format!(
        "http2_cleartext = true\n[limits]\nclient_header_timeout = \"1s\"\n{}",
        upstream_at(backend_port, "")
    ));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );

    let (version, status, body) = curl(&["--http2-prior-knowledge", &lb.url("/")]).unwrap();
    assert_eq!(
        (version.as_str(), status, body.as_str()),
        ("2", 200, "Hello World!"),
        "curl --http2-prior-knowledge"
    );
    lb.wait_for_log("\"GET / HTTP/2\" 200");
    let r = get(&lb.url("/")).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "Hello World!"),
        "HTTP/1.1 on the same listener"
    );
    let (version, _, _) = curl(&[&lb.url("/")]).unwrap();
    assert_eq!(version, "1.1");

    // One h2c connection, idle for longer than client_header_timeout between two requests.
    let uri = lb.url("/");
    let port = lb.port;
    let answers = http2::block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        h2_twice_with_pause(tcp, &uri, Duration::from_millis(2500)).await
    })
    .unwrap_or_else(|e| {
        panic!(
            "an idle h2c connection was cut: {e}\n{}",
            lb.proc.log_text()
        )
    });
    for (status, body) in answers {
        assert_eq!((status, body.as_str()), (200, "Hello World!"));
    }
}

/// A TLS connection (tokio) to `localhost` on the balancer's `port`.
async fn tls_to_localhost(
    port: u16,
    config: Arc<ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

#[test]
fn an_http2_connection_over_tls_outlives_the_header_timeout() {
    let pki = Pki::new(&["localhost"]);
    let backend_port = free_port();
    let _backend = start_backend("tls-h2-idle", backend_port);
    let https = start_https(
        "[limits]\nclient_header_timeout = \"1s\"",
        &pki.cert,
        &pki.key,
        "",
        &upstream_at(backend_port, ""),
    );
    let config = client_config(&[&pki.ca], TLS12_AND_13, &[b"h2"]);
    let port = https.tls_port;
    let answers = http2::block_on(async move {
        let tls = tls_to_localhost(port, config).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if alpn.as_deref() != Some(b"h2") {
            return Err(format!("ALPN chose {alpn:?}, not h2"));
        }
        h2_twice_with_pause(
            tls,
            &format!("https://localhost:{port}/"),
            Duration::from_millis(2500),
        )
        .await
    })
    .unwrap_or_else(|e| {
        panic!(
            "an idle HTTP/2 connection was cut: {e}\n{}",
            https.lb.proc.log_text()
        )
    });
    for (status, body) in answers {
        assert_eq!((status, body.as_str()), (200, "Hello World!"));
    }
}

// 8 and 9. Backends in h2c, and over TLS (nginx).

#[test]
fn an_h2c_upstream_is_spoken_to_in_http2() {
    let nginx = Nginx::start("http2", "");
    let lb = start_balancer(&upstream_at(nginx.port, "protocol = \"h2c\""));
    let r = wait_for(
        Duration::from_secs(10),
        "nginx through the balancer",
        || get(&lb.url("/via-h2c")).ok(),
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "nginx HTTP/2.0\n"),
        "{r:?}\n{}",
        lb.proc.log_text()
    );
    let log = nginx.access_log_with("GET /via-h2c");
    assert!(
        log.lines().any(|l| l.starts_with("GET /via-h2c HTTP/2.0")),
        "nginx's access log should show the request in HTTP/2.0:\n{log}"
    );
}

#[test]
fn a_tls_upstream_is_verified_against_ca_file() {
    let backend_pki = Pki::new(&["localhost"]);
    let other_pki = Pki::new(&["localhost"]);
    let nginx = Nginx::start(
        "ssl http2",
        &format!(
            "ssl_certificate {};\nssl_certificate_key {};",
            backend_pki.cert.display(),
            backend_pki.key.display()
        ),
    );
    let group = |extra: &str| {
        upstream_at(
            nginx.port,
            &format!("tls = true\nsni = \"localhost\"\n{extra}"),
        )
    };
    let ask = |lb: &Balancer, path: &str| {
        wait_for(
            Duration::from_secs(10),
            "an answer through the balancer",
            || get(&lb.url(path)).ok(),
        )
    };

    // The right CA: 200, in HTTP/1.1, with SNI.
    let lb = start_balancer(&group(&format!("ca_file = {}", toml_path(&backend_pki.ca))));
    let r = ask(&lb, "/right-ca");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "nginx HTTP/1.1\n"),
        "{r:?}\n{}",
        lb.proc.log_text()
    );
    let log = nginx.access_log_with("GET /right-ca");
    assert!(
        log.contains("GET /right-ca HTTP/1.1 sni=localhost"),
        "nginx should have seen HTTP/1.1 with SNI localhost:\n{log}"
    );
    drop(lb);

    // protocol = "h2": HTTP/2 over TLS.
    let lb = start_balancer(&group(&format!(
        "ca_file = {}\nprotocol = \"h2\"",
        toml_path(&backend_pki.ca)
    )));
    let r = ask(&lb, "/h2");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "nginx HTTP/2.0\n"),
        "{r:?}\n{}",
        lb.proc.log_text()
    );
    drop(lb);

    // Another CA: 502, and the log says why.
    let lb = start_balancer(&group(&format!("ca_file = {}", toml_path(&other_pki.ca))));
    let r = ask(&lb, "/wrong-ca");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        !nginx.access_log().contains("/wrong-ca"),
        "an unverified backend got the request"
    );
    let line = wait_for(
        Duration::from_secs(5),
        "a log line about the certificate",
        || {
            lb.proc
                .log_text()
                .lines()
                .find(|l| l.contains("ERROR") && l.contains("/wrong-ca"))
                .map(str::to_owned)
        },
    );
    assert!(
        line.contains("invalid peer certificate"),
        "the log should say the backend's certificate was refused: {line}"
    );
    drop(lb);

    // verify = false with the wrong CA: 200.
    let lb = start_balancer(&group(&format!(
        "ca_file = {}\nverify = false",
        toml_path(&other_pki.ca)
    )));
    let r = ask(&lb, "/unverified");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "nginx HTTP/1.1\n"),
        "{r:?}\n{}",
        lb.proc.log_text()
    );
    drop(lb);

    // Without `sni`, the host of the servers entry is sent and checked.
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"localhost:{}\"]\ntls = true\nca_file = {}\n",
        nginx.port,
        toml_path(&backend_pki.ca)
    ));
    let r = ask(&lb, "/default-sni");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "nginx HTTP/1.1\n"),
        "{r:?}\n{}",
        lb.proc.log_text()
    );
    let log = nginx.access_log_with("GET /default-sni");
    assert!(
        log.contains("GET /default-sni HTTP/1.1 sni=localhost"),
        "nginx should have seen SNI localhost, the host of the servers entry:\n{log}"
    );
}

// 10. WebSockets.

#[test]
fn websockets_echo_through_the_plain_and_the_tls_listener() {
    let pki = Pki::new(&["localhost"]);
    let backend_port = free_port();
    let _backend = start_backend("tls-ws", backend_port);
    let https = start_https("", &pki.cert, &pki.key, "", &upstream_at(backend_port, ""));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&https.lb.url("/")).ok().filter(|r| r.status == 200),
    );

    let mut ws = ws_plain(https.lb.port);
    ws_echo(&mut ws, "hello over ws");
    ws_echo(&mut ws, "and again");
    // Both sides plain: a relay thread carries the bytes, not the workers.
    let threads = std::fs::read_dir(format!("/proc/{}/task", https.lb.proc.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect::<Vec<_>>();
    assert!(
        threads.iter().any(|name| name.starts_with("ws-relay-")),
        "no relay thread among {threads:?}"
    );
    ws_close(&mut ws);

    let roots = trusting(&[&pki.ca]);
    let tls = connect_tls(https.tls_port, "localhost", &roots).unwrap();
    let mut wss = ws_open(&format!("wss://localhost:{}/ws", https.tls_port), tls);
    ws_echo(&mut wss, "hello over wss");
    ws_echo(&mut wss, "and again");
    ws_close(&mut wss);
    https.lb.wait_for_log("\"GET /ws HTTP/1.1+TLS\" 101");
}

#[test]
fn a_websocket_lives_past_read_timeout_while_it_carries_traffic_and_closes_after_idle_timeout() {
    let backend_port = free_port();
    let _backend = start_backend("tls-ws-idle", backend_port);
    let lb = start_balancer(&upstream_at(
        backend_port,
        "read_timeout = \"1s\"\nidle_timeout = \"2s\"",
    ));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );
    let mut ws = ws_plain(lb.port);

    let opened = Instant::now();
    let mut last_echo = opened;
    let mut n = 0;
    while opened.elapsed() < Duration::from_secs(3) {
        n += 1;
        let text = format!("message {n}");
        ws.send(Message::text(text.clone()))
            .unwrap_or_else(|e| panic!("send #{n} after {:?}: {e}", opened.elapsed()));
        match ws.read() {
            Ok(Message::Text(echo)) => assert_eq!(echo.as_str(), text),
            other => panic!(
                "#{n} after {:?}: expected the echo, got {other:?}\n{}",
                opened.elapsed(),
                lb.proc.log_text()
            ),
        }
        last_echo = Instant::now();
        // The cadence of the traffic is what is tested.
        thread::sleep(Duration::from_millis(300));
    }

    let ended = ws.read();
    let after = last_echo.elapsed();
    match &ended {
        Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {}
        Err(tungstenite::Error::Protocol(_)) => {} // closed without a close frame
        Err(tungstenite::Error::Io(e))
            if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected the idle WebSocket to be closed, got {other:?} after {after:?}"),
    }
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_secs(5),
        "the idle WebSocket closed after {after:?} of silence (idle_timeout = 2s; read_timeout = 1s must not apply): {ended:?}"
    );
}

/// Opens `count` WebSockets from each of `threads` threads, one after
/// another, each over a stream from `connect`, and echoes three messages
/// on each: the failures, as "which: what".
fn ws_many<S: Read + Write>(
    threads: usize,
    count: usize,
    url: &str,
    connect: impl Fn() -> Result<S, String> + Sync,
) -> Vec<String> {
    let failures = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for t in 0..threads {
            let (failures, connect) = (&failures, &connect);
            scope.spawn(move || {
                for n in 0..count {
                    let one = || -> Result<(), String> {
                        let (mut ws, _) =
                            tungstenite::client(url, connect()?).map_err(|e| e.to_string())?;
                        for m in 0..3 {
                            ws_round_trip(
                                &mut ws,
                                &format!("thread {t}, socket {n}, message {m}"),
                            )?;
                        }
                        ws.close(None).map_err(|e| e.to_string())
                    };
                    if let Err(e) = one() {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("thread {t}, socket {n}: {e}"));
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn two_thousand_websockets_over_the_plain_listener_and_five_hundred_over_tls_none_cut() {
    let pki = Pki::new(&["localhost"]);
    let backend_port = free_port();
    let _backend = start_backend("ws-many", backend_port);
    let https = start_https("", &pki.cert, &pki.key, "", &upstream_at(backend_port, ""));
    let port = https.lb.port;
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&https.lb.url("/")).ok().filter(|r| r.status == 200),
    );
    let plain = || TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string());
    let url = format!("ws://127.0.0.1:{port}/ws");
    let one_by_one = ws_many(1, 1000, &url, plain);
    assert!(
        one_by_one.is_empty(),
        "{} of 1,000 WebSockets one after another failed, e.g. {:?}",
        one_by_one.len(),
        one_by_one.first()
    );
    let twenty_at_once = ws_many(20, 50, &url, plain);
    assert!(
        twenty_at_once.is_empty(),
        "{} of 1,000 WebSockets 20 at once failed, e.g. {:?}",
        twenty_at_once.len(),
        twenty_at_once.first()
    );

    let roots = trusting(&[&pki.ca]);
    let tls = || connect_tls(https.tls_port, "localhost", &roots);
    let over_tls = ws_many(
        10,
        50,
        &format!("wss://localhost:{}/ws", https.tls_port),
        tls,
    );
    assert!(
        over_tls.is_empty(),
        "{} of 500 WebSockets over TLS failed, e.g. {:?}",
        over_tls.len(),
        over_tls.first()
    );

    // One access-log line per tunnel, written when it closed.
    let ends = |log: &str, protocol: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&format!("\"GET /ws {protocol}\" 101"))
                    && l.contains(" tunnel_closed_by=")
            })
            .count()
    };
    wait_for(
        Duration::from_secs(10),
        "2,500 tunnel ends in the access log",
        || {
            let log = https.lb.proc.log_text();
            (ends(&log, "HTTP/1.1") == 2000 && ends(&log, "HTTP/1.1+TLS") == 500).then_some(())
        },
    );
}

/// One WebSocket frame from the client: a masked text frame (payload under 126 bytes).
fn masked_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads the response head and then one unmasked text frame from the server.
fn read_head_and_text_frame(stream: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, payload) = loop {
        let n = stream.read(&mut buf).expect("read the answer");
        assert!(
            n > 0,
            "the connection closed after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let frame = &got[end + 4..];
        if frame.len() >= 2 && frame.len() >= 2 + usize::from(frame[1] & 0x7f) {
            assert_eq!(frame[0], 0x81, "a text frame");
            break (end, frame[2..2 + usize::from(frame[1] & 0x7f)].to_vec());
        }
    };
    (
        String::from_utf8_lossy(&got[..head_end]).into_owned(),
        String::from_utf8(payload).expect("a UTF-8 text"),
    )
}

const UPGRADE_REQUEST: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn bytes_sent_before_the_101_are_forwarded_and_the_log_says_how_each_tunnel_ended() {
    let backend_port = free_port();
    let mut backend = start_backend("ws-ends", backend_port);
    let lb = start_balancer(&upstream_at(backend_port, "idle_timeout = \"1s\""));
    wait_for(
        Duration::from_secs(10),
        "the backend through the balancer",
        || get(&lb.url("/")).ok().filter(|r| r.status == 200),
    );

    // The request and a first message in one write, before any answer.
    let mut early = plain_tcp(lb.port);
    let mut bytes = UPGRADE_REQUEST.as_bytes().to_vec();
    bytes.extend(masked_text_frame("hello"));
    early.write_all(&bytes).unwrap();
    let (head, echo) = read_head_and_text_frame(&mut early);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echo, "hello", "the message sent before the 101 came back");
    // The client goes away without a closing handshake.
    early.shutdown(std::net::Shutdown::Both).unwrap();
    let line = lb.wait_for_log("tunnel_closed_by=client");
    // 11 bytes up (2 of header, 4 of mask, 5 of text), 7 down (unmasked).
    assert!(
        line.contains("\"GET /ws HTTP/1.1\" 101") && line.contains(" bytes_up=11 bytes_down=7"),
        "{line}"
    );

    // Silence both ways for idle_timeout.
    let mut idle = ws_plain(lb.port);
    ws_round_trip(&mut idle, "then nothing").unwrap();
    let line = lb.wait_for_log("tunnel_closed_by=idle");
    assert!(line.contains("bytes_up=18 bytes_down=14"), "{line}");
    assert!(idle.read().is_err(), "the idle WebSocket is closed");

    // The backend goes away.
    let mut cut = ws_plain(lb.port);
    ws_round_trip(&mut cut, "before the backend dies").unwrap();
    backend.kill();
    lb.wait_for_log("tunnel_closed_by=backend");
    assert!(cut.read().is_err(), "the client's side is closed too");
}

/// A WebSocket backend that greets each client: its `101` and a first text
/// frame leave in one write, then it echoes whatever bytes come until the
/// client closes.
fn start_greeting_backend(greeting: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".to_vec();
                answer.extend_from_slice(&[0x81, greeting.len() as u8]);
                answer.extend_from_slice(greeting.as_bytes());
                if stream.write_all(&answer).is_err() {
                    return;
                }
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn what_a_backend_sends_with_its_101_reaches_the_client_before_anything_else() {
    let lb = start_balancer(&upstream_at(start_greeting_backend("welcome"), ""));
    for _ in 0..20 {
        let mut client = plain_tcp(lb.port);
        client.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
        let (head, greeting) = read_head_and_text_frame(&mut client);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(greeting, "welcome", "the frame sent along with the 101");
        // The tunnel carries on both ways after it.
        let frame = masked_text_frame("and then");
        client.write_all(&frame).unwrap();
        let mut echo = vec![0u8; frame.len()];
        client.read_exact(&mut echo).unwrap();
        assert_eq!(echo, frame, "the backend's echo of the first message");
    }
    let line = lb.wait_for_log("tunnel_closed_by=");
    assert!(line.contains("\"GET /ws HTTP/1.1\" 101"), "{line}");
}

/// How much goes each way at once in the tests below: more than the
/// socket buffers between client, balancer and backend hold.
const BOTH_WAYS: usize = 64 << 20;

/// The bytes sent up, 64 KiB at a time; the echo must match them.
fn both_ways_chunk() -> Vec<u8> {
    (0..65536u32).map(|i| (i % 251) as u8).collect()
}

/// Whether `echo`, which starts at offset `at` of what was sent, is that.
fn is_the_echo(echo: &[u8], at: usize) -> bool {
    echo.iter()
        .enumerate()
        .all(|(i, b)| *b == ((at + i) % 65536 % 251) as u8)
}

/// Opens a WebSocket on `client` to a greeting echo backend (see
/// [`start_greeting_backend`]), then sends [`BOTH_WAYS`] bytes while it
/// reads their echo, each on a thread of its own.
fn carry_both_ways(mut client: TcpStream) {
    client.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    let (head, _) = read_head_and_text_frame(&mut client);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut writer = client.try_clone().unwrap();
    let sent = thread::spawn(move || {
        let chunk = both_ways_chunk();
        for _ in 0..BOTH_WAYS / chunk.len() {
            writer
                .write_all(&chunk)
                .expect("the tunnel takes the client's bytes");
        }
    });
    let mut buf = vec![0u8; 65536];
    let mut got = 0usize;
    while got < BOTH_WAYS {
        match client.read(&mut buf) {
            Ok(0) => panic!("the tunnel closed after {got} bytes of the echo"),
            Ok(n) => {
                assert!(is_the_echo(&buf[..n], got), "the echo's bytes at {got}");
                got += n;
            }
            Err(e) => panic!("no echo for 10 s after {got} of {BOTH_WAYS} bytes: {e}"),
        }
    }
    sent.join().unwrap();
}

#[test]
fn a_tunnel_carries_both_ways_at_once_when_each_side_writes_more_than_the_sockets_hold() {
    // The backend echoes as it reads, blocking in each write: a tunnel that
    // stopped reading the backend while it waited to write to it would hold
    // both still once the socket buffers between them are full.
    let lb = start_balancer(&upstream_at(start_greeting_backend("go"), ""));
    carry_both_ways(plain_tcp(lb.port));
}

#[test]
fn to_a_tls_backend_too_a_tunnel_carries_both_ways_at_once() {
    // The backend's stream is TLS here, written through Pingora's buffered
    // stream (each write flushed) while it is read: nginx over TLS in front
    // of the blocking echo, carrying each way on its own.
    let pki = Pki::new(&["localhost"]);
    let nginx = nginx_tls_before_websockets(&pki, start_greeting_backend("go"));
    let lb = start_balancer(&tls_upstream_at(nginx.port, &pki));
    carry_both_ways(plain_tcp(lb.port));
}

#[test]
fn over_tls_too_a_tunnel_carries_both_ways_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["localhost"]);
    let backend = upstream_at(start_greeting_backend("go"), "");
    let https = start_https("", &pki.cert, &pki.key, "", &backend);
    let config = client_config(&[&pki.ca], TLS12_AND_13, &[b"http/1.1"]);
    let port = https.tls_port;
    let carried = http2::block_on(async move {
        let tls = tls_to_localhost(port, config).await?;
        let (mut from, mut to) = tokio::io::split(tls);
        to.write_all(UPGRADE_REQUEST.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // The head, then the greeting: a 4-byte text frame.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = from.read_u8().await.map_err(|e| format!("the head: {e}"))?;
            head.push(byte);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(format!("{}", String::from_utf8_lossy(&head)));
        }
        let mut greeting = [0u8; 4];
        from.read_exact(&mut greeting)
            .await
            .map_err(|e| format!("the greeting: {e}"))?;
        let send = async {
            let chunk = both_ways_chunk();
            for _ in 0..BOTH_WAYS / chunk.len() {
                to.write_all(&chunk)
                    .await
                    .map_err(|e| format!("sending: {e}"))?;
            }
            to.flush().await.map_err(|e| format!("sending: {e}"))
        };
        let receive = async {
            let mut buf = vec![0u8; 65536];
            let mut got = 0usize;
            while got < BOTH_WAYS {
                let read = tokio::time::timeout(Duration::from_secs(10), from.read(&mut buf));
                match read.await {
                    Err(_) => return Err(format!("no echo for 10 s after {got} bytes")),
                    Ok(Err(e)) => return Err(format!("reading after {got} bytes: {e}")),
                    Ok(Ok(0)) => return Err(format!("closed after {got} bytes")),
                    Ok(Ok(n)) if !is_the_echo(&buf[..n], got) => {
                        return Err(format!("the echo's bytes at {got} are not the ones sent"))
                    }
                    Ok(Ok(n)) => got += n,
                }
            }
            Ok(())
        };
        tokio::try_join!(send, receive).map(|_| ())
    });
    if let Err(e) = carried {
        panic!("{e}\n{}", https.lb.proc.log_text());
    }
}

#[test]
fn an_upgrade_the_backend_refuses_is_relayed_as_a_normal_response() {
    let origin = Origin::start();
    origin.on("/ws", Act::Answer(403, "no WebSocket for you"));
    let lb = start_balancer(&upstream_at(origin.port, ""));
    let (reply, _) = raw_exchange(lb.port, UPGRADE_REQUEST.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nno WebSocket for you"), "{reply}");
    let seen = origin.seen();
    let upgrade = seen
        .iter()
        .find(|s| s.path == "/ws")
        .expect("the origin saw the upgrade");
    assert_eq!(upgrade.header("upgrade"), Some("websocket"), "{upgrade:?}");
    assert!(
        upgrade.header("x-request-id").is_some()
            && upgrade.header("x-forwarded-for") == Some("127.0.0.1"),
        "{upgrade:?}"
    );
    lb.wait_for_log("\"GET /ws HTTP/1.1\" 403");
}

#[test]
fn a_failed_connect_is_retried_and_least_connections_counts_open_tunnels() {
    let (a, b) = (free_port(), free_port());
    let _a = start_backend("ws-a", a);
    let _b = start_backend("ws-b", b);
    let dead = free_port();
    // Nothing listens on `dead`, and no health check takes it out.
    let lb = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:{dead}\", \"127.0.0.1:{a}\", \"127.0.0.1:{b}\"]\nalgorithm = \"least_connections\"\n"
    ));
    let mut open = Vec::new();
    for n in 0..6 {
        let mut ws = ws_plain(lb.port);
        ws_round_trip(&mut ws, &format!("socket {n}")).unwrap();
        open.push(ws);
    }
    // Each live backend holds tunnels now; with one more on one of them,
    // least connections sends every request to the other.
    let mut extra = ws_plain(lb.port);
    ws_round_trip(&mut extra, "one more").unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let r = get(&lb.url("/info")).expect("GET /info");
        *seen.entry(container_id(&r)).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        1,
        "every request goes to the backend with fewer tunnels: {seen:?}"
    );
    drop(open);
    let retried = wait_for(Duration::from_secs(10), "the tunnels' lines", || {
        let log = lb.proc.log_text();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("tunnel_closed_by="))
            .map(str::to_owned)
            .collect();
        (lines.len() >= 6).then_some(lines)
    });
    assert!(
        retried.iter().any(|l| l.contains(" retries=1 ")),
        "a connect to the dead backend was retried:\n{retried:?}"
    );
    ws_round_trip(&mut extra, "still open").unwrap();
}

#[test]
fn a_websocket_stays_open_across_a_reload_and_a_certificate_renewal() {
    let old = Pki::new(&["localhost"]);
    let new = Pki::new(&["localhost"]);
    let files = LiveFiles::of(&old);
    let backend_port = free_port();
    let _backend = start_backend("ws-reload", backend_port);
    let https = start_https(
        "",
        &files.cert,
        &files.key,
        "",
        &upstream_at(backend_port, "read_timeout = \"30s\""),
    );
    let both = trusting(&[&old.ca, &new.ca]);
    let mut ws = ws_plain(https.lb.port);
    let tls = connect_tls(https.tls_port, "localhost", &both).unwrap();
    let mut wss = ws_open(&format!("wss://localhost:{}/ws", https.tls_port), tls);
    ws_round_trip(&mut ws, "before").unwrap();
    ws_round_trip(&mut wss, "before").unwrap();

    // Edited in place, as an operator would: only read_timeout changes.
    let config = std::fs::read_to_string(&https.lb.config).unwrap();
    std::fs::write(
        &https.lb.config,
        config.replace("read_timeout = \"30s\"", "read_timeout = \"20s\""),
    )
    .unwrap();
    https.lb.wait_for_log("upstream.read_timeout");
    ws_round_trip(&mut ws, "after the reload").unwrap();
    ws_round_trip(&mut wss, "after the reload").unwrap();

    new.install(&files.cert, &files.key);
    https.lb.wait_for_log("certificate reloaded");
    ws_round_trip(&mut ws, "after the renewal").unwrap();
    ws_round_trip(&mut wss, "after the renewal").unwrap();
    // New connections get the new certificate, and their WebSockets work.
    let only_new = trusting(&[&new.ca]);
    let mut fresh = ws_open(
        &format!("wss://localhost:{}/ws", https.tls_port),
        connect_tls(https.tls_port, "localhost", &only_new).unwrap(),
    );
    ws_round_trip(&mut fresh, "under the new certificate").unwrap();
    ws_close(&mut ws);
    ws_close(&mut wss);
}

#[test]
fn sigterm_closes_open_tunnels_only_after_the_grace_period() {
    let backend_port = free_port();
    let _backend = start_backend("ws-stop", backend_port);
    let mut lb = start_balancer(&format!(
        "grace_period = \"2s\"\n{}",
        upstream_at(backend_port, "")
    ));
    let mut ws = ws_plain(lb.port);
    ws_round_trip(&mut ws, "before SIGTERM").unwrap();
    lb.proc.terminate();
    let signalled = Instant::now();
    let mut n = 0;
    let closed_after = loop {
        n += 1;
        match ws_round_trip(&mut ws, &format!("during the grace period, {n}")) {
            Ok(()) => {}
            Err(_) => break signalled.elapsed(),
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "the tunnel outlived the grace period"
        );
        // The cadence of the traffic is what is tested.
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        closed_after >= Duration::from_millis(1800),
        "the tunnel closed {closed_after:?} after SIGTERM, before the grace period of 2s was over"
    );
    let exited = wait_for(Duration::from_secs(10), "the balancer to exit", || {
        lb.proc.child.try_wait().ok().flatten()
    });
    assert!(exited.success(), "{exited:?}\n{}", lb.proc.log_text());
    let log = lb.proc.log_text();
    assert!(
        log.contains("tunnel_closed_by=stop"),
        "the tunnel's line says the stop closed it:\n{log}"
    );
}

/// nginx over TLS (`pki`'s certificate), passing `/ws` on to the backend on
/// `backend_port` as its manual says WebSockets are proxied.
fn nginx_tls_before_websockets(pki: &Pki, backend_port: u16) -> Nginx {
    Nginx::start(
        "ssl",
        &format!(
            "ssl_certificate {};\nssl_certificate_key {};\n\
             location /ws {{ proxy_pass http://127.0.0.1:{backend_port}; proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; }}",
            pki.cert.display(),
            pki.key.display()
        ),
    )
}

/// An `[upstream]` of the TLS server on `port`, verified against `pki`'s CA
/// with SNI `localhost`.
fn tls_upstream_at(port: u16, pki: &Pki) -> String {
    upstream_at(
        port,
        &format!(
            "tls = true\nsni = \"localhost\"\nca_file = {}",
            toml_path(&pki.ca)
        ),
    )
}

#[test]
fn a_websocket_reaches_a_tls_backend_verified_with_sni() {
    let backend_port = free_port();
    let _backend = start_backend("ws-tls-backend", backend_port);
    let pki = Pki::new(&["localhost"]);
    let nginx = nginx_tls_before_websockets(&pki, backend_port);
    let lb = start_balancer(&tls_upstream_at(nginx.port, &pki));
    let mut ws = ws_plain(lb.port);
    for n in 0..3 {
        ws_round_trip(&mut ws, &format!("over TLS to the backend, {n}")).unwrap();
    }
    ws_close(&mut ws);
    let log = nginx.access_log_with("GET /ws");
    assert!(
        log.contains("GET /ws HTTP/1.1 sni=localhost"),
        "nginx should have seen the upgrade over TLS with SNI localhost:\n{log}"
    );
}

#[test]
fn open_tunnels_count_against_max_connections() {
    let backend_port = free_port();
    let _backend = start_backend("ws-max", backend_port);
    let lb = start_balancer(&format!(
        "[limits]\nmax_connections = 2\n{}",
        upstream_at(backend_port, "")
    ));
    let mut first = ws_plain(lb.port);
    let mut second = ws_plain(lb.port);
    ws_round_trip(&mut first, "one").unwrap();
    ws_round_trip(&mut second, "two").unwrap();
    let (reply, closed) = raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 503 ") && closed, "{reply:?}");
    // A tunnel that closes frees its place.
    ws_close(&mut first);
    wait_for(Duration::from_secs(10), "a free place", || {
        let (reply, _) = raw_exchange(
            lb.port,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        reply.starts_with("HTTP/1.1 200 ").then_some(())
    });
    ws_round_trip(&mut second, "still open").unwrap();
}

// 11. --check.

/// Writes a config with `[tls]` on `cert` and `key` and runs `balancer --config FILE --check`.
fn check(cert: &Path, key: &Path) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("balancer.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\n[tls]\nlisten = \"127.0.0.1:{}\"\ncertificate = {}\nprivate_key = {}\n[upstream]\nservers = [\"127.0.0.1:1\"]\n",
            free_port(),
            free_port(),
            toml_path(cert),
            toml_path(key)
        ),
    )
    .unwrap();
    run_balancer(&["--config", config.to_str().unwrap(), "--check"])
}

/// A self-signed certificate for localhost valid from `from` to `until` (relative to now).
fn dated_certificate(
    dir: &Path,
    from: time::Duration,
    until: time::Duration,
) -> (PathBuf, PathBuf) {
    let now = time::OffsetDateTime::now_utc();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = now + from;
    params.not_after = now + until;
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("dated-cert.pem"), dir.join("dated-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[test]
fn check_refuses_broken_mismatched_and_expired_certificates() {
    let pki = Pki::new(&["localhost"]);
    let other = Pki::new(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();

    let (code, out) = check(&pki.cert, &pki.key);
    assert_eq!(code, 0, "a valid certificate: {out}");
    assert!(out.contains("configuration is valid"), "{out}");

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, out) = check(&garbage, &pki.key);
    assert_eq!(code, 1, "a garbage certificate: {out}");
    assert!(
        out.contains(garbage.to_str().unwrap()),
        "the error should name {}: {out}",
        garbage.display()
    );

    let (code, out) = check(&pki.cert, &other.key);
    assert_eq!(code, 1, "a key that does not match: {out}");
    assert!(out.contains("do not go together"), "{out}");
    assert!(
        out.contains(other.key.to_str().unwrap()),
        "the error should name the key: {out}"
    );

    let missing = dir.path().join("missing.pem");
    let (code, out) = check(&missing, &pki.key);
    assert_eq!(code, 1, "a missing certificate: {out}");
    assert!(out.contains(missing.to_str().unwrap()), "{out}");

    let (cert, key) = dated_certificate(
        dir.path(),
        time::Duration::days(-30),
        time::Duration::days(-1),
    );
    let (code, out) = check(&cert, &key);
    assert_eq!(code, 1, "an expired certificate: {out}");
    assert!(out.contains("expired"), "{out}");
    assert!(out.contains(cert.to_str().unwrap()), "{out}");

    let (cert, key) = dated_certificate(
        dir.path(),
        time::Duration::days(-30),
        time::Duration::days(5),
    );
    let (code, out) = check(&cert, &key);
    assert_eq!(
        code, 0,
        "a certificate that expires in 5 days is valid: {out}"
    );
    assert!(
        out.contains("warning") && out.contains("within 14 days"),
        "{out}"
    );
}

#[test]
fn a_balancer_with_a_broken_certificate_does_not_start() {
    let pki = Pki::new(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "garbage\n").unwrap();
    let config = dir.path().join("balancer.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\n[tls]\nlisten = \"127.0.0.1:{}\"\ncertificate = {}\nprivate_key = {}\n[upstream]\nservers = [\"127.0.0.1:1\"]\n",
            free_port(),
            free_port(),
            toml_path(&garbage),
            toml_path(&pki.key)
        ),
    )
    .unwrap();
    // Under `timeout`: a balancer that starts anyway must not hang the test.
    let (code, out, err) = run(
        binary("balancer").to_str().unwrap(),
        &["--config", config.to_str().unwrap()],
    );
    let out = out + &err;
    assert_eq!(
        code, 1,
        "expected exit 1 (124: it started and was killed): {out}"
    );
    assert!(
        out.contains(garbage.to_str().unwrap()),
        "the error should name the file: {out}"
    );
}
