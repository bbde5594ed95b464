//! The request path: Pingora's `ProxyHttp` hooks, in the order Pingora calls them.
//!
//! ```text
//! early_request_filter   limits on the head (431/413/400/405), keep-alive, pipelining
//! request_filter         /health-check; X-Request-Id; ACME HTTP-01 answers (plain
//!                        listener, before any route or redirect); then `decide`: the
//!                        redirect to HTTPS, the route (429, respond, redirect, or a
//!                        group); then `forward`: extensions; a WebSocket upgrade,
//!                        carried to its end by `tunnel`; a fresh cache hit
//! request_cache_filter … the cache (see `cache`)
//! upstream_peer          a backend of the group, by its algorithm
//! upstream_request_filter  Host, strip_prefix, the route's header edits,
//!                        X-Request-Id, the forwarded headers
//! response_filter        X-Cache-Status, the route's header edits, extensions
//! fail_to_connect / error_while_proxy   retries elsewhere
//! fail_to_proxy          502/503/504 (or the client's 4xx) with a plain-text reason
//! logging                metrics and one access-log line
//! ```
//!
//! Each request reads the runtime snapshot that was in force when it
//! arrived, to its end. Finding and checking backends is `upstream`'s job.

pub mod compression;
pub mod connections;
mod decide;
pub mod drain;
pub mod forwarded;
pub mod guard;
pub mod limits;
pub mod listeners;
pub mod parts;
mod relay;
pub use relay::Relays;
mod retry;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use pingora::cache::cache_control::CacheControl;
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, ForcedFreshness, HitHandler,
    RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use crate::cache::{self, ResponseCache};
use crate::extension::{Decision, Instance, Logged, Reply, RequestView, ResponseView};
use crate::proxy::drain::Stopping;
use crate::routing::{self, request_id, Route, Vars};
use crate::runtime::{Chain, Live, Snapshot};
use crate::telemetry::logging::Throttle;
use crate::telemetry::{access_log, metrics};
use crate::upstream::Group;
use decide::Decided;
use retry::{Attempts, ProxyFailure};

/// The answer to an ACME HTTP-01 challenge on the plain listener, before
/// any route, redirect or cache: the CA's request must reach the balancer
/// itself, whatever the routes say.
fn acme_challenge(session: &Session, snapshot: &Snapshot) -> Option<Reply> {
    let storage = snapshot.acme_challenges.as_ref()?;
    let token = session
        .req_header()
        .uri
        .path()
        .strip_prefix(crate::tls::acme::CHALLENGE_PATH)?;
    if is_tls(session) {
        return None;
    }
    Some(match crate::tls::acme::http01_answer(storage, token) {
        Some(answer) => Reply::text(200, answer),
        None => Reply::text(404, "404 no such ACME challenge is open\n"),
    })
}

/// The balancer's own liveness endpoint, answered without an upstream (as the seed's nginx does).
pub const HEALTH_CHECK_PATH: &str = "/health-check";

pub struct Balancer {
    pub live: Arc<Live>,
    pub in_flight: Arc<InFlight>,
    pub cache: &'static ResponseCache,
    /// Set when the drain starts: every response then closes its
    /// connection, and `/health-check` answers 503.
    pub stopping: Arc<Stopping>,
    /// Connects WebSocket tunnels to their backends (see `tunnel`).
    pub tunnels: pingora::connectors::TransportConnector,
    /// Carry plain WebSocket tunnels once they are open (see `relay`).
    pub relays: relay::Relays,
}

/// Client mistakes are logged at most once a second: a flood of bad
/// requests must not flood the log too.
static REFUSALS_LOGGED: Throttle = Throttle::new();

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

/// The parts of a request's state that an extension's view borrows.
struct HookParts<'a> {
    route: Option<&'a str>,
    group: Option<&'a str>,
    request_id: &'a str,
    host: &'a str,
    memo: &'a mut http::Extensions,
}

