//! Automatic HTTPS: certificates obtained and renewed from an ACME CA
//! (`[tls.acme]`), in the background, while the balancer serves.
//!
//! - `ca`: the account and one order, through `instant-acme`;
//! - `storage`: the shared directory (certificates, account, HTTP-01
//!   answers, the lock that decides which replica orders);
//! - here: a round of renewal ([`Renewal`]), its per-name state for `/status`
//!   and `/metrics` ([`AcmeStatus`]), the HTTP-01 answer the plain listener
//!   gives ([`http01_answer`]), and what `--check` says ([`check`]).
//!
//! The loop that runs the rounds with the configuration in force is
//! `runtime::certificates`'s. It only writes files: the certificate watch
//! reads them like any other certificate, so a new one reaches the next
//! handshake with no restart, and a replica that did not order picks it up
//! from the volume.

mod ca;
pub mod storage;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

pub use storage::Storage;

use crate::config::{Acme, Config};

/// Where the CA asks for HTTP-01 answers (RFC 8555, section 8.3).
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// The first retry after a failure; each next one waits twice as long ...
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// ... up to this.
const LAST_RETRY: Duration = Duration::from_secs(3600);
/// How often a replica that found the lock held looks at the volume again.
const LOCKED_POLL: Duration = Duration::from_secs(2);
/// The longest one attempt may take (a CA that accepts and never answers).
const ATTEMPT: Duration = Duration::from_secs(300);
/// The longest the loop sleeps (config reloads are seen by then).
const IDLE: Duration = Duration::from_secs(60);

/// The answer to an HTTP-01 challenge for `token`, when an order of any
/// replica sharing `storage` is waiting for it. Read from the volume (a
/// small file, a few requests per order): the replica the CA reaches need
/// not be the one that ordered.
pub fn http01_answer(storage: &Storage, token: &str) -> Option<String> {
    std::fs::read_to_string(storage.challenge(token)?).ok()
}

/// What one name's certificate is doing, for `/status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No certificate yet, no attempt finished yet.
    Pending,
    Valid,
    /// An order is open.
    Renewing,
    /// The last attempt failed; see `last_error`.
    Failing,
    /// Another replica holds the lock and is ordering.
    Waiting,
}

#[derive(Debug, Clone, Serialize)]
pub struct DomainStatus {
    pub state: State,
    /// The end of the certificate in storage (HTTP date).
    pub valid_until: Option<String>,
    pub last_error: Option<String>,
    /// Orders this process completed, and attempts that failed.
    pub orders: u64,
    pub failures: u64,
    /// When the next attempt is due after a failure (HTTP date).
    pub next_attempt: Option<String>,
}

impl Default for DomainStatus {
    fn default() -> Self {
        DomainStatus {
            state: State::Pending,
            valid_until: None,
            last_error: None,
            orders: 0,
            failures: 0,
            next_attempt: None,
        }
    }
}

/// The state of every name, kept by the loop and read by `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct AcmeStatus {
    domains: Mutex<BTreeMap<String, DomainStatus>>,
}

impl AcmeStatus {
    pub fn domains(&self) -> BTreeMap<String, DomainStatus> {
        self.domains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the names a reload took out of `[tls.acme]`.
    fn retain(&self, domains: &[String]) {
        let mut known = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|name, _| domains.contains(name));
    }

    fn update(&self, domain: &str, change: impl FnOnce(&mut DomainStatus)) {
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        change(domains.entry(domain.to_owned()).or_default());
    }
}

/// When a certificate in storage is due for renewal: `renew_before` ahead
/// of its end, or when a third of its lifetime is left.
fn renew_at(acme: &Acme, file: &Path) -> Option<(SystemTime, SystemTime)> {
    let chain = crate::tls::read_certificates(file).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref()).ok()?;
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (start, end) = (
        time(cert.validity().not_before),
        time(cert.validity().not_after),
    );
    let before = match acme.renew_before {
        Some(span) => span.0,
        None => end.duration_since(start).unwrap_or_default() / 3,
    };
    Some((end.checked_sub(before).unwrap_or(start), end))
}

/// A failure's retry: `Retry-After` when the CA said later, else doubling.
fn retry_delay(failures: u64, retry_after: Option<SystemTime>) -> Duration {
    let doubling = FIRST_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(12))
        .min(LAST_RETRY);
    let asked = retry_after
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    doubling.max(asked)
}

/// Obtains and renews the certificates of `[tls.acme]`, a round at a time.
pub struct Renewal {
    pub status: Arc<AcmeStatus>,
}

