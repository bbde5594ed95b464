//! The access log: one line per request, as text or as a JSON object
//! (`log_format`), on standard error beside the process log and in its
//! format (`[TIME INFO  access] ...`). `RUST_LOG` filters it as the `access`
//! target (`RUST_LOG=info,access=off` turns it off).
//!
//! A request never waits for the log, and takes no lock another request
//! holds: each thread formats its lines into a buffer of its own, and one
//! writer thread swaps every buffer for an empty one every [`DRAIN_EVERY`]
//! and writes what it took to standard error, a batch per thread. The writer
//! is never woken by a request (a wake-up is a system call and a context
//! switch per request, which cost more than the line itself), so lines reach
//! the output in batches, at most that late, and the lines of different
//! threads may be that much out of order. When the output stalls (a full
//! disk, a slow pipe) and a thread's buffer reaches [`PENDING_MAX`], its new
//! lines are dropped and counted (`balancer_access_log_dropped_total`), not
//! waited for.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::text as fast;

/// How a line is written: `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

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
    /// How a WebSocket tunnel ended, for a request that opened one.
    pub tunnel: Option<Tunnel>,
}

/// What the line of a WebSocket says about its tunnel: `time` is then the
/// tunnel's duration, from the request to the close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Serialized by the tests alone: serde_json's form of a line is their yardstick.
#[cfg_attr(test, derive(serde::Serialize))]
pub struct Tunnel {
    /// `client`, `backend`, `idle` (idle_timeout), `stop` (the grace period
    /// of a graceful stop was over) or `error`.
    pub closed_by: &'static str,
    /// Bytes from the client to the backend, after the `101`.
    pub bytes_up: u64,
    /// Bytes from the backend to the client, after the `101`.
    pub bytes_down: u64,
}

/// The bytes of lines a thread may have waiting for the writer; beyond it,
/// its new lines are dropped. With [`DRAIN_EVERY`], room for 250,000 lines
/// of 200 bytes a second per thread.
const PENDING_MAX: usize = 1 << 20;
/// How often the writer drains the threads' buffers.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// One thread's lines, waiting for the writer.
type Pending = Arc<Mutex<Vec<u8>>>;

/// What the request threads and the writer share.
#[derive(Default)]
struct Shared {
    /// Every thread's buffer, added on the thread's first line.
    threads: Mutex<Vec<Pending>>,
    /// The writer's empty buffer, swapped for a thread's full one; locked
    /// for the whole of a drain, so that drains do not overlap.
    spare: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    /// Drains asked for by [`flush`], and the last one the writer began
    /// after such a request.
    flushes_asked: AtomicU64,
    flushes_done: AtomicU64,
}

struct Writer {
    shared: Arc<Shared>,
    thread: Thread,
}

static WRITER: OnceLock<Option<Writer>> = OnceLock::new();

/// The writer thread, started on first use (`None` if it could not be).
fn writer() -> Option<&'static Writer> {
    WRITER
        .get_or_init(|| {
            let shared = Arc::new(Shared::default());
            let drained = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name("access-log".to_owned())
                .spawn(move || loop {
                    std::thread::park_timeout(DRAIN_EVERY);
                    let asked = drained.flushes_asked.load(Ordering::Acquire);
                    drain(&drained, &mut std::io::stderr());
                    drained.flushes_done.store(asked, Ordering::Release);
                });
            match spawned {
                Ok(handle) => Some(Writer {
                    shared,
                    thread: handle.thread().clone(),
                }),
                Err(e) => {
                    log::error!("cannot start the access-log writer: {e}; the access log is off");
                    None
                }
            }
        })
        .as_ref()
}

/// Writes out every thread's waiting lines, a thread's at a time.
fn drain(shared: &Shared, out: &mut impl std::io::Write) {
    let mut spare = shared.spare.lock().unwrap_or_else(PoisonError::into_inner);
    let threads = shared
        .threads
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for pending in threads {
        {
            let mut lines = pending.lock().unwrap_or_else(PoisonError::into_inner);
            if lines.is_empty() {
                continue;
            }
            std::mem::swap(&mut *lines, &mut *spare);
        }
        let _ = out.write_all(&spare);
        spare.clear();
        // What a stalled output made grow is not kept for ever after.
        spare.shrink_to(PENDING_MAX / 4);
    }
    let _ = out.flush();
}

thread_local! {
    /// This thread's buffer, registered with the writer.
    static PENDING: Pending = {
        let pending = Pending::default();
        if let Some(w) = writer() {
            w.shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::clone(&pending));
        }
        pending
    };
}

