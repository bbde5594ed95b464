//! The request path: Pingora's `ProxyHttp` hooks, in the order Pingora calls them.
//!
//! It answers `/health-check` itself, picks a healthy backend round-robin,
//! retries a failed connect on another backend, adds the forwarded headers,
//! turns failures into 502/503/504 with a plain-text reason, and writes one
//! access-log line per request. Finding and checking backends is `upkeep`'s job.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use crate::config::Config;
use crate::upstream::{Backend, Pool};

/// The balancer's own liveness endpoint, answered without an upstream (as the seed's nginx does).
pub const HEALTH_CHECK_PATH: &str = "/health-check";

/// Upstream connections idle longer than this are not reused; kept below the
/// keep-alive timeout of common backends so that a reused connection is rarely
/// one the backend is closing.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub struct Balancer {
    pub pool: Arc<Pool>,
    pub config: Arc<ArcSwap<Config>>,
    pub in_flight: Arc<InFlight>,
}

/// Requests being handled right now; graceful stop waits for this to reach zero.
#[derive(Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }
}

pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    /// Every backend tried for this request, in order; the last one is current.
    tried: Vec<Arc<Backend>>,
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    _in_flight: InFlightGuard,
}

impl RequestCtx {
    fn tried_addrs(&self) -> Vec<SocketAddr> {
        self.tried.iter().map(|b| b.addr).collect()
    }
}

#[async_trait]
impl ProxyHttp for Balancer {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            tried: Vec::new(),
            upstream_started: None,
            upstream_elapsed: None,
            _in_flight: self.in_flight.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut RequestCtx) -> Result<bool> {
        if session.req_header().uri.path() != HEALTH_CHECK_PATH {
            return Ok(false);
        }
        respond_text(session, 200, "success").await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(backend) = self.pool.select(&ctx.tried_addrs()) else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no healthy upstream",
            ));
        };
        let config = self.config.load();
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(config.upstream.connect_timeout.0);
        peer.options.read_timeout = Some(config.upstream.read_timeout.0);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        ctx.tried.push(backend);
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let config = self.config.load();
        // With active checks on, a refused connect counts as a failed check,
        // so a dead backend leaves the rotation without waiting for the next probe.
        if let (Some(hc), Some(backend)) = (&config.upstream.health_check, ctx.tried.last()) {
            if backend.observe(
                false,
                hc.healthy_threshold.get(),
                hc.unhealthy_threshold.get(),
            ) == Some(false)
            {
                log::warn!(
                    "upstream {} ({}) is unhealthy: {e}",
                    backend.addr,
                    backend.server
                );
            }
        }
        // Nothing reached the backend, so any request may go to another one.
        if self.pool.has_candidate(&ctx.tried_addrs()) {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        if let Some(ip) = client_ip {
            let forwarded_for = match upstream_request.headers.get("x-forwarded-for") {
                Some(earlier) => {
                    let mut v = earlier.as_bytes().to_vec();
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_bytes());
                    v
                }
                None => ip.clone().into_bytes(),
            };
            upstream_request.insert_header("x-forwarded-for", forwarded_for)?;
            upstream_request.insert_header("x-real-ip", ip)?;
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if end_of_stream {
            ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = status_for(e);
        if code > 0 {
            if let Err(write_error) = respond_error_text(session, code).await {
                log::debug!("cannot send the {code} response to the client: {write_error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if !log::log_enabled!(target: "access", log::Level::Info) {
            return;
        }
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let client = session
            .client_addr()
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let upstream = ctx
            .tried
            .last()
            .map_or_else(|| "-".to_owned(), |b| b.addr.to_string());
        let upstream_time = ctx
            .upstream_elapsed
            .map_or_else(|| "-".to_owned(), |d| format!("{:.3}", d.as_secs_f64()));
        log::info!(
            target: "access",
            "{client} \"{} {}\" {status} upstream={upstream} upstream_time={upstream_time} time={:.3} tries={}",
            req.method,
            req.uri,
            ctx.started.elapsed().as_secs_f64(),
            ctx.tried.len(),
        );
    }
}

/// The status a failed request is answered with (0: the client is gone).
fn status_for(e: &Error) -> u16 {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(code), _) => *code,
        (
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            ErrorSource::Upstream,
        ) => 504,
        (_, ErrorSource::Upstream) => 502,
        (
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
            ErrorSource::Downstream,
        ) => 0,
        (_, ErrorSource::Downstream) => 400,
        (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
    }
}

async fn respond_error_text(session: &mut Session, code: u16) -> Result<()> {
    let reason = match code {
        400 => "bad request",
        502 => "bad gateway: the upstream server failed to answer",
        503 => "service unavailable: no healthy upstream server",
        504 => "gateway timeout: the upstream server did not answer in time",
        _ => "the request could not be proxied",
    };
    let body = Bytes::from(format!("{code} {reason}\n"));
    let header = text_header(code, body.len())?;
    session
        .as_downstream_mut()
        .write_error_response(header, body)
        .await
}

async fn respond_text(session: &mut Session, code: u16, text: &'static str) -> Result<()> {
    let header = text_header(code, text.len())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from_static(text.as_bytes())), true)
        .await
}

fn text_header(code: u16, len: usize) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(code, Some(3))?;
    header.insert_header("content-type", "text/plain; charset=utf-8")?;
    header.insert_header("content-length", len)?;
    header.insert_header("cache-control", "no-store")?;
    Ok(header)
}
