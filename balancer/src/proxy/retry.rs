//! The retry policy, in one place: which backend a request tries next, and
//! whether a try that failed is made again elsewhere.
//!
//! - A connect that failed reached nothing, so any request may go to
//!   another backend of its group; with active checks on, it also counts as
//!   a failed check, so a dead backend leaves the rotation at once.
//! - A backend that drops an idempotent request without answering it, on a
//!   fresh connection, is left for another one. On a reused connection the
//!   backend may just have closed an idle connection: it stays a candidate.
//! - A timeout is answered `504` rather than doubled on another backend (a
//!   reused connection that timed out is still retried: Pingora's rule).
//! - A request that is not idempotent, or whose body no longer fits
//!   Pingora's retry buffer, is never sent twice once it reached a backend.
//! - A backend an extension chose is tried once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pingora::http::RequestHeader;
use pingora::{Error, ErrorType};

use crate::telemetry::metrics;
use crate::upstream::Group;
use crate::upstream::{Backend, BackendGuard};

/// The tries of one request.
#[derive(Default)]
pub struct Attempts {
    /// Tries made (1 + retries).
    tries: u32,
    /// The backends that failed this request: its retries go elsewhere.
    unreachable: Vec<SocketAddr>,
    /// The backend of the current try.
    current: Option<Arc<Backend>>,
    /// Counts the request in flight at `current` until its response has arrived.
    at_backend: Option<BackendGuard>,
}

/// How a try that reached a backend failed.
pub struct ProxyFailure {
    /// The request may be sent again: idempotent, its body still held, and
    /// nothing of an answer sent to the client yet.
    pub replayable: bool,
    /// The connection to the backend was a reused one.
    pub reused: bool,
}

impl Attempts {
    /// The next backend of `group` for the request `req`, past those that
    /// failed it; counted in flight at it.
    pub fn pick(
        &mut self,
        group: &Group,
        req: &RequestHeader,
        client_ip: Option<IpAddr>,
    ) -> Option<Arc<Backend>> {
        let backend = group.select(req, client_ip, &self.unreachable)?;
        self.at_backend = Some(backend.enter());
        self.current = Some(Arc::clone(&backend));
        self.tries += 1;
        Some(backend)
    }

    /// A try of `addr`, an address an extension chose: never tried again.
    pub fn pick_address(&mut self, addr: SocketAddr) {
        self.unreachable.push(addr);
        self.tries += 1;
    }

    /// The connect of this try failed: `e` is marked for a retry when
    /// another backend of `group` is left.
    pub fn connect_failed(&mut self, group: &Group, e: &mut Error) {
        if let Some(backend) = &self.current {
            group.count_failure(backend, &e.to_string());
            self.unreachable.push(backend.addr);
        }
        if group.has_candidate(&self.unreachable) {
            e.set_retry(true);
            metrics::count_retry();
        }
    }

    /// This try failed after it reached its backend: `e` is marked for a
    /// retry, or not, by the rules above.
    pub fn proxy_failed(&mut self, group: Option<&Group>, how: ProxyFailure, e: &mut Error) {
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        if !how.replayable || timed_out {
            if how.replayable {
                e.retry.decide_reuse(how.reused);
                if e.retry() {
                    metrics::count_retry();
                }
            } else {
                e.set_retry(false);
            }
            return;
        }
        if !how.reused {
            if let Some(current) = &self.current {
                self.unreachable.push(current.addr);
            }
        }
        let candidate = group.is_some_and(|g| g.has_candidate(&self.unreachable));
        let retry = how.reused || candidate;
        e.set_retry(retry);
        if retry {
            metrics::count_retry();
        }
    }

    /// The response of the current try has arrived whole.
    pub fn response_done(&mut self) {
        self.at_backend = None;
    }

    /// Tries made so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The backend of the current try (none for an address an extension chose).
    pub fn current(&self) -> Option<&Arc<Backend>> {
        self.current.as_ref()
    }
}
