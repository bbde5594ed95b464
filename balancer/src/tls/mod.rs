//! HTTPS: the certificates of the `[tls]` listener, chosen per handshake by
//! SNI, read at start and re-read when their files change ([`CertStore`];
//! the watch that has it look is `runtime::certificates`'s); their checks
//! for `--check`; and the development certificate `balancer cert
//! --self-signed` writes (`self_signed`).
//!
//! A renewed certificate (certbot, cert-manager, a mounted secret, or
//! `acme` writing one into its storage) is served to the next handshake;
//! connections already open keep theirs. A file that does not parse, or a
//! key that does not match its certificate, is refused with the file and
//! the reason, and the certificates in force stay. An ACME certificate not
//! obtained yet is simply absent: its host gets the default certificate, or
//! no handshake when there is none.

pub mod acme;
pub mod self_signed;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, HostPattern, TlsVersion};

/// A certificate within this long of its end is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// What is known of one certificate in force, for `/status` and `/metrics`.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub file: PathBuf,
    /// The names it is chosen for (`*` for the default certificate).
    pub hosts: Vec<String>,
    /// The names it is valid for (its subject alternative names).
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

struct Loaded {
    default: Option<Arc<CertifiedKey>>,
    named: Vec<(HostPattern, Arc<CertifiedKey>)>,
    /// ACME's, by exact name: chosen before `named` and `default`.
    acme: Vec<(String, Arc<CertifiedKey>)>,
    info: Vec<CertificateInfo>,
}

/// The certificates in force, chosen per handshake.
pub struct CertStore {
    loaded: ArcSwap<Loaded>,
    tls13_only: AtomicBool,
    /// The state of the files when they were last read (or last refused).
    seen: Mutex<Vec<FileState>>,
    /// A changed state, read once it holds for one more look: a renewal
    /// writes the certificate and the key one after the other.
    pending: Mutex<Option<Vec<FileState>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

type FileState = (PathBuf, Option<(SystemTime, u64)>);

fn file_states(config: &Config) -> Vec<FileState> {
    pairs(config)
        .into_iter()
        .flat_map(|pair| [pair.certificate, pair.private_key])
        .map(|path| {
            let state = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            (path, state)
        })
        .collect()
}

/// Which names a certificate is chosen for.
enum Claim<'a> {
    /// Any name nothing else claims.
    Default,
    Hosts(&'a [HostPattern]),
    /// One name, by `[tls.acme]`; the file may not exist yet.
    Acme(String),
}

struct Pair<'a> {
    claim: Claim<'a>,
    certificate: PathBuf,
    private_key: PathBuf,
}

/// Every certificate/key pair of `config`'s `[tls]`: the default, the
/// `certificate_for` ones, then where `[tls.acme]` keeps each of its names'.
fn pairs(config: &Config) -> Vec<Pair<'_>> {
    let Some(tls) = &config.tls else {
        return Vec::new();
    };
    let files = |claim, (cert, key): (&Path, &Path)| Pair {
        claim,
        certificate: cert.to_owned(),
        private_key: key.to_owned(),
    };
    let mut pairs: Vec<Pair<'_>> = tls
        .default_pair()
        .map(|default| files(Claim::Default, default))
        .into_iter()
        .chain(tls.certificate_for.iter().map(|c| {
            files(
                Claim::Hosts(&c.hosts),
                (c.certificate.as_path(), c.private_key.as_path()),
            )
        }))
        .collect();
    if let Some(acme) = &tls.acme {
        let storage = acme::Storage::new(acme);
        pairs.extend(config.acme_domains().into_iter().map(|domain| {
            let file = storage.certificate(&domain);
            files(Claim::Acme(domain), (file.as_path(), file.as_path()))
        }));
    }
    pairs
}

