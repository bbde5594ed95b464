//! Wiring: the Pingora server and its services (the proxy behind its
//! connection guard, the admin listener, the upstream upkeep, the config
//! reloader) around one live runtime snapshot, and the graceful stop as
//! Pingora's shutdown signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::{self, metrics};
use crate::cache::ResponseCache;
use crate::config::Config;
use crate::extension::Extension;
use crate::proxy::{self, connections, drain, guard};
use crate::runtime::certificates::{CertWatch, RenewalLoop};
use crate::runtime::reload::Reloader;
use crate::runtime::upkeep::Upkeep;
use crate::runtime::Snapshot;
use crate::telemetry;
use crate::tls::acme::{AcmeStatus, Renewal};
use crate::tls::CertStore;

/// The read buffer of a TLS client connection (Pingora's default is 64 KiB):
/// TLS records are read in pieces, and the buffer saves system calls.
const TLS_CLIENT_READ_BUFFER: usize = 8 << 10;
/// The write buffer of a client connection, Pingora's default: one segment.
const CLIENT_WRITE_BUFFER: usize = 1460;

/// Runs the balancer on `config` (read from `path` as `text`) until it is stopped.
pub fn run(
    config: Config,
    path: PathBuf,
    text: String,
    extensions: Vec<Arc<dyn Extension>>,
) -> ExitCode {
    let server_conf = ServerConf {
        threads: config.threads(),
        // `drain` has served what was accepted (at most the live
        // grace_period) before it lets Pingora stop: nothing is left to sleep for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), server_conf);
    server.bootstrap();

    let listen = config.listen;
    let socket_options = client_socket_options(config.reuse_port);
    let admin_listen = config.admin_listen;
    let http2_cleartext = config.http2_cleartext;
    // The certificates are read before anything listens: a broken one is a
    // clear error at start, never a listener that fails its handshakes.
    let tls = match &config.tls {
        Some(tls) => match CertStore::load(&config) {
            Ok(store) => Some((tls.clone(), Arc::new(store))),
            Err(e) => {
                eprintln!("balancer: [tls]: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let cache = ResponseCache::leak(config.cache.as_ref());
    let snapshot = match Snapshot::compile(config, None) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            eprintln!("balancer: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let live = Arc::new(ArcSwap::from_pointee(snapshot));
    let in_flight = Arc::new(proxy::InFlight::default());
    let reloaded = Arc::new(tokio::sync::Notify::new());
    let reloader = Reloader::new(path.clone(), Arc::clone(&live), Arc::clone(&reloaded), text);
    let reloads = Arc::clone(&reloader.stats);
    let connections = Arc::new(connections::Connections::default());
    let stopping = Arc::new(drain::Stopping::default());

    let upkeep = background_service(
        "upstream upkeep",
        Upkeep {
            live: Arc::clone(&live),
            reloaded,
        },
    );
    let drain = drain::Drain {
        in_flight: Arc::clone(&in_flight),
        connections: Arc::clone(&connections),
        stopping: Arc::clone(&stopping),
        live: Arc::clone(&live),
        listen: std::iter::once(listen)
            .chain(tls.as_ref().map(|(settings, _)| settings.listen))
            .collect(),
    };
    let mut balancer = pingora::proxy::http_proxy(
        &server.configuration,
        proxy::Balancer {
            live: Arc::clone(&live),
            extensions,
            in_flight,
            cache,
            stopping: Arc::clone(&stopping),
            tunnels: proxy::tunnel::connector(&server.configuration),
        },
    );
    if http2_cleartext {
        // Prior-knowledge HTTP/2 on the plain listener (HTTP/1.1 still works there).
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = true;
        balancer.server_options = Some(options);
    }
    let mut proxy = Service::new(
        "balancer".to_owned(),
        guard::Guarded::new(
            balancer,
            Arc::clone(&live),
            Arc::clone(&connections),
            stopping,
        ),
    );
    // Pingora would read each client through a 64 KiB buffer of its own, on
    // top of the buffer it parses a request head in. Plain HTTP needs only
    // the latter: a read lands straight in it, and an idle connection holds
    // no read buffer at all.
    proxy.add_listener(
        ListenerConfig::tcp(listen.to_string())
            .tcp_socket_options(socket_options.clone())
            .l4_buffer(L4BufferSettings::new(0, CLIENT_WRITE_BUFFER)),
    );
    if let Some((settings, store)) = &tls {
        let mut acceptor = match pingora::listeners::tls::TlsSettings::intermediate("", "") {
            Ok(acceptor) => acceptor,
            Err(e) => {
                eprintln!("balancer: [tls]: {e}");
                return ExitCode::FAILURE;
            }
        };
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
        server.add_service(background_service(
            "certificate watch",
            CertWatch {
                store: Arc::clone(store),
                live: Arc::clone(&live),
            },
        ));
        log::info!("balancer listening on {} (TLS)", settings.listen);
    }
    // Certificates from an ACME CA, in the background: serving never waits for the CA.
    let acme = tls
        .as_ref()
        .is_some_and(|(settings, _)| settings.acme.is_some())
        .then(|| Arc::new(AcmeStatus::default()));
    if let Some(status) = &acme {
        server.add_service(background_service(
            "acme renewal",
            RenewalLoop {
                live: Arc::clone(&live),
                renewal: Renewal {
                    status: Arc::clone(status),
                },
            },
        ));
    }

    metrics::LiveState {
        certificates: tls.as_ref().map(|(_, store)| Arc::clone(store)),
        acme: acme.clone(),
        live: Arc::clone(&live),
        cache,
        reloads: Arc::clone(&reloads),
        connections: Arc::clone(&connections),
    }
    .register();
    if let Some(admin_listen) = admin_listen {
        let mut admin = Service::new(
            "admin".to_owned(),
            admin::Admin {
                certificates: tls.as_ref().map(|(_, store)| Arc::clone(store)),
                acme,
                token_from_env: std::env::var(admin::TOKEN_ENV)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty()),
                cache,
                live,
                config_path: path,
                reloads,
                connections,
            },
        );
        admin.add_tcp(&admin_listen.to_string());
        server.add_service(admin);
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

/// The options of the client listeners' sockets (Pingora's defaults but for
/// `reuse_port`).
fn client_socket_options(reuse_port: bool) -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = reuse_port.then_some(true);
    options
}
