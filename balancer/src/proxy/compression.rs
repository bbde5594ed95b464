//! Response compression (`[compression]`), as a Pingora downstream module
//! with Pingora's encoders (gzip, brotli, zstd) and the balancer's own
//! choices: the client's `Accept-Encoding` with its q-values chooses among
//! `algorithms` (their order breaks ties), and only responses of the
//! configured `types`, at least `min_length` long, are compressed.
//!
//! The module is in every request's chain, so that a reload can turn
//! compression on, but it does nothing for a request that `request_filter`
//! did not [`offer`] it: without `[compression]` (or on a route with
//! `compression = false`) the cost is one small allocation per request.
//! Running as a module, it sees every response the client gets: proxied,
//! from the cache (stored uncompressed, compressed per hit), revalidated.
//!
//! Never compressed: a `HEAD`, a request with `Range`, an upgrade, a
//! response that already has a `Content-Encoding`, a `206`, `204` or
//! `304`, a `Cache-Control: no-transform`. A compressed response loses its
//! `Content-Length` (it is streamed, chunked in HTTP/1.1) and
//! `Accept-Ranges`, and its strong `ETag` becomes weak (as nginx does), so
//! that conditional requests still work; every response that could be
//! compressed gets `Vary: Accept-Encoding`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, RANGE, TRANSFER_ENCODING, VARY,
};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::protocols::http::compression::{Algorithm, Encode};
use pingora::Result;

use crate::runtime::{Compression, Snapshot};

/// Adds [`Compress`] to each request's downstream modules.
pub struct CompressBuilder;

impl HttpModuleBuilder for CompressBuilder {
    fn init(&self) -> Module {
        Box::new(Compress::default())
    }

    /// After any other module, as Pingora's own compression runs.
    fn order(&self) -> i16 {
        i16::MIN / 2
    }
}

/// One request's compression: what was offered, then the encoder.
#[derive(Default)]
pub struct Compress {
    offer: Option<Offer>,
    encoder: Option<Box<dyn Encode + Send + Sync>>,
}

/// What `request_filter` allows for a request.
struct Offer {
    /// The snapshot whose `[compression]` applies.
    snapshot: Arc<Snapshot>,
    /// The encoding the client accepts best, with its level; `None`: none
    /// (the response still gets `Vary`).
    chosen: Option<(Algorithm, u32)>,
    /// An HTTP/1.1 client: a streamed body is sent chunked.
    chunked: bool,
}

/// Offers compression for this request, when `[compression]` is on, the
/// route allows it and the request can have a compressed answer.
pub fn offer(session: &mut pingora::proxy::Session, snapshot: &Arc<Snapshot>, route_allows: bool) {
    let Some(settings) = &snapshot.compression else {
        return;
    };
    let req = session.req_header();
    if !route_allows || req.method == http::Method::HEAD || req.headers.contains_key(RANGE) {
        return;
    }
    let offer = Offer {
        chosen: negotiate(req.headers.get(ACCEPT_ENCODING), &settings.encodings),
        chunked: req.version == http::Version::HTTP_11,
        snapshot: Arc::clone(snapshot),
    };
    if let Some(module) = session.downstream_modules_ctx.get_mut::<Compress>() {
        module.offer = Some(offer);
    }
}

/// The encoding of `offered` (with its level) that `accept_encoding`
/// prefers: the highest q-value (an encoding not named takes the q of `*`,
/// or is refused), and the list's order among equals.
pub fn negotiate(
    accept_encoding: Option<&HeaderValue>,
    offered: &[(Algorithm, u32)],
) -> Option<(Algorithm, u32)> {
    let text = accept_encoding?.to_str().ok()?;
    let mut star = None;
    let mut named = [None; 3];
    for entry in text.split(',') {
        let mut parts = entry.split(';');
        let coding = parts.next().unwrap_or_default().trim();
        let mut q = Some(1.0);
        for param in parts {
            if let Some((name, value)) = param.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    q = value
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q));
                }
            }
        }
        let Some(q) = q else {
            continue; // a malformed weight: the entry is ignored
        };
        if coding == "*" {
            star = Some(q);
        } else if let Some(i) = offered
            .iter()
            .position(|(a, _)| coding.eq_ignore_ascii_case(a.as_str()))
        {
            named[i.min(2)] = Some(q);
        }
    }
    let mut best: Option<((Algorithm, u32), f32)> = None;
    for (i, encoding) in offered.iter().enumerate() {
        let q = named.get(i).copied().flatten().or(star).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((*encoding, q));
        }
    }
    best.map(|(e, _)| e)
}