/// Per-request state.
pub struct RequestCtx {
    /// The snapshot in force when the request arrived, used throughout it.
    snapshot: Arc<Snapshot>,
    /// The matched route's position in the snapshot.
    route: Option<usize>,
    /// Where the request is forwarded; `None` until routed, and for local answers.
    group: Option<Arc<Group>>,
    /// A backend an extension chose; tried once, instead of the group's choice.
    chosen_backend: Option<SocketAddr>,
    /// The request asks to switch protocols (a WebSocket).
    upgrade: bool,
    /// What extensions keep for this request between their hooks.
    memo: http::Extensions,
    request_id: String,
    /// Its host, lower case without port; worked out once, and only when
    /// a route or an extension may read it (empty otherwise).
    host: String,
    /// Which `cache.rule` covers the request, if any.
    cache_rule: Option<usize>,
    started: Instant,
    /// Its tries of backends, and what decides whether to try again.
    attempts: Attempts,
    /// Request body bytes received so far.
    body_bytes: u64,
    /// `X-Cache-Status` of the response, when a cache rule covers the request.
    cache_status: Option<&'static str>,
    /// The 304 that revalidated the stored response: its fields update the
    /// stored copy and, when that copy is not updated, the answer sent.
    not_modified: Option<Box<ResponseHeader>>,
    /// The cache holds an expired copy for this request: if the origin then
    /// fails and no stale copy was served, that copy may not be served stale.
    expired_copy: bool,
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    /// How the WebSocket tunnel of this request ended.
    tunnel: Option<access_log::Tunnel>,
    /// Counts the request in the process-wide figure that graceful stop waits on.
    _counted: InFlightGuard,
}

impl RequestCtx {
    fn cache_rule(&self) -> Option<&cache::Rule> {
        let rules = &self.snapshot.cache.as_ref()?.rules;
        rules.get(self.cache_rule?)
    }

    fn route(&self) -> Option<&Route> {
        self.snapshot.routes.get(self.route?)
    }

    fn route_label(&self) -> Option<&str> {
        self.route().map(|r| &*r.label)
    }

    /// The extension instances this request runs.
    fn chain(&self) -> &Chain {
        match self.route {
            Some(i) => &self.snapshot.route_chains[i],
            None => &self.snapshot.unrouted_chain,
        }
    }

    /// What an extension's view shows of the request (its route, its group,
    /// its id, its host), with the memo it may change.
    fn hook_parts(&mut self) -> HookParts<'_> {
        HookParts {
            route: self
                .route
                .and_then(|i| self.snapshot.routes.get(i))
                .map(|r| &*r.label),
            group: self.group.as_ref().map(|g| &*g.name),
            request_id: &self.request_id,
            host: &self.host,
            memo: &mut self.memo,
        }
    }
}

#[async_trait]
impl ProxyHttp for Balancer {
    type CTX = RequestCtx;

