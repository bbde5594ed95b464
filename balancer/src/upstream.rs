//! The upstream pool: the backend addresses in force, each with its health,
//! and the round-robin choice among the healthy ones.
//!
//! Pingora's `LoadBalancer` trusts a new backend at once and keeps its health
//! out of reach; this pool starts a new address unhealthy until it passes a
//! check (when checks are on) and keeps per-backend state that the access log,
//! the retry logic and the status API read. Finding the addresses
//! (`discovery`) and probing them (`health`) live elsewhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

/// One backend address and what is known about it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` as text, made once: it labels metrics and log lines.
    pub label: String,
    /// The `upstream.servers` entry it came from (`backend:8000`).
    pub server: Arc<str>,
    healthy: AtomicBool,
    /// False until the backend has been healthy once: a new replica is admitted
    /// on its first pass, a returning one only after `healthy_threshold` passes.
    admitted: AtomicBool,
    consecutive_passes: AtomicU32,
    consecutive_failures: AtomicU32,
    requests: AtomicU64,
    in_flight: AtomicI64,
    last_check: Mutex<Option<CheckRecord>>,
}

/// The outcome of the last health check of a backend.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    pub at: SystemTime,
    /// `None` when it passed, else why it failed.
    pub error: Option<String>,
}

impl Backend {
    fn new(addr: SocketAddr, server: Arc<str>, healthy: bool) -> Backend {
        Backend {
            addr,
            label: addr.to_string(),
            server,
            healthy: AtomicBool::new(healthy),
            admitted: AtomicBool::new(healthy),
            consecutive_passes: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            last_check: Mutex::new(None),
        }
    }

