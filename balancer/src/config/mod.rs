//! The balancer's TOML configuration: its types, its defaults, and the error
//! messages that point at the file, line and key of a mistake.
//!
//! The file is deserialised once into types that cannot hold an invalid value
//! (durations, socket addresses, non-empty server lists), then checked as a
//! whole (a route naming a group that does not exist, a variable nobody
//! knows), so the rest of the program never re-checks it. What a valid file
//! becomes at run time is `runtime`'s, and so is watching and reloading it
//! (`runtime::reload`). It uses no other module of the crate.

mod compression;
pub mod diff;
mod extensions;
mod host;
mod routes;
mod tls;
mod units;

pub use compression::{Compression, Encoding, Levels, TypePattern};
pub use extensions::ExtensionDecl;
pub use host::{Authority, ServerAddr};
pub use routes::{
    Action, HashKey, HeaderEdits, HeaderMatch, HostPattern, Part, RateLimit, Redirect, Respond,
    Route, Template, Variable,
};
pub use tls::{
    Acme, AcmeDirectory, AcmeDomains, CertificateFor, Protocol, Secret, Tls, TlsVersion,
};
use units::{header_timeout, optional_socket_addr, socket_addr};
pub use units::{ByteSize, Positive, Span, UriPath, MAX_HEADER_TIMEOUT};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use serde::{de, Deserialize, Deserializer};

use diff::{Keys, Section};

/// A whole configuration file, as it is in force.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The client listeners are opened with `SO_REUSEPORT`, so that a second
    /// balancer on the same host and port (the next version, in a rolling
    /// update on the host network) shares the new connections with this one
    /// until it stops. Off, a second one fails to start: the port is taken.
    #[serde(default)]
    pub reuse_port: bool,
    /// Metrics and status; off when absent.
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads of the proxy; `None` means one per CPU.
    #[serde(default)]
    pub threads: Option<NonZeroU32>,
    /// The access log's format: one `text` line or one `json` object per request.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Whether probes of `/health-check` (Docker's, every few seconds) are access-logged.
    #[serde(default)]
    pub log_health_checks: bool,
    /// A file holding the token that `PURGE` on the admin listener must carry
    /// (`Authorization: Bearer TOKEN`); `BALANCER_ADMIN_TOKEN` is the other way
    /// to give it. The token itself is never written in this file.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// How long the drain that follows SIGTERM (and `shutdown_delay`) waits
    /// for in-flight requests before the process exits.
    #[serde(default = "default_grace_period")]
    pub grace_period: Positive,
    /// How long after SIGTERM the balancer goes on accepting and serving as
    /// usual before it drains: an orchestrator keeps routing new connections
    /// to a stopping task for a moment after it signals it.
    #[serde(default)]
    pub shutdown_delay: Span,
    /// The upstream group named `default`: where requests no route claims go.
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// More upstream groups, by name; routes send requests to them.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Tried in file order; the first that matches a request decides where it goes.
    #[serde(default, rename = "route")]
    pub routes: Vec<toml::Spanned<Route>>,
    /// HTTPS: a TLS listener with its certificates; absent: plain HTTP only.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// HTTP/2 in clear text (prior knowledge, "h2c") on the plain listener.
    #[serde(default)]
    pub http2_cleartext: bool,
    /// What a client may send.
    #[serde(default)]
    pub limits: Limits,
    /// Response caching; absent: nothing is cached.
    #[serde(default)]
    pub cache: Option<Cache>,
    /// Response compression; absent: nothing is compressed.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// Extension instances by name: `[extensions.NAME]` with `kind` and the
    /// kind's settings. Routes list the ones they run.
    #[serde(default)]
    pub extensions: BTreeMap<String, toml::Spanned<ExtensionDecl>>,
    /// Instances that run for every request (before the route's own),
    /// requests that match no route included.
    #[serde(default)]
    pub global_extensions: Vec<toml::Spanned<String>>,
}

