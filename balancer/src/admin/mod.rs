//! The admin listener (`admin_listen`): what the public listener never
//! offers. `GET /` is the status page, `GET /status` its JSON, `GET /metrics`
//! the Prometheus metrics, and `PURGE /path` empties the cache for a path.
//!
//! What only reads is open to whoever reaches the listener. What changes
//! state (`PURGE`) needs the admin token (`Authorization: Bearer TOKEN`)
//! whenever one is set (`BALANCER_ADMIN_TOKEN`, or the file named by
//! `admin_token_file`), and is refused outright when the listener is not on a
//! loopback address and no token is set.

pub mod metrics;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{header, HeaderValue, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora_prometheus::PrometheusHttpApp;

use crate::cache::ResponseCache;
use crate::proxy::connections::Connections;
use crate::routing::{Action, Route};
use crate::runtime::reload::ReloadStats;
use crate::runtime::{Live, Snapshot};
use crate::telemetry::logging::Throttle;
use crate::tls::CertStore;
use crate::upstream::Backend;

/// The status page: one self-contained file (no external assets), built on `/status`.
const STATUS_PAGE: &str = include_str!("status.html");

/// A missing token file is logged once a second at most, however often PURGE is tried.
static TOKEN_FILE_ERRORS: Throttle = Throttle::new();

/// The environment variable that may hold the admin token.
pub const TOKEN_ENV: &str = "BALANCER_ADMIN_TOKEN";

pub struct Admin {
    /// The TLS listener's certificates, when there is one.
    pub certificates: Option<Arc<CertStore>>,
    /// The state of each `[tls.acme]` name, when there is that section.
    pub acme: Option<Arc<crate::tls::acme::AcmeStatus>>,
    /// `BALANCER_ADMIN_TOKEN` as it was at start-up (empty counts as unset).
    pub token_from_env: Option<String>,
    pub cache: &'static ResponseCache,
    pub live: Arc<Live>,
    pub config_path: PathBuf,
    pub reloads: Arc<ReloadStats>,
    pub connections: Arc<Connections>,
}

impl Admin {
    /// Whether `req` may change state; the error is the reason a client reads.
    fn authorize(&self, req: &pingora::http::RequestHeader) -> Result<(), String> {
        let snapshot = self.live.load();
        let config = &snapshot.config;
        let token = match (&self.token_from_env, &config.admin_token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(file)) => {
                let read = std::fs::read_to_string(file).map_err(|e| e.to_string());
                match read.as_deref().map(str::trim) {
                    Ok(token) if !token.is_empty() => Some(token.to_owned()),
                    outcome => {
                        if TOKEN_FILE_ERRORS.allow() {
                            let why = outcome.err().map_or("it is empty", String::as_str);
                            log::error!(
                                "cannot use admin_token_file {}: {why}; PURGE is refused",
                                file.display()
                            );
                        }
                        return Err("no admin token is set".to_owned());
                    }
                }
            }
            (None, None) => None,
        };
        let Some(token) = token else {
            return match config.admin_listen {
                Some(addr) if addr.ip().is_loopback() => Ok(()),
                _ => Err(format!(
                    "admin_listen is not a loopback address and no admin token is set ({TOKEN_ENV} or admin_token_file)"
                )),
            };
        };
        let offered = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match offered {
            Some(offered) if same_secret(offered.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err("the admin token does not match".to_owned()),
            None => Err("send the admin token as Authorization: Bearer TOKEN".to_owned()),
        }
    }

    /// `GET /status`: the configuration in force and how it was loaded, the
    /// client connections, the certificates, the groups and their backends,
    /// the routes and the cache, as the status page reads them.
    fn status(&self) -> serde_json::Value {
        let snapshot = self.live.load();
        let (upstreams, groups) = groups(&snapshot);
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.config_status(&snapshot),
            "connections": {
                "open": self.connections.open(),
                "max": snapshot.limits.max_connections,
                "refused": self.connections.refused(),
                "header_timeouts": self.connections.header_timeouts(),
                "lingering": self.connections.lingering(),
            },
            "certificates": self.certificates.as_deref().map(certificates).unwrap_or_default(),
            "acme": self.acme.as_ref().map(|status| status.domains()),
            "upstreams": upstreams,
            "groups": groups,
            "routes": snapshot.routes.iter().map(route).collect::<Vec<_>>(),
            "cache": cache(self.cache),
        })
    }

    /// The file in force, when it was loaded, and how its reloads went.
    fn config_status(&self, snapshot: &Snapshot) -> serde_json::Value {
        let reloads = &self.reloads;
        let loaded_at = *reloads.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
        let last_error = reloads
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "path": self.config_path.display().to_string(),
            "loaded_at": httpdate::fmt_http_date(loaded_at),
            "reloads_succeeded": reloads.succeeded.load(Ordering::Relaxed),
            "reloads_failed": reloads.failed.load(Ordering::Relaxed),
            "last_reload_error": last_error,
            "health_checks": snapshot.groups.values().any(|g| g.health_check.is_some()),
            "cache_rules": snapshot.cache.as_ref().map(|c| c.rules.iter().map(|r| r.path.as_str()).collect::<Vec<_>>()).unwrap_or_default(),
        })
    }
}

