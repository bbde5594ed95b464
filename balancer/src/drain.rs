//! Graceful stop: after SIGTERM, wait for the requests in flight, then exit 0.
//!
//! Pingora stops accepting on SIGTERM but then sleeps the whole grace period
//! whatever is left to do; under Docker that is time the `docker stop` user
//! waits for nothing. This service ends the process as soon as no request is
//! in flight, or when the grace period is over.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::{sleep, Instant};

use crate::config::Config;
use crate::proxy::InFlight;

/// How long the balancer must be idle before it counts as drained: a client
/// whose response has just been written may still be reading it.
const SETTLE: Duration = Duration::from_millis(100);

pub struct Drain {
    pub in_flight: Arc<InFlight>,
    /// `grace_period` is read when SIGTERM comes, so a reloaded value counts.
    pub config: Arc<ArcSwap<Config>>,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let deadline = Instant::now() + self.config.load().grace_period.0;
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.in_flight.count() == 0 {
                if now.duration_since(*idle_since.get_or_insert(now)) >= SETTLE {
                    log::info!("graceful stop: no request in flight, exiting");
                    break;
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                log::warn!(
                    "graceful stop: grace period over with {} requests still in flight, exiting",
                    self.in_flight.count()
                );
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        std::process::exit(0);
    }
}
