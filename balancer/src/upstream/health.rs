//! Keeps every upstream group's pool current: re-resolves the group's
//! servers every `resolve_interval` and probes every address every
//! `health_check.interval`, each group on its own schedule.
//!
//! It runs as one Pingora background service, so discovery and health checks
//! never race each other, and it reads the snapshot in force on every round
//! (a reloaded file takes effect on the next one; a removed group is no
//! longer kept up, and its requests in flight finish on the backends they have).

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck as _;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::config::HealthCheck;
use crate::runtime::Live;
use crate::upstream::{Backend, Group};

pub struct Upkeep {
    pub live: Arc<Live>,
    /// Woken when a new configuration is in force: act on it at once.
    pub reloaded: Arc<Notify>,
}

/// Re-resolves a group's servers and swaps in the new membership, logging
/// each change. With checks on, new addresses are probed before they are
/// published, so a replaced list has its healthy backends from the start.
pub async fn refresh_membership(group: &Group) {
    let pool = &group.state.pool;
    let found = group.state.resolver.resolve(group.servers.iter()).await;
    let checks = group.health_check.as_ref();
    let (members, change) = pool.plan(&found, checks.is_none());
    if let Some(hc) = checks {
        // Their health goes on the "address added" line below, not on a line of its own.
        check_all(group, &change.added, hc, false).await;
    } else {
        pool.trust_all();
    }
    pool.publish(members, &change);
    let name = &group.name;
    for b in &change.added {
        let health = if b.is_healthy() {
            "healthy"
        } else {
            "not healthy yet"
        };
        log::info!(
            "upstream {name}: address added {} ({}), {health}",
            b.addr,
            b.server
        );
    }
    for b in &change.removed {
        log::info!("upstream {name}: address removed {} ({})", b.addr, b.server);
    }
    if found.is_empty() {
        log::warn!("upstream {name}: no address is known: its requests get 503 until one resolves");
    }
}

/// Probes every backend in `backends` once, all at the same time; a change
/// of health is logged when `log_changes`.
async fn check_all(group: &Group, backends: &[Arc<Backend>], hc: &HealthCheck, log_changes: bool) {
    let probes = backends.iter().map(|backend| async move {
        let outcome = probe(group, backend, hc).await;
        let changed = backend.record_check(outcome, hc);
        if log_changes {
            backend.report(changed, &group.name);
        }
    });
    // Polled together: a hung backend must not delay the others' checks.
    futures::future::join_all(probes).await;
}

/// One HTTP probe of `hc.path` on `backend`, bounded by `hc.timeout`.
/// It speaks to the backend as requests do: TLS with the group's SNI, CAs
/// and verification, HTTP/2 in clear text for an `h2c` group.
async fn probe(group: &Group, backend: &Backend, hc: &HealthCheck) -> Result<(), String> {
    let mut check = group.health_check_for(&backend.server);
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

/// When a group is next due for each kind of upkeep.
struct Due {
    resolve: Instant,
    check: Instant,
}

#[async_trait]
impl BackgroundService for Upkeep {
    /// Ready once every group's servers have been resolved (and new
    /// addresses probed) the first time: the proxy listens only then, so its
    /// first requests do not meet an empty pool.
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let snapshot = self.live.load_full();
        futures::future::join_all(snapshot.groups.values().map(|g| refresh_membership(g))).await;
        ready.notify_ready();
        self.start(shutdown).await;
    }

    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut due: HashMap<String, Due> = HashMap::new();
        let first = self.live.load_full();
        for (name, group) in &first.groups {
            due.insert(
                name.clone(),
                Due {
                    resolve: Instant::now() + group.resolve_interval,
                    check: Instant::now(),
                },
            );
        }
        loop {
            let snapshot = self.live.load_full();
            due.retain(|name, _| snapshot.groups.contains_key(name));
            let mut next = Instant::now() + Duration::from_secs(3600);
            let mut work = Vec::new();
            for (name, group) in &snapshot.groups {
                let now = Instant::now();
                let when = due.entry(name.clone()).or_insert(Due {
                    resolve: now,
                    check: now,
                });
                let resolve = now >= when.resolve;
                let check = group.health_check.as_ref().filter(|_| now >= when.check);
                if resolve {
                    when.resolve = now + group.resolve_interval;
                }
                if let Some(hc) = check {
                    when.check = now + hc.interval.0;
                }
                next = next.min(when.resolve);
                if group.health_check.is_some() {
                    next = next.min(when.check);
                }
                if resolve || check.is_some() {
                    work.push(async move {
                        if resolve {
                            refresh_membership(group).await;
                        }
                        if let Some(hc) = check {
                            check_all(group, &group.state.pool.members(), hc, true).await;
                        }
                    });
                }
            }
            // Groups are kept up side by side: one slow group does not hold the others back.
            futures::future::join_all(work).await;
            tokio::select! {
                _ = sleep_until(next.max(Instant::now() + Duration::from_millis(10))) => {}
                _ = self.reloaded.notified() => {
                    let now = Instant::now();
                    for when in due.values_mut() {
                        when.resolve = now;
                        when.check = now;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