/// Lines dropped because the output could not keep up.
pub fn dropped() -> u64 {
    WRITER
        .get()
        .and_then(Option::as_ref)
        .map_or(0, |w| w.shared.dropped.load(Ordering::Relaxed))
}

/// Has the writer write every waiting line now, and waits (at most
/// `within`) until it has: at exit.
pub fn flush(within: Duration) {
    let Some(w) = WRITER.get().and_then(Option::as_ref) else {
        return;
    };
    let asked = w.shared.flushes_asked.fetch_add(1, Ordering::AcqRel) + 1;
    w.thread.unpark();
    let deadline = Instant::now() + within;
    while w.shared.flushes_done.load(Ordering::Acquire) < asked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Adds the line for `r` to this thread's waiting lines, unless the
/// `access` target is filtered out.
pub fn write(format: Format, r: &Record<'_>) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let Some(writer) = writer() else {
        return;
    };
    PENDING.with(|pending| {
        let mut lines = pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !append_line(&mut lines, format, r) {
            writer.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Appends the whole line for `r` to `lines`; `false` (and nothing
/// appended) when they already hold [`PENDING_MAX`] bytes.
fn append_line(lines: &mut Vec<u8>, format: Format, r: &Record<'_>) -> bool {
    if lines.len() >= PENDING_MAX {
        return false;
    }
    lines.push(b'[');
    fast::push_now(lines);
    lines.extend_from_slice(b" INFO  access] ");
    match format {
        Format::Text => text(lines, r),
        Format::Json => json(lines, r),
    }
    lines.push(b'\n');
    true
}

/// Appends the text form of `r` to `line`.
fn text(line: &mut Vec<u8>, r: &Record<'_>) {
    match r.client {
        Some(ip) => line.extend_from_slice(fast::IpText::new(ip).as_str().as_bytes()),
        None => line.push(b'-'),
    }
    put(
        line,
        &[
            " \"",
            r.method,
            " ",
            origin_form(r.uri),
            " ",
            r.protocol,
            "\" ",
        ],
    );
    fast::push_number(line, u64::from(r.status));
    put(
        line,
        &[" upstream=", r.upstream.unwrap_or("-"), " upstream_time="],
    );
    match r.upstream_time {
        Some(d) => fast::push_seconds(line, d),
        None => line.push(b'-'),
    }
    line.extend_from_slice(b" time=");
    fast::push_seconds(line, r.time);
    line.extend_from_slice(b" retries=");
    fast::push_number(line, u64::from(r.retries));
    let request_id = if r.request_id.is_empty() {
        "-"
    } else {
        r.request_id
    };
    put(
        line,
        &[
            " cache=",
            r.cache.unwrap_or("-"),
            " route=",
            r.route.unwrap_or("-"),
            " group=",
            r.group.unwrap_or("-"),
            " request_id=",
            request_id,
        ],
    );
    if let Some(t) = r.tunnel {
        let _ = write!(
            line,
            " tunnel_closed_by={} bytes_up={} bytes_down={}",
            t.closed_by, t.bytes_up, t.bytes_down
        );
    }
}

fn put(line: &mut Vec<u8>, parts: &[&str]) {
    for part in parts {
        line.extend_from_slice(part.as_bytes());
    }
}

/// The path and query, as an HTTP/1.1 request line has them (an HTTP/2
/// request's URI also carries the scheme and authority).
fn origin_form(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// Appends the JSON form of `r` to `line`: the fields in the order of
/// their names, written as `serde_json` writes them (the tests compare the
/// two byte for byte), but directly: serializing a struct cost twice the
/// text line's instructions (the address and the numbers through Rust's
/// formatting machinery), and this runs for every request.
fn json(line: &mut Vec<u8>, r: &Record<'_>) {
    line.extend_from_slice(b"{\"cache\":");
    json_str_or_null(line, r.cache);
    line.extend_from_slice(b",\"client\":");
    match r.client {
        Some(ip) => json_str(line, fast::IpText::new(ip).as_str()),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"group\":");
    json_str_or_null(line, r.group);
    line.extend_from_slice(b",\"method\":");
    json_str(line, r.method);
    line.extend_from_slice(b",\"protocol\":");
    json_str(line, r.protocol);
    line.extend_from_slice(b",\"request_id\":");
    json_str_or_null(line, (!r.request_id.is_empty()).then_some(r.request_id));
    line.extend_from_slice(b",\"retries\":");
    fast::push_number(line, u64::from(r.retries));
    line.extend_from_slice(b",\"route\":");
    json_str_or_null(line, r.route);
    line.extend_from_slice(b",\"status\":");
    fast::push_number(line, u64::from(r.status));
    line.extend_from_slice(b",\"time\":");
    json_seconds(line, r.time);
    if let Some(t) = r.tunnel {
        line.extend_from_slice(b",\"tunnel\":{\"closed_by\":");
        json_str(line, t.closed_by);
        line.extend_from_slice(b",\"bytes_up\":");
        fast::push_number(line, t.bytes_up);
        line.extend_from_slice(b",\"bytes_down\":");
        fast::push_number(line, t.bytes_down);
        line.push(b'}');
    }
    line.extend_from_slice(b",\"upstream\":");
    json_str_or_null(line, r.upstream);
    line.extend_from_slice(b",\"upstream_time\":");
    match r.upstream_time {
        Some(d) => json_seconds(line, d),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"uri\":");
    json_str(line, origin_form(r.uri));
    line.push(b'}');
}

/// A duration in seconds as a JSON number, every digit of its `f64` kept
/// (the shortest form that reads back the same).
fn json_seconds(line: &mut Vec<u8>, d: Duration) {
    // A duration is finite: never the `NaN` that JSON cannot carry.
    line.extend_from_slice(ryu::Buffer::new().format_finite(d.as_secs_f64()).as_bytes());
}

fn json_str_or_null(line: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(line, s),
        None => line.extend_from_slice(b"null"),
    }
}

/// `s` as a JSON string: `"` and `\` escaped, and the control characters
/// (by their short escape where JSON has one); the rest as it is.
fn json_str(line: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    line.push(b'"');
    // Most strings need no escape: one pass (without an early exit, so
    // that it runs many bytes at a time) says so, and they go in whole.
    let escapes = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escapes {
        line.extend_from_slice(s.as_bytes());
        line.push(b'"');
        return;
    }
    let mut plain = 0; // the start of the bytes not written yet
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f => 0,
            _ => continue,
        };
        line.extend_from_slice(&s.as_bytes()[plain..i]);
        plain = i + 1;
        if short == 0 {
            line.extend_from_slice(b"\\u00");
            line.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            line.extend_from_slice(&[b'\\', short]);
        }
    }
    line.extend_from_slice(&s.as_bytes()[plain..]);
    line.push(b'"');
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
            tunnel: None,
        }
    }

    #[test]
    fn text_and_json_carry_the_same_facts() {
        let uri: http::Uri = "/cache-me?x=\"1\""
            .parse()
            .unwrap_or_else(|_| "/cache-me".parse().unwrap());
        let r = record(&uri);
        let text = |r: &Record<'_>| {
            let mut line = Vec::new();
            text(&mut line, r);
            String::from_utf8(line).unwrap()
        };
        let json = |r: &Record<'_>| {
            let mut line = Vec::new();
            json(&mut line, r);
            String::from_utf8(line).unwrap()
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
        assert!(!json(&none).contains("tunnel"), "{}", json(&none));

        let tunnel = Record {
            status: 101,
            tunnel: Some(Tunnel {
                closed_by: "client",
                bytes_up: 12,
                bytes_down: 34,
            }),
            ..record(&uri)
        };
        assert!(text(&tunnel)
            .ends_with(" request_id=abc tunnel_closed_by=client bytes_up=12 bytes_down=34"));
        let v: serde_json::Value = serde_json::from_str(&json(&tunnel)).unwrap();
        assert_eq!(v["tunnel"]["closed_by"], "client");
        assert_eq!(v["tunnel"]["bytes_up"], 12);
        assert_eq!(v["tunnel"]["bytes_down"], 34);
    }

    /// What `serde_json` writes for a record's fields: the form the JSON
    /// line had when it was serialized from this struct, kept to the byte.
    fn serde_json_line(r: &Record<'_>) -> String {
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
            #[serde(skip_serializing_if = "Option::is_none")]
            tunnel: Option<Tunnel>,
            upstream: Option<&'a str>,
            upstream_time: Option<f64>,
            uri: &'a str,
        }
        serde_json::to_string(&JsonLine {
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
            tunnel: r.tunnel,
            upstream: r.upstream,
            upstream_time: r.upstream_time.map(|d| d.as_secs_f64()),
            uri: origin_form(r.uri),
        })
        .unwrap()
    }

    fn assert_written_as_serde_json_writes(r: &Record<'_>, what: &str) {
        let mut line = Vec::new();
        json(&mut line, r);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            serde_json_line(r),
            "{what}"
        );
    }

    #[test]
    fn a_json_line_is_what_serde_json_writes_byte_for_byte() {
        let uris: Vec<http::Uri> = ["/", "/a%20b?q=1&r=%22", "/x/y.z?"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        // Names from the configuration can hold anything a TOML string can.
        let awkward = [
            "plain",
            "quote\" and back\\slash",
            "line\nfeed\r\ttab\u{8}\u{c}",
            "\u{0}\u{1}\u{1f}\u{7f} controls",
            "ünïcödé ✓ 🦀",
            "",
        ];
        let durations = [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(3_096_108),
            Duration::from_millis(15),
            Duration::from_secs(3600) + Duration::from_nanos(123_456_789),
        ];
        let ips = [None, Some("10.1.2.3"), Some("::1"), Some("2001:db8::7348")];
        let mut checked = 0;
        for (i, uri) in uris.iter().cycle().take(24).enumerate() {
            let name = awkward[i % awkward.len()];
            let r = Record {
                client: ips[i % ips.len()].map(|ip| ip.parse().unwrap()),
                method: ["GET", "POST", "M\"X"][i % 3],
                protocol: ["HTTP/1.1", "HTTP/2+TLS"][i % 2],
                status: [0, 101, 200, 404, 503][i % 5],
                route: (i % 4 != 0).then_some(name),
                group: (i % 3 != 0).then_some(name),
                upstream: (i % 5 != 0).then_some("127.0.0.1:8000"),
                request_id: ["", "abc", name][i % 3],
                upstream_time: (i % 2 == 0).then_some(durations[(i + 1) % durations.len()]),
                time: durations[i % durations.len()],
                retries: [0, 1, u32::MAX][i % 3],
                cache: [None, Some("HIT"), Some("MISS")][i % 3],
                tunnel: (i % 4 == 1).then_some(Tunnel {
                    closed_by: ["client", "idle"][i % 2],
                    bytes_up: [0, 12, u64::MAX][i % 3],
                    bytes_down: 34,
                }),
                uri,
            };
            assert_written_as_serde_json_writes(&r, &format!("record {i}"));
            checked += 1;
        }
        assert_eq!(checked, 24);
    }

    #[test]
    fn any_string_and_duration_is_written_as_serde_json_writes_it() {
        // Strings drawn from ASCII (controls, quotes and backslashes
        // included) and a few wider characters; durations of any size.
        let mut rng = fastrand::Rng::with_seed(26);
        let alphabet: Vec<char> = (0u8..0x80)
            .map(char::from)
            .chain(['é', 'ß', '\u{2028}', '\u{fffd}', '✓', '🦀'])
            .collect();
        let uri: http::Uri = "/".parse().unwrap();
        for i in 0..5_000 {
            let text: String = (0..rng.usize(0..24))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let r = Record {
                route: Some(&text),
                upstream: Some(&text),
                time: Duration::from_nanos(rng.u64(..) >> rng.u32(0..64)),
                upstream_time: Some(Duration::new(rng.u64(..1 << 40), rng.u32(..1_000_000_000))),
                ..record(&uri)
            };
            assert_written_as_serde_json_writes(&r, &format!("case {i}: {text:?}"));
        }
    }

    #[test]
    fn a_full_buffer_drops_whole_lines_and_a_drain_writes_every_threads_lines() {
        let uri: http::Uri = "/x".parse().unwrap();
        let r = record(&uri);
        let mut lines = Vec::new();
        assert!(append_line(&mut lines, Format::Text, &r));
        assert!(lines.ends_with(b" request_id=abc\n"), "{lines:?}");
        lines.resize(PENDING_MAX, b'.');
        assert!(!append_line(&mut lines, Format::Json, &r));
        assert_eq!(
            lines.len(),
            PENDING_MAX,
            "nothing of a dropped line is kept"
        );

        let shared = Shared::default();
        for n in 0..3 {
            let pending = Pending::default();
            pending
                .lock()
                .unwrap()
                .extend_from_slice(format!("line {n}\n").as_bytes());
            shared.threads.lock().unwrap().push(pending);
        }
        let mut out = Vec::new();
        drain(&shared, &mut out);
        assert_eq!(out, b"line 0\nline 1\nline 2\n");
        let threads = shared.threads.lock().unwrap();
        assert!(threads.iter().all(|p| p.lock().unwrap().is_empty()));
        drop(threads);
        let mut again = Vec::new();
        drain(&shared, &mut again);
        assert!(again.is_empty(), "a line is written once");
    }
}
