//! The file's process-wide sections in the form the request path reads
//! them: the client limits, the redirect to HTTPS, the access log and
//! compression. Each is made once per snapshot from its section, in
//! plain values (durations, byte counts, header values), so that the hooks
//! never see the file's types and never convert a value per request.

use std::time::Duration;

use pingora::protocols::http::compression::Algorithm;

use crate::config::{self, Encoding, TypePattern};
use crate::telemetry::access_log;

/// `[limits]`: what a client may send, and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The request line and headers together, in bytes; beyond it: 431.
    pub max_header_size: u64,
    /// Header fields in one request; beyond it: 431.
    pub max_headers: usize,
    /// A request body, in bytes; beyond it: 413.
    pub max_body_size: u64,
    pub keepalive_timeout: Duration,
    pub client_header_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
    pub lingering_time: Duration,
    pub lingering_timeout: Duration,
}

impl From<&config::Limits> for Limits {
    fn from(limits: &config::Limits) -> Limits {
        Limits {
            max_header_size: limits.max_header_size.0,
            max_headers: limits.max_headers as usize,
            max_body_size: limits.max_body_size.0,
            keepalive_timeout: limits.keepalive_timeout.0,
            client_header_timeout: limits.client_header_timeout.0,
            max_connections: limits.max_connections.get() as usize,
            lingering_time: limits.lingering_time.0,
            lingering_timeout: limits.lingering_timeout.0,
        }
    }
}

impl Default for Limits {
    /// A file without `[limits]`.
    fn default() -> Self {
        Limits::from(&config::Limits::default())
    }
}

/// `[tls] redirect_http`: a plain request is answered with a redirect to
/// the same host and target over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsRedirect {
    /// What follows the host in the new URL: `:PORT`, or nothing for 443.
    pub port: String,
}

impl HttpsRedirect {
    pub fn new(tls: &config::Tls) -> Option<HttpsRedirect> {
        tls.redirect_http.then(|| HttpsRedirect {
            port: match tls.listen.port() {
                443 => String::new(),
                port => format!(":{port}"),
            },
        })
    }
}

/// How each request is written to the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    pub format: access_log::Format,
    /// Whether probes of `/health-check` get a line.
    pub health_checks: bool,
}

impl AccessLog {
    pub fn new(config: &config::Config) -> AccessLog {
        AccessLog {
            format: match config.log_format {
                config::LogFormat::Text => access_log::Format::Text,
                config::LogFormat::Json => access_log::Format::Json,
            },
            health_checks: config.log_health_checks,
        }
    }
}

/// `[compression]`: which encodings, at which levels, for which responses.
#[derive(Debug, Clone, PartialEq)]
pub struct Compression {
    /// The encodings offered, in the order of preference among those a
    /// client accepts equally, each with its level.
    pub encodings: Vec<(Algorithm, u32)>,
    /// Smaller bodies (by their `Content-Length`) are sent as they are.
    pub min_length: u64,
    types: Vec<TypePattern>,
}

impl From<&config::Compression> for Compression {
    fn from(compression: &config::Compression) -> Compression {
        Compression {
            encodings: compression
                .algorithms
                .iter()
                .map(|&encoding| {
                    let algorithm = match encoding {
                        Encoding::Gzip => Algorithm::Gzip,
                        Encoding::Br => Algorithm::Brotli,
                        Encoding::Zstd => Algorithm::Zstd,
                    };
                    (algorithm, compression.level(encoding))
                })
                .collect(),
            min_length: compression.min_length.0,
            types: compression.types.clone(),
        }
    }
}

impl Default for Compression {
    /// A `[compression]` section that sets nothing.
    fn default() -> Self {
        Compression::from(&config::Compression::default())
    }
}

impl Compression {
    /// Whether responses of `content_type` are compressed.
    pub fn compresses(&self, content_type: &str) -> bool {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        self.types.iter().any(|t| t.matches(&media))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_default_is_gzip_at_6_for_text_types() {
        let c = Compression::default();
        assert_eq!(c.encodings, [(Algorithm::Gzip, 6)]);
        assert_eq!(c.min_length, 1024);
        for yes in [
            "text/html; charset=utf-8",
            "Text/CSS",
            "application/json",
            "application/problem+json",
            "application/atom+xml",
            "image/svg+xml",
            "application/javascript",
        ] {
            assert!(c.compresses(yes), "{yes}");
        }
        for no in [
            "image/png",
            "application/octet-stream",
            "application/zip",
            "+json",
            "",
        ] {
            assert!(!c.compresses(no), "{no}");
        }
    }

    #[test]
    fn compression_keeps_the_order_levels_and_types_written() {
        let written: config::Compression = toml::from_str(
            "algorithms = [\"br\", \"zstd\", \"gzip\"]\nlevels = { gzip = 1, br = 11 }\ntypes = [\"application/wasm\", \"+yaml\", \"font/*\"]\n",
        )
        .unwrap();
        let c = Compression::from(&written);
        assert_eq!(
            c.encodings,
            [
                (Algorithm::Brotli, 11),
                (Algorithm::Zstd, 3),
                (Algorithm::Gzip, 1)
            ]
        );
        assert!(
            c.compresses("application/wasm")
                && c.compresses("application/x+yaml")
                && c.compresses("font/woff")
        );
        assert!(!c.compresses("text/html"));
    }

    #[test]
    fn the_https_redirect_names_a_port_only_when_it_is_not_443() {
        let tls = |listen: &str| -> config::Tls {
            toml::from_str(&format!(
                "listen = \"{listen}\"\ncertificate = \"c\"\nprivate_key = \"k\"\nredirect_http = true\n"
            ))
            .unwrap()
        };
        assert_eq!(HttpsRedirect::new(&tls("0.0.0.0:443")).unwrap().port, "");
        assert_eq!(
            HttpsRedirect::new(&tls("0.0.0.0:8443")).unwrap().port,
            ":8443"
        );
    }
}
