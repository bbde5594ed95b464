//! The runtime snapshot: each valid configuration file is compiled once into
//! a [`Snapshot`] (its upstream groups with their peers and pools, its routes
//! with their matchers, header values and rate limiters, its cache rules and
//! the rest of what the request path reads, each in runtime form) and
//! published behind one `ArcSwap`. A request takes the snapshot in force
//! when it arrives and reads only that, to its end; a reload publishes a
//! new one.
//!
//! This is the buffer between the file's types and the request path: what
//! the file says is `config`'s, parsed and checked; what a request reads is
//! here, computed once. The file's values stay beside it ([`Snapshot::config`])
//! for what is not on the request path: start-up, certificates, ACME, the
//! admin token, the next reload's comparison.
//!
//! What must outlive a reload is carried over by name: a group's pool of
//! backends (their health, their pooled connections, their counters), a
//! route's rate-limit counts while its limit is unchanged, and an extension
//! instance while nothing it was built from changed.
//!
//! Here too is what keeps the snapshot and what it points at current, each a
//! background service: the reload of the file (`reload`), the upkeep of the
//! groups' pools (`upkeep`), and the watch over certificates and their ACME
//! renewal (`certificates`). The work each does on one thing (a probe, a
//! certificate read, an order) belongs to the module of that thing.

pub mod certificates;
pub mod reload;
mod settings;
pub mod upkeep;

pub use settings::{AccessLog, Compression, HttpsRedirect, Limits};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use pingora::http::RequestHeader;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::cache;
use crate::config::{self, Config};
use crate::extension::{Instance, Instances, Registry};
use crate::routing::{HashKey, Route};
use crate::tls::acme;
use crate::upstream::{Group, RequestKey};

/// The snapshot in force, swapped whole by a reload.
pub type Live = ArcSwap<Snapshot>;

pub struct Snapshot {
    /// The file's values, restart-only keys as they were at start-up. Not
    /// for the request path, which reads the compiled forms below.
    pub config: Arc<Config>,
    /// Every upstream group by name (`[upstream]` is `default`).
    pub groups: BTreeMap<String, Arc<Group>>,
    /// In file order.
    pub routes: Vec<Route>,
    /// The group that requests no route claims go to (`[upstream]`).
    pub default: Option<Arc<Group>>,
    /// Whether a route matches on the host, writes a redirect or a header
    /// with it, or an extension may read it: otherwise requests need not
    /// have their host looked at.
    pub uses_host: bool,
    /// The extension instances the file declares.
    pub extensions: Instances,
    /// What runs for a request no route matched: the global instances.
    pub unrouted_chain: Chain,
    /// What runs for each route's requests (by route position): the global
    /// instances, then the route's own.
    pub route_chains: Vec<Chain>,
    pub limits: Limits,
    /// Plain requests go to HTTPS (`[tls] redirect_http`).
    pub https_redirect: Option<HttpsRedirect>,
    /// Where ACME HTTP-01 answers are kept (`[tls.acme]`).
    pub acme_challenges: Option<acme::Storage>,
    pub access_log: AccessLog,
    /// Absent: nothing is compressed.
    pub compression: Option<Compression>,
    /// Absent: nothing is cached.
    pub cache: Option<cache::Policy>,
    /// How long SIGTERM is followed by serving as usual.
    pub shutdown_delay: Duration,
    /// How long the drain waits for requests in flight.
    pub grace_period: Duration,
    /// `[tls] min_version = "1.3"`: a connection that negotiated less is dropped.
    pub tls13_only: bool,
}

/// The extension instances one request runs, in order.
pub type Chain = Arc<[Arc<Instance>]>;