impl Section for Config {
    /// The listeners, the thread count and the cache's bounds are set up
    /// once, at start; the rest is compiled anew by every reload.
    fn keys(&mut self, old: &Self, keys: &mut Keys) {
        let Config {
            listen,
            reuse_port,
            admin_listen,
            threads,
            log_format,
            log_health_checks,
            admin_token_file,
            grace_period,
            shutdown_delay,
            upstream,
            upstreams,
            routes,
            tls,
            http2_cleartext,
            limits,
            cache,
            compression,
            extensions,
            global_extensions,
        } = self;
        keys.restart("listen", listen, &old.listen, ToString::to_string);
        keys.restart(
            "reuse_port",
            reuse_port,
            &old.reuse_port,
            ToString::to_string,
        );
        keys.restart("admin_listen", admin_listen, &old.admin_listen, |a| {
            diff::shown(a, "(off)")
        });
        keys.restart("threads", threads, &old.threads, |t| {
            diff::shown(t, "(one per CPU)")
        });
        keys.live("log_format", log_format);
        keys.live("log_health_checks", log_health_checks);
        keys.live("admin_token_file", admin_token_file);
        keys.live("grace_period", grace_period);
        keys.live("shutdown_delay", shutdown_delay);
        // Groups and routes are rebuilt from their sections on every reload.
        keys.live("upstream", upstream);
        keys.live("upstreams", upstreams);
        keys.live("route", routes);
        keys.restart_section("tls", tls, &old.tls);
        keys.restart(
            "http2_cleartext",
            http2_cleartext,
            &old.http2_cleartext,
            ToString::to_string,
        );
        keys.section("limits", limits, &old.limits);
        keys.live_section("cache", cache, &old.cache);
        keys.live_section("compression", compression, &old.compression);
        // Instances are built again when their section (or a file) changed.
        keys.live("extensions", extensions);
        keys.live("global_extensions", global_extensions);
    }
}

/// Bounds on what clients may send, and on how long an idle client is kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The request line and headers together; beyond it: 431.
    pub max_header_size: ByteSize,
    /// Header fields in one request; beyond it: 431.
    pub max_headers: u32,
    /// A request body (declared or received); beyond it: 413.
    pub max_body_size: ByteSize,
    /// An idle keep-alive client connection is closed after this long.
    pub keepalive_timeout: Positive,
    /// How long a client has to send a whole request head: from the accept
    /// for a connection's first request, from the first byte for later ones.
    /// Beyond it: 408 (or, when nothing was received, a silent close).
    #[serde(deserialize_with = "header_timeout")]
    pub client_header_timeout: Positive,
    /// Client connections open at once; beyond it a new one is answered 503
    /// and closed.
    pub max_connections: NonZeroU32,
    /// After an answer sent before its request was read whole (413, 431,
    /// 400, 408, ...), what the client still sends is read and discarded for
    /// at most this long before the connection is closed (nginx's
    /// `lingering_time`), so that the client can read the answer.
    pub lingering_time: Positive,
    /// ... and the connection is closed sooner when the client sends
    /// nothing for this long (nginx's `lingering_timeout`).
    pub lingering_timeout: Positive,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_size: ByteSize(32 << 10),
            max_headers: 100,
            max_body_size: ByteSize(8 << 20),
            keepalive_timeout: Positive::secs(60),
            client_header_timeout: Positive::secs(10),
            max_connections: NonZeroU32::new(4096).expect("not zero"),
            lingering_time: Positive::secs(30),
            lingering_timeout: Positive::secs(5),
        }
    }
}

impl Section for Limits {
    /// Each is read per connection or per request.
    fn keys(&mut self, _old: &Self, keys: &mut Keys) {
        let Limits {
            max_header_size,
            max_headers,
            max_body_size,
            keepalive_timeout,
            client_header_timeout,
            max_connections,
            lingering_time,
            lingering_timeout,
        } = self;
        keys.live("max_header_size", max_header_size);
        keys.live("max_headers", max_headers);
        keys.live("max_body_size", max_body_size);
        keys.live("keepalive_timeout", keepalive_timeout);
        keys.live("client_header_timeout", client_header_timeout);
        keys.live("max_connections", max_connections);
        keys.live("lingering_time", lingering_time);
        keys.live("lingering_timeout", lingering_timeout);
    }
}

/// The response cache: its bounds and the rules that say what is cached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Memory bound of all stored responses; least-recently-used ones are evicted beyond it.
    #[serde(default = "default_cache_size")]
    pub max_size: ByteSize,
    /// Larger responses are passed through, not stored.
    #[serde(default = "default_object_size")]
    pub max_object_size: ByteSize,
    /// The paths that are cached; a request matches the rule with the longest prefix.
    #[serde(default, rename = "rule")]
    pub rules: Vec<CacheRule>,
}

impl Default for Cache {
    /// The bounds of a `[cache]` section that sets none, and no rules.
    fn default() -> Self {
        Cache {
            max_size: default_cache_size(),
            max_object_size: default_object_size(),
            rules: Vec::new(),
        }
    }
}

impl Section for Cache {
    /// The store is sized once, when the process starts; the rules are
    /// read per request.
    fn keys(&mut self, old: &Self, keys: &mut Keys) {
        let Cache {
            max_size,
            max_object_size,
            rules,
        } = self;
        keys.restart("max_size", max_size, &old.max_size, ToString::to_string);
        keys.restart(
            "max_object_size",
            max_object_size,
            &old.max_object_size,
            ToString::to_string,
        );
        keys.live("rule", rules);
    }
}

