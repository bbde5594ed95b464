//! `[tls]` and the TLS keys of upstream groups: where HTTPS is served, with
//! which certificates, and what the backends speak. Reading and checking
//! the certificate files is the `tls` module's.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{de, Deserialize, Deserializer};

use super::diff::{Keys, Section};
use super::routes::HostPattern;
use super::units::{socket_addr, Span};

/// The HTTPS listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The default certificate (PEM chain), for clients that send no SNI or a
    /// name no `certificate_for` claims. Optional with `[tls.acme]` (then a
    /// name nothing covers has its handshake refused); else required.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    #[serde(default)]
    pub private_key: Option<PathBuf>,
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
    /// Certificates obtained and renewed from an ACME CA (`tls::acme`).
    #[serde(default)]
    pub acme: Option<Acme>,
}

impl Tls {
    /// The default certificate and its key, when both are given.
    pub fn default_pair(&self) -> Option<(&Path, &Path)> {
        Some((self.certificate.as_deref()?, self.private_key.as_deref()?))
    }

    /// `certificate` and `private_key` go together, and are required
    /// unless ACME supplies the certificates.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.certificate, &self.private_key, &self.acme) {
            (Some(_), Some(_), _) | (None, None, Some(_)) => Ok(()),
            (Some(_), None, _) => Err("tls: certificate is given without private_key".to_owned()),
            (None, Some(_), _) => Err("tls: private_key is given without certificate".to_owned()),
            (None, None, None) => Err(
                "tls: missing certificate and private_key (or a [tls.acme] section to obtain certificates)"
                    .to_owned(),
            ),
        }
    }
}

impl Section for Tls {
    /// The listener and its protocols are set up at start; certificates
    /// are re-read and the rest is read per connection or request.
    fn keys(&mut self, old: &Self, keys: &mut Keys) {
        let Tls {
            listen,
            certificate,
            private_key,
            min_version,
            http2,
            redirect_http,
            certificate_for,
            acme,
        } = self;
        keys.restart("listen", listen, &old.listen, ToString::to_string);
        keys.live("certificate", certificate);
        keys.live("private_key", private_key);
        keys.live("min_version", min_version);
        keys.restart("http2", http2, &old.http2, ToString::to_string);
        keys.live("redirect_http", redirect_http);
        keys.live("certificate_for", certificate_for);
        // The renewal loop starts with the process, or not at all.
        keys.restart_section("acme", acme, &old.acme);
    }
}

/// `[tls.acme]`: which names get certificates from which ACME CA, and where
/// the account and the certificates are kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The CA's directory URL (https).
    pub directory: AcmeDirectory,
    /// A contact address for the account (the CA's expiry notices).
    #[serde(default)]
    pub email: Option<String>,
    /// The names to obtain certificates for.
    pub domains: AcmeDomains,
    /// Where the account key, the certificates and their keys are kept,
    /// shared by replicas; must be writable.
    pub storage: PathBuf,
    /// Renew when this much of a certificate's life is left; absent: when a
    /// third of its lifetime is left.
    #[serde(default)]
    pub renew_before: Option<Span>,
    /// External account binding (some CAs require it): the key id ...
    #[serde(default)]
    pub eab_kid: Option<String>,
    /// ... and its HMAC key (base64url), from the environment or a file.
    #[serde(default)]
    pub eab_hmac_key: Option<Secret>,
    /// CAs to trust for the directory's HTTPS, instead of the system's (a
    /// private ACME server).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Acme {
    /// What the types cannot say: EAB comes whole, and the names are exact.
    pub fn validate(&self) -> Result<(), String> {
        if self.eab_kid.is_some() != self.eab_hmac_key.is_some() {
            return Err(
                "tls.acme: eab_kid and eab_hmac_key go together (external account binding)"
                    .to_owned(),
            );
        }
        if let AcmeDomains::List(list) = &self.domains {
            if list.is_empty() {
                return Err(
                    "tls.acme.domains is empty: name the hosts, or say \"routes\"".to_owned(),
                );
            }
            for pattern in list {
                if let HostPattern::Wildcard(_) = pattern {
                    return Err(format!(
                        "tls.acme.domains: {pattern} is a wildcard, which HTTP-01 cannot prove; name each host"
                    ));
                }
                if pattern.to_string().parse::<std::net::IpAddr>().is_ok()
                    || !pattern.to_string().contains('.')
                {
                    return Err(format!(
                        "tls.acme.domains: {pattern} is not a public DNS name (a CA issues for names like www.example.com)"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Section for Acme {
    /// The renewal loop reads the section in force on each round.
    fn keys(&mut self, _old: &Self, keys: &mut Keys) {
        let Acme {
            directory,
            email,
            domains,
            storage,
            renew_before,
            eab_kid,
            eab_hmac_key,
            ca_file,
        } = self;
        keys.live("directory", directory);
        keys.live("email", email);
        keys.live("domains", domains);
        keys.live("storage", storage);
        keys.live("renew_before", renew_before);
        keys.live("eab_kid", eab_kid);
        keys.live("eab_hmac_key", eab_hmac_key);
        keys.live("ca_file", ca_file);
    }
}

/// An ACME directory URL: https, with a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeDirectory(pub String);

impl<'de> Deserialize<'de> for AcmeDirectory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let uri: http::Uri = text.trim().parse().map_err(|e| {
            de::Error::custom(format!("tls.acme.directory {text:?} is not a URL: {e}"))
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(de::Error::custom(format!(
                "tls.acme.directory {text:?}: an ACME directory is an https:// URL, like \"https://acme-v02.api.letsencrypt.org/directory\""
            )));
        }
        Ok(AcmeDirectory(text.trim().to_owned()))
    }
}

/// `domains`: a list of names, or `"routes"`: every exact host a route or a
/// `[[tls.certificate_for]]` names.
#[derive(Debug, Clone, PartialEq)]
pub enum AcmeDomains {
    List(Vec<HostPattern>),
    Routes,
}

impl<'de> Deserialize<'de> for AcmeDomains {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<HostPattern>),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::List(list) => Ok(AcmeDomains::List(list)),
            Raw::Word(word) if word == "routes" => Ok(AcmeDomains::Routes),
            Raw::Word(word) => Err(de::Error::custom(format!(
                "tls.acme.domains = {word:?}: write a list of host names, or \"routes\""
            ))),
        }
    }
}

/// A secret kept out of the file: `{ env = "NAME" }` or `{ file = "PATH" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Secret {
    Env(String),
    File(PathBuf),
}

impl Secret {
    /// The secret's value, trimmed; the error says where it was looked for.
    pub fn read(&self) -> Result<String, String> {
        let value = match self {
            Secret::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
            Secret::File(path) => {
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(match self {
                Secret::Env(name) => format!("the environment variable {name} is empty"),
                Secret::File(path) => format!("{} is empty", path.display()),
            });
        }
        Ok(value.to_owned())
    }
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