impl Snapshot {
    /// Compiles `config`, carrying over the state of `previous` where the
    /// same group, the same rate limit or the same extension instance is
    /// still configured; instances are built with `registry`'s kinds. The
    /// error names a file the configuration points at that cannot be used,
    /// or an instance that cannot be built.
    pub fn compile(
        config: Config,
        previous: Option<&Snapshot>,
        registry: &Registry,
    ) -> Result<Snapshot, String> {
        let mut groups = BTreeMap::new();
        for (name, settings) in config.groups() {
            let state = previous
                .and_then(|p| p.groups.get(name))
                .map(|g| Arc::clone(&g.state))
                .unwrap_or_default();
            let ca = match &settings.ca_file {
                Some(file) => Some(read_ca(file).map_err(|e| format!("upstream {name}: {e}"))?),
                None => None,
            };
            let hash_key = settings
                .hash_key
                .as_ref()
                .map_or(HashKey::ClientIp, |key| HashKey::from(key.get_ref()));
            let group = Group::new(name, settings, ca, Some(Box::new(hash_key)), state);
            groups.insert(name.to_owned(), Arc::new(group));
        }
        let routes: Vec<Route> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let kept = previous.and_then(|p| p.routes.get(i));
                Route::compile(i, route.get_ref(), kept)
            })
            .collect();
        let uses_host = config.routes.iter().any(|r| {
            let r = r.get_ref();
            r.host.is_some() || matches!(r.action, config::Action::Redirect(_))
        }) || routes
            .iter()
            .any(|r| r.request_headers.uses_host() || r.response_headers.uses_host())
            || !config.extensions.is_empty();
        let extensions = Instances::build(&config, registry, previous.map(|p| &p.extensions))?;
        let chain = |names: &mut dyn Iterator<Item = &toml::Spanned<String>>| -> Chain {
            let mut chain: Vec<Arc<Instance>> = Vec::new();
            for name in names {
                // Declared: the configuration checked every list's names.
                if let Some(instance) = extensions.get(name.get_ref()) {
                    if !chain.iter().any(|i| Arc::ptr_eq(i, instance)) {
                        chain.push(Arc::clone(instance));
                    }
                }
            }
            chain.into()
        };
        let unrouted_chain = chain(&mut config.global_extensions.iter());
        let route_chains = config
            .routes
            .iter()
            .map(|r| {
                chain(
                    &mut config
                        .global_extensions
                        .iter()
                        .chain(&r.get_ref().extensions),
                )
            })
            .collect();
        let tls = config.tls.as_ref();
        Ok(Snapshot {
            default: groups.get(Config::DEFAULT_GROUP).cloned(),
            groups,
            routes,
            uses_host,
            extensions,
            unrouted_chain,
            route_chains,
            limits: Limits::from(&config.limits),
            https_redirect: tls.and_then(HttpsRedirect::new),
            acme_challenges: tls.and_then(|t| t.acme.as_ref()).map(acme::Storage::new),
            access_log: AccessLog::new(&config),
            compression: config.compression.as_ref().map(Compression::from),
            cache: config.cache.as_ref().map(cache::Policy::from),
            shutdown_delay: config.shutdown_delay.0,
            grace_period: config.grace_period.0,
            tls13_only: tls.is_some_and(|t| t.min_version == config::TlsVersion::V1_3),
            config: Arc::new(config),
        })
    }
}

/// `routing` reads requests and `upstream` picks backends; neither imports
/// the other, so the snapshot, above both, gives a group its hash key.
impl RequestKey for HashKey {
    fn of(&self, req: &RequestHeader, client_ip: Option<IpAddr>) -> Vec<u8> {
        HashKey::of(self, req, client_ip)
    }
}

/// The CAs of an upstream's `ca_file`, as Pingora's connector takes them.
fn read_ca(file: &std::path::Path) -> Result<Arc<CaType>, String> {
    let certs = crate::tls::read_certificates(file).map_err(|e| format!("ca_file {e}"))?;
    let wrapped: Vec<WrappedX509> = certs
        .into_iter()
        .map(|cert| WrappedX509::new(cert.to_vec(), parse_x509))
        .collect();
    Ok(Arc::from(wrapped))
}
