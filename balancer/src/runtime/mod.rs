//! The runtime snapshot: each valid configuration file is compiled once into
//! a [`Snapshot`] (its upstream groups with their pools, its routes with
//! their matchers, header values and rate limiters) and published behind one
//! `ArcSwap`. A request takes the snapshot in force when it arrives and reads
//! only that, to its end; a reload publishes a new one.
//!
//! What must outlive a reload is carried over by name: a group's pool of
//! backends (their health, their pooled connections, their counters) and a
//! route's rate-limit counts while its limit is unchanged.
//!
//! Here too is what keeps the snapshot and what it points at current, each a
//! background service: the reload of the file (`reload`), the upkeep of the
//! groups' pools (`upkeep`), and the watch over certificates and their ACME
//! renewal (`certificates`). The work each does on one thing (a probe, a
//! certificate read, an order) belongs to the module of that thing.

pub mod certificates;
pub mod reload;
pub mod upkeep;

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config::{self, Config};
use crate::extension::{Instance, Instances, Registry};
use crate::routing::Route;
use crate::upstream::discovery::Resolver;
use crate::upstream::Pool;

/// The snapshot in force, swapped whole by a reload.
pub type Live = ArcSwap<Snapshot>;

pub struct Snapshot {
    /// The file's values, restart-only keys as they were at start-up.
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
}

/// The extension instances one request runs, in order.
pub type Chain = Arc<[Arc<Instance>]>;

/// One upstream group as this snapshot configures it.
pub struct Group {
    pub name: Arc<str>,
    pub settings: config::Upstream,
    /// The CAs its backends' certificates are checked against (`ca_file`).
    pub ca: Option<Arc<CaType>>,
    /// Its backends, kept across reloads while the group exists.
    pub state: Arc<GroupState>,
}

/// What a group keeps from one snapshot to the next.
#[derive(Default)]
pub struct GroupState {
    pub pool: Pool,
    pub resolver: Resolver,
}

impl Snapshot {
    /// Compiles `config`, carrying over the state of `previous` where the
    /// same group or the same rate limit is still configured. The error
    /// names a file the configuration points at that cannot be used.
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
            let group = Group {
                name: Arc::from(name),
                settings: settings.clone(),
                ca,
                state,
            };
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
            .any(|r: &Route| r.request_headers.uses_host() || r.response_headers.uses_host())
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
        Ok(Snapshot {
            extensions,
            unrouted_chain,
            route_chains,
            config: Arc::new(config),
            default: groups.get(Config::DEFAULT_GROUP).cloned(),
            groups,
            routes,
            uses_host,
        })
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
