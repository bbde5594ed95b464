//! One upstream group as a snapshot compiles it from its section: how a
//! backend is picked ([`Algorithm`]), how a request reaches it (Pingora's
//! peer, made once and only cloned per request), how its backends are found
//! and checked, and the state that outlives a reload ([`GroupState`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;

use super::discovery::Resolver;
use super::{Backend, Pool};
use crate::config::{self, Authority, HealthCheck, Protocol, Servers};

/// Upstream connections idle longer than this are not reused; kept below the
/// keep-alive timeout of common backends so that a reused connection is rarely
/// one the backend is closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Concurrent requests on one HTTP/2 connection to a backend (Pingora's default is 1).
const H2_STREAMS: usize = 100;

/// How a group picks a backend among its healthy ones. Every algorithm
/// honours the servers' weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round-robin (nginx's): no bursts to one server.
    RoundRobin,
    /// The fewest requests in flight for its weight; ties by round-robin.
    LeastConnections,
    /// Ketama: a key keeps its backend while the set of backends stays.
    ConsistentHash,
    /// Weighted random.
    Random,
}

impl From<config::Algorithm> for Algorithm {
    fn from(algorithm: config::Algorithm) -> Algorithm {
        match algorithm {
            config::Algorithm::RoundRobin => Algorithm::RoundRobin,
            config::Algorithm::LeastConnections => Algorithm::LeastConnections,
            config::Algorithm::ConsistentHash => Algorithm::ConsistentHash,
            config::Algorithm::Random => Algorithm::Random,
        }
    }
}

impl fmt::Display for Algorithm {
    /// As the file names it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::ConsistentHash => "consistent_hash",
            Algorithm::Random => "random",
        })
    }
}

/// What `consistent_hash` hashes of a request. Requests are read in
/// `routing` (its `HashKey`), which this module, beside it, does not
/// import: the snapshot hands each group its key as this trait.
pub trait RequestKey: fmt::Display + Send + Sync {
    /// The bytes hashed for `req`, from `client_ip`.
    fn of(&self, req: &RequestHeader, client_ip: Option<IpAddr>) -> Vec<u8>;
}

/// What a group keeps from one snapshot to the next.
#[derive(Default)]
pub struct GroupState {
    pub pool: Pool,
    pub resolver: Resolver,
}

/// One upstream group, compiled from its section.
pub struct Group {
    pub name: Arc<str>,
    pub algorithm: Algorithm,
    /// What `consistent_hash` hashes; `None` for the other algorithms.
    hash_key: Option<Box<dyn RequestKey>>,
    /// Where its backends are found, and how often they are looked up again.
    pub servers: Servers,
    pub resolve_interval: Duration,
    /// Active checks; `None`: every address found takes traffic.
    pub health_check: Option<HealthCheck>,
    /// How long a backend may take to answer a request.
    pub read_timeout: Duration,
    /// How long an upgraded connection (a WebSocket) may carry nothing.
    pub idle_timeout: Duration,
    transport: Transport,
    /// The peer of a request, and of an upgrade (HTTP/1.1, read for
    /// `idle_timeout`), but for their address and SNI.
    request_peer: HttpPeer,
    upgrade_peer: HttpPeer,
    /// Its backends, kept across reloads while the group exists.
    pub state: Arc<GroupState>,
}

/// How the group's backends are spoken to: by requests and by probes.
struct Transport {
    tls: bool,
    /// Check the backends' certificates (and names).
    verify: bool,
    protocol: Protocol,
    /// The CAs their certificates are checked against (`ca_file`).
    ca: Option<Arc<CaType>>,
    sni: Sni,
}

/// The name sent in SNI (and checked against a backend's certificate).
enum Sni {
    /// Plain HTTP: none.
    None,
    /// `sni = "..."`: the same for every backend.
    Fixed(String),
    /// The host of each backend's `servers` entry; for an address an
    /// extension chose, which has none, the host of the first entry (an
    /// empty SNI would skip the certificate check altogether).
    PerServer { first: String },
}

impl Group {
    /// Compiles the section `settings` of the group `name`; `ca` is its
    /// `ca_file` read, `hash_key` what `consistent_hash` hashes, `state`
    /// what the group had in the snapshot before (or a new one).
    pub fn new(
        name: &str,
        settings: &config::Upstream,
        ca: Option<Arc<CaType>>,
        hash_key: Option<Box<dyn RequestKey>>,
        state: Arc<GroupState>,
    ) -> Group {
        let sni = match (&settings.sni, settings.tls) {
            (_, false) => Sni::None,
            (Some(sni), true) => Sni::Fixed(sni.clone()),
            (None, true) => Sni::PerServer {
                first: settings
                    .servers
                    .addrs()
                    .next()
                    .map(|a| a.host().to_owned())
                    .unwrap_or_default(),
            },
        };
        let transport = Transport {
            tls: settings.tls,
            verify: settings.verify,
            protocol: settings.protocol,
            ca,
            sni,
        };
        let algorithm = Algorithm::from(settings.algorithm);
        Group {
            name: Arc::from(name),
            algorithm,
            hash_key: hash_key.filter(|_| algorithm == Algorithm::ConsistentHash),
            servers: settings.servers.clone(),
            resolve_interval: settings.resolve_interval.0,
            health_check: settings.health_check.clone(),
            read_timeout: settings.read_timeout.0,
            idle_timeout: settings.idle_timeout.0,
            request_peer: transport.peer(
                settings.connect_timeout.0,
                settings.read_timeout.0,
                false,
            ),
            upgrade_peer: transport.peer(settings.connect_timeout.0, settings.idle_timeout.0, true),
            transport,
            state,
        }
    }

