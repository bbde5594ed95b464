//! Turns the configured `upstream.servers` entries into backend addresses.
//!
//! A DNS name stands for every address it resolves to, so the replicas that
//! `docker compose --scale` adds or removes are followed. Lookups are
//! non-blocking and bounded in time; when a name fails to resolve, its last
//! good addresses are kept. Health and selection are not this module's concern.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{ServerAddr, ServerEntry};

/// How long one name may take to resolve before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What an address was found from: its `servers` entry and that entry's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub server: Arc<str>,
    pub weight: u32,
}

/// Resolves server entries and remembers the last good answer for each name.
#[derive(Default)]
pub struct Resolver {
    last_good: Mutex<HashMap<ServerAddr, Vec<SocketAddr>>>,
}

impl Resolver {
    /// All addresses of all `servers`, each mapped to the entry it came from.
    /// An address named by two entries is kept once, under the first.
    /// Names no longer among `servers` are forgotten.
    pub async fn resolve<'a>(
        &self,
        servers: impl Iterator<Item = &'a ServerEntry>,
    ) -> BTreeMap<SocketAddr, Found> {
        let servers: Vec<&ServerEntry> = servers.collect();
        self.last_good
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s, _| servers.iter().any(|e| e.addr == *s));
        let mut found = BTreeMap::new();
        for entry in servers {
            let origin = Found {
                server: entry.addr.to_string().into(),
                weight: entry.weight.get(),
            };
            for addr in self.addresses(&entry.addr).await {
                found.entry(addr).or_insert_with(|| origin.clone());
            }
        }
        found
    }

    async fn addresses(&self, server: &ServerAddr) -> Vec<SocketAddr> {
        if let Some(addr) = server.literal() {
            return vec![addr];
        }
        let lookup = tokio::net::lookup_host((server.host(), server.port()));
        let outcome = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => {
                let mut addrs: Vec<SocketAddr> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    Err("no addresses".to_owned())
                } else {
                    Ok(addrs)
                }
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        };
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(addrs) => {
                last_good.insert(server.clone(), addrs.clone());
                addrs
            }
            Err(why) => {
                let kept = last_good.get(server).cloned().unwrap_or_default();
                if kept.is_empty() {
                    log::warn!("cannot resolve upstream {server}: {why}; no address yet");
                } else {
                    log::warn!(
                        "cannot resolve upstream {server}: {why}; keeping its last good addresses {kept:?}"
                    );
                }
                kept
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_names_and_failures() {
        let resolver = Resolver::default();
        let entry = |text: &str| ServerEntry {
            addr: ServerAddr::parse(text).unwrap(),
            weight: std::num::NonZeroU32::MIN,
        };
        let servers = [entry("127.0.0.1:8001"), entry("localhost:8002")];
        let found = resolver.resolve(servers.iter()).await;
        assert_eq!(
            found
                .get(&"127.0.0.1:8001".parse().unwrap())
                .map(|f| &*f.server),
            Some("127.0.0.1:8001")
        );
        assert!(
            found
                .keys()
                .any(|a| a.port() == 8002 && a.ip().is_loopback()),
            "localhost resolves to a loopback address: {found:?}"
        );
        // A name that cannot resolve contributes nothing the first time...
        let missing = [entry("no-such-host.invalid:80")];
        assert!(resolver.resolve(missing.iter()).await.is_empty());
        // ...and keeps its last good addresses after it once resolved.
        let remembered: SocketAddr = "127.0.0.9:80".parse().unwrap();
        resolver
            .last_good
            .lock()
            .unwrap()
            .insert(missing[0].addr.clone(), vec![remembered]);
        let kept = resolver.resolve(missing.iter()).await;
        assert_eq!(kept.keys().copied().collect::<Vec<_>>(), [remembered]);
        resolver.resolve(std::iter::empty()).await;
        assert!(
            resolver.resolve(missing.iter()).await.is_empty(),
            "forgotten once unconfigured"
        );
    }
}
