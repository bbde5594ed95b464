//! How long a stored response stays fresh and how old it already is when it
//! arrives (RFC 9111, sections 4.2.1 to 4.2.3), read once from its header.
//!
//! It does not decide whether a response may be stored at all: that is
//! [`super::cacheability`]'s job.

use std::time::{Duration, SystemTime};

use http::HeaderValue;
use pingora::cache::cache_control::CacheControl;
use pingora::http::ResponseHeader;

/// The longest lifetime a heuristic may give (RFC 9111, section 4.2.2).
pub const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// The `Surrogate-Control` of `resp`: what the origin tells the balancer, as
/// a surrogate (a CDN's edge), apart from what it tells browsers.
pub fn surrogate_control(resp: &ResponseHeader) -> Option<CacheControl> {
    CacheControl::from_resp_headers_named("surrogate-control", resp)
}

/// The freshness lifetime the origin states: `Surrogate-Control: max-age`,
/// then `Cache-Control` (`no-cache` is 0, `s-maxage` before `max-age`), then
/// `Expires` - `Date`. `None` when it states none.
pub fn explicit_lifetime(
    resp: &ResponseHeader,
    cc: Option<&CacheControl>,
    surrogate: Option<&CacheControl>,
    now: SystemTime,
) -> Option<Duration> {
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    if let Some(max_age) = surrogate.and_then(|sc| sc.max_age().ok().flatten()) {
        return Some(secs(max_age));
    }
    if let Some(cc) = cc {
        if cc.no_cache() {
            return Some(Duration::ZERO);
        }
        if let Some(age) = cc.s_maxage().ok().flatten() {
            return Some(secs(age));
        }
        if let Some(age) = cc.max_age().ok().flatten() {
            return Some(secs(age));
        }
    }
    let mut expires = resp.headers.get_all("expires").iter();
    let first = expires.next()?;
    // An Expires that cannot be read, or more than one, means "already expired".
    let Some(expires) = http_date(first).filter(|_| expires.next().is_none()) else {
        return Some(Duration::ZERO);
    };
    // Expires and Date come from the same clock, the origin's: their
    // difference is the lifetime whatever the skew to ours.
    let date = date_of(resp).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or_default())
}

/// A lifetime guessed from `Last-Modified` when the origin states none: a
/// tenth of the time since the last change, at most [`HEURISTIC_CAP`], for
/// the statuses that may be cached that way (or any, with `public`).
pub fn heuristic_lifetime(
    resp: &ResponseHeader,
    cc: Option<&CacheControl>,
    now: SystemTime,
) -> Option<Duration> {
    let status = resp.status.as_u16();
    if !heuristically_cacheable(status) && !cc.is_some_and(CacheControl::public) {
        return None;
    }
    let modified = http_date(resp.headers.get("last-modified")?)?;
    let since = date_of(resp).unwrap_or(now).duration_since(modified).ok()?;
    Some((since / 10).min(HEURISTIC_CAP))
}

