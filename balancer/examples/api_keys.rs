//! An extension that lets a request through only with a valid API key.
//!
//! The key comes in `Authorization: Bearer KEY` or `X-Api-Key: KEY`; a
//! request with neither, or with keys that are not in the key file, is
//! answered `401` with `WWW-Authenticate: Bearer` and a plain-text reason,
//! and nothing is forwarded.
//!
//! ```text
//! API_KEYS_FILE=/etc/balancer/api-keys API_KEYS_ROUTES=api,admin \
//!     cargo run --example api_keys -- --config balancer.toml
//! ```
//!
//! - `API_KEYS_FILE` (required): one key per line; blank lines and lines
//!   starting with `#` are ignored. The program refuses to start (exit 2)
//!   when it is unset or cannot be read. The file is looked at again at most
//!   once a second, on the request path, and read again when its
//!   modification time or size changed: keys are rotated by editing the
//!   file, without a restart. A file that becomes unreadable later keeps the
//!   keys read before (and says so in the log).
//! - `API_KEYS_ROUTES` (optional): the names of the routes that need a key,
//!   comma-separated. Unset: every request needs one. Set: requests on other
//!   routes, and requests that match no route at all, go through without a
//!   key. The names are not checked against the configuration (an extension
//!   cannot see it): a misspelt name leaves its route open. The balancer's
//!   own `/health-check` is answered before any extension runs, so it is
//!   always open.
//!
//! What is forwarded: `X-Api-Key` is removed from every request (on open
//! routes too), because it is the balancer's business only and a backend
//! that logged it would spread the key. `Authorization` is kept: a backend
//! may read the same bearer token for its own purposes, and the response
//! cache treats a request with `Authorization` as private, which it should
//! stay. Clients that do not want their key to reach the backends send it
//! in `X-Api-Key`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use balancer::extension::{Decision, Extension, HookResult, Reply, RequestView};
use pingora::http::RequestHeader;

/// How often the key file is looked at, at most.
const CHECK_EVERY_MS: u64 = 1000;

fn main() -> ExitCode {
    match ApiKeys::from_env() {
        Ok(api_keys) => balancer::cli::main_with(vec![Arc::new(api_keys)]),
        Err(e) => {
            eprintln!("api_keys: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why the extension cannot start.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("API_KEYS_FILE is not set: name the file of API keys (one per line), e.g. API_KEYS_FILE=/etc/balancer/api-keys")]
    FileUnset,
    #[error("API_KEYS_FILE={}: cannot read it ({source}); check the path and its permissions", path.display())]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API_KEYS_ROUTES names no route: unset it to require a key on every request, or list route names separated by commas")]
    NoRoutes,
    #[error("API_KEYS_ROUTES is not valid UTF-8")]
    RoutesNotUnicode,
}

/// The keys of one reading of the file, and how the file looked then.
struct KeyFile {
    keys: HashSet<String>,
    stamp: Stamp,
}

/// What tells that the file changed without reading it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
        }
    }
}

impl KeyFile {
    fn read(path: &Path) -> std::io::Result<KeyFile> {
        // The stamp is taken from the file that is read: a change after this
        // has a later stamp, and is read at the next check.
        let file = std::fs::File::open(path)?;
        let stamp = Stamp::of(&file.metadata()?);
        let text = std::io::read_to_string(file)?;
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_owned)
            .collect();
        Ok(KeyFile { keys, stamp })
    }
}

struct ApiKeys {
    file: PathBuf,
    /// `None`: every request needs a key.
    routes: Option<HashSet<String>>,
    keys: ArcSwap<KeyFile>,
    started: Instant,
    /// When (ms after `started`) the file is next looked at; the request
    /// that moves it on does the looking, the others go on with the keys
    /// they have.
    next_check: AtomicU64,
    /// Whether the last look failed, so that a lasting failure is logged once.
    failing: AtomicBool,
}

