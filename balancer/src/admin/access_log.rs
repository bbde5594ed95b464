//! The access log: one line per request, as text or as a JSON object
//! (`log_format`), on standard error beside the process log and in its
//! format (`[TIME INFO  access] ...`). `RUST_LOG` filters it as the `access`
//! target (`RUST_LOG=info,access=off` turns it off).
//!
//! A request never waits for the log: its line goes into a bounded queue
//! that one writer thread drains into a buffered stderr every
//! [`DRAIN_EVERY`]. The writer is never woken by a request (a wake-up is a
//! system call and a context switch per request, which cost more than the
//! line itself), so lines reach the output in batches, at most that late.
//! When the output stalls (a full disk, a slow pipe) and the queue is full,
//! lines are dropped and counted (`balancer_access_log_dropped_total`), not
//! waited for.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TryRecvError, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::config::LogFormat;

/// What is known about a request once it is over.
pub struct Record<'a> {
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub uri: &'a http::Uri,
    /// `HTTP/1.1`, `HTTP/2`, ..., with `+TLS` when the client came over TLS.
    pub protocol: &'static str,
    /// 0 when no response was written (the client went away).
    pub status: u16,
    /// The matched route's name (`#N` when unnamed).
    pub route: Option<&'a str>,
    /// The upstream group the request was sent to.
    pub group: Option<&'a str>,
    /// The backend address of the last attempt.
    pub upstream: Option<&'a str>,
    /// Its `X-Request-Id`.
    pub request_id: &'a str,
    /// From picking the backend to the end of its response body.
    pub upstream_time: Option<Duration>,
    pub time: Duration,
    pub retries: u32,
    pub cache: Option<&'static str>,
}

/// Lines waiting for the writer; beyond this many, new ones are dropped.
/// With [`DRAIN_EVERY`], room for 800,000 lines a second.
const QUEUE: usize = 16 << 10;
/// How often the writer drains the queue.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

struct Writer {
    queue: SyncSender<String>,
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
}

static WRITER: OnceLock<Option<Writer>> = OnceLock::new();

/// The writer thread, started on first use (`None` if it could not be).
fn writer() -> Option<&'static Writer> {
    WRITER
        .get_or_init(|| {
            let (queue, lines) = mpsc::sync_channel::<String>(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("access-log".to_owned())
                .spawn(move || {
                    let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stderr());
                    loop {
                        let mut batch = 0;
                        let open = loop {
                            match lines.try_recv() {
                                Ok(line) => {
                                    let _ = out.write_all(line.as_bytes());
                                    batch += 1;
                                }
                                Err(TryRecvError::Empty) => break true,
                                Err(TryRecvError::Disconnected) => break false,
                            }
                        };
                        if batch > 0 {
                            let _ = out.flush();
                            if let Some(w) = WRITER.get().and_then(Option::as_ref) {
                                w.written.fetch_add(batch, Ordering::Release);
                            }
                        }
                        if !open {
                            return;
                        }
                        std::thread::sleep(DRAIN_EVERY);
                    }
                });
            match spawned {
                Ok(_) => Some(Writer {
                    queue,
                    queued: AtomicU64::new(0),
                    written: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                }),
                Err(e) => {
                    log::error!("cannot start the access-log writer: {e}; the access log is off");
                    None
                }
            }
        })
        .as_ref()
}

/// Lines dropped because the output could not keep up.
pub fn dropped() -> u64 {
    WRITER
        .get()
        .and_then(Option::as_ref)
        .map_or(0, |w| w.dropped.load(Ordering::Relaxed))
}

