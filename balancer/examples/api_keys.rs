//! An extension kind, `api_keys`, that lets a request through only with a
//! valid API key.
//!
//! The key comes in `Authorization: Bearer KEY` or `X-Api-Key: KEY`; a
//! request with neither, or with keys that are not in the key file, is
//! answered `401` with `WWW-Authenticate: Bearer` and a plain-text reason,
//! and nothing is forwarded. It guards the routes that list an instance of
//! it, and every request when the instance is in `global_extensions`:
//!
//! ```toml
//! [extensions.keys]
//! kind = "api_keys"
//! keys_file = "api-keys.txt"   # relative to this file's folder
//!
//! [[route]]
//! name = "api"
//! path = "/api/"
//! extensions = ["keys"]
//! ```
//!
//! ```text
//! cargo run --example api_keys -- --config balancer.toml
//! ```
//!
//! - `keys_file` (required): one key per line; blank lines and lines
//!   starting with `#` are ignored. A file that cannot be read is refused
//!   by `--check`, at start and by a reload, each naming the instance, its
//!   line and the file. Keys are rotated by editing the file: the balancer
//!   sees the change as it sees an edit of its configuration, and builds
//!   the instance again; a file that becomes unreadable keeps the keys in
//!   force (the reload that would drop them is refused, and logged).
//! - A route that names an instance that is not declared, or a kind that
//!   this program does not know, is refused the same way: a misspelt name
//!   cannot leave a route open. The balancer's own `/health-check` is
//!   answered before any extension runs, so it is always open.
//!
//! What is forwarded: `X-Api-Key` is removed from every request the
//! instance sees, because it is the balancer's business only and a backend
//! that logged it would spread the key. `Authorization` is kept: a backend
//! may read the same bearer token for its own purposes, and the response
//! cache treats a request with `Authorization` as private, which it should
//! stay. Clients that do not want their key to reach the backends send it
//! in `X-Api-Key`.

use std::collections::HashSet;
use std::process::ExitCode;

use balancer::extension::{Build, Decision, Extension, HookResult, Registry, Reply, RequestView};
use http::HeaderValue;
use pingora::http::RequestHeader;

fn main() -> ExitCode {
    balancer::cli::main_with(Registry::new().register("api_keys", ApiKeys::build))
}

/// The settings of an `api_keys` instance.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    keys_file: String,
}

struct ApiKeys {
    keys: HashSet<String>,
}

impl ApiKeys {
    fn build(settings: Settings, build: &mut Build<'_>) -> Result<ApiKeys, String> {
        let text = build
            .read_to_string(&settings.keys_file)
            .map_err(|e| format!("keys_file: {e}"))?;
        let keys: HashSet<String> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if keys.is_empty() {
            log::warn!(
                "api_keys {}: {} holds no key: every request it guards is refused until keys are added",
                build.instance(),
                build.path(&settings.keys_file).display()
            );
        }
        Ok(ApiKeys { keys })
    }

    /// Whether the request carries a key of the file, and whether it carries any.
    fn check(&self, req: &RequestHeader) -> Presented {
        let mut presented = Presented::Nothing;
        for key in offered_keys(req) {
            if self.keys.contains(key) {
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
    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
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
            return Ok(Decision::Respond(Reply::text(401, reason).with_header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            )));
        }
        req.header.remove_header("x-api-key");
        Ok(Decision::Continue)
    }
}
