//! Wiring: the Pingora server and its services (the proxy behind its
//! connection guard, the admin listener, the upstream upkeep, the config
//! reloader) around one live runtime snapshot, and the graceful stop as
//! Pingora's shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::prelude::*;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::{self, metrics, Admin};
use crate::cache::ResponseCache;
use crate::config::{Config, Tls};
use crate::extension::Registry;
use crate::proxy;
use crate::proxy::connections::Connections;
use crate::proxy::drain::{self, Stopping};
use crate::proxy::guard::Guarded;
use crate::runtime::certificates::{CertWatch, RenewalLoop};
use crate::runtime::reload::{ReloadStats, Reloader};
use crate::runtime::upkeep::Upkeep;
use crate::runtime::{Live, Snapshot};
use crate::telemetry;
use crate::tls::acme::{AcmeStatus, Renewal};
use crate::tls::CertStore;

/// The read buffer of a TLS client connection (Pingora's default is 64 KiB):
/// TLS records are read in pieces, and the buffer saves system calls.
const TLS_CLIENT_READ_BUFFER: usize = 8 << 10;
/// The write buffer of a client connection, Pingora's default: one segment.
const CLIENT_WRITE_BUFFER: usize = 1460;

/// What the services share: the snapshot in force, and the state that the
/// request path keeps and the admin listener reads.
struct Shared {
    live: Arc<Live>,
    cache: &'static ResponseCache,
    connections: Arc<Connections>,
    stopping: Arc<Stopping>,
    in_flight: Arc<proxy::InFlight>,
    reloads: Arc<ReloadStats>,
    /// The TLS listener's settings and certificates, when there is one.
    tls: Option<(Tls, Arc<CertStore>)>,
    /// The state of each `[tls.acme]` name, when there is that section.
    acme: Option<Arc<AcmeStatus>>,
}

/// Runs the balancer on `config` (read from `path` as `text`) until it is stopped.
pub fn run(config: Config, path: PathBuf, text: String, registry: Registry) -> ExitCode {
    let mut server = Server::new_with_opt_and_conf(Opt::default(), server_conf(&config));
    server.bootstrap();

    let (listen, admin_listen) = (config.listen, config.admin_listen);
    // The certificates are read before anything listens: a broken one is a
    // clear error at start, never a listener that fails its handshakes.
    let tls = match load_certificates(&config) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("balancer: [tls]: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cache = ResponseCache::leak(config.cache.as_ref());
    let registry = Arc::new(registry);
    let snapshot = match Snapshot::compile(config, None, &registry) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            eprintln!("balancer: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let live = Arc::new(ArcSwap::from_pointee(snapshot));
    let reloaded = Arc::new(tokio::sync::Notify::new());
    let reloader = Reloader::new(
        path.clone(),
        Arc::clone(&live),
        Arc::clone(&reloaded),
        text,
        registry,
    );
    let shared = Shared {
        live: Arc::clone(&live),
        cache,
        connections: Arc::default(),
        stopping: Arc::default(),
        in_flight: Arc::default(),
        reloads: Arc::clone(&reloader.stats),
        // Certificates from an ACME CA, in the background: serving never waits for the CA.
        acme: tls
            .as_ref()
            .is_some_and(|(settings, _)| settings.acme.is_some())
            .then(Arc::default),
        tls,
    };

    let upkeep = background_service("upstream upkeep", Upkeep { live, reloaded });
    let drain = graceful_stop(&shared);
    let proxy = match proxy_service(&server, &shared) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("balancer: [tls]: {e}");
            return ExitCode::FAILURE;
        }
    };
    add_certificate_services(&mut server, &shared);
    register_metrics(&shared);
    if let Some(admin_listen) = admin_listen {
        server.add_service(admin_service(shared, admin_listen, path));
        log::info!("admin listening on {admin_listen}");
    }
    let upkeep = server.add_service(upkeep);
    server.add_service(background_service("config reload", reloader));
    server.add_service(proxy).add_dependency(&upkeep);
    log::info!("balancer listening on {listen}");
    server.run(RunArgs {
        shutdown_signal: Box::new(drain),
    });
    telemetry::access_log::flush(std::time::Duration::from_secs(1));
    ExitCode::SUCCESS
}

/// The server's settings: its threads, and no grace period of Pingora's own.
fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.threads(),
        // `drain` has served what was accepted (at most the live
        // grace_period) before it lets Pingora stop: nothing is left to sleep for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        // Every timeout of a second or more (a backend's read_timeout, the
        // wait for a client's next request) on tokio's timer wheel rather
        // than Pingora's fast timers: almost every such timer is cancelled
        // long before it fires, which tokio's wheel undoes at once, where a
        // fast timer stays registered until its deadline. It is also fewer
        // instructions per request (bench/results/parts.md).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    }
}

/// The TLS listener's settings and certificates, read whole, when there is
/// a `[tls]` section; the error names the file.
fn load_certificates(config: &Config) -> Result<Option<(Tls, Arc<CertStore>)>, String> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let store = CertStore::load(config)?;
    Ok(Some((tls.clone(), Arc::new(store))))
}

