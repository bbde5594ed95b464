//! A route's `rate_limit`: at most `requests + burst` requests per key in
//! each window of `per`, counted by the Pingora family's `pingora-limits`
//! estimator, whose memory is fixed whatever the number of keys (a few
//! hundred KiB per limited route). Beyond it: `429` with `Retry-After`.

use std::time::Duration;

use pingora_limits::rate::Rate;

use crate::config::RateLimit;

/// Hash rows and slots of the count-min sketch: 2 windows x 4 x 4096 x 8 B
/// = 256 KiB. More slots than keys seen in a window keeps the estimate
/// (which can only err high) close to the real count.
const HASHES: usize = 4;
const SLOTS: usize = 4096;

pub struct Limiter {
    limit: RateLimit,
    rate: Rate,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        let rate = Rate::new_with_estimator_config(limit.per.0, HASHES, SLOTS);
        Limiter { limit, rate }
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Counts one request for `key`: `Ok`, or how long until the key's
    /// window ends (its `Retry-After`, whole seconds, at least 1).
    pub fn admit(&self, key: &[u8]) -> Result<(), Duration> {
        let allowed = i64::from(self.limit.requests.get()) + i64::from(self.limit.burst);
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
        let limiter = Limiter::new(limit);
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
