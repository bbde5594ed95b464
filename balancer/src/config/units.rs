//! The values a configuration file is written in: durations, sizes,
//! socket addresses and paths (hosts are `host`'s), each parsed once into a type that cannot hold an
//! invalid value, with an error message that says how to write it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// A duration written as a human string (`500ms`, `2s`, `5m`), greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positive(pub Duration);

impl Positive {
    pub const fn secs(s: u64) -> Positive {
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

pub(super) fn header_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Positive, D::Error> {
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

impl fmt::Display for ByteSize {
    /// In the largest unit that divides it: `64MiB`, `1GiB`, `1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
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

/// An absolute request path such as `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPath(pub(super) String);

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

pub(super) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid address {text:?}; write IP:port, like \"0.0.0.0:80\" or \"127.0.0.1:9000\""
        ))
    })
}

pub(super) fn optional_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}