    /// Requests being proxied to this backend right now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight here until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> BackendGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        BackendGuard(Arc::clone(self))
    }

    pub fn last_check(&self) -> Option<CheckRecord> {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records an active health check's outcome and feeds it to [`Backend::observe`].
    pub fn record_check(
        &self,
        outcome: &Result<(), String>,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(CheckRecord {
            at: SystemTime::now(),
            error: outcome.as_ref().err().cloned(),
        });
        self.observe(outcome.is_ok(), healthy_threshold, unhealthy_threshold)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether this backend may take a request that already failed on `skip`.
    fn takes(&self, skip: &[SocketAddr]) -> bool {
        self.is_healthy() && !skip.contains(&self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Records one health-check result; returns the new health when it flipped.
    /// A backend that has never been healthy is admitted on its first pass.
    pub fn observe(
        &self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let (this, other, threshold) = if passed {
            (
                &self.consecutive_passes,
                &self.consecutive_failures,
                healthy_threshold,
            )
        } else {
            (
                &self.consecutive_failures,
                &self.consecutive_passes,
                unhealthy_threshold,
            )
        };
        other.store(0, Ordering::Relaxed);
        let streak = this.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let was_healthy = self.is_healthy();
        let first_admission = passed && !self.admitted.load(Ordering::Relaxed);
        let flips = passed != was_healthy && (streak >= threshold || first_admission);
        if flips {
            self.healthy.store(passed, Ordering::Relaxed);
            self.admitted.store(true, Ordering::Relaxed);
            Some(passed)
        } else {
            None
        }
    }
}

/// A request in flight to a backend; see [`Backend::enter`].
pub struct BackendGuard(Arc<Backend>);

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The current set of backends, replaced as a whole when discovery finds a change.
#[derive(Default)]
pub struct Pool {
    members: ArcSwap<Vec<Arc<Backend>>>,
    next: AtomicUsize,
}

/// What a membership change does.
#[derive(Debug, Default)]
pub struct Change {
    pub added: Vec<Arc<Backend>>,
    pub removed: Vec<Arc<Backend>>,
}

impl Pool {
    /// The next healthy backend in round-robin order that is not in `skip`
    /// (the ones that already failed this request), or `None`.
    pub fn select(&self, skip: &[SocketAddr]) -> Option<Arc<Backend>> {
        let members = self.members.load();
        let eligible = |b: &&Arc<Backend>| b.takes(skip);
        // Counting over the eligible backends only keeps the turns even when
        // some are down (skipping ahead would give the next one a double share).
        let count = members.iter().filter(eligible).count();
        if count == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let chosen = members.iter().filter(eligible).nth(turn)?;
        chosen.requests.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(chosen))
    }

    /// Whether a healthy backend outside `skip` exists, i.e. a retry has somewhere to go.
    pub fn has_candidate(&self, skip: &[SocketAddr]) -> bool {
        self.members.load().iter().any(|b| b.takes(skip))
    }

    pub fn members(&self) -> Arc<Vec<Arc<Backend>>> {
        self.members.load_full()
    }

    /// Plans and publishes at once (the tests' shorthand).
    #[cfg(test)]
    pub fn replace_now(&self, found: &BTreeMap<SocketAddr, Arc<str>>, trust_new: bool) -> Change {
        let (members, change) = self.plan(found, trust_new);
        self.publish(members, &change);
        change
    }

    /// The membership `found` (address -> server entry) would make, without
    /// making it yet: the new backends in it can be checked before any request
    /// can reach them. Backends that stay keep their state; new ones start
    /// healthy only when `trust_new` (when no health check will admit them).
    pub fn plan(
        &self,
        found: &BTreeMap<SocketAddr, Arc<str>>,
        trust_new: bool,
    ) -> (Vec<Arc<Backend>>, Change) {
        let old = self.members.load_full();
        let mut change = Change::default();
        let members: Vec<Arc<Backend>> = found
            .iter()
            .map(|(addr, server)| {
                old.iter()
                    .find(|b| b.addr == *addr && b.server == *server)
                    .cloned()
                    .unwrap_or_else(|| {
                        let backend = Arc::new(Backend::new(*addr, Arc::clone(server), trust_new));
                        change.added.push(Arc::clone(&backend));
                        backend
                    })
            })
            .collect();
        for b in old.iter() {
            if found.get(&b.addr).is_none_or(|s| *s != b.server) {
                change.removed.push(Arc::clone(b));
            }
        }
        (members, change)
    }

    /// Makes a planned membership the one requests see.
    pub fn publish(&self, members: Vec<Arc<Backend>>, change: &Change) {
        if !change.added.is_empty() || !change.removed.is_empty() {
            self.members.store(Arc::new(members));
        }
    }

    /// Marks every backend healthy: with health checks turned off, nothing
    /// else would ever bring a backend that was marked down back.
    pub fn trust_all(&self) {
        for b in self.members.load().iter() {
            b.healthy.store(true, Ordering::Relaxed);
            b.admitted.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(addrs: &[&str]) -> BTreeMap<SocketAddr, Arc<str>> {
        addrs
            .iter()
            .map(|a| (a.parse().unwrap(), Arc::from("backend:8000")))
            .collect()
    }

    fn picks(pool: &Pool, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                pool.select(&[])
                    .map_or("none".into(), |b| b.addr.to_string())
            })
            .collect()
    }

    #[test]
    fn round_robin_visits_every_healthy_backend_in_turn() {
        let pool = Pool::default();
        pool.replace_now(&found(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]), true);
        let mut seen = picks(&pool, 6);
        assert_eq!(seen[..3], seen[3..], "the order repeats");
        seen.truncate(3);
        seen.sort();
        assert_eq!(seen, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
    }

    #[test]
    fn unhealthy_and_already_tried_backends_are_skipped() {
        let pool = Pool::default();
        pool.replace_now(&found(&["10.0.0.1:80", "10.0.0.2:80"]), true);
        let first = pool.members()[0].clone();
        assert_eq!(
            first.observe(false, 2, 2),
            None,
            "one failure is below the threshold"
        );
        assert_eq!(first.observe(false, 2, 2), Some(false));
        assert_eq!(picks(&pool, 3), ["10.0.0.2:80"; 3]);
        let second: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert!(pool.select(&[second]).is_none(), "nothing is left to try");
        pool.replace_now(&found(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]), true);
        let mut turns = picks(&pool, 4);
        turns.sort();
        assert_eq!(
            turns,
            ["10.0.0.2:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.3:80"],
            "even shares"
        );
        assert_eq!(first.observe(true, 2, 2), None);
        assert_eq!(
            first.observe(true, 2, 2),
            Some(true),
            "back after two passes"
        );
        assert!(pool.select(&[second]).is_some());
    }

    #[test]
    fn new_backends_wait_for_their_first_pass_when_checks_are_on() {
        let pool = Pool::default();
        let change = pool.replace_now(&found(&["10.0.0.1:80"]), false);
        assert_eq!(change.added.len(), 1);
        assert!(pool.select(&[]).is_none());
        assert_eq!(
            pool.members()[0].observe(true, 3, 2),
            Some(true),
            "admitted on the first pass"
        );
        assert!(pool.select(&[]).is_some());
    }

    #[test]
    fn replacing_keeps_the_state_of_backends_that_stay() {
        let pool = Pool::default();
        pool.replace_now(&found(&["10.0.0.1:80", "10.0.0.2:80"]), true);
        let kept = pool.members()[1].clone();
        kept.observe(false, 1, 1);
        let change = pool.replace_now(&found(&["10.0.0.2:80", "10.0.0.3:80"]), false);
        let addrs =
            |list: &[Arc<Backend>]| list.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs(&change.added), ["10.0.0.3:80"]);
        assert_eq!(addrs(&change.removed), ["10.0.0.1:80"]);
        assert!(Arc::ptr_eq(&pool.members()[0], &kept));
        assert!(!pool.members()[0].is_healthy());
        let unchanged = pool.replace_now(&found(&["10.0.0.2:80", "10.0.0.3:80"]), false);
        assert!(unchanged.added.is_empty() && unchanged.removed.is_empty());
        pool.trust_all();
        assert!(pool.members().iter().all(|b| b.is_healthy()));
    }
}