/// Whether `resp` may be compressed for a client that accepts it.
fn compressible(resp: &ResponseHeader, settings: &Compression) -> bool {
    let status = resp.status.as_u16();
    if resp.status.is_informational() || matches!(status, 204 | 206 | 304) {
        return false;
    }
    let headers = &resp.headers;
    if headers.contains_key(CONTENT_ENCODING) {
        return false;
    }
    let no_transform = headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    });
    if no_transform {
        return false;
    }
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if length.is_some_and(|l| l < settings.min_length) {
        return false;
    }
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| settings.compresses(t))
}

/// Adds `Accept-Encoding` to `Vary`, unless it is there (or `*` is).
fn add_vary(resp: &mut ResponseHeader) -> Result<()> {
    let present = resp.headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|f| f.trim() == "*" || f.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !present {
        resp.append_header(VARY, "Accept-Encoding")?;
    }
    Ok(())
}

/// The headers of a response about to be compressed with `algorithm`.
fn mark_compressed(resp: &mut ResponseHeader, algorithm: Algorithm, chunked: bool) -> Result<()> {
    resp.remove_header(&CONTENT_LENGTH);
    resp.remove_header(&ACCEPT_RANGES);
    resp.insert_header(CONTENT_ENCODING, algorithm.as_str())?;
    if chunked {
        resp.insert_header(TRANSFER_ENCODING, "chunked")?;
    }
    // Another representation: a strong validator becomes weak; what is not
    // a valid ETag is dropped (nginx's rule).
    if let Some(etag) = resp.headers.get(ETAG).map(|e| e.as_bytes().to_vec()) {
        if etag.starts_with(b"\"") {
            let weak = [b"W/".as_slice(), &etag].concat();
            resp.insert_header(
                ETAG,
                HeaderValue::from_bytes(&weak).map_err(|e| {
                    pingora::Error::because(pingora::ErrorType::InternalError, "weak ETag", e)
                })?,
            )?;
        } else if !etag.starts_with(b"W/") {
            resp.remove_header(&ETAG);
        }
    }
    Ok(())
}

/// The encoder for `algorithm` at `level`: [`Brotli`], and Pingora's own
/// for the others (gzip, zstd).
fn encoder(algorithm: Algorithm, level: u32) -> Option<Box<dyn Encode + Send + Sync>> {
    match algorithm {
        Algorithm::Brotli => Some(Box::new(Brotli::new(level))),
        other => other.compressor(level),
    }
}

/// A brotli encoder whose stream ends: Pingora 0.9.1's only flushes at the
/// end of the body, which lenient decoders (curl, browsers) accept and
/// strict ones (Python's `brotli`) refuse as incomplete.
struct Brotli {
    writer: Option<brotli::CompressorWriter<Vec<u8>>>,
    total_in: usize,
    total_out: usize,
    time: std::time::Duration,
}

impl Brotli {
    /// Brotli's window at 2^19 bytes, as Pingora's.
    fn new(level: u32) -> Brotli {
        Brotli {
            writer: Some(brotli::CompressorWriter::new(Vec::new(), 4096, level, 19)),
            total_in: 0,
            total_out: 0,
            time: std::time::Duration::ZERO,
        }
    }
}

