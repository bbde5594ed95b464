//! Programming the balancer in Rust, for what no TOML can say.
//!
//! An [`Extension`] sees each request after its route is matched (and its
//! rate limit passed) and before anything is forwarded, and each response
//! before it goes to the client. For a request it can let the route do what
//! it says ([`Decision::Continue`]), answer it ([`Decision::Respond`]), send
//! it to another upstream group ([`Decision::Upstream`]) or to one backend
//! address ([`Decision::Backend`]), and change its headers on the way. A
//! program of your own registers its extensions and runs the ordinary
//! command line (`cli::main_with_setup` makes them from the configuration
//! instead, once the command line is parsed):
//!
//! ```no_run
//! use std::sync::Arc;
//! use balancer::extension::{Decision, Extension, HookResult, RequestView};
//!
//! struct Hello;
//!
//! #[async_trait::async_trait]
//! impl Extension for Hello {
//!     fn name(&self) -> &str {
//!         "hello"
//!     }
//!     async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
//!         req.header.insert_header("x-hello", "world")?;
//!         Ok(Decision::Continue)
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     balancer::cli::main_with(vec![Arc::new(Hello)])
//! }
//! ```
//!
//! Extensions run in the order they were given; the first that decides
//! anything but `Continue` ends the round. A hook that returns an error, or
//! panics, answers that request `500` and is logged with the extension's
//! name; the balancer goes on serving.

use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};

/// What a hook returns: its value, or an error that answers the request `500`.
pub type HookResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// What becomes of a request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// What the matched route (or the default upstream) says.
    Continue,
    /// Answer now; nothing is forwarded.
    Respond(Reply),
    /// Forward to this upstream group (its name in the TOML; `default` is `[upstream]`).
    Upstream(String),
    /// Forward to this backend address, with the timeouts of the route's
    /// group (or the default group's); it is tried once, without retries.
    Backend(SocketAddr),
}

/// A response an extension answers with.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![(
                "content-type".to_owned(),
                "text/plain; charset=utf-8".to_owned(),
            )],
            body: Bytes::from(body.into()),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A request as an extension sees it.
pub struct RequestView<'a> {
    /// Method, URI and headers; what is changed here is what is forwarded.
    pub header: &'a mut RequestHeader,
    /// Whatever an extension wants to keep for this request until its
    /// response (a type map: `memo.insert(Routed)`, `memo.get::<Routed>()`).
    pub memo: &'a mut http::Extensions,
    pub client_ip: Option<IpAddr>,
    /// The matched route's name (`#N` when it has none); `None`: no route matched.
    pub route: Option<&'a str>,
    /// The upstream group the request would go to; `None` when the route
    /// answers by itself or nothing matched and there is no default group.
    pub upstream: Option<&'a str>,
    /// Its `X-Request-Id`.
    pub request_id: &'a str,
}

/// A response as an extension sees it, before it goes to the client.
pub struct ResponseView<'a> {
    /// Status and headers; what is changed here is what the client gets.
    pub header: &'a mut ResponseHeader,
    /// What the request hooks kept for this request.
    pub memo: &'a mut http::Extensions,
    pub request: &'a RequestHeader,
    pub client_ip: Option<IpAddr>,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub request_id: &'a str,
}

/// A piece of request handling written in Rust. Both hooks do nothing by default.
#[async_trait]
pub trait Extension: Send + Sync + 'static {
    /// How logs call it.
    fn name(&self) -> &str;

    /// Called once per request, after routing and before forwarding.
    async fn on_request(&self, _req: &mut RequestView<'_>) -> HookResult<Decision> {
        Ok(Decision::Continue)
    }

    /// Called once per response from an upstream or the cache (not for the
    /// balancer's own answers, such as an extension's `Respond`).
    async fn on_response(&self, _resp: &mut ResponseView<'_>) -> HookResult<()> {
        Ok(())
    }
}
