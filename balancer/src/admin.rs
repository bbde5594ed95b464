//! The admin listener (`admin_listen`): what the public listener never
//! offers. `GET /status` reports the upstreams and the cache as JSON;
//! `PURGE /path` empties the cache for a path.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::cache::ResponseCache;
use crate::reload::ReloadStats;
use crate::upstream::Pool;

pub struct Admin {
    pub cache: &'static ResponseCache,
    pub pool: Arc<Pool>,
    pub config_path: PathBuf,
    pub reloads: Arc<ReloadStats>,
}

impl Admin {
    fn status(&self) -> serde_json::Value {
        let upstreams: Vec<serde_json::Value> = self
            .pool
            .members()
            .iter()
            .map(|b| {
                serde_json::json!({
                    "address": b.addr.to_string(),
                    "server": &*b.server,
                    "healthy": b.is_healthy(),
                    "requests": b.requests(),
                    "consecutive_failures": b.consecutive_failures(),
                })
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
            "config": {
                "path": self.config_path.display().to_string(),
                "loaded_at": httpdate::fmt_http_date(loaded_at),
                "reloads_succeeded": reloads.succeeded.load(Ordering::Relaxed),
                "reloads_failed": reloads.failed.load(Ordering::Relaxed),
                "last_reload_error": last_error,
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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_owned();
        match req.method.as_str() {
            "PURGE" => {
                let purged = self.cache.storage.purge_path(&path);
                log::info!("cache purge of {path}: {purged} entries removed");
                let status = if purged > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                text(
                    status,
                    format!("purged {purged} cached entries for {path}\n"),
                )
            }
            _ if req.method == Method::GET && path == "/status" => {
                let mut resp = text(StatusCode::OK, format!("{}\n", self.status()));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                resp
            }
            _ if req.method == Method::GET || req.method == Method::HEAD => text(
                StatusCode::NOT_FOUND,
                format!("nothing at {path}; try /status\n"),
            ),
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not supported here; use PURGE /path to empty the cache for a path\n",
                    req.method
                ),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body.into_bytes());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}
