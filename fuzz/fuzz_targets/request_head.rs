//! Any request head: the limits check answers without panicking, and the
//! forwarded headers are added to whatever headers came in.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use balancer::runtime::Limits;
use balancer::proxy::{forwarded, limits};
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;

fuzz_target!(|data: &[u8]| {
    let _ = limits::check_head(data, &Limits::default());
    // Header lines "name: value" from the input, as a client could send them.
    let mut req = RequestHeader::build("GET", b"/", None).expect("a plain GET builds");
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            let _ = req.append_header(name, value);
        }
    }
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, data.len() as u8));
    forwarded::apply(&mut req, Some(client), false).expect("the forwarded headers are always valid");
    let xff = req.headers.get("x-forwarded-for").expect("set").as_bytes();
    assert!(xff.ends_with(client.to_string().as_bytes()), "the client is last");
    assert_eq!(req.headers.get("x-real-ip").expect("set").as_bytes(), client.to_string().as_bytes());
});