/// What the loop remembers between rounds.
#[derive(Default)]
pub struct Round {
    /// The CA account, for the directory it was made at.
    ca: Option<(String, ca::Ca)>,
    /// Names whose last attempt failed: not tried again before `at`.
    retry: BTreeMap<String, Retry>,
}

struct Retry {
    at: Instant,
    /// Failed attempts in a row, for the doubling.
    attempts: u64,
}

impl Renewal {
    /// Orders what is due; returns how long to sleep before the next look.
    pub async fn round(&self, config: &Config, round: &mut Round) -> Duration {
        let Some(acme) = config.tls.as_ref().and_then(|t| t.acme.as_ref()) else {
            return IDLE;
        };
        let storage = Storage::new(acme);
        let (due, mut wait) = self.due(acme, &storage, config, round);
        if due.is_empty() {
            return wait;
        }
        let lock = match storage.lock() {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                for domain in &due {
                    self.status.update(domain, |s| s.state = State::Waiting);
                }
                return LOCKED_POLL;
            }
            Err(e) => {
                // Storage not writable (a volume owned by another user):
                // a failure of every name due, like the CA's.
                let reason = format!(
                    "storage {}: cannot take the lock: {e}",
                    acme.storage.display()
                );
                return due
                    .iter()
                    .map(|domain| {
                        let failure = ca::Failure::new(reason.clone());
                        self.fail(domain, failure, round)
                    })
                    .fold(wait, Duration::min);
            }
        };
        for domain in due {
            lock.refresh();
            // Another replica may have renewed it while this one waited for the lock.
            if renew_at(acme, &storage.certificate(&domain))
                .is_some_and(|(at, _)| at > SystemTime::now())
            {
                continue;
            }
            wait = wait.min(self.order(acme, &storage, &domain, round).await);
        }
        drop(lock);
        wait
    }

    /// The names whose certificate is missing or due (and not waiting for
    /// a retry), and the time until the next one falls due. The volume is
    /// read first: a certificate another replica renewed ends a failure here.
    fn due(
        &self,
        acme: &Acme,
        storage: &Storage,
        config: &Config,
        round: &mut Round,
    ) -> (Vec<String>, Duration) {
        let (now, instant) = (SystemTime::now(), Instant::now());
        let mut wait = IDLE;
        let mut due = Vec::new();
        let domains = config.acme_domains();
        self.status.retain(&domains);
        for domain in domains {
            let stored = renew_at(acme, &storage.certificate(&domain));
            if let Some((_, end)) = stored {
                self.status.update(&domain, |s| {
                    s.valid_until = Some(httpdate::fmt_http_date(end));
                });
            }
            match stored {
                Some((at, _)) if at > now => {
                    wait = wait.min(at.duration_since(now).unwrap_or_default());
                    round.retry.remove(&domain);
                    self.status.update(&domain, |s| {
                        s.state = State::Valid;
                        s.next_attempt = None;
                    });
                }
                _ => match round.retry.get(&domain).filter(|r| r.at > instant) {
                    Some(retry) => wait = wait.min(retry.at - instant),
                    None => due.push(domain),
                },
            }
        }
        (due, wait)
    }

    /// One attempt at `domain`: the certificate written to storage, or the
    /// failure logged once, counted, and given its retry time.
    async fn order(
        &self,
        acme: &Acme,
        storage: &Storage,
        domain: &str,
        round: &mut Round,
    ) -> Duration {
        self.status.update(domain, |s| s.state = State::Renewing);
        log::info!(
            "acme: ordering a certificate for {domain} from {}",
            acme.directory.0
        );
        let attempt = tokio::time::timeout(ATTEMPT, self.obtain(acme, storage, domain, round));
        let result = attempt.await.unwrap_or_else(|_| {
            Err(ca::Failure::new(format!(
                "the CA did not finish within {}s",
                ATTEMPT.as_secs()
            )))
        });
        match result {
            Ok(end) => {
                round.retry.remove(domain);
                log::info!(
                    "acme: certificate obtained for {domain} (valid until {})",
                    httpdate::fmt_http_date(end)
                );
                self.status.update(domain, |s| {
                    s.state = State::Valid;
                    s.valid_until = Some(httpdate::fmt_http_date(end));
                    s.last_error = None;
                    s.next_attempt = None;
                    s.orders += 1;
                });
                Duration::ZERO
            }
            Err(failure) => self.fail(domain, failure, round),
        }
    }

    /// Logs a failed attempt once, counts it, and sets its retry: doubling
    /// with each failure in a row, or the CA's `Retry-After` when later.
    fn fail(&self, domain: &str, failure: ca::Failure, round: &mut Round) -> Duration {
        let attempts = round.retry.get(domain).map_or(0, |r| r.attempts) + 1;
        let delay = retry_delay(attempts, failure.retry_after);
        log::warn!(
            "acme: {domain}: {} (attempt {attempts}; next in {}s)",
            failure.reason,
            delay.as_secs()
        );
        let at = Instant::now() + delay;
        round
            .retry
            .insert(domain.to_owned(), Retry { at, attempts });
        self.status.update(domain, |s| {
            s.failures += 1;
            s.state = State::Failing;
            s.last_error = Some(failure.reason);
            s.next_attempt = Some(httpdate::fmt_http_date(SystemTime::now() + delay));
        });
        delay
    }

    /// Orders and stores the certificate of `domain`; returns its end.
    async fn obtain(
        &self,
        acme: &Acme,
        storage: &Storage,
        domain: &str,
        round: &mut Round,
    ) -> Result<SystemTime, ca::Failure> {
        if round.ca.as_ref().map(|(d, _)| d) != Some(&acme.directory.0) {
            round.ca = Some((
                acme.directory.0.clone(),
                ca::Ca::connect(acme, storage).await?,
            ));
        }
        let Some((_, account)) = &round.ca else {
            return Err(ca::Failure::new("no account".to_owned()));
        };
        let pem = account.obtain(domain, storage).await?;
        let file = storage.certificate(domain);
        storage
            .write_checked(&file, pem.as_bytes(), |written| {
                crate::tls::read_pair(written, written).map(|_| ())
            })
            .map_err(ca::Failure::new)?;
        let (at, end) = renew_at(acme, &file).ok_or_else(|| {
            ca::Failure::new(format!(
                "{}: the CA's certificate does not parse",
                file.display()
            ))
        })?;
        if at <= SystemTime::now() {
            return Err(ca::Failure::new(format!(
                "renew_before is not shorter than the certificate's lifetime (it ends {}): it would be renewed at once, again and again",
                httpdate::fmt_http_date(end)
            )));
        }
        Ok(end)
    }
}

