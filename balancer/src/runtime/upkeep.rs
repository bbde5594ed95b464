//! Keeps every upstream group's pool current: re-resolves the group's
//! servers every `resolve_interval` and probes every address every
//! `health_check.interval`, each group on its own schedule. The probes and
//! the membership change themselves are `upstream::health`'s; this is the
//! one loop that runs them.
//!
//! It runs as one Pingora background service, so discovery and health checks
//! never race each other, and it reads the snapshot in force on every round
//! (a reloaded file takes effect on the next one; a removed group is no
//! longer kept up, and its requests in flight finish on the backends they have).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::runtime::Live;
use crate::upstream::health::{check_all, refresh_membership};

pub struct Upkeep {
    pub live: Arc<Live>,
    /// Woken when a new configuration is in force: act on it at once.
    pub reloaded: Arc<Notify>,
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
