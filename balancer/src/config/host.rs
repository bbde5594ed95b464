//! Hosts: the one reading of a host, and of a host with a port, for every
//! place that parses or checks one: a `servers` entry (`backend:8000`), a
//! route's or a certificate's `host`, a request's `Host` header (what routes
//! match and what the cache key holds) and the SNI an upstream is sent.
//!
//! Text from the file is parsed once into an [`Authority`], with the grammar
//! of `http::uri::Authority` and what a host must be here on top of it (no
//! user info, a bracketed IPv6 address that is one, a name of DNS
//! characters). A request's host is split without a copy
//! ([`Authority::split`]), by the same rules: it is read on every request.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// A host and an optional port, as a URL, a `Host` header or a `servers`
/// entry writes them: `api.example.com`, `api.example.com:8443`,
/// `10.0.0.2:80`, `[::1]:8000`.
///
/// ```
/// use balancer::config::Authority;
///
/// let a: Authority = "[::1]:8000".parse().unwrap();
/// assert_eq!((a.host(), a.port()), ("::1", Some(8000)));
/// assert_eq!(a.to_string(), "[::1]:8000");
/// assert_eq!(Authority::split("API.example.com:8443"), ("API.example.com", Some("8443")));
/// assert!("user@host".parse::<Authority>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Authority {
    /// As written, without the brackets of an IPv6 address.
    host: String,
    port: Option<u16>,
}

impl Authority {
    /// Parses `host` or `host:port`. The error says what is wrong, for the
    /// caller to put beside how to write it.
    pub fn parse(text: &str) -> Result<Authority, String> {
        if text.contains('@') {
            return Err("user info (`user@`) is not part of a host".to_owned());
        }
        let (host, port) = Authority::split(text);
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or("the port must be a number from 1 to 65535")?,
            ),
        };
        if text.starts_with('[') {
            let closed = text.find(']').is_some_and(|end| {
                let rest = &text[end + 1..];
                rest.is_empty() || rest.starts_with(':')
            });
            if !closed || host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("bad IPv6 address".to_owned());
            }
        } else if host.contains(':') {
            return Err("put an IPv6 address in brackets".to_owned());
        } else if !is_name(host) {
            return Err("the host is not a valid name or address".to_owned());
        }
        // What a URI accepts, so that the host can go into a `Host` header
        // and an SNI as it is.
        http::uri::Authority::from_str(text)
            .map_err(|_| "the host is not a valid name or address".to_owned())?;
        Ok(Authority {
            host: host.to_owned(),
            port,
        })
    }

    /// The host, without the brackets of an IPv6 address.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The address itself when the host is an IP literal (no DNS needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// `host[:port]` split into the host (without the brackets of an IPv6
    /// address) and the port's text, without checking either and without a
    /// copy: for what requests send, on every request.
    pub fn split(text: &str) -> (&str, Option<&str>) {
        if let Some(v6) = text.strip_prefix('[') {
            return match v6.split_once(']') {
                Some((host, rest)) => (host, rest.strip_prefix(':')),
                None => (v6, None),
            };
        }
        match text.split_once(':') {
            // More than one colon: an IPv6 address without brackets, no port.
            Some((_, port)) if port.contains(':') => (text, None),
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    }

    /// The authority a request names: its `Host` header, else the authority
    /// of an absolute request-target; empty when it names none. As sent.
    pub fn of_request<'a>(headers: &'a http::HeaderMap, uri: &'a http::Uri) -> &'a str {
        headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(http::uri::Authority::as_str))
            .unwrap_or("")
    }

    /// The host a request is for, as routes and certificates match it:
    /// without port or trailing dot, in lower case.
    pub fn request_host(headers: &http::HeaderMap, uri: &http::Uri) -> String {
        let (host, _) = Authority::split(Authority::of_request(headers, uri));
        host.trim_end_matches('.').to_ascii_lowercase()
    }
}

/// One entry of `upstream.servers`: a host name or IP address and a port.
/// A host name stands for every address it resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerAddr(Authority);

impl ServerAddr {
    pub fn parse(text: &str) -> Result<ServerAddr, String> {
        let bad = |why: &str| {
            format!("invalid server {text:?}: {why}; write host:port, like \"backend:8000\" or \"10.0.0.2:8000\"")
        };
        let authority = Authority::parse(text).map_err(|why| bad(&why))?;
        if authority.port.is_none() {
            return Err(bad("no port"));
        }
        Ok(ServerAddr(authority))
    }

    /// The host as written, without the brackets of an IPv6 address.
    pub fn host(&self) -> &str {
        self.0.host()
    }

    pub fn port(&self) -> u16 {
        // `parse` admits no entry without one.
        self.0.port.unwrap_or_default()
    }

    /// The address itself when the host is an IP literal (no DNS needed).
    pub fn literal(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.0.ip()?, self.port()))
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether `host` is a name of DNS characters (letters, digits, `-`, `.`,
/// and `_`, which service names use), at most 253 long. IPv4 addresses are such names.
pub(super) fn is_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl FromStr for Authority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Authority::parse(text)
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports_parse_and_print_back() {
        for text in [
            "backend",
            "backend:8000",
            "10.0.0.2:80",
            "[::1]:8000",
            "[::1]",
            "svc_a.local:1",
        ] {
            let a = Authority::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(a.to_string(), text);
        }
        let v6 = Authority::parse("[::1]:80").unwrap();
        assert_eq!(v6.ip(), Some("::1".parse().unwrap()));
        assert_eq!(Authority::parse("backend").unwrap().ip(), None);
    }

    #[test]
    fn what_is_not_a_host_is_refused_with_the_reason() {
        for (text, why) in [
            ("", "not a valid name"),
            (":80", "not a valid name"),
            ("backend:", "port"),
            ("backend:0", "port"),
            ("backend:99999", "port"),
            ("::1:80", "brackets"),
            ("[zz]:80", "IPv6"),
            ("[::1", "IPv6"),
            ("[::1]x", "IPv6"),
            ("a b:80", "not a valid name"),
            ("back/end:80", "not a valid name"),
            ("user@backend:80", "user info"),
        ] {
            let e = Authority::parse(text).expect_err(text);
            assert!(e.contains(why), "{text:?}: expected {why:?} in {e:?}");
        }
    }

    #[test]
    fn a_request_names_its_host_with_or_without_a_port() {
        assert_eq!(
            Authority::split("a.example:8080"),
            ("a.example", Some("8080"))
        );
        assert_eq!(Authority::split("[::1]:80"), ("::1", Some("80")));
        assert_eq!(Authority::split("[::1]"), ("::1", None));
        assert_eq!(Authority::split("::1"), ("::1", None));
        assert_eq!(Authority::split(""), ("", None));
        let mut headers = http::HeaderMap::new();
        let uri: http::Uri = "http://Other.example:81/x".parse().unwrap();
        assert_eq!(Authority::of_request(&headers, &uri), "Other.example:81");
        assert_eq!(Authority::request_host(&headers, &uri), "other.example");
        headers.insert(http::header::HOST, "API.Example.com.:8080".parse().unwrap());
        assert_eq!(
            Authority::of_request(&headers, &uri),
            "API.Example.com.:8080"
        );
        assert_eq!(Authority::request_host(&headers, &uri), "api.example.com");
    }
}
