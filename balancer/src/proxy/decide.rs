//! What becomes of a request, decided from its facts and the snapshot
//! alone, without a Pingora session (so it is unit-tested with plain
//! values): answered by the balancer (the redirect to HTTPS, a rate limit's
//! `429`, a route's `respond` or `redirect`), or forwarded, after the
//! extensions have had their say, to the route's group or the default one.
//! Carrying the decision out is `request_filter`'s.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::extension::Reply;
use crate::routing::{self, Action, RequestFacts, Vars};
use crate::runtime::Snapshot;
use crate::upstream::Group;

/// What the decision reads of a request.
pub struct Facts<'a> {
    pub req: &'a RequestHeader,
    /// Lower case, without port; empty when the snapshot does not look at hosts.
    pub host: &'a str,
    /// It came over TLS.
    pub tls: bool,
    pub client_ip: Option<IpAddr>,
    pub request_id: &'a str,
}

/// The decision, and the route it was made by.
pub struct Plan {
    /// The matched route's position in the snapshot.
    pub route: Option<usize>,
    pub action: Decided,
}

pub enum Decided {
    /// Answer with this; nothing is forwarded and no extension runs.
    Answer(Reply),
    /// Forward to this group (`None`: no route matched and there is no
    /// default group; an extension may still choose one).
    Forward(Option<Arc<Group>>),
}

/// Decides what becomes of the request of `facts`. Stateful only in the
/// rate limit's counts, which a matching request is counted in.
pub fn plan(facts: &Facts<'_>, snapshot: &Snapshot) -> Plan {
    if let Some(reply) = redirect_to_https(facts, snapshot) {
        return Plan {
            route: None,
            action: Decided::Answer(reply),
        };
    }
    let matched = routing::find(
        &snapshot.routes,
        &RequestFacts {
            host: facts.host,
            req: facts.req,
        },
    );
    let Some((index, route)) = matched else {
        return Plan {
            route: None,
            action: Decided::Forward(snapshot.default.clone()),
        };
    };
    let answer = |reply| Plan {
        route: Some(index),
        action: Decided::Answer(reply),
    };
    if let Some(limiter) = &route.rate_limit {
        let key = limiter.limit().key.of(facts.req, facts.client_ip);
        if let Err(wait) = limiter.admit(&key) {
            return answer(
                Reply::text(
                    429,
                    "429 too many requests: the rate limit of this route is reached\n",
                )
                .with_header(http::header::RETRY_AFTER, wait.as_secs().into()),
            );
        }
    }
    match &route.action {
        Action::Upstream(name) => Plan {
            route: Some(index),
            action: Decided::Forward(snapshot.groups.get(name).cloned()),
        },
        Action::Respond {
            status,
            body,
            content_type,
        } => answer(Reply {
            body: body.clone(),
            ..Reply::new(*status).with_header(http::header::CONTENT_TYPE, content_type.clone())
        }),
        Action::Redirect { location, status } => {
            let vars = Vars {
                client_ip: facts.client_ip,
                host: facts.host,
                path_and_query: routing::path_and_query(facts.req),
                request_id: facts.request_id,
            };
            answer(redirect(*status, &vars.render(location)))
        }
    }
}

/// The `308` to the same URL over HTTPS, when `[tls] redirect_http` asks
/// for it and the request came in plain.
fn redirect_to_https(facts: &Facts<'_>, snapshot: &Snapshot) -> Option<Reply> {
    let https = snapshot.https_redirect.as_ref()?;
    if facts.tls {
        return None;
    }
    let mut host = routing::request_host(facts.req);
    if host.contains(':') {
        host = format!("[{host}]"); // an IPv6 address
    }
    let location = format!(
        "https://{host}{}{}",
        https.port,
        routing::path_and_query(facts.req)
    );
    Some(redirect(308, &location))
}