/// Statuses cacheable by default (RFC 9110, section 15.1).
fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The `Age` the origin (or a cache before it) gave: `ZERO` when absent.
/// A list (`Age: 0, 7200`, or two `Age` lines) counts by its first member,
/// the rest discarded (RFC 9111, section 5.1); `None` when that member is
/// not a non-negative integer, which makes the response stale.
pub fn age_value(resp: &ResponseHeader) -> Option<Duration> {
    let mut members = resp
        .headers
        .get_all("age")
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        // Empty list elements are no members (RFC 9110, section 5.6.1).
        .filter(|member| !member.is_empty());
    let Some(digits) = members.next() else {
        return if resp.headers.contains_key("age") {
            None
        } else {
            Some(Duration::ZERO)
        };
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Too large to hold means very old: section 1.2.2 says 2^31.
    let secs = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(1 << 31);
    Some(Duration::from_secs(secs))
}

/// The response's `Date`, when it has one that can be read.
pub fn date_of(resp: &ResponseHeader) -> Option<SystemTime> {
    http_date(resp.headers.get("date")?)
}

fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

/// When a response that arrives `age` old with `lifetime` to live is fresh
/// until, and the moment its age is counted from: (fresh_until, epoch).
/// `age` of `None` (unreadable) makes it stale on arrival.
pub fn timeline(
    now: SystemTime,
    lifetime: Duration,
    age: Option<Duration>,
) -> (SystemTime, SystemTime) {
    let stale = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let Some(age) = age else {
        return (stale, now);
    };
    let epoch = now.checked_sub(age).unwrap_or(now);
    if age >= lifetime {
        return (stale, epoch);
    }
    (epoch.checked_add(lifetime).unwrap_or(now), epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&'static str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (n, v) in headers {
            r.append_header(*n, *v).unwrap();
        }
        r
    }

    fn explicit(headers: &[(&'static str, &str)]) -> Option<Duration> {
        let r = resp(200, headers);
        let cc = CacheControl::from_resp_headers(&r);
        let sc = surrogate_control(&r);
        explicit_lifetime(&r, cc.as_ref(), sc.as_ref(), SystemTime::now())
    }

    #[test]
    fn expires_counts_from_date_not_from_now() {
        let date = "Mon, 01 Jan 2001 00:00:00 GMT";
        assert_eq!(
            explicit(&[("date", date), ("expires", "Mon, 01 Jan 2001 01:00:00 GMT")]),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            explicit(&[("date", date), ("expires", "Sun, 31 Dec 2000 23:00:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(explicit(&[("expires", "0")]), Some(Duration::ZERO));
        assert_eq!(explicit(&[]), None);
    }

    #[test]
    fn surrogate_control_wins_then_s_maxage_then_max_age() {
        let d = |s| Some(Duration::from_secs(s));
        assert_eq!(
            explicit(&[
                ("surrogate-control", "max-age=7"),
                ("cache-control", "max-age=5")
            ]),
            d(7)
        );
        assert_eq!(
            explicit(&[("cache-control", "s-maxage=9, max-age=5")]),
            d(9)
        );
        assert_eq!(explicit(&[("cache-control", "no-cache, max-age=5")]), d(0));
    }

    #[test]
    fn an_age_is_the_first_member_of_a_list() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(age_value(&resp(200, &[])), secs(0));
        for (ages, expected) in [
            (vec!["30"], secs(30)),
            (vec!["0,7200"], secs(0)),
            (vec!["0, 7200"], secs(0)),
            (vec![" 5 ,x"], secs(5)),
            (vec![", 9"], secs(9)),
            (vec!["0, 0"], secs(0)),
            (vec!["3600", "3600"], secs(3600)),
            (vec!["0", "7200"], secs(0)),
            (vec!["99999999999999999999999"], secs(1 << 31)),
        ] {
            let headers: Vec<_> = ages.iter().map(|a| ("age", *a)).collect();
            assert_eq!(age_value(&resp(200, &headers)), expected, "{ages:?}");
        }
        for bad in [
            vec!["abc"],
            vec!["-1"],
            vec!["1.5"],
            vec!["old, 0"],
            vec!["1;a=b"],
            vec![""],
            vec![" , "],
            vec!["abc", "0"],
        ] {
            let headers: Vec<_> = bad.iter().map(|a| ("age", *a)).collect();
            assert_eq!(age_value(&resp(200, &headers)), None, "{bad:?}");
        }
    }

    #[test]
    fn the_heuristic_is_a_tenth_capped_at_a_day() {
        let date = "Mon, 01 Jan 2001 00:00:00 GMT";
        let now = SystemTime::now();
        let lm = |status, modified| {
            heuristic_lifetime(
                &resp(status, &[("date", date), ("last-modified", modified)]),
                None,
                now,
            )
        };
        assert_eq!(
            lm(200, "Sun, 31 Dec 2000 00:00:00 GMT"),
            Some(Duration::from_secs(8640))
        );
        assert_eq!(
            lm(200, "Mon, 01 Jan 1990 00:00:00 GMT"),
            Some(HEURISTIC_CAP)
        );
        assert_eq!(lm(302, "Sun, 31 Dec 2000 00:00:00 GMT"), None);
        assert_eq!(heuristic_lifetime(&resp(200, &[]), None, now), None);
    }

    #[test]
    fn an_age_beyond_the_lifetime_is_stale_on_arrival() {
        let now = SystemTime::now();
        let (fresh_until, epoch) =
            timeline(now, Duration::from_secs(60), Some(Duration::from_secs(10)));
        assert_eq!(fresh_until, now + Duration::from_secs(50));
        assert_eq!(epoch, now - Duration::from_secs(10));
        assert!(timeline(now, Duration::from_secs(60), Some(Duration::from_secs(60))).0 < now);
        assert!(timeline(now, Duration::from_secs(60), None).0 < now);
    }
}