/// The graceful stop, which Pingora waits for as its shutdown signal: it
/// stops the client listeners (the plain one and the TLS one) and drains them.
fn graceful_stop(shared: &Shared) -> drain::Drain {
    let listen = shared.live.load().config.listen;
    drain::Drain {
        in_flight: Arc::clone(&shared.in_flight),
        connections: Arc::clone(&shared.connections),
        stopping: Arc::clone(&shared.stopping),
        live: Arc::clone(&shared.live),
        listen: std::iter::once(listen)
            .chain(shared.tls.as_ref().map(|(settings, _)| settings.listen))
            .collect(),
    }
}

/// The proxy behind its connection guard, on the plain listener and the TLS
/// one when there is one. The error is the TLS acceptor's.
fn proxy_service(
    server: &Server,
    shared: &Shared,
) -> Result<Service<Guarded<HttpProxy<proxy::Balancer>>>, String> {
    // The first snapshot, from the file as it was at start: listeners are made once.
    let config = Arc::clone(&shared.live.load().config);
    let mut balancer = pingora::proxy::http_proxy(
        &server.configuration,
        proxy::Balancer {
            live: Arc::clone(&shared.live),
            in_flight: Arc::clone(&shared.in_flight),
            cache: shared.cache,
            stopping: Arc::clone(&shared.stopping),
            tunnels: proxy::tunnel::connector(&server.configuration),
            relays: proxy::Relays::new(config.threads()),
        },
    );
    if config.http2_cleartext {
        // Prior-knowledge HTTP/2 on the plain listener (HTTP/1.1 still works there).
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = true;
        balancer.server_options = Some(options);
    }
    let mut proxy = Service::new(
        "balancer".to_owned(),
        Guarded::new(
            balancer,
            Arc::clone(&shared.live),
            Arc::clone(&shared.connections),
            Arc::clone(&shared.stopping),
        ),
    );
    let socket_options = client_socket_options(config.reuse_port);
    // Pingora would read each client through a 64 KiB buffer of its own, on
    // top of the buffer it parses a request head in. Plain HTTP needs only
    // the latter: a read lands straight in it, and an idle connection holds
    // no read buffer at all.
    proxy.add_listener(
        ListenerConfig::tcp(config.listen.to_string())
            .tcp_socket_options(socket_options.clone())
            .l4_buffer(L4BufferSettings::new(0, CLIENT_WRITE_BUFFER)),
    );
    if let Some((settings, store)) = &shared.tls {
        let mut acceptor = pingora::listeners::tls::TlsSettings::intermediate("", "")
            .map_err(|e| e.to_string())?;
        acceptor.set_cert_resolver(Arc::clone(store) as _);
        if settings.http2 {
            acceptor.enable_h2();
        }
        proxy.add_listener(
            ListenerConfig::tcp(settings.listen.to_string())
                .tcp_socket_options(socket_options)
                .tls(acceptor)
                .l4_buffer(L4BufferSettings::new(
                    TLS_CLIENT_READ_BUFFER,
                    CLIENT_WRITE_BUFFER,
                )),
        );
        log::info!("balancer listening on {} (TLS)", settings.listen);
    }
    Ok(proxy)
}

/// The certificate watch when there is a TLS listener, and the ACME
/// renewal when there is `[tls.acme]`.
fn add_certificate_services(server: &mut Server, shared: &Shared) {
    if let Some((_, store)) = &shared.tls {
        server.add_service(background_service(
            "certificate watch",
            CertWatch {
                store: Arc::clone(store),
                live: Arc::clone(&shared.live),
            },
        ));
    }
    if let Some(status) = &shared.acme {
        server.add_service(background_service(
            "acme renewal",
            RenewalLoop {
                live: Arc::clone(&shared.live),
                renewal: Renewal {
                    status: Arc::clone(status),
                },
            },
        ));
    }
}

/// The metrics of the state the services keep, read at each scrape.
fn register_metrics(shared: &Shared) {
    metrics::LiveState {
        certificates: shared.tls.as_ref().map(|(_, store)| Arc::clone(store)),
        acme: shared.acme.clone(),
        live: Arc::clone(&shared.live),
        cache: shared.cache,
        reloads: Arc::clone(&shared.reloads),
        connections: Arc::clone(&shared.connections),
    }
    .register();
}

/// The admin listener on `admin_listen`, reading the state the others keep.
fn admin_service(shared: Shared, admin_listen: SocketAddr, config_path: PathBuf) -> Service<Admin> {
    let mut admin = Service::new(
        "admin".to_owned(),
        Admin {
            certificates: shared.tls.map(|(_, store)| store),
            acme: shared.acme,
            token_from_env: std::env::var(admin::TOKEN_ENV)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            cache: shared.cache,
            live: shared.live,
            config_path,
            reloads: shared.reloads,
            connections: shared.connections,
        },
    );
    admin.add_tcp(&admin_listen.to_string());
    admin
}

/// The options of the client listeners' sockets (Pingora's defaults but for
/// `reuse_port`).
fn client_socket_options(reuse_port: bool) -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = reuse_port.then_some(true);
    options
}
