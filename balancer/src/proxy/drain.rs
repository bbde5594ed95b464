//! Graceful stop: on `SIGTERM` (what `docker stop` and every orchestrator
//! send), go on serving for `shutdown_delay`, then drain: serve every
//! request on a connection already accepted or waiting in the listen
//! backlog, then let Pingora shut down; the drain lasts at most `grace_period`.
//!
//! An orchestrator keeps routing new connections to a task for a moment
//! after it signals it, and a client whose connection the kernel completed
//! has chosen this instance: answering either `503` fails a request that
//! costs a few milliseconds to serve. So the drain refuses nothing. When it
//! starts, [`Stopping`] is set: responses close their connection, HTTP/2
//! connections get a `GOAWAY` (the proxy is handed the [`Stopping::watch`]
//! as its shutdown signal), `/health-check` answers `503`; the listening
//! sockets stop completing new connections, and their backlog is still
//! accepted (see `listeners`). The drain is over when the backlog is empty,
//! no accepted connection is still to send its first request (for a moment:
//! [`SILENT_PATIENCE`]) and none is in flight, or when the live
//! `grace_period` is over; only then is Pingora told to terminate, with no
//! grace period of its own left to sleep.
//!
//! Pingora's own graceful path would instead stop accepting at once
//! (resetting the backlog) and then sleep a grace period fixed at start-up.
//! `SIGINT` stops at once; `SIGQUIT` (Pingora's upgrade signal, which this
//! balancer does not use) stops like `SIGTERM`.
//!
//! Open WebSocket tunnels count as requests in flight: they get the grace
//! period too. When it is over, [`Stopping::grace_over`] tells them to
//! close, and the drain waits a moment for their access-log lines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::proxy::connections::Connections;
use crate::proxy::listeners::Listeners;
use crate::proxy::InFlight;
use crate::runtime::Live;

/// How long the balancer must have nothing to do before it counts as
/// drained: a client whose response has just been written may still be
/// reading it, and a connection just accepted may still be in its TLS
/// handshake, where it is not counted yet.
const SETTLE: Duration = Duration::from_millis(200);

/// How long, once nothing else is left, the drain still waits for accepted
/// connections that have not sent a request. A client sends its request as
/// soon as it has connected; one that stays silent this long (a browser's
/// preconnected socket) is not about to, and must not hold the stop for the
/// whole grace period.
const SILENT_PATIENCE: Duration = Duration::from_secs(2);

/// How long the tunnels closed at the end of the grace period have to
/// close and log before the process exits.
const TUNNELS_CLOSE: Duration = Duration::from_secs(1);

/// Whether the process is draining; the proxy and the connection guard read it.
#[derive(Debug)]
pub struct Stopping {
    set: AtomicBool,
    watch: watch::Sender<bool>,
    /// Becomes `true` when the grace period is over: open tunnels close.
    grace_over: watch::Sender<bool>,
}

impl Default for Stopping {
    fn default() -> Self {
        Stopping {
            set: AtomicBool::new(false),
            watch: watch::Sender::new(false),
            grace_over: watch::Sender::new(false),
        }
    }
}

impl Stopping {
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    /// Turns `true` when the drain starts: what Pingora's HTTP server reads
    /// to stop keeping connections alive and to send HTTP/2 a `GOAWAY`.
    pub fn watch(&self) -> ShutdownWatch {
        self.watch.subscribe()
    }

    fn set(&self) {
        self.set.store(true, Ordering::Relaxed);
        self.watch.send_replace(true);
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
    pub connections: Arc<Connections>,
    pub stopping: Arc<Stopping>,
    /// `shutdown_delay` and `grace_period` are read when SIGTERM comes, so
    /// reloaded values count.
    pub live: Arc<Live>,
    /// The proxy's listening addresses (plain and TLS).
    pub listen: Vec<SocketAddr>,
}

impl Drain {
    /// `shutdown_delay` of serving as usual, then the drain.
    async fn stop(&self, signal_name: &str) {
        let delay = self.live.load().shutdown_delay;
        if !delay.is_zero() {
            log::info!(
                "{signal_name}: serving as usual for {} (shutdown_delay), then draining",
                humantime::format_duration(delay)
            );
            sleep(delay).await;
        }
        self.drain(signal_name).await
    }

    /// Serves what was accepted or waits in the backlog, at most the grace
    /// period in force.
    async fn drain(&self, signal_name: &str) {
        let grace = self.live.load().grace_period;
        let shown = humantime::format_duration(grace);
        self.stopping.set();
        let listeners = Listeners::find(&self.listen);
        if listeners.is_empty() {
            log::warn!("graceful stop: the listening sockets were not found; they go on accepting until the drain is over");
        } else if let Err(e) = listeners.stop_completing() {
            // EPERM: the socket filter needs CAP_NET_ADMIN on some kernels,
            // which an unprivileged container does not have.
            log::warn!("graceful stop: cannot stop the listening sockets from completing new connections ({e}); they go on accepting until the drain is over, and a connection completed just before they close is reset (with reuse_port, the host's net.ipv4.tcp_migrate_req = 1 hands it to the other listener instead)");
        }
        log::info!(
            "{signal_name}: graceful stop, grace period {shown}: no new connections, {} requests in flight",
            self.in_flight.count()
        );
        let deadline = Instant::now() + grace;
        let mut idle_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.in_flight.count() == 0 && listeners.backlog_empty() {
                let idle = now.duration_since(*idle_since.get_or_insert(now));
                let silent = self.connections.fresh();
                if idle >= SETTLE && (silent == 0 || idle >= SILENT_PATIENCE) {
                    log::info!(
                        "graceful stop: no request in flight, exiting{}",
                        match silent {
                            0 => String::new(),
                            n => format!(" ({n} connections that sent no request closed)"),
                        }
                    );
                    return;
                }
            } else {
                idle_since = None;
            }
            if now >= deadline {
                log::warn!(
                    "graceful stop: grace period {shown} over with {} requests still in flight, exiting",
                    self.in_flight.count()
                );
                self.close_tunnels().await;
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

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
            _ = self.stop(name) => {}
            _ = int.recv() => log::info!("SIGINT: stopping now"),
        }
        ShutdownSignal::GracefulTerminate
    }
}