impl ApiKeys {
    fn from_env() -> Result<ApiKeys, SetupError> {
        let file = std::env::var_os("API_KEYS_FILE")
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .ok_or(SetupError::FileUnset)?;
        let routes = match std::env::var("API_KEYS_ROUTES") {
            Ok(list) => Some(route_names(&list)?),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => return Err(SetupError::RoutesNotUnicode),
        };
        let keys = KeyFile::read(&file).map_err(|source| SetupError::FileUnreadable {
            path: file.clone(),
            source,
        })?;
        if keys.keys.is_empty() {
            // Logging starts with the server; this is said before it.
            eprintln!(
                "api_keys: warning: {} holds no key: every request that needs one is refused until keys are added",
                file.display()
            );
        }
        Ok(ApiKeys {
            file,
            routes,
            keys: ArcSwap::from_pointee(keys),
            started: Instant::now(),
            next_check: AtomicU64::new(CHECK_EVERY_MS),
            failing: AtomicBool::new(false),
        })
    }

    fn applies_to(&self, route: Option<&str>) -> bool {
        match &self.routes {
            None => true,
            Some(names) => route.is_some_and(|r| names.contains(r)),
        }
    }

    /// Reads the file again when a second has passed and it has changed.
    fn refresh_if_due(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let due = self.next_check.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now.saturating_add(CHECK_EVERY_MS);
        if self
            .next_check
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another request is looking
        }
        let current = self.keys.load();
        let looked = std::fs::metadata(&self.file).and_then(|metadata| {
            if Stamp::of(&metadata) == current.stamp {
                Ok(None)
            } else {
                KeyFile::read(&self.file).map(Some)
            }
        });
        match looked {
            Ok(None) => {}
            Ok(Some(fresh)) => {
                log::info!(
                    "api_keys: {} changed: {} keys now (were {})",
                    self.file.display(),
                    fresh.keys.len(),
                    current.keys.len()
                );
                self.keys.store(Arc::new(fresh));
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "api_keys: cannot read {} ({e}); keeping the {} keys read before",
                        self.file.display(),
                        current.keys.len()
                    );
                }
                return;
            }
        }
        if self.failing.swap(false, Ordering::Relaxed) {
            log::info!("api_keys: {} is readable again", self.file.display());
        }
    }

    /// Whether the request carries a key of the file, and whether it carries any.
    fn check(&self, req: &RequestHeader) -> Presented {
        let keys = self.keys.load();
        let mut presented = Presented::Nothing;
        for key in offered_keys(req) {
            if keys.keys.contains(key) {
                return Presented::Valid;
            }
            presented = Presented::Invalid;
        }
        presented
    }
}

enum Presented {
    Nothing,
    Invalid,
    Valid,
}

/// The comma-separated names of `API_KEYS_ROUTES`; an empty list is refused,
/// since it would protect nothing while looking like it protects something.
fn route_names(list: &str) -> Result<HashSet<String>, SetupError> {
    let names: HashSet<String> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(SetupError::NoRoutes);
    }
    Ok(names)
}

/// The keys a request offers: bearer tokens of `Authorization` (the scheme
/// is case-insensitive, RFC 9110 section 11.1) and every `X-Api-Key`.
fn offered_keys(req: &RequestHeader) -> impl Iterator<Item = &str> {
    let bearer = req
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let api_key = req
        .headers
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim);
    bearer.chain(api_key).filter(|k| !k.is_empty())
}

#[async_trait::async_trait]
impl Extension for ApiKeys {
    fn name(&self) -> &str {
        "api_keys"
    }

    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        if self.applies_to(req.route) {
            self.refresh_if_due();
            let refusal = match self.check(req.header) {
                Presented::Valid => None,
                Presented::Nothing => Some((
                    "Bearer",
                    "401 unauthorized: this needs an API key, sent as `Authorization: Bearer KEY` or `X-Api-Key: KEY`\n",
                )),
                Presented::Invalid => Some((
                    "Bearer error=\"invalid_token\"",
                    "401 unauthorized: the API key is not valid (or no longer)\n",
                )),
            };
            if let Some((challenge, reason)) = refusal {
                return Ok(Decision::Respond(
                    Reply::text(401, reason).header("www-authenticate", challenge),
                ));
            }
        }
        req.header.remove_header("x-api-key");
        Ok(Decision::Continue)
    }
}
