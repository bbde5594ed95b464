//! An extension that sends some requests to a canary upstream group.
//!
//! **It routes; it does not authenticate.** The JWT it reads is NOT
//! verified: its signature is never checked, nor its expiry, issuer or
//! audience. Anyone can write a token that says `"canary": true` or names a
//! group, so a client can choose where its own request goes, among the
//! groups allowed below, and nothing more. Never let the groups it can
//! reach differ in what they allow; authenticate in front of it (see the
//! `api_keys` example) or in the backends.
//!
//! A request goes to another group than its route's when, in this order:
//!
//! 1. it has `X-Canary: 1`: to the canary group;
//! 2. its `Authorization: Bearer <jwt>` has a payload (the middle segment,
//!    base64url-decoded JSON) whose `"group"` claim names an allowed group:
//!    to that group;
//! 3. that payload has `"canary": true`: to the canary group.
//!
//! Anything else, a token that is not a JWT included, goes where its route
//! says. The response to a request it routed (any of the three, a group
//! claim naming the route's own group included) gets `X-Canary-Routed: 1`.
//!
//! ```text
//! CANARY_UPSTREAM=canary cargo run --example canary -- --config balancer.toml
//! ```
//!
//! - `CANARY_UPSTREAM` (default `canary`): the canary group, an
//!   `[upstreams.NAME]` of the configuration.
//! - `CANARY_GROUPS` (default: `default` and the canary group): the groups a
//!   `"group"` claim may name, comma-separated. An extension cannot see the
//!   configuration, so these names are not checked against it: a group that
//!   is not defined answers `500`. A claim naming any other group is ignored.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use balancer::extension::{Decision, Extension, HookResult, RequestView, ResponseView};
use base64::Engine;
use pingora::http::RequestHeader;

/// Larger tokens are not looked into; request headers are bounded anyway,
/// this only bounds the work on each one.
const MAX_TOKEN_LEN: usize = 8 * 1024;

fn main() -> ExitCode {
    match Canary::from_env() {
        Ok(canary) => balancer::cli::main_with(vec![Arc::new(canary)]),
        Err(e) => {
            eprintln!("canary: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why the extension cannot start.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{var}={name:?} is not a group name: letters, digits, - and _ (at most 64)")]
    BadGroup { var: &'static str, name: String },
    #[error("{0} is not valid UTF-8")]
    NotUnicode(&'static str),
}

struct Canary {
    upstream: String,
    /// The groups a `"group"` claim may name.
    groups: HashSet<String>,
}

impl Canary {
    fn from_env() -> Result<Canary, SetupError> {
        let upstream = env("CANARY_UPSTREAM")?.unwrap_or_else(|| "canary".to_owned());
        group_name("CANARY_UPSTREAM", &upstream)?;
        let groups = match env("CANARY_GROUPS")? {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| group_name("CANARY_GROUPS", n).map(|()| n.to_owned()))
                .collect::<Result<_, _>>()?,
            None => HashSet::from(["default".to_owned(), upstream.clone()]),
        };
        Ok(Canary { upstream, groups })
    }

    /// The group `req` is sent to instead of its route's, if any. A pure
    /// function of the request head, so that the response hook can tell
    /// which requests were sent elsewhere without state of its own.
    fn choice<'a>(&'a self, req: &RequestHeader) -> Option<&'a str> {
        let flagged = req
            .headers
            .get("x-canary")
            .is_some_and(|v| v.as_bytes().trim_ascii() == b"1");
        if flagged {
            return Some(&self.upstream);
        }
        let claims = bearer_claims(req)?;
        if let Some(group) = claims.get("group").and_then(serde_json::Value::as_str) {
            if let Some(allowed) = self.groups.get(group) {
                return Some(allowed);
            }
        }
        (claims.get("canary") == Some(&serde_json::Value::Bool(true))).then_some(&self.upstream)
    }
}

/// An environment variable; `None` when unset or empty.
fn env(var: &'static str) -> Result<Option<String>, SetupError> {
    match std::env::var(var) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(SetupError::NotUnicode(var)),
    }
}

/// The same rule the configuration applies to `[upstreams.NAME]`.
fn group_name(var: &'static str, name: &str) -> Result<(), SetupError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(SetupError::BadGroup {
            var,
            name: name.to_owned(),
        })
    }
}

/// The payload of the JWT in `Authorization: Bearer`, when there is one
/// that decodes to a JSON object. Not verified: see the module comment.
fn bearer_claims(req: &RequestHeader) -> Option<serde_json::Map<String, serde_json::Value>> {
    let value = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut segments = token.trim().split('.');
    let (_header, payload, _signature) = (segments.next()?, segments.next()?, segments.next()?);
    if segments.next().is_some() {
        return None; // five segments: an encrypted JWE, not ours to read
    }
    // RFC 7515 says no padding; some encoders add it anyway.
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&json).ok()? {
        serde_json::Value::Object(claims) => Some(claims),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Extension for Canary {
    fn name(&self) -> &str {
        "canary"
    }

    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        Ok(match self.choice(req.header) {
            Some(group) => Decision::Upstream(group.to_owned()),
            None => Decision::Continue,
        })
    }

    async fn on_response(&self, resp: &mut ResponseView<'_>) -> HookResult<()> {
        // The response hook has no state of the request's; the choice is
        // made again from the same head, and only counts when the request
        // did go there (an extension before this one may have decided
        // otherwise).
        if let Some(group) = self.choice(resp.request) {
            if resp.upstream == Some(group) {
                resp.header.insert_header("x-canary-routed", "1")?;
            }
        }
        Ok(())
    }
}
