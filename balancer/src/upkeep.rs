//! Keeps the upstream pool current: re-resolves the configured servers every
//! `resolve_interval` and probes every address every `health_check.interval`.
//!
//! It runs as one Pingora background service, so discovery and health checks
//! never race each other, and it reads the configuration in force on every
//! round (a reloaded file takes effect on the next one).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck as _, HttpHealthCheck};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::config::{Config, HealthCheck};
use crate::discovery::Resolver;
use crate::upstream::{Backend, Pool};

pub struct Upkeep {
    pub pool: Arc<Pool>,
    pub config: Arc<ArcSwap<Config>>,
    pub resolver: Resolver,
    /// Woken when a new configuration is in force: act on it at once.
    pub reloaded: Arc<Notify>,
}

impl Upkeep {
    /// Re-resolves the servers and swaps in the new membership, logging each
    /// change. With checks on, new addresses are probed before they are
    /// published, so a replaced list has its healthy backends from the start.
    pub async fn refresh_membership(&self) {
        let config = self.config.load_full();
        let found = self.resolver.resolve(config.upstream.servers.iter()).await;
        let checks = config.upstream.health_check.as_ref();
        let (members, change) = self.pool.plan(&found, checks.is_none());
        if let Some(hc) = checks {
            check_all(&change.added, hc).await;
        } else {
            self.pool.trust_all();
        }
        self.pool.publish(members, &change);
        for b in &change.added {
            let health = if b.is_healthy() {
                "healthy"
            } else {
                "not healthy yet"
            };
            log::info!("upstream address added {} ({}), {health}", b.addr, b.server);
        }
        for b in &change.removed {
            log::info!("upstream address removed {} ({})", b.addr, b.server);
        }
        if found.is_empty() {
            log::warn!("no upstream address is known: every request gets 503 until one resolves");
        }
    }
}

/// Probes every backend in `backends` once, all at the same time.
async fn check_all(backends: &[Arc<Backend>], hc: &HealthCheck) {
    let probes = backends.iter().map(|backend| async move {
        let outcome = probe(backend, hc).await;
        let flip = backend.record_check(
            &outcome,
            hc.healthy_threshold.get(),
            hc.unhealthy_threshold.get(),
        );
        match (flip, outcome) {
            (Some(true), _) => {
                log::info!("upstream {} ({}) is healthy", backend.addr, backend.server)
            }
            (Some(false), Err(why)) => log::warn!(
                "upstream {} ({}) is unhealthy: {why}",
                backend.addr,
                backend.server
            ),
            _ => {}
        }
    });
    // Polled together: a hung backend must not delay the others' checks.
    futures::future::join_all(probes).await;
}

/// One HTTP probe of `hc.path` on `backend`, bounded by `hc.timeout`.
async fn probe(backend: &Backend, hc: &HealthCheck) -> Result<(), String> {
    let mut check = HttpHealthCheck::new(&backend.server, false);
    let mut req = RequestHeader::build("GET", hc.path.as_str().as_bytes(), None)
        .map_err(|e| e.to_string())?;
    req.insert_header("host", &*backend.server)
        .map_err(|e| e.to_string())?;
    req.insert_header("user-agent", "balancer-health-check")
        .map_err(|e| e.to_string())?;
    check.req = req;
    check.peer_template.options.connection_timeout = Some(hc.timeout.0);
    check.peer_template.options.read_timeout = Some(hc.timeout.0);
    check.peer_template.options.write_timeout = Some(hc.timeout.0);
    let target = pingora::lb::Backend::new(&backend.addr.to_string()).map_err(|e| e.to_string())?;
    // The connector's own timeouts cover connect and header reads; this bounds the whole probe.
    match tokio::time::timeout(hc.timeout.0 * 2, check.check(&target)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string().trim().to_owned()),
        Err(_) => Err(format!("no answer within {}", hc.timeout)),
    }
}

#[async_trait]
impl BackgroundService for Upkeep {
    /// Ready once the servers have been resolved (and new addresses probed)
    /// the first time: the proxy listens only then, so its first requests
    /// do not meet an empty pool.
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        self.refresh_membership().await;
        ready.notify_ready();
        self.start(shutdown).await;
    }

    async fn start(&self, mut shutdown: ShutdownWatch) {
        let first_interval = self.config.load().upstream.resolve_interval.0;
        let mut next_resolve = Instant::now() + first_interval;
        let mut next_check = Instant::now();
        loop {
            let config = self.config.load_full();
            let now = Instant::now();
            if now >= next_resolve {
                self.refresh_membership().await;
                next_resolve = Instant::now() + config.upstream.resolve_interval.0;
            }
            let due = match &config.upstream.health_check {
                Some(hc) => {
                    if now >= next_check {
                        check_all(&self.pool.members(), hc).await;
                        next_check = Instant::now() + hc.interval.0;
                    }
                    next_resolve.min(next_check)
                }
                None => next_resolve,
            };
            tokio::select! {
                _ = sleep_until(due.max(Instant::now() + Duration::from_millis(10))) => {}
                _ = self.reloaded.notified() => {
                    next_resolve = Instant::now();
                    next_check = Instant::now();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
