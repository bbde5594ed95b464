//! What keeps the certificates in force current while the balancer serves:
//! the watch that has the [`CertStore`] re-read its files when they (or the
//! `[tls]` section naming them) change, and the loop that runs the rounds of
//! ACME renewal ([`Renewal`]) with the configuration in force. Reading,
//! checking and choosing certificates, and talking to the CA, are `tls`'s.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::runtime::Live;
use crate::tls::acme::{Renewal, Round};
use crate::tls::CertStore;

/// How often the files are looked at for a change.
const POLL: Duration = Duration::from_secs(1);

/// Looks at the certificate files every second and re-reads them when
/// they, or the `[tls]` section naming them, changed.
pub struct CertWatch {
    pub store: Arc<CertStore>,
    pub live: Arc<Live>,
}

#[async_trait]
impl BackgroundService for CertWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
            let snapshot = self.live.load_full();
            match self.store.refresh(&snapshot.config) {
                Ok(true) => {
                    for c in self.store.certificates() {
                        log::info!(
                            "certificate reloaded: {} for {} (valid until {})",
                            c.file.display(),
                            c.hosts.join(", "),
                            httpdate::fmt_http_date(c.not_after)
                        );
                    }
                }
                Ok(false) => {}
                Err(e) => log::error!(
                    "certificate reload refused, keeping the certificates in force: {e}"
                ),
            }
        }
    }
}

/// Obtains and renews the certificates of `[tls.acme]`, a round at a time,
/// each with the configuration in force when it begins.
pub struct RenewalLoop {
    pub live: Arc<Live>,
    pub renewal: Renewal,
}

#[async_trait]
impl BackgroundService for RenewalLoop {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut round = Round::default();
        loop {
            let config = Arc::clone(&self.live.load().config);
            let wait = self.renewal.round(&config, &mut round).await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
