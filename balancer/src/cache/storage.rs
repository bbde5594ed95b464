//! Where cached responses live: pingora-cache's `Storage` over a moka cache.
//!
//! Pingora ships only `MemCache`, which is documented "for testing only" and
//! never evicts. This storage is bounded by weight (bytes of key, metadata and
//! body), evicts the least-recently-used entries beyond it, is safe under
//! concurrency, and counts what it stores and evicts. It does not decide what
//! is cacheable: that is the rules' job.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};

use super::key;

/// One stored response.
struct Entry {
    /// The primary key (host, path and query) it answers: what an
    /// invalidation names, and, through [`key::path_of`], a purge.
    primary: Box<[u8]>,
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
    /// The metadata read once, for [`MemoryStorage::fresh_hit`].
    ready: Option<Ready>,
}

/// What a fresh hit needs, decoded once when the entry is written.
struct Ready {
    /// The stored header as a hit sends it, but for `Age`: framed by
    /// `Content-Length`, with `Accept-Ranges` and `X-Cache-Status: HIT`.
    header: ResponseHeader,
    fresh_until: SystemTime,
    /// Age is counted from here (the last revalidation, or the creation).
    epoch: SystemTime,
    /// A `Vary` variant: only the full lookup can tell which one a request wants.
    varies: bool,
}

impl Ready {
    fn decode(meta: &(Vec<u8>, Vec<u8>), body_len: usize) -> Option<Ready> {
        let meta = CacheMeta::deserialize(&meta.0, &meta.1).ok()?;
        let mut header = with_room(meta.response_header(), HIT_FIELDS).ok()?;
        header.set_version(http::Version::HTTP_11);
        header.remove_header(&http::header::TRANSFER_ENCODING);
        header
            .insert_header(http::header::CONTENT_LENGTH, body_len)
            .ok()?;
        header
            .insert_header(http::header::ACCEPT_RANGES, "bytes")
            .ok()?;
        header
            .insert_header(super::X_CACHE_STATUS.clone(), "HIT")
            .ok()?;
        Some(Ready {
            header,
            fresh_until: meta.fresh_until(),
            epoch: meta.epoch(),
            varies: meta.variance().is_some(),
        })
    }
}

/// Room for the fields a hit adds to the stored header (`Age`,
/// `X-Request-Id`, `Cache-Control` and `Expires` of `client_max_age`, a
/// route's own), and for those `decode` adds.
const HIT_FIELDS: usize = 12;

