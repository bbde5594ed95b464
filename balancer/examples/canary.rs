//! An extension kind, `canary`, that sends some requests to a canary
//! upstream group.
//!
//! **It routes; it does not authenticate.** The JWT it reads is NOT
//! verified: its signature is never checked, nor its expiry, issuer or
//! audience. Anyone can write a token that says `"canary": true` or names a
//! group, so a client can choose where its own request goes, among the
//! groups allowed below, and nothing more. Never let the groups it can
//! reach differ in what they allow; authenticate in front of it (see the
//! `api_keys` example) or in the backends.
//!
//! A request (on a route that lists the instance, or any request when it is
//! in `global_extensions`) goes to another group than its route's when, in
//! this order:
//!
//! 1. it has the instance's `header` set to `1`: to the canary group;
//! 2. its `Authorization: Bearer <jwt>` has a payload (the middle segment,
//!    base64url-decoded JSON) whose `"group"` claim names an allowed group:
//!    to that group;
//! 3. that payload has `"canary": true`: to the canary group.
//!
//! Anything else, a token that is not a JWT included, goes where its route
//! says. The response to a request it routed (any of the three, a group
//! claim naming the route's own group included) gets `X-Canary-Routed: 1`.
//!
//! ```toml
//! [extensions.canary]
//! kind = "canary"
//! upstream = "canary"          # the canary group: an [upstreams.NAME]
//! header = "x-canary"          # the default
//! groups = ["default", "canary"]   # what a "group" claim may name; the
//!                                  # default: default and the canary group
//!
//! [[route]]
//! path = "/"
//! upstream = "default"
//! extensions = ["canary"]
//! ```
//!
//! ```text
//! cargo run --example canary -- --config balancer.toml
//! ```
//!
//! Every group named is checked when the configuration is loaded (and by
//! `--check`, and by each reload): a group that is not defined is refused
//! with the instance's name and line, never a `500` at request time.

use std::collections::HashMap;
use std::process::ExitCode;

use balancer::extension::{
    Build, Decision, Extension, GroupRef, HookResult, Registry, RequestView, ResponseView,
};
use base64::Engine;
use http::HeaderName;
use pingora::http::RequestHeader;

/// Larger tokens are not looked into; request headers are bounded anyway,
/// this only bounds the work on each one.
const MAX_TOKEN_LEN: usize = 8 * 1024;

fn main() -> ExitCode {
    balancer::cli::main_with(Registry::new().register("canary", Canary::build))
}

/// The settings of a `canary` instance.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    upstream: String,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    groups: Option<Vec<String>>,
}

fn default_header() -> String {
    "x-canary".to_owned()
}

struct Canary {
    upstream: GroupRef,
    header: HeaderName,
    /// The groups a `"group"` claim may name.
    groups: HashMap<String, GroupRef>,
}

impl Canary {
    fn build(settings: Settings, build: &mut Build<'_>) -> Result<Canary, String> {
        let upstream = build
            .group(&settings.upstream)
            .map_err(|e| format!("upstream: {e}"))?;
        let header = HeaderName::try_from(settings.header.as_str())
            .map_err(|_| format!("header: {:?} is not a header name", settings.header))?;
        let names = settings
            .groups
            .unwrap_or_else(|| vec!["default".to_owned(), settings.upstream.clone()]);
        let mut groups = HashMap::new();
        for name in names {
            let group = build.group(&name).map_err(|e| format!("groups: {e}"))?;
            groups.insert(name, group);
        }
        Ok(Canary {
            upstream,
            header,
            groups,
        })
    }

    /// The group `req` is sent to instead of its route's, if any. A pure
    /// function of the request head, so that the response hook can tell
    /// which requests were sent elsewhere without state of its own.
    fn choice(&self, req: &RequestHeader) -> Option<&GroupRef> {
        let flagged = req
            .headers
            .get(&self.header)
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
    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        Ok(match self.choice(req.header) {
            Some(group) => Decision::Upstream(group.clone()),
            None => Decision::Continue,
        })
    }

    async fn on_response(&self, resp: &mut ResponseView<'_>) -> HookResult<()> {
        // The response hook has no state of the request's; the choice is
        // made again from the same head, and only counts when the request
        // did go there (an extension before this one may have decided
        // otherwise).
        if let Some(group) = self.choice(resp.request) {
            if resp.upstream == Some(group.name()) {
                resp.header.insert_header("x-canary-routed", "1")?;
            }
        }
        Ok(())
    }
}