/// What is cached under one path prefix, and for how long.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    pub path: UriPath,
    /// Freshness of a 200 response whose origin gives none. Left out, only
    /// responses with explicit freshness, or a heuristic one from
    /// `Last-Modified` (RFC 9111, section 4.2.2), are stored.
    #[serde(default)]
    pub ttl: Option<Positive>,
    /// After expiry, serve the stale copy while one background refresh runs.
    #[serde(default)]
    pub stale_while_revalidate: Span,
    /// After expiry, serve the stale copy when the origin is down or answers 5xx.
    #[serde(default)]
    pub stale_if_error: Span,
    /// What clients are told to keep (`Cache-Control: max-age` and `Expires`), like nginx's `expires`.
    #[serde(default)]
    pub client_max_age: Option<Span>,
    /// Store responses that carry `Set-Cookie`, cookie included, and send
    /// it with every hit. Off by default (nginx's choice): a cookie set for
    /// one client must not reach another unless it is the same for all.
    #[serde(default)]
    pub store_set_cookie: bool,
}

impl fmt::Display for CacheRule {
    /// The rule in the words of the file: `ttl 30s, stale_while_revalidate 10s, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ttl {
            Some(ttl) => write!(f, "ttl {ttl}, ")?,
            None => f.write_str("ttl (the origin's), ")?,
        }
        write!(
            f,
            "stale_while_revalidate {}, stale_if_error {}, client_max_age ",
            humantime::format_duration(self.stale_while_revalidate.0),
            humantime::format_duration(self.stale_if_error.0),
        )?;
        match self.client_max_age {
            Some(age) => humantime::format_duration(age.0).fmt(f)?,
            None => f.write_str("(none)")?,
        }
        if self.store_set_cookie {
            f.write_str(", store_set_cookie")?;
        }
        Ok(())
    }
}

/// The access log's form: one `text` line or one `json` object per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The pool of servers that requests are balanced over.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub servers: Servers,
    /// How a backend is picked among the healthy ones.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// What `consistent_hash` hashes (default: the client's IP address).
    #[serde(default)]
    pub hash_key: Option<toml::Spanned<HashKey>>,
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Positive,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Positive,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Positive,
    /// Active checks; when absent every resolved address takes traffic.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// The backends speak HTTPS.
    #[serde(default)]
    pub tls: bool,
    /// The name sent in SNI and checked against the backend's certificate
    /// (default: the host of each `servers` entry).
    #[serde(default)]
    pub sni: Option<String>,
    /// Check the backend's certificate (default true).
    #[serde(default = "yes")]
    pub verify: bool,
    /// The CA certificates (PEM) the backend's certificate is checked against
    /// (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// What the backends speak: `http1` (default), `h2c` (HTTP/2 in clear
    /// text, for gRPC), `h2` (HTTP/2 over TLS, HTTP/1.1 when they do not offer it).
    #[serde(default)]
    pub protocol: Protocol,
    /// An upgraded connection (a WebSocket) that carries nothing either way
    /// for this long is closed (default 1h).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Positive,
}

fn yes() -> bool {
    true
}

fn default_idle_timeout() -> Positive {
    Positive::secs(3600)
}

/// Active HTTP health checks of every backend address.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_health_path")]
    pub path: UriPath,
    #[serde(default = "default_health_interval")]
    pub interval: Positive,
    #[serde(default = "default_health_timeout")]
    pub timeout: Positive,
    /// Consecutive passes before a backend gets traffic again.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: NonZeroU32,
    /// Consecutive failures before a backend is taken out.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: NonZeroU32,
}

impl Upstream {
    fn validate(&self, key: &str) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
        if self.protocol == Protocol::H2 && !self.tls {
            return Err((
                None,
                format!("{key}.protocol = \"h2\" needs tls = true (for HTTP/2 in clear text, say \"h2c\")"),
            ));
        }
        if self.protocol == Protocol::H2c && self.tls {
            return Err((
                None,
                format!(
                    "{key}.protocol = \"h2c\" is HTTP/2 in clear text; with tls = true say \"h2\""
                ),
            ));
        }
        if let (Some(hash_key), false) =
            (&self.hash_key, self.algorithm == Algorithm::ConsistentHash)
        {
            return Err((
                Some(hash_key.span()),
                format!("{key}.hash_key is only for algorithm = \"consistent_hash\": set that algorithm, or remove hash_key"),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads and parses `path`; the error names the file and the line.
    /// Returns the text too, as the reference that reloads compare against.
    pub fn load(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok((Config::parse(path, &text)?, text))
    }

    /// Parses `text`, which was read from `path` (used in error messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| {
                let position = e.span().map(|span| Position::of(text, span.start));
                // One line: the parser's own messages may span several.
                let message = e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                ConfigError::Invalid {
                    path: path.to_owned(),
                    position,
                    message,
                }
            })
            .and_then(|mut config: Config| {
                let dir = path.parent().map(Path::to_owned).unwrap_or_default();
                for decl in config.extensions.values_mut() {
                    let line = Position::of(text, decl.span().start).line;
                    let decl = decl.get_mut();
                    decl.line = line;
                    decl.dir.clone_from(&dir);
                }
                config
                    .validate()
                    .map_err(|(span, message)| ConfigError::Invalid {
                        path: path.to_owned(),
                        position: span.map(|s| Position::of(text, s.start)),
                        message,
                    })?;
                Ok(config)
            })
    }

