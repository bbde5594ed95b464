//! The `storage` directory of `[tls.acme]`, shared by every replica that
//! mounts it: what is kept where, written so that a reader never sees half a
//! file, and the lock file that decides which replica orders.
//!
//! ```text
//! STORAGE/
//!   challenges/TOKEN        an HTTP-01 answer while an order is open
//!   CA/account.json         the account (its key) at that CA
//!   CA/DOMAIN.pem           the certificate chain, then its private key
//!   CA/lock                 held by the replica that is ordering
//! ```
//!
//! `CA` is the directory URL made a file name, so certificates of the
//! staging CA are never served once the file names the production one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::Acme;

/// A lock older than this was left by a replica that died while ordering.
pub const STALE_LOCK: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    /// The CA's own directory in `root`.
    ca: PathBuf,
}

impl Storage {
    pub fn new(acme: &Acme) -> Storage {
        let slug: String = acme
            .directory
            .0
            .trim_start_matches("https://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Storage {
            root: acme.storage.clone(),
            ca: acme.storage.join(slug),
        }
    }

    /// Where the certificate and key of `domain` are kept, one PEM file.
    pub fn certificate(&self, domain: &str) -> PathBuf {
        self.ca.join(format!("{domain}.pem"))
    }

    pub fn account(&self) -> PathBuf {
        self.ca.join("account.json")
    }

    /// Where the answer to an HTTP-01 challenge is; `None` for a token that
    /// is not base64url (RFC 8555, section 8.3), which no CA sends and
    /// which must not name another file.
    pub fn challenge(&self, token: &str) -> Option<PathBuf> {
        let valid = !token.is_empty()
            && token.len() <= 256
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| self.root.join("challenges").join(token))
    }

    /// Writes `path` whole or not at all (a temporary file renamed over
    /// it), readable by this user only: it may hold a private key.
    pub fn write(&self, path: &Path, contents: &[u8]) -> Result<(), String> {
        self.write_checked(path, contents, |_| Ok(()))
    }

    /// [`Storage::write`], once `check` accepts the written temporary file:
    /// a bad file never replaces a good one.
    pub fn write_checked(
        &self,
        path: &Path,
        contents: &[u8],
        check: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        let dir = path.parent().unwrap_or(&self.root);
        let temporary = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            std::process::id()
        ));
        let written = (|| {
            std::fs::create_dir_all(dir)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temporary)?;
            file.write_all(contents)?;
            file.sync_all()
        })();
        let result = written
            .map_err(|e| format!("{}: {e}", temporary.display()))
            .and_then(|()| check(&temporary))
            .and_then(|()| {
                std::fs::rename(&temporary, path).map_err(|e| format!("{}: {e}", path.display()))
            });
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }

    /// Takes the lock file, unless another replica holds it: `Ok(None)`.
    /// A lock older than [`STALE_LOCK`] is taken over.
    pub fn lock(&self) -> io::Result<Option<Lock>> {
        std::fs::create_dir_all(&self.ca)?;
        let path = self.ca.join("lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    // Who holds it, for a person looking at the volume.
                    let _ = writeln!(file, "pid {}", std::process::id());
                    return Ok(Some(Lock { path }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    match age {
                        Some(age) if age > STALE_LOCK => {
                            log::warn!(
                                "acme: taking over {} (left {}s ago by a replica that stopped while ordering)",
                                path.display(),
                                age.as_secs()
                            );
                            let _ = std::fs::remove_file(&path);
                        }
                        _ => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// The held lock file, removed when dropped.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    /// Marks the lock as fresh: an order of many names may outlast
    /// [`STALE_LOCK`] as a whole, never one name.
    pub fn refresh(&self) {
        let _ = std::fs::File::options()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_modified(SystemTime::now()));
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path) -> Storage {
        storage_of("https://ca.test:14000/dir", dir)
    }

    fn storage_of(directory: &str, dir: &Path) -> Storage {
        let text = format!(
            "directory = {directory:?}\ndomains = [\"a.example.com\"]\nstorage = {:?}\n",
            dir.display().to_string()
        );
        Storage::new(&toml::from_str::<Acme>(&text).expect("valid [tls.acme]"))
    }

    /// Makes `lock` look left behind by a replica that died.
    fn age_past_stale(lock: &Lock) {
        let old = SystemTime::now() - STALE_LOCK - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&lock.path)
            .and_then(|f| f.set_modified(old))
            .expect("the lock's time can be set");
    }

    #[test]
    fn one_replica_holds_the_lock_until_it_drops_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage = storage(dir.path());
        let first = storage.lock().expect("the lock file is writable");
        assert!(first.is_some(), "the first taker gets the lock");
        assert!(
            storage.lock().expect("readable").is_none(),
            "a second taker must not get a held lock"
        );
        drop(first);
        assert!(
            storage.lock().expect("writable").is_some(),
            "a dropped lock is free again"
        );
    }

    #[test]
    fn a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage = storage(dir.path());
        let held = storage.lock().expect("writable").expect("free");
        age_past_stale(&held);
        std::mem::forget(held);
        assert!(
            storage.lock().expect("writable").is_some(),
            "a lock older than STALE_LOCK must be taken over"
        );
    }

    #[test]
    fn a_refreshed_lock_is_not_stale() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage = storage(dir.path());
        let held = storage.lock().expect("writable").expect("free");
        age_past_stale(&held);
        held.refresh();
        assert!(
            storage.lock().expect("readable").is_none(),
            "a lock its holder refreshed must not be taken over"
        );
    }

    #[test]
    fn challenge_tokens_cannot_name_other_files() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let storage = storage(dir.path());
        assert!(storage.challenge("abc-DEF_123").is_some());
        for bad in ["", "../account.json", "a/b", "a.b", "%2e%2e"] {
            assert!(storage.challenge(bad).is_none(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn each_ca_has_its_own_files() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let staging = storage(dir.path());
        let other = storage_of("https://other.test/dir", dir.path());
        assert_ne!(
            staging.certificate("a.example.com"),
            other.certificate("a.example.com")
        );
        assert!(staging.certificate("a.example.com").starts_with(dir.path()));
    }
}
