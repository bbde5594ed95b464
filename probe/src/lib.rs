//! A tiny, dependency-free HTTP/1.1 probe for the `healthcheck` subcommands.
//!
//! Docker runs it inside images that have no curl. The balancer and the
//! backend both depend on this crate, so the two health checks behave alike.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// GETs `path` from the server listening on `listen` and succeeds only on a 200.
/// A wildcard listen address (`0.0.0.0`, `::`) is probed on loopback.
pub fn get_ok(listen: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let mut target = listen;
    if target.ip().is_unspecified() {
        target.set_ip(match target.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("no answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or("").trim();
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ if status_line.is_empty() => Err("the connection closed without an answer".to_owned()),
        _ => Err(format!("answered {status_line:?}, expected 200")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server on a loopback port that answers one request with `answer`.
    fn answering(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn only_a_200_passes_and_a_wildcard_address_is_probed_on_loopback() {
        let up = answering("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let wildcard = SocketAddr::from(([0, 0, 0, 0], up.port()));
        assert_eq!(get_ok(wildcard, "/health", Duration::from_secs(2)), Ok(()));
        let down = answering("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let failed = get_ok(down, "/health", Duration::from_secs(2));
        assert!(
            failed.as_ref().is_err_and(|e| e.contains("503")),
            "expected the 503 named, got {failed:?}"
        );
    }
}
