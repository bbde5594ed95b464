//! The cache key: host, path and query, framed so that no two different
//! requests can share one.
//!
//! The host is length-prefixed (`11:example.com/a?b`): the host cannot contain
//! the separator's role, so `("a", "b/c")` and `("ab", "/c")` differ. The
//! method is left out on purpose: a HEAD is answered from a cached GET.

use std::cell::RefCell;

use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::CacheKey;
use pingora::http::RequestHeader;

/// The key of `req`: its `Host` (or the authority of its target) and its path and query.
pub fn for_request(req: &RequestHeader) -> CacheKey {
    let (host, path_and_query) = parts_of(req);
    cache_key(host, path_and_query)
}

/// The host a request names and its path and query, as its key holds them.
pub fn parts_of(req: &RequestHeader) -> (&str, &str) {
    let host = crate::config::Authority::of_request(&req.headers, &req.uri);
    (host, req.uri.path_and_query().map_or("/", |pq| pq.as_str()))
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

/// What Pingora's cache and the storage know `req`'s key by: the hash of
/// [`for_request`] (`combined_bin`, a Blake2b of the key), computed without
/// building the key for the keys a thread was asked for last. A fresh hit
/// on a popular key then hashes nothing cryptographic.
pub fn hash_of_request(req: &RequestHeader) -> HashBinary {
    let (host, path_and_query) = parts_of(req);
    // FNV-1a picks the slot: two texts in one slot cost a Blake2b, no more.
    let slot = host
        .bytes()
        .chain([0xff])
        .chain(path_and_query.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        }) as usize
        % RECENT_KEYS;
    RECENT.with_borrow_mut(|recent| match &recent[slot] {
        Some(known) if *known.host == *host && *known.path_and_query == *path_and_query => {
            known.hash
        }
        _ => {
            let hash = cache_key(host, path_and_query).combined_bin();
            recent[slot] = Some(KnownKey {
                host: host.into(),
                path_and_query: path_and_query.into(),
                hash,
            });
            hash
        }
    })
}

/// How many keys each thread remembers the hash of.
const RECENT_KEYS: usize = 64;

/// A request's host and path and query, with the hash of its key.
struct KnownKey {
    host: Box<str>,
    path_and_query: Box<str>,
    hash: HashBinary,
}

thread_local! {
    /// The keys hashed last, each in the slot its text falls in.
    static RECENT: RefCell<Vec<Option<KnownKey>>> =
        RefCell::new((0..RECENT_KEYS).map(|_| None).collect());
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

    #[test]
    fn the_remembered_hash_of_a_request_is_its_key_s_hash() {
        let request = |host: &str, target: &str| {
            let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
            req.insert_header("Host", host).unwrap();
            req
        };
        let requests = [
            request("example.com", "/cache-me"),
            request("Example.COM", "/cache-me"),
            request("example.com", "/cache-me?a=1"),
            request("other.example", "/"),
        ];
        // Twice: the second time from what the thread remembers.
        for _ in 0..2 {
            for req in &requests {
                assert_eq!(hash_of_request(req), for_request(req).combined_bin());
            }
        }
        // More keys than slots: each one still hashes to its own key's.
        for i in 0..(RECENT_KEYS * 3) {
            let req = request("example.com", &format!("/page/{i}"));
            assert_eq!(hash_of_request(&req), for_request(&req).combined_bin());
        }
        assert_ne!(hash_of_request(&requests[0]), hash_of_request(&requests[2]));
    }

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
