//! The command line: `balancer --config FILE [--check]`,
//! `balancer healthcheck` and `balancer cert --self-signed`. [`main_with`] is the whole command, with the
//! extension kinds a program of your own brings (`balancer` itself has only
//! the built-in `lua`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::extension::Registry;
use crate::{proxy, server, telemetry, tls};

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "A programmable, health-checked, DNS-following HTTP load balancer"
)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
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
    Healthcheck {
        /// The running balancer's TOML configuration file (where it listens).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a development certificate: a CA (ca.pem) and, signed by it, a
    /// certificate (cert.pem, with the CA) and its key (key.pem) for --host.
    Cert {
        /// A self-signed development CA (the only kind this command makes).
        #[arg(long, required = true)]
        self_signed: bool,
        /// A name (or IP address) the certificate is for; repeat for more.
        #[arg(long = "host", required = true, value_name = "NAME")]
        hosts: Vec<String>,
        /// The directory to write ca.pem, cert.pem and key.pem into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Runs the command line with the extension kinds of `registry` (to which
/// the balancer's own are added): the configuration's `[extensions.NAME]`
/// instances are built from them, by `--check` too.
pub fn main_with(registry: Registry) -> ExitCode {
    let mut cli = Cli::parse();
    // `balancer healthcheck --config FILE` and `balancer --config FILE healthcheck` alike.
    if let Some(Command::Healthcheck { config }) = &mut cli.command {
        if let Some(path) = config.take() {
            cli.config = Some(path);
        }
    }
    if let Some(Command::Cert { hosts, out, .. }) = &cli.command {
        return cert(hosts, out);
    }
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
        Some(Command::Healthcheck { .. }) => healthcheck(&config),
        Some(Command::Cert { .. }) => ExitCode::SUCCESS,
        None if cli.check => check(&path, &config, &text, &registry),
        None => {
            telemetry::logging::init();
            for warning in config.warnings(&text) {
                log::warn!("{}: {warning}", path.display());
            }
            server::run(config, path, text, registry)
        }
    }
}

/// `balancer cert --self-signed`: writes the development CA and certificate.
fn cert(hosts: &[String], out: &Path) -> ExitCode {
    match tls::self_signed::write(hosts, out) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("balancer cert: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `balancer healthcheck`: whether the balancer serving `config` answers.
fn healthcheck(config: &Config) -> ExitCode {
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

/// `--check`: everything a start would refuse (certificates, ACME, files
/// the snapshot reads, the extension instances), without serving; warnings too.
fn check(path: &Path, config: &Config, text: &str, registry: &Registry) -> ExitCode {
    let (mut errors, mut cert_warnings) = tls::check(config);
    let (acme_errors, acme_warnings) = tls::acme::check(config);
    errors.extend(acme_errors);
    cert_warnings.extend(acme_warnings);
    if let Err(e) = crate::runtime::Snapshot::compile(config.clone(), None, registry) {
        errors.push(e);
    }
    for warning in config.warnings(text).into_iter().chain(cert_warnings) {
        eprintln!("{}: warning: {warning}", path.display());
    }
    if !errors.is_empty() {
        for e in errors {
            eprintln!("balancer: {}: {e}", path.display());
        }
        return ExitCode::FAILURE;
    }
    println!("{}: configuration is valid", path.display());
    ExitCode::SUCCESS
}