impl CertStore {
    /// Reads every certificate of `config`'s `[tls]`; the error names the file and the reason.
    pub fn load(config: &Config) -> Result<CertStore, String> {
        let seen = file_states(config);
        let loaded = read_all(config)?;
        let tls13_only = config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.min_version == TlsVersion::V1_3);
        Ok(CertStore {
            loaded: ArcSwap::from_pointee(loaded),
            tls13_only: AtomicBool::new(tls13_only),
            seen: Mutex::new(seen),
            pending: Mutex::new(None),
        })
    }

    /// Re-reads the files when they (or their names in `config`) changed: `Ok(true)`
    /// when new certificates are in force, `Err` (once per change) when they
    /// were refused and the old ones stay.
    pub fn refresh(&self, config: &Config) -> Result<bool, String> {
        let tls13_only = config
            .tls
            .as_ref()
            .is_some_and(|tls| tls.min_version == TlsVersion::V1_3);
        self.tls13_only.store(tls13_only, Ordering::Relaxed);
        let now = file_states(config);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                *pending = None;
                return Ok(false);
            }
            if pending.as_ref() != Some(&now) {
                *pending = Some(now);
                return Ok(false);
            }
            *pending = None;
            *seen = now;
        }
        let loaded = read_all(config)?;
        self.loaded.store(Arc::new(loaded));
        Ok(true)
    }

    pub fn certificates(&self) -> Vec<CertificateInfo> {
        self.loaded.load().info.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls offers TLS 1.2 and 1.3 and picks the highest both sides
        // know; a client that offers no TLS 1.3 cipher suite cannot speak
        // 1.3, so with min_version = "1.3" it gets no certificate (the
        // handshake fails).
        if self.tls13_only.load(Ordering::Relaxed)
            && !hello
                .cipher_suites()
                .iter()
                .any(|s| u16::from(*s) & 0xff00 == 0x1300)
        {
            return None;
        }
        let loaded = self.loaded.load();
        let name = hello.server_name().map(str::to_ascii_lowercase);
        if let Some((_, key)) = name
            .as_ref()
            .and_then(|name| loaded.acme.iter().find(|(domain, _)| domain == name))
        {
            return Some(Arc::clone(key));
        }
        let named = name.and_then(|name| {
            loaded
                .named
                .iter()
                .find(|(pattern, _)| {
                    matches!(pattern, HostPattern::Exact(_)) && pattern.matches(&name)
                })
                .or_else(|| {
                    loaded
                        .named
                        .iter()
                        .find(|(pattern, _)| pattern.matches(&name))
                })
                .map(|(_, key)| Arc::clone(key))
        });
        named.or_else(|| loaded.default.clone())
    }
}

fn read_all(config: &Config) -> Result<Loaded, String> {
    let mut loaded = Loaded {
        default: None,
        named: Vec::new(),
        acme: Vec::new(),
        info: Vec::new(),
    };
    for pair in pairs(config) {
        let read = read_pair(&pair.certificate, &pair.private_key);
        let (certified, mut about) = match (&pair.claim, read) {
            (_, Ok(read)) => read,
            // Not obtained yet, or not usable: `acme` orders it (and says why).
            (Claim::Acme(_), Err(_)) => continue,
            (_, Err(e)) => return Err(e),
        };
        match pair.claim {
            Claim::Default => {
                about.hosts = vec!["*".to_owned()];
                loaded.default = Some(certified);
            }
            Claim::Hosts(hosts) => {
                about.hosts = hosts.iter().map(ToString::to_string).collect();
                loaded
                    .named
                    .extend(hosts.iter().map(|h| (h.clone(), Arc::clone(&certified))));
            }
            Claim::Acme(domain) => {
                about.hosts = vec![domain.clone()];
                loaded.acme.push((domain, certified));
            }
        }
        loaded.info.push(about);
    }
    Ok(loaded)
}

/// The certificates of a PEM file, at least one; each parses as X.509.
/// The error names the file: a certificate chain here, the CAs of an
/// upstream's `ca_file` in `runtime`.
pub fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("{}: cannot read the certificates: {e}", file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", file.display()));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| format!("{}: a certificate does not parse: {e}", file.display()))?;
    }
    Ok(certs)
}

/// Reads one certificate chain and its key, and checks that they belong together.
pub fn read_pair(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, CertificateInfo), String> {
    pingora::tls::install_default_crypto_provider();
    let chain = read_certificates(cert)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map_err(|e| format!("{}: the certificate does not parse: {e}", cert.display()))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => {
                            Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string())
                        }
                        16 => Some(
                            std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "{}: no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        )
    })?;
    let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider")?;
    let certified = CertifiedKey::from_der(chain, private_key, provider).map_err(|e| {
        format!(
            "{} and {} do not go together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    let info = CertificateInfo {
        file: cert.to_owned(),
        hosts: Vec::new(),
        names,
        not_after,
    };
    Ok((Arc::new(certified), info))
}

/// What `--check` says about the certificates of `tls`: errors (a file that
/// does not parse, a key that does not match, a certificate past its end)
/// and warnings (one that ends within 14 days).
pub fn check(config: &Config) -> (Vec<String>, Vec<String>) {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let now = SystemTime::now();
    let given = pairs(config)
        .into_iter()
        .filter(|pair| !matches!(pair.claim, Claim::Acme(_)));
    for Pair {
        certificate: cert,
        private_key: key,
        ..
    } in given
    {
        let cert = cert.as_path();
        match read_pair(cert, &key) {
            Err(e) => errors.push(e),
            Ok((_, info)) if info.not_after <= now => errors.push(format!(
                "{}: the certificate expired on {}",
                cert.display(),
                httpdate::fmt_http_date(info.not_after)
            )),
            Ok((_, info)) if info.not_after <= now + EXPIRY_WARNING => warnings.push(format!(
                "{}: the certificate expires on {}, within 14 days",
                cert.display(),
                httpdate::fmt_http_date(info.not_after)
            )),
            Ok(_) => {}
        }
    }
    (errors, warnings)
}
