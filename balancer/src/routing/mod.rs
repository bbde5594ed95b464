//! Routes as the request path uses them: compiled from `[[route]]` once per
//! snapshot, matched against a request in file order (the first match wins),
//! with their header edits (values with variables filled in per request),
//! their rate limits and the request id every request carries.
//!
//! What a route may say, and the errors for what it may not, is `config`'s;
//! acting on a match (forwarding, answering) is `proxy`'s.

mod rate_limit;
pub mod request_id;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::{self, Authority, HostPattern, Template};
pub use rate_limit::{Limit, Limiter};

/// One route, ready for requests.
pub struct Route {
    /// Its name, or `#N` (its position from 1).
    pub label: Arc<str>,
    /// The host it matches; `None`: any.
    pub host: Option<HostPattern>,
    /// The path prefix it matches.
    pub path: String,
    /// The methods it matches; `None`: any.
    pub methods: Option<Vec<http::Method>>,
    /// Each must be present; `None`: with any value.
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    pub action: Action,
    pub strip_prefix: Option<String>,
    pub request_headers: Edits,
    pub response_headers: Edits,
    pub rate_limit: Option<Arc<Limiter>>,
    /// `false`: its responses are never compressed.
    pub compression: bool,
}

/// What a route does with a request it matches.
pub enum Action {
    /// Forward it to the named upstream group.
    Upstream(String),
    Redirect {
        location: Template,
        status: u16,
    },
    Respond {
        status: u16,
        body: Bytes,
        content_type: HeaderValue,
    },
}

/// What a request offers to match against: its host (without port, lower
/// case), path, method and headers.
pub struct RequestFacts<'a> {
    pub host: &'a str,
    pub req: &'a RequestHeader,
}

impl Route {
    /// Compiles the route at `index`; `previous` is the route at the same
    /// place in the snapshot before, whose rate-limit counts carry over when
    /// the limit is unchanged.
    pub fn compile(index: usize, route: &config::Route, previous: Option<&Route>) -> Route {
        let action = match &route.action {
            config::Action::Upstream { group, .. } => Action::Upstream(group.clone()),
            config::Action::Redirect(r) => Action::Redirect {
                location: r.location.clone(),
                status: r.status,
            },
            config::Action::Respond(r) => Action::Respond {
                status: r.status,
                body: Bytes::from(r.body.clone()),
                content_type: r.content_type.clone(),
            },
        };
        let strip_prefix = match &route.action {
            config::Action::Upstream { strip_prefix, .. } => {
                strip_prefix.as_ref().map(|p| p.as_str().to_owned())
            }
            _ => None,
        };
        let rate_limit = route.rate_limit.as_ref().map(|limit| {
            let limit = Limit::from(limit);
            previous
                .and_then(|p| p.rate_limit.as_ref())
                .filter(|kept| *kept.limit() == limit)
                .cloned()
                .unwrap_or_else(|| Arc::new(Limiter::new(limit)))
        });
        Route {
            label: Arc::from(route.label(index)),
            host: route.host.clone(),
            path: route.path.as_str().to_owned(),
            methods: route
                .methods
                .as_ref()
                .map(|m| m.iter().map(|m| m.0.clone()).collect()),
            headers: route
                .headers
                .iter()
                .map(|(name, wanted)| {
                    let value = match wanted {
                        config::HeaderMatch::Present => None,
                        config::HeaderMatch::Equals(value) => Some(value.clone()),
                    };
                    (name.0.clone(), value)
                })
                .collect(),
            action,
            strip_prefix,
            request_headers: Edits::compile(&route.request_headers),
            response_headers: Edits::compile(&route.response_headers),
            rate_limit,
            compression: route.compression,
        }
    }

    pub fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        let req = facts.req;
        self.host.as_ref().is_none_or(|h| h.matches(facts.host))
            && req.uri.path().starts_with(self.path.as_str())
            && self
                .methods
                .as_ref()
                .is_none_or(|m| m.contains(&req.method))
            && self.headers.iter().all(|(name, value)| {
                let mut present = req.headers.get_all(name).iter();
                match value {
                    None => present.next().is_some(),
                    Some(value) => present.any(|v| v == value),
                }
            })
    }

    /// The path and query to forward, with `strip_prefix` taken off (an
    /// emptied path becomes `/`).
    pub fn forwarded_path(&self, path_and_query: &str) -> Option<String> {
        let prefix = self.strip_prefix.as_deref()?;
        let rest = path_and_query.strip_prefix(prefix)?;
        Some(if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        })
    }
}

/// The first of `routes` that matches, with its position.
pub fn find<'a>(routes: &'a [Route], facts: &RequestFacts<'_>) -> Option<(usize, &'a Route)> {
    routes.iter().enumerate().find(|(_, r)| r.matches(facts))
}

