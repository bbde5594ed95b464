//! The command line: `balancer --config FILE [--check]` and
//! `balancer healthcheck`. [`main_with`] is the whole command, with the
//! extensions a program of your own brings (none for `balancer` itself).

#[path = "../../backend/src/probe.rs"]
mod probe;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::extension::Extension;
use crate::{admin, proxy, server};

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "A programmable, health-checked, DNS-following HTTP load balancer"
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

/// Runs the command line with `extensions` in the request path.
pub fn main_with(extensions: Vec<Arc<dyn Extension>>) -> ExitCode {
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
            for warning in config.warnings(&text) {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        None => {
            admin::logging::init();
            for warning in config.warnings(&text) {
                log::warn!("{}: {warning}", path.display());
            }
            server::run(config, path, text, extensions)
        }
    }
}
