//! The admin listener (`admin_listen`): what the public listener never
//! offers. `GET /` is the status page, `GET /status` its JSON, `GET /metrics`
//! the Prometheus metrics, and `PURGE /path` empties the cache for a path.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{header, HeaderValue, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora_prometheus::PrometheusHttpApp;

use crate::cache::ResponseCache;
use crate::config::Config;
use crate::connections::Connections;
use crate::metrics;
use crate::reload::ReloadStats;
use crate::upstream::{Backend, Pool};

/// The status page: one self-contained file (no external assets), built on `/status`.
const STATUS_PAGE: &str = include_str!("status.html");

pub struct Admin {
    pub cache: &'static ResponseCache,
    pub pool: Arc<Pool>,
    pub config: Arc<ArcSwap<Config>>,
    pub config_path: PathBuf,
    pub reloads: Arc<ReloadStats>,
    pub connections: Arc<Connections>,
}

impl Admin {
    fn status(&self) -> serde_json::Value {
        let config = self.config.load();
        let members = self.pool.members();
        let upstreams: Vec<serde_json::Value> = config
            .upstream
            .servers
            .iter()
            .map(|server| {
                let name = server.to_string();
                let addresses: Vec<serde_json::Value> = members
                    .iter()
                    .filter(|b| *b.server == *name)
                    .map(|b| address(b))
                    .collect();
                serde_json::json!({ "name": name, "addresses": addresses })
            })
            .collect();
        let stats = &self.cache.stats;
        let storage = self.cache.storage;
        let reloads = &self.reloads;
        let loaded_at = *reloads.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
        let last_error = reloads
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": {
                "path": self.config_path.display().to_string(),
                "loaded_at": httpdate::fmt_http_date(loaded_at),
                "reloads_succeeded": reloads.succeeded.load(Ordering::Relaxed),
                "reloads_failed": reloads.failed.load(Ordering::Relaxed),
                "last_reload_error": last_error,
                "health_checks": config.upstream.health_check.is_some(),
                "cache_rules": config.cache.as_ref().map(|c| c.rules.iter().map(|r| r.path.as_str()).collect::<Vec<_>>()).unwrap_or_default(),
            },
            "connections": {
                "open": self.connections.open(),
                "max": config.limits.max_connections.get(),
                "refused": self.connections.refused(),
                "header_timeouts": self.connections.header_timeouts(),
            },
            "upstreams": upstreams,
            "cache": {
                "hits": stats.hits.load(Ordering::Relaxed),
                "misses": stats.misses.load(Ordering::Relaxed),
                "stale": stats.stale.load(Ordering::Relaxed),
                "bypasses": stats.bypasses.load(Ordering::Relaxed),
                "evictions": storage.evictions(),
                "stored_bytes": storage.stored_bytes(),
                "entries": storage.entry_count(),
            },
        })
    }
}

fn address(b: &Backend) -> serde_json::Value {
    let check = b.last_check().map(|c| {
        let ago = SystemTime::now().duration_since(c.at).unwrap_or_default();
        serde_json::json!({
            "ok": c.error.is_none(),
            "error": c.error,
            "at": httpdate::fmt_http_date(c.at),
            "seconds_ago": (ago.as_secs_f64() * 10.0).round() / 10.0,
        })
    });
    serde_json::json!({
        "address": b.label,
        "healthy": b.is_healthy(),
        "requests": b.requests(),
        "in_flight": b.in_flight(),
        "consecutive_failures": b.consecutive_failures(),
        "last_check": check,
    })
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_owned();
        let method = req.method.clone();
        match (method.as_str(), path.as_str()) {
            ("PURGE", _) => {
                let purged = self.cache.storage.purge_path(&path);
                log::info!("cache purge of {path}: {purged} entries removed");
                let status = if purged > 0 { StatusCode::OK } else { StatusCode::NOT_FOUND };
                reply(status, "text/plain; charset=utf-8", format!("purged {purged} cached entries for {path}\n"))
            }
            ("GET", "/metrics") => {
                metrics::refresh(&self.pool, self.cache, &self.reloads, &self.connections);
                PrometheusHttpApp.response(session).await
            }
            ("GET", "/status") => reply(StatusCode::OK, "application/json", format!("{}\n", self.status())),
            ("GET", "/") => reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE.to_owned()),
            _ if method == Method::GET || method == Method::HEAD => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                format!("nothing at {path}; try /, /status or /metrics\n"),
            ),
            _ => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                format!("{method} is not supported here; use PURGE /path to empty the cache for a path\n"),
            ),
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body.into_bytes());
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