    /// Only the balancer's compression (see `compression`), instead of
    /// Pingora's default, whose choices (the first encoding listed, its own
    /// types and a 20-byte minimum) are not `[compression]`'s.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(Box::new(compression::CompressBuilder));
    }

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: self.live.load_full(),
            route: None,
            group: None,
            chosen_backend: None,
            upgrade: false,
            memo: http::Extensions::new(),
            request_id: String::new(),
            host: String::new(),
            cache_rule: None,
            started: Instant::now(),
            attempts: Attempts::default(),
            body_bytes: 0,
            cache_status: None,
            not_modified: None,
            expired_copy: false,
            upstream_started: None,
            upstream_elapsed: None,
            tunnel: None,
            _counted: self.in_flight.enter(),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        connections::head_received(session);
        let limits = &ctx.snapshot.limits;
        // HTTP/1.0 without keep-alive, or `Connection: close`: Pingora has
        // already decided to close, and setting a timeout would undo that.
        let keeps_alive = session
            .as_downstream()
            .as_http1()
            .is_some_and(|h1| h1.will_keepalive());
        if self.stopping.is_set() {
            session.set_keepalive(None);
        } else if keeps_alive {
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1)));
            // Pipelined requests are answered in order, one after the other
            // (RFC 9112, section 9.3.2); off, Pingora drops all but the first.
            session.as_downstream_mut().set_pipelining_enabled(true);
        }
        if let Some(h1) = session.as_downstream().as_http1() {
            limits::check_head(&h1.get_headers_raw_bytes(), limits).map_err(refuse)?;
        }
        if connections::request_line_malformed(session) {
            return Err(refuse(limits::Rejection {
                status: 400,
                reason: "malformed request line (a request-target may not contain spaces)"
                    .to_owned(),
            }));
        }
        if session.req_header().method.as_str() == "TRACE" {
            // It echoes the request, cookies included, to whoever can make a
            // browser send it; nginx refuses it too.
            return Err(refuse(limits::Rejection {
                status: 405,
                reason: "TRACE is not allowed".to_owned(),
            }));
        }
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(length) = declared {
            limits::check_body(length, limits).map_err(refuse)?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            limits::check_body(ctx.body_bytes, &ctx.snapshot.limits).map_err(refuse)?;
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if session.req_header().uri.path() == HEALTH_CHECK_PATH {
            // A draining balancer still serves what it is sent, but asks a
            // health-checking front to send it nothing more.
            let (status, text) = if self.stopping.is_set() {
                (503, "shutting down")
            } else {
                (200, "success")
            };
            let header = text_header(status, text.len())?;
            Box::pin(write_answer(
                session,
                header,
                Bytes::from_static(text.as_bytes()),
            ))
            .await?;
            return Ok(true);
        }
        if !parts::off(parts::Part::RequestId) {
            ctx.request_id = request_id::for_request(session.req_header());
        }
        let snapshot = Arc::clone(&ctx.snapshot);
        if let Some(reply) = acme_challenge(session, &snapshot) {
            Box::pin(self.answer(session, ctx, &reply)).await?;
            return Ok(true);
        }
        // Lower-cased, without port: worked out once, and only when a
        // route, a header edit or an extension reads it.
        if snapshot.uses_host {
            ctx.host = routing::request_host(session.req_header());
        }
        let facts = decide::Facts {
            req: session.req_header(),
            host: &ctx.host,
            tls: is_tls(session),
            client_ip: client_ip(session),
            request_id: &ctx.request_id,
        };
        let plan = match parts::off(parts::Part::Routing) {
            false => decide::plan(&facts, &snapshot),
            true => decide::Plan {
                route: None,
                action: Decided::Forward(snapshot.default.clone()),
            },
        };
        ctx.route = plan.route;
        match plan.action {
            Decided::Answer(reply) => {
                Box::pin(self.answer(session, ctx, &reply)).await?;
                Ok(true)
            }
            Decided::Forward(group) => {
                ctx.group = group;
                self.forward(session, ctx).await
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let Some(policy) = &ctx.snapshot.cache else {
            return Ok(());
        };
        if ctx.cache_rule.is_none()
            || !pingora::cache::filters::request_cacheable(session.req_header())
        {
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(cache::LOCK_WAIT);
        session.cache.enable(
            self.cache.storage,
            None,
            None,
            Some(self.cache.lock),
            Some(overrides),
        );
        session
            .cache
            .set_max_file_size_bytes(policy.max_object_size);
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, _ctx: &mut RequestCtx) -> Result<CacheKey> {
        Ok(cache::key::for_request(session.req_header()))
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<ForcedFreshness>> {
        // A response stored for one user may answer a request with credentials
        // only when it said it can be shared (RFC 9111, section 3.5).
        let authorized = session.req_header().headers.contains_key("authorization");
        let shareable = cache::shareable_with_authorization(
            CacheControl::from_resp_headers(meta.response_header()).as_ref(),
        );
        let used = !authorized || shareable;
        ctx.expired_copy = used && !is_fresh;
        Ok((!used).then_some(ForcedFreshness::ForceMiss))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        cache::variance(meta, req)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        let Some(rule) = ctx.cache_rule() else {
            return Ok(RespCacheable::Uncacheable(
                pingora::cache::NoCacheReason::NeverEnabled,
            ));
        };
        let authorization = session.req_header().headers.contains_key("authorization");
        if let Some(not_modified) = ctx.not_modified.as_deref() {
            let mut merged = resp.clone();
            cache::update_from_304(&mut merged, not_modified)?;
            return Ok(cache::cacheability(rule, &merged, authorization));
        }
        Ok(cache::cacheability(rule, resp, authorization))
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        // None: the entry is in its stale-while-revalidate window; serve it
        // while one background request refreshes it. Some: the origin failed
        // (down, timed out or 5xx) within the stale-if-error window.
        error.is_none_or(|e| e.esource() == &ErrorSource::Upstream)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Pingora merges only a few fields of a revalidating 304 into the
        // stored response; response_cache_filter merges them all. Among
        // Pingora's few is ETag, which stays as stored: it goes first.
        if upstream_response.status == http::StatusCode::NOT_MODIFIED
            && session.cache.maybe_cache_meta().is_some()
        {
            ctx.not_modified = Some(Box::new(upstream_response.clone()));
            cache::remove_kept_fields(upstream_response);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.stopping.is_set() && !ctx.upgrade {
            // The drain began while this request was in flight.
            session.set_keepalive(None);
        }
        // The balancer is the surrogate that Surrogate-Control speaks to.
        upstream_response.remove_header("surrogate-control");
        if let (CachePhase::RevalidatedNoCache(_), Some(not_modified)) =
            (session.cache.phase(), ctx.not_modified.as_deref())
        {
            // A 304 not stored (one with a Set-Cookie the rule does not
            // store): the client that revalidated still gets all its fields,
            // where Pingora's merge has only the caching ones.
            cache::update_from_304(upstream_response, not_modified)?;
        }
        if let Some(policy) = &ctx.snapshot.cache {
            self.cache
                .invalidate_after(&policy.rules, session.req_header(), upstream_response);
        }
        if let Some(client_max_age) = ctx.cache_rule().map(|r| r.client_max_age) {
            let status = cache::status_label(session.cache.phase());
            self.cache.stats.count(status);
            ctx.cache_status = Some(status);
            cache::label_response(upstream_response, status, client_max_age)?;
        }
        self.finish_response(session, ctx, upstream_response).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(group) = ctx.group.clone() else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no upstream group",
            ));
        };
        ctx.upstream_started.get_or_insert_with(Instant::now);
        if let Some(addr) = ctx.chosen_backend.take() {
            ctx.attempts.pick_address(addr);
            return Ok(group.peer(addr, None, ctx.upgrade));
        }
        let picked = ctx
            .attempts
            .pick(&group, session.req_header(), client_ip(session));
        let Some(backend) = picked else {
            // Sourced upstream, so that a stale cached copy may still be served.
            return Err(Error::create(
                ErrorType::HTTPStatus(503),
                ErrorSource::Upstream,
                Some("no healthy upstream".into()),
                None,
            ));
        };
        Ok(group.peer(backend.addr, Some(&backend.server), ctx.upgrade))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(group) = &ctx.group {
            ctx.attempts.connect_failed(group, &mut e);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let how = ProxyFailure {
            // Once the client has been sent part of an answer (its head, say,
            // before the backend died in the body), another try would add a
            // second answer to it: Pingora writes no second head, and the
            // next backend's body would follow the first one's.
            replayable: session.req_header().method.is_idempotent()
                && !session.as_ref().retry_buffer_truncated()
                && session.response_written().is_none(),
            reused: client_reused,
        };
        ctx.attempts.proxy_failed(ctx.group.as_deref(), how, &mut e);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = ctx.route() {
            let path_and_query = routing::path_and_query(session.req_header()).to_owned();
            if let Some(stripped) = route.forwarded_path(&path_and_query) {
                let uri = http::Uri::try_from(stripped.as_str())
                    .map_err(|e| Error::because(ErrorType::InternalError, "strip_prefix", e))?;
                upstream_request.set_uri(uri);
            }
            if !route.request_headers.is_empty() {
                let vars = Vars {
                    client_ip: client_ip(session),
                    host: &ctx.host,
                    path_and_query: &path_and_query,
                    request_id: &ctx.request_id,
                };
                route
                    .request_headers
                    .apply_request(upstream_request, &vars)?;
            }
        }
        if !parts::off(parts::Part::RequestId) {
            upstream_request.insert_header(request_id::NAME, ctx.request_id.as_str())?;
        }
        if !upstream_request.headers.contains_key(http::header::HOST) {
            // An HTTP/1.0 client need not send one; the upstream request is
            // HTTP/1.1, which must: name the address the client reached.
            let host = session
                .server_addr()
                .and_then(|a| a.as_inet())
                .map_or_else(|| "localhost".to_owned(), ToString::to_string);
            upstream_request.insert_header(http::header::HOST, host)?;
        }
        forwarded::apply(upstream_request, client_ip(session), is_tls(session))
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
            ctx.attempts.response_done();
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match status_for(e) {
            // Had the expired copy been allowed to be served stale (by the
            // response and the rule's stale_if_error), it would have been by
            // now. It may not be (RFC 9111, section 4.2.4), and a cache cut
            // off from the origin answers 504 (section 5.2.2.2).
            502 if ctx.expired_copy && unanswered(e.etype()) => 504,
            code => code,
        };
        if code > 0 {
            if let Err(write_error) = respond_error_text(session, code, e, &ctx.request_id).await {
                log::debug!("cannot send the {code} response to the client: {write_error}");
            }
            // The connection closes after this answer; what the client may
            // still be sending must not reset it away.
            if is_client_mistake(code) || !session.is_body_done() {
                connections::answered_early(session);
            }
        }
        if is_client_mistake(code) && REFUSALS_LOGGED.allow() {
            log::info!(
                "refused {} {} from {} with {code}: {}",
                session.req_header().method,
                session.req_header().uri,
                client_ip(session).map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                e.context
                    .as_ref()
                    .map_or_else(|| e.etype().as_str().to_owned(), |c| c.as_str().to_owned()),
            );
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's ERROR line is for what an operator must act on: a client's
    /// mistake, or a client that went away, is not (the refusal is logged at
    /// info in `fail_to_proxy`).
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        let code = status_for(e);
        code == 0 || is_client_mistake(code)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        connections::request_done(session);
        let req = session.req_header();
        let record = access_log::Record {
            client: client_ip(session),
            method: req.method.as_str(),
            uri: &req.uri,
            protocol: protocol(req.version, is_tls(session)),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            route: ctx.route_label(),
            // A hit reaches no upstream.
            group: ctx
                .group
                .as_ref()
                .filter(|_| ctx.cache_status != Some("HIT"))
                .map(|g| &*g.name),
            upstream: ctx.attempts.current().map(|b| b.label.as_str()),
            request_id: &ctx.request_id,
            upstream_time: ctx.upstream_elapsed,
            time: ctx.started.elapsed(),
            retries: ctx.attempts.tries().saturating_sub(1),
            cache: ctx.cache_status,
            tunnel: ctx.tunnel,
        };
        if !parts::off(parts::Part::Metrics) {
            metrics::observe(&record);
        }
        // Docker probes every few seconds: that is not traffic worth a line.
        let log = ctx.snapshot.access_log;
        if req.uri.path() != HEALTH_CHECK_PATH || log.health_checks {
            access_log::write(log.format, &record);
        }
    }
}

impl Balancer {
    /// Carries out a forward: the extensions' say (which may answer, or
    /// send the request elsewhere), then the 404 for a request with nowhere
    /// to go, a WebSocket's tunnel, or the cache and the proxy.
    ///
    /// The branches most requests do not take (a local answer, a tunnel, a
    /// cache hit) are awaited boxed: their futures then stay out of
    /// `request_filter`'s, which is made, and copied whole, for every
    /// request (`bench/results/parts.md`).
    async fn forward(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let decision = if ctx.chain().is_empty() {
            Decision::Continue
        } else {
            self.run_extensions(session, ctx).await
        };
        // A request an extension sent elsewhere is not answered from (or
        // stored in) the cache, whose key knows nothing of that choice.
        let sent_elsewhere = !matches!(decision, Decision::Continue);
        match decision {
            Decision::Continue => {}
            Decision::Respond(reply) => {
                Box::pin(self.answer(session, ctx, &reply)).await?;
                return Ok(true);
            }
            // Found when the instance was built against this snapshot's groups.
            Decision::Upstream(group) => {
                ctx.group = ctx.snapshot.groups.get(group.name()).cloned();
            }
            Decision::Backend(addr) => {
                ctx.chosen_backend = Some(addr);
                if ctx.group.is_none() {
                    ctx.group = ctx.snapshot.default.clone();
                }
            }
        }
        ctx.upgrade = session.is_upgrade_req();
        if let (true, Some(group)) = (ctx.upgrade, &ctx.group) {
            // An upgraded connection lives as long as it carries traffic,
            // past read_timeout, until idle_timeout of silence.
            session.set_read_timeout(Some(group.idle_timeout));
        }
        if ctx.group.is_none() && ctx.chosen_backend.is_none() {
            let reply = Reply::text(
                404,
                "404 not found: no route matches this request, and there is no default upstream\n",
            );
            Box::pin(self.answer(session, ctx, &reply)).await?;
            return Ok(true);
        }
        if tunnel::is_websocket_upgrade(session.req_header()) {
            Box::pin(self.tunnel(session, ctx)).await?;
            return Ok(true);
        }
        let route_allows = ctx.route().is_none_or(|r| r.compression);
        compression::offer(session, &ctx.snapshot, route_allows);
        if let (Some(policy), false, false) = (
            &ctx.snapshot.cache,
            sent_elsewhere,
            parts::off(parts::Part::CacheLookup),
        ) {
            ctx.cache_rule = cache::rule_index(&policy.rules, session.req_header().uri.path());
        }
        // `serve_fresh_hit` makes the same check first; made here too, a
        // path without a rule (most requests) allocates no box for it.
        if ctx.cache_rule.is_none() {
            return Ok(false);
        }
        Box::pin(self.serve_fresh_hit(session, ctx)).await
    }

    /// Runs the extensions' request hooks in turn, until one decides. An
    /// error or a panic answers `500`.
    async fn run_extensions(&self, session: &mut Session, ctx: &mut RequestCtx) -> Decision {
        let client_ip = client_ip(session);
        // Its own handle: the hooks below borrow the request's state.
        let chain = Arc::clone(ctx.chain());
        for instance in chain.iter() {
            let parts = ctx.hook_parts();
            let mut view = RequestView {
                header: session.req_header_mut(),
                memo: parts.memo,
                client_ip,
                host: parts.host,
                route: parts.route,
                upstream: parts.group,
                request_id: parts.request_id,
            };
            let outcome = AssertUnwindSafe(instance.extension.on_request(&mut view))
                .catch_unwind()
                .await;
            match outcome {
                Ok(Ok(Decision::Continue)) => {}
                Ok(Ok(decision)) => return decision,
                Ok(Err(e)) => return extension_failed(instance, &e.to_string()),
                Err(panic) => return extension_failed(instance, &panic_text(&panic)),
            }
        }
        Decision::Continue
    }

    /// What every response to a forwarded request gets on its way out: the
    /// route's header edits, `X-Request-Id`, and the extensions' response hooks.
    async fn finish_response(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        resp: &mut ResponseHeader,
    ) -> Result<()> {
        let req = session.req_header();
        route_response_edits(session, ctx, resp)?;
        if ctx.chain().is_empty() {
            return Ok(());
        }
        // Its own handle: the hooks below borrow the request's state.
        let chain = Arc::clone(ctx.chain());
        for instance in chain.iter() {
            let parts = ctx.hook_parts();
            let mut view = ResponseView {
                header: resp,
                request: req,
                memo: parts.memo,
                client_ip: client_ip(session),
                route: parts.route,
                upstream: parts.group,
                request_id: parts.request_id,
            };
            let outcome = AssertUnwindSafe(instance.extension.on_response(&mut view))
                .catch_unwind()
                .await;
            let failure = match outcome {
                Ok(Ok(())) => continue,
                // Said already, under the extension's own throttle.
                Ok(Err(e)) if e.is::<Logged>() => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(panic_text(&panic)),
            };
            if let Some(failure) = failure {
                log::error!(
                    "extension {} (kind {}): response hook failed: {failure}",
                    instance.name,
                    instance.kind
                );
            }
            return Err(Error::explain(
                ErrorType::HTTPStatus(500),
                format!("extension {} failed", instance.name),
            ));
        }
        Ok(())
    }

    /// Answers the request here: a route's `respond` or `redirect`, a rate
    /// limit's 429, an extension's reply, the 404 for an unrouted request.
    async fn answer(&self, session: &mut Session, ctx: &RequestCtx, reply: &Reply) -> Result<()> {
        let mut header = ResponseHeader::build(reply.status, Some(reply.headers.len() + 3))?;
        for (name, value) in &reply.headers {
            header.append_header(name.clone(), value.clone())?;
        }
        header.insert_header("content-length", reply.body.len())?;
        if !header.headers.contains_key(http::header::CACHE_CONTROL) {
            header.insert_header("cache-control", "no-store")?;
        }
        route_response_edits(session, ctx, &mut header)?;
        write_answer(session, header, reply.body.clone()).await
    }

    /// Answers a plain GET or HEAD from a fresh cached copy without the rest
    /// of the cache machinery (lock, variants, revalidation): the common hit,
    /// made short. Anything less simple returns `false` and takes the full
    /// path, which answers it the same way.
    async fn serve_fresh_hit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(rule) = ctx.cache_rule() else {
            return Ok(false);
        };
        if !cache::plain_hit_candidate(session.req_header()) {
            return Ok(false);
        }
        let client_max_age = rule.client_max_age;
        let key = cache::key::hash_of_request(session.req_header());
        let Some(hit) = self.cache.storage.fresh_hit(&key) else {
            return Ok(false);
        };
        let mut header = hit.header;
        header.insert_header(http::header::AGE, hit.age.as_secs())?;
        cache::tell_clients(&mut header, client_max_age)?;
        self.cache.stats.count("HIT");
        ctx.cache_status = Some("HIT");
        self.finish_response(session, ctx, &mut header).await?;
        write_answer(session, header, hit.body).await?;
        Ok(true)
    }
}

/// What every response gets from the balancer: the route's header edits and
/// `X-Request-Id`.
fn route_response_edits(
    session: &Session,
    ctx: &RequestCtx,
    resp: &mut ResponseHeader,
) -> Result<()> {
    if let Some(route) = ctx.route().filter(|r| !r.response_headers.is_empty()) {
        let req = session.req_header();
        let vars = Vars {
            client_ip: client_ip(session),
            host: &ctx.host,
            path_and_query: routing::path_and_query(req),
            request_id: &ctx.request_id,
        };
        route.response_headers.apply_response(resp, &vars)?;
    }
    if !parts::off(parts::Part::RequestId) {
        resp.insert_header(request_id::NAME, ctx.request_id.as_str())?;
    }
    Ok(())
}

/// The 500 that an extension's failure answers, logged with its name.
fn extension_failed(instance: &Instance, why: &str) -> Decision {
    log::error!(
        "extension {} (kind {}): request hook failed: {why}",
        instance.name,
        instance.kind
    );
    Decision::Respond(Reply::text(
        500,
        "500 internal error: the request could not be handled\n",
    ))
}

/// What a panic said, when it said it in text.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    format!("panicked: {}", crate::extension::panic_text(&**panic))
}

/// The client's protocol, as the access log names it.
fn protocol(version: http::Version, tls: bool) -> &'static str {
    match (version, tls) {
        (http::Version::HTTP_2, true) => "HTTP/2+TLS",
        (http::Version::HTTP_2, false) => "HTTP/2",
        (http::Version::HTTP_10, true) => "HTTP/1.0+TLS",
        (http::Version::HTTP_10, false) => "HTTP/1.0",
        (_, true) => "HTTP/1.1+TLS",
        (_, false) => "HTTP/1.1",
    }
}