/// The request's host as routes see it: the `Host` header (or the authority
/// of an absolute request-target), without port, in lower case.
pub fn request_host(req: &RequestHeader) -> String {
    Authority::request_host(&req.headers, &req.uri)
}

/// The request's path and query, as forwarded and as `{path}` shows it.
pub fn path_and_query(req: &RequestHeader) -> &str {
    req.uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// What header templates may use.
pub struct Vars<'a> {
    pub client_ip: Option<IpAddr>,
    pub host: &'a str,
    pub path_and_query: &'a str,
    pub request_id: &'a str,
}

impl Vars<'_> {
    pub fn render(&self, template: &Template) -> String {
        let mut out = String::new();
        for part in &template.parts {
            match part {
                config::Part::Text(text) => out.push_str(text),
                config::Part::Variable(v) => match v {
                    config::Variable::ClientIp => {
                        if let Some(ip) = self.client_ip {
                            out.push_str(&ip.to_string());
                        }
                    }
                    config::Variable::Host => out.push_str(self.host),
                    config::Variable::Path => out.push_str(self.path_and_query),
                    config::Variable::RequestId => out.push_str(self.request_id),
                },
            }
        }
        out
    }
}

/// Headers to set and remove, with fixed values made once.
#[derive(Default)]
pub struct Edits {
    set: Vec<(HeaderName, Value)>,
    remove: Vec<HeaderName>,
}

enum Value {
    Fixed(HeaderValue),
    Template(Template),
}

impl Edits {
    fn compile(edits: &config::HeaderEdits) -> Edits {
        Edits {
            set: edits
                .set
                .iter()
                .map(|(name, template)| {
                    let value = match template.as_fixed().map(HeaderValue::from_str) {
                        Some(Ok(fixed)) => Value::Fixed(fixed),
                        _ => Value::Template(template.clone()),
                    };
                    (name.0.clone(), value)
                })
                .collect(),
            remove: edits.remove.iter().map(|n| n.0.clone()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Whether a value it sets says `{host}`.
    pub fn uses_host(&self) -> bool {
        self.set.iter().any(|(_, value)| match value {
            Value::Fixed(_) => false,
            Value::Template(t) => t
                .parts
                .iter()
                .any(|p| matches!(p, config::Part::Variable(config::Variable::Host))),
        })
    }

    /// Removes, then sets (so a header both removed and set ends up set).
    fn apply(&self, headers: &mut dyn HeaderTarget, vars: &Vars<'_>) -> pingora::Result<()> {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            let value = match value {
                Value::Fixed(v) => v.clone(),
                Value::Template(t) => match HeaderValue::from_str(&vars.render(t)) {
                    Ok(v) => v,
                    // A variable's value that cannot be a header (never for
                    // the ones there are): leave the header out.
                    Err(_) => continue,
                },
            };
            headers.insert(name.clone(), value)?;
        }
        Ok(())
    }

    pub fn apply_request(&self, req: &mut RequestHeader, vars: &Vars<'_>) -> pingora::Result<()> {
        self.apply(req, vars)
    }

    pub fn apply_response(
        &self,
        resp: &mut ResponseHeader,
        vars: &Vars<'_>,
    ) -> pingora::Result<()> {
        self.apply(resp, vars)
    }
}

/// Pingora's request and response headers, which keep their own case map.
trait HeaderTarget {
    fn remove(&mut self, name: &HeaderName);
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()>;
}

impl HeaderTarget for RequestHeader {
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
        self.insert_header(name, value)
    }
}

impl HeaderTarget for ResponseHeader {
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
        self.insert_header(name, value)
    }
}

/// What part of a request keys a consistent hash or a rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// The path and query.
    Uri,
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

impl From<&config::HashKey> for HashKey {
    fn from(key: &config::HashKey) -> HashKey {
        match key {
            config::HashKey::ClientIp => HashKey::ClientIp,
            config::HashKey::Uri => HashKey::Uri,
            config::HashKey::Header(name) => HashKey::Header(name.clone()),
            config::HashKey::Cookie(name) => HashKey::Cookie(name.clone()),
            config::HashKey::Query(name) => HashKey::Query(name.clone()),
        }
    }
}

impl std::fmt::Display for HashKey {
    /// As the file writes it: `client_ip`, `header:x-user`, ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Uri => f.write_str("uri"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Query(name) => write!(f, "query:{name}"),
        }
    }
}

