//! `[[route]]` sections: what a route matches, what it does with a request,
//! and the small languages inside it (host patterns, header templates with
//! variables, hash and rate-limit keys), each parsed once with an error that
//! says how to write it. Matching requests against compiled routes is
//! `routing`'s.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;

use serde::{de, Deserialize, Deserializer};

use super::units::{Positive, UriPath};

/// One `[[route]]`: what it matches, and its one action.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Written")]
pub struct Route {
    /// In logs, metrics and the status page; unnamed routes are `#N` (their position, from 1).
    pub name: Option<String>,
    /// `api.example.com` or `*.example.com`; absent: any host.
    pub host: Option<HostPattern>,
    /// A path prefix (default `/`: every path).
    pub path: UriPath,
    /// Absent: any method.
    pub methods: Option<Vec<Method>>,
    /// Each must be present, with this value unless `*`.
    pub headers: BTreeMap<HeaderName, HeaderMatch>,
    pub action: Action,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub rate_limit: Option<RateLimit>,
    /// `false`: responses to this route's requests are never compressed,
    /// whatever `[compression]` says.
    pub compression: bool,
    /// The extension instances (`[extensions.NAME]`) this route runs, in
    /// order, after the global ones.
    pub extensions: Vec<toml::Spanned<String>>,
}

/// What a route does with the requests it matches: exactly one thing,
/// written as one of three keys (`upstream = "NAME"`, `[route.redirect]`,
/// `[route.respond]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send them to this upstream group, first removing `strip_prefix` from
    /// the front of the path.
    Upstream {
        group: String,
        strip_prefix: Option<UriPath>,
    },
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    Respond(Respond),
}

/// A `[[route]]` as the file writes it: its action is three keys, of which
/// [`Route`] admits exactly one. (serde's `flatten` would read the action as
/// one enum directly, but it cannot refuse unknown keys.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    host: Option<HostPattern>,
    #[serde(default = "root")]
    path: UriPath,
    #[serde(default)]
    methods: Option<Vec<Method>>,
    #[serde(default)]
    headers: BTreeMap<HeaderName, HeaderMatch>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    redirect: Option<Redirect>,
    #[serde(default)]
    respond: Option<Respond>,
    /// Removed from the front of the path before the request is forwarded.
    #[serde(default)]
    strip_prefix: Option<UriPath>,
    #[serde(default)]
    request_headers: HeaderEdits,
    #[serde(default)]
    response_headers: HeaderEdits,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
    #[serde(default = "yes")]
    compression: bool,
    #[serde(default)]
    extensions: Vec<toml::Spanned<String>>,
}

fn yes() -> bool {
    true
}

fn root() -> UriPath {
    UriPath("/".to_owned())
}

impl TryFrom<Written> for Route {
    type Error = String;

    /// One action, and `strip_prefix` only beside `upstream`.
    fn try_from(w: Written) -> Result<Route, String> {
        let name = called(w.name.as_deref());
        let mut strip_prefix = w.strip_prefix;
        let action = match (w.upstream, w.redirect, w.respond) {
            (Some(group), None, None) => Action::Upstream {
                group,
                strip_prefix: strip_prefix.take(),
            },
            (None, Some(redirect), None) => Action::Redirect(redirect),
            (None, None, Some(respond)) => Action::Respond(respond),
            (None, None, None) => {
                return Err(format!(
                    "{name} does nothing: give it exactly one of upstream, redirect or respond"
                ))
            }
            _ => {
                return Err(format!(
                "{name} has more than one of upstream, redirect and respond: give it exactly one"
            ))
            }
        };
        // Still here: the route forwards nothing.
        if strip_prefix.is_some() {
            return Err(format!(
                "{name}: strip_prefix applies to forwarded requests only (it has no upstream)"
            ));
        }
        Ok(Route {
            name: w.name,
            host: w.host,
            path: w.path,
            methods: w.methods,
            headers: w.headers,
            action,
            request_headers: w.request_headers,
            response_headers: w.response_headers,
            rate_limit: w.rate_limit,
            compression: w.compression,
            extensions: w.extensions,
        })
    }
}

/// How an error calls the route named `name`.
fn called(name: Option<&str>) -> String {
    name.map_or_else(|| "this route".to_owned(), |n| format!("route {n:?}"))
}

