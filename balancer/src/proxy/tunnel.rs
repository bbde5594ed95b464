//! WebSockets: an HTTP/1.1 `Upgrade: websocket` request is carried by the
//! balancer itself, from the connect to the end of the tunnel.
//!
//! Pingora 0.9.1's HTTP/1 proxy can end a tunnel right after its `101`: when
//! the backend's answer is read before the upgrade request's empty body has
//! been handled, the end of that body is taken for the end of the tunnel
//! (cloudflare/pingora#946). So the request is routed, rate-limited and
//! shown to extensions as any other; then `request_filter` hands it here
//! instead of to Pingora's proxy. This connects to the backend that
//! `upstream_peer` picks (a failed connect is retried on another, as
//! `fail_to_connect` decides), sends the head with the edits of
//! `upstream_request_filter`, relays the answer (with the edits of any
//! response; a response hook that turns the backend's `101` into another
//! status refuses the upgrade), and after a `101` copies bytes both ways
//! until the sides close (on a relay each direction ends on its own; here,
//! on the runtime, the first close ends both), `idle_timeout` passes with
//! nothing either way, or the grace period of a graceful stop is over.
//!
//! After the `101` the bytes skip Pingora's HTTP sessions. When both sides
//! are plain TCP, the client's stream is handed over by the connection's
//! `Timed` stream as the `101` is flushed, and a relay thread carries the
//! bytes between the two sockets (see `relay`): the task here waits for the
//! end. Otherwise the tunnel's own task reads and writes the backend's
//! socket (over TLS, its stream taken out of its session; see `Backend`)
//! and, on the plain listener, the client's socket (see `Client`); over
//! TLS the client's bytes go through its session. What each side sent
//! before that, which its session has
//! already read into its buffer (a client may send before the `101`, a
//! backend along with it), is taken from the session first, so nothing is
//! lost. A write to the backend that waits for room does not stop the
//! tunnel from reading the backend (see `Outbox`).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as BackendSession;
use pingora::protocols::{Stream, IO};
use pingora::{ErrorType, OrErr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::drain::Stopping;
use super::{relay, Balancer, RequestCtx};
use crate::telemetry::access_log;

/// Tunnels open right now; a graceful stop waits for them to close.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Upgrade attempts per request at most, as Pingora's own retry limit.
const MAX_TRIES: u32 = 16;

/// How many tunnels are open.
pub fn open() -> usize {
    OPEN.load(Ordering::Acquire)
}

/// Counts one open tunnel while it lives.
struct OpenGuard;

impl OpenGuard {
    fn enter() -> OpenGuard {
        OPEN.fetch_add(1, Ordering::AcqRel);
        OpenGuard
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the balancer carries this request itself: an HTTP/1.1 WebSocket
/// upgrade. Other upgrades go through Pingora, which forwards them as plain
/// requests (without `Upgrade`).
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// The connector for tunnels: Pingora's, with the server's options.
pub fn connector(conf: &pingora::server::configuration::ServerConf) -> TransportConnector {
    TransportConnector::new(Some(
        pingora::connectors::ConnectorOptions::from_server_conf(conf),
    ))
}

impl Balancer {
    /// Answers an upgrade request: the backend's answer, and after a `101`
    /// the tunnel, to its end. An error before the answer is the backend's
    /// (`fail_to_proxy` makes it a 502/503/504).
    pub(super) async fn tunnel(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let mut backend = self.connect(session, ctx).await?;
        let read_timeout = ctx
            .group
            .as_ref()
            .map(|g| g.read_timeout)
            .unwrap_or(Duration::from_secs(60));
        let mut request = session.req_header().clone();
        keep_only_the_upgrade(&mut request)?;
        pingora::proxy::ProxyHttp::upstream_request_filter(self, session, &mut request, ctx)
            .await?;
        backend
            .write_request_header(Box::new(request))
            .await
            .map_err(|e| e.into_up())?;
        let mut header = read_answer(&mut backend, read_timeout).await?;
        self.finish_response(session, ctx, &mut header).await?;
        let switching = header.status == http::StatusCode::SWITCHING_PROTOCOLS;
        if header.status.is_informational() && !switching {
            // Another 1xx is no answer: the client would wait for one.
            return Err(Error::explain(
                ErrorType::HTTPStatus(500),
                "a response hook made the answer to an upgrade an interim (1xx) one",
            ));
        }
        // Whether the backend switched, and whether the answer the response
        // hooks left says so.
        match (backend.was_upgraded(), switching) {
            (true, true) => {}
            (true, false) => {
                // A response hook refused the backend's `101`: the client
                // gets that answer, and the switched connection is closed.
                drop(backend);
                ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
                return answer_refused_upgrade(session, header).await;
            }
            (false, true) => {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(500),
                    "a response hook made the answer a 101 the backend did not send",
                ));
            }
            (false, false) => {
                // A refusal's body is read as any response's: within read_timeout.
                backend.read_timeout = Some(read_timeout);
                let relayed = relay_answer(session, &mut backend, header).await;
                ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
                return relayed;
            }
        }
        let _open = OpenGuard::enter();
        // Both sides plain: the client's stream is handed over once the
        // `101` is out, and the relay carries the bytes (see `relay`).
        let sockets = relay_sockets(session, backend.stream());
        let handing = sockets.is_some() && super::connections::hand_over_on_flush(session);
        if let Err(e) = session.write_response_header(header, false).await {
            if handing {
                // No hand-over after all (a stream already moved out closes).
                drop(super::connections::handed_over(session));
            }
            return Err(e);
        }
        // The tunnel's silence is measured both ways below, not per side.
        session.set_read_timeout(None);
        let idle = ctx
            .group
            .as_ref()
            .map_or(Duration::from_secs(3600), |g| g.idle_timeout);
        // What either side sent along with the upgrade is already read into
        // its session's buffer: it goes first, then the sockets themselves.
        let early_down = backend.read_body_bytes().now_or_never().map(Step::Backend);
        let stream = backend.into_inner();
        let handed = handing
            .then(|| super::connections::handed_over(session))
            .flatten();
        if let (Some(sockets), Some(handed)) = (sockets, handed) {
            // Pingora's streams go, and with them their registrations with
            // the runtime: the relay alone watches the sockets.
            drop((stream, handed.stream));
            let end = self
                .relay(session, handed.read_ahead, sockets, early_down, idle)
                .await;
            ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
            ctx.attempts.response_done();
            ctx.tunnel = Some(end);
            return Ok(());
        }
        let (client, early_up) = Client::take(session);
        let early = [early_up.map(Step::Client), early_down];
        let stopping = Arc::clone(&self.stopping);
        let end = match plain_socket(&*stream, None) {
            // A plain backend: its socket alone, with Pingora's stream gone.
            Some(socket) => {
                drop(stream);
                let (from, to) = socket.into_split();
                carry(client, Backend::new(from, to), early, idle, stopping).await
            }
            None => {
                let (from, to) = tokio::io::split(stream);
                carry(client, Backend::new(from, to), early, idle, stopping).await
            }
        };
        if end.closed_by == "backend" {
            // Passes the backend's close on: the client's connection ends.
            let _ = session.write_response_body(None, true).await;
        }
        // The client may still be sending: its connection closes lingering,
        // so that the last bytes it was sent are not reset away.
        super::connections::answered_early(session);
        ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        ctx.attempts.response_done();
        ctx.tunnel = Some(end);
        Ok(())
    }

    /// Carries a tunnel, its client's stream handed over (with the bytes
    /// read ahead of the session) and Pingora's streams gone, on a relay
    /// thread (on this task if none could be started). The client's
    /// connection closes with the tunnel.
    async fn relay(
        &self,
        session: &mut Session,
        read_ahead: Vec<u8>,
        [client, backend]: [std::net::TcpStream; 2],
        early_down: Option<Step>,
        idle: Duration,
    ) -> access_log::Tunnel {
        // What the client sent before the tunnel: what the session read into
        // its buffer (anything else than bytes is no more than that the
        // buffer was empty; the socket tells the rest), then what was read
        // ahead of the session.
        let mut up = BytesMut::new();
        if let Some(Ok(Some(bytes))) = session.read_request_body().now_or_never() {
            up.extend_from_slice(&bytes);
        }
        up.extend_from_slice(&read_ahead);
        let down = match early_down {
            None => Bytes::new(),
            Some(Step::Backend(Ok(Some(bytes)))) => bytes,
            // The backend closed, or failed, along with its `101`.
            Some(step) => {
                let end = access_log::Tunnel {
                    closed_by: "backend",
                    bytes_up: up.len() as u64,
                    bytes_down: 0,
                };
                if let Step::Backend(Err(e)) = step {
                    cut_by_backend(&end, &e);
                }
                return end;
            }
        };
        let opening = relay::Opening {
            client,
            backend,
            up: up.freeze(),
            down,
            idle,
        };
        let stopping = Arc::clone(&self.stopping);
        let opening = match self.relays.carry(opening) {
            Ok(carried) => {
                let ended = carried.end(stopping.grace_over()).await;
                if let Some(e) = ended.failure {
                    cut_by_backend(&ended.tunnel, &e);
                }
                return ended.tunnel;
            }
            Err(opening) => *opening,
        };
        let runtime = |socket| TcpStream::from_std(socket);
        let (client, backend) = match (runtime(opening.client), runtime(opening.backend)) {
            (Ok(client), Ok(backend)) => (client, backend),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("WebSocket tunnel closed: the runtime could not take its sockets: {e}");
                return access_log::Tunnel {
                    closed_by: "error",
                    bytes_up: 0,
                    bytes_down: 0,
                };
            }
        };
        let early = [
            (!opening.up.is_empty()).then(|| Step::Client(Ok(Some(opening.up)))),
            (!opening.down.is_empty()).then(|| Step::Backend(Ok(Some(opening.down)))),
        ];
        let (from, to) = backend.into_split();
        let client = Client::Socket(Socket::new(client));
        carry(client, Backend::new(from, to), early, idle, stopping).await
    }

    /// A connection to a backend of the request's group, retried elsewhere
    /// when one cannot be reached (the same choices as for any request).
    async fn connect(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<BackendSession> {
        use pingora::proxy::ProxyHttp;
        loop {
            let peer = self.upstream_peer(session, ctx).await?;
            match self.tunnels.new_stream(&*peer).await {
                Ok(stream) => return Ok(BackendSession::new_with_options(stream, &*peer)),
                Err(e) => {
                    let e = self.fail_to_connect(session, &peer, ctx, e.into_up());
                    if !e.retry() || ctx.attempts.tries() >= MAX_TRIES {
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// Carries the tunnel to its end. With the client's socket in hand (the
/// plain listener), on a task of its own: a packet then wakes that task
/// alone, not the futures of the connection, of Pingora's request and of
/// its hooks that hold the tunnel (a tenth of a round trip's instructions).
/// The task ends with the request's future: a tunnel is never left behind.
async fn carry<R, W>(
    client: Client<'_>,
    backend: Backend<R, W>,
    early: [Option<Step>; 2],
    idle: Duration,
    stopping: Arc<Stopping>,
) -> access_log::Tunnel
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let early = early.into_iter().flatten();
    match client {
        Client::Socket(socket) => {
            let mut client = Client::Socket(socket);
            let task = Detached(tokio::spawn(async move {
                pump(&mut client, backend, early, idle, &stopping).await
                // The duplicate descriptor closes here, before Pingora
                // closes its own.
            }));
            task.end().await
        }
        mut session => pump(&mut session, backend, early, idle, &stopping).await,
    }
}

/// A tunnel's task, stopped when dropped.
struct Detached(tokio::task::JoinHandle<access_log::Tunnel>);

impl Detached {
    /// How the tunnel ended. A panic in the task goes on in the caller, as
    /// it would have had the tunnel run there.
    async fn end(mut self) -> access_log::Tunnel {
        match (&mut self.0).await {
            Ok(end) => end,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Cancelled: the runtime is going away with the process.
                Err(_) => access_log::Tunnel {
                    closed_by: "stop",
                    bytes_up: 0,
                    bytes_down: 0,
                },
            },
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies bytes both ways until the tunnel ends, and says how it did.
/// `early` is what the two sides sent before the tunnel began.
async fn pump<R, W>(
    client: &mut Client<'_>,
    mut backend: Backend<R, W>,
    mut early: impl Iterator<Item = Step>,
    idle: Duration,
    stopping: &Stopping,
) -> access_log::Tunnel
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut end = access_log::Tunnel {
        closed_by: "client",
        bytes_up: 0,
        bytes_down: 0,
    };
    // One timer and one stop watch for the whole tunnel, not one per
    // message: traffic only notes its time, and the timer, when it
    // fires, is moved to idle_timeout after the last traffic. Both are
    // polled only when one of them has woken the tunnel (see `Bell`).
    let mut last = Instant::now();
    let silence = tokio::time::sleep(idle);
    tokio::pin!(silence);
    let stop = stopping.grace_over();
    tokio::pin!(stop);
    let bell = Arc::new(Bell::default());
    let alarm = futures::task::waker(bell.clone());
    // Which side is read first, turn about, so that neither starves.
    let mut client_first = true;
    let failure = loop {
        let step = match early.next() {
            Some(step) => step,
            None => {
                client_first = !client_first;
                std::future::poll_fn(|cx| {
                    // The client is read again once the backend has
                    // taken all it sent: one read's worth waits, not
                    // more.
                    let client_turn = !backend.to.busy();
                    if client_first && client_turn {
                        if let Poll::Ready(read) = pin!(client.receive()).poll(cx) {
                            return Poll::Ready(Step::Client(read));
                        }
                    }
                    if let Poll::Ready(read) = pin!(backend.from.receive()).poll(cx) {
                        return Poll::Ready(Step::Backend(read));
                    }
                    if !client_first && client_turn {
                        if let Poll::Ready(read) = pin!(client.receive()).poll(cx) {
                            return Poll::Ready(Step::Client(read));
                        }
                    }
                    if !client_turn {
                        if let Poll::Ready(written) = pin!(backend.to.advance()).poll(cx) {
                            return Poll::Ready(match written {
                                Ok(()) => Step::Written,
                                Err(e) => Step::BackendGone(e),
                            });
                        }
                    }
                    bell.task.register(cx.waker());
                    if bell.rang.swap(false, Ordering::AcqRel) {
                        let mut cx = Context::from_waker(&alarm);
                        if silence.as_mut().poll(&mut cx).is_ready() {
                            return Poll::Ready(Step::Silence);
                        }
                        if stop.as_mut().poll(&mut cx).is_ready() {
                            return Poll::Ready(Step::Stop);
                        }
                    }
                    Poll::Pending
                })
                .await
            }
        };
        match step {
            Step::Client(Ok(Some(bytes))) => {
                last = Instant::now();
                end.bytes_up += bytes.len() as u64;
                if let Err(e) = backend.to.put(bytes) {
                    end.closed_by = "backend";
                    break Some(e);
                }
            }
            Step::Backend(Ok(Some(bytes))) => {
                end.bytes_down += bytes.len() as u64;
                if client.send(bytes).await.is_err() {
                    break None; // the client is gone
                }
                // Silence is counted from the last bytes moved: a slow
                // client still taking them is not idle.
                last = Instant::now();
            }
            // A reset is a close too, only a ruder one.
            Step::Client(_) => break None,
            Step::Backend(read) => {
                end.closed_by = "backend";
                break read.err();
            }
            Step::BackendGone(e) => {
                end.closed_by = "backend";
                break Some(e);
            }
            Step::Written => last = Instant::now(),
            Step::Silence => {
                let deadline = last + idle;
                if deadline <= Instant::now() {
                    end.closed_by = "idle";
                    break None;
                }
                silence.as_mut().reset(deadline.into());
                // Polled again, to be woken at the new deadline.
                bell.ring();
            }
            Step::Stop => {
                end.closed_by = "stop";
                break None;
            }
        }
    };
    if end.closed_by == "client" {
        // What the client sent before its close goes out first, for as long
        // as the backend keeps taking it.
        let _ = tokio::time::timeout(idle.min(relay::HALF_CLOSED), async {
            while backend.to.busy() {
                backend.to.advance().await?;
            }
            Ok::<_, Box<Error>>(())
        })
        .await;
    }
    let _ = backend.to.io.shutdown().await;
    if let Some(e) = failure {
        cut_by_backend(&end, &e);
    }
    end
}

/// A backend that drops a WebSocket without closing it is worth an
/// operator's look; a client that does is not.
fn cut_by_backend(end: &access_log::Tunnel, e: &dyn std::fmt::Display) {
    log::warn!(
        "WebSocket tunnel cut by the backend after {} bytes up and {} down: {e}",
        end.bytes_up,
        end.bytes_down
    );
}

/// The client's end of a tunnel.
///
/// On the plain listener the tunnel reads and writes the client's socket
/// itself, through a duplicate of the descriptor of Pingora's stream: a
/// message then costs two system calls and a copy, not a pass through
/// Pingora's body reader and writer on top. Over TLS the bytes must go
/// through Pingora's session, which holds the TLS state.
enum Client<'a> {
    Session(&'a mut Session),
    Socket(Socket<TcpStream>),
}

impl<'a> Client<'a> {
    /// The client's end, and what it sent before the tunnel began (read
    /// from the session's buffer, the only place the socket cannot give).
    fn take(session: &'a mut Session) -> (Client<'a>, Option<Result<Option<Bytes>>>) {
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        let Some(socket) = session.stream().and_then(|s| plain_socket(&**s, client)) else {
            return (Client::Session(session), None);
        };
        // The session's buffer is handed over before the socket: a read
        // that would have to wait for the network is dropped unstarted.
        let early = session.read_request_body().now_or_never();
        (Client::Socket(Socket::new(socket)), early)
    }

    async fn receive(&mut self) -> Result<Option<Bytes>> {
        match self {
            Client::Session(session) => session.read_request_body().await,
            Client::Socket(socket) => socket.receive().await,
        }
    }

    async fn send(&mut self, bytes: Bytes) -> Result<()> {
        match self {
            Client::Session(session) => session.write_response_body(Some(bytes), false).await,
            Client::Socket(socket) => socket.send(&bytes).await,
        }
    }
}

/// A socket the tunnel reads and writes itself, with its read buffer.
struct Socket<S> {
    io: S,
    /// Each read's bytes are split off and sent on; once they are written
    /// and dropped, the next read reuses the same allocation.
    buf: BytesMut,
}

/// The most one read takes.
const READ_SIZE: usize = 16 * 1024;

impl<S> Socket<S> {
    fn new(io: S) -> Socket<S> {
        Socket {
            io,
            buf: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> Socket<S> {
    /// The next bytes, `None` at the end. Cancel-safe: a read that has to
    /// wait takes nothing until it completes.
    async fn receive(&mut self) -> Result<Option<Bytes>> {
        self.buf.reserve(READ_SIZE);
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(self.buf.split().freeze())),
            Err(e) => Error::e_because(ErrorType::ReadError, "reading a WebSocket tunnel", e),
        }
    }
}

impl<S: AsyncWrite + Unpin> Socket<S> {
    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let written = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        written
            .await
            .or_err(ErrorType::WriteError, "writing a WebSocket tunnel")
    }
}

/// The backend's end of a tunnel, read and written apart: its socket, or
/// over TLS its stream taken out of its session.
struct Backend<R, W> {
    from: Socket<R>,
    to: Outbox<W>,
}

impl<R, W> Backend<R, W> {
    fn new(from: R, to: W) -> Backend<R, W> {
        Backend {
            from: Socket::new(from),
            to: Outbox {
                io: to,
                queued: Bytes::new(),
                unflushed: false,
            },
        }
    }
}

/// Bytes on their way to the backend, written as its socket takes them
/// while the tunnel goes on reading the backend. A backend that stops
/// reading until what it sends is read (an echo blocked in its writes) so
/// never waits on a tunnel that waits on it.
struct Outbox<W> {
    io: W,
    queued: Bytes,
    /// Written into the stream's buffer and not yet flushed out of it.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> Outbox<W> {
    /// Whether bytes are still on their way.
    fn busy(&self) -> bool {
        !self.queued.is_empty() || self.unflushed
    }

    /// Queues `bytes` (the outbox is empty: the client is read only then)
    /// and writes at once what the socket takes without waiting.
    fn put(&mut self, bytes: Bytes) -> Result<()> {
        debug_assert!(self.queued.is_empty());
        self.queued = bytes;
        while self.busy() {
            match self.advance().now_or_never() {
                Some(written) => written?,
                None => break, // the rest when the socket has room
            }
        }
        Ok(())
    }

    /// One step on the way: a write of what is queued, or the flush after
    /// it. Cancel-safe: a step that has to wait has done nothing.
    async fn advance(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            self.io
                .flush()
                .await
                .or_err(ErrorType::WriteError, "writing a WebSocket tunnel")?;
            self.unflushed = false;
            return Ok(());
        }
        match self.io.write(&self.queued).await {
            Ok(0) => Error::e_explain(ErrorType::WriteError, "the backend takes no more bytes"),
            Ok(n) => {
                if n < self.queued.len() {
                    bytes::Buf::advance(&mut self.queued, n);
                } else {
                    // Let go of the read buffer's bytes: the next read then
                    // reuses its allocation.
                    self.queued = Bytes::new();
                }
                self.unflushed = true;
                Ok(())
            }
            Err(e) => Error::e_because(ErrorType::WriteError, "writing a WebSocket tunnel", e),
        }
    }
}

/// Both sockets of a tunnel the relay can carry (both sides plain TCP):
/// duplicates of the descriptors of Pingora's streams, taken before the
/// `101` goes out, so that a failure leaves the tunnel to the runtime.
fn relay_sockets(session: &Session, backend: &Stream) -> Option<[std::net::TcpStream; 2]> {
    let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
    let client = plain_copy(&**session.stream()?, peer)?;
    let backend = plain_copy(&**backend, None)?;
    match (client, backend) {
        (Ok(client), Ok(backend)) => Some([client, backend]),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("WebSocket tunnel carried on a worker thread: its sockets could not be taken for the relay: {e}");
            None
        }
    }
}

/// The TCP socket under a plain (not TLS) stream of Pingora's, connected
/// to `peer` when that is given.
fn plain_socket(stream: &dyn IO, peer: Option<std::net::SocketAddr>) -> Option<TcpStream> {
    plain_copy(stream, peer)?
        .and_then(TcpStream::from_std)
        .inspect_err(|e| {
            log::warn!(
                "WebSocket tunnel through Pingora's stream, its socket could not be taken: {e}"
            )
        })
        .ok()
}

/// A copy of the descriptor of a plain (not TLS) stream of Pingora's, as
/// [`duplicate`] makes it; `None` over TLS.
fn plain_copy(
    stream: &dyn IO,
    peer: Option<std::net::SocketAddr>,
) -> Option<std::io::Result<std::net::TcpStream>> {
    stream
        .get_ssl_digest()
        .is_none()
        .then(|| duplicate(stream.id(), peer))
}

/// A nonblocking socket for the TCP connection behind `fd`, the descriptor
/// of a stream of Pingora's, which may stay open there too.
fn duplicate(
    fd: std::os::fd::RawFd,
    peer: Option<std::net::SocketAddr>,
) -> std::io::Result<std::net::TcpStream> {
    // SAFETY: `fd` is the descriptor of a stream the caller holds, open for
    // longer than this borrow; the copy made of it is a new descriptor
    // owned by the socket returned.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = std::net::TcpStream::from(borrowed.try_clone_to_owned()?);
    let connected = socket.peer_addr()?; // a TCP socket, not a Unix one
    if let Some(peer) = peer.filter(|peer| *peer != connected) {
        let e = format!("descriptor {fd} is connected to {connected}, not to {peer}");
        return Err(std::io::Error::other(e));
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// What one turn of the tunnel brought.
enum Step {
    Client(Result<Option<Bytes>>),
    Backend(Result<Option<Bytes>>),
    /// A write to the backend failed.
    BackendGone(Box<Error>),
    /// A write to the backend took some of what waits.
    Written,
    /// The idle timer fired.
    Silence,
    Stop,
}

/// The waker the idle timer and the end of a graceful stop are given: it
/// wakes the tunnel's task and notes that one of them did, so that the
/// tunnel polls them only then, and not after every message as a `select!`
/// would (their polls were an eighth of a round trip's instructions).
struct Bell {
    rang: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl Default for Bell {
    fn default() -> Bell {
        // Rung from the start: both are polled once, to be woken at all.
        Bell {
            rang: AtomicBool::new(true),
            task: futures::task::AtomicWaker::new(),
        }
    }
}

impl Bell {
    /// Has the timer and the stop polled on the next turn.
    fn ring(&self) {
        self.rang.store(true, Ordering::Release);
    }
}

impl futures::task::ArcWake for Bell {
    fn wake_by_ref(bell: &Arc<Bell>) {
        bell.ring();
        bell.task.wake();
    }
}

/// Strips the hop-by-hop fields of the client's request (and those its
/// `Connection` names) and asks for the WebSocket upgrade alone, as
/// Pingora's proxy does for the requests it forwards.
fn keep_only_the_upgrade(req: &mut RequestHeader) -> Result<()> {
    let nominated: Vec<http::HeaderName> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| http::HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| name != http::header::UPGRADE)
        .take(32)
        .collect();
    for name in nominated {
        req.remove_header(&name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "http2-settings",
    ] {
        req.remove_header(name);
    }
    req.insert_header(http::header::CONNECTION, "Upgrade")?;
    req.insert_header(http::header::UPGRADE, "websocket")?;
    Ok(())
}

/// The backend's answer to the upgrade, past any `1xx` but a `101`, within
/// `read_timeout`.
async fn read_answer(
    backend: &mut BackendSession,
    read_timeout: Duration,
) -> Result<Box<ResponseHeader>> {
    let answer = async {
        loop {
            backend.read_response().await.map_err(|e| e.into_up())?;
            let header = backend.resp_header().ok_or_else(|| {
                Error::explain(ErrorType::InvalidHTTPHeader, "no response header").into_up()
            })?;
            if header.status.as_u16() == 101 || !header.status.is_informational() {
                return Ok(Box::new(header.clone()));
            }
        }
    };
    match tokio::time::timeout(read_timeout, answer).await {
        Ok(answer) => answer,
        Err(_) => Err(Error::explain(
            ErrorType::ReadTimedout,
            "the backend did not answer the upgrade within read_timeout",
        )
        .into_up()),
    }
}

/// Answers with the head an extension's response hook made of a backend's
/// `101`, without a body: the backend's side of the connection is no longer
/// HTTP. The client's connection closes after it.
async fn answer_refused_upgrade(
    session: &mut Session,
    mut header: Box<ResponseHeader>,
) -> Result<()> {
    // What only a switch means: `Upgrade`, `Connection: upgrade` and the
    // handshake's `Sec-WebSocket-*` answers.
    let switch_fields: Vec<http::HeaderName> = header
        .headers
        .keys()
        .filter(|name| {
            *name == http::header::UPGRADE
                || *name == http::header::CONNECTION
                || name.as_str().starts_with("sec-websocket-")
        })
        .cloned()
        .collect();
    for name in switch_fields {
        header.remove_header(&name);
    }
    header.insert_header(http::header::CONTENT_LENGTH, 0)?;
    session.set_keepalive(None);
    // What the client sent after its request (early frames) is still
    // unread: the close lingers, so that it does not reset the answer.
    super::connections::answered_early(session);
    session.write_response_header(header, true).await
}

/// Relays an answer that refuses the upgrade as a normal response.
async fn relay_answer(
    session: &mut Session,
    backend: &mut BackendSession,
    header: Box<ResponseHeader>,
) -> Result<()> {
    let head_only = session.req_header().method == http::Method::HEAD;
    let no_body = head_only || backend.is_body_done();
    session.write_response_header(header, no_body).await?;
    if no_body {
        return Ok(());
    }
    while let Some(chunk) = backend.read_body_bytes().await.map_err(|e| e.into_up())? {
        session.write_response_body(Some(chunk), false).await?;
    }
    session.write_response_body(None, true).await
}
