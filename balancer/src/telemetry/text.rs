//! Fast text for what every request writes: a client's address, a
//! duration in seconds with three decimals, the time of day. `Display` and
//! float formatting go through Rust's general formatting machinery, which
//! costs more per request than the rest of an access-log line; these write
//! the same text directly.

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An address as `Display` writes it, in a buffer of its own.
pub struct IpText {
    bytes: [u8; 48],
    len: usize,
}

impl IpText {
    pub fn new(ip: IpAddr) -> IpText {
        let mut text = IpText {
            bytes: [0; 48],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write as _;
                let mut rest = &mut text.bytes[..];
                // At most 45 characters (an IPv4-mapped address).
                let _ = write!(rest, "{v6}");
                let left = rest.len();
                text.len = text.bytes.len() - left;
            }
        }
        text
    }

    fn push(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons and hex letters were written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("-")
    }
}

/// `d` in seconds with three decimals, rounded, as `{:.3}` writes it.
pub fn push_seconds(out: &mut Vec<u8>, d: Duration) {
    let millis = (d.as_nanos() + 500_000) / 1_000_000;
    push_number(out, (millis / 1000) as u64);
    out.push(b'.');
    let frac = (millis % 1000) as u16;
    out.extend_from_slice(&[
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `n` in decimal.
pub fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The time now as RFC 3339 in whole seconds (`2026-12-04T17:46:03Z`),
/// made once a second per thread.
pub fn push_now(out: &mut Vec<u8>) {
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    LAST.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = humantime::format_rfc3339_seconds(now).to_string();
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_writes_what_display_and_format_write() {
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "127.0.0.1",
            "172.20.100.9",
            "255.255.255.255",
            "::1",
            "::ffff:192.168.100.200",
            "2001:db8:85a3:8d3:1319:8a2e:370:7348",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
        for nanos in [
            0u64,
            499_999,
            500_000,
            1_000_000,
            2_345_678,
            999_499_999,
            999_500_000,
            61_000_400_000,
            3_600_123_456_789,
        ] {
            let d = Duration::from_nanos(nanos);
            let mut out = Vec::new();
            push_seconds(&mut out, d);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{:.3}", d.as_secs_f64()),
                "{nanos} ns"
            );
        }
        let mut out = Vec::new();
        push_now(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(humantime::parse_rfc3339(&text).is_ok(), "{text}");
    }
}
