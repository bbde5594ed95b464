//! Graceful stop: on `SIGTERM` (what `docker stop` sends), finish the
//! requests in flight, then let Pingora shut down; at most `grace_period`.
//!
//! Pingora's own graceful path broadcasts the stop and then sleeps a grace
//! period fixed at start-up (300 s by default), whatever is left to do. The
//! balancer instead hands Pingora a [`Drain`] as its shutdown signal: on
//! `SIGTERM` it marks the process as stopping (new connections are answered
//! `503` and closed, responses close their connection), waits until no
//! request is in flight or the live `grace_period` is over, and only then
//! tells Pingora to terminate, with no grace period of its own left to sleep.
//! `SIGINT` stops at once; `SIGQUIT` (Pingora's upgrade signal, which this
//! balancer does not use) drains like `SIGTERM`.
//!
//! Open WebSocket tunnels count as requests in flight: they get the grace
//! period too. When it is over, [`Stopping::grace_over`] tells them to
//! close, and the drain waits a moment for their access-log lines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::proxy::InFlight;
use crate::runtime::Live;

/// How long the balancer must be idle before it counts as drained: a client
/// whose response has just been written may still be reading it.
const SETTLE: Duration = Duration::from_millis(100);

/// How long the tunnels closed at the end of the grace period have to
/// close and log before the process exits.
const TUNNELS_CLOSE: Duration = Duration::from_secs(1);

/// Whether the process is draining; the proxy and the connection guard read it.
#[derive(Debug)]
pub struct Stopping {
    draining: AtomicBool,
    /// Becomes `true` when the grace period is over: open tunnels close.
    grace_over: watch::Sender<bool>,
}

impl Default for Stopping {
    fn default() -> Self {
        Stopping {
            draining: AtomicBool::new(false),
            grace_over: watch::channel(false).0,
        }
    }
}

impl Stopping {
    pub fn is_set(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Resolves once a graceful stop's grace period is over (never, unless
    /// one is under way).
    pub async fn grace_over(&self) {
        let mut over = self.grace_over.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = over.wait_for(|over| *over).await;
    }
}

pub struct Drain {
    pub in_flight: Arc<InFlight>,
    pub stopping: Arc<Stopping>,
    /// `grace_period` is read when SIGTERM comes, so a reloaded value counts.
    pub live: Arc<Live>,
}

impl Drain {
    /// Waits for the requests in flight, at most the grace period in force.
    async fn drain(&self, signal_name: &str) {
        let grace = self.live.load().config.grace_period;
        self.stopping.set();
        log::info!(
            "{signal_name}: graceful stop, grace period {grace}: no new connections, {} requests in flight",
            self.in_flight.count()
        );
        let deadline = Instant::now() + grace.0;
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.in_flight.count() == 0 {
                if now.duration_since(*idle_since.get_or_insert(now)) >= SETTLE {
                    log::info!("graceful stop: no request in flight, exiting");
                    return;
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                log::warn!(
                    "graceful stop: grace period {grace} over with {} requests still in flight, exiting",
                    self.in_flight.count()
                );
                self.close_tunnels().await;
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drain {
    /// Tells open tunnels to close, and gives them [`TUNNELS_CLOSE`] to do so.
    async fn close_tunnels(&self) {
        self.stopping.grace_over.send_replace(true);
        let deadline = Instant::now() + TUNNELS_CLOSE;
        while super::tunnel::open() > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Drain {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!(
                "cannot listen for SIGTERM, SIGINT and SIGQUIT: stop the balancer with SIGKILL"
            );
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = quit.recv() => "SIGQUIT",
            _ = int.recv() => {
                log::info!("SIGINT: stopping now, without waiting for requests in flight");
                return ShutdownSignal::FastShutdown;
            }
        };
        tokio::select! {
            _ = self.drain(name) => {}
            _ = int.recv() => log::info!("SIGINT: stopping now"),
        }
        ShutdownSignal::GracefulTerminate
    }
}