impl Encode for Brotli {
    fn encode(&mut self, input: &[u8], end: bool) -> Result<Bytes> {
        use std::io::Write as _;
        let started = std::time::Instant::now();
        let Some(writer) = self.writer.as_mut() else {
            return Ok(Bytes::new()); // already ended
        };
        writer
            .write_all(input)
            .map_err(|e| pingora::Error::because(pingora::ErrorType::InternalError, "brotli", e))?;
        let out = if end {
            self.writer
                .take()
                .map(|w| w.into_inner())
                .unwrap_or_default()
        } else {
            std::mem::take(writer.get_mut())
        };
        self.total_in += input.len();
        self.total_out += out.len();
        self.time += started.elapsed();
        Ok(out.into())
    }

    fn stat(&self) -> (&'static str, usize, usize, std::time::Duration) {
        ("br", self.total_in, self.total_out, self.time)
    }
}

impl Compress {
    /// The encoded form of `data` (the end of the stream with `end`). A
    /// failure ends the response: what was sent cannot be taken back.
    fn encode(&mut self, data: &[u8], end: bool) -> Result<Option<Bytes>> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(None);
        };
        let out = encoder.encode(data, end);
        if end || out.is_err() {
            self.encoder = None;
        }
        out.map(Some)
    }
}

#[async_trait]
impl HttpModule for Compress {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    async fn request_header_filter(&mut self, _req: &mut RequestHeader) -> Result<()> {
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        let Some(offer) = self.offer.take() else {
            return Ok(());
        };
        let Some(settings) = &offer.snapshot.compression else {
            return Ok(());
        };
        if end_of_stream || !compressible(resp, settings) {
            return Ok(());
        }
        add_vary(resp)?;
        let Some((algorithm, level)) = offer.chosen else {
            return Ok(());
        };
        self.encoder = encoder(algorithm, level);
        if self.encoder.is_some() {
            mark_compressed(resp, algorithm, offer.chunked)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        if self.encoder.is_none() {
            return Ok(());
        }
        let data = body.take().unwrap_or_default();
        *body = self.encode(&data, end_of_stream)?;
        Ok(())
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        self.encode(&[], true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::{Brotli as Br, Gzip, Zstd};

    fn chosen(accept: &str, algorithms: &[Algorithm]) -> Option<Algorithm> {
        let offered: Vec<(Algorithm, u32)> = algorithms.iter().map(|a| (*a, 1)).collect();
        negotiate(Some(&HeaderValue::from_str(accept).unwrap()), &offered).map(|(a, _)| a)
    }

    #[test]
    fn the_clients_q_values_choose_and_the_lists_order_breaks_ties() {
        let all = [Gzip, Br, Zstd];
        assert_eq!(negotiate(None, &[(Gzip, 6)]), None);
        assert_eq!(
            negotiate(Some(&HeaderValue::from_static("br")), &[(Gzip, 6), (Br, 4)]),
            Some((Br, 4)),
            "with its level"
        );
        assert_eq!(chosen("gzip", &all), Some(Gzip));
        assert_eq!(chosen("br", &all), Some(Br));
        assert_eq!(chosen("gzip, deflate, br, zstd", &all), Some(Gzip));
        assert_eq!(
            chosen("gzip, deflate, br, zstd", &[Zstd, Br, Gzip]),
            Some(Zstd)
        );
        assert_eq!(chosen("gzip;q=0.5, br;q=0.8", &all), Some(Br));
        assert_eq!(chosen("GZIP;Q=0.9, zstd;q=0.9", &[Zstd, Gzip]), Some(Zstd));
        assert_eq!(chosen("gzip;q=0, br;q=0", &all), None);
        assert_eq!(chosen("identity;q=0, gzip", &all), Some(Gzip));
        assert_eq!(chosen("*", &[Br, Gzip]), Some(Br));
        assert_eq!(chosen("*;q=0.1, gzip;q=0", &all), Some(Br));
        assert_eq!(chosen("identity", &all), None);
        assert_eq!(chosen("deflate", &all), None);
        assert_eq!(chosen("zstd", &[Gzip]), None);
        assert_eq!(chosen("gzip;q=2, br;q=x, zstd;q=0.001", &all), Some(Zstd));
        assert_eq!(chosen(" , ;;, =", &all), None);
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        resp
    }

    #[test]
    fn what_is_never_compressed() {
        let settings = Compression::default();
        let json = [
            ("content-type", "application/json"),
            ("content-length", "5000"),
        ];
        assert!(compressible(&response(200, &json), &settings));
        assert!(compressible(&response(404, &json), &settings));
        for status in [101, 204, 206, 304] {
            assert!(
                !compressible(&response(status, &json), &settings),
                "{status}"
            );
        }
        let with = |extra: (&'static str, &'static str)| {
            let mut headers = json.to_vec();
            headers.push(extra);
            response(200, &headers)
        };
        assert!(!compressible(
            &with(("content-encoding", "gzip")),
            &settings
        ));
        assert!(!compressible(
            &with(("cache-control", "public, No-Transform")),
            &settings
        ));
        assert!(!compressible(
            &response(200, &[("content-type", "image/png")]),
            &settings
        ));
        assert!(!compressible(
            &response(200, &[("content-length", "5000")]),
            &settings
        ));
        assert!(!compressible(
            &response(
                200,
                &[("content-type", "text/plain"), ("content-length", "1023")]
            ),
            &settings
        ));
        // Streamed without a length: compressed.
        assert!(compressible(
            &response(200, &[("content-type", "text/plain")]),
            &settings
        ));
    }

    #[test]
    fn each_encoder_ends_its_stream_so_a_strict_decoder_reads_it_whole() {
        use std::io::Read as _;
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i % 251).to_string().into_bytes())
            .collect();
        for encoding in [Gzip, Br, Zstd] {
            let mut encoder = encoder(encoding, 3).unwrap();
            let mut out = Vec::new();
            for (i, chunk) in text.chunks(7_000).enumerate() {
                let last = (i + 1) * 7_000 >= text.len();
                out.extend_from_slice(&encoder.encode(chunk, last).unwrap());
            }
            let mut decoded = Vec::new();
            let read = match encoding {
                Gzip => flate2::read::GzDecoder::new(out.as_slice()).read_to_end(&mut decoded),
                // Fails with "Invalid Data" on a stream that was only flushed.
                Br => brotli::Decompressor::new(out.as_slice(), 4096).read_to_end(&mut decoded),
                Zstd => zstd::stream::read::Decoder::new(out.as_slice())
                    .and_then(|mut d| d.read_to_end(&mut decoded)),
                other => panic!("{other:?} is never offered"),
            };
            assert!(read.is_ok(), "{encoding:?}: {read:?}");
            assert_eq!(decoded, text, "{encoding:?}");
        }
    }

