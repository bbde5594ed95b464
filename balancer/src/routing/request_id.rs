//! `X-Request-Id`: every request carries one, forwarded upstream, returned to
//! the client and written in the access log. A client's own id is kept when
//! it is well-formed (1 to 128 letters, digits and `-_.:`), so a trace that
//! began before the balancer goes on through it; otherwise a new one is made.

use http::HeaderName;
use pingora::http::RequestHeader;

/// `x-request-id`, made once, for looking the header up: a name given as
/// text is parsed on every lookup.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The name as written, for adding the header: Pingora parses the name it is
/// given either way, and makes a title-cased copy of a `HeaderName` first.
pub const NAME: &str = "X-Request-Id";

/// The request's id: the client's when well-formed, else a new random one.
pub fn for_request(req: &RequestHeader) -> String {
    req.headers
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| well_formed(id))
        .map_or_else(new_id, str::to_owned)
}

fn well_formed(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// 128 random bits as 32 hex digits.
fn new_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> ((31 - i) * 4)) & 0xf) as usize];
    }
    // Hex digits are ASCII: never the empty default.
    std::str::from_utf8(&id).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_id_is_kept_and_anything_else_replaced() {
        let with = |id: &str| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.insert_header(HEADER.clone(), id).unwrap();
            for_request(&r)
        };
        assert_eq!(with("abc-123_x.y:z"), "abc-123_x.y:z");
        for bad in ["", "has space", "<script>", &"x".repeat(129)] {
            let id = with(bad);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}: 32 lowercase hex digits"
            );
        }
        let plain = RequestHeader::build("GET", b"/", None).unwrap();
        assert_ne!(for_request(&plain), for_request(&plain), "new ids differ");
    }
}
