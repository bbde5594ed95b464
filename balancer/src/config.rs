//! The balancer's TOML configuration: its types, its defaults, and the error
//! messages that point at the file, line and key of a mistake.
//!
//! The file is deserialised once into types that cannot hold an invalid value
//! (durations, socket addresses, non-empty server lists), so the rest of the
//! program never re-checks them. It does not watch or reload the file.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// A whole configuration file, as it is in force.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
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
    /// How long SIGTERM waits for in-flight requests before the process exits.
    #[serde(default = "default_grace_period")]
    pub grace_period: Positive,
    pub upstream: Upstream,
    /// What a client may send.
    #[serde(default)]
    pub limits: Limits,
    /// Response caching; absent: nothing is cached.
    #[serde(default)]
    pub cache: Option<Cache>,
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

/// What is cached under one path prefix, and for how long.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    pub path: UriPath,
    /// Freshness of a 200 response whose origin gives none.
    pub ttl: Positive,
    /// After expiry, serve the stale copy while one background refresh runs.
    #[serde(default)]
    pub stale_while_revalidate: Span,
    /// After expiry, serve the stale copy when the origin is down or answers 5xx.
    #[serde(default)]
    pub stale_if_error: Span,
    /// What clients are told to keep (`Cache-Control: max-age` and `Expires`), like nginx's `expires`.
    #[serde(default)]
    pub client_max_age: Option<Span>,
}

impl fmt::Display for CacheRule {
    /// The rule in the words of the file: `ttl 30s, stale_while_revalidate 10s, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ttl {}, stale_while_revalidate {}, stale_if_error {}, client_max_age ",
            self.ttl,
            humantime::format_duration(self.stale_while_revalidate.0),
            humantime::format_duration(self.stale_if_error.0),
        )?;
        match self.client_max_age {
            Some(age) => humantime::format_duration(age.0).fmt(f),
            None => f.write_str("(none)"),
        }
    }
}

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
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: Positive,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Positive,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: Positive,
    /// Active checks; when absent every resolved address takes traffic.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
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
        toml::from_str(text).map_err(|e| {
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

/// A duration written as a human string (`500ms`, `2s`, `5m`), greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positive(pub Duration);

impl Positive {
    const fn secs(s: u64) -> Positive {
        Positive(Duration::from_secs(s))
    }
}

impl fmt::Display for Positive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = parse_duration(&text).map_err(de::Error::custom)?;
        if duration.is_zero() {
            return Err(de::Error::custom(format!(
                "duration {text:?} must be greater than zero"
            )));
        }
        Ok(Positive(duration))
    }
}

/// Pingora waits at most this long for each read of a new connection's
/// request head, so a longer `client_header_timeout` could never apply.
pub const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

fn header_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Positive, D::Error> {
    let timeout = Positive::deserialize(d)?;
    if timeout.0 > MAX_HEADER_TIMEOUT {
        return Err(de::Error::custom(format!(
            "client_header_timeout {timeout} is longer than the 60s allowed"
        )));
    }
    Ok(timeout)
}

/// A duration that may be zero, written like [`Positive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map(Span).map_err(de::Error::custom)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}); write a number and a unit, like \"500ms\", \"2s\" or \"5m\"")
    })
}

/// A size in bytes, written `1048576`, `"512KiB"`, `"64MiB"` or `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "KB" | "k" => 1 << 10,
            "MiB" | "M" | "MB" => 1 << 20,
            "GiB" | "G" | "GB" => 1 << 30,
            _ => 0,
        };
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .filter(|n| *n > 0)
            .map(ByteSize)
            .ok_or_else(|| {
                format!("invalid size {text:?}; write a positive number with an optional unit, like \"512KiB\", \"64MiB\" or \"1GiB\"")
            })
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => ByteSize::parse(&n.to_string()),
            Raw::Text(t) => ByteSize::parse(&t),
        }
        .map_err(de::Error::custom)
    }
}