    #[test]
    fn a_compressed_response_is_streamed_with_a_weak_etag_and_vary() {
        let mut resp = response(
            200,
            &[
                ("content-length", "5000"),
                ("accept-ranges", "bytes"),
                ("etag", "\"abc\""),
                ("vary", "Origin"),
            ],
        );
        add_vary(&mut resp).unwrap();
        mark_compressed(&mut resp, Br, true).unwrap();
        let h = &resp.headers;
        assert!(h.get("content-length").is_none() && h.get("accept-ranges").is_none());
        assert_eq!(h["content-encoding"], "br");
        assert_eq!(h["transfer-encoding"], "chunked");
        assert_eq!(h["etag"], "W/\"abc\"");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin", "Accept-Encoding"]);
        add_vary(&mut resp).unwrap();
        assert_eq!(resp.headers.get_all("vary").iter().count(), 2, "added once");

        let mut weak = response(200, &[("etag", "W/\"x\"")]);
        mark_compressed(&mut weak, Gzip, false).unwrap();
        assert_eq!(weak.headers["etag"], "W/\"x\"");
        assert!(weak.headers.get("transfer-encoding").is_none());
        let mut bad = response(200, &[("etag", "abc")]);
        mark_compressed(&mut bad, Gzip, false).unwrap();
        assert!(bad.headers.get("etag").is_none());
    }
}
