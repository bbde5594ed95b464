//! Upstream groups: each compiled from its section once per snapshot
//! (`group`), the backend addresses of each group, each with its health,
//! and the choice of one for a request (`selection`).
//!
//! Pingora's `LoadBalancer` trusts a new backend at once and keeps its health
//! out of reach; a [`Pool`] starts a new address unhealthy until it passes a
//! check (when checks are on) and keeps per-backend state that the access log,
//! the retry logic, the metrics and the status API read. A group's pool lives
//! as long as the group is configured, across reloads. Finding the addresses
//! (`discovery`) and probing them (`health`) live beside this.

pub mod discovery;
mod group;
pub mod health;
mod selection;

pub use discovery::Found;
pub use group::{Algorithm, Group, GroupState, RequestKey};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use pingora_ketama::Continuum;

use crate::config::HealthCheck;

/// One backend address and what is known about it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` as text, made once: it labels metrics and log lines.
    pub label: String,
    /// The `upstream.servers` entry it came from (`backend:8000`).
    pub server: Arc<str>,
    /// Its share of requests relative to the group's other backends.
    weight: AtomicU32,
    /// Smooth weighted round-robin's running score (see `selection`).
    current_weight: AtomicI64,
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
/// What one observation did to a backend's health: `healthy` is the new
/// state when it changed, `why` the failure when there was one.
#[derive(Debug)]
pub struct Flip {
    pub healthy: Option<bool>,
    pub why: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CheckRecord {
    pub at: SystemTime,
    /// `None` when it passed, else why it failed.
    pub error: Option<String>,
}

impl Backend {
    fn new(addr: SocketAddr, found: &Found, healthy: bool) -> Backend {
        Backend {
            addr,
            label: addr.to_string(),
            server: Arc::clone(&found.server),
            weight: AtomicU32::new(found.weight),
            current_weight: AtomicI64::new(0),
            healthy: AtomicBool::new(healthy),
            admitted: AtomicBool::new(healthy),
            consecutive_passes: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            last_check: Mutex::new(None),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
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

    /// Records an active health check's outcome and counts it towards the
    /// group's thresholds (see [`Backend::count_failure`]); returns the change
    /// of health it made, for [`Backend::report`].
    pub fn record_check(&self, outcome: Result<(), String>, hc: &HealthCheck) -> Flip {
        let error = outcome.err();
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(CheckRecord {
            at: SystemTime::now(),
            error: error.clone(),
        });
        let flip = self.observe(
            error.is_none(),
            hc.healthy_threshold.get(),
            hc.unhealthy_threshold.get(),
        );
        Flip {
            healthy: flip,
            why: error,
        }
    }

    /// Counts a failure seen by the request path (a refused or timed-out
    /// connect) as a failed check, so that a dead backend leaves the rotation
    /// without waiting for the next probe.
    pub fn count_failure(&self, group: &str, hc: &HealthCheck, why: &str) {
        let flip = self.observe(
            false,
            hc.healthy_threshold.get(),
            hc.unhealthy_threshold.get(),
        );
        self.report(
            Flip {
                healthy: flip,
                why: Some(why.to_owned()),
            },
            group,
        );
    }

    /// The one log line for a change of health, wherever it was decided.
    pub fn report(&self, flip: Flip, group: &str) {
        let why = flip.why.as_deref().unwrap_or("the check failed");
        match flip.healthy {
            Some(true) => log::info!(
                "upstream {group}: {} ({}) is healthy",
                self.addr,
                self.server
            ),
            Some(false) => log::warn!(
                "upstream {group}: {} ({}) is unhealthy: {why}",
                self.addr,
                self.server
            ),
            None => {}
        }
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

/// The current set of backends of one group, replaced as a whole when
/// discovery finds a change.
#[derive(Default)]
pub struct Pool {
    members: ArcSwap<Vec<Arc<Backend>>>,
    /// Turns for ties among the least loaded.
    next: AtomicUsize,
    /// Smooth weighted round-robin updates every eligible backend's score at
    /// once; this keeps two picks from interleaving.
    round_robin: Mutex<()>,
    /// The Ketama ring of the members, made when they change.
    ring: ArcSwapOption<Continuum>,
}

/// What a membership change does.
#[derive(Debug, Default)]
pub struct Change {
    pub added: Vec<Arc<Backend>>,
    pub removed: Vec<Arc<Backend>>,
    /// A backend that stays has a new weight.
    pub reweighted: bool,
}

impl Pool {
    /// A healthy backend not in `skip` (the ones that already failed this
    /// request), chosen by `algorithm`; `key` is what `consistent_hash` hashes.
    pub fn select(
        &self,
        algorithm: Algorithm,
        key: &[u8],
        skip: &[SocketAddr],
    ) -> Option<Arc<Backend>> {
        let members = self.members.load();
        let chosen = match algorithm {
            Algorithm::RoundRobin => {
                let _turn = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
                selection::smooth_weighted(&members, skip)
            }
            Algorithm::LeastConnections => selection::least_connections(&members, skip, &self.next),
            Algorithm::Random => selection::weighted_random(&members, skip),
            Algorithm::ConsistentHash => {
                selection::consistent(self.ring.load().as_deref(), &members, key, skip)
            }
        }?;
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
    pub fn replace_now(&self, found: &BTreeMap<SocketAddr, Found>, trust_new: bool) -> Change {
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
        found: &BTreeMap<SocketAddr, Found>,
        trust_new: bool,
    ) -> (Vec<Arc<Backend>>, Change) {
        let old = self.members.load_full();
        let mut change = Change::default();
        let members: Vec<Arc<Backend>> = found
            .iter()
            .map(|(addr, found)| {
                match old
                    .iter()
                    .find(|b| b.addr == *addr && b.server == found.server)
                {
                    Some(kept) => {
                        if kept.weight.swap(found.weight, Ordering::Relaxed) != found.weight {
                            change.reweighted = true;
                        }
                        Arc::clone(kept)
                    }
                    None => {
                        let backend = Arc::new(Backend::new(*addr, found, trust_new));
                        change.added.push(Arc::clone(&backend));
                        backend
                    }
                }
            })
            .collect();
        for b in old.iter() {
            if found.get(&b.addr).is_none_or(|f| f.server != b.server) {
                change.removed.push(Arc::clone(b));
            }
        }
        (members, change)
    }

    /// Makes a planned membership the one requests see.
    pub fn publish(&self, members: Vec<Arc<Backend>>, change: &Change) {
        let first = self.ring.load().is_none();
        if first || !change.added.is_empty() || !change.removed.is_empty() || change.reweighted {
            self.ring.store(selection::ring(&members).map(Arc::new));
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

    fn found(addrs: &[&str]) -> BTreeMap<SocketAddr, Found> {
        addrs
            .iter()
            .map(|a| {
                let found = Found {
                    server: Arc::from("backend:8000"),
                    weight: 1,
                };
                (a.parse().unwrap(), found)
            })
            .collect()
    }

    fn picks(pool: &Pool, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                pool.select(Algorithm::RoundRobin, b"", &[])
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
        assert!(
            pool.select(Algorithm::RoundRobin, b"", &[second]).is_none(),
            "nothing is left to try"
        );
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
        assert!(pool.select(Algorithm::RoundRobin, b"", &[second]).is_some());
    }

    #[test]
    fn new_backends_wait_for_their_first_pass_when_checks_are_on() {
        let pool = Pool::default();
        let change = pool.replace_now(&found(&["10.0.0.1:80"]), false);
        assert_eq!(change.added.len(), 1);
        assert!(pool.select(Algorithm::RoundRobin, b"", &[]).is_none());
        assert_eq!(
            pool.members()[0].observe(true, 3, 2),
            Some(true),
            "admitted on the first pass"
        );
        assert!(pool.select(Algorithm::RoundRobin, b"", &[]).is_some());
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
