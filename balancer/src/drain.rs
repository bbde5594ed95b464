//! Graceful stop: after SIGTERM, stop listening, wait for the requests in
//! flight, then exit 0.
//!
//! Pingora stops accepting on SIGTERM but keeps its listening sockets open
//! (for a graceful upgrade) and then sleeps the whole grace period whatever
//! is left to do. A socket left open lets the kernel complete handshakes that
//! nobody will ever answer, and the sleep is time a `docker stop` user waits
//! for nothing. So this service closes the listening sockets at once (new
//! clients are refused, and can go elsewhere) and ends the process as soon
//! as no request is in flight, or when the grace period is over.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
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
    /// The addresses this process listens on; closed when SIGTERM comes.
    pub listening: Vec<SocketAddr>,
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
        stop_listening(&self.listening);
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

/// Shuts down this process's listening sockets bound to `addrs`, found among
/// its open file descriptors (Pingora does not hand them out).
fn stop_listening(addrs: &[SocketAddr]) {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if is_listener_on(fd, addrs) {
            // SAFETY: shutdown() on a descriptor this process owns; it stays open
            // (Pingora closes it at exit), it only stops taking connections.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

fn is_listener_on(fd: i32, addrs: &[SocketAddr]) -> bool {
    // SAFETY: a borrowed view of the descriptor, forgotten before it is dropped.
    let socket = std::mem::ManuallyDrop::new(unsafe {
        <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let ok = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    } == 0;
    ok && listening == 1 && socket.local_addr().is_ok_and(|a| addrs.contains(&a))
}
