//! `[tls]` and the TLS keys of upstream groups: where HTTPS is served, with
//! which certificates, and what the backends speak. Reading and checking
//! the certificate files is the `tls` module's.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{de, Deserialize, Deserializer};

use super::routes::HostPattern;
use super::units::socket_addr;

/// The HTTPS listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The default certificate (PEM chain), for clients that send no SNI or a
    /// name no `certificate_for` claims.
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// ALPN h2 and http/1.1 (default true).
    #[serde(default = "yes")]
    pub http2: bool,
    /// The plain listener answers 308 to https:// (except /health-check).
    #[serde(default)]
    pub redirect_http: bool,
    /// More certificates, chosen by SNI.
    #[serde(default)]
    pub certificate_for: Vec<CertificateFor>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn yes() -> bool {
    true
}

/// A certificate for some host names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFor {
    pub hosts: Vec<HostPattern>,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

/// The oldest TLS version a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.trim() {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            other => Err(de::Error::custom(format!(
                "min_version {other:?} is not \"1.2\" or \"1.3\" (older versions are never offered)"
            ))),
        }
    }
}

/// What an upstream group's backends speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
    H2,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
        })
    }
}