/// Whether the client came over TLS.
fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The client's IP address (none for a Unix-socket client).
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn refuse(r: limits::Rejection) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(r.status), r.reason)
}

/// Statuses that say the client asked for something it may not have.
fn is_client_mistake(code: u16) -> bool {
    (400..500).contains(&code)
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

/// Whether `etype` says the upstream could not be reached or closed the
/// connection without answering (not that it answered badly, nor in time).
fn unanswered(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
    )
}

/// The plain-text reason a client reads for a failed request.
fn reason_for(code: u16, e: &Error) -> &'static str {
    match (code, e.etype()) {
        (400, _) => "bad request",
        (405, _) => "method not allowed",
        (408, _) => "request timeout",
        (413, _) => "content too large",
        (431, _) => "request header fields too large",
        (502, _) => "bad gateway: the upstream server failed to answer",
        (503, _) => "service unavailable: no healthy upstream server",
        (504, ErrorType::ConnectTimedout) => {
            "gateway timeout: could not connect to the upstream server within connect_timeout"
        }
        (504, etype) if unanswered(etype) => {
            "gateway timeout: the upstream server could not be reached or closed the connection unanswered, and the cached copy has expired and may not be served stale"
        }
        (504, _) => "gateway timeout: the upstream server did not answer within read_timeout",
        _ => "the request could not be proxied",
    }
}

async fn respond_error_text(
    session: &mut Session,
    code: u16,
    e: &Error,
    request_id: &str,
) -> Result<()> {
    let body = Bytes::from(format!("{code} {}\n", reason_for(code, e)));
    let mut header = text_header(code, body.len())?;
    if !request_id.is_empty() {
        header.insert_header(request_id::NAME, request_id)?;
    }
    if code == 405 {
        header.insert_header("allow", "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS")?;
    }
    session
        .as_downstream_mut()
        .write_error_response(header, body)
        .await
}

/// Writes an answer the balancer makes itself (a reply, its own endpoint,
/// a fresh cached copy): the head, then the body unless the request is a
/// `HEAD` or the body is empty. (A failed request's answer goes through
/// Pingora's error writer instead, which also settles the connection.)
async fn write_answer(session: &mut Session, header: ResponseHeader, body: Bytes) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let no_body = head_only || body.is_empty();
    session
        .write_response_header(Box::new(header), no_body)
        .await?;
    if !no_body {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn text_header(code: u16, len: usize) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(code, Some(3))?;
    header.insert_header("content-type", "text/plain; charset=utf-8")?;
    header.insert_header("content-length", len)?;
    header.insert_header("cache-control", "no-store")?;
    Ok(header)
}
