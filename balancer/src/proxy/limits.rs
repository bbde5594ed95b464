//! Limits on what a client may send, checked on the raw request head before
//! anything is forwarded: its size and header count (431), a body larger than
//! allowed (413), and framing that could desynchronise the upstream
//! connection (400), a request line with a space in its target (400) and an
//! HTTP/1.1 request without `Host` (400, RFC 9112 section 3.2). Pingora
//! itself rejects duplicate or invalid `Content-Length`, unknown
//! `Transfer-Encoding`, obsolete line folding and bad chunk sizes; this adds
//! what it lets through.

use crate::runtime::Limits;

/// Why a request is refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
}

fn reject(status: u16, reason: impl Into<String>) -> Result<(), Rejection> {
    Err(Rejection {
        status,
        reason: reason.into(),
    })
}

/// Checks the raw request head (request line and header lines, as received).
pub fn check_head(raw: &[u8], limits: &Limits) -> Result<(), Rejection> {
    if raw.len() as u64 > limits.max_header_size {
        return reject(
            431,
            format!(
                "request head of {} bytes exceeds limits.max_header_size",
                raw.len()
            ),
        );
    }
    let (request_line, mut rest) = split_line(raw);
    // METHOD SP request-target SP HTTP-version: exactly two single spaces.
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let version = match (method, target, version, parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() && !v.is_empty() => v,
        _ => {
            return reject(
                400,
                "malformed request line (a request-target may not contain spaces)",
            )
        }
    };
    let http11 = version == b"HTTP/1.1";
    let mut headers = 0usize;
    let (mut content_length, mut transfer_encoding, mut host) = (false, false, false);
    // The head ends at an empty line.
    while !rest.is_empty() {
        let line;
        (line, rest) = split_line(rest);
        if line.is_empty() {
            break;
        }
        headers += 1;
        let name = match memchr::memchr(b':', line) {
            Some(colon) => &line[..colon],
            None => line,
        };
        let name = name.trim_ascii();
        // Only a name of the right length is compared.
        match name.len() {
            4 => host |= name.eq_ignore_ascii_case(b"host"),
            14 => content_length |= name.eq_ignore_ascii_case(b"content-length"),
            17 => transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding"),
            _ => {}
        }
    }
    if headers > limits.max_headers {
        return reject(
            431,
            format!("{headers} header fields exceed limits.max_headers"),
        );
    }
    if content_length && transfer_encoding {
        // RFC 9112 lets a server drop Content-Length instead; refusing is
        // safer in front of upstreams that might not.
        return reject(400, "both Content-Length and Transfer-Encoding");
    }
    if http11 && !host {
        return reject(400, "an HTTP/1.1 request must carry a Host header");
    }
    Ok(())
}

/// The line `bytes` starts with (without its CR LF or LF), and what follows it.
fn split_line(bytes: &[u8]) -> (&[u8], &[u8]) {
    let (line, rest) = match memchr::memchr(b'\n', bytes) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[][..]),
    };
    (line.strip_suffix(b"\r").unwrap_or(line), rest)
}

/// Checks a declared or so-far received body size.
pub fn check_body(bytes: u64, limits: &Limits) -> Result<(), Rejection> {
    if bytes > limits.max_body_size {
        return reject(
            413,
            format!("request body of {bytes} bytes exceeds limits.max_body_size"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_size: 200,
            max_headers: 3,
            max_body_size: 10,
            ..Limits::default()
        }
    }

    #[test]
    fn heads_within_limits_pass() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(check_head(raw, &limits()), Ok(()));
    }

    #[test]
    fn malformed_request_lines_and_missing_hosts_are_refused() {
        for bad in [
            b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n".as_slice(),
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
        ] {
            let refusal = check_head(bad, &limits()).unwrap_err();
            assert_eq!(refusal.status, 400, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            check_head(b"GET / HTTP/1.0\r\n\r\n", &limits()),
            Ok(()),
            "HTTP/1.0 needs no Host"
        );
    }

    #[test]
    fn too_large_too_many_and_conflicting_heads_are_refused() {
        let big = [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; 300],
            b"\r\n\r\n",
        ]
        .concat();
        assert_eq!(check_head(&big, &limits()).unwrap_err().status, 431);
        let many = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(check_head(many, &limits()).unwrap_err().status, 431);
        let both = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check_head(both, &limits()).unwrap_err().status, 400);
        assert_eq!(check_body(11, &limits()).unwrap_err().status, 413);
        assert_eq!(check_body(10, &limits()), Ok(()));
    }
}