impl Route {
    /// How logs, metrics and the status page call the route at `index` (from 0).
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("#{}", index + 1))
    }

    /// Checks what a route alone cannot: that its upstream exists.
    pub(super) fn validate(&self, group_exists: impl Fn(&str) -> bool) -> Result<(), String> {
        match &self.action {
            Action::Upstream { group, .. } if !group_exists(group) => {
                let name = called(self.name.as_deref());
                Err(format!(
                    "{name}: upstream {group:?} is not defined; add an [upstreams.{group}] section (or [upstream] for \"default\")"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether every request `later` matches is matched by `self` first.
    pub fn shadows(&self, later: &Route) -> bool {
        let host = match (&self.host, &later.host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a.covers(b),
        };
        let path = later.path.as_str().starts_with(self.path.as_str());
        let methods = match (&self.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        };
        let headers = self.headers.iter().all(|(name, wanted)| {
            later.headers.get(name).is_some_and(|theirs| match wanted {
                HeaderMatch::Present => true,
                HeaderMatch::Equals(_) => theirs == wanted,
            })
        });
        host && path && methods && headers
    }
}

/// What a route's `headers` entry asks of a request's header of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatch {
    /// `"*"`: present, with any value.
    Present,
    /// Present with this value.
    Equals(http::HeaderValue),
}

impl<'de> Deserialize<'de> for HeaderMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "*" {
            return Ok(HeaderMatch::Present);
        }
        http::HeaderValue::from_str(&text)
            .map(HeaderMatch::Equals)
            .map_err(|_| de::Error::custom(format!("{text:?} is not a valid header value")))
    }
}

/// A host a route matches, without port and in lower case: `example.com`,
/// or `*.example.com` for every name below `example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// The suffix, with its leading dot: `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (lower case, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }

    /// Whether every host `other` matches is matched by `self`.
    fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Wildcard(_), HostPattern::Exact(b)) => self.matches(b),
            (HostPattern::Wildcard(a), HostPattern::Wildcard(b)) => b.ends_with(a.as_str()),
            (HostPattern::Exact(_), HostPattern::Wildcard(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let lower = text.trim().to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if !super::host::is_name(name) {
            return Err(de::Error::custom(format!(
                "invalid host {text:?}: write a name without port, like \"api.example.com\" or \"*.example.com\""
            )));
        }
        Ok(if wildcard {
            HostPattern::Wildcard(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }
}

/// An HTTP method, in upper case as it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        http::Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes())
            .map(Method)
            .map_err(|_| {
                de::Error::custom(format!("invalid method {text:?}; write it like \"GET\""))
            })
    }
}

/// A header field name, in lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub http::HeaderName);

impl PartialOrd for HeaderName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HeaderName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_str().cmp(other.0.as_str())
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        header_name(&text)
            .map(HeaderName)
            .map_err(de::Error::custom)
    }
}

fn header_name(text: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| format!("invalid header name {text:?}; write it like \"X-Env\""))
}

/// Headers to set (replacing any of that name) and to remove.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default)]
    pub set: BTreeMap<HeaderName, Template>,
    #[serde(default)]
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A value with variables: `{client_ip}`, `{host}`, `{path}` (with the
/// query) and `{request_id}`, replaced for each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Variable(Variable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variable {
    ClientIp,
    Host,
    Path,
    RequestId,
}

impl Variable {
    const ALL: [(&'static str, Variable); 4] = [
        ("client_ip", Variable::ClientIp),
        ("host", Variable::Host),
        ("path", Variable::Path),
        ("request_id", Variable::RequestId),
    ];
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("in {text:?}: a {{ without its }}"))?;
            let name = &after[..close];
            let variable = Variable::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    format!(
                        "in {text:?}: unknown variable {{{name}}}; the variables are {{client_ip}}, {{host}}, {{path}} and {{request_id}}"
                    )
                })?;
            parts.push(Part::Variable(variable));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The text, when it has no variable.
    pub fn as_fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(text)] => Some(text),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let template = Template::parse(&text).map_err(de::Error::custom)?;
        if let Some(fixed) = template.as_fixed() {
            http::HeaderValue::from_str(fixed)
                .map_err(|_| de::Error::custom(format!("{text:?} is not a valid header value")))?;
        }
        Ok(template)
    }
}

/// `redirect = { location = "https://example.com{path}", status = 308 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub location: Template,
    #[serde(
        default = "default_redirect_status",
        deserialize_with = "redirect_status"
    )]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    308
}

fn redirect_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let status = u16::deserialize(d)?;
    if [301, 302, 303, 307, 308].contains(&status) {
        Ok(status)
    } else {
        Err(de::Error::custom(format!(
            "redirect status {status} is not one of 301, 302, 303, 307, 308"
        )))
    }
}

/// `respond = { status = 503, body = "down for maintenance", content_type = "text/plain" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    #[serde(deserialize_with = "respond_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_content_type", deserialize_with = "content_type")]
    pub content_type: http::HeaderValue,
}

fn default_content_type() -> http::HeaderValue {
    http::HeaderValue::from_static("text/plain; charset=utf-8")
}

