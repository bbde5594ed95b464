//! The cache key: host, path and query, framed so that no two different
//! requests can share one.
//!
//! The host is length-prefixed (`11:example.com/a?b`): the host cannot contain
//! the separator's role, so `("a", "b/c")` and `("ab", "/c")` differ. The
//! method is left out on purpose: a HEAD is answered from a cached GET.

use pingora::cache::CacheKey;
use pingora::http::RequestHeader;

/// The key of `req`: its `Host` (or the authority of its target) and its path and query.
pub fn for_request(req: &RequestHeader) -> CacheKey {
    let path_and_query = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    cache_key(host_of(req), path_and_query)
}

/// The host a request names, as its key holds it.
pub fn host_of(req: &RequestHeader) -> &str {
    crate::config::Authority::of_request(&req.headers, &req.uri)
}

/// The key of a request for `path_and_query` on `host`.
pub fn cache_key(host: &str, path_and_query: &str) -> CacheKey {
    use std::io::Write as _;
    let mut primary = Vec::with_capacity(host.len() + path_and_query.len() + 8);
    let _ = write!(primary, "{}:", host.len());
    let host_at = primary.len();
    primary.extend_from_slice(host.as_bytes());
    primary[host_at..].make_ascii_lowercase();
    primary.extend_from_slice(path_and_query.as_bytes());
    CacheKey::new(primary, "")
}

/// The path (without the query) of a key made by [`cache_key`].
pub fn path_of(primary: &[u8]) -> &str {
    let text = std::str::from_utf8(primary).unwrap_or("");
    let Some((len, rest)) = text.split_once(':') else {
        return "";
    };
    let host_len: usize = len.parse().unwrap_or(0);
    let path_and_query = rest.get(host_len..).unwrap_or("");
    path_and_query.split('?').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::key::CacheHashKey;

    #[test]
    fn different_requests_never_share_a_key() {
        let pairs = [
            (("a", "b/c"), ("ab", "/c")),
            (("a:1", "/x"), ("a", ":1/x")),
            (("h", "/p?q=1"), ("h", "/p?q=2")),
            (("h", "/p"), ("h", "/p?")),
        ];
        for ((h1, p1), (h2, p2)) in pairs {
            let (k1, k2) = (cache_key(h1, p1), cache_key(h2, p2));
            assert_ne!(k1.primary_key(), k2.primary_key(), "{h1}{p1} vs {h2}{p2}");
            assert_ne!(k1.combined(), k2.combined());
        }
        assert_eq!(
            cache_key("Example.TEST", "/a").combined(),
            cache_key("example.test", "/a").combined()
        );
    }

    #[test]
    fn the_path_is_recovered_from_the_key() {
        assert_eq!(
            path_of(cache_key("a:8080", "/cache-me?x=1").primary_key()),
            "/cache-me"
        );
        assert_eq!(path_of(cache_key("", "/p").primary_key()), "/p");
        assert_eq!(path_of(b"garbage"), "");
    }
}
