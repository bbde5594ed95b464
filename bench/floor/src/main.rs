//! The floor of the benchmarks: the smallest Pingora `ProxyHttp` that
//! forwards a request as the balancer does for `/`. One upstream, Pingora's
//! upstream keep-alive pool, and the three headers that bench/nginx.conf
//! sets (`Host` as the client sent it, `X-Real-IP`, `X-Forwarded-For`
//! appended), nothing else: no routing, health checks, access log, metrics,
//! request ids or connection guard, and none of Pingora's downstream modules
//! (as in the balancer). Built with the balancer's release profile and
//! allocator (mimalloc, without transparent huge pages), so that what the
//! balancer costs above it is the balancer's own.
//!
//! With `--tls-listen`, it also serves HTTPS (HTTP/1.1 and HTTP/2 by ALPN)
//! with Pingora's own TLS settings for rustls, as bench/tls.sh measures it.
//!
//! With `--answer PATH`, requests for PATH are answered from memory in
//! `request_filter` with the upstream's answer to PATH, fetched once at the
//! start: the least any Pingora program, a cache included, can do for a
//! request it answers itself (the floor of a cache hit, bench/hits.sh).
//!
//! With `--with`, it also makes the calls into Pingora's API that some of
//! the balancer's features need on every request, and nothing else of those
//! features: what the floor then costs more is Pingora's price for them, a
//! price the balancer pays whatever its own code does (bench/parts.sh).
//!
//!   floor --listen 127.0.0.1:19104 --upstream 127.0.0.1:19100 [--threads 1]
//!         [--tls-listen 127.0.0.1:19414 --cert cert.pem --key key.pem]
//!         [--answer /cache-me] [--with request-id,forwarded-proto,timeouts]

use std::net::SocketAddr;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "floor",
    about = "Pingora's floor: one upstream, nginx's forwarded headers"
)]
struct Cli {
    /// Where to listen (plain HTTP/1.1).
    #[arg(long)]
    listen: SocketAddr,
    /// The one backend.
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads, as the balancer's `threads`.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Where to listen for HTTPS too (needs --cert and --key).
    #[arg(long, requires_all = ["cert", "key"])]
    tls_listen: Option<SocketAddr>,
    /// The certificate chain (PEM) served on --tls-listen.
    #[arg(long)]
    cert: Option<String>,
    /// Its private key (PEM).
    #[arg(long)]
    key: Option<String>,
    /// Answer requests for this path from memory, with the upstream's answer
    /// to it fetched at the start.
    #[arg(long)]
    answer: Option<String>,
    /// Pingora calls of the balancer's features to make too.
    #[arg(long, value_enum, value_delimiter = ',')]
    with: Vec<Call>,
}

/// The calls into Pingora's API that a feature of the balancer makes per
/// request, with the balancer's values.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Call {
    /// `X-Request-Id` inserted into the upstream request and into the
    /// response: a fixed id of a new one's length, since making one is the
    /// balancer's own work, not Pingora's.
    RequestId,
    /// `X-Forwarded-Proto` inserted into the upstream request.
    ForwardedProto,
    /// The upstream peer's timeouts (`connect_timeout`, `read_timeout`, the
    /// pool's idle timeout), with the balancer's defaults.
    Timeouts,
}

struct Floor {
    upstream: SocketAddr,
    answer: Option<Answer>,
    /// The calls of `--with`, a bit each: settled at the start, so that
    /// asking costs a request next to nothing.
    with: u8,
}

impl Call {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl Floor {
    fn with(&self, call: Call) -> bool {
        self.with & call.bit() != 0
    }
}

/// A request id as long as the balancer's new ones (32 hex digits).
const REQUEST_ID: &str = "0123456789abcdef0123456789abcdef";

/// A response kept in memory, and the path it answers.
struct Answer {
    path: String,
    header: ResponseHeader,
    body: bytes::Bytes,
}

impl Answer {
    /// The upstream's answer to `GET path` (HTTP/1.0, so that it ends with
    /// the connection), without its hop-by-hop fields.
    fn fetch(upstream: SocketAddr, path: &str) -> std::result::Result<Answer, String> {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(upstream).map_err(|e| e.to_string())?;
        write!(tcp, "GET {path} HTTP/1.0\r\nHost: {upstream}\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no end of the response head")?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let body = bytes::Bytes::copy_from_slice(&raw[end + 4..]);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or("no status")?;
        let mut header = ResponseHeader::build(status, None).map_err(|e| e.to_string())?;
        for line in lines {
            let (name, value) = line.split_once(':').ok_or("a header line without ':'")?;
            let name = name.trim().to_ascii_lowercase();
            if !matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding" | "content-length"
            ) {
                header
                    .append_header(name, value.trim().to_string())
                    .map_err(|e| e.to_string())?;
            }
        }
        header
            .insert_header("content-length", body.len().to_string())
            .map_err(|e| e.to_string())?;
        Ok(Answer {
            path: path.to_string(),
            header,
            body,
        })
    }
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let Some(answer) = &self.answer else {
            return Ok(false);
        };
        if session.req_header().uri.path() != answer.path {
            return Ok(false);
        }
        session
            .write_response_header(Box::new(answer.header.clone()), false)
            .await?;
        session
            .write_response_body(Some(answer.body.clone()), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        if self.with(Call::Timeouts) {
            peer.options.connection_timeout = Some(std::time::Duration::from_secs(2));
            peer.options.read_timeout = Some(std::time::Duration::from_secs(60));
            peer.options.idle_timeout = Some(std::time::Duration::from_secs(4));
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if self.with(Call::RequestId) {
            upstream_request.insert_header("X-Request-Id", REQUEST_ID)?;
        }
        if self.with(Call::ForwardedProto) {
            upstream_request.insert_header("x-forwarded-proto", "http")?;
        }
        // Host is the client's, as `proxy_set_header Host $host` keeps it.
        let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
        else {
            return Ok(());
        };
        let forwarded_for = match upstream_request.headers.get("x-forwarded-for") {
            Some(earlier) => format!("{}, {ip}", String::from_utf8_lossy(earlier.as_bytes())),
            None => ip.clone(),
        };
        upstream_request.insert_header("X-Forwarded-For", forwarded_for)?;
        upstream_request.insert_header("X-Real-IP", ip)?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if self.with(Call::RequestId) {
            resp.insert_header("X-Request-Id", REQUEST_ID)?;
        }
        Ok(())
    }
}

fn main() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integers and touches no memory of ours,
    // as in the balancer's main.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let cli = Cli::parse();
    let answer = cli.answer.as_deref().map(|path| {
        Answer::fetch(cli.upstream, path).unwrap_or_else(|e| {
            eprintln!("floor: --answer {path}: from {}: {e}", cli.upstream);
            std::process::exit(2);
        })
    });
    let conf = pingora::server::configuration::ServerConf {
        threads: cli.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Floor {
            upstream: cli.upstream,
            answer,
            with: cli.with.iter().fold(0, |bits, call| bits | call.bit()),
        },
    );
    service.add_tcp(&cli.listen.to_string());
    if let (Some(listen), Some(cert), Some(key)) = (cli.tls_listen, &cli.cert, &cli.key) {
        let mut tls = match pingora::listeners::tls::TlsSettings::intermediate(cert, key) {
            Ok(tls) => tls,
            Err(e) => {
                eprintln!("floor: --cert {cert} --key {key}: {e}");
                std::process::exit(2);
            }
        };
        tls.enable_h2();
        service.add_tls_with_settings(&listen.to_string(), None, tls);
    }
    server.add_service(service);
    server.run_forever();
}
