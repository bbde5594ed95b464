//! The backend on its own, as a real process on a loopback port. Having an
//! integration test here also makes `cargo test --workspace` build the
//! `backend` binary, which the balancer's integration tests start.

#[path = "../../balancer/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use support::*;

#[test]
fn the_backend_answers_its_routes() {
    let port = free_port();
    let _backend = start_backend("direct", port);
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");

    let hello = get(&url("/")).unwrap();
    assert_eq!((hello.status, hello.body.as_str()), (200, "Hello World!"));
    assert_eq!(get(&url("/health")).unwrap().body, "ok");
    assert_eq!(get(&url("/nowhere")).unwrap().status, 404);

    let first = get(&url("/cache-me")).unwrap();
    let second = get(&url("/cache-me")).unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first.body.contains("direct"),
        "names the instance: {:?}",
        first.body
    );
    assert!(
        first.body.contains("GMT"),
        "names the time: {:?}",
        first.body
    );
    assert_ne!(first.body, second.body, "each response is generated anew");

    let info = get_with(&url("/info"), &[("user-agent", "probe/1")]).unwrap();
    assert!(
        info.body.ends_with("}\n"),
        "compact JSON ending in a newline: {:?}",
        info.body
    );
    assert!(!info.body.contains(": "), "compact: {:?}", info.body);
    let keys: Vec<&str> = [
        "connecting_ip",
        "container_id",
        "host",
        "proxy_ip",
        "user-agent",
    ]
    .to_vec();
    let parsed: BTreeMap<String, String> = serde_json::from_str(&info.body).unwrap();
    assert_eq!(parsed.keys().map(String::as_str).collect::<Vec<_>>(), keys);
    let order: Vec<usize> = keys
        .iter()
        .map(|k| info.body.find(&format!("\"{k}\"")).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "keys are sorted: {}",
        info.body
    );
    assert_eq!(parsed["connecting_ip"], "127.0.0.1");
    assert_eq!(parsed["proxy_ip"], "127.0.0.1");
    assert_eq!(parsed["container_id"], "direct");
    assert_eq!(parsed["host"], format!("127.0.0.1:{port}"));
    assert_eq!(parsed["user-agent"], "probe/1");
}

#[test]
fn the_backend_healthcheck_subcommand_reports_health() {
    let port = free_port();
    let probe = |port: u16| {
        std::process::Command::new(binary("backend"))
            .args(["healthcheck", "--listen", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap()
    };
    let down = probe(port);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot connect"));
    let _backend = start_backend("hc", port);
    assert_eq!(probe(port).status.code(), Some(0));
}
