//! A WebSocket echo load generator for `bench/ws.sh` (not an extension):
//! CONNECTIONS WebSockets to URL, each sending a 32-byte text message and
//! waiting for its echo, over and over, for SECONDS. Prints one line:
//! `round_trips=N per_second=R p50_us=A p99_us=B failed=F`.
//!
//!     cargo run --release --example ws_bench -- ws://127.0.0.1:8080/ws 50 5

use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::Message;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(url), Some(connections), Some(seconds)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
        args.get(3).and_then(|s| s.parse::<f64>().ok()),
    ) else {
        eprintln!("usage: ws_bench URL CONNECTIONS SECONDS");
        std::process::exit(2);
    };
    let Some(authority) = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
    else {
        eprintln!("ws_bench: a ws:// URL, please");
        std::process::exit(2);
    };
    let duration = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let results: Vec<(Vec<u32>, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|_| scope.spawn(move || echo_loop(url, authority, duration)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or((Vec::new(), 1)))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let failed: usize = results.iter().map(|(_, f)| f).sum();
    let mut latencies: Vec<u32> = results.into_iter().flat_map(|(l, _)| l).collect();
    latencies.sort_unstable();
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "round_trips={} per_second={:.0} p50_us={} p99_us={} failed={failed}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.99),
    );
}

/// One connection's round trips (in µs) until `duration` is over, and
/// whether it failed (1) or not (0).
fn echo_loop(url: &str, authority: &str, duration: Duration) -> (Vec<u32>, usize) {
    let mut latencies = Vec::with_capacity(100_000);
    let Ok(tcp) = TcpStream::connect(authority) else {
        return (latencies, 1);
    };
    let _ = tcp.set_nodelay(true);
    let Ok((mut ws, _)) = tungstenite::client(url, tcp) else {
        return (latencies, 1);
    };
    let message = "0123456789abcdef0123456789abcdef";
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let sent = Instant::now();
        if ws.send(Message::text(message)).is_err() {
            return (latencies, 1);
        }
        match ws.read() {
            Ok(Message::Text(echo)) if echo.as_str() == message => {}
            _ => return (latencies, 1),
        }
        latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    let _ = ws.close(None);
    (latencies, 0)
}