/// Waits (at most `within`) until every queued line is written: at exit.
pub fn flush(within: Duration) {
    let Some(w) = WRITER.get().and_then(Option::as_ref) else {
        return;
    };
    let deadline = Instant::now() + within;
    while w.written.load(Ordering::Acquire) < w.queued.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Queues the line for `r`, unless the `access` target is filtered out.
pub fn write(format: LogFormat, r: &Record<'_>) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let Some(writer) = writer() else {
        return;
    };
    let mut line = String::with_capacity(224);
    let _ = write!(
        line,
        "[{} INFO  access] ",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    match format {
        LogFormat::Text => text(&mut line, r),
        LogFormat::Json => line.push_str(&json(r)),
    }
    line.push('\n');
    match writer.queue.try_send(line) {
        Ok(()) => {
            writer.queued.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            writer.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Appends the text form of `r` to `line`.
fn text(line: &mut String, r: &Record<'_>) {
    match r.client {
        Some(ip) => {
            let _ = write!(line, "{ip}");
        }
        None => line.push('-'),
    }
    let _ = write!(
        line,
        " \"{} {} {}\" {} upstream={} upstream_time=",
        r.method,
        origin_form(r.uri),
        r.protocol,
        r.status,
        r.upstream.unwrap_or("-"),
    );
    match r.upstream_time {
        Some(d) => {
            let _ = write!(line, "{:.3}", d.as_secs_f64());
        }
        None => line.push('-'),
    }
    let _ = write!(
        line,
        " time={:.3} retries={} cache={} route={} group={} request_id={}",
        r.time.as_secs_f64(),
        r.retries,
        r.cache.unwrap_or("-"),
        r.route.unwrap_or("-"),
        r.group.unwrap_or("-"),
        if r.request_id.is_empty() {
            "-"
        } else {
            r.request_id
        },
    );
}

/// The path and query, as an HTTP/1.1 request line has them (an HTTP/2
/// request's URI also carries the scheme and authority).
fn origin_form(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// A JSON line's fields, in the order they are written (by name).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    cache: Option<&'a str>,
    client: Option<IpAddr>,
    group: Option<&'a str>,
    method: &'a str,
    protocol: &'a str,
    request_id: Option<&'a str>,
    retries: u32,
    route: Option<&'a str>,
    status: u16,
    time: f64,
    upstream: Option<&'a str>,
    upstream_time: Option<f64>,
    uri: &'a str,
}

/// The JSON form of `r`, written straight from its fields (no document
/// built first: this runs for every request).
fn json(r: &Record<'_>) -> String {
    let line = JsonLine {
        cache: r.cache,
        client: r.client,
        group: r.group,
        method: r.method,
        protocol: r.protocol,
        request_id: (!r.request_id.is_empty()).then_some(r.request_id),
        retries: r.retries,
        route: r.route,
        status: r.status,
        time: r.time.as_secs_f64(),
        upstream: r.upstream,
        upstream_time: r.upstream_time.map(|d| d.as_secs_f64()),
        uri: origin_form(r.uri),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uri: &http::Uri) -> Record<'_> {
        Record {
            client: Some("10.1.2.3".parse().unwrap()),
            method: "GET",
            uri,
            protocol: "HTTP/1.1",
            status: 200,
            route: Some("api"),
            group: Some("default"),
            upstream: Some("127.0.0.1:8000"),
            request_id: "abc",
            upstream_time: Some(Duration::from_millis(12)),
            time: Duration::from_millis(15),
            retries: 1,
            cache: Some("MISS"),
        }
    }

    #[test]
    fn text_and_json_carry_the_same_facts() {
        let uri: http::Uri = "/cache-me?x=\"1\""
            .parse()
            .unwrap_or_else(|_| "/cache-me".parse().unwrap());
        let r = record(&uri);
        let text = |r: &Record<'_>| {
            let mut line = String::new();
            text(&mut line, r);
            line
        };
        assert_eq!(
            text(&r),
            format!("10.1.2.3 \"GET {uri} HTTP/1.1\" 200 upstream=127.0.0.1:8000 upstream_time=0.012 time=0.015 retries=1 cache=MISS route=api group=default request_id=abc")
        );
        // The fields in the order of their names, as the README shows them.
        assert!(json(&r).starts_with(concat!(
            r#"{"cache":"MISS","client":"10.1.2.3","group":"default","method":"GET","#,
            r#""protocol":"HTTP/1.1","request_id":"abc","retries":1,"route":"api","status":200,"#,
            r#""time":0.015,"upstream":"127.0.0.1:8000","upstream_time":0.012,"uri":"#
        )));
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "127.0.0.1:8000");
        assert_eq!(v["retries"], 1);
        assert_eq!(v["cache"], "MISS");
        assert_eq!(v["uri"], uri.to_string());
        let none = Record {
            upstream: None,
            upstream_time: None,
            cache: None,
            client: None,
            ..record(&uri)
        };
        let none = Record {
            route: None,
            group: None,
            request_id: "",
            ..none
        };
        assert!(
            text(&none).contains("- \"GET")
                && text(&none).ends_with("cache=- route=- group=- request_id=-")
        );
        assert!(json(&none).contains("\"upstream\":null"));
    }
}
