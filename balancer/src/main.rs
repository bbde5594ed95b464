//! The `balancer` command: parses the command line, loads the configuration
//! and wires the Pingora services together. The request path is in `proxy`,
//! the pool upkeep in `upkeep`, the configuration in `config`.

#[path = "../../backend/src/probe.rs"]
mod probe;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;
use pingora::services::background::background_service;

use balancer::config::Config;
use balancer::{
    admin, cache, connections, discovery, drain, logging, proxy, reload, upkeep, upstream,
};

/// mimalloc: the request path allocates small, short-lived objects, which
/// glibc's malloc serves noticeably slower (see bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per-client-connection read buffer (Pingora's default is 64 KiB).
const CLIENT_READ_BUFFER: usize = 8 << 10;

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "A health-checked, DNS-following HTTP load balancer"
)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration file and exit: 0 when it is valid, 1 otherwise.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Probe the running balancer's /health-check and exit 0 when it answers 200, else 1.
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config else {
        eprintln!("balancer: --config FILE is required (the TOML configuration)");
        return ExitCode::from(2);
    };
    let (config, text) = match Config::load(&path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("balancer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Healthcheck) => {
            match probe::get_ok(
                config.listen,
                proxy::HEALTH_CHECK_PATH,
                Duration::from_secs(2),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "balancer healthcheck: {}{}: {e}",
                        config.listen,
                        proxy::HEALTH_CHECK_PATH
                    );
                    ExitCode::FAILURE
                }
            }
        }
        None if cli.check => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        None => {
            logging::init();
            run(config, path, text)
        }
    }
}

fn run(config: Config, path: PathBuf, text: String) -> ExitCode {
    let server_conf = ServerConf {
        threads: config.threads(),
        // `drain` has waited for the requests in flight (at most the live
        // grace_period) before it lets Pingora stop: nothing is left to sleep for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), server_conf);
    server.bootstrap();

    let listen = config.listen;
    let admin_listen = config.admin_listen;
    let cache = cache::ResponseCache::leak(config.cache.as_ref());
    let config = Arc::new(ArcSwap::from_pointee(config));
    let pool = Arc::new(upstream::Pool::default());
    let in_flight = Arc::new(proxy::InFlight::default());
    let reloaded = Arc::new(tokio::sync::Notify::new());
    let config_path = path.clone();
    let admin_config = Arc::clone(&config);
    let reloader = reload::Reloader::new(path, Arc::clone(&config), Arc::clone(&reloaded), text);

    let upkeep = background_service(
        "upstream upkeep",
        upkeep::Upkeep {
            pool: Arc::clone(&pool),
            config: Arc::clone(&config),
            resolver: discovery::Resolver::default(),
            reloaded,
        },
    );
    let stopping = Arc::new(drain::Stopping::default());
    let drain = drain::Drain {
        in_flight: Arc::clone(&in_flight),
        stopping: Arc::clone(&stopping),
        config: Arc::clone(&config),
    };
    let reload_stats = Arc::clone(&reloader.stats);
    let reloader = background_service("config reload", reloader);
    let connections = Arc::new(connections::Connections::default());
    let balancer = pingora::proxy::http_proxy(
        &server.configuration,
        proxy::Balancer {
            pool: Arc::clone(&pool),
            config: Arc::clone(&config),
            in_flight,
            cache,
            stopping: Arc::clone(&stopping),
        },
    );
    let mut proxy = pingora::services::listening::Service::new(
        "balancer".to_owned(),
        connections::Guarded::new(balancer, config, Arc::clone(&connections), stopping),
    );
    // Pingora reads clients through a 64 KiB buffer each; requests here are
    // small, and at 1,000 connections that buffer alone is 64 MB.
    proxy.add_listener(
        ListenerConfig::tcp(listen.to_string())
            .l4_buffer(L4BufferSettings::new(CLIENT_READ_BUFFER, 1460)),
    );

    if let Some(admin_listen) = admin_listen {
        let mut admin = pingora::services::listening::Service::new(
            "admin".to_owned(),
            admin::Admin {
                token_from_env: std::env::var(admin::TOKEN_ENV)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty()),
                cache,
                pool: Arc::clone(&pool),
                config: Arc::clone(&admin_config),
                config_path,
                reloads: reload_stats,
                connections,
            },
        );
        admin.add_tcp(&admin_listen.to_string());
        server.add_service(admin);
        log::info!("admin listening on {admin_listen}");
    }
    let upkeep = server.add_service(upkeep);
    server.add_service(reloader);
    server.add_service(proxy).add_dependency(&upkeep);
    log::info!("balancer listening on {listen}");
    server.run(RunArgs {
        shutdown_signal: Box::new(drain),
    });
    ExitCode::SUCCESS
}
