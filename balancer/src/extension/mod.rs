//! Programming the balancer: extensions, configured and attached in the TOML.
//!
//! An extension *kind* is code: a Rust type implementing [`Extension`], or a
//! Lua script (the built-in kind `lua`). An *instance* is a kind with its
//! settings, declared by name in the file; a route lists the instances it
//! runs, and `global_extensions` lists those that run for every request:
//!
//! ```toml
//! global_extensions = ["maintenance"]
//!
//! [extensions.keys]
//! kind = "api_keys"                 # a kind this program registered
//! keys_file = "api-keys.txt"        # the kind's own settings
//!
//! [[route]]
//! path = "/api/"
//! upstream = "default"
//! extensions = ["keys"]
//! ```
//!
//! A program of your own registers its kinds, each with a factory that turns
//! the instance's settings (deserialised into the kind's own type) into an
//! extension, and runs the ordinary command line:
//!
//! ```no_run
//! use balancer::extension::{Build, Decision, Extension, HookResult, Registry, RequestView};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct HelloSettings {
//!     greeting: String,
//! }
//!
//! struct Hello(http::HeaderValue);
//!
//! #[async_trait::async_trait]
//! impl Extension for Hello {
//!     async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
//!         req.header.insert_header("x-hello", self.0.clone())?;
//!         Ok(Decision::Continue)
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let registry = Registry::new().register("hello", |s: HelloSettings, _: &mut Build| {
//!         let value = http::HeaderValue::try_from(s.greeting).map_err(|e| format!("greeting: {e}"))?;
//!         Ok(Hello(value))
//!     });
//!     balancer::cli::main_with(registry)
//! }
//! ```
//!
//! Everything is checked when the file is loaded, by `--check` and by every
//! reload: an unknown kind or instance, settings the kind refuses (named with
//! the file and line of the instance), a group the instance names that is
//! not defined. A reload builds again only the instances whose settings, or
//! files they read through [`Build::read_to_string`], changed; one that fails
//! to build refuses the reload, and the configuration in force stays. An
//! instance is built before the snapshot that uses it is published, off the
//! request threads, and dropped after the last request that used it.
//!
//! Per request, the instances run in order (global ones first, then the
//! route's); the first that decides anything but [`Decision::Continue`] ends
//! the round. A hook that returns an error, or panics, answers that request
//! `500` and is logged with the instance's name; the balancer goes on serving.

mod lua;
mod registry;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

pub(crate) use registry::panic_text;
pub use registry::{Build, Factory, Instance, Instances, Registry};

/// What a hook returns: its value, or an error that answers the request `500`.
pub type HookResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A hook's error that the extension has logged itself (under a throttle
/// of its own): the request is answered `500` all the same, without a
/// second log line.
#[derive(Debug)]
pub struct Logged;

impl std::fmt::Display for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the hook failed (the extension logged why)")
    }
}

impl std::error::Error for Logged {}

/// What becomes of a request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// What the matched route (or the default upstream) says.
    Continue,
    /// Answer now; nothing is forwarded.
    Respond(Reply),
    /// Forward to this upstream group (resolved when the instance was built).
    Upstream(GroupRef),
    /// Forward to this backend address, with the timeouts of the route's
    /// group (or the default group's); it is tried once, without retries.
    Backend(SocketAddr),
}

/// An upstream group of the configuration, found when the instance that
/// holds it was built ([`Build::group`]): a request sent to it never fails
/// because of its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef(Arc<str>);

impl GroupRef {
    /// The group's name in the file (`default` is `[upstream]`).
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A response an extension answers with.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// An answer with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            body: Bytes::from(body.into()),
            ..Reply::new(status)
        }
        .with_header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )
    }

    /// Adds a header (after any of the same name).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.append(name, value);
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
    /// The request's host (lower case, without port; empty when it has none).
    pub host: &'a str,
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

/// A piece of request handling. Both hooks do nothing by default.
#[async_trait]
pub trait Extension: Send + Sync + 'static {
    /// Called once per request, after routing (and the route's rate limit)
    /// and before forwarding.
    async fn on_request(&self, _req: &mut RequestView<'_>) -> HookResult<Decision> {
        Ok(Decision::Continue)
    }

    /// Called once per response from an upstream or the cache (not for the
    /// balancer's own answers, such as an extension's `Respond`).
    async fn on_response(&self, _resp: &mut ResponseView<'_>) -> HookResult<()> {
        Ok(())
    }
}