/// A redirect to `location`, with a line of text saying so. A location
/// that cannot be a header value (it is made of the request's own parts,
/// which could) answers 400.
fn redirect(status: u16, location: &str) -> Reply {
    match HeaderValue::from_str(location) {
        Ok(value) => Reply::text(status, format!("{status} redirect to {location}\n"))
            .with_header(http::header::LOCATION, value),
        Err(_) => Reply::text(
            400,
            "400 bad request: the redirect target is not a valid URL\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::extension::Registry;

    fn snapshot(text: &str) -> Snapshot {
        let config = Config::parse(std::path::Path::new("test.toml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        Snapshot::compile(config, None, &Registry::new()).expect("compiles")
    }

    fn request(path: &str, host: &str) -> RequestHeader {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        req.insert_header("host", host).unwrap();
        req
    }

    fn decide(snapshot: &Snapshot, req: &RequestHeader, tls: bool) -> Plan {
        let host = routing::request_host(req);
        plan(
            &Facts {
                req,
                host: &host,
                tls,
                client_ip: Some("192.0.2.7".parse().unwrap()),
                request_id: "rid-1",
            },
            snapshot,
        )
    }

    fn group(plan: &Plan) -> Option<&str> {
        match &plan.action {
            Decided::Forward(group) => group.as_ref().map(|g| &*g.name),
            Decided::Answer(reply) => panic!("expected a forward, got an answer {}", reply.status),
        }
    }

    fn reply(plan: &Plan) -> &Reply {
        match &plan.action {
            Decided::Answer(reply) => reply,
            Decided::Forward(_) => panic!("expected an answer, got a forward"),
        }
    }

    const ROUTES: &str = r#"
[upstream]
servers = ["127.0.0.1:1"]
[upstreams.api]
servers = ["127.0.0.1:2"]
[[route]]
name = "api"
host = "api.example.com"
upstream = "api"
[[route]]
path = "/old/"
redirect = { location = "https://{host}/new{path}?by={client_ip}", status = 301 }
[[route]]
path = "/down"
respond = { status = 503, body = "later", content_type = "text/html" }
[[route]]
path = "/limited"
upstream = "default"
rate_limit = { requests = 1, per = "60s", burst = 0 }
"#;

    #[test]
    fn a_route_forwards_to_its_group_and_no_route_to_the_default() {
        let snapshot = snapshot(ROUTES);
        let plan = decide(&snapshot, &request("/x", "API.example.com:8080"), false);
        assert_eq!((plan.route, group(&plan)), (Some(0), Some("api")));
        let plan = decide(&snapshot, &request("/x", "www.example.com"), false);
        assert_eq!((plan.route, group(&plan)), (None, Some("default")));
    }

    #[test]
    fn no_route_and_no_default_group_forwards_nowhere() {
        let snapshot = snapshot(
            "[upstreams.api]\nservers = [\"127.0.0.1:2\"]\n[[route]]\npath = \"/api/\"\nupstream = \"api\"\n",
        );
        let plan = decide(&snapshot, &request("/else", "a"), false);
        assert_eq!((plan.route, group(&plan)), (None, None));
    }

    #[test]
    fn respond_and_redirect_answer_with_their_values() {
        let snapshot = snapshot(ROUTES);
        let plan = decide(&snapshot, &request("/down", "a"), false);
        let down = reply(&plan);
        assert_eq!((plan.route, down.status), (Some(2), 503));
        assert_eq!(
            (
                &down.body[..],
                down.headers["content-type"].to_str().unwrap()
            ),
            (&b"later"[..], "text/html")
        );

        let plan = decide(&snapshot, &request("/old/page?q=1", "Shop.example"), false);
        let moved = reply(&plan);
        assert_eq!(moved.status, 301);
        assert_eq!(
            moved.headers["location"],
            "https://shop.example/new/old/page?q=1?by=192.0.2.7"
        );
    }

    #[test]
    fn a_rate_limit_answers_429_with_retry_after_once_used_up() {
        let snapshot = snapshot(ROUTES);
        let first = decide(&snapshot, &request("/limited", "a"), false);
        assert_eq!(group(&first), Some("default"));
        let second = decide(&snapshot, &request("/limited", "a"), false);
        let limited = reply(&second);
        assert_eq!((second.route, limited.status), (Some(3), 429));
        let wait: u64 = limited.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
    }

    #[test]
    fn plain_requests_are_sent_to_https_when_asked() {
        // Compiling reads no certificate (that is the certificate store's).
        let snapshot = snapshot(&format!(
            "[tls]\nlisten = \"0.0.0.0:8443\"\nredirect_http = true\ncertificate = \"c.pem\"\nprivate_key = \"k.pem\"\n{ROUTES}"
        ));
        let plan = decide(&snapshot, &request("/a?b=1", "Example.com:80"), false);
        let to_https = reply(&plan);
        assert_eq!(
            (
                to_https.status,
                to_https.headers["location"].to_str().unwrap()
            ),
            (308, "https://example.com:8443/a?b=1")
        );
        let plan = decide(&snapshot, &request("/a", "example.com"), true);
        assert_eq!(group(&plan), Some("default"), "over TLS: routed as usual");
    }
}
