//! The four ways a group picks a backend among those that may take the
//! request (healthy, and not already failed by it), each honouring weights.
//! Consistent hashing uses the Pingora family's Ketama ring
//! (`pingora-ketama`), not one of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};

use super::Backend;

/// nginx's smooth weighted round-robin: each pick adds every eligible
/// backend's weight to its score, takes the highest score and subtracts the
/// total from it. Weights 5:1:1 give a a b a c a a, never a burst of five.
/// The caller holds the pool's round-robin lock.
pub(super) fn smooth_weighted<'a>(
    members: &'a [Arc<Backend>],
    skip: &[SocketAddr],
) -> Option<&'a Arc<Backend>> {
    let mut total = 0i64;
    let mut best: Option<(&Arc<Backend>, i64)> = None;
    for b in members.iter().filter(|b| b.takes(skip)) {
        let weight = i64::from(b.weight());
        total += weight;
        let score = b.current_weight.fetch_add(weight, Ordering::Relaxed) + weight;
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((b, score));
        }
    }
    let (chosen, _) = best?;
    chosen.current_weight.fetch_sub(total, Ordering::Relaxed);
    Some(chosen)
}

/// The backend with the fewest requests in flight for its weight; among
/// equals, each in turn.
pub(super) fn least_connections<'a>(
    members: &'a [Arc<Backend>],
    skip: &[SocketAddr],
    turn: &AtomicUsize,
) -> Option<&'a Arc<Backend>> {
    let eligible: Vec<&Arc<Backend>> = members.iter().filter(|b| b.takes(skip)).collect();
    // in_flight / weight, compared without division: a/wa < b/wb <=> a*wb < b*wa.
    let load = |b: &Backend| (b.in_flight().max(0) as u128, u128::from(b.weight()));
    let lighter = |a: &Backend, b: &Backend| {
        let ((fa, wa), (fb, wb)) = (load(a), load(b));
        (fa * wb).cmp(&(fb * wa))
    };
    let least = eligible.iter().copied().min_by(|a, b| lighter(a, b))?;
    let ties: Vec<&Arc<Backend>> = eligible
        .into_iter()
        .filter(|b| lighter(b, least).is_eq())
        .collect();
    let pick = turn.fetch_add(1, Ordering::Relaxed) % ties.len();
    Some(ties[pick])
}

/// A backend at random, in proportion to its weight.
pub(super) fn weighted_random<'a>(
    members: &'a [Arc<Backend>],
    skip: &[SocketAddr],
) -> Option<&'a Arc<Backend>> {
    let total: u64 = members
        .iter()
        .filter(|b| b.takes(skip))
        .map(|b| u64::from(b.weight()))
        .sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(0..total);
    members.iter().filter(|b| b.takes(skip)).find(|b| {
        let weight = u64::from(b.weight());
        if point < weight {
            true
        } else {
            point -= weight;
            false
        }
    })
}

/// The ring of `members`, each with 160 points per unit of weight; `None` when empty.
pub(super) fn ring(members: &[Arc<Backend>]) -> Option<Continuum> {
    let buckets: Vec<Bucket> = members
        .iter()
        .map(|b| Bucket::new(b.addr, b.weight().max(1)))
        .collect();
    (!buckets.is_empty()).then(|| Continuum::new(&buckets))
}