impl HashKey {
    /// The bytes this key takes from a request. A request without them (no
    /// such cookie, header or parameter) is keyed by its client's address
    /// instead.
    pub fn of(&self, req: &RequestHeader, client_ip: Option<IpAddr>) -> Vec<u8> {
        let found: Option<Vec<u8>> = match self {
            HashKey::ClientIp => None,
            HashKey::Uri => Some(path_and_query(req).as_bytes().to_vec()),
            HashKey::Header(name) => req.headers.get(name).map(|v| v.as_bytes().to_vec()),
            HashKey::Cookie(name) => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_bytes().to_vec()),
            HashKey::Query(name) => req.uri.query().and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_bytes().to_vec())
            }),
        };
        found.unwrap_or_else(|| {
            client_ip
                .map(|ip| ip.to_string().into_bytes())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> Route {
        Route::compile(0, &toml::from_str(text).unwrap(), None)
    }

    fn req(method: &str, path: &str, headers: &[(&'static str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            r.append_header(*n, *v).unwrap();
        }
        r
    }

    fn matches(route: &Route, host: &str, req: &RequestHeader) -> bool {
        route.matches(&RequestFacts { host, req })
    }

    #[test]
    fn a_route_matches_host_path_methods_and_headers() {
        let r = route("host = \"*.example.com\"\npath = \"/api/\"\nmethods = [\"GET\", \"post\"]\nheaders = { \"X-Canary\" = \"1\", \"X-Any\" = \"*\" }\nupstream = \"api\"");
        let ok = req("GET", "/api/x", &[("x-canary", "1"), ("x-any", "whatever")]);
        assert!(matches(&r, "a.example.com", &ok));
        assert!(
            !matches(&r, "example.com", &ok),
            "the wildcard wants a name below"
        );
        assert!(!matches(
            &r,
            "a.example.com",
            &req("PUT", "/api/x", &[("x-canary", "1"), ("x-any", "")])
        ));
        assert!(!matches(
            &r,
            "a.example.com",
            &req("POST", "/other", &[("x-canary", "1"), ("x-any", "")])
        ));
        assert!(!matches(
            &r,
            "a.example.com",
            &req("POST", "/api/", &[("x-canary", "2"), ("x-any", "")])
        ));
        assert!(!matches(
            &r,
            "a.example.com",
            &req("POST", "/api/", &[("x-canary", "1")])
        ));
    }

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(
            request_host(&req("GET", "/", &[("host", "API.Example.com:8080")])),
            "api.example.com"
        );
        assert_eq!(
            request_host(&req("GET", "/", &[("host", "[::1]:80")])),
            "::1"
        );
        assert_eq!(request_host(&req("GET", "/", &[])), "");
    }

    #[test]
    fn strip_prefix_keeps_a_path() {
        let r = route("path = \"/api/\"\nstrip_prefix = \"/api\"\nupstream = \"api\"");
        assert_eq!(
            r.forwarded_path("/api/users?x=1").as_deref(),
            Some("/users?x=1")
        );
        assert_eq!(r.forwarded_path("/api").as_deref(), Some("/"));
        assert_eq!(r.forwarded_path("/other"), None);
    }

    #[test]
    fn keys_come_from_where_they_say() {
        let ip: Option<IpAddr> = Some("10.1.2.3".parse().unwrap());
        let r = req(
            "GET",
            "/p?a=1&id=42",
            &[("cookie", "x=1; session=abc"), ("x-user", "u7")],
        );
        let key = |text: &str| HashKey::from(&config::HashKey::parse(text).unwrap());
        assert_eq!(key("cookie:session").of(&r, ip), b"abc");
        assert_eq!(key("query:id").of(&r, ip), b"42");
        assert_eq!(key("header:x-user").of(&r, ip), b"u7");
        assert_eq!(key("uri").of(&r, ip), b"/p?a=1&id=42");
        for text in [
            "client_ip",
            "uri",
            "header:x-user",
            "cookie:session",
            "query:id",
        ] {
            assert_eq!(key(text).to_string(), text, "the file's words, back");
        }
        assert_eq!(
            key("cookie:none").of(&r, ip),
            b"10.1.2.3",
            "absent: the client"
        );
    }

    #[test]
    fn header_edits_fill_in_variables() {
        let r = route("upstream = \"a\"\nrequest_headers = { set = { \"X-Env\" = \"prod\", \"X-From\" = \"{client_ip} {host}{path} {request_id}\" }, remove = [\"X-Debug\"] }");
        let mut q = req("GET", "/a?b", &[("x-debug", "1"), ("x-env", "dev")]);
        let vars = Vars {
            client_ip: Some("10.0.0.9".parse().unwrap()),
            host: "h.example",
            path_and_query: "/a?b",
            request_id: "rid",
        };
        r.request_headers.apply_request(&mut q, &vars).unwrap();
        assert!(q.headers.get("x-debug").is_none());
        assert_eq!(q.headers["x-env"], "prod");
        assert_eq!(q.headers["x-from"], "10.0.0.9 h.example/a?b rid");
    }
}
