//! One group's membership and health, a round at a time: its servers
//! re-resolved and the new membership published ([`refresh_membership`]),
//! and its addresses probed as its requests reach them ([`check_all`]).
//! When each round runs, for every group of the snapshot in force, is the
//! upkeep loop's (`runtime::upkeep`).

use std::sync::Arc;

use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck as _;

use crate::config::HealthCheck;
use crate::upstream::{Backend, Group};

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
pub async fn check_all(
    group: &Group,
    backends: &[Arc<Backend>],
    hc: &HealthCheck,
    log_changes: bool,
) {
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
