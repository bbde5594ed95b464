//! Client connections, around the requests on them: the counts kept of
//! them ([`Connections`]), the slot each one holds while it is open, how long
//! a client may take to send a request head (`limits.client_header_timeout`),
//! and how a connection whose request was refused before it was read whole
//! is closed (a lingering close, `limits.lingering_time`). Pingora 0.9 offers
//! none of these, so the proxy reads each client through a [`Timed`] stream:
//! its reads fail once a request head is overdue, and when it is dropped
//! after an early answer it reads and discards what the client still sends
//! before it closes, so that the close does not reset the answer away before
//! the client has read it. Admitting connections and handing the proxy their
//! streams is the guard's (`guard`).
//!
//! Where one request ends and the next begins is known to the proxy, not to
//! the bytes: the proxy calls [`head_received`] when it has parsed a head,
//! [`request_done`] when the request has ended, and [`answered_early`] when it
//! answered before the request was read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::runtime::Limits;
use crate::telemetry::logging::Throttle;

/// A complete plain-text response that closes the connection, written
/// straight to the client before Pingora has a session for it; `headers` are
/// extra header lines, each ending in CRLF.
pub(super) fn closing_response(status: &str, headers: &str, body: &str) -> Vec<u8> {
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
    /// Open connections that have not sent (all of) their first request head.
    fresh: AtomicUsize,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    lingering: AtomicUsize,
    /// The guard's refusals, logged once a second at most.
    pub(super) refusals_logged: Throttle,
    timeouts_logged: Throttle,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Accepted connections whose first request has not begun: a stopping
    /// balancer waits for them, since their clients chose it.
    pub fn fresh(&self) -> usize {
        self.fresh.load(Ordering::Relaxed)
    }

    /// Connections turned away by `limits.max_connections`.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed by `limits.client_header_timeout`.
    pub fn header_timeouts(&self) -> u64 {
        self.header_timeouts.load(Ordering::Relaxed)
    }

    /// Connections being read from and discarded before they close.
    pub fn lingering(&self) -> usize {
        self.lingering.load(Ordering::Relaxed)
    }

    /// A slot for one more connection, when fewer than `max` are open.
    pub(super) fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) < max {
            Some(Slot(Arc::clone(self)))
        } else {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One open connection, counted until it is dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The lingering close: ends the answer already written (so the client sees
/// it complete), then reads and discards what the client still sends, for at
/// most `time` in all and `timeout` between reads, and closes. Without it,
/// closing a socket with unread bytes resets the connection, and a client
/// that writes its whole request before reading loses the answer.
pub(super) async fn linger(mut stream: Stream, time: Duration, timeout: Duration) {
    if AsyncWriteExt::shutdown(&mut stream).await.is_err() {
        return;
    }
    let deadline = Instant::now() + time;
    // On the heap: this future is part of every connection's.
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let until = deadline.min(Instant::now() + timeout);
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Where a connection is, as far as the head deadline is concerned.
const READING_HEAD: u8 = 0;
const IN_REQUEST: u8 = 1;
const BETWEEN_REQUESTS: u8 = 2;
const TIMED_OUT: u8 = 3;
/// HTTP/2: many requests at once, each framed by the protocol; no head
/// deadline applies to the connection (Pingora's HTTP/2 server bounds it).
const UNTIMED: u8 = 4;

/// A client stream whose reads fail when a request head is not complete in
/// time. The deadline runs from the accept for the first request, and from
/// the first byte of each later one (the wait for that byte is the
/// keep-alive idle time, which Pingora bounds with `keepalive_timeout`).
/// It holds its connection's slot, and gives it back only once the
/// connection is closed, lingering included.
#[derive(Debug)]
pub struct Timed {
    inner: Stream,
    limit: Duration,
    /// One of the states above; the proxy moves it through [`head_received`] and [`request_done`].
    state: AtomicU8,
    deadline: Pin<Box<Sleep>>,
    /// Bytes of the current head received so far.
    head_bytes: usize,
    /// An answer went out before its request was read whole: close lingering.
    answered_early: AtomicBool,
    /// The current request line as it came from the socket.
    request_line: RequestLine,
    lingering_time: Duration,
    lingering_timeout: Duration,
    slot: Option<Slot>,
    /// Counted in [`Connections::fresh`]: no request head received yet. An
    /// HTTP/2 connection stays so until it closes, which a draining
    /// balancer's `GOAWAY` brings about once its last stream is served.
    fresh: AtomicBool,
    /// Bytes `try_peek` read from the socket and the reads have not taken
    /// yet (`read_at` onwards); empty, and holding no memory, otherwise.
    read_ahead: Vec<u8>,
    read_at: usize,
    /// Set by [`hand_over_on_flush`]: the next flush that completes moves
    /// the socket's stream into `handed`, for a WebSocket tunnel's relay.
    hand_over: AtomicBool,
    handed: std::sync::Mutex<Option<Handed>>,
}

/// A client's stream handed over to a tunnel, with what was read ahead of
/// the proxy and not taken by it.
#[derive(Debug)]
pub struct Handed {
    pub stream: Stream,
    pub read_ahead: Vec<u8>,
}

impl Timed {
    pub(super) fn new(inner: Stream, limits: &Limits, slot: Slot) -> Self {
        let limit = limits.client_header_timeout;
        slot.0.fresh.fetch_add(1, Ordering::Relaxed);
        Timed {
            inner,
            limit,
            state: AtomicU8::new(READING_HEAD),
            deadline: Box::pin(tokio::time::sleep(limit)),
            head_bytes: 0,
            answered_early: AtomicBool::new(false),
            request_line: RequestLine::default(),
            lingering_time: limits.lingering_time,
            lingering_timeout: limits.lingering_timeout,
            slot: Some(slot),
            fresh: AtomicBool::new(true),
            read_ahead: Vec::new(),
            read_at: 0,
            hand_over: AtomicBool::new(false),
            handed: std::sync::Mutex::new(None),
        }
    }

    /// HTTP/2: no head deadline for this connection (see [`UNTIMED`]).
    pub(super) fn untimed(&mut self) {
        self.state = AtomicU8::new(UNTIMED);
    }

    fn connections(&self) -> Option<&Connections> {
        self.slot.as_ref().map(|s| &*s.0)
    }

    /// The connection's first request head has come (or it closes).
    fn settle(&self) {
        if self.fresh.swap(false, Ordering::Relaxed) {
            if let Some(connections) = self.connections() {
                connections.fresh.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The deadline passed: answer 408 when part of a head came (a client
    /// that sent nothing, such as a browser's preconnect, is just closed),
    /// and fail the read.
    fn time_out(&mut self, cx: &mut Context<'_>) -> io::Error {
        self.state.store(TIMED_OUT, Ordering::Relaxed);
        let limit = humantime::format_duration(self.limit);
        if let Some(connections) = self.connections() {
            connections.header_timeouts.fetch_add(1, Ordering::Relaxed);
            if connections.timeouts_logged.allow() {
                log::info!(
                    "closed a client connection{}: no complete request head within {limit} (limits.client_header_timeout); {} so far",
                    peer(&*self.inner).map(|p| format!(" from {p}")).unwrap_or_default(),
                    connections.header_timeouts(),
                );
            }
        }
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
                    self.answered_early.store(true, Ordering::Relaxed);
                }
            }
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no complete request head within {limit} (limits.client_header_timeout)"),
        )
    }

    /// Whether closing now could reset an answer the client has not read:
    /// one was sent before its request was read whole (by the proxy, by the
    /// head deadline, or by Pingora refusing a malformed head).
    fn must_linger(&self) -> bool {
        self.answered_early.load(Ordering::Relaxed)
            || (self.state.load(Ordering::Relaxed) == READING_HEAD && self.head_bytes > 0)
    }
}

/// What is seen of a request line as its bytes arrive. Pingora percent-
/// encodes a request-target that contains spaces and parses it anyway, so
/// the bytes are the only place where such a line can be told from a
/// well-formed one. (A pipelined request that arrived together with the one
/// before it is parsed from Pingora's buffer, not read here.)
#[derive(Debug, Default, Clone, Copy)]
struct RequestLine {
    spaces: u8,
    complete: bool,
    /// Bytes seen of the line so far (counted up to the preface's length).
    seen: usize,
    /// So far, the line is the HTTP/2 connection preface (`PRI * HTTP/2.0`).
    preface: bool,
}

/// How an HTTP/2 client without TLS (h2c, prior knowledge) begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl RequestLine {
    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.complete {
                return;
            }
            if self.seen < H2_PREFACE.len() {
                self.preface = (self.seen == 0 || self.preface) && H2_PREFACE[self.seen] == b;
                self.seen += 1;
            }
            match b {
                b' ' => self.spaces = self.spaces.saturating_add(1),
                b'\n' => self.complete = true,
                _ => {}
            }
        }
    }

    /// The connection speaks HTTP/2 in clear text.
    fn is_h2c(&self) -> bool {
        self.preface && self.seen == H2_PREFACE.len()
    }

    /// `METHOD SP request-target SP HTTP-version` has exactly two spaces.
    fn has_extra_spaces(&self) -> bool {
        self.spaces > 2
    }
}

/// Whether the request line of the request being served had a space in its
/// request-target (RFC 9112 section 3.2: answer 400).
pub fn request_line_malformed(session: &Session) -> bool {
    timed(session).is_some_and(|t| t.request_line.has_extra_spaces())
}

/// The client's address, for log lines.
fn peer(stream: &dyn pingora::protocols::IO) -> Option<std::net::SocketAddr> {
    stream.get_socket_digest()?.peer_addr()?.as_inet().copied()
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.settle();
        if !self.must_linger() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // The stream moves into the lingering task; what stays behind is never read.
        let stream = std::mem::replace(&mut self.inner, Box::new(io::Cursor::new(Vec::new())));
        let slot = self.slot.take();
        let (time, timeout) = (self.lingering_time, self.lingering_timeout);
        if let Some(slot) = &slot {
            slot.0.lingering.fetch_add(1, Ordering::Relaxed);
        }
        runtime.spawn(async move {
            linger(stream, time, timeout).await;
            if let Some(slot) = slot {
                slot.0.lingering.fetch_sub(1, Ordering::Relaxed);
            }
        });
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
        t.settle();
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

/// The session's client stream is to be handed over (see [`handed_over`])
/// once the response header being written is flushed: a `101`. `false`:
/// the stream is not one of ours (or not plain), and stays with Pingora.
pub fn hand_over_on_flush(session: &Session) -> bool {
    match timed(session) {
        Some(t) if t.inner.get_ssl_digest().is_none() => {
            t.hand_over.store(true, Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

/// The client's stream, handed over by the flush that
/// [`hand_over_on_flush`] asked for; `None` if none came (which cancels
/// the hand-over).
pub fn handed_over(session: &Session) -> Option<Handed> {
    let t = timed(session)?;
    t.hand_over.store(false, Ordering::Relaxed);
    t.handed.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The proxy answered before the request (its body) was read whole, and
/// will close the connection: close it lingering.
pub fn answered_early(session: &Session) {
    if let Some(t) = timed(session) {
        t.answered_early.store(true, Ordering::Relaxed);
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
        let read = if this.read_at < this.read_ahead.len() {
            this.take_read_ahead(buf);
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        let got = buf.filled().len() - before;
        match (state, &read) {
            (IN_REQUEST, _) => read,
            (BETWEEN_REQUESTS, Poll::Ready(Ok(()))) if got > 0 => {
                // The first byte of the next request: its head's clock starts.
                this.state.store(READING_HEAD, Ordering::Relaxed);
                this.head_bytes = got;
                this.request_line = RequestLine::default();
                this.request_line.scan(&buf.filled()[before..]);
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
                this.request_line.scan(&buf.filled()[before..]);
                if this.request_line.is_h2c() {
                    this.state.store(UNTIMED, Ordering::Relaxed);
                }
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
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if this.hand_over.load(Ordering::Relaxed) && matches!(flushed, Poll::Ready(Ok(()))) {
            this.hand_over.store(false, Ordering::Relaxed);
            // What stays behind reads as closed and is never written to.
            let stream = std::mem::replace(&mut this.inner, Box::new(io::Cursor::new(Vec::new())));
            let read_ahead = std::mem::take(&mut this.read_ahead).split_off(this.read_at);
            this.read_at = 0;
            let handed = Handed { stream, read_ahead };
            *this.handed.lock().unwrap_or_else(|e| e.into_inner()) = Some(handed);
        }
        flushed
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

impl Timed {
    /// Moves read-ahead bytes into `buf`, as many as fit.
    fn take_read_ahead(&mut self, buf: &mut ReadBuf<'_>) {
        let ahead = &self.read_ahead[self.read_at..];
        let n = ahead.len().min(buf.remaining());
        buf.put_slice(&ahead[..n]);
        self.read_at += n;
        if self.read_at == self.read_ahead.len() {
            self.read_ahead = Vec::new();
            self.read_at = 0;
        }
    }

    /// Reads what the socket has (up to [`READ_AHEAD`] bytes) onto the
    /// read-ahead, through a buffer of the thread's: no buffer is held while
    /// the socket has nothing to read.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Box<[u8]>> =
                std::cell::RefCell::new(vec![0; READ_AHEAD].into_boxed_slice());
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut chunk = ReadBuf::new(scratch);
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            self.read_ahead.extend_from_slice(chunk.filled());
            Poll::Ready(Ok(()))
        })
    }
}

/// The most a peek reads from the socket at once: a whole request head in
/// most cases, so that the proxy reads it with no further system call.
const READ_AHEAD: usize = 4 << 10;

/// A peek reads the bytes for good (all the socket has, not only the ones
/// asked for) and keeps them for the reads that follow: waiting for the next
/// request costs no system call more than reading it.
#[async_trait]
impl Peek for Timed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        while self.read_ahead.len() - self.read_at < buf.len() {
            std::future::poll_fn(|cx| self.poll_read_ahead(cx)).await?;
        }
        buf.copy_from_slice(&self.read_ahead[self.read_at..self.read_at + buf.len()]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peek_reads_ahead_and_the_reads_after_it_get_every_byte_once() {
        use tokio::io::AsyncReadExt;
        const SENT: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\n";
        let slot = Arc::new(Connections::default()).admit(1).expect("a slot");
        let stream: Stream = Box::new(io::Cursor::new(SENT.to_vec()));
        let mut timed = Timed::new(stream, &Limits::default(), slot);
        let mut first = [0u8; 1];
        assert!(timed.try_peek(&mut first).await.unwrap());
        assert_eq!(&first, b"G");
        // All the socket had was read at once; a peek again sees the same bytes.
        assert_eq!(timed.read_ahead, SENT);
        let mut method = [0u8; 3];
        assert!(timed.try_peek(&mut method).await.unwrap());
        assert_eq!(&method, b"GET");
        // Reads take the read-ahead in pieces, then the socket (here at its end).
        let mut piece = [0u8; 10];
        assert_eq!(timed.read(&mut piece).await.unwrap(), 10);
        assert_eq!(&piece, &SENT[..10]);
        let mut rest = Vec::new();
        timed.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &SENT[10..]);
        assert!(timed.read_ahead.is_empty() && timed.read_ahead.capacity() == 0);
        // Nothing more comes: a peek says so.
        assert!(timed.try_peek(&mut first).await.is_err());
    }

    #[test]
    fn slots_stop_at_the_limit_and_a_closed_connection_frees_its_own() {
        let connections = Arc::new(Connections::default());
        let first = connections.admit(2).expect("a first slot");
        let second = connections.admit(2).expect("a second slot");
        assert!(connections.admit(2).is_none(), "a third beyond 2");
        assert_eq!((connections.open(), connections.refused()), (2, 1));
        drop(first);
        assert_eq!(connections.open(), 1);
        let third = connections.admit(2).expect("the freed slot");
        assert!(connections.admit(2).is_none());
        assert_eq!((connections.open(), connections.refused()), (2, 2));
        drop((second, third));
        assert_eq!(connections.open(), 0);
    }

    #[test]
    fn a_request_line_is_told_apart_as_its_bytes_arrive() {
        let scanned = |pieces: &[&[u8]]| {
            let mut line = RequestLine::default();
            for piece in pieces {
                line.scan(piece);
            }
            line
        };
        let spaced = scanned(&[b"GET /a b", b" HTTP/1.1\r\n"]);
        assert!(spaced.complete && spaced.has_extra_spaces());
        let plain = scanned(&[b"GET /a HTTP/1.1\r\n", b"X-Words: a b c\r\n"]);
        assert!(
            plain.complete && !plain.has_extra_spaces(),
            "the header lines after it do not count: {plain:?}"
        );
        assert!(scanned(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM"]).is_h2c());
        assert!(
            !scanned(&[b"PRI * HT"]).is_h2c(),
            "not yet the whole preface"
        );
        assert!(!scanned(&[b"PUT * HTTP/2.0\r\n"]).is_h2c());
    }
}