/// Each group, with each of its servers entries and their addresses, and
/// (first) every entry of every group in one list, as the page reads it.
fn groups(snapshot: &Snapshot) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mut upstreams = Vec::new();
    let mut groups = Vec::new();
    for (name, group) in &snapshot.groups {
        let members = group.state.pool.members();
        let servers: Vec<serde_json::Value> = group
            .servers
            .iter()
            .map(|entry| {
                let server = entry.addr.to_string();
                let addresses: Vec<serde_json::Value> = members
                    .iter()
                    .filter(|b| *b.server == *server)
                    .map(|b| address(b))
                    .collect();
                serde_json::json!({
                    "name": server,
                    "group": name,
                    "weight": entry.weight.get(),
                    "addresses": addresses,
                })
            })
            .collect();
        upstreams.extend(servers.iter().cloned());
        groups.push(serde_json::json!({
            "name": name,
            "algorithm": group.algorithm.to_string(),
            "hash_key": group.hash_key().map(ToString::to_string),
            "health_checks": group.health_check.is_some(),
            "servers": servers,
        }));
    }
    (upstreams, groups)
}

/// One route: what it matches, and what it does.
fn route(route: &Route) -> serde_json::Value {
    let action = match &route.action {
        Action::Upstream(group) => format!("upstream {group}"),
        Action::Redirect { status, .. } => format!("redirect {status}"),
        Action::Respond { status, .. } => format!("respond {status}"),
    };
    serde_json::json!({
        "name": &*route.label,
        "host": route.host.as_ref().map(ToString::to_string),
        "path": route.path,
        "methods": route.methods.as_ref().map(|m| m.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "action": action,
        "rate_limit": route.rate_limit.as_ref().map(|l| l.limit().to_string()),
    })
}

/// The TLS listener's certificates and how long each has left.
fn certificates(store: &CertStore) -> Vec<serde_json::Value> {
    store
        .certificates()
        .iter()
        .map(|c| {
            let left = c
                .not_after
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs());
            serde_json::json!({
                "file": c.file.display().to_string(),
                "hosts": c.hosts,
                "names": c.names,
                "not_after": httpdate::fmt_http_date(c.not_after),
                "seconds_left": left,
            })
        })
        .collect()
}

fn cache(cache: &ResponseCache) -> serde_json::Value {
    let stats = &cache.stats;
    let storage = cache.storage;
    serde_json::json!({
        "hits": stats.hits.load(Ordering::Relaxed),
        "misses": stats.misses.load(Ordering::Relaxed),
        "stale": stats.stale.load(Ordering::Relaxed),
        "bypasses": stats.bypasses.load(Ordering::Relaxed),
        "evictions": storage.evictions(),
        "stored_bytes": storage.stored_bytes(),
        "entries": storage.entry_count(),
    })
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
        let refusal = (method.as_str() == "PURGE")
            .then(|| self.authorize(req).err())
            .flatten();
        match (method.as_str(), path.as_str()) {
            ("PURGE", _) if refusal.is_some() => reply(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                format!("401 unauthorized: {}\n", refusal.unwrap_or_default()),
            ),
            ("PURGE", _) => {
                let purged = self.cache.storage.purge_path(&path);
                log::info!("cache purge of {path}: {purged} entries removed");
                let status = if purged > 0 { StatusCode::OK } else { StatusCode::NOT_FOUND };
                reply(status, "text/plain; charset=utf-8", format!("purged {purged} cached entries for {path}\n"))
            }
            ("GET", "/metrics") => PrometheusHttpApp.response(session).await,
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

/// Compares two secrets in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