fn content_type<'de, D: Deserializer<'de>>(d: D) -> Result<http::HeaderValue, D::Error> {
    let text = String::deserialize(d)?;
    http::HeaderValue::from_str(&text).map_err(|_| {
        de::Error::custom(format!(
            "respond.content_type {text:?} is not a valid header value; write it like \"text/plain; charset=utf-8\""
        ))
    })
}

fn respond_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let status = u16::deserialize(d)?;
    if (200..=599).contains(&status) {
        Ok(status)
    } else {
        Err(de::Error::custom(format!(
            "respond status {status} must be from 200 to 599"
        )))
    }
}

/// `rate_limit = { requests = 100, per = "1s", burst = 50, key = "client_ip" }`:
/// at most `requests + burst` requests per key in each window of `per`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: NonZeroU32,
    #[serde(deserialize_with = "rate_window")]
    pub per: Positive,
    #[serde(default)]
    pub burst: u32,
    #[serde(default)]
    pub key: HashKey,
}

fn rate_window<'de, D: Deserializer<'de>>(d: D) -> Result<Positive, D::Error> {
    let per = Positive::deserialize(d)?;
    if per.0 < std::time::Duration::from_secs(1) {
        return Err(de::Error::custom(format!(
            "rate_limit.per {per} is shorter than the 1s allowed; say requests = 10, per = \"1s\" rather than 1 per 100ms"
        )));
    }
    Ok(per)
}

/// What part of a request keys a hash or a rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    #[default]
    ClientIp,
    /// The path and query.
    Uri,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
}

impl HashKey {
    pub fn parse(text: &str) -> Result<HashKey, String> {
        let bad = || {
            format!(
                "invalid key {text:?}; write client_ip, uri, header:NAME, cookie:NAME or query:NAME"
            )
        };
        let named = |name: &str| (!name.trim().is_empty()).then(|| name.trim().to_owned());
        match text.trim().split_once(':') {
            None if text.trim() == "client_ip" => Ok(HashKey::ClientIp),
            None if text.trim() == "uri" => Ok(HashKey::Uri),
            Some(("header", name)) => header_name(name).map(HashKey::Header),
            Some(("cookie", name)) => named(name).map(HashKey::Cookie).ok_or_else(bad),
            Some(("query", name)) => named(name).map(HashKey::Query).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HashKey::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(text: &str) -> Route {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn templates_know_their_variables() {
        let t = Template::parse("https://example.com{path}?from={client_ip}").unwrap();
        assert_eq!(t.parts.len(), 4);
        assert_eq!(Template::parse("plain").unwrap().as_fixed(), Some("plain"));
        let err = Template::parse("{nope}").unwrap_err();
        assert!(err.contains("unknown variable {nope}"), "{err}");
        assert!(Template::parse("{path")
            .unwrap_err()
            .contains("without its"));
    }

    #[test]
    fn hosts_match_without_case_and_wildcards_match_below() {
        let exact: HostPattern =
            toml::from_str::<BTreeMap<String, HostPattern>>("h = \"API.example.com\"").unwrap()
                ["h"]
                .clone();
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        let wild: HostPattern =
            toml::from_str::<BTreeMap<String, HostPattern>>("h = \"*.example.com\"").unwrap()["h"]
                .clone();
        assert!(wild.matches("a.example.com") && wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com") && !wild.matches("badexample.com"));
        assert!(toml::from_str::<BTreeMap<String, HostPattern>>("h = \"a.com:80\"").is_err());
    }

    #[test]
    fn keys_parse_or_say_how_to_write_them() {
        assert_eq!(HashKey::parse(" uri "), Ok(HashKey::Uri));
        assert_eq!(
            HashKey::parse("cookie:session"),
            Ok(HashKey::Cookie("session".to_owned()))
        );
        for bad in ["ip", "header:", "cookie: ", "header:bad name", "path:x"] {
            assert!(HashKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_earlier_route_shadows_a_narrower_later_one() {
        let all = route("upstream = \"a\"");
        let api = route("path = \"/api/\"\nupstream = \"a\"");
        let api_get = route("path = \"/api/v1\"\nmethods = [\"GET\"]\nupstream = \"a\"");
        let canary =
            route("path = \"/api/\"\nheaders = { \"X-Canary\" = \"1\" }\nupstream = \"a\"");
        let host = route("host = \"*.example.com\"\nupstream = \"a\"");
        let one_host = route("host = \"api.example.com\"\npath = \"/x\"\nupstream = \"a\"");
        assert!(all.shadows(&api));
        assert!(api.shadows(&api_get));
        assert!(!api_get.shadows(&api));
        assert!(
            api.shadows(&canary),
            "no header condition is weaker than one"
        );
        assert!(!canary.shadows(&api));
        assert!(host.shadows(&one_host));
        assert!(!one_host.shadows(&host));
    }
}