/// The backend that owns `key` on the ring; when it may not take the request,
/// the next one along the ring that may (so a key moves only while its
/// backend is out, and comes back after).
pub(super) fn consistent<'a>(
    ring: Option<&Continuum>,
    members: &'a [Arc<Backend>],
    key: &[u8],
    skip: &[SocketAddr],
) -> Option<&'a Arc<Backend>> {
    let ring = ring?;
    // The iterator goes round forever; every backend has at least 160
    // points, so this many steps meet each of them.
    let steps = members
        .iter()
        .map(|b| b.weight().max(1) as usize * 160)
        .sum::<usize>()
        + 1;
    ring.node_iter(key).take(steps).find_map(|addr| {
        members
            .iter()
            .find(|b| b.addr == *addr)
            .filter(|b| b.takes(skip))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use crate::upstream::{Algorithm, Found, Pool};

    fn pool(weights: &[(&str, u32)]) -> Pool {
        let pool = Pool::default();
        pool.replace_now(&found(weights), true);
        pool
    }

    fn found(weights: &[(&str, u32)]) -> BTreeMap<std::net::SocketAddr, Found> {
        weights
            .iter()
            .map(|(a, w)| {
                let found = Found {
                    server: std::sync::Arc::from(*a),
                    weight: *w,
                };
                (a.parse().unwrap(), found)
            })
            .collect()
    }

    fn pick(pool: &Pool, algorithm: Algorithm, key: &str) -> String {
        pool.select(algorithm, key.as_bytes(), &[])
            .map_or("none".into(), |b| b.addr.to_string())
    }

    #[test]
    fn smooth_round_robin_spreads_a_heavy_backend_out() {
        let pool = pool(&[("10.0.0.1:80", 5), ("10.0.0.2:80", 1), ("10.0.0.3:80", 1)]);
        let seq: Vec<String> = (0..7)
            .map(|_| pick(&pool, Algorithm::RoundRobin, ""))
            .collect();
        let a = "10.0.0.1:80";
        assert_eq!(seq.iter().filter(|s| *s == a).count(), 5, "{seq:?}");
        assert!(
            !seq.windows(3).any(|w| w.iter().all(|s| s == a)),
            "no three in a row for a 5:1:1 split: {seq:?}"
        );
    }

    #[test]
    fn random_follows_the_weights() {
        let pool = pool(&[("10.0.0.1:80", 3), ("10.0.0.2:80", 1)]);
        let heavy = (0..4000)
            .filter(|_| pick(&pool, Algorithm::Random, "") == "10.0.0.1:80")
            .count();
        assert!(
            (2800..3200).contains(&heavy),
            "{heavy} of 4000, expected about 3000"
        );
    }

    #[test]
    fn least_connections_prefers_the_idle_backend() {
        let pool = pool(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let busy = pool.members()[0].enter();
        for _ in 0..4 {
            assert_eq!(pick(&pool, Algorithm::LeastConnections, ""), "10.0.0.2:80");
        }
        drop(busy);
        let both: std::collections::BTreeSet<String> = (0..4)
            .map(|_| pick(&pool, Algorithm::LeastConnections, ""))
            .collect();
        assert_eq!(both.len(), 2, "ties go round: {both:?}");
    }

    #[test]
    fn consistent_hashing_moves_few_keys_and_brings_them_back() {
        let servers: Vec<(String, u32)> = (1..=10).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        fn refs(list: &[(String, u32)]) -> Vec<(&str, u32)> {
            list.iter().map(|(a, w)| (a.as_str(), *w)).collect()
        }
        let ten = pool(&refs(&servers));
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: HashMap<&String, String> = keys
            .iter()
            .map(|k| (k, pick(&ten, Algorithm::ConsistentHash, k)))
            .collect();
        // One server of ten removed: only its keys move, about a tenth.
        let nine = pool(&refs(&servers[1..]));
        let moved = keys
            .iter()
            .filter(|k| pick(&nine, Algorithm::ConsistentHash, k) != before[k])
            .count();
        assert!(
            (100..320).contains(&moved),
            "{moved} of 2000 keys moved, expected about 200"
        );
        for k in &keys {
            if before[k] != servers[0].0 {
                assert_eq!(
                    pick(&nine, Algorithm::ConsistentHash, k),
                    before[k],
                    "{k} moved needlessly"
                );
            }
        }
        // A backend that turns unhealthy: its keys go to the next one on the ring, then come back.
        let victim = ten
            .members()
            .iter()
            .find(|b| b.addr.to_string() == before[&keys[0]])
            .cloned()
            .unwrap();
        victim.observe(false, 1, 1);
        let elsewhere = pick(&ten, Algorithm::ConsistentHash, &keys[0]);
        assert_ne!(elsewhere, before[&keys[0]]);
        let others_kept = keys
            .iter()
            .filter(|k| before[*k] != before[&keys[0]])
            .all(|k| pick(&ten, Algorithm::ConsistentHash, k) == before[k]);
        assert!(others_kept, "keys of healthy backends stayed");
        victim.observe(true, 1, 1);
        assert_eq!(
            pick(&ten, Algorithm::ConsistentHash, &keys[0]),
            before[&keys[0]],
            "it comes back"
        );
    }
}