/// A copy of `stored`, field names' case kept, whose maps have room for
/// `spare` more fields. Each hit sends a clone of it, which keeps the room:
/// adding a hit's fields then grows no map.
fn with_room(stored: &ResponseHeader, spare: usize) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(stored.status, Some(stored.headers.len() + spare))?;
    if stored.has_case() {
        for (name, value) in stored.case_header_iter() {
            header.append_header(name.clone(), value.clone())?;
        }
    } else {
        for (name, value) in &stored.headers {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    if let Some(reason) = stored.get_reason_phrase() {
        header.set_reason_phrase(Some(reason))?;
    }
    Ok(header)
}

/// A fresh stored response, ready to be sent as it is.
pub struct FreshHit {
    pub header: ResponseHeader,
    pub age: Duration,
    pub body: Bytes,
}

impl Entry {
    /// An entry whose fresh-hit view is decoded from `meta` here, once.
    fn new(primary: Box<[u8]>, meta: (Vec<u8>, Vec<u8>), body: Bytes) -> Entry {
        Entry {
            primary,
            ready: Ready::decode(&meta, body.len()),
            meta,
            body,
        }
    }

    /// What the entry holds in memory: its key, the stored metadata and
    /// body, and the header decoded for the fast path, with their overhead.
    fn weight(&self) -> u32 {
        let decoded = self.ready.as_ref().map_or(0, |ready| {
            ready
                .header
                .headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + HEADER_OVERHEAD)
                .sum::<usize>()
                + std::mem::size_of::<Ready>()
        });
        let bytes = std::mem::size_of::<Entry>()
            + std::mem::size_of::<HashBinary>()
            + self.primary.len()
            + self.meta.0.len()
            + self.meta.1.len()
            + self.body.len()
            + decoded;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// What a decoded header field costs beyond its name and value: the map's
/// slot, the value's allocation, and the case-preserving copy of its name.
const HEADER_OVERHEAD: usize = 64;

/// Counters kept by the storage itself.
#[derive(Default, Debug)]
pub struct StorageStats {
    pub evictions: AtomicU64,
}

/// A bounded in-memory response store, keyed by the binary hash of the
/// cache key and its variant (Pingora's `combined_bin`).
pub struct MemoryStorage {
    entries: moka::sync::Cache<HashBinary, Arc<Entry>>,
    max_object_size: usize,
    stats: Arc<StorageStats>,
}

impl MemoryStorage {
    /// A store of at most `max_size` bytes in which no object exceeds `max_object_size`.
    pub fn new(max_size: u64, max_object_size: usize) -> MemoryStorage {
        let stats = Arc::new(StorageStats::default());
        let counted = Arc::clone(&stats);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|_key: &HashBinary, entry: &Arc<Entry>| entry.weight())
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |_key, _entry, cause| {
                if cause == RemovalCause::Size {
                    counted.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryStorage {
            entries,
            max_object_size,
            stats,
        }
    }

    /// Entries evicted to stay within the size bound so far.
    pub fn evictions(&self) -> u64 {
        self.entries.run_pending_tasks(); // evictions are noticed by housekeeping
        self.stats.evictions.load(Ordering::Relaxed)
    }

    /// Bytes held now (keys, metadata and bodies).
    pub fn stored_bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Removes every stored response for `path` (every host, query and
    /// variant); returns how many there were.
    pub fn purge_path(&self, path: &str) -> usize {
        self.remove_where(|primary| key::path_of(primary) == path)
    }

    /// Removes every stored response for the request `key` names (host,
    /// path and query), all its variants included; returns how many there were.
    pub fn invalidate(&self, key: &CacheKey) -> usize {
        let primary = key.primary_key();
        self.remove_where(|stored| stored == primary)
    }

    /// Removes every entry whose primary key `doomed` picks; returns how many.
    fn remove_where(&self, doomed: impl Fn(&[u8]) -> bool) -> usize {
        let keys: Vec<Arc<HashBinary>> = self
            .entries
            .iter()
            .filter(|(_, entry)| doomed(&entry.primary))
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            self.entries.invalidate(&**key);
        }
        self.entries.run_pending_tasks();
        keys.len()
    }

    /// The stored response for the key hashed `key` (its `combined_bin`)
    /// when it is fresh and has no variants:
    /// a hit that needs neither the cache lock nor revalidation, served
    /// without decoding its metadata again.
    pub fn fresh_hit(&self, key: &HashBinary) -> Option<FreshHit> {
        let entry = self.entries.get(key)?;
        let ready = entry.ready.as_ref()?;
        let now = SystemTime::now();
        if ready.varies || now >= ready.fresh_until {
            return None;
        }
        Some(FreshHit {
            header: ready.header.clone(),
            age: now.duration_since(ready.epoch).unwrap_or_default(),
            body: entry.body.clone(),
        })
    }

    /// Stores `entry` and evicts at once what no longer fits, so that
    /// `max_size` holds when this returns, not at the next housekeeping.
    fn store(&self, key: HashBinary, entry: Entry) {
        self.entries.insert(key, Arc::new(entry));
        self.entries.run_pending_tasks();
    }

    fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.entries.get(&key.combined_bin())
    }
}

fn storage_error(what: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, what)
}

#[async_trait]
impl Storage for MemoryStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(entry) = self.get(key) else {
            return Ok(None);
        };
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1)?;
        let end = entry.body.len();
        Ok(Some((
            meta,
            Box::new(Hit {
                body: entry.body.clone(),
                start: 0,
                end,
                done: false,
            }),
        )))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(Miss {
            storage: self,
            key: key.combined_bin(),
            primary: key.primary_key().into(),
            meta: meta.serialize()?,
            body: Vec::new(),
            oversize: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key().combined_bin();
        Ok(match self.entries.remove(&key) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let Some(old) = self.get(key) else {
            return Ok(false);
        };
        let updated = Entry::new(old.primary.clone(), meta.serialize()?, old.body.clone());
        self.store(key.combined_bin(), updated);
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Reads one stored body, whole or a byte range of it.
struct Hit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.body.len() {
            return Err(storage_error("seek start beyond the cached body"));
        }
        self.start = start;
        self.end = end.map_or(self.body.len(), |e| e.min(self.body.len()));
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Collects a response body from the origin and stores it when it is complete.
struct Miss {
    storage: &'static MemoryStorage,
    key: HashBinary,
    primary: Box<[u8]>,
    meta: (Vec<u8>, Vec<u8>),
    body: Vec<u8>,
    oversize: bool,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.body.len() + data.len() > self.storage.max_object_size {
            // Pingora's own size check stops admission first; this is the backstop.
            self.oversize = true;
            self.body = Vec::new();
        }
        if !self.oversize {
            self.body.extend_from_slice(&data);
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        if self.oversize {
            return Err(storage_error("response larger than cache.max_object_size"));
        }
        let size = self.body.len();
        let entry = Entry::new(self.primary, self.meta, Bytes::from(self.body));
        self.storage.store(self.key, entry);
        Ok(MissFinishType::Created(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::trace::Span;

    #[test]
    fn the_header_with_room_is_the_stored_one_field_for_field() {
        let mut stored = ResponseHeader::build(203, None).unwrap();
        stored.set_reason_phrase(Some("Partly Cached")).unwrap();
        stored.append_header("Content-Type", "text/plain").unwrap();
        stored.append_header("x-lower-case", "1").unwrap();
        stored.append_header("Set-Cookie", "a=1").unwrap();
        stored.append_header("SET-COOKIE", "b=2").unwrap();
        let wire = |h: &ResponseHeader| {
            let mut buf = bytes::BytesMut::new();
            h.header_to_h1_wire(&mut buf);
            buf
        };
        let copy = with_room(&stored, HIT_FIELDS).unwrap();
        assert_eq!(wire(&copy), wire(&stored), "names' case, order and values");
        assert_eq!(copy.status, stored.status);
        assert_eq!(copy.get_reason_phrase(), Some("Partly Cached"));
        let plain = ResponseHeader::from(http::Response::new(()).into_parts().0);
        assert!(with_room(&plain, 1).unwrap().headers.is_empty());
    }

    fn leak(max_size: u64, max_object: usize) -> &'static MemoryStorage {
        Box::leak(Box::new(MemoryStorage::new(max_size, max_object)))
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(30), now, 0, 0, header)
    }

    async fn put(
        storage: &'static MemoryStorage,
        key: &CacheKey,
        body: &[u8],
    ) -> Result<MissFinishType> {
        let mut miss = storage
            .get_miss_handler(key, &meta(), &Span::inactive().handle())
            .await?;
        miss.write_body(Bytes::copy_from_slice(body), true).await?;
        miss.finish().await
    }

    async fn body_of(storage: &'static MemoryStorage, key: &CacheKey) -> Option<Bytes> {
        let (_, mut hit) = storage
            .lookup(key, &Span::inactive().handle())
            .await
            .unwrap()?;
        hit.read_body().await.unwrap()
    }

    #[tokio::test]
    async fn stores_reads_and_seeks() {
        let storage = leak(1 << 20, 1 << 16);
        let k = key::cache_key("example.test", "/cache-me?x=1");
        assert!(body_of(storage, &k).await.is_none());
        put(storage, &k, b"hello world").await.unwrap();
        assert_eq!(body_of(storage, &k).await.unwrap(), "hello world");
        let (_, mut hit) = storage
            .lookup(&k, &Span::inactive().handle())
            .await
            .unwrap()
            .unwrap();
        hit.seek(6, Some(11)).unwrap();
        assert_eq!(hit.read_body().await.unwrap().unwrap(), "world");
        assert!(hit.read_body().await.unwrap().is_none());
        assert!(storage.stored_bytes() >= 11);
    }

    #[tokio::test]
    async fn objects_over_the_size_limit_are_not_stored() {
        let storage = leak(1 << 20, 8);
        let k = key::cache_key("h", "/big");
        assert!(put(storage, &k, b"more than eight bytes").await.is_err());
        assert!(body_of(storage, &k).await.is_none());
    }

    #[tokio::test]
    async fn the_bound_evicts_and_counts() {
        let storage = leak(8 << 10, 1 << 20);
        for i in 0..40 {
            put(
                storage,
                &key::cache_key("h", &format!("/item/{i}")),
                &[b'x'; 1000],
            )
            .await
            .unwrap();
        }
        assert!(
            storage.stored_bytes() <= 8 << 10,
            "{} bytes held",
            storage.stored_bytes()
        );
        assert!(storage.evictions() >= 30);
        assert!(
            body_of(storage, &key::cache_key("h", "/item/39"))
                .await
                .is_some(),
            "the newest stays"
        );
        assert!(
            body_of(storage, &key::cache_key("h", "/item/0"))
                .await
                .is_none(),
            "the oldest went"
        );
    }

    #[tokio::test]
    async fn the_bound_holds_when_each_insert_returns() {
        let storage = leak(8 << 10, 1 << 20);
        for i in 0..12 {
            let k = key::cache_key("h", &format!("/item/{i}"));
            put(storage, &k, &[b'x'; 900]).await.unwrap();
            let entries = storage.entries.weighted_size();
            assert!(entries <= 8 << 10, "{entries} bytes held after insert {i}");
        }
        let oldest = key::cache_key("h", "/item/0");
        assert!(
            storage.fresh_hit(&oldest.combined_bin()).is_none(),
            "the oldest went at once"
        );
        let newest = storage.get(&key::cache_key("h", "/item/11")).unwrap();
        assert!(
            newest.weight() as usize > 900 + newest.meta.0.len() + newest.meta.1.len(),
            "the decoded header counts too"
        );
    }

    #[tokio::test]
    async fn purge_by_path_removes_every_host_query_and_variant() {
        let storage = leak(1 << 20, 1 << 20);
        let mut variant = key::cache_key("a", "/cache-me");
        variant.set_variance_key(*b"0123456789abcdef");
        let keys = [
            key::cache_key("a", "/cache-me"),
            key::cache_key("b", "/cache-me?v=2"),
            variant,
        ];
        for k in &keys {
            put(storage, k, b"x").await.unwrap();
        }
        let other = key::cache_key("a", "/cache-me-not");
        put(storage, &other, b"y").await.unwrap();
        assert_eq!(storage.purge_path("/cache-me"), 3);
        for k in &keys {
            assert!(body_of(storage, k).await.is_none());
        }
        assert!(body_of(storage, &other).await.is_some());
        assert_eq!(storage.purge_path("/cache-me"), 0);
    }

    #[tokio::test]
    async fn fresh_hits_come_only_from_fresh_plain_entries() {
        let storage = leak(1 << 20, 1 << 20);
        let k = key::cache_key("h", "/fresh");
        assert!(storage.fresh_hit(&k.combined_bin()).is_none());
        put(storage, &k, b"body").await.unwrap();
        let hit = storage
            .fresh_hit(&k.combined_bin())
            .expect("fresh for 30 s");
        assert_eq!(
            (hit.header.status.as_u16(), &hit.body[..]),
            (200, &b"body"[..])
        );
        assert!(hit.age < Duration::from_secs(5));
        let now = SystemTime::now();
        let expired = CacheMeta::new(
            now - Duration::from_secs(1),
            now - Duration::from_secs(9),
            0,
            0,
            ResponseHeader::build(200, None).unwrap(),
        );
        storage
            .update_meta(&k, &expired, &Span::inactive().handle())
            .await
            .unwrap();
        assert!(
            storage.fresh_hit(&k.combined_bin()).is_none(),
            "an expired entry goes the full way"
        );
        let mut variant = key::cache_key("h", "/variant");
        variant.set_variance_key(*b"0123456789abcdef");
        let mut varied = meta();
        varied.set_variance_key(*b"0123456789abcdef");
        let mut miss = storage
            .get_miss_handler(&variant, &varied, &Span::inactive().handle())
            .await
            .unwrap();
        miss.write_body(Bytes::from_static(b"v"), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();
        assert!(
            storage.fresh_hit(&variant.combined_bin()).is_none(),
            "variants need the full lookup"
        );
    }

    #[tokio::test]
    async fn update_meta_keeps_the_body() {
        let storage = leak(1 << 20, 1 << 20);
        let k = key::cache_key("h", "/r");
        assert!(!storage
            .update_meta(&k, &meta(), &Span::inactive().handle())
            .await
            .unwrap());
        put(storage, &k, b"body").await.unwrap();
        assert!(storage
            .update_meta(&k, &meta(), &Span::inactive().handle())
            .await
            .unwrap());
        assert_eq!(body_of(storage, &k).await.unwrap(), "body");
    }
}
