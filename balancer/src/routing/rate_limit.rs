//! A route's `rate_limit`: at most `requests + burst` requests per key in
//! each window of `per`, counted by the Pingora family's `pingora-limits`
//! estimator, whose memory is fixed whatever the number of keys (a few
//! hundred KiB per limited route). Beyond it: `429` with `Retry-After`.

use std::fmt;
use std::time::Duration;

use pingora_limits::rate::Rate;

use super::HashKey;
use crate::config::RateLimit;

/// Hash rows and slots of the count-min sketch: 2 windows x 4 x 4096 x 8 B
/// = 256 KiB. More slots than keys seen in a window keeps the estimate
/// (which can only err high) close to the real count.
const HASHES: usize = 4;
const SLOTS: usize = 4096;

/// A route's limit as it counts: `requests + burst` per key in each window of `per`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: HashKey,
}

impl From<&RateLimit> for Limit {
    fn from(limit: &RateLimit) -> Limit {
        Limit {
            requests: limit.requests.get(),
            per: limit.per.0,
            burst: limit.burst,
            key: HashKey::from(&limit.key),
        }
    }
}

impl fmt::Display for Limit {
    /// `100 per 1s (+50 burst) by client_ip`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per {} (+{} burst) by {}",
            self.requests,
            humantime::format_duration(self.per),
            self.burst,
            self.key
        )
    }
}

pub struct Limiter {
    limit: Limit,
    rate: Rate,
}

impl Limiter {
    pub fn new(limit: Limit) -> Limiter {
        let rate = Rate::new_with_estimator_config(limit.per, HASHES, SLOTS);
        Limiter { limit, rate }
    }

    pub fn limit(&self) -> &Limit {
        &self.limit
    }

    /// Counts one request for `key`: `Ok`, or how long until the key's
    /// window ends (its `Retry-After`, whole seconds, at least 1).
    pub fn admit(&self, key: &[u8]) -> Result<(), Duration> {
        let allowed = i64::from(self.limit.requests) + i64::from(self.limit.burst);
        let seen = self.rate.observe(&key, 1) as i64;
        if seen <= allowed {
            return Ok(());
        }
        // A refused request does not count against the key.
        self.rate.observe(&key, -1);
        let left = self.rate.rate_with(&key, |c| {
            c.interval
                .mul_f64((1.0 - c.current_interval_fraction).clamp(0.0, 1.0))
        });
        Err(Duration::from_secs(
            left.as_secs_f64().ceil().max(1.0) as u64
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_plus_burst_pass_then_the_key_waits() {
        let limit: RateLimit = toml::from_str("requests = 3\nper = \"10s\"\nburst = 2\n").unwrap();
        let limiter = Limiter::new(Limit::from(&limit));
        assert_eq!(
            limiter.limit().to_string(),
            "3 per 10s (+2 burst) by client_ip"
        );
        for i in 0..5 {
            assert!(limiter.admit(b"a").is_ok(), "request {i} is within 3 + 2");
        }
        let wait = limiter.admit(b"a").unwrap_err();
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
        assert!(limiter.admit(b"b").is_ok(), "another key has its own count");
    }
}