/// One entry of `upstream.servers`: a host name or IP address and a port.
/// A host name stands for every address it resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerAddr {
    /// The host as written, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl ServerAddr {
    pub fn parse(text: &str) -> Result<ServerAddr, String> {
        let bad = |why: &str| {
            format!("invalid server {text:?}: {why}; write host:port, like \"backend:8000\" or \"10.0.0.2:8000\"")
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(|| bad("bad IPv6 address"))?,
            None if host.contains(':') => return Err(bad("put an IPv6 address in brackets")),
            None => host,
        };
        let valid_name = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        };
        if !host.contains(':') && !valid_name(host) {
            return Err(bad("the host is not a valid name or address"));
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }

    /// The address itself when the host is an IP literal (no DNS needed).
    pub fn literal(&self) -> Option<SocketAddr> {
        let ip = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A non-empty list of servers.
#[derive(Debug, Clone, PartialEq)]
pub struct Servers(Vec<ServerAddr>);

impl Servers {
    pub fn iter(&self) -> impl Iterator<Item = &ServerAddr> {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for Servers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        if list.is_empty() {
            return Err(de::Error::custom(
                "upstream.servers is empty; name at least one host:port",
            ));
        }
        let mut servers: Vec<ServerAddr> = Vec::with_capacity(list.len());
        for entry in &list {
            let server = ServerAddr::parse(entry).map_err(de::Error::custom)?;
            if servers.contains(&server) {
                return Err(de::Error::custom(format!(
                    "server {entry:?} is listed twice"
                )));
            }
            servers.push(server);
        }
        Ok(Servers(servers))
    }
}

/// An absolute request path such as `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPath(String);

impl UriPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for UriPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let valid = text.starts_with('/')
            && text.parse::<http::uri::PathAndQuery>().is_ok()
            && !text.contains('#');
        if !valid {
            return Err(de::Error::custom(format!(
                "invalid path {text:?}: it must start with / and be a valid URI path, like \"/health\""
            )));
        }
        Ok(UriPath(text))
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid address {text:?}; write IP:port, like \"0.0.0.0:80\" or \"127.0.0.1:9000\""
        ))
    })
}

fn optional_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
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

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("lb.toml"), text).map_err(|e| e.to_string())
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
        let servers: Vec<String> = c.upstream.servers.iter().map(|s| s.to_string()).collect();
        assert_eq!(servers, ["backend:8000", "10.0.0.2:8000", "[::1]:8001"]);
        assert_eq!(
            c.upstream.servers.iter().nth(2).unwrap().literal(),
            Some("[::1]:8001".parse().unwrap())
        );
        let hc = c.upstream.health_check.unwrap();
        assert_eq!(hc.interval.0, Duration::from_millis(500));
        assert_eq!(hc.unhealthy_threshold.get(), 3);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse("[upstream]\nservers = [\"backend:8000\"]\n").unwrap();
        assert_eq!(c.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.upstream.resolve_interval.0, Duration::from_secs(5));
        assert_eq!(c.upstream.read_timeout.0, Duration::from_secs(60));
        assert!(c.upstream.health_check.is_none());
        assert_eq!(c.limits.client_header_timeout.0, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections.get(), 4096);
        let hc = parse("[upstream]\nservers = [\"b:1\"]\n[upstream.health_check]\n")
            .unwrap()
            .upstream
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
        assert!(parse("[upstream]\nservers = [\"b:1\"]\n")
            .unwrap()
            .cache
            .is_none());
        for (text, what) in [
            ("[cache]\nmax_size = \"64 parsecs\"\n", "64 parsecs"),
            ("[cache]\nmax_size = 0\n", "size"),
            ("[[cache.rule]]\npath = \"/x\"\n", "ttl"),
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
        assert_eq!(
            ServerAddr::parse("backend:8000").unwrap(),
            ServerAddr {
                host: "backend".into(),
                port: 8000
            }
        );
        assert!(ServerAddr::parse("backend:8000")
            .unwrap()
            .literal()
            .is_none());
        assert_eq!(ServerAddr::parse("[::1]:80").unwrap().host, "::1");
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
