//! The headers that tell the upstream who the client is: `X-Real-IP`,
//! `X-Forwarded-For` (appended to, as nginx's `$proxy_add_x_forwarded_for`)
//! and `X-Forwarded-Proto`. The client's `Host` is left as it is.

use std::net::IpAddr;

use pingora::http::RequestHeader;
use pingora::Result;

use crate::telemetry::text::IpText;

/// `x-forwarded-for`, made once for the lookup: a name given as text is
/// parsed on every lookup.
static FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// Adds the forwarded headers for a request from `client` to `req`; `tls`:
/// the client came over HTTPS.
pub fn apply(req: &mut RequestHeader, client: Option<IpAddr>, tls: bool) -> Result<()> {
    if let Some(ip) = client {
        let ip = IpText::new(ip);
        let ip = ip.as_str();
        let list = append(req.headers.get(&FORWARDED_FOR).map(|v| v.as_bytes()), ip);
        req.insert_header("x-forwarded-for", list)?;
        req.insert_header("x-real-ip", ip.to_owned())?;
    }
    req.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
    Ok(())
}

/// `earlier, ip`, or `ip` when there was no list (or an empty one).
pub fn append(earlier: Option<&[u8]>, ip: &str) -> Vec<u8> {
    let earlier = earlier.map(<[u8]>::trim_ascii).unwrap_or_default();
    let mut list = Vec::with_capacity(earlier.len() + 2 + ip.len());
    if !earlier.is_empty() {
        list.extend_from_slice(earlier);
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(ip.as_bytes());
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_appended() {
        assert_eq!(append(None, "10.0.0.1"), b"10.0.0.1");
        assert_eq!(append(Some(b""), "10.0.0.1"), b"10.0.0.1");
        assert_eq!(append(Some(b" 1.2.3.4 "), "10.0.0.1"), b"1.2.3.4, 10.0.0.1");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "1.2.3.4").unwrap();
        req.insert_header("x-real-ip", "6.6.6.6").unwrap();
        apply(&mut req, Some("::1".parse().unwrap()), false).unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "1.2.3.4, ::1");
        assert_eq!(
            req.headers["x-real-ip"], "::1",
            "a client cannot choose its X-Real-IP"
        );
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        apply(&mut req, None, true).unwrap();
        assert_eq!(req.headers["x-forwarded-proto"], "https");
    }
}
