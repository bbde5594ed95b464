//! Talking to the ACME CA, through `instant-acme`: the account (made once,
//! then read from storage), and one order for one name answered by HTTP-01.
//! What `instant-acme` leaves to its user is here: where the challenge's
//! answer goes, and the `Retry-After` of a refusal, which it does not pass
//! on with the problem (so its HTTP client is built here and notes it).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use super::storage::Storage;
use crate::config::Acme;

/// How long an order may take from "ready" to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an attempt failed, and when the CA said to come back.
#[derive(Debug)]
pub struct Failure {
    pub reason: String,
    pub retry_after: Option<SystemTime>,
}

impl Failure {
    pub fn new(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// What the CA's last answer was when it was an error (its status and
/// `Retry-After`), shared with the HTTP client; `None` after a success.
type RetryAfter = Arc<Mutex<Option<Refusal>>>;

#[derive(Debug, Clone, Copy)]
struct Refusal {
    status: http::StatusCode,
    retry_after: Option<SystemTime>,
}

/// The account at the CA, and what its HTTP client noted.
pub struct Ca {
    account: Account,
    retry_after: RetryAfter,
}

/// Makes an error of `instant-acme`'s into a [`Failure`] with the CA's
/// problem detail and the `Retry-After` that came with it.
fn failure(what: &str, e: instant_acme::Error, refusal: &RetryAfter) -> Failure {
    let refusal = refusal.lock().unwrap_or_else(|e| e.into_inner()).take();
    let reason = match (&e, refusal) {
        (instant_acme::Error::Api(problem), _) => format!("{what}: the CA answered {problem}"),
        // An answer that is no problem document (a proxy's 503 page, say):
        // its status says more than the parse error.
        (other, Some(refusal)) => format!("{what}: the CA answered {}: {other}", refusal.status),
        (other, None) => format!("{what}: {other}"),
    };
    Failure {
        reason,
        retry_after: refusal.and_then(|r| r.retry_after),
    }
}

impl Ca {
    /// The account in `storage`, or a new one (saved there) when there is none.
    pub async fn connect(acme: &Acme, storage: &Storage) -> Result<Ca, Failure> {
        let retry_after = RetryAfter::default();
        let client = NotingClient::new(acme, Arc::clone(&retry_after))?;
        let builder = Account::builder_with_http(Box::new(client));
        let saved = storage.account();
        if let Ok(json) = std::fs::read(&saved) {
            let credentials: AccountCredentials = serde_json::from_slice(&json).map_err(|e| {
                Failure::new(format!("{}: not an ACME account: {e}", saved.display()))
            })?;
            let account = builder
                .from_credentials(credentials)
                .await
                .map_err(|e| failure("reading the directory", e, &retry_after))?;
            return Ok(Ca {
                account,
                retry_after,
            });
        }
        let contact = acme.email.as_ref().map(|e| format!("mailto:{e}"));
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = match (&acme.eab_kid, &acme.eab_hmac_key) {
            (Some(kid), Some(key)) => {
                let key = key
                    .read()
                    .map_err(|e| Failure::new(format!("eab_hmac_key: {e}")))?;
                let key = base64url(&key).ok_or_else(|| {
                    Failure::new("eab_hmac_key is not base64url (as the CA gives it)")
                })?;
                Some(ExternalAccountKey::new(kid.clone(), &key))
            }
            _ => None,
        };
        let (account, credentials) = builder
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                acme.directory.0.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| failure("creating the account", e, &retry_after))?;
        let json = serde_json::to_vec(&credentials)
            .map_err(|e| Failure::new(format!("the account: {e}")))?;
        storage.write(&saved, &json).map_err(Failure::new)?;
        log::info!("acme: account created at {}", acme.directory.0);
        Ok(Ca {
            account,
            retry_after,
        })
    }

    /// Orders a certificate for `domain`, proving it by HTTP-01 (the answer
    /// is left in `storage` for the plain listener of any replica), and
    /// returns the chain and its new private key as one PEM text.
    pub async fn obtain(&self, domain: &str, storage: &Storage) -> Result<String, Failure> {
        let fail = |what: &str| {
            let what = what.to_owned();
            move |e| failure(&what, e, &self.retry_after)
        };
        let identifiers = [Identifier::Dns(domain.to_owned())];
        let mut order = self
            .account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(fail("placing the order"))?;
        let mut answered = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(fail("reading the authorization"))?;
            if authorization.status == AuthorizationStatus::Valid {
                continue;
            }
            let mut challenge = authorization
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| Failure::new("the CA offers no http-01 challenge"))?;
            let file = storage.challenge(&challenge.token).ok_or_else(|| {
                Failure::new("the CA sent a challenge token that is not base64url")
            })?;
            storage
                .write(&file, challenge.key_authorization().as_str().as_bytes())
                .map_err(Failure::new)?;
            answered.push(file);
            challenge
                .set_ready()
                .await
                .map_err(fail("answering the challenge"))?;
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&policy).await;
        let result = match status {
            Ok(OrderStatus::Ready) => {
                let key = order.finalize().await.map_err(fail("finalizing the order"));
                match key {
                    Ok(key) => order
                        .poll_certificate(&policy)
                        .await
                        .map(|chain| format!("{}\n{key}", chain.trim_end()))
                        .map_err(fail("downloading the certificate")),
                    Err(e) => Err(e),
                }
            }
            Ok(status) => Err(Failure::new(format!(
                "the order is {status:?}: {}",
                why_invalid(&mut order).await
            ))),
            Err(e) => Err(fail("waiting for validation")(e)),
        };
        for file in answered {
            let _ = std::fs::remove_file(file);
        }
        result
    }
}

