//! The access log: one line per request through the `log` crate's `access`
//! target, as text or as a JSON object (`log_format`).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::LogFormat;

/// What is known about a request once it is over.
pub struct Record<'a> {
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub uri: &'a http::Uri,
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

pub fn write(format: LogFormat, r: &Record<'_>) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let line = match format {
        LogFormat::Text => text(r),
        LogFormat::Json => json(r),
    };
    log::info!(target: "access", "{line}");
}

fn text(r: &Record<'_>) -> String {
    let mut line = String::with_capacity(160);
    let _ = write!(
        line,
        "{} \"{} {}\" {} upstream={} upstream_time=",
        r.client.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        r.method,
        r.uri,
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
    line
}

fn json(r: &Record<'_>) -> String {
    serde_json::json!({
        "client": r.client.map(|ip| ip.to_string()),
        "method": r.method,
        "uri": r.uri.to_string(),
        "status": r.status,
        "upstream": r.upstream,
        "upstream_time": r.upstream_time.map(|d| d.as_secs_f64()),
        "time": r.time.as_secs_f64(),
        "retries": r.retries,
        "cache": r.cache,
        "route": r.route,
        "group": r.group,
        "request_id": (!r.request_id.is_empty()).then_some(r.request_id),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uri: &http::Uri) -> Record<'_> {
        Record {
            client: Some("10.1.2.3".parse().unwrap()),
            method: "GET",
            uri,
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
        assert_eq!(
            text(&r),
            format!("10.1.2.3 \"GET {uri}\" 200 upstream=127.0.0.1:8000 upstream_time=0.012 time=0.015 retries=1 cache=MISS route=api group=default request_id=abc")
        );
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