    /// The name of the group `[upstream]` is.
    pub const DEFAULT_GROUP: &'static str = "default";

    /// Every upstream group by name, `[upstream]` as `default`.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &Upstream)> {
        self.upstream
            .iter()
            .map(|u| (Config::DEFAULT_GROUP, u))
            .chain(self.upstreams.iter().map(|(n, u)| (n.as_str(), u)))
    }

    /// The names `[tls.acme]` obtains certificates for, each once, in file
    /// order: its list, or (`"routes"`) every exact host of a route or a
    /// `[[tls.certificate_for]]`. Empty without `[tls.acme]`.
    pub fn acme_domains(&self) -> Vec<String> {
        let Some(tls) = &self.tls else {
            return Vec::new();
        };
        let patterns: Vec<&HostPattern> = match tls.acme.as_ref().map(|a| &a.domains) {
            None => return Vec::new(),
            Some(AcmeDomains::List(list)) => list.iter().collect(),
            Some(AcmeDomains::Routes) => self
                .routes
                .iter()
                .filter_map(|r| r.get_ref().host.as_ref())
                .chain(tls.certificate_for.iter().flat_map(|c| &c.hosts))
                .collect(),
        };
        let mut names: Vec<String> = Vec::new();
        for pattern in patterns {
            if let HostPattern::Exact(name) = pattern {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// What no file may say, beyond what its types already refuse: the error
    /// and, where known, the place in the file it is about.
    fn validate(&self) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
        if self.upstream.is_none() && self.upstreams.is_empty() && self.routes.is_empty() {
            return Err((
                None,
                "missing field `upstream`: write an [upstream] section with servers = [\"host:port\"]".to_owned(),
            ));
        }
        for (name, group) in &self.upstreams {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err((
                    None,
                    format!(
                        "upstreams.{name}: a group name is letters, digits, - and _ (at most 64)"
                    ),
                ));
            }
            if name == Config::DEFAULT_GROUP && self.upstream.is_some() {
                return Err((
                    None,
                    "upstreams.default: [upstream] already is the group named default".to_owned(),
                ));
            }
            group.validate(&format!("upstreams.{name}"))?;
        }
        if let Some(group) = &self.upstream {
            group.validate("upstream")?;
        }
        if let Some(tls) = &self.tls {
            tls.validate().map_err(|e| (None, e))?;
            if let Some(acme) = &tls.acme {
                acme.validate().map_err(|e| (None, e))?;
                if acme.domains == AcmeDomains::Routes && self.acme_domains().is_empty() {
                    return Err((None, "tls.acme.domains = \"routes\", but no route or [[tls.certificate_for]] names an exact host".to_owned()));
                }
            }
        }
        for route in &self.routes {
            route
                .get_ref()
                .validate(|name| self.groups().any(|(n, _)| n == name))
                .map_err(|message| (Some(route.span()), message))?;
        }
        self.validate_extensions()
    }

    /// Instance names are well formed, and every list names declared ones.
    fn validate_extensions(&self) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
        for (name, decl) in &self.extensions {
            if !extensions::valid_name(name) {
                return Err((
                    Some(decl.span()),
                    format!("extensions.{name}: an instance name is letters, digits, - and _ (at most 64)"),
                ));
            }
        }
        let declared = || {
            let names: Vec<&str> = self.extensions.keys().map(String::as_str).collect();
            if names.is_empty() {
                "no [extensions.NAME] is declared".to_owned()
            } else {
                format!("declared: {}", names.join(", "))
            }
        };
        let lists = self
            .global_extensions
            .iter()
            .map(|n| ("global_extensions", n))
            .chain(self.routes.iter().flat_map(|r| {
                r.get_ref()
                    .extensions
                    .iter()
                    .map(|n| ("route's extensions", n))
            }));
        for (list, name) in lists {
            if !self.extensions.contains_key(name.get_ref()) {
                return Err((
                    Some(name.span()),
                    format!(
                        "{list} names {:?}, which is not an extension instance: declare it as [extensions.{}] with its kind ({})",
                        name.get_ref(),
                        name.get_ref(),
                        declared()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What is valid but probably not meant: a route that an earlier one
    /// makes unreachable, with both places.
    pub fn warnings(&self, text: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for (j, later) in self.routes.iter().enumerate() {
            if let Some(earlier) = self.routes[..j]
                .iter()
                .find(|earlier| earlier.get_ref().shadows(later.get_ref()))
            {
                let line = |r: &toml::Spanned<Route>| Position::of(text, r.span().start).line;
                warnings.push(format!(
                    "the route at line {} ({}) is unreachable: the route at line {} ({}) matches every request it would",
                    line(later),
                    later.get_ref().label(j),
                    line(earlier),
                    earlier.get_ref().label(self.routes.iter().position(|r| std::ptr::eq(r, earlier)).unwrap_or(0)),
                ));
            }
        }
        warnings
    }

    pub fn threads(&self) -> usize {
        match self.threads {
            Some(n) => n.get() as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), position.as_ref().map(ToString::to_string).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        position: Option<Position>,
        message: String,
    },
}

/// Where in the file a mistake is, with the text of its line (which shows the key).
#[derive(Debug)]
pub struct Position {
    pub line: usize,
    pub column: usize,
    pub text: String,
}

impl Position {
    fn of(text: &str, offset: usize) -> Position {
        let offset = offset.min(text.len());
        let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
        Position {
            line: text[..offset].matches('\n').count() + 1,
            column: text[line_start..offset].chars().count() + 1,
            text: text[line_start..line_end].trim().chars().take(80).collect(),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ", line {}, column {}", self.line, self.column)?;
        if !self.text.is_empty() {
            write!(f, " (`{}`)", self.text)?;
        }
        Ok(())
    }
}

/// How a group picks a backend among its healthy ones. Every algorithm
/// honours the servers' weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Smooth weighted round-robin (nginx's): no bursts to one server.
    #[default]
    RoundRobin,
    /// The fewest requests in flight for its weight; ties by round-robin.
    LeastConnections,
    /// Ketama: a key keeps its backend while the set of backends stays.
    ConsistentHash,
    /// Weighted random.
    Random,
}

/// One entry of `servers`: an address (a DNS name stands for every address it
/// resolves to) and its weight, the share of requests it takes relative to
/// the others (default 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub addr: ServerAddr,
    pub weight: NonZeroU32,
}

/// The heaviest weight a server may have: with consistent hashing each unit
/// is 160 points on the ring.
pub const MAX_WEIGHT: u32 = 1000;

/// A non-empty list of servers.
#[derive(Debug, Clone, PartialEq)]
pub struct Servers(Vec<ServerEntry>);

impl Servers {
    pub fn iter(&self) -> impl Iterator<Item = &ServerEntry> {
        self.0.iter()
    }

    pub fn addrs(&self) -> impl Iterator<Item = &ServerAddr> {
        self.0.iter().map(|s| &s.addr)
    }
}

impl<'de> Deserialize<'de> for Servers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Address(String),
            Weighted(WeightedRaw),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct WeightedRaw {
            address: String,
            #[serde(default)]
            weight: Option<u32>,
        }
        let list = Vec::<Raw>::deserialize(d).map_err(|_| {
            de::Error::custom(
                "servers must be a list of \"host:port\" strings or { address = \"host:port\", weight = N } tables",
            )
        })?;
        if list.is_empty() {
            return Err(de::Error::custom(
                "upstream.servers is empty; name at least one host:port",
            ));
        }
        let mut servers: Vec<ServerEntry> = Vec::with_capacity(list.len());
        for entry in list {
            let (text, weight) = match entry {
                Raw::Address(text) => (text, 1),
                Raw::Weighted(w) => (w.address, w.weight.unwrap_or(1)),
            };
            let addr = ServerAddr::parse(&text).map_err(de::Error::custom)?;
            let weight = NonZeroU32::new(weight)
                .filter(|w| w.get() <= MAX_WEIGHT)
                .ok_or_else(|| {
                    de::Error::custom(format!(
                        "server {text:?}: weight {weight} must be from 1 to {MAX_WEIGHT}"
                    ))
                })?;
            if servers.iter().any(|s| s.addr == addr) {
                return Err(de::Error::custom(format!(
                    "server {text:?} is listed twice"
                )));
            }
            servers.push(ServerEntry { addr, weight });
        }
        Ok(Servers(servers))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}
fn default_grace_period() -> Positive {
    Positive::secs(5)
}
fn default_resolve_interval() -> Positive {
    Positive::secs(5)
}
fn default_connect_timeout() -> Positive {
    Positive::secs(2)
}
fn default_read_timeout() -> Positive {
    Positive::secs(60)
}
fn default_health_path() -> UriPath {
    UriPath("/health".to_owned())
}
fn default_health_interval() -> Positive {
    Positive::secs(2)
}
fn default_health_timeout() -> Positive {
    Positive::secs(1)
}
fn default_cache_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_object_size() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_threshold() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("lb.toml"), text).map_err(|e| e.to_string())
    }

    const ACME: &str = "[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\n[tls.acme]\ndirectory = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\nstorage = \"/var/lib/balancer/acme\"\n";

    #[test]
    fn an_acme_section_makes_the_default_certificate_optional() {
        let config = parse(&format!(
            "{ACME}domains = [\"www.example.com\", \"API.example.com\"]\n"
        ))
        .expect("[tls.acme] without certificate or private_key is valid");
        let tls = config.tls.as_ref().expect("[tls]");
        assert_eq!(tls.default_pair(), None);
        assert_eq!(
            config.acme_domains(),
            ["www.example.com", "api.example.com"]
        );
        let acme = tls.acme.as_ref().expect("[tls.acme]");
        assert_eq!(acme.renew_before, None, "default: a third of the lifetime");
        let e = parse("[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\n")
            .expect_err("no certificate, no acme");
        assert!(e.contains("missing certificate and private_key"), "{e}");
        let e = parse("[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\ncertificate = \"c.pem\"\n")
            .expect_err("a certificate without its key");
        assert!(e.contains("without private_key"), "{e}");
    }

    #[test]
    fn acme_domains_from_routes_are_their_exact_hosts() {
        let text = format!(
            "{ACME}domains = \"routes\"\n[[tls.certificate_for]]\nhosts = [\"b.example.com\", \"*.w.example.com\"]\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n\
             [[route]]\nhost = \"a.example.com\"\nupstream = \"default\"\n[[route]]\nhost = \"*.example.org\"\nupstream = \"default\"\n[[route]]\nhost = \"a.example.com\"\npath = \"/x\"\nupstream = \"default\"\n"
        );
        let config = parse(&text).expect("valid");
        assert_eq!(config.acme_domains(), ["a.example.com", "b.example.com"]);
        let e =
            parse(&format!("{ACME}domains = \"routes\"\n")).expect_err("no exact host anywhere");
        assert!(
            e.contains("no route or [[tls.certificate_for]] names an exact host"),
            "{e}"
        );
    }

    #[test]
    fn acme_mistakes_are_named() {
        // The section without its directory, then each mistake.
        let base = ACME.replace(
            "directory = \"https://acme-staging-v02.api.letsencrypt.org/directory\"\n",
            "",
        );
        let directory = "directory = \"https://ca.example/dir\"\n";
        let named = "domains = [\"a.example.com\"]\n";
        for (mistake, expected) in [
            (
                format!("directory = \"http://ca.example/dir\"\n{named}"),
                "an https:// URL",
            ),
            (
                format!("{directory}domains = \"all\"\n"),
                "a list of host names, or \"routes\"",
            ),
            (
                format!("{directory}domains = [\"*.example.com\"]\n"),
                "wildcard",
            ),
            (
                format!("{directory}domains = [\"10.0.0.1\"]\n"),
                "not a public DNS name",
            ),
            (format!("{directory}domains = []\n"), "is empty"),
            (
                format!("{directory}{named}eab_kid = \"kid\"\n"),
                "go together",
            ),
            (
                format!("{directory}{named}eab_hmac_key = {{ env = \"K\" }}\n"),
                "go together",
            ),
            (
                format!("{directory}{named}renew_before = \"soon\"\n"),
                "invalid duration",
            ),
            (format!("{directory}{named}email = 3\n"), "invalid type"),
        ] {
            let e = parse(&format!("{base}{mistake}")).expect_err(&mistake);
            assert!(
                e.contains(expected),
                "{mistake}: expected {expected:?} in {e}"
            );
        }
        let config = parse(&format!(
            "{ACME}domains = [\"a.example.com\"]\neab_kid = \"kid\"\neab_hmac_key = {{ file = \"/run/secrets/eab\" }}\nrenew_before = \"30d\"\n"
        ))
        .expect("valid");
        let acme = config.tls.and_then(|t| t.acme).expect("[tls.acme]");
        assert_eq!(
            acme.eab_hmac_key,
            Some(Secret::File("/run/secrets/eab".into()))
        );
        assert_eq!(
            acme.renew_before,
            Some(Span(Duration::from_secs(30 * 86400)))
        );
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let c = parse(
            r#"
listen = "0.0.0.0:80"
admin_listen = "127.0.0.1:9000"
threads = 2

[upstream]
servers = ["backend:8000", "10.0.0.2:8000", "[::1]:8001"]
resolve_interval = "5s"
connect_timeout = "2s"
read_timeout = "60s"

[upstream.health_check]
path = "/health"
interval = "500ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 3
"#,
        )
        .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(c.threads(), 2);
        let servers: Vec<String> = c
            .upstream
            .as_ref()
            .unwrap()
            .servers
            .addrs()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(servers, ["backend:8000", "10.0.0.2:8000", "[::1]:8001"]);
        assert_eq!(
            c.upstream
                .as_ref()
                .unwrap()
                .servers
                .addrs()
                .nth(2)
                .unwrap()
                .literal(),
            Some("[::1]:8001".parse().unwrap())
        );
        let hc = c.upstream.clone().unwrap().health_check.unwrap();
        assert_eq!(hc.interval.0, Duration::from_millis(500));
        assert_eq!(hc.unhealthy_threshold.get(), 3);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse("[upstream]\nservers = [\"backend:8000\"]\n").unwrap();
        assert_eq!(c.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(c.admin_listen, None);
        assert_eq!(
            c.upstream.as_ref().unwrap().resolve_interval.0,
            Duration::from_secs(5)
        );
        assert_eq!(
            c.upstream.as_ref().unwrap().read_timeout.0,
            Duration::from_secs(60)
        );
        assert!(c.upstream.as_ref().unwrap().health_check.is_none());
        assert_eq!(c.limits.client_header_timeout.0, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections.get(), 4096);
        let hc = parse("[upstream]\nservers = [\"b:1\"]\n[upstream.health_check]\n")
            .unwrap()
            .upstream
            .unwrap()
            .health_check
            .unwrap();
        assert_eq!(hc.path.as_str(), "/health");
        assert_eq!(hc.healthy_threshold.get(), 2);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key_or_value() {
        let cases = [
            (
                "[upstream]\nservers = [\"b:1\"]\ntiemout = \"1s\"\n",
                "line 3",
                "tiemout",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\nread_timeout = \"5 parsecs\"\n",
                "line 3",
                "5 parsecs",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\nread_timeout = \"0s\"\n",
                "line 3",
                "greater than zero",
            ),
            (
                "listen = \"localhost\"\n[upstream]\nservers = [\"b:1\"]\n",
                "line 1",
                "localhost",
            ),
            ("[upstream]\n\nservers = []\n", "line 3", "empty"),
            (
                "[upstream]\nservers = [\"backend\"]\n",
                "line 2",
                "\"backend\"",
            ),
            (
                "[upstream]\nservers = [\"backend:99999\"]\n",
                "line 2",
                "port",
            ),
            (
                "[upstream]\nservers = [\"b:1\", \"b:1\"]\n",
                "line 2",
                "twice",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\n[upstream.health_check]\npath = \"health\"\n",
                "line 4",
                "\"health\"",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\n[upstream.health_check]\nhealthy_threshold = 0\n",
                "line 4",
                "healthy_threshold",
            ),
            (
                "threads = \"two\"\n[upstream]\nservers = [\"b:1\"]\n",
                "line 1",
                "threads",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\n[limits]\nclient_header_timeout = \"2m\"\n",
                "line 4",
                "client_header_timeout 2m is longer than the 60s allowed",
            ),
            (
                "[upstream]\nservers = [\"b:1\"]\n[limits]\nmax_connections = 0\n",
                "line 4",
                "max_connections",
            ),
            ("listen = \"0.0.0.0:80\"\n", "lb.toml", "upstream"),
            ("[upstream\nservers = [\"b:1\"]\n", "line 1", "lb.toml"),
        ];
        for (text, place, what) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                err.starts_with("lb.toml"),
                "{err:?} should start with the file name"
            );
            assert!(
                err.contains(place),
                "{err:?} should contain {place:?} for {text:?}"
            );
            assert!(
                err.contains(what),
                "{err:?} should mention {what:?} for {text:?}"
            );
        }
    }

    #[test]
    fn a_route_is_one_action_and_its_mistakes_name_their_line() {
        let base = "[upstream]\nservers = [\"b:1\"]\n\n[[route]]\npath = \"/x\"\n";
        let c = parse(&format!(
            "{base}upstream = \"default\"\nstrip_prefix = \"/x\"\n\n[[route]]\n[route.redirect]\nlocation = \"https://example.com{{path}}\"\n\n[[route]]\nrespond = {{ status = 503, content_type = \"text/html\" }}\n"
        ))
        .expect("the three actions as the file writes them");
        let actions: Vec<&Action> = c.routes.iter().map(|r| &r.get_ref().action).collect();
        assert!(
            matches!(actions[0], Action::Upstream { group, strip_prefix: Some(p) } if group == "default" && p.as_str() == "/x")
        );
        assert!(matches!(actions[1], Action::Redirect(r) if r.status == 308));
        assert!(matches!(actions[2], Action::Respond(r) if r.content_type == "text/html"));
        for (text, what) in [
            ("upstrem = \"default\"\n", "unknown field `upstrem`"),
            ("", "does nothing"),
            (
                "upstream = \"default\"\nrespond = { status = 200 }\n",
                "more than one",
            ),
            (
                "respond = { status = 200 }\nstrip_prefix = \"/x\"\n",
                "strip_prefix applies to forwarded requests only",
            ),
            (
                "respond = { status = 200, content_type = \"text/plain\\u0001\" }\n",
                "respond.content_type",
            ),
            (
                "upstream = \"default\"\nheaders = { \"X-A\" = \"a\\u0001\" }\n",
                "not a valid header value",
            ),
        ] {
            let err = parse(&format!("{base}{text}")).expect_err(text);
            assert!(err.contains(what), "{text:?}: expected {what:?} in {err}");
            let line: usize = err
                .split(", line ")
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no line in {err}"));
            assert!(
                (4..=7).contains(&line),
                "{text:?}: the error names line {line}, not one of the route's: {err}"
            );
        }
    }

    #[test]
    fn the_cache_section_parses_and_is_optional() {
        let c = parse(
            r#"
[upstream]
servers = ["b:1"]
[cache]
max_size = "64MiB"
max_object_size = 4096
[[cache.rule]]
path = "/cache-me"
ttl = "30s"
stale_while_revalidate = "10s"
stale_if_error = "5m"
client_max_age = "20s"
store_set_cookie = true
[[cache.rule]]
path = "/static/"
ttl = "1h"
"#,
        )
        .unwrap();
        let cache = c.cache.unwrap();
        assert_eq!(cache.max_size, ByteSize(64 << 20));
        assert_eq!(cache.max_object_size, ByteSize(4096));
        assert_eq!(cache.rules.len(), 2);
        assert_eq!(cache.rules[0].stale_if_error.0, Duration::from_secs(300));
        assert_eq!(
            cache.rules[0].client_max_age,
            Some(Span(Duration::from_secs(20)))
        );
        assert_eq!(cache.rules[1].stale_while_revalidate.0, Duration::ZERO);
        assert_eq!(cache.rules[1].client_max_age, None);
        assert!(cache.rules[0].store_set_cookie);
        assert!(!cache.rules[1].store_set_cookie, "off unless asked for");
        let without_ttl =
            parse("[upstream]\nservers = [\"b:1\"]\n[[cache.rule]]\npath = \"/x\"\n").unwrap();
        assert_eq!(without_ttl.cache.unwrap().rules[0].ttl, None);
        assert!(parse("[upstream]\nservers = [\"b:1\"]\n")
            .unwrap()
            .cache
            .is_none());
        for (text, what) in [
            ("[cache]\nmax_size = \"64 parsecs\"\n", "64 parsecs"),
            ("[cache]\nmax_size = 0\n", "size"),
            ("[[cache.rule]]\npath = \"/x\"\nttl = \"0s\"\n", "ttl"),
            (
                "[[cache.rule]]\npath = \"/x\"\nttl = \"1s\"\nswr = \"1s\"\n",
                "swr",
            ),
        ] {
            let err = parse(&format!("[upstream]\nservers = [\"b:1\"]\n{text}")).expect_err(text);
            assert!(err.contains(what), "{err:?} should mention {what:?}");
        }
        assert_eq!(ByteSize::parse("1GiB"), Ok(ByteSize(1 << 30)));
        assert!(ByteSize::parse("99999999999999999999GiB").is_err());
    }

    #[test]
    fn server_addresses_are_host_and_port() {
        let backend = ServerAddr::parse("backend:8000").unwrap();
        assert_eq!((backend.host(), backend.port()), ("backend", 8000));
        assert!(ServerAddr::parse("backend:8000")
            .unwrap()
            .literal()
            .is_none());
        assert_eq!(ServerAddr::parse("[::1]:80").unwrap().host(), "::1");
        for bad in [
            "",
            ":80",
            "backend:",
            "backend:0",
            "::1:80",
            "[zz]:80",
            "a b:80",
            "back/end:80",
        ] {
            assert!(
                ServerAddr::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