/// The CA's problem detail for a failed order: its own, or its challenges'.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    if let Some(problem) = &order.state().error {
        return problem.to_string();
    }
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        reasons.extend(
            authorization
                .challenges
                .iter()
                .filter_map(|c| c.error.as_ref().map(ToString::to_string)),
        );
    }
    if reasons.is_empty() {
        "the CA gave no reason".to_owned()
    } else {
        reasons.join("; ")
    }
}

fn base64url(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// `instant-acme`'s HTTPS client (hyper-rustls), which also notes the
/// `Retry-After` of each refusal.
struct NotingClient {
    inner: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: RetryAfter,
}

impl NotingClient {
    /// Trusts `ca_file` when given, else the public CAs (Mozilla's list, in
    /// the binary: the runtime image has no CA bundle of its own).
    fn new(acme: &Acme, retry_after: RetryAfter) -> Result<NotingClient, Failure> {
        pingora::tls::install_default_crypto_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &acme.ca_file {
            Some(file) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::tls::read_certificates(file)
                    .map_err(|e| Failure::new(format!("ca_file {e}")))?
                {
                    roots
                        .add(cert)
                        .map_err(|e| Failure::new(format!("ca_file {}: {e}", file.display())))?;
                }
                builder.with_tls_config(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                )
            }
            None => builder
                .try_with_platform_verifier()
                .map_err(|e| Failure::new(format!("the system's CAs cannot be read: {e}")))?,
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
        Ok(NotingClient {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after,
        })
    }
}

impl HttpClient for NotingClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.inner.request(req);
        let retry_after = Arc::clone(&self.retry_after);
        Box::pin(async move {
            let response = response
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            let status = response.status();
            let refusal = (status.is_client_error() || status.is_server_error()).then(|| Refusal {
                status,
                retry_after: response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            });
            *retry_after.lock().unwrap_or_else(|e| e.into_inner()) = refusal;
            Ok(BytesResponse::from(response))
        })
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(seconds) => Some(SystemTime::now() + Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::now();
        let soon = parse_retry_after(" 120 ").expect("seconds");
        assert!(soon >= now + Duration::from_secs(119));
        let date = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT").expect("a date");
        assert_eq!(
            httpdate::fmt_http_date(date),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