    /// What `consistent_hash` hashes, when that is the algorithm.
    pub fn hash_key(&self) -> Option<&dyn RequestKey> {
        self.hash_key.as_deref()
    }

    /// A healthy backend not in `skip` (the ones that already failed this
    /// request), picked by the group's algorithm.
    pub fn select(
        &self,
        req: &RequestHeader,
        client_ip: Option<IpAddr>,
        skip: &[SocketAddr],
    ) -> Option<Arc<Backend>> {
        let key = match &self.hash_key {
            Some(key) => key.of(req, client_ip),
            None => Vec::new(),
        };
        self.state.pool.select(self.algorithm, &key, skip)
    }

    /// Whether a healthy backend outside `skip` exists: a retry has somewhere to go.
    pub fn has_candidate(&self, skip: &[SocketAddr]) -> bool {
        self.state.pool.has_candidate(skip)
    }

    /// The peer for a request to `addr`, from the `servers` entry `server`
    /// (`None`: an address an extension chose); `upgrade`: a connection
    /// that switches protocols.
    pub fn peer(&self, addr: SocketAddr, server: Option<&str>, upgrade: bool) -> Box<HttpPeer> {
        let template = if upgrade {
            &self.upgrade_peer
        } else {
            &self.request_peer
        };
        let mut peer = Box::new(template.clone());
        peer._address = PeerAddr::Inet(addr);
        // A fixed name is in the template already.
        if let Sni::PerServer { .. } = self.transport.sni {
            peer.sni = self.transport.sni(server).to_owned();
        }
        peer
    }

    /// Counts a failure the request path saw at `backend` (a refused
    /// connect) as a failed check, when checks are on: a dead backend leaves
    /// the rotation without waiting for the next probe.
    pub fn count_failure(&self, backend: &Backend, why: &str) {
        if let Some(hc) = &self.health_check {
            backend.count_failure(&self.name, hc, why);
        }
    }

    /// A health check that speaks to a backend of the `servers` entry
    /// `server` as requests do: TLS with the group's SNI, CAs and
    /// verification, HTTP/2 in clear text for `h2c`.
    pub(super) fn health_check_for(&self, server: &str) -> HttpHealthCheck {
        let transport = &self.transport;
        let mut check = HttpHealthCheck::new(transport.sni(Some(server)), transport.tls);
        let options = &mut check.peer_template.options;
        options.verify_cert = transport.verify;
        options.verify_hostname = transport.verify;
        options.ca = transport.ca.clone();
        if transport.protocol == Protocol::H2c {
            options.set_http_version(2, 2);
        }
        check
    }
}

impl Transport {
    /// The name sent in SNI to a backend of the `servers` entry `server`
    /// (`None`: an address an extension chose).
    fn sni<'a>(&'a self, server: Option<&'a str>) -> &'a str {
        match (&self.sni, server) {
            (Sni::None, _) => "",
            (Sni::Fixed(sni), _) => sni,
            (Sni::PerServer { .. }, Some(server)) => Authority::split(server).0,
            (Sni::PerServer { first }, None) => first,
        }
    }

    /// The peer every request clones, reading for `read_timeout`.
    fn peer(&self, connect_timeout: Duration, read_timeout: Duration, upgrade: bool) -> HttpPeer {
        let sni = match &self.sni {
            Sni::Fixed(sni) => sni.clone(),
            Sni::None | Sni::PerServer { .. } => String::new(),
        };
        // The address (and a per-server SNI) is each request's own.
        let mut peer = HttpPeer::new(SocketAddr::from(([0, 0, 0, 0], 0)), self.tls, sni);
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(read_timeout);
        peer.options.idle_timeout = Some(IDLE_TIMEOUT);
        peer.options.verify_cert = self.verify;
        peer.options.verify_hostname = self.verify;
        peer.options.ca = self.ca.clone();
        match (self.protocol, upgrade) {
            // An upgrade is an HTTP/1.1 affair: HTTP/2 would drop it.
            (_, true) | (Protocol::Http1, _) => peer.options.set_http_version(1, 1),
            (Protocol::H2c, false) => {
                peer.options.set_http_version(2, 2);
                peer.options.max_h2_streams = H2_STREAMS;
            }
            (Protocol::H2, false) => {
                peer.options.set_http_version(2, 1);
                peer.options.max_h2_streams = H2_STREAMS;
            }
        }
        peer
    }
}
