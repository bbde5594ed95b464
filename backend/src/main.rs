//! The demo application that stands behind the balancer: the Flask app of the
//! "nginx -> WSGI -> Flask" sample, rewritten on actix-web.
//!
//! It owns the routes (`/`, `/cache-me`, `/info`, `/health`) and the
//! `healthcheck` subcommand that Docker runs inside images without curl.
//! It knows nothing about the balancer beyond the forwarded headers it reports.

mod routes;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backend",
    version,
    about = "The demo web application behind the balancer"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8000")]
    listen: SocketAddr,
    /// Worker threads (default: number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Probe a running backend's /health and exit 0 when it answers 200, else 1.
    Healthcheck {
        /// The address the backend listens on (0.0.0.0 is probed on loopback).
        #[arg(long, default_value = "0.0.0.0:8000")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Healthcheck { listen }) = cli.command {
        return match probe::get_ok(listen, "/health", Duration::from_secs(2)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backend healthcheck: {listen}/health: {e}");
                ExitCode::FAILURE
            }
        };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let workers = cli
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match run(cli.listen, workers) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backend: cannot serve on {}: {e}", cli.listen);
            ExitCode::FAILURE
        }
    }
}

#[actix_web::main]
async fn run(listen: SocketAddr, workers: usize) -> std::io::Result<()> {
    let instance = routes::Instance::from_env();
    log::info!(
        "backend {} listening on {listen} with {workers} workers",
        instance.id
    );
    actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(actix_web::web::Data::new(instance.clone()))
            .configure(routes::configure)
    })
    .workers(workers)
    // Docker sends SIGTERM and waits 10 s; finish in-flight requests well before that.
    .shutdown_timeout(5)
    .bind(listen)?
    .run()
    .await
}
