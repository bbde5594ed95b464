//! Client connections, around the requests on them: how many may be open at
//! once (`limits.max_connections`) and how long a client may take to send a
//! request head (`limits.client_header_timeout`). Pingora 0.9 offers neither,
//! so the proxy runs behind [`Guarded`], which holds a slot for each
//! connection while it lives and hands the proxy a [`Timed`] stream, whose
//! reads fail once a request head is overdue.
//!
//! Where one request ends and the next begins is known to the proxy, not to
//! the bytes: the proxy calls [`head_received`] when it has parsed a head and
//! [`request_done`] when the request has ended.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::Config;

/// How long a refused client is read from (and its request discarded) after
/// its 503, so that closing does not reset the connection before the client
/// has read the answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
const REFUSAL_DRAIN_LIMIT: usize = 64 << 10;

/// A complete plain-text response that closes the connection, written
/// straight to the client before Pingora has a session for it; `headers` are
/// extra header lines, each ending in CRLF.
fn closing_response(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Counts shared by every connection, read by `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    /// Seconds since `Connections` was made, at the last refusal logged.
    refusal_logged_at: AtomicU64,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections turned away by `limits.max_connections`.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed by `limits.client_header_timeout`.
    pub fn header_timeouts(&self) -> u64 {
        self.header_timeouts.load(Ordering::Relaxed)
    }

    /// A slot for one more connection, when fewer than `max` are open.
    fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) < max {
            Some(Slot(Arc::clone(self)))
        } else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Logs a refusal, at most once a second, so that a flood does not flood the log too.
    fn log_refusal(&self, max: usize, started: std::time::Instant) {
        let now = started.elapsed().as_secs() + 1;
        let last = self.refusal_logged_at.load(Ordering::Relaxed);
        if now > last
            && self
                .refusal_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "refusing new client connections: limits.max_connections ({max}) are open; {} refused so far",
                self.refused()
            );
        }
    }
}

/// One open connection, counted until it is dropped.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A [`ServerApp`] (the proxy) behind the connection limits.
pub struct Guarded<A> {
    app: Arc<A>,
    config: Arc<ArcSwap<Config>>,
    connections: Arc<Connections>,
    started: std::time::Instant,
}

impl<A> Guarded<A> {
    pub fn new(app: A, config: Arc<ArcSwap<Config>>, connections: Arc<Connections>) -> Self {
        Guarded {
            app: Arc::new(app),
            config,
            connections,
            started: std::time::Instant::now(),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (max, header_timeout) = {
            let limits = &self.config.load().limits;
            (
                limits.max_connections.get() as usize,
                limits.client_header_timeout.0,
            )
        };
        let Some(_slot) = self.connections.admit(max) else {
            self.connections.log_refusal(max, self.started);
            refuse(stream).await;
            return None;
        };
        let stream: Stream = Box::new(Timed::new(
            stream,
            header_timeout,
            Arc::clone(&self.connections),
        ));
        // An HTTP app serves every request of the connection in one call;
        // any stream handed back is served here, still inside the slot.
        let mut next = self.app.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.app.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// Answers 503 and closes, reading (and discarding) what the client sends
/// for a moment first.
async fn refuse(mut stream: Stream) {
    let answered = async {
        let answer = closing_response(
            "503 Service Unavailable",
            "Retry-After: 1\r\n",
            "too many open connections; try again in a moment\n",
        );
        stream.write_all(&answer).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(&mut stream).await?;
        // On the heap: this future is part of every connection's, and an
        // array here would make each one 4 KiB larger.
        let mut buf = vec![0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_LIMIT {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answered).await;
}

/// Where a connection is, as far as the head deadline is concerned.
const READING_HEAD: u8 = 0;
const IN_REQUEST: u8 = 1;
const BETWEEN_REQUESTS: u8 = 2;
const TIMED_OUT: u8 = 3;

/// A client stream whose reads fail when a request head is not complete in
/// time. The deadline runs from the accept for the first request, and from
/// the first byte of each later one (the wait for that byte is the
/// keep-alive idle time, which Pingora bounds with `keepalive_timeout`).
#[derive(Debug)]
pub struct Timed {
    inner: Stream,
    limit: Duration,
    /// One of the states above; the proxy moves it through [`head_received`] and [`request_done`].
    state: AtomicU8,
    deadline: Pin<Box<Sleep>>,
    /// Bytes of the current head received so far.
    head_bytes: usize,
    connections: Arc<Connections>,
}

impl Timed {
    fn new(inner: Stream, limit: Duration, connections: Arc<Connections>) -> Self {
        Timed {
            inner,
            limit,
            state: AtomicU8::new(READING_HEAD),
            deadline: Box::pin(tokio::time::sleep(limit)),
            head_bytes: 0,
            connections,
        }
    }

    /// The deadline passed: answer 408 when part of a head came (a client
    /// that sent nothing, such as a browser's preconnect, is just closed),
    /// and fail the read.
    fn time_out(&mut self, cx: &mut Context<'_>) -> io::Error {
        self.state.store(TIMED_OUT, Ordering::Relaxed);
        self.connections
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
        if self.head_bytes > 0 {
            // Best effort on an idle socket: the tiny answer fits its send
            // buffer at once; if it does not, the close alone must do.
            let answer = closing_response(
                "408 Request Timeout",
                "",
                "the request head took too long to send\n",
            );
            let mut inner = Pin::new(&mut self.inner);
            if let Poll::Ready(Ok(n)) = inner.as_mut().poll_write(cx, &answer) {
                if n == answer.len() {
                    let _ = inner.poll_flush(cx);
                }
            }
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete request head within {:?} (limits.client_header_timeout)",
                self.limit
            ),
        )
    }
}

/// The connection's [`Timed`] stream, when the session is a plain HTTP/1 one of ours.
fn timed(session: &Session) -> Option<&Timed> {
    session
        .as_downstream()
        .stream()?
        .as_ref()
        .as_any()
        .downcast_ref::<Timed>()
}

/// A request head has been read: its deadline no longer applies.
pub fn head_received(session: &Session) {
    if let Some(t) = timed(session) {
        t.state.store(IN_REQUEST, Ordering::Relaxed);
    }
}

/// A request has ended: the next head's deadline starts with its first byte.
pub fn request_done(session: &Session) {
    if let Some(t) = timed(session) {
        let _ = t.state.compare_exchange(
            IN_REQUEST,
            BETWEEN_REQUESTS,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let state = this.state.load(Ordering::Relaxed);
        if state == TIMED_OUT {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        match (state, &read) {
            (IN_REQUEST, _) => read,
            (BETWEEN_REQUESTS, Poll::Ready(Ok(()))) if got > 0 => {
                // The first byte of the next request: its head's clock starts.
                this.state.store(READING_HEAD, Ordering::Relaxed);
                this.head_bytes = got;
                let deadline = Instant::now() + this.limit;
                this.deadline.as_mut().reset(deadline);
                read
            }
            (READING_HEAD, Poll::Pending) => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.time_out(cx))),
                Poll::Pending => Poll::Pending,
            },
            (READING_HEAD, _) => {
                this.head_bytes += got;
                read
            }
            _ => read,
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// The rest of Pingora's stream interface is the inner stream's.

#[async_trait]
impl Shutdown for Timed {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Timed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Timed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Timed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Timed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Timed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Timed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