/// What `--check` says about `[tls.acme]`, without contacting the CA:
/// errors (storage not writable, a `ca_file` or EAB key that cannot be
/// read, a name no route would serve) and warnings.
pub fn check(config: &Config) -> (Vec<String>, Vec<String>) {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let Some(acme) = config.tls.as_ref().and_then(|t| t.acme.as_ref()) else {
        return (errors, warnings);
    };
    if let Err(e) = writable(&acme.storage) {
        errors.push(format!("tls.acme.storage {}: {e}", acme.storage.display()));
    }
    if let Some(file) = &acme.ca_file {
        if let Err(e) = crate::tls::read_certificates(file) {
            errors.push(format!("tls.acme.ca_file {e}"));
        }
    }
    if let Some(Err(e)) = acme.eab_hmac_key.as_ref().map(|k| k.read()) {
        errors.push(format!("tls.acme.eab_hmac_key: {e}"));
    }
    for domain in config.acme_domains() {
        let routed = config.upstream.is_some()
            || config.routes.iter().any(|r| {
                r.get_ref()
                    .host
                    .as_ref()
                    .is_none_or(|host| host.matches(&domain))
            });
        if !routed {
            errors.push(format!(
                "tls.acme.domains: {domain}: no route serves this host and there is no [upstream]"
            ));
        }
    }
    if config.listen.port() != 80 {
        warnings.push(format!(
            "tls.acme: the CA checks HTTP-01 on port 80, and listen is {}: port 80 must reach it",
            config.listen
        ));
    }
    (errors, warnings)
}

/// Whether files can be made in `dir`, or in the directory that would hold it.
fn writable(dir: &Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|d| d.exists())
        .ok_or("no part of the path exists")?;
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    let probe = existing.join(format!(".balancer-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| format!("cannot write in {}: {e}", existing.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_wait_twice_as_long_each_time_or_as_long_as_the_ca_asks() {
        assert_eq!(retry_delay(1, None), FIRST_RETRY);
        assert_eq!(retry_delay(2, None), FIRST_RETRY * 2);
        assert_eq!(retry_delay(3, None), FIRST_RETRY * 4);
        assert_eq!(retry_delay(40, None), LAST_RETRY, "capped");
        let asked = retry_delay(1, Some(SystemTime::now() + Duration::from_secs(600)));
        assert!(
            asked > Duration::from_secs(590) && asked <= Duration::from_secs(600),
            "Retry-After: 600 is honoured: {asked:?}"
        );
        let past = retry_delay(2, Some(SystemTime::now() - Duration::from_secs(5)));
        assert_eq!(
            past,
            FIRST_RETRY * 2,
            "a Retry-After in the past asks nothing"
        );
    }
}
